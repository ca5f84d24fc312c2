//! One connection from accept to close: read a frame, decide, dispatch, write the answer,
//! and again for the next request on the same connection.
//!
//! The socket is registered with the reactor only when a write would block, or a read would
//! still block after a few retries (see `PATIENCE`): a fresh connection usually has its
//! request waiting already, and a registration costs three `epoll_ctl` calls.

use std::any::Any;
use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use async_io::{Async, Timer};
use futures_lite::future::{self, FutureExt};

use crate::config::Config;
use crate::dispatch::Dispatch;
use crate::inflight::Flag;
use crate::shared::Shared;
use crate::sys;
use crate::wire::Disposition::{self, NotCommitted};
use crate::wire::{
    code, encode_frame_into, ErrorDetail, FrameDecoder, ProbeInfo, Request, Response,
    PROTOCOL_VERSION, READ_CHUNK,
};

/// How many times a read that would block is retried, letting the other connections run in
/// between, before the socket is registered with the reactor. A client's next request (or
/// its close) usually arrives within microseconds; waiting for it through epoll costs
/// `epoll_ctl` calls and a sleep and wake-up of the thread when nothing else is runnable.
const PATIENCE: u32 = 8;

/// Serves one connection until the client closes it, a deadline passes, or the daemon drains.
pub(crate) async fn serve<D: Dispatch>(shared: &Shared<D>, stream: UnixStream) {
    let mut conn = Connection::new(stream);
    let config = &shared.config;
    let mut deadline = after(config.first_request_timeout);
    // A client that has connected but not yet sent its first request is owed an answer, so
    // draining waits for it; between requests a connection is idle and is closed at once.
    let mut idle_stop = None;
    loop {
        let body = match conn.read_frame(deadline, idle_stop).await {
            Ok(Some(body)) => body,
            Ok(None) => return,
            Err(e) => {
                if let Some(error) = closing_reply(e, idle_stop.is_none(), config) {
                    conn.reply_and_close(shared, error);
                }
                return;
            }
        };
        // Past the first request, a draining daemon starts nothing new: frames that are here
        // already are answered `daemon_draining` (PROTOCOL.md, "Pipelining").
        let draining = idle_stop.is_some() && shared.draining.is_set();
        let (response, keep_open) = answer(shared, body, draining).await;
        conn.frames.consume();
        conn.encode(&response);
        if let Err(e) = conn.write_out(after(config.write_timeout)).await {
            log::debug!("connection write failed: {e}");
            return;
        }
        shared
            .served
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
        ReadError::TimedOut if first_request => Some(bad(format!(
            "bad request: no complete request within {:?}",
            config.first_request_timeout
        ))),
        ReadError::TimedOut => None,
        ReadError::Io(e) => {
            log::debug!("connection read failed: {e}");
            None
        }
    }
}

/// The moment `timeout` from now; `None` (no deadline) when that is beyond what `Instant`
/// can hold, as for `Duration::MAX`.
fn after(timeout: Duration) -> Option<Instant> {
    Instant::now().checked_add(timeout)
}

/// Decides what to answer to one frame body (PROTOCOL.md, "One request, in order"); the
/// flag says whether the stream can still be trusted for another request. `draining`: the
/// daemon is stopping and this is not the connection's first request, so it is refused
/// rather than started.
async fn answer<D: Dispatch>(shared: &Shared<D>, body: &[u8], draining: bool) -> (Response, bool) {
    // The clock is read only when the line will be written: the fast path pays one check.
    let Some(started) = log::log_enabled!(log::Level::Debug).then(Instant::now) else {
        return decide(shared, body, draining).await;
    };
    let (response, keep_open) = decide(shared, body, draining).await;
    log::debug!(
        "request: {} bytes, namespace {}, {} in {:?}",
        body.len(),
        namespace_of(body),
        outcome(&response),
        started.elapsed()
    );
    (response, keep_open)
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
fn namespace_of(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Namespace<'a> {
        #[serde(borrow)]
        namespace: std::borrow::Cow<'a, str>,
    }
    match serde_json::from_slice::<Namespace<'_>>(body) {
        Ok(named) => format!("{:?}", named.namespace),
        Err(_) => "-".to_owned(),
    }
}

/// The decision itself, without the debug line: see [`answer`].
async fn decide<D: Dispatch>(shared: &Shared<D>, body: &[u8], draining: bool) -> (Response, bool) {
    let dispatcher = &shared.dispatcher;
    let config_id = dispatcher.config_id();
    let request: Request<'_> = match serde_json::from_slice(body) {
        Ok(request) => request,
        Err(e) => {
            let detail =
                ErrorDetail::new(code::BAD_REQUEST, format!("bad request: {e}"), NotCommitted);
            let mut response = Response::error(detail, config_id);
            response.request_id = request_id_of(body);
            return (response, false);
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
        response = dispatch(shared, &request).await;
    }
    response.request_id = request.request_id;
    (response, true)
}

