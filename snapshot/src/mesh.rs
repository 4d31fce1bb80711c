//! The mesh half of a snapshot: workloads (pods) and the services in front of them. A sidecar
//! finds where a captured connection goes (a Service VIP or a pod IP), picks an endpoint, and
//! learns whether that endpoint's proxy speaks HBONE and which identity it must present.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::identity::SpiffeId;

/// One entry of a keyed collection: its key is unique within the collection, collections are
/// kept sorted by it, and deltas name removed entries by it.
pub trait Keyed {
    fn key(&self) -> &str;
}

/// A workload: one pod, where it runs, who it is and how its proxy is reached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    /// The pod's UID (or `namespace/name` when the source has none).
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
    pub ips: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Container ports it declares.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// A mesh proxy in front of it accepts HBONE on 15008; otherwise peers send plain TCP.
    #[serde(default)]
    pub hbone: bool,
    /// Its node's `topology.kubernetes.io/zone`. Schema 12.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
}

impl Workload {
    /// The identity its proxy presents, in `trust_domain`.
    pub fn identity(&self, trust_domain: &str) -> SpiffeId {
        SpiffeId::new(trust_domain, &self.namespace, &self.service_account)
    }
}

impl Keyed for Workload {
    fn key(&self) -> &str {
        &self.uid
    }
}

/// A security policy, resolved: where it lives, whom it selects, what it says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    /// `<Kind>/<namespace>/<name>`.
    pub key: String,
    pub namespace: String,
    pub name: String,
    /// Labels a workload must have; absent: every workload of the namespace (of the mesh, in
    /// the root namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<BTreeMap<String, String>>,
    /// Gateways (`namespace/name`) it targets (`targetRefs`) instead of selecting workloads.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<String>,
    pub rule: PolicyRule,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PolicyRule {
    Authorization(Authorization),
    PeerAuthentication(PeerAuthn),
    RequestAuthentication(RequestAuthn),
}

/// A RequestAuthentication's JWT rules, as written (JWKS URIs are fetched by the proxy).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestAuthn {
    pub jwt_rules: Vec<crate::istio::JwtRule>,
}

/// An AuthorizationPolicy's action and rules, as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Authorization {
    pub action: AuthzAction,
    /// Empty: the policy matches nothing.
    pub rules: Vec<crate::istio::Rule>,
    /// `istio.io/dry-run: "true"`: evaluated and logged, never enforced.
    #[serde(default)]
    pub dry_run: bool,
    /// Istio `CUSTOM`: a request the rules match is asked of this external authorization
    /// service, first, and refused if it refuses (schema 8). Written with action `DENY`, so a
    /// proxy older than that refuses those requests outright — it fails closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<Box<ExtAuthz>>,
}

/// An external authorization service (Istio `envoyExtAuthzHttp` or `envoyExtAuthzGrpc`;
/// Envoy's `ext_authz` filter): the request's method, path and headers go to it, never its
/// body; an allowing answer lets the request on, a refusal is the client's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExtAuthz {
    /// The MeshConfig `extensionProviders` entry it came from.
    pub provider: String,
    /// How it is asked: plain HTTP, or `envoy.service.auth.v3.Authorization/Check` over gRPC
    /// (then the path prefix and header lists do not apply: the check carries every header).
    #[serde(default, skip_serializing_if = "ExtAuthzApi::is_http")]
    pub api: ExtAuthzApi,
    /// The snapshot cluster that serves it.
    pub cluster: String,
    pub timeout_ms: u64,
    /// Put before the request's path in the check (`/verify` + `/orders?id=1`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path_prefix: String,
    /// Request headers sent along (Istio patterns: exact, `prefix*`, `*suffix`, lowercase);
    /// `Host`, the method and the path always are.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub include_request_headers: Vec<String>,
    /// Headers set on every check (Istio `includeAdditionalHeadersInCheck`): name (lowercase),
    /// value. HTTP providers only.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub additional_headers: BTreeMap<String, String>,
    /// Headers of an allowing answer set on the request that goes on (patterns).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers_to_upstream_on_allow: Vec<String>,
    /// Headers of a refusing answer passed to the client (patterns); empty: all of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers_to_downstream_on_deny: Vec<String>,
    /// Headers of an allowing answer added to the client's response (patterns; Istio
    /// `headersToDownstreamOnAllow`, schema 9). HTTP providers only: a gRPC answer names them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers_to_downstream_on_allow: Vec<String>,
    /// The request's body goes along (Istio `includeRequestBodyInCheck`, schema 9); an older
    /// proxy asks without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_request_body: Option<BodyInCheck>,
    /// When the service cannot be asked (unreachable, timed out, a 5xx is an answer): let the
    /// request on instead of answering `status_on_error`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fail_open: bool,
    pub status_on_error: u16,
}

