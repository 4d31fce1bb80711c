//! A route's rate limits read back from the shape the operator writes them in
//! (`operator/src/xds/rate_limit.rs`). Local ones from Envoy's `envoy.filters.http.local_ratelimit`
//! per-route config: each embedded `rate_limits` entry is one rule, whose actions say which
//! requests it selects; the descriptor its actions make (values left empty where they come from
//! the request) finds the rule's token bucket, refilled whole each window. Global ones from
//! `envoy.filters.http.ratelimit`'s per-route `rate_limits`, whose descriptors say the limit
//! and blocks themselves; ferrum-dp counts them in its own Redis (`--rate-limit-redis`) under
//! the keys the operator's rate limit service counts Envoy's requests under. The first two
//! actions name the policy and the rule; a local config without them (not from our operator)
//! is one policy named after the route. Anything else these rules cannot say is refused, never
//! skipped.

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::RuntimeFractionalPercent;
use envoy_types::pb::envoy::config::route::v3 as route;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3 as ratelimit;
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use envoy_types::pb::envoy::extensions::filters::http::ratelimit::v3::{RateLimit as GlobalFilter, RateLimitPerRoute};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{HttpFilter, http_filter};
use envoy_types::pb::google::protobuf::Any;
use ferrum_proto::xds::{
    LOCAL_RATE_LIMIT, RATE_LIMIT, RATE_LIMIT_BLOCK_KEY, RATE_LIMIT_DOMAIN, RATE_LIMIT_FILTER, RATE_LIMIT_LIMIT_KEY,
    RATE_LIMIT_PER_ROUTE, RATE_LIMIT_POLICY_KEY,
};
use ferrum_snapshot::model::{RateLimit, RateLimitClients, RateLimitHeader, RateLimitRule};

use super::map::{MapError, decode, string_match};

/// The policies of one route's per-route config.
pub fn policies(a: &Any, route: &str, at: &str) -> Result<Vec<Arc<RateLimit>>, MapError> {
    let at = format!("{at} local rate limit");
    let c: LocalRateLimit = decode(a, LOCAL_RATE_LIMIT).map_err(|e| e.within(&at))?;
    if !every_request(&c.filter_enabled) || !every_request(&c.filter_enforced) {
        return Err(MapError::refused(
            &at,
            "only limits enabled and enforced for every request are supported",
        ));
    }
    if c.always_consume_default_token_bucket.is_none_or(|b| b.value) {
        return Err(MapError::refused(
            &at,
            "a default token bucket every request consumes is not supported (always_consume_default_token_bucket: false)",
        ));
    }
    let mut out: Vec<RateLimit> = Vec::new();
    for (i, rl) in c.rate_limits.iter().enumerate() {
        let at = format!("{at} rate_limits[{i}]");
        let (policy, rule) = rule(rl, Some(&c.descriptors), &at)?;
        add(&mut out, policy.unwrap_or_else(|| format!("xds/{route}")), false, rule);
    }
    Ok(out.into_iter().map(Arc::new).collect())
}

/// Whether `f` is the operator's rate limit filter: it asks Ferrum's rate limit service, whose
/// descriptors say everything a Global policy is (another service's limits are its own).
pub fn ferrum_global_filter(f: &HttpFilter) -> bool {
    let Some(http_filter::ConfigType::TypedConfig(c)) = &f.config_type else {
        return false;
    };
    f.name == RATE_LIMIT_FILTER
        && decode::<GlobalFilter>(c, RATE_LIMIT).is_ok_and(|g: GlobalFilter| g.domain == RATE_LIMIT_DOMAIN)
}

/// The Global policies of one route's per-route config for the rate limit filter.
pub fn global_policies(a: &Any, at: &str) -> Result<Vec<Arc<RateLimit>>, MapError> {
    let at = format!("{at} rate limit");
    let c: RateLimitPerRoute = decode(a, RATE_LIMIT_PER_ROUTE).map_err(|e| e.within(&at))?;
    if !c.domain.is_empty() && c.domain != RATE_LIMIT_DOMAIN {
        return Err(MapError::refused(
            &at,
            format!(
                "domain {:?}: only Ferrum's ({RATE_LIMIT_DOMAIN:?}) is supported",
                c.domain
            ),
        ));
    }
    let mut out: Vec<RateLimit> = Vec::new();
    for (i, rl) in c.rate_limits.iter().enumerate() {
        let at = format!("{at} rate_limits[{i}]");
        let (policy, rule) = rule(rl, None, &at)?;
        let policy = policy.ok_or_else(|| MapError::refused(&at, "a Global rule must name its policy"))?;
        add(&mut out, policy, true, rule);
    }
    Ok(out.into_iter().map(Arc::new).collect())
}

