//! The admin listener (its own port): `/ready`, `/live`, `/metrics`, `/config`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use tokio::net::TcpListener;

use crate::dataplane::Dataplane;

use ferrum_admin::reply;

/// A Host a browser tricked by DNS rebinding cannot send: `localhost` or an IP literal.
fn local_host(req: &Request<Incoming>) -> bool {
    let Some(host) = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return true;
    };
    let name = match host.rsplit_once(':') {
        Some((n, p)) if p.bytes().all(|b| b.is_ascii_digit()) => n,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok()
}

fn route(dp: &Dataplane, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if !local_host(req) {
        return reply(
            StatusCode::FORBIDDEN,
            "text/plain",
            "admin answers localhost or an IP address only\n",
        );
    }
    if req.method() != Method::GET {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
    }
    match req.uri().path() {
        "/live" => reply(StatusCode::OK, "text/plain", "live\n"),
        "/ready" => {
            if dp.ready.load(Relaxed) {
                reply(StatusCode::OK, "text/plain", "ready\n")
            } else {
                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n")
            }
        }
        "/metrics" => {
            let cfg = dp.shared.config.load();
            reply(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                dp.shared.registry.render(cfg.health(), &dp.shared.access_log),
            )
        }
        "/config" => {
            let cfg = dp.shared.config.load();
            let body = serde_json::json!({
                "version": cfg.snapshot.version,
                "hash": cfg.snapshot.hash,
                "listening": dp.listening().iter().map(ToString::to_string).collect::<Vec<_>>(),
                "snapshot": &cfg.snapshot,
                "status": dp.status(),
            });
            reply(
                StatusCode::OK,
                "application/json",
                serde_json::to_vec_pretty(&body).unwrap_or_default(),
            )
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /ready, /live, /metrics, /config\n",
        ),
    }
}

pub async fn serve(listener: TcpListener, dp: Arc<Dataplane>) {
    ferrum_admin::serve(vec![listener], move |req, _| std::future::ready(route(&dp, &req))).await
}

/// The sidecar's readiness port (15021, reachable by the kubelet): `/healthz/ready` only, ready
/// once a config serves and `extra` (the workload certificate) holds.
pub async fn serve_readiness(
    listeners: Vec<TcpListener>,
    dp: Arc<Dataplane>,
    extra: impl Fn() -> bool + Send + Sync + 'static,
) {
    ferrum_admin::serve(listeners, move |req, _| {
        std::future::ready(match req.uri().path() {
            "/healthz/ready" if dp.ready.load(Relaxed) && extra() => reply(StatusCode::OK, "text/plain", "ready\n"),
            "/healthz/ready" => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n"),
            _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found: try /healthz/ready\n"),
        })
    })
    .await
}

/// The sidecar's app-health port (15020, reachable by the kubelet): the app's HTTP probes,
/// rewritten by the injector to come through here.
pub async fn serve_app_health(listeners: Vec<TcpListener>, probes: ferrum_snapshot::mesh::AppProbes) {
    let probes = Arc::new(probes);
    ferrum_admin::serve(listeners, move |req, _| {
        let (probes, path) = (probes.clone(), req.uri().path().to_string());
        async move { crate::mesh::app_health::answer(&probes, &path).await }
    })
    .await
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// A sidecar port the kubelet probes: `addr` and, on an IPv6 host, its IPv6 twin (the kubelet
/// probes the pod IP of the cluster's first family).
pub async fn bind_dual_stack(addr: SocketAddr) -> std::io::Result<Vec<TcpListener>> {
    crate::listener::bind_dual_stack(addr)?
        .into_iter()
        .map(TcpListener::from_std)
        .collect()
}
