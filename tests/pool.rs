//! `khived::pool` through the library's API: a daemon on a thread of the test process, real
//! worker processes, requests over a real socket.

mod common;

use std::path::PathBuf;
use std::pin::pin;
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_io::Timer;
use common::{temp_dir, wait_until_serving};
use futures_lite::future;
use khived::pool::{Pool, PoolOptions};
use khived::{Client, Config, Daemon, Dispatch, Request, Response, ShutdownHandle};

const WORKER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/worker.py");

/// A worker small enough to read here: `pid` answers its process id, `env` the variables a
/// pool sets, `first` the first ops it was ever sent (the warm request, if any).
const TINY_WORKER: &str = r#"
import json, os, sys
seen = []
for line in sys.stdin:
    ops = json.loads(line)["ops"]
    seen.append(ops)
    if ops == "pid":
        reply = {"ok": True, "result": str(os.getpid())}
    elif ops == "env":
        reply = {"ok": True, "result": os.environ["POOL_TEST"] + "/" + os.environ["KHIVED_WORKER_ID"]}
    elif ops == "first":
        reply = {"ok": True, "result": seen[0]}
    else:
        reply = {"ok": False, "error": "unknown ops " + ops}
    print(json.dumps(reply), flush=True)
"#;

/// A daemon serving a pool, on a thread of this process.
struct PoolDaemon {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    stop: ShutdownHandle,
    thread: Option<JoinHandle<Result<khived::Stopped, khived::Error>>>,
}

impl PoolDaemon {
    fn start(options: PoolOptions) -> PoolDaemon {
        let dir = temp_dir();
        let socket = dir.path().join("run").join("khived.sock");
        let mut config = Config::at(&socket);
        config.handle_signals = false;
        let daemon = Daemon::new(config, Pool::new(options).unwrap());
        let stop = daemon.shutdown_handle();
        let thread = std::thread::spawn(move || daemon.run_blocking());
        wait_until_serving(&socket);
        PoolDaemon {
            _dir: dir,
            socket,
            stop,
            thread: Some(thread),
        }
    }

    /// Sends `ops` in the namespace and configuration the tests' pools serve.
    fn call(&self, ops: &str) -> Response {
        let mut client = Client::connect(&self.socket, Duration::from_secs(600)).unwrap();
        client.request(&Request::new(ops, "words", "v1")).unwrap()
    }

    fn ok(&self, ops: &str) -> String {
        let response = self.call(ops);
        assert!(response.ok, "{ops:?} failed: {:?}", response.error);
        response.result.unwrap()
    }

    fn error(&self, ops: &str) -> String {
        let response = self.call(ops);
        assert!(!response.ok, "{ops:?} succeeded: {:?}", response.result);
        response.error.unwrap()
    }

