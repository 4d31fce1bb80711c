//! The request path: one atomic load of the compiled config, host and route lookup, then a
//! redirect or a forward with balancing, breaker, timeouts and retries.

mod hash;
pub mod headers;
pub mod path;
pub mod upgrade;

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrum_snapshot::model::{HashOn, PathMatch, PathRewrite, Redirect};
use http::uri::PathAndQuery;
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header};
use hyper::body::{Body as _, Incoming};
use opentelemetry::trace::SpanKind;

use crate::compile::CompiledListener;
use crate::dataplane::Shared;
use crate::limits::Limits;
use crate::mesh::ext_authz::{ResponseHeaders, Settled, add_response_headers, settle};
use crate::ratelimit::Quota;
use crate::router::Route;
use crate::router::cors;
use crate::upstream::balance::HashKey;
use crate::upstream::body::{self, ClientBody, Replay, RequestBody, ResponseBody};
use crate::upstream::{
    ClusterRuntime, EndpointGuard, EndpointState, MaxConnections, Outcome, PoolError, RequestGuard, UpstreamBody,
    UpstreamError,
};
use headers::X_FERRUM_ERROR;

/// Why the proxy answered by itself; the value goes in `x-ferrum-error`.
#[derive(Debug, Clone, Copy)]
pub enum Local {
    RouteNotFound,
    BackendNotFound,
    /// Every backend of the rule has weight 0.
    NoWeightedBackend,
    BodyTooLarge,
    HeadersTooLarge,
    Upstream(UpstreamError),
    MethodNotAllowed,
    /// No Host on HTTP/1.1, or more than one (RFC 9112 §3.2).
    BadHost,
    /// A path that cannot be normalised safely.
    BadPath,
    /// A transfer coding other than `chunked` (RFC 9112 §6.1).
    UnsupportedTransferCoding,
    /// The client's body broke off or was malformed.
    ClientBody,
    /// The client stopped sending its body.
    ClientBodyTimeout,
    /// An AuthorizationPolicy of the Gateway denies the request.
    Denied,
    /// The request's JWT is not accepted by the Gateway's RequestAuthentications.
    Unauthenticated,
    /// The route's fault injection answers with this status (200-599, validated).
    FaultAbort(u16),
}

impl Local {
    fn status(self) -> StatusCode {
        match self {
            Local::RouteNotFound => StatusCode::NOT_FOUND,
            Local::BackendNotFound | Local::NoWeightedBackend => StatusCode::INTERNAL_SERVER_ERROR,
            Local::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Local::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Local::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Local::BadHost | Local::BadPath | Local::ClientBody => StatusCode::BAD_REQUEST,
            Local::UnsupportedTransferCoding => StatusCode::NOT_IMPLEMENTED,
            Local::ClientBodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Local::Denied => StatusCode::FORBIDDEN,
            Local::Unauthenticated => StatusCode::UNAUTHORIZED,
            Local::FaultAbort(s) => StatusCode::from_u16(s).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            Local::Upstream(UpstreamError::ConnectFailure | UpstreamError::Reset | UpstreamError::InvalidResponse) => {
                StatusCode::BAD_GATEWAY
            }
            Local::Upstream(UpstreamError::Timeout) => StatusCode::GATEWAY_TIMEOUT,
            Local::Upstream(UpstreamError::Overflow | UpstreamError::NoHealthyUpstream) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }
    fn reason(self) -> &'static str {
        match self {
            Local::RouteNotFound => "route_not_found",
            Local::BackendNotFound => ferrum_proto::xds::BACKEND_NOT_FOUND,
            Local::NoWeightedBackend => ferrum_proto::xds::NO_WEIGHTED_BACKEND,
            Local::BodyTooLarge => "request_body_too_large",
            Local::HeadersTooLarge => "request_headers_too_large",
            Local::MethodNotAllowed => "method_not_allowed",
            Local::BadHost => "invalid_host",
            Local::BadPath => "invalid_path",
            Local::UnsupportedTransferCoding => "unsupported_transfer_coding",
            Local::ClientBody => "request_body_error",
            Local::ClientBodyTimeout => "request_body_timeout",
            Local::Denied => "rbac_access_denied",
            Local::Unauthenticated => "jwt_invalid",
            Local::FaultAbort(_) => "fault_filter_abort",
            Local::Upstream(e) => e.as_str(),
        }
    }
    fn response(self) -> Response<ResponseBody> {
        self.into_response(ResponseBody::local)
    }

    /// The answer, with its body made by `body` (for servers whose bodies are not the proxy's).
    pub fn into_response<B>(self, body: impl FnOnce(bytes::Bytes) -> B) -> Response<B> {
        let reason = self.reason();
        let mut r = Response::new(body(format!("{reason}\n").into()));
        *r.status_mut() = self.status();
        let h = r.headers_mut();
        h.insert(&X_FERRUM_ERROR, HeaderValue::from_static(reason));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        if let Local::Unauthenticated = self {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"gateway\", error=\"invalid_token\""),
            );
        }
        r
    }
}

