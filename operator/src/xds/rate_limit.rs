//! A route's rate limits as Envoy takes them. `Local` policies: Envoy's
//! `envoy.filters.http.local_ratelimit` sits after authorization in the connection manager of a
//! listener that has such a route, disabled there; each limited route carries a per-route config
//! whose embedded `rate_limits` turn a request into descriptors and whose `descriptors` hold one
//! token bucket per rule. `Global` policies: `envoy.filters.http.ratelimit` asks the operator's
//! rate limit service (`crate::rate_limit_service`, on the gRPC port Envoy's bootstrap already
//! names) about the descriptors of the route's per-route `rate_limits`, which carry the rule's limit
//! and blocks, so the service counts — in the Redis ferrum-dp counts in — from the descriptor
//! alone. The first two entries of every descriptor name the policy and the rule, so ferrum-dp
//! following this xDS reads the policies back (`source/xds/rate_limit.rs`).
//!
//! Envoy's local buckets belong to the route (ferrum-dp's to the policy: a Gateway's policy
//! shares one count across its routes there) and refill on a timer (ferrum-dp's windows, and
//! the rate limit service's, are aligned to the clock).

use std::net::IpAddr;

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::route::v3 as route;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3 as ratelimit;
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use envoy_types::pb::envoy::extensions::filters::http::ratelimit::v3::{
    RateLimit as GlobalRateLimit, RateLimitPerRoute,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{HttpFilter, http_filter};
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use envoy_types::pb::envoy::r#type::v3::{FractionalPercent, TokenBucket, fractional_percent::DenominatorType};
use envoy_types::pb::google::protobuf::{Any, BoolValue, Duration as PbDuration, UInt32Value};
use ferrum_proto::xds::{
    LOCAL_RATE_LIMIT, LOCAL_RATE_LIMIT_FILTER, RATE_LIMIT, RATE_LIMIT_BLOCK_KEY, RATE_LIMIT_DOMAIN, RATE_LIMIT_FILTER,
    RATE_LIMIT_HEADER_KEY, RATE_LIMIT_HEADER_VALUE_KEY, RATE_LIMIT_LIMIT_KEY, RATE_LIMIT_PER_ROUTE,
    RATE_LIMIT_POLICY_KEY, RATE_LIMIT_RULE_KEY,
};
use ferrum_snapshot::model;

use super::resources::any;

/// The values a distinct client selector keeps a bucket for, per rule (ferrum-dp keeps 4,096).
const DISTINCT_VALUES: u32 = 4096;

/// The filter, for a listener with a route under a local limit; disabled there, so routes
/// without a per-route config pass untouched.
pub fn filter(l: &model::Listener) -> Option<HttpFilter> {
    let mut routes = l.virtual_hosts.iter().flat_map(|v| &v.routes);
    routes
        .any(|r| r.rate_limits.iter().any(|p| !p.global))
        .then(|| HttpFilter {
            name: LOCAL_RATE_LIMIT_FILTER.into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(any(
                LOCAL_RATE_LIMIT,
                &LocalRateLimit {
                    stat_prefix: "ferrum_rate_limit".into(),
                    ..Default::default()
                },
            ))),
            ..Default::default()
        })
}

/// The filter that asks the operator's rate limit service, for a listener with a route under a
/// `Global` limit. It asks only about routes with `rate_limits` of their own; if the service
/// cannot answer (in time), the request goes on, as in ferrum-dp when Redis fails.
pub fn global_filter(l: &model::Listener) -> Option<HttpFilter> {
    let mut routes = l.virtual_hosts.iter().flat_map(|v| &v.routes);
    routes.any(|r| r.rate_limits.iter().any(|p| p.global)).then(|| {
        let service = core::GrpcService {
            target_specifier: Some(core::grpc_service::TargetSpecifier::EnvoyGrpc(
                core::grpc_service::EnvoyGrpc {
                    cluster_name: super::bootstrap::XDS_CLUSTER.into(),
                    ..Default::default()
                },
            )),
            ..Default::default()
        };
        HttpFilter {
            name: RATE_LIMIT_FILTER.into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(any(
                RATE_LIMIT,
                &GlobalRateLimit {
                    domain: RATE_LIMIT_DOMAIN.into(),
                    request_type: "both".into(),
                    timeout: Some(PbDuration {
                        seconds: 0,
                        nanos: 100_000_000,
                    }),
                    failure_mode_deny: false,
                    rate_limit_service: Some(envoy_types::pb::envoy::config::ratelimit::v3::RateLimitServiceConfig {
                        grpc_service: Some(service),
                        transport_api_version: core::ApiVersion::V3 as i32,
                    }),
                    enable_x_ratelimit_headers: 1, // DRAFT_VERSION_03
                    rate_limited_as_resource_exhausted: true,
                    ..Default::default()
                },
            ))),
            ..Default::default()
        }
    })
}