    /// Stops the daemon; `run` has returned, so every worker has been reaped.
    fn shutdown(mut self) -> Result<khived::Stopped, khived::Error> {
        self.stop.shutdown();
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for PoolDaemon {
    fn drop(&mut self) {
        self.stop.shutdown();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn options(command: &[&str]) -> PoolOptions {
    PoolOptions::new(command).namespace("words").config_id("v1")
}

#[test]
fn a_pool_serves_requests_and_survives_bad_workers() {
    // A limit no worker start reaches, however busy the machine (the client's deadline in
    // `call` is as long): the restarts below are waited for, not timed (a hung worker has a
    // test of its own).
    let daemon = PoolDaemon::start(
        options(&["python3", WORKER])
            .workers(2)
            .request_timeout(Duration::from_secs(600)),
    );
    assert_eq!(daemon.ok("upper hello"), "HELLO");
    assert_eq!(daemon.ok("reverse abc"), "cba");
    // A worker's error reply is the request's error; the worker lives on.
    assert_eq!(daemon.error("nope x"), "unknown verb 'nope'");

    // A worker that dies answers with its exit status and is restarted.
    let crashed = daemon.error("crash");
    assert!(
        crashed.contains("exited while handling the request") && crashed.contains("3"),
        "{crashed}"
    );
    // One that prints something else is a worker error, not a daemon crash.
    let garbage = daemon.error("garbage");
    assert!(garbage.contains("not a reply"), "{garbage}");

    // The restarted workers serve again.
    for _ in 0..4 {
        assert_eq!(daemon.ok("lower AGAIN"), "again");
    }
    let id = daemon.ok("whoami");
    assert!(id == "1" || id == "2", "worker id {id:?}");

    // Requests for another namespace never reach a worker.
    let mut client = Client::connect(&daemon.socket, Duration::from_secs(10)).unwrap();
    let response = client
        .request(&Request::new("upper x", "other", "v1"))
        .unwrap();
    assert!(response.namespace_mismatch);

    daemon.shutdown().unwrap();
}

#[test]
fn a_worker_that_hangs_past_the_request_timeout_is_killed_and_restarted() {
    let daemon = PoolDaemon::start(
        options(&["python3", WORKER])
            .workers(1)
            .request_timeout(Duration::from_secs(2)),
    );
    let hung = daemon.error("hang");
    assert!(hung.contains("did not answer within 2s"), "{hung}");
    // The one worker was killed: the next answer comes from its restart. That restart may
    // itself take longer than 2 s on a busy machine, and the request is then sent again.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let response = daemon.call("lower AGAIN");
        if response.ok {
            assert_eq!(response.result.as_deref(), Some("again"));
            break;
        }
        let error = response.error.clone().unwrap_or_default();
        let timed_out = response.error_code() == Some(khived::code::REQUEST_TIMED_OUT)
            || error.contains("did not answer within");
        assert!(timed_out, "{error}");
        assert!(
            Instant::now() < deadline,
            "no restarted worker answered: {error}"
        );
    }
    daemon.shutdown().unwrap();
}

#[test]
fn workers_get_the_environment_and_warm_request_and_are_reaped_at_shutdown() {
    let daemon = PoolDaemon::start(
        options(&["python3", "-c", TINY_WORKER])
            .env("POOL_TEST", "set by the pool")
            .warm("warm up"),
    );
    assert_eq!(daemon.ok("env"), "set by the pool/1");
    // The warm request reaches the worker before any request does.
    assert_eq!(daemon.ok("first"), "warm up");
    let pid = daemon.ok("pid");
    let running = || khived::is_process_running(pid.parse().unwrap());
    assert!(running(), "worker {pid} is not running");

    daemon.shutdown().unwrap();
    // The daemon returns only once its workers are reaped: not even a zombie is left (a
    // zombie still counts as running: signal 0 reaches it).
    assert!(!running(), "worker {pid} outlived the daemon");
}

#[test]
fn options_that_cannot_run_a_pool_are_refused_with_the_fix() {
    let refused = |options: PoolOptions| Pool::new(options).unwrap_err();

    let no_command = refused(PoolOptions::default());
    assert_eq!(no_command.kind(), std::io::ErrorKind::InvalidInput);
    assert!(
        no_command.to_string().contains("PoolOptions::new"),
        "{no_command}"
    );
    let no_workers = refused(options(&["true"]).workers(0));
    assert!(
        no_workers.to_string().contains("PoolOptions::workers"),
        "{no_workers}"
    );
    let no_queue = refused(options(&["true"]).queue(0));
    assert!(
        no_queue.to_string().contains("PoolOptions::queue"),
        "{no_queue}"
    );
}

#[test]
fn a_command_that_cannot_start_fails_requests_with_the_reason() {
    let daemon = PoolDaemon::start(options(&["/nonexistent/worker"]));
    let error = daemon.error("anything");
    assert!(
        error.contains("no worker is running: worker 1 cannot start"),
        "{error}"
    );
}

/// Writes its last words to standard error, without a newline, and exits on its first
/// request.
const LAST_WORDS_WORKER: &str = r#"
while read -r line; do
    printf 'last words of %s' "$$" >&2
    exit 3
done
"#;

/// What a worker wrote to standard error before it died (its last words, above all) reaches
/// the log before its request is answered: the pipe is read to its end, a last line
/// without a newline included, before the worker is reaped. (Twice: a third request may
/// find no worker, since this one never answers.)
#[test]
fn a_dying_workers_last_words_reach_the_log() {
    capture_logs();
    let daemon = PoolDaemon::start(options(&["sh", "-c", LAST_WORDS_WORKER]));
    for died in 1..=2 {
        let error = daemon.error("anything");
        assert!(
            error.contains("exited while handling the request"),
            "{error}"
        );
        assert_eq!(
            logged("last words of").len(),
            died,
            "worker {died}'s are not in the log"
        );
    }
}

/// Exits as it starts, with a reason on standard error.
const BROKEN_WORKER: &str = r#"
echo "cannot load the model" >&2
exit 41
"#;

/// A worker that fails twice in a row before it answers anything is one that cannot start:
/// requests fail at once with the reason (a start that was still running may take one and
/// fail it), not each after waiting for a restart, ever further apart.
#[test]
fn a_worker_that_dies_as_it_starts_fails_requests_with_the_reason() {
    capture_logs();
    let daemon = PoolDaemon::start(options(&["sh", "-c", BROKEN_WORKER]));
    let logged_once = "worker 1: exited while idle (exit status: 41); it answered nothing in \
                       2 starts in a row, so requests fail at once while it is down";
    wait_for("the second failed start", || {
        !logged(logged_once).is_empty()
    });
    assert!(!logged("worker 1: cannot load the model").is_empty());
    for _ in 0..3 {
        let error = daemon.error("anything");
        assert!(
            error.starts_with("no worker is running: worker 1 answered nothing in ")
                || error.starts_with("worker 1 answered nothing in "),
            "{error}"
        );
        assert!(
            error.contains("(exit status: 41); its standard error"),
            "{error}"
        );
    }
}

/// A pool daemon of one worker and a queue of one, whose worker holds request `ops` until
/// the test creates the file `gate` (the worker creates `gate.in` once it holds it).
struct Holding {
    _dir: tempfile::TempDir,
    daemon: std::sync::Arc<PoolDaemon>,
    gate: PathBuf,
    /// The held request's answer.
    answer: JoinHandle<Response>,
}

/// Starts the daemon of `options` (given `$GATE` and a queue of one), sends `ops` and waits
/// until the worker holds it.
fn hold(options: PoolOptions, ops: &'static str) -> Holding {
    let dir = temp_dir();
    let gate = dir.path().join("gate");
    let options = options.env("GATE", gate.as_os_str()).env("DIR", dir.path());
    let daemon = std::sync::Arc::new(PoolDaemon::start(options.queue(1)));
    let answer = {
        let daemon = std::sync::Arc::clone(&daemon);
        std::thread::spawn(move || daemon.call(ops))
    };
    wait_for("the worker to hold the first request", || {
        gate.with_extension("in").exists()
    });
    Holding {
        _dir: dir,
        daemon,
        gate,
        answer,
    }
}

/// Sends `count` requests (`next 0`, `next 1`, …) while the one worker holds a request and
/// the queue holds one more: returns once all but one are refused `daemon_busy`, with where
/// the answer of the one queued comes.
fn queue_one_of(
    daemon: &std::sync::Arc<PoolDaemon>,
    count: usize,
) -> std::sync::mpsc::Receiver<Response> {
    let (answered, answers) = std::sync::mpsc::channel();
    for i in 0..count {
        let (daemon, answered) = (std::sync::Arc::clone(daemon), answered.clone());
        std::thread::spawn(move || answered.send(daemon.call(&format!("next {i}"))).unwrap());
    }
    for _ in 1..count {
        let refused = answers.recv().unwrap();
        assert_eq!(refused.error_code(), Some("daemon_busy"), "{refused:?}");
    }
    answers
}

/// A fresh worker killed by its first request is not yet taken for one that cannot start:
/// that request fails, and the request queued behind it goes to the next worker.
#[test]
fn a_request_queued_behind_one_that_kills_a_fresh_worker_is_served() {
    let held = hold(options(&["python3", "-c", GATED_WORKER]), "poison");
    let queued = queue_one_of(&held.daemon, 2);
    std::fs::write(&held.gate, "").unwrap();
    let killed = held.answer.join().unwrap().error.unwrap();
    assert!(
        killed.contains("worker 1 exited while handling the request (exit status: 5)"),
        "{killed}"
    );
    let queued = queued.recv().unwrap();
    assert!(queued.ok, "{:?}", queued.error);
    assert!(queued.result.unwrap().starts_with("next "));
}

/// Says hello on standard error as it starts and answers every request; at the end of its
/// stdin (the daemon's stop) says goodbye there, twice (the second time without a newline),
/// before it exits.
const GOODBYE_WORKER: &str = r#"
echo "hello from $$" >&2
while read -r line; do
    echo '{"ok": true, "result": "served"}'
done
echo "goodbye from $$" >&2
printf 'last goodbye from %s' "$$" >&2
exit 7
"#;

/// At a stop the workers' stdin closes and they get the shutdown grace to exit: what they
/// write to standard error meanwhile reaches the log, and writing it does not kill them (a
/// closed pipe would: SIGPIPE).
#[test]
fn what_workers_say_as_they_stop_reaches_the_log() {
    capture_logs();
    // A grace no busy machine outlasts: they exit at once.
    let options = options(&["sh", "-c", GOODBYE_WORKER]).workers(2);
    let daemon = PoolDaemon::start(options.shutdown_grace(Duration::from_secs(600)));
    assert_eq!(daemon.ok("anything"), "served");
    wait_for("both workers' hello", || logged(": hello from ").len() == 2);
    daemon.shutdown().unwrap();
    for hello in logged(": hello from ") {
        let pid = hello.rsplit(' ').next().unwrap();
        assert_eq!(logged(&format!(": goodbye from {pid}")).len(), 1, "{pid}");
        assert_eq!(
            logged(&format!(": last goodbye from {pid}")).len(),
            1,
            "{pid}"
        );
    }
    // Each exited as it chose, not by SIGPIPE: `run` returned only once both were reaped.
    assert_eq!(
        logged("exited (exit status: 7)").len(),
        2,
        "{:?}",
        logged("exited (")
    );
}

/// A warm request is bound by the request timeout too. A worker that cannot finish it in
/// time never serves: requests fail with the reason and the fix instead of waiting in the
/// queue for a worker that is restarted for ever.
#[test]
fn a_worker_that_cannot_finish_warming_fails_requests_with_the_reason() {
    let daemon = PoolDaemon::start(
        options(&["python3", WORKER])
            .request_timeout(Duration::from_millis(300))
            .warm("hang"),
    );
    let error = daemon.error("upper x");
    assert!(
        error.contains("no worker is running: worker 1 did not finish warming: it did not answer its warm request within the request timeout (300ms); raise the timeout"),
        "{error}"
    );
}

/// Limits too long to count (`Duration::MAX`) are no limits: requests and the warm request
/// are served, and the shutdown waits for the workers to exit.
#[test]
fn limits_too_long_to_count_are_no_limits() {
    let daemon = PoolDaemon::start(
        options(&["python3", "-c", TINY_WORKER])
            .request_timeout(Duration::MAX)
            .shutdown_grace(Duration::MAX)
            .warm("warm up"),
    );
    assert_eq!(daemon.ok("first"), "warm up");
    daemon.shutdown().unwrap();
}

/// The log records of this test process (the daemons under test run in it), kept for the
/// tests that read what a daemon logged. Bounded, so that a flood cannot fill memory.
struct Capture(Mutex<Vec<String>>);

static CAPTURE: Capture = Capture(Mutex::new(Vec::new()));

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let mut records = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if records.len() < 100_000 {
            records.push(record.args().to_string());
        }
    }

    fn flush(&self) {}
}

fn capture_logs() {
    let _ = log::set_logger(&CAPTURE);
    log::set_max_level(log::LevelFilter::Info);
}

/// The captured records that contain `needle`.
fn logged(needle: &str) -> Vec<String> {
    let records = CAPTURE.0.lock().unwrap_or_else(|e| e.into_inner());
    records
        .iter()
        .filter(|record| record.contains(needle))
        .cloned()
        .collect()
}

/// Waits (generously) until `ready` holds.
fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready() {
        assert!(Instant::now() < deadline, "still waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether process `pid` (as a worker printed it) is gone.
fn is_gone(pid: &str) -> bool {
    common::process_exited(pid.parse().unwrap())
}

/// Answers with its process id; on `flood`, starts a child that writes to the worker's
/// standard error as fast as it can, until it is killed.
const FLOOD_WORKER: &str = r#"
import json, os, subprocess, sys
for line in sys.stdin:
    request = json.loads(line)
    if request["ops"] == "flood":
        subprocess.Popen(["yes", "flooding the log"], stdout=sys.stderr)
    print(json.dumps({"id": request.get("id"), "ok": True, "result": str(os.getpid())}), flush=True)
"#;

#[test]
fn a_worker_flooding_stderr_neither_stalls_the_daemon_nor_fills_its_log() {
    capture_logs();
    let daemon = PoolDaemon::start(
        options(&["python3", "-c", FLOOD_WORKER])
            .workers(2)
            .stderr_lines_per_second(20),
    );
    daemon.ok("flood");
    // While the flood goes on, the daemon's thread still answers probes and requests.
    for _ in 0..20 {
        daemon.ok("pid");
        khived::probe(&daemon.socket, Duration::from_secs(10)).unwrap();
    }
    // The excess is dropped, and the log says how much.
    let dropped = |reports: Vec<String>| -> u64 {
        reports
            .iter()
            .map(|report| {
                let count = report.split(' ').nth(2).unwrap();
                count.parse::<u64>().unwrap()
            })
            .sum()
    };
    wait_for("a report of dropped lines", || {
        dropped(logged("stderr lines dropped (more than 20 lines/s)")) > 0
    });
    let forwarded = logged("flooding the log").len() as u64;
    let dropped = dropped(logged("stderr lines dropped"));
    assert!(
        forwarded < dropped,
        "{forwarded} flood lines logged, {dropped} dropped"
    );
    daemon.shutdown().unwrap();
}

/// A worker in sh. `bg` starts a child that holds the worker's stdout and answers; `leave`
/// starts one and exits with status 3. Each child's pid goes to a file in `$PIDS`.
const ORPHANING_WORKER: &str = r#"
while read -r line; do
    case "$line" in
    *'"ops":"bg"'*)
        sleep 1000 &
        echo "$!" > "$PIDS/bg"
        echo '{"ok":true,"result":"started"}' ;;
    *'"ops":"leave"'*)
        sleep 1000 &
        echo "$!" > "$PIDS/leave"
        exit 3 ;;
    esac
done
"#;

#[test]
fn a_worker_exit_is_seen_at_once_and_its_children_do_not_outlive_it() {
    let pids = temp_dir();
    // No request timeout: only the exit itself can end the request.
    let daemon =
        PoolDaemon::start(options(&["sh", "-c", ORPHANING_WORKER]).env("PIDS", pids.path()));
    let pid = |name: &str| std::fs::read_to_string(pids.path().join(name)).unwrap();

    // The worker exits while its child still holds its stdout: the request fails with the
    // exit status all the same, and the restart kills the child.
    let error = daemon.error("leave");
    assert!(
        error.contains("exited while handling the request (exit status: 3)"),
        "{error}"
    );
    let left = pid("leave");
    wait_for("the worker's child to be killed", || is_gone(left.trim()));

    // The restarted worker serves; the child it starts dies with the pool at shutdown.
    assert_eq!(daemon.ok("bg"), "started");
    let bg = pid("bg");
    assert!(!is_gone(bg.trim()), "the child {bg} is not running");
    daemon.shutdown().unwrap();
    wait_for("the worker's child to be killed at shutdown", || {
        is_gone(bg.trim())
    });
}

/// Answers `x`, except `bye`: it starts a process that keeps its stdin and stdout open,
/// answers once the gate file is there, and exits, as a worker that recycles itself would.
const RECYCLING_WORKER: &str = r#"
while read -r line; do
    case "$line" in
    *'"ops":"bye"'*)
        # Through descriptor 3: an asynchronous command's stdin is /dev/null otherwise.
        exec 3<&0
        sleep 1000 <&3 3<&- &
        echo "$!" > "$PIDS/helper"
        while [ ! -e "$PIDS/gate" ]; do sleep 0.01; done
        echo '{"ok":true,"result":"bye"}'
        exit 0 ;;
    *) echo '{"ok":true,"result":"x"}' ;;
    esac
