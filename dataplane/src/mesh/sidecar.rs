//! Sidecar mode: the pod's captured TCP (mesh.md ports). Outbound on 15001: the original
//! destination decides — a Service VIP is load-balanced over its endpoints, a mesh workload is
//! reached over HBONE on its 15008, anything else passes through as plain TCP. HTTP to a Service
//! port with mesh routes (GAMMA) is routed request by request by the proxy the gateway uses,
//! its upstream connections tunnelled over HBONE by [`Dialer`]. Inbound: HBONE
//! on 15008 and, when the workload's policy permits plaintext, captured connections on 15006;
//! both reach the application from 127.0.0.6 (`::6` over IPv6), which the capture rules leave
//! alone. Every port listens on IPv4 and, when the host has IPv6, on IPv6 too (dual-stack pods).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::time::Duration;

use ferrum_snapshot::mesh::{MeshService, Resolution, Workload};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::watch;

use super::hbone::{self, Dial, Inbound, PROXY_PORTS, Tunnel, TunnelRequest};
use super::identity::Identity;
use super::index::{Destination, ServiceTarget};
use super::l7;
use super::peers::Calls;
use super::policy::{Connection, Decision};
use crate::dataplane::Dataplane;
use crate::listener;
use crate::proxy::ConnInfo;
use crate::router::VirtualHost;
use crate::upstream::{CONNECT_ATTEMPTS, L4Guard, L4Stream, MeshUpstreams, TunnelFuture};
use ferrum_snapshot::identity::SpiffeId;

/// The source address the proxy uses towards its own application (capture rule 1 skips it).
pub const INBOUND_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
/// Its IPv6 twin; `init-iptables` puts it on `lo` (only `::1` is local by default).
pub const INBOUND_SOURCE_V6: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

#[derive(Debug, Clone)]
pub struct Settings {
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub hbone: SocketAddr,
    /// PERMISSIVE (true) accepts plaintext on the inbound port; STRICT (false) refuses it.
    pub inbound_plaintext: bool,
    /// Inbound HTTP is served request by request, each counted (`istio_requests_total`).
    pub request_metrics: bool,
    /// The cluster the mesh runs in, for the metrics' `*_cluster` labels.
    pub cluster_id: String,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// An HBONE connection to a peer proxy that carries no tunnel this long is closed.
    pub hbone_unused_release: Duration,
    /// W3C `baggage` sent on every tunnel (who is calling).
    pub baggage: String,
}

/// Connection counts by path, and bytes, for `/metrics`.
#[derive(Debug, Default)]
pub struct MeshStats {
    pub outbound_hbone: AtomicU64,
    pub outbound_plain: AtomicU64,
    pub outbound_passthrough: AtomicU64,
    /// Refused: no known destination, and the Sidecar says REGISTRY_ONLY.
    pub outbound_blocked: AtomicU64,
    pub outbound_failed: AtomicU64,
    /// Outbound connections served as HTTP by a Service's mesh routes.
    pub outbound_routed: AtomicU64,
    pub inbound_hbone: AtomicU64,
    pub inbound_plaintext: AtomicU64,
    /// Plaintext refused (STRICT) or aimed at a proxy port.
    pub inbound_refused: AtomicU64,
    /// Denied by an AuthorizationPolicy.
    pub inbound_denied: AtomicU64,
    /// Requests refused for a JWT no RequestAuthentication accepts.
    pub inbound_unauthenticated: AtomicU64,
    /// From clients towards servers, and back.
    pub bytes_forward: AtomicU64,
    pub bytes_back: AtomicU64,
    /// Client HBONE connections open now (each carries up to the peer's stream limit).
    pub hbone_connections: AtomicU64,
    /// Inbound connections by caller (Istio's standard TCP metrics).
    pub peers: super::peers::Peers,
}

pub struct Sidecar {
    dp: Arc<Dataplane>,
    identity: Arc<Identity>,
    pool: hbone::Pool,
    settings: Settings,
    app: Arc<App>,
    /// HTTP server settings, for routed outbound and judged inbound connections alike.
    http: Arc<listener::Http>,
    draining: AtomicBool,
    /// Tells routed outbound connections to finish their requests and close.
    stop: watch::Sender<bool>,
}

