//! Istio Sidecar objects → the snapshot's sidecar scopes: which Services the selected
//! workloads' proxies know (`egress[].hosts`) and whether anything else is passed through
//! (`outboundTrafficPolicy`); an egress listener with a `port` admits its hosts on that Service
//! port only. Ingress listeners say where inbound traffic for a workload port is delivered
//! (`defaultEndpoint` on loopback or the pod's own address). Bind addresses, capture mode NONE,
//! ingress TLS and Unix sockets, and egress proxies are not supported: such a Sidecar is left
//! out with a problem on the field, and its workloads fall back to their namespace's or the
//! mesh's default.

use std::sync::Arc;

use crate::istio::{Sidecar, SidecarSpec};
use crate::mesh::{EgressHost, IngressRoute, SidecarScope};
use crate::model::Digest;
use crate::resources::ObjectRef;
use crate::translate::{Problems, Reason, meta_ref};

pub(crate) fn build(sidecars: &[Arc<Sidecar>], problems: &mut Problems<'_>) -> (Vec<Arc<SidecarScope>>, Vec<Digest>) {
    let mut out: Vec<Arc<SidecarScope>> = sidecars
        .iter()
        .filter_map(|s| scope(s, problems))
        .map(Arc::new)
        .collect();
    out.sort_by(|a, b| a.key.cmp(&b.key));
    let digests = out.iter().map(|s| s.digest()).collect();
    (out, digests)
}

fn scope(s: &Sidecar, problems: &mut Problems<'_>) -> Option<SidecarScope> {
    let obj: ObjectRef = meta_ref("Sidecar", &s.metadata);
    let spec = &s.spec;
    let mut ok = supported(spec, &obj, problems);
    let policy = spec.outbound_traffic_policy.as_ref();
    let registry_only = match policy.and_then(|p| p.mode.as_deref()) {
        None | Some("ALLOW_ANY") => false,
        Some("REGISTRY_ONLY") => true,
        Some(other) => {
            problems.push(
                &obj,
                "spec.outboundTrafficPolicy.mode",
                Reason::Invalid,
                format!("{other:?} is not ALLOW_ANY or REGISTRY_ONLY"),
            );
            return None;
        }
    };
    let hosts = egress_hosts(spec, &obj, problems)?;
    let mut ingress = Vec::new();
    for (i, l) in spec.ingress.iter().enumerate() {
        match ingress_route(l) {
            Ok(r) => ingress.extend(r),
            Err((field, reason, why)) => {
                problems.push(&obj, format!("spec.ingress[{i}].{field}"), reason, why);
                ok = false;
            }
        }
    }
    if !ok {
        return None;
    }
    Some(SidecarScope {
        key: format!("Sidecar/{}/{}", obj.namespace, obj.name),
        namespace: obj.namespace.clone(),
        name: obj.name.clone(),
        selector: spec.workload_selector.as_ref().map(|s| s.labels.clone()),
        egress: (!spec.egress.is_empty()).then_some(hosts),
        registry_only,
        ingress,
    })
}

/// Refuses (as problems) what a Sidecar may say that this mesh does not do; `false` if any.
fn supported(spec: &SidecarSpec, obj: &ObjectRef, problems: &mut Problems<'_>) -> bool {
    let mut unsupported = |field: String, what: &str| {
        problems.push(obj, field, Reason::UnsupportedValue, what);
    };
    let mut ok = true;
    let listeners = (spec.egress.iter().map(|e| (&e.bind, &e.capture_mode)).enumerate())
        .map(|(i, l)| (format!("spec.egress[{i}]"), l))
        .chain(
            (spec.ingress.iter().map(|l| (&l.bind, &l.capture_mode)).enumerate())
                .map(|(i, l)| (format!("spec.ingress[{i}]"), l)),
        );
    for (at, (bind, capture_mode)) in listeners {
        if bind.is_some() {
            unsupported(format!("{at}.bind"), "bind addresses are not supported");
            ok = false;
        }
        if capture_mode
            .as_deref()
            .is_some_and(|m| m != "DEFAULT" && m != "IPTABLES")
        {
            unsupported(
                format!("{at}.captureMode"),
                "only DEFAULT and IPTABLES capture are supported",
            );
            ok = false;
        }
    }
    for (i, l) in spec.ingress.iter().enumerate() {
        if l.tls.is_some() {
            unsupported(
                format!("spec.ingress[{i}].tls"),
                "TLS termination on ingress listeners is not supported (mesh traffic arrives over HBONE)",
            );
            ok = false;
        }
    }
    if spec
        .outbound_traffic_policy
        .as_ref()
        .is_some_and(|p| p.egress_proxy.is_some())
    {
        unsupported(
            "spec.outboundTrafficPolicy.egressProxy".into(),
            "egress proxies are not supported",
        );
        ok = false;
    }
    ok
}

