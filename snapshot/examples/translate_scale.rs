//! Times the translator on a synthetic cluster: `cargo run --release -p ferrum-snapshot --example translate_scale`.
//! 10,000 HTTPRoutes over 5,000 Services with 10 endpoints each (the operator scale scenario).
//! `-- N`: N one-route changes (default 5); prints their median.

use std::fmt::Write;
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use ferrum_snapshot::translate::Options;
use ferrum_snapshot::{Incremental, Resources, translate};

fn main() {
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
    let rounds: u64 = std::env::args()
        .nth(1)
        .map_or(5, |n| n.parse().expect("a number of changes"));
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
