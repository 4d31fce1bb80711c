//! Upstream clusters at run time: endpoints with their health, the balancer, the pools,
//! the circuit breaker and the retry budget.
//!
//! A `ClusterRuntime` is rebuilt only when its cluster's spec changes; endpoint state (health,
//! ejections) is carried over by address, so a reload does not forget what it learned.

pub mod balance;
pub mod body;
pub mod connector;
mod failure;
pub mod health;
pub mod l4;
pub mod pool;
pub mod retry;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use ferrum_snapshot::model::{Cluster, Endpoint, HashOn, OutlierDetection};
use http::uri::{Authority, Scheme};
use tokio::sync::Notify;

pub use failure::UpstreamError;

use crate::telemetry::{ClusterStats, EndpointHealth};
use balance::{Balancer, Candidate};
pub use connector::{MaxConnections, TunnelFuture, TunnelSlot, Tunnels};
pub use l4::L4Stream;
pub use pool::{Lease, Pool, PoolError};

/// Milliseconds since the process started: a cheap, monotonic clock for atomics.
pub fn now_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

pub struct EndpointState {
    pub key: String,
    pub authority: Authority,
    pub weight: u32,
    /// Ready from the source (EndpointSlice) and not failed by active health checks.
    healthy: AtomicBool,
    hc_streak: AtomicU32,
    consecutive_5xx: AtomicU32,
    consecutive_connect: AtomicU32,
    ejected_until_ms: AtomicU64,
    ejections: AtomicU32,
    active: AtomicU32,
}

impl EndpointState {
    fn new(e: &Endpoint) -> Result<Self, http::uri::InvalidUri> {
        let key = if e.address.contains(':') {
            format!("[{}]:{}", e.address, e.port)
        } else {
            format!("{}:{}", e.address, e.port)
        };
        Ok(EndpointState {
            authority: Authority::try_from(key.as_str())?,
            key,
            weight: e.weight,
            healthy: AtomicBool::new(e.ready),
            hc_streak: AtomicU32::new(0),
            consecutive_5xx: AtomicU32::new(0),
            consecutive_connect: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            active: AtomicU32::new(0),
        })
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Relaxed)
    }

    pub fn ejected(&self) -> bool {
        let until = self.ejected_until_ms.load(Relaxed);
        until != 0 && now_ms() < until
    }
}

impl Candidate for Arc<EndpointState> {
    fn available(&self) -> bool {
        self.healthy() && !self.ejected()
    }
    fn active_requests(&self) -> u32 {
        self.active.load(Relaxed)
    }
}

/// Endpoints tried for one L4 connection before it is given up.
pub const CONNECT_ATTEMPTS: usize = 3;

/// What happened to one try, for passive health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Status(u16),
    ConnectFailure,
    OtherFailure,
}

pub struct ClusterRuntime {
    pub spec: Cluster,
    pub endpoints: Vec<Arc<EndpointState>>,
    pub balancer: Balancer,
    /// One pool per worker thread, then one for health checks: connections never cross threads.
    pools: Box<[Arc<Pool>]>,
    pub scheme: Scheme,
    pub stats: Arc<ClusterStats>,
    /// The retry policy's conditions, compiled.
    pub retry_on: retry::RetryOn,
    active: AtomicU32,
    pending: AtomicU32,
    retries_active: AtomicU32,
    released: Notify,
    health: Option<tokio::task::AbortHandle>,
    /// A mesh proxy's tunnels: L4 connections to mesh workloads go over HBONE, as requests do.
    tunnels: connector::TunnelSlot,
}

