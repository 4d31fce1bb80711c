//! A stream to an upstream endpoint: a TCP connection, or a mesh tunnel (HBONE) to a workload
//! whose proxy serves it. HTTP clients and L4 relays use it alike.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::mesh::tunnel::Tunnel;

pub enum L4Stream {
    Tcp(TcpStream),
    Tunnel(Tunnel),
}

impl L4Stream {
    /// The address it reaches (a tunnel's target, not its proxy's).
    pub fn peer(&self) -> Option<std::net::SocketAddr> {
        match self {
            L4Stream::Tcp(t) => t.peer_addr().ok(),
            L4Stream::Tunnel(t) => t.target,
        }
    }
}

/// Forwards a call to whichever stream it is.
macro_rules! either {
    ($s:expr, $inner:ident => $e:expr) => {
        match $s {
            L4Stream::Tcp($inner) => $e,
            L4Stream::Tunnel($inner) => $e,
        }
    };
}

impl AsyncRead for L4Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        either!(self.get_mut(), s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for L4Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        either!(self.get_mut(), s => Pin::new(s).poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        either!(self.get_mut(), s => Pin::new(s).poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        either!(self.get_mut(), s => Pin::new(s).poll_shutdown(cx))
    }
    fn is_write_vectored(&self) -> bool {
        either!(self, s => s.is_write_vectored())
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        either!(self.get_mut(), s => Pin::new(s).poll_write_vectored(cx, bufs))
    }
}
