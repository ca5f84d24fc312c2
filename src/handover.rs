//! Handing a running daemon over to its successor without a gap: the successor is given the
//! listening socket and the PID file (its lock with it) over a private socket beside the PID
//! file, so no client ever finds the socket missing or refused. The steps and what each side
//! checks are in PROTOCOL.md ("Handover").
//!
//! The running daemon keeps serving until its successor says it is ready; a successor that
//! fails before that changes nothing. Only then does the running daemon stop accepting (the
//! connections queued in the socket's backlog are left to the successor), drain and exit
//! without removing the files, which are now the successor's.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_io::{Async, Timer};
use futures_lite::future::FutureExt;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketAddrUnix,
};
use serde::{Deserialize, Serialize};

use crate::config::{beside, Config};
use crate::error::annotate;

/// The longest handover message: each is a few dozen bytes of JSON.
const MAX_MESSAGE: usize = 4096;
/// How long either side waits for the other's next message before it gives up. The successor
/// says it is ready once it has started warming, which does not wait for the warming itself.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// The handover socket of the daemon whose PID file is `pid_file`.
pub(crate) fn path(pid_file: &Path) -> PathBuf {
    beside(pid_file, "handover")
}

/// One message of the handover, in a frame like the daemon's (a 4-byte big-endian length,
/// then JSON).
#[derive(Debug, Default, Serialize, Deserialize)]
struct Step {
    /// `take` (successor), `given` or `refused` (running daemon), `ready` (successor),
    /// `stopped` (running daemon: it accepts no more connections).
    step: String,
    /// The sender's process id.
    #[serde(default)]
    pid: u32,
    /// Why the handover was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl Step {
    fn new(step: &str) -> Step {
        Step {
            step: step.to_owned(),
            pid: std::process::id(),
            error: None,
        }
    }

    fn frame(&self) -> Vec<u8> {
        let body = serde_json::to_vec(self).unwrap_or_default();
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        frame
    }

    /// The message in `body`, if it is the step `expected`.
    fn parse(body: &[u8], expected: &str) -> io::Result<Step> {
        let step: Step = serde_json::from_slice(body).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad handover message: {e}"),
            )
        })?;
        match step.step == expected {
            true => Ok(step),
            false if step.step == "refused" => Err(io::Error::other(format!(
                "the running daemon (pid {}) refused the handover: {}",
                step.pid,
                step.error.as_deref().unwrap_or("no reason given")
            ))),
            false => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "bad handover message: {:?} where {expected:?} was expected",
                    step.step
                ),
            )),
        }
    }
}

/// The length a frame header announces, checked against [`MAX_MESSAGE`].
fn body_len(header: [u8; 4]) -> io::Result<usize> {
    let len = u32::from_be_bytes(header) as usize;
    match len <= MAX_MESSAGE {
        true => Ok(len),
        false => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("handover message of {len} bytes (limit {MAX_MESSAGE})"),
        )),
    }
}

// ---- the running daemon's side --------------------------------------------------------------

/// The running daemon's handover socket: where a successor asks for the daemon's files.
#[derive(Debug)]
pub(crate) struct Offer {
    listener: Async<UnixListener>,
    path: PathBuf,
    /// Device and inode of the socket file, removed at drop only while it is still ours.
    id: (u64, u64),
}

/// A successor that has the listener and the PID file and says it is ready.
#[derive(Debug)]
pub(crate) struct Successor {
    stream: Async<UnixStream>,
    /// Its process id.
    pub(crate) pid: u32,
}