impl Drop for ClusterRuntime {
    fn drop(&mut self) {
        if let Some(h) = &self.health {
            h.abort();
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster {cluster:?}: endpoint {endpoint:?}: {source}")]
    Endpoint {
        cluster: String,
        endpoint: String,
        #[source]
        source: http::uri::InvalidUri,
    },
    #[error(transparent)]
    Client(#[from] connector::ClientError),
}

/// Held for the life of one request to a cluster (until the response body ends): it keeps the
/// circuit breaker's and least-request's counts.
pub struct RequestGuard {
    cluster: Arc<ClusterRuntime>,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.cluster.active.fetch_sub(1, Relaxed);
        if self.cluster.pending.load(Relaxed) > 0 {
            self.cluster.released.notify_one();
        }
    }
}

pub struct EndpointGuard(pub Arc<EndpointState>);

/// Held for the life of one L4 connection: its circuit-breaker slot, its endpoint's
/// least-request count and the cluster's open-connection gauge.
pub struct L4Guard {
    request: RequestGuard,
    endpoint: EndpointGuard,
}

impl L4Guard {
    pub fn endpoint(&self) -> &str {
        &self.endpoint.0.key
    }
}

impl Drop for L4Guard {
    fn drop(&mut self) {
        self.request.cluster.stats.connections_active.fetch_sub(1, Relaxed);
    }
}

impl Drop for EndpointGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Relaxed);
    }
}

impl ClusterRuntime {
    /// Builds a runtime, reusing endpoint state from `previous` for endpoints it already knew.
    pub fn new(
        spec: &Cluster,
        previous: Option<&ClusterRuntime>,
        stats: Arc<ClusterStats>,
        workers: usize,
        tunnels: &connector::TunnelSlot,
        secrets: &ferrum_snapshot::Secrets,
    ) -> Result<Arc<Self>, ClusterError> {
        let old: HashMap<&str, &Arc<EndpointState>> = previous
            .map(|p| p.endpoints.iter().map(|e| (e.key.as_str(), e)).collect())
            .unwrap_or_default();
        let mut endpoints = Vec::with_capacity(spec.endpoints.len());
        for e in &spec.endpoints {
            let fresh = EndpointState::new(e).map_err(|source| ClusterError::Endpoint {
                cluster: spec.name.clone(),
                endpoint: format!("{}:{}", e.address, e.port),
                source,
            })?;
            match old.get(fresh.key.as_str()) {
                // Same endpoint and the source still calls it ready: keep what we learned.
                Some(prev) if prev.weight == e.weight && e.ready => endpoints.push(Arc::clone(prev)),
                _ => endpoints.push(Arc::new(fresh)),
            }
        }
        let weights: Vec<u32> = endpoints.iter().map(|e| e.weight).collect();
        let scheme = if spec.tls.is_some() {
            Scheme::HTTPS
        } else {
            Scheme::HTTP
        };
        let connector = connector::build(spec, stats.clone(), tunnels, secrets)?;
        let pools = (0..=workers)
            .map(|_| Arc::new(Pool::new(spec, connector.clone(), scheme.clone(), endpoints.len())))
            .collect();
        let mut rt = ClusterRuntime {
            balancer: Balancer::new(&spec.lb, &weights),
            scheme,
            spec: spec.clone(),
            endpoints,
            pools,
            stats,
            retry_on: spec.retry.as_ref().map(retry::RetryOn::of).unwrap_or_default(),
            active: AtomicU32::new(0),
            pending: AtomicU32::new(0),
            retries_active: AtomicU32::new(0),
            released: Notify::new(),
            health: None,
            tunnels: tunnels.clone(),
        };
        if spec.health_check.is_some() && !rt.endpoints.is_empty() {
            rt.health = Some(health::spawn(&rt));
        }
        Ok(Arc::new(rt))
    }

