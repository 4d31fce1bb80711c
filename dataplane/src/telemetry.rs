//! Lock-free request metrics, and their Prometheus text form (encoded by `prometheus-client`
//! from the atomics at scrape time).
//!
//! Counters live in `Arc`s handed to compiled routes and clusters at compile time, so the
//! request path only does relaxed atomic adds. The registry map is touched only when a config is
//! compiled and when `/metrics` is scraped; stats of a route or cluster survive reloads because
//! the compiler looks them up by name.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

use crate::upstream::UpstreamError;

/// A histogram's bucket bounds, in what it records (microseconds for a duration), and how many
/// of those make one unit of the values shown.
pub struct Scale {
    bounds: &'static [u64],
    per_unit: f64,
}

/// Ours: seconds.
pub const SECONDS: Scale = Scale {
    bounds: &[
        250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
        10_000_000,
    ],
    per_unit: 1e6,
};

/// Istio's (Envoy's default buckets), in milliseconds.
pub const MILLISECONDS: Scale = Scale {
    bounds: &[
        500,
        1_000,
        5_000,
        10_000,
        25_000,
        50_000,
        100_000,
        250_000,
        500_000,
        1_000_000,
        2_500_000,
        5_000_000,
        10_000_000,
        30_000_000,
        60_000_000,
        300_000_000,
        600_000_000,
        1_800_000_000,
        3_600_000_000,
    ],
    per_unit: 1e3,
};

/// Sizes: bytes, by powers of ten (Istio's request and response sizes).
pub const BYTES: Scale = Scale {
    bounds: &[
        1,
        10,
        100,
        1_000,
        10_000,
        100_000,
        1_000_000,
        10_000_000,
        100_000_000,
        1_000_000_000,
    ],
    per_unit: 1.0,
};

/// The most buckets of any [`Scale`].
const MAX_BUCKETS: usize = 19;

pub struct Histogram {
    scale: &'static Scale,
    buckets: [AtomicU64; MAX_BUCKETS],
    count: AtomicU64,
    sum: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new(&SECONDS)
    }
}

impl Histogram {
    pub fn new(scale: &'static Scale) -> Self {
        debug_assert!(scale.bounds.len() <= MAX_BUCKETS);
        Histogram {
            scale,
            buckets: Default::default(),
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0),
        }
    }

    /// A duration, on a scale of microseconds.
    pub fn observe(&self, d: Duration) {
        self.record(d.as_micros() as u64);
    }

    pub fn record(&self, v: u64) {
        if let Some(i) = self.scale.bounds.iter().position(|b| v <= *b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum.fetch_add(v, Relaxed);
    }

    #[cfg(test)]
    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }
}

/// Responses by status class (index 0 = 1xx … 4 = 5xx).
#[derive(Default)]
pub struct StatusCounts([AtomicU64; 5]);

impl StatusCounts {
    pub fn record(&self, status: u16) {
        let i = (status / 100).clamp(1, 5) as usize - 1;
        self.0[i].fetch_add(1, Relaxed);
    }
}

#[derive(Default)]
pub struct RouteStats {
    pub responses: StatusCounts,
    pub latency: Histogram,
}

#[derive(Default)]
pub struct ClusterStats {
    pub responses: StatusCounts,
    pub latency: Histogram,
    pub errors: [AtomicU64; UpstreamError::ALL.len()],
    pub retries: AtomicU64,
    /// Retries the policy called for but the request's body, longer than the retry buffer and
    /// partly sent, could not be sent again.
    pub retries_abandoned: AtomicU64,
    pub connections_active: AtomicI64,
    pub connections_total: AtomicU64,
    pub ejections: AtomicU64,
    /// Requests and connections balanced over every endpoint: too few were available.
    pub panics: AtomicU64,
    /// Requests and connections sent past the first locality level: out of the proxy's zone,
    /// or to a backup priority.
    pub failovers: AtomicU64,
    /// Bytes forwarded to and from the cluster by L4 (TCP and TLS) routes.
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
}

