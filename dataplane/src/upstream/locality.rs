//! Priority levels of a cluster's endpoints: Envoy's priorities (a backup takes requests only
//! as the endpoints before it fail), and within each, locality failover (Istio's, on by default
//! with outlier detection; Kubernetes' `PreferClose` traffic distribution) — the endpoints in
//! the proxy's own zone first. A level whose endpoints are `h` available takes `min(1, 1.4 h)` of
//! what the levels before it left (Envoy's priority loads), and the loads are scaled up when no
//! level can take it all.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use ferrum_snapshot::model::LbPolicy;

use super::EndpointState;
use super::balance::{Balancer, Candidate};

/// Envoy's overprovisioning factor (percent): a level 72 % available still takes everything.
const OVERPROVISION_PERCENT: u32 = 140;
/// Levels kept apart at most (a byte of load each in one atomic): later ones join the last.
const MAX_LEVELS: usize = 8;

/// The endpoints of one level, balanced among themselves.
struct Level {
    /// Their indices in the cluster.
    members: Vec<usize>,
    eps: Vec<Arc<EndpointState>>,
    balancer: Balancer,
}

pub struct Localities {
    /// Best first: by priority, and within one the proxy's zone before the others.
    levels: Vec<Level>,
    /// Percent of requests per level, a byte each (`u64::MAX`: none can take any).
    loads: AtomicU64,
    /// When `loads` was counted (ms since start, `u64::MAX`: never).
    counted_ms: AtomicU64,
    /// Each endpoint's level, by its index in the cluster.
    level_of: Box<[u8]>,
}

impl Localities {
    /// The levels of `eps`, by priority and, when `zone` is given (the cluster has locality
    /// failover and the proxy knows its zone), by whether they are in it; `None` when they all
    /// fall in one (nothing to prefer).
    pub fn new(eps: &[Arc<EndpointState>], lb: &LbPolicy, zone: Option<&str>) -> Option<Localities> {
        let key = |e: &EndpointState| (e.priority, zone.is_some_and(|z| e.zone.as_deref() != Some(z)));
        let mut keys: Vec<(u32, bool)> = eps.iter().map(|e| key(e)).collect();
        keys.sort_unstable();
        keys.dedup();
        if keys.len() < 2 {
            return None;
        }
        keys.truncate(MAX_LEVELS);
        let mut members = vec![Vec::new(); keys.len()];
        let mut level_of = Vec::with_capacity(eps.len());
        for (i, e) in eps.iter().enumerate() {
            let k = key(e);
            let level = keys.iter().position(|l| *l == k).unwrap_or(keys.len() - 1);
            members[level].push(i);
            level_of.push(level as u8);
        }
        let levels = members
            .into_iter()
            .map(|members| {
                let weights: Vec<u32> = members.iter().map(|i| eps[*i].weight).collect();
                Level {
                    eps: members.iter().map(|i| eps[*i].clone()).collect(),
                    members,
                    balancer: Balancer::new(lb, &weights),
                }
            })
            .collect();
        Some(Localities {
            levels,
            loads: AtomicU64::new(0),
            counted_ms: AtomicU64::new(u64::MAX),
            level_of: level_of.into(),
        })
    }

    /// Endpoint `i` is not of the first level (another zone, or a backup priority).
    pub fn failed_over_to(&self, i: usize) -> bool {
        self.level_of.get(i).is_some_and(|l| *l > 0)
    }

