//! The pool as a dispatcher: a bounded queue in front of the workers, their processes kept
//! for shutdown, and why none is running.

use std::fmt;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Instant;

use async_channel::{Receiver, Sender, TrySendError};
use async_executor::Executor;
use futures_lite::future;

use super::spawner::Spawner;
use super::{line, worker, PoolOptions};
use crate::{code, Dispatch, DispatchError, Request};

/// A pool of warm worker processes that serves a [`Daemon`](crate::Daemon)'s requests.
///
/// Each request is queued for the next free worker, written to it as one JSON line, and
/// answered with the line it prints back (see [`line`](super::line)). The workers start
/// when the daemon has bound its socket ([`Dispatch::warm_all`]) and are ended and reaped
/// after the drain ([`Dispatch::shut_down`]), before the daemon lets go of its PID file. A
/// `Pool` serves one daemon.
///
/// # Examples
///
/// ```no_run
/// use khived::pool::{Pool, PoolOptions};
/// use khived::{Config, Daemon};
///
/// fn main() -> Result<std::process::ExitCode, khived::Error> {
///     khived::init_stderr_logger(log::LevelFilter::Info);
///     let pool = Pool::new(PoolOptions::new(["python3", "worker.py"]).workers(2))?;
///     let stopped = Daemon::new(Config::from_env(), pool).run_blocking()?;
///     Ok(stopped.exit_code().into())
/// }
/// ```
pub struct Pool {
    inner: Arc<Inner>,
}

/// What the dispatcher and the worker tasks share.
pub(super) struct Inner {
    pub(super) options: PoolOptions,
    /// Requests for the workers: from `dispatch`, and back from a worker that could not
    /// take one.
    pub(super) jobs: Sender<Job>,
    pub(super) queued: Receiver<Job>,
    /// Each worker's current process, kept here so that shutdown can reap it even after
    /// the tasks that talked to it are gone.
    pub(super) children: Vec<Mutex<Option<worker::Process>>>,
    /// Workers whose process is up.
    pub(super) running: AtomicUsize,
    /// Why the last worker start failed, while none is running: requests fail at once
    /// instead of waiting for a worker that may never come.
    pub(super) start_failure: Mutex<Option<String>>,
    /// Forks the workers, on a thread that outlives each of them.
    pub(super) spawner: Spawner,
}

/// One request waiting for a worker: what to ask and where the answer goes. The worker
/// encodes the line, with its own request id.
pub(super) struct Job {
    pub(super) ops: String,
    pub(super) presentation: Option<String>,
    pub(super) presentation_per_op: Option<Vec<Option<String>>>,
    /// When the request's time is up: [`PoolOptions::request_timeout`] after it reached
    /// the pool, so time spent waiting in the queue counts.
    pub(super) deadline: Option<Instant>,
    /// Closed once the request's dispatch future is dropped (its client is gone): the job is
    /// then skipped instead of run.
    pub(super) reply: Sender<Result<String, DispatchError>>,
}

impl Job {
    /// The line asking a worker for this job as request `id`.
    pub(super) fn line(&self, id: u64) -> Vec<u8> {
        line::encode_request_with_id(
            id,
            &self.ops,
            self.presentation.as_deref(),
            self.presentation_per_op.as_deref(),
        )
    }

    /// Whether nobody waits for the answer any more.
    pub(super) fn abandoned(&self) -> bool {
        self.reply.is_closed()
    }

    /// Whether the request's time ran out before a worker took it.
    pub(super) fn expired(&self) -> bool {
        self.deadline.is_some_and(|at| Instant::now() >= at)
    }
}

impl Drop for Job {
    /// A large request's copy goes back to the system, whether it ran or was skipped.
    fn drop(&mut self) {
        crate::pages::release(std::mem::take(&mut self.ops).into_bytes());
    }
}

