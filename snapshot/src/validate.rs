//! Checks a snapshot before anyone compiles it. A snapshot from any source (translator, database,
//! control plane, xDS) goes through here, so errors name the snapshot object and field.

use std::collections::BTreeSet;

use crate::model::*;

/// Largest route or endpoint weight (the Gateway API's bound on `backendRefs[].weight`).
pub const MAX_WEIGHT: u32 = 1_000_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{object}: {field}: {message}")]
pub struct InvalidSnapshot {
    /// e.g. `cluster "default/echo:80"`.
    pub object: String,
    /// e.g. `endpoints[1].port`.
    pub field: String,
    pub message: String,
}

/// Returns every problem, not only the first, so one edit can fix them all.
pub fn validate(s: &Snapshot) -> Result<(), Vec<InvalidSnapshot>> {
    let mut errs = Vec::new();
    let mut err =
        |object: String, field: String, message: String| errs.push(InvalidSnapshot { object, field, message });

    let mut cluster_names = BTreeSet::new();
    for c in &s.clusters {
        if !cluster_names.insert(c.name.as_str()) {
            err(
                format!("cluster {:?}", c.name),
                "name".into(),
                "duplicate cluster name".into(),
            );
        }
        check_cluster(c, &mut err);
    }
    let mut ports = BTreeSet::new();
    for l in &s.listeners {
        if !ports.insert((l.address.as_str(), l.port)) {
            err(
                format!("listener {:?}", l.name),
                "port".into(),
                format!("{}:{} is used by another listener", l.address, l.port),
            );
        }
        check_listener(l, &cluster_names, &mut err);
    }
    for svc in &s.services {
        let obj = format!("service {:?}", svc.key);
        for (field, tables) in [("routes", &svc.routes), ("tcpRoutes", &svc.tcp_routes)] {
            for (ti, t) in tables.iter().enumerate() {
                for (ri, r) in t.routes.iter().enumerate() {
                    check_route(
                        r,
                        &cluster_names,
                        &obj,
                        &format!("{field}[{ti}].routes[{ri}]"),
                        &mut err,
                    );
                }
            }
        }
    }
    for p in &s.policies {
        if let crate::mesh::PolicyRule::Authorization(a) = &p.rule
            && let Some(c) = &a.check
        {
            check_ext_authz(c, a.action, &cluster_names, &mut |field, why| {
                err(format!("policy {:?}", p.key), field, why)
            });
        }
    }
    crate::mesh::check(&s.workloads, &s.services, &s.sidecars, &mut err);
    if errs.is_empty() { Ok(()) } else { Err(errs) }
}

/// The longest a proxy waits for an external authorization service (Istio's default).
pub const MAX_EXT_AUTHZ_TIMEOUT_MS: u64 = 600_000;

/// The most of a request's body a proxy reads ahead for an external authorization check.
pub const MAX_EXT_AUTHZ_BODY: u32 = 8 << 20;

fn check_ext_authz(
    c: &crate::mesh::ExtAuthz,
    action: crate::mesh::AuthzAction,
    clusters: &BTreeSet<&str>,
    err: &mut impl FnMut(String, String),
) {
    if action != crate::mesh::AuthzAction::Deny {
        err(
            "action".into(),
            "a policy that asks a service is written with action DENY".into(),
        );
    }
    if !clusters.contains(c.cluster.as_str()) {
        err("check.cluster".into(), format!("no cluster {:?}", c.cluster));
    }
    if c.timeout_ms == 0 || c.timeout_ms > MAX_EXT_AUTHZ_TIMEOUT_MS {
        err(
            "check.timeoutMs".into(),
            format!("must be 1-{MAX_EXT_AUTHZ_TIMEOUT_MS}"),
        );
    }
    if c.include_request_body
        .is_some_and(|b| b.max_bytes == 0 || b.max_bytes > MAX_EXT_AUTHZ_BODY)
    {
        err(
            "check.includeRequestBody.maxBytes".into(),
            format!("must be 1-{MAX_EXT_AUTHZ_BODY}"),
        );
    }
    if !(200..=599).contains(&c.status_on_error) {
        err("check.statusOnError".into(), "must be 200-599".into());
    }
    if !c.path_prefix.is_empty() && (!c.path_prefix.starts_with('/') || c.path_prefix.contains(['?', '#'])) {
        err(
            "check.pathPrefix".into(),
            "must start with '/' and have no query".into(),
        );
    }
}

