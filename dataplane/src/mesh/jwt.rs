//! RequestAuthentication: JWTs on inbound HTTP requests, validated with `jsonwebtoken` against
//! each rule's JWKS (inline, or fetched from `jwksUri` and refreshed in the background). As in
//! Istio: a request without a token passes unauthenticated (an AuthorizationPolicy may require
//! `requestPrincipals`); a token that no rule accepts is refused with 401. A valid token gives
//! the request principal `<iss>/<sub>` and its claims to the AuthorizationPolicies.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use ferrum_snapshot::Resources;
use ferrum_snapshot::istio::JwtRule;
use ferrum_snapshot::mesh::{Policy, PolicyRule, Workload};
use ferrum_snapshot::translate::{Jwks, JwksFetch};
use http::HeaderName;
use http::header::{AUTHORIZATION, COOKIE};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

/// How often a fetched JWKS is fetched again (Istio's default), and after a failure.
const REFRESH: Duration = Duration::from_secs(20 * 60);
const RETRY: Duration = Duration::from_secs(5);
/// Fetch timeout when the rule names none.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JWKS document read.
const MAX_JWKS_BYTES: usize = 1 << 20;
/// Longest token looked at.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// A validated token: who it names and what it says.
#[derive(Debug, Clone)]
pub struct Jwt {
    /// `<iss>/<sub>`, Istio's request principal.
    pub principal: String,
    pub claims: Map<String, Value>,
}

/// One key of a JWKS, ready to verify with.
struct Key {
    kid: Option<String>,
    key: DecodingKey,
    algorithm: Option<Algorithm>,
}

/// The keys of a JWKS, parsed once.
#[derive(Default)]
pub struct Keys(Vec<Key>);

