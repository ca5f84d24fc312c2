//! One client's byte stream through the daemon's real per-connection handler.

use std::io;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use async_io::{Async, Timer};
use futures_lite::future::{self, FutureExt};
use futures_lite::io::AsyncReadExt;
use khived::{
    code, Config, Dispatch, DispatchError, Disposition, ErrorDetail, ProbeInfo, Request, Response,
    MAX_FRAME_BYTES, PROTOCOL_VERSION,
};
use rustix::net::SendFlags;

use crate::frame_reader::{next_frame, Parsed};

/// The namespace and configuration id of the dispatcher behind [`connection`].
pub const NAMESPACE: &str = "fuzz";
/// See [`NAMESPACE`].
pub const CONFIG_ID: &str = "fuzz-config";

/// The message of the dispatcher's panic on `ops` = `"panic"`.
const PANIC_MESSAGE: &str = "fuzz dispatcher panic";

/// How long the handler may take for one input before it counts as hung. An 8 MiB input on
/// a debug build on a loaded machine takes a few seconds; a hang never ends. Under libFuzzer
/// its `-timeout=10` reports a hang first.
const HANG_LIMIT: Duration = Duration::from_secs(120);

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

/// Send flags that keep a send to a closed peer from raising `SIGPIPE`; Apple platforms lack
/// the flag and get `SO_NOSIGPIPE` on the socket instead.
#[cfg(not(target_vendor = "apple"))]
const NO_SIGPIPE: SendFlags = SendFlags::NOSIGNAL;
#[cfg(target_vendor = "apple")]
const NO_SIGPIPE: SendFlags = SendFlags::empty();

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
    #[cfg(target_vendor = "apple")]
    rustix::net::sockopt::set_socket_nosigpipe(&client, true).expect("SO_NOSIGPIPE failed");
    let client = Async::new(client).expect("registering the client end failed");
    // No deadlines: the exchange always ends, since the client shuts down its writing side
    // once the input is sent and reads until the server closes. A deadline could only fire
    // on a slow machine and change the outcome; a hang is caught by `HANG_LIMIT`.
    let mut config = Config::default();
    config.first_request_timeout = Duration::MAX;
    config.idle_connection_timeout = Duration::MAX;
    config.write_timeout = Duration::MAX;
    let exchange = future::zip(
        khived::fuzzing::serve_connection(FuzzDispatcher, config, server),
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
            // Sent without SIGPIPE: libFuzzer's `main` does not ignore it as Rust's does, and
            // the server closes early after a bad frame.
            let sent = client
                .write_with(|s| rustix::net::send(s, chunk, NO_SIGPIPE).map_err(Into::into))
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
    /// waiting (the handler's `reply_and_close`): the reply may be missing.
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

/// The answer the wire protocol (PROTOCOL.md) asks for, with the fuzz dispatcher behind it.
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
    // Field by field rather than a struct literal: `Response` is `#[non_exhaustive]`.
    let mut response = Response::default();
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
    response.served_config_id = Some(CONFIG_ID.to_owned());
    response.daemon_protocol_version = PROTOCOL_VERSION;
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
    let mut response = Response::error(ErrorDetail::new(code, message, disposition), CONFIG_ID);
    response.daemon_protocol_version = PROTOCOL_VERSION;
    response
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
