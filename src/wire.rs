//! The wire format: length-prefixed JSON frames and the request and response types.
//!
//! The contract is the project's PROTOCOL.md (frames, every field with its default, versions
//! and the must-understand rule, error codes and dispositions, pipelining); the crate
//! documentation ("The wire format") gives the summary. The field names of [`Request`] and
//! [`Response`] are a contract with existing clients and must not change; the protocol grows
//! only by optional fields that older peers ignore.

use std::borrow::Cow;
use std::io;

use futures_lite::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use serde::{Deserialize, Serialize};

/// The largest frame body either side may send: 8 MiB.
///
/// A header announcing more is refused before anything is allocated for the body.
///
/// # Examples
///
/// ```
/// assert_eq!(khived::MAX_FRAME_BYTES, 8 * 1024 * 1024);
/// ```
pub const MAX_FRAME_BYTES: usize = 8 * 1024 * 1024;

/// The protocol version this crate speaks (PROTOCOL.md, "Versions"): a daemon puts it in
/// every response's `daemon_protocol_version` and refuses requests of a higher
/// `protocol_version` without dispatching them; [`Request::new`] sends it.
///
/// Version 0 is the original protocol, without `protocol_version`, `request_id`,
/// `probe_only` or structured errors; version 1 added them, all optional.
///
/// # Examples
///
/// ```
/// assert_eq!(khived::PROTOCOL_VERSION, 1);
/// assert_eq!(khived::Request::new("x", "ns", "").protocol_version, 1);
/// ```
pub const PROTOCOL_VERSION: u64 = 1;

/// How far ahead of the bytes that have arrived a reader may allocate.
///
/// A peer announcing a large frame and then sending nothing costs at most this much.
pub(crate) const READ_CHUNK: usize = 64 * 1024;

/// The room a [`FrameDecoder`] that reads ahead starts with: most requests fit in one read.
const INITIAL_BUFFER: usize = 4096;

/// A request from a client.
///
/// Strings borrow from the frame they were decoded from where JSON allows it, so the daemon
/// does not copy the `ops` it dispatches.
///
/// The protocol grows by adding fields that older peers ignore, so the type is
/// `#[non_exhaustive]`: build one with [`Request::new`] or [`Request::probe`] and set the
/// optional fields afterwards. A [`Dispatch`](crate::Dispatch) implementation reads the
/// fields it needs from the request it is given, so a new field never breaks it. Each field's
/// default when it is missing from the wire is in PROTOCOL.md ("Requests").
///
/// # Examples
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Request<'a> {
    /// The request itself, opaque to the runtime.
    pub ops: Cow<'a, str>,
    /// How the client wants the result presented, if it cares.
    #[serde(default)]
    pub presentation: Option<Cow<'a, str>>,
    /// A presentation for each operation in `ops`, if the client sends them separately.
    #[serde(default)]
    pub presentation_per_op: Option<Vec<Option<String>>>,
    /// Must equal the daemon's namespace, or nothing is dispatched.
    pub namespace: Cow<'a, str>,
    /// Fingerprint of the client's resolved configuration; a missing field means `""`.
    pub config_id: Cow<'a, str>,
    /// Ask the daemon who it is instead of dispatching (see [`ProbeInfo`]); missing means false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub probe: bool,
    /// The protocol version whose meaning the request has; missing means 0, the original
    /// protocol. A daemon refuses a request of a version above its own
    /// ([`PROTOCOL_VERSION`]) without dispatching it: the must-understand rule.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub protocol_version: u64,
    /// Echoed on the response, so that a client sending several requests can match each
    /// answer to its request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<u64>,
    /// An identity check: the namespace and configuration are checked as for any request,
    /// and a match is answered `ok` with no result. Never dispatched.
    #[serde(default, skip_serializing_if = "is_false")]
    pub probe_only: bool,
}

fn is_false(value: &bool) -> bool {
    !*value
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

impl<'a> Request<'a> {
    /// A request for `ops` with no presentation, of this crate's [`PROTOCOL_VERSION`], with
    /// no request id.
    ///
    /// # Examples
    ///
    /// ```
    /// let mut request = khived::Request::new("status", "khive", "");
    /// assert!(!request.probe);
    /// request.presentation = Some("json".into());
    /// request.request_id = Some(7);
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
            protocol_version: PROTOCOL_VERSION,
            request_id: None,
            probe_only: false,
        }
    }

    /// A probe: never dispatched, answered with the daemon's [`ProbeInfo`] whatever its
    /// namespace and configuration.
    ///
    /// # Examples
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

/// Decoded by hand rather than derived: a request is a JSON object (the derived decoder also
/// takes an array of the field values, which no client sends), and the daemon's binary holds
/// this one decoder only. Unknown fields are skipped; a missing field takes its default
/// (PROTOCOL.md, "Requests"); the error messages are serde's own.
impl<'de: 'a, 'a> Deserialize<'de> for Request<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(RequestVisitor(std::marker::PhantomData))
    }
}

struct RequestVisitor<'a>(std::marker::PhantomData<Request<'a>>);

impl<'de: 'a, 'a> serde::de::Visitor<'de> for RequestVisitor<'a> {
    type Value = Request<'a>;

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("a request object")
    }

    fn visit_map<M: serde::de::MapAccess<'de>>(self, mut map: M) -> Result<Request<'a>, M::Error> {
        use serde::de::Error;
        let (mut ops, mut namespace) = (None, None);
        let mut request = Request::new("", "", "");
        request.protocol_version = 0;
        // Which fields were seen, by their place in REQUEST_FIELDS, to refuse one given twice.
        let mut seen = 0u16;
        while let Some(key) = map.next_key::<Text<'a>>()? {
            let Some(field) = REQUEST_FIELDS.iter().position(|name| *name == key.0) else {
                map.next_value::<serde::de::IgnoredAny>()?;
                continue;
            };
            if seen & (1 << field) != 0 {
                return Err(M::Error::duplicate_field(REQUEST_FIELDS[field]));
            }
            seen |= 1 << field;
            match field {
                0 => ops = Some(map.next_value::<Text<'a>>()?.0),
                1 => request.presentation = map.next_value::<Option<Text<'a>>>()?.map(|t| t.0),
                2 => request.presentation_per_op = map.next_value()?,
                3 => namespace = Some(map.next_value::<Text<'a>>()?.0),
                4 => request.config_id = map.next_value::<Text<'a>>()?.0,
                5 => request.probe = map.next_value()?,
                6 => request.protocol_version = map.next_value()?,
                7 => request.request_id = map.next_value()?,
                _ => request.probe_only = map.next_value()?,
            }
        }
        request.ops = ops.ok_or_else(|| M::Error::missing_field("ops"))?;
        request.namespace = namespace.ok_or_else(|| M::Error::missing_field("namespace"))?;
        Ok(request)
    }
}

