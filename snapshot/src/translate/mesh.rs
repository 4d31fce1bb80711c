//! Pods → workloads and Services → mesh services (with their endpoints), for sidecars.
//!
//! Endpoints come from the Service's EndpointSlices when it has any (a cluster), else from its
//! selector over the Pods (file mode, where nobody runs the endpoint controller).

use std::collections::BTreeMap;

use foldhash::{HashMap, HashMapExt};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Pod, Service};

use crate::istio::WorkloadEntry;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::mesh::{MeshEndpoint, MeshService, ServicePort, Workload};
use crate::model::Digest;
use crate::resources::Resources;

/// The DNS domain of Service host names.
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// The label Istio's injector sets on pods that have a mesh proxy (peers then use mTLS/HBONE).
pub const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";

pub(crate) type Parts = (Vec<Arc<Workload>>, Vec<Arc<MeshService>>);

/// What the last build made, by the address of the objects it came from: objects the operator's
/// caches hand out unchanged are the same `Arc`, so their parts (and digests) are reused.
#[derive(Default)]
pub(crate) struct MeshMemo {
    pods: HashMap<usize, (Arc<Pod>, Option<Part<Workload>>)>,
    services: HashMap<usize, ServiceMemo>,
    /// The last build's inputs (held, so their addresses stay unique) and what it made: a
    /// translation where no Pod, Service or EndpointSlice changed (a route change) reuses it all.
    last: Option<(Inputs, Built)>,
}

pub(crate) type Built = (Parts, (Vec<Digest>, Vec<Digest>));

struct Inputs {
    pods: Vec<Arc<Pod>>,
    services: Vec<Arc<Service>>,
    slices: Vec<Arc<EndpointSlice>>,
    nodes: Vec<Arc<Node>>,
    outside: Vec<Arc<WorkloadEntry>>,
}

fn same<T>(a: &[Arc<T>], b: &[Arc<T>]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| Arc::ptr_eq(x, y))
}

impl Inputs {
    fn of(res: &Resources) -> Inputs {
        Inputs {
            pods: res.pods.clone(),
            services: res.services.clone(),
            slices: res.endpoint_slices.clone(),
            nodes: res.nodes.clone(),
            outside: res.workload_entries.clone(),
        }
    }

    fn same(&self, res: &Resources) -> bool {
        same(&self.pods, &res.pods)
            && same(&self.services, &res.services)
            && same(&self.slices, &res.endpoint_slices)
            && same(&self.nodes, &res.nodes)
            && same(&self.outside, &res.workload_entries)
    }
}

/// Each node's zone, by node name.
type NodeZones<'a> = HashMap<&'a str, &'a str>;

fn node_zones(res: &Resources) -> NodeZones<'_> {
    res.nodes
        .iter()
        .filter_map(|n| Some((n.metadata.name.as_deref()?, node_zone(n)?)))
        .collect()
}

/// A node's zone label (or the older, deprecated one).
pub fn node_zone(n: &Node) -> Option<&str> {
    let labels = n.metadata.labels.as_ref()?;
    labels
        .get("topology.kubernetes.io/zone")
        .or_else(|| labels.get("failure-domain.beta.kubernetes.io/zone"))
        .map(String::as_str)
}

/// The zone of an Istio locality, `region/zone/subzone`.
pub fn locality_zone(locality: Option<&str>) -> Option<String> {
    locality?.split('/').nth(1).filter(|z| !z.is_empty()).map(String::from)
}

struct ServiceMemo {
    service: Arc<Service>,
    slices: Vec<Arc<EndpointSlice>>,
    built: Option<Part<MeshService>>,
}

/// A built part and its digest.
type Part<T> = (Arc<T>, Digest);

fn addr<T>(a: &Arc<T>) -> usize {
    Arc::as_ptr(a) as usize
}

