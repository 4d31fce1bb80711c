//! Snapshot → Envoy v3 resources: Listener (HTTP connection manager over RDS/ADS, or TCP proxy
//! filter chains chosen by SNI for TCP and TLS listeners), RouteConfiguration, Cluster (EDS over
//! ADS), ClusterLoadAssignment and Secret (SDS over ADS). What Envoy cannot be told is reported,
//! not dropped silently.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::cluster::v3 as cluster;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as endpoint;
use envoy_types::pb::envoy::config::listener::v3 as listener;
use envoy_types::pb::envoy::config::route::v3 as route;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::proxy_protocol::v3::ProxyProtocol;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp_proxy;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use envoy_types::pb::envoy::extensions::upstreams::http::v3 as upstream_http;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use envoy_types::pb::google::protobuf::{Any, BoolValue, Duration as PbDuration, UInt32Value};
use ferrum_snapshot::model::{self, Action, LbPolicy, PathMatch, PathRewrite, StringMatch, UpstreamProtocol};
use ferrum_snapshot::{Secrets, Snapshot};
use prost::Message;

use super::jwt::Providers;
use super::rbac;
use super::traffic::{self, ClusterIndex};
pub use ferrum_proto::xds::{BACKEND_NOT_FOUND, CLUSTER, ENDPOINT, LISTENER, NO_WEIGHTED_BACKEND, ROUTE, SECRET};
use ferrum_proto::xds::{HCM, PROXY_PROTOCOL, PROXY_PROTOCOL_FILTER};

/// The types in the order they must be pushed: clusters before their endpoints, secrets and
/// listeners before their routes.
pub const PUSH_ORDER: [&str; 5] = [CLUSTER, ENDPOINT, SECRET, LISTENER, ROUTE];

pub(super) fn any<M: Message>(type_url: &str, m: &M) -> Any {
    Any {
        type_url: type_url.into(),
        value: m.encode_to_vec(),
    }
}

pub(super) fn ms(ms: u64) -> PbDuration {
    PbDuration {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

pub(super) fn u32v(v: u32) -> Option<UInt32Value> {
    Some(UInt32Value { value: v })
}

pub(super) fn ads() -> core::ConfigSource {
    core::ConfigSource {
        resource_api_version: core::ApiVersion::V3 as i32,
        config_source_specifier: Some(core::config_source::ConfigSourceSpecifier::Ads(
            core::AggregatedConfigSource {},
        )),
        ..Default::default()
    }
}

fn socket(address: &str, port: u16) -> core::Address {
    core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: address.into(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(u32::from(port))),
            ..Default::default()
        })),
    }
}

fn string_matcher(m: &StringMatch) -> matcher::StringMatcher {
    matcher::StringMatcher {
        match_pattern: Some(match m {
            StringMatch::Exact(s) => matcher::string_matcher::MatchPattern::Exact(s.clone()),
            StringMatch::Regex(r) => matcher::string_matcher::MatchPattern::SafeRegex(matcher::RegexMatcher {
                regex: r.clone(),
                ..Default::default()
            }),
        }),
        ..Default::default()
    }
}

fn header_values(set: &[(String, String)], append: bool) -> Vec<core::HeaderValueOption> {
    set.iter()
        .map(|(k, v)| core::HeaderValueOption {
            header: Some(core::HeaderValue {
                key: k.clone(),
                value: v.clone(),
                ..Default::default()
            }),
            append_action: if append {
                core::header_value_option::HeaderAppendAction::AppendIfExistsOrAdd as i32
            } else {
                core::header_value_option::HeaderAppendAction::OverwriteIfExistsOrAdd as i32
            },
            ..Default::default()
        })
        .collect()
}

/// Envoy resources of one snapshot, by type URL and name, plus what could not be expressed.
#[derive(Default)]
pub struct EnvoyResources {
    pub by_type: BTreeMap<&'static str, BTreeMap<String, Any>>,
    /// Listeners for proxyless gRPC clients (`xds:///<hostname>`): only ever sent when asked for
    /// by name, since Envoy refuses an `api_listener` over LDS.
    pub api_listeners: BTreeMap<String, Any>,
    pub unsupported: Vec<String>,
}

impl EnvoyResources {
    /// Adds resource `name` of type `type_url`.
    fn put<M: Message>(&mut self, type_url: &'static str, name: String, m: &M) {
        self.by_type.entry(type_url).or_default().insert(name, any(type_url, m));
    }
}

/// TLS termination with the listener's certificates, each named for SDS over ADS: key pairs
/// travel as `Secret` resources, never inside a Listener. Envoy picks the certificate whose
/// names match the client's SNI.
fn downstream_tls(certificates: &[model::Certificate], alpn: &[&str]) -> Option<core::TransportSocket> {
    if certificates.is_empty() {
        return None;
    }
    let context = tls::DownstreamTlsContext {
        common_tls_context: Some(tls::CommonTlsContext {
            tls_certificate_sds_secret_configs: certificates
                .iter()
                .map(|c| tls::SdsSecretConfig {
                    name: secret_name(&c.source),
                    sds_config: Some(ads()),
                })
                .collect(),
            alpn_protocols: alpn.iter().map(|a| a.to_string()).collect(),
            ..Default::default()
        }),
        ..Default::default()
    };
    Some(core::TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(core::transport_socket::ConfigType::TypedConfig(any(
            "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            &context,
        ))),
    })
}

