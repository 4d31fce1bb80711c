//! Routing and filters through the real binary.

mod common;
use common::*;

fn route(rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r}}\nspec:\n  parentRefs: [{{name: gw}}]\n  rules:\n{rules}"
    )
}

#[tokio::test]
async fn matches_filters_and_redirects() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let port = free_port();
    let yaml = docs(&[
        gateway(port),
        backend("a", &[&a], ""),
        backend("b", &[&b], ""),
        route(
            r#"  - matches: [{path: {type: PathPrefix, value: /}}]
    backendRefs: [{group: ferrum.dev, kind: Backend, name: a}]
  - matches: [{path: {type: Exact, value: /exact}}]
    backendRefs: [{group: ferrum.dev, kind: Backend, name: b}]
  - matches: [{path: {type: RegularExpression, value: "/items/[0-9]+"}}]
    backendRefs: [{group: ferrum.dev, kind: Backend, name: b}]
  - matches: [{headers: [{name: x-env, value: canary}]}, {queryParams: [{name: v, value: "2"}]}, {method: DELETE}]
    backendRefs: [{group: ferrum.dev, kind: Backend, name: b}]
  - matches: [{path: {type: PathPrefix, value: /api}}]
    filters:
    - type: URLRewrite
      urlRewrite: {hostname: internal.svc, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-set, value: s}], add: [{name: x-add, value: a}], remove: [x-drop]}
    - type: ResponseHeaderModifier
      responseHeaderModifier: {set: [{name: x-resp, value: r}], remove: [x-backend]}
    backendRefs: [{group: ferrum.dev, kind: Backend, name: b}]
  - matches: [{path: {type: Exact, value: /full}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /replaced}}}]
    backendRefs: [{group: ferrum.dev, kind: Backend, name: b}]
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {scheme: https, hostname: new.example.com, statusCode: 301, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}
  - matches: [{path: {type: Exact, value: /moved}}]
    filters: [{type: RequestRedirect, requestRedirect: {port: 8443, path: {type: ReplaceFullPath, replaceFullPath: /here}}}]
"#,
        ),
    ]);
    let _dp = Dp::start(&yaml).await;
    let base = format!("http://127.0.0.1:{port}");
    let c = client();
    let backend_of = |v: &serde_json::Value| v["backend"].as_str().unwrap().to_string();

    assert_eq!(backend_of(&get_json(&format!("{base}/anything")).await.1), "a");
    assert_eq!(backend_of(&get_json(&format!("{base}/exact")).await.1), "b");
    assert_eq!(
        backend_of(&get_json(&format!("{base}/exact/more")).await.1),
        "a",
        "Exact is not a prefix"
    );
    assert_eq!(backend_of(&get_json(&format!("{base}/items/42")).await.1), "b");
    assert_eq!(
        backend_of(&get_json(&format!("{base}/items/42x")).await.1),
        "a",
        "regex is anchored"
    );
    assert_eq!(backend_of(&get_json(&format!("{base}/q?v=2")).await.1), "b");
    assert_eq!(backend_of(&get_json(&format!("{base}/q?v=3")).await.1), "a");
    let r = c
        .get(format!("{base}/h"))
        .header("X-Env", "canary")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-backend"], "b");
    let r = c.delete(format!("{base}/h")).send().await.unwrap();
    assert_eq!(r.headers()["x-backend"], "b");

    // Rewrite + header modifiers both ways.
    let r = c
        .get(format!("{base}/api/users?id=7"))
        .header("x-drop", "1")
        .header("x-add", "client")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-resp"], "r");
    assert!(r.headers().get("x-backend").is_none(), "response header removed");
    let v: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(v["path"], "/v2/users?id=7");
    assert_eq!(v["headers"]["host"][0], "internal.svc");
    assert_eq!(v["headers"]["x-set"][0], "s");
    assert_eq!(v["headers"]["x-add"], serde_json::json!(["client", "a"]));
    assert!(v["headers"].get("x-drop").is_none());
    assert_eq!(v["headers"]["x-forwarded-for"][0], "127.0.0.1");
    assert_eq!(v["headers"]["x-forwarded-proto"][0], "http");
    assert_eq!(v["headers"]["x-forwarded-host"][0], format!("127.0.0.1:{port}"));
    assert_eq!(v["headers"]["via"][0], "1.1 ferrum");
    assert_eq!(get_json(&format!("{base}/full?x=1")).await.1["path"], "/replaced?x=1");

    // Redirects.
    let r = c.get(format!("{base}/old/page?q=1")).send().await.unwrap();
    assert_eq!(r.status(), 301);
    assert_eq!(r.headers()["location"], "https://new.example.com/new/page?q=1");
    let r = c
        .get(format!("{base}/moved"))
        .header("host", "shop.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    assert_eq!(r.headers()["location"], "http://shop.example.com:8443/here");
}

