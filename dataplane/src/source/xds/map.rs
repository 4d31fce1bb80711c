//! Envoy v3 resources → snapshot: the subset ferrum-dp can serve exactly. Anything else is an
//! error naming the resource and field, which the client sends back as a NACK.

use std::collections::BTreeMap;
use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3 as cluster;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as endpoint;
use envoy_types::pb::envoy::config::listener::v3 as listener;
use envoy_types::pb::envoy::config::route::v3 as route;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp_proxy;
use envoy_types::pb::envoy::extensions::upstreams::http::v3 as upstream_http;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration};
use ferrum_snapshot::model::{
    Action, CircuitBreaker, ClusterTimeouts, Endpoint, HeaderModifier, HealthCheck, KeyMatch, LbPolicy, Listener,
    Mirror, OutlierDetection, PathMatch, PathRewrite, Protocol, Redirect, Rewrite, Route, RouteMatch, RouteTimeouts,
    StringMatch, UpstreamProtocol, VirtualHost, WeightedCluster,
};
use ferrum_snapshot::{Snapshot, model};
use prost::Message;

use envoy_types::pb::envoy::extensions::filters::listener::proxy_protocol::v3::ProxyProtocol;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use ferrum_proto::xds::{HCM, LOCAL_RATE_LIMIT_FILTER, PROXY_PROTOCOL, PROXY_PROTOCOL_FILTER, RATE_LIMIT_FILTER};

use super::traffic::{self, RoutePolicies};
pub use ferrum_proto::xds::{CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET};
const DOWNSTREAM_TLS: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
const HTTP_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
const TCP_PROXY: &str = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
const TLS_INSPECTOR: &str = "envoy.filters.listener.tls_inspector";
const ROUTER: &str = "envoy.filters.http.router";

/// The Envoy resources the client holds, by type and name.
#[derive(Default, Clone)]
pub struct EnvoyResources {
    pub listeners: BTreeMap<String, listener::Listener>,
    pub routes: BTreeMap<String, route::RouteConfiguration>,
    pub clusters: BTreeMap<String, cluster::Cluster>,
    pub endpoints: BTreeMap<String, endpoint::ClusterLoadAssignment>,
    /// SDS: key pairs by name (only ever kept in memory, never in a snapshot).
    pub secrets: BTreeMap<String, tls::Secret>,
}

/// Why xDS resources cannot be served: the resource (and field) at fault and why. Its text is
/// the NACK's `error_detail`.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("resource of type {got} where {want} was expected")]
    WrongType { got: String, want: String },
    #[error("{want} does not decode: {source}")]
    Decode { want: String, source: prost::DecodeError },
    #[error("{at}: {reason}")]
    Refused { at: String, reason: String },
    #[error("{at}: {source}")]
    Within { at: String, source: Box<MapError> },
}

impl MapError {
    pub(super) fn refused(at: &str, reason: impl Into<String>) -> MapError {
        MapError::Refused {
            at: at.to_string(),
            reason: reason.into(),
        }
    }

    /// The same error, found inside `at`.
    pub(super) fn within(self, at: &str) -> MapError {
        MapError::Within {
            at: at.to_string(),
            source: Box::new(self),
        }
    }
}

pub fn decode<M: Message + Default>(a: &Any, want: &str) -> Result<M, MapError> {
    if a.type_url != want {
        return Err(MapError::WrongType {
            got: a.type_url.clone(),
            want: want.to_string(),
        });
    }
    M::decode(&a.value[..]).map_err(|source| MapError::Decode {
        want: want.to_string(),
        source,
    })
}

fn ms(d: &Option<PbDuration>) -> Option<u64> {
    d.as_ref()
        .map(|d| (d.seconds.max(0) as u64) * 1000 + (d.nanos.max(0) as u64) / 1_000_000)
}

/// The route configuration a listener takes its routes from, by name (RDS) or inline.
pub enum RouteSource {
    /// TCP proxy filter chains, each with the SNI names it matches (none: any); `tls` when the
    /// listener reads SNI (a TLS inspector) or terminates TLS.
    Tcp {
        tls: bool,
        chains: Vec<(Vec<String>, tcp_proxy::TcpProxy)>,
    },
    Rds(String),
    Inline(Box<route::RouteConfiguration>),
}

/// A listener's HTTP connection manager's route source; any other shape is refused.
pub fn listener_routes(l: &listener::Listener) -> Result<RouteSource, MapError> {
    let name = format!("Listener {}", l.name);
    let at = |what: &str| MapError::refused(&name, what);
    if l.api_listener.is_some() {
        return Err(at("api_listener is for gRPC clients, not a proxy"));
    }
    if let Some(tcp) = tcp_chains(l)? {
        return Ok(tcp);
    }
    let [chain] = &l.filter_chains[..] else {
        return Err(at("exactly one filter chain is supported"));
    };
    let [filter] = &chain.filters[..] else {
        return Err(at(
            "exactly one network filter (the HTTP connection manager) is supported",
        ));
    };
    let Some(listener::filter::ConfigType::TypedConfig(tc)) = &filter.config_type else {
        return Err(at("the network filter needs a typed_config"));
    };
    let m: hcm::HttpConnectionManager = decode(tc, HCM).map_err(|e| e.within(&name))?;
    // A filter this proxy would skip may be the one enforcing a policy (RBAC, JWT): refused,
    // unless the server marked it optional or disabled.
    if let Some(f) = m.http_filters.iter().find(|f| {
        ![ROUTER, CORS_FILTER, LOCAL_RATE_LIMIT_FILTER].contains(&f.name.as_str())
            && !super::rate_limit::ferrum_global_filter(f)
            && !f.is_optional
            && !f.disabled
    }) {
        return Err(at(&format!(
            "HTTP filter {} is not supported (only the router, CORS, local rate limits and Ferrum's rate limit service are); refused rather than skipped",
            f.name
        )));
    }
    match m.route_specifier {
        Some(hcm::http_connection_manager::RouteSpecifier::Rds(r)) => Ok(RouteSource::Rds(r.route_config_name)),
        Some(hcm::http_connection_manager::RouteSpecifier::RouteConfig(rc)) => Ok(RouteSource::Inline(Box::new(rc))),
        _ => Err(at("routes must come from RDS or be inline")),
    }
}

/// How the listener learns the client's address: Envoy's PROXY protocol listener filter (the
/// header required, as Envoy requires it by default) and its connection manager's
/// `xff_num_trusted_hops`.
fn client_address(l: &listener::Listener) -> Result<model::ClientAddress, MapError> {
    let name = format!("Listener {}", l.name);
    let mut out = model::ClientAddress::default();
    for f in l.listener_filters.iter().filter(|f| f.name == PROXY_PROTOCOL_FILTER) {
        if let Some(listener::listener_filter::ConfigType::TypedConfig(tc)) = &f.config_type {
            let p: ProxyProtocol = decode(tc, PROXY_PROTOCOL).map_err(|e| e.within(&name))?;
            if p.allow_requests_without_proxy_protocol {
                return Err(MapError::refused(
                    &name,
                    "allow_requests_without_proxy_protocol is not supported: the header is required",
                ));
            }
        }
        out.proxy_protocol = true;
    }
    let managers = l
        .filter_chains
        .iter()
        .flat_map(|c| &c.filters)
        .filter_map(|f| match &f.config_type {
            Some(listener::filter::ConfigType::TypedConfig(tc)) if tc.type_url == HCM => Some(tc),
            _ => None,
        });
    for tc in managers {
        let m: hcm::HttpConnectionManager = decode(tc, HCM).map_err(|e| e.within(&name))?;
        out.xff_trusted_hops = u8::try_from(m.xff_num_trusted_hops).map_err(|_| {
            MapError::refused(
                &name,
                format!("xff_num_trusted_hops {} is too many", m.xff_num_trusted_hops),
            )
        })?;
    }
    Ok(out)
}

/// A listener whose filter chains are each one TCP proxy; `None` for any other shape.
fn tcp_chains(l: &listener::Listener) -> Result<Option<RouteSource>, MapError> {
    let proxy = |c: &listener::FilterChain| match c.filters.last()?.config_type.as_ref()? {
        listener::filter::ConfigType::TypedConfig(tc) if tc.type_url == TCP_PROXY => Some(tc.clone()),
        _ => None,
    };
    if l.filter_chains.is_empty() || l.filter_chains.iter().any(|c| proxy(c).is_none()) {
        return Ok(None);
    }
    for (i, c) in l.filter_chains.iter().enumerate() {
        if let [f, _, ..] = &c.filters[..] {
            return Err(MapError::refused(
                &format!("Listener {}: filter_chains[{i}]", l.name),
                format!(
                    "network filter {} before the TCP proxy is not supported; refused rather than skipped",
                    f.name
                ),
            ));
        }
    }
    let mut chains = Vec::new();
    for (i, c) in l.filter_chains.iter().enumerate() {
        let tc = proxy(c).expect("checked above");
        let p: tcp_proxy::TcpProxy =
            decode(&tc, TCP_PROXY).map_err(|e| e.within(&format!("Listener {}: filter_chains[{i}]", l.name)))?;
        let names = c
            .filter_chain_match
            .as_ref()
            .map(|m| m.server_names.clone())
            .unwrap_or_default();
        chains.push((names, p));
    }
    let tls = l.listener_filters.iter().any(|f| f.name == TLS_INSPECTOR)
        || l.filter_chains.iter().any(|c| c.transport_socket.is_some());
    Ok(Some(RouteSource::Tcp { tls, chains }))
}

