//! The large-frame burst: many clients each pipeline a few large echo requests and do not
//! read for a while, then read (or leave). Measures the server's resident memory before,
//! at its peak during, and after the burst, from `/proc/PID/status`.
//!
//! A measurement, not a test: it prints figures and fails only if a client saw a wrong
//! answer or lost one (when clients read).

use std::fs;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::frame::{self, FrameReader};
use crate::load::{Reply, Request};

#[derive(Debug, Clone)]
pub struct Options {
    pub socket: PathBuf,
    /// The server's process id, whose memory is sampled.
    pub pid: u32,
    pub clients: usize,
    /// Requests each client writes before reading anything.
    pub frames: usize,
    /// Bytes of `ops` in each request.
    pub size: usize,
    /// How long clients hold their requests without reading.
    pub hold: Duration,
    /// Whether clients close without reading their answers.
    pub leave: bool,
    /// How long to watch the server's memory after the last client closed.
    pub settle: Duration,
    /// Give up on a run that takes longer than this.
    pub timeout: Duration,
}

/// What one client saw.
#[derive(Default)]
struct Tally {
    answered: u64,
    errors: u64,
    first_error: Option<String>,
}

/// Runs the burst and prints the figures, the last line as JSON.
pub fn run(options: &Options) -> io::Result<()> {
    let limit = options.timeout;
    thread::spawn(move || {
        thread::sleep(limit);
        eprintln!("khived-bench: the burst took longer than {limit:?}; giving up");
        std::process::exit(2);
    });
    let ops: String = (0..options.size)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let request = Request::echo(&ops, false);
    let mut frames = Vec::new();
    for _ in 0..options.frames {
        frame::encode_into(&mut frames, &request)?;
    }

    let before = rss_kib(options.pid)?;
    let peak = AtomicU64::new(before);
    let done = AtomicBool::new(false);
    let began = Instant::now();
    let (tallies, burst) = thread::scope(|scope| {
        // Sampled every 10 ms: a peak held for less than that may be missed.
        scope.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                if let Ok(kib) = rss_kib(options.pid) {
                    peak.fetch_max(kib, Ordering::Relaxed);
                }
                thread::sleep(Duration::from_millis(10));
            }
        });
        let clients: Vec<_> = (0..options.clients)
            .map(|_| scope.spawn(|| client(options, &frames, &ops)))
            .collect();
        let tallies: Vec<Tally> = clients
            .into_iter()
            .map(|client| client.join().expect("a client thread panicked"))
            .collect();
        let burst = began.elapsed();
        done.store(true, Ordering::Relaxed);
        (tallies, burst)
    });

    // After the burst, once a second: how fast memory goes back.
    let mut after = Vec::new();
    let settle_start = Instant::now();
    loop {
        let at = settle_start.elapsed();
        after.push((at, rss_kib(options.pid)?));
        if at >= options.settle {
            break;
        }
        thread::sleep(Duration::from_secs(1).min(options.settle - at));
    }
    let hwm = hwm_kib(options.pid).unwrap_or(0);
    let peak = peak.into_inner().max(after[0].1);

    let (mut answered, mut errors) = (0, 0);
    for tally in tallies {
        answered += tally.answered;
        errors += tally.errors;
        if let Some(e) = tally.first_error {
            eprintln!("khived-bench: error: {e}");
        }
    }
    let last = after.last().map_or(0, |&(_, kib)| kib);
    println!(
        "clients      {} x {} requests of {} bytes, hold {:?}{}",
        options.clients,
        options.frames,
        options.size,
        options.hold,
        if options.leave {
            ", then leave unread"
        } else {
            ", then read"
        }
    );
    println!("burst        {:.3} s", burst.as_secs_f64());
    println!("answered     {answered}");
    println!("errors       {errors}");
    println!("rss before   {before} KiB");
    println!("rss peak     {peak} KiB (VmHWM {hwm} KiB)");
    for (at, kib) in &after {
        println!("rss after    {kib} KiB at +{:.1} s", at.as_secs_f64());
    }
    println!(
        "{{\"clients\":{},\"frames\":{},\"size\":{},\"leave\":{},\"burst_s\":{:.3},\
         \"answered\":{answered},\"errors\":{errors},\"rss_before_kib\":{before},\
         \"rss_peak_kib\":{peak},\"vm_hwm_kib\":{hwm},\"rss_after_kib\":{last},\
         \"settle_s\":{:.1}}}",
        options.clients,
        options.frames,
        options.size,
        options.leave,
        burst.as_secs_f64(),
        options.settle.as_secs_f64(),
    );
    let expected = if options.leave {
        0
    } else {
        (options.clients * options.frames) as u64
    };
    if errors > 0 || answered != expected {
        return Err(io::Error::other(format!(
            "{answered} of {expected} requests answered, {errors} errors"
        )));
    }
    Ok(())
}

/// Writes every request on one thread while the client holds still, then reads them all
/// back (or closes).
fn client(options: &Options, frames: &[u8], ops: &str) -> Tally {
    let mut tally = Tally::default();
    if let Err(e) = exchange(options, frames, ops, &mut tally) {
        tally.errors += 1;
        tally.first_error.get_or_insert_with(|| e.to_string());
    }
    tally
}

fn exchange(options: &Options, frames: &[u8], ops: &str, tally: &mut Tally) -> io::Result<()> {
    let stream = UnixStream::connect(&options.socket)?;
    let began = Instant::now();
    thread::scope(|scope| {
        // The writer blocks once the server stops reading (it is stuck writing an answer
        // nobody reads); it finishes when the client reads, or fails when it leaves.
        let mut writer = stream.try_clone()?;
        let written = scope.spawn(move || writer.write_all(frames));
        thread::sleep(options.hold.saturating_sub(began.elapsed()));
        if options.leave {
            stream.shutdown(std::net::Shutdown::Both)?;
            let _ = written.join();
            return Ok(());
        }
        let mut reader = FrameReader::default();
        let mut stream = &stream;
        for _ in 0..options.frames {
            let body = reader.next(&mut stream)?.ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed before the response",
                )
            })?;
            match serde_json::from_slice::<Reply<'_>>(body) {
                Ok(reply) if reply.ok && reply.result.as_deref() == Some(ops) => {
                    tally.answered += 1
                }
                _ => {
                    let shown = &body[..body.len().min(200)];
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("unexpected response: {}", String::from_utf8_lossy(shown)),
                    ));
                }
            }
        }
        written.join().expect("writer thread panicked")
    })
}

/// `VmRSS` of process `pid`, in KiB.
fn rss_kib(pid: u32) -> io::Result<u64> {
    status_field(pid, "VmRSS:")
}

/// `VmHWM` (the peak resident set) of process `pid`, in KiB.
fn hwm_kib(pid: u32) -> io::Result<u64> {
    status_field(pid, "VmHWM:")
}

fn status_field(pid: u32, field: &str) -> io::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| io::Error::other(format!("no {field} in /proc/{pid}/status")))
}
