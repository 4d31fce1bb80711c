//! The mesh part of a snapshot, compiled for lookups by address: a captured connection's
//! original destination is a Service VIP:port, a workload's IP, or neither (passthrough).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use ferrum_snapshot::Snapshot;
use ferrum_snapshot::mesh::{ClientView, IngressRoute, MeshService, Resolution, ServicePort, Workload};
use ferrum_snapshot::model::{Route, UpstreamProtocol};

use super::jwt::{Authenticator, JwksCache};
use super::policy::{Authorizer, Upstreams};
use crate::compile::CompiledListener;
use crate::router::VirtualHost;

/// One Service port and the endpoints that serve it.
pub struct ServiceTarget {
    pub service: Arc<MeshService>,
    pub port: u16,
    /// (workload IP : target port, the workload when known).
    pub endpoints: Vec<(SocketAddr, Option<Arc<Workload>>)>,
    /// A DNS-resolved service's endpoints instead: (name, port), resolved when connecting.
    pub names: Vec<(Arc<str>, u16)>,
    /// The Service port's mesh routes: HTTP to it is routed by them, like a listener's.
    pub http: Option<Arc<CompiledListener>>,
    /// Its L4 route: other connections go to a weighted pick of the route's clusters.
    pub tcp: Option<Arc<VirtualHost>>,
    /// HTTP/2 to it is balanced at L4: the port declares no protocol and a cluster of its routes
    /// speaks HTTP/1.1 only (a snapshot whose sniffed ports' routes do not follow the client's
    /// protocol), which would break gRPC, which needs HTTP/2 end to end.
    pub h2_at_l4: bool,
    /// The first `near` endpoints are in the proxy's zone and taken first (the service prefers
    /// close endpoints); 0: no preference.
    near: usize,
    next: AtomicUsize,
}

/// Whether every cluster `route` sends to speaks HTTP/2 to an HTTP/2 client: it speaks HTTP/2,
/// or follows the client's protocol.
fn speak_h2(route: &Route, upstreams: &Upstreams) -> bool {
    route.clusters().all(|c| {
        upstreams
            .clusters
            .get(c)
            .is_some_and(|c| c.spec.protocol == UpstreamProtocol::Http2 || c.spec.follow_client_protocol)
    })
}

/// Puts the endpoints in zone `zone` first; how many there are, 0 when that prefers nothing
/// (no zone, or all or none of them in it).
fn near_first(endpoints: &mut [(SocketAddr, Option<Arc<Workload>>)], zone: Option<&str>) -> usize {
    let Some(zone) = zone else { return 0 };
    let in_zone = |e: &(SocketAddr, Option<Arc<Workload>>)| e.1.as_ref().and_then(|w| w.zone.as_deref()) == Some(zone);
    // Stable: each group keeps its order.
    endpoints.sort_by_key(|e| !in_zone(e));
    match endpoints.iter().filter(|e| in_zone(e)).count() {
        n if n == endpoints.len() => 0,
        n => n,
    }
}

/// A dual-stack Service's VIP leads to the endpoints of its own family (as kube-proxy does);
/// all of them when there are none of that family.
fn same_family(
    endpoints: &[(SocketAddr, Option<Arc<Workload>>)],
    vip: IpAddr,
) -> Vec<(SocketAddr, Option<Arc<Workload>>)> {
    let same: Vec<_> = endpoints
        .iter()
        .filter(|(a, _)| a.is_ipv6() == vip.is_ipv6())
        .cloned()
        .collect();
    if same.is_empty() { endpoints.to_vec() } else { same }
}

impl ServiceTarget {
    /// The next place in a round robin over `len` endpoints; `skip` tries the next ones after a
    /// failed connect.
    fn turn(&self, skip: usize, len: usize) -> Option<usize> {
        if len == 0 {
            return None;
        }
        let i = if skip == 0 {
            self.next.fetch_add(1, Relaxed)
        } else {
            // The first try's place (its fetch_add moved the turn on by one), `skip` further.
            self.next.load(Relaxed).wrapping_sub(1).wrapping_add(skip)
        };
        Some(i % len)
    }

    /// The endpoint for try `skip` of a connection. With endpoints in the proxy's zone, they
    /// take the tries but the last (one each at most), as kube-proxy's `PreferClose` keeps
    /// connections in the zone; the last goes to the other zones, so a zone that refuses
    /// connections is not a dead end.
    pub fn pick(&self, skip: usize) -> Option<&(SocketAddr, Option<Arc<Workload>>)> {
        let (near, len) = (self.near, self.endpoints.len());
        if near == 0 {
            return self.endpoints.get(self.turn(skip, len)?);
        }
        if skip < near.min(crate::upstream::CONNECT_ATTEMPTS - 1) {
            return self.endpoints.get(self.turn(skip, near)?);
        }
        self.endpoints.get(near + self.turn(skip - near.min(skip), len - near)?)
    }

