//! Hostile and malformed input from outside the process: Host rules, path normalisation,
//! transfer codings, client body faults, idle connections, HTTP/2 stream caps, h2c upgrades, and upstreams
//! that answer what no client may be sent.

mod common;
use common::*;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends raw bytes and reads until the proxy closes (requests say `Connection: close`).
async fn raw(port: u16, req: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(req).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn status(resp: &str) -> u16 {
    resp.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

fn body(resp: &str) -> serde_json::Value {
    let b = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(b).unwrap_or_default()
}

fn route(name: &str, hostnames: &str, path: &str, backend: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}}}\nspec:\n  parentRefs: [{{name: gw}}]\n  \
         hostnames: [{hostnames}]\n  rules: [{{matches: [{{path: {{type: PathPrefix, value: {path}}}}}], \
         backendRefs: [{{group: ferrum.dev, kind: Backend, name: {backend}}}]}}]\n"
    )
}

fn backend_at(name: &str, addr: SocketAddr, spec: &str) -> String {
    format!(
        "apiVersion: ferrum.dev/v1alpha1\nkind: Backend\nmetadata: {{name: {name}}}\nspec:\n  endpoints: [{{address: 127.0.0.1, port: {}}}]\n{spec}",
        addr.port()
    )
}

/// A backend that answers every request with `response`, then closes.
async fn raw_backend(response: &'static [u8]) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(response).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn host_must_be_single_and_the_target_authority_wins() {
    let (a, b, any) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("any").await,
    );
    let port = free_port();
    let dp = Dp::start(&docs(&[
        gateway(port),
        backend("a", &[&a], ""),
        backend("b", &[&b], ""),
        backend("any", &[&any], ""),
        route("ra", "a.test", "/", "a"),
        route("rb", "b.test", "/", "b"),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: rany}\nspec:\n  parentRefs: [{name: gw}]\n  \
         rules: [{backendRefs: [{group: ferrum.dev, kind: Backend, name: any}]}]\n"
            .into(),
    ]))
    .await;
    let two = raw(
        port,
        b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&two), 400, "{two}");
    assert!(two.contains("invalid_host"), "{two}");
    let none = raw(port, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status(&none), 400, "{none}");
    // Absolute form: the authority in the request line routes, and is what the backend sees.
    let abs = raw(
        port,
        b"GET http://a.test/x HTTP/1.1\r\nHost: b.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&abs), 200, "{abs}");
    assert_eq!(body(&abs)["backend"], "a");
    assert_eq!(body(&abs)["headers"]["host"][0], "a.test");
    // HTTP/1.0 without Host: served by the any-host route, and the upstream still gets a Host.
    let old = raw(port, b"GET /y HTTP/1.0\r\n\r\n").await;
    assert_eq!(status(&old), 200, "{old}");
    assert_eq!(body(&old)["backend"], "any");
    assert_eq!(body(&old)["headers"]["host"][0], any.addr.to_string());
    // A Host (or authority) that is not `host[:port]` is refused, not forwarded for an app to
    // build URLs from; one with userinfo too (it obscures the authority).
    for bad in [
        "a.test/evil",
        "a.test?x",
        "a .test",
        "user@a.test",
        "[::1",
        "a.test:80:80",
    ] {
        let r = raw(
            port,
            format!("GET / HTTP/1.1\r\nHost: {bad}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(status(&r), 400, "{bad}: {r}");
        assert!(r.contains("invalid_host"), "{bad}: {r}");
    }
    let userinfo = raw(
        port,
        b"GET http://user:pw@a.test/ HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&userinfo), 400, "{userinfo}");
    for good in ["a.test:8080", "a.test.", "[::1]:80"] {
        let r = raw(
            port,
            format!("GET / HTTP/1.1\r\nHost: {good}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(status(&r), 200, "{good}: {r}");
    }
    assert_eq!(b.hits(), 0);
    drop(dp);
}

#[tokio::test]
async fn paths_are_normalised_before_matching_and_forwarded_normalised() {
    let public = Backend::start("public").await;
    let port = free_port();
    let _dp = Dp::start(&docs(&[
        gateway(port),
        backend("public", &[&public], ""),
        route("r", "\"*\"", "/public", "public"),
    ]))
    .await;
    let get = |p: &str| format!("GET {p} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    for escape in ["/public/../admin", "/public/%2e%2e/admin", "/public/%2E%2E/admin"] {
        let r = raw(port, get(escape).as_bytes()).await;
        assert_eq!(status(&r), 404, "{escape} must not match /public: {r}");
    }
    for refused in ["/public/..%2fadmin", "/public/%5c..%5cadmin", "/public/%zz"] {
        let r = raw(port, get(refused).as_bytes()).await;
        assert_eq!(status(&r), 400, "{refused}: {r}");
        assert!(r.contains("invalid_path"), "{r}");
    }
    assert_eq!(public.hits(), 0, "nothing reached the backend");
    let r = raw(port, get("/public//a/./b/../c%7e?q=%2F").as_bytes()).await;
    assert_eq!(status(&r), 200, "{r}");
    assert_eq!(body(&r)["path"], "/public/a/c~?q=%2F");
}

/// An app that carries `/` inside a segment (`/repos/group%2Fname`) is served when escaped
/// slashes are kept; decoding them instead resolves a traversal hidden in them before matching.
#[tokio::test]
async fn escaped_slashes_can_be_kept_or_decoded() {
    let public = Backend::start("public").await;
    let yaml = |port| {
        docs(&[
            gateway(port),
            backend("public", &[&public], ""),
            route("r", "\"*\"", "/public", "public"),
        ])
    };
    let get = |p: &str| format!("GET {p} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let port = free_port();
    let keep = Dp::start_with(&yaml(port), &["--escaped-slashes", "keep"]).await;
    let r = raw(port, get("/public/repos/group%2fname").as_bytes()).await;
    assert_eq!(status(&r), 200, "{r}");
    assert_eq!(body(&r)["path"], "/public/repos/group%2Fname");
    drop(keep);
    let port = free_port();
    let _unescape = Dp::start_with(&yaml(port), &["--escaped-slashes", "unescape"]).await;
    let r = raw(port, get("/public/..%2fadmin").as_bytes()).await;
    assert_eq!(status(&r), 404, "/public/..%2fadmin is /admin: {r}");
    let r = raw(port, get("/public/a%2Fb").as_bytes()).await;
    assert_eq!(status(&r), 200, "{r}");
    assert_eq!(body(&r)["path"], "/public/a/b");
}

#[tokio::test]
async fn transfer_codings_we_do_not_apply_are_refused() {
    let a = Backend::start("a").await;
    let port = free_port();
    let _dp = Dp::start(&docs(&[
        gateway(port),
        backend("a", &[&a], ""),
        route("r", "\"*\"", "/", "a"),
    ]))
    .await;
    let r = raw(
        port,
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status(&r), 501, "{r}");
    assert_eq!(a.hits(), 0);
    let ok = raw(
        port,
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status(&ok), 200, "{ok}");
    assert_eq!(body(&ok)["body_len"], 5);
}

/// HTTP/1 heads carry at most 100 header fields (hyper's and Envoy's default): 431 beyond,
/// from the proxy itself (a backend that takes anything answers 204).
#[tokio::test]
async fn a_request_with_too_many_header_fields_gets_431() {
    let anything = raw_backend(b"HTTP/1.1 204 No Content\r\n\r\n").await;
    let port = free_port();
    let _dp = Dp::start(&docs(&[
        gateway(port),
        backend_at("a", anything, ""),
        route("r", "\"*\"", "/", "a"),
    ]))
    .await;
    // Host and Connection, and the rest as x-N fields.
    let with = |fields: usize| {
        let extra: String = (0..fields - 2).map(|i| format!("x-{i}: v\r\n")).collect();
        format!("GET / HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n")
    };
    assert_eq!(status(&raw(port, with(100).as_bytes()).await), 204);
    assert_eq!(status(&raw(port, with(101).as_bytes()).await), 431);
}

#[tokio::test]
async fn upstream_framing_and_statuses_are_checked() {
    let cl_and_te = raw_backend(
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    let weird = raw_backend(b"HTTP/1.1 999 Weird\r\nContent-Length: 0\r\n\r\n").await;
    let upgrade =
        raw_backend(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n").await;
    let reason = raw_backend(b"HTTP/1.1 404 No Such Widget\r\nContent-Length: 0\r\n\r\n").await;
    let port = free_port();
    let _dp = Dp::start(&docs(&[
        gateway(port),
        backend_at("cl", cl_and_te, ""),
        backend_at("weird", weird, ""),
        backend_at("upgrade", upgrade, ""),
        backend_at("reason", reason, ""),
        route("r1", "\"*\"", "/cl", "cl"),
        route("r2", "\"*\"", "/weird", "weird"),
        route("r3", "\"*\"", "/upgrade", "upgrade"),
        route("r4", "\"*\"", "/reason", "reason"),
    ]))
    .await;
    let r = raw(port, b"GET /reason HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await;
    assert!(
        r.starts_with("HTTP/1.1 404 No Such Widget\r\n"),
        "the backend's own reason phrase reaches an HTTP/1.1 client: {r}"
    );
    let c = client();
    let r = c.get(format!("http://127.0.0.1:{port}/cl")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("content-length").is_none(), "{:?}", r.headers());
    assert_eq!(r.text().await.unwrap(), "hello", "the whole chunked body arrives");
    let r = c.get(format!("http://127.0.0.1:{port}/weird")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["x-ferrum-error"], "upstream_invalid_response");
    let r = c.get(format!("http://127.0.0.1:{port}/upgrade")).send().await.unwrap();
    assert_eq!(r.status(), 502, "an unsolicited 101 is not passed through");
}

#[tokio::test]
async fn client_body_faults_never_eject_the_backend() {
    let a = Backend::start("a").await;
    let port = free_port();
    let dp = Dp::start_with(
        &docs(&[
            gateway(port),
            backend(
                "a",
                &[&a],
                "  outlierDetection: {consecutive5xx: 3, baseEjectionTime: 30s}\n  timeouts: {read: 500ms}\n",
            ),
            route("r", "\"*\"", "/", "a"),
        ]),
        &["--request-body-idle-timeout", "1"],
    )
    .await;
    for _ in 0..4 {
        // Content-Length 100, ten bytes, then the client goes away.
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(s);
        // A malformed chunk size.
        let r = raw(
            port,
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n+5\r\nhello\r\n0\r\n\r\n",
        )
        .await;
        assert!(r.is_empty() || status(&r) == 400, "{r}");
    }
    // A slow upload (1.2 s in all, a byte every 150 ms) outlasts the 500 ms response timeout:
    // that clock starts when the body is complete.
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    for b in b"abcdefgh" {
        tokio::time::sleep(Duration::from_millis(150)).await;
        s.write_all(&[*b]).await.unwrap();
    }
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let out = String::from_utf8_lossy(&out);
    assert_eq!(status(&out), 200, "{out}");
    assert_eq!(body(&out)["body_len"], 8);
    // An upload that stalls is the client's timeout: 408.
    let out = first_answer(port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\n\r\nab").await;
    assert_eq!(status(&out), 408, "{out}");
    assert_eq!(
        dp.metric("ferrum_cluster_ejections_total{cluster=\"backend/default/a\"}")
            .await,
        0.0
    );
    for _ in 0..5 {
        assert_eq!(
            client()
                .get(format!("http://127.0.0.1:{port}/"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    let errors = dp.admin_get("/metrics").await;
    assert!(
        errors
            .lines()
            .filter(|l| l.starts_with("ferrum_cluster_upstream_errors_total"))
            .all(|l| l.ends_with(" 0")),
        "client faults counted against the upstream:\n{errors}"
    );
}

#[tokio::test]
async fn silent_connections_are_closed_and_capped() {
    let a = Backend::start("a").await;
    let port = free_port();
    let dp = Dp::start_with(
        &docs(&[gateway(port), backend("a", &[&a], ""), route("r", "\"*\"", "/", "a")]),
        &["--header-read-timeout", "1", "--max-connections", "20"],
    )
    .await;
    let mut silent = Vec::new();
    for _ in 0..30 {
        silent.push(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    }
    eventually(
        "connections over the cap are refused",
        Duration::from_secs(3),
        async || dp.metric("ferrum_downstream_connections_rejected_total").await >= 10.0,
    )
    .await;
    // The admin listener is reachable while the listener is full, answers only local names,
    // and closes connections that send nothing.
    assert_eq!(dp.admin_get("/live").await, "live\n");
    let rebound = raw(
        dp.admin.port(),
        b"GET /config HTTP/1.1\r\nHost: evil.example:9901\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&rebound), 403, "{rebound}");
    let mut idle_admin = TcpStream::connect(dp.admin).await.unwrap();
    // Every silent connection is closed within the header timeout (plus slack).
    let started = Instant::now();
    for mut s in silent {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(4), s.read(&mut b)).await;
        assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "a silent connection stayed open");
    }
    assert!(started.elapsed() < Duration::from_secs(4));
    assert_eq!(
        client()
            .get(format!("http://127.0.0.1:{port}/"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(7), idle_admin.read(&mut b)).await;
    assert!(
        matches!(n, Ok(Ok(0)) | Ok(Err(_))),
        "a silent admin connection stayed open"
    );
}

/// An HTTP/1.1 connection waits for a request head no longer than the header timeout: one
/// trickling its head a byte at a time, and a keep-alive one idle after its answer, are closed;
/// a request whose answer takes longer than that keeps its connection.
#[tokio::test]
async fn http1_heads_are_bounded_by_the_header_timeout() {
    let a = Backend::start("a").await;
    let port = free_port();
    let _dp = Dp::start_with(
        &docs(&[gateway(port), backend("a", &[&a], ""), route("r", "\"*\"", "/", "a")]),
        &["--header-read-timeout", "1"],
    )
    .await;
    let trickle = async {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let started = Instant::now();
        for b in b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ".iter().chain([b'x'; 64].iter()) {
            if s.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
        started.elapsed()
    };
    let slow_answer_then_idle = async {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(b"GET /?delay=1800 HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).await.unwrap();
        let answered = String::from_utf8_lossy(&buf[..n]).into_owned();
        let idle_from = Instant::now();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
        (answered, idle_from.elapsed())
    };
    let (trickled, (answered, idle)) = tokio::join!(trickle, slow_answer_then_idle);
    assert!(
        trickled >= Duration::from_millis(900) && trickled < Duration::from_millis(2600),
        "a trickled head was cut after {trickled:?}"
    );
    assert_eq!(
        status(&answered),
        200,
        "an answer slower than the header timeout: {answered}"
    );
    assert!(
        idle >= Duration::from_millis(500) && idle < Duration::from_millis(2600),
        "an idle keep-alive connection was closed after {idle:?}"
    );
}

/// An HTTP/2 connection with no open stream for the idle timeout is closed: one that sent only
/// its preface (before, it stayed for ever, and enough of them filled the connection cap), and
/// one whose last response was sent (after a GOAWAY; the header timeout for a client that does
/// not answer its PING). A stream still open keeps its connection.
#[tokio::test]
async fn idle_h2_connections_are_closed() {
    let a = Backend::start("a").await;
    let port = free_port();
    let _dp = Dp::start_with(
        &docs(&[gateway(port), backend("a", &[&a], ""), route("r", "\"*\"", "/", "a")]),
        &["--idle-timeout", "1", "--header-read-timeout", "1"],
    )
    .await;
    let mut preface_only = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    preface_only
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let started = Instant::now();
    let io = hyper_util::rt::TokioIo::new(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    let (mut send, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    // The backend takes 2.5 s: longer than the idle timeout, with the stream open throughout.
    let req = http::Request::get(format!("http://127.0.0.1:{port}/?delay=2500"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = send
        .send_request(req)
        .await
        .expect("an open stream keeps its connection");
    assert_eq!(resp.status(), 200);
    assert!(started.elapsed() >= Duration::from_millis(2500));
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(3), preface_only.read_to_end(&mut sink)).await;
    assert!(
        closed.is_ok(),
        "a preface-only connection still open after {:?}",
        started.elapsed()
    );
    let after = Instant::now();
    tokio::time::timeout(Duration::from_secs(3), conn)
        .await
        .expect("the connection closes once idle")
        .unwrap()
        .unwrap();
    assert!(after.elapsed() >= Duration::from_millis(500), "{:?}", after.elapsed());
}

/// A request body that never ends.
struct Endless;
impl hyper::body::Body for Endless {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        std::task::Poll::Pending
    }
}

#[tokio::test]
async fn two_h2_connections_cannot_take_the_circuit_breaker() {
    let a = Backend::start("a").await;
    let port = free_port();
    let _dp = Dp::start(&docs(&[
        gateway(port),
        backend(
            "a",
            &[&a],
            "  circuitBreaker: {maxRequests: 300, maxPendingRequests: 1}\n",
        ),
        route("r", "\"*\"", "/", "a"),
    ]))
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let io = hyper_util::rt::TokioIo::new(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
        let (send, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(conn);
        for _ in 0..1024 {
            let mut send = send.clone();
            held.push(tokio::spawn(async move {
                let req = http::Request::post(format!("http://127.0.0.1:{port}/"))
                    .body(Endless)
                    .unwrap();
                let _ = send.send_request(req).await;
            }));
        }
    }
    eventually("the streams reach the backend", Duration::from_secs(5), async || {
        a.hits() >= 256
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(a.hits() <= 256, "at most 128 streams per connection: {}", a.hits());
    let r = client().get(format!("http://127.0.0.1:{port}/")).send().await.unwrap();
    assert_eq!(r.status(), 200, "another client still gets through");
    for h in held {
        h.abort();
    }
}

/// h2c smuggling: a client upgrades a request that a route allows to HTTP/2 cleartext and, once
/// a proxy has spliced the two connections, asks the backend for what no route allows. With a
/// real h2c server (Hypercorn, which switches on `Upgrade: h2c` alone) and client (`nghttp -u`):
/// the upgrade must never reach the backend, and the request goes on as a plain one.
#[tokio::test]
async fn an_h2c_upgrade_never_reaches_the_backend() {
    let h2c = ferrum_testkit::h2c::H2cServer::start().await;
    let port = free_port();
    let backend = format!(
        "apiVersion: ferrum.dev/v1alpha1\nkind: Backend\nmetadata: {{name: h2c}}\nspec:\n  endpoints: [{{address: 127.0.0.1, port: {}}}]\n",
        h2c.port
    );
    let _dp = Dp::start(&docs(&[
        gateway(port),
        backend,
        route("public", "\"*\"", "/public", "h2c"),
    ]))
    .await;
    let base = format!("http://127.0.0.1:{port}");
    let out =
        ferrum_testkit::h2c::upgrade_then_request(&[], &[&format!("{base}/public/x"), &format!("{base}/admin/secret")]);
    assert!(!out.contains(" 101"), "the proxy switched protocols: {out}");
    assert!(
        !out.contains("/admin/secret\n"),
        "the backend answered a request no route allows: {out}"
    );
    // The same upgrade request, with and without `Connection` naming it, is answered in HTTP/1.1.
    for connection in [Some("Upgrade, HTTP2-Settings"), None] {
        let mut req = client()
            .get(format!("{base}/public/x"))
            .header("upgrade", "h2c")
            .header("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA");
        if let Some(c) = connection {
            req = req.header("connection", c);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 200, "{connection:?}");
        assert_eq!(r.text().await.unwrap(), "1.1 /public/x\n", "{connection:?}");
    }
    let r = client().get(format!("{base}/admin/secret")).send().await.unwrap();
    assert_eq!(r.status(), 404, "no route");
}

/// An upgrade the backend must not be asked for goes on as a plain request: one with a body
/// (forwarded as an upgrade, its head promised a body the switch leaves unsent, and the backend
/// waited for it) and one over HTTP/1.0, where `Upgrade` means nothing.
#[tokio::test]
async fn an_upgrade_with_a_body_or_over_http_1_0_is_a_plain_request() {
    let a = Backend::start("a").await;
    let port = free_port();
    let _dp = Dp::start(&docs(&[
        gateway(port),
        backend_at("a", a.addr, ""),
        route("r", "\"*\"", "/", "a"),
    ]))
    .await;
    let started = Instant::now();
    let r = raw(
        port,
        b"POST /upload HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, close\r\nUpgrade: websocket\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await;
    assert_eq!(status(&r), 200, "{r}");
    let seen = body(&r);
    assert_eq!(seen["body_len"], 5, "{r}");
    assert!(seen["headers"].get("upgrade").is_none(), "{r}");
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    let r = raw(
        port,
        b"GET /old HTTP/1.0\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await;
    assert_eq!(status(&r), 200, "{r}");
    assert!(body(&r)["headers"].get("upgrade").is_none(), "{r}");
}

/// A backend that sends a response head and the start of a body, then nothing, keeping the
/// connection open; or (with `endless`) a chunked body for ever. Notifies once the proxy has
/// closed the connection under it.
async fn quiet_backend(endless: bool) -> (SocketAddr, std::sync::Arc<tokio::sync::Notify>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let closed = std::sync::Arc::new(tokio::sync::Notify::new());
    let gone = closed.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let gone = gone.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let _ = s.read(&mut buf).await;
                if endless {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                        .await;
                    let chunk = [&b"10000\r\n"[..], &[b'x'; 0x10000], b"\r\n"].concat();
                    while s.write_all(&chunk).await.is_ok() {}
                } else {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
                        .await;
                    // Reads until the proxy closes its end.
                    while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
                }
                gone.notify_one();
            });
        }
    });
    (addr, closed)
}

/// Neither side of a response may stay silent for ever (`--stream-idle-timeout`, Envoy's
/// `stream_idle_timeout`): an upstream that stops sending its body, and a client that stops
/// reading one, each lose the response after the limit, and the upstream connection is let go.
#[tokio::test]
async fn a_response_nobody_moves_is_cut_off() {
    let (stalling, stalling_closed) = quiet_backend(false).await;
    let (endless, endless_closed) = quiet_backend(true).await;
    let port = free_port();
    let config = docs(&[
        gateway(port),
        backend_at("stalling", stalling, ""),
        backend_at("endless", endless, ""),
        route("s", "\"*\"", "/stalling", "stalling"),
        route("e", "\"*\"", "/endless", "endless"),
    ]);
    let _dp = Dp::start_with(&config, &["--stream-idle-timeout", "1"]).await;
    let started = Instant::now();
    let r = client()
        .get(format!("http://127.0.0.1:{port}/stalling"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Within the client's own 10 s timeout: the proxy's limit ended it.
    let body = tokio::time::timeout(Duration::from_secs(5), r.bytes()).await;
    assert!(matches!(body, Ok(Err(_))), "the body was cut off: {body:?}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(5),
        "{took:?}"
    );
    tokio::time::timeout(Duration::from_secs(2), stalling_closed.notified())
        .await
        .expect("the stalled upstream connection is closed");

    // A client that asks for an endless body and reads none of it.
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(b"GET /endless HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    tokio::time::timeout(Duration::from_secs(15), endless_closed.notified())
        .await
        .expect("the upstream connection of the unread response is closed");
    let mut sink = Vec::new();
    let drained = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut sink)).await;
    assert!(drained.is_ok(), "the client's connection is closed too");
}

/// An HTTP/2 client that takes none of a response (it grants no flow-control window) loses
/// the stream after `--stream-idle-timeout`, and the upstream connection is let go; one that
/// reads slowly keeps it. hyper does
/// not poll a response body while its stream has no window, so only a stream-wide watch sees it;
/// before, the stream and its upstream connection were held for ever.
#[tokio::test]
async fn an_h2_stream_whose_window_stays_shut_is_reset() {
    let (endless, endless_closed) = quiet_backend(true).await;
    let port = free_port();
    let config = docs(&[
        gateway(port),
        backend_at("endless", endless, ""),
        route("e", "\"*\"", "/", "endless"),
    ]);
    let _dp = Dp::start_with(&config, &["--stream-idle-timeout", "1"]).await;
    let io = hyper_util::rt::TokioIo::new(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    let (mut send, conn) = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(1 << 20)
        .handshake(io)
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(format!("http://127.0.0.1:{port}/endless"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let started = Instant::now();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    // The body is not read: the stream's window stays shut.
    tokio::time::timeout(Duration::from_secs(10), endless_closed.notified())
        .await
        .expect("the upstream connection of the unread stream is closed");
    assert!(started.elapsed() >= Duration::from_secs(1), "{:?}", started.elapsed());
    let body = tokio::time::timeout(
        Duration::from_secs(5),
        http_body_util::BodyExt::collect(resp.into_body()),
    )
    .await;
    assert!(matches!(body, Ok(Err(_))), "the stream was reset");
    // The connection still serves, and a client that reads slowly but steadily keeps its stream.
    let again = http::Request::get(format!("http://127.0.0.1:{port}/endless"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let mut body = send.send_request(again).await.unwrap().into_body();
    let slow = Instant::now();
    while slow.elapsed() < Duration::from_secs(3) {
        let frame = http_body_util::BodyExt::frame(&mut body).await;
        assert!(matches!(frame, Some(Ok(_))), "a slow reader lost its stream: {frame:?}");
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
}
