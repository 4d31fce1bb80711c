//! HBONE (mesh.md): TCP tunnelled in HTTP/2 `CONNECT` streams over mutual TLS to a peer
//! proxy's port 15008. One TLS connection carries many tunnels.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ferrum_snapshot::identity::SpiffeId;
use h2::client::SendRequest;
use http::{Method, Request, Response, StatusCode};
use tokio::net::TcpStream;

use super::identity::{Identity, PeerCert, peer_cert, peer_id};
use super::sidecar::MeshStats;
pub use super::tunnel::Tunnel;

/// The port a peer proxy dials.
pub const HBONE_PORT: u16 = 15008;
/// Ports a tunnel may never target: the proxy's own (a loop, or a way around capture).
pub const PROXY_PORTS: [u16; 3] = [15001, 15006, 15008];
/// Tunnels one client connection may have open at once.
pub const MAX_STREAMS: u32 = 100;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Flow-control windows (ztunnel's): a tunnel may have 4 MiB in flight, a connection 16 MiB.
/// Credit, not memory: data is buffered only while the reader lags.
const STREAM_WINDOW: u32 = 4 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;
const MAX_FRAME: u32 = 256 << 10;
/// CONNECT headers are small; anything bigger is not a tunnel request.
const MAX_HEADER_LIST: u32 = 16 << 10;
/// A pooled connection is pinged when quiet this long, and dropped if no PONG comes back.
const KEEPALIVE: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("no workload certificate yet")]
    NoIdentity,
    #[error("cannot connect to {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
    #[error("TLS with {0}: {1}")]
    Tls(SocketAddr, String),
    #[error("{addr} presented {got:?}, expected {want}")]
    WrongIdentity {
        addr: SocketAddr,
        want: SpiffeId,
        got: Option<SpiffeId>,
    },
    #[error("HTTP/2 with {0}: {1}")]
    Http(SocketAddr, h2::Error),
    #[error("{0} answered the CONNECT with {1}")]
    Status(SocketAddr, StatusCode),
}

/// What the server knows about a tunnel request, for the decision to accept it.
pub struct TunnelRequest {
    /// The client's certificate: its SPIFFE ID, and what the app may be told of it.
    pub peer: Arc<PeerCert>,
    pub source: SocketAddr,
    pub target: SocketAddr,
}

/// The server side's policy and connection to the local application.
pub trait Inbound: Send + Sync + 'static {
    /// Whether `req` may reach its target (an AuthorizationPolicy decision; 401 when not).
    fn allow(&self, req: &TunnelRequest) -> bool;
    /// A connection to the local application at `target`.
    fn connect(&self, target: SocketAddr) -> impl Future<Output = std::io::Result<TcpStream>> + Send;
    /// Relays the tunnel and the application connection until both are done.
    fn relay(self: Arc<Self>, tunnel: Tunnel, app: TcpStream, req: TunnelRequest) -> impl Future<Output = ()> + Send;
}

fn status(s: StatusCode) -> Response<()> {
    let mut r = Response::new(());
    *r.status_mut() = s;
    r
}

/// Serves one accepted connection on 15008: mTLS (client certificate from our trust domain
/// required), then HTTP/2 with one `CONNECT` per tunnel.
pub async fn serve<I: Inbound>(tcp: TcpStream, identity: &Identity, inbound: Arc<I>) {
    let (Ok(local), Ok(source)) = (tcp.local_addr(), tcp.peer_addr()) else {
        return;
    };
    let Some(tls) = identity.current() else { return };
    let _ = tcp.set_nodelay(true);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server.clone());
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return tracing::debug!(%source, error = %e, "HBONE handshake failed"),
        Err(_) => return tracing::debug!(%source, "HBONE handshake timed out"),
    };
    let peer = match peer_cert(stream.get_ref().1.peer_certificates()) {
        Some(c) if c.id.trust_domain == tls.svid.id.trust_domain => c,
        other => {
            return tracing::info!(%source, peer = ?other.map(|c| c.id.to_string()), "HBONE peer is not in our trust domain: closed");
        }
    };
    drop(tls);
    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_concurrent_streams(MAX_STREAMS)
        .max_pending_accept_reset_streams(64)
        .handshake::<_, Bytes>(stream);
    let mut conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return tracing::debug!(%source, error = %e, "HBONE HTTP/2 handshake failed"),
        Err(_) => return tracing::debug!(%source, "HBONE HTTP/2 handshake timed out"),
    };
    let peer = Arc::new(peer);
    // Accepting drives the connection: it runs until the peer goes away.
    while let Some(next) = conn.accept().await {
        let Ok((req, respond)) = next else { break };
        let (inbound, peer) = (inbound.clone(), peer.clone());
        tokio::spawn(async move { tunnel(req, respond, local, source, &peer, inbound).await });
    }
}

