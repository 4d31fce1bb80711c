//! Rate limits (RateLimitPolicy): each rule counts the requests it selects in fixed windows
//! aligned to the epoch and refuses those over its limit (429). `Local` counts live in the
//! proxy, lock-free; `Global` counts in Redis (`--rate-limit-redis`), shared by every proxy
//! pointed at it. A request is counted by every rule that selects it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferrum_snapshot::model::{DistinctValues, RateLimit, RateLimitRule};
use http::{HeaderMap, HeaderName};

use crate::mesh::policy::Net;
use crate::router::Matcher;

/// How long a Redis count may take before the request goes on uncounted.
const REDIS_TIMEOUT: Duration = Duration::from_millis(100);

/// Per-client counts a distinct rule keeps in the proxy: a client beyond them in one window
/// (all slots taken by others) is let through and counted as `overflow`.
const SLOTS: usize = 4096;
/// Slots looked at for a client's count.
const PROBES: usize = 8;

/// One policy's counts by outcome, for `/metrics`.
#[derive(Default)]
pub struct RateLimitStats {
    pub allowed: AtomicU64,
    pub limited: AtomicU64,
    /// Redis did not answer in time (or a distinct table was full): let through uncounted.
    pub error: AtomicU64,
}

/// Where a request stands under a limit: what the `x-ratelimit-*` headers say (Envoy's
/// `DRAFT_VERSION_03`), on its answer, and on the 429 when nothing remains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub limit: u32,
    pub remaining: u32,
    /// Seconds until the window ends.
    pub reset: u64,
}

impl Quota {
    pub fn headers(self) -> [(HeaderName, http::HeaderValue); 3] {
        [
            (HeaderName::from_static("x-ratelimit-limit"), self.limit.into()),
            (HeaderName::from_static("x-ratelimit-remaining"), self.remaining.into()),
            (HeaderName::from_static("x-ratelimit-reset"), self.reset.into()),
        ]
    }

    /// The one of `a` and `b` closer to refusing.
    pub fn tighter(a: Option<Quota>, b: Option<Quota>) -> Option<Quota> {
        match (a, b) {
            (Some(a), Some(b)) => Some(if b.remaining < a.remaining { b } else { a }),
            (a, b) => a.or(b),
        }
    }
}

/// The limits of every config, by policy: a policy whose spec did not change keeps its counts
/// across reloads.
#[derive(Default)]
pub struct Limiters {
    by_name: Mutex<HashMap<String, Weak<Limiter>>>,
    redis: std::sync::OnceLock<Arc<Redis>>,
}

impl Limiters {
    /// Global policies count in the Redis at `url` (`redis://host:port[/db]`), from the next
    /// config on.
    pub fn use_redis(&self, url: &str) -> Result<(), redis::RedisError> {
        let r = Redis {
            client: redis::Client::open(url)?,
            conn: tokio::sync::OnceCell::new(),
        };
        let _ = self.redis.set(Arc::new(r));
        Ok(())
    }

    /// The limiter of `spec`: the one already counting for it, or a new one.
    pub fn get(&self, spec: &Arc<RateLimit>, stats: Arc<RateLimitStats>) -> Arc<Limiter> {
        let mut by_name = self.by_name.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        by_name.retain(|_, l| l.strong_count() > 0);
        if let Some(l) = by_name.get(&spec.name).and_then(Weak::upgrade)
            && *l.spec == **spec
        {
            return l;
        }
        let redis = match (self.redis.get(), spec.global) {
            (Some(r), true) => Some(r.clone()),
            (None, true) => {
                tracing::warn!(policy = %spec.name, "a Global rate limit without --rate-limit-redis: counted in this proxy only");
                None
            }
            _ => None,
        };
        let l = Arc::new(Limiter {
            spec: spec.clone(),
            rules: spec.rules.iter().map(Rule::new).collect(),
            redis,
            stats,
        });
        by_name.insert(spec.name.clone(), Arc::downgrade(&l));
        l
    }
}

struct Redis {
    client: redis::Client,
    /// Connected on first use (and reconnecting on its own after that).
    conn: tokio::sync::OnceCell<redis::aio::ConnectionManager>,
}

impl Redis {
    /// Adds one to `key` (expiring after `ttl` seconds) and returns the count.
    async fn incr(&self, key: &str, ttl: u32) -> Result<u64, redis::RedisError> {
        let conn = self
            .conn
            .get_or_try_init(|| redis::aio::ConnectionManager::new(self.client.clone()))
            .await?;
        let mut conn = conn.clone();
        let (count,): (u64,) = redis::pipe()
            .atomic()
            .incr(key, 1)
            .expire(key, i64::from(ttl))
            .ignore()
            .query_async(&mut conn)
            .await?;
        Ok(count)
    }
}

pub struct Limiter {
    spec: Arc<RateLimit>,
    rules: Vec<Rule>,
    redis: Option<Arc<Redis>>,
    stats: Arc<RateLimitStats>,
}

