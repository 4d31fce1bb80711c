//! The traffic policy Envoy keeps on routes, read back onto clusters: ferrum keeps retries and
//! the consistent-hash key per cluster, Envoy per route (`RouteAction.retry_policy`,
//! `hash_policy`). Every route that sends to a cluster must then agree on its retries; a route
//! without a hash policy has no opinion on the key. Upstream TLS (`UpstreamTlsContext`) is the
//! cluster's own.

use std::collections::HashMap;
use std::net::IpAddr;

use envoy_types::pb::envoy::config::cluster::v3 as cluster;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::route::v3 as route;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
use ferrum_snapshot::model::{CertSource, HashCookie, HashInput, HashOn, LbPolicy, RetryPolicy, UpstreamTls};

use super::map::{MapError, decode};

const UPSTREAM_TLS: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";

/// Retry conditions with no ferrum equivalent: ferrum-dp does not retry on them (it retries on
/// what the others in the same list say).
const NOT_RETRIED: [&str; 1] = ["http3-post-connect-failure"];

/// What the routes to one cluster ask of it, and the first route that asked.
#[derive(Default)]
struct Asked {
    hash: Option<(HashKeyOf, String)>,
    retry: Option<(Option<RetryPolicy>, String)>,
}

/// A route's hash key: `lb`'s, and a cookie or query parameter that wins over it.
type HashKeyOf = (HashOn, Option<HashInput>);

/// The retry and hash policies of every route, by the cluster they send to.
#[derive(Default)]
pub struct RoutePolicies(HashMap<String, Asked>);

impl RoutePolicies {
    /// Notes what each forwarding route of `rc` asks of its clusters; routes that ask one cluster
    /// for different things are refused.
    pub fn note(&mut self, rc: &route::RouteConfiguration) -> Result<(), MapError> {
        for vh in &rc.virtual_hosts {
            for r in &vh.routes {
                let Some(route::route::Action::Route(ra)) = &r.action else {
                    continue;
                };
                let at = format!("RouteConfiguration {} route {:?}", rc.name, r.name);
                self.note_route(ra, &at)?;
            }
        }
        Ok(())
    }

    fn note_route(&mut self, ra: &route::RouteAction, at: &str) -> Result<(), MapError> {
        use route::route_action::ClusterSpecifier;
        let hash = hash_on(&ra.hash_policy, at)?;
        let retry = match &ra.retry_policy {
            Some(p) if !p.retry_on.is_empty() => Some(retry_policy(p, at)?),
            _ => None,
        };
        let clusters: Vec<&str> = match &ra.cluster_specifier {
            Some(ClusterSpecifier::Cluster(c)) => vec![c],
            Some(ClusterSpecifier::WeightedClusters(w)) => w
                .clusters
                .iter()
                .filter(|c| c.weight.as_ref().is_none_or(|w| w.value > 0))
                .map(|c| c.name.as_str())
                .collect(),
            _ => Vec::new(),
        };
        for c in clusters {
            let asked = self.0.entry(c.to_string()).or_default();
            if let Some(h) = &hash {
                match &asked.hash {
                    Some((was, by)) if was != h => return Err(disagree(at, c, "hash policies", by)),
                    Some(_) => {}
                    None => asked.hash = Some((h.clone(), at.to_string())),
                }
            }
            match &asked.retry {
                Some((was, by)) if *was != retry => return Err(disagree(at, c, "retry policies", by)),
                Some(_) => {}
                None => asked.retry = Some((retry.clone(), at.to_string())),
            }
        }
        Ok(())
    }

    /// The routes' policies on cluster `c` (mapped from `envoy`): a ring-hash or Maglev cluster
    /// hashes on the routes' key (without one Envoy hashes nothing: random), and retries as
    /// its routes say, within the cluster's retry budget.
    pub fn apply(&self, c: &mut ferrum_snapshot::model::Cluster, envoy: &cluster::Cluster) {
        use cluster::cluster::LbPolicy as EnvoyLb;
        let asked = self.0.get(&c.name);
        if matches!(
            EnvoyLb::try_from(envoy.lb_policy),
            Ok(EnvoyLb::RingHash | EnvoyLb::Maglev)
        ) {
            (c.lb, c.hash_input) = match asked.and_then(|a| a.hash.as_ref()) {
                Some(((on, input), _)) => (LbPolicy::ConsistentHash(on.clone()), input.clone()),
                None => (LbPolicy::Random, None),
            };
        }
        c.retry = asked
            .and_then(|a| a.retry.as_ref())
            .and_then(|(p, _)| p.clone())
            .map(|mut p| {
                let budget = envoy
                    .circuit_breakers
                    .as_ref()
                    .and_then(|cb| cb.thresholds.first())
                    .and_then(|t| t.retry_budget.as_ref());
                if let Some(b) = budget {
                    if let Some(pct) = &b.budget_percent {
                        p.budget_percent = pct.value.clamp(0.0, 100.0) as u32;
                    }
                    if let Some(n) = &b.min_retry_concurrency {
                        p.min_retry_concurrency = n.value;
                    }
                }
                p
            });
    }
}

