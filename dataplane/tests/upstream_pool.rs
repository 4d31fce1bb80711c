//! The upstream connection pool as a backend sees it: connections reused across requests,
//! given back only when a response has been read to its end, closed when idle, and a connection
//! the backend closed never costs a client its request.

mod common;
use common::*;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// An HTTP/1.1 backend that counts the connections it accepts and those still open. `/empty`
/// answers 204; `/stream` sends 64 KiB, then the rest after 30 s; a path ending in `/big`,
/// 128 MiB; `/slow` "ok" after 300 ms; anything else "ok".
struct Counting {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Counting {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Counting {
    /// `lifetime`: the backend closes each connection that long after accepting it (between
    /// requests, as a server's keep-alive timeout does).
    async fn start(lifetime: Option<Duration>) -> Counting {
        Self::serve(lifetime, None).await
    }

    /// The same over HTTP/2 with prior knowledge (h2c), allowing `max_streams` at once on a
    /// connection.
    async fn start_h2(max_streams: u32) -> Counting {
        Self::serve(None, Some(max_streams)).await
    }

    async fn serve(lifetime: Option<Duration>, h2: Option<u32>) -> Counting {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (accepted, open) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (a, o) = (accepted.clone(), open.clone());
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                a.fetch_add(1, SeqCst);
                o.fetch_add(1, SeqCst);
                let o = o.clone();
                tokio::spawn(async move {
                    if let Some(max) = h2 {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .max_concurrent_streams(max)
                            .serve_connection(TokioIo::new(s), service_fn(respond))
                            .await;
                        o.fetch_sub(1, SeqCst);
                        return;
                    }
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), service_fn(respond));
                    match lifetime {
                        Some(t) => {
                            tokio::pin!(conn);
                            if tokio::time::timeout(t, conn.as_mut()).await.is_err() {
                                conn.as_mut().graceful_shutdown();
                                let _ = conn.await;
                            }
                        }
                        None => {
                            let _ = conn.await;
                        }
                    }
                    o.fetch_sub(1, SeqCst);
                });
            }
        });
        Counting {
            addr,
            accepted,
            open,
            task,
        }
    }
}

/// `/hold` requests in the backend now, and the most there were at once.
static HELD: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
const HOLD_FOR: usize = 210;

async fn respond(
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<BoxBody<Bytes, Infallible>>, Infallible> {
    let body = match req.uri().path() {
        "/empty" => {
            let mut r = hyper::Response::new(Full::new(Bytes::new()).boxed());
            *r.status_mut() = hyper::StatusCode::NO_CONTENT;
            return Ok(r);
        }
        "/stream" => {
            let first = futures_util::stream::once(async { Ok(Frame::data(Bytes::from(vec![b'x'; 64 * 1024]))) });
            let rest = futures_util::stream::once(async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                Ok(Frame::data(Bytes::from_static(b"end")))
            });
            BodyExt::boxed(StreamBody::new(futures_util::StreamExt::chain(first, rest)))
        }
        p if p.ends_with("/big") => {
            // 128 MiB in 64 KiB frames.
            let frame = Bytes::from(vec![b'x'; 64 * 1024]);
            let frames = futures_util::stream::iter((0..2048).map(move |_| Ok(Frame::data(frame.clone()))));
            BodyExt::boxed(StreamBody::new(frames))
        }
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Full::new(Bytes::from_static(b"ok")).boxed()
        }
        "/hold" => {
            // Answers once HOLD_FOR requests are here together (or after 5 s).
            let now = HELD.fetch_add(1, SeqCst) + 1;
            PEAK.fetch_max(now, SeqCst);
            let all_here = async {
                while HELD.load(SeqCst) < HOLD_FOR && PEAK.load(SeqCst) < HOLD_FOR {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), all_here).await;
            HELD.fetch_sub(1, SeqCst);
            Full::new(Bytes::from_static(b"held")).boxed()
        }
        _ => Full::new(Bytes::from_static(b"ok")).boxed(),
    };
    Ok(hyper::Response::new(body))
}

