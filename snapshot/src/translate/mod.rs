//! The pure translator: [`Resources`] in, a [`Snapshot`] and a list of per-object [`Problem`]s
//! out. No I/O, no clock: the same input always gives the same snapshot (and hash).
//!
//! Problems do not stop translation: the object (or the rule, or the backend) at fault is left
//! out, everything else is translated. File mode refuses a config with any problem; the operator
//! turns them into status conditions.

mod backends;
mod client_protocol;
mod cors;
mod default_routes;
mod delegate;
mod destination_rule;
mod ext_authz;
mod gamma;
pub use backends::mesh_config;
pub use mesh::{locality_zone, node_zone};
mod grpcroute;
mod hostname;
mod httproute;
mod l4route;
mod listeners;
mod mesh;
mod policy;
mod rate_limit;
pub use policy::{Jwks, JwksFetch};
mod service_entry;
mod sidecar;
mod virtual_service;
mod workload_entry;

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use gateway_api::gatewayclasses::GatewayClass;
use gateway_api::gateways::Gateway;

use crate::model::{PartDigests, Snapshot};
use crate::resources::{ObjectRef, Resources};

pub use grpcroute::as_http_route;
pub use l4route::{tcp_as_http_route, tls_as_http_route};
pub use listeners::route_kinds;

/// The route kinds a Gateway listener serves, by its protocol (none for one we do not serve).
pub fn listeners_route_kinds(l: &gateway_api::gateways::GatewayListeners) -> &'static [&'static str] {
    listeners::listener_protocol(l).map_or(&[], route_kinds)
}

/// Every route of `res` (of each kind) as the HTTPRoute it means, with its kind; an error names
/// the field that cannot be read so.
pub fn routes_as_http(
    res: &Resources,
) -> impl Iterator<
    Item = (
        &'static str,
        Result<gateway_api::httproutes::HttpRoute, (String, String)>,
    ),
> + '_ {
    httproute::route_objects(res).map(|o| (o.kind(), o.as_http().map(std::borrow::Cow::into_owned)))
}
pub use hostname::{hostname_matches, intersect_hostnames};
pub(crate) use policy::valid_block;

/// Status reasons, named as the Gateway API names them where it has a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    NoMatchingParent,
    NotAllowedByListeners,
    NoMatchingListenerHostname,
    BackendNotFound,
    RefNotPermitted,
    InvalidKind,
    UnsupportedValue,
    UnsupportedProtocol,
    ProtocolConflict,
    InvalidCertificateRef,
    Conflicted,
    Invalid,
    /// A RequestAuthentication's `jwksUri` could not be fetched (it stays in effect).
    JwksUnavailable,
}

impl Reason {
    /// Whether the problem is a status condition of an object that is otherwise fine (a route
    /// attached nowhere, a reference that does not resolve, a listener that conflicts), as
    /// opposed to invalid input (a field no controller could accept).
    pub fn is_condition(self) -> bool {
        !matches!(
            self,
            Reason::Invalid | Reason::UnsupportedValue | Reason::UnsupportedProtocol
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NoMatchingParent => "NoMatchingParent",
            Reason::NotAllowedByListeners => "NotAllowedByListeners",
            Reason::NoMatchingListenerHostname => "NoMatchingListenerHostname",
            Reason::BackendNotFound => "BackendNotFound",
            Reason::RefNotPermitted => "RefNotPermitted",
            Reason::InvalidKind => "InvalidKind",
            Reason::UnsupportedValue => "UnsupportedValue",
            Reason::UnsupportedProtocol => "UnsupportedProtocol",
            Reason::ProtocolConflict => "ProtocolConflict",
            Reason::InvalidCertificateRef => "InvalidCertificateRef",
            Reason::Conflicted => "Conflicted",
            Reason::Invalid => "Invalid",
            Reason::JwksUnavailable => "JwksUnavailable",
        }
    }
}

/// Something wrong with one object, precise enough to fix: which object, which field, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub object: ObjectRef,
    /// Where the object came from (file and document), when known.
    pub origin: Option<String>,
    /// JSON path inside the object, e.g. `spec.rules[0].backendRefs[1].name`.
    pub field: String,
    pub reason: Reason,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(origin) = &self.origin {
            write!(f, "{origin}: ")?;
        }
        write!(
            f,
            "{}: {}: {} ({})",
            self.object,
            self.field,
            self.message,
            self.reason.as_str()
        )
    }
}

