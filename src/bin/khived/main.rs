//! `khived`: run a warm daemon and talk to it from scripts.
//!
//! `serve` runs the daemon (an echo dispatcher, or a pool of worker processes); `call` sends
//! one request, starting the daemon first with `--spawn`; `status` and `stop` manage it.

mod args;

use std::ffi::OsString;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use args::{Call, Command, Common, Serve, Status, Stop};
use khived::pool::{Pool, PoolOptions};
use khived::{Client, Config, Daemon, Dispatch, DispatchError, Request, Response};

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
    /// `serve`: another daemon already runs on the socket.
    pub(crate) const ALREADY_RUNNING: u8 = 5;
    /// `call`: the daemon refused the request for now without running it (`daemon_busy`,
    /// `daemon_draining`); the same call may be made again. `EX_TEMPFAIL` of sysexits.h.
    pub(crate) const RETRY: u8 = 75;
}

fn main() -> ExitCode {
    let command = match args::parse(std::env::args_os().skip(1)) {
        Ok(command) => command,
        Err(e) => {
            eprintln!("khived: {e}\nTry 'khived --help'.");
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
    if let Some(path) = &serve.log_file {
        if let Err(e) = redirect_stderr(path) {
            return fail(status::FAILED, e);
        }
    }
    let level = match std::env::var("KHIVED_LOG").as_deref() {
        Ok("error") => log::LevelFilter::Error,
        Ok("warn") => log::LevelFilter::Warn,
        Ok("debug") => log::LevelFilter::Debug,
        Ok("trace") => log::LevelFilter::Trace,
        _ => log::LevelFilter::Info,
    };
    khived::init_stderr_logger(level);
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
        Err(e @ khived::Error::AlreadyRunning { .. }) => fail(status::ALREADY_RUNNING, e),
        Err(e) => fail(status::FAILED, e),
    }
}

/// Sends our standard error, and with it every log line and panic message, to `path`.
fn redirect_stderr(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display()))
        })?;
    rustix::stdio::dup2_stderr(&file)?;
    Ok(())
}

// ---- call ---------------------------------------------------------------------------------

