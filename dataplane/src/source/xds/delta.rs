//! Incremental ADS (delta xDS): a subscription changes by the names it adds and drops, and an
//! answer carries only the resources that changed plus the names removed, so a large config is
//! not resent whole when one cluster's endpoints move. Listeners and clusters are wildcard
//! subscriptions (the first request of their type names nothing).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use tokio::sync::mpsc;

use super::map::{CLUSTER, EnvoyResources, LISTENER, MapError};
use super::{Settings, XdsError};
use crate::dataplane::Dataplane;

struct Client {
    tx: mpsc::UnboundedSender<DeltaDiscoveryRequest>,
    /// Per type named explicitly (routes, endpoints, secrets): the names subscribed.
    subscribed: HashMap<&'static str, BTreeSet<String>>,
    /// Sent on the stream's first request only.
    node: Option<Node>,
}

impl Client {
    fn new(tx: mpsc::UnboundedSender<DeltaDiscoveryRequest>, node: Node) -> Client {
        Client {
            tx,
            subscribed: HashMap::new(),
            node: Some(node),
        }
    }

    fn send(&mut self, mut r: DeltaDiscoveryRequest) {
        r.node = self.node.take();
        let _ = self.tx.send(r);
    }

    /// Subscribes to every resource of `type_url`.
    fn wildcard(&mut self, type_url: &'static str) {
        self.send(DeltaDiscoveryRequest {
            type_url: type_url.into(),
            ..Default::default()
        });
    }

    /// Answers the response `nonce`: an ACK, or a NACK with `error`.
    fn answer(&mut self, type_url: &'static str, nonce: &str, error: Option<String>) {
        self.send(DeltaDiscoveryRequest {
            type_url: type_url.into(),
            response_nonce: nonce.into(),
            error_detail: error.map(super::nack_status),
            ..Default::default()
        });
    }

    /// Subscribes to exactly `wanted` of `type_url`: asks for the names it lacks and drops the
    /// ones no longer wanted, in one request, or sends nothing when nothing changed.
    fn follow(&mut self, type_url: &'static str, wanted: BTreeSet<String>) {
        let have = self.subscribed.entry(type_url).or_default();
        let subscribe: Vec<String> = wanted.difference(have).cloned().collect();
        let unsubscribe: Vec<String> = have.difference(&wanted).cloned().collect();
        if subscribe.is_empty() && unsubscribe.is_empty() {
            return;
        }
        *have = wanted;
        self.send(DeltaDiscoveryRequest {
            type_url: type_url.into(),
            resource_names_subscribe: subscribe,
            resource_names_unsubscribe: unsubscribe,
            ..Default::default()
        });
    }
}

/// `state` with one answer taken in: the resources it carries added or replaced, the names it
/// removes gone, and what only those named goes with them.
fn take(state: &EnvoyResources, resp: &DeltaDiscoveryResponse, type_url: &str) -> Result<EnvoyResources, MapError> {
    let mut next = state.clone();
    for r in &resp.resources {
        // A resource without a body only renews its TTL.
        if let Some(a) = &r.resource {
            super::insert(&mut next, type_url, a)?;
        }
    }
    super::remove(&mut next, type_url, Some(&resp.removed_resources));
    super::prune(&mut next);
    Ok(next)
}

