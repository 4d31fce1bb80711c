//! File mode: a route that attaches nowhere or a backend that does not resolve is a route
//! condition (shown at `/config`, as the operator would write it), never a reason to refuse the
//! file. Cases follow the Gateway API conformance tests for hostname intersection, listener
//! hostname matching, namespace selection, invalid backendRefs and ReferenceGrants.

mod common;
use common::*;
use serde_json::Value;
use std::collections::BTreeMap;

/// A Service named `name` in `ns` whose one endpoint is `b` (port 8080 → the backend's port).
fn service(ns: &str, name: &str, b: &Backend) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{ports: [{{name: http, port: 8080}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: {ns}, labels: {{kubernetes.io/service-name: {name}}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: {}}}]\nendpoints: [{{addresses: [127.0.0.1]}}]\n",
        b.addr.port()
    )
}

fn http_route(ns: &str, name: &str, parent: &str, hostnames: &[&str], rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  \
         parentRefs: [{parent}]\n  hostnames: [{}]\n  rules:\n{rules}",
        hostnames
            .iter()
            .map(|h| format!("{h:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

fn prefix_to(path: &str, backends: &str) -> String {
    format!("  - matches: [{{path: {{type: PathPrefix, value: {path}}}}}]\n    backendRefs: [{backends}]\n")
}

/// `GET http://<host>:<port><path>`: the status and the backend that answered.
async fn hit(port: u16, host: &str, path: &str) -> (u16, String) {
    let r = client()
        .get(format!("http://127.0.0.1:{port}{path}"))
        .header("host", host)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let backend = r
        .headers()
        .get("x-backend")
        .map(|v| v.to_str().unwrap().to_string())
        .or_else(|| {
            r.headers()
                .get("x-ferrum-error")
                .map(|v| v.to_str().unwrap().to_string())
        })
        .unwrap_or_default();
    (status, backend)
}

fn condition<'a>(status: &'a Value, object: &str, parent: usize, kind: &str) -> &'a Value {
    status[object]["parents"][parent]["conditions"]
        .as_array()
        .unwrap_or_else(|| panic!("no status for {object}: {status:#}"))
        .iter()
        .find(|c| c["type"] == kind)
        .unwrap()
}

#[tokio::test]
async fn unattached_routes_are_conditions_and_everything_else_serves() {
    let (v1, v2, v3) = (
        Backend::start("v1").await,
        Backend::start("v2").await,
        Backend::start("v3").await,
    );
    let port = free_port();
    let infra = "gateway-conformance-infra";
    let parent = format!("{{name: gw, namespace: {infra}}}");
    let yaml = docs(&[
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: gw, namespace: {infra}}}\nspec:\n  \
             gatewayClassName: ferrum\n  addresses: [{{type: IPAddress, value: 127.0.0.1}}]\n  listeners:\n  \
             - {{name: listener-1, port: {port}, protocol: HTTP, hostname: very.specific.com, allowedRoutes: {{namespaces: {{from: Same}}}}}}\n  \
             - {{name: listener-2, port: {port}, protocol: HTTP, hostname: \"*.wildcard.io\", allowedRoutes: {{namespaces: {{from: Same}}}}}}\n  \
             - {{name: listener-3, port: {port}, protocol: HTTP, hostname: \"*.anotherwildcard.io\", allowedRoutes: {{namespaces: {{from: Selector, selector: {{matchLabels: {{team: web}}}}}}}}}}\n"
        ),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: web, labels: {team: web}}\n".into(),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: other}\n".into(),
        service(infra, "infra-backend-v1", &v1),
        service(infra, "infra-backend-v2", &v2),
        service(infra, "infra-backend-v3", &v3),
        service("web", "web-backend", &v3),
        service("other", "other-backend", &v2),
        // Hostname intersection.
        http_route(
            infra,
            "specific-host-matches-listener-specific-host",
            &parent,
            &["non.matching.com", "*.nonmatchingwildcard.io", "very.specific.com"],
            &prefix_to("/s1", "{name: infra-backend-v1, port: 8080}"),
        ),
        http_route(
            infra,
            "specific-host-matches-listener-wildcard-host",
            &parent,
            &[
                "non.matching.com",
                "wildcard.io",
                "foo.wildcard.io",
                "bar.wildcard.io",
                "foo.bar.wildcard.io",
            ],
            &prefix_to("/s2", "{name: infra-backend-v2, port: 8080}"),
        ),
        http_route(
            infra,
            "wildcard-host-matches-listener-specific-host",
            &parent,
            &["non.matching.com", "*.specific.com"],
            &prefix_to("/s3", "{name: infra-backend-v3, port: 8080}"),
        ),
        http_route(
            infra,
            "no-intersecting-hosts",
            &parent,
            &["specific.but.wrong.com", "wildcard.io"],
            &prefix_to("/s5", "{name: infra-backend-v2, port: 8080}"),
        ),
        // Namespace selection: `web` carries the label listener-3 selects, `other` does not.
        http_route(
            "web",
            "selected",
            &parent,
            &["a.anotherwildcard.io"],
            &prefix_to("/web", "{name: web-backend, port: 8080}"),
        ),
        http_route(
            "other",
            "not-selected",
            &parent,
            &["a.anotherwildcard.io"],
            &prefix_to("/other", "{name: other-backend, port: 8080}"),
        ),
        // A parent that does not exist.
        http_route(
            infra,
            "missing-parent",
            "{name: nogw}",
            &["very.specific.com"],
            &prefix_to("/none", "{name: infra-backend-v1, port: 8080}"),
        ),
    ]);
    let dp = Dp::start(&yaml).await;
    let cases = [
        ("very.specific.com", "/s1", 200, "v1"),
        ("non.matching.com", "/s1", 404, "route_not_found"),
        ("foo.wildcard.io", "/s2", 200, "v2"),
        ("foo.bar.wildcard.io", "/s2", 200, "v2"),
        ("wildcard.io", "/s2", 404, "route_not_found"),
        ("very.specific.com", "/s3", 200, "v3"),
        ("x.specific.com", "/s3", 404, "route_not_found"),
        ("very.specific.com", "/s5", 404, "route_not_found"),
        ("wildcard.io", "/s5", 404, "route_not_found"),
        ("a.anotherwildcard.io", "/web", 200, "v3"),
        ("a.anotherwildcard.io", "/other", 404, "route_not_found"),
        ("very.specific.com", "/none", 404, "route_not_found"),
    ];
    for (host, path, status, backend) in cases {
        assert_eq!(
            hit(port, host, path).await,
            (status, backend.to_string()),
            "{host}{path}"
        );
    }
    let config: Value = serde_json::from_str(&dp.admin_get("/config").await).unwrap();
    let st = &config["status"];
    let accepted = |route: &str| condition(st, &format!("HTTPRoute {route}"), 0, "Accepted").clone();
    assert_eq!(
        accepted(&format!("{infra}/specific-host-matches-listener-specific-host"))["status"],
        "True"
    );
    assert_eq!(
        accepted(&format!("{infra}/no-intersecting-hosts"))["reason"],
        "NoMatchingListenerHostname"
    );
    assert_eq!(accepted("web/selected")["status"], "True");
    assert_eq!(accepted("other/not-selected")["reason"], "NotAllowedByListeners");
    assert_eq!(
        accepted(&format!("{infra}/missing-parent"))["reason"],
        "NoMatchingParent"
    );
    let gw = &st[format!("Gateway {infra}/gw")];
    let attached: BTreeMap<String, u64> = gw["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["name"].as_str().unwrap().to_string(),
                l["attachedRoutes"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(attached["listener-1"], 2, "{attached:?}");
    assert_eq!(attached["listener-2"], 1, "{attached:?}");
    assert_eq!(attached["listener-3"], 1, "{attached:?}");
}

#[tokio::test]
async fn unresolved_backends_get_500_and_the_rest_of_the_rule_keeps_its_weights() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let port = free_port();
    let parent = "{name: gw}";
    let yaml = docs(&[
        gateway(port),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: apps}\n".into(),
        service("default", "a", &a),
        service("apps", "granted", &b),
        service("apps", "not-granted", &b),
        "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {name: g, namespace: apps}\n\
         spec:\n  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: default}]\n  to: [{group: \"\", kind: Service, name: granted}]\n"
            .into(),
        http_route("default", "missing", parent, &["missing.test"], &prefix_to("/", "{name: nope, port: 8080}")),
        http_route(
            "default",
            "unknown-kind",
            parent,
            &["kind.test"],
            &prefix_to("/", "{group: example.com, kind: Widget, name: w, port: 8080}"),
        ),
        http_route(
            "default",
            "cross-ns",
            parent,
            &["cross.test"],
            &prefix_to("/", "{name: not-granted, namespace: apps, port: 8080}"),
        ),
        http_route(
            "default",
            "granted",
            parent,
            &["granted.test"],
            &prefix_to("/", "{name: granted, namespace: apps, port: 8080}"),
        ),
        http_route(
            "default",
            "zero",
            parent,
            &["zero.test"],
            &prefix_to("/", "{name: a, port: 8080, weight: 0}"),
        ),
        http_route(
            "default",
            "half",
            parent,
            &["half.test"],
            &prefix_to("/", "{name: nope, port: 8080, weight: 50}, {name: a, port: 8080, weight: 50}"),
        ),
    ]);
    let dp = Dp::start(&yaml).await;
    assert_eq!(hit(port, "missing.test", "/").await, (500, "backend_not_found".into()));
    assert_eq!(hit(port, "kind.test", "/").await, (500, "backend_not_found".into()));
    assert_eq!(hit(port, "cross.test", "/").await, (500, "backend_not_found".into()));
    assert_eq!(hit(port, "granted.test", "/").await, (200, "b".into()));
    assert_eq!(hit(port, "zero.test", "/").await, (500, "backend_not_found".into()));
    let mut served = 0;
    for _ in 0..400 {
        match hit(port, "half.test", "/").await {
            (200, b) if b == "a" => served += 1,
            (500, e) => assert_eq!(e, "backend_not_found"),
            other => panic!("{other:?}"),
        }
    }
    assert!(
        (140..=260).contains(&served),
        "50/50 split kept: {served} of 400 served"
    );
    let config: Value = serde_json::from_str(&dp.admin_get("/config").await).unwrap();
    let st = &config["status"];
    let refs = |route: &str| condition(st, &format!("HTTPRoute default/{route}"), 0, "ResolvedRefs").clone();
    assert_eq!(refs("missing")["reason"], "BackendNotFound");
    assert_eq!(refs("unknown-kind")["reason"], "InvalidKind");
    assert_eq!(refs("cross-ns")["reason"], "RefNotPermitted");
    assert_eq!(refs("granted")["status"], "True");
    assert_eq!(refs("half")["reason"], "BackendNotFound");
    for route in ["missing", "unknown-kind", "cross-ns", "half"] {
        assert_eq!(
            condition(st, &format!("HTTPRoute default/{route}"), 0, "Accepted")["status"],
            "True",
            "{route} is attached: only its references are unresolved"
        );
    }
}

