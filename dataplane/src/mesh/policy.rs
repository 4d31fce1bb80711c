//! AuthorizationPolicy, compiled for one workload and evaluated per connection (L4) or, when
//! the workload's policies look at HTTP and the connection speaks it, per request (L7): CUSTOM
//! is refused by the translator; any matching DENY denies; with no ALLOW policy everything else
//! is allowed; otherwise a matching ALLOW is needed. AUDIT never decides. Dry-run policies are
//! evaluated and logged, never enforced.
//!
//! What a connection cannot show — a method, path, host, header or JWT on TCP — makes an ALLOW
//! rule that asks for it never match, and a DENY rule ignore those fields and match on the rest
//! (fail closed). A request without a valid JWT has no request principal and no claims.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ferrum_snapshot::identity::SpiffeId;
use ferrum_snapshot::istio::{Condition, Operation, Rule, Source};
use ferrum_snapshot::mesh::{AuthzAction, Policy, PolicyRule, Workload};
use serde_json::Value;

use super::ext_authz::ExtAuthz;
use super::jwt::Jwt;
use crate::proxy::ConnInfo;
use crate::upstream::ClusterRuntime;

/// What compiled policies reach their CUSTOM providers by: the config's clusters, by name,
/// and the registry their checks are counted in.
pub struct Upstreams<'a> {
    pub clusters: &'a HashMap<String, Arc<ClusterRuntime>>,
    pub registry: &'a crate::telemetry::Registry,
}

impl Upstreams<'static> {
    /// No clusters, and a registry of its own: for policies without providers (tests, benches).
    pub fn none() -> Upstreams<'static> {
        static CLUSTERS: std::sync::LazyLock<HashMap<String, Arc<ClusterRuntime>>> =
            std::sync::LazyLock::new(HashMap::new);
        static REGISTRY: std::sync::LazyLock<crate::telemetry::Registry> = std::sync::LazyLock::new(Default::default);
        Upstreams {
            clusters: &CLUSTERS,
            registry: &REGISTRY,
        }
    }
}

/// What a connection offers to be judged on.
pub struct Connection<'a> {
    /// The mTLS peer, if any (plaintext has none).
    pub peer: Option<&'a SpiffeId>,
    /// The address the connection comes from (`ipBlocks`).
    pub source: IpAddr,
    /// The client's, behind load balancers a gateway trusts (`remoteIpBlocks`): the source
    /// elsewhere.
    pub remote: IpAddr,
    pub destination: SocketAddr,
    /// The HTTP request, when judged per request.
    pub request: Option<&'a http::request::Parts>,
    /// The request's validated JWT (RequestAuthentication), if it carried one.
    pub auth: Option<&'a Jwt>,
}

