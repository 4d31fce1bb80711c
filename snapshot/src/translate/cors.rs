//! Routes' CORS policies — the Gateway API `CORS` filter and Istio's `corsPolicy` — read into
//! the snapshot's [`Cors`], checked so a proxy can put every value in a header.

use gateway_api::httproutes::HttpRouteRulesFiltersCors;

use crate::istio::{VsCorsPolicy, VsStringMatch};
use crate::model::{Cors, StringMatch};

/// A field and why the policy cannot be applied.
pub(crate) type CorsError = (String, String);

/// The Gateway API's default `Access-Control-Max-Age`, in seconds.
const GATEWAY_API_MAX_AGE: u32 = 5;

/// A Gateway API `CORS` filter (at field path `at`).
pub(crate) fn of_filter(c: &HttpRouteRulesFiltersCors, at: &str) -> Result<Cors, CorsError> {
    let mut origins = Vec::new();
    for (i, o) in c.allow_origins.iter().flatten().enumerate() {
        origins.push(origin(o).map_err(|why| (format!("{at}.allowOrigins[{i}]"), why))?);
    }
    let max_age = match c.max_age {
        None => GATEWAY_API_MAX_AGE,
        Some(s) => u32::try_from(s).map_err(|_| (format!("{at}.maxAge"), "seconds, 0 or more".to_string()))?,
    };
    let cors = Cors {
        allow_origins: origins,
        allow_methods: c.allow_methods.clone().unwrap_or_default(),
        allow_headers: c.allow_headers.clone().unwrap_or_default(),
        expose_headers: c.expose_headers.clone().unwrap_or_default(),
        max_age_s: Some(max_age),
        allow_credentials: c.allow_credentials.unwrap_or(false),
        answer_unmatched_preflights: false,
    };
    check(&cors, at)?;
    Ok(cors)
}

/// An Istio `corsPolicy` (at field path `at`); `maxAge` is a duration.
pub(crate) fn of_policy(p: &VsCorsPolicy, at: &str) -> Result<Cors, CorsError> {
    if let Some(k) = p.other.keys().next() {
        return Err((format!("{at}.{k}"), "not supported".into()));
    }
    let answer_unmatched_preflights = match p.unmatched_preflights.as_deref() {
        None | Some("FORWARD" | "UNSPECIFIED") => false,
        Some("IGNORE") => true,
        Some(other) => {
            return Err((
                format!("{at}.unmatchedPreflights"),
                format!("{other:?}: FORWARD (the default) or IGNORE"),
            ));
        }
    };
    let mut origins = Vec::new();
    for (i, m) in p.allow_origins.iter().enumerate() {
        origins.push(istio_origin(m).map_err(|why| (format!("{at}.allowOrigins[{i}]"), why))?);
    }
    let max_age = p
        .max_age
        .as_deref()
        .map(|d| super::parse_duration_ms(d).map(|ms| u32::try_from(ms / 1000).unwrap_or(u32::MAX)))
        .transpose()
        .map_err(|e| (format!("{at}.maxAge"), e))?;
    let cors = Cors {
        allow_origins: origins,
        allow_methods: p.allow_methods.clone(),
        allow_headers: p.allow_headers.clone(),
        expose_headers: p.expose_headers.clone(),
        max_age_s: max_age,
        allow_credentials: p.allow_credentials.unwrap_or(false),
        answer_unmatched_preflights,
    };
    check(&cors, at)?;
    Ok(cors)
}

/// A Gateway API origin: `*` for every origin, else `scheme://host[:port]` where a `*` in the
/// host stands for any labels to its left.
fn origin(o: &str) -> Result<StringMatch, String> {
    if o == "*" {
        return Ok(StringMatch::Regex(".*".into()));
    }
    let rest = o
        .strip_prefix("http://")
        .or_else(|| o.strip_prefix("https://"))
        .ok_or_else(|| format!("{o:?} is not http(s)://host[:port] or *"))?;
    if rest.is_empty() || rest.contains('/') || rest.bytes().any(|b| b.is_ascii_whitespace()) {
        return Err(format!("{o:?} is not http(s)://host[:port] or *"));
    }
    if !o.contains('*') {
        return Ok(StringMatch::Exact(o.to_ascii_lowercase()));
    }
    let parts: Vec<String> = o.to_ascii_lowercase().split('*').map(regex::escape).collect();
    Ok(StringMatch::Regex(parts.join(".*")))
}

fn istio_origin(m: &VsStringMatch) -> Result<StringMatch, String> {
    if let Some(k) = m.other.keys().next() {
        return Err(format!("{k}: not supported"));
    }
    match (&m.exact, &m.prefix, &m.regex) {
        (Some(e), None, None) => Ok(StringMatch::Exact(e.clone())),
        (None, Some(p), None) => Ok(StringMatch::Regex(format!("{}.*", regex::escape(p)))),
        (None, None, Some(r)) => regex::Regex::new(r)
            .map(|_| StringMatch::Regex(r.clone()))
            .map_err(|e| format!("{r:?}: {e}")),
        _ => Err("one of exact, prefix or regex".into()),
    }
}

fn check(c: &Cors, at: &str) -> Result<(), CorsError> {
    match crate::validate::cors_problem(c) {
        Some((field, why)) => Err((format!("{at}.{field}"), why)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_api_origins_are_exact_or_wildcards_over_labels_to_the_left() {
        assert_eq!(
            origin("https://App.example.com").unwrap(),
            StringMatch::Exact("https://app.example.com".into())
        );
        let wild = match origin("https://*.example.com").unwrap() {
            StringMatch::Regex(r) => regex::Regex::new(&format!("^(?:{r})$")).unwrap(),
            other => panic!("{other:?}"),
        };
        assert!(wild.is_match("https://a.b.example.com"));
        assert!(!wild.is_match("https://example.org"));
        assert!(!wild.is_match("http://a.example.com"), "the scheme is part of it");
        assert_eq!(origin("*").unwrap(), StringMatch::Regex(".*".into()));
        assert!(origin("example.com").is_err());
        assert!(origin("https://example.com/path").is_err());
    }

    #[test]
    fn unmatched_preflights_are_forwarded_unless_ignored() {
        let policy = |unmatched: Option<&str>| {
            let p = VsCorsPolicy {
                unmatched_preflights: unmatched.map(String::from),
                ..Default::default()
            };
            of_policy(&p, "c").map(|c| c.answer_unmatched_preflights)
        };
        assert_eq!(policy(None), Ok(false));
        assert_eq!(policy(Some("FORWARD")), Ok(false));
        assert_eq!(policy(Some("IGNORE")), Ok(true));
        assert_eq!(policy(Some("DROP")).unwrap_err().0, "c.unmatchedPreflights");
    }
}
