//! One worker's life: start it in a process group of its own, warm it, serve it jobs one
//! line at a time while watching that it stays in step, forward its standard error within a
//! rate, and restart it with backoff when it fails.

use std::future::Future;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::pin::{pin, Pin};
use std::process::ExitStatus;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_io::Timer;
use async_process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, Stdio};
use futures_lite::future::{self, FutureExt};
use futures_lite::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use super::dispatcher::{lock, Inner, Job};
use super::line;
use crate::{code, DispatchError, MAX_FRAME_BYTES};

/// Restart delays grow from the first to the last after each failure in a row.
const FIRST_RESTART_DELAY: Duration = Duration::from_millis(100);
const LAST_RESTART_DELAY: Duration = Duration::from_secs(10);
/// A worker that ran this long before failing starts over with the shortest delay.
const HEALTHY_RUN: Duration = Duration::from_secs(30);
/// Starts in a row that failed before the worker answered anything, after which it is taken
/// for one that cannot start. Two, not one: a fresh worker that dies on its first request
/// may have been killed by that request, and the requests queued behind it deserve the next
/// worker.
const FAILED_STARTS: u32 = 2;
/// How long the end of an exiting worker's standard error is waited for, which only a
/// process it started and that holds the pipe delays.
const LAST_WORDS: Duration = Duration::from_secs(1);

const EXITED: &str = "exited while handling the request";
const CLOSED_STDOUT: &str = "closed its standard output while handling the request";
const EXITED_IDLE: &str = "exited while idle";
const CLOSED_IDLE: &str = "closed its standard output while idle";

/// Why a worker process was given up on.
enum Ended {
    /// The queue closed: the daemon is stopping.
    Stopping,
    /// The worker cannot be trusted any more; `job` is the request it held, answered once
    /// the process has been reaped so that the error can name its exit status.
    Failed { why: String, job: Option<Job> },
    /// The worker died, hung or broke the protocol on its warm request: it never served.
    NotWarmed(String),
    /// Its process could not be started (logged, and requests failed, already).
    NotStarted,
}

/// Forwards what a worker that `ended` wrote to standard error before it is reaped (a dying
/// worker's last words, above all). One that is exiting closes its end of the pipe as it
/// goes, just after its stdout, which may be what was seen: the pipe is read to that end (for
/// a moment at most, should a process it started hold it), so that a last line without a
/// newline is logged too. One that lives on (hung, out of sync) has only what is in the pipe
/// now read. At a stop, [`end`] forwards it during the grace.
async fn last_words(stderr: &mut Stderr, ended: &Ended) {
    let why = match ended {
        Ended::Stopping | Ended::NotStarted => return,
        Ended::Failed { why, .. } | Ended::NotWarmed(why) => why,
    };
    // It exited, or closed its stdout, as it does when it exits.
    if [EXITED, CLOSED_STDOUT, EXITED_IDLE, CLOSED_IDLE].contains(&why.as_str()) {
        stderr.forward().or(moment()).await;
    } else {
        future::poll_once(stderr.forward()).await;
    }
}

/// How long the end of an exiting worker's standard error is waited for.
async fn moment() {
    Timer::after(LAST_WORDS).await;
}

/// A worker's process, kept in its slot for [`reap`] and shutdown, and its standard error
/// once the task that forwarded it has let it go.
pub(super) struct Process {
    child: Child,
    stderr: Option<Stderr>,
}

impl Process {
    /// The worker's process id, which is also its process group's.
    pub(super) fn id(&self) -> u32 {
        self.child.id()
    }
}

/// A worker's standard error, lent to the task that serves it: given back to the process's
/// slot however the task ends. At a stop the task is dropped, and [`end`] forwards what the
/// worker says while it exits; after a failure [`reap`] drops it with the process.
struct Lent<'a> {
    stderr: Option<Stderr>,
    slot: &'a Mutex<Option<Process>>,
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        if let Some(process) = lock(self.slot).as_mut() {
            process.stderr = self.stderr.take();
        }
    }
}