/// Why a JWKS could not be had.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("not a JWKS: {0}")]
    Parse(#[source] serde_json::Error),
    #[error("the JWKS has no usable key")]
    NoUsableKey,
    #[error("{0}")]
    Uri(#[source] http::uri::InvalidUri),
    /// The request failed; the text carries each cause (a bare "client error" says nothing).
    #[error("{0}")]
    Request(String),
    #[error("status {0}")]
    Status(http::StatusCode),
    #[error("{0}")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the JWKS is not UTF-8")]
    NotUtf8,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// Why a token did not verify.
#[derive(Debug, thiserror::Error)]
enum TokenError {
    #[error("{0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
    #[error("symmetric algorithms are not accepted")]
    Symmetric,
    #[error("JWKS {0} not fetched yet")]
    NotFetched(String),
    #[error("no key of the JWKS matches")]
    NoMatchingKey,
}

impl Keys {
    pub fn parse(json: &str) -> Result<Keys, JwksError> {
        let set: JwkSet = serde_json::from_str(json).map_err(JwksError::Parse)?;
        let keys = set
            .keys
            .iter()
            .filter_map(|k| {
                Some(Key {
                    kid: k.common.key_id.clone(),
                    key: DecodingKey::from_jwk(k).ok()?,
                    algorithm: k.common.key_algorithm.and_then(|a| a.to_string().parse().ok()),
                })
            })
            .collect::<Vec<_>>();
        if keys.is_empty() {
            return Err(JwksError::NoUsableKey);
        }
        Ok(Keys(keys))
    }
}

/// A JWKS fetched from a URI: empty until the first fetch succeeds (tokens it must verify are
/// refused meanwhile), then refreshed while any configuration uses it.
pub struct Remote {
    uri: String,
    keys: ArcSwapOption<Keys>,
    /// The document the keys came from, as served.
    json: ArcSwapOption<String>,
    /// Why the last fetch failed, while no fetch has succeeded yet.
    failure: ArcSwapOption<String>,
    changes: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Remote {
    /// The JWKS document last fetched, if any fetch succeeded yet.
    pub fn json(&self) -> Option<Arc<String>> {
        self.json.load_full()
    }

    /// Why the JWKS is not available: set while every fetch so far has failed (keys fetched
    /// once stay in use when a later refresh fails, so that is no failure here).
    pub fn failure(&self) -> Option<Arc<String>> {
        self.failure.load_full()
    }
}

/// The remote JWKS in use, by URI: one fetcher per URI however many rules and reloads name it.
pub struct JwksCache {
    remotes: Mutex<HashMap<String, Weak<Remote>>>,
    /// Counts fetches that brought a different document.
    changes: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Default for JwksCache {
    fn default() -> Self {
        JwksCache {
            remotes: Mutex::default(),
            changes: Arc::new(tokio::sync::watch::Sender::new(0)),
        }
    }
}

impl JwksCache {
    /// Changes when a fetch brings a JWKS document different from the one before.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The JWKS at `uri`, starting its fetcher when nothing holds it yet.
    pub fn get(&self, uri: &str, timeout: Duration) -> Arc<Remote> {
        let mut m = self.remotes.lock().unwrap();
        if let Some(r) = m.get(uri).and_then(Weak::upgrade) {
            return r;
        }
        let r = Arc::new(Remote {
            uri: uri.to_string(),
            keys: ArcSwapOption::empty(),
            json: ArcSwapOption::empty(),
            failure: ArcSwapOption::empty(),
            changes: self.changes.clone(),
        });
        m.retain(|_, w| w.strong_count() > 0);
        m.insert(uri.to_string(), Arc::downgrade(&r));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(refresh(Arc::downgrade(&r), timeout));
        }
        r
    }
}

/// The JWKS that RequestAuthentications name by `jwksUri`, fetched by a producer of snapshots
/// (the operator, as istiod does; `ferrumctl explain`) to be put inline: Envoy validates with
/// them — it is given no cluster to fetch from — and sidecars fetch nothing. Each URI is fetched
/// with [`JwksCache`]'s fetchers (1 MiB, the rule's timeout, every 20 minutes, every 5 s after a
/// failure) while an object names it.
#[derive(Default)]
pub struct Fetched {
    cache: JwksCache,
    /// The URIs the current objects name: holding them keeps their fetchers going.
    held: Mutex<BTreeMap<String, Arc<Remote>>>,
}

impl Fetched {
    /// Changes when a fetch brings a different document, or fails for a new reason before any
    /// succeeded.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.cache.changes()
    }

    /// Starts fetching what the RequestAuthentications of `res` name (and stops fetching what
    /// they no longer do); what the fetches brought so far, by URI.
    pub fn for_resources(&self, res: &Resources) -> Arc<Jwks> {
        let want = named_uris(res);
        let mut held = self.held.lock().unwrap();
        held.retain(|uri, _| want.contains_key(uri));
        for (uri, timeout) in want {
            held.entry(uri).or_insert_with_key(|uri| self.cache.get(uri, timeout));
        }
        Arc::new(
            held.iter()
                .filter_map(|(uri, r)| {
                    let got = match (r.json(), r.failure()) {
                        (Some(doc), _) => JwksFetch::Document(doc),
                        (None, Some(why)) => JwksFetch::Failed(why),
                        (None, None) => return None,
                    };
                    Some((uri.clone(), got))
                })
                .collect(),
        )
    }

    /// [`Self::for_resources`] once each URI's first fetch has ended (fetched or failed), or
    /// the longest of their timeouts has passed: what a one-off producer uses.
    pub async fn first_fetches(&self, res: &Resources) -> Arc<Jwks> {
        let want = named_uris(res);
        let within = want.values().max().copied().unwrap_or_default() + Duration::from_millis(100);
        let mut changed = self.changes();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let got = self.for_resources(res);
            if got.len() == want.len() {
                return got;
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => {}
                _ => return self.for_resources(res),
            }
        }
    }
}

/// The `jwksUri`s of rules without inline keys, with their fetch timeouts.
fn named_uris(res: &Resources) -> BTreeMap<String, Duration> {
    let mut want = BTreeMap::new();
    for r in res.request_authentications.iter().flat_map(|ra| &ra.spec.jwt_rules) {
        if let (None, Some(uri)) = (&r.jwks, &r.jwks_uri) {
            want.entry(uri.clone()).or_insert_with(|| fetch_timeout(r));
        }
    }
    want
}

/// Fetches `remote` now and every [`REFRESH`] (every [`RETRY`] after a failure) until no
/// configuration holds it.
async fn refresh(remote: Weak<Remote>, timeout: Duration) {
    let client = fetch_client();
    loop {
        let Some(r) = remote.upgrade() else { return };
        let got = fetch(&client, &r.uri, timeout).await;
        let wait = match got.and_then(|j| Keys::parse(&j).map(|k| (j, k))) {
            Ok((json, keys)) => {
                tracing::info!(uri = %r.uri, keys = keys.0.len(), "JWKS fetched");
                r.keys.store(Some(Arc::new(keys)));
                r.failure.store(None);
                if r.json.load().as_deref() != Some(&json) {
                    r.json.store(Some(Arc::new(json)));
                    r.changes.send_modify(|n| *n += 1);
                }
                REFRESH
            }
            Err(e) => {
                tracing::warn!(uri = %r.uri, error = %e, "cannot fetch JWKS");
                let e = e.to_string();
                // A new reason (not every retry) is a change: producers report it on status.
                if r.json.load().is_none() && r.failure.load().as_deref() != Some(&e) {
                    r.failure.store(Some(Arc::new(e)));
                    r.changes.send_modify(|n| *n += 1);
                }
                RETRY
            }
        };
        drop(r);
        tokio::time::sleep(wait).await;
    }
}

type FetchClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Empty<bytes::Bytes>,
>;

fn fetch_client() -> FetchClient {
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .with_root_certificates(rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        })
        .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(https)
}

