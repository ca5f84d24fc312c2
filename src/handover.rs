//! Handing a running daemon over to its successor without a gap: the successor is given the
//! listening socket and the PID file (its lock with it) over a private socket beside the
//! listening socket, so no client ever finds the socket missing or refused. The steps and
//! what each side checks are in PROTOCOL.md ("Handover").
//!
//! The running daemon keeps serving until its successor says it is ready; a successor that
//! fails before that changes nothing. Only then does the running daemon stop accepting (the
//! connections queued in the socket's backlog are left to the successor), drain and exit
//! without removing the files, which are now the successor's.

use std::fs::{self, File};
use std::future::Future;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_io::{Async, Timer};
use futures_lite::future::FutureExt;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketAddrUnix,
};

use crate::config::{beside, Config};
use crate::error::annotate;

/// The longest handover message: each is a few dozen bytes of JSON.
const MAX_MESSAGE: usize = 4096;
/// How long either side waits for the other's next message before it gives up. The successor
/// says it is ready once it has started warming, which does not wait for the warming itself.
/// (The messages say "30 s".)
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// `future` behind a pointer: the handover's steps stay out of the supervisor's state
/// machine, which every daemon's binary carries, and are polled through one vtable.
pub(crate) fn out_of_line<'a, T>(
    future: impl Future<Output = T> + Send + 'a,
) -> Pin<Box<dyn Future<Output = T> + Send + 'a>> {
    Box::pin(future)
}

/// The handover socket of the daemon serving `socket`. Beside the socket rather than the
/// PID file: a successor then reaches only the daemon that serves its own socket path, and
/// so is given a listener bound to it. (Beside the PID file, one started with the same PID
/// file and another socket path would take over a listener bound elsewhere, serve the old
/// path while naming the new one, and remove files that were not its own when it stops.)
pub(crate) fn path(socket: &Path) -> PathBuf {
    beside(socket, "handover")
}

/// One message of the handover is a frame like the daemon's (a 4-byte big-endian length,
/// then JSON): `{"step":"…","pid":N}`, where the step is `take` (successor), `given`
/// (running daemon), `ready` (successor) or `stopped` (running daemon: it accepts no more
/// connections), and N the sender's process id. Both ends are khived, so the object is
/// written and read in exactly this form.
/// The frame of step `step`, from this process. Written by hand: the steps are fixed words.
fn frame(step: &str) -> Vec<u8> {
    let body = format!("{{\"step\":\"{step}\",\"pid\":{}}}", std::process::id());
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(body.as_bytes());
    frame
}

/// The process id in `body`, if it is the step `expected` in the form `frame` writes.
fn parse(body: &[u8], expected: &str) -> io::Result<u32> {
    let pid = body
        .strip_prefix(b"{\"step\":\"")
        .and_then(|rest| rest.strip_prefix(expected.as_bytes()))
        .and_then(|rest| rest.strip_prefix(b"\",\"pid\":"))
        .and_then(|rest| rest.strip_suffix(b"}"))
        .filter(|digits| !digits.is_empty() && digits.iter().all(u8::is_ascii_digit))
        .and_then(|digits| std::str::from_utf8(digits).ok()?.parse().ok());
    pid.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad handover message: not the step {expected}"),
        )
    })
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
    /// A successor may hold the listener: a handover began and did not fail.
    lent: AtomicBool,
}

/// A successor that has the listener and the PID file and says it is ready.
#[derive(Debug)]
pub(crate) struct Successor {
    stream: Async<UnixStream>,
    /// Its process id.
    pub(crate) pid: u32,
}

/// How long the handover socket waits after a failed accept (out of descriptors, say).
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

