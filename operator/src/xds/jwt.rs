//! Istio RequestAuthentications that target a Gateway, as Envoy's `jwt_authn` filter: one
//! provider per JWT rule, a token that is present must be valid for one of them (401 if not),
//! a request without one passes — RequestAuthentication's meaning. Each provider's payload is
//! kept in the filter's metadata under its name, where the RBAC filters read `requestPrincipals`
//! and `request.auth.*` (see [`Providers::principal`], [`Providers::claim`]).

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::rbac::v3::principal::Identifier as Id;
use envoy_types::pb::envoy::config::rbac::v3::{MetadataSource, SourcedMetadata};
use envoy_types::pb::envoy::config::route::v3 as route;
use envoy_types::pb::envoy::extensions::filters::http::jwt_authn::v3 as jwt;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use ferrum_snapshot::mesh::{Policy, PolicyRule};

use super::resources::any;

/// Where `jwt_authn` keeps what it validated.
const FILTER: &str = "envoy.filters.http.jwt_authn";

/// The JWT providers of one listener, and the filter that validates their tokens.
#[derive(Debug, Default)]
pub struct Providers {
    /// (provider name, issuer).
    providers: Vec<(String, String)>,
    config: Option<jwt::JwtAuthentication>,
}

impl Providers {
    /// The providers of the RequestAuthentications that target one of `gateways`.
    pub fn of(policies: &[Arc<Policy>], gateways: &[String], unsupported: &mut Vec<String>) -> Providers {
        let mut out = Providers::default();
        let mut config = jwt::JwtAuthentication::default();
        let mut any = false;
        for p in policies
            .iter()
            .filter(|p| p.targets.iter().any(|t| gateways.contains(t)))
        {
            let PolicyRule::RequestAuthentication(ra) = &p.rule else {
                continue;
            };
            any = true;
            for (i, r) in ra.jwt_rules.iter().enumerate() {
                let name = format!("{}/{}[{i}]", p.namespace, p.name);
                let Some(jwks) = &r.jwks else {
                    unsupported.push(format!(
                        "RequestAuthentication rule {name}: its jwksUri {:?} has not been fetched (yet): tokens of {} are refused (401)",
                        r.jwks_uri.as_deref().unwrap_or(""),
                        r.issuer
                    ));
                    continue;
                };
                config.providers.insert(name.clone(), provider(r, jwks, &name));
                out.providers.push((name, r.issuer.clone()));
            }
        }
        if any {
            // A token that is present must be valid for some provider; none at all passes.
            let mut requirements: Vec<jwt::JwtRequirement> = out
                .providers
                .iter()
                .map(|(name, _)| requirement(jwt::jwt_requirement::RequiresType::ProviderName(name.clone())))
                .collect();
            requirements.push(requirement(jwt::jwt_requirement::RequiresType::AllowMissing(
                Default::default(),
            )));
            config.rules = vec![jwt::RequirementRule {
                r#match: Some(route::RouteMatch {
                    path_specifier: Some(route::route_match::PathSpecifier::Prefix("/".into())),
                    ..Default::default()
                }),
                requirement_type: Some(jwt::requirement_rule::RequirementType::Requires(requirement(
                    jwt::jwt_requirement::RequiresType::RequiresAny(jwt::JwtRequirementOrList { requirements }),
                ))),
            }];
            out.config = Some(config);
        }
        out
    }

    /// The filter, to go before the RBAC filters; none without a RequestAuthentication.
    pub fn filter(&self) -> Option<hcm::HttpFilter> {
        let config = self.config.as_ref()?;
        Some(hcm::HttpFilter {
            name: FILTER.into(),
            config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(
                "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
                config,
            ))),
            ..Default::default()
        })
    }

    /// A `requestPrincipals` value (`<iss>/<sub>`, Istio's string forms) as the providers whose
    /// issuer it can name, matched on the validated token's `sub` (a `sub` is taken to hold no
    /// `/`); no such provider: it matches nothing, as no token can carry it.
    pub fn principal(&self, v: &str) -> Id {
        let mut ids = Vec::new();
        for (name, iss) in &self.providers {
            let issuer_slash = format!("{iss}/");
            let sub = if v == "*" {
                Some(present())
            } else if let Some(p) = v.strip_suffix('*') {
                match p.strip_prefix(&issuer_slash) {
                    // Envoy refuses an empty prefix: any subject is a present one.
                    Some("") => Some(present()),
                    Some(rest) => Some(string(matcher::string_matcher::MatchPattern::Prefix(rest.into()))),
                    None if issuer_slash.starts_with(p) => Some(present()),
                    None => None,
                }
            } else if let Some(suffix) = v.strip_prefix('*') {
                match suffix.rsplit_once('/') {
                    Some((head, last)) if iss.ends_with(head) => {
                        Some(string(matcher::string_matcher::MatchPattern::Exact(last.into())))
                    }
                    Some(_) => None,
                    None => Some(string(matcher::string_matcher::MatchPattern::Suffix(suffix.into()))),
                }
            } else {
                v.strip_prefix(&issuer_slash)
                    .map(|rest| string(matcher::string_matcher::MatchPattern::Exact(rest.into())))
            };
            if let Some(value) = sub {
                ids.push(metadata(name, &["sub"], value));
            }
        }
        super::rbac::or_ids(ids)
    }

    /// A `request.auth.*` key's value (a claim, string or list) as the providers' payloads.
    pub fn claim(&self, key: &str, v: &str) -> Option<Id> {
        if key == "principal" {
            return Some(self.principal(v));
        }
        let path: Vec<&str> = match key {
            "audiences" => vec!["aud"],
            "presenter" => vec!["azp"],
            k => k.strip_prefix("claims[")?.strip_suffix(']')?.split("][").collect(),
        };
        let m = super::rbac::istio_string(v);
        let value = matcher::ValueMatcher {
            match_pattern: Some(matcher::value_matcher::MatchPattern::OrMatch(matcher::OrMatcher {
                value_matchers: vec![
                    string_value(m.clone()),
                    matcher::ValueMatcher {
                        match_pattern: Some(matcher::value_matcher::MatchPattern::ListMatch(Box::new(
                            matcher::ListMatcher {
                                match_pattern: Some(matcher::list_matcher::MatchPattern::OneOf(Box::new(
                                    string_value(m),
                                ))),
                            },
                        ))),
                    },
                ],
            })),
        };
        let ids = self
            .providers
            .iter()
            .map(|(name, _)| metadata(name, &path, value.clone()))
            .collect();
        Some(super::rbac::or_ids(ids))
    }
}

