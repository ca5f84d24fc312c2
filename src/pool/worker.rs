//! One worker's life: start it, warm it, serve it jobs one line at a time, forward its
//! standard error, and restart it with backoff when it fails.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_io::Timer;
use async_process::{ChildStderr, ChildStdin, ChildStdout, Command, Stdio};
use futures_lite::future::{self, FutureExt};
use futures_lite::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use super::dispatcher::{lock, Inner, Job};
use super::line;
use crate::MAX_FRAME_BYTES;

/// Restart delays grow from the first to the last after each failure in a row.
const FIRST_RESTART_DELAY: Duration = Duration::from_millis(100);
const LAST_RESTART_DELAY: Duration = Duration::from_secs(10);
/// A worker that ran this long before failing starts over with the shortest delay.
const HEALTHY_RUN: Duration = Duration::from_secs(30);

/// Why a worker process was given up on.
enum Ended {
    /// The queue closed: the daemon is stopping.
    Stopping,
    /// The worker cannot be trusted any more; `job` is the request it held, answered once
    /// the process has been reaped so that the error can name its exit status.
    Failed { why: String, job: Option<Job> },
}

/// Keeps worker `id` alive: start it, serve jobs, restart it with backoff when it fails.
/// Returns once the queue closes (the daemon is stopping).
pub(super) async fn run(inner: Arc<Inner>, id: usize) {
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

type Pipes = (ChildStdin, BufReader<ChildStdout>, ChildStderr);

/// Starts worker `id` and keeps its process in its slot for [`reap`] and shutdown.
fn start(inner: &Inner, id: usize) -> io::Result<Pipes> {
    let options = &inner.options;
    // `Pool::new` refuses an empty command.
    let (program, args) = options
        .command
        .split_first()
        .ok_or_else(|| io::Error::other("empty worker command"))?;
    // Only Linux needs it mutable, for PDEATHSIG. Elsewhere a worker outlives a daemon killed
    // by SIGKILL until it next reads its stdin and finds it closed (see the module docs).
    #[cfg_attr(
        not(any(target_os = "linux", target_os = "android")),
        allow(unused_mut)
    )]
    let mut command = std::process::Command::new(program);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let daemon = rustix::process::getpid();
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed. It makes two system calls (prctl, getppid),
    // allocates nothing (its errors are plain errno values) and touches no memory of ours.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    #[allow(unsafe_code)]
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
            // Should the daemon die without reaping its workers (SIGKILL), they die with it
            // instead of living on as orphans.
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
            // The daemon may have died before the line above: then the signal never comes,
            // so the worker must not start.
            if rustix::process::getppid() != Some(daemon) {
                return Err(rustix::io::Errno::SRCH.into());
            }
            Ok(())
        });
    }
    let mut child = Command::from(command)
        .args(args)
        .envs(options.env.iter().map(|(key, value)| (key, value)))
        .env("KHIVED_WORKER_ID", id.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let pipes = match (child.stdin.take(), child.stdout.take(), child.stderr.take()) {
        (Some(stdin), Some(stdout), Some(stderr)) => (stdin, BufReader::new(stdout), stderr),
        _ => return Err(io::Error::other("worker pipes missing")),
    };
    log::info!("worker {id}: started (pid {})", child.id());
    *lock(&inner.children[id - 1]) = Some(child);
    Ok(pipes)
}

/// Kills worker `id` if it still runs and waits for it; returns how it ended.
async fn reap(inner: &Inner, id: usize) -> String {
    let child = lock(&inner.children[id - 1]).take();
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
        let line = line::encode_request(ops, None, None);
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
        line::parse_reply(&reply)
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
async fn forward_stderr(id: usize, stderr: ChildStderr) {
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
