//! `khived`: run a warm daemon and talk to it from scripts.
//!
//! `serve` runs the daemon (an echo dispatcher, or a pool of worker processes); `start` and
//! `restart` run it in the background; `call` sends one request, starting the daemon first
//! with `--spawn`; `status` and `stop` manage it.

mod args;

use std::ffi::OsString;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use args::{Call, Command, Common, Serve, Start, Status, Stop};
use khived::pool::{Pool, PoolOptions};
use khived::{Client, Config, Daemon, Dispatch, DispatchError, ProbeInfo, Request, Response};

/// Exit statuses a script can branch on.
mod status {
    pub(crate) const OK: u8 = 0;
    /// The dispatcher answered with an error, or the command failed.
    pub(crate) const FAILED: u8 = 1;
    pub(crate) const USAGE: u8 = 2;
    /// No daemon answered (not running, or no answer in time).
    pub(crate) const UNREACHABLE: u8 = 3;
    /// The daemon serves another namespace or configuration.
    pub(crate) const MISMATCH: u8 = 4;
    /// `serve`, `start`: another daemon already runs on the socket.
    pub(crate) const ALREADY_RUNNING: u8 = 5;
    /// `status`: something holds the socket or the PID file but no answer came in time.
    pub(crate) const NOT_ANSWERING: u8 = 7;
    /// `call`: the daemon refused the request for now without running it (`daemon_busy`,
    /// `daemon_draining`); the same call may be made again. `status`: the daemon answered
    /// `daemon_busy` (at its connection cap, or its frame memory in use). `EX_TEMPFAIL` of
    /// sysexits.h.
    pub(crate) const RETRY: u8 = 75;
    /// `status`: the socket is not this user's to trust (`EX_NOPERM` of sysexits.h).
    pub(crate) const UNTRUSTED: u8 = 77;
}

fn main() -> ExitCode {
    let command = match args::parse(std::env::args_os().skip(1)) {
        Ok(command) => command,
        Err(usage) => {
            eprintln!("khived: {usage}");
            return ExitCode::from(status::USAGE);
        }
    };
    ExitCode::from(match command {
        Command::Help(text) => {
            print!("{text}");
            status::OK
        }
        Command::Version => {
            println!("khived {}", env!("CARGO_PKG_VERSION"));
            status::OK
        }
        Command::Serve(serve) => run_serve(serve),
        Command::Start(start) => run_start(start),
        Command::Restart(start) => run_restart(start),
        Command::Call(call) => run_call(call),
        Command::Status(options) => run_status(options),
        Command::Stop(options) => run_stop(options),
    })
}

fn fail(code: u8, message: impl std::fmt::Display) -> u8 {
    eprintln!("khived: {message}");
    code
}

// ---- serve --------------------------------------------------------------------------------

/// The built-in dispatcher: the result is the request's `ops`.
struct Echo {
    namespace: String,
    config_id: String,
}

impl Dispatch for Echo {
    async fn dispatch(&self, request: &Request<'_>) -> Result<String, DispatchError> {
        Ok(request.ops.to_string())
    }

    fn namespace(&self) -> &str {
        &self.namespace
    }

    fn config_id(&self) -> &str {
        &self.config_id
    }
}

