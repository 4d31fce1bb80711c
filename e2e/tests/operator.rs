//! kubectl → API emulator → ferrum-operator → MeshSubscribe → ferrum-dp → real backends.

use std::time::Duration;

use ferrum_e2e::*;
use serde_json::Value;

fn base(port: u16, a: &Backend, b: &Backend) -> String {
    format!(
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {{name: ferrum}}
spec: {{controllerName: ferrum.dev/gateway-controller}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: web, namespace: default}}
spec:
  gatewayClassName: ferrum
  addresses: [{{type: IPAddress, value: 127.0.0.1}}]
  listeners: [{{name: http, port: {port}, protocol: HTTP, hostname: "*.example.com"}}]
{a}{b}"#,
        a = service("a", a),
        b = service("b", b),
    )
}

fn service(name: &str, b: &Backend) -> String {
    format!(
        r#"---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec: {{ports: [{{name: http, port: 80, targetPort: {p}}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports: [{{name: http, port: {p}}}]
endpoints: [{{addresses: [127.0.0.1], conditions: {{ready: true}}}}]
"#,
        p = b.addr.port()
    )
}

fn route(weights: (u32, u32)) -> String {
    format!(
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: shop, namespace: default}}
spec:
  parentRefs: [{{name: web}}]
  hostnames: [shop.example.com]
  rules:
  - backendRefs: [{{name: a, port: 80, weight: {}}}, {{name: b, port: 80, weight: {}}}]
"#,
        weights.0, weights.1
    )
}

/// An operator, Services `a` and `b`, the Gateway and route `shop` (all to `a`), and a
/// ferrum-dp (`node`) following the operator that serves it.
struct Serving {
    _backends: (Backend, Backend),
    cluster: Cluster,
    op: Operator,
    port: u16,
    dp: Proxy,
}

async fn serving(node: &str) -> Serving {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let cluster = Cluster::start();
    let op = cluster.operator("op-1").await;
    let port = free_port();
    cluster.apply(&base(port, &a, &b));
    cluster.apply(&route((100, 0)));
    let cache = cluster.dir.path().join(format!("{node}.json"));
    let dp = Proxy::start(&op.grpc_url(), node, &cache).await;
    eventually("the route serves", Duration::from_secs(5), async || {
        hit(port, "shop.example.com").await == (200, Some("a".into()))
    })
    .await;
    Serving {
        _backends: (a, b),
        cluster,
        op,
        port,
        dp,
    }
}

