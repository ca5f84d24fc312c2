//! The baseline: the same protocol and an echo dispatcher on plain blocking threads.
//! A request whose `ops` asks for CPU work (`spin:<µs>:`, see `work.rs`) gets it done on the
//! thread that serves it, as a dispatcher computing inline would.
//!
//! A fixed pool of threads (the caller's included) each block in `accept` on the shared
//! listener and serve the connection they get until the client closes it. No async runtime,
//! no reactor: this is the simplest server that speaks the wire format, and the yardstick
//! for what a runtime's machinery costs.
//!
//! With `--epoll`, one thread serves every connection from an epoll loop instead: the
//! least an event loop does (no executor, no timers, no peer check), the yardstick for what
//! serving many connections from one thread costs against a thread for each.

use std::borrow::Cow;
use std::fs;
use std::io::{self, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::thread;

use rustix::buffer::spare_capacity;
use rustix::event::epoll;
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

fn bind(socket: &Path) -> io::Result<UnixListener> {
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

/// Serves `socket` from one thread's epoll loop until the process is killed: level-triggered,
/// each ready connection answered for every whole frame it has, then the next.
pub fn run_epoll(socket: &Path) -> io::Result<()> {
    const LISTENER: u64 = u64::MAX;
    let listener = bind(socket)?;
    listener.set_nonblocking(true)?;
    let poller = epoll::create(epoll::CreateFlags::CLOEXEC)?;
    epoll::add(
        &poller,
        &listener,
        epoll::EventData::new_u64(LISTENER),
        epoll::EventFlags::IN,
    )?;
    eprintln!(
        "baseline: serving namespace {NAMESPACE:?} on {} from one epoll thread (pid {})",
        socket.display(),
        std::process::id()
    );
    // Connection `i` is registered with key `i`; closed ones leave a slot to reuse.
    let mut connections: Vec<Option<Connection>> = Vec::new();
    let mut events = Vec::with_capacity(256);
    loop {
        events.clear();
        epoll::wait(&poller, spare_capacity(&mut events), None)?;
        for event in &events {
            let key = event.data.u64();
            if key == LISTENER {
                while let Ok((stream, _)) = listener.accept() {
                    stream.set_nonblocking(true)?;
                    let free = connections.iter().position(Option::is_none);
                    let slot = free.unwrap_or(connections.len());
                    let data = epoll::EventData::new_u64(slot as u64);
                    epoll::add(&poller, &stream, data, epoll::EventFlags::IN)?;
                    let connection = Some(Connection {
                        stream,
                        reader: FrameReader::default(),
                        out: Vec::new(),
                    });
                    match free {
                        Some(slot) => connections[slot] = connection,
                        None => connections.push(connection),
                    }
                }
                continue;
            }
            let slot = &mut connections[key as usize];
            if let Some(connection) = slot {
                if !connection.serve_ready() {
                    epoll::delete(&poller, &connection.stream)?;
                    *slot = None;
                }
            }
        }
    }
}

/// A connection of the epoll loop.
struct Connection {
    stream: UnixStream,
    reader: FrameReader,
    out: Vec<u8>,
}

impl Connection {
    /// Answers every whole frame that has arrived; false once the connection must close.
    fn serve_ready(&mut self) -> bool {
        loop {
            self.out.clear();
            let keep_open = match self.reader.next(&mut self.stream) {
                Ok(Some(body)) => answer(body, &mut self.out),
                Ok(None) => return false,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) => match e.kind() {
                    io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof => {
                        encode(&mut self.out, &failure(format!("bad request: {e}")));
                        false
                    }
                    _ => return false,
                },
            };
            if !self.write_out() || !keep_open {
                return false;
            }
        }
    }

    /// Writes the answer; a socket whose buffer is full is written blocking (a small echo's
    /// answer never fills it).
    fn write_out(&mut self) -> bool {
        match self.stream.write(&self.out) {
            Ok(n) if n == self.out.len() => true,
            Ok(n) => self.write_blocking(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.write_blocking(0),
            Err(_) => false,
        }
    }

    fn write_blocking(&mut self, written: usize) -> bool {
        let stream = &mut self.stream;
        stream.set_nonblocking(false).is_ok()
            && stream.write_all(&self.out[written..]).is_ok()
            && stream.set_nonblocking(true).is_ok()
    }
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
                encode(&mut out, &failure(format!("bad request: {error}")));
                false
            }
        };
        if stream.write_all(&out).is_err() || !keep_open {
            return;
        }
    }
}

/// Encodes the answer to one frame into `out`; false if the connection must close.
fn answer(body: &[u8], out: &mut Vec<u8>) -> bool {
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

fn encode(out: &mut Vec<u8>, response: &Response<'_>) {
    if let Err(e) = frame::encode_into(out, response) {
        // Only an echo above the frame cap gets here; its error reply always fits.
        let _ = frame::encode_into(out, &failure(format!("response too large: {e}")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange(stream: &mut UnixStream, body: &[u8]) -> io::Result<serde_json::Value> {
        let mut wire = (body.len() as u32).to_be_bytes().to_vec();
        wire.extend_from_slice(body);
        stream.write_all(&wire)?;
        let mut reader = FrameReader::default();
        let answer = reader.next(stream)?.expect("an answer");
        Ok(serde_json::from_slice(answer)?)
    }

    /// The epoll loop answers clients whose requests interleave, a pipelined pair in
    /// order, and a frame that is no request with an error and a close.
    #[test]
    fn the_epoll_loop_answers_every_client_in_turn() -> io::Result<()> {
        let dir = std::env::temp_dir().join(format!("khived-bench-epoll-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        let socket = dir.join("s.sock");
        let serving = socket.clone();
        thread::spawn(move || run_epoll(&serving));
        let connect = || loop {
            match UnixStream::connect(&socket) {
                Ok(stream) => return stream,
                Err(_) => thread::sleep(std::time::Duration::from_millis(10)),
            }
        };
        let request = |ops: &str| format!(r#"{{"ops":"{ops}","namespace":"echo","config_id":""}}"#);
        let (mut a, mut b) = (connect(), connect());
        for round in 0..3 {
            for (stream, name) in [(&mut a, "a"), (&mut b, "b")] {
                let ops = format!("{name}{round}");
                let answer = exchange(stream, request(&ops).as_bytes())?;
                assert_eq!(answer["ok"], true, "{answer}");
                assert_eq!(answer["result"], ops.as_str());
            }
        }
        let mut two = Vec::new();
        for ops in ["x", "y"] {
            let body = request(ops);
            two.extend_from_slice(&(body.len() as u32).to_be_bytes());
            two.extend_from_slice(body.as_bytes());
        }
        a.write_all(&two)?;
        let mut reader = FrameReader::default();
        for ops in ["x", "y"] {
            let answer: serde_json::Value = serde_json::from_slice(reader.next(&mut a)?.unwrap())?;
            assert_eq!(answer["result"], ops);
        }
        let answer = exchange(&mut b, b"not json")?;
        assert_eq!(answer["ok"], false, "{answer}");
        assert!(
            FrameReader::default().next(&mut b)?.is_none(),
            "closed after the error"
        );
        fs::remove_dir_all(&dir)
    }
}
