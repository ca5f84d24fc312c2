//! Local attacks and accidents: a planted log file, a half-set environment, a hung daemon, a
//! closed terminal, another user's socket or directory, a daemon at its cap, a failed bind.
//! None of them may take the daemon's or a client's files, socket or requests.

mod common;

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{request, temp_dir, ChildDaemon, InProcess};
use khived::Config;
use rustix::process::Signal;

const KHIVED: &str = env!("CARGO_BIN_EXE_khived");

/// Generous: these guard against a hang, they do not measure anything.
const GUARD: Duration = Duration::from_secs(60);

/// Entry point of the child daemons; does nothing in a normal test run.
#[test]
fn child_daemon() {
    common::child_main();
}

/// `khived COMMAND` with a private `HOME` and no `KHIVE_*` variables, so that nothing of the
/// user running the tests is read or touched.
fn khived(home: &Path, command: &str) -> Command {
    let mut khived = Command::new(KHIVED);
    khived
        .arg(command)
        .env("HOME", home)
        .env_remove("KHIVE_SOCKET")
        .env_remove("KHIVE_PID")
        .stdin(Stdio::null());
    khived
}

/// Runs `command` to its end, killing it (and failing the test) if it hangs.
fn run_guarded(mut command: Command) -> Output {
    let out = tempfile::NamedTempFile::new().unwrap();
    let err = tempfile::NamedTempFile::new().unwrap();
    let mut child = KillOnDrop(
        command
            .stdout(out.reopen().unwrap())
            .stderr(err.reopen().unwrap())
            .spawn()
            .unwrap(),
    );
    let status = common::wait_exit(&mut child.0, GUARD, || common::read_log(err.path()));
    Output {
        status,
        stdout: std::fs::read(out.path()).unwrap(),
        stderr: std::fs::read(err.path()).unwrap(),
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Stops whatever daemon runs on `socket` when dropped, so a test that fails (or a fix that
/// is missing) leaves no daemon behind.
struct StopOnDrop {
    home: PathBuf,
    socket: PathBuf,
    pid_file: PathBuf,
}

impl StopOnDrop {
    /// For a daemon on `socket` with its PID file beside it, started with `home` as HOME.
    fn new(home: &Path, socket: &Path) -> Self {
        StopOnDrop {
            home: home.to_owned(),
            socket: socket.to_owned(),
            pid_file: socket.with_extension("pid"),
        }
    }
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = khived(&self.home, "stop")
            .arg("--socket")
            .arg(&self.socket)
            .arg("--pid")
            .arg(&self.pid_file)
            .args(["--force", "--timeout", "5"])
            .output();
    }
}

// ---- call --spawn and its log file ----------------------------------------------------------

fn spawn_call(home: &Path, socket: &Path) -> Command {
    let mut call = khived(home, "call");
    call.arg("--spawn")
        .arg("--socket")
        .arg(socket)
        .arg("--pid")
        .arg(socket.with_extension("pid"))
        .args(["--timeout", "3", "hello"]);
    call
}

#[test]
fn spawn_refuses_a_symlinked_log_and_leaves_its_target_alone() {
    let dir = temp_dir();
    let socket = dir.path().join("k.sock");
    let _stop = StopOnDrop::new(dir.path(), &socket);
    let target = dir.path().join("elsewhere");
    std::fs::write(&target, "precious").unwrap();
    std::os::unix::fs::symlink(&target, socket.with_extension("log")).unwrap();
    let output = run_guarded(spawn_call(dir.path(), &socket));
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(3), "{text}");
    assert!(text.contains("is a symbolic link"), "{text}");
    assert!(text.contains(&socket.with_extension("log").display().to_string()));
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious");
    assert!(!socket.exists(), "no daemon was started");
}

#[test]
fn spawn_does_not_hang_on_a_fifo_log() {
    let dir = temp_dir();
    let socket = dir.path().join("k.sock");
    let _stop = StopOnDrop::new(dir.path(), &socket);
    let fifo = socket.with_extension("log");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let output = run_guarded(spawn_call(dir.path(), &socket));
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(3), "{text}");
    assert!(text.contains("is not a regular file"), "{text}");
    assert!(!socket.exists(), "no daemon was started");
    // The spawn lock was let go: a later call is not stuck behind it.
    std::fs::remove_file(&fifo).unwrap();
    let output = run_guarded(spawn_call(dir.path(), &socket));
    assert_eq!(stdout(&output), "hello\n", "{}", stderr(&output));
}

