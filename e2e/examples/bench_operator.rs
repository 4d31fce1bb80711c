//! `make bench-operator`: the operator at scale, against the API emulator.
//!
//! Gateway (default): 10,000 HTTPRoutes over 5,000 Services with 50,000 endpoints; 100
//! subscribed proxies. `--mesh`: 10,000 Services (ClusterIPs, EndpointSlices) in front of 5,000
//! Pods, and 1,000 sidecars (`sidecar/<ns>/<pod>`, each with its pod's ServiceAccount token,
//! checked by TokenReview). Proxies are MeshSubscribe clients in this process that acknowledge
//! each snapshot as it arrives. Reports the full translate time, the time from a one-object
//! change (a route; a pod's labels) until each proxy has the new version (p50/p99 over several
//! changes; measured once the operator has written every status, as in a cluster it has served
//! for a while), and the operator's resident memory. `--mesh --sidecar-hosts N`: with a mesh-wide
//! Istio Sidecar whose egress hosts name the first N Services, so each sidecar knows N Services
//! and the pods behind them instead of the whole mesh (the changed pod is behind svc-7).
//! `--operator-args="--chunk-bytes 65536"`: flags for the operator, to compare settings.
//! `--smoke`: a hundredth of the scale, nothing written (the tests run it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrum_e2e::*;
use ferrum_proto::mesh::v1::{Ack, SubscribeRequest, subscribe_request, subscribe_response};
use serde_json::json;
use tokio::sync::{Mutex, mpsc};

const ROUTES: usize = 10_000;
const SERVICES: usize = 5_000;
const ENDPOINTS_PER_SERVICE: usize = 10;
const PROXIES: usize = 100;
const CHANGES: usize = 5;
const MESH_SERVICES: usize = 10_000;
const MESH_PODS: usize = 5_000;
const SIDECARS: usize = 1_000;
const ACCOUNTS: usize = 50;

/// The scale a run is at: what it loads, who subscribes, what it changes (`--smoke`: a
/// hundredth of it).
struct Scale {
    mesh: bool,
    proxies: usize,
    routes: usize,
    services: usize,
    mesh_services: usize,
    mesh_pods: usize,
}

impl Scale {
    fn new(mesh: bool) -> Scale {
        let d = if smoke() { 100 } else { 1 };
        Scale {
            mesh,
            proxies: if mesh { SIDECARS } else { PROXIES }.div_ceil(d),
            routes: ROUTES / d,
            services: SERVICES / d,
            mesh_services: MESH_SERVICES / d,
            mesh_pods: MESH_PODS / d,
        }
    }
}

/// One simulated proxy: acknowledges every snapshot on receipt and reports (version, when).
/// A sidecar (`mesh`) subscribes as pod `id` with its service account's token.
async fn proxy(url: String, id: usize, mesh: bool, seen: mpsc::UnboundedSender<(usize, u64, Instant)>) {
    let (role, token) = if mesh {
        let sa = format!("sa-{}", id % ACCOUNTS);
        (
            format!("sidecar/default/pod-{id}"),
            Some(token("default", &sa, "ferrum-ca", 3600, TOKEN_KEY)),
        )
    } else {
        (String::new(), None)
    };
    // Retried as a proxy would: a thousand subscribing at once may find the API emulator slow
    // to answer a TokenReview.
    let mut tries = 0;
    let (tx, mut stream) = loop {
        match subscribe(channel(&url).await, &format!("sim-{id}"), &role, token.as_deref()).await {
            Ok(s) => break s,
            Err(e) if tries < 5 => {
                eprintln!("sim-{id}: subscribe: {e}; again in 1 s");
                tries += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => panic!("sim-{id}: subscribe: {e}"),
        }
    };
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

fn gateway_objects(s: &Scale) -> Vec<(String, serde_json::Value)> {
    let mut objects = Vec::new();
    for i in 0..s.services {
        objects.push((
            "/api/v1/namespaces/default/services".to_string(),
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": format!("svc-{i}")}, "spec": {"ports": [{"name": "http", "port": 80}]}}),
        ));
        let eps: Vec<_> = (0..ENDPOINTS_PER_SERVICE)
            .map(|e| json!({"addresses": [format!("10.{}.{}.{}", i / 250, i % 250, e + 1)], "conditions": {"ready": true}}))
            .collect();
        objects.push(slice(&format!("svc-{i}"), eps));
    }
    for i in 0..s.routes {
        objects.push((
            "/apis/gateway.networking.k8s.io/v1/namespaces/default/httproutes".to_string(),
            json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": {"name": format!("route-{i}")},
                   "spec": {"parentRefs": [{"name": "web"}], "hostnames": [format!("r{i}.example.com")],
                            "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": format!("/api/{i}")}}],
                                       "backendRefs": [{"name": format!("svc-{}", i % s.services), "port": 80}]}]}}),
        ));
    }
    objects
}

