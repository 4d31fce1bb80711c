//! One HBONE tunnel: an HTTP/2 `CONNECT` stream as a byte stream, on the `h2` crate directly.
//! hyper's upgraded h2 stream hands every write to a task of its own over a channel (a copy,
//! a send and an extra wake-up per write, on top of the connection's); here a write goes
//! straight into the stream's send buffer and the connection task flushes it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The two halves of a tunnel's stream. Received data is released to the peer's flow
/// control as soon as it is read, so the window only limits what is buffered here.
pub struct Tunnel {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received and not yet read.
    pending: Bytes,
    /// A read error or the end of the peer's stream has been seen.
    read_done: bool,
    /// A client tunnel's place on its pooled connection, given back when the tunnel goes.
    _slot: Option<super::hbone::Slot>,
    /// Where a client tunnel leads.
    pub target: Option<std::net::SocketAddr>,
}

impl Tunnel {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Tunnel {
        Tunnel {
            send,
            recv,
            pending: Bytes::new(),
            read_done: false,
            _slot: None,
            target: None,
        }
    }

    /// This client tunnel to `target`, holding `slot` for as long as it lives.
    pub fn holding(mut self, slot: super::hbone::Slot, target: std::net::SocketAddr) -> Tunnel {
        self._slot = Some(slot);
        self.target = Some(target);
        self
    }
}

/// A stream ended by the peer with `NO_ERROR` (or our own cancel) is a clean end, not a failure.
fn to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| io::Error::other("h2 I/O error"));
    }
    match e.reason() {
        Some(h2::Reason::NO_ERROR) | Some(h2::Reason::CANCEL) => io::ErrorKind::ConnectionReset.into(),
        _ => io::Error::other(e),
    }
}

impl AsyncRead for Tunnel {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let me = &mut *self;
        while me.pending.is_empty() {
            if me.read_done {
                return Poll::Ready(Ok(()));
            }
            match ready!(me.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = me.recv.flow_control().release_capacity(data.len());
                    me.pending = data;
                }
                Some(Err(e)) => {
                    me.read_done = true;
                    // A reset with NO_ERROR after the peer finished sending is a clean close.
                    if e.reason() == Some(h2::Reason::NO_ERROR) {
                        return Poll::Ready(Ok(()));
                    }
                    return Poll::Ready(Err(to_io(e)));
                }
                None => me.read_done = true,
            }
        }
        let n = me.pending.len().min(buf.remaining());
        buf.put_slice(&me.pending[..n]);
        me.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let send = &mut self.send;
        send.reserve_capacity(buf.len());
        // h2 may grant capacity in pieces; zero means "not yet" (poll again).
        let granted = loop {
            match send.capacity() {
                0 => match ready!(send.poll_capacity(cx)) {
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
                    None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                },
                n => break n,
            }
        };
        let n = granted.min(buf.len());
        send.send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(to_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection task writes what the streams buffered.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Our half ends with END_STREAM; the peer may go on sending (half-close).
        let _ = self.send.send_data(Bytes::new(), true);
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Both ends of one CONNECT stream over an in-memory HTTP/2 connection.
    async fn pair() -> (Tunnel, Tunnel) {
        let (a, b) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(b).await.unwrap();
            let (req, mut respond) = conn.accept().await.unwrap().unwrap();
            let send = respond.send_response(http::Response::new(()), false).unwrap();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            Tunnel::new(send, req.into_body())
        });
        let (send, conn) = h2::client::handshake(a).await.unwrap();
        tokio::spawn(conn);
        let req = http::Request::connect("10.0.0.1:80").body(()).unwrap();
        let (resp, stream) = send.ready().await.unwrap().send_request(req, false).unwrap();
        let resp = resp.await.unwrap();
        (Tunnel::new(stream, resp.into_body()), server.await.unwrap())
    }

    #[tokio::test]
    async fn carries_bytes_both_ways_and_half_closes() {
        let (mut client, mut server) = pair().await;
        // More than one frame and more than the default 64 KiB window, released as read.
        let big = vec![7u8; 300_000];
        let writer = tokio::spawn(async move {
            client.write_all(&big).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), 300_000, "everything, then the client's end of stream");
        let mut client = writer.await.unwrap();
        // The other direction still works after the half-close.
        server.write_all(b"pong").await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"pong");
    }

    #[tokio::test]
    async fn a_dropped_peer_is_an_error_not_an_end() {
        let (mut client, server) = pair().await;
        drop(server);
        let mut buf = [0u8; 8];
        let r = client.read(&mut buf).await;
        assert!(r.is_err(), "a reset stream is not a clean end of stream: {r:?}");
    }
}
