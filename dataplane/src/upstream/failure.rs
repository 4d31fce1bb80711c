//! Why a request to a cluster got no upstream response: a reason code, counted per cluster
//! (`ferrum_cluster_upstream_errors`) and sent to the client in `x-ferrum-error`.

/// Why a request to a cluster failed without an upstream response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamError {
    ConnectFailure,
    Timeout,
    Reset,
    Overflow,
    NoHealthyUpstream,
    /// A response no client may be sent: a status outside 100-599, or a 101 nobody asked for.
    InvalidResponse,
}

impl UpstreamError {
    pub const ALL: [UpstreamError; 6] = [
        UpstreamError::ConnectFailure,
        UpstreamError::Timeout,
        UpstreamError::Reset,
        UpstreamError::Overflow,
        UpstreamError::NoHealthyUpstream,
        UpstreamError::InvalidResponse,
    ];
    /// Also the value of the `x-ferrum-error` response header.
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamError::ConnectFailure => "upstream_connect_failure",
            UpstreamError::Timeout => "upstream_timeout",
            UpstreamError::Reset => "upstream_reset",
            UpstreamError::Overflow => "upstream_overflow",
            UpstreamError::NoHealthyUpstream => "no_healthy_upstream",
            UpstreamError::InvalidResponse => "upstream_invalid_response",
        }
    }
}
