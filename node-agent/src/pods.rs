//! Which of the node's pods are enrolled (`ferrum-node-agent run`): a pod is while it runs with
//! a Ferrum sidecar — the injector's status annotation, which records the pod's capture — and
//! has not opted out; it is forgotten when it stops, and enrolled again if its network
//! namespace is ever remade. Every other enrollment (an earlier agent's pod that is gone, a
//! manual `enroll`) is removed: in this mode the agent owns the `enrolled` map.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferrum_snapshot::mesh::{Capture, INJECTION_STATUS};
use k8s_openapi::api::core::v1::Pod;

use crate::enroll;
use crate::host::{self, PodNetns};
use crate::redirect::{Error, io};

/// A pod annotation; `"false"` keeps the pod's outbound connects on its capture rules.
pub const OPT_OUT: &str = "ferrum.dev/socket-redirect";

/// A pod's injection record that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("annotation {INJECTION_STATUS}: {0}")]
pub struct BadRecord(#[from] serde_json::Error);

/// The capture to enroll `pod` with: `Ok(None)` when it is not to be enrolled, `Err` when it
/// should be but its recorded capture cannot be read.
pub fn wanted(pod: &Pod) -> Result<Option<Capture>, BadRecord> {
    let meta = &pod.metadata;
    let Some(status) = meta.annotations.as_ref().and_then(|a| a.get(INJECTION_STATUS)) else {
        return Ok(None);
    };
    let opted_out = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(OPT_OUT))
        .is_some_and(|v| v == "false");
    let host_network = pod.spec.as_ref().and_then(|s| s.host_network) == Some(true);
    let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
    if opted_out || host_network || !running || meta.deletion_timestamp.is_some() {
        return Ok(None);
    }
    #[derive(serde::Deserialize)]
    struct Recorded {
        // An injector older than the node agent recorded none.
        capture: Option<Capture>,
    }
    Ok(serde_json::from_str::<Recorded>(status)?.capture)
}

struct Enrolled {
    cookie: u64,
    inode: u64,
    capture: Capture,
}

/// The node's enrolled pods, by UID.
pub struct Node {
    pin_dir: PathBuf,
    proc_root: PathBuf,
    enrolled: HashMap<String, Enrolled>,
    /// What was last said about a pod that could not be enrolled (said again only if it changes).
    trouble: HashMap<String, String>,
}

/// What a [`Node::reconcile`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pass {
    pub enrolled: usize,
    pub forgotten: usize,
    /// Pods now enrolled in all.
    pub total: usize,
}

impl Node {
    pub fn new(pin_dir: &Path, proc_root: &Path) -> Node {
        Node {
            pin_dir: pin_dir.to_path_buf(),
            proc_root: proc_root.to_path_buf(),
            enrolled: HashMap::new(),
            trouble: HashMap::new(),
        }
    }

    /// Brings the `enrolled` map in line with `pods` (the node's) and the namespaces `/proc`
    /// shows.
    pub fn reconcile(&mut self, pods: &[Arc<Pod>]) -> Result<Pass, Error> {
        let namespaces = host::pod_namespaces(&self.proc_root).map_err(|e| io("reading", &self.proc_root, e))?;
        let want = self.wanted(pods, &namespaces);
        let mut pass = Pass::default();
        let mut gone = Vec::new();
        self.enrolled.retain(|uid, e| {
            let same = want
                .get(uid)
                .is_some_and(|(_, ns, c)| ns.inode == e.inode && *c == e.capture);
            if !same {
                gone.push(e.cookie);
            }
            same
        });
        for cookie in gone {
            enroll::forget(&self.pin_dir, cookie)?;
            pass.forgotten += 1;
        }
        for (uid, (name, ns, capture)) in want {
            if self.enrolled.contains_key(&uid) {
                continue;
            }
            match enroll::enroll(&self.pin_dir, &ns.path, &capture) {
                Ok(cookie) => {
                    tracing::info!(pod = name, "enrolled");
                    self.trouble.remove(&uid);
                    let inode = ns.inode;
                    self.enrolled.insert(uid, Enrolled { cookie, inode, capture });
                    pass.enrolled += 1;
                }
                // The namespace may be gone already; the next pass sees.
                Err(e) => self.say(&uid, &name, e.to_string()),
            }
        }
        let ours: HashSet<u64> = self.enrolled.values().map(|e| e.cookie).collect();
        for cookie in enroll::cookies(&self.pin_dir)? {
            if !ours.contains(&cookie) {
                enroll::forget(&self.pin_dir, cookie)?;
                pass.forgotten += 1;
            }
        }
        pass.total = self.enrolled.len();
        Ok(pass)
    }