/// A route's own answer (Istio `directResponse`): `text/plain` when it has a body.
fn direct(d: &crate::router::Direct) -> Response<ResponseBody> {
    let mut r = Response::new(ResponseBody::local(d.body.clone()));
    *r.status_mut() = d.status;
    if !d.body.is_empty() {
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    r
}

/// Connection facts the handler needs.
#[derive(Clone, Copy)]
pub struct ConnInfo {
    /// The address the listener is bound to (its snapshot listener's address and port): two
    /// listeners on one port with different addresses are different listeners. For a captured
    /// connection to a mesh Service: its original destination (VIP and port).
    pub listener: SocketAddr,
    /// Where the connection comes from: a load balancer, when one is in front.
    pub peer: SocketAddr,
    /// The client of the connection: its PROXY protocol header's source, else the peer. It is
    /// what `X-Forwarded-For` is extended with.
    pub client: SocketAddr,
    /// The client of the request: the trusted `X-Forwarded-For` hop (see
    /// [`crate::listener::client`]), else the connection's. Policies' `remoteIpBlocks`, the
    /// access log, source-IP hashing and authorization providers see it.
    pub remote: SocketAddr,
}

impl ConnInfo {
    /// A connection with nothing in front of it: peer, client and remote are one.
    pub fn direct(listener: SocketAddr, peer: SocketAddr) -> Self {
        ConnInfo {
            listener,
            peer,
            client: peer,
            remote: peer,
        }
    }

    /// Takes the request's client from `X-Forwarded-For` when `hops` proxies in front are
    /// trusted and it names one.
    pub fn trust_forwarded(&mut self, headers: &http::HeaderMap, hops: u8) {
        if let Some(ip) = crate::listener::client::forwarded_client(headers, hops) {
            self.remote = SocketAddr::new(ip, 0);
        }
    }
}

pub async fn handle(shared: Arc<Shared>, mut conn: ConnInfo, mut req: Request<Incoming>) -> Response<ResponseBody> {
    let started = Instant::now();
    let cfg = shared.config.load();
    // A captured connection to a mesh Service is served by the Service port's routes.
    let (listener, kind) = match cfg.listeners.get(&conn.listener) {
        Some(l) => (l, SpanKind::Server),
        None => match cfg.mesh.http(conn.listener) {
            Some(l) => (l, SpanKind::Client),
            None => return Local::RouteNotFound.response(),
        },
    };
    conn.trust_forwarded(req.headers(), listener.client_address.xff_trusted_hops);
    let span = shared.tracing.begin(req.headers_mut(), kind);
    // Whatever answers the request, the headers an authorization provider that let it on gave
    // for the client go on it.
    let mut on_allow = ResponseHeaders::new();
    let mesh = calls_counted(&shared, listener);
    if !listener.access_log && span.is_none() && mesh.is_none() {
        let mut resp = serve(&shared, listener, conn, req, started, None, &mut on_allow).await;
        add_response_headers(on_allow, resp.headers_mut());
        return resp;
    }
    let (grpc, declared) = (is_grpc(&req), req.body().size_hint().exact().unwrap_or(0));
    let requested = conn.listener;
    let mut entry = (listener.access_log || span.is_some())
        .then(|| crate::access_log::Entry::of(&req, conn.remote, &listener.name));
    // Boxed: what this path keeps across the wait would grow every request's future.
    let mut resp = Box::pin(serve(
        &shared,
        listener,
        conn,
        req,
        started,
        entry.as_mut(),
        &mut on_allow,
    ))
    .await;
    add_response_headers(on_allow, resp.headers_mut());
    let reached = resp.extensions_mut().remove::<Reached>();
    if let Some(e) = &mut entry {
        e.respond(&resp);
        e.upstream_host = reached.as_ref().map(|r| r.endpoint.key.clone());
    }
    let counted = mesh.and_then(|mesh| {
        let (calls, upload) = match reached {
            Some(Reached {
                calls: Some(c), upload, ..
            }) => (c, upload),
            // Nothing answered (no route, no endpoint): a call to the Service still.
            _ => (mesh.callee(requested, None, None)?, None),
        };
        Some(body::Counted::new(calls, &resp, grpc, started, (declared, upload)))
    });
    let log = listener.access_log;
    resp.map(|b| body::Observed::wrap(b, entry, log, span, shared.access_log.clone(), counted))
}

/// The mesh proxy that counts `listener`'s requests as its workload's calls (Istio's
/// `reporter="source"`), when it does.
fn calls_counted<'a>(
    shared: &'a Shared,
    listener: &CompiledListener,
) -> Option<&'a dyn crate::upstream::MeshUpstreams> {
    let mesh = shared.mesh.get().filter(|_| listener.outbound)?;
    mesh.counts_calls().then_some(&**mesh)
}

/// The endpoint that answered, carried from the forwarder in the response's extensions for the
/// request's log line and its caller's metrics (only when either is wanted).
#[derive(Clone)]
struct Reached {
    endpoint: Arc<crate::upstream::EndpointState>,
    /// Where a mesh proxy counts the call.
    calls: Option<crate::mesh::peers::Calls>,
    /// The request's body as it arrived, when it had one.
    upload: Option<Arc<body::Upload>>,
}

/// Answers one request on `listener`; notes its route and cluster in `log`, when logging, and
/// in `on_allow` the headers its answer gets whoever gives it (an authorization provider's for the
/// client, the rate limit quota left).
async fn serve(
    shared: &Arc<Shared>,
    listener: &CompiledListener,
    conn: ConnInfo,
    req: Request<Incoming>,
    started: Instant,
    mut log: Option<&mut crate::access_log::Entry>,
    on_allow: &mut ResponseHeaders,
) -> Response<ResponseBody> {
    let mut req = req.map(ClientBody::from);
    let host_value = match check_head(&mut req, &shared.limits) {
        Ok(h) => h,
        Err(l) => return l.response(),
    };
    let vh = listener.hosts.find(&host_name(host_value.as_ref()));
    // A browser's preflight carries no credentials: its route's CORS policy answers it before
    // any authentication or authorization (as Istio places its CORS filter).
    if let Some(resp) = vh.and_then(|vh| preflight(vh, &req)) {
        return resp;
    }
    // The host's Gateways' policies decide before any route is chosen.
    if let Some(p) = vh.and_then(|vh| vh.policies.as_ref()) {
        req = match gateway_policies(shared, p, req, &conn, on_allow).await {
            Ok(req) => req,
            Err((req, refused)) => return cors_marked(vh, &req, refused),
        };
    }
    let Some(route) = routed(shared, vh, &req) else {
        return Local::RouteNotFound.response();
    };
    if let Some(e) = log.as_deref_mut() {
        e.route = Some(route.name.clone());
    }
    let cors = match route.cors.as_deref().map(|c| c.check(&req)) {
        Some(cors::Check::Preflight(resp)) => return *resp,
        Some(cors::Check::Allowed(origin)) => Some(origin),
        _ => None,
    };
    // Boxed: what a Global limit's Redis call or a fault's delay keeps would grow every
    // request's future.
    if (!route.limits.is_empty() || route.fault.is_some())
        && let Some(refused) = Box::pin(before_acting(route, &req, conn.remote.ip(), on_allow)).await
    {
        return answered(route, None, cors, started, refused);
    }
    let (resp, backend) = match act(shared, listener, route, conn, host_value, &req, log) {
        Act::Answer(resp) => (resp, None),
        Act::Forward(ctx) => {
            let backend = ctx.backend;
            (ctx.run(req).await.unwrap_or_else(Local::response), backend)
        }
    };
    answered(route, backend, cors, started, resp)
}

/// The route the request takes on its host; a request with none is counted.
fn routed<'a>(
    shared: &Shared,
    vh: Option<&'a crate::router::VirtualHost>,
    req: &Request<ClientBody>,
) -> Option<&'a Route> {
    let route = vh.and_then(|vh| vh.find(req.method(), req.uri().path(), req.uri().query(), req.headers()));
    if route.is_none() {
        let unrouted = &shared.registry.unrouted;
        unrouted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    route
}

