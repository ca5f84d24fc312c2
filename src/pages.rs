//! Giving the memory of a large buffer back to the system when it is dropped.
//!
//! glibc's `malloc` keeps freed memory for reuse in many cases: after a large block it had
//! mapped on its own is freed, it raises its threshold for mapping (up to 32 MiB), and blocks
//! below it then come from the heap, whose free space is returned only from its top. A burst
//! of large frames could leave the daemon holding hundreds of megabytes for good. So before a
//! buffer above 64 KiB is freed, the whole pages inside it are handed back with
//! `madvise(MADV_DONTNEED)`: whatever the allocator does with the block, those pages no
//! longer count, and the next use of them starts from fresh zeroed pages.
//!
//! Not every large buffer passes through here: a worker's reply read line by line grows by
//! doubling, and each step's old block is freed by the allocator alone. So once a burst is
//! over (the frame memory budget has nothing taken any more), [`trim`] asks glibc to return
//! every whole free page it holds, in every arena: without it, the pool's path kept about
//! 100 MiB after a burst of 4 MiB requests (BENCHMARKS.md, "Large-frame burst").

use crate::wire::READ_CHUNK;

/// Drops `buf`, giving the whole pages inside it (those within 64 KiB-aligned bounds) back
/// to the system first if it is larger than 64 KiB.
pub(crate) fn release(mut buf: Vec<u8>) {
    if buf.capacity() > READ_CHUNK {
        discard_pages(&mut buf);
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn discard_pages(buf: &mut Vec<u8>) {
    use rustix::mm::{madvise, Advice};

    // Aligned to 64 KiB, a multiple of every page size Linux uses, rather than to the page
    // size itself, whose lookup costs more code than the few pages at the ends are worth.
    const ALIGN: usize = 64 * 1024;
    let start = buf.as_mut_ptr() as usize;
    let first = start.next_multiple_of(ALIGN);
    let end = (start + buf.capacity()) / ALIGN * ALIGN;
    if end <= first {
        return;
    }
    let ptr = buf.as_mut_ptr().wrapping_add(first - start);
    // SAFETY: `first..end` is whole pages (64 KiB-aligned, so page-aligned) inside the
    // allocation `buf` owns (its capacity): no other allocation shares them, nor does the
    // allocator's bookkeeping, which lives outside allocated blocks. MADV_DONTNEED only
    // changes what those pages read as (zeros, on the private anonymous memory allocators
    // use), and `buf` is freed right after without being read, so nothing observes it.
    #[allow(unsafe_code)]
    let advised = unsafe { madvise(ptr.cast(), end - first, Advice::LinuxDontNeed) };
    if let Err(e) = advised {
        log::debug!(
            "madvise(MADV_DONTNEED) of a {} byte buffer failed: {e}",
            buf.capacity()
        );
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn discard_pages(_buf: &mut Vec<u8>) {}

/// Returns the allocator's free memory to the system, where the allocator keeps it (glibc).
/// Costs a walk over its free blocks, so it is called once a burst is over, not per buffer.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub(crate) fn trim() {
    // SAFETY: `malloc_trim` takes no pointers and only changes which free pages of the heap
    // are backed by memory; it is thread-safe (it takes each arena's lock).
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Other allocators (musl's, macOS's) return freed memory on their own.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(crate) fn trim() {}

#[cfg(test)]
mod tests {
    #[test]
    fn released_buffers_of_any_size_and_alignment() {
        for len in [0, 1, 4096, 65536, 65537, 100_000, 1 << 20, (1 << 20) + 123] {
            let mut buf = vec![7u8; len];
            buf.truncate(len / 2);
            super::release(buf);
        }
        super::trim();
    }
}