fn slice(service: &str, endpoints: Vec<serde_json::Value>) -> (String, serde_json::Value) {
    (
        "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices".to_string(),
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": format!("{service}-1"), "labels": {"kubernetes.io/service-name": service}},
               "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}], "endpoints": endpoints}),
    )
}

fn pod_ip(i: usize) -> String {
    format!("10.{}.{}.{}", 100 + i / 62500, (i / 250) % 250, i % 250 + 1)
}

/// 5,000 pods (50 service accounts) and 10,000 Services, each Service over 5 of the pods.
fn mesh_objects(s: &Scale) -> Vec<(String, serde_json::Value)> {
    // Five pods per app label.
    let apps = s.mesh_pods / 5;
    let mut objects = Vec::new();
    for i in 0..s.mesh_pods {
        objects.push((
            "/api/v1/namespaces/default/pods".to_string(),
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": format!("pod-{i}"), "labels": {"app": format!("app-{}", i % apps), "security.istio.io/tlsMode": "istio"}},
                   "spec": {"serviceAccountName": format!("sa-{}", i % ACCOUNTS), "nodeName": format!("node-{}", i % 20), "containers": [{"name": "app"}]},
                   "status": {"phase": "Running", "podIP": pod_ip(i), "podIPs": [{"ip": pod_ip(i)}]}}),
        ));
    }
    for i in 0..s.mesh_services {
        let name = format!("svc-{i}");
        objects.push((
            "/api/v1/namespaces/default/services".to_string(),
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
                   "spec": {"clusterIP": format!("10.96.{}.{}", i / 250, i % 250 + 1), "selector": {"app": format!("app-{}", i % apps)},
                            "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}),
        ));
        let eps: Vec<_> = (0..5)
            .map(|k| {
                let p = (i % apps) + apps * k;
                json!({"addresses": [pod_ip(p)], "conditions": {"ready": true},
                       "targetRef": {"kind": "Pod", "name": format!("pod-{p}"), "namespace": "default"}})
            })
            .collect();
        objects.push(slice(&name, eps));
    }
    objects
}

