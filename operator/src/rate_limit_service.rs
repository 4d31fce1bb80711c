//! The rate limit service Envoy asks about `Global` RateLimitPolicies
//! (`envoy.service.ratelimit.v3`, on the operator's gRPC port). Each descriptor Envoy sends says
//! the policy, the rule, the limit and the blocks (`xds/rate_limit.rs`), so the service keeps
//! nothing but counts, in fixed windows aligned to the clock as ferrum-dp's: in Redis
//! (`--rate-limit-redis`) under the keys ferrum-dp counts under, so Envoy and ferrum-dp proxies
//! pointed at one Redis share one count; without it, in this operator (shared by the Envoys it
//! serves). A count Redis does not give in time lets the request go on, as in ferrum-dp.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit as CurrentLimit, rate_limit::Unit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService as Service, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use ferrum_proto::xds::{
    RATE_LIMIT_BLOCK_KEY, RATE_LIMIT_DOMAIN, RATE_LIMIT_HEADER_KEY, RATE_LIMIT_HEADER_VALUE_KEY, RATE_LIMIT_LIMIT_KEY,
    RATE_LIMIT_POLICY_KEY, RATE_LIMIT_RULE_KEY,
};
use ferrum_snapshot::model::{DistinctValues, RateLimit};

use crate::proxies::Proxies;

/// How long a Redis count may take (ferrum-dp's bound too).
const REDIS_TIMEOUT: Duration = Duration::from_millis(100);
/// Counts kept in memory at most, without Redis: past windows' are dropped first.
const MEMORY_COUNTS: usize = 100_000;

pub struct RateLimitService {
    counts: Counts,
    /// When proxies must present credentials: only hosts with a proxy stream open (which
    /// passed them) may ask. The filter's calls carry no credentials of their own.
    callers: Option<Arc<Proxies>>,
}

enum Counts {
    Redis {
        client: redis::Client,
        /// Connected on first use (and reconnecting on its own after that).
        conn: tokio::sync::OnceCell<redis::aio::ConnectionManager>,
    },
    /// Key → (the second its window ends, count).
    Memory(Mutex<HashMap<String, (u64, u64)>>),
}

/// What one descriptor counts against: a rule of a policy, for one window.
#[derive(Debug, PartialEq)]
struct Counted {
    key: String,
    requests: u32,
    window_secs: u32,
    /// Seconds until the window ends.
    reset: u64,
}

impl RateLimitService {
    /// Counting in the Redis at `redis` (`redis://host:port[/db]`), else in memory; answering
    /// only hosts with a stream among `callers`, when given.
    pub fn new(redis: Option<&str>, callers: Option<Arc<Proxies>>) -> Result<Self, redis::RedisError> {
        let counts = match redis {
            Some(url) => Counts::Redis {
                client: redis::Client::open(url)?,
                conn: tokio::sync::OnceCell::new(),
            },
            None => Counts::Memory(Mutex::default()),
        };
        Ok(RateLimitService { counts, callers })
    }

    pub fn server(self) -> RateLimitServiceServer<Self> {
        RateLimitServiceServer::new(self)
    }

    /// Adds `hits` to `c`'s count; `None` when Redis fails or does not answer in time.
    async fn count(&self, c: &Counted, hits: u64, now: u64) -> Option<u64> {
        match &self.counts {
            Counts::Redis { client, conn } => {
                let counted = async {
                    let conn = conn
                        .get_or_try_init(|| redis::aio::ConnectionManager::new(client.clone()))
                        .await?;
                    let (count,): (u64,) = redis::pipe()
                        .atomic()
                        .incr(&c.key, hits)
                        .expire(&c.key, i64::from(c.window_secs) + 1)
                        .ignore()
                        .query_async(&mut conn.clone())
                        .await?;
                    Ok::<_, redis::RedisError>(count)
                };
                match tokio::time::timeout(REDIS_TIMEOUT, counted).await {
                    Ok(Ok(n)) => Some(n),
                    Ok(Err(e)) => {
                        tracing::debug!(key = %c.key, error = %e, "rate limit not counted: Redis failed");
                        None
                    }
                    Err(_) => {
                        tracing::debug!(key = %c.key, "rate limit not counted: Redis did not answer in time");
                        None
                    }
                }
            }
            Counts::Memory(m) => {
                let mut m = m.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if m.len() >= MEMORY_COUNTS && !m.contains_key(&c.key) {
                    m.retain(|_, (ends, _)| *ends > now);
                    if m.len() >= MEMORY_COUNTS {
                        return None;
                    }
                }
                let (_, n) = m.entry(c.key.clone()).or_insert((now + c.reset, 0));
                *n += hits;
                Some(*n)
            }
        }
    }
}

