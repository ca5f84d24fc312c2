//! The daemon-wide budget for large frame buffers (`Config::frame_memory_budget`).
//!
//! A connection takes bytes from the budget before its read buffer grows past 64 KiB for a
//! large request, or before it encodes a response of more than 64 KiB, and gives them back
//! once the buffer is released. When the budget is spent it waits, in line with the other
//! waiters, instead of allocating; its read or write deadline still applies. Buffers up to
//! 64 KiB are free, so that small requests never wait behind large ones.
//!
//! Waiters are served first come, first served: a waiter for a whole 8 MiB frame is not
//! overtaken forever by a stream of smaller ones. Responses go before requests, though: a
//! response waits with the dispatcher's result in memory, uncounted, while a request waits
//! with nothing; and there are only as many responses as requests that got their bytes.
//! No connection ever waits while it holds bytes of the budget ([`Held::resize`] gives its
//! bytes back before it waits), so waiters cannot block each other for good: whoever holds
//! bytes is reading or writing, each bounded by a deadline, or dispatching, which the
//! request's bytes are held for and which only `Config::request_timeout` bounds (no limit by
//! default): dispatches of large requests that never end keep their bytes, and other large
//! frames wait, and are refused at their deadline, for as long.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use async_io::Timer;
use event_listener::Event;
use futures_lite::future::FutureExt;

use crate::wire::{MAX_FRAME_BYTES, READ_CHUNK};

/// The smallest budget: one largest frame with its header, so that any single frame can
/// always be taken eventually.
pub(crate) const MIN_BUDGET: usize = MAX_FRAME_BYTES + 4;

/// What a buffer of `capacity` bytes costs from the budget: buffers up to 64 KiB are free.
pub(crate) fn charged(capacity: usize) -> usize {
    if capacity > READ_CHUNK {
        capacity
    } else {
        0
    }
}

/// Bytes available to large frame buffers, shared by every connection of a daemon.
#[derive(Debug)]
pub(crate) struct Budget {
    total: usize,
    state: Mutex<State>,
    /// Notified when bytes come back or the head of the line leaves it.
    returned: Event,
}

#[derive(Debug)]
struct State {
    free: usize,
    /// The waiters in arrival order: only the first response, or the first request if no
    /// response waits, may take.
    line: VecDeque<Ticket>,
    next_ticket: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ticket {
    number: u64,
    response: bool,
}

/// What bytes are for, which decides who goes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    Request,
    Response,
}

impl State {
    /// Whose turn it is.
    fn head(&self) -> Option<Ticket> {
        let first_response = self.line.iter().find(|ticket| ticket.response);
        first_response.or(self.line.front()).copied()
    }

    /// Whether a newcomer may take at once: nobody it would overtake is waiting.
    fn may_pass(&self, response: bool) -> bool {
        match response {
            true => !self.line.iter().any(|ticket| ticket.response),
            false => self.line.is_empty(),
        }
    }
}

impl Budget {
    /// A budget of `total` bytes, raised to [`MIN_BUDGET`] if it is smaller.
    pub(crate) fn new(total: usize) -> Self {
        let total = total.max(MIN_BUDGET);
        Budget {
            total,
            state: Mutex::new(State {
                free: total,
                line: VecDeque::new(),
                next_ticket: 0,
            }),
            returned: Event::new(),
        }
    }

    /// The budget's size in bytes.
    pub(crate) fn total(&self) -> usize {
        self.total
    }

    /// Bytes taken at the moment.
    pub(crate) fn taken(&self) -> usize {
        self.total - self.lock().free
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is consistent between any two statements: a panic cannot break it.
        crate::execution::lock(&self.state)
    }

