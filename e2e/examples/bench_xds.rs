//! `make bench-xds`: 1,000 simulated ADS clients (CDS wildcard + EDS for every cluster, ACKing
//! each response) on a 5,000-service snapshot; one endpoint change → time until every client has
//! the new ClusterLoadAssignment and ACKed it (p50/p99); operator RSS and CPU. The first argument
//! picks the protocol: `sotw` (State of the World: every EDS ACK repeats the 5,000 names) or
//! `delta` (incremental); the second, optionally, the number of clients. `--smoke`: 50 services
//! and 20 clients, nothing written (the tests run it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryResponse};
use ferrum_e2e::*;
use prost::Message;
use serde_json::json;
use tokio::sync::mpsc;

/// Services in the snapshot (`--smoke`: a few dozen).
static SERVICES: std::sync::LazyLock<usize> = std::sync::LazyLock::new(|| if smoke() { 50 } else { 5_000 });
/// Clients, unless the second argument says otherwise (to see what one client costs).
fn clients() -> usize {
    let default = if smoke() { 20 } else { 1_000 };
    std::env::args().nth(2).and_then(|v| v.parse().ok()).unwrap_or(default)
}
const CHANGES: usize = 3;
/// `envoy.service.discovery.v3.DiscoveryRequest` (same wire format) with the names as `Bytes`:
/// 1,000 clients ACKing 5,000 names share one set of names instead of allocating each.
#[derive(Clone, PartialEq, prost::Message)]
struct DiscoveryRequest {
    #[prost(string, tag = "1")]
    version_info: String,
    #[prost(message, optional, tag = "2")]
    node: Option<Node>,
    #[prost(bytes = "bytes", repeated, tag = "3")]
    resource_names: Vec<Bytes>,
    #[prost(string, tag = "4")]
    type_url: String,
    #[prost(string, tag = "5")]
    response_nonce: String,
}

/// Reported (instead of an endpoint count) when a client has every ClusterLoadAssignment.
const SYNCED: usize = usize::MAX;
use ferrum_proto::xds::{CLUSTER as CDS, ENDPOINT as EDS};

/// The node a simulated client names in its first request.
fn node(id: usize) -> Option<Node> {
    Some(Node {
        id: format!("sim-{id}"),
        cluster: "bench".into(),
        ..Default::default()
    })
}

/// One simulated client; reports (client, endpoints of svc-7's cluster, when) for each EDS update
/// of it. Requests are [`DiscoveryRequest`] so that making 1,000 ACKs of 5,000 names does not
/// cost the bench itself more than the server it measures.
async fn client(
    channel: tonic::transport::Channel,
    id: usize,
    names: Arc<Vec<Bytes>>,
    seen: mpsc::UnboundedSender<(usize, usize, Instant)>,
) {
    let mut ads = tonic::client::Grpc::new(channel).max_decoding_message_size(256 << 20);
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(DiscoveryRequest {
        node: node(id),
        type_url: CDS.into(),
        ..Default::default()
    })
    .unwrap();
    ads.ready().await.unwrap();
    let mut stream = ads
        .streaming(
            tonic::Request::new(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)),
            http::uri::PathAndQuery::from_static(
                "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
            ),
            tonic_prost::ProstCodec::<DiscoveryRequest, DiscoveryResponse>::default(),
        )
        .await
        .unwrap()
        .into_inner();
    let watched = "service/default/svc-7:80";
    let (mut received, mut synced) = (0, false);
    while let Ok(Some(resp)) = stream.message().await {
        let ack = |names: Vec<Bytes>| DiscoveryRequest {
            version_info: resp.version_info.clone(),
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            resource_names: names,
            ..Default::default()
        };
        if resp.type_url == CDS {
            let _ = tx.send(ack(vec![]));
            let _ = tx.send(DiscoveryRequest {
                type_url: EDS.into(),
                resource_names: names.to_vec(),
                ..Default::default()
            });
        } else if resp.type_url == EDS {
            let now = Instant::now();
            received += resp.resources.len();
            if received >= *SERVICES && !std::mem::replace(&mut synced, true) {
                let _ = seen.send((id, SYNCED, now));
            }
            for r in &resp.resources {
                if let Ok(cla) = ClusterLoadAssignment::decode(&r.value[..])
                    && cla.cluster_name == watched
                {
                    let n = cla.endpoints.iter().map(|l| l.lb_endpoints.len()).sum();
                    let _ = seen.send((id, n, now));
                }
            }
            let _ = tx.send(ack(names.to_vec()));
        }
    }
}