/// A proxy on a free port in front of `b`, with extra Backend spec lines.
async fn proxy(b: &Counting, spec: &str) -> (Dp, String) {
    proxy_with(b, spec, &[]).await
}

async fn proxy_with(b: &Counting, spec: &str, args: &[&str]) -> (Dp, String) {
    let port = free_port();
    let backend = format!(
        "apiVersion: ferrum.dev/v1alpha1\nkind: Backend\nmetadata: {{name: pool}}\nspec:\n  endpoints:\n  \
         - {{address: 127.0.0.1, port: {}}}\n{spec}",
        b.addr.port()
    );
    let route = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  \
                 parentRefs: [{name: gw}]\n  rules: [{backendRefs: [{group: ferrum.dev, kind: Backend, name: pool}]}]\n";
    let dp = Dp::start_with(&docs(&[gateway(port), backend, route.to_string()]), args).await;
    (dp, format!("http://127.0.0.1:{port}"))
}

const ACTIVE: &str = "ferrum_cluster_connections_active{cluster=\"backend/default/pool\"}";

#[tokio::test]
async fn one_connection_serves_sequential_requests_and_closes_when_idle() {
    let b = Counting::start(None).await;
    let (dp, url) = proxy(&b, "  timeouts: {idle: 500ms}\n").await;
    let c = client();
    for i in 0..30 {
        let path = if i % 3 == 0 { "/empty" } else { "/" };
        let r = c.get(format!("{url}{path}")).send().await.unwrap();
        assert!(r.status().is_success(), "{}", r.status());
        r.bytes().await.unwrap();
        let r = c.head(format!("{url}/")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(
        b.accepted.load(SeqCst),
        1,
        "60 requests, bodies and none, on one connection"
    );
    assert_eq!(dp.metric(ACTIVE).await, 1.0);
    eventually("the idle connection closes", Duration::from_secs(5), async || {
        b.open.load(SeqCst) == 0 && dp.metric(ACTIVE).await == 0.0
    })
    .await;
    let r = c.get(format!("{url}/")).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "ok");
    assert_eq!(b.accepted.load(SeqCst), 2, "a new connection after the idle one closed");
}

#[tokio::test]
async fn a_response_the_client_abandons_does_not_return_its_connection() {
    let b = Counting::start(None).await;
    let (_dp, url) = proxy(&b, "").await;
    let c = client();
    let mut r = c.get(format!("{url}/stream")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(!r.chunk().await.unwrap().unwrap().is_empty());
    drop(r);
    // The half-read response is still on that connection: the next request needs another, and
    // the abandoned one is closed rather than pooled.
    for _ in 0..5 {
        let r = c.get(format!("{url}/")).send().await.unwrap();
        assert_eq!(r.text().await.unwrap(), "ok");
    }
    assert_eq!(b.accepted.load(SeqCst), 2);
    eventually("the abandoned connection closes", Duration::from_secs(5), async || {
        b.open.load(SeqCst) == 1
    })
    .await;
}

#[tokio::test]
async fn connections_the_backend_closes_between_requests_cost_no_request() {
    let b = Counting::start(Some(Duration::from_millis(150))).await;
    let (_dp, url) = proxy(&b, "").await;
    let c = client();
    for _ in 0..8 {
        let r = c.get(format!("{url}/")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), "ok");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        b.accepted.load(SeqCst),
        8,
        "each request after a close on a fresh connection"
    );
}

#[tokio::test]
async fn a_burst_shares_one_http2_connection_that_closes_when_idle() {
    let b = Counting::start_h2(200).await;
    let spec = "  protocol: HTTP/2\n  timeouts: {idle: 500ms}\n";
    let (dp, url) = proxy_with(&b, spec, &["--workers", "1"]).await;
    // One HTTP/2 client connection: the 32 requests reach the proxy together.
    let c = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    let burst = (0..32).map(|_| {
        let (c, url) = (c.clone(), url.clone());
        async move { c.get(format!("{url}/")).send().await.unwrap().text().await.unwrap() }
    });
    for body in futures_util::future::join_all(burst).await {
        assert_eq!(body, "ok");
    }
    assert_eq!(
        b.accepted.load(SeqCst),
        1,
        "32 concurrent first requests, one HTTP/2 connection"
    );
    eventually(
        "the idle HTTP/2 connection closes",
        Duration::from_secs(5),
        async || b.open.load(SeqCst) == 0 && dp.metric(ACTIVE).await == 0.0,
    )
    .await;
    let r = c.get(format!("{url}/")).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "ok");
    assert_eq!(b.accepted.load(SeqCst), 2);
}

