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
        "/metrics" => reply(StatusCode::OK, PROMETHEUS_TEXT, metrics(dp)),
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

const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4";

fn metrics(dp: &Dataplane) -> String {
    let cfg = dp.shared.config.load();
    dp.shared.registry.render(cfg.health(), &dp.shared.access_log)
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

/// The sidecar's agent port (15020, reachable by the kubelet and Prometheus): the app's HTTP
/// probes, rewritten by the injector to come through here, and `/stats/prometheus` — the
/// proxy's metrics, then the app's when `app_metrics` says where it serves them (Istio's
/// metrics merging). Nothing of the admin port's (`/config`).
pub async fn serve_agent(
    listeners: Vec<TcpListener>,
    dp: Arc<Dataplane>,
    probes: ferrum_snapshot::mesh::AppProbes,
    app_metrics: Option<ferrum_snapshot::mesh::AppProbe>,
) {
    let shared = Arc::new((dp, probes, app_metrics));
    ferrum_admin::serve(listeners, move |req, _| {
        let shared = shared.clone();
        async move {
            let (dp, probes, app_metrics) = &*shared;
            if req.method() != Method::GET {
                return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
            }
            match req.uri().path() {
                "/stats/prometheus" => {
                    let mut text = metrics(dp);
                    if let Some(p) = app_metrics
                        && let Some(app) = crate::mesh::app_health::metrics(p).await
                    {
                        text.push_str(&app);
                    }
                    reply(StatusCode::OK, PROMETHEUS_TEXT, text)
                }
                path => crate::mesh::app_health::answer(probes, path).await,
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use ferrum_snapshot::mesh::AppProbe;

    /// An app serving `body` at every path.
    async fn app(body: &'static str) -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(ferrum_admin::serve(vec![l], move |_, _| {
            std::future::ready(reply(StatusCode::OK, PROMETHEUS_TEXT, body))
        }));
        port
    }

    async fn agent(app_metrics: Option<AppProbe>) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let dp = Dataplane::new(crate::limits::Limits::default(), vec![]);
        dp.shared.registry.unrouted.fetch_add(3, Relaxed);
        tokio::spawn(serve_agent(vec![l], dp, Default::default(), app_metrics));
        addr
    }

    /// Prometheus scrapes the sidecar's 15020 from outside the pod: the proxy's metrics, then the
    /// app's (when the injector said where they are); an app that does not answer leaves the
    /// proxy's. The admin port's config is not there.
    #[tokio::test]
    async fn the_agent_port_serves_the_proxys_metrics_and_the_apps() {
        let port = app("# TYPE app_orders_total counter\napp_orders_total 7\n").await;
        let probe = |port| AppProbe {
            port,
            path: "/metrics".into(),
            scheme: "HTTP".into(),
            headers: vec![],
            timeout_seconds: 1,
        };
        let get = |addr: SocketAddr, path: &'static str| async move {
            let r = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
            (r.status(), r.text().await.unwrap())
        };
        let merged = agent(Some(probe(port))).await;
        let (status, text) = get(merged, "/stats/prometheus").await;
        assert_eq!(status, StatusCode::OK);
        assert!(text.contains("ferrum_unrouted_requests_total 3"), "{text}");
        assert!(text.contains("\napp_orders_total 7\n"), "{text}");
        assert_eq!(get(merged, "/config").await.0, StatusCode::NOT_FOUND);

        let unused = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let (status, text) = get(agent(Some(probe(unused))).await, "/stats/prometheus").await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            text.contains("ferrum_unrouted_requests_total 3") && !text.contains("app_orders"),
            "{text}"
        );
    }
}