fn check_cluster(c: &Cluster, err: &mut impl FnMut(String, String, String)) {
    let obj = format!("cluster {:?}", c.name);
    let mut bad = |field: String, why: String| err(obj.clone(), field, why);
    cluster_endpoints(&c.endpoints, &mut bad);
    if let Some(t) = &c.tls {
        upstream_tls(t, &mut bad);
    }
    if let Some(hc) = &c.health_check {
        health_check(hc, &mut bad);
    }
    if let Some(r) = &c.retry {
        retry_conditions(r, &mut bad);
    }
    hashing(c, &mut bad);
    if let Some(k) = &c.tcp_keepalive {
        tcp_keepalive(k, &mut bad);
    }
    if c.panic_threshold_percent > 100 {
        bad("panicThresholdPercent".into(), "0 to 100".into());
    }
    if let Some(s) = &c.slow_start {
        slow_start(s, &c.lb, &mut bad);
    }
}

fn cluster_endpoints(endpoints: &[Endpoint], bad: &mut impl FnMut(String, String)) {
    for (i, e) in endpoints.iter().enumerate() {
        if e.port == 0 {
            bad(format!("endpoints[{i}].port"), "must be 1-65535".into());
        }
        if e.weight > MAX_WEIGHT {
            bad(
                format!("endpoints[{i}].weight"),
                format!("{} is above the maximum weight {MAX_WEIGHT}", e.weight),
            );
        }
        if e.address.is_empty() {
            bad(format!("endpoints[{i}].address"), "must not be empty".into());
        }
    }
}

fn upstream_tls(t: &UpstreamTls, bad: &mut impl FnMut(String, String)) {
    if t.ca_file.is_some() && t.ca_pem.is_some() {
        bad("tls.caPem".into(), "not with caFile: one names the CAs".into());
    }
    if t.ca_pem
        .as_deref()
        .is_some_and(|p| !p.contains("-----BEGIN CERTIFICATE-----"))
    {
        bad("tls.caPem".into(), "holds no PEM certificate".into());
    }
    if t.sni.is_empty() {
        bad("tls.sni".into(), "must not be empty".into());
    }
    for (i, uri) in t.subject_alt_uris.iter().enumerate() {
        if !is_uri(uri) {
            bad(
                format!("tls.subjectAltUris[{i}]"),
                format!("{uri:?}: a URI, scheme://…"),
            );
        }
    }
    for (i, san) in t.subject_alt_names.iter().enumerate() {
        if !san_checkable(san) {
            bad(
                format!("tls.subjectAltNames[{i}]"),
                format!("{san:?}: a DNS name or an IP address"),
            );
        }
    }
}

fn health_check(hc: &HealthCheck, bad: &mut impl FnMut(String, String)) {
    if !hc.path.starts_with('/') {
        bad("healthCheck.path".into(), "must start with '/'".into());
    }
    if hc.interval_ms == 0 || hc.timeout_ms == 0 {
        bad(
            "healthCheck.intervalMs".into(),
            "interval and timeout must be > 0".into(),
        );
    }
    if hc.healthy_threshold == 0 || hc.unhealthy_threshold == 0 {
        bad("healthCheck.healthyThreshold".into(), "thresholds must be >= 1".into());
    }
}

/// What a consistent-hash cluster hashes on.
fn hashing(c: &Cluster, bad: &mut impl FnMut(String, String)) {
    if let Some(h) = &c.hash_input {
        if !matches!(c.lb, LbPolicy::ConsistentHash(_)) {
            bad("hashInput".into(), "only with a consistentHash lb".into());
        }
        if h.cookie.as_ref().is_some_and(|c| http_header_name_invalid(&c.name)) {
            bad("hashInput.cookie.name".into(), "not a cookie name".into());
        }
        if h.query_parameter.as_deref() == Some("") {
            bad("hashInput.queryParameter".into(), "must not be empty".into());
        }
    }
    if let LbPolicy::ConsistentHash(HashOn::Header(h)) = &c.lb
        && http_header_name_invalid(h)
    {
        bad("lb.consistentHash.header".into(), format!("invalid header name {h:?}"));
    }
}

