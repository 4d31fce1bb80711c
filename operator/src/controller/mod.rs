//! Watches the cluster and, after each burst of changes, translates the cached objects with the
//! shared translator and publishes the result.
//!
//! Every watched kind is one row of [`kinds!`]: its store, the API group, the versions we can
//! read (discovery picks the first the cluster serves, so ReferenceGrant works on Gateway API
//! v1.4, which serves it only as v1beta1), whether the operator can work without it, and whether
//! the operator writes its status. A kind the cluster does not serve is empty, said once in the
//! log and on `/ready`, and picked up when its CRD appears.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferrum_snapshot::Resources;
use ferrum_snapshot::crd::{Backend, BackendPolicy, MeshConfig, RateLimitPolicy};
use ferrum_snapshot::istio::{
    AuthorizationPolicy, DestinationRule, PeerAuthentication, RequestAuthentication, ServiceEntry, Sidecar,
    VirtualService, WorkloadEntry,
};
use futures_util::StreamExt;
use gateway_api::experimental::tcproutes::TcpRoute;
use gateway_api::gatewayclasses::GatewayClass;
use gateway_api::gateways::Gateway;
use gateway_api::grpcroutes::GrpcRoute;
use gateway_api::httproutes::HttpRoute;
use gateway_api::referencegrants::ReferenceGrant;
use gateway_api::tlsroutes::TlsRoute;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::reflector::{self, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use crate::publish::Publisher;

/// What one watched kind is.
#[derive(Debug, Clone, Copy)]
pub struct KindSpec {
    pub group: &'static str,
    pub kind: &'static str,
    /// Versions we can read, preferred first.
    pub versions: &'static [&'static str],
    /// The operator translates without it (as if there were none).
    pub optional: bool,
    /// The operator writes its status: updates that keep `metadata.generation`, labels and
    /// annotations (a dry-run switch is one) are ignored.
    pub status_written: bool,
    /// A field selector: only these objects are read at all.
    pub fields: Option<&'static str>,
}

/// Where each kind stands, for `/ready` and the log.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase", tag = "state")]
pub enum KindState {
    /// Discovery has not answered yet.
    Discovering,
    /// Not served by the cluster (yet): treated as empty.
    Absent,
    /// Watched at this version; `listed` once the initial list is in.
    Watching { version: String, listed: bool },
}

/// Every kind's state, shared with the admin server.
pub type Kinds = Arc<Mutex<BTreeMap<&'static str, (KindSpec, KindState)>>>;

/// The watched kinds: one row each. A row makes the store, its watch and its place in
/// `Resources` (the translator's input, which has a field of the same name).
macro_rules! kinds {
    ($($field:ident: $ty:ty = ($group:expr, $kind:expr, [$($v:expr),+], optional: $opt:expr, status: $st:expr $(, fields: $fields:expr)?)),+ $(,)?) => {
        /// Read-only caches of every kind the translator reads (the CA and the subscription
        /// checks read some too: pods, nodes, WorkloadEntries, namespaces).
        #[derive(Clone)]
        pub struct Stores {
            $(pub $field: Store<$ty>,)+
        }

        /// Every row: (spec, plural), for checks against what the operator may read.
        #[cfg(test)]
        fn table() -> Vec<(KindSpec, String)> {
            vec![$((
                KindSpec {
                    group: $group,
                    kind: $kind,
                    versions: &[$($v),+],
                    optional: $opt,
                    status_written: $st,
                    fields: None,
                },
                <$ty as Resource>::plural(&()).into_owned(),
            ),)+]
        }

        impl Stores {
            /// Starts every kind's discovery and watch.
            fn start(w: &Watchers) -> Stores {
                Stores {
                    $($field: w.start::<$ty>(KindSpec {
                        group: $group,
                        kind: $kind,
                        versions: &[$($v),+],
                        optional: $opt,
                        status_written: $st,
                        fields: None $(.or(Some($fields)))?,
                    }),)+
                }
            }

            /// A consistent-enough view of the caches for one translation (shared, not copied).
            pub fn resources(&self) -> Resources {
                Resources {
                    $($field: self.$field.state(),)+
                    origins: Default::default(),
                    jwks: Default::default(),
                }
            }
        }
    };
}

