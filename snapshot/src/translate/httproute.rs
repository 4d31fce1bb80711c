//! HTTPRoutes → routes on the listeners they attach to. GRPCRoutes, TLSRoutes and TCPRoutes are
//! read as the HTTPRoutes they mean and take the same path.

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::sync::Arc;

use foldhash::HashMap;

use gateway_api::experimental::tcproutes::TcpRoute;
use gateway_api::grpcroutes::GrpcRoute;
use gateway_api::httproutes::*;
use gateway_api::tlsroutes::TlsRoute;

use super::backends::{BackendRef, Clusters, Lookup};
use super::gamma::{self, MeshHosts, MeshTarget};
use super::hostname::intersect_hostnames;
use super::listeners::{AllowedNamespaces, GatewayListener, Hosts, Listeners, RouteEntry, RouteKey};
use super::{Problem, Problems, Reason, meta_ref, parse_duration_ms};
use crate::model::*;
use crate::resources::{ObjectRef, Resources};

/// A route as the cache holds it: the object itself keeps its address (the cache's identity
/// test) from being reused while the entry lives.
#[derive(Clone)]
pub(crate) enum RouteObject {
    Http(Arc<HttpRoute>),
    Grpc(Arc<GrpcRoute>),
    Tls(Arc<TlsRoute>),
    Tcp(Arc<TcpRoute>),
}

impl RouteObject {
    /// Same translation input: what the translator reads of a route is its spec and creation
    /// time, so a status write (a new object) changes nothing.
    fn same_input(&self, other: &RouteObject) -> bool {
        macro_rules! same {
            ($a:expr, $b:expr) => {
                $a.spec == $b.spec && $a.metadata.creation_timestamp == $b.metadata.creation_timestamp
            };
        }
        match (self, other) {
            (RouteObject::Http(a), RouteObject::Http(b)) => same!(a, b),
            (RouteObject::Grpc(a), RouteObject::Grpc(b)) => same!(a, b),
            (RouteObject::Tls(a), RouteObject::Tls(b)) => same!(a, b),
            (RouteObject::Tcp(a), RouteObject::Tcp(b)) => same!(a, b),
            _ => false,
        }
    }

    fn metadata(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        match self {
            RouteObject::Http(r) => &r.metadata,
            RouteObject::Grpc(r) => &r.metadata,
            RouteObject::Tls(r) => &r.metadata,
            RouteObject::Tcp(r) => &r.metadata,
        }
    }

    pub(crate) fn kind(&self) -> &'static str {
        match self {
            RouteObject::Http(_) => "HTTPRoute",
            RouteObject::Grpc(_) => "GRPCRoute",
            RouteObject::Tls(_) => "TLSRoute",
            RouteObject::Tcp(_) => "TCPRoute",
        }
    }

    /// The address that identifies the object in the memo.
    fn address(&self) -> usize {
        match self {
            RouteObject::Http(r) => Arc::as_ptr(r) as usize,
            RouteObject::Grpc(r) => Arc::as_ptr(r) as usize,
            RouteObject::Tls(r) => Arc::as_ptr(r) as usize,
            RouteObject::Tcp(r) => Arc::as_ptr(r) as usize,
        }
    }

    /// The HTTPRoute the object means (itself, for an HTTPRoute).
    pub(crate) fn as_http(&self) -> Result<std::borrow::Cow<'_, HttpRoute>, (String, String)> {
        use std::borrow::Cow;
        match self {
            RouteObject::Http(r) => Ok(Cow::Borrowed(&**r)),
            RouteObject::Grpc(g) => super::grpcroute::as_http_route(g).map(Cow::Owned),
            RouteObject::Tls(t) => super::l4route::tls_as_http_route(t).map(Cow::Owned),
            RouteObject::Tcp(t) => super::l4route::tcp_as_http_route(t).map(Cow::Owned),
        }
    }
}

/// What the names of a route object's routes start with: `namespace/name/` for an HTTPRoute,
/// the kind first for the others (`GRPCRoute:namespace/name/`; no object name has a `:`), so
/// an HTTPRoute and a GRPCRoute of one name never share route names, counts or policies.
pub(crate) fn route_name_prefix(kind: &str, namespace: &str, name: &str) -> String {
    match kind {
        "HTTPRoute" => format!("{namespace}/{name}/"),
        _ => format!("{kind}:{namespace}/{name}/"),
    }
}

/// Every route object of `res`, in a stable order.
pub(crate) fn route_objects(res: &Resources) -> impl Iterator<Item = RouteObject> + '_ {
    let http = res.http_routes.iter().cloned().map(RouteObject::Http);
    let grpc = res.grpc_routes.iter().cloned().map(RouteObject::Grpc);
    let tls = res.tls_routes.iter().cloned().map(RouteObject::Tls);
    let tcp = res.tcp_routes.iter().cloned().map(RouteObject::Tcp);
    http.chain(grpc).chain(tls).chain(tcp)
}

