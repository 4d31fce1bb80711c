//! Route lookup, prebuilt at compile time: O(1) host lookup (exact, then wildcard suffixes, then
//! any-host), then a path index so the cost does not grow with the number of routes.
//!
//! Precedence is the order the snapshot gives; the index only narrows the candidates, and the
//! candidate with the lowest position that also passes its method/header/query checks wins.

use std::sync::Arc;

pub mod cors;

use ferrum_snapshot::model::{self, PathMatch, StringMatch};
use http::{HeaderMap, HeaderName, Method};
use regex::Regex;

use crate::telemetry::RouteStats;

/// Lookups with keys from requests (hosts, paths) over tables built from config: foldhash is
/// several times cheaper than SipHash here, and HashDoS needs inserts the client cannot make.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
use crate::upstream::ClusterRuntime;

pub struct HostTable {
    exact: FastMap<String, VirtualHost>,
    /// Keyed by the suffix including its leading dot: `*.example.com` → `.example.com`.
    wildcard: FastMap<String, VirtualHost>,
    any: Option<VirtualHost>,
}

pub struct VirtualHost {
    /// AuthorizationPolicies and RequestAuthentications of the Gateways this host belongs
    /// to, judged before routing.
    pub policies: Option<Arc<crate::mesh::policy::GatewayPolicies>>,
    routes: Vec<Route>,
    exact: FastMap<String, Vec<u32>>,
    prefix: FastMap<String, Vec<u32>>,
    regex: Vec<(Regex, u32)>,
}

pub struct Route {
    pub name: String,
    method: Option<Method>,
    headers: Vec<(HeaderName, Matcher)>,
    query: Vec<(String, Matcher)>,
    pub path: PathMatch,
    pub request_headers: HeaderMods,
    pub response_headers: HeaderMods,
    pub rewrite: Option<model::Rewrite>,
    pub action: Action,
    pub timeouts: model::RouteTimeouts,
    /// Retries of its own, instead of the cluster's, with their conditions compiled.
    pub retry: Option<(model::RetryPolicy, crate::upstream::retry::RetryOn)>,
    pub fault: Option<model::Fault>,
    /// Copies of a share of its requests go to each of these clusters too (share per million,
    /// drawn for each on its own).
    pub mirrors: Box<[(Arc<ClusterRuntime>, u32)]>,
    pub cors: Option<Box<cors::Cors>>,
    pub stats: Arc<RouteStats>,
    /// RateLimitPolicies its requests count against.
    pub limits: Box<[Arc<crate::ratelimit::Limiter>]>,
}

pub enum Action {
    /// Targets with their cumulative weights.
    Forward(Vec<(u32, Target)>),
    Redirect(model::Redirect),
    /// Answered by the proxy itself.
    Respond(Box<Direct>),
}

/// A direct response, ready to send: status and body (validated at the snapshot boundary).
pub struct Direct {
    pub status: http::StatusCode,
    pub body: bytes::Bytes,
}

impl Direct {
    pub fn new(d: &model::DirectResponse) -> Direct {
        Direct {
            status: http::StatusCode::from_u16(d.status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR),
            body: bytes::Bytes::copy_from_slice(d.body.as_bytes()),
        }
    }
}

/// One weighted backend of a forwarding route.
#[derive(Default)]
pub struct Target {
    /// `None`: a backend that did not resolve (500).
    pub cluster: Option<Arc<ClusterRuntime>>,
    /// Its own header edits (a backendRef's filters), after the route's.
    pub headers: Option<Box<BackendMods>>,
}

/// Header edits of the requests sent to one backend and of its answers.
#[derive(Default)]
pub struct BackendMods {
    pub request: HeaderMods,
    pub response: HeaderMods,
}

impl BackendMods {
    pub fn build(h: &model::BackendHeaders, route: &str) -> Result<BackendMods, RouteError> {
        Ok(BackendMods {
            request: mods(&h.request, route)?,
            response: mods(&h.response, route)?,
        })
    }
}

