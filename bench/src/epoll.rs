//! The baseline's `--epoll` form (Linux): one thread serves every connection from an epoll
//! loop, answering as `baseline.rs` does. The least an event loop does (no executor, no
//! timers, no peer check): the yardstick for what serving many connections from one thread
//! costs against a thread for each. With `--pinned`, one such loop per core instead, each
//! pinned to its core and accepting its own connections: the least an event loop on every
//! core costs.

use std::io::{self, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use rustix::buffer::spare_capacity;
use rustix::event::epoll;

use crate::baseline::{answer, bind, refuse};
use crate::frame::FrameReader;

/// Serves `socket` from one thread's epoll loop until the process is killed: level-triggered,
/// each ready connection answered for every whole frame it has, then the next. `pinned`:
/// one loop per core, each pinned to it, sharing the listener (`EPOLLEXCLUSIVE`, so that a
/// newcomer wakes one loop, which keeps the connection).
pub fn run(socket: &Path, pinned: bool) -> io::Result<()> {
    let listener = bind(socket)?;
    listener.set_nonblocking(true)?;
    let loops = match pinned {
        true => std::thread::available_parallelism().map_or(1, usize::from),
        false => 1,
    };
    eprintln!(
        "baseline: serving namespace \"echo\" on {} from {loops} epoll thread(s) (pid {})",
        socket.display(),
        std::process::id()
    );
    let listener = std::sync::Arc::new(listener);
    for core in 1..loops {
        let listener = std::sync::Arc::clone(&listener);
        std::thread::spawn(move || serve(&listener, Some(core)));
    }
    serve(&listener, pinned.then_some(0))
}

/// One epoll loop, on `core` if given.
fn serve(listener: &UnixListener, core: Option<usize>) -> io::Result<()> {
    const LISTENER: u64 = u64::MAX;
    let mut flags = epoll::EventFlags::IN;
    if let Some(core) = core {
        let mut cores = rustix::thread::CpuSet::new();
        cores.set(core);
        rustix::thread::sched_setaffinity(None, &cores)?;
        flags |= epoll::EventFlags::EXCLUSIVE;
    }
    let poller = epoll::create(epoll::CreateFlags::CLOEXEC)?;
    epoll::add(
        &poller,
        listener,
        epoll::EventData::new_u64(LISTENER),
        flags,
    )?;
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
                        refuse(&mut self.out, format!("bad request: {e}"));
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
        std::fs::create_dir_all(&dir)?;
        let socket = dir.join("s.sock");
        let serving = socket.clone();
        std::thread::spawn(move || run(&serving, false));
        let connect = || loop {
            match UnixStream::connect(&socket) {
                Ok(stream) => return stream,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
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
        std::fs::remove_dir_all(&dir)
    }
}
