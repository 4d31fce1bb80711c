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

/// Every Secret `res` names for TLS, as (namespace, name): Gateway listeners' `certificateRefs`,
/// Backend and BackendPolicy `tls` references and DestinationRule `credentialName`s — the
/// latter two with their `<name>-cacert` companion, where Istio also looks for the CAs that
/// verify an upstream (a listener's certificate needs none). A controller that lists only
/// `kubernetes.io/tls` Secrets fetches the others (Istio accepts generic ones) by these
/// names, and reads no other Secret.
pub fn named_by(res: &crate::Resources) -> std::collections::BTreeSet<(String, String)> {
    let mut out = std::collections::BTreeSet::new();
    let ns_of = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        m.namespace.clone().unwrap_or_else(|| "default".into())
    };
    for gw in &res.gateways {
        let refs = gw
            .spec
            .listeners
            .iter()
            .filter_map(|l| l.tls.as_ref()?.certificate_refs.as_ref());
        for r in refs.flatten() {
            let ns = r.namespace.clone().unwrap_or_else(|| ns_of(&gw.metadata));
            out.insert((ns, r.name.clone()));
        }
    }
    let mut name = |ns: &str, name: &str| {
        out.insert((ns.to_string(), name.to_string()));
        out.insert((ns.to_string(), format!("{name}-cacert")));
    };
    let policies = res.backends.iter().map(|b| (&b.metadata, &b.spec.policy));
    let policies = policies.chain(res.backend_policies.iter().map(|p| (&p.metadata, &p.spec.policy)));
    for (meta, tls) in policies.filter_map(|(m, p)| Some((m, p.tls.as_ref()?))) {
        for n in [&tls.ca_certificate_ref, &tls.client_certificate_ref]
            .into_iter()
            .flatten()
        {
            name(&ns_of(meta), n);
        }
    }
    for dr in &res.destination_rules {
        let subsets = dr.spec.subsets.iter().filter_map(|s| s.traffic_policy.as_ref());
        for p in dr.spec.traffic_policy.iter().chain(subsets) {
            let ports = p.port_level_settings.iter().filter_map(|l| l.tls.as_ref());
            for t in p.tls.iter().chain(ports) {
                if let Some(n) = &t.credential_name {
                    name(&ns_of(&dr.metadata), n);
                }
            }
        }
    }
    out
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

    #[test]
    fn the_secrets_objects_name_and_no_others() {
        let mut r = crate::Resources::default();
        r.add_yaml(
            "t.yaml",
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: gw, namespace: edge}\n\
             spec: {gatewayClassName: ferrum, listeners: [{name: https, port: 443, protocol: HTTPS, \
             tls: {certificateRefs: [{name: site}, {name: shared, namespace: certs}]}}]}\n---\n\
             apiVersion: ferrum.dev/v1alpha1\nkind: Backend\nmetadata: {name: b, namespace: shop}\n\
             spec: {endpoints: [{address: 10.0.0.1, port: 443}], tls: {sni: pay.example, caCertificateRef: upstream-ca}}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d, namespace: shop}\n\
             spec: {host: pay, trafficPolicy: {portLevelSettings: [{port: {number: 443}, tls: {mode: MUTUAL, credentialName: pay-client}}]}, \
             subsets: [{name: v2, trafficPolicy: {tls: {mode: SIMPLE, credentialName: pay-v2}}}]}\n---\n\
             apiVersion: v1\nkind: Secret\nmetadata: {name: unrelated, namespace: shop}\ntype: Opaque\n",
        )
        .unwrap();
        let named: Vec<String> = super::named_by(&r)
            .into_iter()
            .map(|(ns, n)| format!("{ns}/{n}"))
            .collect();
        assert_eq!(
            named,
            [
                "certs/shared",
                "edge/site",
                "shop/pay-client",
                "shop/pay-client-cacert",
                "shop/pay-v2",
                "shop/pay-v2-cacert",
                "shop/upstream-ca",
                "shop/upstream-ca-cacert",
            ]
        );
    }
}
