//! backendRefs → clusters: core Services (endpoints from their EndpointSlices) and Ferrum
//! `Backend`s (static addresses), each with the traffic policy that applies to it.

use std::collections::BTreeMap;

use foldhash::{HashMap, HashMapExt};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{Problems, Reason, parse_duration_ms};
use crate::crd::TrafficPolicy;
use crate::model::*;
use crate::resources::{ObjectRef, Resources};

pub(crate) struct Clusters<'a> {
    res: &'a Resources,
    /// Built on the first lookup (see [`index`]).
    index: std::cell::OnceCell<Index<'a>>,
    built: HashMap<String, Arc<BuiltCluster>>,
    /// Clusters of the last translation, reused when their Service, slices (and, through the
    /// caller's context check, policies) are the same objects.
    memo: ClusterMemos,
    /// What the route being translated looked up, while a trace is on.
    trace: Option<Vec<Lookup>>,
    /// The route being translated is a mesh route: backends in other namespaces need no grant.
    grants_waived: bool,
    pub(crate) reused: usize,
    /// Every Service is the same object as in the last translation.
    pub(crate) services_unchanged: bool,
}

pub(crate) type ClusterMemos = HashMap<String, Arc<BuiltCluster>>;

/// What kept part of a cluster's settings out: (object, field) and why, reported while the
/// cluster serves without it.
type ClusterProblem = ((ObjectRef, String), String);

pub(crate) struct BuiltCluster {
    cluster: Arc<Cluster>,
    digest: Digest,
    service: Option<Arc<Service>>,
    slices: Vec<Arc<EndpointSlice>>,
    /// A policy that failed to apply: (object, field) → message, reported while the cluster is used.
    policy_error: Option<ClusterProblem>,
}

impl BuiltCluster {
    fn new(cluster: Cluster, policy_error: Option<ClusterProblem>) -> Arc<Self> {
        Arc::new(BuiltCluster {
            digest: cluster.digest(),
            cluster: Arc::new(cluster),
            service: None,
            slices: Vec::new(),
            policy_error,
        })
    }
}

/// One backendRef a route resolved and the Service it found, kept to replay the resolution
/// when the route is reused. Holding the Service keeps its address unique while compared.
pub(crate) struct Lookup {
    route_kind: &'static str,
    grants_waived: bool,
    route_ns: String,
    group: String,
    kind: String,
    namespace: String,
    name: String,
    port: Option<i32>,
    service: Option<Arc<Service>>,
    /// The cluster it resolved to.
    cluster: Option<String>,
}

/// A backendRef as the route names it, namespace resolved.
pub(crate) struct BackendRef<'r> {
    pub group: &'r str,
    pub kind: &'r str,
    pub namespace: &'r str,
    pub name: &'r str,
    pub port: Option<i32>,
}

impl<'r> BackendRef<'r> {
    /// Port `port` of Service `namespace/name`.
    pub(crate) fn service(namespace: &'r str, name: &'r str, port: u16) -> Self {
        BackendRef {
            group: "",
            kind: "Service",
            namespace,
            name,
            port: Some(port.into()),
        }
    }

    /// A Gateway API backendRef's fields with the spec's defaults: the core group, kind
    /// Service, the route's namespace.
    pub(crate) fn with_defaults(
        group: Option<&'r str>,
        kind: Option<&'r str>,
        namespace: Option<&'r str>,
        name: &'r str,
        port: Option<i32>,
        route_ns: &'r str,
    ) -> Self {
        BackendRef {
            group: group.unwrap_or(""),
            kind: kind.unwrap_or("Service"),
            namespace: namespace.unwrap_or(route_ns),
            name,
            port,
        }
    }
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

/// Services and EndpointSlices by (namespace, name), so resolving a backendRef does not scan
/// every object.
struct Index<'a> {
    services: HashMap<(&'a str, &'a str), &'a Arc<Service>>,
    slices: HashMap<(&'a str, &'a str), Vec<&'a Arc<EndpointSlice>>>,
    rules: HashMap<(&'a str, &'a str), &'a crate::istio::DestinationRule>,
}

impl<'a> Index<'a> {
    fn of(res: &'a Resources) -> Self {
        // Namespaced objects without a namespace are in `default`, as for the mesh's Services.
        let key = |m: &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
            (
                m.namespace.as_deref().unwrap_or("default"),
                m.name.as_deref().unwrap_or(""),
            )
        };
        Index {
            services: res.services.iter().map(|s| (key(&s.metadata), s)).collect(),
            slices: super::mesh::slices_by_service(res),
            rules: super::destination_rule::by_service(res),
        }
    }
}

/// The index, built on first use: a translation that resolves no backendRef (a mesh without
/// routes) does not index 10,000 Services and slices. A field borrow, so the caller may still
/// change the other fields while it holds the index.
fn index<'s, 'a>(cell: &'s std::cell::OnceCell<Index<'a>>, res: &'a Resources) -> &'s Index<'a> {
    cell.get_or_init(|| Index::of(res))
}

impl<'a> Clusters<'a> {
    pub(crate) fn new(res: &'a Resources, memo: ClusterMemos) -> Self {
        Clusters {
            res,
            index: Default::default(),
            built: HashMap::with_capacity(memo.len()),
            memo,
            trace: None,
            grants_waived: false,
            reused: 0,
            services_unchanged: false,
        }
    }

