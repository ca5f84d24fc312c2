//! Where dispatch runs: on the thread that reads the request while it finishes at once, and on
//! as many threads as there are cores when it computes.
//!
//! Every connection is a task of one executor. The caller's thread runs it, and while nothing
//! computes that is all there is: a request that its dispatcher answers at once is read,
//! dispatched and answered on that thread, with no hand-off to another one (a hand-off costs
//! a cross-thread wake-up per request, which halves the rate of short requests).
//!
//! Work that computes is found out by watching, not predicted:
//!
//! - Every poll of a dispatch future (and of `warm_all`) takes one of `threads` **compute
//!   slots** for the time of the poll, so at most `threads` threads compute at once, and a
//!   request waiting for a slot is a parked task, not a blocked thread. The slots are handed
//!   out in arrival order.
//! - A **watchdog thread**, present only while dispatches happen, looks at the slots every
//!   millisecond (every 5 while dispatches are quick). While every executor thread there is
//!   has been computing (on average over the last few looks), it starts another **runner
//!   thread** on the same executor, up to `threads` in all, so that dispatch uses every core.
//!   When every thread is inside a dispatch poll that has lasted [`LONG_POLL`], it starts one
//!   more: with every thread computing for long, one is always left for everything that does
//!   not dispatch. (Short computations do not get that spare: their threads come back to the
//!   rest between polls.) A runner takes whatever tasks are ready, accepting, reading and
//!   answering like the caller's thread.
//! - While every slot is held by a poll that has lasted [`LONG_POLL`] and a dispatch waits,
//!   the watchdog **opens one more slot**, up to `2 × threads`: a quick request is not kept
//!   waiting for a long computation to end, and the kernel shares the cores among the long
//!   ones. Opened slots close again once they have not been needed for [`RETIRE_AFTER`], so
//!   that computations that keep starting find them open.
//! - Runners that have not been needed for [`RETIRE_AFTER`] are told to leave, and the
//!   watchdog leaves [`LINGER`] after the last dispatch: an idle daemon is back to the
//!   caller's thread and the `async-io` helper.
//!
//! With `threads == 1` none of this exists: dispatch futures are polled inline, as before.

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_executor::Executor;
use async_io::Timer;
use event_listener::Event;
use futures_lite::future::FutureExt;

use crate::inflight::{Flag, InFlight};

/// How often the watchdog looks at the slots while dispatches compute or threads run.
const TICK: Duration = Duration::from_millis(1);
/// How often it looks while dispatches only come and go quickly: it costs the quick requests
/// less, and a computation that starts is still found within a few ticks.
const QUIET_TICK: Duration = Duration::from_millis(5);
/// A poll that has held its thread this long means that thread is computing for long: one
/// more thread is started, beyond `threads` if need be, so that probes and reads never wait
/// for it. Long enough that the kernel preempting a thread in the middle of a short poll, on a
/// busy machine, is not taken for one: a spare thread that is not needed costs every task a
/// wake-up.
const LONG_POLL: Duration = Duration::from_millis(10);
/// Runners are given back once fewer have been needed for this long.
const RETIRE_AFTER: Duration = Duration::from_secs(2);
/// The watchdog leaves after this long without a dispatch and without runners.
const LINGER: Duration = Duration::from_secs(2);
/// How long closing waits for runners still inside a poll (after a drain that timed out).
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The threads that run a daemon's executor, and the compute slots.
#[derive(Debug)]
pub(crate) struct Execution {
    /// How many polls of dispatch futures may run at once; 1 means everything inline.
    threads: usize,
    slots: Slots,
    /// The executor the runners run; weak, because its tasks hold what holds us.
    executor: Mutex<Weak<Executor<'static>>>,
    epoch: Instant,
    /// Dispatch polls so far: the watchdog's sign that dispatch goes on.
    polls: AtomicU64,
    watching: AtomicBool,
    watchdog: Mutex<Option<JoinHandle<()>>>,
    /// Runner threads alive (the caller's not counted).
    runners: Arc<InFlight>,
    handles: Mutex<Vec<JoinHandle<()>>>,
    /// Runners asked to leave and not yet gone.
    retire: AtomicUsize,
    retire_event: Event,
    closed: Flag,
}

