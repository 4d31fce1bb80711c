//! Istio `CUSTOM` authorization, as Envoy's `ext_authz` filter does it: a request a CUSTOM
//! policy matches is first asked of the provider's service. Over HTTP: its method, the
//! provider's path prefix before its path, its `Host`, `Authorization`, the headers the
//! provider names, and its body when the provider asks for it (else none); a 200 lets it on
//! (with the answer's headers the provider names set on it, and those it names for the client
//! added to the response), any other answer but a 5xx is the client's. Over gRPC: see
//! [`grpc`]. A 5xx, a failed call or no answer in time is an error: `failOpen`, else
//! `statusOnError`. A body the provider wants is read ahead first, up to its limit: a longer
//! one is refused (413) unless the provider takes part of it; the request goes on with all of it.

mod grpc;

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version, header};
use http_body_util::BodyExt;

use super::policy::{Patterns, Upstreams};
use crate::telemetry::CheckStats;
use crate::upstream::body::{ClientBody, ReadAhead, ReadAheadError, RequestBody};
use crate::upstream::{ClusterRuntime, UpstreamError};
use ferrum_snapshot::mesh::ExtAuthzApi;

/// The most of a refusing answer's body passed on to the client; a longer one is an error.
const MAX_DENY_BODY: usize = 64 * 1024;

/// Tells a provider whether the body it got is all of it (Envoy's header).
const PARTIAL_BODY: HeaderName = HeaderName::from_static("x-envoy-auth-partial-body");

/// Headers that belong to one hop, never copied between the request, the check and answers.
pub(super) fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection" | "keep-alive" | "proxy-connection" | "transfer-encoding" | "te" | "upgrade" | "trailer"
    ) || name == header::CONTENT_LENGTH
        || name == header::HOST
}

/// One provider, with the cluster that reaches it.
pub struct ExtAuthz {
    pub spec: ferrum_snapshot::mesh::ExtAuthz,
    /// `None` only if the snapshot lost it (validate() requires it): every check is an error.
    cluster: Option<Arc<ClusterRuntime>>,
    stats: Arc<CheckStats>,
    include: Patterns,
    upstream: Patterns,
    /// `None`: every header of a refusing answer goes to the client.
    downstream: Option<Patterns>,
    /// Headers of an allowing answer added to the client's response.
    downstream_on_allow: Patterns,
}

/// What a provider said about one request.
pub enum Answer {
    /// Let it on, with these edits to its headers.
    Allow(Edits),
    /// Refused: the client's answer.
    Deny(Denial),
}

/// How an allowing answer changes the request's headers, and what it adds to the response.
#[derive(Default)]
pub struct Edits {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub append: Vec<(HeaderName, HeaderValue)>,
    pub add_if_absent: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
    /// Query parameters set (replacing any of the name) and removed (a gRPC provider's).
    pub query_set: Vec<(String, String)>,
    pub query_remove: Vec<String>,
    /// Added to the client's response.
    pub respond: Vec<(HeaderName, HeaderValue)>,
}

/// Headers added to a response: `(name, value)`, appended.
pub type ResponseHeaders = Vec<(HeaderName, HeaderValue)>;

/// Appends `add` to `headers`.
pub fn add_response_headers(add: ResponseHeaders, headers: &mut HeaderMap) {
    for (n, v) in add {
        headers.append(n, v);
    }
}

impl Edits {
    /// Edits the request's headers and query; returns the headers for the response.
    fn apply(self, req: &mut http::request::Parts) -> ResponseHeaders {
        if !self.query_set.is_empty() || !self.query_remove.is_empty() {
            edit_query(&mut req.uri, &self.query_set, &self.query_remove);
        }
        let headers = &mut req.headers;
        for n in self.remove {
            headers.remove(n);
        }
        for (n, v) in self.set {
            headers.insert(n, v);
        }
        for (n, v) in self.append {
            headers.append(n, v);
        }
        for (n, v) in self.add_if_absent {
            headers.entry(n).or_insert(v);
        }
        self.respond
    }
}

