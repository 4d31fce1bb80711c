//! The latest translation, shared by every subscriber. Subscribers are told a new generation
//! exists (a `watch`, so a slow one only ever sees the latest) and fetch what they need: the
//! delta from the generation they have (made once per generation), or the full snapshot for
//! their role (encoded once per generation, on first demand).
//!
//! Translation is incremental ([`Incremental`]): a change to one route re-translates that route.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ferrum_snapshot::secret::needed_by;
use ferrum_snapshot::translate::{Options, Translation};
use ferrum_snapshot::{Delta, Incremental, ObjectRef, Resources, Secrets, Snapshot};
use tokio::sync::watch;

pub struct Published {
    pub generation: u64,
    pub resources: Arc<Resources>,
    /// The translation of every Gateway and the mesh (what each scope is projected from).
    pub translation: Arc<Translation>,
    pub translate_ms: u64,
    /// The last translation that reused nothing (the first, or after a Gateway changed).
    pub cold_translate_ms: u64,
    /// How the previous generation's snapshot (for every Gateway) becomes this one.
    pub delta: Option<Arc<Encoded>>,
    pub stats: ferrum_snapshot::translate::Stats,
}

/// A snapshot or a delta and its wire encoding (gzip'd JSON), made once per generation however
/// many proxies get it: JSON of routes compresses about tenfold.
pub struct Encoded {
    pub version: u64,
    pub hash: String,
    /// For a delta: the snapshot it applies to.
    pub base: Option<(u64, String)>,
    pub body: bytes::Bytes,
    /// The key pairs the snapshot (after the delta) names: sent beside it, never in it.
    pub secrets: Secrets,
}

pub const ENCODING: &str = "gzip";

fn gzip_json<T: serde::Serialize>(value: &T) -> (usize, bytes::Bytes) {
    use std::io::Write;
    // Serialise first, then compress in one call: feeding the compressor token by token
    // costs several times more.
    let json = serde_json::to_vec(value).expect("snapshots serialise");
    let mut gz = flate2::write::GzEncoder::new(Vec::with_capacity(json.len() / 8 + 64), flate2::Compression::fast());
    gz.write_all(&json).expect("in-memory gzip");
    (json.len(), gz.finish().expect("in-memory gzip").into())
}

impl Encoded {
    fn new(snapshot: &Snapshot, secrets: &Secrets) -> Arc<Self> {
        let started = Instant::now();
        let (json_bytes, body) = gzip_json(snapshot);
        tracing::info!(
            version = snapshot.version,
            json_bytes,
            bytes = body.len(),
            encode_ms = started.elapsed().as_millis() as u64,
            "encoded snapshot"
        );
        Arc::new(Encoded {
            version: snapshot.version,
            hash: snapshot.hash.clone(),
            base: None,
            body,
            secrets: needed_by(snapshot, secrets),
        })
    }

    /// The delta from `base` to `next`.
    fn delta(base: &Snapshot, next: &Snapshot, secrets: &Secrets) -> Arc<Self> {
        let d = Delta::between(base, next);
        let (_, body) = gzip_json(&d);
        Arc::new(Encoded {
            version: d.version,
            hash: d.hash.clone(),
            base: Some((d.base_version, d.base_hash.clone())),
            body,
            secrets: needed_by(next, secrets),
        })
    }
}

/// One Gateway's snapshot at the generation it was last asked for, and how the one before
/// becomes it.
struct RoleState {
    /// A Gateway's own translator; sidecars project the full snapshot instead.
    incremental: Option<Incremental>,
    generation: u64,
    snapshot: Option<Snapshot>,
    /// The snapshot itself (not a delta), encoded on first demand.
    whole: Option<Arc<Encoded>>,
    delta: Option<Arc<Encoded>>,
}

pub struct Publisher {
    controller_name: String,
    /// Generations start from the start time in milliseconds, so versions keep growing across
    /// operator restarts and proxies never see a version go backwards.
    base: u64,
    current: Mutex<Arc<Published>>,
    /// The translator for every-Gateway snapshots, with what it can reuse.
    incremental: Mutex<Incremental>,
    /// The encoded snapshot for every Gateway, per generation.
    all: Mutex<(u64, Option<Arc<Encoded>>)>,
    /// Proxies that serve one Gateway (its own snapshots, translated incrementally on demand)
    /// and sidecars (the mesh, projected from the full snapshot), per scope.
    scopes: Mutex<HashMap<String, RoleState>>,
    tx: watch::Sender<u64>,
}