/// The most threads that may compute at once ([`Config::threads`](crate::Config::threads)).
pub(crate) const MAX_THREADS: usize = 1024;

impl Execution {
    pub(crate) fn new(threads: usize) -> Self {
        // More than a process could run is taken for the most: twice the count must count.
        let threads = threads.clamp(1, MAX_THREADS);
        Execution {
            threads,
            slots: Slots::new(threads, if threads > 1 { 2 * threads } else { 1 }),
            executor: Mutex::new(Weak::new()),
            epoch: Instant::now(),
            polls: AtomicU64::new(0),
            watching: AtomicBool::new(false),
            watchdog: Mutex::new(None),
            runners: Arc::default(),
            handles: Mutex::new(Vec::new()),
            retire: AtomicUsize::new(0),
            retire_event: Event::new(),
            closed: Flag::default(),
        }
    }

    /// How many threads may compute at once.
    pub(crate) fn threads(&self) -> usize {
        self.threads
    }

    /// Polls waiting for a compute slot.
    pub(crate) fn waiting(&self) -> usize {
        lock(&self.slots.state).queue.len()
    }

    /// Threads running the executor: the caller's and the runners.
    pub(crate) fn running(&self) -> usize {
        self.runners.get() + 1
    }

    /// Lets the watchdog start runners on `executor`; until then dispatch polls are limited
    /// and counted, but no thread is started.
    pub(crate) fn attach(&self, executor: &Arc<Executor<'static>>) {
        *lock(&self.executor) = Arc::downgrade(executor);
    }

    /// Runs `future` (a dispatch, or `warm_all`), polling it only while holding a compute
    /// slot. `watch` is told when the future itself waits (not for a slot), and asked whether
    /// the work is still wanted when a slot comes after a wait: `None` if it was not.
    pub(crate) async fn compute<F: Future>(
        self: &Arc<Self>,
        future: F,
        watch: &Watch<'_>,
    ) -> Option<F::Output> {
        let mut future = pin!(future);
        let mut ticket = Ticket {
            slots: &self.slots,
            id: None,
        };
        let mut waited = false;
        // One closure for both models, so that the future's poll is compiled in once.
        poll_fn(|cx| {
            let held = if self.threads > 1 {
                let Some(slot) = ticket.acquire(cx) else {
                    waited = true;
                    return Poll::Pending;
                };
                if std::mem::take(&mut waited) && !(watch.wanted)() {
                    self.slots.release(slot);
                    return Poll::Ready(None);
                }
                // SeqCst, as the watchdog's leaving store of `watching` and load of `polls`:
                // with weaker orders both sides could miss the other's write (a weakly
                // ordered CPU such as AArch64 allows it), and a long poll would run with no
                // watchdog. On x86 these are the same instructions.
                self.polls.fetch_add(1, Ordering::SeqCst);
                if !self.watching.load(Ordering::SeqCst) {
                    self.watch();
                }
                Some(Held::new(&self.slots, slot, self.now()))
            } else {
                None
            };
            let polled = future.as_mut().poll(cx);
            drop(held);
            watch.awaiting.store(polled.is_pending(), Ordering::Relaxed);
            polled.map(Some)
        })
        .await
    }

    fn now(&self) -> u64 {
        // Never 0: that means "not polling" in a slot.
        self.epoch.elapsed().as_nanos() as u64 | 1
    }

