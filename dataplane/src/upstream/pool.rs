//! The connection pool of one cluster on one worker. An HTTP/1.1 connection is lent to one
//! request at a time and comes back when that request's response body has ended (it is driven
//! by the request's own task: [`super::h1`]); an HTTP/2 connection is shared by every request
//! to its endpoint. Connections are opened on demand by
//! the cluster's connector (TCP, TLS or a mesh tunnel), and close after `idle` without a request.
//!
//! Why not hyper-util's pooling client: it hashes a pool key and takes a shared lock on every
//! checkout and return, and spawns a task per HTTP/1.1 request to wait for the connection to
//! become idle again. Here the pool is the worker's own, indexed by endpoint, and the response
//! body gives the connection back when it ends.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use ferrum_snapshot::model::{Cluster, UpstreamProtocol};
use http::uri::{Authority, Scheme};
use http::{Method, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::client::legacy::connect::Connection;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::Notify;
use tower_service::Service;

use super::body::RequestBody;
use super::connector::{BoxError, Connector};
use super::h1;
use super::now_ms;

/// How often at most the sweeper looks at idle connections, as HAProxy's `pool-purge-delay`.
const PURGE_PERIOD_MS: u64 = 5_000;

/// Why a request got no response from the pool.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// No connection could be opened (refused, timed out, TLS or tunnel failure, connection
    /// limit): nothing reached the endpoint.
    #[error("connect: {0}")]
    Connect(#[source] BoxError),
    /// The connection failed after the request was handed to it.
    #[error(transparent)]
    Http(#[from] hyper::Error),
    #[error(transparent)]
    Http1(#[from] h1::Error),
}

impl PoolError {
    pub fn is_connect(&self) -> bool {
        matches!(self, PoolError::Connect(_))
    }
}

/// One endpoint's connections on this worker.
#[derive(Default)]
struct Idle {
    /// Idle HTTP/1.1 connections (most recently used last), and the shared HTTP/2 connection.
    conns: Mutex<Vec<Conn>>,
    /// The fewest idle HTTP/1.1 connections there were at once since the sweeper last looked:
    /// that many sat unused through the whole period. Written under `conns`' lock.
    fewest: AtomicUsize,
    /// An HTTP/2 connection is being opened: requests that find none wait for it.
    opening: AtomicBool,
    opened: Notify,
}

/// Clears `opening` however opening ends (done, failed, or the request gone).
struct Opening<'a>(&'a Idle);

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        self.0.opening.store(false, Relaxed);
        self.0.opened.notify_waiters();
    }
}

pub struct Pool {
    connector: Connector,
    scheme: Scheme,
    /// Indexed like the cluster's endpoints.
    idle: Box<[Idle]>,
    http2_only: bool,
    idle_ms: u64,
    /// Requests one connection serves before it is closed (Istio's `maxRequestsPerConnection`).
    max_per_conn: u32,
    /// How long a connection takes new requests after it opened (`u64::MAX`: for ever).
    max_conn_ms: u64,
    /// Streams at once on an HTTP/2 connection, at most (below the peer's limit).
    max_streams: usize,
    /// A sweeper task closes idle connections; it runs while the pool holds any.
    sweeping: AtomicBool,
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
}

enum Sender {
    Http1(Box<h1::Connection>),
    /// An HTTP/1.1 connection out with a request.
    Lent,
    /// Shared: its requests in flight and when the last ended tell when it is idle.
    Http2(http2::SendRequest<RequestBody>, Arc<Streams>),
}

struct Conn {
    send: Sender,
    /// When an HTTP/1.1 connection came back to the pool.
    since_ms: u64,
    /// Served a request before: a request it fails to start may be retried on another.
    reused: bool,
    /// Requests an HTTP/1.1 connection has been lent to.
    served: u32,
    /// When an HTTP/1.1 connection stops taking requests (`u64::MAX`: never).
    retire_at_ms: u64,
}

