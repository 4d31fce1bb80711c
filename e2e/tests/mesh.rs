//! Two "pods" (network namespaces on a bridge, capture rules inside, as root) talking through
//! two `ferrum-dp --mode sidecar` over HBONE, with workload certificates from the operator's CA
//! and the snapshot (workloads, Services) from the operator, both fed by the API emulator.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferrum_e2e::mesh::{NODE, NS, World};
use ferrum_e2e::*;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

const VIP: &str = "10.96.77.10";

async fn two_pods(operator_args: &[&str], sidecar_args: &[&str]) -> World {
    let mut w = World::start(operator_args).await;
    let a = w.pod("a-1", "sa-a", "a", 10, true);
    let b = w.pod("b-1", "sa-b", "b", 11, true);
    w.service("svc-b", VIP, "b");
    w.app(b);
    w.sidecar(a, "sa-a", sidecar_args);
    w.sidecar(b, "sa-b", sidecar_args);
    w.ready(a).await;
    w.ready(b).await;
    w
}

fn curl_svc_b(w: &World, path: &str) -> (bool, String) {
    w.pods[0].curl(&[
        "--resolve",
        &format!("svc-b.{NS}.svc:80:{VIP}"),
        &format!("http://svc-b.{NS}.svc{path}"),
    ])
}

/// Waits until pod A's sidecar knows Service B (the snapshot reached it).
async fn until_routed(w: &World) {
    eventually("pod A reaches svc-b", Duration::from_secs(20), async || {
        curl_svc_b(w, "/warmup").0
    })
    .await;
}

/// What a capture saw between addresses `client` and `server`: several packets, all of them
/// HBONE (to or from the server's 15008), and none of `secrets` in clear.
fn only_hbone_between(raw: &[u8], packets: &str, client: &str, server: &str, secrets: &[&str]) {
    let between: Vec<&str> = packets
        .lines()
        .filter(|l| l.contains(&format!("{client}.")) && l.contains(&format!("{server}.")))
        .collect();
    assert!(
        between.len() > 4,
        "the capture saw the pods talk ({} bytes captured): {packets}",
        raw.len()
    );
    for l in &between {
        assert!(
            l.contains(&format!("{server}.15008")),
            "pod-to-pod traffic other than HBONE: {l}"
        );
    }
    for secret in secrets {
        assert!(
            !raw.windows(secret.len()).any(|x| x == secret.as_bytes()),
            "{secret:?} crossed the wire in clear"
        );
    }
}

/// A sidecar's metrics as Prometheus scrapes them: from outside its pod, at the port the
/// injector annotates.
async fn scrape(ip: &str) -> String {
    let url = format!("http://{ip}:15020/stats/prometheus");
    client().get(url).send().await.unwrap().text().await.unwrap()
}

/// The value of the first `name` series whose labels include every one of `labels`.
fn series(text: &str, name: &str, labels: &[String]) -> Option<u64> {
    text.lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|l| l.starts_with('{')))
        .filter(|l| labels.iter().all(|f| l.contains(f.as_str())))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

/// After A sent B 16,000 bytes of raw TCP over HBONE: B's sidecar counts the connection and,
/// in Istio's standard TCP metrics, who called (A's workload and identity, over mTLS) and the
/// bytes received from it; A's reports the same connection as its source, by the Service called.
async fn who_talks_to_whom_is_scraped(a_ip: &str, b_ip: &str, a_id: &str) {
    let b = scrape(b_ip).await;
    let hbone = ["direction=\"inbound\",path=\"hbone\"".to_string()];
    assert!(
        series(&b, "ferrum_mesh_connections_total", &hbone).is_some_and(|n| n > 0),
        "{b}"
    );
    let label = |k: &str, v: &str| format!("{k}=\"{v}\"");
    let b_id = format!("spiffe://cluster.local/ns/{NS}/sa/sa-b");
    let (a_side, b_side) = (
        [
            label("source_workload", "a-1"),
            label("source_workload_namespace", NS),
            label("source_principal", a_id),
        ],
        [
            label("destination_workload", "b-1"),
            label("destination_principal", &b_id),
        ],
    );
    let mtls = label("connection_security_policy", "mutual_tls");
    let mut from_a = vec![
        label("reporter", "destination"),
        label("source_canonical_service", "a"),
        mtls.clone(),
    ];
    from_a.extend(a_side.iter().chain(&b_side).cloned());
    let received = series(&b, "istio_tcp_received_bytes_total", &from_a);
    assert!(received.is_some_and(|n| n >= 16_000), "{received:?}\n{b}");
    assert!(
        series(&b, "istio_tcp_connections_opened_total", &from_a).is_some_and(|n| n > 0),
        "{b}"
    );

    let a = scrape(a_ip).await;
    let service = format!("svc-b.{NS}.svc.cluster.local");
    let mut to_b = vec![
        label("reporter", "source"),
        label("destination_service", &service),
        mtls,
    ];
    to_b.extend(a_side.iter().chain(&b_side).cloned());
    let sent = series(&a, "istio_tcp_received_bytes_total", &to_b);
    assert!(sent.is_some_and(|n| n >= 16_000), "{sent:?}\n{a}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pods_talk_mtls_over_hbone_and_nothing_else_crosses() {
    let mut w = two_pods(&[], &[]).await;
    until_routed(&w).await;
    let cap = w.capture(1);
    // HTTP to the Service's ClusterIP, load-balanced to B's pod, through both sidecars.
    let (ok, body) = curl_svc_b(&w, "/secret-path-7f3a");
    assert!(ok, "{body}");
    assert!(
        body.starts_with("hello from b-1: /secret-path-7f3a from 127.0.0.6"),
        "B's app answers, reached from its sidecar's inbound address: {body}"
    );
    // Raw TCP through the same path, with a half-close.
    assert_eq!(w.pods[0].echo_bulk(VIP, "tcp-payload-91c2"), "16000 tcp-payload-91c2");
    let (raw, packets) = cap.finish();
    let (a_ip, b_ip) = (&w.pods[0].ip, &w.pods[1].ip);
    let secrets = ["secret-path-7f3a", "tcp-payload-91c2", "hello from b-1"];
    only_hbone_between(&raw, &packets, a_ip, b_ip, &secrets);
    // TLS application data records (type 23, version 0x0303) carry it.
    assert!(raw.windows(3).any(|x| x == [23, 3, 3]), "no TLS records in the capture");

    // B's sidecar knows who called: A's SPIFFE ID from its certificate.
    let a_id = format!("spiffe://cluster.local/ns/{NS}/sa/sa-a");
    eventually("B logs A's identity", Duration::from_secs(5), async || {
        w.pods[1].sidecar_log().contains(&a_id)
    })
    .await;
    who_talks_to_whom_is_scraped(a_ip, b_ip, &a_id).await;

    // The HBONE port itself, as other clients see it.
    let hbone: std::net::SocketAddr = format!("{b_ip}:15008").parse().unwrap();
    let target = format!("{b_ip}:8080");
    assert!(
        connect_tunnel(hbone, None, &target).await.is_err(),
        "a client without a certificate is refused"
    );
    let foreign = foreign_svid("spiffe://evil.local/ns/mesh/sa/sa-a");
    assert!(
        connect_tunnel(hbone, Some(&foreign), &target).await.is_err(),
        "a certificate from another trust domain is refused"
    );
    let svid = mesh_svid(&w, "sa-a").await;
    assert_eq!(connect_tunnel(hbone, Some(&svid), &target).await, Ok(200));
    for port in [15001, 15006, 15008] {
        assert_eq!(
            connect_tunnel(hbone, Some(&svid), &format!("{b_ip}:{port}")).await,
            Ok(503),
            "a tunnel to the proxy's own port {port}"
        );
    }
    assert_eq!(
        connect_tunnel(hbone, Some(&svid), &format!("{a_ip}:8080")).await,
        Ok(400),
        "a tunnel to an address other than the one dialled"
    );

    // Only pod B's workload may subscribe as pod B's sidecar.
    let b_role = format!("sidecar/{NS}/b-1");
    let a_token = token(NS, "sa-a", "ferrum-ca", 600, TOKEN_KEY);
    let b_token = token(NS, "sa-b", "ferrum-ca", 600, TOKEN_KEY);
    assert_eq!(subscribe_as(&w, &b_role, None).await, Err(tonic::Code::Unauthenticated));
    assert_eq!(
        subscribe_as(&w, &b_role, Some(&a_token)).await,
        Err(tonic::Code::PermissionDenied)
    );
    assert_eq!(subscribe_as(&w, &b_role, Some(&b_token)).await, Ok(()));
    // The control plane speaks TLS only (from the mesh CA): plaintext gets nowhere.
    let plaintext = async {
        let ch = tonic::transport::Endpoint::from_shared(w.op.grpc_url())
            .ok()?
            .connect()
            .await
            .ok()?;
        subscribe(ch, "plain", &b_role, Some(&b_token)).await.ok()
    };
    assert!(
        tokio::time::timeout(Duration::from_secs(5), plaintext)
            .await
            .ok()
            .flatten()
            .is_none(),
        "a plaintext client reached the TLS control plane"
    );

    // The operator goes away: the sidecars keep their snapshot and certificates.
    w.op.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..5 {
        let (ok, body) = curl_svc_b(&w, &format!("/after-{i}"));
        assert!(
            ok && body.contains("hello from b-1"),
            "request {i} with the operator down: {body}"
        );
    }
}

/// Dual-stack pods: pod A calls Service B's IPv6 ClusterIP and reaches B's pod over HBONE
/// between the pods' IPv6 addresses (nothing else crosses, nothing in clear); raw TCP too. A pod
/// without a sidecar calling B's IPv6 address is captured by B's sidecar (PERMISSIVE: relayed
/// from `::6`), and A's call to that pod's IPv6 address goes through A's sidecar as plain TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_stack_pods_talk_over_ipv6_through_both_sidecars() {
    const VIP6: &str = "fd00:96::77:10";
    let mut w = World::a_calls_b(&[VIP, VIP6]).await;
    let (a, b) = (0, 1);
    let c = w.pod("c-1", "sa-c", "c", 12, false);
    w.app(c);
    let curl6 = |path: &str| w.pods[a].curl_svc("svc-b", VIP6, path);
    // Until A's sidecar knows B's IPv6 address, the IPv6 VIP leads to B's IPv4 one (a family
    // with no endpoints falls back to the other): B's app would see 127.0.0.6.
    eventually("A reaches B's IPv6 address", Duration::from_secs(20), async || {
        curl6("/warm6").1.contains("from ::6")
    })
    .await;

    let cap = w.capture(b);
    let (ok, body) = curl6("/secret6-path-5d1e");
    assert!(ok, "{body}");
    assert!(
        body.starts_with("hello from b-1: /secret6-path-5d1e from ::6"),
        "B's app answers, reached from its sidecar's IPv6 inbound address: {body}"
    );
    assert_eq!(
        w.pods[a].echo_bulk(VIP6, "tcp6-payload-8b3f"),
        "17000 tcp6-payload-8b3f"
    );
    let (raw, packets) = cap.finish();
    let (a6, b6) = (&w.pods[a].ip6, &w.pods[b].ip6);
    let secrets = ["secret6-path-5d1e", "tcp6-payload-8b3f", "hello from b-1"];
    only_hbone_between(&raw, &packets, a6, b6, &secrets);
    let a_id = format!("spiffe://cluster.local/ns/{NS}/sa/sa-a");
    eventually("B logs A's identity", Duration::from_secs(5), async || {
        w.pods[b].sidecar_log().contains(&a_id)
    })
    .await;

    // Around the Service, straight at B's IPv6 address from outside the mesh: B's sidecar
    // captures it (the app sees ::6, not the caller).
    let plaintext = w.pods[b].connections("inbound", "plaintext");
    let (ok, body) = w.pods[c].curl(&[&format!("http://[{b6}]:8080/plain6")]);
    assert!(ok && body.starts_with("hello from b-1: /plain6 from ::6"), "{body}");
    assert_eq!(w.pods[b].connections("inbound", "plaintext"), plaintext + 1.0);

    // To a workload without a sidecar over IPv6: A's sidecar sends it as plain TCP (C sees
    // A's address).
    let plain = w.pods[a].connections("outbound", "plain");
    let c6 = w.pods[c].ip6.clone();
    let (ok, body) = w.pods[a].curl(&[&format!("http://[{c6}]:8080/out6")]);
    assert!(
        ok && body.starts_with(&format!("hello from c-1: /out6 from {a6}")),
        "{body}"
    );
    assert_eq!(w.pods[a].connections("outbound", "plain"), plain + 1.0);
}

/// Certificates valid for 10 s (renewed every ~5 s) under a request loop: nothing fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_rotation_under_traffic_drops_nothing() {
    let w = two_pods(&[], &["--cert-validity", "10"]).await;
    until_routed(&w).await;
    let before = installed(&w);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let requests = request_loop(&w, stop.clone());
    // New connections each time (curl), so new tunnels on the rotated certificates.
    renewed(&w, &before, 2).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    none_failed(requests, 20);
}

/// Joins a request loop: every request succeeded, and there were at least `at_least`.
fn none_failed(requests: std::thread::JoinHandle<(usize, Vec<String>)>, at_least: usize) {
    let (ok, failed) = requests.join().unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {:?}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(3)]
    );
    assert!(ok >= at_least, "only {ok} requests");
}

/// Curls Service B from pod A in a loop on a thread of its own until `stop` is set: (ok, failures).
fn request_loop(w: &World, stop: Arc<std::sync::atomic::AtomicBool>) -> std::thread::JoinHandle<(usize, Vec<String>)> {
    let ns = w.pods[0].ns.0.clone();
    let resolve = format!("svc-b.{NS}.svc:80:{VIP}");
    let url = format!("http://svc-b.{NS}.svc/loop");
    std::thread::spawn(move || {
        let (mut ok, mut failed) = (0, Vec::new());
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let out = std::process::Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &ns,
                    "curl",
                    "-sS",
                    "--max-time",
                    "5",
                    "--resolve",
                    &resolve,
                    &url,
                ])
                .output()
                .unwrap();
            let body = String::from_utf8_lossy(&out.stdout).into_owned();
            if out.status.success() && body.contains("hello from b-1") {
                ok += 1;
            } else {
                failed.push(format!("{body}{}", String::from_utf8_lossy(&out.stderr)));
            }
        }
        (ok, failed)
    })
}

/// The "workload certificate installed" log lines of each sidecar.
fn installed(w: &World) -> Vec<Vec<String>> {
    w.pods
        .iter()
        .map(|p| {
            p.sidecar_log()
                .lines()
                .filter(|l| l.contains("workload certificate installed"))
                .map(String::from)
                .collect()
        })
        .collect()
}

/// Waits until every sidecar installed `n` more certificates than in `before`.
async fn renewed(w: &World, before: &[Vec<String>], n: usize) {
    eventually("every sidecar renews", Duration::from_secs(20), async || {
        installed(w)
            .iter()
            .zip(before)
            .all(|(now, was)| now.len() >= was.len() + n)
    })
    .await;
}

/// A root rotation as a cluster admin runs it, under a request loop: (1) the bundle every pod
/// mounts gets the new root beside the old; (2) the CA Secret gets the new root and the operator
/// restarts, so renewals chain to the new root; (3) the old root leaves the bundle. Not one
/// request fails, and both sidecars end on certificates from the new root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_rotation_under_traffic_drops_nothing() {
    use base64::Engine as _;
    let mut w = two_pods(&[], &["--cert-validity", "10"]).await;
    until_routed(&w).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let requests = request_loop(&w, stop.clone());
    let old_root = std::fs::read_to_string(&w.root).unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "Ferrum Mesh root CA 2");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let new_root = p.self_signed(&key).unwrap().pem();

    // (1) Old and new roots in the bundle; every sidecar re-reads it at its next renewal.
    std::fs::write(&w.root, format!("{old_root}\n{new_root}")).unwrap();
    renewed(&w, &installed(&w), 1).await;

    // (2) The CA signs with the new root from now on.
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    w.cluster.apply(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: ferrum-ca, namespace: default}}\n\
         data: {{ca.crt: {}, ca.key: {}}}\n",
        b64(&new_root),
        b64(&key.serialize_pem())
    ));
    w.restart_operator().await;
    eventually(
        "both sidecars hold certificates from the new root",
        Duration::from_secs(30),
        async || {
            installed(&w)
                .iter()
                .all(|lines| lines.last().is_some_and(|l| l.contains("root CA 2")))
        },
    )
    .await;

    // (3) The old root is no longer trusted anywhere.
    std::fs::write(&w.root, &new_root).unwrap();
    renewed(&w, &installed(&w), 1).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    none_failed(requests, 30);
    // And a pod trusting only the new root is still reached (new connection, new tunnel).
    let (good, body) = curl_svc_b(&w, "/after");
    assert!(good && body.contains("hello from b-1"), "{body}");
}