/// How much of a request's body a check carries (Envoy's `with_request_body`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BodyInCheck {
    /// The most bytes read ahead and sent (1 - [`crate::validate::MAX_EXT_AUTHZ_BODY`]).
    pub max_bytes: u32,
    /// A longer body is checked by its first `max_bytes`; without this it is refused (413).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_partial: bool,
    /// gRPC: the body as bytes (`raw_body`) rather than UTF-8 text (`body`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pack_as_bytes: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ExtAuthzApi {
    /// Istio `envoyExtAuthzHttp`.
    #[default]
    Http,
    /// Istio `envoyExtAuthzGrpc`.
    Grpc,
}

impl ExtAuthzApi {
    pub fn is_http(&self) -> bool {
        *self == ExtAuthzApi::Http
    }
}

impl Authorization {
    /// Whether requests it matches are asked of an external service (Istio `CUSTOM`).
    pub fn is_custom(&self) -> bool {
        self.check.is_some()
    }
}

impl Policy {
    /// The cluster its external authorization service is reached by, if it has one.
    pub fn check_cluster(&self) -> Option<&str> {
        match &self.rule {
            PolicyRule::Authorization(a) => a.check.as_ref().map(|c| c.cluster.as_str()),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum AuthzAction {
    Allow,
    Deny,
    Audit,
}

/// A PeerAuthentication: the mTLS mode, and per workload port overrides.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthn {
    #[serde(default)]
    pub mode: MtlsMode,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<u16, MtlsMode>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Inherit from the namespace, then the mesh (PERMISSIVE at the top).
    #[default]
    Unset,
    Permissive,
    Strict,
    Disable,
}

impl Policy {
    pub fn applies_to(&self, w: &Workload) -> bool {
        self.targets.is_empty()
            && (self.namespace == w.namespace || self.namespace == crate::ROOT_NAMESPACE)
            && self
                .selector
                .as_ref()
                .is_none_or(|sel| sel.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
    }
}

impl Keyed for Policy {
    fn key(&self) -> &str {
        &self.key
    }
}

/// The mTLS mode for inbound traffic to `w` on `port`: the workload's own PeerAuthentication
/// (its port override first), else its namespace's, else the mesh's; PERMISSIVE if none says.
pub fn mtls_mode(policies: &[Arc<Policy>], w: &Workload, port: u16) -> MtlsMode {
    fn peer(p: &Policy) -> Option<&PeerAuthn> {
        match &p.rule {
            PolicyRule::PeerAuthentication(pa) => Some(pa),
            PolicyRule::Authorization(_) | PolicyRule::RequestAuthentication(_) => None,
        }
    }
    let mut workload = None;
    let mut namespace = None;
    let mut mesh = None;
    for p in policies.iter().filter(|p| p.applies_to(w)) {
        let Some(pa) = peer(p) else { continue };
        let slot = match (&p.selector, p.namespace == w.namespace) {
            (Some(_), true) => &mut workload,
            (None, true) => &mut namespace,
            (None, false) => &mut mesh,
            // A selector in the root namespace is not how mesh-wide policy is written.
            (Some(_), false) => continue,
        };
        // Several at one level: the first in key order counts (Istio takes the oldest).
        slot.get_or_insert(pa);
    }
    let port_mode = workload.and_then(|pa| pa.ports.get(&port).copied());
    [
        port_mode,
        workload.map(|p| p.mode),
        namespace.map(|p| p.mode),
        mesh.map(|p| p.mode),
    ]
    .into_iter()
    .flatten()
    .find(|m| *m != MtlsMode::Unset)
    .unwrap_or(MtlsMode::Permissive)
}

/// An Istio Sidecar, resolved: the workloads it configures, the Services their proxies know,
/// and what happens to traffic for any other address.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SidecarScope {
    /// `Sidecar/<namespace>/<name>`.
    pub key: String,
    pub namespace: String,
    pub name: String,
    /// Labels a workload of the namespace must have; absent: the namespace's default (the
    /// mesh's, in the root namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<BTreeMap<String, String>>,
    /// The Services its workloads know (any host matching); `None`: every Service they see.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<EgressHost>>,
    /// `outboundTrafficPolicy: REGISTRY_ONLY`: connections to addresses that are no known
    /// Service or workload are refused instead of passed through.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub registry_only: bool,
    /// Ingress listeners: inbound traffic for a workload port goes where they say (schema 4).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<IngressRoute>,
}

/// A Sidecar ingress listener, resolved: inbound traffic for the workload's `port` is delivered
/// to `endpoint` — on loopback as given, or, for an unspecified address (`0.0.0.0`, `::`), to
/// the address the traffic was for, at the endpoint's port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngressRoute {
    pub port: u16,
    pub endpoint: std::net::SocketAddr,
}

/// The ports a mesh proxy listens on itself (Istio's reserved set): never a delivery target, so
/// no route can hand inbound traffic to the proxy's admin or loop it back into the proxy.
pub const PROXY_PORTS: [u16; 9] = [15000, 15001, 15004, 15006, 15008, 15020, 15021, 15053, 15090];

impl IngressRoute {
    /// Why `endpoint` cannot be an ingress listener's `defaultEndpoint`, if it cannot.
    pub fn refuse(endpoint: std::net::SocketAddr) -> Option<String> {
        if !(endpoint.ip().is_loopback() || endpoint.ip().is_unspecified()) || endpoint.port() == 0 {
            return Some(format!(
                "{endpoint}: the endpoint is loopback or the unspecified address (the pod's own), with a port"
            ));
        }
        PROXY_PORTS
            .contains(&endpoint.port())
            .then(|| format!("{endpoint}: port {} is the proxy's own", endpoint.port()))
    }

