//! Istio's AuthorizationPolicy semantics at L4 and L7, case by case (mesh.md).

use std::sync::Arc;

use ferrum_snapshot::identity::SpiffeId;
use ferrum_snapshot::mesh::{Authorization, AuthzAction, Policy, PolicyRule, Workload};

use super::*;

fn workload(ns: &str, labels: &[(&str, &str)]) -> Workload {
    Workload {
        uid: "u".into(),
        name: "w".into(),
        namespace: ns.into(),
        service_account: "sa".into(),
        node: String::new(),
        ips: vec!["10.0.0.2".into()],
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ports: vec![],
        hbone: true,
        zone: None,
    }
}

/// A policy from the `spec` as a user writes it (YAML), in namespace `ns`.
fn policy(ns: &str, name: &str, spec: &str) -> Arc<Policy> {
    let spec: ferrum_snapshot::istio::AuthorizationPolicySpec = serde_yaml::from_str(spec).unwrap();
    Arc::new(Policy {
        key: format!("AuthorizationPolicy/{ns}/{name}"),
        namespace: ns.into(),
        name: name.into(),
        selector: spec.selector.map(|s| s.match_labels),
        targets: vec![],
        rule: PolicyRule::Authorization(Authorization {
            action: match spec.action.as_deref().unwrap_or("ALLOW") {
                "DENY" => AuthzAction::Deny,
                "AUDIT" => AuthzAction::Audit,
                _ => AuthzAction::Allow,
            },
            rules: spec.rules.unwrap_or_default(),
            dry_run: false,
            check: None,
        }),
    })
}

fn dry(p: Arc<Policy>) -> Arc<Policy> {
    let mut p = (*p).clone();
    if let PolicyRule::Authorization(a) = &mut p.rule {
        a.dry_run = true;
    }
    Arc::new(p)
}

fn from(ns: &str, sa: &str, ip: &str, port: u16) -> (SpiffeId, IpAddr, SocketAddr) {
    (
        SpiffeId::new("cluster.local", ns, sa),
        ip.parse().unwrap(),
        SocketAddr::new("10.0.0.2".parse().unwrap(), port),
    )
}

fn decide(policies: &[Arc<Policy>], w: &Workload, who: &(SpiffeId, IpAddr, SocketAddr), mtls: bool) -> Decision {
    let a = Authorizer::for_workload(policies, w, &Upstreams::none());
    a.check(&Connection {
        peer: mtls.then_some(&who.0),
        source: who.1,
        remote: who.1,
        destination: who.2,
        request: None,
        auth: None,
    })
}

/// The decision for one HTTP request (`METHOD path`, host, headers) from `who` over mTLS.
fn decide_request(
    policies: &[Arc<Policy>],
    w: &Workload,
    who: &(SpiffeId, IpAddr, SocketAddr),
    req: (&str, &str, &str, &[(&str, &str)]),
) -> Decision {
    let (method, path, host, headers) = req;
    let mut b = http::Request::builder().method(method).uri(path).header("host", host);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let (parts, ()) = b.body(()).unwrap().into_parts();
    Authorizer::for_workload(policies, w, &Upstreams::none()).check(&Connection {
        peer: Some(&who.0),
        source: who.1,
        remote: who.1,
        destination: who.2,
        request: Some(&parts),
        auth: None,
    })
}

/// The decision for `GET /` from `who` carrying `jwt` (a validated token), or none.
fn decide_jwt(
    policies: &[Arc<Policy>],
    w: &Workload,
    who: &(SpiffeId, IpAddr, SocketAddr),
    jwt: Option<&Jwt>,
) -> Decision {
    let (parts, ()) = http::Request::get("/").body(()).unwrap().into_parts();
    Authorizer::for_workload(policies, w, &Upstreams::none()).check(&Connection {
        peer: Some(&who.0),
        source: who.1,
        remote: who.1,
        destination: who.2,
        request: Some(&parts),
        auth: jwt,
    })
}

