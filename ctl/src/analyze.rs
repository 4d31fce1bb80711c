//! The analysis: the shared translator's problems (as the operator reports them), plus checks a
//! user asks about that are not translation problems (Services without endpoints).

use std::fmt::Write as _;
use std::path::PathBuf;

use ferrum_snapshot::mesh::PolicyRule;
use ferrum_snapshot::resources::LoadError;
use ferrum_snapshot::translate::Options;
use ferrum_snapshot::{Resources, Snapshot, translate};
use serde::Serialize;

use crate::Output;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Invalid input: a controller refuses the object (or the field).
    Error,
    /// What a cluster reports as a condition: the object is fine, something around it is not.
    Warning,
}

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub severity: Severity,
    pub object: String,
    pub field: String,
    pub reason: String,
    pub message: String,
    /// File and document, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

impl Finding {
    /// A warning about `object` that no translation reports (`message` names it: it comes first).
    fn warning(field: &str, reason: &str, message: String, object: String) -> Finding {
        Finding {
            severity: Severity::Warning,
            object,
            field: field.into(),
            reason: reason.into(),
            message,
            origin: None,
        }
    }
}

/// Findings of manifests, offline.
pub fn run(files: &[PathBuf]) -> Result<Vec<Finding>, LoadError> {
    let res = Resources::from_paths(files)?;
    let t = translate(&res, 1, &Options::default());
    let mut out: Vec<Finding> = t
        .problems
        .iter()
        .map(|p| Finding {
            severity: severity(p.reason.is_condition()),
            object: p.object.to_string(),
            field: p.field.clone(),
            reason: p.reason.as_str().into(),
            message: p.message.clone(),
            origin: p.origin.clone(),
        })
        .collect();
    out.extend(of_snapshot(&t.snapshot));
    Ok(sorted(out))
}

/// Findings of a running operator: the problems its translator reported (its `/problems`)
/// and what its snapshot shows (its `/snapshot`).
pub fn of_operator(problems: &serde_json::Value, snap: &Snapshot) -> Vec<Finding> {
    let s = |p: &serde_json::Value, k: &str| p[k].as_str().unwrap_or("").to_string();
    let mut out: Vec<Finding> = problems["problems"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| Finding {
            severity: severity(p["condition"].as_bool().unwrap_or(false)),
            object: s(p, "object"),
            field: s(p, "field"),
            reason: s(p, "reason"),
            message: s(p, "message"),
            origin: None,
        })
        .collect();
    out.extend(of_snapshot(snap));
    sorted(out)
}

fn severity(condition: bool) -> Severity {
    if condition { Severity::Warning } else { Severity::Error }
}

fn sorted(mut out: Vec<Finding>) -> Vec<Finding> {
    out.sort_by(|a, b| (a.severity, &a.object, &a.field).cmp(&(b.severity, &b.object, &b.field)));
    out
}

/// What is not a translation problem but still a user's: Services without ready endpoints,
/// Sidecar hosts that name no Service, and (when the workloads are known) objects whose
/// selector matches none of them.
fn of_snapshot(snap: &Snapshot) -> Vec<Finding> {
    let mut out = unready_services(snap);
    out.extend(unknown_sidecar_hosts(snap));
    if !snap.workloads.is_empty() {
        out.extend(unselected(snap));
    }
    out
}

/// Services (and DestinationRule subsets) none of whose endpoints is ready.
fn unready_services(snap: &Snapshot) -> Vec<Finding> {
    let mut out = Vec::new();
    for c in &snap.clusters {
        if let Some(svc) = c.name.strip_prefix("service/")
            && c.endpoints.iter().all(|e| !e.ready)
        {
            // `service/ns/name:port`, or `…:port~subset` for a DestinationRule subset.
            let (svc, subset) = svc.split_once('~').map_or((svc, None), |(s, sub)| (s, Some(sub)));
            let (ns_name, _port) = svc.rsplit_once(':').unwrap_or((svc, ""));
            let object = format!("Service {ns_name}");
            let message = match subset {
                None => format!("{object} has no ready endpoints: requests to it get 503"),
                Some(sub) => format!(
                    "subset {sub:?} of {object} has no ready endpoints (no ready pod has its labels): requests routed to it get 503"
                ),
            };
            out.push(Finding::warning("endpoints", "NoReadyEndpoints", message, object));
        }
    }
    out
}