/// The per-route config of a route's `Global` policies (`None` without any): one descriptor per
/// rule, which the route makes only when the rule's headers match. Envoy asks about routes
/// that forward only: on a redirect or a direct response they are reported in `unsupported`.
pub fn global_route_config(r: &model::Route, unsupported: &mut Vec<String>) -> Option<Any> {
    let global: Vec<_> = r.rate_limits.iter().filter(|p| p.global).collect();
    if global.is_empty() {
        return None;
    }
    if r.direct_response.is_some() || matches!(r.action, model::Action::Redirect(_)) {
        for p in global {
            unsupported.push(format!(
                "route {}: Global RateLimitPolicy {}: Envoy asks its rate limit service about forwarding routes only (ferrum-dp enforces it)",
                r.name, p.name
            ));
        }
        return None;
    }
    let rate_limits = global
        .iter()
        .flat_map(|p| {
            p.rules.iter().enumerate().map(|(i, rule)| route::RateLimit {
                actions: rule_descriptor(&p.name, i, rule, true).0,
                ..Default::default()
            })
        })
        .collect();
    Some(any(
        RATE_LIMIT_PER_ROUTE,
        &RateLimitPerRoute {
            rate_limits,
            ..Default::default()
        },
    ))
}

/// The per-route config of a route's local policies (`None` without any).
pub fn route_config(r: &model::Route) -> Option<Any> {
    let mut descriptors = Vec::new();
    let mut rate_limits = Vec::new();
    for p in r.rate_limits.iter().filter(|p| !p.global) {
        for (i, rule) in p.rules.iter().enumerate() {
            let (actions, entries) = rule_descriptor(&p.name, i, rule, false);
            rate_limits.push(route::RateLimit {
                actions,
                ..Default::default()
            });
            descriptors.push(ratelimit::LocalRateLimitDescriptor {
                entries,
                token_bucket: Some(bucket(rule.requests, rule.window_secs)),
                ..Default::default()
            });
        }
    }
    if descriptors.is_empty() {
        return None;
    }
    let all = || {
        Some(core::RuntimeFractionalPercent {
            default_value: Some(FractionalPercent {
                numerator: 100,
                denominator: DenominatorType::Hundred as i32,
            }),
            runtime_key: String::new(),
        })
    };
    let config = LocalRateLimit {
        stat_prefix: "ferrum_rate_limit".into(),
        // Requests no rule selects: a bucket that never runs dry, and only those consume it.
        token_bucket: Some(bucket(u32::MAX, 1)),
        always_consume_default_token_bucket: Some(BoolValue { value: false }),
        filter_enabled: all(),
        filter_enforced: all(),
        descriptors,
        rate_limits,
        max_dynamic_descriptors: Some(UInt32Value { value: DISTINCT_VALUES }),
        enable_x_ratelimit_headers: ratelimit::XRateLimitHeadersRfcVersion::DraftVersion03 as i32,
        enable_retry_after_header: true,
        rate_limited_as_resource_exhausted: true,
        ..Default::default()
    };
    Some(any(LOCAL_RATE_LIMIT, &config))
}