impl Pool {
    /// A pool that will run workers as `options` say. No process starts yet: the daemon
    /// starts them once its socket is bound.
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::InvalidInput`] when the options cannot run a pool: no command, no
    /// workers, a queue that holds no request, or no stderr line let through per second. The
    /// message names the option to fix.
    pub fn new(options: PoolOptions) -> io::Result<Pool> {
        options.check()?;
        let (jobs, queued) = async_channel::bounded(options.queue);
        let children = (0..options.workers).map(|_| Mutex::new(None)).collect();
        Ok(Pool {
            inner: Arc::new(Inner {
                options,
                jobs,
                queued,
                children,
                running: AtomicUsize::new(0),
                start_failure: Mutex::new(None),
                spawner: Spawner::default(),
            }),
        })
    }

    /// The options this pool runs with.
    pub fn options(&self) -> &PoolOptions {
        &self.inner.options
    }
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("options", &self.inner.options)
            .field("running", &self.inner.running.load(Ordering::SeqCst))
            .field("queued", &self.inner.queued.len())
            .finish()
    }
}

impl Dispatch for Pool {
    async fn dispatch(&self, request: &Request<'_>) -> Result<String, DispatchError> {
        if let Some(why) = self.inner.start_failure() {
            return Err(format!("no worker is running: {why}").into());
        }
        let (reply, answer) = async_channel::bounded(1);
        let job = Job {
            ops: request.ops.clone().into_owned(),
            presentation: request.presentation.as_deref().map(str::to_owned),
            presentation_per_op: request.presentation_per_op.clone(),
            deadline: self
                .inner
                .options
                .request_timeout
                // A limit too far to count is none.
                .and_then(crate::connection::after),
            reply,
        };
        // Should this future be dropped (its client gone), `answer` goes with it and the
        // job, still queued, is skipped by the worker that takes it.
        match self.inner.jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                // Refused before any worker saw it: the client may retry.
                let message = format!(
                    "daemon_busy: {} worker(s) busy and {} request(s) queued; try again shortly",
                    self.inner.options.workers, self.inner.options.queue
                );
                return Err(DispatchError::new(message)
                    .with_code(code::DAEMON_BUSY)
                    .not_committed());
            }
            Err(TrySendError::Closed(_)) => return Err("the worker pool has stopped".into()),
        }
        let answered = answer
            .recv()
            .await
            .unwrap_or_else(|_| Err("the worker pool stopped before answering".into()));
        answered
    }

    /// Starts the workers and keeps them running (restarting them as needed) for as long as
    /// the daemon runs.
    async fn warm_all(&self) {
        let executor = Executor::new();
        for id in 1..=self.inner.options.workers {
            crate::execution::spawn_task(&executor, worker::run(Arc::clone(&self.inner), id))
                .detach();
        }
        executor.run(future::pending::<()>()).await
    }

    /// Ends every worker once the daemon has drained: their stdin is already closed (the
    /// tasks holding it ended with `warm_all`), so they get the shutdown grace to exit, then
    /// SIGKILL; what they write to standard error meanwhile is still forwarded to the log.
    /// Whatever is left of each worker's process group (children it started) is killed too,
    /// and every worker is reaped before the daemon lets go of its PID file.
    async fn shut_down(&self) {
        self.inner.jobs.close();
        let grace = self.inner.options.shutdown_grace;
        // A grace too long to count is waited out without end.
        let deadline = crate::connection::after(grace);
        // All at once: each worker's stderr is read while it exits, so none waits on a full
        // pipe behind another.
        let mut ends: Vec<_> = (1..)
            .zip(&self.inner.children)
            .filter_map(|(id, slot)| Some((id, lock(slot).take()?)))
            .map(|(id, process)| Box::pin(worker::end(id, process, deadline, grace)))
            .collect();
        // Polled together here rather than on an executor of their own: a few workers, and
        // every poll of each is a look at its pipe and its exit.
        future::poll_fn(|cx| {
            ends.retain_mut(|end| end.as_mut().poll(cx).is_pending());
            match ends.is_empty() {
                true => Poll::Ready(()),
                false => Poll::Pending,
            }
        })
        .await;
    }

    fn namespace(&self) -> &str {
        &self.inner.options.namespace
    }

    fn config_id(&self) -> &str {
        &self.inner.options.config_id
    }
}

impl Inner {
    /// Why requests cannot be served now: no worker runs and the last start failed.
    fn start_failure(&self) -> Option<String> {
        if self.running.load(Ordering::SeqCst) > 0 {
            return None;
        }
        lock(&self.start_failure).clone()
    }

    /// Answers the requests waiting in the queue with an error, while no worker runs.
    pub(super) async fn fail_queued(&self, why: &str) {
        while self.running.load(Ordering::SeqCst) == 0 {
            let Ok(job) = self.queued.try_recv() else {
                return;
            };
            if job.abandoned() {
                continue;
            }
            let _ = job
                .reply
                .send(Err(format!("no worker is running: {why}").into()))
                .await;
        }
    }
}

impl Drop for Inner {
    /// Kills what is left of each worker's process group, as `shut_down` does: it runs when
    /// a forced stop skips `shut_down`, or when the daemon's future is dropped. Each worker
    /// itself is killed as its `Child` is dropped (`kill_on_drop`), but not the processes it
    /// started, which would otherwise live on as orphans.
    fn drop(&mut self) {
        for slot in &mut self.children {
            let slot = slot
                .get_mut()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some(process) = slot.as_ref() {
                worker::kill_group(process.id());
            }
        }
    }
}

/// A mutex's contents, also after a panic elsewhere poisoned it (the data stays valid).
pub(super) use crate::execution::lock;
