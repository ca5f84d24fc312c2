//! The daemon's lifecycle: start, supervise the accept loop and the background tasks, stop
//! on a signal, the shutdown handle or idleness, drain, clean up. The path of one request is
//! in `accept` and `connection`.

use std::io;
use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::Duration;

use async_executor::Executor;
use async_io::{Async, Timer};
use async_signal::{Signal, Signals};
use futures_lite::future::{self, FutureExt};
use futures_lite::StreamExt;

use crate::accept::{accept_loop, connection_cap, Closing};
use crate::config::Config;
use crate::dispatch::Dispatch;
use crate::execution;
use crate::handover;
use crate::inflight::{Flag, InFlight};
use crate::instance::Instance;
use crate::shared::Shared;
use crate::systemd;
use crate::Error;

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
/// #     async fn dispatch(&self, request: &khived::Request<'_>)
/// #         -> Result<String, khived::DispatchError> { Ok(request.ops.to_string()) }
/// #     fn namespace(&self) -> &str { "echo" }
/// #     fn config_id(&self) -> &str { "" }
/// # }
/// let daemon = khived::Daemon::new(khived::Config::from_env(), Echo);
/// let stop = daemon.shutdown_handle();
/// std::thread::spawn(move || {
///     std::thread::sleep(std::time::Duration::from_secs(60));
///     stop.shutdown();
/// });
/// let stopped = daemon.run_blocking()?;
/// std::process::exit(stopped.exit_code().into());
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
/// # Examples
///
/// ```no_run
/// # struct Echo;
/// # impl khived::Dispatch for Echo {
/// #     async fn dispatch(&self, request: &khived::Request<'_>)
/// #         -> Result<String, khived::DispatchError> { Ok(request.ops.to_string()) }
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

/// How a daemon stopped, returned by [`Daemon::run`] once its files are removed.
///
/// The library never exits the process: after a second signal, the caller decides, and
/// [`exit_code`](Stopped::exit_code) gives the status a shell expects.
///
/// # Examples
///
/// ```no_run
/// # struct Echo;
/// # impl khived::Dispatch for Echo {
/// #     async fn dispatch(&self, request: &khived::Request<'_>)
/// #         -> Result<String, khived::DispatchError> { Ok(request.ops.to_string()) }
/// #     fn namespace(&self) -> &str { "echo" }
/// #     fn config_id(&self) -> &str { "" }
/// # }
/// use std::process::ExitCode;
///
/// fn main() -> Result<ExitCode, khived::Error> {
///     let stopped = khived::Daemon::new(khived::Config::from_env(), Echo).run_blocking()?;
///     if let khived::Stopped::Forced { signal, .. } = stopped {
///         eprintln!("stopped at once by signal {signal}");
///     }
///     Ok(ExitCode::from(stopped.exit_code()))
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stopped {
    /// Every connection finished within the drain timeout, then
    /// [`Dispatch::shut_down`] ran.
    Drained,
    /// The drain timeout passed with connections still open: they were cut off, then
    /// [`Dispatch::shut_down`] ran.
    DrainTimedOut,
    /// A second SIGTERM, SIGINT or SIGHUP arrived during the drain: open connections were cut
    /// off at once and [`Dispatch::shut_down`] was not called (the dispatcher is dropped
    /// instead).
    #[non_exhaustive]
    Forced {
        /// The second signal's number: 15 for SIGTERM, 2 for SIGINT, 1 for SIGHUP.
        signal: i32,
    },
}

impl Stopped {
    /// The conventional exit status for this outcome: 0 after a drain (complete or timed
    /// out), 128 + the signal's number after a forced stop (143 for SIGTERM, 130 for SIGINT,
    /// 129 for SIGHUP).
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(khived::Stopped::Drained.exit_code(), 0);
    /// assert_eq!(khived::Stopped::DrainTimedOut.exit_code(), 0);
    /// ```
    pub fn exit_code(&self) -> u8 {
        match self {
            Stopped::Drained | Stopped::DrainTimedOut => 0,
            Stopped::Forced { signal } => 128u8.saturating_add((*signal).clamp(0, 127) as u8),
        }
    }
}

