//! The bodies of a forwarded request: the client's, sent upstream within its size limit, and
//! the answer — the upstream's body, holding its connection and guards until it ends, or a
//! local one. Streamed both ways, never buffered.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Limited;
use hyper::body::Incoming;

use crate::upstream::{EndpointGuard, Lease, RequestGuard, now_ms};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The client's request body failed (truncated, malformed framing, too large): the client's
/// fault, never counted against the upstream.
#[derive(Debug, thiserror::Error)]
#[error("client request body: {0}")]
pub struct ClientBodyError(#[source] pub BoxError);

/// How far the client's upload has come: the response timeout starts when it is done, and an
/// upload that stalls is the client's timeout, not the upstream's.
#[derive(Default)]
pub struct Upload {
    /// `now_ms()` of the last frame (or of the start).
    last_ms: AtomicU64,
    done: AtomicBool,
}

impl Upload {
    pub fn new() -> Arc<Self> {
        Arc::new(Upload {
            last_ms: AtomicU64::new(now_ms()),
            done: AtomicBool::new(false),
        })
    }
    pub fn done(&self) -> bool {
        self.done.load(Relaxed)
    }
    /// Time since the last frame arrived (or since the upload ended).
    pub fn idle(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.last_ms.load(Relaxed)))
    }
    fn progress(&self, done: bool) {
        self.last_ms.store(now_ms(), Relaxed);
        if done {
            self.done.store(true, Relaxed);
        }
    }
}

/// What goes upstream: the client's body (bounded) or nothing.
pub enum RequestBody {
    Empty,
    Stream {
        body: Limited<Incoming>,
        upload: Arc<Upload>,
    },
}

impl RequestBody {
    pub fn empty() -> Self {
        RequestBody::Empty
    }

    pub fn stream(body: Incoming, limit: usize) -> (Self, Arc<Upload>) {
        let upload = Upload::new();
        let body = RequestBody::Stream {
            body: Limited::new(body, limit),
            upload: upload.clone(),
        };
        (body, upload)
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::Empty => Poll::Ready(None),
            RequestBody::Stream { body, upload } => {
                let r = Pin::new(&mut *body).poll_frame(cx);
                match &r {
                    Poll::Ready(Some(Ok(_))) => upload.progress(body.is_end_stream()),
                    Poll::Ready(None) => upload.progress(true),
                    _ => {}
                }
                r.map_err(|e| Box::new(ClientBodyError(e)) as BoxError)
            }
        }
    }
    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Empty => true,
            RequestBody::Stream { body, .. } => body.is_end_stream(),
        }
    }
    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Empty => SizeHint::with_exact(0),
            RequestBody::Stream { body, .. } => body.size_hint(),
        }
    }
}

/// What goes back to the client: a short local reply, or the upstream's body together with the
/// guards that count this request as in flight until the body is done, and its connection's
/// lease, which gives the connection back to the pool when the body ends.
pub enum ResponseBody {
    Local(Option<Bytes>),
    Upstream {
        body: Incoming,
        lease: Lease,
        _request: RequestGuard,
        _endpoint: EndpointGuard,
    },
    /// Either of the above, counted for an access log line sent when it ends.
    Observed(Box<Observed>),
}

/// A response body whose request is observed — logged, its span ended, or both — once the
/// body is done (or dropped unfinished).
pub struct Observed {
    inner: ResponseBody,
    entry: Option<crate::access_log::Entry>,
    log: bool,
    span: Option<crate::trace::RequestSpan>,
    access_log: Arc<crate::access_log::AccessLog>,
}

impl Observed {
    pub fn wrap(
        inner: ResponseBody,
        entry: crate::access_log::Entry,
        log: bool,
        span: Option<crate::trace::RequestSpan>,
        access_log: Arc<crate::access_log::AccessLog>,
    ) -> ResponseBody {
        ResponseBody::Observed(Box::new(Observed {
            inner,
            entry: Some(entry),
            log,
            span,
            access_log,
        }))
    }

    fn finish(&mut self, complete: bool) {
        if let Some(mut e) = self.entry.take() {
            e.complete = complete;
            e.duration_ms = e.started.map_or(0.0, |s| s.elapsed().as_secs_f64() * 1000.0);
            if let Some(span) = self.span.take() {
                span.end(&e);
            }
            if self.log {
                self.access_log.send(e);
            }
        }
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        let done = self.inner.is_end_stream();
        self.finish(done);
    }
}

impl ResponseBody {
    pub fn local(b: impl Into<Bytes>) -> Self {
        ResponseBody::Local(Some(b.into()))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ResponseBody::Local(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ResponseBody::Upstream { body, lease, .. } => {
                let r = Pin::new(&mut *body).poll_frame(cx);
                match &r {
                    Poll::Ready(None) => lease.finish(),
                    Poll::Ready(Some(Ok(_))) if body.is_end_stream() => lease.finish(),
                    _ => {}
                }
                r
            }
            ResponseBody::Observed(l) => {
                let r = Pin::new(&mut l.inner).poll_frame(cx);
                match &r {
                    Poll::Ready(Some(Ok(f))) => {
                        if let (Some(d), Some(e)) = (f.data_ref(), l.entry.as_mut()) {
                            e.bytes_sent += d.len() as u64;
                        }
                    }
                    Poll::Ready(None) => l.finish(true),
                    Poll::Ready(Some(Err(_))) => l.finish(false),
                    Poll::Pending => {}
                }
                r
            }
        }
    }
    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Local(b) => b.is_none(),
            ResponseBody::Upstream { body, .. } => body.is_end_stream(),
            ResponseBody::Observed(l) => l.inner.is_end_stream(),
        }
    }
    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Local(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ResponseBody::Upstream { body, .. } => body.size_hint(),
            ResponseBody::Observed(l) => l.inner.size_hint(),
        }
    }
}
