//! Threads come and go with the work: extra ones are given back after idling, and none (nor
//! any task) outlives a drain. The only test of its binary, so that the threads this process
//! has are the daemon's and the test's.

mod common;
mod gated;

use std::time::{Duration, Instant};

use common::read_response;
use gated::{Running, WAIT};

/// The threads of this process.
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// Long enough for anything on a busy machine.
const GENEROUS: Duration = Duration::from_secs(60);

/// Waits until this process has `count` threads, failing after `within`.
fn wait_for_threads(count: usize, what: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while threads() != count {
        assert!(
            Instant::now() < deadline,
            "{what}: {} threads, expected {count}",
            threads()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn extra_threads_are_given_back_after_idling_and_none_outlive_a_drain() {
    // The async-io helper thread is started once per process and stays: count it in first.
    async_io::block_on(async_io::Timer::after(Duration::from_millis(1)));
    let before = threads();

    let running = Running::start(|config| config.drain_timeout = Duration::from_secs(1));
    // The daemon's thread (the "caller's thread" of run_blocking).
    wait_for_threads(before + 1, "serving, before any dispatch", GENEROUS);

    // A dispatch holds its thread: another one is started to answer probes.
    let mut blocked = running.send("block:1");
    running.expect("started 1");
    let info = khived::probe(&running.socket, WAIT).unwrap();
    assert_eq!(info.threads, 2, "{info:?}");
    assert!(threads() > before + 2, "a runner and the watchdog run");
    running.gated.open_blocking_gate();
    assert_eq!(
        read_response(&mut blocked).unwrap().result.as_deref(),
        Some("block:1")
    );
    running.expect("finished 1");
    running.expect("dropped 1");

    // Idle: the runner and the watchdog leave.
    wait_for_threads(before + 1, "after idling", GENEROUS);
    assert_eq!(khived::probe(&running.socket, WAIT).unwrap().threads, 1);

    // A request still waiting when the drain times out is dropped with its task, and every
    // thread is gone once `run` has returned.
    let pending = running.send("await:2");
    running.expect("started 2");
    running.stop_and_expect("dropped 2");
    drop(pending);
    // Joined, but a thread that has let its joiner go may still be listed for a moment while
    // it leaves the kernel: far less than the 2 s an unjoined idle runner would take.
    wait_for_threads(
        before,
        "threads outlived the daemon",
        Duration::from_millis(500),
    );
}
