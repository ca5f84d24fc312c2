//! A blocking client: one deadline covers connecting, writing and reading.
//!
//! This module depends on the wire format only, so a front-end can use it without the server.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::net::{sockopt, SocketAddrUnix};

use crate::sys;
use crate::wire::{encode_frame, Frame, FrameDecoder, ProbeInfo, Request, Response};

/// A connection to a daemon, for one or several requests under one deadline.
///
/// # Examples
///
/// ```no_run
/// use std::time::Duration;
///
/// let mut client = khived::Client::connect(khived::socket_path(), Duration::from_secs(5))?;
/// let response = client.request(&khived::Request::new("search foo", "khive", ""))?;
/// println!("{:?}", response.result);
/// # std::io::Result::Ok(())
/// ```
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    path: PathBuf,
    /// `None` for a timeout too far away to count (`Duration::MAX`).
    deadline: Option<Instant>,
    timeout: Duration,
}

impl Client {
    /// Connects to the daemon at `path`; `timeout` bounds this call and every request made
    /// on the connection afterwards, all together.
    ///
    /// # Errors
    ///
    /// A missing socket is [`io::ErrorKind::NotFound`]; a socket nobody listens on is
    /// [`io::ErrorKind::ConnectionRefused`]; a daemon whose queue of connections stays full
    /// past the deadline is [`io::ErrorKind::TimedOut`]; every message names the path.
    ///
    /// [`io::ErrorKind::PermissionDenied`], with the fix in the message, if the socket is not
    /// the user's to trust: a directory on its way (its own included) belongs to someone other
    /// than the user or root, or is writable by group or others without being sticky (checked
    /// before connecting), or the process serving it runs as neither the user nor root
    /// (checked before anything is sent): someone else may have put their socket there.
    pub fn connect(path: impl AsRef<Path>, timeout: Duration) -> io::Result<Client> {
        let path = path.as_ref();
        crate::trust::check_dirs_of(path)?;
        let deadline = Instant::now().checked_add(timeout);
        let fd = sys::unix_socket(false)?;
        // A blocking connect to a Unix socket whose backlog is full waits, bounded by the
        // send timeout: that makes the connect honour the deadline too.
        let connect_timeout = deadline.map(|_| timeout.max(Duration::from_millis(1)));
        sockopt::set_socket_timeout(&fd, sockopt::Timeout::Send, connect_timeout)?;
        let addr = SocketAddrUnix::new(path)?;
        if let Err(e) = rustix::net::connect(&fd, &addr) {
            return Err(connect_error(e.into(), path));
        }
        crate::trust::check_peer(&fd, path)?;
        Ok(Client {
            stream: UnixStream::from(fd),
            path: path.to_owned(),
            deadline,
            timeout,
        })
    }

    /// Sends one request and reads its response.
    ///
    /// # Errors
    ///
    /// As [`exchange`](Client::exchange), and [`io::ErrorKind::InvalidData`] if the answer is
    /// not a response, or answers another `request_id` than the request's.
    pub fn request(&mut self, request: &Request<'_>) -> io::Result<Response> {
        let frame = encode_frame(request)?;
        let body = self.exchange(&frame)?;
        let response = decode_response(&body, &self.path)?;
        check_echo(request.request_id, &response, &self.path)?;
        Ok(response)
    }

    /// Asks the daemon who it is; see [`ProbeInfo`].
    ///
    /// # Errors
    ///
    /// As [`request`](Client::request); [`io::ErrorKind::ResourceBusy`] if the daemon answers
    /// `daemon_busy` (it is at its connection cap) or `daemon_draining`, which may pass if
    /// asked again shortly; [`io::ErrorKind::InvalidData`] if it answers with another error or
    /// with something that is not a [`ProbeInfo`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// let mut client = khived::Client::connect(khived::socket_path(), Duration::from_secs(1))?;
    /// println!("pid {}", client.probe()?.pid);
    /// # std::io::Result::Ok(())
    /// ```
    pub fn probe(&mut self) -> io::Result<ProbeInfo> {
        let response = self.request(&Request::probe())?;
        probe_info(response, &self.path)
    }