#[tokio::test]
async fn hostnames_wildcards_and_unrouted_hosts() {
    let (a, b, w) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("w").await,
    );
    let port = free_port();
    let hr = |name: &str, hosts: &str, be: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}}}\nspec:\n  parentRefs: [{{name: gw}}]\n  \
             hostnames: {hosts}\n  rules: [{{backendRefs: [{{group: ferrum.dev, kind: Backend, name: {be}}}]}}]\n"
        )
    };
    let yaml = docs(&[
        gateway(port),
        backend("a", &[&a], ""),
        backend("b", &[&b], ""),
        backend("w", &[&w], ""),
        hr("exact", "[a.example.com]", "a"),
        hr("other", "[B.Example.com]", "b"),
        hr("wild", "[\"*.example.com\"]", "w"),
    ]);
    let _dp = Dp::start(&yaml).await;
    let c = client();
    let at = |host: &'static str| {
        let c = c.clone();
        async move {
            let r = c
                .get(format!("http://127.0.0.1:{port}/"))
                .header("host", host)
                .send()
                .await
                .unwrap();
            (
                r.status().as_u16(),
                r.headers().get("x-backend").map(|v| v.to_str().unwrap().to_string()),
            )
        }
    };
    assert_eq!(at("a.example.com").await, (200, Some("a".into())));
    assert_eq!(
        at("A.EXAMPLE.COM:8080").await,
        (200, Some("a".into())),
        "case and port are ignored"
    );
    assert_eq!(at("b.example.com").await, (200, Some("b".into())));
    assert_eq!(at("x.y.example.com").await, (200, Some("w".into())));
    let r = c
        .get(format!("http://127.0.0.1:{port}/"))
        .header("host", "example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "the wildcard needs a label before the suffix");
    assert_eq!(r.headers()["x-ferrum-error"], "route_not_found");
}

