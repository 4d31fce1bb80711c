//! The bodies of a forwarded request: the client's, sent upstream within its size limit, and
//! the answer — the upstream's body, holding its connection and guards until it ends, or a
//! local one. Streamed both ways; a request that may be retried keeps what it sent, up to
//! [`RETRY_BUFFER`], to send it again.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Limited;
use hyper::body::Incoming;

use crate::upstream::{EndpointGuard, RequestGuard, UpstreamBody, UpstreamBodyError, now_ms};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The client's request body failed (truncated, malformed framing, too large): the client's
/// fault, never counted against the upstream.
#[derive(Debug, thiserror::Error)]
#[error("client request body: {0}")]
pub struct ClientBodyError(#[source] pub BoxError);

/// The client's request body: what was read ahead of it (for an authorization check that
/// includes the body), then the rest as it arrives. Forwarded whole either way.
pub struct ClientBody {
    /// Boxed: every request's future holds a body, and few read one ahead.
    ahead: Option<Box<Ahead>>,
    /// `None` once read to its end.
    rest: Option<Incoming>,
}

/// What was read of a body and not yet sent on.
struct Ahead {
    data: Option<Bytes>,
    /// Trailers that ended a body read ahead whole.
    trailers: Option<http::HeaderMap>,
}

/// The start of a body, read ahead for a check: at most the bytes asked for, and whether more
/// followed them.
pub struct ReadAhead {
    pub bytes: Bytes,
    pub partial: bool,
}

/// Why a body could not be read ahead: each the client's doing.
#[derive(Debug, thiserror::Error)]
pub enum ReadAheadError {
    #[error("no body bytes for {0:?}")]
    Stalled(Duration),
    #[error("client request body: {0}")]
    Client(#[source] hyper::Error),
}

impl From<Incoming> for ClientBody {
    fn from(b: Incoming) -> Self {
        ClientBody {
            ahead: None,
            rest: Some(b),
        }
    }
}

impl ClientBody {
    /// Reads the body until its end or until more than `max` bytes have come (bounded by
    /// one frame past `max`), waiting at most `idle` for each frame; what was read is still
    /// sent on.
    pub async fn read_ahead(&mut self, max: usize, idle: Duration) -> Result<ReadAhead, ReadAheadError> {
        let mut buf = bytes::BytesMut::new();
        let mut trailers = None;
        if let Some(a) = self.ahead.take() {
            buf.extend_from_slice(a.data.as_deref().unwrap_or_default());
            trailers = a.trailers;
        }
        while buf.len() <= max {
            let Some(rest) = self.rest.as_mut().filter(|r| !r.is_end_stream()) else {
                self.rest = None;
                break;
            };
            let frame = match tokio::time::timeout(idle, http_body_util::BodyExt::frame(rest)).await {
                Err(_) => return Err(ReadAheadError::Stalled(idle)),
                Ok(None) => None,
                Ok(Some(f)) => Some(f.map_err(ReadAheadError::Client)?),
            };
            match frame.map(Frame::into_data) {
                Some(Ok(data)) => buf.extend_from_slice(&data),
                Some(Err(other)) => {
                    trailers = other.into_trailers().ok();
                    self.rest = None;
                }
                None => self.rest = None,
            }
        }
        let all = buf.freeze();
        let partial = all.len() > max;
        let bytes = all.slice(..all.len().min(max));
        let data = (!all.is_empty()).then_some(all);
        if data.is_some() || trailers.is_some() {
            self.ahead = Some(Box::new(Ahead { data, trailers }));
        }
        Ok(ReadAhead { bytes, partial })
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Some(a) = this.ahead.as_mut()
            && let Some(data) = a.data.take()
        {
            if a.trailers.is_none() {
                this.ahead = None;
            }
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        match &mut this.rest {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(
                this.ahead
                    .take()
                    .and_then(|a| a.trailers)
                    .map(|t| Ok(Frame::trailers(t))),
            ),
        }
    }
    fn is_end_stream(&self) -> bool {
        self.ahead.is_none() && self.rest.as_ref().is_none_or(Body::is_end_stream)
    }
    fn size_hint(&self) -> SizeHint {
        let ahead = self
            .ahead
            .as_ref()
            .and_then(|a| a.data.as_ref())
            .map_or(0, |d| d.len() as u64);
        let rest = self
            .rest
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint);
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + ahead);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + ahead);
        }
        hint
    }
}

