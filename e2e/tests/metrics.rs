//! The Grafana dashboard and docs/metrics.md stay true: every metric the dashboard queries is one
//! ferrum-dp or the operator exposes, and every metric they expose is documented.

use std::collections::BTreeSet;
use std::time::Duration;

use ferrum_e2e::*;
use serde_json::Value;

/// Metric families a `/metrics` text declares (`# TYPE name kind`), with the series names a
/// histogram adds.
fn families(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) = (f.next(), f.next(), f.next(), f.next()) {
            out.insert(name.to_string());
            if kind == "histogram" {
                for s in ["_bucket", "_sum", "_count"] {
                    out.insert(format!("{name}{s}"));
                }
            }
        }
    }
    out
}

/// The `ferrum_*` names in every query of the dashboard.
fn dashboard_metrics() -> BTreeSet<String> {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/ferrum-mesh/dashboards/ferrum-mesh.json");
    let d: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut out = BTreeSet::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("ferrum_") {
                    out.insert(word.to_string());
                }
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_the_docs_name_only_metrics_that_exist() {
    let a = Backend::start("a").await;
    let cluster = Cluster::start();
    let op = cluster.operator("op-1").await;
    let port = free_port();
    cluster.apply(&format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {{name: ferrum}}\nspec: {{controllerName: ferrum.dev/gateway-controller}}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: web}}\n\
         spec: {{gatewayClassName: ferrum, addresses: [{{type: IPAddress, value: 127.0.0.1}}], listeners: [{{name: http, port: {port}, protocol: HTTP}}]}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: a}}\nspec: {{ports: [{{port: 80}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: a-1, labels: {{kubernetes.io/service-name: a}}}}\n\
         addressType: IPv4\nports: [{{port: {}}}]\nendpoints: [{{addresses: [127.0.0.1]}}]\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r}}\n\
         spec: {{parentRefs: [{{name: web}}], rules: [{{backendRefs: [{{name: a, port: 80}}]}}]}}\n",
        a.addr.port()
    ));
    let dp = Proxy::start(&op.grpc_url(), "dp-metrics", &cluster.dir.path().join("m.json")).await;
    eventually("a request is served", Duration::from_secs(10), async || {
        hit(port, "x").await.0 == 200
    })
    .await;
    let exposed: BTreeSet<String> = families(&dp.admin_text("/metrics").await)
        .into_iter()
        .chain(families(&get_text(&op.admin_url("/metrics")).await))
        .collect();
    assert!(exposed.contains("ferrum_route_requests_total") && exposed.contains("ferrum_operator_generation"));
    let missing: Vec<String> = dashboard_metrics()
        .into_iter()
        .filter(|m| !exposed.contains(m))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics nothing exposes: {missing:?}"
    );
    let docs =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/metrics.md")).unwrap();
    let undocumented: Vec<&String> = exposed
        .iter()
        .filter(|m| !["_bucket", "_sum", "_count"].iter().any(|s| m.ends_with(s)))
        .filter(|m| !docs.contains(&format!("`{m}`")))
        .collect();
    assert!(
        undocumented.is_empty(),
        "exposed but not in docs/metrics.md: {undocumented:?}"
    );
}
