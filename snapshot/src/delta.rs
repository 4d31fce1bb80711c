//! Incremental updates: what a consumer holding snapshot `base` needs to reach `target`. A
//! one-route change to a 10,000-route snapshot is one virtual host on the wire, not all of them.
//!
//! Parts are keyed the way producers lay snapshots out: listeners by name (kept in address/port
//! order), virtual hosts by hostname within their listener, clusters by name (both in name
//! order). [`Delta::apply`] rebuilds that layout and checks the result against the target hash,
//! so a consumer never serves a snapshot the producer did not make.

use std::collections::BTreeMap;

use foldhash::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::mesh::Changes;
use crate::model::{
    Cluster, Listener, Mesh, MeshService, Policy, SCHEMA, SidecarScope, Snapshot, VirtualHost, Workload,
};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Delta {
    /// The producer's schema (see [`Snapshot::schema`]).
    #[serde(default)]
    pub schema: u32,
    pub base_version: u64,
    pub base_hash: String,
    pub version: u64,
    pub hash: String,
    /// New listeners, or listeners whose own fields changed; sent without virtual hosts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listeners: Vec<Listener>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed_listeners: Vec<String>,
    /// (listener name, virtual host): new or changed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub virtual_hosts: Vec<(String, Arc<VirtualHost>)>,
    /// (listener name, hostname), for listeners that stay.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed_virtual_hosts: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Changes::is_empty")]
    pub clusters: Changes<Cluster>,
    #[serde(default, skip_serializing_if = "Changes::is_empty")]
    pub workloads: Changes<Workload>,
    #[serde(default, skip_serializing_if = "Changes::is_empty")]
    pub services: Changes<MeshService>,
    #[serde(default, skip_serializing_if = "Changes::is_empty")]
    pub policies: Changes<Policy>,
    #[serde(default, skip_serializing_if = "Changes::is_empty")]
    pub sidecars: Changes<SidecarScope>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DeltaError {
    #[error(
        "delta is based on version {want_version} ({want_hash}), but version {have_version} ({have_hash}) is applied"
    )]
    WrongBase {
        want_version: u64,
        want_hash: String,
        have_version: u64,
        have_hash: String,
    },
    #[error("delta for version {0} does not produce the content its hash names")]
    HashMismatch(u64),
}

fn same_head(a: &Listener, b: &Listener) -> bool {
    a.name == b.name
        && a.address == b.address
        && a.port == b.port
        && a.protocol == b.protocol
        && a.certificates == b.certificates
        && a.gateways == b.gateways
        && a.gateway_hosts == b.gateway_hosts
        && a.access_log == b.access_log
        && a.client_address == b.client_address
}

fn head(l: &Listener) -> Listener {
    Listener {
        virtual_hosts: Vec::new(),
        ..l.clone()
    }
}

impl Delta {
    /// What changed from `base` to `target`. Unchanged parts are compared, not copied.
    pub fn between(base: &Snapshot, target: &Snapshot) -> Delta {
        let mut d = Delta {
            schema: SCHEMA,
            base_version: base.version,
            base_hash: base.hash.clone(),
            version: target.version,
            hash: target.hash.clone(),
            ..Delta::default()
        };
        let old: HashMap<&str, &Listener> = base.listeners.iter().map(|l| (l.name.as_str(), l)).collect();
        for l in &target.listeners {
            let prev = old.get(l.name.as_str());
            if prev.is_none_or(|p| !same_head(p, l)) {
                d.listeners.push(head(l));
            }
            let prev_hosts: HashMap<&str, &Arc<VirtualHost>> = prev
                .map(|p| p.virtual_hosts.iter().map(|v| (v.hostname.as_str(), v)).collect())
                .unwrap_or_default();
            for v in &l.virtual_hosts {
                if prev_hosts
                    .get(v.hostname.as_str())
                    .is_none_or(|p| !Arc::ptr_eq(p, v) && p.as_ref() != v.as_ref())
                {
                    d.virtual_hosts.push((l.name.clone(), v.clone()));
                }
            }
            if let Some(p) = prev {
                let now: std::collections::HashSet<&str> =
                    l.virtual_hosts.iter().map(|v| v.hostname.as_str()).collect();
                for v in &p.virtual_hosts {
                    if !now.contains(v.hostname.as_str()) {
                        d.removed_virtual_hosts.push((l.name.clone(), v.hostname.clone()));
                    }
                }
            }
        }
        let now: std::collections::HashSet<&str> = target.listeners.iter().map(|l| l.name.as_str()).collect();
        d.removed_listeners = base
            .listeners
            .iter()
            .filter(|l| !now.contains(l.name.as_str()))
            .map(|l| l.name.clone())
            .collect();
        d.clusters = Changes::between(&base.clusters, &target.clusters);
        d.workloads = Changes::between(&base.workloads, &target.workloads);
        d.services = Changes::between(&base.services, &target.services);
        d.policies = Changes::between(&base.policies, &target.policies);
        d.sidecars = Changes::between(&base.sidecars, &target.sidecars);
        d
    }