    /// Cluster `name`, built this translation.
    pub(crate) fn built(&self, name: &str) -> Option<&Cluster> {
        self.built.get(name).map(|b| &*b.cluster)
    }

    /// Cluster `name` (built this translation) as its requests' clients speak: itself when it
    /// speaks HTTP/2 or already follows the client, else its `#client` variant, which does.
    pub(crate) fn following_client(&mut self, name: &str) -> String {
        let Some(b) = self.built.get(name) else {
            return name.to_string();
        };
        if b.cluster.protocol == UpstreamProtocol::Http2 || b.cluster.follow_client_protocol {
            return name.to_string();
        }
        let variant = format!("{name}#client");
        if self.built.contains_key(&variant) {
            return variant;
        }
        // The cluster is last translation's: so is its variant (no clone, no hashing again).
        let reused = self.memo.get(name).is_some_and(|m| Arc::ptr_eq(m, b));
        let built = match self.memo.get(&variant) {
            Some(v) if reused => v.clone(),
            _ => {
                let mut c = (*b.cluster).clone();
                c.name = variant.clone();
                c.follow_client_protocol = true;
                BuiltCluster::new(c, None)
            }
        };
        self.built.insert(variant.clone(), built);
        variant
    }

    /// Whether cluster `name` (built this translation) is the last translation's, unchanged.
    pub(crate) fn unchanged(&self, name: &str) -> bool {
        matches!((self.built.get(name), self.memo.get(name)), (Some(b), Some(m)) if Arc::ptr_eq(b, m))
    }

    pub(crate) fn waive_grants(&mut self, waived: bool) {
        self.grants_waived = waived;
    }

    pub(crate) fn start_trace(&mut self) {
        self.trace = Some(Vec::new());
    }

    pub(crate) fn take_trace(&mut self) -> Vec<Lookup> {
        self.trace.take().unwrap_or_default()
    }

    /// Re-resolves a reused route's backendRefs, if every Service they found is still the same
    /// object; `false` means the route must be translated again.
    pub(crate) fn replay(&mut self, lookups: &[Lookup]) -> bool {
        let unchanged = self.services_unchanged
            || lookups.iter().all(|l| {
                let now = index(&self.index, self.res)
                    .services
                    .get(&(l.namespace.as_str(), l.name.as_str()));
                match (now, &l.service) {
                    (None, None) => true,
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                    _ => false,
                }
            });
        if !unchanged {
            return false;
        }
        for l in lookups {
            if l.cluster.as_ref().is_some_and(|c| self.built.contains_key(c)) {
                continue;
            }
            let r = BackendRef {
                group: &l.group,
                kind: &l.kind,
                namespace: &l.namespace,
                name: &l.name,
                port: l.port,
            };
            self.grants_waived = l.grants_waived;
            let _ = self.resolve(l.route_kind, &l.route_ns, &r);
            self.grants_waived = false;
        }
        true
    }

    /// Resolves one backendRef of `route` (in `route_ns`) to a cluster name, or explains why not.
    pub(crate) fn resolve(
        &mut self,
        route_kind: &'static str,
        route_ns: &str,
        r: &BackendRef<'_>,
    ) -> Result<String, (Reason, String)> {
        let result = self.resolve_untraced(route_kind, route_ns, r);
        if let Some(trace) = &mut self.trace {
            trace.push(Lookup {
                route_kind,
                grants_waived: self.grants_waived,
                route_ns: route_ns.to_string(),
                group: r.group.to_string(),
                kind: r.kind.to_string(),
                namespace: r.namespace.to_string(),
                name: r.name.to_string(),
                port: r.port,
                service: index(&self.index, self.res)
                    .services
                    .get(&(r.namespace, r.name))
                    .map(|s| Arc::clone(s)),
                cluster: result.as_ref().ok().cloned(),
            });
        }
        result
    }

