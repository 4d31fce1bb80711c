//! GAMMA: HTTPRoutes and GRPCRoutes whose parent is a Service route in-mesh traffic to that
//! Service at the client's sidecar (mesh.md). A route in the Service's namespace is a producer
//! route (every client); one elsewhere is a consumer route (clients in its namespace only, and
//! it wins for them). Route hostnames are ignored. Two kinds on one Service port conflict: the
//! older route's kind keeps it, the other gets `Accepted=False`, reason `Conflicted`.

use std::collections::{BTreeMap, BTreeSet};

use foldhash::{HashMap, HashMapExt};
use std::sync::Arc;

use gateway_api::httproutes::HttpRouteParentRefs;

use super::httproute::RouteMemos;
use super::listeners::Host;
use super::virtual_service::VsTable;
use super::{Attachment, Problems, Reason};
use crate::mesh::{MeshService, ServiceRoutes};
use crate::model::{Digest, Route};
use crate::resources::{ObjectRef, Resources};

/// (Service `namespace/name`, port, consumer namespace — `None` for a producer route).
pub(crate) type MeshTarget = (String, u16, Option<String>);

/// The route matches on each mesh target, kept between translations like gateway hosts.
pub(crate) type MeshHosts = BTreeMap<MeshTarget, Host>;

/// The targets of one Service parentRef (every port of the Service unless it names one), or a
/// problem when the Service or the port does not exist.
pub(crate) fn service_parent(
    res: &Resources,
    p: &HttpRouteParentRefs,
    pi: usize,
    obj: &ObjectRef,
    problems: &mut Problems<'_>,
) -> Vec<MeshTarget> {
    let field = format!("spec.parentRefs[{pi}]");
    let ns = p.namespace.clone().unwrap_or_else(|| obj.namespace.clone());
    let svc = res
        .services
        .iter()
        .find(|s| s.metadata.namespace.as_deref() == Some(ns.as_str()) && s.metadata.name.as_deref() == Some(&p.name));
    let Some(svc) = svc else {
        problems.push(
            obj,
            field,
            Reason::NoMatchingParent,
            format!("Service {ns}/{} does not exist", p.name),
        );
        return Vec::new();
    };
    let ports: Vec<u16> = svc
        .spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .filter(|sp| sp.protocol.as_deref().is_none_or(|x| x == "TCP"))
        .filter(|sp| p.port.is_none_or(|want| want == sp.port))
        .filter(|sp| p.section_name.as_ref().is_none_or(|n| sp.name.as_ref() == Some(n)))
        .filter_map(|sp| u16::try_from(sp.port).ok())
        .collect();
    if ports.is_empty() {
        problems.push(
            obj,
            field,
            Reason::NoMatchingParent,
            format!("Service {ns}/{} has no TCP port matching port/sectionName", p.name),
        );
        return Vec::new();
    }
    let consumer = (ns != obj.namespace).then(|| obj.namespace.clone());
    let key = format!("{ns}/{}", p.name);
    problems.attachments.push(Attachment {
        route: obj.clone(),
        parent_ref: pi,
        gateway: ObjectRef {
            kind: "Service",
            namespace: ns,
            name: p.name.clone(),
        },
        listener: String::new(),
    });
    ports
        .into_iter()
        .map(|port| (key.clone(), port, consumer.clone()))
        .collect()
}

/// Puts every mesh target's routes on its Service (re-hashing only those Services), after
/// settling conflicts between route kinds; VirtualServices' tables go where no route is.
pub(crate) fn finish(
    memos: &RouteMemos,
    hosts: &mut MeshHosts,
    services: &mut [Arc<MeshService>],
    digests: &mut [Digest],
    mut istio: Vec<VsTable>,
    problems: &mut Problems<'_>,
) {
    let losers = conflicts(memos, problems);
    let mut tables = route_tables(hosts, &losers);
    // VirtualServices take the Service ports no route table holds, the oldest first.
    istio.sort_by(|a, b| a.rank.cmp(&b.rank));
    let tcp = virtual_service_tables(&istio, &mut tables, problems);
    put_on_services(services, digests, tables, tcp);
}