struct Rule {
    headers: Vec<(HeaderName, Option<Matcher>)>,
    clients: Vec<(Net, bool)>,
    requests: u32,
    window_secs: u32,
    distinct: bool,
    /// The count of a rule that is not distinct.
    shared: Window,
    /// Per client (hash of its distinct values), for a distinct rule counted here.
    by_client: Option<Box<[AtomicU64]>>,
}

impl Rule {
    fn new(r: &RateLimitRule) -> Rule {
        // validate() checked names, regexes and blocks.
        let headers: Vec<_> = r
            .headers
            .iter()
            .filter_map(|h| {
                let name = HeaderName::try_from(h.name.as_str()).ok()?;
                let m = h.value.as_ref().map(Matcher::new).transpose().ok()?;
                Some((name, m))
            })
            .collect();
        let clients: Vec<_> = r
            .clients
            .iter()
            .filter_map(|c| Some((Net::parse(&c.cidr)?, c.distinct)))
            .collect();
        let distinct = headers.iter().any(|(_, m)| m.is_none()) || clients.iter().any(|(_, d)| *d);
        Rule {
            headers,
            clients,
            requests: r.requests,
            window_secs: r.window_secs,
            distinct,
            shared: Window::default(),
            by_client: distinct.then(|| (0..SLOTS).map(|_| AtomicU64::new(0)).collect()),
        }
    }

    /// Whether the rule selects the request, and the hash of its distinct values.
    fn selects(&self, headers: &HeaderMap, client: IpAddr) -> Option<u64> {
        let mut key = DistinctValues::default();
        for (name, m) in &self.headers {
            let v = headers.get(name)?.to_str().ok()?;
            match m {
                Some(m) if !m.is_match(v) => return None,
                Some(_) => {}
                None => key.header(v),
            }
        }
        for (net, distinct) in &self.clients {
            if !net.contains(client) {
                return None;
            }
            if *distinct {
                key.client(client);
            }
        }
        Some(key.finish())
    }
}

impl Limiter {
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Counts the request against every rule that selects it: `Err` with the first limit it is
    /// over, else the tightest of those it counted against (`None`: no rule selected it).
    pub async fn check(&self, headers: &HeaderMap, client: IpAddr) -> Result<Option<Quota>, Quota> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let (mut over, mut tightest) = (None, None);
        for (i, r) in self.rules.iter().enumerate() {
            let Some(key) = r.selects(headers, client) else {
                continue;
            };
            let window = now / u64::from(r.window_secs);
            let count = match &self.redis {
                Some(redis) => self.count_in_redis(redis, i, r, window, key).await,
                None => count_here(r, window, key),
            };
            let Some(count) = count else {
                self.stats.error.fetch_add(1, Relaxed);
                continue;
            };
            let quota = Quota {
                limit: r.requests,
                remaining: u64::from(r.requests).saturating_sub(count) as u32,
                reset: (window + 1) * u64::from(r.window_secs) - now,
            };
            if count > u64::from(r.requests) {
                over = over.or(Some(quota));
            }
            tightest = Quota::tighter(tightest, Some(quota));
        }
        match over {
            Some(q) => {
                self.stats.limited.fetch_add(1, Relaxed);
                Err(q)
            }
            None => {
                self.stats.allowed.fetch_add(1, Relaxed);
                Ok(tightest)
            }
        }
    }

    async fn count_in_redis(&self, redis: &Redis, rule: usize, r: &Rule, window: u64, key: u64) -> Option<u64> {
        let name = &self.spec.name;
        let k = RateLimit::redis_key(name, rule, window, r.distinct.then_some(key));
        match tokio::time::timeout(REDIS_TIMEOUT, redis.incr(&k, r.window_secs + 1)).await {
            Ok(Ok(n)) => Some(n),
            Ok(Err(e)) => {
                tracing::debug!(policy = %name, error = %e, "rate limit not counted: Redis failed");
                None
            }
            Err(_) => {
                tracing::debug!(policy = %name, "rate limit not counted: Redis did not answer in time");
                None
            }
        }
    }
}

fn count_here(r: &Rule, window: u64, key: u64) -> Option<u64> {
    match &r.by_client {
        Some(slots) => by_client(slots, window, key),
        None => Some(r.shared.hit(window)),
    }
}

/// One count in one window: the window's number (low 32 bits) and the count, in one atomic.
#[derive(Default)]
struct Window(AtomicU64);

impl Window {
    fn hit(&self, window: u64) -> u64 {
        let w = window as u32 as u64;
        let mut cur = self.0.load(Relaxed);
        loop {
            let next = if cur >> 32 == w {
                cur.saturating_add(1)
            } else {
                (w << 32) | 1
            };
            match self.0.compare_exchange_weak(cur, next, Relaxed, Relaxed) {
                Ok(_) => return next & 0xffff_ffff,
                Err(seen) => cur = seen,
            }
        }
    }
}

