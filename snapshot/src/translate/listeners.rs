//! Gateways → bound listeners. Gateway listeners that share an address and port become one
//! snapshot listener, told apart by hostname (and by SNI for HTTPS and TLS).

use std::collections::BTreeMap;
use std::sync::Arc;

use gateway_api::gateways::{
    Gateway, GatewayListeners, GatewayListenersAllowedRoutesNamespacesFrom, GatewayListenersTlsMode,
};

use super::{Options, Problems, Reason, meta_ref};
use crate::model::{
    CertSource, Certificate, ClientAddress, Digest, GatewayHost, Listener, Protocol, Route, VirtualHost, vhost_digest,
};
use crate::resources::{ObjectRef, Resources};
use crate::secret::TlsSecret;

/// One Gateway listener that routes can attach to.
pub(crate) struct GatewayListener {
    pub gateway: ObjectRef,
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    pub hostname: Option<String>,
    pub allowed: AllowedNamespaces,
    /// `allowedRoutes.kinds`, when the listener restricts them.
    pub kinds: Option<Vec<String>>,
    /// Index of the bound listener it lives on.
    pub bound: usize,
}

impl GatewayListener {
    /// The route kinds of its protocol (see [`route_kinds`]), narrowed by `allowedRoutes.kinds`.
    pub fn allows_kind(&self, kind: &str) -> bool {
        route_kinds(self.protocol).contains(&kind) && self.kinds.as_ref().is_none_or(|k| k.iter().any(|k| k == kind))
    }
}

/// The route kinds a listener of `protocol` serves.
pub fn route_kinds(protocol: Protocol) -> &'static [&'static str] {
    match protocol {
        Protocol::Http | Protocol::Https => &["HTTPRoute", "GRPCRoute"],
        Protocol::Tls => &["TLSRoute"],
        Protocol::Tcp => &["TCPRoute"],
        Protocol::Unknown => &[],
    }
}

/// A Gateway listener's protocol, from `protocol` and, for TLS, `tls.mode`.
pub fn listener_protocol(l: &gateway_api::gateways::GatewayListeners) -> Result<Protocol, String> {
    let passthrough = l
        .tls
        .as_ref()
        .is_some_and(|t| matches!(t.mode, Some(GatewayListenersTlsMode::Passthrough)));
    match l.protocol.as_str() {
        "HTTP" => Ok(Protocol::Http),
        "HTTPS" if passthrough => Err("an HTTPS listener terminates TLS; use protocol TLS to pass it through".into()),
        "HTTPS" => Ok(Protocol::Https),
        "TLS" => Ok(Protocol::Tls),
        "TCP" => Ok(Protocol::Tcp),
        other => Err(format!("protocol {other:?} is not supported (HTTP, HTTPS, TLS, TCP)")),
    }
}

pub(crate) enum AllowedNamespaces {
    Same,
    All,
    Selector(std::collections::BTreeMap<String, String>),
}

/// A bound listener (its virtual hosts come from [`Hosts`]).
pub(crate) struct Bound {
    pub listener: Listener,
}

/// One translated route match, shared between the translator's memo and the snapshots it made.
pub(crate) struct RouteEntry {
    /// The memo entry (route) it belongs to.
    pub owner: u64,
    pub key: RouteKey,
    pub route: Arc<Route>,
    pub digest: Digest,
}

/// The routes on one (bound listener, hostname), kept between translations; the virtual host
/// built from them is kept until a route on it changes.
#[derive(Default)]
pub(crate) struct Host {
    pub entries: Vec<Arc<RouteEntry>>,
    pub built: Option<(Arc<VirtualHost>, Digest)>,
}

pub(crate) type Hosts = BTreeMap<(usize, String), Host>;

/// Gateway API precedence, smallest first.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct RouteKey {
    /// 0 exact, 1 regex, 2 prefix.
    pub path_kind: u8,
    /// Longer paths first.
    pub path_len: std::cmp::Reverse<usize>,
    pub no_method: bool,
    pub headers: std::cmp::Reverse<usize>,
    pub query: std::cmp::Reverse<usize>,
    /// Oldest route first, then `namespace/name`.
    pub created: String,
    pub route: String,
    pub rule: usize,
    pub matcher: usize,
}

pub(crate) struct Listeners {
    pub bound: Vec<Bound>,
    pub by_gateway: BTreeMap<ObjectRef, Vec<GatewayListener>>,
    /// Whether routes may attach to Services (every scope but a single Gateway's).
    pub mesh: bool,
}