/// The kubelet's HTTP probes, rewritten by the injector to the sidecar's 15020, reach the app
/// even where mTLS is required and a plaintext probe to the app's port is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_probes_pass_through_the_sidecar_under_strict_mtls() {
    let probers = r#"{"/app-health/app/readyz": {"port": 8080, "path": "/ready", "scheme": "HTTP", "timeoutSeconds": 2},
                      "/app-health/app/livez": {"port": 8099, "path": "/", "scheme": "HTTP", "timeoutSeconds": 1}}"#;
    let w = two_pods(&[], &["--inbound-plaintext", "false", "--app-probers", probers]).await;
    let b = &w.pods[1];
    let get = async |port: u16, path: &str| {
        client()
            .get(format!("http://{}:{port}{path}", b.ip))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    };
    // The kubelet probes periodically; the app may still be starting.
    eventually(
        "the app answers through the sidecar",
        Duration::from_secs(10),
        async || get(15020, "/app-health/app/readyz").await == 200,
    )
    .await;
    assert_eq!(
        get(15020, "/app-health/app/livez").await,
        503,
        "nothing on the probed port"
    );
    assert_eq!(get(15020, "/app-health/other/readyz").await, 404);
    assert_eq!(
        get(8080, "/ready").await,
        0,
        "plaintext to the app's port is refused (STRICT)"
    );
}

/// Raw TCP from pod A to Service B's echo port: whether the bytes came back.
fn echo_through(w: &World) -> bool {
    let out = w.pods[0].run(&[
        "python3",
        "-c",
        &format!(
            "import socket; s = socket.create_connection(('{VIP}', 9000), timeout=3)\n\
             s.sendall(b'ping'); s.shutdown(socket.SHUT_WR)\nprint(s.recv(16).decode())"
        ),
    ]);
    String::from_utf8_lossy(&out.stdout).trim() == "ping"
}