fn tcp_keepalive(k: &TcpKeepalive, bad: &mut impl FnMut(String, String)) {
    // Linux counts whole seconds, up to 32,767, and at most 127 probes.
    for (field, ms) in [
        ("tcpKeepalive.timeMs", k.time_ms),
        ("tcpKeepalive.intervalMs", k.interval_ms),
    ] {
        if ms.is_some_and(|ms| !(1000..=32_767_000).contains(&ms)) {
            bad(field.into(), "1 s to 32,767 s".into());
        }
    }
    if k.probes.is_some_and(|n| !(1..=127).contains(&n)) {
        bad("tcpKeepalive.probes".into(), "1 to 127".into());
    }
}

fn check_listener(l: &Listener, clusters: &BTreeSet<&str>, err: &mut impl FnMut(String, String, String)) {
    let obj = format!("listener {:?}", l.name);
    if l.port == 0 {
        err(obj.clone(), "port".into(), "must be 1-65535".into());
    }
    if l.address.parse::<std::net::IpAddr>().is_err() {
        err(
            obj.clone(),
            "address".into(),
            format!("{:?} is not an IP address", l.address),
        );
    }
    if l.protocol == Protocol::Https && l.certificates.is_empty() {
        err(
            obj.clone(),
            "certificates".into(),
            "an HTTPS listener needs at least one certificate".into(),
        );
    }
    if l.protocol == Protocol::Tcp && !l.certificates.is_empty() {
        err(
            obj.clone(),
            "certificates".into(),
            "a TCP listener has no certificates (TLS terminates on a TLS listener)".into(),
        );
    }
    if l.protocol.is_l4()
        && let Some((vi, r)) = l
            .virtual_hosts
            .iter()
            .enumerate()
            .flat_map(|(vi, vh)| vh.routes.iter().map(move |r| (vi, r)))
            .find(|(_, r)| !matches!(r.action, Action::Forward(_)))
    {
        err(
            obj.clone(),
            format!("virtualHosts[{vi}].routes"),
            format!("route {:?}: a {:?} listener can only forward", r.name, l.protocol),
        );
    }
    let mut hosts = BTreeSet::new();
    for (vi, vh) in l.virtual_hosts.iter().enumerate() {
        if !hosts.insert(vh.hostname.as_str()) {
            err(
                obj.clone(),
                format!("virtualHosts[{vi}].hostname"),
                format!("duplicate hostname {:?}", vh.hostname),
            );
        }
        for (ri, r) in vh.routes.iter().enumerate() {
            let at = format!("virtualHosts[{vi}].routes[{ri}]");
            check_route(r, clusters, &obj, &at, err);
            if r.matcher.source.is_some() {
                // A gateway is no client workload: only sidecars pick routes by source.
                err(
                    obj.clone(),
                    format!("{at}.match.source"),
                    "a source match applies to mesh routes only".into(),
                );
            }
        }
    }
}

fn check_route(
    r: &Route,
    clusters: &BTreeSet<&str>,
    obj: &str,
    at: &str,
    err: &mut impl FnMut(String, String, String),
) {
    let obj = || format!("{obj} route {:?}", r.name);
    check_route_shape(r, &obj, at, err);
    check_action(&r.action, clusters, &obj, at, err);
    if let Some(d) = &r.direct_response {
        if let Some((field, why)) = direct_response_problem(d) {
            err(obj(), format!("{at}.directResponse.{field}"), why);
        }
        let nowhere = matches!(&r.action, Action::Forward(t) if t.iter().all(|t| t.cluster.is_none()));
        if !nowhere {
            err(
                obj(),
                format!("{at}.action"),
                "a route that answers itself forwards nowhere".into(),
            );
        }
    }
    for (i, m) in r.mirrors().enumerate() {
        if !clusters.contains(m.cluster.as_str()) {
            err(
                obj(),
                format!("{at}.{}.cluster", mirror_field(i)),
                format!("unknown cluster {:?}", m.cluster),
            );
        }
    }
}

/// Where mirror `i` of a route is written: `mirror`, then `moreMirrors[i - 1]`.
fn mirror_field(i: usize) -> String {
    match i {
        0 => "mirror".into(),
        i => format!("moreMirrors[{}]", i - 1),
    }
}

