//! A real Envoy as an ADS client of the operator: it routes what the HTTPRoutes say, follows
//! changes, and its NACKs are recorded with Envoy's message.

use std::process::{Command, Stdio};
use std::time::Duration;

use ferrum_e2e::*;
use ferrum_testkit::jwt::{self, Issuer, JwksServer};
use serde_json::{Value, json};

/// A running Envoy (killed on drop) and its admin port.
struct Envoy {
    _proc: Proc,
    admin: u16,
}

/// How long a just-started Envoy may take to serve: its first start on a fresh machine (the
/// binary paged in from disk while other tests start theirs) once took over 15 s. The waits
/// end as soon as it serves.
const ENVOY_START: Duration = Duration::from_secs(60);

fn envoy(dir: &std::path::Path, node: &str, grpc: u16, delta: bool) -> Envoy {
    envoy_with(dir, node, grpc, delta, &[])
}

/// [`envoy`], its bootstrap made with more `envoy-bootstrap` arguments.
fn envoy_with(dir: &std::path::Path, node: &str, grpc: u16, delta: bool, extra: &[&str]) -> Envoy {
    let bin = venv_bin("envoy");
    let admin = free_port();
    // The bootstrap the operator generates: also what users get from `ferrum-operator envoy-bootstrap`.
    let out = Command::new(workspace_bin("ferrum-operator"))
        .args([
            "envoy-bootstrap",
            "--node-id",
            node,
            "--cluster",
            "e2e",
            "--xds-host",
            "127.0.0.1",
        ])
        .args(["--xds-port", &grpc.to_string(), "--admin-port", &admin.to_string()])
        .args(delta.then_some("--delta"))
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bootstrap: Value = serde_json::from_slice(&out.stdout).unwrap();
    let path = dir.join(format!("{node}.json"));
    std::fs::write(&path, bootstrap.to_string()).unwrap();
    let child = Command::new(bin)
        .arg("-c")
        .arg(&path)
        .args(["--log-level", "error", "--use-dynamic-base-id"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start envoy");
    Envoy {
        _proc: Proc(child),
        admin,
    }
}

fn setup(port: u16, a: &Backend, b: &Backend, weights: (u32, u32), path_regex: Option<&str>) -> String {
    let svc = |name: &str, be: &Backend| {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{ports: [{{name: http, port: 80}}]}}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, labels: {{kubernetes.io/service-name: {name}}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: {}}}]\nendpoints: [{{addresses: [127.0.0.1]}}]\n",
            be.addr.port()
        )
    };
    let extra = path_regex.map_or(String::new(), |re| {
        format!("  - matches: [{{path: {{type: RegularExpression, value: '{re}'}}}}]\n    backendRefs: [{{name: a, port: 80}}]\n")
    });
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {{name: ferrum}}\nspec: {{controllerName: ferrum.dev/gateway-controller}}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: web}}\n\
         spec: {{gatewayClassName: ferrum, addresses: [{{type: IPAddress, value: 127.0.0.1}}], listeners: [{{name: http, port: {port}, protocol: HTTP}}]}}\n\
         {}{}---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: shop}}\n\
         spec:\n  parentRefs: [{{name: web}}]\n  hostnames: [shop.example.com]\n  rules:\n\
         \x20 - matches: [{{path: {{type: PathPrefix, value: /}}}}]\n    backendRefs: [{{name: a, port: 80, weight: {}}}, {{name: b, port: 80, weight: {}}}]\n\
         \x20 - matches: [{{path: {{type: PathPrefix, value: /old}}}}]\n    filters: [{{type: RequestRedirect, requestRedirect: {{hostname: new.example.com, statusCode: 301}}}}]\n\
         \x20 - matches: [{{path: {{type: PathPrefix, value: /api}}}}]\n    filters:\n    - {{type: URLRewrite, urlRewrite: {{path: {{type: ReplacePrefixMatch, replacePrefixMatch: /v2}}}}}}\n\
         \x20   - {{type: RequestHeaderModifier, requestHeaderModifier: {{set: [{{name: x-via, value: envoy}}]}}}}\n    backendRefs: [{{name: b, port: 80}}]\n{extra}",
        svc("a", a),
        svc("b", b),
        weights.0,
        weights.1
    )
}

async fn get(port: u16, path: &str) -> Option<(u16, Option<String>, Value, Option<String>)> {
    let r = client()
        .get(format!("http://127.0.0.1:{port}{path}"))
        .header("host", "shop.example.com")
        .send()
        .await
        .ok()?;
    let status = r.status().as_u16();
    let backend = r.headers().get("x-backend").map(|v| v.to_str().unwrap().to_string());
    let location = r.headers().get("location").map(|v| v.to_str().unwrap().to_string());
    let body = serde_json::from_str(&r.text().await.ok()?).unwrap_or(Value::Null);
    Some((status, backend, body, location))
}

/// The last NACK the operator recorded for proxy `node` (`Null`: none), or `None` when it does
/// not know the proxy.
async fn last_rejection(op: &Operator, node: &str) -> Option<Value> {
    let proxies = op.admin_json("/proxies").await;
    proxies["proxies"]
        .as_array()?
        .iter()
        .find(|p| p["nodeId"] == node)
        .map(|p| p["lastRejection"].clone())
}

/// Runs `check` (given the proxy's name) through a real Envoy over our xDS, which must accept
/// what it is sent, then through ferrum-dp over MeshSubscribe; one at a time, on the listener
/// port the Gateway names.
async fn through_envoy_and_ferrum_dp(cluster: &Cluster, op: &Operator, node: &str, check: impl AsyncFn(&str)) {
    let envoy_node = format!("envoy-{node}");
    let envoy = envoy(cluster.dir.path(), &envoy_node, op.grpc, false);
    check("Envoy").await;
    assert_eq!(
        last_rejection(op, &envoy_node).await,
        Some(Value::Null),
        "Envoy accepted"
    );
    drop(envoy);
    let cache = cluster.dir.path().join(format!("dp-{node}.json"));
    let _dp = Proxy::start(&op.grpc_url(), &format!("dp-{node}"), &cache).await;
    check("ferrum-dp").await;
}

/// The proxy at `port` serves `setup`'s routes (weights 100/0): match, prefix rewrite, header
/// modifier, redirect to `location`.
async fn serves_the_routes(port: u16, proxy: &str, within: Duration, location: &str) {
    // The Gateway's objects may reach the operator over several watch events, so the proxy may
    // serve a partial translation first: wait until it has both backends.
    eventually(&format!("{proxy} routes to a and b"), within, async || {
        let routed = async |path: &str, to: &str| {
            get(port, path)
                .await
                .is_some_and(|r| r.0 == 200 && r.1.as_deref() == Some(to))
        };
        routed("/x", "a").await && routed("/api/users", "b").await
    })
    .await;
    let (_, backend, body, _) = get(port, "/api/users").await.unwrap();
    assert_eq!(backend.as_deref(), Some("b"));
    assert_eq!(body["path"], "/v2/users", "prefix rewrite");
    assert_eq!(body["headers"]["x-via"][0], "envoy", "request header modifier");
    let (status, _, _, got) = get(port, "/old/page").await.unwrap();
    assert_eq!(status, 301);
    assert_eq!(got.as_deref(), Some(location));
}

/// An HTTPS Gateway listener: Envoy terminates TLS with the certificate from the Secret its
/// `certificateRefs` name, delivered over SDS (never inline in LDS), routes by the HTTPRoute over
/// HTTP/2 and HTTP/1.1, and picks up a replaced key pair without a new Listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_terminates_tls_with_the_gateway_certificate_over_sds() {
    envoy_terminates_tls(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_over_delta_xds_terminates_tls_over_sds() {
    envoy_terminates_tls(true).await;
}

async fn envoy_terminates_tls(delta: bool) {
    let a = Backend::start("a").await;
    let cluster = Cluster::start();
    let op = cluster.operator("op-1").await;
    let gw = TlsGateway::apply(&cluster, free_port(), a.addr.port());
    let cert = gw.new_certificate(&cluster);
    let envoy = envoy(cluster.dir.path(), "envoy-tls", op.grpc, delta);
    eventually(
        "Envoy serves HTTPS with the Secret's certificate",
        ENVOY_START,
        async || gw.serves_with(&cert).await,
    )
    .await;
    let r = gw.client(&cert, false).get(gw.url()).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2, "ALPN h2");
    assert_eq!(r.headers()["x-backend"], "a");
    let r = gw.client(&cert, true).get(gw.url()).send().await.unwrap();
    assert_eq!((r.status().as_u16(), r.version()), (200, reqwest::Version::HTTP_11));
    let proxies = op.admin_json("/proxies").await;
    let state = |proxies: &Value| {
        proxies["proxies"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["nodeId"] == "envoy-tls")
            .cloned()
            .unwrap()
    };
    assert_eq!(
        state(&proxies)["lastRejection"],
        Value::Null,
        "Envoy accepted the TLS listener"
    );
    // Envoy's own view: the key pair arrived as an SDS secret; the listener only names it.
    let dump = envoy_config_dump(envoy.admin).await;
    assert!(
        dump.contains("tls_certificate_sds_secret_configs"),
        "the listener names its secret"
    );
    assert!(dump.contains("default/secure-cert"));

    // A new key pair in the Secret: Envoy serves it, and the listener stays as it was.
    let listeners_before = listener_versions(&dump);
    let rotated = gw.new_certificate(&cluster);
    eventually(
        "Envoy serves the replaced certificate",
        Duration::from_secs(15),
        async || gw.serves_with(&rotated).await,
    )
    .await;
    assert!(!gw.serves_with(&cert).await, "the old certificate is gone");
    assert_eq!(
        listener_versions(&envoy_config_dump(envoy.admin).await),
        listeners_before,
        "no listener update"
    );
    assert_eq!(state(&op.admin_json("/proxies").await)["lastRejection"], Value::Null);
}

