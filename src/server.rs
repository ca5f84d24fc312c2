//! The daemon: accept loop, shutdown, drain, idle stop.

use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_executor::Executor;
use async_io::{Async, Timer};
use async_signal::{Signal, Signals};
use futures_lite::future::{self, FutureExt};
use futures_lite::StreamExt;
use rustix::net::{SendFlags, SocketFlags};

use crate::config::Config;
use crate::connection;
use crate::dispatch::Dispatch;
use crate::inflight::{Flag, InFlight};
use crate::instance::Instance;
use crate::systemd;
use crate::wire::{encode_frame, Response};
use crate::Error;

/// Descriptors kept free for the daemon's own use when the open-file limit caps connections.
const FD_RESERVE: u64 = 32;

/// A daemon serving one dispatcher on one socket.
///
/// [`run`](Daemon::run) is a future for applications that already drive smol;
/// [`run_blocking`](Daemon::run_blocking) runs it on the caller's thread, for a `main`.
///
/// # Examples
///
/// ```no_run
/// # struct Echo;
/// # impl khived::Dispatch for Echo {
/// #     async fn dispatch(&self, ops: &str, _: Option<&str>, _: Option<&[Option<String>]>)
/// #         -> Result<String, String> { Ok(ops.to_owned()) }
/// #     fn namespace(&self) -> &str { "echo" }
/// #     fn config_id(&self) -> &str { "" }
/// # }
/// let daemon = khived::Daemon::new(khived::Config::from_env(), Echo);
/// let stop = daemon.shutdown_handle();
/// std::thread::spawn(move || {
///     std::thread::sleep(std::time::Duration::from_secs(60));
///     stop.shutdown();
/// });
/// daemon.run_blocking()?;
/// # Ok::<(), khived::Error>(())
/// ```
#[derive(Debug)]
pub struct Daemon<D> {
    config: Config,
    dispatcher: D,
    shutdown: ShutdownHandle,
}

/// Stops a running [`Daemon`] as SIGTERM would: the listener closes, requests in flight
/// finish (up to the drain timeout), files are removed. Cloneable and usable from any thread.
///
/// ```no_run
/// # struct Echo;
/// # impl khived::Dispatch for Echo {
/// #     async fn dispatch(&self, ops: &str, _: Option<&str>, _: Option<&[Option<String>]>)
/// #         -> Result<String, String> { Ok(ops.to_owned()) }
/// #     fn namespace(&self) -> &str { "echo" }
/// #     fn config_id(&self) -> &str { "" }
/// # }
/// // An application that already runs an executor spawns the daemon on it.
/// let executor = async_executor::Executor::new();
/// async_io::block_on(executor.run(async {
///     let daemon = khived::Daemon::new(khived::Config::from_env(), Echo);
///     let stop = daemon.shutdown_handle();
///     let serving = executor.spawn(daemon.run());
///     // ... later, from any task or thread:
///     stop.shutdown();
///     serving.await
/// }))?;
/// # Ok::<(), khived::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct ShutdownHandle {
    requested: Arc<Flag>,
}

impl ShutdownHandle {
    /// Asks the daemon to stop; returns at once.
    pub fn shutdown(&self) {
        self.requested.set();
    }
}

/// What every task of a daemon shares.
#[derive(Debug)]
pub(crate) struct Shared<D> {
    pub(crate) dispatcher: D,
    pub(crate) config: Config,
    pub(crate) in_flight: Arc<InFlight>,
    /// Requests answered so far.
    pub(crate) served: AtomicU64,
    pub(crate) started: Instant,
    /// Set once the listener is closed: idle connections close, busy ones finish.
    pub(crate) draining: Flag,
    pub(crate) notifier: Option<systemd::Notifier>,
}

impl<D> Shared<D> {
    pub(crate) fn new(dispatcher: D, config: Config) -> Self {
        Shared {
            dispatcher,
            config,
            in_flight: Arc::default(),
            served: AtomicU64::new(0),
            started: Instant::now(),
            draining: Flag::default(),
            notifier: None,
        }
    }