#[test]
fn request_principals_and_claims_need_a_validated_token() {
    let w = workload("shop", &[]);
    let a = from("web", "front", "10.0.1.1", 8080);
    let allow = policy(
        "shop",
        "jwt",
        "rules: [{from: [{source: {requestPrincipals: [\"https://issuer/*\"]}}], when: [{key: \"request.auth.claims[groups]\", values: [admins]}]}]",
    );
    let deny = policy(
        "shop",
        "no-bob",
        "action: DENY\nrules: [{from: [{source: {requestPrincipals: [\"https://issuer/bob\"]}}]}]",
    );
    let jwt = |sub: &str, groups: serde_json::Value| Jwt {
        principal: format!("https://issuer/{sub}"),
        claims: serde_json::json!({"sub": sub, "groups": groups})
            .as_object()
            .unwrap()
            .clone(),
    };
    let ps = [allow, deny];
    assert_eq!(
        decide_jwt(&ps, &w, &a, Some(&jwt("alice", serde_json::json!(["users", "admins"])))),
        Decision::Allow
    );
    assert!(
        matches!(
            decide_jwt(&ps, &w, &a, Some(&jwt("carol", serde_json::json!(["users"])))),
            Decision::Deny(_)
        ),
        "claim missing"
    );
    assert!(
        matches!(
            decide_jwt(&ps, &w, &a, Some(&jwt("bob", serde_json::json!(["admins"])))),
            Decision::Deny(_)
        ),
        "DENY by request principal"
    );
    assert!(
        matches!(decide_jwt(&ps, &w, &a, None), Decision::Deny(_)),
        "no token, no principal"
    );
    assert!(
        matches!(decide(&ps, &w, &a, true), Decision::Deny(_)),
        "TCP cannot show a token"
    );
}

#[test]
fn http_operations_and_headers_decide_per_request() {
    let w = workload("shop", &[]);
    let a = from("web", "front", "10.0.1.1", 8080);
    let allow = policy(
        "shop",
        "read-only",
        "rules: [{to: [{operation: {methods: [GET, HEAD], paths: [\"/api/*\", \"/items/{*}/reviews\"], hosts: [\"shop.example.com\"]}}]}]",
    );
    let req = |m, p, h| decide_request(std::slice::from_ref(&allow), &w, &a, (m, p, h, &[]));
    assert_eq!(req("GET", "/api/orders", "shop.example.com"), Decision::Allow);
    assert_eq!(
        req("GET", "/api/orders", "SHOP.example.com:8080"),
        Decision::Allow,
        "host with port, any case"
    );
    assert_eq!(req("GET", "/items/42/reviews", "shop.example.com"), Decision::Allow);
    assert!(
        matches!(req("GET", "/items/42/7/reviews", "shop.example.com"), Decision::Deny(_)),
        "{{*}} is one segment"
    );
    assert!(matches!(
        req("POST", "/api/orders", "shop.example.com"),
        Decision::Deny(_)
    ));
    assert!(matches!(req("GET", "/admin", "shop.example.com"), Decision::Deny(_)));
    assert!(matches!(
        req("GET", "/api/orders", "other.example.com"),
        Decision::Deny(_)
    ));
    // At L4 the same ALLOW cannot match: the connection alone is denied.
    assert!(matches!(
        decide(std::slice::from_ref(&allow), &w, &a, true),
        Decision::Deny(_)
    ));

    let deny = policy(
        "shop",
        "no-debug",
        "action: DENY\nrules: [{to: [{operation: {paths: [\"/debug/{**}\"]}}]}, {when: [{key: \"request.headers[x-block]\", values: [\"yes\"]}]}]",
    );
    let both = [allow, deny];
    let req = |p, headers: &[(&str, &str)]| decide_request(&both, &w, &a, ("GET", p, "shop.example.com", headers));
    assert_eq!(req("/api/x", &[]), Decision::Allow);
    assert_eq!(req("/debug/a/b", &[]), Decision::Deny("shop/no-debug".into()));
    assert_eq!(
        req("/api/x", &[("x-block", "yes")]),
        Decision::Deny("shop/no-debug".into())
    );
    assert_eq!(req("/api/x", &[("x-block", "no")]), Decision::Allow);
}