/// The mesh collections (in key order) and their digests, reusing what `memo` has.
pub(crate) fn build(res: &Resources, memo: &mut MeshMemo) -> Built {
    if let Some((inputs, built)) = &memo.last
        && inputs.same(res)
    {
        return built.clone();
    }
    let built = build_changed(res, memo);
    memo.last = Some((Inputs::of(res), built.clone()));
    built
}

fn build_changed(res: &Resources, memo: &mut MeshMemo) -> Built {
    // A workload's zone is its node's: when nodes change, nothing built before is kept; nor
    // when WorkloadEntries do, which any Service's selector may pick.
    if !memo
        .last
        .as_ref()
        .is_some_and(|(i, _)| same(&i.nodes, &res.nodes) && same(&i.outside, &res.workload_entries))
    {
        memo.pods.clear();
        memo.services.clear();
    }
    let (workloads, workload_digests) = workloads(res, memo);
    let by_ip: HashMap<&str, &Workload> = workloads
        .iter()
        .flat_map(|w| w.ips.iter().map(move |ip| (ip.as_str(), &**w)))
        .collect();
    let previous = memo.last.take();
    let moved = previous.as_ref().map(|(_, ((before, _), _))| moved(before, &by_ip));
    // A reused Service's endpoints name the workloads the last build found at their addresses:
    // only addresses whose workload changed since need a look (none, when no pod moved).
    let owner_unchanged = |e: &MeshEndpoint| {
        moved.as_ref().is_some_and(|m| !m.contains(e.address.as_str()))
            || by_ip.get(e.address.as_str()).map(|w| w.uid.as_str()) == e.workload.as_deref()
    };
    let slices = slices_by_service(res);
    let mut services_memo = HashMap::with_capacity(res.services.len());
    let mut built: Vec<(Arc<MeshService>, Digest)> = Vec::with_capacity(res.services.len());
    for svc in &res.services {
        let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
        let name = svc.metadata.name.as_deref().unwrap_or("");
        let own: Vec<Arc<EndpointSlice>> = slices
            .get(&(ns, name))
            .map(|v| v.iter().map(|e| (*e).clone()).collect())
            .unwrap_or_default();
        let reuse = memo.services.remove(&addr(svc)).filter(|m| {
            // From the selector, endpoints depend on every pod: only slices make it reusable.
            Arc::ptr_eq(&m.service, svc)
                && !own.is_empty()
                && m.slices.len() == own.len()
                && m.slices.iter().zip(&own).all(|(a, b)| Arc::ptr_eq(a, b))
                && m.built
                    .as_ref()
                    .is_none_or(|(s, _)| s.endpoints.iter().all(owner_unchanged))
        });
        let made = match reuse {
            Some(m) => m.built,
            None => service(svc, res, &own, &by_ip).map(|s| {
                let d = s.digest();
                (Arc::new(s), d)
            }),
        };
        built.extend(made.clone());
        services_memo.insert(
            addr(svc),
            ServiceMemo {
                service: svc.clone(),
                slices: own,
                built: made,
            },
        );
    }
    memo.services = services_memo;
    built.sort_by(|a, b| a.0.key.cmp(&b.0.key));
    let (services, service_digests): (Vec<_>, Vec<_>) = built.into_iter().unzip();
    ((workloads, services), (workload_digests, service_digests))
}

/// The workloads of the pods (reusing those of pods `memo` saw unchanged) and the
/// WorkloadEntries, one per uid in uid order, with their digests.
fn workloads(res: &Resources, memo: &mut MeshMemo) -> (Vec<Arc<Workload>>, Vec<Digest>) {
    let zones = node_zones(res);
    let mut pods = HashMap::with_capacity(res.pods.len());
    let mut built: Vec<(Arc<Workload>, Digest)> = Vec::with_capacity(res.pods.len());
    for p in &res.pods {
        let w = match memo.pods.remove(&addr(p)) {
            Some((same, w)) if Arc::ptr_eq(&same, p) => w,
            _ => workload(p, &zones).map(|w| {
                let d = w.digest();
                (Arc::new(w), d)
            }),
        };
        built.extend(w.clone());
        pods.insert(addr(p), (p.clone(), w));
    }
    memo.pods = pods;
    built.extend(res.workload_entries.iter().filter_map(|we| {
        let w = super::workload_entry::workload(we).ok()?;
        let d = w.digest();
        Some((Arc::new(w), d))
    }));
    built.sort_by(|a, b| a.0.uid.cmp(&b.0.uid));
    built.dedup_by(|a, b| a.0.uid == b.0.uid);
    built.into_iter().unzip()
}

