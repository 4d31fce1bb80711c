//! Times the translator on a synthetic cluster: `cargo run --release -p ferrum-snapshot --example translate_scale`.
//! 10,000 HTTPRoutes over 5,000 Services with 10 endpoints each (the operator scale scenario).
//! `-- N`: N one-route changes (default 5); prints their median. `-- N --mesh`: the mesh scenario
//! of `make bench-operator-mesh` instead (10,000 Services with EndpointSlices over 5,000 Pods),
//! with N changes of one pod's labels.

use std::fmt::Write;
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use ferrum_snapshot::translate::Options;
use ferrum_snapshot::{Incremental, Resources, translate};

fn main() {
    if std::env::args().any(|a| a == "--mesh") {
        return mesh();
    }
    let mut y = String::from(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: web}\n\
         spec: {gatewayClassName: ferrum, listeners: [{name: http, port: 8080, protocol: HTTP}]}\n",
    );
    for i in 0..5_000 {
        let eps: Vec<String> = (0..10)
            .map(|e| format!("{{addresses: [10.{}.{}.{}]}}", i / 250, i % 250, e + 1))
            .collect();
        let _ = write!(
            y,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}}}\nspec: {{ports: [{{name: http, port: 80}}]}}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: svc-{i}-1, labels: {{kubernetes.io/service-name: svc-{i}}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{}]\n",
            eps.join(", ")
        );
    }
    for i in 0..10_000 {
        let _ = write!(
            y,
            "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: route-{i}}}\n\
             spec: {{parentRefs: [{{name: web}}], hostnames: [r{i}.example.com], rules: [{{matches: [{{path: {{type: PathPrefix, value: /api/{i}}}}}], backendRefs: [{{name: svc-{}, port: 80}}]}}]}}\n",
            i % 5_000
        );
    }
    let mut r = Resources::default();
    let t = Instant::now();
    r.add_yaml("scale.yaml", &y).unwrap();
    println!("parse {:?}", t.elapsed());
    for _ in 0..3 {
        let t = Instant::now();
        let out = translate(&r, 1, &Options::default());
        let total = t.elapsed();
        let t = Instant::now();
        let h = out.snapshot.content_hash();
        println!(
            "full translate {total:?} (hashing alone {:?}); problems {}; hash {}",
            t.elapsed(),
            out.problems.len(),
            &h[..8]
        );
    }
    // The operator's case: one route changes, everything else is the same objects.
    let mut inc = Incremental::new(Options::default());
    let mut prev = inc.translate(&r, 1).snapshot;
    let rounds = rounds();
    let (mut translates, mut deltas) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        let mut route = (*r.http_routes[7]).clone();
        route.spec.rules.as_mut().unwrap()[0].matches.as_mut().unwrap()[0]
            .path
            .as_mut()
            .unwrap()
            .value = Some(format!("/changed/{i}"));
        r.http_routes[7] = std::sync::Arc::new(route);
        let t = Instant::now();
        let out = inc.translate(&r, 2 + i);
        let took = t.elapsed();
        let t = Instant::now();
        let d = ferrum_snapshot::Delta::between(&prev, &out.snapshot);
        translates.push(took);
        deltas.push(t.elapsed());
        println!(
            "one-route change: incremental translate {took:?} ({:?}); delta in {:?}: {} virtual host(s), {} cluster(s)",
            inc.stats(),
            t.elapsed(),
            d.virtual_hosts.len(),
            d.clusters.upserted.len()
        );
        prev = out.snapshot;
    }
    translates.sort();
    deltas.sort();
    println!(
        "median of {rounds} one-route changes: incremental translate {:?}, delta {:?}",
        translates[translates.len() / 2],
        deltas[deltas.len() / 2]
    );
}

fn rounds() -> u64 {
    std::env::args()
        .nth(1)
        .filter(|a| a != "--mesh")
        .map_or(5, |n| n.parse().expect("a number of changes"))
}

fn pod_ip(i: usize) -> String {
    format!("10.{}.{}.{}", 100 + i / 62500, (i / 250) % 250, i % 250 + 1)
}

fn pod(i: usize, version: Option<u64>) -> String {
    let version = version.map_or(String::new(), |v| format!(", version: v{v}"));
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: pod-{i}, labels: {{app: app-{}, security.istio.io/tlsMode: istio{version}}}}}\n\
         spec: {{serviceAccountName: sa-{}, nodeName: node-{}, containers: [{{name: app}}]}}\n\
         status: {{phase: Running, podIP: {ip}, podIPs: [{{ip: {ip}}}]}}\n",
        i % 1000,
        i % 50,
        i % 20,
        ip = pod_ip(i)
    )
}

/// `make bench-operator-mesh`'s cluster: one pod's labels change, every workload and mesh service
/// is looked at again.
fn mesh() {
    let mut y = String::new();
    for i in 0..5_000 {
        y.push_str(&pod(i, None));
    }
    for i in 0..10_000 {
        let eps: Vec<String> = (0..5)
            .map(|k| {
                let p = (i % 1000) + 1000 * k;
                format!("{{addresses: [{}], conditions: {{ready: true}}, targetRef: {{kind: Pod, name: pod-{p}, namespace: default}}}}", pod_ip(p))
            })
            .collect();
        let _ = write!(
            y,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}}}\n\
             spec: {{clusterIP: 10.96.{}.{}, selector: {{app: app-{}}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: svc-{i}-1, labels: {{kubernetes.io/service-name: svc-{i}}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{}]\n",
            i / 250,
            i % 250 + 1,
            i % 1000,
            eps.join(", ")
        );
    }
    let mut r = Resources::default();
    r.add_yaml("mesh.yaml", &y).unwrap();
    let mut inc = Incremental::new(Options::default());
    let t = Instant::now();
    let mut prev = inc.translate(&r, 1).snapshot;
    println!("mesh: full translate {:?}", t.elapsed());
    let mut times = Vec::new();
    for n in 0..rounds() {
        let mut changed = Resources::default();
        changed.add_yaml("pod.yaml", &pod(7, Some(n))).unwrap();
        let i = r
            .pods
            .iter()
            .position(|p| p.metadata.name.as_deref() == Some("pod-7"))
            .unwrap();
        r.pods[i] = changed.pods[0].clone();
        let t = Instant::now();
        let out = inc.translate(&r, 2 + n);
        times.push(t.elapsed());
        let d = ferrum_snapshot::Delta::between(&prev, &out.snapshot);
        assert_eq!(d.workloads.upserted.len(), 1, "the pod's workload changed");
        prev = out.snapshot;
    }
    times.sort();
    println!(
        "mesh: median of {} one-pod changes: incremental translate {:?}",
        times.len(),
        times[times.len() / 2]
    );
}
