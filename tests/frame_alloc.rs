//! The frame readers (`read_frame`, and `FrameDecoder` reading ahead as the daemon does)
//! allocate only as bytes arrive: a header announcing 8 MiB followed by nothing must not cost
//! 8 MiB. Checked with the fuzz targets' counting allocator, which
//! records the largest single allocation made by the reading thread.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures_lite::io::AsyncRead;
use khived_oracles::{largest_allocation_while, CountingAllocator};

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

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

/// Feeds `data` to a decoder reading ahead, `piece` bytes at most per read, and returns the
/// bodies it decodes and how the stream ended.
fn decode_all(data: &[u8], piece: usize) -> (Vec<Vec<u8>>, std::io::Result<()>) {
    let mut decoder = khived::FrameDecoder::new();
    let mut rest = data;
    let mut bodies = Vec::new();
    loop {
        match decoder.decode() {
            Ok(Some(body)) => {
                bodies.push(body.to_vec());
                decoder.consume();
                continue;
            }
            Ok(None) => {}
            Err(e) => return (bodies, Err(e)),
        }
        let room = decoder.read_buf();
        let n = piece.min(room.len()).min(rest.len());
        if n == 0 {
            return (bodies, decoder.finish());
        }
        room[..n].copy_from_slice(&rest[..n]);
        rest = &rest[n..];
        decoder.filled(n);
    }
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(body);
    frame
}

#[test]
fn the_daemons_decoder_allocates_only_as_bytes_arrive() {
    let header = (khived::MAX_FRAME_BYTES as u32).to_be_bytes();
    let mut outcome = None;
    let largest = largest_allocation_while(|| outcome = Some(decode_all(&header, 4)));
    let (bodies, end) = outcome.unwrap();
    assert!(bodies.is_empty());
    assert_eq!(
        end.unwrap_err().to_string(),
        "connection closed inside a frame body (0 of 8388608 bytes)"
    );
    assert!(
        largest <= 64 * 1024 + 1024,
        "allocated {largest} bytes for nothing"
    );
}

#[test]
fn pipelined_frames_are_decoded_one_by_one() {
    let big = vec![b'x'; 200_000];
    let mut data = Vec::new();
    for body in [&b"{}"[..], b"", &big, b"[1]"] {
        data.extend(frame(body));
    }
    // In one piece (all frames arrive in few reads) and in odd pieces.
    for piece in [usize::MAX, 7919, 3] {
        let (bodies, end) = decode_all(&data, piece);
        end.unwrap();
        assert_eq!(bodies, [&b"{}"[..], b"", &big, b"[1]"], "piece {piece}");
    }
}

#[test]
fn the_daemons_decoder_refuses_a_header_above_the_cap() {
    let mut data = frame(b"{}");
    data.extend(((khived::MAX_FRAME_BYTES + 1) as u32).to_be_bytes());
    data.extend(b"body");
    let (bodies, end) = decode_all(&data, usize::MAX);
    assert_eq!(bodies, [b"{}"]);
    assert_eq!(
        end.unwrap_err().to_string(),
        "frame too large: 8388609 bytes (limit 8388608)"
    );
}

#[test]
fn a_stream_cut_inside_a_header_is_named() {
    let (bodies, end) = decode_all(&[0, 0], usize::MAX);
    assert!(bodies.is_empty());
    let err = end.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    assert_eq!(
        err.to_string(),
        "connection closed inside a frame header (2 of 4 bytes)"
    );
}
