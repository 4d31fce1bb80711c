//! Body types of the proxy: streamed both ways, never buffered, with size limits.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Limited;
use hyper::body::Incoming;

use crate::upstream::{EndpointGuard, RequestGuard};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What goes upstream: the client's body (bounded) or nothing.
pub enum RequestBody {
    Empty,
    Stream(Limited<Incoming>),
}

impl RequestBody {
    pub fn empty() -> Self {
        RequestBody::Empty
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::Empty => Poll::Ready(None),
            RequestBody::Stream(b) => Pin::new(b).poll_frame(cx),
        }
    }
    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Empty => true,
            RequestBody::Stream(b) => b.is_end_stream(),
        }
    }
    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Empty => SizeHint::with_exact(0),
            RequestBody::Stream(b) => b.size_hint(),
        }
    }
}

/// What goes back to the client: a short local reply, or the upstream's body together with the
/// guards that count this request as in flight until the body is done.
pub enum ResponseBody {
    Local(Option<Bytes>),
    Upstream {
        body: Incoming,
        _request: Option<RequestGuard>,
        _endpoint: Option<EndpointGuard>,
    },
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
            ResponseBody::Upstream { body, .. } => Pin::new(body).poll_frame(cx),
        }
    }
    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Local(b) => b.is_none(),
            ResponseBody::Upstream { body, .. } => body.is_end_stream(),
        }
    }
    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Local(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ResponseBody::Upstream { body, .. } => body.size_hint(),
        }
    }
}
