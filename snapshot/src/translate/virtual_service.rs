//! Istio VirtualServices → mesh routes: the `http` routes of a VirtualService whose `hosts`
//! name Services become those Services' route tables in the sidecars (like a GAMMA producer
//! route, or a consumer route with `exportTo: ["."]`), in the order written — the first route
//! that matches wins, as in Istio. Destinations are Services (port: the one asked, or the one
//! named); a destination that does not resolve gets its share of requests answered 500. A
//! `subset` is the DestinationRule subset's cluster: the Service's pods with its labels. Its
//! `tcp` routes give each Service port one L4 route (the first whose `port` match holds): the
//! connections the sidecar does not route as HTTP go to a weighted pick of its destinations. A
//! VirtualService with a field Ferrum does not apply (TLS routes, Istio Gateways, …) is left
//! out whole, its status naming the field.

use std::sync::Arc;

use crate::istio::{VirtualService, VsHeaderOps, VsHeaders, VsHttpRoute, VsMatch, VsStringMatch, VsTcpRoute};
use crate::mesh::{MeshService, Resolution};
use crate::model::Digest;
use crate::model::{
    Action, BackendHeaders, Cors, DirectResponse, Fault, FaultAbort, FaultDelay, HeaderModifier, KeyMatch, Mirror,
    PathMatch, PathRewrite, Redirect, RetryPolicy, Rewrite, Route, RouteMatch, RouteTimeouts, SourceMatch, StringMatch,
    WeightedCluster,
};
use crate::resources::{ObjectRef, Resources};

use super::backends::{BackendRef, Clusters};
use super::destination_rule::service_of;
use super::gamma::MeshTarget;
use super::{Problems, Reason, meta_ref};

/// The routes one VirtualService gives one Service port.
pub(crate) struct VsTable {
    pub target: MeshTarget,
    pub routes: Vec<Arc<Route>>,
    /// Its L4 routes there, in order (a client follows the first whose source it is).
    pub tcp: Vec<Arc<Route>>,
    pub owner: ObjectRef,
    /// Its `spec.hosts` index, for a conflict's field.
    pub host: usize,
    /// Creation time, then namespace and name: the older VirtualService keeps a Service port.
    pub rank: (String, String, String),
}

/// A field and why the VirtualService cannot be applied.
type Refusal = (String, Reason, String);

fn invalid(field: impl Into<String>, why: impl Into<String>) -> Refusal {
    (field.into(), Reason::Invalid, why.into())
}

fn unsupported(field: impl Into<String>, why: impl Into<String>) -> Refusal {
    (field.into(), Reason::UnsupportedValue, why.into())
}

/// One `http` route, read: its matches (each with the port it is limited to) and what it does.
struct Rule {
    matches: Vec<(RouteMatch, Option<u16>)>,
    request: HeaderModifier,
    response: HeaderModifier,
    /// Per match (a prefix rewrite depends on the match).
    rewrites: Vec<Option<Rewrite>>,
    redirect: Option<Redirect>,
    timeouts: RouteTimeouts,
    retry: Option<RetryPolicy>,
    fault: Option<Fault>,
    cors: Option<Cors>,
    /// Where copies go (a destination of weight 0 is not sent to), each with the share copied
    /// and its field.
    mirrors: Vec<(Destination, u32, String)>,
    destinations: Vec<Destination>,
    direct: Option<DirectResponse>,
}

/// One `tcp` route, read: its matches (each with the port it is limited to and the clients it
/// is for) and where it sends.
struct TcpRule {
    matches: Vec<(Option<u16>, Option<SourceMatch>)>,
    destinations: Vec<Destination>,
}

/// Every route of a VirtualService, and the delegations it could not follow.
struct Rules {
    http: Vec<Rule>,
    tcp: Vec<TcpRule>,
    unfollowed: Vec<Refusal>,
}

/// A Service (a subset of it, with a DestinationRule) or a ServiceEntry host, and its weight.
struct Destination {
    /// As written, lower-cased: a ServiceEntry host when an entry has it.
    host: String,
    /// The Service the host names otherwise, (namespace, name).
    service: Option<(String, String)>,
    port: Option<u16>,
    subset: Option<String>,
    weight: u32,
    /// Its own header edits (with several destinations).
    headers: Option<Box<BackendHeaders>>,
}

/// What hosts name: the cluster's Services and the ServiceEntries' hosts.
struct Registry<'r> {
    res: &'r Resources,
    entries: &'r [(Arc<MeshService>, Digest)],
}

impl Registry<'_> {
    /// The entries with `host` (each entry's service for it), in key order.
    fn entries(&self, host: &str) -> impl Iterator<Item = &MeshService> {
        let host = host.to_ascii_lowercase();
        self.entries
            .iter()
            .map(|(s, _)| &**s)
            .filter(move |s| s.hostname == host)
    }
}

pub(crate) fn translate(
    res: &Resources,
    entries: &[(Arc<MeshService>, Digest)],
    clusters: &mut Clusters<'_>,
    problems: &mut Problems<'_>,
) -> Vec<VsTable> {
    let mut out = Vec::new();
    let reg = Registry { res, entries };
    clusters.waive_grants(true);
    for vs in &res.virtual_services {
        // A delegate: applied only through the routes that name it.
        if vs.spec.hosts.is_empty() {
            continue;
        }
        let obj = meta_ref("VirtualService", &vs.metadata);
        match rules(vs, &res.virtual_services) {
            Ok(rules) => {
                for (field, reason, why) in &rules.unfollowed {
                    problems.push(&obj, field.clone(), *reason, why.clone());
                }
                out.extend(tables(vs, &rules, &reg, clusters, problems, &obj));
            }
            Err((field, reason, why)) => problems.push(&obj, field, reason, why),
        }
    }
    clusters.waive_grants(false);
    out
}

fn namespace(vs: &VirtualService) -> &str {
    vs.metadata.namespace.as_deref().unwrap_or("default")
}

/// Every route of `vs` (delegations expanded from `all`), or the field that keeps it out.
fn rules(vs: &VirtualService, all: &[Arc<VirtualService>]) -> Result<Rules, Refusal> {
    let spec = &vs.spec;
    if let Some(f) = spec.other.keys().next() {
        return Err(unsupported(format!("spec.{f}"), "not supported: only http routes are"));
    }
    if let Some((i, g)) = spec.gateways.iter().enumerate().find(|(_, g)| *g != "mesh") {
        return Err(unsupported(
            format!("spec.gateways[{i}]"),
            format!("{g:?}: Istio Gateways are not read; route Gateways with HTTPRoutes"),
        ));
    }
    if spec.hosts.is_empty() {
        return Err(invalid("spec.hosts", "at least one host"));
    }
    if spec.http.is_empty() && spec.tcp.is_empty() {
        return Err(invalid("spec.http", "at least one http or tcp route"));
    }
    let ns = namespace(vs);
    let (expanded, unfollowed) = super::delegate::expand(vs, ns, all)?;
    Ok(Rules {
        unfollowed,
        http: expanded
            .iter()
            .map(|e| rule(&e.route, e.namespace, &e.at))
            .collect::<Result<_, _>>()?,
        tcp: spec
            .tcp
            .iter()
            .enumerate()
            .map(|(i, t)| tcp_rule(t, ns, &format!("spec.tcp[{i}]")))
            .collect::<Result<_, _>>()?,
    })
}

fn tcp_rule(t: &VsTcpRoute, ns: &str, at: &str) -> Result<TcpRule, Refusal> {
    if let Some(f) = t.other.keys().next() {
        return Err(unsupported(format!("{at}.{f}"), "not supported"));
    }
    let destinations = weighted(&t.route, ns, at, false)?;
    if destinations.is_empty() {
        return Err(invalid(format!("{at}.route"), "a tcp route needs destinations"));
    }
    let mut matches = Vec::new();
    for (j, m) in t.matches.iter().enumerate() {
        let at = format!("{at}.match[{j}]");
        if let Some(f) = m.other.keys().next() {
            return Err(unsupported(
                format!("{at}.{f}"),
                "not supported: a tcp route matches the port and the calling workload",
            ));
        }
        let port = m.port.map(|n| port(n, &format!("{at}.port"))).transpose()?;
        matches.push((port, source(&m.source_labels, &m.source_namespace)));
    }
    if matches.is_empty() {
        matches.push((None, None));
    }
    Ok(TcpRule { matches, destinations })
}