/// A backend that allows 100 streams per HTTP/2 connection (what hyper assumes until the peer's
/// SETTINGS say otherwise), and 210 requests that each wait for the others: all reach it
/// together over three connections, instead of 110 queueing behind the first connection's
/// limit (which long-lived streams, gRPC streaming or tunnels, would never free).
#[tokio::test]
async fn http2_requests_past_the_peers_stream_limit_open_another_connection() {
    let b = Counting::start_h2(100).await;
    let (_dp, url) = proxy_with(&b, "  protocol: HTTP/2\n", &["--workers", "1"]).await;
    let c = reqwest::Client::new();
    let started = std::time::Instant::now();
    let all = (0..HOLD_FOR).map(|_| {
        let (c, url) = (c.clone(), url.clone());
        async move { c.get(format!("{url}/hold")).send().await.unwrap().text().await.unwrap() }
    });
    for body in futures_util::future::join_all(all).await {
        assert_eq!(body, "held");
    }
    assert_eq!(PEAK.load(SeqCst), HOLD_FOR, "every request reached the backend at once");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "none waited for another to end"
    );
    assert_eq!(b.accepted.load(SeqCst), 3, "100 + 100 + 10 streams");
}

/// `n` overlapping `/slow` requests, each answered "ok".
async fn slow_burst(url: &str, n: usize) {
    let c = client();
    let all = (0..n).map(|_| {
        let c = c.clone();
        async move { c.get(format!("{url}/slow")).send().await.unwrap().text().await.unwrap() }
    });
    for body in futures_util::future::join_all(all).await {
        assert_eq!(body, "ok");
    }
}

#[tokio::test]
async fn max_concurrent_streams_caps_streams_below_the_peers_limit() {
    let b = Counting::start_h2(100).await;
    let spec = "  protocol: HTTP/2\n  circuitBreaker: {maxConcurrentStreams: 10}\n";
    let (_dp, url) = proxy_with(&b, spec, &["--workers", "1"]).await;
    slow_burst(&url, 30).await;
    assert_eq!(b.accepted.load(SeqCst), 3, "30 overlapping streams, 10 a connection");
}

#[tokio::test]
async fn a_connection_serves_at_most_max_requests_per_connection() {
    let b = Counting::start(None).await;
    let (_dp, url) = proxy_with(
        &b,
        "  circuitBreaker: {maxRequestsPerConnection: 3}\n",
        &["--workers", "1"],
    )
    .await;
    let c = client();
    for _ in 0..9 {
        let r = c.get(format!("{url}/")).send().await.unwrap();
        assert_eq!(r.text().await.unwrap(), "ok");
    }
    assert_eq!(b.accepted.load(SeqCst), 3, "nine requests, three per connection");
    eventually(
        "each used-up connection is closed",
        Duration::from_secs(5),
        async || b.open.load(SeqCst) == 0,
    )
    .await;
    // 1 turns keep-alive off, as in Istio.
    let b = Counting::start(None).await;
    let (_dp, url) = proxy(&b, "  circuitBreaker: {maxRequestsPerConnection: 1}\n").await;
    for _ in 0..5 {
        let r = c.get(format!("{url}/")).send().await.unwrap();
        assert_eq!(r.text().await.unwrap(), "ok");
    }
    assert_eq!(b.accepted.load(SeqCst), 5);
}

