//! Istio AuthorizationPolicies that target a Gateway (`targetRefs`), as Envoy RBAC filters in
//! front of the router (HTTP) or the TCP proxy (TCP and TLS listeners): the CUSTOM providers'
//! filters (`ext_authz`), a DENY filter, then an ALLOW filter when any ALLOW policy applies —
//! Istio's order, and what ferrum-dp decides.
//!
//! Each Istio rule becomes one RBAC policy: its `from` sources are the principals, its `to`
//! operations and `when` conditions the permissions (Envoy ORs the entries of each list and ANDs
//! the two); token fields read what the `jwt_authn` filter validated ([`Providers`]). What
//! Envoy cannot check (on TCP and TLS listeners, HTTP and token fields) fails closed, as Istio
//! does: an ALLOW rule that needs it is dropped, a DENY rule ignores it and so denies more.
//! Each case is reported.

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::listener::v3 as listener;
use envoy_types::pb::envoy::config::rbac::v3 as rbac;
use envoy_types::pb::envoy::config::route::v3 as route;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use envoy_types::pb::google::protobuf::UInt32Value;
use ferrum_snapshot::istio::{Condition, Operation, Rule, Source};
use ferrum_snapshot::mesh::{AuthzAction, Policy, PolicyRule};
use rbac::permission::Rule as Perm;
use rbac::principal::Identifier as Id;

use super::ext_authz::Custom;
use super::jwt::Providers;
use super::resources::any;

/// What one listener is told: the CUSTOM policies' providers with their rules, the DENY rules,
/// and the ALLOW rules when any ALLOW policy applies.
#[derive(Debug, Default, PartialEq)]
pub struct Rules {
    pub custom: Vec<Custom>,
    pub deny: Option<rbac::Rbac>,
    pub allow: Option<rbac::Rbac>,
}

/// The rules of the AuthorizationPolicies that target one of `gateways`; `l4` for TCP and TLS
/// listeners (no HTTP request to look at).
///
/// `jwt` holds the listener's JWT providers (none for TCP and TLS listeners): rules on tokens
/// read what they validated.
pub fn rules(
    policies: &[Arc<Policy>],
    gateways: &[String],
    l4: bool,
    jwt: &Providers,
    unsupported: &mut Vec<String>,
) -> Rules {
    let mut out = Rules::default();
    for p in policies
        .iter()
        .filter(|p| p.targets.iter().any(|t| gateways.contains(t)))
    {
        let name = format!("{}/{}", p.namespace, p.name);
        let authz = match &p.rule {
            PolicyRule::Authorization(a) => a,
            PolicyRule::RequestAuthentication(_) | PolicyRule::PeerAuthentication(_) => continue,
        };
        let deny = match authz.action {
            _ if authz.dry_run => continue,
            AuthzAction::Audit => continue,
            // A CUSTOM policy (one with a `check`) is a DENY where no request can be asked
            // about (TCP and TLS listeners): closed, not open.
            AuthzAction::Deny => true,
            AuthzAction::Allow => false,
        };
        let set = out.set_for(authz.check.as_deref().filter(|_| !l4), deny);
        let shadow = authz.check.is_some() && !l4;
        for (i, r) in authz.rules.iter().enumerate() {
            let mut why = Vec::new();
            let policy = rule(r, deny, l4, jwt, &mut why);
            let rule_name = format!("{name}[{i}]");
            for w in why {
                let effect = match deny {
                    true => "ignored (the rule denies more)",
                    false => "the rule is dropped (it allows nothing)",
                };
                unsupported.push(format!("AuthorizationPolicy rule {rule_name}: {w}: {effect}"));
            }
            if let Some(policy) = policy {
                let rule_name = if shadow {
                    Custom::policy_name(&rule_name)
                } else {
                    rule_name
                };
                set.policies.insert(rule_name, policy);
            }
        }
    }
    out
}

impl Rules {
    /// Where a policy's rules go: its provider's shadow rules for a CUSTOM policy, else the
    /// DENY or the ALLOW filter's.
    fn set_for(&mut self, check: Option<&ferrum_snapshot::mesh::ExtAuthz>, deny: bool) -> &mut rbac::Rbac {
        let action = |a: rbac::rbac::Action| rbac::Rbac {
            action: a as i32,
            ..Default::default()
        };
        match (check, deny) {
            (Some(check), _) => {
                let at = match self.custom.iter().position(|c| c.provider == *check) {
                    Some(i) => i,
                    None => {
                        self.custom.push(Custom::new(check.clone()));
                        self.custom.len() - 1
                    }
                };
                &mut self.custom[at].rules
            }
            (None, true) => self.deny.get_or_insert_with(|| action(rbac::rbac::Action::Deny)),
            (None, false) => self.allow.get_or_insert_with(|| action(rbac::rbac::Action::Allow)),
        }
    }