fn run_call(call: Call) -> u8 {
    let connected = if call.spawn {
        let mut command = std::process::Command::new(current_exe());
        command.arg("serve").args(serve_args(&call.serve));
        let mut spawn = khived::Spawn::new(&call.serve.common.socket, command)
            .pid_file(&call.serve.common.pid_file);
        if let Some(log) = &call.serve.log_file {
            spawn = spawn.log_file(log);
        }
        spawn.connect(call.timeout)
    } else {
        Client::connect(&call.serve.common.socket, call.timeout)
    };
    let mut client = match connected {
        Ok(client) => client,
        Err(e) => return fail(status::UNREACHABLE, format!("daemon unreachable: {e}")),
    };
    let mut request = Request::new(
        call.ops.as_str(),
        call.serve.namespace.as_str(),
        call.serve.config_id.as_str(),
    );
    request.presentation = call.presentation.as_deref().map(Into::into);
    let response = match client.request(&request) {
        Ok(response) => response,
        Err(e) => return fail(status::UNREACHABLE, format!("daemon unreachable: {e}")),
    };
    report(&call, &mut client, response)
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
    if response.version_mismatch || response.namespace_mismatch {
        return status::MISMATCH;
    }
    if response.config_mismatch || response.served_config_id.is_none() {
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

// ---- status and stop ----------------------------------------------------------------------

fn run_status(options: Status) -> u8 {
    let common = &options.common;
    match khived::probe(&common.socket, options.timeout) {
        Ok(info) => {
            if options.json {
                let mut value = serde_json::to_value(&info).unwrap_or_default();
                value["running"] = true.into();
                value["socket"] = common.socket.display().to_string().into();
                println!("{value}");
            } else {
                println!("khived is running");
                println!("  pid:        {}", info.pid);
                println!("  socket:     {}", common.socket.display());
                println!("  namespace:  {:?}", info.namespace);
                println!("  config id:  {:?}", info.config_id);
                println!("  version:    {}", info.version);
                println!("  uptime:     {:.1} s", info.uptime_ms as f64 / 1000.0);
                println!("  in flight:  {}", info.in_flight);
                println!("  served:     {}", info.served);
            }
            status::OK
        }
        Err(e) => {
            let stale = stale_files(common);
            if options.json {
                let value = serde_json::json!({
                    "running": false,
                    "socket": common.socket.display().to_string(),
                    "error": e.to_string(),
                    "stale": stale,
                });
                println!("{value}");
            } else {
                println!("khived is not running ({e})");
                for note in &stale {
                    println!("  {note}");
                }
            }
            status::UNREACHABLE
        }
    }
}

/// What a daemon that is not answering left behind.
fn stale_files(common: &Common) -> Vec<String> {
    let mut notes = Vec::new();
    if std::fs::symlink_metadata(&common.socket).is_ok() {
        notes.push(format!(
            "stale socket file {} (nothing answers there)",
            common.socket.display()
        ));
    }
    match khived::running_pid(&common.pid_file) {
        Ok(Some(pid)) => notes.push(format!(
            "PID file {} is held by pid {pid}, which does not answer (starting, or hung?)",
            common.pid_file.display()
        )),
        Ok(None) if common.pid_file.exists() => notes.push(format!(
            "stale PID file {} (no daemon holds it)",
            common.pid_file.display()
        )),
        Ok(None) => {}
        Err(e) => notes.push(e.to_string()),
    }
    notes
}

fn run_stop(options: Stop) -> u8 {
    let pid_file = &options.common.pid_file;
    let pid = match khived::running_pid(pid_file) {
        Ok(Some(pid)) => pid,
        Ok(None) => {
            println!("khived is not running");
            for note in stale_files(&options.common) {
                println!("  {note}");
            }
            return status::OK;
        }
        Err(e) => return fail(status::FAILED, e),
    };
    // The lock proves the PID belongs to a live daemon: a PID from a stale file is never
    // signalled, since the process now holding that number could be anything.
    if let Err(e) = signal(pid, rustix::process::Signal::TERM) {
        return fail(status::FAILED, format!("cannot signal pid {pid}: {e}"));
    }
    if wait_gone(pid_file, options.timeout) {
        println!("stopped khived (pid {pid})");
        return status::OK;
    }
    if !options.force {
        return fail(
            status::FAILED,
            format!(
                "pid {pid} still running after {:?}; use --force to kill it",
                options.timeout
            ),
        );
    }
    if let Err(e) = signal(pid, rustix::process::Signal::KILL) {
        return fail(status::FAILED, format!("cannot kill pid {pid}: {e}"));
    }
    if wait_gone(pid_file, Duration::from_secs(5)) {
        println!("killed khived (pid {pid}) after {:?}", options.timeout);
        status::OK
    } else {
        fail(status::FAILED, format!("pid {pid} survived SIGKILL"))
    }
}

fn signal(pid: u32, signal: rustix::process::Signal) -> std::io::Result<()> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| std::io::Error::other("invalid pid"))?;
    Ok(rustix::process::kill_process(pid, signal)?)
}

/// Waits until no daemon holds the PID file's lock: the daemon lets go of it last, after its
/// workers are reaped and its files removed, just before it exits.
fn wait_gone(pid_file: &std::path::Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if matches!(khived::running_pid(pid_file), Ok(None)) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// The serve options' own methods are in `args`, with their parsing; these three are how the
// rest of the binary uses them.

/// The worker pool `--worker` asks for, if it does.
fn pool_options(serve: &Serve) -> Option<PoolOptions> {
    let mut options = PoolOptions::new(serve.worker.as_ref()?)
        .workers(serve.workers)
        .queue(serve.queue)
        .namespace(&serve.namespace)
        .config_id(&serve.config_id);
    options.request_timeout = serve.request_timeout;
    options.warm = serve.warm.clone();
    Some(options)
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
    config
}

/// The command-line arguments that make `khived serve` run with these options.
fn serve_args(serve: &Serve) -> Vec<OsString> {
    let common = &serve.common;
    let mut args: Vec<OsString> = vec![
        "--socket".into(),
        common.socket.clone().into(),
        "--pid".into(),
        common.pid_file.clone().into(),
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
    if let Some(worker) = &serve.worker {
        args.extend(["--workers".into(), serve.workers.to_string().into()]);
        args.extend(["--queue".into(), serve.queue.to_string().into()]);
        if let Some(timeout) = serve.request_timeout {
            args.extend(["--request-timeout".into(), secs(timeout)]);
        }
        if let Some(warm) = &serve.warm {
            args.extend(["--warm".into(), warm.into()]);
        }
        // `--worker` takes the rest of the line, so it comes last.
        args.push("--worker".into());
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
