//! Upstream clusters at run time: endpoints with their health, the balancer, the pools,
//! the circuit breaker and the retry budget.
//!
//! A `ClusterRuntime` is rebuilt only when its cluster's spec changes; endpoint state (health,
//! ejections) is carried over by address, so a reload does not forget what it learned.

pub mod balance;
pub mod body;
pub mod connector;
mod failure;
pub mod h1;
pub mod health;
pub mod l4;
mod locality;
pub mod pool;
pub mod retry;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ferrum_snapshot::model::{Cluster, Endpoint, HashOn, OutlierDetection, SlowStart, UpstreamProtocol};
use http::uri::{Authority, Scheme};
use tokio::sync::Notify;

pub use failure::UpstreamError;

use crate::telemetry::{ClusterStats, EndpointHealth};
use balance::{Balancer, Candidate};
pub use connector::{MaxConnections, MeshSlot, MeshUpstreams, TunnelFuture};
pub use l4::L4Stream;
pub use pool::{Lease, Pool, PoolError, UpstreamBody, UpstreamBodyError};

/// Milliseconds since the process started: a cheap, monotonic clock for atomics.
pub fn now_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

pub struct EndpointState {
    pub key: String,
    pub authority: Authority,
    pub weight: u32,
    /// What the source (EndpointSlice) said of it when this state was made.
    source_ready: bool,
    /// Ready from the source and not failed by active health checks.
    healthy: AtomicBool,
    hc_streak: AtomicU32,
    consecutive_5xx: AtomicU32,
    consecutive_connect: AtomicU32,
    ejected_until_ms: AtomicU64,
    ejections: AtomicU32,
    active: AtomicU32,
    /// When it started its slow start (0: it never did).
    warm_from_ms: AtomicU64,
    pub zone: Option<String>,
    pub priority: u32,
    /// Where a mesh proxy counts its calls answered here (found on the first one).
    callee: OnceLock<Option<crate::mesh::peers::Calls>>,
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
            source_ready: e.ready,
            healthy: AtomicBool::new(e.ready),
            hc_streak: AtomicU32::new(0),
            consecutive_5xx: AtomicU32::new(0),
            consecutive_connect: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            active: AtomicU32::new(0),
            warm_from_ms: AtomicU64::new(0),
            zone: e.zone.clone(),
            priority: e.priority,
            callee: OnceLock::new(),
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

/// Slow start at run time: a warming endpoint keeps a pick with the probability of its share of
/// its weight, else the balancer picks again — so its share of requests is its weight scaled by
/// that factor, whatever the balancing.
pub struct Warmup {
    spec: SlowStart,
    /// When the last endpoint to start warming is done: until then picks are looked at.
    until_ms: AtomicU64,
}

/// How stale the count of available endpoints that decides panic may be.
const PANIC_RECOUNT_MS: u64 = 100;

/// Picks made for one request at most while warming endpoints turn them down; the last stands.
const WARMUP_PICKS: usize = 8;

impl Warmup {
    fn start(&self, e: &EndpointState, now: u64) {
        e.warm_from_ms.store(now.max(1), Relaxed);
        self.until_ms
            .fetch_max(now.saturating_add(self.spec.window_ms), Relaxed);
    }

