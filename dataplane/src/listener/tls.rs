//! TLS termination: rustls server config per listener, certificate chosen by SNI (exact name,
//! then the longest wildcard, then the listener's default).

use std::collections::HashMap;
use std::sync::Arc;

use ferrum_snapshot::Secrets;
use ferrum_snapshot::model::{CertSource, Certificate};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("listener {listener:?}: certificate for {host}: {what}")]
    Certificate {
        listener: String,
        host: String,
        what: String,
    },
}

#[derive(Debug)]
struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Suffix with its leading dot.
    wildcard: Vec<(String, Arc<CertifiedKey>)>,
    default: Option<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if let Some(name) = hello.server_name() {
            let name = name.to_ascii_lowercase();
            if let Some(k) = self.exact.get(&name) {
                return Some(k.clone());
            }
            if let Some((_, k)) = self
                .wildcard
                .iter()
                .find(|(s, _)| name.ends_with(s.as_str()) && name.len() > s.len())
            {
                return Some(k.clone());
            }
        }
        self.default.clone()
    }
}

fn load(
    c: &Certificate,
    secrets: &Secrets,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<Arc<CertifiedKey>, String> {
    let (cert_pem, key_pem) = match &c.source {
        CertSource::Secret { name, digest } => {
            let s = ferrum_snapshot::secret::resolve(secrets, name, digest).map_err(|e| e.to_string())?;
            (s.cert.as_bytes().to_vec(), s.key.as_bytes().to_vec())
        }
        CertSource::Files { cert, key } => (
            std::fs::read(cert).map_err(|e| format!("cannot read {cert:?}: {e}"))?,
            std::fs::read(key).map_err(|e| format!("cannot read {key:?}: {e}"))?,
        ),
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bad certificate PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in PEM".into());
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| format!("bad private key PEM: {e}"))?;
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("unusable private key: {e}"))?;
    let ck = CertifiedKey::new(certs, signing);
    ck.keys_match()
        .map_err(|e| format!("key does not match certificate: {e}"))?;
    Ok(Arc::new(ck))
}

/// The listener's TLS settings; certificates named by secret come from `secrets`.
pub fn server_config(
    listener: &str,
    certs: &[Certificate],
    secrets: &Secrets,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut r = SniResolver {
        exact: HashMap::new(),
        wildcard: Vec::new(),
        default: None,
    };
    for c in certs {
        let host = c.hostname.clone().unwrap_or_else(|| "*".into());
        let key = load(c, secrets, &provider).map_err(|what| TlsError::Certificate {
            listener: listener.to_string(),
            host: host.clone(),
            what,
        })?;
        match c.hostname.as_deref() {
            None | Some("*") => {
                r.default.get_or_insert(key);
            }
            Some(h) => match h.strip_prefix('*') {
                Some(suffix) => r.wildcard.push((suffix.to_ascii_lowercase(), key)),
                None => {
                    r.exact.insert(h.to_ascii_lowercase(), key);
                }
            },
        }
    }
    r.wildcard.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
    // Clients without SNI (or with an unknown name) get the first certificate.
    if r.default.is_none() {
        r.default = r.exact.values().next().or(r.wildcard.first().map(|(_, k)| k)).cloned();
    }
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Certificate {
            listener: listener.into(),
            host: "*".into(),
            what: e.to_string(),
        })?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(r));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}