/// Runs the dispatcher on `request` and turns its outcome, a panic included, into the
/// response. The one place the dispatcher is called.
async fn dispatch<D: Dispatch>(shared: &Shared<D>, request: &Request<'_>) -> Response {
    let config_id = shared.dispatcher.config_id();
    let dispatched = AssertUnwindSafe(shared.dispatcher.dispatch(request))
        .catch_unwind()
        .await;
    match dispatched {
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
    }
}

/// An error response for a request that was not started.
fn refusal(code: &str, message: String, config_id: &str) -> Response {
    Response::error(ErrorDetail::new(code, message, NotCommitted), config_id)
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
        served: shared.served.load(std::sync::atomic::Ordering::Relaxed),
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

struct Connection {
    io: Io,
    /// The bytes read and not yet answered, reused from request to request.
    frames: FrameDecoder,
    /// The encoded response, written in one piece.
    out: Vec<u8>,
}

impl Connection {
    fn new(stream: UnixStream) -> Self {
        Connection {
            io: Io::Plain(stream),
            frames: FrameDecoder::new(),
            out: Vec::new(),
        }
    }

    /// Reads until a whole frame is buffered and returns its body, which stays buffered until
    /// `frames.consume()`. `Ok(None)` is a clean end: the client closed between frames, or
    /// `idle_stop` was set while no byte of a next frame had arrived.
    async fn read_frame(
        &mut self,
        deadline: Option<Instant>,
        idle_stop: Option<&Flag>,
    ) -> Result<Option<&[u8]>, ReadError> {
        let mut patience = PATIENCE;
        loop {
            // A whole frame ends the loop and its body is taken after it: a borrow returned
            // from inside the loop would keep `frames` borrowed for the reads below.
            match self.frames.decode() {
                Ok(Some(_)) => break,
                Ok(None) => {}
                Err(e) => return Err(ReadError::TooLarge(e)),
            }
            let buffered = self.frames.buffered();
            let read = match self.io.stream() {
                Ok(mut stream) => stream.read(self.frames.read_buf()),
                Err(e) => Err(e),
            };
            match read {
                Ok(0) => {
                    return match self.frames.finish() {
                        Ok(()) => Ok(None),
                        Err(e) => Err(ReadError::Truncated(e)),
                    }
                }
                Ok(n) => self.frames.filled(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && patience > 0 => {
                    patience -= 1;
                    future::yield_now().await;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let stop = if buffered == 0 { idle_stop } else { None };
                    match self.wait(true, deadline, stop).await {
                        Ok(Wake::Ready) => {}
                        Ok(Wake::Stopped) => return Ok(None),
                        Ok(Wake::TimedOut) => return Err(ReadError::TimedOut),
                        Err(e) => return Err(ReadError::Io(e)),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
        self.frames.decode().map_err(ReadError::TooLarge)
    }

    /// Encodes `response` into `out`, replacing it with an error if it is above the cap.
    fn encode(&mut self, response: &Response) {
        self.out.clear();
        if let Err(e) = encode_frame_into(&mut self.out, response, "response") {
            let served = response.served_config_id.as_deref().unwrap_or_default();
            // The dispatcher ran; only its answer is lost.
            let detail = ErrorDetail::new(
                code::RESPONSE_TOO_LARGE,
                e.to_string(),
                Disposition::Unknown,
            );
            let mut error = Response::error(detail, served);
            error.request_id = response.request_id;
            // A short error response always fits.
            let _ = encode_frame_into(&mut self.out, &error, "response");
        }
        if self.out.capacity() > READ_CHUNK {
            self.out.shrink_to(READ_CHUNK);
        }
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
        Ok(())
    }

    /// Sends a last error frame if the socket takes it without waiting, then closes. The
    /// client is misbehaving or gone; it does not get to hold the connection any longer.
    fn reply_and_close<D: Dispatch>(mut self, shared: &Shared<D>, error: ErrorDetail) {
        log::debug!("closing a connection: {}", error.message);
        self.encode(&Response::error(error, shared.dispatcher.config_id()));
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
            match deadline {
                Some(deadline) => Timer::at(deadline).await,
                None => future::pending().await,
            };
            Ok(Wake::TimedOut)
        };
        ready.or(stopped).or(timed_out).await
    }
}
