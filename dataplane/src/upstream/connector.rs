//! The connector of one cluster: opens a connection to an endpoint, counting (and capping) the
//! cluster's open connections, with rustls when the cluster asks for TLS. In a mesh proxy an
//! endpoint that is a mesh workload is reached through an HBONE tunnel instead of a plain TCP
//! connection; the HTTP connection above cannot tell the difference.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use ferrum_snapshot::model::{Cluster, TcpKeepalive, UpstreamProtocol};
use hyper::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::l4::L4Stream;
use crate::mesh::tunnel::Tunnel;
use crate::telemetry::ClusterStats;
use ferrum_snapshot::Secrets;

/// Opens one connection to an endpoint: TCP (or a mesh tunnel), then TLS when the cluster asks.
pub type Connector = HttpsConnector<CountingConnector>;

/// The circuit breaker's connection limit was reached.
#[derive(Debug, thiserror::Error)]
#[error("cluster connection limit ({0}) reached")]
pub struct MaxConnections(pub u32);

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A tunnel being opened to one endpoint.
pub type TunnelFuture = Pin<Box<dyn Future<Output = Result<Tunnel, BoxError>> + Send>>;

/// A mesh proxy's side of the routed path's upstreams (a sidecar's): how they are reached, and
/// who they are for its request metrics.
pub trait MeshUpstreams: Send + Sync {
    /// A tunnel to `addr` when a mesh proxy serves it; `None` means connect directly.
    fn dial(&self, addr: SocketAddr) -> Option<TunnelFuture>;

    /// Whether this workload's calls are counted (Istio's `reporter="source"` request metrics).
    fn counts_calls(&self) -> bool;

    /// Where a call to the Service at `requested` is counted: by the Service of the `cluster`
    /// that answered (else the one requested) and the workload at `endpoint` (else unknown);
    /// `None` once the proxy is gone.
    fn callee(
        &self,
        requested: SocketAddr,
        cluster: Option<&str>,
        endpoint: Option<SocketAddr>,
    ) -> Option<crate::mesh::peers::Calls>;
}

/// Set once a mesh proxy starts; shared by every cluster's connector and the request path.
pub type MeshSlot = Arc<OnceLock<Arc<dyn MeshUpstreams>>>;

#[derive(Clone)]
pub struct CountingConnector {
    inner: HttpConnector,
    mesh: MeshSlot,
    stats: Arc<ClusterStats>,
    max: u32,
}

impl tower_service::Service<Uri> for CountingConnector {
    type Response = Counted;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<Counted, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let stats = self.stats.clone();
        let max = self.max;
        let tunnel = self.mesh.get().and_then(|t| {
            let addr: SocketAddr = uri.authority()?.as_str().parse().ok()?;
            t.dial(addr)
        });
        let fut = match tunnel {
            Some(t) => {
                Box::pin(async move { t.await.map(L4Stream::Tunnel) }) as Pin<Box<dyn Future<Output = _> + Send>>
            }
            None => {
                let tcp = self.inner.call(uri);
                Box::pin(async move { Ok(L4Stream::Tcp(tcp.await?.into_inner())) })
            }
        };
        Box::pin(async move {
            // Reserve first so concurrent connects cannot overshoot the limit.
            if stats.connections_active.fetch_add(1, Relaxed) >= i64::from(max) {
                stats.connections_active.fetch_sub(1, Relaxed);
                return Err(MaxConnections(max).into());
            }
            match fut.await {
                Ok(io) => {
                    stats.connections_total.fetch_add(1, Relaxed);
                    Ok(Counted {
                        io: TokioIo::new(io),
                        stats,
                    })
                }
                Err(e) => {
                    stats.connections_active.fetch_sub(1, Relaxed);
                    Err(e)
                }
            }
        })
    }
}

/// A connection that keeps the cluster's open-connection gauge honest.
pub struct Counted {
    io: TokioIo<L4Stream>,
    stats: Arc<ClusterStats>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.stats.connections_active.fetch_sub(1, Relaxed);
    }
}

impl Connection for Counted {
    fn connected(&self) -> Connected {
        match self.io.inner() {
            L4Stream::Tcp(t) => t.connected(),
            L4Stream::Tunnel(_) => Connected::new(),
        }
    }
}