    /// Starts the watchdog unless it runs, or there is no executor to start runners on.
    fn watch(self: &Arc<Self>) {
        if self.closed.is_set()
            || lock(&self.executor).strong_count() == 0
            || self.watching.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let execution = Arc::clone(self);
        let started = spawn("khived-watch", Box::new(move || execution.watchdog()));
        let mut slot = lock(&self.watchdog);
        // The previous watchdog has left (it cleared `watching`): reap it.
        if let Some(previous) = slot.take() {
            let _ = previous.join();
        }
        match started {
            Some(handle) => *slot = Some(handle),
            None => self.watching.store(false, Ordering::Release),
        }
    }

    /// The watchdog's loop: starts runners when the threads there are compute, retires them
    /// when fewer have been needed for a while, and leaves when dispatch has stopped.
    fn watchdog(self: Arc<Self>) {
        // The average number of threads inside dispatch polls over the last few ticks, in
        // 1/1024ths.
        let mut load: i64 = 0;
        let mut last_polls = self.polls.load(Ordering::Relaxed);
        let mut last_dispatch = Instant::now();
        let mut last_needed = Instant::now();
        let mut slots_needed = Instant::now();
        let long = LONG_POLL.as_nanos() as u64;
        let mut tick = TICK;
        loop {
            std::thread::park_timeout(tick);
            if self.closed.is_set() {
                return;
            }
            let now = self.now();
            let (mut computing, mut stuck) = (0usize, 0usize);
            for started in self.slots.started.iter() {
                let started = started.load(Ordering::Relaxed);
                if started != 0 {
                    computing += 1;
                    if now.saturating_sub(started) >= long {
                        stuck += 1;
                    }
                }
            }
            load += (computing as i64 * 1024 - load) / 8;
            tick = match computing > 0 || load >= 100 || self.runners.get() > 0 {
                true => TICK,
                false => QUIET_TICK,
            };
            // Threads enough to compute one more dispatch than compute now, up to `threads`;
            // and one more than are stuck in long polls, up to `threads + 1`, so that there is
            // always one that answers probes and reads requests. Short computations do not
            // need that spare: their threads come back to the rest between polls, and a spare
            // would only be woken up for nothing at every task.
            let computing_on_average = ((load + 512) / 1024) as usize;
            let most = self.slots.started.len();
            let wanted = (computing_on_average + 1)
                .min(self.threads)
                .max((stuck + 1).min(most + 1));
            // One slot more than are stuck in long polls, when a dispatch waits for one.
            let instant = Instant::now();
            let (open, waiting) = {
                let state = lock(&self.slots.state);
                (state.open, state.queue.len())
            };
            if stuck + 1 >= open {
                slots_needed = instant;
                if stuck >= open && open < most && waiting > 0 {
                    self.slots.resize(true, 0);
                }
            } else if instant - slots_needed >= RETIRE_AFTER {
                self.slots.resize(false, (stuck + 1).max(self.threads));
                slots_needed = instant;
            }
            // Runners asked to leave that have not yet are not counted: when more are wanted
            // again, they stay instead of new ones being started.
            let leaving = self.retire.load(Ordering::SeqCst);
            let running = self.running().saturating_sub(leaving).max(1);
            if wanted >= running {
                last_needed = instant;
                for _ in running..wanted {
                    if !self.take_retirement() {
                        self.start_runner();
                    }
                }
            } else if instant - last_needed >= RETIRE_AFTER {
                last_needed = instant;
                self.ask_to_retire(running - wanted);
            }
            let polls = self.polls.load(Ordering::Relaxed);
            if polls != last_polls || computing > 0 {
                last_polls = polls;
                last_dispatch = instant;
            } else if self.runners.get() == 0 && instant - last_dispatch >= LINGER {
                self.watching.store(false, Ordering::SeqCst);
                // A dispatch that started just now saw `watching` still set: stay for it.
                if self.polls.load(Ordering::SeqCst) == polls
                    || self.watching.swap(true, Ordering::SeqCst)
                {
                    log::debug!("no dispatch for {LINGER:?}: the dispatch watchdog leaves");
                    return;
                }
            }
        }
    }