/// AuthorizationPolicies that look at requests are enforced per request by B's sidecar on
/// HBONE tunnels that carry HTTP: methods and path templates allow, a header denies, and the
/// rest gets Istio's 403 `RBAC: access denied`; on the TCP port the same ALLOW cannot match, so
/// the connection is refused (fail closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_policies_are_enforced_per_request() {
    let w = two_pods(&["--rediscover-seconds", "1"], &[]).await;
    until_routed(&w).await;
    assert!(echo_through(&w), "TCP reaches B before any policy");
    w.cluster.install_istio_crds();
    w.cluster.apply(&format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: read-public, namespace: {NS}}}\n\
         spec: {{selector: {{matchLabels: {{app: b}}}}, rules: [{{to: [{{operation: {{methods: [GET], paths: [\"/public/{{*}}\"]}}}}]}}]}}\n\
         ---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: block-flagged, namespace: {NS}}}\n\
         spec: {{action: DENY, selector: {{matchLabels: {{app: b}}}}, rules: [{{when: [{{key: \"request.headers[x-block]\", values: [\"yes\"]}}]}}]}}\n"
    ));
    let get = |path: &str, extra: &[&str]| {
        let mut args = vec![
            "-o".to_string(),
            "-".into(),
            "-w".into(),
            " %{http_code}".into(),
            "--resolve".into(),
            format!("svc-b.{NS}.svc:80:{VIP}"),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(format!("http://svc-b.{NS}.svc{path}"));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        w.pods[0].curl(&args).1
    };
    eventually("the request policy takes effect", Duration::from_secs(20), async || {
        get("/private", &[]).ends_with(" 403")
    })
    .await;
    let allowed = get("/public/page", &[]);
    assert!(
        allowed.contains("hello from b-1") && allowed.ends_with(" 200"),
        "{allowed}"
    );
    let private = get("/private", &[]);
    assert_eq!(private, "RBAC: access denied 403");
    assert!(get("/public/a/b", &[]).ends_with(" 403"), "{{*}} is one segment");
    assert!(
        get("/public/page", &["-X", "POST"]).ends_with(" 403"),
        "POST is not allowed"
    );
    assert!(
        get("/public/page", &["-H", "x-block: yes"]).ends_with(" 403"),
        "the DENY header"
    );
    assert!(get("/public/page", &["-H", "x-block: no"]).ends_with(" 200"));
    // A change to a live policy: from `kubectl apply` to the first request it decides.
    let applied = std::time::Instant::now();
    w.cluster.apply(&format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: read-public, namespace: {NS}}}\n\
         spec: {{selector: {{matchLabels: {{app: b}}}}, rules: [{{to: [{{operation: {{methods: [GET], paths: [\"/public/{{*}}\", \"/private\"]}}}}]}}]}}\n"
    ));
    let mut took = Duration::ZERO;
    eventually("the changed policy takes effect", Duration::from_secs(10), async || {
        took = applied.elapsed();
        get("/private", &[]).ends_with(" 200")
    })
    .await;
    println!("policy change applied to live traffic within {} ms", took.as_millis());
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert!(!echo_through(&w), "an ALLOW on HTTP fields cannot match TCP: refused");
    let log = w.pods[1].sidecar_log();
    assert!(log.contains("request denied") && log.contains("/private"), "{log}");
    // Requests judged one by one are counted by caller and code, the denied ones as 403.
    let b = scrape(&w.pods[1].ip).await;
    let code = |c: &str| {
        let labels = [
            "reporter=\"destination\"",
            "source_workload=\"a-1\"",
            "destination_workload=\"b-1\"",
            &format!("response_code=\"{c}\""),
        ];
        series(&b, "istio_requests_total", &labels.map(String::from))
    };
    assert!(code("403").is_some_and(|n| n >= 5), "{b}");
    assert!(code("200").is_some_and(|n| n >= 3), "{b}");
}

/// B's app is told who called as Istio's sidecars tell it (`x-forwarded-client-cert`, Envoy's
/// APPEND_FORWARD): A's certificate, after whatever A's app claimed; a plaintext caller's claim
/// is dropped.
async fn client_certificates_reach_the_app_as_istios_do(w: &World) {
    let xfcc_seen = |claim: Option<&str>| {
        let mut args = vec![
            "-D".to_string(),
            "-".into(),
            "-o".into(),
            "/dev/null".into(),
            "--resolve".into(),
            format!("svc-b.{NS}.svc:80:{VIP}"),
        ];
        if let Some(c) = claim {
            args.extend(["-H".into(), format!("x-forwarded-client-cert: {c}")]);
        }
        args.push(format!("http://svc-b.{NS}.svc/who"));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (_, head) = w.pods[0].curl(&args);
        head.lines()
            .find_map(|l| l.strip_prefix("x-saw-xfcc: "))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("{head}"))
    };
    let (a_id, b_id) = (
        format!("spiffe://cluster.local/ns/{NS}/sa/sa-a"),
        format!("spiffe://cluster.local/ns/{NS}/sa/sa-b"),
    );
    let seen = xfcc_seen(None);
    let (by, rest) = seen.split_once(";Hash=").unwrap_or_else(|| panic!("{seen}"));
    assert_eq!(by, format!("By={b_id}"));
    let (hash, rest) = rest.split_once(';').unwrap();
    assert!(
        hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()),
        "{seen}"
    );
    assert_eq!(rest, format!("Subject=\"\";URI={a_id}"));
    let claimed = xfcc_seen(Some("By=x;URI=spiffe://cluster.local/ns/kube-system/sa/admin"));
    assert_eq!(
        claimed,
        format!("By=x;URI=spiffe://cluster.local/ns/kube-system/sa/admin,{seen}"),
        "what the sidecar proved comes last"
    );
    // From outside the mesh, in plaintext to B's pod: no identity reaches the app.
    let url = format!("http://{}:8080/who", w.pods[1].ip);
    let resp = client()
        .get(url)
        .header(
            "x-forwarded-client-cert",
            "By=x;URI=spiffe://cluster.local/ns/kube-system/sa/admin",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-saw-xfcc"], "-");
}

/// With `--request-metrics` and no policy that looks at requests, B's sidecar still serves
/// inbound HTTP request by request, so Prometheus reads requests by caller and response code —
/// the app's own 501 among them — and how long they took, as from Istio's sidecars; raw TCP on
/// another port is relayed as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_counted_by_caller_and_response_code() {
    let w = two_pods(&[], &["--request-metrics", "true"]).await;
    until_routed(&w).await;
    let code_of = |method: &str| {
        let (_, out) = w.pods[0].curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            method,
            "--resolve",
            &format!("svc-b.{NS}.svc:80:{VIP}"),
            &format!("http://svc-b.{NS}.svc/counted"),
        ]);
        out
    };
    for _ in 0..4 {
        assert_eq!(code_of("GET"), "200");
    }
    assert_eq!(code_of("PUT"), "501", "the app does not do PUT");
    assert!(echo_through(&w), "raw TCP is relayed");
    client_certificates_reach_the_app_as_istios_do(&w).await;
    let a_id = format!("spiffe://cluster.local/ns/{NS}/sa/sa-a");
    let labels = |code: &str| {
        [
            "reporter=\"destination\"".to_string(),
            "source_workload=\"a-1\"".into(),
            format!("source_principal=\"{a_id}\""),
            "destination_workload=\"b-1\"".into(),
            "connection_security_policy=\"mutual_tls\"".into(),
            "request_protocol=\"http\"".into(),
            format!("response_code=\"{code}\""),
        ]
    };
    // Counted as each response ends, which the client may see just before.
    let mut b = String::new();
    eventually("B's sidecar counted the PUT", Duration::from_secs(5), async || {
        b = scrape(&w.pods[1].ip).await;
        series(&b, "istio_requests_total", &labels("501")).is_some()
    })
    .await;
    // The warm-up's calls are counted too.
    let ok = series(&b, "istio_requests_total", &labels("200"));
    assert!(ok.is_some_and(|n| n >= 4), "{ok:?}\n{b}");
    assert_eq!(series(&b, "istio_requests_total", &labels("501")), Some(1), "{b}");
    let timed = series(&b, "istio_request_duration_milliseconds_count", &labels("200"));
    assert_eq!(timed, ok, "each request timed");
    // The app's answers, "hello from b-1: /counted from 127.0.0.6\n" (40 bytes) and the
    // warm-up's (39).
    let sent: f64 = b
        .lines()
        .filter(|l| l.starts_with("istio_response_bytes_sum{"))
        .filter(|l| labels("200").iter().all(|f| l.contains(f.as_str())))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("{b}"));
    let ok = ok.unwrap() as f64;
    assert!(sent >= 4.0 * 40.0 && sent <= ok * 40.0, "{sent} bytes in {ok} answers");
    let mut inf = labels("501").to_vec();
    inf.push("le=\"+Inf\"".into());
    assert_eq!(
        series(&b, "istio_request_duration_milliseconds_bucket", &inf),
        Some(1),
        "{b}"
    );
    // A's connections carry its raw TCP and its HTTP alike: the answers' bytes are in what B
    // sent back.
    let from_a = [
        "reporter=\"destination\"".to_string(),
        "source_workload=\"a-1\"".into(),
        "request_protocol=\"tcp\"".into(),
    ];
    assert!(
        series(&b, "istio_tcp_received_bytes_total", &from_a).is_some_and(|n| n >= 4),
        "{b}"
    );
    let back = series(&b, "istio_tcp_sent_bytes_total", &from_a);
    assert!(back.is_some_and(|n| n as f64 >= sent), "{back:?} < {sent}: {b}");
}

/// Pods A (meshed) and C (unmeshed) and B, whose app is Hypercorn (answering `<HTTP version>
/// <path>`) and whose AuthorizationPolicy allows only `GET /public/*`; with the base URL of B
/// for each of A (its Service, through A's sidecar) and C (B's pod, straight to B's inbound).
async fn public_only() -> (World, h2c::H2cServer, [(usize, String); 2]) {
    let mut w = World::start(&["--rediscover-seconds", "1"]).await;
    let a = w.pod("a-1", "sa-a", "a", 10, true);
    let b = w.pod("b-1", "sa-b", "b", 11, true);
    let c = w.pod("c-1", "sa-c", "c", 12, false);
    w.service("svc-b", VIP, "b");
    let ns = w.pods[b].ns.0.clone();
    let app = h2c::H2cServer::spawn(&["ip", "netns", "exec", &ns], "0.0.0.0", 8080);
    w.sidecar(a, "sa-a", &[]);
    w.sidecar(b, "sa-b", &[]);
    w.ready(a).await;
    w.ready(b).await;
    w.cluster.install_istio_crds();
    w.cluster.apply(&format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: read-public, namespace: {NS}}}\n\
         spec: {{selector: {{matchLabels: {{app: b}}}}, rules: [{{to: [{{operation: {{methods: [GET], paths: [\"/public/*\"]}}}}]}}]}}\n"
    ));
    eventually("the request policy takes effect", Duration::from_secs(20), async || {
        let denied = curl_svc_b(&w, "/admin/secret");
        let allowed = curl_svc_b(&w, "/public/x");
        denied.1.contains("RBAC: access denied") && allowed.1.contains("/public/x")
    })
    .await;
    let b_ip = w.pods[b].ip.clone();
    (
        w,
        app,
        [(a, format!("http://{VIP}")), (c, format!("http://{b_ip}:8080"))],
    )
}

/// h2c smuggling in the mesh: a client upgrades a request that B's policy allows to HTTP/2
/// cleartext, hoping that once the connection is relayed it can ask B's app (Hypercorn, which
/// switches on `Upgrade: h2c`) for what the policy denies. Neither A's sidecar (outbound) nor
/// B's (inbound, from an unmeshed pod) lets the upgrade through: the request goes on as a plain
/// HTTP/1.1 one and the denied path stays denied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_upgrade_cannot_carry_requests_past_a_policy() {
    let (w, _app, bases) = public_only().await;
    for (from, base) in bases {
        let pod = &w.pods[from];
        let out = h2c::upgrade_then_request(
            &["ip", "netns", "exec", &pod.ns.0],
            &[&format!("{base}/public/x"), &format!("{base}/admin/secret")],
        );
        assert!(
            !out.contains(" 101"),
            "{}: a sidecar switched protocols: {out}",
            pod.name
        );
        assert!(
            !out.contains("/admin/secret\n"),
            "{}: the app answered a denied request: {out}",
            pod.name
        );
        let (ok, plain) = pod.curl(&[
            "-H",
            "Connection: Upgrade, HTTP2-Settings",
            "-H",
            "Upgrade: h2c",
            "-H",
            "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
            &format!("{base}/public/x"),
        ]);
        assert!(ok && plain.trim() == "1.1 /public/x", "{}: {plain}", pod.name);
    }
}

/// A path is judged as the app will read it. `/public/../admin/secret` is `/admin/secret` to
/// any app that resolves dot segments, so it is to the policy: each proxy normalises the path
/// (RFC 3986: dot segments, percent-decoded unreserved characters) before matching and
/// forwards the normalised one; an encoded `/`, which an app may decode into a separator the
/// policy never saw, is refused — from a meshed pod (A's outbound, then B's inbound) and from an
/// unmeshed one (B's inbound alone, over HTTP/1.1 and HTTP/2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_is_judged_as_the_app_will_read_it() {
    let (w, _app, bases) = public_only().await;
    for (from, base) in bases {
        let pod = &w.pods[from];
        for http in ["--http1.1", "--http2-prior-knowledge"] {
            for (path, want) in [
                ("/public/../admin/secret", "403"),
                ("/public/%2e%2e/admin/secret", "403"),
                ("/public/.%2E/admin/secret", "403"),
                ("/public/x/../../admin/secret", "403"),
                ("/public/..%2fadmin/secret", "400"),
                ("/public/%2E/x", "200"),
            ] {
                let url = format!("{base}{path}");
                let (_, out) = pod.curl(&[http, "--path-as-is", "-w", "|%{http_code}", &url]);
                let (body, code) = out.rsplit_once('|').unwrap_or((&out, ""));
                assert_eq!(code, want, "{} {http} {path}: {body}", pod.name);
                if want == "200" {
                    assert!(
                        body.ends_with(" /public/x\n"),
                        "{} {http} {path}: the app got {body}",
                        pod.name
                    );
                }
            }
        }
    }
}

/// A client keeps its connection through the sidecars while B's app closes idle ones (Hypercorn
/// after 5 s, as Node and gunicorn do): the next request on the client's connection is not
/// lost — B's sidecar opens a new connection to the app for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_connection_outlives_the_apps_idle_close() {
    let (w, _app, bases) = public_only().await;
    const KEEP_ALIVE: &str = "import http.client, sys, time\n\
        host, port = sys.argv[1].split(':')\n\
        c = http.client.HTTPConnection(host, int(port), timeout=5)\n\
        for i, pause in enumerate([0, 6.5, 0]):\n\
        \x20   time.sleep(pause)\n\
        \x20   c.request('GET', f'/public/{i}')\n\
        \x20   r = c.getresponse()\n\
        \x20   print(r.status, r.read().decode().strip())\n";
    for (from, base) in bases {
        let pod = &w.pods[from];
        let authority = base.trim_start_matches("http://");
        let authority = if authority.contains(':') {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        let out = pod.run(&["python3", "-c", KEEP_ALIVE, &authority]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            text,
            "200 1.1 /public/0\n200 1.1 /public/1\n200 1.1 /public/2\n",
            "{}: {}",
            pod.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// An AuthorizationPolicy with action CUSTOM on B: B's sidecar asks an external authorization
/// service (MeshConfig `extensionProviders`) that is itself a pod of the mesh — reached over
/// HBONE — before a matching request goes to B's app: refused with the service's answer, or let
/// on with the header it sets; requests the policy does not match are not asked about. A gRPC
/// provider (OPA-Envoy's API) on the same pod is told the caller's SPIFFE ID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_policy_asks_an_authorization_service_in_the_mesh() {
    const AUTHZ_VIP: &str = "10.96.77.12";
    let mut w = two_pods(&["--rediscover-seconds", "1"], &[]).await;
    let z = w.pod("authz-1", "sa-authz", "authz", 12, true);
    w.service("svc-authz", AUTHZ_VIP, "authz");
    // Dual-stack, as the pod is: its IPv6 endpoint is asked too.
    let bound = w.pods[z].ns.spawn(|| std::net::TcpListener::bind("[::]:8080"));
    let authz = ferrum_testkit::ext_authz::AuthzServer::serve(bound.join().unwrap().unwrap());
    // Its gRPC twin (OPA-Envoy's API) on the Service's other port.
    let bound = w.pods[z].ns.spawn(|| std::net::TcpListener::bind("[::]:9000"));
    let opa = ferrum_testkit::ext_authz::AuthzServer::serve_grpc(bound.join().unwrap().unwrap());
    w.sidecar(z, "sa-authz", &[]);
    w.ready(z).await;
    until_routed(&w).await;
    w.cluster.install_istio_crds();
    w.cluster.apply(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: ferrum-system}}\n---\n\
         apiVersion: ferrum.dev/v1alpha1\nkind: MeshConfig\nmetadata: {{name: default, namespace: ferrum-system}}\n\
         spec: {{extensionProviders: [{{name: sample, envoyExtAuthzHttp: {{service: svc-authz.{NS}.svc.cluster.local, port: '80', \
         includeRequestHeadersInCheck: [x-ext-authz, x-user], headersToUpstreamOnAllow: [x-authz-user], \
         headersToDownstreamOnDeny: [x-ext-authz-check-result], headersToDownstreamOnAllow: [x-ext-authz-check-result], \
         includeRequestBodyInCheck: {{maxRequestBytes: 1024}}}}}}, \
         {{name: opa, envoyExtAuthzGrpc: {{service: svc-authz.{NS}.svc.cluster.local, port: 9000}}}}]}}\n---\n\
         apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: ext, namespace: {NS}}}\n\
         spec: {{selector: {{matchLabels: {{app: b}}}}, action: CUSTOM, provider: {{name: sample}}, \
         rules: [{{to: [{{operation: {{paths: [\"/private/*\"]}}}}]}}]}}\n---\n\
         apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: ext-grpc, namespace: {NS}}}\n\
         spec: {{selector: {{matchLabels: {{app: b}}}}, action: CUSTOM, provider: {{name: opa}}, \
         rules: [{{to: [{{operation: {{paths: [\"/grpc/*\"]}}}}]}}]}}\n"
    ));
    let get = |path: &str, extra: &[&str]| {
        let mut args = vec!["-D", "-", "--resolve"];
        let resolve = format!("svc-b.{NS}.svc:80:{VIP}");
        let url = format!("http://svc-b.{NS}.svc{path}");
        args.push(&resolve);
        args.extend_from_slice(extra);
        args.push(&url);
        w.pods[0].curl(&args).1
    };
    eventually("the CUSTOM policy takes effect", Duration::from_secs(20), async || {
        get("/private/page", &[]).starts_with("HTTP/1.1 403")
    })
    .await;
    let refused = get("/private/page", &[]);
    assert!(
        refused.contains("x-ext-authz-check-result: denied") && refused.contains("denied by ext_authz"),
        "the service's answer reaches the client: {refused}"
    );
    let allowed = get("/private/page", &["-H", "x-ext-authz: allow", "-H", "x-user: alice"]);
    assert!(
        allowed.starts_with("HTTP/1.1 200") && allowed.contains("x-saw-authz-user: alice"),
        "allowed, with the header the service set: {allowed}\nB's sidecar: {}",
        w.pods[1].sidecar_log()
    );
    let asked = authz.asked();
    let last = asked.last().unwrap();
    assert_eq!(last["path"], "/private/page");
    assert_eq!(last["headers"]["x-user"], "alice");
    // What the body says counts too: B's sidecar reads it ahead for the check, then the app
    // gets it whole; the service's result is on the response.
    let posted = get("/private/orders", &["--data-binary", "x-ext-authz: allow"]);
    assert!(
        posted.starts_with("HTTP/1.1 200")
            && posted.contains("x-saw-body: x-ext-authz: allow")
            && posted.contains("x-ext-authz-check-result: allowed"),
        "{posted}"
    );
    assert_eq!(authz.asked().last().unwrap()["body"], "x-ext-authz: allow");
    let n = authz.asked().len();
    assert!(get("/public", &[]).starts_with("HTTP/1.1 200"));
    assert_eq!(
        authz.asked().len(),
        n,
        "what the policy does not match is not asked about"
    );
    assert!(
        w.pods[z].connections("inbound", "hbone") >= 1.0,
        "B's sidecar reached the service's pod over HBONE"
    );

    // Over gRPC: the check names A's identity as the source principal.
    let refused = get("/grpc/page", &[]);
    assert!(
        refused.starts_with("HTTP/1.1 403") && refused.contains("denied by ext_authz"),
        "{refused}"
    );
    let allowed = get("/grpc/page", &["-H", "x-ext-authz: allow", "-H", "x-user: carol"]);
    assert!(
        allowed.starts_with("HTTP/1.1 200") && allowed.contains("x-saw-authz-user: carol"),
        "{allowed}"
    );
    let last = opa.asked().last().cloned().unwrap();
    assert_eq!(last["path"], "/grpc/page");
    assert_eq!(last["source"], format!("spiffe://cluster.local/ns/{NS}/sa/sa-a"));

    // The status says which policies ask, and why one naming an undeclared provider refuses.
    w.cluster.apply(&format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: nowhere, namespace: {NS}}}\n\
         spec: {{selector: {{matchLabels: {{app: none}}}}, action: CUSTOM, provider: {{name: missing}}, rules: [{{}}]}}\n"
    ));
    let condition = |name: &str| {
        let v = w.cluster.get("authorizationpolicy", NS, name);
        let c = &v["status"]["conditions"][0];
        let field = |k: &str| c[k].as_str().unwrap_or("").to_string();
        (field("status"), field("reason"), field("message"))
    };
    eventually("the policies' status is written", Duration::from_secs(20), async || {
        condition("ext").0 == "True" && condition("nowhere").0 == "False"
    })
    .await;
    let (_, reason, message) = condition("nowhere");
    assert_eq!(reason, "BackendNotFound");
    assert!(message.contains("no extensionProviders entry \"missing\""), "{message}");
}

/// Istio AuthorizationPolicies (the CRDs installed while the mesh runs) decide who reaches B:
/// DENY by principal, ALLOW by namespace, dry-run, and removal — each enforced by B's sidecar on
/// the HBONE tunnel (401) and seen as a refused connection by A's app; then a PeerAuthentication
/// turns plaintext from an unmeshed pod away (STRICT) and back (removed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_policies_decide_who_reaches_b() {
    let mut w = two_pods(&["--rediscover-seconds", "1"], &[]).await;
    w.pod("c-1", "sa-c", "c", 12, false);
    until_routed(&w).await;
    w.cluster.install_istio_crds();
    let policy = |name: &str, action: &str, annotations: &str, rules: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {NS}{annotations}}}\n\
             spec: {{action: {action}, selector: {{matchLabels: {{app: b}}}}, rules: {rules}}}\n"
        )
    };
    let reaches = |w: &World| curl_svc_b(w, "/authz").0;
    let denied = || w.pods[1].sidecar_log().matches("connection denied").count();

    let deny_a = policy(
        "deny-a",
        "DENY",
        "",
        &format!("[{{from: [{{source: {{principals: [cluster.local/ns/{NS}/sa/sa-a]}}}}]}}]"),
    );
    w.cluster.apply(&deny_a);
    eventually("the DENY policy takes effect", Duration::from_secs(20), async || {
        !reaches(&w)
    })
    .await;
    assert!(denied() > 0, "B's sidecar says it denied: {}", w.pods[1].sidecar_log());
    // Each sidecar receives only the policies that select its workload.
    let policies_of = |i: usize| -> Vec<String> {
        let out = w.pods[i].run(&["curl", "-s", "--max-time", "3", "127.0.0.1:15000/config"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v["snapshot"]["policies"]
            .as_array()
            .map(|a| a.iter().filter_map(|p| p["key"].as_str().map(String::from)).collect())
            .unwrap_or_default()
    };
    assert_eq!(policies_of(1), [format!("AuthorizationPolicy/{NS}/deny-a")]);
    assert!(policies_of(0).is_empty(), "A is not selected: {:?}", policies_of(0));
    // Status: the policy is Accepted; a CUSTOM one that names no provider says why it is not.
    w.cluster.apply(&policy("ext", "CUSTOM", "", "[{}]"));
    let condition = |name: &str| {
        let v = w.cluster.get("authorizationpolicy", NS, name);
        let c = &v["status"]["conditions"][0];
        (
            c["status"].as_str().unwrap_or("").to_string(),
            c["reason"].as_str().unwrap_or("").to_string(),
        )
    };
    eventually("policy status written", Duration::from_secs(20), async || {
        condition("deny-a") == ("True".to_string(), "Accepted".to_string())
            && condition("ext") == ("False".to_string(), "Invalid".to_string())
    })
    .await;
    w.cluster
        .kubectl(&["delete", "authorizationpolicy", "ext", "-n", NS], None);

    // Dry-run: evaluated and logged, never enforced.
    w.cluster.apply(&policy(
        "deny-a",
        "DENY",
        ", annotations: {istio.io/dry-run: 'true'}",
        &format!("[{{from: [{{source: {{principals: [cluster.local/ns/{NS}/sa/sa-a]}}}}]}}]"),
    ));
    eventually("dry-run lets A through", Duration::from_secs(20), async || reaches(&w)).await;
    assert!(w.pods[1].sidecar_log().contains("dry-run: would deny"));

    // ALLOW only another namespace: A is not in it.
    w.cluster
        .kubectl(&["delete", "authorizationpolicy", "deny-a", "-n", NS], None);
    w.cluster.apply(&policy(
        "only-ops",
        "ALLOW",
        "",
        "[{from: [{source: {namespaces: [ops]}}]}]",
    ));
    eventually(
        "an ALLOW for another namespace shuts A out",
        Duration::from_secs(20),
        async || !reaches(&w),
    )
    .await;
    // …and ALLOW A's namespace too: in again.
    w.cluster.apply(&policy(
        "only-ops",
        "ALLOW",
        "",
        &format!("[{{from: [{{source: {{namespaces: [ops, {NS}]}}}}]}}]"),
    ));
    eventually("an ALLOW that matches lets A in", Duration::from_secs(20), async || {
        reaches(&w)
    })
    .await;
    w.cluster
        .kubectl(&["delete", "authorizationpolicy", "only-ops", "-n", NS], None);
    assert!(reaches(&w));

    // PeerAuthentication: a pod without a sidecar reaches B in plaintext (PERMISSIVE by
    // default) until the namespace turns STRICT — over IPv4 and IPv6 alike; A, over HBONE,
    // still does.
    let plain_to = |w: &World, host: &str| {
        w.pods[2]
            .curl(&[&format!("http://{host}:8080/plain")])
            .1
            .contains("hello from b-1")
    };
    let b6 = format!("[{}]", w.pods[1].ip6);
    let plain = |w: &World| plain_to(w, &w.pods[1].ip);
    eventually("plaintext from an unmeshed pod", Duration::from_secs(10), async || {
        plain(&w)
    })
    .await;
    assert!(plain_to(&w, &b6), "PERMISSIVE over IPv6 too");
    w.cluster.apply(&format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: default, namespace: {NS}}}\nspec: {{mtls: {{mode: STRICT}}}}\n"
    ));
    eventually("STRICT refuses plaintext", Duration::from_secs(20), async || !plain(&w)).await;
    assert!(!plain_to(&w, &b6), "STRICT refuses plaintext over IPv6 too");
    assert!(reaches(&w), "mTLS (HBONE) still passes under STRICT");
    w.cluster
        .kubectl(&["delete", "peerauthentication", "default", "-n", NS], None);
    eventually("back to PERMISSIVE", Duration::from_secs(20), async || plain(&w)).await;
}

/// Subscribes to the operator with `role` and `token`: Ok once a snapshot arrives.
async fn subscribe_as(w: &World, role: &str, token: Option<&str>) -> Result<(), tonic::Code> {
    use ferrum_proto::mesh::v1::subscribe_response;
    let node = format!("probe-{}", free_port());
    let root = std::fs::read_to_string(&w.root).unwrap();
    let addr = format!("{}:{}", w.op.host, w.op.grpc).parse().unwrap();
    let ch = tls_channel(addr, &w.op.host, &root).await;
    let (_tx, mut stream) = subscribe(ch, &node, role, token).await.map_err(|s| s.code())?;
    loop {
        match stream.message().await {
            Ok(Some(m)) if matches!(m.message, Some(subscribe_response::Message::Snapshot(_))) => return Ok(()),
            Ok(Some(_)) => continue,
            Ok(None) => return Err(tonic::Code::Unknown),
            Err(s) => return Err(s.code()),
        }
    }
}

type ClientAuth = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// Opens one HBONE tunnel by hand (TLS 1.3 + HTTP/2 CONNECT, accepting any server certificate):
/// the CONNECT's status, or why there was none.
async fn connect_tunnel(addr: std::net::SocketAddr, auth: Option<&ClientAuth>, authority: &str) -> Result<u16, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let b = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ferrum_dp::upstream::connector::NoVerify(provider)));
    let mut cfg = match auth {
        Some((chain, key)) => b.with_client_auth_cert(chain.clone(), key.clone_key()).unwrap(),
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let run = async {
        let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(rustls_pki_types::ServerName::IpAddress(addr.ip().into()), tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tls),
        )
        .await
        .map_err(|e| format!("h2: {e}"))?;
        tokio::spawn(conn);
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(authority)
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.map_err(|e| format!("CONNECT: {e}"))?;
        Ok(resp.status().as_u16())
    };
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

/// A well-formed SVID from a CA the mesh does not trust.
fn foreign_svid(id: &str) -> ClientAuth {
    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut leaf = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().unwrap())];
    leaf.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    (
        vec![cert.der().clone(), ca_cert.der().clone()],
        PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap(),
    )
}

/// A real SVID for `sa` from the operator's CA.
async fn mesh_svid(w: &World, sa: &str) -> ClientAuth {
    use ferrum_proto::istio::v1::auth::IstioCertificateRequest;
    use ferrum_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name = rcgen::DistinguishedName::new();
    let csr = p.serialize_request(&key).unwrap().pem().unwrap();
    let addr = format!("{}:{}", w.op.host, w.op.ca.unwrap()).parse().unwrap();
    let root = std::fs::read_to_string(&w.root).unwrap();
    let mut ca = IstioCertificateServiceClient::new(tls_channel(addr, &w.op.host, &root).await);
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: 600,
        metadata: None,
    });
    let t = token(NS, sa, "ferrum-ca", 600, TOKEN_KEY);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {t}").parse().unwrap());
    let chain = ca.create_certificate(req).await.unwrap().into_inner().cert_chain;
    (
        chain
            .iter()
            .map(|c| CertificateDer::from_pem_slice(c.as_bytes()).unwrap())
            .collect(),
        PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap(),
    )
}

/// `n` calls from pod `from` to `path` on svc-b, each on a connection of its own (so L4
/// balancing alone would spread them), `extra` curl arguments added: (answers from b-1, from b-2).
fn calls_to_svc_b(w: &World, from: usize, n: usize, path: &str, extra: &[&str]) -> (usize, usize) {
    calls_to(w, from, ("svc-b", VIP), n, path, extra)
}

/// [`calls_to_svc_b`] for Service `name` at `vip`.
fn calls_to(w: &World, from: usize, (name, vip): (&str, &str), n: usize, path: &str, extra: &[&str]) -> (usize, usize) {
    let resolve = format!("{name}.{NS}.svc:80:{vip}");
    let url = format!("http://{name}.{NS}.svc{path}");
    let mut args = vec![
        "curl",
        "-sS",
        "--max-time",
        "60",
        "-H",
        "connection: close",
        "--resolve",
        &resolve,
    ];
    args.extend_from_slice(extra);
    args.extend(std::iter::repeat_n(url.as_str(), n));
    let out = String::from_utf8_lossy(&w.pods[from].run(&args).stdout).into_owned();
    (
        out.matches("hello from b-1").count(),
        out.matches("hello from b-2").count(),
    )
}

/// Pod A, and Service B over two pods, b-1 (`version: v1`) and b-2 (`v2`), each version also a
/// Service of its own (b-v1, b-v2): every pod with its app and a sidecar, A routed to svc-b.
async fn two_versions_of_b(sidecar_args: &[&str]) -> (World, [usize; 3]) {
    let mut w = World::start(&[]).await;
    let a = w.pod("a-1", "sa-a", "a", 10, true);
    let b1 = w.pod_labelled("b-1", "sa-b", "app: b, version: v1", 11, true);
    let b2 = w.pod_labelled("b-2", "sa-b", "app: b, version: v2", 12, true);
    w.service("svc-b", VIP, "b");
    w.service_selecting("b-v1", "10.96.77.11", "app: b, version: v1");
    w.service_selecting("b-v2", "10.96.77.12", "app: b, version: v2");
    for (i, sa) in [(b1, "sa-b"), (b2, "sa-b"), (a, "sa-a")] {
        w.app(i);
        w.sidecar(i, sa, sidecar_args);
    }
    for i in [a, b1, b2] {
        w.ready(i).await;
    }
    until_routed(&w).await;
    (w, [a, b1, b2])
}

/// Topology-aware routing (`trafficDistribution: PreferClose`): A and b-2 run on a node in
/// zone-a, b-1 on one in zone-b (the operator reads the nodes' zones); A's sidecar keeps its
/// connections to svc-b — raw TCP and HTTP — on b-2, and when b-2's app stops answering, a
/// connection's last try crosses to b-1, so nothing fails. Without PreferClose both serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefer_close_service_keeps_the_callers_connections_in_its_zone() {
    let (mut w, [a, b1, b2]) = two_versions_of_b(&[]).await;
    let service = |w: &World, distribution: &str| {
        w.cluster.apply(&format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {NODE}, labels: {{topology.kubernetes.io/zone: zone-a}}}}\n---\n\
             apiVersion: v1\nkind: Node\nmetadata: {{name: node-b, labels: {{topology.kubernetes.io/zone: zone-b}}}}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {{name: svc-b, namespace: {NS}}}\n\
             spec: {{clusterIP: '{VIP}', selector: {{app: b}}, {distribution}ports: [{{name: http, port: 80, targetPort: http}}, {{name: echo, port: 9000, targetPort: 9000}}]}}\n"
        ))
    };
    let tunnels = |w: &World| {
        (
            w.pods[b1].connections("inbound", "hbone"),
            w.pods[b2].connections("inbound", "hbone"),
        )
    };
    // (to b-1, to b-2) of `n` raw TCP connections, and how many were echoed.
    let spread = |w: &World, n: usize| {
        let before = tunnels(w);
        let echoed = echoes_to_svc_b(w, a, n);
        let after = tunnels(w);
        ((after.0 - before.0) as usize, (after.1 - before.1) as usize, echoed)
    };
    w.place(b1, "node-b");
    service(&w, "trafficDistribution: PreferClose, ");
    eventually(
        "A's sidecar keeps connections in zone-a",
        Duration::from_secs(20),
        async || spread(&w, 10) == (0, 10, 10),
    )
    .await;
    assert_eq!(spread(&w, 40), (0, 40, 40), "raw TCP stays on b-2");
    assert_eq!(calls_to_svc_b(&w, a, 20, "/z", &[]), (0, 20), "HTTP too");

    // b-2 stops answering: each connection fails there, then crosses to zone-b.
    w.pods[b2].app = None;
    let (to_b1, _, echoed) = spread(&w, 10);
    let log = std::fs::read_to_string(&w.pods[a].log).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(20).collect();
    assert_eq!(
        (to_b1, echoed),
        (10, 10),
        "the last try goes to the other zone: {tail:#?}"
    );

    w.app(b2);
    service(&w, "");
    eventually(
        "without PreferClose, both pods serve again",
        Duration::from_secs(20),
        async || {
            let (x, y, echoed) = spread(&w, 20);
            x >= 4 && y >= 4 && echoed == 20
        },
    )
    .await;
}

/// GAMMA: an HTTPRoute whose parent is Service B (port 80) routes pod A's plain HTTP calls to
/// B's ClusterIP in A's sidecar — 80/20 between two versions, a header pinned to v2 — over HBONE
/// to the chosen pod; the route is reported Accepted on its Service parentRef. Port 9000 of the
/// same Service is not a parent: raw TCP there is balanced as before. Deleting the route
/// returns HTTP to plain balancing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_routes_split_and_match_in_the_client_sidecar() {
    let (w, [a, b1, b2]) = two_versions_of_b(&["--request-metrics", "true"]).await;
    w.cluster.apply(&format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: b-split, namespace: {NS}}}\n\
         spec:\n  parentRefs: [{{group: '', kind: Service, name: svc-b, port: 80}}]\n  rules:\n\
         \x20 - matches: [{{headers: [{{name: x-version, value: v2}}]}}]\n    backendRefs: [{{name: b-v2, port: 80}}]\n\
         \x20 - backendRefs: [{{name: b-v1, port: 80, weight: 80}}, {{name: b-v2, port: 80, weight: 20}}]\n"
    ));
    // `n` calls, on one keep-alive connection unless told otherwise: the sidecar routes each
    // request on its own.
    let calls = |n: usize, extra: &[&str]| -> (usize, usize) {
        let mut args = vec!["curl", "-sS", "--max-time", "120"];
        args.extend_from_slice(extra);
        let resolve = format!("svc-b.{NS}.svc:80:{VIP}");
        args.extend(["--resolve", &resolve]);
        let url = format!("http://svc-b.{NS}.svc/r");
        args.extend(std::iter::repeat_n(url.as_str(), n));
        let out = String::from_utf8_lossy(&w.pods[a].run(&args).stdout).into_owned();
        (
            out.matches("hello from b-1").count(),
            out.matches("hello from b-2").count(),
        )
    };
    // A connection per call: balanced at L4 (before the route applies) they alternate.
    let pinned = ["-H", "x-version: v2", "-H", "connection: close"];
    eventually("the header rule pins v2", Duration::from_secs(20), async || {
        calls(10, &pinned) == (0, 10)
    })
    .await;
    let (v1, v2) = calls(1000, &[]);
    assert_eq!(v1 + v2, 1000, "every call answered");
    let share = v1 as f64 / 1000.0;
    println!("GAMMA split over 1000 calls: v1 {v1}, v2 {v2} (v1 share {share:.3}, want 0.80 ± 0.05)");
    assert!((share - 0.80).abs() <= 0.05, "v1 share {share}");

    let route = w.cluster.get("httproute", NS, "b-split");
    let parent = &route["status"]["parents"][0];
    assert_eq!(parent["parentRef"]["kind"], "Service", "{route}");
    let accepted = parent["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Accepted")
        .unwrap();
    assert_eq!(accepted["status"], "True", "{route}");

    let routed = w.pods[0].connections("outbound", "routed");
    let tunnels = w.pods[a].connections("outbound", "hbone");
    assert!(routed >= 2.0 && tunnels >= 2.0, "routed {routed}, tunnels {tunnels}");
    for b in [b1, b2] {
        let n = w.pods[b].connections("inbound", "hbone");
        assert!(n >= 1.0, "{} got {n} tunnels", w.pods[b].name);
    }
    assert!(echo_through(&w), "raw TCP to port 9000 is balanced as before");
    calls_are_counted_by_the_service_and_pod_that_answered(&w.pods[a].ip, (v1, v2)).await;

    w.cluster.kubectl(&["delete", "httproute", "b-split", "-n", NS], None);
    eventually(
        "without the route, the header no longer pins v2",
        Duration::from_secs(20),
        async || calls(10, &pinned).0 > 0,
    )
    .await;
}

/// A's sidecar, which routed `split` calls to b-1 (by Service b-v1) and b-2 (b-v2), counts
/// them as its calls (Istio's `reporter="source"`): by the Service the route sent each to, the
/// pod that answered and the identity its tunnel checked — requests only, no connections.
async fn calls_are_counted_by_the_service_and_pod_that_answered(a_ip: &str, split: (usize, usize)) {
    let b_id = format!("spiffe://cluster.local/ns/{NS}/sa/sa-b");
    let to = |pod: &str, service: &str| {
        [
            "reporter=\"source\"".to_string(),
            "source_workload=\"a-1\"".into(),
            format!("destination_workload=\"{pod}\""),
            format!("destination_principal=\"{b_id}\""),
            format!("destination_service=\"{service}.{NS}.svc.cluster.local\""),
            format!("destination_service_name=\"{service}\""),
            "connection_security_policy=\"mutual_tls\"".into(),
        ]
    };
    let ok = |pod: &str, service: &str| {
        let mut l = to(pod, service).to_vec();
        l.extend(["request_protocol=\"http\"".into(), "response_code=\"200\"".into()]);
        l
    };
    let mut text = String::new();
    eventually("A counted its calls to b-2", Duration::from_secs(5), async || {
        text = scrape(a_ip).await;
        series(&text, "istio_requests_total", &ok("b-2", "b-v2")).is_some_and(|n| n >= split.1 as u64)
    })
    .await;
    let v1 = series(&text, "istio_requests_total", &ok("b-1", "b-v1"));
    assert!(v1.is_some_and(|n| n >= split.0 as u64), "{v1:?} < {}: {text}", split.0);
    let timed = series(&text, "istio_request_duration_milliseconds_count", &ok("b-1", "b-v1"));
    assert_eq!(timed, v1, "each call timed");
    assert_eq!(
        series(&text, "istio_requests_total", &to("b-1", "b-v2")),
        None,
        "b-1 answered only by b-v1: {text}"
    );
    assert_eq!(
        series(&text, "istio_tcp_connections_opened_total", &to("b-1", "b-v1")),
        None,
        "routed calls are not connections: {text}"
    );
}

/// An Istio VirtualService on Service B routes pod A's HTTP in A's sidecar, first match wins
/// (an earlier prefix beats a later exact path, unlike Gateway API precedence): a header or a
/// string prefix pins v2, as does a DestinationRule subset of svc-b itself, a path is
/// redirected, another rewritten, one answered by the sidecar itself (`directResponse`), faults
/// abort or delay, copies are mirrored to v2, the rest goes to v1 by weight.
/// It is reported Accepted; deleting it returns HTTP to plain balancing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_virtual_service_routes_in_the_client_sidecar_first_match_first() {
    let (w, [a, _, _]) = two_versions_of_b(&[]).await;
    w.cluster.install_istio_crds();
    w.cluster.apply(&format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: svc-b, namespace: {NS}}}\n\
         spec: {{host: svc-b, subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]}}\n"
    ));
    w.cluster.apply(&format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: b-routes, namespace: {NS}}}\n\
         spec:\n  hosts: [svc-b]\n  http:\n\
         \x20 - match: [{{uri: {{prefix: /first}}}}]\n    route: [{{destination: {{host: b-v1}}}}]\n\
         \x20 - match: [{{uri: {{exact: /first/exact}}}}]\n    route: [{{destination: {{host: b-v2}}}}]\n\
         \x20 - match: [{{uri: {{prefix: /team}}}}]\n    delegate: {{name: team-b}}\n\
         \x20 - match: [{{headers: {{x-version: {{exact: v2}}}}}}, {{uri: {{prefix: /v2}}}}]\n    route: [{{destination: {{host: b-v2}}}}]\n\
         \x20 - match: [{{uri: {{exact: /old}}}}]\n    redirect: {{uri: /new, redirectCode: 302}}\n\
         \x20 - match: [{{uri: {{prefix: /maintenance}}}}]\n    directResponse: {{status: 503, body: {{string: down for maintenance}}}}\n\
         \x20 - match: [{{uri: {{exact: /CaseLess}}, ignoreUriCase: true}}]\n    route: [{{destination: {{host: b-v2}}}}]\n\
         \x20 - match: [{{uri: {{exact: /legacy}}}}]\n    rewrite: {{uri: /modern}}\n    route: [{{destination: {{host: b-v1}}}}]\n\
         \x20 - match: [{{headers: {{x-subset: {{exact: v2}}}}}}]\n    route: [{{destination: {{host: svc-b, subset: v2}}}}]\n\
         \x20 - match: [{{uri: {{prefix: /mirrored}}}}]\n    route: [{{destination: {{host: b-v1}}}}]\n    mirror: {{host: b-v2}}\n\
         \x20 - match: [{{headers: {{x-fault: {{exact: abort}}}}}}]\n    fault: {{abort: {{httpStatus: 418, percentage: {{value: 100}}}}}}\n    route: [{{destination: {{host: b-v1}}}}]\n\
         \x20 - match: [{{headers: {{x-fault: {{exact: delay}}}}}}]\n    fault: {{delay: {{fixedDelay: 0.4s, percentage: {{value: 100}}}}}}\n    route: [{{destination: {{host: b-v1}}}}]\n\
         \x20 - match: [{{headers: {{x-fault: {{exact: grpc}}}}}}]\n    fault: {{abort: {{grpcStatus: UNAVAILABLE, percentage: {{value: 100}}}}}}\n    route: [{{destination: {{host: b-v1}}}}]\n\
         \x20 - route: [{{destination: {{host: b-v1}}, weight: 100}}, {{destination: {{host: b-v2}}, weight: 0}}]\n"
    ));
    let calls = |n: usize, path: &str, extra: &[&str]| calls_to_svc_b(&w, a, n, path, extra);
    eventually(
        "the VirtualService sends the rest to v1",
        Duration::from_secs(20),
        async || calls(10, "/any", &[]) == (10, 0),
    )
    .await;
    assert_eq!(
        calls(10, "/first/exact", &[]),
        (10, 0),
        "the earlier prefix wins over the later exact path"
    );
    assert_eq!(
        calls(10, "/any", &["-H", "x-version: v2"]),
        (0, 10),
        "the header pins v2"
    );
    assert_eq!(calls(10, "/v2beta", &[]), (0, 10), "Istio prefixes are string prefixes");
    // A delegated route: the team's VirtualService (no hosts) routes under /team — and a change
    // to it alone takes effect.
    let team = |v2: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: team-b, namespace: {NS}}}\n\
             spec:\n  http:\n\
             \x20 - match: [{{uri: {{prefix: /team/new}}}}]\n    route: [{{destination: {{host: {v2}}}}}]\n\
             \x20 - route: [{{destination: {{host: b-v1}}}}]\n"
        )
    };
    w.cluster.apply(&team("b-v2"));
    eventually(
        "the delegate's routes serve /team",
        Duration::from_secs(20),
        async || calls(10, "/team/new/x", &[]) == (0, 10),
    )
    .await;
    assert_eq!(calls(10, "/team/old", &[]), (10, 0));
    w.cluster.apply(&team("b-v1"));
    eventually(
        "an edit of the delegate alone takes effect",
        Duration::from_secs(20),
        async || calls(10, "/team/new/x", &[]) == (10, 0),
    )
    .await;
    assert_eq!(calls(10, "/cASElESS", &[]), (0, 10), "ignoreUriCase");
    assert_eq!(
        calls(10, "/any", &["-H", "x-subset: v2"]),
        (0, 10),
        "the DestinationRule subset v2: svc-b's pods labelled version v2"
    );
    let (ok, head) = w.pods[a].curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{redirect_url}",
        "--resolve",
        &format!("svc-b.{NS}.svc:80:{VIP}"),
        &format!("http://svc-b.{NS}.svc/old"),
    ]);
    assert!(ok && head == format!("302 http://svc-b.{NS}.svc/new"), "{head}");
    let (_, answered) = w.pods[a].curl(&[
        "-w",
        " %{http_code}",
        "--resolve",
        &format!("svc-b.{NS}.svc:80:{VIP}"),
        &format!("http://svc-b.{NS}.svc/maintenance/now"),
    ]);
    assert_eq!(answered, "down for maintenance 503", "A's sidecar answers itself");
    // Copies go to b-v2 as well (A's sidecar counts them on that cluster); answers come from v1.
    let mirrored = || {
        let out = w.pods[a].run(&["curl", "-sS", "http://127.0.0.1:15000/metrics"]);
        let series = "ferrum_cluster_requests_total{cluster=\"service/mesh/b-v2:80\",code=\"2xx\"}";
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let before = mirrored();
    assert_eq!(calls(10, "/mirrored", &[]), (10, 0), "the route's answers are v1's");
    eventually("ten copies reached v2", Duration::from_secs(10), async || {
        mirrored() >= before + 10.0
    })
    .await;
    let faulted = |fault: &str, out: &str| {
        w.pods[a]
            .curl(&[
                "-H",
                &format!("x-fault: {fault}"),
                "-w",
                out,
                "--resolve",
                &format!("svc-b.{NS}.svc:80:{VIP}"),
                &format!("http://svc-b.{NS}.svc/f"),
            ])
            .1
    };
    let aborted = faulted("abort", " %{http_code}");
    assert_eq!(
        aborted, "fault_filter_abort\n 418",
        "the abort answers in the client's sidecar"
    );
    let (_, grpc) = w.pods[a].curl(&[
        "-D",
        "-",
        "-H",
        "x-fault: grpc",
        "--resolve",
        &format!("svc-b.{NS}.svc:80:{VIP}"),
        &format!("http://svc-b.{NS}.svc/pkg.Svc/Call"),
    ]);
    assert!(
        grpc.starts_with("HTTP/1.1 200")
            && grpc.contains("grpc-status: 14")
            && grpc.contains("content-type: application/grpc"),
        "a gRPC abort is a gRPC error: {grpc}"
    );
    let delayed = faulted("delay", " %{time_total}");
    let secs: f64 = delayed.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(
        delayed.starts_with("hello from b-1") && secs >= 0.4,
        "delayed, then forwarded: {delayed}"
    );
    let (ok, body) = curl_svc_b(&w, "/legacy");
    assert!(ok && body.starts_with("hello from b-1: /modern"), "{body}");

    let vs = w.cluster.get("virtualservice", NS, "b-routes");
    assert_eq!(vs["status"]["conditions"][0]["status"], "True", "{vs}");

    w.cluster
        .kubectl(&["delete", "virtualservice", "b-routes", "-n", NS], None);
    eventually(
        "without it, plain balancing reaches v2 again",
        Duration::from_secs(20),
        async || calls(10, "/any", &[]).1 > 0,
    )
    .await;
}

