//! `make bench`'s floor: the least an HTTP/1.1 keep-alive relay on tokio does. Each worker is a
//! single-threaded runtime with its own SO_REUSEPORT socket (as ferrum-dp's); each client
//! connection gets one upstream connection of its own, and every request on it is read (head by
//! httparse, body by Content-Length), written upstream as it came, and the response back the same
//! way. No routing, no header is looked at but Content-Length, no pool, timer, metric or log, and
//! no chunked bodies: **not a proxy**, a reference for how far the HTTP layer of one is from what
//! the sockets cost on this machine (bench/README.md, "The floor").
//!
//! `http_floor LISTEN UPSTREAM [WORKERS]` (`make bench` starts it; its tests run it that way).

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Larger heads are refused (the connection closes).
const MAX_HEAD: usize = 64 * 1024;

fn listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    s.set_reuse_port(true)?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    Ok(s.into())
}

/// The Content-Length of a complete head in `buf`, with the head's length; `None` while it is
/// incomplete; an error for what httparse refuses.
fn framed(buf: &[u8], request: bool) -> Result<Option<usize>, httparse::Error> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let head = if request {
        httparse::Request::new(&mut headers).parse(buf)?
    } else {
        httparse::Response::new(&mut headers).parse(buf)?
    };
    let httparse::Status::Complete(len) = head else {
        return Ok(None);
    };
    let body = headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse::<usize>().ok())
        .unwrap_or(0);
    Ok(Some(len + body))
}

/// Reads one whole message into `buf`; its length, or `None` once the peer closes or errs.
async fn message(s: &mut TcpStream, buf: &mut Vec<u8>, request: bool) -> Option<usize> {
    buf.clear();
    let total = loop {
        if let Some(n) = framed(buf, request).ok()? {
            break n;
        }
        if buf.len() > MAX_HEAD {
            return None;
        }
        buf.reserve(4096);
        if s.read_buf(buf).await.ok()? == 0 {
            return None;
        }
    };
    while buf.len() < total {
        buf.reserve(total - buf.len());
        if s.read_buf(buf).await.ok()? == 0 {
            return None;
        }
    }
    Some(total)
}

async fn relay(mut client: TcpStream, upstream: SocketAddr) -> Option<()> {
    client.set_nodelay(true).ok()?;
    let mut up = TcpStream::connect(upstream).await.ok()?;
    up.set_nodelay(true).ok()?;
    let (mut req, mut resp) = (Vec::with_capacity(8192), Vec::with_capacity(8192));
    loop {
        let n = message(&mut client, &mut req, true).await?;
        up.write_all(&req[..n]).await.ok()?;
        let m = message(&mut up, &mut resp, false).await?;
        client.write_all(&resp[..m]).await.ok()?;
    }
}

fn serve(sock: std::net::TcpListener, upstream: SocketAddr) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let l = TcpListener::from_std(sock).unwrap();
        loop {
            if let Ok((c, _)) = l.accept().await {
                tokio::task::spawn_local(relay(c, upstream));
            }
        }
    });
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(listen), Some(upstream)) = (args.first(), args.get(1)) else {
        eprintln!("usage: http_floor LISTEN UPSTREAM [WORKERS]");
        std::process::exit(2);
    };
    let listen: SocketAddr = listen.parse().expect("LISTEN: an address:port");
    let upstream: SocketAddr = upstream.parse().expect("UPSTREAM: an address:port");
    let workers: usize = args.get(2).map_or(2, |w| w.parse().expect("WORKERS: a number"));
    for _ in 0..workers {
        let sock = listener(listen).expect("binding LISTEN");
        std::thread::spawn(move || serve(sock, upstream));
    }
    loop {
        std::thread::park();
    }
}
