//! xDS mode: ferrum-dp as a State-of-the-World ADS client of any xDS server. Listeners and
//! clusters are wildcard subscriptions; the route configurations and load assignments they name
//! are subscribed to as they appear. Every response is mapped into a snapshot ([`map`]) and
//! applied through the same path as a file reload; what cannot be mapped or applied is NACKed
//! with the reason, and the last good config keeps serving.

pub mod map;

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use tokio::sync::mpsc;

use self::map::{CLUSTER, ENDPOINT, EnvoyResources, LISTENER, MapError, ROUTE, RouteSource, SECRET};
use crate::dataplane::Dataplane;

#[derive(Debug, Clone)]
pub struct Settings {
    pub url: String,
    pub node_id: String,
    /// `node.cluster` towards the server.
    pub cluster: String,
    /// Sent as `authorization: Bearer …` (the operator's `--token`).
    pub token: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    #[error("cannot connect to {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("xDS server: {0}")]
    Status(#[from] tonic::Status),
    #[error("xDS server closed the stream")]
    Closed,
}

/// Why a response is refused (its text goes back in the NACK); the last good config serves on.
#[derive(Debug, thiserror::Error)]
enum Nack {
    #[error(transparent)]
    Map(#[from] MapError),
    #[error(transparent)]
    Apply(#[from] crate::dataplane::ApplyError),
    #[error("applying the snapshot failed: {0}")]
    Crashed(String),
}

/// Subscribes forever, reconnecting with exponential backoff and jitter.
pub async fn run(settings: Settings, dp: Arc<Dataplane>) {
    let (s, d) = (&settings, &dp);
    super::reconnecting("xDS stream", move || session(s, d)).await
}

/// Per type: the last accepted version, the last nonce seen and the names subscribed.
#[derive(Default)]
struct TypeState {
    version: String,
    nonce: String,
    names: Vec<String>,
}

struct Client {
    tx: mpsc::UnboundedSender<DiscoveryRequest>,
    types: std::collections::HashMap<&'static str, TypeState>,
    node: Option<Node>,
}

impl Client {
    fn request(&mut self, type_url: &'static str, error: Option<String>) {
        let st = self.types.entry(type_url).or_default();
        let _ = self.tx.send(DiscoveryRequest {
            version_info: st.version.clone(),
            node: self.node.take(),
            resource_names: st.names.clone(),
            type_url: type_url.into(),
            response_nonce: st.nonce.clone(),
            error_detail: error.map(|message| RpcStatus {
                code: tonic::Code::InvalidArgument as i32,
                message,
                ..Default::default()
            }),
            ..Default::default()
        });
    }

    /// Subscribes to exactly `names` of `type_url` when that is not what it asks for already.
    fn follow(&mut self, type_url: &'static str, mut names: Vec<String>) {
        names.sort();
        names.dedup();
        let st = self.types.entry(type_url).or_default();
        if st.names != names {
            st.names = names;
            self.request(type_url, None);
        }
    }
}

fn type_of(url: &str) -> Option<&'static str> {
    [LISTENER, ROUTE, CLUSTER, ENDPOINT, SECRET]
        .into_iter()
        .find(|t| *t == url)
}

/// `state` with one response taken in: LDS and CDS answers are the whole set, RDS, EDS and SDS
/// answers replace the resources they carry.
fn take(state: &EnvoyResources, resp: &DiscoveryResponse, type_url: &str) -> Result<EnvoyResources, MapError> {
    let mut next = state.clone();
    match type_url {
        LISTENER => {
            next.listeners.clear();
            for a in &resp.resources {
                let l: envoy_types::pb::envoy::config::listener::v3::Listener = map::decode(a, LISTENER)?;
                next.listeners.insert(l.name.clone(), l);
            }
        }
        CLUSTER => {
            next.clusters.clear();
            for a in &resp.resources {
                let c: envoy_types::pb::envoy::config::cluster::v3::Cluster = map::decode(a, CLUSTER)?;
                next.clusters.insert(c.name.clone(), c);
            }
        }
        ROUTE => {
            for a in &resp.resources {
                let r: envoy_types::pb::envoy::config::route::v3::RouteConfiguration = map::decode(a, ROUTE)?;
                next.routes.insert(r.name.clone(), r);
            }
        }
        SECRET => {
            for a in &resp.resources {
                let s: envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret = map::decode(a, SECRET)?;
                next.secrets.insert(s.name.clone(), s);
            }
        }
        _ => {
            for a in &resp.resources {
                let e: envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment = map::decode(a, ENDPOINT)?;
                next.endpoints.insert(e.cluster_name.clone(), e);
            }
        }
    }
    // What nothing names any more goes.
    let routes: Vec<String> = route_names(&next);
    next.routes.retain(|n, _| routes.contains(n));
    next.endpoints.retain(|n, _| next.clusters.contains_key(n));
    let secrets = sds_names(&next);
    next.secrets.retain(|n, _| secrets.contains(n));
    Ok(next)
}

/// The SDS secrets the listeners name (a listener that cannot be mapped names none; it is
/// NACKed when the snapshot is made).
fn sds_names(r: &EnvoyResources) -> Vec<String> {
    r.listeners
        .values()
        .filter_map(|l| map::listener_tls(l).ok().flatten())
        .flatten()
        .collect()
}

fn route_names(r: &EnvoyResources) -> Vec<String> {
    r.listeners
        .values()
        .filter_map(|l| match map::listener_routes(l) {
            Ok(RouteSource::Rds(name)) => Some(name),
            _ => None,
        })
        .collect()
}

fn eds_names(r: &EnvoyResources) -> Vec<String> {
    use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType};
    r.clusters
        .values()
        .filter(|c| matches!(c.cluster_discovery_type, Some(ClusterDiscoveryType::Type(t)) if t == DiscoveryType::Eds as i32))
        .map(|c| c.name.clone())
        .collect()
}

async fn session(s: &Settings, dp: &Arc<Dataplane>) -> Result<(), XdsError> {
    let channel = super::connect(&s.url).await.map_err(|source| XdsError::Connect {
        url: s.url.clone(),
        source,
    })?;
    let mut ads = AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(256 << 20);
    let (tx, rx) = mpsc::unbounded_channel();
    let mut client = Client {
        tx,
        types: Default::default(),
        node: Some(Node {
            id: s.node_id.clone(),
            cluster: s.cluster.clone(),
            user_agent_name: "ferrum-dp".into(),
            ..Default::default()
        }),
    };
    client.request(LISTENER, None);
    client.request(CLUSTER, None);
    let mut req = tonic::Request::new(tokio_stream::wrappers::UnboundedReceiverStream::new(rx));
    if let Some(t) = &s.token
        && let Ok(v) = format!("Bearer {t}").parse()
    {
        req.metadata_mut().insert("authorization", v);
    }
    let mut stream = ads.stream_aggregated_resources(req).await?.into_inner();
    tracing::info!(url = %s.url, node = %s.node_id, "subscribed to the xDS server");
    let mut state = EnvoyResources::default();
    let mut version = dp.shared.config.load().snapshot.version;
    while let Some(resp) = stream.message().await? {
        let Some(type_url) = type_of(&resp.type_url) else {
            tracing::warn!(type_url = %resp.type_url, "ignoring a response of a type never asked for");
            continue;
        };
        client.types.entry(type_url).or_default().nonce = resp.nonce.clone();
        // (the new state, the version applied if the config is complete) or why not.
        let outcome = match take(&state, &resp, type_url) {
            Err(e) => Err(Nack::Map(e)),
            Ok(next) => match map::snapshot(&next, version + 1) {
                Err(e) => Err(Nack::Map(e)),
                Ok(None) => Ok((next, None)),
                Ok(Some((snap, secrets))) => {
                    let dp = dp.clone();
                    let applied = tokio::task::spawn_blocking(move || dp.apply(snap, secrets))
                        .await
                        .map_err(|e| Nack::Crashed(e.to_string()))
                        .and_then(|r| r.map_err(Nack::Apply));
                    applied.map(|()| (next, Some(version + 1)))
                }
            },
        };
        match outcome {
            Ok((next, applied)) => {
                state = next;
                if let Some(v) = applied {
                    version = v;
                    tracing::info!(version, type_url, server_version = %resp.version_info, "applied xDS config");
                }
                client.types.entry(type_url).or_default().version = resp.version_info.clone();
                client.request(type_url, None);
                client.follow(ROUTE, route_names(&state));
                client.follow(ENDPOINT, eds_names(&state));
                client.follow(SECRET, sds_names(&state));
            }
            Err(e) => {
                tracing::error!(type_url, server_version = %resp.version_info, error = %e, "NACK: still serving the last good config");
                client.request(type_url, Some(e.to_string()));
            }
        }
    }
    Err(XdsError::Closed)
}
