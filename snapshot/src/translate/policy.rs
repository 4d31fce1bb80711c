//! AuthorizationPolicy objects → the snapshot's policies. CUSTOM and `targetRefs` are not
//! supported yet: such a policy is left out with a problem on the field, so the rest of the mesh
//! keeps its policies.

use std::sync::Arc;

use crate::istio::AuthorizationPolicy;
use crate::mesh::{AuthzAction, AuthzPolicy};
use crate::model::Digest;
use crate::resources::ObjectRef;
use crate::translate::{Problems, Reason, meta_ref};

/// The annotation that makes a policy dry-run.
pub const DRY_RUN: &str = "istio.io/dry-run";

pub(crate) fn build(
    policies: &[Arc<AuthorizationPolicy>],
    problems: &mut Problems<'_>,
) -> (Vec<Arc<AuthzPolicy>>, Vec<Digest>) {
    let mut out: Vec<Arc<AuthzPolicy>> = policies.iter().filter_map(|p| one(p, problems)).map(Arc::new).collect();
    out.sort_by(|a, b| a.key.cmp(&b.key));
    let digests = out.iter().map(|p| p.digest()).collect();
    (out, digests)
}

fn one(p: &AuthorizationPolicy, problems: &mut Problems<'_>) -> Option<AuthzPolicy> {
    let obj: ObjectRef = meta_ref("AuthorizationPolicy", &p.metadata);
    let spec = &p.spec;
    let action = match spec.action.as_deref().unwrap_or("ALLOW") {
        "ALLOW" => AuthzAction::Allow,
        "DENY" => AuthzAction::Deny,
        "AUDIT" => AuthzAction::Audit,
        "CUSTOM" => {
            problems.push(
                &obj,
                "spec.action",
                Reason::UnsupportedValue,
                "CUSTOM (external authorization) is not supported",
            );
            return None;
        }
        other => {
            problems.push(
                &obj,
                "spec.action",
                Reason::Invalid,
                format!("{other:?} is not ALLOW, DENY, AUDIT or CUSTOM"),
            );
            return None;
        }
    };
    if !spec.target_refs.is_empty() || spec.target_ref.is_some() {
        problems.push(
            &obj,
            "spec.targetRefs",
            Reason::UnsupportedValue,
            "targetRefs are not supported yet; use a selector",
        );
        return None;
    }
    let rules = spec.rules.clone().unwrap_or_default();
    for (i, r) in rules.iter().enumerate() {
        for (j, f) in r.from.iter().enumerate() {
            let s = &f.source;
            for (name, blocks) in [
                ("ipBlocks", &s.ip_blocks),
                ("notIpBlocks", &s.not_ip_blocks),
                ("remoteIpBlocks", &s.remote_ip_blocks),
                ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
            ] {
                if let Some(bad) = blocks.iter().find(|b| !valid_block(b)) {
                    let field = format!("spec.rules[{i}].from[{j}].source.{name}");
                    problems.push(
                        &obj,
                        field,
                        Reason::Invalid,
                        format!("{bad:?} is not an IP address or CIDR block"),
                    );
                    return None;
                }
            }
        }
        for (j, t) in r.to.iter().enumerate() {
            let o = &t.operation;
            if let Some(bad) = o.ports.iter().chain(&o.not_ports).find(|p| p.parse::<u16>().is_err()) {
                let field = format!("spec.rules[{i}].to[{j}].operation.ports");
                problems.push(&obj, field, Reason::Invalid, format!("{bad:?} is not a port number"));
                return None;
            }
        }
    }
    let ns = obj.namespace.clone();
    Some(AuthzPolicy {
        key: format!("{ns}/{}", obj.name),
        namespace: ns,
        selector: spec.selector.as_ref().map(|s| s.match_labels.clone()),
        action,
        rules,
        dry_run: p
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(DRY_RUN))
            .is_some_and(|v| v == "true"),
    })
}

fn valid_block(b: &str) -> bool {
    let (addr, prefix) = b.split_once('/').unwrap_or((b, ""));
    let Ok(ip) = addr.parse::<std::net::IpAddr>() else {
        return false;
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    prefix.is_empty() || prefix.parse::<u8>().is_ok_and(|p| p <= max)
}

#[cfg(test)]
mod tests {
    use crate::Resources;
    use crate::mesh::AuthzAction;
    use crate::translate::{Options, Reason, translate};

    #[test]
    fn policies_translate_and_unsupported_or_invalid_ones_are_reported_not_fatal() {
        let mut r = Resources::default();
        r.add_yaml(
            "p.yaml",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-web, namespace: shop, annotations: {istio.io/dry-run: 'true'}}\n\
             spec: {action: DENY, selector: {matchLabels: {app: cart}}, rules: [{from: [{source: {namespaces: [web]}}]}]}\n---\n\
             apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {name: nothing, namespace: shop}\nspec: {}\n---\n\
             apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ext, namespace: shop}\nspec: {action: CUSTOM, provider: {name: opa}, rules: [{}]}\n---\n\
             apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: bad-ip, namespace: shop}\nspec: {rules: [{from: [{source: {ipBlocks: [10.0.0.0/40]}}]}]}\n",
        )
        .unwrap();
        let t = translate(&r, 1, &Options::default());
        let keys: Vec<_> = t.snapshot.policies.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["shop/deny-web", "shop/nothing"]);
        let deny = &t.snapshot.policies[0];
        assert_eq!(
            (deny.action, deny.dry_run, deny.rules.len()),
            (AuthzAction::Deny, true, 1)
        );
        assert!(t.snapshot.policies[1].rules.is_empty(), "no rules: matches nothing");
        let problems: Vec<_> = t
            .problems
            .iter()
            .map(|p| (p.object.name.as_str(), p.field.as_str(), p.reason))
            .collect();
        assert_eq!(
            problems,
            [
                ("bad-ip", "spec.rules[0].from[0].source.ipBlocks", Reason::Invalid),
                ("ext", "spec.action", Reason::UnsupportedValue)
            ]
        );
        assert_eq!(t.snapshot.hash, t.snapshot.content_hash());
    }
}
