//! Leader election on a `coordination.k8s.io/v1` Lease: only the leader writes status; every
//! replica serves proxies. Renewal is a replace with the Lease's resourceVersion, so two
//! replicas racing for an expired Lease cannot both win.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};

pub struct Election {
    pub api: Api<Lease>,
    pub name: String,
    pub identity: String,
    pub lease: Duration,
}

impl Election {
    /// Campaigns forever, keeping `leader` up to date.
    pub async fn run(self, leader: Arc<AtomicBool>) {
        let retry = self.lease / 3;
        let mut last_renewed = tokio::time::Instant::now();
        loop {
            match self.try_acquire().await {
                Ok(true) => {
                    last_renewed = tokio::time::Instant::now();
                    if !leader.swap(true, Relaxed) {
                        tracing::info!(identity = %self.identity, lease = %self.name, "became leader");
                    }
                }
                Ok(false) => {
                    if leader.swap(false, Relaxed) {
                        tracing::warn!(identity = %self.identity, "lost leadership");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "lease update failed");
                    // Without a renewal for a whole lease, another replica may lead: step down.
                    if last_renewed.elapsed() >= self.lease && leader.swap(false, Relaxed) {
                        tracing::warn!(identity = %self.identity, "stepped down: lease not renewed in time");
                    }
                }
            }
            tokio::time::sleep(retry).await;
        }
    }

    async fn try_acquire(&self) -> Result<bool, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let secs = self.lease.as_secs() as i32;
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let mine = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(secs)));
        let expired = spec
            .renew_time
            .as_ref()
            .is_none_or(|t| t.0.checked_add(duration).is_ok_and(|until| until < now.0));
        if !mine && !expired {
            return Ok(false);
        }
        if !mine {
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(now);
        spec.lease_duration_seconds = Some(secs);
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}
