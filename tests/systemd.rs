//! Under a service manager: the real binary with a listening socket passed as descriptor 3
//! (`LISTEN_PID`, `LISTEN_FDS`) and readiness notifications to `NOTIFY_SOCKET`. Linux only,
//! as the support for them is.
#![cfg(target_os = "linux")]

mod common;

use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{temp_dir, wait_until_serving};

const KHIVED: &str = env!("CARGO_BIN_EXE_khived");

/// Starts `khived serve` the way a service manager does: `fd3` becomes descriptor 3 and
/// `LISTEN_PID` is the daemon's own pid. A shell in between sets both and then execs the
/// daemon, keeping its pid: only a process's own pid can be known before it runs.
fn activate(
    fd3: impl Into<Stdio>,
    listen_pid: Option<&str>,
    env: &[(&str, &str)],
    dir: &Path,
) -> Child {
    let listen_pid = listen_pid.unwrap_or("$$");
    let script = format!(
        "export LISTEN_PID={listen_pid} LISTEN_FDS=${{KHIVED_TEST_LISTEN_FDS:-1}}; \
         exec 3<&0 0</dev/null; exec \"$0\" serve --socket \"$1\" --pid \"$2\""
    );
    let mut command = Command::new("/bin/sh");
    command
        .args(["-c", &script, KHIVED])
        .arg(dir.join("own.sock"))
        .arg(dir.join("k.pid"))
        .stdin(fd3)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("log")).unwrap());
    for (key, value) in env {
        command.env(key, value);
    }
    command.spawn().unwrap()
}

fn log(dir: &Path) -> String {
    common::read_log(&dir.join("log"))
}

fn wait(child: &mut Child, dir: &Path) -> std::process::ExitStatus {
    common::wait_exit(child, Duration::from_secs(20), || log(dir))
}

