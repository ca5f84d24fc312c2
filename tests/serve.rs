//! The request path, over real sockets, with the daemon on a thread of the test process.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{frame, is_closed, raw_exchange, read_response, request, InProcess, CONFIG_ID};
use khived::{Request, MAX_FRAME_BYTES};

/// The `gate` request's counter and switch (see [`common::TestDispatch`]).
fn gate_of(dispatch: &common::TestDispatch) -> (Arc<AtomicUsize>, Arc<AtomicBool>) {
    (
        Arc::clone(&dispatch.at_gate),
        Arc::clone(&dispatch.gate_open),
    )
}

/// An embedder spawns the daemon on a multi-threaded executor: its future must stay `Send`,
/// whatever the handover adds to it. This is checked when the tests compile.
#[allow(dead_code)]
fn the_daemon_future_is_send(daemon: khived::Daemon<common::TestDispatch>) {
    fn send<T: Send>(_: T) {}
    send(daemon.run());
}

#[test]
fn round_trip() {
    let daemon = InProcess::start(|_, _| {});
    let response = daemon.client().request(&request("hello")).unwrap();
    assert!(response.ok);
    assert_eq!(response.result.as_deref(), Some("hello"));
    assert_eq!(response.error, None);
    assert_eq!(response.served_config_id.as_deref(), Some(CONFIG_ID));
    daemon.shutdown().unwrap();
}

#[test]
fn dispatcher_error_is_returned() {
    let daemon = InProcess::start(|_, _| {});
    let response = daemon
        .client()
        .request(&request("fail:no such pack"))
        .unwrap();
    assert!(!response.ok);
    assert_eq!(response.error.as_deref(), Some("no such pack"));
    assert_eq!(response.served_config_id.as_deref(), Some(CONFIG_ID));
}

#[test]
fn namespace_mismatch_is_not_dispatched() {
    let daemon = InProcess::start(|_, _| {});
    let response = daemon
        .client()
        .request(&Request::new("fail:dispatched", "other", CONFIG_ID))
        .unwrap();
    assert!(!response.ok);
    assert!(response.namespace_mismatch);
    assert!(!response.config_mismatch);
    assert_eq!(response.error, None, "nothing may be dispatched");
    assert_eq!(response.served_config_id.as_deref(), Some(CONFIG_ID));
}

#[test]
fn config_mismatch_is_not_dispatched() {
    let daemon = InProcess::start(|_, _| {});
    let response = daemon
        .client()
        .request(&Request::new("fail:dispatched", common::NAMESPACE, "cfg-2"))
        .unwrap();
    assert!(!response.ok);
    assert!(response.config_mismatch);
    assert!(!response.namespace_mismatch);
    assert_eq!(response.error, None, "nothing may be dispatched");
    assert_eq!(response.served_config_id.as_deref(), Some(CONFIG_ID));
}

#[test]
fn request_without_config_id_means_empty() {
    let daemon = InProcess::start(|_, _| {});
    let body = br#"{"ops":"x","presentation":null,"presentation_per_op":null,"namespace":"test"}"#;
    let response = raw_exchange(&mut daemon.connect_raw(), &frame(body)).unwrap();
    // The daemon's id is "cfg-1", so a request without one is a mismatch...
    assert!(response.config_mismatch);
    assert_eq!(response.served_config_id.as_deref(), Some(CONFIG_ID));
    // ...and one that sends "cfg-1" explicitly is served.
    let body = br#"{"ops":"x","namespace":"test","config_id":"cfg-1"}"#;
    let response = raw_exchange(&mut daemon.connect_raw(), &frame(body)).unwrap();
    assert!(response.ok);
}

#[test]
fn probe_reports_the_daemon() {
    let daemon = InProcess::start(|_, _| {});
    let mut client = daemon.client();
    client.request(&request("one")).unwrap();
    // Not counting the probing connection itself (nor, once it has closed, the readiness
    // probe's).
    let info = common::settled_in_flight(&mut client, 0);
    assert_eq!(info.pid, std::process::id());
    assert_eq!(info.namespace, common::NAMESPACE);
    assert_eq!(info.config_id, CONFIG_ID);
    assert_eq!(info.version, env!("CARGO_PKG_VERSION"));
    assert!(info.served >= 1);
    // A probe skips the namespace and config checks.
    let mut probe = Request::new("", "another-namespace", "another-config");
    probe.probe = true;
    let response = daemon.client().request(&probe).unwrap();
    assert!(response.ok);
    assert!(!response.namespace_mismatch && !response.config_mismatch);
}

