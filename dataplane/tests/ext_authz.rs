//! File mode: AuthorizationPolicies with action CUSTOM targeting the Gateway, asking an
//! external authorization service (MeshConfig `extensionProviders`, `envoyExtAuthzHttp`) that
//! runs on loopback, before the other policies and routing — the YAML an Istio user applies.

mod common;

use std::time::{Duration, Instant};

use common::*;
use ferrum_testkit::ext_authz::AuthzServer;

/// The HTTP provider `authz` (and `lenient`, the same but failing open) at `authz`.
fn http_providers(authz: &AuthzServer) -> (String, String) {
    let provider = |name: &str, extra: &str| {
        format!(
            "  - name: {name}\n    envoyExtAuthzHttp:\n      service: ext-authz.auth.svc.cluster.local\n      port: '8000'\n      \
             timeout: 0.5s\n      pathPrefix: /check\n      includeRequestHeadersInCheck: [x-ext-authz, x-user]\n      \
             headersToUpstreamOnAllow: [x-authz-user]\n      headersToDownstreamOnDeny: [x-ext-authz-check-result]\n      \
             includeAdditionalHeadersInCheck: {{X-Gateway: edge}}\n{extra}"
        )
    };
    (
        format!(
            "{}{}",
            provider("authz", ""),
            provider("lenient", "      failOpen: true\n")
        ),
        service("ext-authz", 8000, authz),
    )
}

/// A Service `auth/<name>` on `port` whose one endpoint is `authz`.
fn service(name: &str, port: u16, authz: &AuthzServer) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: auth}}\nspec: {{ports: [{{name: http, port: {port}}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: auth, labels: {{kubernetes.io/service-name: {name}}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: {}}}]\nendpoints: [{{addresses: [127.0.0.1]}}]\n",
        authz.addr.port()
    )
}