#[tonic::async_trait]
impl Service for RateLimitService {
    async fn should_rate_limit(
        &self,
        request: tonic::Request<RateLimitRequest>,
    ) -> Result<tonic::Response<RateLimitResponse>, tonic::Status> {
        if let Some(proxies) = &self.callers {
            let from = request.remote_addr().map(|a| a.ip());
            if !from.is_some_and(|ip| proxies.connected_from(ip)) {
                tracing::debug!(?from, "rate limit check refused: no proxy stream from that host");
                return Err(tonic::Status::permission_denied(
                    "only hosts with an authenticated proxy stream may ask",
                ));
            }
        }
        let req = request.into_inner();
        if req.domain != RATE_LIMIT_DOMAIN {
            return Err(tonic::Status::invalid_argument(format!(
                "domain {:?}: this service counts domain {RATE_LIMIT_DOMAIN:?} only",
                req.domain
            )));
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let hits = u64::from(req.hits_addend.max(1));
        let mut over = false;
        let mut statuses = Vec::with_capacity(req.descriptors.len());
        for d in &req.descriptors {
            let status = match counted(d, now) {
                // Not ours, or the rule does not select the request: nothing to count.
                None => DescriptorStatus {
                    code: Code::Ok as i32,
                    ..Default::default()
                },
                Some(c) => {
                    let count = self.count(&c, hits, now).await;
                    let limited = count.is_some_and(|n| n > u64::from(c.requests));
                    over |= limited;
                    DescriptorStatus {
                        code: if limited { Code::OverLimit } else { Code::Ok } as i32,
                        current_limit: Some(current_limit(c.requests, c.window_secs)),
                        limit_remaining: u64::from(c.requests).saturating_sub(count.unwrap_or(0)) as u32,
                        duration_until_reset: Some(envoy_types::pb::google::protobuf::Duration {
                            seconds: c.reset as i64,
                            nanos: 0,
                        }),
                        ..Default::default()
                    }
                }
            };
            statuses.push(status);
        }
        Ok(tonic::Response::new(RateLimitResponse {
            overall_code: if over { Code::OverLimit } else { Code::Ok } as i32,
            statuses,
            ..Default::default()
        }))
    }
}

/// The limit as Envoy shows it (`x-ratelimit-limit`): Envoy knows whole units only, so a window
/// that is none says its requests per second.
fn current_limit(requests: u32, window_secs: u32) -> CurrentLimit {
    let unit = match window_secs {
        1 => Unit::Second,
        60 => Unit::Minute,
        3600 => Unit::Hour,
        86_400 => Unit::Day,
        _ => Unit::Second,
    };
    let requests_per_unit = match unit {
        Unit::Second if window_secs > 1 => (requests / window_secs).max(1),
        _ => requests,
    };
    CurrentLimit {
        name: String::new(),
        requests_per_unit,
        unit: unit as i32,
    }
}

/// What descriptor `d` counts against at `now` (seconds since the epoch): `None` when it is not
/// one of ours, or its rule does not select the request (the client is outside a block).
fn counted(d: &RateLimitDescriptor, now: u64) -> Option<Counted> {
    let mut entries = d.entries.iter();
    let mut next = |key: &str| entries.next().filter(|e| e.key == key).map(|e| e.value.as_str());
    let policy = next(RATE_LIMIT_POLICY_KEY)?;
    let rule: usize = next(RATE_LIMIT_RULE_KEY)?.parse().ok()?;
    let (requests, window_secs) = next(RATE_LIMIT_LIMIT_KEY)?.split_once('/')?;
    let (requests, window_secs): (u32, u32) = (requests.parse().ok()?, window_secs.parse().ok()?);
    if window_secs == 0 {
        return None;
    }
    let mut distinct = DistinctValues::default();
    let mut is_distinct = false;
    let mut block = None;
    for e in entries {
        match e.key.as_str() {
            k if k.starts_with(RATE_LIMIT_HEADER_VALUE_KEY) => {
                distinct.header(&e.value);
                is_distinct = true;
            }
            // Made only when the header matched.
            k if k.starts_with(RATE_LIMIT_HEADER_KEY) => {}
            k if k == RATE_LIMIT_BLOCK_KEY => block = Some(e.value.as_str()),
            "masked_remote_address" if block.take() == Some(e.value.as_str()) => {}
            // Outside the block: the rule does not select the request.
            "masked_remote_address" => return None,
            "remote_address" => {
                distinct.client(e.value.parse::<IpAddr>().ok()?);
                is_distinct = true;
            }
            _ => return None,
        }
    }
    let window = now / u64::from(window_secs);
    Some(Counted {
        key: RateLimit::redis_key(policy, rule, window, is_distinct.then(|| distinct.finish())),
        requests,
        window_secs,
        reset: (window + 1) * u64::from(window_secs) - now,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;

    fn descriptor(kv: &[(&str, &str)]) -> RateLimitDescriptor {
        RateLimitDescriptor {
            entries: kv
                .iter()
                .map(|(k, v)| Entry {
                    key: k.to_string(),
                    value: v.to_string(),
                })
                .collect(),
            ..Default::default()
        }
    }

    /// A rule on a matching header, a distinct one and a distinct /8 block, as Envoy describes a
    /// request from `client` with `x-user: alice` (`masked`: its address masked to /8).
    fn from(masked: &str, client: &str) -> RateLimitDescriptor {
        descriptor(&[
            ("ferrum_rate_limit", "shop/limits"),
            ("ferrum_rule", "1"),
            ("ferrum_limit", "5/60"),
            ("header_0", "1"),
            ("header_value_1", "alice"),
            ("ferrum_block", "10.0.0.0/8"),
            ("masked_remote_address", masked),
            ("remote_address", client),
        ])
    }

    #[test]
    fn a_descriptor_says_its_count_in_ferrum_dps_key() {
        let now = 1_800_000_030;
        let c = counted(&from("10.0.0.0/8", "10.1.2.3"), now).expect("counted");
        let mut distinct = DistinctValues::default();
        distinct.header("alice");
        distinct.client("10.1.2.3".parse().unwrap());
        assert_eq!(
            c,
            Counted {
                key: RateLimit::redis_key("shop/limits", 1, now / 60, Some(distinct.finish())),
                requests: 5,
                window_secs: 60,
                reset: 30,
            }
        );
        assert!(
            counted(&from("192.0.0.0/8", "192.1.2.3"), now).is_none(),
            "a client outside the block is not counted"
        );
        let shared = descriptor(&[
            ("ferrum_rate_limit", "shop/limits"),
            ("ferrum_rule", "0"),
            ("ferrum_limit", "100/1"),
        ]);
        assert_eq!(
            counted(&shared, now).unwrap().key,
            RateLimit::redis_key("shop/limits", 0, now, None)
        );
        for foreign in [
            descriptor(&[("generic_key", "x")]),
            descriptor(&[
                ("ferrum_rate_limit", "a/b"),
                ("ferrum_rule", "0"),
                ("ferrum_limit", "5/0"),
            ]),
            descriptor(&[
                ("ferrum_rate_limit", "a/b"),
                ("ferrum_rule", "0"),
                ("ferrum_limit", "5/1"),
                ("path", "/"),
            ]),
        ] {
            assert!(counted(&foreign, now).is_none(), "{foreign:?}");
        }
    }

    #[tokio::test]
    async fn requests_over_the_limit_are_over_limit_with_what_remains() {
        let service = RateLimitService::new(None, None).unwrap();
        let ask = |client: &'static str| {
            let req = RateLimitRequest {
                domain: RATE_LIMIT_DOMAIN.into(),
                descriptors: vec![descriptor(&[
                    ("ferrum_rate_limit", "shop/limits"),
                    ("ferrum_rule", "0"),
                    ("ferrum_limit", "2/3600"),
                    ("ferrum_block", "0.0.0.0/0"),
                    ("masked_remote_address", "0.0.0.0/0"),
                    ("remote_address", client),
                ])],
                hits_addend: 0,
            };
            let service = &service;
            async move {
                service
                    .should_rate_limit(tonic::Request::new(req))
                    .await
                    .unwrap()
                    .into_inner()
            }
        };
        let mut seen = Vec::new();
        for _ in 0..3 {
            let r = ask("10.0.0.1").await;
            seen.push((r.overall_code, r.statuses[0].limit_remaining));
        }
        let (ok, over) = (Code::Ok as i32, Code::OverLimit as i32);
        assert_eq!(seen, [(ok, 1), (ok, 0), (over, 0)]);
        let other = ask("10.0.0.2").await;
        assert_eq!(other.overall_code, ok, "each client counts apart");
        let limit = other.statuses[0].current_limit.clone().unwrap();
        assert_eq!((limit.requests_per_unit, limit.unit), (2, Unit::Hour as i32));
        let foreign = RateLimitRequest {
            domain: "someone-else".into(),
            ..Default::default()
        };
        let err = service
            .should_rate_limit(tonic::Request::new(foreign.clone()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);

        // With credentials required: only a host with a proxy stream open may ask.
        let proxies = Arc::new(Proxies::default());
        let guarded = RateLimitService::new(None, Some(proxies.clone())).unwrap();
        let from = |ip: &str| {
            let mut r = tonic::Request::new(RateLimitRequest {
                domain: RATE_LIMIT_DOMAIN.into(),
                ..Default::default()
            });
            r.extensions_mut().insert(tonic::transport::server::TcpConnectInfo {
                local_addr: None,
                remote_addr: Some(format!("{ip}:40000").parse().unwrap()),
            });
            r
        };
        let refused = guarded.should_rate_limit(from("10.0.0.7")).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        let stream = proxies
            .register(crate::proxies::ProxyState::connected(
                "envoy-1",
                "",
                "",
                "10.0.0.7:51000".into(),
                "xDS (SotW)",
            ))
            .unwrap();
        assert!(guarded.should_rate_limit(from("10.0.0.7")).await.is_ok());
        assert!(guarded.should_rate_limit(from("10.0.0.8")).await.is_err());
        drop(stream);
        assert!(
            guarded.should_rate_limit(from("10.0.0.7")).await.is_err(),
            "its stream closed"
        );
        let err = service
            .should_rate_limit(tonic::Request::new(foreign))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }
}
