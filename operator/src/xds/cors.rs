//! A route's CORS policy as Envoy's `envoy.filters.http.cors` takes it per route: the filter
//! sits first in the HTTP connection manager of a listener that has such a route.

use envoy_types::pb::envoy::extensions::filters::http::cors::v3::{Cors, CorsPolicy};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{HttpFilter, http_filter};
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use envoy_types::pb::google::protobuf::{Any, BoolValue};
use ferrum_snapshot::model;

use super::resources::any;

pub const FILTER: &str = "envoy.filters.http.cors";

/// The CORS filter, for a listener with a route that has a policy: first, so preflights are
/// answered before authentication, as Istio places it.
pub fn filter(l: &model::Listener) -> Option<HttpFilter> {
    let routes = l.virtual_hosts.iter().flat_map(|v| &v.routes);
    routes.clone().any(|r| r.cors.is_some()).then(|| HttpFilter {
        name: FILTER.into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(any(
            "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors",
            &Cors::default(),
        ))),
        ..Default::default()
    })
}

/// The per-route config: origins as exact or regex matchers, the lists joined, `max_age` in
/// seconds; preflights from other origins go on to the backend (Envoy's default, and ours).
pub fn policy(c: &model::Cors) -> Any {
    use matcher::string_matcher::MatchPattern;
    let origin = |m: &model::StringMatch| matcher::StringMatcher {
        match_pattern: Some(match m {
            model::StringMatch::Exact(e) => MatchPattern::Exact(e.clone()),
            model::StringMatch::Regex(r) => MatchPattern::SafeRegex(matcher::RegexMatcher {
                regex: r.clone(),
                ..Default::default()
            }),
        }),
        ..Default::default()
    };
    let p = CorsPolicy {
        allow_origin_string_match: c.allow_origins.iter().map(origin).collect(),
        allow_methods: c.allow_methods.join(","),
        allow_headers: c.allow_headers.join(","),
        expose_headers: c.expose_headers.join(","),
        max_age: c.max_age_s.map(|s| s.to_string()).unwrap_or_default(),
        allow_credentials: c.allow_credentials.then_some(BoolValue { value: true }),
        forward_not_matching_preflights: c.answer_unmatched_preflights.then_some(BoolValue { value: false }),
        ..Default::default()
    };
    any(
        "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy",
        &p,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn a_policy_is_envoys_per_route_cors_policy() {
        let c = model::Cors {
            allow_origins: vec![
                model::StringMatch::Exact("https://app.example".into()),
                model::StringMatch::Regex(r"https://.*\.example\.org".into()),
            ],
            allow_methods: vec!["GET".into(), "PUT".into()],
            allow_headers: vec!["x-token".into()],
            expose_headers: vec![],
            max_age_s: Some(600),
            allow_credentials: true,
            answer_unmatched_preflights: true,
        };
        let p = CorsPolicy::decode(&policy(&c).value[..]).unwrap();
        assert_eq!(p.forward_not_matching_preflights, Some(BoolValue { value: false }));
        assert_eq!(p.allow_origin_string_match.len(), 2);
        assert_eq!((p.allow_methods.as_str(), p.max_age.as_str()), ("GET,PUT", "600"));
        assert_eq!(p.allow_credentials, Some(BoolValue { value: true }));
    }
}
