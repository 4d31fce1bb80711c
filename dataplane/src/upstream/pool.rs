//! The connection pool of one cluster on one worker. An HTTP/1.1 connection is lent to one
//! request at a time and comes back when that request's response body has ended; an HTTP/2
//! connection is shared by every request to its endpoint. Connections are opened on demand by
//! the cluster's connector (TCP, TLS or a mesh tunnel), and close after `idle` without a request.
//!
//! Why not hyper-util's pooling client: it hashes a pool key and takes a shared lock on every
//! checkout and return, and spawns a task per HTTP/1.1 request to wait for the connection to
//! become idle again. Here the pool is the worker's own, indexed by endpoint, and the response
//! body gives the connection back when it ends.

use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ferrum_snapshot::model::{Cluster, UpstreamProtocol};
use http::uri::{Authority, Scheme};
use http::{Method, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::client::legacy::connect::Connection;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tower_service::Service;

use super::connector::{BoxError, Connector};
use super::now_ms;
use crate::proxy::body::RequestBody;

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
}

impl PoolError {
    pub fn is_connect(&self) -> bool {
        matches!(self, PoolError::Connect(_))
    }
}

/// Idle HTTP/1.1 connections of one endpoint (most recently used last), or its shared HTTP/2
/// connection.
type Idle = Mutex<Vec<Conn>>;

pub struct Pool {
    connector: Connector,
    scheme: Scheme,
    /// Indexed like the cluster's endpoints.
    idle: Box<[Arc<Idle>]>,
    http2_only: bool,
    idle_timeout: Duration,
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
}

enum Sender {
    Http1(http1::SendRequest<RequestBody>),
    Http2(http2::SendRequest<RequestBody>),
}

struct Conn {
    send: Sender,
    activity: Arc<Activity>,
    /// Served a request before: a request it fails to start may be retried on another.
    reused: bool,
}

/// Requests in flight on one connection and when the last one ended, for the idle timeout.
#[derive(Default)]
struct Activity {
    in_flight: AtomicU32,
    last_ms: AtomicU64,
}

impl Activity {
    fn end(&self) {
        self.last_ms.store(now_ms(), Relaxed);
        self.in_flight.fetch_sub(1, Relaxed);
    }

    /// When the connection became idle, or `None` while it serves a request.
    fn idle_since_ms(&self) -> Option<u64> {
        (self.in_flight.load(Relaxed) == 0).then(|| self.last_ms.load(Relaxed))
    }
}

/// One request's hold on its connection, kept by the response body until the body ends: an
/// HTTP/1.1 connection then goes back to the pool. Dropped before the end, the connection is
/// not reused (hyper closes it: the rest of the response is still on the wire).
pub struct Lease {
    conn: Option<Conn>,
    activity: Arc<Activity>,
    home: Arc<Idle>,
    ended: bool,
}

