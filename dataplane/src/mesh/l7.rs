//! Inbound HTTP judged request by request. When a workload's AuthorizationPolicies look at
//! methods, paths, hosts or headers, the sidecar reads the first bytes of each inbound
//! connection (or HBONE tunnel): HTTP/1 and HTTP/2 (prior knowledge) are served here — each
//! request checked, 403 `RBAC: access denied` as Istio answers, the rest forwarded to the app
//! over the connection already opened to it — and anything else is judged once, at L4.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use http::{Request, Response, StatusCode};
use hyper::body::Body as _;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry::trace::SpanKind;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::ext_authz::Settled;
use crate::access_log::Entry;
use crate::dataplane::Shared;
use crate::listener::{H2_PREFACE, HttpVersion};
use crate::proxy::{Local, headers};
use crate::upstream::UpstreamError;
use crate::upstream::body::{ClientBody, Counted, Observed, RequestBody, ResponseBody, Upload};

/// How long a client gets to show what it speaks; silence means a server-first protocol.
pub const SNIFF_TIMEOUT: Duration = Duration::from_millis(500);

/// The first bytes the client sent (empty when it sent nothing in time, or closed).
pub async fn sniff<S: AsyncRead + Unpin>(s: &mut S) -> Bytes {
    let mut buf = vec![0u8; 1024];
    match tokio::time::timeout(SNIFF_TIMEOUT, s.read(&mut buf)).await {
        Ok(Ok(n)) => {
            buf.truncate(n);
            buf.into()
        }
        _ => Bytes::new(),
    }
}

/// The most of an HTTP/1 request head read to find its `Host`.
const MAX_HEAD: usize = 16 * 1024;

/// What a client asks for in its first bytes, to match a service known by host only: the SNI
/// name of a TLS ClientHello or the `Host` of an HTTP/1 request (`None`: neither, or not within
/// [`SNIFF_TIMEOUT`]), with every byte read, to send on unchanged. `Err`: the connection cannot
/// go on (it failed or closed mid-ClientHello, or sent one no TLS server would take).
pub async fn requested_host<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<(Option<String>, Bytes)> {
    use crate::tcp::forward::{HelloError, client_hello};
    let first = sniff(s).await;
    if first.first() == Some(&0x16) {
        let mut p = Prefixed::new(first, &mut *s);
        let mut rec = Recorded {
            inner: &mut p,
            seen: Vec::new(),
        };
        return match client_hello(&mut rec, SNIFF_TIMEOUT).await {
            Ok((sni, seen)) => Ok((sni, seen.into())),
            // No ClientHello that names a host in time: what came goes on, decided by address.
            Err(HelloError::Timeout(_) | HelloError::NotTls(_) | HelloError::TooLarge) => Ok((None, rec.seen.into())),
            Err(HelloError::Closed) => Err(std::io::ErrorKind::UnexpectedEof.into()),
            Err(HelloError::Io(e)) => Err(e),
        };
    }
    if detect(&first) != Some(HttpVersion::One) {
        return Ok((None, first));
    }
    let mut seen = first.to_vec();
    let deadline = tokio::time::Instant::now() + SNIFF_TIMEOUT;
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&seen) {
            Ok(httparse::Status::Complete(_)) => {
                let host = req
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("host"))
                    .and_then(|h| std::str::from_utf8(h.value).ok())
                    .map(host_of);
                return Ok((host, seen.into()));
            }
            Ok(httparse::Status::Partial) if seen.len() < MAX_HEAD => {}
            // Malformed, or more than a head may be: no host to match.
            _ => return Ok((None, seen.into())),
        }
        let mut buf = [0u8; 4096];
        let n = match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(r) => r?,
            Err(_) => return Ok((None, seen.into())),
        };
        if n == 0 {
            return Ok((None, seen.into()));
        }
        seen.extend_from_slice(&buf[..n]);
    }
}

/// Reads through to `inner`, keeping a copy of every byte read.
struct Recorded<'a, S> {
    inner: &'a mut S,
    seen: Vec<u8>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Recorded<'_, S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let me = &mut *self;
        let before = buf.filled().len();
        std::task::ready!(Pin::new(&mut *me.inner).poll_read(cx, buf))?;
        me.seen.extend_from_slice(&buf.filled()[before..]);
        Poll::Ready(Ok(()))
    }
}

/// A `Host` value without its port, in lower case.
fn host_of(v: &str) -> String {
    let v = v.trim();
    let host = match v.strip_prefix('[') {
        Some(rest) => rest.split_once(']').map_or(v, |(h, _)| h),
        None => v.rsplit_once(':').map_or(v, |(h, _)| h),
    };
    host.to_ascii_lowercase()
}

