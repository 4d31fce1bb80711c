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

/// The container args of a Deployment in the rendered manifests.
fn args_of(rendered: &str, deployment: &str) -> Vec<String> {
    for doc in rendered.split("\n---") {
        let Ok(v) = serde_yaml::from_str::<Value>(doc) else {
            continue;
        };
        if v["kind"] == "Deployment" && v["metadata"]["name"] == deployment {
            return serde_json::from_value(v["spec"]["template"]["spec"]["containers"][0]["args"].clone()).unwrap();
        }
    }
    panic!("no Deployment {deployment}");
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
