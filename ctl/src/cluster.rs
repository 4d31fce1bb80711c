//! What a running operator says, through its admin API (`--operator`, e.g. after
//! `kubectl -n ferrum-system port-forward deploy/ferrum-operator 15014`): the fleet of proxies
//! and the snapshot it serves, which `diff` compares with what manifests would make.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use ferrum_snapshot::Snapshot;
use serde::Serialize;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("cannot reach the operator at {url}: {source}")]
    Reach {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url} answered {status}: {body}")]
    Status { url: String, status: u16, body: String },
    #[error("{url} did not answer JSON of the expected shape: {source}")]
    Shape {
        url: String,
        #[source]
        source: serde_json::Error,
    },
}

/// GET `path` of the operator's admin API as JSON.
pub async fn get_json<T: serde::de::DeserializeOwned>(operator: &str, path: &str) -> Result<T, CtlError> {
    let url = format!("{}{path}", operator.trim_end_matches('/'));
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .expect("a plain HTTP client builds");
    let reach = |source| CtlError::Reach {
        url: url.clone(),
        source,
    };
    let r = client.get(&url).send().await.map_err(reach)?;
    let status = r.status().as_u16();
    let body = r.text().await.map_err(reach)?;
    if status != 200 {
        return Err(CtlError::Status { url, status, body });
    }
    serde_json::from_str(&body).map_err(|source| CtlError::Shape { url, source })
}

/// One connected proxy as `ferrumctl proxies` shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyRow {
    pub node: String,
    pub role: String,
    pub protocol: String,
    pub peer: String,
    pub version: String,
    pub sent: u64,
    pub applied: u64,
    /// `in sync`, `applying` (sent, not acknowledged yet) or `rejected`.
    pub state: &'static str,
    pub last_rejection: Option<String>,
}

/// The rows of the operator's `/proxies`.
pub fn proxy_rows(v: &Value) -> Vec<ProxyRow> {
    let s = |p: &Value, k: &str| p[k].as_str().unwrap_or("").to_string();
    let n = |p: &Value, k: &str| p[k].as_u64().unwrap_or(0);
    let mut rows: Vec<ProxyRow> = v["proxies"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let (sent, applied) = (n(p, "sentVersion"), n(p, "appliedVersion"));
            let rejected = p["rejectedVersion"].as_u64().is_some_and(|r| r >= applied && r == sent);
            ProxyRow {
                node: s(p, "nodeId"),
                role: s(p, "role"),
                protocol: s(p, "protocol"),
                peer: s(p, "peer"),
                version: s(p, "proxyVersion"),
                sent,
                applied,
                state: match (rejected, applied >= sent) {
                    (true, _) => "rejected",
                    (false, true) => "in sync",
                    (false, false) => "applying",
                },
                last_rejection: p["lastRejection"].as_str().map(String::from),
            }
        })
        .collect();
    rows.sort_by(|a, b| (&a.node, &a.role).cmp(&(&b.node, &b.role)));
    rows
}

pub fn proxies_table(rows: &[ProxyRow], generation: u64) -> String {
    let mut out = format!("generation {generation}, {} proxies\n", rows.len());
    let _ = writeln!(
        out,
        "{:<24} {:<28} {:<9} {:<10} {:<9} LAST REJECTION",
        "NODE", "ROLE", "PROTOCOL", "APPLIED", "STATE"
    );
    for r in rows {
        let role = if r.role.is_empty() { "(every Gateway)" } else { &r.role };
        let _ = writeln!(
            out,
            "{:<24} {:<28} {:<9} {:<10} {:<9} {}",
            r.node,
            role,
            r.protocol,
            r.applied,
            r.state,
            r.last_rejection.as_deref().unwrap_or("-")
        );
    }
    out
}

/// One difference between the running snapshot and the one the manifests make.
#[derive(Debug, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub struct Change {
    /// `+` added, `-` removed, `~` changed.
    pub change: &'static str,
    pub kind: &'static str,
    pub name: String,
    /// For routes: the listener (`address:port`) and host they serve.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub at: String,
    /// For changes: the top-level fields that differ.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<String>,
}

/// Routes of objects in `scope` (`namespace/name/` prefixes), by (name, listener, host).
fn routes(s: &Snapshot, scope: &BTreeSet<String>) -> BTreeMap<(String, String), Value> {
    let mut out = BTreeMap::new();
    for l in &s.listeners {
        for vh in &l.virtual_hosts {
            for r in vh.routes.iter().filter(|r| scope.iter().any(|p| r.name.starts_with(p))) {
                let at = format!("{}:{} {}", l.address, l.port, vh.hostname);
                out.insert((r.name.clone(), at), serde_json::to_value(&**r).unwrap_or_default());
            }
        }
    }
    out
}

