//! The daemon's life as a process: start, one instance per socket, signals, drain, stale files.
//! Each daemon here is a child process (this test binary re-run as `child_daemon`).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::thread::JoinHandle;
use std::time::Duration;

use common::{request, start_held_request, temp_dir, ChildDaemon};
use rustix::process::Signal;

/// Entry point of the child daemons; does nothing in a normal test run.
#[test]
fn child_daemon() {
    common::child_main();
}

const EXIT_WAIT: Duration = Duration::from_secs(20);

#[test]
fn sigterm_exits_zero_and_removes_files() {
    let dir = temp_dir();
    let mut daemon = ChildDaemon::start(&dir.path().join("k.sock"), &[]);
    assert!(daemon.pid_file.exists());
    daemon.terminate();
    assert_eq!(daemon.wait(EXIT_WAIT).code(), Some(0), "{}", daemon.log());
    assert!(!daemon.socket.exists());
    assert!(!daemon.pid_file.exists());
    assert!(daemon.log().contains("SIGTERM received"));
}

#[test]
fn sigint_stops_like_sigterm() {
    let dir = temp_dir();
    let mut daemon = ChildDaemon::start(&dir.path().join("k.sock"), &[]);
    daemon.signal(Signal::INT);
    assert_eq!(daemon.wait(EXIT_WAIT).code(), Some(0), "{}", daemon.log());
    assert!(!daemon.socket.exists());
}

#[test]
fn slow_request_is_answered_after_sigterm() {
    let dir = temp_dir();
    let mut daemon = ChildDaemon::start(&dir.path().join("k.sock"), &[]);
    // Held until the test lets it go: it is in flight when the signal comes.
    let release = dir.path().join("release");
    let slow = start_held_request(&daemon, &release);
    daemon.terminate();
    daemon.wait_for_log("listener closed, draining 1 connection(s)");
    // The listener is closed at once: no new client gets in.
    assert!(khived::Client::connect(&daemon.socket, Duration::from_secs(1)).is_err());
    std::fs::write(&release, "").unwrap();
    let response = slow.join().unwrap().unwrap();
    assert_eq!(
        response.result,
        Some(format!("until:{}", release.display()))
    );
    assert_eq!(daemon.wait(EXIT_WAIT).code(), Some(0), "{}", daemon.log());
    assert!(!daemon.log().contains("cut off"), "{}", daemon.log());
}

#[test]
fn drain_timeout_cuts_off_a_request_that_is_too_slow() {
    let dir = temp_dir();
    let env = [("KHIVE_DRAIN_TIMEOUT_SECS", "1")];
    let mut daemon = ChildDaemon::start(&dir.path().join("k.sock"), &env);
    // Never released: the daemon can only exit by cutting it off, however slow the machine.
    let slow = start_held_request(&daemon, &dir.path().join("never"));
    daemon.terminate();
    assert_eq!(daemon.wait(EXIT_WAIT).code(), Some(0), "{}", daemon.log());
    assert!(
        daemon
            .log()
            .contains("drain timeout (1s) reached: 1 connection(s) cut off"),
        "{}",
        daemon.log()
    );
    assert!(
        slow.join().unwrap().is_err(),
        "the cut-off client sees the close"
    );
    assert!(!daemon.socket.exists() && !daemon.pid_file.exists());
}

/// A variable set to something that is not a whole number is ignored, as it always was
/// (the default applies), but the log says so: `0.5` seconds is not taken for 0 or 10 in
/// silence.
#[test]
fn an_unreadable_number_in_the_environment_is_named_in_the_log() {
    let dir = temp_dir();
    let env = [
        ("KHIVE_DRAIN_TIMEOUT_SECS", "0.5"),
        ("KHIVE_THREADS", "many"),
    ];
    let mut daemon = ChildDaemon::start(&dir.path().join("k.sock"), &env);
    daemon.terminate();
    assert_eq!(daemon.wait(EXIT_WAIT).code(), Some(0), "{}", daemon.log());
    for named in [
        r#"KHIVE_DRAIN_TIMEOUT_SECS="0.5" is not a whole number; ignored"#,
        r#"KHIVE_THREADS="many" is not a whole number; ignored"#,
    ] {
        assert!(daemon.log().contains(named), "{named}: {}", daemon.log());
    }
}

