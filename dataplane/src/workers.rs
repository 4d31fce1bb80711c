//! Thread-per-core: each worker is a single-threaded tokio runtime with its own accept sockets
//! (SO_REUSEPORT, the kernel spreads connections) and its own upstream pools, so a request never
//! hops threads. The control thread (config, admin, health checks) is one more.

use std::cell::Cell;
use std::sync::mpsc;

use tokio::runtime::Handle;

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// This thread's worker index; the control thread (and any other) gets `usize::MAX`.
pub fn index() -> usize {
    INDEX.with(Cell::get)
}

pub fn set_index(i: usize) {
    INDEX.with(|c| c.set(i));
}

/// Tokio's timer wakes its own driver (an eventfd write, then an extra `epoll_wait`) whenever a
/// timer is armed to fire before the earliest one it knew of when it last parked — including
/// when it knew of none. Requests arm timers lasting seconds (header, response and body
/// timeouts); a tick that is always due sooner keeps those from waking the driver.
const TIMER_PACE: std::time::Duration = std::time::Duration::from_millis(250);

async fn pace_timers() {
    let mut tick = tokio::time::interval(TIMER_PACE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

pub struct Workers {
    pub handles: Vec<Handle>,
    stop: Vec<tokio::sync::oneshot::Sender<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Workers {
    pub fn start(n: usize) -> std::io::Result<Workers> {
        let mut w = Workers {
            handles: Vec::with_capacity(n),
            stop: Vec::with_capacity(n),
            threads: Vec::with_capacity(n),
        };
        for i in 0..n {
            let (htx, hrx) = mpsc::channel();
            let (stx, srx) = tokio::sync::oneshot::channel::<()>();
            let t = std::thread::Builder::new()
                .name(format!("ferrum-worker-{i}"))
                .spawn(move || {
                    set_index(i);
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("worker runtime");
                    let _ = htx.send(rt.handle().clone());
                    rt.block_on(async {
                        tokio::spawn(pace_timers());
                        let _ = srx.await;
                    });
                })?;
            w.handles.push(hrx.recv().map_err(std::io::Error::other)?);
            w.stop.push(stx);
            w.threads.push(t);
        }
        Ok(w)
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Ends every worker runtime (and whatever still runs on it).
    pub fn stop(self) {
        for s in self.stop {
            let _ = s.send(());
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}
