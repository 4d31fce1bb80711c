//! Lock-free request metrics and their Prometheus text form.
//!
//! Counters live in `Arc`s handed to compiled routes and clusters at compile time, so the
//! request path only does relaxed atomic adds. The registry map is touched only when a config is
//! compiled and when `/metrics` is scraped; stats of a route or cluster survive reloads because
//! the compiler looks them up by name.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Upper bounds in microseconds.
const BUCKETS_US: [u64; 14] = [
    250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 10_000_000,
];

#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS_US.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let us = d.as_micros() as u64;
        if let Some(i) = BUCKETS_US.iter().position(|b| us <= *b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (i, b) in BUCKETS_US.iter().enumerate() {
            cumulative += self.buckets[i].load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{}\"}} {cumulative}", *b as f64 / 1e6);
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum_us.load(Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
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
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        for (i, c) in self.0.iter().enumerate() {
            let v = c.load(Relaxed);
            if v > 0 {
                let _ = writeln!(out, "{name}{{{labels},code=\"{}xx\"}} {v}", i + 1);
            }
        }
    }
}

#[derive(Default)]
pub struct RouteStats {
    pub responses: StatusCounts,
    pub latency: Histogram,
}

/// Why a request to a cluster failed without an upstream response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamError {
    ConnectFailure,
    Timeout,
    Reset,
    Overflow,
    NoHealthyUpstream,
    /// A response no client may be sent: a status outside 100-599, or a 101 nobody asked for.
    InvalidResponse,
}

impl UpstreamError {
    const ALL: [UpstreamError; 6] = [
        UpstreamError::ConnectFailure,
        UpstreamError::Timeout,
        UpstreamError::Reset,
        UpstreamError::Overflow,
        UpstreamError::NoHealthyUpstream,
        UpstreamError::InvalidResponse,
    ];
    /// Also the value of the `x-ferrum-error` response header.
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamError::ConnectFailure => "upstream_connect_failure",
            UpstreamError::Timeout => "upstream_timeout",
            UpstreamError::Reset => "upstream_reset",
            UpstreamError::Overflow => "upstream_overflow",
            UpstreamError::NoHealthyUpstream => "no_healthy_upstream",
            UpstreamError::InvalidResponse => "upstream_invalid_response",
        }
    }
}

#[derive(Default)]
pub struct ClusterStats {
    pub responses: StatusCounts,
    pub latency: Histogram,
    pub errors: [AtomicU64; UpstreamError::ALL.len()],
    pub retries: AtomicU64,
    pub connections_active: AtomicI64,
    pub connections_total: AtomicU64,
    pub ejections: AtomicU64,
    /// Bytes forwarded to and from the cluster by L4 (TCP and TLS) routes.
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
}

impl ClusterStats {
    pub fn error(&self, e: UpstreamError) {
        self.errors[e as usize].fetch_add(1, Relaxed);
    }
}

#[derive(Default)]
pub struct Registry {
    routes: Mutex<BTreeMap<String, Arc<RouteStats>>>,
    clusters: Mutex<BTreeMap<String, Arc<ClusterStats>>>,
    pub config_version: AtomicU64,
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
    pub downstream_active: AtomicI64,
    pub downstream_total: AtomicU64,
    /// Client connections closed at accept because their listener was full.
    pub downstream_rejected: AtomicU64,
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

    /// Forgets stats of routes and clusters the current config no longer has.
    pub fn retain(&self, routes: &dyn Fn(&str) -> bool, clusters: &dyn Fn(&str) -> bool) {
        self.routes.lock().unwrap().retain(|k, _| routes(k));
        self.clusters.lock().unwrap().retain(|k, _| clusters(k));
    }

