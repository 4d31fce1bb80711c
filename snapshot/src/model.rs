//! The snapshot: the fully resolved configuration a proxy needs, and nothing else.
//!
//! Every collection is a `Vec` or `BTreeMap` so the JSON form (and therefore the content hash) is
//! deterministic. Durations are whole milliseconds for the same reason.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

pub use crate::mesh::{Keyed, Mesh, MeshEndpoint, MeshService, Policy, ServicePort, SidecarScope, Workload};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    /// Monotonic version assigned by the producer; consumers acknowledge it.
    pub version: u64,
    /// The producer's [`SCHEMA`]. A consumer that is older cannot recompute the hash of content
    /// it does not know (it drops unknown fields and kinds when parsing), so it takes the
    /// producer's hash as given instead of refusing the snapshot.
    #[serde(default)]
    pub schema: u32,
    /// Hex SHA-256 of the content (everything but `version`, `schema` and `hash`).
    pub hash: String,
    pub listeners: Vec<Listener>,
    /// Shared (`Arc`) so a producer that keeps its parts between snapshots does not copy them.
    pub clusters: Vec<Arc<Cluster>>,
    /// The mesh: pods and the Services in front of them, in key order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workloads: Vec<Arc<Workload>>,
    /// Services carry how they resolve and whether they are matched by host (ServiceEntries,
    /// schema 5).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<Arc<MeshService>>,
    /// Security policies (AuthorizationPolicy, PeerAuthentication), in key order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<Arc<Policy>>,
    /// Istio Sidecars: which Services a workload's proxy knows (schema 3), where its inbound
    /// traffic goes (schema 4).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sidecars: Vec<Arc<SidecarScope>>,
}

/// The snapshot format this build writes and fully understands. Raise it when a field or kind
/// is added that older consumers would drop.
pub const SCHEMA: u32 = 14;

/// SHA-256 of one part of a snapshot.
pub type Digest = [u8; 32];

/// Digests of a snapshot's parts, in snapshot order: per listener, per virtual host (over its
/// routes' digests); and per cluster. A producer that keeps them (the operator's incremental translator) stamps a
/// new snapshot's hash by hashing only what changed.
#[derive(Debug, Clone, Default)]
pub struct PartDigests {
    /// Per listener, per virtual host.
    pub virtual_hosts: Vec<Vec<Digest>>,
    pub clusters: Vec<Digest>,
    pub workloads: Vec<Digest>,
    pub services: Vec<Digest>,
    pub policies: Vec<Digest>,
    pub sidecars: Vec<Digest>,
}

impl Workload {
    pub fn digest(&self) -> Digest {
        digest_json(self)
    }
}

impl MeshService {
    pub fn digest(&self) -> Digest {
        digest_json(self)
    }
}

impl Policy {
    pub fn digest(&self) -> Digest {
        digest_json(self)
    }
}

impl SidecarScope {
    pub fn digest(&self) -> Digest {
        digest_json(self)
    }
}

fn digest_json<T: Serialize + ?Sized>(v: &T) -> Digest {
    let mut h = Sha256::new();
    serde_json::to_writer(DigestWriter(&mut h), v).expect("snapshot parts serialise");
    h.finalize().into()
}

/// Streams JSON straight into the hasher (no intermediate buffer).
struct DigestWriter<'a>(&'a mut Sha256);

impl std::io::Write for DigestWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Route {
    pub fn digest(&self) -> Digest {
        digest_json(self)
    }

    /// A route that matches everything and only forwards (an L4 route, a default route).
    pub fn forward(name: String, targets: Vec<WeightedCluster>) -> Route {
        Route {
            name,
            matcher: RouteMatch::default(),
            request_headers: HeaderModifier::default(),
            response_headers: HeaderModifier::default(),
            rewrite: None,
            action: Action::Forward(targets),
            timeouts: RouteTimeouts::default(),
            retry: None,
            fault: None,
            mirror: None,
            more_mirrors: Vec::new(),
            cors: None,
            direct_response: None,
            rate_limits: Vec::new(),
        }
    }

    /// Every cluster the route sends to, its mirrors' included.
    pub fn clusters(&self) -> impl Iterator<Item = &str> {
        let targets = match &self.action {
            Action::Forward(t) => t.as_slice(),
            Action::Redirect(_) => &[],
        };
        let mirrors = self.mirrors().map(|m| m.cluster.as_str());
        targets.iter().filter_map(|t| t.cluster.as_deref()).chain(mirrors)
    }

    /// Renames every cluster the route sends to (its mirrors' included) by `rename`.
    pub fn rename_clusters(&mut self, mut rename: impl FnMut(&str) -> String) {
        if let Action::Forward(targets) = &mut self.action {
            for c in targets.iter_mut().filter_map(|t| t.cluster.as_mut()) {
                *c = rename(c);
            }
        }
        for m in self.mirror.iter_mut().chain(&mut self.more_mirrors) {
            m.cluster = rename(&m.cluster);
        }
    }

