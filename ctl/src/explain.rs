//! `explain`: the snapshot these manifests produce, readable — per listener and host the route
//! table in match order (the first that matches wins), per cluster its endpoints.

use std::fmt::Write as _;
use std::path::PathBuf;

use ferrum_snapshot::model::{Action, Cluster, PathMatch, PathRewrite, Route, StringMatch};
use ferrum_snapshot::resources::LoadError;
use ferrum_snapshot::translate::{JwksFetch, Options};
use ferrum_snapshot::{Resources, Snapshot, translate};

/// The snapshot the operator would make once these manifests are applied over `cluster` (its
/// objects), and the `namespace/name/` prefixes of the manifests' route objects.
pub fn applied_over(
    mut cluster: Resources,
    files: &[PathBuf],
) -> Result<(Snapshot, std::collections::BTreeSet<String>), LoadError> {
    let res = Resources::from_paths(files)?;
    let scope = res
        .origins
        .keys()
        .filter(|o| matches!(o.kind, "HTTPRoute" | "GRPCRoute" | "TLSRoute" | "TCPRoute"))
        .map(|o| format!("{}/{}/", o.namespace, o.name))
        .collect();
    cluster.overlay(res);
    let opts = Options {
        controller_name: Some("ferrum.dev/gateway-controller".into()),
        gateway: None,
    };
    Ok((translate(&cluster, 1, &opts).snapshot, scope))
}

/// The translation of these manifests in file mode (every Gateway served), with its secrets,
/// and the mesh's trust domain (the MeshConfig's; `cluster.local` without one). The JWKS that
/// RequestAuthentications name by `jwksUri` are fetched first and put inline, as the operator
/// does, so tokens are judged with the keys a sidecar would be sent; one that cannot be
/// fetched is said on stderr (its tokens are refused, as by a sidecar).
pub fn translation(files: &[PathBuf]) -> Result<(ferrum_snapshot::Translation, String), LoadError> {
    let mut res = Resources::from_paths(files)?;
    res.jwks = crate::block_on(ferrum_dp::mesh::jwt::Fetched::default().first_fetches(&res));
    for (uri, got) in res.jwks.iter() {
        if let JwksFetch::Failed(why) = got {
            eprintln!("ferrumctl: cannot fetch {uri}: {why}");
        }
    }
    let trust_domain = ferrum_snapshot::translate::mesh_config(&res)
        .map_or_else(|| "cluster.local".to_string(), |m| m.spec.trust_domain.clone());
    Ok((translate(&res, 1, &Options::default()), trust_domain))
}

pub fn snapshot(files: &[PathBuf]) -> Result<Snapshot, LoadError> {
    let res = Resources::from_paths(files)?;
    // What a proxy would be sent (snapshots name secrets, never hold their keys).
    Ok(translate(&res, 1, &Options::default()).snapshot)
}

pub fn text(s: &Snapshot) -> String {
    let mut out = String::new();
    for l in &s.listeners {
        let _ = writeln!(out, "listener {}:{} ({:?})", l.address, l.port, l.protocol);
        for vh in &l.virtual_hosts {
            let _ = writeln!(out, "  host {}", vh.hostname);
            for (i, r) in vh.routes.iter().enumerate() {
                let _ = writeln!(out, "    {}. {} -> {}   [{}]", i + 1, matcher(r), action(r), r.name);
            }
        }
    }
    for c in &s.clusters {
        cluster(&mut out, c);
    }
    out
}

fn matcher(r: &Route) -> String {
    let m = &r.matcher;
    let mut parts = vec![match &m.path {
        PathMatch::Exact(p) => format!("path = {p}"),
        PathMatch::Prefix(p) => format!("path prefix {p}"),
        PathMatch::Regex(p) => format!("path ~ {p}"),
    }];
    if let Some(method) = &m.method {
        parts.push(format!("method {method}"));
    }
    let value = |v: &StringMatch| match v {
        StringMatch::Exact(x) => format!("= {x}"),
        StringMatch::Regex(x) => format!("~ {x}"),
    };
    parts.extend(
        m.headers
            .iter()
            .map(|h| format!("header {} {}", h.name, value(&h.value))),
    );
    parts.extend(
        m.query_params
            .iter()
            .map(|q| format!("query {} {}", q.name, value(&q.value))),
    );
    parts.join(", ")
}

pub(crate) fn action(r: &Route) -> String {
    match &r.action {
        Action::Redirect(rd) => {
            let mut s = format!("redirect {}", rd.status);
            if let Some(scheme) = &rd.scheme {
                let _ = write!(s, " scheme {scheme}");
            }
            if let Some(host) = &rd.hostname {
                let _ = write!(s, " host {host}");
            }
            match &rd.path {
                Some(PathRewrite::Full(p)) => {
                    let _ = write!(s, " path {p}");
                }
                Some(PathRewrite::Prefix(p)) => {
                    let _ = write!(s, " prefix {p}");
                }
                None => {}
            }
            s
        }
        Action::Forward(targets) => {
            let total: u64 = targets.iter().map(|t| u64::from(t.weight)).sum();
            targets
                .iter()
                .map(|t| {
                    let share = (u64::from(t.weight) * 100).checked_div(total).unwrap_or(0);
                    match &t.cluster {
                        Some(c) => format!("{c} ({share}%)"),
                        None => format!("500 unresolved backend ({share}%)"),
                    }
                })
                .collect::<Vec<_>>()
                .join(", ")
        }
    }
}

fn cluster(out: &mut String, c: &Cluster) {
    let _ = writeln!(out, "cluster {} ({:?}, {:?})", c.name, c.lb, c.protocol);
    if c.endpoints.is_empty() {
        let _ = writeln!(out, "  no endpoints");
    }
    for e in &c.endpoints {
        let state = if e.ready { "ready" } else { "not ready" };
        let _ = writeln!(out, "  {}:{} weight {} {state}", e.address, e.port, e.weight);
    }
}