/// Everything one route contributed to the last translation, and what it read to get there.
pub(crate) struct RouteMemo {
    pub(crate) id: u64,
    /// The last translation that saw the route.
    seen: u64,
    pub(crate) obj: ObjectRef,
    object: RouteObject,
    /// The backend lookups it made; replayed on reuse (which also rebuilds their clusters) and
    /// compared to tell whether a Service it names changed.
    lookups: Vec<Lookup>,
    targets: Vec<(usize, Vec<String>)>,
    /// Mesh (GAMMA) targets, with the index of the parentRef that named each.
    pub(crate) mesh_targets: Vec<(MeshTarget, usize)>,
    rules: Vec<Arc<RouteEntry>>,
    problems: Vec<Problem>,
    /// Sorted; shared with the translations that list them.
    attachments: Arc<[super::Attachment]>,
}

impl RouteMemo {
    /// The route's creation time, as precedence compares it.
    pub(crate) fn created(&self) -> String {
        created(self.object.metadata())
    }
}

pub(crate) fn created(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    meta.creation_timestamp
        .as_ref()
        .map(|t| format!("{:?}", t.0))
        .unwrap_or_default()
}

/// The route tables routes attach to: Gateway listeners' hosts and mesh Services' ports.
#[derive(Default)]
pub(crate) struct RouteTables {
    pub hosts: Hosts,
    pub mesh: MeshHosts,
}

impl RouteTables {
    pub fn clear(&mut self) {
        self.hosts.clear();
        self.mesh.clear();
    }
}

/// What every route contributed, keyed by the route object's address: an entry holds its
/// object, so the address cannot be reused while the entry lives, and a changed object (a new
/// `Arc`) misses. Indexed by name too, kept in step: the index finds the entry of a route
/// whose object is new (a status write) and lists attachments in route order without sorting.
#[derive(Default)]
pub(crate) struct RouteMemos {
    by_address: HashMap<usize, RouteMemo>,
    by_name: BTreeMap<ObjectRef, (usize, Arc<[super::Attachment]>)>,
}

impl RouteMemos {
    pub(crate) fn clear(&mut self) {
        self.by_address.clear();
        self.by_name.clear();
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &RouteMemo> {
        self.by_address.values()
    }

    fn get_mut(&mut self, address: usize) -> Option<&mut RouteMemo> {
        self.by_address.get_mut(&address)
    }

    /// The address of the entry for the route named `obj`.
    fn named(&self, obj: &ObjectRef) -> Option<usize> {
        self.by_name.get(obj).map(|(a, _)| *a)
    }

    fn insert(&mut self, address: usize, m: RouteMemo) {
        self.by_name.insert(m.obj.clone(), (address, m.attachments.clone()));
        self.by_address.insert(address, m);
    }

    fn remove(&mut self, address: usize) -> Option<RouteMemo> {
        let m = self.by_address.remove(&address)?;
        if self.by_name.get(&m.obj).is_some_and(|(a, _)| *a == address) {
            self.by_name.remove(&m.obj);
        }
        Some(m)
    }

    /// Drops the entries not seen by translation `pass`, detaching them from `tables`.
    fn drop_unseen(&mut self, pass: u64, tables: &mut RouteTables) {
        let by_name = &mut self.by_name;
        self.by_address.retain(|address, m| {
            if m.seen != pass {
                detach(tables, m);
                if by_name.get(&m.obj).is_some_and(|(a, _)| a == address) {
                    by_name.remove(&m.obj);
                }
            }
            m.seen == pass
        });
    }

    /// Every route's attachments, in route order (groups shared, not copied).
    pub(crate) fn attachments(&self) -> super::Attachments {
        super::Attachments::from_groups(
            self.by_name
                .values()
                .filter(|(_, a)| !a.is_empty())
                .map(|(_, a)| a.clone()),
        )
    }
}

/// Puts a route's matches on its hosts (whose virtual hosts must then be rebuilt).
fn attach(tables: &mut RouteTables, m: &RouteMemo) {
    for (bound, hostnames) in &m.targets {
        for host in hostnames {
            let h = tables.hosts.entry((*bound, host.clone())).or_default();
            h.entries.extend(m.rules.iter().cloned());
            h.built = None;
        }
    }
    for (t, _) in &m.mesh_targets {
        let h = tables.mesh.entry(t.clone()).or_default();
        h.entries.extend(m.rules.iter().cloned());
        h.built = None;
    }
}

fn detach(tables: &mut RouteTables, m: &RouteMemo) {
    fn remove<K: Ord + Clone>(map: &mut std::collections::BTreeMap<K, super::listeners::Host>, key: &K, id: u64) {
        if let Some(h) = map.get_mut(key) {
            h.entries.retain(|e| e.owner != id);
            h.built = None;
            if h.entries.is_empty() {
                map.remove(key);
            }
        }
    }
    for (bound, hostnames) in &m.targets {
        for host in hostnames {
            remove(&mut tables.hosts, &(*bound, host.clone()), m.id);
        }
    }
    for (t, _) in &m.mesh_targets {
        remove(&mut tables.mesh, t, m.id);
    }
}

/// Brings `tables` and `memo` up to date with every HTTPRoute and GRPCRoute: routes whose object
/// (or spec), and whose Services, did not change keep what they contributed; the rest are
/// translated.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attach_all(
    res: &Resources,
    listeners: &Listeners,
    clusters: &mut Clusters<'_>,
    problems: &mut Problems<'_>,
    memo: &mut RouteMemos,
    hosts: &mut RouteTables,
    next_id: &mut u64,
    stats: &mut super::Stats,
) {
    *next_id += 1;
    let pass = *next_id;
    for object in route_objects(res) {
        let address = object.address();
        // In place: an unchanged route (nearly all) costs a lookup and a replay.
        if let Some(m) = memo.get_mut(address) {
            if clusters.replay(&m.lookups) {
                m.seen = pass;
                problems.list.extend(m.problems.iter().cloned());
                stats.routes_reused += 1;
                continue;
            }
            let m = memo.remove(address).expect("present");
            detach(hosts, &m);
        }
        let obj = meta_ref(object.kind(), object.metadata());
        // A new object for a route we know with the same spec (a status write) changes nothing.
        if let Some(old) = memo.named(&obj)
            && memo
                .get_mut(old)
                .is_some_and(|m| m.object.same_input(&object) && clusters.replay(&m.lookups))
        {
            let mut m = memo.remove(old).expect("checked");
            m.object = object;
            m.seen = pass;
            problems.list.extend(m.problems.iter().cloned());
            stats.routes_reused += 1;
            memo.insert(address, m);
            continue;
        }
        stats.routes_translated += 1;
        *next_id += 1;
        let mut m = translate_route(res, object, obj, *next_id, listeners, clusters, problems);
        m.seen = pass;
        attach(hosts, &m);
        memo.insert(address, m);
    }
    // Deleted routes, and old versions of changed ones.
    memo.drop_unseen(pass, hosts);
}

