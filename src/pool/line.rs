//! The line protocol of worker processes, as [`Pool`](crate::pool) speaks it: one JSON object
//! per line on the worker's stdin and stdout.
//!
//! To the worker: `{"id":7,"ops":…,"presentation":…,"presentation_per_op":…}`. From the
//! worker: `{"ok":true,"result":…}` or `{"ok":false,"error":…}`, which may echo the request's
//! `"id"` (a number that grows with each request to one worker). It needs no feature: an
//! application that runs its own workers speaks the same lines, and the fuzz targets check
//! them.
//!
//! A reply that echoes an id other than the request's is out of sync: the pool takes it as
//! an answer to an earlier request, fails the request and restarts the worker, so that no
//! reply can reach a client it was not meant for.

use serde::{Deserialize, Serialize};

#[derive(Serialize)]
struct WorkerRequest<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<u64>,
    ops: &'a str,
    presentation: Option<&'a str>,
    presentation_per_op: Option<&'a [Option<String>]>,
}

#[derive(Deserialize)]
struct WorkerReply {
    #[serde(default)]
    id: Option<u64>,
    ok: bool,
    #[serde(default)]
    result: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

/// A reply line, parsed: the id it echoes, if any, and the dispatcher's answer (the
/// worker's result or its error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The request id the worker echoed (`"id"`), if it did.
    pub id: Option<u64>,
    /// The worker's result, or its error.
    pub answer: Result<String, String>,
}

/// The line (newline included) that asks a worker for `ops`, without an id: see
/// [`encode_request_with_id`] for the line the pool sends.
///
/// ```
/// let line = khived::pool::line::encode_request("upper hi", None, None);
/// assert_eq!(line, b"{\"ops\":\"upper hi\",\"presentation\":null,\"presentation_per_op\":null}\n");
/// ```
pub fn encode_request(
    ops: &str,
    presentation: Option<&str>,
    presentation_per_op: Option<&[Option<String>]>,
) -> Vec<u8> {
    encode(None, ops, presentation, presentation_per_op)
}

/// The line (newline included) that asks a worker for `ops` as request `id`, which the
/// worker may echo in its reply.
///
/// ```
/// let line = khived::pool::line::encode_request_with_id(7, "upper hi", None, None);
/// assert_eq!(
///     line,
///     b"{\"id\":7,\"ops\":\"upper hi\",\"presentation\":null,\"presentation_per_op\":null}\n"
/// );
/// ```
pub fn encode_request_with_id(
    id: u64,
    ops: &str,
    presentation: Option<&str>,
    presentation_per_op: Option<&[Option<String>]>,
) -> Vec<u8> {
    encode(Some(id), ops, presentation, presentation_per_op)
}

fn encode(
    id: Option<u64>,
    ops: &str,
    presentation: Option<&str>,
    presentation_per_op: Option<&[Option<String>]>,
) -> Vec<u8> {
    let request = WorkerRequest {
        id,
        ops,
        presentation,
        presentation_per_op,
    };
    // Serializing strings and options into a Vec cannot fail.
    let mut line = serde_json::to_vec(&request).unwrap_or_default();
    line.push(b'\n');
    line
}

/// Reads one line from a worker: `Ok(answer)` is the dispatcher's answer (the worker's
/// result or its error), `Err(why)` says the line is not a reply at all, so the worker has
/// broken the protocol.
///
/// ```
/// use khived::pool::line::parse_reply;
///
/// assert_eq!(parse_reply(br#"{"ok":true,"result":"HI"}"#), Ok(Ok("HI".to_owned())));
/// assert_eq!(parse_reply(br#"{"ok":false,"error":"no"}"#), Ok(Err("no".to_owned())));
/// assert!(parse_reply(b"debug output").is_err());
/// ```
pub fn parse_reply(line: &[u8]) -> Result<Result<String, String>, String> {
    parse_reply_with_id(line).map(|reply| reply.answer)
}

/// Reads one line from a worker, with the id it echoes: `Err(why)` says the line is not a
/// reply at all (an `"id"` that is not a whole number included).
///
/// ```
/// use khived::pool::line::{parse_reply_with_id, Reply};
///
/// let reply = parse_reply_with_id(br#"{"id":7,"ok":true,"result":"HI"}"#).unwrap();
/// assert_eq!(reply, Reply { id: Some(7), answer: Ok("HI".to_owned()) });
/// assert_eq!(parse_reply_with_id(br#"{"ok":true}"#).unwrap().id, None);
/// assert!(parse_reply_with_id(br#"{"id":"7","ok":true}"#).is_err());
/// ```
pub fn parse_reply_with_id(line: &[u8]) -> Result<Reply, String> {
    let reply: WorkerReply = serde_json::from_slice(line).map_err(|e| {
        let shown = String::from_utf8_lossy(&line[..line.len().min(200)]);
        format!("printed a line that is not a reply ({e}): {shown:?}")
    })?;
    let answer = match reply.ok {
        true => Ok(reply.result.unwrap_or_default()),
        false => Err(reply.error.unwrap_or_else(|| "worker failed".to_owned())),
    };
    Ok(Reply {
        id: reply.id,
        answer,
    })
}
