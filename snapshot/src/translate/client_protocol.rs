//! A Service port that declares no protocol is sniffed in the client's sidecar, whose HTTP
//! clients may speak HTTP/1.1 or HTTP/2 — gRPC among them, which needs HTTP/2 end to end. Its
//! routes send to clusters that speak what the client speaks, as Istio's sidecars do for
//! ports it detects (`USE_DOWNSTREAM_PROTOCOL`): each HTTP/1.1 cluster behind them is replaced
//! by its `#client` variant. Gateways keep the clusters as the Services declare them, as in
//! Istio, where a client's ALPN `h2` says nothing of what the backend speaks.

use std::collections::HashMap;
use std::sync::Arc;

use crate::mesh::MeshService;
use crate::model::Digest;

use super::backends::Clusters;

/// The last translation's rewritten Services, by key: (the digest of the Service as it came,
/// the Service as it went out, its digest).
pub(crate) type Memo = HashMap<String, (Digest, Arc<MeshService>, Digest)>;

/// Points the routes of every sniffed port of `services` at clusters that follow the client's
/// protocol, re-hashing only the Services that change: one that came as last time (its digest),
/// whose clusters are all last translation's, goes out as last time.
pub(crate) fn services(
    services: &mut [Arc<MeshService>],
    digests: &mut [Digest],
    clusters: &mut Clusters<'_>,
    memo: &mut Memo,
) {
    let mut next = Memo::new();
    for (s, digest) in services.iter_mut().zip(digests.iter_mut()) {
        let sniffed = |port: u16| s.ports.iter().any(|p| p.port == port && p.sniffed());
        if !s.routes.iter().any(|t| sniffed(t.port)) {
            continue;
        }
        let tables = || s.routes.iter().filter(|t| sniffed(t.port));
        let names: Vec<&str> = tables().flat_map(|t| &t.routes).flat_map(|r| r.clusters()).collect();
        // Every variant goes into this translation's clusters, rewritten or not.
        let variants: Vec<String> = names.iter().map(|c| clusters.following_client(c)).collect();
        let input = *digest;
        let (out, out_digest) = match memo.remove(&s.key) {
            Some((was, out, d)) if was == input && names.iter().all(|c| clusters.unchanged(c)) => (out, d),
            _ if variants.iter().zip(&names).all(|(v, c)| v == c) => continue,
            _ => {
                let mut with = (**s).clone();
                for table in with.routes.iter_mut().filter(|t| sniffed(t.port)) {
                    for route in &mut table.routes {
                        if route.clusters().any(|c| clusters.following_client(c) != c) {
                            Arc::make_mut(route).rename_clusters(|c| clusters.following_client(c));
                        }
                    }
                }
                let d = with.digest();
                (Arc::new(with), d)
            }
        };
        next.insert(s.key.clone(), (input, out.clone(), out_digest));
        *s = out;
        *digest = out_digest;
    }
    *memo = next;
}

#[cfg(test)]
mod tests {
    use crate::model::UpstreamProtocol;
    use crate::translate::{Options, translate};