/// The virtual hosts of TCP proxy filter chains: one per SNI name (`*` for a chain that
/// matches any), each forwarding to the proxy's cluster(s).
fn tcp_hosts(
    listener: &str,
    chains: &[(Vec<String>, tcp_proxy::TcpProxy)],
    known: &dyn Fn(&str) -> bool,
) -> Result<Vec<Arc<VirtualHost>>, MapError> {
    use tcp_proxy::tcp_proxy::ClusterSpecifier;
    let mut out: Vec<Arc<VirtualHost>> = Vec::new();
    for (i, (names, p)) in chains.iter().enumerate() {
        let targets = match &p.cluster_specifier {
            Some(ClusterSpecifier::Cluster(c)) => weighted([(c.as_str(), 1)], known),
            Some(ClusterSpecifier::WeightedClusters(w)) => {
                weighted(w.clusters.iter().map(|c| (c.name.as_str(), c.weight)), known)
            }
            None => {
                return Err(MapError::refused(
                    &format!("Listener {listener}: filter_chains[{i}]"),
                    "the TCP proxy names no cluster",
                ));
            }
        };
        let name = if p.stat_prefix.is_empty() {
            format!("{listener}/{i}")
        } else {
            p.stat_prefix.clone()
        };
        let route = Arc::new(Route::forward(name, targets));
        let hosts = if names.is_empty() {
            vec!["*".to_string()]
        } else {
            names.clone()
        };
        for hostname in hosts {
            if out.iter().any(|v| v.hostname == hostname) {
                return Err(MapError::refused(
                    &format!("Listener {listener}"),
                    format!("two filter chains match server name {hostname:?}"),
                ));
            }
            out.push(Arc::new(VirtualHost {
                hostname,
                routes: vec![route.clone()],
            }));
        }
    }
    Ok(out)
}

/// Forwarding targets by cluster name and weight; a cluster this client does not know is a
/// backend that did not resolve.
/// A weighted cluster's own header edits (a backendRef's filters, as the operator sends them).
fn backend_headers(
    c: &route::weighted_cluster::ClusterWeight,
    at: &str,
) -> Result<Option<Box<model::BackendHeaders>>, MapError> {
    let h = model::BackendHeaders {
        request: headers(&c.request_headers_to_add, &c.request_headers_to_remove, at)?,
        response: headers(&c.response_headers_to_add, &c.response_headers_to_remove, at)?,
    };
    Ok(Some(Box::new(h)).filter(|h| **h != model::BackendHeaders::default()))
}

fn weighted<'a>(
    clusters: impl IntoIterator<Item = (&'a str, u32)>,
    known: &dyn Fn(&str) -> bool,
) -> Vec<WeightedCluster> {
    clusters
        .into_iter()
        .map(|(c, weight)| WeightedCluster {
            cluster: Some(c.to_string()).filter(|c| known(c)),
            weight,
            headers: None,
        })
        .collect()
}

/// A listener's TLS termination: the SDS secrets its certificates come from (over ADS), or
/// `None` for plaintext.
pub fn listener_tls(l: &listener::Listener) -> Result<Option<Vec<String>>, MapError> {
    let name = format!("Listener {}: filter_chains[0].transport_socket", l.name);
    let at = |what: &str| MapError::refused(&name, what);
    let Some(ts) = l.filter_chains.first().and_then(|c| c.transport_socket.as_ref()) else {
        return Ok(None);
    };
    let Some(core::transport_socket::ConfigType::TypedConfig(tc)) = &ts.config_type else {
        return Err(at("needs a typed_config"));
    };
    let ctx: tls::DownstreamTlsContext = decode(tc, DOWNSTREAM_TLS).map_err(|e| e.within(&name))?;
    if ctx.require_client_certificate.is_some_and(|b| b.value) {
        return Err(at("client certificates are not supported"));
    }
    let common = ctx.common_tls_context.unwrap_or_default();
    if !common.tls_certificates.is_empty() {
        return Err(at("inline tls_certificates are not accepted: serve key pairs over SDS"));
    }
    let names: Vec<String> = common
        .tls_certificate_sds_secret_configs
        .iter()
        .map(|s| ads_secret(s).ok_or_else(|| at("SDS secrets must come over ADS")))
        .collect::<Result<_, _>>()?;
    if names.is_empty() {
        return Err(at("no certificate"));
    }
    Ok(Some(names))
}

/// The name of an SDS secret served over ADS (`None`: from elsewhere, which is not followed).
pub fn ads_secret(s: &tls::SdsSecretConfig) -> Option<String> {
    let ads = s.sds_config.as_ref().is_some_and(|c| {
        matches!(
            c.config_source_specifier,
            Some(core::config_source::ConfigSourceSpecifier::Ads(_))
        )
    });
    ads.then(|| s.name.clone())
}

/// The SDS secret a cluster's client certificate comes from (mutual TLS to its endpoints).
pub fn client_certificate_sds(c: &cluster::Cluster) -> Option<String> {
    let tls = traffic::upstream_tls(c.transport_socket.as_ref()?, &c.name).ok()?;
    match tls.client_certificate? {
        model::CertSource::Secret { name, .. } => Some(name),
        model::CertSource::Files { .. } => None,
    }
}

/// An SDS secret's key pair (inline PEM only: files would be the server's, not ours).
fn key_pair(s: &tls::Secret) -> Result<ferrum_snapshot::TlsSecret, MapError> {
    use core::data_source::Specifier;
    let name = format!("Secret {}", s.name);
    let at = |what: &str| MapError::refused(&name, what);
    let Some(tls::secret::Type::TlsCertificate(c)) = &s.r#type else {
        return Err(at("only tls_certificate secrets are supported"));
    };
    let inline = |d: &Option<core::DataSource>, field: &str| match d.as_ref().and_then(|d| d.specifier.as_ref()) {
        Some(Specifier::InlineString(v)) => Ok(v.clone()),
        Some(Specifier::InlineBytes(v)) => {
            String::from_utf8(v.clone()).map_err(|_| at(&format!("{field} is not UTF-8 PEM")))
        }
        _ => Err(at(&format!("{field} must be inline PEM"))),
    };
    Ok(ferrum_snapshot::TlsSecret {
        cert: inline(&c.certificate_chain, "certificate_chain")?,
        key: inline(&c.private_key, "private_key")?,
    })
}

fn socket(a: &Option<core::Address>) -> Option<(String, u16)> {
    match a.as_ref()?.address.as_ref()? {
        core::address::Address::SocketAddress(s) => match s.port_specifier {
            Some(core::socket_address::PortSpecifier::PortValue(p)) => {
                Some((s.address.clone(), u16::try_from(p).ok()?))
            }
            _ => None,
        },
        _ => None,
    }
}

pub(super) fn string_match(m: &matcher::StringMatcher, at: &str) -> Result<StringMatch, MapError> {
    use matcher::string_matcher::MatchPattern;
    if m.ignore_case {
        return Err(MapError::refused(at, "ignore_case is not supported"));
    }
    match &m.match_pattern {
        Some(MatchPattern::Exact(s)) => Ok(StringMatch::Exact(s.clone())),
        Some(MatchPattern::SafeRegex(r)) => Ok(StringMatch::Regex(r.regex.clone())),
        Some(MatchPattern::Prefix(p)) => Ok(StringMatch::Regex(format!("{}.*", regex::escape(p)))),
        _ => Err(MapError::refused(
            at,
            "only exact, prefix and safe_regex string matches are supported",
        )),
    }
}

fn headers(opts: &[core::HeaderValueOption], remove: &[String], at: &str) -> Result<HeaderModifier, MapError> {
    use core::header_value_option::HeaderAppendAction;
    let mut m = HeaderModifier {
        remove: remove.iter().map(|h| h.to_ascii_lowercase()).collect(),
        ..Default::default()
    };
    for o in opts {
        let h = o
            .header
            .as_ref()
            .ok_or_else(|| MapError::refused(at, "a header option without a header"))?;
        let kv = (h.key.to_ascii_lowercase(), h.value.clone());
        match HeaderAppendAction::try_from(o.append_action) {
            Ok(HeaderAppendAction::AppendIfExistsOrAdd) => m.add.push(kv),
            Ok(HeaderAppendAction::OverwriteIfExistsOrAdd) => m.set.push(kv),
            _ => {
                return Err(MapError::refused(
                    at,
                    format!("header {}: only append or overwrite actions are supported", h.key),
                ));
            }
        }
    }
    Ok(m)
}

