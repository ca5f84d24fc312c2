//! Counting connections and flagging shutdown, with wake-ups instead of polling.
//!
//! Both use `event-listener`: whoever waits registers a listener, checks the state again, and
//! sleeps until the state changes. Nothing polls and nothing sleeps on a timer.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use event_listener::Event;

/// The number of open connections, with wake-ups when it leaves or reaches zero.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    count: AtomicUsize,
    changed: Event,
}

/// One open connection; dropping it lowers the count.
#[derive(Debug)]
pub(crate) struct InFlightGuard(Arc<InFlight>);

impl InFlight {
    /// Raises the count. The accept loop calls it before spawning the connection's task, so a
    /// shutdown racing the spawn still sees the connection.
    pub(crate) fn enter(self: &Arc<Self>) -> InFlightGuard {
        if self.count.fetch_add(1, Ordering::SeqCst) == 0 {
            self.changed.notify(usize::MAX);
        }
        InFlightGuard(Arc::clone(self))
    }

    pub(crate) fn get(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Waits until no connection is open.
    pub(crate) async fn until_zero(&self) {
        self.until(|count| count == 0).await
    }

    /// Waits until a connection is open.
    pub(crate) async fn until_busy(&self) {
        self.until(|count| count > 0).await
    }

    async fn until(&self, done: impl Fn(usize) -> bool) {
        loop {
            if done(self.get()) {
                return;
            }
            let listener = self.changed.listen();
            if done(self.get()) {
                return;
            }
            listener.await;
        }
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.changed.notify(usize::MAX);
        }
    }
}

/// A flag set once, that tasks can wait for.
#[derive(Debug, Default)]
pub(crate) struct Flag {
    set: AtomicBool,
    event: Event,
}

impl Flag {
    pub(crate) fn set(&self) {
        self.set.store(true, Ordering::SeqCst);
        self.event.notify(usize::MAX);
    }

    pub(crate) fn is_set(&self) -> bool {
        self.set.load(Ordering::SeqCst)
    }

    pub(crate) async fn wait(&self) {
        loop {
            if self.is_set() {
                return;
            }
            let listener = self.event.listen();
            if self.is_set() {
                return;
            }
            listener.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future;

    #[test]
    fn until_zero_wakes_when_the_last_guard_drops() {
        let in_flight = Arc::new(InFlight::default());
        let a = in_flight.enter();
        let b = in_flight.enter();
        let mut wait = Box::pin(in_flight.until_zero());
        assert!(future::block_on(future::poll_once(&mut wait)).is_none());
        drop(a);
        assert!(future::block_on(future::poll_once(&mut wait)).is_none());
        drop(b);
        assert!(future::block_on(future::poll_once(&mut wait)).is_some());
    }

    #[test]
    fn flag_wakes_waiters() {
        let flag = Flag::default();
        let mut wait = Box::pin(flag.wait());
        assert!(future::block_on(future::poll_once(&mut wait)).is_none());
        flag.set();
        assert!(future::block_on(future::poll_once(&mut wait)).is_some());
    }
}
