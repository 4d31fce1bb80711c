//! `istio.v1.auth.IstioCertificateService/CreateCertificate`: who is asking comes from a
//! TokenReview of the bearer ServiceAccount token — never from the CSR — and a node proxy may ask
//! for a pod on its node only when its service account is trusted for that.

use std::sync::Arc;
use std::time::Duration;

use ferrum_proto::istio::v1::auth::istio_certificate_service_server::IstioCertificateService;
use ferrum_proto::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};
use ferrum_snapshot::identity::SpiffeId;
use ferrum_snapshot::istio::WorkloadEntry;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, PostParams};
use kube::runtime::reflector::{ObjectRef, Store};
use tonic::{Request, Response, Status};

use super::Authority;

/// Who a TokenReview says the caller is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub namespace: String,
    pub service_account: String,
    pub node: Option<String>,
}

/// Checks bearer tokens; the Kubernetes one asks the API server (TokenReview).
#[tonic::async_trait]
pub trait Authenticator: Send + Sync + 'static {
    async fn review(&self, token: &str) -> Result<Caller, Status>;
    /// Whether a pod running as `id` is on `node`.
    async fn runs_on(&self, id: &SpiffeId, node: &str) -> Result<bool, Status>;
}

pub struct Kubernetes {
    pub client: kube::Client,
    workloads: Workloads,
    /// The audience tokens must be minted for (projected ServiceAccount tokens).
    pub audience: String,
    /// Recent successful reviews by token hash: a proxy renewing, or many pods of one service
    /// account starting, cost one TokenReview per `REVIEW_TTL`, not one per CSR.
    reviewed: std::sync::Mutex<std::collections::HashMap<[u8; 32], (Caller, std::time::Instant)>>,
}

/// How long a successful review is reused (a revoked token stays usable this long at most).
const REVIEW_TTL: Duration = Duration::from_secs(30);
/// Most remembered reviews; beyond it expired ones go, then all.
const MAX_REVIEWED: usize = 10_000;

/// The operator's caches (watches) of what workloads run as and where.
pub struct Workloads {
    /// Pods: a sidecar's service account, node proxies' claims.
    pub pods: Store<Pod>,
    /// Nodes: a pod's zone.
    pub nodes: Store<Node>,
    /// WorkloadEntries: a VM's sidecar subscribes as one.
    pub entries: Store<WorkloadEntry>,
}

impl Kubernetes {
    pub fn new(client: kube::Client, audience: String, workloads: Workloads) -> Self {
        Kubernetes {
            client,
            workloads,
            audience,
            reviewed: Default::default(),
        }
    }

    fn remembered(&self, key: &[u8; 32]) -> Option<Caller> {
        let m = self.reviewed.lock().unwrap();
        m.get(key)
            .filter(|(_, at)| at.elapsed() < REVIEW_TTL)
            .map(|(c, _)| c.clone())
    }

    fn remember(&self, key: [u8; 32], caller: &Caller) {
        let mut m = self.reviewed.lock().unwrap();
        if m.len() >= MAX_REVIEWED {
            m.retain(|_, (_, at)| at.elapsed() < REVIEW_TTL);
            if m.len() >= MAX_REVIEWED {
                m.clear();
            }
        }
        m.insert(key, (caller.clone(), std::time::Instant::now()));
    }

    async fn token_review(&self, token: &str) -> Result<Caller, Status> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let answer = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Status::unavailable(format!("TokenReview failed: {e}")))?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status.error.unwrap_or_else(|| "not authenticated".into());
            return Err(Status::unauthenticated(format!("token rejected: {why}")));
        }
        if !status.audiences.unwrap_or_default().contains(&self.audience) {
            return Err(Status::unauthenticated(format!(
                "token is not for audience {:?}",
                self.audience
            )));
        }
        let user = status.user.unwrap_or_default();
        let name = user.username.unwrap_or_default();
        let Some(sa) = name.strip_prefix("system:serviceaccount:") else {
            return Err(Status::permission_denied(format!("{name:?} is not a service account")));
        };
        let Some((namespace, service_account)) = sa.split_once(':') else {
            return Err(Status::permission_denied(format!("{name:?} is not a service account")));
        };
        let node = user
            .extra
            .unwrap_or_default()
            .get("authentication.kubernetes.io/node-name")
            .and_then(|v| v.first().cloned());
        Ok(Caller {
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
            node,
        })
    }
}

impl Kubernetes {
    /// The zone of workload `namespace/name`: a pod's node's, else a WorkloadEntry's locality.
    pub fn pod_zone(&self, namespace: &str, name: &str) -> Option<String> {
        let key = ObjectRef::new(name).within(namespace);
        let Some(pod) = self.workloads.pods.get(&key) else {
            let entry = self.workloads.entries.get(&ObjectRef::new(name).within(namespace))?;
            return ferrum_snapshot::translate::locality_zone(entry.spec.locality.as_deref());
        };
        let node_name = pod.spec.as_ref()?.node_name.clone()?;
        let node = self.workloads.nodes.get(&ObjectRef::new(&node_name))?;
        ferrum_snapshot::translate::node_zone(&node).map(String::from)
    }

