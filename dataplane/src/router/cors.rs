//! A route's CORS policy, compiled: origin matchers and header values built once per config,
//! so a request from an allowed origin costs a match and a few header inserts.

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};

use ferrum_snapshot::model;

use super::{Matcher, RouteError};
use crate::upstream::body::ResponseBody;

pub struct Cors {
    origins: Vec<Matcher>,
    methods: List,
    headers: List,
    expose: List,
    max_age: Option<HeaderValue>,
    credentials: bool,
    /// Preflights from origins not allowed are answered here, without CORS headers.
    answer_unmatched: bool,
}

/// A configured list: nothing, `*`, or names joined for a header.
enum List {
    Unset,
    Any,
    Names(HeaderValue),
}

impl List {
    fn build(names: &[String], what: &str, route: &str) -> Result<List, RouteError> {
        if names.is_empty() {
            return Ok(List::Unset);
        }
        if names.iter().any(|n| n == "*") {
            return Ok(List::Any);
        }
        HeaderValue::try_from(names.join(", "))
            .map(List::Names)
            .map_err(|e| RouteError::Invalid {
                route: route.to_string(),
                what: format!("cors {what}: {e}"),
            })
    }

    /// The value to answer with: the names, or for `*` the wildcard — or, for a credentialed
    /// request (where browsers take `*` literally), what the request asked for.
    fn answer(&self, credentials: bool, asked: Option<&HeaderValue>) -> Option<HeaderValue> {
        match self {
            List::Unset => None,
            List::Names(v) => Some(v.clone()),
            List::Any if credentials => asked.cloned(),
            List::Any => Some(HeaderValue::from_static("*")),
        }
    }
}

/// What a request from another origin gets.
pub enum Check {
    /// Not cross-origin, or from an origin not allowed: served as if there were no policy.
    Unmarked,
    /// A preflight from an allowed origin, answered here.
    /// Boxed: preflights are rare, and every request's check would carry a response's size.
    Preflight(Box<Response<ResponseBody>>),
    /// A request from this allowed origin: its answer is marked for it.
    Allowed(HeaderValue),
}

impl Cors {
    pub fn build(c: &model::Cors, route: &str) -> Result<Cors, RouteError> {
        let origins = c
            .allow_origins
            .iter()
            .map(Matcher::new)
            .collect::<Result<_, _>>()
            .map_err(|e| RouteError::Invalid {
                route: route.to_string(),
                what: format!("cors origin: {e}"),
            })?;
        Ok(Cors {
            origins,
            methods: List::build(&c.allow_methods, "methods", route)?,
            headers: List::build(&c.allow_headers, "headers", route)?,
            expose: List::build(&c.expose_headers, "expose headers", route)?,
            max_age: c.max_age_s.map(HeaderValue::from),
            credentials: c.allow_credentials,
            answer_unmatched: c.answer_unmatched_preflights,
        })
    }

    pub fn check<B>(&self, req: &Request<B>) -> Check {
        let Some(origin) = req.headers().get(header::ORIGIN) else {
            return Check::Unmarked;
        };
        let allowed = origin
            .to_str()
            .is_ok_and(|o| self.origins.iter().any(|m| m.is_match(o)));
        let asked = req.headers().get(header::ACCESS_CONTROL_REQUEST_METHOD);
        match asked {
            Some(method) if req.method() == Method::OPTIONS && allowed => {
                Check::Preflight(Box::new(self.preflight(origin, method, req.headers())))
            }
            // Answered, unmarked: the browser refuses the cross-origin request itself.
            Some(_) if req.method() == Method::OPTIONS && self.answer_unmatched => {
                let mut r = Response::new(ResponseBody::Local(None));
                *r.status_mut() = StatusCode::OK;
                Check::Preflight(Box::new(r))
            }
            _ if allowed => Check::Allowed(origin.clone()),
            _ => Check::Unmarked,
        }
    }

