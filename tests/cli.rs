//! The `khived` binary end to end: serve, call, status, stop, auto-spawn, the worker pool.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::temp_dir;

const KHIVED: &str = env!("CARGO_BIN_EXE_khived");
const WORKER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/worker.py");

/// A socket and PID file in a fresh directory, and the arguments that name them.
struct Place {
    dir: tempfile::TempDir,
    socket: PathBuf,
    pid_file: PathBuf,
}

impl Place {
    fn new() -> Place {
        let dir = temp_dir();
        let socket = dir.path().join("k.sock");
        let pid_file = dir.path().join("k.pid");
        Place {
            dir,
            socket,
            pid_file,
        }
    }

    fn khived(&self, command: &str) -> Command {
        let mut khived = Command::new(KHIVED);
        khived
            .arg(command)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--pid")
            .arg(&self.pid_file)
            .stdin(Stdio::null());
        khived
    }

    fn run(&self, command: &str, args: &[&str]) -> Output {
        self.khived(command).args(args).output().unwrap()
    }

    /// Starts `khived serve` with `args` and waits until it answers.
    fn serve(&self, args: &[&str]) -> Server {
        let log = self.dir.path().join("serve.log");
        let child = self
            .khived("serve")
            .args(args)
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let server = Server { child, log };
        common::wait_until_serving(&self.socket);
        server
    }

    fn call(&self, ops: &str) -> Output {
        self.run("call", &[ops])
    }

    /// `khived stop ARGS` running on its own, its output piped.
    fn stop_in_background(&self, args: &[&str]) -> Child {
        self.khived("stop")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// `khived call ARGS` running on its own, its output piped.
    fn call_in_background(&self, args: &[&str]) -> Child {
        self.khived("call")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }
}

struct Server {
    child: Child,
    log: PathBuf,
}

impl Server {
    fn log(&self) -> String {
        common::read_log(&self.log)
    }