/// How far the client's upload has come: the response timeout starts when it is done, and an
/// upload that stalls is the client's timeout, not the upstream's.
#[derive(Default)]
pub struct Upload {
    /// `now_ms()` of the last frame (or of the start).
    last_ms: AtomicU64,
    done: AtomicBool,
    /// Body bytes received so far.
    bytes: AtomicU64,
}

impl Upload {
    pub fn new() -> Arc<Self> {
        Arc::new(Upload {
            last_ms: AtomicU64::new(now_ms()),
            done: AtomicBool::new(false),
            bytes: AtomicU64::new(0),
        })
    }
    /// Body bytes received so far.
    pub fn received(&self) -> u64 {
        self.bytes.load(Relaxed)
    }
    pub fn done(&self) -> bool {
        self.done.load(Relaxed)
    }
    /// Time since the last frame arrived (or since the upload ended).
    pub fn idle(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.last_ms.load(Relaxed)))
    }
    fn progress(&self, done: bool, bytes: usize) {
        self.bytes.fetch_add(bytes as u64, Relaxed);
        self.last_ms.store(now_ms(), Relaxed);
        if done {
            self.done.store(true, Relaxed);
        }
    }
}

/// What goes upstream: the client's body (bounded), one try's replay of it, a mirror's copy of
/// one, a body made here (an authorization check), or nothing.
pub enum RequestBody {
    Empty,
    /// Sent in one frame, then taken.
    Full(Option<Bytes>),
    Stream(Source),
    Replay(Replay),
    Copied(CopiedBody),
}

/// The client's body as it arrives: bounded, its progress noted, each frame copied to mirrors.
pub struct Source {
    body: Limited<ClientBody>,
    upload: Arc<Upload>,
    /// Frames are copied here too, one copy per mirror.
    copies: Vec<BodyCopy>,
}

impl Source {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = Pin::new(&mut self.body).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                let end = self.body.is_end_stream();
                self.upload.progress(end, f.data_ref().map_or(0, Bytes::len));
                for c in &mut self.copies {
                    c.offer(f);
                    if end {
                        c.finish();
                    }
                }
            }
            Poll::Ready(None) => {
                self.upload.progress(true, 0);
                self.copies.iter_mut().for_each(BodyCopy::finish);
            }
            Poll::Ready(Some(Err(_))) => self.copies.iter_mut().for_each(BodyCopy::give_up),
            Poll::Pending => {}
        }
        r.map_err(|e| Box::new(ClientBodyError(e)) as BoxError)
    }
}

/// Bytes of a request body kept so that a retry can send it again (Envoy's default request
/// buffer limit). A longer body is still forwarded whole, but its request is not retried.
pub const RETRY_BUFFER: usize = 1 << 20;

/// One try's request body, when the request may be retried: what earlier tries read of the
/// client's body, from the start, then the rest as it arrives (and is kept for the next try).
/// Tries run one after another; a try's body fails once a later try has started, so a
/// connection still sending it stops instead of waiting on a body that moved on.
pub struct Replay {
    kept: Arc<Mutex<Kept>>,
    try_no: u32,
    /// How many kept parts this try has sent.
    next: usize,
}

