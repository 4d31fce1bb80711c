//! Harness for end-to-end tests: the Kubernetes API emulator (`kube_api.py`, kmock + adapter),
//! `kubectl`, `ferrum-operator` and `ferrum-dp` as real processes on loopback.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use ferrum_testkit::*;

pub mod mesh;
use serde_json::{Value, json};

/// Runs `ferrum-node-agent --pin-dir <pin_dir> <args>` and returns its output; panics on failure.
pub fn node_agent(pin_dir: &Path, args: &[&str]) -> String {
    try_node_agent(pin_dir, args).unwrap_or_else(|e| panic!("ferrum-node-agent {args:?}: {e}"))
}

/// [`node_agent`], its error output when it fails.
pub fn try_node_agent(pin_dir: &Path, args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new(workspace_bin("ferrum-node-agent"))
        .arg("--pin-dir")
        .arg(pin_dir)
        .args(args)
        .output()
        .expect("ferrum-node-agent runs");
    match out.status.success() {
        true => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
    }
}

/// A binary of this workspace, next to the test executable (`make test` builds them first).
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} is not built: run `cargo build --workspace --bins` (make test does)",
        bin.display()
    );
    bin
}

/// A program of the e2e venv (`make e2e-deps` installs kmock, Envoy and grpcio there).
pub fn venv_bin(name: &str) -> PathBuf {
    let venv = std::env::var("FERRUM_E2E_VENV").unwrap_or_else(|_| "/var/tmp/ferrum-e2e-venv".into());
    let bin = Path::new(&venv).join("bin").join(name);
    assert!(bin.exists(), "{} is missing: run `make e2e-deps`", bin.display());
    bin
}

/// Starts a program that announces readiness with its first line of output; returns that line.
pub fn spawn_announcing(cmd: &mut Command) -> (Child, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("start {cmd:?}: {e}"));
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (child, line.trim().to_string())
}

/// The Kubernetes API emulator and a kubeconfig for it.
pub struct Cluster {
    _api: Proc,
    pub dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
    pub port: u16,
}

/// A file of `../shared/testdata` (the Gateway API and Istio CRDs as released).
pub fn shared_testdata(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/testdata")
        .join(name);
    assert!(
        p.exists(),
        "{} is missing: ../shared must sit beside the repository",
        p.display()
    );
    p.display().to_string()
}

