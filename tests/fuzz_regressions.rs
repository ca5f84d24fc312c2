//! Replays every fuzz seed and every crash the fuzzers ever found (`fuzz/seeds/<target>/`,
//! `fuzz/regressions/<target>/`) through the checks in `khived::fuzzing`, on stable and
//! without libFuzzer, so that a fixed bug stays fixed.
//!
//! Every file is run even after a failure, and the test fails naming all the files that did.
//! The frame reader's allocation bound is checked as in the fuzz target, with a global
//! allocator that records the largest allocation, here per thread since tests run in parallel.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use khived::fuzzing::{check_read_allocation, ReadStep};

struct Recording;

thread_local! {
    /// The largest allocation this thread asked for since the last reset.
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: the allocator is also called while thread-locals are being torn down.
    let _ = LARGEST.try_with(|largest| largest.set(largest.get().max(size)));
}

fn take_largest() -> usize {
    LARGEST.with(|largest| largest.replace(0))
}

// SAFETY: every call is forwarded unchanged to the system allocator; the thread-local
// bookkeeping allocates nothing.
#[allow(unsafe_code)] // a global allocator cannot be written without it
unsafe impl GlobalAlloc for Recording {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        System.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: Recording = Recording;

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

/// `khived::fuzzing::frame_reader` with the allocation bound, as the fuzz target runs it.
fn frame_reader_with_allocations(data: &[u8]) {
    khived::fuzzing::frame_reader_probed(data, &mut |step| match step {
        // What was allocated before a read starts (the checker's own work) does not count.
        ReadStep::FrameStart => drop(take_largest()),
        ReadStep::Delivered(delivered) => check_read_allocation(take_largest(), delivered),
    });
}

#[test]
fn frame_reader_inputs() {
    replay("frame_reader", frame_reader_with_allocations);
}

#[test]
fn request_decode_inputs() {
    replay("request_decode", khived::fuzzing::request_decode);
}

#[test]
fn connection_inputs() {
    replay("connection", khived::fuzzing::connection);
}

#[test]
fn worker_reply_inputs() {
    replay("worker_reply", khived::fuzzing::worker_reply);
}