/// The local application, as the inbound side reaches it, and who may.
pub struct App {
    dp: Arc<Dataplane>,
    stats: Arc<MeshStats>,
    /// This workload's certificate: who callers reach, for the metrics.
    identity: Arc<Identity>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    http: Arc<listener::Http>,
    /// Set when the proxy drains.
    stop: watch::Receiver<bool>,
    /// Inbound HTTP is always served request by request, for the request metrics.
    request_metrics: bool,
}

/// Who is on the other end of an inbound connection, and where it goes.
#[derive(Clone)]
struct Caller {
    peer: Option<SpiffeId>,
    /// Its certificate, over mTLS (HBONE).
    client_cert: Option<Arc<super::identity::PeerCert>>,
    source: IpAddr,
    destination: SocketAddr,
}

impl App {
    /// Connects to the application for inbound traffic addressed to `dst`, where the Sidecar's
    /// ingress listeners deliver it.
    async fn connect_app(&self, dst: SocketAddr) -> std::io::Result<TcpStream> {
        let target = self.dp.shared.config.load().mesh.deliver(dst);
        connect_app(target, self.connect_timeout).await
    }

    /// One inbound HTTP request: its JWT (RequestAuthentication), then a CUSTOM policy's
    /// provider, then the other AuthorizationPolicies.
    fn judge(self: &Arc<Self>, c: &Caller, request: &mut http::request::Parts) -> l7::Verdict {
        let cfg = self.dp.shared.config.load();
        let auth = match cfg.mesh.authn.authenticate(request) {
            Ok(auth) => auth,
            Err(why) => {
                self.stats.inbound_unauthenticated.fetch_add(1, Relaxed);
                let peer = c.peer.as_ref().map(|p| p.to_string());
                tracing::info!(?peer, source = %c.source, path = request.uri.path(), reason = %why, "token refused");
                return l7::Verdict::Unauthenticated;
            }
        };
        let conn = Connection {
            peer: c.peer.as_ref(),
            source: c.source,
            remote: c.source,
            destination: c.destination,
            request: Some(request),
            auth: auth.as_ref(),
        };
        if let Some(service) = cfg.mesh.inbound.asks(&conn) {
            let who = super::ext_authz::Requester {
                client: SocketAddr::new(c.source, 0),
                principal: c.peer.as_ref().map(|p| p.to_string()),
                destination: c.destination,
            };
            let (me, c) = (self.clone(), c.clone());
            let then = move |req: &mut http::request::Parts| me.verdict(&c, req, auth.as_ref());
            return l7::Verdict::Ask(Box::new(super::ext_authz::Ask {
                service,
                who,
                then: Box::new(then),
            }));
        }
        self.verdict(c, request, auth.as_ref())
    }

    fn verdict(&self, c: &Caller, request: &http::request::Parts, auth: Option<&super::jwt::Jwt>) -> l7::Verdict {
        match self.authorize(c, Some(request), auth) {
            true => l7::Verdict::Allow,
            false => l7::Verdict::Deny,
        }
    }

    /// The workload's AuthorizationPolicies on one inbound connection, or one of its requests.
    fn authorize(&self, c: &Caller, request: Option<&http::request::Parts>, auth: Option<&super::jwt::Jwt>) -> bool {
        let cfg = self.dp.shared.config.load();
        let conn = Connection {
            peer: c.peer.as_ref(),
            source: c.source,
            remote: c.source,
            destination: c.destination,
            request,
            auth,
        };
        match cfg.mesh.inbound.check(&conn) {
            Decision::Allow => true,
            Decision::Deny(why) => {
                self.stats.inbound_denied.fetch_add(1, Relaxed);
                let peer = c.peer.as_ref().map(|p| p.to_string());
                match request {
                    Some(r) => {
                        tracing::info!(?peer, source = %c.source, destination = %c.destination, method = %r.method, path = r.uri.path(), policy = %why, "request denied")
                    }
                    None => {
                        tracing::info!(?peer, source = %c.source, destination = %c.destination, policy = %why, "connection denied")
                    }
                }
                false
            }
        }
    }

