//! The MeshSubscribe gRPC service: every connected proxy gets the latest snapshot for its role,
//! and the operator keeps what each proxy says it applied.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ferrum_proto::SNAPSHOT_SCHEMA;
use ferrum_proto::mesh::v1::mesh_subscribe_server::MeshSubscribe;
use ferrum_proto::mesh::v1::{
    Ack, Heartbeat, Hello, Locality, SubscribeRequest, SubscribeResponse, TlsSecret, subscribe_request,
    subscribe_response,
};
use ferrum_snapshot::Secrets;
use futures_util::Stream;
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status, Streaming};

use crate::ca::service::Authenticator;
use crate::proxies::{Proxies, ProxyState, Registration, now_ms};
use crate::publish::{Encoded, Publisher, Scope, parse_role};

/// How often each side says it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(10);

pub struct Service {
    pub publisher: Arc<Publisher>,
    pub proxies: Arc<Proxies>,
    /// Who may subscribe to what.
    pub access: Arc<Access>,
    /// Snapshot bodies go out in messages of at most this many bytes: gRPC buffers a whole
    /// message per stream (and keeps the buffer), which for 100 proxies and a 10,000-route
    /// snapshot was ~50 MiB held for nothing.
    pub chunk: usize,
}

/// The bearer token of a request, if any.
pub fn bearer(m: &tonic::metadata::MetadataMap) -> Option<&str> {
    m.get("authorization")?.to_str().ok()?.strip_prefix("Bearer ")
}

/// Who may subscribe to what, for MeshSubscribe and ADS alike. A proxy presents the shared
/// `--token` or its ServiceAccount token (a TokenReview says whose it is):
/// - a sidecar only its pod's ServiceAccount token;
/// - a gateway proxy (`gateway/<ns>/<name>`) the shared token, or a ServiceAccount token from
///   the Gateway's namespace or a trusted one;
/// - every Gateway's config (role `""`, and ADS) the shared token, or a ServiceAccount token
///   from a trusted namespace.
///
/// Unless `required` (on by itself when `--token` is set), a gateway proxy that presents nothing
/// is still served: a local setup without credentials. Credentials that do not check out are
/// refused either way.
pub struct Access {
    pub token: Option<String>,
    pub auth: Arc<crate::ca::service::Kubernetes>,
    /// Namespaces whose service accounts may read every Gateway's config (the operator's own).
    pub trusted_namespaces: Vec<String>,
    pub required: bool,
}

impl Access {
    pub async fn check(&self, scope: &Scope, bearer: Option<&str>) -> Result<(), Status> {
        if let Scope::Sidecar { namespace, pod } = scope {
            return self.check_sidecar(namespace, pod, bearer).await;
        }
        let Some(bearer) = bearer else {
            return match self.required || self.token.is_some() {
                true => Err(Status::unauthenticated(
                    "a bearer token is required: the proxy token or a ServiceAccount token",
                )),
                false => Ok(()),
            };
        };
        if self.token.as_deref() == Some(bearer) {
            return Ok(());
        }
        let caller = self.auth.review(bearer).await?;
        let trusted = self.trusted_namespaces.contains(&caller.namespace);
        match scope {
            Scope::Gateway(gw) if trusted || caller.namespace == gw.namespace => Ok(()),
            _ if trusted => Ok(()),
            _ => Err(Status::permission_denied(format!(
                "{}/{} may not read {}",
                caller.namespace,
                caller.service_account,
                match scope {
                    Scope::Gateway(gw) => format!("Gateway {}/{}", gw.namespace, gw.name),
                    _ => "every Gateway's config".into(),
                }
            ))),
        }
    }

    /// The zone of the proxy's pod: a sidecar's (its role), or the pod a Hello names.
    fn zone_of(&self, scope: &Scope, pod: &str) -> Option<String> {
        let (namespace, name) = match scope {
            Scope::Sidecar { namespace, pod } => (namespace.as_str(), pod.as_str()),
            _ => pod.split_once('/')?,
        };
        self.auth.pod_zone(namespace, name)
    }