fn translate_route(
    res: &Resources,
    object: RouteObject,
    obj: ObjectRef,
    id: u64,
    listeners: &Listeners,
    clusters: &mut Clusters<'_>,
    problems: &mut Problems<'_>,
) -> RouteMemo {
    let p0 = problems.list.len();
    let (targets, mesh_targets, rules) = translate_object(res, &object, &obj, id, listeners, clusters, problems);
    let mut attachments = std::mem::take(&mut problems.attachments);
    attachments.sort();
    RouteMemo {
        id,
        lookups: clusters.take_trace(),
        targets,
        mesh_targets,
        rules,
        problems: problems.list[p0..].to_vec(),
        attachments: attachments.into(),
        obj,
        object,
        seen: 0,
    }
}

type Translated = (
    Vec<(usize, Vec<String>)>,
    Vec<(MeshTarget, usize)>,
    Vec<Arc<RouteEntry>>,
);

/// A route's targets and rules (clusters traced from here on).
fn translate_object(
    res: &Resources,
    object: &RouteObject,
    obj: &ObjectRef,
    id: u64,
    listeners: &Listeners,
    clusters: &mut Clusters<'_>,
    problems: &mut Problems<'_>,
) -> Translated {
    let obj = obj.clone();
    let converted = object.as_http();
    let route: Option<&HttpRoute> = match &converted {
        Ok(r) => Some(r),
        Err((field, msg)) => {
            problems.push(&obj, field.clone(), Reason::UnsupportedValue, msg.clone());
            None
        }
    };
    clusters.start_trace();
    let mut targets = Vec::new();
    let mut mesh_targets = Vec::new();
    let mut rules = Vec::new();
    if let Some(route) = route {
        targets = parents(res, route, &obj, listeners, &mut mesh_targets, problems);
        if !targets.is_empty() || !mesh_targets.is_empty() {
            let created = created(&route.metadata);
            // Mesh routes need no ReferenceGrant for backends in other namespaces (mesh.md).
            clusters.waive_grants(targets.is_empty());
            let mesh_only = targets.is_empty();
            rules = translate_rules(route, &obj, clusters, problems)
                .into_iter()
                .map(|(ri, mi, mut r)| {
                    // In the mesh, as Istio has it, a route without timeouts has none: the
                    // cluster's read timeout is a Gateway's default, not a sidecar's.
                    r.timeouts.unbounded |= mesh_only;
                    Arc::new(RouteEntry {
                        owner: id,
                        key: key(&created, &obj, ri, mi, &r.matcher),
                        digest: r.digest(),
                        route: Arc::new(r),
                    })
                })
                .collect();
            clusters.waive_grants(false);
        }
    }
    (targets, mesh_targets, rules)
}

fn key(created: &str, obj: &ObjectRef, rule: usize, matcher: usize, m: &RouteMatch) -> RouteKey {
    let (path_kind, len) = match &m.path {
        PathMatch::Exact(p) => (0, p.len()),
        PathMatch::Regex(p) => (1, p.len()),
        PathMatch::Prefix(p) => (2, p.len()),
    };
    RouteKey {
        path_kind,
        path_len: Reverse(len),
        no_method: m.method.is_none(),
        headers: Reverse(m.headers.len()),
        query: Reverse(m.query_params.len()),
        created: created.to_string(),
        route: format!("{}/{}", obj.namespace, obj.name),
        rule,
        matcher,
    }
}