struct Kept {
    source: Source,
    parts: Vec<Part>,
    bytes: usize,
    /// The last try: the one whose answer was taken, or the one that read past
    /// [`RETRY_BUFFER`] (and dropped what was kept, having sent it all). Nothing more is kept,
    /// and only it may go on.
    last: Option<u32>,
    ended: bool,
    failed: bool,
    /// The try that may read.
    current: u32,
    /// The try that last waited on the client: woken when a later try takes over.
    waiting: Option<Waker>,
}

#[derive(Clone)]
enum Part {
    Data(Bytes),
    Trailers(http::HeaderMap),
}

impl Part {
    fn of(f: &Frame<Bytes>) -> Option<Part> {
        match (f.data_ref(), f.trailers_ref()) {
            (Some(d), _) => Some(Part::Data(d.clone())),
            (None, Some(t)) => Some(Part::Trailers(t.clone())),
            (None, None) => None,
        }
    }
    fn frame(self) -> Frame<Bytes> {
        match self {
            Part::Data(d) => Frame::data(d),
            Part::Trailers(t) => Frame::trailers(t),
        }
    }
    fn len(&self) -> usize {
        match self {
            Part::Data(d) => d.len(),
            Part::Trailers(t) => t.iter().map(|(k, v)| k.as_str().len() + v.len()).sum(),
        }
    }
}

fn lock(kept: &Mutex<Kept>) -> std::sync::MutexGuard<'_, Kept> {
    kept.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Replay {
    /// Whether the body can be sent again: it was not longer than [`RETRY_BUFFER`] (or not
    /// read that far), and the client's upload has not failed.
    pub fn replayable(&self) -> bool {
        let k = lock(&self.kept);
        k.last.is_none() && !k.failed
    }

    /// No try follows the current one: what it reads from here on is not kept.
    pub fn settle(&self) {
        let mut k = lock(&self.kept);
        k.last = Some(k.current);
    }

    /// The next try's body, which starts over from the first byte; the try before it can send
    /// no more of it. Only when [`Replay::replayable`]: otherwise the body fails.
    pub fn again(&self) -> RequestBody {
        let mut k = lock(&self.kept);
        k.current += 1;
        if let Some(w) = k.waiting.take() {
            w.wake();
        }
        RequestBody::Replay(Replay {
            kept: self.kept.clone(),
            try_no: k.current,
            next: 0,
        })
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut k = lock(&self.kept);
        if k.current != self.try_no {
            return Poll::Ready(Some(Err("the request body was taken by a retry".into())));
        }
        if k.last.is_some_and(|t| t != self.try_no) {
            return Poll::Ready(Some(Err("the request body is too long to send again".into())));
        }
        if let Some(p) = k.parts.get(self.next) {
            self.next += 1;
            return Poll::Ready(Some(Ok(p.clone().frame())));
        }
        if k.failed {
            return Poll::Ready(Some(Err(Box::new(ClientBodyError("the upload failed".into())))));
        }
        if k.ended {
            return Poll::Ready(None);
        }
        let r = k.source.poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => k.keep(f, self.try_no, &mut self.next),
            Poll::Ready(None) => k.ended = true,
            Poll::Ready(Some(Err(_))) => k.failed = true,
            Poll::Pending => match &k.waiting {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => k.waiting = Some(cx.waker().clone()),
            },
        }
        r
    }
}

impl Kept {
    /// Keeps a frame read from the client for later tries, unless the body has outgrown the
    /// buffer, and counts it as sent by the try that read it.
    fn keep(&mut self, f: &Frame<Bytes>, try_no: u32, next: &mut usize) {
        self.ended = self.source.body.is_end_stream();
        if self.last.is_some() {
            return;
        }
        let Some(part) = Part::of(f) else { return };
        self.bytes += part.len();
        if self.bytes > RETRY_BUFFER {
            self.last = Some(try_no);
            self.parts = Vec::new();
        } else {
            self.parts.push(part);
            *next += 1;
        }
    }

