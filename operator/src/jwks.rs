//! The JWKS that RequestAuthentications name by `jwksUri`, fetched by the operator (as istiod
//! does) and put inline in the snapshot: Envoy validates with them — it is given no cluster to
//! fetch from — and sidecars fetch nothing. Each URI is fetched with ferrum-dp's fetcher (1 MiB,
//! the rule's timeout, every 20 minutes, every 5 s after a failure) while an object names it;
//! a fetch that brings a different document, or fails for a new reason before any succeeded,
//! makes a new translation (the RequestAuthentication's status says why its keys are missing).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use ferrum_dp::mesh::jwt::{JwksCache, Remote, fetch_timeout};
use ferrum_snapshot::Resources;
use ferrum_snapshot::translate::{Jwks, JwksFetch};

#[derive(Default)]
pub struct Fetched {
    cache: JwksCache,
    /// The URIs the current objects name: holding them keeps their fetchers going.
    held: Mutex<BTreeMap<String, Arc<Remote>>>,
}

impl Fetched {
    /// Changes when a fetch brings a different document.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.cache.changes()
    }

    /// Starts fetching what the RequestAuthentications of `res` name (and stops fetching what
    /// they no longer do); what the fetches brought so far, by URI.
    pub fn for_resources(&self, res: &Resources) -> Arc<Jwks> {
        let mut want = BTreeMap::new();
        for r in res.request_authentications.iter().flat_map(|ra| &ra.spec.jwt_rules) {
            if let (None, Some(uri)) = (&r.jwks, &r.jwks_uri) {
                want.entry(uri.clone()).or_insert_with(|| fetch_timeout(r));
            }
        }
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
}