    /// An endpoint (its index in the cluster) from the level a draw over the loads picks, or
    /// from the next that has one available; `None` when no level has any.
    pub fn pick(&self, now_ms: u64, key: Option<&[u8]>, avoid: Option<usize>, recount_ms: u64) -> Option<usize> {
        let loads = self.loads(now_ms, recount_ms);
        if loads == u64::MAX {
            return None;
        }
        let mut draw = fastrand::u32(..100);
        let first = (0..self.levels.len())
            .find(|l| {
                let load = ((loads >> (8 * l)) & 0xff) as u32;
                let here = draw < load;
                draw = draw.saturating_sub(load);
                here
            })
            .unwrap_or(0);
        // A retry leaves a level whose only available endpoint is the one that just failed.
        (first..self.levels.len()).chain(0..first).find_map(|l| {
            let level = &self.levels[l];
            let in_level = avoid.and_then(|a| level.members.iter().position(|m| *m == a));
            let i = level.balancer.pick_among(&level.eps, key, in_level, false)?;
            Some(level.members[i]).filter(|m| Some(*m) != avoid)
        })
    }

    /// Each level's share, counted again at most every `recount_ms`.
    fn loads(&self, now_ms: u64, recount_ms: u64) -> u64 {
        let counted = self.counted_ms.load(Relaxed);
        if counted != u64::MAX && now_ms < counted.saturating_add(recount_ms) {
            return self.loads.load(Relaxed);
        }
        let health: Vec<u32> = self
            .levels
            .iter()
            .map(|l| {
                let available = l.eps.iter().filter(|e| e.available()).count() as u32;
                (OVERPROVISION_PERCENT * available / l.eps.len() as u32).min(100)
            })
            .collect();
        let loads = pack(&shares(&health));
        self.loads.store(loads, Relaxed);
        self.counted_ms.store(now_ms, Relaxed);
        loads
    }
}

/// Envoy's priority loads from each level's health (percent, best level first): each takes its
/// health of what the levels before it left, scaled up to 100 in all when their health falls
/// short. Empty when no level has any.
fn shares(health: &[u32]) -> Vec<u32> {
    let total: u32 = health.iter().sum();
    if total == 0 {
        return Vec::new();
    }
    let mut left = 100;
    let mut out: Vec<u32> = health
        .iter()
        .map(|h| {
            let share = (h * 100 / total.min(100)).min(left);
            left -= share;
            share
        })
        .collect();
    // Rounding's remainder goes to the last level that takes any.
    if let Some(last) = out.iter_mut().rev().find(|s| **s > 0) {
        *last += left;
    }
    out
}