/// The fields of a request, by their names on the wire.
const REQUEST_FIELDS: [&str; 9] = [
    "ops",
    "presentation",
    "presentation_per_op",
    "namespace",
    "config_id",
    "probe",
    "protocol_version",
    "request_id",
    "probe_only",
];

/// A string that borrows from the frame when JSON allows (no escapes in it).
struct Text<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(TextVisitor(std::marker::PhantomData))
    }
}

struct TextVisitor<'a>(std::marker::PhantomData<Text<'a>>);

impl<'de: 'a, 'a> serde::de::Visitor<'de> for TextVisitor<'a> {
    type Value = Text<'a>;

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("a string")
    }

    fn visit_borrowed_str<E>(self, text: &'de str) -> Result<Text<'a>, E> {
        Ok(Text(Cow::Borrowed(text)))
    }

    fn visit_str<E>(self, text: &str) -> Result<Text<'a>, E> {
        Ok(Text(Cow::Owned(text.to_owned())))
    }

    fn visit_string<E>(self, text: String) -> Result<Text<'a>, E> {
        Ok(Text(Cow::Owned(text)))
    }
}

/// The daemon's answer to one request.
///
/// `#[non_exhaustive]`, like [`Request`]: build one with [`Response::ok`],
/// [`Response::error`] or [`Response::default`] and set fields afterwards. A missing field
/// decodes as an older daemon meant it (PROTOCOL.md, "Responses"): no
/// `daemon_protocol_version` is version 0, and such a daemon sends no request ids and no
/// `error_detail`.
///
/// # Examples
///
/// ```
/// // Older daemons omit `config_mismatch`, `served_config_id` and the version 1 fields.
/// let old: khived::Response = serde_json::from_str(
///     r#"{"ok":true,"result":"hi","error":null,"namespace_mismatch":false}"#,
/// ).unwrap();
/// assert!(!old.config_mismatch);
/// assert_eq!(old.served_config_id, None);
/// assert_eq!(old.daemon_protocol_version, 0);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Response {
    /// Whether the request was dispatched (or probed) and succeeded.
    pub ok: bool,
    /// The dispatcher's result, when `ok`.
    #[serde(default)]
    pub result: Option<String>,
    /// What went wrong, as text, when the dispatcher or the runtime failed (the texts of
    /// version 0; programs branch on [`error_detail`](Response::error_detail) instead).
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
    /// The protocol version the daemon speaks, on every response of a version 1 daemon;
    /// 0 (missing) from an older one.
    #[serde(default)]
    pub daemon_protocol_version: u64,
    /// The request's `protocol_version` is above the daemon's; nothing was dispatched.
    #[serde(default)]
    pub version_mismatch: bool,
    /// The request's `request_id`, on every response to a frame that carried one and could
    /// be parsed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<u64>,
    /// What went wrong, for programs: on every error response of a version 1 daemon.
    #[serde(default)]
    pub error_detail: Option<ErrorDetail>,
}

impl Response {
    /// A successful response carrying the dispatcher's `result`, as this crate's daemon sends
    /// it (with [`PROTOCOL_VERSION`]).
    ///
    /// # Examples
    ///
    /// ```
    /// let response = khived::Response::ok("hello", "cfg-1");
    /// assert!(response.ok);
    /// assert_eq!(response.result.as_deref(), Some("hello"));
    /// assert_eq!(response.served_config_id.as_deref(), Some("cfg-1"));
    /// assert_eq!(response.daemon_protocol_version, khived::PROTOCOL_VERSION);
    /// ```
    pub fn ok(result: impl Into<String>, served_config_id: &str) -> Self {
        Response {
            ok: true,
            result: Some(result.into()),
            ..Response::served(served_config_id)
        }
    }

    /// A failed response: `error` holds the detail's message, `error_detail` the detail.
    ///
    /// # Examples
    ///
    /// ```
    /// use khived::{code, Disposition, ErrorDetail, Response};
    ///
    /// let detail = ErrorDetail::new(code::BAD_REQUEST, "bad request: expected value",
    ///                               Disposition::NotCommitted);
    /// let response = Response::error(detail, "cfg-1");
    /// assert!(!response.ok);
    /// assert_eq!(response.error.as_deref(), Some("bad request: expected value"));
    /// assert_eq!(response.error_code(), Some("bad_request"));
    /// assert_eq!(response.served_config_id.as_deref(), Some("cfg-1"));
    /// ```
    pub fn error(detail: ErrorDetail, served_config_id: &str) -> Self {
        Response {
            error: Some(detail.message.clone()),
            error_detail: Some(detail),
            ..Response::served(served_config_id)
        }
    }

    /// A response that is neither ok nor an error yet, from a daemon of this version.
    pub(crate) fn served(served_config_id: &str) -> Self {
        Response {
            served_config_id: Some(served_config_id.to_owned()),
            daemon_protocol_version: PROTOCOL_VERSION,
            ..Response::default()
        }
    }

    /// The error's code ([`code`](mod@code)), if this is an error response of a version 1
    /// daemon.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(khived::Response::ok("x", "").error_code(), None);
    /// ```
    pub fn error_code(&self) -> Option<&str> {
        self.error_detail
            .as_ref()
            .map(|detail| detail.code.as_str())
    }

    /// Whether the daemon refused the request only for now, without running it: the codes
    /// [`DAEMON_BUSY`](code::DAEMON_BUSY) and [`DAEMON_DRAINING`](code::DAEMON_DRAINING).
    /// Sending the same request again later is safe.
    ///
    /// # Examples
    ///
    /// ```
    /// use khived::{code, Disposition, ErrorDetail, Response};
    ///
    /// let message = "daemon_busy: 512 connections open; try again shortly";
    /// let busy = ErrorDetail::new(code::DAEMON_BUSY, message, Disposition::NotCommitted);
    /// assert!(Response::error(busy, "").is_retryable());
    /// ```
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.error_code(),
            Some(code::DAEMON_BUSY | code::DAEMON_DRAINING)
        )
    }
}