fn receive(notify: &UnixDatagram) -> String {
    let mut buf = [0; 4096];
    let n = notify.recv(&mut buf).expect("no notification in time");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn serves_an_inherited_socket_and_notifies_the_manager() {
    let dir = temp_dir();
    let socket = dir.path().join("activated.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let notify_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let env = [("NOTIFY_SOCKET", notify_path.to_str().unwrap())];
    let mut daemon = activate(std::os::fd::OwnedFd::from(listener), None, &env, dir.path());

    let ready = receive(&notify);
    assert!(ready.contains("READY=1"), "{ready}");
    // Requests are served on the inherited socket; the daemon bound nothing of its own.
    let info = wait_until_serving(&socket);
    assert_eq!(info.pid, daemon.id());
    let mut client = khived::Client::connect(&socket, Duration::from_secs(5)).unwrap();
    let response = client
        .request(&khived::Request::new("hi", "khive", ""))
        .unwrap();
    assert_eq!(response.result.as_deref(), Some("hi"));
    assert!(!dir.path().join("own.sock").exists());
    assert!(log(dir.path()).contains("socket from the service manager"));

    rustix::process::kill_process(
        rustix::process::Pid::from_raw(daemon.id() as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let mut stopping = receive(&notify);
    while !stopping.contains("STOPPING=1") {
        stopping = receive(&notify);
    }
    assert_eq!(
        wait(&mut daemon, dir.path()).code(),
        Some(0),
        "{}",
        log(dir.path())
    );
    assert!(socket.exists(), "the service manager's socket stays");
    assert!(!dir.path().join("k.pid").exists());
}

#[test]
fn abstract_notify_socket_is_used() {
    let dir = temp_dir();
    let listener = UnixListener::bind(dir.path().join("a.sock")).unwrap();
    let name = format!("khived-test-{}", std::process::id());
    let addr =
        <std::os::unix::net::SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(
            name.as_bytes(),
        )
        .unwrap();
    let notify = UnixDatagram::bind_addr(&addr).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let target = format!("@{name}");
    let mut daemon = activate(
        std::os::fd::OwnedFd::from(listener),
        None,
        &[("NOTIFY_SOCKET", &target)],
        dir.path(),
    );
    assert!(receive(&notify).contains("READY=1"));
    daemon.kill().unwrap();
    daemon.wait().unwrap();
}

#[test]
fn another_processes_listen_pid_is_ignored() {
    let dir = temp_dir();
    let listener = UnixListener::bind(dir.path().join("not-ours.sock")).unwrap();
    let mut daemon = activate(
        std::os::fd::OwnedFd::from(listener),
        Some("1"),
        &[],
        dir.path(),
    );
    // The variables were meant for another process: the daemon binds its own socket.
    let own = dir.path().join("own.sock");
    assert_eq!(wait_until_serving(&own).pid, daemon.id());
    daemon.kill().unwrap();
    daemon.wait().unwrap();
}

#[test]
fn two_listen_fds_are_refused() {
    let dir = temp_dir();
    let listener = UnixListener::bind(dir.path().join("a.sock")).unwrap();
    let env = [("KHIVED_TEST_LISTEN_FDS", "2")];
    let mut daemon = activate(std::os::fd::OwnedFd::from(listener), None, &env, dir.path());
    assert_eq!(wait(&mut daemon, dir.path()).code(), Some(1));
    let log = log(dir.path());
    assert!(
        log.contains("LISTEN_FDS=\"2\": khived takes exactly one socket"),
        "{log}"
    );
}

#[test]
fn descriptor_3_that_is_not_a_socket_is_refused() {
    let dir = temp_dir();
    let file = std::fs::File::create(dir.path().join("plain-file")).unwrap();
    let mut daemon = activate(file, None, &[], dir.path());
    assert_eq!(wait(&mut daemon, dir.path()).code(), Some(1));
    let log = log(dir.path());
    assert!(
        log.contains("descriptor 3 from the service manager is not a socket"),
        "{log}"
    );
}

#[test]
fn a_socket_that_does_not_listen_is_refused() {
    let dir = temp_dir();
    let (one_end, _other) = std::os::unix::net::UnixStream::pair().unwrap();
    let mut daemon = activate(std::os::fd::OwnedFd::from(one_end), None, &[], dir.path());
    assert_eq!(wait(&mut daemon, dir.path()).code(), Some(1));
    let log = log(dir.path());
    assert!(log.contains("a socket that is not listening"), "{log}");
}

/// A daemon on a service manager's socket, which stays open to newcomers while it stops,
/// takes in what was queued at the stop and no more: clients that keep connecting do not
/// hold the stop up. (They are the next start's, in the service manager's queue.)
#[test]
fn clients_that_keep_connecting_do_not_hold_up_a_stop_under_socket_activation() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let dir = temp_dir();
    let socket = dir.path().join("activated.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let mut daemon = activate(std::os::fd::OwnedFd::from(listener), None, &[], dir.path());
    wait_until_serving(&socket);

    let done = Arc::new(AtomicBool::new(false));
    let made = Arc::new(AtomicU64::new(0));
    // More connecting threads than cores, so that connections come faster than one thread
    // takes them in.
    let flood: Vec<_> = (0..4)
        .map(|_| {
            let (socket, done, made) = (socket.clone(), Arc::clone(&done), Arc::clone(&made));
            std::thread::spawn(move || {
                // Until the daemon is gone: nothing else holds the socket here.
                while !done.load(Ordering::SeqCst) {
                    match std::os::unix::net::UnixStream::connect(&socket) {
                        Ok(_) => made.fetch_add(1, Ordering::SeqCst),
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
                        Err(e) => panic!("connect: {e}"),
                    };
                }
            })
        })
        .collect();
    common::wait_until("the flood to begin", || made.load(Ordering::SeqCst) >= 100);
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(daemon.id() as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    // Waited for while the flood goes on.
    let status = wait(&mut daemon, dir.path());
    done.store(true, Ordering::SeqCst);
    for thread in flood {
        thread.join().unwrap();
    }
    assert_eq!(status.code(), Some(0), "{}", log(dir.path()));
}
