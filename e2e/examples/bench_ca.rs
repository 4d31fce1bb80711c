//! `make bench-ca`: how many CSRs a release operator's CA signs per second, over TLS, with a
//! TokenReview (answered by the API emulator) behind every new token.
//!
//! 200 service accounts, each with its own token; 64 requests in flight over 8 TLS connections;
//! every CSR a fresh P-256 key (made before the clock starts). Reports CSRs/s, latency p50/p99
//! and the operator's CPU per CSR; writes bench/results/ca-<time>.json. `--smoke`: 100 CSRs,
//! nothing written (the tests run it).

use std::time::Instant;

use ferrum_e2e::*;
use ferrum_proto::istio::v1::auth::IstioCertificateRequest;
use serde_json::json;

const ACCOUNTS: usize = 200;
const CONNECTIONS: usize = 8;
const IN_FLIGHT: usize = 64;
/// CSRs signed in all (`--smoke`: a few).
fn csrs() -> usize {
    if smoke() { 100 } else { 6_000 }
}

fn csr() -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.serialize_request(&key).unwrap().pem().unwrap()
}

type Client = ferrum_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient<
    tonic::transport::Channel,
>;

/// `IN_FLIGHT` signers over `clients` send every CSR, each with one of the tokens; each answer is
/// reported as (signed, latency).
fn sign_all(
    clients: &[Client],
    csrs: Vec<String>,
    tokens: Vec<String>,
) -> tokio::sync::mpsc::UnboundedReceiver<(bool, std::time::Duration)> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (csrs, tokens) = (std::sync::Arc::new(csrs), std::sync::Arc::new(tokens));
    for w in 0..IN_FLIGHT {
        let (mut client, tx, next) = (clients[w % CONNECTIONS].clone(), tx.clone(), next.clone());
        let (csrs, tokens) = (csrs.clone(), tokens.clone());
        tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= csrs.len() {
                    return;
                }
                let mut req = tonic::Request::new(IstioCertificateRequest {
                    csr: csrs[i].clone(),
                    validity_duration: 3600,
                    metadata: None,
                });
                req.metadata_mut().insert(
                    "authorization",
                    format!("Bearer {}", tokens[i % ACCOUNTS]).parse().unwrap(),
                );
                let t = Instant::now();
                let ok = client.create_certificate(req).await.is_ok();
                let _ = tx.send((ok, t.elapsed()));
            }
        });
    }
    rx
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let cluster = Cluster::start_with(free_port(), &["--token-key", TOKEN_KEY]);
    let ca_port = free_port();
    let op = cluster
        .operator_with("op-1", &["--ca-addr", &format!("127.0.0.1:{ca_port}")])
        .await;
    let root = cluster.ca_root().await;
    let tokens: Vec<String> = (0..ACCOUNTS)
        .map(|i| token("bench", &format!("sa-{i}"), "ferrum-ca", 3600, TOKEN_KEY))
        .collect();
    let csrs: Vec<String> = (0..csrs()).map(|_| csr()).collect();
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        clients.push(ca_client(ca_port, &root).await);
    }
    let cpu_before = cpu_seconds(op.pid().expect("operator running"));
    let started = Instant::now();
    let mut rx = sign_all(&clients, csrs, tokens);
    let mut lat = Vec::new();
    let mut failed = 0;
    while let Some((ok, d)) = rx.recv().await {
        if ok {
            lat.push(d);
        } else {
            failed += 1;
        }
    }
    let elapsed = started.elapsed();
    let cpu = cpu_seconds(op.pid().expect("operator running")) - cpu_before;
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    let rate = lat.len() as f64 / elapsed.as_secs_f64();
    let result = json!({
        "csrs": lat.len(),
        "failed": failed,
        "seconds": elapsed.as_secs_f64(),
        "csrs_per_second": rate,
        "p50_ms": pct(0.5).as_secs_f64() * 1e3,
        "p99_ms": pct(0.99).as_secs_f64() * 1e3,
        "operator_cpu_ms_per_csr": cpu * 1e3 / lat.len().max(1) as f64,
        "accounts": ACCOUNTS,
        "in_flight": IN_FLIGHT,
        "connections": CONNECTIONS,
    });
    publish("ca", &result);
    assert_eq!(failed, 0, "every CSR signed");
}