/// Keeps worker `id` alive: start it, serve jobs, restart it with backoff when it fails.
/// Returns once the queue closes (the daemon is stopping).
pub(super) async fn run(inner: Arc<Inner>, id: usize) {
    let mut delay = FIRST_RESTART_DELAY;
    // The last request id sent. Ids keep growing across restarts: a reply is never taken
    // for the answer to a request sent to an earlier process.
    let mut last_request = 0;
    // A request taken from the queue but never sent to a worker, which went wrong first: it
    // goes to the next process, not back to its client as a failure.
    let mut carried: Option<Job> = None;
    // Runs in a row that ended before the worker answered anything (its warm request or a
    // request), and were short of a healthy run.
    let mut unproven = 0;
    loop {
        let started = Instant::now();
        let mut answered = false;
        let ended = match start(&inner, id).await {
            Ok(((stdin, stdout, stderr), exited)) => {
                inner.running.fetch_add(1, Ordering::SeqCst);
                *lock(&inner.start_failure) = None;
                let mut lent = Lent {
                    stderr: None,
                    slot: &inner.children[id - 1],
                };
                let per_second = inner.options.stderr_lines_per_second;
                let stderr = lent.stderr.insert(Stderr::new(id, stderr, per_second));
                let serve = serve(
                    &inner,
                    id,
                    (stdin, stdout, exited),
                    &mut carried,
                    &mut last_request,
                    &mut answered,
                );
                let ended = serve
                    .or(async {
                        stderr.forward().await;
                        future::pending().await
                    })
                    .await;
                inner.running.fetch_sub(1, Ordering::SeqCst);
                last_words(stderr, &ended).await;
                ended
            }
            Err(e) => {
                let why = format!("worker {id} cannot start: {e}");
                log::warn!("{why}");
                cannot_serve(&inner, &mut carried, &why).await;
                Ended::NotStarted
            }
        };
        let (status, reaped) = reap(&inner, id).await;
        // Not killed by `reap`: it ended on its own.
        let exited = reaped.is_some_and(|s| s.signal() != Some(SIGKILL));
        // A run that never got past its warm request is no healthy one, however long it
        // lasted: a warm step slower than the request timeout must not restart at full speed.
        let mut healthy = started.elapsed() >= HEALTHY_RUN;
        match ended {
            Ended::Stopping => return,
            Ended::NotStarted => {}
            Ended::NotWarmed(why) => {
                healthy = false;
                let why = format!("worker {id} did not finish warming: {why} ({status})");
                log::warn!("{why}");
                cannot_serve(&inner, &mut carried, &why).await;
            }
            Ended::Failed { mut why, job } => {
                // Its stdout ended before its exit was seen: if it was not killed by `reap`,
                // it had exited on its own, which is the clearer message.
                if exited && (why == CLOSED_STDOUT || why == CLOSED_IDLE) {
                    why = match why == CLOSED_STDOUT {
                        true => EXITED.to_owned(),
                        false => EXITED_IDLE.to_owned(),
                    };
                }
                // One that exited cleanly by itself while idle chose to (it recycles
                // itself, say): that is no failed start, whatever it answered.
                let chose_to = why == EXITED_IDLE && reaped.is_some_and(|s| s.success());
                unproven = match (answered || healthy, chose_to) {
                    (true, _) => 0,
                    (false, true) => unproven,
                    (false, false) => unproven + 1,
                };
                let cannot_start = unproven >= FAILED_STARTS;
                let error = match cannot_start {
                    false => {
                        log::warn!("worker {id}: {why} ({status})");
                        format!("worker {id} {why} ({status})")
                    }
                    true => {
                        log::warn!(
                            "worker {id}: {why} ({status}); it answered nothing in {unproven} \
                             starts in a row, so requests fail at once while it is down"
                        );
                        let why = why.strip_suffix("; restarting it").unwrap_or(&why);
                        format!(
                            "worker {id} answered nothing in {unproven} starts in a row, the \
                             last of which {why} ({status}); its standard error is in the \
                             daemon's log"
                        )
                    }
                };
                if let Some(job) = job {
                    let _ = job.reply.send(Err(error.clone().into())).await;
                }
                if cannot_start {
                    cannot_serve(&inner, &mut carried, &error).await;
                }
            }
        }
        if healthy {
            delay = FIRST_RESTART_DELAY;
        }
        log::info!("worker {id}: restarting in {delay:?}");
        Timer::after(delay).await;
        delay = (delay * 2).min(LAST_RESTART_DELAY);
    }
}

