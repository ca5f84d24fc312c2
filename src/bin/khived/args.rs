//! The command line, parsed with lexopt: subcommands, their options and their help.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use lexopt::prelude::*;

pub(crate) enum Command {
    Help(&'static str),
    Version,
    Serve(Serve),
    Call(Call),
    Status(Status),
    Stop(Stop),
}

/// Where the daemon lives; every subcommand takes these.
pub(crate) struct Common {
    pub(crate) socket: PathBuf,
    pub(crate) pid_file: PathBuf,
}

pub(crate) struct Serve {
    pub(crate) common: Common,
    pub(crate) log_file: Option<PathBuf>,
    pub(crate) namespace: String,
    pub(crate) config_id: String,
    pub(crate) drain_timeout: Option<Duration>,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) max_connections: Option<usize>,
    pub(crate) worker: Option<Vec<OsString>>,
    pub(crate) workers: usize,
    pub(crate) queue: usize,
    pub(crate) request_timeout: Option<Duration>,
    pub(crate) warm: Option<String>,
}

pub(crate) struct Call {
    /// Namespace, config id, and how to start the daemon with `--spawn`.
    pub(crate) serve: Serve,
    pub(crate) ops: String,
    pub(crate) presentation: Option<String>,
    pub(crate) timeout: Duration,
    pub(crate) spawn: bool,
    /// Print the whole response as JSON instead of the result.
    pub(crate) json: bool,
}

pub(crate) struct Status {
    pub(crate) common: Common,
    pub(crate) json: bool,
    pub(crate) timeout: Duration,
}

pub(crate) struct Stop {
    pub(crate) common: Common,
    pub(crate) timeout: Duration,
    pub(crate) force: bool,
}

const HELP: &str = "\
khived: keep a program warm behind a Unix socket

Usage: khived <COMMAND> [OPTIONS]

Commands:
  serve    Run the daemon in the foreground
  call     Send one request and print the result
  status   Say whether a daemon runs, and what it serves
  stop     Stop the running daemon

Every command takes --socket PATH and --pid PATH (defaults: $KHIVE_SOCKET or
~/.khive/khived.sock, $KHIVE_PID or ~/.khive/khived.pid) and --help.

Options:
  -h, --help     Print help
  -V, --version  Print the version
";

const SERVE_HELP: &str = "\
Run the daemon in the foreground, logging to standard error.

Usage: khived serve [OPTIONS] [--worker CMD [ARGS...]]

