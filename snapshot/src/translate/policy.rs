//! AuthorizationPolicy, PeerAuthentication and RequestAuthentication objects → the snapshot's
//! policies. A CUSTOM policy asks its MeshConfig provider (see `ext_authz`); `targetRefs` to
//! anything but a Gateway are not supported yet: such a policy is left out with a problem on
//! the field, so the rest of the mesh keeps its policies.

use std::sync::Arc;

use super::ext_authz::Providers;
use crate::istio::{AuthorizationPolicy, AuthorizationPolicySpec, PeerAuthentication, RequestAuthentication};
use crate::mesh::{Authorization, AuthzAction, ExtAuthz, MtlsMode, PeerAuthn, Policy, PolicyRule, RequestAuthn};
use crate::model::Digest;
use crate::resources::ObjectRef;
use crate::translate::{Problems, Reason, meta_ref};

/// What the producer's fetches of `jwksUri`s brought, by URI (a URI not fetched yet is absent).
pub type Jwks = std::collections::BTreeMap<String, JwksFetch>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksFetch {
    /// The document served (the last one that could be fetched).
    Document(Arc<String>),
    /// No fetch has succeeded yet; why the last one failed.
    Failed(Arc<String>),
}

/// The annotation that makes a policy dry-run.
pub const DRY_RUN: &str = "istio.io/dry-run";

/// The security policies of `res`; CUSTOM AuthorizationPolicies ask `providers`.
pub(crate) fn build(
    res: &crate::resources::Resources,
    providers: &Providers,
    problems: &mut Problems<'_>,
) -> (Vec<Arc<Policy>>, Vec<Digest>) {
    let (authz, peer, authn, jwks) = (
        &res.authorization_policies,
        &res.peer_authentications,
        &res.request_authentications,
        &res.jwks,
    );
    let mut out: Vec<Arc<Policy>> = Vec::with_capacity(authz.len() + peer.len() + authn.len());
    out.extend(
        authn
            .iter()
            .filter_map(|p| request_authentication(p, jwks, problems))
            .map(Arc::new),
    );
    out.extend(
        authz
            .iter()
            .filter_map(|p| authorization(p, providers, problems))
            .map(Arc::new),
    );
    out.extend(
        peer.iter()
            .filter_map(|p| peer_authentication(p, problems))
            .map(Arc::new),
    );
    out.sort_by(|a, b| a.key.cmp(&b.key));
    let digests = out.iter().map(|p| p.digest()).collect();
    (out, digests)
}

fn authorization(p: &AuthorizationPolicy, providers: &Providers, problems: &mut Problems<'_>) -> Option<Policy> {
    let obj: ObjectRef = meta_ref("AuthorizationPolicy", &p.metadata);
    let spec = &p.spec;
    let mut check = None;
    let action = match spec.action.as_deref().unwrap_or("ALLOW") {
        "ALLOW" => AuthzAction::Allow,
        "DENY" => AuthzAction::Deny,
        "AUDIT" => AuthzAction::Audit,
        "CUSTOM" => {
            check = custom(&obj, spec, providers, problems)?;
            AuthzAction::Deny
        }
        other => {
            problems.push(
                &obj,
                "spec.action",
                Reason::Invalid,
                format!("{other:?} is not ALLOW, DENY, AUDIT or CUSTOM"),
            );
            return None;
        }
    };
    let targets = targets(
        &obj,
        &spec.target_refs,
        spec.target_ref.as_ref(),
        spec.selector.is_some(),
        problems,
    )?;
    let rules = spec.rules.clone().unwrap_or_default();
    if let Some((field, why)) = rules.iter().enumerate().find_map(|(i, r)| rule_problem(i, r)) {
        problems.push(&obj, field, Reason::Invalid, why);
        return None;
    }
    let dry_run = p
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(DRY_RUN))
        .is_some_and(|v| v == "true");
    Some(Policy {
        targets,
        ..policy(
            &obj,
            spec.selector.as_ref(),
            PolicyRule::Authorization(Authorization {
                action,
                rules,
                dry_run,
                check: check.map(Box::new),
            }),
        )
    })
}