/// The (bound listener, hostnames) pairs a route attaches to, and its mesh targets (Service
/// parents); problems for each parentRef that attaches nowhere.
fn parents(
    res: &Resources,
    route: &HttpRoute,
    obj: &ObjectRef,
    listeners: &Listeners,
    mesh: &mut Vec<(MeshTarget, usize)>,
    problems: &mut Problems<'_>,
) -> Vec<(usize, Vec<String>)> {
    let mut out = Vec::new();
    let route_hosts = route.spec.hostnames.clone().unwrap_or_default();
    let refs = route.spec.parent_refs.as_deref().unwrap_or_default();
    if refs.is_empty() {
        problems.push(
            obj,
            "spec.parentRefs",
            Reason::NoMatchingParent,
            "the route names no parent Gateway",
        );
    }
    for (pi, p) in refs.iter().enumerate() {
        match (
            p.group.as_deref().unwrap_or(crate::GATEWAY_GROUP),
            p.kind.as_deref().unwrap_or("Gateway"),
        ) {
            (crate::GATEWAY_GROUP, "Gateway") => {}
            ("", "Service") if listeners.mesh => {
                let targets = gamma::service_parent(res, p, pi, obj, problems);
                mesh.extend(targets.into_iter().map(|t| (t, pi)));
                continue;
            }
            // A proxy of one Gateway: mesh parents are the sidecars' business.
            ("", "Service") => continue,
            _ => {
                problems.push(
                    obj,
                    format!("spec.parentRefs[{pi}]"),
                    Reason::InvalidKind,
                    "only Gateway and Service parents are supported",
                );
                continue;
            }
        }
        out.extend(gateway_parent(res, p, pi, obj, &route_hosts, listeners, problems));
    }
    merge_by_listener(out)
}

/// The listeners of one Gateway parentRef the route attaches to, with the hostnames it gets on
/// each; a problem when it attaches to none.
fn gateway_parent(
    res: &Resources,
    p: &HttpRouteParentRefs,
    pi: usize,
    obj: &ObjectRef,
    route_hosts: &[String],
    listeners: &Listeners,
    problems: &mut Problems<'_>,
) -> Vec<(usize, Vec<String>)> {
    let field = format!("spec.parentRefs[{pi}]");
    let gw = ObjectRef {
        kind: "Gateway",
        namespace: p.namespace.clone().unwrap_or_else(|| obj.namespace.clone()),
        name: p.name.clone(),
    };
    let Some(gls) = listeners.by_gateway.get(&gw) else {
        problems.push(
            obj,
            field,
            Reason::NoMatchingParent,
            format!("{gw} does not exist or is not served by Ferrum"),
        );
        return Vec::new();
    };
    let allowed = match allowed_listeners(res, p, gls, obj, &gw) {
        Ok(allowed) => allowed,
        Err((reason, why)) => {
            problems.push(obj, field, reason, why);
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for l in allowed {
        if let Some(hosts) = intersect_hostnames(l.hostname.as_deref(), route_hosts) {
            out.push((l.bound, hosts));
            problems.attachments.push(super::Attachment {
                route: obj.clone(),
                parent_ref: pi,
                gateway: gw.clone(),
                listener: l.name.clone(),
            });
        }
    }
    if out.is_empty() {
        problems.push(
            obj,
            field,
            Reason::NoMatchingListenerHostname,
            format!("no hostname of the route intersects the listeners of {gw}"),
        );
    }
    out
}

/// The listeners of Gateway `gw` (`gls`) that parentRef `p` selects (by sectionName and port)
/// and that take route `obj`'s kind from its namespace, or why there are none.
fn allowed_listeners<'l>(
    res: &Resources,
    p: &HttpRouteParentRefs,
    gls: &'l [GatewayListener],
    obj: &ObjectRef,
    gw: &ObjectRef,
) -> Result<Vec<&'l GatewayListener>, (Reason, String)> {
    let selected: Vec<&GatewayListener> = gls
        .iter()
        .filter(|l| {
            p.section_name.as_ref().is_none_or(|s| *s == l.name) && p.port.is_none_or(|port| port == i32::from(l.port))
        })
        .collect();
    if selected.is_empty() {
        return Err((
            Reason::NoMatchingParent,
            format!("{gw} has no listener matching sectionName/port"),
        ));
    }
    let allowed: Vec<&GatewayListener> = selected
        .iter()
        .copied()
        .filter(|l| l.allows_kind(obj.kind) && admits_namespace(res, l, &obj.namespace))
        .collect();
    if !allowed.is_empty() {
        return Ok(allowed);
    }
    let why = if selected.iter().any(|l| l.allows_kind(obj.kind)) {
        format!(
            "no listener of {gw} allows {}s from namespace {:?}",
            obj.kind, obj.namespace
        )
    } else {
        format!(
            "no listener of {gw} takes {}s (an HTTP or HTTPS listener takes HTTPRoute and GRPCRoute, TLS takes TLSRoute, TCP takes TCPRoute)",
            obj.kind
        )
    };
    Err((Reason::NotAllowedByListeners, why))
}

/// Whether a listener's `allowedRoutes.namespaces` admits routes from `namespace`.
fn admits_namespace(res: &Resources, l: &GatewayListener, namespace: &str) -> bool {
    match &l.allowed {
        AllowedNamespaces::All => true,
        AllowedNamespaces::Same => l.gateway.namespace == namespace,
        AllowedNamespaces::Selector(want) => {
            let have = res
                .namespaces
                .iter()
                .find(|n| n.metadata.name.as_deref() == Some(namespace))
                .and_then(|n| n.metadata.labels.as_ref());
            want.iter().all(|(k, v)| have.and_then(|h| h.get(k)) == Some(v))
        }
    }
}

