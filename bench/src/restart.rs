//! Restarts under load: clients loop one-shot echo requests while `khived restart` replaces
//! the daemon again and again. Counts failed requests (by error), the slowest request during
//! a swap, and how long each restart took until the new daemon answered.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::frame::{self, FrameReader};
use crate::load::{Reply, Request};

#[derive(Debug, Clone)]
pub struct Options {
    /// The `khived` binary.
    pub khived: PathBuf,
    pub clients: usize,
    pub restarts: usize,
    /// Pause between restarts.
    pub interval: Duration,
    /// Restart with a log file that cannot be opened: every restart must fail, and the old
    /// daemon must go on serving.
    pub fail: bool,
}

/// One request a client made: when it began, how long it took, how it ended.
struct Sample {
    began: Instant,
    took: Duration,
    error: Option<String>,
}

pub fn run(options: &Options) -> io::Result<()> {
    let dir = std::env::temp_dir().join(format!("khived-restart-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let socket = dir.join("k.sock");
    let result = measure(options, &dir, &socket);
    let _ = khived(options, &dir, "stop", &[]).status();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn khived(options: &Options, dir: &Path, command: &str, extra: &[&str]) -> Command {
    let mut khived = Command::new(&options.khived);
    khived
        .arg(command)
        .arg("--socket")
        .arg(dir.join("k.sock"))
        .arg("--pid")
        .arg(dir.join("k.pid"))
        .args(extra)
        .stdin(Stdio::null());
    khived
}

fn measure(options: &Options, dir: &Path, socket: &Path) -> io::Result<()> {
    let serve = ["--namespace", "echo", "-q"];
    let started = khived(options, dir, "start", &serve).output()?;
    if !started.status.success() {
        return Err(io::Error::other(format!(
            "khived start failed: {}",
            String::from_utf8_lossy(&started.stderr)
        )));
    }
    let done = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..options.clients)
        .map(|i| {
            let done = Arc::clone(&done);
            let socket = socket.to_owned();
            thread::spawn(move || client(&socket, i, &done))
        })
        .collect();
    // Let the clients get going before the first restart.
    thread::sleep(options.interval);
    let blocker = dir.join("not-a-directory");
    std::fs::write(&blocker, "")?;
    let bad_log = blocker.join("k.log");
    let mut restart_args: Vec<&str> = serve.to_vec();
    if options.fail {
        restart_args.extend(["--log-file", bad_log.to_str().unwrap_or_default()]);
    }
    let mut swaps = Vec::new();
    let mut outcomes = Vec::new();
    for _ in 0..options.restarts {
        let began = Instant::now();
        let out = khived(options, dir, "restart", &restart_args).output()?;
        let took = began.elapsed();
        swaps.push((began, took));
        outcomes.push(match out.status.success() {
            true => format!("ok (pid {})", String::from_utf8_lossy(&out.stdout).trim()),
            false => format!(
                "failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .next()
                    .unwrap_or("")
            ),
        });
        thread::sleep(options.interval);
    }
    done.store(true, Ordering::Relaxed);
    let samples: Vec<Sample> = clients
        .into_iter()
        .flat_map(|client| client.join().unwrap_or_default())
        .collect();

    let failed: Vec<&Sample> = samples.iter().filter(|s| s.error.is_some()).collect();
    let mut by_error: BTreeMap<&str, usize> = BTreeMap::new();
    for sample in &failed {
        *by_error
            .entry(sample.error.as_deref().unwrap_or(""))
            .or_default() += 1;
    }
    // A request is "during a swap" if it began while a restart ran, or up to 100 ms after.
    let during = |sample: &&Sample| {
        swaps.iter().any(|&(began, took)| {
            sample.began >= began && sample.began <= began + took + Duration::from_millis(100)
        })
    };
    let slowest_swap = samples.iter().filter(during).map(|s| s.took).max();
    let slowest = samples.iter().map(|s| s.took).max();
    let mut ready: Vec<Duration> = swaps.iter().map(|&(_, took)| took).collect();
    ready.sort_unstable();
    let ms = |d: Option<Duration>| d.map_or(0.0, |d| d.as_secs_f64() * 1000.0);

    println!("clients          {}", options.clients);
    println!(
        "restarts         {}{}",
        options.restarts,
        if options.fail {
            " (each with a log file that cannot be opened)"
        } else {
            ""
        }
    );
    for (i, outcome) in outcomes.iter().enumerate() {
        println!("  restart {}      {outcome}", i + 1);
    }
    println!("requests         {}", samples.len());
    println!("failed           {}", failed.len());
    for (error, count) in &by_error {
        println!("  {count:>6} x {error}");
    }
    println!(
        "slowest request  {:.1} ms during a swap, {:.1} ms overall",
        ms(slowest_swap),
        ms(slowest)
    );
    println!(
        "restart took     min {:.1} ms, median {:.1} ms, max {:.1} ms (until the new daemon answered)",
        ms(ready.first().copied()),
        ms(ready.get(ready.len() / 2).copied()),
        ms(ready.last().copied())
    );
    println!(
        "{{\"clients\":{},\"restarts\":{},\"fail\":{},\"requests\":{},\"failed\":{},\
         \"slowest_swap_ms\":{:.1},\"slowest_ms\":{:.1},\"restart_max_ms\":{:.1}}}",
        options.clients,
        options.restarts,
        options.fail,
        samples.len(),
        failed.len(),
        ms(slowest_swap),
        ms(slowest),
        ms(ready.last().copied())
    );
    io::stdout().flush()?;
    if !failed.is_empty() {
        return Err(io::Error::other(format!(
            "{} request(s) failed",
            failed.len()
        )));
    }
    Ok(())
}

/// Loops one-shot echo requests until `done`.
fn client(socket: &Path, id: usize, done: &AtomicBool) -> Vec<Sample> {
    let ops = format!("client {id}");
    let mut request = Vec::new();
    if frame::encode_into(&mut request, &Request::echo(&ops, false)).is_err() {
        return Vec::new();
    }
    let mut reader = FrameReader::default();
    let mut samples = Vec::new();
    while !done.load(Ordering::Relaxed) {
        let began = Instant::now();
        reader.clear();
        let outcome = UnixStream::connect(socket).and_then(|mut stream| {
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            stream.write_all(&request)?;
            let body = reader.next(&mut stream)?.ok_or_else(|| {
                io::Error::new(io::ErrorKind::UnexpectedEof, "closed before the response")
            })?;
            match serde_json::from_slice::<Reply<'_>>(body) {
                Ok(reply) if reply.ok && reply.result.as_deref() == Some(ops.as_str()) => Ok(()),
                _ => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "unexpected response: {}",
                        String::from_utf8_lossy(&body[..body.len().min(160)])
                    ),
                )),
            }
        });
        let error = outcome.err().map(|e| match e.raw_os_error() {
            Some(_) => format!("{:?}", e.kind()),
            None => e.to_string(),
        });
        samples.push(Sample {
            began,
            took: began.elapsed(),
            error,
        });
    }
    samples
}