    fn resolve_untraced(
        &mut self,
        route_kind: &'static str,
        route_ns: &str,
        r: &BackendRef<'_>,
    ) -> Result<String, (Reason, String)> {
        if r.namespace != route_ns
            && !self.grants_waived
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
        if route_kind == "GRPCRoute" && self.built[&name].cluster.protocol != UpstreamProtocol::Http2 {
            let h2 = format!("{name}#h2");
            if !self.built.contains_key(&h2) {
                let mut c = (*self.built[&name].cluster).clone();
                c.name = h2.clone();
                c.protocol = UpstreamProtocol::Http2;
                c.follow_client_protocol = false;
                self.built.insert(h2.clone(), BuiltCluster::new(c, None));
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
        let found = index(&self.index, self.res);
        let svc = found.services.get(&(r.namespace, r.name)).copied().ok_or_else(|| {
            (
                Reason::BackendNotFound,
                format!("Service {}/{} not found", r.namespace, r.name),
            )
        })?;
        let slices = found.slices.get(&(r.namespace, r.name)).map_or(&[][..], Vec::as_slice);
        // From the selector (no slices), endpoints depend on every pod: only slices make it reusable.
        if let Some(m) = self.memo.get(&name)
            && m.service.as_ref().is_some_and(|s| Arc::ptr_eq(s, svc))
            && !slices.is_empty()
            && m.slices.len() == slices.len()
            && m.slices.iter().zip(slices).all(|(a, b)| Arc::ptr_eq(a, b))
        {
            self.built.insert(name.clone(), m.clone());
            self.reused += 1;
            return Ok(name);
        }
        let spec = svc.spec.clone().unwrap_or_default();
        let sport = spec.ports.iter().flatten().find(|p| p.port == port).ok_or_else(|| {
            (
                Reason::BackendNotFound,
                format!("Service {}/{} has no port {port}", r.namespace, r.name),
            )
        })?;
        let mut cluster = Cluster::new(name.clone(), self.service_endpoints(r, &spec, sport, slices));
        // A port declared HTTP/2 or gRPC (appProtocol, else Istio's port-name prefix) is spoken
        // to as such, whoever routes to it.
        let declared =
            crate::mesh::declared_http(sport.name.as_deref().unwrap_or_default(), sport.app_protocol.as_deref());
        if declared == Some(crate::mesh::HttpProtocol::Http2) {
            cluster.protocol = UpstreamProtocol::Http2;
        }
        // Kubernetes' topology-aware routing: the endpoints in the proxy's zone first.
        cluster.locality_failover = matches!(
            spec.traffic_distribution.as_deref(),
            Some("PreferClose" | "PreferSameZone")
        );
        let rule = found.rules.get(&(r.namespace, r.name)).copied();
        let policy_error = self.apply_service_policies(&mut cluster, rule, r, port);
        let mut built = BuiltCluster::new(cluster, policy_error);
        let b = Arc::get_mut(&mut built).expect("just made");
        b.service = Some(svc.clone());
        b.slices = slices.iter().map(|s| Arc::clone(s)).collect();
        self.built.insert(name.clone(), built);
        Ok(name)
    }

    /// A Service port's endpoints, sorted and without duplicates: an ExternalName's host, else
    /// its EndpointSlices' (or, when nobody runs the endpoint controller, the selector's pods')
    /// and those of the WorkloadEntries it selects.
    fn service_endpoints(
        &self,
        r: &BackendRef<'_>,
        spec: &k8s_openapi::api::core::v1::ServiceSpec,
        sport: &ServicePort,
        slices: &[&Arc<EndpointSlice>],
    ) -> Vec<Endpoint> {
        let port = sport.port as u16;
        let external = spec.type_.as_deref() == Some("ExternalName");
        let mut endpoints = Vec::new();
        if external {
            let host = spec.external_name.clone().unwrap_or_default();
            endpoints.push(Endpoint::new(host, port));
        } else if slices.is_empty() {
            // Nobody runs the endpoint controller (file mode, the API emulator): the selector's pods.
            for e in super::mesh::selected(spec, r.namespace, &[sport], self.res) {
                if let Some(p) = e.target_port(port) {
                    endpoints.push(Endpoint::new(e.address, p));
                }
            }
        }
        endpoints.extend(slice_endpoints(slices, sport));
        if !external {
            let outside = super::workload_entry::selected(spec.selector.as_ref(), r.namespace, &[sport], self.res);
            endpoints.extend(outside.into_iter().filter_map(|e| {
                Some(Endpoint {
                    zone: e.zone.clone(),
                    ..Endpoint::new(e.address.clone(), e.target_port(port)?)
                })
            }));
        }
        endpoints.sort_by(|a, b| (&a.address, a.port).cmp(&(&b.address, b.port)));
        endpoints.dedup_by(|a, b| a.address == b.address && a.port == b.port);
        endpoints
    }

    /// The mesh's default policy first, then the Service's DestinationRule, then its
    /// BackendPolicy: the later ones' fields win. Each is applied whole or not at all; one that
    /// cannot be is reported once, whether a route uses its Service or not (`check_policies`).
    /// Returns the mesh default's error, if any.
    fn apply_service_policies(
        &self,
        cluster: &mut Cluster,
        rule: Option<&crate::istio::DestinationRule>,
        r: &BackendRef<'_>,
        port: i32,
    ) -> Option<ClusterProblem> {
        let policy_error = self.apply_mesh_default(cluster);
        if let Some(d) = rule {
            let fqdn = format!("{}.{}.svc.{}", r.name, r.namespace, super::mesh::CLUSTER_DOMAIN);
            let mut with_rule = cluster.clone();
            if super::destination_rule::apply(self.res, d, &fqdn, u16::try_from(port).ok(), &mut with_rule).is_ok() {
                *cluster = with_rule;
            }
        }
        let policy = self.res.backend_policies.iter().find(|p| {
            p.metadata.namespace.as_deref() == Some(r.namespace)
                && p.spec
                    .target_refs
                    .iter()
                    .any(|t| t.group.is_empty() && t.kind == "Service" && t.name == r.name)
        });
        if let Some(p) = policy {
            let mut with_policy = cluster.clone();
            if apply_policy(&mut with_policy, &p.spec.policy, SecretScope::of(self.res, &p.metadata)).is_ok() {
                *cluster = with_policy;
            }
        }
        policy_error
    }

    /// The cluster of subset `subset` of Service `ns/name`, from its cluster `base`: the
    /// endpoints on pods with all of the subset's labels (in its DestinationRule in effect),
    /// and the subset's traffic policy over the rest. Built anew each translation: it depends
    /// on the pods' labels.
    pub(crate) fn subset(
        &mut self,
        base: &str,
        ns: &str,
        name: &str,
        subset: &str,
    ) -> Result<String, (Reason, String)> {
        let cluster = format!("{base}~{subset}");
        if self.built.contains_key(&cluster) {
            return Ok(cluster);
        }
        let found = index(&self.index, self.res);
        let rule = found.rules.get(&(ns, name)).copied();
        let Some((d, i)) = rule.and_then(|d| Some((d, d.spec.subsets.iter().position(|s| s.name == subset)?))) else {
            return Err((
                Reason::BackendNotFound,
                format!("no DestinationRule in effect for Service {ns}/{name} has a subset {subset:?}"),
            ));
        };
        let fqdn = format!("{name}.{ns}.svc.{}", super::mesh::CLUSTER_DOMAIN);
        // `base` is the Service port's cluster, `service/ns/name:port`.
        let port = base.rsplit_once(':').and_then(|(_, p)| p.parse().ok());
        let policy = super::destination_rule::subset_policy(d, i, &fqdn, port)
            .map_err(|(f, m)| (Reason::Invalid, format!("{f}: {m}")))?;
        let labels = &d.spec.subsets[i].labels;
        let labelled: std::collections::HashSet<String> = self
            .res
            .pods
            .iter()
            .filter(|p| p.metadata.namespace.as_deref() == Some(ns))
            .filter(|p| {
                let have = p.metadata.labels.as_ref();
                labels.iter().all(|(k, v)| have.and_then(|l| l.get(k)) == Some(v))
            })
            .flat_map(|p| super::mesh::pod_ips(p))
            .collect();
        let mut c = (*self.built[base].cluster).clone();
        c.name = cluster.clone();
        c.endpoints.retain(|e| labelled.contains(&e.address));
        apply_policy(&mut c, &policy, SecretScope::of(self.res, &d.metadata))
            .map_err(|(f, m)| (Reason::Invalid, format!("{f}: {m}")))?;
        self.built.insert(cluster.clone(), BuiltCluster::new(c, None));
        Ok(cluster)
    }

    /// The cluster of port `port` of ServiceEntry host `s`: its endpoints (IPs, or names the
    /// proxy resolves when it connects), HTTP/2 for `HTTP2` and `GRPC` ports, with the mesh
    /// default and the DestinationRule for its host applied (TLS origination, pools, balancing).
    /// Built anew each translation (entries are few).
    pub(crate) fn entry(&mut self, s: &crate::mesh::MeshService, port: u16) -> Result<String, (Reason, String)> {
        let name = format!("serviceentry/{}:{port}", s.key);
        if self.built.contains_key(&name) {
            return Ok(name);
        }
        let Some(sp) = s.ports.iter().find(|p| p.port == port) else {
            return Err((
                Reason::BackendNotFound,
                format!("ServiceEntry host {} has no port {port}", s.hostname),
            ));
        };
        if s.resolution == crate::mesh::Resolution::Passthrough {
            return Err((
                Reason::UnsupportedValue,
                format!(
                    "ServiceEntry host {} has resolution NONE: its connections go where they were dialled",
                    s.hostname
                ),
            ));
        }
        let endpoints = s
            .endpoints
            .iter()
            .filter_map(|e| {
                Some(Endpoint {
                    zone: e.zone.clone(),
                    ..Endpoint::new(e.address.clone(), e.target_port(port)?)
                })
            })
            .collect();
        let mut c = Cluster::new(name.clone(), endpoints);
        c.locality_failover = s.locality_failover;
        if sp.http() == Some(crate::mesh::HttpProtocol::Http2) {
            c.protocol = UpstreamProtocol::Http2;
        }
        let policy_error = self.apply_mesh_default(&mut c);
        let entry_ns = s.key.split('/').next().unwrap_or_default();
        if let Some(d) = super::destination_rule::for_host(self.res, &s.hostname, entry_ns) {
            let mut with_rule = c.clone();
            if super::destination_rule::apply(self.res, d, &s.hostname, Some(port), &mut with_rule).is_ok() {
                c = with_rule;
            }
        }
        if let Some(tls) = c.tls.as_mut() {
            entry_subject_alt_names(self.res, &s.key, tls);
        }
        if c.tls.as_ref().is_some_and(|t| t.sni.starts_with('*')) {
            return Err((
                Reason::UnsupportedValue,
                format!(
                    "TLS to wildcard host {} needs the DestinationRule's tls.sni",
                    s.hostname
                ),
            ));
        }
        self.built.insert(name.clone(), BuiltCluster::new(c, policy_error));
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
        let (endpoints, endpoint_error) = backend_endpoints(b);
        let mut cluster = Cluster::new(name.clone(), endpoints);
        let mesh_error = self.apply_mesh_default(&mut cluster);
        // Whole or not at all, as for a BackendPolicy.
        let mut with_policy = cluster.clone();
        let policy_error = match apply_policy(&mut with_policy, &b.spec.policy, SecretScope::of(self.res, &b.metadata))
        {
            Ok(()) => {
                cluster = with_policy;
                None
            }
            Err((field, msg)) => Some(((super::meta_ref("Backend", &b.metadata), field), msg)),
        };
        let policy_error = policy_error.or(endpoint_error).or(mesh_error);
        self.built
            .insert(name.clone(), BuiltCluster::new(cluster, policy_error));
        Ok(name)
    }

    /// The clusters (in name order) with their digests, and the memo for the next translation.
    pub(crate) fn finish(self, problems: &mut Problems<'_>) -> (Vec<Arc<Cluster>>, Vec<Digest>, ClusterMemos) {
        // A policy shared by several clusters is reported once.
        let errors: BTreeMap<_, _> = self.built.values().filter_map(|b| b.policy_error.clone()).collect();
        for ((obj, field), msg) in errors {
            problems.push(&obj, field, Reason::Invalid, msg);
        }
        let mut order: Vec<&Arc<BuiltCluster>> = self.built.values().collect();
        order.sort_unstable_by(|a, b| a.cluster.name.cmp(&b.cluster.name));
        let clusters = order.iter().map(|b| b.cluster.clone()).collect();
        let digests = order.iter().map(|b| b.digest).collect();
        (clusters, digests, self.built)
    }
}

/// Reports every BackendPolicy and DestinationRule that cannot be applied, whether a route uses
/// its Service or not: the cluster build leaves them out quietly.
pub(super) fn check_policies(res: &Resources, problems: &mut Problems<'_>) {
    for p in &res.backend_policies {
        let mut scratch = Cluster::new("scratch", Vec::new());
        if let Err((field, msg)) = apply_policy(&mut scratch, &p.spec.policy, SecretScope::of(res, &p.metadata)) {
            problems.push(
                &super::meta_ref("BackendPolicy", &p.metadata),
                field,
                Reason::Invalid,
                msg,
            );
        }
    }
    let rules = super::destination_rule::by_service(res);
    for d in &res.destination_rules {
        let obj = super::meta_ref("DestinationRule", &d.metadata);
        let mut scratch = Cluster::new("scratch", Vec::new());
        if let Err((field, msg)) = super::destination_rule::apply(res, d, &d.spec.host, None, &mut scratch) {
            problems.push(&obj, field, Reason::UnsupportedValue, msg);
            continue;
        }
        let won = super::destination_rule::target(d).and_then(|svc| Some((svc, *rules.get(&svc)?)));
        if let Some(((ns, name), w)) = won.filter(|(_, w)| !std::ptr::eq(*w, &**d)) {
            let by = super::meta_ref("DestinationRule", &w.metadata);
            problems.push(
                &obj,
                "spec.host",
                Reason::Conflicted,
                format!(
                    "{by} applies to Service {ns}/{name} instead (a rule in the Service's namespace first, then by namespace and name)"
                ),
            );
        }
    }
}

/// Applies a Ferrum traffic policy; an error names the field (`spec.…`).
/// A Backend's endpoints; one no proxy could use is left out, and the first such reported (at
/// its field) while the others serve.
fn backend_endpoints(b: &crate::crd::Backend) -> (Vec<Endpoint>, Option<ClusterProblem>) {
    let mut endpoint_error = None;
    let endpoints = (b.spec.endpoints.iter().enumerate())
        .filter_map(|(i, e)| {
            let weight = e.weight.unwrap_or(1);
            let bad = if e.port == 0 {
                Some(("port", "must be 1-65535".to_string()))
            } else if weight > crate::validate::MAX_WEIGHT {
                Some(("weight", format!("must be at most {}", crate::validate::MAX_WEIGHT)))
            } else if e.address.is_empty() {
                Some(("address", "must not be empty".to_string()))
            } else {
                None
            };
            if let Some((field, msg)) = bad {
                let at = (
                    super::meta_ref("Backend", &b.metadata),
                    format!("spec.endpoints[{i}].{field}"),
                );
                endpoint_error.get_or_insert((at, msg));
                return None;
            }
            Some(Endpoint {
                weight,
                zone: e.zone.clone(),
                priority: e.priority.unwrap_or(0),
                ..Endpoint::new(e.address.clone(), e.port)
            })
        })
        .collect();
    (endpoints, endpoint_error)
}

impl Clusters<'_> {
    /// Applies `MeshConfig` `ferrum-system/default`'s `defaultTrafficPolicy`, if any.
    fn apply_mesh_default(&self, c: &mut Cluster) -> Option<ClusterProblem> {
        let mc = mesh_config(self.res)?;
        let p = mc.spec.default_traffic_policy.as_ref()?;
        apply_policy(c, p, SecretScope::of(self.res, &mc.metadata))
            .err()
            .map(|(field, msg)| {
                (
                    (
                        super::meta_ref("MeshConfig", &mc.metadata),
                        format!("spec.defaultTrafficPolicy.{}", field.trim_start_matches("spec.")),
                    ),
                    msg,
                )
            })
    }
}

/// The mesh-wide settings: the `MeshConfig` named `default` in the root namespace.
pub fn mesh_config(res: &Resources) -> Option<&crate::crd::MeshConfig> {
    res.mesh_configs
        .iter()
        .find(|m| {
            m.metadata.namespace.as_deref() == Some(crate::ROOT_NAMESPACE)
                && m.metadata.name.as_deref() == Some("default")
        })
        .map(|m| &**m)
}

/// The endpoints of a Service port from its EndpointSlices: each slice's port of the same name
/// (or the Service's numeric targetPort), readiness from the conditions.
fn slice_endpoints(slices: &[&Arc<EndpointSlice>], sport: &ServicePort) -> Vec<Endpoint> {
    let mut out = Vec::new();
    for slice in slices {
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
                out.push(Endpoint {
                    address: addr.clone(),
                    port: slice_port,
                    weight: 1,
                    identity: None,
                    ready,
                    zone: e.zone.clone(),
                    priority: 0,
                });
            }
        }
    }
    out
}

