//! RateLimitPolicies → the rate limits of the routes they are on: a Gateway's are on every
//! route of its listeners' hosts, an HTTPRoute's or GRPCRoute's on that route's own.

use std::sync::Arc;

use super::{Problems, Reason, meta_ref};
use crate::crd::{RateLimitPolicy, RateLimitRuleSpec, RateLimitSelectorSpec};
use crate::model::{Digest, Listener, RateLimit, RateLimitClients, RateLimitHeader, RateLimitRule, StringMatch};
use crate::resources::Resources;

/// One policy and what it is on.
pub(crate) struct Targeted {
    /// Gateways, `namespace/name`.
    gateways: Vec<String>,
    /// Routes by the prefix of their route names (`namespace/name/`).
    routes: Vec<String>,
    limit: Arc<RateLimit>,
}

/// The policies that translate; the others are problems, field and reason.
pub(crate) fn build(res: &Resources, problems: &mut Problems<'_>) -> Vec<Targeted> {
    res.rate_limit_policies
        .iter()
        .filter_map(|p| policy(res, p, problems))
        .collect()
}

fn policy(res: &Resources, p: &RateLimitPolicy, problems: &mut Problems<'_>) -> Option<Targeted> {
    let obj = meta_ref("RateLimitPolicy", &p.metadata);
    let global = match p.spec.kind.as_deref() {
        None | Some("Local") => false,
        Some("Global") => true,
        Some(other) => {
            let why = format!("{other:?} is neither Local nor Global");
            problems.push(&obj, "spec.type", Reason::UnsupportedValue, why);
            return None;
        }
    };
    let mut rules = Vec::new();
    for (i, r) in p.spec.rules.iter().enumerate() {
        match rule(r) {
            Ok(r) => rules.push(r),
            Err((field, reason, why)) => {
                problems.push(&obj, format!("spec.rules[{i}].{field}"), reason, why);
                return None;
            }
        }
    }
    if rules.is_empty() {
        problems.push(&obj, "spec.rules", Reason::Invalid, "at least one rule is needed");
        return None;
    }
    let mut out = Targeted {
        gateways: Vec::new(),
        routes: Vec::new(),
        limit: Arc::new(RateLimit {
            name: format!("{}/{}", obj.namespace, obj.name),
            global,
            rules,
        }),
    };
    for (i, t) in p.spec.target_refs.iter().enumerate() {
        let field = format!("spec.targetRefs[{i}]");
        let key = format!("{}/{}", obj.namespace, t.name);
        match (t.group.as_str(), t.kind.as_str()) {
            (crate::GATEWAY_GROUP, kind @ ("Gateway" | "HTTPRoute" | "GRPCRoute")) => {
                let found = target_found(res, kind, &obj.namespace, &t.name);
                if found.is_none() {
                    let why = format!("no {kind} {key}");
                    problems.push(&obj, field, Reason::NoMatchingParent, why);
                } else if found == Some(false) {
                    let why = format!(
                        "{kind} {key} has no Gateway parent: rate limits apply to Gateway routes, not mesh routes"
                    );
                    problems.push(&obj, field, Reason::UnsupportedValue, why);
                } else if kind == "Gateway" {
                    out.gateways.push(key);
                } else {
                    out.routes
                        .push(super::httproute::route_name_prefix(kind, &obj.namespace, &t.name));
                }
            }
            (group, kind) => {
                let why = format!("only Gateways, HTTPRoutes and GRPCRoutes can be targeted, not {group:?}/{kind:?}");
                problems.push(&obj, field, Reason::InvalidKind, why);
            }
        }
    }
    Some(out)
}

/// Whether target `kind` `namespace/name` exists (`None`: it does not) and, for a route, has a
/// Gateway among its parents (mesh routes, whose parents are Services, are not limited).
fn target_found(res: &Resources, kind: &str, namespace: &str, name: &str) -> Option<bool> {
    let here = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| named(m, namespace, name);
    let gateway = |kind: Option<&str>| kind.unwrap_or("Gateway") == "Gateway";
    match kind {
        "Gateway" => res.gateways.iter().any(|g| here(&g.metadata)).then_some(true),
        "HTTPRoute" => res
            .http_routes
            .iter()
            .find(|r| here(&r.metadata))
            .map(|r| r.spec.parent_refs.iter().flatten().any(|p| gateway(p.kind.as_deref()))),
        _ => res
            .grpc_routes
            .iter()
            .find(|r| here(&r.metadata))
            .map(|r| r.spec.parent_refs.iter().flatten().any(|p| gateway(p.kind.as_deref()))),
    }
}

fn named(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, namespace: &str, name: &str) -> bool {
    m.namespace.as_deref().unwrap_or("default") == namespace && m.name.as_deref() == Some(name)
}

type RuleError = (String, Reason, String);