/// The route's rate limits (the quota left noted in `on_allow`), then its fault injection: the
/// answer, when either refuses the request.
async fn before_acting(
    route: &Route,
    req: &Request<ClientBody>,
    client: std::net::IpAddr,
    on_allow: &mut ResponseHeaders,
) -> Option<Response<ResponseBody>> {
    if !route.limits.is_empty() {
        match over_limit(&route.limits, req.headers(), client).await {
            Err(q) => return Some(rate_limited(q, is_grpc(req))),
            Ok(Some(q)) => on_allow.extend(q.headers()),
            Ok(None) => {}
        }
    }
    inject(route.fault.as_ref()?).await.map(abort_answer)
}

/// What the route says to do with a request: answer it here, or forward it.
enum Act<'a> {
    Answer(Response<ResponseBody>),
    Forward(Forward<'a>),
}

/// Decides what the route does (redirect, answer, forward to a weighted backend), with the
/// chosen backend's own header edits for the answer; notes the cluster in `log`.
fn act<'a>(
    shared: &'a Shared,
    listener: &'a CompiledListener,
    route: &'a Route,
    conn: ConnInfo,
    host_value: Option<HeaderValue>,
    req: &Request<ClientBody>,
    log: Option<&mut crate::access_log::Entry>,
) -> Act<'a> {
    use crate::router::{Action, Target};
    let target = match &route.action {
        Action::Redirect(rd) => {
            let host = host_name(host_value.as_ref());
            return Act::Answer(redirect(rd, route, listener, conn.listener.port(), &host, req));
        }
        Action::Respond(d) => return Act::Answer(direct(d)),
        Action::Forward(_) => route.action.pick(),
    };
    let (cluster, backend) = match target {
        Some(Target {
            cluster: Some(cluster),
            headers,
        }) => (cluster, headers.as_deref()),
        Some(_) => return Act::Answer(Local::BackendNotFound.response()),
        None => return Act::Answer(Local::NoWeightedBackend.response()),
    };
    let noting = log.is_some() || calls_counted(shared, listener).is_some();
    if let Some(e) = log {
        e.upstream_cluster = Some(cluster.spec.name.clone());
    }
    Act::Forward(Forward {
        shared,
        listener,
        route,
        cluster,
        conn,
        host_value,
        noting,
        backend,
    })
}

/// The request's host, without its port and lowercased (borrowed when already lowercase).
fn host_name(host_value: Option<&HeaderValue>) -> Cow<'_, str> {
    let host = host_value.and_then(|h| h.to_str().ok()).map(strip_port).unwrap_or("");
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

/// The host's Gateway policies decide on `req` before any route is chosen: the request goes on
/// (`on_allow` noting the headers its answer gets), or comes back with its refusal.
async fn gateway_policies(
    shared: &Shared,
    policies: &Arc<crate::mesh::policy::GatewayPolicies>,
    req: Request<ClientBody>,
    conn: &ConnInfo,
    on_allow: &mut ResponseHeaders,
) -> Result<Request<ClientBody>, (Request<ClientBody>, Response<ResponseBody>)> {
    let (mut parts, mut body) = req.into_parts();
    let verdict = policies.judge(&mut parts, conn);
    let idle = shared.limits.request_body_idle_timeout;
    let refused = match settle(verdict, &mut parts, &mut body, idle).await {
        Settled::Allow(add) => {
            *on_allow = add;
            None
        }
        Settled::Deny => Some(Local::Denied.response()),
        Settled::Unauthenticated => Some(Local::Unauthenticated.response()),
        Settled::Refused(d) => Some(d.into_response(|b| ResponseBody::Local(Some(b)))),
    };
    let req = Request::from_parts(parts, body);
    match refused {
        Some(r) => Err((req, r)),
        None => Ok(req),
    }
}

/// A route's answer with the route's (and its backend's) response headers, marked for the
/// origin its CORS policy allowed, and counted.
fn answered(
    route: &crate::router::Route,
    backend: Option<&crate::router::BackendMods>,
    cors: Option<HeaderValue>,
    started: Instant,
    mut resp: Response<ResponseBody>,
) -> Response<ResponseBody> {
    route.response_headers.apply(resp.headers_mut());
    if let Some(b) = backend {
        b.response.apply(resp.headers_mut());
    }
    if let (Some(c), Some(origin)) = (route.cors.as_deref(), cors) {
        c.mark(origin, resp.headers_mut());
    }
    route.stats.responses.record(resp.status().as_u16());
    route.stats.latency.observe(started.elapsed());
    resp
}

/// Counts the request against every one of `limits`: `Err` with the first it is over, else the
/// tightest quota left.
async fn over_limit(
    limits: &[Arc<crate::ratelimit::Limiter>],
    headers: &http::HeaderMap,
    client: std::net::IpAddr,
) -> Result<Option<Quota>, Quota> {
    let (mut over, mut tightest) = (None, None);
    for l in limits {
        match l.check(headers, client).await {
            Err(q) => over = over.or(Some(q)),
            Ok(q) => tightest = Quota::tighter(tightest, q),
        }
    }
    over.map_or(Ok(tightest), Err)
}

/// 429 with the limit and when the window ends, as Envoy's rate limit filters say them; to a
/// gRPC call, `RESOURCE_EXHAUSTED` (Envoy's `rate_limited_as_resource_exhausted`), which gRPC
/// clients read as "over a quota" where a bare 429 would be `UNAVAILABLE`.
fn rate_limited(q: Quota, grpc: bool) -> Response<ResponseBody> {
    const RESOURCE_EXHAUSTED: u16 = 8;
    let reason = "rate_limited";
    let mut r = if grpc {
        grpc_error(RESOURCE_EXHAUSTED, "rate limited", reason)
    } else {
        let mut r = Response::new(ResponseBody::local(format!("{reason}\n")));
        *r.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        r.headers_mut()
            .insert(&X_FERRUM_ERROR, HeaderValue::from_static(reason));
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        r
    };
    let h = r.headers_mut();
    h.extend(q.headers());
    h.insert(header::RETRY_AFTER, HeaderValue::from(q.reset));
    r
}

/// How long a mirrored copy may take, end to end.
const SHADOW_TIMEOUT: Duration = Duration::from_secs(30);