#[derive(Debug, Clone)]
pub struct Translation {
    pub snapshot: Snapshot,
    pub problems: Vec<Problem>,
    /// Which route attached to which Gateway listener (for status: `attachedRoutes`, `Accepted`).
    pub attachments: Attachments,
    /// Gateways that were served (their class is ours), for status.
    pub gateways: Vec<ObjectRef>,
    /// The snapshot's part digests, so views of it (a sidecar's) need no re-hashing.
    pub digests: PartDigests,
    /// The key pairs the snapshot names: they travel beside it, never in it.
    pub secrets: crate::Secrets,
}

/// Every route's attachments, grouped by route in route order. A group is shared with the
/// translator's memo of its route: listing 10,000 routes' attachments after a one-route change
/// copies 10,000 pointers, and comparing two listings compares pointers first.
#[derive(Debug, Clone, Default)]
pub struct Attachments(Vec<Arc<[Attachment]>>);

impl Attachments {
    /// `groups`: non-empty, each of one route, in route order.
    pub(crate) fn from_groups(groups: impl Iterator<Item = Arc<[Attachment]>>) -> Attachments {
        Attachments(groups.collect())
    }

    /// These attachments but those of `detached` (route, parentRef index).
    fn without(mut self, detached: &[(ObjectRef, usize)]) -> Attachments {
        if detached.is_empty() {
            return self;
        }
        self.0.retain_mut(|g| {
            if detached.iter().any(|(r, _)| r == &g[0].route) {
                let kept: Vec<Attachment> = g
                    .iter()
                    .filter(|a| !detached.iter().any(|(r, pi)| r == &a.route && *pi == a.parent_ref))
                    .cloned()
                    .collect();
                *g = kept.into();
            }
            !g.is_empty()
        });
        self
    }

    /// The attachments of one route.
    pub fn of(&self, route: &ObjectRef) -> &[Attachment] {
        self.group(route).map_or(&[], |g| g)
    }

