//! Threads come and go with the work: extra ones are given back after idling, and none (nor
//! any task) outlives a drain. The only test of its binary, so that the threads this process
//! has are the daemon's and the test's.

mod common;
mod gated;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::read_response;
use gated::{Running, WAIT};

/// The threads of this process.
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// The ids of this process's threads.
fn thread_ids() -> BTreeSet<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// Whether thread `tid` of this process is gone, or on its way out of the kernel: its flags
/// (`/proc/self/task/TID/stat`, field 9) have `PF_EXITING`, set before a joiner is let go.
fn is_exiting(tid: &str) -> bool {
    const PF_EXITING: u64 = 0x4;
    match std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")) {
        Err(_) => true,
        Ok(stat) => {
            // After the name in parentheses: state, ppid, pgrp, session, tty, tpgid, flags.
            let after_name = stat.rsplit(')').next().unwrap_or("");
            let flags: u64 = after_name
                .split_whitespace()
                .nth(6)
                .and_then(|flags| flags.parse().ok())
                .unwrap_or_else(|| panic!("no flags in {stat:?}"));
            flags & PF_EXITING != 0
        }
    }
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
    let before_ids = thread_ids();

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
    // it leaves the kernel; one that runs on (an idle runner, the watchdog) is not exiting.
    let running_on: Vec<String> = thread_ids()
        .difference(&before_ids)
        .filter(|tid| !is_exiting(tid))
        .cloned()
        .collect();
    assert!(
        running_on.is_empty(),
        "threads outlived the daemon: {running_on:?}"
    );
    wait_for_threads(before, "exiting threads never left", GENEROUS);
}