/// A Gateway on `port` routing to `a`; `/private/*` asks provider `authz`, `/open/*` asks
/// `lenient`, and an ALLOW policy reads the header the provider sets.
fn config(port: u16, a: &Backend, (providers, services): (String, String)) -> String {
    let target = "targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: gw}]";
    let custom = |name: &str, provider: &str, paths: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}}}\n\
             spec: {{{target}, action: CUSTOM, provider: {{name: {provider}}}, rules: [{{to: [{{operation: {{paths: [{paths}]}}}}]}}]}}\n"
        )
    };
    docs(&[
        gateway(port),
        backend("a", &[a], ""),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\n\
         spec: {parentRefs: [{name: gw}], rules: [{backendRefs: [{group: ferrum.dev, kind: Backend, name: a}]}]}\n"
            .to_string(),
        format!(
            "apiVersion: ferrum.dev/v1alpha1\nkind: MeshConfig\nmetadata: {{name: default, namespace: ferrum-system}}\nspec:\n  \
             extensionProviders:\n{providers}"
        ),
        services,
        custom("private", "authz", "\"/private/*\""),
        custom("open", "lenient", "\"/open/*\""),
        // The provider's headers are on the request before the other policies look at it.
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: who}}\n\
             spec: {{{target}, rules: [{{to: [{{operation: {{notPaths: [/private/admin]}}}}]}}, \
             {{when: [{{key: \"request.headers[x-authz-user]\", values: [root]}}]}}]}}\n"
        ),
    ])
}

/// `GET path` on the gateway at `port` with `headers`.
async fn get(c: &reqwest::Client, port: u16, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut r = c.get(format!("http://127.0.0.1:{port}{path}"));
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.send().await.unwrap()
}

#[tokio::test]
async fn custom_policies_ask_the_external_service_before_the_request_goes_on() {
    let a = Backend::start("a").await;
    let authz = AuthzServer::start().await;
    let port = free_port();
    let dp = Dp::start(&config(port, &a, http_providers(&authz))).await;
    let c = client();
    let get = async |path: &str, headers: &[(&str, &str)]| get(&c, port, path, headers).await;

    assert_eq!(get("/public/page", &[]).await.status(), 200);
    assert!(authz.asked().is_empty(), "no CUSTOM policy matches: nothing is asked");

    // Refused by the service: its status, body and the headers the provider passes on.
    let refused = get("/private/page", &[("x-leak", "no")]).await;
    assert_eq!(refused.status(), 403);
    assert_eq!(refused.headers()["x-ext-authz-check-result"], "denied");
    assert!(refused.text().await.unwrap().starts_with("denied by ext_authz"));
    assert_eq!(a.hits(), 1, "a refused request never reaches the backend");

    // Allowed: the check carried the method, the prefixed path and query, the host and the
    // named headers only, with no body; the backend sees the header the service set.
    let allowed = [
        ("x-ext-authz", "allow"),
        ("x-user", "alice"),
        ("authorization", "Bearer secret"),
    ];
    let ok = get("/private/page?q=1", &allowed).await;
    assert_eq!(ok.status(), 200);
    let seen = a.last().unwrap();
    assert_eq!(seen["path"], "/private/page?q=1");
    assert_eq!(seen["headers"]["x-authz-user"][0], "alice");
    let asked = authz.asked().last().cloned().unwrap();
    assert_eq!(
        (asked["method"].as_str(), asked["path"].as_str()),
        (Some("GET"), Some("/check/private/page?q=1"))
    );
    let h = &asked["headers"];
    assert_eq!(h["host"], format!("127.0.0.1:{port}"));
    assert_eq!(
        (h["x-ext-authz"].as_str(), h["x-user"].as_str()),
        (Some("allow"), Some("alice"))
    );
    assert_eq!(h["content-length"], "0");
    assert_eq!(
        h["authorization"], "Bearer secret",
        "as Envoy, Authorization always goes"
    );
    assert_eq!(h["x-gateway"], "edge", "includeAdditionalHeadersInCheck");
    let refused_check = &authz.asked()[0]["headers"];
    assert!(
        refused_check.get("x-leak").is_none(),
        "headers not named stay out: {refused_check}"
    );

    // Its answer's headers count for the other policies: root may see /private/admin.
    assert_eq!(
        get("/private/admin", &[("x-ext-authz", "allow"), ("x-user", "root")])
            .await
            .status(),
        200
    );
    let bob = get("/private/admin", &[("x-ext-authz", "allow"), ("x-user", "bob")]).await;
    assert_eq!(bob.status(), 403);
    assert_eq!(bob.headers()["x-ferrum-error"], "rbac_access_denied");

    // A body goes to the backend, never to the service.
    let post = c
        .post(format!("http://127.0.0.1:{port}/private/upload"))
        .header("x-ext-authz", "allow")
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 200);
    assert_eq!(a.last().unwrap()["body"], "payload");
    assert_eq!(authz.asked().last().unwrap()["method"], "POST");
    // One check at a time: they share a connection to the service (one per worker at most)
    // instead of opening one each.
    let peers: std::collections::BTreeSet<String> = authz
        .asked()
        .iter()
        .map(|a| a["peer"].as_str().unwrap().to_string())
        .collect();
    assert!(
        peers.len() <= 2,
        "{} checks came on {} connections",
        authz.asked().len(),
        peers.len()
    );

    // The service failing (a 5xx, or no answer in time): closed by default, open when the
    // provider says so.
    let allow = [("x-ext-authz", "allow")];
    assert_eq!(get("/private/error", &allow).await.status(), 403);
    assert_eq!(get("/open/error", &allow).await.status(), 200);
    let started = Instant::now();
    assert_eq!(get("/private/slow", &allow).await.status(), 403);
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "the provider's 0.5 s timeout bounds the wait"
    );
    assert_eq!(get("/open/slow", &allow).await.status(), 200);

    // Each outcome is counted by provider.
    let checks = |provider: &str, result: &str| {
        format!("ferrum_ext_authz_checks_total{{provider=\"{provider}\",result=\"{result}\"}}")
    };
    assert_eq!(dp.metric(&checks("authz", "allowed")).await, 4.0);
    assert_eq!(dp.metric(&checks("authz", "denied")).await, 1.0);
    assert_eq!(dp.metric(&checks("authz", "error")).await, 2.0);
    assert_eq!(dp.metric(&checks("lenient", "failed_open")).await, 2.0);
}

/// A CUSTOM policy whose provider cannot be found refuses what it matches and says why; the
/// rest of the config serves.
#[tokio::test]
async fn a_custom_policy_without_its_provider_refuses_what_it_matches() {
    let a = Backend::start("a").await;
    let authz = AuthzServer::start().await;
    let port = free_port();
    let yaml = config(port, &a, http_providers(&authz)).replace("provider: {name: authz}", "provider: {name: missing}");
    let dp = Dp::start(&yaml).await;
    let c = client();
    let status = async |path: &str| {
        c.get(format!("http://127.0.0.1:{port}{path}"))
            .header("x-ext-authz", "allow")
            .send()
            .await
            .unwrap()
            .status()
    };
    assert_eq!(status("/private/page").await, 403);
    assert_eq!(status("/public/page").await, 200);
    assert!(authz.asked().is_empty());
    let config = dp.admin_get("/config").await;
    assert!(
        config.contains("no extensionProviders entry \\\"missing\\\""),
        "the reason is shown: {config}"
    );
}

/// The same over gRPC (Istio `envoyExtAuthzGrpc`, OPA-Envoy's API): the check carries the
/// request's head and the caller; OK lets it on with the response's header edits, a denial is
/// the client's answer, a failed call or no answer in time follows `failOpen`/`statusOnError`.
#[tokio::test]
async fn a_grpc_provider_is_asked_check_by_check() {
    let a = Backend::start("a").await;
    let authz = AuthzServer::start_grpc().await;
    let port = free_port();
    let provider = |name: &str, extra: &str| {
        format!(
            "  - name: {name}\n    envoyExtAuthzGrpc:\n      service: opa.auth.svc.cluster.local\n      port: 9191\n      timeout: 0.5s\n      \
             includeRequestBodyInCheck: {{maxRequestBytes: 64, packAsBytes: true}}\n{extra}"
        )
    };
    let providers = format!(
        "{}{}",
        provider("authz", ""),
        provider("lenient", "      failOpen: true\n")
    );
    let _dp = Dp::start(&config(port, &a, (providers, service("opa", 9191, &authz)))).await;
    let c = client();
    let get = async |path: &str, headers: &[(&str, &str)]| get(&c, port, path, headers).await;
    assert_eq!(get("/public/page", &[]).await.status(), 200);
    assert!(authz.asked().is_empty());

    let refused = get("/private/page", &[]).await;
    assert_eq!(refused.status(), 403);
    assert_eq!(refused.headers()["x-ext-authz-check-result"], "denied");
    assert!(refused.text().await.unwrap().starts_with("denied by ext_authz"));

    let allowed = [
        ("x-ext-authz", "allow"),
        ("x-user", "alice"),
        ("authorization", "Bearer t"),
    ];
    assert_eq!(get("/private/page?q=1", &allowed).await.status(), 200);
    let seen = a.last().unwrap();
    assert_eq!(seen["headers"]["x-authz-user"][0], "alice");
    assert_eq!(seen["headers"]["x-ext-authz-check-result"][0], "allowed");
    let asked = authz.asked().last().cloned().unwrap();
    // The OK response's query edits: `secret` removed, `checked` set; the rest as sent.
    let edit = [("x-ext-authz", "allow"), ("x-edit-query", "yes")];
    let path = "/private/page?q=a%20b&secret=s3&checked=no&secret=again&z";
    assert_eq!(get(path, &edit).await.status(), 200);
    assert_eq!(a.last().unwrap()["path"], "/private/page?q=a%20b&z&checked=by+authz");
    assert_eq!(
        (asked["method"].as_str(), asked["path"].as_str()),
        (Some("GET"), Some("/private/page?q=1"))
    );
    let h = &asked["headers"];
    assert_eq!(h[":authority"], format!("127.0.0.1:{port}"));
    assert_eq!(h["authorization"], "Bearer t", "gRPC checks carry every header");

    assert_eq!(
        get("/private/admin", &[("x-ext-authz", "allow"), ("x-user", "root")])
            .await
            .status(),
        200
    );
    assert_eq!(
        get("/private/admin", &[("x-ext-authz", "allow"), ("x-user", "bob")])
            .await
            .status(),
        403
    );

    let allow = [("x-ext-authz", "allow")];
    assert_eq!(
        get("/private/error", &allow).await.status(),
        403,
        "a failed call refuses"
    );
    assert_eq!(
        get("/open/error", &allow).await.status(),
        200,
        "unless the provider fails open"
    );
    let started = Instant::now();
    assert_eq!(get("/private/slow", &allow).await.status(), 403);
    assert!(started.elapsed() < Duration::from_millis(1500));

    // The body goes along as bytes (`packAsBytes`), with its size; the OK response's
    // `response_headers_to_add` are on the client's response.
    let ok = c
        .post(format!("http://127.0.0.1:{port}/private/orders"))
        .body("x-ext-authz: allow")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.headers()["x-ext-authz-check-result"], "allowed");
    let asked = authz.asked().last().cloned().unwrap();
    assert_eq!(
        (&asked["body"], &asked["raw"], &asked["size"]),
        (&"x-ext-authz: allow".into(), &true.into(), &18.into())
    );
    assert_eq!(asked["headers"]["x-envoy-auth-partial-body"], "false");
    assert_eq!(a.last().unwrap()["body"], "x-ext-authz: allow");
}

/// Providers that ask for the body (Istio `includeRequestBodyInCheck`): `authz` takes at most
/// 64 bytes and refuses longer bodies, `lenient` checks the first 32 bytes of longer ones; both
/// add their result to the client's response (`headersToDownstreamOnAllow`).
fn body_providers(authz: &AuthzServer) -> (String, String) {
    let provider = |name: &str, body: &str| {
        format!(
            "  - name: {name}\n    envoyExtAuthzHttp:\n      service: ext-authz.auth.svc.cluster.local\n      port: '8000'\n      \
             timeout: 0.5s\n      includeRequestHeadersInCheck: [x-ext-authz]\n      \
             headersToDownstreamOnAllow: [x-ext-authz-check-result]\n      includeRequestBodyInCheck: {body}\n"
        )
    };
    (
        format!(
            "{}{}",
            provider("authz", "{maxRequestBytes: 64}"),
            provider("lenient", "{maxRequestBytes: 32, allowPartialMessage: true}")
        ),
        service("ext-authz", 8000, authz),
    )
}

/// The body goes to the provider with the check, and then whole to the backend; a body longer
/// than the provider takes is refused (413) or checked by its start, as the provider says; an
/// upload that stalls while it is read ahead gets 408; the provider's headers for the client
/// are on the response.
#[tokio::test]
async fn a_provider_that_asks_for_the_body_gets_it_before_the_backend_does() {
    let a = Backend::start("a").await;
    let authz = AuthzServer::start().await;
    let port = free_port();
    let yaml = config(port, &a, body_providers(&authz));
    let _dp = Dp::start_with(&yaml, &["--request-body-idle-timeout", "1"]).await;
    let c = client();
    let post = async |path: &str, body: String| {
        c.post(format!("http://127.0.0.1:{port}{path}"))
            .body(body)
            .send()
            .await
            .unwrap()
    };

    // Allowed by what the body says (no header): the check carried the body whole.
    let ok = post("/private/orders", "x-ext-authz: allow".into()).await;
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.headers()["x-ext-authz-check-result"], "allowed");
    assert_eq!(a.last().unwrap()["body"], "x-ext-authz: allow");
    let asked = authz.asked().last().cloned().unwrap();
    assert_eq!(asked["body"], "x-ext-authz: allow");
    assert_eq!(asked["headers"]["content-length"], "18");
    assert_eq!(asked["headers"]["x-envoy-auth-partial-body"], "false");
    let refused = post("/private/orders", "x-ext-authz: deny".into()).await;
    assert_eq!(refused.status(), 403);
    assert_eq!(refused.headers()["x-ext-authz-check-result"], "denied");

    // Longer than `authz` takes: 413 before any check, and the backend never sees it.
    let (asked, hits) = (authz.asked().len(), a.hits());
    let long = format!("x-ext-authz: allow{}", "y".repeat(100));
    assert_eq!(post("/private/orders", long.clone()).await.status(), 413);
    assert_eq!((authz.asked().len(), a.hits()), (asked, hits));

    // `lenient` checks the first 32 bytes and marks them partial; the backend gets it all.
    assert_eq!(post("/open/orders", long.clone()).await.status(), 200);
    let asked = authz.asked().last().cloned().unwrap();
    assert_eq!(asked["body"], long[..32]);
    assert_eq!(asked["headers"]["x-envoy-auth-partial-body"], "true");
    assert_eq!(a.last().unwrap()["body"], long.as_str());

    // A body that stalls while it is read ahead: the client's timeout, nothing asked.
    let asked = authz.asked().len();
    let out = first_answer(
        port,
        b"POST /private/orders HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n\r\nx-ext",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert_eq!(authz.asked().len(), asked);
}
