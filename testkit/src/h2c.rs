//! Real HTTP/2-cleartext upgrade peers for tests of what a proxy forwards: Hypercorn (PyPI, in
//! the e2e venv: `make e2e-deps`) as a server that switches to h2c on `Upgrade: h2c`, and nghttp
//! (Debian's nghttp2-client: `make mesh-tools`) as a client that upgrades its first request and
//! sends the others as HTTP/2 streams on the switched connection ("h2c smuggling").

use std::process::{Command, Stdio};
use std::time::Duration;

/// Answers every request with `<HTTP version> <path>`, so a test sees which protocol reached it.
const APP: &str = "async def app(scope, receive, send):\n\
    \x20   if scope['type'] != 'http':\n\
    \x20       return\n\
    \x20   body = f\"{scope['http_version']} {scope['path']}\\n\".encode()\n\
    \x20   await send({'type': 'http.response.start', 'status': 200,\n\
    \x20               'headers': [(b'content-length', str(len(body)).encode())]})\n\
    \x20   await send({'type': 'http.response.body', 'body': body})\n";

/// A running Hypercorn (killed on drop).
pub struct H2cServer {
    _proc: crate::Proc,
    _dir: tempfile::TempDir,
    pub port: u16,
}

impl H2cServer {
    /// Listens on 127.0.0.1.
    pub async fn start() -> H2cServer {
        let port = crate::free_port();
        let server = H2cServer::spawn(&[], "127.0.0.1", port);
        for _ in 0..300 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return server;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("hypercorn did not listen on {port}");
    }

    /// Runs `prefix` + hypercorn on `addr:port` (e.g. `ip netns exec <ns>` first); the caller
    /// waits for it to listen.
    pub fn spawn(prefix: &[&str], addr: &str, port: u16) -> H2cServer {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("h2c_app.py"), APP).unwrap();
        let hypercorn = which("hypercorn");
        let bind = format!("{addr}:{port}");
        let mut argv: Vec<&str> = prefix.to_vec();
        // No worker processes: killing Hypercorn then stops the server (a spawned worker
        // would outlive it, still listening).
        argv.extend([hypercorn.as_str(), "--workers", "0", "--bind", &bind, "h2c_app:app"]);
        let child = Command::new(argv[0])
            .args(&argv[1..])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("hypercorn (PyPI; make e2e-deps installs it in the e2e venv)");
        H2cServer {
            _proc: crate::Proc(child),
            _dir: dir,
            port,
        }
    }
}

/// `name` on PATH, else in the e2e venv (a network namespace's `ip netns exec` needs the path).
fn which(name: &str) -> String {
    let venv = std::env::var("FERRUM_E2E_VENV").unwrap_or_else(|_| "/var/tmp/ferrum-e2e-venv".into());
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain([format!("{venv}/bin").as_str()])
        .map(|d| std::path::Path::new(d).join(name))
        .find(|p| p.is_file())
        .map_or_else(|| name.to_owned(), |p| p.display().to_string())
}

/// `nghttp -u` (after `prefix`) on `urls`: upgrades the first request to h2c and, if the server
/// switches, sends the rest on the same connection. What it printed, out and err.
pub fn upgrade_then_request(prefix: &[&str], urls: &[&str]) -> String {
    let mut argv: Vec<&str> = prefix.to_vec();
    argv.extend(["nghttp", "-u", "-v", "-t", "5"]);
    argv.extend(urls);
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .expect("nghttp (Debian's nghttp2-client; make mesh-tools installs it)");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