/// The same client over incremental ADS: subscriptions are sent once, ACKs carry no names.
async fn delta_client(
    channel: tonic::transport::Channel,
    id: usize,
    seen: mpsc::UnboundedSender<(usize, usize, Instant)>,
) {
    let mut ads = AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(256 << 20);
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(DeltaDiscoveryRequest {
        node: node(id),
        type_url: CDS.into(),
        ..Default::default()
    })
    .unwrap();
    let mut stream = ads
        .delta_aggregated_resources(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let watched = "service/default/svc-7:80";
    let mut subscribed = false;
    let (mut received, mut synced) = (0, false);
    while let Ok(Some(resp)) = stream.message().await {
        if resp.type_url == EDS {
            let now = Instant::now();
            received += resp.resources.len();
            if received >= *SERVICES && !std::mem::replace(&mut synced, true) {
                let _ = seen.send((id, SYNCED, now));
            }
            for r in &resp.resources {
                if r.name == watched
                    && let Some(a) = &r.resource
                    && let Ok(cla) = ClusterLoadAssignment::decode(&a.value[..])
                {
                    let n = cla.endpoints.iter().map(|l| l.lb_endpoints.len()).sum();
                    let _ = seen.send((id, n, now));
                }
            }
        }
        let _ = tx.send(DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            ..Default::default()
        });
        if resp.type_url == CDS && !subscribed {
            subscribed = true;
            let _ = tx.send(DeltaDiscoveryRequest {
                type_url: EDS.into(),
                resource_names_subscribe: (0..*SERVICES).map(|i| format!("service/default/svc-{i}:80")).collect(),
                ..Default::default()
            });
        }
    }
}

/// Endpoint slice `svc-<i>-1` of Service `svc-<i>`, with `n` endpoints.
fn slice(i: usize, n: usize) -> serde_json::Value {
    let eps: Vec<_> = (0..n)
        .map(|e| json!({"addresses": [format!("10.{}.{}.{}", i / 250, i % 250, e + 1)]}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": format!("svc-{i}-1"), "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}], "endpoints": eps})
}

/// The Gateway and, per service, a Service, its slice and an HTTPRoute to it.
async fn load(cluster: &Cluster) {
    cluster.apply(WEB_GATEWAY);
    let mut objects = Vec::new();
    for i in 0..*SERVICES {
        objects.push((
            "/api/v1/namespaces/default/services".to_string(),
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": format!("svc-{i}")}, "spec": {"ports": [{"name": "http", "port": 80}]}}),
        ));
        objects.push((
            "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices".to_string(),
            slice(i, 3),
        ));
        objects.push((
            "/apis/gateway.networking.k8s.io/v1/namespaces/default/httproutes".to_string(),
            json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": {"name": format!("route-{i}")},
                   "spec": {"parentRefs": [{"name": "web"}], "hostnames": [format!("s{i}.example.com")],
                            "rules": [{"backendRefs": [{"name": format!("svc-{i}"), "port": 80}]}]}}),
        ));
    }
    create_all(&cluster.url(), objects).await;
}

type Seen = mpsc::UnboundedReceiver<(usize, usize, Instant)>;