/// A client's count in a table of slots, each one atomic: the client's tag (24 bits of its
/// hash), the window's number (its low 8 bits) and the count (32 bits). A slot of another
/// window is free; a full table lets the client through (`None`).
fn by_client(slots: &[AtomicU64], window: u64, key: u64) -> Option<u64> {
    let tag = key >> 40;
    let w = window & 0xff;
    let start = key as usize;
    for i in 0..PROBES {
        let slot = &slots[(start + i) % slots.len()];
        let mut cur = slot.load(Relaxed);
        loop {
            let (t, sw, count) = (cur >> 40, (cur >> 32) & 0xff, cur & 0xffff_ffff);
            let next = if t == tag && sw == w {
                (cur & !0xffff_ffff) | (count + 1).min(0xffff_ffff)
            } else if sw != w || count == 0 {
                (tag << 40) | (w << 32) | 1
            } else {
                break; // another client's, this window
            };
            match slot.compare_exchange_weak(cur, next, Relaxed, Relaxed) {
                Ok(_) => return Some(next & 0xffff_ffff),
                Err(seen) => cur = seen,
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrum_snapshot::model::{RateLimitClients, RateLimitHeader, StringMatch};

    fn limiter(rules: Vec<RateLimitRule>) -> Arc<Limiter> {
        let spec = Arc::new(RateLimit {
            name: "ns/p".into(),
            global: false,
            rules,
        });
        Limiters::default().get(&spec, Default::default())
    }

    fn rule(requests: u32) -> RateLimitRule {
        RateLimitRule {
            headers: Vec::new(),
            clients: Vec::new(),
            requests,
            window_secs: 3600,
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (HeaderName::try_from(*k).unwrap(), v.parse().unwrap()))
            .collect()
    }

    #[tokio::test]
    async fn a_rule_allows_its_limit_per_window_then_refuses() {
        let l = limiter(vec![rule(3)]);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        for left in [2, 1, 0] {
            let q = l.check(&HeaderMap::new(), ip).await.unwrap().unwrap();
            assert_eq!((q.limit, q.remaining), (3, left));
        }
        let e = l.check(&HeaderMap::new(), ip).await.unwrap_err();
        assert_eq!((e.limit, e.remaining), (3, 0));
        assert!((1..=3600).contains(&e.reset), "{e:?}");
        assert_eq!((l.stats.allowed.load(Relaxed), l.stats.limited.load(Relaxed)), (3, 1));
        // The next window starts afresh.
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() / 3600;
        assert_eq!(l.rules[0].shared.hit(now + 1), 1);
    }

    #[tokio::test]
    async fn selectors_pick_requests_and_distinct_values_count_apart() {
        let mut r = rule(2);
        r.headers = vec![
            RateLimitHeader {
                name: "x-tier".into(),
                value: Some(StringMatch::Regex("free|trial".into())),
            },
            RateLimitHeader {
                name: "x-user".into(),
                value: None,
            },
        ];
        r.clients = vec![RateLimitClients {
            cidr: "10.0.0.0/8".into(),
            distinct: false,
        }];
        let l = limiter(vec![r]);
        let inside: IpAddr = "10.1.2.3".parse().unwrap();
        let (ann, bob) = (
            headers(&[("x-tier", "free"), ("x-user", "ann")]),
            headers(&[("x-tier", "trial"), ("x-user", "bob")]),
        );
        for _ in 0..2 {
            assert!(l.check(&ann, inside).await.is_ok());
        }
        assert!(l.check(&ann, inside).await.is_err(), "ann is over");
        assert!(l.check(&bob, inside).await.is_ok(), "bob has a count of his own");
        // Not selected: another tier, no user, another network — never counted.
        for h in [
            headers(&[("x-tier", "paid"), ("x-user", "ann")]),
            headers(&[("x-tier", "free")]),
        ] {
            assert!(l.check(&h, inside).await.is_ok());
        }
        assert!(l.check(&ann, "192.0.2.1".parse().unwrap()).await.is_ok());
    }

    #[test]
    fn a_full_client_table_lets_clients_through() {
        let slots: Vec<AtomicU64> = (0..PROBES).map(|_| AtomicU64::new(0)).collect();
        // Eight clients whose hashes start at the same slot fill the table.
        for c in 0..PROBES as u64 {
            assert_eq!(by_client(&slots, 7, (c + 1) << 40), Some(1));
        }
        assert_eq!(by_client(&slots, 7, 99 << 40), None);
        assert_eq!(by_client(&slots, 7, 1 << 40), Some(2), "a known client still counts");
        assert_eq!(by_client(&slots, 8, 99 << 40), Some(1), "the next window frees them");
    }

    #[test]
    fn a_policy_keeps_its_counts_across_configs_unless_it_changes() {
        let all = Limiters::default();
        let spec = Arc::new(RateLimit {
            name: "ns/p".into(),
            global: false,
            rules: vec![rule(5)],
        });
        let a = all.get(&spec, Default::default());
        assert!(Arc::ptr_eq(
            &a,
            &all.get(&Arc::new((*spec).clone()), Default::default())
        ));
        let changed = Arc::new(RateLimit {
            rules: vec![rule(6)],
            ..(*spec).clone()
        });
        assert!(!Arc::ptr_eq(&a, &all.get(&changed, Default::default())));
    }
}