fn rule(h: &VsHttpRoute, ns: &str, at: &str) -> Result<Rule, Refusal> {
    if let Some(f) = h.other.keys().next() {
        return Err(unsupported(format!("{at}.{f}"), "not supported"));
    }
    let mut matches = Vec::new();
    for (j, m) in h.matches.iter().enumerate() {
        matches.push(route_match(m, &format!("{at}.match[{j}]"))?);
    }
    if matches.is_empty() {
        matches.push((RouteMatch::default(), None));
    }
    let (destinations, request, response) = destinations(h, ns, at)?;
    let redirect = h
        .redirect
        .as_ref()
        .map(|r| redirect(r, &format!("{at}.redirect")))
        .transpose()?;
    let direct = h
        .direct_response
        .as_ref()
        .map(|d| direct_response(d, &format!("{at}.directResponse")))
        .transpose()?;
    one_action(h, redirect.is_some(), direct.is_some(), destinations.is_empty(), at)?;
    let rewrites = matches
        .iter()
        .map(|(m, _)| rewrite(h, &m.path, &format!("{at}.rewrite")))
        .collect::<Result<_, _>>()?;
    // `0s` disables it, as Istio's default does.
    let request_ms = h
        .timeout
        .as_deref()
        .map(|t| super::istio_duration_ms(t).map_err(|e| invalid(format!("{at}.timeout"), e)))
        .transpose()?
        .filter(|ms| *ms > 0);
    // Without `retries`, Istio's default policy: a VirtualService's routes retry unless told not to.
    let (retry, backend_request_ms) = retries(&h.retries.clone().unwrap_or_default(), &format!("{at}.retries"))?;
    let rule = Rule {
        fault: h.fault.as_ref().map(|f| fault(f, &format!("{at}.fault"))).transpose()?,
        cors: h
            .cors_policy
            .as_ref()
            .map(|c| super::cors::of_policy(c, &format!("{at}.corsPolicy")))
            .transpose()
            .map_err(|(field, why)| invalid(field, why))?,
        mirrors: mirrors(h, ns, at)?,
        matches,
        request,
        response,
        rewrites,
        redirect,
        // Istio has no per-try limit but `perTryTimeout`: the cluster's read timeout is not one.
        timeouts: RouteTimeouts {
            request_ms,
            backend_request_ms,
            unbounded: true,
        },
        retry,
        destinations,
        direct,
    };
    check_shape(&rule, at)?;
    Ok(rule)
}

/// A route has one of destinations, a redirect or a direct response; only a forwarding one
/// rewrites.
fn one_action(h: &VsHttpRoute, redirect: bool, direct: bool, no_destinations: bool, at: &str) -> Result<(), Refusal> {
    match (redirect, direct, no_destinations) {
        (false, false, true) => {
            return Err(invalid(
                format!("{at}.route"),
                "a route needs destinations, a redirect or a directResponse",
            ));
        }
        (true, true, _) | (true, _, false) | (_, true, false) => {
            let field = if redirect { "redirect" } else { "directResponse" };
            return Err(invalid(
                format!("{at}.{field}"),
                "a route has one of destinations, a redirect or a directResponse",
            ));
        }
        _ => {}
    }
    if (redirect || direct) && h.rewrite.is_some() {
        return Err(invalid(format!("{at}.rewrite"), "only a forwarding route rewrites"));
    }
    Ok(())
}

/// The route each match of `rule` makes passes the checks every snapshot's routes get.
fn check_shape(rule: &Rule, at: &str) -> Result<(), Refusal> {
    for (j, (matcher, _)) in rule.matches.iter().enumerate() {
        let probe = route_of(rule, j, matcher, String::new(), Action::Forward(Vec::new()));
        if let Some((field, why)) = crate::validate::route_shape_problem(&probe, at) {
            return Err(invalid(field, why));
        }
    }
    Ok(())
}

/// A route's weighted destinations, and its header edits with the destination's own (allowed
/// when there is one destination).
fn destinations(
    h: &VsHttpRoute,
    ns: &str,
    at: &str,
) -> Result<(Vec<Destination>, HeaderModifier, HeaderModifier), Refusal> {
    let (mut request, mut response) = header_edits(h.headers.as_ref());
    let mut out = weighted(&h.route, ns, at, true)?;
    let several = out.len() > 1;
    for (dest, d) in out.iter_mut().zip(&h.route) {
        if let Some(hd) = &d.headers {
            let (req, resp) = header_edits(Some(hd));
            if several {
                // That destination's own, as a backendRef's filters.
                dest.headers = Some(Box::new(BackendHeaders {
                    request: req,
                    response: resp,
                }));
            } else {
                request = merged(request, req);
                response = merged(response, resp);
            }
        }
    }
    Ok((out, request, response))
}

/// A route's destinations with their weights (each weighed when there are several); `headers`
/// says whether they may carry header edits (HTTP routes), read by the caller.
fn weighted(
    route: &[crate::istio::VsRouteDestination],
    ns: &str,
    at: &str,
    headers: bool,
) -> Result<Vec<Destination>, Refusal> {
    let several = route.len() > 1;
    let mut out = Vec::with_capacity(route.len());
    for (j, d) in route.iter().enumerate() {
        let at = format!("{at}.route[{j}]");
        if let Some(f) = d.other.keys().next() {
            return Err(unsupported(format!("{at}.{f}"), "not supported"));
        }
        if !headers && d.headers.is_some() {
            return Err(unsupported(format!("{at}.headers"), "a tcp route carries no headers"));
        }
        let weight = match (d.weight, several) {
            (None, false) => 1,
            (None, true) => {
                return Err(invalid(
                    format!("{at}.weight"),
                    "a route with several destinations weighs each",
                ));
            }
            (Some(w), _) => u32::try_from(w).map_err(|_| invalid(format!("{at}.weight"), "weights are 0 or more"))?,
        };
        out.push(destination(&d.destination, ns, &format!("{at}.destination"), weight)?);
    }
    Ok(out)
}

/// A route's mirrors (`mirror`, or `mirrors`), each with the share of its requests copied (all
/// when no percentage is given) and the field that names it.
fn mirrors(h: &VsHttpRoute, ns: &str, at: &str) -> Result<Vec<(Destination, u32, String)>, Refusal> {
    let share = |p: Option<&crate::istio::VsPercent>, field: String| match p {
        None => Ok(1_000_000),
        Some(p) => per_million(Some(p), None, &field),
    };
    if let Some(m) = &h.mirror {
        if !h.mirrors.is_empty() {
            return Err(invalid(format!("{at}.mirrors"), "not with mirror: one or the other"));
        }
        let field = format!("{at}.mirror");
        let share = share(h.mirror_percentage.as_ref(), format!("{at}.mirrorPercentage"))?;
        return Ok(vec![(destination(m, ns, &field, 0)?, share, field)]);
    }
    let mut out = Vec::new();
    for (k, m) in h.mirrors.iter().enumerate() {
        let at = format!("{at}.mirrors[{k}]");
        if let Some(f) = m.other.keys().next() {
            return Err(unsupported(format!("{at}.{f}"), "not supported"));
        }
        let share = share(m.percentage.as_ref(), format!("{at}.percentage"))?;
        let field = format!("{at}.destination");
        out.push((destination(&m.destination, ns, &field, 0)?, share, field));
    }
    Ok(out)
}

/// A destination: a Service (a subset of it) in the cluster, and its weight.
fn destination(d: &crate::istio::VsDestination, ns: &str, at: &str, weight: u32) -> Result<Destination, Refusal> {
    if let Some(f) = d.other.keys().next() {
        return Err(unsupported(format!("{at}.{f}"), "not supported"));
    }
    if d.host.contains('*') {
        return Err(unsupported(
            format!("{at}.host"),
            format!("{:?}: a destination is one host, not a wildcard", d.host),
        ));
    }
    let port = match &d.port {
        None => None,
        Some(p) => Some(port(p.number, &format!("{at}.port.number"))?),
    };
    Ok(Destination {
        host: d.host.to_ascii_lowercase(),
        service: service_of(&d.host, ns).map(|(sns, name)| (sns.to_string(), name.to_string())),
        port,
        subset: d.subset.clone(),
        weight,
        headers: None,
    })
}

fn port(n: u32, field: &str) -> Result<u16, Refusal> {
    u16::try_from(n)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| invalid(field, "ports are 1-65535"))
}