/// The egress hosts, each with its listener's port; `None` (a problem noted) when one is invalid.
fn egress_hosts(spec: &SidecarSpec, obj: &ObjectRef, problems: &mut Problems<'_>) -> Option<Vec<EgressHost>> {
    let mut hosts = Vec::new();
    for (i, e) in spec.egress.iter().enumerate() {
        let Ok(port) = port_number(e.port.as_ref()) else {
            problems.push(
                obj,
                format!("spec.egress[{i}].port.number"),
                Reason::Invalid,
                "not a port number",
            );
            return None;
        };
        for (j, h) in e.hosts.iter().enumerate() {
            match egress_host(h) {
                Ok(Some(h)) => hosts.push(EgressHost { port, ..h }),
                Ok(None) => {}
                Err(why) => {
                    problems.push(obj, format!("spec.egress[{i}].hosts[{j}]"), Reason::Invalid, why);
                    return None;
                }
            }
        }
    }
    Some(hosts)
}

/// A listener's `port.number`: absent (`None`), or 1..=65535.
fn port_number(port: Option<&serde_json::Value>) -> Result<Option<u16>, ()> {
    match port.map(|p| p.get("number").and_then(|n| n.as_u64())) {
        None => Ok(None),
        Some(Some(n @ 1..=65535)) => Ok(Some(n as u16)),
        Some(_) => Err(()),
    }
}

/// One ingress listener: its port and where its traffic goes (`None`: nowhere else than
/// usual — no `defaultEndpoint`). Errors name the field.
fn ingress_route(l: &crate::istio::IngressListener) -> Result<Option<IngressRoute>, (&'static str, Reason, String)> {
    let port = match port_number(l.port.as_ref()) {
        Ok(Some(p)) => p,
        _ => {
            return Err((
                "port.number",
                Reason::Invalid,
                "an ingress listener needs a port number".into(),
            ));
        }
    };
    let Some(endpoint) = l.default_endpoint.as_deref().filter(|e| !e.is_empty()) else {
        return Ok(None);
    };
    if endpoint.starts_with("unix://") {
        let why = "Unix domain socket endpoints are not supported".to_string();
        return Err(("defaultEndpoint", Reason::UnsupportedValue, why));
    }
    let addr: std::net::SocketAddr = endpoint.parse().map_err(|_| {
        let why = format!("{endpoint:?} is not IP:PORT (127.0.0.1:PORT, [::1]:PORT, 0.0.0.0:PORT or [::]:PORT)");
        ("defaultEndpoint", Reason::Invalid, why)
    })?;
    if let Some(why) = IngressRoute::refuse(addr) {
        return Err(("defaultEndpoint", Reason::Invalid, why));
    }
    Ok(Some(IngressRoute { port, endpoint: addr }))
}

/// `namespace/dnsName`; `~/…` names no Service (`None`).
fn egress_host(h: &str) -> Result<Option<EgressHost>, String> {
    let Some((ns, host)) = h.split_once('/') else {
        return Err(format!("{h:?} is not namespace/dnsName"));
    };
    if ns.is_empty() || host.is_empty() {
        return Err(format!("{h:?} is not namespace/dnsName"));
    }
    let wildcard_ok = host == "*"
        || host
            .strip_prefix("*.")
            .is_some_and(|s| !s.is_empty() && !s.contains('*'));
    if host.contains('*') && !wildcard_ok {
        return Err(format!("{h:?}: a wildcard is only `*` or a leading `*.`"));
    }
    if ns == "~" {
        return Ok(None);
    }
    Ok(Some(EgressHost {
        namespace: ns.to_string(),
        host: host.to_ascii_lowercase(),
        port: None,
    }))
}

