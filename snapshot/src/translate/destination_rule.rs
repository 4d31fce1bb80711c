//! Istio DestinationRules as Ferrum traffic policies: the rule for a Service is read into the
//! same `TrafficPolicy` a BackendPolicy carries, applied after the mesh default and before the
//! Service's BackendPolicy (whose fields win). A rule with a field Ferrum does not apply is left
//! out whole, its status naming the field — never half-applied.

use crate::crd::{
    CircuitBreakerSpec, HashCookieSpec, LoadBalancerSpec, OutlierDetectionSpec, SlowStartSpec, TcpKeepaliveSpec,
    TimeoutsSpec, TrafficPolicy, UpstreamTlsSpec,
};
use crate::istio::{
    DestinationRule, DrConnectionPool, DrHttpPool, DrLoadBalancer, DrOutlierDetection, DrTls, DrTrafficPolicy, Other,
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
        if apply(res, d, &d.spec.host, None, &mut Cluster::new("scratch", Vec::new())).is_err() {
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
        .filter(|(_, d)| apply(res, d, &d.spec.host, None, &mut Cluster::new("scratch", Vec::new())).is_ok())
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

/// Applies rule `d` to `c` (of port `port`, whose `portLevelSettings` then apply) whole, or
/// says why it cannot be.
pub fn apply(
    res: &Resources,
    d: &DestinationRule,
    fqdn: &str,
    port: Option<u16>,
    c: &mut Cluster,
) -> Result<(), RuleError> {
    let p = traffic_policy(d, fqdn, port)?;
    let secrets = super::backends::SecretScope::of(res, &d.metadata);
    super::backends::apply_policy(c, &p, secrets).map_err(|(_, msg)| ("spec.trafficPolicy".into(), msg))
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
        .map(|d| super::istio_duration_ms(d).map(gateway_duration))
        .transpose()
        .map_err(|e| (at.to_string(), e))
}

/// Milliseconds as a Gateway API duration, whose parts have at most five digits (so `3m` is
/// `3m`, not `180000ms`).
fn gateway_duration(ms: u64) -> String {
    let mut out = String::new();
    let mut rest = ms;
    for (unit, size) in [("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)] {
        let n = rest / size;
        rest %= size;
        if n > 0 {
            out.push_str(&format!("{n}{unit}"));
        }
    }
    if out.is_empty() {
        out.push_str("0s");
    }
    out
}

/// The rule's traffic policy as Ferrum's, for port `port`; `sni` defaults to the Service's DNS
/// name. Its subsets are checked too, so a rule with one that cannot be applied is left out
/// whole.
pub fn traffic_policy(d: &DestinationRule, fqdn: &str, port: Option<u16>) -> Result<TrafficPolicy, RuleError> {
    if d.spec.workload_selector.is_some() {
        return Err(("spec.workloadSelector".into(), "not supported by Ferrum".into()));
    }
    for i in 0..d.spec.subsets.len() {
        subset_policy(d, i, fqdn, port)?;
    }
    match &d.spec.traffic_policy {
        None => Ok(TrafficPolicy::default()),
        Some(p) => policy_of(p, fqdn, "spec.trafficPolicy", port),
    }
}

/// Subset `i`'s own traffic policy (applied over the rule's), or why it cannot be applied.
pub fn subset_policy(d: &DestinationRule, i: usize, fqdn: &str, port: Option<u16>) -> Result<TrafficPolicy, RuleError> {
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
        Some(p) => policy_of(p, fqdn, &format!("{at}.trafficPolicy"), port),
    }
}

/// A `trafficPolicy` (at field path `at`) as Ferrum's, for port `port`: a `portLevelSettings`
/// entry for the port replaces each section it sets, as in Istio. Every entry is checked.
fn policy_of(p: &DrTrafficPolicy, fqdn: &str, at: &str, port: Option<u16>) -> Result<TrafficPolicy, RuleError> {
    unsupported(at, &p.other)?;
    let top = Sections {
        load_balancer: p.load_balancer.as_ref(),
        connection_pool: p.connection_pool.as_ref(),
        outlier_detection: p.outlier_detection.as_ref(),
        tls: p.tls.as_ref(),
    };
    let mut out = top.read(fqdn, at)?;
    for (i, pl) in p.port_level_settings.iter().enumerate() {
        let at = format!("{at}.portLevelSettings[{i}]");
        unsupported(&at, &pl.other)?;
        let number = pl
            .port
            .as_ref()
            .and_then(|p| u16::try_from(p.number).ok())
            .filter(|n| *n != 0)
            .ok_or_else(|| (format!("{at}.port.number"), "a port 1-65535 is required".to_string()))?;
        if let Some(k) = pl.port.as_ref().and_then(|p| p.other.keys().next()) {
            return Err((format!("{at}.port.{k}"), "not supported by Ferrum".into()));
        }
        if p.port_level_settings[..i]
            .iter()
            .any(|o| o.port.as_ref().is_some_and(|o| o.number == u32::from(number)))
        {
            return Err((format!("{at}.port.number"), format!("port {number} is listed twice")));
        }
        let sections = Sections {
            load_balancer: pl.load_balancer.as_ref(),
            connection_pool: pl.connection_pool.as_ref(),
            outlier_detection: pl.outlier_detection.as_ref(),
            tls: pl.tls.as_ref(),
        };
        let over = sections.read(fqdn, &at)?;
        if port == Some(number) {
            sections.replace(&mut out, over);
        }
    }
    // Istio's mesh-wide default: with outlier detection, locality failover unless the rule
    // turns it off.
    if out.outlier_detection.is_some() {
        out.load_balancer
            .get_or_insert_default()
            .locality_failover
            .get_or_insert(true);
    }
    Ok(out)
}

/// The sections of a traffic policy, at the top or for one port.
struct Sections<'p> {
    load_balancer: Option<&'p DrLoadBalancer>,
    connection_pool: Option<&'p DrConnectionPool>,
    outlier_detection: Option<&'p DrOutlierDetection>,
    tls: Option<&'p DrTls>,
}

impl Sections<'_> {
    fn read(&self, fqdn: &str, at: &str) -> Result<TrafficPolicy, RuleError> {
        let mut out = TrafficPolicy::default();
        if let Some(lb) = self.load_balancer {
            out.load_balancer = load_balancer(lb, at)?;
        }
        if let Some(cp) = self.connection_pool {
            let pool = connection_pool(cp, at)?;
            (out.circuit_breaker, out.timeouts, out.tcp_keepalive, out.protocol) =
                (pool.breaker, pool.timeouts, pool.keepalive, pool.protocol);
        }
        if let Some(od) = self.outlier_detection {
            out.outlier_detection = Some(outlier_detection(od, at)?);
        }
        if let Some(t) = self.tls {
            out.tls = tls(t, fqdn, at)?;
        }
        Ok(out)
    }

    /// Replaces in `out` each section these set, with `read`'s.
    fn replace(&self, out: &mut TrafficPolicy, read: TrafficPolicy) {
        if self.load_balancer.is_some() {
            out.load_balancer = read.load_balancer;
        }
        if self.connection_pool.is_some() {
            (out.circuit_breaker, out.timeouts, out.tcp_keepalive, out.protocol) =
                (read.circuit_breaker, read.timeouts, read.tcp_keepalive, read.protocol);
        }
        if self.outlier_detection.is_some() {
            out.outlier_detection = read.outlier_detection;
        }
        if self.tls.is_some() {
            out.tls = read.tls;
        }
    }
}

