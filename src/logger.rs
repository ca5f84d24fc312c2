//! A minimal logger for daemons that have none: one line per record on standard error.

use std::io::Write;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use log::{LevelFilter, Log, Metadata, Record};

struct StderrLogger;

static LOGGER: StderrLogger = StderrLogger;

/// Sends `log` records up to `level` to standard error as
/// `2026-11-26T07:00:00.123Z NAME[PID] INFO message`, where NAME is the file name of the
/// program that embeds the daemon (`khived` for the `khived` binary). Returns `false` (and changes nothing)
/// if the application has installed a logger already.
///
/// # Examples
///
/// ```
/// khived::init_stderr_logger(log::LevelFilter::Info);
/// log::info!("ready");
/// ```
pub fn init_stderr_logger(level: LevelFilter) -> bool {
    if log::set_logger(&LOGGER).is_err() {
        return false;
    }
    log::set_max_level(level);
    true
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        // One write per line, so lines from several threads do not interleave.
        let line = format!(
            "{} {}[{}] {} {}\n",
            timestamp(SystemTime::now()),
            program_name(),
            std::process::id(),
            record.level(),
            record.args()
        );
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// The name the running program was started under (the file name of its first argument), so
/// that the log and error messages of a daemon name the embedding program, not this crate.
pub(crate) fn program_name() -> &'static str {
    static NAME: OnceLock<String> = OnceLock::new();
    NAME.get_or_init(|| {
        std::env::args_os()
            .next()
            .and_then(|arg0| Path::new(&arg0).file_name().map(|name| name.to_owned()))
            .map(|name| name.to_string_lossy().into_owned())
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| "daemon".to_owned())
    })
}

/// UTC time in RFC 3339 form, without pulling in a date crate.
fn timestamp(now: SystemTime) -> String {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::timestamp;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn timestamps_are_utc_civil_time() {
        let at = |secs| timestamp(UNIX_EPOCH + Duration::from_millis(secs));
        assert_eq!(at(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(at(1_795_680_000_123), "2026-11-26T08:00:00.123Z");
    }
}
