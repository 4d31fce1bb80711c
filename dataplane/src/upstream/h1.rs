//! HTTP/1.1 to an upstream, driven by the request's own task.
//!
//! Why not hyper's client connection: it runs each connection as a task of its own, and every
//! request crosses to it and back through channels — the request handed over, the task woken
//! to write it, the response head and each body frame handed back, the request's task woken
//! for each. Under load that was over a third of ferrum-dp's instructions per request. Here
//! the request's task writes the head, reads the answer with httparse, and its response body
//! reads the rest off the connection, which goes back to the pool when the body ends.
//!
//! The framing rules are hyper's client's (RFC 9112 §6): a response to HEAD, a 1xx, 204 or 304
//! has no body; `Transfer-Encoding` decides over `Content-Length` and ends in `chunked` or reads
//! to the close; differing or invalid `Content-Length`s are refused; 1xx answers other than 101
//! are skipped. Upgrades (and CONNECT) go to hyper: the pool hands it the connection.

use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body as _, Frame, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWrite;

use super::body::{BoxError, RequestBody};
use crate::limits::MAX_HEADER_BYTES;

/// The connector's connection: TCP, TLS over TCP, or a mesh tunnel.
pub type Io = hyper_rustls::MaybeHttpsStream<super::connector::Counted>;

/// Header lines in a response head, at most (hyper's default).
const MAX_HEADERS: usize = 100;
/// Read buffer: what one read asks for at least.
const READ_CHUNK: usize = 8 * 1024;
/// A chunk-size line (with extensions), at most.
const MAX_CHUNK_LINE: usize = 4 * 1024;
/// Data up to this size is copied next to its framing and written in one piece.
const COALESCE: usize = 4 * 1024;