    /// Admission under the circuit breaker: at most `max_requests` in flight; up to
    /// `max_pending_requests` more wait (no longer than the connect timeout) for a slot.
    pub async fn admit(self: &Arc<Self>) -> Result<RequestGuard, UpstreamError> {
        let cb = &self.spec.circuit_breaker;
        if self.active.fetch_add(1, Relaxed) < cb.max_requests {
            return Ok(RequestGuard { cluster: self.clone() });
        }
        self.active.fetch_sub(1, Relaxed);
        if self.pending.fetch_add(1, Relaxed) >= cb.max_pending_requests {
            self.pending.fetch_sub(1, Relaxed);
            self.stats.error(UpstreamError::Overflow);
            return Err(UpstreamError::Overflow);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_millis(self.spec.timeouts.connect_ms);
        let result = loop {
            let notified = self.released.notified();
            if self.active.fetch_add(1, Relaxed) < cb.max_requests {
                break Ok(RequestGuard { cluster: self.clone() });
            }
            self.active.fetch_sub(1, Relaxed);
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                self.stats.error(UpstreamError::Overflow);
                break Err(UpstreamError::Overflow);
            }
        };
        self.pending.fetch_sub(1, Relaxed);
        result
    }

    /// The calling worker's pool (the control thread's when called elsewhere).
    pub fn pool(&self) -> &Arc<Pool> {
        let i = crate::workers::index().min(self.pools.len() - 1);
        &self.pools[i]
    }

    pub fn pick(&self, key: Option<&[u8]>, avoid: Option<usize>) -> Option<(usize, EndpointGuard)> {
        let i = self.balancer.pick(&self.endpoints, key, avoid)?;
        let e = &self.endpoints[i];
        e.active.fetch_add(1, Relaxed);
        Some((i, EndpointGuard(e.clone())))
    }

    /// A stream to one of the cluster's endpoints, for L4 routes: balanced like a request
    /// (`client` is the hash key of a client-IP hash), up to [`CONNECT_ATTEMPTS`] endpoints
    /// tried, each within the connect timeout, failures counted by outlier detection. A mesh
    /// proxy reaches an endpoint that is a mesh workload over HBONE, anything else over TCP.
    /// The guard holds a circuit-breaker slot for the connection's life.
    pub async fn connect_l4(self: &Arc<Self>, client: std::net::IpAddr) -> Result<(L4Stream, L4Guard), UpstreamError> {
        let guard = self.admit().await?;
        let key = matches!(self.balancer.hash_on(), Some(HashOn::ClientIp)).then(|| balance::HashKey::ip(client));
        let key = key.as_ref().map(balance::HashKey::as_bytes);
        let timeout = Duration::from_millis(self.spec.timeouts.connect_ms);
        let mut avoid = None;
        let mut last = UpstreamError::NoHealthyUpstream;
        for _ in 0..CONNECT_ATTEMPTS {
            let Some((i, ep)) = self.pick(key, avoid) else { break };
            last = match tokio::time::timeout(timeout, self.open(&ep.0)).await {
                Ok(Ok(s)) => {
                    self.record(&ep.0, Outcome::Status(200));
                    self.stats.connections_total.fetch_add(1, Relaxed);
                    self.stats.connections_active.fetch_add(1, Relaxed);
                    return Ok((
                        s,
                        L4Guard {
                            request: guard,
                            endpoint: ep,
                        },
                    ));
                }
                Ok(Err(e)) => {
                    tracing::debug!(cluster = %self.spec.name, endpoint = %ep.0.key, error = %e, "connect failed");
                    UpstreamError::ConnectFailure
                }
                Err(_) => UpstreamError::Timeout,
            };
            self.record(&ep.0, Outcome::ConnectFailure);
            avoid = Some(i);
        }
        self.stats.error(last);
        Err(last)
    }

    /// A tunnel to `ep` when a mesh proxy serves it, else a TCP connection.
    async fn open(&self, ep: &EndpointState) -> Result<L4Stream, connector::BoxError> {
        let tunnel = self.tunnels.get().and_then(|t| t.dial(ep.key.parse().ok()?));
        if let Some(t) = tunnel {
            return Ok(L4Stream::Tunnel(t.await?));
        }
        let s = tokio::net::TcpStream::connect(ep.authority.as_str()).await?;
        let _ = s.set_nodelay(true);
        if let Some(k) = &self.spec.tcp_keepalive {
            connector::set_keepalive(&s, k)?;
        }
        Ok(L4Stream::Tcp(s))
    }

