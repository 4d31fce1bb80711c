//! Health checks, outlier ejection, retries, timeouts, the circuit breaker and size limits.

mod common;
use common::*;
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

fn route_to(name: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r}}\nspec:\n  parentRefs: [{{name: gw}}]\n  \
         rules: [{{backendRefs: [{{group: ferrum.dev, kind: Backend, name: {name}}}]}}]\n"
    )
}

/// Endpoints `a` and `b` behind one Backend with the given policy lines; returns the proxy and its URL.
async fn pool_of_two(policy: &str) -> (Backend, Backend, Dp, String) {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let port = free_port();
    let yaml = docs(&[gateway(port), backend("pool", &[&a, &b], policy), route_to("pool")]);
    let dp = Dp::start(&yaml).await;
    (a, b, dp, format!("http://127.0.0.1:{port}/"))
}

#[tokio::test]
async fn active_health_checks_eject_and_restore_endpoints() {
    let (a, _b, dp, url) = pool_of_two(
        "  healthCheck: {path: /healthz, interval: 100ms, timeout: 50ms, healthyThreshold: 2, unhealthyThreshold: 2}\n",
    )
    .await;
    let c = client();
    a.health_status.store(503, SeqCst);
    let a_ep = format!(
        "ferrum_endpoint_healthy{{cluster=\"backend/default/pool\",endpoint=\"127.0.0.1:{}\"}}",
        a.addr.port()
    );
    eventually("a marked unhealthy", Duration::from_secs(10), async || {
        dp.metric(&a_ep).await == 0.0
    })
    .await;
    let before = a.hits();
    for _ in 0..20 {
        assert_eq!(c.get(&url).send().await.unwrap().status(), 200);
    }
    assert_eq!(a.hits(), before, "no traffic to an unhealthy endpoint");
    a.health_status.store(200, SeqCst);
    eventually("a healthy again", Duration::from_secs(10), async || {
        dp.metric(&a_ep).await == 1.0
    })
    .await;
    for _ in 0..20 {
        c.get(&url).send().await.unwrap();
    }
    assert!(a.hits() >= before + 9, "traffic returns after recovery");
}

#[tokio::test]
async fn consecutive_5xx_eject_an_endpoint_until_it_serves_again() {
    let (a, _b, dp, url) =
        pool_of_two("  outlierDetection: {consecutive5xx: 3, baseEjectionTime: 500ms, maxEjectionPercent: 50}\n").await;
    let c = client();
    a.force_status.store(500, SeqCst);
    let mut errors = 0;
    for _ in 0..40 {
        if c.get(&url).send().await.unwrap().status() == 500 {
            errors += 1;
        }
    }
    assert_eq!(errors, 3, "three 500s from a, then a is ejected");
    assert_eq!(
        dp.metric("ferrum_cluster_ejections_total{cluster=\"backend/default/pool\"}")
            .await,
        1.0
    );
    a.force_status.store(0, SeqCst);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let before = a.hits();
    for _ in 0..10 {
        assert_eq!(c.get(&url).send().await.unwrap().status(), 200);
    }
    assert!(a.hits() > before, "a serves again after its ejection time");
}

#[tokio::test]
async fn retries_recover_idempotent_requests_only() {
    let ok = Backend::start("ok").await;
    let dead_port = free_port(); // nothing listens here
    let port = free_port();
    let yaml = docs(&[
        gateway(port),
        format!(
            "apiVersion: ferrum.dev/v1alpha1\nkind: Backend\nmetadata: {{name: pool}}\nspec:\n  endpoints:\n  \
             - {{address: 127.0.0.1, port: {dead_port}}}\n  - {{address: 127.0.0.1, port: {}}}\n  \
             retry: {{attempts: 2, on: [connect-failure, \"503\"], backoff: 1ms}}\n  outlierDetection: {{disabled: true}}\n",
            ok.addr.port()
        ),
        route_to("pool"),
    ]);
    let dp = Dp::start(&yaml).await;
    let url = format!("http://127.0.0.1:{port}/");
    let c = client();
    for _ in 0..20 {
        assert_eq!(
            c.get(&url).send().await.unwrap().status(),
            200,
            "connect failures are retried on the other endpoint"
        );
    }
    assert!(
        dp.metric("ferrum_cluster_retries_total{cluster=\"backend/default/pool\"}")
            .await
            >= 10.0
    );
    // A POST with a body is never replayed: half of them hit the dead endpoint and fail.
    let mut failed = 0;
    for _ in 0..20 {
        let r = c.post(&url).body("payload").send().await.unwrap();
        if r.status() == 502 {
            assert_eq!(r.headers()["x-ferrum-error"], "upstream_connect_failure");
            failed += 1;
        }
    }
    assert_eq!(failed, 10);
}

#[tokio::test]
async fn timeouts_overflow_and_limits_answer_with_reasons() {
    let slow = Backend::start("slow").await;
    let port = free_port();
    let yaml = docs(&[
        gateway(port),
        backend("slow", &[&slow], "  circuitBreaker: {maxRequests: 2, maxPendingRequests: 1}\n  timeouts: {connect: 200ms}\n"),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{name: gw}]\n  rules:\n  \
         - matches: [{path: {value: /timed}}]\n    timeouts: {request: 200ms}\n    backendRefs: [{group: ferrum.dev, kind: Backend, name: slow}]\n  \
         - backendRefs: [{group: ferrum.dev, kind: Backend, name: slow}]\n"
            .into(),
    ]);
    let _dp = Dp::start_with(&yaml, &["--max-request-body", "1024"]).await;
    let base = format!("http://127.0.0.1:{port}");
    let c = client();

    let t = Instant::now();
    let r = c.get(format!("{base}/timed?delay=2000")).send().await.unwrap();
    assert_eq!(r.status(), 504);
    assert_eq!(r.headers()["x-ferrum-error"], "upstream_timeout");
    assert!(t.elapsed() < Duration::from_millis(1500));

    // Two in flight, one waits, the fourth is turned away at once.
    let slow_req = || c.get(format!("{base}/hold?delay=800")).send();
    let (r1, r2, r3, r4) = tokio::join!(slow_req(), slow_req(), slow_req(), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        c.get(format!("{base}/fast")).send().await
    });
    let statuses: Vec<u16> = [r1, r2, r3].into_iter().map(|r| r.unwrap().status().as_u16()).collect();
    let r4 = r4.unwrap();
    assert_eq!(r4.status(), 503);
    assert_eq!(r4.headers()["x-ferrum-error"], "upstream_overflow");
    // The pending one waited at most the connect timeout (200ms) for a slot: it overflowed too.
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 2, "{statuses:?}");

    let r = c
        .post(format!("{base}/up"))
        .body(vec![b'x'; 4096])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(r.headers()["x-ferrum-error"], "request_body_too_large");
    let r = c.post(format!("{base}/up")).body(vec![b'x'; 512]).send().await.unwrap();
    assert_eq!(r.status(), 200);

    let r = c
        .get(format!("{base}/"))
        .header("x-big", "v".repeat(80 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 431, "oversized request head");
}
