//! Writes the Gateway API status conditions (computed by `ferrum_snapshot::status`) back to the
//! cluster: only by the leader and only when something other than a timestamp changed.

use ferrum_snapshot::status::{
    backend_status, cond, gateway_status, mesh_config_status, policy_status, request_authentication_status,
    route_status,
};
use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;

use ferrum_snapshot::translate::{Attachment, Problem, Translation, meta_ref};
use ferrum_snapshot::{CONTROLLER_NAME, ObjectRef, Resources};
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde_json::{Value, json};

/// The statuses found right by the last pass, by object. An object whose status depends only
/// on itself, its problems and its attachments, none of which changed since, is skipped: after
/// a one-route change of 10,000 a pass computes one route's status, not 10,000 (~40 ms of CPU
/// per generation, competing with the next translation).
#[derive(Default)]
pub struct Settled {
    /// What route status also reads: the Gateways served and the Gateways that exist. When
    /// either changes, nothing is settled.
    context: (Vec<ObjectRef>, Vec<ObjectRef>),
    pass: u64,
    by_object: HashMap<usize, SettledObject>,
}

struct SettledObject {
    /// Held, so that no other object takes its address while the entry lives.
    _object: Arc<dyn Any + Send + Sync>,
    problems: Vec<Problem>,
    attachments: Option<Arc<[Attachment]>>,
    seen: u64,
}

impl Settled {
    fn begin(&mut self, res: &Resources, t: &Translation) {
        let existing = res.gateways.iter().map(|g| meta_ref("Gateway", &g.metadata)).collect();
        let context = (t.gateways.clone(), existing);
        if context != self.context {
            self.by_object.clear();
            self.context = context;
        }
        self.pass += 1;
    }

    /// Whether `object`'s status was found right for the same problems and attachments.
    fn holds(&mut self, key: usize, problems: &[Problem], attachments: Option<&Arc<[Attachment]>>) -> bool {
        let pass = self.pass;
        self.by_object.get_mut(&key).is_some_and(|e| {
            let same = e.problems == problems
                && match (&e.attachments, attachments) {
                    (None, None) => true,
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                    _ => false,
                };
            if same {
                e.seen = pass;
            }
            same
        })
    }

    /// Notes that the status of `object` (at `key`) is right for these problems and attachments.
    fn settle(
        &mut self,
        key: usize,
        object: Arc<dyn Any + Send + Sync>,
        problems: &[Problem],
        attachments: Option<&Arc<[Attachment]>>,
    ) {
        let entry = SettledObject {
            _object: object,
            problems: problems.to_vec(),
            attachments: attachments.cloned(),
            seen: self.pass,
        };
        self.by_object.insert(key, entry);
    }

    fn end(&mut self) {
        let pass = self.pass;
        self.by_object.retain(|_, e| e.seen == pass);
    }
}

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

/// Writes every status that differs from what the objects carry, skipping those `settled`
/// says are still right. Returns how many were written.
pub async fn write_all(client: &Client, res: &Resources, t: &Translation, settled: &mut Settled) -> usize {
    settled.begin(res, t);
    let mut w = Writer {
        client,
        written: 0,
        settled,
        t,
    };
    w.gateways(res).await;
    w.routes(res).await;
    w.others(res).await;
    w.settled.end();
    w.written
}

/// The one status writer: a merge patch of `/status`, only when more than timestamps changed.
struct Writer<'a> {
    client: &'a Client,
    written: usize,
    settled: &'a mut Settled,
    t: &'a Translation,
}

