//! Bound sockets and connections: accept (with a per-listener cap), TLS, protocol detection
//! (HTTP/1.1, or HTTP/2 by prior knowledge or ALPN), header limits, and draining.

pub mod client;
mod idle;
mod stall;
pub mod tls;
mod watched;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::watch;

use ferrum_snapshot::model::Protocol as SnapProtocol;

use crate::dataplane::Shared;
use crate::limits::MAX_HEADER_BYTES;
use crate::proxy::{self, ConnInfo};
use watched::{First, Watched};

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct BindError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

struct Running {
    stop: watch::Sender<bool>,
}

/// HTTP/1.1 and HTTP/2 server settings; a connection gets one after detection.
pub struct Http {
    h1: http1::Builder,
    h2: http2::Builder<stall::StreamExec>,
}

/// The sockets the current config listens on.
pub struct Listeners {
    shared: Arc<Shared>,
    http: Arc<Http>,
    workers: Vec<Handle>,
    running: HashMap<SocketAddr, Running>,
}

/// Sockets bound for one address, one per worker, not yet accepting.
pub type Bound = (SocketAddr, Vec<std::net::TcpListener>);

/// Whether this network namespace has IPv6: an address on some interface (a kernel without
/// IPv6 has no such file; `disable_ipv6` leaves it empty).
pub fn has_ipv6() -> bool {
    std::fs::read("/proc/net/if_inet6").is_ok_and(|a| !a.is_empty())
}

/// Listening sockets for `addr` and, when it is IPv4's any-address on a host with IPv6, for
/// IPv6's on the same port — IPv6 only, so each connection's original destination is looked up
/// in its own family. A host that cannot have the IPv6 one is warned about and served on IPv4.
pub fn bind_dual_stack(addr: SocketAddr) -> std::io::Result<Vec<std::net::TcpListener>> {
    let mut all = vec![bind(addr)?];
    if addr.ip() == std::net::Ipv4Addr::UNSPECIFIED && has_ipv6() {
        let v6 = SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), addr.port());
        match bind_socket(v6, true) {
            Ok(l) => all.push(l),
            Err(e) => tracing::warn!(addr = %v6, error = %e, "not listening on IPv6"),
        }
    }
    Ok(all)
}

/// A listening socket with SO_REUSEPORT, so each worker can have its own.
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    bind_socket(addr, false)
}

fn bind_socket(addr: SocketAddr, v6_only: bool) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    if v6_only {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    Ok(s.into())
}

impl Http {
    pub fn new(limits: &crate::limits::Limits) -> Self {
        let mut h1 = http1::Builder::new();
        // The header timeout is `idle`'s, one timer per connection (see `Http::serve`).
        h1.header_read_timeout(None)
            .max_buf_size(MAX_HEADER_BYTES)
            // No `max_headers`: hyper's own limit of 100 fields (Envoy's default too) is parsed
            // into arrays on the stack; any other costs two 4 KB heap arrays per request.
            .keep_alive(true);
        let mut h2 = http2::Builder::new(stall::StreamExec {
            limit: limits.stream_idle_timeout,
        });
        // Few streams per connection: one client's connection cannot take a cluster's whole
        // circuit-breaker budget.
        h2.timer(TokioTimer::new())
            .max_header_list_size(MAX_HEADER_BYTES as u32)
            .max_concurrent_streams(limits.max_streams)
            .max_pending_accept_reset_streams(64)
            .enable_connect_protocol()
            .adaptive_window(true);
        Http { h1, h2 }
    }
}

impl Listeners {
    pub fn new(shared: Arc<Shared>, workers: Vec<Handle>) -> Self {
        Listeners {
            http: Arc::new(Http::new(&shared.limits)),
            shared,
            workers,
            running: HashMap::new(),
        }
    }

    /// Binds every address in `want` not bound yet. Nothing changes if one bind fails, so a
    /// config that asks for a busy port is rejected whole.
    pub fn bind_new(&self, want: &[SocketAddr]) -> Result<Vec<Bound>, BindError> {
        want.iter()
            .filter(|a| !self.running.contains_key(a))
            .map(|a| {
                let socks = (0..self.workers.len().max(1))
                    .map(|_| bind(*a))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|source| BindError { addr: *a, source })?;
                Ok((*a, socks))
            })
            .collect()
    }

    /// Starts accepting on newly bound sockets and stops the ones `want` no longer has.
    pub fn reconcile(&mut self, want: &[SocketAddr], new: Vec<Bound>) {
        for (addr, socks) in new {
            let (stop, rx) = watch::channel(false);
            // One count for the listener, whichever worker accepted.
            let open = Arc::new(AtomicUsize::new(0));
            for (i, sock) in socks.into_iter().enumerate() {
                let (shared, http, rx) = (self.shared.clone(), self.http.clone(), rx.clone());
                let open = open.clone();
                let run = async move {
                    // Registered with the runtime that polls it: the worker's own.
                    match TcpListener::from_std(sock) {
                        Ok(l) => accept_loop(l, addr, open, shared, http, rx).await,
                        Err(e) => tracing::error!(%addr, error = %e, "cannot register listener"),
                    }
                };
                match self.workers.get(i) {
                    Some(h) => drop(h.spawn(run)),
                    None => drop(tokio::spawn(run)),
                }
            }
            tracing::info!(%addr, "listening");
            self.running.insert(addr, Running { stop });
        }
        self.running.retain(|addr, r| {
            let keep = want.contains(addr);
            if !keep {
                tracing::info!(%addr, "listener removed; draining its connections");
                let _ = r.stop.send(true);
            }
            keep
        });
    }

    /// Stops accepting everywhere and asks every connection to finish its requests and close.
    pub fn drain(&mut self) {
        for r in self.running.values() {
            let _ = r.stop.send(true);
        }
    }

    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.running.keys().copied().collect()
    }
}

