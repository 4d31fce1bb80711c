//! Header handling at the proxy boundary: hop-by-hop removal and the forwarding headers.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TE,
    // Connection-specific (RFC 9113 §8.2.2), even when `Connection` does not name it.
    HeaderName::from_static("http2-settings"),
];

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_FERRUM_ERROR: HeaderName = HeaderName::from_static("x-ferrum-error");

/// `Connection` tokens whose header is removed anyway, or that name none.
const GONE_ANYWAY: [&str; 9] = [
    "",
    "http2-settings",
    "close",
    "keep-alive",
    "upgrade",
    "te",
    "transfer-encoding",
    "proxy-connection",
    "connection",
];

/// Removes hop-by-hop headers, including any that `Connection` names. `TE: trailers` survives
/// on requests because gRPC needs it end to end.
pub fn strip_hop_by_hop(h: &mut HeaderMap, keep_te_trailers: bool) {
    // One pass over the names, no hashing, noting which are present: most requests carry none,
    // most responses only `Connection: keep-alive`; only those present are then removed.
    let mut present = 0u8;
    for name in h.keys() {
        present |= hop_bit(name);
    }
    if present == 0 {
        return;
    }
    if let Some(conn) = h.get(header::CONNECTION).filter(|v| !names_nothing_else(v.as_bytes())) {
        // Tokens naming hop-by-hop headers (or none: `close`) go anyway; only others, rare,
        // become names to remove.
        let named: Vec<HeaderName> = conn
            .to_str()
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|t| !GONE_ANYWAY.iter().any(|k| t.eq_ignore_ascii_case(k)))
            .filter_map(|t| HeaderName::try_from(t).ok())
            .collect();
        for n in named {
            h.remove(n);
        }
    }
    let te_trailers = keep_te_trailers
        && h.get(header::TE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers")));
    for (i, n) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            h.remove(n);
        }
    }
    if te_trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// `1 << i` if `name` is `HOP_BY_HOP[i]`, else 0: a match on the name (its length first), where
/// comparing it with each of the seven cost more than the rest of the stripping.
fn hop_bit(name: &HeaderName) -> u8 {
    match name.as_str() {
        "connection" => 1,
        "keep-alive" => 1 << 1,
        "proxy-connection" => 1 << 2,
        "transfer-encoding" => 1 << 3,
        "upgrade" => 1 << 4,
        "te" => 1 << 5,
        "http2-settings" => 1 << 6,
        _ => 0,
    }
}

/// The `Connection` values nearly every message carries, which name no other header.
fn names_nothing_else(v: &[u8]) -> bool {
    v.eq_ignore_ascii_case(b"keep-alive") || v.eq_ignore_ascii_case(b"close")
}

/// A response head as it goes to the client: hop-by-hop headers out, and `Content-Length`
/// dropped beside `Transfer-Encoding` — RFC 9112 §6.3: it is meaningless then, and a client that
/// framed the re-chunked body by it would get it truncated.
pub fn downstream_response(h: &mut HeaderMap) {
    if h.contains_key(header::TRANSFER_ENCODING) {
        h.remove(header::CONTENT_LENGTH);
    }
    strip_hop_by_hop(h, false);
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

/// The bytes a host's reg-name may hold (RFC 3986 §3.2.2: unreserved, sub-delims, escapes),
/// looked up rather than searched for.
static REG_NAME: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 256 {
        t[c] = (c as u8).is_ascii_alphanumeric();
        c += 1;
    }
    let extra = b"-._~!$&'()*+,;=%";
    let mut i = 0;
    while i < extra.len() {
        t[extra[i] as usize] = true;
        i += 1;
    }
    t
};

