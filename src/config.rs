//! Where the daemon lives and the limits it keeps: paths, timeouts, environment variables.

use std::env;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Everything the daemon needs to know besides its dispatcher.
///
/// Every field can be set in code; [`Config::from_env`] fills them from the `KHIVE_*`
/// environment variables the way existing clients expect. The socket and the PID file go
/// together: one daemon per socket is decided by the PID file's lock, so two daemons on two
/// sockets need two PID files. When only one of `KHIVE_SOCKET` and `KHIVE_PID` is set, the
/// other is derived beside it, in the same directory with the same stem (`KHIVE_SOCKET=a.sock`
/// means the PID file `a.pid`; `KHIVE_PID=x.pid` means the socket `x.sock`).
///
/// # Examples
///
/// ```
/// use std::time::Duration;
///
/// let mut config = khived::Config::from_env();
/// config.drain_timeout = Duration::from_secs(3);
/// config.idle_shutdown = Some(Duration::from_secs(600));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Config {
    /// The Unix socket the daemon listens on.
    pub socket: PathBuf,
    /// The PID file, locked for the daemon's whole life so that one daemon runs per socket.
    pub pid_file: PathBuf,
    /// How long requests in flight may take to finish after a shutdown starts (default 10 s).
    pub drain_timeout: Duration,
    /// Stop after this long with no connection open (default: never).
    pub idle_shutdown: Option<Duration>,
    /// How long a new connection may take to deliver its first complete request (default 30 s),
    /// and any connection the rest of a frame above 64 KiB once room for it is set aside in
    /// the frame memory budget (which it holds while it comes).
    pub first_request_timeout: Duration,
    /// How long a connection may stay open between requests (default 5 min).
    pub idle_connection_timeout: Duration,
    /// How long writing one response may take before the client is dropped (default 30 s).
    pub write_timeout: Duration,
    /// How many connections may be open at once (default 512, lowered at start to what the
    /// open-file limit allows). Over the cap a new connection gets one `daemon_busy` reply.
    pub max_connections: usize,
    /// Bytes that all connections together may hold in frame buffers larger than 64 KiB:
    /// read buffers of large requests and encoded large responses (default 128 MiB; values
    /// below one largest frame, 8 MiB and its 4-byte header, are raised to that).
    ///
    /// Without it, clients sending large requests and reading their answers slowly hold
    /// up to 8 MiB each for as long as the deadlines allow. A connection that needs more than
    /// is left waits for it, first come first served, until its read deadline
    /// ([`first_request_timeout`](Self::first_request_timeout) or
    /// [`idle_connection_timeout`](Self::idle_connection_timeout)) or, for a response, the
    /// [`write_timeout`](Self::write_timeout); past it the client gets `daemon_busy` for a
    /// request (not committed), or `response_too_large` (outcome unknown) for a response.
    /// Buffers up to 64 KiB (every small request and response) never wait. What the
    /// dispatcher allocates itself is not counted.
    pub frame_memory_budget: usize,
    /// Whether root may connect as well as the daemon's own user (default false). Every
    /// other peer is refused before a byte is read.
    pub allow_root: bool,
    /// Whether a listening socket passed by a service manager (`LISTEN_PID`, `LISTEN_FDS`,
    /// descriptor 3) is used instead of binding `socket` (default true). Such a socket is
    /// never removed at shutdown: the service manager keeps it across restarts.
    ///
    /// Linux only, as are `sd_notify` readiness notifications: elsewhere the daemon always
    /// binds `socket` itself, whatever this says, and notifies nobody.
    pub socket_activation: bool,
    /// Whether the daemon stops on SIGTERM, SIGINT and SIGHUP (default true; SIGHUP is what
    /// a daemon started from a terminal gets when the terminal closes). Turn it off when the
    /// embedding application handles signals itself and stops the daemon with a
    /// [`ShutdownHandle`](crate::ShutdownHandle).
    pub handle_signals: bool,
    /// Whether a successor may take this daemon over (default true): the daemon listens on a
    /// handover socket beside its listening socket (the socket's path with the extension
    /// `handover`), where a daemon started with [`replace`](Self::replace) for the same
    /// socket and PID file, run by the same user, is given the listening socket and the PID
    /// file. This daemon then stops accepting, finishes what it holds and exits without
    /// removing them (PROTOCOL.md, "Handover"). Off under socket activation: the service
    /// manager keeps the socket across restarts itself.
    pub handover: bool,
    /// Whether to take over from the daemon running on this socket instead of failing with
    /// [`Error::AlreadyRunning`](crate::Error::AlreadyRunning) (default false;
    /// `KHIVE_REPLACE`, which [`Spawn::replace`](crate::Spawn::replace) sets). The running
    /// daemon serves until this one is ready; if this one fails before that, nothing
    /// changes for the clients. With no daemon running, this one starts as usual.
    pub replace: bool,
    /// How many threads may run dispatch at once (default 0: as many as there are CPUs the
    /// process may run on, by its affinity mask on Linux, so set it under a CPU quota;
    /// `KHIVE_THREADS`). Threads beyond the caller's are started only while dispatches
    /// compute (one more while they compute for long, for accepting, reading and answering
    /// whatever does not dispatch) and given back after idling. While all of them compute
    /// for long and others wait, up to twice as many dispatches run, so that quick requests
    /// are not held up. 1 runs everything on the caller's thread; more than 1,024 is taken
    /// for 1,024.
    pub threads: usize,
    /// How long one request may take from the moment it has been read (default: no limit).
    /// At the deadline its dispatch future is dropped and the client gets the error
    /// `request_timed_out` (disposition unknown: the work may have had an effect; the text
    /// starts with `request timed out`). A computation that never awaits stops only at its
    /// next await point.
    pub request_timeout: Option<Duration>,
    /// Whether a request is cancelled (its dispatch future dropped) when its client hangs up
    /// while it waits for a thread or is being dispatched (default true). Turn it off for
    /// dispatchers whose work must complete. As with the deadline, a computation that never
    /// awaits stops only at its next await point; a client that has already sent its next
    /// request, or only shut down its writing side, is not taken for gone.
    pub cancel_on_disconnect: bool,
}