    /// Where traffic for `dst` (an address of the workload) is delivered.
    pub fn deliver(&self, dst: std::net::SocketAddr) -> std::net::SocketAddr {
        match self.endpoint.ip().is_unspecified() {
            true => std::net::SocketAddr::new(dst.ip(), self.endpoint.port()),
            false => self.endpoint,
        }
    }
}

/// One `namespace/dnsName` of a Sidecar's egress hosts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressHost {
    /// `*` (any), `.` (the client workload's own) or a name; `~` (none) is dropped when parsed.
    pub namespace: String,
    /// `*`, `*.suffix` or a hostname.
    pub host: String,
    /// The egress listener's port: the host is known on that Service port only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

impl EgressHost {
    fn matches(&self, s: &MeshService, client_ns: &str) -> bool {
        let ns = s.key.split_once('/').map_or("", |(ns, _)| ns);
        let ns_ok = match self.namespace.as_str() {
            "*" => true,
            "." => ns == client_ns,
            n => ns == n,
        };
        ns_ok
            && match self.host.as_str() {
                "*" => true,
                host => match host.strip_prefix('*') {
                    Some(suffix) => s.hostname.ends_with(suffix),
                    None => s.hostname.eq_ignore_ascii_case(host),
                },
            }
    }
}

impl SidecarScope {
    /// Whether a client in `client_ns` under this Sidecar knows `s` (on some port).
    pub fn admits(&self, s: &MeshService, client_ns: &str) -> bool {
        self.egress
            .as_ref()
            .is_none_or(|hosts| hosts.iter().any(|h| h.matches(s, client_ns)))
    }

    /// The ports of `s` such a client knows, when not all of them: only per-port egress
    /// listeners name it.
    pub fn ports(&self, s: &MeshService, client_ns: &str) -> Option<Vec<u16>> {
        let hosts = self.egress.as_ref()?;
        let mut ports = Vec::new();
        for h in hosts.iter().filter(|h| h.matches(s, client_ns)) {
            ports.push(h.port?);
        }
        Some(ports)
    }
}

impl Keyed for SidecarScope {
    fn key(&self) -> &str {
        &self.key
    }
}

/// The Sidecar that configures `w`'s proxy: one selecting it in its namespace, else its
/// namespace's default, else the mesh's (Istio's order; several at one level: the first in key
/// order, where Istio takes the oldest).
pub fn sidecar_for<'a>(scopes: &'a [Arc<SidecarScope>], w: &Workload) -> Option<&'a SidecarScope> {
    let in_ns = || scopes.iter().filter(|s| s.namespace == w.namespace);
    in_ns()
        .find(|s| {
            s.selector
                .as_ref()
                .is_some_and(|sel| sel.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
        })
        .or_else(|| in_ns().find(|s| s.selector.is_none()))
        .or_else(|| {
            scopes
                .iter()
                .find(|s| s.namespace == crate::ROOT_NAMESPACE && s.selector.is_none())
        })
        .map(|s| &**s)
}

/// What one client workload's proxy knows of a snapshot: the Services exported to its namespace
/// that its Sidecar admits; the workloads behind them, at the addresses their mesh routes send
/// to, and itself (every workload when its Sidecar names no egress hosts); and that Sidecar.
pub struct ClientView<'a> {
    pub scope: Option<&'a SidecarScope>,
    namespace: &'a str,
    /// (workload UIDs, addresses, its own UID); `None`: every workload.
    workloads: Option<(HashSet<&'a str>, HashSet<&'a str>, &'a str)>,
}

