//! This proxy's workload identity: an X.509-SVID from the mesh CA (Istio's `CreateCertificate`,
//! authenticated by the projected ServiceAccount token), renewed at half-life, and the mTLS
//! settings built from it. A renewal swaps the settings atomically: new connections use the new
//! certificate, open ones live on with theirs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use ferrum_snapshot::identity::SpiffeId;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("CA root bundle {0}: no certificate in it")]
    NoRoots(String),
    #[error("cannot reach the CA at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: ChannelError,
    },
    #[error("the CA refused the request: {0}")]
    Refused(String),
    #[error("the CA answered with an unusable certificate: {0}")]
    BadCertificate(String),
    #[error("CSR: {0}")]
    Csr(#[from] rcgen::Error),
    #[error("TLS settings: {0}")]
    Tls(#[from] rustls::Error),
}

/// Why a gRPC channel over TLS could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("{0:?} is not a DNS name or an IP address")]
    ServerName(String),
    #[error("TLS settings: {0}")]
    Tls(#[from] rustls::Error),
    // Debug: the transport error's Display alone says only "transport error".
    #[error("{0:?}")]
    Transport(#[from] tonic::transport::Error),
    #[error("timed out")]
    Timeout,
}

/// Where and how to get certificates.
#[derive(Debug, Clone)]
pub struct CaSettings {
    /// `host:port` of the CA (the operator's 15012).
    pub address: String,
    /// Name the CA's certificate is checked against.
    pub server_name: String,
    /// PEM bundle of mesh roots (a mounted ConfigMap in Kubernetes). During a root rotation it
    /// holds the old and the new root; it is re-read at every renewal.
    pub root_file: PathBuf,
    /// The projected ServiceAccount token (re-read at every renewal: the kubelet rotates it).
    pub token_file: PathBuf,
    /// Asked-for certificate lifetime; the CA may shorten it.
    pub validity: Duration,
    /// Trust domain for the CSR's SAN (the CA decides the identity, not the CSR).
    pub trust_domain: String,
}

/// A certificate chain (leaf first) and its private key, with what the leaf says.
pub struct Svid {
    pub id: SpiffeId,
    pub chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The leaf's issuer (distinguished name), for logs: which CA signed it.
    pub issuer: String,
    received: SystemTime,
}

impl Svid {
    pub fn from_pem(chain: &[String], key_pem: &str) -> Result<Svid, IdentityError> {
        let bad = |m: String| IdentityError::BadCertificate(m);
        let chain: Vec<CertificateDer<'static>> = chain
            .iter()
            .map(|c| CertificateDer::from_pem_slice(c.as_bytes()))
            .collect::<Result<_, _>>()
            .map_err(|e| bad(e.to_string()))?;
        let leaf = chain.first().ok_or_else(|| bad("empty chain".into()))?;
        let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(|e| bad(e.to_string()))?;
        let id = spiffe_id_of(&cert).ok_or_else(|| bad("the leaf has no SPIFFE URI SAN".into()))?;
        let time =
            |t: x509_parser::time::ASN1Time| SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64);
        Ok(Svid {
            id,
            not_before: time(cert.validity().not_before),
            not_after: time(cert.validity().not_after),
            issuer: cert.issuer().to_string(),
            received: SystemTime::now(),
            key: PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| bad(e.to_string()))?,
            chain,
        })
    }

    /// When to renew: half-way through the lifetime left when it arrived (`not_before` is
    /// backdated for clock skew, so it does not count).
    pub fn refresh_at(&self) -> SystemTime {
        let start = self.not_before.max(self.received);
        start + self.not_after.duration_since(start).unwrap_or_default() / 2
    }
}

fn spiffe_id_of(cert: &x509_parser::certificate::X509Certificate<'_>) -> Option<SpiffeId> {
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => u.parse().ok(),
        _ => None,
    })
}

/// The SPIFFE ID in a peer's leaf certificate (its first `spiffe://` URI SAN).
pub fn peer_id(certs: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    peer_cert(certs).map(|c| c.id)
}

/// What a peer's leaf certificate says, as a sidecar tells its app (`x-forwarded-client-cert`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    /// Its first `spiffe://` URI SAN.
    pub id: SpiffeId,
    /// SHA-256 of its DER, in hex.
    pub hash: String,
    /// Its subject, RFC 4514 (empty for mesh certificates).
    pub subject: String,
}

impl PeerCert {
    /// The XFCC element Envoy writes for this client on a server whose own identity is `by`:
    /// `By=<by>;Hash=<hash>;Subject="<subject>";URI=<id>`.
    pub fn xfcc(&self, by: &SpiffeId) -> String {
        let subject = self.subject.replace('\\', "\\\\").replace('"', "\\\"");
        format!("By={by};Hash={};Subject=\"{subject}\";URI={}", self.hash, self.id)
    }
}

