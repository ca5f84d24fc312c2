//! The properties behind the fuzz targets in `fuzz/`, as plain functions.
//!
//! They live in the library rather than in the targets so that `cargo test` on stable
//! (`tests/fuzz_regressions.rs`) replays every seed and every crash ever found, and so that the
//! connection check can reach the real per-connection handler, which is private. Each function
//! takes one fuzz input and panics, with a message naming the broken property, when the library
//! misbehaves on it; any other outcome is a pass.
//!
//! Not part of the API: hidden from the documentation, changed whenever the targets need it.

use std::io;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use async_io::{Async, Timer};
use futures_lite::future::{self, FutureExt};
use futures_lite::io::{AsyncRead, AsyncReadExt};
use rustix::net::SendFlags;

use crate::config::Config;
use crate::dispatch::{Dispatch, DispatchError};
use crate::shared::Shared;
use crate::wire::{
    code, encode_frame, read_frame, Disposition, ErrorDetail, ProbeInfo, Request, Response,
    MAX_FRAME_BYTES, PROTOCOL_VERSION,
};

/// How far ahead of the bytes that have arrived `read_frame` promises to allocate (its docs
/// say 64 KiB). Written out here rather than taken from the reader's own constant, so that a
/// change of the promise is a decision and not a side effect.
pub const READ_AHEAD: usize = 64 * 1024;

/// Allocations a frame read may make besides its body: the error message of a short read, the
/// executor's waker on first use.
pub const ALLOCATION_SLACK: usize = 4 * 1024;

/// What the reader under test is doing, told to the probe of [`frame_reader_probed`] so that
/// a fuzz target with a counting allocator can check how much `read_frame` allocates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadStep {
    /// A `read_frame` call is about to start: what was allocated before is the checker's own
    /// doing, not the reader's.
    FrameStart,
    /// `read_frame` asks for more bytes, or has just returned, and `delivered` bytes of this
    /// frame (header included) have been handed to it so far. Every allocation it made since
    /// the previous step must pass [`check_read_allocation`] with this number.
    Delivered(usize),
}

/// Panics if `largest`, the largest single allocation `read_frame` made since the previous
/// [`ReadStep`], is more than `delivered` bytes plus the read-ahead it promises.
pub fn check_read_allocation(largest: usize, delivered: usize) {
    let allowed = delivered + READ_AHEAD + ALLOCATION_SLACK;
    assert!(
        largest <= allowed,
        "read_frame allocated {largest} bytes at once when only {delivered} bytes of the frame \
         had arrived (allowed: {allowed})"
    );
}

/// [`frame_reader_probed`] without an allocation probe.
pub fn frame_reader(data: &[u8]) {
    frame_reader_probed(data, &mut |_| {});
}

