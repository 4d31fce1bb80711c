//! A real `ferrum-dp` behind a real L4 load balancer (HAProxy, `send-proxy` / `send-proxy-v2`):
//! the Gateway's annotations make its listener read the PROXY protocol header and trust one
//! `X-Forwarded-For` hop, so the client — not the balancer — is what upstreams, the access log
//! and AuthorizationPolicy `remoteIpBlocks` see, while `ipBlocks` still sees the balancer.

mod common;

use std::time::Duration;

use common::*;
use ferrum_testkit::haproxy::LoadBalancer;
use serde_json::Value;

/// Where the load balancer connects from, and where the client does.
const BALANCER: &str = "127.0.0.1";
const CLIENT: &str = "127.0.0.3";

#[tokio::test]
async fn behind_a_load_balancer_the_client_is_the_proxy_headers_and_the_trusted_hops() {
    let a = Backend::start("a").await;
    let port = free_port();
    let target = "targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: gw}]";
    let yaml = docs(&[
        gateway(port).replacen(
            "metadata: {name: gw}",
            "metadata: {name: gw, annotations: {ferrum.dev/proxy-protocol: 'true', \
             ferrum.dev/xff-trusted-hops: '1', ferrum.dev/access-log: 'true'}}",
            1,
        ),
        backend("a", &[&a], ""),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\n\
         spec: {parentRefs: [{name: gw}], rules: [{backendRefs: [{group: ferrum.dev, kind: Backend, name: a}]}]}\n"
            .to_string(),
        // Only through the balancer (the connection's source), and never for that network
        // (the client's, wherever it connects from).
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: via-lb}}\n\
             spec: {{{target}, rules: [{{from: [{{source: {{ipBlocks: [{BALANCER}/32]}}}}]}}]}}\n"
        ),
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: no-doc-net}}\n\
             spec: {{{target}, action: DENY, rules: [{{from: [{{source: {{remoteIpBlocks: [198.51.100.0/24]}}}}]}}]}}\n"
        ),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let dp = Dp::start_with(&yaml, &["--access-log", log.to_str().unwrap()]).await;
    let lb = LoadBalancer::start(port, BALANCER).await;
    let c = client_from(CLIENT);
    let call = async |front: u16, xff: Option<&str>| {
        let mut r = c.get(format!("http://127.0.0.1:{front}/x"));
        if let Some(v) = xff {
            r = r.header("x-forwarded-for", v);
        }
        let r = r.send().await.unwrap();
        let status = r.status().as_u16();
        let body: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap_or(Value::Null);
        (status, body["headers"]["x-forwarded-for"].clone())
    };

    // Both header versions: the upstream sees the client in X-Forwarded-For.
    for front in [lb.v1, lb.v2] {
        assert_eq!(
            call(front, None).await,
            (200, serde_json::json!([CLIENT])),
            "port {front}"
        );
    }
    // One trusted hop: the rightmost entry is the client. In the denied network: 403.
    assert_eq!(call(lb.v2, Some("198.51.100.7")).await.0, 403);
    // Outside it (what the client claims beyond the trusted hop does not count), extended
    // with the connection's client.
    assert_eq!(
        call(lb.v2, Some("198.51.100.7, 203.0.113.5")).await,
        (200, serde_json::json!([format!("198.51.100.7, 203.0.113.5, {CLIENT}")]))
    );

    // Straight to the listener, without a header: closed, and counted.
    let direct = client().get(format!("http://127.0.0.1:{port}/x")).send().await;
    assert!(direct.is_err(), "{direct:?}");
    assert!(dp.metric("ferrum_downstream_proxy_protocol_refused_total").await >= 1.0);

    // The access log names the request's client.
    let mut clients: Vec<String> = Vec::new();
    eventually("the access log has every request", Duration::from_secs(5), async || {
        clients = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["client"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        clients.len() >= 4
    })
    .await;
    let ips: Vec<&str> = clients.iter().map(|c| c.rsplit_once(':').unwrap().0).collect();
    assert_eq!(ips, [CLIENT, CLIENT, "198.51.100.7", "203.0.113.5"]);
}