/// The same listener reached through two parentRefs: one entry with the hostnames merged.
fn merge_by_listener(mut out: Vec<(usize, Vec<String>)>) -> Vec<(usize, Vec<String>)> {
    out.sort();
    let mut merged: Vec<(usize, Vec<String>)> = Vec::new();
    for (b, hosts) in out {
        match merged.last_mut() {
            Some((lb, lh)) if *lb == b => {
                lh.extend(hosts);
                lh.sort();
                lh.dedup();
            }
            _ => merged.push((b, hosts)),
        }
    }
    merged
}

/// Translates every rule once; returns (rule index, match index, route).
fn translate_rules(
    route: &HttpRoute,
    obj: &ObjectRef,
    clusters: &mut Clusters<'_>,
    problems: &mut Problems<'_>,
) -> Vec<(usize, usize, Route)> {
    let mut out = Vec::new();
    for (ri, rule) in route.spec.rules.iter().flatten().enumerate() {
        let field = format!("spec.rules[{ri}]");
        let Some(parts) = rule_parts(rule, &field, obj, clusters, problems) else {
            continue;
        };
        let default_match = [HttpRouteRulesMatches::default()];
        let matches = match rule.matches.as_deref() {
            Some(m) if !m.is_empty() => m,
            _ => &default_match[..],
        };
        for (mi, m) in matches.iter().enumerate() {
            let mfield = format!("{field}.matches[{mi}]");
            let Some(matcher) = route_match(m, &mfield, obj, problems) else {
                continue;
            };
            let name = format!("{}{ri}/{mi}", route_name_prefix(obj.kind, &obj.namespace, &obj.name));
            let mut r = Route {
                name,
                matcher,
                request_headers: parts.request_headers.clone(),
                response_headers: parts.response_headers.clone(),
                rewrite: parts.rewrite.clone(),
                action: parts.action.clone(),
                timeouts: parts.timeouts.clone(),
                retry: None,
                fault: None,
                mirror: None,
                more_mirrors: Vec::new(),
                cors: parts.cors.clone(),
                direct_response: None,
                rate_limits: Vec::new(),
            };
            r.set_mirrors(parts.mirrors.clone());
            let needs_prefix = matches!(
                &r.rewrite,
                Some(Rewrite {
                    path: Some(PathRewrite::Prefix(_)),
                    ..
                })
            ) || matches!(
                &r.action,
                Action::Redirect(Redirect {
                    path: Some(PathRewrite::Prefix(_)),
                    ..
                })
            );
            if needs_prefix && !matches!(r.matcher.path, PathMatch::Prefix(_)) {
                problems.push(
                    obj,
                    format!("{field}.filters"),
                    Reason::UnsupportedValue,
                    "ReplacePrefixMatch needs a PathPrefix match",
                );
                continue;
            }
            out.push((ri, mi, r));
        }
    }
    out
}

struct RuleParts {
    request_headers: HeaderModifier,
    response_headers: HeaderModifier,
    rewrite: Option<Rewrite>,
    action: Action,
    timeouts: RouteTimeouts,
    /// One per RequestMirror filter, in order.
    mirrors: Vec<Mirror>,
    cors: Option<Cors>,
}

/// Request and response header modifiers are distinct generated types of the same shape.
macro_rules! header_modifier {
    ($m:expr) => {{
        HeaderModifier {
            set: $m
                .set
                .iter()
                .flatten()
                .map(|h| (h.name.to_ascii_lowercase(), h.value.clone()))
                .collect(),
            add: $m
                .add
                .iter()
                .flatten()
                .map(|h| (h.name.to_ascii_lowercase(), h.value.clone()))
                .collect(),
            remove: $m.remove.iter().flatten().map(|h| h.to_ascii_lowercase()).collect(),
        }
    }};
}

fn rewrite_of(rw: &HttpRouteRulesFiltersUrlRewrite) -> Rewrite {
    Rewrite {
        hostname: rw.hostname.clone(),
        path: rw.path.as_ref().and_then(|p| {
            path_rewrite(
                &p.replace_full_path,
                &p.replace_prefix_match,
                p.r#type == HttpRouteRulesFiltersUrlRewritePathType::ReplaceFullPath,
            )
        }),
    }
}

fn path_rewrite(full: &Option<String>, prefix: &Option<String>, is_full: bool) -> Option<PathRewrite> {
    if is_full {
        full.clone().map(PathRewrite::Full)
    } else {
        prefix.clone().map(PathRewrite::Prefix)
    }
}