/// Route tables per Service key.
type Tables<'a> = BTreeMap<&'a str, Vec<ServiceRoutes>>;

/// Each mesh target's routes in key order, without those that lost it to another kind.
fn route_tables<'a>(hosts: &'a mut MeshHosts, losers: &HashMap<MeshTarget, BTreeSet<u64>>) -> Tables<'a> {
    let mut tables: Tables<'a> = BTreeMap::new();
    for (target, h) in hosts.iter_mut() {
        let (key, port, consumer) = target;
        let routes: Vec<Arc<Route>> = match losers.get(target) {
            Some(out) => {
                let mut entries: Vec<_> = h.entries.iter().filter(|e| !out.contains(&e.owner)).collect();
                entries.sort_by(|a, b| a.key.cmp(&b.key));
                entries.iter().map(|e| e.route.clone()).collect()
            }
            None => {
                h.entries.sort_by(|a, b| a.key.cmp(&b.key));
                h.entries.iter().map(|e| e.route.clone()).collect()
            }
        };
        if !routes.is_empty() {
            tables.entry(key.as_str()).or_default().push(ServiceRoutes {
                port: *port,
                consumer: consumer.clone(),
                routes,
            });
        }
    }
    tables
}

/// Adds the tables of VirtualServices (`istio`, in rank order) for the ports `tables` does not
/// hold yet, reporting the others; returns their L4 tables.
fn virtual_service_tables<'a>(
    istio: &'a [VsTable],
    tables: &mut Tables<'a>,
    problems: &mut Problems<'_>,
) -> Tables<'a> {
    let mut tcp: Tables<'a> = BTreeMap::new();
    for t in istio {
        let (key, port, consumer) = &t.target;
        let held = tables
            .get(key.as_str())
            .is_some_and(|v| v.iter().any(|r| r.port == *port && &r.consumer == consumer));
        if held {
            super::virtual_service::push_once(
                problems,
                &t.owner,
                format!("spec.hosts[{}]", t.host),
                Reason::Conflicted,
                format!("an HTTPRoute or an older VirtualService already routes Service {key} port {port}"),
            );
            continue;
        }
        // The port is the VirtualService's, both its tables (an empty HTTP one holds it too).
        tables.entry(key.as_str()).or_default().push(ServiceRoutes {
            port: *port,
            consumer: consumer.clone(),
            routes: t.routes.clone(),
        });
        if !t.tcp.is_empty() {
            tcp.entry(key.as_str()).or_default().push(ServiceRoutes {
                port: *port,
                consumer: consumer.clone(),
                routes: t.tcp.clone(),
            });
        }
    }
    tcp
}

/// Puts the tables on their Services (re-hashing only those).
fn put_on_services(
    services: &mut [Arc<MeshService>],
    digests: &mut [Digest],
    mut tables: Tables<'_>,
    mut tcp: Tables<'_>,
) {
    let keys: BTreeSet<&str> = tables.keys().chain(tcp.keys()).copied().collect();
    for key in keys {
        let Ok(i) = services.binary_search_by(|s| s.key.as_str().cmp(key)) else {
            continue; // A Service the mesh does not serve (ExternalName).
        };
        let mut routes = tables.remove(key).unwrap_or_default();
        routes.retain(|r| !r.routes.is_empty());
        let mut s = (*services[i]).clone();
        let tcp_routes = tcp.remove(key).unwrap_or_default();
        // L4 routes say what a port that declares no protocol carries: its default table (for
        // a traffic policy) would send its HTTP around them.
        let l4_only = |port: u16| {
            tcp_routes.iter().any(|t| t.port == port) && s.ports.iter().any(|p| p.port == port && p.sniffed())
        };
        // Default tables (a Service's or ServiceEntry's, for its traffic policy) give way to these.
        s.routes.retain(|old| {
            !routes.iter().any(|r| r.port == old.port && r.consumer == old.consumer) && !l4_only(old.port)
        });
        s.routes.extend(routes);
        s.routes
            .sort_by(|a, b| (a.port, &a.consumer).cmp(&(b.port, &b.consumer)));
        s.tcp_routes = tcp_routes;
        s.tcp_routes
            .sort_by(|a, b| (a.port, &a.consumer).cmp(&(b.port, &b.consumer)));
        digests[i] = s.digest();
        services[i] = Arc::new(s);
    }
}

