//! Writes the Gateway API status conditions (computed by `ferrum_snapshot::status`) back to the
//! cluster: only by the leader and only when something other than a timestamp changed.

use ferrum_snapshot::status::{
    backend_status, cond, gateway_status, mesh_config_status, policy_status, request_authentication_status,
    route_status,
};
use ferrum_snapshot::translate::Translation;
use ferrum_snapshot::{CONTROLLER_NAME, Resources};
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
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
    let mut w = Writer { client, written: 0 };
    for gw in &res.gateways {
        let obj = ferrum_snapshot::translate::meta_ref("Gateway", &gw.metadata);
        if t.gateways.contains(&obj) {
            w.write(&**gw, &gw.status, gateway_status(gw, t)).await;
        }
    }
    for gc in res
        .gateway_classes
        .iter()
        .filter(|c| c.spec.controller_name == CONTROLLER_NAME)
    {
        let status =
            json!({"conditions": [cond("Accepted", true, "Accepted", "handled by Ferrum", gc.metadata.generation)]});
        w.write(&**gc, &gc.status, status).await;
    }
    for r in &res.http_routes {
        w.write(&**r, &r.status, route_status("HTTPRoute", r, t, &t.gateways, res))
            .await;
    }
    // Other route kinds are read as the HTTPRoutes they mean; one that cannot be has its problem
    // listed on /problems.
    macro_rules! routes {
        ($($field:ident: $kind:literal by $read:path),+) => {$(
            for g in &res.$field {
                if let Ok(r) = $read(g) {
                    w.write(&**g, &g.status, route_status($kind, &r, t, &t.gateways, res)).await;
                }
            }
        )+};
    }
    use ferrum_snapshot::translate::{as_http_route, tcp_as_http_route, tls_as_http_route};
    routes!(
        grpc_routes: "GRPCRoute" by as_http_route,
        tls_routes: "TLSRoute" by tls_as_http_route,
        tcp_routes: "TCPRoute" by tcp_as_http_route
    );
    for b in &res.backends {
        w.write(&**b, &b.status, backend_status(b, t)).await;
    }
    for m in &res.mesh_configs {
        w.write(&**m, &m.status, mesh_config_status(m, t)).await;
    }
    for p in &res.authorization_policies {
        w.write(&**p, &p.status, policy_status("AuthorizationPolicy", &p.metadata, t))
            .await;
    }
    for p in &res.peer_authentications {
        w.write(&**p, &p.status, policy_status("PeerAuthentication", &p.metadata, t))
            .await;
    }
    for p in &res.request_authentications {
        w.write(&**p, &p.status, request_authentication_status(p, t, &res.jwks))
            .await;
    }
    for s in &res.sidecars {
        w.write(&**s, &s.status, policy_status("Sidecar", &s.metadata, t)).await;
    }
    w.written
}

/// The one status writer: a merge patch of `/status`, only when more than timestamps changed.
struct Writer<'a> {
    client: &'a Client,
    written: usize,
}

impl Writer<'_> {
    /// Writes `new` as `obj`'s status unless `old` (its status as read) already says it. Only
    /// the status is serialised to compare: every object is looked at after every generation
    /// (10,000 routes), and its status is a small part of it.
    async fn write<K, S>(&mut self, obj: &K, old: &Option<S>, mut new: Value)
    where
        K: Resource<DynamicType = ()>,
        S: Serialize,
    {
        let old = old
            .as_ref()
            .and_then(|s| serde_json::to_value(s).ok())
            .unwrap_or(Value::Null);
        carry_transition_times(&mut new, &old);
        if !differs(&new, &old) {
            return;
        }
        let ar = ApiResource::erase::<K>(&());
        let api: Api<DynamicObject> = match obj.namespace() {
            Some(ns) => Api::namespaced_with(self.client.clone(), &ns, &ar),
            None => Api::all_with(self.client.clone(), &ar),
        };
        let patch = Patch::Merge(json!({ "status": new }));
        match api.patch_status(&obj.name_any(), &PatchParams::default(), &patch).await {
            Ok(_) => self.written += 1,
            Err(e) => tracing::warn!(kind = %K::kind(&()), name = %obj.name_any(), error = %e, "status write failed"),
        }
    }
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
