//! TCPRoute and TLSRoute through a real ferrum-dp: opaque TCP with half-close, TLS passed
//! through by SNI (the client verifies the backend's own certificate: the proxy holds no key),
//! TLS terminated and forwarded as TCP, connect failures, byte counters, and an open
//! connection that outlives a reload.

mod common;
use common::*;
use ferrum_testkit::l4::{exchange, tcp_call, tcp_server, tls_call, tls_server};
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn backend_at(name: &str, addrs: &[SocketAddr]) -> String {
    let eps: String = addrs
        .iter()
        .map(|a| format!("  - {{address: 127.0.0.1, port: {}}}\n", a.port()))
        .collect();
    format!("apiVersion: ferrum.dev/v1alpha1\nkind: Backend\nmetadata: {{name: {name}}}\nspec:\n  endpoints:\n{eps}")
}

fn route(kind: &str, name: &str, section: &str, hostnames: &str, backend: &str) -> String {
    let version = if kind == "TCPRoute" { "v1alpha2" } else { "v1" };
    format!(
        "apiVersion: gateway.networking.k8s.io/{version}\nkind: {kind}\nmetadata: {{name: {name}}}\nspec:\n  \
         parentRefs: [{{name: gw, sectionName: {section}}}]\n{hostnames}  \
         rules: [{{backendRefs: [{{group: ferrum.dev, kind: Backend, name: {backend}}}]}}]\n"
    )
}

fn l4_gateway(tcp: u16, tls: u16) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: gw}}\nspec:\n  \
         gatewayClassName: ferrum\n  addresses: [{{type: IPAddress, value: 127.0.0.1}}]\n  listeners:\n  \
         - {{name: db, port: {tcp}, protocol: TCP}}\n  \
         - {{name: tls, port: {tls}, protocol: TLS, tls: {{mode: Passthrough}}}}\n"
    )
}

#[tokio::test]
async fn tcp_and_tls_passthrough_routes_forward_bytes_to_their_backends() {
    let db = tcp_server("db").await;
    let (a, a_root) = tls_server("a.example.test").await;
    let (b, b_root) = tls_server("b.example.test").await;
    let (tcp_port, tls_port) = (free_port(), free_port());
    let yaml = docs(&[
        l4_gateway(tcp_port, tls_port),
        backend_at("db", &[db]),
        backend_at("a", &[a]),
        backend_at("b", &[b]),
        route("TCPRoute", "db", "db", "", "db"),
        route("TLSRoute", "a", "tls", "  hostnames: [a.example.test]\n", "a"),
        route("TLSRoute", "b", "tls", "  hostnames: [\"*.example.test\"]\n", "b"),
    ]);
    let dp = Dp::start(&yaml).await;

    // The backend answers only after it saw the client's end of stream: half-close crossed.
    assert_eq!(tcp_call(tcp_port, "SELECT 1").await.unwrap(), "db: SELECT 1");

    // Each client verifies its own backend's certificate through the proxy: the TLS session is
    // end to end, picked by SNI (exact before wildcard).
    assert_eq!(
        tls_call(tls_port, "a.example.test", &a_root, "hi").await.unwrap(),
        "a.example.test: hi"
    );
    assert_eq!(
        tls_call(tls_port, "b.example.test", &b_root, "yo").await.unwrap(),
        "b.example.test: yo"
    );
    // A name no route has: the connection is closed, no handshake completes.
    assert!(tls_call(tls_port, "c.other.test", &a_root, "x").await.is_err());
    // Not TLS at all on the TLS listener: closed without a byte.
    let mut plain = TcpStream::connect(("127.0.0.1", tls_port)).await.unwrap();
    plain.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut got)).await;
    assert!(got.is_empty(), "{got:?}");

    let sent = dp
        .metric("ferrum_cluster_l4_bytes_sent_total{cluster=\"backend/default/db\"}")
        .await;
    let received = dp
        .metric("ferrum_cluster_l4_bytes_received_total{cluster=\"backend/default/db\"}")
        .await;
    assert_eq!((sent, received), (8.0, 12.0), "bytes of the TCP route");
    let status = dp.admin_get("/config").await;
    assert!(
        status.contains("TLSRoute default/a"),
        "route status at /config: {status}"
    );
}

#[tokio::test]
async fn a_terminating_tls_listener_forwards_the_plaintext_by_sni() {
    let db = tcp_server("db").await;
    let port = free_port();
    let c = rcgen::generate_simple_self_signed(vec!["db.example.test".to_string()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("c.pem"), c.cert.pem()).unwrap();
    std::fs::write(dir.path().join("k.pem"), c.signing_key.serialize_pem()).unwrap();
    let yaml = docs(&[
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: gw}}\nspec:\n  \
             gatewayClassName: ferrum\n  addresses: [{{type: IPAddress, value: 127.0.0.1}}]\n  listeners:\n  \
             - name: tls\n    port: {port}\n    protocol: TLS\n    hostname: db.example.test\n    \
             tls: {{mode: Terminate, options: {{ferrum.dev/cert-file: {d}/c.pem, ferrum.dev/key-file: {d}/k.pem}}}}\n",
            d = dir.path().display()
        ),
        backend_at("db", &[db]),
        route("TLSRoute", "db", "tls", "  hostnames: [db.example.test]\n", "db"),
    ]);
    let _dp = Dp::start(&yaml).await;
    // The client trusts the proxy's certificate; the backend gets the bytes in the clear.
    let root = c.cert.der().clone();
    assert_eq!(
        tls_call(port, "db.example.test", &root, "ping").await.unwrap(),
        "db: ping"
    );
}