    fn start_runner(self: &Arc<Self>) {
        let Some(executor) = lock(&self.executor).upgrade() else {
            return;
        };
        let alive = self.runners.enter();
        let execution = Arc::clone(self);
        let started = spawn(
            "khived-dispatch",
            Box::new(move || {
                futures_lite::future::block_on(execution.run(&executor));
                drop(executor);
                drop(alive);
            }),
        );
        let mut handles = lock(&self.handles);
        handles.retain(|handle| !handle.is_finished());
        handles.extend(started);
    }

    /// A runner's life: runs tasks until it is asked to leave while it has nothing to do.
    /// It is driven by `futures_lite`'s `block_on`, not `async_io`'s: it never polls the
    /// reactor itself; the caller's thread, or the `async-io` helper thread while that one is
    /// busy, does.
    async fn run(&self, executor: &Executor<'static>) {
        run_tasks(executor).or(self.retired()).await
    }

    /// Completes when this runner is asked to leave.
    async fn retired(&self) {
        loop {
            if self.closed.is_set() || self.take_retirement() {
                return;
            }
            let listener = self.retire_event.listen();
            if self.closed.is_set() || self.take_retirement() {
                return;
            }
            listener.await;
        }
    }

    /// Asks `surplus` more runners to leave. Every waiting runner is woken, and those that
    /// find no retirement left wait again: `notify(surplus)` would count a runner asked
    /// before and still busy in a poll as one of the `surplus`, so a second request while it
    /// is busy would wake nobody, and a runner would stay idle, with the watchdog ticking
    /// for it, until the daemon stops. There are at most `2 * threads + 1` runners, and this
    /// happens at most once in `RETIRE_AFTER`.
    fn ask_to_retire(&self, surplus: usize) {
        self.retire.fetch_add(surplus, Ordering::SeqCst);
        self.retire_event.notify(usize::MAX);
    }

    fn take_retirement(&self) -> bool {
        self.retire
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    /// Tells the watchdog and the runners to leave, without waiting for them: how `close`
    /// starts, and all a daemon whose future is dropped before it ends can do.
    pub(crate) fn leave(&self) {
        self.closed.set();
        self.retire_event.notify(usize::MAX);
    }

    /// Stops the watchdog and the runners and waits for their threads to end. A runner still
    /// inside a poll (a computation that outlived the drain) gets [`CLOSE_GRACE`], then is
    /// left to finish on its own.
    pub(crate) async fn close(&self) {
        self.leave();
        let watchdog = lock(&self.watchdog).take();
        if let Some(watchdog) = watchdog {
            watchdog.thread().unpark();
            let _ = watchdog.join();
        }
        let gone = async {
            self.runners.until_zero().await;
            true
        }
        .or(async {
            Timer::after(CLOSE_GRACE).await;
            false
        })
        .await;
        let handles = std::mem::take(&mut *lock(&self.handles));
        if gone {
            for handle in handles {
                let _ = handle.join();
            }
        } else {
            log::warn!(
                "{} dispatch thread(s) still computing after the drain; left to finish",
                self.runners.get()
            );
        }
    }
}

/// Calls [`Execution::leave`] when dropped.
pub(crate) struct LeaveOnDrop<'a>(pub(crate) &'a Execution);

impl Drop for LeaveOnDrop<'_> {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// What the caller of [`Execution::compute`] learns and decides while its work runs.
pub(crate) struct Watch<'a> {
    /// Set while the work itself waits (it returned `Pending` holding no slot); clear while it
    /// waits for a slot or runs.
    pub(crate) awaiting: AtomicBool,
    /// Asked when a slot comes after a wait: is the work still wanted?
    pub(crate) wanted: &'a (dyn Fn() -> bool + Sync),
}

