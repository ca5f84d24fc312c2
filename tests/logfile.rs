//! `RotatingFile` and the file logger where a scenario changes the whole process: standard
//! error pointed at the log, the open-file limit lowered, the process's logger installed. Each runs in a child: this test binary runs itself
//! again, that one test only, with `KHIVED_TEST_LOG_CHILD` set to the log's path.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use khived::RotatingFile;

const CHILD: &str = "KHIVED_TEST_LOG_CHILD";

/// Runs test `name` again in a child process, logging to `path`, and asserts it passed.
fn run_in_child(name: &str, path: &Path) {
    let status = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture"])
        .env(CHILD, path)
        .status()
        .unwrap();
    assert!(status.success(), "the child failed: {status}");
}

#[test]
fn standard_error_follows_the_newest_file_after_rotation() {
    if let Some(path) = std::env::var_os(CHILD) {
        // The child: log enough to rotate twice, then write to standard error directly.
        let mut log = RotatingFile::open(path)
            .unwrap()
            .max_bytes(64)
            .keep(2)
            .redirect_stderr()
            .unwrap();
        for i in 0..6 {
            log.write_all(format!("record {i} xxxxxxxxxxxxxxxxxxxx\n").as_bytes())
                .unwrap();
        }
        std::io::stderr()
            .write_all(b"written to standard error\n")
            .unwrap();
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("daemon.log");
    run_in_child(
        "standard_error_follows_the_newest_file_after_rotation",
        &path,
    );

    let newest = std::fs::read_to_string(&path).unwrap();
    let older = std::fs::read_to_string(dir.path().join("daemon.log.1")).unwrap();
    assert!(
        older.contains("record 3"),
        "rotation did not happen: {older:?}"
    );
    assert!(
        newest.contains("record 5") && newest.contains("written to standard error"),
        "standard error did not follow the rotation: newest {newest:?}, older {older:?}"
    );
    assert!(!older.contains("standard error"), "{older:?}");
}

/// Lowers the soft limit on open files to the lowest free descriptor, so that no file can be
/// opened; returns the limit before, for `set_open_file_limit`.
fn leave_no_descriptor_free() -> u64 {
    use std::os::fd::AsRawFd;
    let lowest_free = std::fs::File::open("/dev/null").unwrap().as_raw_fd();
    let before = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
    set_open_file_limit(lowest_free as u64);
    before.unwrap_or(1024)
}

/// Sets the process's soft limit on open files.
fn set_open_file_limit(limit: u64) {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut rlimit = getrlimit(Resource::Nofile);
    rlimit.current = Some(limit);
    setrlimit(Resource::Nofile, rlimit).unwrap();
}

#[test]
fn a_rotation_that_cannot_open_the_new_file_loses_no_old_file_and_recovers() {
    let record = |i: u32| format!("record {i} xxxxxxxxxxxxxxxxxxxx\n");
    if let Some(path) = std::env::var_os(CHILD) {
        // The child: two records fill the file; the third rotates it while no descriptor is
        // free.
        let path = Path::new(&path);
        let old = |n: u32| {
            let mut name = path.as_os_str().to_owned();
            name.push(format!(".{n}"));
            std::path::PathBuf::from(name)
        };
        let mut log = RotatingFile::open(path).unwrap().max_bytes(64).keep(2);
        log.write_all(record(0).as_bytes()).unwrap();
        log.write_all(record(1).as_bytes()).unwrap();
        let before = leave_no_descriptor_free();
        for i in 2..5 {
            let error = log.write_all(record(i).as_bytes()).unwrap_err();
            assert!(
                error.to_string().contains("cannot open log file"),
                "{error}"
            );
        }
        // The failed attempts moved the full file once, and no further (`exists` needs no
        // descriptor; reading does).
        assert!(!path.exists());
        assert!(!old(2).exists(), "a retry moved the old files again");
        set_open_file_limit(before);
        assert_eq!(
            std::fs::read_to_string(old(1)).unwrap(),
            record(0) + &record(1)
        );
        log.write_all(record(5).as_bytes()).unwrap();
        log.write_all(record(6).as_bytes()).unwrap();
        log.write_all(record(7).as_bytes()).unwrap();
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("daemon.log");
    run_in_child(
        "a_rotation_that_cannot_open_the_new_file_loses_no_old_file_and_recovers",
        &path,
    );
    // Logging went on once descriptors were back, and rotated as before.
    let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap();
    assert_eq!(read("daemon.log"), record(7));
    assert_eq!(read("daemon.log.1"), record(5) + &record(6));
    assert_eq!(read("daemon.log.2"), record(0) + &record(1));
    assert!(!dir.path().join("daemon.log.3").exists());
}

/// The file logger counts the records it could not write (a rotation out of descriptors)
/// in a warning before the next record it writes: a gap in the log is never silent.
#[test]
fn records_the_file_logger_could_not_write_are_counted_in_the_log() {
    let padding = "x".repeat(400);
    if let Some(path) = std::env::var_os(CHILD) {
        // The child: two records of about 480 bytes fill the file; the third rotates it
        // while no descriptor is free, and so do the two after it.
        let file = RotatingFile::open(path).unwrap().max_bytes(1024).keep(1);
        assert!(khived::init_file_logger(file, log::LevelFilter::Info));
        log::info!("record 0 {padding}");
        log::info!("record 1 {padding}");
        let before = leave_no_descriptor_free();
        for i in 2..5 {
            log::info!("record {i} {padding}");
        }
        set_open_file_limit(before);
        log::info!("record 5 {padding}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("daemon.log");
    run_in_child(
        "records_the_file_logger_could_not_write_are_counted_in_the_log",
        &path,
    );
    let old = std::fs::read_to_string(dir.path().join("daemon.log.1")).unwrap();
    assert!(
        old.contains(" INFO record 0 ") && old.contains(" INFO record 1 "),
        "{old}"
    );
    let current = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = current.lines().collect();
    assert_eq!(lines.len(), 2, "{current}");
    assert!(
        lines[0].contains(" WARN 3 log record(s) before this one were lost: cannot open log file")
            && lines[0].ends_with("Too many open files (os error 24)"),
        "{}",
        lines[0]
    );
    assert!(lines[1].contains(" INFO record 5 "), "{}", lines[1]);
}