fn load_balancer(lb: &DrLoadBalancer, at: &str) -> Result<Option<LoadBalancerSpec>, RuleError> {
    let at = format!("{at}.loadBalancer");
    unsupported(&at, &lb.other)?;
    let mut out = balancing_and_warmup(lb, &at)?;
    if let Some(l) = &lb.locality_lb_setting {
        unsupported(&format!("{at}.localityLbSetting"), &l.other)?;
        if let Some(on) = l.enabled {
            out.get_or_insert_default().locality_failover = Some(on);
        }
    }
    Ok(out)
}

fn balancing_and_warmup(lb: &DrLoadBalancer, at: &str) -> Result<Option<LoadBalancerSpec>, RuleError> {
    let at = at.to_string();
    let slow_start = warmup(lb, &at)?;
    let Some(slow_start) = slow_start else {
        return balancing(lb, &at);
    };
    if lb.consistent_hash.is_some() {
        return Err((
            format!("{at}.warmup"),
            "a hash ring sends each key to its endpoint: not with consistentHash".into(),
        ));
    }
    // Without `simple` the balancing stays what it was.
    let kind = balancing(lb, &at)?.map(|b| b.kind).unwrap_or_default();
    Ok(Some(LoadBalancerSpec {
        kind,
        slow_start: Some(slow_start),
        ..Default::default()
    }))
}

