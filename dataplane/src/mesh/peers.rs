//! Who talks to this workload: Istio's standard TCP metrics (`istio_tcp_connections_opened_total`,
//! `istio_tcp_connections_closed_total`, `istio_tcp_received_bytes_total`,
//! `istio_tcp_sent_bytes_total`), for inbound connections by caller (`reporter="destination"`)
//! and for outbound ones by the workload and Service reached (`reporter="source"`), labelled with
//! each side's workload, namespace and SPIFFE ID, so that dashboards and graphs written for
//! Istio read a Ferrum mesh. Requests the sidecar serves one by one are counted too, by response
//! code (`istio_requests_total`, `istio_request_duration_milliseconds`).
//!
//! A workload's name is its controller's, as Istio reports it — found from its pod's labels,
//! since the snapshot does not carry owners: a Deployment's pod `web-7d9f8c6b5-x2k4q` (label
//! `pod-template-hash: 7d9f8c6b5`) is `web`, a StatefulSet's `db-0` is `db`, a DaemonSet's
//! `agent-x2k4q` is `agent`, a Job's is its `job-name`; any other pod is itself.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use ferrum_snapshot::identity::SpiffeId;
use ferrum_snapshot::mesh::{MeshService, Workload};

use crate::telemetry::{BYTES, Histogram, MILLISECONDS};

/// Distinct peers kept at most; past it, new ones are counted as `unknown` (a bound on memory
/// and on the scrape, whatever the peers).
const MAX_PEERS: usize = 4096;

/// Which end of the connection this proxy is, as Istio's `reporter` label says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reporter {
    /// Outbound: this workload called.
    Source,
    /// Inbound: this workload was called.
    Destination,
}

/// One side of a connection, as its labels say it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Party {
    pub workload: String,
    pub namespace: String,
    pub principal: String,
    pub app: String,
    pub version: String,
    pub canonical_service: String,
    pub canonical_revision: String,
}

const UNKNOWN: &str = "unknown";

impl Party {
    /// `w` (when the snapshot knows it) with the identity it proved (when it proved one).
    pub fn of(w: Option<&Workload>, principal: Option<&SpiffeId>) -> Party {
        let label = |keys: &[&str]| w.and_then(|w| keys.iter().find_map(|k| w.labels.get(*k))).cloned();
        let workload = w.map_or_else(|| UNKNOWN.to_string(), controller_name);
        Party {
            namespace: w
                .map(|w| w.namespace.clone())
                .or_else(|| principal.map(|p| p.namespace.clone()))
                .unwrap_or_else(|| UNKNOWN.into()),
            principal: principal.map_or_else(|| UNKNOWN.into(), ToString::to_string),
            app: label(&["app"]).unwrap_or_else(|| UNKNOWN.into()),
            version: label(&["version"]).unwrap_or_else(|| UNKNOWN.into()),
            canonical_service: label(&["service.istio.io/canonical-name", "app.kubernetes.io/name", "app"])
                .unwrap_or_else(|| workload.clone()),
            canonical_revision: label(&[
                "service.istio.io/canonical-revision",
                "app.kubernetes.io/version",
                "version",
            ])
            .unwrap_or_else(|| "latest".into()),
            workload,
        }
    }

    /// Its labels, `cluster` being the mesh's when it is known.
    fn labels(&self, side: &str, cluster: &str, out: &mut Vec<(String, String)>) {
        let fields = [
            ("workload", &self.workload),
            ("workload_namespace", &self.namespace),
            ("principal", &self.principal),
            ("app", &self.app),
            ("version", &self.version),
            ("canonical_service", &self.canonical_service),
            ("canonical_revision", &self.canonical_revision),
        ];
        out.extend(fields.iter().map(|(k, v)| (format!("{side}_{k}"), (*v).clone())));
        let known = self.workload != UNKNOWN || self.principal != UNKNOWN;
        let cluster = if known { cluster } else { UNKNOWN };
        out.push((format!("{side}_cluster"), cluster.into()));
    }
}

