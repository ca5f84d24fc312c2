//! Keep any program warm: a pool of worker processes behind the daemon.
//!
//! [`Pool`] is a [`Dispatch`](crate::Dispatch) that runs N copies of a program (in any
//! language) and talks to each over its stdin and stdout, one JSON object per line:
//!
//! - to the worker: `{"ops": …, "presentation": …, "presentation_per_op": …}`
//! - from the worker: `{"ok": true, "result": "…"}` or `{"ok": false, "error": "…"}`
//!
//! [`PoolOptions`] says what to run and the limits; `khived serve --worker` is this pool
//! behind a command line. [`line`](mod@line) encodes and parses the lines, for programs that run their
//! own workers; it is the only part that needs no feature. The pool needs the `pool`
//! feature (on by default through `cli`).
//!
//! # What the pool takes care of
//!
//! - **One request per worker at a time**; requests wait in a bounded queue
//!   ([`PoolOptions::queue`]), and a full queue answers `daemon_busy: …` at once.
//! - **Failures are contained**: a worker that exits is restarted with backoff (100 ms
//!   doubling up to 10 s, back to 100 ms after 30 s of health) and the request it held gets
//!   an error naming its exit status; one that hangs past [`PoolOptions::request_timeout`]
//!   is killed and restarted; one that prints something that is not a reply (or a line
//!   longer than [`MAX_FRAME_BYTES`](crate::MAX_FRAME_BYTES)) is a worker error, not a
//!   daemon crash. While no worker can start, requests fail at once with the reason.
//! - **Logs**: each worker's standard error goes to the daemon's log (the `log` crate), line
//!   by line, prefixed with its id, which the worker also finds in `KHIVED_WORKER_ID`.
//! - **No orphans**: workers get `PDEATHSIG=SIGKILL`, so they die with a daemon killed by
//!   SIGKILL. At a normal shutdown the daemon drains the requests in flight, then the
//!   workers' stdin is closed, they get [`PoolOptions::shutdown_grace`] to exit, then
//!   SIGKILL; every child is reaped before the daemon lets go of its PID file.
//!
//! # Implementation
//!
//! The workers' tasks run inside [`Dispatch::warm_all`](crate::Dispatch::warm_all) on the
//! daemon's thread; `async-process` adds its thread that reaps children.
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
mod worker;

#[cfg(feature = "pool")]
pub use dispatcher::Pool;
#[cfg(feature = "pool")]
pub use options::PoolOptions;
