//! A client that stops reading: its connection's writes wait for ever, holding the upstream
//! connection and circuit-breaker slots of the responses it leaves unread. A write that cannot
//! proceed for the stream idle timeout fails the connection instead (Envoy's
//! `stream_idle_timeout` covers the same case).
//!
//! Over HTTP/2 a client can also stop one stream alone, by granting it no flow-control window:
//! the connection keeps moving, and hyper stops polling that stream's response body (it waits
//! for window first), so no timer of the body's runs. Each stream's task is watched instead
//! ([`StreamExec`]): once its response has started, a stream whose body is not polled for the
//! limit is dropped, which resets it.

use std::cell::Cell;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::rt::{Read, ReadBufCursor, Write};

use crate::limits::Stall;

tokio::task_local! {
    /// The watched stream whose task is running: [`STARTED`] and [`POLLED`].
    static STREAM: Cell<u8>;
}

/// The stream's response body has been polled: its head is sent.
const STARTED: u8 = 1;
/// The body has been polled since its task's watch last looked.
const POLLED: u8 = 2;

/// Called by an HTTP/2 response body on each poll: the stream is moving.
pub fn stream_moved() {
    let _ = STREAM.try_with(|s| s.set(STARTED | POLLED));
}

/// Runs each HTTP/2 stream's task, watched for a stream the client takes nothing of.
#[derive(Clone)]
pub struct StreamExec {
    pub limit: Option<Duration>,
}

impl<F> hyper::rt::Executor<F> for StreamExec
where
    F: Future<Output = ()> + Unpin + Send + 'static,
{
    fn execute(&self, stream: F) {
        match self.limit {
            Some(limit) => tokio::spawn(STREAM.scope(
                Cell::new(0),
                Watched {
                    stream,
                    stall: Stall::new(Some(limit)),
                },
            )),
            None => tokio::spawn(stream),
        };
    }
}

/// A stream's task, ended once its started body has not been polled for the stall's limit.
struct Watched<F> {
    stream: F,
    stall: Stall,
}

impl<F: Future<Output = ()> + Unpin> Future for Watched<F> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let _ = STREAM.try_with(|s| s.set(s.get() & !POLLED));
        if Pin::new(&mut self.stream).poll(cx).is_ready() {
            return Poll::Ready(());
        }
        match STREAM.try_with(Cell::get).unwrap_or(0) {
            // Not yet answered (the route's timeouts bound that), or moving.
            0 => Poll::Pending,
            s if s & POLLED != 0 => {
                self.stall.moved();
                Poll::Pending
            }
            // Dropping the stream's task resets the stream and lets its upstream go.
            _ => self.stall.poll_stuck(cx).map(|limit| {
                tracing::debug!(?limit, "an HTTP/2 stream took nothing of its response: reset");
            }),
        }
    }
}

/// `io` whose writes may be stuck at most the limit given to `new`.
pub struct WriteStall<I> {
    io: I,
    stall: Stall,
}

impl<I> WriteStall<I> {
    pub fn new(io: I, limit: Option<std::time::Duration>) -> Self {
        WriteStall {
            io,
            stall: Stall::new(limit),
        }
    }

    fn check<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match r {
            Poll::Pending => self.stall.poll_stuck(cx).map(|limit| {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the client read nothing for {limit:?}"),
                ))
            }),
            r => {
                self.stall.moved();
                r
            }
        }
    }
}

impl<I: Read + Unpin> Read for WriteStall<I> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: ReadBufCursor<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<I: Write + Unpin> Write for WriteStall<I> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        this.check(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.check(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_flush(cx);
        this.check(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_shutdown(cx);
        this.check(cx, r)
    }
}
