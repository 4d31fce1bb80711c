//! `make bench-operator`: the operator at scale, against the API emulator.
//!
//! 10,000 HTTPRoutes over 5,000 Services with 50,000 endpoints; 100 subscribed proxies
//! (MeshSubscribe clients in this process that acknowledge each snapshot as it arrives). Reports
//! the full translate time, the time from a one-route change until each proxy has the new
//! version (p50/p99 over several changes), and the operator's resident memory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrum_e2e::*;
use ferrum_proto::mesh::v1::mesh_subscribe_client::MeshSubscribeClient;
use ferrum_proto::mesh::v1::{Ack, Hello, SubscribeRequest, subscribe_request, subscribe_response};
use serde_json::json;
use tokio::sync::{Mutex, mpsc};

const ROUTES: usize = 10_000;
const SERVICES: usize = 5_000;
const ENDPOINTS_PER_SERVICE: usize = 10;
const PROXIES: usize = 100;
const CHANGES: usize = 5;

/// One simulated proxy: acknowledges every snapshot on receipt and reports (version, when).
async fn proxy(url: String, id: usize, seen: mpsc::UnboundedSender<(usize, u64, Instant)>) {
    let ch = tonic::transport::Endpoint::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = MeshSubscribeClient::new(ch).max_decoding_message_size(512 << 20);
    let (tx, rx) = mpsc::channel(4);
    let hello = Hello {
        node_id: format!("sim-{id}"),
        ..Default::default()
    };
    tx.send(SubscribeRequest {
        message: Some(subscribe_request::Message::Hello(hello)),
    })
    .await
    .unwrap();
    let mut stream = client
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    while let Ok(Some(m)) = stream.message().await {
        if let Some(subscribe_response::Message::Snapshot(s)) = m.message
            && !s.more
        {
            let _ = seen.send((id, s.version, Instant::now()));
            let ack = Ack {
                version: s.version,
                hash: s.hash,
                applied: true,
                ..Default::default()
            };
            let _ = tx
                .send(SubscribeRequest {
                    message: Some(subscribe_request::Message::Ack(ack)),
                })
                .await;
        }
    }
}