/// A peer's leaf certificate, when it names a SPIFFE ID.
pub fn peer_cert(certs: Option<&[CertificateDer<'_>]>) -> Option<PeerCert> {
    use sha2::Digest;
    use std::fmt::Write;
    let leaf = certs?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
    let hash = sha2::Sha256::digest(leaf.as_ref());
    Some(PeerCert {
        id: spiffe_id_of(&cert)?,
        hash: hash.iter().fold(String::with_capacity(64), |mut h, b| {
            let _ = write!(h, "{b:02x}");
            h
        }),
        subject: cert.subject().to_string(),
    })
}

/// HBONE's TLS: 1.3 only, AES-GCM suites only (mesh.md).
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::{cipher_suite, default_provider};
    let mut p = default_provider();
    p.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
    ];
    Arc::new(p)
}

/// The mTLS settings of one SVID and root bundle.
pub struct MeshTls {
    pub svid: Svid,
    /// Accepts clients with a certificate chaining to the mesh roots.
    pub server: Arc<rustls::ServerConfig>,
    /// Presents the SVID and accepts servers whose SPIFFE ID is in our trust domain; the
    /// caller checks the exact identity it expects with [`peer_id`] before sending anything.
    pub client: Arc<rustls::ClientConfig>,
}

impl MeshTls {
    pub fn build(svid: Svid, roots: RootCertStore) -> Result<MeshTls, IdentityError> {
        let provider = provider();
        let roots = Arc::new(roots);
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| IdentityError::Tls(rustls::Error::General(e.to_string())))?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(svid.chain.clone(), svid.key.clone_key())?;
        server.alpn_protocols = vec![b"h2".to_vec()];
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        let mut client = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier {
                roots,
                trust_domain: svid.id.trust_domain.clone(),
                algs: provider.signature_verification_algorithms,
            }))
            .with_client_auth_cert(svid.chain.clone(), svid.key.clone_key())?;
        client.alpn_protocols = vec![b"h2".to_vec()];
        client.resumption = rustls::client::Resumption::disabled();
        client.enable_sni = false;
        Ok(MeshTls {
            svid,
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}

/// Server certificates carry SPIFFE IDs, not DNS names: check the chain to the mesh roots and
/// that the ID is in our trust domain (webpki's name check does not apply).
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    trust_domain: String,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        match peer_id(Some(std::slice::from_ref(end_entity))) {
            Some(id) if id.trust_domain == self.trust_domain => Ok(ServerCertVerified::assertion()),
            _ => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The current mTLS settings, swapped whole on renewal.
#[derive(Default)]
pub struct Identity {
    current: ArcSwapOption<MeshTls>,
}

impl Identity {
    pub fn current(&self) -> Option<Arc<MeshTls>> {
        self.current.load_full()
    }

    pub fn install(&self, tls: MeshTls) {
        self.current.store(Some(Arc::new(tls)));
    }
}

pub fn read_roots(path: &std::path::Path) -> Result<RootCertStore, IdentityError> {
    let pem = std::fs::read(path).map_err(|source| IdentityError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&pem).flatten() {
        let _ = roots.add(c);
    }
    if roots.is_empty() {
        return Err(IdentityError::NoRoots(path.display().to_string()));
    }
    Ok(roots)
}

/// Asks the CA for a certificate: a fresh P-256 key, a CSR, the token as bearer.
pub async fn request(ca: &CaSettings, roots: &RootCertStore) -> Result<MeshTls, IdentityError> {
    use ferrum_proto::istio::v1::auth::{
        IstioCertificateRequest, istio_certificate_service_client::IstioCertificateServiceClient,
    };
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    // A placeholder identity: the CA takes the real one from the token.
    let san = format!("spiffe://{}/ns/unknown/sa/unknown", ca.trust_domain);
    params.subject_alt_names = vec![rcgen::SanType::URI(rcgen::string::Ia5String::try_from(san)?)];
    let csr = params.serialize_request(&key)?.pem()?;
    let token = std::fs::read_to_string(&ca.token_file).map_err(|source| IdentityError::Read {
        path: ca.token_file.display().to_string(),
        source,
    })?;
    let channel = tls_channel(&ca.address, &ca.server_name, roots.clone()).await?;
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: ca.validity.as_secs() as i64,
        metadata: None,
    });
    req.set_timeout(Duration::from_secs(10));
    let bearer = format!("Bearer {}", token.trim())
        .parse()
        .map_err(|_| IdentityError::Refused("the token is not a valid header value".into()))?;
    req.metadata_mut().insert("authorization", bearer);
    let resp = IstioCertificateServiceClient::new(channel)
        .create_certificate(req)
        .await
        .map_err(|s| IdentityError::Refused(format!("{}: {}", s.code(), s.message())))?
        .into_inner();
    let svid = Svid::from_pem(&resp.cert_chain, &key.serialize_pem())?;
    // Trust the bundle we were given plus the root that signed this chain.
    let mut roots = roots.clone();
    if let Some(root) = svid.chain.last().filter(|_| svid.chain.len() > 1) {
        let _ = roots.add(root.clone());
    }
    MeshTls::build(svid, roots)
}