#[test]
fn several_requests_on_one_connection_in_order() {
    let daemon = InProcess::start(|_, _| {});
    let mut client = daemon.client();
    for i in 0..20 {
        let ops = format!("request {i}");
        let response = client.request(&request(&ops)).unwrap();
        assert_eq!(response.result, Some(ops));
    }
    // Pipelined: three frames in one write, a slow one first; answers come in order.
    let mut stream = daemon.connect_raw();
    let mut bytes = Vec::new();
    for ops in ["sleep:100", "b", "c"] {
        bytes.extend(khived::encode_frame(&request(ops)).unwrap().into_bytes());
    }
    stream.write_all(&bytes).unwrap();
    for ops in ["sleep:100", "b", "c"] {
        assert_eq!(
            read_response(&mut stream).unwrap().result.as_deref(),
            Some(ops)
        );
    }
}

#[test]
fn hundred_concurrent_clients() {
    let mut gate = None;
    let daemon = InProcess::start(|_, dispatch| gate = Some(gate_of(dispatch)));
    let (at_gate, gate_open) = gate.unwrap();
    let socket = daemon.socket.clone();
    let clients: Vec<_> = (0..100)
        .map(|_| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let mut client = khived::Client::connect(&socket, Duration::from_secs(120))?;
                // Each holds its connection at the gate.
                let response = client.request(&request("gate"))?;
                assert_eq!(response.result.as_deref(), Some("gate"));
                std::io::Result::Ok(())
            })
        })
        .collect();
    // All 100 are being dispatched at once: served one after another, the first would hold
    // the others up for as long as the gate stays closed.
    common::wait_until("the 100 requests were not all at the gate at once", || {
        at_gate.load(Ordering::SeqCst) == 100
    });
    gate_open.store(true, Ordering::SeqCst);
    for client in clients {
        client.join().unwrap().unwrap();
    }
}

#[test]
fn accepting_goes_on_while_a_slow_request_runs() {
    let mut gate = None;
    let daemon = InProcess::start(|_, dispatch| gate = Some(gate_of(dispatch)));
    let (at_gate, gate_open) = gate.unwrap();
    let socket = daemon.socket.clone();
    let slow = std::thread::spawn(move || {
        let mut client = khived::Client::connect(&socket, Duration::from_secs(120)).unwrap();
        client.request(&request("gate")).unwrap()
    });
    common::wait_until("the slow request never reached the dispatcher", || {
        at_gate.load(Ordering::SeqCst) == 1
    });
    // Answered while the slow one is still held (the gate is closed until after this).
    let response = daemon.client().request(&request("quick")).unwrap();
    assert!(response.ok);
    gate_open.store(true, Ordering::SeqCst);
    assert!(slow.join().unwrap().ok);
}

#[test]
fn warm_all_runs_in_the_background() {
    let mut warming = None;
    let daemon = InProcess::start(|_, dispatch| {
        dispatch.warm_for = Duration::from_secs(30);
        warming = Some(Arc::clone(&dispatch.warming));
    });
    // Served while warm_all is still at work.
    let response = daemon.client().request(&request("warming")).unwrap();
    assert_eq!(response.result.as_deref(), Some("true"));
    // And a shutdown does not wait for warming to end: warm_all is dropped mid-way, so it
    // never says it is done (it would, after 30 s, had the shutdown waited for it).
    daemon.shutdown().unwrap();
    assert!(
        warming.unwrap().load(Ordering::SeqCst),
        "warm_all ran to its end"
    );
}

#[test]
fn bad_json_gets_an_error_reply_and_close() {
    let daemon = InProcess::start(|_, _| {});
    for body in [
        &b"not json"[..],
        br#"{"ops":1,"namespace":"test"}"#,
        br#"{"namespace":"test"}"#,
        b"{\"ops\":\"\xff\xfe\",\"namespace\":\"test\"}",
        &[b'['; 10_000][..],
    ] {
        let mut stream = daemon.connect_raw();
        let response = raw_exchange(&mut stream, &frame(body)).unwrap();
        assert!(!response.ok);
        let error = response.error.unwrap();
        assert!(error.starts_with("bad request: "), "{error}");
        assert_eq!(response.served_config_id.as_deref(), Some(CONFIG_ID));
        assert!(
            is_closed(&mut stream),
            "the stream cannot be trusted after a bad frame"
        );
    }
    // Still serving.
    assert!(daemon.client().request(&request("x")).unwrap().ok);
}

#[test]
fn oversized_header_gets_an_error_reply_without_the_body() {
    let daemon = InProcess::start(|_, _| {});
    let mut stream = daemon.connect_raw();
    let announced = (MAX_FRAME_BYTES + 1) as u32;
    let response = raw_exchange(&mut stream, &announced.to_be_bytes()).unwrap();
    assert_eq!(
        response.error.as_deref(),
        Some("frame too large: 8388609 bytes (limit 8388608)")
    );
    assert!(is_closed(&mut stream));
    assert!(daemon.client().request(&request("x")).unwrap().ok);
}