impl<'a> ClientView<'a> {
    pub fn of(snap: &'a crate::model::Snapshot, client: &'a Workload) -> Self {
        let mut v = ClientView {
            scope: sidecar_for(&snap.sidecars, client),
            namespace: &client.namespace,
            workloads: None,
        };
        if v.scope.is_some_and(|s| s.egress.is_some()) {
            let known: Vec<&MeshService> = snap.services.iter().filter(|s| v.knows(s)).map(|s| &**s).collect();
            let routed: HashSet<&str> = known.iter().flat_map(|s| s.route_clusters()).collect();
            let uids = known
                .iter()
                .flat_map(|s| s.endpoints.iter().filter_map(|e| e.workload.as_deref()))
                .collect();
            let addresses = snap
                .clusters
                .iter()
                .filter(|c| routed.contains(c.name.as_str()))
                .flat_map(|c| c.endpoints.iter().map(|e| e.address.as_str()))
                .collect();
            v.workloads = Some((uids, addresses, &client.uid));
        }
        v
    }

    pub fn knows(&self, s: &MeshService) -> bool {
        s.visible_to(self.namespace) && self.scope.is_none_or(|sc| sc.admits(s, self.namespace))
    }

    /// Whether it knows `s` on `port` (given that it knows `s`).
    pub fn knows_port(&self, s: &MeshService, port: u16) -> bool {
        self.scope
            .and_then(|sc| sc.ports(s, self.namespace))
            .is_none_or(|ports| ports.contains(&port))
    }

    /// `s` as this client knows it: without the ports (and their routes) it does not know.
    pub fn narrow(&self, s: &Arc<MeshService>) -> Option<Arc<MeshService>> {
        if s.ports.iter().all(|p| self.knows_port(s, p.port)) {
            return None;
        }
        let mut n = (**s).clone();
        n.ports.retain(|p| self.knows_port(s, p.port));
        n.routes.retain(|r| self.knows_port(s, r.port));
        n.tcp_routes.retain(|r| self.knows_port(s, r.port));
        Some(Arc::new(n))
    }

    pub fn knows_workload(&self, w: &Workload) -> bool {
        self.workloads.as_ref().is_none_or(|(uids, addresses, own)| {
            w.uid == *own || uids.contains(w.uid.as_str()) || w.ips.iter().any(|ip| addresses.contains(ip.as_str()))
        })
    }
}

/// The mesh collections of a snapshot, each in key order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Mesh {
    pub workloads: Vec<Arc<Workload>>,
    pub services: Vec<Arc<MeshService>>,
    pub policies: Vec<Arc<Policy>>,
    pub sidecars: Vec<Arc<SidecarScope>>,
}

/// The key of the [`MeshService`] whose endpoints a cluster the translator named has:
/// `service/<namespace>/<name>:<port>…` (a Service's), `serviceentry/<namespace>/<name>/<host>:<port>…`
/// (a ServiceEntry host's); what follows the port (a subset, a protocol variant) is the same
/// Service's.
pub fn cluster_service_key(cluster: &str) -> Option<&str> {
    let rest = (cluster.strip_prefix("service/")).or_else(|| cluster.strip_prefix("serviceentry/"))?;
    rest.rsplit_once(':').map(|(key, _)| key)
}

/// A Kubernetes Service as the mesh sees it: its virtual IPs and ports, and the workloads
/// behind each port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshService {
    /// `namespace/name`.
    pub key: String,
    /// `name.namespace.svc.cluster.local`.
    pub hostname: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vips: Vec<String>,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<MeshEndpoint>,
    /// Mesh routes (GAMMA: HTTPRoutes and GRPCRoutes whose parent is this Service), per port.
    /// A client's sidecar routes HTTP to the Service by them instead of balancing over
    /// `endpoints`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<ServiceRoutes>,
    /// L4 routes (Istio VirtualService `tcp`), per port: a client's sidecar sends a connection
    /// to the port that is not routed as HTTP to a weighted pick of the clusters of the first
    /// route whose source it is, instead of balancing over `endpoints`. Schema 7.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tcp_routes: Vec<ServiceRoutes>,
    /// The namespaces whose clients see it (Istio's `networking.istio.io/exportTo`); empty:
    /// every namespace. Elsewhere its address is not the mesh's (passthrough).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub export_to: Vec<String>,
    /// Where a connection to one of its addresses goes (a Kubernetes Service: its endpoints).
    #[serde(default, skip_serializing_if = "Resolution::is_endpoints")]
    pub resolution: Resolution,
    /// Connections are matched to it by the host they ask for (TLS SNI, HTTP `Host`) when the
    /// mesh knows their address as nothing else: a ServiceEntry without addresses.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub by_host: bool,
    /// Clients prefer its endpoints in their own zone (Kubernetes' `trafficDistribution:
    /// PreferClose`). Schema 12: an older proxy balances over every zone.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub locality_failover: bool,
}