impl<'a> Connection<'a> {
    /// A request a gateway's listener took on `conn` (no mTLS peer).
    fn gateway(req: &'a http::request::Parts, conn: &ConnInfo, auth: Option<&'a Jwt>) -> Self {
        Connection {
            peer: None,
            source: conn.peer.ip(),
            remote: conn.remote.ip(),
            destination: conn.listener,
            request: Some(req),
            auth,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Denied, by this policy (`namespace/name`), or by having no ALLOW that matched.
    Deny(String),
}

/// The policies that select one workload, compiled.
#[derive(Default)]
pub struct Authorizer {
    /// Enforced CUSTOM policies: a request one matches is asked of its provider first.
    custom: Vec<(Compiled, Arc<ExtAuthz>)>,
    deny: Vec<Compiled>,
    /// Enforced ALLOW rules that name principals or namespaces and nothing else (the common
    /// form), by pattern: a few lookups however many there are.
    allow_principals: Patterns,
    allow_namespaces: Patterns,
    /// Enforced ALLOW rules that name exact principals and also something else (operations,
    /// conditions): tried only for a caller with one of those principals.
    allow_by_principal: std::collections::HashMap<String, Vec<Compiled>>,
    /// Every other enforced ALLOW rule, tried in turn.
    allow: Vec<Compiled>,
    /// Whether any enforced ALLOW policy exists (then something must match).
    allow_any: bool,
    allow_dry_run: Vec<Compiled>,
    audit: Vec<Compiled>,
    /// Some rule looks at the HTTP request: HTTP connections are judged per request.
    http: bool,
}

/// Istio string patterns (exact, `prefix*`, `*suffix`, `*`) indexed: exact values in a set,
/// prefixes and suffixes in sets by length, so a value is checked with one lookup per distinct
/// pattern length instead of one comparison per pattern.
#[derive(Default)]
pub(crate) struct Patterns {
    exact: std::collections::HashSet<String>,
    prefixes: std::collections::HashMap<usize, std::collections::HashSet<String>>,
    suffixes: std::collections::HashMap<usize, std::collections::HashSet<String>>,
    any: bool,
}

impl Patterns {
    pub(crate) fn insert(&mut self, p: &str) {
        if p == "*" {
            self.any = true;
        } else if let Some(pre) = p.strip_suffix('*') {
            self.prefixes.entry(pre.len()).or_default().insert(pre.to_string());
        } else if let Some(suf) = p.strip_prefix('*') {
            self.suffixes.entry(suf.len()).or_default().insert(suf.to_string());
        } else {
            self.exact.insert(p.to_string());
        }
    }

    pub(crate) fn matches(&self, v: &str) -> bool {
        self.any
            || self.exact.contains(v)
            || self
                .prefixes
                .iter()
                .any(|(n, set)| v.get(..*n).is_some_and(|p| set.contains(p)))
            || self
                .suffixes
                .iter()
                .any(|(n, set)| v.len() >= *n && v.get(v.len() - n..).is_some_and(|s| set.contains(s)))
    }
}

/// The patterns of a rule that only names principals (or only namespaces), if it is one.
fn principals_or_namespaces_only(r: &Rule) -> Option<(Vec<String>, Vec<String>)> {
    if !r.to.is_empty() || !r.when.is_empty() || r.from.is_empty() {
        return None;
    }
    let (mut principals, mut namespaces) = (Vec::new(), Vec::new());
    for f in &r.from {
        let s = &f.source;
        let rest_empty = s.not_principals.is_empty()
            && s.request_principals.is_empty()
            && s.not_request_principals.is_empty()
            && s.not_namespaces.is_empty()
            && s.service_accounts.is_empty()
            && s.not_service_accounts.is_empty()
            && s.ip_blocks.is_empty()
            && s.not_ip_blocks.is_empty()
            && s.remote_ip_blocks.is_empty()
            && s.not_remote_ip_blocks.is_empty();
        match (s.principals.is_empty(), s.namespaces.is_empty()) {
            (false, true) if rest_empty => principals.extend(s.principals.iter().cloned()),
            (true, false) if rest_empty => namespaces.extend(s.namespaces.iter().cloned()),
            _ => return None,
        }
    }
    Some((principals, namespaces))
}

/// The exact principals of a rule whose every source names only exact principals, if it is one.
fn exact_principals(r: &Rule) -> Option<Vec<String>> {
    if r.from.is_empty() {
        return None;
    }
    let mut out = Vec::new();
    for f in &r.from {
        let s = &f.source;
        let only = *s
            == Source {
                principals: s.principals.clone(),
                ..Source::default()
            };
        if !only || s.principals.is_empty() || s.principals.iter().any(|p| p.contains('*')) {
            return None;
        }
        out.extend(s.principals.iter().cloned());
    }
    Some(out)
}

struct Compiled {
    name: String,
    dry_run: bool,
    rules: Vec<CRule>,
}

/// A rule with its address blocks and ports parsed, and what it needs from HTTP noted.
struct CRule {
    /// It names a method, path, host or request header.
    needs_request: bool,
    /// It names a request principal or a `request.auth.*` key (a JWT's).
    needs_jwt: bool,
    from: Vec<CSource>,
    to: Vec<COperation>,
    when: Vec<CCondition>,
}

struct CSource {
    principals: Vec<String>,
    not_principals: Vec<String>,
    request_principals: Vec<String>,
    not_request_principals: Vec<String>,
    namespaces: Vec<String>,
    not_namespaces: Vec<String>,
    service_accounts: Vec<String>,
    not_service_accounts: Vec<String>,
    ip_blocks: Vec<Net>,
    not_ip_blocks: Vec<Net>,
    remote_ip_blocks: Vec<Net>,
    not_remote_ip_blocks: Vec<Net>,
}

struct COperation {
    ports: Vec<u16>,
    not_ports: Vec<u16>,
    hosts: Vec<String>,
    not_hosts: Vec<String>,
    methods: Vec<String>,
    not_methods: Vec<String>,
    paths: Vec<String>,
    not_paths: Vec<String>,
}

struct CCondition {
    key: String,
    values: Vec<String>,
    not_values: Vec<String>,
    nets: Vec<Net>,
    not_nets: Vec<Net>,
}

/// An address block: `10.0.0.0/8` or a single address.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Net {
    addr: IpAddr,
    prefix: u8,
}

impl Net {
    pub(crate) fn parse(s: &str) -> Option<Net> {
        let (a, p) = s.split_once('/').unwrap_or((s, ""));
        let addr: IpAddr = a.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if p.is_empty() {
            max
        } else {
            p.parse().ok().filter(|p| *p <= max)?
        };
        Some(Net { addr, prefix })
    }

    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        let bits = |ip: IpAddr| -> u128 {
            match ip {
                IpAddr::V4(v) => u32::from(v) as u128,
                IpAddr::V6(v) => u128::from(v),
            }
        };
        if self.addr.is_ipv4() != ip.is_ipv4() {
            return false;
        }
        let width = if ip.is_ipv4() { 32 } else { 128 };
        let shift = width - self.prefix as u32;
        shift >= width || (bits(self.addr) >> shift) == (bits(ip) >> shift)
    }
}