#[tokio::test]
async fn weighted_backends_split_traffic() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let port = free_port();
    let yaml = docs(&[
        gateway(port),
        backend("a", &[&a], ""),
        backend("b", &[&b], ""),
        route(
            "  - backendRefs: [{group: ferrum.dev, kind: Backend, name: a, weight: 80}, {group: ferrum.dev, kind: Backend, name: b, weight: 20}]\n",
        ),
    ]);
    let _dp = Dp::start(&yaml).await;
    let c = client();
    for _ in 0..1000 {
        assert_eq!(
            c.get(format!("http://127.0.0.1:{port}/"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    let share = a.hits() as f64 / 1000.0;
    assert!((0.74..=0.86).contains(&share), "a got {share} of traffic, want ~0.8");
    assert_eq!(a.hits() + b.hits(), 1000);
}

#[tokio::test]
async fn missing_backend_gets_500_and_endpoints_round_robin() {
    let (a1, a2) = (Backend::start("a1").await, Backend::start("a2").await);
    let port = free_port();
    let yaml = docs(&[
        gateway(port),
        backend("pool", &[&a1, &a2], ""),
        // A Service without EndpointSlices: resolves, but has no endpoints.
        "apiVersion: v1\nkind: Service\nmetadata: {name: empty}\nspec: {ports: [{port: 80}]}\n".into(),
        route(
            "  - matches: [{path: {value: /pool}}]\n    backendRefs: [{group: ferrum.dev, kind: Backend, name: pool}]\n\
             \x20 - matches: [{path: {value: /empty}}]\n    backendRefs: [{name: empty, port: 80}]\n",
        ),
    ]);
    let _dp = Dp::start(&yaml).await;
    let c = client();
    for _ in 0..10 {
        c.get(format!("http://127.0.0.1:{port}/pool")).send().await.unwrap();
    }
    assert_eq!((a1.hits(), a2.hits()), (5, 5), "round robin alternates");
    let r = c.get(format!("http://127.0.0.1:{port}/empty")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["x-ferrum-error"], "no_healthy_upstream");
}

#[tokio::test]
async fn two_gateways_on_one_port_with_different_addresses_keep_their_routes() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let port = free_port();
    let gw = |name: &str, ip: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: {name}}}\nspec:\n  gatewayClassName: ferrum\n  \
             listeners: [{{name: http, port: {port}, protocol: HTTP}}]\n  addresses: [{{type: IPAddress, value: {ip}}}]\n"
        )
    };
    let route = |name: &str, parent: &str, backend_name: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}}}\nspec:\n  parentRefs: [{{name: {parent}}}]\n  \
             rules: [{{backendRefs: [{{group: ferrum.dev, kind: Backend, name: {backend_name}}}]}}]\n"
        )
    };
    let _dp = Dp::start(&docs(&[
        gw("one", "127.0.0.1"),
        gw("two", "127.0.0.2"),
        backend("a", &[&a], ""),
        backend("b", &[&b], ""),
        route("to-a", "one", "a"),
        route("to-b", "two", "b"),
    ]))
    .await;
    for (ip, want) in [("127.0.0.1", "a"), ("127.0.0.2", "b")] {
        let (status, v) = get_json(&format!("http://{ip}:{port}/")).await;
        assert_eq!((status, v["backend"].as_str()), (200, Some(want)), "{ip}: {v}");
    }
}

