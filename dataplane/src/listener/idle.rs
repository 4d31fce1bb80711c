//! A connection that has had no open stream for a while is closed. HTTP/2: for the idle timeout,
//! with a GOAWAY (Envoy's `idle_timeout`); without it a client that sent the preface — or one
//! request — and then nothing held its connection for ever, and enough of them took every slot
//! of the listener's connection cap. HTTP/1.1: for the header timeout, which so bounds both a
//! head trickled in and the wait for the next one; hyper's own header timeout allocated and
//! registered a timer for every request.
//!
//! Each stream's response carries a guard of its connection's count, so the hot path pays two
//! uncontended atomic adds and no clock read; a timer per connection looks at the count.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};

/// The streams of one connection: how many were opened and how many have ended.
#[derive(Default)]
pub struct Streams {
    opened: AtomicU64,
    ended: AtomicU64,
}

impl Streams {
    /// Resolves once the connection has had no open stream for `limit` (within a quarter of it).
    pub async fn idle(&self, limit: Duration) {
        let tick = (limit / 4).max(Duration::from_millis(10));
        let (mut quiet, mut seen) = (Duration::ZERO, u64::MAX);
        loop {
            tokio::time::sleep(tick).await;
            let opened = self.opened.load(Relaxed);
            if opened == self.ended.load(Relaxed) && opened == seen {
                quiet += tick;
                if quiet >= limit {
                    return;
                }
            } else {
                quiet = Duration::ZERO;
            }
            seen = opened;
        }
    }
}

/// A service whose every response counts as an open stream of its connection until its body
/// is dropped (sent, or reset).
pub struct Counted<S> {
    inner: S,
    streams: Arc<Streams>,
}

impl<S> Counted<S> {
    /// `inner` with its streams counted, and what resolves once none has been open for `limit`
    /// (never, without one).
    pub fn watched(inner: S, limit: Option<Duration>) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let streams = Arc::new(Streams::default());
        let idle = {
            let streams = streams.clone();
            async move {
                match limit {
                    Some(limit) => streams.idle(limit).await,
                    None => std::future::pending().await,
                }
            }
        };
        (Counted { inner, streams }, idle)
    }
}

impl<S, B> hyper::service::Service<Request<Incoming>> for Counted<S>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>,
{
    type Response = Response<Open<B>>;
    type Error = S::Error;
    type Future = Opening<S::Future>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.streams.opened.fetch_add(1, Relaxed);
        Opening {
            fut: self.inner.call(req),
            guard: Some(Guard(self.streams.clone())),
        }
    }
}

/// Counts a stream as ended when dropped.
struct Guard(Arc<Streams>);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.ended.fetch_add(1, Relaxed);
    }
}

pin_project_lite::pin_project! {
    /// The response on its way, the stream counted.
    pub struct Opening<F> {
        #[pin]
        fut: F,
        guard: Option<Guard>,
    }
}

impl<F, B, E> Future for Opening<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<Open<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let resp = std::task::ready!(this.fut.poll(cx));
        let guard = this.guard.take();
        Poll::Ready(resp.map(|r| r.map(|body| Open { body, _guard: guard })))
    }
}

/// A response body whose stream is open until it is dropped.
pub struct Open<B> {
    body: B,
    _guard: Option<Guard>,
}

impl<B: Body + Unpin> Body for Open<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        super::stall::stream_moved();
        Pin::new(&mut self.body).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn idle_means_no_stream_open_and_none_opened_for_the_limit() {
        let s = Arc::new(Streams::default());
        let limit = Duration::from_millis(400);
        let started = tokio::time::Instant::now();
        s.idle(limit).await;
        let took = started.elapsed();
        assert!(took >= limit && took <= limit * 2, "{took:?}");

        // A stream open the whole time: never idle.
        s.opened.fetch_add(1, Relaxed);
        let open = Guard(s.clone());
        assert!(tokio::time::timeout(limit * 3, s.idle(limit)).await.is_err());
        drop(open);

        // Short streams every 150 ms, each ended before any tick sees it: still not idle.
        let busy = s.clone();
        let traffic = tokio::spawn(async move {
            for _ in 0..10 {
                busy.opened.fetch_add(1, Relaxed);
                drop(Guard(busy.clone()));
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        });
        assert!(
            tokio::time::timeout(Duration::from_millis(1300), s.idle(limit))
                .await
                .is_err()
        );
        traffic.await.unwrap();
        let started = tokio::time::Instant::now();
        s.idle(limit).await;
        assert!(started.elapsed() <= limit * 2, "{:?}", started.elapsed());
    }
}