/// `warmup`, or the older `warmupDurationSecs`, as Ferrum's slow start.
fn warmup(lb: &DrLoadBalancer, at: &str) -> Result<Option<SlowStartSpec>, RuleError> {
    let (w, legacy) = (&lb.warmup, &lb.warmup_duration_secs);
    let (window, at) = match (w, legacy) {
        (Some(_), Some(_)) => {
            return Err((
                format!("{at}.warmupDurationSecs"),
                "warmup replaces it: give one".into(),
            ));
        }
        (None, None) => return Ok(None),
        (None, Some(d)) => (d, format!("{at}.warmupDurationSecs")),
        (Some(w), None) => {
            let at = format!("{at}.warmup");
            unsupported(&at, &w.other)?;
            let d = w
                .duration
                .as_ref()
                .ok_or_else(|| (format!("{at}.duration"), "is required".to_string()))?;
            (d, format!("{at}.duration"))
        }
    };
    let window = duration(&at, &Some(window.clone()))?.unwrap_or_default();
    Ok(Some(SlowStartSpec {
        window,
        aggression: w.as_ref().and_then(|w| w.aggression),
        min_weight_percent: w.as_ref().and_then(|w| w.minimum_percent),
    }))
}

/// `simple` or `consistentHash`.
fn balancing(lb: &DrLoadBalancer, at: &str) -> Result<Option<LoadBalancerSpec>, RuleError> {
    let at = at.to_string();
    let kind = |k: &str| LoadBalancerSpec {
        kind: k.into(),
        ..Default::default()
    };
    match (&lb.simple, &lb.consistent_hash) {
        (Some(_), Some(_)) => Err((at, "simple and consistentHash exclude each other".into())),
        (Some(s), None) => match s.as_str() {
            "UNSPECIFIED" => Ok(None),
            "ROUND_ROBIN" => Ok(Some(kind("RoundRobin"))),
            "LEAST_REQUEST" | "LEAST_CONN" => Ok(Some(kind("LeastRequest"))),
            "RANDOM" => Ok(Some(kind("Random"))),
            other => Err((format!("{at}.simple"), format!("{other:?} is not supported by Ferrum"))),
        },
        (None, Some(h)) => {
            let at = format!("{at}.consistentHash");
            unsupported(&at, &h.other)?;
            let hash_cookie = match &h.http_cookie {
                Some(c) => {
                    unsupported(&format!("{at}.httpCookie"), &c.other)?;
                    Some(HashCookieSpec {
                        name: c.name.clone(),
                        path: c.path.clone(),
                        ttl: duration(&format!("{at}.httpCookie.ttl"), &c.ttl)?,
                    })
                }
                None => None,
            };
            let keys = [
                h.http_header_name.is_some(),
                h.use_source_ip == Some(true),
                hash_cookie.is_some(),
                h.http_query_parameter_name.is_some(),
            ];
            if keys.iter().filter(|k| **k).count() != 1 {
                return Err((
                    at,
                    "one of httpHeaderName, useSourceIp: true, httpCookie and httpQueryParameterName".into(),
                ));
            }
            Ok(Some(LoadBalancerSpec {
                kind: "ConsistentHash".into(),
                hash_header: h.http_header_name.clone(),
                hash_client_ip: h.use_source_ip.filter(|u| *u),
                hash_cookie,
                hash_query_parameter: h.http_query_parameter_name.clone(),
                ..Default::default()
            }))
        }
        (None, None) => Ok(None),
    }
}