/// Feeds a byte stream to [`read_frame`](crate::read_frame) in chunks chosen by the input and
/// checks every outcome against a plain parse of the same stream: each frame comes back
/// whole, equal to what was sent and within the cap, the reader never reads past the frame it
/// returns, a header above the cap is refused before any body byte is read, and a stream that
/// ends inside a frame is an `UnexpectedEof` error.
///
/// Input layout: `(data[0] % 8) + 1` bytes after the first one form a read pattern, and the
/// rest is the stream. The pattern is cycled, one byte per `poll_read`: 0 answers
/// `Interrupted`, 1 answers `Pending` (and wakes at once), 2..=200 deliver up to `b - 1` bytes,
/// 201..=255 up to `(b - 200) * 4096` bytes. Two stalls in a row become a 1-byte read, so that
/// every input ends.
pub fn frame_reader_probed(data: &[u8], probe: &mut dyn FnMut(ReadStep)) {
    let pattern_len = data.first().map_or(0, |b| usize::from(b % 8) + 1);
    let pattern_end = (1 + pattern_len).min(data.len());
    let pattern = data.get(1..pattern_end).filter(|p| !p.is_empty());
    let stream = &data[pattern_end..];
    let mut reader = ChunkedReader {
        stream,
        pos: 0,
        pattern: pattern.unwrap_or(&[255]),
        step: 0,
        stalled: false,
        frame_start: 0,
        probe,
    };
    loop {
        let start = reader.pos;
        reader.frame_start = start;
        (reader.probe)(ReadStep::FrameStart);
        let outcome = future::block_on(read_frame(&mut reader));
        (reader.probe)(ReadStep::Delivered(reader.pos - start));
        let expected = next_frame(&stream[start..]);
        match (outcome, expected) {
            (Ok(frame), Parsed::Frame(body)) => {
                assert!(
                    frame.len() <= MAX_FRAME_BYTES,
                    "frame above the cap returned"
                );
                assert!(
                    frame == body,
                    "frame at offset {start} differs from what was sent ({} bytes returned, {} sent)",
                    frame.len(),
                    body.len()
                );
                assert_eq!(
                    reader.pos,
                    start + 4 + body.len(),
                    "the reader consumed bytes past the frame at offset {start}"
                );
            }
            (Err(e), Parsed::TooLarge(len)) => {
                assert_eq!(e.kind(), io::ErrorKind::InvalidData, "too large: {e}");
                let message = e.to_string();
                assert!(
                    message.contains(&len.to_string())
                        && message.contains(&MAX_FRAME_BYTES.to_string()),
                    "the error for a {len}-byte header does not name both numbers: {message}"
                );
                assert_eq!(
                    reader.pos,
                    start + 4,
                    "body bytes were read after a header above the cap"
                );
                return;
            }
            (Err(e), Parsed::Truncated) => {
                assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "short read: {e}");
                return;
            }
            (outcome, expected) => panic!(
                "frame at offset {start}: read_frame gave {:?}, the stream holds {expected:?}",
                outcome.map(|frame| frame.len())
            ),
        }
    }
}

/// The next frame of a stream, parsed the plain way.
#[derive(Debug)]
enum Parsed<'a> {
    /// A complete frame's body.
    Frame(&'a [u8]),
    /// A header announcing more than the cap.
    TooLarge(usize),
    /// The stream ends inside a frame, or before one.
    Truncated,
}

fn next_frame(stream: &[u8]) -> Parsed<'_> {
    let Some(header) = stream.first_chunk::<4>() else {
        return Parsed::Truncated;
    };
    let len = u32::from_be_bytes(*header) as usize;
    if len > MAX_FRAME_BYTES {
        return Parsed::TooLarge(len);
    }
    match stream.get(4..4 + len) {
        Some(body) => Parsed::Frame(body),
        None => Parsed::Truncated,
    }
}

/// A stream that hands its bytes over in the chunks its pattern says.
struct ChunkedReader<'a, 'p> {
    stream: &'a [u8],
    pos: usize,
    pattern: &'a [u8],
    step: usize,
    /// The previous answer was `Interrupted` or `Pending`.
    stalled: bool,
    /// Where the frame being read starts, for the probe's `delivered`.
    frame_start: usize,
    probe: &'p mut dyn FnMut(ReadStep),
}

impl AsyncRead for ChunkedReader<'_, '_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        (this.probe)(ReadStep::Delivered(this.pos - this.frame_start));
        let b = this.pattern[this.step % this.pattern.len()];
        this.step += 1;
        if !this.stalled && b <= 1 {
            this.stalled = true;
            if b == 0 {
                return Poll::Ready(Err(io::ErrorKind::Interrupted.into()));
            }
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        this.stalled = false;
        let chunk = match b {
            0 | 1 => 1,
            2..=200 => usize::from(b) - 1,
            _ => usize::from(b - 200) * 4096,
        };
        let n = chunk.min(buf.len()).min(this.stream.len() - this.pos);
        buf[..n].copy_from_slice(&this.stream[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(n))
    }
}

