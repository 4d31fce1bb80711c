//! Consistent-hash keys read from a cookie or a query parameter, and the cookie made for a
//! client that has none, as Envoy makes it: from the client's address, set on the response so
//! that the client's next requests hash where this one did.

use std::net::SocketAddr;

use ferrum_snapshot::model::{HashCookie, HashInput};
use http::HeaderValue;
use http::header::COOKIE;

use crate::upstream::balance::{self, HashKey};

/// The key `input` names in the request, and the `Set-Cookie` value its response carries when
/// a cookie with a lifetime was missing.
pub fn input_key(
    input: &HashInput,
    parts: &http::request::Parts,
    client: SocketAddr,
) -> (Option<HashKey>, Option<HeaderValue>) {
    if let Some(c) = &input.cookie {
        if let Some(v) = cookie(&parts.headers, &c.name) {
            return (HeaderValue::from_bytes(v).ok().map(HashKey::Header), None);
        }
        let Some(ttl_ms) = c.ttl_ms else { return (None, None) };
        let value = format!("{:016x}", balance::hash(client.to_string().as_bytes()));
        let set = set_cookie(c, &value, ttl_ms);
        return (HeaderValue::from_str(&value).ok().map(HashKey::Header), set);
    }
    let key = input
        .query_parameter
        .as_deref()
        .and_then(|name| query_param(parts.uri.query()?, name))
        .and_then(|v| HeaderValue::from_bytes(v).ok())
        .map(HashKey::Header);
    (key, None)
}

/// The value of cookie `name` among the request's `Cookie` headers (HTTP/2 may send several).
fn cookie<'h>(headers: &'h http::HeaderMap, name: &str) -> Option<&'h [u8]> {
    headers.get_all(COOKIE).iter().find_map(|h| {
        h.as_bytes().split(|b| *b == b';').find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|b| *b == b'=')?;
            let v = pair[eq + 1..].trim_ascii();
            // A quoted value hashes as its content.
            let v = v.strip_prefix(b"\"").and_then(|v| v.strip_suffix(b"\"")).unwrap_or(v);
            (&pair[..eq] == name.as_bytes()).then_some(v)
        })
    })
}

/// The (undecoded) value of query parameter `name`: the first one given.
fn query_param<'q>(query: &'q str, name: &str) -> Option<&'q [u8]> {
    query.split('&').find_map(|kv| match kv.split_once('=') {
        Some((k, v)) if k == name => Some(v.as_bytes()),
        None if kv == name => Some(&b""[..]),
        _ => None,
    })
}

/// `name="value"; Max-Age=…; Path=…; HttpOnly`, as Envoy writes it (no `Max-Age` for a
/// lifetime of 0: a session cookie).
fn set_cookie(c: &HashCookie, value: &str, ttl_ms: u64) -> Option<HeaderValue> {
    let mut s = format!("{}=\"{value}\"", c.name);
    if ttl_ms > 0 {
        s.push_str(&format!("; Max-Age={}", ttl_ms.div_ceil(1000)));
    }
    if let Some(p) = &c.path {
        s.push_str(&format!("; Path={p}"));
    }
    s.push_str("; HttpOnly");
    HeaderValue::from_str(&s).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, cookies: &[&str]) -> http::request::Parts {
        let mut r = http::Request::builder().uri(uri);
        for c in cookies {
            r = r.header(COOKIE, *c);
        }
        r.body(()).unwrap().into_parts().0
    }

    fn key(k: Option<HashKey>) -> Option<String> {
        k.map(|k| String::from_utf8(k.as_bytes().to_vec()).unwrap())
    }

    #[test]
    fn a_cookie_is_found_among_all_of_them() {
        let input = HashInput {
            cookie: Some(HashCookie {
                name: "session".into(),
                path: Some("/".into()),
                ttl_ms: Some(3_600_000),
            }),
            ..Default::default()
        };
        let client: SocketAddr = "10.0.0.7:40000".parse().unwrap();
        let (k, set) = input_key(&input, &parts("/", &["a=1", "theme=dark; session=\"abc\""]), client);
        assert_eq!((key(k).as_deref(), set), (Some("abc"), None));
        // Absent: a value from the client's address, set for an hour.
        let (k, set) = input_key(&input, &parts("/", &["sessionx=1"]), client);
        let k = key(k).unwrap();
        assert_eq!(k.len(), 16);
        assert_eq!(
            set.unwrap().to_str().unwrap(),
            format!("session=\"{k}\"; Max-Age=3600; Path=/; HttpOnly")
        );
        // The next request carries it and hashes the same.
        let (again, set) = input_key(&input, &parts("/", &[&format!("session=\"{k}\"")]), client);
        assert_eq!((key(again), set), (Some(k), None));
        // Without a lifetime nothing is made.
        let session = HashInput {
            cookie: Some(HashCookie {
                name: "session".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let (k, set) = input_key(&session, &parts("/", &[]), client);
        assert!(k.is_none() && set.is_none());
    }

    #[test]
    fn a_query_parameter_is_read_undecoded() {
        let input = HashInput {
            query_parameter: Some("user".into()),
            ..Default::default()
        };
        let client: SocketAddr = "10.0.0.7:40000".parse().unwrap();
        let k = |uri: &str| key(input_key(&input, &parts(uri, &[]), client).0);
        assert_eq!(k("/a?x=1&user=al%20ice&user=bob").as_deref(), Some("al%20ice"));
        assert_eq!(k("/a?users=1"), None);
        assert_eq!(k("/a"), None);
    }
}
