//! Protocol upgrades through the proxy: HTTP/1.1 `Upgrade` (WebSocket) and HTTP/2 extended
//! CONNECT (RFC 8441). Both go upstream as an HTTP/1.1 Upgrade; once the upstream answers 101
//! the two connections are spliced by the L4 relay, independent of later config swaps.

use std::time::Duration;

use base64::Engine as _;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use super::headers;
use crate::upstream::body::ResponseBody;
use crate::upstream::{EndpointGuard, RequestGuard};

/// A client's request to switch protocols.
pub struct Upgrade {
    /// What the client asked for, e.g. `websocket`.
    pub protocol: HeaderValue,
    /// An HTTP/2 extended CONNECT (answered 200, not 101).
    h2: bool,
    downstream: OnUpgrade,
}

/// `HTTP2-Settings`, which only an h2c upgrade carries (RFC 7540 §3.2.1).
static HTTP2_SETTINGS: header::HeaderName = header::HeaderName::from_static("http2-settings");

/// Upgrades never forwarded: after the switch the client would speak HTTP (`h2c`, `HTTP/2.0`) or
/// TLS (RFC 2817) straight to the backend, its further requests seen by no route, policy or limit
/// of ours ("h2c smuggling"). Envoy strips h2c upgrades too; the request goes on as a plain one.
fn smuggles(protocol: &str) -> bool {
    let name = protocol.split('/').next().unwrap_or_default().trim();
    ["h2c", "http", "tls"].iter().any(|p| name.eq_ignore_ascii_case(p))
}

