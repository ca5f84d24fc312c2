//! The load generator: closed-loop clients, one blocking thread each.
//!
//! Every client sends the same pre-encoded request, waits for the answer, checks it, and
//! sends the next one. Latencies are kept per thread and merged at the end, so the clients
//! share nothing on the hot path but the socket they measure.

use std::borrow::Cow;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::frame::{self, FrameReader};
use crate::work;

/// How clients use connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Connect, send one request, read one response, close: what khive's tools do.
    OneShot,
    /// Send request after request on one connection, as the protocol allows (PROTOCOL.md).
    Persistent,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::OneShot => "one-shot",
            Mode::Persistent => "persistent",
        }
    }
}

/// When the run ends.
#[derive(Debug, Clone, Copy)]
pub enum Length {
    Duration(Duration),
    /// This many requests in total, shared by all clients.
    Requests(u64),
}

#[derive(Debug, Clone)]
pub struct Options {
    pub socket: PathBuf,
    pub concurrency: usize,
    pub length: Length,
    /// Bytes of `ops` in each request.
    pub payload: usize,
    pub mode: Mode,
    /// Give up on a run that takes longer than this (a server that hangs must not hang us).
    pub timeout: Duration,
    /// Microseconds of CPU work each measured request asks for (`spin:<µs>:`, see work.rs).
    pub work_us: u64,
    /// The measured clients send probes instead of requests (and check `ok`).
    pub probe: bool,
    /// Clients besides the measured ones, each sending requests that ask for
    /// `background_work_us` of CPU work, one after another, until the measured clients are
    /// done. Their latencies are not counted: they are the slow requests that others must
    /// not wait behind.
    pub background: usize,
    pub background_work_us: u64,
}

/// A request as PROTOCOL.md defines it, field for field.
#[derive(Serialize)]
pub(crate) struct Request<'a> {
    pub(crate) ops: &'a str,
    pub(crate) presentation: Option<&'a str>,
    pub(crate) presentation_per_op: Option<&'a [Option<String>]>,
    pub(crate) namespace: &'a str,
    pub(crate) config_id: &'a str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(crate) probe: bool,
}

impl<'a> Request<'a> {
    /// A request of the echo servers' namespace and configuration (or a probe).
    pub(crate) fn echo(ops: &'a str, probe: bool) -> Self {
        Request {
            ops,
            presentation: None,
            presentation_per_op: None,
            namespace: "echo",
            config_id: "",
            probe,
        }
    }
}

/// One client's request, encoded once, and what a right answer carries.
struct Exchange {
    frame: Vec<u8>,
    /// The `result` to expect; `None` for a probe, whose result is the daemon's details.
    result: Option<String>,
}

impl Exchange {
    fn new(ops: String, probe: bool) -> io::Result<Self> {
        let request = Request::echo(&ops, probe);
        let mut frame = Vec::new();
        frame::encode_into(&mut frame, &request)?;
        let result = (!probe).then_some(ops);
        Ok(Exchange { frame, result })
    }
}

/// The parts of a response a client checks; the rest is ignored.
#[derive(Deserialize)]
pub(crate) struct Reply<'a> {
    pub(crate) ok: bool,
    #[serde(borrow, default)]
    pub(crate) result: Option<Cow<'a, str>>,
}

/// What one client saw.
#[derive(Default)]
struct Tally {
    /// Nanoseconds per successful request.
    latencies: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
}

impl Tally {
    fn failed(&mut self, e: io::Error) {
        self.errors += 1;
        self.first_error.get_or_insert_with(|| e.to_string());
        // A server that refuses everything must not turn the run into a busy loop.
        thread::sleep(Duration::from_millis(1));
    }
}

/// Runs the load and prints a table and, as the last line, the same figures as JSON.
/// Fails only if no request at all succeeded.
pub fn run(options: &Options) -> io::Result<()> {
    let payload: String = (0..options.payload)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let measured = Exchange::new(work::ops(options.work_us, &payload), options.probe)?;
    let slow = Exchange::new(work::ops(options.background_work_us, &payload), false)?;

    let limit = options.timeout;
    thread::spawn(move || {
        thread::sleep(limit);
        eprintln!("khived-bench: the run took longer than {limit:?}; giving up");
        std::process::exit(2);
    });

    let budget = AtomicU64::new(match options.length {
        Length::Requests(n) => n,
        Length::Duration(_) => 0,
    });
    let start = Barrier::new(options.concurrency + options.background + 1);
    let done = AtomicBool::new(false);
    let (tallies, elapsed) = thread::scope(|scope| {
        let clients: Vec<_> = (0..options.concurrency)
            .map(|_| scope.spawn(|| client(options, &measured, &budget, &start, None)))
            .collect();
        let background: Vec<_> = (0..options.background)
            .map(|_| scope.spawn(|| client(options, &slow, &budget, &start, Some(&done))))
            .collect();
        start.wait();
        let began = Instant::now();
        let tallies: Vec<Tally> = clients
            .into_iter()
            .map(|client| client.join().expect("a client thread panicked"))
            .collect();
        let elapsed = began.elapsed();
        done.store(true, Ordering::Relaxed);
        for client in background {
            let tally = client.join().expect("a client thread panicked");
            if let Some(e) = tally.first_error {
                eprintln!("khived-bench: background client error: {e}");
            }
        }
        (tallies, elapsed)
    });

    let mut latencies = Vec::new();
    let mut errors = 0;
    for tally in tallies {
        latencies.extend_from_slice(&tally.latencies);
        errors += tally.errors;
        if let Some(e) = tally.first_error {
            eprintln!("khived-bench: error: {e}");
        }
    }
    latencies.sort_unstable();
    let summary = Summary {
        options,
        elapsed,
        requests: latencies.len() as u64,
        errors,
        latencies: &latencies,
    };
    summary.print();
    if latencies.is_empty() {
        return Err(io::Error::other("no request succeeded"));
    }
    Ok(())
}