impl Action {
    /// Weighted pick of a backend; `None` when no target has weight (the caller answers 500).
    pub fn pick(&self) -> Option<&Target> {
        let Action::Forward(targets) = self else {
            return None;
        };
        let total = targets.last()?.0;
        if total == 0 {
            return None;
        }
        if targets.len() == 1 {
            return Some(&targets[0].1);
        }
        let r = fastrand::u32(0..total);
        targets.iter().find(|(cum, _)| r < *cum).map(|(_, t)| t)
    }
}

#[derive(Default)]
pub struct HeaderMods {
    pub set: Vec<(HeaderName, http::HeaderValue)>,
    pub add: Vec<(HeaderName, http::HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderMods {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    pub fn apply(&self, h: &mut HeaderMap) {
        for (n, v) in &self.set {
            h.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            h.append(n.clone(), v.clone());
        }
        for n in &self.remove {
            h.remove(n);
        }
    }
}

pub(crate) enum Matcher {
    Exact(String),
    Regex(Regex),
}

impl Matcher {
    pub(crate) fn new(m: &StringMatch) -> Result<Self, regex::Error> {
        Ok(match m {
            StringMatch::Exact(s) => Matcher::Exact(s.clone()),
            StringMatch::Regex(r) => Matcher::Regex(Regex::new(&format!("^(?:{r})$"))?),
        })
    }
    pub(crate) fn is_match(&self, v: &str) -> bool {
        match self {
            Matcher::Exact(s) => s == v,
            Matcher::Regex(r) => r.is_match(v),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("route {route:?}: {what}")]
    Invalid { route: String, what: String },
}

/// What the compiler hands over for each snapshot route.
pub struct RouteParts {
    pub action: Action,
    /// The mirrors' clusters and the share of requests copied to each.
    pub mirrors: Box<[(Arc<ClusterRuntime>, u32)]>,
    pub stats: Arc<RouteStats>,
    pub limits: Box<[Arc<crate::ratelimit::Limiter>]>,
}

fn mods(m: &model::HeaderModifier, route: &str) -> Result<HeaderMods, RouteError> {
    let bad = |what: String| RouteError::Invalid {
        route: route.to_string(),
        what,
    };
    let pair = |(n, v): &(String, String)| -> Result<_, RouteError> {
        Ok((
            HeaderName::try_from(n.as_str()).map_err(|e| bad(format!("header {n:?}: {e}")))?,
            http::HeaderValue::try_from(v.as_str()).map_err(|e| bad(format!("header {n:?} value: {e}")))?,
        ))
    };
    Ok(HeaderMods {
        set: m.set.iter().map(pair).collect::<Result<_, _>>()?,
        add: m.add.iter().map(pair).collect::<Result<_, _>>()?,
        remove: m
            .remove
            .iter()
            .map(|n| HeaderName::try_from(n.as_str()).map_err(|e| bad(format!("header {n:?}: {e}"))))
            .collect::<Result<_, _>>()?,
    })
}

/// A route that cannot be compiled, and why.
fn invalid(route: &str, e: impl std::fmt::Display) -> RouteError {
    RouteError::Invalid {
        route: route.to_string(),
        what: e.to_string(),
    }
}

impl Route {
    /// Compiles a snapshot route's conditions and edits around what the compiler built for it.
    fn build(r: &model::Route, p: RouteParts) -> Result<Self, RouteError> {
        let bad = |e: &dyn std::fmt::Display| invalid(&r.name, e);
        let method = r.matcher.method.as_deref();
        let method = method.map(|m| Method::from_bytes(m.as_bytes()).map_err(|e| bad(&e)));
        let headers = r.matcher.headers.iter().map(|h| {
            let name = HeaderName::try_from(h.name.as_str()).map_err(|e| bad(&e))?;
            Ok((name, Matcher::new(&h.value).map_err(|e| bad(&e))?))
        });
        let query =
            (r.matcher.query_params.iter()).map(|q| Ok((q.name.clone(), Matcher::new(&q.value).map_err(|e| bad(&e))?)));
        Ok(Route {
            name: r.name.clone(),
            method: method.transpose()?,
            headers: headers.collect::<Result<_, RouteError>>()?,
            query: query.collect::<Result<_, RouteError>>()?,
            path: r.matcher.path.clone(),
            request_headers: mods(&r.request_headers, &r.name)?,
            response_headers: mods(&r.response_headers, &r.name)?,
            rewrite: r.rewrite.clone(),
            action: p.action,
            timeouts: r.timeouts.clone(),
            retry: r.retry.clone().map(|p| {
                let on = crate::upstream::retry::RetryOn::of(&p);
                (p, on)
            }),
            fault: r.fault.clone(),
            mirrors: p.mirrors,
            cors: (r.cors.as_ref())
                .map(|c| cors::Cors::build(c, &r.name).map(Box::new))
                .transpose()?,
            stats: p.stats,
            limits: p.limits,
        })
    }
}

impl VirtualHost {
    pub fn build(
        vh: &model::VirtualHost,
        mut parts: impl FnMut(&model::Route) -> Result<RouteParts, RouteError>,
    ) -> Result<Self, RouteError> {
        let mut out = VirtualHost {
            policies: None,
            routes: Vec::with_capacity(vh.routes.len()),
            exact: FastMap::default(),
            prefix: FastMap::default(),
            regex: Vec::new(),
        };
        for (i, r) in vh.routes.iter().enumerate() {
            let i = i as u32;
            match &r.matcher.path {
                PathMatch::Exact(p) => out.exact.entry(p.clone()).or_default().push(i),
                PathMatch::Prefix(p) => out.prefix.entry(p.clone()).or_default().push(i),
                PathMatch::Regex(re) => out
                    .regex
                    .push((Regex::new(&format!("^(?:{re})$")).map_err(|e| invalid(&r.name, e))?, i)),
            }
            out.routes.push(Route::build(r, parts(r)?)?);
        }
        Ok(out)
    }

    /// The route of highest precedence: what an L4 (TCP or TLS) host forwards to.
    pub fn first_route(&self) -> Option<&Route> {
        self.routes.first()
    }

    pub fn find(&self, method: &Method, path: &str, query: Option<&str>, headers: &HeaderMap) -> Option<&Route> {
        let mut best = u32::MAX;
        let mut consider = |list: &[u32]| {
            // Lists are in precedence order: the first that passes is the best of this list.
            for &i in list {
                if i >= best {
                    return;
                }
                if self.routes[i as usize].passes(method, query, headers) {
                    best = i;
                    return;
                }
            }
        };
        if let Some(l) = self.exact.get(path) {
            consider(l);
        }
        // Segment-wise prefixes: "/a/b/c" is matched by "/a/b/c", "/a/b", "/a" and "/".
        if !self.prefix.is_empty() {
            let mut end = path.len();
            loop {
                let candidate = if end == 0 { "/" } else { &path[..end] };
                if let Some(l) = self.prefix.get(candidate) {
                    consider(l);
                }
                if end == 0 {
                    break;
                }
                end = path[..end].rfind('/').unwrap_or(0);
            }
        }
        for (re, i) in &self.regex {
            if *i < best && re.is_match(path) && self.routes[*i as usize].passes(method, query, headers) {
                best = *i;
            }
        }
        self.routes.get(best as usize)
    }
}

impl Route {
    fn passes(&self, method: &Method, query: Option<&str>, headers: &HeaderMap) -> bool {
        if let Some(m) = &self.method
            && m != method
        {
            return false;
        }
        for (name, m) in &self.headers {
            // Repeated headers are matched as their comma-joined value, as the spec allows.
            let mut values = headers.get_all(name).iter();
            let Some(first) = values.next() else {
                return false;
            };
            let ok = match values.next() {
                None => first.to_str().is_ok_and(|v| m.is_match(v)),
                Some(_) => {
                    let joined: Vec<&str> = headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).collect();
                    m.is_match(&joined.join(","))
                }
            };
            if !ok {
                return false;
            }
        }
        for (name, m) in &self.query {
            // The first occurrence of a parameter is the one that counts.
            let value = query.and_then(|q| {
                q.split('&').find_map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (k == name).then_some(v)
                })
            });
            if !value.is_some_and(|v| m.is_match(v)) {
                return false;
            }
        }
        true
    }
}