kinds! {
    gateway_classes: GatewayClass = ("gateway.networking.k8s.io", "GatewayClass", ["v1"], optional: false, status: true),
    gateways: Gateway = ("gateway.networking.k8s.io", "Gateway", ["v1"], optional: false, status: true),
    http_routes: HttpRoute = ("gateway.networking.k8s.io", "HTTPRoute", ["v1"], optional: false, status: true),
    grpc_routes: GrpcRoute = ("gateway.networking.k8s.io", "GRPCRoute", ["v1"], optional: true, status: true),
    tls_routes: TlsRoute = ("gateway.networking.k8s.io", "TLSRoute", ["v1", "v1alpha3", "v1alpha2"], optional: true, status: true),
    tcp_routes: TcpRoute = ("gateway.networking.k8s.io", "TCPRoute", ["v1", "v1alpha2"], optional: true, status: true),
    reference_grants: ReferenceGrant = ("gateway.networking.k8s.io", "ReferenceGrant", ["v1", "v1beta1"], optional: true, status: false),
    services: Service = ("", "Service", ["v1"], optional: false, status: false),
    endpoint_slices: EndpointSlice = ("discovery.k8s.io", "EndpointSlice", ["v1"], optional: false, status: false),
    namespaces: Namespace = ("", "Namespace", ["v1"], optional: false, status: false),
    // Only TLS Secrets (what listeners reference); service-account tokens, registry credentials
    // and application secrets are never read.
    secrets: Secret = ("", "Secret", ["v1"], optional: false, status: false, fields: "type=kubernetes.io/tls"),
    backends: Backend = ("ferrum.dev", "Backend", ["v1alpha1"], optional: true, status: true),
    backend_policies: BackendPolicy = ("ferrum.dev", "BackendPolicy", ["v1alpha1"], optional: true, status: true),
    rate_limit_policies: RateLimitPolicy = ("ferrum.dev", "RateLimitPolicy", ["v1alpha1"], optional: true, status: true),
    mesh_configs: MeshConfig = ("ferrum.dev", "MeshConfig", ["v1alpha1"], optional: true, status: true),
    pods: Pod = ("", "Pod", ["v1"], optional: false, status: false),
    service_accounts: ServiceAccount = ("", "ServiceAccount", ["v1"], optional: false, status: false),
    // For the zone of the workloads on each: without them, sidecars balance over every zone.
    nodes: Node = ("", "Node", ["v1"], optional: true, status: false),
    authorization_policies: AuthorizationPolicy = ("security.istio.io", "AuthorizationPolicy", ["v1", "v1beta1"], optional: true, status: true),
    peer_authentications: PeerAuthentication = ("security.istio.io", "PeerAuthentication", ["v1", "v1beta1"], optional: true, status: true),
    request_authentications: RequestAuthentication = ("security.istio.io", "RequestAuthentication", ["v1", "v1beta1"], optional: true, status: true),
    sidecars: Sidecar = ("networking.istio.io", "Sidecar", ["v1", "v1beta1", "v1alpha3"], optional: true, status: true),
    destination_rules: DestinationRule = ("networking.istio.io", "DestinationRule", ["v1", "v1beta1", "v1alpha3"], optional: true, status: true),
    service_entries: ServiceEntry = ("networking.istio.io", "ServiceEntry", ["v1", "v1beta1", "v1alpha3"], optional: true, status: true),
    virtual_services: VirtualService = ("networking.istio.io", "VirtualService", ["v1", "v1beta1", "v1alpha3"], optional: true, status: true),
    workload_entries: WorkloadEntry = ("networking.istio.io", "WorkloadEntry", ["v1", "v1beta1", "v1alpha3"], optional: true, status: true),
}