/// Adds `rule` to its policy among `out`.
fn add(out: &mut Vec<RateLimit>, policy: String, global: bool, rule: RateLimitRule) {
    match out.iter_mut().find(|p| p.name == policy) {
        Some(p) => p.rules.push(rule),
        None => out.push(RateLimit {
            name: policy,
            global,
            rules: vec![rule],
        }),
    }
}

fn every_request(p: &Option<RuntimeFractionalPercent>) -> bool {
    let whole = |d: i32| match d {
        1 => 10_000,
        2 => 1_000_000,
        _ => 100,
    };
    p.as_ref()
        .and_then(|p| p.default_value)
        .is_some_and(|f| f.numerator >= whole(f.denominator))
}

/// One rule: its selectors from the actions; its limit from the local descriptor they make
/// (`descriptors`), else (Global) from the actions themselves.
fn rule(
    rl: &route::RateLimit,
    descriptors: Option<&[ratelimit::LocalRateLimitDescriptor]>,
    at: &str,
) -> Result<(Option<String>, RateLimitRule), MapError> {
    let mut actions = Actions::default();
    for a in &rl.actions {
        actions.read(a, at)?;
    }
    let policy = actions.policy.take();
    let rule = match descriptors {
        None => global_limit(actions, at)?,
        Some(descriptors) => local_limit(actions, descriptors, at)?,
    };
    Ok((policy, rule))
}

/// What a route's rate limit actions say, read one action at a time.
struct Actions {
    /// The rule's matchers (its limit comes from elsewhere).
    rule: RateLimitRule,
    policy: Option<String>,
    /// The descriptor's entries, `None` where the request gives the value.
    wanted: Vec<(String, Option<String>)>,
    /// Where in `wanted` the masked client addresses are.
    masked: Vec<usize>,
    /// A Global rule's limit and blocks.
    limit: Option<String>,
    blocks: Vec<String>,
}

impl Default for Actions {
    fn default() -> Self {
        Actions {
            rule: RateLimitRule {
                headers: Vec::new(),
                clients: Vec::new(),
                requests: 0,
                window_secs: 0,
            },
            policy: None,
            wanted: Vec::new(),
            masked: Vec::new(),
            limit: None,
            blocks: Vec::new(),
        }
    }
}

impl Actions {
    fn read(&mut self, a: &route::rate_limit::Action, at: &str) -> Result<(), MapError> {
        use route::rate_limit::action::ActionSpecifier as A;
        match &a.action_specifier {
            Some(A::GenericKey(g)) => self.generic_key(g),
            Some(A::HeaderValueMatch(h)) if h.expect_match.is_none_or(|b| b.value) => {
                return self.header_value_match(h, at);
            }
            Some(A::RequestHeaders(h)) if !h.skip_if_absent => {
                self.rule.headers.push(RateLimitHeader {
                    name: h.header_name.to_ascii_lowercase(),
                    value: None,
                });
                self.wanted.push((h.descriptor_key.clone(), None));
            }
            Some(A::MaskedRemoteAddress(m)) => {
                self.masked.push(self.wanted.len());
                self.rule.clients.push(RateLimitClients {
                    cidr: String::new(), // the descriptor's block, or the Global rule's
                    distinct: false,
                });
                let v4 = m.v4_prefix_mask_len.map_or(32, |l| l.value);
                let v6 = m.v6_prefix_mask_len.map_or(128, |l| l.value);
                self.wanted
                    .push(("masked_remote_address".into(), Some(format!("{v4}/{v6}"))));
            }
            Some(A::RemoteAddress(_)) => {
                let after_block = self.wanted.last().is_some_and(|(k, _)| k == "masked_remote_address");
                match self.rule.clients.last_mut() {
                    Some(c) if after_block => c.distinct = true,
                    _ => {
                        return Err(MapError::refused(
                            at,
                            "remote_address must follow a masked_remote_address",
                        ));
                    }
                }
                self.wanted.push(("remote_address".into(), None));
            }
            _ => {
                return Err(MapError::refused(
                    at,
                    "actions: generic_key, header_value_match, request_headers (not skip_if_absent), masked_remote_address, remote_address",
                ));
            }
        }
        Ok(())
    }