    /// The answer to a preflight from allowed `origin` asking for `method`.
    fn preflight(&self, origin: &HeaderValue, method: &HeaderValue, asked: &HeaderMap) -> Response<ResponseBody> {
        let mut r = Response::new(ResponseBody::Local(None));
        *r.status_mut() = StatusCode::OK;
        let h = r.headers_mut();
        self.allow(origin, h);
        if let Some(v) = self.methods.answer(self.credentials, Some(method)) {
            h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, v);
        }
        let asked_headers = asked.get(header::ACCESS_CONTROL_REQUEST_HEADERS);
        if let Some(v) = self.headers.answer(self.credentials, asked_headers) {
            h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v);
        }
        if let Some(v) = &self.max_age {
            h.insert(header::ACCESS_CONTROL_MAX_AGE, v.clone());
        }
        r
    }

    /// Marks the answer to a request from allowed `origin` as shareable with it.
    pub fn mark(&self, origin: HeaderValue, h: &mut HeaderMap) {
        self.allow(&origin, h);
        // `*` cannot expose anything to a credentialed request, and there is nothing to echo.
        if let Some(v) = self.expose.answer(self.credentials, None) {
            h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, v);
        }
    }

    fn allow(&self, origin: &HeaderValue, h: &mut HeaderMap) {
        // The origin itself, never `*`: right with or without credentials, and caches keyed
        // by `Vary: Origin` keep one answer per origin.
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        h.append(header::VARY, HeaderValue::from_static("Origin"));
        if self.credentials {
            h.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cors(credentials: bool, methods: &[&str]) -> Cors {
        let c = model::Cors {
            allow_origins: vec![
                model::StringMatch::Exact("https://app.example".into()),
                model::StringMatch::Regex(r"https://.*\.example\.org".into()),
            ],
            allow_methods: methods.iter().map(|m| m.to_string()).collect(),
            allow_headers: vec!["x-token".into(), "content-type".into()],
            expose_headers: vec!["*".into()],
            max_age_s: Some(600),
            allow_credentials: credentials,
            answer_unmatched_preflights: false,
        };
        Cors::build(&c, "r").unwrap()
    }

    fn req(method: Method, origin: &str, asks: Option<&str>) -> Request<()> {
        let mut b = Request::builder().method(method).uri("/x").header("origin", origin);
        if let Some(m) = asks {
            b = b.header("access-control-request-method", m);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn a_preflight_from_an_allowed_origin_is_answered_with_the_policy() {
        let c = cors(false, &["GET", "PUT"]);
        let Check::Preflight(r) = c.check(&req(Method::OPTIONS, "https://a.b.example.org", Some("PUT"))) else {
            panic!("a preflight");
        };
        let h = r.headers();
        assert_eq!(r.status(), 200);
        assert_eq!(h["access-control-allow-origin"], "https://a.b.example.org");
        assert_eq!(h["access-control-allow-methods"], "GET, PUT");
        assert_eq!(h["access-control-allow-headers"], "x-token, content-type");
        assert_eq!(h["access-control-max-age"], "600");
        assert_eq!(h["vary"], "Origin");
        assert!(h.get("access-control-allow-credentials").is_none());
    }

    #[test]
    fn other_origins_and_same_origin_requests_are_left_alone() {
        let c = cors(false, &["GET"]);
        assert!(matches!(
            c.check(&req(Method::OPTIONS, "https://evil.example", Some("GET"))),
            Check::Unmarked
        ));
        let plain = Request::builder().uri("/x").body(()).unwrap();
        assert!(matches!(c.check(&plain), Check::Unmarked));
        assert!(
            matches!(
                c.check(&req(Method::OPTIONS, "https://app.example", None)),
                Check::Allowed(_)
            ),
            "OPTIONS without Access-Control-Request-Method is no preflight"
        );
    }

    #[test]
    fn with_unmatched_preflights_ignored_another_origins_preflight_is_answered_bare() {
        let mut c = cors(false, &["GET"]);
        c.answer_unmatched = true;
        let Check::Preflight(r) = c.check(&req(Method::OPTIONS, "https://evil.example", Some("GET"))) else {
            panic!("answered here, not forwarded");
        };
        assert_eq!(r.status(), 200);
        assert!(r.headers().is_empty(), "no CORS headers: the browser refuses");
        assert!(matches!(
            c.check(&req(Method::GET, "https://evil.example", None)),
            Check::Unmarked
        ));
    }

    #[test]
    fn credentialed_answers_never_say_star() {
        let c = cors(true, &["*"]);
        let Check::Preflight(r) = c.check(&req(Method::OPTIONS, "https://app.example", Some("DELETE"))) else {
            panic!("a preflight");
        };
        assert_eq!(
            r.headers()["access-control-allow-methods"],
            "DELETE",
            "the method asked for"
        );
        assert_eq!(r.headers()["access-control-allow-credentials"], "true");
        let Check::Allowed(origin) = c.check(&req(Method::GET, "https://app.example", None)) else {
            panic!("allowed");
        };
        let mut h = HeaderMap::new();
        c.mark(origin, &mut h);
        assert_eq!(h["access-control-allow-origin"], "https://app.example");
        assert!(
            h.get("access-control-expose-headers").is_none(),
            "`*` exposes nothing with credentials"
        );

        let open = cors(false, &["*"]);
        let Check::Allowed(origin) = open.check(&req(Method::GET, "https://app.example", None)) else {
            panic!("allowed");
        };
        let mut h = HeaderMap::new();
        open.mark(origin, &mut h);
        assert_eq!(h["access-control-expose-headers"], "*");
    }
}
