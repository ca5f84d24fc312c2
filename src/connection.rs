//! One connection from accept to close: read a frame, decide, dispatch, write the answer,
//! and again for the next request on the same connection.
//!
//! The socket is registered with the reactor only when a write would block, or a read would
//! still block after a few retries (see `PATIENCE`): a fresh connection usually has its
//! request waiting already, and a registration costs three `epoll_ctl` calls.
//!
//! Buffers above 64 KiB, for a large request or response, are paid for from the daemon's
//! frame memory budget before they are allocated (see `budget`), and released as soon as
//! the frame is answered or written.

use std::any::Any;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_io::{Async, Timer};
use futures_lite::future::{self, FutureExt};

use crate::budget::{charged, Held, Purpose};
use crate::cancel::{self, Bounded, Cut};
use crate::config::Config;
use crate::dispatch::Dispatch;
use crate::inflight::Flag;
use crate::shared::Shared;
use crate::sys;
use crate::wire::Disposition::{self, NotCommitted};
use crate::wire::{
    code, encode_frame_into, encode_frame_within, ErrorDetail, FrameDecoder, ProbeInfo, Request,
    Response, Within, MAX_FRAME_BYTES, PROTOCOL_VERSION, READ_CHUNK,
};

/// How many times a read that would block is retried, letting the other connections run in
/// between, before the socket is registered with the reactor. A client's next request (or
/// its close) usually arrives within microseconds; waiting for it through epoll costs
/// `epoll_ctl` calls and a sleep and wake-up of the thread.
///
/// Except after a connection's first answer while no other connection runs (none read while
/// it let them): then the socket is registered at once. Such a client most often closes
/// next, and it does so in its own time: every look until then is a failed `read`, and
/// while the thread looks it does not accept the next connection. A client that has sent a
/// second request is likely to send a third soon, and is given the retries.
const PATIENCE: u32 = 8;

/// Serves one connection until the client closes it, a deadline passes, or the daemon drains.
pub(crate) async fn serve<D: Dispatch>(shared: &Shared<D>, stream: UnixStream) {
    let mut conn = Connection::new(stream, Held::new(&shared.frame_memory), &shared.reads);
    let config = &shared.config;
    let mut deadline = after(config.first_request_timeout);
    // A client that has connected but not yet sent its first request is owed an answer, so
    // draining waits for it; between requests a connection is idle and is closed at once.
    let mut idle_stop = None;
    loop {
        match conn
            .read_frame(deadline, idle_stop, config.first_request_timeout)
            .await
        {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                if let Some(error) = closing_reply(e, idle_stop.is_none(), config) {
                    conn.reply_and_close(shared, error);
                }
                return;
            }
        };
        // Past the first request, a draining daemon starts nothing new: frames that are here
        // already are answered `daemon_draining` (PROTOCOL.md, "Pipelining"). After a
        // handover they are served: the client's next connection reaches the successor.
        let draining =
            idle_stop.is_some() && shared.draining.is_set() && !shared.handed_over.is_set();
        let (body, io) = conn.request();
        let Some((response, keep_open)) = answer(shared, body, draining, io).await else {
            // The client hung up while its request waited or ran: it was cancelled.
            return;
        };
        conn.frames.consume();
        let write_deadline = after(config.write_timeout);
        conn.encode(&response, write_deadline).await;
        // The response may hold a large result: not kept while a slow client reads, and its
        // pages go back to the system (see `pages`).
        if let Some(result) = response.result {
            crate::pages::release(result.into_bytes());
        }
        if let Err(e) = conn.write_out(write_deadline).await {
            log::debug!("connection write failed: {e}");
            return;
        }
        shared.served.fetch_add(1, Ordering::Relaxed);
        conn.answered += 1;
        if !keep_open {
            return;
        }
        // While draining, look only at what has arrived: a deadline of now ends the read as
        // soon as it would have to wait.
        deadline = match shared.draining.is_set() {
            true => Some(Instant::now()),
            false => after(config.idle_connection_timeout),
        };
        idle_stop = Some(&shared.draining);
        // Let other connections run before looking for this client's next request.
        future::yield_now().await;
    }
}

