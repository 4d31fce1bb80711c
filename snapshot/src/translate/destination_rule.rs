//! Istio DestinationRules as Ferrum traffic policies: the rule for a Service is read into the
//! same `TrafficPolicy` a BackendPolicy carries, applied after the mesh default and before the
//! Service's BackendPolicy (whose fields win). A rule with a field Ferrum does not apply is left
//! out whole, its status naming the field — never half-applied.

use crate::crd::{
    CircuitBreakerSpec, LoadBalancerSpec, OutlierDetectionSpec, TimeoutsSpec, TrafficPolicy, UpstreamTlsSpec,
};
use crate::istio::{
    DestinationRule, DrConnectionPool, DrLoadBalancer, DrOutlierDetection, DrTls, DrTrafficPolicy, Other,
};
use foldhash::{HashMap, HashMapExt};

use crate::model::Cluster;
use crate::resources::Resources;

use super::mesh::CLUSTER_DOMAIN;

/// A field that cannot be applied: (field path, reason).
pub type RuleError = (String, String);

/// The Service (namespace, name) a rule's `host` names; `None` for hosts that are no Service
/// of this cluster (external names, wildcards), to which the rule does nothing here.
pub(crate) fn service_of<'a>(host: &'a str, rule_ns: &'a str) -> Option<(&'a str, &'a str)> {
    if host.contains('*') {
        return None;
    }
    let mut parts = host.split('.');
    let name = parts.next()?;
    let rest: Vec<&str> = parts.collect();
    match rest.as_slice() {
        [] => Some((rule_ns, name)),
        [ns] | [ns, "svc"] => Some((ns, name)),
        [ns, "svc", domain @ ..] if domain.join(".") == CLUSTER_DOMAIN => Some((ns, name)),
        _ => None,
    }
}

/// The Service (namespace, name) a rule applies to, if its host names one.
pub fn target(d: &DestinationRule) -> Option<(&str, &str)> {
    service_of(&d.spec.host, d.metadata.namespace.as_deref().unwrap_or("default"))
}

/// Each Service's DestinationRule among those that can be applied: one in the Service's
/// namespace first (by name), else one elsewhere naming it, by namespace and name — Istio's
/// precedence without `exportTo`.
pub fn by_service(res: &Resources) -> HashMap<(&str, &str), &DestinationRule> {
    let rank = |d: &DestinationRule, svc_ns: &str| {
        let ns = d.metadata.namespace.as_deref().unwrap_or("default");
        (ns != svc_ns, ns.to_string(), d.metadata.name.clone())
    };
    let mut out: HashMap<(&str, &str), &DestinationRule> = HashMap::new();
    for d in &res.destination_rules {
        let Some(svc) = target(d) else { continue };
        if apply(d, &d.spec.host, &mut Cluster::new("scratch", Vec::new())).is_err() {
            continue;
        }
        match out.get(&svc) {
            Some(won) if rank(won, svc.0) <= rank(d, svc.0) => {}
            _ => {
                out.insert(svc, d);
            }
        }
    }
    out
}

/// The DestinationRule for ServiceEntry host `host` (of an entry in `entry_ns`) among those that
/// can be applied: a rule naming the host exactly first, else the longest `*.suffix` covering
/// it; among rules for one host, one in the entry's namespace first, then by namespace and name.
pub fn for_host<'r>(res: &'r Resources, host: &str, entry_ns: &str) -> Option<&'r DestinationRule> {
    let specificity = |d: &DestinationRule| {
        let h = d.spec.host.to_ascii_lowercase();
        if h == host {
            return Some(usize::MAX);
        }
        let suffix = h.strip_prefix('*')?;
        (host.len() > suffix.len() && host.ends_with(suffix)).then_some(suffix.len())
    };
    res.destination_rules
        .iter()
        .filter_map(|d| Some((specificity(d)?, &**d)))
        .filter(|(_, d)| apply(d, &d.spec.host, &mut Cluster::new("scratch", Vec::new())).is_ok())
        .min_by_key(|(spec, d)| {
            let ns = d.metadata.namespace.as_deref().unwrap_or("default");
            (
                std::cmp::Reverse(*spec),
                ns != entry_ns,
                ns.to_string(),
                d.metadata.name.clone(),
            )
        })
        .map(|(_, d)| d)
}

