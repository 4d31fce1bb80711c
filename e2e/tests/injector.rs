//! `ferrum-injector` as the API server meets it: AdmissionReviews over HTTPS, with its
//! self-signed CA written into its MutatingWebhookConfiguration in the API emulator; the pods it
//! returns are valid Pods for Kubernetes 1.32 (`kubernetes-validate --strict`).

use std::io::Write as _;
use std::process::Command;
use std::time::Duration;

use ferrum_e2e::*;
use serde_json::{Value, json};

/// The webhook configuration the Helm chart installs (selectors of mesh.md).
const WEBHOOK_CONFIG: &str = r#"apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata: {name: ferrum-injector}
webhooks:
- name: namespace.inject.ferrum.dev
  admissionReviewVersions: [v1]
  sideEffects: None
  failurePolicy: Fail
  reinvocationPolicy: Never
  clientConfig: {service: {name: ferrum-injector, namespace: ferrum-system, path: /inject, port: 443}}
  rules: [{operations: [CREATE], apiGroups: [""], apiVersions: [v1], resources: [pods]}]
  namespaceSelector: {matchLabels: {ferrum.dev/inject: enabled}}
  objectSelector: {matchExpressions: [{key: ferrum.dev/inject, operator: NotIn, values: ["false"]}]}
- name: object.inject.ferrum.dev
  admissionReviewVersions: [v1]
  sideEffects: None
  failurePolicy: Fail
  clientConfig: {service: {name: ferrum-injector, namespace: ferrum-system, path: /inject, port: 443}}
  rules: [{operations: [CREATE], apiGroups: [""], apiVersions: [v1], resources: [pods]}]
  namespaceSelector: {matchExpressions: [{key: ferrum.dev/inject, operator: DoesNotExist}]}
  objectSelector: {matchLabels: {ferrum.dev/inject: "true"}}
"#;

struct Injector {
    _proc: Proc,
    port: u16,
}

fn start_injector(cluster: &Cluster, extra: &[&str]) -> Injector {
    let mut cmd = Command::new(workspace_bin("ferrum-injector"));
    cmd.args(["--addr", "127.0.0.1:0", "--proxy-image", "ferrum/ferrum-dp:e2e"])
        .args(extra)
        .env("KUBECONFIG", &cluster.kubeconfig)
        .env("RUST_LOG", "info");
    let (child, line) = spawn_announcing(&mut cmd);
    Injector {
        _proc: Proc(child),
        port: line.trim().parse().expect("the injector prints its port"),
    }
}

/// A client as the API server is one: it trusts the injector through the caBundle the injector
/// wrote into its webhook configuration, and reaches it by its Service name.
async fn api_server_client(cluster: &Cluster, inj: &Injector) -> reqwest::Client {
    let ca = webhook_ca_bundle(cluster, "ferrum-injector", 2).await;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", inj.port).parse().unwrap();
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).unwrap())
        .resolve("ferrum-injector.ferrum-system.svc", addr)
        .build()
        .unwrap()
}

fn review(uid: &str, operation: &str, pod: &Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": operation,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "dryRun": false,
        }
    })
}

fn app_pod() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "web-", "namespace": "shop", "labels": {"app": "web"}},
        "spec": {
            "serviceAccountName": "web",
            "containers": [{
                "name": "app", "image": "nginx:1.27",
                "ports": [{"name": "http", "containerPort": 8080}],
                "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}},
            }],
        }
    })
}

