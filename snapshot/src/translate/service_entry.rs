//! Istio ServiceEntries → mesh services: hosts outside the registry at the addresses their
//! clients dial, for sidecars — one service per host, keyed `namespace/entry/host`. Where a
//! connection goes follows `resolution`: `STATIC` to the endpoints listed (or the pods
//! `workloadSelector` picks), `DNS` to names the proxy resolves when it connects (the hosts
//! themselves when no endpoints are listed), `NONE` to the address dialled. An entry Ferrum
//! cannot apply whole (an address range, a Unix socket, endpoint weights or networks, a field it
//! does not read) is left out with a problem on the field.

use std::net::IpAddr;
use std::sync::Arc;

use crate::istio::{ServiceEntry, ServiceEntrySpec, WorkloadEntry, WorkloadEntrySpec};
use crate::mesh::{MeshEndpoint, MeshService, Resolution, ServicePort, Workload};
use crate::model::Digest;
use crate::resources::Resources;
use crate::translate::{Problems, Reason, meta_ref};
use crate::validate::is_dns_name;
use foldhash::HashMap;

use super::backends::Clusters;
use super::mesh::locality_zone;

/// A field and why the entry cannot be applied.
type Refusal = (String, Reason, String);

fn invalid(field: impl Into<String>, why: impl Into<String>) -> Refusal {
    (field.into(), Reason::Invalid, why.into())
}

fn unsupported(field: impl Into<String>, why: impl Into<String>) -> Refusal {
    (field.into(), Reason::UnsupportedValue, why.into())
}

/// The mesh services of every entry that can be applied, with their digests.
pub(crate) fn build(
    entries: &[Arc<ServiceEntry>],
    workloads: &[Arc<Workload>],
    outside: &[Arc<WorkloadEntry>],
    problems: &mut Problems<'_>,
) -> Vec<(Arc<MeshService>, Digest)> {
    // WorkloadEntries by their workload's UID: a selected one serves at the ports it names.
    let named: HashMap<String, &WorkloadEntrySpec> = outside
        .iter()
        .map(|we| (super::workload_entry::uid(we), &we.spec))
        .collect();
    let mut out = Vec::new();
    for se in entries {
        match services(se, workloads, &named) {
            Ok(list) => out.extend(list.into_iter().map(|s| {
                let d = s.digest();
                (Arc::new(s), d)
            })),
            Err((field, reason, why)) => problems.push(&meta_ref("ServiceEntry", &se.metadata), field, reason, why),
        }
    }
    out
}

fn services(
    se: &ServiceEntry,
    workloads: &[Arc<Workload>],
    named: &HashMap<String, &WorkloadEntrySpec>,
) -> Result<Vec<MeshService>, Refusal> {
    let spec = &se.spec;
    let ns = se.metadata.namespace.as_deref().unwrap_or("default");
    let name = se.metadata.name.as_deref().unwrap_or("");
    not_read(spec)?;
    let resolution = match spec.resolution.as_deref() {
        None | Some("NONE") => Resolution::Passthrough,
        Some("STATIC") => Resolution::Endpoints,
        Some("DNS" | "DNS_ROUND_ROBIN") => Resolution::Dns,
        Some(other) => {
            return Err(invalid(
                "spec.resolution",
                format!("{other:?} is not NONE, STATIC, DNS or DNS_ROUND_ROBIN"),
            ));
        }
    };
    let internal = match spec.location.as_deref() {
        None | Some("MESH_EXTERNAL") => false,
        Some("MESH_INTERNAL") => true,
        Some(other) => {
            return Err(invalid(
                "spec.location",
                format!("{other:?} is not MESH_EXTERNAL or MESH_INTERNAL"),
            ));
        }
    };
    hosts(spec, resolution)?;
    let vips = addresses(&spec.addresses)?;
    let ports = ports(spec)?;
    let endpoints = match resolution {
        Resolution::Passthrough => {
            if !spec.endpoints.is_empty() || spec.workload_selector.is_some() {
                return Err(unsupported(
                    "spec.resolution",
                    "NONE sends each connection to the address dialled: endpoints and a workloadSelector take STATIC or DNS",
                ));
            }
            Vec::new()
        }
        Resolution::Endpoints => static_endpoints(spec, ns, &ports, internal, (workloads, named))?,
        Resolution::Dns => dns_endpoints(spec, &ports)?,
    };
    let export_to = super::mesh::exported_to(spec.export_to.iter().map(String::as_str), ns);
    Ok(spec
        .hosts
        .iter()
        .map(|host| MeshService {
            key: format!("{ns}/{name}/{}", host.to_ascii_lowercase()),
            hostname: host.to_ascii_lowercase(),
            vips: vips.clone(),
            ports: ports.iter().map(|(p, _)| p.clone()).collect(),
            endpoints: endpoints.clone(),
            routes: Vec::new(),
            tcp_routes: Vec::new(),
            export_to: export_to.clone(),
            resolution,
            by_host: vips.is_empty(),
            locality_failover: false,
        })
        .collect())
}

