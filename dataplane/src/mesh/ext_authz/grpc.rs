//! The gRPC provider (Istio `envoyExtAuthzGrpc`, as OPA-Envoy serves it):
//! `envoy.service.auth.v3.Authorization/Check` by tonic, carried over the provider's cluster —
//! its balancer, pools and HBONE tunnels — rather than a channel of its own.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request as Attempt};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, CheckResponse};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use http_body_util::BodyExt;

use super::{Answer, Denial, Edits, Requester};
use crate::upstream::ClusterRuntime;
use crate::upstream::body::{BoxError, ReadAhead, RequestBody};

/// The body a check carries, and whether as bytes (`raw_body`) rather than text (`body`).
pub(super) type CheckBody<'a> = (&'a ReadAhead, bool);

/// Asks `cluster`'s service about `req`.
pub(super) async fn check(
    cluster: &Arc<ClusterRuntime>,
    req: &http::request::Parts,
    body: Option<CheckBody<'_>>,
    who: &Requester,
) -> Result<Answer, String> {
    let mut client = AuthorizationClient::new(ClusterChannel(cluster.clone()));
    let started = std::time::Instant::now();
    let resp = client.check(check_request(req, body, who)).await;
    cluster.stats.latency.observe(started.elapsed());
    match resp {
        Ok(r) => answer(r.into_inner()),
        Err(s) => Err(format!("gRPC {:?}: {}", s.code(), s.message())),
    }
}

fn peer(addr: std::net::SocketAddr, principal: Option<&str>) -> Peer {
    Peer {
        address: Some(core::Address {
            address: Some(core::address::Address::SocketAddress(core::SocketAddress {
                address: addr.ip().to_string(),
                port_specifier: Some(core::socket_address::PortSpecifier::PortValue(u32::from(addr.port()))),
                ..Default::default()
            })),
        }),
        principal: principal.unwrap_or_default().to_string(),
        ..Default::default()
    }
}

/// What Envoy tells a provider of a request: the peers, the request's head (headers
/// lowercased; several values of one joined with `,`) and the body read for it, if any.
fn check_request(req: &http::request::Parts, body: Option<CheckBody<'_>>, who: &Requester) -> CheckRequest {
    let mut headers = std::collections::HashMap::new();
    for (n, v) in req.headers.iter() {
        let v = String::from_utf8_lossy(v.as_bytes());
        headers
            .entry(n.as_str().to_string())
            .and_modify(|all: &mut String| {
                all.push(',');
                all.push_str(&v);
            })
            .or_insert_with(|| v.into_owned());
    }
    let host = req
        .uri
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| req.headers.get(http::header::HOST)?.to_str().ok().map(str::to_string))
        .unwrap_or_default();
    headers.insert(":authority".into(), host.clone());
    headers.insert(":method".into(), req.method.to_string());
    let path = req.uri.path_and_query().map_or("/", |pq| pq.as_str()).to_string();
    headers.insert(":path".into(), path.clone());
    if let Some((read, _)) = body {
        headers.insert(super::PARTIAL_BODY.as_str().into(), read.partial.to_string());
    }
    let size = req
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(-1);
    let mut http = HttpRequest {
        method: req.method.to_string(),
        headers,
        path,
        host,
        scheme: req.uri.scheme_str().unwrap_or("http").to_string(),
        protocol: format!("{:?}", req.version),
        size,
        ..Default::default()
    };
    match body {
        Some((read, true)) => http.raw_body = read.bytes.to_vec(),
        Some((read, false)) => http.body = String::from_utf8_lossy(&read.bytes).into_owned(),
        None => {}
    }
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(peer(who.client, who.principal.as_deref())),
            destination: Some(peer(who.destination, None)),
            request: Some(Attempt {
                time: None,
                http: Some(http),
            }),
            ..Default::default()
        }),
    }
}

/// A CheckResponse as Envoy reads it: an OK status lets the request on with the OK response's
/// header edits; any other is refused with the denied response (403 when it sets no status).
fn answer(resp: CheckResponse) -> Result<Answer, String> {
    let allowed = resp.status.as_ref().is_none_or(|s| s.code == 0);
    match resp.http_response {
        Some(HttpResponse::OkResponse(ok)) if allowed => {
            let mut edits = Edits::default();
            for o in &ok.headers {
                let Some((n, v)) = header(o.header.as_ref()) else {
                    continue;
                };
                #[allow(deprecated)] // Envoy still reads `append` before `append_action`.
                let append = o.append.as_ref().map(|b| b.value);
                match (append, o.append_action()) {
                    (Some(true), _) => edits.append.push((n, v)),
                    (None, HeaderAppendAction::AddIfAbsent) => edits.add_if_absent.push((n, v)),
                    _ => edits.set.push((n, v)),
                }
            }
            edits.remove = ok
                .headers_to_remove
                .iter()
                .filter_map(|h| HeaderName::try_from(h.as_str()).ok())
                .collect();
            edits.query_set = ok
                .query_parameters_to_set
                .iter()
                .map(|q| (q.key.clone(), q.value.clone()))
                .collect();
            edits.query_remove = ok.query_parameters_to_remove.clone();
            edits.respond = ok
                .response_headers_to_add
                .iter()
                .filter_map(|o| header(o.header.as_ref()))
                .filter(|(n, _)| !super::hop_by_hop(n))
                .collect();
            Ok(Answer::Allow(edits))
        }
        _ if allowed => Ok(Answer::Allow(Edits::default())),
        Some(HttpResponse::DeniedResponse(d) | HttpResponse::ErrorResponse(d)) => {
            let status = d
                .status
                .and_then(|s| StatusCode::from_u16(u16::try_from(s.code).ok()?).ok())
                .filter(|s| s.as_u16() >= 200)
                .unwrap_or(StatusCode::FORBIDDEN);
            let mut headers = HeaderMap::new();
            for (n, v) in d.headers.iter().filter_map(|o| header(o.header.as_ref())) {
                if !super::hop_by_hop(&n) {
                    headers.append(n, v);
                }
            }
            Ok(Answer::Deny(Denial {
                status,
                headers,
                body: Bytes::from(d.body),
            }))
        }
        _ => Ok(Answer::Deny(Denial::status(StatusCode::FORBIDDEN))),
    }
}

fn header(h: Option<&core::HeaderValue>) -> Option<(HeaderName, HeaderValue)> {
    let h = h?;
    let value = if h.raw_value.is_empty() {
        h.value.as_bytes()
    } else {
        &h.raw_value
    };
    Some((
        HeaderName::try_from(h.key.as_str()).ok()?,
        HeaderValue::from_bytes(value).ok()?,
    ))
}

/// A provider's cluster as tonic's transport: each call is one request on the cluster's pool
/// (HTTP/2: the translator gives gRPC providers that variant of the cluster).
#[derive(Clone)]
struct ClusterChannel(Arc<ClusterRuntime>);

impl tower_service::Service<http::Request<tonic::body::Body>> for ClusterChannel {
    // The body holds its connection until it ends.
    type Response = http::Response<crate::upstream::UpstreamBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let cluster = self.0.clone();
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            // A unary check: one small message, sent whole.
            let body = body.collect().await?.to_bytes();
            let req = http::Request::from_parts(parts, RequestBody::Full(Some(body)));
            let (idx, _endpoint) = cluster.pick(None, None).ok_or("no endpoint to ask")?;
            let authority = &cluster.endpoints[idx].authority;
            let resp = cluster.pool().send(idx, authority, req).await?;
            cluster.stats.responses.record(resp.status().as_u16());
            Ok(resp)
        })
    }
}
