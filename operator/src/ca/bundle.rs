//! The mesh roots, published as the ConfigMap `ferrum-ca-root` (key `root-cert.pem`) in every
//! namespace, where injected sidecars and gateways mount them (`--ca-root-file`). The leader
//! writes; a new namespace gets it within seconds; each is checked again every few minutes (a
//! ConfigMap deleted or edited by hand comes back). During a root rotation the bundle holds the
//! old and the new root (the CA Secret's `trust-bundle.pem`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::reflector::Store;

pub const CONFIGMAP: &str = "ferrum-ca-root";
pub const KEY: &str = "root-cert.pem";
/// How often every namespace's copy is checked again.
const RECHECK: Duration = Duration::from_secs(300);
/// How often new namespaces are looked for.
const TICK: Duration = Duration::from_secs(2);

/// Keeps `bundle` in every namespace while this replica leads, forever.
pub async fn publish(client: kube::Client, namespaces: Store<Namespace>, bundle: String, leader: Arc<AtomicBool>) {
    let mut checked: HashMap<String, Instant> = HashMap::new();
    loop {
        if !leader.load(Relaxed) {
            // Whoever leads next checks everything itself.
            checked.clear();
        }
        for ns in namespaces.state().iter().filter(|_| leader.load(Relaxed)) {
            let Some(name) = ns.metadata.name.clone() else { continue };
            if ns.metadata.deletion_timestamp.is_some() || checked.get(&name).is_some_and(|t| t.elapsed() < RECHECK) {
                continue;
            }
            match ensure(&Api::namespaced(client.clone(), &name), &bundle).await {
                Ok(wrote) => {
                    if wrote {
                        tracing::info!(namespace = %name, "mesh roots published");
                    }
                    checked.insert(name, Instant::now());
                }
                Err(e) => tracing::warn!(namespace = %name, error = %e, "cannot publish the mesh roots"),
            }
        }
        checked.retain(|n, _| {
            namespaces
                .state()
                .iter()
                .any(|ns| ns.metadata.name.as_deref() == Some(n))
        });
        tokio::time::sleep(TICK).await;
    }
}

/// Makes the namespace's ConfigMap hold `bundle`; whether it had to write.
async fn ensure(api: &Api<ConfigMap>, bundle: &str) -> Result<bool, kube::Error> {
    let data = BTreeMap::from([(KEY.to_string(), bundle.to_string())]);
    match api.get_opt(CONFIGMAP).await? {
        Some(cm) if cm.data.as_ref().and_then(|d| d.get(KEY)).map(String::as_str) == Some(bundle) => Ok(false),
        Some(_) => {
            let patch = serde_json::json!({"data": data});
            api.patch(CONFIGMAP, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            Ok(true)
        }
        None => {
            let cm = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(CONFIGMAP.into()),
                    labels: Some(BTreeMap::from([(
                        "app.kubernetes.io/managed-by".to_string(),
                        "ferrum-operator".to_string(),
                    )])),
                    ..Default::default()
                },
                data: Some(data),
                ..Default::default()
            };
            api.create(&PostParams::default(), &cm).await?;
            Ok(true)
        }
    }
}