Without --worker it serves a built-in echo dispatcher (the result is the request's ops).

Options:
      --socket PATH           Socket to listen on
      --pid PATH              PID file, locked while the daemon runs
      --log-file PATH         Append the log to PATH instead of standard error
      --namespace NS          Namespace requests must name [default: khive]
      --config-id ID          Configuration id requests must carry [default: \"\"]
      --drain-timeout SECS    Time requests in flight get at shutdown [default: 10]
      --idle-timeout SECS     Stop after SECS without any connection [default: never]
      --max-connections N     Connections open at once [default: 512]
      --worker CMD [ARGS...]  Serve requests with worker processes running CMD (one JSON
                              object per line on stdin/stdout); must come last
      --workers N             Worker processes [default: 1]
      --queue N               Requests that may wait for a worker [default: 64]
      --request-timeout SECS  Kill and restart a worker stuck on a request [default: never]
      --warm OPS              Send OPS to each worker once it starts
  -h, --help                  Print help

Exit status: 0 after a clean stop, 5 if a daemon already runs on the socket, 1 on errors,
2 on a usage error.
";

const CALL_HELP: &str = "\
Send one request and print the result on standard output.

Usage: khived call [OPTIONS] OPS

Options:
      --socket PATH          Socket of the daemon
      --pid PATH             PID file of the daemon (used with --spawn)
      --presentation P       Presentation to ask for
      --namespace NS         Namespace of the request [default: khive]
      --config-id ID         Configuration id of the request [default: \"\"]
      --timeout SECS         Deadline for connecting, sending and reading [default: 30]
      --spawn                Start the daemon if none answers, with the serve options
                             given here (see 'khived serve --help'; --worker comes last)
      --json                 Print the whole response as one JSON object (the exit
                             status is the same)
  -h, --help                 Print help

Exit status:
  0   the request succeeded; the result is on standard output
  1   the request failed: the dispatcher's error, or the daemon's (bad_request,
      frame_too_large, response_too_large, request_timed_out, dispatcher_panicked)
  2   usage error
  3   no daemon answered (not running, or not in time)
  4   the daemon serves another namespace, configuration or protocol version
  75  the daemon refused the request for now without running it (daemon_busy,
      daemon_draining): try again
";

const STATUS_HELP: &str = "\
Say whether a daemon runs: pid, socket, namespace, config id, version, uptime, requests.

Usage: khived status [OPTIONS]

Options:
      --socket PATH   Socket of the daemon
      --pid PATH      PID file of the daemon
      --json          Print one JSON object
      --timeout SECS  How long to wait for the daemon's answer [default: 2]
  -h, --help          Print help

Exit status: 0 when a daemon answers, 3 otherwise (stale files are reported).
";

const STOP_HELP: &str = "\
Stop the daemon: SIGTERM to the process holding the PID file's lock, then wait until it
has gone. A PID file that no live daemon holds is never acted on.

Usage: khived stop [OPTIONS]

Options:
      --socket PATH   Socket of the daemon
      --pid PATH      PID file of the daemon
      --timeout SECS  How long to wait for the daemon to exit [default: 15]
      --force         Send SIGKILL if it has not exited by then
  -h, --help          Print help

Exit status: 0 when the daemon has stopped or none was running, 1 otherwise.
";

pub(crate) fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Command, lexopt::Error> {
    let mut parser = lexopt::Parser::from_args(args);
    let command = match parser.next()? {
        None => return Err("no command given".into()),
        Some(Short('h') | Long("help")) => return Ok(Command::Help(HELP)),
        Some(Short('V') | Long("version")) => return Ok(Command::Version),
        Some(Value(command)) => command.string()?,
        Some(arg) => return Err(arg.unexpected()),
    };
    match command.as_str() {
        "serve" => parse_serve(&mut parser),
        "call" => parse_call(&mut parser),
        "status" => parse_status(&mut parser),
        "stop" => parse_stop(&mut parser),
        "help" => Ok(Command::Help(HELP)),
        other => Err(format!("unknown command {other:?}").into()),
    }
}

impl Common {
    fn new() -> Self {
        Common {
            socket: khived::socket_path(),
            pid_file: khived::pid_path(),
        }
    }

    /// Takes `--socket` or `--pid`; returns false for any other option.
    fn take(&mut self, name: &str, parser: &mut lexopt::Parser) -> Result<bool, lexopt::Error> {
        match name {
            "socket" => self.socket = parser.value()?.into(),
            "pid" => self.pid_file = parser.value()?.into(),
            _ => return Ok(false),
        }
        Ok(true)
    }
}

impl Serve {
    fn new() -> Self {
        Serve {
            common: Common::new(),
            log_file: None,
            namespace: "khive".to_owned(),
            config_id: String::new(),
            drain_timeout: None,
            idle_timeout: None,
            max_connections: None,
            worker: None,
            workers: 1,
            queue: 64,
            request_timeout: None,
            warm: None,
        }
    }

    /// Takes one serve option; returns false for any other option.
    fn take(&mut self, name: &str, parser: &mut lexopt::Parser) -> Result<bool, lexopt::Error> {
        match name {
            _ if self.common.take(name, parser)? => {}
            "log-file" => self.log_file = Some(parser.value()?.into()),
            "namespace" => self.namespace = parser.value()?.string()?,
            "config-id" => self.config_id = parser.value()?.string()?,
            "drain-timeout" => self.drain_timeout = Some(seconds(parser)?),
            "idle-timeout" => self.idle_timeout = Some(seconds(parser)?),
            "max-connections" => self.max_connections = Some(positive(parser)?),
            "workers" => self.workers = positive(parser)?,
            "queue" => self.queue = positive(parser)?,
            "request-timeout" => self.request_timeout = Some(seconds(parser)?),
            "warm" => self.warm = Some(parser.value()?.string()?),
            "worker" => {
                let mut command = vec![parser.value()?];
                command.extend(parser.raw_args()?);
                self.worker = Some(command);
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}

fn parse_serve(parser: &mut lexopt::Parser) -> Result<Command, lexopt::Error> {
    let mut serve = Serve::new();
    while let Some(arg) = parser.next()? {
        match arg {
            Short('h') | Long("help") => return Ok(Command::Help(SERVE_HELP)),
            Long(name) => {
                let name = name.to_owned();
                if !serve.take(&name, parser)? {
                    return Err(unknown(&name));
                }
            }
            _ => return Err(arg.unexpected()),
        }
    }
    Ok(Command::Serve(serve))
}

fn parse_call(parser: &mut lexopt::Parser) -> Result<Command, lexopt::Error> {
    let mut serve = Serve::new();
    let (mut ops, mut presentation, mut spawn, mut json) = (None, None, false, false);
    let mut timeout = Duration::from_secs(30);
    while let Some(arg) = parser.next()? {
        match arg {
            Short('h') | Long("help") => return Ok(Command::Help(CALL_HELP)),
            Long("presentation") => presentation = Some(parser.value()?.string()?),
            Long("timeout") => timeout = seconds(parser)?,
            Long("spawn") => spawn = true,
            Long("json") => json = true,
            Value(value) if ops.is_none() => ops = Some(value.string()?),
            Long(name) => {
                let name = name.to_owned();
                if !serve.take(&name, parser)? {
                    return Err(unknown(&name));
                }
            }
            _ => return Err(arg.unexpected()),
        }
    }
    Ok(Command::Call(Call {
        ops: ops.ok_or("missing OPS: what to send to the daemon")?,
        serve,
        presentation,
        timeout,
        spawn,
        json,
    }))
}

fn parse_status(parser: &mut lexopt::Parser) -> Result<Command, lexopt::Error> {
    let mut status = Status {
        common: Common::new(),
        json: false,
        timeout: Duration::from_secs(2),
    };
    while let Some(arg) = parser.next()? {
        match arg {
            Short('h') | Long("help") => return Ok(Command::Help(STATUS_HELP)),
            Long("json") => status.json = true,
            Long("timeout") => status.timeout = seconds(parser)?,
            Long(name) => {
                let name = name.to_owned();
                if !status.common.take(&name, parser)? {
                    return Err(unknown(&name));
                }
            }
            _ => return Err(arg.unexpected()),
        }
    }
    Ok(Command::Status(status))
}

fn parse_stop(parser: &mut lexopt::Parser) -> Result<Command, lexopt::Error> {
    let mut stop = Stop {
        common: Common::new(),
        timeout: Duration::from_secs(15),
        force: false,
    };
    while let Some(arg) = parser.next()? {
        match arg {
            Short('h') | Long("help") => return Ok(Command::Help(STOP_HELP)),
            Long("timeout") => stop.timeout = seconds(parser)?,
            Long("force") => stop.force = true,
            Long(name) => {
                let name = name.to_owned();
                if !stop.common.take(&name, parser)? {
                    return Err(unknown(&name));
                }
            }
            _ => return Err(arg.unexpected()),
        }
    }
    Ok(Command::Stop(stop))
}

/// A duration in (possibly fractional) seconds.
fn seconds(parser: &mut lexopt::Parser) -> Result<Duration, lexopt::Error> {
    let text = parser.value()?.string()?;
    text.parse::<f64>()
        .ok()
        .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
        .ok_or_else(|| format!("{text:?} is not a number of seconds").into())
}

fn positive(parser: &mut lexopt::Parser) -> Result<usize, lexopt::Error> {
    let text = parser.value()?.string()?;
    match text.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{text:?} is not a positive whole number").into()),
    }
}

fn unknown(name: &str) -> lexopt::Error {
    format!("invalid option '--{name}'").into()
}