/// One CONNECT: check it (400/503/401 as mesh.md says), connect to the app, answer 200 and
/// relay.
async fn tunnel<I: Inbound>(
    req: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    local: SocketAddr,
    source: SocketAddr,
    peer: &Arc<PeerCert>,
    inbound: Arc<I>,
) {
    let treq = match check(&req, local, source, peer) {
        Ok(t) => t,
        Err(s) => return refuse(&mut respond, s),
    };
    if !inbound.allow(&treq) {
        return refuse(&mut respond, StatusCode::UNAUTHORIZED);
    }
    let app = match inbound.connect(treq.target).await {
        Ok(a) => a,
        Err(e) => {
            tracing::debug!(target = %treq.target, error = %e, "HBONE target unreachable");
            return refuse(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    tracing::debug!(peer = %treq.peer.id, source = %source, target = %treq.target, "inbound tunnel opened");
    let Ok(send) = respond.send_response(status(StatusCode::OK), false) else {
        return;
    };
    inbound.relay(Tunnel::new(send, req.into_body()), app, treq).await;
}

/// What a CONNECT asks for, or the status that refuses it.
fn check<B>(
    req: &Request<B>,
    local: SocketAddr,
    source: SocketAddr,
    peer: &Arc<PeerCert>,
) -> Result<TunnelRequest, StatusCode> {
    if req.method() != Method::CONNECT {
        return Err(StatusCode::BAD_REQUEST);
    }
    let target = req
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
        .ok_or(StatusCode::BAD_REQUEST)?;
    // A sidecar only forwards to its own pod: the tunnel names the address it was dialled on.
    if target.ip() != local.ip() {
        return Err(StatusCode::BAD_REQUEST);
    }
    if PROXY_PORTS.contains(&target.port()) {
        return Err(StatusCode::SERVICE_UNAVAILABLE);
    }
    Ok(TunnelRequest {
        peer: peer.clone(),
        source,
        target,
    })
}

fn refuse(respond: &mut h2::server::SendResponse<Bytes>, s: StatusCode) {
    let _ = respond.send_response(status(s), true);
}

/// Where a tunnel goes and what it says about itself.
pub struct Dial<'a> {
    /// The peer proxy, `<workload ip>:15008`.
    pub proxy: SocketAddr,
    /// The identity it must present.
    pub identity: &'a SpiffeId,
    /// `:authority`: the real destination, `<workload ip>:<port>`.
    pub target: SocketAddr,
    /// The original client, for `forwarded`.
    pub client: SocketAddr,
    /// The Service host name, when a Service was targeted.
    pub host: Option<&'a str>,
    /// `baggage` (W3C), e.g. `k8s.namespace.name=a,k8s.pod.name=b`.
    pub baggage: &'a str,
}

/// One HTTP/2 client connection to a peer proxy; each request on it is a tunnel.
type Tunnels = SendRequest<Bytes>;

/// A pooled connection, its use, and whether it has ended.
#[derive(Clone)]
struct Conn {
    send: Tunnels,
    usage: Arc<Usage>,
    ended: Arc<AtomicBool>,
}

/// The tunnels open on a connection now, and since when it has had none.
struct Usage {
    open: AtomicUsize,
    idle_since_ms: AtomicU64,
}

impl Usage {
    fn new() -> Usage {
        Usage {
            open: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(crate::upstream::now_ms()),
        }
    }

    /// How long it has carried no tunnel (zero while it carries one).
    fn unused_for(&self) -> Duration {
        if self.open.load(Relaxed) > 0 {
            return Duration::ZERO;
        }
        Duration::from_millis(crate::upstream::now_ms().saturating_sub(self.idle_since_ms.load(Relaxed)))
    }
}

impl Conn {
    /// A tunnel's place on this connection if it is up and the peer allows another stream now.
    fn reserve(&self) -> Option<Slot> {
        if self.ended.load(Relaxed) {
            return None;
        }
        let limit = self.send.current_max_send_streams();
        self.usage
            .open
            .fetch_update(Relaxed, Relaxed, |n| (n < limit).then_some(n + 1))
            .ok()
            .map(|_| Slot(self.usage.clone()))
    }
}

/// One tunnel's place on its connection, given back when the tunnel goes.
pub struct Slot(Arc<Usage>);

impl Drop for Slot {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Relaxed) == 1 {
            self.0.idle_since_ms.store(crate::upstream::now_ms(), Relaxed);
        }
    }
}

