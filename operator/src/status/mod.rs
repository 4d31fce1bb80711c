//! Writes the Gateway API status conditions (computed by `ferrum_snapshot::status`) back to the
//! cluster: only by the leader and only when something other than a timestamp changed.

use std::collections::BTreeMap;

use ferrum_snapshot::status::{cond, gateway_status, route_status};
use ferrum_snapshot::translate::Translation;
use ferrum_snapshot::{CONTROLLER_NAME, ObjectRef, Resources};
use gateway_api::gatewayclasses::GatewayClass;
use gateway_api::gateways::Gateway;
use gateway_api::grpcroutes::GrpcRoute;
use gateway_api::httproutes::HttpRoute;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

/// Keeps the old `lastTransitionTime` of conditions whose status did not change.
fn carry_transition_times(new: &mut Value, old: &Value) {
    match (new, old) {
        (Value::Object(n), Value::Object(o)) => {
            if n.contains_key("lastTransitionTime")
                && n.get("type") == o.get("type")
                && n.get("status") == o.get("status")
                && let Some(t) = o.get("lastTransitionTime")
            {
                n.insert("lastTransitionTime".into(), t.clone());
            }
            for (k, v) in n.iter_mut() {
                if k != "lastTransitionTime"
                    && let Some(ov) = o.get(k)
                {
                    carry_transition_times(v, ov);
                }
            }
        }
        (Value::Array(n), Value::Array(o)) => {
            for (nv, ov) in n.iter_mut().zip(o) {
                carry_transition_times(nv, ov);
            }
        }
        _ => {}
    }
}

/// Writes every status that differs from what the objects carry. Returns how many were written.
pub async fn write_all(client: &Client, res: &Resources, t: &Translation) -> usize {
    let mut written = 0;
    let params = PatchParams::default();
    for gw in &res.gateways {
        let obj = ObjectRef {
            kind: "Gateway",
            namespace: gw.namespace().unwrap_or_default(),
            name: gw.name_any(),
        };
        if !t.gateways.contains(&obj) {
            continue;
        }
        let old = serde_json::to_value(&gw.status).unwrap_or(Value::Null);
        let mut new = gateway_status(gw, t);
        carry_transition_times(&mut new, &old);
        if differs(&new, &old) {
            let api: Api<Gateway> = Api::namespaced(client.clone(), &obj.namespace);
            match api
                .patch_status(&obj.name, &params, &Patch::Merge(json!({ "status": new })))
                .await
            {
                Ok(_) => written += 1,
                Err(e) => tracing::warn!(object = %obj, error = %e, "status write failed"),
            }
        }
    }
    let classes: Api<GatewayClass> = Api::all(client.clone());
    for gc in res
        .gateway_classes
        .iter()
        .filter(|c| c.spec.controller_name == CONTROLLER_NAME)
    {
        let old = serde_json::to_value(&gc.status).unwrap_or(Value::Null);
        let mut new =
            json!({"conditions": [cond("Accepted", true, "Accepted", "handled by Ferrum", gc.metadata.generation)]});
        carry_transition_times(&mut new, &old);
        if differs(&new, &old) {
            match classes
                .patch_status(&gc.name_any(), &params, &Patch::Merge(json!({ "status": new })))
                .await
            {
                Ok(_) => written += 1,
                Err(e) => tracing::warn!(class = %gc.name_any(), error = %e, "status write failed"),
            }
        }
    }
    let mut by_ns: BTreeMap<String, Api<HttpRoute>> = BTreeMap::new();
    for r in &res.http_routes {
        let ns = r.namespace().unwrap_or_default();
        let old = serde_json::to_value(&r.status).unwrap_or(Value::Null);
        let mut new = route_status("HTTPRoute", r, t, &t.gateways, res);
        carry_transition_times(&mut new, &old);
        if differs(&new, &old) {
            let api = by_ns
                .entry(ns.clone())
                .or_insert_with(|| Api::namespaced(client.clone(), &ns));
            match api
                .patch_status(&r.name_any(), &params, &Patch::Merge(json!({ "status": new })))
                .await
            {
                Ok(_) => written += 1,
                Err(e) => tracing::warn!(route = %r.name_any(), error = %e, "status write failed"),
            }
        }
    }
    for g in &res.grpc_routes {
        // A GRPCRoute that cannot be read as a route has its problem listed on /problems.
        let Ok(r) = ferrum_snapshot::translate::as_http_route(g) else {
            continue;
        };
        let ns = g.namespace().unwrap_or_default();
        let old = serde_json::to_value(&g.status).unwrap_or(Value::Null);
        let mut new = route_status("GRPCRoute", &r, t, &t.gateways, res);
        carry_transition_times(&mut new, &old);
        if differs(&new, &old) {
            let api: Api<GrpcRoute> = Api::namespaced(client.clone(), &ns);
            match api
                .patch_status(&g.name_any(), &params, &Patch::Merge(json!({ "status": new })))
                .await
            {
                Ok(_) => written += 1,
                Err(e) => tracing::warn!(route = %g.name_any(), error = %e, "status write failed"),
            }
        }
    }
    written
}

fn differs(new: &Value, old: &Value) -> bool {
    // Empty parents/listeners on both sides are no change.
    new != old
        && !(old.is_null()
            && new
                .get("parents")
                .is_some_and(|p| p.as_array().is_some_and(Vec::is_empty)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrum_snapshot::status::now;

    #[test]
    fn unchanged_conditions_keep_their_transition_time() {
        let mut old = json!({"conditions": [{"type": "Accepted", "status": "True", "lastTransitionTime": "2020-01-01T00:00:00Z"}]});
        let mut new = json!({"conditions": [{"type": "Accepted", "status": "True", "lastTransitionTime": now()}]});
        carry_transition_times(&mut new, &old);
        assert_eq!(new, old);
        old["conditions"][0]["status"] = "False".into();
        let mut new = json!({"conditions": [{"type": "Accepted", "status": "True", "lastTransitionTime": "x"}]});
        carry_transition_times(&mut new, &old);
        assert_eq!(new["conditions"][0]["lastTransitionTime"], "x");
    }
}