/// EndpointSlices by (namespace, Service name), so each Service finds its own without a scan.
pub(crate) fn slices_by_service(res: &Resources) -> HashMap<(&str, &str), Vec<&Arc<EndpointSlice>>> {
    let mut slices: HashMap<(&str, &str), Vec<&Arc<EndpointSlice>>> = HashMap::new();
    for e in &res.endpoint_slices {
        if let Some(svc) = e
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("kubernetes.io/service-name"))
        {
            let ns = e.metadata.namespace.as_deref().unwrap_or("default");
            slices.entry((ns, svc.as_str())).or_default().push(e);
        }
    }
    slices
}

/// The addresses whose workload in `by_ip` is not the one `before` had there (or that only one
/// of them has), each side keyed as the builds key it (the last workload by uid wins).
fn moved<'a>(before: &'a [Arc<Workload>], by_ip: &HashMap<&'a str, &'a Workload>) -> foldhash::HashSet<&'a str> {
    let was: HashMap<&str, &str> = before
        .iter()
        .flat_map(|w| w.ips.iter().map(move |ip| (ip.as_str(), w.uid.as_str())))
        .collect();
    let mut moved: foldhash::HashSet<&str> = by_ip
        .iter()
        .filter(|(ip, w)| was.get(*ip) != Some(&w.uid.as_str()))
        .map(|(ip, _)| *ip)
        .collect();
    moved.extend(was.keys().filter(|ip| !by_ip.contains_key(*ip)));
    moved
}

/// A pod's IP addresses, the primary first; only addresses that parse.
pub(crate) fn pod_ips(p: &Pod) -> Vec<String> {
    let status = p.status.as_ref();
    let mut ips: Vec<String> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|v| v.iter().map(|ip| ip.ip.clone()).collect())
        .unwrap_or_default();
    if let Some(ip) = status.and_then(|s| s.pod_ip.clone())
        && !ips.contains(&ip)
    {
        ips.insert(0, ip);
    }
    // The API server validates these; files and fuzzers do not.
    ips.retain(|ip| ip.parse::<std::net::IpAddr>().is_ok());
    ips
}

fn workload(p: &Pod, zones: &NodeZones) -> Option<Workload> {
    let meta = &p.metadata;
    let (ns, name) = (
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone()?,
    );
    let status = p.status.as_ref();
    if status
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|ph| ph == "Succeeded" || ph == "Failed")
    {
        return None;
    }
    let ips = pod_ips(p);
    if ips.is_empty() {
        return None;
    }
    let spec = p.spec.as_ref();
    let service_account = spec
        .and_then(|s| s.service_account_name.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".into());
    // A workload must have an identity; names the API server would refuse give none.
    format!("spiffe://x/ns/{ns}/sa/{service_account}")
        .parse::<crate::identity::SpiffeId>()
        .ok()?;
    let labels: BTreeMap<String, String> = meta.labels.clone().unwrap_or_default();
    let mut ports: Vec<u16> = spec
        .into_iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| u16::try_from(p.container_port).ok())
        .collect();
    ports.sort_unstable();
    ports.dedup();
    let node = spec.and_then(|s| s.node_name.clone()).unwrap_or_default();
    Some(Workload {
        uid: meta.uid.clone().unwrap_or_else(|| format!("{ns}/{name}")),
        service_account,
        zone: zones.get(node.as_str()).map(|z| z.to_string()),
        node,
        hbone: labels.get(TLS_MODE_LABEL).is_some_and(|m| m == "istio"),
        name,
        namespace: ns,
        ips,
        labels,
        ports,
    })
}