/// `e` and what caused it ("client error (Connect): tcp connect error: Connection refused").
fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if !s.ends_with(&text) {
            s = format!("{s}: {text}");
        }
        cur = c.source();
    }
    s
}

async fn fetch(client: &FetchClient, uri: &str, timeout: Duration) -> Result<String, JwksError> {
    use http_body_util::BodyExt;
    let uri: http::Uri = uri.parse().map_err(JwksError::Uri)?;
    let get = async {
        let resp = client.get(uri).await.map_err(|e| JwksError::Request(with_causes(&e)))?;
        if !resp.status().is_success() {
            return Err(JwksError::Status(resp.status()));
        }
        let body = http_body_util::Limited::new(resp.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(JwksError::Body)?
            .to_bytes();
        String::from_utf8(body.to_vec()).map_err(|_| JwksError::NotUtf8)
    };
    tokio::time::timeout(timeout, get)
        .await
        .map_err(|_| JwksError::Timeout(timeout))?
}

enum Source {
    Inline(Keys),
    Remote(Arc<Remote>),
}

/// Where a token is looked for.
enum Location {
    Header { name: HeaderName, prefix: String },
    Param(String),
    Cookie(String),
}

struct Rule {
    issuer: String,
    audiences: Vec<String>,
    keys: Source,
    locations: Vec<Location>,
    claim_headers: Vec<(HeaderName, String)>,
    payload_header: Option<HeaderName>,
    forward: bool,
}

/// The RequestAuthentication rules that select one workload, compiled.
#[derive(Default)]
pub struct Authenticator {
    rules: Vec<Rule>,
    /// Every rule's output headers: what a client sends in them is removed from every request,
    /// so the app can trust them to come from a verified token (Envoy sanitises them the same
    /// way, filter-wide).
    outputs: Vec<HeaderName>,
}

/// Why a request's token was refused (the 401's log line).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

impl Authenticator {
    /// The rules of every RequestAuthentication that applies to `w`. Rules the translator would
    /// not pass (a JWKS that does not parse) are left out, so their tokens are refused.
    pub fn for_workload(policies: &[Arc<Policy>], w: &Workload, cache: &JwksCache) -> Authenticator {
        Authenticator::compile(policies.iter().filter(|p| p.applies_to(w)).map(|p| &**p), cache)
    }

    /// The RequestAuthentications among `policies`, compiled (the rest are skipped).
    pub fn compile<'a>(policies: impl Iterator<Item = &'a Policy>, cache: &JwksCache) -> Authenticator {
        let mut rules = Vec::new();
        for p in policies {
            let PolicyRule::RequestAuthentication(ra) = &p.rule else {
                continue;
            };
            rules.extend(ra.jwt_rules.iter().filter_map(|r| compile(r, cache)));
        }
        Authenticator::of(rules)
    }

    fn of(rules: Vec<Rule>) -> Authenticator {
        let mut outputs: Vec<HeaderName> = rules
            .iter()
            .flat_map(|r| r.claim_headers.iter().map(|(h, _)| h).chain(&r.payload_header))
            .cloned()
            .collect();
        outputs.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
        outputs.dedup();
        Authenticator { rules, outputs }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Validates the request's token, if it has one, and applies the rule's header outputs;
    /// output headers the client sent are removed whatever the token.
    pub fn authenticate(&self, req: &mut http::request::Parts) -> Result<Option<Jwt>, Refused> {
        let found = self.find(req);
        for h in &self.outputs {
            req.headers.remove(h);
        }
        let Some((token, at)) = found else {
            return Ok(None);
        };
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Refused("token too long".into()));
        }
        let issuer = unverified_issuer(&token).ok_or_else(|| Refused("malformed token".into()))?;
        let mut last = format!("no rule for issuer {issuer:?}");
        for rule in self.rules.iter().filter(|r| r.issuer == issuer) {
            match rule.verify(&token) {
                Ok(claims) => {
                    rule.output(req, &claims, &token, at);
                    let sub = claims.get("sub").and_then(Value::as_str).unwrap_or("");
                    return Ok(Some(Jwt {
                        principal: format!("{issuer}/{sub}"),
                        claims,
                    }));
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(Refused(last))
    }

    /// The first token any rule's locations hold, and which rule and location found it.
    fn find(&self, req: &http::request::Parts) -> Option<(String, (usize, usize))> {
        for (ri, r) in self.rules.iter().enumerate() {
            for (li, l) in r.locations.iter().enumerate() {
                if let Some(t) = l.take(req) {
                    return Some((t, (ri, li)));
                }
            }
        }
        None
    }
}

impl Location {
    fn take(&self, req: &http::request::Parts) -> Option<String> {
        match self {
            Location::Header { name, prefix } => {
                let v = req.headers.get(name)?.to_str().ok()?;
                let t = if prefix.is_empty() {
                    v
                } else {
                    // Envoy compares the prefix case-sensitively except for "Bearer ".
                    v.strip_prefix(prefix.as_str())
                        .or_else(|| (prefix == "Bearer ").then(|| v.strip_prefix("bearer ")).flatten())?
                };
                Some(t.trim().to_string()).filter(|t| !t.is_empty())
            }
            Location::Param(name) => form_urlencoded::parse(req.uri.query()?.as_bytes())
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.into_owned()),
            Location::Cookie(name) => req
                .headers
                .get_all(COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|c| c.trim().split_once('='))
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.to_string()),
        }
    }
}

