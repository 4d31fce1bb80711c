//! Active HTTP health checks: one task per cluster runtime, aborted when the runtime goes.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use http::{Request, Uri};
use http_body_util::BodyExt;

use super::body::RequestBody;
use super::{ClusterRuntime, EndpointState};

/// A health check reads at most this much of a response body before it closes the connection.
const HEALTH_BODY_LIMIT: usize = 64 * 1024;

pub(super) fn spawn(rt: &ClusterRuntime) -> tokio::task::AbortHandle {
    let hc = rt.spec.health_check.clone().expect("caller checked");
    let endpoints: Vec<Arc<EndpointState>> = rt.endpoints.clone();
    let pool = rt.pools[rt.pools.len() - 1].clone();
    let cluster = rt.spec.name.clone();
    let warmup = rt.warmup.clone();
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(hc.interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let checks = endpoints.iter().enumerate().map(|(i, e)| {
                let uri = Uri::try_from(hc.path.as_str());
                let pool = &pool;
                async move {
                    let Ok(uri) = uri else { return false };
                    let mut req = Request::get(uri).body(RequestBody::empty()).expect("static request");
                    req.headers_mut().insert(
                        http::header::HOST,
                        http::HeaderValue::from_str(e.authority.as_str()).expect("authority is a header value"),
                    );
                    req.headers_mut().insert(
                        http::header::USER_AGENT,
                        http::HeaderValue::from_static("ferrum-health-check"),
                    );
                    let check = async {
                        let resp = pool.send(i, &e.authority, req).await.ok()?;
                        let s = resp.status().as_u16();
                        // Read to the end, the connection serves the next check.
                        let body = http_body_util::Limited::new(resp.into_body(), HEALTH_BODY_LIMIT);
                        let _ = body.collect().await;
                        Some(s)
                    };
                    match tokio::time::timeout(Duration::from_millis(hc.timeout_ms), check).await {
                        Ok(Some(s)) => s >= hc.expected_status.0 && s <= hc.expected_status.1,
                        _ => false,
                    }
                }
            });
            let results = futures_util::future::join_all(checks).await;
            for (e, ok) in endpoints.iter().zip(results) {
                let back = transition(e, ok, hc.healthy_threshold, hc.unhealthy_threshold, &cluster);
                if let (true, Some(w)) = (back, &warmup) {
                    w.start(e, super::now_ms());
                }
            }
        }
    });
    task.abort_handle()
}

/// `hc_streak` counts results that disagree with the current state; enough of them in a row
/// flip it. Whether it became healthy again.
fn transition(e: &EndpointState, ok: bool, healthy_threshold: u32, unhealthy_threshold: u32, cluster: &str) -> bool {
    let healthy = e.healthy.load(Relaxed);
    if ok == healthy {
        e.hc_streak.store(0, Relaxed);
        return false;
    }
    let streak = e.hc_streak.fetch_add(1, Relaxed) + 1;
    let needed = if ok { healthy_threshold } else { unhealthy_threshold };
    if streak >= needed {
        e.healthy.store(ok, Relaxed);
        e.hc_streak.store(0, Relaxed);
        if ok {
            tracing::info!(cluster, endpoint = %e.key, "endpoint healthy again");
        } else {
            tracing::warn!(cluster, endpoint = %e.key, "endpoint failed health checks");
        }
        return ok;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrum_snapshot::model::Endpoint;

    #[test]
    fn thresholds_gate_transitions() {
        let e = EndpointState::new(&Endpoint::new("127.0.0.1", 1)).unwrap();
        transition(&e, false, 2, 3, "c");
        transition(&e, false, 2, 3, "c");
        assert!(e.healthy(), "two failures are below the threshold of three");
        transition(&e, true, 2, 3, "c");
        transition(&e, false, 2, 3, "c");
        transition(&e, false, 2, 3, "c");
        assert!(e.healthy(), "a success resets the streak");
        transition(&e, false, 2, 3, "c");
        assert!(!e.healthy());
        transition(&e, true, 2, 3, "c");
        assert!(!e.healthy());
        transition(&e, true, 2, 3, "c");
        assert!(e.healthy(), "two successes bring it back");
    }
}