/// What a client whose frame could not be read is told before its connection closes; `None`
/// closes it without a word (the client is gone, or idle between requests).
fn closing_reply(error: ReadError, first_request: bool, config: &Config) -> Option<ErrorDetail> {
    let bad = |message: String| ErrorDetail::new(code::BAD_REQUEST, message, NotCommitted);
    match error {
        ReadError::TooLarge(e) => Some(ErrorDetail::new(
            code::FRAME_TOO_LARGE,
            e.to_string(),
            NotCommitted,
        )),
        ReadError::Truncated(e) => Some(bad(format!("bad request: {e}"))),
        // Nothing of the request was started: the client may send it again.
        ReadError::NoMemory(message) => {
            Some(ErrorDetail::new(code::DAEMON_BUSY, message, NotCommitted))
        }
        ReadError::TimedOut if first_request => Some(bad(format!(
            "bad request: no complete request within {:?}",
            config.first_request_timeout
        ))),
        ReadError::TimedOut => None,
        ReadError::Stalled(held) => Some(bad(format!(
            "bad request: a large frame did not arrive whole within {:?} of the daemon setting \
             {held} bytes of memory aside for it; send it whole",
            config.first_request_timeout
        ))),
        ReadError::Io(e) => {
            log::debug!("connection read failed: {e}");
            None
        }
    }
}

/// What a client is told when its frame could not get budget before its deadline.
fn no_memory(what: &str, bytes: usize, budget: usize) -> String {
    format!(
        "daemon_busy: no memory for a {what} of {bytes} bytes in time: the frame memory budget \
         ({budget} bytes) is in use by other connections; try again shortly"
    )
}

/// The moment `timeout` from now; `None` (no deadline) when that is beyond what `Instant`
/// can hold, as for `Duration::MAX`.
pub(crate) fn after(timeout: Duration) -> Option<Instant> {
    Instant::now().checked_add(timeout)
}

/// Decides what to answer to one frame body (PROTOCOL.md, "One request, in order"); the
/// flag says whether the stream can still be trusted for another request. `draining`: the
/// daemon is stopping and this is not the connection's first request, so it is refused
/// rather than started. `None`: the client hung up while its request waited for a thread or
/// was dispatched, and the dispatch was cancelled.
async fn answer<D: Dispatch>(
    shared: &Shared<D>,
    body: &[u8],
    draining: bool,
    io: &Io,
) -> Option<(Response, bool)> {
    // The clock is read only when the line will be written: the fast path pays one check.
    let Some(started) = log::log_enabled!(log::Level::Debug).then(Instant::now) else {
        return decide(shared, body, draining, io).await;
    };
    let answered = decide(shared, body, draining, io).await;
    log::debug!(
        "request: {} bytes, namespace {}, {} in {:?}",
        body.len(),
        namespace_of(body),
        answered
            .as_ref()
            .map_or("cancelled: the client hung up", |(response, _)| {
                outcome(response)
            }),
        started.elapsed()
    );
    answered
}

/// What the debug line says of a request's outcome: `ok`, a mismatch, or the error's code.
fn outcome(response: &Response) -> &str {
    if response.ok {
        "ok"
    } else if response.namespace_mismatch {
        "namespace_mismatch"
    } else if response.config_mismatch {
        "config_mismatch"
    } else {
        response.error_code().unwrap_or("error")
    }
}

/// The namespace a frame names, quoted, for the debug line; `-` when it is not a request.
/// Decoded as a whole [`Request`] again, whose decoder the binary has anyway, rather than
/// through a decoder of its own for this one field.
fn namespace_of(body: &[u8]) -> String {
    match serde_json::from_slice::<Request<'_>>(body) {
        Ok(named) => format!("{:?}", named.namespace),
        Err(_) => "-".to_owned(),
    }
}

/// The decision itself, without the debug line: see [`answer`].
async fn decide<D: Dispatch>(
    shared: &Shared<D>,
    body: &[u8],
    draining: bool,
    io: &Io,
) -> Option<(Response, bool)> {
    let dispatcher = &shared.dispatcher;
    let config_id = dispatcher.config_id();
    let request: Request<'_> = match serde_json::from_slice(body) {
        Ok(request) => request,
        Err(e) => {
            let detail = ErrorDetail::new(code::BAD_REQUEST, bad_request(&e), NotCommitted);
            let mut response = Response::error(detail, config_id);
            response.request_id = request_id_of(body);
            return Some((response, false));
        }
    };
    let mut response = Response::served(config_id);
    if request.protocol_version > PROTOCOL_VERSION {
        // The must-understand rule: never run a request under semantics we do not have.
        response = refusal(
            code::VERSION_MISMATCH,
            format!(
                "version mismatch: the request speaks protocol version {}, this daemon {}",
                request.protocol_version, PROTOCOL_VERSION
            ),
            config_id,
        );
        response.version_mismatch = true;
    } else if draining {
        response = refusal(
            code::DAEMON_DRAINING,
            "daemon_draining: the daemon is shutting down and did not start this request; \
             try again"
                .to_owned(),
            config_id,
        );
    } else if request.probe {
        response.ok = true;
        response.result = Some(probe_text(shared));
    } else if request.namespace != dispatcher.namespace() {
        response.namespace_mismatch = true;
    } else if request.config_id != config_id {
        response.config_mismatch = true;
    } else if request.probe_only {
        response.ok = true;
    } else {
        response = dispatch(shared, &request, io).await?;
    }
    response.request_id = request.request_id;
    Some((response, true))
}

