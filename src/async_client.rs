//! An async client for smol applications, on async-net's Unix stream: requests sent one at a
//! time or pipelined, each answer matched to its request by order and checked by request id.
//!
//! Like the blocking client, it depends on the wire format only, never on the server's code.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_io::{Async, Timer};
use async_net::unix::UnixStream;
use futures_lite::future::{self, FutureExt};
use futures_lite::io::{AsyncWriteExt, BufReader};
use rustix::net::SocketAddrUnix;

use crate::client::{
    check_echo, connect_error, decode_response, peer_closed, probe_info, timed_out,
};
use crate::sys;
use crate::wire::{encode_frame, read_frame, Frame, ProbeInfo, Request, Response};

/// A connection to a daemon for applications that run on smol (or any executor driven by
/// `async-io`): several requests on one connection, one after another or pipelined.
///
/// Each request gets a `request_id` if it has none (1, 2, 3, … on this connection), and each
/// response must come back in the order the requests went out and echo its request's id
/// (PROTOCOL.md, "Pipelining"); an answer out of order is an error. Responses come back
/// decoded as [`Response`], a probe's as [`ProbeInfo`]: no JSON to handle.
///
/// `timeout` bounds the connect, then each call on its own ([`request`](AsyncClient::request),
/// [`send`](AsyncClient::send), [`receive`](AsyncClient::receive),
/// [`pipeline`](AsyncClient::pipeline), [`probe`](AsyncClient::probe)). A call that fails,
/// times out, or is dropped before it completes may leave half a frame on the connection, so
/// every later call fails at once: connect again.
///
/// # Examples
///
/// ```no_run
/// use std::time::Duration;
///
/// use khived::{AsyncClient, Request};
///
/// # fn main() -> std::io::Result<()> {
/// async_io::block_on(async {
///     let mut client = AsyncClient::connect(khived::socket_path(), Duration::from_secs(5)).await?;
///     let response = client.request(&Request::new("search foo", "khive", "")).await?;
///     println!("{:?}", response.result);
///     // Three requests in one write; the answers in the same order.
///     let batch = ["a", "b", "c"].map(|ops| Request::new(ops, "khive", ""));
///     for response in client.pipeline(&batch).await? {
///         println!("{:?} {:?}", response.request_id, response.result);
///     }
///     Ok(())
/// })
/// # }
/// ```
#[derive(Debug)]
pub struct AsyncClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    path: PathBuf,
    timeout: Duration,
    /// The id given to the next request that has none.
    next_id: u64,
    /// The ids of the requests sent and not yet answered, oldest first.
    pending: VecDeque<u64>,
    /// Set while a call is under way, and left set when it did not complete: the stream may
    /// then be in the middle of a frame.
    broken: bool,
}