/// Waits until the operator has written the status of every object for its current
/// generation, as it has in a cluster it has served for a while: the changes are measured in
/// that steady state, not while it writes 10,000 first statuses (it did before 2026-12-04 night).
async fn settled(op: &Operator) {
    let started = Instant::now();
    loop {
        let generation = op.metric("ferrum_operator_generation").await;
        if generation.is_some() && op.metric("ferrum_operator_status_generation").await == generation {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "statuses not written in 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("operator wrote every status in {:?}", started.elapsed());
}

/// Waits until the operator's snapshot has everything loaded; returns the full translate time.
async fn translated(op: &Operator, s: &Scale) -> f64 {
    let mut translate_ms = 0.0;
    eventually("first full translation", Duration::from_secs(300), async || {
        let snap = op.admin_json("/snapshot").await;
        let loaded = if s.mesh {
            snap["services"].as_array().map_or(0, Vec::len) == s.mesh_services
                && snap["workloads"].as_array().map_or(0, Vec::len) == s.mesh_pods
        } else {
            let routes: usize = snap["listeners"]
                .as_array()
                .map(|ls| {
                    ls.iter()
                        .flat_map(|l| l["virtualHosts"].as_array().unwrap().iter())
                        .map(|v| v["routes"].as_array().unwrap().len())
                        .sum()
                })
                .unwrap_or(0);
            routes == s.routes
        };
        translate_ms = op
            .metric("ferrum_operator_full_translate_milliseconds")
            .await
            .unwrap_or(0.0);
        loaded
    })
    .await;
    translate_ms
}

/// One object changes: a route's match (gateway) or a pod's labels (mesh).
async fn change(api: &str, s: &Scale, n: usize) {
    let (url, patch) = if s.mesh {
        (
            format!("{api}/api/v1/namespaces/default/pods/pod-7"),
            json!({"metadata": {"labels": {"version": format!("v{n}")}}}),
        )
    } else {
        (
            format!("{api}/apis/gateway.networking.k8s.io/v1/namespaces/default/httproutes/route-7"),
            json!({"spec": {"rules": [{"matches": [{"path": {"type": "PathPrefix", "value": format!("/changed/{n}")}}],
                                       "backendRefs": [{"name": "svc-1", "port": 80}]}]}}),
        )
    };
    let r = reqwest::Client::new()
        .patch(url)
        .header("content-type", "application/merge-patch+json")
        .body(patch.to_string())
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
}

/// What to run: `--mesh`, `--operator-args=…`, `--sidecar-hosts=N`.
struct Args {
    mesh: bool,
    operator_args: Vec<String>,
    sidecar_hosts: Option<usize>,
}

impl Args {
    fn parse() -> Args {
        Args {
            mesh: std::env::args().any(|a| a == "--mesh"),
            operator_args: std::env::args()
                .find_map(|a| a.strip_prefix("--operator-args=").map(str::to_string))
                .map(|v| v.split_whitespace().map(str::to_string).collect())
                .unwrap_or_default(),
            sidecar_hosts: std::env::args().find_map(|a| {
                a.strip_prefix("--sidecar-hosts=")
                    .map(|n| n.parse().expect("--sidecar-hosts=N"))
            }),
        }
    }
}

/// Loads the Gateway (and, with `--sidecar-hosts`, the mesh-wide Sidecar) and the scale's
/// objects into the API emulator.
async fn load(cluster: &Cluster, args: &Args, s: &Scale) {
    let loaded = Instant::now();
    cluster.apply(WEB_GATEWAY);
    if let Some(n) = args.sidecar_hosts {
        cluster.install_istio_crds();
        let hosts: Vec<String> = (0..n.max(8))
            .map(|i| format!("'*/svc-{i}.default.svc.cluster.local'"))
            .collect();
        cluster.apply(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: ferrum-system}}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: default, namespace: ferrum-system}}\n\
             spec: {{egress: [{{hosts: [{}]}}]}}\n",
            hosts.join(", ")
        ));
    }
    let objects = if s.mesh { mesh_objects(s) } else { gateway_objects(s) };
    let count = objects.len();
    create_all(&cluster.url(), objects).await;
    eprintln!("loaded {count} objects in {:?}", loaded.elapsed());
}

type Seen = mpsc::UnboundedReceiver<(usize, u64, Instant)>;

/// Starts the scale's proxies; returns what they report and the version they all have.
async fn subscribe_all(op: &Operator, s: &Scale) -> (Seen, u64) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    for id in 0..s.proxies {
        tokio::spawn(proxy(op.grpc_url(), id, s.mesh, tx.clone()));
    }
    let latest = Arc::new(Mutex::new(vec![0u64; s.proxies]));
    let mut got = 0;
    while got < s.proxies {
        let (id, v, _) = rx.recv().await.unwrap();
        latest.lock().await[id] = v;
        got += 1;
    }
    let initial = *latest.lock().await.iter().max().unwrap();
    (rx, initial)
}

