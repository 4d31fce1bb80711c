//! What the sidecar asks of its app over loopback (not captured) for others on port 15020: the
//! kubelet's HTTP probes (`/app-health/<container>/<probe>`: the injector rewrote the pod's
//! probes to come here, since with mTLS required a plaintext probe to the app's own port would
//! be refused), answered with the app's status; and the app's own Prometheus metrics, merged into
//! the sidecar's `/stats/prometheus` (the injector points the pod's `prometheus.io/*`
//! annotations there, as Istio's metrics merging does).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferrum_snapshot::mesh::{AppProbe, AppProbes};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// What the kubelet reads of an HTTP probe's body (`maxRespBodyLength`).
const PROBE_BODY_BYTES: usize = 10 * 1024;
/// The most of an app's metrics merged into one scrape.
const METRICS_BYTES: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
#[error("{0} is not valid: {1}")]
pub struct BadProbers(&'static str, #[source] serde_json::Error);

/// The probes from `--app-probers` / `FERRUM_APP_PROBERS` (none when unset).
pub fn parse(json: Option<&str>) -> Result<AppProbes, BadProbers> {
    match json {
        Some(v) if !v.trim().is_empty() => serde_json::from_str(v).map_err(|e| BadProbers("FERRUM_APP_PROBERS", e)),
        _ => Ok(AppProbes::new()),
    }
}

/// Where the app serves its metrics, from `--app-metrics` / `FERRUM_APP_METRICS` (a probe's
/// JSON; none when unset).
pub fn parse_metrics(json: Option<&str>) -> Result<Option<AppProbe>, BadProbers> {
    match json {
        Some(v) if !v.trim().is_empty() => serde_json::from_str(v)
            .map(Some)
            .map_err(|e| BadProbers("FERRUM_APP_METRICS", e)),
        _ => Ok(None),
    }
}

/// The app's metrics (Prometheus text), or `None` — logged — when it does not answer 200 with
/// at most 16 MiB of UTF-8 in the probe's timeout: a scrape then has the sidecar's own.
pub async fn metrics(p: &AppProbe) -> Option<String> {
    let timeout = Duration::from_secs(u64::from(p.timeout_seconds.max(1)));
    let got = tokio::time::timeout(timeout, get(p, METRICS_BYTES)).await;
    match got {
        Ok(Ok((StatusCode::OK, Some(body)))) => String::from_utf8(body.to_vec()).ok(),
        Ok(Ok((status, _))) => {
            tracing::debug!(%status, "the app's metrics: not 200, or over 16 MiB");
            None
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "the app's metrics");
            None
        }
        Err(_) => {
            tracing::debug!(?timeout, "the app's metrics timed out");
            None
        }
    }
}

fn reply(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r
}

/// Answers one kubelet probe: the app's status, 503 when the app does not answer in time, 404
/// for a path no probe was rewritten to.
pub async fn answer(probes: &AppProbes, path: &str) -> Response<Full<Bytes>> {
    let Some(p) = probes.get(path) else {
        return reply(StatusCode::NOT_FOUND, "no such app probe\n");
    };
    let timeout = Duration::from_secs(u64::from(p.timeout_seconds.max(1)));
    match tokio::time::timeout(timeout, get(p, PROBE_BODY_BYTES)).await {
        Ok(Ok((status, _))) => {
            let mut r = reply(status, "");
            *r.body_mut() = Full::new(Bytes::from(format!("app answered {}\n", status.as_u16())));
            r
        }
        Ok(Err(e)) => {
            tracing::debug!(path, error = %e, "app probe failed");
            reply(StatusCode::SERVICE_UNAVAILABLE, "the app did not answer\n")
        }
        Err(_) => reply(StatusCode::SERVICE_UNAVAILABLE, "the app probe timed out\n"),
    }
}

#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Http(#[from] hyper::Error),
    #[error(transparent)]
    Request(#[from] http::Error),
}

/// GET the app on 127.0.0.1 as the kubelet would have (its headers, `User-Agent: kube-probe`):
/// its status, and its body when no longer than `max_body`.
async fn get(p: &AppProbe, max_body: usize) -> Result<(StatusCode, Option<Bytes>), ProbeError> {
    let tcp = TcpStream::connect(("127.0.0.1", p.port)).await?;
    let _ = tcp.set_nodelay(true);
    let mut req = Request::get(&p.path)
        .header(http::header::HOST, format!("127.0.0.1:{}", p.port))
        .header(http::header::USER_AGENT, "kube-probe/ferrum");
    for (k, v) in &p.headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let req = req.body(Empty::<Bytes>::new())?;
    if p.scheme.eq_ignore_ascii_case("HTTPS") {
        let tls = tls_connector()
            .connect(
                rustls_pki_types::ServerName::try_from("localhost").expect("a valid name"),
                tcp,
            )
            .await?;
        send(TokioIo::new(tls), req, max_body).await
    } else {
        send(TokioIo::new(tcp), req, max_body).await
    }
}

async fn send<T>(io: T, req: Request<Empty<Bytes>>, max_body: usize) -> Result<(StatusCode, Option<Bytes>), ProbeError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut tx, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(conn);
    let resp = tx.send_request(req).await?;
    let status = resp.status();
    // Read no further than that: the kubelet reads at most 10 KiB of a probe's body, and judges
    // by the status.
    let body = http_body_util::Limited::new(resp.into_body(), max_body)
        .collect()
        .await
        .ok()
        .map(|b| b.to_bytes());
    Ok((status, body))
}

/// The kubelet does not check an HTTPS probe's certificate; neither do we.
fn tls_connector() -> tokio_rustls::TlsConnector {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("default versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(crate::upstream::connector::NoVerify(provider)))
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An app whose probe answers 200 with a body that never ends.
    async fn endless_app() -> u16 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        let chunk = Bytes::from(vec![b'x'; 4096]);
                        let frames = futures_util::stream::repeat_with(move || {
                            Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(chunk.clone()))
                        });
                        Ok::<_, std::convert::Infallible>(Response::new(http_body_util::StreamBody::new(frames)))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        port
    }

    #[tokio::test]
    async fn an_app_answering_an_endless_body_is_judged_by_its_status() {
        let port = endless_app().await;
        let probe = AppProbe {
            port,
            path: "/metrics".into(),
            scheme: "HTTP".into(),
            headers: vec![],
            timeout_seconds: 2,
        };
        let probes = AppProbes::from([("/app-health/app/livez".to_string(), probe)]);
        let started = std::time::Instant::now();
        let r = answer(&probes, "/app-health/app/livez").await;
        assert_eq!(
            r.status(),
            StatusCode::OK,
            "the app answered 200; the kubelet reads 10 KB of the body at most"
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "not held until the probe's timeout"
        );
    }

    #[test]
    fn probers_come_from_the_environment_as_the_injector_writes_them() {
        let json = r#"{"/app-health/app/readyz": {"port": 8080, "path": "/ready", "scheme": "HTTP", "headers": [["x-a", "1"]], "timeoutSeconds": 3}}"#;
        let p = parse(Some(json)).unwrap();
        assert_eq!(p["/app-health/app/readyz"].port, 8080);
        assert_eq!(
            p["/app-health/app/readyz"].headers,
            vec![("x-a".to_string(), "1".to_string())]
        );
        assert!(parse(None).unwrap().is_empty());
        assert!(parse(Some("{not json")).is_err());
    }
}