#[test]
fn stop_does_not_hang_on_a_fifo_pid_file() {
    let dir = temp_dir();
    let pid_file = dir.path().join("k.pid");
    let made = Command::new("mkfifo").arg(&pid_file).status().unwrap();
    assert!(made.success());
    let mut stop = khived(dir.path(), "stop");
    stop.arg("--pid").arg(&pid_file);
    let output = run_guarded(stop);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("is not a regular file"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn spawn_creates_nothing_in_a_directory_the_daemon_would_refuse() {
    let dir = temp_dir();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    // Sticky, like /tmp: a client may connect to a socket there (it checks who serves it),
    // but the daemon would not run there, so nothing may be created there either.
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let socket = shared.join("k.sock");
    let _stop = StopOnDrop::new(dir.path(), &socket);
    let output = run_guarded(spawn_call(dir.path(), &socket));
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(3), "{text}");
    assert!(
        text.contains("writable by group or others (mode 1777)"),
        "{text}"
    );
    assert!(
        text.contains(&format!("chmod 700 {}", shared.display())),
        "{text}"
    );
    let left: Vec<_> = std::fs::read_dir(&shared).unwrap().collect();
    assert!(left.is_empty(), "files created: {left:?}");
}

// ---- KHIVE_SOCKET without KHIVE_PID, and the other way round --------------------------------

#[test]
fn only_one_of_the_variables_set_keeps_daemons_apart() {
    let dir = temp_dir();
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let (a, b) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let _stop_a = StopOnDrop::new(&home, &a);
    let _stop_b = StopOnDrop::new(&home, &b);
    let serve = |socket: &Path| {
        let mut serve = khived(&home, "serve");
        serve
            .env("KHIVE_SOCKET", socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        serve.spawn().unwrap()
    };
    let mut first = serve(&a);
    let a_pid = common::wait_until_serving(&a).pid;
    assert_eq!(a_pid, first.id());
    let mut second = serve(&b);
    let b_pid = common::wait_until_serving(&b).pid;
    assert_eq!(b_pid, second.id());
    // Each PID file is beside its socket; nothing went to the default state directory.
    assert_eq!(
        std::fs::read_to_string(a.with_extension("pid")).unwrap(),
        a_pid.to_string()
    );
    assert_eq!(
        std::fs::read_to_string(b.with_extension("pid")).unwrap(),
        b_pid.to_string()
    );
    assert!(!home.join(".khive").join("khived.pid").exists());

    // Stopping b by its socket alone stops b, not a.
    let stop = khived(&home, "stop")
        .env("KHIVE_SOCKET", &b)
        .output()
        .unwrap();
    assert!(stop.status.success(), "{}", stderr(&stop));
    assert_eq!(stdout(&stop), format!("stopped khived (pid {b_pid})\n"));
    common::wait_exit(&mut second, GUARD, String::new);
    assert_eq!(khived::probe(&a, GUARD).unwrap().pid, a_pid);

    // KHIVE_PID alone finds the socket beside it, and so does --pid alone.
    let status = khived(&home, "status")
        .env("KHIVE_PID", a.with_extension("pid"))
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", stdout(&status));
    assert!(stdout(&status).contains(&a.display().to_string()));
    let stop = khived(&home, "stop")
        .arg("--pid")
        .arg(a.with_extension("pid"))
        .output()
        .unwrap();
    assert_eq!(stdout(&stop), format!("stopped khived (pid {a_pid})\n"));
    common::wait_exit(&mut first, GUARD, String::new);
    assert!(!a.exists() && !b.exists());
}

// ---- a hung daemon keeps its socket -------------------------------------------------------

#[test]
fn a_hung_daemon_keeps_its_socket() {
    let dir = temp_dir();
    let socket = dir.path().join("a.sock");
    let mut first = ChildDaemon::start(&socket, &[]);
    let inode = std::fs::metadata(&socket).unwrap().ino();
    first.signal(Signal::STOP);
    // A second daemon on the same socket, with a PID file of its own: the lock does not
    // stop it, the socket must.
    let other_pid = dir.path().join("other.pid");
    let log = dir.path().join("second.log");
    let mut command = common::child_command(&socket, &[]);
    command
        .env("KHIVE_PID", &other_pid)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut second = ChildDaemon {
        child: command.spawn().unwrap(),
        socket: socket.clone(),
        pid_file: other_pid.clone(),
        log,
    };
    let status = second.wait(GUARD);
    let text = second.log();
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!(
            "{} accepts connections but does not answer",
            socket.display()
        )),
        "{text}"
    );
    assert!(text.contains(&format!("pid {}", first.pid())), "{text}");
    assert_eq!(std::fs::metadata(&socket).unwrap().ino(), inode);
    assert!(!other_pid.exists());
    // Woken up, the first daemon serves on, and stops cleanly.
    first.signal(Signal::CONT);
    assert_eq!(common::wait_until_serving(&socket).pid, first.pid());
    first.terminate();
    assert_eq!(first.wait(GUARD).code(), Some(0), "{}", first.log());
    assert!(!socket.exists());
}