/// `known`: whether a cluster exists; a route to one that does not answers 500, as Envoy's 503.
fn route_entry(r: &route::Route, at: &str, known: &dyn Fn(&str) -> bool) -> Result<Route, MapError> {
    let at = format!("{at} route {:?}", r.name);
    let m = r.r#match.as_ref().ok_or_else(|| MapError::refused(&at, "no match"))?;
    let mut out = Route::forward(r.name.clone(), Vec::new());
    out.matcher = route_match(m, &at)?;
    out.request_headers = headers(&r.request_headers_to_add, &r.request_headers_to_remove, &at)?;
    out.response_headers = headers(&r.response_headers_to_add, &r.response_headers_to_remove, &at)?;
    out.action = match &r.action {
        Some(route::route::Action::Route(ra)) => {
            let (targets, rewrite, timeouts) = forward(ra, &out.matcher.path, &at, known)?;
            (out.rewrite, out.timeouts) = (rewrite, timeouts);
            out.set_mirrors(mirrors(&ra.request_mirror_policies, &at, known)?);
            out.cors = r
                .typed_per_filter_config
                .get(CORS_FILTER)
                .map(|c| cors(c, &at))
                .transpose()?;
            Action::Forward(targets)
        }
        Some(route::route::Action::Redirect(rd)) => Action::Redirect(redirect(rd, &at)?),
        // The 500 ferrum-dp answers for a rule without a backend to send to.
        Some(route::route::Action::DirectResponse(d)) if d.status == 500 && d.body.is_none() => {
            let no_weight = r.response_headers_to_add.iter().any(|h| {
                h.header.as_ref().is_some_and(|h| {
                    h.key.eq_ignore_ascii_case("x-ferrum-error") && h.value == ferrum_proto::xds::NO_WEIGHTED_BACKEND
                })
            });
            Action::Forward(vec![WeightedCluster {
                cluster: None,
                weight: u32::from(!no_weight),
                headers: None,
            }])
        }
        // Any other direct response: the route answers itself.
        Some(route::route::Action::DirectResponse(d)) => {
            use core::data_source::Specifier;
            let body = match d.body.as_ref().and_then(|b| b.specifier.as_ref()) {
                None => String::new(),
                Some(Specifier::InlineString(s)) => s.clone(),
                Some(Specifier::InlineBytes(b)) => String::from_utf8(b.clone())
                    .map_err(|_| MapError::refused(&at, "a direct response body must be UTF-8"))?,
                Some(_) => return Err(MapError::refused(&at, "a direct response body must be inline")),
            };
            out.direct_response = Some(model::DirectResponse {
                status: u16::try_from(d.status).unwrap_or(0),
                body,
            });
            Action::Forward(vec![WeightedCluster {
                cluster: None,
                weight: 1,
                headers: None,
            }])
        }
        _ => {
            return Err(MapError::refused(
                &at,
                "only route, redirect and direct response actions are supported",
            ));
        }
    };
    if let Some(c) = r.typed_per_filter_config.get(LOCAL_RATE_LIMIT_FILTER) {
        out.rate_limits = super::rate_limit::policies(c, &r.name, &at)?;
    }
    if let Some(c) = r.typed_per_filter_config.get(RATE_LIMIT_FILTER) {
        out.rate_limits.extend(super::rate_limit::global_policies(c, &at)?);
    }
    Ok(out)
}

/// A route's path, header and query conditions.
fn route_match(m: &route::RouteMatch, at: &str) -> Result<RouteMatch, MapError> {
    if m.case_sensitive.as_ref().is_some_and(|c| !c.value) {
        return Err(MapError::refused(at, "case-insensitive paths are not supported"));
    }
    let mut matcher = RouteMatch {
        path: path_match(m.path_specifier.as_ref(), at)?,
        ..Default::default()
    };
    for h in &m.headers {
        match (h.name.as_str(), header_match(h, at)?) {
            (":method", StringMatch::Exact(m)) => matcher.method = Some(m),
            (n, _) if n.starts_with(':') => {
                let why = format!("pseudo-header {n} matches are not supported");
                return Err(MapError::refused(at, why));
            }
            (n, value) => matcher.headers.push(KeyMatch {
                name: n.to_ascii_lowercase(),
                value,
            }),
        }
    }
    for q in &m.query_parameters {
        use route::query_parameter_matcher::QueryParameterMatchSpecifier;
        let value = match &q.query_parameter_match_specifier {
            Some(QueryParameterMatchSpecifier::StringMatch(s)) => string_match(s, &format!("{at}: query {}", q.name))?,
            _ => {
                let why = format!("query {}: only string matches are supported", q.name);
                return Err(MapError::refused(at, why));
            }
        };
        matcher.query_params.push(KeyMatch {
            name: q.name.clone(),
            value,
        });
    }
    Ok(matcher)
}

/// A route's path condition.
fn path_match(p: Option<&route::route_match::PathSpecifier>, at: &str) -> Result<PathMatch, MapError> {
    use route::route_match::PathSpecifier;
    Ok(match p {
        Some(PathSpecifier::Prefix(p)) if p == "/" || p.is_empty() => PathMatch::Prefix("/".into()),
        // Envoy prefixes are plain string prefixes; ours are by segment, so say it as a regex.
        Some(PathSpecifier::Prefix(p)) => PathMatch::Regex(format!("{}.*", regex::escape(p))),
        Some(PathSpecifier::PathSeparatedPrefix(p)) => PathMatch::Prefix(p.trim_end_matches('/').to_string()),
        Some(PathSpecifier::Path(p)) => PathMatch::Exact(p.clone()),
        Some(PathSpecifier::SafeRegex(re)) => PathMatch::Regex(re.regex.clone()),
        _ => {
            let why = "only prefix, path, path_separated_prefix and safe_regex paths are supported";
            return Err(MapError::refused(at, why));
        }
    })
}

/// A header condition's value match (string matches only, not inverted).
fn header_match(h: &route::HeaderMatcher, at: &str) -> Result<StringMatch, MapError> {
    use route::header_matcher::HeaderMatchSpecifier;
    if h.invert_match {
        return Err(MapError::refused(
            at,
            format!("header {}: invert_match is not supported", h.name),
        ));
    }
    match &h.header_match_specifier {
        Some(HeaderMatchSpecifier::StringMatch(s)) => string_match(s, &format!("{at}: header {}", h.name)),
        _ => Err(MapError::refused(
            at,
            format!("header {}: only string matches are supported", h.name),
        )),
    }
}

/// A route action's targets, rewrite and timeouts; `path` is the route's path match.
fn forward(
    ra: &route::RouteAction,
    path: &PathMatch,
    at: &str,
    known: &dyn Fn(&str) -> bool,
) -> Result<(Vec<WeightedCluster>, Option<Rewrite>, RouteTimeouts), MapError> {
    use route::route_action::{ClusterSpecifier, HostRewriteSpecifier};
    let targets = match &ra.cluster_specifier {
        Some(ClusterSpecifier::Cluster(c)) => weighted([(c.as_str(), 1)], known),
        Some(ClusterSpecifier::WeightedClusters(w)) => {
            let live: Vec<_> = w
                .clusters
                .iter()
                .filter(|c| c.weight.as_ref().is_none_or(|w| w.value > 0))
                .collect();
            let mut targets = weighted(
                live.iter()
                    .map(|c| (c.name.as_str(), c.weight.as_ref().map_or(1, |w| w.value))),
                known,
            );
            for (t, c) in targets.iter_mut().zip(&live) {
                t.headers = backend_headers(c, at)?;
            }
            targets
        }
        _ => {
            return Err(MapError::refused(
                at,
                "only cluster and weighted_clusters targets are supported",
            ));
        }
    };
    let mut rewrite = Rewrite::default();
    if let Some(HostRewriteSpecifier::HostRewriteLiteral(h)) = &ra.host_rewrite_specifier {
        rewrite.hostname = Some(h.clone());
    }
    if !ra.prefix_rewrite.is_empty() {
        if !matches!(path, PathMatch::Prefix(_)) {
            return Err(MapError::refused(
                at,
                "prefix_rewrite needs a path_separated_prefix match",
            ));
        }
        rewrite.path = Some(PathRewrite::Prefix(ra.prefix_rewrite.clone()));
    }
    if let Some(rr) = &ra.regex_rewrite {
        // Only the whole-path replacement is ours to express.
        match rr.pattern.as_ref().map(|p| p.regex.as_str()) {
            Some("^/.*$") | Some("^.*$") => rewrite.path = Some(PathRewrite::Full(rr.substitution.clone())),
            _ => {
                return Err(MapError::refused(
                    at,
                    "regex_rewrite must replace the whole path (^/.*$)",
                ));
            }
        }
    }
    let timeouts = RouteTimeouts {
        request_ms: ms(&ra.timeout).filter(|t| *t > 0),
        backend_request_ms: ra.retry_policy.as_ref().and_then(|p| ms(&p.per_try_timeout)),
        // A route timeout (`0s`: none) governs alone; without one, Envoy's 15 s default is the
        // cluster's read timeout here.
        unbounded: ra.timeout.is_some(),
    };
    Ok((targets, Some(rewrite).filter(|r| *r != Rewrite::default()), timeouts))
}

/// Envoy's CORS filter, whose per-route config is a route's CORS policy.
const CORS_FILTER: &str = "envoy.filters.http.cors";

/// A route's CORS policy (`typed_per_filter_config` of the CORS filter): origins by exact,
/// prefix, suffix or regex match.
fn cors(a: &Any, at: &str) -> Result<model::Cors, MapError> {
    use envoy_types::pb::envoy::extensions::filters::http::cors::v3::CorsPolicy;
    use matcher::string_matcher::MatchPattern;
    let p: CorsPolicy = decode(
        a,
        "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy",
    )
    .map_err(|e| e.within(at))?;
    let origin = |m: &matcher::StringMatcher| match &m.match_pattern {
        Some(MatchPattern::Exact(e)) if !m.ignore_case => Ok(StringMatch::Exact(e.clone())),
        Some(MatchPattern::Exact(e)) => Ok(StringMatch::Regex(format!("(?i){}", regex::escape(e)))),
        Some(MatchPattern::Prefix(x)) => Ok(StringMatch::Regex(format!("{}.*", regex::escape(x)))),
        Some(MatchPattern::Suffix(x)) => Ok(StringMatch::Regex(format!(".*{}", regex::escape(x)))),
        Some(MatchPattern::SafeRegex(r)) => Ok(StringMatch::Regex(r.regex.clone())),
        _ => Err(MapError::refused(
            at,
            "CORS origins: exact, prefix, suffix or safe_regex",
        )),
    };
    let list = |s: &str| {
        s.split(',')
            .map(str::trim)
            .filter(|x| !x.is_empty())
            .map(String::from)
            .collect()
    };
    Ok(model::Cors {
        allow_origins: p
            .allow_origin_string_match
            .iter()
            .map(origin)
            .collect::<Result<_, _>>()?,
        allow_methods: list(&p.allow_methods),
        allow_headers: list(&p.allow_headers),
        expose_headers: list(&p.expose_headers),
        max_age_s: p.max_age.parse().ok(),
        allow_credentials: p.allow_credentials.is_some_and(|b| b.value),
        answer_unmatched_preflights: p.forward_not_matching_preflights.is_some_and(|b| !b.value),
    })
}

