//! One daemon per socket: the state directory, the PID file lock, the socket file. Why a
//! lock, and what it guarantees, is told in the crate documentation ("One daemon per
//! socket"); reading the lock from outside is `pidfile`'s.

use std::fs::{self, File};
use std::io::{self, Seek, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::fs::{FlockOperation, Mode, OFlags};
use rustix::net::SocketAddrUnix;

use crate::client::Client;
use crate::config::{beside, Config};
use crate::error::annotate;
use crate::pidfile::{is_process_running, read_pid, running_pid, wait_for_pid};
use crate::sys::{self, MAX_SOCKET_PATH};
use crate::trust::prepare_dir;
use crate::wire::{encode_frame, Request};
use crate::Error;

/// How many connections may wait in the kernel's queue before `accept`.
pub(crate) const LISTEN_BACKLOG: i32 = 1024;

/// What a running daemon owns on the file system, removed when it stops if still its own.
#[derive(Debug)]
pub(crate) struct Instance {
    /// `None` once handed over: the successor's copy of the descriptor holds the lock, and
    /// ours must not hold it for our drain, past a successor that dies meanwhile.
    pid_file: Option<File>,
    pid_path: PathBuf,
    socket_path: PathBuf,
    /// Device and inode of the socket we bound: a socket put there by anyone else survives.
    /// `None` for a socket inherited from a service manager, which it keeps across restarts.
    socket_id: Option<(u64, u64)>,
    /// The files are not ours to remove: removed already, not yet ours (taken over, until our
    /// PID is in), or handed over.
    cleaned: bool,
}

impl Instance {
    /// Claims the socket for this process and returns the listener, bound and listening.
    /// With a listener `inherited` from a service manager, only the PID file is claimed.
    pub(crate) fn start(
        config: &Config,
        inherited: Option<UnixListener>,
    ) -> Result<(Instance, UnixListener), Error> {
        if inherited.is_none() {
            check_socket_path(&config.socket)?;
            prepare_dir(&config.socket)?;
        }
        if inherited.is_some() || config.pid_file.parent() != config.socket.parent() {
            prepare_dir(&config.pid_file)?;
        }
        let mut pid_file = lock_pid_file(&config.pid_file)?;
        let claimed = match inherited {
            Some(listener) => write_pid(&mut pid_file)
                .map(|()| (listener, None))
                .map_err(Error::from),
            None => claim_socket(config, &mut pid_file),
        };
        let (listener, socket_id) = match claimed {
            Ok(claimed) => claimed,
            Err(e) => {
                abandon_pid_file(&mut pid_file, &config.pid_file);
                return Err(e);
            }
        };
        Ok((Instance::new(config, pid_file, socket_id), listener))
    }

    fn new(config: &Config, pid_file: File, socket_id: Option<(u64, u64)>) -> Instance {
        Instance {
            pid_file: Some(pid_file),
            pid_path: config.pid_file.clone(),
            socket_path: config.socket.clone(),
            socket_id,
            cleaned: false,
        }
    }

    /// What a predecessor handed over (see `handover`): its socket, which stays where it is,
    /// and its PID file, whose lock came with the descriptor. They become ours, to be removed
    /// when we stop, only when our PID goes in, with [`write_our_pid`](Self::write_our_pid),
    /// once the predecessor has stopped accepting: a start cut short before then (its future
    /// dropped, a panic, the predecessor refusing) leaves them to the predecessor, which
    /// serves on.
    pub(crate) fn taken_over(config: &Config, pid_file: File) -> Instance {
        let socket_id = fs::symlink_metadata(&config.socket)
            .ok()
            .map(|meta| (meta.dev(), meta.ino()));
        let mut instance = Instance::new(config, pid_file, socket_id);
        instance.cleaned = true;
        instance
    }

    /// Whether the socket and the PID file taken over are still where they were. A
    /// predecessor told to stop in the middle of the handover removes them as it ends.
    pub(crate) fn in_place(&self) -> bool {
        let socket = fs::symlink_metadata(&self.socket_path).map(|meta| (meta.dev(), meta.ino()));
        self.socket_id.is_some()
            && socket.ok() == self.socket_id
            && self
                .pid_file
                .as_ref()
                .is_some_and(|file| same_file(file, &self.pid_path))
    }

    /// Writes our PID into the PID file, whose lock we hold; from now on the files are ours.
    pub(crate) fn write_our_pid(&mut self) -> io::Result<()> {
        let file = self.pid_file.as_mut().ok_or(io::ErrorKind::NotFound)?;
        write_pid(file)?;
        self.cleaned = false;
        Ok(())
    }

    /// The open PID file, whose descriptor carries the lock to a successor; `None` once
    /// handed over.
    pub(crate) fn pid_file(&self) -> Option<&File> {
        self.pid_file.as_ref()
    }

    /// The files are a successor's now: they stay when this daemon stops, and our copy of
    /// the PID file's descriptor is closed, so that the lock is the successor's alone (were
    /// it to die, the file would otherwise stay locked, naming a dead process, until our
    /// drain ends).
    pub(crate) fn handed_over(&mut self) {
        self.cleaned = true;
        self.pid_file = None;
    }

    /// Removes the socket and the PID file, each only if it is still ours.
    pub(crate) fn cleanup(&mut self) {
        if std::mem::replace(&mut self.cleaned, true) {
            return;
        }
        match fs::symlink_metadata(&self.socket_path) {
            _ if self.socket_id.is_none() => {}
            Ok(meta) if Some((meta.dev(), meta.ino())) == self.socket_id => {
                if let Err(e) = fs::remove_file(&self.socket_path) {
                    log::warn!("cannot remove {}: {e}", self.socket_path.display());
                }
            }
            Ok(_) => log::warn!(
                "{} was replaced by another file; leaving it in place",
                self.socket_path.display()
            ),
            Err(_) => {}
        }
        let Some(file) = self.pid_file.as_mut() else {
            return;
        };
        let ours = read_pid(file) == Some(std::process::id()) && same_file(file, &self.pid_path);
        if ours {
            if let Err(e) = fs::remove_file(&self.pid_path) {
                log::warn!("cannot remove {}: {e}", self.pid_path.display());
            }
        } else {
            log::warn!(
                "{} no longer holds our pid; leaving it in place",
                self.pid_path.display()
            );
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Removes a leftover socket and binds ours, writing our PID in between; the lock is held.
fn claim_socket(
    config: &Config,
    pid_file: &mut File,
) -> Result<(UnixListener, Option<(u64, u64)>), Error> {
    // Until the socket is known to be free, the PID file keeps what it said: a daemon that
    // does not lock (an older version) may still be running.
    let previous = read_pid(pid_file);
    clear_leftover_socket(&config.socket, previous, &config.pid_file)?;
    write_pid(pid_file)?;
    let (listener, id) = bind_private(&config.socket)?;
    Ok((listener, Some(id)))
}

/// After a failed start, removes the PID file if it is ours: created empty by our open, or
/// holding our PID. One that names another process is left as it was. It is removed while
/// still locked, so a daemon that opened the path meanwhile and locks it once ours is gone
/// sees that its file is no longer at the path (`lock_pid_file`) and starts over. (A daemon
/// that tries the lock while ours holds it does not wait: it fails as already running.)
fn abandon_pid_file(file: &mut File, path: &Path) {
    let empty = file.metadata().is_ok_and(|meta| meta.len() == 0);
    let ours = empty || read_pid(file) == Some(std::process::id());
    if ours && same_file(file, path) {
        if let Err(e) = fs::remove_file(path) {
            log::warn!("cannot remove {}: {e}", path.display());
        }
    }
}

fn check_socket_path(path: &Path) -> io::Result<()> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "socket path {} is {len} bytes long; the limit here is {MAX_SOCKET_PATH} bytes: \
                 choose a shorter path (KHIVE_SOCKET)",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// Opens the PID file without following symbolic links and takes the lock.
fn lock_pid_file(path: &Path) -> Result<File, Error> {
    loop {
        let fd = open_pid_file(path)?;
        if !try_lock_exclusive(&fd).map_err(|e| annotate(e, "cannot lock", path))? {
            return Err(Error::AlreadyRunning {
                pid: wait_for_pid(File::from(fd)),
            });
        }
        let file = File::from(fd);
        // The previous holder may have removed the file between our open and our lock; a
        // lock on an unlinked file guards nothing, so start over with the file now there.
        if !same_file(&file, path) {
            continue;
        }
        rustix::fs::fchmod(&file, Mode::from_raw_mode(0o600)).map_err(io::Error::from)?;
        return Ok(file);
    }
}

/// Takes the exclusive lock if no daemon holds it. A daemon holds it exclusively for good,
/// while `running_pid` holds it shared for a moment: a shared lock that we can take too says
/// that nobody but such lookers holds it, and they are waited for, so that `khived status`
/// polled during a start, however often, cannot make the start fail. (The thread sleeps
/// meanwhile: a daemon's start runs before it serves anything.) A shared lock held for 5 s
/// or more is nobody's look: it is taken for a daemon's, as any lock held past 100 ms was
/// before (an error of its own cost 128 to 384 bytes of binary).
fn try_lock_exclusive(fd: &OwnedFd) -> io::Result<bool> {
    use FlockOperation::{NonBlockingLockExclusive as Exclusive, NonBlockingLockShared as Shared};
    let mut lock = Exclusive;
    // Up to 2,500 looks at lookers, 2 ms apart: 5 s or more.
    for _ in 0..5000 {
        match (rustix::fs::flock(fd, lock), lock) {
            (Ok(()), Exclusive) => return Ok(true),
            (Ok(()), _) => {
                // Let go at once, as lookers do: another daemon starting now must not take us
                // for a looker while we take it for one.
                let _ = rustix::fs::flock(fd, FlockOperation::Unlock);
                std::thread::sleep(Duration::from_millis(2));
                lock = Exclusive;
            }
            (Err(rustix::io::Errno::WOULDBLOCK), Exclusive) => lock = Shared,
            (Err(rustix::io::Errno::WOULDBLOCK), _) => return Ok(false),
            (Err(e), _) => return Err(e.into()),
        }
    }
    Ok(false)
}

fn open_pid_file(path: &Path) -> io::Result<OwnedFd> {
    let flags = OFlags::RDWR | OFlags::CREATE | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    let fd = rustix::fs::open(path, flags, Mode::from_raw_mode(0o600)).map_err(|e| {
        if e == rustix::io::Errno::LOOP {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "PID file {} is a symbolic link; refusing to follow it (remove the link)",
                    path.display()
                ),
            )
        } else {
            annotate(e.into(), "cannot open PID file", path)
        }
    })?;
    if rustix::fs::FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode)
        != rustix::fs::FileType::RegularFile
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("PID file {} is not a regular file", path.display()),
        ));
    }
    Ok(fd)
}