#[cfg(test)]
mod tests {
    use crate::Resources;
    use crate::mesh::sidecar_for;
    use crate::translate::{Options, translate};

    const SERVICES: &str = "
apiVersion: v1
kind: Service
metadata: {name: b, namespace: shop}
spec: {clusterIP: 10.96.0.2, selector: {app: b}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: data}
spec: {clusterIP: 10.96.0.3, selector: {app: db}, ports: [{port: 5432}]}
---
apiVersion: v1
kind: Service
metadata: {name: auth, namespace: ferrum-system}
spec: {clusterIP: 10.96.0.4, selector: {app: auth}, ports: [{port: 80}]}
";

    /// (name, namespace, app label, service account, IP) of the pods beside [`SERVICES`].
    const PODS: [(&str, &str, &str, &str, &str); 4] = [
        ("a", "shop", "a", "a", "10.0.0.1"),
        ("b-1", "shop", "b", "b", "10.0.0.4"),
        ("wide", "shop", "wide", "a", "10.0.0.2"),
        ("c", "data", "c", "c", "10.0.0.3"),
    ];

    fn translated(extra: &str) -> crate::Translation {
        let pods: String = PODS
            .iter()
            .map(|(name, ns, app, sa, ip)| {
                format!(
                    "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: {app}}}}}\n\
                     spec: {{serviceAccountName: {sa}, containers: [{{name: app, image: x}}]}}\nstatus: {{podIP: {ip}}}\n"
                )
            })
            .collect();
        let mut r = Resources::default();
        r.add_yaml("t.yaml", &format!("{SERVICES}{pods}---\n{extra}")).unwrap();
        translate(&r, 1, &Options::default())
    }

    /// (object name, field) of every problem.
    fn problems(t: &crate::Translation) -> Vec<(String, String)> {
        t.problems
            .iter()
            .map(|p| (p.object.name.clone(), p.field.clone()))
            .collect()
    }

    /// The Services the proxy of pod `ns/name` knows, and whether it refuses the rest.
    fn view(t: &crate::Translation, ns: &str, name: &str) -> (Vec<String>, bool) {
        let (services, _, registry_only) = view_with_workloads(t, ns, name);
        (services, registry_only)
    }

    /// [`view`] with the names of the workloads it knows.
    fn view_with_workloads(t: &crate::Translation, ns: &str, name: &str) -> (Vec<String>, Vec<String>, bool) {
        let w = t.snapshot.workload_or_placeholder(ns, name);
        let v = t.snapshot.mesh_view(&t.digests, Some(&w), |_| true);
        assert_eq!(v.hash, v.content_hash());
        let registry_only = sidecar_for(&v.sidecars, &w).is_some_and(|s| s.registry_only);
        (
            v.services.iter().map(|s| s.key.clone()).collect(),
            v.workloads.iter().map(|w| w.name.clone()).collect(),
            registry_only,
        )
    }

    /// Istio's order: a Sidecar selecting the workload, else its namespace's, else the mesh's;
    /// `.` is the client's own namespace, `*` any, `~` none.
    #[test]
    fn a_workload_knows_the_services_its_sidecar_admits() {
        let t = translated(
            "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: default, namespace: ferrum-system}\n\
             spec: {egress: [{hosts: ['./*', 'ferrum-system/*']}]}\n---\n\
             apiVersion: networking.istio.io/v1beta1\nkind: Sidecar\nmetadata: {name: default, namespace: shop}\n\
             spec: {egress: [{hosts: ['./*', '*/db.data.svc.cluster.local']}], outboundTrafficPolicy: {mode: REGISTRY_ONLY}}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: wide, namespace: shop}\n\
             spec: {workloadSelector: {labels: {app: wide}}, egress: [{hosts: ['*/*.svc.cluster.local', '~/*']}]}\n",
        );
        assert!(t.problems.is_empty(), "{:?}", t.problems);
        assert_eq!(t.snapshot.sidecars.len(), 3);
        // shop's default: its own namespace and one named host elsewhere; nothing else passes.
        // It knows the workloads behind those Services, and itself.
        assert_eq!(
            view_with_workloads(&t, "shop", "a"),
            (
                vec!["data/db".into(), "shop/b".into()],
                vec!["a".into(), "b-1".into()],
                true
            )
        );
        // Selected by labels: every cluster-local Service, and passthrough for the rest.
        assert_eq!(
            view(&t, "shop", "wide"),
            (
                vec!["data/db".into(), "ferrum-system/auth".into(), "shop/b".into()],
                false
            )
        );
        // No Sidecar in `data`: the mesh default, where `.` is the workload's own namespace.
        assert_eq!(
            view(&t, "data", "c"),
            (vec!["data/db".into(), "ferrum-system/auth".into()], false)
        );
    }

