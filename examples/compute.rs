//! A daemon whose dispatcher computes inline, as an embedder's first version would: a request
//! whose `ops` starts with `spin:<µs>:` burns that many microseconds of CPU time on the
//! thread that polls it, without ever awaiting, then answers with `ops` (any other `ops` is
//! echoed at once). `bench/cores.sh` measures it against the plain-threads baseline, which
//! does the same work.
//!
//! ```text
//! KHIVE_SOCKET=/tmp/compute/c.sock cargo run --release --example compute
//! KHIVE_THREADS=1 ...    # everything on one thread, for comparison
//! ```

use std::process::ExitCode;
use std::time::Duration;

use khived::{Config, Daemon, Dispatch, DispatchError, Request};
use rustix::time::{clock_gettime, ClockId};

struct Compute;

impl Dispatch for Compute {
    async fn dispatch(&self, request: &Request<'_>) -> Result<String, DispatchError> {
        if let Some(work) = requested(&request.ops) {
            burn(work);
        }
        Ok(request.ops.to_string())
    }

    fn namespace(&self) -> &str {
        "echo"
    }

    fn config_id(&self) -> &str {
        ""
    }
}

/// The CPU work `ops` asks for, if any.
fn requested(ops: &str) -> Option<Duration> {
    let (micros, _) = ops.strip_prefix("spin:")?.split_once(':')?;
    micros.parse().ok().map(Duration::from_micros)
}

/// Burns `work` of this thread's CPU time (not wall time: being preempted does not count).
fn burn(work: Duration) {
    let start = thread_cpu();
    while thread_cpu().saturating_sub(start) < work {
        for _ in 0..64 {
            std::hint::spin_loop();
        }
    }
}

fn thread_cpu() -> Duration {
    let now = clock_gettime(ClockId::ThreadCPUTime);
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

fn main() -> ExitCode {
    khived::init_stderr_logger(log::LevelFilter::Info);
    match Daemon::new(Config::from_env(), Compute).run_blocking() {
        Ok(stopped) => ExitCode::from(stopped.exit_code()),
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