impl Default for Config {
    /// The default paths (see [`socket_path`]) and limits, ignoring the environment.
    fn default() -> Self {
        let dir = state_dir();
        Config {
            socket: dir.join("khived.sock"),
            pid_file: dir.join("khived.pid"),
            drain_timeout: Duration::from_secs(10),
            idle_shutdown: None,
            first_request_timeout: Duration::from_secs(30),
            idle_connection_timeout: Duration::from_secs(300),
            write_timeout: Duration::from_secs(30),
            max_connections: 512,
            frame_memory_budget: 128 * 1024 * 1024,
            allow_root: false,
            socket_activation: true,
            handle_signals: true,
            handover: true,
            replace: false,
            threads: 0,
            request_timeout: None,
            cancel_on_disconnect: true,
        }
    }
}

impl Config {
    /// The defaults, with `KHIVE_SOCKET`, `KHIVE_PID`, `KHIVE_DRAIN_TIMEOUT_SECS`,
    /// `KHIVE_FRAME_MEMORY_MIB` ([`frame_memory_budget`](Self::frame_memory_budget) in MiB),
    /// `KHIVE_THREADS` and `KHIVE_REPLACE` ([`replace`](Self::replace)) applied where they
    /// are set (empty paths and unparsable numbers are
    /// ignored, the numbers with a warning in the log). With only one of the two paths set, the other is beside it (see
    /// [`socket_path`] and [`pid_path`]).
    ///
    /// # Examples
    ///
    /// ```
    /// let config = khived::Config::from_env();
    /// assert_eq!(config.socket, khived::socket_path());
    /// ```
    pub fn from_env() -> Self {
        let (socket, pid_file) = env_paths();
        let mut config = Config {
            socket,
            pid_file,
            ..Config::default()
        };
        if let Some(secs) = env_number("KHIVE_DRAIN_TIMEOUT_SECS") {
            config.drain_timeout = Duration::from_secs(secs);
        }
        if let Some(mib) = env_number("KHIVE_FRAME_MEMORY_MIB") {
            config.frame_memory_budget = usize::try_from(mib)
                .ok()
                .and_then(|mib| mib.checked_mul(1024 * 1024))
                .unwrap_or(usize::MAX);
        }
        if let Some(threads) = env_number("KHIVE_THREADS") {
            config.threads = usize::try_from(threads).unwrap_or(usize::MAX);
        }
        config.replace = env_truthy("KHIVE_REPLACE");
        config
    }

