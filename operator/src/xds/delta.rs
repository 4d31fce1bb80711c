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
use crate::proxies::{Registration, now_ms};

#[derive(Default)]
struct TypeState {
    /// Asked for at all (a client that never asked for a type gets none of it).
    active: bool,
    wildcard: bool,
    /// Subscribed names, interned: a thousand clients asking for the same 5,000 share one set.
    names: Arc<BTreeSet<String>>,
    /// The client holds this generation's version of every resource it is subscribed to…
    synced: Option<Arc<Generation>>,
    /// …except these (name → version it holds, "" for none): newly subscribed names, and what
    /// a reconnecting client said it has. Empty in the steady state.
    differs: HashMap<String, String>,
    nonce: u64,
    /// The first nonce of the last (possibly split) answer.
    first_nonce: u64,
}

impl TypeState {
    /// Applies a request's subscriptions and unsubscriptions; whether it had any.
    fn subscribe(&mut self, r: &DeltaDiscoveryRequest, ads: &Ads) -> bool {
        if r.resource_names_subscribe.is_empty() && r.resource_names_unsubscribe.is_empty() {
            return false;
        }
        let mut names: BTreeSet<String> = (*self.names).clone();
        for n in &r.resource_names_subscribe {
            if n == "*" {
                self.wildcard = true;
            } else if names.insert(n.clone()) {
                // Newly asked for: the client holds none of it yet.
                self.differs.insert(n.clone(), String::new());
            }
        }
        for n in &r.resource_names_unsubscribe {
            if n == "*" {
                self.wildcard = false;
            } else {
                names.remove(n);
            }
            self.differs.remove(n);
        }
        let names: Vec<String> = names.into_iter().collect();
        self.names = ads.intern(super::ads::hash_names(&names), &names);
        true
    }
}

pub(super) struct DeltaStream {
    ads: Arc<Ads>,
    types: BTreeMap<String, TypeState>,
    nonce: u64,
    reg: Option<Registration>,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
}

/// For a client one generation behind: the names that changed since and that it wants, and
/// those it had that went.
fn since_previous<'g>(st: &TypeState, g: &'g Generation, type_url: &str) -> (Vec<&'g String>, Vec<String>) {
    let of_type = &g.resources().by_type[type_url];
    let versions = g.versions(type_url);
    let wanted = |n: &str| (st.wildcard && of_type.contains_key(n)) || st.names.contains(n);
    let send = g
        .changed(type_url)
        .iter()
        .filter(|n| wanted(n))
        .filter_map(|n| versions.get_key_value(n.as_str()).map(|(k, _)| k))
        .collect();
    let mut removed = Vec::new();
    if g.removed_any(type_url) {
        let prev = st.synced.as_ref().expect("one behind").resources();
        removed.extend(
            prev.by_type[type_url]
                .keys()
                .filter(|n| (st.wildcard || st.names.contains(*n)) && !versions.contains_key(*n))
                .cloned(),
        );
    }
    (send, removed)
}