/// Why an exchange with the upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("upstream connection: {0}")]
    Io(#[from] io::Error),
    #[error("the upstream closed the connection before answering")]
    ClosedBeforeHead,
    #[error("the upstream closed the connection within the response body")]
    Truncated,
    #[error("invalid response head: {0}")]
    Parse(#[from] httparse::Error),
    #[error("the response head is over {MAX_HEADER_BYTES} bytes")]
    HeadTooLarge,
    #[error("invalid response: {0}")]
    Invalid(&'static str),
    /// The request's body failed (the client's fault, or a limit): its cause is the source.
    #[error("request body: {0}")]
    Body(#[source] BoxError),
    #[error("the request body is {0} than its Content-Length")]
    BodyLength(&'static str),
}

/// One HTTP/1.1 connection to an endpoint, idle between requests.
pub struct Connection {
    io: TokioIo<Io>,
    /// Read and not yet taken: a head being parsed, body bytes not yet handed on.
    buf: BytesMut,
    /// The request being written; kept between requests so that heads are written without
    /// allocating, and out of the request's future, which every request moves.
    upload: Upload,
    /// Where each header of the head being parsed lies; kept, as `upload`.
    spans: Vec<Span>,
}

impl Connection {
    pub fn new(io: Io) -> Box<Connection> {
        Box::new(Connection {
            io: TokioIo::new(io),
            buf: BytesMut::new(),
            upload: Upload::default(),
            spans: Vec::new(),
        })
    }

    /// The connection, for hyper to take over (an upgrade); `None` if bytes are waiting on it,
    /// which no idle connection should have.
    pub fn into_io(self: Box<Self>) -> Option<Io> {
        self.buf.is_empty().then(|| self.io.into_inner())
    }

    /// Whether the upstream closed it (or sent something unasked) while it was idle: looked at
    /// without waiting, before a request is trusted to it.
    pub fn closed(&mut self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        self.buf.reserve(1);
        // Ready: the end of the stream, an error, or bytes nobody asked for.
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), &mut cx, &mut self.buf).is_ready()
    }

    /// Sends `req` (origin-form target, `Host` set) and reads the answer's head. The body
    /// holds the connection; [`Body::into_idle`] gives it back once the body has ended.
    pub async fn send(mut self: Box<Self>, req: Request<RequestBody>) -> Result<Response<Body>, Error> {
        let (mut parts, body) = req.into_parts();
        self.upload.start(&mut parts, body);
        // Only whether it was HEAD is needed of the head from here on: not kept in the future.
        let head_only = parts.method == Method::HEAD;
        drop(parts);
        let mut failed = None;
        let head = poll_fn(|cx| {
            if self.upload.active && failed.is_none() {
                match self.upload.poll(cx, &mut self.io) {
                    Poll::Ready(Ok(())) => self.upload.active = false,
                    Poll::Ready(Err(e)) => failed = Some(e),
                    Poll::Pending => {}
                }
            }
            match self.poll_head(cx, head_only) {
                // An answer that came before the upload broke is still the answer.
                Poll::Ready(r) => Poll::Ready(r),
                Poll::Pending => match failed.take() {
                    Some(e) => Poll::Ready(Err(e)),
                    None => Poll::Pending,
                },
            }
        })
        .await?;
        let (resp, framing, mut keep_alive) = head;
        if failed.is_some() {
            // The upload broke after the answer came: the rest of it is never sent.
            self.upload.stop();
        }
        // Answered before the whole request was sent (an early error, mostly): the rest is
        // still sent while the answer is read, but whether the upstream reads it is its own
        // affair, so the connection is not trusted with another request.
        keep_alive &= !self.upload.active && failed.is_none();
        let kind = match framing {
            Framing::Length(0) => Kind::Done,
            Framing::Length(n) => Kind::Length(n),
            Framing::Chunked => Kind::Chunk(Chunk::Size),
            Framing::Close => Kind::Close,
        };
        Ok(resp.map(|()| Body {
            conn: Some(self),
            kind,
            keep_alive: keep_alive && !matches!(framing, Framing::Close),
        }))
    }

    /// Reads until a final response head is parsed (1xx other than 101 skipped).
    fn poll_head(&mut self, cx: &mut Context<'_>, head_only: bool) -> Poll<Result<Parsed, Error>> {
        loop {
            if !self.buf.is_empty()
                && let Some(parsed) = parse_head(&mut self.buf, &mut self.spans, head_only)?
            {
                return Poll::Ready(Ok(parsed));
            }
            if self.buf.len() > MAX_HEADER_BYTES {
                return Poll::Ready(Err(Error::HeadTooLarge));
            }
            if ready!(self.poll_fill(cx))? == 0 {
                return Poll::Ready(Err(Error::ClosedBeforeHead));
            }
        }
    }

    /// Reads more into the buffer: how many bytes (0 at the end of the stream).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.buf.reserve(READ_CHUNK);
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }
}

/// A final response head, how its body is framed, and whether the connection may be reused.
type Parsed = (Response<()>, Framing, bool);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Framing {
    Length(u64),
    Chunked,
    /// Up to the end of the stream: the connection is not reused.
    Close,
}

/// A header's name and value as offsets into its head.
type Span = (u32, u32, u32, u32);

/// Parses a response head (to a HEAD request: `head_only`) off the front of `buf`: `None` until
/// a final one is complete.
fn parse_head(buf: &mut BytesMut, spans: &mut Vec<Span>, head_only: bool) -> Result<Option<Parsed>, Error> {
    loop {
        let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut res = httparse::Response::new(&mut []);
        let base = buf.as_ptr() as usize;
        let len =
            match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut res, buf, &mut headers)? {
                httparse::Status::Complete(len) => len,
                httparse::Status::Partial => return Ok(None),
            };
        if len > MAX_HEADER_BYTES {
            return Err(Error::HeadTooLarge);
        }
        let code = res.code.unwrap_or_default();
        let http11 = res.version == Some(1);
        spans.clear();
        // Within the head, which is at most MAX_HEADER_BYTES.
        let at = |s: &[u8]| (s.as_ptr() as usize - base) as u32;
        let reason = res.reason.map(|r| (at(r.as_bytes()) as usize, r.len()));
        spans.extend(res.headers.iter().map(|h| {
            let (name, value) = (at(h.name.as_bytes()), at(h.value));
            (name, name + h.name.len() as u32, value, value + h.value.len() as u32)
        }));
        let head = buf.split_to(len).freeze();
        if (100..200).contains(&code) && code != 101 {
            // Informational: skipped, the final answer follows.
            continue;
        }
        let status = StatusCode::from_u16(code).map_err(|_| Error::Invalid("status code"))?;
        // Room to spare: the proxy appends Via, and hyper's server reuses this map for the
        // client's next request, to which the proxy adds five; a full map grows (rehashes,
        // reallocates) before the next insert.
        let mut map = HeaderMap::with_capacity((spans.len() + 1).max(12));
        let mut noted = Noted::default();
        for &(n0, n1, v0, v1) in spans.iter() {
            let (n0, n1, v0, v1) = (n0 as usize, n1 as usize, v0 as usize, v1 as usize);
            let name = HeaderName::from_bytes(&head[n0..n1]).map_err(|_| Error::Invalid("header name"))?;
            let value =
                HeaderValue::from_maybe_shared(head.slice(v0..v1)).map_err(|_| Error::Invalid("header value"))?;
            noted.note(&name, value.as_bytes())?;
            map.append(name, value);
        }
        let framing = noted.framing(status, head_only, http11)?;
        let keep_alive = !noted.close && (http11 || noted.keep_alive) && status != StatusCode::SWITCHING_PROTOCOLS;
        let mut resp = Response::new(());
        *resp.status_mut() = status;
        *resp.version_mut() = if http11 { Version::HTTP_11 } else { Version::HTTP_10 };
        *resp.headers_mut() = map;
        if let Some((at, n)) = reason
            && status
                .canonical_reason()
                .is_none_or(|c| c.as_bytes() != &head[at..at + n])
            && let Ok(r) = hyper::ext::ReasonPhrase::try_from(head.slice(at..at + n))
        {
            // A backend's own reason phrase goes on to an HTTP/1.1 client, as hyper's client
            // kept it.
            resp.extensions_mut().insert(r);
        }
        return Ok(Some((resp, framing, keep_alive)));
    }
}

