//! Bound sockets and connections: accept, TLS, HTTP/1.1 and HTTP/2 (h2c prior knowledge or
//! ALPN), header limits, and draining.

pub mod tls;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::watch;

use crate::limits::{MAX_HEADER_BYTES, MAX_HEADERS};
use crate::proxy::{self, ConnInfo, Shared};

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

/// The sockets the current config listens on.
pub struct Listeners {
    shared: Arc<Shared>,
    http: Arc<auto::Builder<TokioExecutor>>,
    workers: Vec<Handle>,
    running: HashMap<SocketAddr, Running>,
}

/// Sockets bound for one address, one per worker, not yet accepting.
pub type Bound = (SocketAddr, Vec<std::net::TcpListener>);

fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    Ok(s.into())
}

impl Listeners {
    pub fn new(shared: Arc<Shared>, workers: Vec<Handle>) -> Self {
        let mut b = auto::Builder::new(TokioExecutor::new());
        b.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(shared.limits.header_read_timeout)
            .max_buf_size(MAX_HEADER_BYTES)
            .max_headers(MAX_HEADERS)
            .keep_alive(true);
        b.http2()
            .timer(TokioTimer::new())
            .max_header_list_size(MAX_HEADER_BYTES as u32)
            .max_concurrent_streams(1024)
            .max_pending_accept_reset_streams(64)
            .adaptive_window(true);
        Listeners {
            shared,
            http: Arc::new(b),
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
            for (i, sock) in socks.into_iter().enumerate() {
                let (shared, http, rx) = (self.shared.clone(), self.http.clone(), rx.clone());
                let run = async move {
                    // Registered with the runtime that polls it: the worker's own.
                    match TcpListener::from_std(sock) {
                        Ok(l) => accept_loop(l, addr.port(), shared, http, rx).await,
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
    port: u16,
    shared: Arc<Shared>,
    http: Arc<auto::Builder<TokioExecutor>>,
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
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(
            stream,
            ConnInfo { port, client },
            shared.clone(),
            http.clone(),
            stop.clone(),
        ));
    }
}

struct ConnCount(Arc<Shared>);
impl Drop for ConnCount {
    fn drop(&mut self) {
        self.0.registry.downstream_active.fetch_sub(1, Relaxed);
    }
}

async fn connection(
    stream: TcpStream,
    info: ConnInfo,
    shared: Arc<Shared>,
    http: Arc<auto::Builder<TokioExecutor>>,
    stop: watch::Receiver<bool>,
) {
    shared.registry.downstream_total.fetch_add(1, Relaxed);
    shared.registry.downstream_active.fetch_add(1, Relaxed);
    let _count = ConnCount(shared.clone());
    let tls = shared
        .config
        .load()
        .listeners
        .get(&info.port)
        .and_then(|l| l.tls.clone());
    match tls {
        None => serve(TokioIo::new(stream), info, shared, &http, stop).await,
        Some(cfg) => {
            let accept = tokio_rustls::TlsAcceptor::from(cfg).accept(stream);
            match tokio::time::timeout(shared.limits.tls_handshake_timeout, accept).await {
                Ok(Ok(s)) => serve(TokioIo::new(s), info, shared, &http, stop).await,
                Ok(Err(e)) => {
                    tracing::debug!(client = %info.client, error = %e, "TLS handshake failed")
                }
                Err(_) => tracing::debug!(client = %info.client, "TLS handshake timed out"),
            }
        }
    }
}

async fn serve<I>(
    io: I,
    info: ConnInfo,
    shared: Arc<Shared>,
    http: &auto::Builder<TokioExecutor>,
    mut stop: watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(proxy::handle(shared, info, req).await) }
    });
    let conn = http.serve_connection(io, svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(client = %info.client, error = %e, "connection ended with an error");
            }
        }
        _ = stopped(&mut stop) => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Resolves once the stop flag is set (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