/// The SDS name of a certificate: its Secret's name (stable across rotations, so a new key pair
/// is a new Secret resource and the Listener stays as it is: no drain), or the files it is read
/// from.
pub(super) fn secret_name(source: &model::CertSource) -> String {
    match source {
        model::CertSource::Secret { name, .. } => name.clone(),
        model::CertSource::Files { cert, key } => format!("file:{cert}:{key}"),
    }
}

/// The SDS resource behind a certificate, if its key pair is at hand.
fn sds_secret(source: &model::CertSource, secrets: &Secrets) -> Option<tls::Secret> {
    use core::data_source::Specifier;
    let source_of = |s: Specifier| {
        Some(core::DataSource {
            specifier: Some(s),
            ..Default::default()
        })
    };
    let (cert, key) = match source {
        model::CertSource::Secret { name, digest } => {
            let s = ferrum_snapshot::secret::resolve(secrets, name, digest).ok()?;
            (
                Specifier::InlineString(s.cert.clone()),
                Specifier::InlineString(s.key.clone()),
            )
        }
        model::CertSource::Files { cert, key } => (Specifier::Filename(cert.clone()), Specifier::Filename(key.clone())),
    };
    Some(tls::Secret {
        name: secret_name(source),
        r#type: Some(tls::secret::Type::TlsCertificate(tls::TlsCertificate {
            certificate_chain: source_of(cert),
            private_key: source_of(key),
            ..Default::default()
        })),
    })
}

/// The SDS `Secret` resource of `source` (used by `owner`), or why it cannot be sent.
fn sds_secret_of(source: &model::CertSource, owner: &str, secrets: &Secrets, out: &mut EnvoyResources) {
    match sds_secret(source, secrets) {
        Some(sec) => out.put(SECRET, sec.name.clone(), &sec),
        None => out.unsupported.push(format!(
            "{owner}: the key pair of {} is not at hand",
            secret_name(source)
        )),
    }
}

/// An HTTP connection manager routing by RDS; `filters` run before the router; the client is
/// `xff_trusted_hops` entries from the right of `X-Forwarded-For` (0: the connection's).
fn connection_manager(
    stat_prefix: &str,
    route_config_name: String,
    filters: Vec<hcm::HttpFilter>,
    xff_trusted_hops: u8,
) -> hcm::HttpConnectionManager {
    let router = hcm::HttpFilter {
        name: "envoy.filters.http.router".into(),
        config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(
            "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
            &Router::default(),
        ))),
        ..Default::default()
    };
    hcm::HttpConnectionManager {
        stat_prefix: stat_prefix.into(),
        codec_type: hcm::http_connection_manager::CodecType::Auto as i32,
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::Rds(hcm::Rds {
            config_source: Some(ads()),
            route_config_name,
        })),
        http_filters: filters.into_iter().chain([router]).collect(),
        // The client is the peer, never what it claims in X-Forwarded-For (which Envoy extends,
        // as ferrum-dp does): RBAC's `remoteIpBlocks` and the access log see the real address.
        use_remote_address: Some(BoolValue { value: true }),
        xff_num_trusted_hops: xff_trusted_hops.into(),
        ..Default::default()
    }
}

/// A listener's filters before its chains: the PROXY protocol header first (it precedes the TLS
/// handshake), then, when chains match server names, the TLS inspector.
fn listener_filters(l: &model::Listener, tls_inspector: bool) -> Vec<listener::ListenerFilter> {
    let proxy_protocol = l.client_address.proxy_protocol.then(|| listener::ListenerFilter {
        name: PROXY_PROTOCOL_FILTER.into(),
        config_type: Some(listener::listener_filter::ConfigType::TypedConfig(any(
            PROXY_PROTOCOL,
            &ProxyProtocol::default(),
        ))),
        ..Default::default()
    });
    let inspector = tls_inspector.then(|| listener::ListenerFilter {
        name: "envoy.filters.listener.tls_inspector".into(),
        config_type: Some(listener::listener_filter::ConfigType::TypedConfig(any(
            "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector",
            &TlsInspector::default(),
        ))),
        ..Default::default()
    });
    proxy_protocol.into_iter().chain(inspector).collect()
}

/// The name of the route configuration of a listener.
fn route_name(l: &model::Listener) -> String {
    format!("routes/{}", l.name)
}

pub fn translate(s: &Snapshot, secrets: &Secrets) -> EnvoyResources {
    let mut out = EnvoyResources::default();
    for t in PUSH_ORDER {
        out.by_type.insert(t, BTreeMap::new());
    }
    let clusters: ClusterIndex = s.clusters.iter().map(|c| (c.name.as_str(), &**c)).collect();
    for c in &s.clusters {
        if let Some(cert) = c.tls.as_ref().and_then(|t| t.client_certificate.as_ref()) {
            sds_secret_of(cert, &format!("cluster {}", c.name), secrets, &mut out);
        }
        let (cl, cla) = cluster(c);
        out.put(CLUSTER, c.name.clone(), &cl);
        out.put(ENDPOINT, c.name.clone(), &cla);
    }
    for l in &s.listeners {
        secrets_of(l, secrets, &mut out);
        if l.protocol.is_l4() {
            let rbac = rbac::rules(
                &s.policies,
                &l.gateways,
                true,
                &Providers::default(),
                &mut out.unsupported,
            );
            let lis = l4_listener(l, rbac, &clusters, &mut out.unsupported);
            out.put(LISTENER, l.name.clone(), &lis);
            continue;
        }
        let rc = route_config(l, &clusters, &mut out.unsupported);
        api_listeners(&rc, &mut out);
        out.put(ROUTE, rc.name.clone(), &rc);
        let lis = http_listener(l, &s.policies, &mut out.unsupported);
        out.put(LISTENER, l.name.clone(), &lis);
    }
    out
}

