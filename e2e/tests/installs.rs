//! The operator on older and partial installs: the Gateway API CRDs as released (v1.4, which
//! serves ReferenceGrant only as v1beta1, and v1.6), without our own CRDs at first. Absent
//! optional kinds are empty and named on `/ready`; a CRD installed later is picked up.

use std::time::Duration;

use ferrum_e2e::*;

fn service(ns: &str, name: &str, b: &Backend) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{ports: [{{name: http, port: 80}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: {ns}, labels: {{kubernetes.io/service-name: {name}}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: {}}}]\nendpoints: [{{addresses: [127.0.0.1], conditions: {{ready: true}}}}]\n",
        b.addr.port()
    )
}

async fn ready_text(op: &Operator) -> String {
    client()
        .get(op.admin_url("/ready"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Gateway API CRDs from `crds`, no ferrum.dev kinds: cross-namespace routing through a
/// ReferenceGrant of `grant_version`, then our CRDs installed while the operator runs.
async fn partial_install(crds: &str, grant_version: &str) {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let cluster = Cluster::start_with(
        free_port(),
        &[
            "--without",
            "gateway.networking.k8s.io",
            "--without",
            "ferrum.dev",
            "--crds",
            &shared_testdata(crds),
        ],
    );
    let op = cluster.operator_with("op-1", &["--rediscover-seconds", "1"]).await;
    let ready = ready_text(&op).await;
    assert!(ready.starts_with("ready"), "{ready}");
    assert!(
        ready.contains("Backend: not served by the cluster (optional"),
        "/ready names the absent kinds: {ready}"
    );
    let port = free_port();
    cluster.apply(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: apps}}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {{name: ferrum}}\nspec: {{controllerName: ferrum.dev/gateway-controller}}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: web, namespace: default}}\nspec:\n  gatewayClassName: ferrum\n  \
         addresses: [{{type: IPAddress, value: 127.0.0.1}}]\n  listeners: [{{name: http, port: {port}, protocol: HTTP}}]\n---\n{}---\n{}---\n\
         apiVersion: gateway.networking.k8s.io/{grant_version}\nkind: ReferenceGrant\nmetadata: {{name: from-default, namespace: apps}}\n\
         spec:\n  from: [{{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: default}}]\n  to: [{{group: \"\", kind: Service, name: b}}]\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: cross, namespace: default}}\n\
         spec: {{parentRefs: [{{name: web}}], hostnames: [cross.example.com], rules: [{{backendRefs: [{{name: b, namespace: apps, port: 80}}]}}]}}\n",
        service("default", "a", &a),
        service("apps", "b", &b),
    ));
    let dp = Proxy::start(&op.grpc_url(), "dp-1", &cluster.dir.path().join("c.json")).await;
    eventually(
        "the ReferenceGrant lets the route reach apps/b",
        Duration::from_secs(10),
        async || hit(port, "cross.example.com").await == (200, Some("b".into())),
    )
    .await;
    // Our CRDs arrive while the operator runs: a Backend then serves within the rediscovery time.
    let crds_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    cluster.kubectl(&["apply", "--validate=false", "-f", crds_dir.to_str().unwrap()], None);
    eventually("the operator watches Backends", Duration::from_secs(10), async || {
        !ready_text(&op).await.contains("Backend:")
    })
    .await;
    cluster.apply(&format!(
        "apiVersion: ferrum.dev/v1alpha1\nkind: Backend\nmetadata: {{name: static, namespace: default}}\n\
         spec: {{endpoints: [{{address: 127.0.0.1, port: {}}}]}}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: static, namespace: default}}\n\
         spec: {{parentRefs: [{{name: web}}], hostnames: [static.example.com], rules: [{{backendRefs: [{{group: ferrum.dev, kind: Backend, name: static}}]}}]}}\n",
        a.addr.port()
    ));
    eventually(
        "a Backend applied after the CRD serves",
        Duration::from_secs(10),
        async || hit(port, "static.example.com").await == (200, Some("a".into())),
    )
    .await;
    assert_eq!(hit(port, "cross.example.com").await, (200, Some("b".into())));
    drop(dp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_api_v1_4_with_reference_grant_v1beta1_and_crds_added_later() {
    partial_install("gateway-api-v1.4.0-standard.yaml", "v1beta1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_api_v1_6_with_reference_grant_v1_and_crds_added_later() {
    partial_install("gateway-api-v1.6.1-standard.yaml", "v1").await;
}
