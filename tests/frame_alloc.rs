//! The frame reader allocates only as bytes arrive: a header announcing 8 MiB followed by
//! nothing must not cost 8 MiB. Checked with a global allocator that records the largest
//! single allocation made by this test binary's reading thread.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_lite::io::AsyncRead;

struct Recording;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|largest| largest.set(largest.get().max(size)));
}

// SAFETY: every call is forwarded unchanged to the system allocator; the thread-local
// bookkeeping allocates nothing.
#[allow(unsafe_code)] // a global allocator cannot be written without it
unsafe impl GlobalAlloc for Recording {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: Recording = Recording;

/// A peer that sends `data` in pieces of `piece` bytes, then ends the stream.
struct Trickle<'a> {
    data: &'a [u8],
    piece: usize,
}

impl AsyncRead for Trickle<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        let n = self.piece.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Poll::Ready(Ok(n))
    }
}

fn largest_allocation_while(f: impl FnOnce()) -> usize {
    LARGEST.with(|largest| largest.set(0));
    f();
    LARGEST.with(|largest| largest.get())
}

#[test]
fn header_announcing_the_cap_then_silence_allocates_little() {
    let header = (khived::MAX_FRAME_BYTES as u32).to_be_bytes();
    let largest = largest_allocation_while(|| {
        let mut peer = Trickle {
            data: &header,
            piece: 4,
        };
        let err = futures_lite::future::block_on(khived::read_frame(&mut peer)).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    });
    assert!(
        largest <= 64 * 1024 + 1024,
        "allocated {largest} bytes for nothing"
    );
}

#[test]
fn a_frame_body_grows_with_the_bytes_that_arrive() {
    // 1 MiB announced, 100 KiB sent in small pieces.
    let mut data = (1u32 << 20).to_be_bytes().to_vec();
    data.extend(vec![b'x'; 100 * 1024]);
    let largest = largest_allocation_while(|| {
        let mut peer = Trickle {
            data: &data,
            piece: 1000,
        };
        assert!(futures_lite::future::block_on(khived::read_frame(&mut peer)).is_err());
    });
    assert!(
        largest <= 100 * 1024 + 64 * 1024 + 1024,
        "allocated {largest} bytes"
    );
}

#[test]
fn a_whole_frame_is_returned_exactly() {
    let body: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
    let mut data = (body.len() as u32).to_be_bytes().to_vec();
    data.extend(&body);
    data.extend(b"next frame");
    let mut peer = Trickle {
        data: &data,
        piece: 7919,
    };
    let read = futures_lite::future::block_on(khived::read_frame(&mut peer)).unwrap();
    assert_eq!(read, body);
    assert_eq!(peer.data, b"next frame", "nothing read past the frame");
}

#[test]
fn a_header_above_the_cap_is_refused_before_the_body() {
    let mut data = ((khived::MAX_FRAME_BYTES + 1) as u32)
        .to_be_bytes()
        .to_vec();
    data.extend(b"body");
    let mut peer = Trickle {
        data: &data,
        piece: 100,
    };
    let err = futures_lite::future::block_on(khived::read_frame(&mut peer)).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    assert_eq!(
        err.to_string(),
        "frame too large: 8388609 bytes (limit 8388608)"
    );
    assert_eq!(peer.data, b"body", "the body is not read");
}

#[test]
fn a_frame_above_the_cap_cannot_be_made() {
    let body = vec![b'x'; khived::MAX_FRAME_BYTES + 1];
    let err = khived::Frame::from_body(&body).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    let ops = "x".repeat(khived::MAX_FRAME_BYTES);
    let err = khived::encode_frame(&khived::Request::new(ops, "n", "")).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    // At the cap it is made, and written as it is: one header, then the body.
    let frame = khived::Frame::from_body(&body[1..]).unwrap();
    let mut wire = Vec::new();
    futures_lite::future::block_on(khived::write_frame(&mut wire, &frame)).unwrap();
    assert_eq!(wire.len(), 4 + khived::MAX_FRAME_BYTES);
    assert_eq!(wire[..4], (khived::MAX_FRAME_BYTES as u32).to_be_bytes());
}