/// Sets (replacing every parameter of the name) and removes query parameters of `uri`, as
/// Envoy applies an ext_authz OK response's; parameters neither names stay as they were sent.
fn edit_query(uri: &mut http::Uri, set: &[(String, String)], remove: &[String]) {
    let Some(pq) = uri.path_and_query() else { return };
    let touched = |segment: &str| {
        let raw = segment.split('=').next().unwrap_or(segment);
        let key: String = form_urlencoded::parse(raw.as_bytes()).map(|(k, _)| k).collect();
        set.iter().any(|(k, _)| *k == key) || remove.contains(&key)
    };
    let kept = pq
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|s| !s.is_empty() && !touched(s));
    let mut query = kept.collect::<Vec<_>>().join("&");
    let mut added = form_urlencoded::Serializer::new(String::new());
    added.extend_pairs(set);
    let added = added.finish();
    if !added.is_empty() {
        if !query.is_empty() {
            query.push('&');
        }
        query.push_str(&added);
    }
    let target = match query.is_empty() {
        true => pq.path().to_string(),
        false => format!("{}?{query}", pq.path()),
    };
    let mut parts = std::mem::take(uri).into_parts();
    parts.path_and_query = target.parse().ok().or(parts.path_and_query);
    *uri = http::Uri::from_parts(parts).unwrap_or_default();
}

/// Who asks, as a provider is told: the client's address and mTLS identity, and where the
/// request was going.
pub struct Requester {
    pub client: std::net::SocketAddr,
    pub principal: Option<String>,
    pub destination: std::net::SocketAddr,
}

/// A verdict that defers to a provider: whom to ask, for whom, and the rest of the verdict once
/// the provider lets the request on.
pub struct Ask {
    pub service: Arc<ExtAuthz>,
    pub who: Requester,
    pub then: super::l7::Then,
}

/// A refusal, as the client gets it.
#[derive(Debug)]
pub struct Denial {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Denial {
    pub(super) fn status(status: StatusCode) -> Self {
        Denial {
            status,
            headers: HeaderMap::new(),
            body: Bytes::new(),
        }
    }

    /// As a response whose body `body` makes from the bytes.
    pub fn into_response<B>(self, body: impl FnOnce(Bytes) -> B) -> Response<B> {
        let mut r = Response::new(body(self.body));
        *r.status_mut() = self.status;
        *r.headers_mut() = self.headers;
        r
    }
}

fn patterns(list: &[String]) -> Patterns {
    let mut p = Patterns::default();
    list.iter().for_each(|h| p.insert(h));
    p
}

impl ExtAuthz {
    pub fn new(spec: &ferrum_snapshot::mesh::ExtAuthz, upstreams: &Upstreams) -> Self {
        ExtAuthz {
            cluster: upstreams.clusters.get(&spec.cluster).cloned(),
            stats: upstreams.registry.checks(&spec.provider),
            include: patterns(&spec.include_request_headers),
            upstream: patterns(&spec.headers_to_upstream_on_allow),
            downstream: (!spec.headers_to_downstream_on_deny.is_empty())
                .then(|| patterns(&spec.headers_to_downstream_on_deny)),
            downstream_on_allow: patterns(&spec.headers_to_downstream_on_allow),
            spec: spec.clone(),
        }
    }