fn run_serve(serve: Serve) -> u8 {
    let (level, unknown) = log_level(std::env::var("KHIVED_LOG").ok().as_deref(), serve.verbosity);
    match &serve.log_file {
        // Log records go through a file that rotates at its size limit, so a chatty daemon
        // (or worker) cannot fill the disk; standard error follows the current file for what
        // is not a record (a panic's message), also after a rotation.
        Some(path) => {
            let file = match khived::RotatingFile::open(path).and_then(|f| f.redirect_stderr()) {
                Ok(file) => file,
                Err(e) => return fail(status::FAILED, e),
            };
            khived::init_file_logger(file, level);
        }
        None => {
            khived::init_stderr_logger(level);
        }
    }
    if let Some(value) = unknown {
        log::warn!(
            "KHIVED_LOG={value:?} is not a log level (error, warn, info, debug, trace or off); \
             using info"
        );
    }
    let config = daemon_config(&serve);
    let result = match pool_options(&serve) {
        None => Daemon::new(
            config,
            Echo {
                namespace: serve.namespace,
                config_id: serve.config_id,
            },
        )
        .run_blocking(),
        Some(options) => match Pool::new(options) {
            Ok(pool) => Daemon::new(config, pool).run_blocking(),
            Err(e) => return fail(status::USAGE, e),
        },
    };
    match result {
        // 0 after a drain, 128 + n when a second signal forced the stop.
        Ok(stopped) => stopped.exit_code(),
        Err(khived::Error::AlreadyRunning { pid }) => already_running(pid),
        Err(e) => fail(status::FAILED, e),
    }
}

/// The error for a daemon already running, in the binary's own words (the library's message
/// starts with the program's name, which `fail` prints already).
fn already_running(pid: Option<u32>) -> u8 {
    match pid {
        Some(pid) => fail(
            status::ALREADY_RUNNING,
            format!("already running as pid {pid}"),
        ),
        None => fail(
            status::ALREADY_RUNNING,
            "already running (its pid could not be read)",
        ),
    }
}

/// The log level from `KHIVED_LOG` (any case; default info), moved by `-v`/`-q`, and the
/// variable's value if it is not a level.
fn log_level(env: Option<&str>, verbosity: i8) -> (log::LevelFilter, Option<String>) {
    use log::LevelFilter;
    let levels = [
        LevelFilter::Off,
        LevelFilter::Error,
        LevelFilter::Warn,
        LevelFilter::Info,
        LevelFilter::Debug,
        LevelFilter::Trace,
    ];
    let value = env.map(str::trim).unwrap_or_default();
    let (base, unknown) = if value.is_empty() {
        (LevelFilter::Info, None)
    } else {
        match levels
            .iter()
            .find(|level| level.as_str().eq_ignore_ascii_case(value))
        {
            Some(&level) => (level, None),
            None => (LevelFilter::Info, Some(value.to_owned())),
        }
    };
    let index = levels.iter().position(|&level| level == base).unwrap_or(3) as i32;
    let moved = (index + i32::from(verbosity)).clamp(0, levels.len() as i32 - 1);
    (levels[moved as usize], unknown)
}

// ---- call ---------------------------------------------------------------------------------

fn run_call(mut call: Call) -> u8 {
    if call.ops == "-" {
        match read_stdin() {
            Ok(ops) => call.ops = ops,
            Err(e) => {
                return fail(
                    status::FAILED,
                    format!("cannot read OPS from standard input: {e}"),
                )
            }
        }
    }
    let mut request = Request::new(
        call.ops.as_str(),
        call.serve.namespace.as_str(),
        call.serve.config_id.as_str(),
    );
    request.presentation = call.presentation.as_deref().map(Into::into);
    // A request that no daemon would take is the caller's mistake, not an unreachable daemon:
    // said before anything is connected to or started. (Encoded again to be sent: a request
    // this size costs milliseconds, and a call sends one.)
    if let Err(e) = khived::encode_frame(&request) {
        return fail(
            status::USAGE,
            format!("cannot send this request: {e}; send less OPS per call"),
        );
    }
    let connected = if call.spawn {
        // The call's deadline is also how long the daemon it starts may take (or one that
        // drains may take to let go): at least the 5 s that `Spawn` gives by default.
        spawner(&call.serve)
            .ready_timeout(call.timeout.max(Duration::from_secs(5)))
            .connect(call.timeout)
    } else {
        Client::connect(&call.serve.common.socket, call.timeout)
    };
    let mut client = match connected {
        Ok(client) => client,
        // `--spawn --replace` and a daemon too busy to say what it serves: it answered, and
        // the call may be tried again shortly, as with its `daemon_busy` to a request.
        Err(e) if e.kind() == std::io::ErrorKind::ResourceBusy => return fail(status::RETRY, e),
        Err(e) => return fail(status::UNREACHABLE, format!("daemon unreachable: {e}")),
    };
    let response = match client.request(&request) {
        Ok(response) => response,
        Err(e) => return fail(status::UNREACHABLE, format!("daemon unreachable: {e}")),
    };
    report(&call, &mut client, response)
}