// Linux only: the test sees the spawner look at the PID file through inotify.
#[cfg(target_os = "linux")]
#[test]
fn spawn_waits_for_a_draining_daemon_through_the_pid_file_beside_the_socket() {
    let dir = temp_dir();
    let socket = dir.path().join("k.sock");
    // The drain ends when the test lets the request in flight go, not at a deadline.
    let env = [("KHIVE_DRAIN_TIMEOUT_SECS", "600")];
    let mut old = ChildDaemon::start(&socket, &env);
    let release = dir.path().join("release");
    let held = start_held_request(&old, &release);
    old.terminate();
    // The old daemon no longer listens but holds `k.pid` until its drain is over.
    old.wait_for_log("listener closed");
    let reads = common::FileReads::watch(&old.pid_file);
    // No `Spawn::pid_file`: the default, beside the socket, is where the old daemon's is.
    let spawning = {
        let socket = socket.clone();
        std::thread::spawn(move || {
            khived::Spawn::new(&socket, common::child_command(&socket, &[]))
                .ready_timeout(Duration::from_secs(60))
                .connect(Duration::from_secs(10))
        })
    };
    // The daemon it starts finds the old one there ("already running") and exits; the
    // spawner then waits for the old one to let go of `k.pid`, looking at it every few
    // milliseconds. Once it is seen looking again after that message, it is in that wait.
    let spawn_log = socket.with_extension("log");
    let already = format!("already running as pid {}", old.pid());
    common::wait_for_text(&already, || common::read_log(&spawn_log));
    reads.take();
    reads.wait("the spawner never waited for the old daemon");
    std::fs::write(&release, "").unwrap();
    assert!(
        held.join().unwrap().unwrap().ok,
        "the request in flight is answered"
    );
    assert_eq!(old.wait(EXIT_WAIT).code(), Some(0), "{}", old.log());
    let mut client = spawning.join().unwrap().unwrap();
    let new = client.probe().unwrap();
    assert_ne!(new.pid, old.pid());
    assert!(client.request(&request("hello")).unwrap().ok);
    // Stop the new daemon, which is no child of ours.
    let pid = rustix::process::Pid::from_raw(new.pid as i32).unwrap();
    rustix::process::kill_process(pid, Signal::TERM).unwrap();
    let deadline = std::time::Instant::now() + EXIT_WAIT;
    while khived::running_pid(&socket.with_extension("pid")).unwrap() == Some(new.pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "the spawned daemon did not stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A drain that outlasts the spawner's ready timeout ends the spawn with an error that names
/// the daemon in the way, rather than "did not answer" from one more start left to fail.
#[test]
fn spawn_names_the_draining_daemon_still_in_its_way_at_the_ready_timeout() {
    let dir = temp_dir();
    let socket = dir.path().join("k.sock");
    let release = dir.path().join("release");
    let mut old = ChildDaemon::start(&socket, &[("KHIVE_DRAIN_TIMEOUT_SECS", "600")]);
    let held = start_held_request(&old, &release);
    old.terminate();
    old.wait_for_log("listener closed");
    let e = khived::Spawn::new(&socket, common::child_command(&socket, &[]))
        .ready_timeout(Duration::from_secs(2))
        .connect(Duration::from_secs(10))
        .expect_err("the old daemon holds the PID file until it is released");
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
    let text = e.to_string();
    let holder = format!("pid {} still holds {}", old.pid(), old.pid_file.display());
    assert!(text.contains(&holder), "{text}");
    // The same when the daemon started is still starting at the timeout, as on a busy
    // machine: here one that only sleeps (and then exits, reaped by the spawner's thread).
    let mut slow = std::process::Command::new("sleep");
    slow.arg("5");
    let e = khived::Spawn::new(&socket, slow)
        .pid_file(&old.pid_file)
        .ready_timeout(Duration::from_secs(1))
        .connect(Duration::from_secs(10))
        .expect_err("the old daemon holds the PID file until it is released");
    assert!(e.to_string().contains(&holder), "{e}");
    std::fs::write(&release, "").unwrap();
    assert!(
        held.join().unwrap().unwrap().ok,
        "the held request is answered"
    );
    assert_eq!(old.wait(EXIT_WAIT).code(), Some(0), "{}", old.log());
}

#[test]
fn spawn_names_a_pid_file_held_for_another_socket_instead_of_waiting_it_out() {
    let dir = temp_dir();
    let running = ChildDaemon::start(&dir.path().join("a.sock"), &[]);
    let socket = dir.path().join("b.sock");
    // b.sock's daemon is told to use a.sock's PID file, which a.sock's daemon holds for as
    // long as it runs: however long the spawner waited, the PID file would not come free.
    let mut command = common::child_command(&socket, &[]);
    command.env("KHIVE_PID", &running.pid_file);
    // Long enough for any machine to start and look; without the check it is waited out.
    let spawned = khived::Spawn::new(&socket, command)
        .pid_file(&running.pid_file)
        .ready_timeout(Duration::from_secs(60))
        .connect(Duration::from_secs(10));
    let e = spawned.expect_err("no daemon can start on b.sock");
    assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
    let text = e.to_string();
    let holder = format!("pid {} holds {}", running.pid(), running.pid_file.display());
    assert!(text.contains(&holder), "{text}");
    assert!(text.contains("serves another socket"), "{text}");
    assert!(!socket.exists(), "nothing was bound on b.sock");
    assert!(
        khived::probe(&running.socket, Duration::from_secs(10)).is_ok(),
        "the running daemon goes on"
    );
}

/// A connection between requests holding a part of its next frame is no request in hand: the
/// drain drops it with the connection (PROTOCOL.md, "Pipelining") instead of waiting for the
/// rest until the idle deadline. The drain timeout here is an hour: only that ends the stop.
#[test]
fn a_part_of_a_frame_does_not_hold_the_drain() {
    use std::io::Write;
    let dir = temp_dir();
    let mut daemon = ChildDaemon::start(
        &dir.path().join("k.sock"),
        &[("KHIVE_DRAIN_TIMEOUT_SECS", "3600")],
    );
    let mut stream = std::os::unix::net::UnixStream::connect(&daemon.socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    // One write: the daemon reads the whole request and the part of the next one together,
    // so once the answer comes, the part is in the daemon's buffer.
    let mut bytes = common::frame(&serde_json::to_vec(&request("whole")).unwrap());
    let next = common::frame(&serde_json::to_vec(&request("cut short")).unwrap());
    bytes.extend_from_slice(&next[..next.len() / 2]);
    stream.write_all(&bytes).unwrap();
    let answer = common::read_response(&mut stream).unwrap();
    assert_eq!(answer.result.as_deref(), Some("whole"));
    daemon.terminate();
    assert_eq!(daemon.wait(EXIT_WAIT).code(), Some(0), "{}", daemon.log());
    assert!(!daemon.log().contains("drain timeout"), "{}", daemon.log());
    assert!(
        common::is_closed(&mut stream),
        "the connection was left open"
    );
}

#[test]
fn second_signal_during_the_drain_exits_at_once() {
    let dir = temp_dir();
    // Never released, and a drain timeout no run reaches: only the second signal can end
    // the daemon.
    let env = [("KHIVE_DRAIN_TIMEOUT_SECS", "3600")];
    let mut daemon = ChildDaemon::start(&dir.path().join("k.sock"), &env);
    let held = start_held_request(&daemon, &dir.path().join("never"));
    daemon.terminate();
    daemon.wait_for_log("listener closed");
    daemon.signal(Signal::INT);
    let status = daemon.wait(EXIT_WAIT);
    assert_eq!(status.code(), Some(128 + 2), "{}", daemon.log());
    assert!(
        held.join().unwrap().is_err(),
        "the held request was cut off"
    );
    assert!(
        daemon.log().contains("SIGINT received again"),
        "{}",
        daemon.log()
    );
    assert!(!daemon.socket.exists() && !daemon.pid_file.exists());
}

#[test]
fn stale_files_after_sigkill_are_cleaned_up() {
    let dir = temp_dir();
    let socket = dir.path().join("k.sock");
    let mut first = ChildDaemon::start(&socket, &[]);
    first.signal(Signal::KILL);
    first.wait(EXIT_WAIT);
    // SIGKILL leaves both files behind, the PID file naming a dead process.
    assert!(socket.exists() && first.pid_file.exists());
    let second = ChildDaemon::start(&socket, &[]);
    assert!(
        second.log().contains("removing stale socket"),
        "{}",
        second.log()
    );
    let pid = std::fs::read_to_string(&second.pid_file).unwrap();
    assert_eq!(pid, second.pid().to_string());
}

#[test]
fn eight_daemons_race_and_exactly_one_serves() {
    let dir = temp_dir();
    let socket = dir.path().join("k.sock");
    let mut daemons: Vec<_> = (0..8).map(|_| ChildDaemon::spawn(&socket, &[])).collect();
    let info = common::wait_until_serving(&socket);
    let mut losers = 0;
    for daemon in &mut daemons {
        if daemon.pid() == info.pid {
            continue;
        }
        let status = daemon.wait(EXIT_WAIT);
        assert_eq!(status.code(), Some(3), "{}", daemon.log());
        // The message names the embedding program (this test binary), not the crate.
        let exe = std::env::current_exe().unwrap();
        let program = exe.file_name().unwrap().to_string_lossy();
        let expected = format!("{program} is already running as pid {}", info.pid);
        assert!(daemon.log().contains(&expected), "{}", daemon.log());
        losers += 1;
    }
    assert_eq!(losers, 7);
    // The winner's files are intact and it still serves.
    let pid = std::fs::read_to_string(socket.with_extension("pid")).unwrap();
    assert_eq!(pid, info.pid.to_string());
    assert_eq!(common::wait_until_serving(&socket).pid, info.pid);
}

#[test]
fn a_later_daemon_names_the_running_one_and_touches_nothing() {
    let dir = temp_dir();
    let socket = dir.path().join("k.sock");
    let first = ChildDaemon::start(&socket, &[]);
    let (socket_inode, pid_inode) = (inode(&socket), inode(&first.pid_file));
    let mut second = ChildDaemon::spawn(&socket, &[]);
    assert_eq!(second.wait(EXIT_WAIT).code(), Some(3));
    assert!(second
        .log()
        .contains(&format!("already running as pid {}", first.pid())));
    assert_eq!(inode(&socket), socket_inode);
    assert_eq!(inode(&first.pid_file), pid_inode);
    assert_eq!(common::wait_until_serving(&socket).pid, first.pid());
}

#[test]
fn only_its_own_files_are_removed() {
    let dir = temp_dir();
    let socket = dir.path().join("k.sock");
    let mut daemon = ChildDaemon::start(&socket, &[]);
    // Someone replaces the socket and rewrites the PID file while the daemon runs.
    std::fs::remove_file(&socket).unwrap();
    let _other = UnixListener::bind(&socket).unwrap();
    std::fs::write(&daemon.pid_file, "1").unwrap();
    daemon.terminate();
    assert_eq!(daemon.wait(EXIT_WAIT).code(), Some(0), "{}", daemon.log());
    assert!(socket.exists(), "another process's socket must survive");
    assert_eq!(std::fs::read_to_string(&daemon.pid_file).unwrap(), "1");
}

#[test]
fn socket_is_private_even_under_umask_000() {
    let dir = temp_dir();
    let socket = dir.path().join("new").join("k.sock");
    let daemon = ChildDaemon::start(&socket, &[("KHIVED_TEST_UMASK", "000")]);
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&socket), 0o600);
    assert_eq!(mode(&daemon.pid_file), 0o600);
    assert_eq!(mode(socket.parent().unwrap()), 0o700);
    // Created 0600 by bind itself, not chmod-ed afterwards.
    assert!(!daemon.log().contains("fixed to 600"), "{}", daemon.log());
}

#[test]
fn idle_timeout_stops_the_process_cleanly() {
    let dir = temp_dir();
    let env = [("KHIVED_TEST_IDLE_SECS", "0.5")];
    // Not waited for with a probe: on a busy machine the idle period could pass before the
    // probe came. The log says the daemon served and found nobody.
    let mut daemon = ChildDaemon::spawn(&dir.path().join("k.sock"), &env);
    assert_eq!(daemon.wait(EXIT_WAIT).code(), Some(0), "{}", daemon.log());
    assert!(
        daemon.log().contains("no connection for 500ms: stopping"),
        "{}",
        daemon.log()
    );
    assert!(!daemon.socket.exists());
}

/// Starts a daemon in this process on `socket` and stops it right after a successful start.
fn start_and_stop(socket: &std::path::Path) -> Result<khived::Stopped, khived::Error> {
    let mut config = khived::Config::at(socket);
    config.handle_signals = false;
    let daemon = khived::Daemon::new(config, common::TestDispatch::default());
    daemon.shutdown_handle().shutdown();
    daemon.run_blocking()
}

#[test]
fn polling_running_pid_never_makes_a_start_fail() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let dir = temp_dir();
    let socket = dir.path().join("k.sock");
    let pid_file = socket.with_extension("pid");
    std::fs::write(&pid_file, "").unwrap();
    // `khived status` and `stop` look at the lock the way this loop does, as often as they like.
    let done = Arc::new(AtomicBool::new(false));
    let polls = Arc::new(AtomicU64::new(0));
    let poller = {
        let (done, polls, pid_file) = (Arc::clone(&done), Arc::clone(&polls), pid_file.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                let _ = khived::running_pid(&pid_file);
                polls.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    while polls.load(Ordering::Relaxed) == 0 {
        std::thread::yield_now();
    }
    for _ in 0..300 {
        start_and_stop(&socket).expect("start failed while the lock was polled");
        std::fs::write(&pid_file, "").unwrap();
    }
    done.store(true, Ordering::Relaxed);
    poller.join().unwrap();
    assert!(polls.load(Ordering::Relaxed) > 30, "the poller hardly ran");
}

#[test]
fn a_start_waits_while_the_lock_is_looked_at_for_a_second() {
    let dir = temp_dir();
    let socket = dir.path().join("k.sock");
    let pid_file = socket.with_extension("pid");
    std::fs::write(&pid_file, "").unwrap();
    // The shared lock `running_pid` takes for a moment, held here for 1 s: ten times as long
    // as a start used to wait before it took the looker for a daemon and failed.
    let looker = std::fs::File::open(&pid_file).unwrap();
    rustix::fs::flock(&looker, rustix::fs::FlockOperation::NonBlockingLockShared).unwrap();
    let start = std::thread::spawn(move || start_and_stop(&socket));
    std::thread::sleep(Duration::from_secs(1));
    // No start can succeed while the shared lock is held: one that is over has failed.
    assert!(!start.is_finished(), "{:?}", start.join().unwrap());
    drop(looker);
    start
        .join()
        .unwrap()
        .expect("the start failed while the lock was looked at");
}

#[test]
fn clients_queued_at_the_moment_of_sigterm_are_answered() {
    let dir = temp_dir();
    let mut daemon = ChildDaemon::start(&dir.path().join("k.sock"), &[]);
    // Frozen, the daemon accepts nothing: these clients wait in the kernel's queue.
    daemon.signal(Signal::STOP);
    let (connected, queued) = std::sync::mpsc::channel();
    let clients: Vec<_> = (0..5)
        .map(|i| {
            let socket = daemon.socket.clone();
            let connected = connected.clone();
            std::thread::spawn(move || {
                let mut client = khived::Client::connect(&socket, Duration::from_secs(30))?;
                connected.send(()).unwrap();
                client.request(&request(&format!("queued {i}")))
            })
        })
        .collect();
    // Each connect has completed into the listener's queue, which no one takes from.
    for _ in 0..5 {
        queued.recv_timeout(Duration::from_secs(60)).unwrap();
    }
    daemon.terminate();
    daemon.signal(Signal::CONT);
    for (i, client) in clients.into_iter().enumerate() {
        let response = client.join().unwrap().unwrap();
        assert_eq!(
            response.result,
            Some(format!("queued {i}")),
            "{}",
            daemon.log()
        );
    }
    assert_eq!(daemon.wait(EXIT_WAIT).code(), Some(0), "{}", daemon.log());
}

fn inode(path: &std::path::Path) -> u64 {
    std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).unwrap())
}