    /// `first`, or another pick of `again` if a warming endpoint turned it down at `now`.
    fn thin(
        &self,
        now: u64,
        first: usize,
        eps: &[Arc<EndpointState>],
        mut again: impl FnMut() -> Option<usize>,
    ) -> usize {
        if now >= self.until_ms.load(Relaxed) {
            return first;
        }
        let mut i = first;
        for _ in 1..WARMUP_PICKS {
            let from = eps[i].warm_from_ms.load(Relaxed);
            if from == 0 || fastrand::f64() < self.spec.factor(now.saturating_sub(from)) {
                break;
            }
            match again() {
                Some(j) => i = j,
                None => break,
            }
        }
        i
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
    /// With `follow_client_protocol`, the same per worker for the other protocol: requests
    /// whose client's protocol is not the cluster's `protocol` go there.
    client_pools: Box<[Arc<Pool>]>,
    pub scheme: Scheme,
    pub stats: Arc<ClusterStats>,
    /// The retry policy's conditions, compiled.
    pub retry_on: retry::RetryOn,
    active: AtomicU32,
    pending: AtomicU32,
    retries_active: AtomicU32,
    released: Notify,
    health: Option<tokio::task::AbortHandle>,
    /// Slow start, when the cluster has it.
    warmup: Option<Arc<Warmup>>,
    /// When the endpoints were last counted for the panic threshold (ms, shifted left one) and
    /// whether too few were available (the low bit).
    panic: AtomicU64,
    /// A mesh proxy's side: L4 connections to mesh workloads go over HBONE, as requests do.
    mesh: connector::MeshSlot,
    /// The endpoints' priorities and, with locality failover and a proxy that knows its zone,
    /// whether they are in it: `None` when that makes one level.
    localities: Option<locality::Localities>,
    /// The proxy's zone it was built for, with locality failover.
    pub zone: Option<String>,
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

    /// How long the connection may stay quiet: its cluster's, else `default`.
    pub fn tcp_idle(&self, default: Duration) -> Duration {
        self.request.cluster.spec.timeouts.tcp_idle(default)
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

/// The endpoints of `spec`, each keeping the state `previous` learned of it while it stayed the
/// same; new ones (and ones ready again) warm up under `warmup`.
fn endpoint_states(
    spec: &Cluster,
    previous: Option<&ClusterRuntime>,
    warmup: Option<&Warmup>,
) -> Result<Vec<Arc<EndpointState>>, ClusterError> {
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
            // Same endpoint and the source called it ready then and now: keep what we learned.
            // (One that became ready starts afresh: healthy, as the source now says.)
            Some(prev)
                if prev.weight == e.weight
                    && e.ready
                    && prev.source_ready
                    && prev.zone == e.zone
                    && prev.priority == e.priority =>
            {
                endpoints.push(Arc::clone(prev))
            }
            prev => {
                match (warmup, prev) {
                    // New to a cluster that was serving, or ready again: it warms up.
                    (Some(w), prev) if e.ready && previous.is_some() && !prev.is_some_and(|p| p.healthy()) => {
                        w.start(&fresh, now_ms())
                    }
                    // Its weight changed: it goes on warming if it was.
                    (_, Some(p)) => fresh.warm_from_ms.store(p.warm_from_ms.load(Relaxed), Relaxed),
                    _ => {}
                }
                endpoints.push(Arc::new(fresh));
            }
        }
    }
    if let Some(w) = warmup {
        for e in &endpoints {
            let from = e.warm_from_ms.load(Relaxed);
            if from != 0 {
                w.until_ms.fetch_max(from.saturating_add(w.spec.window_ms), Relaxed);
            }
        }
    }
    Ok(endpoints)
}

/// A cluster that follows the client's protocol, as it is for the protocol it does not speak by
/// default: its connector offers that one in ALPN.
fn other_protocol(spec: &Cluster) -> Option<Cluster> {
    spec.follow_client_protocol.then(|| Cluster {
        protocol: match spec.protocol {
            UpstreamProtocol::Http1 => UpstreamProtocol::Http2,
            UpstreamProtocol::Http2 => UpstreamProtocol::Http1,
        },
        ..spec.clone()
    })
}

impl ClusterRuntime {
    /// Builds a runtime, reusing endpoint state from `previous` for endpoints it already knew.
    pub fn new(
        spec: &Cluster,
        previous: Option<&ClusterRuntime>,
        stats: Arc<ClusterStats>,
        workers: usize,
        mesh: &connector::MeshSlot,
        secrets: &ferrum_snapshot::Secrets,
        // The proxy's zone, when the cluster has locality failover.
        zone: Option<&str>,
    ) -> Result<Arc<Self>, ClusterError> {
        // Failures under other TLS settings (a DestinationRule's mode changed) say nothing about
        // these: like Envoy for a changed cluster, its endpoints start afresh.
        let previous = previous.filter(|p| p.spec.tls == spec.tls);
        let warmup = (spec.slow_start.clone()).map(|spec| {
            Arc::new(Warmup {
                spec,
                until_ms: AtomicU64::new(0),
            })
        });
        let endpoints = endpoint_states(spec, previous, warmup.as_deref())?;
        let weights: Vec<u32> = endpoints.iter().map(|e| e.weight).collect();
        let scheme = if spec.tls.is_some() {
            Scheme::HTTPS
        } else {
            Scheme::HTTP
        };
        let pools_of = |c: &Cluster| -> Result<Box<[Arc<Pool>]>, ClusterError> {
            let connector = connector::build(c, stats.clone(), mesh, secrets)?;
            Ok((0..=workers)
                .map(|_| Arc::new(Pool::new(c, connector.clone(), scheme.clone(), endpoints.len())))
                .collect())
        };
        let pools = pools_of(spec)?;
        let client_pools = match other_protocol(spec) {
            Some(other) => pools_of(&other)?,
            None => Box::default(),
        };
        let localities = locality::Localities::new(&endpoints, &spec.lb, zone);
        let mut rt = ClusterRuntime {
            localities,
            zone: zone.map(String::from),
            balancer: Balancer::new(&spec.lb, &weights),
            scheme,
            spec: spec.clone(),
            endpoints,
            pools,
            client_pools,
            stats,
            retry_on: spec.retry.as_ref().map(retry::RetryOn::of).unwrap_or_default(),
            active: AtomicU32::new(0),
            pending: AtomicU32::new(0),
            retries_active: AtomicU32::new(0),
            released: Notify::new(),
            health: None,
            warmup,
            panic: AtomicU64::new(0),
            mesh: mesh.clone(),
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

    /// Where a mesh proxy counts its call to the Service at `requested` that `ep` answered;
    /// `None` when it counts none. Found on the endpoint's first call, then read without a lock.
    pub fn callee<'e>(&self, ep: &'e EndpointState, requested: SocketAddr) -> Option<&'e crate::mesh::peers::Calls> {
        let mesh = self.mesh.get().filter(|m| m.counts_calls())?;
        let at = ep.key.parse().ok();
        ep.callee
            .get_or_init(|| mesh.callee(requested, Some(&self.spec.name), at))
            .as_ref()
    }

