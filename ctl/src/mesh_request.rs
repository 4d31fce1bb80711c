//! `explain --request … --from <namespace>/<pod>`: what the mesh does with a request a pod's app
//! sends — where its sidecar sends it (the Service, the mesh route, the backends) and whether
//! the sidecar of each pod it may reach lets it in (AuthorizationPolicies, as that sidecar
//! judges them: per request or per connection, with the request's JWT as its
//! RequestAuthentications validate it). Both answers come from ferrum-dp's own index, router,
//! authenticator and authorizer, compiled for each pod as its sidecar would compile them.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use ferrum_dp::compile::Compiled;
use ferrum_dp::mesh::index::Destination;
use ferrum_dp::mesh::policy::{Connection, Decision};
use ferrum_snapshot::identity::SpiffeId;
use ferrum_snapshot::mesh::{MeshService, Workload};
use ferrum_snapshot::model::{Action, Route};
use ferrum_snapshot::{Secrets, Snapshot};

use crate::request::{Request, compile_as, http_parts};

/// What happens to `req` sent by pod `from` (`namespace/name`) under `snap`, as text; `Err` for
/// an unknown pod or a configuration that does not compile.
pub fn explain(
    snap: Snapshot,
    secrets: &Secrets,
    req: &Request,
    from: &str,
    trust_domain: &str,
) -> Result<String, String> {
    let (ns, pod) = from
        .split_once('/')
        .ok_or_else(|| format!("--from {from:?}: want <namespace>/<pod>"))?;
    let client = find_pod(&snap, ns, pod).ok_or_else(|| format!("no pod {from} in the manifests"))?;
    let id = client.identity(trust_domain);
    let client_ip: IpAddr = client
        .ips
        .iter()
        .find_map(|ip| ip.parse().ok())
        .ok_or_else(|| format!("pod {from} has no IP yet"))?;
    let mut out = String::new();
    let _ = writeln!(out, "from pod {from} ({id}, {client_ip})");
    let Some(dst) = destination(&snap, req, ns) else {
        let _ = writeln!(
            out,
            "{:?} is no Service or pod of the mesh: its sidecar passes the connection through to what DNS answers",
            req.host
        );
        return Ok(out);
    };
    let compiled = compile_as(snap.clone(), secrets, Some((ns.into(), pod.into())))?;
    let targets = match compiled.mesh.destination(dst) {
        Destination::Service(t) => {
            let _ = writeln!(out, "to service {} at {dst}", t.service.key);
            routed(&compiled, &snap, req, dst, &mut out)
                .unwrap_or_else(|| t.endpoints.iter().map(|(a, _)| *a).collect())
        }
        Destination::Workload(w) => {
            let _ = writeln!(out, "to pod {}/{} at {dst}", w.namespace, w.name);
            vec![dst]
        }
        Destination::Passthrough => {
            let _ = writeln!(out, "{dst} is outside the mesh: passed through as is");
            return Ok(out);
        }
        Destination::Blocked => {
            let _ = writeln!(
                out,
                "{dst} is outside the mesh and the pod's Sidecar is REGISTRY_ONLY: refused"
            );
            return Ok(out);
        }
    };
    for at in targets {
        let Destination::Workload(w) = compiled.mesh.destination(at) else {
            let _ = writeln!(out, "endpoint {at}: no pod of the mesh (plain TCP, nothing judges it)");
            continue;
        };
        let verdict = inbound(&snap, secrets, w, &id, client, client_ip, at, req)?;
        let _ = writeln!(out, "pod {}/{} at {at}: {verdict}", w.namespace, w.name);
    }
    Ok(out)
}

fn find_pod<'a>(snap: &'a Snapshot, ns: &str, name: &str) -> Option<&'a Workload> {
    snap.workloads
        .iter()
        .find(|w| w.namespace == ns && w.name == name)
        .map(|w| &**w)
}

/// The address the app connects to: an IP as given, else the VIP of the Service the host names
/// as a pod in `ns` resolves it (`svc`, `svc.ns`, `svc.ns.svc`, the full name).
fn destination(snap: &Snapshot, req: &Request, ns: &str) -> Option<SocketAddr> {
    if let Ok(ip) = req.host.trim_matches(|c| c == '[' || c == ']').parse::<IpAddr>() {
        return Some(SocketAddr::new(ip, req.port));
    }
    let host = req.host.trim_end_matches('.').to_ascii_lowercase();
    let names = [
        format!("{host}.{ns}.svc.cluster.local"),
        format!("{host}.svc.cluster.local"),
        format!("{host}.cluster.local"),
        host,
    ];
    let named = |s: &&std::sync::Arc<MeshService>| names.iter().any(|n| s.hostname.eq_ignore_ascii_case(n));
    let vip = snap
        .services
        .iter()
        .find(named)?
        .vips
        .iter()
        .find_map(|v| v.parse().ok())?;
    Some(SocketAddr::new(vip, req.port))
}

