//! The warm worker pool: N child processes, each answering one request at a time over its
//! stdin and stdout with one JSON object per line.
//!
//! To a worker: `{"ops":…,"presentation":…,"presentation_per_op":…}`; from a worker:
//! `{"ok":true,"result":…}` or `{"ok":false,"error":…}`. A worker that exits, hangs past the
//! request timeout, or prints something else is restarted with backoff; the request it held
//! gets an error that says what happened. Its standard error goes to the daemon's log,
//! prefixed with its id.

use std::ffi::OsString;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_channel::{Receiver, Sender, TrySendError};
use async_executor::Executor;
use async_io::Timer;
use async_process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use futures_lite::future::{self, FutureExt};
use futures_lite::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use khived::{worker_line, Dispatch, MAX_FRAME_BYTES};

/// How long workers get to exit on their own once their stdin is closed at shutdown.
const EXIT_GRACE: Duration = Duration::from_secs(3);
/// Restart delays grow from the first to the last after each failure in a row.
const FIRST_RESTART_DELAY: Duration = Duration::from_millis(100);
const LAST_RESTART_DELAY: Duration = Duration::from_secs(10);
/// A worker that ran this long before failing starts over with the shortest delay.
const HEALTHY_RUN: Duration = Duration::from_secs(30);

pub(crate) struct PoolOptions {
    pub(crate) command: Vec<OsString>,
    pub(crate) workers: usize,
    pub(crate) queue: usize,
    pub(crate) request_timeout: Option<Duration>,
    pub(crate) warm: Option<String>,
    pub(crate) namespace: String,
    pub(crate) config_id: String,
}

/// The dispatcher: queues each request for the next free worker; starts the workers in
/// `warm_all` and ends them in `shut_down`.
pub(crate) struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    options: PoolOptions,
    jobs: Sender<Job>,
    queued: Receiver<Job>,
    /// Each worker's current process, kept here so that shutdown can reap it even after
    /// the tasks that talked to it are gone.
    children: Vec<Mutex<Option<Child>>>,
    /// Workers whose process is up.
    running: AtomicUsize,
    /// Why the last worker start failed, while none is running: requests fail at once
    /// instead of waiting for a worker that may never come.
    start_failure: Mutex<Option<String>>,
}

struct Job {
    line: Vec<u8>,
    reply: Sender<Result<String, String>>,
}

impl Pool {
    pub(crate) fn new(options: PoolOptions) -> Pool {
        let (jobs, queued) = async_channel::bounded(options.queue);
        let children = (0..options.workers).map(|_| Mutex::new(None)).collect();
        Pool {
            inner: Arc::new(Inner {
                options,
                jobs,
                queued,
                children,
                running: AtomicUsize::new(0),
                start_failure: Mutex::new(None),
            }),
        }
    }
}

impl Dispatch for Pool {
    async fn dispatch(
        &self,
        ops: &str,
        presentation: Option<&str>,
        presentation_per_op: Option<&[Option<String>]>,
    ) -> Result<String, String> {
        if let Some(why) = self.inner.start_failure() {
            return Err(format!("no worker is running: {why}"));
        }
        let line = worker_line::encode_request(ops, presentation, presentation_per_op);
        let (reply, answer) = async_channel::bounded(1);
        match self.inner.jobs.try_send(Job { line, reply }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(format!(
                    "daemon_busy: {} worker(s) busy and {} request(s) queued; try again shortly",
                    self.inner.options.workers, self.inner.options.queue
                ))
            }
            Err(TrySendError::Closed(_)) => return Err("the worker pool has stopped".to_owned()),
        }
        answer
            .recv()
            .await
            .unwrap_or_else(|_| Err("the worker pool stopped before answering".to_owned()))
    }

    /// Starts the workers and keeps them running (restarting them as needed) for as long as
    /// the daemon runs.
    async fn warm_all(&self) {
        let executor = Executor::new();
        for id in 1..=self.inner.options.workers {
            executor
                .spawn(run_worker(Arc::clone(&self.inner), id))
                .detach();
        }
        executor.run(future::pending::<()>()).await
    }

    /// Ends every worker once the daemon has drained: their stdin is already closed (the
    /// tasks holding it ended with `warm_all`), so they get a grace period to exit, then
    /// SIGKILL. Every child is reaped before the daemon lets go of its PID file.
    async fn shut_down(&self) {
        self.inner.jobs.close();
        let deadline = Instant::now() + EXIT_GRACE;
        for (id, slot) in self.inner.children.iter().enumerate() {
            let Some(mut child) = lock(slot).take() else {
                continue;
            };
            let exited = async { child.status().await.ok() }
                .or(async {
                    Timer::at(deadline).await;
                    None
                })
                .await;
            match exited {
                Some(status) => log::info!("worker {}: exited ({status})", id + 1),
                None => {
                    log::warn!(
                        "worker {}: still running after {EXIT_GRACE:?}; killing it",
                        id + 1
                    );
                    let _ = child.kill();
                    let _ = child.status().await;
                }
            }
        }
    }

    fn namespace(&self) -> &str {
        &self.inner.options.namespace
    }

    fn config_id(&self) -> &str {
        &self.inner.options.config_id
    }
}