fn requirement(t: jwt::jwt_requirement::RequiresType) -> jwt::JwtRequirement {
    jwt::JwtRequirement { requires_type: Some(t) }
}

fn present() -> matcher::ValueMatcher {
    matcher::ValueMatcher {
        match_pattern: Some(matcher::value_matcher::MatchPattern::PresentMatch(true)),
    }
}

fn string(p: matcher::string_matcher::MatchPattern) -> matcher::ValueMatcher {
    string_value(matcher::StringMatcher {
        match_pattern: Some(p),
        ..Default::default()
    })
}

fn string_value(m: matcher::StringMatcher) -> matcher::ValueMatcher {
    matcher::ValueMatcher {
        match_pattern: Some(matcher::value_matcher::MatchPattern::StringMatch(m)),
    }
}

/// `path` in the payload `jwt_authn` kept under `provider`.
fn metadata(provider: &str, path: &[&str], value: matcher::ValueMatcher) -> Id {
    use matcher::metadata_matcher::{PathSegment, path_segment::Segment};
    let path = std::iter::once(provider)
        .chain(path.iter().copied())
        .map(|k| PathSegment {
            segment: Some(Segment::Key(k.to_string())),
        })
        .collect();
    Id::SourcedMetadata(SourcedMetadata {
        metadata_matcher: Some(matcher::MetadataMatcher {
            filter: FILTER.into(),
            path,
            value: Some(value),
            invert: false,
        }),
        metadata_source: MetadataSource::Dynamic as i32,
    })
}