/// What every watch shares: the client, the change signal and the kinds' states.
struct Watchers {
    client: Client,
    /// How often discovery is asked again for kinds the cluster does not serve yet.
    rediscover: Duration,
    changed: mpsc::Sender<()>,
    kinds: Kinds,
}

impl Watchers {
    /// A store for `K`, filled by a watch at the version the cluster serves, once it serves one.
    fn start<K>(&self, spec: KindSpec) -> Store<K>
    where
        K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
        K::DynamicType: Default + Eq + Hash + Clone,
    {
        let (store, writer) = reflector::store();
        self.kinds
            .lock()
            .unwrap()
            .insert(spec.kind, (spec, KindState::Discovering));
        let (client, changed, kinds) = (self.client.clone(), self.changed.clone(), self.kinds.clone());
        let rediscover = self.rediscover;
        tokio::spawn(async move {
            let mut said = false;
            let ar = loop {
                match served(&client, &spec).await {
                    Ok(Some(ar)) => break ar,
                    Ok(None) if !said => {
                        said = true;
                        set(&kinds, spec.kind, KindState::Absent);
                        let how = if spec.optional {
                            "treated as empty"
                        } else {
                            "required: nothing translates well without it"
                        };
                        tracing::warn!(kind = spec.kind, group = spec.group, versions = ?spec.versions, "the cluster does not serve this kind; {how} until its CRD is installed");
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(kind = spec.kind, error = %e, "discovery failed; retrying"),
                }
                tokio::time::sleep(rediscover).await;
            };
            if said {
                tracing::info!(kind = spec.kind, version = %ar.version, "the cluster serves this kind now; watching it");
            }
            set(
                &kinds,
                spec.kind,
                KindState::Watching {
                    version: ar.version.clone(),
                    listed: false,
                },
            );
            watch::<K>(client, ar, spec, writer, changed, kinds).await;
        });
        store
    }
}

fn set(kinds: &Kinds, kind: &str, state: KindState) {
    if let Some(k) = kinds.lock().unwrap().get_mut(kind) {
        k.1 = state;
    }
}

/// The first of the kind's versions the cluster serves, from discovery.
async fn served(client: &Client, spec: &KindSpec) -> Result<Option<ApiResource>, kube::Error> {
    for v in spec.versions {
        let api_version = if spec.group.is_empty() {
            v.to_string()
        } else {
            format!("{}/{v}", spec.group)
        };
        let list = if spec.group.is_empty() {
            client.list_core_api_resources(v).await
        } else {
            client.list_api_group_resources(&api_version).await
        };
        let list = match list {
            Ok(l) => l,
            Err(kube::Error::Api(e)) if e.code == 404 => continue,
            Err(e) => return Err(e),
        };
        if let Some(r) = list
            .resources
            .iter()
            .find(|r| r.kind == spec.kind && !r.name.contains('/'))
        {
            return Ok(Some(ApiResource {
                group: spec.group.into(),
                version: v.to_string(),
                api_version,
                kind: spec.kind.into(),
                plural: r.name.clone(),
            }));
        }
    }
    Ok(None)
}

/// Reads a watched object as our type, whatever version it was served at (the versions we list
/// for a kind share one schema).
fn typed<K: Resource + DeserializeOwned>(o: DynamicObject) -> Option<K>
where
    K::DynamicType: Default,
{
    let mut v = serde_json::to_value(o).ok()?;
    v["apiVersion"] = K::api_version(&K::DynamicType::default()).into();
    v["kind"] = K::kind(&K::DynamicType::default()).into();
    serde_json::from_value(v)
        .map_err(
            |e| tracing::warn!(kind = %K::kind(&K::DynamicType::default()), error = %e, "cannot read object; skipped"),
        )
        .ok()
}

/// Runs one kind's reflector forever, poking `changed` on every event, except, for kinds whose
/// status the operator writes, updates that leave `metadata.generation` as it was: those are
/// status writes (ours, mostly) and change nothing the translator reads.
async fn watch<K>(
    client: Client,
    ar: ApiResource,
    spec: KindSpec,
    writer: Writer<K>,
    changed: mpsc::Sender<()>,
    kinds: Kinds,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    let api: Api<DynamicObject> = Api::all_with(client, &ar);
    // Nothing reads managedFields or kubectl's last-applied copy of the object, and in a real
    // cluster they are often most of an object's size.
    let mut config = watcher::Config::default();
    if let Some(f) = spec.fields {
        config = config.fields(f);
    }
    let events = watcher(api, config).filter_map(|ev| async move {
        match ev {
            Ok(ev) => cleaned(ev).map(Ok),
            Err(e) => Some(Err(e)),
        }
    });
    let mut stream = events.reflect(writer).default_backoff().boxed();
    let mut generations: std::collections::HashMap<String, (i64, u64)> = Default::default();
    while let Some(ev) = stream.next().await {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                tracing::warn!(kind = spec.kind, error = %e, "watch failed; retrying");
                continue;
            }
        };
        if matches!(ev, watcher::Event::InitDone) {
            set(
                &kinds,
                spec.kind,
                KindState::Watching {
                    version: ar.version.clone(),
                    listed: true,
                },
            );
        }
        if spec.status_written && own_write(&mut generations, &ev) {
            continue;
        }
        let _ = changed.try_send(());
    }
}