/// ferrum-dp as an xDS client of the operator serves the HTTPS listener with the key pair it
/// gets over SDS, follows a replaced one, and never shows the key at `/config`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ferrum_dp_over_xds_serves_https_with_keys_from_sds() {
    ferrum_dp_serves_https_with_keys_from_sds("sotw").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ferrum_dp_over_delta_xds_serves_https_with_keys_from_sds() {
    ferrum_dp_serves_https_with_keys_from_sds("delta").await
}

async fn ferrum_dp_serves_https_with_keys_from_sds(protocol: &str) {
    let a = Backend::start("a").await;
    let cluster = Cluster::start();
    let op = cluster.operator("op-1").await;
    let gw = TlsGateway::apply(&cluster, free_port(), a.addr.port());
    let cert = gw.new_certificate(&cluster);
    let dp = Proxy::start_xds_over(&op.grpc_url(), "dp-xds-tls", protocol).await;
    eventually(
        "ferrum-dp serves the certificate it got over SDS",
        Duration::from_secs(10),
        async || gw.serves_with(&cert).await,
    )
    .await;
    let rotated = gw.new_certificate(&cluster);
    eventually(
        "ferrum-dp serves the replaced key pair",
        Duration::from_secs(10),
        async || gw.serves_with(&rotated).await,
    )
    .await;
    assert!(!gw.serves_with(&cert).await);
    assert!(!dp.admin_text("/config").await.contains("PRIVATE KEY"));
}