    pub fn is_empty(&self) -> bool {
        self.listeners.is_empty()
            && self.removed_listeners.is_empty()
            && self.virtual_hosts.is_empty()
            && self.removed_virtual_hosts.is_empty()
            && self.clusters.is_empty()
            && self.workloads.is_empty()
            && self.services.is_empty()
            && self.policies.is_empty()
            && self.sidecars.is_empty()
    }

    /// The target snapshot, built from `base` and this delta, checked against the target hash.
    pub fn apply(&self, base: &Snapshot) -> Result<Snapshot, DeltaError> {
        // Content decides: generations that changed only status-relevant inputs keep the hash
        // (and are not resent), so the version a consumer holds may be older than base_version.
        if base.hash != self.base_hash {
            return Err(DeltaError::WrongBase {
                want_version: self.base_version,
                want_hash: self.base_hash.clone(),
                have_version: base.version,
                have_hash: base.hash.clone(),
            });
        }
        let mut listeners: BTreeMap<String, (Listener, BTreeMap<String, Arc<VirtualHost>>)> = base
            .listeners
            .iter()
            .map(|l| {
                let hosts = l
                    .virtual_hosts
                    .iter()
                    .map(|v| (v.hostname.clone(), v.clone()))
                    .collect();
                (l.name.clone(), (head(l), hosts))
            })
            .collect();
        for name in &self.removed_listeners {
            listeners.remove(name);
        }
        for l in &self.listeners {
            listeners
                .entry(l.name.clone())
                .or_insert_with(|| (head(l), BTreeMap::new()))
                .0 = head(l);
        }
        for (listener, host) in &self.removed_virtual_hosts {
            if let Some((_, hosts)) = listeners.get_mut(listener) {
                hosts.remove(host);
            }
        }
        for (listener, v) in &self.virtual_hosts {
            if let Some((_, hosts)) = listeners.get_mut(listener) {
                hosts.insert(v.hostname.clone(), v.clone());
            }
        }
        let mut out: Vec<Listener> = listeners
            .into_values()
            .map(|(mut l, hosts)| {
                l.virtual_hosts = hosts.into_values().collect();
                l
            })
            .collect();
        out.sort_by(|a, b| (&a.address, a.port).cmp(&(&b.address, b.port)));
        let mut snap = Snapshot::new(self.version, out, self.clusters.apply(&base.clusters)).with_mesh(Mesh {
            workloads: self.workloads.apply(&base.workloads),
            services: self.services.apply(&base.services),
            policies: self.policies.apply(&base.policies),
            sidecars: self.sidecars.apply(&base.sidecars),
        });
        if self.schema > SCHEMA {
            // Parts this build does not know were dropped: the producer's hash names the content.
            snap.schema = self.schema;
            snap.hash = self.hash.clone();
        } else if snap.hash != self.hash {
            return Err(DeltaError::HashMismatch(self.version));
        }
        Ok(snap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Resources;
    use crate::translate::{Options, translate};

    fn snap(version: u64, yaml: &str) -> Snapshot {
        let mut r = Resources::default();
        r.add_yaml("t.yaml", yaml).unwrap();
        let t = translate(&r, version, &Options::default());
        assert!(t.problems.is_empty(), "{:?}", t.problems);
        t.snapshot
    }

    const BASE: &str = "
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: web}
spec: {gatewayClassName: x, listeners: [{name: http, port: 8080, protocol: HTTP}]}
---
apiVersion: ferrum.dev/v1alpha1
kind: Backend
metadata: {name: a}
spec: {endpoints: [{address: 127.0.0.1, port: 9001}]}
---
apiVersion: ferrum.dev/v1alpha1
kind: Backend
metadata: {name: b}
spec: {endpoints: [{address: 127.0.0.1, port: 9002}]}
";

    fn route(name: &str, host: &str, path: &str, backend: &str) -> String {
        format!(
            "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}}}\n\
             spec: {{parentRefs: [{{name: web}}], hostnames: [{host}], rules: [{{matches: [{{path: {{type: PathPrefix, value: {path}}}}}], \
             backendRefs: [{{group: ferrum.dev, kind: Backend, name: {backend}}}]}}]}}\n"
        )
    }

    #[test]
    fn a_one_route_change_carries_one_virtual_host_and_applies_to_the_same_snapshot() {
        let base = snap(
            1,
            &format!(
                "{BASE}{}{}",
                route("r1", "a.test", "/", "a"),
                route("r2", "b.test", "/", "a")
            ),
        );
        let target = snap(
            2,
            &format!(
                "{BASE}{}{}",
                route("r1", "a.test", "/", "a"),
                route("r2", "b.test", "/v2", "b")
            ),
        );
        let d = Delta::between(&base, &target);
        assert_eq!(d.virtual_hosts.len(), 1);
        assert_eq!(d.virtual_hosts[0].1.hostname, "b.test");
        // Backend b is used for the first time; a stays and is not resent.
        assert_eq!(
            d.clusters.upserted.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            ["backend/default/b"]
        );
        assert!(d.listeners.is_empty() && d.clusters.removed.is_empty(), "{d:?}");
        assert_eq!(d.apply(&base).unwrap(), target);
    }

    #[test]
    fn removals_and_new_parts_round_trip() {
        let base = snap(
            1,
            &format!(
                "{BASE}{}{}",
                route("r1", "a.test", "/", "a"),
                route("r2", "b.test", "/", "b")
            ),
        );
        let target = snap(2, &format!("{BASE}{}", route("r3", "c.test", "/", "a")));
        let d = Delta::between(&base, &target);
        assert_eq!(d.removed_virtual_hosts.len(), 2);
        assert_eq!(d.clusters.removed, vec!["backend/default/b".to_string()]);
        let json = serde_json::to_vec(&d).unwrap();
        let d: Delta = serde_json::from_slice(&json).unwrap();
        assert_eq!(d.apply(&base).unwrap(), target);
        assert!(Delta::between(&target, &target).is_empty());
    }

    /// What a proxy built before a field or kind existed does with a newer operator's output.
    #[test]
    fn an_older_consumer_follows_a_newer_producer_that_carries_unknown_fields_and_kinds() {
        let a = snap(1, &format!("{BASE}{}", route("r1", "a.test", "/", "a")));
        let b = snap(2, &format!("{BASE}{}", route("r1", "a.test", "/x", "a")));
        let newer = |v: serde_json::Value| {
            let mut v = v;
            v["schema"] = (SCHEMA + 1).into();
            v["futureKind"] = serde_json::json!([{"name": "x"}]);
            v["clusters"][0]["futureField"] = serde_json::json!({"on": true});
            v
        };
        let full = newer(serde_json::to_value(&a).unwrap());
        let got: Snapshot = serde_json::from_value(full.clone()).unwrap();
        assert!(got.is_whole(), "a newer schema is taken with the producer's hash");
        assert_eq!(got.hash, a.hash);
        // At this build's schema the check runs: unknown fields dropped leave the known content
        // (which matches), while changed known content does not.
        let mut tampered = full;
        tampered["schema"] = SCHEMA.into();
        let tampered: Snapshot = serde_json::from_value(tampered).unwrap();
        assert!(tampered.is_whole());
        let mut changed: Snapshot = serde_json::from_value(serde_json::to_value(&a).unwrap()).unwrap();
        Arc::make_mut(&mut changed.clusters[0]).endpoints.clear();
        assert!(!changed.is_whole());
        // Deltas too: the result carries the producer's hash, so the next delta's base matches.
        let mut d = serde_json::to_value(Delta::between(&a, &b)).unwrap();
        d["schema"] = (SCHEMA + 1).into();
        d["futureKind"] = serde_json::json!({"upserted": []});
        let d: Delta = serde_json::from_value(d).unwrap();
        let applied = d.apply(&got).unwrap();
        assert_eq!(applied.hash, b.hash);
        assert_eq!(applied.listeners, b.listeners);
    }

    #[test]
    fn a_delta_refuses_the_wrong_base_and_a_tampered_result() {
        let a = snap(1, &format!("{BASE}{}", route("r1", "a.test", "/", "a")));
        let b = snap(2, &format!("{BASE}{}", route("r1", "a.test", "/x", "a")));
        let c = snap(3, &format!("{BASE}{}", route("r1", "a.test", "/y", "a")));
        let d = Delta::between(&b, &c);
        assert!(matches!(d.apply(&a), Err(DeltaError::WrongBase { .. })));
        let mut bad = Delta::between(&a, &b);
        Arc::make_mut(&mut bad.virtual_hosts[0].1).routes.clear();
        assert_eq!(bad.apply(&a), Err(DeltaError::HashMismatch(2)));
    }
}
