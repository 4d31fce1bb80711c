//! State-of-the-World ADS: per stream and type, the subscription, the last nonce and version sent
//! and the last one acknowledged. A NACK is recorded with Envoy's message and nothing is resent
//! until the config changes; stale nonces are ignored; LDS/CDS are wildcard unless named; a
//! type is pushed only when what it would send changed; pushes go CDS → EDS → LDS → RDS, and
//! clusters that disappeared are removed only after the routes that used them.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use super::grpc::SotwRequest;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use futures_util::Stream;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use super::resources::{self, CLUSTER, LISTENER, PUSH_ORDER};
use crate::proxies::{Proxies, ProxyState, Registration, now_ms};
use crate::publish::Publisher;

pub struct Ads {
    pub publisher: Arc<Publisher>,
    pub proxies: Arc<Proxies>,
    /// Who may subscribe: ADS serves every Gateway's config, so as MeshSubscribe's role `""`.
    pub access: Arc<crate::subscribe::Access>,
    /// The latest generation's Envoy resources, translated once for every stream.
    cache: Mutex<Option<Arc<Generation>>>,
    /// Subscriptions are interned: a thousand Envoys asking for the same 5,000 clusters share one set.
    subscriptions: Mutex<std::collections::HashMap<u64, std::sync::Weak<BTreeSet<String>>>>,
    /// Streams sending a large answer (an initial sync) at once: a thousand clients connecting
    /// together take turns instead of all holding their answers in memory at the same time.
    pub(super) large_sends: tokio::sync::Semaphore,
}

/// One generation's resources and what changed since the one before, computed once.
pub struct Generation {
    version: u64,
    res: Arc<resources::EnvoyResources>,
    prev: Option<Arc<resources::EnvoyResources>>,
    /// Per type: names added or changed since `prev`…
    changed: BTreeMap<&'static str, BTreeSet<String>>,
    /// …and whether any went away.
    removed: BTreeMap<&'static str, bool>,
    /// Clusters of `prev` this generation dropped (found once, not by every stream).
    removed_clusters: BTreeMap<String, Any>,
    /// Per type: resource name → version (a hash of its bytes), for delta ADS; made on first use.
    versions: std::sync::OnceLock<BTreeMap<&'static str, std::collections::HashMap<String, String>>>,
}

impl Generation {
    pub(super) fn version(&self) -> u64 {
        self.version
    }

    pub(super) fn resources(&self) -> &Arc<resources::EnvoyResources> {
        &self.res
    }

    /// The generation before this one, when there was one.
    pub(super) fn previous(&self) -> Option<&Arc<resources::EnvoyResources>> {
        self.prev.as_ref()
    }

    /// Names of `type_url` added or changed since the previous generation.
    pub(super) fn changed(&self, type_url: &str) -> &BTreeSet<String> {
        &self.changed[type_url]
    }

    /// Whether any resource of `type_url` went away since the previous generation.
    pub(super) fn removed_any(&self, type_url: &str) -> bool {
        self.removed[type_url]
    }

    pub(super) fn versions(&self, type_url: &str) -> &std::collections::HashMap<String, String> {
        let all = self.versions.get_or_init(|| {
            use std::hash::{Hash, Hasher};
            let version = |a: &Any| {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                a.value.hash(&mut h);
                format!("{:016x}", h.finish())
            };
            PUSH_ORDER
                .iter()
                .map(|t| {
                    let mut v: std::collections::HashMap<String, String> = self.res.by_type[t]
                        .iter()
                        .map(|(n, a)| (n.clone(), version(a)))
                        .collect();
                    if *t == LISTENER {
                        v.extend(self.res.api_listeners.iter().map(|(n, a)| (n.clone(), version(a))));
                    }
                    (*t, v)
                })
                .collect()
        });
        &all[type_url]
    }
}

/// A digest of a subscription's names in order (seeded per process, so no client can make its
/// names collide with another's on purpose).
pub(super) fn hash_names(names: &[String]) -> u64 {
    use std::hash::Hasher;
    let mut h = names_hasher();
    for n in names {
        hash_name(&mut h, n.as_bytes());
    }
    h.finish()
}