    /// Asks about the request `req` from `who`, with its body read ahead first if the provider
    /// wants it (each frame waited for at most `body_idle`); an error answers as the provider
    /// says errors do.
    pub async fn ask(
        &self,
        req: &http::request::Parts,
        body: &mut ClientBody,
        body_idle: Duration,
        who: &Requester,
    ) -> Answer {
        let body = match self.read_body(body, body_idle).await {
            Ok(b) => b,
            Err(refused) => return Answer::Deny(refused),
        };
        let limit = Duration::from_millis(self.spec.timeout_ms);
        let failed = match tokio::time::timeout(limit, self.call(req, body.as_ref(), who)).await {
            Ok(Ok(answer)) => {
                let counter = match answer {
                    Answer::Allow(_) => &self.stats.allowed,
                    Answer::Deny(_) => &self.stats.denied,
                };
                counter.fetch_add(1, Relaxed);
                return answer;
            }
            Ok(Err(why)) => why,
            Err(_) => format!("no answer within {} ms", self.spec.timeout_ms),
        };
        tracing::warn!(provider = %self.spec.provider, path = req.uri.path(), error = %failed, fail_open = self.spec.fail_open, "external authorization failed");
        if self.spec.fail_open {
            self.stats.failed_open.fetch_add(1, Relaxed);
            return Answer::Allow(Edits::default());
        }
        self.stats.error.fetch_add(1, Relaxed);
        Answer::Deny(Denial::status(
            StatusCode::from_u16(self.spec.status_on_error).unwrap_or(StatusCode::FORBIDDEN),
        ))
    }