/// What a route must be whatever it sends to: matches, header edits, rewrites, retries.
fn check_route_shape(r: &Route, obj: &impl Fn() -> String, at: &str, err: &mut impl FnMut(String, String, String)) {
    check_match(&r.matcher, obj, at, err);
    for (which, m) in [
        ("requestHeaders", &r.request_headers),
        ("responseHeaders", &r.response_headers),
    ] {
        if let Some(msg) = header_modifier_problem(m) {
            err(obj(), format!("{at}.{which}"), msg);
        }
    }
    let prefix_rewrite = |p: &Option<PathRewrite>| matches!(p, Some(PathRewrite::Prefix(_)));
    let rewrites_prefix = r.rewrite.as_ref().is_some_and(|rw| prefix_rewrite(&rw.path))
        || matches!(&r.action, Action::Redirect(rd) if prefix_rewrite(&rd.path));
    if rewrites_prefix && !matches!(r.matcher.path, PathMatch::Prefix(_)) {
        err(
            obj(),
            format!("{at}.rewrite.path"),
            "a prefix replacement needs a PathPrefix match".into(),
        );
    }
    if let Some(retry) = &r.retry {
        retry_conditions(retry, &mut |field, why| err(obj(), format!("{at}.{field}"), why));
    }
    if let Some((field, why)) = r.cors.as_ref().and_then(cors_problem) {
        err(obj(), format!("{at}.cors.{field}"), why);
    }
    if let Some(f) = &r.fault {
        for (field, why) in fault_problems(f) {
            err(obj(), format!("{at}.fault.{field}"), why.into());
        }
    }
    for (i, l) in r.rate_limits.iter().enumerate() {
        for (j, rule) in l.rules.iter().enumerate() {
            if let Some((field, why)) = rate_limit_problem(rule) {
                err(obj(), format!("{at}.rateLimits[{i}].rules[{j}].{field}"), why);
            }
        }
    }
    for (i, m) in r.mirrors().enumerate() {
        if m.per_million > 1_000_000 {
            err(
                obj(),
                format!("{at}.{}.perMillion", mirror_field(i)),
                "at most 1,000,000".into(),
            );
        }
    }
}

/// What a proxy could not count: no requests allowed, a window outside a second to a day,
/// header names and regexes, client blocks.
fn rate_limit_problem(r: &crate::model::RateLimitRule) -> Option<(String, String)> {
    if r.requests == 0 {
        return Some(("requests".into(), "must be at least 1".into()));
    }
    if !(1..=86_400).contains(&r.window_secs) {
        return Some(("windowSecs".into(), "must be 1 to 86,400".into()));
    }
    for (i, h) in r.headers.iter().enumerate() {
        if http_header_name_invalid(&h.name) {
            return Some((
                format!("headers[{i}].name"),
                format!("invalid header name {:?}", h.name),
            ));
        }
        if let Some(StringMatch::Regex(re)) = &h.value
            && let Err(e) = regex::Regex::new(re)
        {
            return Some((format!("headers[{i}].value"), format!("invalid regex: {e}")));
        }
    }
    r.clients
        .iter()
        .position(|c| !c.cidr.contains('/') || !crate::translate::valid_block(&c.cidr))
        .map(|i| {
            (
                format!("clients[{i}].cidr"),
                format!("{:?} is not a CIDR block", r.clients[i].cidr),
            )
        })
}

/// The longest fault delay a route may inject.
pub const MAX_FAULT_DELAY_MS: u64 = 3_600_000;

fn fault_problems(f: &Fault) -> Vec<(&'static str, &'static str)> {
    let mut out = Vec::new();
    if let Some(d) = &f.delay {
        if d.ms > MAX_FAULT_DELAY_MS {
            out.push(("delay.ms", "at most an hour"));
        }
        if d.per_million > 1_000_000 {
            out.push(("delay.perMillion", "at most 1,000,000"));
        }
    }
    if let Some(a) = &f.abort {
        if !(200..=599).contains(&a.status) {
            out.push(("abort.status", "200-599"));
        }
        if a.per_million > 1_000_000 {
            out.push(("abort.perMillion", "at most 1,000,000"));
        }
        if a.grpc_status.is_some_and(|c| c > 16) {
            out.push(("abort.grpcStatus", "a gRPC status code, 0-16"));
        }
    }
    out
}

/// The first problem of a route's own shape (not what it sends to): `(field, why)`, the field
/// under `at`. For translators that build routes from objects, to refuse them with a reason
/// instead of emitting a snapshot `validate` refuses.
/// Why a direct response cannot be made: (field, reason).
pub(crate) fn direct_response_problem(d: &crate::model::DirectResponse) -> Option<(String, String)> {
    if !(200..=599).contains(&d.status) {
        return Some(("status".into(), format!("{} is not 200-599", d.status)));
    }
    if d.body.len() > crate::model::DirectResponse::MAX_BODY {
        return Some((
            "body".into(),
            format!(
                "{} bytes is over {}",
                d.body.len(),
                crate::model::DirectResponse::MAX_BODY
            ),
        ));
    }
    None
}

