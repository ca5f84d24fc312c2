//! The worker pool's line protocol.

use khived::pool::line::{encode_request, parse_reply};

/// A line from a worker's stdout ([`parse_reply`]) must never panic; a line it accepts must
/// say the same thing once re-encoded. And a request line, whatever the `ops`, must be
/// exactly one line: a newline inside it would desynchronize the worker.
pub fn worker_reply(data: &[u8]) {
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