/// POSTs a review; returns the HTTP status and the body (status 0: the connection was closed
/// before an answer arrived).
async fn post(client: &reqwest::Client, port: u16, body: Vec<u8>) -> (u16, Value) {
    let sent = client
        .post(format!("https://ferrum-injector.ferrum-system.svc:{port}/inject"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await;
    let Ok(r) = sent else {
        return (0, Value::Null);
    };
    let status = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// The pod with the response's JSON patch applied (`patch` is bytes: an array of numbers or
/// base64, as Go's encoding of `[]byte` accepts either).
fn patched(pod: &Value, response: &Value) -> Value {
    let raw: Vec<u8> = match &response["patch"] {
        Value::Array(a) => a.iter().map(|b| b.as_u64().unwrap() as u8).collect(),
        Value::String(s) => {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.decode(s).unwrap()
        }
        other => panic!("no patch: {other}"),
    };
    let patch: json_patch::Patch = serde_json::from_slice(&raw).unwrap();
    let mut out = pod.clone();
    json_patch::patch(&mut out, &patch).unwrap();
    out
}

/// `kubernetes-validate --strict` for Kubernetes 1.32 (unknown fields are errors).
fn validate(pod: &Value) {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    let mut named = pod.clone();
    named["metadata"]["name"] = json!("web-abcde");
    f.write_all(named.to_string().as_bytes()).unwrap();
    let out = Command::new(venv_bin("kubernetes-validate"))
        .args(["--strict", "-k", "1.32.0"])
        .arg(f.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "not a valid Pod: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_injector_adds_the_sidecar_over_https_with_its_ca_in_the_webhook_config() {
    let cluster = Cluster::start();
    cluster.apply(WEBHOOK_CONFIG);
    let inj = start_injector(&cluster, &["--self-signed", "--webhook-config", "ferrum-injector"]);

    let client = api_server_client(&cluster, &inj).await;

    // A pod created in an injected namespace: the sidecar, capture and probes through 15020.
    let pod = app_pod();
    let (status, body) = post(
        &client,
        inj.port,
        review("u-1", "CREATE", &pod).to_string().into_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let resp = &body["response"];
    assert_eq!(
        (resp["uid"].as_str(), resp["allowed"].as_bool()),
        (Some("u-1"), Some(true))
    );
    assert_eq!(resp["patchType"], "JSONPatch");
    let injected = patched(&pod, resp);
    validate(&injected);
    let names = |k: &str| -> Vec<String> {
        injected["spec"][k]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| c["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names("containers"), vec!["ferrum-proxy", "app"]);
    assert_eq!(names("initContainers"), vec!["ferrum-init"]);
    let proxy = &injected["spec"]["containers"][0];
    assert_eq!(proxy["image"], "ferrum/ferrum-dp:e2e");
    assert_eq!(proxy["securityContext"]["runAsUser"], 1337);
    assert_eq!(
        injected["spec"]["containers"][1]["readinessProbe"]["httpGet"]["port"],
        15020
    );

    // Never twice: the injected pod comes back unchanged (reinvocation, or a copied spec).
    let (_, body) = post(
        &client,
        inj.port,
        review("u-2", "CREATE", &injected).to_string().into_bytes(),
    )
    .await;
    assert_eq!(body["response"]["allowed"], true);
    assert!(body["response"]["patch"].is_null(), "injected twice: {body}");
    // Opted out, and not a CREATE: left alone.
    let mut out = app_pod();
    out["metadata"]["annotations"] = json!({"ferrum.dev/inject": "false"});
    let (_, body) = post(
        &client,
        inj.port,
        review("u-3", "CREATE", &out).to_string().into_bytes(),
    )
    .await;
    assert!(body["response"]["patch"].is_null());
    let (_, body) = post(
        &client,
        inj.port,
        review("u-4", "UPDATE", &pod).to_string().into_bytes(),
    )
    .await;
    assert!(body["response"]["patch"].is_null());
    // An annotation that cannot be used: the pod is refused with the reason.
    let mut bad = app_pod();
    bad["metadata"]["annotations"] = json!({"ferrum.dev/exclude-inbound-ports": "80,http"});
    let (_, body) = post(
        &client,
        inj.port,
        review("u-5", "CREATE", &bad).to_string().into_bytes(),
    )
    .await;
    assert_eq!(body["response"]["allowed"], false);
    let message = body["response"]["status"]["message"].as_str().unwrap();
    assert!(message.contains("ferrum.dev/exclude-inbound-ports"), "{message}");
    // Not a review: 400; too large: 413.
    let (status, _) = post(&client, inj.port, b"{\"kind\": 1}".to_vec()).await;
    assert_eq!(status, 400);
    // Too large: 413, or (the server closes with the rest of the body unread, which can reset
    // the connection before the client reads the answer) no answer at all — never accepted.
    let (status, _) = post(&client, inj.port, vec![b' '; 5 << 20]).await;
    assert!(matches!(status, 413 | 0), "{status}");
    // The injector still serves afterwards.
    let (status, _) = post(
        &client,
        inj.port,
        review("u-6", "CREATE", &pod).to_string().into_bytes(),
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_sidecar_with_cni_capture_is_a_valid_pod() {
    let cluster = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let write_pair = || {
        let c = rcgen::generate_simple_self_signed(vec!["ferrum-injector.ferrum-system.svc".to_string()]).unwrap();
        std::fs::write(&cert, c.cert.pem()).unwrap();
        std::fs::write(&key, c.signing_key.serialize_pem()).unwrap();
        c.cert.pem()
    };
    let first = write_pair();
    let inj = start_injector(
        &cluster,
        &[
            "--tls-cert-file",
            cert.to_str().unwrap(),
            "--tls-key-file",
            key.to_str().unwrap(),
            "--native-sidecar",
            "--capture",
            "cni",
        ],
    );
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", inj.port).parse().unwrap();
    let trusting = |pem: &str| {
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap())
            .resolve("ferrum-injector.ferrum-system.svc", addr)
            .build()
            .unwrap()
    };
    let pod = app_pod();
    let (status, body) = post(
        &trusting(&first),
        inj.port,
        review("n-1", "CREATE", &pod).to_string().into_bytes(),
    )
    .await;
    assert_eq!(status, 200);
    let injected = patched(&pod, &body["response"]);
    validate(&injected);
    assert_eq!(injected["spec"]["initContainers"][0]["name"], "ferrum-proxy");
    assert_eq!(injected["spec"]["initContainers"][0]["restartPolicy"], "Always");
    assert_eq!(
        injected["spec"]["initContainers"].as_array().unwrap().len(),
        1,
        "no capture container"
    );

    // A renewed certificate in the files is served without a restart.
    let second = write_pair();
    eventually(
        "the injector serves the renewed certificate",
        Duration::from_secs(15),
        async || {
            trusting(&second)
                .get(format!("https://ferrum-injector.ferrum-system.svc:{}/ready", inj.port))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        },
    )
    .await;
}

/// An injected pod runs: the injector's patch applied with a JSON-Patch library gives the init
/// container (capture rules) and the sidecar (args, env, UID) that the mesh harness then runs in
/// a netns pod — the container's volume paths mapped to files the test wrote — and a pod with a
/// regular sidecar calls it over HBONE with mTLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injected_pod_talks_mtls_in_the_mesh() {
    use ferrum_e2e::mesh::{NS, World};
    let mut w = World::start(&[]).await;
    let (host, grpc, ca) = (w.op.host.clone(), w.op.grpc, w.op.ca.unwrap());
    w.cluster.apply(WEBHOOK_CONFIG);
    let inj = start_injector(
        &w.cluster,
        &[
            "--self-signed",
            "--webhook-config",
            "ferrum-injector",
            "--control-plane",
            &format!("https://{host}:{grpc}"),
            "--ca-address",
            &format!("{host}:{ca}"),
            "--ca-server-name",
            &host,
            "--proxy-request-metrics",
            "--proxy-cluster-id",
            "east",
        ],
    );
    let client = api_server_client(&w.cluster, &inj).await;
    let mut pod = app_pod();
    pod["metadata"]["namespace"] = json!(NS);
    pod["metadata"]["labels"] = json!({"app": "b"});
    pod["spec"]["serviceAccountName"] = json!("sa-b");
    // The app's metrics were scraped before the mesh (the harness's app answers any path).
    pod["metadata"]["annotations"] = json!({
        "prometheus.io/scrape": "true", "prometheus.io/port": "8080", "prometheus.io/path": "/app-metrics",
    });
    let (status, body) = post(
        &client,
        inj.port,
        review("u-run", "CREATE", &pod).to_string().into_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let injected = patched(&pod, &body["response"]);
    let container = |list: &str, name: &str| -> Value {
        injected["spec"][list]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no {name} in {injected}"))
    };
    let (init, proxy) = (
        container("initContainers", "ferrum-init"),
        container("containers", "ferrum-proxy"),
    );
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };

    // The pods: A with the harness's sidecar, B as injected (its app as in the harness).
    let a = w.pod("a-1", "sa-a", "a", 10, true);
    let b = w.pod("b-1", "sa-b", "b", 11, true);
    w.service("svc-b", "10.96.77.10", "b");
    w.app(b);
    let bin = workspace_bin("ferrum-dp");
    // The init container: its args after the binary (`init-iptables ...`), in place of the
    // harness's default rules.
    let out = w.pods[b]
        .ns
        .cmd(&[bin.to_str().unwrap(), "init-iptables", "--cleanup"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cleanup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let init_args = strings(&init["args"]);
    let out = w.pods[b]
        .ns
        .cmd(&[bin.to_str().unwrap()])
        .args(&init_args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "init: {init_args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The sidecar: its args and env, the mounts' paths mapped to what the kubelet would project.
    let dir = w.dir.path().to_path_buf();
    let token = dir.join("b-injected.token");
    std::fs::write(&token, ferrum_e2e::token(NS, "sa-b", "ferrum-ca", 3600, TOKEN_KEY)).unwrap();
    let cache = dir.join("b-injected-cache");
    std::fs::create_dir_all(&cache).unwrap();
    for p in [&token, &cache] {
        std::os::unix::fs::chown(p, Some(1337), Some(1337)).unwrap();
    }
    let root = w.root.clone();
    let mapped = |v: &str| -> String {
        v.replace("/var/run/secrets/tokens/ferrum-token", token.to_str().unwrap())
            .replace("/var/run/secrets/ferrum/root-cert.pem", root.to_str().unwrap())
            .replace("/var/lib/ferrum-dp", cache.to_str().unwrap())
    };
    let uid = proxy["securityContext"]["runAsUser"].as_u64().unwrap().to_string();
    let mut cmd = w.pods[b].ns.cmd(&[
        "setpriv",
        &format!("--reuid={uid}"),
        &format!("--regid={uid}"),
        "--clear-groups",
    ]);
    cmd.arg(&bin).args(strings(&proxy["args"]));
    for e in proxy["env"].as_array().unwrap() {
        let name = e["name"].as_str().unwrap();
        let value = match (name, e["value"].as_str()) {
            ("POD_NAME", _) => "b-1".to_string(),
            ("POD_NAMESPACE", _) => NS.to_string(),
            (_, Some(v)) => mapped(v),
            (_, None) => panic!("unexpected env {e}"),
        };
        cmd.env(name, value);
    }
    let log = std::fs::File::create(dir.join("b-injected.log")).unwrap();
    cmd.env("RUST_LOG", "info,ferrum_dp::mesh=debug")
        .stdout(std::process::Stdio::null())
        .stderr(log);
    let _sidecar = Proc(cmd.spawn().unwrap());
    w.sidecar(a, "sa-a", &[]);
    w.ready(a).await;
    w.ready(b).await;

    eventually(
        "A reaches the injected B over HBONE",
        Duration::from_secs(20),
        async || {
            let (ok, body) = w.pods[a].curl(&[
                "--resolve",
                &format!("svc-b.{NS}.svc:80:10.96.77.10"),
                &format!("http://svc-b.{NS}.svc/injected"),
            ]);
            ok && body.contains("hello from b-1")
        },
    )
    .await;
    // Prometheus follows the injected pod's annotations from outside it: the sidecar's metrics,
    // then the app's.
    let scrape = &injected["metadata"]["annotations"];
    let url = format!(
        "http://{}:{}{}",
        w.pods[b].ip,
        scrape["prometheus.io/port"].as_str().unwrap(),
        scrape["prometheus.io/path"].as_str().unwrap()
    );
    let text = reqwest::get(&url).await.unwrap().text().await.unwrap();
    assert!(
        text.contains("ferrum_mesh_connections_total{direction=\"inbound\""),
        "{url}: {text}"
    );
    assert!(text.contains("hello from b-1: /app-metrics"), "{url}: {text}");
    // The injector asked for request metrics: A's calls are counted by caller and code.
    assert!(
        text.lines().any(
            |l| l.starts_with("istio_requests_total{reporter=\"destination\",source_workload=\"a-1\"")
                && l.contains("response_code=\"200\"")
                && l.contains("destination_cluster=\"east\"")
        ),
        "{url}: {text}"
    );
    // Logged as the tunnel opens, before B's app answers; written by another process, so read
    // until it shows.
    let a_id = format!("spiffe://cluster.local/ns/{NS}/sa/sa-a");
    let log = || std::fs::read_to_string(dir.join("b-injected.log")).unwrap();
    eventually(
        "the injected sidecar logged A's SPIFFE ID",
        Duration::from_secs(5),
        async || log().contains(&a_id),
    )
    .await;
}

/// Connections to the webhook that finish the TLS handshake and then send nothing are closed:
/// any pod can reach the injector's Service, and connections held for ever would use up its file
/// descriptors. The API server's requests, which come at once, are served as before.
#[tokio::test]
async fn silent_connections_to_the_injector_are_closed() {
    use rustls_pki_types::pem::PemObject as _;
    let cluster = Cluster::start();
    cluster.apply(WEBHOOK_CONFIG);
    let inj = start_injector(&cluster, &["--self-signed", "--webhook-config", "ferrum-injector"]);
    let ca = webhook_ca_bundle(&cluster, "ferrum-injector", 2).await;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ));
    let name = rustls_pki_types::ServerName::try_from("ferrum-injector.ferrum-system.svc").unwrap();
    let mut silent = Vec::new();
    for _ in 0..20 {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", inj.port)).await.unwrap();
        silent.push(tls.connect(name.clone(), tcp).await.expect("TLS handshake"));
    }
    closed_after(&mut silent, std::time::Instant::now(), Duration::from_secs(10)).await;
    let client = api_server_client(&cluster, &inj).await;
    let (status, body) = post(
        &client,
        inj.port,
        review("u-9", "CREATE", &app_pod()).to_string().into_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}