/// Decodes the input as a [`Request`] and as a [`Response`]; whatever decodes must encode,
/// as JSON and as a frame, and decode back to the same value.
pub fn request_decode(data: &[u8]) {
    if let Ok(request) = serde_json::from_slice::<Request<'_>>(data) {
        let json = serde_json::to_vec(&request).expect("a decoded request failed to encode");
        let back: Request<'_> = serde_json::from_slice(&json)
            .unwrap_or_else(|e| panic!("re-encoded request does not decode ({e}): {request:?}"));
        assert_eq!(
            back, request,
            "the request changed through encode and decode"
        );
        check_frame(&request, &json);
    }
    if let Ok(response) = serde_json::from_slice::<Response>(data) {
        let json = serde_json::to_vec(&response).expect("a decoded response failed to encode");
        let back: Response = serde_json::from_slice(&json)
            .unwrap_or_else(|e| panic!("re-encoded response does not decode ({e}): {response:?}"));
        assert_eq!(
            back, response,
            "the response changed through encode and decode"
        );
        check_frame(&response, &json);
    }
}

/// Checks that `encode_frame` gives `json` behind a header holding its length.
fn check_frame<T: serde::Serialize>(value: &T, json: &[u8]) {
    let frame = encode_frame(value).expect("a decoded value failed to encode as a frame");
    let frame = frame.as_bytes();
    assert_eq!(frame[4..], *json, "the frame body is not the value's JSON");
    assert_eq!(
        u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize,
        json.len(),
        "the frame header does not give the body's length"
    );
}

/// The namespace and configuration id of the dispatcher behind [`connection`].
pub const NAMESPACE: &str = "fuzz";
/// See [`NAMESPACE`].
pub const CONFIG_ID: &str = "fuzz-config";

/// The message of the dispatcher's panic on `ops` = `"panic"`.
const PANIC_MESSAGE: &str = "fuzz dispatcher panic";

/// How long the handler may take for one input before it counts as hung. Far above what an
/// in-memory exchange needs, far below libFuzzer's `-timeout=10`.
const HANG_LIMIT: Duration = Duration::from_secs(5);

/// The sizes in which the client writes its stream, cycled, with a yield after each: small
/// ones split headers, large ones cross the reader's 64 KiB step.
const WRITE_CHUNKS: [usize; 7] = [4096, 1, 3, 70_000, 2, 517, 5];

/// The dispatcher behind [`connection`]: `ops` = `"panic"` panics, `"fail:<e>"` fails with
/// `<e>`, anything else is echoed.
#[derive(Debug)]
struct FuzzDispatcher;

impl Dispatch for FuzzDispatcher {
    async fn dispatch(&self, request: &Request<'_>) -> Result<String, DispatchError> {
        let ops = &*request.ops;
        if ops == "panic" {
            // `resume_unwind` unwinds like a panic but skips the panic hook, which libFuzzer
            // replaces with one that aborts the process even for a panic that is caught.
            std::panic::resume_unwind(Box::new(PANIC_MESSAGE));
        }
        match ops.strip_prefix("fail:") {
            Some(error) => Err(error.into()),
            None => Ok(ops.to_owned()),
        }
    }

    fn namespace(&self) -> &str {
        NAMESPACE
    }

    fn config_id(&self) -> &str {
        CONFIG_ID
    }
}

/// Runs the input, as a client's byte stream, through the real per-connection handler over a
/// socket pair, and checks what comes back: well-formed response frames, each with
/// `served_config_id`, then a close; never a panic or a hang; at most one response per
/// complete frame sent plus one; and each response the one the request called for (answered
/// in order; the connection closed after the first bad, oversized or truncated frame).
pub fn connection(data: &[u8]) {
    let (client, server) = UnixStream::pair().expect("socketpair failed");
    // The handler reads without waiting first and expects a non-blocking socket, as the
    // accept loop gives it.
    server
        .set_nonblocking(true)
        .expect("set_nonblocking failed");
    let client = Async::new(client).expect("registering the client end failed");
    let config = Config {
        first_request_timeout: Duration::from_millis(200),
        idle_connection_timeout: Duration::from_millis(200),
        write_timeout: Duration::from_millis(200),
        ..Config::default()
    };
    let shared = Shared::new(FuzzDispatcher, config);
    let exchange = future::zip(
        crate::connection::serve(&shared, server),
        write_then_read(&client, data),
    );
    let hung = async {
        Timer::after(HANG_LIMIT).await;
        panic!("the connection was still open after {HANG_LIMIT:?}");
    };
    let ((), output) = async_io::block_on(exchange.or(hung));
    check_responses(data, &output);
}