fn rule_parts(
    rule: &HttpRouteRules,
    field: &str,
    obj: &ObjectRef,
    clusters: &mut Clusters<'_>,
    problems: &mut Problems<'_>,
) -> Option<RuleParts> {
    let mut parts = RuleParts {
        request_headers: HeaderModifier::default(),
        response_headers: HeaderModifier::default(),
        rewrite: None,
        action: Action::Forward(Vec::new()),
        timeouts: RouteTimeouts::default(),
        mirrors: Vec::new(),
        cors: None,
    };
    let mut redirect = None;
    for (fi, f) in rule.filters.iter().flatten().enumerate() {
        let ffield = format!("{field}.filters[{fi}]");
        if let Some(rd) = apply_filter(f, &ffield, obj, clusters, problems, &mut parts)? {
            redirect = Some(rd);
        }
    }
    parts.timeouts = rule_timeouts(rule, field, obj, problems)?;
    if let Some(rd) = redirect {
        parts.action = Action::Redirect(rd);
        return Some(parts);
    }
    let backends = rule_backends(rule, field, obj, clusters, problems)?;
    parts.action = Action::Forward(backends);
    Some(parts)
}

/// Applies filter `f` (at `ffield`) to `parts`, returning a RequestRedirect's redirect; `None`
/// when the filter cannot be applied (the problem noted).
fn apply_filter(
    f: &HttpRouteRulesFilters,
    ffield: &str,
    obj: &ObjectRef,
    clusters: &mut Clusters<'_>,
    problems: &mut Problems<'_>,
    parts: &mut RuleParts,
) -> Option<Option<Redirect>> {
    // The filter's settings for its type: a filter without them is invalid.
    let mut need = |what: &str, present: bool| {
        if !present {
            let why = format!("filter type {:?} needs {what}", f.r#type);
            problems.push(obj, format!("{ffield}.{what}"), Reason::Invalid, why);
        }
        present.then_some(())
    };
    use HttpRouteRulesFiltersType as Type;
    match f.r#type {
        Type::RequestHeaderModifier => {
            need("requestHeaderModifier", f.request_header_modifier.is_some())?;
            let m = header_modifier!(f.request_header_modifier.as_ref()?);
            parts.request_headers = checked(m, &format!("{ffield}.requestHeaderModifier"), obj, problems)?;
        }
        Type::ResponseHeaderModifier => {
            need("responseHeaderModifier", f.response_header_modifier.is_some())?;
            let m = header_modifier!(f.response_header_modifier.as_ref()?);
            parts.response_headers = checked(m, &format!("{ffield}.responseHeaderModifier"), obj, problems)?;
        }
        Type::RequestRedirect => {
            need("requestRedirect", f.request_redirect.is_some())?;
            return Some(Some(redirect_of(f.request_redirect.as_ref()?, ffield, obj, problems)?));
        }
        Type::UrlRewrite => {
            need("urlRewrite", f.url_rewrite.is_some())?;
            parts.rewrite = Some(rewrite_of(f.url_rewrite.as_ref()?));
        }
        Type::Cors => {
            need("cors", f.cors.is_some())?;
            match super::cors::of_filter(f.cors.as_ref()?, &format!("{ffield}.cors")) {
                Ok(c) => parts.cors = Some(c),
                Err((field, why)) => {
                    problems.push(obj, field, Reason::Invalid, why);
                    return None;
                }
            }
        }
        Type::RequestMirror => {
            need("requestMirror", f.request_mirror.is_some())?;
            // Several are copied to each (Gateway API: HTTPRouteRequestMultipleMirrors).
            parts
                .mirrors
                .extend(mirror_of(f.request_mirror.as_ref()?, ffield, obj, clusters, problems)?);
        }
        ref other => {
            let why = format!("filter type {other:?} is not supported yet");
            problems.push(obj, format!("{ffield}.type"), Reason::UnsupportedValue, why);
            return None;
        }
    }
    Some(None)
}

/// A header modifier (at `field`) that can be applied; `None` with the problem noted when not.
fn checked(m: HeaderModifier, field: &str, obj: &ObjectRef, problems: &mut Problems<'_>) -> Option<HeaderModifier> {
    match crate::validate::header_modifier_problem(&m) {
        Some(why) => {
            problems.push(obj, field, Reason::Invalid, why);
            None
        }
        None => Some(m),
    }
}

/// A RequestMirror filter's mirror: `Some(None)` when its backend does not resolve (the problem
/// noted, the mirror left out while the rule serves, as the spec asks), `None` when the filter
/// is invalid.
fn mirror_of(
    m: &HttpRouteRulesFiltersRequestMirror,
    field: &str,
    obj: &ObjectRef,
    clusters: &mut Clusters<'_>,
    problems: &mut Problems<'_>,
) -> Option<Option<Mirror>> {
    let share = match (m.percent, &m.fraction) {
        (None, None) => Some(1_000_000),
        (Some(p), None) => (0..=100).contains(&p).then(|| p as u32 * 10_000),
        (None, Some(f)) => {
            let d = f.denominator.unwrap_or(100);
            (d > 0 && (0..=d).contains(&f.numerator))
                .then(|| (i64::from(f.numerator) * 1_000_000 / i64::from(d)) as u32)
        }
        (Some(_), Some(_)) => None,
    };
    let Some(per_million) = share else {
        problems.push(
            obj,
            format!("{field}.requestMirror"),
            Reason::Invalid,
            "percent (0-100) or a fraction (0 ≤ numerator ≤ denominator, denominator > 0), not both",
        );
        return None;
    };
    let b = &m.backend_ref;
    let r = BackendRef::with_defaults(
        b.group.as_deref(),
        b.kind.as_deref(),
        b.namespace.as_deref(),
        &b.name,
        b.port,
        &obj.namespace,
    );
    match clusters.resolve(obj.kind, &obj.namespace, &r) {
        Ok(cluster) => Some(Some(Mirror { cluster, per_million })),
        Err((reason, msg)) => {
            problems.push(obj, format!("{field}.requestMirror.backendRef"), reason, msg);
            Some(None)
        }
    }
}