    /// Every mirror of the route: `mirror`, then `more_mirrors`.
    pub fn mirrors(&self) -> impl Iterator<Item = &Mirror> {
        self.mirror.iter().chain(&self.more_mirrors)
    }

    /// Sets the route's mirrors: the first in `mirror`, the rest in `more_mirrors`.
    pub fn set_mirrors(&mut self, all: Vec<Mirror>) {
        let mut all = all.into_iter();
        self.mirror = all.next();
        self.more_mirrors = all.collect();
    }
}

impl Cluster {
    pub fn digest(&self) -> Digest {
        digest_json(self)
    }
}

impl Keyed for Cluster {
    fn key(&self) -> &str {
        &self.name
    }
}

impl VirtualHost {
    pub fn digest(&self) -> Digest {
        let digests: Vec<Digest> = self.routes.iter().map(|r| r.digest()).collect();
        vhost_digest(&self.hostname, &digests)
    }
}

/// A virtual host's digest from its routes' digests.
pub fn vhost_digest<'a>(hostname: &str, routes: impl IntoIterator<Item = &'a Digest>) -> Digest {
    let mut vh = Sha256::new();
    vh.update(hostname.as_bytes());
    vh.update([0]);
    for r in routes {
        vh.update(r);
    }
    vh.finalize().into()
}

/// A listener without its virtual hosts: what is hashed (and sent in a delta) for the listener itself.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ListenerHead<'a> {
    name: &'a str,
    address: &'a str,
    port: u16,
    protocol: Protocol,
    certificates: &'a [Certificate],
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    gateways: &'a [String],
    #[serde(skip_serializing_if = "<[GatewayHost]>::is_empty")]
    gateway_hosts: &'a [GatewayHost],
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    access_log: bool,
    #[serde(skip_serializing_if = "ClientAddress::is_default")]
    client_address: ClientAddress,
}

impl Listener {
    fn head_digest(&self) -> Digest {
        digest_json(&ListenerHead {
            name: &self.name,
            address: &self.address,
            port: self.port,
            protocol: self.protocol,
            certificates: &self.certificates,
            gateways: &self.gateways,
            gateway_hosts: &self.gateway_hosts,
            access_log: self.access_log,
            client_address: self.client_address,
        })
    }
}

impl Snapshot {
    /// Builds a snapshot and stamps its content hash.
    pub fn new(version: u64, listeners: Vec<Listener>, clusters: Vec<Arc<Cluster>>) -> Self {
        let mut s = Snapshot {
            version,
            schema: SCHEMA,
            hash: String::new(),
            listeners,
            clusters,
            workloads: Vec::new(),
            services: Vec::new(),
            policies: Vec::new(),
            sidecars: Vec::new(),
        };
        s.hash = s.content_hash();
        s
    }

    /// This snapshot with the mesh collections, re-hashed.
    pub fn with_mesh(mut self, mesh: Mesh) -> Self {
        self.workloads = mesh.workloads;
        self.services = mesh.services;
        self.policies = mesh.policies;
        self.sidecars = mesh.sidecars;
        self.hash = self.content_hash();
        self
    }

    /// The mesh collections (shared, not copied).
    pub fn mesh(&self) -> Mesh {
        Mesh {
            workloads: self.workloads.clone(),
            services: self.services.clone(),
            policies: self.policies.clone(),
            sidecars: self.sidecars.clone(),
        }
    }

    /// Whether this snapshot came from a producer newer than this build (see [`Snapshot::schema`]).
    pub fn is_newer_schema(&self) -> bool {
        self.schema > SCHEMA
    }

    /// Whether the content is what the hash names. A snapshot of a newer schema cannot be
    /// checked here (see [`Snapshot::schema`]) and passes.
    pub fn is_whole(&self) -> bool {
        self.is_newer_schema() || self.content_hash() == self.hash
    }

    /// The part a sidecar needs: the mesh with the Services `client` knows (all, for `None`):
    /// those exported to its namespace and admitted by its Sidecar, which comes along; the
    /// clusters their routes send to (no Gateway's listeners or clusters); the workloads it knows
    /// (all, unless its Sidecar names egress hosts: see [`crate::mesh::ClientView`]), and of the
    /// policies those `keep` says. `d` are this snapshot's part digests (the translator keeps them), so
    /// nothing is re-hashed.
    pub fn mesh_view(&self, d: &PartDigests, client: Option<&Workload>, keep: impl Fn(&Policy) -> bool) -> Snapshot {
        let view = client.map(|w| crate::mesh::ClientView::of(self, w));
        let scope = view.as_ref().and_then(|v| v.scope);
        let (services, service_digests): (Vec<_>, Vec<_>) = self
            .services
            .iter()
            .zip(&d.services)
            .filter(|(s, _)| view.as_ref().is_none_or(|v| v.knows(s)))
            .map(|(s, d)| match view.as_ref().and_then(|v| v.narrow(s)) {
                Some(narrowed) => {
                    let d = narrowed.digest();
                    (narrowed, d)
                }
                None => (s.clone(), *d),
            })
            .unzip();
        let (policies, policy_digests) = kept(&self.policies, &d.policies, keep);
        // The clusters its routes send to, and those its policies' authorization services use.
        let routed: std::collections::HashSet<&str> = services
            .iter()
            .flat_map(|s| s.route_clusters())
            .chain(policies.iter().filter_map(|p| p.check_cluster()))
            .collect();
        let (clusters, cluster_digests) = kept(&self.clusters, &d.clusters, |c| routed.contains(c.name.as_str()));
        let (sidecars, sidecar_digests) = kept(&self.sidecars, &d.sidecars, |s| {
            client.is_none() || scope.is_some_and(|sc| sc.key == s.key)
        });
        let (workloads, workload_digests) = kept(&self.workloads, &d.workloads, |w| {
            view.as_ref().is_none_or(|v| v.knows_workload(w))
        });
        let digests = PartDigests {
            workloads: workload_digests,
            services: service_digests,
            policies: policy_digests,
            clusters: cluster_digests,
            sidecars: sidecar_digests,
            ..PartDigests::default()
        };
        let mesh = Mesh {
            workloads,
            services,
            policies,
            sidecars,
        };
        Snapshot::with_digests(self.version, Vec::new(), clusters, mesh, &digests)
    }