    /// [`Self::pick`] for a service resolved by DNS.
    pub fn pick_name(&self, skip: usize) -> Option<&(Arc<str>, u16)> {
        self.names.get(self.turn(skip, self.names.len())?)
    }
}

/// Istio port protocols whose streams name no host.
fn opaque(protocol: &str) -> bool {
    matches!(protocol, "tcp" | "mongo" | "mysql" | "redis")
}

/// A service port's endpoints: addresses with their workload (when known), or for a service
/// resolved by DNS, (name or address, port) pairs.
type Endpoints = (Vec<(SocketAddr, Option<Arc<Workload>>)>, Vec<(Arc<str>, u16)>);

fn endpoints_of(
    s: &MeshService,
    port: u16,
    by_uid: &HashMap<&str, &Arc<Workload>>,
    workloads: &HashMap<IpAddr, Arc<Workload>>,
) -> Endpoints {
    let (mut addrs, mut names) = (Vec::new(), Vec::new());
    for e in &s.endpoints {
        let Some(target) = e.target_port(port) else { continue };
        if s.resolution == Resolution::Dns {
            names.push((Arc::from(e.address.as_str()), target));
            continue;
        }
        let Ok(ip) = e.address.parse::<IpAddr>() else { continue };
        let w = e.workload.as_deref().and_then(|u| by_uid.get(u)).map(|w| (*w).clone());
        addrs.push((SocketAddr::new(ip, target), w.or_else(|| workloads.get(&ip).cloned())));
    }
    (addrs, names)
}

/// Where a captured outbound connection goes.
pub enum Destination<'a> {
    Service(&'a ServiceTarget),
    Workload(&'a Arc<Workload>),
    /// Outside the mesh: connect to the original destination as is.
    Passthrough,
    /// Outside the mesh, and this proxy's Sidecar says REGISTRY_ONLY: refused.
    Blocked,
}

/// The mesh routes a sidecar follows, compiled.
#[derive(Default)]
pub struct MeshRoutes {
    /// Per (service key, port), for services at addresses.
    pub by_service: HashMap<(String, u16), Arc<CompiledListener>>,
    /// Per port, a virtual host for each service found by host there.
    pub by_host: HashMap<u16, Arc<CompiledListener>>,
    /// The L4 route per (service key, port), as the one route of a virtual host.
    pub tcp: HashMap<(String, u16), Arc<VirtualHost>>,
}

#[derive(Default)]
pub struct MeshIndex {
    services: HashMap<SocketAddr, ServiceTarget>,
    /// Addresses of services that send connections where they were dialled (ServiceEntry
    /// `resolution: NONE`): known to the registry, so let past `REGISTRY_ONLY`.
    registered: HashSet<SocketAddr>,
    /// Services without addresses (ServiceEntries naming hosts only), by port: a connection to
    /// an address the mesh does not know is matched by the TLS SNI or HTTP `Host` it asks for.
    hosts: HashMap<u16, Vec<ServiceTarget>>,
    /// The routes of the services found by host, per port (a virtual host each).
    host_routes: HashMap<u16, Arc<CompiledListener>>,
    workloads: HashMap<IpAddr, Arc<Workload>>,
    /// The AuthorizationPolicies that select this proxy's own workload, for its inbound side.
    pub inbound: Authorizer,
    /// The RequestAuthentications that select it: JWTs on its inbound requests.
    pub authn: Authenticator,
    /// This proxy's own workload (sidecar mode), for its PeerAuthentication.
    pub own: Option<Workload>,
    /// Its Sidecar's `outboundTrafficPolicy: REGISTRY_ONLY`.
    registry_only: bool,
    /// Its Sidecar's ingress listeners: where inbound traffic for a port is delivered.
    ingress: Vec<IngressRoute>,
    /// Its ports that only Services declaring another protocol than HTTP reach.
    opaque_inbound: HashSet<u16>,
}

/// `own`'s ports that every Service port reaching them declares as a protocol other than HTTP
/// (`tcp`, `mysql`, `tls`, …): inbound connections there are relayed whole, never sniffed, as
/// Istio's sidecars relay declared TCP — a server-first protocol would wait out the sniff.
fn opaque_inbound(snap: &Snapshot, own: &Workload) -> HashSet<u16> {
    let (mut opaque, mut http) = (HashSet::new(), HashSet::new());
    for s in &snap.services {
        let own_endpoints = s
            .endpoints
            .iter()
            .filter(|e| e.workload.as_deref() == Some(own.uid.as_str()) || own.ips.contains(&e.address));
        for e in own_endpoints {
            for p in &s.ports {
                let Some(target) = e.target_port(p.port) else { continue };
                if p.sniffed() || p.http().is_some() {
                    http.insert(target);
                } else {
                    opaque.insert(target);
                }
            }
        }
    }
    opaque.retain(|p| !http.contains(p));
    opaque
}

/// The workloads a proxy may see, by IP.
fn visible_workloads(snap: &Snapshot, view: Option<&ClientView<'_>>) -> HashMap<IpAddr, Arc<Workload>> {
    let mut workloads = HashMap::new();
    for w in snap
        .workloads
        .iter()
        .filter(|w| view.is_none_or(|v| v.knows_workload(w)))
    {
        for ip in &w.ips {
            if let Ok(ip) = ip.parse() {
                workloads.insert(ip, w.clone());
            }
        }
    }
    workloads
}

/// What building one service port's targets reads.
struct PortScope<'a> {
    /// The proxy's own namespace ("" outside sidecar mode).
    own_ns: &'a str,
    zone: Option<&'a str>,
    http: &'a MeshRoutes,
    upstreams: &'a Upstreams<'a>,
    by_uid: &'a HashMap<&'a str, &'a Arc<Workload>>,
    workloads: &'a HashMap<IpAddr, Arc<Workload>>,
}