/// Why a worker process was given up on.
enum Ended {
    /// The queue closed: the daemon is stopping.
    Stopping,
    /// The worker cannot be trusted any more; `job` is the request it held, answered once
    /// the process has been reaped so that the error can name its exit status.
    Failed { why: String, job: Option<Job> },
}

/// Keeps worker `id` alive: start it, serve jobs, restart it with backoff when it fails.
async fn run_worker(inner: Arc<Inner>, id: usize) {
    let mut delay = FIRST_RESTART_DELAY;
    loop {
        let started = Instant::now();
        let ended = match start(&inner, id) {
            Ok((stdin, stdout, stderr)) => {
                inner.running.fetch_add(1, Ordering::SeqCst);
                *lock(&inner.start_failure) = None;
                let forward = async {
                    forward_stderr(id, stderr).await;
                    future::pending().await
                };
                let ended = serve(&inner, id, stdin, stdout).or(forward).await;
                inner.running.fetch_sub(1, Ordering::SeqCst);
                ended
            }
            Err(e) => {
                let why = format!("worker {id} cannot start: {e}");
                *lock(&inner.start_failure) = Some(why.clone());
                inner.fail_queued(&why).await;
                Ended::Failed { why, job: None }
            }
        };
        let status = reap(&inner, id).await;
        match ended {
            Ended::Stopping => return,
            Ended::Failed { why, job } => {
                log::warn!("worker {id}: {why} ({status})");
                if let Some(job) = job {
                    let _ = job
                        .reply
                        .send(Err(format!("worker {id} {why} ({status})")))
                        .await;
                }
            }
        }
        if started.elapsed() >= HEALTHY_RUN {
            delay = FIRST_RESTART_DELAY;
        }
        log::info!("worker {id}: restarting in {delay:?}");
        Timer::after(delay).await;
        delay = (delay * 2).min(LAST_RESTART_DELAY);
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
    async fn fail_queued(&self, why: &str) {
        while self.running.load(Ordering::SeqCst) == 0 {
            let Ok(job) = self.queued.try_recv() else {
                return;
            };
            let _ = job
                .reply
                .send(Err(format!("no worker is running: {why}")))
                .await;
        }
    }
}

/// A mutex's contents, also after a panic elsewhere poisoned it (the data stays valid).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

type Pipes = (
    ChildStdin,
    BufReader<ChildStdout>,
    async_process::ChildStderr,
);

fn start(inner: &Inner, id: usize) -> std::io::Result<Pipes> {
    let (program, args) = inner
        .options
        .command
        .split_first()
        .ok_or_else(|| std::io::Error::other("empty worker command"))?;
    let mut command = std::process::Command::new(program);
    let daemon = rustix::process::getpid();
    // SAFETY: the closure runs in the child between fork and exec and makes two system calls
    // (prctl, getppid), both async-signal-safe, touching no memory of ours.
    #[allow(unsafe_code)]
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
            // Should the daemon die without reaping its workers (SIGKILL), they die with it
            // instead of living on as orphans.
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
            if rustix::process::getppid() != Some(daemon) {
                return Err(std::io::Error::other(
                    "the daemon exited while starting a worker",
                ));
            }
            Ok(())
        });
    }
    let mut child = Command::from(command)
        .args(args)
        .env("KHIVED_WORKER_ID", id.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let pipes = match (child.stdin.take(), child.stdout.take(), child.stderr.take()) {
        (Some(stdin), Some(stdout), Some(stderr)) => (stdin, BufReader::new(stdout), stderr),
        _ => return Err(std::io::Error::other("worker pipes missing")),
    };
    log::info!("worker {id}: started (pid {})", child.id());
    *inner.children[id - 1]
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = Some(child);
    Ok(pipes)
}