fn nets(v: &[String]) -> Vec<Net> {
    // The translator refuses blocks that do not parse.
    v.iter().filter_map(|s| Net::parse(s)).collect()
}

fn ports(v: &[String]) -> Vec<u16> {
    v.iter().filter_map(|p| p.parse().ok()).collect()
}

/// Istio string matching: exact, `prefix*`, `*suffix`, or `*` for anything.
fn string_match(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    if let Some(p) = pattern.strip_suffix('*') {
        return value.starts_with(p);
    }
    if let Some(s) = pattern.strip_prefix('*') {
        return value.ends_with(s);
    }
    pattern == value
}

/// A field with values matches when any value does; an empty field is no constraint.
fn field(values: &[String], got: Option<&str>) -> bool {
    values.is_empty() || got.is_some_and(|g| values.iter().any(|v| string_match(v, g)))
}

fn not_field(values: &[String], got: Option<&str>) -> bool {
    values.is_empty() || !got.is_some_and(|g| values.iter().any(|v| string_match(v, g)))
}

fn in_nets(nets: &[Net], ip: IpAddr) -> bool {
    nets.is_empty() || nets.iter().any(|n| n.contains(ip))
}

fn not_in_nets(nets: &[Net], ip: IpAddr) -> bool {
    !nets.iter().any(|n| n.contains(ip))
}

/// Whether the rule looks at the HTTP request (method, path, host, headers).
fn needs_request(r: &Rule) -> bool {
    r.to.iter().map(|t| &t.operation).any(|o| {
        !(o.hosts.is_empty()
            && o.not_hosts.is_empty()
            && o.methods.is_empty()
            && o.not_methods.is_empty()
            && o.paths.is_empty()
            && o.not_paths.is_empty())
    }) || r.when.iter().any(|c| c.key.starts_with("request.headers"))
}