/// The connections to one peer proxy (as one identity).
#[derive(Default)]
struct Peer {
    conns: Vec<Conn>,
    /// Held while a connection is dialled, so a burst of tunnels waits for that one connection
    /// (which has room for a hundred of them) instead of each dialling its own.
    dialing: Arc<tokio::sync::Mutex<()>>,
}

type PeerKey = (SocketAddr, SpiffeId);

/// Client connections by (peer proxy, identity it presented). HTTP/2 multiplexes the tunnels,
/// up to the peer's stream limit per connection; past it another connection is opened rather
/// than queueing tunnels behind the first (where they would wait for a stream to close).
pub struct Pool {
    peers: Mutex<HashMap<PeerKey, Peer>>,
    stats: Arc<MeshStats>,
    /// A connection that carries no tunnel this long is closed (ztunnel's
    /// `POOL_UNUSED_RELEASE_TIMEOUT`): a sidecar keeps no connection to every pod it ever called.
    unused_release: Duration,
}

/// Marks its connection ended, and uncounts it, when the task driving it ends.
struct Live {
    ended: Arc<AtomicBool>,
    stats: Arc<MeshStats>,
}

impl Drop for Live {
    fn drop(&mut self) {
        self.ended.store(true, Relaxed);
        self.stats.hbone_connections.fetch_sub(1, Relaxed);
    }
}

impl Pool {
    pub fn new(stats: Arc<MeshStats>, unused_release: Duration) -> Pool {
        Pool {
            peers: Mutex::default(),
            stats,
            unused_release,
        }
    }

    /// Opens a tunnel, on a pooled connection to the same proxy and identity with a stream to
    /// spare if there is one, else on a new connection.
    pub async fn open(&self, identity: &Identity, d: &Dial<'_>) -> Result<Tunnel, HboneError> {
        let key = (d.proxy, d.identity.clone());
        let (conn, slot) = self.checkout(identity, d, &key).await?;
        match open_on(conn.send.clone(), d, slot).await {
            // The peer allows fewer streams than we counted (its limit changed): the connection
            // is fine, the tunnel takes another place.
            Err(HboneError::Http(_, e)) if e.reason() == Some(h2::Reason::REFUSED_STREAM) => {
                let (conn, slot) = self.checkout(identity, d, &key).await?;
                open_on(conn.send, d, slot).await
            }
            // The peer has closed the pooled connection since: forget it, dial anew.
            Err(HboneError::Http(..)) => {
                self.forget(&key, &conn);
                let (conn, slot) = self.dial(identity, d, &key).await?;
                open_on(conn.send, d, slot).await
            }
            r => r,
        }
    }

    /// A stream reserved on a pooled connection with room, else on one dialled for it (once per
    /// burst, under the peer's dialling lock).
    async fn checkout(&self, identity: &Identity, d: &Dial<'_>, key: &PeerKey) -> Result<(Conn, Slot), HboneError> {
        match self.reserve(key) {
            Ok(found) => Ok(found),
            Err(dialing) => {
                let dialed = self.dial_once(identity, d, key, dialing).await;
                if dialed.is_err() {
                    self.tidy(key);
                }
                dialed
            }
        }
    }

    /// Under the peer's dialling lock: a stream on the connection whoever held the lock before
    /// made, or a new connection.
    async fn dial_once(
        &self,
        identity: &Identity,
        d: &Dial<'_>,
        key: &PeerKey,
        dialing: Arc<tokio::sync::Mutex<()>>,
    ) -> Result<(Conn, Slot), HboneError> {
        let _dialing = dialing.lock().await;
        match self.reserve(key) {
            Ok(found) => Ok(found),
            Err(_) => self.dial(identity, d, key).await,
        }
    }