impl Watch<'_> {
    /// For work that is always wanted, and whose waiting nobody watches.
    pub(crate) fn none() -> Watch<'static> {
        Watch {
            awaiting: AtomicBool::new(false),
            wanted: &|| true,
        }
    }
}

/// Runs `executor`'s tasks, forever. Every executor thread runs this loop: the caller's
/// beside the supervisor, the runners until they are retired.
///
/// Tasks are taken from the executor's shared queue one at a time (`Executor::tick`), never
/// from a queue of a thread's own as `Executor::run` keeps: a task woken while the thread that
/// last ran it computes is run by whichever thread is free, and the binary holds one loop:
/// it is boxed, so that its poll (with the executor's inlined into it) is compiled once rather
/// than into each caller.
pub(crate) fn run_tasks<'a>(
    executor: &'a Executor<'static>,
) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
    Box::pin(tasks(executor))
}

async fn tasks(executor: &Executor<'static>) {
    loop {
        for _ in 0..200 {
            executor.tick().await;
        }
        // Let the thread's `block_on` look at the reactor now and then: the caller's thread
        // then answers what is ready itself instead of waiting for the `async-io` helper's.
        futures_lite::future::yield_now().await;
    }
}

/// The compute slots: a fair semaphore whose permits are numbered, so that the watchdog can
/// see since when each one is polling.
#[derive(Debug)]
struct Slots {
    state: Mutex<SlotState>,
    /// For each slot, when the poll holding it started (nanoseconds after `epoch`, odd), or 0.
    started: Box<[AtomicU64]>,
}

#[derive(Debug)]
struct SlotState {
    /// Slots `0..open` may be held; those above are closed (`started` has room for all).
    open: usize,
    free: Vec<usize>,
    /// For each slot, whether it is held (or granted to a waiter).
    out: Vec<bool>,
    /// Waiting polls, oldest first (a `Vec`: there are few, and it keeps the binary smaller).
    queue: Vec<(u64, Waker)>,
    /// Slots handed to a waiter that has not polled since.
    granted: Vec<(u64, usize)>,
    next_id: u64,
}

impl Slots {
    fn new(count: usize, most: usize) -> Self {
        Slots {
            state: Mutex::new(SlotState {
                open: count,
                free: (0..count).rev().collect(),
                out: vec![false; most.max(count)],
                queue: Vec::new(),
                granted: Vec::new(),
                next_id: 0,
            }),
            started: (0..most.max(count)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Opens one more slot when `grow`, or else closes those from `open` on: a closed slot
    /// that is held is taken back when it is released.
    fn resize(&self, grow: bool, open: usize) {
        let mut state = lock(&self.state);
        if !grow {
            state.open = state.open.min(open);
            let open = state.open;
            state.free.retain(|&slot| slot < open);
            return;
        }
        let slot = state.open;
        state.open += 1;
        // A slot closed while held is still held: it comes back when it is released.
        if !state.out[slot] {
            self.give(state, slot);
        }
    }

    /// Gives `slot` to the oldest waiter, or frees it.
    fn release(&self, slot: usize) {
        let mut state = lock(&self.state);
        state.out[slot] = false;
        if slot < state.open {
            self.give(state, slot);
        }
    }

    /// Hands the free `slot` to the oldest waiter, or puts it with the free ones.
    fn give(&self, mut state: MutexGuard<'_, SlotState>, slot: usize) {
        if state.queue.is_empty() {
            state.free.push(slot);
            return;
        }
        let (id, waker) = state.queue.remove(0);
        state.granted.push((id, slot));
        state.out[slot] = true;
        drop(state);
        waker.wake();
    }
}

/// One future's place in line for a slot; leaving the line (dropping it) passes on a slot
/// granted but not used.
struct Ticket<'a> {
    slots: &'a Slots,
    id: Option<u64>,
}

impl Ticket<'_> {
    fn acquire(&mut self, cx: &mut Context<'_>) -> Option<usize> {
        let mut state = lock(&self.slots.state);
        if let Some(id) = self.id {
            if let Some(at) = state.granted.iter().position(|&(g, _)| g == id) {
                self.id = None;
                return Some(state.granted.swap_remove(at).1);
            }
            if let Some((_, waker)) = state.queue.iter_mut().find(|(q, _)| *q == id) {
                if !waker.will_wake(cx.waker()) {
                    *waker = cx.waker().clone();
                }
            }
            return None;
        }
        if state.queue.is_empty() {
            if let Some(slot) = state.free.pop() {
                state.out[slot] = true;
                return Some(slot);
            }
        }
        let id = state.next_id;
        state.next_id += 1;
        state.queue.push((id, cx.waker().clone()));
        self.id = Some(id);
        None
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let Some(id) = self.id else {
            return;
        };
        let mut state = lock(&self.slots.state);
        if let Some(at) = state.granted.iter().position(|&(g, _)| g == id) {
            let slot = state.granted.swap_remove(at).1;
            drop(state);
            self.slots.release(slot);
        } else {
            state.queue.retain(|(q, _)| *q != id);
        }
    }
}

/// A slot held for one poll; released when the poll returns or unwinds.
struct Held<'a> {
    slots: &'a Slots,
    slot: usize,
}

