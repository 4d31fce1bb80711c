//! Health checks, outlier ejection, retries, timeouts, the circuit breaker and size limits.

mod common;
use common::*;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::authorization_server::{Authorization, AuthorizationServer};
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, CheckResponse, attribute_context};
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

/// A Backend of two endpoints, the first refusing connections (nothing listens on its port),
/// the second answering, with the given policy lines; returns the answering one, the proxy and
/// its URL.
async fn dead_then_ok(policy: &str) -> (Backend, Dp, String) {
    let ok = Backend::start("ok").await;
    let dead_port = free_port();
    let port = free_port();
    let yaml = docs(&[
        gateway(port),
        format!(
            "apiVersion: ferrum.dev/v1alpha1\nkind: Backend\nmetadata: {{name: pool}}\nspec:\n  endpoints:\n  \
             - {{address: 127.0.0.1, port: {dead_port}}}\n  - {{address: 127.0.0.1, port: {}}}\n{policy}",
            ok.addr.port()
        ),
        route_to("pool"),
    ]);
    let dp = Dp::start(&yaml).await;
    (ok, dp, format!("http://127.0.0.1:{port}/"))
}

/// Endpoints `a`, `b` and `c` behind one Backend with the given policy lines.
async fn pool_of_three(policy: &str) -> ([Backend; 3], Dp, String) {
    let all = [
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    ];
    let port = free_port();
    let yaml = docs(&[
        gateway(port),
        backend("pool", &[&all[0], &all[1], &all[2]], policy),
        route_to("pool"),
    ]);
    let dp = Dp::start(&yaml).await;
    (all, dp, format!("http://127.0.0.1:{port}/"))
}

/// Makes `b`'s health checks answer `status` and waits until the proxy has marked it so
/// (healthy for 200, unhealthy otherwise) in the Backend `pool`.
async fn health_checks_answer(dp: &Dp, b: &Backend, status: u16) {
    let sample = format!(
        "ferrum_endpoint_healthy{{cluster=\"backend/default/pool\",endpoint=\"127.0.0.1:{}\"}}",
        b.addr.port()
    );
    b.health_status.store(status, SeqCst);
    let (want, what) = if status == 200 {
        (1.0, "healthy")
    } else {
        (0.0, "unhealthy")
    };
    eventually(
        &format!("{} marked {what}", b.name),
        Duration::from_secs(10),
        async || dp.metric(&sample).await == want,
    )
    .await;
}

#[tokio::test]
async fn active_health_checks_eject_and_restore_endpoints() {
    let (a, _b, dp, url) = pool_of_two(
        "  healthCheck: {path: /healthz, interval: 100ms, timeout: 50ms, healthyThreshold: 2, unhealthyThreshold: 2}\n",
    )
    .await;
    let c = client();
    health_checks_answer(&dp, &a, 503).await;
    let before = a.hits();
    for _ in 0..20 {
        assert_eq!(c.get(&url).send().await.unwrap().status(), 200);
    }
    assert_eq!(a.hits(), before, "no traffic to an unhealthy endpoint");
    health_checks_answer(&dp, &a, 200).await;
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
async fn retries_send_the_request_again_body_and_all() {
    let (_ok, dp, url) = dead_then_ok(
        "  retry: {attempts: 2, on: [connect-failure, \"503\"], backoff: 1ms}\n  outlierDetection: {disabled: true}\n",
    )
    .await;
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
    // A POST is retried too, as by Envoy, with its whole body (a body larger than the retry
    // buffer included: a refused connection read none of it).
    for size in [7, 300_000, 3 << 20] {
        for _ in 0..4 {
            let r = c.post(&url).body(vec![b'x'; size]).send().await.unwrap();
            assert_eq!(r.status(), 200, "a {size}-byte POST is retried");
            let echo: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
            assert_eq!(echo["body_len"], size, "the retried request carries the whole body");
        }
    }
}

#[tokio::test]
async fn max_retries_caps_the_retries_in_flight() {
    let (_ok, dp, url) = dead_then_ok(
        "  retry: {attempts: 2, on: [connect-failure], backoff: 1ms}\n  circuitBreaker: {maxRetries: 0}\n  \
         outlierDetection: {disabled: true}\n",
    )
    .await;
    let c = client();
    let mut failed = 0;
    for _ in 0..20 {
        if c.get(&url).send().await.unwrap().status() == 502 {
            failed += 1;
        }
    }
    assert_eq!(failed, 10, "the retry policy is there, but no retry may be in flight");
    assert_eq!(
        dp.metric("ferrum_cluster_retries_total{cluster=\"backend/default/pool\"}")
            .await,
        0.0
    );
}

#[tokio::test]
async fn a_retry_resends_a_body_the_failed_try_already_sent() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let port = free_port();
    let policy = "  retry: {attempts: 1, on: [\"503\"], backoff: 1ms}\n  outlierDetection: {disabled: true}\n";
    let yaml = docs(&[gateway(port), backend("pool", &[&a, &b], policy), route_to("pool")]);
    let dp = Dp::start(&yaml).await;
    let url = format!("http://127.0.0.1:{port}/");
    let c = client();
    // `a` reads each body whole, then answers 503: the retry sends what the client sent to `b`.
    a.force_status.store(503, SeqCst);
    let body: Vec<u8> = (0..400_000u32).map(|i| (i % 251) as u8).collect();
    for _ in 0..6 {
        let r = c.post(&url).body(body.clone()).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-backend"], "b");
    }
    assert!(a.hits() >= 3, "half the first tries went to a: {}", a.hits());
    let last = b.last().unwrap();
    assert_eq!(last["body_len"], body.len());
    assert_eq!(last["body"], String::from_utf8_lossy(&body).as_ref(), "byte for byte");
    // A body past the retry buffer (1 MiB) that a failed try has read cannot be sent again:
    // its 503 is the answer, as in Envoy.
    let big = vec![b'y'; 2 << 20];
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let r = c.post(&url).body(big.clone()).send().await.unwrap();
        statuses.push((
            r.status().as_u16(),
            r.headers()["x-backend"].to_str().unwrap().to_string(),
        ));
    }
    assert!(
        statuses.iter().all(|(s, who)| (*s == 503) == (who == "a")),
        "{statuses:?}"
    );
    let abandoned = statuses.iter().filter(|(s, _)| *s == 503).count();
    assert!(abandoned > 0, "{statuses:?}");
    assert_eq!(
        dp.metric("ferrum_cluster_retries_abandoned_total{cluster=\"backend/default/pool\"}")
            .await,
        abandoned as f64
    );
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