/// Where outbound connections to services go: by address, by host (per port), and the
/// addresses merely registered.
#[derive(Default)]
struct Targets {
    services: HashMap<SocketAddr, ServiceTarget>,
    registered: HashSet<SocketAddr>,
    hosts: HashMap<u16, Vec<ServiceTarget>>,
}

impl Targets {
    fn add(&mut self, s: &Arc<MeshService>, p: &ServicePort, at: &PortScope<'_>) {
        let vips = s.vips.iter().filter_map(|v| v.parse::<IpAddr>().ok());
        if s.resolution == Resolution::Passthrough && !s.by_host {
            // Real addresses: connections go where they were dialled, REGISTRY_ONLY or not.
            self.registered.extend(vips.map(|vip| SocketAddr::new(vip, p.port)));
            return;
        }
        let (endpoints, names) = endpoints_of(s, p.port, at.by_uid, at.workloads);
        let h2_at_l4 = p.sniffed()
            && s.routes_for(p.port, at.own_ns)
                .is_some_and(|t| !t.routes.iter().all(|r| speak_h2(r, at.upstreams)));
        let target = |endpoints, near, http, tcp| ServiceTarget {
            service: s.clone(),
            port: p.port,
            endpoints,
            names: names.clone(),
            http,
            tcp,
            h2_at_l4,
            near,
            next: AtomicUsize::new(fastrand::usize(..)),
        };
        if s.by_host {
            // A ServiceEntry without addresses: found by the host a connection asks for (SNI or
            // Host), so never on a port declared opaque — nothing there names one, and a
            // server-first protocol would wait out the sniff for nothing.
            if p.app_protocol.as_deref().is_some_and(opaque) {
                return;
            }
            let http = s
                .routes_for(p.port, at.own_ns)
                .and_then(|_| at.http.by_host.get(&p.port).cloned());
            self.hosts
                .entry(p.port)
                .or_default()
                .push(target(endpoints, 0, http, None));
            return;
        }
        let routes = at.http.by_service.get(&(s.key.clone(), p.port));
        let tcp = at.http.tcp.get(&(s.key.clone(), p.port));
        for vip in vips {
            let mut endpoints = same_family(&endpoints, vip);
            let near = near_first(&mut endpoints, at.zone.filter(|_| s.locality_failover));
            let t = target(endpoints, near, routes.cloned(), tcp.cloned());
            self.services.insert(SocketAddr::new(vip, p.port), t);
        }
    }
}

/// The pod a sidecar serves: `(namespace, name)`.
pub type Me = (String, String);

