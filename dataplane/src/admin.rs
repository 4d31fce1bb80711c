//! The admin listener (its own port): `/ready`, `/live`, `/metrics`, `/config`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::dataplane::Dataplane;

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    r
}

fn route(dp: &Dataplane, req: &Request<Incoming>) -> Response<Full<Bytes>> {
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
                dp.shared.registry.render(&cfg.health()),
            )
        }
        "/config" => {
            let cfg = dp.shared.config.load();
            let body = serde_json::json!({
                "version": cfg.snapshot.version,
                "hash": cfg.snapshot.hash,
                "listening": dp.listening().iter().map(ToString::to_string).collect::<Vec<_>>(),
                "snapshot": cfg.snapshot.redacted(),
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
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let dp = dp.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let r = route(&dp, &req);
                async move { Ok::<_, Infallible>(r) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