/// Every concrete hostname of `rc` is also an xds:/// target for gRPC clients, with its own
/// routes.
fn api_listeners(rc: &route::RouteConfiguration, out: &mut EnvoyResources) {
    for vh in rc.virtual_hosts.iter().filter(|v| !v.name.contains('*')) {
        let name = format!("api/{}", vh.name);
        let api_rc = route::RouteConfiguration {
            name: name.clone(),
            virtual_hosts: vec![vh.clone()],
            ..Default::default()
        };
        out.put(ROUTE, name.clone(), &api_rc);
        let api = listener::Listener {
            name: vh.name.clone(),
            api_listener: Some(listener::ApiListener {
                api_listener: Some(any(HCM, &connection_manager(&vh.name, name, Vec::new(), 0))),
            }),
            ..Default::default()
        };
        out.api_listeners.insert(vh.name.clone(), any(LISTENER, &api));
    }
}

/// An HTTP(S) listener: its HTTP filters (CORS, JWT, RBAC, rate limits) before the router.
fn http_listener(
    l: &model::Listener,
    policies: &[std::sync::Arc<ferrum_snapshot::mesh::Policy>],
    unsupported: &mut Vec<String>,
) -> listener::Listener {
    let jwt = Providers::of(policies, &l.gateways, unsupported);
    let rbac = rbac::rules(policies, &l.gateways, false, &jwt, unsupported);
    let filters = super::cors::filter(l)
        .into_iter()
        .chain(jwt.filter())
        .chain(rbac::http_filters(rbac))
        .chain(super::rate_limit::filter(l))
        .chain(super::rate_limit::global_filter(l))
        .collect();
    let manager = connection_manager(&l.name, route_name(l), filters, l.client_address.xff_trusted_hops);
    listener::Listener {
        name: l.name.clone(),
        address: Some(socket(&l.address, l.port)),
        listener_filters: listener_filters(l, false),
        filter_chains: vec![listener::FilterChain {
            filters: vec![listener::Filter {
                name: "envoy.filters.network.http_connection_manager".into(),
                config_type: Some(listener::filter::ConfigType::TypedConfig(any(HCM, &manager))),
            }],
            transport_socket: downstream_tls(&l.certificates, &["h2", "http/1.1"]),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The listener's key pairs, as SDS secrets.
fn secrets_of(l: &model::Listener, secrets: &Secrets, out: &mut EnvoyResources) {
    for c in &l.certificates {
        sds_secret_of(&c.source, &format!("listener {}", l.name), secrets, out);
    }
}

/// A TCP or TLS listener: one TCP proxy filter chain per virtual host, matched by SNI (the TLS
/// inspector reads it) on TLS; terminated with the listener's certificates when it has them.
fn l4_listener(
    l: &model::Listener,
    rbac: rbac::Rules,
    clusters: &ClusterIndex,
    unsupported: &mut Vec<String>,
) -> listener::Listener {
    let guards = rbac::network_filters(rbac, &l.name);
    let tls = l.protocol == model::Protocol::Tls;
    let filter_chains = l
        .virtual_hosts
        .iter()
        .filter_map(|vh| {
            let r = vh.routes.first()?;
            let Action::Forward(targets) = &r.action else {
                return None;
            };
            // The first backend's idle timeout (Envoy has one per proxy, not per cluster).
            let idle = targets
                .iter()
                .find_map(|t| clusters.get(t.cluster.as_deref()?))
                .and_then(|c| c.timeouts.tcp_idle_ms);
            let proxy = tcp_proxy::TcpProxy {
                stat_prefix: r.name.clone(),
                cluster_specifier: Some(tcp_cluster(&r.name, targets, unsupported)),
                // Envoy reads 0 as never, as ferrum-dp does.
                idle_timeout: idle.map(ms),
                ..Default::default()
            };
            Some(listener::FilterChain {
                filter_chain_match: (tls && vh.hostname != "*").then(|| listener::FilterChainMatch {
                    server_names: vec![vh.hostname.clone()],
                    ..Default::default()
                }),
                filters: guards
                    .iter()
                    .cloned()
                    .chain([listener::Filter {
                        name: "envoy.filters.network.tcp_proxy".into(),
                        config_type: Some(listener::filter::ConfigType::TypedConfig(any(
                            "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                            &proxy,
                        ))),
                    }])
                    .collect(),
                transport_socket: downstream_tls(&l.certificates, &[]),
                ..Default::default()
            })
        })
        .collect();
    listener::Listener {
        name: l.name.clone(),
        address: Some(socket(&l.address, l.port)),
        listener_filters: listener_filters(l, tls),
        filter_chains,
        ..Default::default()
    }
}

fn tcp_cluster(
    route: &str,
    targets: &[model::WeightedCluster],
    unsupported: &mut Vec<String>,
) -> tcp_proxy::tcp_proxy::ClusterSpecifier {
    use tcp_proxy::tcp_proxy::{ClusterSpecifier, WeightedCluster, weighted_cluster::ClusterWeight};
    if targets.iter().any(|t| t.cluster.is_none()) {
        unsupported.push(format!(
            "route {route}: a backend that did not resolve is sent to a missing cluster (the connection is closed)"
        ));
    }
    let name = |t: &model::WeightedCluster| t.cluster.clone().unwrap_or_else(|| "ferrum-invalid-backend".into());
    match targets {
        [one] => ClusterSpecifier::Cluster(name(one)),
        _ => ClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters: targets
                .iter()
                .map(|t| ClusterWeight {
                    name: name(t),
                    weight: t.weight,
                    ..Default::default()
                })
                .collect(),
        }),
    }
}

fn route_config(
    l: &model::Listener,
    clusters: &ClusterIndex,
    unsupported: &mut Vec<String>,
) -> route::RouteConfiguration {
    let vhosts = l
        .virtual_hosts
        .iter()
        .map(|vh| route::VirtualHost {
            name: vh.hostname.clone(),
            domains: vec![vh.hostname.clone()],
            routes: vh
                .routes
                .iter()
                .map(|r| envoy_route(r, clusters, unsupported))
                .collect(),
            ..Default::default()
        })
        .collect();
    route::RouteConfiguration {
        name: route_name(l),
        virtual_hosts: vhosts,
        ignore_port_in_host_matching: true,
        ..Default::default()
    }
}

fn envoy_route(r: &model::Route, clusters: &ClusterIndex, unsupported: &mut Vec<String>) -> route::Route {
    let mut response_headers = [
        header_values(&r.response_headers.set, false),
        header_values(&r.response_headers.add, true),
    ]
    .concat();
    let action = match &r.action {
        _ if r.direct_response.is_some() => {
            let d = r.direct_response.as_ref().expect("checked");
            route::route::Action::DirectResponse(route::DirectResponseAction {
                status: d.status.into(),
                body: (!d.body.is_empty()).then(|| core::DataSource {
                    specifier: Some(core::data_source::Specifier::InlineString(d.body.clone())),
                    ..Default::default()
                }),
                ..Default::default()
            })
        }
        Action::Redirect(rd) => redirect_action(rd),
        Action::Forward(targets) => match local_error(targets) {
            Some(error) => {
                response_headers.extend(header_values(&[("x-ferrum-error".into(), error.into())], false));
                route::route::Action::DirectResponse(route::DirectResponseAction {
                    status: 500,
                    ..Default::default()
                })
            }
            None => forward_action(r, targets, clusters, unsupported),
        },
    };
    route::Route {
        name: r.name.clone(),
        r#match: Some(route_match(&r.matcher)),
        action: Some(action),
        request_headers_to_add: [
            header_values(&r.request_headers.set, false),
            header_values(&r.request_headers.add, true),
        ]
        .concat(),
        request_headers_to_remove: r.request_headers.remove.clone(),
        response_headers_to_add: response_headers,
        response_headers_to_remove: r.response_headers.remove.clone(),
        typed_per_filter_config: r
            .cors
            .as_ref()
            .map(|c| (super::cors::FILTER.to_string(), super::cors::policy(c)))
            .into_iter()
            .chain(
                super::rate_limit::route_config(r).map(|c| (ferrum_proto::xds::LOCAL_RATE_LIMIT_FILTER.to_string(), c)),
            )
            .chain(
                super::rate_limit::global_route_config(r, unsupported)
                    .map(|c| (ferrum_proto::xds::RATE_LIMIT_FILTER.to_string(), c)),
            )
            .collect(),
        ..Default::default()
    }
}

/// A rule that can only answer 500, and ferrum-dp's `x-ferrum-error` for it: every weighted
/// backend unresolved (the translator's form of a rule without weight too; a missing cluster
/// would be Envoy's 503), or every backend at weight 0 (a snapshot from elsewhere; weighted
/// clusters must sum to more than 0).
pub(super) fn local_error(targets: &[model::WeightedCluster]) -> Option<&'static str> {
    if targets.iter().all(|t| t.weight == 0) {
        Some(NO_WEIGHTED_BACKEND)
    } else if targets.iter().filter(|t| t.weight > 0).all(|t| t.cluster.is_none()) {
        Some(BACKEND_NOT_FOUND)
    } else {
        None
    }
}

fn route_match(m: &model::RouteMatch) -> route::RouteMatch {
    use route::route_match::PathSpecifier;
    let path = match &m.path {
        PathMatch::Exact(p) => PathSpecifier::Path(p.clone()),
        PathMatch::Prefix(p) if p == "/" => PathSpecifier::Prefix("/".into()),
        PathMatch::Prefix(p) => PathSpecifier::PathSeparatedPrefix(p.clone()),
        PathMatch::Regex(re) => PathSpecifier::SafeRegex(matcher::RegexMatcher {
            regex: re.clone(),
            ..Default::default()
        }),
    };
    let mut headers: Vec<route::HeaderMatcher> = m
        .headers
        .iter()
        .map(|h| route::HeaderMatcher {
            name: h.name.clone(),
            header_match_specifier: Some(route::header_matcher::HeaderMatchSpecifier::StringMatch(
                string_matcher(&h.value),
            )),
            ..Default::default()
        })
        .collect();
    if let Some(method) = &m.method {
        headers.push(route::HeaderMatcher {
            name: ":method".into(),
            header_match_specifier: Some(route::header_matcher::HeaderMatchSpecifier::StringMatch(
                string_matcher(&StringMatch::Exact(method.clone())),
            )),
            ..Default::default()
        });
    }
    let query_parameters = m
        .query_params
        .iter()
        .map(|q| route::QueryParameterMatcher {
            name: q.name.clone(),
            query_parameter_match_specifier: Some(
                route::query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(string_matcher(&q.value)),
            ),
        })
        .collect();
    route::RouteMatch {
        path_specifier: Some(path),
        headers,
        query_parameters,
        ..Default::default()
    }
}

fn redirect_action(rd: &model::Redirect) -> route::route::Action {
    use route::redirect_action::{PathRewriteSpecifier, SchemeRewriteSpecifier};
    route::route::Action::Redirect(route::RedirectAction {
        host_redirect: rd.hostname.clone().unwrap_or_default(),
        port_redirect: u32::from(rd.port.unwrap_or(0)),
        response_code: match rd.status {
            301 => route::redirect_action::RedirectResponseCode::MovedPermanently,
            303 => route::redirect_action::RedirectResponseCode::SeeOther,
            307 => route::redirect_action::RedirectResponseCode::TemporaryRedirect,
            308 => route::redirect_action::RedirectResponseCode::PermanentRedirect,
            _ => route::redirect_action::RedirectResponseCode::Found,
        } as i32,
        scheme_rewrite_specifier: rd.scheme.clone().map(SchemeRewriteSpecifier::SchemeRedirect),
        path_rewrite_specifier: rd.path.as_ref().map(|p| match p {
            PathRewrite::Full(f) => PathRewriteSpecifier::PathRedirect(f.clone()),
            PathRewrite::Prefix(p) => PathRewriteSpecifier::PrefixRewrite(p.clone()),
        }),
        ..Default::default()
    })
}

fn forward_action(
    r: &model::Route,
    targets: &[model::WeightedCluster],
    clusters: &ClusterIndex,
    unsupported: &mut Vec<String>,
) -> route::route::Action {
    use route::route_action::{ClusterSpecifier, HostRewriteSpecifier};
    let cluster_specifier = if targets.len() == 1 && targets[0].cluster.is_some() && targets[0].headers.is_none() {
        ClusterSpecifier::Cluster(targets[0].cluster.clone().unwrap_or_default())
    } else {
        if targets.iter().any(|t| t.cluster.is_none()) {
            unsupported.push(format!(
                "route {}: a backend that did not resolve is sent to a missing cluster (Envoy answers 503, not 500)",
                r.name
            ));
        }
        ClusterSpecifier::WeightedClusters(route::WeightedCluster {
            clusters: targets
                .iter()
                .map(|t| {
                    // A backend's own header edits ride on its ClusterWeight.
                    let h = t.headers.as_deref().cloned().unwrap_or_default();
                    let add = |m: &model::HeaderModifier| {
                        [header_values(&m.set, false), header_values(&m.add, true)].concat()
                    };
                    route::weighted_cluster::ClusterWeight {
                        name: t.cluster.clone().unwrap_or_else(|| "ferrum-invalid-backend".into()),
                        weight: u32v(t.weight),
                        request_headers_to_add: add(&h.request),
                        request_headers_to_remove: h.request.remove.clone(),
                        response_headers_to_add: add(&h.response),
                        response_headers_to_remove: h.response.remove.clone(),
                        ..Default::default()
                    }
                })
                .collect(),
            ..Default::default()
        })
    };
    let mut ra = route::RouteAction {
        cluster_specifier: Some(cluster_specifier),
        // Envoy's `0s` is no limit, its absence 15 s.
        timeout: r.timeouts.request_ms.or(r.timeouts.unbounded.then_some(0)).map(ms),
        ..Default::default()
    };
    if let Some(rw) = &r.rewrite {
        if let Some(h) = &rw.hostname {
            ra.host_rewrite_specifier = Some(HostRewriteSpecifier::HostRewriteLiteral(h.clone()));
        }
        match &rw.path {
            Some(PathRewrite::Prefix(p)) => ra.prefix_rewrite = p.clone(),
            Some(PathRewrite::Full(f)) => {
                ra.regex_rewrite = Some(matcher::RegexMatchAndSubstitute {
                    pattern: Some(matcher::RegexMatcher {
                        regex: "^/.*$".into(),
                        ..Default::default()
                    }),
                    substitution: f.clone(),
                })
            }
            None => {}
        }
    }
    traffic::route_policies(r, targets, clusters, &mut ra, unsupported);
    ra.request_mirror_policies.extend(r.mirrors().map(mirror_policy));
    route::route::Action::Route(ra)
}

/// A route's mirror: the share of requests copied, per million (Envoy appends `-shadow` to the
/// copy's host, as ferrum-dp does).
fn mirror_policy(m: &model::Mirror) -> route::route_action::RequestMirrorPolicy {
    use envoy_types::pb::envoy::r#type::v3::{FractionalPercent, fractional_percent::DenominatorType};
    route::route_action::RequestMirrorPolicy {
        cluster: m.cluster.clone(),
        runtime_fraction: Some(envoy_types::pb::envoy::config::core::v3::RuntimeFractionalPercent {
            default_value: Some(FractionalPercent {
                numerator: m.per_million,
                denominator: DenominatorType::Million as i32,
            }),
            runtime_key: String::new(),
        }),
        ..Default::default()
    }
}

fn cluster(c: &model::Cluster) -> (cluster::Cluster, endpoint::ClusterLoadAssignment) {
    use cluster::cluster::{ClusterDiscoveryType, DiscoveryType, EdsClusterConfig, LbPolicy as EnvoyLb};
    let lb = match &c.lb {
        LbPolicy::RoundRobin => EnvoyLb::RoundRobin,
        LbPolicy::LeastRequest => EnvoyLb::LeastRequest,
        LbPolicy::Random => EnvoyLb::Random,
        // The key is on each route that sends here (`traffic::route_policies`).
        LbPolicy::ConsistentHash(_) => EnvoyLb::RingHash,
    };
    let mut cl = cluster::Cluster {
        name: c.name.clone(),
        connect_timeout: Some(ms(c.timeouts.connect_ms)),
        lb_policy: lb as i32,
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: String::new(),
        }),
        circuit_breakers: Some(cluster::CircuitBreakers {
            thresholds: vec![cluster::circuit_breakers::Thresholds {
                max_connections: u32v(c.circuit_breaker.max_connections),
                max_pending_requests: u32v(c.circuit_breaker.max_pending_requests),
                max_requests: u32v(c.circuit_breaker.max_requests),
                max_retries: c.circuit_breaker.max_retries.and_then(u32v),
                retry_budget: c.retry.as_ref().map(traffic::retry_budget),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    cl.lb_config = c.slow_start.as_ref().and_then(|s| slow_start(&c.lb, s));
    // Always written: Envoy's default is 50 %, ferrum-dp's (and Istio's) 0 — never.
    cl.common_lb_config = Some(cluster::cluster::CommonLbConfig {
        healthy_panic_threshold: Some(envoy_types::pb::envoy::r#type::v3::Percent {
            value: f64::from(c.panic_threshold_percent),
        }),
        ..Default::default()
    });
    if let Some(od) = &c.outlier_detection {
        cl.outlier_detection = Some(cluster::OutlierDetection {
            consecutive_5xx: u32v(od.consecutive_5xx),
            consecutive_gateway_failure: u32v(od.consecutive_connect_failures),
            base_ejection_time: Some(ms(od.base_ejection_ms)),
            max_ejection_percent: u32v(od.max_ejection_percent),
            ..Default::default()
        });
    }
    if let Some(hc) = &c.health_check {
        cl.health_checks = vec![health_check(hc)];
    }
    if let Some(opts) = http_protocol_options(c) {
        cl.typed_extension_protocol_options.insert(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".into(),
            any(
                "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                &opts,
            ),
        );
    }
    // Following the client's protocol, ALPN is left to Envoy: each protocol's pool offers its own.
    let alpn = (!c.follow_client_protocol).then_some(c.protocol);
    cl.transport_socket = c.tls.as_ref().map(|t| traffic::upstream_tls(t, alpn));
    cl.upstream_connection_options = c.tcp_keepalive.as_ref().map(connection_options);
    (cl, load_assignment(c))
}

/// The upstream HTTP protocol options, when the cluster needs any: HTTP/2 (or the client's
/// protocol), or a limit on a connection's requests or lifetime.
fn http_protocol_options(c: &model::Cluster) -> Option<upstream_http::HttpProtocolOptions> {
    let per_conn = c.circuit_breaker.max_requests_per_connection;
    let lifetime = c.timeouts.max_connection_duration_ms;
    let limited = per_conn.is_some() || lifetime.is_some();
    if c.protocol != UpstreamProtocol::Http2 && !c.follow_client_protocol && !limited {
        return None;
    }
    let mut opts = if c.follow_client_protocol {
        client_protocol_upstream(c.circuit_breaker.max_concurrent_streams)
    } else if c.protocol == UpstreamProtocol::Http2 {
        http2_upstream(c.circuit_breaker.max_concurrent_streams)
    } else {
        http1_upstream()
    };
    opts.common_http_protocol_options = limited.then(|| core::HttpProtocolOptions {
        max_requests_per_connection: per_conn.and_then(u32v),
        max_connection_duration: lifetime.map(ms),
        ..Default::default()
    });
    Some(opts)
}

fn connection_options(k: &model::TcpKeepalive) -> cluster::UpstreamConnectionOptions {
    // Envoy counts in whole seconds.
    let secs = |ms: Option<u64>| ms.and_then(|ms| u32v(u32::try_from(ms.div_ceil(1000)).unwrap_or(u32::MAX)));
    cluster::UpstreamConnectionOptions {
        tcp_keepalive: Some(core::TcpKeepalive {
            keepalive_probes: k.probes.and_then(u32v),
            keepalive_time: secs(k.time_ms),
            keepalive_interval: secs(k.interval_ms),
        }),
        ..Default::default()
    }
}

/// Envoy's slow start is a round-robin and least-request option: a Random cluster's is left out.
fn slow_start(lb: &LbPolicy, s: &model::SlowStart) -> Option<cluster::cluster::LbConfig> {
    use cluster::cluster::{LbConfig, LeastRequestLbConfig, RoundRobinLbConfig, SlowStartConfig};
    let config = Some(SlowStartConfig {
        slow_start_window: Some(ms(s.window_ms)),
        aggression: Some(core::RuntimeDouble {
            default_value: s.aggression,
            runtime_key: String::new(),
        }),
        min_weight_percent: Some(envoy_types::pb::envoy::r#type::v3::Percent {
            value: s.min_weight_percent,
        }),
    });
    match lb {
        LbPolicy::RoundRobin => Some(LbConfig::RoundRobinLbConfig(RoundRobinLbConfig {
            slow_start_config: config,
        })),
        LbPolicy::LeastRequest => Some(LbConfig::LeastRequestLbConfig(LeastRequestLbConfig {
            slow_start_config: config,
            ..Default::default()
        })),
        LbPolicy::Random | LbPolicy::ConsistentHash(_) => None,
    }
}

fn health_check(hc: &model::HealthCheck) -> core::HealthCheck {
    core::HealthCheck {
        timeout: Some(ms(hc.timeout_ms)),
        interval: Some(ms(hc.interval_ms)),
        healthy_threshold: u32v(hc.healthy_threshold),
        unhealthy_threshold: u32v(hc.unhealthy_threshold),
        health_checker: Some(core::health_check::HealthChecker::HttpHealthCheck(
            core::health_check::HttpHealthCheck {
                path: hc.path.clone(),
                expected_statuses: vec![envoy_types::pb::envoy::r#type::v3::Int64Range {
                    start: i64::from(hc.expected_status.0),
                    end: i64::from(hc.expected_status.1) + 1,
                }],
                ..Default::default()
            },
        )),
        ..Default::default()
    }
}

/// Upstream HTTP/1.1, as Envoy's `HttpProtocolOptions` extension says it (the extension must
/// name a protocol when it carries other options).
fn http1_upstream() -> upstream_http::HttpProtocolOptions {
    upstream_http::HttpProtocolOptions {
        upstream_protocol_options: Some(
            upstream_http::http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                upstream_http::http_protocol_options::ExplicitHttpConfig {
                    protocol_config: Some(
                        upstream_http::http_protocol_options::explicit_http_config::ProtocolConfig::HttpProtocolOptions(
                            Default::default(),
                        ),
                    ),
                },
            ),
        ),
        ..Default::default()
    }
}