impl MeshIndex {
    /// `http`: the compiled mesh routes; `jwks`: fetched JWKS, shared between configs.
    /// `upstreams`: where CUSTOM policies find their providers.
    /// `zone`: the proxy's, when known.
    pub fn build(
        snap: &Snapshot,
        me: Option<&Me>,
        zone: Option<&str>,
        http: MeshRoutes,
        jwks: &JwksCache,
        upstreams: &Upstreams,
    ) -> MeshIndex {
        let own = me.map(|me| snap.workload_or_placeholder(&me.0, &me.1));
        let own_ns = me.map_or("", |me| me.0.as_str());
        // A Service exported elsewhere only, or that this proxy's Sidecar does not admit, is not
        // this sidecar's to route, nor are workloads its Sidecar leaves out (a snapshot from a
        // file or another producer may carry them).
        let view = own.as_ref().map(|w| ClientView::of(snap, w));
        let visible = |s: &MeshService| view.as_ref().is_none_or(|v| v.knows(s));
        let workloads = visible_workloads(snap, view.as_ref());
        let by_uid: HashMap<&str, &Arc<Workload>> = snap.workloads.iter().map(|w| (w.uid.as_str(), w)).collect();
        let ports = PortScope {
            own_ns,
            zone,
            http: &http,
            upstreams,
            by_uid: &by_uid,
            workloads: &workloads,
        };
        let mut targets = Targets::default();
        for s in snap.services.iter().filter(|s| visible(s)) {
            for p in s
                .ports
                .iter()
                .filter(|p| view.as_ref().is_none_or(|v| v.knows_port(s, p.port)))
            {
                targets.add(s, p, &ports);
            }
        }
        let Targets {
            services,
            registered,
            hosts,
        } = targets;
        let inbound = own
            .as_ref()
            .map(|w| Authorizer::for_workload(&snap.policies, w, upstreams))
            .unwrap_or_default();
        let authn = own
            .as_ref()
            .map(|w| Authenticator::for_workload(&snap.policies, w, jwks))
            .unwrap_or_default();
        let scope = view.as_ref().and_then(|v| v.scope);
        let registry_only = scope.is_some_and(|s| s.registry_only);
        let ingress = scope.map(|s| s.ingress.clone()).unwrap_or_default();
        let opaque_inbound = own.as_ref().map(|w| opaque_inbound(snap, w)).unwrap_or_default();
        MeshIndex {
            services,
            registered,
            hosts,
            host_routes: http.by_host,
            workloads,
            inbound,
            authn,
            own,
            registry_only,
            ingress,
            opaque_inbound,
        }
    }

    /// Whether inbound connections to this workload's `port` are relayed whole: the Services
    /// that reach it declare a protocol other than HTTP.
    pub fn opaque_inbound(&self, port: u16) -> bool {
        self.opaque_inbound.contains(&port)
    }

