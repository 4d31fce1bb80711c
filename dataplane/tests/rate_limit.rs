//! RateLimitPolicy in a real `ferrum-dp`: a route's own limit and a Gateway's per-user limit
//! counted in the proxy (and kept across a reload), and a Global limit that two proxies share
//! through a real Redis — which, gone, lets requests through rather than failing them.

mod common;

use common::*;
use ferrum_testkit::redis::RedisServer;

/// HTTPRoutes `a` (/a), `b` (/b) and `c` (/c) on Gateway `gw`, each to backend `be`.
fn routes(be: &Backend) -> Vec<String> {
    let route = |name: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}}}\n\
             spec: {{parentRefs: [{{name: gw}}], rules: [{{matches: [{{path: {{type: PathPrefix, value: /{name}}}}}], \
             backendRefs: [{{group: ferrum.dev, kind: Backend, name: be}}]}}]}}\n"
        )
    };
    vec![backend("be", &[be], ""), route("a"), route("b"), route("c")]
}

fn policy(name: &str, target: &str, spec: &str) -> String {
    let (kind, target) = target.split_once('/').unwrap();
    format!(
        "apiVersion: ferrum.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{name: {name}}}\n\
         spec:\n  targetRefs: [{{group: gateway.networking.k8s.io, kind: {kind}, name: {target}}}]\n{spec}"
    )
}

/// Status of GET `path` on `port`, with `x-user` when given, and the 429's headers.
async fn get(port: u16, path: &str, user: Option<&str>) -> (u16, Option<(String, String)>) {
    let mut r = client().get(format!("http://127.0.0.1:{port}{path}"));
    if let Some(u) = user {
        r = r.header("x-user", u);
    }
    let r = r.send().await.unwrap();
    let h = |n: &str| r.headers().get(n).map(|v| v.to_str().unwrap().to_string());
    let limit = h("x-ratelimit-limit").zip(h("x-ferrum-error"));
    (r.status().as_u16(), limit)
}

async fn statuses(port: u16, path: &str, user: Option<&str>, n: usize) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(get(port, path, user).await.0);
    }
    out
}

#[tokio::test]
async fn local_limits_count_per_route_and_per_distinct_user_and_survive_a_reload() {
    let be = Backend::start("be").await;
    let port = free_port();
    let policies = [
        policy(
            "route-a",
            "HTTPRoute/a",
            "  rules: [{limit: {requests: 3, unit: Day}}]\n",
        ),
        policy(
            "per-user",
            "Gateway/gw",
            "  rules: [{clientSelectors: [{headers: [{name: x-user, type: Distinct}]}], limit: {requests: 2, unit: Day}}]\n",
        ),
    ];
    let yaml = |extra: &str| {
        let mut parts = vec![gateway(port)];
        parts.extend(routes(&be));
        parts.extend(policies.iter().cloned());
        parts.push(extra.to_string());
        docs(&parts)
    };
    let dp = Dp::start(&yaml("")).await;

    // The route's limit: three (each answer says how many are left), then 429 saying so; the
    // other routes are not counted by it.
    let mut left = Vec::new();
    for _ in 0..3 {
        let r = client().get(format!("http://127.0.0.1:{port}/a")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        left.push(r.headers()["x-ratelimit-remaining"].to_str().unwrap().to_string());
    }
    assert_eq!(left, ["2", "1", "0"]);
    let (status, said) = get(port, "/a", None).await;
    assert_eq!((status, said), (429, Some(("3".into(), "rate_limited".into()))));
    assert_eq!(
        statuses(port, "/b", None, 5).await,
        [200; 5],
        "no user: the Gateway's rule selects nothing"
    );
    // The Gateway's: two per user, on every route of it.
    assert_eq!(statuses(port, "/b", Some("ann"), 3).await, [200, 200, 429]);
    assert_eq!(statuses(port, "/c", Some("ann"), 1).await, [429]);
    assert_eq!(statuses(port, "/c", Some("bob"), 3).await, [200, 200, 429]);
    assert_eq!(
        dp.metric("ferrum_rate_limit_requests_total{policy=\"default/per-user\",result=\"limited\"}")
            .await,
        3.0
    );

    // A reload that leaves the policies as they are keeps their counts.
    let v = dp.version().await;
    let another = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: d}\n\
        spec: {parentRefs: [{name: gw}], rules: [{matches: [{path: {type: PathPrefix, value: /d}}], \
        backendRefs: [{group: ferrum.dev, kind: Backend, name: be}]}]}\n";
    dp.reconfigure(&yaml(another), v).await;
    assert_eq!(
        statuses(port, "/d", Some("ann"), 1).await,
        [429],
        "the new route is the Gateway's too"
    );
    assert_eq!(statuses(port, "/b", Some("ann"), 1).await, [429]);
    assert_eq!(statuses(port, "/a", None, 1).await, [429]);

    // A gRPC call over the limit gets RESOURCE_EXHAUSTED, as a gRPC client reads a quota.
    let h2 = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    let r = h2
        .post(format!("http://127.0.0.1:{port}/a/Hello"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(vec![0u8; 5])
        .send()
        .await
        .unwrap();
    let grpc_status = r.headers().get("grpc-status").map(|v| v.to_str().unwrap().to_string());
    assert_eq!((r.status().as_u16(), grpc_status.as_deref()), (200, Some("8")));
    assert_eq!(r.headers()["x-ratelimit-limit"], "3");
}

#[tokio::test]
async fn a_global_limit_is_shared_by_proxies_through_redis() {
    let be = Backend::start("be").await;
    let mut redis = RedisServer::start().await;
    let (p1, p2) = (free_port(), free_port());
    let yaml = |port: u16| {
        let mut parts = vec![gateway(port)];
        parts.extend(routes(&be));
        parts.push(policy(
            "shared",
            "HTTPRoute/c",
            "  type: Global\n  rules: [{limit: {requests: 4, unit: Day}}]\n",
        ));
        docs(&parts)
    };
    let url = redis.url();
    let one = Dp::start_with(&yaml(p1), &["--rate-limit-redis", &url]).await;
    let two = Dp::start_with(&yaml(p2), &["--rate-limit-redis", &url]).await;
    // Four in all, whichever proxy takes them.
    let mut got = Vec::new();
    for port in [p1, p2, p1, p2, p1, p2] {
        got.push(get(port, "/c", None).await.0);
    }
    assert_eq!(got, [200, 200, 200, 200, 429, 429]);
    let limited = "ferrum_rate_limit_requests_total{policy=\"default/shared\",result=\"limited\"}";
    assert_eq!((one.metric(limited).await, two.metric(limited).await), (1.0, 1.0));

    // Redis gone: requests go on, counted as errors, not failed.
    redis.stop();
    assert_eq!(statuses(p1, "/c", None, 3).await, [200; 3]);
    assert_eq!(
        one.metric("ferrum_rate_limit_requests_total{policy=\"default/shared\",result=\"error\"}")
            .await,
        3.0
    );
}