/// A policy field that cannot be applied: (field path, reason).
type PolicyError = (String, String);

fn duration_field(field: &str, v: &Option<String>) -> Result<Option<u64>, PolicyError> {
    v.as_deref()
        .map(parse_duration_ms)
        .transpose()
        .map_err(|e| (format!("spec.{field}"), e))
}

/// Where a policy's Secret references resolve: the Secrets of the policy's own namespace.
#[derive(Clone, Copy)]
pub(super) struct SecretScope<'a> {
    res: &'a Resources,
    namespace: &'a str,
}

impl<'a> SecretScope<'a> {
    pub(super) fn of(
        res: &'a Resources,
        policy: &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    ) -> Self {
        SecretScope {
            res,
            namespace: policy.namespace.as_deref().unwrap_or("default"),
        }
    }
}

pub(super) fn apply_policy(c: &mut Cluster, p: &TrafficPolicy, secrets: SecretScope<'_>) -> Result<(), PolicyError> {
    if let Some(proto) = &p.protocol {
        (c.protocol, c.follow_client_protocol) = protocol(proto)?;
    }
    if let Some(lb) = &p.load_balancer {
        apply_load_balancer(c, lb)?;
    }
    if let Some(hc) = &p.health_check {
        c.health_check = Some(health_check(hc)?);
    }
    if let Some(od) = &p.outlier_detection {
        apply_outlier_detection(c, od)?;
    }
    if let Some(cb) = &p.circuit_breaker {
        c.circuit_breaker = circuit_breaker(cb);
    }
    if let Some(t) = &p.timeouts {
        c.timeouts = timeouts(t, &c.timeouts)?;
    }
    if let Some(r) = &p.retry {
        c.retry = Some(retry(r)?);
    }
    if let Some(k) = &p.tcp_keepalive {
        c.tcp_keepalive = Some(crate::model::TcpKeepalive {
            time_ms: duration_field("tcpKeepalive.time", &k.time)?,
            interval_ms: duration_field("tcpKeepalive.interval", &k.interval)?,
            probes: k.probes,
        });
    }
    if let Some(t) = &p.tls {
        c.tls = Some(upstream_tls(t, secrets)?);
    }
    Ok(())
}