/// The ports of an entry whose protocol is HTTP (`HTTP`, `HTTP2`, `GRPC`): a sidecar can route
/// requests to them, and a DestinationRule or VirtualService for the host applies there.
pub(crate) fn http_ports(s: &MeshService) -> impl Iterator<Item = u16> + '_ {
    s.ports.iter().filter(|p| p.http().is_some()).map(|p| p.port)
}

/// Gives the entries their default tables (`default_routes.rs`): a DestinationRule for the
/// host is the traffic policy that makes its HTTP ports routed. A VirtualService for the host
/// replaces that table with its own. Entries with resolution `NONE` (no endpoints to route to)
/// and wildcard hosts keep going at L4.
pub(crate) fn default_routes(entries: &mut [(Arc<MeshService>, Digest)], res: &Resources, clusters: &mut Clusters<'_>) {
    let always = super::default_routes::always(res);
    for (s, digest) in entries.iter_mut() {
        let ns = s.key.split('/').next().unwrap_or_default();
        if s.resolution == Resolution::Passthrough || s.hostname.starts_with('*') {
            continue;
        }
        let policy = always || super::destination_rule::for_host(res, &s.hostname, ns).is_some();
        let entry: &MeshService = s;
        let with = super::default_routes::table(entry, policy, clusters, |clusters, port| {
            clusters.entry(entry, port).ok()
        });
        if let Some(with) = with {
            *digest = with.digest();
            *s = Arc::new(with);
        }
    }
}

/// Fields the entry carries that Ferrum does not apply.
fn not_read(spec: &ServiceEntrySpec) -> Result<(), Refusal> {
    if let Some(field) = spec.other.keys().next() {
        return Err(unsupported(format!("spec.{field}"), "not supported"));
    }
    if !spec.subject_alt_names.is_empty() && spec.location.as_deref() == Some("MESH_INTERNAL") {
        return Err(unsupported(
            "spec.subjectAltNames",
            "not supported inside the mesh: mesh endpoints are checked against their workload's SPIFFE identity",
        ));
    }
    for (i, p) in spec.ports.iter().enumerate() {
        if let Some(field) = p.other.keys().next() {
            return Err(unsupported(format!("spec.ports[{i}].{field}"), "not supported"));
        }
    }
    for (i, e) in spec.endpoints.iter().enumerate() {
        let field = |f: &str| format!("spec.endpoints[{i}].{f}");
        if let Some(f) = e.other.keys().next() {
            return Err(unsupported(field(f), "not supported"));
        }
        if e.weight.is_some_and(|w| w != 1) {
            return Err(unsupported(field("weight"), "endpoints are balanced evenly"));
        }
        if e.network.is_some() {
            return Err(unsupported(field("network"), "one network only"));
        }
        if e.service_account.is_some() {
            return Err(unsupported(
                field("serviceAccount"),
                "an endpoint's identity is its workload's",
            ));
        }
    }
    Ok(())
}

/// Hosts are names or `*.suffix` wildcards; `DNS` without endpoints resolves the hosts, so they
/// must be names.
fn hosts(spec: &ServiceEntrySpec, resolution: Resolution) -> Result<(), Refusal> {
    if spec.hosts.is_empty() {
        return Err(invalid("spec.hosts", "at least one host"));
    }
    for (i, h) in spec.hosts.iter().enumerate() {
        let wildcard = h.strip_prefix("*.");
        if !is_dns_name(wildcard.unwrap_or(h)) {
            return Err(invalid(
                format!("spec.hosts[{i}]"),
                format!("{h:?} is not a DNS name or *.suffix"),
            ));
        }
        if wildcard.is_some() && resolution == Resolution::Dns && spec.endpoints.is_empty() {
            return Err(invalid(
                format!("spec.hosts[{i}]"),
                format!("{h:?}: DNS resolution without endpoints resolves the hosts, which cannot be wildcards"),
            ));
        }
    }
    Ok(())
}