impl AsyncClient {
    /// Connects to the daemon at `path` within `timeout`, which then bounds each call.
    ///
    /// # Errors
    ///
    /// A missing socket is [`io::ErrorKind::NotFound`]; a socket nobody listens on is
    /// [`io::ErrorKind::ConnectionRefused`]; a daemon whose queue of connections stays full
    /// past the deadline is [`io::ErrorKind::TimedOut`]; every message names the path.
    ///
    /// [`io::ErrorKind::PermissionDenied`] if the socket is not the user's to trust, checked
    /// as [`Client::connect`](crate::Client::connect) does: the directories on its way before
    /// connecting, the uid of the process serving it before anything is sent.
    pub async fn connect(path: impl AsRef<Path>, timeout: Duration) -> io::Result<AsyncClient> {
        let path = path.as_ref().to_owned();
        // A few `stat` calls: not worth a thread.
        crate::trust::check_dirs_of(&path)?;
        let connecting = within(timeout, connect(&path), || {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "timed out connecting to (daemon busy) {} within {timeout:?}",
                    path.display()
                ),
            )
        });
        let stream = connecting.await?;
        Ok(AsyncClient {
            reader: BufReader::new(stream.clone()),
            writer: stream,
            path,
            timeout,
            next_id: 1,
            pending: VecDeque::new(),
            broken: false,
        })
    }

    /// Sends one request and reads its response.
    ///
    /// A daemon over its connection cap answers `daemon_busy` and closes without reading:
    /// that answer is returned even when sending failed.
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::InvalidInput`] while pipelined requests still wait for their
    /// responses (receive them first); otherwise as [`send`](AsyncClient::send) and
    /// [`receive`](AsyncClient::receive).
    pub async fn request(&mut self, request: &Request<'_>) -> io::Result<Response> {
        self.check_idle()?;
        let (frame, id) = self.encode(request)?;
        self.begin()?;
        let timeout = self.timeout;
        let exchange = async {
            let write_error = match self.write(frame.as_bytes()).await {
                Ok(()) => None,
                Err(e) if peer_closed(&e) => Some(e),
                Err(e) => return Err(e),
            };
            self.pending.push_back(id);
            match self.receive_started().await {
                Ok(response) => Ok(response),
                // The daemon closed without an answer: the write's error says more.
                Err(e) => Err(write_error.unwrap_or(e)),
            }
        };
        // The timeout bounds the call, not the write and the read each.
        let ended = async { Some(exchange.await) }
            .or(async {
                Timer::after(timeout).await;
                None
            })
            .await;
        ended.unwrap_or_else(|| Err(timed_out(&self.path, timeout, "waiting for the response")))
    }

    /// Sends one request without waiting for its response, and returns its request id (the
    /// request's own, or the one given to it). Its response is read by a later
    /// [`receive`](AsyncClient::receive), in the order the requests were sent.
    ///
    /// The daemon answers one request at a time and writes each response before it reads the
    /// next request, so a client that sends many requests with large responses before it
    /// receives any can fill both directions of the socket; [`pipeline`](AsyncClient::pipeline)
    /// sends and receives at the same time and has no such limit.
    ///
    /// # Errors
    ///
    /// A request above [`MAX_FRAME_BYTES`](crate::MAX_FRAME_BYTES) once encoded is
    /// [`io::ErrorKind::InvalidData`] and nothing is sent; [`io::ErrorKind::TimedOut`] after
    /// the timeout; any error of the socket.
    pub async fn send(&mut self, request: &Request<'_>) -> io::Result<u64> {
        let (frame, id) = self.encode(request)?;
        self.begin()?;
        self.write(frame.as_bytes()).await?;
        self.pending.push_back(id);
        self.broken = false;
        Ok(id)
    }

    /// Reads the response to the oldest request sent and not yet answered.
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::InvalidInput`] when no request waits for a response;
    /// [`io::ErrorKind::UnexpectedEof`] when the daemon closed the connection first (it
    /// does after a frame it cannot trust, and when it drains); [`io::ErrorKind::InvalidData`]
    /// when the answer is not a response, or answers another request id;
    /// [`io::ErrorKind::TimedOut`] after the timeout.
    pub async fn receive(&mut self) -> io::Result<Response> {
        self.check_usable()?;
        if self.pending.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "no request waits for a response: send one first",
            ));
        }
        self.begin()?;
        self.receive_started().await
    }

    /// Sends `requests` in one write and returns their responses in the same order, reading
    /// while it writes.
    ///
    /// # Errors
    ///
    /// As [`request`](AsyncClient::request), for the first request that fails; the
    /// responses read before it are lost with the connection.
    pub async fn pipeline(&mut self, requests: &[Request<'_>]) -> io::Result<Vec<Response>> {
        self.check_idle()?;
        let mut bytes = Vec::new();
        let mut ids = Vec::with_capacity(requests.len());
        for request in requests {
            let (frame, id) = self.encode(request)?;
            bytes.extend_from_slice(frame.as_bytes());
            ids.push(id);
        }
        self.begin()?;
        self.pending.extend(ids);
        let (timeout, path) = (self.timeout, &self.path);
        let writer = &mut self.writer;
        let write = async {
            match writer.write_all(&bytes).await {
                // Whatever the daemon answered before it closed is still read.
                Err(e) if peer_closed(&e) => Ok(()),
                written => written,
            }
        };
        let (reader, pending) = (&mut self.reader, &mut self.pending);
        let read = async {
            let mut responses = Vec::with_capacity(requests.len());
            for _ in 0..requests.len() {
                responses.push(read_response(reader, pending, path).await?);
            }
            Ok(responses)
        };
        let exchange = future::try_zip(write, read);
        let ((), responses) =
            within(timeout, exchange, || timed_out(path, timeout, "pipelining")).await?;
        self.broken = false;
        Ok(responses)
    }

    /// Asks the daemon who it is; see [`ProbeInfo`].
    ///
    /// # Errors
    ///
    /// As [`request`](AsyncClient::request), and [`io::ErrorKind::InvalidData`] if the
    /// daemon answers with an error or with something that is not a [`ProbeInfo`].
    pub async fn probe(&mut self) -> io::Result<ProbeInfo> {
        let response = self.request(&Request::probe()).await?;
        probe_info(response, &self.path)
    }

    /// How many requests have been sent and not yet answered.
    pub fn outstanding(&self) -> usize {
        self.pending.len()
    }

    /// The socket this client is connected to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Encodes `request`, giving it the next request id if it has none.
    fn encode(&mut self, request: &Request<'_>) -> io::Result<(Frame, u64)> {
        if let Some(id) = request.request_id {
            return Ok((encode_frame(request)?, id));
        }
        let mut request = request.clone();
        let id = self.next_id;
        request.request_id = Some(id);
        let frame = encode_frame(&request)?;
        self.next_id = self.next_id.wrapping_add(1);
        Ok((frame, id))
    }

    /// Marks a call as started; fails if an earlier one did not complete.
    fn begin(&mut self) -> io::Result<()> {
        self.check_usable()?;
        self.broken = true;
        Ok(())
    }

    fn check_usable(&self) -> io::Result<()> {
        if self.broken {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                format!(
                    "the connection to {} is unusable: an earlier call on it failed or was \
                     abandoned; connect again",
                    self.path.display()
                ),
            ));
        }
        Ok(())
    }

    /// Fails unless the connection is usable and no response is due.
    fn check_idle(&self) -> io::Result<()> {
        self.check_usable()?;
        match self.pending.len() {
            0 => Ok(()),
            n => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{n} pipelined request(s) still wait for a response: receive them first"),
            )),
        }
    }

    async fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        let (timeout, path) = (self.timeout, &self.path);
        let writer = &mut self.writer;
        let write = async {
            writer.write_all(bytes).await?;
            writer.flush().await
        };
        within(timeout, write, || {
            timed_out(path, timeout, "writing the request")
        })
        .await
    }

    /// Reads one response, once `begin` has marked the call; completes it on success.
    async fn receive_started(&mut self) -> io::Result<Response> {
        let (timeout, path) = (self.timeout, &self.path);
        let read = read_response(&mut self.reader, &mut self.pending, path);
        let response = within(timeout, read, || {
            timed_out(path, timeout, "reading the response")
        })
        .await?;
        self.broken = false;
        Ok(response)
    }
}