fn condition<'a>(conds: &'a Value, kind: &str) -> Option<&'a Value> {
    conds.as_array()?.iter().find(|c| c["type"] == kind)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_follow_kubectl_and_survive_the_operator() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let cluster = Cluster::start();
    // Tiny chunks: every full snapshot this proxy gets arrives in several messages.
    let mut op = cluster.operator_with("op-1", &["--chunk-bytes", "256"]).await;
    let port = free_port();
    cluster.apply(&base(port, &a, &b));
    let cache = cluster.dir.path().join("dp1-snapshot.json");
    let dp = Proxy::start(&op.grpc_url(), "dp-1", &cache).await;

    // Apply a route: traffic flows.
    cluster.apply(&route((100, 0)));
    eventually("route serves", PROPAGATION, async || {
        hit(port, "shop.example.com").await == (200, Some("a".into()))
    })
    .await;

    // Status, as the Gateway API says.
    eventually("HTTPRoute Accepted", Duration::from_secs(5), async || {
        let r = cluster.get("httproutes", "default", "shop");
        let parent = &r["status"]["parents"][0];
        condition(&parent["conditions"], "Accepted").is_some_and(|c| c["status"] == "True")
            && condition(&parent["conditions"], "ResolvedRefs").is_some_and(|c| c["status"] == "True")
            && parent["controllerName"] == "ferrum.dev/gateway-controller"
    })
    .await;
    eventually(
        "Gateway Programmed with one attached route",
        Duration::from_secs(5),
        async || {
            let g = cluster.get("gateways", "default", "web");
            condition(&g["status"]["conditions"], "Programmed").is_some_and(|c| c["status"] == "True")
                && g["status"]["listeners"][0]["attachedRoutes"] == 1
        },
    )
    .await;

    // The operator knows what the proxy applied.
    let proxies = op.admin_json("/proxies").await;
    assert_eq!(proxies["proxies"][0]["nodeId"], "dp-1");
    assert_eq!(
        proxies["proxies"][0]["appliedVersion"].as_u64(),
        Some(dp.version().await)
    );

    // A weight change shifts traffic.
    cluster.apply(&route((0, 100)));
    eventually("weights shift to b", PROPAGATION, async || {
        hit(port, "shop.example.com").await.1.as_deref() == Some("b")
    })
    .await;
    for _ in 0..20 {
        assert_eq!(hit(port, "shop.example.com").await, (200, Some("b".into())));
    }
    // After the first full snapshot, changes travel as deltas, and the proxy applies them all
    // (its acknowledgement of the latest may still be on the way).
    eventually("the proxy acknowledged what was sent", PROPAGATION, async || {
        let p = &op.admin_json("/proxies").await["proxies"][0];
        p["appliedVersion"] == p["sentVersion"]
    })
    .await;
    let p = &op.admin_json("/proxies").await["proxies"][0];
    assert_eq!(p["fullSent"], 1, "{p}");
    assert!(p["deltasSent"].as_u64() >= Some(1), "{p}");
    assert!(p["lastRejection"].is_null(), "{p}");

    // Operator gone: the proxy keeps serving what it has.
    op.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..20 {
        assert_eq!(hit(port, "shop.example.com").await, (200, Some("b".into())));
    }

    // Proxy restarted while the operator is down: it serves its saved snapshot.
    let version = dp.version().await;
    drop(dp);
    let dp = Proxy::start(&op.grpc_url(), "dp-1", &cache).await;
    eventually("restarted proxy serves from its cache", PROPAGATION, async || {
        hit(port, "shop.example.com").await == (200, Some("b".into()))
    })
    .await;
    assert_eq!(dp.version().await, version);

    // The operator comes back; deleting the route gives 404.
    let op = cluster.operator("op-1b").await;
    drop(dp);
    let _dp = Proxy::start(&op.grpc_url(), "dp-1", &cache).await;
    cluster.kubectl(&["delete", "httproutes", "shop", "-n", "default"], None);
    eventually("deleted route answers 404", Duration::from_secs(10), async || {
        hit(port, "shop.example.com").await.0 == 404
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_routes_get_the_spec_reasons() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let cluster = Cluster::start();
    let _op = cluster.operator("op-1").await;
    let port = free_port();
    cluster.apply(&base(port, &a, &b));
    cluster.apply(
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: missing, namespace: default}
spec:
  parentRefs: [{name: web}]
  hostnames: [x.example.com]
  rules: [{backendRefs: [{name: nope, port: 80}]}]
---
apiVersion: v1
kind: Namespace
metadata: {name: other}
---
apiVersion: v1
kind: Service
metadata: {name: far, namespace: other}
spec: {ports: [{port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: crossns, namespace: default}
spec:
  parentRefs: [{name: web}]
  hostnames: [y.example.com]
  rules: [{backendRefs: [{name: far, namespace: other, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: wronghost, namespace: default}
spec:
  parentRefs: [{name: web}]
  hostnames: [shop.example.org]
  rules: [{backendRefs: [{name: a, port: 80}]}]
"#,
    );
    let reason = |name: &'static str, kind: &'static str| {
        let cluster = &cluster;
        async move {
            let r = cluster.get("httproutes", "default", name);
            condition(&r["status"]["parents"][0]["conditions"], kind)
                .map(|c| c["reason"].as_str().unwrap_or("").to_string())
        }
    };
    eventually(
        "missing Service → BackendNotFound",
        Duration::from_secs(5),
        async || reason("missing", "ResolvedRefs").await.as_deref() == Some("BackendNotFound"),
    )
    .await;
    eventually(
        "cross-namespace ref → RefNotPermitted",
        Duration::from_secs(5),
        async || reason("crossns", "ResolvedRefs").await.as_deref() == Some("RefNotPermitted"),
    )
    .await;
    eventually(
        "hostname mismatch → NoMatchingListenerHostname",
        Duration::from_secs(5),
        async || reason("wronghost", "Accepted").await.as_deref() == Some("NoMatchingListenerHostname"),
    )
    .await;
    // A ReferenceGrant fixes the cross-namespace reference.
    cluster.apply(
        "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {name: allow, namespace: other}\n\
         spec: {from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: default}], to: [{group: '', kind: Service}]}\n",
    );
    eventually("granted ref resolves", Duration::from_secs(5), async || {
        reason("crossns", "ResolvedRefs").await.as_deref() == Some("ResolvedRefs")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_elect_one_leader_and_fail_over() {
    let cluster = Cluster::start();
    let mut one = cluster.operator("op-1").await;
    let two = cluster.operator("op-2").await;
    let leaders = async || {
        (
            one.metric("ferrum_operator_leader").await.unwrap_or(0.0),
            two.metric("ferrum_operator_leader").await.unwrap_or(0.0),
        )
    };
    eventually("exactly one leader", Duration::from_secs(5), async || {
        let (x, y) = leaders().await;
        x + y == 1.0
    })
    .await;
    let lease = cluster.get("leases", "default", "ferrum-operator");
    let holder = lease["spec"]["holderIdentity"].as_str().unwrap().to_string();
    let (x, _) = leaders().await;
    let first_is_leader = x == 1.0;
    assert!(
        holder.starts_with(if first_is_leader { "op-1" } else { "op-2" }),
        "{holder}"
    );
    // Kill the leader: the other takes over once the lease (3 s) expires.
    let survivor = if first_is_leader {
        one.kill();
        two
    } else {
        drop(two);
        one
    };
    eventually("the survivor leads", Duration::from_secs(10), async || {
        survivor.metric("ferrum_operator_leader").await == Some(1.0)
    })
    .await;
    let lease = cluster.get("leases", "default", "ferrum-operator");
    assert_ne!(lease["spec"]["holderIdentity"].as_str().unwrap(), holder);
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_need_the_token() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let cluster = Cluster::start();
    let op = cluster.operator_with("op-1", &["--token", "s3cret"]).await;
    let port = free_port();
    cluster.apply(&base(port, &a, &b));
    cluster.apply(&route((100, 0)));
    let dir = cluster.dir.path();
    let _intruder = Proxy::start_with(&op.grpc_url(), "intruder", &dir.join("x.json"), &["--token", "guess"]).await;
    let _anonymous = Proxy::start(&op.grpc_url(), "anonymous", &dir.join("y.json")).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        op.admin_json("/proxies").await["proxies"],
        serde_json::json!([]),
        "no stream without the token"
    );
    assert_eq!(
        hit(port, "shop.example.com").await.0,
        0,
        "nothing listens: the proxies got no config"
    );
    let _dp = Proxy::start_with(&op.grpc_url(), "dp-1", &dir.join("z.json"), &["--token", "s3cret"]).await;
    eventually("the proxy with the token serves", Duration::from_secs(10), async || {
        hit(port, "shop.example.com").await == (200, Some("a".into()))
    })
    .await;
    assert_eq!(op.admin_json("/proxies").await["proxies"][0]["nodeId"], "dp-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_routes_reach_backends_over_h2() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let cluster = Cluster::start();
    let op = cluster.operator("op-1").await;
    let port = free_port();
    cluster.apply(&base(port, &a, &b));
    cluster.apply(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: greeter, namespace: default}\n\
         spec:\n  parentRefs: [{name: web}]\n  hostnames: [grpc.example.com]\n  rules:\n  \
         - matches: [{method: {service: helloworld.Greeter, method: SayHello}}]\n    backendRefs: [{name: b, port: 80}]\n",
    );
    let dp = Proxy::start(&op.grpc_url(), "dp-1", &cluster.dir.path().join("c.json")).await;
    // Over HTTP/2 the host is `:authority`, which the URL sets.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .resolve("grpc.example.com", ([127, 0, 0, 1], port).into())
        .build()
        .unwrap();
    let call = || {
        h2.post(format!("http://grpc.example.com:{port}/helloworld.Greeter/SayHello"))
            .header("content-type", "application/grpc")
            .body(vec![0u8, 0, 0, 0, 0])
            .send()
    };
    eventually("the gRPC method routes to b", Duration::from_secs(10), async || {
        call()
            .await
            .is_ok_and(|r| r.headers().get("x-backend").is_some_and(|v| v == "b"))
    })
    .await;
    let v: Value = serde_json::from_str(&call().await.unwrap().text().await.unwrap()).unwrap();
    assert_eq!(v["version"], "HTTP/2.0", "gRPC goes upstream over HTTP/2");
    let other = h2
        .post(format!("http://grpc.example.com:{port}/helloworld.Greeter/Other"))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 404);
    eventually("GRPCRoute Accepted", Duration::from_secs(5), async || {
        let r = cluster.get("grpcroutes", "default", "greeter");
        condition(&r["status"]["parents"][0]["conditions"], "Accepted").is_some_and(|c| c["status"] == "True")
    })
    .await;
    drop(dp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_with_a_role_serves_only_its_gateway() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let cluster = Cluster::start();
    let op = cluster.operator("op-1").await;
    let (web, other) = (free_port(), free_port());
    cluster.apply(&base(web, &a, &b));
    cluster.apply(&route((100, 0)));
    cluster.apply(&format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: other}}\n\
         spec: {{gatewayClassName: ferrum, addresses: [{{type: IPAddress, value: 127.0.0.1}}], listeners: [{{name: http, port: {other}, protocol: HTTP}}]}}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: other}}\n\
         spec: {{parentRefs: [{{name: other}}], rules: [{{backendRefs: [{{name: b, port: 80}}]}}]}}\n"
    ));
    let cache = cluster.dir.path().join("role.json");
    let dp = Proxy::start_with(&op.grpc_url(), "web-1", &cache, &["--role", "gateway/default/web"]).await;
    eventually("the web Gateway serves", Duration::from_secs(10), async || {
        hit(web, "shop.example.com").await == (200, Some("a".into()))
    })
    .await;
    assert_eq!(
        hit(other, "anything").await.0,
        0,
        "the other Gateway's port is not this proxy's"
    );
    let proxies = op.admin_json("/proxies").await;
    assert_eq!(proxies["proxies"][0]["role"], "gateway/default/web");

    // Its Gateway's changes reach it as deltas of its own snapshot.
    cluster.apply(&route((0, 100)));
    eventually("the weight change reaches the role proxy", PROPAGATION, async || {
        hit(web, "shop.example.com").await.1.as_deref() == Some("b")
    })
    .await;
    let p = &op.admin_json("/proxies").await["proxies"][0];
    assert!(p["deltasSent"].as_u64() >= Some(1), "{p}");
    assert!(p["lastRejection"].is_null(), "{p}");
    drop(dp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ferrum_kinds_get_status_and_the_mesh_default_policy_applies() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let cluster = Cluster::start();
    let op = cluster.operator("op-1").await;
    let port = free_port();
    cluster.apply(&base(port, &a, &b));
    cluster.apply(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: ferrum-system}}\n---\n\
         apiVersion: ferrum.dev/v1alpha1\nkind: MeshConfig\nmetadata: {{name: default, namespace: ferrum-system}}\n\
         spec: {{trustDomain: example.org, defaultTrafficPolicy: {{timeouts: {{read: 7s}}}}}}\n---\n\
         apiVersion: ferrum.dev/v1alpha1\nkind: MeshConfig\nmetadata: {{name: stray, namespace: default}}\nspec: {{}}\n---\n\
         apiVersion: ferrum.dev/v1alpha1\nkind: Backend\nmetadata: {{name: pair, namespace: default}}\n\
         spec: {{endpoints: [{{address: 127.0.0.1, port: {}}}, {{address: 127.0.0.1, port: {}}}]}}\n---\n\
         apiVersion: ferrum.dev/v1alpha1\nkind: Backend\nmetadata: {{name: broken, namespace: default}}\n\
         spec: {{endpoints: [{{address: 127.0.0.1, port: 1}}], loadBalancer: {{type: Fastest}}}}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: ferrum-kinds, namespace: default}}\n\
         spec: {{parentRefs: [{{name: web}}], hostnames: [pair.example.com], rules: [{{backendRefs: [\
         {{group: ferrum.dev, kind: Backend, name: pair}}, {{group: ferrum.dev, kind: Backend, name: broken}}]}}]}}\n",
        a.addr.port(),
        b.addr.port()
    ));
    let accepted = |v: &Value| {
        condition(&v["status"]["conditions"], "Accepted")
            .cloned()
            .unwrap_or_default()
    };
    eventually("Backend status written", Duration::from_secs(10), async || {
        let v = cluster.get("backends.ferrum.dev", "default", "pair");
        v["status"]["endpoints"] == 2 && accepted(&v)["status"] == "True"
    })
    .await;
    eventually("an invalid Backend says why", Duration::from_secs(10), async || {
        let r = accepted(&cluster.get("backends.ferrum.dev", "default", "broken"));
        r["status"] == "False" && r["message"].as_str().unwrap_or("").contains("loadBalancer.type")
    })
    .await;
    eventually("MeshConfig status written", Duration::from_secs(10), async || {
        accepted(&cluster.get("meshconfigs.ferrum.dev", "ferrum-system", "default"))["status"] == "True"
            && accepted(&cluster.get("meshconfigs.ferrum.dev", "default", "stray"))["reason"] == "Ignored"
    })
    .await;
    let snapshot = op.admin_json("/snapshot").await;
    let read_ms = snapshot["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "backend/default/pair")
        .map(|c| c["timeouts"]["readMs"].clone());
    assert_eq!(
        read_ms,
        Some(Value::from(7000)),
        "the mesh default read timeout applies"
    );
}

