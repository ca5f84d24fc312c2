//! What a pool runs and the limits it keeps.

use std::ffi::OsString;
use std::time::Duration;

/// How a [`Pool`](super::Pool) runs its workers: the command, how many, and the limits.
///
/// [`PoolOptions::new`] takes the command; every other knob has a default, listed with its
/// field, and a setter of the same name. The fields are public, so a value read from a
/// configuration file can be assigned directly.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use khived::pool::PoolOptions;
///
/// let options = PoolOptions::new(["python3", "worker.py"])
///     .workers(4)
///     .request_timeout(Duration::from_secs(30))
///     .warm("upper warm")
///     .env("MODEL", "small")
///     .namespace("search");
/// assert_eq!(options.queue, 64);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolOptions {
    /// The worker's program and its arguments (default: none, which [`Pool::new`] refuses).
    /// The program is looked up in `PATH` like a shell would.
    ///
    /// [`Pool::new`]: super::Pool::new
    pub command: Vec<OsString>,
    /// Variables added to each worker's environment, which is otherwise the daemon's own
    /// (default: none). Each worker also gets `KHIVED_WORKER_ID`, its id from 1 to `workers`.
    pub env: Vec<(OsString, OsString)>,
    /// How many worker processes run at once (default 1). Each handles one request at a time.
    pub workers: usize,
    /// How many requests may wait for a free worker (default 64). When the queue is full a
    /// request is answered at once with an error starting `daemon_busy:`.
    pub queue: usize,
    /// How long one request may take, counted from when it reaches the pool (default: no
    /// limit). A worker still on it when the time is up is killed and restarted, and the
    /// request answered with an error; a request whose time ran out while it waited in the
    /// queue is answered with `request_timed_out` (not committed) without running. Both
    /// clocks start together under a daemon with the same
    /// [`Config::request_timeout`](crate::Config::request_timeout): the runtime answers the
    /// client, and the worker still on that request is killed right after, instead of
    /// running on for nobody.
    pub request_timeout: Option<Duration>,
    /// Ops sent to each worker once it starts, before it takes requests, so that it loads
    /// what it needs (default: none). A failed warm request is logged. The warm request is
    /// bound by [`request_timeout`](PoolOptions::request_timeout) too, counted from the
    /// worker's start: a worker that dies, breaks the protocol or is still warming then is
    /// restarted, with a back-off that grows however long it warmed, and while no worker
    /// runs, requests fail at once with the reason (`no worker is running: worker N did
    /// not finish warming: …`).
    pub warm: Option<String>,
    /// How long workers get to exit on their own at shutdown, once their stdin is closed,
    /// before they are killed (default 3 s).
    pub shutdown_grace: Duration,
    /// How many lines of each worker's standard error may reach the daemon's log per second,
    /// in bursts of as many (default 200). Lines beyond it are read and dropped, and the log
    /// says how many (`worker N: M stderr lines dropped`) once a second, so a worker that
    /// floods its standard error costs the daemon little and cannot fill its log.
    pub stderr_lines_per_second: u32,
    /// The namespace requests must name (default `"khive"`, as `khived serve` uses).
    pub namespace: String,
    /// The configuration id requests must carry (default `""`).
    pub config_id: String,
}

impl Default for PoolOptions {
    /// Every default, and no command yet.
    fn default() -> Self {
        PoolOptions {
            command: Vec::new(),
            env: Vec::new(),
            workers: 1,
            queue: 64,
            request_timeout: None,
            warm: None,
            shutdown_grace: Duration::from_secs(3),
            stderr_lines_per_second: 200,
            namespace: "khive".to_owned(),
            config_id: String::new(),
        }
    }
}

impl PoolOptions {
    /// The defaults, running `command`: the program, then its arguments.
    ///
    /// ```
    /// let options = khived::pool::PoolOptions::new(["python3", "examples/worker.py"]);
    /// assert_eq!(options.workers, 1);
    /// ```
    pub fn new(command: impl IntoIterator<Item = impl Into<OsString>>) -> Self {
        PoolOptions::default().command(command)
    }

    /// Sets [`command`](PoolOptions::command): the program, then its arguments.
    #[must_use]
    pub fn command(mut self, command: impl IntoIterator<Item = impl Into<OsString>>) -> Self {
        self.command = command.into_iter().map(Into::into).collect();
        self
    }

    /// Adds one variable to [`env`](PoolOptions::env).
    #[must_use]
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Sets [`workers`](PoolOptions::workers).
    #[must_use]
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers;
        self
    }

    /// Sets [`queue`](PoolOptions::queue).
    #[must_use]
    pub fn queue(mut self, queue: usize) -> Self {
        self.queue = queue;
        self
    }

    /// Sets [`request_timeout`](PoolOptions::request_timeout).
    #[must_use]
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = Some(timeout);
        self
    }

    /// Sets [`warm`](PoolOptions::warm).
    #[must_use]
    pub fn warm(mut self, ops: impl Into<String>) -> Self {
        self.warm = Some(ops.into());
        self
    }

    /// Sets [`shutdown_grace`](PoolOptions::shutdown_grace).
    #[must_use]
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// Sets [`stderr_lines_per_second`](PoolOptions::stderr_lines_per_second).
    #[must_use]
    pub fn stderr_lines_per_second(mut self, lines: u32) -> Self {
        self.stderr_lines_per_second = lines;
        self
    }

    /// Sets [`namespace`](PoolOptions::namespace).
    #[must_use]
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// Sets [`config_id`](PoolOptions::config_id).
    #[must_use]
    pub fn config_id(mut self, config_id: impl Into<String>) -> Self {
        self.config_id = config_id.into();
        self
    }

    /// Why these options cannot run a pool, with the fix.
    pub(super) fn check(&self) -> std::io::Result<()> {
        let problem = if self.command.is_empty() {
            "the worker pool has no command: give PoolOptions::new the program and its arguments"
        } else if self.workers == 0 {
            "the worker pool needs at least 1 worker: set PoolOptions::workers to 1 or more"
        } else if self.queue == 0 {
            "the worker pool's queue must hold at least 1 request: set PoolOptions::queue to 1 \
             or more"
        } else if self.stderr_lines_per_second == 0 {
            "the worker pool must let at least 1 stderr line per second through: set \
             PoolOptions::stderr_lines_per_second to 1 or more"
        } else {
            return Ok(());
        };
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            problem,
        ))
    }
}