/// The `iss` of a token, before its signature is checked (to pick the rule that checks it).
fn unverified_issuer(token: &str) -> Option<String> {
    let mut v = Validation::default();
    v.insecure_disable_signature_validation();
    v.validate_exp = false;
    v.validate_aud = false;
    v.required_spec_claims.clear();
    let data = jsonwebtoken::decode::<Map<String, Value>>(token, &DecodingKey::from_secret(&[]), &v).ok()?;
    data.claims.get("iss")?.as_str().map(str::to_string)
}

/// How long fetching a rule's `jwksUri` may take: its `timeout`, else 5 s.
pub fn fetch_timeout(r: &JwtRule) -> Duration {
    r.timeout
        .as_deref()
        .and_then(|t| ferrum_snapshot::translate::parse_duration_ms(t).ok())
        .map(Duration::from_millis)
        .unwrap_or(FETCH_TIMEOUT)
}

fn compile(r: &JwtRule, cache: &JwksCache) -> Option<Rule> {
    let keys = match (&r.jwks, &r.jwks_uri) {
        (Some(inline), _) => Source::Inline(Keys::parse(inline).ok()?),
        (None, Some(uri)) => Source::Remote(cache.get(uri, fetch_timeout(r))),
        (None, None) => return None,
    };
    let mut locations: Vec<Location> = r
        .from_headers
        .iter()
        .filter_map(|h| {
            Some(Location::Header {
                name: h.name.parse().ok()?,
                prefix: h.prefix.clone().unwrap_or_default(),
            })
        })
        .chain(r.from_params.iter().map(|p| Location::Param(p.clone())))
        .chain(r.from_cookies.iter().map(|c| Location::Cookie(c.clone())))
        .collect();
    if locations.is_empty() {
        locations = vec![
            Location::Header {
                name: AUTHORIZATION,
                prefix: "Bearer ".into(),
            },
            Location::Param("access_token".into()),
        ];
    }
    Some(Rule {
        issuer: r.issuer.clone(),
        audiences: r.audiences.clone(),
        keys,
        locations,
        claim_headers: r
            .output_claim_to_headers
            .iter()
            .filter_map(|c| Some((c.header.parse().ok()?, c.claim.clone())))
            .collect(),
        payload_header: r.output_payload_to_header.as_deref().and_then(|h| h.parse().ok()),
        forward: r.forward_original_token,
    })
}