    /// The calling worker's pool (the control thread's when called elsewhere).
    pub fn pool(&self) -> &Arc<Pool> {
        let i = crate::workers::index().min(self.pools.len() - 1);
        &self.pools[i]
    }

    /// [`Self::pool`] for a request whose client speaks HTTP/2 (`client_h2`) or not: the
    /// other protocol's when the cluster follows the client's and `protocol` is not it.
    pub fn pool_for(&self, client_h2: bool) -> &Arc<Pool> {
        let pools = match self.client_pools.is_empty() || client_h2 == (self.spec.protocol == UpstreamProtocol::Http2) {
            true => &self.pools,
            false => &self.client_pools,
        };
        &pools[crate::workers::index().min(pools.len() - 1)]
    }

    pub fn pick(&self, key: Option<&[u8]>, avoid: Option<usize>) -> Option<(usize, EndpointGuard)> {
        let panicking = self.panicking();
        let pick = || match &self.localities {
            Some(l) if !panicking => l
                .pick(now_ms(), key, avoid, PANIC_RECOUNT_MS)
                .or_else(|| self.balancer.pick_among(&self.endpoints, key, avoid, false)),
            _ => self.balancer.pick_among(&self.endpoints, key, avoid, panicking),
        };
        let mut i = pick()?;
        if let Some(w) = &self.warmup {
            i = w.thin(now_ms(), i, &self.endpoints, pick);
        }
        if self.localities.as_ref().is_some_and(|l| l.failed_over_to(i)) {
            self.stats.failovers.fetch_add(1, Relaxed);
        }
        let e = &self.endpoints[i];
        e.active.fetch_add(1, Relaxed);
        Some((i, EndpointGuard(e.clone())))
    }

