//! The counting allocator: the system allocator, remembering per thread the largest single
//! allocation asked for since the last reset.
//!
//! Per thread, since tests run in parallel in one process; libFuzzer runs the target on one
//! thread, so the fuzz target uses the same allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// The system allocator, recording the largest allocation (or reallocation) size each thread
/// asks for. Install it in a binary or test with
/// `#[global_allocator] static ALLOCATOR: CountingAllocator = CountingAllocator;`: the frame
/// reader check needs it and fails without it.
#[derive(Debug)]
pub struct CountingAllocator;

thread_local! {
    /// The largest allocation this thread asked for since the last reset.
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: the allocator is also called while thread-locals are being torn down.
    let _ = LARGEST.try_with(|largest| largest.set(largest.get().max(size)));
}

/// The largest allocation this thread asked for since the previous call, which resets it.
pub(crate) fn take_largest() -> usize {
    LARGEST.with(|largest| largest.replace(0))
}

/// Runs `f` and returns the largest single allocation the current thread made during it.
///
/// # Panics
///
/// If [`CountingAllocator`] is not the global allocator: every answer would be 0.
pub fn largest_allocation_while(f: impl FnOnce()) -> usize {
    assert_installed();
    take_largest();
    f();
    take_largest()
}

/// Panics unless allocations are being counted.
pub(crate) fn assert_installed() {
    take_largest();
    let probe: Vec<u8> = Vec::with_capacity(std::hint::black_box(4000));
    drop(std::hint::black_box(probe));
    assert!(
        take_largest() >= 4000,
        "allocations are not counted: install khived_oracles::CountingAllocator as the \
         #[global_allocator] of this binary"
    );
}

// SAFETY: every call is forwarded unchanged to the system allocator; the bookkeeping is a
// thread-local `Cell` with a constant initializer, which allocates nothing.
unsafe impl GlobalAlloc for CountingAllocator {
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