/// Upstream requests in the client's protocol (Istio's `useClientProtocol`), at most
/// `max_streams` streams on an HTTP/2 connection when given.
fn client_protocol_upstream(max_streams: Option<u32>) -> upstream_http::HttpProtocolOptions {
    use upstream_http::http_protocol_options::{UpstreamProtocolOptions, UseDownstreamHttpConfig};
    upstream_http::HttpProtocolOptions {
        upstream_protocol_options: Some(UpstreamProtocolOptions::UseDownstreamProtocolConfig(
            UseDownstreamHttpConfig {
                http_protocol_options: Some(Default::default()),
                http2_protocol_options: Some(core::Http2ProtocolOptions {
                    max_concurrent_streams: max_streams.and_then(u32v),
                    ..Default::default()
                }),
                http3_protocol_options: None,
            },
        )),
        ..Default::default()
    }
}

/// Upstream HTTP/2, as Envoy's `HttpProtocolOptions` extension says it.
/// An HTTP/2 upstream, opening at most `max_streams` streams on a connection when given.
fn http2_upstream(max_streams: Option<u32>) -> upstream_http::HttpProtocolOptions {
    upstream_http::HttpProtocolOptions {
        upstream_protocol_options: Some(upstream_http::http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
            upstream_http::http_protocol_options::ExplicitHttpConfig {
                protocol_config: Some(
                    upstream_http::http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                        core::Http2ProtocolOptions {
                            max_concurrent_streams: max_streams.and_then(u32v),
                            ..Default::default()
                        },
                    ),
                ),
            },
        )),
        ..Default::default()
    }
}