/// Per target, the routes (memo ids) that lost it to an older route of another kind; each
/// loser's parentRef gets `Conflicted` and loses its attachment.
fn conflicts(memos: &RouteMemos, problems: &mut Problems<'_>) -> HashMap<MeshTarget, BTreeSet<u64>> {
    let mut claims: HashMap<&MeshTarget, Vec<(String, &ObjectRef, usize, u64)>> = HashMap::new();
    for m in memos.values() {
        for (t, pi) in &m.mesh_targets {
            claims.entry(t).or_default().push((m.created(), &m.obj, *pi, m.id));
        }
    }
    let mut losers: HashMap<MeshTarget, BTreeSet<u64>> = HashMap::new();
    for (t, mut c) in claims {
        if c.iter().all(|x| x.1.kind == c[0].1.kind) {
            continue;
        }
        c.sort_by(|a, b| (&a.0, &a.1.namespace, &a.1.name).cmp(&(&b.0, &b.1.namespace, &b.1.name)));
        let winner = c[0].1.kind;
        for (_, obj, pi, id) in c.into_iter().filter(|x| x.1.kind != winner) {
            losers.entry(t.clone()).or_default().insert(id);
            let field = format!("spec.parentRefs[{pi}]");
            if problems.list.iter().any(|p| &p.object == obj && p.field == field) {
                continue;
            }
            problems.push(
                obj,
                field,
                Reason::Conflicted,
                format!("an older {winner} already routes Service {} port {}", t.0, t.1),
            );
            problems.detached.push((obj.clone(), pi));
        }
    }
    losers
}

#[cfg(test)]
mod tests {
    use crate::model::Action;
    use crate::translate::{Options, Reason, translate};