    pub fn destination(&self, dst: SocketAddr) -> Destination<'_> {
        if let Some(t) = self.services.get(&dst) {
            return Destination::Service(t);
        }
        match self.workloads.get(&dst.ip()) {
            Some(w) => Destination::Workload(w),
            None if self.registry_only && !self.registered.contains(&dst) => Destination::Blocked,
            None => Destination::Passthrough,
        }
    }

    /// Whether connections to `dst` are matched by the host they ask for: no service or workload
    /// has the address, and some service without addresses has the port.
    pub fn by_host_on(&self, dst: SocketAddr) -> bool {
        self.hosts.contains_key(&dst.port())
            && !self.services.contains_key(&dst)
            && !self.registered.contains(&dst)
            && !self.workloads.contains_key(&dst.ip())
    }

    /// The service without addresses that has `host` on `port`: an exact name first, then the
    /// longest `*.suffix` that matches.
    pub fn by_host(&self, port: u16, host: &str) -> Option<&ServiceTarget> {
        let targets = self.hosts.get(&port)?;
        let host = host.trim_end_matches('.');
        targets
            .iter()
            .find(|t| t.service.hostname.eq_ignore_ascii_case(host))
            .or_else(|| {
                targets
                    .iter()
                    .filter(|t| {
                        t.service.hostname.strip_prefix('*').is_some_and(|suffix| {
                            host.len() > suffix.len()
                                && host.as_bytes()[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
                        })
                    })
                    .max_by_key(|t| t.service.hostname.len())
            })
    }

    /// The mesh routes of a Service VIP:port, or of the services found by host on the port of
    /// an address the mesh does not know, when there are any.
    /// Whether HTTP/2 to `dst` is balanced at L4 rather than routed (see
    /// [`ServiceTarget::h2_at_l4`]).
    pub fn h2_at_l4(&self, dst: SocketAddr) -> bool {
        self.services.get(&dst).is_some_and(|t| t.h2_at_l4)
    }

    pub fn http(&self, dst: SocketAddr) -> Option<&CompiledListener> {
        match self.services.get(&dst) {
            Some(t) => t.http.as_deref(),
            None if self.by_host_on(dst) => self.host_routes.get(&dst.port()).map(|l| &**l),
            None => None,
        }
    }

    /// The Service at `dst` (one of its addresses and ports).
    pub fn service(&self, dst: SocketAddr) -> Option<&Arc<MeshService>> {
        self.services.get(&dst).map(|t| &t.service)
    }

    pub fn workload(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.workloads.get(&ip)
    }

    /// Where inbound traffic for `dst` (this workload's address) reaches the application: as
    /// addressed, unless an ingress listener of its Sidecar says otherwise.
    pub fn deliver(&self, dst: SocketAddr) -> SocketAddr {
        self.ingress
            .iter()
            .find(|r| r.port == dst.port())
            .map_or(dst, |r| r.deliver(dst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sidecar in zone-a whose Service `b` (PreferClose) has pods on nodes in zone-a and
    /// zone-b: connections try the zone-a pods first (one try each, but the last), then zone-b.
    #[test]
    fn a_prefer_close_service_keeps_connections_in_the_sidecars_zone() {
        let mut r = ferrum_snapshot::Resources::default();
        let node = |name: &str, zone: &str| {
            format!(
                "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}, labels: {{topology.kubernetes.io/zone: {zone}}}}}\n---\n"
            )
        };
        let pod = |name: &str, node: &str, ip: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: ns, labels: {{app: b}}}}\n\
                 spec: {{nodeName: {node}, containers: [{{name: c}}]}}\nstatus: {{podIP: {ip}}}\n---\n"
            )
        };
        let yaml = [
            node("n-a", "zone-a"),
            node("n-b", "zone-b"),
            pod("b-1", "n-b", "10.1.0.1"),
            pod("b-2", "n-a", "10.1.0.2"),
            pod("b-3", "n-b", "10.1.0.3"),
            pod("b-4", "n-a", "10.1.0.4"),
        ]
        .concat();
        let svc = |distribution: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: b, namespace: ns}}\n\
                 spec: {{clusterIP: 10.96.0.9, selector: {{app: b}}, ports: [{{port: 80}}]{distribution}}}\n"
            )
        };
        r.add_yaml(
            "m.yaml",
            &format!("{yaml}{}", svc(", trafficDistribution: PreferClose")),
        )
        .unwrap();
        let snap = ferrum_snapshot::translate(&r, 1, &Default::default()).snapshot;
        let zone = |name: &str| snap.workloads.iter().find(|w| w.name == name).unwrap().zone.clone();
        assert_eq!(
            zone("b-1").as_deref(),
            Some("zone-b"),
            "a workload's zone is its node's"
        );
        let index = |snap: &Snapshot, zone| {
            MeshIndex::build(
                snap,
                None,
                zone,
                MeshRoutes::default(),
                &JwksCache::default(),
                &Upstreams::none(),
            )
        };
        let tries = |m: &MeshIndex| -> Vec<Vec<u8>> {
            let Destination::Service(t) = m.destination("10.96.0.9:80".parse().unwrap()) else {
                panic!("the VIP is a service")
            };
            (0..20)
                .map(|_| {
                    (0..3)
                        .map(|skip| match t.pick(skip).unwrap().0.ip() {
                            IpAddr::V4(ip) => ip.octets()[3],
                            IpAddr::V6(_) => 0,
                        })
                        .collect()
                })
                .collect()
        };
        let local = [2u8, 4];
        for t in tries(&index(&snap, Some("zone-a"))) {
            assert!(local.contains(&t[0]) && local.contains(&t[1]) && t[0] != t[1], "{t:?}");
            assert!(!local.contains(&t[2]), "the last try leaves the zone: {t:?}");
        }
        // A connection's tries go to different endpoints (the second used to repeat the first
        // of two, the third the first of three).
        for t in tries(&index(&snap, None)) {
            assert!(t[0] != t[1] && t[1] != t[2] && t[0] != t[2], "{t:?}");
        }
        // Without PreferClose, or without a zone, every pod takes first tries.
        let firsts = |m: &MeshIndex| tries(m).iter().map(|t| t[0]).collect::<std::collections::BTreeSet<_>>();
        assert_eq!(firsts(&index(&snap, None)).len(), 4);
        let mut r = ferrum_snapshot::Resources::default();
        r.add_yaml("m.yaml", &format!("{yaml}{}", svc(""))).unwrap();
        let plain = ferrum_snapshot::translate(&r, 1, &Default::default()).snapshot;
        assert_eq!(firsts(&index(&plain, Some("zone-a"))).len(), 4);
    }

    /// The index of a sidecar in namespace `ns`.
    fn sidecar_index(snap: &Snapshot, ns: &str) -> MeshIndex {
        MeshIndex::build(
            snap,
            Some(&(ns.into(), "me".into())),
            None,
            MeshRoutes::default(),
            &JwksCache::default(),
            &Upstreams::none(),
        )
    }

    /// The sidecar of pod `me` relays whole what reaches it only by ports declared as another
    /// protocol than HTTP — MySQL's server speaks first — and sniffs the rest.
    #[test]
    fn ports_declared_opaque_are_relayed_whole() {
        let mut r = ferrum_snapshot::Resources::default();
        let svc = |name: &str, port: &str| {
            format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: ns}}\n\
                 spec: {{selector: {{app: db}}, ports: [{port}]}}\n"
            )
        };
        let yaml = [
            "apiVersion: v1\nkind: Pod\nmetadata: {name: me, namespace: ns, labels: {app: db}}\n\
             spec: {containers: [{name: c}]}\nstatus: {podIP: 10.1.0.5}\n"
                .to_string(),
            svc(
                "mysql",
                "{name: tcp-mysql, port: 3306}, {name: mysql-x, port: 3307, targetPort: 3307}",
            ),
            svc("web", "{name: http, port: 80, targetPort: 8080}, {port: 9000}"),
            // 7000 is declared TCP by one Service and HTTP by another: sniffed.
            svc("a", "{name: tcp, port: 7000}"),
            svc("b", "{name: http-admin, port: 7000}"),
        ]
        .concat();
        r.add_yaml("m.yaml", &yaml).unwrap();
        let snap = ferrum_snapshot::translate(&r, 1, &Default::default()).snapshot;
        let m = sidecar_index(&snap, "ns");
        let opaque: Vec<u16> = [3306, 3307, 8080, 9000, 7000, 5432]
            .into_iter()
            .filter(|p| m.opaque_inbound(*p))
            .collect();
        assert_eq!(
            opaque,
            [3306, 3307],
            "the others are HTTP, sniffed, or reached by no Service"
        );
    }

    #[test]
    fn vips_map_to_endpoints_with_their_target_ports_and_pod_ips_to_workloads() {
        let mut r = ferrum_snapshot::Resources::default();
        r.add_yaml(
            "m.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: b-1, namespace: ns, labels: {app: b, security.istio.io/tlsMode: istio}}\n\
             spec: {containers: [{name: c}]}\nstatus: {podIP: 10.1.0.2}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: b, namespace: ns}\n\
             spec: {clusterIP: 10.96.0.9, selector: {app: b}, ports: [{port: 80, targetPort: 8080}]}\n",
        )
        .unwrap();
        let snap = ferrum_snapshot::translate(&r, 1, &Default::default()).snapshot;
        let m = MeshIndex::build(
            &snap,
            None,
            None,
            MeshRoutes::default(),
            &JwksCache::default(),
            &Upstreams::none(),
        );
        let Destination::Service(t) = m.destination("10.96.0.9:80".parse().unwrap()) else {
            panic!("the VIP is a service")
        };
        let (addr, w) = t.pick(0).unwrap();
        assert_eq!(*addr, "10.1.0.2:8080".parse().unwrap());
        assert!(w.as_ref().is_some_and(|w| w.hbone && w.name == "b-1"));
        assert!(matches!(
            m.destination("10.96.0.9:81".parse().unwrap()),
            Destination::Passthrough
        ));
        assert!(matches!(
            m.destination("10.1.0.2:9000".parse().unwrap()),
            Destination::Workload(_)
        ));
        assert!(matches!(
            m.destination("1.1.1.1:443".parse().unwrap()),
            Destination::Passthrough
        ));
    }

    #[test]
    fn a_dual_stack_service_leads_each_vip_to_endpoints_of_its_family() {
        let mut r = ferrum_snapshot::Resources::default();
        r.add_yaml(
            "m.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: b-1, namespace: ns, labels: {app: b, security.istio.io/tlsMode: istio}}\n\
             spec: {containers: [{name: c}]}\nstatus: {podIP: 10.1.0.2, podIPs: [{ip: 10.1.0.2}, {ip: 'fd00::2'}]}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {name: c-1, namespace: ns, labels: {app: c}}\n\
             spec: {containers: [{name: c}]}\nstatus: {podIP: 10.1.0.3}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: b, namespace: ns}\n\
             spec: {clusterIP: 10.96.0.9, clusterIPs: [10.96.0.9, 'fd00:96::9'], selector: {app: b}, ports: [{port: 80, targetPort: 8080}]}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: c, namespace: ns}\n\
             spec: {clusterIP: 10.96.0.12, clusterIPs: [10.96.0.12, 'fd00:96::c'], selector: {app: c}, ports: [{port: 80}]}\n",
        )
        .unwrap();
        let snap = ferrum_snapshot::translate(&r, 1, &Default::default()).snapshot;
        let m = MeshIndex::build(
            &snap,
            None,
            None,
            MeshRoutes::default(),
            &JwksCache::default(),
            &Upstreams::none(),
        );
        let only = |vip: &str| {
            let Destination::Service(t) = m.destination(vip.parse().unwrap()) else {
                panic!("{vip} is a service")
            };
            assert_eq!(t.endpoints.len(), 1, "{vip}");
            t.endpoints[0].clone()
        };
        assert_eq!(only("10.96.0.9:80").0, "10.1.0.2:8080".parse().unwrap());
        let (v6, w) = only("[fd00:96::9]:80");
        assert_eq!(v6, "[fd00::2]:8080".parse().unwrap());
        assert!(
            w.is_some_and(|w| w.hbone),
            "the IPv6 endpoint is the same mesh workload"
        );
        assert!(matches!(
            m.destination("[fd00::2]:9000".parse().unwrap()),
            Destination::Workload(_)
        ));
        // A dual-stack Service none of whose endpoints has an IPv6 address (yet): its IPv6
        // address leads to the IPv4 ones rather than none.
        assert_eq!(only("[fd00:96::c]:80").0, "10.1.0.3:80".parse().unwrap());
    }

    #[test]
    fn a_service_exported_elsewhere_is_passthrough_for_this_sidecar() {
        let mut r = ferrum_snapshot::Resources::default();
        r.add_yaml(
            "m.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: b, namespace: ns, annotations: {networking.istio.io/exportTo: .}}\n\
             spec: {clusterIP: 10.96.0.9, ports: [{port: 80}]}\n",
        )
        .unwrap();
        let snap = ferrum_snapshot::translate(&r, 1, &Default::default()).snapshot;
        let vip = "10.96.0.9:80".parse().unwrap();
        let at = |ns: &str| sidecar_index(&snap, ns);
        assert!(matches!(at("ns").destination(vip), Destination::Service(_)));
        assert!(matches!(at("other").destination(vip), Destination::Passthrough));
    }

    /// An egress listener with a port: the Service is known on that port only.
    #[test]
    fn a_port_listener_leaves_the_services_other_ports_outside() {
        let mut r = ferrum_snapshot::Resources::default();
        r.add_yaml(
            "m.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: b, namespace: ns}\n\
             spec: {clusterIP: 10.96.0.9, ports: [{name: http, port: 80}, {name: admin, port: 9000}]}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: default, namespace: ns}\n\
             spec: {egress: [{port: {number: 80}, hosts: ['./*']}]}\n",
        )
        .unwrap();
        let snap = ferrum_snapshot::translate(&r, 1, &Default::default()).snapshot;
        let m = sidecar_index(&snap, "ns");
        assert!(matches!(
            m.destination("10.96.0.9:80".parse().unwrap()),
            Destination::Service(_)
        ));
        assert!(matches!(
            m.destination("10.96.0.9:9000".parse().unwrap()),
            Destination::Passthrough
        ));
    }

    /// A Sidecar narrows what the proxy knows; under REGISTRY_ONLY the rest is refused, while
    /// the workloads behind known Services stay reachable by their addresses.
    #[test]
    fn a_registry_only_sidecar_refuses_what_it_does_not_know() {
        let mut r = ferrum_snapshot::Resources::default();
        r.add_yaml(
            "m.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: b-1, namespace: ns, labels: {app: b}}\n\
             spec: {containers: [{name: c}]}\nstatus: {podIP: 10.1.0.2}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: b, namespace: ns}\n\
             spec: {clusterIP: 10.96.0.9, selector: {app: b}, ports: [{port: 80}]}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: c, namespace: other}\n\
             spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: default, namespace: ns}\n\
             spec: {egress: [{hosts: ['./*']}], outboundTrafficPolicy: {mode: REGISTRY_ONLY}}\n",
        )
        .unwrap();
        let snap = ferrum_snapshot::translate(&r, 1, &Default::default()).snapshot;
        let at = |ns: &str| sidecar_index(&snap, ns);
        let (ns, other) = (at("ns"), at("other"));
        let dst = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(matches!(ns.destination(dst("10.96.0.9:80")), Destination::Service(_)));
        assert!(matches!(ns.destination(dst("10.96.0.10:80")), Destination::Blocked));
        assert!(matches!(ns.destination(dst("1.1.1.1:443")), Destination::Blocked));
        assert!(matches!(ns.destination(dst("10.1.0.2:80")), Destination::Workload(_)));
        // The Sidecar is ns's: elsewhere every Service is known and the rest passes through.
        assert!(matches!(
            other.destination(dst("10.96.0.10:80")),
            Destination::Service(_)
        ));
        assert!(matches!(
            other.destination(dst("1.1.1.1:443")),
            Destination::Passthrough
        ));
    }

    /// ServiceEntries under REGISTRY_ONLY: a STATIC entry's address leads to its endpoints, a
    /// DNS one's to names resolved when connecting, a NONE one's address is let through as
    /// dialled; addresses no entry names are still refused.
    #[test]
    fn service_entries_are_known_to_a_registry_only_sidecar() {
        let mut r = ferrum_snapshot::Resources::default();
        r.add_yaml(
            "m.yaml",
            "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: default, namespace: ns}\n\
             spec: {outboundTrafficPolicy: {mode: REGISTRY_ONLY}}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: fixed, namespace: ns}\n\
             spec: {hosts: [a.example.com], addresses: [240.0.0.1], resolution: STATIC, ports: [{number: 80, name: http, targetPort: 8080}],\n\
                    endpoints: [{address: 192.0.2.1}, {address: 192.0.2.2}]}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: named, namespace: ns}\n\
             spec: {hosts: [b.example.com], addresses: [240.0.0.2], resolution: DNS, ports: [{number: 443, name: tls}]}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: real, namespace: ns}\n\
             spec: {hosts: [db.example.com], addresses: [203.0.113.5], ports: [{number: 3306, name: mysql}]}\n",
        )
        .unwrap();
        let snap = ferrum_snapshot::translate(&r, 1, &Default::default()).snapshot;
        let m = sidecar_index(&snap, "ns");
        let dst = |s: &str| s.parse::<SocketAddr>().unwrap();
        let Destination::Service(t) = m.destination(dst("240.0.0.1:80")) else {
            panic!("the STATIC entry's address is a service")
        };
        let picked: Vec<SocketAddr> = (0..2).map(|_| t.pick(0).unwrap().0).collect();
        assert!(
            picked.contains(&dst("192.0.2.1:8080")) && picked.contains(&dst("192.0.2.2:8080")),
            "{picked:?}"
        );
        assert!(t.pick(0).unwrap().1.is_none(), "outside the mesh: plain TCP");
        let Destination::Service(t) = m.destination(dst("240.0.0.2:443")) else {
            panic!("the DNS entry's address is a service")
        };
        assert_eq!(
            (t.pick(0), t.pick_name(0)),
            (None, Some(&(Arc::from("b.example.com"), 443)))
        );
        assert!(matches!(
            m.destination(dst("203.0.113.5:3306")),
            Destination::Passthrough
        ));
        assert!(
            matches!(m.destination(dst("203.0.113.5:80")), Destination::Blocked),
            "another port"
        );
        assert!(matches!(m.destination(dst("240.0.0.1:81")), Destination::Blocked));
    }

    /// Entries without addresses are found by the host a connection asks for, on their ports
    /// only: an exact name before the longest wildcard.
    #[test]
    fn entries_without_addresses_are_found_by_host() {
        let mut r = ferrum_snapshot::Resources::default();
        let entry = |name: &str, hosts: &str, extra: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: ns}}\n\
                 spec: {{hosts: [{hosts}], ports: [{{number: 443, name: tls, protocol: TLS}}]{extra}}}\n---\n"
            )
        };
        r.add_yaml(
            "m.yaml",
            &[
                entry("exact", "pay.example.com", ", resolution: DNS"),
                entry("wide", "'*.example.com'", ""),
                entry(
                    "narrow",
                    "'*.eu.example.com'",
                    ", resolution: STATIC, endpoints: [{address: 192.0.2.7}]",
                ),
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: db, namespace: ns}\n\
                 spec: {hosts: [db.example.com], ports: [{number: 3306, name: mysql, protocol: MYSQL}]}\n---\n"
                    .into(),
            ]
            .concat(),
        )
        .unwrap();
        let snap = ferrum_snapshot::translate(&r, 1, &Default::default()).snapshot;
        let m = sidecar_index(&snap, "ns");
        let dst = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(m.by_host_on(dst("198.51.100.1:443")));
        assert!(!m.by_host_on(dst("198.51.100.1:80")), "no entry has port 80");
        assert!(
            !m.by_host_on(dst("198.51.100.1:3306")),
            "an opaque port is decided by address, unsniffed"
        );
        let key = |host: &str| m.by_host(443, host).map(|t| t.service.key.as_str());
        assert_eq!(key("PAY.example.com."), Some("ns/exact/pay.example.com"));
        assert_eq!(key("shop.example.com"), Some("ns/wide/*.example.com"));
        assert_eq!(key("a.eu.example.com"), Some("ns/narrow/*.eu.example.com"));
        assert_eq!(key("example.com"), None, "a wildcard needs a label before its suffix");
        assert_eq!(key("example.org"), None);
        assert_eq!(m.by_host(80, "pay.example.com").map(|t| t.port), None);
        let narrow = m.by_host(443, "a.eu.example.com").unwrap();
        assert_eq!(narrow.pick(0).map(|e| e.0), Some(dst("192.0.2.7:443")));
    }
}