/// The name of the controller that made a pod, from the labels controllers put on their pods.
fn controller_name(w: &Workload) -> String {
    let name = w.name.as_str();
    let label = |k: &str| w.labels.get(k).map(String::as_str);
    // `<deployment>-<pod-template-hash>-<5 chars>`.
    if let Some(hash) = label("pod-template-hash")
        && let Some((rest, _)) = name.rsplit_once('-')
        && let Some(deployment) = rest.strip_suffix(hash).and_then(|d| d.strip_suffix('-'))
    {
        return deployment.into();
    }
    if let Some(job) = label("job-name") {
        return job.into();
    }
    if label("controller-revision-hash").is_some()
        && let Some((owner, suffix)) = name.rsplit_once('-')
    {
        // A StatefulSet's `<name>-<ordinal>`, a DaemonSet's `<name>-<5 chars>`.
        let stateful = label("statefulset.kubernetes.io/pod-name").is_some();
        if !stateful || suffix.bytes().all(|b| b.is_ascii_digit()) {
            return owner.into();
        }
    }
    name.into()
}

/// The other end of a connection: its workload and proven identity, and the Service it was
/// reached by (outbound).
#[derive(Clone)]
struct Peer {
    reporter: Reporter,
    workload: Option<Arc<Workload>>,
    principal: Option<SpiffeId>,
    service: Option<Arc<MeshService>>,
}

impl Peer {
    fn unknown(reporter: Reporter) -> Peer {
        Peer {
            reporter,
            workload: None,
            principal: None,
            service: None,
        }
    }
}

impl PartialEq for Peer {
    fn eq(&self, o: &Self) -> bool {
        self.reporter == o.reporter
            && self.workload.as_ref().map(|w| &w.uid) == o.workload.as_ref().map(|w| &w.uid)
            && self.principal == o.principal
            && self.service.as_ref().map(|s| &s.key) == o.service.as_ref().map(|s| &s.key)
    }
}
impl Eq for Peer {}
impl Hash for Peer {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.reporter.hash(h);
        self.workload.as_ref().map(|w| &w.uid).hash(h);
        self.principal.hash(h);
        self.service.as_ref().map(|s| &s.key).hash(h);
    }
}

/// A Service's labels: its host name, name and namespace (`unknown` without one).
fn service_labels(s: Option<&MeshService>, out: &mut Vec<(String, String)>) {
    let (ns, name) = s.and_then(|s| s.key.split_once('/')).unwrap_or((UNKNOWN, UNKNOWN));
    let host = s.map_or(UNKNOWN, |s| s.hostname.as_str());
    out.push(("destination_service".into(), host.into()));
    out.push(("destination_service_name".into(), name.into()));
    out.push(("destination_service_namespace".into(), ns.into()));
}

/// A peer's connections: opened, closed, and bytes received (client to server) and sent; and
/// its requests, once it makes any.
#[derive(Default)]
pub struct Counts {
    opened: AtomicU64,
    closed: AtomicU64,
    received: AtomicU64,
    sent: AtomicU64,
    requests: OnceLock<Box<Requests>>,
}

/// Distinct (response code, protocol, flag) combinations counted apart per peer; the last slot
/// counts the rest, as `response_code="other"` (a bound whatever the app answers).
const CODES: usize = 16;
/// The key of the slot past the bound.
const OTHER: u32 = u32::MAX;

/// How a request was made, as Istio's `request_protocol` (and `grpc_response_status`) say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http,
    /// A gRPC call, with the `grpc-status` its response ended with, when it said one.
    Grpc(Option<u8>),
}

impl Protocol {
    /// Part of a slot's key: 0 for HTTP, 1 for gRPC without a status, 2 + the status.
    fn key(self) -> u32 {
        match self {
            Protocol::Http => 0,
            Protocol::Grpc(None) => 1,
            Protocol::Grpc(Some(s)) => 2 + u32::from(s.min(31)),
        }
    }

