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

/// Runs `session` forever, reconnecting with exponential backoff (100 ms to 15 s) and jitter, so
/// a fleet of proxies does not reconnect in lockstep.
pub async fn reconnecting<E, F, Fut>(what: &str, mut session: F)
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
{
    use std::time::Duration;
    let mut backoff = Duration::from_millis(100);
    loop {
        match session().await {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "{what} ended"),
        }
        let wait = Duration::from_millis(fastrand::u64(
            backoff.as_millis() as u64 / 2..=backoff.as_millis() as u64,
        ));
        tokio::time::sleep(wait).await;
        backoff = (backoff * 2).min(Duration::from_secs(15));
    }
}