/// Sends a copy of a request (its upstream head, as it goes to the route's backend, and `body`,
/// a copy of its body as it is sent) to the route's mirror in a task of its own: the answer is
/// read and dropped, counted in the mirror cluster's metrics only.
fn shadow(cluster: Arc<ClusterRuntime>, parts: &http::request::Parts, body: RequestBody) {
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    if let Some(pq) = parts.uri.path_and_query() {
        *req.uri_mut() = Uri::from(pq.clone());
    }
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = parts.headers.clone();
    let client_h2 = parts.version == Version::HTTP_2;
    // Envoy's mark, so the mirror can tell a copy: its authority ends in `-shadow`.
    let host = req.headers().get(header::HOST).and_then(|v| v.to_str().ok());
    if let Some(v) = host.map(shadow_host).and_then(|h| HeaderValue::from_str(&h).ok()) {
        req.headers_mut().insert(header::HOST, v);
    }
    tokio::spawn(async move {
        let copy = async {
            let Ok(_admitted) = cluster.admit().await else { return };
            let Some((idx, _ep)) = cluster.pick(None, None) else {
                return;
            };
            let started = Instant::now();
            match cluster
                .pool_for(client_h2)
                .send(idx, &cluster.endpoints[idx].authority, req)
                .await
            {
                Ok(resp) => {
                    let (status, took) = (resp.status().as_u16(), started.elapsed());
                    // Read to the end and dropped as it comes (a copy's answer may be any
                    // size); then the connection serves the next copy.
                    let mut body = resp.into_body();
                    while let Some(Ok(_)) = http_body_util::BodyExt::frame(&mut body).await {}
                    // Counted once the connection is back: a copy counted is a copy done.
                    cluster.stats.responses.record(status);
                    cluster.stats.latency.observe(took);
                }
                Err(e) if e.is_connect() => cluster.stats.error(UpstreamError::ConnectFailure),
                Err(_) => cluster.stats.error(UpstreamError::Reset),
            }
        };
        let _ = tokio::time::timeout(SHADOW_TIMEOUT, copy).await;
    });
}

/// The answer to a CORS preflight (`OPTIONS` with `Access-Control-Request-Method`) whose route
/// allows its origin.
fn preflight<B>(vh: &crate::router::VirtualHost, req: &Request<B>) -> Option<Response<ResponseBody>> {
    if req.method() != Method::OPTIONS || !req.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD) {
        return None;
    }
    let route = vh.find(req.method(), req.uri().path(), req.uri().query(), req.headers())?;
    match route.cors.as_deref()?.check(req) {
        cors::Check::Preflight(resp) => Some(*resp),
        _ => None,
    }
}

/// `resp` (a refusal before any route was chosen), marked for the request's origin when its
/// route's CORS policy allows it: a browser script can then read why it was refused.
fn cors_marked<B>(
    vh: Option<&crate::router::VirtualHost>,
    req: &Request<B>,
    mut resp: Response<ResponseBody>,
) -> Response<ResponseBody> {
    let route = vh.and_then(|vh| vh.find(req.method(), req.uri().path(), req.uri().query(), req.headers()));
    if let Some(c) = route.and_then(|r| r.cors.as_deref())
        && let cors::Check::Allowed(origin) = c.check(req)
    {
        c.mark(origin, resp.headers_mut());
    }
    resp
}

/// `host[:port]` with `-shadow` after the host.
fn shadow_host(h: &str) -> String {
    match h.rsplit_once(':') {
        Some((name, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
            format!("{name}-shadow:{port}")
        }
        _ => format!("{h}-shadow"),
    }
}

/// A route's faults for one request: waits out the delay when it falls in the delay's share,
/// and says what to answer when it falls in the abort's.
async fn inject(f: &ferrum_snapshot::model::Fault) -> Option<&ferrum_snapshot::model::FaultAbort> {
    let drawn = |per_million: u32| fastrand::u32(0..1_000_000) < per_million;
    if let Some(d) = &f.delay
        && drawn(d.per_million)
    {
        tokio::time::sleep(Duration::from_millis(d.ms)).await;
    }
    f.abort.as_ref().filter(|a| drawn(a.per_million))
}

/// The answer of an injected abort: its status, or — for a gRPC status — a gRPC error as
/// Envoy's fault filter gives it (HTTP 200, `grpc-status`, no body: a trailers-only response).
fn abort_answer(a: &ferrum_snapshot::model::FaultAbort) -> Response<ResponseBody> {
    match a.grpc_status {
        Some(code) => grpc_error(code.into(), "fault filter abort", "fault_filter_abort"),
        None => Local::FaultAbort(a.status).response(),
    }
}

/// A gRPC error as gRPC clients read it: HTTP 200, `grpc-status`, no body.
fn grpc_error(code: u16, message: &'static str, reason: &'static str) -> Response<ResponseBody> {
    let mut r = Response::new(ResponseBody::Local(None));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert("grpc-status", HeaderValue::from(code));
    h.insert("grpc-message", HeaderValue::from_static(message));
    h.insert(&X_FERRUM_ERROR, HeaderValue::from_static(reason));
    r
}

/// Whether a request is a gRPC call (its errors are answered as gRPC statuses).
pub(crate) fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Refuses what must not be forwarded and normalises the path; returns the request's host.
/// Every server of the proxy calls it before anything looks at the request, so a policy and
/// the app behind it read the same path and host.
pub fn check_head<B>(req: &mut Request<B>, limits: &Limits) -> Result<Option<HeaderValue>, Local> {
    // CONNECT tunnels come with mesh mode; an HTTP/2 extended CONNECT (RFC 8441) is an upgrade,
    // unless to HTTP or TLS, which would go past every route and policy.
    if upgrade::refused_connect(req) {
        return Err(Local::MethodNotAllowed);
    }
    // hyper bounds its read buffer, not the head: a head that arrives in one read can exceed it.
    let head: usize = req.headers().iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum();
    if head + req.uri().path_and_query().map_or(0, |p| p.as_str().len()) > crate::limits::MAX_HEADER_BYTES {
        return Err(Local::HeadersTooLarge);
    }
    if let Some(te) = req.headers().get(header::TRANSFER_ENCODING)
        && (req.headers().get_all(header::TRANSFER_ENCODING).iter().count() > 1
            || !te.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked"))
    {
        return Err(Local::UnsupportedTransferCoding);
    }
    let host = request_host(req)?;
    let normal =
        path::normalize(req.uri().path(), limits.merge_slashes, limits.escaped_slashes).map_err(|_| Local::BadPath)?;
    if let Cow::Owned(p) = normal {
        let pq = match req.uri().query() {
            Some(q) => format!("{p}?{q}"),
            None => p,
        };
        let mut parts = req.uri().clone().into_parts();
        parts.path_and_query = Some(PathAndQuery::try_from(pq).map_err(|_| Local::BadPath)?);
        *req.uri_mut() = Uri::from_parts(parts).map_err(|_| Local::BadPath)?;
    }
    Ok(host)
}

/// The request's host: the target's authority when it has one (absolute form, RFC 9112
/// §3.2.2; `:authority` over HTTP/2), else the `Host` header. HTTP/1.1 needs exactly one `Host`
/// and no request may carry two.
fn request_host<B>(req: &Request<B>) -> Result<Option<HeaderValue>, Local> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() || (first.is_none() && req.version() == Version::HTTP_11) {
        return Err(Local::BadHost);
    }
    let host = match req.uri().authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).map_err(|_| Local::BadHost)?,
        None => match first {
            Some(h) => h.clone(),
            None => return Ok(None),
        },
    };
    if !headers::valid_host(host.as_bytes()) {
        return Err(Local::BadHost);
    }
    Ok(Some(host))
}