#[test]
fn rules_indexed_by_principal_still_need_their_operation() {
    let w = workload("shop", &[]);
    let front = from("web", "front", "10.0.1.1", 8080);
    let back = from("web", "back", "10.0.1.2", 8080);
    let p = policy(
        "shop",
        "front-reads",
        "rules: [{from: [{source: {principals: [cluster.local/ns/web/sa/front]}}], to: [{operation: {methods: [GET]}}]}]",
    );
    let req = |who, m| decide_request(std::slice::from_ref(&p), &w, who, (m, "/x", "shop", &[]));
    assert_eq!(req(&front, "GET"), Decision::Allow);
    assert!(matches!(req(&front, "DELETE"), Decision::Deny(_)));
    assert!(matches!(req(&back, "GET"), Decision::Deny(_)));
}

#[test]
fn path_templates() {
    assert!(path_match("/a/{*}/c", "/a/b/c"));
    assert!(!path_match("/a/{*}/c", "/a//c"));
    assert!(path_match("/a/{**}", "/a/b/c/d"));
    assert!(path_match("/a/{**}", "/a/"));
    assert!(!path_match("/a/{**}", "/b/c"));
    assert!(path_match("/a*", "/abc"));
    assert!(path_match("*.png", "/x/y.png"));
}

#[test]
fn no_policy_allows_and_an_allow_without_rules_allows_nothing() {
    let w = workload("shop", &[]);
    let a = from("web", "front", "10.0.1.1", 8080);
    assert_eq!(decide(&[], &w, &a, true), Decision::Allow);
    let nothing = policy("shop", "allow-nothing", "{}");
    assert!(matches!(decide(&[nothing], &w, &a, true), Decision::Deny(_)));
    let everything = policy("shop", "allow-all", "rules: [{}]");
    assert_eq!(decide(&[everything], &w, &a, true), Decision::Allow);
    // A DENY without rules matches nothing.
    let deny_none = policy("shop", "deny-none", "action: DENY");
    assert_eq!(decide(&[deny_none], &w, &a, true), Decision::Allow);
}

#[test]
fn deny_wins_over_allow_and_allow_needs_a_match() {
    let w = workload("shop", &[("app", "cart")]);
    let allow_web = policy("shop", "allow-web", "rules: [{from: [{source: {namespaces: [web]}}]}]");
    let deny_front = policy(
        "shop",
        "deny-front",
        "action: DENY\nrules: [{from: [{source: {principals: [cluster.local/ns/web/sa/front]}}]}]",
    );
    let front = from("web", "front", "10.0.1.1", 8080);
    let back = from("web", "back", "10.0.1.2", 8080);
    let other = from("ops", "tool", "10.0.1.3", 8080);
    let both = [allow_web.clone(), deny_front];
    assert_eq!(
        decide(&both, &w, &front, true),
        Decision::Deny("shop/deny-front".into())
    );
    assert_eq!(decide(&both, &w, &back, true), Decision::Allow);
    assert!(matches!(decide(&both, &w, &other, true), Decision::Deny(_)));
    // Without mTLS there is no namespace: an ALLOW by namespace cannot match.
    assert!(matches!(decide(&[allow_web], &w, &back, false), Decision::Deny(_)));
}