/// The client sidecar's mesh route for `req` to `dst`, written to `out`, and the endpoints its
/// backends have; `None` when the port has no mesh routes (balanced at L4).
fn routed(
    compiled: &Compiled,
    snap: &Snapshot,
    req: &Request,
    dst: SocketAddr,
    out: &mut String,
) -> Option<Vec<SocketAddr>> {
    let Some(l) = compiled.mesh.http(dst) else {
        let _ = writeln!(
            out,
            "no mesh route on port {}: connections are balanced over its endpoints",
            dst.port()
        );
        return None;
    };
    let vh = l.hosts.find(&req.host)?;
    let Some(r) = vh.find(&req.method, &req.path, req.query.as_deref(), &req.headers) else {
        let _ = writeln!(out, "no mesh route matches: 404");
        return Some(Vec::new());
    };
    let _ = writeln!(out, "route {}", r.name);
    let route = mesh_route(snap, &r.name)?;
    let _ = writeln!(out, "  -> {}", crate::explain::action(route));
    let clusters: BTreeSet<&str> = route.clusters().collect();
    let endpoints = clusters
        .iter()
        .filter_map(|c| snap.cluster(c))
        .flat_map(|c| &c.endpoints)
        .filter_map(|e| Some(SocketAddr::new(e.address.parse().ok()?, e.port)));
    Some(endpoints.collect())
}

/// The mesh route named `name`, as the snapshot says it.
fn mesh_route<'a>(snap: &'a Snapshot, name: &str) -> Option<&'a Route> {
    let route = snap
        .services
        .iter()
        .flat_map(|s| s.all_routes())
        .find(|r| r.name == name)?;
    matches!(route.action, Action::Forward(_) | Action::Redirect(_)).then_some(&**route)
}

/// What the sidecar of pod `w` decides about the client's request arriving at `at`.
#[allow(clippy::too_many_arguments)]
fn inbound(
    snap: &Snapshot,
    secrets: &Secrets,
    w: &Workload,
    id: &SpiffeId,
    client: &Workload,
    client_ip: IpAddr,
    at: SocketAddr,
    req: &Request,
) -> Result<String, String> {
    let mesh = w.hbone && client.hbone;
    if !w.hbone {
        return Ok("not in the mesh: no sidecar judges it".into());
    }
    let compiled = compile_as(snap.clone(), secrets, Some((w.namespace.clone(), w.name.clone())))?;
    let policies = &compiled.mesh.inbound;
    let authn = &compiled.mesh.authn;
    // A RequestAuthentication switches the sidecar to judging requests, as policies on HTTP do.
    let per_request = policies.needs_http() || !authn.is_empty();
    let how = if mesh { "over HBONE" } else { "in plaintext" };
    let mut parts = http_parts(req, &req.path);
    let jwt = match authn.authenticate(&mut parts) {
        Ok(jwt) => jwt,
        Err(refused) => {
            return Ok(format!(
                "token refused by its RequestAuthentication ({}): 401 ({how})",
                refused.0
            ));
        }
    };
    let c = Connection {
        peer: mesh.then_some(id),
        source: client_ip,
        remote: client_ip,
        destination: at,
        request: per_request.then_some(&parts),
        auth: jwt.as_ref(),
    };
    let mut verdict = String::new();
    if let Some(p) = policies.asks(&c) {
        let _ = write!(
            verdict,
            "asks external authorization provider {:?} first; if it allows: ",
            p.spec.provider
        );
    }
    let _ = match (policies.check(&c), per_request) {
        (Decision::Allow, _) => write!(verdict, "allowed ({how})"),
        (Decision::Deny(why), true) => write!(verdict, "denied by {why}: 403 ({how}, judged per request)"),
        (Decision::Deny(why), false) if mesh => write!(verdict, "denied by {why}: the tunnel is refused (401)"),
        (Decision::Deny(why), false) => write!(verdict, "denied by {why}: the connection is closed"),
    };
    Ok(verdict)
}
