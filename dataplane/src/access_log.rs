//! Access logs: one JSON line per request, for listeners whose Gateway asks for them
//! (annotation `ferrum.dev/access-log: "true"`), with Envoy's usual fields. Lines are written
//! off the request path: a finished request hands its entry to a bounded channel and a writer
//! thread serialises it. A writer that falls behind loses lines (counted), never requests.

use std::io::Write;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::Instant;

use serde::Serialize;

/// Entries waiting for the writer before new ones are dropped.
const QUEUE: usize = 8192;

/// One request, as logged.
#[derive(Debug, Serialize)]
pub struct Entry {
    /// RFC 3339, when the request arrived.
    pub start_time: String,
    pub method: String,
    pub authority: String,
    pub path: String,
    pub protocol: &'static str,
    pub status: u16,
    /// Why the proxy answered itself (`x-ferrum-error`), if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The request's `content-length`, when it declared one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_received: Option<u64>,
    /// Response body bytes sent to the client.
    pub bytes_sent: u64,
    /// Until the response body ended (or the client went away).
    pub duration_ms: f64,
    /// Whether the whole response body was sent.
    pub complete: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_cluster: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_host: Option<String>,
    pub client: String,
    pub listener: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// From the W3C `traceparent` header.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    #[serde(skip)]
    pub started: Option<Instant>,
}

/// Where lines go, and how many went or were dropped.
#[derive(Default)]
pub struct AccessLog {
    /// A file to append to; stdout when unset.
    path: OnceLock<PathBuf>,
    tx: OnceLock<SyncSender<Entry>>,
    pub written: std::sync::Arc<AtomicU64>,
    pub dropped: AtomicU64,
}

impl AccessLog {
    /// Appends lines to `path` instead of stdout (before the first line).
    pub fn set_path(&self, path: PathBuf) {
        let _ = self.path.set(path);
    }

    /// Queues a finished entry; drops it (and counts) when the writer is behind.
    pub fn send(&self, e: Entry) {
        let tx = self.tx.get_or_init(|| self.start());
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = tx.try_send(e) {
            self.dropped.fetch_add(1, Relaxed);
        }
    }

    fn start(&self) -> SyncSender<Entry> {
        let (tx, rx) = sync_channel(QUEUE);
        let path = self.path.get().cloned();
        let written = self.written.clone();
        let spawned = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_all(rx, path, &written));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the access log writer");
        }
        tx
    }
}

/// Writes entries as they come, flushing whenever the queue is empty.
fn write_all(rx: Receiver<Entry>, path: Option<PathBuf>, written: &AtomicU64) {
    let out: Box<dyn Write> = match &path {
        Some(p) => match std::fs::OpenOptions::new().create(true).append(true).open(p) {
            Ok(f) => Box::new(f),
            Err(e) => {
                return tracing::error!(path = %p.display(), error = %e, "cannot open the access log");
            }
        },
        None => Box::new(std::io::stdout()),
    };
    let mut out = std::io::BufWriter::new(out);
    while let Ok(mut e) = rx.recv() {
        loop {
            if serde_json::to_writer(&mut out, &e).is_ok() && out.write_all(b"\n").is_ok() {
                written.fetch_add(1, Relaxed);
            }
            match rx.try_recv() {
                Ok(next) => e = next,
                Err(_) => break,
            }
        }
        if let Err(err) = out.flush() {
            tracing::warn!(error = %err, "access log write failed");
        }
    }
}

impl Entry {
    /// What the request says about itself, before it is served.
    pub fn of<B>(req: &http::Request<B>, client: std::net::SocketAddr, listener: &str) -> Entry {
        let h = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let authority = req
            .uri()
            .authority()
            .map(|a| a.to_string())
            .or_else(|| h("host"))
            .unwrap_or_default();
        Entry {
            start_time: now(),
            method: req.method().to_string(),
            authority,
            path: req.uri().path_and_query().map_or("/", |p| p.as_str()).to_string(),
            protocol: match req.version() {
                http::Version::HTTP_2 => "HTTP/2",
                http::Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
            status: 0,
            error: None,
            bytes_received: h("content-length").and_then(|l| l.parse().ok()),
            bytes_sent: 0,
            duration_ms: 0.0,
            complete: false,
            route: None,
            upstream_cluster: None,
            upstream_host: None,
            client: client.to_string(),
            listener: listener.to_string(),
            user_agent: h("user-agent"),
            request_id: h("x-request-id"),
            // traceparent: version-traceid-parentid-flags.
            trace_id: h("traceparent").and_then(|t| t.split('-').nth(1).map(str::to_string)),
            started: Some(Instant::now()),
        }
    }

    /// The response head's part: status and, for a local answer, why.
    pub fn respond<B>(&mut self, resp: &http::Response<B>) {
        self.status = resp.status().as_u16();
        self.error = resp
            .headers()
            .get("x-ferrum-error")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
    }
}

/// The time now, RFC 3339 with milliseconds.
pub fn now() -> String {
    format!("{:.3}", jiff::Timestamp::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(status: u16) -> Entry {
        Entry {
            start_time: now(),
            method: "GET".into(),
            authority: "a".into(),
            path: "/".into(),
            protocol: "HTTP/1.1",
            status,
            error: None,
            bytes_received: None,
            bytes_sent: 3,
            duration_ms: 1.5,
            complete: true,
            route: None,
            upstream_cluster: None,
            upstream_host: None,
            client: "127.0.0.1:1".into(),
            listener: "l".into(),
            user_agent: None,
            request_id: None,
            trace_id: None,
            started: None,
        }
    }

    #[test]
    fn lines_are_json_and_written_off_the_caller() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let log = AccessLog::default();
        log.set_path(path.clone());
        for s in [200, 404, 503] {
            log.send(entry(s));
        }
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        while log.written.load(Relaxed) < 3 && Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let statuses: Vec<u64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["status"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(statuses, [200, 404, 503]);
        assert!(text.contains("\"start_time\":\"20"), "{text}");
        assert_eq!(log.dropped.load(Relaxed), 0);
    }
}