    /// Writes one frame and reads one raw frame back, within the deadline.
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::TimedOut`] once the deadline has passed, naming the socket and what
    /// was being done; any error of the socket, or of [`read_frame`](crate::read_frame) (a
    /// frame cut short, a header above the cap).
    pub fn exchange(&mut self, frame: &Frame) -> io::Result<Vec<u8>> {
        self.arm_timeouts()?;
        let timed_out = |e: io::Error, doing: &str| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                timed_out(&self.path, self.timeout, doing)
            }
            _ => e,
        };
        // A daemon over its connection cap answers `daemon_busy` and closes before reading:
        // our write may then fail while that answer waits to be read, so read it anyway.
        let written = self.write_all(frame.as_bytes());
        if let Err(e) = &written {
            if !peer_closed(e) {
                return Err(timed_out(written.unwrap_err(), "writing the request"));
            }
        }
        self.arm_timeouts()?;
        // The socket blocks, bounded by its timeouts, which count for each system call: a
        // read after the first gets only the time left.
        let rearm = || {
            self.time_left()
                .and_then(|left| self.stream.set_read_timeout(left))
        };
        match read_frame_blocking(&self.stream, rearm) {
            Ok(body) => Ok(body),
            Err(e) => Err(match written {
                Err(write_error) => write_error,
                Ok(()) => timed_out(e, "reading the response"),
            }),
        }
    }

    /// Writes `bytes` whole; a write after the first gets only the time left (the socket's
    /// timeout counts for each system call).
    fn write_all(&self, mut bytes: &[u8]) -> io::Result<()> {
        use std::io::Write;
        let mut first = true;
        while !bytes.is_empty() {
            if !std::mem::take(&mut first) {
                self.stream.set_write_timeout(self.time_left()?)?;
            }
            match (&self.stream).write(bytes) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn arm_timeouts(&self) -> io::Result<()> {
        let left = self.time_left()?;
        if left.is_some() {
            self.stream.set_write_timeout(left)?;
            self.stream.set_read_timeout(left)?;
        }
        Ok(())
    }

    /// What is left of the deadline (`None`: no deadline); an error once nothing is.
    fn time_left(&self) -> io::Result<Option<Duration>> {
        let Some(deadline) = self.deadline else {
            return Ok(None);
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "no answer from {} within {:?}",
                    self.path.display(),
                    self.timeout
                ),
            ));
        }
        Ok(Some(left))
    }
}

/// [`read_frame`](crate::read_frame) for a blocking socket: the same decoder and errors,
/// without an executor to run the async reader on (which every daemon's binary would carry
/// for its start-up probe).
///
/// `rearm` runs before every read but the first: it gives the socket's timeout what is left
/// of the call's deadline.
fn read_frame_blocking(
    mut stream: &UnixStream,
    mut rearm: impl FnMut() -> io::Result<()>,
) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let mut decoder = FrameDecoder::new();
    let mut first = true;
    loop {
        if decoder.decode()?.is_some() {
            return Ok(decoder.into_body());
        }
        if !std::mem::take(&mut first) {
            rearm()?;
        }
        match stream.read(decoder.read_buf_in_frame()) {
            Ok(0) => return Err(decoder.cut_short()),
            Ok(n) => decoder.filled(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Probes the daemon at `path`: connects, asks who it is, and returns the answer.
///
/// # Errors
///
/// As [`Client::connect`] and [`Client::probe`]: "not running" is an error.
///
/// # Examples
///
/// ```no_run
/// # use std::time::Duration;
/// match khived::probe(khived::socket_path(), Duration::from_secs(1)) {
///     Ok(info) => println!("running as pid {}", info.pid),
///     Err(e) => println!("not running: {e}"),
/// }
/// ```
pub fn probe(path: impl AsRef<Path>, timeout: Duration) -> io::Result<ProbeInfo> {
    Client::connect(path, timeout)?.probe()
}

/// Whether a daemon answers a probe on `path` within `timeout`, with an error included
/// (`daemon_busy` from one at its connection cap).
pub(crate) fn answers(path: &Path, timeout: Duration) -> bool {
    Client::connect(path, timeout)
        .and_then(|mut client| client.request(&crate::Request::probe()))
        .is_ok()
}

/// The error of a failed `connect` to `path`, saying what it means for a daemon.
pub(crate) fn connect_error(e: io::Error, path: &Path) -> io::Error {
    let message = match e.kind() {
        io::ErrorKind::NotFound => "no daemon socket at",
        io::ErrorKind::ConnectionRefused => {
            "no daemon listening (a stale socket, or a daemon shutting down) on"
        }
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            "timed out connecting to (daemon busy)"
        }
        _ => "cannot connect to",
    };
    let kind = match e.kind() {
        io::ErrorKind::WouldBlock => io::ErrorKind::TimedOut,
        kind => kind,
    };
    io::Error::new(kind, format!("{message} {}: {e}", path.display()))
}

/// A response frame's body, decoded.
pub(crate) fn decode_response(body: &[u8], path: &Path) -> io::Result<Response> {
    serde_json::from_slice(body).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad response from {}: {e}", path.display()),
        )
    })
}

/// Checks that `response` answers the request that carried `sent`: a daemon echoes the id
/// (an older one sends none, and a reply to a frame it could not parse may carry none).
pub(crate) fn check_echo(sent: Option<u64>, response: &Response, path: &Path) -> io::Result<()> {
    match (sent, response.request_id) {
        (Some(sent), Some(echoed)) if sent != echoed => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} answered request id {echoed} where request id {sent} was due",
                path.display()
            ),
        )),
        _ => Ok(()),
    }
}

/// The daemon's description of itself from a probe's response.
pub(crate) fn probe_info(response: Response, path: &Path) -> io::Result<ProbeInfo> {
    // `daemon_busy` (at its connection cap) or `daemon_draining`: a daemon, asked too soon.
    let kind = match response.is_retryable() {
        true => io::ErrorKind::ResourceBusy,
        false => io::ErrorKind::InvalidData,
    };
    let text = match (response.ok, response.result) {
        (true, Some(text)) => text,
        _ => {
            return Err(io::Error::new(
                kind,
                format!(
                    "{} answered a probe with an error: {}",
                    path.display(),
                    response.error.unwrap_or_default()
                ),
            ))
        }
    };
    serde_json::from_str(&text).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} answered a probe with {text:?}: {e}", path.display()),
        )
    })
}

/// The error for a daemon that did not answer in time, saying what was being done.
pub(crate) fn timed_out(path: &Path, timeout: Duration, doing: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!(
            "no answer from {} within {timeout:?} ({doing})",
            path.display()
        ),
    )
}

/// A write failed because the daemon closed its end: it may have answered first (a busy
/// reply), so the answer is still read.
pub(crate) fn peer_closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
    )
}