/// Envoy's config dump from its admin port, secrets included (Envoy redacts their keys itself).
async fn envoy_config_dump(admin: u16) -> String {
    client()
        .get(format!("http://127.0.0.1:{admin}/config_dump"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Every dynamic listener's name and version in a config dump.
fn listener_versions(dump: &str) -> Vec<(String, String)> {
    let v: Value = serde_json::from_str(dump).unwrap();
    let mut out = Vec::new();
    for c in v["configs"].as_array().unwrap() {
        for l in c["dynamic_listeners"].as_array().into_iter().flatten() {
            out.push((
                l["name"].as_str().unwrap_or("").to_string(),
                l["active_state"]["version_info"].as_str().unwrap_or("").to_string(),
            ));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_routes_by_our_xds_and_reports_nacks() {
    envoy_follows_the_routes(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_over_delta_xds_routes_and_reports_nacks() {
    envoy_follows_the_routes(true).await;
}

async fn envoy_follows_the_routes(delta: bool) {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let cluster = Cluster::start();
    let op = cluster.operator("op-1").await;
    let port = free_port();
    cluster.apply(&setup(port, &a, &b, (100, 0), None));
    let _envoy = envoy(cluster.dir.path(), "envoy-1", op.grpc, delta);

    serves_the_routes(port, "Envoy", ENVOY_START, "http://new.example.com/old/page").await;

    let proxies = op.admin_json("/proxies").await;
    let envoy_state = proxies["proxies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["nodeId"] == "envoy-1")
        .cloned()
        .unwrap();
    assert_eq!(
        envoy_state["protocol"],
        if delta { "xDS (delta)" } else { "xDS (SotW)" }
    );
    assert_eq!(envoy_state["lastRejection"], Value::Null);

    // A weight change reaches Envoy.
    cluster.apply(&setup(port, &a, &b, (0, 100), None));
    eventually("Envoy follows the weight change", PROPAGATION, async || {
        get(port, "/x").await.is_some_and(|r| r.1.as_deref() == Some("b"))
    })
    .await;

    // A regex Rust accepts but RE2 does not (long Unicode class names): Envoy NACKs, we record why, and
    // Envoy keeps serving its last good routes.
    cluster.apply(&setup(port, &a, &b, (0, 100), Some(r"/x\p{Letter}y")));
    eventually(
        "the NACK is recorded with Envoy's message",
        Duration::from_secs(5),
        async || {
            let p = op.admin_json("/proxies").await;
            p["proxies"].as_array().unwrap().iter().any(|p| {
                p["nodeId"] == "envoy-1"
                    && p["lastRejection"]
                        .as_str()
                        .is_some_and(|m| m.contains("RouteConfiguration"))
            })
        },
    )
    .await;
    assert_eq!(
        get(port, "/x").await.unwrap().1.as_deref(),
        Some("b"),
        "last good config keeps serving"
    );

    // An endpoint change (Service b now backed by a's address) reaches Envoy.
    cluster.apply(&format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: b-1, labels: {{kubernetes.io/service-name: b}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: {}}}]\nendpoints: [{{addresses: [127.0.0.1]}}]\n",
        a.addr.port()
    ));
    eventually("Envoy follows the endpoint change", PROPAGATION, async || {
        get(port, "/x").await.is_some_and(|r| r.1.as_deref() == Some("a"))
    })
    .await;

    // Every backend at weight 0 (valid Gateway API: the rule answers 500): Envoy answers the
    // 500 itself, with ferrum-dp's reason — a missing cluster would be its 503.
    cluster.apply(&setup(port, &a, &b, (0, 0), None));
    let error = async || {
        let r = client()
            .get(format!("http://127.0.0.1:{port}/x"))
            .header("host", "shop.example.com")
            .send()
            .await
            .ok()?;
        let e = r.headers().get("x-ferrum-error")?.to_str().ok()?.to_string();
        Some((r.status().as_u16(), e))
    };
    eventually(
        "Envoy answers 500 for a rule without weight",
        Duration::from_secs(5),
        async || error().await == Some((500, "backend_not_found".into())),
    )
    .await;
    // Weighted again, but both backends' Services gone: the 500 names the unresolved backend.
    cluster.apply(&setup(port, &a, &b, (1, 1), None));
    cluster.kubectl(&["delete", "service", "a", "b"], None);
    eventually(
        "Envoy answers 500 for unresolved backends",
        Duration::from_secs(5),
        async || error().await == Some((500, "backend_not_found".into())),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_xds_client_resolves_through_lds_rds_cds_eds() {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("grpc_xds.py");
    let (server, line) = spawn_announcing(Command::new(venv_bin("python")).arg(&script).args(["serve", "g1"]));
    let grpc_port: u16 = line.parse().expect("gRPC server port");
    let _server = Proc(server);

    let cluster = Cluster::start();
    let op = cluster.operator("op-1").await;
    cluster.apply(&format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {{name: ferrum}}\nspec: {{controllerName: ferrum.dev/gateway-controller}}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: web}}\n\
         spec: {{gatewayClassName: ferrum, listeners: [{{name: grpc, port: {}, protocol: HTTP}}]}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: greeter}}\nspec: {{ports: [{{name: grpc, port: 50051}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: greeter-1, labels: {{kubernetes.io/service-name: greeter}}}}\n\
         addressType: IPv4\nports: [{{name: grpc, port: {grpc_port}}}]\nendpoints: [{{addresses: [127.0.0.1]}}]\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {{name: greeter}}\n\
         spec:\n  parentRefs: [{{name: web}}]\n  hostnames: [grpc.example.com]\n  rules:\n\
         \x20 - matches: [{{method: {{service: helloworld.Greeter, method: SayHello}}}}]\n    backendRefs: [{{name: greeter, port: 50051}}]\n",
        free_port()
    ));
    let bootstrap = cluster.dir.path().join("grpc-bootstrap.json");
    std::fs::write(
        &bootstrap,
        json!({
            "xds_servers": [{"server_uri": format!("127.0.0.1:{}", op.grpc), "channel_creds": [{"type": "insecure"}], "server_features": ["xds_v3"]}],
            "node": {"id": "grpc-client", "cluster": "e2e", "locality": {}}
        })
        .to_string(),
    )
    .unwrap();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(venv_bin("python"))
            .arg(&script)
            .args(["call", "xds:///grpc.example.com", "20"])
            .env("GRPC_XDS_BOOTSTRAP", &bootstrap)
            .output()
            .expect("run the gRPC client")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "gRPC xDS call failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "hello from g1");
    let proxies = op.admin_json("/proxies").await;
    assert!(
        proxies["proxies"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["nodeId"] != "grpc-client" || p["lastRejection"].is_null()),
        "{proxies}"
    );
}

#[test]
fn envoy_validates_the_generated_bootstrap() {
    let out = Command::new(workspace_bin("ferrum-operator"))
        .args([
            "envoy-bootstrap",
            "--node-id",
            "validate-me",
            "--xds-host",
            "ferrum-operator.ferrum-system.svc",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bootstrap.json");
    std::fs::write(&path, &out.stdout).unwrap();
    let v = Command::new(venv_bin("envoy"))
        .args(["--mode", "validate", "-c"])
        .arg(&path)
        .output()
        .expect("run envoy");
    assert!(
        v.status.success(),
        "envoy --mode validate: {}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    assert!(
        String::from_utf8_lossy(&v.stdout).contains("OK"),
        "{}",
        String::from_utf8_lossy(&v.stdout)
    );
}

/// ferrum-dp as an xDS client of our ADS server: the same routes as Envoy gets, applied through
/// its own reload path; what it cannot serve is NACKed with the reason and the last good config
/// keeps serving.
/// With `--token`, ADS asks for it as MeshSubscribe does: a client without it is refused, one
/// with it (ferrum-dp --xds --token) is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ads_requires_the_proxy_token_when_one_is_set() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let cluster = Cluster::start();
    let op = cluster.operator_with("op-1", &["--token", "s3cret"]).await;
    let port = free_port();
    cluster.apply(&setup(port, &a, &b, (100, 0), None));
    assert_eq!(ads_answer(&op.grpc_url(), None).await, tonic::Code::Unauthenticated);
    assert_eq!(
        ads_answer(&op.grpc_url(), Some("guess")).await,
        tonic::Code::Unauthenticated
    );
    assert_eq!(ads_answer(&op.grpc_url(), Some("s3cret")).await, tonic::Code::Ok);
    let _dp = Proxy::start_xds_with_token(&op.grpc_url(), "dp-xds-token", "s3cret").await;
    let location = format!("http://new.example.com:{port}/old/page");
    serves_the_routes(port, "ferrum-dp", Duration::from_secs(10), &location).await;
}

/// The chart's defaults: the operator serves its gRPC port over TLS from the mesh CA and wants
/// credentials. A stock Envoy follows it with the bootstrap's `--xds-ca` (the mesh roots; the
/// operator's certificate must name the host) and `--token-file`, and routes; with roots that
/// did not sign the operator's certificate it gets nothing. Its rate limit filter is answered
/// over the same cluster (the service takes calls from hosts with an authenticated stream).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_follows_an_operator_that_serves_tls_and_wants_a_token() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let cluster = Cluster::start();
    let ca = format!("127.0.0.1:{}", free_port());
    let op = cluster
        .operator_with("op-1", &["--grpc-tls", "--ca-addr", &ca, "--token", "s3cret"])
        .await;
    let port = free_port();
    cluster.apply(&setup(port, &a, &b, (100, 0), None));
    let dir = cluster.dir.path();
    let (root, other, token) = (dir.join("root.pem"), dir.join("other.pem"), dir.join("token"));
    std::fs::write(&root, cluster.ca_root().await).unwrap();
    std::fs::write(&token, "s3cret\n").unwrap();
    let args = |roots: &std::path::Path| {
        vec![
            "--xds-ca".to_string(),
            roots.display().to_string(),
            "--token-file".to_string(),
            token.display().to_string(),
        ]
    };
    // A root of its own making, which signed nothing the operator serves.
    let foreign = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    std::fs::write(&other, foreign.cert.pem()).unwrap();
    let untrusting = args(&other);
    let untrusting: Vec<&str> = untrusting.iter().map(String::as_str).collect();
    let wrong = envoy_with(dir, "envoy-untrusting", op.grpc, false, &untrusting);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        get(port, "/x").await.is_none(),
        "no listener without trusting the operator"
    );
    drop(wrong);

    let trusting = args(&root);
    let trusting: Vec<&str> = trusting.iter().map(String::as_str).collect();
    let _envoy = envoy_with(dir, "envoy-tls", op.grpc, false, &trusting);
    serves_the_routes(port, "Envoy over TLS", ENVOY_START, "http://new.example.com/old/page").await;
    assert_eq!(
        last_rejection(&op, "envoy-tls").await,
        Some(Value::Null),
        "Envoy accepted"
    );

    // Its rate limit filter reaches the rate limit service over the same TLS cluster, which
    // answers it (its host has an authenticated stream) though the filter presents no token.
    cluster.apply(
        "apiVersion: ferrum.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: shared}\nspec:\n\
         \x20 type: Global\n\
         \x20 targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: web}]\n\
         \x20 rules: [{clientSelectors: [{headers: [{name: x-user, type: Distinct}]}], limit: {requests: 1, unit: Hour}}]\n",
    );
    let call = async || {
        let r = client()
            .get(format!("http://127.0.0.1:{port}/x"))
            .header("host", "shop.example.com")
            .header("x-user", "ann")
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.headers().contains_key("x-ratelimit-limit"))
    };
    eventually("Envoy asks the rate limit service", ENVOY_START, async || {
        call().await == (200, true)
    })
    .await;
    assert_eq!(call().await, (429, true), "ann's one request an hour is spent");
}

/// What an ADS stream presenting `token` gets: `Ok` once the first response (listeners) comes.
async fn ads_answer(url: &str, token: Option<&str>) -> tonic::Code {
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
    use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    let mut ads = AggregatedDiscoveryServiceClient::new(channel(url).await);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(DiscoveryRequest {
        type_url: ferrum_proto::xds::LISTENER.into(),
        node: Some(envoy_types::pb::envoy::config::core::v3::Node {
            id: "probe".into(),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    match ads.stream_aggregated_resources(bearer_request(rx, token)).await {
        Err(s) => s.code(),
        Ok(r) => match tokio::time::timeout(Duration::from_secs(5), r.into_inner().message()).await {
            Ok(Ok(Some(_))) => tonic::Code::Ok,
            Ok(Err(s)) => s.code(),
            _ => tonic::Code::DeadlineExceeded,
        },
    }
}

/// With credentials required, proxies authenticate with their ServiceAccount token (a
/// TokenReview): xDS clients and every-Gateway subscribers only from a trusted namespace (the
/// operator's), gateway proxies also from their Gateway's own namespace; a forged token, or none,
/// is refused; a ferrum-dp presenting a trusted token over xDS serves the routes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_authenticate_with_service_account_tokens() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let cluster = Cluster::start_with(free_port(), &["--token-key", TOKEN_KEY]);
    let op = cluster.operator_with("op-1", &["--proxy-auth-required"]).await;
    let port = free_port();
    cluster.apply(&setup(port, &a, &b, (100, 0), None));
    let trusted = token("default", "ferrum-gateway", "ferrum-ca", 3600, TOKEN_KEY);
    let shop = token("shop", "shop-gateway", "ferrum-ca", 3600, TOKEN_KEY);
    let forged = token("default", "ferrum-gateway", "ferrum-ca", 3600, "not-the-key");
    let url = op.grpc_url();
    assert_eq!(ads_answer(&url, None).await, tonic::Code::Unauthenticated);
    assert_eq!(ads_answer(&url, Some(&forged)).await, tonic::Code::Unauthenticated);
    assert_eq!(ads_answer(&url, Some(&shop)).await, tonic::Code::PermissionDenied);
    assert_eq!(ads_answer(&url, Some(&trusted)).await, tonic::Code::Ok);

    let subscribe_as = async |role: &str, t: &str| {
        subscribe(channel(&url).await, "probe", role, Some(t))
            .await
            .err()
            .map_or(tonic::Code::Ok, |s| s.code())
    };
    assert_eq!(subscribe_as("gateway/shop/web", &shop).await, tonic::Code::Ok);
    assert_eq!(
        subscribe_as("gateway/default/web", &shop).await,
        tonic::Code::PermissionDenied
    );
    assert_eq!(subscribe_as("", &shop).await, tonic::Code::PermissionDenied);
    assert_eq!(subscribe_as("gateway/default/web", &trusted).await, tonic::Code::Ok);

    let _dp = Proxy::start_xds_with_token(&url, "dp-sa-token", &trusted).await;
    let location = format!("http://new.example.com:{port}/old/page");
    serves_the_routes(port, "ferrum-dp", Duration::from_secs(10), &location).await;
    drop(_dp);

    // A gateway ferrum-dp on MeshSubscribe presents its projected token file, as the chart runs it.
    let token_file = cluster.dir.path().join("gateway-token");
    std::fs::write(&token_file, &trusted).unwrap();
    let cache = cluster.dir.path().join("gw.json");
    let _gw = Proxy::start_with(
        &url,
        "dp-sa-file",
        &cache,
        &["--token-file", token_file.to_str().unwrap()],
    )
    .await;
    serves_the_routes(port, "ferrum-dp", Duration::from_secs(10), &location).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ferrum_dp_follows_an_xds_server_and_nacks_what_it_cannot_serve() {
    ferrum_dp_follows_and_nacks("sotw", "xDS (SotW)").await
}

/// The same over incremental xDS: each change arrives as what changed (and what was removed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ferrum_dp_follows_a_delta_xds_server_and_nacks_what_it_cannot_serve() {
    ferrum_dp_follows_and_nacks("delta", "xDS (delta)").await
}

async fn ferrum_dp_follows_and_nacks(protocol: &str, registered_as: &str) {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let cluster = Cluster::start();
    let op = cluster.operator("op-1").await;
    let port = free_port();
    cluster.apply(&setup(port, &a, &b, (100, 0), None));
    let dp = Proxy::start_xds_over(&op.grpc_url(), "dp-xds", protocol).await;

    // ferrum-dp keeps the Gateway API's rule for an unset redirect port (the listener's port).
    let location = format!("http://new.example.com:{port}/old/page");
    serves_the_routes(port, "ferrum-dp", Duration::from_secs(10), &location).await;

    cluster.apply(&setup(port, &a, &b, (0, 100), None));
    eventually("ferrum-dp follows the weight change", PROPAGATION, async || {
        get(port, "/x").await.is_some_and(|r| r.1.as_deref() == Some("b"))
    })
    .await;
    // A Service deleted: its cluster leaves the proxy (over delta, as a name removed) and the
    // route's other backend serves on.
    let before = dp_clusters(&dp).await;
    assert_eq!(before.len(), 2, "{before:?}");
    cluster.kubectl(&["delete", "service", "a"], None);
    eventually(
        "ferrum-dp drops the deleted Service's cluster",
        Duration::from_secs(5),
        async || dp_clusters(&dp).await.len() == 1,
    )
    .await;
    assert_eq!(get(port, "/x").await.unwrap().1.as_deref(), Some("b"));
    let dp_state = |p: &Value| {
        p["proxies"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["nodeId"] == "dp-xds")
            .cloned()
            .unwrap()
    };
    let s = dp_state(&op.admin_json("/proxies").await);
    assert_eq!(s["protocol"], registered_as);
    assert_eq!(s["lastRejection"], Value::Null, "{s}");

    // Consistent hashing reaches xDS as a ring-hash cluster with the key on its routes:
    // ferrum-dp takes it (the cluster hashes on the routes' key).
    cluster.apply(
        "apiVersion: ferrum.dev/v1alpha1\nkind: BackendPolicy\nmetadata: {name: sticky}\n\
         spec: {targetRefs: [{group: '', kind: Service, name: b}], loadBalancer: {type: ConsistentHash, hashHeader: x-user}}\n",
    );
    let lb_of_b = async || {
        let config: Value = serde_json::from_str(&dp.admin_text("/config").await).unwrap_or_default();
        config["snapshot"]["clusters"][0]["lb"].clone()
    };
    eventually("ferrum-dp hashes b on x-user", Duration::from_secs(5), async || {
        lb_of_b().await == json!({"consistentHash": {"header": "x-user"}})
    })
    .await;
    assert_eq!(dp_state(&op.admin_json("/proxies").await)["lastRejection"], Value::Null);

    // A Gateway AuthorizationPolicy reaches xDS as an RBAC filter, which ferrum-dp does not
    // take from xDS (a policy skipped would be a policy not enforced): it NACKs the listener
    // with its reason and keeps routing as before.
    cluster.install_istio_crds();
    cluster.apply(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-admin}\n\
         spec: {targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: web}], action: DENY, rules: [{to: [{operation: {paths: ['/admin*']}}]}]}\n",
    );
    eventually(
        "the NACK is recorded with ferrum-dp's reason",
        Duration::from_secs(10),
        async || {
            dp_state(&op.admin_json("/proxies").await)["lastRejection"]
                .as_str()
                .is_some_and(|m| m.contains("Listener") && m.contains("refused rather than skipped"))
        },
    )
    .await;
    for _ in 0..10 {
        assert_eq!(
            get(port, "/x").await.unwrap().1.as_deref(),
            Some("b"),
            "last good config serves"
        );
    }
}

/// The names of the clusters a ferrum-dp serves (from its `/config`).
async fn dp_clusters(dp: &Proxy) -> Vec<String> {
    let config: Value = serde_json::from_str(&dp.admin_text("/config").await).unwrap_or_default();
    config["snapshot"]["clusters"]
        .as_array()
        .map(|cs| cs.iter().filter_map(|c| c["name"].as_str().map(String::from)).collect())
        .unwrap_or_default()
}

/// The first cluster a ferrum-dp serves whose name contains `part` (from its `/config`), or
/// null.
async fn dp_cluster(dp: &Proxy, part: &str) -> Value {
    let config: Value = serde_json::from_str(&dp.admin_text("/config").await).unwrap_or_default();
    config["snapshot"]["clusters"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"].as_str().is_some_and(|n| n.contains(part))))
        .cloned()
        .unwrap_or_default()
}

/// A Gateway with a TCP listener and a TLS passthrough listener, its TCPRoute and TLSRoutes
/// applied to the cluster: served the same by Envoy (TCP proxy filter chains, SNI through the
/// TLS inspector), by ferrum-dp over xDS and by ferrum-dp over MeshSubscribe, one after the
/// other on the same ports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_and_tls_routes_are_served_by_envoy_and_ferrum_dp_alike() {
    use ferrum_testkit::l4::{tcp_call, tcp_server, tls_call, tls_server};
    let db = tcp_server("db").await;
    let (a, a_root) = tls_server("a.example.test").await;
    let (b, b_root) = tls_server("b.example.test").await;
    let cluster = Cluster::start();
    let op = cluster.operator("op-1").await;
    let (tcp_port, tls_port) = (free_port(), free_port());
    let svc = |name: &str, port: u16| {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{ports: [{{name: tcp, port: 9000}}]}}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, labels: {{kubernetes.io/service-name: {name}}}}}\n\
             addressType: IPv4\nports: [{{name: tcp, port: {port}}}]\nendpoints: [{{addresses: [127.0.0.1]}}]\n"
        )
    };
    cluster.apply(&format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {{name: ferrum}}\nspec: {{controllerName: ferrum.dev/gateway-controller}}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: edge}}\n\
         spec:\n  gatewayClassName: ferrum\n  addresses: [{{type: IPAddress, value: 127.0.0.1}}]\n  listeners:\n\
         \x20 - {{name: db, port: {tcp_port}, protocol: TCP}}\n\
         \x20 - {{name: tls, port: {tls_port}, protocol: TLS, tls: {{mode: Passthrough}}}}\n\
         {}{}{}{}---\napiVersion: gateway.networking.k8s.io/v1\nkind: TCPRoute\nmetadata: {{name: db}}\n\
         spec: {{parentRefs: [{{name: edge, sectionName: db}}], rules: [{{backendRefs: [{{name: db, port: 9000}}]}}]}}\n\
         ---\napiVersion: gateway.networking.k8s.io/v1\nkind: TLSRoute\nmetadata: {{name: a}}\n\
         spec: {{parentRefs: [{{name: edge, sectionName: tls}}], hostnames: [a.example.test], rules: [{{backendRefs: [{{name: a, port: 9000}}]}}]}}\n\
         ---\napiVersion: gateway.networking.k8s.io/v1\nkind: TLSRoute\nmetadata: {{name: b}}\n\
         spec: {{parentRefs: [{{name: edge, sectionName: tls}}], hostnames: [b.example.test], rules: [{{backendRefs: [{{name: b, port: 9000}}]}}]}}\n",
        svc("db", db.port()),
        svc("a", a.port()),
        svc("b", b.port()),
        // The TCP proxy's idle timeout, from the Service's policy: Envoy takes it too.
        "---\napiVersion: ferrum.dev/v1alpha1\nkind: BackendPolicy\nmetadata: {name: db}\n\
         spec: {targetRefs: [{group: '', kind: Service, name: db}], timeouts: {tcpIdle: 1h}}\n",
    ));
    let serves = async |proxy: &str| {
        eventually(&format!("{proxy} forwards the TCP route"), ENVOY_START, async || {
            tcp_call(tcp_port, "SELECT 1").await.is_ok_and(|r| r == "db: SELECT 1")
        })
        .await;
        // Each client verifies its backend's own certificate: TLS passes through, picked by SNI.
        let got_a = tls_call(tls_port, "a.example.test", &a_root, "hi").await.unwrap();
        let got_b = tls_call(tls_port, "b.example.test", &b_root, "yo").await.unwrap();
        assert_eq!(
            (got_a.as_str(), got_b.as_str()),
            ("a.example.test: hi", "b.example.test: yo"),
            "{proxy}"
        );
        assert!(
            tls_call(tls_port, "c.example.test", &a_root, "x").await.is_err(),
            "{proxy}: no route, no session"
        );
    };

    let envoy = envoy(cluster.dir.path(), "envoy-l4", op.grpc, false);
    serves("Envoy").await;
    let rejected = last_rejection(&op, "envoy-l4").await;
    assert_eq!(rejected, Some(Value::Null), "Envoy accepted the L4 listeners");
    drop(envoy);

    // ferrum-dp reading the same listeners over xDS (TCP proxy filter chains back to routes)…
    let dp = Proxy::start_xds(&op.grpc_url(), "dp-l4-xds").await;
    serves("ferrum-dp over xDS").await;
    let config: Value = serde_json::from_str(&dp.admin_text("/config").await).unwrap();
    let protocols: Vec<&Value> = config["snapshot"]["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| &l["protocol"])
        .collect();
    assert_eq!(protocols.len(), 2);
    assert!(
        protocols.contains(&&json!("TLS")) && protocols.contains(&&json!("TCP")),
        "{protocols:?}"
    );
    drop(dp);
    // …and over MeshSubscribe (the snapshot itself).
    let cache = cluster.dir.path().join("dp-l4.json");
    let dp = Proxy::start(&op.grpc_url(), "dp-l4", &cache).await;
    serves("ferrum-dp").await;
    let db = dp_cluster(&dp, "/db:").await;
    assert_eq!(
        db["timeouts"]["tcpIdleMs"], 3_600_000,
        "the policy's idle timeout is the cluster's: {db}"
    );

    // Route status, as the operator wrote it.
    let route = cluster.get("tlsroutes", "default", "a");
    let accepted = &route["status"]["parents"][0]["conditions"][0];
    assert_eq!(
        (accepted["type"].as_str(), accepted["status"].as_str()),
        (Some("Accepted"), Some("True"))
    );
    let gw = cluster.get("gateways", "default", "edge");
    assert_eq!(gw["status"]["listeners"][0]["supportedKinds"][0]["kind"], "TCPRoute");
    assert_eq!(gw["status"]["listeners"][1]["attachedRoutes"], 2);
}