/// `requests` per `secs`, refilled whole at the end of each window.
fn bucket(requests: u32, secs: u32) -> TokenBucket {
    TokenBucket {
        max_tokens: requests,
        tokens_per_fill: Some(UInt32Value { value: requests }),
        fill_interval: Some(PbDuration {
            seconds: secs.into(),
            nanos: 0,
        }),
    }
}

/// The actions that make a request's descriptor for one rule, and the descriptor the rule's
/// bucket is kept under (an empty value: one bucket per distinct value). A header that is
/// missing or does not match makes no descriptor: the rule does not select the request; nor
/// does a client outside a block, whose masked address is not the block. `global`: the
/// descriptor also says the limit and each block, for the rate limit service.
fn rule_descriptor(
    policy: &str,
    index: usize,
    rule: &model::RateLimitRule,
    global: bool,
) -> (
    Vec<route::rate_limit::Action>,
    Vec<ratelimit::rate_limit_descriptor::Entry>,
) {
    let mut d = Descriptor::default();
    d.generic(RATE_LIMIT_POLICY_KEY, policy.into(), true);
    d.generic(RATE_LIMIT_RULE_KEY, index.to_string(), true);
    if global {
        let limit = format!("{}/{}", rule.requests, rule.window_secs);
        d.generic(RATE_LIMIT_LIMIT_KEY, limit, false);
    }
    for (j, h) in rule.headers.iter().enumerate() {
        d.header(j, h);
    }
    for c in &rule.clients {
        d.client(c, global);
    }
    let actions = d
        .actions
        .into_iter()
        .map(|a| route::rate_limit::Action {
            action_specifier: Some(a),
        })
        .collect();
    (actions, d.entries)
}

/// A rule's rate limit actions and the descriptor entries they make.
#[derive(Default)]
struct Descriptor {
    actions: Vec<route::rate_limit::action::ActionSpecifier>,
    entries: Vec<ratelimit::rate_limit_descriptor::Entry>,
}

impl Descriptor {
    fn entry(&mut self, key: &str, value: &str) {
        self.entries.push(ratelimit::rate_limit_descriptor::Entry {
            key: key.into(),
            value: value.into(),
        });
    }

    /// A fixed key and value; `entry`: the descriptor the read-back expects carries it too.
    fn generic(&mut self, key: &str, value: String, entry: bool) {
        use route::rate_limit::action::{self, ActionSpecifier};
        if entry {
            self.entry(key, &value);
        }
        self.actions.push(ActionSpecifier::GenericKey(action::GenericKey {
            descriptor_key: key.into(),
            descriptor_value: value,
            ..Default::default()
        }));
    }

    /// Header `j`: whether it matches, or (no value given) its value.
    fn header(&mut self, j: usize, h: &model::RateLimitHeader) {
        use route::rate_limit::action::{self, ActionSpecifier};
        match &h.value {
            Some(m) => {
                let key = format!("{RATE_LIMIT_HEADER_KEY}{j}");
                self.entry(&key, "1");
                self.actions
                    .push(ActionSpecifier::HeaderValueMatch(action::HeaderValueMatch {
                        descriptor_key: key,
                        descriptor_value: "1".into(),
                        expect_match: Some(BoolValue { value: true }),
                        headers: vec![header_matcher(&h.name, m)],
                        ..Default::default()
                    }));
            }
            None => {
                let key = format!("{RATE_LIMIT_HEADER_VALUE_KEY}{j}");
                self.entry(&key, "");
                self.actions
                    .push(ActionSpecifier::RequestHeaders(action::RequestHeaders {
                        header_name: h.name.clone(),
                        descriptor_key: key,
                        ..Default::default()
                    }));
            }
        }
    }