/// Applies rule `d` to `c` whole, or says why it cannot be.
pub fn apply(d: &DestinationRule, fqdn: &str, c: &mut Cluster) -> Result<(), RuleError> {
    let p = traffic_policy(d, fqdn)?;
    super::backends::apply_policy(c, &p).map_err(|(_, msg)| ("spec.trafficPolicy".into(), msg))
}

fn unsupported(at: &str, other: &Other) -> Result<(), RuleError> {
    match other.keys().next() {
        Some(k) => Err((format!("{at}.{k}"), "not supported by Ferrum".into())),
        None => Ok(()),
    }
}

/// Checks a duration here, so an error names the rule's field.
fn duration(at: &str, v: &Option<String>) -> Result<Option<String>, RuleError> {
    v.as_deref()
        .map(|d| super::parse_duration_ms(d).map(|ms| format!("{ms}ms")))
        .transpose()
        .map_err(|e| (at.to_string(), e))
}

/// The rule's traffic policy as Ferrum's; `sni` defaults to the Service's DNS name. Its subsets
/// are checked too, so a rule with one that cannot be applied is left out whole.
pub fn traffic_policy(d: &DestinationRule, fqdn: &str) -> Result<TrafficPolicy, RuleError> {
    if d.spec.workload_selector.is_some() {
        return Err(("spec.workloadSelector".into(), "not supported by Ferrum".into()));
    }
    for i in 0..d.spec.subsets.len() {
        subset_policy(d, i, fqdn)?;
    }
    match &d.spec.traffic_policy {
        None => Ok(TrafficPolicy::default()),
        Some(p) => policy_of(p, fqdn),
    }
}

/// Subset `i`'s own traffic policy (applied over the rule's), or why it cannot be applied.
pub fn subset_policy(d: &DestinationRule, i: usize, fqdn: &str) -> Result<TrafficPolicy, RuleError> {
    let s = &d.spec.subsets[i];
    let at = format!("spec.subsets[{i}]");
    unsupported(&at, &s.other)?;
    if s.name.is_empty() || d.spec.subsets[..i].iter().any(|o| o.name == s.name) {
        return Err((
            format!("{at}.name"),
            format!("{:?}: subsets need distinct names", s.name),
        ));
    }
    match &s.traffic_policy {
        None => Ok(TrafficPolicy::default()),
        Some(p) => policy_of(p, fqdn).map_err(|(f, m)| (f.replacen("spec.", &format!("{at}."), 1), m)),
    }
}

/// A `trafficPolicy` as Ferrum's; errors name `spec.trafficPolicy.…`.
fn policy_of(p: &DrTrafficPolicy, fqdn: &str) -> Result<TrafficPolicy, RuleError> {
    let mut out = TrafficPolicy::default();
    unsupported("spec.trafficPolicy", &p.other)?;
    if let Some(lb) = &p.load_balancer {
        out.load_balancer = load_balancer(lb)?;
    }
    if let Some(cp) = &p.connection_pool {
        (out.circuit_breaker, out.timeouts) = connection_pool(cp)?;
    }
    if let Some(od) = &p.outlier_detection {
        out.outlier_detection = Some(outlier_detection(od)?);
    }
    if let Some(t) = &p.tls {
        out.tls = tls(t, fqdn)?;
    }
    Ok(out)
}

fn load_balancer(lb: &DrLoadBalancer) -> Result<Option<LoadBalancerSpec>, RuleError> {
    const AT: &str = "spec.trafficPolicy.loadBalancer";
    unsupported(AT, &lb.other)?;
    let kind = |k: &str| LoadBalancerSpec {
        kind: k.into(),
        ..Default::default()
    };
    match (&lb.simple, &lb.consistent_hash) {
        (Some(_), Some(_)) => Err((AT.into(), "simple and consistentHash exclude each other".into())),
        (Some(s), None) => match s.as_str() {
            "UNSPECIFIED" => Ok(None),
            "ROUND_ROBIN" => Ok(Some(kind("RoundRobin"))),
            "LEAST_REQUEST" | "LEAST_CONN" => Ok(Some(kind("LeastRequest"))),
            "RANDOM" => Ok(Some(kind("Random"))),
            other => Err((format!("{AT}.simple"), format!("{other:?} is not supported by Ferrum"))),
        },
        (None, Some(h)) => {
            unsupported(&format!("{AT}.consistentHash"), &h.other)?;
            if h.http_header_name.is_none() && h.use_source_ip != Some(true) {
                return Err((
                    format!("{AT}.consistentHash"),
                    "needs httpHeaderName or useSourceIp: true".into(),
                ));
            }
            Ok(Some(LoadBalancerSpec {
                kind: "ConsistentHash".into(),
                hash_header: h.http_header_name.clone(),
                hash_client_ip: h.use_source_ip,
            }))
        }
        (None, None) => Ok(None),
    }
}