pub(super) fn names_hasher() -> impl std::hash::Hasher {
    use std::hash::BuildHasher;
    static SEED: std::sync::LazyLock<foldhash::fast::RandomState> = std::sync::LazyLock::new(Default::default);
    SEED.build_hasher()
}

pub(super) fn hash_name(h: &mut impl std::hash::Hasher, name: &[u8]) {
    h.write_usize(name.len());
    h.write(name);
}

impl Ads {
    pub fn new(publisher: Arc<Publisher>, proxies: Arc<Proxies>, access: Arc<crate::subscribe::Access>) -> Self {
        Ads {
            publisher,
            proxies,
            access,
            cache: Mutex::new(None),
            subscriptions: Mutex::new(Default::default()),
            large_sends: tokio::sync::Semaphore::new(16),
        }
    }

    pub(super) fn current(&self) -> Arc<Generation> {
        let cur = self.publisher.current();
        let mut cache = self.cache.lock().unwrap();
        if let Some(g) = &*cache
            && g.version == cur.generation
        {
            return g.clone();
        }
        let res = Arc::new(resources::translate(
            &cur.translation.snapshot,
            &cur.translation.secrets,
        ));
        let prev = cache.as_ref().map(|g| g.res.clone());
        // Once when it appears, not every generation: what Envoy and gRPC clients are not told
        // (a policy that fails closed, a feature they do not get).
        for u in &res.unsupported {
            if !prev.as_ref().is_some_and(|p| p.unsupported.contains(u)) {
                tracing::warn!(generation = cur.generation, "xDS clients are not told: {u}");
            }
        }
        let changed = changed_names(&res, prev.as_deref());
        let removed: BTreeMap<&'static str, bool> = PUSH_ORDER
            .iter()
            .map(|t| {
                let gone = prev
                    .as_ref()
                    .is_some_and(|p| p.by_type[t].keys().any(|n| !res.by_type[t].contains_key(n)));
                (*t, gone)
            })
            .collect();
        let removed_clusters = match &prev {
            Some(p) if removed[CLUSTER] => p.by_type[CLUSTER]
                .iter()
                .filter(|(n, _)| !res.by_type[CLUSTER].contains_key(*n))
                .map(|(n, a)| (n.clone(), a.clone()))
                .collect(),
            _ => BTreeMap::new(),
        };
        let g = Arc::new(Generation {
            version: cur.generation,
            res,
            prev,
            changed,
            removed,
            removed_clusters,
            versions: Default::default(),
        });
        *cache = Some(g.clone());
        g
    }

    /// Registers a stream by the node its first request names (SotW and delta alike).
    pub(super) fn register(
        &self,
        node: Option<&envoy_types::pb::envoy::config::core::v3::Node>,
        peer: &str,
        protocol: &'static str,
    ) -> Result<Registration, Status> {
        let node = node
            .filter(|n| !n.id.is_empty())
            .ok_or_else(|| Status::invalid_argument("the first request of a stream must carry node.id"))?;
        self.proxies.register(ProxyState::connected(
            &node.id,
            &node.cluster,
            &node.user_agent_name,
            peer.to_string(),
            protocol,
        ))
    }

    /// The shared set of `names` (`hash` is their [`hash_names`]).
    pub(super) fn intern(&self, hash: u64, names: &[String]) -> Arc<BTreeSet<String>> {
        let mut subs = self.subscriptions.lock().unwrap();
        // Equal hashes are checked: a collision must not hand one client another's names.
        if let Some(s) = subs.get(&hash).and_then(std::sync::Weak::upgrade)
            && s.len() == names.len()
            && names.iter().all(|n| s.contains(n))
        {
            return s;
        }
        let s = Arc::new(names.iter().cloned().collect::<BTreeSet<String>>());
        subs.retain(|_, w| w.strong_count() > 0);
        subs.insert(hash, Arc::downgrade(&s));
        s
    }
}

#[derive(Default)]
struct TypeState {
    /// `None` until the client asks for this type.
    names: Option<Arc<BTreeSet<String>>>,
    names_hash: u64,
    nonce: u64,
    /// The generation last sent from and the subscription it was sent for: enough to send only
    /// what changed, with nothing copied per client.
    sent_from: Option<Arc<resources::EnvoyResources>>,
    sent_for: u64,
    acked_version: String,
    /// The first nonce of the last (possibly split) answer: a NACK of any part of it counts.
    first_nonce: u64,
}