/// A RequestRedirect filter's redirect, or `None` with the problem noted.
fn redirect_of(
    rd: &HttpRouteRulesFiltersRequestRedirect,
    ffield: &str,
    obj: &ObjectRef,
    problems: &mut Problems<'_>,
) -> Option<Redirect> {
    let status = rd.status_code.unwrap_or(302);
    if !matches!(status, 301 | 302 | 303 | 307 | 308) {
        problems.push(
            obj,
            format!("{ffield}.requestRedirect.statusCode"),
            Reason::UnsupportedValue,
            format!("{status} is not 301, 302, 303, 307 or 308"),
        );
        return None;
    }
    let port = match rd.port.map(u16::try_from) {
        None => None,
        Some(Ok(p)) if p > 0 => Some(p),
        Some(_) => {
            problems.push(
                obj,
                format!("{ffield}.requestRedirect.port"),
                Reason::Invalid,
                "not a port",
            );
            return None;
        }
    };
    Some(Redirect {
        scheme: rd.scheme.as_ref().map(|s| match s {
            HttpRouteRulesFiltersRequestRedirectScheme::Http => "http".to_string(),
            HttpRouteRulesFiltersRequestRedirectScheme::Https => "https".to_string(),
        }),
        hostname: rd.hostname.clone(),
        port,
        path: rd.path.as_ref().and_then(|p| {
            path_rewrite(
                &p.replace_full_path,
                &p.replace_prefix_match,
                p.r#type == HttpRouteRulesFiltersRequestRedirectPathType::ReplaceFullPath,
            )
        }),
        status: status as u16,
    })
}

/// A rule's request and backend-request timeouts, or `None` with the problem noted.
fn rule_timeouts(
    rule: &HttpRouteRules,
    field: &str,
    obj: &ObjectRef,
    problems: &mut Problems<'_>,
) -> Option<RouteTimeouts> {
    let mut timeouts = RouteTimeouts::default();
    if let Some(t) = &rule.timeouts {
        // Once the route says anything (a request limit, or "0s": none), the cluster's read
        // timeout is no longer its per-try limit: only what the route sets applies.
        timeouts.unbounded = t.request.is_some() || t.backend_request.is_some();
        for (name, v, slot) in [
            ("request", &t.request, &mut timeouts.request_ms),
            ("backendRequest", &t.backend_request, &mut timeouts.backend_request_ms),
        ] {
            if let Some(v) = v {
                match parse_duration_ms(v) {
                    Ok(0) => {} // "0s" disables the timeout
                    Ok(ms) => *slot = Some(ms),
                    Err(e) => {
                        problems.push(obj, format!("{field}.timeouts.{name}"), Reason::UnsupportedValue, e);
                        return None;
                    }
                }
            }
        }
    }
    Some(timeouts)
}

/// A backendRef's own filters: header edits of what is sent to it and of its answers (the
/// other filter types are not supported per backend).
fn backend_headers(
    filters: &[HttpRouteRulesBackendRefsFilters],
    at: &str,
) -> Result<Option<Box<BackendHeaders>>, (String, Reason, String)> {
    let mut h = BackendHeaders::default();
    for (fi, f) in filters.iter().enumerate() {
        let at = format!("{at}.filters[{fi}]");
        let (edits, which) = match (&f.r#type, &f.request_header_modifier, &f.response_header_modifier) {
            (HttpRouteRulesBackendRefsFiltersType::RequestHeaderModifier, Some(m), _) => {
                (&mut h.request, header_modifier!(m))
            }
            (HttpRouteRulesBackendRefsFiltersType::ResponseHeaderModifier, _, Some(m)) => {
                (&mut h.response, header_modifier!(m))
            }
            (HttpRouteRulesBackendRefsFiltersType::RequestHeaderModifier, None, _)
            | (HttpRouteRulesBackendRefsFiltersType::ResponseHeaderModifier, _, None) => {
                return Err((at, Reason::Invalid, "the filter's modifier is missing".into()));
            }
            (other, ..) => {
                return Err((
                    format!("{at}.type"),
                    Reason::UnsupportedValue,
                    format!("filter type {other:?} is not supported on a backendRef (header modifiers are)"),
                ));
            }
        };
        if let Some(msg) = crate::validate::header_modifier_problem(&which) {
            return Err((at, Reason::Invalid, msg));
        }
        *edits = which;
    }
    Ok(Some(Box::new(h)).filter(|h| **h != BackendHeaders::default()))
}