#[test]
fn string_forms_not_fields_ip_blocks_and_ports() {
    let w = workload("shop", &[]);
    let p = policy(
        "shop",
        "p",
        "rules:\n- from: [{source: {principals: ['cluster.local/ns/web/*'], notPrincipals: ['*/sa/evil']}}]\n  to: [{operation: {ports: ['8080']}}]\n\
         - from: [{source: {ipBlocks: [10.9.0.0/16], notIpBlocks: [10.9.9.9]}}]\n",
    );
    let ps = [p];
    assert_eq!(
        decide(&ps, &w, &from("web", "front", "1.1.1.1", 8080), true),
        Decision::Allow
    );
    assert!(matches!(
        decide(&ps, &w, &from("web", "evil", "1.1.1.1", 8080), true),
        Decision::Deny(_)
    ));
    assert!(
        matches!(
            decide(&ps, &w, &from("web", "front", "1.1.1.1", 9090), true),
            Decision::Deny(_)
        ),
        "port"
    );
    assert_eq!(
        decide(&ps, &w, &from("x", "y", "10.9.1.1", 9090), false),
        Decision::Allow,
        "ip block"
    );
    assert!(
        matches!(
            decide(&ps, &w, &from("x", "y", "10.9.9.9", 9090), false),
            Decision::Deny(_)
        ),
        "notIpBlocks"
    );
    let suffix = policy("shop", "s", "rules: [{from: [{source: {principals: ['*/sa/front']}}]}]");
    assert_eq!(
        decide(&[suffix], &w, &from("any", "front", "1.1.1.1", 1), true),
        Decision::Allow
    );
}

#[test]
fn http_only_fields_on_tcp_fail_closed() {
    let w = workload("shop", &[]);
    let allow_get = policy("shop", "get", "rules: [{to: [{operation: {methods: [GET]}}]}]");
    let c = from("web", "front", "10.0.1.1", 8080);
    assert!(
        matches!(decide(&[allow_get], &w, &c, true), Decision::Deny(_)),
        "an ALLOW that needs a method never matches a TCP connection"
    );
    let deny_post = policy(
        "shop",
        "post",
        "action: DENY\nrules: [{from: [{source: {namespaces: [web]}}], to: [{operation: {methods: [POST]}}]}]",
    );
    assert_eq!(
        decide(std::slice::from_ref(&deny_post), &w, &c, true),
        Decision::Deny("shop/post".into()),
        "a DENY ignores the method and matches on the rest"
    );
    assert_eq!(
        decide(&[deny_post], &w, &from("ops", "x", "10.0.1.1", 8080), true),
        Decision::Allow
    );
}

#[test]
fn selectors_root_namespace_audit_and_when() {
    let cart = workload("shop", &[("app", "cart")]);
    let pay = workload("shop", &[("app", "pay")]);
    let elsewhere = workload("blog", &[("app", "cart")]);
    let c = from("web", "front", "10.0.1.1", 8080);
    let for_pay = policy("shop", "pay-only", "selector: {matchLabels: {app: pay}}");
    assert_eq!(
        decide(std::slice::from_ref(&for_pay), &cart, &c, true),
        Decision::Allow,
        "not selected"
    );
    assert!(matches!(decide(&[for_pay], &pay, &c, true), Decision::Deny(_)));
    let mesh_wide = policy(
        ferrum_snapshot::ROOT_NAMESPACE,
        "deny-web",
        "action: DENY\nrules: [{from: [{source: {namespaces: [web]}}]}]",
    );
    assert!(
        matches!(
            decide(std::slice::from_ref(&mesh_wide), &elsewhere, &c, true),
            Decision::Deny(_)
        ),
        "root namespace applies everywhere"
    );
    let other_ns = policy("blog", "x", "{}");
    assert_eq!(
        decide(&[other_ns], &cart, &c, true),
        Decision::Allow,
        "another namespace's policy"
    );
    let audit = policy("shop", "audit", "action: AUDIT\nrules: [{}]");
    assert_eq!(
        decide(&[audit], &cart, &c, true),
        Decision::Allow,
        "AUDIT never decides"
    );
    let when = policy(
        "shop",
        "when",
        "rules: [{when: [{key: destination.port, values: ['8080']}, {key: source.namespace, notValues: [ops]}]}]",
    );
    assert_eq!(decide(std::slice::from_ref(&when), &cart, &c, true), Decision::Allow);
    assert!(matches!(
        decide(&[when], &cart, &from("ops", "x", "10.0.1.1", 8080), true),
        Decision::Deny(_)
    ));
}

