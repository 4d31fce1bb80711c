//! Watches the cluster (one reflector per kind), and after each burst of changes translates the
//! cached objects with the shared translator and publishes the result.

use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrum_snapshot::Resources;
use ferrum_snapshot::crd::{Backend, BackendPolicy};
use futures_util::StreamExt;
use gateway_api::gatewayclasses::GatewayClass;
use gateway_api::gateways::Gateway;
use gateway_api::grpcroutes::GrpcRoute;
use gateway_api::httproutes::HttpRoute;
use gateway_api::referencegrants::ReferenceGrant;
use k8s_openapi::api::core::v1::{Namespace, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use crate::publish::Publisher;

/// Read-only caches of every kind the translator reads.
#[derive(Clone)]
pub struct Stores {
    gateway_classes: Store<GatewayClass>,
    gateways: Store<Gateway>,
    http_routes: Store<HttpRoute>,
    grpc_routes: Store<GrpcRoute>,
    reference_grants: Store<ReferenceGrant>,
    services: Store<Service>,
    endpoint_slices: Store<EndpointSlice>,
    namespaces: Store<Namespace>,
    secrets: Store<Secret>,
    backends: Store<Backend>,
    backend_policies: Store<BackendPolicy>,
}

/// The cached objects themselves (shared, not copied).
fn copy<K>(s: &Store<K>) -> Vec<Arc<K>>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    s.state()
}

impl Stores {
    /// A consistent-enough view of the caches for one translation.
    pub fn resources(&self) -> Resources {
        Resources {
            gateway_classes: copy(&self.gateway_classes),
            gateways: copy(&self.gateways),
            http_routes: copy(&self.http_routes),
            grpc_routes: copy(&self.grpc_routes),
            reference_grants: copy(&self.reference_grants),
            services: copy(&self.services),
            endpoint_slices: copy(&self.endpoint_slices),
            namespaces: copy(&self.namespaces),
            secrets: copy(&self.secrets),
            backends: copy(&self.backends),
            backend_policies: copy(&self.backend_policies),
            origins: Default::default(),
        }
    }
}

/// Starts a reflector for `K` that pokes `changed` on every event, except, for kinds whose status
/// the operator writes (`status_written`), updates that leave `metadata.generation` as it was:
/// those are status writes (ours, mostly) and change nothing the translator reads.
fn watch<K>(
    client: &Client,
    changed: &mpsc::Sender<()>,
    ready: &mpsc::Sender<&'static str>,
    status_written: bool,
) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    let api: Api<K> = Api::all(client.clone());
    let (store, writer) = reflector::store();
    let kind = K::kind(&K::DynamicType::default()).to_string();
    // Nothing reads managedFields or kubectl's last-applied copy of the object, and in a real
    // cluster they are often most of an object's size.
    let stream = watcher(api, watcher::Config::default())
        .modify(|o: &mut K| {
            o.meta_mut().managed_fields = None;
            if let Some(a) = &mut o.meta_mut().annotations {
                a.remove("kubectl.kubernetes.io/last-applied-configuration");
            }
        })
        .reflect(writer)
        .default_backoff()
        .boxed();
    let (changed, ready) = (changed.clone(), ready.clone());
    let name: &'static str = Box::leak(kind.into_boxed_str());
    tokio::spawn(async move {
        let mut stream = stream;
        let mut announced = false;
        let mut generations: std::collections::HashMap<String, i64> = Default::default();
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(ev) => {
                    if !announced && matches!(ev, watcher::Event::InitDone) {
                        announced = true;
                        let _ = ready.send(name).await;
                    }
                    if status_written
                        && let watcher::Event::Apply(o) | watcher::Event::InitApply(o) = &ev
                        && let (Some(uid), Some(generation)) = (o.meta().uid.clone(), o.meta().generation)
                        && generations.insert(uid, generation) == Some(generation)
                    {
                        continue;
                    }
                    if let watcher::Event::Delete(o) = &ev
                        && let Some(uid) = &o.meta().uid
                    {
                        generations.remove(uid);
                    }
                    let _ = changed.try_send(());
                }
                Err(e) => tracing::warn!(kind = name, error = %e, "watch failed; retrying"),
            }
        }
    });
    store
}

pub struct Controller {
    pub stores: Stores,
    changed: mpsc::Receiver<()>,
}

impl Controller {
    /// Starts every watch and waits until each has listed once.
    pub async fn start(client: Client) -> Controller {
        let (ctx, crx) = mpsc::channel(1);
        let (rtx, mut rrx) = mpsc::channel(16);
        let stores = Stores {
            gateway_classes: watch(&client, &ctx, &rtx, true),
            gateways: watch(&client, &ctx, &rtx, true),
            http_routes: watch(&client, &ctx, &rtx, true),
            grpc_routes: watch(&client, &ctx, &rtx, true),
            reference_grants: watch(&client, &ctx, &rtx, false),
            services: watch(&client, &ctx, &rtx, false),
            endpoint_slices: watch(&client, &ctx, &rtx, false),
            namespaces: watch(&client, &ctx, &rtx, false),
            secrets: watch(&client, &ctx, &rtx, false),
            backends: watch(&client, &ctx, &rtx, false),
            backend_policies: watch(&client, &ctx, &rtx, false),
        };
        let mut pending = 11;
        while pending > 0 {
            match tokio::time::timeout(Duration::from_secs(30), rrx.recv()).await {
                Ok(Some(kind)) => {
                    tracing::debug!(kind, "initial list done");
                    pending -= 1;
                }
                _ => {
                    tracing::warn!(pending, "some watches have not listed yet; translating what is there");
                    break;
                }
            }
        }
        Controller { stores, changed: crx }
    }

    /// Translates after every burst of changes (coalesced for `debounce`), forever.
    pub async fn run(mut self, publisher: Arc<Publisher>, debounce: Duration) {
        publisher.publish(self.stores.resources());
        while self.changed.recv().await.is_some() {
            tokio::time::sleep(debounce).await;
            while self.changed.try_recv().is_ok() {}
            let started = Instant::now();
            let res = self.stores.resources();
            let copied_ms = started.elapsed().as_millis() as u64;
            if publisher.publish(res) {
                tracing::info!(copied_ms, total_ms = started.elapsed().as_millis() as u64, "published");
            }
        }
    }
}
