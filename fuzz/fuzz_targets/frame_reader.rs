//! Arbitrary bytes through `khived::read_frame`, in chunks the input chooses: the checks of
//! `khived::fuzzing::frame_reader_probed`, plus the one only a binary can make, that no single
//! allocation while reading a frame is larger than the bytes delivered so far plus 64 KiB.
#![no_main]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use khived::fuzzing::{check_read_allocation, ReadStep};
use libfuzzer_sys::fuzz_target;

/// The system allocator, remembering the largest single request since it was last reset.
struct Counting;

/// The largest allocation or reallocation size asked for since the last `ReadStep`.
static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to `System`; the counter only observes sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fuzz_target!(|data: &[u8]| {
    khived::fuzzing::frame_reader_probed(data, &mut |step| match step {
        // What was allocated before a read starts (the checker's own work) does not count.
        ReadStep::FrameStart => LARGEST.store(0, Ordering::Relaxed),
        ReadStep::Delivered(delivered) => {
            check_read_allocation(LARGEST.swap(0, Ordering::Relaxed), delivered)
        }
    });
});