/// A route's retries (their `on` list in Ferrum's names, gRPC conditions as status codes) and
/// per-try timeout. Istio's default conditions are
/// `connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes` with 503.
fn retries(r: &crate::istio::VsRetries, at: &str) -> Result<(Option<RetryPolicy>, Option<u64>), Refusal> {
    if let Some(f) = r.other.keys().next() {
        return Err(unsupported(format!("{at}.{f}"), "not supported"));
    }
    let attempts =
        u32::try_from(r.attempts.unwrap_or(2)).map_err(|_| invalid(format!("{at}.attempts"), "0 or more"))?;
    let mut on = Vec::new();
    let mut grpc_on = Vec::new();
    let conditions = r
        .retry_on
        .as_deref()
        .unwrap_or("connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes,503");
    for c in conditions.split(',').map(str::trim).filter(|c| !c.is_empty()) {
        if let Some(code) = crate::model::grpc_retry_code(c) {
            grpc_on.push(code);
            continue;
        }
        let ferrum = match c {
            "5xx" | "gateway-error" | "connect-failure" | "reset" => c,
            "refused-stream" => "reset",
            // Envoy's only retriable 4xx.
            "retriable-4xx" => "409",
            // The codes are listed beside it.
            "retriable-status-codes" => continue,
            code if code.parse::<u16>().is_ok_and(|s| (100..=599).contains(&s)) => code,
            other => {
                return Err(unsupported(
                    format!("{at}.retryOn"),
                    format!(
                        "{other:?}: 5xx, gateway-error, connect-failure, reset, refused-stream, retriable-4xx, \
                         status codes and the gRPC conditions (cancelled, deadline-exceeded, internal, \
                         resource-exhausted, unavailable) are"
                    ),
                ));
            }
        };
        if !on.iter().any(|x| x == ferrum) {
            on.push(ferrum.to_string());
        }
    }
    let per_try = r
        .per_try_timeout
        .as_deref()
        .map(|t| super::istio_duration_ms(t).map_err(|e| invalid(format!("{at}.perTryTimeout"), e)))
        .transpose()?
        .filter(|ms| *ms > 0);
    grpc_on.sort_unstable();
    grpc_on.dedup();
    if r.retry_ignore_previous_hosts == Some(false) {
        return Err(unsupported(
            format!("{at}.retryIgnorePreviousHosts"),
            "false: ferrum-dp retries on another endpoint whenever there is one",
        ));
    }
    let d = RetryPolicy::default();
    let backoff_base_ms = match r.backoff.as_deref() {
        Some(b) => super::istio_duration_ms(b).map_err(|e| invalid(format!("{at}.backoff"), e))?,
        None => d.backoff_base_ms,
    };
    let policy = RetryPolicy {
        attempts,
        on,
        grpc_on,
        backoff_base_ms,
        ..d
    };
    Ok((Some(policy), per_try))
}

/// Istio's retry policy for a route that sets none: 2 attempts on `connect-failure`,
/// `refused-stream`, `unavailable`, `cancelled` and 503.
pub(crate) fn istio_default_retry() -> RetryPolicy {
    let (policy, _) = retries(&Default::default(), "").expect("the defaults are valid");
    policy.expect("the defaults retry")
}

/// A share in percent as per million (Istio's fractions of a percent kept to four places); an
/// absent share injects nothing, as in Istio (Envoy's default percentage is 0).
fn per_million(p: Option<&crate::istio::VsPercent>, whole: Option<i64>, field: &str) -> Result<u32, Refusal> {
    let percent = match (p, whole) {
        (Some(p), _) => p.value,
        (None, Some(w)) => w as f64,
        (None, None) => 0.0,
    };
    if !(0.0..=100.0).contains(&percent) {
        return Err(invalid(field, format!("{percent} is not a percentage (0-100)")));
    }
    Ok((percent * 10_000.0).round() as u32)
}

fn fault(f: &crate::istio::VsFault, at: &str) -> Result<Fault, Refusal> {
    let mut out = Fault::default();
    if let Some(d) = &f.delay {
        if let Some(k) = d.other.keys().next() {
            return Err(unsupported(format!("{at}.delay.{k}"), "only fixedDelay is supported"));
        }
        let fixed = d
            .fixed_delay
            .as_deref()
            .ok_or_else(|| invalid(format!("{at}.delay.fixedDelay"), "a delay needs fixedDelay"))?;
        out.delay = Some(FaultDelay {
            ms: super::istio_duration_ms(fixed).map_err(|e| invalid(format!("{at}.delay.fixedDelay"), e))?,
            per_million: per_million(d.percentage.as_ref(), d.percent, &format!("{at}.delay.percentage"))?,
        });
    }
    if let Some(a) = &f.abort {
        if let Some(k) = a.other.keys().next() {
            return Err(unsupported(
                format!("{at}.abort.{k}"),
                "only httpStatus and grpcStatus are supported",
            ));
        }
        let (status, grpc_status) = match (a.http_status, &a.grpc_status) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    format!("{at}.abort.grpcStatus"),
                    "not with httpStatus: one or the other",
                ));
            }
            (None, Some(name)) => {
                let code = grpc_code(name).ok_or_else(|| {
                    invalid(
                        format!("{at}.abort.grpcStatus"),
                        format!("{name:?} is not a gRPC status (OK … UNAUTHENTICATED, or 0-16)"),
                    )
                })?;
                (http_of_grpc(code), Some(code))
            }
            (status, None) => {
                let status = status
                    .and_then(|s| u16::try_from(s).ok())
                    .filter(|s| (200..=599).contains(s))
                    .ok_or_else(|| {
                        invalid(
                            format!("{at}.abort.httpStatus"),
                            "an abort needs an httpStatus of 200-599 or a grpcStatus",
                        )
                    })?;
                (status, None)
            }
        };
        out.abort = Some(FaultAbort {
            status,
            grpc_status,
            per_million: per_million(a.percentage.as_ref(), None, &format!("{at}.abort.percentage"))?,
        });
    }
    Ok(out)
}

/// The gRPC status codes by name, in code order.
const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// A gRPC status, by name or number.
fn grpc_code(s: &str) -> Option<u8> {
    let s = s.trim();
    let code = match s.parse::<u8>() {
        Ok(n) => n,
        Err(_) => GRPC_CODES.iter().position(|c| c.eq_ignore_ascii_case(s))? as u8,
    };
    (usize::from(code) < GRPC_CODES.len()).then_some(code)
}

/// The HTTP status a gRPC client reads as `code` (the gRPC spec's HTTP-to-gRPC mapping, turned
/// around): what a proxy that cannot answer in gRPC answers instead.
fn http_of_grpc(code: u8) -> u16 {
    match code {
        16 => 401,
        7 => 403,
        12 => 404,
        14 | 8 => 503,
        4 => 504,
        _ => 500,
    }
}

/// A match's one string condition as Ferrum's: exact, or an anchored regex (prefixes too).
fn string_match(m: &VsStringMatch, field: &str) -> Result<StringMatch, Refusal> {
    if let Some(f) = m.other.keys().next() {
        return Err(unsupported(format!("{field}.{f}"), "not supported"));
    }
    let out = match (&m.exact, &m.prefix, &m.regex) {
        (Some(v), None, None) => StringMatch::Exact(v.clone()),
        (None, Some(p), None) => StringMatch::Regex(format!("{}.*", regex::escape(p))),
        (None, None, Some(re)) => StringMatch::Regex(re.clone()),
        // `{}`: present, with any value.
        (None, None, None) => StringMatch::Regex(".*".into()),
        _ => return Err(invalid(field, "one of exact, prefix or regex")),
    };
    if let StringMatch::Regex(re) = &out
        && let Err(e) = regex::Regex::new(re)
    {
        return Err(invalid(field, format!("invalid regex: {e}")));
    }
    Ok(out)
}

fn route_match(m: &VsMatch, at: &str) -> Result<(RouteMatch, Option<u16>), Refusal> {
    if let Some(f) = m.other.keys().next() {
        return Err(unsupported(format!("{at}.{f}"), "not supported"));
    }
    let path = match &m.uri {
        None => PathMatch::default(),
        Some(u) => match (string_match(u, &format!("{at}.uri"))?, &u.prefix) {
            (_, Some(p)) if p == "/" => PathMatch::Prefix("/".into()),
            // Without regard to case: the same path as a case-insensitive regex (the router's
            // exact index compares bytes; a prefix is a regex already).
            (StringMatch::Exact(p), _) if m.ignore_uri_case => PathMatch::Regex(format!("(?i){}", regex::escape(&p))),
            (StringMatch::Regex(re), _) if m.ignore_uri_case => PathMatch::Regex(format!("(?i){re}")),
            (StringMatch::Exact(p), _) => PathMatch::Exact(p),
            (StringMatch::Regex(re), _) => PathMatch::Regex(re),
        },
    };
    let method = match &m.method {
        None => None,
        Some(v) => match (&v.exact, string_match(v, &format!("{at}.method"))?) {
            (Some(e), _) => Some(e.clone()),
            _ => return Err(unsupported(format!("{at}.method"), "methods match exactly")),
        },
    };
    let keyed = |map: &std::collections::BTreeMap<String, VsStringMatch>, what: &str, lower: bool| {
        map.iter()
            .map(|(k, v)| {
                Ok(KeyMatch {
                    name: if lower { k.to_ascii_lowercase() } else { k.clone() },
                    value: string_match(v, &format!("{at}.{what}.{k}"))?,
                })
            })
            .collect::<Result<Vec<_>, Refusal>>()
    };
    let matcher = RouteMatch {
        path,
        method,
        headers: keyed(&m.headers, "headers", true)?,
        query_params: keyed(&m.query_params, "queryParams", false)?,
        source: source(&m.source_labels, &m.source_namespace),
    };
    let port = m.port.map(|p| port(p, &format!("{at}.port"))).transpose()?;
    Ok((matcher, port))
}