done
"#;

/// A worker that exits while a process it started still holds its stdin does not take the
/// next request, which is larger than a pipe holds: the pool sees the exit instead of waiting
/// for ever to write it, and the restarted worker serves the requests after it.
#[test]
fn a_request_to_a_worker_that_exited_is_not_written_for_ever() {
    let pids = temp_dir();
    // No request timeout: only the exit can end the wait.
    let daemon = PoolDaemon::start(
        options(&["sh", "-c", RECYCLING_WORKER])
            .workers(1)
            .env("PIDS", pids.path()),
    );
    let bye = {
        let socket = daemon.socket.clone();
        std::thread::spawn(move || {
            let mut client = Client::connect(&socket, Duration::from_secs(60)).unwrap();
            client.request(&Request::new("bye", "words", "v1")).unwrap()
        })
    };
    wait_for("the worker to start its helper", || {
        pids.path().join("helper").exists()
    });
    let big = {
        let socket = daemon.socket.clone();
        std::thread::spawn(move || {
            let mut client = Client::connect(&socket, Duration::from_secs(60)).unwrap();
            client.request(&Request::new("y".repeat(200_000), "words", "v1"))
        })
    };
    // The large request waits in the pool's queue behind `bye`. Its connection is open;
    // the pause gives the daemon time to read it into the queue, where the defect showed.
    // With the fix, the test passes whether it is queued by then or not.
    common::wait_for_in_flight(&daemon.socket, "both requests open", |open| open >= 2);
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(pids.path().join("gate"), "").unwrap();
    assert!(bye.join().unwrap().ok);
    let big = big.join().unwrap().expect("an answer to the large request");
    assert!(
        big.ok || big.error.as_deref().is_some_and(|e| e.contains("exited")),
        "{big:?}"
    );
    assert_eq!(daemon.ok("x"), "x");
    let helper = std::fs::read_to_string(pids.path().join("helper")).unwrap();
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(helper.trim().parse().unwrap()).unwrap(),
        rustix::process::Signal::KILL,
    );
}

