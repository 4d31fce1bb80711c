//! HAProxy as the L4 load balancer in front of a proxy under test: it relays each connection,
//! starting it with a PROXY protocol header (v1 or v2) that names the client it accepted.
//! Debian's `haproxy` package (`make mesh-tools` installs it).

use std::process::{Command, Stdio};

/// A running HAProxy (killed on drop) with one frontend per PROXY protocol version.
pub struct LoadBalancer {
    _proc: crate::Proc,
    _dir: tempfile::TempDir,
    /// Connections here reach the upstream with a v1 (text) header.
    pub v1: u16,
    /// Connections here reach the upstream with a v2 (binary) header.
    pub v2: u16,
}

impl LoadBalancer {
    /// Relays `127.0.0.1:{v1,v2}` to `127.0.0.1:upstream`, connecting from `source` — so the
    /// upstream's peer is the balancer's address, and the header carries the client's.
    pub async fn start(upstream: u16, source: &str) -> LoadBalancer {
        let (v1, v2) = (crate::free_port(), crate::free_port());
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("haproxy.cfg");
        let server = |version: &str| format!("server up 127.0.0.1:{upstream} {version} source {source}");
        std::fs::write(
            &cfg,
            format!(
                "global\n  maxconn 256\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\n\
                 listen v1\n  bind 127.0.0.1:{v1}\n  {}\nlisten v2\n  bind 127.0.0.1:{v2}\n  {}\n",
                server("send-proxy"),
                server("send-proxy-v2"),
            ),
        )
        .unwrap();
        let child = Command::new("haproxy")
            .args(["-db", "-f"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .spawn()
            .expect("haproxy (Debian's haproxy package; make mesh-tools installs it)");
        let lb = LoadBalancer {
            _proc: crate::Proc(child),
            _dir: dir,
            v1,
            v2,
        };
        crate::until_listening(v2, "haproxy").await;
        lb
    }
}
