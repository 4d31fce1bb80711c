//! Status conditions, the way the Gateway API specifies them, from one translation: Gateway
//! `Accepted`/`Programmed` and per-listener conditions with `attachedRoutes` and
//! `supportedKinds`; route `parents[]` with `Accepted` and `ResolvedRefs`. Pure functions: the
//! operator writes them to the cluster, file mode shows them at `/config`.

use gateway_api::gateways::{Gateway, GatewayListeners, GatewayListenersAllowedRoutesKinds};
use gateway_api::httproutes::HttpRoute;
use kube::ResourceExt;
use serde_json::{Value, json};

use crate::translate::{Problem, Reason, Translation};
use crate::{CONTROLLER_NAME, ObjectRef, Resources};

pub fn now() -> String {
    let t = k8s_openapi::jiff::Timestamp::now();
    k8s_openapi::jiff::Timestamp::from_second(t.as_second()).map_or_else(|_| t.to_string(), |t| t.to_string())
}

/// Condition `kind` with status `ok` for problem `p`: its reason, and its field and message.
fn problem_cond(kind: &str, ok: bool, p: &Problem, generation: Option<i64>) -> Value {
    cond(
        kind,
        ok,
        p.reason.as_str(),
        &format!("{}: {}", p.field, p.message),
        generation,
    )
}

pub fn cond(kind: &str, ok: bool, reason: &str, message: &str, generation: Option<i64>) -> Value {
    json!({
        "type": kind,
        "status": if ok { "True" } else { "False" },
        "reason": reason,
        "message": message,
        "observedGeneration": generation.unwrap_or(0),
        "lastTransitionTime": now(),
    })
}

fn problems_of<'a>(t: &'a Translation, obj: &ObjectRef, prefix: &str) -> Vec<&'a Problem> {
    t.problems_of(obj)
        .iter()
        .filter(|p| {
            p.field == prefix
                || p.field.starts_with(&format!("{prefix}."))
                || p.field.starts_with(&format!("{prefix}["))
        })
        .collect()
}

pub fn gateway_status(gw: &Gateway, t: &Translation) -> Value {
    let obj = ObjectRef {
        kind: "Gateway",
        namespace: gw.namespace().unwrap_or_default(),
        name: gw.name_any(),
    };
    let generation = gw.metadata.generation;
    let mut listeners = Vec::new();
    let mut valid = 0;
    for (i, l) in gw.spec.listeners.iter().enumerate() {
        let ps = problems_of(t, &obj, &format!("spec.listeners[{i}]"));
        let attached = t
            .attachments
            .iter()
            .filter(|a| a.gateway == obj && a.listener == l.name)
            .map(|a| &a.route)
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        let ours = crate::translate::listeners_route_kinds(l);
        let (kinds, invalid_kinds) = supported_kinds(l, ours);
        let refs = ps
            .iter()
            .find(|p| matches!(p.reason, Reason::InvalidCertificateRef | Reason::RefNotPermitted));
        let conflict = ps.iter().find(|p| p.reason == Reason::ProtocolConflict);
        let other = ps.iter().find(|p| {
            !matches!(
                p.reason,
                Reason::InvalidCertificateRef | Reason::RefNotPermitted | Reason::ProtocolConflict
            )
        });
        let accepted = other.is_none() && conflict.is_none();
        let programmed = ps.is_empty();
        valid += usize::from(programmed);
        let msg = |p: Option<&&Problem>, ok: &str| p.map_or(ok.to_string(), |p| format!("{}: {}", p.field, p.message));
        listeners.push(json!({
            "name": l.name,
            "attachedRoutes": attached,
            "supportedKinds": kinds.iter().map(|k| json!({"group": crate::GATEWAY_GROUP, "kind": k})).collect::<Vec<_>>(),
            "conditions": [
                cond("Accepted", accepted, other.map_or(if conflict.is_some() { "ProtocolConflict" } else { "Accepted" }, |p| p.reason.as_str()), &msg(other.or(conflict), "listener accepted"), generation),
                match invalid_kinds {
                    Some(k) => cond("ResolvedRefs", false, "InvalidRouteKinds", &format!("route kind {k} is not supported on a {} listener ({})", l.protocol, ours.join(", ")), generation),
                    None => cond("ResolvedRefs", refs.is_none(), refs.map_or("ResolvedRefs", |p| p.reason.as_str()), &msg(refs, "references resolved"), generation),
                },
                cond("Conflicted", conflict.is_some(), if conflict.is_some() { "ProtocolConflict" } else { "NoConflicts" }, &msg(conflict, "no conflicts"), generation),
                cond("Programmed", programmed, if programmed { "Programmed" } else { "Invalid" }, if programmed { "listener programmed" } else { "listener is not valid" }, generation),
            ],
        }));
    }
    let gw_problems = problems_of(t, &obj, "spec.addresses[0]");
    let accepted = gw_problems.is_empty();
    let programmed = accepted && valid > 0;
    json!({
        "conditions": [
            cond("Accepted", accepted, if accepted { "Accepted" } else { "UnsupportedAddress" },
                 &gw_problems.first().map_or("accepted by ferrum.dev/gateway-controller".to_string(), |p| p.message.clone()), generation),
            cond("Programmed", programmed, if programmed { "Programmed" } else { "Invalid" },
                 if programmed { "served by Ferrum proxies" } else { "no valid listener" }, generation),
        ],
        "listeners": listeners,
    })
}