/// All of standard input, less one trailing newline (as `echo` and here-documents add one).
fn read_stdin() -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::io::stdin().read_to_string(&mut text)?;
    let trimmed = text.strip_suffix('\n').unwrap_or(&text);
    let trimmed = trimmed.strip_suffix('\r').unwrap_or(trimmed);
    Ok(trimmed.to_owned())
}

fn report(call: &Call, client: &mut Client, response: Response) -> u8 {
    let code = call_status(&response);
    if call.json {
        // The whole response, for programs; the exit status says the same as without --json.
        match serde_json::to_string(&response) {
            Ok(json) => println!("{json}"),
            Err(e) => return fail(status::FAILED, e),
        }
        return code;
    }
    let ours = &call.serve;
    match code {
        status::OK => println!("{}", response.result.unwrap_or_default()),
        status::MISMATCH if response.version_mismatch => {
            eprintln!("khived: {}", response.error.unwrap_or_default());
        }
        status::MISMATCH if response.namespace_mismatch => {
            let theirs = match client.probe() {
                Ok(info) => format!("{:?}", info.namespace),
                Err(_) => "another one".to_owned(),
            };
            eprintln!(
                "khived: namespace mismatch: this call is for {:?}, the daemon serves {theirs}",
                ours.namespace
            );
        }
        status::MISMATCH => {
            let theirs = response
                .served_config_id
                .map_or("none (an older daemon)".to_owned(), |id| format!("{id:?}"));
            eprintln!(
                "khived: config mismatch: this call has config id {:?}, the daemon serves {theirs}",
                ours.config_id
            );
        }
        _ => {
            let error = response
                .error
                .unwrap_or_else(|| "request failed".to_owned());
            eprintln!("khived: {error}");
        }
    }
    code
}

/// The exit status for a response (see `khived call --help`): 0 ok, 4 the daemon is not the
/// one this call needs, 75 refused for now (retry), 1 any other error.
fn call_status(response: &Response) -> u8 {
    let mismatch = response.version_mismatch || response.namespace_mismatch;
    if mismatch || response.config_mismatch || response.served_config_id.is_none() {
        return status::MISMATCH;
    }
    if response.ok {
        return status::OK;
    }
    if response.is_retryable() {
        return status::RETRY;
    }
    status::FAILED
}

fn current_exe() -> std::path::PathBuf {
    std::env::current_exe().unwrap_or_else(|_| "khived".into())
}

// ---- start and restart -------------------------------------------------------------------

fn run_start(start: Start) -> u8 {
    let common = &start.serve.common;
    if start.serve.replace {
        return replace(&start);
    }
    match khived::probe(&common.socket, Duration::from_secs(2)) {
        Ok(info) => return already_running(Some(info.pid)),
        // One at its connection cap answers `daemon_busy`: it runs all the same.
        Err(e) if e.kind() == std::io::ErrorKind::ResourceBusy => {
            return already_running(khived::running_pid(&common.pid_file).ok().flatten())
        }
        Err(_) => {}
    }
    // A daemon that holds the PID file but does not answer (starting, draining, stopped)
    // would make the new one fail: say so instead of waiting for it.
    match khived::running_pid(&common.pid_file) {
        Ok(Some(pid)) => {
            return fail(
                status::ALREADY_RUNNING,
                format!(
                    "pid {pid} holds {} but does not answer; see 'khived status'",
                    common.pid_file.display()
                ),
            )
        }
        Ok(None) => {}
        Err(e) => return fail(status::FAILED, e),
    }
    started(spawner(&start.serve), &start, "cannot start the daemon")
}