/// A match's condition on the calling workload, if it has one.
fn source(labels: &std::collections::BTreeMap<String, String>, namespace: &Option<String>) -> Option<SourceMatch> {
    (!labels.is_empty() || namespace.is_some()).then(|| SourceMatch {
        labels: labels.clone(),
        namespace: namespace.clone(),
    })
}

fn header_ops(ops: Option<&VsHeaderOps>) -> HeaderModifier {
    let Some(o) = ops else { return HeaderModifier::default() };
    let pairs = |m: &std::collections::BTreeMap<String, String>| {
        m.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.clone())).collect()
    };
    HeaderModifier {
        set: pairs(&o.set),
        add: pairs(&o.add),
        remove: o.remove.iter().map(|h| h.to_ascii_lowercase()).collect(),
    }
}

fn header_edits(h: Option<&VsHeaders>) -> (HeaderModifier, HeaderModifier) {
    (
        header_ops(h.and_then(|h| h.request.as_ref())),
        header_ops(h.and_then(|h| h.response.as_ref())),
    )
}

fn merged(mut a: HeaderModifier, b: HeaderModifier) -> HeaderModifier {
    a.set.extend(b.set);
    a.add.extend(b.add);
    a.remove.extend(b.remove);
    a
}

/// A `directResponse`: a status of 200-599 and a UTF-8 body of at most 4 KiB.
fn direct_response(d: &crate::istio::VsDirectResponse, at: &str) -> Result<DirectResponse, Refusal> {
    if let Some(f) = d.other.keys().next() {
        return Err(unsupported(format!("{at}.{f}"), "not supported"));
    }
    let body = match &d.body {
        None => String::new(),
        Some(b) => {
            if let Some(f) = b.other.keys().next() {
                return Err(unsupported(format!("{at}.body.{f}"), "the body is a string"));
            }
            b.string.clone().unwrap_or_default()
        }
    };
    let r = DirectResponse {
        status: u16::try_from(d.status).unwrap_or(0),
        body,
    };
    match crate::validate::direct_response_problem(&r) {
        Some((field, why)) => Err(invalid(format!("{at}.{field}"), why)),
        None => Ok(r),
    }
}

fn redirect(r: &crate::istio::VsRedirect, at: &str) -> Result<Redirect, Refusal> {
    if let Some(f) = r.other.keys().next() {
        return Err(unsupported(format!("{at}.{f}"), "not supported"));
    }
    let status = match r.redirect_code.unwrap_or(301) {
        c @ (301 | 302 | 303 | 307 | 308) => c as u16,
        c => {
            return Err(invalid(
                format!("{at}.redirectCode"),
                format!("{c} is not 301, 302, 303, 307 or 308"),
            ));
        }
    };
    Ok(Redirect {
        scheme: r.scheme.clone(),
        hostname: r.authority.clone(),
        port: r.port.map(|p| port(p, &format!("{at}.port"))).transpose()?,
        path: r.uri.clone().map(PathRewrite::Full),
        status,
    })
}

/// The rewrite of a route matching `path`: a prefix is replaced only after the prefix `/`
/// (Ferrum's prefix rewrite replaces a segment-wise prefix, Istio's prefixes are of the string).
fn rewrite(h: &VsHttpRoute, path: &PathMatch, at: &str) -> Result<Option<Rewrite>, Refusal> {
    let Some(r) = &h.rewrite else { return Ok(None) };
    if let Some(f) = r.other.keys().next() {
        return Err(unsupported(format!("{at}.{f}"), "not supported"));
    }
    let from_prefix = h.matches.iter().any(|m| {
        m.uri
            .as_ref()
            .is_some_and(|u| u.prefix.as_deref().is_some_and(|p| p != "/"))
    });
    let path = match (&r.uri, path) {
        (None, _) => None,
        (Some(_), _) if from_prefix => {
            return Err(unsupported(
                format!("{at}.uri"),
                "a rewrite after a uri.prefix match other than \"/\" is not supported",
            ));
        }
        (Some(u), PathMatch::Prefix(_)) => Some(PathRewrite::Prefix(u.clone())),
        (Some(u), _) => Some(PathRewrite::Full(u.clone())),
    };
    Ok(Some(Rewrite {
        hostname: r.authority.clone(),
        path,
    }))
}

/// Who sees the routes: every client (`None`), or the VirtualService's own namespace.
fn clients(vs: &VirtualService) -> Result<Option<String>, Refusal> {
    let ns = namespace(vs);
    match super::mesh::exported_to(vs.spec.export_to.iter().map(String::as_str), ns).as_slice() {
        [] => Ok(None),
        [only] if only == ns => Ok(Some(ns.to_string())),
        _ => Err(unsupported(
            "spec.exportTo",
            "exported to every namespace (\"*\") or its own (\".\") only",
        )),
    }
}

/// The route tables of `vs` on each port of each Service or ServiceEntry host it names; hosts
/// that are neither and destinations that do not resolve are reported.
fn tables(
    vs: &VirtualService,
    rules: &Rules,
    reg: &Registry<'_>,
    clusters: &mut Clusters<'_>,
    problems: &mut Problems<'_>,
    obj: &ObjectRef,
) -> Vec<VsTable> {
    let ns = namespace(vs);
    let consumer = match clients(vs) {
        Ok(c) => c,
        Err((field, reason, why)) => {
            problems.push(obj, field, reason, why);
            return Vec::new();
        }
    };
    let rank = (
        super::httproute::created(&vs.metadata),
        ns.to_string(),
        obj.name.clone(),
    );
    if !rules.tcp.is_empty()
        && let Some(k) = vs.spec.hosts.iter().position(|h| reg.entries(h).next().is_some())
    {
        problems.push(
            obj,
            format!("spec.hosts[{k}]"),
            Reason::UnsupportedValue,
            "tcp routes apply to Services; a ServiceEntry host's TCP ports are not routed",
        );
        return Vec::new();
    }
    let mut out = Vec::new();
    for (k, host) in vs.spec.hosts.iter().enumerate() {
        let targets = match targets(reg, host, ns) {
            Ok(t) => t,
            Err(why) => {
                problems.push(obj, format!("spec.hosts[{k}]"), Reason::NoMatchingParent, why);
                continue;
            }
        };
        for (key, ports) in targets {
            for p in ports {
                let at = Place {
                    ns,
                    name: &obj.name,
                    port: p,
                    obj,
                };
                let routes = routes_on(reg, &rules.http, &at, clusters, problems);
                let tcp = tcp_routes_on(reg, &rules.tcp, &at, clusters, problems);
                if !routes.is_empty() || !tcp.is_empty() {
                    out.push(VsTable {
                        target: (key.clone(), p, consumer.clone()),
                        routes,
                        tcp,
                        owner: obj.clone(),
                        host: k,
                        rank: rank.clone(),
                    });
                }
            }
        }
    }
    out
}

/// What a VirtualService host names, as (mesh service key, its ports that take routes): the
/// ServiceEntries with that host (their HTTP ports), else the Service (its TCP ports).
fn targets(reg: &Registry<'_>, host: &str, ns: &str) -> Result<Vec<(String, Vec<u16>)>, String> {
    let entries: Vec<&MeshService> = reg.entries(host).collect();
    if !entries.is_empty() {
        let routed: Vec<(String, Vec<u16>)> = entries
            .iter()
            .filter(|s| s.resolution != Resolution::Passthrough)
            .map(|s| (s.key.clone(), super::service_entry::http_ports(s).collect::<Vec<_>>()))
            .filter(|(_, ports)| !ports.is_empty())
            .collect();
        if routed.is_empty() {
            return Err(format!(
                "ServiceEntry host {host:?} has no HTTP port (HTTP, HTTP2, GRPC) with endpoints to route to (resolution STATIC or DNS)"
            ));
        }
        return Ok(routed);
    }
    let (sns, name) = service_of(host, ns)
        .ok_or_else(|| format!("{host:?} is neither a Service of this cluster nor a ServiceEntry host"))?;
    let svc = reg
        .res
        .services
        .iter()
        .find(|s| s.metadata.namespace.as_deref() == Some(sns) && s.metadata.name.as_deref() == Some(name))
        .ok_or_else(|| format!("Service {sns}/{name} does not exist"))?;
    Ok(vec![(format!("{sns}/{name}"), tcp_ports(svc).collect())])
}