    /// The workload of pod `namespace/name`; before the snapshot knows the pod, one without
    /// labels (namespace-wide and mesh-wide policies still select it).
    pub fn workload_or_placeholder(&self, namespace: &str, name: &str) -> Workload {
        self.workloads
            .iter()
            .find(|w| w.namespace == namespace && w.name == name)
            .map(|w| (**w).clone())
            .unwrap_or_else(|| Workload {
                uid: format!("{namespace}/{name}"),
                name: name.into(),
                namespace: namespace.into(),
                service_account: "default".into(),
                node: String::new(),
                ips: Vec::new(),
                labels: Default::default(),
                ports: Vec::new(),
                zone: None,
                hbone: true,
            })
    }

    /// Builds a snapshot whose parts' digests are already known (they must be this content's).
    pub fn with_digests(
        version: u64,
        listeners: Vec<Listener>,
        clusters: Vec<Arc<Cluster>>,
        mesh: Mesh,
        d: &PartDigests,
    ) -> Self {
        let hash = hash_from(&listeners, d);
        Snapshot {
            version,
            schema: SCHEMA,
            hash,
            listeners,
            clusters,
            workloads: mesh.workloads,
            services: mesh.services,
            policies: mesh.policies,
            sidecars: mesh.sidecars,
        }
    }

    /// The content hash (everything but `version` and `hash`): a hash over the digests of
    /// the listeners, virtual hosts, routes and clusters, so a producer that keeps part digests
    /// re-hashes only what changed, while any consumer can recompute it from the content alone.
    pub fn content_hash(&self) -> String {
        hash_from(&self.listeners, &self.digests())
    }

    pub fn digests(&self) -> PartDigests {
        PartDigests {
            virtual_hosts: self
                .listeners
                .iter()
                .map(|l| l.virtual_hosts.iter().map(|v| v.digest()).collect())
                .collect(),
            clusters: self.clusters.iter().map(|c| c.digest()).collect(),
            workloads: self.workloads.iter().map(|w| w.digest()).collect(),
            services: self.services.iter().map(|s| s.digest()).collect(),
            policies: self.policies.iter().map(|p| p.digest()).collect(),
            sidecars: self.sidecars.iter().map(|s| s.digest()).collect(),
        }
    }

    pub fn cluster(&self, name: &str) -> Option<&Cluster> {
        self.clusters.iter().find(|c| c.name == name).map(|c| &**c)
    }
}

/// The entries of a collection that `keep` says, with their digests (`digests` is in step with
/// `items`).
fn kept<T>(items: &[Arc<T>], digests: &[Digest], keep: impl Fn(&T) -> bool) -> (Vec<Arc<T>>, Vec<Digest>) {
    items
        .iter()
        .zip(digests)
        .filter(|(x, _)| keep(x))
        .map(|(x, d)| (x.clone(), *d))
        .unzip()
}

