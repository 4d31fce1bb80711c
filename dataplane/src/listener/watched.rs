//! A connection raced against what may end it early (the stop flag, the idle timer), polling
//! those only when they were woken. `select!` polled every branch on each wake-up of the
//! connection's task — several a request — for events that come once in its life.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// Which of the two finished first.
pub enum First<A, B> {
    Conn(A),
    Watch(B),
}

pin_project_lite::pin_project! {
    /// Resolves with the connection's output, or the watch's if that comes first.
    pub struct Watched<C, W> {
        #[pin]
        conn: C,
        #[pin]
        watch: W,
        woken: Arc<Woken>,
        waker: Waker,
    }
}

/// Set by the watch's wakers; wakes the connection's task.
#[derive(Default)]
struct Woken {
    flag: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Woken {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.flag.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<C, W> Watched<C, W> {
    pub fn new(conn: C, watch: W) -> Self {
        let woken = Arc::new(Woken::default());
        // Polled once at the start, to register its wakers.
        woken.flag.store(true, Ordering::Relaxed);
        Watched {
            conn,
            watch,
            waker: Waker::from(woken.clone()),
            woken,
        }
    }
}

impl<C: Future, W: Future> Future for Watched<C, W> {
    type Output = First<C::Output, W::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        this.woken.task.register(cx.waker());
        if this.woken.flag.swap(false, Ordering::Acquire)
            && let Poll::Ready(w) = this.watch.poll(&mut Context::from_waker(this.waker))
        {
            return Poll::Ready(First::Watch(w));
        }
        this.conn.poll(cx).map(First::Conn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn the_watch_ends_a_pending_connection_and_the_connection_ends_first_when_it_can() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let slow = tokio::time::sleep(Duration::from_secs(60));
        let watched = Watched::new(slow, rx);
        let fire = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            tx.send(()).unwrap();
        });
        let first = tokio::time::timeout(Duration::from_secs(5), watched).await;
        assert!(
            matches!(first, Ok(First::Watch(Ok(())))),
            "the watch was never polled again"
        );
        fire.await.unwrap();

        let quick = async { 7 };
        let never = std::future::pending::<()>();
        assert!(matches!(Watched::new(quick, never).await, First::Conn(7)));
    }

    #[tokio::test]
    async fn a_watch_ready_at_once_wins() {
        let first = Watched::new(std::future::pending::<()>(), async { "stop" }).await;
        assert!(matches!(first, First::Watch("stop")));
    }
}
