//! The analysis: the shared translator's problems (as the operator reports them), plus checks a
//! user asks about that are not translation problems (Services without endpoints).

use std::fmt::Write as _;
use std::path::PathBuf;

use ferrum_snapshot::resources::LoadError;
use ferrum_snapshot::translate::Options;
use ferrum_snapshot::{Resources, translate};
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

pub fn run(files: &[PathBuf]) -> Result<Vec<Finding>, LoadError> {
    let res = Resources::from_paths(files)?;
    let t = translate(&res, 1, &Options::default());
    let mut out: Vec<Finding> = t
        .problems
        .iter()
        .map(|p| Finding {
            severity: if p.reason.is_condition() {
                Severity::Warning
            } else {
                Severity::Error
            },
            object: p.object.to_string(),
            field: p.field.clone(),
            reason: p.reason.as_str().into(),
            message: p.message.clone(),
            origin: p.origin.clone(),
        })
        .collect();
    for c in &t.snapshot.clusters {
        if let Some(svc) = c.name.strip_prefix("service/")
            && c.endpoints.iter().all(|e| !e.ready)
        {
            let (ns_name, _port) = svc.rsplit_once(':').unwrap_or((svc, ""));
            let object = format!("Service {ns_name}");
            out.push(Finding {
                severity: Severity::Warning,
                origin: None,
                field: "endpoints".into(),
                reason: "NoReadyEndpoints".into(),
                message: format!("{object} has no ready endpoints: requests to it get 503"),
                object,
            });
        }
    }
    out.sort_by(|a, b| (a.severity, &a.object, &a.field).cmp(&(b.severity, &b.object, &b.field)));
    Ok(out)
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
                f.message.clone(),
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