/// What a head's fields say of its framing and its connection, noted as they are read (rather
/// than looked up in the map afterwards).
#[derive(Default)]
struct Noted {
    /// A `Connection` line said `close`: it closes, whatever else said `keep-alive`.
    close: bool,
    /// A `Connection` line said `keep-alive` (which HTTP/1.0 needs to keep it).
    keep_alive: bool,
    /// `Transfer-Encoding` was present, and whether its last coding was `chunked`.
    chunked: Option<bool>,
    /// The `Content-Length` all its values agree on.
    length: Option<u64>,
}

impl Noted {
    fn note(&mut self, name: &HeaderName, value: &[u8]) -> Result<(), Error> {
        let tokens = || value.split(|&b| b == b',').map(<[u8]>::trim_ascii);
        if name == header::CONNECTION {
            for t in tokens() {
                self.close |= t.eq_ignore_ascii_case(b"close");
                self.keep_alive |= t.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name == header::TRANSFER_ENCODING {
            let last = tokens().rfind(|t| !t.is_empty());
            self.chunked = Some(last.is_some_and(|t| t.eq_ignore_ascii_case(b"chunked")));
        } else if name == header::CONTENT_LENGTH {
            for t in tokens() {
                let n = parse_length(t).ok_or(Error::Invalid("Content-Length"))?;
                if self.length.is_some_and(|l| l != n) {
                    return Err(Error::Invalid("differing Content-Lengths"));
                }
                self.length = Some(n);
            }
        }
        Ok(())
    }

    /// How the body of a `status` answer (to a HEAD request: `head_only`) is framed (RFC 9112
    /// §6.3): `Transfer-Encoding` decides over `Content-Length`; neither reads to the close.
    fn framing(&self, status: StatusCode, head_only: bool, http11: bool) -> Result<Framing, Error> {
        if matches!(status.as_u16(), 101 | 204 | 304) || head_only {
            return Ok(Framing::Length(0));
        }
        match self.chunked {
            Some(_) if !http11 => Err(Error::Invalid("Transfer-Encoding in an HTTP/1.0 response")),
            Some(true) => Ok(Framing::Chunked),
            Some(false) => Ok(Framing::Close),
            None => Ok(self.length.map_or(Framing::Close, Framing::Length)),
        }
    }
}

/// Digits only, as RFC 9110 §8.6 has it (no sign, no spaces), and no overflow.
fn parse_length(t: &[u8]) -> Option<u64> {
    if t.is_empty() || t.len() > 19 || !t.iter().all(u8::is_ascii_digit) {
        return None;
    }
    t.iter()
        .try_fold(0u64, |n, d| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))
}

/// The request being written: its head, then its body as framed.
#[derive(Default)]
struct Upload {
    /// A request is being written.
    active: bool,
    /// Encoded and not yet written: framing bytes (and small data) in `out` from `at`, then
    /// `data`, then `tail`.
    out: Vec<u8>,
    at: usize,
    data: Bytes,
    tail: &'static [u8],
    body: Option<RequestBody>,
    /// Bytes still to send under a Content-Length, or `None` when chunked.
    left: Option<u64>,
    /// Trailer fields the head declared (`Trailer`), which a chunked body may end with.
    trailers: Vec<HeaderName>,
    flushed: bool,
}

impl Upload {
    /// Encodes the head into `out` and decides the body's framing as hyper's client does: a
    /// `Content-Length` given is kept; a body of known size gets one; any other is chunked,
    /// except that GET, HEAD and CONNECT send none.
    fn start(&mut self, parts: &mut http::request::Parts, body: RequestBody) {
        let out = &mut self.out;
        out.clear();
        let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        out.extend_from_slice(parts.method.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(target.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        let h = &mut parts.headers;
        h.remove(header::TRANSFER_ENCODING);
        // A Content-Length that is kept is one the body is held to; any other goes (a header
        // filter may have set one), so the head never promises bytes that will not come.
        let given = content_length(h);
        let (left, add) = match given {
            Some(n) if n > 0 || body.is_end_stream() => (Some(n), None),
            _ => {
                h.remove(header::CONTENT_LENGTH);
                if body.is_end_stream() {
                    (Some(0), None)
                } else if let Some(n) = body.size_hint().exact() {
                    (Some(n), Some(Framing::Length(n)))
                } else if matches!(parts.method, Method::GET | Method::HEAD | Method::CONNECT) {
                    (Some(0), None)
                } else {
                    (None, Some(Framing::Chunked))
                }
            }
        };
        for (name, value) in h.iter() {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        match add {
            Some(Framing::Length(n)) => {
                out.extend_from_slice(b"content-length: ");
                out.extend_from_slice(itoa_u64(n, &mut [0; 20]));
                out.extend_from_slice(b"\r\n");
            }
            Some(_) => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
            None => {}
        }
        out.extend_from_slice(b"\r\n");
        let trailers = match left {
            None => h
                .get_all(header::TRAILER)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|s| s.split(','))
                .filter_map(|s| HeaderName::from_bytes(s.trim().as_bytes()).ok())
                .collect(),
            Some(_) => Vec::new(),
        };
        self.active = true;
        self.at = 0;
        self.data = Bytes::new();
        self.tail = b"";
        self.body = (left != Some(0)).then_some(body);
        self.left = left;
        self.trailers = trailers;
        self.flushed = false;
    }

    /// Gives up on the rest of the request (its connection is not reused).
    fn stop(&mut self) {
        self.active = false;
        self.body = None;
    }

    /// Writes what is encoded, and encodes the body's next frame, until the body has ended
    /// and all of it is written and flushed.
    fn poll(&mut self, cx: &mut Context<'_>, io: &mut TokioIo<Io>) -> Poll<Result<(), Error>> {
        loop {
            ready!(self.poll_write(cx, io))?;
            let Some(body) = self.body.as_mut() else {
                if !self.flushed {
                    ready!(Pin::new(&mut *io).poll_flush(cx))?;
                    self.flushed = true;
                }
                return Poll::Ready(Ok(()));
            };
            if !self.flushed {
                // What is written waits for no more of the body.
                ready!(Pin::new(&mut *io).poll_flush(cx))?;
                self.flushed = true;
            }
            let frame = ready!(Pin::new(body).poll_frame(cx));
            self.out.clear();
            self.at = 0;
            self.flushed = false;
            match frame {
                Some(Ok(f)) => match f.into_data() {
                    Ok(data) => self.encode(data)?,
                    Err(f) => {
                        if let Ok(t) = f.into_trailers() {
                            self.end(Some(&t))?;
                        }
                    }
                },
                Some(Err(e)) => return Poll::Ready(Err(Error::Body(e))),
                None => self.end(None)?,
            }
        }
    }

    /// Frames one piece of the body.
    fn encode(&mut self, data: Bytes) -> Result<(), Error> {
        if data.is_empty() {
            return Ok(());
        }
        match &mut self.left {
            Some(left) => {
                *left = left.checked_sub(data.len() as u64).ok_or(Error::BodyLength("longer"))?;
                self.tail = b"";
            }
            None => {
                let mut hex = [0u8; 16];
                self.out.extend_from_slice(hex_usize(data.len(), &mut hex));
                self.out.extend_from_slice(b"\r\n");
                self.tail = b"\r\n";
            }
        }
        if data.len() <= COALESCE {
            self.out.extend_from_slice(&data);
            self.out.extend_from_slice(self.tail);
            self.tail = b"";
        } else {
            self.data = data;
        }
        if self.left == Some(0) {
            self.body = None;
        }
        Ok(())
    }

    /// The body has ended (with `trailers`, perhaps): the last chunk, or a check that all the
    /// Content-Length promised was sent.
    fn end(&mut self, trailers: Option<&HeaderMap>) -> Result<(), Error> {
        self.body = None;
        if self.left.is_some_and(|n| n > 0) {
            return Err(Error::BodyLength("shorter"));
        }
        if self.left.is_none() {
            self.out.extend_from_slice(b"0\r\n");
            for (name, value) in trailers.iter().flat_map(|t| t.iter()) {
                if self.trailers.contains(name) {
                    self.out.extend_from_slice(name.as_str().as_bytes());
                    self.out.extend_from_slice(b": ");
                    self.out.extend_from_slice(value.as_bytes());
                    self.out.extend_from_slice(b"\r\n");
                }
            }
            self.out.extend_from_slice(b"\r\n");
        }
        Ok(())
    }

    /// Writes `out[at..]`, `data` and `tail`, in as few calls as the connection allows.
    fn poll_write(&mut self, cx: &mut Context<'_>, io: &mut TokioIo<Io>) -> Poll<io::Result<()>> {
        while self.at < self.out.len() || !self.data.is_empty() || !self.tail.is_empty() {
            let parts = [
                IoSlice::new(&self.out[self.at..]),
                IoSlice::new(&self.data),
                IoSlice::new(self.tail),
            ];
            let mut n = ready!(Pin::new(&mut *io).poll_write_vectored(cx, &parts))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            let head = n.min(self.out.len() - self.at);
            self.at += head;
            n -= head;
            let data = n.min(self.data.len());
            self.data.advance(data);
            n -= data;
            self.tail = &self.tail[n.min(self.tail.len())..];
        }
        Poll::Ready(Ok(()))
    }
}

/// The request's `Content-Length`, when it carries a valid one.
fn content_length(h: &HeaderMap) -> Option<u64> {
    let mut values = h.get_all(header::CONTENT_LENGTH).iter();
    let first = parse_length(values.next()?.as_bytes().trim_ascii())?;
    values
        .all(|v| parse_length(v.as_bytes().trim_ascii()) == Some(first))
        .then_some(first)
}

fn itoa_u64(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

fn hex_usize(mut n: usize, buf: &mut [u8; 16]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b"0123456789abcdef"[n & 15];
        n >>= 4;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// A response body, read off the connection as it is asked for.
pub struct Body {
    conn: Option<Box<Connection>>,
    kind: Kind,
    keep_alive: bool,
}

enum Kind {
    Length(u64),
    Chunk(Chunk),
    Close,
    Done,
}

enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer fields, then an empty line.
    Trailers,
}

impl Body {
    /// The connection, free for another request: the body has been read to its end, the
    /// request was sent whole, and nothing more came.
    pub fn into_idle(&mut self) -> Option<Box<Connection>> {
        if !matches!(self.kind, Kind::Done) || !self.keep_alive {
            return None;
        }
        // Not while the request is still being sent (the answer came first).
        self.conn.take().filter(|c| c.buf.is_empty() && !c.upload.active)
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(None);
        };
        if conn.upload.active {
            // The answer came before the whole request: the rest is still sent.
            match conn.upload.poll(cx, &mut conn.io) {
                Poll::Ready(Ok(())) => conn.upload.active = false,
                Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e))),
                Poll::Pending => {}
            }
        }
        loop {
            match &mut self.kind {
                Kind::Done => return Poll::Ready(None),
                Kind::Length(left) => {
                    if conn.buf.is_empty() && ready!(conn.poll_fill(cx))? == 0 {
                        return Poll::Ready(Some(Err(Error::Truncated)));
                    }
                    let n = (*left).min(conn.buf.len() as u64);
                    *left -= n;
                    let data = conn.buf.split_to(n as usize).freeze();
                    if *left == 0 {
                        self.kind = Kind::Done;
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Kind::Close => {
                    if conn.buf.is_empty() && ready!(conn.poll_fill(cx))? == 0 {
                        self.kind = Kind::Done;
                        continue;
                    }
                    return Poll::Ready(Some(Ok(Frame::data(conn.buf.split().freeze()))));
                }
                Kind::Chunk(chunk) => match ready!(poll_chunk(conn, chunk, cx))? {
                    Some(frame) => {
                        if frame.is_trailers() {
                            // The trailer section ends the body.
                            self.kind = Kind::Done;
                        }
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    None => self.kind = Kind::Done,
                },
            }
        }
    }
}

/// Decodes the chunked body on `conn` up to its next frame: data, trailers (`None` once the
/// body has ended without any), or an error.
fn poll_chunk(
    conn: &mut Connection,
    chunk: &mut Chunk,
    cx: &mut Context<'_>,
) -> Poll<Result<Option<Frame<Bytes>>, Error>> {
    loop {
        let progress = match chunk {
            Chunk::Size => match httparse::parse_chunk_size(&conn.buf) {
                Ok(httparse::Status::Complete((used, size))) => {
                    conn.buf.advance(used);
                    *chunk = if size == 0 { Chunk::Trailers } else { Chunk::Data(size) };
                    true
                }
                Ok(httparse::Status::Partial) if conn.buf.len() <= MAX_CHUNK_LINE => false,
                _ => return Poll::Ready(Err(Error::Invalid("chunk size line"))),
            },
            Chunk::Data(left) if !conn.buf.is_empty() => {
                let n = (*left).min(conn.buf.len() as u64);
                *left -= n;
                let data = conn.buf.split_to(n as usize).freeze();
                if *left == 0 {
                    *chunk = Chunk::DataEnd;
                }
                return Poll::Ready(Ok(Some(Frame::data(data))));
            }
            Chunk::Data(_) => false,
            Chunk::DataEnd if conn.buf.len() >= 2 => {
                if &conn.buf[..2] != b"\r\n" {
                    return Poll::Ready(Err(Error::Invalid("chunk data longer than its size")));
                }
                conn.buf.advance(2);
                *chunk = Chunk::Size;
                true
            }
            Chunk::DataEnd => false,
            Chunk::Trailers => {
                let mut fields = [httparse::EMPTY_HEADER; 32];
                match httparse::parse_headers(&conn.buf, &mut fields) {
                    Ok(httparse::Status::Complete((used, fields))) => {
                        let mut t = HeaderMap::new();
                        for f in fields.iter() {
                            if let (Ok(n), Ok(v)) = (
                                HeaderName::from_bytes(f.name.as_bytes()),
                                HeaderValue::from_bytes(f.value),
                            ) {
                                t.append(n, v);
                            }
                        }
                        conn.buf.advance(used);
                        return Poll::Ready(Ok((!t.is_empty()).then(|| Frame::trailers(t))));
                    }
                    Ok(httparse::Status::Partial) if conn.buf.len() <= MAX_HEADER_BYTES => false,
                    _ => return Poll::Ready(Err(Error::Invalid("trailer section"))),
                }
            }
        };
        if !progress && ready!(conn.poll_fill(cx))? == 0 {
            return Poll::Ready(Err(Error::Truncated));
        }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.get_mut();
        let r = this.poll_next(cx);
        if let Poll::Ready(Some(Err(_))) = &r {
            // Whatever is left on the wire cannot be read past: the connection goes.
            this.kind = Kind::Done;
            this.conn = None;
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.kind, Kind::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.kind {
            Kind::Done => SizeHint::with_exact(0),
            Kind::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use ferrum_snapshot::model::{Cluster, Endpoint};
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tower_service::Service;

    use super::*;

    /// A raw HTTP/1.1 server on loopback for one connection: for each of `answers`, it reads a
    /// request (its head, and a body by Content-Length or chunked) and writes the answer as
    /// given; every request as it came off the wire is sent on `seen`. After the last, it
    /// closes the connection.
    async fn server(
        answers: Vec<&'static [u8]>,
    ) -> (http::uri::Authority, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
        let l = ferrum_testkit::listen_local().await;
        let addr = l.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = Vec::new();
            for answer in answers {
                let Some(req) = read_request(&mut s, &mut buf).await else {
                    return;
                };
                let _ = tx.send(req);
                s.write_all(answer).await.unwrap();
            }
            // Then closes it, as a server that has said all it will.
        });
        (addr.to_string().parse().unwrap(), rx)
    }

    async fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            fill(s, buf).await?;
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let mut end = head_end;
        if let Some(cl) = head.lines().find_map(|l| l.strip_prefix("content-length: ")) {
            end += cl.trim().parse::<usize>().unwrap();
        } else if head.contains("transfer-encoding: chunked") {
            while !buf[head_end..].windows(5).any(|w| w == b"0\r\n\r\n") {
                fill(s, buf).await?;
            }
            end = head_end + buf[head_end..].windows(5).position(|w| w == b"0\r\n\r\n").unwrap() + 5;
        }
        while buf.len() < end {
            fill(s, buf).await?;
        }
        Some(buf.drain(..end).collect())
    }

    async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<()> {
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => None,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                Some(())
            }
        }
    }