fn write_pid(file: &mut File) -> io::Result<()> {
    file.set_len(0)?;
    file.rewind()?;
    file.write_all(std::process::id().to_string().as_bytes())
}

fn same_file(file: &File, path: &Path) -> bool {
    match (file.metadata(), fs::symlink_metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Removes a socket left by a daemon that died without cleaning up. Called only with the
/// lock held, before our PID is written.
///
/// Only the kernel's "nothing there" (`ENOENT`) or "nobody listens" (`ECONNREFUSED`) makes
/// a socket a leftover. Anything that answers a probe with a response frame (even a mismatch
/// or `daemon_busy`) is a running khived. A socket that accepts connections but does not
/// answer is refused too: a daemon that is hung or stopped (SIGSTOP) still owns it, and
/// taking it over would leave two daemons believing they serve one path (PROTOCOL.md).
fn clear_leftover_socket(path: &Path, previous: Option<u32>, pid_file: &Path) -> Result<(), Error> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(annotate(e, "cannot inspect", path).into()),
    };
    if meta.mode() & 0o170000 != 0o140000 {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; move it away or choose another path",
                path.display()
            ),
        )
        .into());
    }
    let previous = previous.filter(|&pid| is_process_running(pid));
    // A second look when the first connection was cut: a daemon closing its listener at that
    // moment drops the connections waiting in its queue, and refuses the next one.
    for attempt in 0..2 {
        let mut client = match Client::connect(path, Duration::from_secs(1)) {
            Ok(client) => client,
            Err(e) if is_nobody_there(&e) => break,
            Err(e) => return Err(not_answering(path, pid_file, previous, &e)),
        };
        let e = match probe_incumbent(&mut client) {
            Ok(probed) => {
                return Err(Error::AlreadyRunning {
                    pid: probed.or(previous),
                })
            }
            Err(e) => e,
        };
        let cut = matches!(
            e.kind(),
            io::ErrorKind::UnexpectedEof
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::BrokenPipe
        );
        if !cut || attempt == 1 {
            return Err(not_answering(path, pid_file, previous, &e));
        }
    }
    log::info!("removing stale socket {}", path.display());
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(annotate(e, "cannot remove stale socket", path).into())
        }
        _ => Ok(()),
    }
}

