//! Starting a daemon on demand: connect, or start one and wait until it answers. How the
//! spawn lock keeps many clients from starting many daemons is told on [`Spawn`].

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rustix::fs::{FileType, FlockOperation, Mode, OFlags};
use rustix::io::Errno;

use crate::client::Client;
use crate::error::annotate;
use crate::pidfile::running_pid;
use crate::trust::prepare_dir;

/// How to start a daemon when none answers; see [`Spawn::connect`].
///
/// Many short-lived clients may find no daemon at the same moment. They serialize on a spawn
/// lock: an exclusive `flock` on `<socket>.spawn.lock`, a file beside the socket (created
/// mode 0600, never through a symbolic link, and left in place: removing it would let two
/// clients lock two different files). Whoever holds the lock connects once more before it
/// starts anything, so only the first client starts a daemon and the others find it
/// answering. The wait for the lock is bounded (the ready timeout plus 5 s), so a client
/// stuck while holding it cannot hang the others.
///
/// Nothing is created where the daemon itself would refuse to run: before the spawn lock or
/// the log is created, their directory gets the daemon's own check (created 0700 if missing;
/// owned by the user and writable by no one else; every directory above it owned by the user
/// or root and not writable by others unless sticky). Both files are opened without
/// following a symbolic link and without blocking (a FIFO planted there fails at once instead
/// of hanging every client behind the lock), and only a regular file is accepted.
///
/// The daemon is started in a session of its own (no controlling terminal, no signals meant
/// for the client's terminal), with its standard input from `/dev/null` and its output
/// appended to a log file. If it exits before it answers (another daemon won a race, or the
/// previous one still drains and holds the PID file), the PID file tells which: the start is
/// retried once the previous daemon has let go of it.
///
/// # Examples
///
/// ```no_run
/// use std::process::Command;
/// use std::time::Duration;
///
/// let mut serve = Command::new("khived");
/// serve.arg("serve");
/// let mut client = khived::Spawn::new(khived::socket_path(), serve)
///     .connect(Duration::from_secs(10))?;
/// let info = client.probe()?;
/// # std::io::Result::Ok(())
/// ```
#[derive(Debug)]
pub struct Spawn {
    socket: PathBuf,
    command: Command,
    log: PathBuf,
    pid_file: PathBuf,
    ready_timeout: Duration,
    replace: Replace,
}

/// When [`Spawn::connect`] replaces a daemon that answers.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Replace {
    Never,
    Always,
    /// Unless it serves this namespace and config id, at this protocol version or newer.
    Unless {
        namespace: String,
        config_id: String,
    },
}

impl Spawn {
    /// Starts `command` (which must serve `socket`) when no daemon answers there. Its output
    /// is appended to the file beside the socket with the extension `log` (`khived.log`
    /// beside `khived.sock`); its PID file is expected beside the socket, with the extension
    /// `pid`, where [`Config::at`](crate::Config::at) puts it (see [`beside`](crate::beside));
    /// it gets 5 s to answer a probe.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::process::Command;
    ///
    /// // Logs to /run/user/1000/app/app.log, expects /run/user/1000/app/app.pid.
    /// let spawn = khived::Spawn::new("/run/user/1000/app/app.sock", Command::new("app-daemon"));
    /// ```
    #[must_use = "a Spawn does nothing until `connect` is called"]
    pub fn new(socket: impl Into<PathBuf>, command: Command) -> Spawn {
        let socket = socket.into();
        Spawn {
            log: crate::beside(&socket, "log"),
            pid_file: crate::beside(&socket, "pid"),
            socket,
            command,
            ready_timeout: Duration::from_secs(5),
            replace: Replace::Never,
        }
    }

    /// Replaces the daemon that answers on the socket, if one does (one at its connection
    /// cap, which answers `daemon_busy`, included): the command is started
    /// with `KHIVE_REPLACE=1`, so that its daemon ([`Config::replace`](crate::Config::replace),
    /// read by [`Config::from_env`](crate::Config::from_env)) takes over the running one's
    /// socket (PROTOCOL.md, "Handover"). [`connect`](Spawn::connect) returns once the new
    /// daemon answers; clients of the old one are not cut off mid-request. If the new one
    /// fails before it is ready, the old one goes on serving and `connect` fails with the new
    /// one's error. If it is not ready within the ready timeout, `connect` fails with
    /// [`io::ErrorKind::TimedOut`] and the new one is left running, to take over once it is
    /// ready: by then it may hold the listener, and killing it could leave nobody serving.
    #[must_use = "a builder method returns the changed Spawn"]
    pub fn replace(mut self) -> Spawn {
        self.replace = Replace::Always;
        self
    }

