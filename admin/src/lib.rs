//! The admin endpoints every Ferrum binary serves (probes, metrics, debug views): a small HTTP/1
//! server that answers each request from a routing function, with the connections open at once
//! and the time to send a request head bounded — a flood of idle connections must neither take
//! the process's descriptors nor keep its probes from answering.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Admin connections open at once (all listeners together): probes and scrapes need few.
pub const MAX_CONNECTIONS: usize = 64;
/// Time a client gets to send its request head (and a new connection to send anything).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// A response with a body and its content type.
pub fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    r
}

/// Serves `route` (given each request and its peer's address) on `listeners` until the task is
/// dropped.
pub async fn serve<F, Fut>(listeners: Vec<TcpListener>, route: F)
where
    F: Fn(Request<Incoming>, SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let route = Arc::new(route);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let accepting: Vec<_> = listeners
        .into_iter()
        .map(|l| tokio::spawn(accept_loop(l, route.clone(), slots.clone())))
        .collect();
    for a in accepting {
        let _ = a.await;
    }
}

async fn accept_loop<F, Fut>(listener: TcpListener, route: Arc<F>, slots: Arc<Semaphore>)
where
    F: Fn(Request<Incoming>, SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            // Out of descriptors, most likely: let some close.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        // Over the limit: closed at once.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let route = route.clone();
        tokio::spawn(async move {
            let _slot = slot;
            if tokio::time::timeout(HEAD_TIMEOUT, stream.readable()).await.is_err() {
                return;
            }
            let svc = service_fn(move |req| {
                let r = route(req, peer);
                async move { Ok::<_, Infallible>(r.await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_from_the_route_and_bounds_idle_connections() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(serve(vec![l], |req: Request<Incoming>, peer: SocketAddr| {
            let body = format!("{} from {}", req.uri().path(), peer.ip());
            std::future::ready(reply(StatusCode::OK, "text/plain", body))
        }));
        // Idle connections up to the limit: the next request still gets in once they go, and
        // one over the limit is closed at once.
        let idle: Vec<_> = (0..MAX_CONNECTIONS)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let over = reqwest::get(format!("http://{addr}/x")).await;
        assert!(over.is_err(), "a connection over the limit was served");
        drop(idle);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let r = reqwest::get(format!("http://{addr}/live")).await.unwrap();
        assert_eq!(r.headers()["content-type"], "text/plain");
        assert_eq!(r.text().await.unwrap(), "/live from 127.0.0.1");
    }
}