    /// Whether HTTP requests to `port` must be seen, not just the connection: the policies
    /// look at request fields or JWTs, or requests are traced or counted — unless the port is
    /// declared to speak something else.
    fn per_request(&self, port: u16) -> bool {
        let cfg = self.dp.shared.config.load();
        let wanted = self.request_metrics
            || cfg.mesh.inbound.needs_http()
            || !cfg.mesh.authn.is_empty()
            || self.dp.shared.tracing.enabled();
        wanted && !cfg.mesh.opaque_inbound(port)
    }

    /// Carries an allowed-so-far inbound stream to the app: judged per request when it speaks
    /// HTTP and the policies look at requests, else once (unless already judged) and relayed.
    async fn serve<S>(self: Arc<Self>, mut s: S, app: TcpStream, c: Caller, judged: bool)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let open = self.opened(&c);
        if judged {
            return self.relay_while_allowed(s, app, &c, &open).await;
        }
        let first = l7::sniff(&mut s).await;
        let http = l7::detect(&first);
        let s = l7::Prefixed::new(first, s);
        match http {
            Some(http) => {
                let (stats, calls) = (self.stats.clone(), open.calls());
                let s = crate::tcp::Metered::new(s, move |read, written| {
                    count_bytes(&stats, Some(&open), read, written);
                });
                let me = self.clone();
                let conn = l7::Conn {
                    shared: self.dp.shared.clone(),
                    client: SocketAddr::new(c.source, 0),
                    idle: self.idle_timeout,
                    http: self.http.clone(),
                    stop: self.stop.clone(),
                    app: self.dp.shared.config.load().mesh.deliver(c.destination),
                    connect_timeout: self.connect_timeout,
                    calls,
                    client_cert: self.xfcc(&c),
                };
                l7::serve(s, http, app, move |parts| me.judge(&c, parts), conn).await;
            }
            None if self.authorize(&c, None, None) => self.relay_while_allowed(s, app, &c, &open).await,
            None => {}
        }
    }

    /// Counts a connection from `c` to this workload, by caller (its bytes when it ends).
    fn opened(&self, c: &Caller) -> super::peers::Open {
        let cfg = self.dp.shared.config.load();
        let workload = cfg.mesh.workload(c.source).cloned();
        self.stats
            .peers
            .inbound(workload, c.peer.clone(), cfg.snapshot.version, || self.own(&cfg))
    }

    /// What the app is told of an mTLS caller's certificate (`x-forwarded-client-cert`), as
    /// Istio's sidecars tell it.
    fn xfcc(&self, c: &Caller) -> Option<http::HeaderValue> {
        let by = self.identity.current()?.svid.id.clone();
        http::HeaderValue::try_from(c.client_cert.as_ref()?.xfcc(&by)).ok()
    }

    /// This workload, as the snapshot and its certificate say it, for the metrics.
    fn own(&self, cfg: &crate::compile::Compiled) -> super::peers::Party {
        let principal = self.identity.current().map(|t| t.svid.id.clone());
        super::peers::Party::of(cfg.mesh.own.as_ref(), principal.as_ref())
    }

    /// Relays a connection judged once, at L4, until either side closes — or until a new
    /// snapshot's policies deny its caller: then it is closed (as ztunnel does), so a policy
    /// change reaches connections that were open before it, pooled keep-alives included.
    async fn relay_while_allowed<S>(&self, s: S, app: TcpStream, c: &Caller, open: &super::peers::Open)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut changes = self.dp.changes();
        changes.mark_unchanged();
        let revoked = async {
            while changes.changed().await.is_ok() {
                if !self.authorize(c, None, None) {
                    return;
                }
            }
            std::future::pending().await
        };
        tokio::select! {
            _ = relay(s, app, self.idle_timeout, &self.stats, Some(open)) => {}
            () = revoked => {
                tracing::info!(peer = ?c.peer.as_ref().map(|p| p.to_string()), source = %c.source, destination = %c.destination, "open connection closed: the policies now deny it");
            }
        }
    }
}

impl Inbound for App {
    fn allow(&self, req: &TunnelRequest) -> bool {
        // Policies that look at requests decide per request, once the tunnel shows HTTP.
        self.per_request(req.target.port()) || self.authorize(&caller(req), None, None)
    }

