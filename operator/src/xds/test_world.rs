//! A small world for the ADS streams' unit tests: a Gateway routing to Services, published.

use std::collections::BTreeSet;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;

use ferrum_snapshot::Resources;

use super::ads::Ads;
use crate::publish::Publisher;

pub const CONTROLLER: &str = "ferrum.dev/gateway-controller";

/// A Gateway routing to `services`, each a Service with one endpoint at `10.0.<i>.<host>`.
pub fn world(services: &[&str], host: u8) -> Resources {
    let mut y = format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {{name: ferrum}}\n\
         spec: {{controllerName: {CONTROLLER}}}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: gw, namespace: default}}\n\
         spec:\n  gatewayClassName: ferrum\n  listeners: [{{name: http, port: 8080, protocol: HTTP}}]\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: default}}\n\
         spec:\n  parentRefs: [{{name: gw}}]\n  rules:\n"
    );
    for s in services {
        y += &format!(
            "  - matches: [{{path: {{type: PathPrefix, value: /{s}}}}}]\n    backendRefs: [{{name: {s}, port: 80}}]\n"
        );
    }
    for (i, s) in services.iter().enumerate() {
        y += &format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {s}, namespace: default}}\n\
             spec: {{ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {s}-1, namespace: default, labels: {{kubernetes.io/service-name: {s}}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{{addresses: [10.0.{i}.{host}]}}]\n"
        );
    }
    let mut r = Resources::default();
    r.add_yaml("world.yaml", &y).unwrap();
    r
}

pub fn cluster(s: &str) -> String {
    format!("service/default/{s}:80")
}

pub fn ads(publisher: Arc<Publisher>) -> Arc<Ads> {
    // Not consulted here: the gRPC service checks access before a stream starts.
    let client = kube::Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap())).unwrap();
    let (pods, _) = kube::runtime::reflector::store();
    let (nodes, _) = kube::runtime::reflector::store();
    let access = crate::subscribe::Access {
        token: None,
        auth: Arc::new(crate::ca::service::Kubernetes::new(
            client,
            "test".into(),
            crate::ca::service::Workloads {
                pods,
                nodes,
                entries: kube::runtime::reflector::store().0,
            },
        )),
        trusted_namespaces: vec![],
        required: false,
    };
    Arc::new(Ads::new(publisher, Default::default(), Arc::new(access)))
}

/// The cluster names of `services`.
pub fn clusters(services: &[&str]) -> BTreeSet<String> {
    services.iter().map(|s| cluster(s)).collect()
}

/// A publisher that has published `world(services, host)`, and ADS over it.
pub fn published(services: &[&str], host: u8) -> (Arc<Publisher>, Arc<Ads>) {
    let publisher = Publisher::new(CONTROLLER.into());
    publisher.publish(world(services, host));
    let ads = ads(publisher.clone());
    (publisher, ads)
}

/// The node every test client says it is.
pub fn node() -> Option<Node> {
    Some(Node {
        id: "envoy-1".into(),
        ..Default::default()
    })
}