fn pod_ready(p: &Pod) -> bool {
    // A pod with no reported conditions (file mode) is taken as ready.
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_none_or(|c| c.status == "True")
}

/// Istio's annotation that limits which namespaces see a Service.
pub const EXPORT_TO_ANNOTATION: &str = "networking.istio.io/exportTo";

/// The namespaces `networking.istio.io/exportTo` names, as [`exported_to`] reads them.
fn export_to(s: &Service, ns: &str) -> Vec<String> {
    let Some(v) = s
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(EXPORT_TO_ANNOTATION))
    else {
        return Vec::new();
    };
    exported_to(v.split(','), ns)
}

/// The namespaces an `exportTo` list names (`.`: the object's own; `*`: all, which is also the
/// default; `~`: none), sorted; empty for all.
pub(crate) fn exported_to<'a>(names: impl Iterator<Item = &'a str>, ns: &str) -> Vec<String> {
    let mut out: Vec<String> = names
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(|n| if n == "." { ns.to_string() } else { n.to_string() })
        .collect();
    if out.is_empty() || out.iter().any(|n| n == "*") {
        return Vec::new();
    }
    out.sort();
    out.dedup();
    out
}

/// A Service of the mesh: its TCP ports, cluster IPs and endpoints (its EndpointSlices', else
/// the pods its selector picks, and the WorkloadEntries it selects); none for an ExternalName.
fn service(
    s: &Service,
    res: &Resources,
    slices: &[Arc<EndpointSlice>],
    by_ip: &HashMap<&str, &Workload>,
) -> Option<MeshService> {
    let (ns, name) = (
        s.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
        s.metadata.name.clone()?,
    );
    let spec = s.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let tcp: Vec<&k8s_openapi::api::core::v1::ServicePort> = spec
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().is_none_or(|x| x == "TCP"))
        .collect();
    let ports = tcp
        .iter()
        .filter_map(|p| {
            Some(ServicePort {
                port: u16::try_from(p.port).ok().filter(|p| *p != 0)?,
                name: p.name.clone().unwrap_or_default(),
                app_protocol: p.app_protocol.clone(),
            })
        })
        .collect();
    let mut endpoints: Vec<MeshEndpoint> = if slices.is_empty() {
        selected(spec, &ns, &tcp, res)
    } else {
        slices.iter().flat_map(|e| from_slice(e, &tcp)).collect()
    };
    // No endpoint controller slices WorkloadEntries: the selector picks them here.
    endpoints.extend(super::workload_entry::selected(spec.selector.as_ref(), &ns, &tcp, res));
    of_workloads(&mut endpoints, by_ip);
    Some(MeshService {
        key: format!("{ns}/{name}"),
        hostname: format!("{name}.{ns}.svc.{CLUSTER_DOMAIN}"),
        vips: vips(spec),
        ports,
        endpoints,
        routes: Vec::new(),
        tcp_routes: Vec::new(),
        export_to: export_to(s, &ns),
        resolution: Default::default(),
        by_host: false,
        locality_failover: matches!(
            spec.traffic_distribution.as_deref(),
            Some("PreferClose" | "PreferSameZone")
        ),
    })
}

/// A Service's cluster IPs, the primary first.
fn vips(spec: &k8s_openapi::api::core::v1::ServiceSpec) -> Vec<String> {
    let mut vips: Vec<String> = spec.cluster_ips.clone().unwrap_or_default();
    if let Some(ip) = &spec.cluster_ip
        && !vips.contains(ip)
    {
        vips.insert(0, ip.clone());
    }
    vips.retain(|ip| ip.parse::<std::net::IpAddr>().is_ok());
    vips
}

/// Each endpoint with the workload at its address (and that workload's zone, when the slice
/// gave none); sorted by address, one per address.
fn of_workloads(endpoints: &mut Vec<MeshEndpoint>, by_ip: &HashMap<&str, &Workload>) {
    for e in endpoints.iter_mut() {
        let w = by_ip.get(e.address.as_str());
        e.workload = w.map(|w| w.uid.clone());
        if e.zone.is_none() {
            e.zone = w.and_then(|w| w.zone.clone());
        }
    }
    endpoints.sort_by(|a, b| a.address.cmp(&b.address));
    endpoints.dedup_by(|a, b| a.address == b.address);
}