/// The comma-separated tokens of every `name` field.
fn tokens<'a>(h: &'a HeaderMap, name: &header::HeaderName) -> impl Iterator<Item = &'a str> + 'a {
    h.get_all(name)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or_default().split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Rewrites `name` without the tokens `drop` picks; removes it when none is left.
fn retain_tokens(h: &mut HeaderMap, name: &header::HeaderName, drop: impl Fn(&str) -> bool) {
    let kept: Vec<&str> = tokens(h, name).filter(|t| !drop(t)).collect();
    match HeaderValue::from_str(&kept.join(", ")) {
        Ok(v) if !kept.is_empty() => {
            h.insert(name.clone(), v);
        }
        _ => {
            h.remove(name);
        }
    }
}

/// Takes out of `h` the upgrade protocols `refused` picks, whether or not `Connection` names
/// `Upgrade` (some servers switch on `Upgrade` alone), and with the last of them `Connection`'s
/// `Upgrade` and h2c's `HTTP2-Settings`.
fn refuse(h: &mut HeaderMap, refused: impl Fn(&str) -> bool) {
    if !tokens(h, &header::UPGRADE).any(&refused) {
        return;
    }
    retain_tokens(h, &header::UPGRADE, refused);
    h.remove(&HTTP2_SETTINGS);
    let upgrading = h.contains_key(header::UPGRADE);
    retain_tokens(h, &header::CONNECTION, |t| {
        t.eq_ignore_ascii_case("http2-settings") || (!upgrading && t.eq_ignore_ascii_case("upgrade"))
    });
}

/// The upgrade `req` asks for, if any. What must not be forwarded is taken out of its head
/// first, and the request goes on as a plain one: protocols that would bypass the proxy (see
/// [`smuggles`]), and any upgrade of an HTTP/1.0 request (RFC 9110 §7.8) or of one with a body
/// (the backend would wait for a body the switch leaves unsent; RFC 6455's handshake has none).
pub fn requested<B: http_body::Body>(req: &mut Request<B>) -> Option<Upgrade> {
    let (protocol, h2) = if req.method() == Method::CONNECT {
        let p = req.extensions().get::<hyper::ext::Protocol>()?;
        if smuggles(p.as_str()) {
            return None;
        }
        (HeaderValue::from_str(p.as_str()).ok()?, true)
    } else {
        req.headers().get(header::UPGRADE)?;
        let plain = req.version() != http::Version::HTTP_11 || !req.body().is_end_stream();
        let h = req.headers_mut();
        refuse(h, |p| plain || smuggles(p));
        let named = tokens(h, &header::CONNECTION).any(|t| t.eq_ignore_ascii_case("upgrade"));
        (h.get(header::UPGRADE).filter(|_| named)?.clone(), false)
    };
    Some(Upgrade {
        protocol,
        h2,
        downstream: hyper::upgrade::on(req),
    })
}

/// An HTTP/2 extended CONNECT (RFC 8441) to a protocol [`requested`] refuses.
pub fn refused_connect<B>(req: &Request<B>) -> bool {
    req.method() == Method::CONNECT
        && req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_none_or(|p| smuggles(p.as_str()))
}

impl Upgrade {
    /// The upstream request asks for the same switch over HTTP/1.1 (after hop-by-hop headers
    /// were removed). An extended CONNECT becomes a GET with the handshake key HTTP/1.1 needs.
    pub fn upstream_head(&self, parts: &mut http::request::Parts) {
        let h = &mut parts.headers;
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, self.protocol.clone());
        if self.h2 {
            parts.method = Method::GET;
            if self.protocol.as_bytes().eq_ignore_ascii_case(b"websocket") {
                let key = base64::engine::general_purpose::STANDARD.encode(fastrand::u128(..).to_le_bytes());
                if let Ok(v) = HeaderValue::from_str(&key) {
                    h.insert(header::SEC_WEBSOCKET_KEY, v);
                }
            }
        }
    }

    /// The client's answer to the upstream's 101, and the splice of the two connections, which
    /// holds the request's circuit-breaker and endpoint slots until it ends.
    pub fn switch(
        self,
        mut upstream: Response<crate::upstream::UpstreamBody>,
        via: &'static str,
        idle: Duration,
        guards: (RequestGuard, EndpointGuard),
    ) -> Response<ResponseBody> {
        let upstream_io = hyper::upgrade::on(&mut upstream);
        let (mut parts, _) = upstream.into_parts();
        let switched = parts.headers.get(header::UPGRADE).cloned();
        headers::strip_hop_by_hop(&mut parts.headers, false);
        parts.headers.append(header::VIA, HeaderValue::from_static(via));
        if self.h2 {
            parts.status = StatusCode::OK;
            parts.headers.remove(header::SEC_WEBSOCKET_ACCEPT);
        } else {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts
                .headers
                .insert(header::UPGRADE, switched.unwrap_or_else(|| self.protocol.clone()));
        }
        self.splice(upstream_io, idle, guards);
        Response::from_parts(parts, ResponseBody::Local(None))
    }

    /// Once both sides have switched, relays between them until either closes or `idle`
    /// passes, holding `hold` (slots counted against limits) until then.
    pub fn splice(self, upstream: OnUpgrade, idle: Duration, hold: impl Send + 'static) {
        let downstream = self.downstream;
        tokio::spawn(async move {
            let _hold = hold;
            match tokio::join!(downstream, upstream) {
                (Ok(d), Ok(u)) => {
                    if let Err(e) = crate::tcp::relay(TokioIo::new(d), TokioIo::new(u), idle).await {
                        tracing::debug!(error = %e, "upgraded connection ended");
                    }
                }
                (d, u) => tracing::debug!(downstream = ?d.err(), upstream = ?u.err(), "upgrade failed"),
            }
        });
    }

    /// An HTTP/2 extended CONNECT, not an HTTP/1.1 Upgrade.
    pub fn is_h2(&self) -> bool {
        self.h2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Body = http_body_util::Full<bytes::Bytes>;

    fn request(headers: &[(&str, &str)]) -> Request<Body> {
        let mut b = Request::get("/public");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Body::default()).unwrap()
    }

    fn values<B>(req: &Request<B>, name: &str) -> Vec<String> {
        req.headers()
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn an_h2c_upgrade_becomes_a_plain_request() {
        let mut req = request(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA"),
        ]);
        assert!(requested(&mut req).is_none());
        assert!(values(&req, "upgrade").is_empty());
        assert!(values(&req, "http2-settings").is_empty());
        assert!(values(&req, "connection").is_empty());
    }

    #[test]
    fn upgrades_to_http_or_tls_are_refused_however_spelled() {
        for p in ["H2C", "HTTP/2.0", "http/1.1", "TLS/1.2", " h2c "] {
            let mut req = request(&[("connection", "upgrade, keep-alive"), ("upgrade", p)]);
            assert!(requested(&mut req).is_none(), "{p}");
            assert!(values(&req, "upgrade").is_empty(), "{p}");
            assert_eq!(values(&req, "connection"), ["keep-alive"], "{p}");
        }
        // Some servers switch on `Upgrade` alone: it goes even when `Connection` does not name it.
        let mut req = request(&[("upgrade", "h2c")]);
        assert!(requested(&mut req).is_none());
        assert!(values(&req, "upgrade").is_empty());
    }

    #[test]
    fn the_other_protocols_offered_stay() {
        let mut req = request(&[
            ("connection", "upgrade, http2-settings"),
            ("upgrade", "h2c, websocket"),
            ("upgrade", "TLS/1.0"),
            ("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA"),
        ]);
        let u = requested(&mut req).expect("the WebSocket upgrade");
        assert_eq!(u.protocol, "websocket");
        assert_eq!(values(&req, "upgrade"), ["websocket"]);
        assert_eq!(values(&req, "connection"), ["upgrade"]);
        assert!(values(&req, "http2-settings").is_empty());
    }

    #[test]
    fn a_websocket_upgrade_is_untouched() {
        let mut req = request(&[("connection", "keep-alive, Upgrade"), ("upgrade", "websocket")]);
        assert_eq!(requested(&mut req).expect("an upgrade").protocol, "websocket");
        assert_eq!(values(&req, "connection"), ["keep-alive, Upgrade"]);
        assert!(!refused_connect(&req));
    }

    #[test]
    fn extended_connect_to_http_is_refused() {
        let connect = |p: &str| {
            let mut req = Request::connect("/chat").body(Body::default()).unwrap();
            req.extensions_mut().insert(hyper::ext::Protocol::from(p));
            req
        };
        assert!(refused_connect(&connect("h2c")));
        assert!(requested(&mut connect("h2c")).is_none());
        assert!(!refused_connect(&connect("websocket")));
        assert!(requested(&mut connect("websocket")).is_some_and(|u| u.is_h2()));
        // A plain CONNECT is a tunnel, which only mesh mode opens.
        assert!(refused_connect(&Request::connect("example.com:443").body(()).unwrap()));
    }

    #[test]
    fn an_upgrade_with_a_body_or_over_http_1_0_is_a_plain_request() {
        let mut req = request(&[("connection", "upgrade"), ("upgrade", "websocket")]);
        *req.body_mut() = Body::from("hello");
        assert!(requested(&mut req).is_none());
        assert!(values(&req, "upgrade").is_empty());
        assert!(values(&req, "connection").is_empty());
        let mut req = request(&[("connection", "upgrade"), ("upgrade", "websocket")]);
        *req.version_mut() = http::Version::HTTP_10;
        assert!(requested(&mut req).is_none());
        assert!(values(&req, "upgrade").is_empty());
    }
}