/// What a `connectionPool` sets.
struct Pool {
    breaker: Option<CircuitBreakerSpec>,
    timeouts: Option<TimeoutsSpec>,
    keepalive: Option<TcpKeepaliveSpec>,
    /// The upstream protocol, when the pool names one.
    protocol: Option<String>,
}

fn connection_pool(cp: &DrConnectionPool, at: &str) -> Result<Pool, RuleError> {
    let at = format!("{at}.connectionPool");
    unsupported(&at, &cp.other)?;
    let (tcp, http) = (cp.tcp.clone().unwrap_or_default(), cp.http.clone().unwrap_or_default());
    unsupported(&format!("{at}.tcp"), &tcp.other)?;
    unsupported(&format!("{at}.http"), &http.other)?;
    let breaker = CircuitBreakerSpec {
        max_connections: tcp.max_connections,
        max_pending_requests: http.http1_max_pending_requests,
        max_requests: http.http2_max_requests,
        // Istio reads 0 as unset.
        max_retries: http.max_retries.filter(|n| *n > 0),
        max_requests_per_connection: http.max_requests_per_connection.filter(|n| *n > 0),
        max_concurrent_streams: http.max_concurrent_streams.filter(|n| *n > 0),
    };
    let timeouts = TimeoutsSpec {
        connect: duration(&format!("{at}.tcp.connectTimeout"), &tcp.connect_timeout)?,
        read: None,
        idle: duration(&format!("{at}.http.idleTimeout"), &http.idle_timeout)?,
        max_connection_duration: duration(&format!("{at}.tcp.maxConnectionDuration"), &tcp.max_connection_duration)?,
        tcp_idle: duration(&format!("{at}.tcp.idleTimeout"), &tcp.idle_timeout)?,
    };
    let keepalive = match &tcp.tcp_keepalive {
        Some(k) => {
            let at = format!("{at}.tcp.tcpKeepalive");
            unsupported(&at, &k.other)?;
            Some(TcpKeepaliveSpec {
                time: duration(&format!("{at}.time"), &k.time)?,
                interval: duration(&format!("{at}.interval"), &k.interval)?,
                probes: k.probes,
            })
        }
        None => None,
    };
    Ok(Pool {
        breaker: Some(breaker).filter(|b| *b != CircuitBreakerSpec::default()),
        timeouts: Some(timeouts).filter(|t| *t != TimeoutsSpec::default()),
        keepalive,
        protocol: upstream_protocol(&http, &format!("{at}.http"))?,
    })
}

/// `useClientProtocol` and `h2UpgradePolicy` as Ferrum's upstream protocol; `None` leaves the
/// Service's (an `http2` or `grpc` port is spoken to in HTTP/2 whatever the policy).
fn upstream_protocol(http: &DrHttpPool, at: &str) -> Result<Option<String>, RuleError> {
    if http.use_client_protocol == Some(true) {
        return Ok(Some("Client".into()));
    }
    match http.h2_upgrade_policy.as_deref() {
        None | Some("DEFAULT" | "DO_NOT_UPGRADE") => Ok(None),
        Some("UPGRADE") => Ok(Some("HTTP/2".into())),
        Some(other) => Err((
            format!("{at}.h2UpgradePolicy"),
            format!("{other:?} is not DEFAULT, DO_NOT_UPGRADE or UPGRADE"),
        )),
    }
}