/// Gets an SVID, then keeps renewing it at half-life (retrying with backoff on failure, while
/// the current certificate is still valid).
pub async fn run(ca: CaSettings, identity: Arc<Identity>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let got = match read_roots(&ca.root_file) {
            Ok(roots) => request(&ca, &roots).await,
            Err(e) => Err(e),
        };
        let wait = match got {
            Ok(tls) => {
                backoff = Duration::from_millis(200);
                let at = tls.svid.refresh_at();
                tracing::info!(id = %tls.svid.id, issuer = %tls.svid.issuer, expires_in_s = tls.svid.not_after.duration_since(SystemTime::now()).unwrap_or_default().as_secs(), "workload certificate installed");
                identity.install(tls);
                at.duration_since(SystemTime::now()).unwrap_or_default()
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot get a workload certificate");
                let b = backoff;
                backoff = (backoff * 2).min(Duration::from_secs(30));
                b
            }
        };
        tokio::time::sleep(wait.max(Duration::from_millis(100))).await;
    }
}

/// A gRPC channel over rustls to `address`, checking its certificate against `name` and `roots`.
pub async fn tls_channel(
    address: &str,
    name: &str,
    roots: RootCertStore,
) -> Result<tonic::transport::Channel, IdentityError> {
    let connect = async {
        let connector = TlsConnector::new(address, name, roots)?;
        let endpoint = origin(address)?;
        tokio::time::timeout(Duration::from_secs(10), endpoint.connect_with_connector(connector))
            .await
            .map_err(|_| ChannelError::Timeout)?
            .map_err(ChannelError::Transport)
    };
    connect.await.map_err(|source| IdentityError::Connect {
        addr: address.to_string(),
        source,
    })
}

/// [`tls_channel`] that connects on first use (and again after a failure), for a peer that
/// may come and go, such as a trace collector.
pub fn lazy_tls_channel(
    address: &str,
    name: &str,
    roots: RootCertStore,
) -> Result<tonic::transport::Channel, ChannelError> {
    let connector = TlsConnector::new(address, name, roots)?;
    Ok(origin(address)?
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector_lazy(connector))
}

/// The endpoint whose `:authority` requests name (a proxy in front may route by it); the
/// connector makes the connection.
fn origin(address: &str) -> Result<tonic::transport::Endpoint, ChannelError> {
    Ok(tonic::transport::Endpoint::from_shared(format!("https://{address}"))?)
}

#[derive(Clone)]
struct TlsConnector {
    addr: String,
    name: ServerName<'static>,
    tls: tokio_rustls::TlsConnector,
}

impl TlsConnector {
    fn new(address: &str, name: &str, roots: RootCertStore) -> Result<TlsConnector, ChannelError> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(TlsConnector {
            addr: address.to_string(),
            name: ServerName::try_from(name.to_string()).map_err(|_| ChannelError::ServerName(name.into()))?,
            tls: tokio_rustls::TlsConnector::from(Arc::new(cfg)),
        })
    }
}

impl tower_service::Service<http::Uri> for TlsConnector {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let c = self.clone();
        Box::pin(async move {
            let tcp = tokio::net::TcpStream::connect(&c.addr).await?;
            tcp.set_nodelay(true)?;
            Ok(hyper_util::rt::TokioIo::new(c.tls.connect(c.name, tcp).await?))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(san: &str, cn: Option<&str>) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        }
        params.subject_alt_names = vec![rcgen::SanType::URI(rcgen::string::Ia5String::try_from(san).unwrap())];
        params.self_signed(&key).unwrap().der().clone()
    }

    /// The app behind a sidecar reads the caller as Istio's apps do: Envoy's XFCC element, with
    /// the certificate's hash and its (empty, for mesh certificates) subject.
    #[test]
    fn a_peer_certificate_reads_as_envoy_tells_it() {
        let der = cert("spiffe://cluster.local/ns/shop/sa/web", None);
        let c = peer_cert(Some(std::slice::from_ref(&der))).unwrap();
        assert_eq!(c.id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(c.hash.len(), 64);
        assert!(c.hash.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        let by = SpiffeId::new("cluster.local", "shop", "api");
        assert_eq!(
            c.xfcc(&by),
            format!(
                "By=spiffe://cluster.local/ns/shop/sa/api;Hash={};Subject=\"\";URI=spiffe://cluster.local/ns/shop/sa/web",
                c.hash
            )
        );
        let other = cert("spiffe://cluster.local/ns/shop/sa/web", Some("we\"b"));
        let o = peer_cert(Some(std::slice::from_ref(&other))).unwrap();
        assert_ne!(o.hash, c.hash, "another certificate, another hash");
        assert!(o.xfcc(&by).contains(r#"Subject="CN=we\"b";"#), "{}", o.xfcc(&by));
        assert!(peer_cert(Some(&[cert("https://example.com", None)])).is_none());
    }
}