    /// The attachments of one route, as shared: the same group (by address) means the same
    /// attachments as a translation that gave it.
    pub fn group(&self, route: &ObjectRef) -> Option<&Arc<[Attachment]>> {
        let i = self.0.partition_point(|g| &g[0].route < route);
        self.0.get(i).filter(|g| &g[0].route == route)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Attachment> {
        self.0.iter().flat_map(|g| g.iter())
    }

    pub fn len(&self) -> usize {
        self.0.iter().map(|g| g.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl PartialEq for Attachments {
    fn eq(&self, other: &Self) -> bool {
        self.0.len() == other.0.len() && self.0.iter().zip(&other.0).all(|(a, b)| Arc::ptr_eq(a, b) || a == b)
    }
}

impl Translation {
    /// The problems of one object: `problems` is sorted by object, so this is a binary search,
    /// not a scan (status is computed for every route after every generation).
    pub fn problems_of(&self, obj: &ObjectRef) -> &[Problem] {
        let start = self.problems.partition_point(|p| &p.object < obj);
        let len = self.problems[start..].partition_point(|p| &p.object == obj);
        &self.problems[start..start + len]
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Attachment {
    pub route: ObjectRef,
    /// Index into the route's `spec.parentRefs`.
    pub parent_ref: usize,
    /// The parent: a Gateway, or a Service for a mesh route.
    pub gateway: ObjectRef,
    pub listener: String,
}

#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Only Gateways whose GatewayClass names this controller are served. `None` (file mode)
    /// serves every Gateway.
    pub controller_name: Option<String>,
    /// Only this Gateway (a proxy that serves one Gateway gets only its listeners).
    pub gateway: Option<ObjectRef>,
}

/// Collects problems and stamps them with their origin.
pub(crate) struct Problems<'a> {
    res: &'a Resources,
    list: Vec<Problem>,
    /// The attachments of the route being translated.
    pub(crate) attachments: Vec<Attachment>,
    /// (route, parentRef index) attachments that lost a conflict after their routes were
    /// translated.
    pub(crate) detached: Vec<(ObjectRef, usize)>,
}

impl Problems<'_> {
    pub(crate) fn push(
        &mut self,
        object: &ObjectRef,
        field: impl Into<String>,
        reason: Reason,
        message: impl Into<String>,
    ) {
        self.list.push(Problem {
            origin: self.res.origin(object).map(str::to_string),
            object: object.clone(),
            field: field.into(),
            reason,
            message: message.into(),
        });
    }
}

pub fn meta_ref(kind: &'static str, meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectRef {
    ObjectRef {
        kind,
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
    }
}

/// Parses a Gateway API duration (`500ms`, `10s`, `1h`) into milliseconds.
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let d: gateway_api::Duration = s.parse().map_err(|e| format!("invalid duration {s:?}: {e}"))?;
    Ok(d.as_millis() as u64)
}

/// Parses an Istio duration (protobuf JSON: `10s`, `0.5s`; and `250ms`, `1m`, `1h`).
pub(crate) fn istio_duration_ms(s: &str) -> Result<u64, String> {
    if !s.ends_with("ms")
        && let Some(secs) = s.strip_suffix('s')
        && let Ok(v) = secs.parse::<f64>()
    {
        return (v.is_finite() && v >= 0.0)
            .then(|| (v * 1000.0).round() as u64)
            .ok_or_else(|| format!("invalid duration {s:?}"));
    }
    parse_duration_ms(s)
}

/// Translates from scratch.
pub fn translate(res: &Resources, version: u64, opts: &Options) -> Translation {
    Incremental::new(opts.clone()).translate(res, version)
}

/// A translator that remembers its last translation: routes whose object, parent Gateways and
/// Services are the same objects as last time (compared by address, objects held so addresses
/// stay unique), and clusters whose Service and EndpointSlices are, are reused with their
/// digests instead of being translated and hashed again. A one-route change to 10,000 routes
/// re-translates one route; the rest is assembly.
///
/// Objects are "the same" when they are the same `Arc`: the operator's reflector caches hand out
/// the same `Arc` until an object changes. Anything else (file mode) just translates in full.
pub struct Incremental {
    opts: Options,
    /// Objects every route or cluster may depend on (Gateways, classes, namespaces, grants,
    /// Secrets, Backends, policies): when any of them changes, nothing is reused.
    context: Context,
    routes: httproute::RouteMemos,
    tables: httproute::RouteTables,
    clusters: backends::ClusterMemos,
    next_id: u64,
    /// The Services of the last translation (held: their addresses are compared).
    services: Vec<Arc<k8s_openapi::api::core::v1::Service>>,
    /// Workloads and mesh services of the last translation, for reuse.
    mesh: mesh::MeshMemo,
    /// Services whose sniffed ports' routes were pointed at `#client` clusters.
    client_protocol: client_protocol::Memo,
    stats: Stats,
}

/// What the last translation reused and what it had to translate again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub routes_translated: usize,
    pub routes_reused: usize,
    pub clusters_built: usize,
    pub clusters_reused: usize,
}

/// The inputs every route and cluster may depend on. Gateways and GatewayClasses are compared
/// by spec (the operator writes their status, which makes new objects); the rest by address.
#[derive(Default)]
struct Context {
    classes: Vec<Arc<GatewayClass>>,
    gateways: Vec<Arc<Gateway>>,
    others: Vec<Arc<dyn Any + Send + Sync>>,
}

fn by_name<T: kube::Resource>(v: &[Arc<T>]) -> Vec<Arc<T>> {
    let mut v = v.to_vec();
    v.sort_by(|a, b| {
        (a.meta().namespace.as_deref(), a.meta().name.as_deref())
            .cmp(&(b.meta().namespace.as_deref(), b.meta().name.as_deref()))
    });
    v
}

fn same_specs<T: kube::Resource>(a: &[Arc<T>], b: &[Arc<T>], spec_eq: impl Fn(&T, &T) -> bool) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            Arc::ptr_eq(x, y)
                || (x.meta().namespace == y.meta().namespace && x.meta().name == y.meta().name && spec_eq(x, y))
        })
}

impl Context {
    fn of(res: &Resources) -> Context {
        fn all<T: Any + Send + Sync>(v: &[Arc<T>]) -> impl Iterator<Item = Arc<dyn Any + Send + Sync>> + '_ {
            v.iter().map(|o| o.clone() as Arc<dyn Any + Send + Sync>)
        }
        let mut others: Vec<_> = all(&res.namespaces)
            .chain(all(&res.reference_grants))
            .chain(all(&res.secrets))
            .chain(all(&res.backends))
            .chain(all(&res.backend_policies))
            .chain(all(&res.destination_rules))
            .chain(all(&res.mesh_configs))
            .chain(all(&res.workload_entries))
            .collect();
        others.sort_by_key(|o| Arc::as_ptr(o) as *const () as usize);
        Context {
            classes: by_name(&res.gateway_classes),
            gateways: by_name(&res.gateways),
            others,
        }
    }

    fn same(&self, other: &Context) -> bool {
        same_specs(&self.classes, &other.classes, |a, b| a.spec == b.spec)
            && same_specs(&self.gateways, &other.gateways, |a, b| a.spec == b.spec)
            && self.others.len() == other.others.len()
            && self.others.iter().zip(&other.others).all(|(a, b)| Arc::ptr_eq(a, b))
    }
}