    /// Replaces, as [`replace`](Spawn::replace) does, a daemon that answers with another
    /// namespace or config id than these, or with an older protocol version than this
    /// crate's: the daemon of an older build of the application. A daemon that serves them
    /// is connected to as usual. One too busy to say what it serves (it answers the probe
    /// `daemon_busy` or `daemon_draining`) is left alone: [`connect`](Spawn::connect) fails
    /// with [`io::ErrorKind::ResourceBusy`], and the caller may try again shortly.
    #[must_use = "a builder method returns the changed Spawn"]
    pub fn replace_unless(
        mut self,
        namespace: impl Into<String>,
        config_id: impl Into<String>,
    ) -> Spawn {
        self.replace = Replace::Unless {
            namespace: namespace.into(),
            config_id: config_id.into(),
        };
        self
    }

    /// Where the daemon's standard output and error are appended. Its directory must pass
    /// the same check as the socket's (see [`Spawn`]).
    #[must_use = "a builder method returns the changed Spawn"]
    pub fn log_file(mut self, path: impl Into<PathBuf>) -> Spawn {
        self.log = path.into();
        self
    }

    /// The daemon's PID file, when it is not beside the socket (as with
    /// [`Config::from_env`](crate::Config::from_env) and `KHIVE_PID`). A daemon still holding
    /// its lock while it drains (its listener closed, so nothing answers) is waited for, and
    /// then replaced, instead of failing the start.
    #[must_use = "a builder method returns the changed Spawn"]
    pub fn pid_file(mut self, path: impl Into<PathBuf>) -> Spawn {
        self.pid_file = path.into();
        self
    }

    /// How long a started daemon may take to answer a probe [default: 5 s], a wait for a
    /// draining daemon to let go of the PID file included.
    #[must_use = "a builder method returns the changed Spawn"]
    pub fn ready_timeout(mut self, timeout: Duration) -> Spawn {
        self.ready_timeout = timeout;
        self
    }