/// `spec.protocol`: the upstream protocol, and whether it follows the client's.
fn protocol(proto: &str) -> Result<(UpstreamProtocol, bool), PolicyError> {
    match proto {
        "HTTP/1.1" | "HTTP" => Ok((UpstreamProtocol::Http1, false)),
        "HTTP/2" | "h2c" | "h2" => Ok((UpstreamProtocol::Http2, false)),
        "Client" => Ok((UpstreamProtocol::Http1, true)),
        other => Err((
            "spec.protocol".into(),
            format!("{other:?} is not HTTP/1.1, HTTP/2 or Client"),
        )),
    }
}

fn apply_load_balancer(c: &mut Cluster, lb: &crate::crd::LoadBalancerSpec) -> Result<(), PolicyError> {
    // `slowStart` or `localityFailover` alone keeps the balancing as it was.
    let alone = *lb
        == crate::crd::LoadBalancerSpec {
            slow_start: lb.slow_start.clone(),
            locality_failover: lb.locality_failover,
            ..Default::default()
        };
    if !alone || (lb.slow_start.is_none() && lb.locality_failover.is_none()) {
        (c.lb, c.hash_input) = load_balancer(lb)?;
    }
    c.slow_start = lb.slow_start.as_ref().map(|s| slow_start(s, &c.lb)).transpose()?;
    if let Some(on) = lb.locality_failover {
        c.locality_failover = on;
    }
    Ok(())
}