/// Opens `n` TCP connections in turn from pod `from` to svc-b's port 9000 (the echo port),
/// each sending a line and reading it back; how many came back whole.
fn echoes_to_svc_b(w: &World, from: usize, n: usize) -> usize {
    let out = w.pods[from].run(&[
        "python3",
        "-c",
        &format!(
            "import socket\nok = 0\nfor i in range({n}):\n\
             \x20   s = socket.create_connection(('{VIP}', 9000), timeout=5)\n\
             \x20   s.sendall(b'ping %d' % i); s.shutdown(socket.SHUT_WR)\n\
             \x20   got = b''\n\
             \x20   while True:\n\
             \x20       b = s.recv(64)\n\
             \x20       if not b: break\n\
             \x20       got += b\n\
             \x20   ok += got == b'ping %d' % i\n\
             \x20   s.close()\n\
             print(ok)"
        ),
    ]);
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
}

/// TCP traffic shifting, Istio's task: a VirtualService `tcp` route on svc-b's port 9000 sends
/// pod A's raw TCP connections to the DestinationRule's subsets by weight, decided per
/// connection in A's sidecar and carried over HBONE to the chosen pod; HTTP on port 80 is not
/// the route's and stays balanced. Shifting the weights moves the connections; deleting the
/// VirtualService returns to plain balancing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_virtual_service_shifts_tcp_connections_between_subsets() {
    let (w, [a, b1, b2]) = two_versions_of_b(&[]).await;
    w.cluster.install_istio_crds();
    let shift = |v1: u32, v2: u32| {
        w.cluster.apply(&format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: svc-b, namespace: {NS}}}\n\
             spec: {{host: svc-b, subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]}}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: b-tcp, namespace: {NS}}}\n\
             spec:\n  hosts: [svc-b]\n  tcp:\n\
             \x20 - match: [{{port: 9000}}]\n    route:\n\
             \x20   - {{destination: {{host: svc-b, subset: v1, port: {{number: 9000}}}}, weight: {v1}}}\n\
             \x20   - {{destination: {{host: svc-b, subset: v2, port: {{number: 9000}}}}, weight: {v2}}}\n"
        ))
    };
    // Connections each pod's sidecar took in over HBONE.
    let tunnels = || {
        (
            w.pods[b1].connections("inbound", "hbone"),
            w.pods[b2].connections("inbound", "hbone"),
        )
    };
    // (to v1, to v2) of `n` connections, every one echoed.
    let spread = |n: usize| {
        let before = tunnels();
        assert_eq!(echoes_to_svc_b(&w, a, n), n, "every connection echoed");
        let after = tunnels();
        ((after.0 - before.0) as usize, (after.1 - before.1) as usize)
    };
    shift(0, 100);
    eventually(
        "the route sends every connection to v2",
        Duration::from_secs(20),
        async || spread(10) == (0, 10),
    )
    .await;
    let vs = w.cluster.get("virtualservice", NS, "b-tcp");
    assert_eq!(vs["status"]["conditions"][0]["status"], "True", "{vs}");
    let http = calls_to_svc_b(&w, a, 20, "/r", &[]);
    assert!(http.0 > 0 && http.1 > 0, "HTTP on port 80 is not the route's: {http:?}");

    shift(80, 20);
    eventually("the new weights are in effect", Duration::from_secs(20), async || {
        spread(10).0 > 0
    })
    .await;
    let (v1, v2) = spread(300);
    let share = v1 as f64 / 300.0;
    println!("TCP shift over 300 connections: v1 {v1}, v2 {v2} (v1 share {share:.3}, want 0.80 ± 0.07)");
    assert_eq!(v1 + v2, 300, "each connection reached one pod");
    assert!((share - 0.80).abs() <= 0.07, "v1 share {share}");
    let routed = w.pods[a].connections("outbound", "routed");
    assert!(routed >= 300.0, "A's sidecar counts them routed: {routed}");

    w.cluster
        .kubectl(&["delete", "virtualservice", "b-tcp", "-n", NS], None);
    eventually(
        "without it, connections are balanced over both pods",
        Duration::from_secs(20),
        async || {
            let (v1, v2) = spread(10);
            v1 >= 4 && v2 >= 4
        },
    )
    .await;
}