fn connection_pool(cp: &DrConnectionPool) -> Result<(Option<CircuitBreakerSpec>, Option<TimeoutsSpec>), RuleError> {
    const AT: &str = "spec.trafficPolicy.connectionPool";
    unsupported(AT, &cp.other)?;
    let (tcp, http) = (cp.tcp.clone().unwrap_or_default(), cp.http.clone().unwrap_or_default());
    unsupported(&format!("{AT}.tcp"), &tcp.other)?;
    unsupported(&format!("{AT}.http"), &http.other)?;
    let breaker = CircuitBreakerSpec {
        max_connections: tcp.max_connections,
        max_pending_requests: http.http1_max_pending_requests,
        max_requests: http.http2_max_requests,
    };
    let timeouts = TimeoutsSpec {
        connect: duration(&format!("{AT}.tcp.connectTimeout"), &tcp.connect_timeout)?,
        read: None,
        idle: duration(&format!("{AT}.http.idleTimeout"), &http.idle_timeout)?,
    };
    Ok((
        Some(breaker).filter(|b| *b != CircuitBreakerSpec::default()),
        Some(timeouts).filter(|t| *t != TimeoutsSpec::default()),
    ))
}

fn outlier_detection(od: &DrOutlierDetection) -> Result<OutlierDetectionSpec, RuleError> {
    const AT: &str = "spec.trafficPolicy.outlierDetection";
    unsupported(AT, &od.other)?;
    duration(&format!("{AT}.interval"), &od.interval)?;
    Ok(OutlierDetectionSpec {
        consecutive_5xx: od.consecutive_5xx_errors,
        consecutive_connect_failures: od.consecutive_gateway_errors,
        base_ejection_time: duration(&format!("{AT}.baseEjectionTime"), &od.base_ejection_time)?,
        max_ejection_percent: od.max_ejection_percent,
        disabled: None,
    })
}

fn tls(t: &DrTls, fqdn: &str) -> Result<Option<UpstreamTlsSpec>, RuleError> {
    const AT: &str = "spec.trafficPolicy.tls";
    unsupported(AT, &t.other)?;
    match t.mode.as_deref().unwrap_or("DISABLE") {
        "DISABLE" => Ok(None),
        // Sidecars reach mesh workloads over HBONE (mTLS) with or without it; a Gateway's
        // proxy does not originate Istio mTLS (docs/operator.md says so).
        "ISTIO_MUTUAL" => Ok(None),
        "SIMPLE" => Ok(Some(UpstreamTlsSpec {
            sni: t.sni.clone().unwrap_or_else(|| fqdn.to_string()),
            ca_file: t.ca_certificates.clone(),
            insecure_skip_verify: t.insecure_skip_verify,
        })),
        other => Err((
            format!("{AT}.mode"),
            format!("{other:?} is not supported by Ferrum (DISABLE, SIMPLE, ISTIO_MUTUAL)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_name_services_as_istio_reads_them() {
        assert_eq!(service_of("reviews", "shop"), Some(("shop", "reviews")));
        assert_eq!(service_of("reviews.books", "shop"), Some(("books", "reviews")));
        assert_eq!(service_of("reviews.books.svc", "shop"), Some(("books", "reviews")));
        assert_eq!(
            service_of("reviews.books.svc.cluster.local", "shop"),
            Some(("books", "reviews"))
        );
        assert_eq!(service_of("api.example.com", "shop"), None, "an external host");
        assert_eq!(service_of("*.books.svc.cluster.local", "shop"), None);
    }
}