/// Echoes `ops` and the request's id, except: `pid` answers its process id, `twice` prints
/// two replies at once, `stale` first answers the previous request again (echoing its id).
const TWO_REPLY_WORKER: &str = r#"
import json, os, sys
last = None
for line in sys.stdin:
    request = json.loads(line)
    ops = request["ops"]
    if ops == "pid":
        ops = str(os.getpid())
    if ops == "twice":
        # In one write, so that both lines are there by the time the first is read: without
        # an echoed id, a reply printed later can only be told apart by its timing.
        first = json.dumps({"ok": True, "result": "first"})
        second = json.dumps({"ok": True, "result": "secret of the first client"})
        os.write(1, (first + "\n" + second + "\n").encode())
    elif ops == "stale":
        sys.stdout.write(json.dumps({"id": last, "ok": True, "result": "secret again"}) + "\n")
        sys.stdout.write(json.dumps({"id": request.get("id"), "ok": True, "result": ops}) + "\n")
    else:
        sys.stdout.write(json.dumps({"id": request.get("id"), "ok": True, "result": ops}) + "\n")
    sys.stdout.flush()
    last = request.get("id")
"#;

/// Holds `gated` (or `poison`) until the file `$GATE` exists, then answers it with a second,
/// stray line in the same write (or dies, exit status 5); answers anything else with its ops.
const GATED_WORKER: &str = r#"
import json, os, sys, time
gate = os.environ["GATE"]
for line in sys.stdin:
    ops = json.loads(line)["ops"]
    if ops in ("gated", "poison"):
        open(gate + ".in", "w").close()
        while not os.path.exists(gate):
            time.sleep(0.01)
    if ops == "poison":
        sys.exit(5)
    if ops == "gated":
        first = json.dumps({"ok": True, "result": "first"})
        stray = json.dumps({"ok": True, "result": "stray"})
        os.write(1, (first + "\n" + stray + "\n").encode())
    else:
        sys.stdout.write(json.dumps({"ok": True, "result": ops}) + "\n")
        sys.stdout.flush()