    /// Bytes kept that a try at `next` has yet to send.
    fn unsent(&self, next: usize) -> u64 {
        self.parts[next.min(self.parts.len())..]
            .iter()
            .map(|p| match p {
                Part::Data(d) => d.len() as u64,
                Part::Trailers(_) => 0,
            })
            .sum()
    }
}

/// Bytes of a copied body a mirror may have waiting behind the request it copies before the
/// copy is given up (Envoy's default connection buffer limit).
const COPY_BUDGET: usize = 1 << 20;

/// What a frame counts against [`COPY_BUDGET`]: its bytes and a little for the frame itself,
/// so empty frames are bounded too.
fn copy_cost(f: &Frame<Bytes>) -> usize {
    f.data_ref().map_or(0, Bytes::len) + 64
}

/// Where a request body's frames are copied for a mirror. A copy never slows the request:
/// when the mirror falls behind by more than [`COPY_BUDGET`], or the body fails or is dropped
/// unfinished, the copy is given up and its request fails rather than reach the mirror
/// truncated.
pub struct BodyCopy {
    tx: Option<tokio::sync::mpsc::UnboundedSender<Frame<Bytes>>>,
    /// Bytes sent and not yet taken by the mirror's request.
    waiting: Arc<std::sync::atomic::AtomicUsize>,
    given_up: Arc<AtomicBool>,
}

/// A mirror's copy of a request body, as it arrives.
pub struct CopiedBody {
    rx: tokio::sync::mpsc::UnboundedReceiver<Frame<Bytes>>,
    waiting: Arc<std::sync::atomic::AtomicUsize>,
    given_up: Arc<AtomicBool>,
    done: bool,
}

/// The two ends of a body's copy.
pub(super) fn copy_pair() -> (BodyCopy, CopiedBody) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (waiting, given_up) = (Arc::default(), Arc::new(AtomicBool::new(false)));
    let copy = BodyCopy {
        tx: Some(tx),
        waiting: Arc::clone(&waiting),
        given_up: given_up.clone(),
    };
    let copied = CopiedBody {
        rx,
        waiting,
        given_up,
        done: false,
    };
    (copy, copied)
}

impl BodyCopy {
    pub(super) fn offer(&mut self, frame: &Frame<Bytes>) {
        let Some(tx) = &self.tx else { return };
        let copy = match (frame.data_ref(), frame.trailers_ref()) {
            (Some(d), _) => Frame::data(d.clone()),
            (None, Some(t)) => Frame::trailers(t.clone()),
            (None, None) => return,
        };
        let cost = copy_cost(&copy);
        if self.waiting.fetch_add(cost, Relaxed) + cost > COPY_BUDGET || tx.send(copy).is_err() {
            self.give_up();
        }
    }

    fn give_up(&mut self) {
        if self.tx.take().is_some() {
            // Before the sender goes: the receiver checks it once the channel closes.
            self.given_up.store(true, std::sync::atomic::Ordering::Release);
        }
    }

    pub(super) fn finish(&mut self) {
        self.tx = None;
    }
}

impl Drop for BodyCopy {
    fn drop(&mut self) {
        self.give_up();
    }
}

impl Body for CopiedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(f)) => {
                self.waiting.fetch_sub(copy_cost(&f), Relaxed);
                Poll::Ready(Some(Ok(f)))
            }
            Poll::Ready(None) if self.given_up.load(std::sync::atomic::Ordering::Acquire) => {
                Poll::Ready(Some(Err("the mirrored request's body was not copied whole".into())))
            }
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
    fn is_end_stream(&self) -> bool {
        self.done
    }
}

impl RequestBody {
    pub fn empty() -> Self {
        RequestBody::Empty
    }

    pub fn stream(body: ClientBody, limit: usize) -> (Self, Arc<Upload>) {
        let upload = Upload::new();
        let body = RequestBody::Stream(Source {
            body: Limited::new(body, limit),
            upload: upload.clone(),
            copies: Vec::new(),
        });
        (body, upload)
    }