impl ClusterStats {
    pub fn error(&self, e: UpstreamError) {
        self.errors[e as usize].fetch_add(1, Relaxed);
    }
}

/// One external authorization provider's checks (AuthorizationPolicy CUSTOM), by outcome.
#[derive(Default)]
pub struct CheckStats {
    pub allowed: AtomicU64,
    pub denied: AtomicU64,
    /// It could not be asked, and the request was refused (`statusOnError`).
    pub error: AtomicU64,
    /// It could not be asked, and the request went on (`failOpen`).
    pub failed_open: AtomicU64,
}

#[derive(Default)]
pub struct Registry {
    routes: Mutex<BTreeMap<String, Arc<RouteStats>>>,
    clusters: Mutex<BTreeMap<String, Arc<ClusterStats>>>,
    /// By provider name.
    checks: Mutex<BTreeMap<String, Arc<CheckStats>>>,
    /// By RateLimitPolicy (`namespace/name`).
    rate_limits: Mutex<BTreeMap<String, Arc<crate::ratelimit::RateLimitStats>>>,
    pub config_version: AtomicU64,
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
    pub downstream_active: AtomicI64,
    pub downstream_total: AtomicU64,
    /// Client connections closed at accept because their listener was full.
    pub downstream_rejected: AtomicU64,
    /// Client connections closed because they did not start with the PROXY protocol header
    /// their listener expects.
    pub proxy_protocol_refused: AtomicU64,
    /// Requests that matched no route (404) or no listener host.
    pub unrouted: AtomicU64,
    /// Sidecar connections (shared with the sidecar's listeners).
    pub mesh: Arc<crate::mesh::sidecar::MeshStats>,
}

/// Health of each endpoint, for `/metrics`; the upstream module fills it at scrape time.
pub struct EndpointHealth {
    pub cluster: String,
    pub endpoint: String,
    pub healthy: bool,
    pub active_requests: u32,
}

impl Registry {
    pub fn route(&self, name: &str) -> Arc<RouteStats> {
        self.routes.lock().unwrap().entry(name.to_string()).or_default().clone()
    }