/// A DestinationRule alone — no route of any kind — applies to each request of a Service port
/// declared HTTP (svc-b's port 80 is named `http`): with consistent hashing on `x-user`, each
/// user's calls from A stay on one pod of B, connection after connection, while the users
/// spread over both; without the rule, one user's connections are balanced over both pods.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_rule_alone_balances_each_request_of_an_http_port() {
    let (mut w, [a, _, b2]) = two_versions_of_b(&[]).await;
    w.cluster.install_istio_crds();
    let as_user = |w: &World, user: &str, n: usize| calls_to_svc_b(w, a, n, "/u", &["-H", &format!("x-user: {user}")]);
    let one_user = as_user(&w, "alice", 10);
    assert!(
        one_user.0 > 0 && one_user.1 > 0,
        "no rule: one user's connections go to both pods: {one_user:?}"
    );
    w.cluster.apply(&format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: svc-b, namespace: {NS}}}\n\
         spec: {{host: svc-b, trafficPolicy: {{loadBalancer: {{consistentHash: {{httpHeaderName: x-user}}}}}}}}\n"
    ));
    eventually("the rule pins a user to one pod", Duration::from_secs(20), async || {
        let (x, y) = as_user(&w, "alice", 10);
        x + y == 10 && (x == 0 || y == 0)
    })
    .await;
    let mut pods = (0, 0);
    for i in 0..12 {
        let (x, y) = as_user(&w, &format!("user-{i}"), 6);
        assert_eq!(x + y, 6, "user-{i}: every call answered");
        assert!(x == 0 || y == 0, "user-{i} stays on one pod: {x} / {y}");
        pods.0 += usize::from(x > 0);
        pods.1 += usize::from(y > 0);
    }
    println!(
        "12 users over svc-b's pods under the rule: b-1 {}, b-2 {}",
        pods.0, pods.1
    );
    assert!(pods.0 > 0 && pods.1 > 0, "the users spread over both pods: {pods:?}");
    // A port that declares no protocol (one port, no name): sniffed, and its HTTP served per
    // request under its rule too, as Istio's protocol detection would.
    let undeclared = ("svc-u", "10.96.77.13");
    w.cluster.apply(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-u, namespace: {NS}}}\n\
         spec: {{clusterIP: '{}', selector: {{app: b}}, ports: [{{port: 80, targetPort: http}}]}}\n---\n\
         apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: svc-u, namespace: {NS}}}\n\
         spec: {{host: svc-u, trafficPolicy: {{loadBalancer: {{consistentHash: {{httpHeaderName: x-user}}}}}}}}\n",
        undeclared.1
    ));
    let on_undeclared =
        |w: &World, user: &str| calls_to(w, a, undeclared, 8, "/u", &["-H", &format!("x-user: {user}")]);
    eventually(
        "the rule pins a user on the undeclared port",
        Duration::from_secs(20),
        async || {
            let (x, y) = on_undeclared(&w, "carol");
            x + y == 8 && (x == 0 || y == 0)
        },
    )
    .await;
    let mut pods = (0, 0);
    for i in 0..8 {
        let (x, y) = on_undeclared(&w, &format!("user-{i}"));
        assert_eq!(x + y, 8, "user-{i}: every call answered");
        assert!(x == 0 || y == 0, "user-{i} stays on one pod of svc-u: {x} / {y}");
        pods.0 += usize::from(x > 0);
        pods.1 += usize::from(y > 0);
    }
    assert!(
        pods.0 > 0 && pods.1 > 0,
        "svc-u's users spread over both pods: {pods:?}"
    );
    // b-2's app goes away: its users' calls are tried again on b-1 (Istio's default retries).
    w.pods[b2].app = None;
    for i in 0..12 {
        let (x, y) = as_user(&w, &format!("user-{i}"), 3);
        assert_eq!((x, y), (3, 0), "user-{i}: every call answered by b-1");
    }
    w.app(b2);
    let dr = w.cluster.get("destinationrule", NS, "svc-b");
    assert_eq!(dr["status"]["conditions"][0]["status"], "True", "{dr}");
    w.cluster
        .kubectl(&["delete", "destinationrule", "svc-b", "-n", NS], None);
    eventually(
        "without the rule, one user's connections are balanced again",
        Duration::from_secs(20),
        async || {
            let (x, y) = as_user(&w, "alice", 10);
            x > 0 && y > 0
        },
    )
    .await;
    // Istio's way, mesh-wide: every declared HTTP port per request, so A's sidecar counts them.
    w.cluster.apply(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: ferrum-system}\n---\n\
         apiVersion: ferrum.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: default, namespace: ferrum-system}\nspec: {httpRouting: Always}\n",
    );
    let series = format!("ferrum_route_requests_total{{route=\"service/{NS}/svc-b:80\",code=\"2xx\"}}");
    let counted = || {
        let out = w.pods[a].run(&["curl", "-sS", "http://127.0.0.1:15000/metrics"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .find_map(|l| l.strip_prefix(series.as_str())?.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    eventually(
        "httpRouting: Always routes svc-b's port 80 per request",
        Duration::from_secs(20),
        async || {
            let before = counted();
            let (x, y) = as_user(&w, "bob", 10);
            x + y == 10 && counted() >= before + 10.0
        },
    )
    .await;
}

/// Routes for some callers only (Istio `sourceLabels`): a canary client (`track: canary`) and a
/// plain one call the same Service; a VirtualService sends the canary's HTTP to v2 and its raw
/// TCP to the v2 subset, everyone else's to v1 — each sidecar keeps only the routes its own
/// workload is a source of.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_virtual_service_routes_by_the_callers_labels() {
    let mut w = World::start(&[]).await;
    let a = w.pod("a-1", "sa-a", "a", 10, true);
    let canary = w.pod_labelled("a-2", "sa-a", "app: a, track: canary", 13, true);
    let b1 = w.pod_labelled("b-1", "sa-b", "app: b, version: v1", 11, true);
    let b2 = w.pod_labelled("b-2", "sa-b", "app: b, version: v2", 12, true);
    w.service("svc-b", VIP, "b");
    w.service_selecting("b-v1", "10.96.77.11", "app: b, version: v1");
    w.service_selecting("b-v2", "10.96.77.12", "app: b, version: v2");
    for (i, sa) in [(b1, "sa-b"), (b2, "sa-b"), (a, "sa-a"), (canary, "sa-a")] {
        w.app(i);
        w.sidecar(i, sa, &[]);
    }
    for i in [a, canary, b1, b2] {
        w.ready(i).await;
    }
    until_routed(&w).await;
    w.cluster.install_istio_crds();
    w.cluster.apply(&format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: svc-b, namespace: {NS}}}\n\
         spec: {{host: svc-b, subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]}}\n---\n\
         apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: b-by-caller, namespace: {NS}}}\n\
         spec:\n  hosts: [svc-b]\n  http:\n\
         \x20 - match: [{{sourceLabels: {{track: canary}}}}]\n    route: [{{destination: {{host: b-v2}}}}]\n\
         \x20 - route: [{{destination: {{host: b-v1}}}}]\n\
         \x20 tcp:\n\
         \x20 - match: [{{port: 9000, sourceLabels: {{track: canary}}, sourceNamespace: {NS}}}]\n\
         \x20   route: [{{destination: {{host: svc-b, subset: v2, port: {{number: 9000}}}}}}]\n\
         \x20 - match: [{{port: 9000}}]\n\
         \x20   route: [{{destination: {{host: svc-b, subset: v1, port: {{number: 9000}}}}}}]\n"
    ));
    eventually(
        "each caller follows its own routes",
        Duration::from_secs(20),
        async || {
            calls_to_svc_b(&w, a, 10, "/r", &[]) == (10, 0) && calls_to_svc_b(&w, canary, 10, "/r", &[]) == (0, 10)
        },
    )
    .await;
    let tunnels = || {
        (
            w.pods[b1].connections("inbound", "hbone"),
            w.pods[b2].connections("inbound", "hbone"),
        )
    };
    for (from, want) in [(a, (10.0, 0.0)), (canary, (0.0, 10.0))] {
        let before = tunnels();
        assert_eq!(
            echoes_to_svc_b(&w, from, 10),
            10,
            "{}: every connection echoed",
            w.pods[from].name
        );
        let after = tunnels();
        assert_eq!(
            (after.0 - before.0, after.1 - before.1),
            want,
            "{}: raw TCP goes to its own subset",
            w.pods[from].name
        );
    }
    let vs = w.cluster.get("virtualservice", NS, "b-by-caller");
    assert_eq!(vs["status"]["conditions"][0]["status"], "True", "{vs}");
}

/// A VirtualService's retries are the route's own: with b-2's application gone (its sidecar
/// still up, so each call there fails), a route retrying connect failures and resets answers
/// every call from b-1, and so does a route without `retries` (Istio's default policy), while a
/// route with `attempts: 0` — on the same Service, whose own cluster policy retries nothing —
/// lets b-2's failures through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtual_service_retries_are_the_routes_own() {
    let (mut w, [a, _, b2]) = two_versions_of_b(&[]).await;
    w.cluster.install_istio_crds();
    // No ejection (it would hide b-2 from the route without retries too), no cluster retries.
    w.cluster.apply(&format!(
        "apiVersion: ferrum.dev/v1alpha1\nkind: BackendPolicy\nmetadata: {{name: svc-b, namespace: {NS}}}\n\
         spec: {{targetRefs: [{{group: '', kind: Service, name: svc-b}}], outlierDetection: {{disabled: true}}}}\n---\n\
         apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: b-retries, namespace: {NS}}}\n\
         spec:\n  hosts: [svc-b]\n  http:\n\
         \x20 - match: [{{uri: {{prefix: /retried}}}}]\n    retries: {{attempts: 2, retryOn: 'connect-failure,refused-stream,reset,503'}}\n    route: [{{destination: {{host: svc-b}}}}]\n\
         \x20 - match: [{{uri: {{prefix: /default}}}}]\n    route: [{{destination: {{host: svc-b}}}}]\n\
         \x20 - retries: {{attempts: 0}}\n    route: [{{destination: {{host: svc-b}}}}]\n"
    ));
    let calls = |w: &World, path: &str| {
        let (b1, b2) = calls_to_svc_b(w, a, 20, path, &[]);
        b1 + b2
    };
    eventually("the VirtualService is in effect", Duration::from_secs(20), async || {
        w.cluster.get("virtualservice", NS, "b-retries")["status"]["conditions"][0]["status"] == "True"
            && calls(&w, "/retried") == 20
    })
    .await;
    w.pods[b2].app = None;
    let retried = calls(&w, "/retried");
    let by_default = calls(&w, "/default");
    let unretried = calls(&w, "/plain");
    println!(
        "with b-2's app gone: {retried}/20 answered with retries, {by_default}/20 with Istio's default, {unretried}/20 without"
    );
    assert_eq!(retried, 20, "every call that met b-2 was retried on b-1");
    assert_eq!(
        by_default, 20,
        "a route without retries retries as Istio's do by default"
    );
    assert!(
        unretried < 20,
        "attempts: 0 lets b-2's failures through ({unretried}/20 answered)"
    );
}

/// Mints keys and tokens with PyJWT (a real JWT library, not ours): prints a JSON object with
/// the RS256 JWKS (inline in the policy), the ES256 JWKS (served at a jwksUri) and tokens.
const MINT: &str = r#"
import json, sys, time, jwt
from cryptography.hazmat.primitives.asymmetric import rsa, ec
from jwt.algorithms import RSAAlgorithm, ECAlgorithm
rs, other, es = rsa.generate_private_key(65537, 2048), rsa.generate_private_key(65537, 2048), ec.generate_private_key(ec.SECP256R1())
def jwks(alg, key, kid):
    k = json.loads(alg.to_jwk(key.public_key())); k.update(kid=kid, use="sig"); return json.dumps({"keys": [k]})
now = int(time.time())
def tok(key, alg, kid, **claims):
    c = {"iss": "https://rs.example", "sub": "alice", "aud": "svc-b", "iat": now, "exp": now + 3600}
    c.update(claims)
    return jwt.encode(c, key, algorithm=alg, headers={"kid": kid})
print(json.dumps({
    "jwks_rs": jwks(RSAAlgorithm, rs, "rs1"),
    "jwks_es": jwks(ECAlgorithm, es, "es1"),
    "rs_ok": tok(rs, "RS256", "rs1"),
    "es_ok": tok(es, "ES256", "es1", iss="https://es.example", sub="bob", aud="anything"),
    "expired": tok(rs, "RS256", "rs1", iat=now - 7200, exp=now - 3600),
    "wrong_iss": tok(rs, "RS256", "rs1", iss="https://other.example"),
    "wrong_aud": tok(rs, "RS256", "rs1", aud="someone-else"),
    "bad_sig": tok(other, "RS256", "rs1"),
}))
"#;

