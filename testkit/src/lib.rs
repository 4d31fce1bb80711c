//! Test support: real HTTP backends on loopback, free ports, an HTTP client.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;

pub mod ext_authz;
pub mod h2c;
pub mod haproxy;
pub mod jwt;
pub mod l4;
pub mod netns;
pub mod otlp;
pub mod redis;

/// A real TLS ClientHello for `sni`, as rustls's client sends it first.
pub fn client_hello(sni: &str) -> Vec<u8> {
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
    let mut c = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    let mut out = Vec::new();
    c.write_tls(&mut out).unwrap();
    out
}

/// A listener on a free loopback port whose accept queue holds a burst. The default queue
/// (128) overflows when a proxy opens hundreds of upstream connections at once to a server
/// that shares the test's runtime; the kernel then drops SYNs (a second's stall each) and
/// resets some connections after their request was sent, which a proxy rightly reports as
/// `upstream_reset`.
pub async fn listen_local() -> tokio::net::TcpListener {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind(([127, 0, 0, 1], 0).into()).unwrap();
    s.listen(4096).unwrap()
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    // Above the mesh ports (15000-15090) and below the kernel's ephemeral range (32768-60999
    // by default), which port 0 would pick from: there, any outgoing connection made before
    // the test binds the port can take it as its source port (an Envoy admin port was lost
    // that way in CI).
    // Never the same port twice in one test process: tests run in parallel, and two could
    // otherwise pick one port before either binds it.
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = fastrand::u16(20_000..32_768);
        let mut given = GIVEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !given.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
}

/// A child process, killed (and reaped) on drop: a panicking test leaves nothing running.
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits (up to 5 s) until something accepts connections on 127.0.0.1:`port`; panics naming
/// `what` otherwise.
pub async fn until_listening(port: u16, what: &str) {
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what} did not listen on {port}");
}

/// An HTTP/1.1 + h2c backend that echoes what it received as JSON.
/// `?status=N` answers N, `?delay=MS` waits first; `/healthz` answers `health_status`.
pub struct Backend {
    pub addr: SocketAddr,
    pub name: String,
    pub hits: Arc<AtomicU64>,
    pub health_status: Arc<AtomicU16>,
    /// Status for every non-health request when non-zero.
    pub force_status: Arc<AtomicU16>,
    /// The last request it answered: its echo, with `body` (as UTF-8, lossy) added.
    pub last: Arc<std::sync::Mutex<Option<serde_json::Value>>>,
    task: tokio::task::JoinHandle<()>,
}

/// A CA for client certificates, and a client certificate it issued: (CA PEM, client
/// certificate PEM, client key PEM).
pub fn client_ca_and_cert(client: &str) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::default();
    ca.distinguished_name.push(DnType::CommonName, "test client CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec![client.to_string()]).unwrap();
    leaf.distinguished_name.push(DnType::CommonName, client);
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        Backend::serve(name, None).await
    }

    /// The same backend over TLS (HTTP/1.1 and h2 by ALPN) with a self-signed certificate for
    /// `host`, and that certificate in PEM: the CA a client must trust.
    pub async fn start_tls(name: &str, host: &str) -> (Backend, String) {
        Backend::start_tls_verifying(name, host, None).await
    }

    /// [`Backend::start_tls`] that answers only clients presenting a certificate issued by
    /// `client_ca` (PEM): mutual TLS.
    pub async fn start_mtls(name: &str, host: &str, client_ca: &str) -> (Backend, String) {
        Backend::start_tls_verifying(name, host, Some(client_ca)).await
    }

    /// [`Backend::start_tls`] whose certificate names `host` and the URIs `uris` (URI SANs,
    /// such as `spiffe://…`).
    pub async fn start_tls_with_uris(name: &str, host: &str, uris: &[&str]) -> (Backend, String) {
        Backend::start_tls_certified(name, host, uris, None).await
    }

    async fn start_tls_verifying(name: &str, host: &str, client_ca: Option<&str>) -> (Backend, String) {
        Backend::start_tls_certified(name, host, &[], client_ca).await
    }

    async fn start_tls_certified(name: &str, host: &str, uris: &[&str], client_ca: Option<&str>) -> (Backend, String) {
        let mut params = rcgen::CertificateParams::new(vec![host.to_string()]).unwrap();
        for uri in uris {
            params
                .subject_alt_names
                .push(rcgen::SanType::URI(rcgen::string::Ia5String::try_from(*uri).unwrap()));
        }
        let signing_key = rcgen::KeyPair::generate().unwrap();
        let c = rcgen::CertifiedKey {
            cert: params.self_signed(&signing_key).unwrap(),
            signing_key,
        };
        let key = rustls::pki_types::PrivateKeyDer::try_from(c.signing_key.serialize_der()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(pem) => {
                let mut roots = rustls::RootCertStore::empty();
                use rustls::pki_types::pem::PemObject;
                for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()) {
                    roots.add(cert.unwrap()).unwrap();
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut cfg = builder.with_single_cert(vec![c.cert.der().clone()], key).unwrap();
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        (Backend::serve(name, Some(acceptor)).await, c.cert.pem())
    }

    async fn serve(name: &str, tls: Option<tokio_rustls::TlsAcceptor>) -> Backend {
        let l = listen_local().await;
        let addr = l.local_addr().unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        let health_status = Arc::new(AtomicU16::new(200));
        let force_status = Arc::new(AtomicU16::new(0));
        let last = Arc::new(std::sync::Mutex::new(None));
        let (h, hs, fs, n, la) = (
            hits.clone(),
            health_status.clone(),
            force_status.clone(),
            name.to_string(),
            last.clone(),
        );
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else {
                    continue;
                };
                let (h, hs, fs, n, la) = (h.clone(), hs.clone(), fs.clone(), n.clone(), la.clone());
                let tls = tls.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let (h, hs, fs, n, la) = (h.clone(), hs.clone(), fs.clone(), n.clone(), la.clone());
                        async move { Ok::<_, Infallible>(respond(req, &n, &h, &hs, &fs, &la).await) }
                    });
                    let http = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let _ = match tls {
                        None => http.serve_connection(TokioIo::new(s), svc).await,
                        Some(tls) => match tls.accept(s).await {
                            Ok(s) => http.serve_connection(TokioIo::new(s), svc).await,
                            Err(_) => return,
                        },
                    };
                });
            }
        });
        Backend {
            addr,
            name: name.into(),
            hits,
            health_status,
            force_status,
            last,
            task,
        }
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(SeqCst)
    }

    /// The last request it answered (see [`Backend::last`]).
    pub fn last(&self) -> Option<serde_json::Value> {
        self.last.lock().unwrap().clone()
    }
}

