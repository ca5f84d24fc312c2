//! What a request costs the daemon in system calls, as the kernel counts them: `syscr` in
//! `/proc/PID/io`, every read-like call of the process, failed ones included (Linux only).
#![cfg(target_os = "linux")]

mod common;

use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{raw_exchange, request, temp_dir, ChildDaemon};

/// Entry point of the child daemons; does nothing in a normal test run.
#[test]
fn child_daemon() {
    common::child_main();
}

/// Read-like system calls the process `pid` has made so far.
fn reads_by(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    let line = io.lines().find(|line| line.starts_with("syscr:")).unwrap();
    line["syscr:".len()..].trim().parse().unwrap()
}

/// A client that has its answer and closes in its own time, alone in the daemon: its
/// connection waits for the close through the reactor as soon as the read would block. It
/// used to look eight times more first, each time a failed `read`: thirteen read-like calls
/// a connection, against five now (the request, the read that would block, the reactor's
/// wake-ups, the end of the stream).
#[test]
fn a_lone_client_that_closes_after_its_answer_costs_no_string_of_failed_reads() {
    const CLIENTS: u64 = 40;
    let dir = temp_dir();
    let daemon = ChildDaemon::start(&dir.path().join("k.sock"), &[]);
    let body = serde_json::to_vec(&request("ping")).unwrap();
    let frame = common::frame(&body);

    let before = reads_by(daemon.pid());
    for _ in 0..CLIENTS {
        let mut stream = UnixStream::connect(&daemon.socket).unwrap();
        let response = raw_exchange(&mut stream, &frame).unwrap();
        assert!(response.ok, "{response:?}");
        // The pause makes the daemon's next read find nothing: its wait is what is counted.
        std::thread::sleep(Duration::from_millis(2));
        drop(stream);
    }
    // The last close may not be seen yet: that only lowers the count.
    let reads = reads_by(daemon.pid()) - before;
    eprintln!("{reads} read-like system calls for {CLIENTS} connections");
    assert!(
        reads <= 8 * CLIENTS,
        "{reads} read-like system calls for {CLIENTS} connections; log:\n{}",
        daemon.log()
    );
}