#[test]
fn frame_at_the_cap_is_read() {
    let daemon = InProcess::start(|_, _| {});
    // An `ops` so long that the request is just under the cap; the echo is too large to send.
    let overhead = serde_json::to_vec(&request("")).unwrap().len();
    let ops = "a".repeat(MAX_FRAME_BYTES - overhead);
    let body = serde_json::to_vec(&request(&ops)).unwrap();
    assert_eq!(body.len(), MAX_FRAME_BYTES);
    let mut stream = daemon.connect_raw();
    let response = raw_exchange(&mut stream, &frame(&body)).unwrap();
    let error = response.error.unwrap();
    assert!(error.starts_with("response too large: "), "{error}");
    assert!(error.ends_with("(limit 8388608)"), "{error}");
}

#[test]
fn truncated_frames_get_an_error_reply() {
    let daemon = InProcess::start(|_, _| {});
    let body = serde_json::to_vec(&request("x")).unwrap();
    let whole = frame(&body);
    for (cut, expected) in [(2, "frame header (2 of 4 bytes)"), (10, "frame body (6 of")] {
        let mut stream = daemon.connect_raw();
        stream.write_all(&whole[..cut]).unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        let error = read_response(&mut stream).unwrap().error.unwrap();
        assert!(
            error.starts_with("bad request: connection closed inside"),
            "{error}"
        );
        assert!(error.contains(expected), "{error}");
    }
    assert!(daemon.client().request(&request("x")).unwrap().ok);
}

#[test]
fn panicking_dispatcher_gets_an_error_reply() {
    let daemon = InProcess::start(|_, _| {});
    let mut client = daemon.client();
    let response = client.request(&request("panic")).unwrap();
    assert!(!response.ok);
    assert_eq!(
        response.error.as_deref(),
        Some("dispatcher panicked: asked to panic")
    );
    // The same connection, and the daemon, keep serving, and nothing is counted twice.
    assert!(client.request(&request("after")).unwrap().ok);
    common::settled_in_flight(&mut client, 0);
}

#[test]
fn files_are_private_and_removed_on_shutdown() {
    let daemon = InProcess::start(|_, _| {});
    let dir = daemon.socket.parent().unwrap().to_owned();
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&daemon.socket), 0o600);
    assert_eq!(mode(&daemon.pid_file), 0o600);
    let pid = std::fs::read_to_string(&daemon.pid_file).unwrap();
    assert_eq!(pid.trim(), std::process::id().to_string());
    let (socket, pid_file) = (daemon.socket.clone(), daemon.pid_file.clone());
    daemon.shutdown().unwrap();
    assert!(!socket.exists());
    assert!(!pid_file.exists());
}

#[test]
fn shutdown_finishes_a_request_in_flight_and_closes_idle_connections() {
    let mut gate = None;
    let daemon = InProcess::start(|config, dispatch| {
        // The drain ends with the slow request, never at its deadline here.
        config.drain_timeout = Duration::from_secs(600);
        gate = Some(gate_of(dispatch));
    });
    let (at_gate, gate_open) = gate.unwrap();
    let mut idle = daemon.connect_raw();
    idle.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let first = khived::encode_frame(&request("first")).unwrap();
    assert!(raw_exchange(&mut idle, first.as_bytes()).unwrap().ok);
    let socket = daemon.socket.clone();
    let slow = std::thread::spawn(move || {
        let mut client = khived::Client::connect(&socket, Duration::from_secs(120)).unwrap();
        client.request(&request("gate")).unwrap()
    });
    common::wait_until("the slow request never reached the dispatcher", || {
        at_gate.load(Ordering::SeqCst) == 1
    });
    let stopping = std::thread::spawn(move || daemon.shutdown());
    // The idle connection is closed at once, while the slow request is still held.
    let mut byte = [0; 1];
    assert_eq!(
        std::io::Read::read(&mut idle, &mut byte).unwrap(),
        0,
        "the idle connection is closed"
    );
    assert!(
        !stopping.is_finished(),
        "the drain waits for the slow request"
    );
    gate_open.store(true, Ordering::SeqCst);
    let response = slow.join().unwrap();
    assert_eq!(response.result.as_deref(), Some("gate"));
    // The slow request finished within the drain.
    common::wait_until("the drain never ended", || stopping.is_finished());
    assert_eq!(stopping.join().unwrap().unwrap(), khived::Stopped::Drained);
}

