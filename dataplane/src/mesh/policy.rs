//! AuthorizationPolicy, compiled for one workload and evaluated per connection (L4): CUSTOM is
//! refused by the translator; any matching DENY denies; with no ALLOW policy everything else is
//! allowed; otherwise a matching ALLOW is needed. AUDIT never decides. Dry-run policies are
//! evaluated and logged, never enforced.
//!
//! On a TCP connection there is no method, path, host or JWT: an ALLOW rule that asks for one
//! never matches, and a DENY rule ignores those fields and matches on the rest (fail closed).

use std::net::{IpAddr, SocketAddr};

use ferrum_snapshot::identity::SpiffeId;
use ferrum_snapshot::istio::{Condition, Operation, Rule, Source};
use ferrum_snapshot::mesh::{AuthzAction, Policy, PolicyRule, Workload};

/// What a connection offers to be judged on.
pub struct Connection<'a> {
    /// The mTLS peer, if any (plaintext has none).
    pub peer: Option<&'a SpiffeId>,
    pub source: IpAddr,
    pub destination: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Denied, by this policy (`namespace/name`), or by having no ALLOW that matched.
    Deny(String),
}

/// The policies that select one workload, compiled.
#[derive(Default)]
pub struct Authorizer {
    deny: Vec<Compiled>,
    allow: Vec<Compiled>,
    audit: Vec<Compiled>,
}

struct Compiled {
    name: String,
    dry_run: bool,
    rules: Vec<Rule>,
}

/// An address block: `10.0.0.0/8` or a single address.
#[derive(Debug, Clone, Copy)]
struct Net {
    addr: IpAddr,
    prefix: u8,
}

impl Net {
    fn parse(s: &str) -> Option<Net> {
        let (a, p) = s.split_once('/').unwrap_or((s, ""));
        let addr: IpAddr = a.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if p.is_empty() {
            max
        } else {
            p.parse().ok().filter(|p| *p <= max)?
        };
        Some(Net { addr, prefix })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let bits = |ip: IpAddr| -> u128 {
            match ip {
                IpAddr::V4(v) => u32::from(v) as u128,
                IpAddr::V6(v) => u128::from(v),
            }
        };
        if self.addr.is_ipv4() != ip.is_ipv4() {
            return false;
        }
        let width = if ip.is_ipv4() { 32 } else { 128 };
        let shift = width - self.prefix as u32;
        shift >= width || (bits(self.addr) >> shift) == (bits(ip) >> shift)
    }
}

/// Istio string matching: exact, `prefix*`, `*suffix`, or `*` for anything.
fn string_match(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    if let Some(p) = pattern.strip_suffix('*') {
        return value.starts_with(p);
    }
    if let Some(s) = pattern.strip_prefix('*') {
        return value.ends_with(s);
    }
    pattern == value
}

/// A field with values matches when any value does; an empty field is no constraint.
fn field(values: &[String], got: Option<&str>) -> bool {
    values.is_empty() || got.is_some_and(|g| values.iter().any(|v| string_match(v, g)))
}

fn not_field(values: &[String], got: Option<&str>) -> bool {
    values.is_empty() || !got.is_some_and(|g| values.iter().any(|v| string_match(v, g)))
}

fn ip_field(values: &[String], ip: IpAddr) -> bool {
    values.is_empty() || values.iter().filter_map(|v| Net::parse(v)).any(|n| n.contains(ip))
}

fn not_ip_field(values: &[String], ip: IpAddr) -> bool {
    values.is_empty() || !values.iter().filter_map(|v| Net::parse(v)).any(|n| n.contains(ip))
}

/// Whether the rule needs something only HTTP carries.
fn http_only(r: &Rule) -> bool {
    let s = r.from.iter().map(|f| &f.source);
    let o = r.to.iter().map(|t| &t.operation);
    s.into_iter()
        .any(|s| !s.request_principals.is_empty() || !s.not_request_principals.is_empty())
        || o.into_iter().any(|o| {
            !(o.hosts.is_empty()
                && o.not_hosts.is_empty()
                && o.methods.is_empty()
                && o.not_methods.is_empty()
                && o.paths.is_empty()
                && o.not_paths.is_empty())
        })
        || r.when.iter().any(|c| c.key.starts_with("request."))
}