/// `ev` with its object typed, and without managedFields or kubectl's last-applied copy:
/// nothing reads them, and in a real cluster they are often most of an object's size. `None`
/// for an object we cannot read: left out (and logged), not a reason to stop watching.
fn cleaned<K>(ev: watcher::Event<DynamicObject>) -> Option<watcher::Event<K>>
where
    K: Resource + DeserializeOwned,
    K::DynamicType: Default,
{
    let ev = ev.modify(|o| {
        o.metadata.managed_fields = None;
        if let Some(a) = &mut o.metadata.annotations {
            a.remove("kubectl.kubernetes.io/last-applied-configuration");
        }
    });
    Some(match ev {
        watcher::Event::Apply(o) => watcher::Event::Apply(typed(o)?),
        watcher::Event::InitApply(o) => watcher::Event::InitApply(typed(o)?),
        watcher::Event::Delete(o) => watcher::Event::Delete(typed(o)?),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitDone => watcher::Event::InitDone,
    })
}

/// Whether `ev` reports an object at the generation, labels and annotations last seen — i.e.
/// only its status changed, which this operator writes itself. Keeps `generations` (by uid)
/// up to date.
fn own_write<K: Resource>(
    generations: &mut std::collections::HashMap<String, (i64, u64)>,
    ev: &watcher::Event<K>,
) -> bool {
    match ev {
        watcher::Event::Apply(o) | watcher::Event::InitApply(o) => {
            let (Some(uid), Some(generation)) = (o.meta().uid.clone(), o.meta().generation) else {
                return false;
            };
            let seen = (generation, labels_and_annotations(o.meta()));
            generations.insert(uid, seen) == Some(seen)
        }
        watcher::Event::Delete(o) => {
            if let Some(uid) = &o.meta().uid {
                generations.remove(uid);
            }
            false
        }
        _ => false,
    }
}

/// A fingerprint of what, besides the spec, changes what an object means.
fn labels_and_annotations(m: &kube::api::ObjectMeta) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    m.labels.hash(&mut h);
    m.annotations.hash(&mut h);
    h.finish()
}

pub struct Controller {
    pub stores: Stores,
    changed: mpsc::Receiver<()>,
    /// The Secrets objects name that the TLS list lacks.
    named: crate::secrets::Named,
}

