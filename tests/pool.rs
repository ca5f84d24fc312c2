//! `khived::pool` through the library's API: a daemon on a thread of the test process, real
//! worker processes, requests over a real socket.

mod common;

use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::Duration;

use common::{temp_dir, wait_until_serving};
use khived::pool::{Pool, PoolOptions};
use khived::{Client, Config, Daemon, Request, Response, ShutdownHandle};

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
        let mut client = Client::connect(&self.socket, Duration::from_secs(10)).unwrap();
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
    let daemon = PoolDaemon::start(
        options(&["python3", WORKER])
            .workers(2)
            .request_timeout(Duration::from_secs(2)),
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
    // One that hangs past the request timeout is killed and restarted.
    let hung = daemon.error("hang");
    assert!(hung.contains("did not answer within 2s"), "{hung}");
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