    /// DENY then ALLOW, each made into a filter by `filter(which, rules)` when present.
    fn each<F>(self, filter: impl Fn(&str, rbac::Rbac) -> F) -> Vec<F> {
        [("deny", self.deny), ("allow", self.allow)]
            .into_iter()
            .filter_map(|(which, rules)| Some(filter(which, rules?)))
            .collect()
    }
}

/// The HTTP filters that enforce `r`, to go before the router: the CUSTOM providers' first.
pub fn http_filters(mut r: Rules) -> Vec<hcm::HttpFilter> {
    let mut out = super::ext_authz::http_filters(std::mem::take(&mut r.custom));
    out.extend(r.each(|which, rules| {
        let config = HttpRbac {
            rules: Some(rules),
            rules_stat_prefix: format!("{which}_"),
            ..Default::default()
        };
        hcm::HttpFilter {
            name: format!("envoy.filters.http.rbac.{which}"),
            config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(
                "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
                &config,
            ))),
            ..Default::default()
        }
    }));
    out
}

/// The network filters that enforce `r`, to go before the TCP proxy.
pub fn network_filters(r: Rules, stat_prefix: &str) -> Vec<listener::Filter> {
    r.each(|which, rules| {
        let config = NetworkRbac {
            rules: Some(rules),
            stat_prefix: format!("{stat_prefix}.{which}"),
            ..Default::default()
        };
        listener::Filter {
            name: format!("envoy.filters.network.rbac.{which}"),
            config_type: Some(listener::filter::ConfigType::TypedConfig(any(
                "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC",
                &config,
            ))),
        }
    })
}

/// One Istio rule as an RBAC policy; `None` when an ALLOW rule needs what Envoy is not told.
/// Why anything was left out goes to `why`.
fn rule(r: &Rule, deny: bool, l4: bool, jwt: &Providers, why: &mut Vec<String>) -> Option<rbac::Policy> {
    let before = why.len();
    let sources: Vec<Id> = r.from.iter().map(|f| source(&f.source, l4, jwt, why)).collect();
    let operations: Vec<Perm> = r.to.iter().map(|t| operation(&t.operation, l4, why)).collect();
    let mut permissions = Vec::new();
    let mut principals = Vec::new();
    if !operations.is_empty() {
        permissions.push(or_rules(operations));
    }
    if !sources.is_empty() {
        principals.push(or_ids(sources));
    }
    for c in &r.when {
        match condition(c, l4, jwt) {
            Ok(Some(When::Permission(p))) => permissions.push(p),
            Ok(Some(When::Principal(p))) => principals.push(p),
            Ok(None) => {}
            Err(w) => why.push(w.to_string()),
        }
    }
    if !deny && why.len() > before {
        return None;
    }
    Some(rbac::Policy {
        permissions: vec![permission(and_rules(permissions))],
        principals: vec![principal(and_ids(principals))],
        ..Default::default()
    })
}

fn source(s: &Source, l4: bool, jwt: &Providers, why: &mut Vec<String>) -> Id {
    let mut ids = Vec::new();
    let mut field = |values: &[String], not: bool, id: &dyn Fn(&str) -> Option<Id>| {
        if values.is_empty() {
            return;
        }
        let set = or_ids(values.iter().filter_map(|v| id(v)).collect());
        ids.push(if not { Id::NotId(Box::new(principal(set))) } else { set });
    };
    field(&s.principals, false, &|v| Some(spiffe(v)));
    field(&s.not_principals, true, &|v| Some(spiffe(v)));
    field(&s.namespaces, false, &|v| Some(namespace(v)));
    field(&s.not_namespaces, true, &|v| Some(namespace(v)));
    field(&s.service_accounts, false, &|v| Some(service_account(v)));
    field(&s.not_service_accounts, true, &|v| Some(service_account(v)));
    field(&s.ip_blocks, false, &|v| cidr(v).map(Id::DirectRemoteIp));
    field(&s.not_ip_blocks, true, &|v| cidr(v).map(Id::DirectRemoteIp));
    field(&s.remote_ip_blocks, false, &|v| cidr(v).map(Id::RemoteIp));
    field(&s.not_remote_ip_blocks, true, &|v| cidr(v).map(Id::RemoteIp));
    if l4 {
        if !s.request_principals.is_empty() || !s.not_request_principals.is_empty() {
            why.push("requestPrincipals need a token (a TCP listener has no request)".into());
        }
    } else {
        field(&s.request_principals, false, &|v| Some(jwt.principal(v)));
        field(&s.not_request_principals, true, &|v| Some(jwt.principal(v)));
    }
    and_ids(ids)
}