/// The cluster's read timeout is a route's per-try limit only while the route says nothing:
/// with the backend's `read: 300ms`, a 700 ms answer is 504 on a plain route, but 200 on one with
/// `timeouts.request: 2s` (that deadline governs alone) and on one with `request: 0s` (no limit,
/// as the Gateway API and Istio mean it) — before, both waited 300 ms per try and answered 504.
#[tokio::test]
async fn a_routes_own_timeout_replaces_the_clusters_read_timeout() {
    let slow = Backend::start("slow").await;
    let port = free_port();
    let yaml = docs(&[
        gateway(port),
        backend("slow", &[&slow], "  timeouts: {read: 300ms}\n"),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{name: gw}]\n  rules:\n  \
         - matches: [{path: {value: /long}}]\n    timeouts: {request: 2s}\n    backendRefs: [{group: ferrum.dev, kind: Backend, name: slow}]\n  \
         - matches: [{path: {value: /unlimited}}]\n    timeouts: {request: 0s}\n    backendRefs: [{group: ferrum.dev, kind: Backend, name: slow}]\n  \
         - backendRefs: [{group: ferrum.dev, kind: Backend, name: slow}]\n"
            .into(),
    ]);
    let _dp = Dp::start(&yaml).await;
    let base = format!("http://127.0.0.1:{port}");
    let c = client();
    let status = |path: &str| {
        let url = format!("{base}{path}?delay=700");
        let c = c.clone();
        async move { c.get(url).send().await.unwrap().status().as_u16() }
    };
    assert_eq!(status("/plain").await, 504, "the cluster's read timeout");
    assert_eq!(
        status("/long").await,
        200,
        "the route's 2 s deadline, not 300 ms per try"
    );
    assert_eq!(status("/unlimited").await, 200, "0s: no limit");
    let r = c.get(format!("{base}/long?delay=2500")).send().await.unwrap();
    assert_eq!(r.status(), 504, "the route's own deadline still holds");
}

/// A gRPC service that fails every call with UNAVAILABLE, or answers each with the path its
/// request names.
struct Grpc {
    failing: bool,
    calls: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

#[tonic::async_trait]
impl Authorization for Grpc {
    async fn check(&self, req: tonic::Request<CheckRequest>) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        self.calls.fetch_add(1, SeqCst);
        if self.failing {
            return Err(tonic::Status::unavailable("draining"));
        }
        let path = req
            .into_inner()
            .attributes
            .and_then(|a| a.request?.http)
            .map(|h| h.path)
            .unwrap_or_default();
        Ok(tonic::Response::new(CheckResponse {
            status: Some(envoy_types::pb::google::rpc::Status {
                message: path,
                ..Default::default()
            }),
            ..Default::default()
        }))
    }
}