impl<'a> Held<'a> {
    fn new(slots: &'a Slots, slot: usize, now: u64) -> Self {
        slots.started[slot].store(now, Ordering::Relaxed);
        Held { slots, slot }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.slots.started[self.slot].store(0, Ordering::Relaxed);
        self.slots.release(self.slot);
    }
}

/// Spawns `future` on `executor` as a boxed future. Every task of the daemon (and of the
/// worker pool) goes through here, so the executor's task machinery (its run, wake and
/// schedule functions) is compiled in once for all of them instead of once per kind of task,
/// about 2.5 KB of binary each. The box costs a task one allocation when it is spawned.
pub(crate) fn spawn_task<'a>(
    executor: &Executor<'a>,
    future: impl Future<Output = ()> + Send + 'a,
) -> async_executor::Task<()> {
    let boxed: Pin<Box<dyn Future<Output = ()> + Send + 'a>> = Box::pin(future);
    executor.spawn(boxed)
}

/// Starts a named thread. One closure type for every thread, so that spawning is compiled in
/// once.
fn spawn(name: &str, body: Box<dyn FnOnce() + Send>) -> Option<JoinHandle<()>> {
    match std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(body)
    {
        Ok(handle) => Some(handle),
        Err(e) => {
            log::warn!("cannot start thread {name}: {e}");
            None
        }
    }
}

/// A mutex's contents, also after a panic elsewhere poisoned it (the data stays valid: every
/// critical section here leaves it consistent).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The number of dispatch threads `configured` asks for: 0 means the machine's available
/// parallelism.
pub(crate) fn resolve_threads(configured: usize) -> usize {
    match configured {
        0 => available_cpus(),
        n => n,
    }
}