    async fn connect(a: &http::uri::Authority) -> Box<Connection> {
        let c = Cluster::new("c", vec![Endpoint::new("127.0.0.1", a.port_u16().unwrap())]);
        let stats = Arc::new(crate::telemetry::ClusterStats::default());
        let mut connector =
            super::super::connector::build(&c, stats, &Default::default(), &Default::default()).unwrap();
        let uri = format!("http://{a}/").parse().unwrap();
        Connection::new(connector.call(uri).await.unwrap())
    }

    fn get(path: &str) -> Request<RequestBody> {
        Request::get(path)
            .header("host", "backend")
            .body(RequestBody::Empty)
            .unwrap()
    }

    /// Sends `req` and reads the whole answer: status, body, trailers, and the connection
    /// when it may serve another request.
    async fn exchange(
        conn: Box<Connection>,
        req: Request<RequestBody>,
    ) -> Result<(StatusCode, Bytes, Option<HeaderMap>, Option<Box<Connection>>), Error> {
        let (head, mut body) = conn.send(req).await?.into_parts();
        let mut data = Vec::new();
        let mut trailers = None;
        while let Some(f) = body.frame().await {
            let f = f?;
            if let Some(d) = f.data_ref() {
                data.extend_from_slice(d);
            }
            trailers = f.into_trailers().ok().or(trailers);
        }
        Ok((head.status, data.into(), trailers, body.into_idle()))
    }