    /// The start of the body for the check, if the provider wants it; a body it would refuse
    /// (too long, stalled, broken) is the client's answer, and the provider is not asked.
    async fn read_body(&self, body: &mut ClientBody, idle: Duration) -> Result<Option<ReadAhead>, Denial> {
        let Some(wanted) = self.spec.include_request_body else {
            return Ok(None);
        };
        let refused = match body.read_ahead(wanted.max_bytes as usize, idle).await {
            Ok(read) if !read.partial || wanted.allow_partial => return Ok(Some(read)),
            // Envoy's answer, before any check (and whatever `failOpen` says).
            Ok(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Err(ReadAheadError::Stalled(_)) => StatusCode::REQUEST_TIMEOUT,
            Err(ReadAheadError::Client(_)) => StatusCode::BAD_REQUEST,
        };
        tracing::debug!(provider = %self.spec.provider, status = %refused, "request body not read for its check");
        Err(Denial::status(refused))
    }

    async fn call(
        &self,
        req: &http::request::Parts,
        body: Option<&ReadAhead>,
        who: &Requester,
    ) -> Result<Answer, String> {
        let cluster = self.cluster.as_ref().ok_or("its cluster is gone")?;
        let _admitted = cluster.admit().await.map_err(|e| format!("{e:?}"))?;
        if self.spec.api == ExtAuthzApi::Grpc {
            let packed = self.spec.include_request_body.is_some_and(|b| b.pack_as_bytes);
            return grpc::check(cluster, req, body.map(|b| (b, packed)), who).await;
        }
        let check = self.check_request(req, body)?;
        let (idx, _endpoint) = cluster.pick(None, None).ok_or("no endpoint to ask")?;
        let started = Instant::now();
        let resp = match cluster.pool().send(idx, &cluster.endpoints[idx].authority, check).await {
            Ok(sent) => sent,
            Err(e) => {
                let what = if e.is_connect() {
                    UpstreamError::ConnectFailure
                } else {
                    UpstreamError::Reset
                };
                cluster.stats.error(what);
                return Err(format!("{e}"));
            }
        };
        cluster.stats.responses.record(resp.status().as_u16());
        cluster.stats.latency.observe(started.elapsed());
        let (head, body) = resp.into_parts();
        if head.status.is_server_error() {
            return Err(format!("it answered {}", head.status));
        }
        let body = http_body_util::Limited::new(body, MAX_DENY_BODY)
            .collect()
            .await
            .map_err(|e| format!("its answer's body: {e}"))?
            .to_bytes();
        if head.status == StatusCode::OK {
            let named = |p: &Patterns| {
                head.headers
                    .iter()
                    .filter(|(n, _)| !hop_by_hop(n) && p.matches(n.as_str()))
                    .map(|(n, v)| (n.clone(), v.clone()))
                    .collect()
            };
            return Ok(Answer::Allow(Edits {
                set: named(&self.upstream),
                respond: named(&self.downstream_on_allow),
                ..Edits::default()
            }));
        }
        let mut headers = HeaderMap::new();
        for (n, v) in head.headers.iter().filter(|(n, _)| !hop_by_hop(n)) {
            if self.downstream.as_ref().is_none_or(|p| p.matches(n.as_str())) {
                headers.append(n.clone(), v.clone());
            }
        }
        Ok(Answer::Deny(Denial {
            status: head.status,
            headers,
            body,
        }))
    }

    /// The check for `req`: its method, the prefixed path, its host, the headers named, and
    /// `body` when the provider wants it.
    fn check_request(
        &self,
        req: &http::request::Parts,
        body: Option<&ReadAhead>,
    ) -> Result<Request<RequestBody>, String> {
        let pq = req.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let uri: Uri = format!("{}{pq}", self.spec.path_prefix)
            .parse()
            .map_err(|e| format!("the check's path: {e}"))?;
        let bytes = body.map_or_else(Bytes::new, |b| b.bytes.clone());
        let length = HeaderValue::from(bytes.len());
        let mut check = Request::new(if bytes.is_empty() {
            RequestBody::Empty
        } else {
            RequestBody::Full(Some(bytes))
        });
        *check.method_mut() = req.method.clone();
        *check.uri_mut() = uri;
        *check.version_mut() = Version::HTTP_11;
        let headers = check.headers_mut();
        let host = req
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            .or_else(|| req.headers.get(header::HOST).cloned());
        if let Some(h) = host {
            headers.insert(header::HOST, h);
        }
        for (n, v) in req.headers.iter() {
            // Envoy always sends `Authorization` too.
            if !hop_by_hop(n) && (n == header::AUTHORIZATION || self.include.matches(n.as_str())) {
                headers.append(n.clone(), v.clone());
            }
        }
        for (n, v) in &self.spec.additional_headers {
            // validate() and the translator checked them; a bad one is left out.
            if let (Ok(n), Ok(v)) = (HeaderName::try_from(n.as_str()), HeaderValue::try_from(v.as_str())) {
                headers.insert(n, v);
            }
        }
        if let Some(b) = body {
            headers.insert(
                PARTIAL_BODY,
                HeaderValue::from_static(if b.partial { "true" } else { "false" }),
            );
        }
        headers.insert(header::CONTENT_LENGTH, length);
        Ok(check)
    }
}

/// A request's verdict once any provider it needed was asked: the same verdicts, or the
/// provider's refusal.
pub enum Settled {
    /// With the headers the providers asked, if any, add to the response.
    Allow(ResponseHeaders),
    Deny,
    Unauthenticated,
    Refused(Denial),
}

/// Asks the provider a verdict defers to (applying the header edits it allows with to `req`;
/// `body` is read ahead if it wants it, each frame waited for at most `body_idle`), then takes
/// the rest of the verdict.
pub async fn settle(
    mut verdict: super::l7::Verdict,
    req: &mut http::request::Parts,
    body: &mut ClientBody,
    body_idle: Duration,
) -> Settled {
    use super::l7::Verdict;
    let mut respond = ResponseHeaders::new();
    loop {
        verdict = match verdict {
            Verdict::Allow => return Settled::Allow(respond),
            Verdict::Deny => return Settled::Deny,
            Verdict::Unauthenticated => return Settled::Unauthenticated,
            // Boxed: a request's future stays small when nothing is asked.
            Verdict::Ask(ask) => match Box::pin(ask.service.ask(req, body, body_idle, &ask.who)).await {
                Answer::Deny(d) => return Settled::Refused(d),
                Answer::Allow(edits) => {
                    respond.extend(edits.apply(req));
                    (ask.then)(req)
                }
            },
        }
    }
}