fn disagree(at: &str, cluster: &str, what: &str, first: &str) -> MapError {
    MapError::Refused {
        at: at.to_string(),
        reason: format!("{first} sends to cluster {cluster} too, with other {what}; ferrum keeps one per cluster"),
    }
}

/// A route's hash key: one header, the client's address, a cookie or a query parameter.
fn hash_on(policies: &[route::route_action::HashPolicy], at: &str) -> Result<Option<HashKeyOf>, MapError> {
    use route::route_action::hash_policy::PolicySpecifier;
    let refused = |reason: &str| MapError::Refused {
        at: at.to_string(),
        reason: reason.to_string(),
    };
    match policies {
        [] => Ok(None),
        [p] => match &p.policy_specifier {
            Some(PolicySpecifier::Header(h)) if h.regex_rewrite.is_none() => {
                Ok(Some((HashOn::Header(h.header_name.to_ascii_lowercase()), None)))
            }
            Some(PolicySpecifier::ConnectionProperties(c)) if c.source_ip => Ok(Some((HashOn::ClientIp, None))),
            Some(PolicySpecifier::Cookie(c)) if c.attributes.is_empty() => {
                let cookie = HashCookie {
                    name: c.name.clone(),
                    path: Some(c.path.clone()).filter(|p| !p.is_empty()),
                    ttl_ms: c.ttl.as_ref().map(|d| {
                        u64::try_from(d.seconds).unwrap_or(0) * 1000 + u64::from(d.nanos.max(0) as u32 / 1_000_000)
                    }),
                };
                let input = HashInput {
                    cookie: Some(cookie),
                    ..Default::default()
                };
                Ok(Some((HashOn::Header("cookie".into()), Some(input))))
            }
            Some(PolicySpecifier::QueryParameter(q)) => {
                let input = HashInput {
                    query_parameter: Some(q.name.clone()),
                    ..Default::default()
                };
                Ok(Some((HashOn::ClientIp, Some(input))))
            }
            _ => Err(refused(
                "hash_policy: only a header (without regex_rewrite), the source IP, a cookie (without attributes) \
                 or a query parameter is supported",
            )),
        },
        _ => Err(refused("hash_policy: only one hash policy per route is supported")),
    }
}

/// Envoy's `retry_on` names as ferrum's conditions.
fn retry_policy(p: &route::RetryPolicy, at: &str) -> Result<RetryPolicy, MapError> {
    let mut on = Vec::new();
    let mut grpc_on = Vec::new();
    for cond in p.retry_on.split(',').map(str::trim).filter(|c| !c.is_empty()) {
        match cond {
            "connect-failure" | "reset" | "5xx" | "gateway-error" => on.push(cond.to_string()),
            // A stream the server refused, or reset before it took the request: a reset to us.
            "refused-stream" | "reset-before-request" => on.push("reset".into()),
            "retriable-status-codes" => on.extend(p.retriable_status_codes.iter().map(u32::to_string)),
            "retriable-4xx" => on.push("409".into()),
            c if let Some(code) = ferrum_snapshot::model::grpc_retry_code(c) => grpc_on.push(code),
            c if NOT_RETRIED.contains(&c) => {}
            other => {
                return Err(MapError::Refused {
                    at: at.to_string(),
                    reason: format!("retry_on {other:?} is not supported"),
                });
            }
        }
    }
    on.dedup();
    let d = RetryPolicy::default();
    Ok(RetryPolicy {
        // Envoy's default is one retry.
        attempts: p.num_retries.as_ref().map_or(1, |n| n.value),
        on,
        grpc_on,
        backoff_base_ms: p
            .retry_back_off
            .as_ref()
            .and_then(|b| b.base_interval.as_ref())
            .map_or(d.backoff_base_ms, |b| {
                (b.seconds.max(0) as u64) * 1000 + (b.nanos.max(0) as u64) / 1_000_000
            }),
        ..d
    })
}