    /// A new connection to the peer, pooled, with a stream reserved on it.
    async fn dial(&self, identity: &Identity, d: &Dial<'_>, key: &PeerKey) -> Result<(Conn, Slot), HboneError> {
        let ended = Arc::new(AtomicBool::new(false));
        self.stats.hbone_connections.fetch_add(1, Relaxed);
        let live = Live {
            ended: ended.clone(),
            stats: self.stats.clone(),
        };
        let usage = Arc::new(Usage::new());
        let conn = Conn {
            send: connect(identity, d, live, (usage.clone(), self.unused_release)).await?,
            usage,
            ended,
        };
        let slot = conn.reserve().expect("a new connection has room for a stream");
        let mut peers = self.peers.lock().unwrap();
        // Dialling is rare: the time to forget connections that have ended, and peers left with
        // none (pods come and go; nothing else would remove them).
        peers.retain(|_, p| {
            p.conns.retain(|c| !c.ended.load(Relaxed));
            !p.conns.is_empty() || Arc::strong_count(&p.dialing) > 1
        });
        peers.entry(key.clone()).or_default().conns.push(conn.clone());
        Ok((conn, slot))
    }

    /// A connection to `key` with a stream to spare, and that stream reserved; else the lock to
    /// take to dial one. Connections left idle beside another idle one are dropped (closing
    /// them), so a burst's extra connections do not outlive it.
    fn reserve(&self, key: &PeerKey) -> Result<(Conn, Slot), Arc<tokio::sync::Mutex<()>>> {
        let mut peers = self.peers.lock().unwrap();
        let peer = peers.entry(key.clone()).or_default();
        let mut idle_kept = false;
        peer.conns.retain(|c| {
            if c.ended.load(Relaxed) {
                return false;
            }
            let idle = c.usage.open.load(Relaxed) == 0;
            let keep = !idle || !idle_kept;
            idle_kept |= idle;
            keep
        });
        peer.conns
            .iter()
            .find_map(|c| c.reserve().map(|s| (c.clone(), s)))
            .ok_or_else(|| peer.dialing.clone())
    }

    fn forget(&self, key: &PeerKey, conn: &Conn) {
        if let Some(peer) = self.peers.lock().unwrap().get_mut(key) {
            peer.conns.retain(|c| !Arc::ptr_eq(&c.usage, &conn.usage));
        }
        self.tidy(key);
    }

    /// Drops the entry of a peer with no connection that nobody is dialling (it may be gone for
    /// good: pods come and go).
    fn tidy(&self, key: &PeerKey) {
        let mut peers = self.peers.lock().unwrap();
        if peers
            .get(key)
            .is_some_and(|p| p.conns.is_empty() && Arc::strong_count(&p.dialing) == 1)
        {
            peers.remove(key);
        }
    }

