//! The baseline: the same protocol and an echo dispatcher on plain blocking threads.
//! A request whose `ops` asks for CPU work (`spin:<µs>:`, see `work.rs`) gets it done on the
//! thread that serves it, as a dispatcher computing inline would.
//!
//! A fixed pool of threads (the caller's included) each block in `accept` on the shared
//! listener and serve the connection they get until the client closes it. No async runtime,
//! no reactor: this is the simplest server that speaks the wire format, and the yardstick
//! for what a runtime's machinery costs.
//!
//! With `--epoll` (Linux), one thread serves every connection from an epoll loop instead:
//! see `epoll.rs`.

use std::borrow::Cow;
use std::fs;
use std::io::{self, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::thread;

use serde::{Deserialize, Serialize};

use crate::frame::{self, FrameReader};
use crate::work;

const NAMESPACE: &str = "echo";
const CONFIG_ID: &str = "";

/// A request as PROTOCOL.md defines it, parsed the way khived parses it: borrowing where JSON
/// allows.
#[derive(Deserialize)]
struct Request<'a> {
    #[serde(borrow)]
    ops: Cow<'a, str>,
    // Parsed, though an echo ignores them, so the baseline does the work khived does.
    #[expect(dead_code, reason = "parsed for a fair comparison")]
    #[serde(borrow, default)]
    presentation: Option<Cow<'a, str>>,
    #[expect(dead_code, reason = "parsed for a fair comparison")]
    #[serde(default)]
    presentation_per_op: Option<Vec<Option<String>>>,
    #[serde(borrow)]
    namespace: Cow<'a, str>,
    #[serde(borrow, default)]
    config_id: Cow<'a, str>,
}

#[derive(Serialize, Default)]
struct Response<'a> {
    ok: bool,
    result: Option<&'a str>,
    error: Option<String>,
    namespace_mismatch: bool,
    config_mismatch: bool,
    served_config_id: &'a str,
}

/// Serves `socket` with `threads` threads until the process is killed.
pub fn run(socket: &Path, threads: usize) -> io::Result<()> {
    let listener = bind(socket)?;
    eprintln!(
        "baseline: serving namespace {NAMESPACE:?} on {} with {threads} thread(s) (pid {})",
        socket.display(),
        std::process::id()
    );
    thread::scope(|scope| {
        for _ in 1..threads {
            scope.spawn(|| accept_loop(&listener));
        }
        accept_loop(&listener)
    })
}

/// Listens on `socket`, in place of a socket file an earlier run left there.
pub(crate) fn bind(socket: &Path) -> io::Result<UnixListener> {
    // A socket left by an earlier run would make bind fail with "address in use".
    match fs::remove_file(socket) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(io::Error::new(
                e.kind(),
                format!("cannot remove {}: {e}", socket.display()),
            ))
        }
        _ => {}
    }
    UnixListener::bind(socket)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot bind {}: {e}", socket.display())))
}

fn accept_loop(listener: &UnixListener) -> io::Result<()> {
    loop {
        match listener.accept() {
            Ok((stream, _)) => serve(stream),
            Err(e) => eprintln!("baseline: accept failed: {e}"),
        }
    }
}

/// Answers requests in order until the client closes (PROTOCOL.md); a frame that cannot be
/// trusted gets an error reply and ends the connection.
fn serve(mut stream: UnixStream) {
    let mut reader = FrameReader::default();
    let mut out = Vec::new();
    loop {
        out.clear();
        let keep_open = match reader.next(&mut stream) {
            Ok(Some(body)) => answer(body, &mut out),
            Ok(None) => return,
            Err(e) => {
                let error = match e.kind() {
                    io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof => e.to_string(),
                    _ => return,
                };
                refuse(&mut out, format!("bad request: {error}"));
                false
            }
        };
        if stream.write_all(&out).is_err() || !keep_open {
            return;
        }
    }
}

/// Encodes the answer to one frame into `out`; false if the connection must close.
pub(crate) fn answer(body: &[u8], out: &mut Vec<u8>) -> bool {
    let request: Request<'_> = match serde_json::from_slice(body) {
        Ok(request) => request,
        Err(e) => {
            encode(out, &failure(format!("bad request: {e}")));
            return false;
        }
    };
    let mut response = Response {
        served_config_id: CONFIG_ID,
        ..Response::default()
    };
    if request.namespace != NAMESPACE {
        response.namespace_mismatch = true;
    } else if request.config_id != CONFIG_ID {
        response.config_mismatch = true;
    } else {
        if let Some(work) = work::requested(&request.ops) {
            work::burn(work);
        }
        response.ok = true;
        response.result = Some(&request.ops);
    }
    encode(out, &response);
    true
}

fn failure(error: String) -> Response<'static> {
    Response {
        error: Some(error),
        served_config_id: CONFIG_ID,
        ..Response::default()
    }
}

/// Encodes an error reply to a frame that cannot be trusted into `out`.
pub(crate) fn refuse(out: &mut Vec<u8>, error: String) {
    encode(out, &failure(error));
}

fn encode(out: &mut Vec<u8>, response: &Response<'_>) {
    if let Err(e) = frame::encode_into(out, response) {
        // Only an echo above the frame cap gets here; its error reply always fits.
        let _ = frame::encode_into(out, &failure(format!("response too large: {e}")));
    }
}