pub(super) async fn session(s: &Settings, dp: &Arc<Dataplane>) -> Result<(), XdsError> {
    let mut ads = super::client(s).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    let mut client = Client::new(tx, super::node(s));
    client.wildcard(LISTENER);
    client.wildcard(CLUSTER);
    let req = super::with_token(tokio_stream::wrappers::UnboundedReceiverStream::new(rx), s);
    let mut stream = ads.delta_aggregated_resources(req).await?.into_inner();
    tracing::info!(url = %s.url, node = %s.node_id, "subscribed to the xDS server (delta)");
    let mut held = super::Held::new(dp);
    while let Some(resp) = stream.message().await? {
        let Some(type_url) = super::type_of(&resp.type_url) else {
            tracing::warn!(type_url = %resp.type_url, "ignoring a response of a type never asked for");
            continue;
        };
        match held.take(type_url, take(&held.resources, &resp, type_url), dp).await {
            Ok(applied) => {
                if let Some(version) = applied {
                    tracing::info!(version, type_url, server_version = %resp.system_version_info, changed = resp.resources.len(), removed = resp.removed_resources.len(), "applied xDS config");
                }
                client.answer(type_url, &resp.nonce, None);
                for (t, names) in super::wanted(&held.resources) {
                    client.follow(t, names);
                }
            }
            Err(e) => {
                tracing::error!(type_url, server_version = %resp.system_version_info, error = %e, "NACK: still serving the last good config");
                client.answer(type_url, &resp.nonce, Some(e.to_string()));
            }
        }
    }
    Err(XdsError::Closed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType};
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use envoy_types::pb::envoy::service::discovery::v3::Resource;
    use envoy_types::pb::google::protobuf::Any;
    use prost::Message;

    use crate::source::xds::map::ENDPOINT;

    fn any(type_url: &str, m: &impl Message) -> Any {
        Any {
            type_url: type_url.into(),
            value: m.encode_to_vec(),
        }
    }

    fn eds_cluster(name: &str) -> Resource {
        let c = Cluster {
            name: name.into(),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
            ..Default::default()
        };
        Resource {
            name: name.into(),
            resource: Some(any(CLUSTER, &c)),
            ..Default::default()
        }
    }

    fn assignment(cluster: &str) -> Resource {
        let e = ClusterLoadAssignment {
            cluster_name: cluster.into(),
            ..Default::default()
        };
        Resource {
            name: cluster.into(),
            resource: Some(any(ENDPOINT, &e)),
            ..Default::default()
        }
    }

    fn answer(type_url: &str, resources: Vec<Resource>, removed: &[&str]) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            type_url: type_url.into(),
            resources,
            removed_resources: removed.iter().map(|n| n.to_string()).collect(),
            nonce: "n".into(),
            ..Default::default()
        }
    }

    fn names<V>(m: &std::collections::BTreeMap<String, V>) -> Vec<&str> {
        m.keys().map(String::as_str).collect()
    }

    #[test]
    fn an_answer_adds_replaces_and_removes_only_what_it_names() {
        let s = EnvoyResources::default();
        let s = take(
            &s,
            &answer(CLUSTER, vec![eds_cluster("a"), eds_cluster("b")], &[]),
            CLUSTER,
        )
        .unwrap();
        let s = take(
            &s,
            &answer(ENDPOINT, vec![assignment("a"), assignment("b")], &[]),
            ENDPOINT,
        )
        .unwrap();
        // Unlike a State-of-the-World answer, one that carries only c keeps a and b.
        let s = take(&s, &answer(CLUSTER, vec![eds_cluster("c")], &[]), CLUSTER).unwrap();
        assert_eq!(names(&s.clusters), ["a", "b", "c"]);
        // Removing a cluster takes its load assignment with it; a name it never had is no error.
        let s = take(&s, &answer(CLUSTER, vec![], &["a", "zz"]), CLUSTER).unwrap();
        assert_eq!(names(&s.clusters), ["b", "c"]);
        assert_eq!(names(&s.endpoints), ["b"]);
        // A resource without a body (a TTL renewal) changes nothing.
        let renewal = Resource {
            name: "b".into(),
            ..Default::default()
        };
        let s = take(&s, &answer(CLUSTER, vec![renewal], &[]), CLUSTER).unwrap();
        assert_eq!(names(&s.clusters), ["b", "c"]);
    }

    #[test]
    fn an_answer_that_does_not_decode_is_refused_whole() {
        let s = take(
            &EnvoyResources::default(),
            &answer(CLUSTER, vec![eds_cluster("a")], &[]),
            CLUSTER,
        )
        .unwrap();
        let garbage = Resource {
            name: "b".into(),
            resource: Some(Any {
                type_url: CLUSTER.into(),
                value: vec![0xff, 0xff, 0xff],
            }),
            ..Default::default()
        };
        let e = take(&s, &answer(CLUSTER, vec![eds_cluster("c"), garbage], &["a"]), CLUSTER);
        assert!(matches!(e, Err(MapError::Decode { .. })), "{:?}", e.err());
        assert_eq!(names(&s.clusters), ["a"], "the resources held are untouched");
    }

    fn sent(rx: &mut mpsc::UnboundedReceiver<DeltaDiscoveryRequest>) -> Vec<DeltaDiscoveryRequest> {
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    fn set(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn subscriptions_change_by_what_they_add_and_drop() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut c = Client::new(
            tx,
            Node {
                id: "dp".into(),
                ..Default::default()
            },
        );
        c.wildcard(LISTENER);
        c.follow(ENDPOINT, set(&["a", "b"]));
        c.follow(ENDPOINT, set(&["a", "b"]));
        c.follow(ENDPOINT, set(&["b", "c"]));
        c.answer(ENDPOINT, "n1", Some("bad".into()));
        let r = sent(&mut rx);
        assert_eq!(r.len(), 4, "an unchanged subscription sends nothing");
        assert_eq!(r[0].node.as_ref().map(|n| n.id.as_str()), Some("dp"));
        assert!(r[0].resource_names_subscribe.is_empty(), "a wildcard names nothing");
        assert!(
            r[1..].iter().all(|r| r.node.is_none()),
            "the node goes on the first request only"
        );
        assert_eq!(r[1].resource_names_subscribe, ["a", "b"]);
        assert_eq!(r[2].resource_names_subscribe, ["c"]);
        assert_eq!(r[2].resource_names_unsubscribe, ["a"]);
        assert_eq!(r[3].response_nonce, "n1");
        assert_eq!(r[3].error_detail.as_ref().map(|s| s.message.as_str()), Some("bad"));
    }
}