    /// The pods to enroll, by UID: name, namespace and capture.
    fn wanted(
        &mut self,
        pods: &[Arc<Pod>],
        namespaces: &HashMap<String, PodNetns>,
    ) -> HashMap<String, (String, PodNetns, Capture)> {
        let mut want = HashMap::new();
        for pod in pods {
            let Some(uid) = pod.metadata.uid.as_deref() else {
                continue;
            };
            let name = format!(
                "{}/{}",
                pod.metadata.namespace.as_deref().unwrap_or_default(),
                pod.metadata.name.as_deref().unwrap_or_default()
            );
            match (wanted(pod), namespaces.get(uid)) {
                (Ok(Some(capture)), Some(ns)) => {
                    want.insert(uid.to_string(), (name, ns.clone(), capture));
                }
                // Its sandbox is not up yet, or runs where /proc does not show it.
                (Ok(Some(_)), None) => self.say(uid, &name, "no process of the pod found in /proc".into()),
                (Ok(None), _) => {}
                (Err(e), _) => self.say(uid, &name, e.to_string()),
            }
        }
        let live: HashSet<&str> = pods.iter().filter_map(|p| p.metadata.uid.as_deref()).collect();
        self.trouble.retain(|uid, _| live.contains(uid.as_str()));
        want
    }

    fn say(&mut self, uid: &str, pod: &str, why: String) {
        if self.trouble.get(uid) != Some(&why) {
            tracing::warn!(pod, reason = %why, "not enrolled: its connections take the capture rules");
            self.trouble.insert(uid.to_string(), why);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(annotations: &str, phase: &str) -> Pod {
        serde_json::from_str(&format!(
            r#"{{"metadata": {{"name": "web", "namespace": "shop", "uid": "u1", "annotations": {annotations}}},
                "spec": {{"containers": []}}, "status": {{"phase": "{phase}"}}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn running_injected_pods_are_wanted_with_their_recorded_capture() {
        let recorded = r#"{"ferrum.dev/status": "{\"version\":\"0.1.0\",\"capture\":{\"proxyUid\":1337,\"proxyGid\":1337,\"inboundPort\":15006,\"outboundPort\":15001,\"excludeInbound\":[15008],\"excludeOutbound\":[5432]}}"}"#;
        let c = wanted(&pod(recorded, "Running")).unwrap().unwrap();
        assert_eq!((c.outbound_port, c.exclude_outbound), (15001, vec![5432]));
        assert_eq!(wanted(&pod(recorded, "Pending")).unwrap(), None, "not running yet");
        let opted_out = format!(r#"{{"ferrum.dev/socket-redirect": "false", {}"#, &recorded[1..]);
        assert_eq!(wanted(&pod(&opted_out, "Running")).unwrap(), None, "{opted_out}");
        assert_eq!(wanted(&pod("{}", "Running")).unwrap(), None, "no sidecar");
        // Injected by an injector that recorded no capture: left to the rules.
        assert_eq!(
            wanted(&pod(r#"{"ferrum.dev/status": "{\"version\":\"0.0.9\"}"}"#, "Running")).unwrap(),
            None
        );
        let bad = wanted(&pod(r#"{"ferrum.dev/status": "{\"capture\": 7}"}"#, "Running")).unwrap_err();
        assert!(bad.to_string().contains("ferrum.dev/status"), "{bad}");
    }
}