    /// Makes a streamed body one that retries can send again, and returns what makes their
    /// bodies; `None` for any other body.
    pub fn replayable(&mut self) -> Option<Replay> {
        let RequestBody::Stream(_) = self else { return None };
        let RequestBody::Stream(source) = std::mem::replace(self, RequestBody::Empty) else {
            unreachable!()
        };
        let kept = Arc::new(Mutex::new(Kept {
            source,
            parts: Vec::new(),
            bytes: 0,
            last: None,
            ended: false,
            failed: false,
            current: 0,
            waiting: None,
        }));
        let first = Replay {
            kept: kept.clone(),
            try_no: 0,
            next: 0,
        };
        *self = RequestBody::Replay(first);
        Some(Replay {
            kept,
            try_no: 0,
            next: 0,
        })
    }

    /// A copy of this body, frame by frame as it is sent, for a mirror; `None` when there is
    /// no body to copy.
    pub fn copy(&mut self) -> Option<RequestBody> {
        let (tx, rx) = copy_pair();
        match self {
            RequestBody::Stream(s) => s.copies.push(tx),
            RequestBody::Replay(r) => lock(&r.kept).source.copies.push(tx),
            _ => return None,
        }
        Some(RequestBody::Copied(rx))
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::Empty => Poll::Ready(None),
            RequestBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            RequestBody::Stream(s) => s.poll_frame(cx),
            RequestBody::Replay(r) => r.poll_frame(cx),
            RequestBody::Copied(c) => Pin::new(c).poll_frame(cx),
        }
    }
    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Empty => true,
            RequestBody::Full(b) => b.is_none(),
            RequestBody::Stream(s) => s.body.is_end_stream(),
            RequestBody::Replay(r) => {
                let k = lock(&r.kept);
                k.ended && r.next >= k.parts.len()
            }
            RequestBody::Copied(c) => c.is_end_stream(),
        }
    }
    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Empty => SizeHint::with_exact(0),
            RequestBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            RequestBody::Stream(s) => s.body.size_hint(),
            RequestBody::Replay(r) => {
                let k = lock(&r.kept);
                let rest = k.source.body.size_hint();
                let unsent = k.unsent(r.next);
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower() + unsent);
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper + unsent);
                }
                hint
            }
            RequestBody::Copied(_) => SizeHint::default(),
        }
    }
}

/// What goes back to the client: a short local reply, or the upstream's body together with the
/// guards that count this request as in flight until the body is done, and its connection's
/// lease, which gives the connection back to the pool when the body ends.
pub enum ResponseBody {
    Local(Option<Bytes>),
    Upstream {
        body: UpstreamBody,
        /// Bounds the upstream's silence once it has sent the head.
        stall: crate::limits::Stall,
        _request: RequestGuard,
        _endpoint: EndpointGuard,
    },
    /// Either of the above, counted for an access log line sent when it ends.
    Observed(Box<Observed>),
    /// From a connection of the request's own (a sidecar's app): bounded like an upstream's,
    /// with nothing to give back when it ends.
    App {
        body: Incoming,
        stall: crate::limits::Stall,
    },
}

/// A response body whose request is observed — logged, its span ended, counted for its
/// caller — once the body is done (or dropped unfinished).
pub struct Observed {
    inner: ResponseBody,
    entry: Option<crate::access_log::Entry>,
    log: bool,
    span: Option<crate::trace::RequestSpan>,
    access_log: Arc<crate::access_log::AccessLog>,
    call: Option<Counted>,
}

/// A request a sidecar counts for its caller (Istio's request metrics) once its response ends.
pub struct Counted {
    calls: crate::mesh::peers::Calls,
    call: crate::mesh::peers::Call,
    started: std::time::Instant,
    /// The request's body: its declared length, and what of it arrived (none: it had none).
    request: (u64, Option<Arc<Upload>>),
}