/// What is wrong with rule `i`, if anything: (field, why) of an address block or port that does
/// not parse.
fn rule_problem(i: usize, r: &crate::istio::Rule) -> Option<(String, String)> {
    for (j, f) in r.from.iter().enumerate() {
        let s = &f.source;
        for (name, blocks) in [
            ("ipBlocks", &s.ip_blocks),
            ("notIpBlocks", &s.not_ip_blocks),
            ("remoteIpBlocks", &s.remote_ip_blocks),
            ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
        ] {
            if let Some(bad) = blocks.iter().find(|b| !valid_block(b)) {
                return Some((
                    format!("spec.rules[{i}].from[{j}].source.{name}"),
                    format!("{bad:?} is not an IP address or CIDR block"),
                ));
            }
        }
    }
    for (j, t) in r.to.iter().enumerate() {
        let o = &t.operation;
        if let Some(bad) = o.ports.iter().chain(&o.not_ports).find(|p| p.parse::<u16>().is_err()) {
            return Some((
                format!("spec.rules[{i}].to[{j}].operation.ports"),
                format!("{bad:?} is not a port number"),
            ));
        }
    }
    None
}

/// A CUSTOM policy's provider, resolved: `Some(None)` when it cannot be (the problem says why),
/// and the policy then refuses what it matches, as Istio does; `None` when the policy is invalid.
fn custom(
    obj: &ObjectRef,
    spec: &AuthorizationPolicySpec,
    providers: &Providers,
    problems: &mut Problems<'_>,
) -> Option<Option<ExtAuthz>> {
    let Some(name) = super::ext_authz::provider_name(spec) else {
        problems.push(
            obj,
            "spec.provider.name",
            Reason::Invalid,
            "CUSTOM needs a provider name",
        );
        return None;
    };
    let unresolved = (Reason::BackendNotFound, format!("provider {name:?} is not resolved"));
    match providers.get(name).unwrap_or(&Err(unresolved)) {
        Ok(p) => Some(Some(p.clone())),
        Err((reason, why)) if !reason.is_condition() => {
            problems.push(obj, "spec.provider.name", *reason, why.clone());
            None
        }
        Err((reason, why)) => {
            let why = format!("{why}; the requests it matches are refused");
            problems.push(obj, "spec.provider.name", *reason, why);
            Some(None)
        }
    }
}

fn request_authentication(p: &RequestAuthentication, jwks: &Jwks, problems: &mut Problems<'_>) -> Option<Policy> {
    let obj: ObjectRef = meta_ref("RequestAuthentication", &p.metadata);
    let spec = &p.spec;
    let targets = targets(
        &obj,
        &spec.target_refs,
        spec.target_ref.as_ref(),
        spec.selector.is_some(),
        problems,
    )?;
    for (i, r) in spec.jwt_rules.iter().enumerate() {
        if let Err((field, why)) = check_jwt_rule(r) {
            problems.push(&obj, format!("spec.jwtRules[{i}].{field}"), Reason::Invalid, why);
            return None;
        }
    }
    // The policy stays in effect (its tokens cannot validate until the keys come): said on
    // status, not a reason to leave it out.
    for (i, r) in spec.jwt_rules.iter().enumerate() {
        if let (None, Some(uri)) = (&r.jwks, &r.jwks_uri)
            && let Some(JwksFetch::Failed(why)) = jwks.get(uri)
        {
            let message = format!("cannot fetch {uri}: {why}");
            problems.push(
                &obj,
                format!("spec.jwtRules[{i}].jwksUri"),
                Reason::JwksUnavailable,
                message,
            );
        }
    }
    Some(Policy {
        targets,
        ..policy(
            &obj,
            spec.selector.as_ref(),
            PolicyRule::RequestAuthentication(RequestAuthn {
                jwt_rules: spec.jwt_rules.iter().map(|r| with_fetched_jwks(r, jwks)).collect(),
            }),
        )
    })
}