"#;

/// A request taken from the queue for a worker that turns out to be out of sync (its stray
/// line is found before the request is sent) is not failed: the restarted worker gets it.
#[test]
fn a_request_taken_for_a_worker_found_out_of_sync_goes_to_the_next_one() {
    let held = hold(options(&["python3", "-c", GATED_WORKER]), "gated");
    // It is taken from the queue as soon as the worker is idle again.
    let queued = queue_one_of(&held.daemon, 3);
    std::fs::write(&held.gate, "").unwrap();
    let first = held.answer.join().unwrap();
    assert_eq!(first.result.as_deref(), Some("first"), "{:?}", first.error);
    let queued = queued.recv().unwrap();
    assert!(queued.ok, "{:?}", queued.error);
    assert!(queued.result.unwrap().starts_with("next "));
}

#[test]
fn a_reply_never_reaches_a_client_it_was_not_meant_for() {
    let daemon = PoolDaemon::start(options(&["python3", "-c", TWO_REPLY_WORKER]));
    assert_eq!(daemon.ok("hello"), "hello");
    let before = daemon.ok("pid");

    // Its second reply is not handed to the next client: the worker is out of sync and is
    // restarted. Whether it is seen while the worker idles or once the next request has been
    // taken from the queue, that request is not sent to it, and the restarted worker
    // answers it.
    assert_eq!(daemon.ok("twice"), "first");
    assert_eq!(daemon.ok("next"), "next");
    let after = daemon.ok("pid");
    assert_ne!(before, after, "the worker was not restarted");

    // A reply echoing another request's id is never taken as this request's answer.
    let error = daemon.error("stale");
    assert!(
        error.contains("is out of sync: it answered request"),
        "{error}"
    );
    assert!(!error.contains("secret"), "{error}");
    assert_eq!(daemon.ok("again"), "again");
}