impl Counted {
    /// `resp`, answering a request made at `started` (`grpc`: a gRPC call) whose body declared
    /// a length and was received by an upload, as each did (`request`).
    pub fn new<B>(
        calls: crate::mesh::peers::Calls,
        resp: &http::Response<B>,
        grpc: bool,
        started: std::time::Instant,
        request: (u64, Option<Arc<Upload>>),
    ) -> Counted {
        use crate::mesh::peers::{Flag, Protocol};
        let protocol = match grpc {
            // A trailers-only answer (an error) says its status in the head.
            true => Protocol::Grpc(grpc_status(resp.headers())),
            false => Protocol::Http,
        };
        let reason = resp.headers().get(&crate::proxy::headers::X_FERRUM_ERROR);
        let call = crate::mesh::peers::Call {
            status: resp.status().as_u16(),
            protocol,
            flag: reason.map_or(Flag::None, |r| Flag::of_reason(r.as_bytes())),
            took: Duration::ZERO,
            request_bytes: 0,
            response_bytes: 0,
        };
        Counted {
            calls,
            call,
            started,
            request,
        }
    }

    fn frame(&mut self, f: &Frame<Bytes>) {
        use crate::mesh::peers::Protocol;
        if let Some(d) = f.data_ref() {
            self.call.response_bytes += d.len() as u64;
        } else if let (Some(t), Protocol::Grpc(status)) = (f.trailers_ref(), &mut self.call.protocol) {
            *status = grpc_status(t).or(*status);
        }
    }

    fn record(mut self, ended: Ended) {
        use crate::mesh::peers::Flag;
        // The proxy's own answer keeps its reason; a body cut short gets whose fault it was.
        if self.call.flag == Flag::None {
            self.call.flag = match ended {
                Ended::Whole => Flag::None,
                Ended::UpstreamBroke => Flag::UpstreamReset,
                Ended::ClientLeft => Flag::DownstreamTermination,
            };
        }
        self.call.took = self.started.elapsed();
        // What arrived, or what was declared when the app answered before reading it all.
        let (declared, upload) = &self.request;
        self.call.request_bytes = upload.as_ref().map_or(0, |u| u.received()).max(*declared);
        self.calls.record(&self.call);
    }
}

/// How a response body ended.
#[derive(Clone, Copy, PartialEq)]
enum Ended {
    Whole,
    /// The upstream's body broke off (or stalled).
    UpstreamBroke,
    /// Dropped before its end: the client went.
    ClientLeft,
}

/// A `grpc-status` header's code.
fn grpc_status(h: &http::HeaderMap) -> Option<u8> {
    std::str::from_utf8(h.get("grpc-status")?.as_bytes()).ok()?.parse().ok()
}

impl Observed {
    /// `inner`, whose request is logged (`log`, with `entry`), traced (`span`, ended with
    /// `entry`) and counted for its caller (`call`), as each is wanted.
    pub fn wrap(
        inner: ResponseBody,
        entry: Option<crate::access_log::Entry>,
        log: bool,
        span: Option<crate::trace::RequestSpan>,
        access_log: Arc<crate::access_log::AccessLog>,
        call: Option<Counted>,
    ) -> ResponseBody {
        ResponseBody::Observed(Box::new(Observed {
            inner,
            entry,
            log,
            span,
            access_log,
            call,
        }))
    }