    fn of_key(k: u32) -> Protocol {
        match k {
            0 => Protocol::Http,
            1 => Protocol::Grpc(None),
            k => Protocol::Grpc(Some((k - 2) as u8)),
        }
    }
}

/// Why the proxy rather than the app answered, or ended, a request: Envoy's response flags, as
/// Istio's `response_flags` label says them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Flag {
    /// Nothing to note: `-`.
    #[default]
    None,
    /// `NR`: no route matched.
    NoRoute,
    /// `NC`: the route's backend does not resolve.
    NoCluster,
    /// `UH`: no healthy endpoint.
    NoHealthyUpstream,
    /// `UF`: the upstream could not be reached.
    UpstreamConnectFailure,
    /// `UO`: the circuit breaker was full.
    UpstreamOverflow,
    /// `UT`: the upstream did not answer in time.
    UpstreamTimeout,
    /// `UC`: the upstream's connection broke off.
    UpstreamReset,
    /// `UPE`: the upstream answered what no client may get.
    UpstreamProtocolError,
    /// `FI`: fault injection answered.
    FaultAbort,
    /// `RL`: rate limited.
    RateLimited,
    /// `DPE`: the client's request was malformed.
    DownstreamProtocolError,
    /// `DC`: the client's body broke off, or the client left before the answer's end.
    DownstreamTermination,
}

const FLAGS: [(Flag, &str); 13] = [
    (Flag::None, "-"),
    (Flag::NoRoute, "NR"),
    (Flag::NoCluster, "NC"),
    (Flag::NoHealthyUpstream, "UH"),
    (Flag::UpstreamConnectFailure, "UF"),
    (Flag::UpstreamOverflow, "UO"),
    (Flag::UpstreamTimeout, "UT"),
    (Flag::UpstreamReset, "UC"),
    (Flag::UpstreamProtocolError, "UPE"),
    (Flag::FaultAbort, "FI"),
    (Flag::RateLimited, "RL"),
    (Flag::DownstreamProtocolError, "DPE"),
    (Flag::DownstreamTermination, "DC"),
];

impl Flag {
    /// The flag of a response the proxy made, by the reason it gave (`x-ferrum-error`).
    pub fn of_reason(reason: &[u8]) -> Flag {
        match reason {
            b"route_not_found" => Flag::NoRoute,
            b"backend_not_found" | b"no_weighted_backend" => Flag::NoCluster,
            b"no_healthy_upstream" => Flag::NoHealthyUpstream,
            b"upstream_connect_failure" => Flag::UpstreamConnectFailure,
            b"upstream_overflow" => Flag::UpstreamOverflow,
            b"upstream_timeout" => Flag::UpstreamTimeout,
            b"upstream_reset" => Flag::UpstreamReset,
            b"upstream_invalid_response" => Flag::UpstreamProtocolError,
            b"fault_filter_abort" => Flag::FaultAbort,
            b"rate_limited" => Flag::RateLimited,
            b"invalid_host" | b"invalid_path" | b"unsupported_transfer_coding" | b"request_headers_too_large" => {
                Flag::DownstreamProtocolError
            }
            b"request_body_error" => Flag::DownstreamTermination,
            _ => Flag::None,
        }
    }

    pub fn as_str(self) -> &'static str {
        FLAGS[self as usize].1
    }

    fn of_index(i: u32) -> Flag {
        FLAGS.get(i as usize).map_or(Flag::None, |f| f.0)
    }
}

/// One request, as Istio's request metrics count it.
#[derive(Debug, Clone, Copy)]
pub struct Call {
    /// The status the client got.
    pub status: u16,
    pub protocol: Protocol,
    pub flag: Flag,
    /// From the request's head until the response ended (or the client went away).
    pub took: Duration,
    /// Body bytes: the request's (as it declared them), the response's (as sent).
    pub request_bytes: u64,
    pub response_bytes: u64,
}

/// One peer's requests by response code and protocol: lock-free, a slot claimed per pair.
#[derive(Default)]
struct Requests([Slot; CODES]);

