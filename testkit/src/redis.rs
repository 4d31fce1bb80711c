//! A real Redis on loopback for tests of shared (Global) rate limits: Debian's `redis-server`
//! (`make mesh-tools` installs it), on a free port, without persistence; killed on drop.

use std::process::{Command, Stdio};

pub struct RedisServer {
    proc: Option<crate::Proc>,
    pub port: u16,
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        let port = crate::free_port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (Debian's redis-server package; make mesh-tools installs it)");
        let server = RedisServer {
            proc: Some(crate::Proc(child)),
            port,
        };
        crate::until_listening(port, "redis-server").await;
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stops it (clients see connections refused from now on).
    pub fn stop(&mut self) {
        self.proc = None;
    }
}