/// The entry's addresses as single IPs.
fn addresses(addresses: &[String]) -> Result<Vec<String>, Refusal> {
    let mut out = Vec::with_capacity(addresses.len());
    for (i, a) in addresses.iter().enumerate() {
        let field = format!("spec.addresses[{i}]");
        let (ip, len) = a.split_once('/').map_or((a.as_str(), None), |(ip, l)| (ip, Some(l)));
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| invalid(&field, format!("{a:?} is not an IP address or CIDR")))?;
        let single = if ip.is_ipv4() { "32" } else { "128" };
        if let Some(len) = len.filter(|l| *l != single) {
            return Err(match len.parse::<u8>() {
                Ok(n) if n <= if ip.is_ipv4() { 32 } else { 128 } => unsupported(
                    field,
                    format!("{a:?}: address ranges are not matched; give single addresses (/{single})"),
                ),
                _ => invalid(field, format!("{a:?} is not an IP address or CIDR")),
            });
        }
        out.push(ip.to_string());
    }
    Ok(out)
}

/// Each port, with the port its endpoints listen on unless an endpoint says otherwise.
fn ports(spec: &ServiceEntrySpec) -> Result<Vec<(ServicePort, u16)>, Refusal> {
    let mut out: Vec<(ServicePort, u16)> = Vec::with_capacity(spec.ports.len());
    let port = |n: u32| u16::try_from(n).ok().filter(|p| *p != 0);
    for (i, p) in spec.ports.iter().enumerate() {
        let number = port(p.number).ok_or_else(|| invalid(format!("spec.ports[{i}].number"), "ports are 1-65535"))?;
        let target = match p.target_port {
            None => number,
            Some(t) => port(t).ok_or_else(|| invalid(format!("spec.ports[{i}].targetPort"), "ports are 1-65535"))?,
        };
        if out.iter().any(|(q, _)| q.port == number) {
            return Err(invalid(
                format!("spec.ports[{i}].number"),
                format!("port {number} is listed twice"),
            ));
        }
        out.push((
            ServicePort {
                port: number,
                name: p.name.clone(),
                app_protocol: p.protocol.as_deref().map(str::to_ascii_lowercase),
            },
            target,
        ));
    }
    if out.is_empty() {
        return Err(invalid("spec.ports", "at least one port"));
    }
    Ok(out)
}

/// An endpoint's (service port, its port) pairs: by port name in its `ports`, else the default.
fn mapping(e: &WorkloadEntrySpec, ports: &[(ServicePort, u16)], field: &str) -> Result<Vec<(u16, u16)>, Refusal> {
    ports
        .iter()
        .map(|(p, target)| match e.ports.get(&p.name) {
            None => Ok((p.port, *target)),
            Some(n) => u16::try_from(*n)
                .ok()
                .filter(|n| *n != 0)
                .map(|n| (p.port, n))
                .ok_or_else(|| invalid(format!("{field}.ports.{}", p.name), "ports are 1-65535")),
        })
        .collect()
}

