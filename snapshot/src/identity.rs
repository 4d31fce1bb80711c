//! Workload identity: SPIFFE IDs of the form `spiffe://<trust-domain>/ns/<namespace>/sa/<sa>`,
//! exactly (mesh.md): anything with more, fewer or empty segments is not one of ours.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{id:?} is not a SPIFFE ID of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>: {why}")]
pub struct BadSpiffeId {
    pub id: String,
    pub why: &'static str,
}

impl SpiffeId {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> SpiffeId {
        SpiffeId {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        }
    }

    /// The AuthorizationPolicy `principals` form: the ID without `spiffe://`.
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}", self.principal())
    }
}

/// Characters allowed in a trust domain (SPIFFE: lowercase letters, digits, `.`, `-`, `_`) and in
/// a path segment (SPIFFE: letters, digits, `.`, `-`, `_`).
fn segment_ok(s: &str, lowercase_only: bool) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes().all(|b| {
            (b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                || (!lowercase_only && b.is_ascii_uppercase())
        })
}

impl FromStr for SpiffeId {
    type Err = BadSpiffeId;

    fn from_str(id: &str) -> Result<Self, Self::Err> {
        let bad = |why| BadSpiffeId {
            id: id.to_string(),
            why,
        };
        let rest = id.strip_prefix("spiffe://").ok_or_else(|| bad("no spiffe:// scheme"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [td, "ns", ns, "sa", sa] = parts[..] else {
            return Err(bad("the path must be exactly /ns/<namespace>/sa/<service-account>"));
        };
        if !segment_ok(td, true) {
            return Err(bad("invalid trust domain"));
        }
        if !segment_ok(ns, false) || !segment_ok(sa, false) {
            return Err(bad("empty or invalid path segment"));
        }
        Ok(SpiffeId::new(td, ns, sa))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exactly_the_mesh_form() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        assert_eq!(id, SpiffeId::new("cluster.local", "default", "web"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/web");
        assert_eq!(id.principal(), "cluster.local/ns/default/sa/web");
        for bad in [
            "cluster.local/ns/default/sa/web",
            "spiffe://cluster.local/ns/default/sa/web/extra",
            "spiffe://cluster.local/ns/default/sa/",
            "spiffe://cluster.local/ns//sa/web",
            "spiffe://cluster.local/ns/default",
            "spiffe://Cluster.Local/ns/default/sa/web",
            "spiffe://cluster.local/sa/web/ns/default",
            "spiffe:///ns/default/sa/web",
            "spiffe://cluster.local/ns/../sa/web",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad}");
        }
    }
}