impl Incremental {
    pub fn new(opts: Options) -> Self {
        Incremental {
            opts,
            context: Context::default(),
            routes: Default::default(),
            tables: Default::default(),
            clusters: Default::default(),
            next_id: 0,
            services: Vec::new(),
            mesh: Default::default(),
            client_protocol: Default::default(),
            stats: Stats::default(),
        }
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// The clusters translator, with what the last translation built when nothing it depends
    /// on changed (else the route and cluster memos are dropped).
    fn reusable<'r>(&mut self, res: &'r Resources) -> backends::Clusters<'r> {
        let context = Context::of(res);
        let same_context = context.same(&self.context);
        let cluster_memo = if same_context {
            std::mem::take(&mut self.clusters)
        } else {
            self.tables.clear();
            self.routes.clear();
            Default::default()
        };
        self.context = context;
        let mut clusters = backends::Clusters::new(res, cluster_memo);
        clusters.services_unchanged = same_context
            && res.services.len() == self.services.len()
            && res.services.iter().zip(&self.services).all(|(a, b)| Arc::ptr_eq(a, b));
        if !clusters.services_unchanged {
            self.services = res.services.clone();
        }
        clusters
    }

    /// The security policies, with their digests; a proxy of one Gateway gets those that
    /// target it and no others.
    fn policies(
        &self,
        res: &Resources,
        providers: &ext_authz::Providers,
        problems: &mut Problems<'_>,
    ) -> (Vec<Arc<crate::mesh::Policy>>, Vec<crate::model::Digest>) {
        let (policies, digests) = policy::build(res, providers, problems);
        match &self.opts.gateway {
            None => (policies, digests),
            Some(gw) => {
                let key = format!("{}/{}", gw.namespace, gw.name);
                policies
                    .into_iter()
                    .zip(digests)
                    .filter(|(p, _)| p.targets.contains(&key))
                    .unzip()
            }
        }
    }

    /// The mesh before routes attach to its services. A proxy of one Gateway gets no mesh;
    /// every other scope is projected from the full one.
    fn mesh_parts(
        &mut self,
        res: &Resources,
        clusters: &mut backends::Clusters<'_>,
        problems: &mut Problems<'_>,
    ) -> MeshParts {
        let gateway = self.opts.gateway.is_some();
        let mut built = if gateway {
            Default::default()
        } else {
            mesh::build(res, &mut self.mesh)
        };
        let ((workloads, services), (_, service_digests)) = &mut built;
        default_routes::services(services, service_digests, res, clusters);
        if !gateway {
            workload_entry::check(res, problems);
        }
        let mut entries = if !gateway && !res.service_entries.is_empty() {
            service_entry::build(&res.service_entries, workloads, &res.workload_entries, problems)
        } else {
            Vec::new()
        };
        service_entry::default_routes(&mut entries, res, clusters);
        let virtual_services = if gateway {
            Vec::new()
        } else {
            virtual_service::translate(res, &entries, clusters, problems)
        };
        MeshParts {
            built,
            entries,
            virtual_services,
        }
    }

    /// The mesh's services with the ServiceEntries' among them, and the routes that attach to
    /// them (GAMMA routes, else VirtualServices, else their default tables).
    fn routed_services(
        &mut self,
        (mut services, mut digests): (Vec<Arc<crate::mesh::MeshService>>, Vec<crate::model::Digest>),
        entries: Vec<(Arc<crate::mesh::MeshService>, crate::model::Digest)>,
        virtual_services: Vec<virtual_service::VsTable>,
        clusters: &mut backends::Clusters<'_>,
        problems: &mut Problems<'_>,
    ) -> (Vec<Arc<crate::mesh::MeshService>>, Vec<crate::model::Digest>) {
        if !entries.is_empty() {
            (services, digests) = merge_by_key(services, digests, entries);
        }
        gamma::finish(
            &self.routes,
            &mut self.tables.mesh,
            &mut services,
            &mut digests,
            virtual_services,
            problems,
        );
        client_protocol::services(&mut services, &mut digests, clusters, &mut self.client_protocol);
        (services, digests)
    }

    pub fn translate(&mut self, res: &Resources, version: u64) -> Translation {
        let mut clusters = self.reusable(res);
        let mut problems = Problems {
            res,
            list: Vec::new(),
            attachments: Vec::new(),
            detached: Vec::new(),
        };
        let listeners = listeners::build(res, &self.opts, &mut problems);
        let served_gateways: Vec<ObjectRef> = listeners.by_gateway.keys().cloned().collect();
        let mut stats = Stats::default();
        httproute::attach_all(
            res,
            &listeners,
            &mut clusters,
            &mut problems,
            &mut self.routes,
            &mut self.tables,
            &mut self.next_id,
            &mut stats,
        );
        let MeshParts {
            built: ((workloads, mut services), (workload_digests, mut service_digests)),
            entries,
            virtual_services,
        } = self.mesh_parts(res, &mut clusters, &mut problems);
        let providers = ext_authz::resolve(res, &entries, &mut clusters);
        stats.clusters_reused = clusters.reused;
        let (mut listeners, mut vhost_digests) = listeners::finish(listeners, &mut self.tables.hosts);
        let rate_limits = rate_limit::build(res, &mut problems);
        rate_limit::apply(&mut listeners, &mut vhost_digests, &rate_limits);
        (services, service_digests) = self.routed_services(
            (services, service_digests),
            entries,
            virtual_services,
            &mut clusters,
            &mut problems,
        );
        let (clusters, cluster_digests, cluster_memo) = clusters.finish(&mut problems);
        backends::check_policies(res, &mut problems);
        stats.clusters_built = cluster_memo.len() - stats.clusters_reused.min(cluster_memo.len());
        self.clusters = cluster_memo;
        self.stats = stats;
        let (policies, policy_digests) = self.policies(res, &providers, &mut problems);
        let (sidecars, sidecar_digests) = if self.opts.gateway.is_none() {
            sidecar::build(&res.sidecars, &mut problems)
        } else {
            Default::default()
        };
        let mut list = problems.list;
        list.sort_by(|a, b| (&a.object, &a.field).cmp(&(&b.object, &b.field)));
        let attachments = self.routes.attachments().without(&problems.detached);
        let mesh = crate::mesh::Mesh {
            workloads,
            services,
            policies,
            sidecars,
        };
        let digests = PartDigests {
            virtual_hosts: vhost_digests,
            clusters: cluster_digests,
            workloads: workload_digests,
            services: service_digests,
            policies: policy_digests,
            sidecars: sidecar_digests,
        };
        let snapshot = Snapshot::with_digests(version, listeners, clusters, mesh, &digests);
        Translation {
            secrets: listeners::secrets_of(res, &snapshot),
            snapshot,
            digests,
            problems: list,
            attachments,
            gateways: served_gateways,
        }
    }
}

