//! The command line, parsed with lexopt: subcommands, their options and their help.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use lexopt::prelude::*;

pub(crate) enum Command {
    Help(&'static str),
    Version,
    Serve(Serve),
    Start(Start),
    Restart(Start),
    Call(Call),
    Status(Status),
    Stop(Stop),
}

/// A command line that cannot be run: the message, and the subcommand whose help to point to.
#[derive(Debug)]
pub(crate) struct Usage {
    pub(crate) message: String,
    pub(crate) command: Option<&'static str>,
}

impl fmt::Display for Usage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.command {
            Some(command) => write!(f, "{}\nTry 'khived {command} --help'.", self.message),
            None => write!(f, "{}\nTry 'khived --help'.", self.message),
        }
    }
}

/// Where the daemon lives; every subcommand takes these.
pub(crate) struct Common {
    pub(crate) socket: PathBuf,
    pub(crate) pid_file: PathBuf,
    /// Which of the two were given on the command line: the other is derived beside it.
    given: (bool, bool),
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
    pub(crate) threads: Option<usize>,
    pub(crate) warm: Option<String>,
    /// `-v` adds one, `-q` takes one away: log levels above or below `KHIVED_LOG`'s.
    pub(crate) verbosity: i8,
    /// Take over from the daemon running on the socket (`call`: one that serves another
    /// namespace, config id or an older protocol).
    pub(crate) replace: bool,
}

/// `start` and `restart`: the serve options, and how long to wait.
pub(crate) struct Start {
    pub(crate) serve: Serve,
    /// How long the old daemon may take to stop, and the new one to answer.
    pub(crate) timeout: Duration,
}

pub(crate) struct Call {
    /// Namespace, config id, and how to start the daemon with `--spawn`.
    pub(crate) serve: Serve,
    /// What to send; `-` reads it from standard input.
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
    pub(crate) json: bool,
}

/// The longest duration any option takes: a year. Longer ones are typing mistakes, and an
/// `Instant` plus a duration near `u64::MAX` seconds overflows.
const MAX_SECS: f64 = 365.0 * 86_400.0;
/// More worker processes than this is a mistake: each is a process of its own.
const MAX_WORKERS: usize = 1024;
/// The most dispatch threads `--threads` takes.
const MAX_THREADS: usize = 1024;
/// The queue's slots are allocated up front.
const MAX_QUEUE: usize = 65_536;
/// Each connection takes a descriptor; the daemon lowers the cap to the open-file limit.
const MAX_CONNECTIONS: usize = 1_000_000;

const HELP: &str = "\
khived: keep a program warm behind a Unix socket

Usage: khived <COMMAND> [OPTIONS]

Commands:
  serve    Run the daemon in the foreground
  start    Start the daemon in the background and print its pid
  restart  Stop the daemon if one runs, then start it
  call     Send one request and print the result
  status   Say whether a daemon runs, and what it serves
  stop     Stop the running daemon
  help     Print the help of a command ('khived help call')

Every command takes --socket PATH and --pid PATH (defaults: $KHIVE_SOCKET or
~/.khive/khived.sock, $KHIVE_PID or ~/.khive/khived.pid) and --help. When only
one of the two is given (or set), the other is beside it: a.sock <-> a.pid.

Options:
  -h, --help     Print help
  -V, --version  Print the version
";

const SERVE_HELP: &str = "\
Run the daemon in the foreground, logging to standard error.

Usage: khived serve [OPTIONS] [-- CMD [ARGS...]]

Without a worker command it serves a built-in echo dispatcher (the result is the request's
ops). With one, it serves requests with worker processes running CMD, which read one JSON
object per line on standard input and write one per line on standard output:
  khived serve --workers 2 -- python3 examples/worker.py

SIGTERM, SIGINT and SIGHUP (its terminal closing) stop it after a drain; a second
one during the drain stops it at once.

