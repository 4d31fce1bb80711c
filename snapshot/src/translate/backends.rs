//! backendRefs → clusters: core Services (endpoints from their EndpointSlices) and Ferrum
//! `Backend`s (static addresses), each with the traffic policy that applies to it.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{Problems, Reason, parse_duration_ms};
use crate::crd::TrafficPolicy;
use crate::model::*;
use crate::resources::{ObjectRef, Resources};

pub(crate) struct Clusters<'a> {
    res: &'a Resources,
    /// Lookups built once, so resolving a backendRef does not scan every object.
    services: BTreeMap<(&'a str, &'a str), &'a k8s_openapi::api::core::v1::Service>,
    slices: BTreeMap<(&'a str, &'a str), Vec<&'a k8s_openapi::api::discovery::v1::EndpointSlice>>,
    built: BTreeMap<String, Cluster>,
    /// Policies that failed to apply, reported once per policy object at the end.
    policy_errors: BTreeMap<(ObjectRef, String), String>,
}

/// A backendRef as the route names it, namespace resolved.
pub(crate) struct BackendRef<'r> {
    pub group: &'r str,
    pub kind: &'r str,
    pub namespace: &'r str,
    pub name: &'r str,
    pub port: Option<i32>,
}

/// Does a ReferenceGrant in `to_ns` let a `from_kind` in `from_ns` refer to `to_kind` `to_name`?
pub(crate) fn reference_granted(
    res: &Resources,
    from_kind: &str,
    from_ns: &str,
    to_group: &str,
    to_kind: &str,
    to_ns: &str,
    to_name: &str,
) -> bool {
    res.reference_grants.iter().any(|g| {
        g.metadata.namespace.as_deref() == Some(to_ns)
            && g.spec
                .from
                .iter()
                .any(|f| f.group == crate::GATEWAY_GROUP && f.kind == from_kind && f.namespace == from_ns)
            && g.spec
                .to
                .iter()
                .any(|t| t.group == to_group && t.kind == to_kind && t.name.as_deref().is_none_or(|n| n == to_name))
    })
}

