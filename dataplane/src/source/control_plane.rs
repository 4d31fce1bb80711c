//! Control-plane mode: subscribe to the operator's MeshSubscribe stream, apply each snapshot
//! through the same path as a file reload, acknowledge it, and keep the last good one on disk so a
//! restart without the control plane still serves.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ferrum_proto::SNAPSHOT_SCHEMA;
use ferrum_proto::mesh::v1::mesh_subscribe_client::MeshSubscribeClient;
use ferrum_proto::mesh::v1::{
    Ack, Heartbeat, Hello, Snapshot as ProtoSnapshot, SubscribeRequest, SubscribeResponse, subscribe_request,
    subscribe_response,
};
use ferrum_snapshot::{Delta, Secrets, Snapshot, TlsSecret};
use tokio::sync::mpsc;

use crate::dataplane::Dataplane;

/// A silent stream for this long is dead (the operator beats every 10 s).
const SILENCE: Duration = Duration::from_secs(35);
/// The largest (compressed) snapshot body accepted, over all its chunks.
const MAX_BODY: usize = 256 << 20;

#[derive(Debug, Clone)]
pub struct Settings {
    pub url: String,
    pub node_id: String,
    pub role: String,
    pub token: Option<String>,
    /// A projected ServiceAccount token (sidecars), re-read at every connection because the
    /// kubelet rotates it; takes the place of `token`.
    pub token_file: Option<PathBuf>,
    pub cache: Option<PathBuf>,
    /// `<namespace>/<name>` of the pod the proxy runs in, when known.
    pub pod: Option<String>,
    /// For an `https://` control plane: the name its certificate is checked against and the
    /// mesh roots it must chain to.
    pub tls: Option<(String, PathBuf)>,
}