    const MESH: &str = "
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: shop}
spec: {clusterIP: 10.96.0.9, selector: {app: echo}, ports: [{port: 9090, targetPort: 9090}, {name: http, port: 80, targetPort: 9090}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo-v1, namespace: shop}
spec: {clusterIP: 10.96.0.10, selector: {app: echo, version: v1}, ports: [{port: 9090, targetPort: 9090}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo-v2, namespace: shop}
spec: {clusterIP: 10.96.0.11, selector: {app: echo, version: v2}, ports: [{name: grpc, port: 9090, targetPort: 9090}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: echo-v1-1, namespace: shop, labels: {kubernetes.io/service-name: echo-v1}}
addressType: IPv4
ports: [{port: 9090}]
endpoints: [{addresses: [10.1.0.2]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: echo-v2-1, namespace: shop, labels: {kubernetes.io/service-name: echo-v2}}
addressType: IPv4
ports: [{name: grpc, port: 9090}]
endpoints: [{addresses: [10.1.0.3]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: echo-1, namespace: shop, labels: {kubernetes.io/service-name: echo}}
addressType: IPv4
ports: [{port: 9090}]
endpoints: [{addresses: [10.1.0.2]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: sniffed, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: echo, port: 9090}]
  rules:
  - matches: [{headers: [{name: x-version, value: v2}]}]
    backendRefs: [{name: echo-v2, port: 9090}]
  - backendRefs: [{name: echo-v1, port: 9090}]
    filters: [{type: RequestMirror, requestMirror: {backendRef: {name: echo, port: 9090}}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: declared, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: echo, port: 80}]
  rules:
  - backendRefs: [{name: echo-v1, port: 9090}]
";

    /// The clusters of each route of `echo`'s table on `port`, mirrors last.
    fn routed(t: &crate::Translation, port: u16) -> Vec<Vec<String>> {
        let echo = t.snapshot.services.iter().find(|s| s.key == "shop/echo").unwrap();
        let table = echo.routes_for(port, "shop").unwrap();
        table
            .routes
            .iter()
            .map(|r| r.clusters().map(String::from).collect())
            .collect()
    }

    #[test]
    fn routes_of_a_port_that_declares_no_protocol_follow_the_clients_protocol() {
        let mut r = crate::Resources::default();
        r.add_yaml("m.yaml", MESH).unwrap();
        let t = translate(&r, 1, &Options::default());
        assert!(t.problems.is_empty(), "{:?}", t.problems);
        assert_eq!(
            routed(&t, 9090),
            [
                vec!["service/shop/echo-v2:9090".to_string()],
                vec![
                    "service/shop/echo-v1:9090#client".to_string(),
                    "service/shop/echo:9090#client".to_string()
                ]
            ],
            "HTTP/1.1 clusters (and mirrors) become variants; a gRPC port's cluster speaks HTTP/2 already"
        );
        let variant = t.snapshot.cluster("service/shop/echo-v1:9090#client").unwrap();
        let base = t.snapshot.cluster("service/shop/echo-v1:9090").unwrap();
        assert!(variant.follow_client_protocol && !base.follow_client_protocol);
        assert_eq!(
            (variant.protocol, &variant.endpoints),
            (UpstreamProtocol::Http1, &base.endpoints),
            "the variant is the cluster, following the client"
        );
        assert_eq!(
            routed(&t, 80),
            [vec!["service/shop/echo-v1:9090".to_string()]],
            "a port declared HTTP keeps the cluster as its Service declares it"
        );
        // A sidecar's view carries the variants.
        let view = t.snapshot.mesh_view(&t.digests, None, |_| true);
        assert!(view.clusters.iter().any(|c| c.name == "service/shop/echo:9090#client"));
        crate::validate(&view).unwrap();
        // The same translation again (the incremental translator's memos): the same snapshot.
        let mut tr = crate::translate::Incremental::new(Options::default());
        let first = tr.translate(&r, 1);
        let again = tr.translate(&r, 2);
        assert_eq!(first.digests.services, again.digests.services);
        assert_eq!(first.digests.clusters, again.digests.clusters);
        assert_eq!(first.snapshot.services, t.snapshot.services);
        let echo = |t: &crate::Translation| {
            t.snapshot
                .services
                .iter()
                .find(|s| s.key == "shop/echo")
                .cloned()
                .unwrap()
        };
        assert!(
            std::sync::Arc::ptr_eq(&echo(&first), &echo(&again)),
            "nothing changed: the rewritten Service is last translation's, not rewritten and hashed again"
        );
        let variant = |t: &crate::Translation| {
            t.snapshot
                .clusters
                .iter()
                .find(|c| c.name == "service/shop/echo-v1:9090#client")
                .cloned()
                .unwrap()
        };
        assert!(std::sync::Arc::ptr_eq(&variant(&first), &variant(&again)));
    }
}