async fn respond(
    req: hyper::Request<hyper::body::Incoming>,
    name: &str,
    hits: &AtomicU64,
    health: &AtomicU16,
    force: &AtomicU16,
    last: &std::sync::Mutex<Option<serde_json::Value>>,
) -> hyper::Response<Full<Bytes>> {
    if req.uri().path() == "/healthz" {
        let mut r = hyper::Response::new(Full::new(Bytes::from_static(b"ok")));
        *r.status_mut() = hyper::StatusCode::from_u16(health.load(SeqCst)).unwrap();
        return r;
    }
    hits.fetch_add(1, SeqCst);
    let q: BTreeMap<String, String> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
    if let Some(ms) = q.get("delay").and_then(|d| d.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let headers: BTreeMap<String, Vec<String>> = req
        .headers()
        .keys()
        .map(|k| {
            (
                k.to_string(),
                req.headers()
                    .get_all(k)
                    .iter()
                    .map(|v| v.to_str().unwrap_or("").to_string())
                    .collect(),
            )
        })
        .collect();
    let method = req.method().to_string();
    let path = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
    let version = format!("{:?}", req.version());
    // A body that fails (reset, truncated) is not a request answered: `last` keeps the one before.
    let body = req.into_body().collect().await.map(|b| b.to_bytes()).ok();
    let len = body.as_ref().map_or(0, Bytes::len);
    let json = serde_json::json!({"backend": name, "method": method, "path": path, "headers": headers, "version": version, "body_len": len});
    if let Some(body) = body {
        let mut seen = json.clone();
        seen["body"] = String::from_utf8_lossy(&body).into();
        *last.lock().unwrap() = Some(seen);
    }
    let mut r = hyper::Response::new(Full::new(Bytes::from(json.to_string())));
    let status = match force.load(SeqCst) {
        0 => q.get("status").and_then(|s| s.parse().ok()).unwrap_or(200),
        s => s,
    };
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
    r.headers_mut().insert("x-backend", name.parse().unwrap());
    r
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// [`client`] connecting from `local` (a loopback address other than 127.0.0.1: a client the
/// proxy can tell from a load balancer), one connection per request.
pub fn client_from(local: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .local_address(local.parse::<std::net::IpAddr>().unwrap())
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

/// The body of a GET of `url` (panics on a transport error).
pub async fn get_text(url: &str) -> String {
    client().get(url).send().await.unwrap().text().await.unwrap()
}

pub async fn get_json(url: &str) -> (u16, Value) {
    let r = client().get(url).send().await.unwrap();
    let s = r.status().as_u16();
    let t = r.text().await.unwrap();
    (s, serde_json::from_str(&t).unwrap_or(Value::String(t)))
}

/// How long a test waits for a change to reach a proxy. Users see far less (`make
/// bench-operator` measures it: p99 ~100 ms with 10,000 routes); the bound only keeps a loaded CI
/// machine from failing a correct run, and a wait ends as soon as the change is seen.
pub const PROPAGATION: Duration = Duration::from_secs(5);

/// Polls `f` until it holds or `within` passes.
pub async fn eventually<F: AsyncFnMut() -> bool>(what: &str, within: Duration, mut f: F) {
    let deadline = Instant::now() + within;
    while !f().await {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
