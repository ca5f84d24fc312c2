//! Shared pieces of the integration tests: a dispatcher with slow, failing and panicking
//! requests, daemons run in this process or as child processes, and raw frame helpers.
#![allow(dead_code, unreachable_pub)]

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_io::Timer;
use khived::{Client, Config, Daemon, Dispatch, DispatchError, Request, Response, ShutdownHandle};

pub const NAMESPACE: &str = "test";
pub const CONFIG_ID: &str = "cfg-1";

/// Echoes `ops`, except: `sleep:MS` answers after MS milliseconds, `until:PATH` answers
/// once the file PATH exists (the gate of a daemon in another process; both log `test
/// dispatcher: OPS started` first), `fail:MSG` fails with MSG, `refuse:CODE` fails with that
/// code, not committed, `panic` panics, `warming` says whether `warm_all` is still running,
/// `gate` waits until `gate_open` is set (counting itself in `at_gate` first), `big` answers
/// more than a frame holds. `dispatched` counts every call.
#[derive(Debug, Default)]
pub struct TestDispatch {
    pub warming: Arc<AtomicBool>,
    pub warm_for: Duration,
    pub dispatched: Arc<AtomicUsize>,
    pub at_gate: Arc<AtomicUsize>,
    pub gate_open: Arc<AtomicBool>,
    /// The configuration id served, when not [`CONFIG_ID`].
    pub config_id: Option<&'static str>,
}

impl Dispatch for TestDispatch {
    async fn dispatch(&self, request: &Request<'_>) -> Result<String, DispatchError> {
        self.dispatched.fetch_add(1, Ordering::SeqCst);
        let ops = &*request.ops;
        if let Some(ms) = ops.strip_prefix("sleep:") {
            log::info!("test dispatcher: {ops} started");
            Timer::after(Duration::from_millis(ms.parse().unwrap())).await;
        } else if let Some(path) = ops.strip_prefix("until:") {
            log::info!("test dispatcher: {ops} started");
            while !Path::new(path).exists() {
                Timer::after(Duration::from_millis(5)).await;
            }
        } else if let Some(message) = ops.strip_prefix("fail:") {
            return Err(message.into());
        } else if let Some(code) = ops.strip_prefix("refuse:") {
            return Err(DispatchError::new(format!("refused: {code}"))
                .with_code(code)
                .not_committed());
        } else if ops == "gate" {
            self.at_gate.fetch_add(1, Ordering::SeqCst);
            while !self.gate_open.load(Ordering::SeqCst) {
                Timer::after(Duration::from_millis(5)).await;
            }
        } else if ops == "big" {
            return Ok("b".repeat(khived::MAX_FRAME_BYTES));
        } else if ops == "panic" {
            panic!("asked to panic");
        } else if ops == "warming" {
            return Ok(self.warming.load(Ordering::SeqCst).to_string());
        }
        Ok(ops.to_owned())
    }

    async fn warm_all(&self) {
        self.warming.store(true, Ordering::SeqCst);
        Timer::after(self.warm_for).await;
        self.warming.store(false, Ordering::SeqCst);
    }

    fn namespace(&self) -> &str {
        NAMESPACE
    }

    fn config_id(&self) -> &str {
        self.config_id.unwrap_or(CONFIG_ID)
    }
}

pub fn request(ops: &str) -> Request<'_> {
    Request::new(ops, NAMESPACE, CONFIG_ID)
}

/// A fresh private directory for one test's socket and PID file.
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("khived-test")
        .tempdir()
        .unwrap()
}

/// A daemon running on a thread of this process, stopped through its shutdown handle.
pub struct InProcess {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub pid_file: PathBuf,
    pub stop: ShutdownHandle,
    thread: Option<JoinHandle<Result<khived::Stopped, khived::Error>>>,
}