/// How a proxy finds where a connection to a service goes (Istio ServiceEntry `resolution`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Resolution {
    /// To one of `endpoints`, IP addresses (a Service; a `STATIC` entry).
    #[default]
    Endpoints,
    /// To the address the client dialled, as is: the service's addresses are real ones
    /// (`NONE`); knowing them only lets the traffic past `REGISTRY_ONLY`.
    Passthrough,
    /// To one of `endpoints`, DNS names the proxy resolves when it connects (`DNS`).
    Dns,
}

impl Resolution {
    fn is_endpoints(&self) -> bool {
        *self == Resolution::Endpoints
    }
}

/// The routes of one Service port for one set of clients, in precedence order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRoutes {
    pub port: u16,
    /// Consumer routes: they apply only to clients in this namespace, instead of the producer
    /// routes (`None`: the Service's own namespace, every client).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer: Option<String>,
    pub routes: Vec<Arc<crate::model::Route>>,
}

impl ServiceRoutes {
    /// Of `tables`, the one a client in `namespace` follows to `port`: its namespace's consumer
    /// table, else the producer table.
    fn for_client<'t>(tables: &'t [ServiceRoutes], port: u16, namespace: &str) -> Option<&'t ServiceRoutes> {
        let of_port = || tables.iter().filter(move |r| r.port == port);
        of_port()
            .find(|r| r.consumer.as_deref() == Some(namespace))
            .or_else(|| of_port().find(|r| r.consumer.is_none()))
    }
}

impl MeshService {
    /// Whether clients in `namespace` see this Service.
    pub fn visible_to(&self, namespace: &str) -> bool {
        self.export_to.is_empty() || self.export_to.iter().any(|n| n == "*" || n == namespace)
    }

    /// The routes a client in `namespace` follows to `port`: its namespace's consumer routes,
    /// else the producer routes; `None` when neither exists (plain Service balancing).
    pub fn routes_for(&self, port: u16, namespace: &str) -> Option<&ServiceRoutes> {
        ServiceRoutes::for_client(&self.routes, port, namespace)
    }

    /// [`Self::routes_for`] for the L4 routes.
    pub fn tcp_routes_for(&self, port: u16, namespace: &str) -> Option<&ServiceRoutes> {
        ServiceRoutes::for_client(&self.tcp_routes, port, namespace)
    }

    /// Every route of every table, HTTP and L4.
    pub fn all_routes(&self) -> impl Iterator<Item = &Arc<crate::model::Route>> {
        self.routes.iter().chain(&self.tcp_routes).flat_map(|r| &r.routes)
    }

    /// Every cluster its routes send to, mirrors included.
    pub fn route_clusters(&self) -> impl Iterator<Item = &str> {
        self.all_routes().flat_map(|r| r.clusters())
    }
}

impl Keyed for MeshService {
    fn key(&self) -> &str {
        &self.key
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    pub port: u16,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
}

impl ServicePort {
    /// The HTTP its clients speak, when the port declares it ([`declared_http`]).
    pub fn http(&self) -> Option<HttpProtocol> {
        declared_http(&self.name, self.app_protocol.as_deref())
    }

    /// Says nothing Istio would read as a protocol: what its clients speak is sniffed.
    pub fn sniffed(&self) -> bool {
        !protocol_declared(&self.name, self.app_protocol.as_deref())
    }
}

/// Whether a port says what it speaks, as Istio's explicit protocol selection reads it: an
/// `appProtocol`, else its name's prefix, naming a protocol Istio knows. Istio detects the
/// protocol of the other ports (and so does a sidecar where it routes them).
pub fn protocol_declared(name: &str, app_protocol: Option<&str>) -> bool {
    let declared = app_protocol.unwrap_or_else(|| name.split('-').next().unwrap_or_default());
    declared_http(name, app_protocol).is_some()
        || ["https", "tcp", "tls", "udp", "mongo", "mysql", "redis"]
            .into_iter()
            .any(|p| declared.eq_ignore_ascii_case(p))
}

/// HTTP as a port declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpProtocol {
    /// HTTP/1.1 (WebSocket too).
    Http1,
    /// HTTP/2 and gRPC: one connection carries every request.
    Http2,
}

/// The HTTP a Service port declares, as Istio's explicit protocol selection reads it: its
/// `appProtocol` (a ServiceEntry port's `protocol`), else its name's prefix (`http`,
/// `http-web`, `grpc-api`). `None`: not declared HTTP (another protocol, or nothing said).
pub fn declared_http(name: &str, app_protocol: Option<&str>) -> Option<HttpProtocol> {
    let declared = app_protocol.unwrap_or_else(|| name.split('-').next().unwrap_or_default());
    let is = |p: &str| declared.eq_ignore_ascii_case(p);
    if is("http") || is("kubernetes.io/ws") {
        Some(HttpProtocol::Http1)
    } else if ["http2", "grpc", "grpc-web", "h2c", "kubernetes.io/h2c"]
        .into_iter()
        .any(is)
    {
        Some(HttpProtocol::Http2)
    } else {
        None
    }
}