/// Appends the ops of each request it gets to `$REQUESTS`; `block` answers only once the
/// file `$RELEASE` exists.
const COUNTING_WORKER: &str = r#"
import json, os, sys, time
requests = open(os.environ["REQUESTS"], "a")
if "READY" in os.environ:
    open(os.environ["READY"], "w").close()
for line in sys.stdin:
    request = json.loads(line)
    requests.write(request["ops"] + "\n")
    requests.flush()
    if request["ops"] == "block":
        while not os.path.exists(os.environ["RELEASE"]):
            time.sleep(0.01)
    print(json.dumps({"id": request.get("id"), "ok": True, "result": request["ops"]}), flush=True)
"#;

// The daemon does not yet notice a client that hangs up while its request waits, so the
// dispatch futures are dropped here by hand, as the daemon drops a connection's.
#[test]
fn queued_requests_whose_client_is_gone_are_skipped() {
    let dir = temp_dir();
    let requests = dir.path().join("requests");
    let release = dir.path().join("release");
    let pool = Pool::new(
        options(&["python3", "-c", COUNTING_WORKER])
            .env("REQUESTS", &requests)
            .env("RELEASE", &release)
            .queue(32),
    )
    .unwrap();
    let seen = || std::fs::read_to_string(&requests).unwrap_or_default();
    let block = Request::new("block", "khive", "");
    let executor = async_executor::Executor::new();
    future::block_on(executor.run(async {
        let _workers = executor.spawn(pool.warm_all());
        let busy = executor.spawn(pool.dispatch(&block));
        let deadline = Instant::now() + Duration::from_secs(30);
        while seen() != "block\n" {
            assert!(
                Instant::now() < deadline,
                "the worker never got the request"
            );
            Timer::after(Duration::from_millis(20)).await;
        }
        // 20 requests are queued behind it, and their clients hang up.
        for i in 0..20 {
            let request = Request::new(format!("abandoned {i}"), "khive", "");
            let mut pending = pin!(pool.dispatch(&request));
            assert!(future::poll_once(pending.as_mut()).await.is_none());
        }
        std::fs::write(&release, "").unwrap();
        let answered =
            |result: Result<String, khived::DispatchError>| result.map_err(|e| e.to_string());
        assert_eq!(answered(busy.await), Ok("block".to_owned()));
        let next = Request::new("next", "khive", "");
        assert_eq!(answered(pool.dispatch(&next).await), Ok("next".to_owned()));
    }));
    // The worker got the first request and the next one, none of the abandoned ones.
    assert_eq!(seen(), "block\nnext\n");
    future::block_on(pool.shut_down());
}