#[tokio::test]
async fn an_http2_connection_starts_at_most_max_requests_per_connection_streams() {
    let b = Counting::start_h2(200).await;
    let spec = "  protocol: HTTP/2\n  circuitBreaker: {maxRequestsPerConnection: 10}\n";
    let (dp, url) = proxy_with(&b, spec, &["--workers", "1"]).await;
    let c = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    for _ in 0..25 {
        let r = c.get(format!("{url}/")).send().await.unwrap();
        assert_eq!(r.text().await.unwrap(), "ok");
    }
    assert_eq!(b.accepted.load(SeqCst), 3, "10 + 10 + 5 streams");
    eventually("the used-up connections close", Duration::from_secs(5), async || {
        b.open.load(SeqCst) == 1 && dp.metric(ACTIVE).await == 1.0
    })
    .await;
}

/// What `ss` shows of the established TCP connections to `port` (with their timers).
fn sockets_to(port: u16) -> String {
    let out = std::process::Command::new("ss")
        .args(["-tnoH", "state", "established", &format!("dport = :{port}")])
        .output()
        .expect("ss (iproute2)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn tcp_keepalive_probes_idle_upstream_connections() {
    let b = Counting::start(None).await;
    let spec = "  tcpKeepalive: {time: 45s, interval: 5s, probes: 3}\n";
    let (_dp, url) = proxy_with(&b, spec, &["--workers", "1"]).await;
    let r = client().get(format!("{url}/")).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "ok");
    let ss = sockets_to(b.addr.port());
    assert!(
        ss.contains("timer:(keepalive,4"),
        "the pooled connection probes after 45 s: {ss}"
    );
    // A cluster without it sends none (the kernel's default is off).
    let b = Counting::start(None).await;
    let (_dp, url) = proxy(&b, "").await;
    let r = client().get(format!("{url}/")).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "ok");
    let ss = sockets_to(b.addr.port());
    assert!(!ss.is_empty() && !ss.contains("keepalive"), "{ss}");
}