    async fn connect(&self, target: SocketAddr) -> std::io::Result<TcpStream> {
        self.connect_app(target).await
    }

    async fn relay(self: Arc<Self>, tunnel: Tunnel, app: TcpStream, req: TunnelRequest) {
        self.stats.inbound_hbone.fetch_add(1, Relaxed);
        let judged = !self.per_request(req.target.port());
        self.serve(tunnel, app, caller(&req), judged).await;
        tracing::debug!(peer = %req.peer.id, "inbound tunnel closed");
    }
}

fn caller(req: &TunnelRequest) -> Caller {
    Caller {
        peer: Some(req.peer.id.clone()),
        client_cert: Some(req.peer.clone()),
        source: req.source.ip(),
        destination: req.target,
    }
}

/// Connects to the application in this pod from [`INBOUND_SOURCE`] or [`INBOUND_SOURCE_V6`].
pub(super) async fn connect_app(target: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let (s, source) = match target.ip() {
        IpAddr::V4(_) => (TcpSocket::new_v4()?, IpAddr::from(INBOUND_SOURCE)),
        IpAddr::V6(_) => (TcpSocket::new_v6()?, IpAddr::from(INBOUND_SOURCE_V6)),
    };
    s.bind(SocketAddr::new(source, 0)).map_err(|e| {
        // Without it the connection would be captured back into the proxy.
        std::io::Error::new(
            e.kind(),
            format!("binding {source} (init-iptables puts ::6 on lo): {e}"),
        )
    })?;
    let s = tokio::time::timeout(timeout, s.connect(target))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Relays `a` (the client) and `b` until both are done, counting the bytes — by caller too, for
/// an inbound connection (`open`).
async fn relay<A, B>(
    a: A,
    b: B,
    idle: Duration,
    stats: &MeshStats,
    open: Option<&super::peers::Open>,
) -> Result<crate::tcp::Relayed, crate::tcp::RelayError>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let r = crate::tcp::relay(a, b, idle).await;
    if let Ok(n) = &r {
        count_bytes(stats, open, n.forward, n.back);
    }
    r
}

/// Bytes a sidecar connection carried from its client (`forward`) and back.
fn count_bytes(stats: &MeshStats, open: Option<&super::peers::Open>, forward: u64, back: u64) {
    stats.bytes_forward.fetch_add(forward, Relaxed);
    stats.bytes_back.fetch_add(back, Relaxed);
    if let Some(open) = open {
        open.bytes(forward, back);
    }
}

/// The destination a capture rule redirected this connection from.
pub fn original_dst(s: &TcpStream) -> std::io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(s);
    let addr = match s.local_addr()? {
        SocketAddr::V4(_) => sock.original_dst_v4()?,
        SocketAddr::V6(_) => sock.original_dst_v6()?,
    };
    addr.as_socket()
        .ok_or_else(|| std::io::Error::other("original destination is not an IP address"))
}

impl Sidecar {
    pub fn new(dp: Arc<Dataplane>, identity: Arc<Identity>, settings: Settings) -> Arc<Sidecar> {
        let stats = dp.shared.registry.mesh.clone();
        stats.peers.set_cluster(settings.cluster_id.clone());
        let http = Arc::new(listener::Http::new(&dp.shared.limits));
        let stop = watch::channel(false).0;
        let sidecar = Arc::new(Sidecar {
            app: Arc::new(App {
                dp: dp.clone(),
                stats: stats.clone(),
                identity: identity.clone(),
                connect_timeout: settings.connect_timeout,
                idle_timeout: settings.idle_timeout,
                http: http.clone(),
                stop: stop.subscribe(),
                request_metrics: settings.request_metrics,
            }),
            http,
            stop,
            dp,
            identity,
            pool: hbone::Pool::new(stats, settings.hbone_unused_release),
            settings,
            draining: AtomicBool::new(false),
        });
        sidecar.dp.set_mesh(Arc::new(Dialer {
            sidecar: Arc::downgrade(&sidecar),
            counts: sidecar.settings.request_metrics,
        }));
        sidecar
    }

