//! A cluster's traffic policy as Envoy is told it. Ferrum keeps retries and the consistent-hash
//! key on the cluster (a BackendPolicy, a Backend, a DestinationRule); Envoy keeps them on each
//! route that sends to the cluster (`RouteAction.retry_policy`, `hash_policy`), so every route
//! carries the policy its backends share. The retry budget and upstream TLS stay on the Cluster.

use std::collections::HashMap;
use std::net::IpAddr;

use envoy_types::pb::envoy::config::cluster::v3::circuit_breakers::thresholds::RetryBudget;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::route::v3 as route;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use envoy_types::pb::envoy::r#type::v3::Percent;
use ferrum_snapshot::model::{self, HashOn, LbPolicy, RetryPolicy, UpstreamProtocol, UpstreamTls};

use super::resources::{any, ms, u32v};

pub const UPSTREAM_TLS: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";

/// Where Envoy finds the public roots when a cluster names no CA file (ferrum-dp uses Mozilla's
/// roots built in; Envoy has none built in). The Debian/Ubuntu bundle, as in Envoy's images.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The snapshot's clusters by name: a route finds its backends' policies here.
pub type ClusterIndex<'a> = HashMap<&'a str, &'a model::Cluster>;

/// The clusters a forwarding route sends traffic to (weight above zero, resolved).
fn backends<'a>(targets: &[model::WeightedCluster], clusters: &ClusterIndex<'a>) -> Vec<&'a model::Cluster> {
    targets
        .iter()
        .filter(|t| t.weight > 0)
        .filter_map(|t| t.cluster.as_deref().and_then(|n| clusters.get(n).copied()))
        .collect()
}

/// The retry and hash policies of `r`'s backends, set on its RouteAction. Envoy holds one of
/// each per route: backends that disagree are reported, and then the route retries nothing
/// (retrying where a backend did not ask for it is the riskier reading) and hashes on the
/// first backend's key.
pub fn route_policies(
    r: &model::Route,
    targets: &[model::WeightedCluster],
    clusters: &ClusterIndex,
    ra: &mut route::RouteAction,
    unsupported: &mut Vec<String>,
) {
    let backends = backends(targets, clusters);
    let retries: Vec<Option<&RetryPolicy>> = backends.iter().map(|c| c.retry.as_ref()).collect();
    let retry = match retries.split_first() {
        // A route's own retries are Envoy's per-route policy as they are.
        _ if r.retry.is_some() => r.retry.as_ref(),
        Some((first, rest)) if rest.iter().all(|p| p == first) => *first,
        Some(_) => {
            unsupported.push(format!(
                "route {}: its backends have different retry policies; Envoy takes one per route, so it retries none",
                r.name
            ));
            None
        }
        None => None,
    };
    let per_try = r.timeouts.backend_request_ms;
    ra.retry_policy = match retry {
        Some(p) => Some(retry_policy(p, per_try)),
        None => per_try.map(|t| route::RetryPolicy {
            per_try_timeout: Some(ms(t)),
            ..Default::default()
        }),
    };
    let keys: Vec<(&HashOn, Option<&model::HashInput>)> = backends
        .iter()
        .filter_map(|c| match &c.lb {
            LbPolicy::ConsistentHash(on) => Some((on, c.hash_input.as_ref())),
            _ => None,
        })
        .collect();
    if let Some(first) = keys.first() {
        if keys.iter().any(|k| k != first) {
            unsupported.push(format!(
                "route {}: its backends hash on different keys; Envoy takes one per route, the first backend's",
                r.name
            ));
        }
        ra.hash_policy = vec![hash_policy(first.0, first.1)];
    }
}