/// Fails its first five starts (exit status 77), so that the pool waits 1.6 s before the
/// sixth; then runs `COUNTING_WORKER`. The five exit cleanly, as a worker that recycles
/// itself does: a worker that crashed twice before it answered anything would be taken for
/// one that cannot start, and requests would fail at once instead of waiting in the queue.
const FAILS_FIVE_STARTS: &str = r#"
echo start >> "$STARTS"
[ "$(wc -l < "$STARTS")" -le 5 ] && exit 0
exec python3 -c "$COUNTING_WORKER"
"#;

#[test]
fn a_request_whose_time_runs_out_in_the_queue_is_answered_without_running() {
    capture_logs();
    let dir = temp_dir();
    let requests = dir.path().join("requests");
    let ready = dir.path().join("ready");
    let starts = dir.path().join("starts");
    let pool = Pool::new(
        options(&["sh", "-c", FAILS_FIVE_STARTS])
            .env("STARTS", &starts)
            .env("COUNTING_WORKER", COUNTING_WORKER)
            .env("REQUESTS", &requests)
            .env("RELEASE", dir.path().join("release"))
            .env("READY", &ready)
            .request_timeout(Duration::from_millis(200)),
    )
    .unwrap();
    let executor = async_executor::Executor::new();
    future::block_on(executor.run(async {
        let _workers = executor.spawn(pool.warm_all());
        // Once the fifth start has ended (no worker running after five starts), the pool
        // waits 1.6 s to start the worker again: a request sent now waits in the queue far
        // past its 200 ms.
        let deadline = Instant::now() + Duration::from_secs(30);
        let fifth_ended = || {
            let started = std::fs::read_to_string(&starts).unwrap_or_default();
            started.lines().count() == 5 && format!("{pool:?}").contains("running: 0,")
        };
        while !fifth_ended() {
            assert!(
                Instant::now() < deadline,
                "the worker did not fail five times"
            );
            Timer::after(Duration::from_millis(20)).await;
        }
        let late = pool.dispatch(&Request::new("late", "khive", "")).await;
        let error = late.unwrap_err();
        assert_eq!(error.code(), khived::code::REQUEST_TIMED_OUT, "{error}");
        assert!(error.to_string().contains("in the queue"), "{error}");
        // The worker that answered it from the queue now reads requests: one sent to it is
        // seen. A busy machine can hold the fresh worker past 200 ms; it is then restarted, and
        // the request is sent again.
        while !ready.exists() {
            assert!(Instant::now() < deadline, "the sixth start never came up");
            Timer::after(Duration::from_millis(20)).await;
        }
        loop {
            match pool.dispatch(&Request::new("next", "khive", "")).await {
                Ok(answer) => break assert_eq!(answer, "next"),
                Err(e) if e.to_string().contains("did not answer within") => {
                    assert!(Instant::now() < deadline, "no worker answered in time: {e}");
                }
                Err(e) => panic!("{e}"),
            }
        }
    }));
    // The worker never saw the request whose time had run out.
    let seen = std::fs::read_to_string(&requests).unwrap();
    assert!(
        !seen.is_empty() && seen.lines().all(|ops| ops == "next"),
        "{seen:?}"
    );
    future::block_on(pool.shut_down());
}