    /// Tells the service manager, if there is one, how we are doing.
    pub(crate) fn notify(&self, state: &str) {
        if let Some(notifier) = &self.notifier {
            notifier.notify(state);
        }
    }
}

impl<D: Dispatch> Daemon<D> {
    /// A daemon for `dispatcher`, configured by `config`; nothing happens until it runs.
    pub fn new(config: Config, dispatcher: D) -> Self {
        Daemon {
            config,
            dispatcher,
            shutdown: ShutdownHandle::default(),
        }
    }

    /// A handle that stops the daemon from anywhere.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// Runs the daemon on the current thread until it is stopped, and blocks until then.
    ///
    /// The threads are the caller's, which runs every connection and drives the reactor, and
    /// the `async-io` helper thread, which drives the reactor while the caller is busy.
    pub fn run_blocking(self) -> Result<(), Error> {
        async_io::block_on(self.run())
    }

    /// Runs the daemon until SIGTERM, SIGINT (if [`Config::handle_signals`]), the shutdown
    /// handle or the idle timeout stops it. Returns `Ok(())` after a clean drain.
    ///
    /// Connections run as tasks of an executor inside this future, so they make progress
    /// only while it is polled; spawn it on your executor or await it. A second signal during
    /// the drain removes the daemon's files and exits the process at once with status
    /// 128 + the signal's number.
    ///
    /// Starting blocks the polling thread briefly: taking the PID file's lock retries for up
    /// to 100 ms, and a socket left in place is probed for up to 1 s before it is replaced.
    /// Under a service manager, starting removes `LISTEN_PID`, `LISTEN_FDS`,
    /// `LISTEN_FDNAMES` and `NOTIFY_SOCKET` from the environment so that child processes do
    /// not take them for their own; like any change of the environment, that is best done
    /// before other threads that read it are running.
    pub async fn run(self) -> Result<(), Error> {
        let Daemon {
            config,
            dispatcher,
            shutdown,
        } = self;
        let mut signals = match config.handle_signals {
            true => Some(Signals::new([Signal::Term, Signal::Int])?),
            false => None,
        };
        let inherited = match config.socket_activation {
            true => systemd::inherited_listener()?,
            false => None,
        };
        let activated = inherited.is_some();
        let (mut instance, listener) = Instance::start(&config, inherited)?;
        let listener = Async::new_nonblocking(listener)?;
        let notifier = systemd::Notifier::from_env();
        let max_connections = connection_cap(config.max_connections);
        log::info!(
            "serving namespace {:?} on {}{} (pid {})",
            dispatcher.namespace(),
            config.socket.display(),
            if activated {
                " (socket from the service manager)"
            } else {
                ""
            },
            std::process::id()
        );
        let mut shared = Shared::new(dispatcher, config);
        shared.notifier = notifier;
        shared.notify("READY=1\nSTATUS=warming up, serving requests");
        let shared = Arc::new(shared);
        let executor = Arc::new(Executor::new());
        let supervise = supervise(
            &executor,
            &shared,
            listener,
            max_connections,
            &shutdown,
            signals.as_mut(),
        );
        let outcome = executor.run(supervise).await;
        drop(executor);
        if let Drained::Forced(signal) = outcome {
            instance.cleanup();
            std::process::exit(128 + signal_number(signal));
        }
        shared.dispatcher.shut_down().await;
        instance.cleanup();
        log::info!("stopped");
        Ok(())
    }
}

enum Drained {
    All,
    TimedOut,
    Forced(Signal),
}