#[tokio::test]
async fn connections_past_max_connection_duration_take_no_new_requests() {
    for (spec, h2) in [
        ("  timeouts: {maxConnectionDuration: 300ms}\n", false),
        ("  protocol: HTTP/2\n  timeouts: {maxConnectionDuration: 300ms}\n", true),
    ] {
        let b = if h2 {
            Counting::start_h2(100).await
        } else {
            Counting::start(None).await
        };
        let (_dp, url) = proxy_with(&b, spec, &["--workers", "1"]).await;
        let c = client();
        // Eight requests 100 ms apart: about one new connection every 300 ms.
        for _ in 0..8 {
            let r = c.get(format!("{url}/")).send().await.unwrap();
            assert_eq!(r.text().await.unwrap(), "ok");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let accepted = b.accepted.load(SeqCst);
        assert!(
            (2..=5).contains(&accepted),
            "h2 {h2}: {accepted} connections for 8 requests over 800 ms"
        );
        eventually("retired connections close", Duration::from_secs(5), async || {
            b.open.load(SeqCst) <= 1
        })
        .await;
    }
}

#[tokio::test]
async fn a_bursts_leftover_connections_close_before_the_idle_timeout_and_busy_ones_stay() {
    let b = Counting::start(None).await;
    // An 8 s idle timeout: the sweeper looks every second.
    let (dp, url) = proxy_with(&b, "  timeouts: {idle: 8s}\n", &["--workers", "1"]).await;
    let c = client();
    slow_burst(&url, 64).await;
    assert_eq!(b.accepted.load(SeqCst), 64, "64 overlapping requests, 64 connections");
    // Then a steady load of 4 at a time for 6.5 s (not yet the idle timeout of any connection).
    let until = tokio::time::Instant::now() + Duration::from_millis(6500);
    let steady = (0..4).map(|_| {
        let (c, url) = (c.clone(), url.clone());
        async move {
            while tokio::time::Instant::now() < until {
                let r = c.get(format!("{url}/")).send().await.unwrap();
                assert_eq!(r.text().await.unwrap(), "ok");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    futures_util::future::join_all(steady).await;
    // Each look (after the first, which has nothing to compare with) halved the ~60 the steady
    // load never needed; none of those it used was closed.
    let open = b.open.load(SeqCst);
    assert!(open <= 4 + 60 / 8, "{open} of 64 connections still open");
    eventually(
        "the gauge shows what the backend sees",
        Duration::from_secs(2),
        async || dp.metric(ACTIVE).await as usize == b.open.load(SeqCst),
    )
    .await;
    assert_eq!(
        b.accepted.load(SeqCst),
        64,
        "the steady load kept its connections: no new one opened"
    );
}

/// A route `/copied` on `b` whose requests are copied to `copy`, in front of one worker.
async fn mirrored(b: &Counting, copy: &Counting) -> (Dp, String) {
    let mirror = format!(
        "---\napiVersion: ferrum.dev/v1alpha1\nkind: Backend\nmetadata: {{name: copy}}\nspec:\n  \
         endpoints: [{{address: 127.0.0.1, port: {}}}]\n---\napiVersion: gateway.networking.k8s.io/v1\n\
         kind: HTTPRoute\nmetadata: {{name: m}}\nspec:\n  parentRefs: [{{name: gw}}]\n  rules:\n  \
         - matches: [{{path: {{value: /copied}}}}]\n    filters: [{{type: RequestMirror, requestMirror: \
         {{backendRef: {{group: ferrum.dev, kind: Backend, name: copy}}}}}}]\n    \
         backendRefs: [{{group: ferrum.dev, kind: Backend, name: pool}}]\n",
        copy.addr.port()
    );
    proxy_with(b, &mirror, &["--workers", "1"]).await
}

const COPIES: &str = "ferrum_cluster_requests_total{cluster=\"backend/default/copy\",code=\"2xx\"}";

#[tokio::test]
async fn mirrored_copies_share_a_connection_to_the_mirror() {
    let (b, copy) = (Counting::start(None).await, Counting::start(None).await);
    let (dp, url) = mirrored(&b, &copy).await;
    let c = client();
    for i in 1..=10 {
        let r = c.get(format!("{url}/copied")).send().await.unwrap();
        assert_eq!(r.text().await.unwrap(), "ok");
        // One copy at a time, each answered before the next is sent.
        eventually("the mirror answers the copy", Duration::from_secs(5), async || {
            dp.metric(COPIES).await == f64::from(i)
        })
        .await;
    }
    assert_eq!(b.accepted.load(SeqCst), 1, "the primary's connection is reused");
    assert_eq!(
        copy.accepted.load(SeqCst),
        1,
        "10 copies, read to their end, on one connection to the mirror"
    );
}

#[tokio::test]
async fn a_mirrors_large_answer_is_read_and_dropped_not_held() {
    let (b, copy) = (Counting::start(None).await, Counting::start(None).await);
    let (dp, url) = mirrored(&b, &copy).await;
    let start = dp.anon_mb();
    // The client reads the primary's 128 MiB as it comes; the mirror's 128 MiB are the proxy's
    // to get rid of.
    let mut r = client().get(format!("{url}/copied/big")).send().await.unwrap();
    let mut got = 0;
    while let Some(chunk) = r.chunk().await.unwrap() {
        got += chunk.len();
    }
    assert_eq!(got, 128 << 20);
    eventually(
        "the mirror's answer is read to its end",
        Duration::from_secs(20),
        async || dp.metric(COPIES).await == 1.0,
    )
    .await;
    let grown = dp.anon_mb() - start;
    eprintln!("RssAnon grew by {grown:.1} MB");
    assert!(
        grown < 48.0,
        "the proxy grew by {grown:.0} MB for a 128 MiB answer it drops"
    );
    assert_eq!(copy.accepted.load(SeqCst), 1);
}