impl Conn {
    /// An open HTTP/2 connection below the peer's stream limit.
    fn http2_room(&self) -> bool {
        matches!(&self.send, Sender::Http2(s, streams)
            if !s.is_closed()
                && !streams.used_up()
                && (streams.in_flight.load(Relaxed) as usize) < streams.limit.load(Relaxed))
    }

    /// Closed by the peer, idle for `idle_ms`, or past its duration: the sweeper drops it,
    /// which closes it.
    fn expired(&self, now: u64, idle_ms: u64) -> bool {
        match &self.send {
            Sender::Http1(_) => now.saturating_sub(self.since_ms) >= idle_ms || now >= self.retire_at_ms,
            Sender::Lent => true,
            Sender::Http2(s, streams) => {
                let idle_since = streams.idle_since_ms();
                s.is_closed()
                    || idle_since.is_some_and(|t| now.saturating_sub(t) >= idle_ms)
                    // Served all it may: closed once its last stream is done.
                    || (idle_since.is_some() && streams.used_up())
            }
        }
    }
}

/// An open HTTP/2 connection among `idle` that can take another stream now, that stream
/// counted; `None` when each is at the peer's stream limit (another connection is opened then,
/// rather than queueing streams that may be long-lived behind the limit).
fn http2_with_room(idle: &[Conn]) -> Option<Conn> {
    idle.iter().rev().find_map(|c| match &c.send {
        Sender::Http2(s, streams) if !s.is_closed() && streams.try_start() => Some(Conn {
            send: Sender::Http2(s.clone(), streams.clone()),
            since_ms: 0,
            reused: true,
            served: 0,
            retire_at_ms: u64::MAX,
        }),
        _ => None,
    })
}

/// Requests in flight on one HTTP/2 connection, when the last one ended, how many the peer
/// allows at once (its `SETTINGS_MAX_CONCURRENT_STREAMS`, kept current by [`drive_http2`]), and
/// how many more it may start in all.
struct Streams {
    in_flight: AtomicU32,
    last_ms: AtomicU64,
    limit: AtomicUsize,
    left: AtomicU32,
    /// When it stops taking streams (`u64::MAX`: never).
    retire_at_ms: u64,
    /// The cluster's own cap on `limit` (`maxConcurrentStreams`).
    cap: usize,
}

impl Streams {
    fn new(max_per_conn: u32, retire_at_ms: u64, cap: usize) -> Self {
        Streams {
            in_flight: AtomicU32::new(0),
            last_ms: AtomicU64::new(0),
            // hyper's assumption until the peer's SETTINGS arrive.
            limit: AtomicUsize::new(cap.min(100)),
            left: AtomicU32::new(max_per_conn),
            retire_at_ms,
            cap,
        }
    }

    /// Counts one more request in flight if the peer allows `limit` streams and fewer are open,
    /// and the connection has not served all it may.
    fn try_start(&self) -> bool {
        let limit = u32::try_from(self.limit.load(Relaxed)).unwrap_or(u32::MAX);
        if self.used_up() {
            return false;
        }
        let started = self
            .in_flight
            .fetch_update(Relaxed, Relaxed, |n| (n < limit).then_some(n + 1))
            .is_ok();
        if started && self.left.fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1)).is_err() {
            // Another request took the last one meanwhile.
            self.in_flight.fetch_sub(1, Relaxed);
            return false;
        }
        started
    }

    /// Started all the streams it may, or lived as long as it may.
    fn used_up(&self) -> bool {
        self.left.load(Relaxed) == 0 || (self.retire_at_ms != u64::MAX && now_ms() >= self.retire_at_ms)
    }

    fn end(&self) {
        self.last_ms.store(now_ms(), Relaxed);
        self.in_flight.fetch_sub(1, Relaxed);
    }

    /// When the connection became idle, or `None` while it serves a request.
    fn idle_since_ms(&self) -> Option<u64> {
        (self.in_flight.load(Relaxed) == 0).then(|| self.last_ms.load(Relaxed))
    }
}