fn strip_port(h: &str) -> &str {
    // Byte searches: a `char` pattern's searcher cost more than the rest of the host lookup.
    let b = h.as_bytes();
    if b.first() == Some(&b'[') {
        return b.iter().position(|&c| c == b']').map_or(h, |i| &h[..=i]);
    }
    match b.iter().rposition(|&c| c == b':') {
        Some(i) if b[i + 1..].iter().all(u8::is_ascii_digit) => &h[..i],
        _ => h,
    }
}

fn replace_prefix(path: &str, matched: &str, with: &str) -> String {
    let rest = if matched == "/" {
        path
    } else {
        &path[matched.len().min(path.len())..]
    };
    let rest = rest.trim_start_matches('/');
    let base = with.trim_end_matches('/');
    if rest.is_empty() {
        if base.is_empty() { "/".into() } else { base.to_string() }
    } else {
        format!("{base}/{rest}")
    }
}

fn rewritten_path(rw: &PathRewrite, route: &Route, path: &str) -> String {
    match rw {
        PathRewrite::Full(p) => p.clone(),
        PathRewrite::Prefix(p) => match &route.path {
            PathMatch::Prefix(matched) => replace_prefix(path, matched, p),
            _ => path.to_string(),
        },
    }
}

fn redirect(
    rd: &Redirect,
    route: &Route,
    listener: &CompiledListener,
    port: u16,
    host: &str,
    req: &Request<ClientBody>,
) -> Response<ResponseBody> {
    let scheme = rd
        .scheme
        .as_deref()
        .unwrap_or(if listener.https { "https" } else { "http" });
    let port = match (rd.port, &rd.scheme) {
        (Some(p), _) => p,
        (None, Some(s)) if s == "https" => 443,
        (None, Some(_)) => 80,
        (None, None) => port,
    };
    let default_port = (scheme == "https" && port == 443) || (scheme == "http" && port == 80);
    let host = rd.hostname.as_deref().unwrap_or(host);
    let path = match &rd.path {
        Some(rw) => Cow::Owned(rewritten_path(rw, route, req.uri().path())),
        None => Cow::Borrowed(req.uri().path()),
    };
    let mut location = format!("{scheme}://{host}");
    if !default_port {
        location.push_str(&format!(":{port}"));
    }
    location.push_str(&path);
    if let Some(q) = req.uri().query() {
        location.push('?');
        location.push_str(q);
    }
    let mut r = Response::new(ResponseBody::Local(None));
    *r.status_mut() = StatusCode::from_u16(rd.status).unwrap_or(StatusCode::FOUND);
    if let Ok(v) = HeaderValue::from_str(&location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

struct Forward<'a> {
    shared: &'a Shared,
    listener: &'a CompiledListener,
    route: &'a Route,
    cluster: &'a Arc<ClusterRuntime>,
    conn: ConnInfo,
    host_value: Option<HeaderValue>,
    /// The request is logged or counted as a call: the response carries the endpoint that
    /// answered.
    noting: bool,
    /// The chosen backend's own header edits.
    backend: Option<&'a crate::router::BackendMods>,
}

/// Whether a retry can send the request's body again; counts it when not.
fn replayable(cluster: &ClusterRuntime, replay: Option<&Replay>) -> bool {
    let ok = replay.is_none_or(Replay::replayable);
    if !ok {
        cluster
            .stats
            .retries_abandoned
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    ok
}

/// Walks an error's sources looking for `T`.
fn caused_by<T: std::error::Error + 'static>(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<T>() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Counts one try for its endpoint's health and its cluster's stats, and returns what the retry
/// policy judges: the status, or why there was none. `Err` ends the request at once: the
/// client's fault (no endpoint is blamed), or the circuit breaker's overflow.
fn account(
    cluster: &ClusterRuntime,
    ep: &EndpointState,
    outcome: &Try,
    started: Instant,
) -> Result<Result<u16, UpstreamError>, Local> {
    let status = match outcome {
        Try::Client(l) => return Err(*l),
        Try::Response(r) => Ok(r.status().as_u16()),
        Try::Upstream(UpstreamError::Overflow) => {
            cluster.stats.error(UpstreamError::Overflow);
            return Err(Local::Upstream(UpstreamError::Overflow));
        }
        Try::Upstream(e) => Err(*e),
    };
    cluster.record(
        ep,
        match status {
            Ok(s) => Outcome::Status(s),
            Err(UpstreamError::ConnectFailure) => Outcome::ConnectFailure,
            Err(_) => Outcome::OtherFailure,
        },
    );
    match status {
        Ok(s) => {
            cluster.stats.responses.record(s);
            cluster.stats.latency.observe(started.elapsed());
        }
        Err(e) => cluster.stats.error(e),
    }
    Ok(status)
}

/// How one try ended, before the response is handed on.
// Lives on the stack for one try; boxing the response would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Try {
    Response(Response<UpstreamBody>),
    Upstream(UpstreamError),
    /// The client's fault: no endpoint is blamed.
    Client(Local),
}

impl<'a> Forward<'a> {
    async fn run(self, mut req: Request<ClientBody>) -> Result<Response<ResponseBody>, Local> {
        let limits = &self.shared.limits;
        let upgrade = upgrade::requested(&mut req);
        let (mut parts, incoming) = req.into_parts();
        if incoming.size_hint().lower() > limits.max_request_body as u64 {
            return Err(Local::BodyTooLarge);
        }
        let guard = self.cluster.admit().await.map_err(Local::Upstream)?;
        let cluster = self.cluster;
        // An upgrade goes upstream as HTTP/1.1's, whatever the client spoke.
        let client_h2 = parts.version == Version::HTTP_2 && upgrade.is_none();
        let via = self.upstream_head(&mut parts, upgrade.as_ref())?;
        let (hash_key, set_cookie) = self.hash_key(&parts);
        let mut retries = self.retries(upgrade.is_some());
        let (body, upload, replay) = self.upstream_body(&parts, incoming, upgrade.is_some(), retries.policy.is_some());
        let mut body = Some(body);
        let timing = self.timing();
        let mut avoid = None;
        let mut _retry_guard = None;
        loop {
            let Some((idx, ep_guard)) = cluster.pick(hash_key.as_ref().map(HashKey::as_bytes), avoid) else {
                cluster.stats.error(UpstreamError::NoHealthyUpstream);
                return Err(Local::Upstream(UpstreamError::NoHealthyUpstream));
            };
            let ep = &cluster.endpoints[idx];
            let up = self.upstream_request(&mut parts, body.take(), retries.policy.is_some(), ep)?;
            let try_started = Instant::now();
            let send = cluster.pool_for(client_h2).send(idx, &ep.authority, up);
            tokio::pin!(send);
            let outcome = match timing.wait(send, upload.as_deref()).await {
                Ok(Ok(resp)) if valid_status(resp.status(), upgrade.is_some()) => Try::Response(resp),
                Ok(Ok(_)) => Try::Upstream(UpstreamError::InvalidResponse),
                Ok(Err(e)) => classify(&e, &cluster.spec.name, &ep.key),
                Err(t) => t,
            };
            let status = account(cluster, ep, &outcome, try_started)?;
            if !timing.out_of_time()
                && let Some((g, backoff)) = retries.again(cluster, status, &outcome, replay.as_ref())
            {
                _retry_guard = Some(g);
                body = Some(replay.as_ref().map_or(RequestBody::Empty, Replay::again));
                avoid = Some(idx);
                drop(ep_guard);
                tokio::time::sleep(backoff).await;
                continue;
            }
            if let Some(r) = &replay {
                // A streaming upload goes on without being kept.
                r.settle();
            }
            let mut resp = self.respond(outcome, upgrade, via, (guard, ep_guard))?;
            if let Some(c) = set_cookie {
                resp.headers_mut().append(header::SET_COOKIE, c);
            }
            if self.noting {
                resp.extensions_mut().insert(self.reached(ep, upload));
            }
            return Ok(resp);
        }
    }

    /// The request's body as it goes upstream — streamed and bounded (`upload` notes its
    /// progress), kept when a retry may send it again (`replay`), copied to the route's mirrors
    /// that draw it — or none for an upgrade, whose stream is the tunnel.
    fn upstream_body(
        &self,
        parts: &http::request::Parts,
        incoming: ClientBody,
        upgrade: bool,
        retry: bool,
    ) -> (RequestBody, Option<Arc<body::Upload>>, Option<Replay>) {
        let (mut body, upload) = if incoming.is_end_stream() || upgrade {
            (RequestBody::Empty, None)
        } else {
            let (b, u) = RequestBody::stream(incoming, self.shared.limits.max_request_body);
            (b, Some(u))
        };
        let replay = retry.then(|| body.replayable()).flatten();
        // Each mirror draws its share on its own.
        let copied = |share: u32| !upgrade && fastrand::u32(0..1_000_000) < share;
        for (mirror, _) in self.route.mirrors.iter().filter(|(_, share)| copied(*share)) {
            shadow(mirror.clone(), parts, body.copy().unwrap_or(RequestBody::Empty));
        }
        (body, upload, replay)
    }

    /// What the response carries of the endpoint `ep` that answered, whose request's body
    /// `upload` received.
    fn reached(&self, ep: &Arc<EndpointState>, upload: Option<Arc<body::Upload>>) -> Reached {
        let calls = self
            .listener
            .outbound
            .then(|| self.cluster.callee(ep, self.conn.listener));
        Reached {
            endpoint: ep.clone(),
            calls: calls.flatten().cloned(),
            upload,
        }
    }

    /// The request's consistent-hash key, and the cookie its response sets when the cluster
    /// hashes on one the request lacks.
    fn hash_key(&self, parts: &http::request::Parts) -> (Option<HashKey>, Option<HeaderValue>) {
        let Some(on) = self.cluster.balancer.hash_on() else {
            return (None, None);
        };
        if let Some(input) = &self.cluster.spec.hash_input {
            return hash::input_key(input, parts, self.conn.remote);
        }
        let key = match on {
            HashOn::Header(name) => parts.headers.get(name.as_str()).cloned().map(HashKey::Header),
            HashOn::ClientIp => Some(HashKey::ip(self.conn.remote.ip())),
        };
        (key, None)
    }

    /// The route's retries, else the cluster's; none for an upgrade. Any method is retried, as
    /// by Envoy: the retry conditions say when.
    fn retries(&self, upgrade: bool) -> Retries<'a> {
        let (policy, on) = match &self.route.retry {
            Some((policy, on)) => (Some(policy), on),
            None => (self.cluster.spec.retry.as_ref(), &self.cluster.retry_on),
        };
        Retries {
            policy: policy.filter(|_| !upgrade),
            on,
            attempt: 0,
        }
    }

    fn timing(&self) -> Timing {
        let timeouts = &self.route.timeouts;
        Timing {
            per_try: timeouts
                .per_try_ms(self.cluster.spec.timeouts.read_ms)
                .map(Duration::from_millis),
            deadline: timeouts
                .request_ms
                .map(|ms| tokio::time::Instant::now() + Duration::from_millis(ms)),
            body_idle: self.shared.limits.request_body_idle_timeout,
        }
    }

    /// The request of one try. Its head is cloned when a retry may need it again.
    fn upstream_request(
        &self,
        parts: &mut http::request::Parts,
        body: Option<RequestBody>,
        keep_head: bool,
        ep: &EndpointState,
    ) -> Result<Request<RequestBody>, Local> {
        let mut up = Request::new(body.unwrap_or(RequestBody::Empty));
        *up.method_mut() = parts.method.clone();
        *up.uri_mut() = match parts.uri.path_and_query() {
            Some(pq) if pq.as_str() != "/" => Uri::from(pq.clone()),
            _ => Uri::default(),
        };
        *up.version_mut() = Version::HTTP_11;
        *up.headers_mut() = if keep_head {
            parts.headers.clone()
        } else {
            std::mem::take(&mut parts.headers)
        };
        if self.host_value.is_none() {
            // HTTP/1.0 without Host: the upstream still gets one.
            up.headers_mut().insert(
                header::HOST,
                HeaderValue::from_str(&ep.key).map_err(|_| Local::BadHost)?,
            );
        }
        Ok(up)
    }

    /// Hands the try that ended the request to the client: a response (or a switched
    /// protocol, which keeps the guards for the tunnel's life), else the error.
    fn respond(
        &self,
        outcome: Try,
        upgrade: Option<upgrade::Upgrade>,
        via: &'static str,
        guards: (RequestGuard, EndpointGuard),
    ) -> Result<Response<ResponseBody>, Local> {
        match outcome {
            Try::Response(resp) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
                let up = upgrade.expect("a 101 is valid only for an upgrade");
                let idle = Duration::from_millis(self.cluster.spec.timeouts.idle_ms);
                Ok(up.switch(resp, via, idle, guards))
            }
            Try::Response(resp) => {
                let idle = self.shared.limits.stream_idle_timeout;
                Ok(downstream_response(resp, via, idle, guards))
            }
            Try::Upstream(e) => Err(Local::Upstream(e)),
            Try::Client(l) => Err(l),
        }
    }

    /// The upstream request's head: hop-by-hop headers out, forwarding headers in, Host, cookie
    /// crumbs joined, rewrites and header filters applied. Returns the `Via` value.
    fn upstream_head(
        &self,
        parts: &mut http::request::Parts,
        upgrade: Option<&upgrade::Upgrade>,
    ) -> Result<&'static str, Local> {
        headers::strip_hop_by_hop(&mut parts.headers, true);
        if let Some(u) = upgrade {
            u.upstream_head(parts);
        }
        let h = &mut parts.headers;
        // Room for the five this adds (X-Forwarded-For, -Proto, -Host, Via, Host): a full
        // HeaderMap grows (rehashes, reallocates) before any insert, even one that replaces.
        h.reserve(5);
        let via = if parts.version == Version::HTTP_2 {
            "2 ferrum"
        } else {
            "1.1 ferrum"
        };
        headers::add_forwarded(
            h,
            self.conn.client.ip(),
            self.listener.https,
            self.host_value.as_ref(),
            via,
        );
        if let Some(v) = &self.host_value {
            h.insert(header::HOST, v.clone());
        }
        headers::join_cookies(h);
        if let Some(rw) = &self.route.rewrite {
            if let Some(host) = &rw.hostname
                && let Ok(v) = HeaderValue::from_str(host)
            {
                h.insert(header::HOST, v);
            }
            if let Some(p) = &rw.path {
                let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
                let (path, query) = pq.split_once('?').map_or((pq, None), |(p, q)| (p, Some(q)));
                let mut new = rewritten_path(p, self.route, path);
                if let Some(q) = query {
                    new.push('?');
                    new.push_str(q);
                }
                let mut u = std::mem::take(&mut parts.uri).into_parts();
                u.path_and_query = Some(PathAndQuery::try_from(new).map_err(|_| Local::RouteNotFound)?);
                parts.uri = Uri::from_parts(u).map_err(|_| Local::RouteNotFound)?;
            }
        }
        self.route.request_headers.apply(&mut parts.headers);
        if let Some(b) = self.backend {
            b.request.apply(&mut parts.headers);
        }
        Ok(via)
    }
}