fn apply_outlier_detection(c: &mut Cluster, od: &crate::crd::OutlierDetectionSpec) -> Result<(), PolicyError> {
    c.panic_threshold_percent = match od.min_health_percent {
        Some(p) if p > 100 => {
            return Err((
                "spec.outlierDetection.minHealthPercent".into(),
                format!("{p} is not a percentage (0 to 100)"),
            ));
        }
        p => p.unwrap_or(0),
    };
    if od.disabled == Some(true) {
        c.outlier_detection = None;
        return Ok(());
    }
    let d = OutlierDetection::default();
    c.outlier_detection = Some(OutlierDetection {
        consecutive_5xx: od.consecutive_5xx.unwrap_or(d.consecutive_5xx),
        consecutive_connect_failures: od
            .consecutive_connect_failures
            .unwrap_or(d.consecutive_connect_failures),
        base_ejection_ms: duration_field("outlierDetection.baseEjectionTime", &od.base_ejection_time)?
            .unwrap_or(d.base_ejection_ms),
        max_ejection_percent: od.max_ejection_percent.unwrap_or(d.max_ejection_percent).min(100),
    });
    Ok(())
}

fn circuit_breaker(cb: &crate::crd::CircuitBreakerSpec) -> CircuitBreaker {
    let d = CircuitBreaker::default();
    CircuitBreaker {
        max_connections: cb.max_connections.unwrap_or(d.max_connections),
        max_pending_requests: cb.max_pending_requests.unwrap_or(d.max_pending_requests),
        max_requests: cb.max_requests.unwrap_or(d.max_requests),
        max_retries: cb.max_retries,
        max_requests_per_connection: cb.max_requests_per_connection,
        max_concurrent_streams: cb.max_concurrent_streams,
    }
}

