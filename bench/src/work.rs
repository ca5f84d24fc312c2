//! The CPU work a request can ask for, so that both servers compute the same thing.
//!
//! An `ops` that starts with `spin:<µs>:` makes the server burn that many microseconds of
//! its thread's CPU time before it answers (the answer is still `ops`). CPU time, not wall
//! time: a thread that is preempted halfway does not get its work done for free, so a server
//! with more threads than cores cannot look faster than it is.

use std::time::Duration;

use rustix::time::{clock_gettime, ClockId};

/// The `ops` of a request asking for `micros` of CPU work, followed by `payload`.
pub fn ops(micros: u64, payload: &str) -> String {
    if micros == 0 {
        return payload.to_owned();
    }
    format!("spin:{micros}:{payload}")
}

/// The CPU work `ops` asks for, if any.
pub fn requested(ops: &str) -> Option<Duration> {
    let (micros, _) = ops.strip_prefix("spin:")?.split_once(':')?;
    micros.parse().ok().map(Duration::from_micros)
}

/// Burns `work` of this thread's CPU time.
pub fn burn(work: Duration) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spin_prefix() {
        assert_eq!(
            requested(&ops(200, "abc")),
            Some(Duration::from_micros(200))
        );
        assert_eq!(requested(&ops(0, "abc")), None);
        assert_eq!(requested("spin:x:abc"), None);
        assert_eq!(requested("abc"), None);
        burn(Duration::from_micros(50));
    }
}