fn source_matches(s: &Source, c: &Connection<'_>) -> bool {
    let principal = c.peer.map(|p| p.principal());
    let ns = c.peer.map(|p| p.namespace.as_str());
    let sa = c.peer.map(|p| format!("{}/{}", p.namespace, p.service_account));
    field(&s.principals, principal.as_deref())
        && not_field(&s.not_principals, principal.as_deref())
        && field(&s.namespaces, ns)
        && not_field(&s.not_namespaces, ns)
        && field(&s.service_accounts, sa.as_deref())
        && not_field(&s.not_service_accounts, sa.as_deref())
        && ip_field(&s.ip_blocks, c.source)
        && not_ip_field(&s.not_ip_blocks, c.source)
        // Without a proxy in front (no X-Forwarded-For at L4) the remote is the source.
        && ip_field(&s.remote_ip_blocks, c.source)
        && not_ip_field(&s.not_remote_ip_blocks, c.source)
}

fn operation_matches(o: &Operation, c: &Connection<'_>) -> bool {
    let port = c.destination.port().to_string();
    field(&o.ports, Some(&port)) && not_field(&o.not_ports, Some(&port))
}

fn condition_matches(cond: &Condition, c: &Connection<'_>) -> bool {
    let owned;
    let got: Option<&str> = match cond.key.as_str() {
        "source.ip" | "remote.ip" => {
            return ip_field(&cond.values, c.source) && not_ip_field(&cond.not_values, c.source);
        }
        "destination.ip" => {
            let ip = c.destination.ip();
            return ip_field(&cond.values, ip) && not_ip_field(&cond.not_values, ip);
        }
        "destination.port" => {
            owned = c.destination.port().to_string();
            Some(&owned)
        }
        "source.namespace" => c.peer.map(|p| p.namespace.as_str()),
        "source.principal" => {
            owned = c.peer.map(|p| p.principal()).unwrap_or_default();
            c.peer.map(|_| owned.as_str())
        }
        // Not known at L4 (connection.sni comes with TLS inspection; request.* with HTTP).
        _ => None,
    };
    (cond.values.is_empty() || got.is_some_and(|g| cond.values.iter().any(|v| string_match(v, g))))
        && not_field(&cond.not_values, got)
}

/// Whether a rule matches a TCP connection, `deny` saying how to treat HTTP-only fields.
fn rule_matches(r: &Rule, c: &Connection<'_>, deny: bool) -> bool {
    if !deny && http_only(r) {
        return false;
    }
    (r.from.is_empty() || r.from.iter().any(|f| source_matches(&f.source, c)))
        && (r.to.is_empty() || r.to.iter().any(|t| operation_matches(&t.operation, c)))
        && r.when
            .iter()
            .filter(|w| !(deny && w.key.starts_with("request.")))
            .all(|w| condition_matches(w, c))
}

impl Compiled {
    fn matches(&self, c: &Connection<'_>, deny: bool) -> bool {
        self.rules.iter().any(|r| rule_matches(r, c, deny))
    }
}

impl Authorizer {
    /// The policies in `policies` that select `w`.
    pub fn for_workload(policies: &[std::sync::Arc<Policy>], w: &Workload) -> Authorizer {
        let mut a = Authorizer::default();
        for p in policies.iter().filter(|p| p.applies_to(w)) {
            let PolicyRule::Authorization(authz) = &p.rule else {
                continue;
            };
            let c = Compiled {
                name: format!("{}/{}", p.namespace, p.name),
                dry_run: authz.dry_run,
                rules: authz.rules.clone(),
            };
            match authz.action {
                AuthzAction::Deny => a.deny.push(c),
                AuthzAction::Allow => a.allow.push(c),
                AuthzAction::Audit => a.audit.push(c),
            }
        }
        a
    }

    pub fn is_empty(&self) -> bool {
        self.deny.is_empty() && self.allow.is_empty() && self.audit.is_empty()
    }

    /// The decision for one connection, in Istio's order.
    pub fn check(&self, c: &Connection<'_>) -> Decision {
        for p in self.audit.iter().filter(|p| p.matches(c, false)) {
            tracing::info!(policy = %p.name, source = %c.source, "audit: connection matches");
        }
        for p in self.deny.iter().filter(|p| p.matches(c, true)) {
            if p.dry_run {
                tracing::info!(policy = %p.name, source = %c.source, "dry-run: would deny");
                continue;
            }
            return Decision::Deny(p.name.clone());
        }
        let enforced: Vec<&Compiled> = self.allow.iter().filter(|p| !p.dry_run).collect();
        for p in self.allow.iter().filter(|p| p.dry_run) {
            if !p.matches(c, false) {
                tracing::info!(policy = %p.name, source = %c.source, "dry-run: no ALLOW rule matches");
            }
        }
        if enforced.is_empty() || enforced.iter().any(|p| p.matches(c, false)) {
            Decision::Allow
        } else {
            Decision::Deny("no ALLOW policy matches".into())
        }
    }
}

#[cfg(test)]
mod tests;