/// `route` is an HTTPRoute, or a GRPCRoute read as one (`kind` says which).
pub fn route_status(
    kind: &'static str,
    route: &HttpRoute,
    t: &Translation,
    served: &[ObjectRef],
    res: &Resources,
) -> Value {
    let obj = ObjectRef {
        kind,
        namespace: route.namespace().unwrap_or_default(),
        name: route.name_any(),
    };
    let generation = route.metadata.generation;
    let own = t.problems_of(&obj);
    let backend_problem = own.iter().find(|p| p.field.contains("backendRefs"));
    let rule_problem = own
        .iter()
        .find(|p| p.field.starts_with("spec.rules") && !p.field.contains("backendRefs"));
    let attachments = t.attachments.of(&obj);
    let mut parents = other_controllers_parents(route);
    for (i, p) in route.spec.parent_refs.iter().flatten().enumerate() {
        let gw = ObjectRef {
            kind: "Gateway",
            namespace: p.namespace.clone().unwrap_or_else(|| obj.namespace.clone()),
            name: p.name.clone(),
        };
        let exists = res
            .gateways
            .iter()
            .any(|g| g.namespace().as_deref() == Some(gw.namespace.as_str()) && g.name_any() == gw.name);
        // Parents of other controllers are theirs to report.
        if exists && !served.contains(&gw) {
            continue;
        }
        let attached = attachments.iter().any(|a| a.parent_ref == i);
        let parent_problem = problems_of(t, &obj, &format!("spec.parentRefs[{i}]"))
            .into_iter()
            .next();
        let conditions = parent_conditions(attached, parent_problem, backend_problem, rule_problem, generation);
        parents.push(json!({
            "controllerName": CONTROLLER_NAME,
            "parentRef": serde_json::to_value(p).unwrap_or_default(),
            "conditions": conditions,
        }));
    }
    json!({ "parents": parents })
}

/// A route's parents that other controllers report on, kept as they wrote them.
fn other_controllers_parents(route: &HttpRoute) -> Vec<Value> {
    route
        .status
        .as_ref()
        .map(|s| {
            s.parents
                .iter()
                .filter(|p| p.controller_name != CONTROLLER_NAME)
                .filter_map(|p| serde_json::to_value(p).ok())
                .collect()
        })
        .unwrap_or_default()
}

/// One parent's conditions: Accepted (attached, or why not), ResolvedRefs (the route's first
/// backend problem) and PartiallyInvalid when one of its rules is dropped.
fn parent_conditions(
    attached: bool,
    parent_problem: Option<&Problem>,
    backend_problem: Option<&Problem>,
    rule_problem: Option<&Problem>,
    generation: Option<i64>,
) -> Vec<Value> {
    let accepted = match (attached, parent_problem) {
        (true, _) => cond("Accepted", true, "Accepted", "route attached", generation),
        (false, Some(pp)) => cond("Accepted", false, pp.reason.as_str(), &pp.message, generation),
        (false, None) => cond(
            "Accepted",
            false,
            "NoMatchingParent",
            "no listener accepts the route",
            generation,
        ),
    };
    let resolved = match backend_problem {
        Some(bp) => problem_cond("ResolvedRefs", false, bp, generation),
        None => cond(
            "ResolvedRefs",
            true,
            "ResolvedRefs",
            "all references resolved",
            generation,
        ),
    };
    let mut conditions = vec![accepted, resolved];
    if let Some(rp) = rule_problem {
        conditions.push(problem_cond("PartiallyInvalid", true, rp, generation));
    }
    conditions
}

