//! Who the client is when load balancers stand in front of a listener: the PROXY protocol
//! header (HAProxy's v1 text or v2 binary form) a connection starts with, and the trusted hops
//! of `X-Forwarded-For` — Envoy's `proxy_protocol` listener filter and `xff_num_trusted_hops`.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http::HeaderMap;
use proxy_header::{ParseConfig, ProxyHeader};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The longest header read. v1 is at most 107 bytes; v2 adds TLVs (ALPN, authority, TLS facts)
/// that load balancers keep short. A longer one is refused rather than buffered.
pub const MAX_PROXY_HEADER: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("no PROXY protocol header within {0:?}")]
    Timeout(Duration),
    #[error("closed before a PROXY protocol header")]
    Closed,
    #[error("not a PROXY protocol header: {0}")]
    Malformed(proxy_header::Error),
    #[error("PROXY protocol header longer than {MAX_PROXY_HEADER} bytes")]
    TooLong,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Reads the PROXY protocol header `stream` starts with and leaves the stream at the first byte
/// after it. The client is the header's source address; a `LOCAL` (v2) or `UNKNOWN` (v1) header
/// — a load balancer's own health check — leaves it `peer`.
pub async fn read_proxy_header(
    stream: &mut TcpStream,
    peer: SocketAddr,
    within: Duration,
) -> Result<SocketAddr, ProxyHeaderError> {
    let config = ParseConfig {
        include_tlvs: false,
        allow_v1: true,
        allow_v2: true,
    };
    let read = async {
        let mut buf = [0u8; MAX_PROXY_HEADER];
        loop {
            let n = stream.peek(&mut buf).await?;
            if n == 0 {
                return Err(ProxyHeaderError::Closed);
            }
            match ProxyHeader::parse(&buf[..n], config) {
                Ok((header, len)) => {
                    let client = header.proxied_address().map_or(peer, |a| a.source);
                    stream.read_exact(&mut buf[..len]).await?;
                    return Ok(client);
                }
                Err(proxy_header::Error::BufferTooShort) if n == buf.len() => return Err(ProxyHeaderError::TooLong),
                // A header split across packets: peek returns the same bytes until more arrive.
                Err(proxy_header::Error::BufferTooShort) => tokio::time::sleep(Duration::from_millis(1)).await,
                Err(e) => return Err(ProxyHeaderError::Malformed(e)),
            }
        }
    };
    tokio::time::timeout(within, read)
        .await
        .map_err(|_| ProxyHeaderError::Timeout(within))?
}

/// The address `hops` entries from the right end of `X-Forwarded-For` (its lines read as one
/// list), where the nearest of the `hops` trusted proxies in front put the client it saw.
/// `None` when there are fewer entries or that one is not an address (`ip` or `ip:port`): then
/// the connection's own client stands, as in Envoy.
pub fn forwarded_client(headers: &HeaderMap, hops: u8) -> Option<IpAddr> {
    if hops == 0 {
        return None;
    }
    let entry = headers
        .get_all(http::header::HeaderName::from_static("x-forwarded-for"))
        .iter()
        .rev()
        .flat_map(|v| v.to_str().unwrap_or("").rsplit(','))
        .nth(usize::from(hops) - 1)?
        .trim();
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|a| a.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use tokio::io::AsyncWriteExt;

    fn xff(lines: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append("x-forwarded-for", HeaderValue::from_str(l).unwrap());
        }
        h
    }

    #[test]
    fn trusted_hops_count_from_the_right_across_lines() {
        let h = xff(&["198.51.100.7, 10.0.0.1", "10.0.0.2"]);
        assert_eq!(forwarded_client(&h, 1), Some("10.0.0.2".parse().unwrap()));
        assert_eq!(forwarded_client(&h, 2), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(forwarded_client(&h, 3), Some("198.51.100.7".parse().unwrap()));
        // Fewer entries than trusted proxies: nobody vouches for the leftmost.
        assert_eq!(forwarded_client(&h, 4), None);
        assert_eq!(forwarded_client(&h, 0), None);
        assert_eq!(forwarded_client(&HeaderMap::new(), 1), None);
    }

    #[test]
    fn entries_with_ports_count_and_garbage_does_not() {
        let h = xff(&["[2001:db8::7]:4711, 203.0.113.9:80, unknown"]);
        assert_eq!(forwarded_client(&h, 1), None);
        assert_eq!(forwarded_client(&h, 2), Some("203.0.113.9".parse().unwrap()));
        assert_eq!(forwarded_client(&h, 3), Some("2001:db8::7".parse().unwrap()));
    }

    /// Sends `bytes` (in two writes, `split` apart) and returns what the listener side read as
    /// the client, then the bytes left on the stream.
    async fn through(bytes: Vec<u8>, split: usize) -> (Result<SocketAddr, ProxyHeaderError>, Vec<u8>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let send = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(&bytes[..split]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            c.write_all(&bytes[split..]).await.unwrap();
        });
        let (mut s, peer) = l.accept().await.unwrap();
        let client = read_proxy_header(&mut s, peer, Duration::from_secs(2)).await;
        send.await.unwrap();
        let mut rest = Vec::new();
        if client.is_ok() {
            s.read_to_end(&mut rest).await.unwrap();
        }
        (client, rest)
    }

    fn v2(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
        let mut out = Vec::new();
        ProxyHeader::with_address(proxy_header::ProxiedAddress::stream(source, destination))
            .encode_v2(&mut out)
            .unwrap();
        out
    }

    #[tokio::test]
    async fn a_v1_header_split_across_packets_gives_the_client_and_leaves_the_request() {
        let bytes = b"PROXY TCP4 198.51.100.7 10.0.0.1 4711 80\r\nGET / HTTP/1.1\r\n\r\n".to_vec();
        let (client, rest) = through(bytes, 10).await;
        assert_eq!(client.unwrap(), "198.51.100.7:4711".parse().unwrap());
        assert_eq!(rest, b"GET / HTTP/1.1\r\n\r\n");
    }

    #[tokio::test]
    async fn a_v2_header_gives_the_client_and_leaves_the_request() {
        let mut bytes = v2(
            "[2001:db8::7]:4711".parse().unwrap(),
            "[2001:db8::1]:443".parse().unwrap(),
        );
        bytes.extend_from_slice(b"PRI * HTTP/2.0");
        let (client, rest) = through(bytes, 5).await;
        assert_eq!(client.unwrap(), "[2001:db8::7]:4711".parse().unwrap());
        assert_eq!(rest, b"PRI * HTTP/2.0");
    }

    #[tokio::test]
    async fn a_local_header_leaves_the_peer_and_no_header_is_refused() {
        let mut local = Vec::new();
        ProxyHeader::with_local().encode_v2(&mut local).unwrap();
        let len = local.len();
        let (client, _) = through(local, len).await;
        assert_eq!(client.unwrap().ip(), std::net::Ipv4Addr::LOCALHOST);
        let (client, _) = through(b"GET / HTTP/1.1\r\n\r\n".to_vec(), 18).await;
        assert!(matches!(client, Err(ProxyHeaderError::Malformed(_))), "{client:?}");
    }
}