/// The clusters `routes` send to.
fn clusters(s: &Snapshot, routes: &BTreeMap<(String, String), Value>) -> BTreeMap<String, Value> {
    let named: BTreeSet<&str> = routes
        .values()
        .flat_map(|r| r["action"]["forward"].as_array().into_iter().flatten())
        .filter_map(|t| t["cluster"].as_str())
        .collect();
    s.clusters
        .iter()
        .filter(|c| named.contains(c.name.as_str()))
        .map(|c| (c.name.clone(), serde_json::to_value(&**c).unwrap_or_default()))
        .collect()
}

fn changed_fields(a: &Value, b: &Value) -> Vec<String> {
    let keys: BTreeSet<&String> = a
        .as_object()
        .into_iter()
        .chain(b.as_object())
        .flat_map(|o| o.keys())
        .collect();
    keys.into_iter().filter(|k| a.get(*k) != b.get(*k)).cloned().collect()
}

fn compare<K: Ord + Clone>(
    kind: &'static str,
    running: &BTreeMap<K, Value>,
    proposed: &BTreeMap<K, Value>,
    label: impl Fn(&K) -> (String, String),
    out: &mut Vec<Change>,
) {
    let keys: BTreeSet<&K> = running.keys().chain(proposed.keys()).collect();
    for k in keys {
        let (name, at) = label(k);
        let (change, fields) = match (running.get(k), proposed.get(k)) {
            (None, Some(_)) => ("+", vec![]),
            (Some(_), None) => ("-", vec![]),
            (Some(a), Some(b)) if a != b => ("~", changed_fields(a, b)),
            _ => continue,
        };
        out.push(Change {
            change,
            kind,
            name,
            at,
            fields,
        });
    }
}

/// What applying the manifests would change, for the routes of the route objects they hold
/// (`scope`) and the clusters those routes use; objects not in the manifests are left out, as
/// applying them leaves those alone.
pub fn diff(running: &Snapshot, proposed: &Snapshot, scope: &BTreeSet<String>) -> Vec<Change> {
    let (r0, r1) = (routes(running, scope), routes(proposed, scope));
    let mut out = Vec::new();
    compare("route", &r0, &r1, |(n, at)| (n.clone(), at.clone()), &mut out);
    let (c0, c1) = (clusters(running, &r0), clusters(proposed, &r1));
    compare("cluster", &c0, &c1, |n| (n.clone(), String::new()), &mut out);
    out
}

pub fn diff_text(changes: &[Change]) -> String {
    if changes.is_empty() {
        return "no changes\n".into();
    }
    let mut out = String::new();
    for c in changes {
        let at = if c.at.is_empty() {
            String::new()
        } else {
            format!(" at {}", c.at)
        };
        let fields = if c.fields.is_empty() {
            String::new()
        } else {
            format!(" ({})", c.fields.join(", "))
        };
        let _ = writeln!(out, "{} {} {}{at}{fields}", c.change, c.kind, c.name);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrum_snapshot::Resources;
    use ferrum_snapshot::translate::{Options, translate};

    fn snapshot(weights: (u32, u32), extra_path: bool) -> Snapshot {
        let extra = if extra_path {
            "  - matches: [{path: {type: PathPrefix, value: /new}}]\n    backendRefs: [{name: b, port: 80}]\n"
        } else {
            ""
        };
        let yaml = format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: web}}\n\
             spec: {{gatewayClassName: ferrum, listeners: [{{name: http, port: 8080, protocol: HTTP}}]}}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {{name: a}}\nspec: {{ports: [{{port: 80}}]}}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {{name: b}}\nspec: {{ports: [{{port: 80}}]}}\n---\n\
             apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: shop}}\n\
             spec:\n  parentRefs: [{{name: web}}]\n  rules:\n\
             \x20 - backendRefs: [{{name: a, port: 80, weight: {}}}, {{name: b, port: 80, weight: {}}}]\n{extra}",
            weights.0, weights.1
        );
        let mut r = Resources::default();
        r.add_yaml("t.yaml", &yaml).unwrap();
        translate(&r, 1, &Options::default()).snapshot
    }

    #[test]
    fn route_changes_additions_and_untouched_objects() {
        let scope = BTreeSet::from(["default/shop/".to_string()]);
        let (before, after) = (snapshot((100, 0), false), snapshot((50, 50), true));
        let d = diff(&before, &after, &scope);
        let text = diff_text(&d);
        assert!(
            d.iter()
                .any(|c| c.change == "~" && c.kind == "route" && c.fields == ["action"]),
            "{text}"
        );
        assert!(d.iter().any(|c| c.change == "+" && c.kind == "route"), "{text}");
        assert!(diff(&before, &before, &scope).is_empty());
        // Routes of objects not in the manifests are not reported as removed.
        let other = BTreeSet::from(["default/other/".to_string()]);
        assert!(diff(&before, &after, &other).is_empty());
    }
}
