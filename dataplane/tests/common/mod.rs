//! Harness for the data-plane integration tests: a real `ferrum-dp` process on a config file.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use ferrum_testkit::*;
use serde_json::Value;

/// A running `ferrum-dp` on a config file it watches.
pub struct Dp {
    pub child: Child,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
}

impl Drop for Dp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ferrum-dp")
}

impl Dp {
    pub async fn start(yaml: &str) -> Dp {
        Self::start_with(yaml, &[]).await
    }

    pub async fn start_with(yaml: &str, extra: &[&str]) -> Dp {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("gateway.yaml");
        std::fs::write(&config, yaml).unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = Command::new(bin())
            .arg("--config")
            .arg(&config)
            .arg("--admin-addr")
            .arg(admin.to_string())
            .args(extra)
            // FERRUM_TEST_LOG shows more of the proxy when a test is being looked into.
            .env(
                "RUST_LOG",
                std::env::var("FERRUM_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start ferrum-dp");
        let mut dp = Dp {
            child,
            admin,
            dir,
            config,
        };
        dp.wait_ready().await;
        dp
    }

    /// Until `/ready` answers 200; a proxy that exits first fails the test with its status
    /// (its stderr is the test's).
    async fn wait_ready(&mut self) {
        let c = client();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(r) = c.get(format!("http://{}/ready", self.admin)).send().await
                && r.status() == 200
            {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("ferrum-dp exited before it was ready: {status}");
            }
            assert!(Instant::now() < deadline, "ferrum-dp did not become ready within 10 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn admin_get(&self, path: &str) -> String {
        client()
            .get(format!("http://{}{path}", self.admin))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn version(&self) -> u64 {
        let v: Value = serde_json::from_str(&self.admin_get("/config").await).unwrap();
        v["version"].as_u64().unwrap()
    }

    /// Rewrites the config atomically (as `kubectl`-style tools and editors do) and waits until
    /// the proxy serves a version above `above`.
    pub async fn reconfigure(&self, yaml: &str, above: u64) -> u64 {
        let tmp = self.dir.path().join(".gateway.yaml.tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, &self.config).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = self.version().await;
            if v > above {
                return v;
            }
            assert!(Instant::now() < deadline, "config was not reloaded");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Resident anonymous memory (the heap and stacks, not the binary's pages), in MB.
    pub fn anon_mb(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("RssAnon:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        kb / 1024.0
    }

    /// The value of one unlabelled-or-labelled Prometheus sample, 0 when absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        self.admin_get("/metrics")
            .await
            .lines()
            .find_map(|l| {
                l.strip_prefix(sample)
                    .and_then(|v| v.strip_prefix(' '))
                    .map(|v| v.parse().unwrap())
            })
            .unwrap_or(0.0)
    }
}

pub fn gateway(port: u16) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: gw}}\nspec:\n  gatewayClassName: ferrum\n  \
         listeners: [{{name: http, port: {port}, protocol: HTTP}}]\n  addresses: [{{type: IPAddress, value: 127.0.0.1}}]\n"
    )
}

/// A ferrum.dev Backend over the given backends, with extra spec lines (YAML, 2-space indent).
pub fn backend(name: &str, eps: &[&Backend], spec: &str) -> String {
    let eps: Vec<String> = eps
        .iter()
        .map(|b| format!("  - {{address: 127.0.0.1, port: {}}}\n", b.addr.port()))
        .collect();
    format!(
        "apiVersion: ferrum.dev/v1alpha1\nkind: Backend\nmetadata: {{name: {name}}}\nspec:\n  endpoints:\n{}{spec}",
        eps.concat()
    )
}

pub fn docs(parts: &[String]) -> String {
    parts.join("\n---\n")
}

/// Sends `bytes` on a new connection to `port` and returns the first answer that comes back
/// within 5 s — for requests whose body never ends, which the proxy answers without closing.
pub async fn first_answer(port: u16, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut out))
        .await
        .expect("an answer within 5 s")
        .unwrap();
    String::from_utf8_lossy(&out[..n]).into_owned()
}