/// A route's request mirrors: each a cluster, by name, and the share of requests copied there
/// (all when no fraction is given, as in Envoy). A mirror to a cluster that does not exist
/// copies nothing.
fn mirrors(
    policies: &[route::route_action::RequestMirrorPolicy],
    at: &str,
    known: &dyn Fn(&str) -> bool,
) -> Result<Vec<Mirror>, MapError> {
    let mut out = Vec::new();
    for m in policies {
        out.extend(mirror(m, at, known)?);
    }
    Ok(out)
}

fn mirror(
    m: &route::route_action::RequestMirrorPolicy,
    at: &str,
    known: &dyn Fn(&str) -> bool,
) -> Result<Option<Mirror>, MapError> {
    use envoy_types::pb::envoy::r#type::v3::fractional_percent::DenominatorType;
    if m.cluster.is_empty() {
        return Err(MapError::refused(
            at,
            "request_mirror_policy: only a cluster by name is supported",
        ));
    }
    let per_million = match m.runtime_fraction.as_ref().and_then(|f| f.default_value.as_ref()) {
        None => 1_000_000,
        Some(f) => {
            let scale: u64 = match DenominatorType::try_from(f.denominator) {
                Ok(DenominatorType::Hundred) => 10_000,
                Ok(DenominatorType::TenThousand) => 100,
                Ok(DenominatorType::Million) => 1,
                Err(_) => return Err(MapError::refused(at, "request_mirror_policy: unknown denominator")),
            };
            (u64::from(f.numerator) * scale).min(1_000_000) as u32
        }
    };
    Ok(known(&m.cluster).then(|| Mirror {
        cluster: m.cluster.clone(),
        per_million,
    }))
}

fn redirect(rd: &route::RedirectAction, at: &str) -> Result<Redirect, MapError> {
    use route::redirect_action::{PathRewriteSpecifier, RedirectResponseCode as Code, SchemeRewriteSpecifier};
    Ok(Redirect {
        scheme: match &rd.scheme_rewrite_specifier {
            Some(SchemeRewriteSpecifier::SchemeRedirect(s)) => Some(s.clone()),
            Some(SchemeRewriteSpecifier::HttpsRedirect(true)) => Some("https".into()),
            _ => None,
        },
        hostname: Some(rd.host_redirect.clone()).filter(|h| !h.is_empty()),
        port: u16::try_from(rd.port_redirect).ok().filter(|p| *p != 0),
        path: match &rd.path_rewrite_specifier {
            Some(PathRewriteSpecifier::PathRedirect(p)) => Some(PathRewrite::Full(p.clone())),
            Some(PathRewriteSpecifier::PrefixRewrite(p)) => Some(PathRewrite::Prefix(p.clone())),
            Some(_) => return Err(MapError::refused(at, "regex path redirects are not supported")),
            None => None,
        },
        status: match Code::try_from(rd.response_code) {
            Ok(Code::MovedPermanently) => 301,
            Ok(Code::SeeOther) => 303,
            Ok(Code::TemporaryRedirect) => 307,
            Ok(Code::PermanentRedirect) => 308,
            _ => 302,
        },
    })
}

fn virtual_hosts(
    rc: &route::RouteConfiguration,
    known: &dyn Fn(&str) -> bool,
) -> Result<Vec<Arc<VirtualHost>>, MapError> {
    let mut by_host: BTreeMap<String, Vec<Arc<Route>>> = BTreeMap::new();
    for vh in &rc.virtual_hosts {
        let at = format!("RouteConfiguration {} virtual host {}", rc.name, vh.name);
        let routes: Vec<Arc<Route>> = vh
            .routes
            .iter()
            .map(|r| route_entry(r, &at, known).map(Arc::new))
            .collect::<Result<_, _>>()?;
        for d in &vh.domains {
            let host = d.split(':').next().unwrap_or(d).to_ascii_lowercase();
            if host != "*" && host.contains('*') && !host.starts_with("*.") {
                return Err(MapError::refused(
                    &at,
                    format!("domain {d:?}: only exact, \"*.suffix\" and \"*\" domains are supported"),
                ));
            }
            if by_host.insert(host, routes.clone()).is_some() {
                return Err(MapError::refused(&at, format!("domain {d:?} appears twice")));
            }
        }
    }
    Ok(by_host
        .into_iter()
        .map(|(hostname, routes)| Arc::new(VirtualHost { hostname, routes }))
        .collect())
}

/// A round-robin or least-request cluster's slow start.
fn slow_start_of(c: &cluster::Cluster) -> Option<model::SlowStart> {
    use cluster::cluster::LbConfig;
    let config = match &c.lb_config {
        Some(LbConfig::RoundRobinLbConfig(rr)) => rr.slow_start_config.as_ref(),
        Some(LbConfig::LeastRequestLbConfig(lr)) => lr.slow_start_config.as_ref(),
        _ => None,
    }?;
    // Envoy leaves an endpoint out of slow start when no window is set.
    let mut out = model::SlowStart::new(ms(&config.slow_start_window).filter(|ms| *ms > 0)?);
    if let Some(a) = &config.aggression {
        out.aggression = a.default_value;
    }
    if let Some(p) = &config.min_weight_percent {
        out.min_weight_percent = p.value;
    }
    Some(out)
}

fn threshold(v: &Option<envoy_types::pb::google::protobuf::UInt32Value>, default: u32) -> u32 {
    v.as_ref().map_or(default, |v| v.value)
}

fn cluster_of(
    c: &cluster::Cluster,
    cla: Option<&endpoint::ClusterLoadAssignment>,
    policies: &RoutePolicies,
) -> Result<model::Cluster, MapError> {
    let name = format!("Cluster {}", c.name);
    let at = |what: &str| MapError::refused(&name, what);
    let lb = lb_of(c)
        .ok_or_else(|| at("lb_policy: only ROUND_ROBIN, LEAST_REQUEST, RANDOM, RING_HASH and MAGLEV are supported"))?;
    let endpoints = endpoints_of(assignment_of(c, cla, &name)?, &name)?;
    let mut out = model::Cluster::new(c.name.clone(), endpoints);
    out.lb = lb;
    out.slow_start = slow_start_of(c);
    // Envoy's default when the cluster names none is 50 %.
    out.panic_threshold_percent = c
        .common_lb_config
        .as_ref()
        .and_then(|l| l.healthy_panic_threshold.as_ref())
        .map_or(50, |p| p.value.clamp(0.0, 100.0).ceil() as u32);
    if let Some(s) = &out.slow_start
        && !(s.aggression > 0.0
            && s.aggression.is_finite()
            && (0.0..=100.0).contains(&s.min_weight_percent)
            && s.window_ms <= 86_400_000)
    {
        return Err(at(
            "slow_start_config: a window of at most 24 h, aggression above 0, min_weight_percent 0 to 100",
        ));
    }
    let d = ClusterTimeouts::default();
    out.timeouts = ClusterTimeouts {
        connect_ms: ms(&c.connect_timeout).unwrap_or(d.connect_ms),
        ..d
    };
    if let Some(t) = c.circuit_breakers.as_ref().and_then(|cb| cb.thresholds.first()) {
        out.circuit_breaker = circuit_breaker_of(t);
    }
    out.outlier_detection = c.outlier_detection.as_ref().map(outlier_detection_of);
    if let Some(hc) = c.health_checks.first() {
        out.health_check = Some(health_check_of(hc, &name)?);
    }
    if let Some(opts) = c.typed_extension_protocol_options.get(HTTP_OPTIONS) {
        http_options(opts, &mut out, &name)?;
    }
    if let Some(ts) = &c.transport_socket {
        out.tls = Some(traffic::upstream_tls(ts, &name)?);
    }
    out.tcp_keepalive = c
        .upstream_connection_options
        .as_ref()
        .and_then(|o| o.tcp_keepalive.as_ref())
        .map(|k| model::TcpKeepalive {
            time_ms: k.keepalive_time.as_ref().map(|s| u64::from(s.value) * 1000),
            interval_ms: k.keepalive_interval.as_ref().map(|s| u64::from(s.value) * 1000),
            probes: k.keepalive_probes.as_ref().map(|p| p.value),
        });
    policies.apply(&mut out, c);
    Ok(out)
}

/// The cluster's balancing, `None` for one ferrum-dp does not do. A hash ring's key comes
/// from the routes (`RoutePolicies::apply`).
fn lb_of(c: &cluster::Cluster) -> Option<LbPolicy> {
    use cluster::cluster::LbPolicy as EnvoyLb;
    match EnvoyLb::try_from(c.lb_policy).ok()? {
        EnvoyLb::RoundRobin => Some(LbPolicy::RoundRobin),
        EnvoyLb::LeastRequest => Some(LbPolicy::LeastRequest),
        EnvoyLb::Random | EnvoyLb::RingHash | EnvoyLb::Maglev => Some(LbPolicy::Random),
        _ => None,
    }
}