fn served(res: &Resources, gw: &Gateway, opts: &Options) -> bool {
    if let Some(only) = &opts.gateway
        && (gw.metadata.namespace.as_deref() != Some(only.namespace.as_str())
            || gw.metadata.name.as_deref() != Some(only.name.as_str()))
    {
        return false;
    }
    let Some(controller) = &opts.controller_name else {
        return true;
    };
    res.gateway_classes.iter().any(|c| {
        c.metadata.name.as_deref() == Some(gw.spec.gateway_class_name.as_str()) && &c.spec.controller_name == controller
    })
}

/// The Gateway annotation that turns on access logs for its listeners.
pub const ACCESS_LOG_ANNOTATION: &str = "ferrum.dev/access-log";

fn access_log(gw: &Gateway) -> bool {
    gw.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ACCESS_LOG_ANNOTATION))
        .is_some_and(|v| v == "true")
}

/// The Gateway annotations that say how its listeners learn the client's address behind load
/// balancers: `"true"` when every connection starts with a PROXY protocol header, and how many
/// proxies in front append to `X-Forwarded-For`.
pub const PROXY_PROTOCOL_ANNOTATION: &str = "ferrum.dev/proxy-protocol";
pub const XFF_TRUSTED_HOPS_ANNOTATION: &str = "ferrum.dev/xff-trusted-hops";

/// Proxies in front one can trust: more is a misconfiguration, not a topology.
const MAX_XFF_TRUSTED_HOPS: u8 = 16;

fn client_address(gw: &Gateway, obj: &ObjectRef, problems: &mut Problems<'_>) -> Option<ClientAddress> {
    let get = |k: &str| gw.metadata.annotations.as_ref().and_then(|a| a.get(k));
    let field = |k: &str| format!("metadata.annotations[{k}]");
    let proxy_protocol = match get(PROXY_PROTOCOL_ANNOTATION).map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            let why = format!("{other:?} is neither \"true\" nor \"false\"");
            problems.push(obj, field(PROXY_PROTOCOL_ANNOTATION), Reason::Invalid, why);
            return None;
        }
    };
    let xff_trusted_hops = match get(XFF_TRUSTED_HOPS_ANNOTATION).map(|v| v.parse::<u8>()) {
        None => 0,
        Some(Ok(n)) if n <= MAX_XFF_TRUSTED_HOPS => n,
        Some(_) => {
            let why = format!("not a number of proxies from 0 to {MAX_XFF_TRUSTED_HOPS}");
            problems.push(obj, field(XFF_TRUSTED_HOPS_ANNOTATION), Reason::Invalid, why);
            return None;
        }
    };
    Some(ClientAddress {
        proxy_protocol,
        xff_trusted_hops,
    })
}

pub(crate) fn build(res: &Resources, opts: &Options, problems: &mut Problems<'_>) -> Listeners {
    let mut out = Listeners {
        bound: Vec::new(),
        by_gateway: BTreeMap::new(),
        mesh: opts.gateway.is_none(),
    };
    let mut gateways: Vec<&Gateway> = res
        .gateways
        .iter()
        .map(|g| &**g)
        .filter(|g| served(res, g, opts))
        .collect();
    gateways.sort_by_key(|g| (g.metadata.namespace.clone(), g.metadata.name.clone()));
    for gw in gateways {
        let obj = meta_ref("Gateway", &gw.metadata);
        let Some(address) = gateway_address(gw, &obj, problems) else {
            continue;
        };
        let Some(client) = client_address(gw, &obj, problems) else {
            continue;
        };
        let site = Site {
            gw,
            obj: &obj,
            address: &address,
            client,
        };
        let attachable = (gw.spec.listeners.iter().enumerate())
            .filter_map(|(i, l)| out.add(res, &site, i, l, problems))
            .collect();
        out.by_gateway.insert(obj, attachable);
    }
    out
}

/// A Gateway with its address and client-address settings, as its listeners are bound.
struct Site<'a> {
    gw: &'a Gateway,
    obj: &'a ObjectRef,
    address: &'a str,
    client: ClientAddress,
}