/// One request's hold on its connection, kept by its response body until the body ends: an
/// HTTP/1.1 connection then goes back to the pool, an HTTP/2 stream stops counting. Dropped
/// before the end, the connection is not reused (the rest of the response is still on the wire).
pub struct Lease {
    conn: Option<Conn>,
    streams: Option<Arc<Streams>>,
    pool: Arc<Pool>,
    ep: usize,
}

impl Lease {
    /// The response body has ended: the connection is free for the next request.
    pub fn finish(&mut self) {
        self.give_back(None);
    }

    /// [`Lease::finish`] for an HTTP/1.1 connection of ours, `conn` (`None`: not reusable).
    fn give_back(&mut self, conn: Option<Box<h1::Connection>>) {
        if let Some(s) = self.streams.take() {
            s.end();
        }
        // One that has served all it may, or lived as long as it may, is dropped, which closes it.
        let live =
            |c: &Conn| c.served < self.pool.max_per_conn && (c.retire_at_ms == u64::MAX || now_ms() < c.retire_at_ms);
        let Some(mut c) = self.conn.take().filter(live) else {
            return;
        };
        if matches!(c.send, Sender::Lent) {
            match conn {
                Some(h) => c.send = Sender::Http1(h),
                None => return,
            }
        }
        {
            c.since_ms = now_ms();
            lock(&self.pool.idle[self.ep]).push(c);
            self.pool.sweep();
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(s) = self.streams.take() {
            s.end();
        }
    }
}

fn lock(idle: &Idle) -> std::sync::MutexGuard<'_, Vec<Conn>> {
    idle.conns.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Pool {
    pub fn new(c: &Cluster, connector: Connector, scheme: Scheme, endpoints: usize) -> Pool {
        let mut h1 = http1::Builder::new();
        h1.max_buf_size(crate::limits::MAX_HEADER_BYTES);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .adaptive_window(true)
            .max_header_list_size(crate::limits::MAX_HEADER_BYTES as u32);
        Pool {
            connector,
            scheme,
            idle: (0..endpoints).map(|_| Idle::default()).collect(),
            http2_only: c.protocol == UpstreamProtocol::Http2,
            idle_ms: c.timeouts.idle_ms,
            max_per_conn: c.circuit_breaker.max_requests_per_connection.unwrap_or(u32::MAX).max(1),
            max_conn_ms: c.timeouts.max_connection_duration_ms.unwrap_or(u64::MAX),
            max_streams: c
                .circuit_breaker
                .max_concurrent_streams
                .map_or(usize::MAX, |n| n.max(1) as usize),
            sweeping: AtomicBool::new(false),
            h1,
            h2,
        }
    }

    /// Sends `req` (origin-form URI, `Host` set) to endpoint `ep` on an idle connection, else a
    /// new one. A request that a reused connection closed before taking is sent again, as the
    /// connection had merely timed out while idle.
    pub async fn send(
        self: &Arc<Self>,
        ep: usize,
        authority: &Authority,
        mut req: Request<RequestBody>,
    ) -> Result<Response<UpstreamBody>, PoolError> {
        loop {
            let mut conn = match self.checkout(ep) {
                Some(c) => c,
                // Boxed: opening a connection is the slow path, and its state (connector, TLS,
                // handshakes) would make every request's future kilobytes larger to move.
                None => Box::pin(self.open(ep, authority)).await?,
            };
            let reused = conn.reused;
            conn.reused = true;
            conn.served += 1;
            let (mut s, streams) = match std::mem::replace(&mut conn.send, Sender::Lent) {
                Sender::Http1(h) if hands_over(&req) => {
                    // Boxed: the slow path, as opening is.
                    return Box::pin(self.hand_over(h, req, authority, self.lease(ep, None))).await;
                }
                Sender::Http1(h) => {
                    let resp = h.send(req).await?;
                    // Lent to this request until its response body ends, which gives it back.
                    let home = self.lease(ep, Some(conn));
                    return Ok(resp.map(|b| UpstreamBody::new(Inner::Http1(b), home)));
                }
                Sender::Http2(s, streams) => (s, streams),
                Sender::Lent => unreachable!("a lent connection is not in the pool"),
            };
            // Its stream was counted when it was checked out.
            let mut lease = self.lease(ep, None);
            lease.streams = Some(streams);
            self.absolute(&mut req, authority);
            match s.try_send_request(req).await {
                Ok(resp) => return Ok(resp.map(|b| UpstreamBody::new(Inner::Hyper(b), lease))),
                Err(mut e) => match e.take_message() {
                    Some(r) if reused => req = r,
                    _ => return Err(PoolError::Http(e.into_error())),
                },
            }
        }
    }

    fn lease(self: &Arc<Self>, ep: usize, conn: Option<Conn>) -> Lease {
        Lease {
            conn,
            streams: None,
            pool: self.clone(),
            ep,
        }
    }

    /// An upgrade (or CONNECT): hyper takes the connection over, and its answer, a 101 (or
    /// 2xx), hands the connection to the tunnel. The connection is never pooled again.
    async fn hand_over(
        &self,
        conn: Box<h1::Connection>,
        mut req: Request<RequestBody>,
        authority: &Authority,
        lease: Lease,
    ) -> Result<Response<UpstreamBody>, PoolError> {
        let io = conn
            .into_io()
            .ok_or(h1::Error::Invalid("bytes unasked for on an idle connection"))?;
        let (mut send, conn) = self.h1.handshake(io).await?;
        tokio::spawn(drive(conn.with_upgrades()));
        if req.method() == Method::CONNECT {
            *req.uri_mut() = Uri::from(authority.clone());
        }
        let resp = send.send_request(req).await?;
        Ok(resp.map(|b| UpstreamBody::new(Inner::Hyper(b), lease)))
    }

    /// A pooled connection to `ep` that can take a request now.
    fn checkout(&self, ep: usize) -> Option<Conn> {
        let slot = &self.idle[ep];
        loop {
            let mut conn = {
                let mut idle = lock(slot);
                match idle.last() {
                    None => return None,
                    Some(Conn {
                        send: Sender::Http2(..),
                        ..
                    }) => return http2_with_room(&idle),
                    Some(_) => {
                        let conn = idle.pop()?;
                        if idle.len() < slot.fewest.load(Relaxed) {
                            slot.fewest.store(idle.len(), Relaxed);
                        }
                        conn
                    }
                }
            };
            if conn.retire_at_ms != u64::MAX && now_ms() >= conn.retire_at_ms {
                // Lived as long as it may: dropped, which closes it.
                continue;
            }
            // One the upstream closed while idle is dropped; a request sent on it would fail.
            if let Sender::Http1(h) = &mut conn.send
                && !h.closed()
            {
                return Some(conn);
            }
        }
    }

    /// A new connection; for HTTP/2, the one another request is opening when there is one, so
    /// a burst of first requests shares one connection instead of opening one each.
    async fn open(self: &Arc<Self>, ep: usize, authority: &Authority) -> Result<Conn, PoolError> {
        if !self.http2_only {
            return self.connect(ep, authority).await;
        }
        let slot = &self.idle[ep];
        while slot.opening.swap(true, Relaxed) {
            let opened = slot.opened.notified();
            if slot.opening.load(Relaxed) {
                // Ends: the opener's connect is bounded by the connect timeout.
                opened.await;
            }
            if let Some(c) = self.checkout(ep) {
                return Ok(c);
            }
        }
        let _opening = Opening(slot);
        self.connect(ep, authority).await
    }

    async fn connect(self: &Arc<Self>, ep: usize, authority: &Authority) -> Result<Conn, PoolError> {
        let uri = Uri::builder()
            .scheme(self.scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| PoolError::Connect(e.into()))?;
        let io = self.connector.clone().call(uri).await.map_err(PoolError::Connect)?;
        if self.http2_only || io.connected().is_negotiated_h2() {
            let (send, conn) = self.h2.handshake(io).await.map_err(|e| PoolError::Connect(e.into()))?;
            let streams = Arc::new(Streams::new(self.max_per_conn, self.retire_at(), self.max_streams));
            tokio::spawn(drive_http2(conn, streams.clone()));
            streams.try_start();
            let mut idle = lock(&self.idle[ep]);
            // One that has started all the streams it may is let go: it closes once they end.
            idle.retain(|c| !matches!(&c.send, Sender::Http2(_, s) if s.used_up()));
            // Concurrent first requests may each open one; the pool keeps one with room.
            if !idle.iter().any(|c| c.http2_room()) {
                idle.push(Conn {
                    send: Sender::Http2(send.clone(), streams.clone()),
                    since_ms: 0,
                    reused: true,
                    served: 0,
                    retire_at_ms: u64::MAX,
                });
                drop(idle);
                self.sweep();
            }
            return Ok(Conn {
                send: Sender::Http2(send, streams),
                since_ms: 0,
                reused: false,
                served: 0,
                retire_at_ms: u64::MAX,
            });
        }
        Ok(Conn {
            send: Sender::Http1(h1::Connection::new(io)),
            since_ms: 0,
            reused: false,
            served: 0,
            retire_at_ms: self.retire_at(),
        })
    }

    /// When a connection opened now stops taking requests.
    fn retire_at(&self) -> u64 {
        match self.max_conn_ms {
            u64::MAX => u64::MAX,
            ms => now_ms().saturating_add(ms),
        }
    }

    /// HTTP/2 names the endpoint in `:scheme` and `:authority`.
    fn absolute(&self, req: &mut Request<RequestBody>, authority: &Authority) {
        let mut parts = std::mem::take(req.uri_mut()).into_parts();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(authority.clone());
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        *req.uri_mut() = Uri::from_parts(parts).expect("scheme, authority and path make a URI");
    }

    /// Makes sure a sweeper runs: the pool holds a connection now. One task per pool, only
    /// while it holds connections, instead of a timer polled by every connection.
    fn sweep(self: &Arc<Self>) {
        if self.sweeping.load(Relaxed) || self.sweeping.swap(true, Relaxed) {
            return;
        }
        let pool = Arc::downgrade(self);
        let period = Duration::from_millis((self.idle_ms / 8).clamp(10, PURGE_PERIOD_MS));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                // Gone with its cluster runtime: its connections closed with it.
                let Some(pool) = pool.upgrade() else { return };
                if !pool.close_idle() {
                    pool.sweeping.store(false, Relaxed);
                    // A connection given back meanwhile found the flag still set.
                    if !pool.close_idle() || pool.sweeping.swap(true, Relaxed) {
                        return;
                    }
                }
            }
        });
    }

    /// Drops the connections idle for `idle_ms` or closed by the peer, and half of the HTTP/1.1
    /// connections that sat unused since the last look (a burst's leftovers: they go over a few
    /// periods instead of holding memory, file descriptors and the backend's connection slots
    /// until the idle timeout, and a load that comes back finds half of them still there).
    /// Whether any remain.
    fn close_idle(&self) -> bool {
        let now = now_ms();
        let mut left = false;
        for slot in &self.idle {
            let mut conns = lock(slot);
            conns.retain(|c| !c.expired(now, self.idle_ms));
            // The oldest go: checkout takes the most recently used.
            let mut surplus = slot.fewest.load(Relaxed).min(conns.len()).div_ceil(2);
            conns.retain(|c| match c.send {
                Sender::Http1(_) if surplus > 0 => {
                    surplus -= 1;
                    false
                }
                _ => true,
            });
            slot.fewest.store(conns.len(), Relaxed);
            left |= !conns.is_empty();
        }
        left
    }
}