impl Offer {
    /// Binds the handover socket beside `config.socket`. Called with the PID file's lock
    /// held and the socket bound: whatever is at the path is a leftover of an earlier daemon.
    pub(crate) fn bind(config: &Config) -> io::Result<Offer> {
        let path = path(&config.socket);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(annotate(e, "cannot remove the old handover socket", &path))
            }
            _ => {}
        }
        let (listener, id) = crate::instance::bind_private(&path)?;
        Ok(Offer {
            listener: Async::new_nonblocking(listener)?,
            path,
            id,
            lent: AtomicBool::new(false),
        })
    }

    /// Whether a successor may hold the listener, in a handover that began and neither
    /// failed nor ended: what is done to the socket (not to a descriptor) reaches it too.
    pub(crate) fn lent(&self) -> bool {
        self.lent.load(Ordering::SeqCst)
    }

    /// Waits for a successor that takes `listener` and `pid_file` and becomes ready.
    /// Successors that fail on the way are logged and change nothing: the daemon goes on
    /// serving, and this waits for the next one.
    pub(crate) async fn successor(&self, listener: BorrowedFd<'_>, pid_file: &File) -> Successor {
        let own_uid = rustix::process::geteuid().as_raw();
        // Out of descriptors, an accept fails every time while a successor waits.
        let mut failures = crate::accept::Throttled::default();
        loop {
            let accepted = crate::accept::when_ready(&self.listener).await;
            let stream = match accepted.and_then(|fd| Async::new_nonblocking(UnixStream::from(fd)))
            {
                Ok(stream) => stream,
                Err(e) => {
                    failures.warn(&|suppressed| {
                        format!(
                            "handover socket: accept failed: {e}; retrying in {ACCEPT_RETRY:?} \
                             ({suppressed} similar failures not logged)"
                        )
                    });
                    Timer::after(ACCEPT_RETRY).await;
                    continue;
                }
            };
            // The files are handed to the same user only: not even root, whom the daemon may
            // otherwise serve.
            let uid = crate::sys::peer_uid(&stream).unwrap_or(u32::MAX);
            if uid != own_uid {
                log::warn!("handover refused to uid {uid}: only uid {own_uid} may take over");
                continue;
            }
            self.lent.store(true, Ordering::SeqCst);
            let handed = give(stream, listener, pid_file)
                .or(async {
                    Timer::after(STEP_TIMEOUT).await;
                    Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no answer within 30 s",
                    ))
                })
                .await;
            match handed {
                Ok(successor) => return successor,
                Err(e) => {
                    self.lent.store(false, Ordering::SeqCst);
                    log::warn!("handover failed, still serving: {e}");
                }
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
    let asked = parse(&read_async(&stream).await?, "take")?;
    let given = frame("given");
    let fds = [listener, pid_file.as_fd()];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    control.push(SendAncillaryMessage::ScmRights(&fds));
    // A fresh connection's buffer takes the small frame whole, without waiting.
    let sent = rustix::net::sendmsg(
        stream.get_ref(),
        &[IoSlice::new(&given)],
        &mut control,
        SendFlags::empty(),
    )?;
    if sent != given.len() {
        return Err(io::Error::other("the handover message was cut short"));
    }
    let ready = read_async(&stream)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("pid {asked} did not become ready: {e}")))?;
    parse(&ready, "ready")?;
    // Gone already (it gave up waiting for `stopped` while this thread was held in a long
    // poll): stopping now would leave nobody accepting. Logged as "handover failed, still
    // serving: connection aborted" (a kind, not a message: the binary's size budget).
    if crate::cancel::peer_gone(stream.get_ref()) {
        return Err(io::ErrorKind::ConnectionAborted.into());
    }
    Ok(Successor { stream, pid: asked })
}

impl Successor {
    /// Tells the successor that this daemon accepts no more connections: from now on the
    /// listener is the successor's alone.
    pub(crate) fn stopped_accepting(self) {
        // Nothing else was sent since `given`: the buffer takes it whole.
        let stopped = frame("stopped");
        if crate::sys::send(self.stream.get_ref(), &stopped).ok() != Some(stopped.len()) {
            log::warn!("could not tell pid {} that we stopped accepting", self.pid);
        }
    }
}

/// One message's body, waiting on the reactor as the connections do.
async fn read_async(stream: &Async<UnixStream>) -> io::Result<Vec<u8>> {
    let mut header = [0; 4];
    fill(stream, &mut header).await?;
    let mut body = vec![0; body_len(header)?];
    fill(stream, &mut body).await?;
    Ok(body)
}

