//! Incremental (delta) ADS: per stream and type, the subscription (wildcard or names) and the
//! version of every resource the client has; a push sends exactly the resources whose version
//! changed and the names that went away. Versions are hashes of the resources' bytes, so a client
//! that reconnects with `initial_resource_versions` is sent only what it lacks. Pushes go
//! CDS → EDS → LDS → RDS, and removed clusters are announced last, after the routes moved off.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};
use tokio::sync::mpsc;
use tonic::Status;

use super::ads::{Ads, Generation};
use super::resources::{CLUSTER, LISTENER, PUSH_ORDER};
use crate::subscribe::{ProxyState, Registration, now_ms};

#[derive(Default)]
struct TypeState {
    /// Asked for at all (a client that never asked for a type gets none of it).
    active: bool,
    wildcard: bool,
    names: BTreeSet<String>,
    /// What the client has: name → version.
    have: HashMap<String, String>,
    nonce: u64,
}

pub(super) struct DeltaStream {
    ads: Arc<Ads>,
    types: BTreeMap<String, TypeState>,
    nonce: u64,
    reg: Option<Registration>,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
}

impl DeltaStream {
    pub(super) fn new(ads: Arc<Ads>, tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>) -> Self {
        DeltaStream {
            ads,
            types: BTreeMap::new(),
            nonce: 0,
            reg: None,
            tx,
        }
    }

    /// What `type_url` should send now: (changed resources, removed names). `keep_removed`
    /// holds back removals (clusters, until routes moved off them).
    fn pending(&mut self, type_url: &str, g: &Generation, keep_removed: bool) -> (Vec<Resource>, Vec<String>) {
        let Some(st) = self.types.get_mut(type_url).filter(|s| s.active) else {
            return (Vec::new(), Vec::new());
        };
        let res = g.resources();
        let of_type = &res.by_type[type_url];
        let versions = g.versions(type_url);
        let lookup = |n: &str| {
            of_type
                .get(n)
                .or_else(|| (type_url == LISTENER).then(|| res.api_listeners.get(n)).flatten())
        };
        let mut send = Vec::new();
        let mut consider = |name: &String, st: &mut TypeState| {
            let (Some(any), Some(version)) = (lookup(name), versions.get(name)) else {
                return;
            };
            if st.have.get(name) != Some(version) {
                st.have.insert(name.clone(), version.clone());
                send.push(Resource {
                    name: name.clone(),
                    version: version.clone(),
                    resource: Some(any.clone()),
                    ..Default::default()
                });
            }
        };
        if st.wildcard {
            for name in of_type.keys() {
                consider(name, st);
            }
        }
        for name in st.names.clone().iter() {
            consider(name, st);
        }
        let mut removed = Vec::new();
        if !keep_removed {
            let gone: Vec<String> = st.have.keys().filter(|n| lookup(n).is_none()).cloned().collect();
            for n in gone {
                st.have.remove(&n);
                removed.push(n);
            }
        }
        (send, removed)
    }

    async fn send(&mut self, type_url: &str, g: &Generation, resources: Vec<Resource>, removed: Vec<String>) -> bool {
        if resources.is_empty() && removed.is_empty() {
            return true;
        }
        self.nonce += 1;
        if let Some(st) = self.types.get_mut(type_url) {
            st.nonce = self.nonce;
        }
        if let Some(reg) = &self.reg {
            reg.update(|p| {
                p.sent_version = g.version();
                p.deltas_sent += 1;
            });
        }
        let resp = DeltaDiscoveryResponse {
            system_version_info: g.version().to_string(),
            resources,
            type_url: type_url.to_string(),
            removed_resources: removed,
            nonce: self.nonce.to_string(),
            ..Default::default()
        };
        self.tx.send(Ok(resp)).await.is_ok()
    }

    /// Pushes every subscribed type in order; clusters that went away are removed last.
    pub(super) async fn push_all(&mut self) -> bool {
        let g = self.ads.current();
        let mut cluster_removals = Vec::new();
        for t in PUSH_ORDER {
            let (send, removed) = self.pending(t, &g, false);
            let removed = if t == CLUSTER {
                cluster_removals = removed;
                Vec::new()
            } else {
                removed
            };
            if !self.send(t, &g, send, removed).await {
                return false;
            }
        }
        self.send(CLUSTER, &g, Vec::new(), cluster_removals).await
    }

    pub(super) async fn on_request(&mut self, r: DeltaDiscoveryRequest, peer: &str) -> Result<bool, Status> {
        if self.reg.is_none() {
            let node = r.node.as_ref().map(|n| n.id.clone()).filter(|n| !n.is_empty());
            let Some(node) = node else {
                return Err(Status::invalid_argument(
                    "the first DeltaDiscoveryRequest must carry node.id",
                ));
            };
            let now = now_ms();
            self.reg = Some(self.ads.proxies.register(ProxyState {
                node_id: node,
                role: r.node.as_ref().map(|n| n.cluster.clone()).unwrap_or_default(),
                proxy_version: r.node.as_ref().map(|n| n.user_agent_name.clone()).unwrap_or_default(),
                peer: peer.to_string(),
                protocol: "xDS (delta)",
                connected_since_unix_ms: now,
                last_seen_unix_ms: now,
                sent_version: 0,
                deltas_sent: 0,
                full_sent: 0,
                applied_version: 0,
                applied_hash: String::new(),
                last_rejection: None,
                rejected_version: None,
            })?);
        }
        let reg = self.reg.as_ref().expect("registered above");
        let g = self.ads.current();
        let st = self.types.entry(r.type_url.clone()).or_default();
        if !r.response_nonce.is_empty() {
            if r.response_nonce != st.nonce.to_string() {
                // An answer to an older response: the newer one is on its way.
                return Ok(true);
            }
            match &r.error_detail {
                Some(err) => {
                    tracing::warn!(node = %reg.key.0, type_url = %r.type_url, message = %err.message, "xDS NACK");
                    reg.update(|p| {
                        p.last_seen_unix_ms = now_ms();
                        p.rejected_version = Some(g.version());
                        p.last_rejection = Some(format!("{}: {}", r.type_url, err.message));
                    });
                }
                None => reg.update(|p| {
                    p.last_seen_unix_ms = now_ms();
                    p.applied_version = p.applied_version.max(g.version());
                }),
            }
        }
        let first = !st.active;
        st.active = true;
        // The first request of a LDS/CDS stream that names nothing is a wildcard subscription.
        if first && (r.type_url == LISTENER || r.type_url == CLUSTER) && r.resource_names_subscribe.is_empty() {
            st.wildcard = true;
        }
        for n in &r.resource_names_subscribe {
            if n == "*" {
                st.wildcard = true;
            } else {
                st.names.insert(n.clone());
            }
        }
        for n in &r.resource_names_unsubscribe {
            if n == "*" {
                st.wildcard = false;
            } else {
                st.names.remove(n);
            }
            st.have.remove(n);
        }
        // A reconnecting client says what it already has.
        for (n, v) in &r.initial_resource_versions {
            st.have.insert(n.clone(), v.clone());
        }
        if first || !r.resource_names_subscribe.is_empty() || !r.resource_names_unsubscribe.is_empty() {
            let t = r.type_url.clone();
            let (send, removed) = self.pending(&t, &g, false);
            return Ok(self.send(&t, &g, send, removed).await);
        }
        Ok(true)
    }
}
