//! Connected proxies (MeshSubscribe and xDS streams alike): who they are, what each was sent
//! and what it says it applied — for `/proxies`, `ferrumctl` and status.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tonic::Status;

/// Streams one node id may hold at once (a restarting proxy briefly has two).
const STREAMS_PER_NODE: usize = 2;

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyState {
    pub node_id: String,
    pub role: String,
    pub proxy_version: String,
    pub peer: String,
    pub protocol: &'static str,
    pub connected_since_unix_ms: u64,
    pub last_seen_unix_ms: u64,
    pub sent_version: u64,
    /// Updates sent as deltas, and as full snapshots.
    pub deltas_sent: u64,
    pub full_sent: u64,
    pub applied_version: u64,
    pub applied_hash: String,
    pub last_rejection: Option<String>,
    pub rejected_version: Option<u64>,
}

impl ProxyState {
    /// A stream that just connected from `peer`, sent nothing yet.
    pub fn connected(node_id: &str, role: &str, proxy_version: &str, peer: String, protocol: &'static str) -> Self {
        let now = now_ms();
        ProxyState {
            node_id: node_id.into(),
            role: role.into(),
            proxy_version: proxy_version.into(),
            peer,
            protocol,
            connected_since_unix_ms: now,
            last_seen_unix_ms: now,
            sent_version: 0,
            deltas_sent: 0,
            full_sent: 0,
            applied_version: 0,
            applied_hash: String::new(),
            last_rejection: None,
            rejected_version: None,
        }
    }
}

/// Connected proxies, keyed by node id and stream number, and how many streams come from each
/// address. Not on any hot path.
#[derive(Default)]
pub struct Proxies {
    streams: Mutex<BTreeMap<(String, u64), ProxyState>>,
    from: Mutex<HashMap<IpAddr, usize>>,
    next: std::sync::atomic::AtomicU64,
}

fn peer_ip(peer: &str) -> Option<IpAddr> {
    peer.parse::<std::net::SocketAddr>().ok().map(|a| a.ip())
}

impl Proxies {
    /// Adds a stream, within the per-node limit; it is removed when the registration drops.
    pub fn register(self: &Arc<Self>, state: ProxyState) -> Result<Registration, Status> {
        let mut streams = self.streams.lock().unwrap();
        let open = streams.keys().filter(|(n, _)| *n == state.node_id).count();
        if open >= STREAMS_PER_NODE {
            return Err(Status::resource_exhausted(format!(
                "node {:?} already has {open} open streams",
                state.node_id
            )));
        }
        let key = (
            state.node_id.clone(),
            self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        );
        if let Some(ip) = peer_ip(&state.peer) {
            *self.from.lock().unwrap().entry(ip).or_default() += 1;
        }
        streams.insert(key.clone(), state);
        Ok(Registration {
            proxies: self.clone(),
            key,
        })
    }

    /// Whether a proxy stream is open from `ip` (it passed the stream's credential check).
    pub fn connected_from(&self, ip: IpAddr) -> bool {
        self.from.lock().unwrap().contains_key(&ip)
    }

    pub fn list(&self) -> Vec<ProxyState> {
        self.streams.lock().unwrap().values().cloned().collect()
    }

    pub fn update(&self, key: &(String, u64), f: impl FnOnce(&mut ProxyState)) {
        if let Some(p) = self.streams.lock().unwrap().get_mut(key) {
            f(p);
        }
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Removes the stream from the table when its task ends, however it ends.
pub struct Registration {
    proxies: Arc<Proxies>,
    pub key: (String, u64),
}

impl Registration {
    pub fn update(&self, f: impl FnOnce(&mut ProxyState)) {
        self.proxies.update(&self.key, f);
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let gone = self.proxies.streams.lock().unwrap().remove(&self.key);
        if let Some(ip) = gone.and_then(|s| peer_ip(&s.peer)) {
            let mut from = self.proxies.from.lock().unwrap();
            if let Some(n) = from.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    from.remove(&ip);
                }
            }
        }
        tracing::info!(node = %self.key.0, "proxy disconnected");
    }
}