/// Most bytes of resources in one split answer.
pub(super) const BATCH_BYTES: usize = 16 << 10;

/// `items` in order, cut into runs of at most `max` bytes (a larger item is a run of its own).
pub(super) fn batches<T>(items: Vec<T>, size: impl Fn(&T) -> usize, max: usize) -> Vec<Vec<T>> {
    let mut out: Vec<Vec<T>> = vec![Vec::new()];
    let mut bytes = 0;
    for item in items {
        let n = size(&item);
        if bytes + n > max && !out.last().is_none_or(Vec::is_empty) {
            out.push(Vec::new());
            bytes = 0;
        }
        bytes += n;
        out.last_mut().expect("never empty").push(item);
    }
    out
}

/// One State-of-the-World ADS stream: what each type last sent and the client acked.
struct SotwStream {
    ads: Arc<Ads>,
    types: BTreeMap<String, TypeState>,
    nonce: u64,
    reg: Option<Registration>,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    /// Clusters removed by the newest generation, still sent until the routes moved off them.
    lingering: BTreeMap<String, Any>,
}

/// What a state-of-the-world answer for `type_url` carries now, or `None` when the client
/// already has it (or asked for nothing yet). A client one generation behind gets what changed;
/// named LDS/CDS answers carry every requested resource, EDS/RDS only the changed ones.
fn to_send(st: &mut TypeState, lingering: &BTreeMap<String, Any>, type_url: &str, g: &Generation) -> Option<Vec<Any>> {
    let names = st.names.clone()?;
    let of_type = &g.res.by_type[type_url];
    let lookup = |n: &String| {
        of_type.get(n).or_else(|| {
            if type_url == LISTENER {
                g.res.api_listeners.get(n)
            } else {
                None
            }
        })
    };
    let same_subscription = st.sent_for == st.names_hash;
    let fresh = matches!(&st.sent_from, Some(p) if Arc::ptr_eq(p, &g.res)) && same_subscription;
    let one_behind =
        matches!((&st.sent_from, &g.prev), (Some(p), Some(prev)) if Arc::ptr_eq(p, prev)) && same_subscription;
    if wildcard(type_url, &names) {
        let lingering_clusters = type_url == CLUSTER && !lingering.is_empty();
        let removed = g.removed[type_url];
        if fresh && !lingering_clusters
            || one_behind && g.changed[type_url].is_empty() && !removed && !lingering_clusters
        {
            st.sent_from = Some(g.res.clone());
            return None;
        }
        let mut all: BTreeMap<&String, &Any> = of_type.iter().collect();
        for (n, a) in lingering {
            all.entry(n).or_insert(a);
        }
        return Some(all.into_values().cloned().collect());
    }
    if fresh {
        return None;
    }
    let delta: Vec<&String> = if one_behind {
        g.changed[type_url].iter().filter(|n| names.contains(*n)).collect()
    } else {
        names.iter().collect()
    };
    if delta.is_empty() {
        st.sent_from = Some(g.res.clone());
        return None;
    }
    let full_state = type_url == LISTENER || type_url == CLUSTER;
    let send: Vec<&String> = if full_state { names.iter().collect() } else { delta };
    Some(send.into_iter().filter_map(|n| lookup(n).cloned()).collect())
}

/// Per type, the names whose resource is new in `res` or differs from `prev`'s; API listeners
/// count as listeners.
fn changed_names(
    res: &resources::EnvoyResources,
    prev: Option<&resources::EnvoyResources>,
) -> BTreeMap<&'static str, BTreeSet<String>> {
    let mut changed = BTreeMap::new();
    for t in PUSH_ORDER {
        let before = prev.and_then(|p| p.by_type.get(t));
        let names: BTreeSet<String> = res.by_type[t]
            .iter()
            .filter(|(n, a)| before.and_then(|b| b.get(*n)) != Some(*a))
            .map(|(n, _)| n.clone())
            .collect();
        changed.insert(t, names);
    }
    let api = res
        .api_listeners
        .iter()
        .filter(|(n, a)| prev.is_none_or(|p| p.api_listeners.get(*n) != Some(*a)))
        .map(|(n, _)| n.clone());
    changed.get_mut(LISTENER).expect("every type").extend(api);
    changed
}