    #[tokio::test]
    async fn one_connection_carries_answers_framed_each_way_in_turn() {
        let (a, mut seen) = server(vec![
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </s.css>\r\n\r\n\
              HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-sum\r\n\r\n\
              4;ext=1\r\nwiki\r\n5\r\npedia\r\n0\r\nx-sum: 9\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil the end",
        ])
        .await;
        let conn = connect(&a).await;
        let (s, body, _, conn) = exchange(conn, get("/one?q=1")).await.unwrap();
        assert_eq!((s, &body[..]), (StatusCode::OK, &b"hello"[..]));
        let seen_one = seen.recv().await.unwrap();
        assert_eq!(
            seen_one, b"GET /one?q=1 HTTP/1.1\r\nhost: backend\r\n\r\n",
            "no framing for no body"
        );

        let (s, body, trailers, conn) = exchange(conn.expect("kept"), get("/two")).await.unwrap();
        assert_eq!(
            (s, &body[..]),
            (StatusCode::OK, &b"wikipedia"[..]),
            "1xx skipped, chunks joined"
        );
        assert_eq!(trailers.expect("trailers")["x-sum"], "9");

        let mut head = get("/three");
        *head.method_mut() = Method::HEAD;
        let (s, body, _, conn) = exchange(conn.expect("kept"), head).await.unwrap();
        assert_eq!(
            (s, body.len()),
            (StatusCode::OK, 0),
            "a HEAD answer has no body, whatever its length says"
        );

        let (s, _, _, conn) = exchange(conn.expect("kept"), get("/four")).await.unwrap();
        assert_eq!(s, StatusCode::NO_CONTENT);

        let (s, body, _, conn) = exchange(conn.expect("kept"), get("/five")).await.unwrap();
        assert_eq!((s, &body[..]), (StatusCode::OK, &b"until the end"[..]));
        assert!(conn.is_none(), "read to the close: not reused");
        for path in ["/two", "/three", "/four", "/five"] {
            let req = seen.recv().await.unwrap();
            assert!(req.starts_with(format!("{} {path} ", if path == "/three" { "HEAD" } else { "GET" }).as_bytes()));
        }
    }

