//! Keep any program warm: a pool of worker processes behind the daemon.
//!
//! [`Pool`] is a [`Dispatch`](crate::Dispatch) that runs N copies of a program (in any
//! language) and talks to each over its stdin and stdout, one JSON object per line:
//!
//! - to the worker: `{"id": 7, "ops": …, "presentation": …, "presentation_per_op": …}`
//! - from the worker: `{"ok": true, "result": "…"}` or `{"ok": false, "error": "…"}`, best
//!   with the request's id echoed: `{"id": 7, "ok": true, "result": "…"}`
//!
//! The `id` grows with each request to a worker. Echoing it is optional and checked when
//! present. A worker is **out of sync** when a reply echoes another request's id, or when it
//! prints anything while no request is outstanding (a second reply, stray output): it is
//! restarted and the request at hand answered with an error, so that a reply never reaches a
//! client it was not meant for. Only the echoed id also catches a reply that comes late,
//! after the next request was sent.
//!
//! [`PoolOptions`] says what to run and the limits; `khived serve --worker` is this pool
//! behind a command line. [`line`](mod@line) encodes and parses the lines, for programs that run their
//! own workers; it is the only part that needs no feature. The pool needs the `pool`
//! feature (on by default through `cli`).
//!
//! # What the pool takes care of
//!
//! - **One request per worker at a time**; requests wait in a bounded queue
//!   ([`PoolOptions::queue`]), and a full queue answers `daemon_busy: …` at once. A queued
//!   request whose dispatch future was dropped (its client gone) is skipped, not run.
//! - **Failures are contained**: a worker that exits is restarted with backoff (100 ms
//!   doubling up to 10 s, back to 100 ms after 30 s of health) and the request it held gets
//!   an error naming its exit status at once: the exit is seen from the process itself, not
//!   from the end of its stdout, which a process it started may hold. One that exits while
//!   idle is noticed at once and restarted after the same backoff. One that hangs past [`PoolOptions::request_timeout`]
//!   is killed and restarted; one that prints something that is not a reply (or a line
//!   longer than [`MAX_FRAME_BYTES`](crate::MAX_FRAME_BYTES)) is a worker error, not a
//!   daemon crash. While no worker can start, requests fail at once with the reason: one
//!   whose command cannot be run, one that dies, hangs or breaks the protocol on its warm
//!   request, and one that fails twice in a row before it answers anything (it crashes,
//!   hangs or prints garbage as it starts; a clean exit while idle is no failure). Once is
//!   not enough: a fresh worker killed by its first request may have been killed by that
//!   request, and the requests queued behind it wait for the next worker.
//! - **Logs**: each worker's standard error goes to the daemon's log (the `log` crate), line
//!   by line, prefixed with its id, which the worker also finds in `KHIVED_WORKER_ID`; at
//!   most [`PoolOptions::stderr_lines_per_second`] lines a second (lines beyond 8 KiB cut).
//!   The excess is read and dropped, and counted in the log once a second. Forwarding takes
//!   one pipe's worth per turn and then lets the daemon's other tasks run, and waits while
//!   over its rate, so a flood costs the daemon little and never delays its answers.
//! - **No orphans**: each worker leads a process group of its own, and the whole group is
//!   killed at each restart, at shutdown and when the pool is dropped (a forced stop, a
//!   second signal, skips the shutdown), so what a worker started does not outlive it
//!   (unless it left the group on purpose, with `setsid` or `setpgid`). Workers get
//!   `PDEATHSIG=SIGKILL`, so they die with a daemon killed by SIGKILL. That is Linux only:
//!   elsewhere such a worker lives on until it reads the end of its stdin (and exits, as at a
//!   normal shutdown) or fails to write a reply (broken pipe), so one stuck in a request
//!   outlives the daemon. At a normal shutdown
//!   the daemon drains the requests in flight, then the workers' stdin is closed, they get
//!   [`PoolOptions::shutdown_grace`] to exit (their stderr still reaches the log, so saying
//!   goodbye there does not kill them with SIGPIPE), then SIGKILL; every child is reaped before the
//!   daemon lets go of its PID file. Being in their own group, workers do not get the
//!   terminal's Ctrl-C directly: the daemon stops them in order.
//!
//! # Implementation
//!
//! The workers' tasks run inside [`Dispatch::warm_all`](crate::Dispatch::warm_all), on
//! whichever of the daemon's threads polls it. Their processes are forked on one thread of
//! the pool's own, which lives as long as the pool: Linux sends the parent-death signal when
//! the *thread* that forked a worker ends, and the daemon's runner threads come and go.
//! `async-process` adds its thread that reaps children.
//!
//! # Examples
//!
//! A daemon that keeps two Python workers warm (`examples/worker.py` is a complete worker):
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use khived::pool::{Pool, PoolOptions};
//! use khived::{Config, Daemon};
//!
//! fn main() -> Result<std::process::ExitCode, khived::Error> {
//!     khived::init_stderr_logger(log::LevelFilter::Info);
//!     let options = PoolOptions::new(["python3", "examples/worker.py"])
//!         .workers(2)
//!         .request_timeout(Duration::from_secs(30))
//!         .namespace("words");
//!     let stopped = Daemon::new(Config::from_env(), Pool::new(options)?).run_blocking()?;
//!     Ok(stopped.exit_code().into())
//! }
//! ```

// Without the feature the types these docs link to do not exist; the links work where the
// docs are read (docs.rs builds with the default features).
#![cfg_attr(not(feature = "pool"), allow(rustdoc::broken_intra_doc_links))]

pub mod line;

#[cfg(feature = "pool")]
mod dispatcher;
#[cfg(feature = "pool")]
mod options;
#[cfg(feature = "pool")]
mod spawner;
#[cfg(feature = "pool")]
mod worker;

#[cfg(feature = "pool")]
pub use dispatcher::Pool;
#[cfg(feature = "pool")]
pub use options::PoolOptions;
