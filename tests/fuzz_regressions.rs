//! Replays every fuzz seed and every crash the fuzzers ever found (`fuzz/seeds/<target>/`,
//! `fuzz/regressions/<target>/`) through the checks the fuzz targets run (`khived-oracles`,
//! in `fuzz/oracles/`), on stable and without libFuzzer, so that a fixed bug stays fixed.
//!
//! Every file is run even after a failure, and the test fails naming all the files that did.
//! The frame reader's allocation bound is checked as in the fuzz target, with the same
//! counting allocator.

use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use khived_oracles::CountingAllocator;

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Runs `check` on every input file of `target`, and fails with the list of those it panics on.
fn replay(target: &str, check: fn(&[u8])) {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    if !fuzz.join("seeds").is_dir() {
        // A copy of the crate without its fuzz inputs (they live in the repository).
        println!(
            "skipped: no fuzz inputs under {} (run the tests in a clone of the repository)",
            fuzz.display()
        );
        return;
    }
    let mut files = Vec::new();
    for dir in ["seeds", "regressions"] {
        files.extend(inputs(&fuzz.join(dir).join(target)));
    }
    // An empty list would pass without testing anything, for instance with a wrong path.
    assert!(
        files
            .iter()
            .any(|file| file.starts_with(fuzz.join("seeds"))),
        "no seeds found for {target} under {}",
        fuzz.display()
    );
    let mut failed = Vec::new();
    for file in &files {
        let data = fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        if panic::catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
            failed.push(
                file.strip_prefix(&fuzz)
                    .unwrap_or(file)
                    .display()
                    .to_string(),
            );
        }
    }
    assert!(
        failed.is_empty(),
        "{target}: {} of {} inputs failed (see the panics above): {failed:?}",
        failed.len(),
        files.len()
    );
}

/// The files of `dir`, sorted, without hidden ones such as `.gitkeep`; none if it is missing.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.expect("reading a fuzz input directory failed").path())
        .filter(|path| path.is_file())
        .filter(|path| {
            !path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .starts_with('.')
        })
        .collect();
    files.sort();
    files
}

#[test]
fn frame_reader_inputs() {
    replay("frame_reader", khived_oracles::frame_reader);
}

#[test]
fn request_decode_inputs() {
    replay("request_decode", khived_oracles::request_decode);
}

#[test]
fn connection_inputs() {
    replay("connection", khived_oracles::connection);
}

#[test]
fn worker_reply_inputs() {
    replay("worker_reply", khived_oracles::worker_reply);
}