/// The CPUs this process may run on, by its affinity mask. (`std::thread::available_parallelism`
/// also reads cgroup quotas, at a cost of 6 KB of binary on Linux; set `threads` under a CPU
/// quota.)
#[cfg(any(target_os = "linux", target_os = "android"))]
fn available_cpus() -> usize {
    rustix::thread::sched_getaffinity(None).map_or(1, |cpus| cpus.count().max(1) as usize)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn available_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future;

    /// More threads than a process could run are taken for the most, and none for one.
    #[test]
    fn the_thread_count_is_capped() {
        assert_eq!(Execution::new(usize::MAX).threads(), MAX_THREADS);
        assert_eq!(Execution::new(MAX_THREADS + 1).threads(), MAX_THREADS);
        assert_eq!(Execution::new(0).threads(), 1);
        assert_eq!(Execution::new(3).threads(), 3);
    }

    #[test]
    fn opened_slots_go_to_waiters_and_closed_ones_come_back_only_when_released() {
        let slots = Slots::new(1, 3);
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut first = Ticket {
            slots: &slots,
            id: None,
        };
        let mut second = Ticket {
            slots: &slots,
            id: None,
        };
        let mut third = Ticket {
            slots: &slots,
            id: None,
        };
        let a = first.acquire(&mut cx).expect("a free slot");
        assert_eq!(second.acquire(&mut cx), None);
        // One more slot opens: the waiter gets it.
        slots.resize(true, 0);
        let b = second.acquire(&mut cx).expect("the opened slot");
        assert_ne!(a, b);
        // Closed while held: released, it is not handed out again.
        slots.resize(false, 1);
        assert_eq!(third.acquire(&mut cx), None);
        slots.release(b);
        assert_eq!(third.acquire(&mut cx), None);
        // Opened again while nobody holds it: the waiter gets it.
        slots.resize(true, 0);
        assert_eq!(third.acquire(&mut cx), Some(b));
        // Closed and opened again while held: never given to two at once.
        slots.resize(false, 1);
        slots.resize(true, 0);
        let mut fourth = Ticket {
            slots: &slots,
            id: None,
        };
        assert_eq!(fourth.acquire(&mut cx), None);
        slots.release(b);
        assert_eq!(fourth.acquire(&mut cx), Some(b));
        slots.release(a);
        slots.release(b);
        let state = lock(&slots.state);
        assert_eq!((state.open, state.free.len()), (2, 2));
    }

    /// A runner asked to leave while it is busy in a poll does not use up the next request:
    /// asked again, an idle runner leaves.
    #[test]
    fn a_runner_busy_when_asked_to_leave_does_not_keep_an_idle_one() {
        let execution = Execution::new(2);
        let mut cx = Context::from_waker(Waker::noop());
        let mut busy = pin!(execution.retired());
        let mut idle = pin!(execution.retired());
        assert!(busy.as_mut().poll(&mut cx).is_pending());
        assert!(idle.as_mut().poll(&mut cx).is_pending());
        // Asked first (the oldest listener), the busy runner is not polled: it is computing.
        execution.ask_to_retire(1);
        execution.ask_to_retire(1);
        assert!(
            idle.as_mut().poll(&mut cx).is_ready(),
            "the idle runner was asked to leave too"
        );
        assert!(
            busy.as_mut().poll(&mut cx).is_ready(),
            "and the busy one, when it looks"
        );
        assert_eq!(execution.retire.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn slots_are_handed_out_in_order_and_passed_on() {
        let execution = Arc::new(Execution::new(2));
        // Two polls hold both slots; a third waits, and gets a slot when one is released.
        let slots = &execution.slots;
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut first = Ticket { slots, id: None };
        let mut second = Ticket { slots, id: None };
        let mut third = Ticket { slots, id: None };
        let mut fourth = Ticket { slots, id: None };
        let a = first.acquire(&mut cx).expect("a free slot");
        let b = second.acquire(&mut cx).expect("a free slot");
        assert_eq!(third.acquire(&mut cx), None);
        assert_eq!(fourth.acquire(&mut cx), None);
        slots.release(a);
        // The slot went to the oldest waiter, not to a newcomer.
        let mut newcomer = Ticket { slots, id: None };
        assert_eq!(newcomer.acquire(&mut cx), None);
        assert_eq!(third.acquire(&mut cx), Some(a));
        // A waiter that leaves with a slot granted passes it on.
        slots.release(b);
        drop(fourth);
        assert_eq!(newcomer.acquire(&mut cx), Some(b));
        slots.release(a);
        slots.release(b);
        assert_eq!(lock(&slots.state).free.len(), 2);
        drop(newcomer);
        drop(third);
        drop(second);
        drop(first);
        let _ = future::block_on(execution.compute(async { 1 }, &Watch::none()));
        future::block_on(execution.close());
    }
}
