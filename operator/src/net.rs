//! Listening sockets for the ports proxies connect to.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};

/// Connections that may wait to be accepted. Every proxy of a cluster reconnects at once when
/// the operator restarts or fails over; with the usual 1,024 a thousand of them overflowed the
/// queue (the kernel then drops or resets connections and they back off). The kernel caps it
/// at `net.core.somaxconn` (4,096 by default).
const BACKLOG: u32 = 4096;

pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // A restarted operator takes its port back while the old connections are in TIME_WAIT.
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(BACKLOG)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_thousand_connections_wait_for_accept_without_loss() {
        let l = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        // Nobody accepts yet, as when the operator is busy: every connect still completes at
        // once (past a full queue the kernel drops the SYN and the client waits 1 s, 3 s, ...).
        let connects = async {
            let mut conns = Vec::new();
            for _ in 0..1_200 {
                conns.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
            }
            conns
        };
        let _conns = tokio::time::timeout(std::time::Duration::from_secs(5), connects)
            .await
            .expect("1,200 connects queued within 5 s");
        for _ in 0..1_200 {
            l.accept().await.expect("accepted");
        }
    }
}