    /// Binds the three ports on every worker (SO_REUSEPORT), on both families, and serves them.
    pub fn start(self: &Arc<Self>, workers: &[Handle]) -> std::io::Result<()> {
        let s = &self.settings;
        for (addr, kind) in [
            (s.outbound, Kind::Outbound),
            (s.inbound, Kind::Inbound),
            (s.hbone, Kind::Hbone),
        ] {
            for w in workers {
                for std in listener::bind_dual_stack(addr)? {
                    let me = self.clone();
                    w.spawn(async move {
                        let Ok(l) = TcpListener::from_std(std) else { return };
                        me.accept(l, kind).await
                    });
                }
            }
        }
        tracing::info!(outbound = %s.outbound, inbound = %s.inbound, hbone = %s.hbone, ipv6 = listener::has_ipv6(), "sidecar listening");
        Ok(())
    }

    /// Stops accepting (open connections finish on their own).
    pub fn drain(&self) {
        self.draining.store(true, Relaxed);
        let _ = self.stop.send(true);
    }

    async fn accept(self: Arc<Self>, l: TcpListener, kind: Kind) {
        loop {
            let Ok((tcp, peer)) = l.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            if self.draining.load(Relaxed) {
                return;
            }
            let me = self.clone();
            tokio::spawn(async move {
                match kind {
                    Kind::Outbound => me.outbound(tcp, peer).await,
                    Kind::Inbound => me.inbound(tcp, peer).await,
                    Kind::Hbone => hbone::serve(tcp, &me.identity, me.app.clone()).await,
                }
            });
        }
    }

    /// Whether plaintext may reach the app on `port`: the workload's PeerAuthentication (STRICT
    /// refuses), else `--inbound-plaintext`.
    fn plaintext_allowed(&self, port: u16) -> bool {
        use ferrum_snapshot::mesh::{MtlsMode, PolicyRule, mtls_mode};
        let cfg = self.dp.shared.config.load();
        let policies = &cfg.snapshot.policies;
        let said = cfg.mesh.own.as_ref().and_then(|w| {
            let any = policies
                .iter()
                .any(|p| matches!(p.rule, PolicyRule::PeerAuthentication(_)) && p.applies_to(w));
            any.then(|| mtls_mode(policies, w, port))
        });
        match said {
            Some(m) => m != MtlsMode::Strict,
            None => self.settings.inbound_plaintext,
        }
    }

    async fn inbound(&self, tcp: TcpStream, peer: SocketAddr) {
        let stats = &self.app.stats;
        let Ok(dst) = original_dst(&tcp) else { return };
        if !self.plaintext_allowed(dst.port()) || PROXY_PORTS.contains(&dst.port()) {
            stats.inbound_refused.fetch_add(1, Relaxed);
            return tracing::debug!(%peer, %dst, "plaintext inbound refused");
        }
        let c = Caller {
            peer: None,
            client_cert: None,
            source: peer.ip(),
            destination: dst,
        };
        let judged = !self.app.per_request(dst.port());
        if judged && !self.app.authorize(&c, None, None) {
            return;
        }
        let _ = tcp.set_nodelay(true);
        match self.app.connect_app(dst).await {
            Ok(app) => {
                stats.inbound_plaintext.fetch_add(1, Relaxed);
                self.app.clone().serve(tcp, app, c, judged).await;
            }
            Err(e) => tracing::debug!(%dst, error = %e, "application unreachable"),
        }
    }

    async fn outbound(&self, mut tcp: TcpStream, peer: SocketAddr) {
        let Ok(dst) = original_dst(&tcp) else { return };
        if dst.port() == self.settings.outbound.port() && tcp.local_addr().is_ok_and(|l| l == dst) {
            // Not captured: someone dialled the proxy port itself.
            return;
        }
        let _ = tcp.set_nodelay(true);
        let (routed, h2_at_l4, by_host) = {
            let cfg = self.dp.shared.config.load();
            (
                cfg.mesh.http(dst).is_some(),
                cfg.mesh.h2_at_l4(dst),
                cfg.mesh.by_host_on(dst),
            )
        };
        if by_host {
            return self.outbound_by_host(tcp, peer, dst).await;
        }
        if !routed {
            return self.outbound_l4(tcp, peer, dst).await;
        }
        let first = l7::sniff(&mut tcp).await;
        let http = l7::detect(&first);
        let s = l7::Prefixed::new(first, tcp);
        match http {
            // HTTP/2 that a route would send on as HTTP/1.1 (perhaps gRPC, which needs HTTP/2
            // upstream too) is balanced as before.
            Some(listener::HttpVersion::Two) if h2_at_l4 => self.outbound_l4(s, peer, dst).await,
            Some(http) => self.outbound_routed(s, http, peer, dst).await,
            // Routes are for HTTP; anything else to the Service is balanced as before.
            None => self.outbound_l4(s, peer, dst).await,
        }
    }