    /// Takes `bytes` (at most the total), waiting in line until they are free or `deadline`
    /// passes; says whether they were taken.
    async fn take(&self, bytes: usize, purpose: Purpose, deadline: Option<Instant>) -> bool {
        debug_assert!(bytes <= self.total, "{bytes} bytes asked of {}", self.total);
        let response = purpose == Purpose::Response;
        let ticket = {
            let mut state = self.lock();
            if state.may_pass(response) && state.free >= bytes {
                state.free -= bytes;
                return true;
            }
            let ticket = Ticket {
                number: state.next_ticket,
                response,
            };
            state.next_ticket += 1;
            state.line.push_back(ticket);
            ticket
        };
        log::debug!(
            "waiting for {bytes} bytes of frame memory ({} of {} taken)",
            self.taken(),
            self.total
        );
        // Leaves the line when the wait ends for any reason, the deadline or a cancelled
        // connection included.
        let place = Place {
            budget: self,
            ticket,
        };
        let taken = async {
            loop {
                let listener = self.returned.listen();
                if place.try_take(bytes) {
                    return true;
                }
                listener.await;
            }
        };
        let timed_out = async {
            deadline.map_or_else(Timer::never, Timer::at).await;
            false
        };
        taken.or(timed_out).await
    }

    /// Returns `bytes` to the budget; says whether that left nothing taken.
    fn give_back(&self, bytes: usize) -> bool {
        if bytes == 0 {
            return false;
        }
        let emptied = {
            let mut state = self.lock();
            state.free += bytes;
            state.free == self.total
        };
        self.returned.notify(usize::MAX);
        emptied
    }

    /// Gives back bytes a connection is done with. When that leaves nothing taken, a burst of
    /// large frames is over: the allocator is asked to return the free memory it kept (see
    /// `pages::trim`), which buffers outside the budget (a worker's reply being read, the
    /// growth steps of an encoded line) may have left behind.
    fn release(&self, bytes: usize) {
        if self.give_back(bytes) {
            crate::pages::trim();
        }
    }
}

/// A waiter's place in line.
struct Place<'a> {
    budget: &'a Budget,
    ticket: Ticket,
}

impl Place<'_> {
    /// Takes `bytes` if it is this waiter's turn and they are free.
    fn try_take(&self, bytes: usize) -> bool {
        let mut state = self.budget.lock();
        if state.head() != Some(self.ticket) || state.free < bytes {
            return false;
        }
        state.free -= bytes;
        // Leaving the line is left to `drop`, which wakes the next in line.
        true
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        let mut state = self.budget.lock();
        let had_turn = state.head() == Some(self.ticket);
        state.line.retain(|&ticket| ticket != self.ticket);
        drop(state);
        if had_turn {
            self.budget.returned.notify(usize::MAX);
        }
    }
}

/// The bytes of the budget one connection holds; dropping it gives them back.
#[derive(Debug)]
pub(crate) struct Held<'a> {
    budget: &'a Budget,
    bytes: usize,
}