    pub fn cluster(&self, name: &str) -> Arc<ClusterStats> {
        self.clusters
            .lock()
            .unwrap()
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    pub fn rate_limit(&self, policy: &str) -> Arc<crate::ratelimit::RateLimitStats> {
        let mut all = self.rate_limits.lock().unwrap();
        all.entry(policy.to_string()).or_default().clone()
    }

    pub fn checks(&self, provider: &str) -> Arc<CheckStats> {
        self.checks
            .lock()
            .unwrap()
            .entry(provider.to_string())
            .or_default()
            .clone()
    }

    /// Forgets stats of routes, clusters and authorization providers the current config no
    /// longer has.
    pub fn retain(
        &self,
        routes: &dyn Fn(&str) -> bool,
        clusters: &dyn Fn(&str) -> bool,
        providers: &dyn Fn(&str) -> bool,
        rate_limits: &dyn Fn(&str) -> bool,
    ) {
        self.routes.lock().unwrap().retain(|k, _| routes(k));
        self.clusters.lock().unwrap().retain(|k, _| clusters(k));
        self.checks.lock().unwrap().retain(|k, _| providers(k));
        self.rate_limits.lock().unwrap().retain(|k, _| rate_limits(k));
    }

    /// The Prometheus text exposition of every metric (encoded by `prometheus-client`):
    /// `health` and the access log's counts are read at scrape time.
    pub fn render(self: &Arc<Self>, health: Vec<EndpointHealth>, access_log: &crate::access_log::AccessLog) -> String {
        let scrape = Scrape {
            registry: self.clone(),
            health,
            access_log: [
                ("written", access_log.written.load(Relaxed)),
                ("dropped", access_log.dropped.load(Relaxed)),
            ],
        };
        let mut reg = prometheus_client::registry::Registry::default();
        reg.register_collector(Box::new(scrape));
        let mut out = String::with_capacity(16 * 1024);
        prometheus_client::encoding::prometheus_text::encode(&mut out, &reg).expect("writing to a String cannot fail");
        out
    }
}

/// What one scrape reads: the registry, and what the caller knows at scrape time.
struct Scrape {
    registry: Arc<Registry>,
    health: Vec<EndpointHealth>,
    access_log: [(&'static str, u64); 2],
}

impl std::fmt::Debug for Scrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scrape")
    }
}

type Fmt = std::fmt::Result;

/// Istio's standard metrics, by peer: connections (TCP) and the requests served one by one.
fn encode_istio(enc: &mut DescriptorEncoder, peers: &[crate::mesh::peers::Sample]) -> Fmt {
    use crate::mesh::peers::RequestSample;
    let tcp = [("request_protocol", "tcp")];
    let istio = [
        ("istio_tcp_connections_opened", "Connections opened, by peer."),
        ("istio_tcp_connections_closed", "Connections closed, by peer."),
        ("istio_tcp_received_bytes", "Bytes received from the client, by peer."),
        ("istio_tcp_sent_bytes", "Bytes sent to the client, by peer."),
    ];
    // A peer known only by the requests routed to it has no connections of its own to show.
    let connected = || peers.iter().map(|p| (p, p.connections())).filter(|(_, c)| c[0] > 0);
    for (i, (name, help)) in istio.into_iter().enumerate() {
        let samples = connected().map(|(p, c)| ((p.labels.as_slice(), tcp), c[i] as i64));
        family(enc, name, help, MetricType::Counter, samples)?;
    }
    let requests = || {
        peers.iter().flat_map(|p| {
            p.requests().map(move |r| {
                let mut labels = vec![
                    ("request_protocol", r.protocol.to_string()),
                    ("response_code", r.code.clone()),
                ];
                if let Some(status) = r.grpc_status {
                    labels.push(("grpc_response_status", status.to_string()));
                }
                labels.push(("response_flags", r.flag.as_str().to_string()));
                ((p.labels.as_slice(), labels), r)
            })
        })
    };
    family(
        enc,
        "istio_requests",
        "Requests, by peer and response code.",
        MetricType::Counter,
        requests().map(|(labels, r)| (labels, r.count as i64)),
    )?;
    type Measure = for<'a> fn(&'a RequestSample<'a>) -> &'a Histogram;
    let histograms: [(&str, &str, Measure); 3] = [
        (
            "istio_request_duration_milliseconds",
            "Time from the request's head to the response's end, by peer and response code.",
            |r| r.duration,
        ),
        (
            "istio_request_bytes",
            "Request body sizes, by peer and response code.",
            |r| r.request_bytes,
        ),
        (
            "istio_response_bytes",
            "Response body sizes, by peer and response code.",
            |r| r.response_bytes,
        ),
    ];
    for (name, help, measure) in histograms {
        let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
        for (labels, r) in requests() {
            measure(&r).encode(&mut m.encode_family(&labels)?)?;
        }
    }
    Ok(())
}
/// One per-cluster sample's value.
type ClusterValue = fn(&ClusterStats) -> i64;

/// One family without labels.
fn single(enc: &mut DescriptorEncoder, name: &str, help: &str, ty: MetricType, v: i64) -> Fmt {
    let mut m = enc.encode_descriptor(name, help, None, ty)?;
    match ty {
        MetricType::Counter => m.encode_counter::<NoLabelSet, _, u64>(&(v as u64), None),
        _ => m.encode_gauge(&v),
    }
}

/// One family whose samples differ by labels.
fn family<'a, L: EncodeLabelSet + 'a>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    ty: MetricType,
    samples: impl IntoIterator<Item = (L, i64)>,
) -> Fmt {
    let mut m = enc.encode_descriptor(name, help, None, ty)?;
    for (labels, v) in samples {
        let mut s = m.encode_family(&labels)?;
        match ty {
            MetricType::Counter => s.encode_counter::<NoLabelSet, _, u64>(&(v as u64), None)?,
            _ => s.encode_gauge(&v)?,
        }
    }
    Ok(())
}