/// Whether an address of `family` (IPv6: true) is one of the Service's: its `ipFamilies`, else
/// its cluster IPs' families; any when it says neither (a headless Service without them).
fn has_family(spec: &k8s_openapi::api::core::v1::ServiceSpec, v6: bool) -> bool {
    let declared = spec.ip_families.iter().flatten().map(|f| f == "IPv6");
    let ips = spec.cluster_ips.iter().flatten().chain(&spec.cluster_ip);
    let from_ips = ips
        .filter_map(|ip| ip.parse::<std::net::IpAddr>().ok())
        .map(|ip| ip.is_ipv6());
    let mut families: Vec<bool> = declared.collect();
    if families.is_empty() {
        families = from_ips.collect();
    }
    families.is_empty() || families.contains(&v6)
}

fn from_slice(
    e: &k8s_openapi::api::discovery::v1::EndpointSlice,
    ports: &[&k8s_openapi::api::core::v1::ServicePort],
) -> Vec<MeshEndpoint> {
    let mapping: Vec<(u16, u16)> = ports
        .iter()
        .filter_map(|sp| {
            let target = e
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref().unwrap_or("") == sp.name.as_deref().unwrap_or(""))?
                .port?;
            Some((u16::try_from(sp.port).ok()?, u16::try_from(target).ok()?))
        })
        .filter(|(s, t)| *s != 0 && *t != 0)
        .collect();
    e.endpoints
        .iter()
        .filter(|ep| ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
        .flat_map(|ep| ep.addresses.iter().map(move |a| (a, &ep.zone)))
        .filter(|(a, _)| a.parse::<std::net::IpAddr>().is_ok())
        .map(|(a, zone)| MeshEndpoint {
            address: a.clone(),
            workload: None,
            ports: mapping.clone(),
            zone: zone.clone(),
        })
        .collect()
}

/// The endpoints of a Service (`spec`, in `ns`) on `ports`, from its selector over the Pods:
/// each ready pod's addresses of the Service's families.
pub(crate) fn selected(
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
    ns: &str,
    ports: &[&k8s_openapi::api::core::v1::ServicePort],
    res: &Resources,
) -> Vec<MeshEndpoint> {
    let Some(sel) = spec.selector.as_ref().filter(|s| !s.is_empty()) else {
        return Vec::new();
    };
    res.pods
        .iter()
        .filter(|p| p.metadata.namespace.as_deref().unwrap_or("default") == ns)
        .filter(|p| {
            let labels = p.metadata.labels.as_ref();
            sel.iter().all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
        })
        .filter(|p| pod_ready(p))
        .filter_map(|p| {
            let w = workload(p, &NodeZones::default())?;
            let mapping: Vec<(u16, u16)> = ports
                .iter()
                .filter_map(|sp| Some((u16::try_from(sp.port).ok()?, target_port(sp, p)?)))
                .filter(|(s, t)| *s != 0 && *t != 0)
                .collect();
            // The pod's addresses of the Service's families, as the endpoint controller slices
            // them (one slice per family): an IPv4-only Service has no IPv6 endpoint, whose app
            // may listen on IPv4 alone. The zone comes from the workload the address is found
            // to be.
            let own = move |a: &String| has_family(spec, a.contains(':'));
            Some(w.ips.into_iter().filter(own).map(move |address| MeshEndpoint {
                address,
                workload: None,
                ports: mapping.clone(),
                zone: None,
            }))
        })
        .flatten()
        .collect()
}