/// One address behind a Service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshEndpoint {
    pub address: String,
    /// The workload's UID, when the address is a known pod's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    /// Service port → the port the workload listens on.
    pub ports: Vec<(u16, u16)>,
    /// Its zone (the EndpointSlice's, else its workload's). Schema 12.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
}

impl MeshEndpoint {
    pub fn target_port(&self, service_port: u16) -> Option<u16> {
        self.ports.iter().find(|(s, _)| *s == service_port).map(|(_, t)| *t)
    }
}

/// Checks the mesh collections of any snapshot: addresses are IPs, ports are set, identities
/// are well-formed.
pub fn check(
    workloads: &[Arc<Workload>],
    services: &[Arc<MeshService>],
    sidecars: &[Arc<SidecarScope>],
    err: &mut impl FnMut(String, String, String),
) {
    for s in sidecars {
        for (i, r) in s.ingress.iter().enumerate() {
            if let Some(why) = IngressRoute::refuse(r.endpoint).or((r.port == 0).then(|| "port 0".into())) {
                err(format!("sidecar {:?}", s.key), format!("ingress[{i}]"), why);
            }
        }
    }
    for w in workloads {
        let obj = format!("workload {:?}", w.uid);
        for (i, ip) in w.ips.iter().enumerate() {
            if ip.parse::<IpAddr>().is_err() {
                err(obj.clone(), format!("ips[{i}]"), format!("{ip:?} is not an IP address"));
            }
        }
        if let Err(e) = format!("spiffe://x/ns/{}/sa/{}", w.namespace, w.service_account).parse::<SpiffeId>() {
            err(obj.clone(), "serviceAccount".into(), e.to_string());
        }
    }
    for s in services {
        let obj = format!("service {:?}", s.key);
        for (i, ip) in s.vips.iter().enumerate() {
            if ip.parse::<IpAddr>().is_err() {
                err(
                    obj.clone(),
                    format!("vips[{i}]"),
                    format!("{ip:?} is not an IP address"),
                );
            }
        }
        for (i, e) in s.endpoints.iter().enumerate() {
            let named = s.resolution == Resolution::Dns && crate::validate::is_dns_name(&e.address);
            if !named && e.address.parse::<IpAddr>().is_err() {
                err(
                    obj.clone(),
                    format!("endpoints[{i}].address"),
                    format!("{:?} is not an IP address", e.address),
                );
            }
            if e.ports.iter().any(|(s, t)| *s == 0 || *t == 0) {
                err(
                    obj.clone(),
                    format!("endpoints[{i}].ports"),
                    "ports must be 1-65535".into(),
                );
            }
        }
    }
}

/// Changes to one keyed collection between two snapshots: entries new or changed, keys removed.
/// The one delta mechanism for flat collections (clusters, workloads, services).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(bound(deserialize = "T: Deserialize<'de>"))]
pub struct Changes<T> {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upserted: Vec<Arc<T>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<String>,
}

impl<T> Default for Changes<T> {
    fn default() -> Self {
        Changes {
            upserted: Vec::new(),
            removed: Vec::new(),
        }
    }
}

impl<T: Keyed + PartialEq> Changes<T> {
    /// What turns `base` into `target`. Shared entries compare by address first.
    pub fn between(base: &[Arc<T>], target: &[Arc<T>]) -> Self {
        let sorted = |v: &[Arc<T>]| v.is_sorted_by(|a, b| a.key() < b.key());
        if sorted(base) && sorted(target) {
            return Self::merge(base, target);
        }
        let old: foldhash::HashMap<&str, &Arc<T>> = base.iter().map(|x| (x.key(), x)).collect();
        let upserted = target
            .iter()
            .filter(|x| {
                old.get(x.key())
                    .is_none_or(|p| !Arc::ptr_eq(p, x) && p.as_ref() != x.as_ref())
            })
            .cloned()
            .collect();
        let now: std::collections::HashSet<&str> = target.iter().map(|x| x.key()).collect();
        let removed = base
            .iter()
            .filter(|x| !now.contains(x.key()))
            .map(|x| x.key().to_string())
            .collect();
        Changes { upserted, removed }
    }

    /// [`Changes::between`] of two lists in strict key order (as snapshots keep them), in one
    /// walk: an entry shared by both costs a pointer comparison, no hashing.
    fn merge(base: &[Arc<T>], target: &[Arc<T>]) -> Self {
        use std::cmp::Ordering;
        let mut c = Changes::default();
        let (mut i, mut j) = (0, 0);
        while i < base.len() && j < target.len() {
            let (b, t) = (&base[i], &target[j]);
            if Arc::ptr_eq(b, t) {
                (i, j) = (i + 1, j + 1);
                continue;
            }
            match b.key().cmp(t.key()) {
                Ordering::Less => {
                    c.removed.push(b.key().to_string());
                    i += 1;
                }
                Ordering::Greater => {
                    c.upserted.push(t.clone());
                    j += 1;
                }
                Ordering::Equal => {
                    if b.as_ref() != t.as_ref() {
                        c.upserted.push(t.clone());
                    }
                    (i, j) = (i + 1, j + 1);
                }
            }
        }
        c.removed.extend(base[i..].iter().map(|b| b.key().to_string()));
        c.upserted.extend(target[j..].iter().cloned());
        c
    }