    /// Serves captured HTTP by the mesh routes of its original destination, like a listener.
    async fn outbound_routed(
        &self,
        s: l7::Prefixed<TcpStream>,
        http: listener::HttpVersion,
        peer: SocketAddr,
        dst: SocketAddr,
    ) {
        self.app.stats.outbound_routed.fetch_add(1, Relaxed);
        let info = ConnInfo::direct(dst, peer);
        let shared = self.dp.shared.clone();
        listener::serve(TokioIo::new(s), http, info, shared, &self.http, self.stop.subscribe()).await
    }

    /// A connection to an address the mesh does not know, on a port where services are known by
    /// host only (ServiceEntries without addresses): the TLS SNI or HTTP `Host` it asks for picks
    /// the service; anything else goes on by its address.
    async fn outbound_by_host(&self, mut tcp: TcpStream, peer: SocketAddr, dst: SocketAddr) {
        let Ok((host, seen)) = l7::requested_host(&mut tcp).await else {
            self.app.stats.outbound_failed.fetch_add(1, Relaxed);
            return;
        };
        let http = l7::detect(&seen);
        let s = l7::Prefixed::new(seen, tcp);
        let cfg = self.dp.shared.config.load_full();
        let Some(t) = host.as_deref().and_then(|h| cfg.mesh.by_host(dst.port(), h)) else {
            drop(cfg);
            return self.outbound_l4(s, peer, dst).await;
        };
        if let (Some(http), Some(_)) = (http, &t.http) {
            drop(cfg);
            return self.outbound_routed(s, http, peer, dst).await;
        }
        let up = match t.service.resolution {
            Resolution::Passthrough => self.connect(dst, None, peer, None).await.ok(),
            Resolution::Endpoints | Resolution::Dns => self.connect_service(t, dst, peer).await,
        };
        let service = t.service.clone();
        drop(cfg);
        self.relay_to(s, up, self.settings.idle_timeout, Some(service)).await;
    }

