//! Hot reload under load, bad configs, startup errors, admin views and draining.

mod common;
use common::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::time::Duration;

fn config(port: u16, a: &Backend, b: &Backend, i: u32) -> String {
    docs(&[
        gateway(port),
        // Odd swaps change a cluster (new pool, carried-over endpoint state), even ones a route.
        backend("a", &[a], &format!("  timeouts: {{idle: {}s}}\n", 60 + i % 2)),
        backend("b", &[b], ""),
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r}}\nspec:\n  parentRefs: [{{name: gw}}]\n  rules:\n  \
             - backendRefs: [{{group: ferrum.dev, kind: Backend, name: a, weight: {}}}, {{group: ferrum.dev, kind: Backend, name: b, weight: 50}}]\n",
            1 + i
        ),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_swaps_under_load_lose_nothing() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let port = free_port();
    let dp = Dp::start(&config(port, &a, &b, 0)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut clients = Vec::new();
    for k in 0..4 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        clients.push(tokio::spawn(async move {
            // Half the clients keep connections alive, half open a new one per request.
            let c = if k % 2 == 0 {
                client()
            } else {
                reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap()
            };
            while !stop.load(SeqCst) {
                let result = match c.get(format!("http://127.0.0.1:{port}/x")).send().await {
                    Ok(r) if r.status() == 200 => r.text().await.map(drop).map_err(|e| e.to_string()),
                    Ok(r) => Err(format!("status {}", r.status())),
                    Err(e) => Err(e.to_string()),
                };
                match result {
                    Ok(()) => ok.fetch_add(1, SeqCst),
                    Err(e) => {
                        eprintln!("failed request: {e}");
                        failed.fetch_add(1, SeqCst)
                    }
                };
            }
        }));
    }
    let mut version = dp.version().await;
    for i in 1..=200 {
        version = dp.reconfigure(&config(port, &a, &b, i), version).await;
    }
    stop.store(true, SeqCst);
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(version, 201);
    assert_eq!(
        failed.load(SeqCst),
        0,
        "requests failed during reloads ({} succeeded)",
        ok.load(SeqCst)
    );
    assert!(
        ok.load(SeqCst) > 400,
        "the load ran during the swaps: {}",
        ok.load(SeqCst)
    );
    assert_eq!(dp.metric("ferrum_config_reloads_total{result=\"ok\"}").await, 201.0);
}

#[tokio::test]
async fn a_bad_reload_keeps_the_last_good_config() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let port = free_port();
    let dp = Dp::start(&config(port, &a, &b, 0)).await;
    let before: serde_json::Value = serde_json::from_str(&dp.admin_get("/config").await).unwrap();
    std::fs::write(&dp.config, "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec: {rules: [{matches: [{path: {type: Nope}}]}]}\n").unwrap();
    for _ in 0..100 {
        if dp.metric("ferrum_config_reloads_total{result=\"rejected\"}").await >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(dp.metric("ferrum_config_reloads_total{result=\"rejected\"}").await >= 1.0);
    let after: serde_json::Value = serde_json::from_str(&dp.admin_get("/config").await).unwrap();
    assert_eq!(before["hash"], after["hash"]);
    assert_eq!(after["version"], 1);
    assert_eq!(
        client()
            .get(format!("http://127.0.0.1:{port}/"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // A config that translates but cannot bind (port taken) is refused too, and the metrics of
    // the config still serving stay (the refused one renames the route).
    let served = "ferrum_route_requests_total{route=\"default/r/0/0\",code=\"2xx\"}";
    assert_eq!(dp.metric(served).await, 1.0);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = config(port, &a, &b, 0)
        .replace(
            "listeners: [",
            &format!(
                "listeners: [{{name: extra, port: {}, protocol: HTTP}}, ",
                taken.local_addr().unwrap().port()
            ),
        )
        .replace("metadata: {name: r}", "metadata: {name: r2}");
    std::fs::write(&dp.config, busy).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(dp.version().await, 1);
    assert_eq!(
        client()
            .get(format!("http://127.0.0.1:{port}/"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        dp.metric(served).await,
        2.0,
        "the serving route's metrics survive a failed bind"
    );
}

#[tokio::test]
async fn invalid_config_at_startup_names_file_object_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.yaml");
    std::fs::write(
        &f,
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: gw}\nspec: {gatewayClassName: x, listeners: [{name: h, port: 1, protocol: HTTP}]}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\n\
         spec: {parentRefs: [{name: gw}], rules: [{backendRefs: [{name: missing, port: 80}]}]}\n",
    )
    .unwrap();
    // An unresolved backend is a route condition; --strict makes it an error.
    let out = std::process::Command::new(bin())
        .arg("--config")
        .arg(&f)
        .arg("--strict")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}, document 2: HTTPRoute default/r: spec.rules[0].backendRefs[0]: Service default/missing not found (BackendNotFound)", f.display())),
        "{err}"
    );
    std::fs::write(&f, "kind: [").unwrap();
    let out = std::process::Command::new(bin())
        .arg("--config")
        .arg(&f)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("document 1: not valid YAML"));
}

#[tokio::test]
async fn admin_shows_config_and_metrics() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let port = free_port();
    let dp = Dp::start(&config(port, &a, &b, 0)).await;
    let cfg: serde_json::Value = serde_json::from_str(&dp.admin_get("/config").await).unwrap();
    assert_eq!(cfg["version"], 1);
    assert_eq!(cfg["hash"].as_str().unwrap().len(), 64);
    assert_eq!(cfg["snapshot"]["listeners"][0]["port"], port);
    client().get(format!("http://127.0.0.1:{port}/")).send().await.unwrap();
    let m = dp.admin_get("/metrics").await;
    assert!(
        m.contains("ferrum_route_requests_total{route=\"default/r/0/0\",code=\"2xx\"} 1"),
        "{m}"
    );
    assert!(m.contains("ferrum_config_version 1"));
    assert_eq!(
        client()
            .get(format!("http://{}/live", dp.admin))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let port = free_port();
    let mut dp = Dp::start(&config(port, &a, &b, 0)).await;
    let slow = tokio::spawn(async move { client().get(format!("http://127.0.0.1:{port}/?delay=500")).send().await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let pid = dp.child.id().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let r = slow.await.unwrap().unwrap();
    assert_eq!(r.status(), 200, "the in-flight request finishes");
    let status = dp.child.wait().unwrap();
    assert!(status.success());
    assert!(
        client().get(format!("http://127.0.0.1:{port}/")).send().await.is_err(),
        "no longer listening"
    );
}
