//! Secrets that objects name but that are not `kubernetes.io/tls`. Istio's documented way to
//! give a DestinationRule (`credentialName`) or a gateway its certificates is a generic Secret
//! (`tls.crt`/`tls.key`/`ca.crt`, or `cert`/`key`/`cacert`); the operator lists only TLS Secrets,
//! so each other one is watched on its own — by name, with a field selector, in its namespace —
//! for as long as an object names it. No Secret that no object names is ever read.

use std::collections::BTreeMap;
use std::sync::Mutex;

use ferrum_snapshot::Resources;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::mpsc;

/// The most Secrets watched by name at once: beyond it, further names wait (and are logged).
const MAX_NAMED: usize = 1024;

pub struct Named {
    client: Client,
    changed: mpsc::Sender<()>,
    held: Mutex<BTreeMap<(String, String), Watched>>,
}

/// One Secret's watch; dropping it stops the watch.
struct Watched {
    store: Store<Secret>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Named {
    /// Watches that poke `changed` whenever a watched Secret changes.
    pub fn new(client: Client, changed: mpsc::Sender<()>) -> Self {
        Named {
            client,
            changed,
            held: Mutex::default(),
        }
    }

    /// Adds to `res.secrets` the Secrets its objects name that the TLS list lacks, starting
    /// a watch for each newly named one and stopping those no longer named.
    pub fn add_to(&self, res: &mut Resources) {
        let listed: std::collections::BTreeSet<(&str, &str)> = res
            .secrets
            .iter()
            .filter_map(|s| Some((s.metadata.namespace.as_deref()?, s.metadata.name.as_deref()?)))
            .collect();
        let wanted: Vec<(String, String)> = ferrum_snapshot::secret::named_by(res)
            .into_iter()
            .filter(|(ns, name)| !listed.contains(&(ns.as_str(), name.as_str())))
            .collect();
        let mut held = self.held.lock().unwrap();
        held.retain(|key, _| wanted.contains(key));
        for key in wanted {
            if held.len() >= MAX_NAMED && !held.contains_key(&key) {
                tracing::warn!(namespace = %key.0, name = %key.1, max = MAX_NAMED, "too many Secrets named; not watching this one");
                continue;
            }
            held.entry(key).or_insert_with_key(|(ns, name)| self.watch(ns, name));
        }
        res.secrets.extend(held.values().flat_map(|w| w.store.state()));
    }

    fn watch(&self, ns: &str, name: &str) -> Watched {
        let (store, writer) = reflector::store();
        let api: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let changed = self.changed.clone();
        let task = tokio::spawn(async move {
            let events = reflector::reflector(writer, watcher(api, config).default_backoff()).touched_objects();
            futures_util::pin_mut!(events);
            while let Some(ev) = events.next().await {
                if let Err(e) = ev {
                    tracing::debug!(error = %e, "named Secret watch failed; retrying");
                    continue;
                }
                let _ = changed.try_send(());
            }
        });
        Watched { store, task }
    }
}
