//! The memory a load took is given back once the load is over: the proxy's resident memory
//! falls back near where it started instead of staying at its peak.

mod common;
use common::*;

use std::time::Duration;

/// 400 overlapping requests: 400 client and 400 pooled upstream connections, with bodies.
async fn load(url: &str) {
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let calls = (0..400).map(|i| {
        let c = c.clone();
        let url = format!("{url}/load/{i}?delay=400");
        async move {
            let r = c.post(&url).body(vec![b'x'; 32 * 1024]).send().await.unwrap();
            let why = r.headers().get("x-ferrum-error").cloned();
            assert_eq!(r.status(), 200, "{why:?}");
            r.bytes().await.unwrap();
        }
    });
    futures_util::future::join_all(calls).await;
}

async fn proxy(b: &Backend, release_after: &str) -> (Dp, String) {
    let port = free_port();
    let route = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  \
                 parentRefs: [{name: gw}]\n  rules: [{backendRefs: [{group: ferrum.dev, kind: Backend, name: b}]}]\n";
    let yaml = docs(&[
        gateway(port),
        backend("b", &[b], "  timeouts: {idle: 1s}\n"),
        route.to_string(),
    ]);
    let args = ["--workers", "2", "--heap-release-interval", release_after];
    (Dp::start_with(&yaml, &args).await, format!("http://127.0.0.1:{port}"))
}

const ACTIVE: &str = "ferrum_cluster_connections_active{cluster=\"backend/default/b\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_a_load_took_is_returned_once_it_is_over() {
    let b = Backend::start("b").await;
    let (released, url) = proxy(&b, "1").await;
    let (kept, kept_url) = proxy(&b, "0").await;
    let start = (released.anon_mb(), kept.anon_mb());
    // One proxy after the other, so each peak is its own load's.
    load(&url).await;
    // Each peak right after its own load, while its upstream connections are still pooled.
    let peak_released = released.anon_mb();
    load(&kept_url).await;
    let peak = (peak_released, kept.anon_mb());
    for dp in [&released, &kept] {
        eventually("the pooled connections close", Duration::from_secs(10), async || {
            dp.metric(ACTIVE).await == 0.0
        })
        .await;
    }
    assert!(
        peak.0 - start.0 > 8.0,
        "the load took {:.1} → {:.1} MB",
        start.0,
        peak.0
    );
    // Released once the freed pages have sat unused for the release time (1 s here), by the
    // allocator's background thread, while the proxy idles.
    let back_near_start = start.0 + (peak.0 - start.0) / 4.0;
    eventually("the freed heap is released", Duration::from_secs(5), async || {
        released.metric("ferrum_heap_releases_total").await >= 1.0 && released.anon_mb() < back_near_start
    })
    .await;
    let after = (released.anon_mb(), kept.anon_mb());
    eprintln!("RssAnon MB: start {start:?}, peak {peak:?}, after {after:?}");
    assert!(
        after.0 < back_near_start,
        "back near the start: {:.1} → {:.1} → {:.1} MB",
        start.0,
        peak.0,
        after.0
    );
    // With releases off the allocator keeps it: this is what the release is for.
    assert_eq!(kept.metric("ferrum_heap_releases_total").await, 0.0);
    assert!(
        after.1 > start.1 + (peak.1 - start.1) / 4.0,
        "kept: {:.1} → {:.1} → {:.1} MB",
        start.1,
        peak.1,
        after.1
    );
    // It still serves, from a small heap.
    load(&url).await;
}