    /// A client block: the masked address (and the block, for a global limit), and the
    /// address itself when each client is limited on its own.
    fn client(&mut self, c: &model::RateLimitClients, global: bool) {
        use route::rate_limit::action::{self, ActionSpecifier};
        let Some((block, prefix, v4)) = masked(&c.cidr) else {
            return; // the translator refuses blocks that do not parse
        };
        if global {
            self.generic(RATE_LIMIT_BLOCK_KEY, block.clone(), false);
        }
        let len = |l: u32| Some(UInt32Value { value: l });
        let (v4_len, v6_len) = if v4 {
            (len(prefix), len(128))
        } else {
            (len(32), len(prefix))
        };
        self.actions
            .push(ActionSpecifier::MaskedRemoteAddress(action::MaskedRemoteAddress {
                v4_prefix_mask_len: v4_len,
                v6_prefix_mask_len: v6_len,
            }));
        self.entry("masked_remote_address", &block);
        if c.distinct {
            self.actions
                .push(ActionSpecifier::RemoteAddress(action::RemoteAddress {}));
            self.entry("remote_address", "");
        }
    }
}

fn header_matcher(name: &str, m: &model::StringMatch) -> route::HeaderMatcher {
    use matcher::string_matcher::MatchPattern;
    let pattern = match m {
        model::StringMatch::Exact(e) => MatchPattern::Exact(e.clone()),
        model::StringMatch::Regex(r) => MatchPattern::SafeRegex(matcher::RegexMatcher {
            regex: r.clone(),
            ..Default::default()
        }),
    };
    route::HeaderMatcher {
        name: name.into(),
        header_match_specifier: Some(route::header_matcher::HeaderMatchSpecifier::StringMatch(
            matcher::StringMatcher {
                match_pattern: Some(pattern),
                ..Default::default()
            },
        )),
        ..Default::default()
    }
}