    fn finish(&mut self, ended: Ended) {
        if let Some(call) = self.call.take() {
            call.record(ended);
        }
        if let Some(mut e) = self.entry.take() {
            e.complete = ended == Ended::Whole;
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
        let ended = match self.inner.is_end_stream() {
            true => Ended::Whole,
            false => Ended::ClientLeft,
        };
        self.finish(ended);
    }
}

impl ResponseBody {
    pub fn local(b: impl Into<Bytes>) -> Self {
        ResponseBody::Local(Some(b.into()))
    }
}

/// Why a response body ended before its end.
#[derive(Debug, thiserror::Error)]
pub enum ResponseBodyError {
    #[error(transparent)]
    Upstream(#[from] UpstreamBodyError),
    #[error(transparent)]
    App(#[from] hyper::Error),
    #[error("the upstream sent nothing more of the body for {0:?}")]
    Stalled(Duration),
}

/// A frame of `body`, or the stall's error once it has sent nothing for its limit.
fn poll_bounded<B>(
    body: &mut B,
    stall: &mut crate::limits::Stall,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, ResponseBodyError>>>
where
    B: Body<Data = Bytes> + Unpin,
    ResponseBodyError: From<B::Error>,
{
    match Pin::new(body).poll_frame(cx) {
        Poll::Pending => stall
            .poll_stuck(cx)
            .map(|limit| Some(Err(ResponseBodyError::Stalled(limit)))),
        Poll::Ready(r) => {
            stall.moved();
            Poll::Ready(r.map(|f| f.map_err(ResponseBodyError::from)))
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = ResponseBodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            ResponseBody::Local(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ResponseBody::Upstream { body, stall, .. } => poll_bounded(body, stall, cx),
            ResponseBody::App { body, stall } => poll_bounded(body, stall, cx),
            ResponseBody::Observed(l) => {
                let r = Pin::new(&mut l.inner).poll_frame(cx);
                match &r {
                    Poll::Ready(Some(Ok(f))) => {
                        if let (Some(d), Some(e)) = (f.data_ref(), l.entry.as_mut()) {
                            e.bytes_sent += d.len() as u64;
                        }
                        if let Some(c) = l.call.as_mut() {
                            c.frame(f);
                        }
                    }
                    Poll::Ready(None) => l.finish(Ended::Whole),
                    Poll::Ready(Some(Err(_))) => l.finish(Ended::UpstreamBroke),
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
            ResponseBody::App { body, .. } => body.is_end_stream(),
            ResponseBody::Observed(l) => l.inner.is_end_stream(),
        }
    }
    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Local(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ResponseBody::Upstream { body, .. } => body.size_hint(),
            ResponseBody::App { body, .. } => body.size_hint(),
            ResponseBody::Observed(l) => l.inner.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn data(n: usize) -> Frame<Bytes> {
        Frame::data(Bytes::from(vec![b'x'; n]))
    }

    #[tokio::test]
    async fn a_copy_carries_every_frame_and_ends_when_the_body_does() {
        let (mut copy, copied) = copy_pair();
        copy.offer(&Frame::data(Bytes::from_static(b"hello ")));
        copy.offer(&Frame::data(Bytes::from_static(b"mirror")));
        copy.finish();
        drop(copy);
        let got = copied.collect().await.expect("whole").to_bytes();
        assert_eq!(&got[..], b"hello mirror");
    }

    #[tokio::test]
    async fn a_copy_the_mirror_falls_behind_on_or_left_unfinished_fails_instead_of_ending() {
        let (mut copy, copied) = copy_pair();
        for _ in 0..COPY_BUDGET / 65_536 + 1 {
            copy.offer(&data(65_536));
        }
        copy.finish();
        assert!(copied.collect().await.is_err(), "over the budget: given up");

        let (mut copy, copied) = copy_pair();
        copy.offer(&data(10));
        drop(copy);
        assert!(copied.collect().await.is_err(), "the body never ended: given up");
    }

    #[tokio::test]
    async fn what_the_mirror_has_taken_no_longer_counts_against_the_budget() {
        let (mut copy, mut copied) = copy_pair();
        for _ in 0..4 * (COPY_BUDGET / 65_536) {
            copy.offer(&data(65_536));
            let f = copied.frame().await.unwrap().unwrap();
            assert_eq!(f.data_ref().map(Bytes::len), Some(65_536));
        }
        copy.finish();
        drop(copy);
        assert!(
            copied.frame().await.is_none(),
            "4 MiB copied, in step, and ended cleanly"
        );
    }
}