fn hash_from(listeners: &[Listener], d: &PartDigests) -> String {
    let mut top = Sha256::new();
    top.update(b"ferrum-snapshot/2\0listeners\0");
    for (l, vhosts) in listeners.iter().zip(&d.virtual_hosts) {
        let mut lh = Sha256::new();
        lh.update(l.head_digest());
        for v in vhosts {
            lh.update(v);
        }
        top.update(lh.finalize());
    }
    top.update(b"\0clusters\0");
    for c in &d.clusters {
        top.update(c);
    }
    // Only when present, so gateway snapshots keep the hashes they had before the mesh existed.
    if !d.workloads.is_empty() || !d.services.is_empty() || !d.policies.is_empty() {
        top.update(b"\0workloads\0");
        for w in &d.workloads {
            top.update(w);
        }
        top.update(b"\0services\0");
        for s in &d.services {
            top.update(s);
        }
    }
    if !d.policies.is_empty() {
        top.update(b"\0policies\0");
        for p in &d.policies {
            top.update(p);
        }
    }
    if !d.sidecars.is_empty() {
        top.update(b"\0sidecars\0");
        for s in &d.sidecars {
            top.update(s);
        }
    }
    hex::encode(top.finalize())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Protocol {
    #[serde(rename = "HTTP")]
    Http,
    #[serde(rename = "HTTPS")]
    Https,
    /// Opaque TCP (TCPRoute): the one virtual host `*` forwards every connection.
    #[serde(rename = "TCP")]
    Tcp,
    /// TLS routed by SNI (TLSRoute): passed through untouched without `certificates`,
    /// terminated with them. Virtual hosts are SNI names.
    #[serde(rename = "TLS")]
    Tls,
    /// A protocol from a newer producer: the listener is skipped, the rest of the snapshot served.
    #[serde(other, rename = "Unknown")]
    Unknown,
}

impl Protocol {
    /// Whether connections are forwarded as bytes (L4) rather than served as HTTP.
    pub fn is_l4(self) -> bool {
        matches!(self, Protocol::Tcp | Protocol::Tls)
    }
}

/// One bound socket. Several Gateway listeners on one port share it, told apart by hostname.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Listener {
    pub name: String,
    pub address: String,
    pub port: u16,
    pub protocol: Protocol,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<Certificate>,
    pub virtual_hosts: Vec<Arc<VirtualHost>>,
    /// The Gateways (`namespace/name`) whose listeners it serves: policies that target one of
    /// them (`targetRefs`) apply to its requests.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
    /// Which Gateway listener (by its hostname; `None`: any) is bound here: a virtual host
    /// belongs to the Gateways whose listener hostname covers it, so policies that target one
    /// Gateway stay on its hosts when Gateways share an address and port. Empty (a snapshot
    /// from an older source): every host belongs to all of `gateways`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateway_hosts: Vec<GatewayHost>,
    /// Log every request as a JSON line (a Gateway's `ferrum.dev/access-log: "true"`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub access_log: bool,
    /// Who the client is when load balancers stand in front (schema 14).
    #[serde(default, skip_serializing_if = "ClientAddress::is_default")]
    pub client_address: ClientAddress,
}

/// How a listener learns the client's address when load balancers stand in front of it, as
/// Envoy's `proxy_protocol` listener filter and `xff_num_trusted_hops` do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientAddress {
    /// Every connection starts with a PROXY protocol header (v1 or v2), whose source address is
    /// the client's; a connection without one is closed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub proxy_protocol: bool,
    /// How many proxies in front append to `X-Forwarded-For`: the client is the address this
    /// many entries from its right end (0: the connection's own).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub xff_trusted_hops: u8,
}

impl ClientAddress {
    pub fn is_default(&self) -> bool {
        *self == ClientAddress::default()
    }
}

/// One Gateway listener bound to a snapshot listener.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayHost {
    /// `namespace/name`.
    pub gateway: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
}

impl Listener {
    /// The Gateways (`namespace/name`) a virtual host of this listener belongs to.
    pub fn gateways_of(&self, vhost: &str) -> Vec<&str> {
        if self.gateway_hosts.is_empty() {
            return self.gateways.iter().map(String::as_str).collect();
        }
        let mut out: Vec<&str> = self
            .gateway_hosts
            .iter()
            .filter(|g| {
                g.hostname
                    .as_deref()
                    .is_none_or(|h| crate::translate::hostname_matches(h, vhost))
            })
            .map(|g| g.gateway.as_str())
            .collect();
        out.dedup();
        out
    }
}

/// A serving certificate. `hostname` is the SNI name it answers for; `None` is the default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Certificate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    pub source: CertSource,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum CertSource {
    /// PEM paths on the proxy's file system.
    Files { cert: String, key: String },
    /// A key pair delivered beside the snapshot ([`crate::secret`]), by name and content digest.
    Secret { name: String, digest: String },
}

/// Routes that apply to one hostname. `hostname` is exact (`a.example.com`), a wildcard suffix
/// (`*.example.com`) or `*` for any host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VirtualHost {
    pub hostname: String,
    /// In precedence order: the first route that matches wins.
    pub routes: Vec<Arc<Route>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    /// `namespace/name/rule/match`, stable across translations; used in metrics.
    pub name: String,
    #[serde(rename = "match")]
    pub matcher: RouteMatch,
    #[serde(default, skip_serializing_if = "HeaderModifier::is_empty")]
    pub request_headers: HeaderModifier,
    #[serde(default, skip_serializing_if = "HeaderModifier::is_empty")]
    pub response_headers: HeaderModifier,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<Rewrite>,
    pub action: Action,
    #[serde(default)]
    pub timeouts: RouteTimeouts,
    /// This route's retries, instead of its cluster's (whose retry budget still bounds them;
    /// `attempts: 0` turns the cluster's off here). Schema 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    /// Faults injected before forwarding (Istio's `fault`). Schema 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
    /// A copy of a share of its requests goes to another cluster too, its answer ignored
    /// (Istio's `mirror`; the first of several). Schema 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Mirror>,
    /// Further mirrors, each drawn on its own (Istio's `mirrors`, a Gateway API rule's further
    /// RequestMirror filters; schema 9). Apart from `mirror`, so an older proxy still copies to
    /// the first and snapshots without them read and hash as they always did.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub more_mirrors: Vec<Mirror>,
    /// Cross-origin requests (Gateway API `CORS`, Istio `corsPolicy`). Schema 6.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cors: Option<Cors>,
    /// The proxy answers itself (Istio `directResponse`); `action` then forwards nowhere, so a
    /// proxy older than schema 7 answers 500 rather than forwarding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_response: Option<DirectResponse>,
    /// Rate limits its requests count against (RateLimitPolicies on the route or its
    /// Gateway; schema 14). Shared by name: the routes one policy is on share its counts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rate_limits: Vec<Arc<RateLimit>>,
}

