//! `ferrum-node-agent run`, the DaemonSet's process: attach, then keep the node's pods enrolled
//! (`crate::pods`) as the API server reports them. Stopping leaves everything attached (a
//! restart or an upgrade changes nothing for live connections) — unless the agent's DaemonSet
//! is gone or being deleted, i.e. the mesh is being uninstalled: then it detaches.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::Instant;

use crate::pods::Node;
use crate::redirect::{self, Error};

/// How the agent runs (its flags).
#[derive(Debug, Clone)]
pub struct Settings {
    pub pin_dir: PathBuf,
    pub cgroup: PathBuf,
    /// The host's `/proc` (the DaemonSet runs with hostPID).
    pub proc_root: PathBuf,
    /// This node's name: its pods are the ones enrolled.
    pub node: String,
    /// The agent's own DaemonSet (namespace, name): detach on exit when it is gone.
    pub daemonset: Option<(String, String)>,
    pub drain: Duration,
    /// Where `/metrics`, `/ready` and `/live` are served, if anywhere.
    pub metrics: Option<std::net::SocketAddr>,
    /// How often `/proc` is looked at again with no pod event (a pod's sandbox may come up
    /// after the event that made it Running).
    pub resync: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Ebpf(#[from] Error),
    #[error("the Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
    #[error("binding the metrics address {0}: {1}")]
    Metrics(std::net::SocketAddr, std::io::Error),
}

/// Events closer together than this are reconciled once.
const SETTLE: Duration = Duration::from_millis(200);

pub async fn run(s: Settings) -> Result<(), RunError> {
    // First: a stop that comes while attaching still gets the clean exit below.
    let (mut term, mut int) = (
        signal(SignalKind::terminate()).map_err(RunError::Signal)?,
        signal(SignalKind::interrupt()).map_err(RunError::Signal)?,
    );
    if let Some(addr) = s.metrics {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| RunError::Metrics(addr, e))?;
        tokio::spawn(crate::metrics::serve(listener, s.pin_dir.clone()));
    }
    let how = redirect::attach(&s.pin_dir, &s.cgroup)?;
    tracing::info!(node = s.node, cgroup = %s.cgroup.display(), ?how, "sidecar loopback redirection attached");
    let client = kube::Client::try_default().await?;
    let (pods, writer) = reflector::store::<Pod>();
    let config = watcher::Config::default().fields(&format!("spec.nodeName={}", s.node));
    let mut events = watcher(Api::<Pod>::all(client.clone()), config)
        .default_backoff()
        .reflect(writer)
        .boxed();
    let mut node = Node::new(&s.pin_dir, &s.proc_root);
    let started = Instant::now();
    let mut resync = tokio::time::interval(s.resync);
    // Nothing is reconciled before the first list: an empty store would forget every pod.
    let (mut listed, mut due) = (false, None::<Instant>);
    loop {
        tokio::select! {
            ev = events.next() => match ev {
                Some(Ok(ev)) => {
                    listed |= matches!(ev, watcher::Event::InitDone);
                    due.get_or_insert_with(|| Instant::now() + SETTLE);
                }
                Some(Err(e)) => tracing::warn!(error = %e, "watching pods failed; retrying"),
                None => break,
            },
            _ = resync.tick() => { due.get_or_insert_with(Instant::now); }
            () = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() && listed => {
                due = None;
                reconcile(&mut node, &pods.state());
                release_retired(&s, started);
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    if let Some((namespace, name)) = &s.daemonset
        && uninstalling(client, namespace, name).await
    {
        tracing::info!(daemonset = name, "the node agent is being uninstalled: detaching");
        let left = tokio::task::block_in_place(|| redirect::detach(&s.pin_dir, &s.cgroup, s.drain))?;
        tracing::info!(still_open = left, "detached");
    }
    Ok(())
}

fn reconcile(node: &mut Node, pods: &[Arc<Pod>]) {
    // Blocking (a thread per namespace entered, /proc read), but brief.
    match tokio::task::block_in_place(|| node.reconcile(pods)) {
        Ok(pass) if pass.enrolled + pass.forgotten > 0 => {
            tracing::info!(
                enrolled = pass.enrolled,
                forgotten = pass.forgotten,
                pods = pass.total,
                "pods reconciled"
            )
        }
        Ok(_) => {}
        Err(e) => tracing::error!(error = %e, "enrolling the node's pods failed"),
    }
}

/// After an upgrade, the older version's socket map goes once its paired connections have
/// closed, or once the drain has passed since this agent started.
fn release_retired(s: &Settings, started: Instant) {
    match redirect::release_retired(&s.pin_dir, started.elapsed() >= s.drain) {
        Ok(0) => {}
        Ok(n) => tracing::warn!(
            sockets = n,
            "released an older version's socket map with connections still paired: they go on over TCP"
        ),
        Err(e) => tracing::warn!(error = %e, "releasing an older version's socket map failed"),
    }
}

/// Whether the agent's DaemonSet is gone or going. An uninstall deletes the agent's
/// ServiceAccount and Role too, often before the kubelet stops the agent, so being refused
/// (401, 403) says the same; a lookup that fails otherwise says no: stay attached.
async fn uninstalling(client: kube::Client, namespace: &str, name: &str) -> bool {
    match Api::<DaemonSet>::namespaced(client, namespace).get_opt(name).await {
        Ok(None) => true,
        Ok(Some(ds)) => ds.metadata.deletion_timestamp.is_some(),
        Err(kube::Error::Api(e)) if e.code == 401 || e.code == 403 => {
            tracing::info!(
                code = e.code,
                "refused the agent's own DaemonSet: its ServiceAccount or Role is gone"
            );
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, daemonset = name, "cannot tell whether the node agent is being uninstalled: staying attached");
            false
        }
    }
}