/// A Sidecar host naming one Service that is not there (a typo) admits nothing.
fn unknown_sidecar_hosts(snap: &Snapshot) -> Vec<Finding> {
    let mut out = Vec::new();
    for sc in &snap.sidecars {
        for h in sc.egress.iter().flatten().filter(|h| !h.host.starts_with('*')) {
            let named = |s: &&std::sync::Arc<ferrum_snapshot::mesh::MeshService>| {
                s.hostname.eq_ignore_ascii_case(&h.host)
                    && (h.namespace == "*"
                        || h.namespace == "."
                        || s.key.split('/').next() == Some(h.namespace.as_str()))
            };
            if !snap.services.iter().any(|s| named(&s)) {
                let object = format!("Sidecar {}/{}", sc.namespace, sc.name);
                let message = format!(
                    "{object} names {}/{}, which is no Service: it admits nothing",
                    h.namespace, h.host
                );
                out.push(Finding::warning(
                    "spec.egress.hosts",
                    "NoMatchingService",
                    message,
                    object,
                ));
            }
        }
    }
    out
}

/// Sidecars and policies whose selector matches no workload: they apply to nothing.
fn unselected(snap: &Snapshot) -> impl Iterator<Item = Finding> + '_ {
    let sidecars = snap.sidecars.iter().filter(|sc| {
        sc.selector.is_some()
            && !snap.workloads.iter().any(|w| {
                w.namespace == sc.namespace && ferrum_snapshot::mesh::sidecar_for(std::slice::from_ref(sc), w).is_some()
            })
    });
    let unselected = sidecars.map(|sc| (format!("Sidecar {}/{}", sc.namespace, sc.name), "spec.workloadSelector"));
    let policies = snap
        .policies
        .iter()
        .filter(|p| p.selector.is_some() && p.targets.is_empty() && !snap.workloads.iter().any(|w| p.applies_to(w)));
    let unselected = unselected.chain(policies.map(|p| {
        let kind = match p.rule {
            PolicyRule::Authorization(_) => "AuthorizationPolicy",
            PolicyRule::PeerAuthentication(_) => "PeerAuthentication",
            PolicyRule::RequestAuthentication(_) => "RequestAuthentication",
        };
        (format!("{kind} {}/{}", p.namespace, p.name), "spec.selector")
    }));
    unselected.map(|(object, field)| {
        let message = format!("{object} selects no workload: it applies to nothing");
        Finding::warning(field, "NoMatchingWorkload", message, object)
    })
}

pub fn render(findings: &[Finding], output: Output) -> String {
    match output {
        Output::Json => serde_json::to_string_pretty(findings).unwrap_or_default() + "\n",
        Output::Yaml => serde_yaml::to_string(findings).unwrap_or_default(),
        Output::Table => table(findings),
    }
}

fn table(findings: &[Finding]) -> String {
    if findings.is_empty() {
        return "no problems found\n".into();
    }
    let rows: Vec<[String; 5]> = findings
        .iter()
        .map(|f| {
            let sev = match f.severity {
                Severity::Error => "error",
                Severity::Warning => "warning",
            };
            [
                sev.into(),
                f.object.clone(),
                f.field.clone(),
                f.reason.clone(),
                // One line per finding (regex errors come in several).
                f.message.split_whitespace().collect::<Vec<_>>().join(" "),
            ]
        })
        .collect();
    let head = ["SEVERITY", "OBJECT", "FIELD", "REASON", "MESSAGE"];
    let width: Vec<usize> = (0..4)
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([head[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut s = String::new();
    for r in std::iter::once(head.map(String::from)).chain(rows) {
        for (i, w) in width.iter().enumerate() {
            let _ = write!(s, "{:w$}  ", r[i]);
        }
        let _ = writeln!(s, "{}", r[4]);
    }
    s
}
