//! The webhook's serving certificate: from files (a mounted Secret, e.g. from cert-manager),
//! re-read when they change so a renewed certificate is served without a restart; or a
//! self-signed CA made at start whose bundle the injector writes into its
//! MutatingWebhookConfiguration (single replica).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Pem(String),
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
    #[error(transparent)]
    Generate(#[from] rcgen::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<CertifiedKey>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem(format!("certificate: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError::Pem("no certificate in the PEM".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Pem(format!("key: {e}")))?;
    let signing = provider().key_provider.load_private_key(key)?;
    Ok(Arc::new(CertifiedKey::new(certs, signing)))
}

fn config(resolver: Arc<dyn ResolvesServerCert>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// How often the files are looked at (their modification times), at most.
const RECHECK: Duration = Duration::from_secs(5);

/// A certificate and key from files, reloaded when either changes.
#[derive(Debug)]
struct FileCert {
    cert: PathBuf,
    key: PathBuf,
    /// (when last checked, the files' modification times then, the key pair).
    state: Mutex<(Instant, (SystemTime, SystemTime), Arc<CertifiedKey>)>,
}

fn mtimes(cert: &Path, key: &Path) -> (SystemTime, SystemTime) {
    let m = |p: &Path| {
        std::fs::metadata(p)
            .and_then(|m| m.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH)
    };
    (m(cert), m(key))
}

fn load(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| TlsError::Read {
            path: p.display().to_string(),
            source,
        })
    };
    certified_key(&read(cert)?, &read(key)?)
}

impl ResolvesServerCert for FileCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.0.elapsed() >= RECHECK {
            st.0 = Instant::now();
            let now = mtimes(&self.cert, &self.key);
            if now != st.1 {
                // A half-written pair fails to load: keep serving the old one until it is whole.
                match load(&self.cert, &self.key) {
                    Ok(k) => {
                        tracing::info!(cert = %self.cert.display(), "serving certificate reloaded");
                        *st = (Instant::now(), now, k);
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot reload the serving certificate"),
                }
            }
        }
        Some(st.2.clone())
    }
}

/// TLS from PEM files, reloaded when they change.
pub fn from_files(cert: PathBuf, key: PathBuf) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let first = load(&cert, &key)?;
    let state = Mutex::new((Instant::now(), mtimes(&cert, &key), first));
    config(Arc::new(FileCert { cert, key, state }))
}

/// A new CA and a serving certificate from it for `names` (DNS names or IPs). Returns the CA
/// certificate (the webhook configuration's `caBundle`) and the TLS settings.
pub fn self_signed(names: &[String]) -> Result<(String, Arc<rustls::ServerConfig>), TlsError> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name.push(DnType::CommonName, "ferrum-injector CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca.self_signed(&ca_key)?;
    let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut leaf = CertificateParams::new(names.to_vec())?;
    leaf.distinguished_name.push(DnType::CommonName, "ferrum-injector");
    let issuer = Issuer::new(ca, ca_key);
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer)?;
    let chain = format!("{}{}", leaf_cert.pem(), ca_cert.pem());
    let key = certified_key(chain.as_bytes(), leaf_key.serialize_pem().as_bytes())?;
    Ok((
        ca_cert.pem(),
        config(Arc::new(rustls::sign::SingleCertAndKey::from(key)))?,
    ))
}