/// `r` with the JWKS its `jwksUri` served, when the producer fetched it (the operator does, as
/// istiod does): proxies then validate with the inline keys and fetch nothing, and Envoy, which
/// is given no cluster to fetch from, gets them too.
fn with_fetched_jwks(r: &crate::istio::JwtRule, jwks: &Jwks) -> crate::istio::JwtRule {
    let mut r = r.clone();
    if r.jwks.is_none()
        && let Some(JwksFetch::Document(doc)) = r.jwks_uri.as_ref().and_then(|u| jwks.get(u))
    {
        r.jwks = Some(doc.to_string());
    }
    r
}

/// The field and reason a JWT rule cannot be used for, if any.
fn check_jwt_rule(r: &crate::istio::JwtRule) -> Result<(), (&'static str, String)> {
    if r.issuer.is_empty() {
        return Err(("issuer", "an issuer is required".into()));
    }
    match (&r.jwks, &r.jwks_uri) {
        (Some(jwks), _) => {
            let set: jsonwebtoken::jwk::JwkSet =
                serde_json::from_str(jwks).map_err(|e| ("jwks", format!("not a JWKS: {e}")))?;
            if let Some(e) = set
                .keys
                .iter()
                .find_map(|k| jsonwebtoken::DecodingKey::from_jwk(k).err())
            {
                return Err(("jwks", format!("a key cannot be used: {e}")));
            }
            if set.keys.is_empty() {
                return Err(("jwks", "the JWKS has no keys".into()));
            }
        }
        (None, Some(uri)) if !(uri.starts_with("https://") || uri.starts_with("http://")) => {
            return Err(("jwksUri", format!("{uri:?} is not an http(s) URL")));
        }
        (None, Some(_)) => {}
        (None, None) => return Err(("jwks", "jwks or jwksUri is required".into())),
    }
    let headers = r.from_headers.iter().map(|h| h.name.as_str());
    let outputs = r.output_claim_to_headers.iter().map(|c| c.header.as_str());
    if let Some(bad) = headers
        .chain(outputs)
        .chain(r.output_payload_to_header.as_deref())
        .find(|h| crate::validate::http_header_name_invalid(h))
    {
        return Err(("fromHeaders", format!("{bad:?} is not a valid header name")));
    }
    if let Some(t) = &r.timeout {
        crate::translate::istio_duration_ms(t).map_err(|e| ("timeout", e))?;
    }
    Ok(())
}

fn policy(obj: &ObjectRef, selector: Option<&crate::istio::WorkloadSelector>, rule: PolicyRule) -> Policy {
    Policy {
        key: format!("{}/{}/{}", obj.kind, obj.namespace, obj.name),
        namespace: obj.namespace.clone(),
        name: obj.name.clone(),
        selector: selector.map(|s| s.match_labels.clone()),
        targets: Vec::new(),
        rule,
    }
}