    /// A generic key: one of Ferrum's own (the policy's name, a Global rule's limit and
    /// blocks) or a constant entry of the descriptor.
    fn generic_key(&mut self, g: &route::rate_limit::action::GenericKey) {
        let key = match g.descriptor_key.as_str() {
            "" => "generic_key",
            k => k,
        };
        let value = g.descriptor_value.clone();
        match key {
            RATE_LIMIT_POLICY_KEY => self.policy = Some(value.clone()),
            RATE_LIMIT_LIMIT_KEY => self.limit = Some(value.clone()),
            RATE_LIMIT_BLOCK_KEY => self.blocks.push(value.clone()),
            _ => {}
        }
        self.wanted.push((key.into(), Some(value)));
    }

    fn header_value_match(
        &mut self,
        h: &route::rate_limit::action::HeaderValueMatch,
        at: &str,
    ) -> Result<(), MapError> {
        let [m] = &h.headers[..] else {
            return Err(MapError::refused(
                at,
                "a header_value_match must match exactly one header",
            ));
        };
        let value = match &m.header_match_specifier {
            Some(route::header_matcher::HeaderMatchSpecifier::StringMatch(s)) if !m.invert_match => {
                string_match(s, at)?
            }
            _ => {
                return Err(MapError::refused(
                    at,
                    "header_value_match: only string matches are supported",
                ));
            }
        };
        self.rule.headers.push(RateLimitHeader {
            name: m.name.to_ascii_lowercase(),
            value: Some(value),
        });
        let key = match h.descriptor_key.as_str() {
            "" => "header_match",
            k => k,
        };
        self.wanted.push((key.into(), Some(h.descriptor_value.clone())));
        Ok(())
    }
}

/// A Local rule: the descriptor its actions make gives the client blocks and the token
/// bucket, which must refill whole.
fn local_limit(
    actions: Actions,
    descriptors: &[ratelimit::LocalRateLimitDescriptor],
    at: &str,
) -> Result<RateLimitRule, MapError> {
    let Actions {
        mut rule,
        wanted,
        masked,
        ..
    } = actions;
    let d = descriptor(&wanted, &masked, descriptors)
        .ok_or_else(|| MapError::refused(at, "no descriptor matches what its actions make"))?;
    for (c, &i) in rule.clients.iter_mut().zip(&masked) {
        c.cidr = d.entries[i].value.clone();
    }
    let b = d
        .token_bucket
        .as_ref()
        .ok_or_else(|| MapError::refused(at, "a descriptor without a token bucket"))?;
    let refill = b.tokens_per_fill.map_or(1, |t| t.value);
    let secs = b.fill_interval.as_ref().filter(|d| d.nanos == 0 && d.seconds > 0);
    match secs {
        Some(s) if refill == b.max_tokens => {
            rule.requests = b.max_tokens;
            rule.window_secs = u32::try_from(s.seconds).unwrap_or(u32::MAX);
            Ok(rule)
        }
        _ => Err(MapError::refused(
            at,
            "token buckets must refill whole (tokens_per_fill = max_tokens) every whole number of seconds",
        )),
    }
}

/// A Global rule's limit (`<requests>/<window seconds>`) and blocks (one before each masked
/// address, of the length it is masked to), as its actions say them.
fn global_limit(actions: Actions, at: &str) -> Result<RateLimitRule, MapError> {
    let Actions {
        mut rule,
        wanted,
        masked,
        limit,
        blocks,
        ..
    } = actions;
    let lens = masked.iter().map(|&i| wanted[i].1.as_deref().unwrap_or_default());
    let parsed = limit.as_deref().and_then(|l| {
        let (n, secs) = l.split_once('/')?;
        Some((n.parse::<u32>().ok()?, secs.parse::<u32>().ok().filter(|s| *s > 0)?))
    });
    let Some((requests, window_secs)) = parsed else {
        return Err(MapError::refused(
            at,
            format!("a Global rule must say its limit ({RATE_LIMIT_LIMIT_KEY}: <requests>/<window seconds>)"),
        ));
    };
    if blocks.len() != rule.clients.len() || !blocks.iter().zip(lens).all(|(b, l)| block_has_length(b, l)) {
        return Err(MapError::refused(
            at,
            format!(
                "each masked_remote_address must follow its block ({RATE_LIMIT_BLOCK_KEY}), of the length it masks to"
            ),
        ));
    }
    for (c, b) in rule.clients.iter_mut().zip(blocks) {
        c.cidr = b;
    }
    rule.requests = requests;
    rule.window_secs = window_secs;
    Ok(rule)
}