/// Starts `clients` ADS clients and waits until each has every endpoint set.
async fn start_clients(op: &Operator, clients: usize, delta: bool) -> Seen {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let names: Arc<Vec<Bytes>> = Arc::new(
        (0..*SERVICES)
            .map(|i| Bytes::from(format!("service/default/svc-{i}:80")))
            .collect(),
    );
    // 20 streams per connection: as many proxies as a real fleet, without 1,000 sockets.
    let mut channel = None;
    for id in 0..clients {
        if id % 20 == 0 {
            let endpoint = tonic::transport::Endpoint::from_shared(op.grpc_url()).unwrap();
            channel = Some(endpoint.connect().await.unwrap());
        }
        let channel = channel.clone().expect("connected at the first client");
        if delta {
            tokio::spawn(delta_client(channel, id, tx.clone()));
        } else {
            tokio::spawn(client(channel, id, names.clone(), tx.clone()));
        }
    }
    // Changes start once every client has all 5,000 endpoint sets: the latency measured is that
    // of a change, not of the initial sync still in progress.
    let mut ready = 0;
    while ready < clients {
        if rx.recv().await.unwrap().1 == SYNCED {
            ready += 1;
        }
    }
    rx
}

/// Changes one Service's endpoints `CHANGES` times; returns, per client and change, the
/// milliseconds until the client had it.
async fn propagate(api: &str, rx: &mut Seen, clients: usize) -> Vec<f64> {
    let client = reqwest::Client::new();
    let mut samples = Vec::new();
    for change in 0..CHANGES {
        let endpoints = 4 + change;
        let t0 = Instant::now();
        let patch = slice(7, endpoints);
        let r = client
            .patch(format!(
                "{api}/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/svc-7-1"
            ))
            .header("content-type", "application/merge-patch+json")
            .body(json!({"endpoints": patch["endpoints"]}).to_string())
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        let mut got = 0;
        while got < clients {
            let (_, n, at) = tokio::time::timeout(Duration::from_secs(60), rx.recv())
                .await
                .expect("clients got the change")
                .unwrap();
            if n == endpoints {
                samples.push(at.duration_since(t0).as_secs_f64() * 1000.0);
                got += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    samples
}

#[tokio::main]
async fn main() {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "sotw".into());
    let clients = clients();
    let delta = match mode.as_str() {
        "sotw" => false,
        "delta" => true,
        other => panic!("mode {other:?}: sotw or delta"),
    };
    let cluster = Cluster::start();
    load(&cluster).await;
    let op = cluster.operator("bench").await;
    eventually("snapshot with every service", Duration::from_secs(120), async || {
        op.admin_json("/snapshot").await["clusters"]
            .as_array()
            .is_some_and(|c| c.len() == *SERVICES)
    })
    .await;
    let mut rx = start_clients(&op, clients, delta).await;
    let pid = op.pid().unwrap();
    let (rss_before, cpu_before) = (rss_mib(pid), cpu_seconds(pid));
    let mut samples = propagate(&cluster.url(), &mut rx, clients).await;
    let rss = rss_mib(pid);
    let cpu = cpu_seconds(pid) - cpu_before;
    let (p50, p99) = (pct(&mut samples, 0.5), pct(&mut samples, 0.99));
    println!(
        "\nxDS at scale ({mode}): {} services, {clients} ADS clients (CDS + EDS), {CHANGES} endpoint changes",
        *SERVICES
    );
    println!("  endpoint change → every client has it: p50 {p50:.1} ms, p99 {p99:.1} ms   (target p99 < 200)");
    println!("  operator RSS {rss:.1} MiB (before the changes {rss_before:.1})   (target < 300)");
    println!("  operator CPU for the changes: {cpu:.2} s");
    let result = json!({
        "mode": mode, "services": *SERVICES, "clients": clients, "changes": CHANGES,
        "propagation_ms": {"p50": p50, "p99": p99, "samples": samples.len()},
        "operator_rss_mib": rss, "operator_cpu_seconds": cpu,
        "targets": {"propagation_p99_ms": 200, "rss_mib": 300},
    });
    publish(&format!("xds-{mode}"), &result);
}