/// A token from `https://issuer.example` for audience `gw`, valid for an hour.
fn user_token(k: &Issuer, sub: &str, groups: &[&str]) -> String {
    k.token(
        &json!({"iss": "https://issuer.example", "sub": sub, "aud": "gw", "exp": jwt::now() + 3600, "groups": groups}),
    )
}

/// AuthorizationPolicies that target a Gateway: a stock Envoy is given them as RBAC filters
/// (a CUSTOM policy's shadow rules and `ext_authz` asking a real authorization service, DENY,
/// then ALLOW) and answers every request of a table as ferrum-dp does — hosts, methods,
/// paths with templates, ports, source IP blocks, header conditions, `not*` fields, and with a
/// RequestAuthentication (Envoy's `jwt_authn`, with the JWKS the operator fetched from the
/// rule's `jwksUri` put inline: Envoy has no cluster to fetch it from) tokens, request principals
/// and claims — and
/// refuses the TCP listener's connections the way Istio reads HTTP rules at L4. ferrum-dp
/// following the same xDS refuses the listener rather than skip a filter that enforces policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_authorization_policies_are_enforced_by_envoy_and_ferrum_dp_alike() {
    use ferrum_testkit::l4::{tcp_call, tcp_server};
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let authz = ferrum_testkit::ext_authz::AuthzServer::start().await;
    let db = tcp_server("db").await;
    let (key, other_key) = (Issuer::default(), Issuer::default());
    let cluster = Cluster::start();
    // The issuer's JWKS, served over HTTP where only the operator looks.
    let issuer = JwksServer::start(&key.jwks).await;
    let jwks_port = issuer.addr.port();
    cluster.install_istio_crds();
    let op = cluster.operator("op-1").await;
    let (port, tcp_port) = (free_port(), free_port());
    let target = "targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: web}]";
    cluster.apply(&setup(port, &a, &b, (100, 0), None));
    cluster.apply(&format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: web}}\n\
         spec:\n  gatewayClassName: ferrum\n  addresses: [{{type: IPAddress, value: 127.0.0.1}}]\n  listeners:\n\
         \x20 - {{name: http, port: {port}, protocol: HTTP}}\n  - {{name: db, port: {tcp_port}, protocol: TCP}}\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {{name: db}}\nspec: {{ports: [{{name: tcp, port: 9000}}]}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: db-1, labels: {{kubernetes.io/service-name: db}}}}\n\
         addressType: IPv4\nports: [{{name: tcp, port: {}}}]\nendpoints: [{{addresses: [127.0.0.1]}}]\n\
         ---\napiVersion: gateway.networking.k8s.io/v1\nkind: TCPRoute\nmetadata: {{name: db}}\n\
         spec: {{parentRefs: [{{name: web, sectionName: db}}], rules: [{{backendRefs: [{{name: db, port: 9000}}]}}]}}\n\
         ---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: no-admin}}\n\
         spec:\n  {target}\n  action: DENY\n  rules:\n\
         \x20 - to: [{{operation: {{paths: ['/admin*'], notMethods: [OPTIONS]}}}}]\n\
         \x20 - when: [{{key: 'request.headers[x-block]', values: ['yes']}}]\n\
         ---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: local-reads}}\n\
         spec:\n  {target}\n  rules:\n\
         \x20 - from: [{{source: {{ipBlocks: [127.0.0.0/8], notIpBlocks: [127.0.0.9]}}}}]\n\
         \x20   to: [{{operation: {{methods: [GET, HEAD], paths: [/x, '/api/*', '/items/{{*}}/view', '/ext/*']}}}}]\n\
         \x20 - to: [{{operation: {{hosts: ['*.example.com'], methods: [POST], ports: ['{port}']}}}}]\n\
         \x20   when: [{{key: 'request.headers[x-team]', values: [ops], notValues: [ops-intern]}}]\n\
         ---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt}}\n\
         spec:\n  {target}\n  jwtRules: [{{issuer: 'https://issuer.example', audiences: [gw], jwksUri: 'http://127.0.0.1:{jwks_port}/jwks.json'}}]\n\
         ---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: users}}\n\
         spec:\n  {target}\n  rules:\n\
         \x20 - from: [{{source: {{requestPrincipals: ['https://issuer.example/*']}}}}]\n\
         \x20   to: [{{operation: {{paths: [/private]}}}}]\n\
         \x20 - to: [{{operation: {{paths: [/team]}}}}]\n\
         \x20   when: [{{key: 'request.auth.claims[groups]', values: [ops]}}]\n\
         ---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: ext}}\n\
         spec: {{{target}, action: CUSTOM, provider: {{name: sample}}, rules: [{{to: [{{operation: {{paths: ['/ext/*']}}}}]}}]}}\n\
         ---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: ferrum-system}}\n\
         ---\napiVersion: ferrum.dev/v1alpha1\nkind: MeshConfig\nmetadata: {{name: default, namespace: ferrum-system}}\n\
         spec: {{extensionProviders: [{{name: sample, envoyExtAuthzHttp: {{service: ext-authz.default.svc.cluster.local, port: 8000, \
         includeRequestHeadersInCheck: [x-ext-authz], headersToDownstreamOnDeny: [x-ext-authz-check-result], \
         headersToDownstreamOnAllow: [x-ext-authz-check-result], includeRequestBodyInCheck: {{maxRequestBytes: 1024}}, \
         includeAdditionalHeadersInCheck: {{x-gateway: web}}}}}}]}}\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {{name: ext-authz}}\nspec: {{ports: [{{name: http, port: 8000}}]}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: ext-authz-1, labels: {{kubernetes.io/service-name: ext-authz}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: {}}}]\nendpoints: [{{addresses: [127.0.0.1]}}]\n",
        db.port(),
        authz.addr.port()
    ));
    let bearer = |k: &Issuer, groups: &[&str]| format!("Bearer {}", user_token(k, "alice", groups));
    let (ok, ops, dev, forged) = (
        bearer(&key, &[]),
        bearer(&key, &["ops", "dev"]),
        bearer(&key, &["dev"]),
        bearer(&other_key, &["ops"]),
    );
    // (method, path, header, status)
    type Case<'a> = (&'a str, &'a str, Option<(&'a str, &'a str)>, u16);
    let table: &[Case] = &[
        ("GET", "/x", None, 200),
        ("HEAD", "/api/users", None, 200),
        ("GET", "/items/7/view", None, 200),
        ("GET", "/items/7/8/view", None, 403),
        ("GET", "/admin/panel", None, 403),
        ("OPTIONS", "/admin", None, 403),
        ("GET", "/x", Some(("x-block", "yes")), 403),
        ("DELETE", "/x", None, 403),
        ("POST", "/x", Some(("x-team", "ops")), 200),
        ("POST", "/x", Some(("x-team", "dev")), 403),
        ("POST", "/x", None, 403),
        ("GET", "/other", None, 403),
        // RequestAuthentication: a token present must be valid (401), none at all passes on.
        ("GET", "/private", Some(("authorization", &ok)), 200),
        ("GET", "/private", None, 403),
        ("GET", "/private", Some(("authorization", &forged)), 401),
        ("GET", "/x", Some(("authorization", &forged)), 401),
        ("GET", "/x", Some(("authorization", &ok)), 200),
        ("GET", "/team", Some(("authorization", &ops)), 200),
        ("GET", "/team", Some(("authorization", &dev)), 403),
        // CUSTOM: the external service is asked first, then the other policies.
        ("GET", "/ext/page", None, 403),
        ("GET", "/ext/page", Some(("x-ext-authz", "allow")), 200),
    ];
    let call = async |method: &str, path: &str, header: Option<(&str, &str)>| {
        let mut r = client()
            .request(method.parse().unwrap(), format!("http://127.0.0.1:{port}{path}"))
            .header("host", "shop.example.com");
        if let Some((k, v)) = header {
            r = r.header(k, v);
        }
        r.send().await.ok().map(|r| r.status().as_u16())
    };
    let enforces = async |proxy: &str| {
        eventually(&format!("{proxy} serves and denies"), ENVOY_START, async || {
            call("GET", "/x", None).await == Some(200)
                && call("GET", "/admin", None).await == Some(403)
                && call("GET", "/private", Some(("authorization", &ok))).await == Some(200)
        })
        .await;
        let asked = authz.asked().len();
        let got: Vec<_> = futures_util::future::join_all(table.iter().map(|(m, p, h, _)| call(m, p, *h))).await;
        let want: Vec<_> = table.iter().map(|t| Some(t.3)).collect();
        assert_eq!(got, want, "{proxy}: {table:?}");
        assert_eq!(
            authz.asked().len(),
            asked + 2,
            "{proxy} asks about the CUSTOM policy's paths only"
        );
        let check = authz.asked().last().cloned().unwrap();
        assert_eq!(
            check["headers"]["x-gateway"], "web",
            "{proxy}: includeAdditionalHeadersInCheck"
        );
        // The body goes with the check (the service allows on what it says), and the service's
        // result comes back to the client.
        let posted = client()
            .post(format!("http://127.0.0.1:{port}/ext/orders"))
            .header("host", "shop.example.com")
            .header("x-team", "ops")
            .body("x-ext-authz: allow")
            .send()
            .await
            .unwrap();
        assert_eq!(posted.status(), 200, "{proxy}: includeRequestBodyInCheck");
        assert_eq!(
            posted.headers()["x-ext-authz-check-result"],
            "allowed",
            "{proxy}: headersToDownstreamOnAllow"
        );
        assert_eq!(authz.asked().last().unwrap()["body"], "x-ext-authz: allow");
        // The DENY rule on paths cannot see a path at L4: it denies every TCP connection (Istio).
        let reply = tcp_call(tcp_port, "SELECT 1").await;
        assert!(
            reply.as_ref().map_or(true, |r| r.is_empty()),
            "{proxy} closes the TCP listener's connections: {reply:?}"
        );
    };

    let envoy = envoy(cluster.dir.path(), "envoy-rbac", op.grpc, false);
    enforces("Envoy").await;
    let proxies = op.admin_json("/proxies").await;
    let state = |p: &Value, node: &str| {
        p["proxies"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["nodeId"] == node)
            .cloned()
            .unwrap_or(Value::Null)
    };
    assert_eq!(
        state(&proxies, "envoy-rbac")["lastRejection"],
        Value::Null,
        "Envoy accepted the RBAC filters"
    );
    drop(envoy);

    let cache = cluster.dir.path().join("dp-rbac.json");
    let dp = Proxy::start(&op.grpc_url(), "dp-rbac", &cache).await;
    enforces("ferrum-dp").await;
    drop(dp);

    // ferrum-dp over xDS is not told the policies as its own: it refuses the listener.
    let _dp = Proxy::start_xds(&op.grpc_url(), "dp-rbac-xds").await;
    eventually(
        "ferrum-dp over xDS NACKs the RBAC filter",
        Duration::from_secs(10),
        async || {
            state(&op.admin_json("/proxies").await, "dp-rbac-xds")["lastRejection"]
                .as_str()
                .is_some_and(|m| m.contains("refused rather than skipped"))
        },
    )
    .await;
    assert_eq!(call("GET", "/x", None).await, None, "nothing served unguarded");
}