fn static_endpoints(
    spec: &ServiceEntrySpec,
    ns: &str,
    ports: &[(ServicePort, u16)],
    internal: bool,
    (workloads, named): (&[Arc<Workload>], &HashMap<String, &WorkloadEntrySpec>),
) -> Result<Vec<MeshEndpoint>, Refusal> {
    if let Some(sel) = &spec.workload_selector {
        if !spec.endpoints.is_empty() {
            return Err(invalid(
                "spec.workloadSelector",
                "either endpoints or a workloadSelector, not both",
            ));
        }
        let by_default = ports.iter().map(|(p, t)| (p.port, *t)).collect::<Vec<_>>();
        return Ok(workloads
            .iter()
            .filter(|w| w.namespace == ns && sel.labels.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
            .flat_map(|w| {
                // A WorkloadEntry's ports by name, a pod's at the entry's target ports.
                let ports = named
                    .get(&w.uid)
                    .and_then(|e| mapping(e, ports, "spec.workloadSelector").ok())
                    .unwrap_or_else(|| by_default.clone());
                w.ips.iter().map(move |ip| MeshEndpoint {
                    address: ip.clone(),
                    workload: Some(w.uid.clone()),
                    ports: ports.clone(),
                    zone: w.zone.clone(),
                })
            })
            .collect());
    }
    if spec.endpoints.is_empty() {
        return Err(invalid(
            "spec.endpoints",
            "STATIC resolution needs endpoints or a workloadSelector",
        ));
    }
    let mut out = Vec::with_capacity(spec.endpoints.len());
    for (i, e) in spec.endpoints.iter().enumerate() {
        let field = format!("spec.endpoints[{i}]");
        let address = e.address.as_deref().unwrap_or("");
        if address.starts_with("unix://") {
            return Err(unsupported(
                format!("{field}.address"),
                "Unix domain sockets are not supported",
            ));
        }
        let ip: IpAddr = address.parse().map_err(|_| {
            invalid(
                format!("{field}.address"),
                format!("{address:?} is not an IP address (STATIC)"),
            )
        })?;
        // Inside the mesh the address may be a workload's: its proxy is then reached over HBONE.
        let workload = internal
            .then(|| workloads.iter().find(|w| w.ips.iter().any(|a| a.parse() == Ok(ip))))
            .flatten()
            .map(|w| w.uid.clone());
        out.push(MeshEndpoint {
            address: ip.to_string(),
            workload,
            ports: mapping(e, ports, &field)?,
            zone: locality_zone(e.locality.as_deref()),
        });
    }
    Ok(out)
}

fn dns_endpoints(spec: &ServiceEntrySpec, ports: &[(ServicePort, u16)]) -> Result<Vec<MeshEndpoint>, Refusal> {
    if spec.workload_selector.is_some() {
        return Err(invalid(
            "spec.workloadSelector",
            "a workloadSelector takes STATIC resolution",
        ));
    }
    if spec.endpoints.is_empty() {
        let by_default: Vec<(u16, u16)> = ports.iter().map(|(p, t)| (p.port, *t)).collect();
        return Ok(spec
            .hosts
            .iter()
            .map(|h| MeshEndpoint {
                address: h.to_ascii_lowercase(),
                workload: None,
                ports: by_default.clone(),
                zone: None,
            })
            .collect());
    }
    let mut out = Vec::with_capacity(spec.endpoints.len());
    for (i, e) in spec.endpoints.iter().enumerate() {
        let field = format!("spec.endpoints[{i}]");
        let address = e.address.as_deref().unwrap_or("");
        if address.parse::<IpAddr>().is_err() && !is_dns_name(address) {
            return Err(invalid(
                format!("{field}.address"),
                format!("{address:?} is not a DNS name or an IP address"),
            ));
        }
        out.push(MeshEndpoint {
            address: address.to_ascii_lowercase(),
            workload: None,
            ports: mapping(e, ports, &field)?,
            zone: locality_zone(e.locality.as_deref()),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use crate::mesh::{MeshService, Resolution};
    use crate::translate::Reason;

    fn translate(yaml: &str) -> crate::Translation {
        let mut r = crate::Resources::default();
        r.add_yaml("se.yaml", yaml).unwrap();
        crate::translate(&r, 1, &Default::default())
    }

    fn service<'a>(t: &'a crate::Translation, key: &str) -> &'a MeshService {
        let found = t.snapshot.services.iter().find(|s| s.key == key);
        found.unwrap_or_else(|| panic!("{key} in {:#?}", t.snapshot.services))
    }

    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: db-1, namespace: ns, uid: u-db, labels: {app: db, security.istio.io/tlsMode: istio}}\n\
        spec: {containers: [{name: c}]}\nstatus: {podIP: 10.1.0.7}\n---\n";

    #[test]
    fn each_host_becomes_a_service_that_resolves_as_the_entry_says() {
        let t = translate(&format!(
            "{POD}apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: api, namespace: ns}}\n\
             spec: {{hosts: [api.example.com, API.example.org], addresses: [240.0.0.1/32], location: MESH_INTERNAL, resolution: STATIC,\n\
                     ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 8080}}, {{number: 5432, name: pg}}],\n\
                     endpoints: [{{address: 10.1.0.7, ports: {{pg: 15432}}}}, {{address: 192.0.2.9, locality: us-east1/us-east1-b}}], exportTo: ['.']}}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: ext, namespace: ns}}\n\
             spec: {{hosts: [ext.example.com], addresses: ['2001:db8::1'], resolution: DNS, ports: [{{number: 443, name: tls, protocol: TLS}}]}}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: range, namespace: ns}}\n\
             spec: {{hosts: [db.example.com], addresses: [203.0.113.5], ports: [{{number: 3306, name: mysql}}]}}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: picked, namespace: ns}}\n\
             spec: {{hosts: [db.internal], addresses: [240.0.0.2], resolution: STATIC, workloadSelector: {{labels: {{app: db}}}}, ports: [{{number: 5432, name: pg, targetPort: 5433}}]}}\n"
        ));
        assert!(t.problems.is_empty(), "{:#?}", t.problems);

        let api = service(&t, "ns/api/api.example.com");
        assert_eq!(
            (api.vips.as_slice(), api.resolution),
            (&["240.0.0.1".to_string()][..], Resolution::Endpoints)
        );
        assert_eq!(api.export_to, ["ns"]);
        assert_eq!(api.ports[0].app_protocol.as_deref(), Some("http"));
        let db = &api.endpoints[0];
        assert_eq!(
            (db.workload.as_deref(), db.target_port(80), db.target_port(5432)),
            (Some("u-db"), Some(8080), Some(15432)),
            "inside the mesh an endpoint at a pod's address is that workload; ports by name win"
        );
        assert_eq!(
            (api.endpoints[1].workload.as_deref(), api.endpoints[1].target_port(5432)),
            (None, Some(5432))
        );
        assert_eq!(
            api.endpoints[1].zone.as_deref(),
            Some("us-east1-b"),
            "the zone of the endpoint's locality"
        );
        assert_eq!(service(&t, "ns/api/api.example.org").hostname, "api.example.org");

        let ext = service(&t, "ns/ext/ext.example.com");
        assert_eq!(ext.resolution, Resolution::Dns);
        assert_eq!(
            (ext.endpoints[0].address.as_str(), ext.endpoints[0].target_port(443)),
            ("ext.example.com", Some(443)),
            "DNS without endpoints resolves the host itself"
        );

        let passthrough = service(&t, "ns/range/db.example.com");
        assert_eq!(
            (passthrough.resolution, passthrough.endpoints.len()),
            (Resolution::Passthrough, 0)
        );

        let picked = service(&t, "ns/picked/db.internal");
        assert_eq!(
            (
                picked.endpoints.len(),
                picked.endpoints[0].workload.as_deref(),
                picked.endpoints[0].target_port(5432)
            ),
            (1, Some("u-db"), Some(5433))
        );
    }

    fn cluster<'a>(t: &'a crate::Translation, name: &str) -> &'a crate::model::Cluster {
        let found = t.snapshot.clusters.iter().find(|c| c.name == name);
        found.unwrap_or_else(|| panic!("{name} in {:#?}", t.snapshot.clusters))
    }

    fn forwards_to(s: &MeshService, port: u16) -> Vec<Option<String>> {
        let table = s
            .routes_for(port, "any")
            .unwrap_or_else(|| panic!("routes on {port}: {s:#?}"));
        table
            .routes
            .iter()
            .flat_map(|r| match &r.action {
                crate::model::Action::Forward(to) => to.iter().map(|w| w.cluster.clone()).collect(),
                crate::model::Action::Redirect(_) => Vec::new(),
            })
            .collect()
    }

    const EXTERNAL: &str = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: api, namespace: ns}\n\
        spec: {hosts: [api.example.com], resolution: DNS, ports: [{number: 80, name: http, protocol: HTTP, targetPort: 443}, {number: 9000, name: raw, protocol: TCP}], \
               subjectAltNames: [edge.example.net, 'spiffe://example.net/edge']}\n---\n\
        apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: legacy, namespace: ns}\n\
        spec: {hosts: [legacy.example.com], addresses: [203.0.113.7], ports: [{number: 80, name: http, protocol: HTTP}]}\n---\n\
        apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: api-tls, namespace: other}\n\
        spec: {host: api.example.com, trafficPolicy: {tls: {mode: SIMPLE, caCertificates: /etc/ca.pem}, connectionPool: {tcp: {connectTimeout: 2s}}}}\n---\n";

    #[test]
    fn a_destination_rule_for_an_entry_host_routes_its_http_ports_through_the_rules_cluster() {
        let t = translate(EXTERNAL);
        assert!(t.problems.is_empty(), "{:#?}", t.problems);
        let api = service(&t, "ns/api/api.example.com");
        assert_eq!(
            forwards_to(api, 80),
            [Some("serviceentry/ns/api/api.example.com:80".to_string())],
            "one route to the entry's cluster on the HTTP port"
        );
        assert!(api.routes_for(9000, "any").is_none(), "a TCP port stays at L4");
        let c = cluster(&t, "serviceentry/ns/api/api.example.com:80");
        assert_eq!(
            (c.endpoints[0].address.as_str(), c.endpoints[0].port),
            ("api.example.com", 443),
            "resolved by the proxy, at the target port"
        );
        let tls = c.tls.as_ref().expect("TLS originated");
        assert_eq!(
            (tls.sni.as_str(), tls.ca_file.as_deref()),
            ("api.example.com", Some("/etc/ca.pem")),
            "SNI defaults to the host"
        );
        assert_eq!(
            (tls.subject_alt_names.as_slice(), tls.subject_alt_uris.as_slice()),
            (
                &["edge.example.net".to_string()][..],
                &["spiffe://example.net/edge".to_string()][..]
            ),
            "the entry's subjectAltNames check the certificate the rule's TLS meets"
        );
        assert_eq!(c.timeouts.connect_ms, 2000);
        let legacy = service(&t, "ns/legacy/legacy.example.com");
        assert!(legacy.routes.is_empty(), "no rule, no routes: L4 as before");
        // A proxy finds the Service that answered from the cluster's name (request metrics).
        assert_eq!(crate::mesh::cluster_service_key(&c.name), Some(api.key.as_str()));
    }

    /// Istio's "Egress TLS Origination" task, as written there (plus an HTTP port the rule
    /// does not name and a top-level load balancer).
    #[test]
    fn port_level_settings_replace_the_sections_they_set_on_their_port() {
        let t = translate(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: edition-cnn-com, namespace: ns}\n\
             spec:\n  hosts: [edition.cnn.com]\n  ports:\n  - {number: 80, name: http-port, protocol: HTTP, targetPort: 443}\n\
             \x20 - {number: 443, name: https-port, protocol: HTTPS}\n  - {number: 8080, name: http-alt, protocol: HTTP}\n  resolution: DNS\n---\n\
             apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: edition-cnn-com, namespace: ns}\n\
             spec:\n  host: edition.cnn.com\n  trafficPolicy:\n    loadBalancer: {simple: RANDOM}\n    portLevelSettings:\n\
             \x20   - port: {number: 80}\n      tls: {mode: SIMPLE}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: broken, namespace: ns}\n\
             spec: {host: other.example.com, trafficPolicy: {portLevelSettings: [{tls: {mode: SIMPLE}}, {port: {number: 80}, tls: {mode: MUTUAL}}]}}\n",
        );
        assert_eq!(
            t.problem_keys(),
            [(
                "broken",
                "spec.trafficPolicy.portLevelSettings[0].port.number",
                Reason::UnsupportedValue
            )]
        );
        let on80 = cluster(&t, "serviceentry/ns/edition-cnn-com/edition.cnn.com:80");
        assert_eq!(
            (on80.endpoints[0].port, on80.tls.as_ref().map(|t| t.sni.as_str())),
            (443, Some("edition.cnn.com")),
            "port 80 originates TLS to 443"
        );
        assert_eq!(
            on80.lb,
            crate::model::LbPolicy::Random,
            "the sections it does not set stay"
        );
        let on8080 = cluster(&t, "serviceentry/ns/edition-cnn-com/edition.cnn.com:8080");
        assert!(on8080.tls.is_none(), "another port keeps the top-level policy");
        assert_eq!(on8080.lb, crate::model::LbPolicy::Random);
        let s = service(&t, "ns/edition-cnn-com/edition.cnn.com");
        assert!(s.routes_for(443, "any").is_none(), "an HTTPS port is TLS already: L4");
    }

    #[test]
    fn a_virtual_service_routes_an_entry_host_and_replaces_the_rules_default_table() {
        let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: api, namespace: ns}\n\
            spec: {hosts: [api.example.com], http: [{match: [{uri: {prefix: /v2}}], route: [{destination: {host: api.example.com}}], timeout: 3s},\n\
                   {fault: {abort: {httpStatus: 503, percentage: {value: 100}}}, route: [{destination: {host: api.example.com}}]}]}\n---\n\
            apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: legacy, namespace: ns}\n\
            spec: {hosts: [legacy.example.com], http: [{route: [{destination: {host: legacy.example.com}}]}]}\n---\n";
        let t = translate(&format!("{EXTERNAL}{vs}"));
        assert_eq!(
            t.problem_keys(),
            [("legacy", "spec.hosts[0]", Reason::NoMatchingParent)],
            "resolution NONE has no endpoints to route to"
        );
        let api = service(&t, "ns/api/api.example.com");
        let table = api.routes_for(80, "any").unwrap();
        assert_eq!(
            table.routes.len(),
            2,
            "the VirtualService's routes, not the default one"
        );
        assert_eq!(table.routes[0].timeouts.request_ms, Some(3000));
        assert!(table.routes[1].fault.is_some());
        assert_eq!(
            forwards_to(api, 80),
            [
                Some("serviceentry/ns/api/api.example.com:80".to_string()),
                Some("serviceentry/ns/api/api.example.com:80".to_string())
            ],
            "the destination is the entry's port (its only HTTP one asked), with the rule's TLS"
        );
        assert!(cluster(&t, "serviceentry/ns/api/api.example.com:80").tls.is_some());
    }

    #[test]
    fn an_entry_that_cannot_be_applied_whole_is_left_out_with_its_field() {
        let entry = |name: &str, spec: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: ns}}\nspec: {spec}\n---\n"
            )
        };
        let t = translate(&[
            entry("range", "{hosts: [a.example.com], addresses: [10.0.0.0/8], ports: [{number: 80, name: http}]}"),
            entry("bad-ip", "{hosts: [a.example.com], addresses: [10.0.0.300], ports: [{number: 80, name: http}]}"),
            entry("no-endpoints", "{hosts: [a.example.com], resolution: STATIC, ports: [{number: 80, name: http}]}"),
            entry("weighted", "{hosts: [a.example.com], resolution: STATIC, ports: [{number: 80, name: http}], endpoints: [{address: 10.0.0.1, weight: 3}]}"),
            entry("wild-dns", "{hosts: ['*.example.com'], resolution: DNS, ports: [{number: 80, name: http}]}"),
            entry("unknown", "{hosts: [a.example.com], ports: [{number: 80, name: http}], frobnicate: true}"),
            entry("resolution", "{hosts: [a.example.com], resolution: MAGIC, ports: [{number: 80, name: http}]}"),
            entry("no-ports", "{hosts: [a.example.com], addresses: [240.0.0.3]}"),
            entry("fine", "{hosts: [ok.example.com], addresses: [240.0.0.9], ports: [{number: 80, name: http}]}"),
        ]
        .concat());
        let found: Vec<(&str, &str, Reason)> = t.problem_keys();
        assert_eq!(
            found,
            vec![
                ("bad-ip", "spec.addresses[0]", Reason::Invalid),
                ("no-endpoints", "spec.endpoints", Reason::Invalid),
                ("no-ports", "spec.ports", Reason::Invalid),
                ("range", "spec.addresses[0]", Reason::UnsupportedValue),
                ("resolution", "spec.resolution", Reason::Invalid),
                ("unknown", "spec.frobnicate", Reason::UnsupportedValue),
                ("weighted", "spec.endpoints[0].weight", Reason::UnsupportedValue),
                ("wild-dns", "spec.hosts[0]", Reason::Invalid),
            ]
        );
        let keys: Vec<&str> = t.snapshot.services.iter().map(|s| s.key.as_str()).collect();
        assert_eq!(keys, ["ns/fine/ok.example.com"], "only the entry that can be applied");
        let meta = |name: &str| k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(name.into()),
            namespace: Some("ns".into()),
            ..Default::default()
        };
        let range = crate::status::policy_status("ServiceEntry", &meta("range"), &t);
        let c = &range["conditions"][0];
        assert_eq!(
            (&c["status"], &c["reason"]),
            (&"False".into(), &"UnsupportedValue".into()),
            "{range}"
        );
        assert!(c["message"].as_str().unwrap().contains("spec.addresses[0]"), "{range}");
        let fine = crate::status::policy_status("ServiceEntry", &meta("fine"), &t);
        assert_eq!(fine["conditions"][0]["status"], "True", "{fine}");
    }
}
