//! Protocol upgrades through the proxy: HTTP/1.1 `Upgrade` (WebSocket) and HTTP/2 extended
//! CONNECT (RFC 8441). Both go upstream as an HTTP/1.1 Upgrade; once the upstream answers 101
//! the two connections are spliced by the L4 relay, independent of later config swaps.

use std::time::Duration;

use base64::Engine as _;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
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

/// The upgrade `req` asks for, if any.
pub fn requested<B>(req: &mut Request<B>) -> Option<Upgrade> {
    let (protocol, h2) = if req.method() == Method::CONNECT {
        let p = req.extensions().get::<hyper::ext::Protocol>()?;
        (HeaderValue::from_str(p.as_str()).ok()?, true)
    } else {
        let h = req.headers();
        let named = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
        (h.get(header::UPGRADE).filter(|_| named)?.clone(), false)
    };
    Some(Upgrade {
        protocol,
        h2,
        downstream: hyper::upgrade::on(req),
    })
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
        mut upstream: Response<Incoming>,
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