    #[tokio::test]
    async fn bodies_go_with_their_length_or_chunked() {
        let ok: &'static [u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        let (a, mut seen) = server(vec![ok, ok, ok]).await;
        let conn = connect(&a).await;
        let post = |body| Request::post("/up").header("host", "backend").body(body).unwrap();
        let (_, _, _, conn) = exchange(conn, post(RequestBody::Full(Some(Bytes::from_static(b"abc")))))
            .await
            .unwrap();
        let req = seen.recv().await.unwrap();
        assert!(
            req.ends_with(b"content-length: 3\r\n\r\nabc"),
            "{}",
            String::from_utf8_lossy(&req)
        );

        // A body of unknown length, in three pieces, one larger than is copied.
        let (mut copy, copied) = super::super::body::copy_pair();
        copy.offer(&Frame::data(Bytes::from_static(b"hello ")));
        copy.offer(&Frame::data(Bytes::from(vec![b'x'; 10_000])));
        copy.offer(&Frame::data(Bytes::from_static(b"!")));
        copy.finish();
        let (_, _, _, conn) = exchange(conn.expect("kept"), post(RequestBody::Copied(copied)))
            .await
            .unwrap();
        let req = seen.recv().await.unwrap();
        let text = String::from_utf8_lossy(&req);
        assert!(
            text.contains("transfer-encoding: chunked\r\n\r\n6\r\nhello \r\n2710\r\nxxx"),
            "{text}"
        );
        assert!(text.ends_with("x\r\n1\r\n!\r\n0\r\n\r\n"), "{text}");

        // A Content-Length given is kept, and the body held to it: one an empty body does not
        // fill fails the request rather than leave the upstream waiting for the next one's bytes.
        let mut req = get("/");
        req.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        let e = exchange(conn.expect("kept"), req).await.err().expect("refused");
        assert!(matches!(e, Error::BodyLength("shorter")), "{e:?}");
        let (a, mut seen) = server(vec![ok, ok]).await;
        let conn = connect(&a).await;
        // One that is no length at all is replaced by the body's own.
        let mut req = post(RequestBody::Full(Some(Bytes::from_static(b"abcd"))));
        req.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("four"));
        let (_, _, _, conn) = exchange(conn, req).await.unwrap();
        let text = String::from_utf8(seen.recv().await.unwrap()).unwrap();
        assert_eq!(text.matches("content-length").count(), 1, "{text}");
        assert!(text.ends_with("content-length: 4\r\n\r\nabcd"), "{text}");
        let mut req = post(RequestBody::Full(Some(Bytes::from_static(b"abcd"))));
        req.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        let e = exchange(conn.expect("kept"), req).await.err().expect("refused");
        assert!(matches!(e, Error::BodyLength("longer")), "{e:?}");
    }