    /// A configuration for a daemon on `socket`, with its PID file beside it (the socket's
    /// path with the extension `pid`, or with `.pid` added should that be the socket itself)
    /// and default limits; the environment is not read.
    ///
    /// # Examples
    ///
    /// ```
    /// let config = khived::Config::at("/run/user/1000/app/app.sock");
    /// assert_eq!(config.pid_file.to_str(), Some("/run/user/1000/app/app.pid"));
    /// ```
    pub fn at(socket: impl Into<PathBuf>) -> Self {
        let socket = socket.into();
        Config {
            pid_file: beside(&socket, "pid"),
            socket,
            ..Config::default()
        }
    }
}

/// The state directory: `$HOME/.khive`, or `./.khive` when `HOME` is unset.
///
/// # Examples
///
/// ```
/// assert!(khived::state_dir().ends_with(".khive"));
/// ```
pub fn state_dir() -> PathBuf {
    match env::var_os("HOME") {
        Some(home) if !home.is_empty() => PathBuf::from(home).join(".khive"),
        _ => PathBuf::from(".khive"),
    }
}

/// The socket path: `KHIVE_SOCKET` when set and non-empty; else, when only `KHIVE_PID` is
/// set, beside the PID file with the extension `sock` (`x.pid` -> `x.sock`); else
/// `<state dir>/khived.sock`.
///
/// # Examples
///
/// ```
/// let path = khived::socket_path();
/// assert!(path.is_absolute() || path.starts_with(".khive") || std::env::var_os("KHIVE_SOCKET").is_some());
/// ```
pub fn socket_path() -> PathBuf {
    env_paths().0
}

/// The PID file path: `KHIVE_PID` when set and non-empty; else, when only `KHIVE_SOCKET` is
/// set, beside the socket with the extension `pid` (`a.sock` -> `a.pid`), so that daemons
/// on different sockets never share a lock; else `<state dir>/khived.pid`.
///
/// # Examples
///
/// ```
/// if std::env::var_os("KHIVE_PID").is_none() && std::env::var_os("KHIVE_SOCKET").is_none() {
///     assert!(khived::pid_path().ends_with(".khive/khived.pid"));
/// }
/// ```
pub fn pid_path() -> PathBuf {
    env_paths().1
}

/// The socket and PID file the environment asks for.
fn env_paths() -> (PathBuf, PathBuf) {
    paths_from(env_path("KHIVE_SOCKET"), env_path("KHIVE_PID"))
}

/// The socket and PID file for these settings: both, one (the other derived beside it), or
/// neither (the state directory's).
fn paths_from(socket: Option<PathBuf>, pid_file: Option<PathBuf>) -> (PathBuf, PathBuf) {
    match (socket, pid_file) {
        (Some(socket), Some(pid_file)) => (socket, pid_file),
        (Some(socket), None) => {
            let pid_file = beside(&socket, "pid");
            (socket, pid_file)
        }
        (None, Some(pid_file)) => (beside(&pid_file, "sock"), pid_file),
        (None, None) => {
            let dir = state_dir();
            (dir.join("khived.sock"), dir.join("khived.pid"))
        }
    }
}