/// An upgrade or a CONNECT: after its answer, the connection is the tunnel's.
fn hands_over(req: &Request<RequestBody>) -> bool {
    req.method() == Method::CONNECT || req.headers().contains_key(http::header::UPGRADE)
}

/// An upstream's response body, holding its connection's lease: read by hyper's client
/// (HTTP/2; an upgrade's), or off an HTTP/1.1 connection of ours, which goes back to the pool
/// once the body has ended.
pub struct UpstreamBody {
    inner: Inner,
    lease: Lease,
}

enum Inner {
    Hyper(Incoming),
    Http1(h1::Body),
}

/// Why an upstream's response body broke off.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamBodyError {
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
    #[error(transparent)]
    Http1(#[from] h1::Error),
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = UpstreamBodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let r = match &mut this.inner {
            Inner::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Inner::Http1(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        };
        if matches!(r, Poll::Ready(None) | Poll::Ready(Some(Ok(_)))) {
            this.settle();
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Hyper(b) => b.is_end_stream(),
            Inner::Http1(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Hyper(b) => b.size_hint(),
            Inner::Http1(b) => b.size_hint(),
        }
    }
}

impl UpstreamBody {
    fn new(inner: Inner, lease: Lease) -> Self {
        let mut body = UpstreamBody { inner, lease };
        // Nothing to read (HEAD, 204, 304, empty): nobody polls it, and the connection is free.
        body.settle();
        body
    }

    /// Once the body has ended (or had nothing to read: HEAD, 204, 304, empty), its
    /// connection is free for the next request.
    fn settle(&mut self) {
        if !self.is_end_stream() {
            return;
        }
        match &mut self.inner {
            Inner::Http1(b) => {
                if self.lease.conn.is_some() {
                    self.lease.give_back(b.into_idle());
                }
            }
            Inner::Hyper(_) => self.lease.finish(),
        }
    }
}

/// Runs one connection until it fails or closes: the peer closes it, or the pool dropped every
/// handle to it (idle, or a response abandoned halfway).
async fn drive<F>(conn: F)
where
    F: Future<Output = hyper::Result<()>>,
{
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "upstream connection ended");
    }
}