// ---- SIGHUP -------------------------------------------------------------------------------

#[test]
fn sighup_drains_and_removes_the_files() {
    let dir = temp_dir();
    let mut daemon = ChildDaemon::start(&dir.path().join("k.sock"), &[]);
    // Held until the test lets it go: it is in flight when the signal comes.
    let ops = format!("until:{}", dir.path().join("release").display());
    let mut stream = UnixStream::connect(&daemon.socket).unwrap();
    stream.set_read_timeout(Some(GUARD)).unwrap();
    stream
        .write_all(khived::encode_frame(&request(&ops)).unwrap().as_bytes())
        .unwrap();
    daemon.wait_for_log(&format!("test dispatcher: {ops} started"));
    daemon.signal(Signal::HUP);
    daemon.wait_for_log("stopping (SIGHUP received): listener closed, draining 1 connection(s)");
    std::fs::write(dir.path().join("release"), "").unwrap();
    let response = common::read_response(&mut stream).unwrap();
    assert_eq!(response.result.as_deref(), Some(ops.as_str()));
    assert_eq!(daemon.wait(GUARD).code(), Some(0), "{}", daemon.log());
    assert!(!daemon.socket.exists() && !daemon.pid_file.exists());
}

// ---- another user's socket, a writable ancestor -------------------------------------------