/// Compared with what the client holds, name by name: what it lacks or holds another version
/// of, and what it holds that no longer exists.
fn name_by_name<'g>(st: &TypeState, g: &'g Generation, type_url: &str) -> (Vec<&'g String>, Vec<String>) {
    let of_type = &g.resources().by_type[type_url];
    let versions = g.versions(type_url);
    let exists = |n: &str| versions.contains_key(n);
    // The generation's own copy of a name that exists in it.
    let resource = |n: &str| versions.get_key_value(n).map(|(k, _)| k);
    let held = |n: &str| -> Option<String> {
        if let Some(v) = st.differs.get(n) {
            return Some(v.clone()).filter(|v| !v.is_empty());
        }
        st.synced.as_ref().and_then(|s| s.versions(type_url).get(n).cloned())
    };
    let mut candidates: Vec<&'g String> = st.names.iter().filter_map(|n| resource(n)).collect();
    if st.wildcard {
        candidates.extend(of_type.keys().filter_map(|n| resource(n)));
    }
    candidates.sort_unstable();
    candidates.dedup();
    let send = candidates
        .into_iter()
        .filter(|n| held(n).as_ref() != versions.get(n.as_str()))
        .collect();
    let mut gone: Vec<String> = st
        .differs
        .iter()
        .filter(|(n, v)| !v.is_empty() && !exists(n))
        .map(|(n, _)| n.clone())
        .collect();
    if let Some(s) = &st.synced {
        let before = &s.resources().by_type[type_url];
        gone.extend(
            s.versions(type_url)
                .keys()
                .filter(|n| {
                    !exists(n)
                        && !st.differs.contains_key(*n)
                        && ((st.wildcard && before.contains_key(*n)) || st.names.contains(*n))
                })
                .cloned(),
        );
    }
    gone.sort();
    gone.dedup();
    (send, gone)
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

    /// What `type_url` should send now: (names to send, borrowed from the generation; names
    /// removed). A client one generation behind (nearly always) costs what changed, not what it
    /// is subscribed to, and nothing is copied per name.
    fn pending<'g>(&mut self, type_url: &str, generation: &'g Arc<Generation>) -> (Vec<&'g String>, Vec<String>) {
        let Some(st) = self.types.get_mut(type_url).filter(|s| s.active) else {
            return (Vec::new(), Vec::new());
        };
        let g: &'g Generation = generation;
        let synced = st.synced.as_ref();
        let fresh = synced.is_some_and(|s| std::ptr::eq(&**s, g));
        let one_behind = synced.is_some_and(|s| g.previous().is_some_and(|p| Arc::ptr_eq(s.resources(), p)));
        if st.differs.is_empty() && fresh {
            return (Vec::new(), Vec::new());
        }
        let (send, removed) = if st.differs.is_empty() && one_behind {
            since_previous(st, g, type_url)
        } else {
            name_by_name(st, g, type_url)
        };
        st.synced = Some(Arc::clone(generation));
        // A new map, not clear(): a cleared map keeps its capacity (5,000 names per client).
        st.differs = HashMap::new();
        (send, removed)
    }

    /// Sends `names` (and `removed`) in answers of at most [`super::ads::BATCH_BYTES`], each
    /// made just before it is sent: a thousand clients syncing at once do not each hold a copy
    /// of every resource, and gRPC keeps a buffer per stream as large as its largest message.
    async fn send(&mut self, type_url: &str, g: &Generation, names: Vec<&String>, removed: Vec<String>) -> bool {
        if names.is_empty() && removed.is_empty() {
            return true;
        }
        if let Some(reg) = &self.reg {
            reg.update(|p| {
                p.sent_version = g.version();
                p.deltas_sent += 1;
            });
        }
        let res = g.resources();
        let versions = g.versions(type_url);
        let lookup = |n: &str| {
            res.by_type[type_url]
                .get(n)
                .or_else(|| (type_url == LISTENER).then(|| res.api_listeners.get(n)).flatten())
        };
        let sizes: Vec<(&String, usize)> = names
            .into_iter()
            // What a Resource costs on the wire: name, version (16 hex digits), the Any, framing.
            .map(|n| (n, lookup(n).map_or(0, prost::Message::encoded_len) + n.len() + 32))
            .collect();
        let parts = super::ads::batches(sizes, |(_, size)| *size, super::ads::BATCH_BYTES);
        let ads = self.ads.clone();
        let _turn = if parts.len() > 1 {
            ads.large_sends.acquire().await.ok()
        } else {
            None
        };
        let mut removed = Some(removed);
        if let Some(st) = self.types.get_mut(type_url) {
            st.first_nonce = self.nonce + 1;
        }
        for part in parts {
            let resources: Vec<Resource> = part
                .into_iter()
                .filter_map(|(n, _)| {
                    Some(Resource {
                        version: versions.get(n)?.clone(),
                        resource: Some(lookup(n)?.clone()),
                        name: n.clone(),
                        ..Default::default()
                    })
                })
                .collect();
            self.nonce += 1;
            if let Some(st) = self.types.get_mut(type_url) {
                st.nonce = self.nonce;
            }
            let resp = DeltaDiscoveryResponse {
                system_version_info: g.version().to_string(),
                resources,
                type_url: type_url.to_string(),
                removed_resources: removed.take().unwrap_or_default(),
                nonce: self.nonce.to_string(),
                ..Default::default()
            };
            if self.tx.send(Ok(resp)).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Pushes every subscribed type in order; clusters that went away are removed last.
    pub(super) async fn push_all(&mut self) -> bool {
        let g = self.ads.current();
        let mut cluster_removals = Vec::new();
        for t in PUSH_ORDER {
            let (send, removed) = self.pending(t, &g);
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
            self.reg = Some(self.ads.register(r.node.as_ref(), peer, "xDS (delta)")?);
        }
        let reg = self.reg.as_ref().expect("registered above");
        let g = self.ads.current();
        let st = self.types.entry(r.type_url.clone()).or_default();
        if !r.response_nonce.is_empty() {
            let nonce: u64 = r.response_nonce.parse().unwrap_or(0);
            // An ACK counts for the last part of the last answer, a NACK for any part of it.
            if nonce != st.nonce && !((st.first_nonce..=st.nonce).contains(&nonce) && r.error_detail.is_some()) {
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
        let subscriptions_changed = st.subscribe(&r, &self.ads);
        // A reconnecting client says what it already has.
        if !r.initial_resource_versions.is_empty() {
            st.synced = None;
            for (n, v) in &r.initial_resource_versions {
                st.differs.insert(n.clone(), v.clone());
            }
        }
        if first || subscriptions_changed {
            let t = r.type_url.clone();
            let (send, removed) = self.pending(&t, &g);
            return Ok(self.send(&t, &g, send, removed).await);
        }
        Ok(true)
    }
}

impl super::ads::AdsStream<DeltaDiscoveryRequest> for DeltaStream {
    fn on_request(
        &mut self,
        r: DeltaDiscoveryRequest,
        peer: &str,
    ) -> impl std::future::Future<Output = Result<bool, Status>> + Send {
        DeltaStream::on_request(self, r, peer)
    }
    fn push_all(&mut self) -> impl std::future::Future<Output = bool> + Send {
        DeltaStream::push_all(self)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Arc;

    use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
    use ferrum_proto::xds::{CLUSTER, ENDPOINT};
    use tokio::sync::mpsc;

    use super::DeltaStream;
    use crate::xds::ads::Ads;
    use crate::xds::test_world::{cluster, clusters, node, published, world};

    fn request(type_url: &str) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            node: node(),
            type_url: type_url.into(),
            ..Default::default()
        }
    }

    type Answers = mpsc::Receiver<Result<DeltaDiscoveryResponse, tonic::Status>>;

    fn stream(ads: &Arc<Ads>) -> (DeltaStream, Answers) {
        let (tx, rx) = mpsc::channel(16);
        (DeltaStream::new(ads.clone(), tx), rx)
    }

    /// (type, names sent, names removed) of every answer waiting.
    fn answers(rx: &mut Answers) -> Vec<(String, BTreeSet<String>, Vec<String>)> {
        std::iter::from_fn(|| rx.try_recv().ok())
            .map(|r| {
                let r = r.unwrap();
                let names = r.resources.iter().map(|x| x.name.clone()).collect();
                (r.type_url, names, r.removed_resources)
            })
            .collect()
    }

    #[tokio::test]
    async fn a_push_sends_what_changed_and_removes_clusters_after_their_endpoints() {
        let (publisher, ads) = published(&["echo", "web"], 1);
        let (mut s, mut rx) = stream(&ads);
        assert!(s.on_request(request(CLUSTER), "peer").await.unwrap());
        assert_eq!(
            answers(&mut rx),
            vec![(CLUSTER.into(), clusters(&["echo", "web"]), vec![])]
        );
        let mut eds = request(ENDPOINT);
        eds.resource_names_subscribe = vec![cluster("echo"), cluster("web")];
        assert!(s.on_request(eds, "peer").await.unwrap());
        assert_eq!(
            answers(&mut rx),
            vec![(ENDPOINT.into(), clusters(&["echo", "web"]), vec![])]
        );

        // Nothing changed: a push sends nothing at all.
        assert!(s.push_all().await);
        assert!(answers(&mut rx).is_empty());

        // echo's endpoints move and web goes away: one CLA, then web's removal from EDS, and
        // only then from CDS (no cluster disappears while a route may still point at it).
        publisher.publish(world(&["echo"], 2));
        assert!(s.push_all().await);
        assert_eq!(
            answers(&mut rx),
            vec![
                (ENDPOINT.into(), clusters(&["echo"]), vec![cluster("web")]),
                (CLUSTER.into(), BTreeSet::new(), vec![cluster("web")]),
            ]
        );
    }

    #[tokio::test]
    async fn a_reconnecting_client_is_sent_only_what_it_lacks() {
        let (_, ads) = published(&["echo", "web"], 1);
        let (mut first, mut rx) = stream(&ads);
        first.on_request(request(CLUSTER), "peer").await.unwrap();
        let sent = rx.try_recv().unwrap().unwrap();
        let version = |n: &str| {
            let r = sent.resources.iter().find(|r| r.name == cluster(n)).unwrap();
            r.version.clone()
        };
        drop(first);

        // It holds echo as it is, an old web, and a cluster that no longer exists.
        let (mut again, mut rx) = stream(&ads);
        let mut req = request(CLUSTER);
        req.initial_resource_versions = [
            (cluster("echo"), version("echo")),
            (cluster("web"), "0000000000000000".into()),
            (cluster("gone"), "0123456789abcdef".into()),
        ]
        .into();
        again.on_request(req, "peer").await.unwrap();
        assert_eq!(
            answers(&mut rx),
            vec![(CLUSTER.into(), clusters(&["web"]), vec![cluster("gone")])]
        );
    }

    #[tokio::test]
    async fn a_nack_is_recorded_and_a_stale_nonce_is_ignored() {
        let (publisher, ads) = published(&["echo"], 1);
        let (mut s, mut rx) = stream(&ads);
        s.on_request(request(CLUSTER), "peer").await.unwrap();
        let nonce = rx.try_recv().unwrap().unwrap().nonce;
        let nack = |nonce: &str| {
            let mut r = request(CLUSTER);
            r.response_nonce = nonce.into();
            r.error_detail = Some(envoy_types::pb::google::rpc::Status {
                message: "bad cluster".into(),
                ..Default::default()
            });
            r
        };
        s.on_request(nack("99"), "peer").await.unwrap();
        assert_eq!(ads.proxies.list()[0].last_rejection, None);
        s.on_request(nack(&nonce), "peer").await.unwrap();
        let p = &ads.proxies.list()[0];
        assert_eq!(p.last_rejection.as_deref(), Some(&*format!("{CLUSTER}: bad cluster")));
        assert_eq!(p.rejected_version, Some(publisher.current().generation));
        // The stream's registration goes with it.
        drop(s);
        assert!(ads.proxies.list().is_empty());
    }
}