fn operation(o: &Operation, l4: bool, why: &mut Vec<String>) -> Perm {
    let mut rules = Vec::new();
    let mut field = |values: &[String], not: bool, perm: &dyn Fn(&str) -> Perm| {
        if values.is_empty() {
            return;
        }
        let set = or_rules(values.iter().map(|v| perm(v)).collect());
        rules.push(if not {
            Perm::NotRule(Box::new(permission(set)))
        } else {
            set
        });
    };
    field(&o.ports, false, &port);
    field(&o.not_ports, true, &port);
    let http = [
        &o.hosts,
        &o.not_hosts,
        &o.methods,
        &o.not_methods,
        &o.paths,
        &o.not_paths,
    ];
    if l4 {
        if http.iter().any(|v| !v.is_empty()) {
            why.push("hosts, methods and paths need an HTTP request (a TCP listener has none)".into());
        }
    } else {
        field(&o.hosts, false, &host);
        field(&o.not_hosts, true, &host);
        field(&o.methods, false, &|v| Perm::Header(header(":method", istio_string(v))));
        field(&o.not_methods, true, &|v| {
            Perm::Header(header(":method", istio_string(v)))
        });
        field(&o.paths, false, &path);
        field(&o.not_paths, true, &path);
    }
    and_rules(rules)
}

enum When {
    Permission(Perm),
    Principal(Id),
}

/// Why Envoy cannot check a `when` condition.
#[derive(Debug, thiserror::Error)]
enum Unchecked {
    #[error("`{0}` needs an HTTP request (a TCP listener has none)")]
    NeedsRequest(String),
    #[error("`{0}` needs a token (a TCP listener has no request)")]
    NeedsToken(String),
    #[error("the condition key `{0}` is not known")]
    UnknownKey(String),
}

/// A `when` condition on the side of the policy Envoy can check it; `Ok(None)` when nothing
/// is left to check.
fn condition(c: &Condition, l4: bool, jwt: &Providers) -> Result<Option<When>, Unchecked> {
    let key = c.key.as_str();
    let both = |values: &[String], not_values: &[String], one: &dyn Fn(&str) -> Option<Perm>| {
        let mut parts = Vec::new();
        if !values.is_empty() {
            parts.push(or_rules(values.iter().filter_map(|v| one(v)).collect()));
        }
        if !not_values.is_empty() {
            let set = or_rules(not_values.iter().filter_map(|v| one(v)).collect());
            parts.push(Perm::NotRule(Box::new(permission(set))));
        }
        (!parts.is_empty()).then(|| When::Permission(and_rules(parts)))
    };
    let ids = |one: &dyn Fn(&str) -> Option<Id>| {
        let mut parts = Vec::new();
        if !c.values.is_empty() {
            parts.push(or_ids(c.values.iter().filter_map(|v| one(v)).collect()));
        }
        if !c.not_values.is_empty() {
            let set = or_ids(c.not_values.iter().filter_map(|v| one(v)).collect());
            parts.push(Id::NotId(Box::new(principal(set))));
        }
        (!parts.is_empty()).then(|| When::Principal(and_ids(parts)))
    };
    if let Some(name) = key.strip_prefix("request.headers[").and_then(|k| k.strip_suffix(']')) {
        if l4 {
            return Err(Unchecked::NeedsRequest(key.into()));
        }
        return Ok(both(&c.values, &c.not_values, &|v| {
            Some(Perm::Header(header(name, istio_string(v))))
        }));
    }
    Ok(match key {
        "source.ip" => ids(&|v| cidr(v).map(Id::DirectRemoteIp)),
        "remote.ip" => ids(&|v| cidr(v).map(Id::RemoteIp)),
        "source.namespace" => ids(&|v| Some(namespace(v))),
        "source.principal" => ids(&|v| Some(spiffe(v))),
        "destination.ip" => both(&c.values, &c.not_values, &|v| cidr(v).map(Perm::DestinationIp)),
        "destination.port" => both(&c.values, &c.not_values, &|v| Some(port(v))),
        "connection.sni" => both(&c.values, &c.not_values, &|v| {
            Some(Perm::RequestedServerName(istio_string(v)))
        }),
        k if k.starts_with("request.auth.") && l4 => {
            return Err(Unchecked::NeedsToken(key.into()));
        }
        k if k.starts_with("request.auth.") => {
            let claim = &k["request.auth.".len()..];
            if jwt.claim(claim, "*").is_none() {
                return Err(Unchecked::UnknownKey(key.into()));
            }
            ids(&|v| jwt.claim(claim, v))
        }
        _ => return Err(Unchecked::UnknownKey(key.into())),
    })
}