/// Field by field: what a policy leaves out keeps what the mesh default (or the built-in default)
/// set.
fn timeouts(t: &crate::crd::TimeoutsSpec, was: &ClusterTimeouts) -> Result<ClusterTimeouts, PolicyError> {
    Ok(ClusterTimeouts {
        connect_ms: duration_field("timeouts.connect", &t.connect)?.unwrap_or(was.connect_ms),
        read_ms: duration_field("timeouts.read", &t.read)?.unwrap_or(was.read_ms),
        idle_ms: duration_field("timeouts.idle", &t.idle)?.unwrap_or(was.idle_ms),
        max_connection_duration_ms: duration_field("timeouts.maxConnectionDuration", &t.max_connection_duration)?
            .or(was.max_connection_duration_ms),
        tcp_idle_ms: duration_field("timeouts.tcpIdle", &t.tcp_idle)?.or(was.tcp_idle_ms),
    })
}

fn retry(r: &crate::crd::RetrySpec) -> Result<RetryPolicy, PolicyError> {
    let d = RetryPolicy::default();
    // gRPC conditions are read from a response's grpc-status, the rest from how it ended.
    let (grpc, on): (Vec<String>, Vec<String>) =
        r.on.clone()
            .unwrap_or(d.on)
            .into_iter()
            .partition(|c| crate::model::grpc_retry_code(c).is_some());
    Ok(RetryPolicy {
        attempts: r.attempts.unwrap_or(d.attempts),
        on,
        grpc_on: grpc.iter().filter_map(|c| crate::model::grpc_retry_code(c)).collect(),
        backoff_base_ms: duration_field("retry.backoff", &r.backoff)?.unwrap_or(d.backoff_base_ms),
        budget_percent: r.budget_percent.unwrap_or(d.budget_percent),
        ..d
    })
}

fn upstream_tls(t: &crate::crd::UpstreamTlsSpec, secrets: SecretScope<'_>) -> Result<UpstreamTls, PolicyError> {
    // URIs (spiffe://…) are matched against the certificate's URI SANs.
    let (uris, names): (Vec<&String>, Vec<&String>) = t
        .subject_alt_names
        .iter()
        .flatten()
        .partition(|n| crate::validate::is_uri(n));
    Ok(UpstreamTls {
        sni: t.sni.clone(),
        ca_file: t.ca_file.clone(),
        ca_pem: ca_pem(t, secrets)?,
        insecure_skip_verify: t.insecure_skip_verify.unwrap_or(false),
        client_certificate: client_certificate(t, secrets)?,
        subject_alt_names: names.into_iter().cloned().collect(),
        subject_alt_uris: uris.into_iter().cloned().collect(),
    })
}

/// A ServiceEntry's `subjectAltNames` (entry key `namespace/name/host`) for the TLS a
/// DestinationRule originates to it, when the rule names none itself (Istio's precedence).
fn entry_subject_alt_names(res: &Resources, key: &str, tls: &mut UpstreamTls) {
    if !tls.subject_alt_names.is_empty() || !tls.subject_alt_uris.is_empty() {
        return;
    }
    let mut parts = key.splitn(3, '/');
    let (Some(ns), Some(name)) = (parts.next(), parts.next()) else {
        return;
    };
    let Some(se) = res
        .service_entries
        .iter()
        .find(|e| e.metadata.namespace.as_deref() == Some(ns) && e.metadata.name.as_deref() == Some(name))
    else {
        return;
    };
    let (uris, names): (Vec<&String>, Vec<&String>) = se
        .spec
        .subject_alt_names
        .iter()
        .partition(|n| crate::validate::is_uri(n));
    tls.subject_alt_names = names.into_iter().cloned().collect();
    tls.subject_alt_uris = uris.into_iter().cloned().collect();
}

/// The CAs `t` takes from Secrets: its `caCertificateRef`'s (required), else — when no CA file
/// is named either — the client certificate Secret's `ca.crt`, if it has one (Istio's
/// `credentialName` convention).
fn ca_pem(t: &crate::crd::UpstreamTlsSpec, secrets: SecretScope<'_>) -> Result<Option<String>, PolicyError> {
    let ns = secrets.namespace;
    if let Some(name) = &t.ca_certificate_ref {
        if t.ca_file.is_some() {
            return Err((
                "spec.tls.caCertificateRef".into(),
                "caFile and caCertificateRef both name the CAs: keep one".into(),
            ));
        }
        return super::listeners::ca_bundle(secrets.res, ns, name).map(Some).ok_or_else(|| {
            (
                "spec.tls.caCertificateRef".to_string(),
                format!("neither Secret {ns}/{name} (ca.crt) nor {ns}/{name}-cacert (ca.crt, cacert) holds CA certificates"),
            )
        });
    }
    Ok(match (&t.ca_file, &t.client_certificate_ref) {
        (None, Some(name)) => super::listeners::ca_bundle(secrets.res, ns, name),
        _ => None,
    })
}

/// The client certificate of mutual TLS to the upstream: files on the proxy, or a Secret.
fn client_certificate(
    t: &crate::crd::UpstreamTlsSpec,
    secrets: SecretScope<'_>,
) -> Result<Option<CertSource>, PolicyError> {
    match (&t.cert_file, &t.key_file, &t.client_certificate_ref) {
        (None, None, None) => Ok(None),
        (Some(cert), Some(key), None) => Ok(Some(CertSource::Files {
            cert: cert.clone(),
            key: key.clone(),
        })),
        (None, None, Some(name)) => {
            let ns = secrets.namespace;
            let s = super::listeners::tls_secret(secrets.res, ns, name).ok_or_else(|| {
                (
                    "spec.tls.clientCertificateRef".to_string(),
                    format!("Secret {ns}/{name} does not exist or lacks tls.crt/tls.key (cert/key)"),
                )
            })?;
            Ok(Some(CertSource::Secret {
                name: format!("{ns}/{name}"),
                digest: s.digest(),
            }))
        }
        _ => Err((
            "spec.tls".into(),
            "a client certificate is certFile with keyFile, or clientCertificateRef".into(),
        )),
    }
}