impl Histogram {
    fn encode(&self, m: &mut MetricEncoder<'_>) -> Fmt {
        let unit = self.scale.per_unit;
        let mut buckets: Vec<(f64, u64)> = (self.scale.bounds.iter())
            .zip(&self.buckets)
            .map(|(b, c)| (*b as f64 / unit, c.load(Relaxed)))
            .collect();
        // Prometheus needs `le="+Inf"` (histogram_quantile is NaN without it): what no bound held.
        let count = self.count.load(Relaxed);
        let bounded: u64 = buckets.iter().map(|(_, n)| n).sum();
        buckets.push((f64::INFINITY, count.saturating_sub(bounded)));
        let sum = self.sum.load(Relaxed) as f64 / unit;
        m.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }
}

impl StatusCounts {
    /// The classes seen so far, as `code` labels.
    fn samples(&self) -> impl Iterator<Item = (&'static str, i64)> + '_ {
        const CODES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
        CODES
            .into_iter()
            .zip(&self.0)
            .map(|(code, c)| (code, c.load(Relaxed) as i64))
            .filter(|(_, v)| *v > 0)
    }
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> Fmt {
        let r = &*self.registry;
        let (counter, gauge) = (MetricType::Counter, MetricType::Gauge);
        let load = |a: &AtomicU64| a.load(Relaxed) as i64;
        single(
            &mut enc,
            "ferrum_config_version",
            "Version of the snapshot being served.",
            gauge,
            load(&r.config_version),
        )?;
        family(
            &mut enc,
            "ferrum_config_reloads",
            "Config reloads by result.",
            counter,
            [
                ([("result", "ok")], load(&r.reloads_ok)),
                ([("result", "rejected")], load(&r.reloads_failed)),
            ],
        )?;
        single(
            &mut enc,
            "ferrum_downstream_connections_active",
            "Open client connections.",
            gauge,
            r.downstream_active.load(Relaxed),
        )?;
        single(
            &mut enc,
            "ferrum_downstream_connections",
            "Accepted client connections.",
            counter,
            load(&r.downstream_total),
        )?;
        single(
            &mut enc,
            "ferrum_downstream_connections_rejected",
            "Client connections closed at accept because their listener had --max-connections open.",
            counter,
            load(&r.downstream_rejected),
        )?;
        single(
            &mut enc,
            "ferrum_downstream_proxy_protocol_refused",
            "Client connections closed because they did not start with the PROXY protocol header their listener expects.",
            counter,
            load(&r.proxy_protocol_refused),
        )?;
        single(
            &mut enc,
            "ferrum_unrouted_requests",
            "Requests that matched no route.",
            counter,
            load(&r.unrouted),
        )?;
        family(
            &mut enc,
            "ferrum_access_log_lines",
            "Access log lines by result: written, or dropped because the writer fell behind.",
            counter,
            self.access_log
                .iter()
                .map(|(result, v)| ([("result", *result)], *v as i64)),
        )?;
        self.encode_heap(&mut enc)?;
        self.encode_mesh(&mut enc)?;
        self.encode_checks(&mut enc)?;
        self.encode_rate_limits(&mut enc)?;
        self.encode_routes(&mut enc)?;
        self.encode_clusters(&mut enc)?;
        self.encode_endpoints(&mut enc)
    }
}

impl Scrape {
    /// Responses and their latency by route.
    fn encode_routes(&self, enc: &mut DescriptorEncoder) -> Fmt {
        let (counter, histogram) = (MetricType::Counter, MetricType::Histogram);
        let routes = self.registry.routes.lock().unwrap().clone();
        family(
            enc,
            "ferrum_route_requests",
            "Responses by route and status class.",
            counter,
            routes.iter().flat_map(|(name, s)| {
                s.responses
                    .samples()
                    .map(move |(code, v)| ([("route", name.as_str()), ("code", code)], v))
            }),
        )?;
        let mut m = enc.encode_descriptor(
            "ferrum_route_request_duration_seconds",
            "Time to response headers by route.",
            None,
            histogram,
        )?;
        for (name, s) in &routes {
            s.latency.encode(&mut m.encode_family(&[("route", name.as_str())])?)?;
        }
        Ok(())
    }