/// Whether the rule looks at a validated JWT (request principals, `request.auth.*`).
fn needs_jwt(r: &Rule) -> bool {
    r.from
        .iter()
        .any(|f| !f.source.request_principals.is_empty() || !f.source.not_request_principals.is_empty())
        || r.when.iter().any(|c| c.key.starts_with("request.auth."))
}

/// Istio path matching: a string pattern, or a template where `{*}` is one segment and a final
/// `{**}` any number of them.
fn path_match(pattern: &str, path: &str) -> bool {
    if !pattern.contains('{') {
        return string_match(pattern, path);
    }
    let mut want = pattern.split('/');
    let mut got = path.split('/');
    loop {
        match (want.next(), got.next()) {
            (Some("{**}"), _) => return want.next().is_none(),
            (Some("{*}"), Some(g)) if !g.is_empty() => {}
            (Some(w), Some(g)) if w == g => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// A host pattern against the request's host, with or without its port, ignoring case.
fn host_match(pattern: &str, host: &str) -> bool {
    let (p, h) = (pattern.to_ascii_lowercase(), host.to_ascii_lowercase());
    string_match(&p, &h) || h.rsplit_once(':').is_some_and(|(name, _)| string_match(&p, name))
}

impl CRule {
    fn compile(r: &Rule) -> CRule {
        let source = |s: &Source| CSource {
            principals: s.principals.clone(),
            not_principals: s.not_principals.clone(),
            request_principals: s.request_principals.clone(),
            not_request_principals: s.not_request_principals.clone(),
            namespaces: s.namespaces.clone(),
            not_namespaces: s.not_namespaces.clone(),
            service_accounts: s.service_accounts.clone(),
            not_service_accounts: s.not_service_accounts.clone(),
            ip_blocks: nets(&s.ip_blocks),
            not_ip_blocks: nets(&s.not_ip_blocks),
            remote_ip_blocks: nets(&s.remote_ip_blocks),
            not_remote_ip_blocks: nets(&s.not_remote_ip_blocks),
        };
        let operation = |o: &Operation| COperation {
            ports: ports(&o.ports),
            not_ports: ports(&o.not_ports),
            hosts: o.hosts.clone(),
            not_hosts: o.not_hosts.clone(),
            methods: o.methods.clone(),
            not_methods: o.not_methods.clone(),
            paths: o.paths.clone(),
            not_paths: o.not_paths.clone(),
        };
        let condition = |c: &Condition| CCondition {
            key: c.key.clone(),
            values: c.values.clone(),
            not_values: c.not_values.clone(),
            nets: nets(&c.values),
            not_nets: nets(&c.not_values),
        };
        CRule {
            needs_request: needs_request(r),
            needs_jwt: needs_jwt(r),
            from: r.from.iter().map(|f| source(&f.source)).collect(),
            to: r.to.iter().map(|t| operation(&t.operation)).collect(),
            when: r.when.iter().map(condition).collect(),
        }
    }

    /// Whether it matches; `deny` says how to treat what cannot be known (see the module).
    fn matches(&self, f: &Facts<'_>, deny: bool) -> bool {
        if !deny && (self.needs_jwt || self.needs_request) && f.request.is_none() {
            return false;
        }
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(f)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(f)))
            && self.when.iter().filter(|w| w.knowable(f)).all(|w| w.matches(f))
    }
}

impl CSource {
    fn matches(&self, f: &Facts<'_>) -> bool {
        let (principal, ns, sa) = (f.principal.as_deref(), f.namespace, f.service_account.as_deref());
        let request_principal = f.auth.map(|a| a.principal.as_str());
        // Unknowable without a request: only DENY rules get here, and they ignore it.
        let jwt_known = f.request.is_some();
        field(&self.principals, principal)
            && not_field(&self.not_principals, principal)
            && (!jwt_known || field(&self.request_principals, request_principal))
            && (!jwt_known || not_field(&self.not_request_principals, request_principal))
            && field(&self.namespaces, ns)
            && not_field(&self.not_namespaces, ns)
            && field(&self.service_accounts, sa)
            && not_field(&self.not_service_accounts, sa)
            && in_nets(&self.ip_blocks, f.source)
            && not_in_nets(&self.not_ip_blocks, f.source)
            && in_nets(&self.remote_ip_blocks, f.remote)
            && not_in_nets(&self.not_remote_ip_blocks, f.remote)
    }
}

impl COperation {
    fn matches(&self, f: &Facts<'_>) -> bool {
        let port = f.destination.port();
        let l4 = (self.ports.is_empty() || self.ports.contains(&port)) && !self.not_ports.contains(&port);
        let Some(r) = f.request else {
            // Unknowable without a request: only DENY rules get here, and they ignore it.
            return l4;
        };
        let host = r
            .uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| r.headers.get(http::header::HOST).and_then(|h| h.to_str().ok()))
            .unwrap_or("");
        let any = |pats: &[String], m: &dyn Fn(&str) -> bool| pats.iter().any(|p| m(p));
        let (method, path) = (r.method.as_str(), r.uri.path());
        l4 && (self.hosts.is_empty() || any(&self.hosts, &|p| host_match(p, host)))
            && !any(&self.not_hosts, &|p| host_match(p, host))
            && (self.methods.is_empty() || any(&self.methods, &|p| string_match(p, method)))
            && !any(&self.not_methods, &|p| string_match(p, method))
            && (self.paths.is_empty() || any(&self.paths, &|p| path_match(p, path)))
            && !any(&self.not_paths, &|p| path_match(p, path))
    }
}