impl<'a> Held<'a> {
    /// Nothing held yet.
    pub(crate) fn new(budget: &'a Budget) -> Self {
        Held { budget, bytes: 0 }
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// The size of the whole budget.
    pub(crate) fn budget(&self) -> usize {
        self.budget.total()
    }

    /// Gives back what is held beyond `bytes`.
    pub(crate) fn shrink_to(&mut self, bytes: usize) {
        if bytes < self.bytes {
            self.budget.release(self.bytes - bytes);
            self.bytes = bytes;
        }
    }

    /// Holds exactly `bytes` (or the budget's total, if that is less): fewer are given back at once;
    /// more are waited for until `deadline`. To grow, everything held is given back first and
    /// the whole amount waited for, so that no connection waits while it holds bytes. Says
    /// whether `bytes` are now held; if not, nothing is.
    pub(crate) async fn resize(
        &mut self,
        bytes: usize,
        purpose: Purpose,
        deadline: Option<Instant>,
    ) -> bool {
        // More than the whole budget would never come; callers ask for one frame at most.
        let bytes = bytes.min(self.budget.total);
        if bytes <= self.bytes {
            self.shrink_to(bytes);
            return true;
        }
        self.budget.give_back(std::mem::take(&mut self.bytes));
        if self.budget.take(bytes, purpose, deadline).await {
            self.bytes = bytes;
            true
        } else {
            false
        }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
        async_io::block_on(future)
    }

    #[test]
    fn small_budgets_are_raised_to_one_frame() {
        assert_eq!(Budget::new(0).total(), MIN_BUDGET);
        assert_eq!(Budget::new(usize::MAX).total(), usize::MAX);
    }

    #[test]
    fn bytes_come_back_when_dropped_or_shrunk() {
        let budget = Budget::new(MIN_BUDGET);
        let mut held = Held::new(&budget);
        assert!(block_on(held.resize(MIN_BUDGET, Purpose::Request, None)));
        assert_eq!(budget.taken(), MIN_BUDGET);
        assert!(block_on(held.resize(1000, Purpose::Request, None)));
        assert_eq!(budget.taken(), 1000);
        drop(held);
        assert_eq!(budget.taken(), 0);
    }

    #[test]
    fn a_waiter_gives_up_at_its_deadline_and_leaves_the_line() {
        let budget = Budget::new(MIN_BUDGET);
        let mut first = Held::new(&budget);
        assert!(block_on(first.resize(MIN_BUDGET, Purpose::Request, None)));
        let mut second = Held::new(&budget);
        let soon = Instant::now() + Duration::from_millis(10);
        assert!(!block_on(second.resize(1, Purpose::Request, Some(soon))));
        assert_eq!(second.bytes(), 0);
        drop(first);
        // The line is empty again: the fast path takes at once.
        assert!(block_on(second.resize(
            MIN_BUDGET,
            Purpose::Request,
            Some(Instant::now())
        )));
    }

    #[test]
    fn waiters_are_served_in_order() {
        let budget = Budget::new(MIN_BUDGET);
        // Declared before the executor, which may still refer to it when dropped.
        let order = std::cell::RefCell::new(Vec::new());
        let executor = async_executor::LocalExecutor::new();
        let mut holder = Held::new(&budget);
        assert!(block_on(holder.resize(MIN_BUDGET, Purpose::Request, None)));
        // The first waiter wants everything, the second a little: the second must not
        // overtake the first, or a large frame could wait forever.
        let big = executor.spawn(async {
            let mut held = Held::new(&budget);
            assert!(held.resize(MIN_BUDGET, Purpose::Request, None).await);
            order.borrow_mut().push("big");
        });
        let small = executor.spawn(async {
            let mut held = Held::new(&budget);
            assert!(held.resize(100_000, Purpose::Request, None).await);
            order.borrow_mut().push("small");
        });
        while executor.try_tick() {}
        assert!(order.borrow().is_empty());
        drop(holder);
        block_on(executor.run(async {
            big.await;
            small.await;
        }));
        assert_eq!(*order.borrow(), ["big", "small"]);
        assert_eq!(budget.taken(), 0);
    }

    #[test]
    fn responses_go_before_requests() {
        let budget = Budget::new(MIN_BUDGET);
        // Declared before the executor, which may still refer to it when dropped.
        let order = std::cell::RefCell::new(Vec::new());
        let executor = async_executor::LocalExecutor::new();
        let mut holder = Held::new(&budget);
        assert!(block_on(holder.resize(MIN_BUDGET, Purpose::Request, None)));
        let waiter = |purpose, name| {
            let (budget, order) = (&budget, &order);
            executor.spawn(async move {
                let mut held = Held::new(budget);
                assert!(held.resize(MIN_BUDGET, purpose, None).await);
                order.borrow_mut().push(name);
            })
        };
        let request = waiter(Purpose::Request, "request");
        while executor.try_tick() {}
        let response = waiter(Purpose::Response, "response");
        while executor.try_tick() {}
        drop(holder);
        block_on(executor.run(async {
            request.await;
            response.await;
        }));
        assert_eq!(*order.borrow(), ["response", "request"]);
    }
}