#[derive(Default)]
struct Slot {
    /// `code | protocol << 10 | flag << 16` ([`Call::key`]); 0 while free.
    key: AtomicU32,
    count: AtomicU64,
    measured: OnceLock<Box<Measured>>,
}

/// A slot's histograms: made when its first request is counted.
struct Measured {
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

impl Requests {
    fn slot(&self, key: u32) -> &Slot {
        let (last, claimable) = self.0.split_last().expect("CODES > 0");
        for slot in claimable {
            let k = match slot.key.load(Relaxed) {
                0 => match slot.key.compare_exchange(0, key, Relaxed, Relaxed) {
                    Ok(_) => return slot,
                    Err(k) => k,
                },
                k => k,
            };
            if k == key {
                return slot;
            }
        }
        last.key.store(OTHER, Relaxed);
        last
    }
}

/// An open connection: counted as closed when dropped, however it ends.
pub struct Open(Arc<Counts>);

impl Open {
    pub fn bytes(&self, received: u64, sent: u64) {
        self.0.received.fetch_add(received, Relaxed);
        self.0.sent.fetch_add(sent, Relaxed);
    }

    /// Where this connection's requests are counted.
    pub fn calls(&self) -> Calls {
        Calls(self.0.clone())
    }
}

/// A connection's requests, as its peer's.
#[derive(Clone)]
pub struct Calls(Arc<Counts>);

impl Call {
    /// Its slot's key: codes are below 1,000, protocols' keys below 64.
    fn key(&self) -> u32 {
        u32::from(self.status.min(999)) | self.protocol.key() << 10 | (self.flag as u32) << 16
    }
}

impl Calls {
    /// Counts a connection to this peer (an outbound one, by the address reached).
    pub fn opened(self) -> Open {
        self.0.opened.fetch_add(1, Relaxed);
        Open(self.0)
    }

    pub fn record(&self, call: &Call) {
        let slot = (self.0.requests.get_or_init(Box::default)).slot(call.key());
        slot.count.fetch_add(1, Relaxed);
        let m = slot.measured.get_or_init(|| {
            Box::new(Measured {
                duration: Histogram::new(&MILLISECONDS),
                request_bytes: Histogram::new(&BYTES),
                response_bytes: Histogram::new(&BYTES),
            })
        });
        m.duration.observe(call.took);
        m.request_bytes.record(call.request_bytes);
        m.response_bytes.record(call.response_bytes);
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.closed.fetch_add(1, Relaxed);
    }
}

/// One (response code, protocol) of a peer's requests, as a scrape reads it.
pub struct RequestSample<'a> {
    /// `http` or `grpc`.
    pub protocol: &'static str,
    pub code: String,
    /// A gRPC call's status (`grpc_response_status`), when it said one.
    pub grpc_status: Option<u8>,
    /// `response_flags`.
    pub flag: Flag,
    pub count: u64,
    pub duration: &'a Histogram,
    pub request_bytes: &'a Histogram,
    pub response_bytes: &'a Histogram,
}

/// One peer, as a scrape reads it.
pub struct Sample {
    /// Istio's labels for the peer and this workload (all but the protocol's and the response's).
    pub labels: Vec<(String, String)>,
    counts: Arc<Counts>,
}

impl Sample {
    /// Its connections: opened, closed, bytes received and sent.
    pub fn connections(&self) -> [u64; 4] {
        let c = &self.counts;
        [&c.opened, &c.closed, &c.received, &c.sent].map(|n| n.load(Relaxed))
    }

    /// Its requests, by response code and protocol.
    pub fn requests(&self) -> impl Iterator<Item = RequestSample<'_>> {
        let slots = self.counts.requests.get().map_or(&[][..], |r| &r.0[..]);
        slots.iter().filter_map(|slot| {
            let key = slot.key.load(Relaxed);
            let m = slot.measured.get()?;
            let (code, protocol, flag) = match key {
                OTHER => ("other".to_string(), Protocol::Http, Flag::None),
                k => (
                    (k & 0x3ff).to_string(),
                    Protocol::of_key(k >> 10 & 0x3f),
                    Flag::of_index(k >> 16),
                ),
            };
            let (protocol, grpc_status) = match protocol {
                Protocol::Http => ("http", None),
                Protocol::Grpc(status) => ("grpc", status),
            };
            Some(RequestSample {
                protocol,
                code,
                grpc_status,
                flag,
                count: slot.count.load(Relaxed),
                duration: &m.duration,
                request_bytes: &m.request_bytes,
                response_bytes: &m.response_bytes,
            })
        })
    }
}