async fn grpc_server(failing: bool) -> (std::net::SocketAddr, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    let l = ferrum_testkit::listen_local().await;
    let addr = l.local_addr().unwrap();
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let svc = AuthorizationServer::new(Grpc {
        failing,
        calls: calls.clone(),
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(l)),
    );
    (addr, calls)
}

#[tokio::test]
async fn grpc_calls_are_retried_on_their_status() {
    let (down, down_calls) = grpc_server(true).await;
    let (up, up_calls) = grpc_server(false).await;
    let port = free_port();
    let yaml = docs(&[
        gateway(port),
        format!(
            "apiVersion: ferrum.dev/v1alpha1\nkind: Backend\nmetadata: {{name: pool}}\nspec:\n  protocol: HTTP/2\n  \
             endpoints:\n  - {{address: 127.0.0.1, port: {}}}\n  - {{address: 127.0.0.1, port: {}}}\n  \
             retry: {{attempts: 1, on: [unavailable], backoff: 1ms}}\n  outlierDetection: {{disabled: true}}\n",
            down.port(),
            up.port()
        ),
        route_to("pool"),
    ]);
    let _dp = Dp::start(&yaml).await;
    let mut client = AuthorizationClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .unwrap();
    for i in 0..10 {
        let path = format!("/call/{i}");
        let req = CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(attribute_context::Request {
                    http: Some(attribute_context::HttpRequest {
                        path: path.clone(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        };
        let answer = client
            .check(req)
            .await
            .expect("UNAVAILABLE is retried on the other endpoint");
        assert_eq!(
            answer.into_inner().status.unwrap().message,
            path,
            "the retry carried the call's message"
        );
    }
    assert_eq!(up_calls.load(SeqCst), 10);
    assert!(
        down_calls.load(SeqCst) >= 4,
        "about half the first tries failed: {down_calls:?}"
    );
}

/// An HTTP/1.1 server that answers 503 as soon as a request's head has come, reads none of its
/// body, and holds the connection open. It says it will close it: a server that does not read
/// the rest of the body must (RFC 9112 §9.3), or the next request on it would never be read.
async fn early_503() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = ferrum_testkit::listen_local().await;
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(1) => head.push(buf[0]),
                        _ => return,
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
                tokio::time::sleep(Duration::from_secs(30)).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_retry_takes_over_a_body_the_failed_try_was_still_sending() {
    let early = early_503().await;
    let b = Backend::start("b").await;
    let port = free_port();
    let yaml = docs(&[
        gateway(port),
        format!(
            "apiVersion: ferrum.dev/v1alpha1\nkind: Backend\nmetadata: {{name: pool}}\nspec:\n  endpoints:\n  \
             - {{address: 127.0.0.1, port: {}}}\n  - {{address: 127.0.0.1, port: {}}}\n  \
             retry: {{attempts: 1, on: [\"503\"], backoff: 1ms}}\n  outlierDetection: {{disabled: true}}\n",
            early.port(),
            b.addr.port()
        ),
        route_to("pool"),
    ]);
    let _dp = Dp::start(&yaml).await;
    let url = format!("http://127.0.0.1:{port}/");
    let c = client();
    let body: Vec<u8> = (0..600_000u32).map(|i| (i % 253) as u8).collect();
    for _ in 0..6 {
        let r = tokio::time::timeout(Duration::from_secs(10), c.post(&url).body(body.clone()).send())
            .await
            .expect("the retry does not wait on the first try's upload")
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-backend"], "b");
        let last = b.last().unwrap();
        assert_eq!(last["body_len"], body.len());
        assert_eq!(last["body"], String::from_utf8_lossy(&body).as_ref(), "byte for byte");
    }
}

#[tokio::test]
async fn a_hash_cookie_keeps_a_client_on_one_endpoint() {
    let (_backends, _dp, url) =
        pool_of_three("  loadBalancer: {type: ConsistentHash, hashCookie: {name: sticky, ttl: 1h, path: /}}\n").await;
    let c = client();
    // No cookie yet: the response sets one, made from the client's address…
    let r = c.get(&url).send().await.unwrap();
    let first = r.headers()["x-backend"].to_str().unwrap().to_string();
    let set = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        set.starts_with("sticky=\"") && set.ends_with("; Max-Age=3600; Path=/; HttpOnly"),
        "{set}"
    );
    let cookie = set.split(';').next().unwrap().to_string();
    // …and every request that carries it goes where the first one went, setting nothing.
    for _ in 0..10 {
        let r = c.get(&url).header("cookie", &cookie).send().await.unwrap();
        assert_eq!(r.headers()["x-backend"], first.as_str());
        assert!(r.headers().get("set-cookie").is_none());
    }
    // Other sessions spread over the endpoints.
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..30 {
        let r = c
            .get(&url)
            .header("cookie", format!("sticky=s{i}"))
            .send()
            .await
            .unwrap();
        seen.insert(r.headers()["x-backend"].to_str().unwrap().to_string());
    }
    assert!(seen.len() >= 2, "{seen:?}");
}

#[tokio::test]
async fn a_hash_query_parameter_keeps_its_value_on_one_endpoint() {
    let (_backends, _dp, url) =
        pool_of_three("  loadBalancer: {type: ConsistentHash, hashQueryParameter: user}\n").await;
    let c = client();
    let mut by_user = std::collections::BTreeMap::new();
    for round in 0..3 {
        for user in 0..20 {
            let r = c.get(format!("{url}?round={round}&user=u{user}")).send().await.unwrap();
            let who = r.headers()["x-backend"].to_str().unwrap().to_string();
            assert_eq!(by_user.entry(user).or_insert_with(|| who.clone()), &who, "user u{user}");
        }
    }
    let used: std::collections::BTreeSet<_> = by_user.values().collect();
    assert!(used.len() >= 2, "{used:?}");
}

/// Of `n` requests, the share `b` answered.
async fn share_of(b: &Backend, url: &str, n: u64) -> f64 {
    let (c, before) = (client(), b.hits());
    for _ in 0..n {
        assert_eq!(c.get(url).send().await.unwrap().status(), 200);
    }
    (b.hits() - before) as f64 / n as f64
}

#[tokio::test]
async fn endpoints_added_or_healthy_again_warm_up_before_their_full_share() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let port = free_port();
    // No type: slow start alone leaves the balancing as it was (round robin).
    let policy = "  loadBalancer: {slowStart: {window: 3s}}\n  \
                  healthCheck: {path: /healthz, interval: 100ms, timeout: 50ms, healthyThreshold: 1, unhealthyThreshold: 1}\n";
    let yaml = |eps: &[&Backend]| docs(&[gateway(port), backend("pool", eps, policy), route_to("pool")]);
    let dp = Dp::start(&yaml(&[&a])).await;
    let url = format!("http://127.0.0.1:{port}/");
    // A scale-up: b is new to a Backend that serves.
    let v = dp.version().await;
    let added = Instant::now();
    dp.reconfigure(&yaml(&[&a, &b]), v).await;
    let early = share_of(&b, &url, 200).await;
    let took = added.elapsed();
    // 10 % of its weight for the first 300 ms, then growing: under 1 s in, at most 1/3 of its
    // weight, a share of at most 1/4 (half without slow start).
    assert!(took < Duration::from_secs(1), "the first 200 requests took {took:?}");
    assert!(early < 0.25, "b answered {early} of the requests in its first {took:?}");
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(added.elapsed())).await;
    let warm = share_of(&b, &url, 200).await;
    assert!((0.4..=0.6).contains(&warm), "b answered {warm} once warm");

    // Failing health checks, then passing again: it warms up again.
    health_checks_answer(&dp, &b, 503).await;
    health_checks_answer(&dp, &b, 200).await;
    let back = share_of(&b, &url, 200).await;
    assert!(back < 0.25, "b answered {back} right after it recovered");
}

#[tokio::test]
async fn below_min_health_percent_every_endpoint_takes_requests() {
    let (a, b, dp, url) = pool_of_two(
        "  healthCheck: {path: /healthz, interval: 100ms, timeout: 50ms, healthyThreshold: 1, unhealthyThreshold: 1}\n  \
         outlierDetection: {minHealthPercent: 60}\n",
    )
    .await;
    health_checks_answer(&dp, &a, 503).await;
    // One of two available is 50 %, under 60: both take requests, as Envoy does in panic.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (a0, b0) = (a.hits(), b.hits());
    let c = client();
    for _ in 0..40 {
        assert_eq!(c.get(&url).send().await.unwrap().status(), 200);
    }
    assert!(a.hits() - a0 >= 10, "a took {} of 40", a.hits() - a0);
    assert!(b.hits() - b0 >= 10, "b took {} of 40", b.hits() - b0);
    let panics = dp
        .metric("ferrum_cluster_lb_panic_total{cluster=\"backend/default/pool\"}")
        .await;
    assert!(panics >= 40.0, "{panics} requests counted in panic");
}

/// Locality failover (`--zone zone-a`, `localityFailover`): requests stay in the proxy's zone
/// while its endpoints are healthy; when half of them fail, 1.4 × 50 % = 70 % stay and the rest
/// spill to the other zone; when all fail, everything goes there; and it comes back.
#[tokio::test]
async fn requests_stay_in_the_proxys_zone_and_fail_over_as_its_endpoints_fail() {
    let (near1, near2, far) = (
        Backend::start("near1").await,
        Backend::start("near2").await,
        Backend::start("far").await,
    );
    let port = free_port();
    let ep = |b: &Backend, zone: &str| format!("  - {{address: 127.0.0.1, port: {}, zone: {zone}}}\n", b.addr.port());
    let yaml = docs(&[
        gateway(port),
        format!(
            "apiVersion: ferrum.dev/v1alpha1\nkind: Backend\nmetadata: {{name: pool}}\nspec:\n  endpoints:\n{}{}{}\
             \x20 loadBalancer: {{localityFailover: true}}\n\
             \x20 healthCheck: {{path: /healthz, interval: 100ms, timeout: 50ms, healthyThreshold: 1, unhealthyThreshold: 1}}\n",
            ep(&near1, "zone-a"),
            ep(&near2, "zone-a"),
            ep(&far, "zone-b"),
        ),
        route_to("pool"),
    ]);
    let dp = Dp::start_with(&yaml, &["--zone", "zone-a"]).await;
    let url = format!("http://127.0.0.1:{port}/");
    let c = client();
    // How many of `n` requests each backend answered.
    let spread = async |n: usize| {
        let mut seen = std::collections::BTreeMap::<String, usize>::new();
        for _ in 0..n {
            let r = c.get(&url).send().await.unwrap();
            assert_eq!(r.status(), 200);
            *seen
                .entry(r.headers()["x-backend"].to_str().unwrap().into())
                .or_default() += 1;
        }
        let of = |name: &str| seen.get(name).copied().unwrap_or(0);
        (of("near1"), of("near2"), of("far"))
    };
    let (n1, n2, f) = spread(60).await;
    assert_eq!(f, 0, "the other zone takes nothing while this one is healthy");
    assert!(n1 > 20 && n2 > 20, "both local endpoints serve: {n1} {n2}");

    health_checks_answer(&dp, &near1, 503).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (n1, n2, f) = spread(400).await;
    assert_eq!(n1, 0);
    let spilled = f as f64 / 400.0;
    assert!(
        (0.18..0.42).contains(&spilled),
        "30 % expected in the other zone: {n2} {f}"
    );
    assert_eq!(
        dp.metric("ferrum_cluster_lb_failover_total{cluster=\"backend/default/pool\"}")
            .await,
        f as f64,
        "each request sent out of the zone is counted"
    );

    health_checks_answer(&dp, &near2, 503).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(spread(20).await, (0, 0, 20), "the whole zone down: all fail over");

    health_checks_answer(&dp, &near1, 200).await;
    health_checks_answer(&dp, &near2, 200).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(spread(40).await.2, 0, "back in the zone once it recovers");
}

/// A backup endpoint (`priority: 1`, Envoy's priorities): idle while the first priority is
/// healthy, everything once it fails, nothing again once it recovers.
#[tokio::test]
async fn a_backup_endpoint_serves_only_while_the_primary_is_down() {
    let (primary, backup) = (Backend::start("primary").await, Backend::start("backup").await);
    let port = free_port();
    let yaml = docs(&[
        gateway(port),
        format!(
            "apiVersion: ferrum.dev/v1alpha1\nkind: Backend\nmetadata: {{name: pool}}\nspec:\n  endpoints:\n\
             \x20 - {{address: 127.0.0.1, port: {}}}\n\
             \x20 - {{address: 127.0.0.1, port: {}, priority: 1}}\n\
             \x20 healthCheck: {{path: /healthz, interval: 100ms, timeout: 50ms, healthyThreshold: 1, unhealthyThreshold: 1}}\n",
            primary.addr.port(),
            backup.addr.port(),
        ),
        route_to("pool"),
    ]);
    let dp = Dp::start(&yaml).await;
    let url = format!("http://127.0.0.1:{port}/");
    let c = client();
    let answered_by = async || {
        let r = c.get(&url).send().await.unwrap();
        r.headers()["x-backend"].to_str().unwrap().to_string()
    };
    for _ in 0..20 {
        assert_eq!(answered_by().await, "primary");
    }
    health_checks_answer(&dp, &primary, 503).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    for _ in 0..20 {
        assert_eq!(answered_by().await, "backup");
    }
    health_checks_answer(&dp, &primary, 200).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    for _ in 0..20 {
        assert_eq!(answered_by().await, "primary");
    }
}