    /// Sidecar connection counters (all zero outside sidecar mode).
    fn render_mesh(&self, out: &mut String) {
        let m = &self.mesh;
        let _ = writeln!(
            out,
            "# HELP ferrum_mesh_connections_total Sidecar connections by direction and path.\n# TYPE ferrum_mesh_connections_total counter"
        );
        for (dir, path, v) in [
            ("outbound", "hbone", &m.outbound_hbone),
            ("outbound", "plain", &m.outbound_plain),
            ("outbound", "passthrough", &m.outbound_passthrough),
            ("outbound", "failed", &m.outbound_failed),
            ("outbound", "routed", &m.outbound_routed),
            ("inbound", "hbone", &m.inbound_hbone),
            ("inbound", "plaintext", &m.inbound_plaintext),
            ("inbound", "refused", &m.inbound_refused),
            ("inbound", "denied", &m.inbound_denied),
            ("inbound", "unauthenticated", &m.inbound_unauthenticated),
        ] {
            let _ = writeln!(
                out,
                "ferrum_mesh_connections_total{{direction=\"{dir}\",path=\"{path}\"}} {}",
                v.load(Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP ferrum_mesh_bytes_total Bytes relayed by sidecar connections, client to server (forward) and back.\n# TYPE ferrum_mesh_bytes_total counter"
        );
        let _ = writeln!(
            out,
            "ferrum_mesh_bytes_total{{direction=\"forward\"}} {}",
            m.bytes_forward.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "ferrum_mesh_bytes_total{{direction=\"back\"}} {}",
            m.bytes_back.load(Relaxed)
        );
    }

    pub fn render(&self, health: &[EndpointHealth], access_log: &crate::access_log::AccessLog) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let g = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        g(
            &mut out,
            "ferrum_config_version",
            "gauge",
            "Version of the snapshot being served.",
        );
        let _ = writeln!(out, "ferrum_config_version {}", self.config_version.load(Relaxed));
        g(
            &mut out,
            "ferrum_config_reloads_total",
            "counter",
            "Config reloads by result.",
        );
        let _ = writeln!(
            out,
            "ferrum_config_reloads_total{{result=\"ok\"}} {}",
            self.reloads_ok.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "ferrum_config_reloads_total{{result=\"rejected\"}} {}",
            self.reloads_failed.load(Relaxed)
        );
        g(
            &mut out,
            "ferrum_downstream_connections_active",
            "gauge",
            "Open client connections.",
        );
        let _ = writeln!(
            out,
            "ferrum_downstream_connections_active {}",
            self.downstream_active.load(Relaxed)
        );
        g(
            &mut out,
            "ferrum_downstream_connections_total",
            "counter",
            "Accepted client connections.",
        );
        let _ = writeln!(
            out,
            "ferrum_downstream_connections_total {}",
            self.downstream_total.load(Relaxed)
        );
        g(
            &mut out,
            "ferrum_downstream_connections_rejected_total",
            "counter",
            "Client connections closed at accept because their listener had --max-connections open.",
        );
        let _ = writeln!(
            out,
            "ferrum_downstream_connections_rejected_total {}",
            self.downstream_rejected.load(Relaxed)
        );
        g(
            &mut out,
            "ferrum_unrouted_requests_total",
            "counter",
            "Requests that matched no route.",
        );
        let _ = writeln!(out, "ferrum_unrouted_requests_total {}", self.unrouted.load(Relaxed));
        g(
            &mut out,
            "ferrum_access_log_lines_total",
            "counter",
            "Access log lines by result: written, or dropped because the writer fell behind.",
        );
        for (result, v) in [("written", &*access_log.written), ("dropped", &access_log.dropped)] {
            let _ = writeln!(
                out,
                "ferrum_access_log_lines_total{{result=\"{result}\"}} {}",
                v.load(Relaxed)
            );
        }
        self.render_mesh(&mut out);

        let routes = self.routes.lock().unwrap().clone();
        g(
            &mut out,
            "ferrum_route_requests_total",
            "counter",
            "Responses by route and status class.",
        );
        for (name, s) in &routes {
            s.responses
                .render(&mut out, "ferrum_route_requests_total", &format!("route=\"{name}\""));
        }
        g(
            &mut out,
            "ferrum_route_request_duration_seconds",
            "histogram",
            "Time to response headers by route.",
        );
        for (name, s) in &routes {
            s.latency.render(
                &mut out,
                "ferrum_route_request_duration_seconds",
                &format!("route=\"{name}\""),
            );
        }

        let clusters = self.clusters.lock().unwrap().clone();
        g(
            &mut out,
            "ferrum_cluster_requests_total",
            "counter",
            "Upstream responses by cluster and status class.",
        );
        for (name, s) in &clusters {
            s.responses.render(
                &mut out,
                "ferrum_cluster_requests_total",
                &format!("cluster=\"{name}\""),
            );
        }
        g(
            &mut out,
            "ferrum_cluster_upstream_duration_seconds",
            "histogram",
            "Upstream time to response headers.",
        );
        for (name, s) in &clusters {
            s.latency.render(
                &mut out,
                "ferrum_cluster_upstream_duration_seconds",
                &format!("cluster=\"{name}\""),
            );
        }
        g(
            &mut out,
            "ferrum_cluster_upstream_errors_total",
            "counter",
            "Requests that got no upstream response, by reason.",
        );
        for (name, s) in &clusters {
            for e in UpstreamError::ALL {
                let _ = writeln!(
                    out,
                    "ferrum_cluster_upstream_errors_total{{cluster=\"{name}\",reason=\"{}\"}} {}",
                    e.as_str(),
                    s.errors[e as usize].load(Relaxed)
                );
            }
        }
        for (metric, kind, help, f) in [
            (
                "ferrum_cluster_retries_total",
                "counter",
                "Retries sent.",
                (|s: &ClusterStats| s.retries.load(Relaxed) as i64) as fn(&ClusterStats) -> i64,
            ),
            (
                "ferrum_cluster_connections_active",
                "gauge",
                "Open upstream connections.",
                |s| s.connections_active.load(Relaxed),
            ),
            (
                "ferrum_cluster_connections_total",
                "counter",
                "Upstream connections opened.",
                |s| s.connections_total.load(Relaxed) as i64,
            ),
            (
                "ferrum_cluster_ejections_total",
                "counter",
                "Endpoints ejected by outlier detection.",
                |s| s.ejections.load(Relaxed) as i64,
            ),
            (
                "ferrum_cluster_l4_bytes_sent_total",
                "counter",
                "Bytes TCP and TLS routes forwarded to the cluster.",
                |s| s.bytes_sent.load(Relaxed) as i64,
            ),
            (
                "ferrum_cluster_l4_bytes_received_total",
                "counter",
                "Bytes TCP and TLS routes forwarded from the cluster.",
                |s| s.bytes_received.load(Relaxed) as i64,
            ),
        ] {
            g(&mut out, metric, kind, help);
            for (name, s) in &clusters {
                let _ = writeln!(out, "{metric}{{cluster=\"{name}\"}} {}", f(s));
            }
        }
        g(
            &mut out,
            "ferrum_endpoint_healthy",
            "gauge",
            "1 when the endpoint receives traffic (health checks and outlier detection).",
        );
        for h in health {
            let _ = writeln!(
                out,
                "ferrum_endpoint_healthy{{cluster=\"{}\",endpoint=\"{}\"}} {}",
                h.cluster,
                h.endpoint,
                u8::from(h.healthy)
            );
        }
        g(
            &mut out,
            "ferrum_endpoint_active_requests",
            "gauge",
            "Requests in flight per endpoint.",
        );
        for h in health {
            let _ = writeln!(
                out,
                "ferrum_endpoint_active_requests{{cluster=\"{}\",endpoint=\"{}\"}} {}",
                h.cluster, h.endpoint, h.active_requests
            );
        }
        out
    }
}

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
        r.cluster("c").error(UpstreamError::Timeout);
        let text = r.render(
            &[EndpointHealth {
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
        assert!(text.contains("ferrum_cluster_upstream_errors_total{cluster=\"c\",reason=\"upstream_timeout\"} 1"));
        assert!(text.contains("ferrum_endpoint_healthy{cluster=\"c\",endpoint=\"1.2.3.4:80\"} 0"));
    }
}