#[derive(Debug, thiserror::Error)]
#[error("role {0:?} is not \"\", \"gateway/<namespace>/<name>\" or \"sidecar/<namespace>/<pod>\"")]
pub struct BadRole(pub String);

/// What a proxy serves, from its `role`: every Gateway, one Gateway, or one workload's sidecar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    All,
    Gateway(ObjectRef),
    Sidecar { namespace: String, pod: String },
}

pub fn parse_role(role: &str) -> Result<Scope, BadRole> {
    if role.is_empty() {
        return Ok(Scope::All);
    }
    match role.split('/').collect::<Vec<_>>()[..] {
        ["gateway", ns, name] if !ns.is_empty() && !name.is_empty() => Ok(Scope::Gateway(ObjectRef {
            kind: "Gateway",
            namespace: ns.into(),
            name: name.into(),
        })),
        ["sidecar", ns, pod] if !ns.is_empty() && !pod.is_empty() => Ok(Scope::Sidecar {
            namespace: ns.into(),
            pod: pod.into(),
        }),
        _ => Err(BadRole(role.into())),
    }
}

impl Publisher {
    pub fn new(controller_name: String) -> Arc<Self> {
        let (tx, _) = watch::channel(0);
        let incremental = Mutex::new(Incremental::new(Options {
            controller_name: Some(controller_name.clone()),
            gateway: None,
        }));
        Arc::new(Publisher {
            controller_name,
            base: crate::proxies::now_ms(),
            current: Mutex::new(Arc::new(Published {
                generation: 0,
                resources: Arc::new(Resources::default()),
                translation: Arc::new(Translation {
                    snapshot: Snapshot::default(),
                    problems: vec![],
                    attachments: Default::default(),
                    gateways: vec![],
                    digests: Default::default(),
                    secrets: Default::default(),
                }),
                translate_ms: 0,
                cold_translate_ms: 0,
                delta: None,
                stats: Default::default(),
            })),
            incremental,
            all: Mutex::new((0, None)),
            scopes: Mutex::new(HashMap::new()),
            tx,
        })
    }

    fn options(&self, gateway: Option<ObjectRef>) -> Options {
        Options {
            controller_name: Some(self.controller_name.clone()),
            gateway,
        }
    }

    /// Translates and, when anything changed, starts a new generation.
    pub fn publish(&self, res: Resources) -> bool {
        let started = Instant::now();
        let prev = self.current();
        let generation = (prev.generation + 1).max(self.base);
        let (full, stats) = {
            let mut inc = self.incremental.lock().unwrap();
            (inc.translate(&res, generation), inc.stats())
        };
        let translate_ms = started.elapsed().as_millis() as u64;
        let same = prev.generation > 0
            && full.snapshot.hash == prev.translation.snapshot.hash
            && full.problems == prev.translation.problems
            && full.attachments == prev.translation.attachments
            && full.gateways == prev.translation.gateways;
        // Per-role snapshots depend on objects the full one may not show (e.g. a Gateway of
        // another class): compare the inputs too.
        let same = same && res_fingerprint(&res) == res_fingerprint(&prev.resources);
        if same {
            return false;
        }
        // Proxies that have the previous generation (nearly all of them) get only what changed:
        // work out and encode that once, now, before waking anyone.
        let delta =
            (prev.generation > 0).then(|| Encoded::delta(&prev.translation.snapshot, &full.snapshot, &full.secrets));
        tracing::info!(
            generation,
            translate_ms,
            routes_translated = stats.routes_translated,
            routes_reused = stats.routes_reused,
            delta_bytes = delta.as_ref().map_or(0, |d| d.body.len()),
            publish_ms = started.elapsed().as_millis() as u64,
            hash = %full.snapshot.hash,
            problems = full.problems.len(),
            "new snapshot"
        );
        *self.current.lock().unwrap() = Arc::new(Published {
            generation,
            resources: Arc::new(res),
            translation: Arc::new(full),
            translate_ms,
            cold_translate_ms: if stats.routes_reused == 0 {
                translate_ms
            } else {
                prev.cold_translate_ms
            },
            delta,
            stats,
        });
        *self.all.lock().unwrap() = (generation, None);
        self.tx.send_replace(generation);
        true
    }

    pub fn current(&self) -> Arc<Published> {
        self.current.lock().unwrap().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.tx.subscribe()
    }