    /// Retry budget: retries in flight to this cluster stay under `budget_percent` (of the
    /// policy retrying: the route's or the cluster's) of requests in flight, with a floor of
    /// `min_retry_concurrency`, and never above the circuit breaker's `max_retries`.
    pub fn try_retry(self: &Arc<Self>, policy: &ferrum_snapshot::model::RetryPolicy) -> Option<RetryGuard> {
        let active = self.active.load(Relaxed);
        let mut allowed = (active * policy.budget_percent / 100).max(policy.min_retry_concurrency);
        if let Some(max) = self.spec.circuit_breaker.max_retries {
            allowed = allowed.min(max);
        }
        if self.retries_active.fetch_add(1, Relaxed) >= allowed {
            self.retries_active.fetch_sub(1, Relaxed);
            return None;
        }
        self.stats.retries.fetch_add(1, Relaxed);
        Some(RetryGuard(self.clone()))
    }

    /// Passive health (outlier detection) from the result of one try.
    pub fn record(&self, e: &EndpointState, outcome: Outcome) {
        let Some(od) = &self.spec.outlier_detection else {
            return;
        };
        match outcome {
            Outcome::Status(s) if s < 500 => {
                e.consecutive_5xx.store(0, Relaxed);
                e.consecutive_connect.store(0, Relaxed);
                // A success after the ejection ran out ends the backoff streak.
                if e.ejected_until_ms.load(Relaxed) != 0 && !e.ejected() {
                    e.ejected_until_ms.store(0, Relaxed);
                    e.ejections.store(0, Relaxed);
                }
            }
            Outcome::Status(_) | Outcome::OtherFailure => {
                if e.consecutive_5xx.fetch_add(1, Relaxed) + 1 >= od.consecutive_5xx {
                    self.eject(e, od);
                }
            }
            Outcome::ConnectFailure => {
                let c = e.consecutive_connect.fetch_add(1, Relaxed) + 1;
                let f = e.consecutive_5xx.fetch_add(1, Relaxed) + 1;
                if c >= od.consecutive_connect_failures || f >= od.consecutive_5xx {
                    self.eject(e, od);
                }
            }
        }
    }

    fn eject(&self, e: &EndpointState, od: &OutlierDetection) {
        if e.ejected() {
            return;
        }
        let ejected = self.endpoints.iter().filter(|x| x.ejected()).count();
        // Never eject more than the allowed share (at least one endpoint may always go).
        let max = (self.endpoints.len() * od.max_ejection_percent as usize / 100).max(1);
        if ejected >= max {
            return;
        }
        let n = e.ejections.fetch_add(1, Relaxed) + 1;
        let ms = od.base_ejection_ms.saturating_mul(u64::from(n.min(10)));
        e.ejected_until_ms.store(now_ms() + ms, Relaxed);
        e.consecutive_5xx.store(0, Relaxed);
        e.consecutive_connect.store(0, Relaxed);
        self.stats.ejections.fetch_add(1, Relaxed);
        tracing::warn!(cluster = %self.spec.name, endpoint = %e.key, ejection_ms = ms, "endpoint ejected by outlier detection");
    }

    pub fn health_report(&self, out: &mut Vec<EndpointHealth>) {
        for e in &self.endpoints {
            out.push(EndpointHealth {
                cluster: self.spec.name.clone(),
                endpoint: e.key.clone(),
                healthy: e.available(),
                active_requests: e.active.load(Relaxed),
            });
        }
    }
}

pub struct RetryGuard(Arc<ClusterRuntime>);

impl Drop for RetryGuard {
    fn drop(&mut self) {
        self.0.retries_active.fetch_sub(1, Relaxed);
    }
}