async fn accept_loop(
    l: TcpListener,
    bound: SocketAddr,
    open: Arc<AtomicUsize>,
    shared: Arc<Shared>,
    http: Arc<Http>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (stream, client) = tokio::select! {
            r = l.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => return,
        };
        if open.fetch_add(1, Relaxed) >= shared.limits.max_connections {
            open.fetch_sub(1, Relaxed);
            shared.registry.downstream_rejected.fetch_add(1, Relaxed);
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let count = ConnCount::new(shared.clone(), open.clone());
        tokio::spawn(connection(
            stream,
            ConnInfo::direct(bound, client),
            count,
            http.clone(),
            stop.clone(),
        ));
    }
}

/// Counts one open client connection, in the process and in its listener.
struct ConnCount {
    shared: Arc<Shared>,
    listener: Arc<AtomicUsize>,
}

impl ConnCount {
    fn new(shared: Arc<Shared>, listener: Arc<AtomicUsize>) -> Self {
        shared.registry.downstream_total.fetch_add(1, Relaxed);
        shared.registry.downstream_active.fetch_add(1, Relaxed);
        ConnCount { shared, listener }
    }
}

impl Drop for ConnCount {
    fn drop(&mut self) {
        self.shared.registry.downstream_active.fetch_sub(1, Relaxed);
        self.listener.fetch_sub(1, Relaxed);
    }
}

/// Which HTTP a connection speaks, from its first bytes or its ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpVersion {
    One,
    Two,
}