pub(crate) fn route_shape_problem(r: &Route, at: &str) -> Option<(String, String)> {
    let mut first = None;
    check_route_shape(r, &String::new, at, &mut |_, field, why| {
        first.get_or_insert((field, why));
    });
    first
}

/// Paths, header and query matches: regexes compile, names are tokens.
fn check_match(
    matcher: &RouteMatch,
    obj: &impl Fn() -> String,
    at: &str,
    err: &mut impl FnMut(String, String, String),
) {
    match &matcher.path {
        PathMatch::Exact(p) | PathMatch::Prefix(p) if !p.starts_with('/') => {
            err(obj(), format!("{at}.match.path"), format!("{p:?} must start with '/'"))
        }
        PathMatch::Regex(re) => {
            if let Err(e) = regex::Regex::new(re) {
                err(obj(), format!("{at}.match.path.regex"), format!("invalid regex: {e}"))
            }
        }
        _ => {}
    }
    for (i, h) in matcher.headers.iter().enumerate() {
        if http_header_name_invalid(&h.name) {
            err(
                obj(),
                format!("{at}.match.headers[{i}].name"),
                format!("invalid header name {:?}", h.name),
            );
        }
        if let StringMatch::Regex(re) = &h.value
            && let Err(e) = regex::Regex::new(re)
        {
            err(
                obj(),
                format!("{at}.match.headers[{i}].value"),
                format!("invalid regex: {e}"),
            );
        }
    }
    for (i, q) in matcher.query_params.iter().enumerate() {
        if let StringMatch::Regex(re) = &q.value
            && let Err(e) = regex::Regex::new(re)
        {
            err(
                obj(),
                format!("{at}.match.queryParams[{i}].value"),
                format!("invalid regex: {e}"),
            );
        }
    }
}

fn check_action(
    action: &Action,
    clusters: &BTreeSet<&str>,
    obj: &impl Fn() -> String,
    at: &str,
    err: &mut impl FnMut(String, String, String),
) {
    match action {
        Action::Forward(backends) => {
            if backends.is_empty() {
                err(obj(), format!("{at}.action.forward"), "no backends".into());
            }
            for (i, b) in backends.iter().enumerate() {
                if b.weight > MAX_WEIGHT {
                    err(
                        obj(),
                        format!("{at}.action.forward[{i}].weight"),
                        format!("{} is above the maximum weight {MAX_WEIGHT}", b.weight),
                    );
                }
                if let Some(c) = &b.cluster
                    && !clusters.contains(c.as_str())
                {
                    err(
                        obj(),
                        format!("{at}.action.forward[{i}].cluster"),
                        format!("unknown cluster {c:?}"),
                    );
                }
                for (which, m) in b
                    .headers
                    .iter()
                    .flat_map(|h| [("request", &h.request), ("response", &h.response)])
                {
                    if let Some(msg) = header_modifier_problem(m) {
                        err(obj(), format!("{at}.action.forward[{i}].headers.{which}"), msg);
                    }
                }
            }
        }
        Action::Redirect(rd) => {
            if !matches!(rd.status, 301 | 302 | 303 | 307 | 308) {
                err(
                    obj(),
                    format!("{at}.action.redirect.status"),
                    format!("{} is not a redirect status", rd.status),
                );
            }
            if let Some(s) = &rd.scheme
                && s != "http"
                && s != "https"
            {
                err(
                    obj(),
                    format!("{at}.action.redirect.scheme"),
                    format!("{s:?} is not http or https"),
                );
            }
        }
    }
}

/// The fields that frame a message or manage its connection: the proxy writes them for each
/// hop (RFC 9110 §7.6.1, RFC 9112 §6), so a filter setting one would misframe the body.
const FRAMING: [&str; 8] = [
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

/// Why a header modifier cannot be applied: a name that is not a token, a value with CR, LF
/// or NUL (header injection), or a framing field set or added (removing one is harmless).
pub fn header_modifier_problem(m: &HeaderModifier) -> Option<String> {
    let names = m.set.iter().chain(&m.add).map(|(n, _)| n).chain(&m.remove);
    if let Some(n) = names.into_iter().find(|n| http_header_name_invalid(n)) {
        return Some(format!("invalid header name {n:?}"));
    }
    if let Some((n, _)) = m
        .set
        .iter()
        .chain(&m.add)
        .find(|(n, _)| FRAMING.iter().any(|f| n.eq_ignore_ascii_case(f)))
    {
        return Some(format!(
            "{n:?} frames the message or manages the connection: the proxy writes it for each hop, a filter may not set it"
        ));
    }
    m.set
        .iter()
        .chain(&m.add)
        .find(|(_, v)| v.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0))
        .map(|(n, _)| format!("value of {n:?} contains a control character"))
}