/// A Service port's target on one pod: a number, or a container port's name.
fn target_port(sp: &k8s_openapi::api::core::v1::ServicePort, p: &Pod) -> Option<u16> {
    match &sp.target_port {
        None => u16::try_from(sp.port).ok(),
        Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
        Some(IntOrString::String(name)) => p
            .spec
            .iter()
            .flat_map(|s| &s.containers)
            .flat_map(|c| c.ports.iter().flatten())
            .find(|cp| cp.name.as_deref() == Some(name))
            .and_then(|cp| u16::try_from(cp.container_port).ok()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESH: &str = "
apiVersion: v1
kind: Pod
metadata: {name: b-1, namespace: shop, uid: u-b1, labels: {app: b, security.istio.io/tlsMode: istio}}
spec: {serviceAccountName: b-sa, nodeName: n1, containers: [{name: app, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: b-2, namespace: shop, labels: {app: b}}
spec: {containers: [{name: app, ports: [{name: http, containerPort: 9090}]}]}
status: {podIP: 10.0.0.3, conditions: [{type: Ready, status: 'True'}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b-3, namespace: shop, labels: {app: b}}
spec: {containers: [{name: app}]}
status: {podIP: 10.0.0.4, conditions: [{type: Ready, status: 'False'}]}
---
apiVersion: v1
kind: Pod
metadata: {name: done, namespace: shop, labels: {app: b}}
spec: {containers: [{name: app}]}
status: {podIP: 10.0.0.5, phase: Succeeded}
---
apiVersion: v1
kind: Service
metadata: {name: b, namespace: shop}
spec: {clusterIP: 10.96.0.10, selector: {app: b}, ports: [{port: 80, targetPort: http}, {port: 53, protocol: UDP}]}
";

    #[test]
    fn pods_become_workloads_and_selectors_resolve_named_ports_per_pod() {
        let mut r = Resources::default();
        r.add_yaml("mesh.yaml", MESH).unwrap();
        let ((workloads, services), _) = build(&r, &mut MeshMemo::default());
        assert_eq!(
            workloads.iter().map(|w| w.uid.as_str()).collect::<Vec<_>>(),
            ["shop/b-2", "shop/b-3", "u-b1"],
            "finished pods are not workloads"
        );
        let b1 = &workloads[2];
        assert_eq!(
            (b1.service_account.as_str(), b1.node.as_str(), b1.hbone),
            ("b-sa", "n1", true)
        );
        assert_eq!(
            b1.identity("cluster.local").to_string(),
            "spiffe://cluster.local/ns/shop/sa/b-sa"
        );
        assert_eq!(workloads[0].service_account, "default");
        assert!(!workloads[0].hbone);
        let s = &services[0];
        assert_eq!(
            (s.key.as_str(), s.hostname.as_str()),
            ("shop/b", "b.shop.svc.cluster.local")
        );
        assert_eq!(s.vips, ["10.96.0.10"]);
        assert_eq!(s.ports.len(), 1, "UDP ports are not proxied");
        let eps: Vec<_> = s
            .endpoints
            .iter()
            .map(|e| (e.address.as_str(), e.workload.as_deref(), e.target_port(80)))
            .collect();
        // b-3 is not ready; b-1 listens on 8080 and b-2 on 9090 under the same port name.
        assert_eq!(
            eps,
            [
                ("10.0.0.2", Some("u-b1"), Some(8080)),
                ("10.0.0.3", Some("shop/b-2"), Some(9090))
            ]
        );
    }

    /// A dual-stack pod is an endpoint of a Service in the Service's families only, as the
    /// endpoint controller slices it: an IPv4-only Service's app may listen on IPv4 alone.
    #[test]
    fn a_dual_stack_pod_is_reached_in_its_services_families() {
        let service = |name: &str, spec: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\n\
                 spec: {{selector: {{app: d}}, ports: [{{name: http, port: 80}}], {spec}}}\n---\n"
            )
        };
        let yaml = [
            "apiVersion: v1\nkind: Pod\nmetadata: {name: d-1, namespace: shop, labels: {app: d}}\n\
             spec: {containers: [{name: app}]}\nstatus: {podIP: 10.0.0.7, podIPs: [{ip: 10.0.0.7}, {ip: 'fd00::7'}]}\n---\n"
                .to_string(),
            service("v4", "clusterIP: 10.96.0.7"),
            service("both", "clusterIP: 10.96.0.8, clusterIPs: [10.96.0.8, 'fd00:96::8']"),
            service("v6", "ipFamilies: [IPv6], clusterIP: None"),
            service("any", "clusterIP: None"),
        ]
        .concat();
        let mut r = Resources::default();
        r.add_yaml("dual.yaml", &yaml).unwrap();
        let ((_, services), _) = build(&r, &mut MeshMemo::default());
        let addresses = |name: &str| {
            let s = services.iter().find(|s| s.key == format!("shop/{name}")).unwrap();
            s.endpoints.iter().map(|e| e.address.clone()).collect::<Vec<_>>()
        };
        assert_eq!(addresses("v4"), ["10.0.0.7"]);
        assert_eq!(addresses("both"), ["10.0.0.7", "fd00::7"]);
        assert_eq!(addresses("v6"), ["fd00::7"]);
        assert_eq!(
            addresses("any"),
            ["10.0.0.7", "fd00::7"],
            "a Service that says no family"
        );
        // The cluster a route sends to (a gateway's, or a sidecar's routing every HTTP port
        // per request), alike.
        r.add_yaml(
            "mesh-config.yaml",
            "apiVersion: ferrum.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: default, namespace: ferrum-system}\nspec: {httpRouting: Always}\n",
        )
        .unwrap();
        let t = crate::translate(&r, 1, &Default::default());
        let endpoints = |name: &str| {
            let c = t.snapshot.cluster(&format!("service/shop/{name}:80"));
            let c = c.unwrap_or_else(|| panic!("{name}: {:#?}", t.snapshot.clusters));
            c.endpoints.iter().map(|e| e.address.clone()).collect::<Vec<_>>()
        };
        assert_eq!(endpoints("v4"), ["10.0.0.7"]);
        assert_eq!(endpoints("both"), ["10.0.0.7", "fd00::7"]);
    }

    /// The operator's path: objects shared between translations are reused with their digests,
    /// and the hash (of the whole and of a sidecar's view) is still what a consumer recomputes.
    #[test]
    fn an_address_taken_over_by_another_pod_names_the_new_workload() {
        let pod = |name: &str, ip: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, uid: u-{name}, labels: {{app: c}}}}\n\
                 spec: {{containers: [{{name: app}}]}}\nstatus: {{podIP: {ip}}}\n"
            )
        };
        let cluster = format!(
            "{}---\n{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: c, namespace: shop}}\n\
             spec: {{clusterIP: 10.96.0.20, ports: [{{name: http, port: 80}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: c-1, namespace: shop, labels: {{kubernetes.io/service-name: c}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{{addresses: [10.0.0.9]}}, {{addresses: [10.0.0.8]}}]\n",
            pod("old", "10.0.0.9"),
            pod("other", "10.0.0.8")
        );
        let mut r = Resources::default();
        r.add_yaml("c.yaml", &cluster).unwrap();
        let mut inc = crate::Incremental::new(Default::default());
        let owners = |t: &crate::translate::Translation| -> Vec<Option<String>> {
            t.snapshot.services[0]
                .endpoints
                .iter()
                .map(|e| e.workload.clone())
                .collect()
        };
        assert_eq!(
            owners(&inc.translate(&r, 1)),
            [Some("u-other".into()), Some("u-old".into())]
        );
        // The pod at 10.0.0.9 is replaced by another one with the same address; the Service and
        // its slice are the same objects.
        let mut next = Resources::default();
        next.add_yaml("p.yaml", &pod("new", "10.0.0.9")).unwrap();
        let i = r
            .pods
            .iter()
            .position(|p| p.metadata.name.as_deref() == Some("old"))
            .unwrap();
        r.pods[i] = next.pods[0].clone();
        let got = inc.translate(&r, 2);
        assert_eq!(owners(&got), [Some("u-other".into()), Some("u-new".into())]);
        assert_eq!(got.snapshot, crate::translate(&r, 2, &Default::default()).snapshot);
    }

    #[test]
    fn reused_parts_keep_hashes_a_consumer_can_check() {
        let mut r = Resources::default();
        r.add_yaml("mesh.yaml", MESH).unwrap();
        let mut inc = crate::Incremental::new(Default::default());
        let first = inc.translate(&r, 1);
        assert_eq!(first.snapshot.hash, first.snapshot.content_hash());
        // Same objects again: the very same parts come back.
        let again = inc.translate(&r, 2);
        assert!(Arc::ptr_eq(&first.snapshot.workloads[0], &again.snapshot.workloads[0]));
        // One pod changes (a new object, as a watch delivers it).
        let mut pod = (*r.pods[0]).clone();
        pod.metadata
            .labels
            .get_or_insert_default()
            .insert("version".into(), "v2".into());
        r.pods[0] = Arc::new(pod);
        let next = inc.translate(&r, 3);
        assert_ne!(next.snapshot.hash, again.snapshot.hash);
        assert_eq!(next.snapshot.hash, next.snapshot.content_hash());
        let view = next.snapshot.mesh_view(&next.digests, None, |_| true);
        assert_eq!(view.hash, view.content_hash());
        assert!(view.listeners.is_empty() && view.workloads.len() == 3);
    }

    /// `networking.istio.io/exportTo`: a sidecar's view holds the Services its namespace sees,
    /// and its hash is still one a consumer recomputes.
    #[test]
    fn export_to_limits_which_sidecars_see_a_service() {
        let mut r = Resources::default();
        let extra = |name: &str, export: &str| {
            format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop, annotations: {{networking.istio.io/exportTo: \"{export}\"}}}}\n\
                 spec: {{clusterIP: 10.96.1.{}, ports: [{{port: 80}}]}}\n",
                name.len()
            )
        };
        r.add_yaml(
            "mesh.yaml",
            &format!(
                "{MESH}{}{}{}",
                extra("private", "."),
                extra("partners", "bank, shop"),
                extra("public", "*")
            ),
        )
        .unwrap();
        let t = crate::translate(&r, 1, &Default::default());
        let export = |key: &str| {
            t.snapshot
                .services
                .iter()
                .find(|s| s.key == key)
                .unwrap()
                .export_to
                .clone()
        };
        assert_eq!(export("shop/private"), ["shop"]);
        assert_eq!(export("shop/partners"), ["bank", "shop"]);
        assert!(export("shop/public").is_empty() && export("shop/b").is_empty());
        let seen = |ns: &str| {
            let v = t.snapshot.mesh_view(
                &t.digests,
                Some(&t.snapshot.workload_or_placeholder(ns, "client")),
                |_| true,
            );
            assert_eq!(v.hash, v.content_hash());
            v.services.iter().map(|s| s.key.clone()).collect::<Vec<_>>()
        };
        assert_eq!(seen("shop"), ["shop/b", "shop/partners", "shop/private", "shop/public"]);
        assert_eq!(seen("bank"), ["shop/b", "shop/partners", "shop/public"]);
        assert_eq!(seen("other"), ["shop/b", "shop/public"]);
    }

    #[test]
    fn endpoint_slices_win_over_the_selector() {
        let mut r = Resources::default();
        r.add_yaml(
            "mesh.yaml",
            &format!(
                "{MESH}---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: b-x, namespace: shop, labels: {{kubernetes.io/service-name: b}}}}
addressType: IPv4
ports: [{{name: '', port: 7000}}]
endpoints: [{{addresses: [10.0.0.3]}}, {{addresses: [10.0.0.9], conditions: {{ready: false}}}}]
"
            ),
        )
        .unwrap();
        let ((_, services), _) = build(&r, &mut MeshMemo::default());
        let e = &services[0].endpoints;
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!((e[0].address.as_str(), e[0].target_port(80)), ("10.0.0.3", Some(7000)));
    }
}