/// Whether a daemon answers on `socket`, one at its connection cap (`daemon_busy`) included.
fn answers(socket: &std::path::Path) -> bool {
    khived::Client::connect(socket, Duration::from_secs(2))
        .and_then(|mut client| client.request(&khived::Request::probe()))
        .is_ok()
}

/// Starts a daemon that takes over from the running one (or starts as usual if none runs),
/// and prints its pid once it answers.
fn replace(start: &Start) -> u8 {
    let why = "cannot replace the daemon (the running one, if any, goes on)";
    started(spawner(&start.serve).replace(), start, why)
}

/// Starts the daemon as `spawn` says and prints its pid once it answers.
fn started(spawn: khived::Spawn, start: &Start, failed: &str) -> u8 {
    let deadline = Instant::now() + start.timeout;
    let mut spawned = spawn
        .ready_timeout(start.timeout)
        .connect(start.timeout)
        .and_then(|mut client| client.probe());
    // A daemon with a cap of a connection or two may still count the one on which it was
    // seen ready, and answer `daemon_busy`: it is asked again, on a new connection.
    while spawned
        .as_ref()
        .is_err_and(|e| e.kind() == std::io::ErrorKind::ResourceBusy && Instant::now() < deadline)
    {
        std::thread::sleep(Duration::from_millis(10));
        spawned = khived::probe(&start.serve.common.socket, start.timeout);
    }
    match spawned {
        Ok(info) => {
            println!("{}", info.pid);
            status::OK
        }
        Err(e) => {
            let e = e.to_string();
            // The ready timeout's daemon is still starting, and left to: not a failure to
            // start, nor (replacing) one that leaves the running daemon serving.
            let context = match e.starts_with("the daemon (pid ") {
                true => "not ready in time",
                false => failed,
            };
            // Some of `Spawn`'s errors say so themselves.
            match e.starts_with(context) {
                true => fail(status::FAILED, e),
                false => fail(status::FAILED, format!("{context}: {e}")),
            }
        }
    }
}

fn run_restart(mut start: Start) -> u8 {
    let common = &start.serve.common;
    // A daemon that offers a handover is replaced without a gap.
    let offered = khived::beside(&common.socket, "handover");
    if std::fs::symlink_metadata(&offered).is_ok() && answers(&common.socket) {
        start.serve.replace = true;
        return replace(&start);
    }
    match khived::running_pid(&common.pid_file) {
        Ok(Some(pid)) => {
            if let Err(e) = terminate(pid, &common.pid_file, start.timeout) {
                return fail(status::FAILED, e);
            }
        }
        Ok(None) => {}
        Err(e) => return fail(status::FAILED, e),
    }
    run_start(start)
}

/// SIGTERM to the daemon holding the PID file, then wait until it has let go of the file.
fn terminate(pid: u32, pid_file: &std::path::Path, timeout: Duration) -> Result<(), String> {
    // The lock proves the PID belongs to a live daemon: a PID from a stale file is never
    // signalled, since the process now holding that number could be anything.
    signal(pid, rustix::process::Signal::TERM)
        .map_err(|e| format!("cannot signal pid {pid}: {e}"))?;
    if wait_gone(pid_file, pid, timeout) {
        Ok(())
    } else {
        Err(format!("pid {pid} still running after {timeout:?}"))
    }
}

// ---- status and stop ----------------------------------------------------------------------