/// A RateLimitPolicy as proxies apply it: each rule counts the requests it selects in fixed
/// windows (aligned to the epoch) and refuses those over its limit with 429.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    /// `namespace/name`: what its counts are kept under.
    pub name: String,
    /// Counted in Redis, shared by every proxy (else each proxy counts its own requests).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub global: bool,
    pub rules: Vec<RateLimitRule>,
}

impl RateLimit {
    /// Where a Global policy's rule `rule` keeps its count for `window` (seconds since the epoch
    /// divided by the rule's window) in Redis: ferrum-dp and the operator's rate limit service
    /// (Envoy's) build it alike, so every proxy counts together. `distinct`: the request's
    /// [`DistinctValues`] when the rule counts them apart.
    pub fn redis_key(policy: &str, rule: usize, window: u64, distinct: Option<u64>) -> String {
        match distinct {
            Some(key) => format!("ferrum:ratelimit:{policy}:{rule}:{window}:{key:016x}"),
            None => format!("ferrum:ratelimit:{policy}:{rule}:{window}"),
        }
    }
}

/// The values a request is counted apart by, for one rule: its `Distinct` headers' values in the
/// rule's order, then its client address once per distinct block. One hash for every counter.
pub struct DistinctValues(foldhash::fast::FoldHasher<'static>);

impl Default for DistinctValues {
    fn default() -> Self {
        use std::hash::BuildHasher;
        DistinctValues(foldhash::fast::FixedState::with_seed(0x5eed).build_hasher())
    }
}

impl DistinctValues {
    pub fn header(&mut self, value: &str) {
        std::hash::Hash::hash(value, &mut self.0);
    }

    pub fn client(&mut self, ip: std::net::IpAddr) {
        std::hash::Hash::hash(&ip, &mut self.0);
    }

    pub fn finish(&self) -> u64 {
        std::hash::Hasher::finish(&self.0)
    }
}

/// Which requests count (all of `headers` and `clients` hold; nothing to hold: every request),
/// and how many a window allows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<RateLimitHeader>,
    /// CIDR blocks the request's client address must be in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clients: Vec<RateLimitClients>,
    pub requests: u32,
    pub window_secs: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitHeader {
    pub name: String,
    /// `None`: present, each value counted on its own (`Distinct`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<StringMatch>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitClients {
    pub cidr: String,
    /// Each client address in the block counted on its own.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub distinct: bool,
}

/// A response the proxy makes itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DirectResponse {
    /// 200-599.
    pub status: u16,
    /// At most [`DirectResponse::MAX_BODY`] bytes, sent as `text/plain`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub body: String,
}

impl DirectResponse {
    /// Envoy's default limit for a direct response body.
    pub const MAX_BODY: usize = 4096;
}

/// Cross-origin resource sharing for a route: the proxy answers the preflights of the origins
/// it allows, and marks the answers to their requests as shareable with them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cors {
    /// `Origin`s allowed, as sent (`scheme://host[:port]`).
    pub allow_origins: Vec<StringMatch>,
    /// Methods a preflight may ask for (`*`: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_methods: Vec<String>,
    /// Request headers a preflight may ask for (`*`: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_headers: Vec<String>,
    /// Response headers scripts may read (`*`: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expose_headers: Vec<String>,
    /// How long a preflight's answer may be cached, in seconds (no `Access-Control-Max-Age` when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age_s: Option<u32>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_credentials: bool,
    /// A preflight from an origin not allowed is answered here (200, no CORS headers) instead
    /// of going on to the backend (Istio `unmatchedPreflights: IGNORE`; schema 9 — an older
    /// proxy forwards it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub answer_unmatched_preflights: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Mirror {
    pub cluster: String,
    /// Requests copied, per million.
    pub per_million: u32,
}