    /// Whether fewer than the panic threshold of the endpoints are available, looked at again
    /// at most every [`PANIC_RECOUNT_MS`] (a count over every endpoint): then every endpoint
    /// takes requests, as in Envoy.
    fn panicking(&self) -> bool {
        let threshold = self.spec.panic_threshold_percent as usize;
        if threshold == 0 {
            return false;
        }
        let now = now_ms();
        let seen = self.panic.load(Relaxed);
        let panicking = if now < (seen >> 1).saturating_add(PANIC_RECOUNT_MS) {
            seen & 1 == 1
        } else {
            let available = self.endpoints.iter().filter(|e| e.available()).count();
            let panicking = available * 100 < self.endpoints.len() * threshold;
            self.panic.store(now << 1 | u64::from(panicking), Relaxed);
            panicking
        };
        if panicking {
            self.stats.panics.fetch_add(1, Relaxed);
        }
        panicking
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
        let tunnel = self.mesh.get().and_then(|t| t.dial(ep.key.parse().ok()?));
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

#[cfg(test)]
mod tests {
    use super::*;
    use ferrum_snapshot::model::LbPolicy;

    /// The share of 20,000 picks the second of two equal endpoints gets while it has warmed
    /// for `warmed_ms` of a 10 s window.
    fn share_of_warming(lb: LbPolicy, warmed_ms: u64) -> f64 {
        let eps: Vec<Arc<EndpointState>> = (1..=2)
            .map(|p| Arc::new(EndpointState::new(&Endpoint::new("127.0.0.1", p)).unwrap()))
            .collect();
        let balancer = Balancer::new(&lb, &[1, 1]);
        let w = Warmup {
            spec: SlowStart::new(10_000),
            until_ms: AtomicU64::new(0),
        };
        w.start(&eps[1], 1);
        let now = 1 + warmed_ms;
        let picks = 20_000;
        let second = (0..picks)
            .filter(|_| {
                let first = balancer.pick(&eps, None, None).unwrap();
                w.thin(now, first, &eps, || balancer.pick(&eps, None, None)) == 1
            })
            .count();
        second as f64 / picks as f64
    }

    #[test]
    fn a_warming_endpoint_gets_its_weight_scaled_by_its_warm_up() {
        for lb in [LbPolicy::RoundRobin, LbPolicy::Random, LbPolicy::LeastRequest] {
            // Just started: 10 % of its weight, so 0.1 / 1.1 of the picks.
            let share = share_of_warming(lb.clone(), 0);
            assert!((0.06..0.13).contains(&share), "{lb:?} at the start: {share}");
            let share = share_of_warming(lb.clone(), 5_000);
            assert!(
                (0.28..0.39).contains(&share),
                "{lb:?} halfway: 0.5 / 1.5 expected, {share}"
            );
        }
    }

    fn runtime(c: &Cluster, previous: Option<&ClusterRuntime>) -> Arc<ClusterRuntime> {
        ClusterRuntime::new(
            c,
            previous,
            Default::default(),
            1,
            &Default::default(),
            &Default::default(),
            None,
        )
        .unwrap()
    }

    #[tokio::test]
    async fn an_endpoint_the_source_calls_ready_takes_requests_and_warms_up() {
        let mut c = Cluster::new("c", vec![Endpoint::new("127.0.0.1", 1), Endpoint::new("127.0.0.1", 2)]);
        c.slow_start = Some(SlowStart::new(60_000));
        c.endpoints[1].ready = false;
        let first = runtime(&c, None);
        assert!((0..20).all(|_| first.pick(None, None).unwrap().0 == 0));
        assert_eq!(first.endpoints[0].warm_from_ms.load(Relaxed), 0, "no warm-up at start");
        // The pod became ready: it takes requests, warming up.
        c.endpoints[1].ready = true;
        let second = runtime(&c, Some(&first));
        assert!((0..200).any(|_| second.pick(None, None).unwrap().0 == 1));
        assert_ne!(second.endpoints[1].warm_from_ms.load(Relaxed), 0);
        assert_eq!(
            second.endpoints[0].warm_from_ms.load(Relaxed),
            0,
            "the one serving all along"
        );
        assert!(
            Arc::ptr_eq(&first.endpoints[0], &second.endpoints[0]),
            "its state carried over"
        );
    }

    #[tokio::test]
    async fn an_ejection_outlives_a_config_change_but_not_a_change_of_tls() {
        let mut c = Cluster::new("c", vec![Endpoint::new("127.0.0.1", 1)]);
        let first = runtime(&c, None);
        first.endpoints[0].ejected_until_ms.store(now_ms() + 30_000, Relaxed);
        c.lb = LbPolicy::Random;
        let second = runtime(&c, Some(&first));
        assert!(second.endpoints[0].ejected(), "same TLS: what was learned stays");
        c.tls = Some(ferrum_snapshot::model::UpstreamTls {
            sni: "backend.example".into(),
            ..Default::default()
        });
        let third = runtime(&c, Some(&second));
        assert!(
            !third.endpoints[0].ejected(),
            "failures under the old TLS settings are forgotten"
        );
    }

    #[test]
    fn picks_are_not_looked_at_once_every_endpoint_has_warmed() {
        let eps = vec![Arc::new(EndpointState::new(&Endpoint::new("127.0.0.1", 1)).unwrap())];
        let w = Warmup {
            spec: SlowStart::new(10_000),
            until_ms: AtomicU64::new(0),
        };
        w.start(&eps[0], 1);
        // Past `until_ms`, the pick stands without a look at the endpoint.
        assert_eq!(w.thin(10_001, 0, &eps, || panic!("picked again")), 0);
        // Within it, a warming endpoint turns picks down.
        let mut again = 0;
        for _ in 0..100 {
            w.thin(2, 0, &eps, || {
                again += 1;
                Some(0)
            });
        }
        assert!(again > 100, "{again} picks again over 100 requests at 10 %");
    }
}
