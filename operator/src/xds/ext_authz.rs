//! AuthorizationPolicies with action CUSTOM on a Gateway, for Envoy, the way Istio configures
//! it: per provider, an RBAC filter whose *shadow* rules are those policies' rules — a request
//! they match is marked in the filter's dynamic metadata — and an `ext_authz` filter enabled
//! only by that mark, asking the provider's cluster over HTTP or gRPC. Both go before the DENY
//! and ALLOW filters (Istio's order: CUSTOM, DENY, ALLOW).

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::rbac::v3 as rbac;
use envoy_types::pb::envoy::extensions::filters::http::ext_authz::v3 as ext;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use ferrum_snapshot::mesh::{ExtAuthz, ExtAuthzApi};

use super::resources::{any, ms};

/// The name every shadow policy starts with; the ext_authz filter is enabled by it.
const MARK: &str = "istio-ext-authz";
/// Where the RBAC filter writes its dynamic metadata (its canonical name).
const RBAC_NAMESPACE: &str = "envoy.filters.http.rbac";

/// One provider and the shadow rules of the policies that ask it.
#[derive(Debug, PartialEq)]
pub struct Custom {
    pub provider: ExtAuthz,
    pub rules: rbac::Rbac,
}

impl Custom {
    pub fn new(provider: ExtAuthz) -> Self {
        Custom {
            provider,
            rules: rbac::Rbac {
                action: rbac::rbac::Action::Deny as i32,
                ..Default::default()
            },
        }
    }

    /// The shadow policy name of rule `rule` (`namespace/name[i]`).
    pub fn policy_name(rule: &str) -> String {
        format!("{MARK}-{rule}")
    }
}

/// Istio's header patterns (exact, `prefix*`, `*suffix`), as case-insensitive matchers.
fn patterns(list: &[String]) -> Option<matcher::ListStringMatcher> {
    use matcher::string_matcher::MatchPattern;
    let m = |p: &String| {
        let pattern = match (p.strip_suffix('*'), p.strip_prefix('*')) {
            (Some(pre), _) => MatchPattern::Prefix(pre.to_string()),
            (None, Some(suf)) => MatchPattern::Suffix(suf.to_string()),
            (None, None) => MatchPattern::Exact(p.clone()),
        };
        matcher::StringMatcher {
            match_pattern: Some(pattern),
            ignore_case: true,
        }
    };
    (!list.is_empty()).then(|| matcher::ListStringMatcher {
        patterns: list.iter().map(m).collect(),
    })
}

fn http_filter(name: String, type_url: &str, config: &impl prost::Message) -> hcm::HttpFilter {
    hcm::HttpFilter {
        name,
        config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(type_url, config))),
        ..Default::default()
    }
}

/// The shadow RBAC filter and the ext_authz filter of each provider, in order.
pub fn http_filters(custom: Vec<Custom>) -> Vec<hcm::HttpFilter> {
    let mut out = Vec::new();
    for (i, c) in custom.into_iter().enumerate() {
        let prefix = format!("istio_ext_authz_{i}_");
        let shadow = HttpRbac {
            shadow_rules: Some(c.rules),
            shadow_rules_stat_prefix: prefix.clone(),
            ..Default::default()
        };
        out.push(http_filter(
            format!("envoy.filters.http.rbac.ext_authz_{i}"),
            "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            &shadow,
        ));
        out.push(http_filter(
            format!("envoy.filters.http.ext_authz.{i}"),
            "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            &ext_authz(&c.provider, &prefix),
        ));
    }
    out
}

/// The ext_authz filter of `p`, enabled for requests the shadow rules behind `prefix` matched.
fn ext_authz(p: &ExtAuthz, prefix: &str) -> ext::ExtAuthz {
    ext::ExtAuthz {
        transport_api_version: core::ApiVersion::V3 as i32,
        failure_mode_allow: p.fail_open,
        status_on_error: Some(HttpStatus {
            code: i32::from(p.status_on_error),
        }),
        filter_enabled_metadata: Some(marked(prefix)),
        allowed_headers: patterns(&p.include_request_headers),
        with_request_body: p.include_request_body.map(|b| ext::BufferSettings {
            max_request_bytes: b.max_bytes,
            allow_partial_message: b.allow_partial,
            pack_as_bytes: b.pack_as_bytes,
        }),
        services: Some(service(p)),
        ..Default::default()
    }
}

/// Requests the shadow rules behind `prefix` marked for the provider.
fn marked(prefix: &str) -> matcher::MetadataMatcher {
    use matcher::metadata_matcher::{PathSegment, path_segment::Segment};
    matcher::MetadataMatcher {
        filter: RBAC_NAMESPACE.into(),
        path: vec![PathSegment {
            segment: Some(Segment::Key(format!("{prefix}shadow_effective_policy_id"))),
        }],
        value: Some(matcher::ValueMatcher {
            match_pattern: Some(matcher::value_matcher::MatchPattern::StringMatch(
                matcher::StringMatcher {
                    match_pattern: Some(matcher::string_matcher::MatchPattern::Prefix(MARK.into())),
                    ignore_case: false,
                },
            )),
        }),
        invert: false,
    }
}

/// The provider's service: HTTP or gRPC, within its timeout.
fn service(p: &ExtAuthz) -> ext::ext_authz::Services {
    let timeout = Some(ms(p.timeout_ms));
    match p.api {
        ExtAuthzApi::Http => ext::ext_authz::Services::HttpService(ext::HttpService {
            server_uri: Some(core::HttpUri {
                uri: format!("http://{}", p.cluster),
                http_upstream_type: Some(core::http_uri::HttpUpstreamType::Cluster(p.cluster.clone())),
                timeout,
            }),
            path_prefix: p.path_prefix.clone(),
            authorization_request: Some(ext::AuthorizationRequest {
                headers_to_add: p
                    .additional_headers
                    .iter()
                    .map(|(k, v)| core::HeaderValue {
                        key: k.clone(),
                        value: v.clone(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            authorization_response: Some(ext::AuthorizationResponse {
                allowed_upstream_headers: patterns(&p.headers_to_upstream_on_allow),
                allowed_client_headers: patterns(&p.headers_to_downstream_on_deny),
                allowed_client_headers_on_success: patterns(&p.headers_to_downstream_on_allow),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ExtAuthzApi::Grpc => ext::ext_authz::Services::GrpcService(core::GrpcService {
            timeout,
            target_specifier: Some(core::grpc_service::TargetSpecifier::EnvoyGrpc(
                core::grpc_service::EnvoyGrpc {
                    cluster_name: p.cluster.clone(),
                    ..Default::default()
                },
            )),
            ..Default::default()
        }),
    }
}
