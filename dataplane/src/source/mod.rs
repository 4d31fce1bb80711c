//! Where snapshots come from: YAML files, the Ferrum operator (MeshSubscribe) or any xDS server.
//! Every source ends in `Dataplane::apply`.

pub mod control_plane;
pub mod file;
pub mod xds;

/// A gRPC channel to a control plane (MeshSubscribe or xDS), with the timeouts both use.
pub async fn connect(url: &str) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    tonic::transport::Endpoint::from_shared(url.to_string())?
        .connect_timeout(std::time::Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(std::time::Duration::from_secs(20))
        .connect()
        .await
}

/// A session's error, and how soon the server asked to be tried again (gRPC's
/// `grpc-retry-pushback-ms`), if it did.
pub trait SessionError: std::fmt::Display {
    fn pushback(&self) -> Option<std::time::Duration>;
}

/// The server's `grpc-retry-pushback-ms` on a status, if any.
pub fn pushback_of(status: &tonic::Status) -> Option<std::time::Duration> {
    let ms = status
        .metadata()
        .get("grpc-retry-pushback-ms")?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    Some(std::time::Duration::from_millis(ms))
}

/// Runs `session` forever, reconnecting with exponential backoff (100 ms to 15 s) and jitter, so
/// a fleet of proxies does not reconnect in lockstep. A server's pushback (it is up, and says
/// when to come back: the operator that does not know a sidecar's pod yet) is followed as given,
/// capped by the backoff's ceiling, and does not grow the backoff.
pub async fn reconnecting<E, F, Fut>(what: &str, mut session: F)
where
    E: SessionError,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
{
    use std::time::Duration;
    const CEILING: Duration = Duration::from_secs(15);
    let mut backoff = Duration::from_millis(100);
    loop {
        match session().await {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => match e.pushback() {
                Some(wait) => {
                    let wait = wait.min(CEILING);
                    tracing::info!(error = %e, retry_in_ms = wait.as_millis() as u64, "{what} ended; the server asked to retry then");
                    tokio::time::sleep(wait).await;
                    continue;
                }
                None => tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "{what} ended"),
            },
        }
        let wait = Duration::from_millis(fastrand::u64(
            backoff.as_millis() as u64 / 2..=backoff.as_millis() as u64,
        ));
        tokio::time::sleep(wait).await;
        backoff = (backoff * 2).min(CEILING);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
    use std::time::{Duration, Instant};

    struct Refused(tonic::Status);

    impl std::fmt::Display for Refused {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{}", self.0)
        }
    }

    impl SessionError for Refused {
        fn pushback(&self) -> Option<Duration> {
            pushback_of(&self.0)
        }
    }

    /// Sessions refused `n` times (with `pushback_ms` when given), then one that succeeds.
    async fn tries_until_accepted(n: u32, pushback_ms: Option<&'static str>) -> Duration {
        let tries = AtomicU32::new(0);
        let started = Instant::now();
        let run = reconnecting("test stream", || async {
            if tries.fetch_add(1, Relaxed) < n {
                let mut st = tonic::Status::unavailable("pod x/y is not known (yet)");
                if let Some(ms) = pushback_ms {
                    st.metadata_mut().insert(
                        "grpc-retry-pushback-ms",
                        tonic::metadata::MetadataValue::from_static(ms),
                    );
                }
                return Err(Refused(st));
            }
            std::future::pending::<()>().await;
            Ok(())
        });
        let accepted = async {
            while tries.load(Relaxed) <= n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::select! {
            () = run => unreachable!("reconnecting runs forever"),
            () = accepted => started.elapsed(),
        }
    }

    #[tokio::test]
    async fn a_servers_pushback_is_followed_without_growing_the_backoff() {
        // Seven refusals back off 0.05–0.1 + … + 3.2–6.4 s (≥ 6.35 s in all) without a
        // pushback; with 20 ms asked each time they take ~0.14 s.
        let pushed = tries_until_accepted(7, Some("20")).await;
        assert!(pushed < Duration::from_secs(2), "took {pushed:?}");
        let unpushed = tries_until_accepted(4, None).await;
        assert!(unpushed >= Duration::from_millis(375), "backed off only {unpushed:?}");
    }
}