    /// Health and requests in flight by endpoint.
    fn encode_endpoints(&self, enc: &mut DescriptorEncoder) -> Fmt {
        let gauge = MetricType::Gauge;
        family(
            enc,
            "ferrum_endpoint_healthy",
            "1 when the endpoint receives traffic (health checks and outlier detection).",
            gauge,
            self.health.iter().map(|h| {
                (
                    [("cluster", h.cluster.as_str()), ("endpoint", h.endpoint.as_str())],
                    i64::from(h.healthy),
                )
            }),
        )?;
        family(
            enc,
            "ferrum_endpoint_active_requests",
            "Requests in flight per endpoint.",
            gauge,
            self.health.iter().map(|h| {
                (
                    [("cluster", h.cluster.as_str()), ("endpoint", h.endpoint.as_str())],
                    i64::from(h.active_requests),
                )
            }),
        )
    }

    /// The allocator's figures and how often it handed freed pages back.
    fn encode_heap(&self, enc: &mut DescriptorEncoder) -> Fmt {
        let Some(h) = crate::memory::heap() else {
            return Ok(());
        };
        family(
            enc,
            "ferrum_heap_bytes",
            "Heap bytes held by the allocator: allocated to the proxy, or free for reuse.",
            MetricType::Gauge,
            [
                ([("state", "allocated")], h.allocated as i64),
                ([("state", "free")], h.free as i64),
            ],
        )?;
        single(
            enc,
            "ferrum_heap_releases",
            "Purges that handed pages the proxy freed back to the OS.",
            MetricType::Counter,
            h.releases as i64,
        )
    }

    /// External authorization checks by provider and outcome.
    fn encode_checks(&self, enc: &mut DescriptorEncoder) -> Fmt {
        let checks = self.registry.checks.lock().unwrap().clone();
        family(
            enc,
            "ferrum_ext_authz_checks",
            "External authorization checks (AuthorizationPolicy CUSTOM) by provider and result.",
            MetricType::Counter,
            checks.iter().flat_map(|(provider, s)| {
                [
                    ("allowed", &s.allowed),
                    ("denied", &s.denied),
                    ("error", &s.error),
                    ("failed_open", &s.failed_open),
                ]
                .map(|(result, v)| {
                    (
                        [("provider", provider.as_str()), ("result", result)],
                        v.load(Relaxed) as i64,
                    )
                })
            }),
        )
    }

    /// Requests counted by rate limits, by policy and outcome.
    fn encode_rate_limits(&self, enc: &mut DescriptorEncoder) -> Fmt {
        let all = self.registry.rate_limits.lock().unwrap().clone();
        family(
            enc,
            "ferrum_rate_limit_requests",
            "Requests counted by RateLimitPolicies, by policy and result (error: not counted, Redis failed or the client table was full).",
            MetricType::Counter,
            all.iter().flat_map(|(policy, s)| {
                [("allowed", &s.allowed), ("limited", &s.limited), ("error", &s.error)].map(|(result, v)| {
                    (
                        [("policy", policy.as_str()), ("result", result)],
                        v.load(Relaxed) as i64,
                    )
                })
            }),
        )
    }