#[test]
fn indexed_and_tried_rules_of_one_policy_still_or() {
    let w = workload("shop", &[]);
    let p = policy(
        "shop",
        "mixed",
        "rules:\n- from: [{source: {principals: [cluster.local/ns/web/sa/front]}}, {source: {namespaces: [ops]}}]\n\
         - to: [{operation: {ports: ['9090']}}]\n",
    );
    let ps = [p];
    assert_eq!(
        decide(&ps, &w, &from("web", "front", "1.1.1.1", 8080), true),
        Decision::Allow,
        "exact principal"
    );
    assert_eq!(
        decide(&ps, &w, &from("ops", "any", "1.1.1.1", 8080), true),
        Decision::Allow,
        "exact namespace"
    );
    assert_eq!(
        decide(&ps, &w, &from("x", "y", "1.1.1.1", 9090), true),
        Decision::Allow,
        "the other rule"
    );
    assert!(matches!(
        decide(&ps, &w, &from("x", "y", "1.1.1.1", 8080), true),
        Decision::Deny(_)
    ));
    assert!(
        matches!(
            decide(&ps, &w, &from("ops", "any", "1.1.1.1", 8080), false),
            Decision::Deny(_)
        ),
        "no namespace without mTLS"
    );
}

#[test]
fn dry_run_is_never_enforced() {
    let w = workload("shop", &[]);
    let p = dry(policy("shop", "deny-all", "action: DENY\nrules: [{}]"));
    let allow_nothing = dry(policy("shop", "nothing", "{}"));
    let c = from("web", "front", "10.0.1.1", 8080);
    assert_eq!(decide(&[p, allow_nothing], &w, &c, true), Decision::Allow);
}

#[test]
fn indexed_patterns_match_as_istio_strings_do() {
    let mut p = Patterns::default();
    for x in ["cluster.local/ns/web/*", "*/sa/front", "cluster.local/ns/ops/sa/tool"] {
        p.insert(x);
    }
    for (v, want) in [
        ("cluster.local/ns/web/sa/any", true),
        ("other.td/ns/x/sa/front", true),
        ("cluster.local/ns/ops/sa/tool", true),
        ("cluster.local/ns/ops/sa/tools", false),
        ("cluster.local/ns/webby/sa/x", false),
        ("front", false),
        ("", false),
    ] {
        assert_eq!(p.matches(v), want, "{v}");
        let linear = ["cluster.local/ns/web/*", "*/sa/front", "cluster.local/ns/ops/sa/tool"]
            .iter()
            .any(|x| string_match(x, v));
        assert_eq!(p.matches(v), linear, "index and linear disagree on {v}");
    }
    let mut any = Patterns::default();
    any.insert("*");
    assert!(any.matches("whatever"));
}

#[test]
fn address_blocks() {
    let n = Net::parse("10.1.0.0/16").unwrap();
    assert!(n.contains("10.1.200.3".parse().unwrap()));
    assert!(!n.contains("10.2.0.1".parse().unwrap()));
    assert!(Net::parse("0.0.0.0/0").unwrap().contains("8.8.8.8".parse().unwrap()));
    assert!(Net::parse("fd00::/8").unwrap().contains("fd12::1".parse().unwrap()));
    assert!(!Net::parse("fd00::/8").unwrap().contains("10.0.0.1".parse().unwrap()));
    assert!(Net::parse("10.0.0.0/33").is_none());
    assert!(Net::parse("nope").is_none());
}