impl Rule {
    fn verify(&self, token: &str) -> Result<Map<String, Value>, TokenError> {
        let header = jsonwebtoken::decode_header(token)?;
        if matches!(header.alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
            return Err(TokenError::Symmetric);
        }
        let remote;
        let keys: &Keys = match &self.keys {
            Source::Inline(k) => k,
            Source::Remote(r) => {
                remote = r
                    .keys
                    .load_full()
                    .ok_or_else(|| TokenError::NotFetched(r.uri.clone()))?;
                &remote
            }
        };
        let mut v = Validation::new(header.alg);
        v.set_issuer(&[&self.issuer]);
        if self.audiences.is_empty() {
            v.validate_aud = false;
        } else {
            v.set_audience(&self.audiences);
        }
        v.required_spec_claims.clear();
        v.validate_nbf = true;
        let mut last = TokenError::NoMatchingKey;
        let candidates = keys.0.iter().filter(|k| {
            header.kid.as_ref().is_none_or(|kid| k.kid.as_ref() == Some(kid))
                && k.algorithm.is_none_or(|a| a == header.alg)
        });
        for k in candidates {
            match jsonwebtoken::decode::<Map<String, Value>>(token, &k.key, &v) {
                Ok(d) => return Ok(d.claims),
                Err(e) => last = e.into(),
            }
        }
        Err(last)
    }

