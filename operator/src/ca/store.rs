//! Where the CA's material lives: the Secret `<namespace>/<name>` (default
//! `ferrum-system/ferrum-ca`). A plug-in CA puts its own there — `ca.crt` + `ca.key` (a root, or
//! an intermediate followed by its chain), or Istio's `ca-cert.pem`, `ca-key.pem`,
//! `cert-chain.pem`, `root-cert.pem`. `trust-bundle.pem` adds roots workloads trust besides the
//! signing one (a root rotation). When there is none, the leader generates a root and creates
//! the Secret; followers wait for it, so every replica signs for the same root.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};

use super::{Authority, CaError, Material};

fn material_of(s: &Secret) -> Result<Material, CaError> {
    let data = s.data.clone().unwrap_or_default();
    let get = |k: &str| data.get(k).map(|b| String::from_utf8_lossy(&b.0).into_owned());
    let extra_roots_pem = get("trust-bundle.pem");
    if let (Some(cert), Some(key)) = (get("ca.crt").or(get("tls.crt")), get("ca.key").or(get("tls.key"))) {
        return Ok(Material {
            chain_pem: cert,
            key_pem: key,
            extra_roots_pem,
        });
    }
    if let (Some(cert), Some(key)) = (get("ca-cert.pem"), get("ca-key.pem")) {
        let chain = [Some(cert), get("cert-chain.pem"), get("root-cert.pem")]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>();
        return Ok(Material {
            chain_pem: chain.join("\n"),
            key_pem: key,
            extra_roots_pem,
        });
    }
    Err(CaError::Material(
        "needs ca.crt and ca.key (or Istio's ca-cert.pem and ca-key.pem)".into(),
    ))
}

/// The CA, once this replica can sign: loaded from the Secret, or generated and stored by the
/// leader when there is none.
pub async fn load_or_create(api: Api<Secret>, name: &str, trust_domain: &str, leader: &Arc<AtomicBool>) -> Authority {
    let mut said = false;
    loop {
        match api.get_opt(name).await {
            Ok(Some(secret)) => match material_of(&secret).and_then(|m| Authority::load(&m)) {
                Ok(ca) => {
                    tracing::info!(secret = name, "CA loaded");
                    return ca;
                }
                Err(e) => tracing::error!(secret = name, error = %e, "CA Secret is unusable; fix or delete it"),
            },
            Ok(None) if leader.load(Relaxed) => match create(&api, name, trust_domain).await {
                Ok(ca) => return ca,
                // Another replica may have won the race: read what it stored.
                Err(e) => tracing::warn!(secret = name, error = %e, "cannot store the new CA; retrying"),
            },
            Ok(None) => {
                if !said {
                    tracing::info!(secret = name, "waiting for the leader to create the CA");
                    said = true;
                }
            }
            Err(e) => tracing::warn!(secret = name, error = %e, "cannot read the CA Secret; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn create(api: &Api<Secret>, name: &str, trust_domain: &str) -> Result<Authority, CaError> {
    let (ca, m) = Authority::generate(trust_domain)?;
    let data = BTreeMap::from([
        ("ca.crt".to_string(), ByteString(m.chain_pem.into_bytes())),
        ("ca.key".to_string(), ByteString(m.key_pem.into_bytes())),
    ]);
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Default::default()
    };
    api.create(&PostParams::default(), &secret)
        .await
        .map_err(CaError::Store)?;
    tracing::info!(secret = name, trust_domain, "generated a new mesh root CA");
    Ok(ca)
}
