//! Default routes: a Service port declared HTTP (its `appProtocol`, else Istio's port-name
//! prefix; a ServiceEntry port's `protocol`) is served request by request in the client's
//! sidecar — one route to the Service's own cluster — wherever that changes what balancing
//! connections gives: a traffic policy for the Service (a DestinationRule, a BackendPolicy)
//! then applies to each request, and the requests of an HTTP/2 or gRPC port, which one
//! connection carries, spread over its endpoints instead of staying on the first one picked.
//! Other HTTP ports stay at L4, where a sidecar relays bytes for less than it parses requests —
//! unless the MeshConfig says `httpRouting: Always`, Istio's way (every declared HTTP port).
//! A port that declares no protocol gets one where a policy applies, as Istio's protocol
//! detection would serve its HTTP: the sidecar sniffs, and routes HTTP/1 and HTTP/2 requests
//! (to clusters that follow the client's protocol, see `client_protocol`).
//! GAMMA routes and VirtualServices replace a port's default table.

use std::collections::HashSet;
use std::sync::Arc;

use crate::crd::HttpRouting;
use crate::mesh::{HttpProtocol, MeshService, ServiceRoutes};
use crate::model::{Digest, Route, WeightedCluster};
use crate::resources::Resources;

use super::backends::{BackendRef, Clusters};