impl Cluster {
    pub fn start() -> Cluster {
        let port = free_port();
        Self::start_on(port)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn start_on(port: u16) -> Cluster {
        Self::start_with(port, &[])
    }

    /// With emulator flags: `--without GROUP` (kinds not served), `--crds FILE` (CRDs served).
    pub fn start_with(port: u16, flags: &[&str]) -> Cluster {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("kube_api.py");
        let (child, line) = spawn_announcing(
            Command::new(venv_bin("python"))
                .arg(&script)
                .arg(port.to_string())
                .args(flags),
        );
        assert_eq!(line, "ready", "API emulator did not start");
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters: [{{name: e2e, cluster: {{server: \"http://127.0.0.1:{port}\"}}}}]\n\
                 users: [{{name: e2e, user: {{}}}}]\ncontexts: [{{name: e2e, context: {{cluster: e2e, user: e2e}}}}]\ncurrent-context: e2e\n"
            ),
        )
        .unwrap();
        Cluster {
            _api: Proc(child),
            dir,
            kubeconfig,
            port,
        }
    }

    /// The mesh CA's root certificate, once the leader has stored it (operators run in `default`).
    pub async fn ca_root(&self) -> String {
        let mut root = None;
        eventually("the leader stores the CA", Duration::from_secs(15), async || {
            let out = std::process::Command::new(std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into()))
                .args(["get", "secret", "ferrum-ca", "-n", "default", "-o", "json"])
                .env("KUBECONFIG", &self.kubeconfig)
                .output()
                .unwrap();
            if let Ok(v) = serde_json::from_slice::<Value>(&out.stdout)
                && let Some(b64) = v["data"]["ca.crt"].as_str()
            {
                use base64::Engine as _;
                root = Some(String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b64).unwrap()).unwrap());
            }
            root.is_some()
        })
        .await;
        root.unwrap()
    }

    /// Installs Istio's CRDs (`../shared/testdata/istio-crds.yaml`): the operator watches the
    /// kinds once it discovers them.
    pub fn install_istio_crds(&self) {
        self.kubectl(
            &["apply", "--validate=false", "-f", &shared_testdata("istio-crds.yaml")],
            None,
        );
    }

    /// Runs kubectl against the emulator; panics with its output on failure.
    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> String {
        let kubectl = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
        let mut child = Command::new(&kubectl)
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {kubectl}: {e}"));
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.unwrap_or("").as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl apply --validate=false -f -`, as users apply manifests.
    pub fn apply(&self, yaml: &str) -> String {
        self.kubectl(&["apply", "--validate=false", "-f", "-"], Some(yaml))
    }

    pub fn get(&self, resource: &str, namespace: &str, name: &str) -> Value {
        serde_json::from_str(&self.kubectl(&["get", resource, name, "-n", namespace, "-o", "json"], None)).unwrap()
    }

    /// Starts an operator replica against this cluster.
    pub async fn operator(&self, name: &str) -> Operator {
        self.operator_with(name, &[]).await
    }

    pub async fn operator_with(&self, name: &str, extra: &[&str]) -> Operator {
        self.operator_at(name, "127.0.0.1", extra).await
    }

    /// An operator whose gRPC port listens on `ip` (e.g. a bridge that "pods" reach); away
    /// from loopback its CA listens there too, on a port of its own (`Operator::ca`).
    pub async fn operator_at(&self, name: &str, ip: &str, extra: &[&str]) -> Operator {
        let ports = (free_port(), free_port(), (ip != "127.0.0.1").then(free_port));
        self.operator_on(name, ip, ports, extra).await
    }

    /// An operator on these (gRPC, admin, CA) ports: a restarted one takes its predecessor's.
    pub async fn operator_on(&self, name: &str, ip: &str, ports: (u16, u16, Option<u16>), extra: &[&str]) -> Operator {
        let (grpc, admin, ca) = ports;
        let ca_args = match ca {
            Some(port) => vec![
                "--ca-addr".to_string(),
                format!("{ip}:{port}"),
                "--ca-san".to_string(),
                ip.to_string(),
            ],
            None => vec![],
        };
        let child = Command::new(workspace_bin("ferrum-operator"))
            .args([
                "--grpc-addr",
                &format!("{ip}:{grpc}"),
                "--admin-addr",
                &format!("127.0.0.1:{admin}"),
            ])
            .args(ca_args)
            .args([
                "--namespace",
                "default",
                "--identity",
                name,
                "--lease-seconds",
                "3",
                "--debounce-ms",
                "10",
            ])
            .args(extra)
            .env("KUBECONFIG", &self.kubeconfig)
            // Tests run many operators at once: the CA on an ephemeral port unless a test asks.
            .env("FERRUM_CA_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "warn,ferrum_operator=info")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start ferrum-operator");
        let op = Operator {
            proc: Some(Proc(child)),
            host: ip.to_string(),
            grpc,
            admin,
            ca,
        };
        eventually("operator ready", Duration::from_secs(20), async || {
            client()
                .get(op.admin_url("/ready"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await;
        op
    }
}

pub struct Operator {
    proc: Option<Proc>,
    pub host: String,
    pub grpc: u16,
    pub admin: u16,
    /// The CA's port, when the test chose it ([`Cluster::operator_at`]).
    pub ca: Option<u16>,
}

impl Operator {
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin)
    }

    pub fn grpc_url(&self) -> String {
        format!("http://{}:{}", self.host, self.grpc)
    }

    pub async fn admin_json(&self, path: &str) -> Value {
        let text = get_text(&self.admin_url(path)).await;
        serde_json::from_str(&text).unwrap()
    }

    pub async fn metric(&self, name: &str) -> Option<f64> {
        let text = client()
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    pub fn kill(&mut self) {
        self.proc.take();
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(|p| p.0.id())
    }
}

/// A `ferrum-dp` following an operator.
pub struct Proxy {
    _proc: Proc,
    pub admin: u16,
}

impl Proxy {
    pub async fn start(control_plane: &str, node: &str, cache: &Path) -> Proxy {
        Self::start_with(control_plane, node, cache, &[]).await
    }

    pub async fn start_with(control_plane: &str, node: &str, cache: &Path, extra: &[&str]) -> Proxy {
        let mut args = vec!["--control-plane", control_plane, "--snapshot-cache"];
        args.push(cache.to_str().expect("UTF-8 path"));
        args.extend(extra);
        Self::spawn(node, &args)
    }

    /// A `ferrum-dp` following an xDS server instead.
    pub async fn start_xds(url: &str, node: &str) -> Proxy {
        Self::start_xds_with(url, node, &[]).await
    }

    /// The same, with more arguments.
    pub async fn start_xds_with(url: &str, node: &str, extra: &[&str]) -> Proxy {
        let mut args = vec!["--xds", url];
        args.extend(extra);
        Self::spawn(node, &args)
    }

    /// The same, presenting a bearer token.
    pub async fn start_xds_with_token(url: &str, node: &str, token: &str) -> Proxy {
        Self::spawn(node, &["--xds", url, "--token", token])
    }

    /// A `ferrum-dp` following an xDS server over `protocol` ("sotw" or "delta").
    pub async fn start_xds_over(url: &str, node: &str, protocol: &str) -> Proxy {
        Self::spawn(node, &["--xds", url, "--xds-protocol", protocol])
    }

    fn spawn(node: &str, args: &[&str]) -> Proxy {
        let admin = free_port();
        let child = Command::new(workspace_bin("ferrum-dp"))
            .args(["--node-id", node, "--workers", "1"])
            .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start ferrum-dp");
        Proxy {
            _proc: Proc(child),
            admin,
        }
    }

    /// An admin endpoint's body ("" when it cannot be reached).
    pub async fn admin_text(&self, path: &str) -> String {
        let Ok(r) = client()
            .get(format!("http://127.0.0.1:{}{path}", self.admin))
            .send()
            .await
        else {
            return String::new();
        };
        r.text().await.unwrap_or_default()
    }

    pub async fn version(&self) -> u64 {
        let v: Value = serde_json::from_str(&self.admin_text("/config").await).unwrap_or_default();
        v["version"].as_u64().unwrap_or(0)
    }
}

/// For the benchmarks.
pub async fn create_all(api: &str, objects: Vec<(String, serde_json::Value)>) {
    use futures_util::StreamExt;
    let c = reqwest::Client::new();
    futures_util::stream::iter(objects)
        .map(|(path, body)| {
            let c = c.clone();
            let url = format!("{api}{path}");
            async move {
                let r = c
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body.to_string())
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_success(), "{url}: {}", r.status());
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
}

/// For the benchmarks.
pub fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// A plaintext gRPC channel to `url`.
pub async fn channel(url: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"))
}

/// A MeshSubscribe stream over `ch` as proxy `node` with `role` (and a bearer token): the
/// sender its acknowledgements go on, and the stream of updates.
pub async fn subscribe(
    ch: tonic::transport::Channel,
    node: &str,
    role: &str,
    token: Option<&str>,
) -> Result<
    (
        tokio::sync::mpsc::Sender<ferrum_proto::mesh::v1::SubscribeRequest>,
        tonic::Streaming<ferrum_proto::mesh::v1::SubscribeResponse>,
    ),
    tonic::Status,
> {
    use ferrum_proto::mesh::v1::mesh_subscribe_client::MeshSubscribeClient;
    use ferrum_proto::mesh::v1::{Hello, SubscribeRequest, subscribe_request};
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let hello = Hello {
        node_id: node.to_string(),
        role: role.to_string(),
        ..Default::default()
    };
    tx.send(SubscribeRequest {
        message: Some(subscribe_request::Message::Hello(hello)),
    })
    .await
    .unwrap();
    let req = bearer_request(rx, token);
    let stream = MeshSubscribeClient::new(ch)
        .max_decoding_message_size(512 << 20)
        .subscribe(req)
        .await?
        .into_inner();
    Ok((tx, stream))
}

/// For the benchmarks: CPU time (user + system) a process has used, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let (user, system) = cpu_split(pid);
    user + system
}

/// CPU seconds a process has used, (in user space, in the kernel).
pub fn cpu_split(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) / 100.0;
    (ticks(11), ticks(12))
}

/// For the benchmarks: `--smoke` asks for a short run at a small scale, which the tests make to
/// keep each harness working.
pub fn smoke() -> bool {
    std::env::args().any(|a| a == "--smoke")
}

/// For the benchmarks: prints `result` as the output's last line and, unless `--smoke`, writes
/// it to `bench/results/<kind>-<unix seconds>.json`.
pub fn publish(kind: &str, result: &Value) {
    if !smoke() {
        eprintln!("written to {}", write_result(kind, result).display());
    }
    println!("{result}");
}

/// For the benchmarks: writes `result` to `bench/results/<kind>-<unix seconds>.json`.
fn write_result(kind: &str, result: &Value) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/results");
    std::fs::create_dir_all(&dir).expect("bench/results can be made");
    let when = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let out = dir.join(format!("{kind}-{when}.json"));
    std::fs::write(&out, format!("{result:#}\n")).expect("bench/results is writable");
    out
}

/// For the benchmarks.
pub fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// A gRPC channel to a TLS endpoint (the mesh CA) that trusts only `root_pem`, as a workload
/// holding the mesh's trust bundle does; `name` is the server name to verify. (The sidecar's own
/// CA client, so the tests and the proxy connect the same way.)
pub async fn tls_channel(addr: std::net::SocketAddr, name: &str, root_pem: &str) -> tonic::transport::Channel {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(root_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    ferrum_dp::mesh::identity::tls_channel(&addr.to_string(), name, roots)
        .await
        .expect("TLS connection to the CA")
}

/// `GET /` on 127.0.0.1:`port` with `Host: host`: the status and the backend that answered
/// (`x-backend`); `(0, None)` when the connection fails.
pub async fn hit(port: u16, host: &str) -> (u16, Option<String>) {
    match client()
        .get(format!("http://127.0.0.1:{port}/"))
        .header("host", host)
        .send()
        .await
    {
        Ok(r) => (
            r.status().as_u16(),
            r.headers().get("x-backend").map(|v| v.to_str().unwrap().to_string()),
        ),
        Err(_) => (0, None),
    }
}

/// The key the API emulator (`--token-key`) checks ServiceAccount tokens with.
pub const TOKEN_KEY: &str = "e2e-token-signing-key";

/// The GatewayClass `ferrum` and Gateway `default/web` with one HTTP listener on 8080, which the
/// benchmarks' routes attach to.
pub const WEB_GATEWAY: &str = "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {name: ferrum}\nspec: {controllerName: ferrum.dev/gateway-controller}\n---\n\
     apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: web, namespace: default}\n\
     spec: {gatewayClassName: ferrum, listeners: [{name: http, port: 8080, protocol: HTTP}]}\n";

/// A token shaped like a projected ServiceAccount token, signed as the emulator expects.
pub fn token(ns: &str, sa: &str, aud: &str, ttl: i64, key: &str) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    let claims = json!({
        "iss": "https://kubernetes.default.svc",
        "sub": format!("system:serviceaccount:{ns}:{sa}"),
        "aud": [aud],
        "iat": now,
        "exp": now + ttl,
        "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa}, "pod": {"name": format!("{sa}-0")}, "node": {"name": "node-1"}},
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(key.as_bytes()),
    )
    .unwrap()
}

/// A client of the CA on 127.0.0.1:`port`, once it serves, trusting only the mesh root.
pub async fn ca_client(
    port: u16,
    root: &str,
) -> ferrum_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient<
    tonic::transport::Channel,
> {
    let mut ca = None;
    eventually("the CA serves", Duration::from_secs(10), async || {
        if ca.is_none() {
            let channel = tls_channel(([127, 0, 0, 1], port).into(), "localhost", root);
            ca = tokio::time::timeout(Duration::from_secs(2), channel).await.ok().map(
                ferrum_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient::new,
            );
        }
        ca.is_some()
    })
    .await;
    ca.unwrap()
}

/// An HTTPS Gateway `web` on 127.0.0.1:`port` for `host`, its certificate from the Secret
/// `secure-cert`, routing to the backend on `backend_port`.
pub struct TlsGateway {
    pub port: u16,
    pub host: &'static str,
}

impl TlsGateway {
    pub const HOST: &'static str = "secure.example.com";

    pub fn apply(cluster: &Cluster, port: u16, backend_port: u16) -> TlsGateway {
        let host = Self::HOST;
        cluster.apply(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: a}}\nspec: {{ports: [{{name: http, port: 80}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: a-1, labels: {{kubernetes.io/service-name: a}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: {backend_port}}}]\nendpoints: [{{addresses: [127.0.0.1]}}]\n---\n\
             apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {{name: ferrum}}\nspec: {{controllerName: ferrum.dev/gateway-controller}}\n---\n\
             apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: web}}\n\
             spec: {{gatewayClassName: ferrum, addresses: [{{type: IPAddress, value: 127.0.0.1}}], listeners: [{{name: https, port: {port}, protocol: HTTPS, \
             hostname: {host}, tls: {{mode: Terminate, certificateRefs: [{{name: secure-cert}}]}}}}]}}\n---\n\
             apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: secure}}\n\
             spec: {{parentRefs: [{{name: web}}], hostnames: [{host}], rules: [{{backendRefs: [{{name: a, port: 80}}]}}]}}\n"
        ));
        TlsGateway { port, host }
    }

    /// Creates (or replaces) the Secret with a new self-signed key pair; returns its certificate.
    pub fn new_certificate(&self, cluster: &Cluster) -> String {
        let c = rcgen::generate_simple_self_signed(vec![self.host.to_string()]).unwrap();
        let (cert, key) = (c.cert.pem(), c.signing_key.serialize_pem());
        let (cert_file, key_file) = (cluster.dir.path().join("tls.crt"), cluster.dir.path().join("tls.key"));
        std::fs::write(&cert_file, &cert).unwrap();
        std::fs::write(&key_file, &key).unwrap();
        // kubectl base64-encodes the pair (client side); the API gets a plain apply.
        let secret = cluster.kubectl(
            &[
                "create",
                "secret",
                "tls",
                "secure-cert",
                "--cert",
                cert_file.to_str().unwrap(),
                "--key",
                key_file.to_str().unwrap(),
                "--dry-run=client",
                "-o",
                "yaml",
            ],
            None,
        );
        cluster.apply(&secret);
        cert
    }

    /// A client that trusts only `cert`, reaching the gateway for its host.
    pub fn client(&self, cert: &str, h1: bool) -> reqwest::Client {
        let addr: std::net::SocketAddr = format!("127.0.0.1:{}", self.port).parse().unwrap();
        let b = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(cert.as_bytes()).unwrap())
            .resolve(self.host, addr);
        if h1 { b.http1_only() } else { b }.build().unwrap()
    }

    pub fn url(&self) -> String {
        format!("https://{}:{}/x", self.host, self.port)
    }

    /// Whether a client trusting only `cert` is served (200).
    pub async fn serves_with(&self, cert: &str) -> bool {
        self.client(cert, false)
            .get(self.url())
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    }
}

/// A client-streaming gRPC request over `rx`, with `authorization: Bearer <token>` when given.
pub fn bearer_request<T>(
    rx: tokio::sync::mpsc::Receiver<T>,
    token: Option<&str>,
) -> tonic::Request<tokio_stream::wrappers::ReceiverStream<T>> {
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    req
}

/// The CA (PEM) a webhook configuration's `webhooks` all carry as `caBundle`, once `count` of
/// them carry the same one.
pub async fn webhook_ca_bundle(cluster: &Cluster, name: &str, count: usize) -> String {
    use base64::Engine as _;
    let mut ca = String::new();
    eventually(
        "the webhooks carry the injector's CA",
        Duration::from_secs(10),
        async || {
            let out = cluster.kubectl(&["get", "mutatingwebhookconfigurations", name, "-o", "json"], None);
            let c: Value = serde_json::from_str(&out).unwrap();
            let bundles: Vec<&str> = c["webhooks"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|w| w["clientConfig"]["caBundle"].as_str())
                .collect();
            if bundles.len() == count && bundles.iter().all(|b| *b == bundles[0]) {
                ca = String::from_utf8(base64::engine::general_purpose::STANDARD.decode(bundles[0]).unwrap()).unwrap();
            }
            !ca.is_empty()
        },
    )
    .await;
    ca
}

/// Asserts that every one of `silent` (connections that sent nothing since `started`) is closed
/// by the server after about `allowed` (not more than a second early), and within twice that.
pub async fn closed_after<S: tokio::io::AsyncRead + Unpin>(
    silent: &mut [S],
    started: std::time::Instant,
    allowed: Duration,
) {
    use tokio::io::AsyncReadExt;
    for s in silent {
        let mut sink = Vec::new();
        let r = tokio::time::timeout(allowed * 2, s.read_to_end(&mut sink)).await;
        assert!(r.is_ok(), "still open after {:?}", started.elapsed());
    }
    let took = started.elapsed();
    assert!(
        took + Duration::from_secs(1) >= allowed,
        "closed after {took:?}, before the {allowed:?} allowed"
    );
}
