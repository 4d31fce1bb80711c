//! The one place a new snapshot takes effect: compile, bind new ports, swap, retire old ports.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use ferrum_snapshot::{Secrets, Snapshot};

use crate::compile::{CompileError, Compiled, Compiler};
use crate::limits::Limits;
use crate::listener::{BindError, Listeners};
use crate::telemetry::Registry;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Compile(#[from] CompileError),
    #[error(transparent)]
    Bind(#[from] BindError),
}

/// State every connection shares.
pub struct Shared {
    pub config: ArcSwap<Compiled>,
    pub registry: Arc<Registry>,
    pub limits: Limits,
    pub access_log: Arc<crate::access_log::AccessLog>,
    pub tracing: crate::trace::Tracing,
    /// A mesh proxy's side of the upstreams (the compiler's, shared).
    pub mesh: crate::upstream::MeshSlot,
}

pub struct Dataplane {
    pub shared: Arc<Shared>,
    compiler: Compiler,
    listeners: Mutex<Listeners>,
    /// False until the first config serves, and again once draining starts.
    pub ready: AtomicBool,
    /// The source's status of its objects (file mode: Gateway API conditions), for `/config`.
    status: Mutex<serde_json::Map<String, serde_json::Value>>,
    /// Key pairs received beside snapshots: those the serving snapshot names, plus any sent
    /// for the next one.
    secrets: Mutex<Secrets>,
    /// The version of each snapshot that takes effect, for what must re-check itself then
    /// (connections admitted under the old policies).
    changes: tokio::sync::watch::Sender<u64>,
}

impl Dataplane {
    /// `workers` run the listeners; with none, they run on the caller's runtime.
    pub fn new(limits: Limits, workers: Vec<tokio::runtime::Handle>) -> Arc<Self> {
        let registry = Arc::new(Registry::default());
        let compiler = Compiler::new(registry.clone(), workers.len());
        let shared = Arc::new(Shared {
            config: ArcSwap::from_pointee(Compiled::empty()),
            registry,
            limits,
            access_log: Default::default(),
            tracing: Default::default(),
            mesh: compiler.mesh.clone(),
        });
        Arc::new(Dataplane {
            compiler,
            listeners: Mutex::new(Listeners::new(shared.clone(), workers)),
            shared,
            ready: AtomicBool::new(false),
            status: Mutex::default(),
            secrets: Mutex::default(),
            changes: tokio::sync::watch::Sender::new(0),
        })
    }

    /// Sidecar mode: the pod this proxy serves, before the first snapshot is applied.
    pub fn set_workload(&self, namespace: String, pod: String) {
        let _ = self.compiler.me.set((namespace, pod));
    }

    /// The zone this proxy runs in, before the first snapshot is applied: clusters with
    /// locality failover prefer their endpoints in it.
    /// Whether it was not set before (a zone once set stays).
    pub fn set_zone(&self, zone: String) -> bool {
        self.compiler.zone.set(zone).is_ok()
    }

    /// Global rate limits count in the Redis at `url`.
    pub fn use_redis(&self, url: &str) -> Result<(), redis::RedisError> {
        self.compiler.limiters.use_redis(url)
    }

    /// Mesh proxies: how upstream connections reach mesh workloads, and who they are (set once).
    pub fn set_mesh(&self, t: Arc<dyn crate::upstream::MeshUpstreams>) {
        let _ = self.compiler.mesh.set(t);
    }

    pub fn set_status(&self, status: serde_json::Map<String, serde_json::Value>) {
        *self.status.lock().unwrap() = status;
    }

    pub fn status(&self) -> serde_json::Map<String, serde_json::Value> {
        self.status.lock().unwrap().clone()
    }

    /// Takes in key pairs a coming snapshot names (they travel beside snapshots, never in them).
    pub fn add_secrets(&self, secrets: Secrets) {
        self.secrets.lock().unwrap().extend(secrets);
    }

    /// The key pairs the serving snapshot names (for a private cache).
    pub fn serving_secrets(&self) -> Secrets {
        let snap = self.shared.config.load().snapshot.clone();
        ferrum_snapshot::secret::needed_by(&snap, &self.secrets.lock().unwrap())
    }

    /// Applies a snapshot with `secrets` added to those received before, or leaves everything
    /// as it was and says why. Once it serves, key pairs it does not name are forgotten.
    pub fn apply(&self, snap: Snapshot, secrets: Secrets) -> Result<(), ApplyError> {
        let mut listeners = self.listeners.lock().unwrap();
        let version = snap.version;
        self.add_secrets(secrets);
        let result = (|| {
            let compiled = {
                let secrets = self.secrets.lock().unwrap();
                self.compiler.compile(snap, &secrets, &self.shared.config.load())?
            };
            let want: Vec<SocketAddr> = compiled
                .snapshot
                .listeners
                .iter()
                .filter_map(|l| Some(SocketAddr::new(l.address.parse().ok()?, l.port)))
                .collect();
            let new = listeners.bind_new(&want)?;
            // In-flight requests keep the old config through their own guard.
            let compiled = Arc::new(compiled);
            self.shared.config.store(compiled.clone());
            listeners.reconcile(&want, new);
            self.compiler.prune_metrics(&compiled);
            let named: std::collections::HashSet<&str> = ferrum_snapshot::secret::references(&compiled.snapshot)
                .map(|(n, _)| n)
                .collect();
            self.secrets.lock().unwrap().retain(|n, _| named.contains(n.as_str()));
            Ok(())
        })();
        let reg = &self.shared.registry;
        match &result {
            Ok(()) => {
                reg.config_version.store(version, Relaxed);
                reg.reloads_ok.fetch_add(1, Relaxed);
                self.ready.store(true, Relaxed);
                self.changes.send_replace(version);
            }
            Err(_) => {
                reg.reloads_failed.fetch_add(1, Relaxed);
            }
        }
        result
    }

    /// Wakes on every snapshot that takes effect.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    pub fn drain(&self) {
        self.ready.store(false, Relaxed);
        self.listeners.lock().unwrap().drain();
    }

    pub fn listening(&self) -> Vec<SocketAddr> {
        self.listeners.lock().unwrap().addrs()
    }
}