impl Listeners {
    /// Binds listener `i` (`l`) of the Gateway at `site`: the route attachment point it makes,
    /// or `None` with the problem noted.
    fn add(
        &mut self,
        res: &Resources,
        site: &Site<'_>,
        i: usize,
        l: &gateway_api::gateways::GatewayListeners,
        problems: &mut Problems<'_>,
    ) -> Option<GatewayListener> {
        let (gw, obj) = (site.gw, site.obj);
        let field = format!("spec.listeners[{i}]");
        let protocol = match listener_protocol(l) {
            Ok(p) => p,
            Err(why) => {
                problems.push(obj, format!("{field}.protocol"), Reason::UnsupportedProtocol, why);
                return None;
            }
        };
        let port = listener_port(l, &field, obj, problems)?;
        let terminates = terminates(protocol, l);
        let certs = if terminates {
            listener_certificates(res, gw, obj, i, l, problems)?
        } else {
            Vec::new()
        };
        let bound = self.bind(site.address, port, protocol, terminates, &field, obj, problems)?;
        // One socket either reads a PROXY header first or does not.
        let listener = &mut self.bound[bound].listener;
        if listener.gateways.is_empty() {
            listener.client_address = site.client;
        } else if listener.client_address != site.client {
            let why = format!(
                "port {port} is shared with a Gateway whose {PROXY_PROTOCOL_ANNOTATION} or {XFF_TRUSTED_HOPS_ANNOTATION} differ"
            );
            problems.push(obj, format!("{field}.port"), Reason::ProtocolConflict, why);
            return None;
        }
        listener.certificates.extend(certs);
        listener.access_log |= access_log(gw);
        listener.note_gateway(obj, l.hostname.clone());
        let (allowed, kinds) = allowed_routes(l);
        Some(GatewayListener {
            gateway: obj.clone(),
            name: l.name.clone(),
            port,
            protocol,
            // TCP has no hostnames: whatever the listener says, its one host is `*`.
            hostname: l.hostname.clone().filter(|_| protocol != Protocol::Tcp),
            allowed,
            kinds,
            bound,
        })
    }
}

/// The Gateway's address (its first, else any), or `None` with the problem noted.
fn gateway_address(gw: &Gateway, obj: &ObjectRef, problems: &mut Problems<'_>) -> Option<String> {
    let address = gw
        .spec
        .addresses
        .as_ref()
        .and_then(|a| a.first())
        .and_then(|a| a.value.clone())
        .unwrap_or_else(|| "0.0.0.0".into());
    if address.parse::<std::net::IpAddr>().is_err() {
        problems.push(
            obj,
            "spec.addresses[0].value",
            Reason::Invalid,
            format!("{address:?} is not an IP address"),
        );
        return None;
    }
    Some(address)
}

fn listener_port(l: &GatewayListeners, field: &str, obj: &ObjectRef, problems: &mut Problems<'_>) -> Option<u16> {
    let Ok(port) = u16::try_from(l.port)
        .map_err(drop)
        .and_then(|p| if p == 0 { Err(()) } else { Ok(p) })
    else {
        problems.push(
            obj,
            format!("{field}.port"),
            Reason::Invalid,
            format!("{} is not a port", l.port),
        );
        return None;
    };
    Some(port)
}

/// Whether a listener terminates TLS: HTTPS does, TLS unless its mode is Passthrough (the
/// Gateway API default is Terminate).
fn terminates(protocol: Protocol, l: &GatewayListeners) -> bool {
    match protocol {
        Protocol::Https => true,
        Protocol::Tls => !l
            .tls
            .as_ref()
            .is_some_and(|t| matches!(t.mode, Some(GatewayListenersTlsMode::Passthrough))),
        _ => false,
    }
}

/// `allowedRoutes`: the namespaces routes may come from, and the kinds when restricted.
fn allowed_routes(l: &GatewayListeners) -> (AllowedNamespaces, Option<Vec<String>>) {
    let ar = l.allowed_routes.as_ref();
    let allowed = match ar.and_then(|a| a.namespaces.as_ref()) {
        None => AllowedNamespaces::Same,
        Some(ns) => match ns.from {
            Some(GatewayListenersAllowedRoutesNamespacesFrom::All) => AllowedNamespaces::All,
            Some(GatewayListenersAllowedRoutesNamespacesFrom::Selector) => AllowedNamespaces::Selector(
                ns.selector
                    .as_ref()
                    .and_then(|s| s.match_labels.clone())
                    .unwrap_or_default(),
            ),
            _ => AllowedNamespaces::Same,
        },
    };
    let kinds = ar
        .and_then(|a| a.kinds.as_ref())
        .filter(|k| !k.is_empty())
        .map(|k| k.iter().map(|k| k.kind.clone()).collect());
    (allowed, kinds)
}

