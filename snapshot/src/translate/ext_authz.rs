//! Istio `CUSTOM` authorization: the MeshConfig `extensionProviders` that AuthorizationPolicies
//! name, each resolved to the cluster that reaches its service.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::backends::{BackendRef, Clusters};
use super::destination_rule::service_of;
use crate::crd::ExtensionProvider;
use crate::istio::AuthorizationPolicySpec;
use crate::mesh::{ExtAuthz, MeshService};
use crate::model::Digest;
use crate::resources::Resources;
use crate::translate::Reason;
use crate::validate::MAX_EXT_AUTHZ_TIMEOUT_MS;

/// The providers CUSTOM policies name, by name: resolved, or why not.
pub(crate) type Providers = BTreeMap<String, Result<ExtAuthz, (Reason, String)>>;

/// The provider a policy names (`spec.provider.name`).
pub(crate) fn provider_name(spec: &AuthorizationPolicySpec) -> Option<&str> {
    spec.provider.as_ref()?.get("name")?.as_str()
}

/// Resolves every provider a CUSTOM AuthorizationPolicy names, adding its cluster.
pub(crate) fn resolve(
    res: &Resources,
    entries: &[(Arc<MeshService>, Digest)],
    clusters: &mut Clusters<'_>,
) -> Providers {
    let named: BTreeSet<&str> = res
        .authorization_policies
        .iter()
        .filter(|p| p.spec.action.as_deref() == Some("CUSTOM"))
        .filter_map(|p| provider_name(&p.spec))
        .collect();
    if named.is_empty() {
        return Providers::new();
    }
    let declared = super::backends::mesh_config(res).map_or(&[][..], |m| m.spec.extension_providers.as_slice());
    named
        .into_iter()
        .map(|name| {
            let resolved = match declared.iter().find(|p| p.name == name) {
                Some(p) => provider(p, entries, clusters),
                None => Err((
                    Reason::BackendNotFound,
                    format!(
                        "MeshConfig {}/default has no extensionProviders entry {name:?}",
                        crate::ROOT_NAMESPACE
                    ),
                )),
            };
            (name.to_string(), resolved)
        })
        .collect()
}

fn provider(
    p: &ExtensionProvider,
    entries: &[(Arc<MeshService>, Digest)],
    clusters: &mut Clusters<'_>,
) -> Result<ExtAuthz, (Reason, String)> {
    let Some(h) = &p.envoy_ext_authz_http else {
        let why = match p.envoy_ext_authz_grpc {
            Some(_) => "envoyExtAuthzGrpc is not supported yet (use envoyExtAuthzHttp)",
            None => "it is not an authorization provider (envoyExtAuthzHttp)",
        };
        return Err((
            Reason::UnsupportedValue,
            format!("extensionProviders {:?}: {why}", p.name),
        ));
    };
    let bad = |field: &str, why: String| {
        (
            Reason::Invalid,
            format!("extensionProviders {:?}: envoyExtAuthzHttp.{field}: {why}", p.name),
        )
    };
    let port = match &h.port {
        IntOrString::Int(n) => u16::try_from(*n).ok(),
        IntOrString::String(s) => s.parse().ok(),
    }
    .filter(|p| *p != 0)
    .ok_or_else(|| bad("port", "must be 1-65535".into()))?;
    let timeout_ms = match &h.timeout {
        None => MAX_EXT_AUTHZ_TIMEOUT_MS,
        Some(t) => super::istio_duration_ms(t).map_err(|e| bad("timeout", e))?,
    };
    if timeout_ms == 0 || timeout_ms > MAX_EXT_AUTHZ_TIMEOUT_MS {
        return Err(bad(
            "timeout",
            format!("must be above 0 and at most {MAX_EXT_AUTHZ_TIMEOUT_MS} ms"),
        ));
    }
    let status_on_error = match &h.status_on_error {
        None => 403,
        Some(s) => s
            .trim()
            .parse::<u16>()
            .ok()
            .filter(|c| (200..=599).contains(c))
            .ok_or_else(|| bad("statusOnError", format!("{s:?} is not a status 200-599")))?,
    };
    let path_prefix = h.path_prefix.clone().unwrap_or_default();
    if !path_prefix.is_empty() && (!path_prefix.starts_with('/') || path_prefix.contains(['?', '#'])) {
        return Err(bad("pathPrefix", "must start with '/' and have no query".into()));
    }
    let lower = |v: &[String]| v.iter().map(|h| h.to_ascii_lowercase()).collect();
    Ok(ExtAuthz {
        provider: p.name.clone(),
        cluster: cluster_of(&h.service, port, entries, clusters)?,
        timeout_ms,
        path_prefix,
        include_request_headers: lower(&h.include_request_headers_in_check),
        headers_to_upstream_on_allow: lower(&h.headers_to_upstream_on_allow),
        headers_to_downstream_on_deny: lower(&h.headers_to_downstream_on_deny),
        fail_open: h.fail_open,
        status_on_error,
    })
}

/// The cluster of `host:port`: a ServiceEntry host's, else a Service's (its FQDN, or
/// `name.namespace`).
fn cluster_of(
    host: &str,
    port: u16,
    entries: &[(Arc<MeshService>, Digest)],
    clusters: &mut Clusters<'_>,
) -> Result<String, (Reason, String)> {
    let host = host.to_ascii_lowercase();
    if let Some((entry, _)) = entries.iter().find(|(s, _)| s.hostname == host) {
        return clusters.entry(entry, port);
    }
    let Some((ns, name)) = service_of(&host, crate::ROOT_NAMESPACE) else {
        return Err((
            Reason::BackendNotFound,
            format!("{host:?} is neither a Service of this cluster nor a ServiceEntry host"),
        ));
    };
    let target = BackendRef {
        group: "",
        kind: "Service",
        namespace: ns,
        name,
        port: Some(port.into()),
    };
    clusters.resolve("MeshConfig", ns, &target)
}
