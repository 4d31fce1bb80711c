//! Endpoint selection. Every structure is built when the config is compiled; a pick is a few
//! atomic loads and at most a binary search.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use ferrum_snapshot::model::{HashOn, LbPolicy};

/// What a consistent-hash cluster hashes a request or connection on, without allocating: a
/// header's value (shared with the request's) or the client address's octets — the same for
/// HTTP and TCP listeners.
pub enum HashKey {
    Header(http::HeaderValue),
    Ip { octets: [u8; 16], len: usize },
}

impl HashKey {
    pub fn ip(ip: std::net::IpAddr) -> HashKey {
        let mut octets = [0; 16];
        let len = match ip {
            std::net::IpAddr::V4(a) => {
                octets[..4].copy_from_slice(&a.octets());
                4
            }
            std::net::IpAddr::V6(a) => {
                octets = a.octets();
                16
            }
        };
        HashKey::Ip { octets, len }
    }

    pub fn as_bytes(&self) -> &[u8] {
        match self {
            HashKey::Header(v) => v.as_bytes(),
            HashKey::Ip { octets, len } => &octets[..*len],
        }
    }
}

/// What the balancer needs to know about one endpoint at pick time.
pub trait Candidate {
    fn available(&self) -> bool;
    fn active_requests(&self) -> u32;
}

pub enum Balancer {
    /// Smooth weighted round robin, expanded into a schedule.
    RoundRobin {
        schedule: Vec<u32>,
        next: AtomicUsize,
    },
    LeastRequest,
    /// Cumulative weights.
    Random {
        cumulative: Vec<u64>,
    },
    /// A hash ring with points proportional to weight.
    Ring {
        on: HashOn,
        ring: Vec<(u64, u32)>,
    },
}

/// Points per unit of weight on the hash ring.
const RING_POINTS: u64 = 160;
/// Most points on one ring (Envoy's default maximum is 8M; at 16 bytes a point this is 16 MiB):
/// weights beyond it are scaled down, every endpoint keeping at least one point.
const MAX_RING_POINTS: u64 = 1 << 20;

impl Balancer {
    pub fn new(policy: &LbPolicy, weights: &[u32]) -> Self {
        match policy {
            LbPolicy::RoundRobin => Balancer::RoundRobin {
                schedule: smooth_schedule(weights),
                next: AtomicUsize::new(fastrand::usize(..=weights.len())),
            },
            LbPolicy::LeastRequest => Balancer::LeastRequest,
            LbPolicy::Random => {
                let mut acc = 0u64;
                Balancer::Random {
                    cumulative: weights
                        .iter()
                        .map(|w| {
                            acc += u64::from((*w).max(1));
                            acc
                        })
                        .collect(),
                }
            }
            LbPolicy::ConsistentHash(on) => {
                let points = ring_points(weights);
                let mut ring = Vec::with_capacity(points.iter().sum::<u64>() as usize);
                for (i, n) in points.iter().enumerate() {
                    for p in 0..*n {
                        ring.push((hash(format!("{i}-{p}").as_bytes()), i as u32));
                    }
                }
                ring.sort_unstable();
                Balancer::Ring { on: on.clone(), ring }
            }
        }
    }

    pub fn hash_on(&self) -> Option<&HashOn> {
        match self {
            Balancer::Ring { on, .. } => Some(on),
            _ => None,
        }
    }

    /// Picks an available endpoint, avoiding `avoid` (the one a retry just failed on) when
    /// another is available. `key` is the consistent-hash input.
    pub fn pick<C: Candidate>(&self, eps: &[C], key: Option<&[u8]>, avoid: Option<usize>) -> Option<usize> {
        self.pick_among(eps, key, avoid, false)
    }