/// Istio's string forms: exact, `prefix*`, `*suffix`, `*` (anything, present).
pub(super) fn istio_string(v: &str) -> matcher::StringMatcher {
    use matcher::string_matcher::MatchPattern;
    let pattern = if v == "*" {
        MatchPattern::SafeRegex(regex(".*"))
    } else if let Some(p) = v.strip_suffix('*') {
        MatchPattern::Prefix(p.into())
    } else if let Some(s) = v.strip_prefix('*') {
        MatchPattern::Suffix(s.into())
    } else {
        MatchPattern::Exact(v.into())
    };
    matcher::StringMatcher {
        match_pattern: Some(pattern),
        ..Default::default()
    }
}

/// An Istio string form as an (unanchored) regular expression, `any` for what `*` stands for.
fn istio_regex(v: &str, any: &str) -> String {
    if v == "*" {
        any.to_string()
    } else if let Some(p) = v.strip_suffix('*') {
        format!("{}{any}", regex::escape(p))
    } else if let Some(s) = v.strip_prefix('*') {
        format!("{any}{}", regex::escape(s))
    } else {
        regex::escape(v)
    }
}

fn regex(r: &str) -> matcher::RegexMatcher {
    matcher::RegexMatcher {
        regex: r.into(),
        ..Default::default()
    }
}

fn regex_string(r: String) -> matcher::StringMatcher {
    matcher::StringMatcher {
        match_pattern: Some(matcher::string_matcher::MatchPattern::SafeRegex(regex(&r))),
        ..Default::default()
    }
}

fn header(name: &str, m: matcher::StringMatcher) -> route::HeaderMatcher {
    route::HeaderMatcher {
        name: name.into(),
        header_match_specifier: Some(route::header_matcher::HeaderMatchSpecifier::StringMatch(m)),
        ..Default::default()
    }
}

/// A host pattern against `:authority`, with or without its port, ignoring case.
fn host(v: &str) -> Perm {
    let r = format!("(?i)^{}(:[0-9]+)?$", istio_regex(v, ".*"));
    Perm::Header(header(":authority", regex_string(r)))
}

/// A path pattern: an Istio string form, or a template where `{*}` is one segment and a final
/// `{**}` any number of them (none included).
fn path(v: &str) -> Perm {
    let m = if v.contains('{') {
        let (body, rest) = match v.strip_suffix("/{**}") {
            Some(b) => (b, "(/.*)?"),
            None => (v, ""),
        };
        let segments: Vec<String> = body
            .split('/')
            .map(|s| {
                if s == "{*}" {
                    "[^/]+".to_string()
                } else {
                    regex::escape(s)
                }
            })
            .collect();
        regex_string(format!("^{}{rest}$", segments.join("/")))
    } else {
        istio_string(v)
    };
    Perm::UrlPath(matcher::PathMatcher {
        rule: Some(matcher::path_matcher::Rule::Path(m)),
    })
}

fn port(v: &str) -> Perm {
    // Ports are validated when the policy is read; one that is not a number matches nothing.
    match v.parse::<u32>() {
        Ok(p) => Perm::DestinationPort(p),
        Err(_) => Perm::NotRule(Box::new(permission(Perm::Any(true)))),
    }
}

