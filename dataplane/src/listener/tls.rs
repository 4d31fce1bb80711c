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
    #[error("listener {listener:?}: certificate for {host}: {source}")]
    Certificate {
        listener: String,
        host: String,
        #[source]
        source: CertError,
    },
    #[error("listener {listener:?}: {source}")]
    Config {
        listener: String,
        #[source]
        source: rustls::Error,
    },
}

/// Why a certificate and key cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error(transparent)]
    Secret(#[from] ferrum_snapshot::secret::MissingSecret),
    #[error("cannot read {path:?}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("bad certificate PEM: {0}")]
    CertificatePem(rustls_pki_types::pem::Error),
    #[error("no certificate in PEM")]
    NoCertificate,
    #[error("bad private key PEM: {0}")]
    KeyPem(rustls_pki_types::pem::Error),
    #[error("unusable private key: {0}")]
    Key(rustls::Error),
    #[error("key does not match certificate: {0}")]
    Mismatch(rustls::Error),
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

/// The key pair `source` names, checked to match: a listener's certificate, or the client
/// certificate a cluster presents upstream.
pub fn certified_key(
    source: &CertSource,
    secrets: &Secrets,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<Arc<CertifiedKey>, CertError> {
    let read = |path: &String| {
        std::fs::read(path).map_err(|source| CertError::Read {
            path: path.clone(),
            source,
        })
    };
    let (cert_pem, key_pem) = match source {
        CertSource::Secret { name, digest } => {
            let s = ferrum_snapshot::secret::resolve(secrets, name, digest)?;
            (s.cert.as_bytes().to_vec(), s.key.as_bytes().to_vec())
        }
        CertSource::Files { cert, key } => (read(cert)?, read(key)?),
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(CertError::CertificatePem)?;
    if certs.is_empty() {
        return Err(CertError::NoCertificate);
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(CertError::KeyPem)?;
    let signing = provider.key_provider.load_private_key(key).map_err(CertError::Key)?;
    let ck = CertifiedKey::new(certs, signing);
    ck.keys_match().map_err(CertError::Mismatch)?;
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
        let key = certified_key(&c.source, secrets, &provider).map_err(|source| TlsError::Certificate {
            listener: listener.to_string(),
            host: host.clone(),
            source,
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
        .map_err(|source| TlsError::Config {
            listener: listener.into(),
            source,
        })?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(r));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrum_snapshot::TlsSecret;

    /// A self-signed key pair for `names`, as Secret `secret`.
    fn pair(secrets: &mut Secrets, secret: &str, names: &[&str]) -> Certificate {
        let c = rcgen::generate_simple_self_signed(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        let s = TlsSecret {
            cert: c.cert.pem(),
            key: c.signing_key.serialize_pem(),
        };
        let digest = s.digest();
        secrets.insert(secret.into(), Arc::new(s));
        Certificate {
            hostname: None,
            source: CertSource::Secret {
                name: secret.into(),
                digest,
            },
        }
    }

    fn for_host(mut c: Certificate, host: &str) -> Certificate {
        c.hostname = Some(host.into());
        c
    }

    /// The first name of the certificate the server presents to a client asking for `sni`.
    fn presented(cfg: Arc<rustls::ServerConfig>, sni: &str) -> String {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let client_cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(crate::upstream::connector::NoVerify(provider)))
            .with_no_client_auth();
        let name = rustls_pki_types::ServerName::try_from(sni.to_string()).unwrap();
        let mut client = rustls::ClientConnection::new(Arc::new(client_cfg), name).unwrap();
        let mut server = rustls::ServerConnection::new(cfg).unwrap();
        // The handshake in memory: each side's bytes handed to the other until both are done.
        for _ in 0..10 {
            let mut buf = Vec::new();
            client.write_tls(&mut buf).unwrap();
            server.read_tls(&mut &buf[..]).unwrap();
            server.process_new_packets().unwrap();
            buf.clear();
            server.write_tls(&mut buf).unwrap();
            client.read_tls(&mut &buf[..]).unwrap();
            client.process_new_packets().unwrap();
            if !client.is_handshaking() && !server.is_handshaking() {
                break;
            }
        }
        let leaf = &client.peer_certificates().expect("handshake done")[0];
        let (_, x509) = x509_parser::parse_x509_certificate(leaf).unwrap();
        let san = x509.subject_alternative_name().unwrap().unwrap();
        match &san.value.general_names[0] {
            x509_parser::extensions::GeneralName::DNSName(n) => n.to_string(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn sni_picks_the_exact_name_then_the_longest_wildcard_then_the_default() {
        let mut secrets = Secrets::new();
        let certs = [
            pair(&mut secrets, "default", &["default.test"]),
            for_host(pair(&mut secrets, "wild", &["wild.example.com"]), "*.example.com"),
            for_host(
                pair(&mut secrets, "deeper", &["deeper.a.example.com"]),
                "*.a.example.com",
            ),
            for_host(pair(&mut secrets, "exact", &["www.example.com"]), "www.example.com"),
        ];
        let cfg = server_config("l", &certs, &secrets).unwrap();
        assert_eq!(presented(cfg.clone(), "WWW.example.com"), "www.example.com");
        assert_eq!(presented(cfg.clone(), "x.a.example.com"), "deeper.a.example.com");
        assert_eq!(presented(cfg.clone(), "api.example.com"), "wild.example.com");
        assert_eq!(
            presented(cfg.clone(), "example.com"),
            "default.test",
            "a wildcard needs a label"
        );
        assert_eq!(presented(cfg, "other.test"), "default.test");
        // Without a catch-all, an unknown name still gets a certificate rather than a failure.
        let only = [for_host(
            pair(&mut secrets, "exact", &["www.example.com"]),
            "www.example.com",
        )];
        let cfg = server_config("l", &only, &secrets).unwrap();
        assert_eq!(presented(cfg, "other.test"), "www.example.com");
    }

    #[test]
    fn a_pair_that_cannot_serve_is_refused_with_the_listener_and_host() {
        let mut secrets = Secrets::new();
        let good = for_host(pair(&mut secrets, "a", &["a.test"]), "a.test");
        let other = pair(&mut secrets, "b", &["b.test"]);
        // a.test's certificate with b.test's key.
        let mixed = TlsSecret {
            cert: secrets["a"].cert.clone(),
            key: secrets["b"].key.clone(),
        };
        let digest = mixed.digest();
        secrets.insert("mixed".into(), Arc::new(mixed));
        let mixed = Certificate {
            hostname: Some("a.test".into()),
            source: CertSource::Secret {
                name: "mixed".into(),
                digest,
            },
        };
        let e = server_config("web", &[mixed], &secrets).unwrap_err();
        assert!(
            matches!(&e, TlsError::Certificate { listener, host, source: CertError::Mismatch(_) } if listener == "web" && host == "a.test"),
            "{e}"
        );
        // A rotated secret (another digest) is not served under the old name.
        let mut stale = good.clone();
        stale.source = CertSource::Secret {
            name: "a".into(),
            digest: "sha256:old".into(),
        };
        let e = server_config("web", &[stale], &secrets).unwrap_err();
        assert!(
            matches!(
                &e,
                TlsError::Certificate {
                    source: CertError::Secret(_),
                    ..
                }
            ),
            "{e}"
        );
        let missing = Certificate {
            hostname: None,
            source: CertSource::Files {
                cert: "/nonexistent/cert.pem".into(),
                key: "/nonexistent/key.pem".into(),
            },
        };
        let e = server_config("web", &[missing], &secrets).unwrap_err();
        assert!(e.to_string().contains("cannot read \"/nonexistent/cert.pem\""), "{e}");
        let empty = TlsSecret {
            cert: String::new(),
            key: secrets["b"].key.clone(),
        };
        let digest = empty.digest();
        secrets.insert("empty".into(), Arc::new(empty));
        let empty = Certificate {
            hostname: None,
            source: CertSource::Secret {
                name: "empty".into(),
                digest,
            },
        };
        let e = server_config("web", &[empty], &secrets).unwrap_err();
        assert!(
            matches!(
                &e,
                TlsError::Certificate {
                    source: CertError::NoCertificate,
                    ..
                }
            ),
            "{e}"
        );
        assert!(server_config("web", &[good, other], &secrets).is_ok());
    }
}