fn load_assignment(c: &model::Cluster) -> endpoint::ClusterLoadAssignment {
    // gRPC xDS clients need a locality with a weight; group endpoints by priority and zone.
    let mut zones: BTreeMap<(u32, String), Vec<&model::Endpoint>> = BTreeMap::new();
    for e in &c.endpoints {
        zones
            .entry((e.priority, e.zone.clone().unwrap_or_default()))
            .or_default()
            .push(e);
    }
    // Envoy's priorities count up from 0 without gaps.
    let mut priorities: Vec<u32> = zones.keys().map(|(p, _)| *p).collect();
    priorities.dedup();
    endpoint::ClusterLoadAssignment {
        cluster_name: c.name.clone(),
        endpoints: zones
            .into_iter()
            .map(|((priority, zone), eps)| endpoint::LocalityLbEndpoints {
                locality: Some(core::Locality {
                    zone,
                    ..Default::default()
                }),
                priority: priorities.binary_search(&priority).unwrap_or_default() as u32,
                load_balancing_weight: u32v(eps.iter().map(|e| e.weight.max(1)).sum()),
                lb_endpoints: eps
                    .iter()
                    .map(|e| endpoint::LbEndpoint {
                        host_identifier: Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(endpoint::Endpoint {
                            address: Some(socket(&e.address, e.port)),
                            ..Default::default()
                        })),
                        health_status: if e.ready {
                            core::HealthStatus::Healthy
                        } else {
                            core::HealthStatus::Unhealthy
                        } as i32,
                        load_balancing_weight: u32v(e.weight.max(1)),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::listener::v3::Listener;

    fn snapshot() -> Snapshot {
        let mut r = ferrum_snapshot::Resources::default();
        r.add_yaml(
            "t.yaml",
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: gw}\n\
             spec: {gatewayClassName: ferrum, listeners: [{name: h, port: 8080, protocol: HTTP}]}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80}]}\n---\n\
             apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\n\
             spec: {parentRefs: [{name: gw}], hostnames: [a.example.com, \"*.example.org\"], rules: [{backendRefs: [{name: s, port: 80}]}]}\n",
        )
        .unwrap();
        ferrum_snapshot::translate(&r, 1, &Default::default()).snapshot
    }

    #[test]
    fn a_rule_with_nothing_to_send_to_answers_500_with_ferrum_dps_reason() {
        let t = |cluster: Option<&str>, weight| model::WeightedCluster {
            cluster: cluster.map(String::from),
            weight,
            headers: None,
        };
        assert_eq!(local_error(&[t(None, 1)]), Some(BACKEND_NOT_FOUND));
        assert_eq!(local_error(&[t(None, 1), t(Some("c"), 0)]), Some(BACKEND_NOT_FOUND));
        assert_eq!(local_error(&[t(Some("c"), 0)]), Some(NO_WEIGHTED_BACKEND));
        assert_eq!(local_error(&[t(None, 1), t(Some("c"), 1)]), None, "c takes its share");
        let route = |targets| model::Route::forward("r".into(), targets);
        let r = envoy_route(&route(vec![t(None, 1)]), &Default::default(), &mut Vec::new());
        assert!(matches!(r.action, Some(route::route::Action::DirectResponse(ref d)) if d.status == 500));
        let header = r.response_headers_to_add[0].header.clone().unwrap();
        assert_eq!(
            (header.key.as_str(), header.value.as_str()),
            ("x-ferrum-error", BACKEND_NOT_FOUND)
        );

        // A route that answers itself (Istio `directResponse`) is Envoy's direct response.
        let mut own = route(vec![t(None, 1)]);
        own.direct_response = Some(model::DirectResponse {
            status: 503,
            body: "down for maintenance".into(),
        });
        let r = envoy_route(&own, &Default::default(), &mut Vec::new());
        let Some(route::route::Action::DirectResponse(d)) = r.action else {
            panic!("{r:?}")
        };
        assert_eq!(d.status, 503);
        assert_eq!(
            d.body.and_then(|b| b.specifier),
            Some(core::data_source::Specifier::InlineString(
                "down for maintenance".into()
            ))
        );
        assert!(r.response_headers_to_add.is_empty(), "not an error");
    }

    #[test]
    fn endpoints_are_grouped_by_priority_and_zone_and_priorities_count_from_zero() {
        let ep = |port, zone: &str, priority| model::Endpoint {
            zone: Some(zone.into()),
            priority,
            ..model::Endpoint::new("10.0.0.1", port)
        };
        let c = model::Cluster::new("c", vec![ep(1, "b", 0), ep(2, "a", 0), ep(3, "a", 5), ep(4, "a", 0)]);
        let got: Vec<(u32, String, Vec<u32>)> = load_assignment(&c)
            .endpoints
            .iter()
            .map(|l| {
                let ports = l
                    .lb_endpoints
                    .iter()
                    .map(|e| match &e.host_identifier {
                        Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(e)) => {
                            match e.address.as_ref().and_then(|a| a.address.as_ref()) {
                                Some(core::address::Address::SocketAddress(s)) => match s.port_specifier {
                                    Some(core::socket_address::PortSpecifier::PortValue(p)) => p,
                                    _ => 0,
                                },
                                _ => 0,
                            }
                        }
                        _ => 0,
                    })
                    .collect();
                (l.priority, l.locality.clone().unwrap_or_default().zone, ports)
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (0, "a".into(), vec![2, 4]),
                (0, "b".into(), vec![1]),
                (1, "a".into(), vec![3]),
            ],
            "priority 5 is Envoy's 1: no gaps"
        );
    }

    #[test]
    fn a_routes_mirror_is_envoys_request_mirror_policy_per_million() {
        let p = mirror_policy(&model::Mirror {
            cluster: "service/default/s:80".into(),
            per_million: 250_000,
        });
        let f = p.runtime_fraction.unwrap().default_value.unwrap();
        assert_eq!(
            (p.cluster.as_str(), f.numerator, f.denominator),
            ("service/default/s:80", 250_000, 2),
            "MILLION is denominator 2"
        );
        assert!(!p.disable_shadow_host_suffix_append, "the copy's host says -shadow");
    }

    #[test]
    fn every_type_and_api_listeners_for_concrete_hostnames() {
        let out = translate(&snapshot(), &Default::default());
        assert_eq!(out.by_type[LISTENER].len(), 1);
        assert_eq!(
            out.by_type[CLUSTER].keys().collect::<Vec<_>>(),
            vec!["service/default/s:80"]
        );
        assert_eq!(out.by_type[ENDPOINT].len(), 1);
        let routes: Vec<&String> = out.by_type[ROUTE].keys().collect();
        assert_eq!(routes, vec!["api/a.example.com", "routes/0.0.0.0:8080"]);
        assert_eq!(
            out.api_listeners.keys().collect::<Vec<_>>(),
            vec!["a.example.com"],
            "wildcards are no gRPC targets"
        );
        let l = Listener::decode(&out.api_listeners["a.example.com"].value[..]).unwrap();
        assert!(l.api_listener.is_some() && l.address.is_none());
    }
}