impl Read for Counted {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: ReadBufCursor<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl Write for Counted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cluster {cluster:?}: cannot read CA file {path:?}: {source}")]
    CaFile {
        cluster: String,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cluster {cluster:?}: CA file {path:?} holds no usable certificate")]
    NoCa { cluster: String, path: String },
    #[error("cluster {cluster:?}: TLS: {what}")]
    Tls { cluster: String, what: String },
    #[error("cluster {cluster:?}: client certificate: {source}")]
    ClientCertificate {
        cluster: String,
        #[source]
        source: crate::listener::tls::CertError,
    },
}

/// Presents one certificate to every upstream that asks (mutual TLS).
#[derive(Debug)]
struct ClientCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for ClientCert {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

fn tls_config(c: &Cluster, secrets: &Secrets) -> Result<rustls::ClientConfig, ClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Tls {
            cluster: c.name.clone(),
            what: e.to_string(),
        })?;
    let Some(tls) = &c.tls else {
        // Never used for plain-text endpoints, but the connector type wants one.
        return Ok(builder
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth());
    };
    let client = match &tls.client_certificate {
        None => None,
        Some(source) => Some(Arc::new(ClientCert(
            crate::listener::tls::certified_key(source, secrets, &provider).map_err(|source| {
                ClientError::ClientCertificate {
                    cluster: c.name.clone(),
                    source,
                }
            })?,
        ))),
    };
    // No ALPN here: the connector builder (`build`) sets it and refuses a config that has it.
    let roots = || root_store(c, tls.ca_file.as_deref(), tls.ca_pem.as_deref());
    let verified = if tls.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
    } else if tls.subject_alt_names.is_empty() && tls.subject_alt_uris.is_empty() {
        builder.with_root_certificates(roots()?)
    } else {
        let verifier = AnyOfNames::new(c, roots()?, provider, &tls.subject_alt_names, &tls.subject_alt_uris)?;
        builder.dangerous().with_custom_certificate_verifier(Arc::new(verifier))
    };
    Ok(match client {
        Some(cert) => verified.with_client_cert_resolver(cert),
        None => verified.with_no_client_auth(),
    })
}

/// The cluster's CAs (`ca_pem`, else `caFile`), or the public web PKI roots (Mozilla's, via
/// webpki-roots) when it names none: an HTTPS upstream without CAs of its own is a public service.
fn root_store(c: &Cluster, ca_file: Option<&str>, ca_pem: Option<&str>) -> Result<rustls::RootCertStore, ClientError> {
    let (pem, path) = match (ca_pem, ca_file) {
        (Some(pem), _) => (pem.as_bytes().to_vec(), "(the snapshot's caPem)"),
        (None, Some(path)) => {
            let pem = std::fs::read(path).map_err(|source| ClientError::CaFile {
                cluster: c.name.clone(),
                path: path.to_string(),
                source,
            })?;
            (pem, path)
        }
        (None, None) => {
            return Ok(rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            });
        }
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem).flatten() {
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(ClientError::NoCa {
            cluster: c.name.clone(),
            path: path.to_string(),
        });
    }
    Ok(roots)
}

/// Idle time before the first keepalive probe: the policy's, else Linux's default (2 h).
fn keepalive_time(k: &TcpKeepalive) -> Duration {
    Duration::from_millis(k.time_ms.unwrap_or(7_200_000))
}

/// Turns keepalive on for an L4 connection to an endpoint, as the policy says.
pub fn set_keepalive(s: &tokio::net::TcpStream, k: &TcpKeepalive) -> std::io::Result<()> {
    let mut ka = socket2::TcpKeepalive::new().with_time(keepalive_time(k));
    if let Some(ms) = k.interval_ms {
        ka = ka.with_interval(Duration::from_millis(ms));
    }
    if let Some(n) = k.probes {
        ka = ka.with_retries(n);
    }
    socket2::SockRef::from(s).set_tcp_keepalive(&ka)
}

/// The cluster's connector, shared by its pools on every worker.
pub fn build(
    c: &Cluster,
    stats: Arc<ClusterStats>,
    mesh: &MeshSlot,
    secrets: &Secrets,
) -> Result<Connector, ClientError> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_millis(c.timeouts.connect_ms)));
    if let Some(k) = &c.tcp_keepalive {
        http.set_keepalive(Some(keepalive_time(k)));
        http.set_keepalive_interval(k.interval_ms.map(Duration::from_millis));
        http.set_keepalive_retries(k.probes);
    }
    let counting = CountingConnector {
        inner: http,
        mesh: mesh.clone(),
        stats,
        max: c.circuit_breaker.max_connections,
    };
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls_config(c, secrets)?)
        .https_or_http();
    let builder = match &c.tls {
        Some(t) => {
            let name = rustls_pki_types::ServerName::try_from(t.sni.clone()).map_err(|e| ClientError::Tls {
                cluster: c.name.clone(),
                what: format!("SNI {:?}: {e}", t.sni),
            })?;
            builder.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name))
        }
        None => builder,
    };
    // ALPN offers only the cluster's protocol.
    Ok(match c.protocol {
        UpstreamProtocol::Http2 => builder.enable_http2().wrap_connector(counting),
        UpstreamProtocol::Http1 => builder.enable_http1().wrap_connector(counting),
    })
}

