//! TLS key material, kept out of snapshots. A snapshot names a certificate by secret name and
//! content digest ([`CertSource::Secret`](crate::model::CertSource::Secret)); the key pair
//! travels on its own channel (MeshSubscribe `secrets`, Envoy's SDS), so snapshots, their
//! deltas, caches, admin dumps and logs never hold a private key. The digest makes a rotated
//! certificate a new snapshot (proxies recompile, acks mean something) without revealing it.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::model::{CertSource, Snapshot};

/// A certificate chain and its private key, both PEM.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TlsSecret {
    pub cert: String,
    pub key: String,
}

impl std::fmt::Debug for TlsSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSecret")
            .field("digest", &self.digest())
            .field("key", &"[redacted]")
            .finish()
    }
}

impl TlsSecret {
    /// Names this content in snapshots: 16 hex digits of SHA-256 over both PEMs.
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.cert.as_bytes());
        h.update([0]);
        h.update(self.key.as_bytes());
        let d = h.finalize();
        d[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Secrets by name (`namespace/name` for Kubernetes Secrets).
pub type Secrets = BTreeMap<String, Arc<TlsSecret>>;

/// The secret references of a snapshot: (name, digest) for every certificate it names — its
/// listeners' and the client certificates of its clusters.
pub fn references(snap: &Snapshot) -> impl Iterator<Item = (&str, &str)> {
    let clients = snap
        .clusters
        .iter()
        .filter_map(|c| c.tls.as_ref()?.client_certificate.as_ref());
    snap.listeners
        .iter()
        .flat_map(|l| &l.certificates)
        .map(|c| &c.source)
        .chain(clients)
        .filter_map(|c| match c {
            CertSource::Secret { name, digest } => Some((name.as_str(), digest.as_str())),
            CertSource::Files { .. } => None,
        })
}

/// The part of `all` that `snap` names, with the content it names.
pub fn needed_by(snap: &Snapshot, all: &Secrets) -> Secrets {
    references(snap)
        .filter_map(|(name, digest)| {
            let s = all.get(name)?;
            (s.digest() == digest).then(|| (name.to_string(), s.clone()))
        })
        .collect()
}

/// Why a snapshot cannot be served with the secrets at hand.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MissingSecret {
    #[error("secret {name:?} was never received")]
    Absent { name: String },
    #[error("secret {name:?} is at {have}, the snapshot names {want}")]
    Stale { name: String, have: String, want: String },
}

/// The secret `name` at `digest`, or why not.
pub fn resolve<'a>(secrets: &'a Secrets, name: &str, digest: &str) -> Result<&'a TlsSecret, MissingSecret> {
    let s = secrets
        .get(name)
        .ok_or_else(|| MissingSecret::Absent { name: name.into() })?;
    let have = s.digest();
    if have != digest {
        return Err(MissingSecret::Stale {
            name: name.into(),
            have,
            want: digest.into(),
        });
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_the_key() {
        let s = TlsSecret {
            cert: "CERT".into(),
            key: "-----BEGIN PRIVATE KEY-----\nsecret\n".into(),
        };
        let shown = format!("{s:?}");
        assert!(
            !shown.contains("secret\n") && !shown.contains("BEGIN PRIVATE"),
            "{shown}"
        );
        assert!(shown.contains(&s.digest()));
    }

    #[test]
    fn a_new_key_is_a_new_digest_and_stale_content_is_refused() {
        let a = TlsSecret {
            cert: "C".into(),
            key: "K1".into(),
        };
        let b = TlsSecret {
            cert: "C".into(),
            key: "K2".into(),
        };
        assert_ne!(a.digest(), b.digest());
        assert_eq!(a.digest().len(), 16);
        let all: Secrets = [("ns/a".to_string(), Arc::new(a.clone()))].into();
        assert_eq!(resolve(&all, "ns/a", &a.digest()), Ok(&a));
        assert!(matches!(
            resolve(&all, "ns/a", &b.digest()),
            Err(MissingSecret::Stale { .. })
        ));
        assert!(matches!(
            resolve(&all, "ns/b", &a.digest()),
            Err(MissingSecret::Absent { .. })
        ));
    }
}
