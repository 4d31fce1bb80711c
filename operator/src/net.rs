//! Listening sockets for the ports proxies connect to.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tonic::transport::server::Connected;

/// Connections that may wait to be accepted. Every proxy of a cluster reconnects at once when
/// the operator restarts or fails over; with the usual 1,024 a thousand of them overflowed the
/// queue (the kernel then drops or resets connections and they back off). The kernel caps it
/// at `net.core.somaxconn` (4,096 by default).
const BACKLOG: u32 = 4096;

pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // A restarted operator takes its port back while the old connections are in TIME_WAIT.
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(BACKLOG)
}

/// How long an accepted connection may stay silent before its first byte (after the TLS
/// handshake, when there is one). Every pod can reach the operator's ports: connections left
/// open for ever would use up its file descriptors. ferrum-dp's `--header-read-timeout` default.
pub const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection for tonic that fails its reads once it has sent nothing for
/// [`FIRST_BYTE_TIMEOUT`] since it was accepted. After the first byte, HTTP/2 keep-alive pings
/// find a peer that went away.
pub struct FirstByte<I> {
    io: I,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<I> FirstByte<I> {
    pub fn new(io: I) -> Self {
        FirstByte {
            io,
            deadline: Some(Box::pin(tokio::time::sleep(FIRST_BYTE_TIMEOUT))),
        }
    }
}

impl<I: Connected> Connected for FirstByte<I> {
    type ConnectInfo = I::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for FirstByte<I> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        let Some(deadline) = this.deadline.as_mut() else {
            return r;
        };
        match r {
            Poll::Ready(Ok(())) if buf.filled().len() > before => this.deadline = None,
            Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("nothing received within {FIRST_BYTE_TIMEOUT:?}"),
                )));
            }
            _ => {}
        }
        r
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for FirstByte<I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The plaintext connections of `l`, as tonic's incoming stream.
pub fn incoming(l: TcpListener) -> impl tokio_stream::Stream<Item = std::io::Result<FirstByte<TcpStream>>> {
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(l).map(|c| c.map(FirstByte::new))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_thousand_connections_wait_for_accept_without_loss() {
        let l = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        // Nobody accepts yet, as when the operator is busy: every connect still completes at
        // once (past a full queue the kernel drops the SYN and the client waits 1 s, 3 s, ...).
        let connects = async {
            let mut conns = Vec::new();
            for _ in 0..1_200 {
                conns.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
            }
            conns
        };
        let _conns = tokio::time::timeout(Duration::from_secs(5), connects)
            .await
            .expect("1,200 connects queued within 5 s");
        for _ in 0..1_200 {
            l.accept().await.expect("accepted");
        }
    }
}
