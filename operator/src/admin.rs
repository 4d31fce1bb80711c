//! Operator admin HTTP: `/ready`, `/live`, `/proxies`, `/snapshot`, `/problems`, `/resources`,
//! `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};

use crate::proxies::Proxies;
use crate::publish::Publisher;

pub struct Admin {
    pub publisher: Arc<Publisher>,
    pub proxies: Arc<Proxies>,
    pub ready: Arc<AtomicBool>,
    pub leader: Arc<AtomicBool>,
    /// The generation whose statuses are all written (or were found right): 0 on a follower
    /// and until the leader's first pass ends.
    pub status_generation: Arc<std::sync::atomic::AtomicU64>,
    /// The watched kinds and whether the cluster serves them.
    pub kinds: crate::controller::Kinds,
}

use ferrum_admin::reply;

impl Admin {
    /// Health and metrics answer anyone (probes, Prometheus); the views that describe the mesh
    /// (`/proxies`, `/snapshot`, `/problems`) only a local peer (`kubectl port-forward` arrives
    /// as one).
    fn route(&self, req: &Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        let json = |v: serde_json::Value| {
            reply(
                StatusCode::OK,
                "application/json",
                serde_json::to_vec_pretty(&v).unwrap_or_default(),
            )
        };
        let path = req.uri().path();
        if matches!(path, "/proxies" | "/snapshot" | "/problems" | "/resources") && !peer.ip().is_loopback() {
            return reply(StatusCode::FORBIDDEN, "text/plain", "local clients only\n");
        }
        match path {
            "/live" => reply(StatusCode::OK, "text/plain", "live\n"),
            "/ready" => {
                // Ready once serving with every required kind listed; the detail names the kinds
                // the cluster does not serve.
                let (kinds_ok, detail) = crate::controller::readiness(&self.kinds);
                if self.ready.load(Relaxed) && kinds_ok {
                    reply(StatusCode::OK, "text/plain", format!("ready\n{detail}"))
                } else {
                    reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        format!("not ready\n{detail}"),
                    )
                }
            }
            "/proxies" => json(serde_json::json!({
                "generation": self.publisher.current().generation,
                "proxies": self.proxies.list(),
            })),
            // What the translator reads (Secrets' values replaced), for `ferrumctl diff`.
            "/resources" => json(self.publisher.current().resources.to_list()),
            "/snapshot" => {
                let cur = self.publisher.current();
                json(serde_json::to_value(&cur.translation.snapshot).unwrap_or_default())
            }
            "/problems" => {
                let cur = self.publisher.current();
                json(serde_json::json!({
                    "generation": cur.generation,
                    "problems": cur.translation.problems.iter().map(|p| serde_json::json!({
                        "object": p.object.to_string(), "field": p.field, "reason": p.reason.as_str(), "message": p.message,
                        // A condition the object reports, not input the translator refused.
                        "condition": p.reason.is_condition(),
                    })).collect::<Vec<_>>(),
                }))
            }
            "/metrics" => reply(StatusCode::OK, "text/plain; version=0.0.4", self.metrics()),
            _ => reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "try /ready /live /proxies /snapshot /problems /metrics\n",
            ),
        }
    }

    /// The Prometheus text exposition (encoded by `prometheus-client`: label values such as a
    /// proxy's chosen node id are escaped).
    fn metrics(&self) -> String {
        let cur = self.publisher.current();
        let scrape = Scrape {
            gauges: [
                (
                    "ferrum_operator_generation",
                    "Generation of the published snapshot.",
                    cur.generation as i64,
                ),
                (
                    "ferrum_operator_status_generation",
                    "Generation whose statuses are all written (0 until then, and on a follower).",
                    self.status_generation.load(Relaxed) as i64,
                ),
                (
                    "ferrum_operator_translate_milliseconds",
                    "Time the last translation took.",
                    cur.translate_ms as i64,
                ),
                (
                    "ferrum_operator_full_translate_milliseconds",
                    "Time the last full (non-incremental) translation took.",
                    cur.cold_translate_ms as i64,
                ),
                (
                    "ferrum_operator_delta_bytes",
                    "Size of the last MeshSubscribe delta.",
                    cur.delta.as_ref().map_or(0, |d| d.body.len()) as i64,
                ),
                (
                    "ferrum_operator_problems",
                    "Objects with a problem in the last translation.",
                    cur.translation.problems.len() as i64,
                ),
                (
                    "ferrum_operator_leader",
                    "1 while this replica leads.",
                    i64::from(self.leader.load(Relaxed)),
                ),
            ],
            routes: [
                ("translated", cur.stats.routes_translated as i64),
                ("reused", cur.stats.routes_reused as i64),
            ],
            proxies: self
                .proxies
                .list()
                .into_iter()
                .map(|p| (p.node_id, p.role, p.applied_version as i64, p.last_rejection.is_some()))
                .collect(),
        };
        let mut reg = prometheus_client::registry::Registry::default();
        reg.register_collector(Box::new(scrape));
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &reg).expect("writing to a String cannot fail");
        out
    }
}

/// (node, role, applied version, last update rejected).
type ProxyRow = (String, String, i64, bool);
type ProxyValue = fn(&ProxyRow) -> i64;

/// What one scrape of the operator reads.
struct Scrape {
    gauges: [(&'static str, &'static str, i64); 7],
    /// Routes of the last translation by outcome.
    routes: [(&'static str, i64); 2],
    proxies: Vec<ProxyRow>,
}

impl std::fmt::Debug for Scrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scrape")
    }
}

impl prometheus_client::collector::Collector for Scrape {
    fn encode(&self, mut enc: prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        use prometheus_client::metrics::MetricType::Gauge;
        for (name, help, v) in &self.gauges {
            enc.encode_descriptor(name, help, None, Gauge)?.encode_gauge(v)?;
        }
        let mut m = enc.encode_descriptor(
            "ferrum_operator_last_translation_routes",
            "Routes of the last translation, translated or reused.",
            None,
            Gauge,
        )?;
        for (outcome, v) in &self.routes {
            m.encode_family(&[("outcome", *outcome)])?.encode_gauge(v)?;
        }
        enc.encode_descriptor("ferrum_operator_proxies", "Connected proxies.", None, Gauge)?
            .encode_gauge(&(self.proxies.len() as i64))?;
        let per_proxy: [(&str, &str, ProxyValue); 2] = [
            (
                "ferrum_operator_proxy_applied_version",
                "Snapshot version each proxy applied.",
                |p| p.2,
            ),
            (
                "ferrum_operator_proxy_rejected",
                "1 when a proxy rejected its last update.",
                |p| i64::from(p.3),
            ),
        ];
        for (name, help, f) in per_proxy {
            let mut m = enc.encode_descriptor(name, help, None, Gauge)?;
            for p in &self.proxies {
                m.encode_family(&[("node", p.0.as_str()), ("role", p.1.as_str())])?
                    .encode_gauge(&f(p))?;
            }
        }
        Ok(())
    }
}

pub async fn serve(addr: SocketAddr, admin: Arc<Admin>) -> std::io::Result<()> {
    let l = tokio::net::TcpListener::bind(addr).await?;
    tokio::spawn(ferrum_admin::serve(vec![l], move |req, peer| {
        std::future::ready(admin.route(&req, peer))
    }));
    Ok(())
}
