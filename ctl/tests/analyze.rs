//! `ferrumctl analyze` on manifests with problems of every kind, as a CI pipeline runs it.

use std::process::Command;

fn ferrumctl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ferrumctl"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const BASE: &str = "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: gw}\n\
    spec: {gatewayClassName: ferrum, listeners: [{name: http, port: 80, protocol: HTTP, hostname: a.example.com}]}\n---\n\
    apiVersion: v1\nkind: Service\nmetadata: {name: empty}\nspec: {ports: [{port: 80}]}\n---\n\
    apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: lost}\n\
    spec: {parentRefs: [{name: gw}], hostnames: [b.example.com], rules: [{backendRefs: [{name: empty, port: 80}]}]}\n---\n\
    apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: ok}\n\
    spec: {parentRefs: [{name: gw}], rules: [{backendRefs: [{name: empty, port: 80}, {name: missing, port: 80}, {name: other, namespace: apps, port: 80}]}]}\n";

#[test]
fn warnings_name_the_object_field_and_reason_and_pass_unless_strict() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.yaml"), BASE).unwrap();
    let d = dir.path().to_str().unwrap();
    let (code, out, err) = ferrumctl(&["analyze", "-f", d]);
    assert_eq!(code, 0, "warnings only: {out}{err}");
    for want in [
        "HTTPRoute default/lost",
        "NoMatchingListenerHostname",
        "Service default/missing not found",
        "BackendNotFound",
        "RefNotPermitted",
        "Service default/empty has no ready endpoints",
    ] {
        assert!(out.contains(want), "{want:?} missing:\n{out}");
    }
    assert!(out.starts_with("SEVERITY"), "{out}");
    let (code, _, _) = ferrumctl(&["analyze", "-f", d, "--strict"]);
    assert_eq!(code, 1, "--strict fails on warnings");
    let (_, json, _) = ferrumctl(&["analyze", "-f", d, "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let lost = v
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["object"] == "HTTPRoute default/lost")
        .unwrap();
    assert_eq!(lost["severity"], "warning");
    assert_eq!(lost["reason"], "NoMatchingListenerHostname");
    assert!(
        lost["origin"].as_str().unwrap().ends_with("a.yaml, document 3"),
        "{lost}"
    );
}

/// A VirtualService routing to a DestinationRule subset that no pod's labels match: the
/// subset is named, not only its Service.
#[test]
fn a_subset_no_pod_serves_is_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("mesh.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: b1, labels: {app: b, version: v1}}\n\
         spec: {containers: [{name: app}]}\nstatus: {podIP: 10.1.0.2}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {clusterIP: 10.96.0.9, selector: {app: b}, ports: [{port: 80}]}\n---\n\
         apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: b}\n\
         spec: {host: b, subsets: [{name: v1, labels: {version: v1}}, {name: v9, labels: {version: v9}}]}\n---\n\
         apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: b}\n\
         spec: {hosts: [b], http: [{route: [{destination: {host: b, subset: v1}, weight: 90}, {destination: {host: b, subset: v9}, weight: 10}]}]}\n",
    )
    .unwrap();
    let (code, out, err) = ferrumctl(&["analyze", "-f", dir.path().to_str().unwrap()]);
    assert_eq!(code, 0, "a warning: {out}{err}");
    assert!(
        out.contains("subset \"v9\" of Service default/b has no ready endpoints"),
        "{out}"
    );
    assert!(!out.contains("subset \"v1\""), "v1 has b1: {out}");
}

#[test]
fn invalid_input_is_an_error_and_fails_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.yaml");
    let bad = BASE.replace(
        "{name: other, namespace: apps, port: 80}]}]}",
        "{name: other, namespace: apps, port: 80}], matches: [{path: {type: RegularExpression, value: \"(\"}}]}]}",
    );
    std::fs::write(&f, bad).unwrap();
    let (code, out, _) = ferrumctl(&["analyze", "-f", f.to_str().unwrap(), "-o", "yaml"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("severity: error") && out.contains("regular expression"),
        "{out}"
    );
    let (code, _, err) = ferrumctl(&["analyze", "-f", "/nonexistent/x.yaml"]);
    assert_eq!(code, 2, "nothing was analyzed");
    assert!(err.contains("cannot read /nonexistent/x.yaml"), "{err}");
}