    /// An egress listener with a port admits its hosts on that Service port only: the proxy
    /// knows the Service without its other ports (and their routes).
    #[test]
    fn a_port_listener_admits_its_hosts_on_that_port_only() {
        let t = translated(
            "apiVersion: v1\nkind: Service\nmetadata: {name: multi, namespace: shop}\n\
             spec: {clusterIP: 10.96.0.9, selector: {app: b}, ports: [{name: http, port: 80}, {name: admin, port: 9000}]}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: default, namespace: shop}\n\
             spec: {egress: [{port: {number: 80, protocol: HTTP, name: http}, hosts: ['./*']}, {hosts: ['data/*']}]}\n",
        );
        assert!(t.problems.is_empty(), "{:?}", t.problems);
        let w = t.snapshot.workload_or_placeholder("shop", "a");
        let v = t.snapshot.mesh_view(&t.digests, Some(&w), |_| true);
        assert_eq!(v.hash, v.content_hash());
        let ports = |key: &str| -> Vec<u16> {
            let s = v.services.iter().find(|s| s.key == key).unwrap();
            s.ports.iter().map(|p| p.port).collect()
        };
        assert_eq!(ports("shop/multi"), [80]);
        assert_eq!(ports("shop/b"), [80]);
        assert_eq!(ports("data/db"), [5432], "a listener without a port: every port");
        let full = t.snapshot.services.iter().find(|s| s.key == "shop/multi").unwrap();
        assert_eq!(full.ports.len(), 2, "the full snapshot keeps both");
    }