    pub fn is_empty(&self) -> bool {
        self.upserted.is_empty() && self.removed.is_empty()
    }

    /// `base` with these changes, in key order.
    pub fn apply(&self, base: &[Arc<T>]) -> Vec<Arc<T>> {
        let mut m: BTreeMap<String, Arc<T>> = base.iter().map(|x| (x.key().to_string(), x.clone())).collect();
        for k in &self.removed {
            m.remove(k);
        }
        for x in &self.upserted {
            m.insert(x.key().to_string(), x.clone());
        }
        m.into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clusters_name_says_whose_endpoints_it_has() {
        assert_eq!(cluster_service_key("service/shop/b:80"), Some("shop/b"));
        assert_eq!(cluster_service_key("service/shop/b:81~v1#h2"), Some("shop/b"));
        assert_eq!(
            cluster_service_key("serviceentry/ns/api/api.example.com:443"),
            Some("ns/api/api.example.com")
        );
        assert_eq!(cluster_service_key("backend/shop/legacy:80"), None);
    }

    #[test]
    fn a_port_declares_http_by_app_protocol_else_by_its_names_prefix() {
        use HttpProtocol::*;
        let cases = [
            ("http", None, Some(Http1)),
            ("http-web", None, Some(Http1)),
            ("HTTP", None, Some(Http1)),
            ("grpc", None, Some(Http2)),
            ("grpc-web", None, Some(Http2)),
            ("http2-api", None, Some(Http2)),
            ("httpbin", None, None),
            ("web", None, None),
            ("tcp-http", None, None),
            ("", None, None),
            ("web", Some("kubernetes.io/h2c"), Some(Http2)),
            ("web", Some("GRPC"), Some(Http2)),
            ("web", Some("kubernetes.io/ws"), Some(Http1)),
            // appProtocol wins over the name.
            ("http", Some("tcp"), None),
            ("grpc", Some("https"), None),
        ];
        for (name, app, want) in cases {
            assert_eq!(declared_http(name, app), want, "{name:?} {app:?}");
        }
    }

    fn svc(key: &str, port: u16) -> Arc<MeshService> {
        Arc::new(MeshService {
            key: key.into(),
            hostname: format!("{key}.svc"),
            vips: vec!["10.96.0.1".into()],
            ports: vec![ServicePort {
                port,
                name: String::new(),
                app_protocol: None,
            }],
            endpoints: vec![],
            routes: vec![],
            tcp_routes: vec![],
            export_to: vec![],
            resolution: Resolution::Endpoints,
            by_host: false,
            locality_failover: false,
        })
    }

    fn peer_authn(
        ns: &str,
        name: &str,
        selector: Option<&str>,
        mode: MtlsMode,
        ports: &[(u16, MtlsMode)],
    ) -> Arc<Policy> {
        Arc::new(Policy {
            key: format!("PeerAuthentication/{ns}/{name}"),
            namespace: ns.into(),
            name: name.into(),
            selector: selector.map(|app| [("app".to_string(), app.to_string())].into()),
            targets: vec![],
            rule: PolicyRule::PeerAuthentication(PeerAuthn {
                mode,
                ports: ports.iter().copied().collect(),
            }),
        })
    }

    #[test]
    fn the_most_specific_peer_authentication_decides() {
        let w = Workload {
            uid: "u".into(),
            name: "cart-1".into(),
            namespace: "shop".into(),
            service_account: "cart".into(),
            node: String::new(),
            ips: vec![],
            labels: [("app".to_string(), "cart".to_string())].into(),
            ports: vec![],
            hbone: true,
            zone: None,
        };
        assert_eq!(mtls_mode(&[], &w, 80), MtlsMode::Permissive, "nothing said");
        let mesh = peer_authn(crate::ROOT_NAMESPACE, "default", None, MtlsMode::Strict, &[]);
        assert_eq!(mtls_mode(std::slice::from_ref(&mesh), &w, 80), MtlsMode::Strict);
        let ns = peer_authn("shop", "default", None, MtlsMode::Permissive, &[]);
        assert_eq!(
            mtls_mode(&[mesh.clone(), ns.clone()], &w, 80),
            MtlsMode::Permissive,
            "namespace over mesh"
        );
        let unset = peer_authn(
            "shop",
            "cart",
            Some("cart"),
            MtlsMode::Unset,
            &[(8080, MtlsMode::Disable)],
        );
        let all = [mesh.clone(), ns.clone(), unset];
        assert_eq!(mtls_mode(&all, &w, 80), MtlsMode::Permissive, "UNSET inherits");
        assert_eq!(mtls_mode(&all, &w, 8080), MtlsMode::Disable, "port level wins");
        let other = peer_authn("shop", "pay", Some("pay"), MtlsMode::Disable, &[]);
        assert_eq!(
            mtls_mode(&[mesh, other], &w, 80),
            MtlsMode::Strict,
            "another workload's policy"
        );
    }

    #[test]
    fn changes_carry_only_what_differs_and_rebuild_the_target() {
        let a = vec![svc("ns/a", 80), svc("ns/b", 80)];
        let b = vec![a[0].clone(), svc("ns/b", 81), svc("ns/c", 80)];
        let c = Changes::between(&a, &b);
        assert_eq!(
            c.upserted.iter().map(|s| s.key.as_str()).collect::<Vec<_>>(),
            ["ns/b", "ns/c"]
        );
        assert_eq!(c.apply(&a), b);
        let gone = Changes::between(&b, &a[..1]);
        assert_eq!(gone.removed, ["ns/b", "ns/c"]);
        assert_eq!(gone.apply(&b), a[..1].to_vec());
    }

    /// Lists in key order (every snapshot's) are merged in one walk; any other order is
    /// matched by key. Both must find the same changes.
    #[test]
    fn changes_of_ordered_lists_equal_changes_found_by_key() {
        let keys = |n: usize| (0..n).map(|i| format!("ns/s{i:03}")).collect::<Vec<_>>();
        let base: Vec<_> = keys(60).iter().map(|k| svc(k, 80)).collect();
        // Every third shared, every fifth changed, every seventh gone, some new at the end.
        let mut target: Vec<_> = base
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 7 != 3)
            .map(|(i, s)| {
                if i % 5 == 0 {
                    svc(&s.key, 81)
                } else if i % 3 == 0 {
                    s.clone()
                } else {
                    svc(&s.key, 80)
                }
            })
            .collect();
        target.extend(keys(70)[60..].iter().map(|k| svc(k, 80)));
        let merged = Changes::between(&base, &target);
        let mut shuffled = target.clone();
        shuffled.reverse();
        let by_key = Changes::between(&base, &shuffled);
        let keys_of = |c: &Changes<MeshService>| {
            let mut u: Vec<_> = c.upserted.iter().map(|s| s.key.clone()).collect();
            u.sort();
            (u, c.removed.clone())
        };
        assert_eq!(keys_of(&merged), keys_of(&by_key));
        assert_eq!(merged.removed.len(), 9);
        assert_eq!(
            merged.upserted.len(),
            10 + 10,
            "changed and new; equal copies are not sent"
        );
        assert_eq!(merged.apply(&base), target);
    }
}

