//! Gives the heap a burst left behind back to the OS once the burst is over.
//!
//! glibc's `free` returns memory to the kernel only from the top of each arena (and for large
//! mmapped blocks); a burst of connections leaves the arenas fragmented and the process at its
//! peak RSS for good: 15 MB at start, 43 MB after `h2load -c50 -m10` once the idle timeout
//! had closed all 333 pooled upstream connections. `malloc_trim` hands every whole free page
//! inside every arena back (43 → 19 MB there). It walks the arenas under their locks, so it
//! runs only when the heap in use has fallen well below its peak since the last release —
//! after a load, not during one.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crate::telemetry::Registry;

/// Bytes the allocator holds for the program and keeps free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heap {
    pub allocated: u64,
    pub free: u64,
}

/// The allocator's figures, where it reports them (glibc).
pub fn heap() -> Option<Heap> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's state (under its own locks).
        let m = unsafe { libc::mallinfo2() };
        Some(Heap {
            allocated: (m.uordblks + m.hblkhd) as u64,
            free: m.fordblks as u64,
        })
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    None
}

/// Hands free pages back; false where the allocator cannot.
fn trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only releases pages no allocation uses.
        unsafe { libc::malloc_trim(0) };
        true
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

/// A fall smaller than this is noise, not the end of a load. (32 relayed TCP connections take
/// 1.4 MB; the proxy idles at 0.3.)
const MIN_FALL: u64 = 1 << 20;

/// Decides when a load has ended: the heap in use fell to half its peak since the last
/// release, and by at least `MIN_FALL`.
#[derive(Debug, Default)]
pub struct Releaser {
    peak: u64,
}

impl Releaser {
    pub fn should_release(&mut self, allocated: u64) -> bool {
        self.peak = self.peak.max(allocated);
        let fell = self.peak - allocated;
        if allocated <= self.peak / 2 && fell >= MIN_FALL {
            self.peak = allocated;
            return true;
        }
        false
    }
}

/// Resident anonymous memory (RSS less file-backed pages), for the log line.
fn resident_anon() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let mut f = statm.split_whitespace().skip(1).map(|v| v.parse::<u64>().ok());
    let (rss, shared) = (f.next()??, f.next()??);
    Some(rss.saturating_sub(shared) * 4096)
}

/// Looks at the heap every `every` and releases what a finished load left behind.
pub async fn release_after_load(every: Duration, registry: Arc<Registry>) {
    let mut releaser = Releaser::default();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(h) = heap() else { return };
        if !releaser.should_release(h.allocated) {
            continue;
        }
        let (before, started) = (resident_anon(), Instant::now());
        if !trim() {
            return;
        }
        registry.heap_releases.fetch_add(1, Relaxed);
        let mb = |b: Option<u64>| b.map_or(f64::NAN, |b| b as f64 / 1e6);
        tracing::debug!(
            allocated_mb = h.allocated as f64 / 1e6,
            anon_before_mb = mb(before),
            anon_after_mb = mb(resident_anon()),
            took_us = started.elapsed().as_micros() as u64,
            "returned free heap to the OS"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    #[test]
    fn steady_load_is_left_alone() {
        let mut r = Releaser::default();
        for a in [20, 30, 28, 31, 25, 30, 16] {
            assert!(!r.should_release(a * MB), "{a} MB");
        }
    }

    #[test]
    fn the_end_of_a_load_releases_once() {
        let mut r = Releaser::default();
        assert!(!r.should_release(30 * MB));
        assert!(r.should_release(3 * MB));
        // Nothing new to give back until another load has come and gone.
        assert!(!r.should_release(2 * MB));
        assert!(!r.should_release(3 * MB));
        assert!(!r.should_release(12 * MB));
        assert!(r.should_release(5 * MB));
    }

    #[test]
    fn small_heaps_are_not_worth_it() {
        let mut r = Releaser::default();
        assert!(!r.should_release(MB + MB / 2));
        assert!(!r.should_release(MB / 2 + MB / 8), "a 0.875 MB fall");
    }

    #[test]
    fn the_allocator_reports_what_is_allocated() {
        let Some(before) = heap() else { return };
        // Other tests allocate and free meanwhile; 64 MB stands out of that.
        let block = std::hint::black_box(vec![1u8; 64 * MB as usize]);
        let during = heap().unwrap();
        assert!(
            during.allocated >= before.allocated + 32 * MB,
            "{before:?} → {during:?}"
        );
        drop(block);
    }
}
