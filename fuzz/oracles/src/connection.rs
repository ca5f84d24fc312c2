//! One client's byte stream through the daemon's real per-connection handler.

use std::io;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use async_io::{Async, Timer};
use futures_lite::future::{self, FutureExt};
use futures_lite::io::AsyncReadExt;
use khived::{Config, Dispatch, ProbeInfo, Request, Response, MAX_FRAME_BYTES};
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
    async fn dispatch(
        &self,
        ops: &str,
        _presentation: Option<&str>,
        _presentation_per_op: Option<&[Option<String>]>,
    ) -> Result<String, String> {
        if ops == "panic" {
            // `resume_unwind` unwinds like a panic but skips the panic hook, which libFuzzer
            // replaces with one that aborts the process even for a panic that is caught.
            std::panic::resume_unwind(Box::new(PANIC_MESSAGE));
        }
        match ops.strip_prefix("fail:") {
            Some(error) => Err(error.to_owned()),
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
    Probe { served: u64 },
    /// A runtime error reply whose `error` starts with `prefix`.
    Error { prefix: String, then: Then },
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
                    Err(_) => error("bad request: ", Then::Close),
                }
            }
            Parsed::TooLarge(len) => error(
                &format!("frame too large: {len} bytes"),
                Then::CloseBestEffort,
            ),
            Parsed::Truncated if rest.is_empty() => break,
            Parsed::Truncated => error("bad request: ", Then::CloseBestEffort),
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

fn error(prefix: &str, then: Then) -> Expected {
    Expected::Error {
        prefix: prefix.to_owned(),
        then,
    }
}

/// The answer the wire protocol (PROTOCOL.md) asks for, with the fuzz dispatcher behind it.
fn answer(request: &Request<'_>, served: u64) -> Expected {
    if request.probe {
        return Expected::Probe { served };
    }
    // Field by field rather than a struct literal: `Response` may become `#[non_exhaustive]`.
    let mut response = Response::default();
    if request.namespace != NAMESPACE {
        response.namespace_mismatch = true;
    } else if request.config_id != CONFIG_ID {
        response.config_mismatch = true;
    } else if request.ops == "panic" {
        response.error = Some(format!("dispatcher panicked: {PANIC_MESSAGE}"));
    } else if let Some(error) = request.ops.strip_prefix("fail:") {
        response.error = Some(error.to_owned());
    } else {
        response.ok = true;
        response.result = Some(request.ops.clone().into_owned());
    }
    response.served_config_id = Some(CONFIG_ID.to_owned());
    let encoded = serde_json::to_vec(&response).map_or(0, |json| json.len());
    if encoded > MAX_FRAME_BYTES {
        return error("response too large: ", Then::Continue);
    }
    Expected::Exact(response)
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
        Expected::Exact(expected) => {
            assert_eq!(response, expected, "response {i} is not the one due");
        }
        Expected::Probe { served } => {
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
        Expected::Error { prefix, .. } => {
            let error = response.error.as_deref().unwrap_or_default();
            assert!(
                !response.ok && error.starts_with(prefix.as_str()),
                "response {i} should be an error starting with {prefix:?}: {response:?}"
            );
        }
    }
}