/// Writes `input` (then shuts down writing) while reading everything the server sends until
/// it closes.
async fn write_then_read(client: &Async<UnixStream>, input: &[u8]) -> Vec<u8> {
    let write = async {
        let mut written = 0;
        for size in WRITE_CHUNKS.iter().cycle() {
            if written == input.len() {
                break;
            }
            let chunk = &input[written..input.len().min(written + size)];
            // send with NOSIGNAL: libFuzzer's `main` does not ignore SIGPIPE as Rust's does,
            // and the server closes early after a bad frame.
            let sent = client
                .write_with(|s| {
                    rustix::net::send(s, chunk, SendFlags::NOSIGNAL).map_err(Into::into)
                })
                .await;
            match sent {
                Ok(n) => written += n,
                // The server stopped reading; its replies say why.
                Err(_) => break,
            }
            future::yield_now().await;
        }
        let _ = client.get_ref().shutdown(Shutdown::Write);
    };
    let read = async {
        let mut output = Vec::new();
        let mut reader = client;
        let mut buf = vec![0; 64 * 1024];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => output.extend_from_slice(&buf[..n]),
                // A server that closes with unread input resets the connection; what it sent
                // before has been read by then.
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("reading the server's output failed: {e}"),
            }
        }
        output
    };
    future::zip(write, read).await.1
}

/// What the handler owes for one frame.
#[derive(Debug)]
enum Expected {
    /// This exact response.
    Exact(Response),
    /// A probe's answer, with `served` requests answered before it.
    Probe {
        served: u64,
        request_id: Option<u64>,
    },
    /// A runtime error reply whose `error` starts with `prefix`, with this code and
    /// request id.
    Error {
        prefix: String,
        code: &'static str,
        request_id: Option<u64>,
        then: Then,
    },
}

/// What the handler does after a runtime error reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    /// Reads the next request.
    Continue,
    /// Closes the connection.
    Close,
    /// Closes the connection, having sent the reply only if the socket took it without
    /// waiting (connection.rs, `reply_and_close`): the reply may be missing.
    CloseBestEffort,
}

/// The responses the input calls for, and how many complete frames it holds.
fn expected_responses(input: &[u8]) -> (Vec<Expected>, usize) {
    let mut expected = Vec::new();
    let mut complete = 0;
    let mut rest = input;
    let mut open = true;
    loop {
        let parsed = next_frame(rest);
        let owed = match parsed {
            Parsed::Frame(body) => {
                complete += 1;
                rest = &rest[4 + body.len()..];
                match serde_json::from_slice::<Request<'_>>(body) {
                    Ok(request) => answer(&request, expected.len() as u64),
                    Err(_) => error("bad request: ", code::BAD_REQUEST, id_of(body), Then::Close),
                }
            }
            Parsed::TooLarge(len) => error(
                &format!("frame too large: {len} bytes"),
                code::FRAME_TOO_LARGE,
                None,
                Then::CloseBestEffort,
            ),
            Parsed::Truncated if rest.is_empty() => break,
            Parsed::Truncated => error(
                "bad request: ",
                code::BAD_REQUEST,
                None,
                Then::CloseBestEffort,
            ),
        };
        if open {
            open = matches!(
                owed,
                Expected::Exact(_)
                    | Expected::Probe { .. }
                    | Expected::Error {
                        then: Then::Continue,
                        ..
                    }
            );
            expected.push(owed);
        }
        if !matches!(parsed, Parsed::Frame(_)) {
            break;
        }
    }
    (expected, complete)
}

