//! Keep a program warm behind a Unix socket.
//!
//! Tools that are slow to start (they load indexes, models, caches) can run once as a daemon
//! and answer short-lived clients in microseconds. khived is that daemon's runtime: implement
//! [`Dispatch`], hand it to a [`Daemon`], and clients reach it over a per-user Unix socket
//! with 4-byte big-endian length-prefixed JSON frames (see [The wire format](#the-wire-format)).
//!
//! What the runtime takes care of:
//!
//! - **One daemon per socket**, decided by an exclusive `flock` on the PID file that the daemon
//!   holds for its whole life (see [One daemon per socket](#one-daemon-per-socket)). A second
//!   daemon fails with [`Error::AlreadyRunning`] and touches none of the first one's files;
//!   files left by a daemon killed with SIGKILL are cleaned up by the next start.
//! - **Private files**: the socket's directory is 0700 and must belong to the daemon's user,
//!   and every directory above it to the user or root, writable by no one else unless sticky;
//!   the socket is 0600 from the moment it exists; the PID file is 0600 and never opened
//!   through a symbolic link. Clients check the same directories, and that the process
//!   serving the socket runs as their user (or root), before they send anything.
//! - **The request path**: protocol version, namespace and configuration checks, the probe,
//!   several requests per connection answered in order (request ids echoed), error replies
//!   with stable codes instead of silent closes for bad, oversized or truncated frames, and
//!   panics in the dispatcher caught and answered.
//! - **Shutdown**: on SIGTERM, SIGINT or SIGHUP (or a [`ShutdownHandle`], or after an idle
//!   period) the listener closes first, idle connections close, requests in flight finish up
//!   to the drain timeout, and the socket and PID file are removed if they are still the
//!   daemon's own. SIGHUP is a stop like the others: it is what a daemon started from a
//!   terminal gets when the terminal closes. A second signal during the drain stops at once.
//!   Either way [`Daemon::run`] returns how it stopped ([`Stopped`]); the library never exits
//!   the process.
//! - **Limits**: deadlines for slow clients, a cap on connections, and a frame reader that
//!   allocates only as bytes arrive.
//! - **Dispatch on every core**: requests that are answered at once stay on one thread;
//!   dispatchers that compute get as many threads as there are CPUs, while probes, accepting
//!   and reading stay responsive. Requests can have a deadline (`request_timed_out`) and are
//!   cancelled when their client hangs up.
//! - **The client side**: [`Client`] (blocking), [`AsyncClient`] (for smol applications,
//!   with pipelining), [`probe`], [`Spawn`] (start a daemon on demand) and [`running_pid`]
//!   use the wire format and the PID file only, never the server's code.
//!
//! # The wire format
//!
//! The complete contract, what each side may rely on, is the project's **PROTOCOL.md**; in
//! brief: a frame is a 4-byte big-endian length followed by that many bytes of JSON, at most
//! [`MAX_FRAME_BYTES`] (8 MiB). A client sends a [`Request`] frame and reads a [`Response`]
//! frame; it may send further requests on the same connection, pipelined if it likes, which
//! are answered in order. The daemon speaks protocol version [`PROTOCOL_VERSION`] (1) and
//! says so on every response; a request of a newer `protocol_version` is refused
//! (`version_mismatch`) before anything runs, so that a request is never executed under
//! semantics the daemon does not have. Then it checks the namespace and the configuration
//! id, then dispatches; `served_config_id` is on every response, and a `request_id` sent
//! with a request comes back on its response. A request with `"probe": true` is answered
//! with the daemon's [`ProbeInfo`]; one with `"probe_only": true` only checks the namespace
//! and configuration. Every error carries an [`ErrorDetail`]: a stable [`code`](mod@code)
//! (`bad_request`, `frame_too_large`, `daemon_busy`, …) and a [`Disposition`] that says
//! whether the request may have had an effect, so that a client knows when retrying is
//! safe; the `error` text of version 0 stays. A bad, oversized or truncated frame gets an
//! error response and the connection closes. A header announcing more than the cap is
//! refused before its body is read, and a reader allocates at most 64 KiB ahead of the bytes
//! that have arrived, so a peer that announces 8 MiB and then sends nothing costs 64 KiB.
//! [`encode_frame`] makes a [`Frame`] (header included), [`write_frame`] writes one and
//! [`read_frame`] reads one, over any stream. Clients written for version 0 are served as
//! before: every version 1 field is optional.
//!
//! # One daemon per socket
//!
//! The kernel decides who runs: the daemon takes a non-blocking exclusive `flock` on its PID
//! file and holds it until it exits, so two daemons started at the same moment cannot both
//! pass a check-then-act test ("is the PID alive? is the socket answering?"), and a lock dies
//! with its process, even one killed with SIGKILL, so no stale state can keep a new daemon
//! out. Only the lock holder touches the socket path: it removes a socket left by a dead
//! daemon (after making sure nothing answers there) and binds its own. [`running_pid`] reads
//! the lock from outside, so a PID from a stale file is never acted on, and a PID file whose
//! lock is free names no daemon. [`Spawn`] uses the PID file to wait for a daemon that is
//! still draining, and a lock file of its own so that many clients start one daemon.
//!
//! A new build or configuration replaces the running daemon without a failed request: a
//! daemon with [`Config::replace`] (or started by [`Spawn::replace`]) is handed the running
//! one's listening socket and PID file, lock included, over a handover socket beside the
//! listening socket (same user only). The running daemon serves until its successor is
//! ready, then stops accepting, drains and exits; a successor that fails before that
//! changes nothing (PROTOCOL.md, "Handover").
//!
//! To keep a program in another language warm, no dispatcher needs writing: the
//! [`pool`] module's `Pool` (feature `pool`, on by default) runs worker processes that speak
//! one JSON object per line on stdin and stdout, restarts them when they fail, and reaps them
//! at shutdown.
//!
//! # Implementation: which thread runs what
//!
//! Every connection is a task of one `async-executor`, and every task may run on any of the
//! daemon's executor threads:
//!
//! - **The caller's thread** ([`Daemon::run_blocking`], or whichever thread polls
//!   [`Daemon::run`]) runs the executor: the accept loop, the peer check, reading frames,
//!   probes, mismatch and busy replies, dispatch, writing answers. While nothing computes it
//!   is the only one: a request that its dispatcher answers at once is read, dispatched and
//!   answered on that thread with no hand-off to another one, and the socket is not even
//!   registered with the reactor when its request is already waiting.
//! - **The `async-io` helper thread** drives the reactor (epoll, timers) while the executor
//!   threads are busy.
//! - **Runner threads** run the same executor while dispatches compute. Each poll of a
//!   dispatch future takes one of [`Config::threads`] compute slots (default: the CPUs the
//!   process may run on; `KHIVE_THREADS`, `khived serve --threads`), so at most that many
//!   threads compute at once; a request waiting for a slot is a parked task, not a blocked
//!   thread, and slots are handed out in arrival order.
//! - **A watchdog thread**, present only while dispatches happen, looks at the slots every
//!   millisecond or few. While every thread there is has been computing (on average over
//!   the last few looks), it starts a runner, up to `threads` in all: dispatch uses every
//!   core.
//!   When every thread is inside a dispatch poll that has lasted 10 ms, it starts one more,
//!   so that probes, accepting and reading never wait for long computations. While every
//!   slot is held by a poll that has lasted 10 ms and a request waits for one, it opens one
//!   more slot, up to `2 × threads`, so that quick requests do not wait for long
//!   computations to end either (the kernel shares the cores among those). Runners and
//!   opened slots not needed for 2 s are given back, and the watchdog leaves 2 s after the
//!   last dispatch: an idle daemon has two threads, the caller's and `async-io`'s.
//!
//! With `threads = 1` there are no slots, runners or watchdog: everything runs on the caller's
//! thread, and a dispatcher that computes holds up every other connection while it does.
//! A dispatch future may move between threads from one poll to the next (hence `Send`).
//!
//! A request can be cut short in two ways, both by dropping its dispatch future (smol's
//! cancellation): its deadline ([`Config::request_timeout`]; the client gets the error
//! `request_timed_out`, disposition unknown), and its client hanging up while it waits for a
//! slot or is dispatched ([`Config::cancel_on_disconnect`], on by default). A computation
//! that never awaits can only stop at its next await point: dropping a future cannot
//! interrupt a poll.
//!
//! Signals are received through `async-signal` (a self-pipe, no extra thread). In-flight
//! connections are counted with guards that wake the drain through `event-listener` when the
//! count reaches zero: shutdown never polls and never sleeps. Once the drain is over the
//! runner threads are stopped and joined before [`Daemon::run`] returns.
//!
//! A connection's socket is registered with the reactor only when something has to wait: a
//! read that would block is first retried a few times, letting the other connections run in
//! between, because a client's request (or its next one, or its close) usually arrives within
//! microseconds, and waiting for it through `epoll` costs three `epoll_ctl` calls and a sleep
//! and wake-up of the thread. A fresh connection usually has its request waiting already.
//!
//! Memory for large frames is bounded daemon-wide: a buffer above 64 KiB (a large request
//! being read, a large response being written) is paid for from
//! [`Config::frame_memory_budget`] before it is allocated, and a connection without room
//! waits for it in line, woken through `event-listener` when bytes come back, until its
//! deadline. Small requests never wait. A large buffer is freed as soon as its frame is
//! answered or written, its pages handed back to the system first, so a burst of large
//! frames leaves nothing behind.
//!
//! # Examples
//!
//! A complete daemon whose answer is the request's `ops`:
//!
//! ```no_run
//! use khived::{Config, Daemon, Dispatch, DispatchError, Request};
//!
//! struct Echo;
//!
//! impl Dispatch for Echo {
//!     async fn dispatch(&self, request: &Request<'_>) -> Result<String, DispatchError> {
//!         Ok(request.ops.to_string())
//!     }
//!
//!     fn namespace(&self) -> &str {
//!         "echo"
//!     }
//!
//!     fn config_id(&self) -> &str {
//!         ""
//!     }
//! }
//!
//! fn main() -> Result<std::process::ExitCode, khived::Error> {
//!     khived::init_stderr_logger(log::LevelFilter::Info);
//!     let stopped = Daemon::new(Config::from_env(), Echo).run_blocking()?;
//!     // 0 after a drain; 128 + n when a second signal forced the stop.
//!     Ok(stopped.exit_code().into())
//! }
//! ```
//!
//! And a client:
//!
//! ```no_run
//! use std::time::Duration;
//!
//! let mut client = khived::Client::connect(khived::socket_path(), Duration::from_secs(2))?;
//! let response = client.request(&khived::Request::new("hello", "echo", ""))?;
//! assert_eq!(response.result.as_deref(), Some("hello"));
//! # std::io::Result::Ok(())
//! ```
//!
//! Or, in a smol application, [`AsyncClient`] (`examples/async_client.rs`):
//!
//! ```no_run
//! use std::time::Duration;
//!
//! # fn main() -> std::io::Result<()> {
//! async_io::block_on(async {
//!     let socket = khived::socket_path();
//!     let mut client = khived::AsyncClient::connect(socket, Duration::from_secs(2)).await?;
//!     let response = client.request(&khived::Request::new("hello", "echo", "")).await?;
//!     if response.is_retryable() {
//!         // daemon_busy or daemon_draining: nothing ran; try again later.
//!     }
//!     Ok(())
//! })
//! # }
//! ```