fn provider(r: &ferrum_snapshot::istio::JwtRule, jwks: &str, name: &str) -> jwt::JwtProvider {
    jwt::JwtProvider {
        issuer: r.issuer.clone(),
        audiences: r.audiences.clone(),
        forward: r.forward_original_token,
        from_headers: r
            .from_headers
            .iter()
            .map(|h| jwt::JwtHeader {
                name: h.name.clone(),
                value_prefix: h.prefix.clone().unwrap_or_default(),
            })
            .collect(),
        from_params: r.from_params.clone(),
        from_cookies: r.from_cookies.clone(),
        forward_payload_header: r.output_payload_to_header.clone().unwrap_or_default(),
        claim_to_headers: r
            .output_claim_to_headers
            .iter()
            .map(|c| jwt::JwtClaimToHeader {
                header_name: c.header.clone(),
                claim_name: c.claim.clone(),
                ..Default::default()
            })
            .collect(),
        payload_in_metadata: name.to_string(),
        jwks_source_specifier: Some(jwt::jwt_provider::JwksSourceSpecifier::LocalJwks(core::DataSource {
            specifier: Some(core::data_source::Specifier::InlineString(jwks.to_string())),
            ..Default::default()
        })),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrum_snapshot::istio::JwtRule;
    use ferrum_snapshot::mesh::RequestAuthn;

    fn providers(jwks: Option<&str>) -> (Providers, Vec<String>) {
        let p = Arc::new(Policy {
            key: "RequestAuthentication/default/jwt".into(),
            namespace: "default".into(),
            name: "jwt".into(),
            selector: None,
            targets: vec!["default/web".into()],
            rule: PolicyRule::RequestAuthentication(RequestAuthn {
                jwt_rules: vec![JwtRule {
                    issuer: "https://issuer.example".into(),
                    jwks: jwks.map(str::to_string),
                    jwks_uri: Some("https://issuer.example/jwks".into()),
                    ..Default::default()
                }],
            }),
        });
        let mut why = Vec::new();
        (Providers::of(&[p], &["default/web".into()], &mut why), why)
    }

    /// The `sub` matcher a principal pattern becomes, or `None` when it names no provider.
    fn sub_of(id: Id) -> Option<matcher::value_matcher::MatchPattern> {
        match id {
            Id::SourcedMetadata(m) => {
                let m = m.metadata_matcher.unwrap();
                assert_eq!(m.filter, FILTER);
                m.value.unwrap().match_pattern
            }
            Id::NotId(_) => None,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn principals_are_the_subjects_of_their_issuers_tokens() {
        use matcher::string_matcher::MatchPattern as S;
        use matcher::value_matcher::MatchPattern as V;
        let (p, why) = providers(Some("{\"keys\": []}"));
        assert!(why.is_empty(), "{why:?}");
        let exact = |s: &str| {
            Some(V::StringMatch(matcher::StringMatcher {
                match_pattern: Some(S::Exact(s.into())),
                ..Default::default()
            }))
        };
        assert_eq!(sub_of(p.principal("https://issuer.example/alice")), exact("alice"));
        assert_eq!(sub_of(p.principal("*")), Some(V::PresentMatch(true)));
        assert_eq!(
            sub_of(p.principal("https://issuer.example/*")),
            Some(V::PresentMatch(true))
        );
        assert_eq!(sub_of(p.principal("*.example/alice")), exact("alice"));
        assert_eq!(
            sub_of(p.principal("https://other.example/alice")),
            None,
            "another issuer's"
        );
        assert!(p.filter().is_some());
    }

    /// Without keys Envoy can use, the issuer's tokens are refused, and that is reported.
    #[test]
    fn a_jwks_uri_alone_refuses_its_tokens() {
        let (p, why) = providers(None);
        assert!(why[0].contains("jwksUri") && why[0].contains("401"), "{why:?}");
        assert_eq!(sub_of(p.principal("*")), None, "no provider, no principal");
        assert!(p.filter().is_some(), "tokens are still checked (and refused)");
    }
}