/// What the first bytes say: an HTTP/2 preface, an HTTP/1 request line, or neither.
pub fn detect(first: &[u8]) -> Option<HttpVersion> {
    // The preface's first line, or as much of the preface as has arrived.
    if first.starts_with(&H2_PREFACE[..16]) || (first.len() >= 4 && H2_PREFACE.starts_with(first)) {
        return Some(HttpVersion::Two);
    }
    // A method token (upper-case letters) and a space, then the request line's version.
    let line = first.split(|b| *b == b'\n').next().unwrap_or(&[]);
    let method_len = line.iter().take_while(|b| b.is_ascii_uppercase()).count();
    let is_http1 = (3..=7).contains(&method_len)
        && line.get(method_len) == Some(&b' ')
        && (line.windows(7).any(|w| w == b"HTTP/1." || w == b" HTTP/1") || !first.contains(&b'\n'));
    is_http1.then_some(HttpVersion::One)
}

/// A stream whose first bytes were already read: they are read again first.
pub struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Bytes, inner: S) -> Self {
        Prefixed { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if self.prefix.has_remaining() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

type Body = ResponseBody;

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(ResponseBody::local(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain"));
    r
}

/// The app, as the judged requests of one client connection reach it: over one connection at a
/// time, dialled again when the app has closed the last — apps close idle keep-alives (Node and
/// Hypercorn after 5 s) while the client's connection through the mesh stays open.
struct AppConn {
    http: HttpVersion,
    addr: SocketAddr,
    connect_timeout: Duration,
    /// HTTP/1 holds the lock for a request's exchange (one at a time, as the server side hands
    /// them over); HTTP/2 only to take a handle to the shared connection.
    sender: tokio::sync::Mutex<Option<Sender>>,
}

enum Sender {
    One(hyper::client::conn::http1::SendRequest<RequestBody>),
    Two(hyper::client::conn::http2::SendRequest<RequestBody>),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::One(s) => s.is_closed(),
            Sender::Two(s) => s.is_closed(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error("connecting to the application: {0}")]
    Connect(#[from] std::io::Error),
    #[error(transparent)]
    Http(#[from] hyper::Error),
    #[error("the application closed a new connection before taking the request")]
    Closed,
}

/// A request's fate on one connection: not sent (it may go on another), or failed once sent.
enum Failed {
    Unsent(Box<Request<RequestBody>>),
    Sent(hyper::Error),
}

impl From<hyper::client::conn::TrySendError<Request<RequestBody>>> for Failed {
    fn from(mut e: hyper::client::conn::TrySendError<Request<RequestBody>>) -> Self {
        match e.take_message() {
            Some(req) => Failed::Unsent(Box::new(req)),
            None => Failed::Sent(e.into_error()),
        }
    }
}

impl AppConn {
    async fn new(http: HttpVersion, stream: TcpStream, conn: &Conn) -> Result<AppConn, AppError> {
        Ok(AppConn {
            http,
            addr: conn.app,
            connect_timeout: conn.connect_timeout,
            sender: tokio::sync::Mutex::new(Some(handshake(http, stream).await?)),
        })
    }

    /// Sends `req` on the open connection, or on a new one when the app has closed it (before
    /// or while the request was handed over: a request the app never saw goes on once more).
    async fn send(&self, mut req: Request<RequestBody>) -> Result<Response<Incoming>, AppError> {
        for _ in 0..2 {
            let mut slot = self.sender.lock().await;
            if slot.as_ref().is_none_or(Sender::is_closed) {
                let stream = super::sidecar::connect_app(self.addr, self.connect_timeout).await?;
                *slot = Some(handshake(self.http, stream).await?);
            }
            let sent = match slot.as_mut() {
                Some(Sender::One(s)) => {
                    let sent = match s.ready().await {
                        Ok(()) => s.try_send_request(req).await.map_err(Failed::from),
                        Err(_) => Err(Failed::Unsent(Box::new(req))),
                    };
                    if let Err(Failed::Unsent(_)) = sent {
                        // Dial again even if hyper has not marked it closed yet.
                        *slot = None;
                    }
                    sent
                }
                Some(Sender::Two(s)) => {
                    let mut s = s.clone();
                    drop(slot);
                    match s.ready().await {
                        Ok(()) => s.try_send_request(req).await.map_err(Failed::from),
                        Err(_) => Err(Failed::Unsent(Box::new(req))),
                    }
                }
                None => unreachable!("dialled above"),
            };
            match sent {
                Ok(resp) => return Ok(resp),
                Err(Failed::Sent(e)) => return Err(e.into()),
                Err(Failed::Unsent(back)) => req = *back,
            }
        }
        Err(AppError::Closed)
    }
}

/// An HTTP client connection to the app on `stream`, driven by its own task.
async fn handshake(http: HttpVersion, stream: TcpStream) -> Result<Sender, hyper::Error> {
    let io = TokioIo::new(stream);
    Ok(match http {
        HttpVersion::One => {
            let (send, conn) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(conn.with_upgrades());
            Sender::One(send)
        }
        HttpVersion::Two => {
            let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(conn);
            Sender::Two(send)
        }
    })
}

/// What the policies say about one request.
pub enum Verdict {
    Allow,
    /// An AuthorizationPolicy denies it: 403.
    Deny,
    /// It carries a JWT no RequestAuthentication rule accepts: 401.
    Unauthenticated,
    /// A CUSTOM policy matches it: its provider is asked first; if it lets the request on
    /// (maybe editing its headers), the rest of the verdict is taken.
    Ask(Box<super::ext_authz::Ask>),
}

/// The rest of a verdict, once a provider let the request on.
pub type Then = Box<dyn FnOnce(&mut http::request::Parts) -> Verdict + Send>;

/// The connection a sidecar serves: for spans and for upgraded streams.
pub struct Conn {
    pub shared: Arc<Shared>,
    pub client: SocketAddr,
    /// How long an upgraded (WebSocket) stream may stay silent.
    pub idle: Duration,
    /// The proxy's HTTP server settings (the gateway's limits hold here too).
    pub http: Arc<crate::listener::Http>,
    /// Set when the proxy drains: the connection finishes its requests and closes.
    pub stop: tokio::sync::watch::Receiver<bool>,
    /// Where the app listens, to dial it again, and how long a dial may take.
    pub app: SocketAddr,
    pub connect_timeout: Duration,
    /// Where each request is counted, by the caller's.
    pub calls: super::peers::Calls,
    /// The caller's certificate as the app is told it (`x-forwarded-client-cert`), over mTLS.
    pub client_cert: Option<http::HeaderValue>,
}

const XFCC: http::HeaderName = http::HeaderName::from_static("x-forwarded-client-cert");

/// Envoy's `APPEND_FORWARD`, as on Istio's sidecars: an mTLS caller's certificate is appended to
/// the header; from a plaintext caller, the header is dropped — nobody outside the mesh can
/// claim an identity to the app.
fn forward_client_cert(headers: &mut http::HeaderMap, cert: Option<&http::HeaderValue>) {
    let Some(cert) = cert else {
        headers.remove(XFCC);
        return;
    };
    let value = match headers.get(XFCC) {
        Some(sent) => http::HeaderValue::from_bytes(&[sent.as_bytes(), b",", cert.as_bytes()].concat())
            .unwrap_or_else(|_| cert.clone()),
        None => cert.clone(),
    };
    headers.insert(XFCC, value);
}

/// One request: checked as the gateway checks a head (so the policy judges the path the app
/// will read), judged, then answered locally or by the app; an allowed HTTP/1.1 Upgrade
/// (WebSocket) that the app accepts becomes a relay between the two.
async fn answer<F>(
    mut req: Request<Incoming>,
    app: &AppConn,
    judge: &F,
    conn: &Conn,
) -> (Response<Body>, Option<Arc<Upload>>)
where
    F: Fn(&mut http::request::Parts) -> Verdict,
{
    let limits = &conn.shared.limits;
    if let Err(refused) = crate::proxy::check_head(&mut req, limits) {
        return (refused.into_response(ResponseBody::local), None);
    }
    let upgrade = crate::proxy::upgrade::requested(&mut req).filter(|u| !u.is_h2());
    let (mut parts, body) = req.into_parts();
    let mut body = ClientBody::from(body);
    let verdict = judge(&mut parts);
    let body_idle = limits.request_body_idle_timeout;
    let on_allow = match super::ext_authz::settle(verdict, &mut parts, &mut body, body_idle).await {
        Settled::Allow(add) => add,
        Settled::Deny => return (text(StatusCode::FORBIDDEN, "RBAC: access denied"), None),
        Settled::Refused(d) => return (d.into_response(ResponseBody::local), None),
        Settled::Unauthenticated => return (unauthenticated(), None),
    };
    // The app's request and the client's response get what the gateway's do: hop-by-hop
    // headers stop here both ways (an upgrade's own are put back).
    headers::strip_hop_by_hop(&mut parts.headers, true);
    forward_client_cert(&mut parts.headers, conn.client_cert.as_ref());
    if let Some(u) = &upgrade {
        u.upstream_head(&mut parts);
    }
    // Bounded as at the gateway: --max-request-body, and pauses of --request-body-idle-timeout.
    if body.size_hint().lower() > limits.max_request_body as u64 {
        return (Local::BodyTooLarge.into_response(ResponseBody::local), None);
    }
    let (body, upload) = if body.is_end_stream() {
        (RequestBody::empty(), None)
    } else {
        let (b, u) = RequestBody::stream(body, limits.max_request_body);
        (b, Some(u))
    };
    let sent = std::pin::pin!(app.send(Request::from_parts(parts, body)));
    let sent = match crate::proxy::await_app(sent, upload.as_deref(), body_idle).await {
        Ok(sent) => sent,
        Err(local) => return (local.into_response(ResponseBody::local), upload),
    };
    (app_answer(sent, upgrade, on_allow, conn), upload)
}

/// A request with no valid JWT where a policy requires one: Envoy's answer, so clients written
/// against Istio see what they expect.
fn unauthenticated() -> Response<Body> {
    let mut r = text(StatusCode::UNAUTHORIZED, "Jwt verification fails");
    r.headers_mut().insert(
        http::header::WWW_AUTHENTICATE,
        http::HeaderValue::from_static("Bearer realm=\"mesh\", error=\"invalid_token\""),
    );
    r
}

/// What the client gets for what the app sent (or why it could not): the app's answer, its
/// hop-by-hop headers out (an accepted upgrade spliced instead), or the proxy's own.
fn app_answer(
    sent: Result<Response<Incoming>, AppError>,
    upgrade: Option<crate::proxy::upgrade::Upgrade>,
    on_allow: super::ext_authz::ResponseHeaders,
    conn: &Conn,
) -> Response<Body> {
    match sent {
        Ok(resp) if !crate::proxy::valid_status(resp.status(), upgrade.is_some()) => {
            tracing::debug!(status = %resp.status(), "application answered with a status no client may get");
            Local::Upstream(UpstreamError::InvalidResponse).into_response(ResponseBody::local)
        }
        Ok(mut resp) => {
            match upgrade.filter(|_| resp.status() == StatusCode::SWITCHING_PROTOCOLS) {
                Some(u) => u.splice(hyper::upgrade::on(&mut resp), conn.idle, ()),
                None => headers::downstream_response(resp.headers_mut()),
            }
            super::ext_authz::add_response_headers(on_allow, resp.headers_mut());
            // Bounded like an upstream's: an app that stops mid-body loses the response.
            let stall = crate::limits::Stall::new(conn.shared.limits.stream_idle_timeout);
            resp.map(|body| ResponseBody::App { body, stall })
        }
        Err(AppError::Http(e)) if let Some(local) = crate::proxy::client_fault(&e) => {
            local.into_response(ResponseBody::local)
        }
        Err(e) => {
            tracing::debug!(error = %e, "application request failed");
            let mut r = text(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream connect error or disconnect/reset before headers",
            );
            // Said as the gateway says it (and counted with Envoy's flag for it).
            let failed = match e {
                AppError::Connect(_) => UpstreamError::ConnectFailure,
                AppError::Http(_) | AppError::Closed => UpstreamError::Reset,
            };
            let reason = http::HeaderValue::from_static(failed.as_str());
            r.headers_mut().insert(&headers::X_FERRUM_ERROR, reason);
            r
        }
    }
}

/// Serves HTTP on `stream`, asking `judge` about each request (which may rewrite its head) and
/// forwarding the allowed ones to `app`, until either side closes. Each request continues its
/// trace with an inbound span of this proxy when `shared` traces.
pub async fn serve<S, F>(stream: S, http: HttpVersion, app: TcpStream, judge: F, conn: Conn)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(&mut http::request::Parts) -> Verdict + Send + Sync + 'static,
{
    let app = match AppConn::new(http, app, &conn).await {
        Ok(app) => Arc::new(app),
        Err(e) => return tracing::debug!(error = %e, "application handshake failed"),
    };
    let (server, shared, stop) = (conn.http.clone(), conn.shared.clone(), conn.stop.clone());
    let conn = Arc::new(conn);
    let judge = Arc::new(judge);
    let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let (app, judge, conn) = (app.clone(), judge.clone(), conn.clone());
        // Boxed: the server counts HTTP/2 streams around a future it can move.
        Box::pin(async move {
            let started = Instant::now();
            let grpc = crate::proxy::is_grpc(&req);
            let declared = req.body().size_hint().exact().unwrap_or(0);
            let span = conn.shared.tracing.begin(req.headers_mut(), SpanKind::Server);
            let traced = span.map(|span| (Entry::of(&req, conn.client, "inbound"), span));
            let (resp, upload) = answer(req, &app, &*judge, &conn).await;
            let call = Counted::new(conn.calls.clone(), &resp, grpc, started, (declared, upload));
            let (mut entry, span) = traced.unzip();
            if let Some(e) = &mut entry {
                e.respond(&resp);
            }
            let log = conn.shared.access_log.clone();
            Ok::<_, Infallible>(resp.map(|body| Observed::wrap(body, entry, false, span, log, Some(call))))
        })
    });
    let served = server
        .serve(TokioIo::new(stream), http, (svc.clone(), svc), &shared.limits, stop)
        .await;
    if let Err(e) = served {
        tracing::debug!(error = %e, "inbound HTTP connection ended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    #[test]
    fn the_app_is_told_only_what_mtls_proved() {
        let mine =
            http::HeaderValue::from_static("By=spiffe://td/ns/b/sa/b;Hash=ab;Subject=\"\";URI=spiffe://td/ns/a/sa/a");
        let sent = |v: Option<&'static str>| {
            let mut h = http::HeaderMap::new();
            if let Some(v) = v {
                h.insert(XFCC, http::HeaderValue::from_static(v));
            }
            h
        };
        let mut h = sent(Some("By=x;URI=spiffe://td/ns/admin/sa/root"));
        forward_client_cert(&mut h, None);
        assert!(h.get(XFCC).is_none(), "a plaintext caller's claim is dropped");
        let mut h = sent(None);
        forward_client_cert(&mut h, Some(&mine));
        assert_eq!(h[XFCC], mine);
        let mut h = sent(Some("By=x;URI=spiffe://td/ns/admin/sa/root"));
        forward_client_cert(&mut h, Some(&mine));
        let got = h[XFCC].to_str().unwrap();
        assert!(got.starts_with("By=x;URI=spiffe://td/ns/admin/sa/root,By="), "{got}");
        assert!(
            got.ends_with(";URI=spiffe://td/ns/a/sa/a"),
            "what the sidecar proved comes last: {got}"
        );
    }

    #[test]
    fn detection() {
        assert_eq!(detect(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"), Some(HttpVersion::One));
        assert_eq!(detect(b"OPTIONS * HTTP/1.1\r\n"), Some(HttpVersion::One));
        assert_eq!(
            detect(b"POST /upload"),
            Some(HttpVersion::One),
            "a request line still arriving"
        );
        assert_eq!(detect(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Some(HttpVersion::Two));
        assert_eq!(detect(b"\x16\x03\x01\x02\x00"), None, "a TLS ClientHello");
        assert_eq!(detect(b"hello world\n"), None);
        assert_eq!(detect(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(detect(b""), None);
    }

    /// What `requested_host` finds in `sent` (written in pieces, then the writer waits), and
    /// whether the bytes it hands on, followed by the rest of the stream, are exactly those sent.
    async fn requested(sent: &[u8]) -> (Option<String>, bool) {
        let (mut w, mut r) = tokio::io::duplex(64);
        let all = sent.to_vec();
        tokio::spawn(async move {
            for chunk in all.chunks(40) {
                tokio::io::AsyncWriteExt::write_all(&mut w, chunk).await.unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            std::future::pending::<()>().await;
        });
        let (host, seen) = requested_host(&mut r).await.unwrap();
        // What it read, then what is still to be read: the connection as the upstream gets it.
        let mut all = Prefixed::new(seen, r);
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_millis(300), all.read_to_end(&mut got)).await;
        (host, got == sent)
    }

    #[tokio::test]
    async fn the_host_a_connection_asks_for_is_read_without_losing_a_byte() {
        let get = b"GET /v1 HTTP/1.1\r\nUser-Agent: curl\r\nHost: API.Example.com:8080\r\nAccept: */*\r\n\r\n";
        assert_eq!(requested(get).await, (Some("api.example.com".into()), true));
        let hello = ferrum_testkit::client_hello("Pay.Example.com");
        assert_eq!(requested(&hello).await, (Some("pay.example.com".into()), true));
        // A first byte like TLS's, then no ClientHello: no host, nothing lost.
        assert_eq!(
            requested(b"\x16 definitely not a handshake, but a long line of text\r\n").await,
            (None, true)
        );
        // Neither TLS nor HTTP/1: no host, the bytes go on as they came.
        assert_eq!(requested(b"SSH-2.0-OpenSSH_9.6\r\n").await, (None, true));
        // HTTP/1 with no Host, and a head that never ends within the limit.
        assert_eq!(requested(b"GET / HTTP/1.0\r\n\r\n").await, (None, true));
        let endless = [b"GET / HTTP/1.1\r\n".as_slice(), &b"X: y\r\n".repeat(3000)].concat();
        assert_eq!(requested(&endless).await.0, None);
    }

    #[tokio::test]
    async fn the_sniffed_bytes_are_read_again() {
        let (mut a, b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, b"GET / HTTP/1.1\r\n")
            .await
            .unwrap();
        drop(a);
        let mut b = b;
        let first = sniff(&mut b).await;
        let mut all = Vec::new();
        Prefixed::new(first, b).read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"GET / HTTP/1.1\r\n");
    }

    /// A per-request sidecar in front of the app at `app`, speaking `http`; it denies `/blocked`.
    async fn judging(app: SocketAddr, http: HttpVersion) -> SocketAddr {
        judging_with(app, http, crate::limits::Limits::default()).await
    }

    async fn judging_with(app: SocketAddr, http: HttpVersion, limits: crate::limits::Limits) -> SocketAddr {
        sidecar(app, http, limits).await.0
    }

    /// [`judging_with`], and the sidecar's metrics (each connection from an unknown caller).
    async fn sidecar(
        app: SocketAddr,
        http: HttpVersion,
        limits: crate::limits::Limits,
    ) -> (SocketAddr, Arc<crate::telemetry::Registry>) {
        let sidecar = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = sidecar.local_addr().unwrap();
        let shared = crate::dataplane::Dataplane::new(limits, vec![]).shared.clone();
        let registry = shared.registry.clone();
        let server = Arc::new(crate::listener::Http::new(&shared.limits));
        let stop = tokio::sync::watch::channel(false).0;
        tokio::spawn(async move {
            while let Ok((s, client)) = sidecar.accept().await {
                let stream = TcpStream::connect(app).await.unwrap();
                let own = || crate::mesh::peers::Party::of(None, None);
                let open = shared.registry.mesh.peers.inbound(None, None, 1, own);
                let conn = Conn {
                    shared: shared.clone(),
                    client,
                    idle: Duration::from_secs(10),
                    http: server.clone(),
                    stop: stop.subscribe(),
                    app,
                    connect_timeout: Duration::from_secs(1),
                    calls: open.calls(),
                    client_cert: None,
                };
                let judge = |p: &mut http::request::Parts| {
                    if p.uri.path() == "/blocked" {
                        Verdict::Deny
                    } else {
                        Verdict::Allow
                    }
                };
                tokio::spawn(async move {
                    serve(s, http, stream, judge, conn).await;
                    drop(open);
                });
            }
        });
        (addr, registry)
    }

    /// The app closes each connection 200 ms after accepting it, as apps close idle keep-alives;
    /// the client's connection to the sidecar stays, and each request on it reaches the app —
    /// after a pause (the app's connection long closed) and right after a response (closing
    /// while the request is handed over).
    #[tokio::test]
    async fn an_app_that_closes_its_connection_is_dialled_again() {
        for http in [HttpVersion::One, HttpVersion::Two] {
            let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let app_addr = app.local_addr().unwrap();
            let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let count = accepted.clone();
            tokio::spawn(async move {
                while let Ok((s, _)) = app.accept().await {
                    count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(req.uri().path().to_owned()))))
                    });
                    let io = TokioIo::new(s);
                    tokio::spawn(async move {
                        let served = async {
                            match http {
                                HttpVersion::One => {
                                    let _ = hyper::server::conn::http1::Builder::new()
                                        .serve_connection(io, svc)
                                        .await;
                                }
                                HttpVersion::Two => {
                                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                                        .serve_connection(io, svc)
                                        .await;
                                }
                            }
                        };
                        let _ = tokio::time::timeout(Duration::from_millis(200), served).await;
                    });
                }
            });
            let addr = judging(app_addr, http).await;
            let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
            type Client<B> = (
                Option<hyper::client::conn::http1::SendRequest<B>>,
                Option<hyper::client::conn::http2::SendRequest<B>>,
            );
            let mut client: Client<http_body_util::Empty<Bytes>> = match http {
                HttpVersion::One => {
                    let (send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
                    tokio::spawn(conn);
                    (Some(send), None)
                }
                HttpVersion::Two => {
                    let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                        .await
                        .unwrap();
                    tokio::spawn(conn);
                    (None, Some(send))
                }
            };
            for (i, pause) in [0, 400, 0, 150, 0].into_iter().enumerate() {
                tokio::time::sleep(Duration::from_millis(pause)).await;
                let path = format!("/r{i}");
                let req = Request::builder()
                    .uri(format!("http://app{path}"))
                    .header(http::header::HOST, "app")
                    .body(http_body_util::Empty::new())
                    .unwrap();
                let resp = match &mut client {
                    (Some(s), _) => s.send_request(req).await,
                    (_, Some(s)) => s.send_request(req).await,
                    _ => unreachable!(),
                };
                let resp = resp.unwrap_or_else(|e| panic!("{http:?} {path}: the client's connection broke: {e}"));
                assert_eq!(resp.status(), StatusCode::OK, "{http:?} {path}");
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(body, path.as_bytes(), "{http:?}");
            }
            let dials = accepted.load(std::sync::atomic::Ordering::Relaxed);
            assert!(dials >= 2, "{http:?}: the app was dialled {dials} times");
        }
    }

    /// Each request is counted for its caller in Istio's request metrics once its response has
    /// ended, by the code the client got — the app's, or the sidecar's own 403 — with its sizes;
    /// gRPC calls apart, by the status their trailers end with.
    #[tokio::test]
    async fn each_request_is_counted_by_its_response_code() {
        let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app_addr = app.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = app.accept().await {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let grpc = req.headers().contains_key(http::header::CONTENT_TYPE);
                    let path = req.uri().path().to_string();
                    let answer = match path.as_str() {
                        // Read whole before answering, as an app taking an upload does.
                        "/upload" => Bytes::from(req.into_body().collect().await.unwrap().to_bytes().len().to_string()),
                        // The app fails the call: its server resets the stream.
                        "/reset" => return Err(std::io::Error::other("failed")),
                        _ => Bytes::from_static(b"answer"),
                    };
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", http::HeaderValue::from_static("14"));
                    let trailers = grpc.then_some(Ok(trailers));
                    let body = Full::new(answer).with_trailers(async move { trailers });
                    let mut r = Response::new(body);
                    if path == "/missing" {
                        *r.status_mut() = StatusCode::NOT_FOUND;
                    }
                    Ok::<_, std::io::Error>(r)
                });
                let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                tokio::spawn(async move { conn.serve_connection(TokioIo::new(s), svc).await });
            }
        });
        let (addr, registry) = sidecar(app_addr, HttpVersion::Two, Default::default()).await;
        let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(conn);
        for (path, grpc) in [
            ("/a", false),
            ("/a", false),
            ("/blocked", false),
            ("/missing", false),
            ("/reset", false),
            ("/s/M", true),
        ] {
            let mut req = Request::builder().uri(format!("http://app{path}"));
            if grpc {
                req = req
                    .method("POST")
                    .header(http::header::CONTENT_TYPE, "application/grpc");
            }
            let body = Full::new(Bytes::from_static(b"12345"));
            let resp = send.send_request(req.body(body.boxed()).unwrap()).await.unwrap();
            resp.into_body().collect().await.unwrap();
        }
        // An upload of unknown length (no content-length), in three frames: 11 bytes arrive.
        let frames = ["hello", " ", "world"].map(|f| Ok::<_, Infallible>(http_body::Frame::data(Bytes::from(f))));
        let upload = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        let req = Request::post("http://app/upload").body(upload.boxed()).unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "11");
        // Counted as the server lets each response body go, just after the client has it all.
        let grpc = "request_protocol=\"grpc\",response_code=\"200\",grpc_response_status=\"14\"";
        let mut text = String::new();
        for _ in 0..100 {
            text = registry.render(vec![], &Default::default());
            if text.contains(grpc) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let value = |name: &str, labels: &str| {
            text.lines()
                .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(labels))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        };
        let count = |code: &str| {
            value(
                "istio_requests_total",
                &format!("request_protocol=\"http\",response_code=\"{code}\",response_flags=\"-\"}}"),
            )
        };
        assert_eq!(count("200"), Some(3.0), "{text}");
        assert_eq!(count("403"), Some(1.0), "{text}");
        assert_eq!(count("404"), Some(1.0), "{text}");
        let reset = "response_code=\"503\",response_flags=\"UC\"";
        assert_eq!(
            value("istio_requests_total", reset),
            Some(1.0),
            "the app's reset, flagged: {text}"
        );
        assert_eq!(value("istio_requests_total", grpc), Some(1.0), "{text}");
        let line = text.lines().find(|l| l.starts_with("istio_requests_total{")).unwrap();
        assert!(
            line.contains("reporter=\"destination\",source_workload=\"unknown\""),
            "{line}"
        );
        let ok = "response_code=\"200\",response_flags=\"-\"";
        assert_eq!(
            value("istio_request_duration_milliseconds_count", ok),
            Some(3.0),
            "{text}"
        );
        assert_eq!(
            value("istio_response_bytes_sum", ok),
            Some(14.0),
            "the app's bodies: {text}"
        );
        assert_eq!(
            value("istio_request_bytes_sum", ok),
            Some(21.0),
            "the client's bodies, as declared or as they arrived: {text}"
        );
        let denied = "response_code=\"403\",response_flags=\"-\"";
        assert_eq!(
            value("istio_response_bytes_sum", denied),
            Some(19.0),
            "RBAC: access denied"
        );
    }

    /// Hop-by-hop headers stop at the sidecar both ways, as at the gateway: the app gets none of
    /// the client's (nor a header its `Connection` names), and a chunked answer that also says
    /// `Content-Length` reaches the client whole (RFC 9112 §6.3), without the app's hop-by-hop
    /// headers; a 101 nobody asked for, or a status out of range, is a 502.
    #[tokio::test]
    async fn hop_by_hop_headers_stop_at_the_sidecar() {
        use tokio::io::AsyncWriteExt;
        let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app_addr = app.local_addr().unwrap();
        let heads = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let seen = heads.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = app.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    loop {
                        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                            match s.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => head.extend_from_slice(&buf[..n]),
                            }
                        }
                        let end = head.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                        let text = String::from_utf8_lossy(&head[..end]).to_lowercase();
                        head.drain(..end);
                        let answer: &[u8] = if text.starts_with("get /switch") {
                            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
                        } else {
                            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\
                              Connection: keep-alive, x-secret\r\nx-secret: s\r\nKeep-Alive: timeout=5\r\n\r\n\
                              b\r\nhello world\r\n0\r\n\r\n"
                        };
                        seen.lock().unwrap().push(text);
                        if s.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let addr = judging(app_addr, HttpVersion::One).await;
        let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        let req = Request::builder()
            .uri("/x")
            .header(http::header::HOST, "app")
            .header(http::header::CONNECTION, "keep-alive, x-internal")
            .header("x-internal", "1")
            .header("keep-alive", "timeout=5")
            .header("proxy-connection", "keep-alive")
            .header("x-app", "kept")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        for gone in ["x-secret", "keep-alive", "connection"] {
            assert!(resp.headers().get(gone).is_none(), "{gone}: {:?}", resp.headers());
        }
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "hello world");
        let head = heads.lock().unwrap()[0].clone();
        assert!(head.contains("x-app: kept"), "{head}");
        for gone in ["x-internal", "keep-alive", "proxy-connection"] {
            assert!(!head.contains(gone), "{gone} reached the app: {head}");
        }
        send.ready().await.unwrap();
        let req = Request::builder()
            .uri("/switch")
            .header(http::header::HOST, "app")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY, "a 101 nobody asked for");
    }

    /// An app that sends the head and part of a body, then nothing, loses the response after
    /// the stream idle timeout, as an upstream does at the gateway: the client is not held.
    #[tokio::test]
    async fn an_app_that_stops_mid_body_is_cut_off() {
        let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app_addr = app.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = app.accept().await {
                let svc = hyper::service::service_fn(|_req: Request<Incoming>| async {
                    let first = futures_util::stream::iter([Ok::<_, Infallible>(hyper::body::Frame::data(
                        Bytes::from_static(b"part"),
                    ))]);
                    let body = http_body_util::StreamBody::new(futures_util::StreamExt::chain(
                        first,
                        futures_util::stream::pending(),
                    ));
                    Ok::<_, Infallible>(Response::new(body))
                });
                tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(s), svc));
            }
        });
        let limits = crate::limits::Limits {
            stream_idle_timeout: Some(Duration::from_millis(500)),
            ..Default::default()
        };
        let addr = judging_with(app_addr, HttpVersion::One, limits).await;
        let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        let req = Request::builder()
            .uri("/stream")
            .header(http::header::HOST, "app")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let started = std::time::Instant::now();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let body = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect()).await;
        assert!(
            body.expect("still waiting after 5 s").is_err(),
            "the body cannot end well"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(500),
            "{:?}",
            started.elapsed()
        );
    }

    /// The gateway's bounds on a client's upload hold on the way to the app: a body that pauses
    /// longer than the request body idle timeout gets 408 (before, the app waited for ever), and
    /// one over --max-request-body gets 413 — over HTTP/1.1 and HTTP/2.
    #[tokio::test]
    async fn uploads_to_the_app_are_bounded() {
        let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app_addr = app.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = app.accept().await {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async {
                    let got = req.into_body().collect().await.map(|b| b.to_bytes().len());
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!("{got:?}")))))
                });
                let io = TokioIo::new(s);
                tokio::spawn(async move {
                    let server = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let _ = server.serve_connection(io, svc).await;
                });
            }
        });
        let limits = crate::limits::Limits {
            request_body_idle_timeout: Duration::from_millis(400),
            max_request_body: 1000,
            ..Default::default()
        };
        for http in [HttpVersion::One, HttpVersion::Two] {
            let addr = judging_with(app_addr, http, limits.clone()).await;
            let send = |body: http_body_util::combinators::BoxBody<Bytes, Infallible>| async move {
                let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
                let mut req = Request::post("http://app/upload").body(body).unwrap();
                if http == HttpVersion::One {
                    req.headers_mut()
                        .insert(http::header::HOST, http::HeaderValue::from_static("app"));
                }
                let resp = match http {
                    HttpVersion::One => {
                        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
                        tokio::spawn(conn);
                        send.send_request(req).await
                    }
                    HttpVersion::Two => {
                        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                            .await
                            .unwrap();
                        tokio::spawn(conn);
                        send.send_request(req).await
                    }
                };
                let resp = resp.unwrap();
                let status = resp.status();
                let text = resp.into_body().collect().await.map(|b| b.to_bytes());
                (
                    status,
                    text.map(|t| String::from_utf8_lossy(&t).into_owned())
                        .unwrap_or_default(),
                )
            };
            let whole = Full::new(Bytes::from_static(b"hello")).boxed();
            assert_eq!(send(whole).await, (StatusCode::OK, "Ok(5)".into()), "{http:?}");

            // A first chunk, then nothing.
            let paused = futures_util::StreamExt::chain(
                futures_util::stream::iter([Ok(hyper::body::Frame::data(Bytes::from_static(b"part")))]),
                futures_util::stream::pending(),
            );
            let started = std::time::Instant::now();
            let (status, _) = tokio::time::timeout(
                Duration::from_secs(5),
                send(http_body_util::StreamBody::new(paused).boxed()),
            )
            .await
            .expect("still waiting after 5 s");
            assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "{http:?}");
            assert!(
                started.elapsed() >= Duration::from_millis(400),
                "{:?}",
                started.elapsed()
            );

            let big = Full::new(Bytes::from(vec![b'x'; 2000])).boxed();
            assert_eq!(send(big).await.0, StatusCode::PAYLOAD_TOO_LARGE, "{http:?}");
        }
    }

    /// A WebSocket through the per-request path: the allowed upgrade is carried both ways, a
    /// denied one gets the 403 before any switch.
    #[tokio::test]
    async fn websockets_are_judged_then_carried() {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;

        let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
                        return;
                    };
                    while let Some(Ok(m)) = ws.next().await {
                        if m.is_text() && ws.send(m).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let addr = judging(echo_addr, HttpVersion::One).await;
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut ws, resp) = tokio_tungstenite::client_async(format!("ws://{addr}/chat"), tcp)
            .await
            .unwrap();
        assert_eq!(resp.status(), 101);
        for text in ["hello", "through the sidecar"] {
            ws.send(Message::text(text)).await.unwrap();
            assert_eq!(ws.next().await.unwrap().unwrap().into_text().unwrap(), text);
        }
        let tcp = TcpStream::connect(addr).await.unwrap();
        match tokio_tungstenite::client_async(format!("ws://{addr}/blocked"), tcp).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 403),
            other => panic!("a denied upgrade must be refused: {other:?}"),
        }
    }
}