/// Runs `GATED_WORKER` on its first start; exits at once (status 9) on every later one.
const GATED_THEN_BROKEN: &str = r#"
echo start >> "$DIR/starts"
[ "$(wc -l < "$DIR/starts")" -ge 2 ] && exit 9
exec python3 -c "$GATED_WORKER"
"#;

/// A request carried over to the next worker (the one it was taken for was found out of sync
/// before it was sent) that then cannot warm up goes back in the queue, and is answered with
/// why no worker runs, as queued requests are: neither lost nor failed for the first one's
/// fault.
#[test]
fn a_request_carried_to_a_worker_that_cannot_warm_up_gets_the_reason() {
    let options = options(&["sh", "-c", GATED_THEN_BROKEN])
        .env("GATED_WORKER", GATED_WORKER)
        .warm("warm");
    let held = hold(options, "gated");
    let queued = queue_one_of(&held.daemon, 2);
    std::fs::write(&held.gate, "").unwrap();
    let first = held.answer.join().unwrap();
    assert_eq!(first.result.as_deref(), Some("first"), "{:?}", first.error);
    let error = queued.recv().unwrap().error.unwrap();
    assert!(
        error.starts_with("no worker is running: worker 1 did not finish warming: "),
        "{error}"
    );
    assert!(error.contains("(exit status: 9)"), "{error}");
}

/// The daemon's executor runs on threads that come and go (runners leave when they are not
/// needed). A worker started on one of them must live on when that thread leaves: on Linux
/// a parent-death signal follows the thread that forked the child, not the process.
#[test]
#[cfg(target_os = "linux")]
fn a_worker_outlives_the_thread_that_started_it() {
    let pool = Pool::new(options(&["python3", "-c", TINY_WORKER])).unwrap();
    let executor = async_executor::Executor::new();
    let _workers = executor.spawn(pool.warm_all());
    let request = Request::new("pid", "words", "v1");
    let pid = || pool.dispatch(&request);
    // Only this thread runs the executor so far: the worker starts on it.
    let (first, thread) = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let thread = std::fs::read_link("/proc/thread-self").unwrap();
                (future::block_on(executor.run(pid())).unwrap(), thread)
            })
            .join()
            .unwrap()
    });
    // Gone from /proc once the kernel has finished its exit, signals to children included.
    wait_for("the thread to leave", || {
        !PathBuf::from("/proc").join(&thread).exists()
    });
    let second = future::block_on(executor.run(pid()));
    assert_eq!(second.map_err(|e| e.to_string()), Ok(first));
    future::block_on(pool.shut_down());
}