#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]
// Six `unsafe` blocks exist: `pre_exec` in `spawn`, to put a started daemon in a session of
// its own, `pre_exec` in `pool`, to give a worker PDEATHSIG (Linux), taking descriptor 3 from
// a service manager in `systemd` (Linux), `getpeereid` in `sys` (not Linux: rustix lacks
// it), `madvise` in `pages`, on the pages of a buffer about to be freed, and glibc's
// `malloc_trim` in `pages`, once a burst is over. Everything else goes through rustix.
#![deny(unsafe_code)]

// The path of a request: accept -> connection (read frame, decide, dispatch, write frame).
// The lifecycle around it: server (start, signals, drain), instance (files and lock), shared
// (what the tasks share). The client side (client, spawn, pidfile) never imports those;
// both sides share `config` and `trust` (which directories and peers are trusted).
mod accept;
mod async_client;
mod budget;
mod cancel;
mod client;
mod config;
mod connection;
mod dispatch;
mod error;
mod execution;
mod handover;
// The fuzz targets' way in to the per-connection handler; not part of the API (see
// Cargo.toml's `__fuzzing` feature).
#[cfg(feature = "__fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod inflight;
mod instance;
mod logfile;
mod logger;
mod pages;
mod pidfile;
pub mod pool;
mod server;
mod shared;
mod spawn;
mod sys;
#[cfg(target_os = "linux")]
mod systemd;
// Elsewhere there is no systemd to speak to: socket activation is off, notifications go nowhere.
#[cfg(not(target_os = "linux"))]
use sys::no_service_manager as systemd;
mod trust;
mod wire;

pub use async_client::AsyncClient;
pub use client::{probe, Client};
pub use config::{beside, env_truthy, pid_path, socket_path, state_dir, Config};
pub use dispatch::{Dispatch, DispatchError};
pub use error::Error;
pub use logfile::RotatingFile;
pub use logger::{init_file_logger, init_stderr_logger};
pub use pidfile::{is_process_running, running_pid};
pub use server::{Daemon, ShutdownHandle, Stopped};
pub use spawn::Spawn;
pub use wire::{
    code, encode_frame, frame_len, read_frame, write_frame, Disposition, ErrorDetail, Frame,
    FrameDecoder, ProbeInfo, Request, Response, MAX_FRAME_BYTES, PROTOCOL_VERSION,
};

// The README's Rust example is compiled with the doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