    fn wait(&mut self) -> std::process::ExitStatus {
        let log = self.log.clone();
        common::wait_exit(&mut self.child, Duration::from_secs(20), || {
            common::read_log(&log)
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Processes whose command line mentions `marker`: the workers get their test's directory as
/// an argument, so any left running after their daemon has stopped show up here.
#[cfg(target_os = "linux")]
fn processes_mentioning(marker: &Path) -> Vec<String> {
    let marker = marker.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&marker) {
            found.push(format!(
                "{}: {cmdline}",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    found
}

/// Processes whose command line mentions `marker`, as `ps` lists them where there is no
/// `/proc`.
#[cfg(not(target_os = "linux"))]
fn processes_mentioning(marker: &Path) -> Vec<String> {
    let marker = marker.to_string_lossy().into_owned();
    let ps = Command::new("ps")
        .args(["-axww", "-o", "pid=,command="])
        .output()
        .unwrap();
    assert!(ps.status.success(), "ps failed: {}", stderr(&ps));
    String::from_utf8_lossy(&ps.stdout)
        .lines()
        .filter(|line| line.contains(&marker))
        .map(|line| line.trim().to_owned())
        .collect()
}

#[test]
fn help_and_version() {
    let version = Command::new(KHIVED).arg("--version").output().unwrap();
    assert_eq!(
        stdout(&version),
        format!("khived {}\n", env!("CARGO_PKG_VERSION"))
    );
    for command in ["serve", "call", "status", "stop"] {
        let help = Command::new(KHIVED)
            .args([command, "--help"])
            .output()
            .unwrap();
        assert!(help.status.success());
        assert!(stdout(&help).contains("Usage: khived "), "{command}");
    }
    let usage = Command::new(KHIVED)
        .args(["call", "--bogus", "x"])
        .output()
        .unwrap();
    assert_eq!(usage.status.code(), Some(2));
    assert!(stderr(&usage).contains("--bogus"));
    let missing = Command::new(KHIVED).arg("call").output().unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(stderr(&missing).contains("missing OPS"));
    let no_threads = Command::new(KHIVED)
        .args(["serve", "--threads", "0"])
        .output()
        .unwrap();
    assert_eq!(no_threads.status.code(), Some(2));
    assert!(stderr(&no_threads).contains("--threads 0 is out of range"));
}

#[test]
fn serve_takes_threads_and_a_request_timeout() {
    let place = Place::new();
    let mut server = place.serve(&["--threads", "1", "--request-timeout", "30"]);
    let call = place.call("hi");
    assert_eq!(stdout(&call), "hi\n", "{}", stderr(&call));
    let status = place.run("status", &[]);
    assert!(
        stdout(&status).contains("threads:    1"),
        "{}",
        stdout(&status)
    );
    assert!(
        stdout(&status).contains("waiting:    0"),
        "{}",
        stdout(&status)
    );
    assert!(
        server.log().contains("dispatch on up to 1 thread(s)"),
        "{}",
        server.log()
    );
    assert_eq!(place.run("stop", &[]).status.code(), Some(0));
    assert!(server.wait().success());
}

#[test]
fn serve_call_status_stop() {
    let place = Place::new();
    let mut server = place.serve(&[]);
    let call = place.call("hello there");
    assert_eq!(stdout(&call), "hello there\n");
    assert_eq!(call.status.code(), Some(0));

    let status = place.run("status", &[]);
    assert_eq!(status.status.code(), Some(0));
    let text = stdout(&status);
    assert!(
        text.contains(&format!("pid:        {}", server.child.id())),
        "{text}"
    );
    assert!(text.contains("namespace:  \"khive\""), "{text}");
    // The readiness probe and the call.
    assert!(text.contains("served:     2"), "{text}");
    // The status probe's own connection is not counted (once the earlier ones have closed).
    wait_in_flight(&place, 0);
    let json = place.run("status", &["--json"]);
    let value: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(value["running"], true);
    assert_eq!(value["pid"], server.child.id());
    assert_eq!(value["version"], env!("CARGO_PKG_VERSION"));

    let stop = place.run("stop", &[]);
    assert_eq!(stop.status.code(), Some(0), "{}", stderr(&stop));
    assert!(stdout(&stop).contains(&format!("stopped khived (pid {})", server.child.id())));
    assert!(server.wait().success());
    assert!(!place.socket.exists() && !place.pid_file.exists());

    let status = place.run("status", &[]);
    assert_eq!(status.status.code(), Some(3));
    let again = place.run("stop", &[]);
    assert_eq!(again.status.code(), Some(0));
    assert!(stdout(&again).contains("not running"));
}

#[test]
fn call_exit_statuses() {
    let place = Place::new();
    let unreachable = place.call("x");
    assert_eq!(unreachable.status.code(), Some(3));
    assert!(
        stderr(&unreachable).contains("daemon unreachable"),
        "{}",
        stderr(&unreachable)
    );

    let _server = place.serve(&["--namespace", "ns-a", "--config-id", "cfg-a"]);
    let ok = place.run(
        "call",
        &["--namespace", "ns-a", "--config-id", "cfg-a", "x"],
    );
    assert_eq!(ok.status.code(), Some(0), "{}", stderr(&ok));

    let namespace = place.run(
        "call",
        &["--namespace", "ns-b", "--config-id", "cfg-a", "x"],
    );
    assert_eq!(namespace.status.code(), Some(4));
    assert!(stderr(&namespace).contains(r#"this call is for "ns-b", the daemon serves "ns-a""#));

    let config = place.run(
        "call",
        &["--namespace", "ns-a", "--config-id", "cfg-b", "x"],
    );
    assert_eq!(config.status.code(), Some(4));
    assert!(stderr(&config).contains(r#"config id "cfg-b", the daemon serves "cfg-a""#));
}

#[test]
fn call_exits_75_when_the_daemon_is_busy_and_json_prints_the_response() {
    let place = Place::new();
    let _server = place.serve(&["--max-connections", "1"]);
    // The readiness probe's connection may hold the one slot for a moment: 75 until it goes.
    let deadline = Instant::now() + Duration::from_secs(10);
    let ok = loop {
        let ok = place.run("call", &["--json", "hi"]);
        if ok.status.code() != Some(75) || Instant::now() > deadline {
            break ok;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(ok.status.code(), Some(0), "{}", stderr(&ok));
    let value: serde_json::Value = serde_json::from_str(&stdout(&ok)).unwrap();
    assert_eq!(
        (value["ok"].clone(), value["result"].clone()),
        (true.into(), "hi".into())
    );
    assert_eq!(value["daemon_protocol_version"], khived::PROTOCOL_VERSION);

    let _holder = common::hold_a_slot(&place.socket);
    let busy = place.call("x");
    assert_eq!(busy.status.code(), Some(75), "{}", stderr(&busy));
    assert!(
        stderr(&busy).contains("daemon_busy: 1 connections open"),
        "{}",
        stderr(&busy)
    );
    assert_eq!(stdout(&busy), "");
    let busy = place.run("call", &["--json", "x"]);
    assert_eq!(busy.status.code(), Some(75));
    let value: serde_json::Value = serde_json::from_str(&stdout(&busy)).unwrap();
    assert_eq!(value["ok"], false);
    assert_eq!(value["error_detail"]["code"], "daemon_busy");
    assert_eq!(value["error_detail"]["disposition"], "not_committed");
    // With --spawn --replace, a daemon too busy to say what it serves is left alone: the
    // call may be retried, as above, and nothing was unreachable.
    let busy = place.run("call", &["--spawn", "--replace", "x"]);
    assert_eq!(busy.status.code(), Some(75), "{}", stderr(&busy));
    assert!(stderr(&busy).contains("daemon_busy"), "{}", stderr(&busy));
}

/// A daemon that accepts but does not answer (hung; here stopped with SIGSTOP) is named as
/// such by `call --spawn --replace`, after the call's timeout: starting another daemon
/// cannot help while it holds the PID file. Before, each step waited its own timeout, and
/// the call ended with the started daemon's failure, "pid N still holds … a daemon draining
/// there lets go once its last requests end", as if it were draining.
#[test]
fn a_hung_daemon_is_named_by_spawn_instead_of_waited_out_step_by_step() {
    let place = Place::new();
    let server = place.serve(&[]);
    let pid = rustix::process::Pid::from_raw(server.child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::STOP).unwrap();
    let call = place.run("call", &["--spawn", "--replace", "--timeout", "1", "x"]);
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::CONT);
    assert_eq!(call.status.code(), Some(3), "{}", stderr(&call));
    let said = stderr(&call);
    assert!(
        said.contains("no answer from") && said.contains("within 1s"),
        "{said}"
    );
    assert!(!said.contains("still holds"), "{said}");
}

#[test]
fn serve_refuses_to_start_twice() {
    let place = Place::new();
    let server = place.serve(&[]);
    let second = place.run("serve", &[]);
    assert_eq!(second.status.code(), Some(5));
    let expected = format!("khived: already running as pid {}", server.child.id());
    assert!(stderr(&second).contains(&expected), "{}", stderr(&second));
    assert!(
        !stderr(&second).contains("khived: khived"),
        "{}",
        stderr(&second)
    );
}

/// The PID file, created and locked by the test process as a daemon locks it: the test then
/// names in it whichever stand-in daemon it likes.
fn lock_pid_file(place: &Place) -> std::fs::File {
    let file = std::fs::File::create(&place.pid_file).unwrap();
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive).unwrap();
    file
}

/// A daemon that stopped, and whose PID file another daemon took at once (one a client's
/// `--spawn` started, or a successor), has let go: `stop` says it stopped rather than wait
/// for nobody to hold the file, report it "still running" and, with --force, SIGKILL a pid
/// that is gone, or by then another process's. Here the test process holds the PID file's
/// lock for two stand-in daemons in turn, and names the second once the first is gone.
#[test]
fn stop_sees_its_daemon_gone_when_another_takes_the_pid_file() {
    let place = Place::new();
    let file = lock_pid_file(&place);
    let mut first = Reaped(Command::new("sleep").arg("600").spawn().unwrap());
    let second = Reaped(Command::new("sleep").arg("600").spawn().unwrap());
    std::fs::write(&place.pid_file, first.0.id().to_string()).unwrap();
    let stop = place.stop_in_background(&["--timeout", "60", "--force"]);
    // SIGTERM ends it; the next daemon is in at once.
    let ended = common::wait_exit(&mut first.0, Duration::from_secs(60), String::new);
    std::fs::write(&place.pid_file, second.0.id().to_string()).unwrap();
    let stop = stop.wait_with_output().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&ended),
        Some(15),
        "{ended}"
    );
    assert_eq!(stop.status.code(), Some(0), "{}", stderr(&stop));
    assert_eq!(
        stdout(&stop).trim(),
        format!("stopped khived (pid {})", first.0.id())
    );
    assert!(
        !common::process_exited(second.0.id()),
        "the next daemon was signalled"
    );
    drop(file);
}

/// A daemon that has let go of the PID file to another (a successor) but still runs past
/// `stop`'s timeout (draining, say; here it ignores SIGTERM) is not killed by `--force`:
/// once it no longer holds the lock, its pid is not proven to be the daemon's.
#[test]
fn stop_does_not_kill_a_pid_that_let_go_of_the_pid_file() {
    let place = Place::new();
    let file = lock_pid_file(&place);
    let (ready, termed) = (
        place.dir.path().join("ready"),
        place.dir.path().join("termed"),
    );
    let mut first = Reaped(
        Command::new("sh")
            .arg("-c")
            .arg(r#"trap 'echo >> "$TERMED"' TERM; echo > "$READY"; while :; do sleep 0.05; done"#)
            .env("READY", &ready)
            .env("TERMED", &termed)
            .spawn()
            .unwrap(),
    );
    // SIGTERM before the trap is set would end it.
    common::wait_until("the stand-in to set its trap", || ready.exists());
    let second = Reaped(Command::new("sleep").arg("600").spawn().unwrap());
    std::fs::write(&place.pid_file, first.0.id().to_string()).unwrap();
    let stop = place.stop_in_background(&["--timeout", "10", "--force"]);
    common::wait_until("stop's SIGTERM", || termed.exists());
    std::fs::write(&place.pid_file, second.0.id().to_string()).unwrap();
    let stop = stop.wait_with_output().unwrap();
    let said = stderr(&stop);
    assert_eq!(stop.status.code(), Some(1), "{said}");
    assert!(
        said.contains(&format!("pid {} has let go of", first.0.id()))
            && said.contains("not killed"),
        "{said}"
    );
    assert!(
        first.0.try_wait().unwrap().is_none(),
        "the first was killed"
    );
    drop((file, second));
}

#[test]
fn stop_never_signals_a_process_named_by_a_stale_pid_file() {
    let place = Place::new();
    let mut bystander = Command::new("sleep").arg("30").spawn().unwrap();
    std::fs::write(&place.pid_file, bystander.id().to_string()).unwrap();
    let stop = place.run("stop", &["--timeout", "1"]);
    assert_eq!(stop.status.code(), Some(0));
    assert!(
        stdout(&stop).contains("stale PID file"),
        "{}",
        stdout(&stop)
    );
    // A signal sent before our SIGKILL would be the one it died of: the kernel records the
    // first fatal signal at once, however late the process gets to run.
    bystander.kill().unwrap();
    let status = bystander.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "the bystander was signalled: {status}"
    );
}

#[test]
fn eight_clients_auto_spawn_exactly_one_daemon() {
    let place = Place::new();
    let clients: Vec<_> = (0..8)
        .map(|i| {
            place
                .khived("call")
                .args(["--spawn", "--idle-timeout", "30", &format!("client {i}")])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, client) in clients.into_iter().enumerate() {
        let output = client.wait_with_output().unwrap();
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
        assert_eq!(stdout(&output), format!("client {i}\n"));
    }
    let log = std::fs::read_to_string(place.socket.with_extension("log")).unwrap();
    assert_eq!(log.matches("serving namespace").count(), 1, "{log}");
    let stop = place.run("stop", &[]);
    assert_eq!(stop.status.code(), Some(0));
}

#[test]
fn spawn_reports_a_daemon_that_dies_at_start() {
    let place = Place::new();
    // A directory where the socket should be: the daemon cannot start.
    std::fs::create_dir(&place.socket).unwrap();
    let call = place.run("call", &["--spawn", "x"]);
    assert_eq!(call.status.code(), Some(3));
    // Told that the daemon exited, not that it did not answer in time: the call did not wait
    // out its timeout.
    let message = stderr(&call);
    assert!(
        message.contains("exited (exit status: 1) before it was ready"),
        "{message}"
    );
    assert!(message.contains("is not a socket"), "{message}");
}

/// Waits until `count` workers have said they are ready.
fn wait_for_workers(server: &Server, count: usize) {
    for id in 1..=count {
        wait_for_log(server, &format!("worker {id}: worker {id} ready"));
    }
}

/// Waits until workers have said they are ready `count` times, restarts included.
fn wait_for_starts(server: &Server, count: usize) {
    common::wait_until(&format!("{count} worker starts never came"), || {
        let log = server.log();
        log.lines().filter(|line| line.ends_with(" ready")).count() >= count
    });
}

fn wait_for_log(server: &Server, needle: &str) {
    common::wait_for_text(needle, || server.log());
}

/// A worker like examples/worker.py for these verbs: `upper TEXT`, and `block`, which says
/// `worker N blocked` on stderr and answers `released` once the file `release` exists in the
/// directory it is given (the test's, which also marks its processes).
const BLOCKING_WORKER: &str = r#"
import json, os, sys, time
worker = os.environ.get("KHIVED_WORKER_ID", "?")
release = os.path.join(sys.argv[1], "release")
print(f"worker {worker} ready", file=sys.stderr, flush=True)
for line in sys.stdin:
    request = json.loads(line)
    verb, _, text = request["ops"].partition(" ")
    if verb == "block":
        print(f"worker {worker} blocked", file=sys.stderr, flush=True)
        while not os.path.exists(release):
            time.sleep(0.01)
        result = "released"
    else:
        result = text.upper()
    print(json.dumps({"id": request.get("id"), "ok": True, "result": result}), flush=True)
"#;

/// `khived serve --workers N` with [`BLOCKING_WORKER`]s, once every worker is ready.
fn serve_blocking_workers(place: &Place, workers: &str, extra: &[&str]) -> Server {
    let mut args = vec!["--workers", workers];
    args.extend_from_slice(extra);
    let dir = place.dir.path().to_str().unwrap();
    args.extend_from_slice(&["--worker", "python3", "-c", BLOCKING_WORKER, dir]);
    let server = place.serve(&args);
    wait_for_workers(&server, workers.parse().unwrap());
    server
}

/// Lets every `block` request of [`BLOCKING_WORKER`]s answer.
fn release_blocked(place: &Place) {
    std::fs::write(place.dir.path().join("release"), "").unwrap();
}

fn serve_workers(place: &Place, extra: &[&str]) -> Server {
    let mut args = vec!["--workers", "2"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[
        "--worker",
        "python3",
        WORKER,
        place.dir.path().to_str().unwrap(),
    ]);
    place.serve(&args)
}

#[test]
fn an_idle_daemon_is_back_to_two_threads() {
    let place = Place::new();
    let log = place.dir.path().join("serve.log");
    let child = place
        .khived("serve")
        .env("KHIVED_LOG", "debug")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut server = Server { child, log };
    common::wait_until_serving(&place.socket);
    for ops in ["a", "b"] {
        let call = place.call(ops);
        assert_eq!(stdout(&call), format!("{ops}\n"), "{}", stderr(&call));
    }
    // Dispatching started the watchdog; idle, it leaves, and the caller's thread and the
    // async-io helper are all there is.
    wait_for_log(&server, "the dispatch watchdog leaves");
    let tasks = format!("/proc/{}/task", server.child.id());
    let count = || std::fs::read_dir(&tasks).unwrap().count();
    let deadline = Instant::now() + Duration::from_secs(20);
    while count() != 2 {
        assert!(Instant::now() < deadline, "{} threads", count());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(place.run("stop", &[]).status.code(), Some(0));
    assert!(server.wait().success());
}

#[test]
fn worker_pool_answers_and_survives_bad_workers() {
    let place = Place::new();
    let mut server = serve_workers(&place, &["--request-timeout", "2"]);
    // The 2 s limit is for `hang`: each call below is made once its workers are ready, so
    // that no limit has to cover a worker's start on a busy machine.
    wait_for_workers(&server, 2);
    let call = place.call("upper warm");
    assert_eq!(stdout(&call), "WARM\n", "{}", stderr(&call));

    let error = place.call("nosuchverb x");
    assert_eq!(error.status.code(), Some(1));
    assert!(stderr(&error).contains("unknown verb 'nosuchverb'"));

    let crash = place.call("crash");
    assert_eq!(crash.status.code(), Some(1));
    assert!(
        stderr(&crash).contains("exited while handling the request (exit status: 3)"),
        "{}",
        stderr(&crash)
    );

    wait_for_starts(&server, 3);
    let garbage = place.call("garbage");
    assert_eq!(garbage.status.code(), Some(1));
    assert!(
        stderr(&garbage).contains("printed a line that is not a reply"),
        "{}",
        stderr(&garbage)
    );

    wait_for_starts(&server, 4);
    // The request's deadline answers the client (the message names it: no bound on the
    // elapsed time is needed); the worker stuck on it is killed and restarted by the pool.
    let hang = place.call("hang");
    assert_eq!(hang.status.code(), Some(1));
    assert!(
        stderr(&hang).contains("request timed out after 2s"),
        "{}",
        stderr(&hang)
    );
    wait_for_log(&server, "did not answer within 2s");

    wait_for_starts(&server, 5);
    // Bytes that are not UTF-8 on a worker's stderr are logged, not fatal.
    assert_eq!(stdout(&place.call("mojibake")), "logged\n");
    wait_for_log(&server, "not utf-8");

    // Restarted workers serve again.
    for _ in 0..4 {
        let call = place.call("reverse abc");
        assert_eq!(stdout(&call), "cba\n", "{}", stderr(&call));
    }
    assert!(
        server.log().contains("worker 1: worker 1 ready"),
        "stderr is logged with the id"
    );

    assert_eq!(place.run("stop", &[]).status.code(), Some(0));
    assert!(server.wait().success());
    let left = processes_mentioning(place.dir.path());
    assert!(left.is_empty(), "leftover processes: {left:?}");
}

#[test]
fn a_full_worker_queue_answers_busy() {
    let place = Place::new();
    let mut server = serve_blocking_workers(&place, "1", &["--queue", "1"]);
    let call = |ops: &str| {
        place
            .khived("call")
            .args(["--timeout", "120", ops])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // The only worker is busy until released...
    let running = call("block");
    wait_for_log(&server, "worker 1 blocked");
    // ...so of two more requests one waits in the queue of one, the other is told it is full
    // (and is done, while the worker still holds the first).
    let clients = std::cell::RefCell::new([call("upper a"), call("upper b")]);
    common::wait_until("neither was told the queue is full", || {
        clients
            .borrow_mut()
            .iter_mut()
            .any(|client| client.try_wait().unwrap().is_some())
    });
    let clients = clients.into_inner();
    release_blocked(&place);
    let outputs: Vec<Output> = clients
        .into_iter()
        .map(|client| client.wait_with_output().unwrap())
        .collect();
    let busy: Vec<&Output> = outputs
        .iter()
        .filter(|output| stderr(output).contains("daemon_busy:"))
        .collect();
    assert_eq!(busy.len(), 1, "{outputs:?}");
    assert_eq!(busy[0].status.code(), Some(75), "a retryable refusal");
    let served = outputs
        .iter()
        .find(|output| output.status.success())
        .expect("one is served");
    assert!(["A\n", "B\n"].contains(&stdout(served).as_str()));
    assert_eq!(stdout(&running.wait_with_output().unwrap()), "released\n");
    assert_eq!(place.run("stop", &[]).status.code(), Some(0));
    assert!(server.wait().success());
    assert!(processes_mentioning(place.dir.path()).is_empty());
}

#[test]
fn stop_drains_then_ends_every_worker() {
    let place = Place::new();
    let mut server = serve_blocking_workers(&place, "2", &[]);
    let slow = place
        .khived("call")
        .args(["--timeout", "120", "block"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_log(&server, "blocked");
    let stop = place.khived("stop").stdout(Stdio::piped()).spawn().unwrap();
    // The drain has begun with the request in flight; it ends once the request is answered.
    wait_for_log(&server, "listener closed, draining 1 connection(s)");
    release_blocked(&place);
    assert_eq!(stop.wait_with_output().unwrap().status.code(), Some(0));
    let output = slow.wait_with_output().unwrap();
    assert_eq!(
        stdout(&output),
        "released\n",
        "the request in flight is answered"
    );
    assert!(server.wait().success());
    let left = processes_mentioning(place.dir.path());
    assert!(left.is_empty(), "leftover processes: {left:?}");
    assert!(
        server.log().contains("worker 2: exited"),
        "{}",
        server.log()
    );
}

#[test]
fn status_reports_stale_files() {
    let place = Place::new();
    drop(std::os::unix::net::UnixListener::bind(&place.socket).unwrap());
    std::fs::write(&place.pid_file, "999999").unwrap();
    let status = place.run("status", &[]);
    assert_eq!(status.status.code(), Some(3));
    let text = stdout(&status);
    assert!(text.contains("khived is not running"), "{text}");
    assert!(text.contains("stale socket file"), "{text}");
    assert!(text.contains("stale PID file"), "{text}");
    let json = place.run("status", &["--json"]);
    let value: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(value["running"], false);
    assert_eq!(value["stale"].as_array().unwrap().len(), 2);
}

#[test]
fn log_file_receives_the_log() {
    let place = Place::new();
    let log = place.dir.path().join("daemon.log");
    let server = place.serve(&["--log-file", log.to_str().unwrap()]);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("serving namespace \"khive\""), "{text}");
    assert_eq!(server.log(), "", "nothing on standard error");
}

#[test]
fn warm_request_reaches_every_worker() {
    let place = Place::new();
    let server = serve_workers(&place, &["--warm", "upper warm"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(server.log().contains("worker 1: warmed") && server.log().contains("worker 2: warmed"))
    {
        assert!(Instant::now() < deadline, "{}", server.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process killed and reaped when the test is done with it.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A daemon whose drain waits for a worker busy for 30 s (up to `drain` seconds), and the
/// client waiting for it.
fn stuck_daemon(place: &Place, drain: &str) -> (Server, Reaped) {
    let server = serve_workers(place, &["--drain-timeout", drain]);
    wait_for_workers(&server, 2);
    let client = place
        .khived("call")
        .arg("sleep 30")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_log(&server, "sleeping 30s");
    (server, Reaped(client))
}

#[test]
fn stop_force_kills_a_daemon_stuck_in_its_drain() {
    let place = Place::new();
    let (mut server, _client) = stuck_daemon(&place, "60");
    let forced = place.run("stop", &["--timeout", "1", "--force"]);
    assert_eq!(forced.status.code(), Some(0), "{}", stderr(&forced));
    assert!(
        stdout(&forced).contains("killed khived"),
        "{}",
        stdout(&forced)
    );
    assert!(!server.wait().success());
    // Its workers die with it rather than live on as orphans.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = processes_mentioning(place.dir.path());
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "orphaned workers: {left:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn stop_says_when_the_drain_outlasts_it_and_a_second_stop_ends_it() {
    let place = Place::new();
    let (mut server, _client) = stuck_daemon(&place, "60");
    let polite = place.run("stop", &["--timeout", "1"]);
    assert_eq!(polite.status.code(), Some(1));
    let message = stderr(&polite);
    assert!(
        message.contains("still running after 1s; use --force"),
        "{message}"
    );
    // A second SIGTERM during the drain ends the daemon at once.
    let again = place.run("stop", &["--timeout", "5"]);
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    assert_eq!(server.wait().code(), Some(128 + 15));
    assert!(!place.socket.exists() && !place.pid_file.exists());
}

/// A worker in sh, given the test's directory as `$1`: `bg` starts a process that sleeps
/// (its pid goes to the file `bg`), `hold` says `holding` on stderr and answers once the file
/// `release` exists.
const GROUP_WORKER: &str = r#"
while read -r line; do
    case "$line" in
    *'"ops":"bg"'*)
        sleep 1000 &
        echo "$!" > "$1/bg"
        echo '{"ok":true,"result":"started"}' ;;
    *'"ops":"hold"'*)
        echo holding >&2
        while [ ! -e "$1/release" ]; do sleep 0.01; done
        echo '{"ok":true,"result":"held"}' ;;
    esac
done
"#;

#[test]
fn a_forced_stop_leaves_no_process_a_worker_started() {
    let place = Place::new();
    let dir = place.dir.path().to_str().unwrap();
    let args = [
        "--workers",
        "2",
        "--worker",
        "sh",
        "-c",
        GROUP_WORKER,
        "worker",
        dir,
    ];
    let mut server = place.serve(&args);
    let started = place.call("bg");
    assert_eq!(stdout(&started), "started\n", "{}", stderr(&started));
    let bg: u32 = std::fs::read_to_string(place.dir.path().join("bg"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        !common::process_exited(bg),
        "the worker's child {bg} is not running"
    );

    // A request in flight holds the drain up, so that a second SIGTERM forces the stop.
    let _held = Reaped(place.call_in_background(&["--timeout", "120", "hold"]));
    wait_for_log(&server, "holding");
    let term = || {
        let pid = rustix::process::Pid::from_raw(server.child.id() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    };
    term();
    wait_for_log(&server, "draining 1 connection(s)");
    term();
    assert_eq!(server.wait().code(), Some(128 + 15), "{}", server.log());

    // `shut_down` did not run, and the pool's drop killed the workers' process groups.
    common::wait_until(
        &format!("the worker's child {bg} outlived a forced stop"),
        || common::process_exited(bg),
    );
    let left = processes_mentioning(place.dir.path());
    assert!(left.is_empty(), "leftover processes: {left:?}");
}

#[test]
fn a_worker_that_cannot_start_fails_requests_at_once() {
    let place = Place::new();
    let _server = place.serve(&["--worker", "/nonexistent/worker"]);
    let call = place.call("x");
    assert_eq!(call.status.code(), Some(1));
    // Why no worker runs, not a timeout: the request was failed at once.
    let message = stderr(&call);
    assert!(
        message.contains("no worker is running: worker 1 cannot start"),
        "{message}"
    );
}

// Linux only: the test sees the spawner look at the PID file through inotify.
#[cfg(target_os = "linux")]
#[test]
fn spawn_waits_for_a_daemon_that_is_draining() {
    let place = Place::new();
    // The drain ends when the test lets the request in flight go, not at a deadline.
    let mut old = serve_blocking_workers(&place, "2", &["--drain-timeout", "600"]);
    let held = place
        .khived("call")
        .args(["--timeout", "120", "block"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_log(&old, "blocked");
    // The old daemon drains: its listener is closed, but it holds the PID file.
    let stop = place.run("stop", &["--timeout", "0.2"]);
    assert_eq!(stop.status.code(), Some(1), "{}", stderr(&stop));
    let reads = common::FileReads::watch(&place.pid_file);
    let call = place.call_in_background(&["--spawn", "--timeout", "120", "after the old one"]);
    // The daemon it starts finds the old one there and exits; the call then waits for the
    // old one to let go of the PID file, looking at it every few milliseconds. Seen looking
    // after that message, it is in that wait, for as long as its --timeout.
    let spawn_log = place.dir.path().join("k.log");
    let already = format!("already running as pid {}", old.child.id());
    common::wait_for_text(&already, || common::read_log(&spawn_log));
    reads.take();
    reads.wait("the call never waited for the old daemon");
    // The drain outlasts `Spawn`'s default of 5 s, counted from before the call was seen
    // waiting, which the call waited for before it took its --timeout: only a longer wait
    // passes.
    std::thread::sleep(Duration::from_secs(6));
    release_blocked(&place);
    assert_eq!(stdout(&held.wait_with_output().unwrap()), "released\n");
    let call = call.wait_with_output().unwrap();
    assert_eq!(call.status.code(), Some(0), "{}", stderr(&call));
    assert_eq!(stdout(&call), "after the old one\n");
    assert!(old.wait().success(), "{}", old.log());
    assert_eq!(place.run("stop", &[]).status.code(), Some(0));
}

#[test]
fn spawn_starts_again_when_the_drain_ends_as_its_daemon_gives_up() {
    let place = Place::new();
    // A daemon draining, as far as a spawner can tell: the PID file locked, naming a live
    // process (this one), and nothing answering on the socket.
    std::fs::write(&place.pid_file, format!("{}\n", std::process::id())).unwrap();
    let holder = std::fs::File::open(&place.pid_file).unwrap();
    rustix::fs::flock(
        &holder,
        rustix::fs::FlockOperation::NonBlockingLockExclusive,
    )
    .unwrap();
    let call = place.call_in_background(&["--spawn", "--timeout", "120", "after the drain"]);
    // The daemon it started gives up, and the drain ends at once: at times before the call
    // has looked at the PID file again, which then finds it free (the case this is about;
    // before the call remembered the drain it had seen, it failed then: 1 run in 6 here),
    // at other times while it waits for it.
    let spawn_log = place.dir.path().join("k.log");
    let already = format!("already running as pid {}", std::process::id());
    common::wait_for_text(&already, || common::read_log(&spawn_log));
    drop(holder);
    let call = call.wait_with_output().unwrap();
    assert_eq!(call.status.code(), Some(0), "{}", stderr(&call));
    assert_eq!(stdout(&call), "after the drain\n");
    assert_eq!(place.run("stop", &[]).status.code(), Some(0));
}

/// Waits until `khived status` reports `count` connections in flight: connections that
/// clients have closed are let go of by the daemon soon, not at once.
fn wait_in_flight(place: &Place, count: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let output = place.run("status", &["--json"]);
        let value: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        if value["in_flight"] == count {
            // The text form says so too; the probe above may still hold a slot for a moment
            // (a cap of 2 then refuses this one as busy): asked again until answered.
            loop {
                let text = stdout(&place.run("status", &[]));
                if !text.contains("daemon_busy") {
                    assert!(text.contains(&format!("in flight:  {count}")), "{text}");
                    return;
                }
                assert!(Instant::now() < deadline, "{text}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        assert!(Instant::now() < deadline, "in flight: {value}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---- CLI conventions ----------------------------------------------------------------------

#[test]
fn help_of_a_command_and_usage_errors_point_to_it() {
    let khived = |args: &[&str]| Command::new(KHIVED).args(args).output().unwrap();
    for command in ["serve", "start", "restart", "call", "status", "stop"] {
        let help = khived(&["help", command]);
        assert_eq!(help.status.code(), Some(0), "{command}");
        assert_eq!(
            help.stdout,
            khived(&[command, "--help"]).stdout,
            "{command}"
        );
        assert!(
            stdout(&help).contains(&format!("Usage: khived {command}")),
            "{command}"
        );
    }
    assert_eq!(khived(&["help"]).stdout, khived(&["--help"]).stdout);

    let usage = khived(&["status", "--bogus"]);
    assert_eq!(usage.status.code(), Some(2));
    assert!(
        stderr(&usage).contains("Try 'khived status --help'."),
        "{}",
        stderr(&usage)
    );
    for (typo, meant) in [("stauts", "status"), ("sevre", "serve"), ("cal", "call")] {
        let unknown = khived(&[typo]);
        assert_eq!(unknown.status.code(), Some(2));
        let text = stderr(&unknown);
        assert!(text.contains(&format!("did you mean '{meant}'?")), "{text}");
        assert!(text.contains("Try 'khived --help'."), "{text}");
    }
    let far = khived(&["frobnicate"]);
    assert_eq!(far.status.code(), Some(2));
    assert!(!stderr(&far).contains("did you mean"), "{}", stderr(&far));
    let help_typo = khived(&["help", "stpo"]);
    assert_eq!(help_typo.status.code(), Some(2));
    assert!(stderr(&help_typo).contains("did you mean 'stop'?"));
}

#[test]
fn numeric_options_out_of_range_are_usage_errors() {
    let place = Place::new();
    let _server = place.serve(&[]);
    let cases: &[(&str, &[&str])] = &[
        ("stop", &["--timeout", "1e19"]),
        ("stop", &["--timeout", "inf"]),
        ("stop", &["--timeout", "NaN"]),
        ("stop", &["--timeout", "-1"]),
        ("status", &["--timeout", "1e300"]),
        ("call", &["--timeout", "1e19", "x"]),
        ("serve", &["--queue", "100000000000"]),
        ("serve", &["--queue", "18446744073709551615"]),
        ("serve", &["--queue", "0"]),
        ("serve", &["--workers", "100000000000"]),
        ("serve", &["--max-connections", "99999999999999999999999"]),
        ("serve", &["--drain-timeout", "1e19"]),
        ("serve", &["--idle-timeout", "1e19"]),
        ("serve", &["--request-timeout", "1e19"]),
        ("start", &["--timeout", "1e19"]),
        ("call", &["--spawn", "--workers", "100000000000", "x"]),
    ];
    for (command, args) in cases {
        let output = place.run(command, args);
        let text = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{command} {args:?}: {text}");
        assert!(
            text.contains("out of range") || text.contains("is not a"),
            "{command} {args:?}: {text}"
        );
        assert!(!text.contains("panicked"), "{command} {args:?}: {text}");
        assert!(
            text.contains(&format!("Try 'khived {command} --help'.")),
            "{text}"
        );
    }
    // Nothing was signalled or started: the daemon still answers.
    assert_eq!(place.call("still here").status.code(), Some(0));
}

/// A daemon started in the background by `khived start`, stopped when the test ends.
struct Detached<'a>(&'a Place);

impl Drop for Detached<'_> {
    fn drop(&mut self) {
        let _ = self.0.run("stop", &["--force", "--timeout", "10"]);
    }
}

#[test]
fn start_restart_and_stop_json() {
    let place = Place::new();
    let _cleanup = Detached(&place);
    let start = place.run("start", &[]);
    assert_eq!(start.status.code(), Some(0), "{}", stderr(&start));
    let pid: u32 = stdout(&start).trim().parse().unwrap();
    assert_eq!(common::wait_until_serving(&place.socket).pid, pid);
    // The daemon's output goes beside the socket, as `<socket stem>.log`.
    let log = place.dir.path().join("k.log");
    common::wait_for_text("serving namespace", || common::read_log(&log));

    let again = place.run("start", &[]);
    assert_eq!(again.status.code(), Some(5));
    assert!(
        stderr(&again).contains(&format!("khived: already running as pid {pid}")),
        "{}",
        stderr(&again)
    );

    let restart = place.run("restart", &["--namespace", "renamed"]);
    assert_eq!(restart.status.code(), Some(0), "{}", stderr(&restart));
    let new_pid: u32 = stdout(&restart).trim().parse().unwrap();
    assert_ne!(new_pid, pid);
    let info = common::wait_until_serving(&place.socket);
    assert_eq!((info.pid, info.namespace.as_str()), (new_pid, "renamed"));

    let stop = place.run("stop", &["--json"]);
    assert_eq!(stop.status.code(), Some(0), "{}", stderr(&stop));
    let value: serde_json::Value = serde_json::from_slice(&stop.stdout).unwrap();
    assert_eq!(value["stopped"], true);
    assert_eq!(value["was_running"], true);
    assert_eq!(value["pid"], new_pid);
    assert!(!place.pid_file.exists());

    let none = place.run("stop", &["--json"]);
    let value: serde_json::Value = serde_json::from_slice(&none.stdout).unwrap();
    assert_eq!(
        (value["stopped"].clone(), value["pid"].clone()),
        (true.into(), serde_json::Value::Null)
    );
    assert_eq!(value["was_running"], false);

    // With nothing running, restart just starts.
    let restart = place.run("restart", &[]);
    assert_eq!(restart.status.code(), Some(0), "{}", stderr(&restart));
    let pid: u32 = stdout(&restart).trim().parse().unwrap();
    assert_eq!(common::wait_until_serving(&place.socket).pid, pid);
}

#[test]
fn call_reads_ops_from_standard_input_and_prints_json() {
    use std::io::Write;
    let place = Place::new();
    let _server = place.serve(&["--namespace", "ns"]);
    let mut call = place
        .khived("call")
        .args(["--namespace", "ns", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    call.stdin
        .take()
        .unwrap()
        .write_all(b"line one\nline two\n")
        .unwrap();
    let output = call.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(stdout(&output), "line one\nline two\n");

    let json = place.run("call", &["--json", "--namespace", "ns", "hi"]);
    assert_eq!(json.status.code(), Some(0));
    let value: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(value["ok"], true);
    assert_eq!(value["result"], "hi");
    assert_eq!(value["served_config_id"], "");

    let mismatch = place.run("call", &["--json", "--namespace", "other", "hi"]);
    assert_eq!(mismatch.status.code(), Some(4));
    let value: serde_json::Value = serde_json::from_slice(&mismatch.stdout).unwrap();
    assert_eq!(value["namespace_mismatch"], true);
}

#[test]
fn the_worker_command_comes_after_dashes() {
    let place = Place::new();
    let _cleanup = Detached(&place);
    let marker = place.dir.path().to_str().unwrap();
    // `--worker` takes the rest of the line: OPS after it is a usage error showing the form.
    let wrong = place.run(
        "call",
        &["--spawn", "--worker", "python3", WORKER, "upper hi"],
    );
    assert_eq!(wrong.status.code(), Some(2));
    assert!(
        stderr(&wrong).contains("khived call --spawn 'upper hi' -- python3 examples/worker.py"),
        "{}",
        stderr(&wrong)
    );
    assert!(!place.socket.exists(), "nothing was started");

    let call = place.run(
        "call",
        &["--spawn", "upper hi", "--", "python3", WORKER, marker],
    );
    assert_eq!(call.status.code(), Some(0), "{}", stderr(&call));
    assert_eq!(stdout(&call), "HI\n");
    let stop = place.run("stop", &[]);
    assert_eq!(stop.status.code(), Some(0), "{}", stderr(&stop));

    // `serve` takes the same form, and `--worker --` too.
    for form in [&["--"][..], &["--worker", "--"][..]] {
        let mut args = vec!["--workers", "2"];
        args.extend_from_slice(form);
        args.extend_from_slice(&["python3", WORKER, marker]);
        let mut server = place.serve(&args);
        let call = place.call("upper hello");
        assert_eq!(stdout(&call), "HELLO\n", "{form:?}: {}", server.log());
        server.child.kill().unwrap();
        server.child.wait().unwrap();
    }
}

#[test]
fn status_tells_busy_and_not_answering_from_not_running() {
    use std::io::Write;
    let place = Place::new();
    // A connection the last call closed can hold a slot for a moment (the daemon sees the
    // hang-up soon, not at once), and the cap here is 2: a call refused as busy for that
    // alone is asked again. With both slots held, busy is the answer every time.
    const BUSY: i32 = 75;
    let ask = |args: &[&str], held: usize| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let output = place.run("status", args);
            if output.status.code() != Some(BUSY) || held == 2 {
                return output;
            }
            assert!(Instant::now() < deadline, "{}", stdout(&output));
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let status = |args: &[&str], held: usize| {
        let output = ask(args, held);
        let json = ask(&[args, &["--json"]].concat(), held);
        let value: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
        assert_eq!(json.status.code(), output.status.code());
        (output.status.code().unwrap(), stdout(&output), value)
    };

    let (code, text, value) = status(&[], 0);
    assert_eq!(code, 3, "{text}");
    assert!(text.contains("khived is not running"), "{text}");
    assert_eq!(value["state"], "not_running");

    let mut server = place.serve(&["--max-connections", "2"]);
    let pid = server.child.id();
    // A connection the daemon has accepted (it answered on it), held open. Connections that
    // earlier status calls closed may still hold a slot for a moment: try again until then.
    let hold = || {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut stream = std::os::unix::net::UnixStream::connect(&place.socket).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            let probe = serde_json::to_vec(&khived::Request::probe()).unwrap();
            // A refused connection may be closed before our write: its reply is read anyway.
            let _ = stream.write_all(&common::frame(&probe));
            let response = common::read_response(&mut stream).unwrap();
            if response.ok {
                return stream;
            }
            assert!(Instant::now() < deadline, "never admitted: {response:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let first = hold();
    // The held connection counts; the status probe's own does not (with it, the count would
    // be 2, the cap, and the probe refused).
    wait_in_flight(&place, 1);
    let (code, text, value) = status(&[], 1);
    assert_eq!(code, 0, "{text}");
    assert_eq!(value["state"], "answering");

    let second = hold();
    let (code, text, value) = status(&[], 2);
    assert_eq!(code, 75, "{text}");
    assert!(text.contains("khived is running but busy"), "{text}");
    assert!(text.contains("daemon_busy"), "{text}");
    assert!(text.contains(&format!("pid:        {pid}")), "{text}");
    assert_eq!(value["state"], "busy");
    assert_eq!(value["running"], true);
    assert_eq!(value["pid"], pid);
    drop((first, second));

    // Stopped with SIGSTOP: the socket accepts, the PID file is held, nothing answers.
    let signal = |signal| {
        let pid = rustix::process::Pid::from_raw(pid as i32).unwrap();
        rustix::process::kill_process(pid, signal).unwrap();
    };
    signal(rustix::process::Signal::STOP);
    let (code, text, value) = status(&["--timeout", "1"], 0);
    signal(rustix::process::Signal::CONT);
    assert_eq!(code, 7, "{text}");
    assert!(text.contains("khived is not answering"), "{text}");
    assert!(text.contains(&format!("pid:        {pid}")), "{text}");
    assert!(!text.contains("not running"), "{text}");
    assert_eq!(value["state"], "not_answering");
    assert_eq!(value["running"], true);
    assert_eq!(value["pid"], pid);

    // Running again once continued (its held connections may take a moment to close).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let output = place.run("status", &[]);
        if output.status.code() == Some(0) {
            break;
        }
        assert!(Instant::now() < deadline, "{}", stdout(&output));
        std::thread::sleep(Duration::from_millis(20));
    }
    let stop = place.run("stop", &[]);
    assert_eq!(stop.status.code(), Some(0), "{}", stderr(&stop));
    assert!(server.wait().success());
    let (code, _, value) = status(&[], 0);
    assert_eq!((code, value["state"].as_str()), (3, Some("not_running")));
}

#[test]
fn log_level_from_the_environment_and_the_command_line() {
    let cases: &[(&str, &[&str], bool)] = &[
        // (KHIVED_LOG, serve options, whether info lines appear)
        ("", &[], true),
        ("WARN", &[], false),
        ("Warn", &["-v"], true),
        ("", &["-q"], false),
        ("error", &["--verbose", "--verbose"], true),
        ("loud", &[], true),
    ];
    for (env, args, info) in cases {
        let place = Place::new();
        let log = place.dir.path().join("serve.log");
        let mut child = place
            .khived("serve")
            .args(*args)
            .env("KHIVED_LOG", env)
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        common::wait_until_serving(&place.socket);
        let text = common::read_log(&log);
        assert_eq!(
            text.contains("INFO serving namespace"),
            *info,
            "KHIVED_LOG={env:?} {args:?}:\n{text}"
        );
        if *env == "loud" {
            assert!(
                text.contains(r#"WARN KHIVED_LOG="loud" is not a log level"#),
                "{text}"
            );
        }
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

#[test]
fn debug_level_logs_one_line_per_request() {
    let place = Place::new();
    let server = place.serve(&["-v"]);
    assert_eq!(place.call("hello").status.code(), Some(0));
    let mismatch = place.run("call", &["--namespace", "other", "x"]);
    assert_eq!(mismatch.status.code(), Some(4));
    wait_for_log(&server, "namespace \"other\", namespace_mismatch in");
    let log = server.log();
    assert!(
        log.contains("DEBUG request: ") && log.contains("bytes, namespace \"khive\", ok in"),
        "{log}"
    );
}

#[test]
fn a_request_over_the_frame_limit_is_a_usage_error_before_anything_starts() {
    use std::io::Write;
    // OPS over the limit, and OPS under it that the request's JSON around it takes over.
    for ops_len in [khived::MAX_FRAME_BYTES + 1, khived::MAX_FRAME_BYTES - 10] {
        let place = Place::new();
        // --spawn with a worker that would start: nothing may be started for a request that
        // cannot be sent.
        let mut call = place
            .khived("call")
            .args(["--spawn", "-", "--", "sh", "-c", "exit 9"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The call may exit (having read it all) before the write returns.
        let _ = call.stdin.take().unwrap().write_all(&vec![b'x'; ops_len]);
        let output = call.wait_with_output().unwrap();
        let text = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{text}");
        assert!(
            text.contains("cannot send this request: frame too large: "),
            "{text}"
        );
        assert!(text.contains("send less OPS per call"), "{text}");
        assert!(!place.socket.exists() && !place.pid_file.exists());
        assert!(
            !place.dir.path().join("k.log").exists(),
            "nothing was spawned"
        );
    }
}

/// A field of `/proc/PID/status`, in KiB.
#[cfg(target_os = "linux")]
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|line| line.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A burst of large requests through the worker pool, answered and read: once its clients
/// are gone, the daemon's memory is back near where it started. The pool's own buffers (the
/// request's copy, the line to the worker, its reply as it is read) are outside the frame
/// memory budget; before they were given back the daemon kept about 100 MiB after such a
/// burst, for good.
#[cfg(target_os = "linux")]
#[test]
fn memory_goes_back_after_a_burst_through_the_worker_pool() {
    use std::io::Write;
    const CLIENTS: usize = 24;
    // Well within the issue's goal (32 MiB): after the fix about 1 MiB stays.
    const LEFT_KIB: u64 = 16 * 1024;
    let place = Place::new();
    let server = serve_workers(&place, &["--namespace", "test", "--config-id", "cfg-1"]);
    wait_for_workers(&server, 2);
    let pid = server.child.id();
    let before = status_kib(pid, "VmRSS:");

    // Each client pipelines two 4 MiB requests, then reads both answers.
    let texts: Vec<String> = (0..CLIENTS)
        .map(|i| char::from(b'a' + i as u8).to_string().repeat(4 << 20))
        .collect();
    std::thread::scope(|scope| {
        for text in &texts {
            let socket = &place.socket;
            scope.spawn(move || {
                let ops = format!("lower {text}");
                let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(300)))
                    .unwrap();
                let mut frames = khived::encode_frame(&common::request(&ops))
                    .unwrap()
                    .into_bytes();
                frames.extend_from_within(..);
                let mut writer = stream.try_clone().unwrap();
                let write = std::thread::spawn(move || writer.write_all(&frames).unwrap());
                for _ in 0..2 {
                    let response = common::read_response(&mut stream).unwrap();
                    assert!(response.ok, "{:?}", response.error);
                    assert!(response.result.as_deref() == Some(text.as_str()));
                }
                write.join().unwrap();
            });
        }
    });
    // The burst did reach the daemon's memory: the check below is not vacuous.
    let peak = status_kib(pid, "VmHWM:").saturating_sub(before);
    assert!(peak > 64 * 1024, "peak only {peak} KiB above the start");

    // Once every connection has ended, the memory goes back (at once: no timer is involved,
    // the deadline only keeps a failure from hanging the test).
    common::wait_for_in_flight(&place.socket, "the clients never left", |n| n == 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut after = status_kib(pid, "VmRSS:").saturating_sub(before);
    while after >= LEFT_KIB && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        after = status_kib(pid, "VmRSS:").saturating_sub(before);
    }
    eprintln!("RSS {before} KiB before, peak +{peak} KiB, +{after} KiB after the burst");
    assert!(after < LEFT_KIB, "{after} KiB still held after the burst");
}
