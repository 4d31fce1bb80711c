//! Test tokens: a P-256 issuer that signs JWTs (ES256, kid `k1`), its public half as a JWKS,
//! and that JWKS served over HTTP for rules that name it by `jwksUri`.

use std::convert::Infallible;
use std::net::SocketAddr;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

/// A key pair that issues tokens.
pub struct Issuer {
    key: EncodingKey,
    /// The public key as a JWKS document.
    pub jwks: String,
}

impl Default for Issuer {
    fn default() -> Self {
        let kp = rcgen::KeyPair::generate().unwrap();
        let point = kp.public_key_raw();
        let (x, y) = point[1..].split_at(32);
        let jwk = json!({"kty": "EC", "crv": "P-256", "kid": "k1", "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y)});
        Issuer {
            key: EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap(),
            jwks: json!({"keys": [jwk]}).to_string(),
        }
    }
}

impl Issuer {
    /// A token with these claims, signed.
    pub fn token(&self, claims: &Value) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some("k1".into());
        jsonwebtoken::encode(&h, claims, &self.key).unwrap()
    }
}

/// Seconds since the Unix epoch, for `exp` and `iat` claims.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// `jwks` served at every path of a free loopback port, until dropped.
pub struct JwksServer {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl JwksServer {
    pub async fn start(jwks: &str) -> JwksServer {
        let l = crate::listen_local().await;
        let addr = l.local_addr().unwrap();
        let doc = Bytes::from(jwks.to_string());
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let doc = doc.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |_req: hyper::Request<hyper::body::Incoming>| {
                        let mut r = hyper::Response::new(Full::new(doc.clone()));
                        r.headers_mut()
                            .insert("content-type", "application/json".parse().unwrap());
                        async move { Ok::<_, Infallible>(r) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        JwksServer { addr, task }
    }
}
