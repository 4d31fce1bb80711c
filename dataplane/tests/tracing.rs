//! Distributed tracing through two real `ferrum-dp`s (an edge gateway in front of an inner one)
//! to a backend, with an OTLP/gRPC collector built on the OpenTelemetry protocol types: one
//! trace across both hops, each proxy's span the parent of the next hop's, the caller's trace
//! and sampling decision kept, and a proxy whose collector is gone still serving.

mod common;

use std::time::Duration;

use common::*;
use ferrum_testkit::otlp::Collector;
use serde_json::Value;

fn gateway_to(name: &str, port: u16, upstream: u16) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: {name}}}\n\
         spec: {{gatewayClassName: ferrum, listeners: [{{name: http, port: {port}, protocol: HTTP}}], addresses: [{{type: IPAddress, value: 127.0.0.1}}]}}\n\
         ---\napiVersion: ferrum.dev/v1alpha1\nkind: Backend\nmetadata: {{name: next}}\nspec: {{endpoints: [{{address: 127.0.0.1, port: {upstream}}}]}}\n\
         ---\napiVersion: ferrum.dev/v1alpha1\nkind: Backend\nmetadata: {{name: dead}}\nspec: {{endpoints: [{{address: 127.0.0.1, port: {dead}}}]}}\n\
         ---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: hello}}\n\
         spec: {{parentRefs: [{{name: {name}}}], rules: [\n  \
           {{matches: [{{path: {{type: PathPrefix, value: /hello}}}}], backendRefs: [{{group: ferrum.dev, kind: Backend, name: next}}]}},\n  \
           {{matches: [{{path: {{type: PathPrefix, value: /dead}}}}], backendRefs: [{{group: ferrum.dev, kind: Backend, name: dead}}]}}]}}\n",
        dead = free_port(),
    )
}

/// The `traceparent` the backend received, split: (trace id, parent span id, flags).
async fn backend_saw(url: &str, traceparent: Option<&str>) -> (String, String, String) {
    let mut req = client().get(url);
    if let Some(tp) = traceparent {
        req = req.header("traceparent", tp);
    }
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    let tp = body["headers"]["traceparent"][0]
        .as_str()
        .expect("the backend got a traceparent");
    let p: Vec<&str> = tp.split('-').collect();
    assert_eq!((p.len(), p[0]), (4, "00"), "{tp}");
    (p[1].into(), p[2].into(), p[3].into())
}

#[tokio::test]
async fn one_trace_crosses_both_proxies_to_the_backend() {
    let backend = Backend::start("app").await;
    let collector = Collector::start("127.0.0.1").await;
    let endpoint = collector.endpoint();
    let (edge_port, inner_port) = (free_port(), free_port());
    let inner = Dp::start_with(
        &gateway_to("inner", inner_port, backend.addr.port()),
        &["--otlp-endpoint", &endpoint, "--trace-service-name", "inner"],
    )
    .await;
    let edge = Dp::start_with(
        &gateway_to("edge", edge_port, inner_port),
        &["--otlp-endpoint", &endpoint, "--trace-service-name", "edge"],
    )
    .await;
    let url = format!("http://127.0.0.1:{edge_port}/hello");

    // No context: the edge starts a trace; the backend's parent is the inner proxy's span.
    let (trace, parent, flags) = backend_saw(&url, None).await;
    assert_eq!(flags, "01", "sampled at the default ratio of 1");
    let spans = collector.trace(&trace, 2).await;
    let by = |svc: &str| spans.iter().find(|s| s.service == svc).unwrap().clone();
    let (e, i) = (by("edge"), by("inner"));
    assert_eq!(e.parent, "", "the edge's span is the root");
    assert_eq!(i.parent, e.span, "the inner proxy continues the edge's span");
    assert_eq!(parent, i.span, "the backend's parent is the inner proxy's span");
    assert_eq!(e.kind, 2, "a gateway's span is a server span");
    assert_eq!(e.name, "GET default/hello/0/0");
    assert_eq!(e.attrs["http.request.method"], "GET");
    assert_eq!(e.attrs["url.path"], "/hello");
    assert_eq!(e.attrs["http.response.status_code"], "200");
    assert_eq!(e.attrs["ferrum.route"], "default/hello/0/0");
    assert_eq!(e.attrs["ferrum.upstream.address"], format!("127.0.0.1:{inner_port}"));
    assert!(e.attrs.contains_key("ferrum.upstream.cluster"), "{:?}", e.attrs);
    assert_eq!(i.attrs["ferrum.upstream.address"], backend.addr.to_string());
    assert_eq!(e.status, 0, "a 200 is not an error");

    // The caller's sampled trace is continued under its span.
    let theirs = "0af7651916cd43dd8448eb211c80319c";
    let (trace, _, flags) = backend_saw(&url, Some(&format!("00-{theirs}-b7ad6b7169203331-01"))).await;
    assert_eq!((trace.as_str(), flags.as_str()), (theirs, "01"));
    let spans = collector.trace(theirs, 2).await;
    let e = spans.iter().find(|s| s.service == "edge").unwrap();
    assert_eq!(e.parent, "b7ad6b7169203331");

    // The caller's "not sampled" is kept: propagated, never exported.
    let unsampled = "11111111111111111111111111111111";
    let (trace, parent, flags) = backend_saw(&url, Some(&format!("00-{unsampled}-b7ad6b7169203331-00"))).await;
    assert_eq!((trace.as_str(), flags.as_str()), (unsampled, "00"));
    assert_ne!(parent, "b7ad6b7169203331", "still re-parented on the proxies");

    // A failed request is an error span with the proxy's reason.
    let r = client()
        .get(format!("http://127.0.0.1:{edge_port}/dead"))
        .header("traceparent", "00-22222222222222222222222222222222-b7ad6b7169203331-01")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_server_error(), "{}", r.status());
    let spans = collector.trace("22222222222222222222222222222222", 1).await;
    let e = &spans[0];
    assert_eq!(e.status, 2, "5xx spans carry an error status");
    assert_eq!(e.attrs["http.response.status_code"], r.status().as_u16().to_string());
    assert!(e.attrs.contains_key("ferrum.error"), "{:?}", e.attrs);

    // By now a batch has gone out after the unsampled request: none of it was exported.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        collector.spans_of(unsampled).len(),
        0,
        "an unsampled trace is never exported"
    );
    drop((edge, inner));
}