/// The cluster of destination `d` for requests to port `port` of the host routed.
fn resolve(
    reg: &Registry<'_>,
    ns: &str,
    d: &Destination,
    port: u16,
    clusters: &mut Clusters<'_>,
) -> Result<String, (Reason, String)> {
    if let Some(entry) = reg.entries(&d.host).next() {
        if d.subset.is_some() {
            return Err((
                Reason::BackendNotFound,
                format!("ServiceEntry host {}: subsets are not supported", d.host),
            ));
        }
        let only = match entry.ports.as_slice() {
            [p] => Some(p.port),
            _ => None,
        };
        return clusters.entry(entry, d.port.or(only).unwrap_or(port));
    }
    let Some((sns, name)) = &d.service else {
        return Err((
            Reason::BackendNotFound,
            format!(
                "{:?} is neither a Service of this cluster nor a ServiceEntry host",
                d.host
            ),
        ));
    };
    let at = d.port.or_else(|| only_port(reg.res, sns, name)).unwrap_or(port);
    let target = BackendRef::service(sns, name, at);
    let base = clusters.resolve("VirtualService", ns, &target)?;
    match &d.subset {
        None => Ok(base),
        Some(subset) => clusters.subset(&base, sns, name, subset),
    }
}

/// The port of a Service that has one TCP port: a destination naming no port goes there (Istio's
/// rule); with several, to the port the request was for.
fn only_port(res: &Resources, ns: &str, name: &str) -> Option<u16> {
    let svc = res
        .services
        .iter()
        .find(|s| s.metadata.namespace.as_deref() == Some(ns) && s.metadata.name.as_deref() == Some(name))?;
    let mut ports = tcp_ports(svc);
    let first = ports.next();
    ports.next().is_none().then_some(first).flatten()
}

fn tcp_ports(svc: &k8s_openapi::api::core::v1::Service) -> impl Iterator<Item = u16> + '_ {
    svc.spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .filter(|sp| sp.protocol.as_deref().is_none_or(|x| x == "TCP"))
        .filter_map(|sp| u16::try_from(sp.port).ok())
}

/// The VirtualService (namespace, name, object) and the Service port its routes are built for.
struct Place<'a> {
    ns: &'a str,
    name: &'a str,
    port: u16,
    obj: &'a ObjectRef,
}

/// The L4 routes for connections to the port, in order: each match of a `tcp` route that holds
/// there, up to the first that holds for every client (a sidecar takes the first whose source
/// it is).
fn tcp_routes_on(
    reg: &Registry<'_>,
    rules: &[TcpRule],
    at: &Place<'_>,
    clusters: &mut Clusters<'_>,
    problems: &mut Problems<'_>,
) -> Vec<Arc<Route>> {
    let mut out = Vec::new();
    for (i, r) in rules.iter().enumerate() {
        let on_port = r
            .matches
            .iter()
            .enumerate()
            .filter(|(_, (p, _))| p.is_none_or(|p| p == at.port));
        let mut targets = None;
        for (j, (_, source)) in on_port {
            let targets = targets
                .get_or_insert_with(|| tcp_targets(reg, r, i, at, clusters, problems))
                .clone();
            let mut route = Route::forward(format!("{}/{}/tcp/{i}/{j}", at.ns, at.name), targets);
            route.matcher.source = source.clone();
            out.push(Arc::new(route));
            if source.is_none() {
                return out;
            }
        }
    }
    out
}

/// Where rule `i` sends connections to the port.
fn tcp_targets(
    reg: &Registry<'_>,
    r: &TcpRule,
    i: usize,
    at: &Place<'_>,
    clusters: &mut Clusters<'_>,
    problems: &mut Problems<'_>,
) -> Vec<WeightedCluster> {
    r.destinations
        .iter()
        .enumerate()
        .map(|(j, d)| WeightedCluster {
            cluster: resolve(reg, at.ns, d, at.port, clusters)
                .map_err(|(reason, why)| {
                    let field = format!("spec.tcp[{i}].route[{j}].destination");
                    push_once(problems, at.obj, field, reason, why)
                })
                .ok(),
            weight: d.weight,
            headers: None,
        })
        .collect()
}

/// The routes of `rules` for requests to the port, in order.
fn routes_on(
    reg: &Registry<'_>,
    rules: &[Rule],
    at: &Place<'_>,
    clusters: &mut Clusters<'_>,
    problems: &mut Problems<'_>,
) -> Vec<Arc<Route>> {
    let (ns, name, port, obj) = (at.ns, at.name, at.port, at.obj);
    let mut out = Vec::new();
    for (i, r) in rules.iter().enumerate() {
        let mut cluster_of = |d: &Destination, field: String| {
            let found = resolve(reg, ns, d, port, clusters);
            found
                .map_err(|(reason, why)| push_once(problems, obj, field, reason, why))
                .ok()
        };
        let action = match &r.redirect {
            Some(red) => Action::Redirect(red.clone()),
            // Answered by the proxy: a backend that resolves nowhere stands for it (an older
            // proxy answers 500 there rather than forwarding).
            None if r.direct.is_some() => Action::Forward(vec![WeightedCluster {
                cluster: None,
                weight: 1,
                headers: None,
            }]),
            None => Action::Forward(
                r.destinations
                    .iter()
                    .enumerate()
                    .map(|(j, d)| WeightedCluster {
                        cluster: cluster_of(d, format!("spec.http[{i}].route[{j}].destination")),
                        weight: d.weight,
                        headers: d.headers.clone(),
                    })
                    .collect(),
            ),
        };
        let mirrors: Vec<Mirror> = r
            .mirrors
            .iter()
            .filter_map(|(d, share, field)| {
                Some(Mirror {
                    cluster: cluster_of(d, field.clone())?,
                    per_million: *share,
                })
            })
            .collect();
        for (j, (matcher, only)) in r.matches.iter().enumerate() {
            if only.is_some_and(|p| p != port) {
                continue;
            }
            let mut route = route_of(r, j, matcher, format!("{ns}/{name}/{i}/{j}"), action.clone());
            route.set_mirrors(mirrors.clone());
            out.push(Arc::new(route));
        }
    }
    out
}

/// The route of match `j` of `rule`.
fn route_of(rule: &Rule, j: usize, matcher: &RouteMatch, name: String, action: Action) -> Route {
    Route {
        name,
        matcher: matcher.clone(),
        request_headers: rule.request.clone(),
        response_headers: rule.response.clone(),
        rewrite: rule.rewrites[j].clone(),
        action,
        timeouts: rule.timeouts.clone(),
        retry: rule.retry.clone(),
        fault: rule.fault.clone(),
        mirror: None,
        more_mirrors: Vec::new(),
        cors: rule.cors.clone(),
        direct_response: rule.direct.clone(),
        rate_limits: Vec::new(),
    }
}

/// A problem, unless the object already has one on that field (one per field, not per port).
pub(crate) fn push_once(problems: &mut Problems<'_>, obj: &ObjectRef, field: String, reason: Reason, why: String) {
    if !problems.list.iter().any(|p| &p.object == obj && p.field == field) {
        problems.push(obj, field, reason, why);
    }
}

#[cfg(test)]
mod tests {
    use crate::model::{Action, KeyMatch, PathMatch, PathRewrite, StringMatch};
    use crate::translate::{Options, Reason, translate};