    /// Relays a captured outbound stream to where its original destination leads.
    async fn outbound_l4<S>(&self, tcp: S, peer: SocketAddr, dst: SocketAddr)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let stats = &self.app.stats;
        let cfg = self.dp.shared.config.load_full();
        // Held (a circuit-breaker slot of the route's cluster) while the connection lasts.
        let mut held = None;
        let destination = cfg.mesh.destination(dst);
        let service = match &destination {
            Destination::Service(t) => Some(t.service.clone()),
            _ => None,
        };
        let up = match destination {
            Destination::Service(t) => match &t.tcp {
                Some(route) => self.connect_routed(route, dst, peer).await.map(|(s, guard)| {
                    held = Some(guard);
                    s
                }),
                None => self.connect_service(t, dst, peer).await,
            },
            Destination::Workload(w) => self.connect(dst, Some(w), peer, None).await.ok(),
            Destination::Passthrough => self.connect(dst, None, peer, None).await.ok(),
            Destination::Blocked => {
                stats.outbound_blocked.fetch_add(1, Relaxed);
                tracing::debug!(%dst, "outbound refused: not in the registry (REGISTRY_ONLY)");
                return;
            }
        };
        drop(cfg);
        let idle = held
            .as_ref()
            .map_or(self.settings.idle_timeout, |g| g.tcp_idle(self.settings.idle_timeout));
        self.relay_to(tcp, up, idle, service).await;
        drop(held);
    }

    /// A stream to a cluster of a Service port's L4 route (VirtualService `tcp`), picked by
    /// weight; `None` when the pick does not resolve or no endpoint of it answers.
    async fn connect_routed(&self, vh: &VirtualHost, dst: SocketAddr, peer: SocketAddr) -> Option<(L4Stream, L4Guard)> {
        let route = vh.first_route()?;
        let Some(cluster) = route.action.pick().and_then(|t| t.cluster.as_ref()) else {
            tracing::info!(%dst, route = %route.name, "no backend: the route's pick does not resolve");
            return None;
        };
        match cluster.connect_l4(peer.ip()).await {
            Ok(up) => {
                self.app.stats.outbound_routed.fetch_add(1, Relaxed);
                Some(up)
            }
            Err(e) => {
                tracing::info!(%dst, route = %route.name, cluster = %cluster.spec.name, error = e.as_str(), "no endpoint reachable");
                None
            }
        }
    }

    /// Relays `tcp` to `up` until both ends close or it stays quiet for `idle`, or counts the
    /// failure to get one.
    async fn relay_to<S>(&self, tcp: S, up: Option<L4Stream>, idle: Duration, service: Option<Arc<MeshService>>)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let stats = &self.app.stats;
        let Some(up) = up else {
            stats.outbound_failed.fetch_add(1, Relaxed);
            return;
        };
        let open = self.opened(&up, service);
        let _ = relay(tcp, up, idle, stats, Some(&open)).await;
    }

    /// Counts a connection from this workload to what `up` reaches, by `service`.
    fn opened(&self, up: &L4Stream, service: Option<Arc<MeshService>>) -> super::peers::Open {
        let cfg = self.dp.shared.config.load();
        let workload = up.peer().and_then(|a| cfg.mesh.workload(a.ip()).cloned());
        // An HBONE tunnel checked the peer's identity before a byte went.
        let principal = match (up, &workload, self.identity.current()) {
            (L4Stream::Tunnel(_), Some(w), Some(t)) => Some(w.identity(&t.svid.id.trust_domain)),
            _ => None,
        };
        let own = || self.app.own(&cfg);
        let calls = (self.app.stats.peers).calls_to(workload, principal, service, cfg.snapshot.version, own);
        calls.opened()
    }

    /// Where this workload's routed calls to the Service at `requested` are counted: by the
    /// Service whose `cluster` answered (else the one requested), and the workload at `endpoint`
    /// with the identity its tunnel checked.
    fn calls_to(&self, requested: SocketAddr, cluster: Option<&str>, endpoint: Option<SocketAddr>) -> Calls {
        let cfg = self.dp.shared.config.load();
        let key = cluster.and_then(ferrum_snapshot::mesh::cluster_service_key);
        let answered = key.and_then(|k| cfg.snapshot.services.iter().find(|s| s.key == k));
        let service = answered.or_else(|| cfg.mesh.service(requested)).cloned();
        let workload = endpoint.and_then(|a| cfg.mesh.workload(a.ip())).cloned();
        let principal = match (&workload, self.identity.current()) {
            (Some(w), Some(t)) if w.hbone => Some(w.identity(&t.svid.id.trust_domain)),
            _ => None,
        };
        let own = || self.app.own(&cfg);
        (self.app.stats.peers).calls_to(workload, principal, service, cfg.snapshot.version, own)
    }

    /// A stream to one of a service's endpoints, trying the next ones when a connect fails.
    async fn connect_service(&self, t: &ServiceTarget, dst: SocketAddr, peer: SocketAddr) -> Option<L4Stream> {
        let mut last = None;
        for attempt in 0..CONNECT_ATTEMPTS.min(t.endpoints.len().max(t.names.len())) {
            let got = match (t.pick(attempt), t.pick_name(attempt)) {
                (Some((addr, w)), _) => self.connect(*addr, w.as_deref(), peer, Some(&t.service.hostname)).await,
                (None, Some((name, port))) => self.connect_name(name, *port).await,
                (None, None) => break,
            };
            match got {
                Ok(s) => return Some(s),
                Err(e) => last = Some(e),
            }
        }
        tracing::info!(%dst, service = %t.service.key, error = ?last.map(|e| e.to_string()), "no endpoint reachable");
        None
    }

    /// Plain TCP to a DNS-resolved endpoint (outside the mesh): every address the name has is
    /// tried, within the connect timeout.
    async fn connect_name(&self, name: &str, port: u16) -> Result<L4Stream, Box<dyn std::error::Error + Send + Sync>> {
        let t = tokio::time::timeout(self.settings.connect_timeout, TcpStream::connect((name, port)))
            .await
            .map_err(|_| "connect timed out")??;
        let _ = t.set_nodelay(true);
        self.app.stats.outbound_passthrough.fetch_add(1, Relaxed);
        Ok(L4Stream::Tcp(t))
    }

    /// A stream to `addr`: over HBONE when the workload there has a mesh proxy, else plain TCP.
    async fn connect(
        &self,
        addr: SocketAddr,
        w: Option<&Workload>,
        client: SocketAddr,
        host: Option<&str>,
    ) -> Result<L4Stream, Box<dyn std::error::Error + Send + Sync>> {
        let stats = &self.app.stats;
        match w.filter(|w| w.hbone) {
            Some(w) => Ok(L4Stream::Tunnel(self.tunnel(addr, w, client, host).await?)),
            None => {
                let t = tokio::time::timeout(self.settings.connect_timeout, TcpStream::connect(addr))
                    .await
                    .map_err(|_| "connect timed out")??;
                let _ = t.set_nodelay(true);
                let counter = if w.is_some() {
                    &stats.outbound_plain
                } else {
                    &stats.outbound_passthrough
                };
                counter.fetch_add(1, Relaxed);
                Ok(L4Stream::Tcp(t))
            }
        }
    }

    /// An HBONE tunnel to `addr`, served by `w`'s proxy.
    async fn tunnel(
        &self,
        addr: SocketAddr,
        w: &Workload,
        client: SocketAddr,
        host: Option<&str>,
    ) -> Result<Tunnel, Box<dyn std::error::Error + Send + Sync>> {
        let td = self
            .identity
            .current()
            .map(|t| t.svid.id.trust_domain.clone())
            .ok_or(hbone::HboneError::NoIdentity)?;
        let id = w.identity(&td);
        let dial = Dial {
            proxy: SocketAddr::new(addr.ip(), hbone::HBONE_PORT),
            identity: &id,
            target: addr,
            client,
            host,
            baggage: &self.settings.baggage,
        };
        let t = tokio::time::timeout(self.settings.connect_timeout, self.pool.open(&self.identity, &dial))
            .await
            .map_err(|_| "HBONE connect timed out")??;
        self.app.stats.outbound_hbone.fetch_add(1, Relaxed);
        Ok(t)
    }

    pub fn identity(&self) -> &Arc<Identity> {
        &self.identity
    }
}