/// Where the cluster's endpoints are: its ClusterLoadAssignment (EDS) or inline.
fn assignment_of<'a>(
    c: &'a cluster::Cluster,
    cla: Option<&'a endpoint::ClusterLoadAssignment>,
    name: &str,
) -> Result<&'a endpoint::ClusterLoadAssignment, MapError> {
    use cluster::cluster::{ClusterDiscoveryType, DiscoveryType};
    let at = |what: &str| MapError::refused(name, what);
    match &c.cluster_discovery_type {
        Some(ClusterDiscoveryType::Type(t)) if *t == DiscoveryType::Eds as i32 => {
            cla.ok_or_else(|| at("its ClusterLoadAssignment has not arrived"))
        }
        Some(ClusterDiscoveryType::Type(t))
            if *t == DiscoveryType::Static as i32 || *t == DiscoveryType::StrictDns as i32 =>
        {
            c.load_assignment
                .as_ref()
                .ok_or_else(|| at("load_assignment is missing"))
        }
        _ => Err(at("only EDS, STATIC and STRICT_DNS clusters are supported")),
    }
}

fn circuit_breaker_of(t: &cluster::circuit_breakers::Thresholds) -> CircuitBreaker {
    let d = CircuitBreaker::default();
    CircuitBreaker {
        max_connections: threshold(&t.max_connections, d.max_connections),
        max_pending_requests: threshold(&t.max_pending_requests, d.max_pending_requests),
        max_requests: threshold(&t.max_requests, d.max_requests),
        max_retries: t.max_retries.as_ref().map(|v| v.value),
        max_requests_per_connection: None,
        max_concurrent_streams: None,
    }
}

fn outlier_detection_of(od: &cluster::OutlierDetection) -> OutlierDetection {
    let d = OutlierDetection::default();
    OutlierDetection {
        consecutive_5xx: threshold(&od.consecutive_5xx, d.consecutive_5xx),
        consecutive_connect_failures: threshold(&od.consecutive_gateway_failure, d.consecutive_connect_failures),
        base_ejection_ms: ms(&od.base_ejection_time).unwrap_or(d.base_ejection_ms),
        max_ejection_percent: threshold(&od.max_ejection_percent, d.max_ejection_percent).min(100),
    }
}

/// The cluster's `HttpProtocolOptions`: the protocol it speaks upstream (HTTP/2, or the
/// client's), streams and requests per connection, and how long a connection may live.
fn http_options(opts: &Any, out: &mut model::Cluster, name: &str) -> Result<(), MapError> {
    use upstream_http::http_protocol_options::{UpstreamProtocolOptions, explicit_http_config::ProtocolConfig};
    let o: upstream_http::HttpProtocolOptions =
        decode(opts, &format!("type.googleapis.com/{HTTP_OPTIONS}")).map_err(|e| e.within(name))?;
    let h2 = match o.upstream_protocol_options {
        Some(UpstreamProtocolOptions::ExplicitHttpConfig(e)) => match e.protocol_config {
            Some(ProtocolConfig::Http2ProtocolOptions(h2)) => {
                out.protocol = UpstreamProtocol::Http2;
                Some(h2)
            }
            _ => None,
        },
        Some(UpstreamProtocolOptions::UseDownstreamProtocolConfig(d)) => {
            out.follow_client_protocol = true;
            d.http2_protocol_options
        }
        _ => None,
    };
    out.circuit_breaker.max_concurrent_streams = h2
        .and_then(|h2| h2.max_concurrent_streams)
        .map(|v| v.value)
        .filter(|n| *n > 0);
    let common = o.common_http_protocol_options.unwrap_or_default();
    out.circuit_breaker.max_requests_per_connection =
        common.max_requests_per_connection.map(|v| v.value).filter(|n| *n > 0);
    out.timeouts.max_connection_duration_ms = ms(&common.max_connection_duration).filter(|ms| *ms > 0);
    Ok(())
}

/// The endpoints of a ClusterLoadAssignment, each with its locality's zone and priority.
fn endpoints_of(assignment: &endpoint::ClusterLoadAssignment, name: &str) -> Result<Vec<Endpoint>, MapError> {
    let at = |what: &str| MapError::refused(name, what);
    let mut endpoints = Vec::new();
    for loc in &assignment.endpoints {
        let zone = loc.locality.as_ref().map(|l| l.zone.clone()).filter(|z| !z.is_empty());
        for lb in &loc.lb_endpoints {
            let Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(e)) = &lb.host_identifier else {
                return Err(at("named endpoints are not supported"));
            };
            let (address, port) = socket(&e.address).ok_or_else(|| at("an endpoint without a socket address"))?;
            let health = core::HealthStatus::try_from(lb.health_status).unwrap_or(core::HealthStatus::Unknown);
            endpoints.push(Endpoint {
                address,
                port,
                weight: lb.load_balancing_weight.as_ref().map_or(1, |w| w.value.max(1)),
                identity: None,
                ready: matches!(health, core::HealthStatus::Unknown | core::HealthStatus::Healthy),
                zone: zone.clone(),
                priority: loc.priority,
            });
        }
    }
    Ok(endpoints)
}

fn health_check_of(hc: &core::HealthCheck, name: &str) -> Result<HealthCheck, MapError> {
    let at = |what: &str| MapError::refused(name, what);
    let Some(core::health_check::HealthChecker::HttpHealthCheck(h)) = &hc.health_checker else {
        return Err(at("health_checks[0]: only HTTP health checks are supported"));
    };
    let d = HealthCheck::default();
    Ok(HealthCheck {
        path: h.path.clone(),
        interval_ms: ms(&hc.interval).unwrap_or(d.interval_ms),
        timeout_ms: ms(&hc.timeout).unwrap_or(d.timeout_ms),
        healthy_threshold: threshold(&hc.healthy_threshold, d.healthy_threshold),
        unhealthy_threshold: threshold(&hc.unhealthy_threshold, d.unhealthy_threshold),
        expected_status: match h.expected_statuses.first() {
            Some(r) => (r.start as u16, (r.end - 1) as u16),
            None => d.expected_status,
        },
    })
}

/// The snapshot the resources describe with the key pairs it names, or why they cannot be
/// served. `Ok(None)`: some routes, endpoints or secrets a listener or cluster needs have not
/// arrived yet.
pub fn snapshot(r: &EnvoyResources, version: u64) -> Result<Option<(Snapshot, ferrum_snapshot::Secrets)>, MapError> {
    snapshot_noting(r, version, &std::cell::Cell::new(false))
}

/// [`snapshot`], noting in `unknown` whether a route or TCP proxy names a cluster `r` lacks
/// (it answers 500 / refuses connections in the snapshot).
pub fn snapshot_noting(
    r: &EnvoyResources,
    version: u64,
    unknown: &std::cell::Cell<bool>,
) -> Result<Option<(Snapshot, ferrum_snapshot::Secrets)>, MapError> {
    let mut listeners = Vec::new();
    let mut secrets = ferrum_snapshot::Secrets::new();
    let mut policies = RoutePolicies::default();
    for l in r.listeners.values() {
        let Some(mapped) = listener_of(l, r, unknown, &mut policies, &mut secrets)? else {
            return Ok(None);
        };
        listeners.push(mapped);
    }
    listeners.sort_by(|a, b| (&a.address, a.port).cmp(&(&b.address, b.port)));
    let mut clusters = Vec::new();
    for c in r.clusters.values() {
        let Some(mapped) = cluster_with_secret(c, r, &policies, &mut secrets)? else {
            return Ok(None);
        };
        clusters.push(Arc::new(mapped));
    }
    // Applying validates the rest (the same checks as every other source).
    Ok(Some((Snapshot::new(version, listeners, clusters), secrets)))
}

/// Listener `l`, its route policies noted and its key pairs put in `secrets`; `None` while a
/// route configuration or secret it names has not arrived.
fn listener_of(
    l: &listener::Listener,
    r: &EnvoyResources,
    unknown: &std::cell::Cell<bool>,
    policies: &mut RoutePolicies,
    secrets: &mut ferrum_snapshot::Secrets,
) -> Result<Option<Listener>, MapError> {
    let (address, port) = socket(&l.address)
        .ok_or_else(|| MapError::refused(&format!("Listener {}", l.name), "needs a socket address with a port"))?;
    let known = |c: &str| {
        let k = r.clusters.contains_key(c);
        unknown.set(unknown.get() || !k);
        k
    };
    let (l4, virtual_hosts) = match listener_routes(l)? {
        RouteSource::Inline(rc) => {
            policies.note(&rc)?;
            (None, virtual_hosts(&rc, &known)?)
        }
        RouteSource::Rds(name) => match r.routes.get(&name) {
            Some(rc) => {
                policies.note(rc)?;
                (None, virtual_hosts(rc, &known)?)
            }
            None => return Ok(None),
        },
        RouteSource::Tcp { tls, chains } => (
            Some(if tls { Protocol::Tls } else { Protocol::Tcp }),
            tcp_hosts(&l.name, &chains, &known)?,
        ),
    };
    let mut certificates = Vec::new();
    for name in listener_tls(l)?.unwrap_or_default() {
        let Some(pair) = r.secrets.get(&name).map(key_pair).transpose()? else {
            return Ok(None);
        };
        certificates.push(model::Certificate {
            hostname: None,
            source: model::CertSource::Secret {
                name: name.clone(),
                digest: pair.digest(),
            },
        });
        secrets.insert(name, Arc::new(pair));
    }
    Ok(Some(Listener {
        name: l.name.clone(),
        address,
        port,
        protocol: match l4 {
            Some(p) => p,
            None if certificates.is_empty() => Protocol::Http,
            None => Protocol::Https,
        },
        certificates,
        virtual_hosts,
        // xDS carries no Gateway API policies (RBAC filters are not mapped).
        gateways: Vec::new(),
        gateway_hosts: Vec::new(),
        access_log: false,
        client_address: client_address(l)?,
    }))
}