/// The Gateways (`namespace/name`, in the policy's namespace) a policy's `targetRefs` name.
/// Other kinds are not supported yet, and a selector with targetRefs is ambiguous.
fn targets(
    obj: &ObjectRef,
    refs: &[serde_json::Value],
    one: Option<&serde_json::Value>,
    selector: bool,
    problems: &mut Problems<'_>,
) -> Option<Vec<String>> {
    let mut out = Vec::new();
    for (i, r) in one.into_iter().chain(refs).enumerate() {
        let field = match one {
            Some(_) if i == 0 => "spec.targetRef".to_string(),
            Some(_) => format!("spec.targetRefs[{}]", i - 1),
            None => format!("spec.targetRefs[{i}]"),
        };
        let get = |k: &str| r.get(k).and_then(|v| v.as_str()).unwrap_or("");
        if get("group") != crate::GATEWAY_GROUP || get("kind") != "Gateway" {
            problems.push(
                obj,
                field,
                Reason::UnsupportedValue,
                format!(
                    "only Gateways ({}/Gateway) can be targeted, not {:?}/{:?}",
                    crate::GATEWAY_GROUP,
                    get("group"),
                    get("kind")
                ),
            );
            return None;
        }
        if get("name").is_empty() {
            problems.push(obj, format!("{field}.name"), Reason::Invalid, "a name is required");
            return None;
        }
        out.push(format!("{}/{}", obj.namespace, get("name")));
    }
    if !out.is_empty() && selector {
        problems.push(
            obj,
            "spec.selector",
            Reason::Invalid,
            "selector and targetRefs cannot be used together",
        );
        return None;
    }
    out.sort();
    out.dedup();
    Some(out)
}

fn mode(obj: &ObjectRef, field: String, m: &crate::istio::Mtls, problems: &mut Problems<'_>) -> Option<MtlsMode> {
    Some(match m.mode.as_deref().unwrap_or("UNSET") {
        "UNSET" => MtlsMode::Unset,
        "PERMISSIVE" => MtlsMode::Permissive,
        "STRICT" => MtlsMode::Strict,
        "DISABLE" => MtlsMode::Disable,
        other => {
            problems.push(
                obj,
                field,
                Reason::Invalid,
                format!("{other:?} is not UNSET, DISABLE, PERMISSIVE or STRICT"),
            );
            return None;
        }
    })
}

fn peer_authentication(p: &PeerAuthentication, problems: &mut Problems<'_>) -> Option<Policy> {
    let obj: ObjectRef = meta_ref("PeerAuthentication", &p.metadata);
    let spec = &p.spec;
    let default = crate::istio::Mtls::default();
    let m = mode(
        &obj,
        "spec.mtls.mode".into(),
        spec.mtls.as_ref().unwrap_or(&default),
        problems,
    )?;
    if !spec.port_level_mtls.is_empty() && spec.selector.is_none() {
        problems.push(
            &obj,
            "spec.portLevelMtls",
            Reason::Invalid,
            "portLevelMtls needs a selector",
        );
        return None;
    }
    let mut ports = std::collections::BTreeMap::new();
    for (port, pm) in &spec.port_level_mtls {
        let field = format!("spec.portLevelMtls[{port}]");
        let Some(port) = u16::try_from(*port).ok().filter(|p| *p != 0) else {
            problems.push(&obj, field, Reason::Invalid, "not a port number");
            return None;
        };
        ports.insert(port, mode(&obj, format!("{field}.mode"), pm, problems)?);
    }
    Some(policy(
        &obj,
        spec.selector.as_ref(),
        PolicyRule::PeerAuthentication(PeerAuthn { mode: m, ports }),
    ))
}

