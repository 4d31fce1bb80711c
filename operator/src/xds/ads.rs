//! State-of-the-World ADS: per stream and type, the subscription, the last nonce and version sent
//! and the last one acknowledged. A NACK is recorded with Envoy's message and nothing is resent
//! until the config changes; stale nonces are ignored; LDS/CDS are wildcard unless named; a
//! type is pushed only when what it would send changed; pushes go CDS → EDS → LDS → RDS, and
//! clusters that disappeared are removed only after the routes that used them.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryService;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use futures_util::Stream;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use super::resources::{self, CLUSTER, LISTENER, PUSH_ORDER};
use crate::publish::Publisher;
use crate::subscribe::{Proxies, ProxyState, Registration, now_ms};

pub struct Ads {
    pub publisher: Arc<Publisher>,
    pub proxies: Arc<Proxies>,
    /// Envoy resources of the latest generation, translated once for every stream.
    cache: Mutex<Option<(u64, Arc<resources::Resources>)>>,
}

impl Ads {
    pub fn new(publisher: Arc<Publisher>, proxies: Arc<Proxies>) -> Self {
        Ads {
            publisher,
            proxies,
            cache: Mutex::new(None),
        }
    }

    fn current(&self) -> (u64, Arc<resources::Resources>) {
        let cur = self.publisher.current();
        let mut cache = self.cache.lock().unwrap();
        if let Some((g, r)) = &*cache
            && *g == cur.generation
        {
            return (*g, r.clone());
        }
        let r = Arc::new(resources::translate(&cur.full.snapshot));
        for u in &r.unsupported {
            tracing::debug!(generation = cur.generation, "xDS: {u}");
        }
        *cache = Some((cur.generation, r.clone()));
        (cur.generation, r)
    }
}

#[derive(Default)]
struct TypeState {
    /// `None` until the client asks for this type.
    names: Option<BTreeSet<String>>,
    nonce: u64,
    sent: Option<BTreeMap<String, Any>>,
    acked_version: String,
}

struct Stream_ {
    ads: Arc<Ads>,
    types: BTreeMap<String, TypeState>,
    nonce: u64,
    reg: Option<Registration>,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    /// Clusters still sent because routes in flight may use them.
    lingering: BTreeMap<String, Any>,
}

fn wildcard(type_url: &str, names: &BTreeSet<String>) -> bool {
    (type_url == LISTENER || type_url == CLUSTER) && (names.is_empty() || names.contains("*"))
}

impl Stream_ {
    /// What this type would send now, for this subscription.
    fn select(&self, type_url: &str, all: &resources::Resources) -> Option<BTreeMap<String, Any>> {
        let st = self.types.get(type_url)?;
        let names = st.names.as_ref()?;
        let of_type = all.by_type.get(type_url)?;
        let mut out: BTreeMap<String, Any> = if wildcard(type_url, names) {
            of_type.clone()
        } else {
            let api = if type_url == LISTENER {
                Some(&all.api_listeners)
            } else {
                None
            };
            names
                .iter()
                .filter_map(|n| {
                    of_type
                        .get(n)
                        .or_else(|| api.and_then(|a| a.get(n)))
                        .map(|a| (n.clone(), a.clone()))
                })
                .collect()
        };
        if type_url == CLUSTER {
            for (n, a) in &self.lingering {
                out.entry(n.clone()).or_insert_with(|| a.clone());
            }
        }
        Some(out)
    }

    async fn send_if_changed(&mut self, type_url: &str, version: u64, all: &resources::Resources) -> bool {
        let Some(selected) = self.select(type_url, all) else {
            return true;
        };
        let st = self.types.get_mut(type_url).expect("selected");
        if st.sent.as_ref() == Some(&selected) {
            return true;
        }
        self.nonce += 1;
        st.nonce = self.nonce;
        let resp = DiscoveryResponse {
            version_info: version.to_string(),
            resources: selected.values().cloned().collect(),
            type_url: type_url.to_string(),
            nonce: self.nonce.to_string(),
            ..Default::default()
        };
        st.sent = Some(selected);
        if let Some(reg) = &self.reg {
            reg.update(|p| p.sent_version = version);
        }
        self.tx.send(Ok(resp)).await.is_ok()
    }