/// Whether `host` is an RFC 3986 `host [":" port]`, as `Host` and an authority must be (RFC 9112
/// §3.2: anything else is a 400). Refuses userinfo (`user@host`, RFC 9110 §4.2.4: it obscures
/// the authority) and the characters that would turn the host into part of a path or query
/// where an application builds URLs from it (`/`, `?`, `#`, spaces). Empty is valid.
pub fn valid_host(host: &[u8]) -> bool {
    let (name, port) = match host.strip_prefix(b"[") {
        Some(literal) => {
            let Some(end) = literal.iter().position(|&b| b == b']') else {
                return false;
            };
            // IPv6, IPvFuture or a zone (RFC 6874): unreserved characters, `:` and escapes.
            if !literal[..end]
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || b":.%-_~".contains(&b))
            {
                return false;
            }
            (&[][..], &literal[end + 1..])
        }
        None => match host.iter().position(|&b| b == b':') {
            Some(i) => (&host[..i], &host[i..]),
            None => (host, &[][..]),
        },
    };
    let reg_name = |b: &u8| REG_NAME[*b as usize];
    let port_ok = match port {
        [] => true,
        [b':', digits @ ..] => digits.iter().all(u8::is_ascii_digit),
        _ => false,
    };
    port_ok && name.iter().all(reg_name)
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

/// `ip` as text in `buf`. IPv4, nearly every request's, without the formatting machinery
/// (a tenth of its cost).
fn fmt_ip(ip: IpAddr, buf: &mut [u8; 48]) -> &str {
    let n = match ip {
        IpAddr::V4(v4) => {
            let mut n = 0;
            for (i, o) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buf[n] = b'.';
                    n += 1;
                }
                let digits = [o / 100, o / 10 % 10, o % 10];
                let skip = if o >= 100 {
                    0
                } else if o >= 10 {
                    1
                } else {
                    2
                };
                for d in &digits[skip..] {
                    buf[n] = b'0' + d;
                    n += 1;
                }
            }
            n
        }
        IpAddr::V6(_) => {
            use std::io::Write;
            let mut cur = std::io::Cursor::new(&mut buf[..]);
            let _ = write!(cur, "{ip}");
            cur.position() as usize
        }
    };
    std::str::from_utf8(&buf[..n]).unwrap_or("")
}

#[cfg(test)]
mod tests {
    #[test]
    fn hosts_are_checked_as_rfc_3986_says() {
        for ok in [
            "",
            "a",
            "a.example.com",
            "a.",
            "a:8080",
            "a:",
            "127.0.0.1:80",
            "[::1]",
            "[::1]:443",
            "[fe80::1%25eth0]",
            "xn--bcher-kva.example",
        ] {
            assert!(valid_host(ok.as_bytes()), "{ok:?}");
        }
        for bad in [
            "a b",
            "a/b",
            "a?b",
            "a#b",
            "user@a",
            "user:pw@a",
            "[::1",
            "[::1]x",
            "a:80:80",
            "a:8o",
            "a\\b",
            "[::1/]",
            "a\"b",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad:?}");
        }
    }

    use super::*;

    #[test]
    fn each_hop_by_hop_name_has_its_own_bit() {
        for (i, n) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_bit(n), 1 << i, "{n}");
        }
        assert_eq!(hop_bit(&header::CONTENT_TYPE), 0);
        assert_eq!(hop_bit(&HeaderName::from_static("x-connection")), 0);
    }

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
    fn addresses_are_written_as_std_writes_them() {
        let mut buf = [0u8; 48];
        for ip in [
            "0.0.0.0",
            "10.0.0.1",
            "127.0.0.1",
            "192.168.100.9",
            "255.255.255.255",
            "::1",
            "fe80::1:2",
        ] {
            let addr: IpAddr = ip.parse().unwrap();
            assert_eq!(fmt_ip(addr, &mut buf), addr.to_string());
        }
    }

    #[test]
    fn a_connection_token_naming_a_hop_header_or_close_removes_only_hop_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "Keep-Alive, close".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-app", "1".parse().unwrap());
        strip_hop_by_hop(&mut h, false);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-app"]);
        // The usual single token.
        for only in ["Keep-Alive", "close"] {
            let mut h = HeaderMap::new();
            h.insert(header::CONNECTION, only.parse().unwrap());
            h.insert("keep-alive", "timeout=5".parse().unwrap());
            h.insert("x-app", "1".parse().unwrap());
            strip_hop_by_hop(&mut h, false);
            assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-app"], "{only}");
        }
        // Nothing hop-by-hop: untouched.
        let mut plain = HeaderMap::new();
        plain.insert("x-app", "1".parse().unwrap());
        plain.insert(header::TE, "trailers".parse().unwrap());
        strip_hop_by_hop(&mut plain, true);
        assert_eq!(plain.len(), 2);
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