/// A route's CORS lists as header values: every method and header name a token (`*` is one),
/// and every origin regex one that compiles. (field, why) of the first that is not.
pub fn cors_problem(c: &crate::model::Cors) -> Option<(String, String)> {
    for (list, name) in [
        (&c.allow_methods, "allowMethods"),
        (&c.allow_headers, "allowHeaders"),
        (&c.expose_headers, "exposeHeaders"),
    ] {
        if let Some((i, bad)) = list.iter().enumerate().find(|(_, v)| http_header_name_invalid(v)) {
            return Some((format!("{name}[{i}]"), format!("{bad:?} is not a token")));
        }
    }
    c.allow_origins.iter().enumerate().find_map(|(i, o)| match o {
        crate::model::StringMatch::Regex(r) => regex::Regex::new(r)
            .err()
            .map(|e| (format!("allowOrigins[{i}]"), e.to_string())),
        crate::model::StringMatch::Exact(_) => None,
    })
}

/// A name a server certificate can be checked against: an IP address, or a DNS name
/// (letters, digits, `-`, `.`, and a leading `*.`).
fn san_checkable(name: &str) -> bool {
    if name.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    let host = name.strip_prefix("*.").unwrap_or(name);
    !host.is_empty()
        && host.len() <= 253
        && host
            .split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
}

/// A URI as a certificate names one: `scheme://…`, printable ASCII without spaces (RFC 3986's
/// scheme: a letter, then letters, digits, `+`, `-`, `.`).
pub fn is_uri(name: &str) -> bool {
    let Some((scheme, rest)) = name.split_once("://") else {
        return false;
    };
    let mut chars = scheme.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        && !rest.is_empty()
        && name.len() <= 2048
        && name.bytes().all(|b| b.is_ascii_graphic())
}

/// RFC 9110 token characters.
/// Slow start scales a balancer's picks by weight: a hash ring maps each key to its endpoint.
fn slow_start(s: &crate::model::SlowStart, lb: &LbPolicy, err: &mut impl FnMut(String, String)) {
    if !(1..=86_400_000).contains(&s.window_ms) {
        err("slowStart.windowMs".into(), "1 ms to 24 h".into());
    }
    if !(s.aggression.is_finite() && s.aggression > 0.0) {
        err("slowStart.aggression".into(), "a number above 0".into());
    }
    if !(0.0..=100.0).contains(&s.min_weight_percent) {
        err("slowStart.minWeightPercent".into(), "0 to 100".into());
    }
    if matches!(lb, LbPolicy::ConsistentHash(_)) {
        err(
            "slowStart".into(),
            "applies to RoundRobin, LeastRequest and Random, not to ConsistentHash".into(),
        );
    }
}