    /// What to send a proxy of `scope` that has the snapshot `have` (a hash): the delta from
    /// the previous generation when that is what it has, else the full snapshot. `None` until
    /// the first generation: a restarted operator has nothing to say yet, and a proxy keeps
    /// what it has.
    pub fn update_for(&self, scope: &Scope, have: &str) -> Option<Arc<Encoded>> {
        let cur = self.current();
        if cur.generation == 0 {
            return None;
        }
        Some(self.update_at(&cur, scope, have))
    }

    fn update_at(&self, cur: &Published, scope: &Scope, have: &str) -> Arc<Encoded> {
        let (key, gateway) = match scope {
            Scope::All => {
                if let Some(d) = &cur.delta
                    && d.base.as_ref().is_some_and(|(_, h)| h == have)
                {
                    return d.clone();
                }
                return self.every_gateway();
            }
            Scope::Gateway(gw) => (format!("gateway/{}/{}", gw.namespace, gw.name), Some(gw)),
            // A sidecar gets the Services its namespace sees (exportTo) and only the policies
            // that select its workload; sidecars that see the same share one projection.
            Scope::Sidecar { namespace, pod } => (sidecar_key(&cur.translation.snapshot, namespace, pod), None),
        };
        let mut scopes = self.scopes.lock().unwrap();
        let st = scopes.entry(key).or_insert_with(|| RoleState {
            incremental: gateway.map(|gw| Incremental::new(self.options(Some(gw.clone())))),
            generation: 0,
            snapshot: None,
            whole: None,
            delta: None,
        });
        if st.generation != cur.generation {
            let next = match &mut st.incremental {
                // One Gateway's listeners: their secrets are among the full translation's.
                Some(inc) => inc.translate(&cur.resources, cur.generation).snapshot,
                None => {
                    let Scope::Sidecar { namespace, pod } = scope else {
                        unreachable!("only sidecars have no translator")
                    };
                    let snap = &cur.translation.snapshot;
                    let own = snap.workload_or_placeholder(namespace, pod);
                    snap.mesh_view(&cur.translation.digests, Some(&own), |p| p.applies_to(&own))
                }
            };
            match &st.snapshot {
                Some(prev) if prev.hash == next.hash => {}
                prev => {
                    st.delta = prev
                        .as_ref()
                        .map(|p| Encoded::delta(p, &next, &cur.translation.secrets));
                    st.whole = None;
                    st.snapshot = Some(next);
                }
            }
            st.generation = cur.generation;
        }
        let snap = st.snapshot.as_ref().expect("translated above");
        if let Some(d) = &st.delta
            && d.base.as_ref().is_some_and(|(_, h)| h == have)
        {
            return d.clone();
        }
        st.whole
            .get_or_insert_with(|| Encoded::new(snap, &cur.translation.secrets))
            .clone()
    }

    /// The snapshot for every Gateway at the current generation, encoded once (on first
    /// demand) however many proxies ask.
    pub fn every_gateway(&self) -> Arc<Encoded> {
        let cur = self.current();
        let mut all = self.all.lock().unwrap();
        if all.0 != cur.generation {
            *all = (cur.generation, None);
        }
        all.1
            .get_or_insert_with(|| Encoded::new(&cur.translation.snapshot, &cur.translation.secrets))
            .clone()
    }
}