/// Route kinds a listener serves: those of `allowedRoutes.kinds` its protocol routes (`routed`;
/// all of them when it names none), and the first kind it names that it cannot route.
fn supported_kinds(l: &GatewayListeners, routed: &[&'static str]) -> (Vec<&'static str>, Option<String>) {
    let asked = l
        .allowed_routes
        .as_ref()
        .and_then(|a| a.kinds.as_deref())
        .unwrap_or_default();
    if asked.is_empty() {
        return (routed.to_vec(), None);
    }
    let ours = |k: &GatewayListenersAllowedRoutesKinds| {
        k.group.as_deref().is_none_or(|g| g == crate::GATEWAY_GROUP) && routed.contains(&k.kind.as_str())
    };
    let kinds = routed
        .iter()
        .copied()
        .filter(|r| asked.iter().any(|k| ours(k) && k.kind == *r))
        .collect();
    let invalid = asked.iter().find(|k| !ours(k)).map(|k| k.kind.clone());
    (kinds, invalid)
}

/// `Accepted` from an object's own problems (the first one is the reason), for the Ferrum kinds.
fn accepted(t: &Translation, obj: &ObjectRef, generation: Option<i64>, ok: &str) -> Value {
    // An unfetched JWKS leaves the policy in effect: it has a condition of its own.
    let leaves_out = |p: &&Problem| p.reason != Reason::JwksUnavailable;
    match t.problems_of(obj).iter().find(leaves_out) {
        Some(p) => problem_cond("Accepted", false, p, generation),
        None => cond("Accepted", true, "Accepted", ok, generation),
    }
}

/// A `Backend`: `Accepted` and its endpoint count (the printer columns).
pub fn backend_status(b: &crate::crd::Backend, t: &Translation) -> Value {
    let obj = crate::translate::meta_ref("Backend", &b.metadata);
    let generation = b.metadata.generation;
    json!({
        "observedGeneration": generation.unwrap_or(0),
        "endpoints": b.spec.endpoints.len(),
        "conditions": [accepted(t, &obj, generation, "backend accepted")],
    })
}

/// A `MeshConfig`: only `ferrum-system/default` is read; any other says so.
pub fn mesh_config_status(m: &crate::crd::MeshConfig, t: &Translation) -> Value {
    let obj = crate::translate::meta_ref("MeshConfig", &m.metadata);
    let generation = m.metadata.generation;
    let in_effect = m.metadata.namespace.as_deref() == Some(crate::ROOT_NAMESPACE) && m.name_any() == "default";
    let condition = if in_effect {
        accepted(t, &obj, generation, "mesh settings in effect")
    } else {
        cond(
            "Accepted",
            false,
            "Ignored",
            &format!("only the MeshConfig named default in {} is read", crate::ROOT_NAMESPACE),
            generation,
        )
    };
    json!({ "observedGeneration": generation.unwrap_or(0), "conditions": [condition] })
}

/// An Istio policy (AuthorizationPolicy, PeerAuthentication, RequestAuthentication, Sidecar):
/// `Accepted`, or the field and reason it was left out for.
pub fn policy_status(
    kind: &'static str,
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    t: &Translation,
) -> Value {
    let obj = crate::translate::meta_ref(kind, meta);
    let generation = meta.generation;
    json!({
        "observedGeneration": generation.unwrap_or(0),
        "conditions": [accepted(t, &obj, generation, "policy in effect")],
    })
}

/// A RequestAuthentication: `Accepted` as for the other policies and, when it names keys by
/// `jwksUri`, `ResolvedRefs`: whether the producer has fetched them (`Unknown` until the first
/// fetch ends; `False` with the URI and the reason while none has succeeded).
pub fn request_authentication_status(
    p: &crate::istio::RequestAuthentication,
    t: &Translation,
    jwks: &crate::translate::Jwks,
) -> Value {
    let mut status = policy_status("RequestAuthentication", &p.metadata, t);
    let generation = p.metadata.generation;
    let uris: Vec<&str> = p
        .spec
        .jwt_rules
        .iter()
        .filter(|r| r.jwks.is_none())
        .filter_map(|r| r.jwks_uri.as_deref())
        .collect();
    if uris.is_empty() {
        return status;
    }
    let obj = crate::translate::meta_ref("RequestAuthentication", &p.metadata);
    let failed: Vec<String> = t
        .problems_of(&obj)
        .iter()
        .filter(|p| p.reason == Reason::JwksUnavailable)
        .map(|p| format!("{}: {}", p.field, p.message))
        .collect();
    let fetched = |u: &&str| matches!(jwks.get(*u), Some(crate::translate::JwksFetch::Document(_)));
    let resolved = if !failed.is_empty() {
        cond(
            "ResolvedRefs",
            false,
            Reason::JwksUnavailable.as_str(),
            &failed.join("; "),
            generation,
        )
    } else if uris.iter().all(fetched) {
        cond(
            "ResolvedRefs",
            true,
            "ResolvedRefs",
            "every jwksUri is fetched",
            generation,
        )
    } else {
        let mut c = cond(
            "ResolvedRefs",
            false,
            "Pending",
            "fetching the jwksUri keys",
            generation,
        );
        c["status"] = "Unknown".into();
        c
    };
    status["conditions"]
        .as_array_mut()
        .expect("policy_status has conditions")
        .push(resolved);
    status
}

/// Every served object's status as the operator writes it, keyed `Kind namespace/name`:
/// Gateways and routes of every kind. File mode shows this at `/config`.
pub fn all(res: &Resources, t: &Translation) -> serde_json::Map<String, Value> {
    let mut out = serde_json::Map::new();
    for gw in &res.gateways {
        let obj = ObjectRef {
            kind: "Gateway",
            namespace: gw.namespace().unwrap_or_default(),
            name: gw.name_any(),
        };
        if t.gateways.contains(&obj) {
            out.insert(obj.to_string(), gateway_status(gw, t));
        }
    }
    for (kind, r) in crate::translate::routes_as_http(res) {
        // A route that cannot be read as one has its problem listed instead.
        let Ok(r) = r else { continue };
        let obj = ObjectRef {
            kind,
            namespace: r.namespace().unwrap_or_default(),
            name: r.name_any(),
        };
        out.insert(obj.to_string(), route_status(kind, &r, t, &t.gateways, res));
    }
    for b in &res.backends {
        out.insert(
            crate::translate::meta_ref("Backend", &b.metadata).to_string(),
            backend_status(b, t),
        );
    }
    for m in &res.mesh_configs {
        out.insert(
            crate::translate::meta_ref("MeshConfig", &m.metadata).to_string(),
            mesh_config_status(m, t),
        );
    }
    let authz = res
        .authorization_policies
        .iter()
        .map(|p| ("AuthorizationPolicy", &p.metadata));
    let peer = res
        .peer_authentications
        .iter()
        .map(|p| ("PeerAuthentication", &p.metadata));
    // File mode fetches jwksUri in the proxy, not here: `Accepted` only.
    let authn = res
        .request_authentications
        .iter()
        .map(|p| ("RequestAuthentication", &p.metadata));
    let sidecars = res.sidecars.iter().map(|s| ("Sidecar", &s.metadata));
    let rules = res.destination_rules.iter().map(|d| ("DestinationRule", &d.metadata));
    let backend_policies = res.backend_policies.iter().map(|p| ("BackendPolicy", &p.metadata));
    let rate_limits = res.rate_limit_policies.iter().map(|p| ("RateLimitPolicy", &p.metadata));
    let entries = res.service_entries.iter().map(|e| ("ServiceEntry", &e.metadata));
    let routed = res.virtual_services.iter().map(|v| ("VirtualService", &v.metadata));
    let outside = res.workload_entries.iter().map(|w| ("WorkloadEntry", &w.metadata));
    let traffic = rules
        .chain(backend_policies)
        .chain(rate_limits)
        .chain(entries)
        .chain(routed)
        .chain(outside);
    for (kind, meta) in authz.chain(peer).chain(authn).chain(sidecars).chain(traffic) {
        out.insert(
            crate::translate::meta_ref(kind, meta).to_string(),
            policy_status(kind, meta, t),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn translate(yaml: &str) -> (Resources, Translation) {
        let mut r = Resources::default();
        r.add_yaml("t.yaml", yaml).unwrap();
        let t = crate::translate(&r, 1, &Default::default());
        (r, t)
    }

    const BASE: &str = "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: gw, generation: 3}\n\
        spec: {gatewayClassName: ferrum, listeners: [{name: http, port: 80, protocol: HTTP, hostname: a.example.com}, {name: udp, port: 90, protocol: UDP}]}\n---\n\
        apiVersion: v1\nkind: Service\nmetadata: {name: echo}\nspec: {ports: [{port: 80}]}\n";

    fn cond_of<'a>(v: &'a Value, kind: &str) -> &'a Value {
        v["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == kind)
            .unwrap()
    }

    #[test]
    fn gateway_listeners_report_attached_routes_and_protocol_problems() {
        let (r, t) = translate(&format!(
            "{BASE}---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: ok}}\n\
             spec: {{parentRefs: [{{name: gw}}], rules: [{{backendRefs: [{{name: echo, port: 80}}]}}]}}\n"
        ));
        let s = gateway_status(&r.gateways[0], &t);
        assert_eq!(cond_of(&s, "Accepted")["status"], "True");
        assert_eq!(cond_of(&s, "Programmed")["status"], "True");
        assert_eq!(cond_of(&s, "Programmed")["observedGeneration"], 3);
        assert_eq!(s["listeners"][0]["attachedRoutes"], 1);
        assert_eq!(
            s["listeners"][0]["supportedKinds"],
            json!([{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute"}, {"group": "gateway.networking.k8s.io", "kind": "GRPCRoute"}])
        );
        assert_eq!(cond_of(&s["listeners"][1], "Accepted")["reason"], "UnsupportedProtocol");
        assert_eq!(s["listeners"][1]["attachedRoutes"], 0);
    }

    #[test]
    fn supported_kinds_follow_allowed_routes() {
        let (r, t) = translate(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: gw}\n\
             spec: {gatewayClassName: ferrum, listeners: [\
             {name: grpc, port: 80, protocol: HTTP, allowedRoutes: {kinds: [{kind: GRPCRoute}]}},\
             {name: bad, port: 81, protocol: HTTP, allowedRoutes: {kinds: [{kind: HTTPRoute}, {kind: TCPRoute}]}}]}\n",
        );
        let s = gateway_status(&r.gateways[0], &t);
        assert_eq!(
            s["listeners"][0]["supportedKinds"],
            json!([{"group": "gateway.networking.k8s.io", "kind": "GRPCRoute"}])
        );
        assert_eq!(cond_of(&s["listeners"][0], "ResolvedRefs")["status"], "True");
        assert_eq!(
            s["listeners"][1]["supportedKinds"],
            json!([{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute"}])
        );
        assert_eq!(
            cond_of(&s["listeners"][1], "ResolvedRefs")["reason"],
            "InvalidRouteKinds"
        );
    }

    #[test]
    fn route_parents_carry_the_spec_reasons() {
        let (r, t) = translate(&format!(
            "{BASE}---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r}}\n\
             spec: {{parentRefs: [{{name: gw}}, {{name: nogw}}], hostnames: [b.example.com, a.example.com], rules: [{{backendRefs: [{{name: missing, port: 80}}]}}]}}\n---\n\
             apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: wronghost}}\n\
             spec: {{parentRefs: [{{name: gw}}], hostnames: [c.example.com]}}\n"
        ));
        let s = route_status("HTTPRoute", &r.http_routes[0], &t, &t.gateways, &r);
        let parents = s["parents"].as_array().unwrap();
        assert_eq!(parents.len(), 2);
        assert_eq!(parents[0]["controllerName"], CONTROLLER_NAME);
        assert_eq!(cond_of(&parents[0], "Accepted")["status"], "True");
        assert_eq!(cond_of(&parents[0], "ResolvedRefs")["reason"], "BackendNotFound");
        assert_eq!(cond_of(&parents[1], "Accepted")["reason"], "NoMatchingParent");
        let s = route_status("HTTPRoute", &r.http_routes[1], &t, &t.gateways, &r);
        assert_eq!(
            cond_of(&s["parents"][0], "Accepted")["reason"],
            "NoMatchingListenerHostname"
        );
    }
}