fn wildcard(type_url: &str, names: &BTreeSet<String>) -> bool {
    (type_url == LISTENER || type_url == CLUSTER) && (names.is_empty() || names.contains("*"))
}

impl SotwStream {
    async fn send_if_changed(&mut self, type_url: &str, g: &Generation) -> bool {
        let Some(st) = self.types.get_mut(type_url) else {
            return true;
        };
        let Some(resources) = to_send(st, &self.lingering, type_url, g) else {
            return true;
        };
        let full_state = type_url == LISTENER || type_url == CLUSTER;
        st.sent_from = Some(g.res.clone());
        st.sent_for = st.names_hash;
        if let Some(reg) = &self.reg {
            reg.update(|p| p.sent_version = g.version);
        }
        // LDS and CDS answers must be whole; EDS and RDS answers may be split, and are, so no
        // stream's gRPC buffer grows to the size of every endpoint in the mesh.
        let batches = if full_state {
            vec![resources]
        } else {
            batches(resources, prost::Message::encoded_len, BATCH_BYTES)
        };
        st.first_nonce = self.nonce + 1;
        for resources in batches {
            self.nonce += 1;
            st.nonce = self.nonce;
            let resp = DiscoveryResponse {
                version_info: g.version.to_string(),
                resources,
                type_url: type_url.to_string(),
                nonce: self.nonce.to_string(),
                ..Default::default()
            };
            if self.tx.send(Ok(resp)).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Pushes every subscribed type in order; clusters no longer used go last.
    async fn push_all(&mut self) -> bool {
        let g = self.ads.current();
        // Keep clusters the new generation dropped until the routes that used them are replaced.
        self.lingering = match (&g.prev, self.types.get(CLUSTER)) {
            (Some(prev), Some(t)) if t.sent_from.as_ref().is_some_and(|p| Arc::ptr_eq(p, prev)) => {
                g.removed_clusters.clone()
            }
            _ => BTreeMap::new(),
        };
        for t in PUSH_ORDER {
            if !self.send_if_changed(t, &g).await {
                return false;
            }
        }
        if !self.lingering.is_empty() {
            self.lingering.clear();
            if let Some(t) = self.types.get_mut(CLUSTER) {
                t.sent_from = None;
            }
            return self.send_if_changed(CLUSTER, &g).await;
        }
        true
    }

    async fn on_request(&mut self, req: SotwRequest, peer: &str) -> Result<bool, Status> {
        let r = &req.head;
        if self.reg.is_none() {
            self.reg = Some(self.ads.register(r.node.as_ref(), peer, "xDS (SotW)")?);
        }
        let reg = self.reg.as_ref().expect("registered above");
        let st = self.types.entry(r.type_url.clone()).or_default();
        if !r.response_nonce.is_empty() {
            let nonce: u64 = r.response_nonce.parse().unwrap_or(0);
            let in_last_answer = (st.first_nonce..=st.nonce).contains(&nonce);
            // An ACK counts for the last part of the last answer; a NACK for any part of it.
            // Anything older is an answer to an older response: the newer one is on its way.
            if nonce != st.nonce && !(in_last_answer && r.error_detail.is_some()) {
                return Ok(true);
            }
            let version: u64 = r.version_info.parse().unwrap_or(0);
            match &r.error_detail {
                Some(err) => {
                    tracing::warn!(node = %reg.key.0, type_url = %r.type_url, message = %err.message, "xDS NACK");
                    reg.update(|p| {
                        p.last_seen_unix_ms = now_ms();
                        p.rejected_version = Some(version);
                        p.last_rejection = Some(format!("{}: {}", r.type_url, err.message));
                    });
                }
                None => {
                    st.acked_version = r.version_info.clone();
                    reg.update(|p| {
                        p.last_seen_unix_ms = now_ms();
                        p.applied_version = p.applied_version.max(version);
                    });
                }
            }
        }
        // Subscriptions are compared by hash: an ACK repeating 5,000 names allocates nothing.
        let hash = req.names_digest;
        if st.names.is_none() || st.names_hash != hash {
            st.names = Some(self.ads.intern(hash, &req.names()?));
            st.names_hash = hash;
            let g = self.ads.current();
            return Ok(self.send_if_changed(&r.type_url, &g).await);
        }
        Ok(true)
    }
}

pub(super) type SotwResponses = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
pub(super) type DeltaResponses = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

/// One ADS stream, State of the World or delta.
pub(super) trait AdsStream<Req>: Send {
    /// Handles a request; `Ok(false)` ends the stream.
    fn on_request(&mut self, r: Req, peer: &str) -> impl std::future::Future<Output = Result<bool, Status>> + Send;
    /// Pushes a new generation; `false` ends the stream.
    fn push_all(&mut self) -> impl std::future::Future<Output = bool> + Send;
}

impl AdsStream<SotwRequest> for SotwStream {
    fn on_request(
        &mut self,
        r: SotwRequest,
        peer: &str,
    ) -> impl std::future::Future<Output = Result<bool, Status>> + Send {
        SotwStream::on_request(self, r, peer)
    }
    fn push_all(&mut self) -> impl std::future::Future<Output = bool> + Send {
        SotwStream::push_all(self)
    }
}

/// Serves one stream until the client or the operator ends it: requests as they come, and a
/// push for every new generation.
async fn drive<Req, Resp, S: AdsStream<Req>>(
    mut s: S,
    mut inbound: Streaming<Req>,
    mut generations: tokio::sync::watch::Receiver<u64>,
    tx: mpsc::Sender<Result<Resp, Status>>,
    peer: String,
) {
    loop {
        tokio::select! {
            m = inbound.message() => match m {
                Ok(Some(r)) => match s.on_request(r, &peer).await {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(status) => { let _ = tx.send(Err(status)).await; return; }
                },
                _ => return,
            },
            r = generations.changed() => {
                if r.is_err() || !s.push_all().await { return; }
            }
        }
    }
}

/// Serves a State-of-the-World ADS stream.
pub(super) fn stream_sotw(ads: Arc<Ads>, req: Request<Streaming<SotwRequest>>) -> Response<SotwResponses> {
    let peer = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
    let inbound = req.into_inner();
    let (tx, rx) = mpsc::channel(16);
    let generations = ads.publisher.subscribe();
    let s = SotwStream {
        ads,
        types: BTreeMap::new(),
        nonce: 0,
        reg: None,
        tx: tx.clone(),
        lingering: BTreeMap::new(),
    };
    tokio::spawn(drive(s, inbound, generations, tx, peer));
    Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}

/// Serves an incremental (delta) ADS stream.
pub(super) fn stream_delta(ads: Arc<Ads>, req: Request<Streaming<DeltaDiscoveryRequest>>) -> Response<DeltaResponses> {
    let peer = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
    let inbound = req.into_inner();
    // Two answers in flight per stream: the rest are made when the client has read these.
    let (tx, rx) = mpsc::channel(2);
    let mut generations = ads.publisher.subscribe();
    generations.mark_unchanged();
    let s = super::delta::DeltaStream::new(ads, tx.clone());
    tokio::spawn(drive(s, inbound, generations, tx, peer));
    Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
    use ferrum_proto::xds::{CLUSTER, ENDPOINT};
    use prost::Message;
    use tokio::sync::mpsc;

    use super::*;
    use crate::xds::grpc::Read;
    use crate::xds::test_world::{cluster, clusters, node, published, world};

    type Answers = mpsc::Receiver<Result<DiscoveryResponse, Status>>;

    fn stream(ads: &Arc<Ads>) -> (SotwStream, Answers) {
        let (tx, rx) = mpsc::channel(16);
        let s = SotwStream {
            ads: ads.clone(),
            types: BTreeMap::new(),
            nonce: 0,
            reg: None,
            tx,
            lingering: BTreeMap::new(),
        };
        (s, rx)
    }

    fn request(type_url: &str, names: &[String], version: &str, nonce: &str) -> SotwRequest {
        let r = DiscoveryRequest {
            node: node(),
            type_url: type_url.into(),
            resource_names: names.to_vec(),
            version_info: version.into(),
            response_nonce: nonce.into(),
            ..Default::default()
        };
        SotwRequest::read(r.encode_to_vec().into()).unwrap()
    }

    /// (type, names of the resources) of every answer waiting, and the last answer's nonce.
    fn answers(rx: &mut Answers) -> (Vec<(String, BTreeSet<String>)>, String) {
        let mut nonce = String::new();
        let got = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|r| {
                let r = r.unwrap();
                nonce = r.nonce.clone();
                let names = r
                    .resources
                    .iter()
                    .map(|a| match r.type_url.as_str() {
                        CLUSTER => Cluster::decode(&a.value[..]).unwrap().name,
                        _ => ClusterLoadAssignment::decode(&a.value[..]).unwrap().cluster_name,
                    })
                    .collect();
                (r.type_url, names)
            })
            .collect();
        (got, nonce)
    }

    /// SotW CDS answers are whole: a cluster the new generation dropped is still in the first
    /// one (routes may point at it until LDS/RDS arrive) and gone from the last.
    #[tokio::test]
    async fn a_removed_cluster_lingers_until_the_routes_have_moved_off_it() {
        let (publisher, ads) = published(&["echo", "web"], 1);
        let (mut s, mut rx) = stream(&ads);
        assert!(s.on_request(request(CLUSTER, &[], "", ""), "peer").await.unwrap());
        let eds = [cluster("echo"), cluster("web")];
        assert!(s.on_request(request(ENDPOINT, &eds, "", ""), "peer").await.unwrap());
        let (got, _) = answers(&mut rx);
        assert_eq!(
            got,
            vec![
                (CLUSTER.to_string(), clusters(&["echo", "web"])),
                (ENDPOINT.to_string(), clusters(&["echo", "web"]))
            ]
        );

        publisher.publish(world(&["echo"], 2));
        assert!(s.push_all().await);
        let (got, _) = answers(&mut rx);
        assert_eq!(
            got,
            vec![
                (CLUSTER.to_string(), clusters(&["echo", "web"])),
                (ENDPOINT.to_string(), clusters(&["echo"])),
                (CLUSTER.to_string(), clusters(&["echo"])),
            ]
        );
        // Nothing new: nothing sent.
        assert!(s.push_all().await);
        assert!(answers(&mut rx).0.is_empty());
    }

    #[tokio::test]
    async fn acks_send_nothing_and_a_nack_of_the_last_answer_is_recorded() {
        let (publisher, ads) = published(&["echo"], 1);
        let version = publisher.current().generation.to_string();
        let (mut s, mut rx) = stream(&ads);
        s.on_request(request(CLUSTER, &[], "", ""), "peer").await.unwrap();
        let (_, nonce) = answers(&mut rx);
        // The ACK repeats the subscription: no answer, and the proxy is at this version.
        s.on_request(request(CLUSTER, &[], &version, &nonce), "peer")
            .await
            .unwrap();
        assert!(answers(&mut rx).0.is_empty());
        let p = &ads.proxies.list()[0];
        assert_eq!(
            (p.applied_version.to_string(), p.last_rejection.clone()),
            (version, None)
        );

        let mut nack = DiscoveryRequest {
            node: node(),
            type_url: CLUSTER.into(),
            response_nonce: "41".into(),
            error_detail: Some(envoy_types::pb::google::rpc::Status {
                message: "bad cluster".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        // A NACK of an answer this stream never sent is not the proxy's opinion of this one.
        s.on_request(SotwRequest::read(nack.encode_to_vec().into()).unwrap(), "peer")
            .await
            .unwrap();
        assert_eq!(ads.proxies.list()[0].last_rejection, None);
        nack.response_nonce = nonce;
        s.on_request(SotwRequest::read(nack.encode_to_vec().into()).unwrap(), "peer")
            .await
            .unwrap();
        assert_eq!(
            ads.proxies.list()[0].last_rejection.as_deref(),
            Some(&*format!("{CLUSTER}: bad cluster"))
        );
    }
}