type Pipes = (ChildStdin, BufReader<ChildStdout>, ChildStderr);

/// Starts worker `id` (forked on the pool's own thread, see [`super::spawner`]) and keeps its
/// process in its slot for [`reap`] and shutdown. Besides
/// its pipes, returns a future that resolves when the process exits: a worker's end is
/// seen from the process itself, not from its stdout, which a child it started may hold.
async fn start(
    inner: &Inner,
    id: usize,
) -> io::Result<(Pipes, impl Future<Output = io::Result<ExitStatus>>)> {
    let options = &inner.options;
    // `Pool::new` refuses an empty command.
    let (program, args) = options
        .command
        .split_first()
        .ok_or_else(|| io::Error::other("empty worker command"))?;
    let mut command = std::process::Command::new(program);
    // A process group of its own, led by the worker: what it starts joins it, so killing
    // the group at a restart and at shutdown leaves no grandchild behind. (A program that
    // moves itself to another group or session on purpose escapes this.) It also keeps the
    // terminal's Ctrl-C from reaching workers directly: the daemon stops them in order.
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    // PDEATHSIG is Linux only. Elsewhere a worker outlives a daemon killed by SIGKILL until it
    // next reads its stdin and finds it closed (see the module docs).
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
    let mut command = Command::from(command);
    command
        .args(args)
        .envs(options.env.iter().map(|(key, value)| (key, value)))
        .env("KHIVED_WORKER_ID", id.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = inner.spawner.spawn(command).await?;
    let pipes = match (child.stdin.take(), child.stdout.take(), child.stderr.take()) {
        (Some(stdin), Some(stdout), Some(stderr)) => (stdin, BufReader::new(stdout), stderr),
        _ => return Err(io::Error::other("worker pipes missing")),
    };
    log::info!("worker {id}: started (pid {})", child.id());
    // The future holds its own handle on the process: the child stays in its slot.
    let exited = child.status();
    *lock(&inner.children[id - 1]) = Some(Process {
        child,
        stderr: None,
    });
    Ok((pipes, exited))
}

/// The signal `reap` kills with.
const SIGKILL: i32 = rustix::process::Signal::KILL.as_raw();

/// Kills worker `id` if it still runs, with every process left in its group, and waits
/// for it; returns how it ended, in words and as the status it was reaped with.
async fn reap(inner: &Inner, id: usize) -> (String, Option<ExitStatus>) {
    let process = lock(&inner.children[id - 1]).take();
    let Some(Process { mut child, .. }) = process else {
        return ("not started".to_owned(), None);
    };
    // A worker that printed garbage or hung may still run; one that died is only reaped.
    // (One that is exiting keeps the exit status it chose: a later signal does not change it.)
    kill_group(child.id());
    let _ = child.kill();
    match child.status().await {
        Ok(status) => (status.to_string(), Some(status)),
        Err(e) => (format!("not reaped: {e}"), None),
    }
}

/// Ends worker `id` at a stop, once its stdin is closed: waits for it to exit until
/// `deadline` (the shutdown grace, `grace` long), forwarding what it writes to standard error
/// meanwhile, then kills what is left of its process group (itself too, past the grace) and
/// reaps it.
pub(super) async fn end(id: usize, process: Process, deadline: Option<Instant>, grace: Duration) {
    let Process {
        mut child,
        mut stderr,
    } = process;
    let group = child.id();
    let exited = {
        let forward = async {
            if let Some(stderr) = stderr.as_mut() {
                stderr.forward().await;
            }
            future::pending().await
        };
        let past_grace = async {
            deadline.map_or_else(Timer::never, Timer::at).await;
            None
        };
        async { child.status().await.ok() }
            .or(past_grace)
            .or(forward)
            .await
    };
    // Its children may still run, holding its pipes or not: none outlives the pool.
    kill_group(group);
    let status = match exited {
        Some(status) => status.to_string(),
        None => {
            let _ = child.kill();
            match child.status().await {
                Ok(status) => status.to_string(),
                Err(e) => format!("not reaped: {e}"),
            }
        }
    };
    // What it wrote last, up to the end of the pipe, which no process of its group holds
    // any more.
    if let Some(stderr) = stderr.as_mut() {
        stderr.forward().or(moment()).await;
        stderr.dropped.report();
    }
    match exited {
        Some(_) => log::info!("worker {id}: exited ({status})"),
        None => log::warn!("worker {id}: still running after {grace:?}; killed it ({status})"),
    }
}

/// Sends SIGKILL to the process group that worker process `leader` leads: the worker, if it
/// still runs, and every process it started that stayed in its group.
///
/// The group's id stays reserved while any member lives, even once the worker itself is
/// reaped, so the signal reaches only the worker's own processes; when none is left it
/// fails with ESRCH, which is ignored.
pub(super) fn kill_group(leader: u32) {
    let Some(group) = i32::try_from(leader)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return;
    };
    let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
}

