//! The pure translator: [`Resources`] in, a [`Snapshot`] and a list of per-object [`Problem`]s
//! out. No I/O, no clock: the same input always gives the same snapshot (and hash).
//!
//! Problems do not stop translation: the object (or the rule, or the backend) at fault is left
//! out, everything else is translated. File mode refuses a config with any problem; the operator
//! turns them into status conditions.

mod backends;
mod grpcroute;
mod hostname;
mod httproute;
mod listeners;

use std::fmt;

use crate::model::Snapshot;
use crate::resources::{ObjectRef, Resources};

pub use grpcroute::as_http_route;
pub use hostname::{hostname_matches, intersect_hostnames};

/// Status reasons, named as the Gateway API names them where it has a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    NoMatchingParent,
    NotAllowedByListeners,
    NoMatchingListenerHostname,
    BackendNotFound,
    RefNotPermitted,
    InvalidKind,
    UnsupportedValue,
    UnsupportedProtocol,
    ProtocolConflict,
    InvalidCertificateRef,
    Invalid,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NoMatchingParent => "NoMatchingParent",
            Reason::NotAllowedByListeners => "NotAllowedByListeners",
            Reason::NoMatchingListenerHostname => "NoMatchingListenerHostname",
            Reason::BackendNotFound => "BackendNotFound",
            Reason::RefNotPermitted => "RefNotPermitted",
            Reason::InvalidKind => "InvalidKind",
            Reason::UnsupportedValue => "UnsupportedValue",
            Reason::UnsupportedProtocol => "UnsupportedProtocol",
            Reason::ProtocolConflict => "ProtocolConflict",
            Reason::InvalidCertificateRef => "InvalidCertificateRef",
            Reason::Invalid => "Invalid",
        }
    }
}

/// Something wrong with one object, precise enough to fix: which object, which field, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub object: ObjectRef,
    /// Where the object came from (file and document), when known.
    pub origin: Option<String>,
    /// JSON path inside the object, e.g. `spec.rules[0].backendRefs[1].name`.
    pub field: String,
    pub reason: Reason,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(origin) = &self.origin {
            write!(f, "{origin}: ")?;
        }
        write!(
            f,
            "{}: {}: {} ({})",
            self.object,
            self.field,
            self.message,
            self.reason.as_str()
        )
    }
}

#[derive(Debug, Clone)]
pub struct Translation {
    pub snapshot: Snapshot,
    pub problems: Vec<Problem>,
    /// Which route attached to which Gateway listener (for status: `attachedRoutes`, `Accepted`).
    pub attachments: Vec<Attachment>,
    /// Gateways that were served (their class is ours), for status.
    pub gateways: Vec<ObjectRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Attachment {
    pub route: ObjectRef,
    /// Index into the route's `spec.parentRefs`.
    pub parent_ref: usize,
    pub gateway: ObjectRef,
    pub listener: String,
}

#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Only Gateways whose GatewayClass names this controller are served. `None` (file mode)
    /// serves every Gateway.
    pub controller_name: Option<String>,
    /// Only this Gateway (a proxy that serves one Gateway gets only its listeners).
    pub gateway: Option<ObjectRef>,
}

/// Collects problems and stamps them with their origin.
pub(crate) struct Problems<'a> {
    res: &'a Resources,
    list: Vec<Problem>,
    pub(crate) attachments: Vec<Attachment>,
}

impl Problems<'_> {
    pub(crate) fn push(
        &mut self,
        object: &ObjectRef,
        field: impl Into<String>,
        reason: Reason,
        message: impl Into<String>,
    ) {
        self.list.push(Problem {
            origin: self.res.origin(object).map(str::to_string),
            object: object.clone(),
            field: field.into(),
            reason,
            message: message.into(),
        });
    }
}

pub(crate) fn meta_ref(
    kind: &'static str,
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> ObjectRef {
    ObjectRef {
        kind,
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
    }
}

/// Parses a Gateway API duration (`500ms`, `10s`, `1h`) into milliseconds.
pub(crate) fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let d: gateway_api::Duration = s.parse().map_err(|e| format!("invalid duration {s:?}: {e}"))?;
    Ok(d.as_millis() as u64)
}

pub fn translate(res: &Resources, version: u64, opts: &Options) -> Translation {
    let mut problems = Problems {
        res,
        list: Vec::new(),
        attachments: Vec::new(),
    };
    let mut clusters = backends::Clusters::new(res);
    let mut listeners = listeners::build(res, opts, &mut problems);
    let served_gateways: Vec<ObjectRef> = listeners.by_gateway.keys().cloned().collect();
    httproute::attach_all(res, &mut listeners, &mut clusters, &mut problems);
    let listeners = listeners::finish(listeners);
    let clusters = clusters.finish(&mut problems);
    let mut list = problems.list;
    list.sort_by(|a, b| (&a.object, &a.field).cmp(&(&b.object, &b.field)));
    let mut attachments = problems.attachments;
    attachments.sort();
    Translation {
        snapshot: Snapshot::new(version, listeners, clusters),
        problems: list,
        attachments,
        gateways: served_gateways,
    }
}

#[cfg(test)]
mod tests;
