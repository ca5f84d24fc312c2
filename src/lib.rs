//! Keep a program warm behind a Unix socket.
//!
//! Tools that are slow to start (they load indexes, models, caches) can run once as a daemon
//! and answer short-lived clients in microseconds. khived is that daemon's runtime: implement
//! [`Dispatch`], hand it to a [`Daemon`], and clients reach it over a per-user Unix socket
//! with 4-byte big-endian length-prefixed JSON frames ([`wire`](crate::Request)).
//!
//! What the runtime takes care of:
//!
//! - **One daemon per socket**, decided by an exclusive `flock` on the PID file that the daemon
//!   holds for its whole life. A second daemon fails with [`Error::AlreadyRunning`] and touches
//!   none of the first one's files; files left by a daemon killed with SIGKILL are cleaned up
//!   by the next start.
//! - **Private files**: the socket's directory is 0700 and must belong to the daemon's user;
//!   the socket is 0600 from the moment it exists; the PID file is 0600 and never opened
//!   through a symbolic link.
//! - **The request path**: namespace and configuration checks, the probe, several requests per
//!   connection answered in order, error replies instead of silent closes for bad, oversized
//!   or truncated frames, and panics in the dispatcher caught and answered.
//! - **Shutdown**: on SIGTERM or SIGINT (or a [`ShutdownHandle`], or after an idle period) the
//!   listener closes first, idle connections close, requests in flight finish up to the drain
//!   timeout, and the socket and PID file are removed if they are still the daemon's own.
//! - **Limits**: deadlines for slow clients, a cap on connections, and a frame reader that
//!   allocates only as bytes arrive.
//!
//! To keep a program in another language warm, no dispatcher needs writing: the
//! [`pool`] module's `Pool` (feature `pool`, on by default) runs worker processes that speak
//! one JSON object per line on stdin and stdout, restarts them when they fail, and reaps them
//! at shutdown.
//!
//! # Implementation
//!
//! Everything runs on one thread: [`Daemon::run_blocking`] drives an `async-executor` on the
//! caller's thread, and the `async-io` reactor adds its helper thread, which polls `epoll`
//! while the caller is busy. There is no thread per connection and no thread pool; a
//! dispatcher with long computations should give them a thread of its own. Signals are
//! received through `async-signal` (a self-pipe, no extra thread). In-flight connections are
//! counted with guards that wake the drain through `event-listener` when the count reaches
//! zero: shutdown never polls and never sleeps.
//!
//! # Examples
//!
//! A complete daemon whose answer is the request's `ops`:
//!
//! ```no_run
//! use khived::{Config, Daemon, Dispatch};
//!
//! struct Echo;
//!
//! impl Dispatch for Echo {
//!     async fn dispatch(
//!         &self,
//!         ops: &str,
//!         _presentation: Option<&str>,
//!         _presentation_per_op: Option<&[Option<String>]>,
//!     ) -> Result<String, String> {
//!         Ok(ops.to_owned())
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
//! fn main() -> Result<(), khived::Error> {
//!     khived::init_stderr_logger(log::LevelFilter::Info);
//!     Daemon::new(Config::from_env(), Echo).run_blocking()
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

#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]
// Three `unsafe` blocks exist: `pre_exec` in `spawn`, to put a started daemon in a session of
// its own, `pre_exec` in `pool`, to give a worker PDEATHSIG, and taking descriptor 3 from a
// service manager in `systemd`. Everything else goes through rustix.
#![deny(unsafe_code)]

mod client;
mod config;
mod connection;
mod dispatch;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod inflight;
mod instance;
mod logfile;
mod logger;
pub mod pool;
mod server;
mod spawn;
mod systemd;
mod wire;

pub use client::{probe, Client};
pub use config::{env_truthy, pid_path, socket_path, state_dir, Config};
pub use dispatch::Dispatch;
pub use error::Error;
pub use instance::{is_process_running, running_pid};
pub use logfile::RotatingFile;
pub use logger::{init_file_logger, init_stderr_logger};
pub use server::{Daemon, ShutdownHandle};
pub use spawn::Spawn;
// `fuzzing` names the line protocol by this path.
use pool::line as worker_line;
pub use wire::{
    encode_frame, frame_len, read_frame, write_frame, ProbeInfo, Request, Response, MAX_FRAME_BYTES,
};

// The README's Rust example is compiled with the doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