    const MESH: &str = "
apiVersion: v1
kind: Pod
metadata: {name: b1, namespace: shop, labels: {app: b, version: v1}}
spec: {containers: [{name: app}]}
status: {podIP: 10.1.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: b2, namespace: shop, labels: {app: b, version: v2}}
spec: {containers: [{name: app}]}
status: {podIP: 10.1.0.3}
---
apiVersion: v1
kind: Service
metadata: {name: b, namespace: shop}
spec: {clusterIP: 10.96.0.9, selector: {app: b}, ports: [{name: http, port: 80, targetPort: 8080}, {name: admin, port: 81, targetPort: 8081}]}
---
apiVersion: v1
kind: Service
metadata: {name: b-v1, namespace: shop}
spec: {clusterIP: 10.96.0.10, selector: {app: b, version: v1}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: b-v2, namespace: shop}
spec: {clusterIP: 10.96.0.11, selector: {app: b, version: v2}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
";

    fn run(extra: &str) -> crate::Translation {
        let mut r = crate::Resources::default();
        r.add_yaml("vs.yaml", &format!("{MESH}{extra}")).unwrap();
        translate(&r, 1, &Options::default())
    }

    fn clusters(a: &Action) -> Vec<(Option<&str>, u32)> {
        let Action::Forward(t) = a else { panic!("{a:?}") };
        t.iter().map(|w| (w.cluster.as_deref(), w.weight)).collect()
    }

    #[test]
    fn http_routes_become_the_services_route_table_in_the_order_written() {
        let t = run("
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: b-routes, namespace: shop}
spec:
  hosts: [b]
  http:
  - match: [{uri: {prefix: /v2}}, {headers: {X-Version: {exact: '2'}}}]
    route: [{destination: {host: b-v2}}]
  - match: [{uri: {exact: /old}}]
    redirect: {uri: /new, redirectCode: 302}
  - match: [{uri: {regex: '/api/[0-9]+'}, port: 81}]
    route: [{destination: {host: b-v1, port: {number: 80}}, headers: {request: {set: {x-from: vs}}}}]
    timeout: 0.5s
    retries: {attempts: 3, perTryTimeout: 2s, retryOn: '5xx,refused-stream,429,retriable-status-codes', backoff: 100ms, retryRemoteLocalities: true, retryIgnorePreviousHosts: true}
  - match: [{uri: {exact: /v1}}]
    rewrite: {uri: /, authority: b-v1.shop}
    mirror: {host: b, port: {number: 81}}
    mirrorPercentage: {value: 25}
    fault: {delay: {fixedDelay: 1.5s, percentage: {value: 12.5}}, abort: {httpStatus: 418, percentage: {value: 100}}}
    route: [{destination: {host: b-v1.shop.svc.cluster.local, port: {number: 80}}}]
  - mirrors: [{destination: {host: b, port: {number: 81}}, percentage: {value: 5}}, {destination: {host: b-v2}}]
    route:
    - {destination: {host: b-v1, port: {number: 80}}, weight: 90}
    - {destination: {host: gone.shop}, weight: 10}
  - match: [{uri: {prefix: /rpc}}]
    fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 50}}}
    route: [{destination: {host: b-v1, port: {number: 80}}}]