/// One client's loop, until the duration is over or the shared budget is spent; a
/// background client (with `until`) loops until `until` is set instead.
fn client(
    options: &Options,
    exchange_with: &Exchange,
    budget: &AtomicU64,
    start: &Barrier,
    until: Option<&AtomicBool>,
) -> Tally {
    let mut tally = Tally::default();
    let mut reader = FrameReader::default();
    let mut persistent: Option<UnixStream> = None;
    start.wait();
    let deadline = match options.length {
        Length::Duration(duration) => Some(Instant::now() + duration),
        Length::Requests(_) => None,
    };
    loop {
        // The shared budget is touched only when counting requests, so that timed runs
        // do not bounce a cache line between the clients.
        let more = match (until, deadline) {
            (Some(done), _) => !done.load(Ordering::Relaxed),
            (None, Some(deadline)) => Instant::now() < deadline,
            (None, None) => budget
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok(),
        };
        if !more {
            break;
        }
        let outcome = match options.mode {
            // The connect is part of what a one-shot client waits for, so it is timed.
            Mode::OneShot => {
                let began = Instant::now();
                reader.clear();
                UnixStream::connect(&options.socket)
                    .and_then(|mut stream| exchange(&mut stream, exchange_with, &mut reader))
                    .map(|()| began.elapsed())
            }
            Mode::Persistent => {
                if persistent.is_none() {
                    reader.clear();
                    match UnixStream::connect(&options.socket) {
                        Ok(stream) => persistent = Some(stream),
                        Err(e) => {
                            tally.failed(e);
                            continue;
                        }
                    }
                }
                let stream = persistent.as_mut().expect("connected above");
                let began = Instant::now();
                let outcome = exchange(stream, exchange_with, &mut reader);
                if outcome.is_err() {
                    // The stream's state is unknown after a failure: start over.
                    persistent = None;
                }
                outcome.map(|()| began.elapsed())
            }
        };
        match outcome {
            Ok(latency) => tally.latencies.push(latency.as_nanos() as u64),
            Err(e) => tally.failed(e),
        }
    }
    tally
}

/// Sends the request and checks that the answer is `ok` with `result` equal to `ops` (any
/// `result` for a probe).
fn exchange(stream: &mut UnixStream, with: &Exchange, reader: &mut FrameReader) -> io::Result<()> {
    stream.write_all(&with.frame)?;
    let body = reader.next(stream)?.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed before the response",
        )
    })?;
    match serde_json::from_slice::<Reply<'_>>(body) {
        Ok(reply)
            if reply.ok
                && (with.result.is_none() || reply.result.as_deref() == with.result.as_deref()) =>
        {
            Ok(())
        }
        _ => {
            let shown = &body[..body.len().min(200)];
            Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected response: {}", String::from_utf8_lossy(shown)),
            ))
        }
    }
}

struct Summary<'a> {
    options: &'a Options,
    elapsed: Duration,
    requests: u64,
    errors: u64,
    /// Sorted, in nanoseconds.
    latencies: &'a [u64],
}

impl Summary<'_> {
    /// Microseconds at quantile `q` (nearest rank).
    fn quantile_us(&self, q: f64) -> f64 {
        let n = self.latencies.len();
        if n == 0 {
            return 0.0;
        }
        let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
        self.latencies[rank - 1] as f64 / 1000.0
    }

    fn print(&self) {
        let o = self.options;
        let secs = self.elapsed.as_secs_f64();
        let rps = self.requests as f64 / secs;
        let [p50, p99, p999, max] = [0.5, 0.99, 0.999, 1.0].map(|q| self.quantile_us(q));
        println!("mode         {}", o.mode.name());
        println!("concurrency  {}", o.concurrency);
        println!("payload      {} bytes", o.payload);
        println!(
            "work         {} µs per request{}; {} background client(s) asking for {} µs",
            o.work_us,
            if o.probe { " (probes)" } else { "" },
            o.background,
            o.background_work_us
        );
        println!("elapsed      {secs:.3} s");
        println!("requests     {}", self.requests);
        println!("errors       {}", self.errors);
        println!("rps          {rps:.1}");
        println!("latency µs   p50 {p50:.1}  p99 {p99:.1}  p99.9 {p999:.1}  max {max:.1}");
        println!(
            "{{\"mode\":\"{}\",\"concurrency\":{},\"payload\":{},\"work_us\":{},\"probe\":{},\
             \"background\":{},\"background_work_us\":{},\"elapsed_s\":{secs:.3},\
             \"requests\":{},\"errors\":{},\"rps\":{rps:.1},\"p50_us\":{p50:.1},\
             \"p99_us\":{p99:.1},\"p999_us\":{p999:.1},\"max_us\":{max:.1}}}",
            o.mode.name(),
            o.concurrency,
            o.payload,
            o.work_us,
            o.probe,
            o.background,
            o.background_work_us,
            self.requests,
            self.errors,
        );
    }
}