impl Controller {
    /// Starts every watch and waits (at most 30 s) until each served kind has listed once.
    pub async fn start(client: Client, kinds: Kinds, rediscover: Duration) -> Controller {
        let (ctx, crx) = mpsc::channel(1);
        let named = crate::secrets::Named::new(client.clone(), ctx.clone());
        let stores = Stores::start(&Watchers {
            client,
            rediscover,
            changed: ctx,
            kinds: kinds.clone(),
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let waiting = waiting_for(&kinds);
            if waiting.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                tracing::warn!(?waiting, "some watches have not listed yet; translating what is there");
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Controller {
            stores,
            changed: crx,
            named,
        }
    }

    /// Translates after every burst of changes (coalesced for `debounce`), and when a JWKS
    /// named by URI is fetched anew, forever.
    pub async fn run(mut self, publisher: Arc<Publisher>, debounce: Duration) {
        let jwks = ferrum_dp::mesh::jwt::Fetched::default();
        let mut fetched = jwks.changes();
        let named = &self.named;
        let resources = |stores: &Stores| {
            let mut res = stores.resources();
            res.jwks = jwks.for_resources(&res);
            named.add_to(&mut res);
            res
        };
        publisher.publish(resources(&self.stores));
        loop {
            tokio::select! {
                r = self.changed.recv() => if r.is_none() { return },
                r = fetched.changed() => if r.is_err() { return },
            }
            tokio::time::sleep(debounce).await;
            while self.changed.try_recv().is_ok() {}
            let started = Instant::now();
            let res = resources(&self.stores);
            let copied_ms = started.elapsed().as_millis() as u64;
            if publisher.publish(res) {
                tracing::info!(copied_ms, total_ms = started.elapsed().as_millis() as u64, "published");
            }
        }
    }
}

/// Kinds whose first discovery has not answered yet, or which are watched but not listed.
fn waiting_for(kinds: &Kinds) -> Vec<&'static str> {
    kinds
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, (_, st))| matches!(st, KindState::Discovering | KindState::Watching { listed: false, .. }))
        .map(|(k, _)| *k)
        .collect()
}

/// `/ready` detail: required kinds missing (not ready) and optional ones absent (said, ready).
pub fn readiness(kinds: &Kinds) -> (bool, String) {
    let kinds = kinds.lock().unwrap();
    let mut ok = true;
    let mut out = String::new();
    for (kind, (spec, state)) in kinds.iter() {
        let line = match state {
            KindState::Absent if spec.optional => {
                format!("{kind}: not served by the cluster (optional, treated as empty)\n")
            }
            KindState::Absent => {
                ok = false;
                format!("{kind}: not served by the cluster (required: install its CRD)\n")
            }
            KindState::Discovering => {
                ok = false;
                format!("{kind}: discovering\n")
            }
            KindState::Watching { listed: false, version } => {
                ok = false;
                format!("{kind}: {version}: listing\n")
            }
            KindState::Watching { .. } => continue,
        };
        out.push_str(&line);
    }
    (ok, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Helm chart's ClusterRole lets the operator list and watch every kind of the table,
    /// and patch the status of those it writes status to: a kind added here without RBAC would
    /// work against the test API server and be forbidden in every real cluster.
    #[test]
    fn the_charts_cluster_role_covers_every_watched_kind() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../charts/ferrum-mesh/templates/operator-rbac.yaml"
        );
        // Template lines (names, labels) are not YAML; the rules are plain.
        let text: String = std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .filter(|l| !l.contains("{{"))
            .map(|l| format!("{l}\n"))
            .collect();
        let role = serde_yaml::Deserializer::from_str(&text)
            .map(|d| <serde_yaml::Value as serde::Deserialize>::deserialize(d).unwrap())
            .find(|d| d["kind"] == "ClusterRole")
            .expect("a ClusterRole");
        let allows = |group: &str, resource: &str, verb: &str| {
            role["rules"].as_sequence().unwrap().iter().any(|r| {
                let has = |k: &str, v: &str| r[k].as_sequence().unwrap().iter().any(|x| x.as_str() == Some(v));
                has("apiGroups", group) && has("resources", resource) && has("verbs", verb)
            })
        };
        for (spec, plural) in table() {
            for verb in ["list", "watch"] {
                assert!(allows(spec.group, &plural, verb), "{} {plural}: {verb}", spec.group);
            }
            if spec.status_written {
                assert!(
                    allows(spec.group, &format!("{plural}/status"), "patch"),
                    "{plural}/status"
                );
            }
        }
    }
}