    /// Sidecar connection counters (all zero outside sidecar mode).
    fn encode_mesh(&self, enc: &mut DescriptorEncoder) -> Fmt {
        let m = &self.registry.mesh;
        let connections = [
            ("outbound", "hbone", &m.outbound_hbone),
            ("outbound", "plain", &m.outbound_plain),
            ("outbound", "passthrough", &m.outbound_passthrough),
            ("outbound", "blocked", &m.outbound_blocked),
            ("outbound", "failed", &m.outbound_failed),
            ("outbound", "routed", &m.outbound_routed),
            ("inbound", "hbone", &m.inbound_hbone),
            ("inbound", "plaintext", &m.inbound_plaintext),
            ("inbound", "refused", &m.inbound_refused),
            ("inbound", "denied", &m.inbound_denied),
            ("inbound", "unauthenticated", &m.inbound_unauthenticated),
        ];
        family(
            enc,
            "ferrum_mesh_connections",
            "Sidecar connections by direction and path.",
            MetricType::Counter,
            connections
                .iter()
                .map(|(dir, path, v)| ([("direction", *dir), ("path", *path)], v.load(Relaxed) as i64)),
        )?;
        family(
            enc,
            "ferrum_mesh_hbone_connections",
            "Client HBONE connections open to peer proxies.",
            MetricType::Gauge,
            [([] as [(&str, &str); 0], m.hbone_connections.load(Relaxed) as i64)],
        )?;
        family(
            enc,
            "ferrum_mesh_bytes",
            "Bytes relayed by sidecar connections, client to server (forward) and back.",
            MetricType::Counter,
            [
                ([("direction", "forward")], m.bytes_forward.load(Relaxed) as i64),
                ([("direction", "back")], m.bytes_back.load(Relaxed) as i64),
            ],
        )?;
        let peers = m.peers.samples();
        if peers.is_empty() {
            return Ok(());
        }
        encode_istio(enc, &peers)
    }