/// Connections by peer.
#[derive(Default)]
pub struct Peers {
    inner: Mutex<Inner>,
    /// The cluster the mesh runs in (`Kubernetes` unless set, as Istio's default).
    cluster: OnceLock<String>,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Peers")
    }
}

#[derive(Default)]
struct Inner {
    peers: HashMap<Peer, Arc<Counts>>,
    /// This workload, as the snapshot (of the version noted) and its certificate say it.
    own: Option<(u64, Party)>,
}

impl Peers {
    /// Names the cluster the mesh runs in (once).
    pub fn set_cluster(&self, id: String) {
        let _ = self.cluster.set(id);
    }

    /// Counts a connection from `workload` (by its address), which proved `principal` (mTLS),
    /// to this workload; `own` says this workload when the snapshot `version` is new to it.
    pub fn inbound(
        &self,
        workload: Option<Arc<Workload>>,
        principal: Option<SpiffeId>,
        version: u64,
        own: impl FnOnce() -> Party,
    ) -> Open {
        let peer = Peer {
            reporter: Reporter::Destination,
            workload,
            principal,
            service: None,
        };
        let counts = self.counts(peer, version, own);
        counts.opened.fetch_add(1, Relaxed);
        Open(counts)
    }

    /// Where this workload's calls to `workload` (`principal` when over HBONE, which checked it)
    /// by `service` are counted: its requests, and its connections once [`Calls::opened`].
    pub fn calls_to(
        &self,
        workload: Option<Arc<Workload>>,
        principal: Option<SpiffeId>,
        service: Option<Arc<MeshService>>,
        version: u64,
        own: impl FnOnce() -> Party,
    ) -> Calls {
        let peer = Peer {
            reporter: Reporter::Source,
            workload,
            principal,
            service,
        };
        Calls(self.counts(peer, version, own))
    }

