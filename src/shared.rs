//! What every task of a running daemon shares: the dispatcher, the configuration, the
//! counters the probe reports, the drain flag, and the threads dispatch runs on.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use crate::budget::{Budget, MIN_BUDGET};
use crate::config::Config;
use crate::execution::{self, Execution};
use crate::inflight::{Flag, InFlight};
use crate::systemd;

/// The state of one daemon, behind an `Arc` in the accept loop and in every connection.
#[derive(Debug)]
pub(crate) struct Shared<D> {
    pub(crate) dispatcher: D,
    pub(crate) config: Config,
    pub(crate) in_flight: Arc<InFlight>,
    /// Requests answered so far.
    pub(crate) served: AtomicU64,
    /// Reads tried so far, by every connection: whether others ran while one of them let
    /// them (see `connection::PATIENCE`).
    pub(crate) reads: AtomicU64,
    pub(crate) started: Instant,
    /// Set once the listener is closed: idle connections close, busy ones finish.
    pub(crate) draining: Flag,
    /// Set before `draining` when a successor took over the listener: requests that arrived
    /// are still served (nothing is answered `daemon_draining`), and the connections queued
    /// in the listener's backlog are left to the successor.
    pub(crate) handed_over: Flag,
    pub(crate) notifier: Option<systemd::Notifier>,
    /// What connections may hold in large frame buffers (`Config::frame_memory_budget`).
    pub(crate) frame_memory: Budget,
    /// The compute slots and the threads that dispatch runs on.
    pub(crate) execution: Arc<Execution>,
}

impl<D> Shared<D> {
    pub(crate) fn new(dispatcher: D, config: Config) -> Self {
        if config.frame_memory_budget < MIN_BUDGET {
            log::warn!(
                "frame_memory_budget raised from {} to {MIN_BUDGET} bytes: one frame of the \
                 largest size must fit",
                config.frame_memory_budget
            );
        }
        let threads = execution::resolve_threads(config.threads);
        Shared {
            frame_memory: Budget::new(config.frame_memory_budget),
            dispatcher,
            execution: Arc::new(Execution::new(threads)),
            config,
            in_flight: Arc::default(),
            served: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            started: Instant::now(),
            draining: Flag::default(),
            handed_over: Flag::default(),
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