/// `s` with a default route on each port that gets one (`policy`: a traffic policy applies to
/// the service), to the cluster `clusters` resolves for the port with `resolve`; `None` when no
/// port gets one. Each route retries as Istio's default route does unless its cluster has a
/// retry policy of its own (a BackendPolicy's).
pub(crate) fn table(
    s: &MeshService,
    policy: bool,
    clusters: &mut Clusters<'_>,
    mut resolve: impl FnMut(&mut Clusters<'_>, u16) -> Option<String>,
) -> Option<MeshService> {
    let routes: Vec<ServiceRoutes> = s
        .ports
        .iter()
        .filter(|p| match p.http() {
            Some(HttpProtocol::Http2) => true,
            Some(HttpProtocol::Http1) => policy,
            // Undeclared: sniffed, its HTTP served by the route.
            None => policy && p.sniffed(),
        })
        .filter_map(|p| {
            let c = resolve(clusters, p.port)?;
            let own_retry = clusters.built(&c).is_some_and(|c| c.retry.is_some());
            let target = WeightedCluster {
                cluster: Some(c.clone()),
                weight: 1,
                headers: None,
            };
            let mut route = Route::forward(c, vec![target]);
            // As Istio's default route: no timeout (long polls and gRPC streams are the app's).
            route.timeouts.unbounded = true;
            route.retry = (!own_retry).then(super::virtual_service::istio_default_retry);
            Some(ServiceRoutes {
                port: p.port,
                consumer: None,
                routes: vec![Arc::new(route)],
            })
        })
        .collect();
    if routes.is_empty() {
        return None;
    }
    let mut with = s.clone();
    with.routes = routes;
    Some(with)
}

/// Whether the mesh routes every declared HTTP port (MeshConfig `httpRouting: Always`).
pub(crate) fn always(res: &Resources) -> bool {
    super::backends::mesh_config(res).and_then(|m| m.spec.http_routing) == Some(HttpRouting::Always)
}

/// Gives the Kubernetes Services their default tables (re-hashing only those Services).
pub(crate) fn services(
    services: &mut [Arc<MeshService>],
    digests: &mut [Digest],
    res: &Resources,
    clusters: &mut Clusters<'_>,
) {
    let ruled = with_policy(res);
    let always = always(res);
    for (s, digest) in services.iter_mut().zip(digests.iter_mut()) {
        if !s.ports.iter().any(|p| p.http().is_some() || p.sniffed()) {
            continue;
        }
        let Some((ns, name)) = s.key.split_once('/') else {
            continue;
        };
        let policy = always || ruled.contains(&(ns, name));
        let with = table(s, policy, clusters, |clusters, port| {
            clusters
                .resolve("Service", ns, &BackendRef::service(ns, name, port))
                .ok()
        });
        if let Some(with) = with {
            *digest = with.digest();
            *s = Arc::new(with);
        }
    }
}

/// The Services (namespace, name) a DestinationRule or a BackendPolicy applies to.
fn with_policy(res: &Resources) -> HashSet<(&str, &str)> {
    let mut out: HashSet<(&str, &str)> = HashSet::new();
    if !res.destination_rules.is_empty() {
        out.extend(super::destination_rule::by_service(res).into_keys());
    }
    for p in &res.backend_policies {
        let ns = p.metadata.namespace.as_deref().unwrap_or("default");
        let services = p
            .spec
            .target_refs
            .iter()
            .filter(|t| t.group.is_empty() && t.kind == "Service");
        out.extend(services.map(|t| (ns, t.name.as_str())));
    }
    out
}

#[cfg(test)]
mod tests {
    use crate::model::{Action, HashOn, LbPolicy, UpstreamProtocol};
    use crate::translate::{Options, translate};

    /// Five Services: ports declared HTTP/1.1 (by name), gRPC (by name), h2c (by appProtocol),
    /// MySQL, and undeclared; DestinationRules for `web` and `legacy`, a BackendPolicy for `api`.
    const MESH: &str = "
apiVersion: v1
kind: Pod
metadata: {name: w-1, namespace: shop, uid: u1, labels: {app: w}}
spec: {serviceAccountName: w, containers: [{name: app, ports: [{containerPort: 8080}]}]}
status: {podIP: 10.1.0.2}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.1, selector: {app: w}, ports: [{name: http-web, port: 80, targetPort: 8080}, {name: tcp, port: 81, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: plain, namespace: shop}
spec: {clusterIP: 10.96.0.2, selector: {app: w}, ports: [{name: http, port: 80, targetPort: 8080}, {port: 82, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: greeter, namespace: shop}
spec: {clusterIP: 10.96.0.3, selector: {app: w}, ports: [{name: grpc, port: 9090, targetPort: 8080}, {name: web, port: 9091, targetPort: 8080, appProtocol: kubernetes.io/h2c}]}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec: {clusterIP: 10.96.0.4, selector: {app: w}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: legacy, namespace: shop}
spec: {clusterIP: 10.96.0.5, selector: {app: w}, ports: [{port: 80, targetPort: 8080}, {name: mysql, port: 3306, targetPort: 8080}, {name: web, port: 8081, targetPort: 8080, appProtocol: custom}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: legacy, namespace: shop}
spec: {host: legacy, trafficPolicy: {outlierDetection: {consecutive5xxErrors: 3}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: shop}
spec: {host: web, trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}}
---
apiVersion: ferrum.dev/v1alpha1
kind: BackendPolicy
metadata: {name: api, namespace: shop}
spec: {targetRefs: [{group: '', kind: Service, name: api}], loadBalancer: {type: LeastRequest}, retry: {attempts: 1}}
";

    fn translated(extra: &str) -> crate::Translation {
        let mut r = crate::Resources::default();
        r.add_yaml("m.yaml", &format!("{MESH}---\n{extra}")).unwrap();
        let t = translate(&r, 1, &Options::default());
        assert!(t.problems.is_empty(), "{:?}", t.problems);
        t
    }

    /// (port, the cluster its producer table's only route forwards to) per routed port.
    fn defaults(t: &crate::Translation, key: &str) -> Vec<(u16, String)> {
        let s = t.snapshot.services.iter().find(|s| s.key == key).unwrap();
        s.routes
            .iter()
            .map(|r| {
                assert_eq!((r.consumer.as_deref(), r.routes.len()), (None, 1), "{key}");
                let Action::Forward(to) = &r.routes[0].action else {
                    panic!()
                };
                (r.port, to[0].cluster.clone().unwrap())
            })
            .collect()
    }

    #[test]
    fn declared_http_ports_with_a_policy_and_every_grpc_port_are_routed_to_their_service() {
        let t = translated("");
        assert_eq!(
            defaults(&t, "shop/web"),
            [(80, "service/shop/web:80".to_string())],
            "the rule's Service: its HTTP port, not its TCP one"
        );
        let web = t.snapshot.cluster("service/shop/web:80").unwrap();
        assert_eq!(
            web.lb,
            LbPolicy::ConsistentHash(HashOn::Header("x-user".into())),
            "the rule applies"
        );
        assert_eq!(defaults(&t, "shop/api"), [(80, "service/shop/api:80".to_string())]);
        assert_eq!(
            t.snapshot.cluster("service/shop/api:80").unwrap().lb,
            LbPolicy::LeastRequest
        );
        assert!(
            defaults(&t, "shop/plain").is_empty(),
            "HTTP/1.1 without a policy is balanced per connection"
        );
        assert_eq!(
            defaults(&t, "shop/legacy"),
            [
                (80, "service/shop/legacy:80#client".to_string()),
                (8081, "service/shop/legacy:8081#client".to_string())
            ],
            "ports that declare nothing (no name, an appProtocol Istio does not know) are sniffed \
             where a policy applies; MySQL is not"
        );
        assert_eq!(
            defaults(&t, "shop/greeter"),
            [
                (9090, "service/shop/greeter:9090".to_string()),
                (9091, "service/shop/greeter:9091".to_string())
            ],
            "gRPC by name, h2c by appProtocol"
        );
        for port in [9090, 9091] {
            let c = t.snapshot.cluster(&format!("service/shop/greeter:{port}")).unwrap();
            assert_eq!(c.protocol, UpstreamProtocol::Http2, "{port}");
        }
        let greeter = t.snapshot.services.iter().find(|s| s.key == "shop/greeter").unwrap();
        let route = &greeter.routes_for(9090, "shop").unwrap().routes[0];
        assert_eq!(
            route.timeouts.per_try_ms(15_000),
            None,
            "no timeout, as Istio's default route"
        );
        let retry = route.retry.as_ref().expect("Istio's default retries");
        let on: Vec<&str> = retry.on.iter().map(String::as_str).collect();
        assert_eq!(
            (retry.attempts, on.as_slice()),
            (2, &["connect-failure", "reset", "503"][..])
        );
        let api = t.snapshot.services.iter().find(|s| s.key == "shop/api").unwrap();
        let route = &api.routes_for(80, "shop").unwrap().routes[0];
        assert_eq!(route.retry, None, "the BackendPolicy's own retries apply");
        // A sidecar's view carries the default routes' clusters.
        let view = t.snapshot.mesh_view(&t.digests, None, |_| true);
        assert!(view.clusters.iter().any(|c| c.name == "service/shop/greeter:9090"));
        crate::validate(&view).unwrap();
    }

    #[test]
    fn the_mesh_config_may_route_every_declared_http_port() {
        let t = translated(
            "apiVersion: ferrum.dev/v1alpha1
kind: MeshConfig
metadata: {name: default, namespace: ferrum-system}
spec: {httpRouting: Always}
",
        );
        assert_eq!(
            defaults(&t, "shop/plain"),
            [
                (80, "service/shop/plain:80".to_string()),
                (82, "service/shop/plain:82#client".to_string())
            ],
            "its HTTP port, and its undeclared one (sniffed, as Istio does), without a policy"
        );
        assert_eq!(
            defaults(&t, "shop/web"),
            [(80, "service/shop/web:80".to_string())],
            "not a port declared TCP"
        );
    }

    #[test]
    fn mesh_routes_replace_a_ports_default_table() {
        let t = translated(
            "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: to-api, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: greeter, port: 9090}]
  rules:
  - backendRefs: [{name: api, port: 80}]
",
        );
        assert_eq!(
            defaults(&t, "shop/greeter"),
            [
                (9090, "service/shop/api:80".to_string()),
                (9091, "service/shop/greeter:9091".to_string())
            ],
            "the route holds 9090; 9091 keeps its default"
        );
    }
}