/// Services with a BackendPolicy each — retries on connect failure (one of two endpoints
/// refuses), consistent hashing on a header, TLS to the endpoints with a CA file and a name to
/// check — and a rule with a CORS policy, a request mirror and a backendRef's own header filter,
/// routed the same way by Envoy over our xDS, by ferrum-dp over MeshSubscribe and by ferrum-dp
/// over xDS (which reads the retries, the key, the CORS policy, the mirror and the backend's
/// headers back off Envoy's routes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_hashing_and_upstream_tls_reach_envoy_as_ferrum_dp_applies_them() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let m = Backend::start("m").await;
    let (s, ca_pem) = Backend::start_tls("s", "api.example.test").await;
    // Mutual TLS: this one answers only clients with a certificate `client_ca` issued.
    let (client_ca, client_cert, client_key) = ferrum_testkit::client_ca_and_cert("gateway.example.test");
    let (mt, mt_ca_pem) = Backend::start_mtls("mt", "mtls.example.test", &client_ca).await;
    let cluster = Cluster::start();
    let ca_file = cluster.dir.path().join("api-ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let indent = |pem: &str| pem.lines().map(|l| format!("    {l}\n")).collect::<String>();
    let op = cluster.operator("op-1").await;
    let (port, refused) = (free_port(), free_port());
    // A Service whose endpoints are on 127.0.0.1 at these ports (one slice each).
    let svc = |name: &str, ports: &[u16]| {
        let mut y = format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{ports: [{{name: http, port: 80}}]}}\n"
        );
        for (i, p) in ports.iter().enumerate() {
            y += &format!(
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-{i}, labels: {{kubernetes.io/service-name: {name}}}}}\n\
                 addressType: IPv4\nports: [{{name: http, port: {p}}}]\nendpoints: [{{addresses: [127.0.0.1]}}]\n"
            );
        }
        y
    };
    let policy = |name: &str, spec: &str| {
        format!(
            "---\napiVersion: ferrum.dev/v1alpha1\nkind: BackendPolicy\nmetadata: {{name: {name}}}\n\
             spec: {{targetRefs: [{{group: '', kind: Service, name: {name}}}], {spec}}}\n"
        )
    };
    let ca = ca_file.display();
    cluster.apply(&format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {{name: ferrum}}\nspec: {{controllerName: ferrum.dev/gateway-controller}}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: web}}\n\
         spec: {{gatewayClassName: ferrum, addresses: [{{type: IPAddress, value: 127.0.0.1}}], listeners: [{{name: http, port: {port}, protocol: HTTP}}]}}\n\
         ---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: shop}}\n\
         spec:\n  parentRefs: [{{name: web}}]\n  hostnames: [shop.example.com]\n  rules:\n\
         \x20 - {{matches: [{{path: {{type: PathPrefix, value: /flaky}}}}], backendRefs: [{{name: flaky, port: 80}}]}}\n\
         \x20 - {{matches: [{{path: {{type: PathPrefix, value: /sticky}}}}], backendRefs: [{{name: sticky, port: 80}}]}}\n\
         \x20 - {{matches: [{{path: {{type: PathPrefix, value: /secure}}}}], backendRefs: [{{name: secure, port: 80}}]}}\n\
         \x20 - {{matches: [{{path: {{type: PathPrefix, value: /misnamed}}}}], backendRefs: [{{name: misnamed, port: 80}}]}}\n\
         \x20 - {{matches: [{{path: {{type: PathPrefix, value: /mutual}}}}], backendRefs: [{{name: mutual, port: 80}}]}}\n\
         \x20 - matches: [{{path: {{type: PathPrefix, value: /cors}}}}]\n\
         \x20   filters: [{{type: CORS, cors: {{allowOrigins: ['https://app.example.com'], allowMethods: [GET, PUT]}}}}, {{type: RequestMirror, requestMirror: {{backendRef: {{name: mirrored, port: 80}}}}}}]\n\
         \x20   backendRefs: [{{name: plain, port: 80, filters: [{{type: ResponseHeaderModifier, responseHeaderModifier: {{set: [{{name: x-own, value: plain}}]}}}}]}}]\n\
         {}{}{}{}{}{}{}{}{}{}{}{}{}\
         ---\napiVersion: v1\nkind: Secret\nmetadata: {{name: client-cert}}\ntype: kubernetes.io/tls\n\
         stringData:\n  tls.crt: |\n{}  tls.key: |\n{}  ca.crt: |\n{}",
        svc("flaky", &[a.addr.port(), refused]),
        // Slow start reaches Envoy as round robin's slow_start_config (it validates the window).
        policy(
            "flaky",
            "retry: {attempts: 2, on: [connect-failure]}, loadBalancer: {slowStart: {window: 30s, aggression: 2}}",
        ),
        svc("sticky", &[a.addr.port(), b.addr.port()]),
        policy("sticky", "loadBalancer: {type: ConsistentHash, hashHeader: x-user}"),
        svc("secure", &[s.addr.port()]),
        // Each request goes upstream in its client's protocol (Envoy's use_downstream_protocol_config).
        policy(
            "secure",
            &format!("protocol: Client, tls: {{sni: api.example.test, caFile: '{ca}'}}"),
        ),
        svc("misnamed", &[s.addr.port()]),
        policy("misnamed", &format!("tls: {{sni: other.example.test, caFile: '{ca}'}}")),
        svc("plain", &[a.addr.port()]),
        // Connection options Envoy takes in its HTTP protocol options and circuit breaker.
        policy(
            "plain",
            "circuitBreaker: {maxRequestsPerConnection: 1, maxRetries: 5}, tcpKeepalive: {time: 10m, interval: 75s, probes: 9}, \
             loadBalancer: {type: ConsistentHash, hashCookie: {name: sticky, ttl: 1h, path: /}}",
        ),
        svc("mirrored", &[m.addr.port()]),
        svc("mutual", &[mt.addr.port()]),
        // The Secret's ca.crt verifies the server: inline CAs, for Envoy too.
        policy("mutual", "tls: {sni: mtls.example.test, clientCertificateRef: client-cert}"),
        indent(&client_cert),
        indent(&client_key),
        indent(&mt_ca_pem),
    ));
    let send = async |path: &str, user: &str| {
        let r = client()
            .get(format!("http://127.0.0.1:{port}{path}"))
            .header("host", "shop.example.com")
            .header("x-user", user)
            .send()
            .await
            .ok()?;
        let backend = r.headers().get("x-backend").map(|v| v.to_str().unwrap().to_string());
        Some((r.status().as_u16(), backend))
    };
    // A preflight from the allowed origin is answered with it; its request's answer is marked
    // for it; and a copy goes to the mirror, its host marked `-shadow`.
    let cors_and_mirror = async |proxy: &str| {
        let origin = "https://app.example.com";
        let r = client()
            .request(reqwest::Method::OPTIONS, format!("http://127.0.0.1:{port}/cors"))
            .header("host", "shop.example.com")
            .header("origin", origin)
            .header("access-control-request-method", "PUT")
            .send()
            .await
            .unwrap();
        let allowed = |r: &reqwest::Response| r.headers().get("access-control-allow-origin").cloned();
        assert_eq!(
            (r.status().as_u16(), allowed(&r)),
            (200, Some(origin.parse().unwrap())),
            "{proxy}: the preflight"
        );
        let path = format!("/cors/{}", proxy.replace(' ', "-"));
        let r = client()
            .get(format!("http://127.0.0.1:{port}{path}"))
            .header("host", "shop.example.com")
            .header("origin", origin)
            .send()
            .await
            .unwrap();
        assert_eq!(
            allowed(&r),
            Some(origin.parse().unwrap()),
            "{proxy}: the answer is marked"
        );
        assert_eq!(
            r.headers().get("x-own").map(|v| v.to_str().unwrap()),
            Some("plain"),
            "{proxy}: the backendRef's own filter"
        );
        // The Service hashes on a cookie the client did not send: the answer sets it.
        let set = r.headers().get("set-cookie").map(|v| v.to_str().unwrap().to_string());
        assert!(
            set.as_deref()
                .is_some_and(|s| s.starts_with("sticky=") && s.contains("Max-Age=3600")),
            "{proxy}: {set:?}"
        );
        eventually(
            &format!("{proxy} mirrors the request"),
            Duration::from_secs(5),
            async || m.last().is_some_and(|l| l["path"] == path.as_str()),
        )
        .await;
        let copy = m.last().unwrap();
        assert_eq!(copy["headers"]["host"][0], "shop.example.com-shadow", "{proxy}");
    };
    let applies = async |proxy: &str, within: Duration| {
        eventually(
            &format!("{proxy} reaches the TLS backend, its name checked"),
            within,
            async || send("/secure", "u").await == Some((200, Some("s".into()))),
        )
        .await;
        assert_eq!(
            send("/mutual", "u").await,
            Some((200, Some("mt".into()))),
            "{proxy} presents the Secret's client certificate"
        );
        // Over HTTP/2 the host is `:authority`, named in the URL.
        let shop = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let shop_client = || reqwest::Client::builder().resolve("shop.example.com", shop);
        for (c, version) in [
            (shop_client().http1_only(), "HTTP/1.1"),
            (shop_client().http2_prior_knowledge(), "HTTP/2.0"),
        ] {
            let c = c.build().unwrap();
            let r = c
                .get(format!("http://shop.example.com:{port}/secure"))
                .send()
                .await
                .unwrap();
            let (status, text) = (r.status(), r.text().await.unwrap());
            let v: Value = serde_json::from_str(&text).unwrap_or_default();
            assert_eq!(
                v["version"], version,
                "{proxy}: the client's protocol upstream: {status} {text}"
            );
        }
        let misnamed = send("/misnamed", "u").await.unwrap();
        assert!(
            misnamed.0 >= 502 && misnamed.1.is_none(),
            "{proxy}: a certificate for another name is refused: {misnamed:?}"
        );
        // Half the tries go to a port that refuses: every request is retried onto the other.
        for i in 0..20 {
            assert_eq!(
                send("/flaky", "u").await,
                Some((200, Some("a".into()))),
                "{proxy}: request {i}"
            );
        }
        // Each user stays on one endpoint; the users are spread over both.
        let mut seen = std::collections::BTreeSet::new();
        for u in 0..12 {
            let user = format!("user-{u}");
            let first = send("/sticky", &user).await.unwrap();
            for _ in 0..4 {
                assert_eq!(send("/sticky", &user).await.unwrap(), first, "{proxy}: {user} moved");
            }
            seen.insert(first.1);
        }
        assert_eq!(seen.len(), 2, "{proxy}: every user hashed to one endpoint: {seen:?}");
        cors_and_mirror(proxy).await;
    };

    let envoy = envoy(cluster.dir.path(), "envoy-traffic", op.grpc, false);
    applies("Envoy", ENVOY_START).await;
    let rejected = last_rejection(&op, "envoy-traffic").await;
    assert_eq!(rejected, Some(Value::Null), "Envoy accepted every resource");
    drop(envoy);

    let cache = cluster.dir.path().join("dp-traffic.json");
    let dp = Proxy::start(&op.grpc_url(), "dp-traffic", &cache).await;
    applies("ferrum-dp", Duration::from_secs(10)).await;
    drop(dp);

    // ferrum-dp reading Envoy's resources reads the policies back off the routes.
    let dp = Proxy::start_xds(&op.grpc_url(), "dp-traffic-xds").await;
    applies("ferrum-dp over xDS", Duration::from_secs(10)).await;
    assert_eq!(last_rejection(&op, "dp-traffic-xds").await, Some(Value::Null));
    let flaky = dp_cluster(&dp, "flaky").await;
    assert_eq!(
        flaky["slowStart"],
        json!({"windowMs": 30000, "aggression": 2.0, "minWeightPercent": 10.0}),
        "ferrum-dp over xDS reads the slow start back"
    );

    // Each BackendPolicy's status says whether it is in effect, or which field it cannot take
    // (used by a route or not).
    cluster.apply(&policy("ghost", "loadBalancer: {type: Fastest}"));
    let accepted = |name: &str| {
        let c = cluster.get("backendpolicies", "default", name)["status"]["conditions"][0].clone();
        (
            c["status"].as_str().map(String::from),
            c["message"].as_str().map(String::from),
        )
    };
    eventually(
        "BackendPolicy statuses are written",
        Duration::from_secs(10),
        async || {
            accepted("flaky").0.as_deref() == Some("True")
                && accepted("ghost").0.as_deref() == Some("False")
                && accepted("ghost")
                    .1
                    .is_some_and(|m| m.starts_with("spec.loadBalancer.type"))
        },
    )
    .await;
}