#[test]
fn explain_shows_routes_in_match_order_and_cluster_endpoints() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/gateway.yaml");
    let (code, out, err) = ferrumctl(&["explain", "-f", example]);
    assert_eq!(code, 0, "{err}");
    let at = |needle: &str| out.find(needle).unwrap_or_else(|| panic!("{needle:?} missing:\n{out}"));
    // The most specific match first, the catch-all split last, as the proxy matches them.
    assert!(at("path = /old -> redirect 301") < at("path prefix /api -> backend/default/blue (100%)"));
    assert!(
        at("header x-canary = true -> backend/default/green")
            < at("backend/default/blue (90%), backend/default/green (10%)")
    );
    assert!(
        out.contains("cluster backend/default/blue") && out.contains("127.0.0.1:9001 weight 1 ready"),
        "{out}"
    );
    let (_, json, _) = ferrumctl(&["explain", "-f", example, "-o", "json"]);
    let snap: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(snap["listeners"][0]["port"], 8080);
}

#[test]
fn explain_request_names_the_route_the_proxy_would_take() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/gateway.yaml");
    let ask = |req: &str| {
        let (code, out, err) = ferrumctl(&["explain", "-f", example, "--request", req]);
        assert_eq!(code, 0, "{err}");
        out
    };
    let canary = ask("GET http://localhost:8080/cart -H x-canary: true");
    assert!(
        canary.contains("route default/demo/1/0") && canary.contains("-> backend/default/green (100%)"),
        "{canary}"
    );
    let split = ask("GET http://localhost:8080/cart");
    assert!(
        split.contains("backend/default/blue (90%), backend/default/green (10%)"),
        "{split}"
    );
    // The proxy's path normalisation applies before matching.
    let old = ask("GET http://localhost:8080/x/../old");
    assert!(
        old.contains("path normalised to /old") && old.contains("redirect 301 path /new"),
        "{old}"
    );
    assert!(ask("GET http://localhost:9/").contains("no listener on port 9"));
    let (code, _, err) = ferrumctl(&["explain", "-f", example, "--request", "FETCH"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn policies_that_select_no_workload_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = "apiVersion: v1\nkind: Pod\nmetadata: {name: web-1, namespace: shop, labels: {app: web}}\n\
        spec: {serviceAccountName: web, containers: [{name: app, image: app}]}\nstatus: {podIP: 10.1.0.5}\n---\n\
        apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: typo, namespace: shop}\n\
        spec: {selector: {matchLabels: {app: wbe}}, action: DENY, rules: [{}]}\n---\n\
        apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: fine, namespace: shop}\n\
        spec: {selector: {matchLabels: {app: web}}, action: DENY, rules: [{}]}\n---\n\
        apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: shop}\n\
        spec: {selector: {matchLabels: {app: db}}, mtls: {mode: STRICT}}\n---\n\
        apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: data}\nspec: {clusterIP: 10.96.0.3, ports: [{port: 5432}]}\n---\n\
        apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: web, namespace: shop}\n\
        spec: {workloadSelector: {labels: {app: wbe}}, egress: [{hosts: ['./*', '*/db.data.svc.cluster.local', 'data/dbb.data.svc.cluster.local']}]}\n";
    std::fs::write(dir.path().join("p.yaml"), yaml).unwrap();
    let (code, out, err) = ferrumctl(&["analyze", "-f", dir.path().to_str().unwrap()]);
    assert_eq!(code, 0, "warnings only: {out}{err}");
    for want in [
        "AuthorizationPolicy shop/typo selects no workload",
        "PeerAuthentication shop/strict selects no workload",
        "Sidecar shop/web selects no workload",
        "Sidecar shop/web names data/dbb.data.svc.cluster.local, which is no Service",
        "NoMatchingWorkload",
    ] {
        assert!(out.contains(want), "{want:?} missing:\n{out}");
    }
    assert!(
        !out.contains("shop/fine"),
        "a policy that selects the pod is fine:\n{out}"
    );
    assert!(
        !out.contains("*/db.data"),
        "a host that names a Service is fine:\n{out}"
    );
}

#[test]
fn explain_request_says_which_gateway_policy_decides() {
    // RFC 7517, appendix A.1.
    let jwk = r#"{"keys": [{"kty": "EC", "crv": "P-256", "x": "MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4", "y": "4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM", "kid": "1"}]}"#;
    let dir = tempfile::tempdir().unwrap();
    let target = "targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: gw}]";
    let yaml = format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: gw}}\n\
         spec: {{gatewayClassName: ferrum, listeners: [{{name: http, port: 8080, protocol: HTTP}}]}}\n---\n\
         apiVersion: ferrum.dev/v1alpha1\nkind: Backend\nmetadata: {{name: a}}\nspec: {{endpoints: [{{address: 127.0.0.1, port: 9001}}]}}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r}}\n\
         spec: {{parentRefs: [{{name: gw}}], rules: [{{backendRefs: [{{group: ferrum.dev, kind: Backend, name: a}}]}}]}}\n---\n\
         apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: block}}\n\
         spec: {{{target}, action: DENY, rules: [{{to: [{{operation: {{paths: [\"/admin/*\"]}}}}]}}]}}\n---\n\
         apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt}}\n\
         spec: {{{target}, jwtRules: [{{issuer: https://issuer.example, jwks: '{jwk}'}}]}}\n---\n\
         apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: orders}}\n\
         spec: {{{target}, action: CUSTOM, provider: {{name: authz}}, rules: [{{to: [{{operation: {{paths: [\"/orders/*\"]}}}}]}}]}}\n---\n\
         apiVersion: ferrum.dev/v1alpha1\nkind: MeshConfig\nmetadata: {{name: default, namespace: ferrum-system}}\n\
         spec: {{extensionProviders: [{{name: authz, envoyExtAuthzHttp: {{service: ext-authz.auth.svc.cluster.local, port: 8000}}}}]}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: ext-authz, namespace: auth}}\nspec: {{ports: [{{name: http, port: 8000}}]}}\n"
    );
    let f = dir.path().join("gw.yaml");
    std::fs::write(&f, yaml).unwrap();
    let ask = |req: &str| {
        let (code, out, err) = ferrumctl(&["explain", "-f", f.to_str().unwrap(), "--request", req]);
        assert_eq!(code, 0, "{err}");
        out
    };
    let ok = ask("GET http://localhost:8080/shop");
    assert!(
        ok.contains("allowed by the Gateway's policies") && ok.contains("route default/r/0/0"),
        "{ok}"
    );
    let admin = ask("GET http://localhost:8080/admin/users");
    assert!(
        admin.contains("denied by") && admin.contains("block") && admin.contains("403"),
        "{admin}"
    );
    assert!(!admin.contains("route "), "denied before routing: {admin}");
    let orders = ask("GET http://localhost:8080/orders/1");
    assert!(
        orders.contains("asks external authorization provider \"authz\" first")
            && orders.contains("allowed by the Gateway's policies"),
        "{orders}"
    );
    let bad = ask("GET http://localhost:8080/shop -H authorization: Bearer not.a.jwt");
    assert!(bad.contains("token refused") && bad.contains("401"), "{bad}");
}

/// The example of common mistakes (docs/ferrumctl.md): every one of them is reported.
#[test]
fn the_mistakes_example_reports_each_mistake() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/mistakes");
    let (code, out, err) = ferrumctl(&["analyze", "-f", dir]);
    assert_eq!(code, 1, "an invalid regex is an error: {out}{err}");
    for (object, reason) in [
        ("HTTPRoute shop/search", "UnsupportedValue"),
        ("HTTPRoute shop/blog", "NoMatchingListenerHostname"),
        ("HTTPRoute shop/checkout", "BackendNotFound"),
        ("HTTPRoute shop/checkout", "RefNotPermitted"),
        ("AuthorizationPolicy shop/cart-callers", "NoMatchingWorkload"),
    ] {
        assert!(
            out.lines().any(|l| l.contains(object) && l.contains(reason)),
            "{object} {reason} missing:\n{out}"
        );
    }
    assert_eq!(out.lines().count(), 6, "a header and one line per finding:\n{out}");
}

/// A pod of namespace `shop` in the mesh, serving HTTP on 8080.
fn pod(name: &str, sa: &str, labels: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, labels: {{{labels}, security.istio.io/tlsMode: istio}}}}\n\
         spec: {{serviceAccountName: {sa}, containers: [{{name: app, image: app, ports: [{{name: http, containerPort: 8080}}]}}]}}\n\
         status: {{podIP: {ip}}}\n---\n"
    )
}

/// A Service of namespace `shop` on port 80 (`http`, to 8080) whose one endpoint is `pod`.
fn service(name: &str, vip: &str, selector: &str, pod: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\n\
         spec: {{clusterIP: {vip}, selector: {{{selector}}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {name}-1, namespace: shop, labels: {{kubernetes.io/service-name: {name}}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080}}]\n\
         endpoints: [{{addresses: [{ip}], targetRef: {{kind: Pod, name: {pod}, namespace: shop}}}}]\n---\n"
    )
}

#[test]
fn explain_request_from_a_pod_follows_its_mesh_route_to_each_destinations_policies() {
    let yaml = [
        pod("a-1", "sa-a", "app: a", "10.1.0.1"),
        pod("c-1", "sa-c", "app: c", "10.1.0.4"),
        pod("b-1", "sa-b", "app: b, version: v1", "10.1.0.2"),
        pod("b-2", "sa-b", "app: b, version: v2", "10.1.0.3"),
        service("b", "10.96.0.9", "app: b", "b-1", "10.1.0.2"),
        service("b-v1", "10.96.0.10", "app: b, version: v1", "b-1", "10.1.0.2"),
        service("b-v2", "10.96.0.11", "app: b, version: v2", "b-2", "10.1.0.3"),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: canary, namespace: shop}\n\
         spec:\n  parentRefs: [{group: '', kind: Service, name: b, port: 80}]\n  rules:\n\
         \x20 - matches: [{headers: [{name: x-canary, value: 'true'}]}]\n    backendRefs: [{name: b-v2, port: 80}]\n\
         \x20 - backendRefs: [{name: b-v1, port: 80}]\n---\n"
            .to_string(),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a-reads-v2, namespace: shop}\n\
         spec: {selector: {matchLabels: {app: b, version: v2}}, action: ALLOW, rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/sa-a]}}], to: [{operation: {methods: [GET]}}]}]}\n---\n"
            .to_string(),
        // RFC 7517, appendix A.1.
        format!(
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: shop}}\n\
             spec: {{selector: {{matchLabels: {{version: v1}}}}, jwtRules: [{{issuer: https://issuer.example, jwks: '{}'}}]}}\n",
            r#"{"keys": [{"kty": "EC", "crv": "P-256", "x": "MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4", "y": "4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM", "kid": "1"}]}"#
        ),
    ]
    .concat();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("mesh.yaml");
    std::fs::write(&f, yaml).unwrap();
    let ask = |from: &str, req: &str| {
        let (code, out, err) = ferrumctl(&["explain", "-f", f.to_str().unwrap(), "--request", req, "--from", from]);
        assert_eq!(code, 0, "{err}");
        out
    };
    let plain = ask("shop/a-1", "GET http://b/x");
    for want in [
        "from pod shop/a-1 (spiffe://cluster.local/ns/shop/sa/sa-a, 10.1.0.1)",
        "to service shop/b at 10.96.0.9:80",
        "route shop/canary/1/0",
        "pod shop/b-1 at 10.1.0.2:8080: allowed (over HBONE)",
    ] {
        assert!(plain.contains(want), "{want:?} missing:\n{plain}");
    }
    let canary = ask("shop/a-1", "GET http://b.shop.svc.cluster.local/x -H x-canary: true");
    assert!(
        canary.contains("route shop/canary/0/0") && canary.contains("pod shop/b-2 at 10.1.0.3:8080: allowed"),
        "{canary}"
    );
    let post = ask("shop/a-1", "POST http://b.shop/x -H x-canary: true");
    assert!(
        post.contains(
            "pod shop/b-2 at 10.1.0.3:8080: denied by no ALLOW policy matches: 403 (over HBONE, judged per request)"
        ),
        "{post}"
    );
    let other = ask("shop/c-1", "GET http://10.96.0.9/x -H x-canary: true");
    assert!(
        other.contains("denied by no ALLOW policy matches: 403"),
        "another caller: {other}"
    );
    let forged = ask("shop/a-1", "GET http://b/x -H authorization: Bearer not.a.jwt");
    assert!(
        forged.contains("pod shop/b-1 at 10.1.0.2:8080: token refused by its RequestAuthentication")
            && forged.contains("401"),
        "b-1's RequestAuthentication: {forged}"
    );
    let outside = ask("shop/a-1", "GET http://example.com/");
    assert!(outside.contains("is no Service or pod of the mesh"), "{outside}");
    let (code, _, err) = ferrumctl(&[
        "explain",
        "-f",
        f.to_str().unwrap(),
        "--request",
        "GET http://b/",
        "--from",
        "shop/nobody",
    ]);
    assert!(code != 0 && err.contains("no pod shop/nobody"), "{err}");
}

/// A RequestAuthentication whose keys are behind a `jwksUri`: `explain --from` fetches them, as
/// the operator does for the sidecars, and judges tokens with them; a URI it cannot fetch is
/// named, and its tokens are refused, as a sidecar would refuse them.
#[test]
fn explain_request_judges_tokens_with_the_keys_behind_a_jwks_uri() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let issuer = ferrum_testkit::jwt::Issuer::default();
    let server = rt.block_on(ferrum_testkit::jwt::JwksServer::start(&issuer.jwks));
    let manifests = |jwks_uri: &str| {
        [
            pod("a-1", "sa-a", "app: a", "10.1.0.1"),
            pod("b-1", "sa-b", "app: b", "10.1.0.2"),
            service("b", "10.96.0.9", "app: b", "b-1", "10.1.0.2"),
            format!(
                "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: shop}}\n\
                 spec: {{selector: {{matchLabels: {{app: b}}}}, jwtRules: [{{issuer: https://issuer.example, jwksUri: '{jwks_uri}', timeout: 2s}}]}}\n---\n\
                 apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: users, namespace: shop}}\n\
                 spec: {{selector: {{matchLabels: {{app: b}}}}, rules: [{{from: [{{source: {{requestPrincipals: [https://issuer.example/alice]}}}}]}}]}}\n"
            ),
        ]
        .concat()
    };
    let dir = tempfile::tempdir().unwrap();
    let ask = |yaml: &str, token: Option<String>| {
        let f = dir.path().join("mesh.yaml");
        std::fs::write(&f, yaml).unwrap();
        let req = match token {
            Some(t) => format!("GET http://b/x -H authorization: Bearer {t}"),
            None => "GET http://b/x".to_string(),
        };
        let (code, out, err) = ferrumctl(&[
            "explain",
            "-f",
            f.to_str().unwrap(),
            "--request",
            &req,
            "--from",
            "shop/a-1",
        ]);
        assert_eq!(code, 0, "{err}");
        (out, err)
    };
    let alice = |by: &ferrum_testkit::jwt::Issuer| {
        Some(by.token(&serde_json::json!({
            "iss": "https://issuer.example", "sub": "alice", "exp": ferrum_testkit::jwt::now() + 600
        })))
    };
    let served = manifests(&format!("http://{}/jwks.json", server.addr));
    let (out, err) = ask(&served, alice(&issuer));
    assert!(
        out.contains("pod shop/b-1 at 10.1.0.2:8080: allowed"),
        "a token signed by the key behind the URI: {out}{err}"
    );
    let (out, _) = ask(&served, alice(&ferrum_testkit::jwt::Issuer::default()));
    assert!(
        out.contains("token refused by its RequestAuthentication") && out.contains("401"),
        "a token signed by another key: {out}"
    );
    let (out, _) = ask(&served, None);
    assert!(
        out.contains("denied") && out.contains("403"),
        "no token, no principal: {out}"
    );

    let port = ferrum_testkit::free_port();
    let gone = manifests(&format!("http://127.0.0.1:{port}/jwks.json"));
    let (out, err) = ask(&gone, alice(&issuer));
    assert!(
        err.contains(&format!("cannot fetch http://127.0.0.1:{port}/jwks.json")),
        "the URI that could not be fetched is named: {err}"
    );
    assert!(
        out.contains("token refused by its RequestAuthentication"),
        "its tokens are refused, as by a sidecar: {out}"
    );
}
