//! A minimal logger for daemons that have none: one line per record, on standard error or
//! into a size-bounded [`RotatingFile`].

use std::fmt::{self, Write as _};
use std::io::{self, Write};
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use log::{Level, LevelFilter, Log, Metadata, Record};

use crate::logfile::RotatingFile;

/// Lines to standard error.
struct StderrLogger;

/// Lines to a log file. A type of its own, so that a program that logs to standard error
/// carries none of the file's code.
struct FileLogger(Mutex<FileSink>);

/// The log file, and the records that could not be written to it since the last one that
/// was (out of descriptors for a rotation, or out of disk): the next record that is written
/// follows a warning that counts them, so that a gap in the log is never silent.
struct FileSink {
    file: RotatingFile,
    lost: u64,
    error: Option<io::Error>,
}

impl FileSink {
    fn write(&mut self, line: &str) {
        if let Some(error) = &self.error {
            let note = format_args!(
                "{} log record(s) before this one were lost: {error}",
                self.lost
            );
            if self
                .file
                .write_all(record_line(Level::Warn, note).as_bytes())
                .is_err()
            {
                self.lost += 1;
                return;
            }
            self.lost = 0;
            self.error = None;
        }
        // Cut to fit a whole file: the file cuts a longer write itself, and `write_all` would
        // write the rest into the next files, rotating out every line before it.
        let line = fit(line, self.file.file_bytes());
        if let Err(e) = self.file.write_all(line.as_bytes()) {
            self.lost += 1;
            self.error = Some(e);
        }
    }
}

/// `line`, cut to `most` bytes if it is longer, still ending with a newline.
fn fit(line: &str, most: u64) -> std::borrow::Cow<'_, str> {
    const CUT: &str = " [cut]\n";
    let most = usize::try_from(most).unwrap_or(usize::MAX);
    if line.len() <= most {
        return line.into();
    }
    // A file too small for the mark keeps the newline alone.
    let tail = if most >= CUT.len() { CUT } else { "\n" };
    let mut end = most.saturating_sub(tail.len());
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    let mut cut = line[..end].to_owned();
    cut.push_str(tail);
    cut.into()
}

static STDERR_LOGGER: StderrLogger = StderrLogger;
static FILE_LOGGER: OnceLock<FileLogger> = OnceLock::new();

/// The longest record written, newline included: longer messages are cut, so that one
/// record cannot take a whole log file.
const LONGEST_RECORD: usize = 64 * 1024;

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
    install(&STDERR_LOGGER, level)
}

/// Sends `log` records up to `level` to `file`, in the same form as
/// [`init_stderr_logger`], so that the daemon's log cannot fill the disk: the file is
/// rotated at its size limit (16 MiB and two old files unless set otherwise). Returns
/// `false` if a logger is installed already: records then go where they went, and the file
/// (this one, or the one a first call was given) stays open, unused, for the life of the
/// process.
///
/// Only records go to the file: standard error is left alone, so a panic message still goes
/// wherever it points.
///
/// A record that cannot be written (the file could not be opened again at a rotation, out
/// of descriptors say, or the disk is full) is counted, and the next one that is written
/// follows a warning that says how many were lost and why, so a gap in the log is never
/// silent.
///
/// ```no_run
/// use khived::RotatingFile;
///
/// let file = RotatingFile::open("/var/log/mydaemon.log")?;
/// khived::init_file_logger(file, log::LevelFilter::Info);
/// log::info!("ready");
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn init_file_logger(file: RotatingFile, level: LevelFilter) -> bool {
    let mut file = Some(file);
    let logger = FILE_LOGGER.get_or_init(|| {
        FileLogger(Mutex::new(FileSink {
            file: file.take().unwrap(),
            lost: 0,
            error: None,
        }))
    });
    // A second call finds the first file in place: that logger may already be installed.
    if file.is_some() {
        return false;
    }
    install(logger, level)
}

fn install(logger: &'static dyn Log, level: LevelFilter) -> bool {
    if log::set_logger(logger).is_err() {
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
        if self.enabled(record.metadata()) {
            // One write per line, so lines from several threads do not interleave.
            let line = record_line(record.level(), *record.args());
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
        }
    }

    fn flush(&self) {}
}

impl Log for FileLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if self.enabled(record.metadata()) {
            let line = record_line(record.level(), *record.args());
            let mut sink = self.0.lock().unwrap_or_else(|e| e.into_inner());
            sink.write(&line);
        }
    }

    fn flush(&self) {}
}

/// One record as a line: `2026-11-26T07:00:00.123Z NAME[PID] LEVEL message`, newline
/// included, cut to [`LONGEST_RECORD`].
fn record_line(level: Level, message: fmt::Arguments<'_>) -> String {
    let mut line = timestamp(SystemTime::now());
    let _ = write!(
        line,
        " {}[{}] {level} {message}",
        program_name(),
        std::process::id(),
    );
    if line.len() >= LONGEST_RECORD {
        let mut end = LONGEST_RECORD - 16;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        line.truncate(end);
        line.push_str(" [cut]");
    }
    line.push('\n');
    line
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
    use super::{init_file_logger, timestamp, LevelFilter};
    use crate::RotatingFile;
    use std::time::{Duration, UNIX_EPOCH};

    // The only test here that installs the process's logger.
    #[test]
    fn the_file_logger_keeps_its_files_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("daemon.log");
        let file = RotatingFile::open(&path).unwrap().max_bytes(4096).keep(1);
        assert!(init_file_logger(file, LevelFilter::Info));
        log::info!("{}", "x".repeat(200_000));
        for i in 0..1000 {
            log::info!("record {i}");
        }
        log::debug!("not at this level");
        let current = std::fs::read_to_string(&path).unwrap();
        let old = std::fs::read_to_string(dir.path().join("daemon.log.1")).unwrap();
        assert!(current.len() <= 4096 && old.len() <= 4096);
        assert!(!dir.path().join("daemon.log.2").exists());
        assert!(current.ends_with(" INFO record 999\n"), "{current}");
        assert!(!current.contains("not at this level"));
        let file = RotatingFile::open(dir.path().join("other.log")).unwrap();
        assert!(!init_file_logger(file, LevelFilter::Info));
    }

    /// A record longer than a whole file goes into one file, cut, rather than through as
    /// many files as it fills, which pushed every line before it out.
    #[test]
    fn a_record_longer_than_a_file_is_cut_to_fit_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("daemon.log");
        let mut sink = super::FileSink {
            file: RotatingFile::open(&path).unwrap().max_bytes(4096).keep(2),
            lost: 0,
            error: None,
        };
        sink.write("the line before\n");
        sink.write(&format!("{}\n", "x".repeat(200_000)));
        sink.write("the line after\n");
        let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap();
        assert_eq!(read("daemon.log.2"), "the line before\n");
        let cut = read("daemon.log.1");
        assert_eq!(cut.len(), 4096);
        assert!(
            cut.starts_with("xxx") && cut.ends_with("x [cut]\n"),
            "{cut}"
        );
        assert_eq!(read("daemon.log"), "the line after\n");
        assert_eq!(super::fit("abc\n", 2), "a\n");
        assert_eq!(super::fit(&"\u{e9}".repeat(5), 9), "\u{e9} [cut]\n");
    }

    #[test]
    fn timestamps_are_utc_civil_time() {
        let at = |secs| timestamp(UNIX_EPOCH + Duration::from_millis(secs));
        assert_eq!(at(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(at(1_795_680_000_123), "2026-11-26T08:00:00.123Z");
    }
}