// Linux only: other systems have no per-thread setuid to listen as a stranger with.
#[cfg(target_os = "linux")]
#[test]
fn clients_refuse_a_socket_served_by_another_user() {
    if !rustix::process::geteuid().is_root() {
        println!("skipped: listening as another user needs root (setuid on a thread)");
        return;
    }
    let dir = temp_dir();
    let socket = dir.path().join("k.sock");
    let fd = rustix::net::socket(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::STREAM,
        None,
    )
    .unwrap();
    rustix::net::bind(&fd, &rustix::net::SocketAddrUnix::new(&socket).unwrap()).unwrap();
    // The kernel records the listener's credentials at `listen`: this thread alone becomes
    // uid 65534 (the raw system call is per thread), then listens and reads what it is sent.
    let (listening, listened) = std::sync::mpsc::channel();
    let stranger = std::thread::spawn(move || {
        rustix::thread::set_thread_uid(rustix::process::Uid::from_raw(65534)).unwrap();
        rustix::net::listen(&fd, 8).unwrap();
        listening.send(()).unwrap();
        let mut received = Vec::new();
        for _ in 0..4 {
            let conn = rustix::net::accept(&fd).unwrap();
            let mut stream = UnixStream::from(conn);
            stream.set_read_timeout(Some(GUARD)).unwrap();
            let _ = std::io::Read::read_to_end(&mut stream, &mut received);
        }
        received
    });
    listened.recv().unwrap();
    let error = khived::Client::connect(&socket, GUARD).unwrap_err();
    assert_eq!(
        error.kind(),
        std::io::ErrorKind::PermissionDenied,
        "{error}"
    );
    let text = error.to_string();
    assert!(text.contains("runs as uid 65534"), "{text}");
    assert!(text.contains(&socket.display().to_string()), "{text}");
    let error = async_io::block_on(khived::AsyncClient::connect(&socket, GUARD)).unwrap_err();
    assert_eq!(
        error.kind(),
        std::io::ErrorKind::PermissionDenied,
        "{error}"
    );
    assert!(error.to_string().contains("runs as uid 65534"), "{error}");
    let call = khived(dir.path(), "call")
        .arg("--socket")
        .arg(&socket)
        .arg("--pid")
        .arg(socket.with_extension("pid"))
        .arg("secret")
        .output()
        .unwrap();
    assert_eq!(call.status.code(), Some(3), "{}", stderr(&call));
    assert!(
        stderr(&call).contains("runs as uid 65534"),
        "{}",
        stderr(&call)
    );
    let status = khived(dir.path(), "status")
        .arg("--socket")
        .arg(&socket)
        .arg("--pid")
        .arg(socket.with_extension("pid"))
        .output()
        .unwrap();
    assert_eq!(status.status.code(), Some(77), "{}", stdout(&status));
    assert!(
        stdout(&status).contains("runs as uid 65534"),
        "{}",
        stdout(&status)
    );
    assert_eq!(
        stranger.join().unwrap(),
        b"",
        "nothing was sent to the stranger"
    );
}

#[test]
fn a_writable_ancestor_is_refused_by_daemon_and_client() {
    let dir = temp_dir();
    let ancestor = dir.path().join("shared");
    std::fs::create_dir(&ancestor).unwrap();
    std::fs::set_permissions(&ancestor, std::fs::Permissions::from_mode(0o775)).unwrap();
    let socket = ancestor.join("run").join("k.sock");
    let error = common::start_error(Config::at(&socket));
    assert!(error.contains("writable by group or others"), "{error}");
    assert!(
        error.contains(&format!("chmod go-w {}", ancestor.display())),
        "{error}"
    );
    assert!(!ancestor.join("run").exists(), "nothing created below it");

    // Nor through a symbolic link whose target lies below it.
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(ancestor.join("run"), &link).unwrap();
    let error = common::start_error(Config::at(link.join("k.sock")));
    assert!(
        error.contains(&format!("chmod go-w {}", ancestor.display())),
        "{error}"
    );
    assert!(!ancestor.join("run").exists(), "nothing created below it");

    // A daemon already running when its ancestor becomes writable: clients stop trusting it.
    let daemon = InProcess::start(|_, _| {});
    let root = daemon.dir.path().to_owned();
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o770)).unwrap();
    let error = khived::Client::connect(&daemon.socket, GUARD).unwrap_err();
    // Nor the PID file, which says whom `khived stop` signals.
    let pid_error = khived::running_pid(&daemon.pid_file).unwrap_err();
    // `khived status` names the case, with a state and an exit status of its own.
    let status = run_guarded({
        let mut status = khived(&root, "status");
        status
            .arg("--json")
            .arg("--socket")
            .arg(&daemon.socket)
            .arg("--pid")
            .arg(&daemon.pid_file);
        status
    });
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700)).unwrap();
    assert_eq!(status.status.code(), Some(77), "{}", stdout(&status));
    let report: serde_json::Value = serde_json::from_str(&stdout(&status)).unwrap();
    assert_eq!(report["state"], "untrusted", "{report}");
    let why = report["error"].as_str().unwrap_or_default();
    assert!(
        why.contains(&format!("chmod go-w {}", root.display())),
        "{report}"
    );
    assert_eq!(
        pid_error.kind(),
        std::io::ErrorKind::PermissionDenied,
        "{pid_error}"
    );
    assert!(
        pid_error
            .to_string()
            .contains(&format!("chmod go-w {}", root.display())),
        "{pid_error}"
    );
    assert_eq!(
        error.kind(),
        std::io::ErrorKind::PermissionDenied,
        "{error}"
    );
    let text = error.to_string();
    assert!(
        text.contains(&format!("chmod go-w {}", root.display())),
        "{text}"
    );
    assert!(
        daemon
            .client()
            .request(&request("trusted again"))
            .unwrap()
            .ok
    );
}

