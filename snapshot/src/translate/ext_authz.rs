//! Istio `CUSTOM` authorization: the MeshConfig `extensionProviders` that AuthorizationPolicies
//! name, each resolved to the cluster that reaches its service.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::backends::{BackendRef, Clusters};
use super::destination_rule::service_of;
use crate::crd::{ExtAuthzHttpProvider, ExtensionProvider, RequestBodyInCheck};
use crate::istio::AuthorizationPolicySpec;
use crate::mesh::{BodyInCheck, ExtAuthz, ExtAuthzApi, MeshService};
use crate::model::Digest;
use crate::resources::Resources;
use crate::translate::Reason;
use crate::validate::{MAX_EXT_AUTHZ_BODY, MAX_EXT_AUTHZ_TIMEOUT_MS};

/// Why a provider cannot be used.
type Refusal = (Reason, String);

/// The providers CUSTOM policies name, by name: resolved, or why not.
pub(crate) type Providers = BTreeMap<String, Result<ExtAuthz, Refusal>>;

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

/// What both provider kinds say.
struct Common<'a> {
    /// `envoyExtAuthzHttp` or `envoyExtAuthzGrpc`, for messages.
    kind: &'static str,
    api: ExtAuthzApi,
    provider: &'a str,
    service: &'a str,
    port: &'a IntOrString,
    timeout: Option<&'a str>,
    fail_open: bool,
    status_on_error: Option<&'a str>,
    body: Option<&'a RequestBodyInCheck>,
}

impl<'a> Common<'a> {
    fn of(p: &'a ExtensionProvider) -> Result<Self, Refusal> {
        match (&p.envoy_ext_authz_http, &p.envoy_ext_authz_grpc) {
            (Some(h), _) => Ok(Common {
                kind: "envoyExtAuthzHttp",
                api: ExtAuthzApi::Http,
                provider: &p.name,
                service: &h.service,
                port: &h.port,
                timeout: h.timeout.as_deref(),
                fail_open: h.fail_open,
                status_on_error: h.status_on_error.as_deref(),
                body: h.include_request_body_in_check.as_ref(),
            }),
            (None, Some(g)) => Ok(Common {
                kind: "envoyExtAuthzGrpc",
                api: ExtAuthzApi::Grpc,
                provider: &p.name,
                service: &g.service,
                port: &g.port,
                timeout: g.timeout.as_deref(),
                fail_open: g.fail_open,
                status_on_error: g.status_on_error.as_deref(),
                body: g.include_request_body_in_check.as_ref(),
            }),
            (None, None) => Err((
                Reason::UnsupportedValue,
                format!(
                    "extensionProviders {:?}: not an authorization provider (envoyExtAuthzHttp, envoyExtAuthzGrpc)",
                    p.name
                ),
            )),
        }
    }

    /// `field` of this provider is invalid: why.
    fn bad(&self, field: &str, why: String) -> Refusal {
        (
            Reason::Invalid,
            format!("extensionProviders {:?}: {}.{field}: {why}", self.provider, self.kind),
        )
    }

    fn port(&self) -> Result<u16, Refusal> {
        match self.port {
            IntOrString::Int(n) => u16::try_from(*n).ok(),
            IntOrString::String(s) => s.parse().ok(),
        }
        .filter(|p| *p != 0)
        .ok_or_else(|| self.bad("port", "must be 1-65535".into()))
    }

    fn timeout_ms(&self) -> Result<u64, Refusal> {
        let ms = match self.timeout {
            None => MAX_EXT_AUTHZ_TIMEOUT_MS,
            Some(t) => super::istio_duration_ms(t).map_err(|e| self.bad("timeout", e))?,
        };
        if ms == 0 || ms > MAX_EXT_AUTHZ_TIMEOUT_MS {
            return Err(self.bad(
                "timeout",
                format!("must be above 0 and at most {MAX_EXT_AUTHZ_TIMEOUT_MS} ms"),
            ));
        }
        Ok(ms)
    }

    fn status_on_error(&self) -> Result<u16, Refusal> {
        let Some(s) = self.status_on_error else {
            return Ok(403);
        };
        s.trim()
            .parse::<u16>()
            .ok()
            .filter(|c| (200..=599).contains(c))
            .ok_or_else(|| self.bad("statusOnError", format!("{s:?} is not a status 200-599")))
    }

