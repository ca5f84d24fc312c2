//! The accept stage: take a connection, check who is calling, enforce the connection cap,
//! and hand the connection to [`connection::serve`] as a task of its own.
//!
//! Nothing here reads a byte from a client: a connection is refused (peer check), answered
//! `daemon_busy` (over the cap) or spawned.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use async_executor::Executor;
use async_io::{Async, Timer};
use futures_lite::future::{self, FutureExt};

use crate::connection;
use crate::dispatch::Dispatch;
use crate::execution;
use crate::inflight::Flag;
use crate::instance::LISTEN_BACKLOG;
use crate::shared::Shared;
use crate::sys;
use crate::wire::{code, encode_frame_into, Disposition, ErrorDetail, Response};

/// Connections taken in at most before the accept loop lets the executor's other tasks run:
/// while the listener's queue stays full, a flood of connections must not hold up the
/// requests of those already open.
const ADMIT_BATCH: u32 = 32;

/// Descriptors kept free for the daemon's own use when the open-file limit caps connections.
const FD_RESERVE: u64 = 32;

/// How far the accept task has come in a stop: each flag set once; `lent` before `asked`, and
/// `closed` and `ended` in either order (see `accept_loop`).
#[derive(Debug, Default)]
pub(crate) struct Closing {
    /// Set by the shutdown when someone else (a successor in the middle of a handover) may
    /// hold the listening socket and go on with it: it is not closed to newcomers then.
    pub(crate) lent: Flag,
    /// Set by the shutdown: accept no more.
    pub(crate) asked: Flag,
    /// This daemon no longer takes in connections, or, when a stop finds no descriptor for
    /// the clients queued, only they are left: the drain that gives descriptors back may
    /// begin while the task waits for them.
    pub(crate) closed: Flag,
    /// The task has ended: no connection is taken in any more. Set however it ends, a panic
    /// included, so that the shutdown never waits for ever.
    pub(crate) ended: Flag,
}

/// Accepts connections and spawns a task for each, until `closing.asked` is set. Runs as a
/// task of its own, not inside the supervisor's future, which is polled again whenever the
/// executor's loop is woken.
///
/// The executor is held weakly: this task lives in it, and a strong hold would keep it, its
/// tasks and their connections alive for ever after a daemon's future is dropped unfinished.
///
/// `activated`: the listening socket is a service manager's, which keeps it open to
/// newcomers for the next start.
pub(crate) async fn accept_loop<D: Dispatch>(
    listener: Async<UnixListener>,
    shared: Arc<Shared<D>>,
    executor: Weak<Executor<'static>>,
    max_connections: usize,
    activated: bool,
    closing: Arc<Closing>,
) {
    // Dropped in the reverse order: at the end, `ended` is set before `closed`, so that a
    // shutdown woken by `closed` finds the task ended.
    let closed = SetOnDrop(Arc::clone(&closing), |closing| &closing.closed);
    let _ended = SetOnDrop(Arc::clone(&closing), |closing| &closing.ended);
    let mut gate = Gate {
        shared,
        executor,
        max_connections,
        own_uid: rustix::process::geteuid().as_raw(),
        refusals: Throttled::default(),
    };
    let mut backoff = AcceptBackoff::default();
    let mut admitted = 0;
    loop {
        // While connections are queued, or accepting fails at once (out of descriptors), the
        // accept below is ready first and wins every race with the shutdown.
        if closing.asked.is_set() {
            break;
        }
        let accepted = async { Some(when_ready(&listener).await) }
            .or(async {
                closing.asked.wait().await;
                None
            })
            .await;
        match accepted {
            None => break,
            Some(Ok(fd)) => {
                backoff.reset();
                gate.admit(UnixStream::from(fd));
                admitted += 1;
                if admitted == ADMIT_BATCH {
                    admitted = 0;
                    future::yield_now().await;
                }
            }
            // A shutdown does not wait for the back-off to end.
            Some(Err(e)) => backoff.failed(e).or(closing.asked.wait()).await,
        }
    }
    // Clients the kernel queued before the shutdown have connected and may have sent their
    // request: take them in (they are drained like the rest), then close the listener. After
    // a handover they are the successor's: it accepts them from the same socket.
    if !gate.shared.handed_over.is_set() {
        // From here a client that connects is refused at once, as it is once the listener is
        // closed, rather than queued and then cut off when it closes: the queue only shrinks.
        // Only a listener no one else holds is closed to newcomers.
        let ours = !activated && !closing.lent.is_set();
        let refusing = ours && sys::refuse_connections(listener.get_ref());
        // A listener still open to newcomers (a service manager's, one a successor may hold,
        // any where newcomers cannot be refused) is taken from for as long as its queue at
        // the stop can be, not for as long as clients keep connecting.
        let most = if refusing {
            usize::MAX
        } else {
            LISTEN_BACKLOG as usize
        };
        let mut taken = take_in_queued(listener.get_ref(), &mut gate, most);
        if refusing && taken.as_ref().is_err_and(out_of_room) {
            // The drain gives descriptors back as connections close, so it begins now, and
            // waits for this task to end as well as for its connections.
            drop(closed);
            backoff.reset();
            while let Err(e) = taken {
                if gate.shared.in_flight.get() == 0 {
                    // No connection is left to give a descriptor back.
                    taken = Err(e);
                    break;
                }
                backoff.failed(e).await;
                taken = take_in_queued(listener.get_ref(), &mut gate, most);
            }
        }
        if let Err(e) = taken {
            log::warn!("accept failed while stopping: {e}; clients still queued are not taken in");
        }
    }
    drop(listener);
}