fn outlier_detection(od: &DrOutlierDetection, at: &str) -> Result<OutlierDetectionSpec, RuleError> {
    let at = format!("{at}.outlierDetection");
    unsupported(&at, &od.other)?;
    duration(&format!("{at}.interval"), &od.interval)?;
    let min_health_percent = match od.min_health_percent {
        Some(p) if !(0..=100).contains(&p) => {
            return Err((format!("{at}.minHealthPercent"), format!("{p} is not 0 to 100")));
        }
        p => p.map(|p| p as u32),
    };
    Ok(OutlierDetectionSpec {
        min_health_percent,
        consecutive_5xx: od.consecutive_5xx_errors,
        consecutive_connect_failures: od.consecutive_gateway_errors,
        base_ejection_time: duration(&format!("{at}.baseEjectionTime"), &od.base_ejection_time)?,
        max_ejection_percent: od.max_ejection_percent,
        disabled: None,
    })
}

fn tls(t: &DrTls, fqdn: &str, at: &str) -> Result<Option<UpstreamTlsSpec>, RuleError> {
    let at = format!("{at}.tls");
    unsupported(&at, &t.other)?;
    let simple = || UpstreamTlsSpec {
        sni: t.sni.clone().unwrap_or_else(|| fqdn.to_string()),
        ca_file: t.ca_certificates.clone(),
        insecure_skip_verify: t.insecure_skip_verify,
        subject_alt_names: Some(t.subject_alt_names.clone()).filter(|s| !s.is_empty()),
        ..UpstreamTlsSpec::default()
    };
    let mode = t.mode.as_deref().unwrap_or("DISABLE");
    let client = (&t.client_certificate, &t.private_key, &t.credential_name);
    let simple_ca = mode == "SIMPLE" && client == (&None, &None, &t.credential_name);
    if mode != "MUTUAL" && !simple_ca && client != (&None, &None, &None) {
        return Err((
            format!("{at}.mode"),
            format!("{mode:?}: a client certificate is presented in MUTUAL mode only"),
        ));
    }
    if t.credential_name.is_some() && t.ca_certificates.is_some() {
        return Err((
            format!("{at}.caCertificates"),
            "the CAs come from credentialName's Secret (ca.crt) or from caCertificates, not both".into(),
        ));
    }
    match mode {
        "DISABLE" => Ok(None),
        // Sidecars reach mesh workloads over HBONE (mTLS) with or without it; a Gateway's
        // proxy does not originate Istio mTLS (docs/operator.md says so).
        "ISTIO_MUTUAL" => Ok(None),
        // SIMPLE with credentialName: the Secret's ca.crt (or `<name>-cacert`) verifies.
        "SIMPLE" => Ok(Some(UpstreamTlsSpec {
            ca_certificate_ref: t.credential_name.clone(),
            ..simple()
        })),
        "MUTUAL" => match client {
            (Some(cert), Some(key), None) => Ok(Some(UpstreamTlsSpec {
                cert_file: Some(cert.clone()),
                key_file: Some(key.clone()),
                ..simple()
            })),
            (None, None, Some(name)) => Ok(Some(UpstreamTlsSpec {
                client_certificate_ref: Some(name.clone()),
                ..simple()
            })),
            _ => Err((
                at,
                "MUTUAL presents a client certificate: clientCertificate and privateKey, or credentialName".into(),
            )),
        },
        other => Err((
            format!("{at}.mode"),
            format!("{other:?} is not supported by Ferrum (DISABLE, SIMPLE, MUTUAL, ISTIO_MUTUAL)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_stay_within_the_gateway_apis_five_digits() {
        // Istio's circuit-breaking task ejects for `3m`: 180000ms would be refused.
        let d = |s: &str| duration("x", &Some(s.into())).unwrap().unwrap();
        assert_eq!(d("3m"), "3m");
        assert_eq!(d("1h"), "1h");
        assert_eq!(d("90s"), "1m30s");
        assert_eq!(d("1.5s"), "1s500ms");
        assert_eq!(d("0s"), "0s");
        assert_eq!(super::super::parse_duration_ms(&d("36h")).unwrap(), 36 * 3_600_000);
    }

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