/// Probes the daemon behind `client`: `Ok` if it answers with a response, with the pid its
/// answer names. Only what this needs is decoded (`ok`, `result`, and the `pid` in it), not a
/// whole [`Response`] and [`ProbeInfo`](crate::wire::ProbeInfo): their decoders would be in
/// every daemon's binary for this one start-up check (a client's binary has them anyway).
///
/// [`Response`]: crate::wire::Response
fn probe_incumbent(client: &mut Client) -> io::Result<Option<u32>> {
    #[derive(serde::Deserialize)]
    struct Answer {
        ok: bool,
        #[serde(default)]
        result: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Pid {
        pid: u32,
    }
    let body = client.exchange(&encode_frame(&Request::probe())?)?;
    let answer: Answer = serde_json::from_slice(&body)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad response: {e}")))?;
    let info = answer.result.filter(|_| answer.ok);
    Ok(info.and_then(|text| Some(serde_json::from_slice::<Pid>(text.as_bytes()).ok()?.pid)))
}

/// Whether a failed connect says that nothing listens on the socket.
fn is_nobody_there(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
    )
}

/// The refusal for a socket that someone holds but that does not answer, naming the process
/// holding a PID file for it when there is one: the PID file beside the socket (another
/// daemon's, maybe with another configuration) or ours, as it was before we took its lock.
fn not_answering(path: &Path, pid_file: &Path, previous: Option<u32>, e: &io::Error) -> Error {
    let beside = beside(path, "pid");
    let holder = match (beside != pid_file).then(|| running_pid(&beside)) {
        Some(Ok(Some(pid))) => Some((pid, beside.as_path())),
        _ => previous.map(|pid| (pid, pid_file)),
    };
    let holder = match holder {
        Some((pid, file)) => format!("pid {pid} holds its PID file {}", file.display()),
        None => "no PID file names its holder".to_owned(),
    };
    io::Error::new(
        io::ErrorKind::AddrInUse,
        format!(
            "{} accepts connections but does not answer ({e}); {holder}. A daemon that is \
             hung or stopped still owns it: refusing to take it over. Stop or resume that \
             process, or remove the socket if you are sure nothing serves it",
            path.display()
        ),
    )
    .into()
}

/// Binds a listening socket that is mode 0600 from the moment its file exists.
///
/// On Linux the file created by `bind` takes the socket's own inode mode (less the umask), so
/// setting that mode before `bind` leaves no window in which the umask decides who may connect.
pub(crate) fn bind_private(path: &Path) -> io::Result<(UnixListener, (u64, u64))> {
    let fd = sys::unix_socket(true)?;
    // Not every platform lets a socket be chmod-ed; the check after bind covers those.
    let _ = rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o600));
    let addr = SocketAddrUnix::new(path)?;
    rustix::net::bind(&fd, &addr).map_err(|e| annotate(e.into(), "cannot bind", path))?;
    let meta = fs::symlink_metadata(path)?;
    let mode = meta.mode() & 0o777;
    if mode != 0o600 {
        log::warn!(
            "{} was created with mode {mode:03o}, fixed to 600: this platform leaves a moment \
             in which the umask decides who may connect",
            path.display()
        );
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    }
    rustix::net::listen(&fd, LISTEN_BACKLOG)?;
    // Changing the mode kept the inode.
    Ok((UnixListener::from(fd), (meta.dev(), meta.ino())))
}