/// Runs the dispatcher on `request`, on the daemon's compute slots and within the request's
/// deadline, and turns its outcome, a panic or a timeout included, into the response; `None`
/// if its client hung up first (see [`cancel::bounded`]). The one place the dispatcher is
/// called.
async fn dispatch<D: Dispatch>(
    shared: &Shared<D>,
    request: &Request<'_>,
    io: &Io,
) -> Option<Response> {
    let config_id = shared.dispatcher.config_id();
    let dispatch = AssertUnwindSafe(shared.dispatcher.dispatch(request)).catch_unwind();
    let gone = || io.stream().is_ok_and(cancel::peer_gone);
    let cut = Cut {
        gone: &gone,
        hung_up: hung_up(io),
    };
    let dispatched = match cancel::bounded(&shared.execution, &shared.config, dispatch, cut).await {
        Bounded::Done(dispatched) => dispatched,
        Bounded::TimedOut(limit) => {
            let detail = ErrorDetail::new(
                code::REQUEST_TIMED_OUT,
                format!("request timed out after {limit:?}"),
                Disposition::Unknown,
            );
            return Some(Response::error(detail, config_id));
        }
        Bounded::HungUp => return None,
    };
    Some(match dispatched {
        Ok(Ok(result)) => Response::ok(result, config_id),
        Ok(Err(error)) => Response::error(error.into(), config_id),
        Err(panic) => {
            let message = panic_message(&*panic);
            log::error!("dispatcher panicked: {message}");
            let detail = ErrorDetail::new(
                code::DISPATCHER_PANICKED,
                format!("dispatcher panicked: {message}"),
                Disposition::Unknown,
            );
            Response::error(detail, config_id)
        }
    })
}

/// Completes when the client has gone (see [`cancel::watch_hang_up`]). A socket not registered
/// with the reactor yet is registered for the time of the watch only, so that a request whose
/// dispatch waits costs the connection nothing afterwards.
async fn hung_up(io: &Io) {
    let plain = match io {
        Io::Plain(stream) => Async::new_nonblocking(stream).ok(),
        _ => None,
    };
    // Never ready, so never done, when the socket could not be registered. One call of the
    // watch for both kinds of socket, so that its loop is compiled in once.
    let readable = |cx: &mut Context<'_>| match (io, &plain) {
        (Io::Registered(registered), _) => registered.poll_readable(cx),
        (_, Some(registered)) => registered.poll_readable(cx),
        _ => Poll::Pending,
    };
    match io.stream() {
        Ok(stream) => cancel::watch_hang_up(stream.as_fd(), &readable).await,
        Err(_) => future::pending().await,
    }
}

/// An error response for a request that was not started.
fn refusal(code: &str, message: String, config_id: &str) -> Response {
    Response::error(ErrorDetail::new(code, message, NotCommitted), config_id)
}

/// The most of a decoding error quoted back to the client. serde_json's messages quote the
/// value they name whole (`invalid type: string "…"`), and a value may be megabytes: quoted
/// whole, in `error` and `error_detail` both, it made an answer over the frame limit.
const QUOTED: usize = 200;

/// `bad request: …` for a body that did not decode: the error's first [`QUOTED`] bytes, and
/// where in the body it is when the rest was cut.
fn bad_request(e: &serde_json::Error) -> String {
    use std::fmt::Write as _;
    const PREFIX: &str = "bad request: ";
    // Room for the place too (" at line L column C"), which ends serde_json's message: a
    // message longer than that is cut before its place, which is then given whole.
    let mut capped = Capped {
        text: PREFIX.to_owned(),
        room: QUOTED + 40,
    };
    if write!(capped, "{e}").is_err() {
        let mut end = PREFIX.len() + QUOTED;
        while !capped.text.is_char_boundary(end) {
            end -= 1;
        }
        capped.text.truncate(end);
        let (line, column) = (e.line(), e.column());
        let _ = write!(capped.text, "… [cut] at line {line} column {column}");
    }
    capped.text
}

