//! The line protocol of worker processes, as [`Pool`](crate::pool) speaks it: one JSON object
//! per line on the worker's stdin and stdout.
//!
//! To the worker: `{"ops":…,"presentation":…,"presentation_per_op":…}`. From the worker:
//! `{"ok":true,"result":…}` or `{"ok":false,"error":…}`. It needs no feature: an application
//! that runs its own workers speaks the same lines, and the fuzz targets check them.

use serde::{Deserialize, Serialize};

#[derive(Serialize)]
struct WorkerRequest<'a> {
    ops: &'a str,
    presentation: Option<&'a str>,
    presentation_per_op: Option<&'a [Option<String>]>,
}

#[derive(Deserialize)]
struct WorkerReply {
    ok: bool,
    #[serde(default)]
    result: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

/// The line (newline included) that asks a worker for `ops`.
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
    let request = WorkerRequest {
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
    let reply: WorkerReply = serde_json::from_slice(line).map_err(|e| {
        let shown = String::from_utf8_lossy(&line[..line.len().min(200)]);
        format!("printed a line that is not a reply ({e}): {shown:?}")
    })?;
    Ok(match reply.ok {
        true => Ok(reply.result.unwrap_or_default()),
        false => Err(reply.error.unwrap_or_else(|| "worker failed".to_owned())),
    })
}