/// Starts the accept loop and the background tasks, waits for a reason to stop, then drains.
async fn supervise<D: Dispatch>(
    executor: &Arc<Executor<'static>>,
    shared: &Arc<Shared<D>>,
    listener: Async<UnixListener>,
    max_connections: usize,
    shutdown: &ShutdownHandle,
    mut signals: Option<&mut Signals>,
) -> Drained {
    let closing = Arc::new(Flag::default());
    let accept = executor.spawn(accept_loop(
        listener,
        Arc::clone(shared),
        Arc::clone(executor),
        max_connections,
        Arc::clone(&closing),
    ));
    let warm = Arc::clone(shared);
    executor
        .spawn(async move {
            warm.dispatcher.warm_all().await;
            log::info!("warm_all finished");
            if !warm.draining.is_set() {
                warm.notify("STATUS=serving requests");
            }
        })
        .detach();
    if let Some(after) = shared.config.idle_shutdown {
        let watch = idle_watch(Arc::clone(&shared.in_flight), after, shutdown.clone());
        executor.spawn(watch).detach();
    }

    let reason = async {
        shutdown.requested.wait().await;
        "shutdown requested".to_owned()
    }
    .or(async {
        match next_signal(signals.as_deref_mut()).await {
            Some(signal) => format!("{} received", signal_name(signal)),
            None => future::pending().await,
        }
    })
    .await;

    // Close the listener before anything else, so that no new client connects to a daemon
    // that will not answer it.
    closing.set();
    accept.await;
    shared.draining.set();
    let drain = shared.config.drain_timeout;
    shared.notify(&format!(
        "STOPPING=1\nSTATUS=draining {} connection(s)",
        shared.in_flight.get()
    ));
    log::info!(
        "stopping ({reason}): listener closed, draining {} connection(s) for up to {drain:?}",
        shared.in_flight.get()
    );

    let drained = async {
        shared.in_flight.until_zero().await;
        Drained::All
    }
    .or(async {
        Timer::after(drain).await;
        Drained::TimedOut
    })
    .or(async {
        match next_signal(signals).await {
            Some(signal) => Drained::Forced(signal),
            None => future::pending().await,
        }
    })
    .await;
    match drained {
        Drained::All => {}
        Drained::TimedOut => log::warn!(
            "drain timeout ({drain:?}) reached: {} connection(s) cut off",
            shared.in_flight.get()
        ),
        Drained::Forced(signal) => log::warn!(
            "{} received again: exiting now, {} connection(s) cut off",
            signal_name(signal),
            shared.in_flight.get()
        ),
    }
    drained
}

async fn next_signal(signals: Option<&mut Signals>) -> Option<Signal> {
    let signals = signals?;
    loop {
        match signals.next().await? {
            Ok(signal) => return Some(signal),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("signal handling failed: {e}");
                return None;
            }
        }
    }
}

fn signal_number(signal: Signal) -> i32 {
    match signal {
        Signal::Int => 2,
        _ => 15,
    }
}

fn signal_name(signal: Signal) -> &'static str {
    match signal {
        Signal::Int => "SIGINT",
        _ => "SIGTERM",
    }
}

/// Accepts connections and spawns a task for each, until `closing` is set. Runs as a task of
/// its own, not as the future given to `Executor::run`, which is polled again on every
/// wake-up of the executor.
async fn accept_loop<D: Dispatch>(
    listener: Async<UnixListener>,
    shared: Arc<Shared<D>>,
    executor: Arc<Executor<'static>>,
    max_connections: usize,
    closing: Arc<Flag>,
) {
    let mut gate = Gate {
        shared,
        executor,
        max_connections,
        own_uid: rustix::process::geteuid().as_raw(),
        refusals: Throttled::default(),
    };
    let mut backoff = AcceptBackoff::default();
    loop {
        let accepted = async { Some(listener.read_with(accept).await) }
            .or(async {
                closing.wait().await;
                None
            })
            .await;
        match accepted {
            None => break,
            Some(Ok(fd)) => {
                backoff.reset();
                gate.admit(UnixStream::from(fd));
            }
            Some(Err(e)) => backoff.failed(e).await,
        }
    }
    // Clients the kernel queued before the shutdown have connected and may have sent their
    // request: take them in (they are drained like the rest), then close the listener.
    while let Ok(fd) = accept(listener.get_ref()) {
        gate.admit(UnixStream::from(fd));
    }
}

