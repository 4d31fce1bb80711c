//! State-of-the-World ADS: every request names the whole subscription of its type; LDS and CDS
//! answers are the whole set, RDS, EDS and SDS answers replace the resources they carry.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use tokio::sync::mpsc;

use super::map::{CLUSTER, EnvoyResources, LISTENER, MapError};
use super::{Settings, XdsError};
use crate::dataplane::Dataplane;

/// Per type: the last accepted version, the last nonce seen and the names subscribed.
#[derive(Default)]
struct TypeState {
    version: String,
    nonce: String,
    names: Vec<String>,
}

struct Client {
    tx: mpsc::UnboundedSender<DiscoveryRequest>,
    types: HashMap<&'static str, TypeState>,
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
            error_detail: error.map(super::nack_status),
            ..Default::default()
        });
    }

    /// Subscribes to exactly `names` of `type_url` when that is not what it asks for already.
    fn follow(&mut self, type_url: &'static str, names: BTreeSet<String>) {
        let names: Vec<String> = names.into_iter().collect();
        let st = self.types.entry(type_url).or_default();
        if st.names != names {
            st.names = names;
            self.request(type_url, None);
        }
    }
}

/// `state` with one response taken in.
fn take(state: &EnvoyResources, resp: &DiscoveryResponse, type_url: &str) -> Result<EnvoyResources, MapError> {
    let mut next = state.clone();
    if type_url == LISTENER || type_url == CLUSTER {
        super::remove(&mut next, type_url, None);
    }
    for a in &resp.resources {
        super::insert(&mut next, type_url, a)?;
    }
    super::prune(&mut next);
    Ok(next)
}

pub(super) async fn session(s: &Settings, dp: &Arc<Dataplane>) -> Result<(), XdsError> {
    let mut ads = super::client(s).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    let mut client = Client {
        tx,
        types: Default::default(),
        node: Some(super::node(s)),
    };
    client.request(LISTENER, None);
    client.request(CLUSTER, None);
    let req = super::with_token(tokio_stream::wrappers::UnboundedReceiverStream::new(rx), s);
    let mut stream = ads.stream_aggregated_resources(req).await?.into_inner();
    tracing::info!(url = %s.url, node = %s.node_id, "subscribed to the xDS server");
    let mut held = super::Held::new(dp);
    while let Some(resp) = stream.message().await? {
        let Some(type_url) = super::type_of(&resp.type_url) else {
            tracing::warn!(type_url = %resp.type_url, "ignoring a response of a type never asked for");
            continue;
        };
        client.types.entry(type_url).or_default().nonce = resp.nonce.clone();
        match held.take(type_url, take(&held.resources, &resp, type_url), dp).await {
            Ok(applied) => {
                if let Some(version) = applied {
                    tracing::info!(version, type_url, server_version = %resp.version_info, "applied xDS config");
                }
                client.types.entry(type_url).or_default().version = resp.version_info.clone();
                client.request(type_url, None);
                for (t, names) in super::wanted(&held.resources) {
                    client.follow(t, names);
                }
            }
            Err(e) => {
                tracing::error!(type_url, server_version = %resp.version_info, error = %e, "NACK: still serving the last good config");
                client.request(type_url, Some(e.to_string()));
            }
        }
    }
    Err(XdsError::Closed)
}