/// Ferrum's retry conditions are Envoy's `retry_on` names; status codes go through
/// `retriable-status-codes`.
pub fn retry_policy(p: &RetryPolicy, per_try_ms: Option<u64>) -> route::RetryPolicy {
    let codes: Vec<u32> = p.on.iter().filter_map(|c| c.parse().ok()).collect();
    let mut on: Vec<&str> =
        p.on.iter()
            .map(String::as_str)
            .filter(|c| c.parse::<u32>().is_err())
            .collect();
    if !codes.is_empty() {
        on.push("retriable-status-codes");
    }
    let grpc = ferrum_snapshot::model::GRPC_RETRY_CONDITIONS.iter();
    on.extend(grpc.filter(|(_, code)| p.grpc_on.contains(code)).map(|(name, _)| *name));
    route::RetryPolicy {
        retry_on: on.join(","),
        num_retries: u32v(p.attempts),
        per_try_timeout: per_try_ms.map(ms),
        retriable_status_codes: codes,
        retry_back_off: Some(route::retry_policy::RetryBackOff {
            // Envoy wants a base above zero; its cap defaults to ten times the base.
            base_interval: Some(ms(p.backoff_base_ms.max(1))),
            max_interval: None,
        }),
        ..Default::default()
    }
}

/// Envoy's key: the cookie or query parameter when the cluster names one, else `lb`'s.
fn hash_policy(on: &HashOn, input: Option<&model::HashInput>) -> route::route_action::HashPolicy {
    use route::route_action::hash_policy::{ConnectionProperties, Cookie, Header, PolicySpecifier, QueryParameter};
    let lb_key = || match on {
        HashOn::Header(h) => PolicySpecifier::Header(Header {
            header_name: h.clone(),
            regex_rewrite: None,
        }),
        HashOn::ClientIp => PolicySpecifier::ConnectionProperties(ConnectionProperties { source_ip: true }),
    };
    let specifier = match input {
        Some(model::HashInput { cookie: Some(c), .. }) => PolicySpecifier::Cookie(Cookie {
            name: c.name.clone(),
            ttl: c.ttl_ms.map(ms),
            path: c.path.clone().unwrap_or_default(),
            attributes: Vec::new(),
        }),
        Some(model::HashInput {
            query_parameter: Some(q),
            ..
        }) => PolicySpecifier::QueryParameter(QueryParameter { name: q.clone() }),
        _ => lb_key(),
    };
    route::route_action::HashPolicy {
        policy_specifier: Some(specifier),
        terminal: false,
    }
}

/// The cluster's retry budget, on its circuit breaker thresholds.
pub fn retry_budget(p: &RetryPolicy) -> RetryBudget {
    RetryBudget {
        budget_percent: Some(Percent {
            value: f64::from(p.budget_percent),
        }),
        min_retry_concurrency: u32v(p.min_retry_concurrency),
        ..Default::default()
    }
}

/// A certificate name that must be there: an IP address or a DNS name.
fn san_matcher(name: &str) -> tls::SubjectAltNameMatcher {
    use tls::subject_alt_name_matcher::SanType;
    tls::SubjectAltNameMatcher {
        san_type: if name.parse::<IpAddr>().is_ok() {
            SanType::IpAddress
        } else if ferrum_snapshot::validate::is_uri(name) {
            SanType::Uri
        } else {
            SanType::Dns
        } as i32,
        matcher: Some(matcher::StringMatcher {
            match_pattern: Some(matcher::string_matcher::MatchPattern::Exact(name.to_string())),
            ignore_case: false,
        }),
        oid: String::new(),
    }
}