/// Reads the response due to the oldest pending request and checks its request id.
async fn read_response(
    reader: &mut BufReader<UnixStream>,
    pending: &mut VecDeque<u64>,
    path: &Path,
) -> io::Result<Response> {
    let id = pending.front().copied().unwrap_or_default();
    let body = read_frame(reader).await.map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => io::Error::new(
            e.kind(),
            format!(
                "{} closed the connection before answering request id {id}: {e}",
                path.display()
            ),
        ),
        _ => e,
    })?;
    let response = decode_response(&body, path)?;
    check_echo(Some(id), &response, path)?;
    pending.pop_front();
    Ok(response)
}

/// Connects a non-blocking socket to `path`.
async fn connect(path: &Path) -> io::Result<UnixStream> {
    let addr = SocketAddrUnix::new(path)?;
    let fd = sys::unix_socket(true)?;
    let mut pause = Duration::from_millis(1);
    loop {
        match rustix::net::connect(&fd, &addr) {
            Ok(()) => break,
            // The daemon's queue of connections is full. A Unix socket offers nothing to wait
            // on for a place in it, so try again shortly; the caller's deadline bounds this.
            Err(rustix::io::Errno::AGAIN) => {
                Timer::after(pause).await;
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            Err(rustix::io::Errno::INTR) => {}
            // Not on Linux, but allowed by POSIX: the connection completes in the background.
            Err(rustix::io::Errno::INPROGRESS) => {
                let stream = Async::new_nonblocking(std::os::unix::net::UnixStream::from(fd))?;
                stream.writable().await?;
                if let Some(e) = stream.get_ref().take_error()? {
                    return Err(connect_error(e, path));
                }
                crate::trust::check_peer(stream.get_ref(), path)?;
                return Ok(stream.into());
            }
            Err(e) => return Err(connect_error(e.into(), path)),
        }
    }
    crate::trust::check_peer(&fd, path)?;
    let stream = Async::new_nonblocking(std::os::unix::net::UnixStream::from(fd))?;
    Ok(stream.into())
}

/// Runs `future`, or fails with `timed_out()` once `timeout` has passed.
async fn within<T>(
    timeout: Duration,
    future: impl Future<Output = io::Result<T>>,
    timed_out: impl FnOnce() -> io::Error,
) -> io::Result<T> {
    future
        .or(async {
            Timer::after(timeout).await;
            Err(timed_out())
        })
        .await
}