fn rule(r: &RateLimitRuleSpec) -> Result<RateLimitRule, RuleError> {
    let window_secs = match r.limit.unit.as_str() {
        "Second" => 1,
        "Minute" => 60,
        "Hour" => 3_600,
        "Day" => 86_400,
        other => {
            let why = format!("{other:?} is not Second, Minute, Hour or Day");
            return Err(("limit.unit".into(), Reason::UnsupportedValue, why));
        }
    };
    if r.limit.requests == 0 {
        return Err(("limit.requests".into(), Reason::Invalid, "must be at least 1".into()));
    }
    let mut out = RateLimitRule {
        headers: Vec::new(),
        clients: Vec::new(),
        requests: r.limit.requests,
        window_secs,
    };
    for (i, s) in r.client_selectors.iter().enumerate() {
        selector(s, &mut out).map_err(|(f, reason, why)| (format!("clientSelectors[{i}].{f}"), reason, why))?;
    }
    Ok(out)
}

fn selector(s: &RateLimitSelectorSpec, out: &mut RateLimitRule) -> Result<(), RuleError> {
    for (i, h) in s.headers.iter().enumerate() {
        let field = format!("headers[{i}]");
        if crate::validate::http_header_name_invalid(&h.name) {
            return Err((
                format!("{field}.name"),
                Reason::Invalid,
                format!("{:?} is not a header name", h.name),
            ));
        }
        let value = match (h.kind.as_deref(), &h.value) {
            (Some("Distinct"), None) => None,
            (Some("Distinct"), Some(_)) => {
                let why = "a Distinct header counts each value: no value is given".to_string();
                return Err((format!("{field}.value"), Reason::Invalid, why));
            }
            (None | Some("Exact"), Some(v)) => Some(StringMatch::Exact(v.clone())),
            (Some("RegularExpression"), Some(v)) => match regex::Regex::new(v) {
                Ok(_) => Some(StringMatch::Regex(v.clone())),
                Err(e) => return Err((format!("{field}.value"), Reason::UnsupportedValue, e.to_string())),
            },
            (None | Some("Exact" | "RegularExpression"), None) => {
                return Err((format!("{field}.value"), Reason::Invalid, "a value is required".into()));
            }
            (Some(other), _) => {
                let why = format!("{other:?} is not Exact, RegularExpression or Distinct");
                return Err((format!("{field}.type"), Reason::UnsupportedValue, why));
            }
        };
        out.headers.push(RateLimitHeader {
            name: h.name.to_ascii_lowercase(),
            value,
        });
    }
    if let Some(c) = &s.source_cidr {
        let distinct = match c.kind.as_deref() {
            None | Some("Exact") => false,
            Some("Distinct") => true,
            Some(other) => {
                let why = format!("{other:?} is neither Exact nor Distinct");
                return Err(("sourceCIDR.type".into(), Reason::UnsupportedValue, why));
            }
        };
        if !c.value.contains('/') || !super::policy::valid_block(&c.value) {
            let why = format!("{:?} is not a CIDR block", c.value);
            return Err(("sourceCIDR.value".into(), Reason::Invalid, why));
        }
        out.clients.push(RateLimitClients {
            cidr: c.value.clone(),
            distinct,
        });
    }
    Ok(())
}

/// Puts each policy's limit on the routes it is on, in every listener's virtual hosts, and
/// stamps the digests of the hosts that changed (`digests` in listener and host order).
pub(crate) fn apply(listeners: &mut [Listener], digests: &mut [Vec<Digest>], policies: &[Targeted]) {
    if policies.is_empty() {
        return;
    }
    for (l, digests) in listeners.iter_mut().zip(digests) {
        let by_host: Vec<Vec<String>> = l
            .virtual_hosts
            .iter()
            .map(|vh| l.gateways_of(&vh.hostname).into_iter().map(str::to_string).collect())
            .collect();
        for ((vh, gateways), digest) in l.virtual_hosts.iter_mut().zip(by_host).zip(digests) {
            let on_host: Vec<&Targeted> = policies
                .iter()
                .filter(|p| p.gateways.iter().any(|g| gateways.contains(g)))
                .collect();
            let limits = |route: &str| {
                let on_route = policies
                    .iter()
                    .filter(|p| p.routes.iter().any(|r| route.starts_with(r.as_str())));
                on_host
                    .iter()
                    .copied()
                    .chain(on_route)
                    .map(|p| p.limit.clone())
                    .collect::<Vec<_>>()
            };
            if vh.routes.iter().all(|r| limits(&r.name).is_empty()) {
                continue;
            }
            // A copy: the translator's memo keeps the hosts and routes without limits.
            let vh = Arc::make_mut(vh);
            for r in &mut vh.routes {
                let add = limits(&r.name);
                if !add.is_empty() {
                    Arc::make_mut(r).rate_limits = add;
                }
            }
            *digest = vh.digest();
        }
    }
}