impl HostTable {
    pub fn build(vhosts: Vec<(String, VirtualHost)>) -> Self {
        let mut t = HostTable {
            exact: FastMap::default(),
            wildcard: FastMap::default(),
            any: None,
        };
        for (host, vh) in vhosts {
            if host == "*" {
                t.any = Some(vh);
            } else if let Some(suffix) = host.strip_prefix('*') {
                t.wildcard.insert(suffix.to_string(), vh);
            } else {
                t.exact.insert(host, vh);
            }
        }
        t
    }

    /// `host` must be lower-case and without port.
    pub fn find(&self, host: &str) -> Option<&VirtualHost> {
        if let Some(v) = self.exact.get(host) {
            return Some(v);
        }
        if !self.wildcard.is_empty() {
            // Longest suffix first: for "a.b.c.com" try ".b.c.com", ".c.com", ".com".
            let mut rest = host;
            while let Some(dot) = rest.find('.') {
                let suffix = &rest[dot..];
                if let Some(v) = self.wildcard.get(suffix) {
                    return Some(v);
                }
                rest = &rest[dot + 1..];
            }
        }
        self.any.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrum_snapshot::model::{KeyMatch, RouteMatch};

    fn route(name: &str, m: RouteMatch) -> model::Route {
        model::Route {
            matcher: m,
            ..model::Route::forward(name.into(), vec![])
        }
    }

    #[test]
    fn a_rule_without_weight_picks_nothing() {
        let none = Target::default;
        assert!(Action::Forward(vec![(0, none()), (0, none())]).pick().is_none());
        assert!(Action::Forward(vec![(0, none())]).pick().is_none());
        assert!(Action::Forward(vec![]).pick().is_none());
        assert!(Action::Forward(vec![(0, none()), (3, none())]).pick().is_some());
    }

    fn vh(routes: Vec<model::Route>) -> VirtualHost {
        VirtualHost::build(
            &model::VirtualHost {
                hostname: "*".into(),
                routes: routes.into_iter().map(std::sync::Arc::new).collect(),
            },
            |_| {
                Ok(RouteParts {
                    action: Action::Forward(vec![]),
                    mirrors: Box::default(),
                    stats: Default::default(),
                    limits: Box::default(),
                })
            },
        )
        .unwrap()
    }

    fn path(p: PathMatch) -> RouteMatch {
        RouteMatch {
            path: p,
            ..Default::default()
        }
    }

    fn find<'a>(v: &'a VirtualHost, m: &str, p: &str, q: Option<&str>, h: &[(&str, &str)]) -> Option<&'a str> {
        let mut headers = HeaderMap::new();
        for (k, val) in h {
            headers.append(HeaderName::try_from(*k).unwrap(), val.parse().unwrap());
        }
        v.find(&Method::from_bytes(m.as_bytes()).unwrap(), p, q, &headers)
            .map(|r| r.name.as_str())
    }

    #[test]
    fn prefix_matches_whole_segments() {
        let v = vh(vec![
            route("foo", path(PathMatch::Prefix("/foo".into()))),
            route("root", path(PathMatch::Prefix("/".into()))),
        ]);
        assert_eq!(find(&v, "GET", "/foo", None, &[]), Some("foo"));
        assert_eq!(find(&v, "GET", "/foo/bar", None, &[]), Some("foo"));
        assert_eq!(find(&v, "GET", "/foobar", None, &[]), Some("root"));
        assert_eq!(find(&v, "GET", "/", None, &[]), Some("root"));
    }

    #[test]
    fn first_in_precedence_wins_across_index_kinds() {
        let v = vh(vec![
            route("exact", path(PathMatch::Exact("/a/b".into()))),
            route("regex", path(PathMatch::Regex("/a/[0-9]+".into()))),
            route("prefix-ab", path(PathMatch::Prefix("/a/b".into()))),
            route("prefix-a", path(PathMatch::Prefix("/a".into()))),
        ]);
        assert_eq!(find(&v, "GET", "/a/b", None, &[]), Some("exact"));
        assert_eq!(find(&v, "GET", "/a/12", None, &[]), Some("regex"));
        assert_eq!(
            find(&v, "GET", "/a/12x", None, &[]),
            Some("prefix-a"),
            "regex is anchored"
        );
        assert_eq!(find(&v, "GET", "/a/b/c", None, &[]), Some("prefix-ab"));
        assert_eq!(find(&v, "GET", "/z", None, &[]), None);
    }

    #[test]
    fn method_header_and_query_conditions() {
        let m = RouteMatch {
            path: PathMatch::Prefix("/".into()),
            method: Some("POST".into()),
            headers: vec![
                KeyMatch {
                    name: "x-env".into(),
                    value: StringMatch::Exact("prod".into()),
                },
                KeyMatch {
                    name: "x-ver".into(),
                    value: StringMatch::Regex("v[12]".into()),
                },
            ],
            query_params: vec![KeyMatch {
                name: "q".into(),
                value: StringMatch::Exact("1".into()),
            }],
            source: None,
        };
        let v = vh(vec![
            route("strict", m),
            route("fallback", path(PathMatch::Prefix("/".into()))),
        ]);
        let good = [("x-env", "prod"), ("x-ver", "v2")];
        assert_eq!(find(&v, "POST", "/x", Some("a=2&q=1"), &good), Some("strict"));
        assert_eq!(find(&v, "GET", "/x", Some("q=1"), &good), Some("fallback"));
        assert_eq!(find(&v, "POST", "/x", Some("q=2"), &good), Some("fallback"));
        assert_eq!(
            find(&v, "POST", "/x", Some("q=1"), &[("x-env", "prod"), ("x-ver", "v3")]),
            Some("fallback")
        );
        assert_eq!(
            find(&v, "POST", "/x", Some("q=1&q=2"), &good),
            Some("strict"),
            "first occurrence counts"
        );
    }

    #[test]
    fn host_lookup_prefers_exact_then_longest_wildcard() {
        let t = HostTable::build(vec![
            (
                "a.example.com".into(),
                vh(vec![route("exact", path(PathMatch::default()))]),
            ),
            (
                "*.example.com".into(),
                vh(vec![route("wild", path(PathMatch::default()))]),
            ),
            (
                "*.b.example.com".into(),
                vh(vec![route("wild-b", path(PathMatch::default()))]),
            ),
            ("*".into(), vh(vec![route("any", path(PathMatch::default()))])),
        ]);
        let name = |h: &str| t.find(h).map(|v| v.routes[0].name.clone()).unwrap();
        assert_eq!(name("a.example.com"), "exact");
        assert_eq!(name("z.example.com"), "wild");
        assert_eq!(name("x.b.example.com"), "wild-b");
        assert_eq!(name("example.com"), "any");
        assert_eq!(name("other.org"), "any");
    }

    #[test]
    fn ten_thousand_routes_index_by_path() {
        let routes = (0..10_000)
            .map(|i| route(&format!("r{i}"), path(PathMatch::Prefix(format!("/svc{i}")))))
            .collect();
        let v = vh(routes);
        assert_eq!(find(&v, "GET", "/svc9999/x", None, &[]), Some("r9999"));
        assert_eq!(v.exact.len() + v.regex.len(), 0);
    }
}
