//! Istio WorkloadEntries → workloads: something outside Kubernetes (a VM) at one IP address, with
//! labels, a service account and named ports. As in Istio, a Kubernetes Service in its namespace
//! whose selector its labels match has it among its endpoints (at the port its `ports` names for
//! the Service port's name, else the Service's target port), and so does a ServiceEntry whose
//! `workloadSelector` picks it. Labelled `security.istio.io/tlsMode: istio` (a mesh proxy runs
//! beside it), it is reached over HBONE; otherwise in plain TCP. An entry Ferrum cannot apply
//! whole (a DNS name for an address, `network`, a `weight` other than 1, a field it does not
//! read) is left out, its status naming the field.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::ServicePort as KubePort;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::istio::{WorkloadEntry, WorkloadEntrySpec};
use crate::mesh::{MeshEndpoint, Workload};
use crate::resources::Resources;

use super::mesh::TLS_MODE_LABEL;
use super::{Problems, Reason, meta_ref};

/// A field and why the entry cannot be applied.
type Refusal = (String, Reason, String);

/// Reports each entry that cannot be applied, with its field.
pub(crate) fn check(res: &Resources, problems: &mut Problems<'_>) {
    for we in &res.workload_entries {
        if let Err((field, reason, why)) = workload(we) {
            problems.push(&meta_ref("WorkloadEntry", &we.metadata), field, reason, why);
        }
    }
}

/// The workload an entry stands for.
pub(crate) fn workload(we: &WorkloadEntry) -> Result<Workload, Refusal> {
    let (meta, spec) = (&we.metadata, &we.spec);
    let ns = meta.namespace.clone().unwrap_or_else(|| "default".into());
    let name = meta.name.clone().unwrap_or_default();
    let refuse = |field: &str, reason, why: &str| Err((format!("spec.{field}"), reason, why.to_string()));
    if let Some(field) = spec.other.keys().next() {
        return refuse(field, Reason::UnsupportedValue, "not supported");
    }
    let address = spec.address.as_deref().unwrap_or_default();
    let Ok(ip) = address.parse::<IpAddr>() else {
        return refuse(
            "address",
            Reason::Invalid,
            "an IP address is needed (DNS names and Unix sockets are not supported)",
        );
    };
    if spec.network.is_some() {
        return refuse("network", Reason::UnsupportedValue, "one network only");
    }
    if spec.weight.is_some_and(|w| w != 1) {
        return refuse("weight", Reason::UnsupportedValue, "endpoints are balanced evenly");
    }
    if let Some((port, _)) = spec.ports.iter().find(|(_, n)| !(1..=65535).contains(*n)) {
        return Err((
            format!("spec.ports.{port}"),
            Reason::Invalid,
            "ports are 1-65535".into(),
        ));
    }
    let service_account = spec.service_account.clone().unwrap_or_else(|| "default".into());
    if format!("spiffe://x/ns/{ns}/sa/{service_account}")
        .parse::<crate::identity::SpiffeId>()
        .is_err()
    {
        return refuse("serviceAccount", Reason::Invalid, "not a service account name");
    }
    let mut ports: Vec<u16> = spec.ports.values().filter_map(|n| u16::try_from(*n).ok()).collect();
    ports.sort_unstable();
    ports.dedup();
    let labels: BTreeMap<String, String> = spec.labels.clone();
    Ok(Workload {
        uid: uid(we),
        service_account,
        zone: super::mesh::locality_zone(spec.locality.as_deref()),
        node: String::new(),
        hbone: labels.get(TLS_MODE_LABEL).is_some_and(|m| m == "istio"),
        name,
        namespace: ns,
        ips: vec![ip.to_string()],
        labels,
        ports,
    })
}

