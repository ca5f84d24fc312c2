//! `khived-bench`: measure a khived daemon against a plain-threads server speaking the same
//! protocol. See `--help`, and `bench/run.sh` for the full comparison.

mod baseline;
mod burst;
#[cfg(target_os = "linux")]
mod epoll;
mod frame;
mod load;
mod restart;
mod work;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use lexopt::prelude::*;

use crate::load::{Length, Mode, Options};

const HELP: &str = "\
khived-bench: load generator and baseline server for khived's wire format

USAGE:
    khived-bench load --socket PATH [OPTIONS]
    khived-bench baseline --socket PATH [--threads N | --epoll [--pinned]]
    khived-bench burst --socket PATH --pid PID [OPTIONS]
    khived-bench restart --khived PATH [OPTIONS]

load: closed-loop clients on blocking threads, each sending an echo request
({\"ops\":\"<payload>\",...,\"namespace\":\"echo\",\"config_id\":\"\"}) and checking that
the response is ok with result == ops; anything else counts as an error. Prints a table,
then one JSON line (rps and latency quantiles in microseconds).
    --socket PATH        the daemon's socket
    --concurrency N      client threads [default: 8]
    --duration SECS      run this long (fractions allowed) [default: 5]
    --requests N         or send this many requests in total
    --payload BYTES      bytes of ops per request [default: 64]
    --mode MODE          one-shot (a connection per request) or persistent
                         (one connection per client) [default: one-shot]
    --timeout SECS       exit 2 if the run lasts longer [default: duration + 10, or 60]
    --work-us N          each request asks the server for N µs of CPU work before it
                         answers (ops \"spin:N:<payload>\") [default: 0]
    --probe              send probes ({\"probe\":true}) instead, and check only ok
    --background N       N more clients, not measured, each sending requests that ask
                         for --background-work-us of CPU work, until the run ends
                         [default: 0]
    --background-work-us N  [default: 100000]

baseline: echo server (namespace \"echo\", config_id \"\") on a fixed pool of threads that
each block in accept and serve one connection at a time, as many requests as the client
sends. A request whose ops starts with \"spin:N:\" first burns N µs of the serving thread's
CPU time. Removes a leftover socket file before binding; runs until killed.
    --socket PATH        where to listen
    --threads N          pool size, the calling thread included [default: 2]
    --epoll              (Linux) instead, one thread serving every connection from an epoll loop
                         (level-triggered, nonblocking sockets; work requests compute on it)
    --pinned             with --epoll, one such loop per core, each pinned to its core and
                         keeping the connections it accepts

burst: large-frame burst against an echo server. Each client connects, writes all its
requests at once and reads nothing for --hold seconds, then reads and checks every answer
(or, with --leave, closes without reading). Samples the server's VmRSS from /proc/PID/status
before, every 10 ms during (the peak is kept), and once a second for --settle seconds after
the last client closed. Prints the figures, then one JSON line. Fails if an answer is wrong
or missing (without --leave).
    --socket PATH        the server's socket
    --pid PID            the server's process id
    --clients N          clients [default: 40]
    --frames N           requests each client pipelines [default: 2]
    --size BYTES         bytes of ops per request [default: 4194304]
    --hold SECS          how long clients write without reading [default: 3]
    --leave              close after --hold without reading the answers
    --settle SECS        how long to watch memory afterwards [default: 5]
    --timeout SECS       exit 2 if the run lasts longer [default: 120]

restart: starts `khived start --namespace echo` in a private temporary directory, runs
--clients threads looping one-shot echo requests, and runs `khived restart` --restarts
times, --interval apart. Prints each restart's outcome, failed requests by error, the
slowest request during a swap (one that began while a restart ran, or up to 100 ms after)
and overall, and how long each restart took until the new daemon answered; then one JSON
line. Exits non-zero if any request failed.
    --khived PATH        the khived binary [default: target/release/khived]
    --clients N          looping clients [default: 4]
    --restarts N         restarts [default: 5]
    --interval SECS      pause before, between and after the restarts [default: 1]
    --fail               restart with a --log-file below a regular file: each restart
                         must fail, and the running daemon go on serving

EXAMPLE:
    khived-bench baseline --socket /tmp/b/echo.sock &
    khived-bench load --socket /tmp/b/echo.sock --mode persistent --duration 3
";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("khived-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut parser = lexopt::Parser::from_env();
    let command = match parser.next()? {
        Some(Value(command)) => command.string()?,
        Some(Long("help") | Short('h')) | None => {
            print!("{HELP}");
            return Ok(());
        }
        Some(arg) => return Err(arg.unexpected().into()),
    };
    match command.as_str() {
        "load" => load::run(&load_options(parser)?)?,
        "burst" => burst::run(&burst_options(parser)?)?,
        "restart" => restart::run(&restart_options(parser)?)?,
        "baseline" => {
            let (socket, threads, epoll, pinned) = baseline_options(parser)?;
            match epoll {
                #[cfg(target_os = "linux")]
                true => epoll::run(&socket, pinned)?,
                #[cfg(not(target_os = "linux"))]
                true => {
                    let _ = pinned;
                    return Err("--epoll is Linux only".into());
                }
                false => baseline::run(&socket, threads)?,
            }
        }
        other => return Err(format!("unknown command {other:?}; try --help").into()),
    }
    Ok(())
}

fn load_options(mut parser: lexopt::Parser) -> Result<Options, lexopt::Error> {
    let mut socket = None;
    let mut concurrency = 8;
    let mut length = Length::Duration(Duration::from_secs(5));
    let mut payload = 64;
    let mut mode = Mode::OneShot;
    let mut timeout = None;
    let (mut work_us, mut probe, mut background, mut background_work_us) = (0, false, 0, 100_000);
    while let Some(arg) = parser.next()? {
        match arg {
            Long("socket") => socket = Some(PathBuf::from(parser.value()?)),
            Long("concurrency") => concurrency = parser.value()?.parse()?,
            Long("duration") => length = Length::Duration(seconds(parser.value()?.parse()?)?),
            Long("requests") => length = Length::Requests(parser.value()?.parse()?),
            Long("payload") => payload = parser.value()?.parse()?,
            Long("mode") => {
                mode = match parser.value()?.string()?.as_str() {
                    "one-shot" => Mode::OneShot,
                    "persistent" => Mode::Persistent,
                    other => return Err(format!("unknown mode {other:?}").into()),
                }
            }
            Long("timeout") => timeout = Some(seconds(parser.value()?.parse()?)?),
            Long("work-us") => work_us = parser.value()?.parse()?,
            Long("probe") => probe = true,
            Long("background") => background = parser.value()?.parse()?,
            Long("background-work-us") => background_work_us = parser.value()?.parse()?,
            Long("help") | Short('h') => help_and_exit(),
            _ => return Err(arg.unexpected()),
        }
    }
    if concurrency == 0 {
        return Err("--concurrency must be at least 1".into());
    }
    let timeout = timeout.unwrap_or(match length {
        Length::Duration(duration) => duration + Duration::from_secs(10),
        Length::Requests(_) => Duration::from_secs(60),
    });
    Ok(Options {
        socket: socket.ok_or("--socket PATH is required")?,
        concurrency,
        length,
        payload,
        mode,
        timeout,
        work_us,
        probe,
        background,
        background_work_us,
    })
}

fn burst_options(mut parser: lexopt::Parser) -> Result<burst::Options, lexopt::Error> {
    let mut socket = None;
    let mut pid = None;
    let mut options = burst::Options {
        socket: PathBuf::new(),
        pid: 0,
        clients: 40,
        frames: 2,
        size: 4 * 1024 * 1024,
        hold: Duration::from_secs(3),
        leave: false,
        settle: Duration::from_secs(5),
        timeout: Duration::from_secs(120),
    };
    while let Some(arg) = parser.next()? {
        match arg {
            Long("socket") => socket = Some(PathBuf::from(parser.value()?)),
            Long("pid") => pid = Some(parser.value()?.parse()?),
            Long("clients") => options.clients = parser.value()?.parse()?,
            Long("frames") => options.frames = parser.value()?.parse()?,
            Long("size") => options.size = parser.value()?.parse()?,
            Long("hold") => options.hold = seconds(parser.value()?.parse()?)?,
            Long("leave") => options.leave = true,
            Long("settle") => options.settle = seconds(parser.value()?.parse()?)?,
            Long("timeout") => options.timeout = seconds(parser.value()?.parse()?)?,
            Long("help") | Short('h') => help_and_exit(),
            _ => return Err(arg.unexpected()),
        }
    }
    if options.clients == 0 || options.frames == 0 {
        return Err("--clients and --frames must be at least 1".into());
    }
    options.socket = socket.ok_or("--socket PATH is required")?;
    options.pid = pid.ok_or("--pid PID is required")?;
    Ok(options)
}

fn restart_options(mut parser: lexopt::Parser) -> Result<restart::Options, lexopt::Error> {
    let mut options = restart::Options {
        khived: PathBuf::from("target/release/khived"),
        clients: 4,
        restarts: 5,
        interval: Duration::from_secs(1),
        fail: false,
    };
    while let Some(arg) = parser.next()? {
        match arg {
            Long("khived") => options.khived = PathBuf::from(parser.value()?),
            Long("clients") => options.clients = parser.value()?.parse()?,
            Long("restarts") => options.restarts = parser.value()?.parse()?,
            Long("interval") => options.interval = seconds(parser.value()?.parse()?)?,
            Long("fail") => options.fail = true,
            Long("help") | Short('h') => help_and_exit(),
            _ => return Err(arg.unexpected()),
        }
    }
    Ok(options)
}

type BaselineOptions = (PathBuf, usize, bool, bool);

fn baseline_options(mut parser: lexopt::Parser) -> Result<BaselineOptions, lexopt::Error> {
    let mut socket = None;
    let mut threads = 2;
    let (mut epoll, mut pinned) = (false, false);
    while let Some(arg) = parser.next()? {
        match arg {
            Long("socket") => socket = Some(PathBuf::from(parser.value()?)),
            Long("threads") => threads = parser.value()?.parse()?,
            Long("epoll") => epoll = true,
            Long("pinned") => pinned = true,
            Long("help") | Short('h') => help_and_exit(),
            _ => return Err(arg.unexpected()),
        }
    }
    if threads == 0 {
        return Err("--threads must be at least 1".into());
    }
    if pinned && !epoll {
        return Err("--pinned goes with --epoll".into());
    }
    Ok((
        socket.ok_or("--socket PATH is required")?,
        threads,
        epoll,
        pinned,
    ))
}

fn seconds(secs: f64) -> Result<Duration, lexopt::Error> {
    Duration::try_from_secs_f64(secs).map_err(|_| format!("not a duration: {secs}").into())
}

fn help_and_exit() -> ! {
    print!("{HELP}");
    std::process::exit(0);
}