/// What an HTTP/2 client sends first (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads (without consuming) until the first bytes tell HTTP/1 from the HTTP/2 preface. `None`
/// when the client closes or sends nothing within `within`: a connection that never speaks is
/// closed instead of held.
pub async fn detect(stream: &TcpStream, within: Duration) -> Option<HttpVersion> {
    let sniff = async {
        let mut buf = [0u8; 24];
        loop {
            let n = stream.peek(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            if buf[..n] != H2_PREFACE[..n] {
                return Some(HttpVersion::One);
            }
            if n == H2_PREFACE.len() {
                return Some(HttpVersion::Two);
            }
            // A preface split across packets: peek returns the same bytes until more arrive.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::time::timeout(within, sniff).await.ok().flatten()
}

async fn connection(
    mut stream: TcpStream,
    mut info: ConnInfo,
    count: ConnCount,
    http: Arc<Http>,
    stop: watch::Receiver<bool>,
) {
    let shared = count.shared.clone();
    let (protocol, tls, proxy_protocol) = shared
        .config
        .load()
        .listeners
        .get(&info.listener)
        .map_or((SnapProtocol::Http, None, false), |l| {
            (l.protocol, l.tls.clone(), l.client_address.proxy_protocol)
        });
    if proxy_protocol {
        match client::read_proxy_header(&mut stream, info.peer, shared.limits.header_read_timeout).await {
            Ok(c) => (info.client, info.remote) = (c, c),
            Err(e) => {
                shared.registry.proxy_protocol_refused.fetch_add(1, Relaxed);
                tracing::debug!(peer = %info.peer, error = %e, "connection refused");
                return;
            }
        }
    }
    match (protocol, tls) {
        (SnapProtocol::Tcp, _) => crate::tcp::forward::serve_plain(stream, false, info, shared).await,
        (SnapProtocol::Tls, None) => crate::tcp::forward::serve_plain(stream, true, info, shared).await,
        (SnapProtocol::Tls, Some(cfg)) => crate::tcp::forward::serve_terminated(stream, cfg, info, shared).await,
        (_, None) => {
            let Some(proto) = detect(&stream, shared.limits.header_read_timeout).await else {
                tracing::debug!(client = %info.client, "closed before a request arrived");
                return;
            };
            serve(TokioIo::new(stream), proto, info, shared, &http, stop).await
        }
        (_, Some(cfg)) => {
            let accept = tokio_rustls::TlsAcceptor::from(cfg).accept(stream);
            match tokio::time::timeout(shared.limits.tls_handshake_timeout, accept).await {
                Ok(Ok(s)) => {
                    let proto = match s.get_ref().1.alpn_protocol() {
                        Some(b"h2") => HttpVersion::Two,
                        _ => HttpVersion::One,
                    };
                    serve(TokioIo::new(s), proto, info, shared, &http, stop).await
                }
                Ok(Err(e)) => {
                    tracing::debug!(client = %info.client, error = %e, "TLS handshake failed")
                }
                Err(_) => tracing::debug!(client = %info.client, "TLS handshake timed out"),
            }
        }
    }
    drop(count);
}

/// Serves HTTP on one connection through the proxy until it ends or `stop` is set.
pub async fn serve<I>(
    io: I,
    proto: HttpVersion,
    info: ConnInfo,
    shared: Arc<Shared>,
    http: &Http,
    stop: watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let held = shared.clone();
    let h1 = {
        let shared = shared.clone();
        service_fn(move |req| {
            let shared = shared.clone();
            async move { Ok::<_, Infallible>(proxy::handle(shared, info, req).await) }
        })
    };
    // HTTP/2 spawns a task per stream, moving the request's future into it several times:
    // boxed, only a pointer moves (6 % fewer instructions per request, by callgrind).
    let h2 = service_fn(move |req| {
        use futures_util::FutureExt;
        Box::pin(proxy::handle(shared.clone(), info, req)).map(Ok::<_, Infallible>)
    });
    if let Err(e) = http.serve(io, proto, (h1, h2), &held.limits, stop).await {
        tracing::debug!(client = %info.client, error = %e, "connection ended with an error");
    }
}

impl Http {
    /// Runs one connection with `h1` or `h2` (as `proto` says) until it ends or `stop` is set,
    /// then lets it finish gracefully; so too an HTTP/2 connection with no open stream for the
    /// idle timeout. An HTTP/1.1 one with no request open for the header timeout is closed. A
    /// client that reads nothing for the stream idle timeout loses it.
    pub async fn serve<I, S1, S2, B1, B2>(
        &self,
        io: I,
        proto: HttpVersion,
        (h1, h2): (S1, S2),
        limits: &crate::limits::Limits,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), hyper::Error>
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
        S1: hyper::service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B1>>,
        S2: hyper::service::Service<
                http::Request<hyper::body::Incoming>,
                Response = http::Response<B2>,
                Future: Unpin + Send + 'static,
            >,
        S1::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        S2::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        B1: hyper::body::Body + Unpin + Send + 'static,
        B2: hyper::body::Body + Unpin + Send + 'static,
        B1::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        B2::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        stall::StreamExec: hyper::rt::bounds::Http2ServerConnExec<idle::Opening<S2::Future>, idle::Open<B2>>,
    {
        // `graceful`: an idle connection is told to go (GOAWAY) rather than dropped; an
        // HTTP/1.1 one with no request open has nothing to finish.
        macro_rules! drive {
            ($conn:expr, $idle:expr, graceful: $graceful:expr) => {{
                let (conn, idle) = ($conn, $idle);
                tokio::pin!(conn);
                let ending = async {
                    tokio::select! {
                        _ = stopped(&mut stop) => Ending::Stop,
                        () = idle => Ending::Idle,
                    }
                };
                match Watched::new(conn.as_mut(), ending).await {
                    First::Conn(r) => r,
                    First::Watch(Ending::Stop) => {
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                    First::Watch(Ending::Idle) if !$graceful => Ok(()),
                    First::Watch(Ending::Idle) => {
                        // A GOAWAY, then the end: a client that does not answer the shutdown's
                        // PING gets the header timeout, not for ever.
                        conn.as_mut().graceful_shutdown();
                        tokio::time::timeout(limits.header_read_timeout, conn)
                            .await
                            .unwrap_or(Ok(()))
                    }
                }
            }};
        }
        let io = stall::WriteStall::new(io, limits.stream_idle_timeout);
        match proto {
            HttpVersion::One => {
                // No request open for the header timeout: a head trickled in or none coming.
                let (h1, idle) = idle::Counted::watched(h1, Some(limits.header_read_timeout));
                drive!(self.h1.serve_connection(io, h1).with_upgrades(), idle, graceful: false)
            }
            HttpVersion::Two => {
                let (h2, idle) = idle::Counted::watched(h2, limits.idle_timeout);
                drive!(self.h2.serve_connection(io, h2), idle, graceful: true)
            }
        }
    }
}

/// Why a connection is ended before it ends by itself.
enum Ending {
    Stop,
    Idle,
}

/// Resolves once the stop flag is set (or its sender is gone).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