/// What `status` found: each has its own exit status.
enum State {
    Answering(ProbeInfo),
    /// The daemon's `daemon_busy` reply.
    Busy(String),
    /// Why no answer came, though something holds the socket or the PID file.
    NotAnswering(String),
    /// Why nothing answered; nothing holds the PID file.
    NotRunning(String),
    /// Why the socket was not probed: a directory on its way, or the process serving it,
    /// is not this user's to trust (or the socket refuses this user).
    Untrusted(String),
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Answering(_) => "answering",
            State::Busy(_) => "busy",
            State::NotAnswering(_) => "not_answering",
            State::NotRunning(_) => "not_running",
            State::Untrusted(_) => "untrusted",
        }
    }

    fn exit_status(&self) -> u8 {
        match self {
            State::Answering(_) => status::OK,
            State::Busy(_) => status::RETRY,
            State::NotAnswering(_) => status::NOT_ANSWERING,
            State::NotRunning(_) => status::UNREACHABLE,
            State::Untrusted(_) => status::UNTRUSTED,
        }
    }
}

/// Probes the socket, then asks the PID file's lock about a daemon that did not answer.
fn inspect(common: &Common, timeout: Duration, holder: &std::io::Result<Option<u32>>) -> State {
    let probed = Client::connect(&common.socket, timeout)
        .map(|mut client| client.request(&Request::probe()));
    let e = match probed {
        Ok(Ok(response)) if response.ok => {
            let info = response.result.as_deref().unwrap_or_default();
            return match serde_json::from_str::<ProbeInfo>(info) {
                Ok(info) => State::Answering(info),
                Err(e) => State::NotAnswering(format!("bad probe answer {info:?}: {e}")),
            };
        }
        Ok(Ok(response)) => {
            let error = response.error.unwrap_or_default();
            return if error.starts_with("daemon_busy") {
                State::Busy(error)
            } else {
                State::NotAnswering(format!("the probe failed: {error}"))
            };
        }
        // Accepted (or queued by the kernel) but not answered in time.
        Ok(Err(e)) => return State::NotAnswering(e.to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
            return State::NotAnswering(e.to_string())
        }
        // Nothing was sent: whoever serves there, if anyone, is not to be talked to.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return State::Untrusted(e.to_string())
        }
        Err(e) => e,
    };
    match holder {
        Ok(None) => State::NotRunning(e.to_string()),
        Ok(Some(pid)) => State::NotAnswering(format!("pid {pid} holds the PID file, but {e}")),
        Err(lock) => State::NotAnswering(format!("{lock}; {e}")),
    }
}

fn run_status(options: Status) -> u8 {
    let common = &options.common;
    let holder = khived::running_pid(&common.pid_file);
    let state = inspect(common, options.timeout, &holder);
    let pid = match (&state, &holder) {
        (State::Answering(info), _) => Some(info.pid),
        (_, Ok(pid)) => *pid,
        (_, Err(_)) => None,
    };
    let stale = match state {
        State::NotRunning(_) => stale_files(common),
        _ => Vec::new(),
    };
    if options.json {
        let mut value = match &state {
            State::Answering(info) => serde_json::to_value(info).unwrap_or_default(),
            _ => serde_json::json!({ "pid": pid }),
        };
        value["state"] = state.name().into();
        value["running"] = (!matches!(state, State::NotRunning(_))).into();
        value["socket"] = common.socket.display().to_string().into();
        value["pid_file"] = common.pid_file.display().to_string().into();
        match &state {
            State::Answering(_) => {}
            State::Busy(e)
            | State::NotAnswering(e)
            | State::NotRunning(e)
            | State::Untrusted(e) => {
                value["error"] = e.as_str().into();
            }
        }
        if matches!(state, State::NotRunning(_)) {
            value["stale"] = stale.into();
        }
        println!("{value}");
        return state.exit_status();
    }
    match &state {
        State::Answering(info) => {
            println!("khived is running");
            println!("  pid:        {}", info.pid);
            println!("  socket:     {}", common.socket.display());
            println!("  namespace:  {:?}", info.namespace);
            println!("  config id:  {:?}", info.config_id);
            println!("  version:    {}", info.version);
            println!("  uptime:     {:.1} s", info.uptime_ms as f64 / 1000.0);
            println!("  in flight:  {}", info.in_flight);
            println!("  served:     {}", info.served);
            println!("  waiting:    {}", info.waiting);
            println!("  threads:    {}", info.threads);
        }
        State::Busy(e) => {
            println!("khived is running but busy ({e})");
            print_pid(pid, common);
        }
        State::NotAnswering(e) => {
            println!("khived is not answering ({e})");
            println!("  it may be starting, stopping, stopped (SIGSTOP) or hung");
            print_pid(pid, common);
        }
        State::NotRunning(e) => {
            println!("khived is not running ({e})");
            for note in &stale {
                println!("  {note}");
            }
        }
        State::Untrusted(e) => {
            println!("khived's socket is not to be trusted; nothing was sent ({e})");
            print_pid(pid, common);
        }
    }
    state.exit_status()
}