#[tokio::test]
async fn a_dead_backend_is_skipped_and_an_open_connection_outlives_a_reload() {
    let live = tcp_server("live").await;
    let other = tcp_server("other").await;
    // Port 1: nothing here listens there. (A port bound and released could be taken by a
    // concurrent test's listener and answer.)
    let dead = SocketAddr::from(([127, 0, 0, 1], 1));
    let (tcp_port, tls_port) = (free_port(), free_port());
    let config = |to: &[SocketAddr]| {
        docs(&[
            l4_gateway(tcp_port, tls_port),
            backend_at("db", to),
            route("TCPRoute", "db", "db", "", "db"),
        ])
    };
    let dp = Dp::start(&config(&[dead, live])).await;
    // Round robin starts somewhere; every call lands on the live endpoint, the dead one is retried past.
    for _ in 0..4 {
        assert_eq!(tcp_call(tcp_port, "q").await.unwrap(), "live: q");
    }
    let refused = dp
        .metric(
            "ferrum_cluster_upstream_errors_total{cluster=\"backend/default/db\",reason=\"upstream_connect_failure\"}",
        )
        .await;
    assert_eq!(refused, 0.0, "a connection that reached an endpoint is no error");
    assert!(
        dp.metric("ferrum_cluster_ejections_total{cluster=\"backend/default/db\"}")
            .await
            <= 1.0
    );

    // A connection open across a reload keeps its backend; new ones follow the new route.
    let mut open = TcpStream::connect(("127.0.0.1", tcp_port)).await.unwrap();
    open.write_all(b"before ").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let v = dp.version().await;
    dp.reconfigure(&config(&[other]), v).await;
    assert_eq!(
        exchange(&mut open, "and after").await.unwrap(),
        "live: before and after"
    );
    assert_eq!(tcp_call(tcp_port, "new").await.unwrap(), "other: new");

    // Only dead endpoints: the client's connection is closed, the failure counted.
    let v = dp.version().await;
    dp.reconfigure(&config(&[dead]), v).await;
    assert_eq!(tcp_call(tcp_port, "q").await.unwrap_or_default(), "");
    let failed = dp
        .metric(
            "ferrum_cluster_upstream_errors_total{cluster=\"backend/default/db\",reason=\"upstream_connect_failure\"}",
        )
        .await;
    assert_eq!(failed, 1.0);
}

#[tokio::test]
async fn gateway_authorization_policies_judge_l4_connections() {
    let db = tcp_server("db").await;
    let (a, a_root) = tls_server("a.example.test").await;
    let (tcp_port, tls_port) = (free_port(), free_port());
    let policy = |name: &str, spec: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}}}\n\
             spec: {{targetRefs: [{{group: gateway.networking.k8s.io, kind: Gateway, name: gw}}], {spec}}}\n"
        )
    };
    let config = |policies: &[String]| {
        let mut parts = vec![
            l4_gateway(tcp_port, tls_port),
            backend_at("db", &[db]),
            backend_at("a", &[a]),
            route("TCPRoute", "db", "db", "", "db"),
            route("TLSRoute", "a", "tls", "  hostnames: [a.example.test]\n", "a"),
        ];
        parts.extend_from_slice(policies);
        docs(&parts)
    };
    // DENY the TCP listener's port to loopback clients: the TLS listener is untouched.
    let dp = Dp::start(&config(&[policy(
        "no-db",
        &format!("action: DENY, rules: [{{from: [{{source: {{ipBlocks: [127.0.0.1/32]}}}}], to: [{{operation: {{ports: [\"{tcp_port}\"]}}}}]}}]"),
    )]))
    .await;
    assert_eq!(
        tcp_call(tcp_port, "q").await.unwrap_or_default(),
        "",
        "denied: closed unanswered"
    );
    assert_eq!(
        tls_call(tls_port, "a.example.test", &a_root, "hi").await.unwrap(),
        "a.example.test: hi"
    );
    // An ALLOW on an HTTP field can never match a connection: everything is denied.
    let v = dp.version().await;
    dp.reconfigure(
        &config(&[policy("http-only", "rules: [{to: [{operation: {paths: [\"/x\"]}}]}]")]),
        v,
    )
    .await;
    assert!(tls_call(tls_port, "a.example.test", &a_root, "hi").await.is_err());
    // An ALLOW on the source address lets loopback clients in.
    let v = dp.version().await;
    dp.reconfigure(
        &config(&[policy(
            "loopback",
            "rules: [{from: [{source: {ipBlocks: [127.0.0.0/8]}}]}]",
        )]),
        v,
    )
    .await;
    assert_eq!(tcp_call(tcp_port, "q").await.unwrap(), "db: q");
}

#[tokio::test]
async fn a_quiet_connection_ends_after_its_clusters_tcp_idle_timeout() {
    let db = tcp_server("db").await;
    let (tcp_port, tls_port) = (free_port(), free_port());
    let yaml = docs(&[
        l4_gateway(tcp_port, tls_port),
        backend_at("db", &[db]) + "  timeouts: {tcpIdle: 300ms}\n",
        route("TCPRoute", "db", "db", "", "db"),
    ]);
    let _dp = Dp::start(&yaml).await;
    // A connection that sends nothing (the backend answers only at the client's end of stream).
    let mut quiet = TcpStream::connect(("127.0.0.1", tcp_port)).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), quiet.read(&mut buf)).await;
    let quiet_for = started.elapsed();
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "the proxy ended it: {read:?}");
    assert!(
        (Duration::from_millis(250)..Duration::from_secs(2)).contains(&quiet_for),
        "after {quiet_for:?} quiet (the default would be an hour)"
    );
    // One that talks is served as before.
    assert_eq!(tcp_call(tcp_port, "SELECT 1").await.unwrap(), "db: SELECT 1");
}