/// The balancing policy, and the hash input that wins over its key.
fn load_balancer(lb: &crate::crd::LoadBalancerSpec) -> Result<(LbPolicy, Option<HashInput>), PolicyError> {
    if let Some(input) = hash_input(lb)? {
        if lb.kind != "ConsistentHash" {
            return Err((
                "spec.loadBalancer.type".into(),
                "hashCookie and hashQueryParameter are for ConsistentHash".into(),
            ));
        }
        // What a proxy older than schema 10 hashes on instead.
        let fallback = match input.cookie {
            Some(_) => HashOn::Header("cookie".into()),
            None => HashOn::ClientIp,
        };
        return Ok((LbPolicy::ConsistentHash(fallback), Some(input)));
    }
    let policy = match lb.kind.as_str() {
        "RoundRobin" => LbPolicy::RoundRobin,
        "LeastRequest" => LbPolicy::LeastRequest,
        "Random" => LbPolicy::Random,
        "ConsistentHash" => match (&lb.hash_header, lb.hash_client_ip) {
            (Some(h), _) if crate::validate::http_header_name_invalid(h) => {
                return Err((
                    "spec.loadBalancer.hashHeader".into(),
                    format!("{h:?} is not a valid header name"),
                ));
            }
            (Some(h), _) => LbPolicy::ConsistentHash(HashOn::Header(h.to_ascii_lowercase())),
            (None, Some(true)) => LbPolicy::ConsistentHash(HashOn::ClientIp),
            _ => {
                return Err((
                    "spec.loadBalancer".into(),
                    "ConsistentHash needs hashHeader, hashClientIp: true, hashCookie or hashQueryParameter".into(),
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
    Ok((policy, None))
}

fn slow_start(s: &crate::crd::SlowStartSpec, lb: &LbPolicy) -> Result<crate::model::SlowStart, PolicyError> {
    let at = |f: &str| format!("spec.loadBalancer.slowStart{f}");
    if matches!(lb, LbPolicy::ConsistentHash(_)) {
        return Err((
            at(""),
            "a hash ring sends each key to its endpoint: not with ConsistentHash".into(),
        ));
    }
    let window = Some(s.window.clone());
    let mut out = crate::model::SlowStart::new(duration_field("loadBalancer.slowStart.window", &window)?.unwrap_or(0));
    if !(1..=86_400_000).contains(&out.window_ms) {
        return Err((at(".window"), "must be 1 ms to 24 h".into()));
    }
    out.aggression = s.aggression.unwrap_or(out.aggression);
    if !(out.aggression.is_finite() && out.aggression > 0.0) {
        return Err((at(".aggression"), "must be a number above 0".into()));
    }
    out.min_weight_percent = s.min_weight_percent.unwrap_or(out.min_weight_percent);
    if !(0.0..=100.0).contains(&out.min_weight_percent) {
        return Err((at(".minWeightPercent"), "must be 0 to 100".into()));
    }
    Ok(out)
}

/// A cookie or query parameter to hash on; at most one key of all four is named.
fn hash_input(lb: &crate::crd::LoadBalancerSpec) -> Result<Option<HashInput>, PolicyError> {
    let named = [
        lb.hash_header.is_some(),
        lb.hash_client_ip == Some(true),
        lb.hash_cookie.is_some(),
        lb.hash_query_parameter.is_some(),
    ];
    if named.iter().filter(|n| **n).count() > 1 {
        return Err((
            "spec.loadBalancer".into(),
            "one of hashHeader, hashClientIp, hashCookie and hashQueryParameter".into(),
        ));
    }
    if let Some(q) = &lb.hash_query_parameter {
        if q.is_empty() {
            return Err((
                "spec.loadBalancer.hashQueryParameter".into(),
                "must not be empty".into(),
            ));
        }
        return Ok(Some(HashInput {
            query_parameter: Some(q.clone()),
            ..Default::default()
        }));
    }
    let Some(c) = &lb.hash_cookie else { return Ok(None) };
    if crate::validate::http_header_name_invalid(&c.name) {
        return Err((
            "spec.loadBalancer.hashCookie.name".into(),
            format!("{:?} is not a cookie name", c.name),
        ));
    }
    Ok(Some(HashInput {
        cookie: Some(HashCookie {
            name: c.name.clone(),
            path: c.path.clone(),
            ttl_ms: duration_field("loadBalancer.hashCookie.ttl", &c.ttl)?,
        }),
        ..Default::default()
    }))
}

fn health_check(hc: &crate::crd::HealthCheckSpec) -> Result<HealthCheck, PolicyError> {
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
    Ok(HealthCheck {
        path: hc.path.clone().unwrap_or(d.path),
        interval_ms: duration_field("healthCheck.interval", &hc.interval)?.unwrap_or(d.interval_ms),
        timeout_ms: duration_field("healthCheck.timeout", &hc.timeout)?.unwrap_or(d.timeout_ms),
        healthy_threshold: hc.healthy_threshold.unwrap_or(d.healthy_threshold),
        unhealthy_threshold: hc.unhealthy_threshold.unwrap_or(d.unhealthy_threshold),
        expected_status,
    })
}