/// The file beside `path` with the extension `extension`: the same directory and stem
/// (`a.sock` -> `a.pid`). Should that name `path` itself (`x.pid` beside `x.pid`), the
/// extension is added instead (`x.pid.pid`), so that the two never collide.
///
/// This is how one of a daemon's paths is derived from another: the PID file from the
/// socket when only `KHIVE_SOCKET` is set (and the socket from the PID file when only
/// `KHIVE_PID` is), in [`Config::at`], and the PID file and log of [`Spawn`](crate::Spawn).
///
/// # Examples
///
/// ```
/// use std::path::Path;
///
/// assert_eq!(khived::beside(Path::new("/run/app/app.sock"), "pid"), Path::new("/run/app/app.pid"));
/// assert_eq!(khived::beside(Path::new("/run/app/app"), "pid"), Path::new("/run/app/app.pid"));
/// assert_eq!(khived::beside(Path::new("/run/app/x.pid"), "pid"), Path::new("/run/app/x.pid.pid"));
/// ```
pub fn beside(path: &Path, extension: &str) -> PathBuf {
    let derived = path.with_extension(extension);
    if derived != path {
        return derived;
    }
    let mut name = path.as_os_str().to_owned();
    name.push(".");
    name.push(extension);
    PathBuf::from(name)
}

/// Whether the variable `key` is set to something other than empty, `0` or `false` (any
/// case), after trimming white space.
///
/// # Examples
///
/// ```
/// std::env::set_var("KHIVE_DOC_FLAG", " True ");
/// assert!(khived::env_truthy("KHIVE_DOC_FLAG"));
/// std::env::set_var("KHIVE_DOC_FLAG", "0");
/// assert!(!khived::env_truthy("KHIVE_DOC_FLAG"));
/// ```
pub fn env_truthy(key: &str) -> bool {
    match env::var(key) {
        Ok(value) => is_truthy(&value),
        Err(_) => false,
    }
}

pub(crate) fn is_truthy(value: &str) -> bool {
    let value = value.trim();
    !value.is_empty() && value != "0" && !value.eq_ignore_ascii_case("false")
}

fn env_path(key: &str) -> Option<PathBuf> {
    env::var_os(key)
        .filter(|value| !value.is_empty())
        .map(PathBuf::from)
}

/// A whole number in variable `key`. A value that is not one is ignored (the default
/// applies), as the variables always were, but not silently: the log says so.
fn env_number(key: &str) -> Option<u64> {
    let value = env::var(key).ok()?;
    let number = value.trim().parse().ok();
    if number.is_none() && !value.trim().is_empty() {
        log::warn!("{key}={value:?} is not a whole number; ignored");
    }
    number
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::{beside, is_truthy, paths_from, state_dir};

    #[test]
    fn one_path_set_derives_the_other_beside_it() {
        let some = |path: &str| Some(PathBuf::from(path));
        let pair = |socket: &str, pid: &str| (PathBuf::from(socket), PathBuf::from(pid));
        assert_eq!(
            paths_from(some("/r/a.sock"), None),
            pair("/r/a.sock", "/r/a.pid")
        );
        assert_eq!(
            paths_from(None, some("/r/x.pid")),
            pair("/r/x.sock", "/r/x.pid")
        );
        assert_eq!(paths_from(some("a"), None), pair("a", "a.pid"));
        assert_eq!(
            paths_from(some("/r/x.pid"), None),
            pair("/r/x.pid", "/r/x.pid.pid")
        );
        assert_eq!(
            paths_from(some("/r/a.sock"), some("/p/b.pid")),
            pair("/r/a.sock", "/p/b.pid")
        );
        let dir = state_dir();
        assert_eq!(
            paths_from(None, None),
            (dir.join("khived.sock"), dir.join("khived.pid"))
        );
        assert_eq!(
            beside("/r/x.sock".as_ref(), "sock"),
            PathBuf::from("/r/x.sock.sock")
        );
    }

    #[test]
    fn truthy_values() {
        for value in ["1", "yes", "true", "TRUE", " on ", "2"] {
            assert!(is_truthy(value), "{value:?}");
        }
        for value in ["", "  ", "0", "false", "False", " FALSE "] {
            assert!(!is_truthy(value), "{value:?}");
        }
    }
}
