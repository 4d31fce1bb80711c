//! Bounds on what a client or upstream may send.

use std::time::Duration;

/// Largest request or response head (request line and headers); beyond it HTTP/1 gets 431.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Limits set from the command line.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Request bodies above this get 413.
    pub max_request_body: usize,
    /// Time a client has to send a complete request head.
    pub header_read_timeout: Duration,
    /// Time a TLS client has to finish the handshake.
    pub tls_handshake_timeout: Duration,
    /// How long draining waits for in-flight requests at shutdown.
    pub drain_timeout: Duration,
    /// Longest pause in a client's request body before it gets 408.
    pub request_body_idle_timeout: Duration,
    /// Longest quiet spell of a TCP or TLS route's connection (Envoy's tcp_proxy default).
    pub tcp_idle_timeout: Duration,
    /// Merge `//` in request paths before matching (Istio's default).
    pub merge_slashes: bool,
    /// Open client connections per listener; more are closed at accept.
    pub max_connections: usize,
    /// Concurrent HTTP/2 streams per client connection.
    pub max_streams: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_body: 64 * 1024 * 1024,
            header_read_timeout: Duration::from_secs(10),
            tls_handshake_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(15),
            request_body_idle_timeout: Duration::from_secs(60),
            tcp_idle_timeout: Duration::from_secs(3600),
            merge_slashes: true,
            max_connections: 16_384,
            max_streams: 128,
        }
    }
}
