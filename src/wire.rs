//! The wire format: length-prefixed JSON frames and the request and response types.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of JSON. The field names
//! of [`Request`] and [`Response`] are a contract with existing clients and must not change.

use std::borrow::Cow;
use std::io;

use futures_lite::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use serde::{Deserialize, Serialize};

/// The largest frame body either side may send: 8 MiB.
///
/// A header announcing more is refused before anything is allocated for the body.
///
/// ```
/// assert_eq!(khived::MAX_FRAME_BYTES, 8 * 1024 * 1024);
/// ```
pub const MAX_FRAME_BYTES: usize = 8 * 1024 * 1024;

/// How far ahead of the bytes that have arrived a reader may allocate.
///
/// A peer announcing a large frame and then sending nothing costs at most this much.
pub(crate) const READ_CHUNK: usize = 64 * 1024;

/// A request from a client.
///
/// Strings borrow from the frame they were decoded from where JSON allows it, so the daemon
/// does not copy the `ops` it dispatches.
///
/// ```
/// use khived::Request;
///
/// let request = Request::new("search foo", "khive", "cfg-1");
/// let json = serde_json::to_string(&request).unwrap();
/// let back: Request<'_> = serde_json::from_str(&json).unwrap();
/// assert_eq!(back, request);
/// // `config_id` may be missing: it then means "".
/// let old: Request<'_> = serde_json::from_str(
///     r#"{"ops":"x","presentation":null,"presentation_per_op":null,"namespace":"khive"}"#,
/// ).unwrap();
/// assert_eq!(old.config_id, "");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request<'a> {
    /// The request itself, opaque to the runtime.
    #[serde(borrow)]
    pub ops: Cow<'a, str>,
    /// How the client wants the result presented, if it cares.
    #[serde(default)]
    pub presentation: Option<Cow<'a, str>>,
    /// A presentation for each operation in `ops`, if the client sends them separately.
    #[serde(default)]
    pub presentation_per_op: Option<Vec<Option<String>>>,
    /// Must equal the daemon's namespace, or nothing is dispatched.
    #[serde(borrow)]
    pub namespace: Cow<'a, str>,
    /// Fingerprint of the client's resolved configuration; a missing field means `""`.
    #[serde(borrow, default)]
    pub config_id: Cow<'a, str>,
    /// Ask the daemon who it is instead of dispatching (see [`ProbeInfo`]); missing means false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub probe: bool,
}

fn is_false(value: &bool) -> bool {
    !*value
}

impl<'a> Request<'a> {
    /// A request for `ops` with no presentation.
    ///
    /// ```
    /// let request = khived::Request::new("status", "khive", "");
    /// assert!(!request.probe);
    /// ```
    pub fn new(
        ops: impl Into<Cow<'a, str>>,
        namespace: impl Into<Cow<'a, str>>,
        config_id: impl Into<Cow<'a, str>>,
    ) -> Self {
        Request {
            ops: ops.into(),
            presentation: None,
            presentation_per_op: None,
            namespace: namespace.into(),
            config_id: config_id.into(),
            probe: false,
        }
    }

    /// A probe: never dispatched, answered with the daemon's [`ProbeInfo`] whatever its
    /// namespace and configuration.
    ///
    /// ```
    /// let probe = khived::Request::probe();
    /// assert!(serde_json::to_string(&probe).unwrap().contains(r#""probe":true"#));
    /// ```
    pub fn probe() -> Request<'static> {
        Request {
            probe: true,
            ..Request::new("", "", "")
        }
    }
}

/// The daemon's answer to one request.
///
/// ```
/// // Older daemons omit `config_mismatch` and `served_config_id`.
/// let old: khived::Response = serde_json::from_str(
///     r#"{"ok":true,"result":"hi","error":null,"namespace_mismatch":false}"#,
/// ).unwrap();
/// assert!(!old.config_mismatch);
/// assert_eq!(old.served_config_id, None);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request was dispatched and succeeded.
    pub ok: bool,
    /// The dispatcher's result, when `ok`.
    #[serde(default)]
    pub result: Option<String>,
    /// What went wrong, when the dispatcher or the runtime failed.
    #[serde(default)]
    pub error: Option<String>,
    /// The request named another namespace; nothing was dispatched.
    #[serde(default)]
    pub namespace_mismatch: bool,
    /// The request carried another configuration id; nothing was dispatched.
    #[serde(default)]
    pub config_mismatch: bool,
    /// The daemon's own configuration id. A client must treat `None` as a mismatch.
    #[serde(default)]
    pub served_config_id: Option<String>,
}

impl Response {
    /// A failed response carrying `error`, as the runtime sends for bad or oversized frames.
    ///
    /// ```
    /// let response = khived::Response::error("bad request: expected value", "cfg-1");
    /// assert!(!response.ok);
    /// assert_eq!(response.served_config_id.as_deref(), Some("cfg-1"));
    /// ```
    pub fn error(error: impl Into<String>, served_config_id: &str) -> Self {
        Response {
            error: Some(error.into()),
            served_config_id: Some(served_config_id.to_owned()),
            ..Response::default()
        }
    }
}