#[tokio::test]
async fn without_a_collector_requests_are_served_and_still_carry_context() {
    let backend = Backend::start("app").await;
    let port = free_port();
    let dead_collector = format!("http://127.0.0.1:{}", free_port());
    let _dp = Dp::start_with(
        &gateway_to("gw", port, backend.addr.port()),
        &["--otlp-endpoint", &dead_collector, "--trace-sampling", "0"],
    )
    .await;
    let url = format!("http://127.0.0.1:{port}/hello");
    let started = std::time::Instant::now();
    for _ in 0..50 {
        let (trace, _, flags) = backend_saw(&url, None).await;
        assert_eq!(
            (trace.len(), flags.as_str()),
            (32, "00"),
            "ratio 0: a new trace, not sampled"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());

    let bad = std::process::Command::new(bin())
        .args([
            "--config",
            "/dev/null",
            "--otlp-endpoint",
            "http://127.0.0.1:1",
            "--trace-sampling",
            "2",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("trace sampling must be between 0 and 1"), "{err}");
}

/// An `https://` collector: spans go over TLS, the collector's certificate checked against
/// `--otlp-ca-file`. The TLS side is a ferrum-dp terminating HTTPS (h2 by ALPN) in front of the
/// plaintext test collector; a proxy told no roots that trust it exports nothing.
#[tokio::test]
async fn spans_reach_a_collector_over_tls() {
    let backend = Backend::start("app").await;
    let collector = Collector::start("127.0.0.1").await;
    let collector_port: u16 = collector.endpoint().rsplit(':').next().unwrap().parse().unwrap();
    let (tls_port, app_port, other_port) = (free_port(), free_port(), free_port());
    let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (crt, key, root) = (
        dir.path().join("c.crt"),
        dir.path().join("c.key"),
        dir.path().join("root.pem"),
    );
    std::fs::write(&crt, c.cert.pem()).unwrap();
    std::fs::write(&key, c.signing_key.serialize_pem()).unwrap();
    std::fs::write(&root, c.cert.pem()).unwrap();
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let wrong_root = dir.path().join("wrong.pem");
    std::fs::write(&wrong_root, other.cert.pem()).unwrap();
    let _front = Dp::start(&format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: otlp}}\n\
         spec:\n  gatewayClassName: ferrum\n  addresses: [{{type: IPAddress, value: 127.0.0.1}}]\n  listeners:\n\
         \x20 - {{name: tls, port: {tls_port}, protocol: HTTPS, hostname: localhost, tls: {{options: {{ferrum.dev/cert-file: {}, ferrum.dev/key-file: {}}}}}}}\n\
         ---\napiVersion: ferrum.dev/v1alpha1\nkind: Backend\nmetadata: {{name: collector}}\n\
         spec: {{endpoints: [{{address: 127.0.0.1, port: {collector_port}}}], protocol: HTTP/2}}\n\
         ---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: otlp}}\n\
         spec: {{parentRefs: [{{name: otlp}}], rules: [{{backendRefs: [{{group: ferrum.dev, kind: Backend, name: collector}}]}}]}}\n",
        crt.display(),
        key.display()
    ))
    .await;
    let endpoint = format!("https://localhost:{tls_port}");
    let app = Dp::start_with(
        &gateway_to("app", app_port, backend.addr.port()),
        &[
            "--otlp-endpoint",
            &endpoint,
            "--otlp-ca-file",
            root.to_str().unwrap(),
            "--trace-service-name",
            "tls-app",
        ],
    )
    .await;
    let untrusting = Dp::start_with(
        &gateway_to("other", other_port, backend.addr.port()),
        &[
            "--otlp-endpoint",
            &endpoint,
            "--otlp-ca-file",
            wrong_root.to_str().unwrap(),
        ],
    )
    .await;
    let (trace, _, _) = backend_saw(&format!("http://127.0.0.1:{app_port}/hello"), None).await;
    let spans = collector.trace(&trace, 1).await;
    assert_eq!(spans[0].service, "tls-app", "{spans:?}");

    let (lost, _, _) = backend_saw(&format!("http://127.0.0.1:{other_port}/hello"), None).await;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert!(
        collector.spans_of(&lost).is_empty(),
        "a collector the roots do not vouch for gets nothing"
    );
    drop((app, untrusting));
}