impl Listeners {
    /// The bound listener at `address:port`, opened when it is the first there; `None` (with
    /// the problem noted) when one with another protocol, or the other TLS mode, holds the port.
    #[allow(clippy::too_many_arguments)]
    fn bind(
        &mut self,
        address: &str,
        port: u16,
        protocol: Protocol,
        terminates: bool,
        field: &str,
        obj: &ObjectRef,
        problems: &mut Problems<'_>,
    ) -> Option<usize> {
        let bound = match self
            .bound
            .iter()
            .position(|b| b.listener.address == address && b.listener.port == port)
        {
            Some(b) => {
                let other = &self.bound[b].listener;
                // TLS passthrough and TLS termination cannot share a port: one socket either
                // answers the handshake or forwards it.
                if other.protocol != protocol
                    || (protocol == Protocol::Tls && other.certificates.is_empty() == terminates)
                {
                    let what = if protocol == Protocol::Tls {
                        format!("TLS {}", if terminates { "passthrough" } else { "termination" })
                    } else {
                        format!("{:?}", other.protocol)
                    };
                    problems.push(
                        obj,
                        format!("{field}.protocol"),
                        Reason::ProtocolConflict,
                        format!("port {port} is already {what} on another listener"),
                    );
                    return None;
                }
                b
            }
            None => {
                self.bound.push(Bound {
                    listener: Listener {
                        name: format!("{address}:{port}"),
                        address: address.to_string(),
                        port,
                        protocol,
                        certificates: Vec::new(),
                        virtual_hosts: Vec::new(),
                        gateways: Vec::new(),
                        gateway_hosts: Vec::new(),
                        access_log: false,
                        client_address: Default::default(),
                    },
                });
                self.bound.len() - 1
            }
        };
        Some(bound)
    }
}

impl Listener {
    /// Records that Gateway `obj` has a listener here, for `hostname`.
    fn note_gateway(&mut self, obj: &ObjectRef, hostname: Option<String>) {
        let gw_key = format!("{}/{}", obj.namespace, obj.name);
        let gateways = &mut self.gateways;
        if !gateways.contains(&gw_key) {
            gateways.push(gw_key.clone());
            gateways.sort();
        }
        let hosts = &mut self.gateway_hosts;
        let host = GatewayHost {
            gateway: gw_key,
            hostname,
        };
        if !hosts.contains(&host) {
            hosts.push(host);
            hosts.sort();
        }
    }
}

fn listener_certificates(
    res: &Resources,
    gw: &Gateway,
    obj: &ObjectRef,
    i: usize,
    l: &gateway_api::gateways::GatewayListeners,
    problems: &mut Problems<'_>,
) -> Option<Vec<Certificate>> {
    let field = format!("spec.listeners[{i}].tls");
    let Some(tls) = &l.tls else {
        problems.push(
            obj,
            field,
            Reason::InvalidCertificateRef,
            "a listener that terminates TLS needs tls",
        );
        return None;
    };
    let mut certs = Vec::new();
    // File mode: PEM files named in the listener's implementation-specific TLS options.
    let opts = tls.options.as_ref();
    let file = |k: &str| opts.and_then(|o| o.get(k)).cloned();
    match (file("ferrum.dev/cert-file"), file("ferrum.dev/key-file")) {
        (Some(cert), Some(key)) => certs.push(Certificate {
            hostname: l.hostname.clone(),
            source: CertSource::Files { cert, key },
        }),
        (None, None) => {}
        _ => {
            problems.push(
                obj,
                format!("{field}.options"),
                Reason::InvalidCertificateRef,
                "set both ferrum.dev/cert-file and ferrum.dev/key-file",
            );
            return None;
        }
    }
    let gw_ns = gw.metadata.namespace.clone().unwrap_or_default();
    for (ci, r) in tls.certificate_refs.iter().flatten().enumerate() {
        match certificate_ref(res, &gw_ns, r) {
            Ok(source) => certs.push(Certificate {
                hostname: l.hostname.clone(),
                source,
            }),
            Err((reason, why)) => {
                problems.push(obj, format!("{field}.certificateRefs[{ci}]"), reason, why);
                return None;
            }
        }
    }
    if certs.is_empty() {
        problems.push(
            obj,
            field,
            Reason::InvalidCertificateRef,
            "no certificate: set certificateRefs or the ferrum.dev/cert-file and ferrum.dev/key-file options",
        );
        return None;
    }
    Some(certs)
}

