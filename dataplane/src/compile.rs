//! Snapshot → the compiled form the request path reads: host tables, route indexes, cluster
//! runtimes, TLS configs. A snapshot that fails here is rejected whole.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use ferrum_snapshot::mesh::PolicyRule;
use ferrum_snapshot::model::{Action as SnapAction, ClientAddress, Protocol};
use ferrum_snapshot::{Secrets, Snapshot};

use crate::listener::tls::{self, TlsError};
use crate::mesh::index::{MeshIndex, MeshRoutes};
use crate::mesh::policy::{GatewayPolicies, Upstreams};
use crate::router::{self, HostTable, RouteError, RouteParts, VirtualHost};
use crate::telemetry::{EndpointHealth, Registry};
use crate::upstream::{ClusterError, ClusterRuntime};

pub struct Compiled {
    pub snapshot: Arc<Snapshot>,
    /// By bound address and port: a connection knows the listener that accepted it.
    pub listeners: crate::router::FastMap<SocketAddr, CompiledListener>,
    pub clusters: HashMap<String, Arc<ClusterRuntime>>,
    /// Services and workloads by address, for sidecar capture.
    pub mesh: MeshIndex,
}

pub struct CompiledListener {
    pub name: String,
    pub https: bool,
    /// TCP and TLS listeners forward connections as bytes ([`crate::tcp::forward`]); `tls`
    /// is set on a TLS listener that terminates TLS first.
    pub protocol: Protocol,
    pub hosts: HostTable,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Each request is logged (see [`crate::access_log`]).
    pub access_log: bool,
    /// PROXY protocol and trusted `X-Forwarded-For` hops (see [`crate::listener::client`]).
    pub client_address: ClientAddress,
    /// A Service port's mesh routes, serving a sidecar's captured outbound connections: its
    /// requests are this workload's calls.
    pub outbound: bool,
}

impl Compiled {
    pub fn empty() -> Self {
        Compiled {
            snapshot: Arc::new(Snapshot::default()),
            listeners: Default::default(),
            clusters: HashMap::new(),
            mesh: MeshIndex::default(),
        }
    }

    pub fn health(&self) -> Vec<EndpointHealth> {
        let mut out = Vec::new();
        let mut names: Vec<&String> = self.clusters.keys().collect();
        names.sort();
        for n in names {
            self.clusters[n].health_report(&mut out);
        }
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("invalid snapshot:\n  {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  "))]
    Invalid(Vec<ferrum_snapshot::InvalidSnapshot>),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

pub struct Compiler {
    registry: Arc<Registry>,
    workers: usize,
    /// A mesh proxy's side of the upstreams, for every cluster's connector.
    pub mesh: crate::upstream::MeshSlot,
    /// JWKS fetched for RequestAuthentications, kept across configs.
    jwks: crate::mesh::jwt::JwksCache,
    /// The pod a sidecar serves (its inbound policies are compiled for it).
    pub me: std::sync::OnceLock<crate::mesh::index::Me>,
    /// The zone the proxy runs in, when known.
    pub zone: std::sync::OnceLock<String>,
    /// Rate limits' counts, kept across configs.
    pub limiters: crate::ratelimit::Limiters,
}

impl Compiler {
    pub fn new(registry: Arc<Registry>, workers: usize) -> Self {
        Compiler {
            registry,
            workers,
            mesh: Default::default(),
            jwks: Default::default(),
            me: Default::default(),
            zone: Default::default(),
            limiters: Default::default(),
        }
    }