/// The structured form of an error response (PROTOCOL.md, "Errors"): a stable code to branch
/// on, the message (the same text as [`Response::error`](Response#structfield.error)), and
/// whether the request may have had an effect.
///
/// # Examples
///
/// ```
/// let text = r#"{"code":"daemon_busy","message":"daemon_busy: 512 connections open",
///                "disposition":"not_committed"}"#;
/// let detail: khived::ErrorDetail = serde_json::from_str(text).unwrap();
/// assert_eq!(detail.code, khived::code::DAEMON_BUSY);
/// assert_eq!(detail.disposition, khived::Disposition::NotCommitted);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ErrorDetail {
    /// One of the runtime's [`code`](mod@code)s, or a code of the dispatcher's own.
    pub code: String,
    /// What went wrong, for people.
    pub message: String,
    /// Whether the request may have had an effect.
    pub disposition: Disposition,
}

impl ErrorDetail {
    /// An error detail from its three parts.
    pub fn new(
        code: impl Into<String>,
        message: impl Into<String>,
        disposition: Disposition,
    ) -> Self {
        ErrorDetail {
            code: code.into(),
            message: message.into(),
            disposition,
        }
    }
}

/// Whether a failed request may have had an effect, so whether sending it again is safe.
///
/// A disposition this version does not know decodes as [`Unknown`](Disposition::Unknown),
/// the cautious reading.
///
/// # Examples
///
/// ```
/// use khived::Disposition;
///
/// let known: Disposition = serde_json::from_str(r#""not_committed""#).unwrap();
/// assert_eq!(known, Disposition::NotCommitted);
/// let newer: Disposition = serde_json::from_str(r#""committed""#).unwrap();
/// assert_eq!(newer, Disposition::Unknown);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Disposition {
    /// The dispatcher never ran (or says it changed nothing): retrying is safe.
    NotCommitted,
    /// The dispatcher ran, or may have: the outcome is not known.
    #[serde(other)]
    Unknown,
}

/// The stable error codes of the runtime, found in [`ErrorDetail::code`]
/// (PROTOCOL.md, "Errors: codes and dispositions").
///
/// A dispatcher may use codes of its own for its errors;
/// [`DISPATCHER_ERROR`](code::DISPATCHER_ERROR) is the code of a dispatcher's error that names
/// none.
pub mod code {
    /// The frame is not a valid request, was cut short, or did not arrive in time; the
    /// connection is closed. Not committed.
    pub const BAD_REQUEST: &str = "bad_request";
    /// The frame's header announces more than [`MAX_FRAME_BYTES`](crate::MAX_FRAME_BYTES);
    /// the body is not read and the connection is closed. Not committed.
    pub const FRAME_TOO_LARGE: &str = "frame_too_large";
    /// The dispatcher's answer does not fit in a frame, or the frame memory budget had no
    /// room for it before the write deadline. The outcome is unknown.
    pub const RESPONSE_TOO_LARGE: &str = "response_too_large";
    /// The request's `protocol_version` is newer than the daemon's. Not committed.
    pub const VERSION_MISMATCH: &str = "version_mismatch";
    /// The daemon is at its connection cap, its queue is full, or the frame memory budget
    /// had no room for the request in time: try again shortly. Not committed.
    pub const DAEMON_BUSY: &str = "daemon_busy";
    /// The daemon is shutting down and did not start this request: retry (a new daemon may
    /// be starting). Not committed.
    pub const DAEMON_DRAINING: &str = "daemon_draining";
    /// The dispatch ran past the daemon's request timeout and was cancelled. The outcome is
    /// unknown.
    pub const REQUEST_TIMED_OUT: &str = "request_timed_out";
    /// The dispatcher panicked. The outcome is unknown.
    pub const DISPATCHER_PANICKED: &str = "dispatcher_panicked";
    /// The dispatcher returned an error without a code of its own. The outcome is unknown
    /// unless the dispatcher declared it not committed.
    pub const DISPATCHER_ERROR: &str = "dispatcher_error";
}

/// What a daemon says about itself in answer to a probe ([`Request::probe`]); the response's
/// `result` holds this object as JSON text.
///
/// Clients decode it (see [`Client::probe`](crate::Client::probe)); it is
/// `#[non_exhaustive]` because later versions may report more.
///
/// # Examples
///
/// ```
/// let text = r#"{"pid":7,"namespace":"khive","config_id":"c","version":"0.1.0",
///                "uptime_ms":5,"in_flight":1,"served":2}"#;
/// let info: khived::ProbeInfo = serde_json::from_str(text).unwrap();
/// assert_eq!(info.pid, 7);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
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
    /// Requests waiting for a dispatch thread at the moment of the probe (0 from daemons that
    /// do not say).
    #[serde(default)]
    pub waiting: u64,
    /// Threads running the daemon's connections and dispatches at the moment of the probe:
    /// the caller's and those started while dispatches compute (0 from daemons that do not
    /// say).
    #[serde(default)]
    pub threads: u64,
}

/// Checks a frame header and returns the body length it announces.
///
/// # Errors
///
/// A length above [`MAX_FRAME_BYTES`] is [`io::ErrorKind::InvalidData`], `frame too large: …`.
///
/// # Examples
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

