//! L4 listeners (TCPRoute, TLSRoute): each connection goes, as bytes, to a backend its route
//! picks. A TCP listener has one host, `*`; a TLS listener picks the host by SNI — read from
//! the ClientHello (by rustls, which does not answer it) and replayed to the backend when the
//! TLS passes through, or from the handshake when the listener terminates it.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::dataplane::Shared;
use crate::proxy::ConnInfo;

/// The most a client may send before its ClientHello is complete.
const MAX_HELLO: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    #[error("closed before its ClientHello was complete")]
    Closed,
    #[error("no ClientHello within {0:?}")]
    Timeout(std::time::Duration),
    #[error("ClientHello larger than {MAX_HELLO} bytes")]
    TooLarge,
    #[error("not a TLS ClientHello: {0}")]
    NotTls(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Reads a TLS ClientHello: its SNI name, and every byte read (to send on unchanged).
pub async fn client_hello<S>(s: &mut S, within: std::time::Duration) -> Result<(Option<String>, Vec<u8>), HelloError>
where
    S: AsyncRead + Unpin,
{
    let read = async {
        let mut acceptor = rustls::server::Acceptor::default();
        let mut seen = Vec::with_capacity(1024);
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                return Err(HelloError::Closed);
            }
            if seen.len() + n > MAX_HELLO {
                return Err(HelloError::TooLarge);
            }
            seen.extend_from_slice(&buf[..n]);
            let mut fresh = &buf[..n];
            while !fresh.is_empty() {
                acceptor.read_tls(&mut fresh)?;
            }
            match acceptor.accept() {
                Ok(Some(accepted)) => {
                    let sni = accepted.client_hello().server_name().map(str::to_ascii_lowercase);
                    return Ok((sni, seen));
                }
                Ok(None) => continue,
                Err((e, _alert)) => return Err(HelloError::NotTls(e.to_string())),
            }
        }
    };
    tokio::time::timeout(within, read)
        .await
        .map_err(|_| HelloError::Timeout(within))?
}

/// Forwards one accepted connection of an L4 listener: `host` picks the virtual host (`*` on
/// TCP, the SNI name on TLS), its first route the backend; `early` (a ClientHello read to
/// route it) goes to the backend first.
pub async fn forward<S>(mut client: S, host: &str, early: &[u8], info: ConnInfo, shared: &Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let cfg = shared.config.load();
    let vhost = cfg.listeners.get(&info.listener).and_then(|l| l.hosts.find(host));
    if let Some(p) = vhost.and_then(|vh| vh.policies.as_ref())
        && let Some(why) = p.denies_connection(&info)
    {
        tracing::info!(client = %info.client, host, policy = %why, "connection denied");
        return;
    }
    let Some(route) = vhost.and_then(|vh| vh.first_route()) else {
        shared.registry.unrouted.fetch_add(1, Relaxed);
        tracing::debug!(client = %info.client, host, "no route for this connection");
        return;
    };
    let Some(cluster) = route.action.pick().and_then(|t| t.cluster.clone()) else {
        tracing::debug!(client = %info.client, route = %route.name, "the route's backend does not resolve");
        return;
    };
    let name = route.name.clone();
    drop(cfg);
    let (mut upstream, held) = match cluster.connect_l4(info.client.ip()).await {
        Ok(x) => x,
        Err(e) => {
            tracing::info!(client = %info.client, route = %name, cluster = %cluster.spec.name, error = e.as_str(), "no backend connection");
            return;
        }
    };
    if !early.is_empty()
        && let Err(e) = upstream.write_all(early).await
    {
        tracing::debug!(endpoint = held.endpoint(), error = %e, "backend closed before the ClientHello was sent");
        return;
    }
    let stats = &cluster.stats;
    stats.bytes_sent.fetch_add(early.len() as u64, Relaxed);
    let idle = cluster.spec.timeouts.tcp_idle(shared.limits.tcp_idle_timeout);
    match super::relay(&mut client, &mut upstream, idle).await {
        Ok(n) => {
            stats.bytes_sent.fetch_add(n.forward, Relaxed);
            stats.bytes_received.fetch_add(n.back, Relaxed);
        }
        Err(e) => {
            tracing::debug!(client = %info.client, route = %name, endpoint = held.endpoint(), error = %e, "connection ended")
        }
    }
}

/// Serves a connection of a TCP listener, or of a TLS listener that passes TLS through.
pub async fn serve_plain(mut stream: TcpStream, tls: bool, info: ConnInfo, shared: Arc<Shared>) {
    if !tls {
        return forward(stream, "*", &[], info, &shared).await;
    }
    match client_hello(&mut stream, shared.limits.tls_handshake_timeout).await {
        Ok((sni, early)) => forward(stream, sni.as_deref().unwrap_or(""), &early, info, &shared).await,
        Err(e) => tracing::debug!(client = %info.client, error = %e, "TLS passthrough refused"),
    }
}

/// Serves a connection of a TLS listener that terminates TLS: routed by the negotiated SNI.
pub async fn serve_terminated(stream: TcpStream, tls: Arc<rustls::ServerConfig>, info: ConnInfo, shared: Arc<Shared>) {
    let accept = tokio_rustls::TlsAcceptor::from(tls).accept(stream);
    match tokio::time::timeout(shared.limits.tls_handshake_timeout, accept).await {
        Ok(Ok(s)) => {
            let sni = s.get_ref().1.server_name().unwrap_or("").to_ascii_lowercase();
            forward(s, &sni, &[], info, &shared).await
        }
        Ok(Err(e)) => tracing::debug!(client = %info.client, error = %e, "TLS handshake failed"),
        Err(_) => tracing::debug!(client = %info.client, "TLS handshake timed out"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_the_sni_and_keeps_every_byte() {
        let h = ferrum_testkit::client_hello("DB.Example.com");
        // Split across reads, as a slow client sends it.
        let (mut w, mut r) = tokio::io::duplex(64);
        let sent = h.clone();
        tokio::spawn(async move {
            for chunk in sent.chunks(7) {
                w.write_all(chunk).await.unwrap();
            }
            std::future::pending::<()>().await;
        });
        let (sni, seen) = client_hello(&mut r, std::time::Duration::from_secs(5)).await.unwrap();
        assert_eq!(sni.as_deref(), Some("db.example.com"));
        assert_eq!(seen, h, "the backend gets the ClientHello unchanged");
    }

    #[tokio::test]
    async fn plain_text_is_not_a_client_hello() {
        let mut r: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        let e = client_hello(&mut r, std::time::Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, HelloError::NotTls(_)), "{e}");
    }

    #[tokio::test]
    async fn a_silent_client_times_out() {
        let (_w, mut r) = tokio::io::duplex(64);
        let e = client_hello(&mut r, std::time::Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(matches!(e, HelloError::Timeout(_)), "{e}");
    }
}
