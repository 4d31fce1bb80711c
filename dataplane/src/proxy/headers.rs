//! Header handling at the proxy boundary: hop-by-hop removal and the forwarding headers.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

static HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TE,
];

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_FERRUM_ERROR: HeaderName = HeaderName::from_static("x-ferrum-error");

/// Removes hop-by-hop headers, including any that `Connection` names. `TE: trailers` survives
/// on requests because gRPC needs it end to end.
pub fn strip_hop_by_hop(h: &mut HeaderMap, keep_te_trailers: bool) {
    if let Some(conn) = h.get(header::CONNECTION) {
        let named: Vec<HeaderName> = conn
            .to_str()
            .unwrap_or("")
            .split(',')
            .filter_map(|t| HeaderName::try_from(t.trim()).ok())
            .collect();
        for n in named {
            h.remove(n);
        }
    }
    let te_trailers = keep_te_trailers
        && h.get(header::TE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers")));
    for n in &HOP_BY_HOP {
        // Each remove is a hash lookup; most requests carry none of these.
        if h.contains_key(n) {
            h.remove(n);
        }
    }
    if te_trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Adds `X-Forwarded-For` (appended), `X-Forwarded-Proto`, `X-Forwarded-Host` and `Via`.
pub fn add_forwarded(h: &mut HeaderMap, client: IpAddr, https: bool, host: Option<&HeaderValue>, via: &'static str) {
    let mut ip = [0u8; 48];
    let ip = fmt_ip(client, &mut ip);
    let xff = match h.get(&X_FORWARDED_FOR) {
        Some(prev) => {
            let mut v = Vec::with_capacity(prev.len() + 2 + ip.len());
            v.extend_from_slice(prev.as_bytes());
            v.extend_from_slice(b", ");
            v.extend_from_slice(ip.as_bytes());
            HeaderValue::from_bytes(&v)
        }
        None => HeaderValue::from_str(ip),
    };
    if let Ok(v) = xff {
        h.insert(X_FORWARDED_FOR.clone(), v);
    }
    h.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(if https { "https" } else { "http" }),
    );
    if let Some(host) = host {
        h.insert(X_FORWARDED_HOST.clone(), host.clone());
    }
    h.append(header::VIA, HeaderValue::from_static(via));
}

/// Joins HTTP/2 cookie crumbs (RFC 9113 §8.2.3) into the one `cookie` header HTTP/1.1 allows.
pub fn join_cookies(h: &mut HeaderMap) {
    let mut all = h.get_all(header::COOKIE).iter();
    let (Some(_), Some(_)) = (all.next(), all.next()) else {
        return;
    };
    let joined: Vec<u8> = h
        .get_all(header::COOKIE)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect::<Vec<_>>()
        .join(&b"; "[..]);
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        h.insert(header::COOKIE, v);
    }
}

fn fmt_ip(ip: IpAddr, buf: &mut [u8; 48]) -> &str {
    use std::io::Write;
    let mut cur = std::io::Cursor::new(&mut buf[..]);
    let _ = write!(cur, "{ip}");
    let n = cur.position() as usize;
    std::str::from_utf8(&buf[..n]).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_connection_listed_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::TE, "trailers, deflate".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        h.insert("x-keep", "1".parse().unwrap());
        strip_hop_by_hop(&mut h, true);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-keep", "te"]);
        assert_eq!(h[header::TE], "trailers");
    }

    #[test]
    fn cookie_crumbs_are_joined() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, "a=1".parse().unwrap());
        h.append(header::COOKIE, "b=2".parse().unwrap());
        h.append(header::COOKIE, "c=3".parse().unwrap());
        join_cookies(&mut h);
        assert_eq!(h.get_all(header::COOKIE).iter().count(), 1);
        assert_eq!(h[header::COOKIE], "a=1; b=2; c=3");
        let mut one = HeaderMap::new();
        one.insert(header::COOKIE, "a=1; b=2".parse().unwrap());
        join_cookies(&mut one);
        assert_eq!(one[header::COOKIE], "a=1; b=2");
    }

    #[test]
    fn forwarded_headers_append_client_ip() {
        let mut h = HeaderMap::new();
        h.insert(&X_FORWARDED_FOR, "203.0.113.7".parse().unwrap());
        add_forwarded(
            &mut h,
            "::1".parse().unwrap(),
            true,
            Some(&"a.example.com".parse().unwrap()),
            "1.1 ferrum",
        );
        assert_eq!(h[&X_FORWARDED_FOR], "203.0.113.7, ::1");
        assert_eq!(h[&X_FORWARDED_PROTO], "https");
        assert_eq!(h[&X_FORWARDED_HOST], "a.example.com");
        assert_eq!(h[header::VIA], "1.1 ferrum");
    }
}