/// A status is written when it changes, not after every generation: the Istio policies keep
/// their resourceVersion while other objects change (each write is an update every watcher of
/// the kind receives — 1,000 policies meant 1,000 PATCHes per route change).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_are_written_when_they_change_not_on_every_generation() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let cluster = Cluster::start();
    cluster.install_istio_crds();
    let _op = cluster.operator("op-1").await;
    cluster.apply(&base(free_port(), &a, &b));
    cluster.apply(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-all, namespace: default}\n\
         spec: {action: ALLOW, rules: [{}]}\n---\n\
         apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: default}\n\
         spec: {mtls: {mode: PERMISSIVE}}\n---\n\
         apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: default, namespace: default}\n\
         spec: {egress: [{hosts: ['./*']}]}\n",
    );
    let kinds = [
        "authorizationpolicies.security.istio.io/allow-all",
        "peerauthentications.security.istio.io/default",
        "sidecars.networking.istio.io/default",
    ];
    let versions = || {
        kinds.map(|k| {
            let (kind, name) = k.split_once('/').unwrap();
            let v = cluster.get(kind, "default", name);
            let accepted = condition(&v["status"]["conditions"], "Accepted").is_some_and(|c| c["status"] == "True");
            (accepted, v["metadata"]["resourceVersion"].clone())
        })
    };
    eventually("the policies are Accepted", Duration::from_secs(20), async || {
        versions().iter().all(|(accepted, _)| *accepted)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = versions();
    // Three generations, each known to be through the status pass by its route's status (routes
    // are written before policies in the pass; a second later the pass is long over).
    for n in 0..3 {
        cluster.apply(&route((1, n + 1)).replace("name: shop", &format!("name: shop-{n}")));
        eventually("the new route's status", Duration::from_secs(20), async || {
            let v = cluster.get("httproutes", "default", &format!("shop-{n}"));
            v["status"]["parents"].as_array().is_some_and(|p| !p.is_empty())
        })
        .await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(versions(), before, "(Accepted, resourceVersion) of {kinds:?}");
}

/// A RequestAuthentication whose `jwksUri` the operator cannot fetch stays in effect and says
/// so on its status — which URI and why — until the issuer serves its keys, then says resolved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfetchable_jwks_uri_is_reported_on_the_request_authentication() {
    let cluster = Cluster::start();
    cluster.install_istio_crds();
    let _op = cluster.operator("op-1").await;
    let jwks_port = free_port();
    let uri = format!("http://127.0.0.1:{jwks_port}/jwks.json");
    cluster.apply(&format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: default}}\n\
         spec: {{jwtRules: [{{issuer: 'https://issuer.example', jwksUri: '{uri}'}}]}}\n"
    ));
    let resolved = || {
        let v = cluster.get("requestauthentications.security.istio.io", "default", "jwt");
        (
            condition(&v["status"]["conditions"], "Accepted")
                .cloned()
                .unwrap_or_default(),
            condition(&v["status"]["conditions"], "ResolvedRefs")
                .cloned()
                .unwrap_or_default(),
        )
    };
    let mut last = Default::default();
    eventually("the refused fetch is on status", Duration::from_secs(20), async || {
        last = resolved();
        last.1["status"] == "False"
    })
    .await;
    let (accepted, refs) = &last;
    assert_eq!(accepted["status"], "True", "the policy stays in effect: {accepted}");
    assert_eq!(refs["reason"], "JwksUnavailable", "{refs}");
    let message = refs["message"].as_str().unwrap();
    assert!(
        message.starts_with(&format!("spec.jwtRules[0].jwksUri: cannot fetch {uri}: ")) && message.contains("refused"),
        "names the field, the URI and the cause: {message}"
    );

    // The issuer comes up: the next retry (every 5 s) fetches and the condition clears.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("jwks.json"),
        r#"{"keys": [{"kty": "EC", "crv": "P-256", "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU", "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#,
    )
    .unwrap();
    let _issuer = Proc(
        std::process::Command::new("python3")
            .args(["-m", "http.server", "--bind", "127.0.0.1", &jwks_port.to_string()])
            .current_dir(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    eventually("the fetched keys resolve it", Duration::from_secs(20), async || {
        last = resolved();
        last.1["status"] == "True"
    })
    .await;
    assert_eq!(last.0["status"], "True");
}

/// Gateway TLS keys travel beside the snapshot, never in it: ferrum-dp serves the Secret's
/// certificate, follows a new key pair, and restarts from its cache (keys in a private file of
/// their own) while the operator is down; neither the operator's nor the proxy's views, nor the
/// snapshot cache, hold a private key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_keys_travel_beside_the_snapshot() {
    use std::os::unix::fs::PermissionsExt;
    let a = Backend::start("a").await;
    let cluster = Cluster::start();
    let mut op = cluster.operator("op-1").await;
    let gw = TlsGateway::apply(&cluster, free_port(), a.addr.port());
    let cert = gw.new_certificate(&cluster);
    let cache = cluster.dir.path().join("dp-tls.json");
    let dp = Proxy::start(&op.grpc_url(), "dp-tls", &cache).await;
    eventually(
        "ferrum-dp serves the Secret's certificate",
        Duration::from_secs(10),
        async || gw.serves_with(&cert).await,
    )
    .await;
    let r = gw.client(&cert, false).get(gw.url()).send().await.unwrap();
    assert_eq!(r.headers()["x-backend"], "a");

    let snapshot = op.admin_json("/snapshot").await.to_string();
    assert!(
        snapshot.contains("default/secure-cert"),
        "the snapshot names the Secret"
    );
    let proxy_view = dp.admin_text("/config").await;
    for (what, text) in [("operator /snapshot", &snapshot), ("ferrum-dp /config", &proxy_view)] {
        assert!(!text.contains("PRIVATE KEY"), "{what} holds a private key");
    }
    let secrets_file = cluster.dir.path().join("dp-tls.secrets.json");
    eventually(
        "the proxy caches its snapshot and keys",
        Duration::from_secs(5),
        async || secrets_file.exists() && cache.exists(),
    )
    .await;
    assert!(!std::fs::read_to_string(&cache).unwrap().contains("PRIVATE KEY"));
    assert!(std::fs::read_to_string(&secrets_file).unwrap().contains("PRIVATE KEY"));
    let mode = std::fs::metadata(&secrets_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the key file is private: {mode:o}");

    // A new key pair in the Secret: the proxy serves it, the old certificate is gone.
    let rotated = gw.new_certificate(&cluster);
    eventually(
        "ferrum-dp serves the new certificate",
        Duration::from_secs(10),
        async || gw.serves_with(&rotated).await,
    )
    .await;
    assert!(!gw.serves_with(&cert).await, "the old certificate is gone");
    let proxies = op.admin_json("/proxies").await;
    assert_eq!(proxies["proxies"][0]["lastRejection"], Value::Null);

    // Operator down, proxy restarted: it serves the cached snapshot with the cached keys.
    op.kill();
    drop(dp);
    let _dp = Proxy::start(&op.grpc_url(), "dp-tls", &cache).await;
    eventually(
        "the restarted proxy serves from its cache",
        Duration::from_secs(10),
        async || gw.serves_with(&rotated).await,
    )
    .await;
}

/// `ferrumctl` against a running operator: `proxies` lists the connected ferrum-dp and that it
/// applied the current snapshot; `diff -f` says nothing would change for what is applied and
/// names the route a changed manifest would change (exit codes 0 and 1, as diff(1)).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ferrumctl_lists_proxies_and_diffs_manifests_against_the_operator() {
    // Every part bound: what a pattern leaves out is dropped (stopped) at once.
    let Serving {
        _backends,
        cluster,
        op,
        port,
        dp: _dp,
    } = serving("dp-ctl").await;
    let ctl = |args: &[&str]| {
        let out = std::process::Command::new(workspace_bin("ferrumctl"))
            .args(args)
            .args(["--operator", &op.admin_url("")])
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    };

    // The route serving does not mean the operator sent its last version: one sent as the
    // objects settle shows as "applying" until the proxy acknowledges it, then "in sync".
    let mut dp = Value::Null;
    eventually(
        "ferrumctl shows the proxy in sync",
        Duration::from_secs(10),
        async || {
            let (code, json) = ctl(&["proxies", "-o", "json"]);
            assert_eq!(code, Some(0), "{json}");
            let rows: Value = serde_json::from_str(&json).unwrap();
            dp = rows
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["node"] == "dp-ctl")
                .cloned()
                .unwrap();
            dp["state"] == "in sync"
        },
    )
    .await;
    assert_eq!(dp["protocol"], "MeshSubscribe", "{dp}");
    eventually("the table shows it too", Duration::from_secs(10), async || {
        let (_, table) = ctl(&["proxies"]);
        table.contains("dp-ctl") && table.contains("in sync")
    })
    .await;

    let file = cluster.dir.path().join("shop.yaml");
    std::fs::write(&file, route((100, 0))).unwrap();
    let (code, text) = ctl(&["diff", "-f", file.to_str().unwrap()]);
    assert_eq!((code, text.trim()), (Some(0), "no changes"));
    std::fs::write(&file, route((0, 100))).unwrap();
    let (code, text) = ctl(&["diff", "-f", file.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("~ route default/shop/") && text.contains("(action)"),
        "{text}"
    );

    // analyze and explain without -f: what the operator holds and serves.
    let (code, text) = ctl(&["analyze"]);
    assert_eq!((code, text.trim()), (Some(0), "no problems found"));
    let (code, text) = ctl(&["explain"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains(&format!("listener 127.0.0.1:{port}")) && text.contains("shop.example.com"),
        "{text}"
    );
    cluster.apply(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: lost, namespace: default}\n\
         spec: {parentRefs: [{name: web}], hostnames: [shop.example.com], rules: [{matches: [{path: {type: PathPrefix, value: /lost}}], backendRefs: [{name: nowhere, port: 80}]}]}\n",
    );
    let mut found = Value::Null;
    eventually(
        "analyze reports the missing backend",
        Duration::from_secs(5),
        async || {
            let (code, json) = ctl(&["analyze", "-o", "json"]);
            found = serde_json::from_str(&json).unwrap_or(Value::Null);
            code == Some(0) && json.contains("BackendNotFound")
        },
    )
    .await;
    let f = found
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["reason"] == "BackendNotFound")
        .unwrap();
    assert_eq!(
        (f["severity"].as_str(), f["object"].as_str()),
        (Some("warning"), Some("HTTPRoute default/lost")),
        "{found}"
    );
    let (code, text) = ctl(&["analyze", "--strict"]);
    assert_eq!(code, Some(1), "warnings fail --strict: {text}");
    cluster.apply(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: broken, namespace: default}\n\
         spec: {parentRefs: [{name: web}], rules: [{matches: [{path: {type: RegularExpression, value: \"/(\"}}], backendRefs: [{name: nowhere, port: 80}]}]}\n",
    );
    eventually("analyze fails on invalid input", Duration::from_secs(5), async || {
        let (code, text) = ctl(&["analyze"]);
        code == Some(1) && text.contains("HTTPRoute default/broken") && text.contains("error")
    })
    .await;
    let (code, text) = std::process::Command::new(workspace_bin("ferrumctl"))
        .args(["analyze", "--operator", "http://127.0.0.1:1"])
        .output()
        .map(|o| (o.status.code(), String::from_utf8_lossy(&o.stderr).into_owned()))
        .unwrap();
    assert_eq!(code, Some(2), "an unreachable operator is not a clean bill: {text}");
    assert!(text.contains("cannot reach the operator"), "{text}");
}

/// A Gateway's proxy that names its pod (`POD_NAME`, `POD_NAMESPACE`) is told its node's zone,
/// so a Service with `trafficDistribution: PreferClose` keeps its requests on the endpoints in
/// that zone; a proxy that does not name its pod balances over both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_proxy_learns_its_zone_and_keeps_prefer_close_traffic_in_it() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let cluster = Cluster::start();
    let op = cluster.operator("op-1").await;
    let port = free_port();
    let endpoint = |be: &Backend, zone: &str| {
        format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: zoned-{zone}, namespace: default, labels: {{kubernetes.io/service-name: zoned}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: {}}}]\nendpoints: [{{addresses: [127.0.0.1], zone: {zone}}}]\n",
            be.addr.port()
        )
    };
    cluster.apply(&format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {{name: ferrum}}\nspec: {{controllerName: ferrum.dev/gateway-controller}}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: web, namespace: default}}\n\
         spec: {{gatewayClassName: ferrum, addresses: [{{type: IPAddress, value: 127.0.0.1}}], listeners: [{{name: http, port: {port}, protocol: HTTP}}]}}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: zoned, namespace: default}}\n\
         spec: {{parentRefs: [{{name: web}}], rules: [{{backendRefs: [{{name: zoned, port: 80}}]}}]}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: zoned, namespace: default}}\n\
         spec: {{trafficDistribution: PreferClose, ports: [{{name: http, port: 80}}]}}\n\
         {}{}---\n\
         apiVersion: v1\nkind: Node\nmetadata: {{name: node-a, labels: {{topology.kubernetes.io/zone: zone-a}}}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: gw-1, namespace: default}}\nspec: {{nodeName: node-a, containers: [{{name: dp}}]}}\n",
        endpoint(&a, "zone-a"),
        endpoint(&b, "zone-b"),
    ));
    let answered = async |n: usize| {
        let mut by = std::collections::BTreeMap::<String, usize>::new();
        for _ in 0..n {
            let (status, backend) = hit(port, "zoned.example.com").await;
            if status == 200 {
                *by.entry(backend.unwrap_or_default()).or_default() += 1;
            }
        }
        by
    };
    // The operator has read what was applied (its caches hold the pod and node by then).
    eventually("the route is accepted", Duration::from_secs(10), async || {
        let r = cluster.get("httproutes", "default", "zoned");
        condition(&r["status"]["parents"][0]["conditions"], "Accepted").is_some_and(|c| c["status"] == "True")
    })
    .await;
    let cache = cluster.dir.path().join("dp-zoned.json");
    let dp = Proxy::start_with(
        &op.grpc_url(),
        "gw-1",
        &cache,
        &["--pod-name", "gw-1", "--pod-namespace", "default"],
    )
    .await;
    eventually("the route serves", Duration::from_secs(10), async || {
        answered(1).await.values().sum::<usize>() == 1
    })
    .await;
    let by = answered(30).await;
    assert_eq!(by.get("a"), Some(&30), "every request stays in zone-a: {by:?}");
    drop(dp);

    // Naming no pod, the proxy knows no zone: both endpoints serve.
    let cache = cluster.dir.path().join("dp-unzoned.json");
    let _dp = Proxy::start(&op.grpc_url(), "gw-2", &cache).await;
    eventually("both zones serve", Duration::from_secs(10), async || {
        let by = answered(30).await;
        by.get("a").is_some_and(|n| *n >= 5) && by.get("b").is_some_and(|n| *n >= 5)
    })
    .await;
}