/// An Istio DestinationRule is a Service's traffic policy: consistent hashing on a header
/// reaches Envoy and ferrum-dp alike, its status says it is in effect, and a field Ferrum does
/// not apply leaves the rule out with the field in its status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_rule_reaches_envoy_and_ferrum_dp_and_reports_what_it_cannot_apply() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let cluster = Cluster::start();
    cluster.install_istio_crds();
    let op = cluster.operator("op-1").await;
    let port = free_port();
    let mut slices = String::new();
    for (i, be) in [&a, &b].iter().enumerate() {
        slices += &format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: reviews-{i}, labels: {{kubernetes.io/service-name: reviews}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: {}}}]\nendpoints: [{{addresses: [127.0.0.1]}}]\n",
            be.addr.port()
        );
    }
    let rule = |extra: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: reviews}}\n\
             spec: {{host: reviews.default.svc.cluster.local, trafficPolicy: {{loadBalancer: {{consistentHash: {{httpHeaderName: x-user}}}}{extra}}}}}\n"
        )
    };
    cluster.apply(&format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {{name: ferrum}}\nspec: {{controllerName: ferrum.dev/gateway-controller}}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: web}}\n\
         spec: {{gatewayClassName: ferrum, addresses: [{{type: IPAddress, value: 127.0.0.1}}], listeners: [{{name: http, port: {port}, protocol: HTTP}}]}}\n\
         ---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: reviews}}\n\
         spec: {{parentRefs: [{{name: web}}], rules: [{{backendRefs: [{{name: reviews, port: 80}}]}}]}}\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {{name: reviews}}\nspec: {{ports: [{{name: http, port: 80}}]}}\n{slices}---\n{}",
        rule("")
    ));
    let backend_of = async |user: &str| {
        let r = client()
            .get(format!("http://127.0.0.1:{port}/"))
            .header("x-user", user)
            .send()
            .await
            .ok()?;
        r.headers().get("x-backend").map(|v| v.to_str().unwrap().to_string())
    };
    // Each user stays on one endpoint; the users are spread over both.
    let sticky = async |proxy: &str| {
        let mut seen = std::collections::BTreeSet::new();
        for u in 0..12 {
            let user = format!("user-{u}");
            let first = backend_of(&user).await;
            for _ in 0..4 {
                assert_eq!(backend_of(&user).await, first, "{proxy}: {user} moved");
            }
            seen.insert(first);
        }
        seen.len() == 2 && !seen.contains(&None)
    };
    let condition = || {
        let dr = cluster.get("destinationrules", "default", "reviews");
        let c = &dr["status"]["conditions"][0];
        (
            c["type"].as_str().map(String::from),
            c["status"].as_str().map(String::from),
            c["message"].as_str().map(String::from).unwrap_or_default(),
        )
    };
    eventually(
        "the rule's status says it is in effect",
        Duration::from_secs(10),
        async || {
            let (t, s, _) = condition();
            (t.as_deref(), s.as_deref()) == (Some("Accepted"), Some("True"))
        },
    )
    .await;

    let envoy = envoy(cluster.dir.path(), "envoy-dr", op.grpc, false);
    eventually("Envoy serves the route", ENVOY_START, async || {
        backend_of("u").await.is_some()
    })
    .await;
    assert!(sticky("Envoy").await, "Envoy hashes on x-user");
    drop(envoy);
    let cache = cluster.dir.path().join("dp-dr.json");
    let _dp = Proxy::start(&op.grpc_url(), "dp-dr", &cache).await;
    eventually("ferrum-dp serves the route", Duration::from_secs(10), async || {
        backend_of("u").await.is_some()
    })
    .await;
    assert!(sticky("ferrum-dp").await, "ferrum-dp hashes on x-user");

    // proxyProtocol has no Ferrum equivalent: the rule is left out whole and says why.
    cluster.apply(&rule(", proxyProtocol: {version: V1}"));
    eventually("the status names the field", Duration::from_secs(10), async || {
        let (_, s, message) = condition();
        s.as_deref() == Some("False") && message.starts_with("spec.trafficPolicy.proxyProtocol")
    })
    .await;
    assert!(backend_of("u").await.is_some(), "the Service still serves");
}

