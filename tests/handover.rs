//! Replacing a running daemon: `khived restart` hands the listening socket over without a
//! failed request, a replacement that fails leaves the running daemon serving, and
//! `call --spawn --replace` replaces a daemon of another config id.

mod common;

use std::io::{IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::{process_exited, start_held_request, temp_dir, wait_until, ChildDaemon};
use khived::{Client, Request};
use rustix::process::Signal;

const KHIVED: &str = env!("CARGO_BIN_EXE_khived");

#[test]
fn child_daemon() {
    common::child_main();
}

struct Place {
    dir: tempfile::TempDir,
    socket: PathBuf,
    pid_file: PathBuf,
}

impl Place {
    fn new() -> Place {
        let dir = temp_dir();
        Place {
            socket: dir.path().join("k.sock"),
            pid_file: dir.path().join("k.pid"),
            dir,
        }
    }

    fn run(&self, command: &str, args: &[&str]) -> Output {
        Command::new(KHIVED)
            .arg(command)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--pid")
            .arg(&self.pid_file)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Runs `start` or `restart` and returns the pid it printed.
    fn started(&self, command: &str, args: &[&str]) -> u32 {
        let out = self.run(command, args);
        assert!(out.status.success(), "{command}: {}", text(&out.stderr));
        text(&out.stdout).trim().parse().unwrap()
    }

    fn pid_of_answer(&self, namespace: &str) -> u32 {
        let mut client = Client::connect(&self.socket, Duration::from_secs(10)).unwrap();
        let request = Request::new("x", namespace, "");
        let response = client.request(&request).unwrap();
        assert!(response.ok, "{:?}", response.error);
        khived::probe(&self.socket, Duration::from_secs(10))
            .unwrap()
            .pid
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let _ = self.run("stop", &["--force", "--timeout", "5"]);
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `clients` threads sending one-shot requests in a loop until stopped; each returns the
/// errors it saw.
struct Looping {
    done: Arc<AtomicBool>,
    /// Requests made so far, by all clients.
    answered: Arc<AtomicU64>,
    threads: Vec<thread::JoinHandle<(u64, Vec<String>)>>,
}

impl Looping {
    fn start(socket: &Path, clients: usize) -> Looping {
        let done = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let threads = (0..clients)
            .map(|i| {
                let (done, socket) = (Arc::clone(&done), socket.to_owned());
                let answered = Arc::clone(&answered);
                thread::spawn(move || {
                    let ops = format!("client {i}");
                    let (mut sent, mut errors) = (0, Vec::new());
                    while !done.load(Ordering::Relaxed) {
                        sent += 1;
                        answered.fetch_add(1, Ordering::Relaxed);
                        let answer = Client::connect(&socket, Duration::from_secs(30))
                            .and_then(|mut c| c.request(&Request::new(&ops, "echo", "")));
                        match answer {
                            Ok(response) if response.ok => {}
                            Ok(response) => errors.push(format!("{:?}", response.error)),
                            Err(e) => errors.push(e.to_string()),
                        }
                    }
                    (sent, errors)
                })
            })
            .collect();
        Looping {
            done,
            answered,
            threads,
        }
    }

    /// Waits until the clients have made `n` more requests: they are busy around what
    /// comes next.
    fn wait_for(&self, n: u64) {
        let from = self.answered.load(Ordering::Relaxed);
        wait_until("the clients to make requests", || {
            self.answered.load(Ordering::Relaxed) >= from + n
        });
    }

    /// Stops the clients; how many requests they sent, and every error.
    fn stop(self) -> (u64, Vec<String>) {
        self.done.store(true, Ordering::Relaxed);
        let mut all = (0, Vec::new());
        for thread in self.threads {
            let (sent, errors) = thread.join().unwrap();
            all.0 += sent;
            all.1.extend(errors);
        }
        all
    }
}

#[test]
fn restarts_under_load_fail_no_request() {
    let place = Place::new();
    let serve = ["--namespace", "echo"];
    let mut pid = place.started("start", &serve);
    let clients = Looping::start(&place.socket, 4);
    let mut old = Vec::new();
    for _ in 0..5 {
        clients.wait_for(8);
        let new = place.started("restart", &serve);
        assert_ne!(new, pid, "a new daemon answers");
        old.push(pid);
        pid = new;
        // The PID file names the new daemon, which answers.
        assert_eq!(khived::running_pid(&place.pid_file).unwrap(), Some(new));
        assert_eq!(place.pid_of_answer("echo"), new);
    }
    clients.wait_for(8);
    let (sent, errors) = clients.stop();
    assert!(
        errors.is_empty(),
        "{} of {sent} failed: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    // Each old daemon drained and exited, leaving the files to its successor.
    for pid in old {
        wait_until(&format!("pid {pid} to exit"), || process_exited(pid));
    }
    let handover = place.dir.path().join("k.handover");
    assert!(place.socket.exists() && handover.exists());
    let stop = place.run("stop", &[]);
    assert!(stop.status.success(), "{}", text(&stop.stderr));
    assert!(!place.socket.exists() && !place.pid_file.exists() && !handover.exists());
}

#[test]
fn a_replacement_that_fails_leaves_the_running_daemon_serving() {
    let place = Place::new();
    let pid = place.started("start", &["--namespace", "echo"]);
    let clients = Looping::start(&place.socket, 2);
    clients.wait_for(4);
    // A log file that cannot be opened: below a regular file.
    let blocker = place.dir.path().join("file");
    std::fs::write(&blocker, "").unwrap();
    let log = blocker.join("k.log");
    let out = place.run(
        "restart",
        &["--namespace", "echo", "--log-file", log.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("not a directory"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(place.pid_of_answer("echo"), pid);

    // A successor that takes the descriptors and dies before it is ready changes nothing.
    clients.wait_for(4);
    crashing_successor(&place.dir.path().join("k.handover"));
    assert_eq!(place.pid_of_answer("echo"), pid);
    assert_eq!(khived::running_pid(&place.pid_file).unwrap(), Some(pid));

    clients.wait_for(8);
    let (sent, errors) = clients.stop();
    assert!(
        errors.is_empty(),
        "{} of {sent} failed: {errors:?}",
        errors.len()
    );
    // And the next replacement works.
    let new = place.started("restart", &["--namespace", "echo"]);
    assert_ne!(new, pid);
    assert_eq!(place.pid_of_answer("echo"), new);
}

/// A replacement for another socket path with the same PID file is no handover: the
/// handover socket sits beside the socket it serves, so the new daemon finds none beside its
/// own. Asked to replace (`KHIVE_REPLACE=1`), it is refused by the PID file's lock, naming
/// the running daemon, which serves on; `restart` stops the running daemon, which removes
/// its files, and starts the new one.
#[test]
fn a_replacement_for_another_socket_path_is_no_handover() {
    let place = Place::new();
    let pid = place.started("start", &["--namespace", "echo"]);
    let elsewhere = place.dir.path().join("other.sock");
    let command = |subcommand: &str| {
        let mut command = Command::new(KHIVED);
        command
            .arg(subcommand)
            .arg("--socket")
            .arg(&elsewhere)
            .arg("--pid")
            .arg(&place.pid_file)
            .args(["--namespace", "echo"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    };
    let mut replacing = command("serve").env("KHIVE_REPLACE", "1").spawn().unwrap();
    // Served the other daemon's listener instead, it would not exit: it is stopped then.
    let mut exited = None;
    for _ in 0..2000 {
        exited = replacing.try_wait().unwrap();
        if exited.is_some() {
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    if exited.is_none() {
        let _ = replacing.kill();
    }
    let out = replacing.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert!(
        exited.is_some(),
        "it took over another socket's daemon: {stderr}"
    );
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("already running as pid {pid}")),
        "{stderr}"
    );
    assert!(!elsewhere.exists(), "nothing was bound at {elsewhere:?}");
    assert_eq!(place.pid_of_answer("echo"), pid);

    let out = command("restart").output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let new: u32 = text(&out.stdout).trim().parse().unwrap();
    assert_ne!(new, pid);
    wait_until("the old daemon to exit", || process_exited(pid));
    assert!(!place.socket.exists(), "the old daemon removed its socket");
    let info = khived::probe(&elsewhere, Duration::from_secs(10)).unwrap();
    assert_eq!(info.pid, new);
    assert_eq!(khived::running_pid(&place.pid_file).unwrap(), Some(new));
}

/// Speaks the successor's side of the handover (PROTOCOL.md) up to the descriptors, then
/// hangs up instead of saying it is ready, as a successor that crashes would.
fn crashing_successor(handover: &Path) {
    let (stream, files) = taken(handover);
    drop((stream, files));
    next_attempt_closed(handover);
}

/// Connects to the handover socket and speaks the successor's side up to the descriptors:
/// `take`, then `given` with the listener and the PID file, in that order.
fn taken(handover: &Path) -> (UnixStream, Vec<OwnedFd>) {
    let mut stream = UnixStream::connect(handover).unwrap();
    stream.write_all(&step("take")).unwrap();
    let mut buf = [0; 4096];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut control = rustix::net::RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        &stream,
        &mut [IoSliceMut::new(&mut buf)],
        &mut control,
        rustix::net::RecvFlags::empty(),
    )
    .unwrap();
    let files: Vec<OwnedFd> = control
        .drain()
        .flat_map(|message| match message {
            rustix::net::RecvAncillaryMessage::ScmRights(fds) => fds.collect(),
            _ => Vec::new(),
        })
        .collect();
    assert_eq!(files.len(), 2, "the listener and the PID file");
    assert!(text(&buf[4..got.bytes]).contains("\"given\""));
    (stream, files)
}

/// A child process, killed if the test ends while it runs.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads one handover message and checks its step.
fn read_step(stream: &mut UnixStream, step: &str) {
    let mut header = [0; 4];
    stream.read_exact(&mut header).unwrap();
    let mut body = vec![0; u32::from_be_bytes(header) as usize];
    stream.read_exact(&mut body).unwrap();
    let body = text(&body);
    assert!(body.contains(&format!("\"step\":\"{step}\"")), "{body}");
}

/// One handover message of this process.
fn step(name: &str) -> Vec<u8> {
    let body = format!("{{\"step\":\"{name}\",\"pid\":{}}}", std::process::id());
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(body.as_bytes());
    frame
}

/// Until the daemon has seen the end of an attempt: a new connection to the handover socket
/// is accepted and answered only then (it serves one successor at a time).
fn next_attempt_closed(handover: &Path) {
    let mut next = UnixStream::connect(handover).expect("the handover socket, still offered");
    next.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    next.write_all(b"\x00\x00\x00\x02{}").unwrap();
    let mut rest = Vec::new();
    // A message that is not `take` ends that attempt too: the connection is closed.
    let _ = next.read_to_end(&mut rest);
}

/// Answers `hold` by keeping its thread until `release` is set, without yielding: a long
/// computation in one poll, on the thread that also runs the daemon's supervisor.
struct Holding {
    held: Arc<AtomicBool>,
    release: Arc<AtomicBool>,
}

impl khived::Dispatch for Holding {
    async fn dispatch(&self, request: &Request<'_>) -> Result<String, khived::DispatchError> {
        if request.ops == "hold" {
            self.held.store(true, Ordering::SeqCst);
            while !self.release.load(Ordering::SeqCst) {
                thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(request.ops.to_string())
    }

    fn namespace(&self) -> &str {
        "echo"
    }

    fn config_id(&self) -> &str {
        ""
    }
}

/// A successor that said `ready` and left before the running daemon read it (the daemon's
/// thread was held in a long poll past the successor's deadline) is no handover: the
/// daemon serves on, with its files, instead of stopping for nobody.
#[test]
fn a_successor_gone_before_its_ready_is_read_changes_nothing() {
    let dir = temp_dir();
    let socket = dir.path().join("k.sock");
    let mut config = khived::Config::at(&socket);
    config.handle_signals = false;
    config.threads = 1;
    let (held, release) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let holding = Holding {
        held: Arc::clone(&held),
        release: Arc::clone(&release),
    };
    let daemon = khived::Daemon::new(config, holding);
    let stop = daemon.shutdown_handle();
    let running = thread::spawn(move || daemon.run_blocking());
    common::wait_until_serving(&socket);
    let handover = dir.path().join("k.handover");

    let (mut successor, _files) = taken(&handover);
    let holder = {
        let socket = socket.clone();
        thread::spawn(move || {
            let mut client = Client::connect(&socket, Duration::from_secs(30)).unwrap();
            client.request(&Request::new("hold", "echo", "")).unwrap()
        })
    };
    wait_until("the daemon's thread to be held", || {
        held.load(Ordering::SeqCst)
    });
    // Ready, and gone, while the daemon cannot read it: shut down as a successor that gives
    // up does, since a close alone leaves the connection open while a process another test
    // starts holds a copy of its descriptor (between fork and exec).
    successor.write_all(&step("ready")).unwrap();
    successor.shutdown(std::net::Shutdown::Both).unwrap();
    drop(successor);
    release.store(true, Ordering::SeqCst);
    assert!(holder.join().unwrap().ok);

    next_attempt_closed(&handover);
    let mut client = Client::connect(&socket, Duration::from_secs(10)).unwrap();
    let answer = client.request(&Request::new("x", "echo", "")).unwrap();
    assert!(answer.ok, "{:?}", answer.error);
    assert!(
        !running.is_finished(),
        "the daemon stopped for a successor that was gone"
    );
    assert!(socket.exists() && handover.exists());
    stop.shutdown();
    assert!(matches!(
        running.join().unwrap(),
        Ok(khived::Stopped::Drained)
    ));
    assert!(
        !socket.exists(),
        "a daemon that was not replaced removes its files"
    );
}

/// A daemon told to stop in the middle of a handover, once the successor has the listener,
/// leaves the listening socket as it is for the successor to go on with. (A stop shuts the
/// socket down for reading, on Linux, so that newcomers are refused: done here, it would
/// refuse every client of the successor too.)
#[cfg(target_os = "linux")]
#[test]
fn a_stop_in_the_middle_of_a_handover_leaves_the_successor_its_listener() {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let dir = temp_dir();
    let socket = dir.path().join("k.sock");
    let mut config = khived::Config::at(&socket);
    config.handle_signals = false;
    let daemon = khived::Daemon::new(config, common::TestDispatch::default());
    let stop = daemon.shutdown_handle();
    let running = thread::spawn(move || daemon.run_blocking());
    common::wait_until_serving(&socket);

    let (_successor, files) = taken(&dir.path().join("k.handover"));
    stop.shutdown();
    assert!(matches!(
        running.join().unwrap(),
        Ok(khived::Stopped::Drained)
    ));
    // No client is queued on it: a listener that is not shut down has nothing to report.
    let mut fds = [PollFd::new(&files[0], PollFlags::IN | PollFlags::RDHUP)];
    let ready = poll(&mut fds, Some(&Timespec::default())).unwrap();
    assert_eq!(
        (ready, fds[0].revents()),
        (0, PollFlags::empty()),
        "the successor's listener was shut down"
    );
}

/// A predecessor told to stop in the middle of the handover removes its files and is gone
/// before its successor hears `stopped`. The successor must not serve on, on a socket
/// nobody can reach any more, but exit and say why. The test plays the predecessor.
#[test]
fn a_successor_whose_predecessor_stopped_during_the_handover_exits() {
    let place = Place::new();
    let listener = std::os::unix::net::UnixListener::bind(&place.socket).unwrap();
    let mut pid_file = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&place.pid_file)
        .unwrap();
    rustix::fs::flock(
        &pid_file,
        rustix::fs::FlockOperation::NonBlockingLockExclusive,
    )
    .unwrap();
    // A pid that is no process any more: the predecessor has ended.
    let gone = {
        let mut child = Command::new("true").spawn().unwrap();
        child.wait().unwrap();
        child.id()
    };
    write!(pid_file, "{gone}").unwrap();
    let offer =
        std::os::unix::net::UnixListener::bind(place.dir.path().join("k.handover")).unwrap();

    let mut successor = Killed(
        Command::new(KHIVED)
            .args(["serve", "--replace", "--socket"])
            .arg(&place.socket)
            .arg("--pid")
            .arg(&place.pid_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (mut stream, _) = offer.accept().unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    read_step(&mut stream, "take");
    let given = format!("{{\"step\":\"given\",\"pid\":{gone}}}");
    let mut message = (given.len() as u32).to_be_bytes().to_vec();
    message.extend_from_slice(given.as_bytes());
    let fds = [
        std::os::fd::AsFd::as_fd(&listener),
        std::os::fd::AsFd::as_fd(&pid_file),
    ];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
    assert!(control.push(rustix::net::SendAncillaryMessage::ScmRights(&fds)));
    rustix::net::sendmsg(
        &stream,
        &[std::io::IoSlice::new(&message)],
        &mut control,
        rustix::net::SendFlags::empty(),
    )
    .unwrap();
    read_step(&mut stream, "ready");
    // Stopped instead of handing over: the files are removed, the handover connection closed.
    std::fs::remove_file(&place.socket).unwrap();
    std::fs::remove_file(&place.pid_file).unwrap();
    drop(stream);

    let status = common::wait_exit(&mut successor.0, Duration::from_secs(30), String::new);
    let mut stderr = String::new();
    successor
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "pid {gone} stopped during the handover and removed its socket or PID file"
        )),
        "{stderr}"
    );
}

#[test]
fn call_spawn_replace_takes_over_from_a_daemon_of_another_config_id() {
    let place = Place::new();
    let old = place.started("start", &["--namespace", "echo", "--config-id", "v1"]);
    let call = |extra: &[&str]| {
        let mut args = vec!["--namespace", "echo", "--config-id", "v2", "--spawn"];
        args.extend_from_slice(extra);
        args.push("hello");
        place.run("call", &args)
    };
    // Without --replace the mismatch is reported.
    assert_eq!(call(&[]).status.code(), Some(4));
    let replaced = call(&["--replace"]);
    assert!(replaced.status.success(), "{}", text(&replaced.stderr));
    assert_eq!(text(&replaced.stdout), "hello\n");
    let info = khived::probe(&place.socket, Duration::from_secs(10)).unwrap();
    assert_eq!(info.config_id, "v2");
    assert_ne!(info.pid, old);
    wait_until("the old daemon to exit", || process_exited(old));
    // A daemon that already serves v2 is used as it is.
    assert!(call(&["--replace"]).status.success());
    assert_eq!(
        khived::probe(&place.socket, Duration::from_secs(10))
            .unwrap()
            .pid,
        info.pid
    );
}

// Linux only: other systems have no per-thread setuid to connect as a stranger with.
#[cfg(target_os = "linux")]
#[test]
fn a_handover_is_refused_to_another_user() {
    use std::os::unix::fs::PermissionsExt;
    if !rustix::process::geteuid().is_root() {
        println!("skipped: connecting as another user needs root (setuid on a thread)");
        return;
    }
    let place = Place::new();
    let pid = place.started("start", &["--namespace", "echo"]);
    // Let uid 65534 reach the handover socket, so that only the credential check stands in
    // its way.
    let handover = place.dir.path().join("k.handover");
    std::fs::set_permissions(place.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(&handover, std::fs::Permissions::from_mode(0o666)).unwrap();
    let stranger = thread::spawn(move || {
        // This thread alone becomes uid 65534: the raw system call is per thread.
        rustix::thread::set_thread_uid(rustix::process::Uid::from_raw(65534)).unwrap();
        let mut stream = UnixStream::connect(&handover).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let body = b"{\"step\":\"take\",\"pid\":1}";
        let _ = stream.write_all(&(body.len() as u32).to_be_bytes());
        let _ = stream.write_all(body);
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        answer
    });
    assert_eq!(
        stranger.join().unwrap(),
        b"",
        "nothing is handed to a stranger"
    );
    std::fs::set_permissions(place.dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    assert_eq!(place.pid_of_answer("echo"), pid);
    assert_eq!(khived::running_pid(&place.pid_file).unwrap(), Some(pid));
}

/// A successor whose start is cut short before it says `ready` (an embedder drops its
/// `run` future) has the descriptors but not the files: they are still the predecessor's,
/// which serves on, on a socket that is still there.
#[test]
fn a_successor_dropped_before_it_is_ready_leaves_its_predecessor_the_files() {
    let dir = temp_dir();
    let socket = dir.path().join("k.sock");
    let old = ChildDaemon::start(&socket, &[]);
    let mut config = khived::Config::at(&socket);
    config.replace = true;
    config.handle_signals = false;
    let successor = khived::Daemon::new(config, common::TestDispatch::default());
    let mut run = Box::pin(successor.run());
    // The first poll takes the descriptors and stops at the executor's first turn, before
    // `ready` is said.
    let polled = futures_lite::future::block_on(futures_lite::future::poll_once(&mut run));
    assert!(polled.is_none(), "the start ended at once: {polled:?}");
    drop(run);
    assert!(socket.exists(), "the predecessor's socket was removed");
    old.wait_for_log("handover failed, still serving");
    let info = khived::probe(&socket, Duration::from_secs(10)).unwrap();
    assert_eq!(info.pid, old.pid());
    assert_eq!(khived::running_pid(&old.pid_file).unwrap(), Some(old.pid()));
}

/// A predecessor that has handed over lets go of the PID file at once, though it drains on
/// for as long as its requests take: were its successor to die meanwhile, the file would
/// stay locked, naming a dead process, and no daemon could start until the drain ended.
#[test]
fn a_successor_killed_while_its_predecessor_drains_leaves_the_pid_file_to_the_next() {
    let dir = temp_dir();
    let socket = dir.path().join("k.sock");
    let release = dir.path().join("release");
    let mut old = ChildDaemon::start(&socket, &[("KHIVE_DRAIN_TIMEOUT_SECS", "600")]);
    let held = start_held_request(&old, &release);
    let mut new = ChildDaemon::spawn(&socket, &[("KHIVE_REPLACE", "1")]);
    new.wait_for_log(&format!("took over from pid {}", old.pid()));
    old.wait_for_log(&format!("handed over to pid {}", new.pid()));
    new.signal(Signal::KILL);
    new.wait(Duration::from_secs(20));
    // The old daemon still drains, and holds nothing.
    assert!(!process_exited(old.pid()));
    assert_eq!(khived::running_pid(&old.pid_file).unwrap(), None);
    let next = ChildDaemon::start(&socket, &[]);
    assert_eq!(
        khived::running_pid(&next.pid_file).unwrap(),
        Some(next.pid())
    );
    std::fs::write(&release, "").unwrap();
    assert!(
        held.join().unwrap().unwrap().ok,
        "the held request is answered"
    );
    assert_eq!(
        old.wait(Duration::from_secs(20)).code(),
        Some(0),
        "{}",
        old.log()
    );
}

/// A successor given another PID file than the running daemon's is refused, and says so
/// (before, it named the handover socket: "No such file or directory"); the running daemon
/// serves on.
#[test]
fn a_successor_with_another_pid_file_names_it() {
    let dir = temp_dir();
    let socket = dir.path().join("k.sock");
    let old = ChildDaemon::start(&socket, &[]);
    let other = dir.path().join("other.pid");
    let other_text = other.display().to_string();
    let mut new = ChildDaemon::spawn(
        &socket,
        &[("KHIVE_REPLACE", "1"), ("KHIVE_PID", other_text.as_str())],
    );
    assert_eq!(
        new.wait(Duration::from_secs(20)).code(),
        Some(1),
        "{}",
        new.log()
    );
    let expected = format!("the PID file handed over is not {other_text} (");
    assert!(new.log().contains(&expected), "{}", new.log());
    assert!(new
        .log()
        .contains("give this daemon the PID file of the one it replaces"));
    old.wait_for_log("handover failed, still serving");
    let info = khived::probe(&socket, Duration::from_secs(10)).unwrap();
    assert_eq!(info.pid, old.pid());
}

/// A daemon at its connection cap answers `daemon_busy` to every newcomer, a probe
/// included. `Spawn::replace` replaces it all the same, without cutting its clients off;
/// `replace_unless`, which cannot tell what it serves, says so at once, rather than start a
/// daemon that could only fail, and leaves it alone.
#[test]
fn a_daemon_at_its_connection_cap_is_replaced_or_named_busy() {
    let dir = temp_dir();
    let socket = dir.path().join("k.sock");
    let old = ChildDaemon::start(&socket, &[("KHIVED_TEST_MAX_CONNECTIONS", "1")]);
    let mut slot = common::hold_a_slot(&socket);
    let spawn = || {
        khived::Spawn::new(&socket, common::child_command(&socket, &[]))
            .ready_timeout(Duration::from_secs(60))
    };
    let e = spawn()
        .replace_unless(common::NAMESPACE, common::CONFIG_ID)
        .connect(Duration::from_secs(10))
        .expect_err("the daemon is busy");
    assert_eq!(e.kind(), std::io::ErrorKind::ResourceBusy, "{e}");
    assert!(e.to_string().contains("daemon_busy"), "{e}");
    assert_eq!(khived::running_pid(&old.pid_file).unwrap(), Some(old.pid()));

    let mut client = spawn().replace().connect(Duration::from_secs(10)).unwrap();
    let new = client.probe().unwrap().pid;
    assert_ne!(new, old.pid());
    old.wait_for_log(&format!("handed over to pid {new}"));
    // The client holding the old daemon's slot was served, and is closed as the old one
    // drains, not cut off mid-request.
    assert!(common::is_closed(&mut slot));
    let pid = rustix::process::Pid::from_raw(new as i32).unwrap();
    rustix::process::kill_process(pid, Signal::TERM).unwrap();
    wait_until("the new daemon to stop", || process_exited(new));
}

/// `khived start` and `restart` take a daemon at its connection cap, which answers
/// `daemon_busy`, for a running one: `start` says it runs, and `restart` hands over from it,
/// rather than stop it and leave a gap for clients to find no daemon in.
#[test]
fn start_and_restart_know_a_daemon_at_its_connection_cap() {
    let place = Place::new();
    let args = ["--namespace", "echo", "--max-connections", "1"];
    let pid = place.started("start", &args);
    let _slot = common::hold_a_slot(&place.socket);
    let again = place.run("start", &args);
    assert!(
        text(&again.stderr).contains(&format!("already running as pid {pid}")),
        "{}",
        text(&again.stderr)
    );
    let new = place.started("restart", &args);
    assert_ne!(new, pid);
    let log = common::read_log(&place.dir.path().join("k.log"));
    assert!(log.contains(&format!("handed over to pid {new}")), "{log}");
}

/// `restart` whose new daemon is not ready in time says so truly: that daemon is left
/// running, to take over once it is ready (killing it could leave nobody serving, should it
/// hold the listener by then), not that the running one goes on. Here the running daemon's
/// handover socket takes the new one's connection and answers nothing until the test
/// closes it; the new one then exits, and the running one serves on.
#[test]
fn a_replacement_not_ready_in_time_is_named_and_left_to_go_on() {
    let dir = temp_dir();
    let socket = dir.path().join("k.sock");
    let mut config = khived::Config::at(&socket);
    config.handle_signals = false;
    config.handover = false;
    let pid_file = config.pid_file.clone();
    let daemon = khived::Daemon::new(config, common::TestDispatch::default());
    let stop = daemon.shutdown_handle();
    let running = thread::spawn(move || daemon.run_blocking());
    common::wait_until_serving(&socket);
    let slow_handover =
        std::os::unix::net::UnixListener::bind(dir.path().join("k.handover")).unwrap();

    let out = Command::new(KHIVED)
        .arg("restart")
        .arg("--socket")
        .arg(&socket)
        .arg("--pid")
        .arg(&pid_file)
        .args(["--timeout", "1"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let said = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.starts_with("khived: not ready in time: the daemon (pid "),
        "{said}"
    );
    assert!(
        said.contains(
            "it was left running, and takes over once it is ready (or exits if it cannot)"
        ),
        "{said}"
    );
    assert!(!said.contains("goes on"), "{said}");
    let new: u32 = said["khived: not ready in time: the daemon (pid ".len()..]
        .split(')')
        .next()
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {said:?}"));
    assert!(!process_exited(new), "pid {new} did not go on");

    // The new daemon asked for the files; with no answer, it gives up and exits.
    slow_handover.set_nonblocking(true).unwrap();
    let asking = std::cell::RefCell::new(None);
    wait_until("the new daemon to ask for the files", || {
        *asking.borrow_mut() = slow_handover.accept().ok();
        asking.borrow().is_some()
    });
    let (asking, _) = asking.into_inner().unwrap();
    asking.shutdown(std::net::Shutdown::Both).unwrap();
    wait_until("the new daemon to exit", || process_exited(new));
    assert_eq!(
        khived::probe(&socket, Duration::from_secs(10)).unwrap().pid,
        std::process::id()
    );
    stop.shutdown();
    assert!(running.join().unwrap().is_ok());
}