/// The key pair a Gateway in `gw_ns` names by certificateRef `r`: a Secret of its own
/// namespace, or of one whose ReferenceGrant allows it.
fn certificate_ref(
    res: &Resources,
    gw_ns: &str,
    r: &gateway_api::gateways::GatewayListenersTlsCertificateRefs,
) -> Result<CertSource, (Reason, String)> {
    if !r.group.as_deref().unwrap_or("").is_empty() || r.kind.as_deref().unwrap_or("Secret") != "Secret" {
        return Err((Reason::InvalidCertificateRef, "only core Secrets are supported".into()));
    }
    let ns = r.namespace.as_deref().unwrap_or(gw_ns);
    if ns != gw_ns && !super::backends::reference_granted(res, "Gateway", gw_ns, "", "Secret", ns, &r.name) {
        return Err((
            Reason::RefNotPermitted,
            format!(
                "Secret {ns}/{} is in another namespace and no ReferenceGrant allows it",
                r.name
            ),
        ));
    }
    match tls_secret(res, ns, &r.name) {
        Some(secret) => Ok(CertSource::Secret {
            name: format!("{ns}/{}", r.name),
            digest: secret.digest(),
        }),
        None => Err((
            Reason::InvalidCertificateRef,
            format!("Secret {ns}/{} does not exist or lacks tls.crt/tls.key", r.name),
        )),
    }
}

/// Orders routes by precedence and drops listeners that nothing could ever reach.
pub(crate) fn finish(listeners: Listeners, hosts: &mut Hosts) -> (Vec<Listener>, Vec<Vec<Digest>>) {
    let mut out: Vec<(Listener, Vec<Digest>)> = listeners.bound.into_iter().map(|b| (b.listener, Vec::new())).collect();
    for ((bound, hostname), h) in hosts.iter_mut() {
        if h.built.is_none() {
            h.entries.sort_by(|a, b| a.key.cmp(&b.key));
            let vh = VirtualHost {
                hostname: hostname.clone(),
                routes: h.entries.iter().map(|e| e.route.clone()).collect(),
            };
            let digest = vhost_digest(hostname, h.entries.iter().map(|e| &e.digest));
            h.built = Some((Arc::new(vh), digest));
        }
        let (vh, digest) = h.built.as_ref().expect("built above");
        out[*bound].0.virtual_hosts.push(vh.clone());
        out[*bound].1.push(*digest);
    }
    out.sort_by(|a, b| (&a.0.address, a.0.port).cmp(&(&b.0.address, b.0.port)));
    out.into_iter().unzip()
}

/// Value `key` of Secret `ns/name`, if both exist.
fn secret_value(res: &Resources, ns: &str, name: &str, key: &str) -> Option<String> {
    let secret = res
        .secrets
        .iter()
        .find(|s| s.metadata.namespace.as_deref() == Some(ns) && s.metadata.name.as_deref() == Some(name))?;
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        .or_else(|| secret.string_data.as_ref().and_then(|d| d.get(key)).cloned())
}

/// The key pair of Secret `ns/name`, if it exists and has both: `tls.crt` and `tls.key` (a
/// `kubernetes.io/tls` Secret), or `cert` and `key` (Istio's generic form).
pub(crate) fn tls_secret(res: &Resources, ns: &str, name: &str) -> Option<TlsSecret> {
    let get = |a: &str, b: &str| secret_value(res, ns, name, a).or_else(|| secret_value(res, ns, name, b));
    Some(TlsSecret {
        cert: get("tls.crt", "cert")?,
        key: get("tls.key", "key")?,
    })
}

/// The CA certificates Istio reads for Secret `ns/name`: its `ca.crt` or `cacert`, else Secret
/// `<name>-cacert`'s — if they hold a PEM certificate.
pub(crate) fn ca_bundle(res: &Resources, ns: &str, name: &str) -> Option<String> {
    let separate = format!("{name}-cacert");
    [name, separate.as_str()]
        .into_iter()
        .flat_map(|n| ["ca.crt", "cacert"].map(|k| (n, k)))
        .find_map(|(n, k)| secret_value(res, ns, n, k))
        .filter(|pem| pem.contains("-----BEGIN CERTIFICATE-----"))
}

/// The key pairs `snap` names, from the Secrets they were translated from.
pub(crate) fn secrets_of(res: &Resources, snap: &crate::Snapshot) -> crate::Secrets {
    crate::secret::references(snap)
        .filter_map(|(full, _)| {
            let (ns, name) = full.split_once('/')?;
            Some((full.to_string(), Arc::new(tls_secret(res, ns, name)?)))
        })
        .collect()
}