/// A Gateway behind an L4 load balancer (HAProxy, `send-proxy-v2` and `send-proxy`) that
/// trusts one `X-Forwarded-For` hop, served by Envoy over our xDS (its `proxy_protocol` listener
/// filter and `xff_num_trusted_hops`), by ferrum-dp over MeshSubscribe and by ferrum-dp over
/// xDS (which reads both back off Envoy's listener): each sees the client the header names in
/// `remoteIpBlocks` and extends `X-Forwarded-For` with it, sees the balancer in `ipBlocks`, and
/// closes a connection that comes without the header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_behind_a_load_balancer_sees_the_client_in_envoy_and_ferrum_dp_alike() {
    use ferrum_testkit::haproxy::LoadBalancer;
    const CLIENT: &str = "127.0.0.3";
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let cluster = Cluster::start();
    cluster.install_istio_crds();
    let op = cluster.operator("op-1").await;
    let port = free_port();
    let target = "targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: web}]";
    cluster.apply(&setup(port, &a, &b, (100, 0), None).replacen(
        "kind: Gateway\nmetadata: {name: web}",
        "kind: Gateway\nmetadata: {name: web, annotations: {ferrum.dev/proxy-protocol: 'true', ferrum.dev/xff-trusted-hops: '1'}}",
        1,
    ));
    cluster.apply(&format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: via-lb}}\n\
         spec: {{{target}, rules: [{{from: [{{source: {{ipBlocks: [127.0.0.1/32]}}}}]}}]}}\n\
         ---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: no-doc-net}}\n\
         spec: {{{target}, action: DENY, rules: [{{from: [{{source: {{remoteIpBlocks: [198.51.100.0/24]}}}}]}}]}}\n"
    ));
    let lb = LoadBalancer::start(port, "127.0.0.1").await;
    let c = client_from(CLIENT);
    let call = async |front: u16, xff: Option<&str>| {
        let mut r = c
            .get(format!("http://127.0.0.1:{front}/x"))
            .header("host", "shop.example.com");
        if let Some(v) = xff {
            r = r.header("x-forwarded-for", v);
        }
        let r = r.send().await.ok()?;
        let status = r.status().as_u16();
        let body: Value = serde_json::from_str(&r.text().await.ok()?).unwrap_or(Value::Null);
        // Entries only: Envoy appends with "," and ferrum-dp with ", ".
        let xff: Vec<String> = body["headers"]["x-forwarded-for"][0]
            .as_str()
            .map_or(Vec::new(), |v| v.split(',').map(|e| e.trim().to_string()).collect());
        Some((status, xff))
    };
    let sees_the_client = async |proxy: &str, policies: bool| {
        eventually(
            &format!("{proxy} serves behind the balancer"),
            ENVOY_START,
            async || call(lb.v2, None).await.is_some_and(|(s, _)| s == 200),
        )
        .await;
        for front in [lb.v1, lb.v2] {
            assert_eq!(
                call(front, None).await,
                Some((200, vec![CLIENT.into()])),
                "{proxy}, port {front}"
            );
        }
        let denied = if policies { 403 } else { 200 };
        assert_eq!(
            call(lb.v2, Some("198.51.100.7")).await.map(|r| r.0),
            Some(denied),
            "{proxy}"
        );
        assert_eq!(
            call(lb.v2, Some("198.51.100.7, 203.0.113.5")).await,
            Some((200, vec!["198.51.100.7".into(), "203.0.113.5".into(), CLIENT.into()])),
            "{proxy}"
        );
        let direct = client()
            .get(format!("http://127.0.0.1:{port}/x"))
            .header("host", "shop.example.com")
            .send()
            .await;
        assert!(direct.is_err(), "{proxy} answered without a PROXY header: {direct:?}");
    };

    through_envoy_and_ferrum_dp(&cluster, &op, "lb", async |proxy| sees_the_client(proxy, true).await).await;

    // ferrum-dp over xDS refuses RBAC filters (see above): the listener alone.
    cluster.kubectl(&["delete", "authorizationpolicy", "via-lb", "no-doc-net"], None);
    let _dp = Proxy::start_xds(&op.grpc_url(), "dp-lb-xds").await;
    sees_the_client("ferrum-dp over xDS", false).await;
}