/// Something other than a khived of this version on `socket`: it answers the first frame it
/// gets with `answer`, then keeps the socket bound until the thread is joined.
fn answer_once(socket: &std::path::Path, answer: &'static [u8]) -> JoinHandle<UnixListener> {
    let listener = UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        if let Ok((mut stream, _)) = listener.accept() {
            let _ = common::read_response_raw(&mut stream);
            let _ = std::io::Write::write_all(&mut stream, &common::frame(answer));
        }
        listener
    })
}

#[test]
fn an_older_daemon_that_does_not_lock_is_left_alone() {
    let dir = temp_dir();
    let socket = dir.path().join("k.sock");
    // An original-version daemon: no flock, answers every frame with a namespace mismatch
    // (it knows no probe), and its PID file names a live process (this one).
    let answer = br#"{"ok":false,"result":null,"error":null,"namespace_mismatch":true}"#;
    let incumbent = answer_once(&socket, answer);
    std::fs::write(socket.with_extension("pid"), std::process::id().to_string()).unwrap();
    let before = inode(&socket);
    let mut newcomer = ChildDaemon::spawn(&socket, &[]);
    assert_eq!(
        newcomer.wait(EXIT_WAIT).code(),
        Some(3),
        "{}",
        newcomer.log()
    );
    let expected = format!("already running as pid {}", std::process::id());
    assert!(newcomer.log().contains(&expected), "{}", newcomer.log());
    assert_eq!(inode(&socket), before);
    let pid = std::fs::read_to_string(socket.with_extension("pid")).unwrap();
    assert_eq!(
        pid,
        std::process::id().to_string(),
        "its PID file is untouched"
    );
    drop(incumbent.join().unwrap());
}