Options:
      --socket PATH           Socket to listen on
      --pid PATH              PID file, locked while the daemon runs
      --log-file PATH         Append the log to PATH instead of standard error
      --namespace NS          Namespace requests must name [default: khive]
      --config-id ID          Configuration id requests must carry [default: \"\"]
      --drain-timeout SECS    Time requests in flight get at shutdown [default: 10]
      --idle-timeout SECS     Stop after SECS without any connection [default: never]
      --max-connections N     Connections open at once, 1 to 1000000 [default: 512]
      --threads N             Threads that may run dispatch at once, 1 to 1024; 1 runs
                              everything on one thread [default: $KHIVE_THREADS, or the
                              number of CPUs]
      --request-timeout SECS  Answer request_timed_out to a request still running after
                              SECS and cancel it (a worker stuck on it is killed and
                              restarted) [default: never]
  -- CMD [ARGS...]            The worker command; everything after -- belongs to it
      --worker CMD [ARGS...]  The same (also --worker -- CMD [ARGS...]); must come last
      --workers N             Worker processes, 1 to 1024 [default: 1]
      --queue N               Requests that may wait for a worker, 1 to 65536 [default: 64]
      --warm OPS              Send OPS to each worker once it starts
      --replace               Take over from the daemon running on the socket: it serves
                              until this one is ready, then stops accepting, finishes what
                              it holds and exits; no request fails. If this one fails
                              first, the running one goes on as before
  -v, --verbose               Log more: debug, then trace (repeat)
  -q, --quiet                 Log less: warnings, then errors only, then nothing (repeat)
  -h, --help                  Print help

KHIVED_LOG sets the log level (error, warn, info, debug, trace or off, in any case;
default info); -v and -q move from there. Durations are seconds (fractions allowed), at most
a year.

Exit status: 0 after a clean stop, 5 if a daemon already runs on the socket, 1 on errors,
2 on a usage error.
";

const START_HELP: &str = "\
Start the daemon in the background (in a session of its own, its output appended to the
--log-file, by default the socket's path with the extension .log, e.g. ~/.khive/khived.log),
wait until it answers, and print its pid.

Usage: khived start [SERVE OPTIONS] [--timeout SECS] [-- CMD [ARGS...]]

Takes every option of 'khived serve' (see 'khived serve --help'), and:
      --timeout SECS  How long the daemon may take to answer [default: 30]
  -h, --help          Print help

With --replace, a running daemon is replaced as 'khived restart' does.

Exit status: 0 once the daemon answers, 5 if a daemon already runs (or still holds the
PID file), 1 if it could not be started or did not answer in time (it is left running),
2 on a usage error.
";

const RESTART_HELP: &str = "\
Replace the running daemon without a failed request, and print the new pid: the new daemon
is started with --replace and is handed the running one's socket; the old one serves until
the new one is ready, then finishes what it holds and exits. If the new one fails before it
is ready, the old one goes on serving and restart exits 1 with the new one's error. With no
daemon running (or one without a handover socket), it stops what holds the PID file and
starts the daemon as 'khived start' does.

Usage: khived restart [SERVE OPTIONS] [--timeout SECS] [-- CMD [ARGS...]]

Takes every option of 'khived serve' (see 'khived serve --help'), and:
      --timeout SECS  How long the old daemon may take to stop, and the new one to
                      answer [default: 30]
  -h, --help          Print help

Exit status: 0 once the new daemon answers, 1 if the old one did not stop or the new one
could not be started (the old one, if replaced, still serving) or did not answer in time
(it is left running, to take over once ready), 5 if a daemon that offers no handover
was stopped and another one started meanwhile (by a client's --spawn, say), 2 on a usage
error.
";

const CALL_HELP: &str = "\
Send one request and print the result on standard output.

Usage: khived call [OPTIONS] OPS [-- CMD [ARGS...]]

OPS '-' reads the request's ops from standard input (one trailing newline removed).

Options:
      --socket PATH          Socket of the daemon
      --pid PATH             PID file of the daemon (used with --spawn)
      --presentation P       Presentation to ask for
      --namespace NS         Namespace of the request [default: khive]
      --config-id ID         Configuration id of the request [default: \"\"]
      --timeout SECS         Deadline for connecting, sending and reading; with --spawn,
                             also how long a daemon it starts may take to answer (at
                             least 5) [default: 30]
      --json                 Print the whole response as one JSON object (the exit
                             status is the same)
      --spawn                Start the daemon if none answers, with the serve options
                             given here (see 'khived serve --help'); the worker command
                             comes after --, e.g.
                               khived call --spawn 'upper hi' -- python3 examples/worker.py
      --replace              With --spawn: replace a daemon that serves another namespace,
                             config id or an older protocol version (an older build)
                             with one started from these options; its clients are not
                             cut off
  -h, --help                 Print help

Exit status:
  0   the request succeeded; the result is on standard output
  1   the request failed: the dispatcher's error, or the daemon's (bad_request,
      frame_too_large, response_too_large, request_timed_out, dispatcher_panicked)
  2   usage error, or a request too large to send (over the 8 MiB frame limit)
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
      --json          Print one JSON object (\"state\" is one of the names below)
      --timeout SECS  How long to wait for the daemon's answer [default: 2]
  -h, --help          Print help

Exit status:
  0  answering: a daemon answered the probe
  3  not_running: nothing listens on the socket and no process holds the PID file (stale
     files are reported)
  75 busy: a daemon answered daemon_busy (at its connection cap, or its frame memory
     in use); try again
  7  not_answering: the socket accepts connections or the PID file is held, but no answer
     came in time (a daemon starting, stopping, stopped with SIGSTOP, or hung), or the
     PID file could not be inspected (the reason is printed)
  77 untrusted: the socket is not this user's to trust (a directory on its way belongs
     to another user or is writable by others, or the process serving it runs as another
     user); nothing was sent, and the reason names the fix
  2  usage error
";

const STOP_HELP: &str = "\
Stop the daemon: SIGTERM to the process holding the PID file's lock, then wait until it
has gone. A PID file that no live daemon holds is never acted on.

Usage: khived stop [OPTIONS]

Options:
      --socket PATH   Socket of the daemon
      --pid PATH      PID file of the daemon
      --timeout SECS  How long to wait for the daemon to exit [default: 15]
      --force         Send SIGKILL if it has not exited by then (and still holds the
                      PID file's lock: a pid that let go of it is not proven the daemon's)
      --json          Print one JSON object: stopped, pid, was_running, forced, message
  -h, --help          Print help

Exit status: 0 when the daemon has stopped or none was running, 1 otherwise.
";

/// Every subcommand and its help, in the order `khived --help` lists them.
const COMMANDS: [(&str, &str); 7] = [
    ("serve", SERVE_HELP),
    ("start", START_HELP),
    ("restart", RESTART_HELP),
    ("call", CALL_HELP),
    ("status", STATUS_HELP),
    ("stop", STOP_HELP),
    ("help", HELP),
];

pub(crate) fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Command, Usage> {
    let usage = |e: lexopt::Error| Usage {
        message: e.to_string(),
        command: None,
    };
    let mut parser = lexopt::Parser::from_args(args);
    let command = match parser.next().map_err(usage)? {
        None => return Err(usage("no command given".into())),
        Some(Short('h') | Long("help")) => return Ok(Command::Help(HELP)),
        Some(Short('V') | Long("version")) => return Ok(Command::Version),
        Some(Value(command)) => command.string().map_err(usage)?,
        Some(arg) => return Err(usage(arg.unexpected())),
    };
    let Some(&(name, _)) = COMMANDS.iter().find(|(name, _)| *name == command) else {
        return Err(Usage {
            message: unknown_command(&command),
            command: None,
        });
    };
    let parsed = match name {
        "serve" => parse_serve(&mut parser),
        "start" => parse_start(&mut parser, START_HELP, Command::Start),
        "restart" => parse_start(&mut parser, RESTART_HELP, Command::Restart),
        "call" => parse_call(&mut parser),
        "status" => parse_status(&mut parser),
        "stop" => parse_stop(&mut parser),
        _ => return parse_help(&mut parser),
    };
    parsed.map_err(|e| Usage {
        message: e.to_string(),
        command: Some(name),
    })
}

/// `khived help [COMMAND]`.
fn parse_help(parser: &mut lexopt::Parser) -> Result<Command, Usage> {
    let usage = |message: String| Usage {
        message,
        command: Some("help"),
    };
    let topic = match parser.next().map_err(|e| usage(e.to_string()))? {
        None => return Ok(Command::Help(HELP)),
        Some(Value(topic)) => topic.string().map_err(|e| usage(e.to_string()))?,
        Some(arg) => return Err(usage(arg.unexpected().to_string())),
    };
    if let Some(arg) = parser.next().map_err(|e| usage(e.to_string()))? {
        return Err(usage(arg.unexpected().to_string()));
    }
    match COMMANDS.iter().find(|(name, _)| *name == topic) {
        Some((_, help)) => Ok(Command::Help(help)),
        None => Err(Usage {
            message: unknown_command(&topic),
            command: None,
        }),
    }
}

/// "unknown command", with the closest known one when it is a likely typo.
fn unknown_command(given: &str) -> String {
    let closest = COMMANDS
        .iter()
        .map(|(name, _)| (edit_distance(given, name), *name))
        .min();
    match closest {
        // Two edits catch a dropped, doubled or swapped letter, not a different word.
        Some((distance, name)) if distance <= 2 && distance < given.chars().count() => {
            format!("unknown command {given:?}; did you mean '{name}'?")
        }
        _ => format!("unknown command {given:?}"),
    }
}

/// Edit distance with insertions, deletions, substitutions and swaps of two neighbouring
/// characters, one each (optimal string alignment): "stauts" is one swap from "status".
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut d = vec![vec![0; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

impl Common {
    fn new() -> Self {
        Common {
            socket: khived::socket_path(),
            pid_file: khived::pid_path(),
            given: (false, false),
        }
    }

    /// Takes `--socket` or `--pid`; returns false for any other option.
    fn take(&mut self, name: &str, parser: &mut lexopt::Parser) -> Result<bool, lexopt::Error> {
        // As with KHIVE_SOCKET and KHIVE_PID: daemons on two sockets must not share a PID
        // file, so one path given alone brings its partner along.
        match name {
            "socket" => {
                self.socket = parser.value()?.into();
                self.given.0 = true;
                if !self.given.1 {
                    self.pid_file = khived::beside(&self.socket, "pid");
                }
            }
            "pid" => {
                self.pid_file = parser.value()?.into();
                self.given.1 = true;
                if !self.given.0 {
                    self.socket = khived::beside(&self.pid_file, "sock");
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}

impl Serve {
    fn new() -> Self {
        // The pool's own defaults, also when no pool is asked for (the echo dispatcher).
        let pool = khived::pool::PoolOptions::default();
        Serve {
            common: Common::new(),
            log_file: None,
            namespace: pool.namespace,
            config_id: String::new(),
            drain_timeout: None,
            idle_timeout: None,
            max_connections: None,
            worker: None,
            workers: pool.workers,
            queue: pool.queue,
            request_timeout: None,
            threads: None,
            warm: None,
            verbosity: 0,
            replace: false,
        }
    }

    /// Takes one serve option, or the `--` that starts the worker command; returns false
    /// for anything else, which is left for the caller.
    fn take(&mut self, arg: &Opt, parser: &mut lexopt::Parser) -> Result<bool, lexopt::Error> {
        let name = match arg {
            Opt::Short('v') => "verbose",
            Opt::Short('q') => "quiet",
            Opt::Long(name) => name.as_str(),
            _ => return Ok(false),
        };
        let name = name.to_owned();
        match name.as_str() {
            _ if self.common.take(&name, parser)? => {}
            "verbose" => self.verbosity = self.verbosity.saturating_add(1),
            "quiet" => self.verbosity = self.verbosity.saturating_sub(1),
            "log-file" => self.log_file = Some(parser.value()?.into()),
            "namespace" => self.namespace = parser.value()?.string()?,
            "config-id" => self.config_id = parser.value()?.string()?,
            "drain-timeout" => self.drain_timeout = Some(seconds(&name, parser)?),
            "idle-timeout" => self.idle_timeout = Some(seconds(&name, parser)?),
            "max-connections" => {
                self.max_connections = Some(count(&name, parser, MAX_CONNECTIONS)?);
            }
            "workers" => self.workers = count(&name, parser, MAX_WORKERS)?,
            "queue" => self.queue = count(&name, parser, MAX_QUEUE)?,
            "request-timeout" => self.request_timeout = Some(seconds(&name, parser)?),
            "threads" => self.threads = Some(count(&name, parser, MAX_THREADS)?),
            "warm" => self.warm = Some(parser.value()?.string()?),
            "replace" => self.replace = true,
            "worker" => {
                let command = match after_dashes(parser) {
                    Some(command) => command,
                    None => {
                        let mut command = vec![parser.value()?];
                        command.extend(parser.raw_args()?);
                        command
                    }
                };
                self.set_worker(command)?;
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Takes a `--` and the worker command after it, if that is what comes next.
    fn take_dashes(&mut self, parser: &mut lexopt::Parser) -> Result<bool, lexopt::Error> {
        match after_dashes(parser) {
            Some(command) => self.set_worker(command).map(|()| true),
            None => Ok(false),
        }
    }

    fn set_worker(&mut self, command: Vec<OsString>) -> Result<(), lexopt::Error> {
        if command.is_empty() {
            return Err("the worker command is missing after '--'".into());
        }
        self.worker = Some(command);
        Ok(())
    }
}

/// The rest of the command line, if the next argument is `--`.
fn after_dashes(parser: &mut lexopt::Parser) -> Option<Vec<OsString>> {
    let mut raw = parser.try_raw_args()?;
    if raw.peek() != Some(OsStr::new("--")) {
        return None;
    }
    raw.next();
    Some(raw.collect())
}

/// One parsed argument, owned so that the parser can be asked for its value.
enum Opt {
    Short(char),
    Long(String),
    Value(OsString),
}

impl Opt {
    fn next(parser: &mut lexopt::Parser) -> Result<Option<Opt>, lexopt::Error> {
        Ok(parser.next()?.map(|arg| match arg {
            Short(c) => Opt::Short(c),
            Long(name) => Opt::Long(name.to_owned()),
            Value(value) => Opt::Value(value),
        }))
    }

    fn is_help(&self) -> bool {
        matches!(self, Opt::Short('h')) || matches!(self, Opt::Long(name) if name == "help")
    }

    fn is(&self, long: &str) -> bool {
        matches!(self, Opt::Long(name) if name == long)
    }

    fn unexpected(self) -> lexopt::Error {
        match self {
            Opt::Short(c) => format!("invalid option '-{c}'").into(),
            Opt::Long(name) => unknown(&name),
            Opt::Value(value) => format!("unexpected argument {value:?}").into(),
        }
    }
}

fn parse_serve(parser: &mut lexopt::Parser) -> Result<Command, lexopt::Error> {
    let mut serve = Serve::new();
    while !serve.take_dashes(parser)? {
        let Some(arg) = Opt::next(parser)? else { break };
        match arg {
            _ if arg.is_help() => return Ok(Command::Help(SERVE_HELP)),
            _ if serve.take(&arg, parser)? => {}
            _ => return Err(arg.unexpected()),
        }
    }
    Ok(Command::Serve(serve))
}

fn parse_start(
    parser: &mut lexopt::Parser,
    help: &'static str,
    command: fn(Start) -> Command,
) -> Result<Command, lexopt::Error> {
    let mut start = Start {
        serve: Serve::new(),
        timeout: Duration::from_secs(30),
    };
    while !start.serve.take_dashes(parser)? {
        let Some(arg) = Opt::next(parser)? else { break };
        match arg {
            _ if arg.is_help() => return Ok(Command::Help(help)),
            _ if arg.is("timeout") => start.timeout = seconds("timeout", parser)?,
            _ if start.serve.take(&arg, parser)? => {}
            _ => return Err(arg.unexpected()),
        }
    }
    Ok(command(start))
}

fn parse_call(parser: &mut lexopt::Parser) -> Result<Command, lexopt::Error> {
    let mut serve = Serve::new();
    let (mut ops, mut presentation, mut spawn, mut json) = (None, None, false, false);
    let mut timeout = Duration::from_secs(30);
    while !serve.take_dashes(parser)? {
        let Some(arg) = Opt::next(parser)? else { break };
        match arg {
            _ if arg.is_help() => return Ok(Command::Help(CALL_HELP)),
            _ if arg.is("presentation") => presentation = Some(parser.value()?.string()?),
            _ if arg.is("timeout") => timeout = seconds("timeout", parser)?,
            _ if arg.is("spawn") => spawn = true,
            _ if arg.is("json") => json = true,
            Opt::Value(value) if ops.is_none() => ops = Some(value.string()?),
            _ if serve.take(&arg, parser)? => {}
            _ => return Err(arg.unexpected()),
        }
    }
    let Some(ops) = ops else {
        return Err(match serve.worker {
            // `--worker` took everything after it, OPS included.
            Some(_) => "missing OPS: the worker command takes the rest of the line, so OPS \
                        comes before it, e.g.\n  \
                        khived call --spawn 'upper hi' -- python3 examples/worker.py"
                .into(),
            None => {
                "missing OPS: what to send to the daemon ('-' reads it from standard input)".into()
            }
        });
    };
    Ok(Command::Call(Call {
        ops,
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
            Long("timeout") => status.timeout = seconds("timeout", parser)?,
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
        json: false,
    };
    while let Some(arg) = parser.next()? {
        match arg {
            Short('h') | Long("help") => return Ok(Command::Help(STOP_HELP)),
            Long("timeout") => stop.timeout = seconds("timeout", parser)?,
            Long("force") => stop.force = true,
            Long("json") => stop.json = true,
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

/// A duration in (possibly fractional) seconds, from 0 to a year.
fn seconds(name: &str, parser: &mut lexopt::Parser) -> Result<Duration, lexopt::Error> {
    let text = parser.value()?.string()?;
    match text.trim().parse::<f64>() {
        Ok(secs) if (0.0..=MAX_SECS).contains(&secs) => Ok(Duration::from_secs_f64(secs)),
        Ok(_) => Err(format!(
            "--{name} {text} is out of range: give a number of seconds from 0 to {MAX_SECS}"
        )
        .into()),
        Err(_) => Err(format!("--{name} {text:?} is not a number of seconds").into()),
    }
}

/// A whole number from 1 to `max`.
fn count(name: &str, parser: &mut lexopt::Parser, max: usize) -> Result<usize, lexopt::Error> {
    let text = parser.value()?.string()?;
    match text.trim().parse::<u128>() {
        Ok(n) if n >= 1 && n <= max as u128 => Ok(n as usize),
        Ok(_) => Err(format!("--{name} {text} is out of range: give 1 to {max}").into()),
        Err(_) => Err(format!("--{name} {text:?} is not a positive whole number").into()),
    }
}

fn unknown(name: &str) -> lexopt::Error {
    format!("invalid option '--{name}'").into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_line(line: &[&str]) -> Result<Command, Usage> {
        parse(line.iter().map(OsString::from))
    }

    #[test]
    fn edit_distances() {
        assert_eq!(edit_distance("status", "status"), 0);
        assert_eq!(edit_distance("stauts", "status"), 1);
        assert_eq!(edit_distance("strat", "start"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("serv", "serve"), 1);
        assert_eq!(edit_distance("", "stop"), 4);
    }

    #[test]
    fn typos_get_a_suggestion() {
        assert!(unknown_command("stauts").contains("did you mean 'status'"));
        assert!(unknown_command("sevre").contains("did you mean 'serve'"));
        assert!(!unknown_command("frobnicate").contains("did you mean"));
    }

    #[test]
    fn the_worker_command_after_dashes() {
        let Ok(Command::Call(call)) = parse_line(&[
            "call", "--spawn", "upper hi", "--", "python3", "w.py", "--flag",
        ]) else {
            panic!("not a call");
        };
        assert_eq!(call.ops, "upper hi");
        let worker = call.serve.worker.unwrap();
        assert_eq!(worker, ["python3", "w.py", "--flag"].map(OsString::from));
        let Ok(Command::Serve(serve)) = parse_line(&["serve", "--worker", "--", "w", "-x"]) else {
            panic!("not a serve");
        };
        assert_eq!(serve.worker.unwrap(), ["w", "-x"].map(OsString::from));
    }

    #[test]
    fn verbosity_counts() {
        let Ok(Command::Serve(serve)) = parse_line(&["serve", "-vv", "-q", "--verbose"]) else {
            panic!("not a serve");
        };
        assert_eq!(serve.verbosity, 2);
    }
}