/// Text that takes `room` bytes more, the rest of a write cut at a character, and then fails
/// the write, which ends the formatting.
struct Capped {
    text: String,
    room: usize,
}

impl std::fmt::Write for Capped {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        if s.len() <= self.room {
            self.text.push_str(s);
            self.room -= s.len();
            return Ok(());
        }
        let mut end = self.room;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.text.push_str(&s[..end]);
        self.room = 0;
        Err(std::fmt::Error)
    }
}

/// The `request_id` of a frame that is not a valid request, if it is a JSON object with one
/// valid `request_id`: the error reply then still names the request it answers. Costs a
/// second parse of a frame that failed, within serde_json's depth limit, and keeps nothing
/// but the number.
fn request_id_of(body: &[u8]) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Id {
        #[serde(default)]
        request_id: Option<u64>,
    }
    // A derived struct also accepts a JSON array; only an object names its fields.
    if !body.trim_ascii_start().starts_with(b"{") {
        return None;
    }
    serde_json::from_slice::<Id>(body).ok()?.request_id
}

fn probe_text<D: Dispatch>(shared: &Shared<D>) -> String {
    let info = ProbeInfo {
        pid: std::process::id(),
        namespace: shared.dispatcher.namespace().to_owned(),
        config_id: shared.dispatcher.config_id().to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime_ms: shared.started.elapsed().as_millis() as u64,
        // Not counting the connection this probe came on.
        in_flight: shared.in_flight.get().saturating_sub(1) as u64,
        served: shared.served.load(Ordering::Relaxed),
        waiting: shared.execution.waiting() as u64,
        threads: shared.execution.running() as u64,
    };
    serde_json::to_string(&info).unwrap_or_default()
}

fn panic_message(panic: &(dyn Any + Send)) -> &str {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s
    } else {
        "(a panic that is not a string)"
    }
}

enum ReadError {
    /// The header announced more than the cap; the body was not read.
    TooLarge(io::Error),
    /// The client closed its side inside a frame.
    Truncated(io::Error),
    TimedOut,
    /// A frame that holds room in the budget (this many bytes) did not come whole in time.
    Stalled(usize),
    /// The frame memory budget had no room for the frame in time; what to tell the client.
    NoMemory(String),
    Io(io::Error),
}

enum Wake {
    Ready,
    TimedOut,
    Stopped,
}

/// The socket, registered with the reactor only once something had to wait.
enum Io {
    Plain(UnixStream),
    Registered(Async<UnixStream>),
    /// Registration failed and took the socket with it.
    Closed,
}

impl Io {
    fn stream(&self) -> io::Result<&UnixStream> {
        match self {
            Io::Plain(stream) => Ok(stream),
            Io::Registered(registered) => Ok(registered.get_ref()),
            Io::Closed => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    fn registered(&mut self) -> io::Result<&Async<UnixStream>> {
        if let Io::Plain(_) = self {
            if let Io::Plain(stream) = std::mem::replace(self, Io::Closed) {
                *self = Io::Registered(Async::new_nonblocking(stream)?);
            }
        }
        match self {
            Io::Registered(registered) => Ok(registered),
            _ => Err(io::ErrorKind::NotConnected.into()),
        }
    }
}

struct Connection<'a> {
    io: Io,
    /// The bytes read and not yet answered, reused from request to request.
    frames: FrameDecoder,
    /// The encoded response, written in one piece.
    out: Vec<u8>,
    /// What `frames` and `out` are charged from the frame memory budget.
    held: Held<'a>,
    /// The daemon's count of reads tried: whether other connections ran while this one
    /// let them.
    reads: &'a AtomicU64,
    /// Requests answered on this connection.
    answered: u64,
}

impl<'a> Connection<'a> {
    /// The frame `read_frame` has just buffered, and the socket it came on.
    fn request(&self) -> (&[u8], &Io) {
        let body = self.frames.decode().ok().flatten().unwrap_or_default();
        (body, &self.io)
    }

    fn new(stream: UnixStream, held: Held<'a>, reads: &'a AtomicU64) -> Self {
        Connection {
            io: Io::Plain(stream),
            frames: FrameDecoder::new(),
            out: Vec::new(),
            held,
            reads,
            answered: 0,
        }
    }

    /// What the buffers as they are now cost from the budget.
    fn charged(&self) -> usize {
        charged(self.frames.capacity()) + charged(self.out.capacity())
    }