    fn body_in_check(&self) -> Result<Option<BodyInCheck>, Refusal> {
        let Some(b) = self.body else {
            return Ok(None);
        };
        let max_bytes = b
            .max_request_bytes
            .filter(|n| (1..=MAX_EXT_AUTHZ_BODY).contains(n))
            .ok_or_else(|| {
                self.bad(
                    "includeRequestBodyInCheck.maxRequestBytes",
                    format!("must be set, 1-{MAX_EXT_AUTHZ_BODY}"),
                )
            })?;
        Ok(Some(BodyInCheck {
            max_bytes,
            allow_partial: b.allow_partial_message,
            pack_as_bytes: b.pack_as_bytes,
        }))
    }
}

fn provider(
    p: &ExtensionProvider,
    entries: &[(Arc<MeshService>, Digest)],
    clusters: &mut Clusters<'_>,
) -> Result<ExtAuthz, Refusal> {
    let common = Common::of(p)?;
    let mut out = ExtAuthz {
        provider: p.name.clone(),
        api: common.api,
        cluster: cluster_of(common.service, common.port()?, common.api, entries, clusters)?,
        timeout_ms: common.timeout_ms()?,
        path_prefix: String::new(),
        include_request_headers: Vec::new(),
        additional_headers: Default::default(),
        headers_to_upstream_on_allow: Vec::new(),
        headers_to_downstream_on_deny: Vec::new(),
        headers_to_downstream_on_allow: Vec::new(),
        include_request_body: common.body_in_check()?,
        fail_open: common.fail_open,
        status_on_error: common.status_on_error()?,
    };
    if let Some(h) = &p.envoy_ext_authz_http {
        http_provider(h, &common, &mut out)?;
    }
    Ok(out)
}

/// What only an HTTP provider says: the check's path and the headers it sees and passes on.
fn http_provider(h: &ExtAuthzHttpProvider, common: &Common<'_>, out: &mut ExtAuthz) -> Result<(), Refusal> {
    let prefix = h.path_prefix.clone().unwrap_or_default();
    if !prefix.is_empty() && (!prefix.starts_with('/') || prefix.contains(['?', '#'])) {
        return Err(common.bad("pathPrefix", "must start with '/' and have no query".into()));
    }
    let lower = |v: &[String]| v.iter().map(|h| h.to_ascii_lowercase()).collect();
    out.path_prefix = prefix;
    out.include_request_headers = lower(&h.include_request_headers_in_check);
    for (name, value) in &h.include_additional_headers_in_check {
        let valid = !crate::validate::http_header_name_invalid(name)
            && value.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b));
        if !valid {
            return Err(common.bad(
                "includeAdditionalHeadersInCheck",
                format!("{name:?}: {value:?} is not a valid header"),
            ));
        }
        out.additional_headers.insert(name.to_ascii_lowercase(), value.clone());
    }
    out.headers_to_upstream_on_allow = lower(&h.headers_to_upstream_on_allow);
    out.headers_to_downstream_on_deny = lower(&h.headers_to_downstream_on_deny);
    out.headers_to_downstream_on_allow = lower(&h.headers_to_downstream_on_allow);
    Ok(())
}

/// The cluster of `host:port`: a ServiceEntry host's, else a Service's (its FQDN, or
/// `name.namespace`).
fn cluster_of(
    host: &str,
    port: u16,
    api: ExtAuthzApi,
    entries: &[(Arc<MeshService>, Digest)],
    clusters: &mut Clusters<'_>,
) -> Result<String, Refusal> {
    let host = host.to_ascii_lowercase();
    if let Some((entry, _)) = entries.iter().find(|(s, _)| s.hostname == host) {
        let h2 = entry
            .ports
            .iter()
            .any(|p| p.port == port && p.http() == Some(crate::mesh::HttpProtocol::Http2));
        if api == ExtAuthzApi::Grpc && !h2 {
            return Err((
                Reason::UnsupportedValue,
                format!("ServiceEntry host {host} port {port} is not GRPC or HTTP2: gRPC cannot reach it"),
            ));
        }
        return clusters.entry(entry, port);
    }
    let Some((ns, name)) = service_of(&host, crate::ROOT_NAMESPACE) else {
        return Err((
            Reason::BackendNotFound,
            format!("{host:?} is neither a Service of this cluster nor a ServiceEntry host"),
        ));
    };
    let target = BackendRef::service(ns, name, port);
    // gRPC: the HTTP/2 variant of the Service's cluster, as a GRPCRoute's backend gets.
    let kind = match api {
        ExtAuthzApi::Http => "MeshConfig",
        ExtAuthzApi::Grpc => "GRPCRoute",
    };
    clusters.resolve(kind, ns, &target)
}