/// RequestAuthentication with two issuers — RS256 with an inline JWKS, ES256 with a JWKS B's
/// sidecar fetches from a URI — and an ALLOW on request principals: tokens minted by PyJWT are
/// checked by B's sidecar. No token → 403 (no principal); a valid one → 200, its `sub` copied to
/// a header and the token itself not forwarded; expired, wrong issuer, wrong audience and a bad
/// signature → 401; `?access_token=` works too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_authentication_validates_jwts_for_policies() {
    let w = two_pods(&["--rediscover-seconds", "1"], &[]).await;
    until_routed(&w).await;
    let minted = std::process::Command::new(venv_bin("python"))
        .args(["-c", MINT])
        .output()
        .unwrap();
    assert!(minted.status.success(), "{}", String::from_utf8_lossy(&minted.stderr));
    let m: serde_json::Value = serde_json::from_slice(&minted.stdout).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("jwks.json"), m["jwks_es"].as_str().unwrap()).unwrap();
    let port = free_port();
    let host = w.bridge.host_ip();
    let _jwks_server = Proc(
        std::process::Command::new(venv_bin("python"))
            .args(["-m", "http.server", "--bind", &host, &port.to_string()])
            .current_dir(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    w.cluster.install_istio_crds();
    let jwks_rs = serde_json::to_string(m["jwks_rs"].as_str().unwrap()).unwrap();
    w.cluster.apply(&format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: {NS}}}\n\
         spec:\n  selector: {{matchLabels: {{app: b}}}}\n  jwtRules:\n\
         \x20 - issuer: https://rs.example\n    audiences: [svc-b]\n    jwks: {jwks_rs}\n    outputClaimToHeaders: [{{header: x-jwt-sub, claim: sub}}]\n\
         \x20 - issuer: https://es.example\n    jwksUri: http://{host}:{port}/jwks.json\n\
         ---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: need-jwt, namespace: {NS}}}\n\
         spec: {{selector: {{matchLabels: {{app: b}}}}, rules: [{{from: [{{source: {{requestPrincipals: [\"https://rs.example/alice\", \"https://es.example/*\"]}}}}]}}]}}\n"
    ));
    let call = |token: Option<&str>, query: &str| -> (String, String) {
        let auth = token.map(|t| format!("authorization: Bearer {t}"));
        let mut args = vec!["-D", "-", "-o", "/dev/null", "-w", "%{http_code}"];
        if let Some(a) = &auth {
            args.extend(["-H", a.as_str()]);
        }
        let resolve = format!("svc-b.{NS}.svc:80:{VIP}");
        let url = format!("http://svc-b.{NS}.svc/data{query}");
        args.extend(["--resolve", &resolve, &url]);
        let out = w.pods[0].curl(&args).1;
        let code = out.rsplit('\n').next().unwrap_or("").trim().to_string();
        (code, out)
    };
    let tok = |name: &str| m[name].as_str().unwrap().to_string();
    eventually(
        "the RequestAuthentication takes effect",
        Duration::from_secs(20),
        async || call(Some(&tok("expired")), "").0 == "401",
    )
    .await;
    let (code, head) = call(Some(&tok("rs_ok")), "");
    assert_eq!(code, "200", "{head}");
    assert!(
        head.contains("x-saw-sub: alice"),
        "the sub claim became a header: {head}"
    );
    assert!(
        head.contains("x-saw-authorization: no"),
        "the token is not forwarded: {head}"
    );
    assert_eq!(call(None, "").0, "403", "no token: no request principal");
    for bad in ["expired", "wrong_iss", "wrong_aud", "bad_sig"] {
        assert_eq!(call(Some(&tok(bad)), "").0, "401", "{bad}");
    }
    assert_eq!(call(Some("not.a.jwt"), "").0, "401", "garbage");
    assert_eq!(
        call(None, &format!("?access_token={}", tok("rs_ok"))).0,
        "200",
        "token as a query parameter"
    );
    eventually(
        "the ES256 JWKS is fetched from its URI",
        Duration::from_secs(20),
        async || call(Some(&tok("es_ok")), "").0 == "200",
    )
    .await;
    let log = w.pods[1].sidecar_log();
    assert!(log.contains("JWKS fetched") && log.contains("token refused"), "{log}");
}

/// Tracing across the mesh: pod A's sidecar routes the call (a client span), the request
/// crosses the HBONE tunnel, B's sidecar continues the trace (a server span) and B's app gets
/// a `traceparent` whose parent is B's sidecar — one trace, exported by both over OTLP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_crosses_both_sidecars_over_hbone() {
    let mut w = World::start(&[]).await;
    let collector = ferrum_testkit::otlp::Collector::start(&w.bridge.host_ip()).await;
    let otlp = collector.endpoint();
    let a = w.pod("a-1", "sa-a", "a", 10, true);
    let b = w.pod("b-1", "sa-b", "b", 11, true);
    w.service("svc-b", VIP, "b");
    w.app(b);
    w.sidecar(a, "sa-a", &["--otlp-endpoint", &otlp]);
    w.sidecar(b, "sa-b", &["--otlp-endpoint", &otlp]);
    w.ready(a).await;
    w.ready(b).await;
    until_routed(&w).await;
    w.cluster.apply(&format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: b-traced, namespace: {NS}}}\n\
         spec: {{parentRefs: [{{group: '', kind: Service, name: svc-b, port: 80}}], rules: [{{backendRefs: [{{name: svc-b, port: 80}}]}}]}}\n"
    ));
    let trace = "5bf92f3577b34da6a3ce929d0e0e4736";
    let caller = "a1b2c3d4e5f60718";
    let mut saw = String::new();
    // Until A's sidecar serves the route, the call is relayed at L4 and A makes no span.
    eventually("A's sidecar routes svc-b", Duration::from_secs(20), async || {
        let (ok, head) = w.pods[a].curl(&[
            "-D",
            "-",
            "-o",
            "/dev/null",
            "-H",
            &format!("traceparent: 00-{trace}-{caller}-01"),
            "--resolve",
            &format!("svc-b.{NS}.svc:80:{VIP}"),
            &format!("http://svc-b.{NS}.svc/traced"),
        ]);
        saw = head
            .lines()
            .find_map(|l| l.strip_prefix("x-saw-traceparent: "))
            .unwrap_or("")
            .trim()
            .to_string();
        ok && collector
            .spans_of(trace)
            .iter()
            .any(|s| s.service == format!("a-1.{NS}"))
    })
    .await;
    // Each sidecar exports on its own schedule: wait for a span of B under one of A's.
    let mut pair = None;
    eventually("B's span under A's", Duration::from_secs(10), async || {
        let spans = collector.spans_of(trace);
        pair = spans.iter().filter(|c| c.service == format!("a-1.{NS}")).find_map(|c| {
            let s = spans
                .iter()
                .find(|s| s.service == format!("b-1.{NS}") && s.parent == c.span)?;
            Some((c.clone(), s.clone()))
        });
        pair.is_some()
    })
    .await;
    let (client, server) = pair.unwrap();
    assert_eq!(client.parent, caller, "A's sidecar continues the app's trace");
    assert_eq!(client.kind, 3, "an outbound span is a client span");
    assert_eq!(server.kind, 2, "an inbound span is a server span");
    assert_eq!(client.attrs["http.response.status_code"], "200");
    assert_eq!(server.attrs["http.response.status_code"], "200");
    let seen: Vec<&str> = saw.split('-').collect();
    assert_eq!(seen.len(), 4, "B's app saw {saw:?}");
    assert_eq!(seen[1], trace, "B's app is in the same trace");
    // The last call's spans may still be queued: B's app's parent is one of B's spans.
    eventually(
        "B's app's parent is a span of B's sidecar",
        Duration::from_secs(10),
        async || {
            collector
                .spans_of(trace)
                .iter()
                .any(|s| s.service == format!("b-1.{NS}") && s.span == seen[2])
        },
    )
    .await;
}

/// Two namespaces: a consumer route (an HTTPRoute in the caller's namespace whose parent is
/// Service B in another) wins for callers in its namespace only; a Service exported to its own
/// namespace (exportTo) is not the other namespace's to call; and an AuthorizationPolicy on B
/// that allows one namespace admits its caller and refuses the other's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_routes_and_namespace_policies_across_two_namespaces() {
    const CLIENTS: &str = "clients";
    let mut w = World::start(&["--rediscover-seconds", "1"]).await;
    let a = w.pod("a-1", "sa-a", "a", 10, true);
    let c = w.pod_in(CLIENTS, "c-1", "sa-c", "app: c", 13, true);
    let b1 = w.pod_labelled("b-1", "sa-b", "app: b, version: v1", 11, true);
    let b2 = w.pod_labelled("b-2", "sa-b", "app: b, version: v2", 12, true);
    w.service("svc-b", VIP, "b");
    w.service_selecting("b-v1", "10.96.77.11", "app: b, version: v1");
    w.service_selecting("b-v2", "10.96.77.12", "app: b, version: v2");
    for (i, sa) in [(b1, "sa-b"), (b2, "sa-b"), (a, "sa-a"), (c, "sa-c")] {
        if i == b1 || i == b2 {
            w.app(i);
        }
        w.sidecar(i, sa, &[]);
    }
    for i in [a, b1, b2, c] {
        w.ready(i).await;
    }
    until_routed(&w).await;
    // Each caller makes `n` calls on one connection: (answers by b-1, by b-2, all succeeded).
    let calls = |pod: usize, n: usize| -> (usize, usize, bool) {
        let mut args = vec!["curl", "-sS", "--max-time", "20", "-w", "%{http_code}\\n"];
        let resolve = format!("svc-b.{NS}.svc:80:{VIP}");
        args.extend(["--resolve", &resolve]);
        let url = format!("http://svc-b.{NS}.svc/ns");
        args.extend(std::iter::repeat_n(url.as_str(), n));
        let out = w.pods[pod].run(&args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (
            text.matches("hello from b-1").count(),
            text.matches("hello from b-2").count(),
            out.status.success() && text.matches("200\n").count() == n,
        )
    };
    w.cluster.apply(&format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: producer, namespace: {NS}}}\n\
         spec: {{parentRefs: [{{group: '', kind: Service, name: svc-b, port: 80}}], rules: [{{backendRefs: [{{name: b-v1, port: 80}}]}}]}}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: consumer, namespace: {CLIENTS}}}\n\
         spec: {{parentRefs: [{{group: '', kind: Service, name: svc-b, namespace: {NS}, port: 80}}], rules: [{{backendRefs: [{{name: b-v2, namespace: {NS}, port: 80}}]}}]}}\n"
    ));
    eventually(
        "the producer route holds for A, the consumer route for C",
        Duration::from_secs(20),
        async || calls(a, 10) == (10, 0, true) && calls(c, 10) == (0, 10, true),
    )
    .await;
    let (a1, a2, _) = calls(a, 100);
    let (c1, c2, _) = calls(c, 100);
    assert_eq!(
        (a1, a2, c1, c2),
        (100, 0, 0, 100),
        "A in {NS} → v1, C in {CLIENTS} → v2"
    );
    let consumer = w.cluster.get("httproute", CLIENTS, "consumer");
    let accepted = consumer["status"]["parents"][0]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Accepted")
        .cloned()
        .unwrap();
    assert_eq!(accepted["status"], "True", "{consumer}");

    // exportTo: b-v1 exported to its own namespace only is the mesh's for A, and for C's
    // sidecar an address outside the mesh (passthrough, which nothing here answers).
    let direct = |pod: usize| {
        let out = w.pods[pod].run(&["curl", "-sS", "--max-time", "3", "http://10.96.77.11/ns"]);
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("hello from b-1")
    };
    assert!(direct(a) && direct(c), "both reach b-v1 by its ClusterIP");
    w.cluster.apply(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: b-v1, namespace: {NS}, annotations: {{networking.istio.io/exportTo: .}}}}\n\
         spec: {{clusterIP: 10.96.77.11, selector: {{app: b, version: v1}}, ports: [{{name: http, port: 80, targetPort: http}}, {{name: echo, port: 9000, targetPort: 9000}}]}}\n"
    ));
    eventually("C no longer sees b-v1", Duration::from_secs(20), async || !direct(c)).await;
    assert!(direct(a), "A, in b-v1's namespace, still does");
    assert_eq!(calls(c, 5), (0, 5, true), "C's consumer route to b-v2 is untouched");

    // Only the clients namespace may call B.
    w.cluster.install_istio_crds();
    w.cluster.apply(&format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: from-clients, namespace: {NS}}}\n\
         spec: {{action: ALLOW, selector: {{matchLabels: {{app: b}}}}, rules: [{{from: [{{source: {{namespaces: [{CLIENTS}]}}}}]}}]}}\n"
    ));
    let mut last = (true, false);
    let waited = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            last = (calls(a, 1).2, calls(c, 1).2);
            if last == (false, true) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "A is refused, C still served: (A passes, C passes) = {last:?}\nB-1:\n{}\nC:\n{}",
        w.pods[b1].sidecar_log(),
        w.pods[c].sidecar_log()
    );
    assert_eq!(calls(c, 20), (0, 20, true), "C's calls all pass, by its consumer route");
    for _ in 0..5 {
        assert!(!calls(a, 1).2, "A's namespace is not allowed");
    }
}

/// The pods' gRPC app: `echo.Echo/Say` and `echo.Echo/Pinned` answer with the pod's name, on
/// 9090 (generic handlers over raw bytes: no generated code).
const GRPC_APP: &str = r#"
import sys, grpc
from concurrent import futures
name = sys.argv[1].encode()
say = lambda req, ctx: b"from " + name
h = grpc.method_handlers_generic_handler("echo.Echo", {
    "Say": grpc.unary_unary_rpc_method_handler(say),
    "Pinned": grpc.unary_unary_rpc_method_handler(say),
})
s = grpc.server(futures.ThreadPoolExecutor(4), handlers=[h])
s.add_insecure_port("0.0.0.0:9090")
s.start()
s.wait_for_termination()
"#;

/// A gRPC client in a pod: `n` calls of `method` on one channel to `target`, with metadata
/// `x-version` when a fourth argument gives it; prints each answer.
const GRPC_CALLS: &str = r#"
import sys, grpc
target, method, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
md = [("x-version", sys.argv[4])] if len(sys.argv) > 4 else None
ch = grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)])
call = ch.unary_unary("/echo.Echo/" + method)
for _ in range(n):
    print(call(b"hi", timeout=10, metadata=md).decode())
"#;

/// Pods a-1 (0), b-1 (1, version v1) and b-2 (2, v2), each with a sidecar, the b pods serving
/// [`GRPC_APP`]; Services `echo` (the VIP, both b pods; its port 9090 declared by `echo_port`,
/// e.g. `name: grpc-echo`) and `echo-v1`, `echo-v2` (one pod each, `version_port`).
async fn grpc_world(echo_port: &str, version_port: &str) -> World {
    let mut w = World::start(&[]).await;
    let a = w.pod("a-1", "sa-a", "a", 10, true);
    let b1 = w.pod_labelled("b-1", "sa-b", "app: b, version: v1", 11, true);
    let b2 = w.pod_labelled("b-2", "sa-b", "app: b, version: v2", 12, true);
    for (name, vip, selector, declared) in [
        ("echo", VIP, "app: b", echo_port),
        ("echo-v1", "10.96.77.11", "app: b, version: v1", version_port),
        ("echo-v2", "10.96.77.12", "app: b, version: v2", version_port),
    ] {
        w.cluster.apply(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {NS}}}\n\
             spec: {{clusterIP: {vip}, selector: {{{selector}}}, ports: [{{port: 9090, targetPort: 9090, {declared}}}]}}\n"
        ));
    }
    for (i, sa) in [(b1, "sa-b"), (b2, "sa-b"), (a, "sa-a")] {
        if i != a {
            let p = &mut w.pods[i];
            let child =
                p.ns.cmd(&[venv_bin("python").to_str().unwrap(), "-c", GRPC_APP, &p.name])
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .unwrap();
            p.app = Some(Proc(child));
        }
        // B's sidecars serve gRPC call by call (as the chart's request metrics make them).
        let args: &[&str] = if i == a { &[] } else { &["--request-metrics", "true"] };
        w.sidecar(i, sa, args);
    }
    for i in [a, b1, b2] {
        w.ready(i).await;
    }
    w
}

/// What B's sidecars counted of A's gRPC calls that ended with `status`.
async fn grpc_counted(w: &World, status: &str) -> u64 {
    let labels = [
        "reporter=\"destination\"".to_string(),
        "source_workload=\"a-1\"".into(),
        "request_protocol=\"grpc\"".into(),
        format!("grpc_response_status=\"{status}\""),
    ];
    let mut n = 0;
    for b in [1, 2] {
        n += series(&scrape(&w.pods[b].ip).await, "istio_requests_total", &labels).unwrap_or(0);
    }
    n
}

