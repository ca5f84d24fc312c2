//! The reference row of `bench/cores.sh`: the wire format served the way the original tokio
//! runtime served it. A multi-thread runtime (a worker thread per core), a task per
//! connection, and `dispatch` called inline in that task, so a dispatcher that computes
//! holds a worker thread until it returns. The dispatcher is the same as khived's
//! `examples/compute`: `ops` starting with `spin:<µs>:` burns that much of the thread's CPU
//! time, then `ops` is echoed; a probe is answered with the pid. A reference for measuring,
//! not a server to use: it trusts its clients (no frame size cap; a frame it cannot parse
//! closes the connection without an answer).
//!
//! ```text
//! KHIVE_SOCKET=/tmp/ref/r.sock target/release/khived-tokio-ref
//! ```

use std::time::Duration;

use rustix::time::{clock_gettime, ClockId};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

#[derive(Deserialize)]
struct Request {
    #[serde(default)]
    ops: String,
    #[serde(default)]
    probe: bool,
}

#[derive(serde::Serialize)]
struct Response {
    ok: bool,
    result: String,
    error: Option<String>,
    namespace_mismatch: bool,
    config_mismatch: bool,
    served_config_id: &'static str,
}

fn thread_cpu() -> Duration {
    let now = clock_gettime(ClockId::ThreadCPUTime);
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

/// Burns `work` of this thread's CPU time, as `examples/compute` does.
fn burn(work: Duration) {
    let start = thread_cpu();
    while thread_cpu().saturating_sub(start) < work {
        for _ in 0..64 {
            std::hint::spin_loop();
        }
    }
}

fn requested(ops: &str) -> Option<Duration> {
    let (micros, _) = ops.strip_prefix("spin:")?.split_once(':')?;
    micros.parse().ok().map(Duration::from_micros)
}

/// The dispatcher, called inline by the connection's task.
fn dispatch(request: Request) -> String {
    if request.probe {
        return format!("{{\"pid\":{}}}", std::process::id());
    }
    if let Some(work) = requested(&request.ops) {
        burn(work);
    }
    request.ops
}

async fn serve(mut stream: UnixStream) -> std::io::Result<()> {
    loop {
        let mut header = [0u8; 4];
        if stream.read_exact(&mut header).await.is_err() {
            return Ok(());
        }
        let mut body = vec![0; u32::from_be_bytes(header) as usize];
        stream.read_exact(&mut body).await?;
        let request: Request = serde_json::from_slice(&body)?;
        let response = Response {
            ok: true,
            result: dispatch(request),
            error: None,
            namespace_mismatch: false,
            config_mismatch: false,
            served_config_id: "",
        };
        let json = serde_json::to_vec(&response)?;
        let mut frame = (json.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&json);
        stream.write_all(&frame).await?;
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let path = std::env::var("KHIVE_SOCKET").expect("set KHIVE_SOCKET to the socket's path");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = accepted?;
                tokio::spawn(serve(stream));
            }
            _ = terminate.recv() => break,
        }
    }
    std::fs::remove_file(&path)
}