/// Faults a route injects, each in a share of its requests (drawn independently): a delay
/// before the request goes on, and an answer the proxy gives instead of forwarding.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Fault {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultDelay {
    pub ms: u64,
    /// Requests delayed, per million.
    pub per_million: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultAbort {
    /// 200-599. With `grpc_status`, what a proxy older than schema 9 answers instead.
    pub status: u16,
    /// Answered as a gRPC error instead: HTTP 200 with this `grpc-status` (0-16) and no body,
    /// as Envoy's fault filter does (Istio `grpcStatus`; schema 9).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u8>,
    /// Requests answered with `status`, per million.
    pub per_million: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteMatch {
    pub path: PathMatch,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<KeyMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<KeyMatch>,
    /// Which clients the route is for (Istio `sourceLabels`, `sourceNamespace`): a sidecar keeps
    /// the routes its own workload is a source of when it compiles them, so requests pay
    /// nothing for it. Mesh routes only. Schema 7.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceMatch>,
}

/// The client workloads a mesh route applies to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceMatch {
    /// Labels the client's workload has, all of them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The client's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

impl SourceMatch {
    /// Whether a client with these labels, in this namespace, is one.
    pub fn admits(&self, labels: &BTreeMap<String, String>, namespace: &str) -> bool {
        self.namespace.as_deref().is_none_or(|n| n == namespace)
            && self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PathMatch {
    Exact(String),
    /// Segment-wise prefix without a trailing slash (`/` matches everything).
    Prefix(String),
    /// Anchored regular expression over the whole path.
    Regex(String),
}

impl Default for PathMatch {
    fn default() -> Self {
        PathMatch::Prefix("/".into())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyMatch {
    /// Header names are lower-cased; query parameter names are case-sensitive.
    pub name: String,
    pub value: StringMatch,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum StringMatch {
    Exact(String),
    Regex(String),
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeaderModifier {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

impl HeaderModifier {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rewrite {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathRewrite>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PathRewrite {
    Full(String),
    /// Replaces the matched prefix (the route must match on a prefix).
    Prefix(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Action {
    Forward(Vec<WeightedCluster>),
    Redirect(Redirect),
}

/// A backend of a forwarding route. `cluster: None` is a backend that failed to resolve: its
/// share of traffic gets a 500, as the Gateway API asks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WeightedCluster {
    pub cluster: Option<String>,
    pub weight: u32,
    /// Header edits of the requests sent to this backend and of its answers (a backendRef's
    /// own filters), after the route's. Schema 6.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<Box<BackendHeaders>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendHeaders {
    #[serde(default, skip_serializing_if = "HeaderModifier::is_empty")]
    pub request: HeaderModifier,
    #[serde(default, skip_serializing_if = "HeaderModifier::is_empty")]
    pub response: HeaderModifier,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Redirect {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathRewrite>,
    pub status: u16,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteTimeouts {
    /// Whole request, retries included, until response headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_ms: Option<u64>,
    /// One try against one endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_request_ms: Option<u64>,
    /// No limit but those set above — not even the cluster's read timeout: Istio's disabled
    /// timeout (a VirtualService route's default, and `0s`), the Gateway API's `0s`, a mesh
    /// Service's default route. Schema 13: an older proxy waits the cluster's read timeout.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unbounded: bool,
}

impl RouteTimeouts {
    /// How long one try may wait for response headers: the route's per-try limit, else none
    /// when unbounded, else the cluster's `read_ms`.
    pub fn per_try_ms(&self, read_ms: u64) -> Option<u64> {
        match (self.backend_request_ms, self.unbounded) {
            (Some(ms), _) => Some(ms),
            (None, true) => None,
            (None, false) => Some(read_ms),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cluster {
    pub name: String,
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    /// Requests from HTTP/2 clients go upstream over HTTP/2, the others over HTTP/1.1, whatever
    /// `protocol` says (Istio's `useClientProtocol`, Envoy's `use_downstream_protocol_config`);
    /// health checks and authorization checks use `protocol`. Schema 12: an older proxy uses
    /// `protocol` for every request.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub follow_client_protocol: bool,
    #[serde(default)]
    pub lb: LbPolicy,
    pub endpoints: Vec<Endpoint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default)]
    pub circuit_breaker: CircuitBreaker,
    #[serde(default)]
    pub timeouts: ClusterTimeouts,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<UpstreamTls>,
    /// TCP keepalive on connections to the endpoints. Schema 10: an older proxy sends none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_keepalive: Option<TcpKeepalive>,
    /// A consistent-hash key other than a header or the client IP: a cookie or a query
    /// parameter; it wins over `lb`'s. Schema 10: an older proxy hashes on `lb`'s key instead
    /// (for a cookie, the `Cookie` header; for a query parameter, the client IP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_input: Option<HashInput>,
    /// Slow start: an endpoint new to the cluster, or back from failing health checks, gets a
    /// growing share of requests. Schema 11: an older proxy gives it its full share at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_start: Option<SlowStart>,
    /// Envoy's healthy panic threshold (Istio's `minHealthPercent`): while fewer than this share
    /// of the endpoints (percent) are available — healthy and not ejected — requests are balanced
    /// over all of them instead. 0: never. Schema 11: an older proxy never does.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub panic_threshold_percent: u32,
    /// Locality failover: a proxy that knows its zone sends requests to the endpoints in it
    /// while enough of them are available, spilling a growing share to the other zones as they
    /// fail (Envoy's priority loads). Schema 12: an older proxy balances over every zone.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub locality_failover: bool,
}

fn is_zero<T: Default + PartialEq>(n: &T) -> bool {
    *n == T::default()
}

/// Envoy's `slow_start_config` (Istio's `warmup`): during `window_ms` from the moment an
/// endpoint starts warming, its weight is scaled by
/// `max(min_weight_percent / 100, (elapsed / window) ^ (1 / aggression))`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlowStart {
    pub window_ms: u64,
    /// Above 1 the share grows faster early in the window, below 1 slower; 1 is linear.
    #[serde(default = "SlowStart::default_aggression")]
    pub aggression: f64,
    /// The least share of its weight a warming endpoint gets (percent).
    #[serde(default = "SlowStart::default_min_weight_percent")]
    pub min_weight_percent: f64,
}

impl SlowStart {
    fn default_aggression() -> f64 {
        1.0
    }

    fn default_min_weight_percent() -> f64 {
        10.0
    }

    pub fn new(window_ms: u64) -> Self {
        SlowStart {
            window_ms,
            aggression: Self::default_aggression(),
            min_weight_percent: Self::default_min_weight_percent(),
        }
    }

    /// The share of its weight an endpoint warming for `elapsed_ms` gets, in (0, 1].
    pub fn factor(&self, elapsed_ms: u64) -> f64 {
        if elapsed_ms >= self.window_ms {
            return 1.0;
        }
        let time = elapsed_ms as f64 / self.window_ms as f64;
        time.powf(1.0 / self.aggression)
            .max(self.min_weight_percent / 100.0)
            .clamp(f64::MIN_POSITIVE, 1.0)
    }
}

/// One of its fields is set; one a proxy does not know leaves it hashing on `lb`'s key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HashInput {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<HashCookie>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_parameter: Option<String>,
}

/// Hashing on a cookie, as Envoy does: a request without it, when `ttl_ms` is set, is hashed on
/// a value made from the client's address, which its response sets as the cookie (`Max-Age`
/// `ttl_ms`; 0: a session cookie), so the client's next requests go where this one went.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HashCookie {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
}

/// TCP keepalive probes; what is unset is the host's default (`net.ipv4.tcp_keepalive_*`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpKeepalive {
    /// Idle time before the first probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_ms: Option<u64>,
    /// Time between probes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u64>,
    /// Unanswered probes before the connection is dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probes: Option<u32>,
}

impl Cluster {
    pub fn new(name: impl Into<String>, endpoints: Vec<Endpoint>) -> Self {
        Cluster {
            name: name.into(),
            protocol: UpstreamProtocol::default(),
            follow_client_protocol: false,
            lb: LbPolicy::default(),
            endpoints,
            health_check: None,
            outlier_detection: Some(OutlierDetection::default()),
            circuit_breaker: CircuitBreaker::default(),
            timeouts: ClusterTimeouts::default(),
            retry: None,
            tls: None,
            tcp_keepalive: None,
            hash_input: None,
            slow_start: None,
            panic_threshold_percent: 0,
            locality_failover: false,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpstreamProtocol {
    #[default]
    #[serde(rename = "HTTP/1.1")]
    Http1,
    /// HTTP/2 with prior knowledge (h2c), or ALPN h2 when `tls` is set.
    #[serde(rename = "HTTP/2")]
    Http2,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum LbPolicy {
    /// Weighted round robin (endpoint weights).
    #[default]
    RoundRobin,
    /// Power of two choices on in-flight requests.
    LeastRequest,
    /// Weighted random.
    Random,
    ConsistentHash(HashOn),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum HashOn {
    /// Lower-cased header name.
    Header(String),
    ClientIp,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// IP address or DNS name.
    pub address: String,
    pub port: u16,
    #[serde(default = "one")]
    pub weight: u32,
    /// SPIFFE identity the endpoint must present, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// Readiness reported by the source (EndpointSlice `ready`); health checks refine it.
    #[serde(default = "yes")]
    pub ready: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Envoy's priority: requests go to endpoints of a later priority (a backup) only as those
    /// before it fail, in Envoy's priority loads. Schema 12: an older proxy balances over all.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub priority: u32,
}

fn one() -> u32 {
    1
}
fn yes() -> bool {
    true
}

impl Endpoint {
    pub fn new(address: impl Into<String>, port: u16) -> Self {
        Endpoint {
            address: address.into(),
            port,
            weight: 1,
            identity: None,
            ready: true,
            zone: None,
            priority: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheck {
    pub path: String,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    /// Inclusive status range that counts as healthy.
    pub expected_status: (u16, u16),
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            path: "/".into(),
            interval_ms: 5_000,
            timeout_ms: 1_000,
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            expected_status: (200, 399),
        }
    }
}

/// Passive health: endpoints that fail in a row are ejected for a while.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    /// Consecutive 5xx responses (connect failures count too).
    pub consecutive_5xx: u32,
    pub consecutive_connect_failures: u32,
    /// Ejection time; multiplied by the number of times the endpoint has been ejected.
    pub base_ejection_ms: u64,
    pub max_ejection_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_5xx: 5,
            consecutive_connect_failures: 3,
            base_ejection_ms: 30_000,
            max_ejection_percent: 50,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CircuitBreaker {
    pub max_connections: u32,
    pub max_pending_requests: u32,
    pub max_requests: u32,
    /// Retries in flight at once, beside the retry policy's budget (Envoy's `max_retries`).
    /// Schema 10: an older proxy keeps to the budget alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
    /// Requests one upstream connection serves before it is closed (Istio's
    /// `maxRequestsPerConnection`; 1 turns keep-alive off). Schema 10: an older proxy keeps
    /// its connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<u32>,
    /// Streams at once on one upstream HTTP/2 connection, below the peer's own limit; past
    /// it another connection is opened (Envoy's `max_concurrent_streams`). Schema 11: an older
    /// proxy keeps to the peer's limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_streams: Option<u32>,
}

impl Default for CircuitBreaker {
    /// Envoy's defaults.
    fn default() -> Self {
        CircuitBreaker {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: None,
            max_requests_per_connection: None,
            max_concurrent_streams: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterTimeouts {
    pub connect_ms: u64,
    /// Until response headers, per try, when the route sets nothing tighter.
    pub read_ms: u64,
    /// Idle pooled connections are closed after this.
    pub idle_ms: u64,
    /// An upstream HTTP connection takes no new request this long after it opened, and closes
    /// once its requests are done (so long-lived connections, gRPC's, rebalance). Schema 10: an
    /// older proxy keeps its connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connection_duration_ms: Option<u64>,
    /// An L4 (TCP, TLS passthrough) connection to the cluster ends after this long with no byte
    /// either way; 0: never; unset: the proxy's own default (`--tcp-idle-timeout`). Schema 11:
    /// an older proxy keeps its default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_idle_ms: Option<u64>,
}

impl ClusterTimeouts {
    /// How long an L4 connection to the cluster may stay quiet, given the proxy's default.
    pub fn tcp_idle(&self, default: std::time::Duration) -> std::time::Duration {
        match self.tcp_idle_ms {
            None => default,
            Some(0) => std::time::Duration::MAX,
            Some(ms) => std::time::Duration::from_millis(ms),
        }
    }
}

impl Default for ClusterTimeouts {
    fn default() -> Self {
        ClusterTimeouts {
            connect_ms: 5_000,
            read_ms: 15_000,
            idle_ms: 60_000,
            max_connection_duration_ms: None,
            tcp_idle_ms: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Retries after the first try.
    pub attempts: u32,
    /// Which failures are retried: any of `connect-failure`, `reset`, `5xx`, `gateway-error`
    /// (502/503/504), or a status code like `429`.
    pub on: Vec<String>,
    pub backoff_base_ms: u64,
    /// Retries in flight may be at most this percentage of requests in flight…
    pub budget_percent: u32,
    /// …but this many are always allowed.
    pub min_retry_concurrency: u32,
    /// gRPC status codes retried when a response's headers carry them (a trailers-only gRPC
    /// error): Envoy's `cancelled` (1), `deadline-exceeded` (4), `resource-exhausted` (8),
    /// `internal` (13), `unavailable` (14). Schema 9: an older proxy does not retry on them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grpc_on: Vec<u8>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 2,
            on: vec!["connect-failure".into(), "reset".into(), "gateway-error".into()],
            backoff_base_ms: 25,
            budget_percent: 20,
            min_retry_concurrency: 3,
            grpc_on: Vec::new(),
        }
    }
}

/// Envoy's gRPC retry conditions and the status codes they name.
pub const GRPC_RETRY_CONDITIONS: [(&str, u8); 5] = [
    ("cancelled", 1),
    ("deadline-exceeded", 4),
    ("resource-exhausted", 8),
    ("internal", 13),
    ("unavailable", 14),
];

/// The gRPC status code an Envoy gRPC retry condition names.
pub fn grpc_retry_code(condition: &str) -> Option<u8> {
    GRPC_RETRY_CONDITIONS
        .iter()
        .find(|(n, _)| *n == condition)
        .map(|(_, c)| *c)
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamTls {
    /// Server name sent in SNI and verified against the certificate.
    pub sni: String,
    /// PEM bundle of trusted CAs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// The trusted CAs themselves, PEM (from a Secret's `ca.crt`: public, so carried here);
    /// not with `ca_file`. Schema 8: an older proxy trusts the public roots instead, and so
    /// refuses a private CA's upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
    #[serde(default)]
    pub insecure_skip_verify: bool,
    /// The certificate this proxy presents when the upstream asks for one (mutual TLS). Schema 7.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate: Option<CertSource>,
    /// Names (DNS names or IP addresses) of which the certificate must carry one, instead of
    /// `sni` (Istio's `subjectAltNames`). Schema 10: an older proxy checks `sni`, and so refuses
    /// a certificate that does not name it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<String>,
    /// URIs (`spiffe://…`) the certificate may carry one of instead, its chain checked all the
    /// same. Schema 12: an older proxy checks the names above (or `sni`) alone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_uris: Vec<String>,
}
