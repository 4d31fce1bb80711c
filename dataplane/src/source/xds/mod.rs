//! xDS mode: ferrum-dp as an ADS client of any xDS server, State of the World ([`sotw`]) or
//! incremental ([`delta`]). Listeners and clusters are wildcard subscriptions; the route
//! configurations, load assignments and secrets they name are subscribed to as they appear (and
//! dropped when nothing names them any more). Every response is taken into the resources held,
//! mapped into a snapshot ([`map`]) and applied through the same path as a file reload; what
//! cannot be mapped or applied is NACKed with the reason, and the last good config keeps serving.

mod delta;
pub mod map;
mod rate_limit;
mod sotw;
mod traffic;

use std::collections::BTreeSet;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use tonic::transport::Channel;

use self::map::{CLUSTER, ENDPOINT, EnvoyResources, LISTENER, MapError, ROUTE, RouteSource, SECRET};
use crate::dataplane::Dataplane;

/// Which ADS protocol to speak.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// State of the World: every LDS/CDS answer is the whole set.
    #[default]
    Sotw,
    /// Incremental (delta): answers carry what changed and the names removed.
    Delta,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub url: String,
    pub node_id: String,
    /// `node.cluster` towards the server.
    pub cluster: String,
    /// Sent as `authorization: Bearer …` (the operator's `--token`).
    pub token: Option<String>,
    pub protocol: Protocol,
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

impl super::SessionError for XdsError {
    fn pushback(&self) -> Option<std::time::Duration> {
        match self {
            XdsError::Status(s) => super::pushback_of(s),
            _ => None,
        }
    }
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
    match settings.protocol {
        Protocol::Sotw => super::reconnecting("xDS stream", move || sotw::session(s, d)).await,
        Protocol::Delta => super::reconnecting("delta xDS stream", move || delta::session(s, d)).await,
    }
}

/// An ADS client on a new channel to the server.
async fn client(s: &Settings) -> Result<AggregatedDiscoveryServiceClient<Channel>, XdsError> {
    let channel = super::connect(&s.url).await.map_err(|source| XdsError::Connect {
        url: s.url.clone(),
        source,
    })?;
    Ok(AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(256 << 20))
}

/// The request stream, with the bearer token when there is one.
fn with_token<T>(stream: T, s: &Settings) -> tonic::Request<T> {
    let mut req = tonic::Request::new(stream);
    if let Some(t) = &s.token
        && let Ok(v) = format!("Bearer {t}").parse()
    {
        req.metadata_mut().insert("authorization", v);
    }
    req
}

/// Who we are, sent on the first request of a stream.
fn node(s: &Settings) -> Node {
    Node {
        id: s.node_id.clone(),
        cluster: s.cluster.clone(),
        user_agent_name: "ferrum-dp".into(),
        ..Default::default()
    }
}

fn nack_status(message: String) -> RpcStatus {
    RpcStatus {
        code: tonic::Code::InvalidArgument as i32,
        message,
        ..Default::default()
    }
}

fn type_of(url: &str) -> Option<&'static str> {
    [LISTENER, ROUTE, CLUSTER, ENDPOINT, SECRET]
        .into_iter()
        .find(|t| *t == url)
}

/// Takes one resource of `type_url` into `r`, replacing any of the same name.
fn insert(r: &mut EnvoyResources, type_url: &str, a: &Any) -> Result<(), MapError> {
    match type_url {
        LISTENER => {
            let l: envoy_types::pb::envoy::config::listener::v3::Listener = map::decode(a, LISTENER)?;
            r.listeners.insert(l.name.clone(), l);
        }
        CLUSTER => {
            let c: envoy_types::pb::envoy::config::cluster::v3::Cluster = map::decode(a, CLUSTER)?;
            r.clusters.insert(c.name.clone(), c);
        }
        ROUTE => {
            let rc: envoy_types::pb::envoy::config::route::v3::RouteConfiguration = map::decode(a, ROUTE)?;
            r.routes.insert(rc.name.clone(), rc);
        }
        SECRET => {
            let s: envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret = map::decode(a, SECRET)?;
            r.secrets.insert(s.name.clone(), s);
        }
        _ => {
            let e: envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment = map::decode(a, ENDPOINT)?;
            r.endpoints.insert(e.cluster_name.clone(), e);
        }
    }
    Ok(())
}