// ---- the README's Python client at the connection cap -------------------------------------

/// The README's Python block, as a reader would copy it.
fn readme_python() -> String {
    let readme = include_str!("../README.md");
    let start = readme.find("```python\n").expect("a python block") + "```python\n".len();
    let end = start + readme[start..].find("```").unwrap();
    readme[start..end].to_owned()
}

#[test]
fn the_readme_python_client_reads_the_busy_reply() {
    let dir = temp_dir();
    let socket = dir.path().join("k.sock");
    let log = dir.path().join("serve.log");
    let server = khived(dir.path(), "serve")
        .arg("--socket")
        .arg(&socket)
        .arg("--pid")
        .arg(socket.with_extension("pid"))
        .args(["--max-connections", "1"])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let _server = KillOnDrop(server);
    common::wait_until_serving(&socket);
    // A request far larger than the socket's buffer: the daemon answers `daemon_busy` and
    // closes while the client is still sending, which is when the send fails.
    let script = format!(
        "{}\nreply = call('x' * (4 << 20))\nprint('REPLY', reply['error'])\n",
        readme_python()
    );
    let deadline = Instant::now() + GUARD;
    loop {
        // Holds the only slot, once the readiness probe's connection is gone.
        let _holder = UnixStream::connect(&socket).unwrap();
        let output = run_guarded({
            let mut python = Command::new("python3");
            python.arg("-c").arg(&script).env("KHIVE_SOCKET", &socket);
            python
        });
        let text = stdout(&output);
        assert!(output.status.success(), "{text}{}", stderr(&output));
        if text.contains("REPLY daemon_busy: 1 connections open") {
            break;
        }
        // The holder came while the probe's slot was still counted, and was turned away.
        assert!(
            Instant::now() < deadline,
            "never busy: {text}\n{}",
            common::read_log(&log)
        );
    }
}

// ---- a start that fails after taking the PID file -----------------------------------------

#[test]
fn a_failed_start_removes_its_pid_file() {
    let dir = temp_dir();
    let pid_file = dir.path().join("k.pid");
    let start = |socket: PathBuf| {
        let mut config = Config::at(&socket);
        config.pid_file = pid_file.clone();
        common::start_error(config)
    };
    // Something that is not a socket is in the way.
    let occupied = dir.path().join("k.sock");
    std::fs::write(&occupied, "data").unwrap();
    let error = start(occupied.clone());
    assert!(error.contains("exists and is not a socket"), "{error}");
    assert!(!pid_file.exists(), "PID file left behind: {error}");
    assert_eq!(std::fs::read_to_string(&occupied).unwrap(), "data");
    // bind itself fails: a path that ends in a slash names a directory, which bind cannot
    // create. The PID file was written by then.
    let socket = PathBuf::from(format!("{}/", dir.path().join("d.sock").display()));
    let error = start(socket.clone());
    assert!(
        error.contains(&format!("cannot bind {}", socket.display())),
        "{error}"
    );
    assert!(!pid_file.exists(), "PID file left behind: {error}");
}