impl<'a> Clusters<'a> {
    pub(crate) fn new(res: &'a Resources) -> Self {
        let key = |m: &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
            (m.namespace.as_deref().unwrap_or(""), m.name.as_deref().unwrap_or(""))
        };
        let mut slices: BTreeMap<_, Vec<_>> = BTreeMap::new();
        for s in &res.endpoint_slices {
            if let Some(svc) = s
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("kubernetes.io/service-name"))
            {
                slices
                    .entry((s.metadata.namespace.as_deref().unwrap_or(""), svc.as_str()))
                    .or_default()
                    .push(&**s);
            }
        }
        Clusters {
            res,
            services: res.services.iter().map(|s| (key(&s.metadata), &**s)).collect(),
            slices,
            built: BTreeMap::new(),
            policy_errors: BTreeMap::new(),
        }
    }

    /// Resolves one backendRef of `route` (in `route_ns`) to a cluster name, or explains why not.
    pub(crate) fn resolve(
        &mut self,
        route_kind: &str,
        route_ns: &str,
        r: &BackendRef<'_>,
    ) -> Result<String, (Reason, String)> {
        if r.namespace != route_ns
            && !reference_granted(self.res, route_kind, route_ns, r.group, r.kind, r.namespace, r.name)
        {
            return Err((
                Reason::RefNotPermitted,
                format!(
                    "{} {}/{} is in another namespace and no ReferenceGrant allows it",
                    r.kind, r.namespace, r.name
                ),
            ));
        }
        let name = match (r.group, r.kind) {
            ("", "Service") => self.service(r)?,
            (crate::FERRUM_GROUP, "Backend") => self.backend(r)?,
            (g, k) => {
                return Err((
                    Reason::InvalidKind,
                    format!("backendRef kind {k:?} in group {g:?} is not supported (Service, ferrum.dev/Backend)"),
                ));
            }
        };
        // gRPC needs HTTP/2 upstream: GRPCRoutes get an h2 variant of a cluster that is not.
        if route_kind == "GRPCRoute" && self.built[&name].protocol != UpstreamProtocol::Http2 {
            let h2 = format!("{name}#h2");
            if !self.built.contains_key(&h2) {
                let mut c = self.built[&name].clone();
                c.name = h2.clone();
                c.protocol = UpstreamProtocol::Http2;
                self.built.insert(h2.clone(), c);
            }
            return Ok(h2);
        }
        Ok(name)
    }

    fn service(&mut self, r: &BackendRef<'_>) -> Result<String, (Reason, String)> {
        let Some(port) = r.port else {
            return Err((Reason::Invalid, "a Service backendRef needs a port".into()));
        };
        let name = format!("service/{}/{}:{port}", r.namespace, r.name);
        if self.built.contains_key(&name) {
            return Ok(name);
        }
        let svc = self.services.get(&(r.namespace, r.name)).copied().ok_or_else(|| {
            (
                Reason::BackendNotFound,
                format!("Service {}/{} not found", r.namespace, r.name),
            )
        })?;
        let spec = svc.spec.clone().unwrap_or_default();
        let sport = spec.ports.iter().flatten().find(|p| p.port == port).ok_or_else(|| {
            (
                Reason::BackendNotFound,
                format!("Service {}/{} has no port {port}", r.namespace, r.name),
            )
        })?;
        let mut endpoints = Vec::new();
        if spec.type_.as_deref() == Some("ExternalName") {
            let host = spec.external_name.clone().unwrap_or_default();
            endpoints.push(Endpoint::new(host, port as u16));
        }
        for slice in self.slices.get(&(r.namespace, r.name)).into_iter().flatten() {
            // The slice port that serves this Service port: same name (unnamed ports match each other).
            let slice_port = slice
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref().unwrap_or("") == sport.name.as_deref().unwrap_or(""))
                .and_then(|p| p.port)
                .or(match &sport.target_port {
                    Some(IntOrString::Int(p)) => Some(*p),
                    _ => None,
                });
            let Some(slice_port) = slice_port.and_then(|p| u16::try_from(p).ok()) else {
                continue;
            };
            for e in &slice.endpoints {
                let cond = e.conditions.clone().unwrap_or_default();
                // A terminating endpoint that still serves gets no new requests.
                let ready = cond.ready.unwrap_or(true) && !cond.terminating.unwrap_or(false);
                for addr in &e.addresses {
                    endpoints.push(Endpoint {
                        address: addr.clone(),
                        port: slice_port,
                        weight: 1,
                        identity: None,
                        ready,
                        zone: e.zone.clone(),
                    });
                }
            }
        }
        endpoints.sort_by(|a, b| (&a.address, a.port).cmp(&(&b.address, b.port)));
        endpoints.dedup_by(|a, b| a.address == b.address && a.port == b.port);
        let mut cluster = Cluster::new(name.clone(), endpoints);
        if sport
            .app_protocol
            .as_deref()
            .is_some_and(|p| p == "kubernetes.io/h2c" || p == "h2c")
        {
            cluster.protocol = UpstreamProtocol::Http2;
        }
        let policy = self.res.backend_policies.iter().find(|p| {
            p.metadata.namespace.as_deref() == Some(r.namespace)
                && p.spec
                    .target_refs
                    .iter()
                    .any(|t| t.group.is_empty() && t.kind == "Service" && t.name == r.name)
        });
        if let Some(p) = policy {
            let obj = super::meta_ref("BackendPolicy", &p.metadata);
            if let Err((field, msg)) = apply_policy(&mut cluster, &p.spec.policy) {
                self.policy_errors.insert((obj, field), msg);
            }
        }
        self.built.insert(name.clone(), cluster);
        Ok(name)
    }

    fn backend(&mut self, r: &BackendRef<'_>) -> Result<String, (Reason, String)> {
        let name = format!("backend/{}/{}", r.namespace, r.name);
        if self.built.contains_key(&name) {
            return Ok(name);
        }
        let b = self
            .res
            .backends
            .iter()
            .find(|b| {
                b.metadata.namespace.as_deref() == Some(r.namespace) && b.metadata.name.as_deref() == Some(r.name)
            })
            .ok_or_else(|| {
                (
                    Reason::BackendNotFound,
                    format!("Backend {}/{} not found", r.namespace, r.name),
                )
            })?;
        let endpoints = b
            .spec
            .endpoints
            .iter()
            .map(|e| Endpoint {
                weight: e.weight.unwrap_or(1),
                zone: e.zone.clone(),
                ..Endpoint::new(e.address.clone(), e.port)
            })
            .collect();
        let mut cluster = Cluster::new(name.clone(), endpoints);
        if let Err((field, msg)) = apply_policy(&mut cluster, &b.spec.policy) {
            let obj = super::meta_ref("Backend", &b.metadata);
            self.policy_errors.insert((obj, field), msg);
        }
        self.built.insert(name.clone(), cluster);
        Ok(name)
    }

    pub(crate) fn finish(self, problems: &mut Problems<'_>) -> Vec<Cluster> {
        for ((obj, field), msg) in self.policy_errors {
            problems.push(&obj, field, Reason::Invalid, msg);
        }
        self.built.into_values().collect()
    }
}