impl Offer {
    /// Binds the handover socket beside `config.pid_file`. Called with the PID file's lock
    /// held: whatever is at the path is a leftover of an earlier daemon.
    pub(crate) fn bind(config: &Config) -> io::Result<Offer> {
        let path = path(&config.pid_file);
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_dir() => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "{} is a directory; move it away (the handover socket goes there)",
                        path.display()
                    ),
                ))
            }
            Ok(_) => fs::remove_file(&path)
                .map_err(|e| annotate(e, "cannot remove the old handover socket", &path))?,
            Err(_) => {}
        }
        let (listener, id) = crate::instance::bind_private(&path)?;
        Ok(Offer {
            listener: Async::new_nonblocking(listener)?,
            path,
            id,
        })
    }

    /// Waits for a successor that takes `listener` and `pid_file` and becomes ready.
    /// Successors that fail on the way are logged and change nothing: the daemon goes on
    /// serving, and this waits for the next one.
    pub(crate) async fn successor(&self, listener: BorrowedFd<'_>, pid_file: &File) -> Successor {
        let own_uid = rustix::process::geteuid().as_raw();
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    log::warn!("handover socket: accept failed: {e}");
                    Timer::after(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // The files are handed to the same user only: not even root, whom the daemon may
            // otherwise serve.
            match crate::sys::peer_uid(&stream) {
                Ok(uid) if uid == own_uid => {}
                Ok(uid) => {
                    log::warn!("handover refused to uid {uid}: only uid {own_uid} may take over");
                    continue;
                }
                Err(e) => {
                    log::warn!("handover refused: cannot tell who asks: {e}");
                    continue;
                }
            }
            let handed = give(stream, listener, pid_file)
                .or(async {
                    Timer::after(STEP_TIMEOUT).await;
                    Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no answer within {STEP_TIMEOUT:?}"),
                    ))
                })
                .await;
            match handed {
                Ok(successor) => return successor,
                Err(e) => log::warn!("handover failed, still serving: {e}"),
            }
        }
    }
}

impl Drop for Offer {
    /// Removes the handover socket if it is still ours: a successor binds its own there.
    fn drop(&mut self) {
        if let Ok(meta) = fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.id {
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

/// One successor's handover, up to its `ready`.
async fn give(
    stream: Async<UnixStream>,
    listener: BorrowedFd<'_>,
    pid_file: &File,
) -> io::Result<Successor> {
    let mut stream = stream;
    let asked = Step::parse(&read_async(&mut stream).await?, "take")?;
    log::info!("pid {} asks to take over: handing it the socket", asked.pid);
    let given = Step::new("given").frame();
    let fds = [listener, pid_file.as_fd()];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    control.push(SendAncillaryMessage::ScmRights(&fds));
    // A fresh connection's buffer takes the small frame whole.
    let sent = stream
        .write_with(|s| {
            rustix::net::sendmsg(s, &[IoSlice::new(&given)], &mut control, SendFlags::empty())
                .map_err(io::Error::from)
        })
        .await?;
    if sent != given.len() {
        return Err(io::Error::other("the handover message was cut short"));
    }
    let ready = read_async(&mut stream).await.map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("pid {} did not become ready: {e}", asked.pid),
        )
    })?;
    Step::parse(&ready, "ready")?;
    Ok(Successor {
        stream,
        pid: asked.pid,
    })
}

impl Successor {
    /// Tells the successor that this daemon accepts no more connections: from now on the
    /// listener is the successor's alone.
    pub(crate) async fn stopped_accepting(mut self) {
        if let Err(e) = self.stream.write_all(&Step::new("stopped").frame()).await {
            log::warn!(
                "could not tell pid {} that we stopped accepting: {e}",
                self.pid
            );
        }
    }
}

async fn read_async(stream: &mut Async<UnixStream>) -> io::Result<Vec<u8>> {
    let mut header = [0; 4];
    stream.read_exact(&mut header).await?;
    let mut body = vec![0; body_len(header)?];
    stream.read_exact(&mut body).await?;
    Ok(body)
}

// ---- the successor's side -----------------------------------------------------------------

/// The rest of a successor's handover: the connection on which it says when it is ready.
#[derive(Debug)]
pub(crate) struct Handshake {
    /// The daemon it takes over from.
    pub(crate) from: u32,
    stream: UnixStream,
}

/// Asks the daemon running for `config` for its listener and its PID file (whose lock comes
/// with the descriptor). `Ok(None)` when there is none to take over from (no handover
/// socket, or nobody listening on it).
///
/// # Errors
///
/// The running daemon is not this user's, refuses, does not answer in time, or sends
/// something else than the two descriptors.
pub(crate) fn take_over(config: &Config) -> io::Result<Option<(UnixListener, File, Handshake)>> {
    let path = path(&config.pid_file);
    crate::trust::check_dirs_of(&path)?;
    let fd = crate::sys::unix_socket(false)?;
    let addr = SocketAddrUnix::new(&path)?;
    match rustix::net::connect(&fd, &addr) {
        Ok(()) => {}
        Err(rustix::io::Errno::NOENT | rustix::io::Errno::CONNREFUSED) => return Ok(None),
        Err(e) => return Err(annotate(e.into(), "cannot connect to", &path)),
    }
    // Strictly this user, as the running daemon checks of us.
    let uid = crate::sys::peer_uid(&fd)?;
    let own_uid = rustix::process::geteuid().as_raw();
    if uid != own_uid {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "refusing to take over through {}: it is served by uid {uid}, not this user \
                 (uid {own_uid})",
                path.display()
            ),
        ));
    }
    let mut stream = UnixStream::from(fd);
    stream.set_read_timeout(Some(STEP_TIMEOUT))?;
    stream.set_write_timeout(Some(STEP_TIMEOUT))?;
    let step = |e: io::Error| {
        io::Error::new(
            e.kind(),
            format!("handover through {}: {e}", path.display()),
        )
    };
    stream.write_all(&Step::new("take").frame()).map_err(step)?;
    let (body, fds) = receive(&stream).map_err(step)?;
    let given = Step::parse(&body, "given").map_err(step)?;
    let [listener, pid_file]: [OwnedFd; 2] = fds.try_into().map_err(|fds: Vec<OwnedFd>| {
        step(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} descriptor(s) came with the handover, not 2", fds.len()),
        ))
    })?;
    Ok(Some((
        check_listener(listener, &config.socket).map_err(step)?,
        check_pid_file(pid_file, &config.pid_file).map_err(step)?,
        Handshake {
            from: given.pid,
            stream,
        },
    )))
}

