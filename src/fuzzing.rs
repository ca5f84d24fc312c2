//! A hook for the fuzz targets and their regression tests: not part of the API.
//!
//! Compiled only with the `__fuzzing` feature, which `fuzz/` and khived's own tests turn on;
//! it may change in any release. The checks themselves live in `fuzz/oracles`, outside the
//! library; this module gives them the few things they cannot reach from outside.

use std::os::unix::net::UnixStream;

use crate::config::Config;
use crate::dispatch::Dispatch;
use crate::shared::Shared;

/// Serves one connection with `dispatcher` and `config` as a daemon would after accepting
/// it, and returns when the connection ends. `stream` must be non-blocking, as accepted
/// sockets are. Nothing else of a daemon runs: no listener, no lock, no signals.
pub async fn serve_connection<D: Dispatch>(dispatcher: D, config: Config, stream: UnixStream) {
    // Accepted sockets get this from `sys::accept`; a socket pair has to be given it here.
    if let Err(e) = crate::sys::no_sigpipe(&stream) {
        log::warn!("cannot suppress SIGPIPE on a fuzzed connection: {e}");
    }
    let shared = Shared::new(dispatcher, config);
    crate::connection::serve(&shared, stream).await;
}

/// The frame a daemon writes for `response`: its own writer's, which must give the bytes
/// serde_json gives for the derived `Serialize`.
///
/// # Errors
///
/// The body is above [`MAX_FRAME_BYTES`](crate::MAX_FRAME_BYTES).
pub fn response_frame(response: &crate::Response) -> std::io::Result<Vec<u8>> {
    let mut frame = Vec::new();
    crate::wire::encode_frame_into(&mut frame, response, "response")?;
    Ok(frame)
}
