//! An external authorization service, over HTTP or gRPC (`envoy.service.auth.v3`), answering
//! as Istio's sample one (`samples/extauthz`) does: a request that carries `x-ext-authz: allow`
//! — as a header, or in the body the check carries — is allowed (200 / OK,
//! `x-ext-authz-check-result: allowed`, and `x-authz-user` set from its `x-user`; over gRPC the
//! result is also added to the client's response); any other is denied (403, a body,
//! `x-ext-authz-check-result: denied`). A path ending in `/error` fails (500 / gRPC INTERNAL)
//! and one ending in `/slow` is answered after two seconds. It keeps what it was asked.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption, QueryParameter};
use envoy_types::pb::envoy::service::auth::v3::authorization_server::{Authorization, AuthorizationServer};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};

pub struct AuthzServer {
    pub addr: SocketAddr,
    asked: Arc<Mutex<Vec<Value>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for AuthzServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl AuthzServer {
    /// On a free loopback port.
    pub async fn start() -> AuthzServer {
        AuthzServer::serve(crate::listen_local().await.into_std().unwrap())
    }

    /// The gRPC service (`Authorization/Check`, h2c) on a free loopback port.
    pub async fn start_grpc() -> AuthzServer {
        AuthzServer::serve_grpc(crate::listen_local().await.into_std().unwrap())
    }

    /// The gRPC service on `listener`.
    pub fn serve_grpc(listener: std::net::TcpListener) -> AuthzServer {
        listener.set_nonblocking(true).unwrap();
        let l = tokio::net::TcpListener::from_std(listener).unwrap();
        let addr = l.local_addr().unwrap();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let svc = AuthorizationServer::new(Grpc(asked.clone()));
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(l))
                .await;
        });
        AuthzServer { addr, asked, task }
    }

    /// On `listener` (bound wherever the caller chose, e.g. in a pod's network namespace).
    pub fn serve(listener: std::net::TcpListener) -> AuthzServer {
        listener.set_nonblocking(true).unwrap();
        let l = tokio::net::TcpListener::from_std(listener).unwrap();
        let addr = l.local_addr().unwrap();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let log = asked.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, peer)) = l.accept().await else { continue };
                let log = log.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let log = log.clone();
                        async move { Ok::<_, Infallible>(answer(req, &log, peer).await) }
                    });
                    let http = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let _ = http.serve_connection(TokioIo::new(s), svc).await;
                });
            }
        });
        AuthzServer { addr, asked, task }
    }

    /// What it was asked, in order: `{"method", "path", "headers": {name: value}, "body"}`
    /// (the body as UTF-8, lossy; over HTTP also `"peer"`: the asking connection's address;
    /// over gRPC also `"source"`: the caller's principal, `"raw"`:
    /// whether the body came as bytes, and `"size"`).
    pub fn asked(&self) -> Vec<Value> {
        self.asked.lock().unwrap().clone()
    }
}

async fn answer(
    req: hyper::Request<hyper::body::Incoming>,
    log: &Mutex<Vec<Value>>,
    peer: SocketAddr,
) -> hyper::Response<Full<Bytes>> {
    let headers: BTreeMap<String, String> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let path = req.uri().path().to_string();
    let method = req.method().to_string();
    let path_and_query = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
    let body = http_body_util::BodyExt::collect(req.into_body())
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .unwrap_or_default();
    let allowed = headers.get("x-ext-authz").map(String::as_str) == Some("allow") || body.contains(ALLOW);
    log.lock().unwrap().push(json!({
        "method": method,
        "path": path_and_query,
        "headers": headers,
        "body": body,
        "peer": peer.to_string(),
    }));
    let reply = |status: u16, body: &'static str| {
        let mut r = hyper::Response::new(Full::new(Bytes::from_static(body.as_bytes())));
        *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
        r
    };
    if path.ends_with("/error") {
        return reply(500, "authorization service failed\n");
    }
    if path.ends_with("/slow") {
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    if allowed {
        let mut r = reply(200, "");
        r.headers_mut()
            .insert("x-ext-authz-check-result", "allowed".parse().unwrap());
        if let Some(v) = headers.get("x-user").and_then(|u| u.parse().ok()) {
            r.headers_mut().insert("x-authz-user", v);
        }
        return r;
    }
    let mut r = reply(
        403,
        "denied by ext_authz for not found header `x-ext-authz: allow` in the request\n",
    );
    r.headers_mut()
        .insert("x-ext-authz-check-result", "denied".parse().unwrap());
    r
}

/// What allows a request when a check's body carries it.
const ALLOW: &str = "x-ext-authz: allow";

struct Grpc(Arc<Mutex<Vec<Value>>>);

#[tonic::async_trait]
impl Authorization for Grpc {
    async fn check(
        &self,
        request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        let attrs = request.into_inner().attributes.unwrap_or_default();
        let http = attrs.request.and_then(|r| r.http).unwrap_or_default();
        let headers: BTreeMap<&str, &str> = http.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let raw = !http.raw_body.is_empty();
        let body = if raw {
            String::from_utf8_lossy(&http.raw_body).into_owned()
        } else {
            http.body.clone()
        };
        self.0.lock().unwrap().push(json!({
            "method": http.method,
            "path": http.path,
            "headers": headers,
            "body": body,
            "raw": raw,
            "size": http.size,
            "source": attrs.source.map(|s| s.principal).unwrap_or_default(),
        }));
        let path = http.path.split('?').next().unwrap_or("");
        if path.ends_with("/error") {
            return Err(tonic::Status::internal("authorization service failed"));
        }
        if path.ends_with("/slow") {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let header = |k: &str, v: &str| HeaderValueOption {
            header: Some(HeaderValue {
                key: k.into(),
                value: v.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let resp = if headers.get("x-ext-authz") == Some(&"allow") || body.contains(ALLOW) {
            let mut set = vec![header("x-ext-authz-check-result", "allowed")];
            if let Some(u) = headers.get("x-user") {
                set.push(header("x-authz-user", u));
            }
            // `x-edit-query: yes`: the query's `secret` removed, `checked=by authz` set.
            let edit = headers.get("x-edit-query") == Some(&"yes");
            CheckResponse {
                status: Some(RpcStatus::default()),
                http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                    headers: set,
                    response_headers_to_add: vec![header("x-ext-authz-check-result", "allowed")],
                    query_parameters_to_set: edit
                        .then(|| QueryParameter {
                            key: "checked".into(),
                            value: "by authz".into(),
                        })
                        .into_iter()
                        .collect(),
                    query_parameters_to_remove: edit.then(|| "secret".to_string()).into_iter().collect(),
                    ..Default::default()
                })),
                ..Default::default()
            }
        } else {
            CheckResponse {
                status: Some(RpcStatus {
                    code: tonic::Code::PermissionDenied as i32,
                    ..Default::default()
                }),
                http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                    status: Some(HttpStatus { code: 403 }),
                    headers: vec![header("x-ext-authz-check-result", "denied")],
                    body: "denied by ext_authz for not found header `x-ext-authz: allow` in the request\n".into(),
                })),
                ..Default::default()
            }
        };
        Ok(tonic::Response::new(resp))
    }
}