/// A cluster's `UpstreamTlsContext`: SNI, and the CA file its certificate is checked against
/// (none: not checked, as Envoy does without a validation context). The certificate's name is
/// checked against the SNI name, so SAN matchers must name that and nothing else.
/// The name the upstream certificate is checked against (the SNI, else the one SAN matcher's
/// IP address) and the names it must carry one of instead, from the exact SAN matchers.
fn names_to_check(sni: String, v: &tls::CertificateValidationContext) -> Result<(String, Vec<String>), &'static str> {
    let names: Vec<&str> = v
        .match_typed_subject_alt_names
        .iter()
        .map(|m| match m.matcher.as_ref().and_then(|m| m.match_pattern.as_ref()) {
            Some(MatchPattern::Exact(n)) if !m.matcher.as_ref().is_some_and(|m| m.ignore_case) => Some(n.as_str()),
            _ => None,
        })
        .collect::<Option<_>>()
        .ok_or("subject alt name matchers must be exact names")?;
    match (sni.is_empty(), names.as_slice()) {
        (false, []) => Ok((sni, Vec::new())),
        (false, [n]) if *n == sni => Ok((sni, Vec::new())),
        (true, [n]) if n.parse::<IpAddr>().is_ok() => Ok((n.to_string(), Vec::new())),
        (false, names) => Ok((sni, names.iter().map(|n| n.to_string()).collect())),
        (true, _) => {
            Err("without sni, the certificate is checked against the one subject alt name matcher, an IP address")
        }
    }
}

pub fn upstream_tls(ts: &core::TransportSocket, at: &str) -> Result<UpstreamTls, MapError> {
    use tls::common_tls_context::ValidationContextType;
    let refused = |reason: &str| MapError::Refused {
        at: format!("{at}: transport_socket"),
        reason: reason.to_string(),
    };
    let Some(core::transport_socket::ConfigType::TypedConfig(tc)) = &ts.config_type else {
        return Err(refused("needs a typed_config"));
    };
    let ctx: tls::UpstreamTlsContext = decode(tc, UPSTREAM_TLS).map_err(|e| e.within(at))?;
    let common = ctx.common_tls_context.unwrap_or_default();
    if !common.tls_certificates.is_empty() {
        return Err(refused(
            "inline tls_certificates are not accepted: serve key pairs over SDS",
        ));
    }
    // Mutual TLS: one client certificate, over SDS; its digest is filled in when the secret
    // arrives.
    let client_certificate = match common.tls_certificate_sds_secret_configs.as_slice() {
        [] => None,
        [one] => Some(CertSource::Secret {
            name: super::map::ads_secret(one).ok_or_else(|| refused("SDS secrets must come over ADS"))?,
            digest: String::new(),
        }),
        _ => return Err(refused("one client certificate at most")),
    };
    let validation = match common.validation_context_type {
        None => None,
        Some(ValidationContextType::ValidationContext(v)) => Some(v),
        Some(_) => return Err(refused("only an inline validation_context is supported")),
    };
    let Some(v) = validation else {
        return Ok(UpstreamTls {
            sni: ctx.sni,
            ca_file: None,
            ca_pem: None,
            insecure_skip_verify: true,
            client_certificate,
            subject_alt_names: Vec::new(),
            subject_alt_uris: Vec::new(),
        });
    };
    let (ca_file, ca_pem) = match v.trusted_ca.as_ref().and_then(|d| d.specifier.clone()) {
        Some(core::data_source::Specifier::Filename(f)) => (Some(f), None),
        Some(core::data_source::Specifier::InlineString(pem)) => (None, Some(pem)),
        _ => {
            return Err(refused(
                "validation_context.trusted_ca must be a file name or inline PEM",
            ));
        }
    };
    let (sni, subject_alt_names) = names_to_check(ctx.sni, &v).map_err(refused)?;
    let (subject_alt_uris, subject_alt_names) = subject_alt_names
        .into_iter()
        .partition(|n| ferrum_snapshot::validate::is_uri(n));
    Ok(UpstreamTls {
        sni,
        ca_file,
        ca_pem,
        insecure_skip_verify: false,
        client_certificate,
        subject_alt_names,
        subject_alt_uris,
    })
}
