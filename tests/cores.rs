//! Dispatch on several threads: a dispatch that holds its thread does not hold up probes or
//! other requests, hanging up cancels a request, the request deadline, and the switch that
//! lets work finish. Nothing here measures time: every wait is for an event, with a generous
//! deadline. Where the daemon must not act on a client's hang-up (or half-close), the test
//! waits for the moment the daemon looks at the client before it lets the request finish.

mod common;
mod gated;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{frame, read_response};
use gated::{Running, WAIT};
use khived::Request;

#[test]
fn dispatches_that_hold_their_threads_do_not_hold_up_probes_or_short_requests() {
    let running = Running::start(|_| {});
    let mut first = running.send("block:1");
    running.expect("started 1");
    // One of the two dispatch threads is taken: a probe and a short request are answered.
    let info = khived::probe(&running.socket, WAIT).unwrap();
    assert_eq!(info.namespace, "gated");
    assert_eq!(running.call("short:a").result.as_deref(), Some("short:a"));
    running.expect("started a");
    running.expect("finished a");
    running.expect("dropped a");

    // Both are taken: probes are still answered, and so is a short request: it waits until
    // both have held their slots for long, then a third slot opens for it.
    let mut second = running.send("block:2");
    running.expect("started 2");
    for _ in 0..3 {
        khived::probe(&running.socket, WAIT).unwrap();
    }
    assert_eq!(running.call("short:b").result.as_deref(), Some("short:b"));
    running.expect("started b");
    running.expect("finished b");
    running.expect("dropped b");
    let info = khived::probe(&running.socket, WAIT).unwrap();
    // Or more: a poll of the spare thread that a busy machine holds up for long may get
    // others started. Never more than the `2 x threads + 1` runners and the caller's.
    assert!(
        (3..=6).contains(&info.threads),
        "two computing, one for the rest: {info:?}"
    );

    running.gated.open_blocking_gate();
    for (stream, ops) in [(&mut first, "block:1"), (&mut second, "block:2")] {
        let response = read_response(stream).unwrap();
        assert_eq!(response.result.as_deref(), Some(ops), "{response:?}");
    }
    running.stop();
}

#[test]
fn long_computations_get_at_most_twice_the_threads_slots() {
    let running = Running::start(|_| {});
    // Two threads: four computations hold their slots for long (the third and fourth once
    // the ones before have held theirs for long); a fifth waits.
    let mut blocked = start_blocked(&running, 1..=4);
    let fifth = running.send("block:5");
    running.wait_until_waiting(1);
    // Probes need no slot.
    let info = khived::probe(&running.socket, WAIT).unwrap();
    assert_eq!(info.waiting, 1, "{info:?}");
    running.gated.open_blocking_gate();
    blocked.push(fifth);
    for (n, stream) in blocked.iter_mut().enumerate() {
        let response = read_response(stream).unwrap();
        let ops = format!("block:{}", n + 1);
        assert_eq!(
            response.result.as_deref(),
            Some(ops.as_str()),
            "{response:?}"
        );
    }
    running.stop();
}

/// Sends `block:ID` for each id, one after the other, each once the one before has started.
fn start_blocked(running: &Running, ids: impl IntoIterator<Item = u32>) -> Vec<UnixStream> {
    ids.into_iter()
        .map(|id| {
            let stream = running.send(&format!("block:{id}"));
            running.expect(&format!("started {id}"));
            stream
        })
        .collect()
}

#[test]
fn hanging_up_cancels_a_request_being_dispatched_or_waiting_for_a_thread() {
    let running = Running::start(|_| {});
    // Being dispatched: its future waits; the client hangs up.
    let stream = running.send("await:1");
    running.expect("started 1");
    drop(stream);
    running.expect("dropped 1");

    // Waiting for a thread: every slot there can be (2 x threads) is held by a blocked
    // computation, so it waits however long its client takes to hang up; when its turn
    // comes it is dropped without having run.
    let blocked = start_blocked(&running, [2, 3, 5, 6]);
    let waiting = running.send("short:4");
    running.wait_until_waiting(1);
    drop(waiting);
    running.gated.open_blocking_gate();
    let mut got: Vec<String> = (0..9)
        .map(|_| running.events.recv_timeout(WAIT).unwrap())
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            "dropped 2",
            "dropped 3",
            "dropped 4",
            "dropped 5",
            "dropped 6",
            "finished 2",
            "finished 3",
            "finished 5",
            "finished 6"
        ],
        "the request whose client left never started"
    );
    drop(blocked);
    running.stop();
}

