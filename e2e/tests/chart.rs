//! The Helm chart as a cluster meets it: its rendered manifests applied to the API emulator, then
//! the operator and the injector started with exactly the arguments the chart's Deployments give
//! them — they must parse, and do their jobs against the chart's own objects.

use std::process::Command;
use std::time::Duration;

use ferrum_e2e::*;
use serde_json::{Value, json};

fn render(extra: &[&str]) -> String {
    let helm = std::env::var("FERRUM_HELM").unwrap_or_else(|_| "/var/tmp/ferrum-helm/helm/helm".into());
    let tmp = tempfile::tempdir().unwrap();
    let chart = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/ferrum-mesh");
    let out = Command::new(helm)
        .args(["template", "ferrum"])
        .arg(chart)
        .args(["--namespace", "ferrum-system", "--kube-version", "1.32.0"])
        .args(extra)
        .env("HELM_CACHE_HOME", tmp.path().join("c"))
        .env("HELM_CONFIG_HOME", tmp.path().join("f"))
        .env("HELM_DATA_HOME", tmp.path().join("d"))
        .output()
        .expect("helm (make helm)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// An object of the rendered manifests.
fn object(rendered: &str, kind: &str, name: &str) -> Value {
    rendered
        .split("\n---")
        .filter_map(|doc| serde_yaml::from_str::<Value>(doc).ok())
        .find(|v| v["kind"] == kind && v["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// The container args of a Deployment in the rendered manifests.
fn args_of(rendered: &str, deployment: &str) -> Vec<String> {
    let d = object(rendered, "Deployment", deployment);
    serde_json::from_value(d["spec"]["template"]["spec"]["containers"][0]["args"].clone()).unwrap()
}

fn condition(obj: &Value, kind: &str) -> Option<Value> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
        .cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_operator_and_injector_run_against_its_manifests() {
    let cluster = Cluster::start();
    cluster.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: ferrum-system}\n");
    let rendered = render(&[]);
    cluster.apply(&rendered);

    // The operator, as the chart runs it (listening on loopback here).
    let (grpc, admin, ca) = (free_port(), free_port(), free_port());
    let mut op = Command::new(workspace_bin("ferrum-operator"));
    op.args(args_of(&rendered, "ferrum-operator"))
        .args(["--grpc-addr", &format!("127.0.0.1:{grpc}")])
        .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
        .args(["--ca-addr", &format!("127.0.0.1:{ca}")])
        .env("KUBECONFIG", &cluster.kubeconfig)
        .env("POD_NAME", "ferrum-operator-0")
        .env("RUST_LOG", "warn");
    let _op = Proc(op.spawn().unwrap());
    eventually("the operator is ready", Duration::from_secs(20), async || {
        client()
            .get(format!("http://127.0.0.1:{admin}/ready"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    eventually(
        "the chart's GatewayClass is Accepted",
        Duration::from_secs(10),
        async || {
            let out = cluster.kubectl(&["get", "gatewayclasses", "ferrum", "-o", "json"], None);
            let gc: Value = serde_json::from_str(&out).unwrap();
            condition(&gc, "Accepted").is_some_and(|c| c["status"] == "True")
        },
    )
    .await;
    eventually(
        "the CA is stored where the chart says",
        Duration::from_secs(10),
        async || {
            let out = cluster.kubectl(&["get", "secrets", "-n", "ferrum-system", "-o", "json"], None);
            out.contains("\"ferrum-ca\"")
        },
    )
    .await;

    // The injector, as the chart runs it: it keeps the chart's webhook configuration's caBundle.
    let mut args: Vec<String> = args_of(&rendered, "ferrum-injector")
        .into_iter()
        .filter(|a| !a.starts_with("--addr"))
        .collect();
    args.extend(["--addr".into(), "127.0.0.1:0".into()]);
    let mut inj = Command::new(workspace_bin("ferrum-injector"));
    inj.args(&args)
        .env("KUBECONFIG", &cluster.kubeconfig)
        .env("RUST_LOG", "warn");
    let (child, port) = spawn_announcing(&mut inj);
    let _inj = Proc(child);
    // Every webhook of the chart gets the injector's CA.
    let ca_pem = webhook_ca_bundle(&cluster, "ferrum-injector", 3).await;
    // Reached by its Service name, as the API server would: the sidecar it adds points at the
    // chart's operator Service and image.
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", port.trim()).parse().unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
        .resolve("ferrum-injector.ferrum-system.svc", addr)
        .build()
        .unwrap();
    let review = json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "c-1", "operation": "CREATE", "namespace": "shop",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "userInfo": {}, "object": {"metadata": {"name": "p", "namespace": "shop"}, "spec": {"containers": [{"name": "app", "image": "app"}]}},
        }
    });
    let r = client
        .post(format!(
            "https://ferrum-injector.ferrum-system.svc:{}/inject",
            addr.port()
        ))
        .header("content-type", "application/json")
        .body(review.to_string())
        .send()
        .await
        .unwrap();
    let r: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    let patch: Vec<u8> = serde_json::from_value(r["response"]["patch"].clone()).unwrap();
    let patch = String::from_utf8(patch).unwrap();
    assert!(patch.contains("ghcr.io/ferrum-mesh/ferrum-dp:0.1.0"), "{patch}");
    assert!(
        patch.contains("https://ferrum-operator.ferrum-system.svc:15010"),
        "{patch}"
    );
}

/// The node agent as the chart's DaemonSet runs it (as root: it attaches eBPF programs): its
/// args parse, it finds the DaemonSet the chart names, stays attached while that exists and
/// detaches once it is deleted (an uninstall).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_node_agent_detaches_when_its_daemonset_is_uninstalled() {
    let cluster = Cluster::start();
    cluster.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: ferrum-system}\n");
    let rendered = render(&["--set", "nodeAgent.enabled=true"]);
    cluster.apply(&rendered);
    let ds = object(&rendered, "DaemonSet", "ferrum-node-agent");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!((&pod["hostPID"], &pod["hostNetwork"]), (&json!(true), &json!(true)));
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["privileged"], true);
    let env = |name: &str| {
        c["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(env("NODE_NAME")["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
    // The cgroup the chart mounts at /host/cgroup is this host's cgroup2 root here; the pins
    // go to a directory of this test's own.
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    let cgroup2 = mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f[2] == "cgroup2")
        .map(|f| f[1].to_string())
        .expect("a cgroup2 mount");
    // Its metrics on a port of this test's own, on loopback.
    let port = free_port();
    let args: Vec<String> = serde_json::from_value::<Vec<String>>(c["args"].clone())
        .unwrap()
        .into_iter()
        .map(|a| a.replace("/host/cgroup", &cgroup2))
        .map(|a| match a.starts_with("--metrics-addr=") {
            true => format!("--metrics-addr=127.0.0.1:{port}"),
            false => a,
        })
        .collect();
    let pin_dir = format!("/sys/fs/bpf/ferrum-chart-{}", std::process::id());
    // Whatever happens below, nothing stays attached (programs left on the cgroup would pair
    // the sockets of every later test).
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = try_node_agent(self.0.as_ref(), &["detach", "--drain-seconds=0"]);
        }
    }
    let _detach = Detach(pin_dir.clone());
    let agent = || {
        let mut cmd = Command::new(workspace_bin("ferrum-node-agent"));
        cmd.args(["--pin-dir", &pin_dir])
            .args(&args)
            .env("KUBECONFIG", &cluster.kubeconfig)
            .env("NODE_NAME", "node-1")
            .env(
                "FERRUM_NODE_AGENT_DAEMONSET",
                env("FERRUM_NODE_AGENT_DAEMONSET")["value"].as_str().unwrap(),
            );
        Proc(cmd.spawn().unwrap())
    };
    // The chart's probes, on the port it names.
    let probe = &c["readinessProbe"]["httpGet"];
    assert_eq!((&probe["path"], &probe["port"]), (&json!("/ready"), &json!("metrics")));
    assert_eq!(c["ports"][0]["name"], "metrics");
    let ready = async || {
        client()
            .get(format!("http://127.0.0.1:{port}/ready"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    };
    let attached = || try_node_agent(pin_dir.as_ref(), &["stats"]).is_ok();
    let stop = |mut p: Proc| {
        let pid = p.0.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        assert!(p.0.wait().unwrap().success(), "the agent exits cleanly");
    };
    let first = agent();
    eventually("the agent is ready", Duration::from_secs(20), ready).await;
    let metrics = get_text(&format!("http://127.0.0.1:{port}/metrics")).await;
    assert!(metrics.contains("ferrum_node_agent_pods_enrolled 0"), "{metrics}");
    assert!(metrics.contains("ferrum_node_agent_sockets_paired_total"), "{metrics}");
    stop(first);
    assert!(
        attached(),
        "a restart (the DaemonSet still there) leaves the programs attached"
    );
    let second = agent();
    eventually("the agent is ready again", Duration::from_secs(20), ready).await;
    cluster.kubectl(
        &["delete", "daemonset", "ferrum-node-agent", "-n", "ferrum-system"],
        None,
    );
    stop(second);
    assert!(!attached(), "uninstalled, the programs are detached");
    assert!(!std::path::Path::new(&pin_dir).exists());
}