impl CCondition {
    /// Whether this request or connection can say (else a DENY rule ignores the condition).
    fn knowable(&self, f: &Facts<'_>) -> bool {
        !(self.key.starts_with("request.") && f.request.is_none())
    }

    /// The values a `request.auth.*` key has for this request (none without a token); `None`
    /// for other keys.
    fn auth_values(&self, f: &Facts<'_>) -> Option<Vec<String>> {
        let key = self.key.strip_prefix("request.auth.")?;
        let Some(auth) = f.auth else { return Some(Vec::new()) };
        let claim = |path: &[&str]| {
            let mut v = auth.claims.get(*path.first()?)?;
            for p in &path[1..] {
                v = v.get(p)?;
            }
            Some(v)
        };
        let found = match key {
            "principal" => return Some(vec![auth.principal.clone()]),
            "audiences" => claim(&["aud"]),
            "presenter" => claim(&["azp"]),
            k => k
                .strip_prefix("claims[")
                .and_then(|k| k.strip_suffix(']'))
                .and_then(|k| claim(&k.split("][").collect::<Vec<_>>())),
        };
        Some(match found {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
            Some(v @ (Value::Number(_) | Value::Bool(_))) => vec![v.to_string()],
            _ => Vec::new(),
        })
    }

    fn matches(&self, f: &Facts<'_>) -> bool {
        if let Some(got) = self.auth_values(f) {
            let any = |pats: &[String]| got.iter().any(|g| pats.iter().any(|p| string_match(p, g)));
            return (self.values.is_empty() || any(&self.values)) && !any(&self.not_values);
        }
        if let (Some(name), Some(r)) = (
            self.key
                .strip_prefix("request.headers[")
                .and_then(|k| k.strip_suffix(']')),
            f.request,
        ) {
            let got = r.headers.get(name).and_then(|v| v.to_str().ok());
            return field(&self.values, got) && not_field(&self.not_values, got);
        }
        let ip = match self.key.as_str() {
            "source.ip" | "remote.ip" => Some(f.source),
            "destination.ip" => Some(f.destination.ip()),
            _ => None,
        };
        if let Some(ip) = ip {
            return (self.values.is_empty() || self.nets.iter().any(|n| n.contains(ip)))
                && not_in_nets(&self.not_nets, ip);
        }
        let got: Option<&str> = match self.key.as_str() {
            "destination.port" => Some(f.port.as_str()),
            "source.namespace" => f.namespace,
            "source.principal" => f.principal.as_deref(),
            // Not known at L4 (connection.sni comes with TLS inspection; request.* with HTTP).
            _ => None,
        };
        field(&self.values, got) && not_field(&self.not_values, got)
    }
}