    const MESH: &str = "
apiVersion: v1
kind: Pod
metadata: {name: b1, namespace: shop, labels: {app: b, version: v1, security.istio.io/tlsMode: istio}}
spec: {containers: [{name: app, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.1.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: b2, namespace: shop, labels: {app: b, version: v2, security.istio.io/tlsMode: istio}}
spec: {containers: [{name: app, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.1.0.3}
---
apiVersion: v1
kind: Service
metadata: {name: b, namespace: shop}
spec: {clusterIP: 10.96.0.9, selector: {app: b}, ports: [{name: http, port: 80, targetPort: http}, {name: admin, port: 81, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: b-v1, namespace: shop}
spec: {clusterIP: 10.96.0.10, selector: {app: b, version: v1}, ports: [{name: http, port: 80, targetPort: http}]}
---
apiVersion: v1
kind: Service
metadata: {name: b-v2, namespace: shop}
spec: {clusterIP: 10.96.0.11, selector: {app: b, version: v2}, ports: [{name: http, port: 80, targetPort: http}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: split, namespace: shop, creationTimestamp: '2026-01-01T00:00:00Z'}
spec:
  parentRefs: [{group: '', kind: Service, name: b, port: 80}]
  hostnames: [ignored.example.com]
  rules:
  - backendRefs: [{name: b-v1, port: 80, weight: 80}, {name: b-v2, port: 80, weight: 20}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mine, namespace: client, creationTimestamp: '2026-01-02T00:00:00Z'}
spec:
  parentRefs: [{group: '', kind: Service, name: b, namespace: shop, port: 80}]
  rules:
  - backendRefs: [{name: b-v2, namespace: shop, port: 80}]
";

    fn resources(extra: &str) -> crate::Resources {
        let mut r = crate::Resources::default();
        r.add_yaml("m.yaml", &format!("{MESH}---\n{extra}")).unwrap();
        r
    }

    #[test]
    fn service_parents_put_producer_and_consumer_routes_on_the_service_port() {
        let t = translate(&resources(""), 1, &Options::default());
        assert!(t.problems.is_empty(), "{:?}", t.problems);
        let b = t.snapshot.services.iter().find(|s| s.key == "shop/b").unwrap();
        assert_eq!(b.routes.len(), 2, "one producer and one consumer table on port 80 only");
        let producer = b.routes_for(80, "other").unwrap();
        assert_eq!(producer.consumer, None);
        assert_eq!(
            producer.routes[0].timeouts.per_try_ms(15_000),
            None,
            "a mesh route without timeouts has none"
        );
        let Action::Forward(split) = &producer.routes[0].action else {
            panic!()
        };
        let weights: Vec<_> = split.iter().map(|w| (w.cluster.clone().unwrap(), w.weight)).collect();
        assert_eq!(
            weights,
            [
                ("service/shop/b-v1:80".to_string(), 80),
                ("service/shop/b-v2:80".to_string(), 20)
            ]
        );
        let consumer = b.routes_for(80, "client").unwrap();
        assert_eq!(consumer.consumer.as_deref(), Some("client"));
        assert!(
            b.routes_for(81, "client").is_none(),
            "port 81 is not a parent: plain balancing"
        );
        // The backends' clusters carry the selector's pods (no EndpointSlices here).
        let c = t.snapshot.cluster("service/shop/b-v1:80").unwrap();
        assert_eq!(
            (c.endpoints[0].address.as_str(), c.endpoints[0].port),
            ("10.1.0.2", 8080)
        );
        // Both routes are accepted by their Service parent.
        let parents: Vec<_> = t
            .attachments
            .iter()
            .map(|a| (a.route.name.as_str(), a.gateway.kind))
            .collect();
        assert_eq!(parents, [("mine", "Service"), ("split", "Service")]);
        // A sidecar's view carries the clusters those routes send to, and no others.
        let view = t.snapshot.mesh_view(&t.digests, None, |_| true);
        let mut names: Vec<_> = view.clusters.iter().map(|c| c.name.as_str()).collect();
        names.sort();
        assert_eq!(names, ["service/shop/b-v1:80", "service/shop/b-v2:80"]);
        assert!(view.is_whole(), "the view's hash is its content's");
        crate::validate(&view).unwrap();
    }

    #[test]
    fn a_missing_service_or_port_is_no_matching_parent_and_other_kinds_conflict() {
        let extra = "
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: nosvc, namespace: shop}
spec: {parentRefs: [{group: '', kind: Service, name: nope}], rules: [{backendRefs: [{name: b-v1, port: 80}]}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: noport, namespace: shop}
spec: {parentRefs: [{group: '', kind: Service, name: b, port: 90}], rules: [{backendRefs: [{name: b-v1, port: 80}]}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: late, namespace: shop, creationTimestamp: '2026-02-01T00:00:00Z'}
spec: {parentRefs: [{group: '', kind: Service, name: b, port: 80}], rules: [{backendRefs: [{name: b-v1, port: 80}]}]}
";
        let t = translate(&resources(extra), 1, &Options::default());
        let reasons = t.problem_keys();
        assert_eq!(
            reasons,
            [
                ("late", "spec.parentRefs[0]", Reason::Conflicted),
                ("noport", "spec.parentRefs[0]", Reason::NoMatchingParent),
                ("nosvc", "spec.parentRefs[0]", Reason::NoMatchingParent),
            ]
        );
        assert!(
            t.problems.iter().all(|p| p.reason.is_condition()),
            "status, not invalid input"
        );
        let b = t.snapshot.services.iter().find(|s| s.key == "shop/b").unwrap();
        let producer = b.routes_for(80, "shop").unwrap();
        assert_eq!(
            producer.routes.len(),
            1,
            "the GRPCRoute lost the port to the older HTTPRoute"
        );
        assert!(producer.routes[0].name.starts_with("shop/split/"));
        assert!(!t.attachments.iter().any(|a| a.route.name == "late"));
    }

    #[test]
    fn a_single_gateway_scope_ignores_service_parents() {
        let opts = Options {
            gateway: Some(crate::resources::ObjectRef {
                kind: "Gateway",
                namespace: "shop".into(),
                name: "gw".into(),
            }),
            ..Options::default()
        };
        let t = translate(&resources(""), 1, &opts);
        assert!(t.snapshot.clusters.is_empty() && t.snapshot.services.is_empty());
        assert!(t.problems.is_empty(), "{:?}", t.problems);
    }
}