pub fn http_header_name_invalid(name: &str) -> bool {
    name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Reports each condition of a retry policy no proxy knows, as `retry.on[i]`.
pub(crate) fn retry_conditions(r: &RetryPolicy, err: &mut dyn FnMut(String, String)) {
    for (i, code) in r.grpc_on.iter().enumerate() {
        if *code > 16 {
            err(format!("retry.grpcOn[{i}]"), "a gRPC status code, 0-16".into());
        }
    }
    for (i, on) in r.on.iter().enumerate() {
        let known = matches!(on.as_str(), "connect-failure" | "reset" | "5xx" | "gateway-error")
            || on.parse::<u16>().is_ok_and(|s| (100..=599).contains(&s));
        if !known {
            err(
                format!("retry.on[{i}]"),
                format!("unknown retry condition {on:?} (connect-failure, reset, 5xx, gateway-error or a status code)"),
            );
        }
    }
}

/// Whether `name` is a DNS name (RFC 1123 labels, at most 253 characters, an optional final
/// dot): what a proxy may hand the resolver.
pub fn is_dns_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            (1..=63).contains(&l.len())
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn route(path: PathMatch, action: Action) -> Route {
        Route {
            matcher: RouteMatch {
                path,
                ..Default::default()
            },
            action,
            ..Route::forward("r".into(), Vec::new())
        }
    }

    fn snap(routes: Vec<Route>, clusters: Vec<Cluster>) -> Snapshot {
        Snapshot::new(
            1,
            vec![Listener {
                name: "l".into(),
                address: "0.0.0.0".into(),
                port: 8080,
                protocol: Protocol::Http,
                certificates: vec![],
                virtual_hosts: vec![Arc::new(VirtualHost {
                    hostname: "*".into(),
                    routes: routes.into_iter().map(Arc::new).collect(),
                })],
                gateways: vec![],
                gateway_hosts: vec![],
                access_log: false,
                client_address: Default::default(),
            }],
            clusters.into_iter().map(Arc::new).collect(),
        )
    }

    fn fwd(c: &str) -> Action {
        Action::Forward(vec![WeightedCluster {
            cluster: Some(c.into()),
            weight: 1,
            headers: None,
        }])
    }

    #[test]
    fn accepts_a_consistent_snapshot() {
        let s = snap(
            vec![route(PathMatch::Prefix("/".into()), fwd("c"))],
            vec![Cluster::new("c", vec![Endpoint::new("127.0.0.1", 80)])],
        );
        validate(&s).unwrap();
    }

    #[test]
    fn names_every_bad_field() {
        let s = snap(
            vec![
                route(PathMatch::Regex("(".into()), fwd("missing")),
                route(PathMatch::Exact("/x".into()), fwd("c")),
            ],
            vec![Cluster::new("c", vec![Endpoint::new("127.0.0.1", 0)])],
        );
        let errs = validate(&s).unwrap_err();
        let text: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert!(text.iter().any(|e| e.contains("endpoints[0].port")), "{text:?}");
        assert!(
            text.iter()
                .any(|e| e.contains("routes[0].match.path.regex") && e.contains("invalid regex")),
            "{text:?}"
        );
        assert!(
            text.iter().any(|e| e.contains("unknown cluster \"missing\"")),
            "{text:?}"
        );
        assert_eq!(errs.len(), 3, "{text:?}");
    }

    /// `s` is refused, with an error naming each of `fields`; the errors.
    fn assert_refused(s: &Snapshot, fields: &[&str]) -> Vec<String> {
        let text: Vec<String> = validate(s).unwrap_err().iter().map(ToString::to_string).collect();
        for field in fields {
            assert!(text.iter().any(|e| e.contains(field)), "{field}: {text:?}");
        }
        text
    }

    #[test]
    fn slow_start_is_bounded_and_not_for_a_hash_ring() {
        let mut c = Cluster::new("c", vec![Endpoint::new("127.0.0.1", 80)]);
        c.lb = LbPolicy::ConsistentHash(HashOn::ClientIp);
        c.slow_start = Some(crate::model::SlowStart {
            window_ms: 0,
            aggression: -1.0,
            min_weight_percent: 101.0,
        });
        c.panic_threshold_percent = 101;
        assert_refused(
            &snap(vec![route(PathMatch::Prefix("/".into()), fwd("c"))], vec![c]),
            &[
                "panicThresholdPercent",
                "slowStart.windowMs",
                "slowStart.aggression",
                "slowStart.minWeightPercent",
                "not to ConsistentHash",
            ],
        );
    }

    #[test]
    fn a_warming_endpoints_share_grows_as_envoy_scales_it() {
        let mut s = crate::model::SlowStart::new(10_000);
        assert_eq!(s.factor(0), 0.1, "the 10 % floor");
        assert_eq!(s.factor(5_000), 0.5, "linear");
        assert_eq!(s.factor(10_000), 1.0);
        assert_eq!(s.factor(60_000), 1.0);
        s.aggression = 2.0;
        assert!((s.factor(2_500) - 0.5).abs() < 1e-9, "faster early: 0.25 ^ (1/2)");
        s.min_weight_percent = 0.0;
        assert!(s.factor(0) > 0.0, "never nothing");
    }

    #[test]
    fn keepalive_is_what_the_kernel_takes() {
        let mut c = Cluster::new("c", vec![Endpoint::new("127.0.0.1", 80)]);
        c.tcp_keepalive = Some(TcpKeepalive {
            time_ms: Some(500),
            interval_ms: Some(40_000_000),
            probes: Some(0),
        });
        assert_refused(
            &snap(vec![route(PathMatch::Prefix("/".into()), fwd("c"))], vec![c]),
            &["tcpKeepalive.timeMs", "tcpKeepalive.intervalMs", "tcpKeepalive.probes"],
        );
    }

    #[test]
    fn weights_are_bounded() {
        let mut r = route(PathMatch::Prefix("/".into()), fwd("c"));
        r.action = Action::Forward(vec![WeightedCluster {
            cluster: Some("c".into()),
            weight: MAX_WEIGHT + 1,
            headers: None,
        }]);
        let mut ep = Endpoint::new("127.0.0.1", 80);
        ep.weight = u32::MAX;
        let errs = validate(&snap(vec![r], vec![Cluster::new("c", vec![ep])])).unwrap_err();
        let text: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert!(text.iter().any(|e| e.contains("forward[0].weight")), "{text:?}");
        assert!(text.iter().any(|e| e.contains("endpoints[0].weight")), "{text:?}");
        // All-zero weights are valid: such a rule answers 500 at run time.
        let mut r = route(PathMatch::Prefix("/".into()), fwd("c"));
        r.action = Action::Forward(vec![WeightedCluster {
            cluster: Some("c".into()),
            weight: 0,
            headers: None,
        }]);
        validate(&snap(vec![r], vec![Cluster::new("c", vec![])])).unwrap();
    }

    /// Whatever the source, a route's faults and retries are bounded: no status outside
    /// 200-599, no share above all requests, no delay over an hour, no unknown retry condition.
    #[test]
    fn route_faults_and_retries_are_bounded() {
        let mut r = route(PathMatch::Prefix("/".into()), fwd("c"));
        r.fault = Some(Fault {
            delay: Some(FaultDelay {
                ms: MAX_FAULT_DELAY_MS + 1,
                per_million: 1_000_001,
            }),
            abort: Some(FaultAbort {
                status: 700,
                per_million: 5,
                grpc_status: Some(17),
            }),
        });
        r.retry = Some(RetryPolicy {
            on: vec!["sometimes".into()],
            ..RetryPolicy::default()
        });
        let c = Cluster::new("c", vec![Endpoint::new("127.0.0.1", 80)]);
        let text = assert_refused(
            &snap(vec![r], vec![c]),
            &[
                "fault.delay.ms",
                "fault.delay.perMillion",
                "fault.abort.status",
                "fault.abort.grpcStatus",
                "retry.on[0]",
            ],
        );
        assert!(!text.iter().any(|e| e.contains("abort.perMillion")), "{text:?}");
    }

    #[test]
    fn prefix_rewrite_needs_prefix_match() {
        let mut r = route(PathMatch::Exact("/a".into()), fwd("c"));
        r.rewrite = Some(Rewrite {
            hostname: None,
            path: Some(PathRewrite::Prefix("/b".into())),
        });
        let s = snap(vec![r], vec![Cluster::new("c", vec![])]);
        let errs = validate(&s).unwrap_err();
        assert!(errs[0].message.contains("PathPrefix"));
    }

    #[test]
    fn a_filter_may_remove_but_not_set_a_framing_field() {
        let m = |set: &[(&str, &str)], add: &[(&str, &str)], remove: &[&str]| HeaderModifier {
            set: set.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect(),
            add: add.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect(),
            remove: remove.iter().map(|n| n.to_string()).collect(),
        };
        let why = header_modifier_problem(&m(&[("Content-Length", "5")], &[], &[])).expect("refused");
        assert!(why.contains("\"Content-Length\""), "{why}");
        for name in ["transfer-encoding", "Connection", "upgrade", "TE"] {
            assert!(
                header_modifier_problem(&m(&[], &[(name, "x")], &[])).is_some(),
                "{name}"
            );
        }
        let fine = m(
            &[("x-content-length", "5")],
            &[("x-te", "1")],
            &["connection", "content-length"],
        );
        assert_eq!(header_modifier_problem(&fine), None);
    }

    #[test]
    fn hash_tracks_content_not_version() {
        let a = snap(vec![], vec![]);
        let mut b = a.clone();
        b.version = 7;
        assert_eq!(a.content_hash(), b.content_hash());
        b.clusters.push(Arc::new(Cluster::new("c", vec![])));
        assert_ne!(a.content_hash(), b.content_hash());
    }
}