/// What every rule looks at, worked out once per connection.
struct Facts<'a> {
    principal: Option<String>,
    namespace: Option<&'a str>,
    service_account: Option<String>,
    source: IpAddr,
    remote: IpAddr,
    destination: SocketAddr,
    port: String,
    request: Option<&'a http::request::Parts>,
    auth: Option<&'a Jwt>,
}

impl<'a> Facts<'a> {
    fn of(c: &Connection<'a>) -> Facts<'a> {
        Facts {
            principal: c.peer.map(|p| p.principal()),
            namespace: c.peer.map(|p| p.namespace.as_str()),
            service_account: c.peer.map(|p| format!("{}/{}", p.namespace, p.service_account)),
            source: c.source,
            remote: c.remote,
            destination: c.destination,
            port: c.destination.port().to_string(),
            request: c.request,
            auth: c.auth,
        }
    }
}

impl Compiled {
    fn matches(&self, f: &Facts<'_>, deny: bool) -> bool {
        self.rules.iter().any(|r| r.matches(f, deny))
    }
}

impl Authorizer {
    /// The policies in `policies` that select `w`.
    pub fn for_workload(policies: &[Arc<Policy>], w: &Workload, upstreams: &Upstreams) -> Authorizer {
        Authorizer::compile(policies.iter().filter(|p| p.applies_to(w)).map(|p| &**p), upstreams)
    }

    /// The AuthorizationPolicies among `policies`, compiled (the rest are skipped); CUSTOM
    /// providers are reached by their cluster among `upstreams`.
    pub fn compile<'a>(policies: impl Iterator<Item = &'a Policy>, upstreams: &Upstreams) -> Authorizer {
        let mut a = Authorizer::default();
        for p in policies {
            let PolicyRule::Authorization(authz) = &p.rule else {
                continue;
            };
            let name = format!("{}/{}", p.namespace, p.name);
            a.http |= authz.rules.iter().any(needs_request);
            let compile = |rules: &mut dyn Iterator<Item = &Rule>| Compiled {
                name: name.clone(),
                dry_run: authz.dry_run,
                rules: rules.map(CRule::compile).collect(),
            };
            match authz.action {
                // Asking needs the request: HTTP connections are judged per request.
                AuthzAction::Deny if authz.check.is_some() && !authz.dry_run => {
                    a.http = true;
                    let service = Arc::new(ExtAuthz::new(authz.check.as_ref().expect("checked"), upstreams));
                    a.custom.push((compile(&mut authz.rules.iter()), service));
                }
                AuthzAction::Deny => a.deny.push(compile(&mut authz.rules.iter())),
                AuthzAction::Audit => a.audit.push(compile(&mut authz.rules.iter())),
                AuthzAction::Allow if authz.dry_run => a.allow_dry_run.push(compile(&mut authz.rules.iter())),
                AuthzAction::Allow => {
                    a.allow_any = true;
                    // Rules OR, and ALLOW policies OR: indexable rules can leave their policy.
                    let mut rest = Vec::new();
                    for r in &authz.rules {
                        if let Some((principals, namespaces)) = principals_or_namespaces_only(r) {
                            principals.iter().for_each(|p| a.allow_principals.insert(p));
                            namespaces.iter().for_each(|n| a.allow_namespaces.insert(n));
                        } else if let Some(principals) = exact_principals(r) {
                            for p in principals {
                                let c = compile(&mut std::iter::once(r));
                                a.allow_by_principal.entry(p).or_default().push(c);
                            }
                        } else {
                            rest.push(r);
                        }
                    }
                    if !rest.is_empty() {
                        a.allow.push(compile(&mut rest.into_iter()));
                    }
                }
            }
        }
        a
    }