/// What a daemon says about itself in answer to a probe ([`Request::probe`]); the response's
/// `result` holds this object as JSON text.
///
/// ```
/// let text = r#"{"pid":7,"namespace":"khive","config_id":"c","version":"0.1.0",
///                "uptime_ms":5,"in_flight":1,"served":2}"#;
/// let info: khived::ProbeInfo = serde_json::from_str(text).unwrap();
/// assert_eq!(info.pid, 7);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeInfo {
    /// The daemon's process id.
    pub pid: u32,
    /// The dispatcher's namespace.
    pub namespace: String,
    /// The dispatcher's configuration id.
    pub config_id: String,
    /// The khived crate version the daemon was built with.
    pub version: String,
    /// Milliseconds since the daemon started serving.
    pub uptime_ms: u64,
    /// Connections open at the moment of the probe, not counting the probe's own.
    pub in_flight: u64,
    /// Requests answered so far, the probe not included.
    pub served: u64,
}

/// Checks a frame header and returns the body length it announces.
///
/// ```
/// assert_eq!(khived::frame_len([0, 0, 1, 0]).unwrap(), 256);
/// let err = khived::frame_len(9_000_000u32.to_be_bytes()).unwrap_err();
/// assert_eq!(err.to_string(), "frame too large: 9000000 bytes (limit 8388608)");
/// ```
pub fn frame_len(header: [u8; 4]) -> io::Result<usize> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(too_large("frame", len));
    }
    Ok(len)
}

fn too_large(what: &str, len: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{what} too large: {len} bytes (limit {MAX_FRAME_BYTES})"),
    )
}

/// Reads one frame and returns its body.
///
/// The body buffer grows only as bytes arrive, at most 64 KiB ahead of them: a header that
/// announces 8 MiB followed by silence costs 64 KiB, not 8 MiB. End of stream anywhere,
/// including before the first header byte, is an [`io::ErrorKind::UnexpectedEof`] error.
///
/// ```
/// # futures_lite::future::block_on(async {
/// let mut wire: &[u8] = &[0, 0, 0, 2, b'{', b'}'];
/// assert_eq!(khived::read_frame(&mut wire).await?, b"{}");
/// # std::io::Result::Ok(()) }).unwrap();
/// ```
pub async fn read_frame<R: AsyncRead + Unpin + ?Sized>(reader: &mut R) -> io::Result<Vec<u8>> {
    let mut header = [0u8; 4];
    let mut filled = 0;
    while filled < 4 {
        match reader.read(&mut header[filled..]).await {
            Ok(0) if filled == 0 => return Err(eof("connection closed before a frame")),
            Ok(0) => return Err(eof("connection closed inside a frame header")),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let len = frame_len(header)?;
    let mut body = Vec::new();
    while body.len() < len {
        let filled = body.len();
        let want = (len - filled).min(READ_CHUNK);
        body.reserve_exact(want);
        body.resize(filled + want, 0);
        let read = match reader.read(&mut body[filled..]).await {
            Ok(0) => {
                return Err(eof(&format!(
                    "connection closed inside a frame body ({filled} of {len} bytes)"
                )))
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(e),
        };
        body.truncate(filled + read);
    }
    Ok(body)
}

fn eof(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, message.to_owned())
}

/// Writes `body` as one frame (header and body in one write) and flushes.
///
/// A body above [`MAX_FRAME_BYTES`] is refused with [`io::ErrorKind::InvalidData`] and
/// nothing is written.
///
/// ```
/// # futures_lite::future::block_on(async {
/// let mut wire = Vec::new();
/// khived::write_frame(&mut wire, b"{}").await?;
/// assert_eq!(wire, [0, 0, 0, 2, b'{', b'}']);
/// # std::io::Result::Ok(()) }).unwrap();
/// ```
pub async fn write_frame<W: AsyncWrite + Unpin + ?Sized>(
    writer: &mut W,
    body: &[u8],
) -> io::Result<()> {
    if body.len() > MAX_FRAME_BYTES {
        return Err(too_large("frame", body.len()));
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(body);
    writer.write_all(&frame).await?;
    writer.flush().await
}

/// Encodes `message` as a complete frame (header and JSON body) ready to write.
///
/// ```
/// let frame = khived::encode_frame(&khived::Request::probe()).unwrap();
/// let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
/// assert_eq!(len, frame.len() - 4);
/// ```
pub fn encode_frame<T: Serialize + ?Sized>(message: &T) -> io::Result<Vec<u8>> {
    let mut frame = Vec::with_capacity(128);
    encode_frame_into(&mut frame, message, "frame")?;
    Ok(frame)
}

/// Appends `message` as a frame to `out`; on error `out` is left as it was. `what` names
/// the message in the error for a body above the cap.
pub(crate) fn encode_frame_into<T: Serialize + ?Sized>(
    out: &mut Vec<u8>,
    message: &T,
    what: &str,
) -> io::Result<()> {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    if let Err(e) = serde_json::to_writer(&mut *out, message) {
        out.truncate(start);
        return Err(e.into());
    }
    let len = out.len() - start - 4;
    if len > MAX_FRAME_BYTES {
        out.truncate(start);
        return Err(too_large(what, len));
    }
    out[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}