impl Settings {
    fn bearer(&self) -> Option<String> {
        match &self.token_file {
            Some(f) => match std::fs::read_to_string(f) {
                Ok(t) => Some(t.trim().to_string()),
                Err(e) => {
                    tracing::warn!(path = %f.display(), error = %e, "cannot read the token file");
                    None
                }
            },
            None => self.token.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CpError {
    #[error("cannot connect to {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error(transparent)]
    Tls(#[from] crate::mesh::identity::IdentityError),
    #[error("control plane: {0}")]
    Status(#[from] tonic::Status),
    #[error("no message from the control plane for {0:?}")]
    Silent(Duration),
    #[error("control plane closed the stream")]
    Closed,
    #[error("snapshot larger than {0} bytes")]
    TooLarge(usize),
}

impl super::SessionError for CpError {
    fn pushback(&self) -> Option<Duration> {
        match self {
            CpError::Status(s) => super::pushback_of(s),
            _ => None,
        }
    }
}

fn secrets_of(m: ferrum_proto::mesh::v1::Secrets) -> Secrets {
    m.items
        .into_iter()
        .map(|s| {
            let pair = TlsSecret {
                cert: s.cert_pem,
                key: s.key_pem,
            };
            (s.name, Arc::new(pair))
        })
        .collect()
}

/// Where the key pairs of the cached snapshot are kept: beside it, readable by us only.
fn secrets_path(cache: &Path) -> PathBuf {
    cache.with_extension("secrets.json")
}

/// Reads the cached snapshot, checking it is whole (its hash matches its content), and the key
/// pairs it names.
pub fn load_cache(path: &Path) -> Option<(Snapshot, Secrets)> {
    let snap = load_snapshot(path)?;
    let secrets = std::fs::read(secrets_path(path))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    Some((snap, secrets))
}

fn load_snapshot(path: &Path) -> Option<Snapshot> {
    let bytes = std::fs::read(path).ok()?;
    let snap: Snapshot = serde_json::from_slice(&bytes)
        .map_err(|e| tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable snapshot cache"))
        .ok()?;
    if !snap.is_whole() {
        tracing::warn!(path = %path.display(), "ignoring snapshot cache whose hash does not match");
        return None;
    }
    Some(snap)
}

/// Writes a cache file readable by this user only (the secrets file holds private keys).
fn store_cache(path: &Path, body: &[u8]) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let write = || {
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(body)?;
        f.sync_all()
    };
    let result = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|_| write())
        .and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = result {
        tracing::warn!(path = %path.display(), error = %e, "cannot write snapshot cache");
    }
}

/// Subscribes forever, reconnecting with exponential backoff and jitter.
/// The zone the operator says the proxy's pod is in, unless it was given one: the snapshot
/// serving now is compiled again, so its clusters prefer that zone at once.
fn learn_zone(dp: &Dataplane, zone: String) {
    if zone.is_empty() || !dp.set_zone(zone.clone()) {
        return;
    }
    tracing::info!(%zone, "zone from the control plane");
    let current = (*dp.shared.config.load().snapshot).clone();
    if current.version != 0
        && let Err(e) = dp.apply(current, Default::default())
    {
        tracing::warn!(error = %e, "could not compile the serving snapshot again for the zone");
    }
}

pub async fn run(settings: Settings, dp: Arc<Dataplane>) {
    let (s, d) = (&settings, &dp);
    super::reconnecting("control-plane stream", move || session(s, d)).await
}

async fn session(s: &Settings, dp: &Arc<Dataplane>) -> Result<(), CpError> {
    let (tx, mut stream) = subscribe(s, dp).await?;
    tracing::info!(url = %s.url, node = %s.node_id, "subscribed to the control plane");
    let beats = tokio::spawn(heartbeats(tx.clone()));
    let mut partial: Vec<u8> = Vec::new();
    let result = loop {
        let msg = match tokio::time::timeout(SILENCE, stream.message()).await {
            Err(_) => break Err(CpError::Silent(SILENCE)),
            Ok(Err(e)) => break Err(e.into()),
            Ok(Ok(None)) => break Err(CpError::Closed),
            Ok(Ok(Some(m))) => m,
        };
        let snap = match msg.message {
            Some(subscribe_response::Message::Snapshot(snap)) => snap,
            Some(subscribe_response::Message::Secrets(s)) => {
                dp.add_secrets(secrets_of(s));
                continue;
            }
            Some(subscribe_response::Message::Locality(l)) => {
                learn_zone(dp, l.zone);
                continue;
            }
            _ => continue,
        };
        let snap = match gathered(&mut partial, snap) {
            Ok(Some(snap)) => snap,
            Ok(None) => continue,
            Err(e) => break Err(e),
        };
        let (version, hash, delta) = (snap.version, snap.hash.clone(), snap.delta);
        let outcome = apply(dp, snap, s.cache.clone()).await;
        match &outcome {
            Err(e) => {
                tracing::error!(version, delta, error = %e.error, "rejected snapshot from the control plane; still serving the last good one")
            }
            Ok(()) => tracing::info!(version, delta, "applied snapshot from the control plane"),
        }
        let ack = request(subscribe_request::Message::Ack(ack(version, hash, outcome)));
        if tx.send(ack).await.is_err() {
            break Err(CpError::Closed);
        }
    };
    beats.abort();
    result
}

/// Opens the stream, saying hello with the snapshot this proxy serves (and its token, when it
/// has one): the sender of our messages and the stream of the control plane's.
async fn subscribe(
    s: &Settings,
    dp: &Dataplane,
) -> Result<(mpsc::Sender<SubscribeRequest>, tonic::Streaming<SubscribeResponse>), CpError> {
    let mut client = MeshSubscribeClient::new(channel(s).await?).max_decoding_message_size(256 << 20);
    let (tx, rx) = mpsc::channel(8);
    let current = dp.shared.config.load().snapshot.clone();
    let hello = Hello {
        node_id: s.node_id.clone(),
        role: s.role.clone(),
        proxy_version: env!("CARGO_PKG_VERSION").into(),
        current_version: current.version,
        current_hash: current.hash.clone(),
        pod: s.pod.clone().unwrap_or_default(),
    };
    let _ = tx.send(request(subscribe_request::Message::Hello(hello))).await;
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    if let Some(t) = s.bearer()
        && let Ok(v) = format!("Bearer {t}").parse()
    {
        req.metadata_mut().insert("authorization", v);
    }
    Ok((tx, client.subscribe(req).await?.into_inner()))
}

/// A large snapshot arrives in chunks: gathered in `partial` until the last, which comes back
/// whole; bounded by [`MAX_BODY`].
fn gathered(partial: &mut Vec<u8>, mut snap: ProtoSnapshot) -> Result<Option<ProtoSnapshot>, CpError> {
    if !snap.more && partial.is_empty() {
        return Ok(Some(snap));
    }
    partial.extend_from_slice(&snap.body);
    if partial.len() > MAX_BODY {
        return Err(CpError::TooLarge(MAX_BODY));
    }
    if snap.more {
        return Ok(None);
    }
    snap.body = std::mem::take(partial).into();
    Ok(Some(snap))
}

/// The gRPC channel to the control plane: TLS checked against the mesh roots when configured.
async fn channel(s: &Settings) -> Result<tonic::transport::Channel, CpError> {
    match (&s.tls, s.url.strip_prefix("https://")) {
        (Some((name, roots)), Some(addr)) => {
            let roots = crate::mesh::identity::read_roots(roots)?;
            Ok(crate::mesh::identity::tls_channel(addr.trim_end_matches('/'), name, roots).await?)
        }
        _ => super::connect(&s.url).await.map_err(|source| CpError::Connect {
            url: s.url.clone(),
            source,
        }),
    }
}

fn request(m: subscribe_request::Message) -> SubscribeRequest {
    SubscribeRequest { message: Some(m) }
}

/// Says we are alive every 10 s until the stream is gone.
async fn heartbeats(tx: mpsc::Sender<SubscribeRequest>) {
    let mut t = tokio::time::interval(Duration::from_secs(10));
    loop {
        t.tick().await;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let beat = request(subscribe_request::Message::Heartbeat(Heartbeat { unix_millis: now }));
        if tx.send(beat).await.is_err() {
            return;
        }
    }
}

fn ack(version: u64, hash: String, outcome: Result<(), Rejection>) -> Ack {
    match outcome {
        Ok(()) => Ack {
            version,
            hash,
            applied: true,
            ..Default::default()
        },
        Err(r) => Ack {
            version,
            hash,
            applied: false,
            error: r.error,
            resync: r.resync,
        },
    }
}

/// Why a snapshot was not applied; `resync` asks for the full snapshot (a delta did not fit).
struct Rejection {
    error: String,
    resync: bool,
}

impl From<String> for Rejection {
    fn from(error: String) -> Self {
        Rejection { error, resync: false }
    }
}

/// Decodes, checks and applies one snapshot or delta; on success, caches the result.
async fn apply(dp: &Arc<Dataplane>, msg: ProtoSnapshot, cache: Option<PathBuf>) -> Result<(), Rejection> {
    if msg.schema != SNAPSHOT_SCHEMA {
        return Err(format!("unknown snapshot schema {:?} (want {SNAPSHOT_SCHEMA:?})", msg.schema).into());
    }
    let json: Vec<u8> = match msg.encoding.as_str() {
        "" => msg.body.to_vec(),
        "gzip" => {
            use std::io::Read;
            let mut out = Vec::with_capacity(msg.body.len() * 8);
            flate2::read::GzDecoder::new(&msg.body[..])
                .read_to_end(&mut out)
                .map_err(|e| format!("snapshot does not decompress: {e}"))?;
            out
        }
        other => return Err(format!("unknown snapshot encoding {other:?}").into()),
    };
    let dp = dp.clone();
    // Decoding, hashing and compiling a large snapshot is CPU work: keep it off the control
    // thread's event loop.
    tokio::task::spawn_blocking(move || {
        let snap = if msg.delta {
            let d: Delta = serde_json::from_slice(&json).map_err(|e| format!("delta does not decode: {e}"))?;
            if d.version != msg.version || d.hash != msg.hash {
                return Err("delta version or hash does not match its message".to_string().into());
            }
            d.apply(&dp.shared.config.load().snapshot).map_err(|e| Rejection {
                resync: true,
                error: e.to_string(),
            })?
        } else {
            let snap: Snapshot = serde_json::from_slice(&json).map_err(|e| format!("snapshot does not decode: {e}"))?;
            if snap.hash != msg.hash || !snap.is_whole() || snap.version != msg.version {
                return Err("snapshot hash or version does not match its content".to_string().into());
            }
            snap
        };
        let body = match (&cache, msg.delta) {
            (Some(_), true) => Some(serde_json::to_vec(&snap).expect("snapshots serialise")),
            (Some(_), false) => Some(json),
            (None, _) => None,
        };
        dp.apply(snap, Secrets::new()).map_err(|e| e.to_string())?;
        if let (Some(path), Some(body)) = (cache, body) {
            let secrets = serde_json::to_vec(&dp.serving_secrets()).expect("secrets serialise");
            store_cache(&secrets_path(&path), &secrets);
            store_cache(&path, &body);
        }
        Ok(())
    })
    .await
    .map_err(|e| e.to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_cache_is_private_to_its_owner() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/snapshot.json");
        let snap = Snapshot::new(3, vec![], vec![]);
        store_cache(&path, &serde_json::to_vec(&snap).unwrap());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "mode {mode:o}");
        assert_eq!(load_cache(&path).unwrap().0.version, 3);
        // Rewriting keeps it private and replaces the content.
        store_cache(&path, &serde_json::to_vec(&Snapshot::new(4, vec![], vec![])).unwrap());
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(load_cache(&path).unwrap().0.version, 4);
    }
}