/// `subjectAltNames`: the chain is checked as for any upstream, and the certificate must name
/// one of the names (whatever SNI was sent).
#[derive(Debug)]
struct AnyOfNames {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    names: Vec<rustls_pki_types::ServerName<'static>>,
    /// URI names (`spiffe://…`), matched against the certificate's URI SANs.
    uris: Vec<String>,
}

impl AnyOfNames {
    fn new(
        c: &Cluster,
        roots: rustls::RootCertStore,
        provider: Arc<rustls::crypto::CryptoProvider>,
        names: &[String],
        uris: &[String],
    ) -> Result<Self, ClientError> {
        let tls_err = |what: String| ClientError::Tls {
            cluster: c.name.clone(),
            what,
        };
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| tls_err(e.to_string()))?;
        let names = names
            .iter()
            .map(|n| {
                rustls_pki_types::ServerName::try_from(n.clone())
                    .map_err(|e| tls_err(format!("subject alt name {n:?}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(AnyOfNames {
            inner,
            names,
            uris: uris.to_vec(),
        })
    }

    /// The certificate carries one of `uris` among its URI SANs.
    fn names_a_uri(&self, end_entity: &CertificateDer<'_>) -> bool {
        use x509_parser::extensions::GeneralName;
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(end_entity) else {
            return false;
        };
        let Ok(Some(san)) = cert.subject_alternative_name() else {
            return false;
        };
        san.value
            .general_names
            .iter()
            .any(|n| matches!(n, GeneralName::URI(u) if self.uris.iter().any(|want| want == u)))
    }
}

impl rustls::client::danger::ServerCertVerifier for AnyOfNames {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        sni: &rustls_pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use rustls::CertificateError::{NotValidForName, NotValidForNameContext};
        let verify = |name: &rustls_pki_types::ServerName<'_>| {
            self.inner
                .verify_server_cert(end_entity, intermediates, name, ocsp, now)
        };
        let mut last = rustls::Error::General("no subject alt name to check".into());
        for name in &self.names {
            match verify(name) {
                Ok(v) => return Ok(v),
                Err(e) => last = e,
            }
        }
        if self.uris.is_empty() {
            return Err(last);
        }
        // URIs: the chain checks out (whatever name it is for), and the certificate names one.
        match verify(sni) {
            Ok(_) | Err(rustls::Error::InvalidCertificate(NotValidForName | NotValidForNameContext { .. })) => {}
            Err(e) => return Err(e),
        }
        match self.names_a_uri(end_entity) {
            true => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            false => Err(rustls::Error::InvalidCertificate(NotValidForName)),
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// `insecureSkipVerify`: accepts any server certificate, still checks signatures. (Tests use
/// it too, to play clients that do not care who the server is.)
#[derive(Debug)]
pub struct NoVerify(pub Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrum_snapshot::model::Endpoint;

    /// Every upstream TLS cluster once failed here (hyper-rustls refuses a TLS config that
    /// already names ALPN protocols), so the snapshot holding it was rejected.
    #[test]
    fn tls_clusters_of_either_protocol_get_a_connector() {
        for protocol in [UpstreamProtocol::Http1, UpstreamProtocol::Http2] {
            let mut c = Cluster::new("c", vec![Endpoint::new("127.0.0.1", 443)]);
            c.protocol = protocol;
            c.tls = Some(ferrum_snapshot::model::UpstreamTls {
                sni: "api.example.test".into(),
                ca_file: None,
                ca_pem: None,
                insecure_skip_verify: false,
                client_certificate: None,
                subject_alt_names: Vec::new(),
                subject_alt_uris: Vec::new(),
            });
            let stats = Arc::new(crate::telemetry::ClusterStats::default());
            assert!(
                build(&c, stats, &Default::default(), &Secrets::new()).is_ok(),
                "{protocol:?}"
            );
        }
    }

    #[test]
    fn tls_without_a_ca_file_trusts_the_public_roots() {
        let c = Cluster::new("c", vec![Endpoint::new("127.0.0.1", 443)]);
        let roots = root_store(&c, None, None).unwrap();
        assert!(roots.len() > 100, "public roots: {}", roots.len());
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let e = root_store(&c, empty.to_str(), None).unwrap_err();
        assert!(e.to_string().contains("holds no usable certificate"), "{e}");
        // CAs carried in the snapshot (a Secret's ca.crt) are the only roots.
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".into()])
            .unwrap()
            .cert
            .pem();
        let roots = root_store(&c, None, Some(&ca)).unwrap();
        assert_eq!(roots.len(), 1);
    }
}