    /// Reads until a whole frame is buffered (`Ok(true)`; it stays buffered until
    /// `frames.consume()`, and [`request`](Self::request) gives its body). `Ok(false)` is a
    /// clean end: the client closed between frames, or `idle_stop` was set while the next
    /// frame had not all arrived (a part of it is dropped with the connection, PROTOCOL.md,
    /// "Pipelining").
    async fn read_frame(
        &mut self,
        deadline: Option<Instant>,
        idle_stop: Option<&Flag>,
        stall: Duration,
    ) -> Result<bool, ReadError> {
        let mut patience = PATIENCE;
        // When a frame that holds room in the budget must have come whole: `stall` after its
        // header, so that a client stalling in it cannot hold the memory until `deadline`.
        let mut whole_by = None;
        // Whether the socket was read once more after `idle_stop` was seen set.
        let mut looked_again = false;
        loop {
            match self.frames.decode() {
                Ok(Some(_)) => return Ok(true),
                Ok(None) => {}
                Err(e) => return Err(ReadError::TooLarge(e)),
            }
            // A large frame is paid for in full before its buffer grows: a connection that
            // got part of it could otherwise wait for the rest while holding what it got.
            let frame_capacity = self.frames.capacity_for_frame();
            let needed = charged(frame_capacity) + charged(self.out.capacity());
            if needed > self.held.bytes()
                && !self.held.resize(needed, Purpose::Request, deadline).await
            {
                let budget = self.held.budget();
                return Err(ReadError::NoMemory(no_memory(
                    "request",
                    frame_capacity,
                    budget,
                )));
            }
            if charged(frame_capacity) > 0 {
                self.frames.reserve_frame();
                whole_by = whole_by.or_else(|| after(stall));
            }
            self.reads.fetch_add(1, Ordering::Relaxed);
            let read = match self.io.stream() {
                Ok(stream) => self.frames.read_from(stream),
                Err(e) => Err(e),
            };
            match read {
                Ok(0) => {
                    return match self.frames.finish() {
                        Ok(()) => Ok(false),
                        Err(e) => Err(ReadError::Truncated(e)),
                    }
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if patience > 0 {
                        patience -= 1;
                        // Ours was the last read: another one shows that others ran.
                        let ours = self.reads.load(Ordering::Relaxed);
                        future::yield_now().await;
                        if self.answered != 1 || self.reads.load(Ordering::Relaxed) != ours {
                            continue;
                        }
                    }
                    // A part of a frame, too, is no request in hand: left to wait for its
                    // rest, it would hold the drain until the idle deadline.
                    let until = match (deadline, whole_by) {
                        (Some(deadline), Some(by)) => Some(deadline.min(by)),
                        (deadline, by) => deadline.or(by),
                    };
                    match self.wait(true, until, idle_stop).await {
                        Ok(Wake::Ready) => {}
                        // Bytes may have arrived that the reactor has not reported yet: a
                        // request sent just as the drain began is read, and answered, rather
                        // than closed on unread.
                        Ok(Wake::Stopped) if !looked_again => {
                            looked_again = true;
                            patience = 0;
                        }
                        Ok(Wake::Stopped) => return Ok(false),
                        Ok(Wake::TimedOut) if until != deadline => {
                            return Err(ReadError::Stalled(frame_capacity))
                        }
                        Ok(Wake::TimedOut) => return Err(ReadError::TimedOut),
                        Err(e) => return Err(ReadError::Io(e)),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
    }

    /// Encodes `response` into `out`. A response above 64 KiB is paid for from the budget
    /// first, waiting until `deadline`; one above the cap, or one the budget has no room for
    /// in time, is replaced with an error.
    async fn encode(&mut self, response: &Response, deadline: Option<Instant>) {
        self.out.clear();
        let error = match encode_frame_within(&mut self.out, response, READ_CHUNK) {
            Ok(Within::Fits) => None,
            Ok(Within::TooLarge(len)) if len > MAX_FRAME_BYTES => Some(format!(
                "response too large: {len} bytes (limit {MAX_FRAME_BYTES})"
            )),
            Ok(Within::TooLarge(len)) => {
                let needed = charged(self.frames.capacity()) + charged(4 + len);
                if self.held.resize(needed, Purpose::Response, deadline).await {
                    self.out = Vec::with_capacity(4 + len);
                    encode_frame_into(&mut self.out, response, "response")
                        .err()
                        .map(|e| e.to_string())
                } else {
                    // Not `daemon_busy`: the request has run, so it must not look retryable.
                    let why = no_memory("response", 4 + len, self.held.budget());
                    Some(format!("response too large for the memory free now: {why}"))
                }
            }
            Err(e) => Some(e.to_string()),
        };
        if let Some(error) = error {
            let served = response.served_config_id.as_deref().unwrap_or_default();
            // The dispatcher ran; only its answer is lost.
            let detail = ErrorDetail::new(code::RESPONSE_TOO_LARGE, error, Disposition::Unknown);
            let mut error = Response::error(detail, served);
            error.request_id = response.request_id;
            self.encode_error(&error);
        }
        // What was held for the request and is not needed for the response goes back.
        self.held.shrink_to(self.charged());
    }

    /// Encodes a short error response into `out`, which it always fits.
    fn encode_error(&mut self, error: &Response) {
        self.out.clear();
        if self.out.capacity() > READ_CHUNK {
            crate::pages::release(std::mem::take(&mut self.out));
        }
        let _ = encode_frame_into(&mut self.out, error, "response");
    }

    /// Writes `out` completely, waiting for the socket to drain until `deadline`.
    async fn write_out(&mut self, deadline: Option<Instant>) -> io::Result<()> {
        let mut written = 0;
        while written < self.out.len() {
            let sent = sys::send(self.io.stream()?, &self.out[written..]);
            match sent {
                Ok(n) => written += n,
                Err(rustix::io::Errno::AGAIN) => match self.wait(false, deadline, None).await? {
                    Wake::Ready | Wake::Stopped => {}
                    Wake::TimedOut => {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "client did not read its response in time",
                        ))
                    }
                },
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        // A large response's buffer, and its budget, go back at once rather than when the
        // client's next request comes.
        if self.out.capacity() > READ_CHUNK {
            crate::pages::release(std::mem::take(&mut self.out));
            self.held.shrink_to(self.charged());
        }
        Ok(())
    }

    /// Sends a last error frame if the socket takes it without waiting, then closes. The
    /// client is misbehaving or gone; it does not get to hold the connection any longer.
    fn reply_and_close<D: Dispatch>(mut self, shared: &Shared<D>, error: ErrorDetail) {
        log::debug!("closing a connection: {}", error.message);
        self.encode_error(&Response::error(error, shared.dispatcher.config_id()));
        if let Ok(stream) = self.io.stream() {
            let _ = sys::send(stream, &self.out);
        }
    }

    /// Waits until the socket is readable (or writable), the deadline passes, or `stop` is set.
    async fn wait(
        &mut self,
        readable: bool,
        deadline: Option<Instant>,
        stop: Option<&Flag>,
    ) -> io::Result<Wake> {
        let io = self.io.registered()?;
        let ready = async {
            if readable {
                io.readable().await?;
            } else {
                io.writable().await?;
            }
            Ok(Wake::Ready)
        };
        let stopped = async {
            match stop {
                Some(flag) => flag.wait().await,
                None => future::pending().await,
            }
            Ok(Wake::Stopped)
        };
        let timed_out = async {
            deadline.map_or_else(Timer::never, Timer::at).await;
            Ok(Wake::TimedOut)
        };
        ready.or(stopped).or(timed_out).await
    }
}

/// A connection cut off with a large response unwritten gives its pages back too (`frames`
/// does so itself, and `held` gives back the budget).
impl Drop for Connection<'_> {
    fn drop(&mut self) {
        crate::pages::release(std::mem::take(&mut self.out));
    }
}

#[cfg(test)]
mod tests {
    use super::{bad_request, QUOTED};

    /// However long the value an error names, the message keeps its first bytes and ends with
    /// where the error is, given once and whole.
    #[test]
    fn a_bad_request_message_is_cut_before_the_place_it_names() {
        for len in 0..400 {
            let body = format!("\"{}\"", "a".repeat(len));
            let e = serde_json::from_str::<bool>(&body).unwrap_err();
            let message = bad_request(&e);
            let place = format!(" at line 1 column {}", len + 2);
            assert!(message.ends_with(&place), "{len}: {message}");
            assert_eq!(message.matches(" at line ").count(), 1, "{len}: {message}");
            assert!(
                message.len() <= "bad request: ".len() + QUOTED + 40,
                "{len}"
            );
            match message.contains("[cut]") {
                true => assert!(message.ends_with(&format!("… [cut]{place}")), "{message}"),
                false => assert_eq!(message, format!("bad request: {e}")),
            }
        }
    }
}