    /// Compiles `snap` (the key pairs it names from `secrets`), reusing cluster runtimes of
    /// `previous` whose spec is unchanged (pools, health and counters carry on) and endpoint
    /// state of those that changed.
    pub fn compile(&self, snap: Snapshot, secrets: &Secrets, previous: &Compiled) -> Result<Compiled, CompileError> {
        ferrum_snapshot::validate(&snap).map_err(CompileError::Invalid)?;
        // The proxy's zone: given, else (a sidecar) its pod's node's.
        let zone = self.zone.get().cloned().or_else(|| {
            let (ns, pod) = self.me.get()?;
            let own = snap.workloads.iter().find(|w| &w.namespace == ns && &w.name == pod)?;
            own.zone.clone()
        });
        let zone = zone.as_deref();
        let clusters = self.clusters(&snap, secrets, previous, zone)?;
        let upstreams = Upstreams {
            clusters: &clusters,
            registry: &self.registry,
        };
        let mut listeners = crate::router::FastMap::with_capacity_and_hasher(snap.listeners.len(), Default::default());
        for l in &snap.listeners {
            if l.protocol == Protocol::Unknown {
                tracing::warn!(listener = %l.name, "listener protocol unknown to this build (a newer producer); not served");
                continue;
            }
            // validate() checked the address parses.
            let addr = SocketAddr::new(
                l.address.parse().unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into()),
                l.port,
            );
            listeners.insert(addr, self.listener(l, &snap, &upstreams, secrets)?);
        }
        let me = self.me.get();
        let mesh_http = match me {
            Some(me) => {
                let own = snap.workload_or_placeholder(&me.0, &me.1);
                self.mesh_routes(&snap, &own, &clusters)?
            }
            None => MeshRoutes::default(),
        };
        Ok(Compiled {
            mesh: MeshIndex::build(&snap, me, zone, mesh_http, &self.jwks, &upstreams),
            snapshot: Arc::new(snap),
            listeners,
            clusters,
        })
    }

    /// The runtimes of `snap`'s clusters: `previous`'s where the spec (and zone) is the same.
    fn clusters(
        &self,
        snap: &Snapshot,
        secrets: &Secrets,
        previous: &Compiled,
        zone: Option<&str>,
    ) -> Result<HashMap<String, Arc<ClusterRuntime>>, CompileError> {
        let mut clusters = HashMap::with_capacity(snap.clusters.len());
        for c in &snap.clusters {
            // Only locality failover looks at the zone.
            let zone = zone.filter(|_| c.locality_failover);
            let rt = match previous.clusters.get(&c.name) {
                Some(prev) if prev.spec == **c && prev.zone.as_deref() == zone => prev.clone(),
                prev => ClusterRuntime::new(
                    c,
                    prev.map(|p| &**p),
                    self.registry.cluster(&c.name),
                    self.workers,
                    &self.mesh,
                    secrets,
                    zone,
                )?,
            };
            clusters.insert(c.name.clone(), rt);
        }
        Ok(clusters)
    }

    fn listener(
        &self,
        l: &ferrum_snapshot::model::Listener,
        snap: &Snapshot,
        upstreams: &Upstreams<'_>,
        secrets: &Secrets,
    ) -> Result<CompiledListener, CompileError> {
        let mut vhosts = Vec::with_capacity(l.virtual_hosts.len());
        // One compiled policy set per distinct set of Gateways.
        let mut policies: HashMap<Vec<&str>, Option<Arc<GatewayPolicies>>> = HashMap::new();
        for vh in &l.virtual_hosts {
            let mut compiled = self.virtual_host(vh, upstreams.clusters)?;
            compiled.policies = policies
                .entry(l.gateways_of(&vh.hostname))
                .or_insert_with_key(|gws| {
                    GatewayPolicies::for_gateways(&snap.policies, gws, &self.jwks, upstreams).map(Arc::new)
                })
                .clone();
            vhosts.push((vh.hostname.to_ascii_lowercase(), compiled));
        }
        let tls = match l.protocol {
            Protocol::Https => Some(tls::server_config(&l.name, &l.certificates, secrets)?),
            Protocol::Tls if !l.certificates.is_empty() => {
                // Bytes go on as they come: no ALPN is negotiated for the backend.
                let mut cfg = (*tls::server_config(&l.name, &l.certificates, secrets)?).clone();
                cfg.alpn_protocols.clear();
                Some(Arc::new(cfg))
            }
            Protocol::Http | Protocol::Tcp | Protocol::Tls | Protocol::Unknown => None,
        };
        Ok(CompiledListener {
            name: l.name.clone(),
            https: l.protocol == Protocol::Https,
            protocol: l.protocol,
            hosts: HostTable::build(vhosts),
            tls,
            access_log: l.access_log,
            client_address: l.client_address,
            outbound: false,
        })
    }

    fn virtual_host(
        &self,
        vh: &ferrum_snapshot::model::VirtualHost,
        clusters: &HashMap<String, Arc<ClusterRuntime>>,
    ) -> Result<VirtualHost, RouteError> {
        VirtualHost::build(vh, |r| {
            Ok(RouteParts {
                action: match &r.action {
                    _ if r.direct_response.is_some() => {
                        let d = r.direct_response.as_ref().expect("checked");
                        router::Action::Respond(Box::new(router::Direct::new(d)))
                    }
                    SnapAction::Redirect(rd) => router::Action::Redirect(rd.clone()),
                    SnapAction::Forward(targets) => {
                        let mut cum = 0;
                        router::Action::Forward(
                            targets
                                .iter()
                                .map(|t| {
                                    cum += t.weight;
                                    let target = router::Target {
                                        // validate() guarantees every named cluster exists.
                                        cluster: t.cluster.as_ref().and_then(|c| clusters.get(c).cloned()),
                                        headers: t
                                            .headers
                                            .as_deref()
                                            .map(|h| router::BackendMods::build(h, &r.name))
                                            .transpose()?
                                            .map(Box::new),
                                    };
                                    Ok((cum, target))
                                })
                                .collect::<Result<_, RouteError>>()?,
                        )
                    }
                },
                mirrors: r
                    .mirrors()
                    .filter_map(|m| Some((clusters.get(&m.cluster)?.clone(), m.per_million)))
                    .collect(),
                stats: self.registry.route(&r.name),
                limits: r
                    .rate_limits
                    .iter()
                    .map(|l| self.limiters.get(l, self.registry.rate_limit(&l.name)))
                    .collect(),
            })
        })
    }

    /// The mesh routes workload `own` follows as a client: per (service, port), served like a
    /// listener whose one virtual host takes any Host (GAMMA ignores route hostnames); for
    /// services found by host (ServiceEntries without addresses), per port, a virtual host each;
    /// per (service, port), its L4 route. Routes for other clients (a source match `own` does
    /// not meet) are left out here, so requests never look at them.
    fn mesh_routes(
        &self,
        snap: &Snapshot,
        own: &ferrum_snapshot::mesh::Workload,
        clusters: &HashMap<String, Arc<ClusterRuntime>>,
    ) -> Result<MeshRoutes, RouteError> {
        let namespace = own.namespace.as_str();
        let mine = |routes: &[Arc<ferrum_snapshot::model::Route>]| -> Vec<Arc<ferrum_snapshot::model::Route>> {
            routes
                .iter()
                .filter(|r| {
                    r.matcher
                        .source
                        .as_ref()
                        .is_none_or(|s| s.admits(&own.labels, namespace))
                })
                .cloned()
                .collect()
        };
        let mut out = MeshRoutes::default();
        let mut hosted: HashMap<u16, Vec<_>> = HashMap::new();
        for s in snap.services.iter().filter(|s| !s.routes.is_empty()) {
            for p in &s.ports {
                let Some(t) = s.routes_for(p.port, namespace) else {
                    continue;
                };
                let host = if s.by_host { s.hostname.as_str() } else { "*" };
                let vh = ferrum_snapshot::model::VirtualHost {
                    hostname: host.into(),
                    routes: mine(&t.routes),
                };
                let built = self.virtual_host(&vh, clusters)?;
                if s.by_host {
                    hosted.entry(p.port).or_default().push((host.to_string(), built));
                    continue;
                }
                let l = mesh_listener(format!("{}:{}", s.hostname, p.port), vec![("*".into(), built)]);
                out.by_service.insert((s.key.clone(), p.port), Arc::new(l));
            }
        }
        for (port, vhosts) in hosted {
            out.by_host
                .insert(port, Arc::new(mesh_listener(format!("hosts:{port}"), vhosts)));
        }
        for s in snap.services.iter().filter(|s| !s.tcp_routes.is_empty()) {
            for p in &s.ports {
                let Some(t) = s.tcp_routes_for(p.port, namespace) else {
                    continue;
                };
                // The first route for this client; none: plain balancing.
                let Some(first) = mine(&t.routes).into_iter().next() else {
                    continue;
                };
                let vh = ferrum_snapshot::model::VirtualHost {
                    hostname: "*".into(),
                    routes: vec![first],
                };
                out.tcp
                    .insert((s.key.clone(), p.port), Arc::new(self.virtual_host(&vh, clusters)?));
            }
        }
        Ok(out)
    }

    /// Drops the metrics of routes and clusters `serving` no longer has. Called only once it
    /// serves: a config that fails later (a busy port) must not hide the metrics of the one that
    /// keeps serving.
    pub fn prune_metrics(&self, serving: &Compiled) {
        let all_routes = || {
            serving
                .snapshot
                .listeners
                .iter()
                .flat_map(|l| &l.virtual_hosts)
                .flat_map(|v| &v.routes)
                .chain(serving.snapshot.services.iter().flat_map(|s| s.all_routes()))
        };
        let routes: std::collections::HashSet<&str> = all_routes().map(|r| r.name.as_str()).collect();
        let limits: std::collections::HashSet<&str> = all_routes()
            .flat_map(|r| &r.rate_limits)
            .map(|l| l.name.as_str())
            .collect();
        let providers: std::collections::HashSet<&str> = serving
            .snapshot
            .policies
            .iter()
            .filter_map(|p| match &p.rule {
                PolicyRule::Authorization(a) => a.check.as_ref().map(|c| c.provider.as_str()),
                _ => None,
            })
            .collect();
        self.registry.retain(
            &|r| routes.contains(r),
            &|c| serving.clusters.contains_key(c),
            &|p| providers.contains(p),
            &|l| limits.contains(l),
        );
    }
}