#[tokio::test]
async fn strict_mode_and_invalid_input_still_refuse_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("gw.yaml");
    let unattached = docs(&[
        gateway(free_port()),
        http_route(
            "default",
            "r",
            "{name: gw}",
            &["x.test"],
            &prefix_to("/", "{name: nope, port: 80}"),
        ),
        http_route(
            "default",
            "lost",
            "{name: nogw}",
            &["x.test"],
            &prefix_to("/", "{name: nope, port: 80}"),
        ),
    ]);
    std::fs::write(&f, &unattached).unwrap();
    let run = |extra: &[&str]| {
        std::process::Command::new(bin())
            .arg("--config")
            .arg(&f)
            .arg("--check")
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "conditions are not errors: {err}");
    assert!(
        err.contains("warning:") && err.contains("HTTPRoute default/lost") && err.contains("NoMatchingParent"),
        "{err}"
    );
    let out = run(&["--strict"]);
    assert!(!out.status.success(), "--strict refuses unattached routes");
    assert!(String::from_utf8_lossy(&out.stderr).contains("(NoMatchingParent)"));
    // Invalid input is refused whatever the mode.
    std::fs::write(
        &f,
        unattached.replace("type: PathPrefix, value: /", "type: RegularExpression, value: \"(\""),
    )
    .unwrap();
    let out = run(&[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("regex"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
