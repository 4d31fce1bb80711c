//! ferrum-dp's heap is jemalloc's, and what a load freed goes back to the OS on its own.
//!
//! glibc's allocator took ~7 % of an HTTP/2 request's CPU (bench/README, "the allocator under
//! HTTP/2") and returns freed memory to the kernel only from the top of each arena, so a burst
//! left the process at its peak RSS until something called `malloc_trim`. jemalloc purges
//! pages that stayed unused for its decay time, on a background thread, whether the workers are
//! busy or idle: set here from `--heap-release-interval`.

use std::time::Duration;

use tikv_jemalloc_ctl::{arenas, background_thread, epoch, raw, stats};

/// The allocator's figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heap {
    /// Bytes allocated to the proxy.
    pub allocated: u64,
    /// Resident bytes the allocator holds beyond those (free for reuse, its own metadata).
    pub free: u64,
    /// Purges that handed freed pages back to the OS.
    pub releases: u64,
}

/// Pages freed and then unused for `after` go back to the OS (`None`: the allocator keeps
/// them). Call before the worker threads start; arenas made later take it too.
pub fn release_freed_after(after: Option<Duration>) -> Result<(), tikv_jemalloc_ctl::Error> {
    let ms = after.map_or(-1, |d| isize::try_from(d.as_millis()).unwrap_or(isize::MAX));
    // SAFETY: both decay times are `ssize_t` (jemalloc's mallctl manual).
    unsafe {
        raw::write(b"arenas.dirty_decay_ms\0", ms)?;
        // Purged pages go back at once (MADV_DONTNEED), not when the kernel gets round to them
        // (MADV_FREE): RSS shows what was returned.
        raw::write(b"arenas.muzzy_decay_ms\0", 0isize)?;
    }
    // The arenas that exist already (the main thread's) took the old defaults.
    for i in 0..arenas::narenas::read()? {
        for (what, value) in [("dirty", ms), ("muzzy", 0)] {
            let name = format!("arena.{i}.{what}_decay_ms\0");
            // SAFETY: as above. An arena not initialised yet refuses (and takes the new default).
            let _ = unsafe { raw::write(name.as_bytes(), value) };
        }
    }
    if after.is_some() {
        background_thread::write(true)?;
    }
    Ok(())
}

/// The allocator's figures now.
pub fn heap() -> Option<Heap> {
    epoch::advance().ok()?;
    let allocated = stats::allocated::read().ok()? as u64;
    let resident = stats::resident::read().ok()? as u64;
    // SAFETY: the purge counters are `uint64_t`; 4096 is MALLCTL_ARENAS_ALL (every arena's sum).
    let purges = |name: &[u8]| unsafe { raw::read::<u64>(name) }.ok();
    let releases = purges(b"stats.arenas.4096.dirty_npurge\0")? + purges(b"stats.arenas.4096.muzzy_npurge\0")?;
    Some(Heap {
        allocated,
        free: resident.saturating_sub(allocated),
        releases,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    #[test]
    fn the_allocator_reports_what_is_allocated() {
        let before = heap().unwrap();
        // Other tests allocate and free meanwhile; 64 MB stands out of that.
        let block = std::hint::black_box(vec![1u8; 64 * MB as usize]);
        let during = heap().unwrap();
        assert!(
            during.allocated >= before.allocated + 32 * MB,
            "{before:?} → {during:?}"
        );
        drop(block);
    }

    #[test]
    fn the_release_time_reaches_every_arena() {
        release_freed_after(Some(Duration::from_millis(1500))).unwrap();
        // SAFETY: `ssize_t`, as written.
        let read = |name: &[u8]| unsafe { raw::read::<isize>(name) }.unwrap();
        assert_eq!(read(b"arenas.dirty_decay_ms\0"), 1500);
        assert_eq!(read(b"arena.0.dirty_decay_ms\0"), 1500);
        assert_eq!(read(b"arena.0.muzzy_decay_ms\0"), 0);
        assert!(background_thread::read().unwrap());
    }
}