    /// Whether HTTP connections must be judged request by request.
    pub fn needs_http(&self) -> bool {
        self.http
    }

    pub fn is_empty(&self) -> bool {
        self.custom.is_empty()
            && self.deny.is_empty()
            && !self.allow_any
            && self.allow_dry_run.is_empty()
            && self.audit.is_empty()
    }

    /// The provider of the first CUSTOM policy that matches the request `c` carries: it is
    /// asked before [`Self::check`] decides (Envoy's ext_authz filter runs before its RBAC).
    pub fn asks(&self, c: &Connection<'_>) -> Option<Arc<ExtAuthz>> {
        if self.custom.is_empty() || c.request.is_none() {
            return None;
        }
        let f = Facts::of(c);
        self.custom
            .iter()
            .find(|(p, _)| p.matches(&f, true))
            .map(|(_, service)| service.clone())
    }

    /// The decision for one connection, in Istio's order.
    pub fn check(&self, c: &Connection<'_>) -> Decision {
        if self.is_empty() {
            return Decision::Allow;
        }
        let f = Facts::of(c);
        for p in self.audit.iter().filter(|p| p.matches(&f, false)) {
            tracing::info!(policy = %p.name, source = %c.source, "audit: connection matches");
        }
        for p in self.deny.iter().filter(|p| p.matches(&f, true)) {
            if p.dry_run {
                tracing::info!(policy = %p.name, source = %c.source, "dry-run: would deny");
                continue;
            }
            return Decision::Deny(p.name.clone());
        }
        // A connection shows no request to ask about: what a CUSTOM policy matches is refused.
        if c.request.is_none()
            && let Some((p, _)) = self.custom.iter().find(|(p, _)| p.matches(&f, true))
        {
            return Decision::Deny(format!("{} (CUSTOM, asked about requests only)", p.name));
        }
        for p in self.allow_dry_run.iter().filter(|p| !p.matches(&f, false)) {
            tracing::info!(policy = %p.name, source = %c.source, "dry-run: no ALLOW rule matches");
        }
        let allowed = !self.allow_any
            || f.principal.as_deref().is_some_and(|p| self.allow_principals.matches(p))
            || f.namespace.is_some_and(|n| self.allow_namespaces.matches(n))
            || f.principal
                .as_deref()
                .and_then(|p| self.allow_by_principal.get(p))
                .is_some_and(|rules| rules.iter().any(|r| r.matches(&f, false)))
            || self.allow.iter().any(|p| p.matches(&f, false));
        if allowed {
            Decision::Allow
        } else {
            Decision::Deny("no ALLOW policy matches".into())
        }
    }
}

#[cfg(test)]
mod tests;

/// What a gateway's policies make of one request (for `ferrumctl explain`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayDecision {
    Allow,
    /// A RequestAuthentication refuses its token (why): 401.
    Unauthenticated(String),
    /// Denied by this policy (`namespace/name`), or by no ALLOW matching: 403.
    Deny(String),
    /// A CUSTOM policy asks this provider first; if it lets the request on, the rest decides
    /// (without the headers the provider would add).
    Ask(String, Box<GatewayDecision>),
}

/// The AuthorizationPolicies and RequestAuthentications that target a Gateway (`targetRefs`),
/// for the listeners that serve it: each request is authenticated, then authorized, before it
/// is routed.
pub struct GatewayPolicies {
    authz: Authorizer,
    authn: super::jwt::Authenticator,
}