/// A frame decoder without I/O: it holds the bytes read so far, says where to read the next
/// ones, and hands out each frame body once it is whole.
///
/// Both sides of khived read through it: [`read_frame`] on the client's side, and the daemon
/// for every request. Whoever does the reading, the decoder keeps the same promises:
///
/// - A header above [`MAX_FRAME_BYTES`] is refused ([`decode`](Self::decode) fails) before any
///   room for its body is made.
/// - The buffer grows only as bytes arrive, never more than 64 KiB beyond them: a peer that
///   announces 8 MiB and then sends nothing costs 64 KiB, not 8 MiB.
/// - Several frames may arrive in one read; they are decoded one after the other.
/// - Once every buffered frame is consumed, a buffer grown above 64 KiB for a large frame is
///   released, so a long-lived connection does not keep it. On Linux its pages are handed
///   back to the system first, whatever the allocator would keep.
///
/// # Examples
///
/// Reading frames from any [`std::io::Read`]; an async reader is used the same way.
///
/// ```
/// use std::io::Read;
///
/// // Two frames, `{}` and `[]`, as they might arrive on a socket.
/// let mut socket: &[u8] = &[0, 0, 0, 2, b'{', b'}', 0, 0, 0, 2, b'[', b']'];
/// let mut decoder = khived::FrameDecoder::new();
/// let mut bodies = Vec::new();
/// loop {
///     if let Some(body) = decoder.decode()? {
///         bodies.push(body.to_vec());
///         decoder.consume();
///         continue;
///     }
///     let read = socket.read(decoder.read_buf())?;
///     if read == 0 {
///         // Fails if the stream ended inside a frame.
///         decoder.finish()?;
///         break;
///     }
///     decoder.filled(read);
/// }
/// assert_eq!(bodies, [b"{}", b"[]"]);
/// # std::io::Result::Ok(())
/// ```
#[derive(Default)]
pub struct FrameDecoder {
    /// Bytes read so far; `start..end` holds those not yet consumed. `end..len` is room for
    /// `read_buf`, initialized (zeroed when it grew); `read_from` reads into the spare
    /// capacity beyond `len`.
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl FrameDecoder {
    /// An empty decoder; it allocates nothing until the first read.
    pub const fn new() -> Self {
        FrameDecoder {
            buf: Vec::new(),
            start: 0,
            end: 0,
        }
    }

    /// The body of the next frame, once it has arrived whole; `Ok(None)` until then.
    ///
    /// The frame stays buffered until [`consume`](Self::consume): calling `decode` again
    /// returns it again.
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::InvalidData`] when the frame's header announces more than
    /// [`MAX_FRAME_BYTES`] (`frame too large: N bytes (limit M)`). The stream cannot be
    /// trusted after that: close it.
    pub fn decode(&self) -> io::Result<Option<&[u8]>> {
        let buffered = &self.buf[self.start..self.end];
        let Some(header) = buffered.first_chunk::<4>() else {
            return Ok(None);
        };
        let len = frame_len(*header)?;
        Ok(buffered.get(4..4 + len))
    }

    /// Drops the frame [`decode`](Self::decode) returned; the next call decodes the one after
    /// it. Does nothing while no whole frame is buffered.
    pub fn consume(&mut self) {
        let Ok(Some(body)) = self.decode() else {
            return;
        };
        self.start += 4 + body.len();
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            // Do not keep a large frame's buffer for the rest of a long-lived connection
            // (nor, in the daemon, the frame memory budget it was charged).
            if self.buf.capacity() > READ_CHUNK {
                crate::pages::release(std::mem::take(&mut self.buf));
            }
        }
    }

    /// Room for the next read, which may take in the frames after this one too: for a reader
    /// that keeps the decoder for the whole stream, as the daemon does for a connection.
    ///
    /// The room is never empty while the next frame is incomplete (and its header within the
    /// cap). It is 4 KiB at first, and grows towards the size of the frame being read but
    /// never to more than 64 KiB beyond the bytes buffered.
    pub fn read_buf(&mut self) -> &mut [u8] {
        let needed = self.needed();
        self.make_room(needed, INITIAL_BUFFER);
        &mut self.buf[self.end..]
    }

    /// Room for the next read that ends where the frame being read ends: for a reader that
    /// must leave the bytes after a frame in the stream, as [`read_frame`] does.
    ///
    /// Empty only when a whole frame is buffered or its header is above the cap, that is when
    /// [`decode`](Self::decode) has something to say.
    pub fn read_buf_in_frame(&mut self) -> &mut [u8] {
        let needed = self.needed();
        self.make_room(needed, 0);
        let frame_end = (self.start + needed).min(self.buf.len()).max(self.end);
        &mut self.buf[self.end..frame_end]
    }

    /// Reads once from `fd` into the buffer's spare capacity and records what arrived;
    /// `Ok(0)` is the end of the stream. For the daemon, which calls it only while the frame
    /// at the front is incomplete.
    ///
    /// The kernel writes into the spare capacity directly, so nothing is zeroed first (as
    /// [`read_buf`](Self::read_buf) must: 4 KiB per connection, up to 64 KiB per read of a
    /// large frame). The capacity grows as `read_buf`'s room does (4 KiB at first, towards
    /// the frame being read, at most 64 KiB beyond the bytes buffered), unless
    /// [`reserve_frame`](Self::reserve_frame) reserved the whole frame: one read may then
    /// take in as much of it as has arrived.
    pub(crate) fn read_from(&mut self, fd: impl std::os::fd::AsFd) -> io::Result<usize> {
        // The room is the spare capacity; zeroed room left by `read_buf` is given up.
        self.buf.truncate(self.end);
        if self.buf.capacity() == self.end {
            let needed = self.needed();
            self.compact();
            self.buf.truncate(self.end);
            let target = needed.max(INITIAL_BUFFER).min(self.end + READ_CHUNK);
            // Room even with a whole frame at the front (which the caller should have taken
            // first): a read into no room would look like the end of the stream.
            let room = match target.saturating_sub(self.end) {
                0 => INITIAL_BUFFER,
                room => room,
            };
            self.buf.reserve_exact(room);
        }
        let read = rustix::io::read(fd, rustix::buffer::spare_capacity(&mut self.buf))?;
        self.end = self.buf.len();
        Ok(read)
    }

    /// Records that the last read put `n` bytes at the start of the room it was given.
    ///
    /// # Panics
    ///
    /// If `n` is larger than the room [`read_buf`](Self::read_buf) or
    /// [`read_buf_in_frame`](Self::read_buf_in_frame) returned.
    pub fn filled(&mut self, n: usize) {
        assert!(
            n <= self.buf.len() - self.end,
            "FrameDecoder::filled: {n} bytes read into {} bytes of room",
            self.buf.len() - self.end
        );
        self.end += n;
    }

    /// How many bytes are buffered and not yet consumed.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Says whether the stream may end here: `Ok` if nothing is buffered (the peer closed
    /// between frames), or else the error for a stream cut inside a frame.
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::UnexpectedEof`] naming how far the frame got, as in `connection closed
    /// inside a frame body (6 of 20 bytes)`.
    pub fn finish(&self) -> io::Result<()> {
        let buffered = self.buffered();
        let message = match self.buf[self.start..self.end].first_chunk::<4>() {
            _ if buffered == 0 => return Ok(()),
            None => format!("connection closed inside a frame header ({buffered} of 4 bytes)"),
            Some(header) => format!(
                "connection closed inside a frame body ({} of {} bytes)",
                buffered - 4,
                u32::from_be_bytes(*header)
            ),
        };
        Err(io::Error::new(io::ErrorKind::UnexpectedEof, message))
    }

