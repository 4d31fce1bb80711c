//! Times the translator on a synthetic cluster: `cargo run --release -p ferrum-snapshot --example translate_scale`.
//! 10,000 HTTPRoutes over 5,000 Services with 10 endpoints each (the operator scale scenario).

use std::fmt::Write;
use std::time::Instant;

use ferrum_snapshot::translate::Options;
use ferrum_snapshot::{Resources, translate};

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
            "translate {total:?} (of which hashing {:?}); problems {}; hash {}",
            t.elapsed(),
            out.problems.len(),
            &h[..8]
        );
    }
}