async fn fill(stream: &Async<UnixStream>, buf: &mut [u8]) -> io::Result<()> {
    let mut have = 0;
    while have < buf.len() {
        match rustix::io::read(stream.get_ref(), &mut buf[have..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => have += n,
            Err(rustix::io::Errno::AGAIN) => stream.readable().await?,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
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
    let path = path(&config.socket);
    crate::trust::check_dirs_of(&path)?;
    let fd = crate::sys::unix_socket(false)?;
    let addr = SocketAddrUnix::new(&path)?;
    match rustix::net::connect(&fd, &addr) {
        Ok(()) => {}
        Err(rustix::io::Errno::NOENT | rustix::io::Errno::CONNREFUSED) => return Ok(None),
        Err(e) => return Err(annotate(e.into(), "cannot connect to", &path)),
    }
    ask(UnixStream::from(fd), config).map(Some).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("handover through {}: {e}", path.display()),
        )
    })
}

/// The successor's steps up to the descriptors, on a connection to the handover socket.
fn ask(mut stream: UnixStream, config: &Config) -> io::Result<(UnixListener, File, Handshake)> {
    // Strictly this user, as the running daemon checks of us.
    let uid = crate::sys::peer_uid(&stream)?;
    let own_uid = rustix::process::geteuid().as_raw();
    if uid != own_uid {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("it is served by uid {uid}, not this user (uid {own_uid}); refusing"),
        ));
    }
    stream.set_read_timeout(Some(STEP_TIMEOUT))?;
    stream.set_write_timeout(Some(STEP_TIMEOUT))?;
    stream.write_all(&frame("take"))?;
    let (body, fds) = receive(&stream)?;
    let from = parse(&body, "given")?;
    let Ok([listener, pid_file]) = <[OwnedFd; 2]>::try_from(fds) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the handover did not come with 2 descriptors",
        ));
    };
    // The listener is the running daemon's own, from a process of this user: it is used
    // as it is (non-blocking, like every listener here).
    rustix::io::ioctl_fionbio(&listener, true)?;
    Ok((
        UnixListener::from(listener),
        check_pid_file(pid_file, &config.pid_file)?,
        Handshake { from, stream },
    ))
}

/// The PID file handed over, if it is the regular file at `path`.
fn check_pid_file(fd: OwnedFd, path: &Path) -> io::Result<File> {
    let file = File::from(fd);
    let held = file.metadata()?;
    // Most often missing: this daemon was given another PID file than the running one.
    let there = fs::symlink_metadata(path).map(|there| (there.dev(), there.ino()));
    if !held.is_file() || there.as_ref().ok() != Some(&(held.dev(), held.ino())) {
        let why = match there {
            Err(e) => format!(" ({e})"),
            Ok(_) => String::new(),
        };
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the PID file handed over is not {}{why}: give this daemon the PID file of \
                 the one it replaces",
                path.display()
            ),
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
    let have = got.bytes;
    if have < 4 {
        (&*stream).read_exact(&mut buf[have..4])?;
    }
    let len = body_len([buf[0], buf[1], buf[2], buf[3]])?;
    if have < 4 + len {
        (&*stream).read_exact(&mut buf[have.max(4)..4 + len])?;
    }
    buf.truncate(4 + len);
    buf.drain(..4);
    Ok((buf, fds))
}

impl Handshake {
    /// Says that this daemon is ready, and waits (blocking, at most 30 s: this daemon
    /// serves nothing yet) until the daemon it takes over from has stopped accepting. `Err`
    /// if that daemon still runs and has not stopped: it went on serving, and this one must
    /// not.
    pub(crate) fn ready(mut self) -> io::Result<()> {
        let from = self.from;
        let said = self
            .stream
            .write_all(&frame("ready"))
            .and_then(|()| receive(&self.stream))
            .and_then(|(body, _)| parse(&body, "stopped"));
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

impl Drop for Handshake {
    /// Gone for the daemon we asked, whichever way this one's start ends (ready, given up,
    /// cut short), even while a process this one starts holds a copy of the descriptor
    /// (between its fork and its exec): if it reads our `ready` only now, it sees that
    /// nobody is left to take over.
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}
