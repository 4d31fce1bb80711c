//! Peers for L4 proxying tests: TCP and TLS servers that answer once the client has finished
//! sending (so they prove a half-close crossed the proxy), and clients for them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// A TCP server that reads until the client's end of stream, then answers `<name>: <what it read>`
/// and closes: it only answers if the proxy passed the half-close on.
pub async fn tcp_server(name: &'static str) -> SocketAddr {
    let l = crate::listen_local().await;
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(answer(s, name));
        }
    });
    addr
}

async fn answer<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, name: &str) {
    let mut got = Vec::new();
    if s.read_to_end(&mut got).await.is_ok() {
        let _ = s
            .write_all(format!("{name}: {}", String::from_utf8_lossy(&got)).as_bytes())
            .await;
        let _ = s.shutdown().await;
    }
}

/// A TLS server with its own self-signed certificate for `host`; answers like [`tcp_server`].
pub async fn tls_server(host: &'static str) -> (SocketAddr, rustls::pki_types::CertificateDer<'static>) {
    let c = rcgen::generate_simple_self_signed(vec![host.to_string()]).unwrap();
    let der = c.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::try_from(c.signing_key.serialize_der()).unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = crate::listen_local().await;
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(s) = acceptor.accept(s).await {
                    answer(s, host).await;
                }
            });
        }
    });
    (addr, der)
}

/// Connects over TLS to `port` asking for `sni`, trusting only `root`.
pub async fn tls_call(
    port: u16,
    sni: &str,
    root: &rustls::pki_types::CertificateDer<'static>,
    msg: &str,
) -> std::io::Result<String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
    let mut s = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await?;
    exchange(&mut s, msg).await
}

/// Sends `msg`, half-closes, reads the answer to its end.
pub async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, msg: &str) -> std::io::Result<String> {
    s.write_all(msg.as_bytes()).await?;
    s.shutdown().await?;
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut back))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    Ok(String::from_utf8_lossy(&back).into_owned())
}

pub async fn tcp_call(port: u16, msg: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    exchange(&mut s, msg).await
}