/// Applies a Ferrum traffic policy; an error names the field (`spec.…`).
fn apply_policy(c: &mut Cluster, p: &TrafficPolicy) -> Result<(), (String, String)> {
    let dur = |field: &str, v: &Option<String>| -> Result<Option<u64>, (String, String)> {
        v.as_deref()
            .map(parse_duration_ms)
            .transpose()
            .map_err(|e| (format!("spec.{field}"), e))
    };
    if let Some(proto) = &p.protocol {
        c.protocol = match proto.as_str() {
            "HTTP/1.1" | "HTTP" => UpstreamProtocol::Http1,
            "HTTP/2" | "h2c" | "h2" => UpstreamProtocol::Http2,
            other => {
                return Err(("spec.protocol".into(), format!("{other:?} is not HTTP/1.1 or HTTP/2")));
            }
        };
    }
    if let Some(lb) = &p.load_balancer {
        c.lb = match lb.kind.as_str() {
            "RoundRobin" => LbPolicy::RoundRobin,
            "LeastRequest" => LbPolicy::LeastRequest,
            "Random" => LbPolicy::Random,
            "ConsistentHash" => match (&lb.hash_header, lb.hash_client_ip) {
                (Some(h), _) => LbPolicy::ConsistentHash(HashOn::Header(h.to_ascii_lowercase())),
                (None, Some(true)) => LbPolicy::ConsistentHash(HashOn::ClientIp),
                _ => {
                    return Err((
                        "spec.loadBalancer".into(),
                        "ConsistentHash needs hashHeader or hashClientIP: true".into(),
                    ));
                }
            },
            other => {
                return Err((
                    "spec.loadBalancer.type".into(),
                    format!("{other:?} is not RoundRobin, LeastRequest, Random or ConsistentHash"),
                ));
            }
        };
    }
    if let Some(hc) = &p.health_check {
        let d = HealthCheck::default();
        let expected_status = match hc.expected_status.as_deref() {
            None => d.expected_status,
            Some([lo, hi]) if lo <= hi => (*lo, *hi),
            Some([one]) => (*one, *one),
            Some(_) => {
                return Err((
                    "spec.healthCheck.expectedStatus".into(),
                    "give [status] or [low, high]".into(),
                ));
            }
        };
        c.health_check = Some(HealthCheck {
            path: hc.path.clone().unwrap_or(d.path),
            interval_ms: dur("healthCheck.interval", &hc.interval)?.unwrap_or(d.interval_ms),
            timeout_ms: dur("healthCheck.timeout", &hc.timeout)?.unwrap_or(d.timeout_ms),
            healthy_threshold: hc.healthy_threshold.unwrap_or(d.healthy_threshold),
            unhealthy_threshold: hc.unhealthy_threshold.unwrap_or(d.unhealthy_threshold),
            expected_status,
        });
    }
    if let Some(od) = &p.outlier_detection {
        if od.disabled == Some(true) {
            c.outlier_detection = None;
        } else {
            let d = OutlierDetection::default();
            c.outlier_detection = Some(OutlierDetection {
                consecutive_5xx: od.consecutive_5xx.unwrap_or(d.consecutive_5xx),
                consecutive_connect_failures: od
                    .consecutive_connect_failures
                    .unwrap_or(d.consecutive_connect_failures),
                base_ejection_ms: dur("outlierDetection.baseEjectionTime", &od.base_ejection_time)?
                    .unwrap_or(d.base_ejection_ms),
                max_ejection_percent: od.max_ejection_percent.unwrap_or(d.max_ejection_percent).min(100),
            });
        }
    }
    if let Some(cb) = &p.circuit_breaker {
        let d = CircuitBreaker::default();
        c.circuit_breaker = CircuitBreaker {
            max_connections: cb.max_connections.unwrap_or(d.max_connections),
            max_pending_requests: cb.max_pending_requests.unwrap_or(d.max_pending_requests),
            max_requests: cb.max_requests.unwrap_or(d.max_requests),
        };
    }
    if let Some(t) = &p.timeouts {
        let d = ClusterTimeouts::default();
        c.timeouts = ClusterTimeouts {
            connect_ms: dur("timeouts.connect", &t.connect)?.unwrap_or(d.connect_ms),
            read_ms: dur("timeouts.read", &t.read)?.unwrap_or(d.read_ms),
            idle_ms: dur("timeouts.idle", &t.idle)?.unwrap_or(d.idle_ms),
        };
    }
    if let Some(r) = &p.retry {
        let d = RetryPolicy::default();
        c.retry = Some(RetryPolicy {
            attempts: r.attempts.unwrap_or(d.attempts),
            on: r.on.clone().unwrap_or(d.on),
            backoff_base_ms: dur("retry.backoff", &r.backoff)?.unwrap_or(d.backoff_base_ms),
            budget_percent: r.budget_percent.unwrap_or(d.budget_percent),
            min_retry_concurrency: d.min_retry_concurrency,
        });
    }
    if let Some(t) = &p.tls {
        c.tls = Some(UpstreamTls {
            sni: t.sni.clone(),
            ca_file: t.ca_file.clone(),
            insecure_skip_verify: t.insecure_skip_verify.unwrap_or(false),
        });
    }
    Ok(())
}