/// The projection a sidecar shares with those its policies select alike: the set of policy keys,
/// its Sidecar, and its namespace when a Service is exported to some namespaces only or a
/// Sidecar scopes what it knows (`.` is the client's namespace).
fn sidecar_key(snap: &Snapshot, namespace: &str, pod: &str) -> String {
    use sha2::Digest as _;
    let own = snap.workload_or_placeholder(namespace, pod);
    let mut h = sha2::Sha256::new();
    let scope = ferrum_snapshot::mesh::sidecar_for(&snap.sidecars, &own);
    if scope.is_some() || snap.services.iter().any(|s| !s.export_to.is_empty()) {
        h.update(namespace.as_bytes());
        h.update([1]);
    }
    if let Some(s) = scope {
        h.update(s.key.as_bytes());
        h.update([2]);
    }
    for p in snap.policies.iter().filter(|p| p.applies_to(&own)) {
        h.update(p.key.as_bytes());
        h.update([0]);
    }
    let id: String = h.finalize()[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("sidecar/{id}")
}

/// Cheap change detector over the translator's inputs: (kind, namespace, name, resourceVersion).
fn res_fingerprint(r: &Resources) -> Vec<(String, String, String)> {
    fn m(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (String, String, String) {
        (
            meta.namespace.clone().unwrap_or_default(),
            meta.name.clone().unwrap_or_default(),
            meta.resource_version.clone().unwrap_or_default(),
        )
    }
    let mut v: Vec<(String, String, String)> = Vec::new();
    v.extend(r.gateways.iter().map(|o| m(&o.metadata)));
    v.extend(r.gateway_classes.iter().map(|o| m(&o.metadata)));
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::test_world::{CONTROLLER, world};

    fn gateway(name: &str) -> Scope {
        parse_role(&format!("gateway/default/{name}")).unwrap()
    }

    fn decode(e: &Encoded) -> serde_json::Value {
        let json = std::io::read_to_string(flate2::read::GzDecoder::new(&e.body[..])).unwrap();
        serde_json::from_str(&json).unwrap()
    }

    /// A proxy that has the previous generation gets the delta from it; any other gets the
    /// whole snapshot; each is encoded once however many proxies ask.
    #[test]
    fn a_proxy_one_generation_behind_gets_a_delta_and_any_other_the_whole_snapshot() {
        let p = Publisher::new(CONTROLLER.into());
        assert!(p.publish(world(&["echo"], 1)));
        let first = p.update_for(&gateway("gw"), "").unwrap();
        assert_eq!(first.base, None);
        assert!(p.publish(world(&["echo", "web"], 1)));
        let delta = p.update_for(&gateway("gw"), &first.hash).unwrap();
        assert_eq!(delta.base, Some((first.version, first.hash.clone())));
        assert!(delta.version > first.version && delta.hash != first.hash);
        let whole = p.update_for(&gateway("gw"), "some other hash").unwrap();
        assert_eq!((whole.base.as_ref(), &whole.hash), (None, &delta.hash));
        assert!(Arc::ptr_eq(&delta, &p.update_for(&gateway("gw"), &first.hash).unwrap()));
        assert!(Arc::ptr_eq(&whole, &p.update_for(&gateway("gw"), "").unwrap()));
        // The delta names what changed: the new backend's cluster.
        assert!(decode(&delta).to_string().contains("service/default/web:80"));
    }

    /// The same objects again are no new generation: proxies are not woken for nothing.
    #[test]
    fn republishing_the_same_objects_starts_no_generation() {
        let p = Publisher::new(CONTROLLER.into());
        assert!(p.publish(world(&["echo"], 1)));
        let generation = p.current().generation;
        assert!(!p.publish(world(&["echo"], 1)));
        assert_eq!(p.current().generation, generation);
        assert!(p.publish(world(&["echo"], 2)));
        assert!(p.current().generation > generation);
    }

    /// A Gateway's proxy is sent its own listeners only; every Gateway's config has both.
    #[test]
    fn a_gateway_scope_holds_only_its_own_listeners() {
        let mut res = world(&["echo"], 1);
        res.add_yaml(
            "other.yaml",
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: other, namespace: default}\n\
             spec:\n  gatewayClassName: ferrum\n  listeners: [{name: http, port: 9090, protocol: HTTP}]\n",
        )
        .unwrap();
        let p = Publisher::new(CONTROLLER.into());
        assert!(p.publish(res));
        let ports = |scope: &Scope| -> Vec<u64> {
            let snap = decode(&p.update_for(scope, "").unwrap());
            let mut v: Vec<u64> = snap["listeners"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l["port"].as_u64().unwrap())
                .collect();
            v.sort();
            v
        };
        assert_eq!(ports(&gateway("gw")), [8080]);
        assert_eq!(ports(&gateway("other")), [9090]);
        assert_eq!(ports(&Scope::All), [8080, 9090]);
    }

    /// A restarted operator's proxies reconnect before its first translation: they are told
    /// nothing (and keep what they have) instead of an empty snapshot — or a panic that
    /// poisoned every later subscription.
    #[test]
    fn nothing_is_served_before_the_first_generation() {
        let p = Publisher::new("ferrum.dev/gateway-controller".into());
        let sidecar = Scope::Sidecar {
            namespace: "ns".into(),
            pod: "a".into(),
        };
        assert!(p.update_for(&sidecar, "").is_none());
        assert!(p.update_for(&Scope::All, "").is_none());
        assert!(p.publish(Resources::default()));
        let first = p.update_for(&sidecar, "").expect("a snapshot once published");
        assert!(!first.hash.is_empty());
        assert_eq!(p.update_for(&sidecar, "").unwrap().hash, first.hash);
        assert!(p.update_for(&Scope::All, "").is_some());
    }
}