fn cidr(v: &str) -> Option<core::CidrRange> {
    let (addr, len) = match v.split_once('/') {
        Some((a, l)) => (a, l.parse().ok()?),
        None => (v, if v.contains(':') { 128 } else { 32 }),
    };
    addr.parse::<std::net::IpAddr>().ok()?;
    Some(core::CidrRange {
        address_prefix: addr.into(),
        prefix_len: Some(UInt32Value { value: len }),
    })
}

fn authenticated(m: matcher::StringMatcher) -> Id {
    Id::Authenticated(rbac::principal::Authenticated {
        principal_name: Some(m),
    })
}

/// An Istio principal (`<trust domain>/ns/<ns>/sa/<sa>`) against the peer's SPIFFE ID.
fn spiffe(v: &str) -> Id {
    use matcher::string_matcher::MatchPattern;
    let mut m = istio_string(v);
    m.match_pattern = match m.match_pattern {
        Some(MatchPattern::Exact(e)) => Some(MatchPattern::Exact(format!("spiffe://{e}"))),
        Some(MatchPattern::Prefix(p)) => Some(MatchPattern::Prefix(format!("spiffe://{p}"))),
        other => other,
    };
    authenticated(m)
}

fn namespace(v: &str) -> Id {
    authenticated(regex_string(format!(
        "^spiffe://[^/]+/ns/{}/.*$",
        istio_regex(v, "[^/]*")
    )))
}

/// `<ns>/<sa>` against `spiffe://<td>/ns/<ns>/sa/<sa>`.
fn service_account(v: &str) -> Id {
    let v = v.replacen('/', "/sa/", 1);
    authenticated(regex_string(format!("^spiffe://[^/]+/ns/{}$", istio_regex(&v, ".*"))))
}

fn permission(p: Perm) -> rbac::Permission {
    rbac::Permission { rule: Some(p) }
}

fn principal(id: Id) -> rbac::Principal {
    rbac::Principal { identifier: Some(id) }
}

/// Envoy refuses empty sets: an empty AND is anything, one entry is itself.
fn and_rules(mut rules: Vec<Perm>) -> Perm {
    match rules.len() {
        0 => Perm::Any(true),
        1 => rules.pop().unwrap(),
        _ => Perm::AndRules(rbac::permission::Set {
            rules: rules.into_iter().map(permission).collect(),
        }),
    }
}

/// An empty OR is nothing (values that all failed to parse match nothing).
fn or_rules(mut rules: Vec<Perm>) -> Perm {
    match rules.len() {
        0 => Perm::NotRule(Box::new(permission(Perm::Any(true)))),
        1 => rules.pop().unwrap(),
        _ => Perm::OrRules(rbac::permission::Set {
            rules: rules.into_iter().map(permission).collect(),
        }),
    }
}

fn and_ids(mut ids: Vec<Id>) -> Id {
    match ids.len() {
        0 => Id::Any(true),
        1 => ids.pop().unwrap(),
        _ => Id::AndIds(rbac::principal::Set {
            ids: ids.into_iter().map(principal).collect(),
        }),
    }
}