#[test]
fn idle_shutdown_stops_a_daemon_nobody_uses() {
    // Long enough for the held client below to connect after the start's probe has left,
    // on a busy machine.
    const IDLE: Duration = Duration::from_secs(3);
    let mut gate = None;
    let daemon = InProcess::start(|config, dispatch| {
        config.idle_shutdown = Some(IDLE);
        gate = Some(gate_of(dispatch));
    });
    let (at_gate, gate_open) = gate.unwrap();
    // A request held longer than the idle period does not count as idle.
    let socket = daemon.socket.clone();
    let held = std::thread::spawn(move || {
        let mut client = khived::Client::connect(&socket, Duration::from_secs(120)).unwrap();
        client.request(&request("gate")).unwrap()
    });
    common::wait_until("the held request never reached the dispatcher", || {
        at_gate.load(Ordering::SeqCst) == 1
    });
    // The daemon's own clock passes the idle period while it holds the request: this one
    // is answered by a timer of the same reactor that runs the idle timer, set later and
    // for longer.
    let wait = format!("sleep:{}", (IDLE + Duration::from_millis(500)).as_millis());
    assert!(daemon.client().request(&request(&wait)).unwrap().ok);
    // Still serving: a daemon that had taken itself for idle would have closed its
    // listener.
    assert!(daemon.client().request(&request("still here")).unwrap().ok);
    let released = Instant::now();
    gate_open.store(true, Ordering::SeqCst);
    assert_eq!(held.join().unwrap().result.as_deref(), Some("gate"));
    // Once nobody is connected, it stops after the idle period.
    let socket = daemon.socket.clone();
    common::wait_until("still running", || !socket.exists());
    assert!(
        released.elapsed() >= IDLE,
        "stopped {:?} after the last request",
        released.elapsed()
    );
    daemon.shutdown().unwrap();
}

#[test]
fn run_says_when_the_drain_timed_out() {
    let mut dispatched = None;
    let daemon = InProcess::start(|config, dispatch| {
        config.drain_timeout = Duration::from_millis(300);
        dispatched = Some(dispatch.dispatched.clone());
    });
    let dispatched = dispatched.unwrap();
    let socket = daemon.socket.clone();
    let _slow = std::thread::spawn(move || {
        let mut client = khived::Client::connect(&socket, Duration::from_secs(120)).unwrap();
        client.request(&request("sleep:60000"))
    });
    // The slow request is in flight once the dispatcher has it: a probe's count of open
    // connections could still include the readiness probe's, and the shutdown would then
    // race the slow client's connect.
    common::wait_until("the slow request never reached the dispatcher", || {
        dispatched.load(Ordering::SeqCst) == 1
    });
    let stopped = daemon.shutdown().unwrap();
    assert_eq!(stopped, khived::Stopped::DrainTimedOut);
    assert_eq!(stopped.exit_code(), 0);
}

/// An embedder may drop the daemon's future before it ends (a `select`, a cancelled task):
/// its connections are closed then, not left open and unanswered, and its files removed.
/// (The accept loop, a task of the daemon's executor, used to hold that executor: dropping
/// the future kept both alive for ever, with every connection in them.)
#[test]
fn dropping_the_daemon_future_closes_its_connections_and_removes_its_files() {
    let dir = common::temp_dir();
    let socket = dir.path().join("run").join("khived.sock");
    let mut config = khived::Config::at(&socket);
    config.handle_signals = false;
    let pid_file = config.pid_file.clone();
    let dispatch = common::TestDispatch::default();
    let (at_gate, _) = gate_of(&dispatch);
    let daemon = khived::Daemon::new(config, dispatch);
    let (drop_it, dropped) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        let told = async {
            while dropped.try_recv().is_err() {
                async_io::Timer::after(Duration::from_millis(5)).await;
            }
            Ok(khived::Stopped::Drained)
        };
        // Whichever ends first: being told drops the daemon's future unfinished.
        async_io::block_on(futures_lite::future::FutureExt::or(daemon.run(), told))
    });
    common::wait_until_serving(&socket);

    let connect = || {
        let stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        stream
    };
    let mut idle = connect();
    let mut busy = connect();
    let body = serde_json::to_vec(&request("gate")).unwrap();
    busy.write_all(&frame(&body)).unwrap();
    common::wait_until("the request to reach the gate", || {
        at_gate.load(Ordering::SeqCst) > 0
    });

    drop_it.send(()).unwrap();
    thread.join().unwrap().unwrap();
    assert!(is_closed(&mut idle), "the idle connection is still open");
    assert!(
        is_closed(&mut busy),
        "the connection being served is still open"
    );
    assert!(!socket.exists(), "the socket is left behind");
    assert!(!pid_file.exists(), "the PID file is left behind");
}