/// `n` calls of `method` from pod a-1 to `echo`'s VIP on one channel (with metadata `x-version`
/// when given): how many b-1 and b-2 answered.
fn grpc_calls(w: &World, method: &str, n: usize, version: Option<&str>) -> (usize, usize) {
    let py = venv_bin("python");
    let target = format!("{VIP}:9090");
    let n = n.to_string();
    let mut args = vec![py.to_str().unwrap(), "-c", GRPC_CALLS, &target, method, &n];
    args.extend(version);
    let out = w.pods[0].run(&args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (text.matches("from b-1").count(), text.matches("from b-2").count())
}

/// gRPC in the client's sidecar, for a plain gRPC client calling the Service's ClusterIP over one
/// HTTP/2 connection: with no route at all, a port declared gRPC (by its name alone) has its
/// calls spread over the Service's pods, not pinned to the one the connection reached; a
/// GRPCRoute whose parent is the Service then routes them — a method match pins one version,
/// the rest split by weight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_mesh_routes_match_methods_in_the_client_sidecar() {
    // Istio's port naming for the Service the client calls; appProtocol for the versions.
    let w = grpc_world("name: grpc-echo", "name: api, appProtocol: kubernetes.io/h2c").await;
    let calls = |method: &str, n: usize| grpc_calls(&w, method, n, None);
    eventually(
        "gRPC reaches B through the sidecars",
        Duration::from_secs(20),
        async || {
            let (x, y) = calls("Say", 2);
            x + y == 2
        },
    )
    .await;
    let (x, y) = calls("Say", 100);
    println!("100 calls on one channel, no route: b-1 {x}, b-2 {y}");
    assert_eq!(x + y, 100, "every call answered");
    assert!(x >= 30 && y >= 30, "spread over both pods, per call: {x} / {y}");
    let routed = w.pods[0].connections("outbound", "routed");
    assert!(routed >= 1.0, "A's sidecar serves the connection as gRPC: {routed}");
    w.cluster.apply(&format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {{name: echo, namespace: {NS}}}\n\
         spec:\n  parentRefs: [{{group: '', kind: Service, name: echo, port: 9090}}]\n  rules:\n\
         \x20 - matches: [{{method: {{service: echo.Echo, method: Pinned}}}}]\n    backendRefs: [{{name: echo-v2, port: 9090}}]\n\
         \x20 - backendRefs: [{{name: echo-v1, port: 9090, weight: 80}}, {{name: echo-v2, port: 9090, weight: 20}}]\n"
    ));
    eventually("the method match pins v2", Duration::from_secs(20), async || {
        calls("Pinned", 10) == (0, 10)
    })
    .await;
    let (v1, v2) = calls("Say", 500);
    assert_eq!(v1 + v2, 500, "every call answered");
    let share = v1 as f64 / 500.0;
    println!("GRPCRoute split over 500 calls on one channel: v1 {v1}, v2 {v2}");
    assert!((share - 0.80).abs() <= 0.07, "v1 share {share}");
    let route = w.cluster.get("grpcroute", NS, "echo");
    assert_eq!(route["status"]["parents"][0]["parentRef"]["kind"], "Service", "{route}");
    // B's sidecars count each call by how it ended: OK in its trailers, UNIMPLEMENTED (12) in a
    // trailers-only answer.
    assert_eq!(grpc_calls(&w, "Nope", 1, None), (0, 0));
    eventually("the failed call is counted", Duration::from_secs(5), async || {
        grpc_counted(&w, "12").await == 1
    })
    .await;
    let ok = grpc_counted(&w, "0").await;
    assert!(ok >= 612, "every call counted with its status: {ok}");
}

/// gRPC on a Service port that declares no protocol (no name, no appProtocol): the client's
/// sidecar sniffs HTTP/2 and routes it by the port's HTTPRoute — a header match pins v2, the
/// rest go to v1 — over HTTP/2 to the app, although the backends' ports declare nothing either
/// (their clusters follow the client's protocol there, as Istio's do for detected ports).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_on_an_undeclared_port_is_routed_by_its_httproute() {
    // No name, no appProtocol: sniffed.
    let w = grpc_world("name: ''", "name: ''").await;
    let calls = |version: &str, n: usize| grpc_calls(&w, "Say", n, Some(version));
    eventually(
        "gRPC reaches B through the sidecars",
        Duration::from_secs(20),
        async || {
            let (x, y) = calls("any", 2);
            x + y == 2
        },
    )
    .await;
    w.cluster.apply(&format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: echo, namespace: {NS}}}\n\
         spec:\n  parentRefs: [{{group: '', kind: Service, name: echo, port: 9090}}]\n  rules:\n\
         \x20 - matches: [{{headers: [{{name: x-version, value: v2}}]}}]\n    backendRefs: [{{name: echo-v2, port: 9090}}]\n\
         \x20 - backendRefs: [{{name: echo-v1, port: 9090}}]\n"
    ));
    eventually("the header match pins v2", Duration::from_secs(20), async || {
        calls("v2", 10) == (0, 10)
    })
    .await;
    let routed_before = w.pods[0].connections("outbound", "routed");
    assert_eq!(calls("v2", 50), (0, 50), "every call with the header on v2");
    assert_eq!(calls("v1", 50), (50, 0), "every other call on v1");
    let routed = w.pods[0].connections("outbound", "routed") - routed_before;
    assert!(routed >= 2.0, "A's sidecar routes each channel's HTTP/2: {routed}");
}

/// A Sidecar's ingress listener: B serves port 8080's traffic from an app on loopback only
/// (127.0.0.1:7070). With a Sidecar selecting B that says so, A's calls to svc-b (over HBONE)
/// and an unmeshed pod's plaintext (IPv4 and IPv6) reach that app; an ingress endpoint on a Unix
/// socket is reported on its Sidecar's status with the field; without the Sidecar, 8080 is
/// served as addressed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_ingress_listener_delivers_to_an_app_on_loopback() {
    let mut w = two_pods(&["--rediscover-seconds", "1"], &[]).await;
    let c = w.pod("c-1", "sa-c", "c", 12, false);
    until_routed(&w).await;
    let site = w.dir.path().join("loopback-site");
    std::fs::create_dir(&site).unwrap();
    std::fs::write(site.join("who.txt"), "the loopback-only app\n").unwrap();
    let _local = Proc(
        w.pods[1]
            .ns
            .cmd(&["python3", "-m", "http.server", "--bind", "127.0.0.1", "7070"])
            .current_dir(&site)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (b4, b6) = (w.pods[1].ip.clone(), format!("[{}]", w.pods[1].ip6));
    let from_c = |host: &str| w.pods[c].curl(&[&format!("http://{host}:8080/who.txt")]).1;
    assert!(curl_svc_b(&w, "/who.txt").1.starts_with("hello from b-1"));

    w.cluster.install_istio_crds();
    w.cluster.apply(&format!(
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: b-in, namespace: {NS}}}\n\
         spec: {{workloadSelector: {{labels: {{app: b}}}}, ingress: [{{port: {{number: 8080, protocol: HTTP, name: http}}, defaultEndpoint: '127.0.0.1:7070'}}]}}\n"
    ));
    eventually(
        "svc-b's 8080 is delivered to loopback",
        Duration::from_secs(20),
        async || curl_svc_b(&w, "/who.txt").1 == "the loopback-only app\n",
    )
    .await;
    assert!(w.pods[1].connections("inbound", "hbone") >= 1.0);
    assert_eq!(from_c(&b4), "the loopback-only app\n", "plaintext over IPv4");
    assert_eq!(from_c(&b6), "the loopback-only app\n", "plaintext over IPv6");

    w.cluster.apply(&format!(
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: c-in, namespace: {NS}}}\n\
         spec: {{workloadSelector: {{labels: {{app: c}}}}, ingress: [{{port: {{number: 8080}}, defaultEndpoint: 'unix:///run/app.sock'}}]}}\n"
    ));
    let mut last = serde_json::Value::Null;
    eventually(
        "the Unix socket endpoint is reported",
        Duration::from_secs(20),
        async || {
            last = w.cluster.get("sidecar", NS, "c-in");
            last["status"]["conditions"][0]["status"] == "False"
        },
    )
    .await;
    let cond = &last["status"]["conditions"][0];
    assert_eq!(cond["reason"], "UnsupportedValue", "{last}");
    assert!(
        cond["message"]
            .as_str()
            .unwrap()
            .contains("spec.ingress[0].defaultEndpoint"),
        "{last}"
    );

    w.cluster.kubectl(&["delete", "sidecar", "b-in", "-n", NS], None);
    eventually(
        "without the Sidecar, 8080 as addressed",
        Duration::from_secs(20),
        async || curl_svc_b(&w, "/who.txt").1.starts_with("hello from b-1"),
    )
    .await;
}

/// An HTTP server outside the mesh, on the host at `host:port` (the host's address on the pods'
/// bridge), serving the test's directory.
fn external_server(w: &World, host: &str, port: u16) -> Proc {
    Proc(
        std::process::Command::new("python3")
            .args(["-m", "http.server", "--bind", host, &port.to_string()])
            .current_dir(w.dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// An Istio Sidecar scopes what a workload's proxy knows: with `egress.hosts` naming another
/// namespace only, A's proxy no longer knows svc-b (its ClusterIP is an address outside the mesh,
/// which nothing here answers) while an external server is still passed through; with `./*` and
/// `REGISTRY_ONLY`, svc-b is back and the external server is refused. An invalid Sidecar is
/// reported on its status with the field, and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_resource_scopes_egress_and_registry_only_refuses_the_rest() {
    let w = two_pods(&["--rediscover-seconds", "1"], &[]).await;
    until_routed(&w).await;
    // A server outside the mesh: on the host, at its address on the pods' bridge.
    let host = w.bridge.host_ip();
    let port = free_port();
    let _external = external_server(&w, &host, port);
    let external = || {
        w.pods[0]
            .curl(&["--max-time", "3", &format!("http://{host}:{port}/")])
            .0
    };
    eventually("A reaches the external server", Duration::from_secs(10), async || {
        external()
    })
    .await;
    let blocked = || w.pods[0].connections("outbound", "blocked");
    assert_eq!(blocked(), 0.0);

    w.cluster.install_istio_crds();
    let sidecar = |hosts: &str, mode: &str| {
        w.cluster.apply(&format!(
            "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: default, namespace: {NS}}}\n\
             spec: {{egress: [{{hosts: [{hosts}]}}], outboundTrafficPolicy: {{mode: {mode}}}}}\n"
        ))
    };
    sidecar("'elsewhere/*'", "ALLOW_ANY");
    eventually("A's proxy forgets svc-b", Duration::from_secs(20), async || {
        !curl_svc_b(&w, "/").0
    })
    .await;
    assert!(external(), "ALLOW_ANY: the external server is still passed through");

    sidecar("'./*'", "REGISTRY_ONLY");
    eventually("A reaches svc-b again", Duration::from_secs(20), async || {
        curl_svc_b(&w, "/").0
    })
    .await;
    assert!(!external(), "REGISTRY_ONLY: the external server is refused");
    assert!(blocked() >= 1.0);
    let status = w.cluster.get("sidecar", NS, "default");
    let accepted = &status["status"]["conditions"][0];
    assert_eq!(
        (&accepted["type"], &accepted["status"]),
        (&"Accepted".into(), &"True".into()),
        "{status}"
    );

    // A Sidecar selecting A with a host that is not namespace/dnsName is left out (A keeps the
    // namespace's) and says why.
    w.cluster.apply(&format!(
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: broken, namespace: {NS}}}\n\
         spec: {{workloadSelector: {{labels: {{app: a}}}}, egress: [{{hosts: ['svc-b']}}]}}\n"
    ));
    let mut last = serde_json::Value::Null;
    eventually(
        "the broken Sidecar's status names the field",
        Duration::from_secs(20),
        async || {
            last = w.cluster.get("sidecar", NS, "broken");
            last["status"]["conditions"][0]["status"] == "False"
        },
    )
    .await;
    let c = &last["status"]["conditions"][0];
    assert_eq!(c["reason"], "Invalid", "{last}");
    assert!(
        c["message"].as_str().unwrap().contains("spec.egress[0].hosts[0]"),
        "{last}"
    );
    assert!(
        curl_svc_b(&w, "/").0 && !external(),
        "the namespace's Sidecar still holds"
    );
}

/// VMs in the mesh's Services (Istio's WorkloadEntry): "vm-1" and "vm-2" are hosts with the app
/// but no Pod object. WorkloadEntries with their addresses and svc-b's label make them svc-b's
/// endpoints beside pod b-1: A's HTTP calls and raw TCP to svc-b's ClusterIP reach all three —
/// vm-1 in plain TCP (no proxy there) at the port its entry names for `http`, vm-2 over HBONE to
/// the ferrum-dp sidecar it runs, which subscribes as its entry (its service account's token) and
/// calls svc-b in turn. An entry with a DNS name for its address says so on its status; deleting
/// the entries takes the VMs out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_entries_put_vms_behind_a_service() {
    let mut w = World::start(&[]).await;
    let a = w.pod("a-1", "sa-a", "a", 10, true);
    let b1 = w.pod("b-1", "sa-b", "b", 11, true);
    let vm1 = w.pod_labelled("vm-1", "sa-b", "host: vm", 13, false);
    let vm2 = w.pod_labelled("vm-2", "sa-b", "host: vm", 14, true);
    w.cluster.kubectl(&["delete", "pod", "vm-1", "vm-2", "-n", NS], None);
    w.service("svc-b", VIP, "b");
    w.cluster.install_istio_crds();
    // The VMs' apps listen on 8080 and 9000, as the pods' do; their entries name 8080 `http`.
    let entry = |name: &str, ip: &str, labels: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: {name}, namespace: {NS}}}\n\
             spec: {{address: '{ip}', labels: {{app: b{labels}}}, serviceAccount: sa-b, ports: {{http: 8080}}}}\n---\n"
        )
    };
    w.cluster.apply(&format!(
        "{}{}apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: by-name, namespace: {NS}}}\n\
         spec: {{address: vm-3.example.com, labels: {{app: b}}}}\n",
        entry("vm-1", &w.pods[vm1].ip, ""),
        entry("vm-2", &w.pods[vm2].ip, ", security.istio.io/tlsMode: istio"),
    ));
    for i in [b1, vm1, vm2] {
        w.app(i);
    }
    for (i, sa) in [(b1, "sa-b"), (vm2, "sa-b"), (a, "sa-a")] {
        w.sidecar(i, sa, &[]);
    }
    for i in [a, b1, vm2] {
        w.ready(i).await;
    }
    // (b-1, vm-1, vm-2) of `n` HTTP calls from A, each on its own connection.
    let calls = |n: usize| {
        let (resolve, url) = (format!("svc-b.{NS}.svc:80:{VIP}"), format!("http://svc-b.{NS}.svc/vm"));
        let mut args = vec![
            "curl",
            "-sS",
            "--max-time",
            "10",
            "-H",
            "connection: close",
            "--resolve",
            &resolve,
        ];
        args.extend(std::iter::repeat_n(url.as_str(), n));
        let out = String::from_utf8_lossy(&w.pods[a].run(&args).stdout).into_owned();
        let vm1_saw_a = format!("hello from vm-1: /vm from {}", w.pods[a].ip);
        (
            out.matches("hello from b-1").count(),
            out.matches(&vm1_saw_a).count(),
            out.matches("hello from vm-2").count(),
        )
    };
    eventually("svc-b's calls reach both VMs", Duration::from_secs(20), async || {
        let (pod, v1, v2) = calls(12);
        pod + v1 + v2 == 12 && pod > 0 && v1 > 0 && v2 > 0
    })
    .await;
    let (pod, v1, v2) = calls(60);
    println!("60 calls to svc-b: b-1 {pod}, vm-1 {v1}, vm-2 {v2}");
    assert_eq!(pod + v1 + v2, 60, "every call answered, vm-1 seeing A's address");
    assert!(
        pod >= 10 && v1 >= 10 && v2 >= 10,
        "all three serve: {pod} / {v1} / {v2}"
    );
    assert!(
        w.pods[vm2].connections("inbound", "hbone") >= 10.0,
        "vm-2's calls came over HBONE"
    );
    assert_eq!(echoes_to_svc_b(&w, a, 30), 30, "raw TCP to port 9000 too");
    let (ok, body) = w.pods[vm2].curl_svc("svc-b", VIP, "/from-vm");
    assert!(
        ok && body.contains(": /from-vm from "),
        "vm-2 calls svc-b through its sidecar: {body}"
    );
    for name in ["vm-1", "vm-2"] {
        let e = w.cluster.get("workloadentry", NS, name);
        assert_eq!(e["status"]["conditions"][0]["status"], "True", "{e}");
    }
    let bad = w.cluster.get("workloadentry", NS, "by-name");
    let condition = &bad["status"]["conditions"][0];
    assert_eq!(condition["status"], "False", "{bad}");
    assert!(
        condition["message"]
            .as_str()
            .unwrap_or_default()
            .contains("spec.address"),
        "{bad}"
    );

    w.cluster
        .kubectl(&["delete", "workloadentry", "vm-1", "vm-2", "-n", NS], None);
    eventually(
        "without the entries, only b-1 serves",
        Duration::from_secs(20),
        async || calls(10) == (10, 0, 0),
    )
    .await;
}