pub(crate) fn valid_block(b: &str) -> bool {
    let (addr, prefix) = b.split_once('/').unwrap_or((b, ""));
    let Ok(ip) = addr.parse::<std::net::IpAddr>() else {
        return false;
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    prefix.is_empty() || prefix.parse::<u8>().is_ok_and(|p| p <= max)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::JwksFetch;
    use crate::Resources;
    use crate::mesh::{AuthzAction, BodyInCheck, ExtAuthz, ExtAuthzApi, MtlsMode, PolicyRule};
    use crate::translate::{Options, Reason, Translation, translate};

    #[test]
    fn target_refs_put_policies_on_gateways_not_workloads() {
        let mut r = Resources::default();
        r.add_yaml(
            "t.yaml",
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: gw, namespace: edge}\n\
             spec: {gatewayClassName: ferrum, listeners: [{name: http, port: 8080, protocol: HTTP}]}\n---\n\
             apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: at-gw, namespace: edge}\n\
             spec: {targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: gw}], rules: [{}]}\n---\n\
             apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ns-wide, namespace: edge}\nspec: {rules: [{}]}\n---\n\
             apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: at-svc, namespace: edge}\n\
             spec: {targetRefs: [{group: '', kind: Service, name: s}], rules: [{}]}\n---\n\
             apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: both, namespace: edge}\n\
             spec: {selector: {matchLabels: {app: x}}, targetRef: {group: gateway.networking.k8s.io, kind: Gateway, name: gw}}\n",
        )
        .unwrap();
        let t = translate(&r, 1, &Options::default());
        let problems = t.problem_keys();
        assert_eq!(
            problems,
            [
                ("at-svc", "spec.targetRefs[0]", Reason::UnsupportedValue),
                ("both", "spec.selector", Reason::Invalid),
            ]
        );
        let at_gw = t.snapshot.policies.iter().find(|p| p.name == "at-gw").unwrap();
        assert_eq!(at_gw.targets, ["edge/gw"]);
        assert_eq!(t.snapshot.listeners[0].gateways, ["edge/gw"]);
        let w = t.snapshot.workload_or_placeholder("edge", "pod");
        assert!(!at_gw.applies_to(&w), "a targeted policy selects no workload");
        // The Gateway's own scope carries the policies that target it, and only those.
        let opts = Options {
            gateway: Some(crate::ObjectRef {
                kind: "Gateway",
                namespace: "edge".into(),
                name: "gw".into(),
            }),
            ..Options::default()
        };
        let scoped = translate(&r, 1, &opts);
        let names: Vec<_> = scoped.snapshot.policies.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["at-gw"]);
        assert!(scoped.snapshot.is_whole());
    }

    #[test]
    fn request_authentications_carry_their_rules_and_bad_ones_name_the_field() {
        let jwks = r#"{"keys": [{"kty": "EC", "crv": "P-256", "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU", "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#;
        let mut r = Resources::default();
        r.add_yaml(
            "ra.yaml",
            &format!(
                "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: ok, namespace: shop}}\n\
                 spec: {{selector: {{matchLabels: {{app: cart}}}}, jwtRules: [{{issuer: https://i, jwks: '{jwks}'}}, {{issuer: https://j, jwksUri: 'https://j/keys'}}]}}\n---\n\
                 apiVersion: security.istio.io/v1beta1\nkind: RequestAuthentication\nmetadata: {{name: nokeys, namespace: shop}}\nspec: {{jwtRules: [{{issuer: https://i}}]}}\n---\n\
                 apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: badjwks, namespace: shop}}\nspec: {{jwtRules: [{{issuer: https://i, jwks: 'not json'}}]}}\n---\n\
                 apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: badheader, namespace: shop}}\n\
                 spec: {{jwtRules: [{{issuer: https://i, jwksUri: 'https://i/k', outputClaimToHeaders: [{{header: 'bad header', claim: sub}}]}}]}}\n"
            ),
        )
        .unwrap();
        let t = translate(&r, 1, &Options::default());
        let keys: Vec<_> = t.snapshot.policies.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["RequestAuthentication/shop/ok"]);
        let PolicyRule::RequestAuthentication(ra) = &t.snapshot.policies[0].rule else {
            panic!()
        };
        assert_eq!(ra.jwt_rules.len(), 2);
        assert!(ra.jwt_rules[1].jwks.is_none(), "nothing fetched: the proxy fetches");
        // The operator's fetched JWKS go inline; the inline `jwks` a rule has is kept.
        let doc = |s: &str| JwksFetch::Document(Arc::new(s.to_string()));
        r.jwks = Arc::new([("https://j/keys".to_string(), doc("{\"keys\": []}"))].into());
        let fetched = translate(&r, 2, &Options::default());
        let PolicyRule::RequestAuthentication(ra) = &fetched.snapshot.policies[0].rule else {
            panic!()
        };
        assert_eq!(ra.jwt_rules[0].jwks.as_deref(), Some(jwks));
        assert_eq!(ra.jwt_rules[1].jwks.as_deref(), Some("{\"keys\": []}"));
        assert_eq!(ra.jwt_rules[1].jwks_uri.as_deref(), Some("https://j/keys"));
        assert_ne!(fetched.snapshot.hash, t.snapshot.hash);
        let problems = t.problem_keys();
        assert_eq!(
            problems,
            [
                ("badheader", "spec.jwtRules[0].fromHeaders", Reason::Invalid),
                ("badjwks", "spec.jwtRules[0].jwks", Reason::Invalid),
                ("nokeys", "spec.jwtRules[0].jwks", Reason::Invalid),
            ]
        );

        // A URI that could not be fetched: the policy stays in effect (tokens are refused
        // until the keys come) and its status says which URI and why.
        let failed = JwksFetch::Failed(Arc::new("status 404 Not Found".into()));
        r.jwks = Arc::new([("https://j/keys".to_string(), failed)].into());
        let t = translate(&r, 3, &Options::default());
        assert_eq!(t.snapshot.policies.len(), 1, "still in effect");
        let PolicyRule::RequestAuthentication(ra) = &t.snapshot.policies[0].rule else {
            panic!()
        };
        assert!(ra.jwt_rules[1].jwks.is_none());
        let status = |r: &Resources, t: &Translation| {
            let ra = r
                .request_authentications
                .iter()
                .find(|p| p.metadata.name.as_deref() == Some("ok"));
            crate::status::request_authentication_status(ra.unwrap(), t, &r.jwks)["conditions"].clone()
        };
        let c = status(&r, &t);
        assert_eq!(
            (c[0]["type"].as_str(), c[0]["status"].as_str()),
            (Some("Accepted"), Some("True"))
        );
        assert_eq!(c[1]["type"], "ResolvedRefs");
        assert_eq!(
            (c[1]["status"].as_str(), c[1]["reason"].as_str()),
            (Some("False"), Some("JwksUnavailable"))
        );
        assert_eq!(
            c[1]["message"],
            "spec.jwtRules[1].jwksUri: cannot fetch https://j/keys: status 404 Not Found"
        );
        // Nothing fetched yet: Unknown; fetched: True.
        r.jwks = Arc::default();
        assert_eq!(
            status(&r, &translate(&r, 4, &Options::default()))[1]["status"],
            "Unknown"
        );
        r.jwks = Arc::new([("https://j/keys".to_string(), doc("{\"keys\": []}"))].into());
        assert_eq!(status(&r, &fetched)[1]["status"], "True");
    }

    #[test]
    fn policies_translate_and_unsupported_or_invalid_ones_are_reported_not_fatal() {
        let mut r = Resources::default();
        r.add_yaml(
            "p.yaml",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-web, namespace: shop, annotations: {istio.io/dry-run: 'true'}}\n\
             spec: {action: DENY, selector: {matchLabels: {app: cart}}, rules: [{from: [{source: {namespaces: [web]}}]}]}\n---\n\
             apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {name: nothing, namespace: shop}\nspec: {}\n---\n\
             apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: bad-ip, namespace: shop}\nspec: {rules: [{from: [{source: {ipBlocks: [10.0.0.0/40]}}]}]}\n---\n\
             apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: shop}\n\
             spec: {selector: {matchLabels: {app: cart}}, mtls: {mode: STRICT}, portLevelMtls: {8080: {mode: PERMISSIVE}}}\n---\n\
             apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: odd, namespace: shop}\nspec: {mtls: {mode: SOMETIMES}}\n",
        )
        .unwrap();
        let t = translate(&r, 1, &Options::default());
        let keys: Vec<_> = t.snapshot.policies.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "AuthorizationPolicy/shop/deny-web",
                "AuthorizationPolicy/shop/nothing",
                "PeerAuthentication/shop/strict"
            ]
        );
        let PolicyRule::Authorization(deny) = &t.snapshot.policies[0].rule else {
            panic!()
        };
        assert_eq!(
            (deny.action, deny.dry_run, deny.rules.len()),
            (AuthzAction::Deny, true, 1)
        );
        let PolicyRule::Authorization(nothing) = &t.snapshot.policies[1].rule else {
            panic!()
        };
        assert!(nothing.rules.is_empty(), "no rules: matches nothing");
        let PolicyRule::PeerAuthentication(pa) = &t.snapshot.policies[2].rule else {
            panic!()
        };
        assert_eq!(
            (pa.mode, pa.ports.get(&8080).copied()),
            (MtlsMode::Strict, Some(MtlsMode::Permissive))
        );
        let problems = t.problem_keys();
        assert_eq!(
            problems,
            [
                ("bad-ip", "spec.rules[0].from[0].source.ipBlocks", Reason::Invalid),
                ("odd", "spec.mtls.mode", Reason::Invalid)
            ]
        );
        assert_eq!(t.snapshot.hash, t.snapshot.content_hash());
    }

    #[test]
    fn custom_policies_ask_their_provider_through_its_cluster_or_refuse_when_it_cannot_be_found() {
        let mut r = Resources::default();
        r.add_yaml(
            "p.yaml",
            "apiVersion: ferrum.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: default, namespace: ferrum-system}\nspec:\n  extensionProviders:\n  \
             - {name: authz, envoyExtAuthzHttp: {service: ext-authz.auth.svc.cluster.local, port: '8000', timeout: 0.5s, pathPrefix: /check, \
             statusOnError: '503', includeRequestHeadersInCheck: [X-User, 'x-ext-*'], headersToUpstreamOnAllow: [x-authz-user], \
             headersToDownstreamOnAllow: [X-Ext-Authz-Check-Result], includeRequestBodyInCheck: {maxRequestBytes: 1024, allowPartialMessage: true}}}\n  \
             - {name: opa, envoyExtAuthzGrpc: {service: opa.auth, port: 9191, timeout: 2s, failOpen: true}}\n  \
             - {name: unbounded, envoyExtAuthzGrpc: {service: opa.auth, port: 9191, includeRequestBodyInCheck: {packAsBytes: true}}}\n  \
             - {name: tracer, zipkin: {service: zipkin.auth.svc.cluster.local, port: 9411}}\n  \
             - {name: nowhere, envoyExtAuthzHttp: {service: gone.auth.svc.cluster.local, port: 80}}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: opa, namespace: auth}\nspec: {ports: [{name: api, port: 9191}]}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: ext-authz, namespace: auth}\nspec: {ports: [{name: http, port: 8000}]}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: ext-authz-1, namespace: auth, labels: {kubernetes.io/service-name: ext-authz}}\n\
             addressType: IPv4\nports: [{name: http, port: 8000}]\nendpoints: [{addresses: [10.0.0.9]}]\n---\n\
             apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: asks, namespace: shop}\n\
             spec: {action: CUSTOM, provider: {name: authz}, rules: [{to: [{operation: {paths: [/admin/*]}}]}]}\n---\n\
             apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: unknown, namespace: shop}\nspec: {action: CUSTOM, provider: {name: nope}, rules: [{}]}\n---\n\
             apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: unreachable, namespace: shop}\nspec: {action: CUSTOM, provider: {name: nowhere}, rules: [{}]}\n---\n\
             apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: grpc, namespace: shop}\nspec: {action: CUSTOM, provider: {name: opa}, rules: [{}]}\n---\n\
             apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: whole-body, namespace: shop}\nspec: {action: CUSTOM, provider: {name: unbounded}, rules: [{}]}\n---\n\
             apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: traced, namespace: shop}\nspec: {action: CUSTOM, provider: {name: tracer}, rules: [{}]}\n---\n\
             apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: unnamed, namespace: shop}\nspec: {action: CUSTOM, rules: [{}]}\n",
        )
        .unwrap();
        let t = translate(&r, 1, &Options::default());
        let rule = |name: &str| {
            let p = t.snapshot.policies.iter().find(|p| p.name == name)?;
            match &p.rule {
                PolicyRule::Authorization(a) => Some(a.clone()),
                _ => None,
            }
        };
        let asks = rule("asks").unwrap();
        assert_eq!(
            asks.action,
            AuthzAction::Deny,
            "an older proxy refuses what it cannot ask"
        );
        let check = asks.check.expect("asks its provider");
        assert_eq!(
            *check,
            ExtAuthz {
                provider: "authz".into(),
                api: ExtAuthzApi::Http,
                cluster: "service/auth/ext-authz:8000".into(),
                timeout_ms: 500,
                path_prefix: "/check".into(),
                include_request_headers: vec!["x-user".into(), "x-ext-*".into()],
                additional_headers: Default::default(),
                headers_to_upstream_on_allow: vec!["x-authz-user".into()],
                headers_to_downstream_on_deny: vec![],
                headers_to_downstream_on_allow: vec!["x-ext-authz-check-result".into()],
                include_request_body: Some(BodyInCheck {
                    max_bytes: 1024,
                    allow_partial: true,
                    pack_as_bytes: false,
                }),
                fail_open: false,
                status_on_error: 503,
            }
        );
        let cluster = t
            .snapshot
            .clusters
            .iter()
            .find(|c| c.name == check.cluster)
            .expect("its cluster");
        assert_eq!(cluster.endpoints[0].address, "10.0.0.9");
        // Providers that cannot be found or reached: the policy refuses what it matches.
        for name in ["unknown", "unreachable"] {
            let a = rule(name).unwrap();
            assert_eq!((a.action, a.check.is_none()), (AuthzAction::Deny, true), "{name}");
        }
        // gRPC (OPA-Envoy): the HTTP/2 variant of the Service's cluster (its port declares nothing).
        let grpc = rule("grpc").unwrap().check.unwrap();
        assert_eq!(
            (grpc.api, grpc.cluster.as_str(), grpc.timeout_ms, grpc.fail_open),
            (ExtAuthzApi::Grpc, "service/auth/opa:9191#h2", 2000, true)
        );
        let h2 = t.snapshot.clusters.iter().find(|c| c.name == grpc.cluster).unwrap();
        assert_eq!(h2.protocol, crate::model::UpstreamProtocol::Http2);
        assert!(rule("traced").is_none() && rule("unnamed").is_none() && rule("whole-body").is_none());
        let unbounded = t.problems.iter().find(|p| p.object.name == "whole-body").unwrap();
        assert!(
            unbounded
                .message
                .contains("includeRequestBodyInCheck.maxRequestBytes: must be set"),
            "{}",
            unbounded.message
        );
        assert_eq!(
            t.problem_keys(),
            [
                ("traced", "spec.provider.name", Reason::UnsupportedValue),
                ("unknown", "spec.provider.name", Reason::BackendNotFound),
                ("unnamed", "spec.provider.name", Reason::Invalid),
                ("unreachable", "spec.provider.name", Reason::BackendNotFound),
                ("whole-body", "spec.provider.name", Reason::Invalid),
            ]
        );
        crate::validate(&t.snapshot).expect("valid");
        // A sidecar the policy selects gets the provider's cluster with it.
        let w = t.snapshot.workload_or_placeholder("shop", "cart-1");
        let view = t.snapshot.mesh_view(&t.digests, Some(&w), |p| p.applies_to(&w));
        assert!(view.clusters.iter().any(|c| c.name == check.cluster));
        assert_eq!(view.hash, view.content_hash());
    }
}