/// A RequestMirror filter copies a share of a rule's requests to another backend — their
/// bodies too, streamed as they are sent, the copy's host marked `-shadow` — while the client
/// gets the primary's answer, and a mirror that is down costs the client nothing. Several
/// filters on a rule copy to each.
#[tokio::test]
async fn request_mirror_copies_requests_with_their_bodies() {
    let (main, shadow) = (Backend::start("main").await, Backend::start("shadow").await);
    let second = Backend::start("second").await;
    let port = free_port();
    let down = free_port();
    let mirror = |to: &str| {
        format!(
            "    filters: [{{type: RequestMirror, requestMirror: {{backendRef: {{group: ferrum.dev, kind: Backend, name: {to}}}}}}}]\n    \
             backendRefs: [{{group: ferrum.dev, kind: Backend, name: main}}]\n"
        )
    };
    let yaml = docs(&[
        gateway(port),
        backend("main", &[&main], ""),
        backend("shadow", &[&shadow], ""),
        backend("second", &[&second], ""),
        format!(
            "apiVersion: ferrum.dev/v1alpha1\nkind: Backend\nmetadata: {{name: down}}\nspec:\n  endpoints: [{{address: 127.0.0.1, port: {down}}}]\n"
        ),
        route(&format!(
            "  - matches: [{{path: {{value: /down}}}}]\n{}  - matches: [{{path: {{value: /}}}}]\n{}\
             \x20 - matches: [{{path: {{value: /both}}}}]\n{}",
            mirror("down"),
            mirror("shadow"),
            mirror("shadow").replacen(
                "filters: [",
                "filters: [{type: RequestMirror, requestMirror: {backendRef: {group: ferrum.dev, kind: Backend, name: second}}}, ",
                1
            )
        )),
    ]);
    let _dp = Dp::start(&yaml).await;
    let c = client();
    let post = |path: &str, body: Vec<u8>| {
        c.post(format!("http://127.0.0.1:{port}{path}"))
            .header("host", "shop.example")
            .body(body)
            .send()
    };

    let r = post("/orders", b"hello mirror".to_vec()).await.unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(
        (v["backend"].as_str(), v["body_len"].as_u64()),
        (Some("main"), Some(12))
    );
    eventually(
        "the mirror gets the copy",
        std::time::Duration::from_secs(5),
        async || shadow.last().is_some(),
    )
    .await;
    let copy = shadow.last().unwrap();
    assert_eq!(
        (copy["method"].as_str(), copy["path"].as_str(), copy["body"].as_str()),
        (Some("POST"), Some("/orders"), Some("hello mirror"))
    );
    assert_eq!(copy["headers"]["host"][0], "shop.example-shadow");

    // A larger body, in many frames: copied whole.
    let big: Vec<u8> = (0..300_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let r = post("/big", big.clone()).await.unwrap();
    assert_eq!(r.status(), 200);
    eventually(
        "the mirror gets the big copy",
        std::time::Duration::from_secs(5),
        async || shadow.last().is_some_and(|l| l["path"] == "/big"),
    )
    .await;
    let copy = shadow.last().unwrap();
    assert_eq!(copy["body"].as_str().unwrap().as_bytes(), &big[..]);

    // Two mirrors: each gets its own whole copy.
    let r = post("/both", big.clone()).await.unwrap();
    assert_eq!(r.status(), 200);
    for m in [&shadow, &second] {
        eventually(
            "each mirror gets a copy",
            std::time::Duration::from_secs(5),
            async || m.last().is_some_and(|l| l["path"] == "/both"),
        )
        .await;
        assert_eq!(m.last().unwrap()["body"].as_str().unwrap().as_bytes(), &big[..]);
    }

    // A mirror nobody answers: the client does not notice.
    let before = main.hits();
    for _ in 0..5 {
        assert_eq!(post("/down", b"x".to_vec()).await.unwrap().status(), 200);
    }
    assert_eq!(main.hits(), before + 5);
}

/// A CORS filter: a preflight from an allowed origin is answered by the proxy (the backend never
/// sees it) — even where the Gateway's AuthorizationPolicy refuses the request, since a
/// browser's preflight carries no credentials — and the answers to that origin's requests,
/// refusals included, are marked for it; another origin's preflight goes to the backend and its
/// answers are unmarked.
#[tokio::test]
async fn a_cors_filter_answers_preflights_and_marks_allowed_origins() {
    let api = Backend::start("api").await;
    let port = free_port();
    let yaml = docs(&[
        gateway(port),
        backend("api", &[&api], ""),
        route(
            "  - matches: [{path: {value: /open}}]\n    filters: [{type: CORS, cors: {allowOrigins: ['https://*.example.org'], allowMethods: [GET, PUT], allowHeaders: [x-token], exposeHeaders: [x-backend], maxAge: 60}}]\n    \
             backendRefs: [{group: ferrum.dev, kind: Backend, name: api}]\n\
             \x20 - matches: [{path: {value: /locked}}]\n    filters: [{type: CORS, cors: {allowOrigins: ['https://app.example'], allowMethods: ['*'], allowCredentials: true}}]\n    \
             backendRefs: [{group: ferrum.dev, kind: Backend, name: api}]\n",
        ),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-delete}\n\
         spec: {targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: gw}], action: DENY, rules: [{to: [{operation: {paths: [/locked]}}]}]}\n"
            .into(),
    ]);
    let _dp = Dp::start(&yaml).await;
    let c = client();
    let url = |p: &str| format!("http://127.0.0.1:{port}{p}");
    let preflight = |path: &str, origin: &str, method: &str| {
        c.request(reqwest::Method::OPTIONS, url(path))
            .header("origin", origin)
            .header("access-control-request-method", method)
            .header("access-control-request-headers", "x-token")
            .send()
    };
    let header = |r: &reqwest::Response, h: &str| r.headers().get(h).map(|v| v.to_str().unwrap().to_string());

    let r = preflight("/open", "https://shop.example.org", "PUT").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "access-control-allow-origin").as_deref(),
        Some("https://shop.example.org")
    );
    assert_eq!(header(&r, "access-control-allow-methods").as_deref(), Some("GET, PUT"));
    assert_eq!(header(&r, "access-control-allow-headers").as_deref(), Some("x-token"));
    assert_eq!(header(&r, "access-control-max-age").as_deref(), Some("60"));
    assert_eq!(api.hits(), 0, "answered by the proxy");

    let r = c
        .get(url("/open"))
        .header("origin", "https://shop.example.org")
        .send()
        .await
        .unwrap();
    assert_eq!(
        (r.status().as_u16(), header(&r, "x-backend").as_deref()),
        (200, Some("api"))
    );
    assert_eq!(
        header(&r, "access-control-allow-origin").as_deref(),
        Some("https://shop.example.org")
    );
    assert_eq!(
        header(&r, "access-control-expose-headers").as_deref(),
        Some("x-backend")
    );
    assert_eq!(header(&r, "vary").as_deref(), Some("Origin"));

    let r = preflight("/open", "https://evil.example", "PUT").await.unwrap();
    assert_eq!(
        header(&r, "x-backend").as_deref(),
        Some("api"),
        "another origin's preflight goes on"
    );
    assert!(header(&r, "access-control-allow-origin").is_none());
    let r = c
        .get(url("/open"))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(header(&r, "access-control-allow-origin").is_none(), "unmarked");

    // Behind a policy that refuses every request: the preflight is still answered, with
    // credentials allowed, so the method asked for rather than `*`.
    let r = preflight("/locked", "https://app.example", "DELETE").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "access-control-allow-methods").as_deref(), Some("DELETE"));
    assert_eq!(header(&r, "access-control-allow-credentials").as_deref(), Some("true"));
    let r = c
        .delete(url("/locked"))
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "the request itself is judged");
    assert_eq!(
        header(&r, "access-control-allow-origin").as_deref(),
        Some("https://app.example"),
        "and its refusal is readable by the origin's script"
    );
}