/// Under `REGISTRY_ONLY`, ServiceEntries are what lets a pod reach outside the mesh: a STATIC
/// entry's address leads to its endpoint, a DNS entry's to the name it resolves, a NONE entry's
/// real address is let through as dialled, and an entry without addresses is matched by the
/// HTTP `Host` a connection asks for — the same server asked for another host stays refused. An
/// entry that cannot be applied says which field on its status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_entries_are_what_a_registry_only_pod_may_reach_outside_the_mesh() {
    let mut w = two_pods(&["--rediscover-seconds", "1"], &[]).await;
    w.app(0);
    until_routed(&w).await;
    // Two servers outside the mesh: on the host, at its address on the pods' bridge.
    let host = w.bridge.host_ip();
    let (port, other_port) = (free_port(), free_port());
    let _servers = (external_server(&w, &host, port), external_server(&w, &host, other_port));
    let get = |url: String, host_header: Option<&str>| {
        let header = host_header.map(|h| format!("Host: {h}"));
        let mut args = vec!["--max-time", "3", url.as_str()];
        if let Some(h) = &header {
            args.extend(["-H", h.as_str()]);
        }
        w.pods[0].curl(&args)
    };
    eventually("A reaches the external server", Duration::from_secs(10), async || {
        get(format!("http://{host}:{port}/"), None).0
    })
    .await;

    w.cluster.install_istio_crds();
    w.cluster.apply(&format!(
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: default, namespace: {NS}}}\n\
         spec: {{outboundTrafficPolicy: {{mode: REGISTRY_ONLY}}}}\n"
    ));
    eventually(
        "REGISTRY_ONLY refuses the external server",
        Duration::from_secs(20),
        async || !get(format!("http://{host}:{port}/"), None).0,
    )
    .await;

    let entry = |name: &str, spec: String| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: {NS}}}\nspec: {spec}\n---\n"
        )
    };
    w.cluster.apply(
        &[
            entry(
                "fixed",
                format!("{{hosts: [fixed.example], addresses: [240.240.0.10], resolution: STATIC, ports: [{{number: 80, name: http, targetPort: {port}}}], endpoints: [{{address: '{host}'}}]}}"),
            ),
            entry(
                "resolved",
                "{hosts: [resolved.example], addresses: [240.240.0.11], resolution: DNS, ports: [{number: 80, name: http, targetPort: 8080}], endpoints: [{address: localhost}]}".into(),
            ),
            entry(
                "real",
                format!("{{hosts: [real.example], addresses: ['{host}'], resolution: NONE, ports: [{{number: {other_port}, name: tcp, protocol: TCP}}]}}"),
            ),
            entry(
                "named",
                format!("{{hosts: [api.example.com], resolution: NONE, ports: [{{number: {port}, name: http, protocol: HTTP}}]}}"),
            ),
            entry(
                "range",
                "{hosts: [range.example], addresses: [198.18.0.0/15], ports: [{number: 80, name: http}]}".into(),
            ),
        ]
        .concat(),
    );
    eventually(
        "the STATIC entry's address reaches its endpoint",
        Duration::from_secs(20),
        async || get("http://240.240.0.10/static.txt".into(), None).0,
    )
    .await;
    let (ok, body) = get("http://240.240.0.11/dns".into(), None);
    assert!(
        ok && body.starts_with("hello from a-1: /dns"),
        "the DNS entry's name (localhost, from A's sidecar): {body}"
    );
    assert!(
        get(format!("http://{host}:{other_port}/"), None).0,
        "the NONE entry's real address"
    );
    assert!(
        get(format!("http://{host}:{port}/"), Some("api.example.com")).0,
        "the address-less entry, by the Host asked for"
    );
    assert!(
        !get(format!("http://{host}:{port}/"), Some("elsewhere.example")).0,
        "the same server asked for a host no entry names is still refused"
    );
    assert!(w.pods[0].connections("outbound", "blocked") >= 2.0);

    let status = |name: &str| w.cluster.get("serviceentry", NS, name)["status"]["conditions"][0].clone();
    eventually("the statuses are written", Duration::from_secs(20), async || {
        status("range")["status"] == "False" && status("fixed")["status"] == "True"
    })
    .await;
    let range = status("range");
    assert_eq!(range["reason"], "UnsupportedValue", "{range}");
    assert!(
        range["message"].as_str().unwrap().contains("spec.addresses[0]"),
        "{range}"
    );
}

/// An HTTPS server outside the mesh, on the host at `host:port`, serving the test's directory
/// with a certificate for `name` only (self-signed; its PEM is returned, to trust it); with
/// `client_ca` (a PEM file), only to clients presenting a certificate that CA issued.
fn external_tls_server(
    w: &World,
    host: &str,
    port: u16,
    name: &str,
    client_ca: Option<&std::path::Path>,
) -> (Proc, std::path::PathBuf) {
    let c = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
    let (cert, key) = (w.dir.path().join("external.pem"), w.dir.path().join("external.key"));
    std::fs::write(&cert, c.cert.pem()).unwrap();
    std::fs::write(&key, c.signing_key.serialize_pem()).unwrap();
    let verify = match client_ca {
        Some(ca) => format!(
            "ctx.verify_mode = ssl.CERT_REQUIRED\nctx.load_verify_locations('{}')\n",
            ca.display()
        ),
        None => String::new(),
    };
    let serve = format!(
        "import http.server, ssl\n\
         s = http.server.ThreadingHTTPServer(('{host}', {port}), http.server.SimpleHTTPRequestHandler)\n\
         ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n\
         ctx.load_cert_chain('{}', '{}')\n{verify}\
         s.socket = ctx.wrap_socket(s.socket, server_side=True)\n\
         s.serve_forever()",
        cert.display(),
        key.display()
    );
    let p = std::process::Command::new("python3")
        .args(["-c", &serve])
        .current_dir(w.dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    (Proc(p), cert)
}

/// Egress TLS origination, Istio's way: the application calls `http://api.external.test` (a
/// ServiceEntry host without addresses, port 80 → the server's TLS port), and a DestinationRule
/// with `tls.mode: SIMPLE` makes A's sidecar speak TLS to the server, checking its certificate
/// for that name against `caCertificates`. Without the rule the plaintext request fails at the
/// HTTPS server; with it, it is answered. A VirtualService for the entry's host then routes in
/// A's sidecar (a fault on one path, a header on the rest), still over the rule's TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_rule_originates_tls_to_a_service_entry_host() {
    let w = two_pods(&["--rediscover-seconds", "1"], &[]).await;
    until_routed(&w).await;
    let host = w.bridge.host_ip();
    let tls_port = free_port();
    const NAME: &str = "api.external.test";
    let (_server, ca) = external_tls_server(&w, &host, tls_port, NAME, None);
    std::fs::write(w.dir.path().join("egress.txt"), "egress ok\n").unwrap();
    let call = |path: &str| {
        let (_, out) = w.pods[0].curl(&[
            "-w",
            " %{http_code}",
            "--resolve",
            &format!("{NAME}:80:{host}"),
            &format!("http://{NAME}{path}"),
        ]);
        out
    };
    w.cluster.install_istio_crds();
    w.cluster.apply(&format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: external, namespace: {NS}}}\n\
         spec: {{hosts: [{NAME}], resolution: STATIC, endpoints: [{{address: '{host}'}}],\n\
                 ports: [{{number: 80, name: http, protocol: HTTP, targetPort: {tls_port}}}]}}\n"
    ));
    eventually(
        "the entry is in A's sidecar: plaintext reaches the HTTPS port, and fails there",
        Duration::from_secs(20),
        async || {
            let out = call("/egress.txt");
            w.pods[0].connections("outbound", "passthrough") >= 1.0 && !out.ends_with(" 200")
        },
    )
    .await;

    w.cluster.apply(&format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: external-tls, namespace: {NS}}}\n\
         spec: {{host: {NAME}, trafficPolicy: {{tls: {{mode: SIMPLE, caCertificates: '{}'}}}}}}\n",
        ca.display()
    ));
    eventually(
        "with the DestinationRule, A's sidecar originates TLS",
        Duration::from_secs(20),
        async || call("/egress.txt") == "egress ok\n 200",
    )
    .await;
    assert!(w.pods[0].connections("outbound", "routed") >= 1.0);

    w.cluster.apply(&format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: external, namespace: {NS}}}\n\
         spec: {{hosts: [{NAME}], http: [\n\
           {{match: [{{uri: {{prefix: /teapot}}}}], fault: {{abort: {{httpStatus: 418, percentage: {{value: 100}}}}}}, route: [{{destination: {{host: {NAME}}}}}]}},\n\
           {{route: [{{destination: {{host: {NAME}}}}}]}}]}}\n"
    ));
    eventually(
        "the VirtualService routes the entry's host",
        Duration::from_secs(20),
        async || call("/teapot").ends_with(" 418"),
    )
    .await;
    assert_eq!(call("/egress.txt"), "egress ok\n 200", "the rest still over TLS");
    eventually("the VirtualService is Accepted", Duration::from_secs(20), async || {
        w.cluster.get("virtualservice", NS, "external")["status"]["conditions"][0]["status"] == "True"
    })
    .await;
}

/// Egress mutual TLS origination: the external server answers only clients with a certificate
/// its CA issued. A DestinationRule with `tls.mode: SIMPLE` reaches it but is refused; with
/// `MUTUAL` and `credentialName` (a `kubernetes.io/tls` Secret in the rule's namespace, then a
/// generic one), A's sidecar presents the Secret's certificate — delivered beside the snapshot,
/// never shown in the sidecar's `/config` — and is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mutual_destination_rule_presents_the_secrets_client_certificate() {
    let w = two_pods(&["--rediscover-seconds", "1"], &[]).await;
    until_routed(&w).await;
    let host = w.bridge.host_ip();
    let tls_port = free_port();
    const NAME: &str = "mtls.external.test";
    let (client_ca, cert, key) = ferrum_testkit::client_ca_and_cert("a.mesh.example");
    let client_ca_file = w.dir.path().join("client-ca.pem");
    std::fs::write(&client_ca_file, client_ca).unwrap();
    let (_server, ca) = external_tls_server(&w, &host, tls_port, NAME, Some(&client_ca_file));
    std::fs::write(w.dir.path().join("mtls.txt"), "mutual ok\n").unwrap();
    let call = || {
        let (_, out) = w.pods[0].curl(&[
            "-w",
            " %{http_code}",
            "--resolve",
            &format!("{NAME}:80:{host}"),
            &format!("http://{NAME}/mtls.txt"),
        ]);
        out
    };
    w.cluster.install_istio_crds();
    let indent = |pem: &str| pem.lines().map(|l| format!("    {l}\n")).collect::<String>();
    let rule = |tls: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: external-mtls, namespace: {NS}}}\n\
             spec: {{host: {NAME}, trafficPolicy: {{tls: {{{tls}}}}}}}\n"
        )
    };
    w.cluster.apply(&format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: external, namespace: {NS}}}\n\
         spec: {{hosts: [{NAME}], resolution: STATIC, endpoints: [{{address: '{host}'}}],\n\
                 ports: [{{number: 80, name: http, protocol: HTTP, targetPort: {tls_port}}}]}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: client-cert, namespace: {NS}}}\ntype: kubernetes.io/tls\n\
         stringData:\n  tls.crt: |\n{}  tls.key: |\n{}  ca.crt: |\n{}---\n{}",
        indent(&cert),
        indent(&key),
        indent(&std::fs::read_to_string(&ca).unwrap()),
        rule(&format!("mode: SIMPLE, caCertificates: '{}'", ca.display()))
    ));
    eventually(
        "with SIMPLE, A's sidecar speaks TLS to the server, which refuses it (no client certificate)",
        Duration::from_secs(20),
        async || {
            let out = call();
            w.pods[0].connections("outbound", "routed") >= 1.0 && (out.ends_with(" 502") || out.ends_with(" 503"))
        },
    )
    .await;
    // The Secret's ca.crt verifies the server (no caCertificates file on the proxy).
    w.cluster.apply(&rule("mode: MUTUAL, credentialName: client-cert"));
    eventually(
        "with MUTUAL, the Secret's certificate is presented and accepted",
        Duration::from_secs(20),
        async || call() == "mutual ok\n 200",
    )
    .await;
    let dr = w.cluster.get("destinationrule", NS, "external-mtls");
    assert_eq!(dr["status"]["conditions"][0]["status"], "True", "{dr}");
    let config = w.pods[0].run(&["curl", "-sS", "http://127.0.0.1:15000/config"]);
    let config = String::from_utf8_lossy(&config.stdout);
    assert!(
        config.contains("mesh/client-cert"),
        "the sidecar names the Secret: {config}"
    );
    assert!(!config.contains("PRIVATE KEY"), "and never shows the key");

    // Istio's documented form, a generic Secret (`cert`/`key`/`cacert`), works as well. Named
    // before it exists, the rule is left out (the server refuses plaintext); once it is
    // created, the operator's watch of that one name picks it up.
    w.cluster.apply(&rule("mode: MUTUAL, credentialName: client-generic"));
    eventually(
        "a rule naming a missing Secret is left out",
        Duration::from_secs(20),
        async || {
            let dr = w.cluster.get("destinationrule", NS, "external-mtls");
            dr["status"]["conditions"][0]["status"] == "False" && !call().ends_with(" 200")
        },
    )
    .await;
    w.cluster.apply(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: client-generic, namespace: {NS}}}\ntype: Opaque\n\
         stringData:\n  cert: |\n{}  key: |\n{}  cacert: |\n{}",
        indent(&cert),
        indent(&key),
        indent(&std::fs::read_to_string(&ca).unwrap()),
    ));
    eventually(
        "the generic Secret's certificate is presented and accepted",
        Duration::from_secs(20),
        async || call() == "mutual ok\n 200",
    )
    .await;
    let dr = w.cluster.get("destinationrule", NS, "external-mtls");
    assert_eq!(dr["status"]["conditions"][0]["status"], "True", "{dr}");
}

/// More connections from one pod to another than one HBONE connection may carry tunnels (100
/// streams): every one of them is open at once and carries its bytes — the client sidecar opens
/// another HBONE connection rather than queueing tunnels behind the first one's limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_connections_than_one_hbone_connection_carries_all_flow() {
    let mut w = two_pods(&[], &[]).await;
    until_routed(&w).await;
    let out = w.pods[0].run(&[
        "python3",
        "-c",
        &format!(
            "import socket\n\
             conns = [socket.create_connection(('{VIP}', 9000), timeout=10) for _ in range(250)]\n\
             for i, s in enumerate(conns): s.sendall(b'c%d;' % i)\n\
             ok = 0\n\
             for i, s in enumerate(conns):\n\
             \x20   want = b'c%d;' % i\n\
             \x20   got = b''\n\
             \x20   while len(got) < len(want):\n\
             \x20       b = s.recv(64)\n\
             \x20       if not b: break\n\
             \x20       got += b\n\
             \x20   ok += got == want\n\
             import subprocess\n\
             ss = subprocess.run(['ss', '-Htn', 'state', 'established', '( dport = :15008 )'], capture_output=True)\n\
             print(ok, len(ss.stdout.splitlines()))"
        ),
    ]);
    // All 250 echoed, over three HBONE connections (100 streams each at most).
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "250 3",
        "{}\nA's sidecar: {}",
        String::from_utf8_lossy(&out.stderr),
        w.pods[0].sidecar_log()
    );
    const OPEN: &str = "ferrum_mesh_hbone_connections ";
    assert_eq!(w.pods[0].metric(OPEN), 3.0);
    // B's sidecar restarts: A's connections to it end and are no longer counted (or offered to
    // a tunnel); the next call dials one anew.
    w.pods[1].sidecar = None;
    eventually("A's HBONE connections to B end", Duration::from_secs(10), async || {
        w.pods[0].metric(OPEN) == 0.0
    })
    .await;
    w.sidecar(1, "sa-b", &[]);
    w.ready(1).await;
    assert!(curl_svc_b(&w, "/again").0, "the first call after B's restart");
    assert_eq!(w.pods[0].metric(OPEN), 1.0);
}

/// An HBONE connection that has carried no tunnel for `--hbone-idle-timeout` is closed (as
/// ztunnel releases unused pool connections), so a sidecar keeps no connection to every pod it
/// ever called; one that carries a tunnel stays however long, and the next call dials anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unused_hbone_connection_is_released_and_a_busy_one_is_not() {
    let w = two_pods(&[], &["--hbone-idle-timeout", "1"]).await;
    until_routed(&w).await;
    const OPEN: &str = "ferrum_mesh_hbone_connections ";
    eventually(
        "A's unused HBONE connection is released",
        Duration::from_secs(10),
        async || w.pods[0].metric(OPEN) == 0.0,
    )
    .await;
    // One raw TCP connection through both sidecars, silent for 3 s (three release periods)
    // between two echoes: its tunnel keeps the HBONE connection.
    let out = w.pods[0].run(&[
        "python3",
        "-c",
        &format!(
            "import socket, time\n\
             s = socket.create_connection(('{VIP}', 9000), timeout=10)\n\
             s.sendall(b'one;'); first = s.recv(64)\n\
             time.sleep(3)\n\
             s.sendall(b'two;'); second = s.recv(64)\n\
             print(first.decode(), second.decode())"
        ),
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "one; two;",
        "{}\nA's sidecar: {}",
        String::from_utf8_lossy(&out.stderr),
        w.pods[0].sidecar_log()
    );
    eventually(
        "released again once the tunnel closed",
        Duration::from_secs(10),
        async || w.pods[0].metric(OPEN) == 0.0,
    )
    .await;
    assert!(curl_svc_b(&w, "/after").0, "the next call dials anew");
}

/// The kubelet starts a pod's containers once it is scheduled; the operator's watch may see the
/// pod later. A sidecar refused until then is told to come back in 500 ms (gRPC's retry
/// pushback), so however long it waited it is ready soon after its pod is known, not after a
/// backoff that has grown to seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_started_before_its_pod_is_known_is_ready_soon_after() {
    let mut w = World::start(&[]).await;
    let a = w.pod_unannounced(NS, "a-1", "sa-a", "app: a", 10, true);
    let b = w.pod("b-1", "sa-b", "b", 11, true);
    w.service("svc-b", VIP, "b");
    w.app(b);
    w.sidecar(b, "sa-b", &[]);
    w.sidecar(a, "sa-a", &[]);
    w.ready(b).await;
    // By now a backoff doubling from 100 ms would wait 3 to 13 s between tries.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let url = format!("http://{}:15021/healthz/ready", w.pods[a].ip);
    let status = client().get(&url).send().await.map(|r| r.status().as_u16());
    assert_eq!(status.ok(), Some(503), "ready before its pod is known");
    let known = std::time::Instant::now();
    w.announce(a);
    w.ready(a).await;
    let took = known.elapsed();
    let log = w.pods[a].sidecar_log();
    assert!(
        took < Duration::from_millis(2500),
        "ready {took:?} after its pod became known\n{log}"
    );
    // It asked every half second, as told, rather than less and less often.
    let asked = log.matches("the server asked to retry then").count();
    assert!(asked >= 10, "retried {asked} times as the server asked in 8 s\n{log}");
    until_routed(&w).await;
}