    /// Connects to the daemon, starting it first if nobody listens on the socket (or, with
    /// [`replace`](Spawn::replace) or [`replace_unless`](Spawn::replace_unless), if the
    /// daemon that answers is to be replaced: then once the new one answers in its place).
    ///
    /// `timeout` bounds the returned client's requests, as in [`Client::connect`].
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::PermissionDenied`] for a socket or directory the user cannot trust (as
    /// [`Client::connect`], or the daemon's own directory check, with the fix in the message);
    /// [`io::ErrorKind::InvalidInput`] for a spawn lock or log that is a symbolic link or not
    /// a regular file; [`io::ErrorKind::ResourceBusy`] with
    /// [`replace_unless`](Spawn::replace_unless) and a daemon too busy to answer the probe;
    /// [`io::ErrorKind::TimedOut`] with [`replace_unless`](Spawn::replace_unless) for a
    /// daemon that accepts but does not answer its probe within `timeout` (hung or
    /// overloaded), which no daemon started now could replace.
    /// The spawn lock cannot be created or taken in time; the command cannot be started; the
    /// started daemon exits before it answers (the error gives its exit status and the last
    /// lines of its log) or does not answer within the ready timeout
    /// ([`io::ErrorKind::TimedOut`]; naming the daemon that still holds the PID file, if one
    /// other than ours does, such as one still draining); the PID file is held by
    /// a daemon with nothing at this socket's path, one that serves another socket
    /// ([`io::ErrorKind::AlreadyExists`], about a second after the start, not at the ready
    /// timeout); or, once started, the daemon cannot be connected to (as
    /// [`Client::connect`]).
    pub fn connect(mut self, timeout: Duration) -> io::Result<Client> {
        // Someone else's socket or directory, a daemon too busy to say what it serves, or
        // one that accepts but does not answer in time (hung, or overloaded): starting a
        // daemon would not help, and one that holds the PID file keeps ours from starting.
        let final_error = |e: &io::Error| {
            matches!(
                e.kind(),
                io::ErrorKind::PermissionDenied
                    | io::ErrorKind::ResourceBusy
                    | io::ErrorKind::TimedOut
            )
        };
        match self.usable(timeout) {
            Ok(Some(client)) => return Ok(client),
            Err(e) if final_error(&e) => return Err(e),
            _ => {}
        }
        let _lock = self.lock()?;
        // Another client may have started (or replaced) a daemon while we waited for the lock.
        match self.usable(timeout) {
            Ok(Some(client)) => return Ok(client),
            Err(e) if final_error(&e) => return Err(e),
            _ => {}
        }
        // Whether a daemon answers that ours is to take over from: one at its connection cap
        // answers `daemon_busy`, and is replaced like any other.
        let replacing =
            self.replace != Replace::Never && crate::client::answers(&self.socket, timeout);
        self.start(replacing)?;
        Client::connect(&self.socket, timeout)
    }

    /// A connection to a daemon that needs no replacing; `Ok(None)` if none answers, or one
    /// that is to be replaced does.
    fn usable(&self, timeout: Duration) -> io::Result<Option<Client>> {
        let mut client = Client::connect(&self.socket, timeout)?;
        let (namespace, config_id) = match &self.replace {
            Replace::Never => return Ok(Some(client)),
            Replace::Always => return Ok(None),
            Replace::Unless {
                namespace,
                config_id,
            } => (namespace, config_id),
        };
        let response = client.request(&crate::Request::probe())?;
        // One too busy to say what it serves is left alone: `probe_info` makes its answer
        // the error, `ResourceBusy`.
        if response.is_retryable() {
            return crate::client::probe_info(response, &self.socket).map(|_| None);
        }
        Ok(serves(&response, namespace, config_id).then_some(client))
    }

    fn lock(&self) -> io::Result<File> {
        let path = lock_path(&self.socket);
        // The daemon's own check, before anything is created: a spawn lock (or a log) in a
        // directory the daemon would refuse is a file others could replace.
        prepare_dir(&path)?;
        let file = open_private(&path, "spawn lock")?;
        // Bounded: a client stuck while holding the lock must not hang every other client.
        let deadline = Instant::now() + self.ready_timeout + Duration::from_secs(5);
        loop {
            match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => return Ok(file),
                Err(rustix::io::Errno::WOULDBLOCK) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(annotate(e.into(), "cannot take spawn lock", &path)),
            }
        }
    }

    fn start(&mut self, replacing: bool) -> io::Result<()> {
        if self.log.parent() != self.socket.parent() {
            prepare_dir(&self.log)?;
        }
        let mut log = open_private(&self.log, "daemon log")?;
        let log_start = log.seek(SeekFrom::End(0))?;
        self.command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log.try_clone()?);
        // SAFETY: the closure runs in the child between fork and exec and only makes the
        // setsid system call, which is async-signal-safe and touches no memory of ours.
        #[allow(unsafe_code)]
        unsafe {
            self.command.pre_exec(|| {
                // Its own session: no controlling terminal, no signals meant for ours.
                rustix::process::setsid()?;
                Ok(())
            });
        }
        if replacing {
            self.command.env("KHIVE_REPLACE", "1");
        }
        // A PID file held while nobody answered: a daemon drains there, and ours will find it
        // in its way. Seen now, before ours looks, so that a drain ending between ours giving
        // up and our first look below still gets ours started again.
        let mut draining = !replacing && matches!(running_pid(&self.pid_file), Ok(Some(_)));
        let mut child = self
            .command
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot start the daemon: {e}")))?;
        let deadline = Instant::now() + self.ready_timeout;
        let mut pause = Duration::from_millis(2);
        // While the old daemon answers, only an answer from ours says it is ready.
        let ours = |child: &std::process::Child| {
            crate::client::probe(&self.socket, Duration::from_secs(1))
                .is_ok_and(|info| !replacing || info.pid == child.id())
        };
        loop {
            if ours(&child) {
                // The daemon outlives us; a thread reaps it if it exits while we still run.
                std::thread::spawn(move || child.wait());
                return Ok(());
            }
            if let Some(status) = child.try_wait()? {
                // It may have lost a race to a daemon started without the spawn lock.
                if !replacing && crate::client::probe(&self.socket, Duration::from_secs(1)).is_ok()
                {
                    return Ok(());
                }
                // Or to a daemon that is draining: once that one is gone, start ours again
                // (once more if it was gone by the time we looked).
                let gone = match replacing {
                    true => false,
                    false => match self.wait_for_previous(deadline) {
                        Previous::Gone => true,
                        Previous::NoneHeld => std::mem::take(&mut draining),
                        Previous::Stayed(pid) => return Err(self.still_held(pid)),
                        Previous::Elsewhere(pid) => return Err(self.held_elsewhere(pid)),
                    },
                };
                if gone {
                    child = self.command.spawn()?;
                    continue;
                }
                return Err(io::Error::other(format!(
                    "the daemon exited ({status}) before it was ready; last lines of {}:\n{}",
                    self.log.display(),
                    tail(&log, log_start, 10)
                )));
            }
            if Instant::now() >= deadline {
                let ours = child.id();
                std::thread::spawn(move || child.wait());
                // Ours slow to find it in its way (a busy machine): the same daemon as above.
                match running_pid(&self.pid_file) {
                    Ok(Some(pid)) if !replacing && pid != ours => return Err(self.still_held(pid)),
                    _ => {}
                }
                // Left running, not killed: a successor may hold the listener by now, and
                // killing it would leave nobody serving.
                let then = match replacing {
                    true => "takes over once it is ready",
                    false => "answers once it is ready",
                };
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the daemon (pid {ours}) did not answer on {} within {:?}; it was left \
                         running, and {then} (or exits if it cannot); last lines of {}:\n{}",
                        self.socket.display(),
                        self.ready_timeout,
                        self.log.display(),
                        tail(&log, log_start, 10)
                    ),
                ));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// What becomes of a daemon that holds the PID file, waited for until `deadline`.
    ///
    /// A daemon draining for our socket keeps the socket file until it exits (it removes it
    /// just before the PID file), and one starting binds it just after it takes the PID
    /// file: a holder seen for [`ELSEWHERE_AFTER`] with no file at our socket's path serves
    /// another socket, and waiting for it to let go would only wait out the deadline.
    fn wait_for_previous(&self, deadline: Instant) -> Previous {
        let mut holder = match running_pid(&self.pid_file) {
            Ok(None) => return Previous::NoneHeld,
            Ok(pid) => pid,
            Err(_) => None,
        };
        let mut no_socket_since = None;
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            let pid = match running_pid(&self.pid_file) {
                Ok(None) => return Previous::Gone,
                Ok(Some(pid)) => pid,
                Err(_) => continue,
            };
            let no_socket = std::fs::symlink_metadata(&self.socket)
                .is_err_and(|e| e.kind() == io::ErrorKind::NotFound);
            no_socket_since = match (no_socket, no_socket_since) {
                (true, Some(since)) if holder == Some(pid) => Some(since),
                (true, _) => Some(Instant::now()),
                (false, _) => None,
            };
            holder = Some(pid);
            if no_socket_since.is_some_and(|since| since.elapsed() >= ELSEWHERE_AFTER) {
                return Previous::Elsewhere(pid);
            }
        }
        match holder {
            Some(pid) => Previous::Stayed(pid),
            None => Previous::NoneHeld,
        }
    }

    /// The error for a PID file still held at the ready timeout, most likely by a daemon
    /// that drains for our socket.
    fn still_held(&self, pid: u32) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "cannot start the daemon: pid {pid} still holds {} after {:?} without \
                 answering on {}: a daemon draining there lets go once its last requests end \
                 or its drain timeout passes; try again then, or give a longer ready timeout",
                self.pid_file.display(),
                self.ready_timeout,
                self.socket.display()
            ),
        )
    }

    /// The error for a PID file held by the daemon of another socket.
    fn held_elsewhere(&self, pid: u32) -> io::Error {
        io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "cannot start the daemon: pid {pid} holds {} but nothing is at {}: it serves \
                 another socket with the same PID file (or its socket was removed); give each \
                 socket a PID file of its own (by default the one beside it)",
                self.pid_file.display(),
                self.socket.display()
            ),
        )
    }
}

/// How long a daemon holding the PID file, with nothing at our socket's path, is taken for
/// one that is starting or about to exit, each a matter of a few system calls.
const ELSEWHERE_AFTER: Duration = Duration::from_secs(1);

/// What became of the daemon in the way of ours; see [`Spawn::wait_for_previous`].
enum Previous {
    /// It let go of the PID file: ours may start.
    Gone,
    /// None held the PID file when we looked (nor, or not as a live process, since).
    NoneHeld,
    /// It still holds it at the deadline: this pid.
    Stayed(u32),
    /// It holds it, and serves another socket: this pid.
    Elsewhere(u32),
}

/// Whether a probe's `response` comes from a daemon that serves `namespace` and `config_id`
/// at this crate's protocol version or newer: one that needs no replacing.
fn serves(response: &crate::Response, namespace: &str, config_id: &str) -> bool {
    response.daemon_protocol_version >= crate::PROTOCOL_VERSION
        && response.result.as_deref().is_some_and(|info| {
            serde_json::from_str::<crate::ProbeInfo>(info)
                .is_ok_and(|info| info.namespace == namespace && info.config_id == config_id)
        })
}

/// The spawn lock beside the socket: `<socket>.spawn.lock`.
fn lock_path(socket: &Path) -> PathBuf {
    let mut name = socket.file_name().unwrap_or_default().to_owned();
    name.push(".spawn.lock");
    socket.with_file_name(name)
}

/// Opens `path` (described as `what` in errors: the daemon's log, the spawn lock) read-write
/// for appending, created mode 0600 if missing, close-on-exec; the log's last lines are read
/// back through it after a failed start.
///
/// The directory must have passed the daemon's own check first; even then, the name is
/// opened without following a symbolic link (a planted link would make us append to a file
/// elsewhere) and without blocking (a planted FIFO would hang the open while we hold the
/// spawn lock), and only a regular file is accepted. The file is returned in blocking mode,
/// ready to be handed to whatever writes the log.
fn open_private(path: &Path, what: &str) -> io::Result<File> {
    let flags = OFlags::RDWR
        | OFlags::APPEND
        | OFlags::CREATE
        | OFlags::NOFOLLOW
        | OFlags::NONBLOCK
        | OFlags::CLOEXEC;
    let not_regular = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{what} {} is not a regular file; refusing to use it (remove it)",
                path.display()
            ),
        )
    };
    let fd = rustix::fs::open(path, flags, Mode::from_raw_mode(0o600)).map_err(|e| match e {
        Errno::LOOP => io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{what} {} is a symbolic link; refusing to follow it (remove the link)",
                path.display()
            ),
        ),
        Errno::NXIO => not_regular(),
        e => annotate(e.into(), &format!("cannot open {what}"), path),
    })?;
    let stat = rustix::fs::fstat(&fd).map_err(|e| annotate(e.into(), "cannot inspect", path))?;
    if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
        return Err(not_regular());
    }
    // O_NONBLOCK was for the open only; writes to a regular file ignore it, but whoever is
    // handed the descriptor (the daemon's stdout) must not see it.
    let flags = rustix::fs::fcntl_getfl(&fd)?;
    rustix::fs::fcntl_setfl(&fd, flags - OFlags::NONBLOCK)?;
    Ok(File::from(fd))
}

/// The last `lines` lines written to `log` after byte `from`.
fn tail(log: &File, from: u64, lines: usize) -> String {
    let mut text = Vec::new();
    let mut buf = vec![0; 64 << 10];
    let mut at = from;
    // At most 1 MiB: a daemon's start-up error is in its last lines.
    while text.len() < 1 << 20 {
        match log.read_at(&mut buf, at) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                text.extend_from_slice(&buf[..n]);
                at += n as u64;
            }
        }
    }
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_daemon_of_this_namespace_config_id_and_protocol_is_kept() {
        let probe = |version: u64, namespace: &str, config_id: &str| {
            let info = format!(
                r#"{{"pid":7,"namespace":"{namespace}","config_id":"{config_id}","version":"0.1.0","uptime_ms":5,"in_flight":0,"served":0}}"#
            );
            let mut response: crate::Response = serde_json::from_str(
                r#"{"ok":true,"served_config_id":"v2","daemon_protocol_version":1}"#,
            )
            .unwrap();
            response.result = Some(info);
            response.daemon_protocol_version = version;
            response
        };
        let current = crate::PROTOCOL_VERSION;
        assert!(serves(&probe(current, "app", "v2"), "app", "v2"));
        assert!(serves(&probe(current + 1, "app", "v2"), "app", "v2"));
        // An older build's daemon: an older protocol, another config id, another namespace.
        assert!(!serves(&probe(current - 1, "app", "v2"), "app", "v2"));
        assert!(!serves(&probe(current, "app", "v1"), "app", "v2"));
        assert!(!serves(&probe(current, "other", "v2"), "app", "v2"));
        // A probe answer it cannot read is a daemon it does not know: replaced.
        let mut unreadable = probe(current, "app", "v2");
        unreadable.result = Some("not json".into());
        assert!(!serves(&unreadable, "app", "v2"));
        unreadable.result = None;
        assert!(!serves(&unreadable, "app", "v2"));
    }

    #[test]
    fn the_pid_file_and_log_are_where_the_daemon_and_the_cli_put_them() {
        // Whatever the socket is called, a spawned daemon's PID file is where `Config::at`
        // (and `KHIVE_SOCKET` alone) puts it, and neither file is the socket itself.
        for socket in [
            "/run/app/app.sock",
            "/run/app/app",
            "/run/app/x.pid",
            "/run/app/x.log",
        ] {
            let spawn = Spawn::new(socket, Command::new("true"));
            assert_eq!(
                spawn.pid_file,
                crate::Config::at(socket).pid_file,
                "{socket}"
            );
            assert_ne!(spawn.pid_file, Path::new(socket));
            assert_ne!(spawn.log, Path::new(socket));
        }
        let spawn = Spawn::new("/run/app/app.sock", Command::new("true"));
        assert_eq!(spawn.log, Path::new("/run/app/app.log"));
    }
}