/// Forgets every resource of `type_url` named in `names` (all of them for `None`).
fn remove(r: &mut EnvoyResources, type_url: &str, names: Option<&[String]>) {
    fn drop_from<V>(m: &mut std::collections::BTreeMap<String, V>, names: Option<&[String]>) {
        match names {
            None => m.clear(),
            Some(names) => names.iter().for_each(|n| {
                m.remove(n);
            }),
        }
    }
    match type_url {
        LISTENER => drop_from(&mut r.listeners, names),
        CLUSTER => drop_from(&mut r.clusters, names),
        ROUTE => drop_from(&mut r.routes, names),
        SECRET => drop_from(&mut r.secrets, names),
        _ => drop_from(&mut r.endpoints, names),
    }
}

/// Drops the route configurations, load assignments and secrets that no listener or cluster
/// names any more.
fn prune(r: &mut EnvoyResources) {
    let routes = route_names(r);
    r.routes.retain(|n, _| routes.contains(n));
    let clusters: BTreeSet<String> = r.clusters.keys().cloned().collect();
    r.endpoints.retain(|n, _| clusters.contains(n));
    let secrets = sds_names(r);
    r.secrets.retain(|n, _| secrets.contains(n));
}

/// The SDS secrets the listeners and the clusters' client certificates name (a resource that
/// cannot be mapped names none; it is NACKed when the snapshot is made).
fn sds_names(r: &EnvoyResources) -> BTreeSet<String> {
    r.listeners
        .values()
        .filter_map(|l| map::listener_tls(l).ok().flatten())
        .flatten()
        .chain(r.clusters.values().filter_map(map::client_certificate_sds))
        .collect()
}

fn route_names(r: &EnvoyResources) -> BTreeSet<String> {
    r.listeners
        .values()
        .filter_map(|l| match map::listener_routes(l) {
            Ok(RouteSource::Rds(name)) => Some(name),
            _ => None,
        })
        .collect()
}

fn eds_names(r: &EnvoyResources) -> BTreeSet<String> {
    use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType};
    r.clusters
        .values()
        .filter(|c| matches!(c.cluster_discovery_type, Some(ClusterDiscoveryType::Type(t)) if t == DiscoveryType::Eds as i32))
        .map(|c| c.name.clone())
        .collect()
}

/// The names of each dependent type that the resources held call for.
fn wanted(r: &EnvoyResources) -> [(&'static str, BTreeSet<String>); 3] {
    [
        (ROUTE, route_names(r)),
        (ENDPOINT, eds_names(r)),
        (SECRET, sds_names(r)),
    ]
}

/// The resources held, the config version they last produced, and whether this session's
/// server has answered for clusters yet.
struct Held {
    resources: EnvoyResources,
    version: u64,
    clusters_answered: bool,
}

impl Held {
    fn new(dp: &Dataplane) -> Held {
        Held {
            resources: EnvoyResources::default(),
            version: dp.shared.config.load().snapshot.version,
            clusters_answered: false,
        }
    }

    /// Holds `next` (the resources held with an answer of `type_url` taken in) if it maps and
    /// applies; the version applied, or `None` while something named has not arrived yet. On
    /// an error nothing changes.
    async fn take(
        &mut self,
        type_url: &str,
        next: Result<EnvoyResources, MapError>,
        dp: &Arc<Dataplane>,
    ) -> Result<Option<u64>, Nack> {
        self.clusters_answered |= type_url == CLUSTER;
        let next = next?;
        let applied = apply(&next, self.version, self.clusters_answered, dp).await?;
        self.resources = next;
        if let Some(v) = applied {
            self.version = v;
        }
        Ok(applied)
    }
}

/// Maps `next` and applies it as config `version + 1` when it is complete. The version now
/// serving if it was applied, `None` while something named has not arrived yet — including,
/// until the server has answered for clusters (a reconnected session, a server that sends
/// listeners first), a cluster a route names: the config serving keeps serving rather than a
/// window of 500s.
async fn apply(
    next: &EnvoyResources,
    version: u64,
    clusters_answered: bool,
    dp: &Arc<Dataplane>,
) -> Result<Option<u64>, Nack> {
    let unknown = std::cell::Cell::new(false);
    let Some((snap, secrets)) = map::snapshot_noting(next, version + 1, &unknown)? else {
        return Ok(None);
    };
    if unknown.get() && !clusters_answered {
        return Ok(None);
    }
    let dp = dp.clone();
    tokio::task::spawn_blocking(move || dp.apply(snap, secrets))
        .await
        .map_err(|e| Nack::Crashed(e.to_string()))??;
    Ok(Some(version + 1))
}