    fn counts(&self, mut peer: Peer, version: u64, own: impl FnOnce() -> Party) -> Arc<Counts> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if inner
            .own
            .as_ref()
            .is_none_or(|(v, p)| *v != version || p.principal == UNKNOWN)
        {
            inner.own = Some((version, own()));
        }
        if inner.peers.len() >= MAX_PEERS && !inner.peers.contains_key(&peer) {
            peer = Peer::unknown(peer.reporter);
        }
        inner.peers.entry(peer).or_default().clone()
    }

    /// Each peer, labelled with Istio's names.
    pub fn samples(&self) -> Vec<Sample> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let Some((_, own)) = &inner.own else {
            return Vec::new();
        };
        inner
            .peers
            .iter()
            .map(|(peer, c)| {
                let other = Party::of(peer.workload.as_deref(), peer.principal.as_ref());
                let (source, destination, reporter) = match peer.reporter {
                    Reporter::Destination => (&other, own, "destination"),
                    Reporter::Source => (own, &other, "source"),
                };
                let mut labels = vec![("reporter".to_string(), reporter.to_string())];
                let cluster = self.cluster.get().map_or("Kubernetes", String::as_str);
                source.labels("source", cluster, &mut labels);
                destination.labels("destination", cluster, &mut labels);
                service_labels(peer.service.as_deref(), &mut labels);
                let security = if peer.principal.is_some() { "mutual_tls" } else { "none" };
                labels.push(("connection_security_policy".into(), security.into()));
                Sample {
                    labels,
                    counts: c.clone(),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, labels: &[(&str, &str)]) -> Workload {
        Workload {
            uid: format!("uid-{name}"),
            name: name.into(),
            namespace: "shop".into(),
            service_account: "web".into(),
            node: String::new(),
            ips: vec![],
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ports: vec![],
            hbone: true,
            zone: None,
        }
    }

    #[test]
    fn a_workload_is_named_for_its_controller() {
        let named = |name, labels: &[(&str, &str)]| controller_name(&pod(name, labels));
        assert_eq!(
            named("web-7d9f8c6b5-x2k4q", &[("pod-template-hash", "7d9f8c6b5")]),
            "web"
        );
        assert_eq!(
            named(
                "db-0",
                &[
                    ("controller-revision-hash", "db-5c9"),
                    ("statefulset.kubernetes.io/pod-name", "db-0")
                ]
            ),
            "db"
        );
        assert_eq!(named("agent-x2k4q", &[("controller-revision-hash", "6f7")]), "agent");
        assert_eq!(named("migrate-29xq7", &[("job-name", "migrate")]), "migrate");
        assert_eq!(named("b-1", &[("app", "b")]), "b-1", "a bare pod is itself");
        assert_eq!(
            named("web-1", &[("pod-template-hash", "abc")]),
            "web-1",
            "a hash it does not carry"
        );
    }

    #[test]
    fn callers_are_counted_apart_with_istios_labels() {
        let peers = Peers::default();
        let own = || {
            Party::of(
                Some(&pod("api-0", &[("app", "api"), ("version", "v2")])),
                Some(&"spiffe://cluster.local/ns/shop/sa/api".parse().unwrap()),
            )
        };
        let web = Arc::new(pod(
            "web-7d9f8c6b5-x2k4q",
            &[("pod-template-hash", "7d9f8c6b5"), ("app", "web")],
        ));
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        let first = peers.inbound(Some(web.clone()), Some(id.clone()), 1, own);
        first.bytes(100, 2000);
        drop(first);
        let second = peers.inbound(Some(web), Some(id), 1, || unreachable!("the same snapshot"));
        let plaintext = peers.inbound(None, None, 1, own);
        drop(plaintext);
        let samples = peers.samples();
        assert_eq!(samples.len(), 2);
        let label = |labels: &Vec<(String, String)>, k: &str| labels.iter().find(|(n, _)| n == k).unwrap().1.clone();
        let mtls = samples
            .iter()
            .find(|s| label(&s.labels, "connection_security_policy") == "mutual_tls")
            .unwrap();
        assert_eq!(mtls.connections(), [2, 1, 100, 2000]);
        let mtls = &mtls.labels;
        assert_eq!(label(mtls, "reporter"), "destination");
        assert_eq!(label(mtls, "source_workload"), "web");
        assert_eq!(label(mtls, "source_workload_namespace"), "shop");
        assert_eq!(label(mtls, "source_principal"), "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(label(mtls, "source_canonical_service"), "web");
        assert_eq!(label(mtls, "source_canonical_revision"), "latest");
        assert_eq!(label(mtls, "destination_workload"), "api-0");
        assert_eq!(label(mtls, "source_cluster"), "Kubernetes", "Istio's default cluster");
        assert_eq!(label(mtls, "destination_cluster"), "Kubernetes");
        assert_eq!(label(mtls, "destination_version"), "v2");
        assert_eq!(
            label(mtls, "destination_principal"),
            "spiffe://cluster.local/ns/shop/sa/api"
        );
        let plain = samples
            .iter()
            .find(|s| label(&s.labels, "connection_security_policy") == "none")
            .unwrap();
        assert_eq!(plain.connections(), [1, 1, 0, 0]);
        let plain = &plain.labels;
        assert_eq!(label(plain, "source_workload"), "unknown");
        assert_eq!(label(plain, "source_principal"), "unknown");
        assert_eq!(label(plain, "source_cluster"), "unknown", "nothing is known of it");
        drop(second);
    }

    #[test]
    fn outbound_connections_name_the_service_and_the_workload_reached() {
        let peers = Peers::default();
        peers.set_cluster("east".into());
        let own = || Party::of(Some(&pod("web-1", &[])), None);
        let service: MeshService = serde_json::from_value(serde_json::json!({
            "key": "shop/api", "hostname": "api.shop.svc.cluster.local", "ports": [], "endpoints": []
        }))
        .unwrap();
        let api = Arc::new(pod("api-0", &[]));
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/api".parse().unwrap();
        let open = peers
            .calls_to(Some(api), Some(id), Some(Arc::new(service)), 1, own)
            .opened();
        open.bytes(10, 20);
        drop(open);
        let external = peers.calls_to(None, None, None, 1, own).opened();
        drop(external);
        let samples = peers.samples();
        let label = |labels: &Vec<(String, String)>, k: &str| labels.iter().find(|(n, _)| n == k).unwrap().1.clone();
        let api = samples
            .iter()
            .find(|s| label(&s.labels, "destination_workload") == "api-0")
            .unwrap();
        assert_eq!(api.connections(), [1, 1, 10, 20]);
        let l = &api.labels;
        assert_eq!(label(l, "reporter"), "source");
        assert_eq!(label(l, "source_workload"), "web-1");
        assert_eq!(
            (label(l, "source_cluster"), label(l, "destination_cluster")),
            ("east".into(), "east".into())
        );
        assert_eq!(label(l, "destination_service"), "api.shop.svc.cluster.local");
        assert_eq!(label(l, "destination_service_name"), "api");
        assert_eq!(label(l, "destination_service_namespace"), "shop");
        assert_eq!(
            label(l, "destination_principal"),
            "spiffe://cluster.local/ns/shop/sa/api"
        );
        assert_eq!(label(l, "connection_security_policy"), "mutual_tls");
        let l = &samples
            .iter()
            .find(|s| label(&s.labels, "destination_workload") == "unknown")
            .unwrap()
            .labels;
        assert_eq!(label(l, "destination_service"), "unknown");
        assert_eq!(label(l, "connection_security_policy"), "none");
    }

    #[test]
    fn calls_routed_to_a_workload_are_its_requests_not_connections() {
        let peers = Peers::default();
        let own = || Party::of(Some(&pod("web-1", &[])), None);
        let api = Arc::new(pod("api-0", &[]));
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/api".parse().unwrap();
        let calls = peers.calls_to(Some(api.clone()), Some(id.clone()), None, 1, own);
        calls.record(&Call {
            status: 503,
            protocol: Protocol::Http,
            flag: Flag::None,
            took: Duration::from_millis(2),
            request_bytes: 0,
            response_bytes: 19,
        });
        let again = peers.calls_to(Some(api), Some(id), None, 1, own);
        again.record(&Call {
            status: 503,
            protocol: Protocol::Http,
            flag: Flag::UpstreamConnectFailure,
            took: Duration::from_millis(1),
            request_bytes: 0,
            response_bytes: 19,
        });
        let samples = peers.samples();
        assert_eq!(samples.len(), 1, "one peer, however often it is looked up");
        assert_eq!(samples[0].connections(), [0; 4]);
        let label = |k: &str| samples[0].labels.iter().find(|(n, _)| n == k).unwrap().1.clone();
        assert_eq!(label("reporter"), "source");
        assert_eq!(label("destination_workload"), "api-0");
        let requests: Vec<_> = samples[0].requests().collect();
        let by_flag = |flag: &str| {
            let r = requests.iter().find(|r| r.flag.as_str() == flag).unwrap();
            (r.code.as_str(), r.count)
        };
        assert_eq!(by_flag("-"), ("503", 1), "the app's own 503");
        assert_eq!(by_flag("UF"), ("503", 1), "the proxy's, apart");
        assert_eq!(Flag::of_reason(b"no_healthy_upstream").as_str(), "UH");
        assert_eq!(Flag::of_reason(b"route_not_found").as_str(), "NR");
        assert_eq!(Flag::of_reason(b"rbac_access_denied"), Flag::None);
        for (i, (flag, _)) in FLAGS.iter().enumerate() {
            assert_eq!(
                (*flag as usize, Flag::of_index(i as u32)),
                (i, *flag),
                "the table's order"
            );
        }
    }

    #[tokio::test]
    async fn an_answer_the_client_left_is_flagged_dc() {
        use crate::upstream::body::{Counted, Observed, ResponseBody};
        use http_body_util::BodyExt;
        let peers = Peers::default();
        let own = || Party::of(Some(&pod("web-1", &[])), None);
        let api = Arc::new(pod("api-0", &[]));
        let answer = |left: bool| {
            let calls = peers.calls_to(Some(api.clone()), None, None, 1, own);
            let resp = http::Response::new(());
            let counted = Counted::new(calls, &resp, false, std::time::Instant::now(), (0, None));
            let log = Arc::new(crate::access_log::AccessLog::default());
            let body = Observed::wrap(ResponseBody::local("hello"), None, false, None, log, Some(counted));
            async move {
                if !left {
                    assert_eq!(body.collect().await.expect("whole").to_bytes(), "hello");
                }
            }
        };
        answer(true).await;
        answer(false).await;
        let samples = peers.samples();
        let requests: Vec<_> = samples[0].requests().collect();
        let by_flag = |flag: &str| requests.iter().find(|r| r.flag.as_str() == flag).map(|r| r.count);
        assert_eq!(by_flag("DC"), Some(1), "the client left before the body");
        assert_eq!(by_flag("-"), Some(1), "the whole answer");
    }

    #[test]
    fn requests_are_counted_by_code_and_protocol_within_a_bound() {
        let peers = Peers::default();
        let open = peers.inbound(None, None, 1, || Party::of(None, None));
        let calls = open.calls();
        let call = |status, protocol, ms, response_bytes| Call {
            status,
            protocol,
            flag: Flag::None,
            took: Duration::from_millis(ms),
            request_bytes: 0,
            response_bytes,
        };
        for _ in 0..3 {
            calls.record(&call(200, Protocol::Http, 3, 2_000));
        }
        calls.record(&call(403, Protocol::Http, 0, 19));
        calls.record(&call(200, Protocol::Grpc(Some(0)), 2_000, 5));
        calls.record(&call(200, Protocol::Grpc(Some(14)), 1, 0));
        // More distinct codes than a peer keeps apart: the rest are "other".
        for code in 500..520 {
            calls.record(&call(code, Protocol::Http, 1, 0));
        }
        let samples = peers.samples();
        let requests: Vec<_> = samples[0].requests().collect();
        let find = |protocol: &str, code: &str, grpc: Option<u8>| {
            let r = requests
                .iter()
                .find(|r| r.protocol == protocol && r.code == code && r.grpc_status == grpc)
                .unwrap();
            (r.count, r.duration.count(), r.response_bytes.count())
        };
        assert_eq!(find("http", "200", None), (3, 3, 3));
        assert_eq!(find("http", "403", None), (1, 1, 1));
        assert_eq!(find("grpc", "200", Some(0)).0, 1);
        assert_eq!(find("grpc", "200", Some(14)).0, 1, "a failed call apart from an ok one");
        assert_eq!(requests.len(), CODES);
        let kept_apart = CODES - 1 - 4;
        assert_eq!(find("http", "other", None).0, (20 - kept_apart) as u64);
        assert_eq!(samples[0].connections(), [1, 0, 0, 0], "requests are not connections");
    }

    #[test]
    fn peers_past_the_bound_are_unknown() {
        let peers = Peers::default();
        let own = || Party::of(None, None);
        let mut open = Vec::new();
        for i in 0..MAX_PEERS + 10 {
            open.push(peers.inbound(Some(Arc::new(pod(&format!("p-{i}"), &[]))), None, 1, own));
        }
        let samples = peers.samples();
        assert_eq!(samples.len(), MAX_PEERS + 1);
        let unknown = samples
            .iter()
            .find(|s| s.labels.iter().any(|(k, v)| k == "source_workload" && v == "unknown"))
            .unwrap();
        assert_eq!(unknown.connections()[0], 10);
    }
}