/// A captured connection's listener for mesh routes: plain HTTP, virtual hosts as given.
fn mesh_listener(name: String, vhosts: Vec<(String, VirtualHost)>) -> CompiledListener {
    CompiledListener {
        name,
        https: false,
        protocol: Protocol::Http,
        hosts: HostTable::build(vhosts),
        tls: None,
        access_log: false,
        client_address: ClientAddress::default(),
        outbound: true,
    }
}

#[cfg(test)]
mod tests {
    use ferrum_snapshot::model::Protocol;
    use ferrum_snapshot::translate::{Options, translate};

    use super::*;

    /// A Gateway with two listeners on port 8080 at different addresses, routing to `echo`
    /// (endpoints `hosts`) and `web`.
    fn snapshot(echo_hosts: &[&str]) -> Snapshot {
        let eps: Vec<String> = echo_hosts.iter().map(|h| format!("{{addresses: [{h}]}}")).collect();
        let yaml = format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: gw, namespace: default}}\n\
             spec:\n  gatewayClassName: ferrum\n  addresses: [{{value: 127.0.0.2}}]\n  listeners:\n\
             \x20 - {{name: http, port: 8080, protocol: HTTP, hostname: a.example}}\n---\n\
             apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: other, namespace: default}}\n\
             spec:\n  gatewayClassName: ferrum\n  addresses: [{{value: 127.0.0.3}}]\n  listeners:\n\
             \x20 - {{name: http, port: 8080, protocol: HTTP, hostname: b.example}}\n---\n\
             apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: default}}\n\
             spec:\n  parentRefs: [{{name: gw}}, {{name: other}}]\n  rules:\n\
             \x20 - backendRefs: [{{name: echo, port: 80, weight: 3}}, {{name: web, port: 80, weight: 1}}]\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {{name: echo, namespace: default}}\n\
             spec: {{ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\n\
             spec: {{ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: echo-1, namespace: default, labels: {{kubernetes.io/service-name: echo}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{}]\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: web-1, namespace: default, labels: {{kubernetes.io/service-name: web}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{{addresses: [10.0.9.1]}}]\n",
            eps.join(", ")
        );
        let mut res = ferrum_snapshot::Resources::default();
        res.add_yaml("test.yaml", &yaml).unwrap();
        let t = translate(&res, 1, &Options::default());
        assert!(t.problems.is_empty(), "{:?}", t.problems);
        t.snapshot
    }

    fn compiler() -> Compiler {
        Compiler::new(Arc::new(Registry::default()), 2)
    }

    const ECHO: &str = "service/default/echo:80";
    const WEB: &str = "service/default/web:80";

    /// Two Gateways on one port at different addresses are two listeners, each with its own
    /// hosts — keyed by port alone, one would silently replace the other.
    #[tokio::test]
    async fn listeners_are_keyed_by_address_and_port() {
        let c = compiler().compile(snapshot(&["10.0.0.1"]), &Secrets::default(), &Compiled::empty());
        let c = c.unwrap();
        let at = |ip: &str| &c.listeners[&format!("{ip}:8080").parse::<SocketAddr>().unwrap()];
        assert_eq!(c.listeners.len(), 2);
        assert!(at("127.0.0.2").hosts.find("a.example").is_some());
        assert!(at("127.0.0.2").hosts.find("b.example").is_none());
        assert!(at("127.0.0.3").hosts.find("b.example").is_some());
    }

    /// A new config keeps the runtime of every unchanged cluster (pools, health, counters), and
    /// for a changed one the state of each endpoint it still has.
    #[tokio::test]
    async fn unchanged_clusters_and_kept_endpoints_carry_over() {
        let comp = compiler();
        let first = comp
            .compile(
                snapshot(&["10.0.0.1", "10.0.0.2"]),
                &Secrets::default(),
                &Compiled::empty(),
            )
            .unwrap();
        let second = comp
            .compile(snapshot(&["10.0.0.2", "10.0.0.3"]), &Secrets::default(), &first)
            .unwrap();
        assert!(Arc::ptr_eq(&first.clusters[WEB], &second.clusters[WEB]));
        let (old, new) = (&first.clusters[ECHO], &second.clusters[ECHO]);
        assert!(!Arc::ptr_eq(old, new));
        let state = |rt: &ClusterRuntime, key: &str| rt.endpoints.iter().find(|e| e.key == key).cloned();
        let kept = |key: &str| match (state(old, key), state(new, key)) {
            (Some(a), Some(b)) => Arc::ptr_eq(&a, &b),
            _ => false,
        };
        assert!(kept("10.0.0.2:8080"), "an endpoint in both keeps its state");
        assert!(state(new, "10.0.0.1:8080").is_none());
        assert!(state(new, "10.0.0.3:8080").is_some() && !kept("10.0.0.3:8080"));
        let health: Vec<String> = second.health().into_iter().map(|h| h.endpoint).collect();
        assert_eq!(health, ["10.0.0.2:8080", "10.0.0.3:8080", "10.0.9.1:8080"]);
    }

    /// A snapshot that does not validate is refused whole with every problem named; one with a
    /// listener kind from a newer producer serves everything else.
    #[tokio::test]
    async fn invalid_snapshots_are_refused_and_unknown_listeners_skipped() {
        let mut bad = snapshot(&["10.0.0.1"]);
        bad.listeners[0].port = 0;
        Arc::make_mut(&mut bad.clusters[0]).endpoints[0].port = 0;
        let err = compiler()
            .compile(bad, &Secrets::default(), &Compiled::empty())
            .err()
            .expect("refused");
        let CompileError::Invalid(problems) = &err else {
            panic!("{err}")
        };
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["endpoints[0].port", "port"], "{err}");

        let mut newer = snapshot(&["10.0.0.1"]);
        newer.listeners[0].protocol = Protocol::Unknown;
        let c = compiler()
            .compile(newer, &Secrets::default(), &Compiled::empty())
            .unwrap();
        assert_eq!(c.listeners.len(), 1);
        assert_eq!(c.clusters.len(), 2);
    }

    /// A sidecar routes HTTP/2 on a port that declares no protocol when its routes' clusters
    /// follow the client's protocol (gRPC keeps HTTP/2 end to end); a snapshot whose routes
    /// there send to an HTTP/1.1-only cluster (an older operator's) leaves it at L4.
    #[tokio::test]
    async fn http2_on_a_sniffed_port_is_routed_only_to_clusters_that_speak_it() {
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: shop}\n\
             spec: {clusterIP: 10.96.0.9, ports: [{port: 9090, targetPort: 9090}, {name: http, port: 80, targetPort: 9090}]}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: echo-v1, namespace: shop}\n\
             spec: {clusterIP: 10.96.0.10, ports: [{port: 9090, targetPort: 9090}]}\n---\n\
             apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: shop}\n\
             spec:\n  parentRefs: [{group: '', kind: Service, name: echo, port: 9090}, {group: '', kind: Service, name: echo, port: 80}]\n\
             \x20 rules: [{backendRefs: [{name: echo-v1, port: 9090}]}]\n";
        let mut res = ferrum_snapshot::Resources::default();
        res.add_yaml("test.yaml", yaml).unwrap();
        let t = translate(&res, 1, &Options::default());
        assert!(t.problems.is_empty(), "{:?}", t.problems);
        let sidecar = || {
            let c = compiler();
            c.me.set(("shop".into(), "client".into())).unwrap();
            c
        };
        let (sniffed, declared): (SocketAddr, SocketAddr) =
            ("10.96.0.9:9090".parse().unwrap(), "10.96.0.9:80".parse().unwrap());
        let c = sidecar()
            .compile(t.snapshot.clone(), &Secrets::default(), &Compiled::empty())
            .unwrap();
        assert!(c.mesh.http(sniffed).is_some() && c.mesh.http(declared).is_some());
        assert!(!c.mesh.h2_at_l4(sniffed), "its route's cluster follows the client");
        assert!(!c.mesh.h2_at_l4(declared));

        let mut older = t.snapshot;
        for s in &mut older.services {
            for table in &mut Arc::make_mut(s).routes {
                for r in &mut table.routes {
                    Arc::make_mut(r).rename_clusters(|c| c.trim_end_matches("#client").to_string());
                }
            }
        }
        let c = sidecar()
            .compile(older, &Secrets::default(), &Compiled::empty())
            .unwrap();
        assert!(c.mesh.h2_at_l4(sniffed), "an HTTP/1.1 cluster would break gRPC: L4");
        assert!(
            !c.mesh.h2_at_l4(declared),
            "a port declared HTTP says what its clients speak"
        );
    }
}