/// RateLimitPolicies from kubectl: the operator writes `Accepted` (or the field and reason),
/// and a ferrum-dp following it answers 429 past the limit — per user, on the route the
/// policy targets — while the policy that cannot be applied limits nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_policies_are_accepted_and_enforced_by_the_gateway() {
    let Serving {
        _backends,
        cluster,
        op: _op,
        port,
        dp,
    } = serving("dp-rl").await;
    let before = dp.version().await;
    let policy = |name: &str, limit: &str| {
        format!(
            "apiVersion: ferrum.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{name: {name}, namespace: default}}\n\
             spec:\n  targetRefs: [{{group: gateway.networking.k8s.io, kind: HTTPRoute, name: shop}}]\n\
             \x20 rules: [{{clientSelectors: [{{headers: [{{name: x-user, type: Distinct}}]}}], limit: {limit}}}]\n"
        )
    };
    cluster.apply(&format!(
        "{}---\n{}",
        policy("per-user", "{requests: 2, unit: Day}"),
        policy("weekly", "{requests: 1, unit: Week}")
    ));
    let accepted = |name: &str| {
        let p = cluster.get("ratelimitpolicies", "default", name);
        condition(&p["status"]["conditions"], "Accepted").cloned()
    };
    eventually("the policies' status", Duration::from_secs(10), async || {
        accepted("per-user").is_some_and(|c| c["status"] == "True")
            && accepted("weekly").is_some_and(|c| c["status"] == "False")
    })
    .await;
    let refused = accepted("weekly").unwrap();
    assert_eq!(refused["reason"], "UnsupportedValue");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("spec.rules[0].limit.unit"),
        "{refused}"
    );
    eventually("the proxy has the limit", Duration::from_secs(5), async || {
        dp.version().await > before
    })
    .await;
    let get = async |user: &str| {
        client()
            .get(format!("http://127.0.0.1:{port}/"))
            .header("host", "shop.example.com")
            .header("x-user", user)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    let mut got = Vec::new();
    for user in ["ann", "ann", "ann", "bob", "bob", "bob"] {
        got.push(get(user).await);
    }
    assert_eq!(got, [200, 200, 429, 200, 200, 429]);
    assert_eq!(hit(port, "shop.example.com").await.0, 200, "no user: not counted");
}

/// Connections to the operator's gRPC port that never start HTTP/2 are closed: every pod of the
/// mesh can reach that port, and connections left open for ever would use up the operator's
/// file descriptors (as idle ones did ferrum-dp's). A proxy's own stream is untouched.
#[tokio::test]
async fn silent_connections_to_the_operator_are_closed() {
    let cluster = Cluster::start();
    let op = cluster.operator("op-1").await;
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(
            tokio::net::TcpStream::connect((op.host.as_str(), op.grpc))
                .await
                .unwrap(),
        );
    }
    let started = std::time::Instant::now();
    let dir = cluster.dir.path();
    let _dp = Proxy::start(&op.grpc_url(), "dp-1", &dir.join("dp.json")).await;
    // The server's SETTINGS come at once; then the end.
    closed_after(&mut silent, started, Duration::from_secs(10)).await;
    eventually("the proxy's stream stays", Duration::from_secs(5), async || {
        op.admin_json("/proxies").await["proxies"][0]["nodeId"] == "dp-1"
    })
    .await;
}