/// The listener handed over, if it is a socket bound to `socket`, made non-blocking.
fn check_listener(fd: OwnedFd, socket: &Path) -> io::Result<UnixListener> {
    let bound = rustix::net::getsockname(&fd)
        .ok()
        .and_then(|addr| SocketAddrUnix::try_from(addr).ok())
        .and_then(|addr| {
            addr.path_bytes()
                .map(|path| PathBuf::from(OsStr::from_bytes(path)))
        });
    if bound.as_deref() != Some(socket) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the socket handed over is bound to {bound:?}, not to {}",
                socket.display()
            ),
        ));
    }
    rustix::io::ioctl_fionbio(&fd, true)?;
    Ok(UnixListener::from(fd))
}

/// The PID file handed over, if it is the regular file at `path`.
fn check_pid_file(fd: OwnedFd, path: &Path) -> io::Result<File> {
    let file = File::from(fd);
    let (held, there) = (file.metadata()?, fs::symlink_metadata(path)?);
    if !held.is_file() || (held.dev(), held.ino()) != (there.dev(), there.ino()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the PID file handed over is not {}", path.display()),
        ));
    }
    Ok(file)
}

/// Reads the `given` frame and the descriptors that come with its first byte.
fn receive(stream: &UnixStream) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut buf = vec![0; 4 + MAX_MESSAGE];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let flags = RecvFlags::CMSG_CLOEXEC;
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let flags = RecvFlags::empty();
    let got = rustix::net::recvmsg(
        stream,
        &mut [IoSliceMut::new(&mut buf)],
        &mut control,
        flags,
    )?;
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    for fd in &fds {
        // Set at once: no worker has been started yet that could inherit it meanwhile.
        rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::CLOEXEC)?;
    }
    if got.bytes == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let mut have = got.bytes;
    while have < 4 {
        have += read_some(stream, &mut buf[have..4])?;
    }
    let len = body_len([buf[0], buf[1], buf[2], buf[3]])?;
    while have < 4 + len {
        have += read_some(stream, &mut buf[have..4 + len])?;
    }
    buf.truncate(4 + len);
    buf.drain(..4);
    Ok((buf, fds))
}

fn read_some(mut stream: &UnixStream, buf: &mut [u8]) -> io::Result<usize> {
    match stream.read(buf)? {
        0 => Err(io::ErrorKind::UnexpectedEof.into()),
        n => Ok(n),
    }
}

impl Handshake {
    /// Says that this daemon is ready, and waits until the daemon it takes over from has
    /// stopped accepting. `Err` if that daemon still runs and has not stopped: it went on
    /// serving, and this one must not.
    pub(crate) async fn ready(self) -> io::Result<()> {
        let from = self.from;
        let mut stream = Async::new(self.stream)?;
        let said = async {
            stream.write_all(&Step::new("ready").frame()).await?;
            Step::parse(&read_async(&mut stream).await?, "stopped")
        }
        .or(async {
            Timer::after(STEP_TIMEOUT).await;
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {STEP_TIMEOUT:?}"),
            ))
        })
        .await;
        match said {
            Ok(_) => Ok(()),
            // It died after handing over: the listener is ours alone already.
            Err(_) if !crate::pidfile::is_process_running(from) => Ok(()),
            Err(e) => Err(io::Error::new(
                e.kind(),
                format!("pid {from} did not stop accepting after the handover: {e}"),
            )),
        }
    }
}