/// A Gateway's RateLimitPolicy (Local) is enforced alike by Envoy over our xDS (its local rate
/// limit filter, one descriptor per rule), by ferrum-dp over MeshSubscribe and by ferrum-dp
/// over xDS (which reads the policy back off Envoy's route): a header-selected rule counts each
/// user on its own, a block of client addresses shares one count, a distinct block counts each
/// address on its own, and requests no rule selects are never refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_rate_limits_are_enforced_alike_by_envoy_and_ferrum_dp() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let cluster = Cluster::start();
    let op = cluster.operator("op-1").await;
    let port = free_port();
    cluster.apply(&setup(port, &a, &b, (100, 0), None));
    cluster.apply(
        "apiVersion: ferrum.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: limits}\nspec:\n\
         \x20 targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: web}]\n\
         \x20 rules:\n\
         \x20 - clientSelectors: [{headers: [{name: x-tier, value: free}, {name: x-user, type: Distinct}]}]\n\
         \x20   limit: {requests: 2, unit: Minute}\n\
         \x20 - clientSelectors: [{sourceCIDR: {value: 127.0.0.3/32}}]\n\
         \x20   limit: {requests: 1, unit: Hour}\n\
         \x20 - clientSelectors: [{sourceCIDR: {value: 127.0.0.4/30, type: Distinct}}]\n\
         \x20   limit: {requests: 1, unit: Minute}\n",
    );
    let call = async |from: &str, headers: &[(&str, &str)]| {
        let mut r = client_from(from)
            .get(format!("http://127.0.0.1:{port}/x"))
            .header("host", "shop.example.com");
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.send().await.map(|r| r.status().as_u16()).unwrap_or(0)
    };
    let enforces = async |proxy: &str| {
        eventually(&format!("{proxy} serves"), ENVOY_START, async || {
            call("127.0.0.1", &[]).await == 200
        })
        .await;
        let free = |user| [("x-tier", "free"), ("x-user", user)];
        let mut seen = Vec::new();
        for _ in 0..3 {
            seen.push(call("127.0.0.1", &free("ann")).await);
        }
        seen.push(call("127.0.0.1", &free("bob")).await);
        seen.push(call("127.0.0.1", &[("x-tier", "paid"), ("x-user", "ann")]).await);
        seen.push(call("127.0.0.1", &[("x-user", "ann")]).await);
        for from in [
            "127.0.0.3",
            "127.0.0.3",
            "127.0.0.4",
            "127.0.0.4",
            "127.0.0.5",
            "127.0.0.8",
        ] {
            seen.push(call(from, &[]).await);
        }
        assert_eq!(
            seen,
            [200, 200, 429, 200, 200, 200, 200, 429, 200, 429, 200, 200],
            "{proxy}: ann ×3, bob, paid, no tier, then by client address"
        );
    };

    through_envoy_and_ferrum_dp(&cluster, &op, "rl", async |proxy| enforces(proxy).await).await;
    let _dp = Proxy::start_xds(&op.grpc_url(), "dp-rl-xds").await;
    enforces("ferrum-dp over xDS").await;
}

/// A `Global` RateLimitPolicy counts every proxy's requests together: Envoy asks the operator's
/// rate limit service (on the gRPC port its bootstrap names), which counts in the Redis
/// ferrum-dp counts in, under the same keys — so Envoy, ferrum-dp over MeshSubscribe and ferrum-dp
/// over xDS (which reads the Global policy back off Envoy's route) draw on one budget per user
/// and per client address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_rate_limits_are_counted_together_by_envoy_and_ferrum_dp() {
    let redis = ferrum_testkit::redis::RedisServer::start().await;
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let cluster = Cluster::start();
    let op = cluster
        .operator_with("op-1", &["--rate-limit-redis", &redis.url()])
        .await;
    let port = free_port();
    cluster.apply(&setup(port, &a, &b, (100, 0), None));
    cluster.apply(
        "apiVersion: ferrum.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: shared}\nspec:\n\
         \x20 type: Global\n\
         \x20 targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: web}]\n\
         \x20 rules:\n\
         \x20 - clientSelectors: [{headers: [{name: x-user, type: Distinct}]}]\n\
         \x20   limit: {requests: 3, unit: Hour}\n\
         \x20 - clientSelectors: [{sourceCIDR: {value: 127.0.0.3/32}}]\n\
         \x20   limit: {requests: 2, unit: Hour}\n",
    );
    let call = async |from: &str, user: Option<&str>| {
        let mut r = client_from(from)
            .get(format!("http://127.0.0.1:{port}/x"))
            .header("host", "shop.example.com");
        if let Some(u) = user {
            r = r.header("x-user", u);
        }
        match r.send().await {
            Ok(r) => (r.status().as_u16(), r.headers().contains_key("x-ratelimit-limit")),
            Err(_) => (0, false),
        }
    };
    let serving = async |proxy: &str| {
        eventually(&format!("{proxy} serves"), ENVOY_START, async || {
            call("127.0.0.1", None).await.0 == 200
        })
        .await;
    };
    let statuses = async |calls: &[(&str, Option<&str>)]| {
        let mut seen = Vec::new();
        for (from, user) in calls {
            seen.push(call(from, *user).await.0);
        }
        seen
    };

    // Envoy spends two of ann's three and one of the block's two.
    let envoy_node = "envoy-global";
    let first = envoy(cluster.dir.path(), envoy_node, op.grpc, false);
    serving("Envoy").await;
    assert_eq!(
        call("127.0.0.1", Some("ann")).await,
        (200, true),
        "Envoy asks the service, and says the limit"
    );
    assert_eq!(
        statuses(&[("127.0.0.1", Some("ann")), ("127.0.0.3", None)]).await,
        [200, 200]
    );
    assert_eq!(
        last_rejection(&op, envoy_node).await,
        Some(Value::Null),
        "Envoy accepted"
    );
    drop(first);

    // ferrum-dp over MeshSubscribe has what is left: ann 1, the block 1; bob all of his.
    let cache = cluster.dir.path().join("dp-global.json");
    let dp = Proxy::start_with(
        &op.grpc_url(),
        "dp-global",
        &cache,
        &["--rate-limit-redis", &redis.url()],
    )
    .await;
    serving("ferrum-dp").await;
    assert_eq!(
        statuses(&[
            ("127.0.0.1", Some("ann")),
            ("127.0.0.1", Some("ann")),
            ("127.0.0.3", None),
            ("127.0.0.3", None),
            ("127.0.0.1", Some("bob")),
        ])
        .await,
        [200, 429, 200, 429, 200],
        "ferrum-dp counts on from Envoy's counts"
    );
    drop(dp);

    // ferrum-dp over xDS reads the Global policy back and counts in the same Redis; Envoy, back,
    // sees what ferrum-dp spent.
    let xds = Proxy::start_xds_with(&op.grpc_url(), "dp-global-xds", &["--rate-limit-redis", &redis.url()]).await;
    serving("ferrum-dp over xDS").await;
    assert_eq!(
        statuses(&[
            ("127.0.0.1", Some("ann")),
            ("127.0.0.1", Some("bob")),
            ("127.0.0.1", Some("bob")),
            ("127.0.0.3", None),
        ])
        .await,
        [429, 200, 200, 429],
        "ferrum-dp over xDS: ann and the block are spent, bob has two left"
    );
    drop(xds);
    let _envoy = envoy(cluster.dir.path(), envoy_node, op.grpc, false);
    serving("Envoy again").await;
    assert_eq!(
        statuses(&[
            ("127.0.0.1", Some("bob")),
            ("127.0.0.1", Some("cyd")),
            ("127.0.0.1", None)
        ])
        .await,
        [429, 200, 200],
        "Envoy: bob is spent, cyd is not, no user is not limited"
    );
}
