//! Operator admin HTTP: `/ready`, `/live`, `/proxies`, `/snapshot`, `/problems`, `/resources`,
//! `/metrics`.

use std::convert::Infallible;
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use crate::publish::Publisher;
use crate::subscribe::Proxies;

pub struct Admin {
    pub publisher: Arc<Publisher>,
    pub proxies: Arc<Proxies>,
    pub ready: Arc<AtomicBool>,
    pub leader: Arc<AtomicBool>,
    /// The watched kinds and whether the cluster serves them.
    pub kinds: crate::controller::Kinds,
}

fn reply(status: StatusCode, ct: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(ct));
    r
}

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
                json(serde_json::to_value(&cur.full.snapshot).unwrap_or_default())
            }
            "/problems" => {
                let cur = self.publisher.current();
                json(serde_json::json!({
                    "generation": cur.generation,
                    "problems": cur.full.problems.iter().map(|p| serde_json::json!({
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

    fn metrics(&self) -> String {
        let cur = self.publisher.current();
        let proxies = self.proxies.list();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# TYPE ferrum_operator_generation gauge\nferrum_operator_generation {}",
            cur.generation
        );
        let _ = writeln!(
            out,
            "# TYPE ferrum_operator_translate_milliseconds gauge\nferrum_operator_translate_milliseconds {}",
            cur.translate_ms
        );
        let _ = writeln!(
            out,
            "# TYPE ferrum_operator_full_translate_milliseconds gauge\nferrum_operator_full_translate_milliseconds {}",
            cur.full_translate_ms
        );
        let _ = writeln!(
            out,
            "# TYPE ferrum_operator_last_translation_routes gauge\n\
             ferrum_operator_last_translation_routes{{outcome=\"translated\"}} {}\n\
             ferrum_operator_last_translation_routes{{outcome=\"reused\"}} {}",
            cur.stats.routes_translated, cur.stats.routes_reused
        );
        let _ = writeln!(
            out,
            "# TYPE ferrum_operator_delta_bytes gauge\nferrum_operator_delta_bytes {}",
            cur.delta.as_ref().map_or(0, |d| d.body.len())
        );
        let _ = writeln!(
            out,
            "# TYPE ferrum_operator_problems gauge\nferrum_operator_problems {}",
            cur.full.problems.len()
        );
        let _ = writeln!(
            out,
            "# TYPE ferrum_operator_leader gauge\nferrum_operator_leader {}",
            u8::from(self.leader.load(Relaxed))
        );
        let _ = writeln!(
            out,
            "# TYPE ferrum_operator_proxies gauge\nferrum_operator_proxies {}",
            proxies.len()
        );
        let _ = writeln!(out, "# TYPE ferrum_operator_proxy_applied_version gauge");
        for p in &proxies {
            let _ = writeln!(
                out,
                "ferrum_operator_proxy_applied_version{{node=\"{}\",role=\"{}\"}} {}",
                p.node_id, p.role, p.applied_version
            );
        }
        let _ = writeln!(out, "# TYPE ferrum_operator_proxy_rejected gauge");
        for p in &proxies {
            let _ = writeln!(
                out,
                "ferrum_operator_proxy_rejected{{node=\"{}\",role=\"{}\"}} {}",
                p.node_id,
                p.role,
                u8::from(p.last_rejection.is_some())
            );
        }
        out
    }
}

pub async fn serve(addr: SocketAddr, admin: Arc<Admin>) -> std::io::Result<()> {
    let l = tokio::net::TcpListener::bind(addr).await?;
    tokio::spawn(async move {
        loop {
            let Ok((s, peer)) = l.accept().await else { continue };
            let admin = admin.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let r = admin.route(&req, peer);
                    async move { Ok::<_, Infallible>(r) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(5))
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Ok(())
}