pub(super) fn or_ids(mut ids: Vec<Id>) -> Id {
    match ids.len() {
        0 => Id::NotId(Box::new(principal(Id::Any(true)))),
        1 => ids.pop().unwrap(),
        _ => Id::OrIds(rbac::principal::Set {
            ids: ids.into_iter().map(principal).collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrum_snapshot::istio::{From, To};
    use ferrum_snapshot::mesh::Authorization;

    fn regex_of(p: &Perm) -> String {
        let m = match p {
            Perm::UrlPath(matcher::PathMatcher {
                rule: Some(matcher::path_matcher::Rule::Path(m)),
            }) => m,
            Perm::Header(h) => match &h.header_match_specifier {
                Some(route::header_matcher::HeaderMatchSpecifier::StringMatch(m)) => m,
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        };
        match &m.match_pattern {
            Some(matcher::string_matcher::MatchPattern::SafeRegex(r)) => r.regex.clone(),
            other => panic!("{other:?}"),
        }
    }

    /// The regular expressions match what ferrum-dp's Istio matching matches.
    #[test]
    fn path_templates_and_hosts_match_as_istio_says() {
        let re = |p: Perm| regex::Regex::new(&regex_of(&p)).unwrap();
        let items = re(path("/items/{*}/view"));
        assert!(
            items.is_match("/items/7/view") && !items.is_match("/items/7/8/view") && !items.is_match("/items//view")
        );
        let rest = re(path("/files/{**}"));
        assert!(rest.is_match("/files") && rest.is_match("/files/a/b") && !rest.is_match("/filesystem"));
        let hosts = re(host("*.Example.com"));
        assert!(hosts.is_match("a.example.COM") && hosts.is_match("a.example.com:8080"));
        assert!(!hosts.is_match("example.com") && !hosts.is_match("a.example.com.evil"));
        let dotted = re(host("a.b"));
        assert!(!dotted.is_match("axb"), "dots are literal");
    }

    #[test]
    fn identities_are_matched_on_the_spiffe_id() {
        let re = |id: Id| match id {
            Id::Authenticated(a) => match a.principal_name.unwrap().match_pattern.unwrap() {
                matcher::string_matcher::MatchPattern::SafeRegex(r) => regex::Regex::new(&r.regex).unwrap(),
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        };
        let sa = re(service_account("shop/web"));
        assert!(sa.is_match("spiffe://cluster.local/ns/shop/sa/web"));
        assert!(!sa.is_match("spiffe://cluster.local/ns/shop/sa/web2"));
        let ns = re(namespace("team-*"));
        assert!(ns.is_match("spiffe://td/ns/team-a/sa/x") && !ns.is_match("spiffe://td/ns/other/sa/team-a"));
        match spiffe("cluster.local/ns/a/sa/b") {
            Id::Authenticated(a) => assert_eq!(
                a.principal_name.unwrap().match_pattern,
                Some(matcher::string_matcher::MatchPattern::Exact(
                    "spiffe://cluster.local/ns/a/sa/b".into()
                ))
            ),
            other => panic!("{other:?}"),
        }
    }

    fn policy(action: AuthzAction, rules: Vec<Rule>) -> Arc<Policy> {
        Arc::new(Policy {
            key: "AuthorizationPolicy/default/p".into(),
            namespace: "default".into(),
            name: "p".into(),
            selector: None,
            targets: vec!["default/web".into()],
            rule: PolicyRule::Authorization(Authorization {
                action,
                rules,
                dry_run: false,
                check: None,
            }),
        })
    }

    /// What Envoy cannot check fails closed, and says so: an ALLOW rule on a token matches
    /// nothing without a provider and is dropped at L4, a DENY rule on a path at L4 denies every
    /// connection; policies on other gateways are not this listener's.
    #[test]
    fn what_envoy_cannot_check_fails_closed() {
        let jwt = Rule {
            from: vec![From {
                source: Source {
                    request_principals: vec!["*".into()],
                    ..Default::default()
                },
            }],
            ..Default::default()
        };
        let paths = Rule {
            to: vec![To {
                operation: Operation {
                    paths: vec!["/admin".into()],
                    ..Default::default()
                },
            }],
            ..Default::default()
        };
        let gateways = ["default/web".to_string()];
        let none = Providers::default();
        let mut why = Vec::new();
        let r = rules(
            &[policy(AuthzAction::Allow, vec![jwt.clone()])],
            &gateways,
            false,
            &none,
            &mut why,
        );
        let p = &r.allow.expect("an ALLOW filter").policies["default/p[0]"];
        assert_eq!(
            p.principals[0].identifier,
            Some(Id::NotId(Box::new(principal(Id::Any(true))))),
            "no provider, no token can match"
        );
        let mut why = Vec::new();
        let r = rules(
            &[policy(AuthzAction::Allow, vec![jwt])],
            &gateways,
            true,
            &none,
            &mut why,
        );
        assert_eq!(
            r.allow.expect("an ALLOW filter").policies.len(),
            0,
            "allows nothing at L4"
        );
        assert!(
            why[0].contains("requestPrincipals") && why[0].contains("dropped"),
            "{why:?}"
        );

        let mut why = Vec::new();
        let r = rules(
            &[policy(AuthzAction::Deny, vec![paths.clone()])],
            &gateways,
            true,
            &none,
            &mut why,
        );
        let p = &r.deny.expect("a DENY filter").policies["default/p[0]"];
        assert_eq!(p.permissions[0].rule, Some(Perm::Any(true)), "denies every connection");
        assert!(why[0].contains("TCP listener"), "{why:?}");

        let mut why = Vec::new();
        let other = ["default/other".to_string()];
        assert_eq!(
            rules(
                &[policy(AuthzAction::Deny, vec![paths])],
                &other,
                false,
                &none,
                &mut why
            ),
            Rules::default()
        );
    }
}