impl InProcess {
    pub fn start(tweak: impl FnOnce(&mut Config, &mut TestDispatch)) -> InProcess {
        let dir = temp_dir();
        let socket = dir.path().join("run").join("khived.sock");
        let mut config = Config::at(&socket);
        config.handle_signals = false;
        let mut dispatch = TestDispatch::default();
        tweak(&mut config, &mut dispatch);
        let pid_file = config.pid_file.clone();
        let daemon = Daemon::new(config, dispatch);
        let stop = daemon.shutdown_handle();
        let thread = std::thread::spawn(move || daemon.run_blocking());
        wait_until_serving(&socket);
        InProcess {
            dir,
            socket,
            pid_file,
            stop,
            thread: Some(thread),
        }
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.socket, Duration::from_secs(10)).unwrap()
    }

    pub fn connect_raw(&self) -> UnixStream {
        let stream = UnixStream::connect(&self.socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream
    }

    /// See [`hold_a_slot`].
    pub fn hold_a_slot(&self) -> UnixStream {
        hold_a_slot(&self.socket)
    }

    /// Stops the daemon and returns what `run` returned.
    pub fn shutdown(mut self) -> Result<khived::Stopped, khived::Error> {
        self.stop.shutdown();
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.stop.shutdown();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A connection to `socket` that has been served once and stays open: with
/// `max_connections = 1` it holds the only slot. Retried while an earlier connection (the
/// readiness probe's) still holds it and this one is turned away.
pub fn hold_a_slot(socket: &Path) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut stream = UnixStream::connect(socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let probe = khived::encode_frame(&Request::probe()).unwrap();
        if raw_exchange(&mut stream, probe.as_bytes()).is_ok_and(|r| r.ok) {
            return stream;
        }
        assert!(Instant::now() < deadline, "no slot came free");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Probes on `client`'s connection until the daemon counts `count` other connections open,
/// and returns its answer. Connections that clients have closed (the readiness probe's,
/// abandoned ones) end when the daemon reads their close, which on a busy machine may come
/// after the next request: a count read at once would depend on timing.
#[allow(dead_code)]
pub fn settled_in_flight(client: &mut Client, count: u64) -> khived::ProbeInfo {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let info = client.probe().unwrap();
        if info.in_flight == count {
            return info;
        }
        assert!(
            Instant::now() < deadline,
            "{} connection(s) open besides this one, expected {count}",
            info.in_flight
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The error of a daemon that must refuse to start; one that starts anyway is stopped after
/// a minute and fails the test (rather than hanging it).
#[allow(dead_code)]
pub fn start_error(mut config: Config) -> String {
    config.handle_signals = false;
    let daemon = Daemon::new(config, TestDispatch::default());
    let stop = daemon.shutdown_handle();
    let run = std::thread::spawn(move || daemon.run_blocking());
    let deadline = Instant::now() + Duration::from_secs(60);
    while !run.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.shutdown();
    match run.join().unwrap() {
        Err(e) => e.to_string(),
        Ok(stopped) => panic!("the daemon started and ran until stopped ({stopped:?})"),
    }
}

/// Probes `socket`, each time on a new connection (which the probe does not count), until
/// the number of other connections open satisfies `wanted`; fails after a minute, naming
/// `what` was waited for.
#[allow(dead_code)]
pub fn wait_for_in_flight(socket: &Path, what: &str, wanted: impl Fn(u64) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let in_flight = khived::probe(socket, Duration::from_secs(5))
            .unwrap()
            .in_flight;
        if wanted(in_flight) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {in_flight} connection(s) open"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until a daemon answers a probe on `socket`.
pub fn wait_until_serving(socket: &Path) -> khived::ProbeInfo {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match khived::probe(socket, Duration::from_secs(2)) {
            Ok(info) => return info,
            Err(e) if Instant::now() > deadline => panic!("no daemon on {socket:?}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Sends `bytes` as they are and reads one response frame.
pub fn raw_exchange(stream: &mut UnixStream, bytes: &[u8]) -> io::Result<Response> {
    stream.write_all(bytes)?;
    read_response(stream)
}

pub fn read_response(stream: &mut UnixStream) -> io::Result<Response> {
    Ok(serde_json::from_slice(&read_response_raw(stream)?).unwrap())
}

/// Whether the peer has closed: a read returns end of stream (or a reset). A read that times
/// out (the stream's read timeout) is no close: the peer kept the connection open that long.
pub fn is_closed(stream: &mut UnixStream) -> bool {
    let mut byte = [0; 1];
    match stream.read(&mut byte) {
        Ok(n) => n == 0,
        Err(e) => !matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ),
    }
}

/// Reads one frame's body, whatever it holds.
pub fn read_response_raw(stream: &mut UnixStream) -> io::Result<Vec<u8>> {
    let mut header = [0; 4];
    stream.read_exact(&mut header)?;
    let mut body = vec![0; u32::from_be_bytes(header) as usize];
    stream.read_exact(&mut body)?;
    Ok(body)
}

pub fn frame(body: &[u8]) -> Vec<u8> {
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(body);
    frame
}

// ---- Daemons as child processes ----------------------------------------------------------

/// Set in a child process: the test binary runs a daemon instead of tests.
const CHILD_ENV: &str = "KHIVED_TEST_CHILD";
const CHILD_TEST: &str = "child_daemon";

/// The body of each test binary's `child_daemon` test. In a normal test run it does nothing;
/// in a child started by [`ChildDaemon::spawn`] it runs a daemon with [`TestDispatch`] from
/// the `KHIVE_*` variables and exits as an embedder's `main` should: with the stop's exit code
/// (0 after a drain, 128 + n after a second signal), 3 if another daemon was already running,
/// 1 on any other error.
pub fn child_main() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    if let Ok(mask) = std::env::var("KHIVED_TEST_UMASK") {
        let mask = rustix::fs::RawMode::from_str_radix(&mask, 8).unwrap();
        rustix::process::umask(rustix::fs::Mode::from_raw_mode(mask));
    }
    khived::init_stderr_logger(log::LevelFilter::Debug);
    let var = |key: &str| std::env::var(key).ok();
    if let Some(limit) = var("KHIVED_TEST_NOFILE") {
        set_nofile(limit.parse().unwrap());
    }
    let mut config = Config::from_env();
    if let Some(secs) = var("KHIVED_TEST_IDLE_SECS") {
        config.idle_shutdown = Some(Duration::from_secs_f64(secs.parse().unwrap()));
    }
    if let Some(secs) = var("KHIVED_TEST_FIRST_REQUEST_SECS") {
        config.first_request_timeout = Duration::from_secs_f64(secs.parse().unwrap());
    }
    if let Some(max) = var("KHIVED_TEST_MAX_CONNECTIONS") {
        config.max_connections = max.parse().unwrap();
    }
    if let Some(limit) = var("KHIVED_TEST_NOFILE_ONCE_SERVING") {
        // Lowered once the daemon serves, so that connections, not start-up, run out of
        // descriptors (the connection cap is computed from the limit at start).
        let socket = config.socket.clone();
        std::thread::spawn(move || {
            wait_until_serving(&socket);
            set_nofile(limit.parse().unwrap());
            eprintln!("test: open-file limit lowered to {limit}");
        });
    }
    let code = match Daemon::new(config, TestDispatch::default()).run_blocking() {
        Ok(stopped) => i32::from(stopped.exit_code()),
        Err(e @ khived::Error::AlreadyRunning { .. }) => {
            eprintln!("{e}");
            3
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    };
    std::process::exit(code);
}

fn set_nofile(limit: u64) {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut rlimit = getrlimit(Resource::Nofile);
    rlimit.current = Some(limit);
    setrlimit(Resource::Nofile, rlimit).unwrap();
}

/// The resident memory of process `pid`, in KiB.
#[cfg(target_os = "linux")]
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The resident memory of process `pid`, in KiB, as `ps` tells it where there is no `/proc`.
#[cfg(not(target_os = "linux"))]
pub fn rss_kib(pid: u32) -> u64 {
    let ps = Command::new("ps")
        .args(["-o", "rss=", "-p", &pid.to_string()])
        .output()
        .unwrap();
    assert!(ps.status.success(), "ps -p {pid} failed");
    String::from_utf8_lossy(&ps.stdout).trim().parse().unwrap()
}

/// A daemon in a child process (this test binary, re-run as [`child_main`]).
pub struct ChildDaemon {
    pub child: Child,
    pub socket: PathBuf,
    pub pid_file: PathBuf,
    pub log: PathBuf,
}

/// The command that runs a child daemon on `socket`, with its PID file beside it.
pub fn child_command(socket: &Path, env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([CHILD_TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .env("KHIVE_SOCKET", socket)
        .env("KHIVE_PID", socket.with_extension("pid"));
    for (key, value) in env {
        command.env(key, value);
    }
    command
}

impl ChildDaemon {
    /// Starts a daemon on `socket` with extra environment variables; does not wait for it.
    pub fn spawn(socket: &Path, env: &[(&str, &str)]) -> ChildDaemon {
        let pid_file = socket.with_extension("pid");
        let dir = socket.parent().unwrap();
        std::fs::create_dir_all(dir).unwrap();
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        let log = socket.with_extension(format!("{}.log", rand_suffix()));
        let mut command = child_command(socket, env);
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        ChildDaemon {
            child: command.spawn().unwrap(),
            socket: socket.to_owned(),
            pid_file,
            log,
        }
    }

    /// Starts a daemon and waits until it answers.
    pub fn start(socket: &Path, env: &[(&str, &str)]) -> ChildDaemon {
        let daemon = ChildDaemon::spawn(socket, env);
        let info = wait_until_serving(socket);
        assert_eq!(info.pid, daemon.pid());
        daemon
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.pid() as i32).unwrap();
        rustix::process::kill_process(pid, signal).unwrap();
    }

    pub fn terminate(&self) {
        self.signal(rustix::process::Signal::TERM);
    }

    /// Waits for the process to end, failing the test after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let log = self.log.clone();
        wait_exit(&mut self.child, timeout, || read_log(&log))
    }

    pub fn log(&self) -> String {
        read_log(&self.log)
    }

    /// Waits until the log contains `needle`.
    pub fn wait_for_log(&self, needle: &str) {
        wait_for_text(needle, || self.log());
    }
}

/// Starts a request that the daemon holds until the file `release` exists, and waits until
/// the daemon holds it.
pub fn start_held_request(
    daemon: &ChildDaemon,
    release: &std::path::Path,
) -> JoinHandle<io::Result<Response>> {
    let socket = daemon.socket.clone();
    let ops = format!("until:{}", release.display());
    let log_line = format!("test dispatcher: {ops} started");
    let held = std::thread::spawn(move || {
        // Answered only once released: the deadline only keeps a failure from hanging.
        let mut client = Client::connect(&socket, Duration::from_secs(120))?;
        client.request(&request(&ops))
    });
    daemon.wait_for_log(&log_line);
    held
}

/// Waits for `child` to exit, failing the test after `timeout` with `log()` in the message.
pub fn wait_exit(child: &mut Child, timeout: Duration, log: impl Fn() -> String) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "still running after {timeout:?}; log:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until `done()` holds, looking every 10 ms; fails the test after a minute, naming
/// `what` was waited for. The minute only keeps a regression from hanging the test: the
/// verdict never depends on how soon `done` holds.
pub fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until `log()` contains `needle`, failing the test after a minute.
pub fn wait_for_text(needle: &str, log: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = log();
        if text.contains(needle) {
            return;
        }
        assert!(Instant::now() < deadline, "no {needle:?} in log:\n{text}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A log file's text so far ("" before it exists).
pub fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

impl Drop for ChildDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::AtomicU64;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Reads of one file as the kernel reports them (inotify; Linux only): the event that tells a
/// test that someone has looked into a PID file, for tests that must act only once such a
/// look is under way.
#[cfg(target_os = "linux")]
pub struct FileReads {
    inotify: std::os::fd::OwnedFd,
    path: PathBuf,
}

#[cfg(target_os = "linux")]
impl FileReads {
    /// Starts watching `path`, which must exist; earlier reads are not seen.
    pub fn watch(path: &Path) -> FileReads {
        use rustix::fs::inotify::{self, CreateFlags, WatchFlags};
        let inotify = inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK).unwrap();
        inotify::add_watch(&inotify, path, WatchFlags::ACCESS).unwrap();
        FileReads {
            inotify,
            path: path.to_owned(),
        }
    }

    /// How many reads were reported since the last look (at least one per burst: the kernel
    /// merges a read into the previous one while that one is unread); forgets them.
    pub fn take(&self) -> usize {
        use rustix::fs::inotify::{ReadFlags, Reader};
        let mut buf = [std::mem::MaybeUninit::uninit(); 4096];
        let mut reader = Reader::new(&self.inotify, &mut buf);
        let mut reads = 0;
        loop {
            match reader.next() {
                Ok(event) if event.events().contains(ReadFlags::ACCESS) => reads += 1,
                Ok(_) => {}
                Err(rustix::io::Errno::WOULDBLOCK) => return reads,
                Err(e) => panic!("reading the inotify events of {:?}: {e}", self.path),
            }
        }
    }

    /// Waits until the file is read (a read since the last look counts), failing the test
    /// after a minute, naming `what` was waited for.
    pub fn wait(&self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.take() == 0 {
            assert!(
                Instant::now() < deadline,
                "{what}: {:?} was not read",
                self.path
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Whether process `pid` has exited: gone, or a zombie waiting for whoever adopted it.
pub fn process_exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => !khived::is_process_running(pid),
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
    }
}