/// A rule's weighted backends (one unresolved backend when none has weight: the spec's 500),
/// or `None` with the problem noted.
fn rule_backends(
    rule: &HttpRouteRules,
    field: &str,
    obj: &ObjectRef,
    clusters: &mut Clusters<'_>,
    problems: &mut Problems<'_>,
) -> Option<Vec<WeightedCluster>> {
    let mut backends = Vec::new();
    for (bi, b) in rule.backend_refs.iter().flatten().enumerate() {
        let bfield = format!("{field}.backendRefs[{bi}]");
        let weight = b.weight.unwrap_or(1);
        if !(0..=i64::from(crate::validate::MAX_WEIGHT)).contains(&i64::from(weight)) {
            problems.push(
                obj,
                format!("{bfield}.weight"),
                Reason::Invalid,
                "weight must be between 0 and 1000000",
            );
            return None;
        }
        let headers = match backend_headers(b.filters.as_deref().unwrap_or_default(), &bfield) {
            Ok(h) => h,
            Err((field, reason, why)) => {
                problems.push(obj, field, reason, why);
                return None;
            }
        };
        let r = BackendRef::with_defaults(
            b.group.as_deref(),
            b.kind.as_deref(),
            b.namespace.as_deref(),
            &b.name,
            b.port,
            &obj.namespace,
        );
        let cluster = match clusters.resolve(obj.kind, &obj.namespace, &r) {
            Ok(c) => Some(c),
            Err((reason, msg)) => {
                problems.push(obj, bfield, reason, msg);
                None
            }
        };
        if weight > 0 {
            backends.push(WeightedCluster {
                cluster,
                weight: weight as u32,
                headers,
            });
        }
    }
    if backends.is_empty() {
        // No backends (or all weight 0): the spec asks for a 500.
        backends.push(WeightedCluster {
            cluster: None,
            weight: 1,
            headers: None,
        });
    }
    Some(backends)
}

fn string_match(
    exact: bool,
    value: &str,
    field: String,
    obj: &ObjectRef,
    problems: &mut Problems<'_>,
) -> Option<StringMatch> {
    if exact {
        return Some(StringMatch::Exact(value.to_string()));
    }
    match regex::Regex::new(value) {
        Ok(_) => Some(StringMatch::Regex(value.to_string())),
        Err(e) => {
            problems.push(
                obj,
                field,
                Reason::UnsupportedValue,
                format!("invalid regular expression: {e}"),
            );
            None
        }
    }
}

fn path_match(
    p: &HttpRouteRulesMatchesPath,
    field: &str,
    obj: &ObjectRef,
    problems: &mut Problems<'_>,
) -> Option<PathMatch> {
    let value = p.value.clone().unwrap_or_else(|| "/".into());
    let kind = p.r#type.clone().unwrap_or(HttpRouteRulesMatchesPathType::PathPrefix);
    if kind == HttpRouteRulesMatchesPathType::RegularExpression {
        return match regex::Regex::new(&value) {
            Ok(_) => Some(PathMatch::Regex(value)),
            Err(e) => {
                problems.push(
                    obj,
                    format!("{field}.path.value"),
                    Reason::UnsupportedValue,
                    format!("invalid regular expression: {e}"),
                );
                None
            }
        };
    }
    if !value.starts_with('/') {
        problems.push(
            obj,
            format!("{field}.path.value"),
            Reason::Invalid,
            format!("{value:?} must start with '/'"),
        );
        return None;
    }
    if kind == HttpRouteRulesMatchesPathType::Exact {
        return Some(PathMatch::Exact(value));
    }
    // `/foo/` and `/foo` are the same segment prefix.
    let trimmed = value.trim_end_matches('/');
    Some(PathMatch::Prefix(if trimmed.is_empty() {
        "/".into()
    } else {
        trimmed.to_string()
    }))
}

fn route_match(
    m: &HttpRouteRulesMatches,
    field: &str,
    obj: &ObjectRef,
    problems: &mut Problems<'_>,
) -> Option<RouteMatch> {
    let path = match &m.path {
        None => PathMatch::default(),
        Some(p) => path_match(p, field, obj, problems)?,
    };
    let mut headers = Vec::new();
    for (i, h) in m.headers.iter().flatten().enumerate() {
        let exact = h
            .r#type
            .as_ref()
            .is_none_or(|t| *t == HttpRouteRulesMatchesHeadersType::Exact);
        if crate::validate::http_header_name_invalid(&h.name) {
            problems.push(
                obj,
                format!("{field}.headers[{i}].name"),
                Reason::Invalid,
                format!("{:?} is not a valid header name", h.name),
            );
            return None;
        }
        headers.push(KeyMatch {
            name: h.name.to_ascii_lowercase(),
            value: string_match(exact, &h.value, format!("{field}.headers[{i}].value"), obj, problems)?,
        });
    }
    let mut query_params = Vec::new();
    for (i, q) in m.query_params.iter().flatten().enumerate() {
        let exact = q
            .r#type
            .as_ref()
            .is_none_or(|t| *t == HttpRouteRulesMatchesQueryParamsType::Exact);
        query_params.push(KeyMatch {
            name: q.name.clone(),
            value: string_match(
                exact,
                &q.value,
                format!("{field}.queryParams[{i}].value"),
                obj,
                problems,
            )?,
        });
    }
    let method = m.method.as_ref().map(|m| {
        serde_json::to_value(m)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    });
    Some(RouteMatch {
        path,
        method,
        headers,
        query_params,
        source: None,
    })
}