    /// A Sidecar added, changed or removed reaches a proxy as a delta like any other part.
    #[test]
    fn sidecar_changes_travel_as_deltas() {
        let sidecar = |mode: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: default, namespace: shop}}\n\
                 spec: {{egress: [{{hosts: ['./*']}}], outboundTrafficPolicy: {{mode: {mode}}}}}\n"
            )
        };
        let steps = [
            translated(""),
            translated(&sidecar("ALLOW_ANY")),
            translated(&sidecar("REGISTRY_ONLY")),
            translated(""),
        ];
        for pair in steps.windows(2) {
            let (a, b) = (&pair[0].snapshot, &pair[1].snapshot);
            assert_ne!(a.hash, b.hash);
            let d = crate::Delta::between(a, b);
            assert!(!d.sidecars.is_empty());
            assert_eq!(&d.apply(a).unwrap(), b);
        }
    }

    #[test]
    fn without_sidecars_every_visible_service_is_known() {
        let t = translated("");
        let (services, workloads, _) = view_with_workloads(&t, "shop", "a");
        assert_eq!((services.len(), workloads.len()), (3, 4));
        assert!(t.snapshot.sidecars.is_empty());
    }

    /// Bad hosts and what is not supported leave the Sidecar out, with the field; the rest
    /// of the mesh keeps its Sidecars.
    #[test]
    fn invalid_or_unsupported_sidecars_are_reported_and_left_out() {
        let t = translated(
            "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: bare, namespace: shop}\n\
             spec: {egress: [{hosts: ['b.shop.svc.cluster.local']}]}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: mid, namespace: shop}\n\
             spec: {workloadSelector: {labels: {app: x}}, egress: [{hosts: ['*/b.*.local']}]}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: ported, namespace: shop}\n\
             spec: {workloadSelector: {labels: {app: y}}, egress: [{port: {number: 70000}, hosts: ['./*']}]}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: mode, namespace: shop}\n\
             spec: {workloadSelector: {labels: {app: z}}, outboundTrafficPolicy: {mode: SOMETIMES}}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: good, namespace: data}\n\
             spec: {egress: [{hosts: ['./*']}]}\n",
        );
        let got = problems(&t);
        assert_eq!(
            got,
            [
                ("bare", "spec.egress[0].hosts[0]"),
                ("mid", "spec.egress[0].hosts[0]"),
                ("mode", "spec.outboundTrafficPolicy.mode"),
                ("ported", "spec.egress[0].port.number"),
            ]
            .map(|(a, b)| (a.to_string(), b.to_string()))
        );
        let keys: Vec<_> = t.snapshot.sidecars.iter().map(|s| s.key.as_str()).collect();
        assert_eq!(keys, ["Sidecar/data/good"]);
        assert_eq!(view(&t, "data", "c").0, ["data/db"]);
    }

    /// Ingress listeners resolve to (workload port, endpoint); a proxy's view keeps its own
    /// Sidecar's. Unix sockets, TLS, other addresses and the proxy's own ports are refused
    /// with the field.
    #[test]
    fn ingress_listeners_say_where_inbound_traffic_goes() {
        use crate::mesh::IngressRoute;
        let t = translated(
            "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: b, namespace: shop}\n\
             spec: {workloadSelector: {labels: {app: b}}, ingress: [\
             {port: {number: 8080, protocol: HTTP, name: http}, defaultEndpoint: '127.0.0.1:7070'},\
             {port: {number: 9000, protocol: TCP, name: echo}, defaultEndpoint: '0.0.0.0:9001'},\
             {port: {number: 9100, protocol: TCP, name: plain}}]}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: unix, namespace: shop}\n\
             spec: {workloadSelector: {labels: {app: u}}, ingress: [{port: {number: 80}, defaultEndpoint: 'unix:///run/app.sock'}]}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: admin, namespace: shop}\n\
             spec: {workloadSelector: {labels: {app: v}}, ingress: [{port: {number: 80}, defaultEndpoint: '127.0.0.1:15000'}]}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: away, namespace: shop}\n\
             spec: {workloadSelector: {labels: {app: w}}, ingress: [{port: {number: 80}, defaultEndpoint: '10.0.0.9:80'}]}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: tls, namespace: shop}\n\
             spec: {workloadSelector: {labels: {app: t}}, ingress: [{port: {number: 443}, defaultEndpoint: '127.0.0.1:8443', tls: {mode: SIMPLE}}]}\n",
        );
        let got = problems(&t);
        assert_eq!(
            got,
            [
                ("admin", "spec.ingress[0].defaultEndpoint"),
                ("away", "spec.ingress[0].defaultEndpoint"),
                ("tls", "spec.ingress[0].tls"),
                ("unix", "spec.ingress[0].defaultEndpoint"),
            ]
            .map(|(a, b)| (a.to_string(), b.to_string()))
        );
        let w = t.snapshot.workload_or_placeholder("shop", "b-1");
        let v = t.snapshot.mesh_view(&t.digests, Some(&w), |_| true);
        let own = sidecar_for(&v.sidecars, &w).expect("b's Sidecar travels with its view");
        let at = |p: u16| own.ingress.iter().find(|r| r.port == p).copied();
        let dst: std::net::SocketAddr = "10.0.0.4:8080".parse().unwrap();
        assert_eq!(at(8080).unwrap().deliver(dst), "127.0.0.1:7070".parse().unwrap());
        assert_eq!(at(9000).unwrap().deliver(dst), "10.0.0.4:9001".parse().unwrap());
        assert_eq!(at(9100), None, "no defaultEndpoint: delivered as usual");
        assert!(IngressRoute::refuse("[::1]:8080".parse().unwrap()).is_none());
        // Another source's snapshot is held to the same rule.
        let mut bad = t.snapshot.clone();
        let mut scope = (*bad.sidecars[0]).clone();
        scope.ingress[0].endpoint = "127.0.0.1:15021".parse().unwrap();
        bad.sidecars[0] = std::sync::Arc::new(scope);
        let errs = crate::validate::validate(&bad).unwrap_err();
        assert!(format!("{errs:?}").contains("ingress[0]"), "{errs:?}");
    }
}