/// A status a client may be sent: 1xx-5xx, and 101 only when the client asked to upgrade.
pub fn valid_status(s: StatusCode, upgrading: bool) -> bool {
    (100..600).contains(&s.as_u16()) && (s != StatusCode::SWITCHING_PROTOCOLS || upgrading)
}

/// The client's part in a failed exchange, if it had one: a body too large, or broken.
pub fn client_fault(e: &(dyn std::error::Error + 'static)) -> Option<Local> {
    if caused_by::<http_body_util::LengthLimitError>(e) {
        return Some(Local::BodyTooLarge);
    }
    caused_by::<body::ClientBodyError>(e).then_some(Local::ClientBody)
}

/// Whose fault a failed try was.
fn classify(e: &PoolError, cluster: &str, endpoint: &str) -> Try {
    if let Some(local) = client_fault(e) {
        return Try::Client(local);
    }
    if caused_by::<MaxConnections>(e) {
        return Try::Upstream(UpstreamError::Overflow);
    }
    tracing::debug!(cluster, endpoint, error = ?e, "upstream request failed");
    Try::Upstream(if e.is_connect() {
        UpstreamError::ConnectFailure
    } else {
        UpstreamError::Reset
    })
}

fn downstream_response(
    resp: Response<UpstreamBody>,
    via: &'static str,
    idle: Option<Duration>,
    (guard, ep_guard): (RequestGuard, EndpointGuard),
) -> Response<ResponseBody> {
    let (mut rp, body) = resp.into_parts();
    headers::downstream_response(&mut rp.headers);
    rp.headers.append(header::VIA, HeaderValue::from_static(via));
    Response::from_parts(
        rp,
        ResponseBody::Upstream {
            body,
            stall: crate::limits::Stall::new(idle),
            _request: guard,
            _endpoint: ep_guard,
        },
    )
}

/// A request's retry policy, its conditions and the tries made so far.
struct Retries<'a> {
    policy: Option<&'a ferrum_snapshot::model::RetryPolicy>,
    on: &'a crate::upstream::retry::RetryOn,
    attempt: u32,
}