    /// A sidecar proves it is its pod's workload: the token's namespace and service account
    /// must be the pod's.
    async fn check_sidecar(&self, namespace: &str, pod: &str, bearer: Option<&str>) -> Result<(), Status> {
        let token = bearer.ok_or_else(|| Status::unauthenticated("a sidecar must present its ServiceAccount token"))?;
        let caller = self.auth.review(token).await?;
        let Some(sa) = self.auth.pod_service_account(namespace, pod) else {
            // A sidecar may start before the operator has seen its pod: it is told to come back
            // soon (gRPC's retry pushback), rather than backing off further with each try.
            let mut st = Status::unavailable(format!("pod {namespace}/{pod} is not known (yet)"));
            st.metadata_mut().insert(
                "grpc-retry-pushback-ms",
                tonic::metadata::MetadataValue::from_static("500"),
            );
            return Err(st);
        };
        if caller.namespace != namespace || caller.service_account != sa {
            return Err(Status::permission_denied(format!(
                "the token is {}/{}, pod {namespace}/{pod} runs as {namespace}/{sa}",
                caller.namespace, caller.service_account
            )));
        }
        Ok(())
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<SubscribeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl MeshSubscribe for Service {
    type SubscribeStream = ResponseStream;

    async fn subscribe(&self, req: Request<Streaming<SubscribeRequest>>) -> Result<Response<ResponseStream>, Status> {
        let bearer = bearer(req.metadata()).map(str::to_string);
        let peer = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let mut inbound = req.into_inner();
        let hello = match tokio::time::timeout(Duration::from_secs(10), inbound.message()).await {
            Ok(Ok(Some(SubscribeRequest {
                message: Some(subscribe_request::Message::Hello(h)),
            }))) => h,
            _ => return Err(Status::invalid_argument("the first message must be a Hello")),
        };
        if hello.node_id.is_empty() {
            return Err(Status::invalid_argument("hello.node_id is empty"));
        }
        let role = parse_role(&hello.role).map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.access.check(&role, bearer.as_deref()).await?;
        let reg = self.proxies.register(ProxyState::hello(&hello, peer))?;
        tracing::info!(node = %hello.node_id, role = %hello.role, "proxy subscribed");
        // One slot: while the proxy is slow the slot stays taken, generations coalesce in the
        // watch, and the proxy gets the newest snapshot once it catches up.
        let (tx, rx) = mpsc::channel::<Result<SubscribeResponse, Status>>(1);
        if let Some(zone) = self.access.zone_of(&role, &hello.pod) {
            // First, so the proxy balances by it from its first snapshot on.
            let locality = subscribe_response::Message::Locality(Locality { zone });
            let _ = tx
                .send(Ok(SubscribeResponse {
                    message: Some(locality),
                }))
                .await;
        }
        let session = Session {
            reg,
            publisher: self.publisher.clone(),
            role,
            chunk: self.chunk,
            tx,
            last_sent_hash: hello.current_hash,
            sent_delta: false,
            sent_secrets: HashMap::new(),
        };
        tokio::spawn(session.run(inbound));
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

impl ProxyState {
    fn hello(hello: &Hello, peer: String) -> Self {
        ProxyState {
            applied_version: hello.current_version,
            applied_hash: hello.current_hash.clone(),
            ..ProxyState::connected(&hello.node_id, &hello.role, &hello.proxy_version, peer, "MeshSubscribe")
        }
    }
}

/// One subscribed proxy: what its stream last sent it, and where its messages go.
struct Session {
    reg: Registration,
    publisher: Arc<Publisher>,
    role: Scope,
    chunk: usize,
    tx: mpsc::Sender<Result<SubscribeResponse, Status>>,
    last_sent_hash: String,
    sent_delta: bool,
    /// What the proxy holds of the secrets we sent: those its last snapshot named.
    sent_secrets: HashMap<String, String>,
}

/// The stream has ended (the proxy went away); the session stops.
struct Closed;

impl Session {
    async fn run(mut self, mut inbound: Streaming<SubscribeRequest>) {
        let mut generations = self.publisher.subscribe();
        let mut beat = tokio::time::interval(HEARTBEAT);
        generations.mark_changed();
        loop {
            let step = tokio::select! {
                r = generations.changed() => match r {
                    Ok(()) => self.send_update(&mut generations).await,
                    Err(_) => Err(Closed),
                },
                m = inbound.message() => match m {
                    Ok(Some(SubscribeRequest { message: Some(subscribe_request::Message::Ack(ack)) })) => {
                        self.on_ack(&ack, &mut generations);
                        Ok(())
                    }
                    Ok(Some(_)) => {
                        self.reg.update(|p| p.last_seen_unix_ms = now_ms());
                        Ok(())
                    }
                    Ok(None) | Err(_) => Err(Closed),
                },
                _ = beat.tick() => self.heartbeat(),
            };
            if step.is_err() {
                return;
            }
        }
    }

    /// Sends the newest snapshot for this role (a delta when the proxy holds its base): key
    /// pairs first, then the body in chunks.
    async fn send_update(&mut self, generations: &mut watch::Receiver<u64>) -> Result<(), Closed> {
        let permit = self.tx.reserve().await.map_err(|_| Closed)?;
        generations.mark_unchanged();
        let Some(snap) = self.publisher.update_for(&self.role, &self.last_sent_hash) else {
            return Ok(());
        };
        if snap.hash == self.last_sent_hash {
            return Ok(());
        }
        self.last_sent_hash = snap.hash.clone();
        self.sent_delta = snap.base.is_some();
        let sent_delta = self.sent_delta;
        self.reg.update(|p| {
            p.sent_version = snap.version;
            if sent_delta {
                p.deltas_sent += 1
            } else {
                p.full_sent += 1
            }
        });
        // Key pairs first: the snapshot that names them must find them there.
        let unsent = unsent_secrets(&snap.secrets, &self.sent_secrets);
        self.sent_secrets = snap.secrets.iter().map(|(n, s)| (n.clone(), s.digest())).collect();
        let permit = match unsent {
            Some(m) => {
                permit.send(Ok(m));
                self.tx.reserve().await.map_err(|_| Closed)?
            }
            None => permit,
        };
        let body_len = snap.body.len();
        let mut starts = (0..body_len.max(1)).step_by(self.chunk).peekable();
        let chunk = |at: usize| snap.body.slice(at..(at + self.chunk).min(body_len));
        let first = starts.next().expect("at least one chunk");
        permit.send(Ok(snapshot_message(
            &snap,
            sent_delta,
            chunk(first),
            starts.peek().is_some(),
        )));
        while let Some(at) = starts.next() {
            let message = snapshot_message(&snap, sent_delta, chunk(at), starts.peek().is_some());
            self.tx.send(Ok(message)).await.map_err(|_| Closed)?;
        }
        Ok(())
    }

    fn on_ack(&mut self, ack: &Ack, generations: &mut watch::Receiver<u64>) {
        self.reg.update(|p| {
            p.last_seen_unix_ms = now_ms();
            if ack.applied {
                p.applied_version = ack.version;
                p.applied_hash = ack.hash.clone();
            } else {
                p.rejected_version = Some(ack.version);
                p.last_rejection = Some(ack.error.clone());
            }
        });
        if !ack.applied {
            tracing::warn!(node = %self.reg.key.0, version = ack.version, error = %ack.error, "proxy rejected snapshot");
            // It still has an older snapshot: no delta fits it any more. A delta it could not
            // use is followed by the full snapshot at once; a full snapshot it rejected waits
            // for the next generation.
            self.last_sent_hash.clear();
            if ack.resync && self.sent_delta {
                generations.mark_changed();
            }
        }
    }

    /// A heartbeat when the slot is free; a busy slot already tells the proxy we are alive.
    fn heartbeat(&self) -> Result<(), Closed> {
        let beat = SubscribeResponse {
            message: Some(subscribe_response::Message::Heartbeat(Heartbeat {
                unix_millis: now_ms(),
            })),
        };
        match self.tx.try_send(Ok(beat)) {
            Err(_) if self.tx.is_closed() => Err(Closed),
            _ => Ok(()),
        }
    }
}

/// One chunk of a snapshot (full or delta); `more` when further chunks follow.
fn snapshot_message(snap: &Encoded, delta: bool, body: bytes::Bytes, more: bool) -> SubscribeResponse {
    let (base_version, base_hash) = snap.base.clone().unwrap_or_default();
    SubscribeResponse {
        message: Some(subscribe_response::Message::Snapshot(
            ferrum_proto::mesh::v1::Snapshot {
                version: snap.version,
                hash: snap.hash.clone(),
                body,
                schema: SNAPSHOT_SCHEMA.into(),
                encoding: crate::publish::ENCODING.into(),
                delta,
                base_version,
                base_hash,
                more,
            },
        )),
    }
}

/// The key pairs in `need` this stream has not sent at their current content, as one message.
fn unsent_secrets(need: &Secrets, sent: &HashMap<String, String>) -> Option<SubscribeResponse> {
    let items: Vec<TlsSecret> = need
        .iter()
        .filter(|(n, s)| sent.get(*n) != Some(&s.digest()))
        .map(|(n, s)| TlsSecret {
            name: n.clone(),
            cert_pem: s.cert.clone(),
            key_pem: s.key.clone(),
        })
        .collect();
    (!items.is_empty()).then(|| SubscribeResponse {
        message: Some(subscribe_response::Message::Secrets(ferrum_proto::mesh::v1::Secrets {
            items,
        })),
    })
}