    /// [`Balancer::pick`], over every endpoint, available or not, when `panicking`.
    pub fn pick_among<C: Candidate>(
        &self,
        eps: &[C],
        key: Option<&[u8]>,
        avoid: Option<usize>,
        panicking: bool,
    ) -> Option<usize> {
        let n = eps.len();
        if n == 0 {
            return None;
        }
        let ok = |i: usize| (panicking || eps[i].available()) && (Some(i) != avoid || n == 1);
        let first = match self {
            Balancer::RoundRobin { schedule, next } => {
                let at = next.fetch_add(1, Relaxed);
                Some(schedule[at % schedule.len()] as usize)
            }
            Balancer::LeastRequest => {
                // Power of two choices.
                let a = fastrand::usize(..n);
                let b = if n > 1 {
                    (a + 1 + fastrand::usize(..n - 1)) % n
                } else {
                    a
                };
                let (a_ok, b_ok) = (ok(a), ok(b));
                match (a_ok, b_ok) {
                    (true, true) => Some(if eps[b].active_requests() < eps[a].active_requests() {
                        b
                    } else {
                        a
                    }),
                    (true, false) => Some(a),
                    (false, true) => Some(b),
                    (false, false) => None,
                }
            }
            Balancer::Random { cumulative } => {
                let r = fastrand::u64(..*cumulative.last().unwrap_or(&1));
                Some(cumulative.partition_point(|c| *c <= r))
            }
            Balancer::Ring { ring, .. } => {
                let h = key.map_or_else(|| fastrand::u64(..), hash);
                let start = ring.partition_point(|(p, _)| *p < h);
                // Walk the ring to the first available endpoint so a down endpoint only moves
                // its own keys.
                (0..ring.len())
                    .map(|k| ring[(start + k) % ring.len()].1 as usize)
                    .find(|i| ok(*i))
            }
        };
        match first {
            Some(i) if i < n && ok(i) => Some(i),
            // The chosen one is down: the next available one after it, so load spreads evenly.
            Some(i) => (1..=n).map(|k| (i + k) % n).find(|j| ok(*j)),
            None => (0..n).find(|j| ok(*j)),
        }
    }
}

/// Ring points per endpoint: proportional to weight, at most `MAX_RING_POINTS` in all.
fn ring_points(weights: &[u32]) -> Vec<u64> {
    let total: u64 = weights.iter().map(|w| u64::from((*w).max(1))).sum();
    let per_weight = (MAX_RING_POINTS as f64 / total.max(1) as f64).min(RING_POINTS as f64);
    weights
        .iter()
        .map(|w| ((f64::from((*w).max(1)) * per_weight) as u64).max(1))
        .collect()
}