/// Kills worker `id` if it still runs and waits for it; returns how it ended.
async fn reap(inner: &Inner, id: usize) -> String {
    let child = inner.children[id - 1]
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    let Some(mut child) = child else {
        return "not started".to_owned();
    };
    // A worker that printed garbage or hung may still run; one that died is only reaped.
    let _ = child.kill();
    match child.status().await {
        Ok(status) => status.to_string(),
        Err(e) => format!("not reaped: {e}"),
    }
}

/// Serves jobs one at a time until the worker fails or the daemon stops.
async fn serve(
    inner: &Inner,
    id: usize,
    mut stdin: ChildStdin,
    mut stdout: BufReader<ChildStdout>,
) -> Ended {
    let timeout = inner.options.request_timeout;
    if let Some(ops) = &inner.options.warm {
        let line = worker_line::encode_request(ops, None, None);
        match exchange(&mut stdin, &mut stdout, &line, timeout).await {
            Ok(Ok(_)) => log::info!("worker {id}: warmed"),
            Ok(Err(error)) => log::warn!("worker {id}: warm request failed: {error}"),
            Err(why) => return Ended::Failed { why, job: None },
        }
    }
    loop {
        let Ok(job) = inner.queued.recv().await else {
            return Ended::Stopping;
        };
        match exchange(&mut stdin, &mut stdout, &job.line, timeout).await {
            Ok(answer) => {
                let _ = job.reply.send(answer).await;
            }
            Err(why) => {
                return Ended::Failed {
                    why,
                    job: Some(job),
                }
            }
        }
    }
}

/// Sends one request line and reads one reply line. `Err` means the worker cannot be
/// trusted any more (it died, hung, or broke the protocol) and must be restarted.
async fn exchange(
    stdin: &mut ChildStdin,
    stdout: &mut BufReader<ChildStdout>,
    line: &[u8],
    timeout: Option<Duration>,
) -> Result<Result<String, String>, String> {
    let talk = async {
        stdin
            .write_all(line)
            .await
            .map_err(|e| format!("could not take the request: {e}"))?;
        stdin
            .flush()
            .await
            .map_err(|e| format!("could not take the request: {e}"))?;
        let mut reply = Vec::new();
        // Bounded like a frame, so a worker that never prints a newline cannot fill memory.
        let mut limited = (&mut *stdout).take(MAX_FRAME_BYTES as u64 + 1);
        match limited.read_until(b'\n', &mut reply).await {
            Ok(0) => return Err("exited while handling the request".to_owned()),
            Ok(_) if reply.last() != Some(&b'\n') => {
                return Err(match reply.len() > MAX_FRAME_BYTES {
                    true => format!("printed a reply longer than {MAX_FRAME_BYTES} bytes"),
                    false => "exited in the middle of its reply".to_owned(),
                })
            }
            Ok(_) => {}
            Err(e) => return Err(format!("could not be read from: {e}")),
        }
        worker_line::parse_reply(&reply)
    };
    match timeout {
        None => talk.await,
        Some(limit) => {
            talk.or(async {
                Timer::after(limit).await;
                Err(format!("did not answer within {limit:?}; restarting it"))
            })
            .await
        }
    }
}

/// Copies a worker's standard error into the daemon's log, a line at a time, until the
/// worker closes it. Bytes that are not UTF-8 are logged lossily and overlong lines in pieces:
/// stopping early would close the pipe and kill the worker at its next write.
async fn forward_stderr(id: usize, stderr: async_process::ChildStderr) {
    const LONGEST_LINE: u64 = 64 * 1024;
    let mut stderr = BufReader::new(stderr);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut stderr)
            .take(LONGEST_LINE)
            .read_until(b'\n', &mut line)
            .await
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                log::info!("worker {id}: {}", text.trim_end_matches(['\n', '\r']));
            }
        }
    }
}