/// Whether an accept failed for want of descriptors or memory, which closing connections
/// give back.
fn out_of_room(e: &io::Error) -> bool {
    use rustix::io::Errno;
    [Errno::MFILE, Errno::NFILE, Errno::NOBUFS, Errno::NOMEM]
        .iter()
        .any(|errno| e.raw_os_error() == Some(errno.raw_os_error()))
}

/// Sets one of the stop's flags when dropped.
struct SetOnDrop(Arc<Closing>, fn(&Closing) -> &Flag);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        (self.1)(&self.0).set();
    }
}

/// Takes in the connections queued on the listener, until it would wait for the next or
/// `most` are taken.
fn take_in_queued<D: Dispatch>(
    listener: &UnixListener,
    gate: &mut Gate<D>,
    mut most: usize,
) -> io::Result<()> {
    while most > 0 {
        match sys::accept(listener) {
            Ok(fd) => {
                most -= 1;
                gate.admit(UnixStream::from(fd));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if AcceptBackoff::passing(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Accepts a connection, waiting until the listener is readable. Not `read_with`, which
/// tries the `accept` again whenever it is polled: the handover socket's accept is polled
/// with the supervisor's future, each time the executor's tasks wake the daemon's thread,
/// and a look at readiness that has not changed costs no system call.
pub(crate) async fn when_ready(listener: &Async<UnixListener>) -> io::Result<OwnedFd> {
    loop {
        match sys::accept(listener.get_ref()) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => listener.readable().await?,
            accepted => return accepted,
        }
    }
}

/// What a connection passes before it is served: the peer check and the connection cap.
struct Gate<D> {
    shared: Arc<Shared<D>>,
    executor: Weak<Executor<'static>>,
    max_connections: usize,
    own_uid: u32,
    refusals: Throttled,
}

impl<D: Dispatch> Gate<D> {
    fn admit(&mut self, stream: UnixStream) {
        let shared = &self.shared;
        // Who is calling is decided before a byte is read: file modes can be loosened by
        // mistake, the kernel's record of the peer cannot.
        match sys::peer_uid(&stream) {
            Ok(uid) if uid == self.own_uid || (uid == 0 && shared.config.allow_root) => {}
            Ok(uid) => {
                self.refusals.warn(&|suppressed| {
                    format!("refused a connection from uid {uid} ({suppressed} more refusals not logged)")
                });
                return;
            }
            Err(e) => {
                self.refusals.warn(&|suppressed| {
                    format!("refused a connection: cannot tell who it is: {e} ({suppressed} more refusals not logged)")
                });
                return;
            }
        }
        if shared.in_flight.get() >= self.max_connections {
            refuse_busy(shared, &stream, self.max_connections);
            return;
        }
        let Some(executor) = self.executor.upgrade() else {
            return;
        };
        // Counted before the task exists, so a shutdown that starts now waits for it.
        let guard = shared.in_flight.enter();
        let shared = Arc::clone(shared);
        execution::spawn_task(&executor, async move {
            connection::serve(&shared, stream).await;
            drop(guard);
        })
        .detach();
    }
}

/// Tells a client over the cap that the daemon is busy, without ever waiting for it: a fresh
/// socket's buffer always takes one small frame.
///
/// The reply carries no `request_id`: the request has not been read (PROTOCOL.md, "Errors").
fn refuse_busy<D: Dispatch>(shared: &Shared<D>, stream: &UnixStream, max: usize) {
    let detail = ErrorDetail::new(
        code::DAEMON_BUSY,
        format!("daemon_busy: {max} connections open; try again shortly"),
        Disposition::NotCommitted,
    );
    let response = Response::error(detail, shared.dispatcher.config_id());
    let mut frame = Vec::new();
    if encode_frame_into(&mut frame, &response, "response").is_ok() {
        let _ = sys::send(stream, &frame);
    }
}

/// A warning logged at most once a second, with a count of those held back.
#[derive(Debug, Default)]
pub(crate) struct Throttled {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttled {
    pub(crate) fn warn(&mut self, message: &dyn Fn(u64) -> String) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|last| now - last < Duration::from_secs(1))
        {
            self.suppressed += 1;
            return;
        }
        log::warn!("{}", message(self.suppressed));
        self.last = Some(now);
        self.suppressed = 0;
    }
}

/// Accept errors (out of descriptors, aborted connections) never end the daemon: it waits a
/// little longer after each failure, from 10 ms up to 1 s, and logs at most once a second.
#[derive(Debug)]
struct AcceptBackoff {
    delay: Duration,
    log: Throttled,
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        AcceptBackoff {
            delay: Duration::from_millis(10),
            log: Throttled::default(),
        }
    }
}

impl AcceptBackoff {
    /// A failure of one connection, not of accepting: the next accept is tried at once.
    fn passing(e: &io::Error) -> bool {
        matches!(
            e.kind(),
            io::ErrorKind::ConnectionAborted | io::ErrorKind::Interrupted
        )
    }

    async fn failed(&mut self, e: io::Error) {
        if Self::passing(&e) {
            return;
        }
        let delay = self.delay;
        self.log.warn(&|suppressed| {
            format!("accept failed: {e}; retrying in {delay:?} ({suppressed} similar failures not logged)")
        });
        Timer::after(delay).await;
        self.delay = (delay * 2).min(Duration::from_secs(1));
    }

    fn reset(&mut self) {
        self.delay = Duration::from_millis(10);
    }
}

/// The connection cap, lowered so that connections cannot use up the open-file limit.
pub(crate) fn connection_cap(configured: usize) -> usize {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
    match limit {
        Some(limit) if limit.saturating_sub(FD_RESERVE) < configured as u64 => {
            let cap = limit.saturating_sub(FD_RESERVE).max(1) as usize;
            log::warn!(
                "max_connections lowered from {configured} to {cap} by the open-file limit \
                 ({limit}); raise it with `ulimit -n`"
            );
            cap
        }
        _ => configured,
    }
}