pub fn hash(b: &[u8]) -> u64 {
    // FNV-1a then a finaliser: stable across processes and platforms, so every proxy agrees.
    let mut h: u64 = 0xcbf29ce484222325;
    for x in b {
        h ^= u64::from(*x);
        h = h.wrapping_mul(0x100000001b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51afd7ed558ccd);
    h ^ (h >> 33)
}

/// Nginx's smooth weighted round robin, unrolled: weights 5,1,1 give a,a,b,a,c,a,a.
fn smooth_schedule(weights: &[u32]) -> Vec<u32> {
    if weights.is_empty() {
        return vec![0];
    }
    let g = weights.iter().copied().filter(|w| *w > 0).fold(0, gcd).max(1);
    let w: Vec<i64> = weights.iter().map(|x| i64::from((*x).max(1) / g).max(1)).collect();
    let total: i64 = w.iter().sum();
    let len = total.min(1 << 16) as usize;
    let mut current = vec![0i64; w.len()];
    let mut out = Vec::with_capacity(len);
    for _ in 0..len {
        for (c, wi) in current.iter_mut().zip(&w) {
            *c += wi;
        }
        let best = (0..w.len())
            .max_by_key(|i| (current[*i], std::cmp::Reverse(*i)))
            .unwrap();
        current[best] -= total;
        out.push(best as u32);
    }
    out
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU32};

    struct E {
        up: AtomicBool,
        active: AtomicU32,
    }
    impl Candidate for E {
        fn available(&self) -> bool {
            self.up.load(Relaxed)
        }
        fn active_requests(&self) -> u32 {
            self.active.load(Relaxed)
        }
    }
    fn eps(n: usize) -> Vec<E> {
        (0..n)
            .map(|_| E {
                up: AtomicBool::new(true),
                active: AtomicU32::new(0),
            })
            .collect()
    }
    fn counts(b: &Balancer, e: &[E], n: usize) -> Vec<usize> {
        let mut c = vec![0; e.len()];
        for _ in 0..n {
            c[b.pick(e, None, None).unwrap()] += 1;
        }
        c
    }

    #[test]
    fn panicking_balances_over_every_endpoint_down_or_not() {
        let e = eps(4);
        for x in &e[1..] {
            x.up.store(false, Relaxed);
        }
        for policy in [LbPolicy::RoundRobin, LbPolicy::Random, LbPolicy::LeastRequest] {
            let b = Balancer::new(&policy, &[1, 1, 1, 1]);
            assert_eq!(counts(&b, &e, 100)[0], 100, "{policy:?}: only the one up");
            let mut seen = [0; 4];
            for _ in 0..400 {
                seen[b.pick_among(&e, None, None, true).unwrap()] += 1;
            }
            assert!(seen.iter().all(|n| *n > 40), "{policy:?} in panic: {seen:?}");
        }
    }

    #[test]
    fn a_client_address_is_hashed_on_its_octets() {
        let v4 = HashKey::ip("10.1.2.3".parse().unwrap());
        assert_eq!(v4.as_bytes(), &[10, 1, 2, 3]);
        let v6 = HashKey::ip("::1".parse().unwrap());
        assert_eq!(v6.as_bytes().len(), 16);
        let h = HashKey::Header(http::HeaderValue::from_static("alice"));
        assert_eq!(h.as_bytes(), b"alice");
    }

    #[test]
    fn hash_ring_size_is_capped() {
        // Two endpoints at the maximum weight: uncapped this is 320M points (5 GiB).
        let b = Balancer::new(&LbPolicy::ConsistentHash(HashOn::ClientIp), &[1_000_000, 1_000_000, 1]);
        let Balancer::Ring { ring, .. } = &b else {
            panic!("ring")
        };
        assert!(ring.len() as u64 <= MAX_RING_POINTS + 3, "{}", ring.len());
        assert!(ring.iter().any(|(_, i)| *i == 2), "a light endpoint keeps a point");
        let heavy = ring.iter().filter(|(_, i)| *i == 0).count();
        assert!(heavy > 400_000, "weights stay proportional: {heavy}");
        // Small weights keep 160 points per unit.
        assert_eq!(ring_points(&[1, 3]), vec![160, 480]);
    }

    #[test]
    fn round_robin_follows_weights_smoothly() {
        assert_eq!(smooth_schedule(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
        let e = eps(3);
        let b = Balancer::new(&LbPolicy::RoundRobin, &[2, 1, 1]);
        assert_eq!(counts(&b, &e, 400), vec![200, 100, 100]);
    }

    #[test]
    fn unavailable_endpoints_are_skipped() {
        let e = eps(3);
        e[1].up.store(false, Relaxed);
        for policy in [
            LbPolicy::RoundRobin,
            LbPolicy::LeastRequest,
            LbPolicy::Random,
            LbPolicy::ConsistentHash(HashOn::ClientIp),
        ] {
            let b = Balancer::new(&policy, &[1, 1, 1]);
            let c = counts(&b, &e, 300);
            assert_eq!(c[1], 0, "{policy:?}: {c:?}");
        }
        for x in &e {
            x.up.store(false, Relaxed);
        }
        assert_eq!(
            Balancer::new(&LbPolicy::RoundRobin, &[1, 1, 1]).pick(&e, None, None),
            None
        );
    }

    #[test]
    fn least_request_prefers_idle_endpoints() {
        let e = eps(2);
        e[0].active.store(10, Relaxed);
        let b = Balancer::new(&LbPolicy::LeastRequest, &[1, 1]);
        assert_eq!(counts(&b, &e, 100), vec![0, 100]);
    }

    #[test]
    fn random_respects_weights() {
        let e = eps(2);
        let b = Balancer::new(&LbPolicy::Random, &[9, 1]);
        let c = counts(&b, &e, 10_000);
        assert!((8_500..9_500).contains(&c[0]), "{c:?}");
    }

    #[test]
    fn consistent_hash_is_sticky_and_moves_only_the_lost_keys() {
        let e = eps(4);
        let b = Balancer::new(
            &LbPolicy::ConsistentHash(HashOn::Header("x-user".into())),
            &[1, 1, 1, 1],
        );
        let keys: Vec<String> = (0..1000).map(|i| format!("user-{i}")).collect();
        let before: Vec<usize> = keys
            .iter()
            .map(|k| b.pick(&e, Some(k.as_bytes()), None).unwrap())
            .collect();
        let again: Vec<usize> = keys
            .iter()
            .map(|k| b.pick(&e, Some(k.as_bytes()), None).unwrap())
            .collect();
        assert_eq!(before, again);
        let mut spread = [0; 4];
        for i in &before {
            spread[*i] += 1;
        }
        assert!(spread.iter().all(|c| *c > 150), "{spread:?}");
        e[2].up.store(false, Relaxed);
        let after: Vec<usize> = keys
            .iter()
            .map(|k| b.pick(&e, Some(k.as_bytes()), None).unwrap())
            .collect();
        for (x, y) in before.iter().zip(&after) {
            if *x != 2 {
                assert_eq!(x, y, "keys on healthy endpoints stay put");
            }
        }
    }

    #[test]
    fn retries_avoid_the_failed_endpoint() {
        let e = eps(2);
        let b = Balancer::new(&LbPolicy::RoundRobin, &[1, 1]);
        for _ in 0..10 {
            assert_eq!(b.pick(&e, None, Some(0)), Some(1));
        }
    }
}