    /// The service account workload `namespace/name` runs as — a pod's, else a WorkloadEntry's
    /// (a VM's sidecar subscribes under its entry's name) — if the operator's caches have it.
    pub fn pod_service_account(&self, namespace: &str, name: &str) -> Option<String> {
        let key = ObjectRef::new(name).within(namespace);
        let account = match self.workloads.pods.get(&key) {
            Some(pod) => pod.spec.as_ref().and_then(|s| s.service_account_name.clone()),
            None => {
                let entry = self.workloads.entries.get(&ObjectRef::new(name).within(namespace))?;
                entry.spec.service_account.clone()
            }
        };
        Some(account.filter(|s| !s.is_empty()).unwrap_or_else(|| "default".into()))
    }
}

#[tonic::async_trait]
impl<A: Authenticator> Authenticator for std::sync::Arc<A> {
    async fn review(&self, token: &str) -> Result<Caller, Status> {
        (**self).review(token).await
    }
    async fn runs_on(&self, id: &SpiffeId, node: &str) -> Result<bool, Status> {
        (**self).runs_on(id, node).await
    }
}

#[tonic::async_trait]
impl Authenticator for Kubernetes {
    async fn review(&self, token: &str) -> Result<Caller, Status> {
        use sha2::Digest;
        let key: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        if let Some(c) = self.remembered(&key) {
            return Ok(c);
        }
        let caller = self.token_review(token).await?;
        self.remember(key, &caller);
        Ok(caller)
    }

    async fn runs_on(&self, id: &SpiffeId, node: &str) -> Result<bool, Status> {
        Ok(self.workloads.pods.state().iter().any(|p| {
            p.metadata.namespace.as_deref() == Some(id.namespace.as_str())
                && p.spec.as_ref().is_some_and(|s| {
                    s.node_name.as_deref() == Some(node)
                        && s.service_account_name.as_deref().unwrap_or("default") == id.service_account
                })
        }))
    }
}

pub struct CaService<A> {
    pub ca: Arc<Authority>,
    pub auth: A,
    pub trust_domain: String,
    /// `namespace/serviceaccount` of node proxies that may ask for pods on their node.
    pub node_proxies: Vec<String>,
}

/// Shortest validity handed out: rotation at half-life must stay possible.
const MIN_VALIDITY: Duration = Duration::from_secs(10);

impl<A: Authenticator> CaService<A> {
    /// The identity to issue for: the caller's own, or (node proxies) a pod's on its node.
    async fn identity(&self, caller: &Caller, req: &IstioCertificateRequest) -> Result<SpiffeId, Status> {
        let own = SpiffeId::new(&self.trust_domain, &caller.namespace, &caller.service_account);
        let impersonated = req
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get("ImpersonatedIdentity"))
            .and_then(|v| match &v.kind {
                Some(prost_types::value::Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            });
        let Some(wanted) = impersonated else {
            return Ok(own);
        };
        let id: SpiffeId = wanted.parse().map_err(|e| Status::invalid_argument(format!("{e}")))?;
        if id.trust_domain != self.trust_domain {
            return Err(Status::permission_denied(format!(
                "{id} is not in trust domain {}",
                self.trust_domain
            )));
        }
        let who = format!("{}/{}", caller.namespace, caller.service_account);
        if !self.node_proxies.contains(&who) {
            return Err(Status::permission_denied(format!(
                "{who} may not ask for other identities"
            )));
        }
        let Some(node) = &caller.node else {
            return Err(Status::permission_denied("the caller's token names no node"));
        };
        if !self.auth.runs_on(&id, node).await? {
            return Err(Status::permission_denied(format!("no pod of {id} runs on node {node}")));
        }
        Ok(id)
    }
}

#[tonic::async_trait]
impl<A: Authenticator> IstioCertificateService for CaService<A> {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("missing authorization: Bearer <ServiceAccount token>"))?
            .to_string();
        let caller = self.auth.review(&token).await?;
        let req = request.into_inner();
        let id = self.identity(&caller, &req).await?;
        let asked = u64::try_from(req.validity_duration).unwrap_or(0);
        let validity = match asked {
            0 => self.ca.max_validity,
            s => Duration::from_secs(s).clamp(MIN_VALIDITY, self.ca.max_validity),
        };
        let chain = self
            .ca
            .sign_csr(&req.csr, &id, validity)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        tracing::debug!(%id, ?validity, "issued an SVID");
        Ok(Response::new(IstioCertificateResponse { cert_chain: chain }))
    }
}