/// An HTTP probe of the app that the sidecar performs for the kubelet. The injector points the
/// pod's HTTP probes at the sidecar's app-health port (with mTLS required, a plaintext probe
/// would be refused at the app's port) and hands these to the sidecar in `FERRUM_APP_PROBERS`,
/// keyed by the path the rewritten probe asks for (`/app-health/<container>/<probe>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppProbe {
    pub port: u16,
    pub path: String,
    /// `HTTP` or `HTTPS` (the app's certificate is not checked, as the kubelet does not).
    pub scheme: String,
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    pub timeout_seconds: u32,
}

/// The app probes by path, as `FERRUM_APP_PROBERS` carries them.
pub type AppProbes = BTreeMap<String, AppProbe>;

/// The annotation the injector marks an injected pod with: what it added, as JSON, including
/// the pod's [`Capture`] (under `capture`).
pub const INJECTION_STATUS: &str = "ferrum.dev/status";

/// A sidecar's traffic capture (mesh.md): what `ferrum-dp init-iptables` writes as nat rules,
/// what the injector records on the pod (`capture` in the `ferrum.dev/status` annotation), and
/// what the node agent reads back, so that its eBPF redirection sends exactly what the rules
/// would.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Capture {
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    pub inbound_port: u16,
    pub outbound_port: u16,
    /// Inbound ports never captured (HBONE, proxy metrics and readiness, plus the user's).
    pub exclude_inbound: Vec<u16>,
    /// Outbound destination ports never captured.
    pub exclude_outbound: Vec<u16>,
}

impl Default for Capture {
    fn default() -> Self {
        Capture {
            proxy_uid: 1337,
            proxy_gid: 1337,
            inbound_port: 15006,
            outbound_port: 15001,
            exclude_inbound: vec![15008, 15020, 15021, 15090],
            exclude_outbound: Vec::new(),
        }
    }
}