fn print_pid(pid: Option<u32>, common: &Common) {
    if let Some(pid) = pid {
        println!("  pid:        {pid} (holds {})", common.pid_file.display());
    }
    println!("  socket:     {}", common.socket.display());
}

/// What a daemon that is not running left behind; for callers that found no daemon holding
/// the PID file (`running_pid` said `Ok(None)`).
fn stale_files(common: &Common) -> Vec<String> {
    let mut notes = Vec::new();
    if std::fs::symlink_metadata(&common.socket).is_ok() {
        notes.push(format!(
            "stale socket file {} (nothing listens there)",
            common.socket.display()
        ));
    }
    if common.pid_file.exists() {
        notes.push(format!(
            "stale PID file {} (no daemon holds it)",
            common.pid_file.display()
        ));
    }
    notes
}

/// The outcome of `stop`, printed as text or as one JSON object.
struct Stopped {
    pid: Option<u32>,
    stopped: bool,
    forced: bool,
    message: String,
}

fn run_stop(options: Stop) -> u8 {
    let outcome = stop(&options);
    if options.json {
        let value = serde_json::json!({
            "stopped": outcome.stopped,
            "pid": outcome.pid,
            "was_running": outcome.pid.is_some(),
            "forced": outcome.forced,
            "message": outcome.message,
        });
        println!("{value}");
        return if outcome.stopped {
            status::OK
        } else {
            status::FAILED
        };
    }
    if outcome.stopped {
        println!("{}", outcome.message);
        if outcome.pid.is_none() {
            for note in stale_files(&options.common) {
                println!("  {note}");
            }
        }
        status::OK
    } else {
        fail(status::FAILED, outcome.message)
    }
}

fn stop(options: &Stop) -> Stopped {
    let pid_file = &options.common.pid_file;
    let failed = |pid, message: String| Stopped {
        pid,
        stopped: false,
        forced: false,
        message,
    };
    let pid = match khived::running_pid(pid_file) {
        Ok(Some(pid)) => pid,
        Ok(None) => {
            return Stopped {
                pid: None,
                stopped: true,
                forced: false,
                message: "khived is not running".to_owned(),
            }
        }
        Err(e) => return failed(None, e.to_string()),
    };
    let stopped = || Stopped {
        pid: Some(pid),
        stopped: true,
        forced: false,
        message: format!("stopped khived (pid {pid})"),
    };
    let e = match terminate(pid, pid_file, options.timeout) {
        Ok(()) => return stopped(),
        Err(e) => e,
    };
    if !options.force {
        return failed(Some(pid), format!("{e}; use --force to kill it"));
    }
    // Only a pid that still holds the lock is proven to be the daemon's: one that has let go
    // of the file may be gone, its number another process's by now.
    match holding(pid_file, pid) {
        Holding::Held => {}
        Holding::Gone => return stopped(),
        Holding::LetGo => {
            return failed(
                Some(pid),
                format!(
                    "pid {pid} has let go of {} but still runs after {:?} (draining after a \
                     handover, say); not killed, since its pid is no longer proven to be the \
                     daemon's",
                    pid_file.display(),
                    options.timeout
                ),
            )
        }
    }
    if let Err(e) = signal(pid, rustix::process::Signal::KILL) {
        return failed(Some(pid), format!("cannot kill pid {pid}: {e}"));
    }
    if wait_gone(pid_file, pid, Duration::from_secs(5)) {
        Stopped {
            pid: Some(pid),
            stopped: true,
            forced: true,
            message: format!("killed khived (pid {pid}) after {:?}", options.timeout),
        }
    } else {
        failed(Some(pid), format!("pid {pid} survived SIGKILL"))
    }
}