/// The UID of an entry's workload (`workloadentry/<namespace>/<name>` when the source has none).
pub(crate) fn uid(we: &WorkloadEntry) -> String {
    let meta = &we.metadata;
    meta.uid.clone().unwrap_or_else(|| {
        let ns = meta.namespace.as_deref().unwrap_or("default");
        format!("workloadentry/{ns}/{}", meta.name.as_deref().unwrap_or_default())
    })
}

/// The entries in `ns` that `selector` picks, as endpoints of a Service with `ports`.
pub(crate) fn selected(
    selector: Option<&BTreeMap<String, String>>,
    ns: &str,
    ports: &[&KubePort],
    res: &Resources,
) -> Vec<MeshEndpoint> {
    let Some(sel) = selector.filter(|s| !s.is_empty()) else {
        return Vec::new();
    };
    res.workload_entries
        .iter()
        .filter(|we| we.metadata.namespace.as_deref().unwrap_or("default") == ns)
        .filter(|we| sel.iter().all(|(k, v)| we.spec.labels.get(k) == Some(v)))
        .filter_map(|we| {
            let w = workload(we).ok()?;
            let mapping = ports
                .iter()
                .filter_map(|sp| Some((u16::try_from(sp.port).ok()?, target_port(&we.spec, sp)?)))
                .filter(|(s, _)| *s != 0)
                .collect();
            Some(MeshEndpoint {
                address: w.ips[0].clone(),
                workload: Some(w.uid),
                ports: mapping,
                zone: w.zone,
            })
        })
        .collect()
}

/// Where an entry serves Service port `sp`: the port its `ports` names for the Service port's
/// name, else the Service's target port (a number, or a name in its `ports`), else the Service
/// port itself.
pub(crate) fn target_port(e: &WorkloadEntrySpec, sp: &KubePort) -> Option<u16> {
    let named = |n: &str| e.ports.get(n).map(|p| i64::from(*p));
    let port = match (sp.name.as_deref().and_then(named), &sp.target_port) {
        (Some(n), _) => n,
        (None, Some(IntOrString::Int(n))) => i64::from(*n),
        (None, Some(IntOrString::String(t))) => named(t).unwrap_or(i64::from(sp.port)),
        (None, None) => i64::from(sp.port),
    };
    u16::try_from(port).ok().filter(|p| *p != 0)
}

#[cfg(test)]
mod tests {
    use crate::translate::{Options, Reason, translate};

    /// A VM (`vm-1`, mesh proxy beside it) and a pod, both `app: api`; a Service selecting them
    /// by that label, and a ServiceEntry picking the VM by its own label.
    const MESH: &str = "
apiVersion: v1
kind: Pod
metadata: {name: api-1, namespace: shop, uid: p1, labels: {app: api}}
spec: {serviceAccountName: api, containers: [{name: app, ports: [{name: web, containerPort: 8080}]}]}
status: {podIP: 10.1.0.2}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm-1, namespace: shop}
spec:
  address: 192.168.7.10
  labels: {app: api, host: vm, security.istio.io/tlsMode: istio}
  serviceAccount: api-vm
  locality: eu-west/zone-b/rack-3
  ports: {http: 9080}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec: {clusterIP: 10.96.0.9, selector: {app: api}, ports: [{name: http, port: 80, targetPort: web}, {name: tcp-admin, port: 81, targetPort: 7000}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: legacy, namespace: shop}
spec:
  hosts: [legacy.shop.internal]
  addresses: [240.0.0.9]
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8000}]
  resolution: STATIC
  workloadSelector: {labels: {host: vm}}