#[test]
fn a_request_past_its_deadline_is_answered_with_a_timeout_and_dropped() {
    let running =
        Running::start(|config| config.request_timeout = Some(Duration::from_millis(300)));
    let mut stream = running.send("await:1");
    let response = read_response(&mut stream).unwrap();
    let error = response.error.clone().unwrap_or_default();
    assert!(error.starts_with("request timed out"), "{error}");
    assert!(!response.ok);
    assert_eq!(response.error_code(), Some(khived::code::REQUEST_TIMED_OUT));
    let detail = response.error_detail.as_ref().unwrap();
    assert_eq!(detail.disposition, khived::Disposition::Unknown);
    running.expect("started 1");
    running.expect("dropped 1");
    // The connection is still good for the next request.
    let body = serde_json::to_vec(&Request::new("short:2", "gated", "")).unwrap();
    stream.write_all(&frame(&body)).unwrap();
    let response = read_response(&mut stream).unwrap();
    assert_eq!(response.result.as_deref(), Some("short:2"));
    running.stop();
}

#[test]
fn with_cancel_on_disconnect_off_the_work_completes() {
    let running = Running::start(|config| config.cancel_on_disconnect = false);
    // Being dispatched: its future waits; the client hangs up (its close is in the kernel
    // once `drop` returns).
    let awaiting = running.send("await:1");
    running.expect("started 1");
    drop(awaiting);
    // Both threads are taken, and a request whose client has hung up waits for one.
    let first = running.send("block:2");
    running.expect("started 2");
    let second = running.send("block:3");
    running.expect("started 3");
    // It waits (both slots are held); when its turn comes (a third slot opens) the daemon
    // looks whether its client is still there, and sees that it is not: where a hang-up
    // cancels (the test above), it would be dropped there without running. Here it runs.
    drop(running.send("short:4"));
    running.expect("started 4");
    running.expect("finished 4");
    running.expect("dropped 4");
    // Let go, the first one runs to its end too.
    running.gated.open_async_gate();
    running.expect("finished 1");
    running.expect("dropped 1");
    running.gated.open_blocking_gate();
    let mut got: Vec<String> = (0..4)
        .map(|_| running.events.recv_timeout(WAIT).unwrap())
        .collect();
    got.sort();
    assert_eq!(
        got,
        ["dropped 2", "dropped 3", "finished 2", "finished 3"],
        "the requests whose clients left ran to their end"
    );
    drop((first, second));
    running.stop();
}

#[test]
fn one_thread_serves_as_before() {
    let running = Running::start(|config| config.threads = 1);
    assert_eq!(running.call("short:1").result.as_deref(), Some("short:1"));
    running.expect("started 1");
    running.expect("finished 1");
    running.expect("dropped 1");
    // Cancellation works the same on one thread.
    let stream = running.send("await:2");
    running.expect("started 2");
    drop(stream);
    running.expect("dropped 2");
    running.stop();
}

#[test]
fn a_client_that_only_shuts_down_writing_is_still_answered() {
    let running = Running::start(|_| {});
    let mut stream = running.send("await:1");
    running.expect("started 1");
    // Its first poll is over (the daemon watches the client from then on)...
    common::wait_until("the first poll never ended", || {
        running.gated.polls("1") >= 1
    });
    let polls = running.gated.polls("1");
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    // ...and the end of the client's writing side wakes the watch: the task is polled again,
    // and in that poll the watch looks at the client. It must not take it for a hang-up.
    common::wait_until("the daemon never looked at the client", || {
        running.gated.polls("1") > polls
    });
    // Every slot there can be (2 x threads) is taken, so that once let go the request
    // waits for one until the blocked ones end, however slow the machine: when its turn
    // comes the daemon looks again whether the client is still there.
    let blocked = start_blocked(&running, [2, 3, 4, 5]);
    running.gated.open_async_gate();
    running.wait_until_waiting(1);
    running.gated.open_blocking_gate();
    let response = read_response(&mut stream).unwrap();
    assert_eq!(response.result.as_deref(), Some("await:1"), "{response:?}");
    let mut got: Vec<String> = (0..10)
        .map(|_| running.events.recv_timeout(WAIT).unwrap())
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            "dropped 1",
            "dropped 2",
            "dropped 3",
            "dropped 4",
            "dropped 5",
            "finished 1",
            "finished 2",
            "finished 3",
            "finished 4",
            "finished 5"
        ]
    );
    drop(blocked);
    running.stop();
}

/// More threads than a process could run (`KHIVE_THREADS=18446744073709551615`, or the
/// same in code) are taken for the most the daemon uses, 1,024 (a unit test in
/// `execution.rs` checks the cap): it starts and serves, where twice the count overflowed, a
/// panic in debug builds and an allocation abort in release.
#[test]
fn a_thread_count_too_large_to_run_is_capped() {
    let daemon = common::InProcess::start(|config, _| config.threads = usize::MAX);
    let mut client = daemon.client();
    let response = client.request(&common::request("hello")).unwrap();
    assert!(response.ok, "{:?}", response.error);
    daemon.shutdown().unwrap();
}
