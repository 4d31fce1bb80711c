//! Access logs from a real `ferrum-dp`: JSON lines for the Gateway that asks for them, with
//! what was asked, what was answered, by whom, and the trace it belongs to; nothing for the
//! Gateway that does not.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

#[tokio::test]
async fn annotated_gateways_log_each_request_as_json() {
    let a = Backend::start("a").await;
    let (logged, quiet) = (free_port(), free_port());
    let gw = |name: &str, port: u16, annotation: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: {name}{annotation}}}\n\
             spec: {{gatewayClassName: ferrum, listeners: [{{name: http, port: {port}, protocol: HTTP}}], addresses: [{{type: IPAddress, value: 127.0.0.1}}]}}\n"
        )
    };
    let yaml = docs(&[
        gw("logged", logged, ", annotations: {ferrum.dev/access-log: \"true\"}"),
        gw("quiet", quiet, ""),
        backend("a", &[&a], ""),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: hello}\n\
         spec: {parentRefs: [{name: logged}, {name: quiet}], rules: [{matches: [{path: {type: PathPrefix, value: /hello}}], backendRefs: [{group: ferrum.dev, kind: Backend, name: a}]}]}\n"
            .to_string(),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let dp = Dp::start_with(&yaml, &["--access-log", log.to_str().unwrap()]).await;
    let c = client();
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let ok = c
        .get(format!("http://127.0.0.1:{logged}/hello?x=1"))
        .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
        .header("user-agent", "access-log-test")
        .header("x-request-id", "req-1")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let body_len = ok.bytes().await.unwrap().len() as u64;
    let missing = c
        .get(format!("http://127.0.0.1:{logged}/nothing"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let _ = missing.bytes().await;
    assert_eq!(
        c.get(format!("http://127.0.0.1:{quiet}/hello"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    let mut lines: Vec<Value> = Vec::new();
    eventually("two lines are written", Duration::from_secs(5), async || {
        lines = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        lines.len() >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        std::fs::read_to_string(&log).unwrap().lines().count(),
        2,
        "the quiet Gateway logs nothing"
    );
    let first = &lines[0];
    assert_eq!(first["method"], "GET");
    assert_eq!(first["path"], "/hello?x=1");
    assert_eq!(first["authority"], format!("127.0.0.1:{logged}"));
    assert_eq!(first["status"], 200);
    assert_eq!(first["bytes_sent"], body_len);
    assert_eq!(first["complete"], true);
    assert_eq!(first["route"], "default/hello/0/0");
    assert_eq!(first["upstream_host"], a.addr.to_string());
    assert_eq!(first["trace_id"], trace);
    assert_eq!(first["user_agent"], "access-log-test");
    assert_eq!(first["request_id"], "req-1");
    assert!(first["duration_ms"].as_f64().unwrap() >= 0.0);
    assert!(first["start_time"].as_str().unwrap().ends_with('Z'), "{first}");
    let second = &lines[1];
    assert_eq!(
        (second["status"].as_u64(), second["error"].as_str()),
        (Some(404), Some("route_not_found"))
    );
    assert_eq!(
        dp.metric("ferrum_access_log_lines_total{result=\"written\"}").await,
        2.0
    );
    assert_eq!(
        dp.metric("ferrum_access_log_lines_total{result=\"dropped\"}").await,
        0.0
    );
}