/// Records `why` no worker can serve: while none runs, requests fail at once with it rather
/// than wait in the queue for a worker that may never start or warm up. The request carried
/// over to this one, and those queued, are answered with it now.
async fn cannot_serve(inner: &Inner, carried: &mut Option<Job>, why: &str) {
    *lock(&inner.start_failure) = Some(why.to_owned());
    requeue_carried(inner, carried, why).await;
    inner.fail_queued(why).await;
}

/// Puts a request carried over to this worker, which could not start or warm up, back in
/// the queue for the other workers (with none running, `fail_queued` then answers it with
/// the rest); fails it if the queue has no room.
async fn requeue_carried(inner: &Inner, carried: &mut Option<Job>, why: &str) {
    let Some(job) = carried.take() else {
        return;
    };
    if let Err(refused) = inner.jobs.try_send(job) {
        let _ = refused
            .into_inner()
            .reply
            .send(Err(format!("no worker could take it: {why}").into()))
            .await;
    }
}

/// Serves jobs one at a time, `carried` first, until the worker fails or the daemon stops.
/// A job it could not send is left in `carried`.
async fn serve(
    inner: &Inner,
    id: usize,
    (mut stdin, mut stdout, exited): (
        ChildStdin,
        BufReader<ChildStdout>,
        impl Future<Output = io::Result<ExitStatus>>,
    ),
    carried: &mut Option<Job>,
    last_request: &mut u64,
    answered: &mut bool,
) -> Ended {
    let mut exited = pin!(exited);
    let timeout = inner.options.request_timeout;
    if let Some(ops) = &inner.options.warm {
        *last_request += 1;
        let line = line::encode_request_with_id(*last_request, ops, None, None);
        let warmed = exchange(
            &mut stdin,
            &mut stdout,
            exited.as_mut(),
            &line,
            *last_request,
            None,
        );
        // Bound by the request timeout too, from the worker's start.
        let late = async {
            match timeout {
                Some(limit) => {
                    Timer::after(limit).await;
                    Err(format!(
                        "it did not answer its warm request within the request timeout \
                         ({limit:?}); raise the timeout above what warming takes"
                    ))
                }
                None => future::pending().await,
            }
        };
        match warmed.or(late).await {
            Ok(Ok(_)) => log::info!("worker {id}: warmed"),
            Ok(Err(error)) => log::warn!("worker {id}: warm request failed: {error}"),
            Err(why) => return Ended::NotWarmed(why),
        }
        *answered = true;
    }
    loop {
        let job = match carried.take() {
            Some(job) => job,
            None => match idle(inner, &mut stdout, exited.as_mut()).await {
                Ok(Some(job)) => job,
                Ok(None) => return Ended::Stopping,
                Err(why) => return Ended::Failed { why, job: None },
            },
        };
        if job.abandoned() {
            log::debug!("worker {id}: skipped a request whose client is gone");
            continue;
        }
        if let (true, Some(limit)) = (job.expired(), timeout) {
            // Its time ran out in the queue: running it now would answer nobody in time.
            let message = format!(
                "request timed out: waited {limit:?} in the queue; the pool's {} worker(s) \
                 were busy or restarting, so try again or raise the request timeout",
                inner.options.workers
            );
            let error = DispatchError::new(message)
                .with_code(code::REQUEST_TIMED_OUT)
                .not_committed();
            let _ = job.reply.send(Err(error)).await;
            continue;
        }
        // Output that came in with the job, after `idle` last looked, is just as stray. The
        // job was not sent: the next process gets it.
        if let Some(why) = stray_output(&mut stdout).await {
            *carried = Some(job);
            return Ended::Failed { why, job: None };
        }
        *last_request += 1;
        let line = job.line(*last_request);
        let deadline = job.deadline.zip(timeout);
        let answer = exchange(
            &mut stdin,
            &mut stdout,
            exited.as_mut(),
            &line,
            *last_request,
            deadline,
        )
        .await;
        crate::pages::release(line);
        match answer {
            Ok(answer) => {
                *answered = true;
                let _ = job.reply.send(answer.map_err(DispatchError::from)).await;
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

/// Waits for the next job (`None` once the daemon stops) while watching the idle worker: it
/// may not exit, and anything it prints now answers no request, so it is out of sync.
async fn idle(
    inner: &Inner,
    stdout: &mut BufReader<ChildStdout>,
    exited: Pin<&mut impl Future<Output = io::Result<ExitStatus>>>,
) -> Result<Option<Job>, String> {
    let job = async { Ok(inner.queued.recv().await.ok()) };
    let gone = async {
        let _ = exited.await;
        Err(EXITED_IDLE.to_owned())
    };
    let output = async {
        Err(match stdout.fill_buf().await {
            Ok(buf) => stray(buf),
            Err(e) => format!("could not be read from: {e}"),
        })
    };
    // The exit first: a worker that has just exited must not be given the next job.
    gone.or(job).or(output).await
}

/// Looks, without waiting, for output from a worker that owes no reply: `Some(why)` if
/// there is any, which means it is out of sync.
async fn stray_output(stdout: &mut BufReader<ChildStdout>) -> Option<String> {
    match future::poll_once(stdout.fill_buf()).await? {
        Ok(buf) => Some(stray(buf)),
        Err(e) => Some(format!("could not be read from: {e}")),
    }
}

/// Why output `buf`, read when no request was outstanding, ends a worker. The output itself
/// is not quoted: it may be an answer meant for another client.
fn stray(buf: &[u8]) -> String {
    match buf.len() {
        0 => CLOSED_IDLE.to_owned(),
        len => format!(
            "is out of sync: it printed {len} byte(s) when no request was outstanding; \
             restarting it"
        ),
    }
}

/// Sends request `id` and reads one reply line, racing the worker's exit and the request's
/// `deadline` (when its time is up, and the limit it had). `Err` means the worker cannot be
/// trusted any more (it died, hung, answered another request or broke the protocol) and
/// must be restarted.
async fn exchange(
    stdin: &mut ChildStdin,
    stdout: &mut BufReader<ChildStdout>,
    mut exited: Pin<&mut impl Future<Output = io::Result<ExitStatus>>>,
    line: &[u8],
    id: u64,
    deadline: Option<(Instant, Duration)>,
) -> Result<Result<String, String>, String> {
    let talk = async {
        let send = async {
            let sent = match stdin.write_all(line).await {
                Ok(()) => stdin.flush().await,
                Err(e) => Err(e),
            };
            sent.map_err(|e| format!("could not take the request: {e}"))
        };
        // A worker that exited while a process it started holds its stdin never reads the
        // rest of a request larger than the pipe holds: its exit ends the wait.
        let gone = async {
            let _ = exited.as_mut().await;
            Err(EXITED.to_owned())
        };
        send.or(gone).await?;
        // A reply printed just before exiting is read first: `or` polls the read first, and
        // the reply is in the pipe before the exit can be seen.
        let read = async { Ok(read_line(stdout).await) };
        let gone = async {
            let _ = exited.await;
            Err(EXITED.to_owned())
        };
        let reply = match read.or(gone).await? {
            Ok(Some(reply)) => reply,
            // The end of its stdout: most likely it exited, which `run` tells from its status.
            Ok(None) => return Err(CLOSED_STDOUT.to_owned()),
            Err(why) => return Err(why),
        };
        let parsed = line::parse_reply_with_id(&reply);
        crate::pages::release(reply);
        let reply = parsed?;
        match reply.id {
            Some(echoed) if echoed != id => Err(format!(
                "is out of sync: it answered request {echoed} while request {id} was \
                 outstanding; restarting it"
            )),
            _ => Ok(reply.answer),
        }
    };
    match deadline {
        None => talk.await,
        Some((at, limit)) => {
            talk.or(async {
                Timer::at(at).await;
                Err(format!(
                    "did not answer within {limit:?} of the request reaching the pool; \
                     restarting it"
                ))
            })
            .await
        }
    }
}

/// One line from the worker's stdout, newline included; `None` at its end.
async fn read_line(stdout: &mut BufReader<ChildStdout>) -> Result<Option<Vec<u8>>, String> {
    let mut reply = Vec::new();
    // Bounded like a frame, so a worker that never prints a newline cannot fill memory.
    let mut limited = stdout.take(MAX_FRAME_BYTES as u64 + 1);
    match limited.read_until(b'\n', &mut reply).await {
        Ok(0) => Ok(None),
        Ok(_) if reply.last() != Some(&b'\n') => Err(match reply.len() > MAX_FRAME_BYTES {
            true => format!("printed a reply longer than {MAX_FRAME_BYTES} bytes"),
            false => "closed its standard output in the middle of its reply".to_owned(),
        }),
        Ok(_) => Ok(Some(reply)),
        Err(e) => Err(format!("could not be read from: {e}")),
    }
}

/// How much of a worker's standard error is read at once: one pipe's worth.
const STDERR_CHUNK: usize = 64 * 1024;
/// The longest stderr line logged; the rest of a longer line is cut (and counted).
const LONGEST_LINE: usize = 8 * 1024;
/// How often the count of dropped lines is logged, while lines are being dropped.
const DROP_REPORT: Duration = Duration::from_secs(1);

/// A worker's standard error on its way to the daemon's log: the pipe, and where the
/// copying stands (a line begun, the rate's tokens, the lines dropped), so that it goes on
/// where it was left when the worker's task is dropped at a stop and the shutdown takes it up
/// during the grace.
pub(super) struct Stderr {
    pipe: BufReader<ChildStderr>,
    bucket: Bucket,
    line: Vec<u8>,
    cut: usize,
    dropped: Dropped,
    /// The worker closed its end: everything it wrote is forwarded.
    ended: bool,
}

impl Stderr {
    fn new(id: usize, pipe: ChildStderr, per_second: u32) -> Stderr {
        Stderr {
            pipe: BufReader::with_capacity(STDERR_CHUNK, pipe),
            bucket: Bucket::new(per_second),
            line: Vec::new(),
            cut: 0,
            // Also reports what is left when the forwarding ends with the worker.
            dropped: Dropped {
                id,
                per_second,
                count: 0,
                reported: Instant::now(),
            },
            ended: false,
        }
    }

    /// Copies the worker's standard error into the daemon's log, a line at a time, until the
    /// worker closes it: at most `per_second` lines a second (in bursts of as many); the rest
    /// are read and dropped, and their count logged once a second. Bytes that are not UTF-8
    /// are logged lossily and overlong lines cut: stopping early would close the pipe and
    /// kill the worker at its next write.
    ///
    /// The forwarding must not starve the daemon's other tasks, which run on the same
    /// thread: it handles one chunk per turn and then lets them run, and while over its rate
    /// it waits for the next line's turn before reading on, so a flood costs a read per
    /// turn, not a CPU (the worker blocks on its full pipe meanwhile).
    ///
    /// Dropped at an await, it loses nothing: a chunk is consumed only once its lines are
    /// handled, and a call after the end returns at once.
    async fn forward(&mut self) {
        let id = self.dropped.id;
        while !self.ended {
            let report_at = self.dropped.reported + DROP_REPORT;
            let waiting_drops = self.dropped.count > 0;
            let filled = async { Some(self.pipe.fill_buf().await.map(|buf| buf.len())) }
                .or(async {
                    match waiting_drops {
                        true => Timer::at(report_at).await,
                        false => future::pending().await,
                    };
                    None
                })
                .await;
            match filled {
                None => {
                    self.dropped.report();
                    continue;
                }
                Some(Ok(0) | Err(_)) => {
                    if !self.line.is_empty() {
                        match self.bucket.take() {
                            true => log_line(id, &self.line, self.cut),
                            false => self.dropped.count += 1,
                        }
                    }
                    self.ended = true;
                    return;
                }
                Some(Ok(_)) => {}
            }
            let chunk = self.pipe.buffer();
            let len = chunk.len();
            let mut over = false;
            for piece in chunk.split_inclusive(|&b| b == b'\n') {
                let complete = piece.last() == Some(&b'\n');
                let body = &piece[..piece.len() - usize::from(complete)];
                let room = LONGEST_LINE.saturating_sub(self.line.len());
                self.line.extend_from_slice(&body[..body.len().min(room)]);
                self.cut += body.len().saturating_sub(room);
                if complete {
                    match self.bucket.take() {
                        true => log_line(id, &self.line, self.cut),
                        false => {
                            self.dropped.count += 1;
                            over = true;
                        }
                    }
                    self.line.clear();
                    self.cut = 0;
                }
            }
            self.pipe.consume(len);
            if self.dropped.reported.elapsed() >= DROP_REPORT {
                self.dropped.report();
            }
            if over {
                Timer::at(self.bucket.next_token()).await;
            } else {
                future::yield_now().await;
            }
        }
    }
}

/// The count of a worker's stderr lines dropped since it was last logged.
struct Dropped {
    id: usize,
    per_second: u32,
    count: u64,
    reported: Instant,
}

impl Dropped {
    fn report(&mut self) {
        if self.count > 0 {
            log::warn!(
                "worker {}: {} stderr lines dropped (more than {} lines/s)",
                self.id,
                self.count,
                self.per_second
            );
        }
        self.count = 0;
        self.reported = Instant::now();
    }
}

impl Drop for Dropped {
    fn drop(&mut self) {
        self.report();
    }
}

fn log_line(id: usize, line: &[u8], cut: usize) {
    let text = String::from_utf8_lossy(line);
    let text = text.trim_end_matches('\r');
    match cut {
        0 => log::info!("worker {id}: {text}"),
        cut => log::info!("worker {id}: {text} [{cut} bytes cut]"),
    }
}

/// A token bucket: `per_second` tokens a second, holding at most one second's worth.
struct Bucket {
    per_second: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(per_second: u32) -> Bucket {
        let per_second = f64::from(per_second.max(1));
        Bucket {
            per_second,
            tokens: per_second,
            at: Instant::now(),
        }
    }

    /// Takes a token if there is one.
    fn take(&mut self) -> bool {
        let now = Instant::now();
        let earned = now.duration_since(self.at).as_secs_f64() * self.per_second;
        self.tokens = (self.tokens + earned).min(self.per_second);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return true;
        }
        false
    }

    /// When the next token will be there.
    fn next_token(&self) -> Instant {
        let missing = (1.0 - self.tokens).max(0.0);
        self.at + Duration::from_secs_f64(missing / self.per_second)
    }
}