impl Lease {
    /// The response body has ended: the connection is free for the next request.
    pub fn finish(&mut self) {
        if self.ended {
            return;
        }
        self.ended = true;
        self.activity.end();
        if let Some(c) = self.conn.take() {
            lock(&self.home).push(c);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.ended {
            self.activity.end();
        }
    }
}

fn lock(idle: &Idle) -> std::sync::MutexGuard<'_, Vec<Conn>> {
    idle.lock().unwrap_or_else(PoisonError::into_inner)
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
            idle: (0..endpoints).map(|_| Arc::default()).collect(),
            http2_only: c.protocol == UpstreamProtocol::Http2,
            idle_timeout: Duration::from_millis(c.timeouts.idle_ms),
            h1,
            h2,
        }
    }

    /// Sends `req` (origin-form URI, `Host` set) to endpoint `ep` on an idle connection, else a
    /// new one. A request that a reused connection closed before taking is sent again, as the
    /// connection had merely timed out while idle.
    pub async fn send(
        &self,
        ep: usize,
        authority: &Authority,
        mut req: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Lease), PoolError> {
        loop {
            let mut conn = match self.checkout(ep).await {
                Some(c) => c,
                // Boxed: opening a connection is the slow path, and its state (connector, TLS,
                // handshakes) would make every request's future kilobytes larger to move.
                None => Box::pin(self.connect(ep, authority)).await?,
            };
            conn.activity.in_flight.fetch_add(1, Relaxed);
            let mut lease = Lease {
                conn: None,
                activity: conn.activity.clone(),
                home: self.idle[ep].clone(),
                ended: false,
            };
            let reused = conn.reused;
            conn.reused = true;
            let sent = match &mut conn.send {
                Sender::Http1(s) => {
                    if req.method() == Method::CONNECT {
                        *req.uri_mut() = Uri::from(authority.clone());
                    }
                    let sent = s.try_send_request(req);
                    // Lent to this request until its response body ends.
                    lease.conn = Some(conn);
                    sent.await
                }
                Sender::Http2(s) => {
                    self.absolute(&mut req, authority);
                    s.try_send_request(req).await
                }
            };
            match sent {
                Ok(resp) => return Ok((resp, lease)),
                Err(mut e) => match e.take_message() {
                    Some(r) if reused => req = r,
                    _ => return Err(PoolError::Http(e.into_error())),
                },
            }
        }
    }

    /// A pooled connection to `ep` that can take a request now.
    async fn checkout(&self, ep: usize) -> Option<Conn> {
        loop {
            let conn = {
                let mut idle = lock(&self.idle[ep]);
                match idle.last() {
                    None => return None,
                    Some(Conn {
                        send: Sender::Http2(s),
                        activity,
                        ..
                    }) if !s.is_closed() => {
                        return Some(Conn {
                            send: Sender::Http2(s.clone()),
                            activity: activity.clone(),
                            reused: true,
                        });
                    }
                    Some(_) => idle.pop()?,
                }
            };
            if let Sender::Http1(mut s) = conn.send {
                // Given back when the body ended; hyper's connection task may not yet have
                // turned to wait for the next request, which it does without I/O.
                if s.is_ready() || s.ready().await.is_ok() {
                    return Some(Conn {
                        send: Sender::Http1(s),
                        ..conn
                    });
                }
            }
        }
    }

    async fn connect(&self, ep: usize, authority: &Authority) -> Result<Conn, PoolError> {
        let uri = Uri::builder()
            .scheme(self.scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| PoolError::Connect(e.into()))?;
        let io = self.connector.clone().call(uri).await.map_err(PoolError::Connect)?;
        let activity = Arc::new(Activity::default());
        if self.http2_only || io.connected().is_negotiated_h2() {
            let (send, conn) = self.h2.handshake(io).await.map_err(|e| PoolError::Connect(e.into()))?;
            tokio::spawn(drive(conn, activity.clone(), self.idle_timeout));
            let mut idle = lock(&self.idle[ep]);
            // Concurrent first requests may each open one; the pool keeps the first.
            if !idle
                .iter()
                .any(|c| matches!(&c.send, Sender::Http2(s) if !s.is_closed()))
            {
                idle.push(Conn {
                    send: Sender::Http2(send.clone()),
                    activity: activity.clone(),
                    reused: true,
                });
            }
            return Ok(Conn {
                send: Sender::Http2(send),
                activity,
                reused: false,
            });
        }
        let (send, conn) = self.h1.handshake(io).await.map_err(|e| PoolError::Connect(e.into()))?;
        tokio::spawn(drive(conn.with_upgrades(), activity.clone(), self.idle_timeout));
        Ok(Conn {
            send: Sender::Http1(send),
            activity,
            reused: false,
        })
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
}

/// Runs one connection until it fails, the peer closes it, or it has been idle for `idle`.
async fn drive<F>(conn: F, activity: Arc<Activity>, idle: Duration)
where
    F: Future<Output = hyper::Result<()>>,
{
    tokio::pin!(conn);
    let idle_ms = idle.as_millis() as u64;
    let mut at = tokio::time::Instant::now() + idle;
    loop {
        tokio::select! {
            biased;
            r = &mut conn => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "upstream connection ended");
                }
                return;
            }
            _ = tokio::time::sleep_until(at) => {
                let now = now_ms();
                let wait = match activity.idle_since_ms() {
                    Some(since) if now.saturating_sub(since) >= idle_ms => return,
                    Some(since) => since + idle_ms - now,
                    None => idle_ms,
                };
                at = tokio::time::Instant::now() + Duration::from_millis(wait);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrum_snapshot::model::Endpoint;

    #[test]
    fn a_request_future_stays_small() {
        let c = Cluster::new("c", vec![Endpoint::new("127.0.0.1", 80)]);
        let stats = Arc::new(crate::telemetry::ClusterStats::default());
        let connector = super::super::connector::build(&c, stats, &Default::default()).unwrap();
        let pool = Pool::new(&c, connector, Scheme::HTTP, 1);
        let a = Authority::from_static("127.0.0.1:80");
        let f = pool.send(0, &a, Request::new(RequestBody::empty()));
        // Every request's future holds this one and is moved into its task: opening a
        // connection (boxed) must not make it grow by the connector's and handshakes' state.
        let size = std::mem::size_of_val(&f);
        assert!(size <= 1536, "Pool::send's future is {size} bytes");
    }
}