/// Makes `CHANGES` one-object changes; returns, for every proxy and change, the milliseconds
/// until the proxy had it.
async fn propagate(api: &str, op: &Operator, s: &Scale, rx: &mut Seen, initial: u64) -> Vec<f64> {
    let mut samples = Vec::new();
    let mut version = initial;
    for n in 0..CHANGES {
        let t0 = Instant::now();
        change(api, s, n).await;
        let patched_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let mut arrived = 0;
        let first_sample = samples.len();
        while arrived < s.proxies {
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
            "change {n}: API server answered the PATCH in {patched_ms:.1} ms; first proxy {:.1} ms, last {:.1} ms",
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
    samples
}

#[tokio::main]
async fn main() {
    // A panicking proxy task must end the run, not leave it waiting for that proxy forever.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |p| {
        report(p);
        std::process::exit(101);
    }));
    let args = Args::parse();
    let s = Scale::new(args.mesh);
    let cluster = Cluster::start_with(free_port(), &["--token-key", TOKEN_KEY]);
    load(&cluster, &args, &s).await;
    let operator_args: Vec<&str> = args.operator_args.iter().map(String::as_str).collect();
    let op = cluster.operator_with("bench", &operator_args).await;
    let started = Instant::now();
    let translate_ms = translated(&op, &s).await;
    eprintln!(
        "operator translated everything ({translate_ms} ms for the translation; {:?} from start); RSS {:.1} MiB",
        started.elapsed(),
        op.pid().map_or(0.0, rss_mib)
    );
    let (mut rx, initial) = subscribe_all(&op, &s).await;
    let rss_translated = op.pid().map_or(0.0, rss_mib);
    eprintln!(
        "{} proxies subscribed at version {initial}; operator RSS {rss_translated:.1} MiB",
        s.proxies
    );
    settled(&op).await;
    let mut samples = propagate(&cluster.url(), &op, &s, &mut rx, initial).await;
    let rss = op.pid().map_or(0.0, rss_mib);
    write_report(&args, &s, translate_ms, &mut samples, rss);
}

/// Prints the results and writes them to `bench/results/operator[-mesh]-<time>.json`.
fn write_report(args: &Args, s: &Scale, translate_ms: f64, samples: &mut [f64], rss: f64) {
    let mesh = args.mesh;
    let (p50, p99) = (pct(samples, 0.5), pct(samples, 0.99));
    let scoped = args.sidecar_hosts.map_or(String::new(), |n| {
        format!(", a mesh-wide Sidecar admitting {} Services", n.max(8))
    });
    let (what, p99_target, rss_target) = if mesh {
        (
            format!(
                "{} Services, {} Pods, {} sidecars{scoped}; a pod's labels change",
                s.mesh_services, s.mesh_pods, s.proxies
            ),
            200,
            400,
        )
    } else {
        (
            format!(
                "{} HTTPRoutes, {} Services, {} endpoints, {} proxies; a route changes",
                s.routes,
                s.services,
                s.services * ENDPOINTS_PER_SERVICE,
                s.proxies
            ),
            100,
            200,
        )
    };
    let result = json!({
        "when": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(),
        "scale": what, "mesh": mesh, "operator_args": args.operator_args, "sidecar_hosts": args.sidecar_hosts, "proxies": s.proxies, "changes": CHANGES,
        "full_translate_ms": translate_ms,
        "propagation_ms": {"p50": p50, "p99": p99, "samples": samples.len()},
        "operator_rss_mib": rss,
        "targets": {"propagation_p99_ms": p99_target, "rss_mib": rss_target},
    });
    println!("\noperator at scale: {what}");
    println!("  full translate        {translate_ms:>8.0} ms");
    println!("  change → all proxies have it: p50 {p50:.1} ms, p99 {p99:.1} ms   (target p99 < {p99_target})");
    println!("  operator RSS          {rss:>8.1} MiB  (target < {rss_target})");
    publish(if mesh { "operator-mesh" } else { "operator" }, &result);
}