/// Cluster `c` with its endpoints and the client certificate SDS names for it (put in
/// `secrets`); `None` while its assignment or that secret has not arrived.
fn cluster_with_secret(
    c: &cluster::Cluster,
    r: &EnvoyResources,
    policies: &RoutePolicies,
    secrets: &mut ferrum_snapshot::Secrets,
) -> Result<Option<model::Cluster>, MapError> {
    let eds = matches!(&c.cluster_discovery_type, Some(cluster::cluster::ClusterDiscoveryType::Type(t))
        if *t == cluster::cluster::DiscoveryType::Eds as i32);
    if eds && !r.endpoints.contains_key(&c.name) {
        return Ok(None);
    }
    let mut mapped = cluster_of(c, r.endpoints.get(&c.name), policies)?;
    // The digest is that of the key pair received.
    if let Some(model::CertSource::Secret { name, digest }) =
        mapped.tls.as_mut().and_then(|t| t.client_certificate.as_mut())
    {
        let Some(pair) = r.secrets.get(name.as_str()).map(key_pair).transpose()? else {
            return Ok(None);
        };
        *digest = pair.digest();
        secrets.insert(name.clone(), Arc::new(pair));
    }
    Ok(Some(mapped))
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::protobuf::UInt32Value;

    fn socket_at(ip: &str, port: u32) -> core::Address {
        core::Address {
            address: Some(core::address::Address::SocketAddress(core::SocketAddress {
                address: ip.into(),
                port_specifier: Some(core::socket_address::PortSpecifier::PortValue(port)),
                ..Default::default()
            })),
        }
    }

    fn any(type_url: &str, m: &impl Message) -> Any {
        Any {
            type_url: type_url.into(),
            value: m.encode_to_vec(),
        }
    }

    /// Listener `l` on 0.0.0.0:8080 whose connection manager has `filters` and takes its routes
    /// from RDS `rc`.
    fn http_listener(filters: Vec<hcm::HttpFilter>) -> listener::Listener {
        let manager = hcm::HttpConnectionManager {
            http_filters: filters,
            route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::Rds(hcm::Rds {
                route_config_name: "rc".into(),
                ..Default::default()
            })),
            ..Default::default()
        };
        listener::Listener {
            name: "l".into(),
            address: Some(socket_at("0.0.0.0", 8080)),
            filter_chains: vec![listener::FilterChain {
                filters: vec![listener::Filter {
                    name: "hcm".into(),
                    config_type: Some(listener::filter::ConfigType::TypedConfig(any(HCM, &manager))),
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn filter(name: &str, is_optional: bool) -> hcm::HttpFilter {
        hcm::HttpFilter {
            name: name.into(),
            is_optional,
            ..Default::default()
        }
    }

    fn routes(r#match: route::RouteMatch) -> route::RouteConfiguration {
        route::RouteConfiguration {
            name: "rc".into(),
            virtual_hosts: vec![route::VirtualHost {
                name: "vh".into(),
                domains: vec!["*".into()],
                routes: vec![route::Route {
                    r#match: Some(r#match),
                    action: Some(route::route::Action::Route(route::RouteAction {
                        cluster_specifier: Some(route::route_action::ClusterSpecifier::Cluster("c".into())),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn prefix(p: &str) -> route::RouteMatch {
        route::RouteMatch {
            path_specifier: Some(route::route_match::PathSpecifier::Prefix(p.into())),
            ..Default::default()
        }
    }

    fn eds_cluster() -> cluster::Cluster {
        cluster::Cluster {
            name: "c".into(),
            cluster_discovery_type: Some(cluster::cluster::ClusterDiscoveryType::Type(
                cluster::cluster::DiscoveryType::Eds as i32,
            )),
            ..Default::default()
        }
    }

    fn endpoints(port: u32) -> endpoint::ClusterLoadAssignment {
        endpoint::ClusterLoadAssignment {
            cluster_name: "c".into(),
            endpoints: vec![endpoint::LocalityLbEndpoints {
                lb_endpoints: vec![endpoint::LbEndpoint {
                    host_identifier: Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(endpoint::Endpoint {
                        address: Some(socket_at("10.0.0.7", port)),
                        ..Default::default()
                    })),
                    load_balancing_weight: Some(UInt32Value { value: 3 }),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// LDS, RDS, CDS and EDS for one HTTP listener routing `/api` to cluster `c`.
    fn complete() -> EnvoyResources {
        let mut r = EnvoyResources::default();
        r.listeners
            .insert("l".into(), http_listener(vec![filter(ROUTER, false)]));
        r.routes.insert("rc".into(), routes(prefix("/api")));
        r.clusters.insert("c".into(), eds_cluster());
        r.endpoints.insert("c".into(), endpoints(9000));
        r
    }

    #[test]
    fn endpoint_priorities_and_zones_are_read_off_the_assignment() {
        let mut r = complete();
        let cla = r.endpoints.get_mut("c").unwrap();
        let mut backup = cla.endpoints[0].clone();
        backup.priority = 1;
        backup.locality = Some(core::Locality {
            zone: "zone-b".into(),
            ..Default::default()
        });
        cla.endpoints.push(backup);
        let (snap, _) = snapshot(&r, 1).unwrap().unwrap();
        let eps: Vec<(u32, Option<&str>)> = snap.clusters[0]
            .endpoints
            .iter()
            .map(|e| (e.priority, e.zone.as_deref()))
            .collect();
        assert_eq!(eps, vec![(0, None), (1, Some("zone-b"))]);
    }

    #[test]
    fn slow_start_panic_threshold_and_stream_cap_are_read_off_the_cluster() {
        use cluster::cluster::{CommonLbConfig, LbConfig, RoundRobinLbConfig, SlowStartConfig};
        use envoy_types::pb::envoy::r#type::v3::Percent;
        use upstream_http::http_protocol_options::{ExplicitHttpConfig, UpstreamProtocolOptions};
        let r = complete();
        let (snap, _) = snapshot(&r, 1).unwrap().unwrap();
        assert_eq!(
            snap.clusters[0].panic_threshold_percent, 50,
            "Envoy's default when none is named"
        );
        assert_eq!(snap.clusters[0].slow_start, None);

        let mut r = complete();
        let c = r.clusters.get_mut("c").unwrap();
        c.lb_config = Some(LbConfig::RoundRobinLbConfig(RoundRobinLbConfig {
            slow_start_config: Some(SlowStartConfig {
                slow_start_window: Some(PbDuration { seconds: 30, nanos: 0 }),
                aggression: None,
                min_weight_percent: Some(Percent { value: 25.0 }),
            }),
        }));
        c.common_lb_config = Some(CommonLbConfig {
            healthy_panic_threshold: Some(Percent { value: 0.0 }),
            ..Default::default()
        });
        let h2 = upstream_http::HttpProtocolOptions {
            upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(ExplicitHttpConfig {
                protocol_config: Some(
                    upstream_http::http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                        core::Http2ProtocolOptions {
                            max_concurrent_streams: Some(UInt32Value { value: 16 }),
                            ..Default::default()
                        },
                    ),
                ),
            })),
            ..Default::default()
        };
        c.typed_extension_protocol_options.insert(
            HTTP_OPTIONS.into(),
            any(&format!("type.googleapis.com/{HTTP_OPTIONS}"), &h2),
        );
        let (snap, _) = snapshot(&r, 2).unwrap().unwrap();
        let c = &snap.clusters[0];
        let mut slow = model::SlowStart::new(30_000);
        slow.min_weight_percent = 25.0;
        assert_eq!(c.slow_start, Some(slow));
        assert_eq!(c.panic_threshold_percent, 0);
        assert_eq!(
            (c.protocol, c.circuit_breaker.max_concurrent_streams),
            (UpstreamProtocol::Http2, Some(16))
        );
    }

    #[test]
    fn request_mirror_policies_are_the_routes_mirrors() {
        use envoy_types::pb::envoy::r#type::v3::FractionalPercent;
        let policy = |cluster: &str, fraction: Option<(u32, i32)>| route::route_action::RequestMirrorPolicy {
            cluster: cluster.into(),
            runtime_fraction: fraction.map(|(numerator, denominator)| core::RuntimeFractionalPercent {
                default_value: Some(FractionalPercent { numerator, denominator }),
                runtime_key: String::new(),
            }),
            ..Default::default()
        };
        let known = |c: &str| c == "shadow";
        let got = |p: &[route::route_action::RequestMirrorPolicy]| {
            let all = mirrors(p, "r", &known)?;
            assert!(all.len() <= 1, "{all:?}");
            Ok::<_, MapError>(all.into_iter().next().map(|m| (m.cluster, m.per_million)))
        };
        assert_eq!(got(&[]).unwrap(), None);
        assert_eq!(
            got(&[policy("shadow", None)]).unwrap(),
            Some(("shadow".into(), 1_000_000))
        );
        assert_eq!(
            got(&[policy("shadow", Some((25, 0)))]).unwrap(),
            Some(("shadow".into(), 250_000)),
            "per hundred"
        );
        assert_eq!(
            got(&[policy("shadow", Some((7, 2)))]).unwrap(),
            Some(("shadow".into(), 7)),
            "per million"
        );
        assert_eq!(
            got(&[policy("gone", None)]).unwrap(),
            None,
            "no such cluster: nothing copied"
        );
        let both = mirrors(
            &[
                policy("shadow", Some((25, 0))),
                policy("gone", None),
                policy("shadow", None),
            ],
            "r",
            &known,
        )
        .unwrap();
        assert_eq!(
            both.iter().map(|m| m.per_million).collect::<Vec<_>>(),
            [250_000, 1_000_000],
            "each known cluster, in order"
        );
    }

    #[test]
    fn a_resource_of_another_type_or_bad_bytes_is_refused_by_type() {
        let c = eds_cluster();
        let wrong = decode::<listener::Listener>(&any(CLUSTER, &c), LISTENER).unwrap_err();
        assert!(
            matches!(&wrong, MapError::WrongType { got, .. } if got == CLUSTER),
            "{wrong}"
        );
        let garbage = Any {
            type_url: LISTENER.into(),
            value: vec![0xff, 0xff, 0xff],
        };
        let bad = decode::<listener::Listener>(&garbage, LISTENER).unwrap_err();
        assert!(matches!(bad, MapError::Decode { .. }), "{bad}");
        assert!(bad.to_string().starts_with(&format!("{LISTENER} does not decode")));
    }

    #[test]
    fn a_complete_set_maps_to_a_snapshot() {
        let (snap, secrets) = snapshot(&complete(), 7).unwrap().expect("complete");
        assert!(secrets.is_empty());
        assert_eq!(snap.version, 7);
        let [l] = &snap.listeners[..] else {
            panic!("{:?}", snap.listeners)
        };
        assert_eq!(
            (l.address.as_str(), l.port, l.protocol),
            ("0.0.0.0", 8080, Protocol::Http)
        );
        let [c] = &snap.clusters[..] else { panic!("one cluster") };
        let [e] = &c.endpoints[..] else { panic!("one endpoint") };
        assert_eq!((e.address.as_str(), e.port, e.weight), ("10.0.0.7", 9000, 3));
    }

    #[test]
    fn a_route_naming_a_cluster_not_held_is_noted() {
        let unknown = std::cell::Cell::new(false);
        assert!(snapshot_noting(&complete(), 1, &unknown).unwrap().is_some());
        assert!(!unknown.get(), "every cluster named is held");
        let mut r = complete();
        r.clusters.clear();
        r.endpoints.clear();
        assert!(
            snapshot_noting(&r, 1, &unknown).unwrap().is_some(),
            "maps, with a 500 route"
        );
        assert!(unknown.get(), "the route names a cluster not held");
    }

    #[test]
    fn the_proxy_protocol_filter_and_trusted_hops_are_the_listeners_client_address() {
        let behind_lb = |allow_without: bool, hops: u32| {
            let mut l = http_listener(vec![filter(ROUTER, false)]);
            let proxy = ProxyProtocol {
                allow_requests_without_proxy_protocol: allow_without,
                ..Default::default()
            };
            l.listener_filters.push(listener::ListenerFilter {
                name: PROXY_PROTOCOL_FILTER.into(),
                config_type: Some(listener::listener_filter::ConfigType::TypedConfig(any(
                    PROXY_PROTOCOL,
                    &proxy,
                ))),
                ..Default::default()
            });
            let Some(listener::filter::ConfigType::TypedConfig(tc)) = &mut l.filter_chains[0].filters[0].config_type
            else {
                unreachable!()
            };
            let mut m: hcm::HttpConnectionManager = decode(tc, HCM).unwrap();
            m.xff_num_trusted_hops = hops;
            *tc = any(HCM, &m);
            let mut r = complete();
            r.listeners.insert("l".into(), l);
            snapshot(&r, 1)
        };
        let (s, _) = behind_lb(false, 2).unwrap().unwrap();
        assert_eq!(
            s.listeners[0].client_address,
            model::ClientAddress {
                proxy_protocol: true,
                xff_trusted_hops: 2
            }
        );
        let (s, _) = snapshot(&complete(), 1).unwrap().unwrap();
        assert_eq!(s.listeners[0].client_address, model::ClientAddress::default());
        // Serving plain connections too would read their first bytes as a header: refused.
        let e = behind_lb(true, 0).unwrap_err();
        assert!(e.to_string().contains("allow_requests_without_proxy_protocol"), "{e}");
        let e = behind_lb(false, 300).unwrap_err();
        assert!(e.to_string().contains("xff_num_trusted_hops 300"), "{e}");
    }

    #[test]
    fn a_set_still_waiting_for_rds_or_eds_is_not_a_snapshot_yet() {
        let mut r = complete();
        r.routes.clear();
        assert!(snapshot(&r, 1).unwrap().is_none(), "RDS has not arrived");
        let mut r = complete();
        r.endpoints.clear();
        assert!(snapshot(&r, 1).unwrap().is_none(), "EDS has not arrived");
    }

    #[test]
    fn a_filter_it_would_skip_is_refused_unless_optional() {
        let rbac = "envoy.filters.http.rbac";
        let mut r = complete();
        r.listeners.insert(
            "l".into(),
            http_listener(vec![filter(rbac, false), filter(ROUTER, false)]),
        );
        let e = snapshot(&r, 1).unwrap_err();
        assert!(
            matches!(&e, MapError::Refused { at, reason } if at == "Listener l" && reason.contains(rbac)),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            format!(
                "Listener l: HTTP filter {rbac} is not supported (only the router, CORS, local rate limits and Ferrum's rate limit service are); refused rather than skipped"
            )
        );
        r.listeners.insert(
            "l".into(),
            http_listener(vec![filter(rbac, true), filter(ROUTER, false)]),
        );
        assert!(snapshot(&r, 1).unwrap().is_some(), "an optional filter may be skipped");
    }

    #[test]
    fn an_unsupported_match_names_its_route() {
        let mut r = complete();
        let mut m = prefix("/api");
        m.case_sensitive = Some(envoy_types::pb::google::protobuf::BoolValue { value: false });
        r.routes.insert("rc".into(), routes(m));
        let e = snapshot(&r, 1).unwrap_err();
        let MapError::Refused { at, reason } = &e else {
            panic!("{e:?}")
        };
        assert!(at.starts_with("RouteConfiguration rc virtual host vh"), "{at}");
        assert_eq!(reason, "case-insensitive paths are not supported");
    }

    fn tls_socket(ctx: &tls::UpstreamTlsContext) -> core::TransportSocket {
        core::TransportSocket {
            name: "envoy.transport_sockets.tls".into(),
            config_type: Some(core::transport_socket::ConfigType::TypedConfig(any(
                "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                ctx,
            ))),
        }
    }

    /// An `UpstreamTlsContext` trusting `ca` (a file, or inline PEM) and checking `san`.
    fn tls_context(sni: &str, ca: core::data_source::Specifier, san: &str) -> tls::UpstreamTlsContext {
        use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
        tls::UpstreamTlsContext {
            sni: sni.into(),
            common_tls_context: Some(tls::CommonTlsContext {
                validation_context_type: Some(tls::common_tls_context::ValidationContextType::ValidationContext(
                    tls::CertificateValidationContext {
                        trusted_ca: Some(core::DataSource {
                            specifier: Some(ca),
                            ..Default::default()
                        }),
                        match_typed_subject_alt_names: vec![tls::SubjectAltNameMatcher {
                            san_type: tls::subject_alt_name_matcher::SanType::Dns as i32,
                            matcher: Some(matcher::StringMatcher {
                                match_pattern: Some(MatchPattern::Exact(san.into())),
                                ignore_case: false,
                            }),
                            oid: String::new(),
                        }],
                        ..Default::default()
                    },
                )),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_cluster_that_cannot_be_served_says_why() {
        use self::core::data_source::Specifier;
        let refused = |ctx: tls::UpstreamTlsContext| {
            let mut r = complete();
            let mut c = eds_cluster();
            c.transport_socket = Some(tls_socket(&ctx));
            r.clusters.insert("c".into(), c);
            snapshot(&r, 1).unwrap_err().to_string()
        };
        let inline = refused(tls_context(
            "api.test",
            Specifier::EnvironmentVariable("CA".into()),
            "api.test",
        ));
        assert_eq!(
            inline,
            "Cluster c: transport_socket: validation_context.trusted_ca must be a file name or inline PEM"
        );
        // A SAN matcher other than the SNI name: the certificate must name it instead.
        let mut r = complete();
        let mut c = eds_cluster();
        c.transport_socket = Some(tls_socket(&tls_context(
            "api.test",
            Specifier::Filename("/ca.pem".into()),
            "db.test",
        )));
        r.clusters.insert("c".into(), c);
        let (s, _) = snapshot(&r, 1).unwrap().unwrap();
        let tls = s.cluster("c").unwrap().tls.clone().unwrap();
        assert_eq!(
            (tls.sni.as_str(), tls.subject_alt_names),
            ("api.test", vec!["db.test".to_string()])
        );
        // Without SNI, only one IP address can be checked.
        let no_sni = refused(tls_context("", Specifier::Filename("/ca.pem".into()), "db.test"));
        assert!(no_sni.contains("without sni"), "{no_sni}");

        let mut r = complete();
        let mut c = eds_cluster();
        c.lb_policy = cluster::cluster::LbPolicy::ClusterProvided as i32;
        r.clusters.insert("c".into(), c);
        assert!(
            snapshot(&r, 1)
                .unwrap_err()
                .to_string()
                .starts_with("Cluster c: lb_policy")
        );
    }

    #[test]
    fn a_direct_500_is_a_rule_without_a_backend() {
        let answer = |reason: Option<&str>| {
            let mut r = complete();
            let mut rc = routes(prefix("/api"));
            let route = &mut rc.virtual_hosts[0].routes[0];
            route.action = Some(route::route::Action::DirectResponse(route::DirectResponseAction {
                status: 500,
                ..Default::default()
            }));
            route.response_headers_to_add = reason
                .map(|v| core::HeaderValueOption {
                    header: Some(core::HeaderValue {
                        key: "x-ferrum-error".into(),
                        value: v.into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .into_iter()
                .collect();
            r.routes.insert("rc".into(), rc);
            let (snap, _) = snapshot(&r, 1).unwrap().unwrap();
            snap.listeners[0].virtual_hosts[0].routes[0].action.clone()
        };
        let unresolved = |weight| {
            Action::Forward(vec![WeightedCluster {
                cluster: None,
                weight,
                headers: None,
            }])
        };
        assert_eq!(answer(None), unresolved(1));
        assert_eq!(answer(Some(ferrum_proto::xds::BACKEND_NOT_FOUND)), unresolved(1));
        assert_eq!(answer(Some(ferrum_proto::xds::NO_WEIGHTED_BACKEND)), unresolved(0));
    }

    #[test]
    fn another_direct_response_is_answered_by_the_route() {
        let mut r = complete();
        let mut rc = routes(prefix("/api"));
        rc.virtual_hosts[0].routes[0].action =
            Some(route::route::Action::DirectResponse(route::DirectResponseAction {
                status: 503,
                body: Some(core::DataSource {
                    specifier: Some(core::data_source::Specifier::InlineString("down".into())),
                    ..Default::default()
                }),
                ..Default::default()
            }));
        r.routes.insert("rc".into(), rc);
        let (snap, _) = snapshot(&r, 1).unwrap().unwrap();
        let route = &snap.listeners[0].virtual_hosts[0].routes[0];
        assert_eq!(
            route.direct_response,
            Some(model::DirectResponse {
                status: 503,
                body: "down".into()
            })
        );
        ferrum_snapshot::validate(&snap).unwrap();
    }

    #[test]
    fn upstream_tls_is_the_clusters_and_checks_the_sni_name() {
        let mut r = complete();
        let mut c = eds_cluster();
        let ctx = tls_context(
            "api.test",
            core::data_source::Specifier::Filename("/ca.pem".into()),
            "api.test",
        );
        c.transport_socket = Some(tls_socket(&ctx));
        r.clusters.insert("c".into(), c.clone());
        let (snap, _) = snapshot(&r, 1).unwrap().unwrap();
        let tls = snap.clusters[0].tls.clone().unwrap();
        assert_eq!(
            (tls.sni.as_str(), tls.ca_file.as_deref(), tls.insecure_skip_verify),
            ("api.test", Some("/ca.pem"), false)
        );
        // No validation context: Envoy checks nothing, and neither does ferrum-dp.
        c.transport_socket = Some(tls_socket(&tls::UpstreamTlsContext {
            sni: "api.test".into(),
            ..Default::default()
        }));
        r.clusters.insert("c".into(), c);
        let (snap, _) = snapshot(&r, 1).unwrap().unwrap();
        assert!(snap.clusters[0].tls.as_ref().unwrap().insecure_skip_verify);
    }

    /// `complete()` with its route to `c` asking for `hash` and `retry`, and a second route
    /// (`/other`) asking for `retry2`.
    fn with_route_policies(
        hash: Vec<route::route_action::HashPolicy>,
        retry: Option<route::RetryPolicy>,
        retry2: Option<route::RetryPolicy>,
    ) -> EnvoyResources {
        let mut r = complete();
        let mut rc = routes(prefix("/api"));
        let mut other = rc.virtual_hosts[0].routes[0].clone();
        other.name = "other".into();
        other.r#match = Some(prefix("/other"));
        if let Some(route::route::Action::Route(ra)) = &mut other.action {
            ra.retry_policy = retry2;
        }
        if let Some(route::route::Action::Route(ra)) = &mut rc.virtual_hosts[0].routes[0].action {
            (ra.hash_policy, ra.retry_policy) = (hash, retry);
        }
        rc.virtual_hosts[0].routes.push(other);
        r.routes.insert("rc".into(), rc);
        let mut c = eds_cluster();
        c.lb_policy = cluster::cluster::LbPolicy::RingHash as i32;
        r.clusters.insert("c".into(), c);
        r
    }

    #[test]
    fn a_ring_hash_cluster_hashes_on_its_routes_key_and_retries_as_they_say() {
        use route::route_action::hash_policy::{Header, PolicySpecifier};
        let header = route::route_action::HashPolicy {
            policy_specifier: Some(PolicySpecifier::Header(Header {
                header_name: "X-User".into(),
                regex_rewrite: None,
            })),
            terminal: false,
        };
        let retry = route::RetryPolicy {
            retry_on: "connect-failure,refused-stream,unavailable,retriable-status-codes".into(),
            retriable_status_codes: vec![429],
            num_retries: Some(UInt32Value { value: 3 }),
            ..Default::default()
        };
        let r = with_route_policies(vec![header], Some(retry.clone()), Some(retry.clone()));
        let (snap, _) = snapshot(&r, 1).unwrap().unwrap();
        let c = &snap.clusters[0];
        assert_eq!(c.lb, LbPolicy::ConsistentHash(model::HashOn::Header("x-user".into())));
        let p = c.retry.clone().unwrap();
        assert_eq!(p.attempts, 3);
        assert_eq!(p.on, vec!["connect-failure", "reset", "429"]);
        assert_eq!(p.grpc_on, [14], "unavailable: a trailers-only gRPC error's code");

        // Without a key Envoy hashes nothing: random.
        let r = with_route_policies(Vec::new(), None, None);
        let (snap, _) = snapshot(&r, 1).unwrap().unwrap();
        assert_eq!(
            (&snap.clusters[0].lb, &snap.clusters[0].retry),
            (&LbPolicy::Random, &None)
        );

        // Two routes to one cluster, one retrying and one not: ferrum has one policy per cluster.
        let r = with_route_policies(Vec::new(), Some(retry), None);
        let e = snapshot(&r, 1).unwrap_err().to_string();
        assert!(
            e.contains("route \"other\"") && e.contains("other retry policies"),
            "{e}"
        );
    }

    #[test]
    fn a_connection_manager_that_does_not_decode_is_refused_within_its_listener() {
        let mut l = http_listener(vec![]);
        l.filter_chains[0].filters[0].config_type = Some(listener::filter::ConfigType::TypedConfig(Any {
            type_url: HCM.into(),
            value: vec![0xff; 3],
        }));
        let e = listener_routes(&l).err().expect("refused");
        let MapError::Within { at, source } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(at, "Listener l");
        assert!(matches!(**source, MapError::Decode { .. }));
    }

    #[test]
    fn route_actions_map_rewrites_timeouts_and_redirects() {
        use envoy_types::pb::google::protobuf::Duration as D;
        let known = |c: &str| c == "c";
        let mut r = routes(route::RouteMatch {
            path_specifier: Some(route::route_match::PathSpecifier::PathSeparatedPrefix("/api/".into())),
            ..Default::default()
        })
        .virtual_hosts[0]
            .routes[0]
            .clone();
        let Some(route::route::Action::Route(ra)) = &mut r.action else {
            unreachable!()
        };
        ra.prefix_rewrite = "/v2".into();
        ra.timeout = Some(D {
            seconds: 2,
            nanos: 500_000_000,
        });
        ra.retry_policy = Some(route::RetryPolicy {
            per_try_timeout: Some(D { seconds: 1, nanos: 0 }),
            ..Default::default()
        });
        let out = route_entry(&r, "rc", &known).unwrap();
        assert_eq!(out.matcher.path, PathMatch::Prefix("/api".into()));
        assert_eq!(out.rewrite.unwrap().path, Some(PathRewrite::Prefix("/v2".into())));
        assert_eq!(
            (out.timeouts.request_ms, out.timeouts.backend_request_ms),
            (Some(2500), Some(1000))
        );
        let Action::Forward(targets) = &out.action else {
            panic!("{:?}", out.action)
        };
        assert_eq!(targets.len(), 1);

        // A prefix rewrite on a plain (string) prefix cannot be said by segment.
        let mut plain = r.clone();
        plain.r#match = Some(prefix("/api"));
        let e = route_entry(&plain, "rc", &known).unwrap_err();
        assert!(
            e.to_string()
                .ends_with("prefix_rewrite needs a path_separated_prefix match"),
            "{e}"
        );

        use route::redirect_action::{RedirectResponseCode, SchemeRewriteSpecifier};
        r.action = Some(route::route::Action::Redirect(route::RedirectAction {
            scheme_rewrite_specifier: Some(SchemeRewriteSpecifier::HttpsRedirect(true)),
            host_redirect: "example.com".into(),
            response_code: RedirectResponseCode::PermanentRedirect as i32,
            ..Default::default()
        }));
        let out = route_entry(&r, "rc", &known).unwrap();
        let Action::Redirect(rd) = out.action else {
            panic!("a redirect")
        };
        assert_eq!(
            (rd.scheme.as_deref(), rd.hostname.as_deref(), rd.port, rd.status),
            (Some("https"), Some("example.com"), None, 308)
        );
        assert!(out.rewrite.is_none());
    }
}