    /// The error for a stream that ended before the one frame a reader wanted was whole:
    /// inside the frame (as [`finish`](Self::finish) says), or before it.
    pub(crate) fn cut_short(&self) -> io::Error {
        match self.finish() {
            Err(e) => e,
            Ok(()) => io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before a frame",
            ),
        }
    }

    /// The bytes the buffer holds room for, read or not.
    pub(crate) fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// The most the buffer will hold while the frame at the front is read through
    /// [`read_buf`](Self::read_buf) or [`read_from`](Self::read_from): the daemon takes
    /// this much from its frame memory budget before it reads on.
    pub(crate) fn capacity_for_frame(&self) -> usize {
        self.capacity().max(self.needed()).max(INITIAL_BUFFER)
    }

    /// Allocates room for the whole frame at the front at once, for a reader that has paid
    /// for it (the daemon, from its budget). The room is reserved, not written: pages the
    /// system has not handed out yet are only paid for in memory as bytes arrive, since
    /// [`read_from`](Self::read_from) lets the kernel write into the reserved room itself.
    /// One allocation instead of one per 64 KiB also leaves no trail of freed blocks behind.
    pub(crate) fn reserve_frame(&mut self) {
        if self.start > 0 {
            self.compact();
            self.buf.truncate(self.end);
        }
        let needed = self.needed();
        if needed > self.buf.capacity() {
            self.buf.reserve_exact(needed - self.buf.len());
        }
    }

    /// Moves the bytes not yet consumed to the front of the buffer.
    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
    }

    /// The whole frame at the front, header included, takes this many bytes; at least 4.
    fn needed(&self) -> usize {
        match self.buf[self.start..self.end].first_chunk::<4>() {
            // A header above the cap never gets room for its body.
            Some(header) => 4 + frame_len(*header).unwrap_or(0),
            None => 4,
        }
    }

    /// Makes room to read into, growing the buffer towards a frame of `needed` bytes (or at
    /// least `minimum`) but never more than [`READ_CHUNK`] beyond what has arrived.
    fn make_room(&mut self, needed: usize, minimum: usize) {
        if self.end < self.buf.len() {
            return;
        }
        self.compact();
        let target = needed.max(minimum).min(self.end + READ_CHUNK);
        if target > self.buf.len() {
            self.buf.reserve_exact(target - self.buf.len());
            self.buf.resize(target, 0);
        }
    }

    /// The body of the one whole frame buffered, without copying it when it starts the buffer.
    pub(crate) fn into_body(mut self) -> Vec<u8> {
        let len = self.decode().ok().flatten().map_or(0, <[u8]>::len);
        let body = self.start + 4..self.start + 4 + len;
        if self.start != 0 {
            return self.buf[body].to_vec();
        }
        let mut buf = std::mem::take(&mut self.buf);
        buf.truncate(body.end);
        buf.drain(..4);
        buf
    }
}

impl Drop for FrameDecoder {
    fn drop(&mut self) {
        crate::pages::release(std::mem::take(&mut self.buf));
    }
}

impl std::fmt::Debug for FrameDecoder {
    // The buffer's bytes would make a frame of several megabytes unreadable in a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameDecoder")
            .field("buffered", &self.buffered())
            .field("room", &(self.buf.len() - self.end))
            .finish()
    }
}