    /// `outputClaimToHeaders`, `outputPayloadToHeader`, and the token removed unless
    /// `forwardOriginalToken`.
    fn output(&self, req: &mut http::request::Parts, claims: &Map<String, Value>, token: &str, _at: (usize, usize)) {
        for (h, claim) in &self.claim_headers {
            let v = match claims.get(claim) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(","),
                Some(v @ (Value::Number(_) | Value::Bool(_))) => v.to_string(),
                _ => continue,
            };
            if let Ok(v) = http::HeaderValue::from_str(&v) {
                req.headers.insert(h.clone(), v);
            }
        }
        if let Some(h) = &self.payload_header
            && let Some(payload) = token.split('.').nth(1)
            && let Ok(v) = http::HeaderValue::from_str(payload)
        {
            req.headers.insert(h.clone(), v);
        }
        if !self.forward {
            for l in &self.locations {
                if let Location::Header { name, .. } = l {
                    req.headers.remove(name);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    /// A P-256 key (rcgen) as an encoding key and its public half as a JWKS.
    fn key(kid: &str) -> (EncodingKey, String) {
        let kp = rcgen::KeyPair::generate().unwrap();
        let point = kp.public_key_raw();
        let (x, y) = point[1..].split_at(32);
        let jwk = json!({"kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256",
                         "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y)});
        let enc = EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap();
        (enc, json!({"keys": [jwk]}).to_string())
    }

    fn token(k: &EncodingKey, kid: &str, claims: Value) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(kid.into());
        jsonwebtoken::encode(&h, &claims, k).unwrap()
    }

    fn authenticator(jwks: &str) -> Authenticator {
        let rule: JwtRule = serde_json::from_value(json!({
            "issuer": "https://issuer.example", "audiences": ["svc"], "jwks": jwks,
            "outputClaimToHeaders": [{"header": "x-sub", "claim": "sub"}]
        }))
        .unwrap();
        Authenticator::of(vec![compile(&rule, &JwksCache::default()).unwrap()])
    }

    fn request(auth: Option<&str>) -> http::request::Parts {
        let mut b = http::Request::builder().uri("/x");
        if let Some(t) = auth {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        b.body(()).unwrap().into_parts().0
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn a_valid_token_names_its_principal_and_bad_ones_are_refused() {
        let (k, jwks) = key("k1");
        let a = authenticator(&jwks);
        let claims = |iss: &str, aud: &str, exp: u64| json!({"iss": iss, "sub": "alice", "aud": aud, "exp": exp});
        let good = token(&k, "k1", claims("https://issuer.example", "svc", now() + 600));
        let mut req = request(Some(&good));
        let jwt = a.authenticate(&mut req).unwrap().unwrap();
        assert_eq!(jwt.principal, "https://issuer.example/alice");
        assert_eq!(req.headers["x-sub"], "alice", "outputClaimToHeaders");
        assert!(req.headers.get("authorization").is_none(), "not forwarded by default");

        assert!(a.authenticate(&mut request(None)).unwrap().is_none(), "no token passes");
        let (other, _) = key("k1");
        for (why, t) in [
            (
                "expired",
                token(&k, "k1", claims("https://issuer.example", "svc", now() - 600)),
            ),
            (
                "audience",
                token(&k, "k1", claims("https://issuer.example", "nope", now() + 600)),
            ),
            (
                "issuer",
                token(&k, "k1", claims("https://elsewhere", "svc", now() + 600)),
            ),
            (
                "signature",
                token(&other, "k1", claims("https://issuer.example", "svc", now() + 600)),
            ),
            ("garbage", "a.b.c".to_string()),
        ] {
            assert!(a.authenticate(&mut request(Some(&t))).is_err(), "{why}");
        }
    }

    /// A client cannot pass itself off as a token's subject by sending the header the rule
    /// writes the claim to: with no token, with a token that lacks the claim, or beside a good one.
    #[test]
    fn output_headers_come_only_from_a_verified_token() {
        let (k, jwks) = key("k1");
        let a = authenticator(&jwks);
        let exp = now() + 600;
        let with_sub = token(
            &k,
            "k1",
            json!({"iss": "https://issuer.example", "sub": "alice", "aud": "svc", "exp": exp}),
        );
        let no_sub = token(
            &k,
            "k1",
            json!({"iss": "https://issuer.example", "aud": "svc", "exp": exp}),
        );
        for (t, want) in [(None, None), (Some(&no_sub), None), (Some(&with_sub), Some("alice"))] {
            let mut req = request(t.map(String::as_str));
            req.headers.append("x-sub", "admin".parse().unwrap());
            req.headers.append("x-sub", "root".parse().unwrap());
            a.authenticate(&mut req).unwrap();
            let got: Vec<_> = req.headers.get_all("x-sub").iter().collect();
            assert_eq!(got, want.into_iter().collect::<Vec<_>>(), "token: {}", t.is_some());
        }
    }

    #[test]
    fn tokens_are_found_where_the_rule_says() {
        let (k, jwks) = key("k1");
        let a = authenticator(&jwks);
        let t = token(
            &k,
            "k1",
            json!({"iss": "https://issuer.example", "sub": "bob", "aud": ["x", "svc"], "exp": now() + 60}),
        );
        let mut req = http::Request::builder()
            .uri(format!("/x?a=1&access_token={t}"))
            .body(())
            .unwrap()
            .into_parts()
            .0;
        assert_eq!(
            a.authenticate(&mut req).unwrap().unwrap().principal,
            "https://issuer.example/bob"
        );
    }
}
