//! File mode: Kubernetes-style YAML (one file, several, or directories of `*.yaml`), translated
//! by the shared translator. Reloaded on change and on SIGHUP; a bad edit is logged and the last
//! good config keeps serving.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ferrum_snapshot::translate::Options;
use ferrum_snapshot::{Problem, Resources, Secrets, Snapshot, translate};
use notify::{RecursiveMode, Watcher};

use crate::dataplane::Dataplane;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Load(#[from] ferrum_snapshot::resources::LoadError),
    #[error("{} problem(s) in the config:\n  {}", .0.len(), .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  "))]
    Problems(Vec<Problem>),
}

/// A translated config: what serves, and the status of every object as the operator would
/// write it.
pub struct Loaded {
    pub snapshot: Snapshot,
    /// The key pairs the snapshot names (from Secrets in the files).
    pub secrets: Secrets,
    /// Status conditions (routes attached nowhere, unresolved references): not errors.
    pub conditions: Vec<Problem>,
    /// Per object (`Kind namespace/name`), its Gateway API status.
    pub status: serde_json::Map<String, serde_json::Value>,
}

impl From<(Snapshot, Secrets)> for Loaded {
    /// A snapshot from elsewhere (a cache): no objects, so no status.
    fn from((snapshot, secrets): (Snapshot, Secrets)) -> Self {
        Loaded {
            snapshot,
            secrets,
            conditions: Vec::new(),
            status: serde_json::Map::new(),
        }
    }
}

/// Reads and translates the config. Invalid input (a field no controller could accept) is an
/// error; a route that attaches nowhere or a reference that does not resolve is a status
/// condition, as in a cluster, and everything else serves (`strict` makes those errors too).
pub fn load(paths: &[PathBuf], version: u64, strict: bool) -> Result<Loaded, SourceError> {
    let res = Resources::from_paths(paths)?;
    let t = translate(&res, version, &Options::default());
    let fatal: Vec<Problem> = t
        .problems
        .iter()
        .filter(|p| strict || !p.reason.is_condition())
        .cloned()
        .collect();
    if !fatal.is_empty() {
        return Err(SourceError::Problems(fatal));
    }
    let status = ferrum_snapshot::status::all(&res, &t);
    Ok(Loaded {
        snapshot: t.snapshot,
        secrets: t.secrets,
        conditions: t.problems,
        status,
    })
}

/// Logs the conditions of a config that just took effect (once per change, not per reload).
pub fn log_conditions(conditions: &[Problem]) {
    for p in conditions {
        let origin = p.origin.as_deref().unwrap_or("");
        tracing::warn!(object = %p.object, field = %p.field, reason = p.reason.as_str(), origin, "{}", p.message);
    }
}

/// Loads and applies if the content changed. Returns whether a new config is serving.
pub fn reload(paths: &[PathBuf], strict: bool, dp: &Dataplane) -> bool {
    let current = dp.shared.config.load();
    let next_version = current.snapshot.version + 1;
    let result = match load(paths, next_version, strict) {
        Ok(l) if l.snapshot.hash == current.snapshot.hash => {
            dp.set_status(l.status);
            Ok(false)
        }
        // apply() counts its own failures.
        Ok(l) => dp
            .apply(l.snapshot, l.secrets)
            .map(|_| {
                log_conditions(&l.conditions);
                dp.set_status(l.status);
                true
            })
            .map_err(|e| e.to_string()),
        Err(e) => {
            dp.shared
                .registry
                .reloads_failed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Err(e.to_string())
        }
    };
    match result {
        Ok(changed) => {
            if changed {
                tracing::info!(version = next_version, "config reloaded");
            }
            changed
        }
        Err(e) => {
            tracing::error!(
                "config rejected, still serving version {}: {e}",
                current.snapshot.version
            );
            false
        }
    }
}

/// Watches the config paths (their directories, since editors replace files) and SIGHUP.
pub async fn watch(paths: Vec<PathBuf>, strict: bool, dp: Arc<Dataplane>) -> notify::Result<()> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let watched: Vec<PathBuf> = paths
        .iter()
        .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()))
        .collect();
    let relevant = watched.clone();
    let fs_tx = tx.clone();
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if let Ok(ev) = ev
            && !ev.kind.is_access()
            && ev
                .paths
                .iter()
                .any(|p| relevant.iter().any(|r| p.starts_with(r) || r.starts_with(p)))
        {
            let _ = fs_tx.try_send(());
        }
    })?;
    for p in &watched {
        let dir = if p.is_dir() {
            p.as_path()
        } else {
            p.parent().unwrap_or(Path::new("."))
        };
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
    }
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).map_err(notify::Error::io)?;
    loop {
        tokio::select! {
            r = rx.recv() => if r.is_none() { return Ok(()) },
            _ = hup.recv() => tracing::info!("SIGHUP: reloading"),
        }
        // Editors write in several steps: let them finish, then read once.
        tokio::time::sleep(Duration::from_millis(50)).await;
        while rx.try_recv().is_ok() {}
        let (paths, dp2) = (paths.clone(), dp.clone());
        let _ = tokio::task::spawn_blocking(move || reload(&paths, strict, &dp2)).await;
    }
}
