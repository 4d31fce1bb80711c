//! File mode: AuthorizationPolicy and RequestAuthentication beside the Gateway, targeting it
//! (`targetRefs`), enforced by the real `ferrum-dp` before routing — the same YAML a cluster
//! user applies. Tokens are minted with `jsonwebtoken` from a P-256 key made by rcgen.

mod common;

use common::*;
use ferrum_testkit::jwt::{self, Issuer};
use serde_json::json;

/// A token from `https://issuer.example` for audience `gw`, expiring `exp_in` seconds from now.
fn token(k: &Issuer, sub: &str, exp_in: i64) -> String {
    k.token(&json!({"iss": "https://issuer.example", "sub": sub, "aud": "gw", "exp": jwt::now() + exp_in}))
}

#[tokio::test]
async fn policies_targeting_the_gateway_guard_its_routes() {
    let a = Backend::start("a").await;
    let k = Issuer::default();
    let jwks = &k.jwks;
    let port = free_port();
    let target = "targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: gw}]";
    let yaml = docs(&[
        gateway(port),
        backend("a", &[&a], ""),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\n\
         spec: {parentRefs: [{name: gw}], rules: [{backendRefs: [{group: ferrum.dev, kind: Backend, name: a}]}]}\n"
            .to_string(),
        format!(
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt}}\n\
             spec: {{{target}, jwtRules: [{{issuer: https://issuer.example, audiences: [gw], jwks: '{jwks}', forwardOriginalToken: true}}]}}\n"
        ),
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: public-or-user}}\n\
             spec: {{{target}, rules: [{{to: [{{operation: {{paths: [\"/public/*\"]}}}}]}}, {{from: [{{source: {{requestPrincipals: [\"https://issuer.example/*\"]}}}}]}}]}}\n"
        ),
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: block}}\n\
             spec: {{{target}, action: DENY, rules: [{{when: [{{key: \"request.headers[x-block]\", values: [\"yes\"]}}]}}]}}\n"
        ),
    ]);
    let _dp = Dp::start(&yaml).await;
    let c = client();
    let get = async |path: &str, headers: &[(&str, String)]| {
        let mut r = c.get(format!("http://127.0.0.1:{port}{path}"));
        for (k, v) in headers {
            r = r.header(*k, v);
        }
        r.send().await.unwrap()
    };
    assert_eq!(get("/public/page", &[]).await.status(), 200);
    let denied = get("/private", &[]).await;
    assert_eq!(denied.status(), 403, "no principal, not public");
    assert_eq!(denied.headers()["x-ferrum-error"], "rbac_access_denied");
    let bearer = |t: String| vec![("authorization", format!("Bearer {t}"))];
    assert_eq!(get("/private", &bearer(token(&k, "alice", 600))).await.status(), 200);
    let expired = get("/private", &bearer(token(&k, "alice", -600))).await;
    assert_eq!(expired.status(), 401);
    assert!(expired.headers().contains_key("www-authenticate"));
    let other = Issuer::default();
    assert_eq!(
        get("/public/page", &bearer(token(&other, "mallory", 600)))
            .await
            .status(),
        401,
        "a bad signature is refused even where no principal is needed"
    );
    assert_eq!(
        get("/public/page", &[("x-block", "yes".into())]).await.status(),
        403,
        "DENY wins"
    );
    assert_eq!(a.hits(), 2, "only allowed requests reached the backend");
}

/// Two Gateways on one address and port (one listener for the proxy), each with its own
/// hostname: a policy that targets one of them decides only that Gateway's hosts.
#[tokio::test]
async fn policies_stay_on_their_gateway_when_gateways_share_a_port() {
    let a = Backend::start("a").await;
    let port = free_port();
    let gw = |name: &str, host: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: {name}}}\n\
             spec: {{gatewayClassName: ferrum, listeners: [{{name: http, port: {port}, protocol: HTTP, hostname: {host}}}], addresses: [{{type: IPAddress, value: 127.0.0.1}}]}}\n"
        )
    };
    let yaml = docs(&[
        gw("shop", "shop.example.com"),
        gw("admin", "admin.example.com"),
        backend("a", &[&a], ""),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\n\
         spec: {parentRefs: [{name: shop}, {name: admin}], rules: [{backendRefs: [{group: ferrum.dev, kind: Backend, name: a}]}]}\n"
            .to_string(),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: office-only}\n\
         spec: {targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: admin}], rules: [{when: [{key: \"request.headers[x-office]\", values: [\"yes\"]}]}]}\n"
            .to_string(),
    ]);
    let _dp = Dp::start(&yaml).await;
    let c = client();
    let get = async |host: &str, office: bool| {
        let mut r = c.get(format!("http://127.0.0.1:{port}/")).header("host", host);
        if office {
            r = r.header("x-office", "yes");
        }
        r.send().await.unwrap().status().as_u16()
    };
    assert_eq!(
        get("admin.example.com", false).await,
        403,
        "the admin Gateway's policy applies"
    );
    assert_eq!(get("admin.example.com", true).await, 200);
    assert_eq!(
        get("shop.example.com", false).await,
        200,
        "not to the shop Gateway on the same port"
    );
}