/// The mesh's workloads and services with their digests, the ServiceEntries' services (merged
/// in once the routes are attached) and the VirtualServices' route tables.
struct MeshParts {
    built: mesh::Built,
    entries: Vec<(Arc<crate::mesh::MeshService>, crate::model::Digest)>,
    virtual_services: Vec<virtual_service::VsTable>,
}

/// Services and their digests with `more` among them, all in key order.
fn merge_by_key(
    services: Vec<Arc<crate::mesh::MeshService>>,
    digests: Vec<crate::model::Digest>,
    more: Vec<(Arc<crate::mesh::MeshService>, crate::model::Digest)>,
) -> (Vec<Arc<crate::mesh::MeshService>>, Vec<crate::model::Digest>) {
    let mut all: Vec<_> = services.into_iter().zip(digests).chain(more).collect();
    all.sort_by(|a, b| a.0.key.cmp(&b.0.key));
    all.into_iter().unzip()
}

#[cfg(test)]
impl Translation {
    /// (object name, field, reason) of every problem, in order: what translator tests compare.
    pub(crate) fn problem_keys(&self) -> Vec<(&str, &str, Reason)> {
        self.problems
            .iter()
            .map(|p| (p.object.name.as_str(), p.field.as_str(), p.reason))
            .collect()
    }
}

#[cfg(test)]
mod tests;