";

    fn translated(extra: &str) -> crate::Translation {
        let mut r = crate::Resources::default();
        r.add_yaml("m.yaml", &format!("{MESH}---\n{extra}")).unwrap();
        translate(&r, 1, &Options::default())
    }

    #[test]
    fn a_workload_entry_is_a_workload_that_services_select_by_its_labels() {
        let t = translated("");
        assert!(t.problems.is_empty(), "{:?}", t.problems);
        let vm = t
            .snapshot
            .workloads
            .iter()
            .find(|w| w.name == "vm-1")
            .expect("a workload");
        assert_eq!(
            (
                vm.uid.as_str(),
                vm.service_account.as_str(),
                vm.ips.as_slice(),
                vm.hbone
            ),
            (
                "workloadentry/shop/vm-1",
                "api-vm",
                &["192.168.7.10".to_string()][..],
                true
            )
        );
        assert_eq!((vm.zone.as_deref(), vm.ports.as_slice()), (Some("zone-b"), &[9080][..]));
        let api = t.snapshot.services.iter().find(|s| s.key == "shop/api").unwrap();
        let vm_endpoint = api
            .endpoints
            .iter()
            .find(|e| e.address == "192.168.7.10")
            .expect("the VM");
        assert_eq!(vm_endpoint.workload.as_deref(), Some("workloadentry/shop/vm-1"));
        assert_eq!(
            (vm_endpoint.target_port(80), vm_endpoint.target_port(81)),
            (Some(9080), Some(7000)),
            "port 80 by its name in the entry's ports; 81 at the Service's target port"
        );
        let pod = api
            .endpoints
            .iter()
            .find(|e| e.address == "10.1.0.2")
            .expect("the pod too");
        assert_eq!(pod.target_port(80), Some(8080));
        let legacy = t
            .snapshot
            .services
            .iter()
            .find(|s| s.hostname == "legacy.shop.internal")
            .unwrap();
        let picked: Vec<_> = legacy
            .endpoints
            .iter()
            .map(|e| (e.address.as_str(), e.target_port(80)))
            .collect();
        assert_eq!(
            picked,
            [("192.168.7.10", Some(9080))],
            "the entry's selector picks the VM only"
        );
    }

    #[test]
    fn routes_to_the_service_reach_the_workload_entry() {
        let t = translated(
            "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: to-api, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: api, port: 80}]
  rules:
  - backendRefs: [{name: api, port: 80}]
",
        );
        let c = t.snapshot.cluster("service/shop/api:80").unwrap();
        let mut at: Vec<_> = c.endpoints.iter().map(|e| (e.address.as_str(), e.port)).collect();
        at.sort();
        assert_eq!(at, [("10.1.0.2", 8080), ("192.168.7.10", 9080)]);
        assert_eq!(
            c.endpoints.iter().find(|e| e.port == 9080).unwrap().zone.as_deref(),
            Some("zone-b")
        );
    }

    #[test]
    fn an_entry_that_cannot_be_applied_whole_is_left_out_with_its_field() {
        let entry = |name: &str, spec: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{labels: {{app: api}}, {spec}}}\n---\n"
            )
        };
        let t = translated(
            &[
                entry("dns", "address: vm.example.com"),
                entry("none", "ports: {http: 80}"),
                entry("net", "address: 10.9.0.1, network: other"),
                entry("heavy", "address: 10.9.0.2, weight: 3"),
                entry("port", "address: 10.9.0.3, ports: {http: 70000}"),
                entry("odd", "address: 10.9.0.4, healthCheck: {}"),
            ]
            .concat(),
        );
        let mut keys = t.problem_keys();
        keys.sort();
        assert_eq!(
            keys,
            [
                ("dns", "spec.address", Reason::Invalid),
                ("heavy", "spec.weight", Reason::UnsupportedValue),
                ("net", "spec.network", Reason::UnsupportedValue),
                ("none", "spec.address", Reason::Invalid),
                ("odd", "spec.healthCheck", Reason::UnsupportedValue),
                ("port", "spec.ports.http", Reason::Invalid),
            ]
        );
        let api = t.snapshot.services.iter().find(|s| s.key == "shop/api").unwrap();
        assert_eq!(api.endpoints.len(), 2, "the pod and vm-1 only: {:?}", api.endpoints);
        assert_eq!(t.snapshot.workloads.len(), 2);
    }
}
