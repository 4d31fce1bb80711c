//! Which try outcomes a cluster retries, compiled once from the policy's condition names so a
//! failed try is judged without comparing strings.

use ferrum_snapshot::model::RetryPolicy;
use http::HeaderMap;

use super::UpstreamError;

/// A retry policy's `on` list (`connect-failure`, `reset`, `5xx`, `gateway-error`, status codes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetryOn {
    connect_failure: bool,
    reset: bool,
    /// `5xx`: any 5xx status, and a failed connect, a reset or a timeout.
    server_error: bool,
    /// `gateway-error`: 502, 503, 504, and a failed connect, a reset or a timeout.
    gateway_error: bool,
    statuses: Box<[u16]>,
    /// gRPC status codes retried, one bit each.
    grpc: u32,
}

impl RetryOn {
    /// Names `validate` refuses never reach here; any that did would match nothing.
    pub fn new(on: &[String]) -> Self {
        let mut r = RetryOn::default();
        let mut statuses = Vec::new();
        for c in on {
            match c.as_str() {
                "connect-failure" => r.connect_failure = true,
                "reset" => r.reset = true,
                "5xx" => r.server_error = true,
                "gateway-error" => r.gateway_error = true,
                code => statuses.extend(code.parse::<u16>().ok()),
            }
        }
        r.statuses = statuses.into();
        r
    }

    /// A policy's conditions, its gRPC ones included.
    pub fn of(p: &RetryPolicy) -> Self {
        let mut r = RetryOn::new(&p.on);
        r.grpc = p.grpc_on.iter().filter(|c| **c < 32).fold(0, |bits, c| bits | 1 << c);
        r
    }

    /// Whether a response is a gRPC error it retries: `grpc-status` in its headers (a
    /// trailers-only response), one of the codes. Read only when the policy names any.
    pub fn matches_grpc(&self, headers: &HeaderMap) -> bool {
        self.grpc != 0
            && headers
                .get("grpc-status")
                .and_then(|v| v.to_str().ok()?.parse::<u8>().ok())
                .is_some_and(|c| c < 32 && self.grpc & (1 << c) != 0)
    }

    /// Whether a try that ended so (a response status, or no response) is retried.
    pub fn matches(&self, outcome: Result<u16, UpstreamError>) -> bool {
        let no_response = self.server_error || self.gateway_error;
        match outcome {
            Ok(s) => {
                (self.server_error && s >= 500)
                    || (self.gateway_error && matches!(s, 502..=504))
                    || self.statuses.contains(&s)
            }
            Err(UpstreamError::ConnectFailure) => self.connect_failure || no_response,
            Err(UpstreamError::Reset) => self.reset || no_response,
            Err(UpstreamError::Timeout) => no_response,
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on(v: &[&str]) -> RetryOn {
        RetryOn::new(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn conditions_match_their_outcomes() {
        assert!(on(&["5xx"]).matches(Ok(503)));
        assert!(!on(&["5xx"]).matches(Ok(404)));
        assert!(on(&["5xx"]).matches(Err(UpstreamError::Timeout)));
        assert!(on(&["gateway-error"]).matches(Ok(502)));
        assert!(!on(&["gateway-error"]).matches(Ok(500)));
        assert!(on(&["gateway-error"]).matches(Err(UpstreamError::Reset)));
        assert!(on(&["429"]).matches(Ok(429)));
        assert!(!on(&["429"]).matches(Ok(503)));
        assert!(on(&["connect-failure"]).matches(Err(UpstreamError::ConnectFailure)));
        assert!(!on(&["connect-failure"]).matches(Err(UpstreamError::Timeout)));
        assert!(!on(&["reset"]).matches(Err(UpstreamError::ConnectFailure)));
        assert!(on(&["reset", "503"]).matches(Ok(503)));
    }

    #[test]
    fn grpc_conditions_match_a_trailers_only_error() {
        let p = RetryPolicy {
            grpc_on: vec![1, 14],
            ..RetryPolicy::default()
        };
        let r = RetryOn::of(&p);
        let headers = |status: &str| {
            let mut h = HeaderMap::new();
            h.insert("grpc-status", status.parse().unwrap());
            h
        };
        assert!(r.matches_grpc(&headers("14")), "unavailable");
        assert!(!r.matches_grpc(&headers("0")), "OK");
        assert!(!r.matches_grpc(&headers("13")), "internal: not named");
        assert!(!r.matches_grpc(&HeaderMap::new()), "no grpc-status in the headers");
        assert!(!RetryOn::of(&RetryPolicy::default()).matches_grpc(&headers("14")));
    }

    #[test]
    fn the_breaker_and_empty_clusters_are_never_retried() {
        let all = on(&["connect-failure", "reset", "5xx", "gateway-error"]);
        assert!(!all.matches(Err(UpstreamError::Overflow)));
        assert!(!all.matches(Err(UpstreamError::NoHealthyUpstream)));
        assert!(!all.matches(Ok(200)));
        assert!(!on(&[]).matches(Ok(503)));
    }
}