/// Opens the routed proxy's upstream connections to mesh workloads as HBONE tunnels, and says
/// who they reach for the request metrics.
struct Dialer {
    sidecar: Weak<Sidecar>,
    /// Routed requests are counted as this workload's calls.
    counts: bool,
}

impl MeshUpstreams for Dialer {
    fn counts_calls(&self) -> bool {
        self.counts
    }

    fn callee(&self, requested: SocketAddr, cluster: Option<&str>, endpoint: Option<SocketAddr>) -> Option<Calls> {
        Some(self.sidecar.upgrade()?.calls_to(requested, cluster, endpoint))
    }

    fn dial(&self, addr: SocketAddr) -> Option<TunnelFuture> {
        let sidecar = self.sidecar.upgrade()?;
        let (w, me) = {
            let cfg = sidecar.dp.shared.config.load();
            let w = cfg.mesh.workload(addr.ip()).filter(|w| w.hbone)?.clone();
            let me = cfg.mesh.own.as_ref().and_then(|o| o.ips.first()?.parse().ok());
            (w, me)
        };
        // `forwarded: for=` names this pod: the request's own client is in its headers.
        let client = SocketAddr::new(me.unwrap_or(Ipv4Addr::UNSPECIFIED.into()), 0);
        Some(Box::pin(async move { sidecar.tunnel(addr, &w, client, None).await }))
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Outbound,
    Inbound,
    Hbone,
}
