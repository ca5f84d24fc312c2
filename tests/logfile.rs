//! A `RotatingFile` that owns standard error keeps it on the newest file after a rotation.
//!
//! Pointing standard error elsewhere changes the whole process, so the scenario runs in a
//! child: this test binary runs itself again with `KHIVED_TEST_STDERR_LOG` set.

use std::io::Write;
use std::process::Command;

use khived::RotatingFile;

const CHILD: &str = "KHIVED_TEST_STDERR_LOG";

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
    let status = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "standard_error_follows_the_newest_file_after_rotation",
            "--nocapture",
        ])
        .env(CHILD, &path)
        .status()
        .unwrap();
    assert!(status.success(), "the child failed: {status}");

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