/// A backendRef's own header filters: requests sent to that backend (and only that one) get its
/// request edits after the rule's, and its answers its response edits.
#[tokio::test]
async fn a_backend_refs_header_filters_apply_to_its_share_only() {
    let (v1, v2) = (Backend::start("v1").await, Backend::start("v2").await);
    let port = free_port();
    let yaml = docs(&[
        gateway(port),
        backend("v1", &[&v1], ""),
        backend("v2", &[&v2], ""),
        route(
            "  - filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-rule, value: r}]}}]\n    backendRefs:\n\
             \x20   - {group: ferrum.dev, kind: Backend, name: v1, weight: 1}\n\
             \x20   - group: ferrum.dev\n      kind: Backend\n      name: v2\n      weight: 1\n      filters:\n\
             \x20     - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-canary, value: 'yes'}], remove: [x-drop]}}\n\
             \x20     - {type: ResponseHeaderModifier, responseHeaderModifier: {add: [{name: x-served-by, value: canary}]}}\n",
        ),
    ]);
    let _dp = Dp::start(&yaml).await;
    let c = client();
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..40 {
        let r = c
            .get(format!("http://127.0.0.1:{port}/"))
            .header("x-drop", "1")
            .send()
            .await
            .unwrap();
        let served_by = r.headers().get("x-served-by").map(|v| v.to_str().unwrap().to_string());
        let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        let h = &v["headers"];
        let backend = v["backend"].as_str().unwrap().to_string();
        assert_eq!(h["x-rule"][0], "r", "the rule's edits for every backend");
        match backend.as_str() {
            "v2" => {
                assert_eq!(h["x-canary"][0], "yes");
                assert!(h.get("x-drop").is_none());
                assert_eq!(served_by.as_deref(), Some("canary"));
            }
            _ => {
                assert!(h.get("x-canary").is_none() && h.get("x-drop").is_some(), "{h}");
                assert_eq!(served_by, None);
            }
        }
        *seen.entry(backend).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2, "both backends served: {seen:?}");
}