fn error(prefix: &str, code: &'static str, request_id: Option<u64>, then: Then) -> Expected {
    Expected::Error {
        prefix: prefix.to_owned(),
        code,
        request_id,
        then,
    }
}

/// The `request_id` of a frame that is not a request, when it is a JSON object with one
/// valid `request_id` (a duplicate key makes the object invalid, as serde's derive says).
fn id_of(body: &[u8]) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Id {
        request_id: Option<u64>,
    }
    if !body.trim_ascii_start().starts_with(b"{") {
        return None;
    }
    serde_json::from_slice::<Id>(body).ok()?.request_id
}

/// The answer the request path owes `request` (PROTOCOL.md), with the fuzz dispatcher.
fn answer(request: &Request<'_>, served: u64) -> Expected {
    let request_id = request.request_id;
    if request.protocol_version > PROTOCOL_VERSION {
        let mut response = failed(
            code::VERSION_MISMATCH,
            "version mismatch: the request speaks protocol version",
            Disposition::NotCommitted,
        );
        response.version_mismatch = true;
        response.request_id = request_id;
        return Expected::Exact(response);
    }
    if request.probe {
        return Expected::Probe { served, request_id };
    }
    let mut response = Response {
        served_config_id: Some(CONFIG_ID.to_owned()),
        daemon_protocol_version: PROTOCOL_VERSION,
        ..Response::default()
    };
    if request.namespace != NAMESPACE {
        response.namespace_mismatch = true;
    } else if request.config_id != CONFIG_ID {
        response.config_mismatch = true;
    } else if request.probe_only {
        response.ok = true;
    } else if request.ops == "panic" {
        let message = format!("dispatcher panicked: {PANIC_MESSAGE}");
        response = failed(code::DISPATCHER_PANICKED, &message, Disposition::Unknown);
    } else if let Some(error) = request.ops.strip_prefix("fail:") {
        response = failed(code::DISPATCHER_ERROR, error, Disposition::Unknown);
    } else {
        response.ok = true;
        response.result = Some(request.ops.clone().into_owned());
    }
    response.request_id = request_id;
    let encoded = serde_json::to_vec(&response).map_or(0, |json| json.len());
    if encoded > MAX_FRAME_BYTES {
        return error(
            "response too large: ",
            code::RESPONSE_TOO_LARGE,
            request_id,
            Then::Continue,
        );
    }
    Expected::Exact(response)
}

/// An error response as the daemon sends it. For a version mismatch `message` is only the
/// start of the text: `check_response` compares that part.
fn failed(code: &str, message: &str, disposition: Disposition) -> Response {
    Response {
        error: Some(message.to_owned()),
        error_detail: Some(ErrorDetail::new(code, message, disposition)),
        served_config_id: Some(CONFIG_ID.to_owned()),
        daemon_protocol_version: PROTOCOL_VERSION,
        ..Response::default()
    }
}

fn check_responses(input: &[u8], output: &[u8]) {
    let mut responses = Vec::new();
    let mut rest = output;
    while !rest.is_empty() {
        let body = match next_frame(rest) {
            Parsed::Frame(body) => body,
            Parsed::TooLarge(len) => panic!("response {} announces {len} bytes", responses.len()),
            Parsed::Truncated => panic!(
                "the output ends inside response {} ({} bytes left)",
                responses.len(),
                rest.len()
            ),
        };
        let response: Response = serde_json::from_slice(body).unwrap_or_else(|e| {
            panic!(
                "response {} is not a Response ({e}): {}",
                responses.len(),
                String::from_utf8_lossy(body)
            )
        });
        assert_eq!(
            response.served_config_id.as_deref(),
            Some(CONFIG_ID),
            "response {} lacks served_config_id",
            responses.len()
        );
        responses.push(response);
        rest = &rest[4 + body.len()..];
    }

    let (expected, complete) = expected_responses(input);
    assert!(
        responses.len() <= complete + 1,
        "{} responses to {complete} complete frames",
        responses.len()
    );
    for (i, (response, owed)) in responses.iter().zip(&expected).enumerate() {
        check_response(i, response, owed);
    }
    let last_may_be_missing = matches!(
        expected.last(),
        Some(Expected::Error {
            then: Then::CloseBestEffort,
            ..
        })
    );
    let enough = responses.len() == expected.len()
        || (last_may_be_missing && responses.len() + 1 == expected.len());
    assert!(
        enough && responses.len() <= expected.len(),
        "{} responses where {} were due: {expected:?}",
        responses.len(),
        expected.len()
    );
}

