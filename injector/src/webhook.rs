//! The admission webhook over HTTPS: `POST /inject` takes an AdmissionReview (v1) of a pod and
//! answers with the JSON patch that adds the sidecar, or with the pod as it is; `/ready` for
//! the kubelet. Bodies are bounded, slow clients cut off.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::api::core::v1::Pod;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use tokio::io::AsyncBufReadExt as _;
use tokio::net::TcpListener;

use crate::inject::{self, Template};

/// Largest AdmissionReview accepted (a pod spec; the API server caps objects at 3 MiB).
const MAX_BODY: usize = 4 << 20;
/// A client gets this long to send its headers, and the whole review.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a body is not a review we can answer.
#[derive(Debug, thiserror::Error)]
pub enum BadReview {
    #[error("not an AdmissionReview of a pod: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("the AdmissionReview has no request")]
    NoRequest,
}

/// The answer to one review: the patch that injects the sidecar, the pod as it is (with the
/// reason logged), or a denial naming the annotation that cannot be used.
pub fn answer(body: &[u8], t: &Template) -> Result<AdmissionReview<DynamicObject>, BadReview> {
    let review: AdmissionReview<Pod> = serde_json::from_slice(body)?;
    let req: AdmissionRequest<Pod> = review.try_into().map_err(|_| BadReview::NoRequest)?;
    let resp = AdmissionResponse::from(&req);
    let pod = match (&req.operation, &req.object) {
        (Operation::Create, Some(pod)) => pod,
        _ => return Ok(resp.into_review()),
    };
    let name = pod
        .metadata
        .name
        .clone()
        .or_else(|| pod.metadata.generate_name.clone())
        .unwrap_or_default();
    let ns = req.namespace.clone().unwrap_or_default();
    if let Err(skip) = inject::should_inject(pod) {
        tracing::debug!(namespace = %ns, pod = %name, reason = %skip, "not injected");
        return Ok(resp.into_review());
    }
    let resp = match inject::inject(pod, t) {
        Ok(injected) => {
            tracing::info!(namespace = %ns, pod = %name, dry_run = req.dry_run, "injected");
            resp.with_patch(inject::patch(pod, &injected))
                .expect("JSON patches serialise")
        }
        Err(bad) => {
            tracing::warn!(namespace = %ns, pod = %name, error = %bad, "refused");
            resp.deny(format!("ferrum sidecar injection: {bad}"))
        }
    };
    Ok(resp.into_review())
}

fn reply(status: StatusCode, ct: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(ct));
    r
}

async fn handle(req: Request<Incoming>, t: Arc<Template>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/ready" | "/live") => reply(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::POST, "/inject") => {
            let body = match tokio::time::timeout(READ_TIMEOUT, Limited::new(req.into_body(), MAX_BODY).collect()).await
            {
                Ok(Ok(b)) => b.to_bytes(),
                Ok(Err(e)) => return reply(StatusCode::PAYLOAD_TOO_LARGE, "text/plain", format!("{e}\n")),
                Err(_) => return reply(StatusCode::REQUEST_TIMEOUT, "text/plain", "body too slow\n"),
            };
            match answer(&body, &t) {
                Ok(review) => reply(
                    StatusCode::OK,
                    "application/json",
                    serde_json::to_vec(&review).expect("reviews serialise"),
                ),
                Err(e) => reply(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
            }
        }
        (_, "/inject") => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "POST an AdmissionReview\n",
        ),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// Serves the webhook on `listener` with `tls` until the process ends.
pub async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, t: Arc<Template>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let Ok((tcp, peer)) = listener.accept().await else {
            continue;
        };
        let (acceptor, t) = (acceptor.clone(), t.clone());
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(READ_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            // Any pod can reach the webhook: a connection that sends nothing is closed, or enough
            // of them would hold every file descriptor (hyper's header timeout starts with the
            // first byte, and its HTTP/2 detection waits for ever).
            let mut stream = tokio::io::BufReader::new(stream);
            match tokio::time::timeout(READ_TIMEOUT, stream.fill_buf()).await {
                Ok(Ok(first)) if !first.is_empty() => {}
                _ => return tracing::debug!(%peer, "nothing sent after the TLS handshake"),
            }
            let svc = hyper::service::service_fn(move |req| {
                let t = t.clone();
                async move { Ok::<_, Infallible>(handle(req, t).await) }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(READ_TIMEOUT);
            // An idle HTTP/2 connection whose peer went away is found by its unanswered ping.
            builder
                .http2()
                .timer(hyper_util::rt::TokioTimer::new())
                .keep_alive_interval(READ_TIMEOUT)
                .keep_alive_timeout(READ_TIMEOUT);
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}