/// [`drive`] for an HTTP/2 connection, noting the peer's stream limit whenever it may have
/// changed (hyper shows it on the connection only).
async fn drive_http2<T, E>(mut conn: http2::Connection<T, RequestBody, E>, streams: Arc<Streams>)
where
    http2::Connection<T, RequestBody, E>: Future<Output = hyper::Result<()>> + Unpin,
    T: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    E: hyper::rt::bounds::Http2ClientConnExec<RequestBody, T> + Unpin,
{
    let noting = std::future::poll_fn(|cx| {
        let r = std::pin::Pin::new(&mut conn).poll(cx);
        streams
            .limit
            .store(conn.current_max_send_streams().min(streams.cap), Relaxed);
        r
    });
    drive(noting).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrum_snapshot::model::Endpoint;

    #[test]
    fn a_request_future_stays_small() {
        let c = Cluster::new("c", vec![Endpoint::new("127.0.0.1", 80)]);
        let stats = Arc::new(crate::telemetry::ClusterStats::default());
        let connector = super::super::connector::build(&c, stats, &Default::default(), &Default::default()).unwrap();
        let pool = Arc::new(Pool::new(&c, connector, Scheme::HTTP, 1));
        let a = Authority::from_static("127.0.0.1:80");
        let f = pool.send(0, &a, Request::new(RequestBody::empty()));
        // Every request's future holds this one and is moved into its task: opening a
        // connection (boxed) must not make it grow by the connector's and handshakes' state.
        let size = std::mem::size_of_val(&f);
        assert!(size <= 1536, "Pool::send's future is {size} bytes");
    }
}
