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
    /// Longest quiet spell of a response: the upstream sending nothing of its body, or the
    /// client taking none of what is ready for it (Envoy's `stream_idle_timeout`); `None`: no
    /// limit.
    pub stream_idle_timeout: Option<Duration>,
    /// How long an HTTP/2 client connection may have no open stream before it is closed
    /// (Envoy's `idle_timeout`); `None`: no limit.
    pub idle_timeout: Option<Duration>,
    /// Longest quiet spell of a TCP or TLS route's connection (Envoy's tcp_proxy default).
    pub tcp_idle_timeout: Duration,
    /// Merge `//` in request paths before matching (Istio's default).
    pub merge_slashes: bool,
    /// What an encoded `/` or `\` in a path gets.
    pub escaped_slashes: crate::proxy::path::EscapedSlashes,
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
            stream_idle_timeout: Some(Duration::from_secs(300)),
            idle_timeout: Some(Duration::from_secs(300)),
            tcp_idle_timeout: Duration::from_secs(3600),
            merge_slashes: true,
            escaped_slashes: crate::proxy::path::EscapedSlashes::Reject,
            max_connections: 16_384,
            max_streams: 128,
        }
    }
}

/// A bound on how long something may stay stuck: a timer armed the first time it has to wait,
/// restarted when it waits again after moving. Nothing (no timer, no allocation) while it never
/// waits, which is every fast request; 16 bytes, as it rides in every response body.
pub struct Stall {
    timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// The bound in milliseconds; 0: none.
    limit_ms: u32,
    moved: bool,
}

impl Stall {
    pub fn new(limit: Option<Duration>) -> Stall {
        Stall {
            timer: None,
            // At least 1 ms, at most ~49 days.
            limit_ms: limit.map_or(0, |l| l.as_millis().clamp(1, u32::MAX as u128) as u32),
            moved: false,
        }
    }

    /// What was guarded could not proceed: ready once it has been stuck the limit since it last
    /// moved (the caller's task is woken then).
    pub fn poll_stuck(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Duration> {
        use std::future::Future;
        if self.limit_ms == 0 {
            return std::task::Poll::Pending;
        }
        let limit = Duration::from_millis(self.limit_ms.into());
        let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if std::mem::take(&mut self.moved) {
            timer.as_mut().reset(tokio::time::Instant::now() + limit);
        }
        timer.as_mut().poll(cx).map(|()| limit)
    }

    /// What was guarded moved.
    pub fn moved(&mut self) {
        self.moved = self.timer.is_some();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Poll;

    async fn stuck(s: &mut Stall) -> bool {
        std::future::poll_fn(|cx| Poll::Ready(s.poll_stuck(cx).is_ready())).await
    }

    #[tokio::test]
    async fn a_stall_counts_from_when_it_last_moved() {
        let step = Duration::from_millis(300);
        let mut s = Stall::new(Some(step * 2));
        assert!(!stuck(&mut s).await);
        tokio::time::sleep(step).await;
        s.moved();
        tokio::time::sleep(step + step / 2).await;
        assert!(!stuck(&mut s).await, "restarted when it waited again after moving");
        tokio::time::sleep(step * 3).await;
        assert!(stuck(&mut s).await);
        let mut unbounded = Stall::new(None);
        assert!(!stuck(&mut unbounded).await);
        assert_eq!(std::mem::size_of::<Stall>(), 16);
    }
}