");
        // A destination that is no Service is reported, and its share answered 500.
        assert_eq!(
            t.problem_keys(),
            [("b-routes", "spec.http[4].route[1].destination", Reason::BackendNotFound)],
            "{:#?}",
            t.problems
        );
        let b = t.snapshot.services.iter().find(|s| s.key == "shop/b").unwrap();
        let on80 = &b.routes_for(80, "anyone").unwrap().routes;
        let names: Vec<&str> = on80.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "shop/b-routes/0/0",
                "shop/b-routes/0/1",
                "shop/b-routes/1/0",
                "shop/b-routes/3/0",
                "shop/b-routes/4/0",
                "shop/b-routes/5/0"
            ],
            "first match wins: the order written; the port-81 route is not on port 80"
        );
        assert_eq!(
            on80[0].matcher.path,
            PathMatch::Regex("/v2.*".into()),
            "Istio prefixes are of the string"
        );
        assert_eq!(
            on80[1].matcher.headers,
            [KeyMatch {
                name: "x-version".into(),
                value: StringMatch::Exact("2".into())
            }]
        );
        assert_eq!(clusters(&on80[0].action), [(Some("service/shop/b-v2:80"), 1)]);
        let Action::Redirect(r) = &on80[2].action else { panic!() };
        assert_eq!((r.status, &r.path), (302, &Some(PathRewrite::Full("/new".into()))));
        let fault = crate::model::Fault {
            delay: Some(crate::model::FaultDelay {
                ms: 1500,
                per_million: 125_000,
            }),
            abort: Some(crate::model::FaultAbort {
                status: 418,
                grpc_status: None,
                per_million: 1_000_000,
            }),
        };
        assert_eq!(on80[3].fault.as_ref(), Some(&fault));
        let mirror = on80[3].mirror.as_ref().unwrap();
        assert_eq!(
            (mirror.cluster.as_str(), mirror.per_million),
            ("service/shop/b:81", 250_000)
        );
        assert!(on80[0].mirror.is_none());
        // A gRPC abort: the code, and the HTTP status an older proxy answers instead.
        let grpc = on80[5].fault.as_ref().unwrap().abort.clone().unwrap();
        assert_eq!(
            (grpc.grpc_status, grpc.status, grpc.per_million),
            (Some(14), 503, 500_000)
        );
        // `mirrors`: each with its own share (all when it names none).
        let mirrors: Vec<_> = on80[4].mirrors().map(|m| (m.cluster.as_str(), m.per_million)).collect();
        assert_eq!(
            mirrors,
            [("service/shop/b:81", 50_000), ("service/shop/b-v2:80", 1_000_000)]
        );
        let rewrite = on80[3].rewrite.as_ref().unwrap();
        assert_eq!(
            (rewrite.hostname.as_deref(), &rewrite.path),
            (Some("b-v1.shop"), &Some(PathRewrite::Full("/".into())))
        );
        assert_eq!(
            clusters(&on80[4].action),
            [(Some("service/shop/b-v1:80"), 90), (None, 10)]
        );

        let on81 = &b.routes_for(81, "anyone").unwrap().routes;
        assert_eq!(on81.len(), 7);
        let api = &on81[3];
        assert_eq!(api.name, "shop/b-routes/2/0");
        assert_eq!(
            (api.timeouts.request_ms, api.timeouts.backend_request_ms),
            (Some(500), Some(2000))
        );
        assert!(
            on81.iter().all(|r| r.timeouts.unbounded),
            "the cluster's read timeout is no per-try limit under a VirtualService"
        );
        assert_eq!(
            on81[0].timeouts.per_try_ms(15_000),
            None,
            "no timeout by default, as in Istio"
        );
        let retry = api.retry.as_ref().unwrap();
        assert_eq!(
            (retry.attempts, retry.on.as_slice(), retry.backoff_base_ms),
            (3, &["5xx", "reset", "429"].map(String::from)[..], 100)
        );
        let default = on80[0].retry.as_ref().expect("no retries field: Istio's default");
        assert_eq!(
            (default.attempts, default.on.as_slice(), default.grpc_on.as_slice()),
            (
                2,
                &["connect-failure", "reset", "503"].map(String::from)[..],
                &[1, 14][..]
            ),
            "gRPC's cancelled and unavailable too"
        );
        assert_eq!(api.request_headers.set, [("x-from".to_string(), "vs".to_string())]);
        assert_eq!(
            clusters(&api.action),
            [(Some("service/shop/b-v1:80#client"), 1)],
            "port 81 declares no protocol: its clusters speak the client's"
        );
        assert_eq!(
            clusters(&on81[0].action),
            [(Some("service/shop/b-v2:80#client"), 1)],
            "a destination without a port goes to the only port its Service has"
        );
        // A sidecar's view carries the clusters the routes send to.
        let view = t.snapshot.mesh_view(&t.digests, None, |_| true);
        assert!(view.clusters.iter().any(|c| c.name == "service/shop/b-v2:80"));
        assert!(
            view.clusters.iter().any(|c| c.name == "service/shop/b:81"),
            "and the clusters they only mirror to"
        );
        crate::validate(&view).unwrap();
    }

    #[test]
    fn what_cannot_be_applied_is_reported_and_the_older_virtual_service_keeps_a_port() {
        let vs = |name: &str, created: &str, spec: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\n\
                 metadata: {{name: {name}, namespace: shop, creationTimestamp: '{created}'}}\nspec: {spec}\n---\n"
            )
        };
        let route = "http: [{route: [{destination: {host: b-v1}}]}]";
        let t = run(&[
            vs(
                "subset",
                "2026-01-01T00:00:00Z",
                "{hosts: [b-v2], http: [{corsPolicy: {allowOrigins: [{exact: 'https://a.example'}], unmatchedPreflights: DROP}, route: [{destination: {host: b-v1}}]}]}",
            ),
            vs(
                "gateway",
                "2026-01-01T00:00:00Z",
                &format!("{{hosts: [b-v2], gateways: [shop/gw], {route}}}"),
            ),
            vs(
                "tcp",
                "2026-01-01T00:00:00Z",
                "{hosts: [b-v2], tcp: [{match: [{destinationSubnets: [10.0.0.0/8]}], route: [{destination: {host: b-v1}}]}]}",
            ),
            vs(
                "regex",
                "2026-01-01T00:00:00Z",
                "{hosts: [b-v2], http: [{match: [{uri: {regex: '(['}}], route: [{destination: {host: b-v1}}]}]}",
            ),
            vs(
                "retries",
                "2026-01-01T00:00:00Z",
                "{hosts: [b-v2], http: [{retries: {attempts: 3, retryOn: 'sometimes'}, route: [{destination: {host: b-v1}}]}]}",
            ),
            vs(
                "sticky-retries",
                "2026-01-01T00:00:00Z",
                "{hosts: [b-v2], http: [{retries: {attempts: 3, retryIgnorePreviousHosts: false}, route: [{destination: {host: b-v1}}]}]}",
            ),
            vs(
                "grpc",
                "2026-01-01T00:00:00Z",
                "{hosts: [b-v2], http: [{fault: {abort: {grpcStatus: SOMETIMES}}, route: [{destination: {host: b-v1}}]}]}",
            ),
            vs(
                "mirrors",
                "2026-01-01T00:00:00Z",
                "{hosts: [b-v2], http: [{mirror: {host: b-v1}, mirrors: [{destination: {host: b-v1}}], route: [{destination: {host: b-v1}}]}]}",
            ),
            vs("nohost", "2026-01-01T00:00:00Z", &format!("{{hosts: [nope], {route}}}")),
            vs("older", "2026-01-01T00:00:00Z", &format!("{{hosts: [b], {route}}}")),
            vs("younger", "2026-02-01T00:00:00Z", &format!("{{hosts: [b], {route}}}")),
        ]
        .concat());
        assert_eq!(
            t.problem_keys(),
            [
                ("gateway", "spec.gateways[0]", Reason::UnsupportedValue),
                ("grpc", "spec.http[0].fault.abort.grpcStatus", Reason::Invalid),
                ("mirrors", "spec.http[0].mirrors", Reason::Invalid),
                ("nohost", "spec.hosts[0]", Reason::NoMatchingParent),
                ("regex", "spec.http[0].match[0].uri", Reason::Invalid),
                ("retries", "spec.http[0].retries.retryOn", Reason::UnsupportedValue),
                (
                    "sticky-retries",
                    "spec.http[0].retries.retryIgnorePreviousHosts",
                    Reason::UnsupportedValue
                ),
                ("subset", "spec.http[0].corsPolicy.unmatchedPreflights", Reason::Invalid),
                (
                    "tcp",
                    "spec.tcp[0].match[0].destinationSubnets",
                    Reason::UnsupportedValue
                ),
                ("younger", "spec.hosts[0]", Reason::Conflicted),
            ],
            "{:#?}",
            t.problems
        );
        let b = t.snapshot.services.iter().find(|s| s.key == "shop/b").unwrap();
        assert!(b.routes_for(80, "x").unwrap().routes[0].name.starts_with("shop/older/"));
        let v2 = t.snapshot.services.iter().find(|s| s.key == "shop/b-v2").unwrap();
        assert!(v2.routes.is_empty(), "nothing of the VirtualServices left out");

        // An HTTPRoute on the Service port holds it against any VirtualService.
        let t = run(&format!(
            "{}apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: gamma, namespace: shop}}\n\
             spec: {{parentRefs: [{{group: '', kind: Service, name: b, port: 80}}], rules: [{{backendRefs: [{{name: b-v2, port: 80}}]}}]}}\n",
            vs("older", "2026-01-01T00:00:00Z", &format!("{{hosts: [b], {route}}}"))
        ));
        assert_eq!(t.problem_keys(), [("older", "spec.hosts[0]", Reason::Conflicted)]);
        let b = t.snapshot.services.iter().find(|s| s.key == "shop/b").unwrap();
        assert!(b.routes_for(80, "x").unwrap().routes[0].name.starts_with("shop/gamma/"));
        assert!(
            b.routes_for(81, "x").unwrap().routes[0].name.starts_with("shop/older/"),
            "port 81 is free"
        );
    }

    #[test]
    fn a_cors_policy_is_the_routes_own() {
        let t = run(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: c, namespace: shop}\n\
             spec: {hosts: [b], http: [{corsPolicy: {allowOrigins: [{prefix: 'https://app.'}, {exact: 'https://x.example'}], allowMethods: [GET, POST], maxAge: 24h, allowCredentials: true},\n\
                    route: [{destination: {host: b-v1}}]}]}\n",
        );
        assert!(t.problems.is_empty(), "{:#?}", t.problems);
        let b = t.snapshot.services.iter().find(|s| s.key == "shop/b").unwrap();
        let c = b.routes_for(80, "x").unwrap().routes[0].cors.clone().expect("a policy");
        assert_eq!(
            c.allow_origins,
            [
                StringMatch::Regex(r"https://app\..*".into()),
                StringMatch::Exact("https://x.example".into())
            ]
        );
        assert_eq!(
            (c.max_age_s, c.allow_credentials, c.allow_methods.len()),
            (Some(86_400), true, 2)
        );
    }

    #[test]
    fn ignore_uri_case_matches_paths_in_any_case() {
        let t = run("
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: b, namespace: shop}
spec:
  hosts: [b]
  http:
  - match: [{uri: {exact: /Api/V1}, ignoreUriCase: true}, {uri: {prefix: /Docs}, ignoreUriCase: true}]
    route: [{destination: {host: b-v2}}]
  - route: [{destination: {host: b-v1}}]
");
        assert!(t.problems.is_empty(), "{:#?}", t.problems);
        let b = t.snapshot.services.iter().find(|s| s.key == "shop/b").unwrap();
        let on80 = &b.routes_for(80, "any").unwrap().routes;
        let regex = |p: &PathMatch| match p {
            PathMatch::Regex(re) => regex::Regex::new(&format!("^(?:{re})$")).unwrap(),
            other => panic!("{other:?}"),
        };
        let (exact, prefix) = (regex(&on80[0].matcher.path), regex(&on80[1].matcher.path));
        assert!(exact.is_match("/api/v1") && exact.is_match("/API/V1") && !exact.is_match("/api/v1/x"));
        assert!(prefix.is_match("/docs") && prefix.is_match("/DOCS/intro") && !prefix.is_match("/doc"));
        crate::validate(&t.snapshot).unwrap();
    }

    #[test]
    fn a_direct_response_is_answered_by_the_proxy_and_forwards_nowhere() {
        let t = run("
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: b, namespace: shop}
spec:
  hosts: [b]
  http:
  - match: [{uri: {prefix: /maintenance}}]
    directResponse: {status: 503, body: {string: down for maintenance}}
  - route: [{destination: {host: b-v1}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: odd-status, namespace: shop}
spec:
  hosts: [b-v1]
  http: [{directResponse: {status: 99}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: both, namespace: shop}
spec:
  hosts: [b-v2]
  http: [{directResponse: {status: 200}, route: [{destination: {host: b-v1}}]}]
");
        assert_eq!(
            t.problem_keys(),
            [
                ("both", "spec.http[0].directResponse", Reason::Invalid),
                ("odd-status", "spec.http[0].directResponse.status", Reason::Invalid),
            ],
            "{:#?}",
            t.problems
        );
        let b = t.snapshot.services.iter().find(|s| s.key == "shop/b").unwrap();
        let on80 = &b.routes_for(80, "any").unwrap().routes;
        let d = on80[0].direct_response.as_ref().unwrap();
        assert_eq!((d.status, d.body.as_str()), (503, "down for maintenance"));
        assert_eq!(clusters(&on80[0].action), [(None, 1)], "forwards nowhere");
        assert!(on80[1].direct_response.is_none());
        crate::validate(&t.snapshot).unwrap();
    }

    #[test]
    fn tcp_routes_give_each_port_the_first_route_that_matches_it() {
        let t = run("
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: b, namespace: shop}
spec:
  host: b
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: b, namespace: shop}
spec:
  hosts: [b]
  http:
  - match: [{port: 80}]
    route: [{destination: {host: b-v2}}]
  tcp:
  - match: [{port: 81, sourceLabels: {track: canary}, sourceNamespace: shop}]
    route: [{destination: {host: b, subset: v2}}]
  - match: [{port: 81}]
    route:
    - {destination: {host: b, subset: v1}, weight: 80}
    - {destination: {host: b, subset: v2}, weight: 20}
  - route: [{destination: {host: b-v1, port: {number: 80}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: only-tcp, namespace: shop}
spec:
  hosts: [b-v2]
  tcp: [{route: [{destination: {host: nope}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bad, namespace: shop}
spec:
  hosts: [b-v1]
  tcp: [{route: [{destination: {host: b}, headers: {request: {set: {a: b}}}}]}]
");
        assert_eq!(
            t.problem_keys(),
            [
                ("bad", "spec.tcp[0].route[0].headers", Reason::UnsupportedValue),
                ("only-tcp", "spec.tcp[0].route[0].destination", Reason::BackendNotFound),
            ],
            "{:#?}",
            t.problems
        );
        let b = t.snapshot.services.iter().find(|s| s.key == "shop/b").unwrap();
        let on81 = &b.tcp_routes_for(81, "any").unwrap().routes;
        assert_eq!(
            on81.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
            ["shop/b/tcp/0/0", "shop/b/tcp/1/0"],
            "the canaries' route, then everyone's; nothing after it"
        );
        let canary = on81[0].matcher.source.as_ref().unwrap();
        assert_eq!(
            (
                canary.labels.get("track").map(String::as_str),
                canary.namespace.as_deref()
            ),
            (Some("canary"), Some("shop"))
        );
        assert_eq!(clusters(&on81[0].action), [(Some("service/shop/b:81~v2"), 1)]);
        assert_eq!(
            clusters(&on81[1].action),
            [(Some("service/shop/b:81~v1"), 80), (Some("service/shop/b:81~v2"), 20)]
        );
        assert!(on81[1].matcher.source.is_none());
        let on80 = &b.tcp_routes_for(80, "any").unwrap().routes;
        assert_eq!(
            clusters(&on80[0].action),
            [(Some("service/shop/b-v1:80"), 1)],
            "the next route takes the ports the first does not match"
        );
        assert!(
            b.routes_for(80, "any").is_some() && b.routes_for(81, "any").is_none(),
            "HTTP on 80 only"
        );
        let subset = t.snapshot.cluster("service/shop/b:81~v1").unwrap();
        assert_eq!(subset.endpoints.len(), 1, "v1's pod at the admin port: {subset:?}");
        assert_eq!(
            (subset.endpoints[0].address.as_str(), subset.endpoints[0].port),
            ("10.1.0.2", 8081)
        );
        // A destination that does not resolve: its share of connections is refused.
        let v2 = t.snapshot.services.iter().find(|s| s.key == "shop/b-v2").unwrap();
        assert_eq!(
            clusters(&v2.tcp_routes_for(80, "any").unwrap().routes[0].action),
            [(None, 1)]
        );
        assert!(
            v2.routes.is_empty(),
            "no HTTP table: HTTP on the port goes by the L4 route"
        );
        crate::validate(&t.snapshot).unwrap();
    }

    #[test]
    fn subsets_of_a_destination_rule_are_clusters_of_the_labelled_pods() {
        let t = run("
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: b, namespace: shop}
spec:
  host: b
  trafficPolicy: {connectionPool: {tcp: {maxConnections: 7}}}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}, trafficPolicy: {loadBalancer: {simple: RANDOM}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: b-v1, namespace: shop}
spec:
  host: b-v1
  subsets: [{name: all, trafficPolicy: {tunnel: {protocol: CONNECT}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: b, namespace: shop}
spec:
  hosts: [b]
  http:
  - match: [{headers: {x-v: {exact: '2'}}}]
    route: [{destination: {host: b, subset: v2}}]
  - route:
    - {destination: {host: b, subset: v1}, weight: 75}
    - {destination: {host: b, subset: v3}, weight: 25}
");
        assert_eq!(
            t.problem_keys(),
            [
                ("b-v1", "spec.subsets[0].trafficPolicy.tunnel", Reason::UnsupportedValue),
                ("b", "spec.http[1].route[1].destination", Reason::BackendNotFound),
            ],
            "{:#?}",
            t.problems
        );
        let on80 = &t
            .snapshot
            .services
            .iter()
            .find(|s| s.key == "shop/b")
            .unwrap()
            .routes_for(80, "x")
            .unwrap()
            .routes;
        assert_eq!(clusters(&on80[0].action), [(Some("service/shop/b:80~v2"), 1)]);
        assert_eq!(
            clusters(&on80[1].action),
            [(Some("service/shop/b:80~v1"), 75), (None, 25)]
        );
        let v1 = t.snapshot.cluster("service/shop/b:80~v1").unwrap();
        let v2 = t.snapshot.cluster("service/shop/b:80~v2").unwrap();
        let at = |c: &crate::model::Cluster| {
            c.endpoints
                .iter()
                .map(|e| format!("{}:{}", e.address, e.port))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            (at(v1), at(v2)),
            (vec!["10.1.0.2:8080".to_string()], vec!["10.1.0.3:8080".to_string()])
        );
        assert_eq!(v2.lb, crate::model::LbPolicy::Random, "the subset's own policy");
        assert_eq!(
            (v1.circuit_breaker.max_connections, v2.circuit_breaker.max_connections),
            (7, 7),
            "over the rule's"
        );
    }

    /// A route that delegates takes the delegate's routes, merged into it, in their place; the
    /// delegate (no hosts) is not applied on its own.
    #[test]
    fn a_delegating_route_takes_the_delegates_routes_within_its_match() {
        let t = run("
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: root, namespace: shop}
spec:
  hosts: [b]
  http:
  - match: [{uri: {prefix: /api}}]
    timeout: 3s
    delegate: {name: api-team}
  - route: [{destination: {host: b-v1}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api-team, namespace: shop}
spec:
  http:
  - match: [{uri: {prefix: /api/v2}}]
    route: [{destination: {host: b-v2}}]
  - match: [{uri: {prefix: /web}}]
    route: [{destination: {host: b-v2}}]
  - timeout: 1s
    route: [{destination: {host: b-v1}}]
");
        assert!(t.problems.is_empty(), "{:#?}", t.problems);
        let b = t.snapshot.services.iter().find(|s| s.key == "shop/b").unwrap();
        let on80 = &b.routes_for(80, "anyone").unwrap().routes;
        let seen: Vec<_> = on80
            .iter()
            .map(|r| (&r.matcher.path, r.timeouts.request_ms, clusters(&r.action)))
            .collect();
        assert_eq!(
            seen,
            // A VirtualService prefix is of the string: a regex here.
            [
                (
                    &PathMatch::Regex("/api/v2.*".into()),
                    Some(3000),
                    vec![(Some("service/shop/b-v2:80"), 1)]
                ),
                (
                    &PathMatch::Regex("/api.*".into()),
                    Some(1000),
                    vec![(Some("service/shop/b-v1:80"), 1)]
                ),
                (
                    &PathMatch::Prefix("/".into()),
                    None,
                    vec![(Some("service/shop/b-v1:80"), 1)]
                ),
            ],
            "/web lies outside /api and is dropped; the root's timeout where the delegate sets none"
        );
        assert!(
            on80.iter().all(|r| r.name.starts_with("shop/root/")),
            "named for the root, whose status tells"
        );
    }

    #[test]
    fn a_delegation_that_cannot_be_followed_takes_no_requests_and_says_why() {
        let root = |name: &str, to: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: shop}}\n\
                 spec: {{hosts: [{name}], http: [{{delegate: {{name: {to}}}}}, {{route: [{{destination: {{host: b-v1}}}}]}}]}}\n---\n"
            )
        };
        let t = run(&[
            root("b", "missing"),
            root("b-v1", "hosted"),
            root("b-v2", "nested"),
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: hosted, namespace: shop}\n\
             spec: {hosts: [x], http: [{route: [{destination: {host: b}}]}]}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: nested, namespace: shop}\n\
             spec: {http: [{delegate: {name: hosted}}]}\n"
                .into(),
        ]
        .concat());
        let keys = t.problem_keys();
        assert!(
            keys.contains(&("b", "spec.http[0].delegate", Reason::BackendNotFound)),
            "{keys:?}"
        );
        assert!(
            keys.contains(&("b-v1", "spec.http[0].delegate", Reason::Invalid)),
            "{keys:?}"
        );
        assert!(
            keys.contains(&("b-v2", "spec.http[0].delegate", Reason::UnsupportedValue)),
            "{keys:?}"
        );
        // The root's other routes serve.
        let b = t.snapshot.services.iter().find(|s| s.key == "shop/b").unwrap();
        let on80 = &b.routes_for(80, "anyone").unwrap().routes;
        assert_eq!(on80.len(), 1);
        assert_eq!(clusters(&on80[0].action), [(Some("service/shop/b-v1:80"), 1)]);
    }
}