#[tokio::main]
async fn main() {
    let cluster = Cluster::start();
    let api = cluster.url();
    let loaded = Instant::now();
    cluster.apply(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {name: ferrum}\nspec: {controllerName: ferrum.dev/gateway-controller}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: web, namespace: default}\n\
         spec: {gatewayClassName: ferrum, listeners: [{name: http, port: 8080, protocol: HTTP}]}\n",
    );
    let mut objects = Vec::new();
    for i in 0..SERVICES {
        objects.push((
            "/api/v1/namespaces/default/services".to_string(),
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": format!("svc-{i}")}, "spec": {"ports": [{"name": "http", "port": 80}]}}),
        ));
        let eps: Vec<_> = (0..ENDPOINTS_PER_SERVICE)
            .map(|e| json!({"addresses": [format!("10.{}.{}.{}", i / 250, i % 250, e + 1)], "conditions": {"ready": true}}))
            .collect();
        objects.push((
            "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices".to_string(),
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                   "metadata": {"name": format!("svc-{i}-1"), "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
                   "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}], "endpoints": eps}),
        ));
    }
    for i in 0..ROUTES {
        objects.push((
            "/apis/gateway.networking.k8s.io/v1/namespaces/default/httproutes".to_string(),
            json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": {"name": format!("route-{i}")},
                   "spec": {"parentRefs": [{"name": "web"}], "hostnames": [format!("r{i}.example.com")],
                            "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": format!("/api/{i}")}}],
                                       "backendRefs": [{"name": format!("svc-{}", i % SERVICES), "port": 80}]}]}}),
        ));
    }
    create_all(&api, objects).await;
    eprintln!("loaded {} objects in {:?}", SERVICES * 2 + ROUTES + 2, loaded.elapsed());

    let op = cluster.operator("bench").await;
    let started = Instant::now();
    let mut translate_ms = 0.0;
    eventually("first full translation", Duration::from_secs(120), async || {
        let snap = op.admin_json("/snapshot").await;
        let routes: usize = snap["listeners"]
            .as_array()
            .map(|ls| {
                ls.iter()
                    .flat_map(|l| l["virtualHosts"].as_array().unwrap().iter())
                    .map(|v| v["routes"].as_array().unwrap().len())
                    .sum()
            })
            .unwrap_or(0);
        translate_ms = op
            .metric("ferrum_operator_full_translate_milliseconds")
            .await
            .unwrap_or(0.0);
        routes == ROUTES
    })
    .await;
    eprintln!(
        "operator translated {ROUTES} routes ({translate_ms} ms for the translation; {:?} from start); RSS {:.1} MiB",
        started.elapsed(),
        op.pid().map_or(0.0, rss_mib)
    );

    let (tx, mut rx) = mpsc::unbounded_channel();
    for id in 0..PROXIES {
        tokio::spawn(proxy(op.grpc_url(), id, tx.clone()));
    }
    let latest = Arc::new(Mutex::new(vec![0u64; PROXIES]));
    let mut got = 0;
    while got < PROXIES {
        let (id, v, _) = rx.recv().await.unwrap();
        latest.lock().await[id] = v;
        got += 1;
    }
    let initial = *latest.lock().await.iter().max().unwrap();
    let rss_translated = op.pid().map_or(0.0, rss_mib);
    eprintln!("{PROXIES} proxies subscribed at version {initial}; operator RSS {rss_translated:.1} MiB");

    let client = reqwest::Client::new();
    let mut samples = Vec::new();
    let mut version = initial;
    for change in 0..CHANGES {
        let t0 = Instant::now();
        let patch = json!({"spec": {"rules": [{"matches": [{"path": {"type": "PathPrefix", "value": format!("/changed/{change}")}}],
                                              "backendRefs": [{"name": "svc-1", "port": 80}]}]}});
        let r = client
            .patch(format!(
                "{api}/apis/gateway.networking.k8s.io/v1/namespaces/default/httproutes/route-7"
            ))
            .header("content-type", "application/merge-patch+json")
            .body(patch.to_string())
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        let patched_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let mut arrived = 0;
        let first_sample = samples.len();
        while arrived < PROXIES {
            let (_, v, at) = tokio::time::timeout(Duration::from_secs(60), rx.recv())
                .await
                .expect("proxies got the change")
                .unwrap();
            if v > version {
                samples.push(at.duration_since(t0).as_secs_f64() * 1000.0);
                arrived += 1;
            }
        }
        let this: Vec<f64> = samples[first_sample..].to_vec();
        eprintln!(
            "change {change}: API server answered the PATCH in {patched_ms:.1} ms; first proxy {:.1} ms, last {:.1} ms",
            this.iter().cloned().fold(f64::MAX, f64::min),
            this.iter().cloned().fold(0.0, f64::max)
        );
        version = {
            let proxies = op.admin_json("/proxies").await;
            proxies["proxies"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|p| p["sentVersion"].as_u64())
                .max()
                .unwrap()
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rss = op.pid().map_or(0.0, rss_mib);
    let (p50, p99) = (pct(&mut samples, 0.5), pct(&mut samples, 0.99));
    let result = json!({
        "when": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(),
        "routes": ROUTES, "services": SERVICES, "endpoints": SERVICES * ENDPOINTS_PER_SERVICE, "proxies": PROXIES, "changes": CHANGES,
        "full_translate_ms": translate_ms,
        "propagation_ms": {"p50": p50, "p99": p99, "samples": samples.len()},
        "operator_rss_mib": rss,
        "targets": {"full_translate_ms": 1000, "propagation_p99_ms": 100, "rss_mib": 200},
    });
    println!(
        "\noperator at scale: {ROUTES} HTTPRoutes, {SERVICES} Services, {} endpoints, {PROXIES} proxies",
        SERVICES * ENDPOINTS_PER_SERVICE
    );
    println!("  full translate        {translate_ms:>8.0} ms   (target < 1000)");
    println!("  one-route change → all proxies have it: p50 {p50:.1} ms, p99 {p99:.1} ms   (target p99 < 100)");
    println!("  operator RSS          {rss:>8.1} MiB  (target < 200)");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/results");
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join(format!("operator-{}.json", result["when"]));
    std::fs::write(&out, serde_json::to_string_pretty(&result).unwrap()).unwrap();
    println!("  written to {}", out.display());
}
