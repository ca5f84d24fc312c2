//! Giving the memory of a large buffer back to the system when it is dropped.
//!
//! glibc's `malloc` keeps freed memory for reuse in many cases: after a large block it had
//! mapped on its own is freed, it raises its threshold for mapping (up to 32 MiB), and blocks
//! below it then come from the heap, whose free space is returned only from its top. A burst
//! of large frames could leave the daemon holding hundreds of megabytes for good. So before a
//! buffer above 64 KiB is freed, the whole pages inside it are handed back with
//! `madvise(MADV_DONTNEED)`: whatever the allocator does with the block, those pages no
//! longer count, and the next use of them starts from fresh zeroed pages.

use crate::wire::READ_CHUNK;

/// Drops `buf`, giving the whole pages inside it back to the system first if it is larger
/// than 64 KiB.
pub(crate) fn release(mut buf: Vec<u8>) {
    if buf.capacity() > READ_CHUNK {
        discard_pages(&mut buf);
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn discard_pages(buf: &mut Vec<u8>) {
    use rustix::mm::{madvise, Advice};

    let page = rustix::param::page_size();
    let start = buf.as_mut_ptr() as usize;
    let first = start.next_multiple_of(page);
    let end = (start + buf.capacity()) / page * page;
    if end <= first {
        return;
    }
    let ptr = buf.as_mut_ptr().wrapping_add(first - start);
    // SAFETY: `first..end` consists of whole pages inside the allocation `buf` owns (the
    // vector's capacity), which nothing else refers to and which is freed right after,
    // unread. On private anonymous memory, where every allocation lives, MADV_DONTNEED only
    // makes those pages read as zeros from now on: the same as writing zeros into a `[u8]`
    // we own, which has no invalid values. The allocator keeps none of its bookkeeping inside
    // an allocated block.
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

#[cfg(test)]
mod tests {
    #[test]
    fn released_buffers_of_any_size_and_alignment() {
        for len in [0, 1, 4096, 65536, 65537, 100_000, 1 << 20, (1 << 20) + 123] {
            let mut buf = vec![7u8; len];
            buf.truncate(len / 2);
            super::release(buf);
        }
    }
}