/// The configured descriptor with `wanted`'s keys, its fixed values, wildcards (empty values)
/// where the request gives one, and a block of the masked length where a masked address goes.
fn descriptor<'a>(
    wanted: &[(String, Option<String>)],
    masked: &[usize],
    descriptors: &'a [ratelimit::LocalRateLimitDescriptor],
) -> Option<&'a ratelimit::LocalRateLimitDescriptor> {
    descriptors.iter().find(|d| {
        d.entries.len() == wanted.len()
            && d.entries.iter().zip(wanted).enumerate().all(|(i, (e, (k, v)))| {
                e.key == *k
                    && match v {
                        _ if masked.contains(&i) => block_has_length(&e.value, v.as_deref().unwrap_or("")),
                        Some(v) => e.value == *v,
                        None => e.value.is_empty(),
                    }
            })
    })
}

/// Whether `block` (`10.0.0.0/8`) has the prefix length the action masks its family to
/// (`lens`: `v4/v6`).
fn block_has_length(block: &str, lens: &str) -> bool {
    let (Some((addr, len)), Some((v4, v6))) = (block.split_once('/'), lens.split_once('/')) else {
        return false;
    };
    match addr.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(_)) => len == v4,
        Ok(std::net::IpAddr::V6(_)) => len == v6,
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::RuntimeFractionalPercent;
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
    use envoy_types::pb::envoy::r#type::v3::{FractionalPercent, TokenBucket};
    use envoy_types::pb::google::protobuf::{BoolValue, Duration, UInt32Value};
    use ferrum_proto::xds::{RATE_LIMIT_BLOCK_KEY, RATE_LIMIT_LIMIT_KEY, RATE_LIMIT_PER_ROUTE, RATE_LIMIT_RULE_KEY};
    use prost::Message;
    use route::rate_limit::action::{self, ActionSpecifier as A};

    fn all() -> Option<RuntimeFractionalPercent> {
        Some(RuntimeFractionalPercent {
            default_value: Some(FractionalPercent {
                numerator: 100,
                denominator: 0,
            }),
            runtime_key: String::new(),
        })
    }

    fn bucket(n: u32, refill: u32, secs: i64) -> Option<TokenBucket> {
        Some(TokenBucket {
            max_tokens: n,
            tokens_per_fill: Some(UInt32Value { value: refill }),
            fill_interval: Some(Duration {
                seconds: secs,
                nanos: 0,
            }),
        })
    }

    fn entries(kv: &[(&str, &str)]) -> Vec<Entry> {
        kv.iter()
            .map(|(k, v)| Entry {
                key: k.to_string(),
                value: v.to_string(),
            })
            .collect()
    }

    fn one_rule(actions: Vec<A>) -> route::RateLimit {
        route::RateLimit {
            actions: actions
                .into_iter()
                .map(|a| route::rate_limit::Action {
                    action_specifier: Some(a),
                })
                .collect(),
            ..Default::default()
        }
    }

    fn config(actions: Vec<A>, descriptor: &[(&str, &str)], b: Option<TokenBucket>) -> Any {
        let c = LocalRateLimit {
            filter_enabled: all(),
            filter_enforced: all(),
            always_consume_default_token_bucket: Some(BoolValue { value: false }),
            rate_limits: vec![one_rule(actions)],
            descriptors: vec![ratelimit::LocalRateLimitDescriptor {
                entries: entries(descriptor),
                token_bucket: b,
                ..Default::default()
            }],
            ..Default::default()
        };
        Any {
            type_url: LOCAL_RATE_LIMIT.into(),
            value: c.encode_to_vec(),
        }
    }

    fn generic(k: &str, v: &str) -> A {
        A::GenericKey(action::GenericKey {
            descriptor_key: k.into(),
            descriptor_value: v.into(),
            ..Default::default()
        })
    }

    fn global(actions: Vec<A>, domain: &str) -> Any {
        let c = RateLimitPerRoute {
            rate_limits: vec![one_rule(actions)],
            domain: domain.into(),
            ..Default::default()
        };
        Any {
            type_url: RATE_LIMIT_PER_ROUTE.into(),
            value: c.encode_to_vec(),
        }
    }

    fn masked(v4: u32) -> A {
        A::MaskedRemoteAddress(action::MaskedRemoteAddress {
            v4_prefix_mask_len: Some(UInt32Value { value: v4 }),
            v6_prefix_mask_len: None,
        })
    }

    #[test]
    fn a_global_rule_reads_back_with_the_limit_and_block_its_descriptor_says() {
        let a = global(
            vec![
                generic(RATE_LIMIT_POLICY_KEY, "ns/limits"),
                generic(RATE_LIMIT_RULE_KEY, "0"),
                generic(RATE_LIMIT_LIMIT_KEY, "5/60"),
                generic(RATE_LIMIT_BLOCK_KEY, "10.0.0.0/8"),
                masked(8),
                A::RemoteAddress(action::RemoteAddress {}),
            ],
            "",
        );
        let p = global_policies(&a, "Route r").unwrap();
        assert_eq!((p.len(), p[0].name.as_str(), p[0].global), (1, "ns/limits", true));
        let r = &p[0].rules[0];
        assert_eq!((r.requests, r.window_secs), (5, 60));
        assert_eq!(
            (r.clients[0].cidr.as_str(), r.clients[0].distinct),
            ("10.0.0.0/8", true)
        );

        let refused = |actions: Vec<A>, domain: &str| {
            global_policies(&global(actions, domain), "Route r")
                .unwrap_err()
                .to_string()
        };
        let named = || {
            vec![
                generic(RATE_LIMIT_POLICY_KEY, "ns/limits"),
                generic(RATE_LIMIT_RULE_KEY, "0"),
            ]
        };
        assert!(refused(named(), "").contains("must say its limit"));
        let mut other = named();
        other.push(generic(RATE_LIMIT_LIMIT_KEY, "5/60"));
        assert!(refused(other.clone(), "someone-else").contains("domain"));
        other.extend([generic(RATE_LIMIT_BLOCK_KEY, "10.0.0.0/8"), masked(16)]);
        assert!(
            refused(other, "").contains("of the length it masks to"),
            "a block the masked address can never be"
        );
    }

    #[test]
    fn a_rule_reads_back_with_its_selectors_block_and_window() {
        let a = config(
            vec![
                generic(RATE_LIMIT_POLICY_KEY, "ns/limits"),
                generic(RATE_LIMIT_RULE_KEY, "0"),
                A::RequestHeaders(action::RequestHeaders {
                    header_name: "X-User".into(),
                    descriptor_key: "header_0".into(),
                    ..Default::default()
                }),
                A::MaskedRemoteAddress(action::MaskedRemoteAddress {
                    v4_prefix_mask_len: Some(UInt32Value { value: 8 }),
                    v6_prefix_mask_len: None,
                }),
                A::RemoteAddress(action::RemoteAddress {}),
            ],
            &[
                (RATE_LIMIT_POLICY_KEY, "ns/limits"),
                (RATE_LIMIT_RULE_KEY, "0"),
                ("header_0", ""),
                ("masked_remote_address", "10.0.0.0/8"),
                ("remote_address", ""),
            ],
            bucket(5, 5, 60),
        );
        let p = policies(&a, "r", "Route r").unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].name, "ns/limits");
        let r = &p[0].rules[0];
        assert_eq!((r.requests, r.window_secs), (5, 60));
        assert_eq!(r.headers[0].name, "x-user");
        assert!(r.headers[0].value.is_none());
        assert_eq!(r.clients[0].cidr, "10.0.0.0/8");
        assert!(r.clients[0].distinct);
    }

    #[test]
    fn a_config_from_elsewhere_is_one_policy_named_after_its_route() {
        let a = config(vec![generic("", "all")], &[("generic_key", "all")], bucket(10, 10, 1));
        let p = policies(&a, "r", "Route r").unwrap();
        assert_eq!(p[0].name, "xds/r");
        assert_eq!((p[0].rules[0].requests, p[0].rules[0].window_secs), (10, 1));
    }

    #[test]
    fn what_a_window_cannot_say_is_refused() {
        let partial_refill = config(vec![generic("", "all")], &[("generic_key", "all")], bucket(10, 1, 1));
        let no_descriptor = config(vec![generic("", "all")], &[("generic_key", "other")], bucket(10, 10, 1));
        let unknown_action = config(
            vec![A::DestinationCluster(action::DestinationCluster {})],
            &[("destination_cluster", "")],
            bucket(10, 10, 1),
        );
        for (a, why) in [
            (partial_refill, "refill whole"),
            (no_descriptor, "no descriptor"),
            (unknown_action, "actions:"),
        ] {
            let e = policies(&a, "r", "Route r").unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
        }
    }
}