impl Retries<'_> {
    /// Another try, when the policy has one left, the outcome is one it retries, the body can be
    /// sent again and the cluster's retry budget allows: its guard and the backoff (full jitter
    /// on an exponential backoff) to wait first.
    fn again(
        &mut self,
        cluster: &Arc<ClusterRuntime>,
        status: Result<u16, UpstreamError>,
        outcome: &Try,
        replay: Option<&Replay>,
    ) -> Option<(crate::upstream::RetryGuard, Duration)> {
        let policy = self.policy.filter(|p| self.attempt < p.attempts)?;
        let retried =
            self.on.matches(status) || matches!(outcome, Try::Response(r) if self.on.matches_grpc(r.headers()));
        if !retried || !replayable(cluster, replay) {
            return None;
        }
        let guard = cluster.try_retry(policy)?;
        self.attempt += 1;
        let cap = policy.backoff_base_ms.saturating_mul(1 << self.attempt.min(6));
        Some((guard, Duration::from_millis(fastrand::u64(0..=cap))))
    }
}

/// The clocks of one forwarded request.
struct Timing {
    /// Per try, counted from when the client's body is complete; `None`: no limit.
    per_try: Option<Duration>,
    /// The route's whole-request deadline.
    deadline: Option<tokio::time::Instant>,
    /// Longest pause in the client's upload.
    body_idle: Duration,
}