/// `accept4` with the flags set: saves an `fcntl` per connection.
fn accept(listener: &UnixListener) -> io::Result<rustix::fd::OwnedFd> {
    rustix::net::accept_with(listener, SocketFlags::CLOEXEC | SocketFlags::NONBLOCK)
        .map_err(io::Error::from)
}

/// What a connection passes before it is served: the peer check and the connection cap.
struct Gate<D> {
    shared: Arc<Shared<D>>,
    executor: Arc<Executor<'static>>,
    max_connections: usize,
    own_uid: u32,
    refusals: Throttled,
}

impl<D: Dispatch> Gate<D> {
    fn admit(&mut self, stream: UnixStream) {
        let shared = &self.shared;
        // Who is calling is decided before a byte is read: file modes can be loosened by
        // mistake, the kernel's record of the peer cannot.
        match peer_uid(&stream) {
            Ok(uid) if uid == self.own_uid || (uid == 0 && shared.config.allow_root) => {}
            Ok(uid) => {
                self.refusals.warn(|suppressed| {
                    format!("refused a connection from uid {uid} ({suppressed} more refusals not logged)")
                });
                return;
            }
            Err(e) => {
                self.refusals.warn(|suppressed| {
                    format!("refused a connection: cannot tell who it is: {e} ({suppressed} more refusals not logged)")
                });
                return;
            }
        }
        if shared.in_flight.get() >= self.max_connections {
            refuse_busy(shared, &stream, self.max_connections);
            return;
        }
        // Counted before the task exists, so a shutdown that starts now waits for it.
        let guard = shared.in_flight.enter();
        let shared = Arc::clone(shared);
        self.executor
            .spawn(async move {
                connection::serve(&shared, stream).await;
                drop(guard);
            })
            .detach();
    }
}

/// Tells a client over the cap that the daemon is busy, without ever waiting for it: a fresh
/// socket's buffer always takes one small frame.
fn refuse_busy<D: Dispatch>(shared: &Shared<D>, stream: &UnixStream, max: usize) {
    let error = format!("daemon_busy: {max} connections open; try again shortly");
    let response = Response::error(error, shared.dispatcher.config_id());
    if let Ok(frame) = encode_frame(&response) {
        let _ = rustix::net::send(stream, &frame, SendFlags::NOSIGNAL);
    }
}

/// The uid of the process at the other end, as the kernel recorded it at `connect`.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn peer_uid(stream: &UnixStream) -> io::Result<u32> {
    Ok(rustix::net::sockopt::socket_peercred(stream)?.uid.as_raw())
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn peer_uid(_stream: &UnixStream) -> io::Result<u32> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "peer credentials (SO_PEERCRED) are not supported on this platform yet",
    ))
}

/// A warning logged at most once a second, with a count of those held back.
#[derive(Debug, Default)]
struct Throttled {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttled {
    fn warn(&mut self, message: impl FnOnce(u64) -> String) {
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
    async fn failed(&mut self, e: io::Error) {
        if matches!(
            e.kind(),
            io::ErrorKind::ConnectionAborted | io::ErrorKind::Interrupted
        ) {
            return;
        }
        let delay = self.delay;
        self.log.warn(|suppressed| {
            format!("accept failed: {e}; retrying in {delay:?} ({suppressed} similar failures not logged)")
        });
        Timer::after(delay).await;
        self.delay = (delay * 2).min(Duration::from_secs(1));
    }

    fn reset(&mut self) {
        self.delay = Duration::from_millis(10);
    }
}

/// Requests a shutdown once no connection has been open for `after`.
async fn idle_watch(in_flight: Arc<InFlight>, after: Duration, shutdown: ShutdownHandle) {
    loop {
        in_flight.until_zero().await;
        let busy = async {
            in_flight.until_busy().await;
            false
        };
        let quiet = async {
            Timer::after(after).await;
            true
        };
        if busy.or(quiet).await {
            log::info!("no connection for {after:?}: stopping");
            shutdown.shutdown();
            return;
        }
    }
}

/// The connection cap, lowered so that connections cannot use up the open-file limit.
fn connection_cap(configured: usize) -> usize {
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