    fn encode_clusters(&self, enc: &mut DescriptorEncoder) -> Fmt {
        let clusters = self.registry.clusters.lock().unwrap().clone();
        family(
            enc,
            "ferrum_cluster_requests",
            "Upstream responses by cluster and status class.",
            MetricType::Counter,
            clusters.iter().flat_map(|(name, s)| {
                s.responses
                    .samples()
                    .map(move |(code, v)| ([("cluster", name.as_str()), ("code", code)], v))
            }),
        )?;
        let mut m = enc.encode_descriptor(
            "ferrum_cluster_upstream_duration_seconds",
            "Upstream time to response headers.",
            None,
            MetricType::Histogram,
        )?;
        for (name, s) in &clusters {
            s.latency.encode(&mut m.encode_family(&[("cluster", name.as_str())])?)?;
        }
        family(
            enc,
            "ferrum_cluster_upstream_errors",
            "Requests that got no upstream response, by reason.",
            MetricType::Counter,
            clusters.iter().flat_map(|(name, s)| {
                UpstreamError::ALL.into_iter().map(move |e| {
                    (
                        [("cluster", name.as_str()), ("reason", e.as_str())],
                        s.errors[e as usize].load(Relaxed) as i64,
                    )
                })
            }),
        )?;
        for (name, ty, help, f) in PER_CLUSTER {
            family(
                enc,
                name,
                help,
                ty,
                clusters.iter().map(|(c, s)| ([("cluster", c.as_str())], f(s))),
            )?;
        }
        Ok(())
    }
}

/// The counters and gauges kept per cluster, each one family with a `cluster` label.
const PER_CLUSTER: [(&str, MetricType, &str, ClusterValue); 9] = [
    ("ferrum_cluster_retries", MetricType::Counter, "Retries sent.", |s| {
        s.retries.load(Relaxed) as i64
    }),
    (
        "ferrum_cluster_lb_failover",
        MetricType::Counter,
        "Requests sent out of the proxy's zone, or to a backup priority, by locality failover.",
        |s| s.failovers.load(Relaxed) as i64,
    ),
    (
        "ferrum_cluster_lb_panic",
        MetricType::Counter,
        "Requests balanced over every endpoint, available or not: fewer than the panic threshold were available.",
        |s| s.panics.load(Relaxed) as i64,
    ),
    (
        "ferrum_cluster_retries_abandoned",
        MetricType::Counter,
        "Retries not sent: the request's body outgrew the retry buffer.",
        |s| s.retries_abandoned.load(Relaxed) as i64,
    ),
    (
        "ferrum_cluster_connections_active",
        MetricType::Gauge,
        "Open upstream connections.",
        |s| s.connections_active.load(Relaxed),
    ),
    (
        "ferrum_cluster_connections",
        MetricType::Counter,
        "Upstream connections opened.",
        |s| s.connections_total.load(Relaxed) as i64,
    ),
    (
        "ferrum_cluster_ejections",
        MetricType::Counter,
        "Endpoints ejected by outlier detection.",
        |s| s.ejections.load(Relaxed) as i64,
    ),
    (
        "ferrum_cluster_l4_bytes_sent",
        MetricType::Counter,
        "Bytes TCP and TLS routes forwarded to the cluster.",
        |s| s.bytes_sent.load(Relaxed) as i64,
    ),
    (
        "ferrum_cluster_l4_bytes_received",
        MetricType::Counter,
        "Bytes TCP and TLS routes forwarded from the cluster.",
        |s| s.bytes_received.load(Relaxed) as i64,
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let r = Registry::default();
        let s = r.route("default/r/0/0");
        s.responses.record(200);
        s.responses.record(503);
        s.latency.observe(Duration::from_millis(3));
        s.latency.observe(Duration::from_secs(20));
        r.cluster("c").error(UpstreamError::Timeout);
        let r = Arc::new(r);
        let text = r.render(
            vec![EndpointHealth {
                cluster: "c".into(),
                endpoint: "1.2.3.4:80".into(),
                healthy: false,
                active_requests: 0,
            }],
            &Default::default(),
        );
        assert!(text.contains("ferrum_route_requests_total{route=\"default/r/0/0\",code=\"2xx\"} 1"));
        assert!(text.contains("ferrum_route_requests_total{route=\"default/r/0/0\",code=\"5xx\"} 1"));
        assert!(text.contains("ferrum_route_request_duration_seconds_bucket{route=\"default/r/0/0\",le=\"0.005\"} 1"));
        assert!(text.contains("ferrum_route_request_duration_seconds_bucket{route=\"default/r/0/0\",le=\"0.0025\"} 0"));
        // Past the last bound, only in +Inf (which the count matches, as Prometheus needs).
        assert!(text.contains("ferrum_route_request_duration_seconds_bucket{route=\"default/r/0/0\",le=\"10\"} 1"));
        assert!(text.contains("ferrum_route_request_duration_seconds_bucket{route=\"default/r/0/0\",le=\"+Inf\"} 2"));
        assert!(text.contains("ferrum_route_request_duration_seconds_count{route=\"default/r/0/0\"} 2"));
        assert!(text.contains("ferrum_cluster_upstream_errors_total{cluster=\"c\",reason=\"upstream_timeout\"} 1"));
        assert!(text.contains("ferrum_endpoint_healthy{cluster=\"c\",endpoint=\"1.2.3.4:80\"} 0"));
        // Label values are escaped (a DNS endpoint name is the user's text).
        let text = r.render(
            vec![EndpointHealth {
                cluster: "c".into(),
                endpoint: "we\"ird\n:80".into(),
                healthy: true,
                active_requests: 0,
            }],
            &Default::default(),
        );
        assert!(text.contains(r#"endpoint="we\"ird\n:80"} 1"#), "{text}");
        assert!(text.contains("# TYPE ferrum_config_reloads_total counter\n"), "{text}");
    }
}