/// Waits for an application's response head (a sidecar's inbound request): no response timeout
/// but the app's own, while the client's upload may pause at most `body_idle` (then 408).
pub async fn await_app<F: std::future::Future>(
    fut: std::pin::Pin<&mut F>,
    upload: Option<&body::Upload>,
    body_idle: Duration,
) -> Result<F::Output, Local> {
    let timing = Timing {
        per_try: None,
        deadline: None,
        body_idle,
    };
    timing.wait(fut, upload).await.map_err(|t| match t {
        Try::Client(local) => local,
        Try::Upstream(e) => Local::Upstream(e),
        Try::Response(..) => Local::Upstream(UpstreamError::InvalidResponse),
    })
}

impl Timing {
    fn out_of_time(&self) -> bool {
        self.deadline.is_some_and(|d| tokio::time::Instant::now() >= d)
    }

    /// Waits for the upstream's response head. The per-try timeout runs once the upload is done;
    /// an upload that pauses longer than `body_idle` is the client's timeout. `fut` comes pinned:
    /// taken by value and pinned here, it would be held twice in this future's state (the
    /// argument and the pinned local), and every request's future moves several times.
    async fn wait<F: std::future::Future>(
        &self,
        mut fut: std::pin::Pin<&mut F>,
        upload: Option<&body::Upload>,
    ) -> Result<F::Output, Try> {
        use tokio::time::Instant;
        let mut since = Instant::now();
        loop {
            let uploading = upload.is_some_and(|u| !u.done());
            let mut at = if uploading {
                Instant::now()
                    + self
                        .body_idle
                        .saturating_sub(upload.map_or(Duration::ZERO, |u| u.idle()))
            } else {
                match self.per_try {
                    Some(t) => since + t,
                    // Unbounded: only the route's deadline (if any) ends the wait.
                    None => match self.deadline {
                        Some(d) => d,
                        None => return Ok(fut.await),
                    },
                }
            };
            if let Some(d) = self.deadline {
                at = at.min(d);
            }
            tokio::select! {
                r = &mut fut => return Ok(r),
                _ = tokio::time::sleep_until(at) => {}
            }
            let now = Instant::now();
            let done = upload.is_none_or(|u| u.done());
            if self.deadline.is_some_and(|d| now >= d) || (done && !uploading) {
                return Err(if done {
                    Try::Upstream(UpstreamError::Timeout)
                } else {
                    Try::Client(Local::ClientBodyTimeout)
                });
            }
            if !done && upload.is_some_and(|u| u.idle() >= self.body_idle) {
                return Err(Try::Client(Local::ClientBodyTimeout));
            }
            if done && uploading {
                // The upload ended while we slept: the response clock starts now.
                since = Instant::now() - upload.map_or(Duration::ZERO, |u| u.idle());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mirrored_copy_says_so_in_its_host() {
        assert_eq!(shadow_host("svc-b.shop.svc"), "svc-b.shop.svc-shadow");
        assert_eq!(shadow_host("svc-b.shop.svc:8080"), "svc-b.shop.svc-shadow:8080");
        assert_eq!(shadow_host("[fd00::1]:80"), "[fd00::1]-shadow:80");
        assert_eq!(shadow_host("[fd00::1]"), "[fd00::1]-shadow");
    }

    /// The size of the future `f` returns, without calling it.
    fn returned_size<A, B, C, R>(_: &impl Fn(A, B, C) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    #[test]
    fn a_request_future_stays_small() {
        // Every request's future is moved into its task (and boxed, for HTTP/2): waiting on the
        // upstream's response must hold the send future once, not twice (it was 6,640 bytes).
        let size = returned_size(&handle);
        assert!(size <= 6000, "proxy::handle's future is {size} bytes");
        let timing = Timing {
            per_try: None,
            deadline: None,
            body_idle: Duration::ZERO,
        };
        let inner = std::pin::pin!(async { std::hint::black_box([0u8; 1024]) });
        let wait = std::mem::size_of_val(&timing.wait(inner, None));
        assert!(wait < 512, "Timing::wait's future is {wait} bytes");
    }

    #[test]
    fn the_target_authority_is_the_host() {
        let req = |v: Version, uri: &str, hosts: &[&str]| {
            let mut r = Request::builder().version(v).uri(uri);
            for h in hosts {
                r = r.header(header::HOST, *h);
            }
            r.body(()).unwrap()
        };
        let host = |r: Request<()>| request_host(&r).map(|h| h.map(|v| v.to_str().unwrap().to_string()));
        // HTTP/2: `:authority` wins over a `host` header.
        assert_eq!(
            host(req(Version::HTTP_2, "http://a.test/x", &["b.test"]))
                .unwrap()
                .unwrap(),
            "a.test"
        );
        // HTTP/1.1 absolute form: the target's authority wins.
        assert_eq!(
            host(req(Version::HTTP_11, "http://a.test:8080/x", &["b.test"]))
                .unwrap()
                .unwrap(),
            "a.test:8080"
        );
        assert_eq!(
            host(req(Version::HTTP_11, "/x", &["b.test"])).unwrap().unwrap(),
            "b.test"
        );
        assert!(matches!(host(req(Version::HTTP_11, "/x", &[])), Err(Local::BadHost)));
        assert!(matches!(
            host(req(Version::HTTP_11, "/x", &["a", "b"])),
            Err(Local::BadHost)
        ));
        assert!(matches!(
            host(req(Version::HTTP_10, "/x", &["a", "a"])),
            Err(Local::BadHost)
        ));
        assert_eq!(host(req(Version::HTTP_10, "/x", &[])).unwrap(), None);
    }

    #[test]
    fn strips_ports_from_hosts() {
        assert_eq!(strip_port("a.com:8080"), "a.com");
        assert_eq!(strip_port("a.com"), "a.com");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
        assert_eq!(strip_port("a.com:"), "a.com");
        assert_eq!(strip_port("[::1"), "[::1");
        assert_eq!(strip_port("a.com:x1"), "a.com:x1");
    }

    #[test]
    fn prefix_replacement_keeps_segments() {
        assert_eq!(replace_prefix("/api/users", "/api", "/v2"), "/v2/users");
        assert_eq!(replace_prefix("/api", "/api", "/v2"), "/v2");
        assert_eq!(replace_prefix("/api/", "/api", "/"), "/");
        assert_eq!(replace_prefix("/api/x", "/api", "/"), "/x");
        assert_eq!(replace_prefix("/x/y", "/", "/pre"), "/pre/x/y");
    }
}