impl<D: Dispatch> Daemon<D> {
    /// A daemon for `dispatcher`, configured by `config`; nothing happens until it runs.
    #[must_use = "a daemon does nothing until it runs"]
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
    /// The caller's thread runs every connection and drives the reactor, and the `async-io`
    /// helper thread drives the reactor while the caller is busy. While dispatches compute,
    /// more threads join in (see [`Config::threads`] and the crate documentation); they are
    /// given back after idling and are gone when this returns.
    ///
    /// # Errors
    ///
    /// As [`run`](Daemon::run).
    pub fn run_blocking(self) -> Result<Stopped, Error> {
        async_io::block_on(self.run())
    }

    /// Runs the daemon until SIGTERM, SIGINT or SIGHUP (if [`Config::handle_signals`]), the
    /// shutdown handle or the idle timeout stops it, and returns how it stopped once the socket and the
    /// PID file are removed and the PID file's lock is released.
    ///
    /// Connections run as tasks of an executor inside this future, so they make progress
    /// while it is polled (spawn it on your executor or await it), and on the runner threads
    /// the daemon starts while dispatches compute ([`Config::threads`]); those are stopped
    /// and joined before this returns.
    ///
    /// A stop closes the listener, then waits for requests in flight up to
    /// [`Config::drain_timeout`], then calls [`Dispatch::shut_down`]: the result is
    /// [`Stopped::Drained`] or [`Stopped::DrainTimedOut`]. A second signal during the drain
    /// stops at once: connections are cut off, `shut_down` is skipped, the files are removed,
    /// and the result is [`Stopped::Forced`]. The library never exits the process; a `main`
    /// should exit with [`Stopped::exit_code`] (128 + the signal's number after a forced
    /// stop), as shells and service managers expect.
    ///
    /// Dropping this future before it ends stops the daemon at once, as a forced stop does
    /// but without waiting: its connections are closed unanswered, its files are removed, and
    /// [`Dispatch::shut_down`] is not called (the dispatcher is dropped once the runner
    /// threads, which leave at once, have finished the poll they are in).
    ///
    /// Starting blocks the polling thread: taking the PID file's lock waits while others only
    /// look at it (up to 5 s), a socket left in place is probed for up to 1 s before it is
    /// replaced, and a handover ([`Config::replace`]) waits up to 30 s for each of the
    /// predecessor's two steps.
    /// Under a service manager, starting removes `LISTEN_PID`, `LISTEN_FDS`,
    /// `LISTEN_FDNAMES` and `NOTIFY_SOCKET` from the environment so that child processes do
    /// not take them for their own; like any change of the environment, that is best done
    /// before other threads that read it are running.
    ///
    /// # Errors
    ///
    /// [`Error::AlreadyRunning`] if another daemon holds the PID file's lock or answers on the
    /// socket (none of its files are touched); [`Error::Io`] if the daemon cannot start, with
    /// a message naming the path or limit and what to do: a socket path too long, a directory
    /// that others can write to or that belongs to another user, a PID file that is a symbolic
    /// link, a socket the service manager passed that is not a listening Unix stream socket.
    pub async fn run(self) -> Result<Stopped, Error> {
        let Daemon {
            config,
            dispatcher,
            shutdown,
        } = self;
        let mut signals = match config.handle_signals {
            // SIGHUP too: a daemon started from a terminal (`khived serve &`) gets it when the
            // terminal closes, and its default action would kill it without a drain, leaving
            // its socket and PID file behind.
            true => Some(Signals::new([Signal::Term, Signal::Int, Signal::Hup])?),
            false => None,
        };
        let inherited = match config.socket_activation {
            true => systemd::inherited_listener()?,
            false => None,
        };
        let activated = inherited.is_some();
        let taken = match config.replace && !activated {
            true => handover::take_over(&config)?,
            false => None,
        };
        let (mut instance, listener, handshake) = match taken {
            Some((listener, pid_file, handshake)) => {
                let instance = Instance::taken_over(&config, pid_file);
                (instance, listener, Some(handshake))
            }
            None => {
                let (instance, listener) = Instance::start(&config, inherited)?;
                (instance, listener, None)
            }
        };
        let offer_handover = offers_handover(&config, activated);
        let notifier = systemd::Notifier::from_env();
        let max_connections = connection_cap(config.max_connections);
        let mut shared = Shared::new(dispatcher, config);
        log::info!(
            "serving namespace {:?} on {}{} (pid {}, dispatch on up to {} thread(s))",
            shared.dispatcher.namespace(),
            shared.config.socket.display(),
            if activated {
                " (socket from the service manager)"
            } else {
                ""
            },
            std::process::id(),
            shared.execution.threads()
        );
        shared.notifier = notifier;
        shared.notify("READY=1\nSTATUS=warming up, serving requests");
        let shared = Arc::new(shared);
        let executor = Arc::new(Executor::new());
        shared.execution.attach(&executor);
        // If this future is dropped before it ends, the runner threads leave (they hold the
        // executor), so that the executor and the connections it holds are dropped too.
        let _leave = execution::LeaveOnDrop(&shared.execution);
        let supervise = supervise(
            &executor,
            &shared,
            Listening {
                listener,
                max_connections,
                handshake,
                offer_handover,
                activated,
            },
            &mut instance,
            &shutdown,
            signals.as_mut(),
        );
        let mut stopped = Ok(Stopped::Drained);
        async { stopped = supervise.await }
            .or(execution::run_tasks(&executor))
            .await;
        // The runner threads go first: they hold the executor, and dropping it cancels the
        // connections still open.
        shared.execution.close().await;
        drop(executor);
        if !matches!(stopped, Ok(Stopped::Forced { .. })) {
            shared.dispatcher.shut_down().await;
        }
        instance.cleanup();
        let stopped = stopped?;
        log::info!("stopped");
        Ok(stopped)
    }
}