/// A block as Envoy writes a masked client address (`10.0.0.0/8`: the address masked), its
/// prefix length, and whether it is IPv4.
fn masked(cidr: &str) -> Option<(String, u32, bool)> {
    let (addr, prefix) = cidr.split_once('/')?;
    let prefix: u32 = prefix.parse().ok()?;
    match addr.parse::<IpAddr>().ok()? {
        IpAddr::V4(a) if prefix <= 32 => {
            let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
            let net = std::net::Ipv4Addr::from(u32::from(a) & mask);
            Some((format!("{net}/{prefix}"), prefix, true))
        }
        IpAddr::V6(a) if prefix <= 128 => {
            let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
            let net = std::net::Ipv6Addr::from(u128::from(a) & mask);
            Some((format!("{net}/{prefix}"), prefix, false))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use std::sync::Arc;

    fn policy(global: bool) -> Arc<model::RateLimit> {
        Arc::new(model::RateLimit {
            name: "ns/limits".into(),
            global,
            rules: vec![
                model::RateLimitRule {
                    headers: vec![
                        model::RateLimitHeader {
                            name: "x-tier".into(),
                            value: Some(model::StringMatch::Exact("free".into())),
                        },
                        model::RateLimitHeader {
                            name: "x-user".into(),
                            value: None,
                        },
                    ],
                    clients: vec![model::RateLimitClients {
                        cidr: "10.1.2.3/8".into(),
                        distinct: true,
                    }],
                    requests: 5,
                    window_secs: 60,
                },
                model::RateLimitRule {
                    headers: Vec::new(),
                    clients: Vec::new(),
                    requests: 100,
                    window_secs: 1,
                },
            ],
        })
    }

    #[test]
    fn each_rule_is_a_descriptor_with_its_bucket_and_the_actions_that_make_it() {
        let mut r = model::Route::forward("r".into(), Vec::new());
        r.rate_limits = vec![policy(false)];
        let any = route_config(&r).expect("a config");
        let c = LocalRateLimit::decode(any.value.as_slice()).unwrap();
        assert_eq!(c.descriptors.len(), 2);
        let keys: Vec<_> = c.descriptors[0]
            .entries
            .iter()
            .map(|e| (e.key.as_str(), e.value.as_str()))
            .collect();
        assert_eq!(
            keys,
            [
                (RATE_LIMIT_POLICY_KEY, "ns/limits"),
                (RATE_LIMIT_RULE_KEY, "0"),
                ("header_0", "1"),
                ("header_value_1", ""),
                ("masked_remote_address", "10.0.0.0/8"),
                ("remote_address", ""),
            ]
        );
        let b = c.descriptors[0].token_bucket.unwrap();
        assert_eq!((b.max_tokens, b.tokens_per_fill.unwrap().value), (5, 5));
        assert_eq!(b.fill_interval.unwrap().seconds, 60);
        // One action per entry, in the same order.
        assert_eq!(c.rate_limits[0].actions.len(), 6);
        assert_eq!(c.rate_limits[1].actions.len(), 2);
        assert_eq!(c.always_consume_default_token_bucket, Some(BoolValue { value: false }));
    }

    #[test]
    fn global_rules_describe_their_limit_and_blocks_for_the_rate_limit_service() {
        use route::rate_limit::action::ActionSpecifier as A;
        let mut r = model::Route::forward("r".into(), Vec::new());
        r.rate_limits = vec![policy(true)];
        assert!(route_config(&r).is_none(), "no local config");
        let mut unsupported = Vec::new();
        let any = global_route_config(&r, &mut unsupported).expect("a config");
        assert!(unsupported.is_empty());
        assert_eq!(any.type_url, RATE_LIMIT_PER_ROUTE);
        let c = RateLimitPerRoute::decode(any.value.as_slice()).unwrap();
        assert_eq!(c.rate_limits.len(), 2, "one descriptor per rule");
        let shape: Vec<String> = c.rate_limits[0]
            .actions
            .iter()
            .map(|a| match a.action_specifier.as_ref().unwrap() {
                A::GenericKey(g) => format!("{}={}", g.descriptor_key, g.descriptor_value),
                A::HeaderValueMatch(h) => format!("{}=1 if {}", h.descriptor_key, h.headers[0].name),
                A::RequestHeaders(h) => format!("{}=<{}>", h.descriptor_key, h.header_name),
                A::MaskedRemoteAddress(m) => format!("masked/{}", m.v4_prefix_mask_len.unwrap().value),
                A::RemoteAddress(_) => "remote".into(),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            shape,
            [
                "ferrum_rate_limit=ns/limits",
                "ferrum_rule=0",
                "ferrum_limit=5/60",
                "header_0=1 if x-tier",
                "header_value_1=<x-user>",
                "ferrum_block=10.0.0.0/8",
                "masked/8",
                "remote",
            ]
        );
        let l = model::Listener {
            name: "l".into(),
            address: "0.0.0.0".into(),
            port: 80,
            protocol: model::Protocol::Http,
            certificates: Vec::new(),
            virtual_hosts: vec![Arc::new(model::VirtualHost {
                hostname: "*".into(),
                routes: vec![Arc::new(r.clone())],
            })],
            gateways: Vec::new(),
            gateway_hosts: Vec::new(),
            access_log: false,
            client_address: Default::default(),
        };
        let f = global_filter(&l).expect("the filter");
        let Some(http_filter::ConfigType::TypedConfig(cfg)) = f.config_type else {
            panic!()
        };
        let cfg = GlobalRateLimit::decode(cfg.value.as_slice()).unwrap();
        let service = cfg.rate_limit_service.unwrap().grpc_service.unwrap();
        assert_eq!((cfg.domain.as_str(), cfg.failure_mode_deny), (RATE_LIMIT_DOMAIN, false));
        assert!(matches!(service.target_specifier,
            Some(core::grpc_service::TargetSpecifier::EnvoyGrpc(g)) if g.cluster_name == "ferrum-xds"));
        assert!(filter(&l).is_none(), "no local filter");

        r.action = model::Action::Redirect(Default::default());
        assert!(global_route_config(&r, &mut unsupported).is_none());
        assert_eq!(unsupported.len(), 1, "{unsupported:?}");
    }

    #[test]
    fn blocks_are_written_masked() {
        assert_eq!(masked("10.1.2.3/8").unwrap().0, "10.0.0.0/8");
        assert_eq!(masked("10.1.2.3/32").unwrap().0, "10.1.2.3/32");
        assert_eq!(masked("0.0.0.0/0").unwrap().0, "0.0.0.0/0");
        assert_eq!(masked("fd00:1::5/16").unwrap(), ("fd00::/16".into(), 16, false));
        assert!(masked("10.0.0.0/33").is_none());
    }
}