#[test]
fn a_socket_answering_the_probe_with_no_response_is_not_taken_over() {
    let dir = temp_dir();
    let socket = dir.path().join("k.sock");
    // Something holds the socket and answers a frame, but not with a response: not a khived
    // that is running, and not a leftover either.
    let incumbent = answer_once(&socket, br#"{"pid":1}"#);
    let before = inode(&socket);
    let mut newcomer = ChildDaemon::spawn(&socket, &[]);
    assert_eq!(
        newcomer.wait(EXIT_WAIT).code(),
        Some(1),
        "{}",
        newcomer.log()
    );
    let expected = format!(
        "{} accepts connections but does not answer (bad response: missing field `ok`",
        socket.display()
    );
    assert!(newcomer.log().contains(&expected), "{}", newcomer.log());
    assert_eq!(inode(&socket), before);
    drop(incumbent.join().unwrap());
}

// Linux only: the test sees the look begin through inotify.
#[cfg(target_os = "linux")]
#[test]
fn running_pid_sees_a_daemon_that_exits_while_it_looks() {
    let dir = temp_dir();
    let pid_file = dir.path().join("k.pid");
    // A PID no process can have, as the file of a daemon in its last moments may name one
    // that is already gone while its lock is not yet released.
    std::fs::write(&pid_file, "2147483648\n").unwrap();
    // The daemon's lock, held through a file of our own: a lock of another open file
    // description, which `running_pid`'s shared lock is refused by as by another process's.
    let holder = std::fs::File::open(&pid_file).unwrap();
    rustix::fs::flock(&holder, rustix::fs::FlockOperation::LockExclusive).unwrap();
    let reads = common::FileReads::watch(&pid_file);
    let looked_at = pid_file.clone();
    let looking = std::thread::spawn(move || khived::running_pid(&looked_at));
    // `running_pid` reads the PID only when the lock is refused: a read means the look has
    // begun while the lock is held, and it tries again until the lock is free.
    reads.wait("the look never found the lock held");
    rustix::fs::flock(&holder, rustix::fs::FlockOperation::Unlock).unwrap();
    // Nobody holds the lock any more: no daemon runs, which is not an error.
    assert_eq!(looking.join().unwrap().unwrap(), None);
}