/// TLS to the cluster's endpoints: SNI, and the certificate checked against the CA file (or the
/// system bundle) and the SNI name (or the policy's subject alt names), as ferrum-dp checks it; nothing checked when the policy
/// says `insecureSkipVerify`.
pub fn upstream_tls(t: &UpstreamTls, protocol: Option<UpstreamProtocol>) -> core::TransportSocket {
    use tls::common_tls_context::ValidationContextType;
    let ip = t.sni.parse::<IpAddr>().is_ok();
    let validation = (!t.insecure_skip_verify).then(|| {
        ValidationContextType::ValidationContext(tls::CertificateValidationContext {
            trusted_ca: Some(core::DataSource {
                specifier: Some(match &t.ca_pem {
                    // Certificates only (public): inline, not a secret.
                    Some(pem) => core::data_source::Specifier::InlineString(pem.clone()),
                    None => core::data_source::Specifier::Filename(
                        t.ca_file.clone().unwrap_or_else(|| SYSTEM_CA_BUNDLE.into()),
                    ),
                }),
                ..Default::default()
            }),
            match_typed_subject_alt_names: match (t.subject_alt_names.as_slice(), t.subject_alt_uris.as_slice()) {
                ([], []) => vec![san_matcher(&t.sni)],
                (names, uris) => names.iter().chain(uris).map(|n| san_matcher(n)).collect(),
            },
            ..Default::default()
        })
    });
    let context = tls::UpstreamTlsContext {
        // SNI carries host names only (RFC 6066).
        sni: if ip { String::new() } else { t.sni.clone() },
        common_tls_context: Some(tls::CommonTlsContext {
            alpn_protocols: protocol
                .map(|p| match p {
                    UpstreamProtocol::Http2 => "h2".into(),
                    UpstreamProtocol::Http1 => "http/1.1".into(),
                })
                .into_iter()
                .collect(),
            validation_context_type: validation,
            // Mutual TLS: the client certificate comes over SDS, like a listener's.
            tls_certificate_sds_secret_configs: t
                .client_certificate
                .iter()
                .map(|c| tls::SdsSecretConfig {
                    name: super::resources::secret_name(c),
                    sds_config: Some(super::resources::ads()),
                })
                .collect(),
            ..Default::default()
        }),
        ..Default::default()
    };
    core::TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(core::transport_socket::ConfigType::TypedConfig(any(
            UPSTREAM_TLS,
            &context,
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrum_snapshot::model::{Cluster, Endpoint, Route, WeightedCluster};

    fn cluster(name: &str, retry: Option<RetryPolicy>, lb: LbPolicy) -> Cluster {
        let mut c = Cluster::new(name, vec![Endpoint::new("127.0.0.1", 80)]);
        c.retry = retry;
        c.lb = lb;
        c
    }

    fn target(name: &str, weight: u32) -> WeightedCluster {
        WeightedCluster {
            cluster: Some(name.into()),
            weight,
            headers: None,
        }
    }

    fn route() -> Route {
        Route {
            matcher: model::RouteMatch {
                path: model::PathMatch::Prefix("/".into()),
                ..Default::default()
            },
            ..Route::forward("default/r/0/0".into(), Vec::new())
        }
    }

    fn policies(route: &Route, targets: &[WeightedCluster], clusters: &[Cluster]) -> (route::RouteAction, Vec<String>) {
        let index: ClusterIndex = clusters.iter().map(|c| (c.name.as_str(), c)).collect();
        let (mut ra, mut unsupported) = (route::RouteAction::default(), Vec::new());
        route_policies(route, targets, &index, &mut ra, &mut unsupported);
        (ra, unsupported)
    }

    #[test]
    fn status_codes_are_retried_through_retriable_status_codes() {
        let p = RetryPolicy {
            attempts: 3,
            on: vec!["connect-failure".into(), "429".into(), "gateway-error".into()],
            backoff_base_ms: 0,
            ..Default::default()
        };
        let r = retry_policy(&p, Some(1500));
        assert_eq!(r.retry_on, "connect-failure,gateway-error,retriable-status-codes");
        assert_eq!(r.retriable_status_codes, vec![429]);
        assert_eq!(r.num_retries.map(|n| n.value), Some(3));
        assert_eq!(r.per_try_timeout, Some(ms(1500)));
        let base = r.retry_back_off.and_then(|b| b.base_interval);
        assert_eq!(base, Some(ms(1)), "Envoy refuses a zero base interval");
    }

    #[test]
    fn a_route_carries_the_policies_its_backends_share() {
        let header = LbPolicy::ConsistentHash(HashOn::Header("x-user".into()));
        let clusters = [
            cluster("a", Some(RetryPolicy::default()), header.clone()),
            cluster("b", Some(RetryPolicy::default()), header),
            cluster("c", None, LbPolicy::ConsistentHash(HashOn::ClientIp)),
        ];
        let route = route();
        let (ra, unsupported) = policies(&route, &[target("a", 1), target("b", 1)], &clusters);
        assert!(unsupported.is_empty(), "{unsupported:?}");
        assert_eq!(ra.retry_policy.map(|p| p.num_retries), Some(u32v(2)));
        assert_eq!(ra.hash_policy.len(), 1);

        // A backend without weight takes no traffic: its policy does not count.
        let (ra, unsupported) = policies(&route, &[target("a", 1), target("c", 0)], &clusters);
        assert!(unsupported.is_empty() && ra.retry_policy.is_some(), "{unsupported:?}");

        // Backends that disagree: reported; no retries, the first backend's key.
        let (ra, unsupported) = policies(&route, &[target("a", 1), target("c", 1)], &clusters);
        assert_eq!(unsupported.len(), 2, "{unsupported:?}");
        assert!(ra.retry_policy.is_none());
        let key = ra.hash_policy[0].policy_specifier.clone();
        assert!(
            matches!(key, Some(route::route_action::hash_policy::PolicySpecifier::Header(h)) if h.header_name == "x-user")
        );

        // A route's own retries win over its backends', agreeing or not.
        let own = Route {
            retry: Some(RetryPolicy {
                attempts: 5,
                ..RetryPolicy::default()
            }),
            ..route
        };
        let (ra, unsupported) = policies(&own, &[target("a", 1), target("c", 1)], &clusters);
        assert_eq!(ra.retry_policy.map(|p| p.num_retries), Some(u32v(5)));
        assert_eq!(unsupported.len(), 1, "only the hash keys disagree: {unsupported:?}");
    }

    #[test]
    fn a_cookie_or_query_parameter_is_envoys_key() {
        use route::route_action::hash_policy::PolicySpecifier;
        let mut sticky = cluster("s", None, LbPolicy::ConsistentHash(HashOn::Header("cookie".into())));
        sticky.hash_input = Some(model::HashInput {
            cookie: Some(model::HashCookie {
                name: "user".into(),
                path: Some("/".into()),
                ttl_ms: Some(3_600_000),
            }),
            ..Default::default()
        });
        let mut by_query = cluster("q", None, LbPolicy::ConsistentHash(HashOn::ClientIp));
        by_query.hash_input = Some(model::HashInput {
            query_parameter: Some("user".into()),
            ..Default::default()
        });
        let clusters = [sticky, by_query];
        let (ra, _) = policies(&route(), &[target("s", 1)], &clusters);
        match ra.hash_policy[0].policy_specifier.clone() {
            Some(PolicySpecifier::Cookie(c)) => {
                assert_eq!(
                    (c.name.as_str(), c.path.as_str(), c.ttl),
                    ("user", "/", Some(ms(3_600_000)))
                )
            }
            other => panic!("{other:?}"),
        }
        let (ra, _) = policies(&route(), &[target("q", 1)], &clusters);
        assert!(matches!(
            ra.hash_policy[0].policy_specifier.clone(),
            Some(PolicySpecifier::QueryParameter(q)) if q.name == "user"
        ));
    }

    #[test]
    fn upstream_tls_checks_the_name_against_the_ca_file_inline_cas_or_the_system_bundle() {
        let decode = |s: core::TransportSocket| match s.config_type {
            Some(core::transport_socket::ConfigType::TypedConfig(a)) => {
                <tls::UpstreamTlsContext as prost::Message>::decode(&a.value[..]).unwrap()
            }
            None => panic!("no config"),
        };
        let mut t = UpstreamTls {
            sni: "api.example.test".into(),
            ca_file: Some("/etc/ca.pem".into()),
            ca_pem: None,
            insecure_skip_verify: false,
            client_certificate: None,
            subject_alt_names: Vec::new(),
            subject_alt_uris: Vec::new(),
        };
        let ctx = decode(upstream_tls(&t, Some(UpstreamProtocol::Http2)));
        assert_eq!(ctx.sni, "api.example.test");
        let common = ctx.common_tls_context.unwrap();
        assert_eq!(common.alpn_protocols, vec!["h2"]);
        let Some(tls::common_tls_context::ValidationContextType::ValidationContext(v)) = common.validation_context_type
        else {
            panic!("no validation context")
        };
        assert_eq!(
            v.trusted_ca.and_then(|d| d.specifier),
            Some(core::data_source::Specifier::Filename("/etc/ca.pem".into()))
        );
        assert_eq!(
            v.match_typed_subject_alt_names[0].san_type,
            tls::subject_alt_name_matcher::SanType::Dns as i32
        );

        let validation = |ctx: tls::UpstreamTlsContext| match ctx.common_tls_context.unwrap().validation_context_type {
            Some(tls::common_tls_context::ValidationContextType::ValidationContext(v)) => v,
            _ => panic!("no validation context"),
        };
        // CAs from a Secret's ca.crt: inline (certificates are public).
        t.ca_file = None;
        t.ca_pem = Some("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into());
        let v = validation(decode(upstream_tls(&t, Some(UpstreamProtocol::Http2))));
        assert_eq!(
            v.trusted_ca.and_then(|d| d.specifier),
            Some(core::data_source::Specifier::InlineString(t.ca_pem.clone().unwrap()))
        );

        // Subject alt names: one matcher each, instead of the SNI name.
        t.subject_alt_names = vec!["api.example.test".into(), "10.0.0.2".into()];
        t.subject_alt_uris = vec!["spiffe://other.mesh/ns/a/sa/b".into()];
        let v = validation(decode(upstream_tls(&t, Some(UpstreamProtocol::Http2))));
        let names: Vec<(i32, String)> = v
            .match_typed_subject_alt_names
            .iter()
            .map(|m| {
                let exact = match m.matcher.as_ref().and_then(|m| m.match_pattern.clone()) {
                    Some(matcher::string_matcher::MatchPattern::Exact(e)) => e,
                    other => panic!("{other:?}"),
                };
                (m.san_type, exact)
            })
            .collect();
        use tls::subject_alt_name_matcher::SanType;
        assert_eq!(
            names,
            vec![
                (SanType::Dns as i32, "api.example.test".to_string()),
                (SanType::IpAddress as i32, "10.0.0.2".to_string()),
                (SanType::Uri as i32, "spiffe://other.mesh/ns/a/sa/b".to_string()),
            ]
        );
        t.subject_alt_names = Vec::new();
        t.subject_alt_uris = Vec::new();

        t.ca_pem = None;
        t.sni = "10.0.0.1".into();
        let ctx = decode(upstream_tls(&t, Some(UpstreamProtocol::Http1)));
        assert_eq!(ctx.sni, "", "no IP addresses in SNI");
        let v = validation(ctx);
        assert_eq!(
            v.trusted_ca.and_then(|d| d.specifier),
            Some(core::data_source::Specifier::Filename(SYSTEM_CA_BUNDLE.into()))
        );
        assert_eq!(
            v.match_typed_subject_alt_names[0].san_type,
            tls::subject_alt_name_matcher::SanType::IpAddress as i32
        );

        t.insecure_skip_verify = true;
        let ctx = decode(upstream_tls(&t, Some(UpstreamProtocol::Http1)));
        assert!(ctx.common_tls_context.unwrap().validation_context_type.is_none());

        // Mutual TLS: the client certificate by SDS name, never inline.
        t.client_certificate = Some(ferrum_snapshot::model::CertSource::Secret {
            name: "shop/client".into(),
            digest: "0123456789abcdef".into(),
        });
        let common = decode(upstream_tls(&t, Some(UpstreamProtocol::Http1)))
            .common_tls_context
            .unwrap();
        assert!(common.tls_certificates.is_empty());
        let sds = &common.tls_certificate_sds_secret_configs;
        assert_eq!(sds.len(), 1);
        assert_eq!(sds[0].name, "shop/client");
        assert!(sds[0].sds_config.is_some(), "over ADS");
    }
}
