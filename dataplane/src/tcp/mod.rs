//! L4: relaying bytes between two streams, with half-close, an idle timeout and byte counts.
//! Upgraded HTTP connections (WebSocket), the sidecar's L4 paths and TCP/TLS routes run on it.

pub mod forward;

use std::io;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::upstream::now_ms;

/// Bytes moved by one relay.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Relayed {
    /// From the first stream to the second.
    pub forward: u64,
    /// From the second stream back to the first.
    pub back: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("idle for {0:?}")]
    Idle(Duration),
    #[error(transparent)]
    Io(#[from] io::Error),
}

const BUF: usize = 16 * 1024;

/// Copies both ways until both sides have finished sending. An end of stream on one side is
/// passed on as a half-close (`shutdown` of the other's write side), so request/response
/// protocols over TCP work. Ends with an error when nothing moved either way for `idle`.
pub async fn relay<A, B>(a: A, b: B, idle: Duration) -> Result<Relayed, RelayError>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let last = AtomicU64::new(now_ms());
    let both = async { tokio::try_join!(pipe(&mut ar, &mut bw, &last), pipe(&mut br, &mut aw, &last)) };
    let watchdog = async {
        loop {
            let quiet = Duration::from_millis(now_ms().saturating_sub(last.load(Relaxed)));
            if quiet >= idle {
                return;
            }
            tokio::time::sleep(idle - quiet).await;
        }
    };
    tokio::select! {
        r = both => {
            let (forward, back) = r?;
            Ok(Relayed { forward, back })
        }
        _ = watchdog => Err(RelayError::Idle(idle)),
    }
}

async fn pipe<R, W>(r: &mut R, w: &mut W, last: &AtomicU64) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            w.shutdown().await?;
            return Ok(total);
        }
        w.write_all(&buf[..n]).await?;
        w.flush().await?;
        total += n as u64;
        last.store(now_ms(), Relaxed);
    }
}

/// A stream whose bytes are counted as they pass, and reported once when it is dropped:
/// `done(read, written)`.
pub struct Metered<S, F: FnOnce(u64, u64)> {
    inner: S,
    read: u64,
    written: u64,
    done: Option<F>,
}

impl<S, F: FnOnce(u64, u64)> Metered<S, F> {
    pub fn new(inner: S, done: F) -> Self {
        Metered {
            inner,
            read: 0,
            written: 0,
            done: Some(done),
        }
    }
}

impl<S, F: FnOnce(u64, u64)> Drop for Metered<S, F> {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            done(self.read, self.written);
        }
    }
}

impl<S: AsyncRead + Unpin, F: FnOnce(u64, u64) + Unpin> AsyncRead for Metered<S, F> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        self.read += (buf.filled().len() - before) as u64;
        r
    }
}

impl<S: AsyncWrite + Unpin, F: FnOnce(u64, u64) + Unpin> AsyncWrite for Metered<S, F> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = r {
            self.written += n as u64;
        }
        r
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let std::task::Poll::Ready(Ok(n)) = r {
            self.written += n as u64;
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_metered_stream_reports_what_passed_once_dropped() {
        let (a, mut b) = tokio::io::duplex(64);
        let (tx, rx) = std::sync::mpsc::channel();
        let mut m = Metered::new(a, move |read, written| tx.send((read, written)).unwrap());
        m.write_all(b"hello").await.unwrap();
        b.write_all(b"hi there").await.unwrap();
        let mut got = [0u8; 8];
        m.read_exact(&mut got).await.unwrap();
        assert!(rx.try_recv().is_err(), "reported only at the end");
        drop(m);
        assert_eq!(rx.recv().unwrap(), (8, 5));
    }

    #[tokio::test]
    async fn relays_both_ways_and_passes_half_close_on() {
        let (client, proxy_a) = tokio::io::duplex(64);
        let (proxy_b, server) = tokio::io::duplex(64);
        let relay = tokio::spawn(relay(proxy_a, proxy_b, Duration::from_secs(5)));
        let (mut cr, mut cw) = tokio::io::split(client);
        let (mut sr, mut sw) = tokio::io::split(server);
        cw.write_all(b"ping").await.unwrap();
        cw.shutdown().await.unwrap();
        let mut got = Vec::new();
        sr.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"ping", "the server sees the client's end of stream");
        // The other direction still works after the half-close.
        sw.write_all(b"pong!").await.unwrap();
        sw.shutdown().await.unwrap();
        let mut back = Vec::new();
        cr.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"pong!");
        assert_eq!(relay.await.unwrap().unwrap(), Relayed { forward: 4, back: 5 });
    }

    #[tokio::test]
    async fn a_quiet_relay_times_out() {
        let (_client, proxy_a) = tokio::io::duplex(64);
        let (proxy_b, _server) = tokio::io::duplex(64);
        let r = relay(proxy_a, proxy_b, Duration::from_millis(100)).await;
        assert!(matches!(r, Err(RelayError::Idle(_))), "{r:?}");
    }
}