impl GatewayPolicies {
    /// Those of `policies` that target one of `gateways`; `None` when there are none.
    pub fn for_gateways(
        policies: &[Arc<Policy>],
        gateways: &[&str],
        jwks: &super::jwt::JwksCache,
        upstreams: &Upstreams,
    ) -> Option<GatewayPolicies> {
        let targeting = || {
            policies
                .iter()
                .filter(|p| p.targets.iter().any(|t| gateways.contains(&t.as_str())))
                .map(|p| &**p)
        };
        let g = GatewayPolicies {
            authz: Authorizer::compile(targeting(), upstreams),
            authn: super::jwt::Authenticator::compile(targeting(), jwks),
        };
        (!g.authz.is_empty() || !g.authn.is_empty()).then_some(g)
    }

    /// The verdict on one request a listener took on `conn`: its token, then a CUSTOM policy's
    /// provider, then the other AuthorizationPolicies.
    pub fn judge(self: &Arc<Self>, req: &mut http::request::Parts, conn: &ConnInfo) -> super::l7::Verdict {
        let client = conn.remote;
        let auth = match self.authn.authenticate(req) {
            Ok(auth) => auth,
            Err(why) => {
                tracing::info!(%client, path = req.uri.path(), reason = %why, "token refused");
                return super::l7::Verdict::Unauthenticated;
            }
        };
        if let Some(service) = self.authz.asks(&Connection::gateway(req, conn, auth.as_ref())) {
            let (me, conn) = (self.clone(), *conn);
            let then = move |req: &mut http::request::Parts| me.authorize(req, &conn, auth.as_ref());
            return super::l7::Verdict::Ask(Box::new(super::ext_authz::Ask {
                service,
                who: super::ext_authz::Requester {
                    client,
                    principal: None,
                    destination: conn.listener,
                },
                then: Box::new(then),
            }));
        }
        self.authorize(req, conn, auth.as_ref())
    }

    fn authorize(&self, req: &http::request::Parts, conn: &ConnInfo, auth: Option<&Jwt>) -> super::l7::Verdict {
        match self.authz.check(&Connection::gateway(req, conn, auth)) {
            Decision::Allow => super::l7::Verdict::Allow,
            Decision::Deny(why) => {
                let client = conn.remote;
                tracing::info!(%client, method = %req.method, path = req.uri.path(), policy = %why, "request denied");
                super::l7::Verdict::Deny
            }
        }
    }

    /// [`Self::judge`]'s reading of a request, with the reasons, and no provider asked.
    pub fn decide(&self, req: &mut http::request::Parts, conn: &ConnInfo) -> GatewayDecision {
        let auth = match self.authn.authenticate(req) {
            Ok(auth) => auth,
            Err(why) => return GatewayDecision::Unauthenticated(why.to_string()),
        };
        let conn = Connection::gateway(req, conn, auth.as_ref());
        let rest = match self.authz.check(&conn) {
            Decision::Allow => GatewayDecision::Allow,
            Decision::Deny(why) => GatewayDecision::Deny(why),
        };
        match self.authz.asks(&conn) {
            Some(service) => GatewayDecision::Ask(service.spec.provider.clone(), Box::new(rest)),
            None => rest,
        }
    }

    /// Why one connection of a TCP or TLS listener is denied (the denying policy), if it is: no
    /// request, so rules on HTTP fields never allow and always deny (Istio's reading for TCP),
    /// and a token is never seen.
    pub fn denies_connection(&self, conn: &ConnInfo) -> Option<String> {
        let conn = Connection {
            peer: None,
            source: conn.peer.ip(),
            remote: conn.remote.ip(),
            destination: conn.listener,
            request: None,
            auth: None,
        };
        match self.authz.check(&conn) {
            Decision::Allow => None,
            Decision::Deny(why) => Some(why),
        }
    }
}