fn signal(pid: u32, signal: rustix::process::Signal) -> std::io::Result<()> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| std::io::Error::other("invalid pid"))?;
    Ok(rustix::process::kill_process(pid, signal)?)
}

/// Waits until daemon `pid` is gone (see [`holding`]).
fn wait_gone(pid_file: &std::path::Path, pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if holding(pid_file, pid) == Holding::Gone {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What has become of daemon `pid` and the PID file's lock.
#[derive(PartialEq)]
enum Holding {
    /// It still holds the lock: its pid is proven to be the daemon's.
    Held,
    /// Another daemon holds the lock (one a client started the moment ours let go, or the
    /// successor ours handed over to), or nobody does, and `pid` no longer runs: it is gone.
    Gone,
    /// It let go of the lock but `pid` still runs: a predecessor draining after a handover,
    /// or another process that has the number by now.
    LetGo,
}

/// The daemon lets go of the lock last, after its workers are reaped and its files removed,
/// just before it exits.
fn holding(pid_file: &std::path::Path, pid: u32) -> Holding {
    match khived::running_pid(pid_file) {
        Ok(None) => Holding::Gone,
        Ok(Some(holder)) if holder == pid => Holding::Held,
        // Another holder, or one that names no live process.
        Ok(Some(_)) | Err(_) => match khived::is_process_running(pid) {
            true => Holding::LetGo,
            false => Holding::Gone,
        },
    }
}

// The serve options' own methods are in `args`, with their parsing; these are how the rest of
// the binary uses them.

/// The worker pool `--worker` asks for, if it does.
fn pool_options(serve: &Serve) -> Option<PoolOptions> {
    let mut options = PoolOptions::new(serve.worker.as_ref()?)
        .workers(serve.workers)
        .queue(serve.queue)
        .namespace(&serve.namespace)
        .config_id(&serve.config_id);
    // The same limit as the runtime's (`daemon_config`), and both count from when the request
    // was read: the runtime answers the client, and the pool kills the worker still on it
    // right after, instead of letting it run on for nobody.
    options.request_timeout = serve.request_timeout;
    options.warm = serve.warm.clone();
    Some(options)
}

/// How `call --spawn`, `start` and `restart` start `khived serve` with these options.
fn spawner(serve: &Serve) -> khived::Spawn {
    // The daemon writes its log records itself, through a file that rotates at its size
    // limit; the spawn log (the same file) then only takes what is not a record, such as a
    // panic's message, or an early failure before the log file is open.
    let log = serve
        .log_file
        .clone()
        .unwrap_or_else(|| khived::beside(&serve.common.socket, "log"));
    let mut command = std::process::Command::new(current_exe());
    command.arg("serve").args(serve_args(serve, &log));
    let spawn = khived::Spawn::new(&serve.common.socket, command)
        .pid_file(&serve.common.pid_file)
        .log_file(log);
    // `call --spawn --replace`: an older build's daemon is replaced; `start --replace` and
    // `restart` replace whatever runs (see `replace`).
    match serve.replace {
        true => spawn.replace_unless(&serve.namespace, &serve.config_id),
        false => spawn,
    }
}

/// The daemon's configuration for these serve options.
fn daemon_config(serve: &Serve) -> Config {
    let mut config = Config::from_env();
    config.socket = serve.common.socket.clone();
    config.pid_file = serve.common.pid_file.clone();
    if let Some(drain) = serve.drain_timeout {
        config.drain_timeout = drain;
    }
    config.idle_shutdown = serve.idle_timeout;
    if let Some(max) = serve.max_connections {
        config.max_connections = max;
    }
    if let Some(threads) = serve.threads {
        config.threads = threads;
    }
    config.request_timeout = serve.request_timeout;
    config.replace |= serve.replace;
    config
}

/// The command-line arguments that make `khived serve` run with these options, logging to
/// `log`.
fn serve_args(serve: &Serve, log: &std::path::Path) -> Vec<OsString> {
    let common = &serve.common;
    let mut args: Vec<OsString> = vec![
        "--socket".into(),
        common.socket.clone().into(),
        "--pid".into(),
        common.pid_file.clone().into(),
        "--log-file".into(),
        log.into(),
        "--namespace".into(),
        serve.namespace.clone().into(),
        "--config-id".into(),
        serve.config_id.clone().into(),
    ];
    let secs = |d: Duration| d.as_secs_f64().to_string().into();
    if let Some(drain) = serve.drain_timeout {
        args.extend(["--drain-timeout".into(), secs(drain)]);
    }
    if let Some(idle) = serve.idle_timeout {
        args.extend(["--idle-timeout".into(), secs(idle)]);
    }
    if let Some(max) = serve.max_connections {
        args.extend(["--max-connections".into(), max.to_string().into()]);
    }
    if let Some(threads) = serve.threads {
        args.extend(["--threads".into(), threads.to_string().into()]);
    }
    if let Some(timeout) = serve.request_timeout {
        args.extend(["--request-timeout".into(), secs(timeout)]);
    }
    let flag = if serve.verbosity > 0 { "-v" } else { "-q" };
    args.extend((0..serve.verbosity.unsigned_abs()).map(|_| flag.into()));
    if let Some(worker) = &serve.worker {
        args.extend(["--workers".into(), serve.workers.to_string().into()]);
        args.extend(["--queue".into(), serve.queue.to_string().into()]);
        if let Some(warm) = &serve.warm {
            args.extend(["--warm".into(), warm.into()]);
        }
        // Everything after `--` is the worker command.
        args.push("--".into());
        args.extend(worker.iter().cloned());
    }
    args
}

#[cfg(test)]
mod tests {
    use khived::{code, Disposition, ErrorDetail, Response};

    use super::{call_status, status};

    #[test]
    fn each_error_code_has_its_exit_status() {
        let error = |code: &str, disposition| {
            Response::error(ErrorDetail::new(code, "message", disposition), "")
        };
        let unknown = Disposition::Unknown;
        let not_committed = Disposition::NotCommitted;
        for (code, disposition, expected) in [
            (code::BAD_REQUEST, not_committed, status::FAILED),
            (code::FRAME_TOO_LARGE, not_committed, status::FAILED),
            (code::RESPONSE_TOO_LARGE, unknown, status::FAILED),
            (code::REQUEST_TIMED_OUT, unknown, status::FAILED),
            (code::DISPATCHER_PANICKED, unknown, status::FAILED),
            (code::DISPATCHER_ERROR, unknown, status::FAILED),
            ("a_code_of_its_own", not_committed, status::FAILED),
            (code::DAEMON_BUSY, not_committed, status::RETRY),
            (code::DAEMON_DRAINING, not_committed, status::RETRY),
        ] {
            assert_eq!(call_status(&error(code, disposition)), expected, "{code}");
        }
        let mut refused = error(code::VERSION_MISMATCH, not_committed);
        refused.version_mismatch = true;
        assert_eq!(call_status(&refused), status::MISMATCH);
        assert_eq!(call_status(&Response::ok("x", "")), status::OK);
        // An older daemon: no served_config_id is a mismatch, even on success.
        let mut old = Response::ok("x", "");
        old.served_config_id = None;
        assert_eq!(call_status(&old), status::MISMATCH);
    }
}