    /// Pushes every subscribed type in order; clusters no longer used go last.
    async fn push_all(&mut self) -> bool {
        let (version, all) = self.ads.current();
        for t in PUSH_ORDER {
            if !self.send_if_changed(t, version, &all).await {
                return false;
            }
        }
        if !self.lingering.is_empty() {
            self.lingering.clear();
            return self.send_if_changed(CLUSTER, version, &all).await;
        }
        true
    }

    async fn on_request(&mut self, r: DiscoveryRequest, peer: &str) -> Result<bool, Status> {
        if self.reg.is_none() {
            let node = r.node.as_ref().map(|n| n.id.clone()).filter(|n| !n.is_empty());
            let Some(node) = node else {
                return Err(Status::invalid_argument(
                    "the first DiscoveryRequest must carry node.id",
                ));
            };
            let now = now_ms();
            self.reg = Some(self.ads.proxies.register(ProxyState {
                node_id: node,
                role: r.node.as_ref().map(|n| n.cluster.clone()).unwrap_or_default(),
                proxy_version: r.node.as_ref().map(|n| n.user_agent_name.clone()).unwrap_or_default(),
                peer: peer.to_string(),
                protocol: "xDS (SotW)",
                connected_since_unix_ms: now,
                last_seen_unix_ms: now,
                sent_version: 0,
                applied_version: 0,
                applied_hash: String::new(),
                last_rejection: None,
                rejected_version: None,
            })?);
        }
        let reg = self.reg.as_ref().expect("registered above");
        tracing::debug!(node = %reg.key.0, type_url = %r.type_url, names = ?r.resource_names, nonce = %r.response_nonce, "xDS request");
        let st = self.types.entry(r.type_url.clone()).or_default();
        if !r.response_nonce.is_empty() {
            if r.response_nonce != st.nonce.to_string() {
                // An answer to an older response: the newer one is on its way.
                return Ok(true);
            }
            let version: u64 = r.version_info.parse().unwrap_or(0);
            match &r.error_detail {
                Some(err) => {
                    tracing::warn!(node = %reg.key.0, type_url = %r.type_url, message = %err.message, "xDS NACK");
                    reg.update(|p| {
                        p.last_seen_unix_ms = now_ms();
                        p.rejected_version = Some(st.nonce);
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
        let names: BTreeSet<String> = r.resource_names.iter().cloned().collect();
        if st.names.as_ref() != Some(&names) {
            st.names = Some(names);
            let (version, all) = self.ads.current();
            return Ok(self.send_if_changed(&r.type_url, version, &all).await);
        }
        Ok(true)
    }
}

type SotwStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
type DeltaStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

/// The gRPC face of [`Ads`].
pub struct AdsService(pub Arc<Ads>);

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsService {
    type StreamAggregatedResourcesStream = SotwStream;
    type DeltaAggregatedResourcesStream = DeltaStream;

    async fn stream_aggregated_resources(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<SotwStream>, Status> {
        let peer = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let mut s = Stream_ {
            ads: self.0.clone(),
            types: BTreeMap::new(),
            nonce: 0,
            reg: None,
            tx: tx.clone(),
            lingering: BTreeMap::new(),
        };
        let mut generations = self.0.publisher.subscribe();
        tokio::spawn(async move {
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
                        if r.is_err() { return; }
                        // Keep the clusters sent so far until the new routes are out.
                        if let Some(sent) = s.types.get(CLUSTER).and_then(|t| t.sent.clone()) {
                            s.lingering = sent;
                        }
                        if !s.push_all().await { return; }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        _req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaStream>, Status> {
        Err(Status::unimplemented(
            "incremental (delta) ADS is not implemented yet; use State-of-the-World ADS",
        ))
    }
}