/// Reads one frame and returns its body.
///
/// The body buffer grows only as bytes arrive, at most 64 KiB ahead of them: a header that
/// announces 8 MiB followed by silence costs 64 KiB, not 8 MiB (see [`FrameDecoder`], which
/// does the decoding). Nothing past the frame is read from `reader`. End of stream anywhere,
/// including before the first header byte, is an [`io::ErrorKind::UnexpectedEof`] error.
///
/// # Errors
///
/// [`io::ErrorKind::UnexpectedEof`] at the end of the stream, with a message saying where in
/// the frame it came; [`io::ErrorKind::InvalidData`] for a header above
/// [`MAX_FRAME_BYTES`]; any error of `reader`.
///
/// # Examples
///
/// ```
/// # futures_lite::future::block_on(async {
/// let mut wire: &[u8] = &[0, 0, 0, 2, b'{', b'}'];
/// assert_eq!(khived::read_frame(&mut wire).await?, b"{}");
/// # std::io::Result::Ok(()) }).unwrap();
/// ```
pub async fn read_frame<R: AsyncRead + Unpin + ?Sized>(reader: &mut R) -> io::Result<Vec<u8>> {
    let mut decoder = FrameDecoder::new();
    loop {
        if decoder.decode()?.is_some() {
            return Ok(decoder.into_body());
        }
        match reader.read(decoder.read_buf_in_frame()).await {
            Ok(0) => return Err(decoder.cut_short()),
            Ok(n) => decoder.filled(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// One encoded frame, header and body, ready to be written: made by [`encode_frame`] (a
/// message as JSON) or [`Frame::from_body`] (bytes as they are), written by [`write_frame`].
///
/// The header is part of the value, and a `Frame` is not a byte slice: it cannot be handed
/// by mistake to something that adds a header of its own, and [`write_frame`] accepts
/// nothing else.
///
/// # Examples
///
/// ```
/// let frame = khived::Frame::from_body(b"{}".to_vec()).unwrap();
/// assert_eq!(frame.as_bytes(), [0, 0, 0, 2, b'{', b'}']);
/// assert_eq!(frame.body(), b"{}");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The 4-byte header, then the body.
    bytes: Vec<u8>,
}

impl Frame {
    /// A frame holding `body` as it is (which need not be JSON, for tests of a peer).
    ///
    /// # Errors
    ///
    /// A body above [`MAX_FRAME_BYTES`] is [`io::ErrorKind::InvalidData`],
    /// `frame too large: …`.
    pub fn from_body(body: impl AsRef<[u8]>) -> io::Result<Frame> {
        let body = body.as_ref();
        if body.len() > MAX_FRAME_BYTES {
            return Err(too_large("frame", body.len()));
        }
        let mut bytes = Vec::with_capacity(4 + body.len());
        bytes.extend_from_slice(&(body.len() as u32).to_be_bytes());
        bytes.extend_from_slice(body);
        Ok(Frame { bytes })
    }

    /// The frame as it goes on the wire: header, then body.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The body alone, without the header.
    pub fn body(&self) -> &[u8] {
        &self.bytes[4..]
    }

    /// The frame's bytes, header included, to write to a stream in one piece.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

/// Writes `frame` (header and body in one write) and flushes.
///
/// # Errors
///
/// Any error of `writer`.
///
/// # Examples
///
/// ```
/// # futures_lite::future::block_on(async {
/// let mut wire = Vec::new();
/// let frame = khived::encode_frame(&khived::Request::probe())?;
/// khived::write_frame(&mut wire, &frame).await?;
/// assert_eq!(wire, frame.as_bytes());
/// # std::io::Result::Ok(()) }).unwrap();
/// ```
pub async fn write_frame<W: AsyncWrite + Unpin + ?Sized>(
    writer: &mut W,
    frame: &Frame,
) -> io::Result<()> {
    writer.write_all(&frame.bytes).await?;
    writer.flush().await
}

/// Encodes `message` as JSON in a complete [`Frame`], header included, ready for
/// [`write_frame`].
///
/// # Errors
///
/// `message` cannot be serialized as JSON, or its JSON is above [`MAX_FRAME_BYTES`]
/// ([`io::ErrorKind::InvalidData`], `frame too large: …`).
///
/// # Examples
///
/// ```
/// let frame = khived::encode_frame(&khived::Request::probe()).unwrap();
/// let len = u32::from_be_bytes(frame.as_bytes()[..4].try_into().unwrap()) as usize;
/// assert_eq!(len, frame.body().len());
/// ```
pub fn encode_frame<T: Serialize + ?Sized>(message: &T) -> io::Result<Frame> {
    let mut bytes = Vec::with_capacity(128);
    encode_frame_into(&mut bytes, &Json(message), "frame")?;
    Ok(Frame { bytes })
}

/// A message that can be written as a frame's JSON body.
pub(crate) trait Body {
    /// Writes the message's JSON to `out`.
    fn write_json(&self, out: &mut Capped<'_>) -> io::Result<()>;
}

/// Any serializable message, written by serde_json.
pub(crate) struct Json<'a, T: ?Sized>(pub(crate) &'a T);

impl<T: Serialize + ?Sized> Body for Json<'_, T> {
    fn write_json(&self, out: &mut Capped<'_>) -> io::Result<()> {
        Ok(serde_json::to_writer(out, self.0)?)
    }
}

/// Written by hand, byte for byte what serde_json writes for the derived `Serialize` (a test
/// compares the two): the daemon writes a response for every request, and serde's writer
/// made about sixty small writes of each (every key, quote, colon and comma) where this makes
/// about twenty. It was the largest part of a quick request's instructions.
impl Body for Response {
    fn write_json(&self, out: &mut Capped<'_>) -> io::Result<()> {
        // Every field by name, so that a field added to `Response` fails to compile here.
        let Response {
            ok,
            result,
            error,
            namespace_mismatch,
            config_mismatch,
            served_config_id,
            daemon_protocol_version,
            version_mismatch,
            request_id,
            error_detail,
        } = self;
        // A flag and the key after it are one write: each write costs a call and a copy.
        out.put(match ok {
            true => b"{\"ok\":true,\"result\":",
            false => b"{\"ok\":false,\"result\":",
        });
        out.text_or_null(result.as_deref());
        out.put(b",\"error\":");
        out.text_or_null(error.as_deref());
        out.put(match namespace_mismatch {
            true => b",\"namespace_mismatch\":true,\"config_mismatch\":",
            false => b",\"namespace_mismatch\":false,\"config_mismatch\":",
        });
        out.put(match config_mismatch {
            true => b"true,\"served_config_id\":",
            false => b"false,\"served_config_id\":",
        });
        out.text_or_null(served_config_id.as_deref());
        out.put(b",\"daemon_protocol_version\":");
        out.number(*daemon_protocol_version);
        out.put(match version_mismatch {
            true => b",\"version_mismatch\":true",
            false => b",\"version_mismatch\":false",
        });
        if let Some(id) = request_id {
            out.put(b",\"request_id\":");
            out.number(*id);
        }
        match error_detail {
            Some(ErrorDetail {
                code,
                message,
                disposition,
            }) => {
                out.put(b",\"error_detail\":{\"code\":");
                out.text(code);
                out.put(b",\"message\":");
                out.text(message);
                out.put(match disposition {
                    Disposition::NotCommitted => b",\"disposition\":\"not_committed\"}}",
                    Disposition::Unknown => b",\"disposition\":\"unknown\"}}",
                });
            }
            None => out.put(b",\"error_detail\":null}"),
        }
        Ok(())
    }
}

/// Whether a message fit in the room [`encode_frame_within`] was given.
pub(crate) enum Within {
    /// It is in the buffer.
    Fits,
    /// Its JSON body takes this many bytes, more than the room; nothing was kept.
    TooLarge(usize),
}

/// Encodes `message` as a frame into the empty `out` if the frame takes at most `limit`
/// bytes, without `out` ever growing past `limit`; else leaves `out` empty and says how long
/// the body is, so that the caller can make room first.
///
/// # Errors
///
/// `message` cannot be serialized as JSON.
pub(crate) fn encode_frame_within<B: Body + ?Sized>(
    out: &mut Vec<u8>,
    message: &B,
    limit: usize,
) -> io::Result<Within> {
    debug_assert!(out.is_empty());
    out.extend_from_slice(&[0; 4]);
    let mut capped = Capped {
        out: &mut *out,
        limit,
        len: 4,
    };
    let written = message.write_json(&mut capped);
    let len = capped.len - 4;
    if let Err(e) = written {
        out.clear();
        return Err(e);
    }
    if capped.len > limit {
        out.clear();
        return Ok(Within::TooLarge(len));
    }
    out[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(Within::Fits)
}

/// A writer into a vector that never grows it past `limit` bytes: past it, it only counts.
/// (One writer type for both functions, so that each message's writer is compiled once.)
pub(crate) struct Capped<'a> {
    out: &'a mut Vec<u8>,
    limit: usize,
    /// Bytes written, kept or not.
    len: usize,
}

impl Capped<'_> {
    fn put(&mut self, bytes: &[u8]) {
        self.len += bytes.len();
        if self.len > self.limit {
            return;
        }
        if self.len > self.out.capacity() {
            // Doubling as a vector does, from a size most responses fit in, but never past
            // the limit.
            let capacity = self
                .len
                .max(2 * self.out.capacity())
                .max(512)
                .min(self.limit);
            self.out.reserve_exact(capacity - self.out.len());
        }
        self.out.extend_from_slice(bytes);
    }

    fn number(&mut self, value: u64) {
        self.put(itoa::Buffer::new().format(value).as_bytes());
    }

    fn text_or_null(&mut self, text: Option<&str>) {
        match text {
            Some(text) => self.text(text),
            None => self.put(b"null"),
        }
    }

    /// `text` as a JSON string, escaped as serde_json escapes it: quote, backslash and the
    /// control characters, nothing else.
    fn text(&mut self, text: &str) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let bytes = text.as_bytes();
        // Most text has nothing to escape: it is looked at eight bytes at a time, and the
        // escaping starts at the first eight that need it.
        let clean = bytes
            .chunks_exact(8)
            .take_while(|eight| !any_escaped(u64::from_ne_bytes((*eight).try_into().unwrap())))
            .count()
            * 8;
        self.put(b"\"");
        let mut plain = 0;
        for (i, &byte) in bytes.iter().enumerate().skip(clean) {
            let short = match byte {
                b'"' | b'\\' => byte,
                b'\n' => b'n',
                b'\r' => b'r',
                b'\t' => b't',
                0x08 => b'b',
                0x0c => b'f',
                0..0x20 => 0,
                _ => continue,
            };
            self.put(&bytes[plain..i]);
            if short != 0 {
                self.put(&[b'\\', short]);
            } else {
                let (high, low) = (HEX[usize::from(byte >> 4)], HEX[usize::from(byte & 15)]);
                self.put(&[b'\\', b'u', b'0', b'0', high, low]);
            }
            plain = i + 1;
        }
        self.put(&bytes[plain..]);
        self.put(b"\"");
    }
}

/// Whether any of the eight bytes of `word` must be escaped in JSON text: a control character
/// (below 0x20), a quote or a backslash. Exact, with a word's arithmetic ("Bit Twiddling
/// Hacks", `hasless`): subtracting `n` from every byte borrows into a byte's top bit, where the
/// byte itself has it clear, only if some byte is below `n`.
fn any_escaped(word: u64) -> bool {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const TOPS: u64 = u64::from_ne_bytes([0x80; 8]);
    let below = |word: u64, n: u8| word.wrapping_sub(ONES * u64::from(n)) & !word & TOPS;
    // A byte equal to `c` is a zero byte of `word ^ c`, below 1.
    below(word, 0x20) | below(word ^ (ONES * 0x22), 1) | below(word ^ (ONES * 0x5c), 1) != 0
}

impl io::Write for Capped<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.put(buf);
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.put(buf);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Appends `message` as a frame to `out`; on error `out` is left as it was. `what` names
/// the message in the error for a body above the cap.
pub(crate) fn encode_frame_into<B: Body + ?Sized>(
    out: &mut Vec<u8>,
    message: &B,
    what: &str,
) -> io::Result<()> {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    // Through the same writer type as `encode_frame_within`, so that a message type is
    // written by one compiled copy of its code.
    let mut unlimited = Capped {
        out: &mut *out,
        limit: usize::MAX,
        len: start + 4,
    };
    if let Err(e) = message.write_json(&mut unlimited) {
        out.truncate(start);
        return Err(e);
    }
    let len = out.len() - start - 4;
    if len > MAX_FRAME_BYTES {
        out.truncate(start);
        return Err(too_large(what, len));
    }
    out[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(json: &str) -> Result<Request<'_>, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    /// The word test of the response writer against the byte test it stands for.
    #[test]
    fn eight_bytes_need_escaping_exactly_when_one_of_them_does() {
        let escaped = |byte: u8| byte < 0x20 || byte == b'"' || byte == b'\\';
        // Every byte in every place, among neighbours that need no escape, close to the
        // three bounds the test has and far from them.
        for byte in 0..=u8::MAX {
            for place in 0..8 {
                for filler in [0x20, 0x21, 0x23, 0x5b, 0x5d, 0x7f, 0x80, 0xff] {
                    let mut eight = [filler; 8];
                    eight[place] = byte;
                    assert_eq!(
                        any_escaped(u64::from_ne_bytes(eight)),
                        escaped(byte),
                        "{eight:?}"
                    );
                }
            }
        }
        // Mixed words, from a fixed xorshift sequence.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..1_000_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let eight = state.to_ne_bytes();
            assert_eq!(
                any_escaped(state),
                eight.iter().any(|&b| escaped(b)),
                "{eight:?}"
            );
        }
    }

    /// The hand-written response writer against serde_json's writer for the derived
    /// `Serialize`: the same bytes for every field's values, every character escaped or not.
    #[test]
    fn a_response_is_written_byte_for_byte_as_serde_json_writes_it() {
        let mut texts: Vec<String> = (0..=0x7f_u8).map(|b| char::from(b).to_string()).collect();
        texts.push((0..=0x7f_u8).map(char::from).collect());
        texts.extend(
            [
                "",
                "plain",
                "é€😀\u{7f}\u{80}\u{2028}",
                "\"\"\\\n\u{1}x\u{1f}",
            ]
            .map(String::from),
        );
        // Long enough for whole chunks of clean text before the first escape, and after.
        for before in [15, 16, 17, 31, 32, 33, 48] {
            for escape in ["\"", "\\", "\n", "\u{0}", "\u{1f}"] {
                texts.push(format!("{}{escape}{}", "a".repeat(before), "é".repeat(20)));
            }
        }
        texts.push("€".repeat(40));
        let details = [
            None,
            Some(ErrorDetail::new(
                "daemon_busy",
                "busy \"now\"\n",
                Disposition::NotCommitted,
            )),
            Some(ErrorDetail::new("", "", Disposition::Unknown)),
        ];
        let mut responses = Vec::new();
        for (i, text) in texts.iter().enumerate() {
            let mut response = Response::ok(text.as_str(), text);
            response.error = (i % 2 == 0).then(|| text.clone());
            response.ok = i % 3 == 0;
            response.namespace_mismatch = i % 5 == 0;
            response.config_mismatch = i % 7 == 0;
            response.version_mismatch = i % 11 == 0;
            response.request_id = [None, Some(0), Some(u64::MAX)][i % 3];
            response.daemon_protocol_version = [0, 1, u64::MAX, 42][i % 4];
            response.error_detail = details[i % 3].clone();
            if let Some(detail) = &mut response.error_detail {
                detail.message.push_str(text);
            }
            responses.push(response);
        }
        responses.push(Response::default());
        for response in &responses {
            let mut frame = Vec::new();
            encode_frame_into(&mut frame, response, "response").unwrap();
            let serde = serde_json::to_vec(response).unwrap();
            assert_eq!(
                String::from_utf8_lossy(&frame[4..]),
                String::from_utf8_lossy(&serde)
            );
            assert_eq!(
                frame_len(frame[..4].try_into().unwrap()).unwrap(),
                serde.len()
            );
            // Past the room it is given, only its length is kept.
            let mut out = Vec::new();
            match encode_frame_within(&mut out, response, 8).unwrap() {
                Within::TooLarge(len) => assert_eq!((len, out.len()), (serde.len(), 0)),
                Within::Fits => panic!("a response fit in 8 bytes"),
            }
        }
    }

    #[test]
    fn a_request_decodes_every_field_and_borrows_plain_strings() {
        let json = r#"{"ops":"find x","presentation":"json","presentation_per_op":[null,"t"],
            "namespace":"ns","config_id":"c1","probe":false,"protocol_version":1,
            "request_id":7,"probe_only":true,"a_later_field":{"nested":[1,2.5,"s"]}}"#;
        let request = decode(json).unwrap();
        let mut expected = Request::new("find x", "ns", "c1");
        expected.presentation = Some("json".into());
        expected.presentation_per_op = Some(vec![None, Some("t".to_owned())]);
        expected.request_id = Some(7);
        expected.probe_only = true;
        assert_eq!(request, expected);
        assert!(matches!(request.ops, Cow::Borrowed(_)));
        assert!(matches!(request.namespace, Cow::Borrowed(_)));
        // A string with an escape cannot point into the frame: it is copied, and decoded.
        let escaped = decode(r#"{"ops":"a\"b\u00e9","namespace":"n\\s"}"#).unwrap();
        assert_eq!((&*escaped.ops, &*escaped.namespace), ("a\"bé", "n\\s"));
        assert!(matches!(escaped.ops, Cow::Owned(_)));
        // And it round-trips through the derived encoder.
        let again = serde_json::to_string(&request).unwrap();
        assert_eq!(decode(&again).unwrap(), request);
    }

    #[test]
    fn missing_fields_take_their_defaults_and_required_ones_are_named() {
        let request = decode(r#"{"namespace":"ns","ops":""}"#).unwrap();
        assert_eq!(
            (request.protocol_version, request.config_id.as_ref()),
            (0, "")
        );
        assert_eq!(
            (request.request_id, request.probe, request.probe_only),
            (None, false, false)
        );
        assert_eq!(
            decode(r#"{"ops":"x"}"#).unwrap_err(),
            "missing field `namespace` at line 1 column 11"
        );
        assert!(decode(r#"{"namespace":"x"}"#)
            .unwrap_err()
            .starts_with("missing field `ops`"));
        assert!(decode(r#"{"namespace":"x","ops":"a","ops":"b"}"#)
            .unwrap_err()
            .starts_with("duplicate field `ops`"));
        assert!(
            decode(r#"{"ops":"a","namespace":"x","probe":true,"probe":true}"#)
                .unwrap_err()
                .starts_with("duplicate field `probe`")
        );
    }

    #[test]
    fn read_from_takes_pipelined_frames_of_any_size_into_unzeroed_room() {
        use std::io::Write;
        let (mut ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let big = vec![b'x'; 3 * READ_CHUNK + 17];
        let mut bytes = Vec::new();
        for body in [&b"{}"[..], &big, b"[]", b"{\"a\":1}"] {
            bytes.extend((body.len() as u32).to_be_bytes());
            bytes.extend(body);
        }
        // Written in pieces that cut headers and bodies, while the reader reads.
        let writer = std::thread::spawn(move || {
            for piece in bytes.chunks(3001) {
                ours.write_all(piece)?;
            }
            Ok::<_, io::Error>(())
        });
        let mut decoder = FrameDecoder::new();
        let mut bodies = Vec::new();
        loop {
            if let Some(body) = decoder.decode().unwrap() {
                bodies.push(body.to_vec());
                decoder.consume();
                continue;
            }
            let before = decoder.buffered();
            let read = decoder.read_from(&theirs).unwrap();
            if read == 0 {
                decoder.finish().unwrap();
                break;
            }
            assert_eq!(decoder.buffered(), before + read);
            // Room grows towards the frame, never more than 64 KiB past what has arrived.
            assert!(decoder.capacity() <= (before + READ_CHUNK).max(INITIAL_BUFFER));
        }
        writer.join().unwrap().unwrap();
        assert_eq!(bodies, [&b"{}"[..], &big, b"[]", b"{\"a\":1}"]);
        assert_eq!(
            decoder.capacity(),
            INITIAL_BUFFER,
            "the large buffer was let go"
        );
    }

    #[test]
    fn read_from_never_mistakes_a_full_buffer_for_the_end_of_the_stream() {
        use std::io::Write;
        let (mut ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        // Whole frames fill the first buffer exactly, and one byte more waits behind them:
        // the reader is not asked to take the frames first.
        let frame = [0, 0, 0, 4, b'a', b'b', b'c', b'd'];
        let bytes: Vec<u8> = frame
            .iter()
            .copied()
            .cycle()
            .take(INITIAL_BUFFER + 1)
            .collect();
        ours.write_all(&bytes).unwrap();
        drop(ours);
        let mut decoder = FrameDecoder::new();
        let mut total = 0;
        loop {
            let read = decoder.read_from(&theirs).unwrap();
            if read == 0 {
                break;
            }
            total += read;
        }
        assert_eq!(
            total,
            INITIAL_BUFFER + 1,
            "every byte read, none taken for the end"
        );
    }

    #[test]
    fn only_an_object_of_the_right_types_is_a_request() {
        for (json, error) in [
            (
                r#"["x",null,null,"ns"]"#,
                "invalid type: sequence, expected a request object",
            ),
            (
                r#""ops""#,
                "invalid type: string \"ops\", expected a request object",
            ),
            (
                r#"{"ops":1,"namespace":"x"}"#,
                "invalid type: integer `1`, expected a string",
            ),
            (
                r#"{"ops":"a","namespace":null}"#,
                "invalid type: null, expected a string",
            ),
            (
                r#"{"ops":"a","namespace":"x","config_id":null}"#,
                "invalid type: null",
            ),
            (
                r#"{"ops":"a","namespace":"x","request_id":-1}"#,
                "invalid value: integer `-1`",
            ),
            (
                r#"{"ops":"a","namespace":"x","probe":"yes"}"#,
                "invalid type: string \"yes\"",
            ),
            (
                r#"{"ops":"a","namespace":"x"} trailing"#,
                "trailing characters",
            ),
        ] {
            let got = decode(json).unwrap_err();
            assert!(got.starts_with(error), "{json}: {got}");
        }
    }
}