fn pack(shares: &[u32]) -> u64 {
    if shares.is_empty() {
        return u64::MAX;
    }
    shares
        .iter()
        .take(MAX_LEVELS)
        .enumerate()
        .fold(0, |acc, (i, s)| acc | (u64::from(*s) << (8 * i)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrum_snapshot::model::Endpoint;

    #[test]
    fn shares_spill_as_envoys_priority_loads() {
        assert_eq!(shares(&[100, 100]), vec![100, 0], "all local");
        // Half the local endpoints: 1.4 × 50 % = 70 % stays, 30 % spills.
        assert_eq!(shares(&[70, 100]), vec![70, 30]);
        assert_eq!(shares(&[0, 100]), vec![0, 100], "none local");
        // Neither level can take it all: scaled up to 100 % between them.
        assert_eq!(shares(&[20, 30]), vec![40, 60]);
        assert_eq!(shares(&[0, 0]), Vec::<u32>::new());
        assert_eq!(
            shares(&[33, 33, 0]),
            vec![50, 50, 0],
            "the remainder goes to a level that takes some"
        );
    }

    fn endpoints(zones: &[&str]) -> Vec<Arc<EndpointState>> {
        prioritised(&zones.iter().map(|z| (*z, 0)).collect::<Vec<_>>())
    }

    fn prioritised(eps: &[(&str, u32)]) -> Vec<Arc<EndpointState>> {
        eps.iter()
            .enumerate()
            .map(|(i, (z, p))| {
                let mut e = Endpoint::new("127.0.0.1", 1000 + i as u16);
                e.zone = Some(z.to_string());
                e.priority = *p;
                Arc::new(EndpointState::new(&e).unwrap())
            })
            .collect()
    }

    fn picks(l: &Localities, n: usize, now: u64) -> Vec<usize> {
        let mut counts = vec![0; 4];
        for _ in 0..n {
            counts[l.pick(now, None, None, 100).unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn the_local_zone_takes_everything_until_its_endpoints_fail() {
        let eps = endpoints(&["a", "a", "b", "c"]);
        let l = Localities::new(&eps, &LbPolicy::RoundRobin, Some("a")).unwrap();
        let counts = picks(&l, 1000, 0);
        assert_eq!((counts[2], counts[3]), (0, 0), "{counts:?}");
        assert_eq!(
            (0..4).map(|i| l.failed_over_to(i)).collect::<Vec<_>>(),
            [false, false, true, true]
        );
        assert!(counts[0] > 400 && counts[1] > 400, "{counts:?}");
        // One of the two local endpoints fails: 70 % stay local (on the one left), 30 % spill.
        eps[0].healthy.store(false, Relaxed);
        let counts = picks(&l, 1000, 0);
        assert_eq!(
            counts[0], 0,
            "an unavailable endpoint takes none before a recount either"
        );
        let counts = picks(&l, 4000, 200);
        let spilled = (counts[2] + counts[3]) as f64 / 4000.0;
        assert!((0.25..0.35).contains(&spilled), "{counts:?}");
        // Both fail: everything goes to the other zones.
        eps[1].healthy.store(false, Relaxed);
        let counts = picks(&l, 1000, 400);
        assert_eq!((counts[0], counts[1]), (0, 0), "{counts:?}");
        // None anywhere: the cluster's own balancing decides (panic threshold and all).
        eps[2].healthy.store(false, Relaxed);
        eps[3].healthy.store(false, Relaxed);
        assert_eq!(l.pick(600, None, None, 100), None);
    }

    #[test]
    fn a_retry_leaves_a_zone_whose_only_endpoint_failed() {
        let eps = endpoints(&["a", "b", "b"]);
        let l = Localities::new(&eps, &LbPolicy::RoundRobin, Some("a")).unwrap();
        for _ in 0..20 {
            assert_eq!(l.pick(0, None, None, 100), Some(0));
            assert_ne!(l.pick(0, None, Some(0), 100), Some(0), "the retry goes elsewhere");
        }
    }

    #[test]
    fn endpoints_all_in_one_zone_or_none_have_nothing_to_prefer() {
        let rr = LbPolicy::RoundRobin;
        assert!(Localities::new(&endpoints(&["a", "a"]), &rr, Some("a")).is_none());
        assert!(Localities::new(&endpoints(&["b", "c"]), &rr, Some("a")).is_none());
        assert!(
            Localities::new(&endpoints(&["a", "b"]), &rr, None).is_none(),
            "zone unknown"
        );
    }

    #[test]
    fn a_backup_priority_takes_requests_only_as_the_first_fails_and_zones_split_each() {
        let eps = prioritised(&[("a", 0), ("b", 0), ("a", 1)]);
        // Without a zone: two levels, by priority.
        let l = Localities::new(&eps, &LbPolicy::RoundRobin, None).unwrap();
        let counts = picks(&l, 100, 0);
        assert_eq!(counts[2], 0, "the backup idles: {counts:?}");
        eps[0].healthy.store(false, Relaxed);
        eps[1].healthy.store(false, Relaxed);
        assert_eq!(picks(&l, 50, 200)[2], 50, "the first priority down: all to the backup");
        eps[0].healthy.store(true, Relaxed);
        eps[1].healthy.store(true, Relaxed);
        // With zone a: (0, near), (0, far), (1, near).
        let l = Localities::new(&eps, &LbPolicy::RoundRobin, Some("a")).unwrap();
        assert_eq!(picks(&l, 100, 0), vec![100, 0, 0, 0]);
        eps[0].healthy.store(false, Relaxed);
        let counts = picks(&l, 100, 200);
        assert_eq!(
            counts,
            vec![0, 100, 0, 0],
            "the other zone of priority 0 before the backup"
        );
    }
}