    /// Connections held, to every peer.
    pub fn len(&self) -> usize {
        self.peers.lock().unwrap().values().map(|p| p.conns.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A CONNECT on `send`'s connection; the tunnel once the peer answers 200.
async fn open_on(send: Tunnels, d: &Dial<'_>, slot: Slot) -> Result<Tunnel, HboneError> {
    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri(d.target.to_string())
        .header("forwarded", forwarded(d))
        .header("traceparent", traceparent());
    if !d.baggage.is_empty() {
        req = req.header("baggage", d.baggage);
    }
    let req = req.body(()).expect("valid CONNECT request");
    let http = |e| HboneError::Http(d.proxy, e);
    let mut send = send.ready().await.map_err(http)?;
    let (resp, stream) = send.send_request(req, false).map_err(http)?;
    let resp = resp.await.map_err(http)?;
    if resp.status() != StatusCode::OK {
        return Err(HboneError::Status(d.proxy, resp.status()));
    }
    Ok(Tunnel::new(stream, resp.into_body()).holding(slot, d.target))
}

fn forwarded(d: &Dial<'_>) -> String {
    let for_ = match d.client {
        SocketAddr::V4(a) => format!("for=\"{a}\""),
        SocketAddr::V6(a) => format!("for=\"[{}]:{}\"", a.ip(), a.port()),
    };
    match d.host {
        Some(h) => format!("{for_};host={h}"),
        None => for_,
    }
}

/// A new sampled-out trace context per tunnel, so peers can correlate their logs.
fn traceparent() -> String {
    format!("00-{:032x}-{:016x}-00", fastrand::u128(1..), fastrand::u64(1..))
}

/// A new mTLS + HTTP/2 connection to a peer proxy, whose identity is checked before any
/// tunnel is opened on it; `live` goes with the task that drives it, which closes it once it
/// has carried no tunnel for the given time.
async fn connect(
    identity: &Identity,
    d: &Dial<'_>,
    live: Live,
    (usage, release): (Arc<Usage>, Duration),
) -> Result<Tunnels, HboneError> {
    let stream = handshake(identity, d).await?;
    let (send, conn) = h2::client::Builder::new()
        // Until the peer's SETTINGS arrive h2 assumes no stream limit, and a burst of tunnels
        // let onto a new connection would open more than the peer allows (the rest refused).
        // Assume what our servers allow; the peer's SETTINGS correct it.
        .initial_max_send_streams(MAX_STREAMS as usize)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .handshake::<_, Bytes>(stream)
        .await
        .map_err(|e| HboneError::Http(d.proxy, e))?;
    tokio::spawn(drive(conn, d.proxy, (usage, release), live));
    Ok(send)
}

/// TCP and TLS to the peer proxy, both within [`HANDSHAKE_TIMEOUT`]; the peer must present the
/// identity dialled.
async fn handshake(
    identity: &Identity,
    d: &Dial<'_>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, HboneError> {
    let tls = identity.current().ok_or(HboneError::NoIdentity)?;
    let tcp = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(d.proxy))
        .await
        .map_err(|_| HboneError::Connect(d.proxy, std::io::ErrorKind::TimedOut.into()))?
        .map_err(|e| HboneError::Connect(d.proxy, e))?;
    let _ = tcp.set_nodelay(true);
    let connector = tokio_rustls::TlsConnector::from(tls.client.clone());
    let name = rustls::pki_types::ServerName::IpAddress(d.proxy.ip().into());
    let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, tcp))
        .await
        .map_err(|_| HboneError::Tls(d.proxy, "handshake timed out".into()))?
        .map_err(|e| HboneError::Tls(d.proxy, e.to_string()))?;
    let got = peer_id(stream.get_ref().1.peer_certificates());
    if got.as_ref() != Some(d.identity) {
        return Err(HboneError::WrongIdentity {
            addr: d.proxy,
            want: d.identity.clone(),
            got,
        });
    }
    Ok(stream)
}

/// Drives an HBONE connection until it ends, a keepalive ping goes unanswered, or it has carried
/// no tunnel for `release`; `live` is dropped with it.
async fn drive(
    mut conn: h2::client::Connection<tokio_rustls::client::TlsStream<TcpStream>, Bytes>,
    proxy: SocketAddr,
    (usage, release): (Arc<Usage>, Duration),
    live: Live,
) {
    let pings = conn.ping_pong();
    let keepalive = async {
        let Some(mut pings) = pings else {
            return std::future::pending().await;
        };
        loop {
            tokio::time::sleep(KEEPALIVE).await;
            match tokio::time::timeout(KEEPALIVE_TIMEOUT, pings.ping(h2::Ping::opaque())).await {
                Ok(Ok(_)) => {}
                _ => return tracing::info!(%proxy, "HBONE connection unanswered: closed"),
            }
        }
    };
    let unused = async {
        let tick = (release / 2).clamp(Duration::from_millis(100), KEEPALIVE);
        loop {
            tokio::time::sleep(tick).await;
            if usage.unused_for() >= release {
                return tracing::debug!(%proxy, "HBONE connection unused: released");
            }
        }
    };
    tokio::select! {
        r = conn => if let Err(e) = r { tracing::debug!(%proxy, error = %e, "HBONE connection ended") },
        () = keepalive => {}
        () = unused => {}
    }
    drop(live);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_names_the_client_and_the_service_host() {
        let id = SpiffeId::new("cluster.local", "a", "b");
        let d = Dial {
            proxy: "10.0.0.2:15008".parse().unwrap(),
            identity: &id,
            target: "10.0.0.2:8080".parse().unwrap(),
            client: "10.0.0.1:40000".parse().unwrap(),
            host: Some("b.ns.svc.cluster.local"),
            baggage: "",
        };
        assert_eq!(forwarded(&d), "for=\"10.0.0.1:40000\";host=b.ns.svc.cluster.local");
        let d6 = Dial {
            client: "[fd00::1]:5".parse().unwrap(),
            host: None,
            ..d
        };
        assert_eq!(forwarded(&d6), "for=\"[fd00::1]:5\"");
        let tp = traceparent();
        assert_eq!(tp.len(), 55, "{tp}");
    }
}