    #[tokio::test]
    async fn malformed_answers_are_errors_and_end_their_connection() {
        let cases: [(&'static [u8], &str); 7] = [
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello",
                "differing lengths",
            ),
            (b"HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\nhello", "a signed length"),
            (
                b"HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
                "chunked in HTTP/1.0",
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
                "a chunk size not in hex",
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n",
                "a chunk longer than its size",
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello",
                "a body cut short",
            ),
            (
                b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
                "a header line without a colon",
            ),
        ];
        for (answer, what) in cases {
            let (a, _seen) = server(vec![answer]).await;
            let conn = connect(&a).await;
            let r = tokio::time::timeout(Duration::from_secs(5), async {
                let resp = conn.send(get("/")).await?;
                let mut body = resp.into_body();
                while let Some(f) = body.frame().await {
                    f?;
                }
                Ok::<_, Error>(body.into_idle().is_some())
            });
            match r.await {
                Ok(Err(_)) => {}
                other => panic!("{what}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn an_answer_before_the_whole_request_is_not_followed_by_another() {
        // The server answers once it has the head; the body is still coming.
        let l = ferrum_testkit::listen_local().await;
        let a: http::uri::Authority = l.local_addr().unwrap().to_string().parse().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = Vec::new();
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                fill(&mut s, &mut buf).await.unwrap();
            }
            s.write_all(b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
            while fill(&mut s, &mut buf).await.is_some() {}
        });
        let (mut copy, copied) = super::super::body::copy_pair();
        copy.offer(&Frame::data(Bytes::from_static(b"first part")));
        let req = Request::post("/up")
            .header("host", "b")
            .body(RequestBody::Copied(copied))
            .unwrap();
        let conn = connect(&a).await;
        let mut resp = conn.send(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
        copy.finish();
        assert!(resp.body().is_end_stream());
        assert!(
            resp.body_mut().into_idle().is_none(),
            "not reused: the upstream may not read the rest"
        );
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_while_idle_is_seen_closed() {
        let l = ferrum_testkit::listen_local().await;
        let a: http::uri::Authority = l.local_addr().unwrap().to_string().parse().unwrap();
        let (close, closing) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = Vec::new();
            read_request(&mut s, &mut buf).await.unwrap();
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
            let _ = closing.await;
        });
        let (_, _, _, conn) = exchange(connect(&a).await, get("/")).await.unwrap();
        let mut conn = conn.expect("kept");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!conn.closed(), "open while the server holds it");
        close.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(conn.closed(), "the server closed it");
    }

    #[test]
    fn lengths_are_digits_only() {
        assert_eq!(parse_length(b"0"), Some(0));
        assert_eq!(parse_length(b"18446744073709551615"), None, "twenty digits");
        assert_eq!(parse_length(b"9999999999999999999"), Some(9_999_999_999_999_999_999));
        for bad in [&b""[..], b"+5", b"-1", b"5 ", b"0x10", b"1_000"] {
            assert_eq!(parse_length(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(hex_usize(10_000, &mut [0; 16]), b"2710");
        assert_eq!(itoa_u64(0, &mut [0; 20]), b"0");
        assert_eq!(itoa_u64(u64::MAX, &mut [0; 20]), b"18446744073709551615");
    }
}