impl Writer<'_> {
    /// The Gateways this controller serves, and its GatewayClasses.
    async fn gateways(&mut self, res: &Resources) {
        for gw in &res.gateways {
            let obj = ferrum_snapshot::translate::meta_ref("Gateway", &gw.metadata);
            if self.t.gateways.contains(&obj) {
                self.write(&**gw, &gw.status, gateway_status(gw, self.t)).await;
            }
        }
        for gc in res
            .gateway_classes
            .iter()
            .filter(|c| c.spec.controller_name == CONTROLLER_NAME)
        {
            let status = json!({"conditions": [cond("Accepted", true, "Accepted", "handled by Ferrum", gc.metadata.generation)]});
            self.write(&**gc, &gc.status, status).await;
        }
    }

    /// Every route kind's.
    async fn routes(&mut self, res: &Resources) {
        let t = self.t;
        for r in &res.http_routes {
            self.write_settled(r, "HTTPRoute", &r.status, || {
                Some(route_status("HTTPRoute", r, t, &t.gateways, res))
            })
            .await;
        }
        // Other route kinds are read as the HTTPRoutes they mean; one that cannot be has its problem
        // listed on /problems.
        macro_rules! routes {
            ($($field:ident: $kind:literal by $read:path),+) => {$(
                for g in &res.$field {
                    self.write_settled(g, $kind, &g.status, || {
                        $read(g).ok().map(|r| route_status($kind, &r, t, &t.gateways, res))
                    })
                    .await;
                }
            )+};
        }
        use ferrum_snapshot::translate::{as_http_route, tcp_as_http_route, tls_as_http_route};
        routes!(
            grpc_routes: "GRPCRoute" by as_http_route,
            tls_routes: "TLSRoute" by tls_as_http_route,
            tcp_routes: "TCPRoute" by tcp_as_http_route
        );
    }

    /// Backends, MeshConfigs, RequestAuthentications and the policies.
    async fn others(&mut self, res: &Resources) {
        let t = self.t;
        for b in &res.backends {
            self.write_settled(b, "Backend", &b.status, || Some(backend_status(b, t)))
                .await;
        }
        for m in &res.mesh_configs {
            self.write(&**m, &m.status, mesh_config_status(m, t)).await;
        }
        for p in &res.request_authentications {
            self.write(&**p, &p.status, request_authentication_status(p, t, &res.jwks))
                .await;
        }
        // Policies: `Accepted`, or the field and reason each was left out for.
        macro_rules! policies {
            ($($field:ident: $kind:literal),+) => {$(
                for p in &res.$field {
                    self.write_settled(p, $kind, &p.status, || Some(policy_status($kind, &p.metadata, t)))
                        .await;
                }
            )+};
        }
        policies!(
            backend_policies: "BackendPolicy",
            rate_limit_policies: "RateLimitPolicy",
            authorization_policies: "AuthorizationPolicy",
            peer_authentications: "PeerAuthentication",
            sidecars: "Sidecar",
            destination_rules: "DestinationRule",
            service_entries: "ServiceEntry",
            virtual_services: "VirtualService",
            workload_entries: "WorkloadEntry"
        );
    }

    /// [`Writer::write`] for an object whose status (`compute`d; `None`: it has none) depends
    /// only on itself, its problems and its attachments, unless [`Settled`] holds it.
    async fn write_settled<K, S>(
        &mut self,
        obj: &Arc<K>,
        kind: &'static str,
        old: &Option<S>,
        compute: impl FnOnce() -> Option<Value>,
    ) where
        K: Resource<DynamicType = ()> + Send + Sync + 'static,
        S: Serialize,
    {
        let key = Arc::as_ptr(obj) as usize;
        let name = meta_ref(kind, obj.meta());
        let (problems, attachments) = (self.t.problems_of(&name), self.t.attachments.group(&name));
        if self.settled.holds(key, problems, attachments) {
            return;
        }
        let Some(new) = compute() else { return };
        if self.write(&**obj, old, new).await {
            self.settled.settle(key, obj.clone(), problems, attachments);
        }
    }

    /// Writes `new` as `obj`'s status unless `old` (its status as read) already says it; `true`
    /// when the object's status is now `new` (written, or already so). Only the status is
    /// serialised to compare: every object is looked at after every generation (10,000 routes),
    /// and its status is a small part of it.
    async fn write<K, S>(&mut self, obj: &K, old: &Option<S>, mut new: Value) -> bool
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
            return true;
        }
        let ar = ApiResource::erase::<K>(&());
        let api: Api<DynamicObject> = match obj.namespace() {
            Some(ns) => Api::namespaced_with(self.client.clone(), &ns, &ar),
            None => Api::all_with(self.client.clone(), &ar),
        };
        let patch = Patch::Merge(json!({ "status": new }));
        match api.patch_status(&obj.name_any(), &PatchParams::default(), &patch).await {
            Ok(_) => {
                self.written += 1;
                true
            }
            Err(e) => {
                tracing::warn!(kind = %K::kind(&()), name = %obj.name_any(), error = %e, "status write failed");
                false
            }
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

    fn translation(gateways: &[&str]) -> Translation {
        Translation {
            snapshot: Default::default(),
            problems: vec![],
            attachments: Default::default(),
            gateways: gateways.iter().map(|n| gw(n)).collect(),
            digests: Default::default(),
            secrets: Default::default(),
        }
    }

    fn gw(name: &str) -> ObjectRef {
        ObjectRef {
            kind: "Gateway",
            namespace: "default".into(),
            name: name.into(),
        }
    }

    /// A status is skipped only for the same object with equal problems and the very same
    /// attachments; objects not looked at in a pass are forgotten; a change of the Gateways
    /// served forgets everything.
    #[test]
    fn a_settled_status_holds_only_while_its_inputs_are_the_same() {
        let (res, t) = (Resources::default(), translation(&["web"]));
        let mut s = Settled::default();
        s.begin(&res, &t);
        let group: Arc<[Attachment]> = vec![Attachment {
            route: ObjectRef {
                kind: "HTTPRoute",
                namespace: "default".into(),
                name: "shop".into(),
            },
            parent_ref: 0,
            gateway: gw("web"),
            listener: "http".into(),
        }]
        .into();
        assert!(!s.holds(1, &[], Some(&group)), "nothing is settled at first");
        s.settle(1, Arc::new(()), &[], Some(&group));
        assert!(s.holds(1, &[], Some(&group)));
        assert!(!s.holds(2, &[], Some(&group)), "another object");
        let equal_copy: Arc<[Attachment]> = group.to_vec().into();
        assert!(!s.holds(1, &[], Some(&equal_copy)), "attachments translated again");
        assert!(!s.holds(1, &[], None), "attachments lost");
        let problem = Problem {
            object: gw("web"),
            origin: None,
            field: "spec.rules[0]".into(),
            reason: ferrum_snapshot::translate::Reason::Invalid,
            message: "bad".into(),
        };
        assert!(
            !s.holds(1, std::slice::from_ref(&problem), Some(&group)),
            "a new problem"
        );
        s.end();
        assert!(s.holds(1, &[], Some(&group)), "looked at in this pass: kept");

        s.begin(&res, &t);
        s.end();
        s.begin(&res, &t);
        assert!(!s.holds(1, &[], Some(&group)), "not looked at in a pass: forgotten");

        s.settle(1, Arc::new(()), &[], Some(&group));
        s.begin(&res, &translation(&["web", "other"]));
        assert!(!s.holds(1, &[], Some(&group)), "the Gateways served changed");
    }
}