/// Whether this daemon offers a handover to a successor: not under socket activation, where
/// the service manager keeps the socket across restarts.
fn offers_handover(config: &Config, activated: bool) -> bool {
    config.handover && !activated
}

/// The listening side of a daemon as `supervise` sets it up.
struct Listening {
    listener: UnixListener,
    max_connections: usize,
    /// A predecessor waiting to hear that we are ready.
    handshake: Option<handover::Handshake>,
    offer_handover: bool,
    /// The listener came from a service manager, which keeps it open across our restarts.
    activated: bool,
}

/// Why the daemon stops.
enum Reason {
    Asked(String),
    HandedOver(handover::Successor),
}

/// Starts warming, takes over from a predecessor if there is one, starts the accept loop and
/// the background tasks, waits for a reason to stop (a successor taking over is one), then
/// drains.
async fn supervise<D: Dispatch>(
    executor: &Arc<Executor<'static>>,
    shared: &Arc<Shared<D>>,
    listening: Listening,
    instance: &mut Instance,
    shutdown: &ShutdownHandle,
    mut signals: Option<&mut Signals>,
) -> io::Result<Stopped> {
    let warm = Arc::clone(shared);
    execution::spawn_task(executor, async move {
        // Warming may compute for long: it takes a compute slot like a dispatch, so that
        // requests are served by other threads meanwhile.
        let watch = execution::Watch::none();
        warm.execution
            .compute(warm.dispatcher.warm_all(), &watch)
            .await;
        log::info!("warm_all finished");
        if !warm.draining.is_set() {
            warm.notify("STATUS=serving requests");
        }
    })
    .detach();
    // Ready, warming: the predecessor stops accepting, and only then do we start, so that
    // one daemon accepts at a time and the connections queued meanwhile wait in the backlog.
    if let Some(handshake) = listening.handshake {
        let from = handshake.from;
        // One turn of the executor first: the warming task starts.
        future::yield_now().await;
        // Until our PID is in, the files are still the predecessor's: none is removed when
        // we return early.
        handshake.ready()?;
        // Gone without saying `stopped`: killed, and its files are ours, or told to stop,
        // and it removed them. Serving on then would leave a daemon nobody can reach.
        if !instance.in_place() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "pid {from} stopped during the handover and removed its socket or PID file"
                ),
            ));
        }
        instance.write_our_pid()?;
        log::info!("took over from pid {from}");
    }
    // A copy of the listener for a successor, dropped with the accept loop's.
    let listener_fd = listening.listener.as_fd().try_clone_to_owned()?;
    let offer = match listening.offer_handover {
        true => match handover::Offer::bind(&shared.config) {
            Ok(offer) => Some(offer),
            Err(e) => {
                log::warn!("no handover to a successor: {e}");
                None
            }
        },
        false => None,
    };
    let closing = Arc::new(Closing::default());
    execution::spawn_task(
        executor,
        accept_loop(
            Async::new_nonblocking(listening.listener)?,
            Arc::clone(shared),
            Arc::downgrade(executor),
            listening.max_connections,
            listening.activated,
            Arc::clone(&closing),
        ),
    )
    .detach();
    if let Some(after) = shared.config.idle_shutdown {
        let watch = idle_watch(Arc::clone(&shared.in_flight), after, shutdown.clone());
        execution::spawn_task(executor, watch).detach();
    }

    let reason = async {
        shutdown.requested.wait().await;
        Reason::Asked("shutdown requested".to_owned())
    }
    .or(async {
        match next_signal(signals.as_deref_mut()).await {
            Some(signal) => Reason::Asked(format!("{} received", signal_name(signal))),
            None => future::pending().await,
        }
    })
    .or(async {
        match (&offer, instance.pid_file()) {
            (Some(offer), Some(pid_file)) => {
                let successor = offer.successor(listener_fd.as_fd(), pid_file);
                let successor = handover::out_of_line(successor).await;
                Reason::HandedOver(successor)
            }
            _ => future::pending().await,
        }
    })
    .await;

    // Close the listener before anything else, so that no new client connects to a daemon
    // that will not answer it; after a handover, so that the successor alone accepts.
    if matches!(reason, Reason::HandedOver(_)) {
        shared.handed_over.set();
    }
    // Stopped in the middle of a handover, a successor may hold the listener and go on with it.
    if offer.as_ref().is_some_and(handover::Offer::lent) {
        closing.lent.set();
    }
    closing.asked.set();
    // The task may go on to take in queued clients as the drain gives back descriptors.
    closing.closed.wait().await;
    drop(listener_fd);
    // A successor binds its own handover socket once told that we stopped accepting.
    drop(offer);
    let reason = match reason {
        Reason::Asked(reason) => reason,
        Reason::HandedOver(successor) => {
            let pid = successor.pid;
            successor.stopped_accepting();
            instance.handed_over();
            format!("handed over to pid {pid}")
        }
    };
    shared.draining.set();
    let drain = shared.config.drain_timeout;
    let open = shared.in_flight.get();
    // Out of descriptors, the clients still queued are taken in as the drain frees some.
    let queued = match closing.ended.is_set() {
        true => "",
        false => " and the clients queued as descriptors come free",
    };
    shared.notify(&format!(
        "STOPPING=1\nSTATUS=draining {open} connection(s){queued}"
    ));
    log::info!(
        "stopping ({reason}): listener closed, draining {open} connection(s){queued} for up to {drain:?}"
    );

    let drained = async {
        closing.ended.wait().await;
        shared.in_flight.until_zero().await;
        Stopped::Drained
    }
    .or(async {
        Timer::after(drain).await;
        Stopped::DrainTimedOut
    })
    .or(async {
        match next_signal(signals).await {
            Some(signal) => {
                log::warn!(
                    "{} received again: stopping now, {} connection(s) cut off",
                    signal_name(signal),
                    shared.in_flight.get()
                );
                Stopped::Forced {
                    signal: signal_number(signal),
                }
            }
            None => future::pending().await,
        }
    })
    .await;
    if drained == Stopped::DrainTimedOut {
        log::warn!(
            "drain timeout ({drain:?}) reached: {} connection(s) cut off",
            shared.in_flight.get()
        );
    }
    Ok(drained)
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
        Signal::Hup => 1,
        Signal::Int => 2,
        _ => 15,
    }
}

fn signal_name(signal: Signal) -> &'static str {
    match signal {
        Signal::Hup => "SIGHUP",
        Signal::Int => "SIGINT",
        _ => "SIGTERM",
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