fn check_response(i: usize, response: &Response, owed: &Expected) {
    match owed {
        Expected::Exact(expected) if expected.version_mismatch => {
            // The text names the versions; the rest must be exact.
            let prefix = expected.error.as_deref().unwrap_or_default();
            let error = response.error.as_deref().unwrap_or_default();
            assert!(error.starts_with(prefix), "response {i}: {response:?}");
            let mut comparable = response.clone();
            comparable.error = expected.error.clone();
            if let Some(detail) = &mut comparable.error_detail {
                detail.message = prefix.to_owned();
            }
            assert_eq!(&comparable, expected, "response {i} is not the one due");
        }
        Expected::Exact(expected) => {
            assert_eq!(response, expected, "response {i} is not the one due");
        }
        Expected::Probe { served, request_id } => {
            assert_eq!(
                response.request_id, *request_id,
                "probe response {i} echoes another request id"
            );
            let text = response.result.as_deref().unwrap_or_default();
            let info: ProbeInfo = serde_json::from_str(text)
                .unwrap_or_else(|e| panic!("response {i}, to a probe, holds no ProbeInfo ({e})"));
            assert!(response.ok, "probe response {i} is not ok");
            assert_eq!(
                (
                    info.namespace.as_str(),
                    info.config_id.as_str(),
                    info.served
                ),
                (NAMESPACE, CONFIG_ID, *served),
                "probe response {i} describes another daemon"
            );
        }
        Expected::Error {
            prefix,
            code,
            request_id,
            ..
        } => {
            let error = response.error.as_deref().unwrap_or_default();
            assert!(
                !response.ok && error.starts_with(prefix.as_str()),
                "response {i} should be an error starting with {prefix:?}: {response:?}"
            );
            let detail = response.error_detail.as_ref();
            assert!(
                detail.is_some_and(|d| d.code == *code && d.message == error),
                "response {i} should carry code {code:?} and its message: {response:?}"
            );
            assert_eq!(
                (response.request_id, response.daemon_protocol_version),
                (*request_id, PROTOCOL_VERSION),
                "response {i} has the wrong request id or protocol version"
            );
        }
    }
}

/// A line from a worker's stdout ([`crate::worker_line::parse_reply`]) must never panic; a
/// line it accepts must say the same thing once re-encoded. And a request line, whatever the
/// `ops`, must be exactly one line: a newline inside it would desynchronize the worker.
pub fn worker_reply(data: &[u8]) {
    use crate::worker_line::{encode_request, parse_reply};
    if let Ok(answer) = parse_reply(data) {
        let reencoded = match &answer {
            Ok(result) => serde_json::json!({ "ok": true, "result": result }),
            Err(error) => serde_json::json!({ "ok": false, "error": error }),
        };
        let line = serde_json::to_vec(&reencoded).expect("a reply encodes");
        let again = parse_reply(&line).expect("a re-encoded reply is a reply");
        assert_eq!(again, answer, "a reply changed meaning when re-encoded");
    }
    let ops = String::from_utf8_lossy(data);
    let line = encode_request(&ops, Some(&ops), Some(&[Some(ops.to_string()), None]));
    let newlines = line.iter().filter(|&&b| b == b'\n').count();
    assert!(
        newlines == 1 && line.ends_with(b"\n"),
        "a request took {newlines} lines"
    );
}
