//! Frame decoding, as the client reads responses and as the daemon reads requests.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_lite::future;
use futures_lite::io::{AsyncRead, AsyncReadExt};
use khived::{read_frame, FrameDecoder, MAX_FRAME_BYTES};

use crate::alloc::{assert_installed, take_largest};

/// How far ahead of the bytes that have arrived a frame reader promises to allocate (the docs
/// of `read_frame` and `FrameDecoder` say 64 KiB). Written out here rather than taken from
/// the library, so that a change of the promise is a decision and not a side effect.
pub const READ_AHEAD: usize = 64 * 1024;

/// Allocations a frame read may make besides its buffer: the error message of a short read,
/// the executor's waker on first use.
pub const ALLOCATION_SLACK: usize = 4 * 1024;

/// Feeds a byte stream, in chunks chosen by the input, to both of khived's frame readers: to
/// `read_frame` one call per frame (the client's way), and to one [`FrameDecoder`] reading
/// ahead across frames (the daemon's way, requests pipelined on a connection). Every outcome
/// is checked against a plain parse of the same stream: each frame comes back whole, equal to
/// what was sent and within the cap; `read_frame` never reads past the frame it returns; a
/// header above the cap is refused (by `read_frame` before any body byte is read); a stream
/// that ends inside a frame is an `UnexpectedEof` error; and no single allocation while a
/// frame is read is larger than the bytes of it delivered so far plus [`READ_AHEAD`] and
/// [`ALLOCATION_SLACK`].
///
/// Input layout: `(data[0] % 8) + 1` bytes after the first one form a read pattern, and the
/// rest is the stream. The pattern is cycled, one byte per `poll_read`: 0 answers
/// `Interrupted`, 1 answers `Pending` (and wakes at once), 2..=200 deliver up to `b - 1` bytes,
/// 201..=255 up to `(b - 200) * 4096` bytes. Two stalls in a row become a 1-byte read, so that
/// every input ends.
///
/// # Panics
///
/// Besides a broken property: if [`CountingAllocator`](crate::CountingAllocator) is not the
/// global allocator, since the allocation bound could not be checked.
pub fn frame_reader(data: &[u8]) {
    assert_installed();
    let pattern_len = data.first().map_or(0, |b| usize::from(b % 8) + 1);
    let pattern_end = (1 + pattern_len).min(data.len());
    let pattern = data.get(1..pattern_end).filter(|p| !p.is_empty());
    let pattern = pattern.unwrap_or(&[255]);
    let stream = &data[pattern_end..];
    client_side(ChunkedReader::new(stream, pattern, "read_frame"));
    daemon_side(ChunkedReader::new(
        stream,
        pattern,
        "a FrameDecoder reading ahead",
    ));
}

/// `read_frame`, called once per frame until the stream fails.
fn client_side(mut reader: ChunkedReader<'_>) {
    let stream = reader.stream;
    loop {
        let start = reader.pos;
        reader.frame_start = start;
        // What was allocated before a read starts (the checker's own work) does not count.
        take_largest();
        let outcome = future::block_on(read_frame(&mut reader));
        reader.check_allocations();
        let expected = next_frame(&stream[start..]);
        match (outcome, expected) {
            (Ok(frame), Parsed::Frame(body)) => {
                assert!(
                    frame.len() <= MAX_FRAME_BYTES,
                    "frame above the cap returned"
                );
                assert!(
                    frame == body,
                    "read_frame: frame at offset {start} differs from what was sent ({} bytes \
                     returned, {} sent)",
                    frame.len(),
                    body.len()
                );
                assert_eq!(
                    reader.pos,
                    start + 4 + body.len(),
                    "read_frame consumed bytes past the frame at offset {start}"
                );
            }
            (Err(e), Parsed::TooLarge(len)) => {
                check_too_large(&e, len, "read_frame");
                assert_eq!(
                    reader.pos,
                    start + 4,
                    "read_frame read body bytes after a header above the cap"
                );
                return;
            }
            (Err(e), Parsed::Truncated) => {
                assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "short read: {e}");
                return;
            }
            (outcome, expected) => panic!(
                "frame at offset {start}: read_frame gave {:?}, the stream holds {expected:?}",
                outcome.map(|frame| frame.len())
            ),
        }
    }
}

/// One [`FrameDecoder`] for the whole stream, reading as much as it has room for, as the
/// daemon does on a connection.
fn daemon_side(mut reader: ChunkedReader<'_>) {
    let stream = reader.stream;
    let mut decoder = FrameDecoder::new();
    take_largest();
    future::block_on(async {
        loop {
            let start = reader.frame_start;
            let expected = next_frame(&stream[start..]);
            match decoder.decode() {
                Ok(Some(frame)) => {
                    let Parsed::Frame(body) = expected else {
                        panic!(
                            "FrameDecoder: a {}-byte frame at offset {start}, where the stream \
                             holds {expected:?}",
                            frame.len()
                        );
                    };
                    assert!(
                        frame == body,
                        "FrameDecoder: frame at offset {start} differs from what was sent \
                         ({} bytes returned, {} sent)",
                        frame.len(),
                        body.len()
                    );
                    decoder.consume();
                    reader.frame_start = start + 4 + body.len();
                    // The next frame may be buffered already.
                    continue;
                }
                Ok(None) => {}
                Err(e) => {
                    let Parsed::TooLarge(len) = expected else {
                        panic!("FrameDecoder: {e} at offset {start}, the stream holds {expected:?}")
                    };
                    check_too_large(&e, len, "FrameDecoder");
                    return;
                }
            }
            assert_eq!(
                decoder.buffered(),
                reader.pos - reader.frame_start,
                "FrameDecoder: buffered() does not count the bytes delivered and not consumed"
            );
            let room = decoder.read_buf();
            assert!(
                !room.is_empty(),
                "FrameDecoder: no room to read into while the frame at offset {} is incomplete",
                reader.frame_start
            );
            match reader.read(room).await {
                Ok(0) => break,
                Ok(n) => decoder.filled(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => panic!("the test reader failed: {e}"),
            }
        }
        let rest = &stream[reader.frame_start..];
        match (decoder.finish(), next_frame(rest)) {
            (Ok(()), _) if rest.is_empty() => {}
            (Err(e), Parsed::Truncated) if !rest.is_empty() => {
                assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "short read: {e}");
                assert!(
                    e.to_string()
                        .starts_with("connection closed inside a frame "),
                    "FrameDecoder: the error for a cut-short frame does not say so: {e}"
                );
            }
            (outcome, expected) => panic!(
                "FrameDecoder: at the end of the stream finish() gave {outcome:?}, with {} \
                 bytes left holding {expected:?}",
                rest.len()
            ),
        }
        reader.check_allocations();
    });
}

fn check_too_large(e: &io::Error, len: usize, reader: &str) {
    assert_eq!(
        e.kind(),
        io::ErrorKind::InvalidData,
        "{reader}: too large: {e}"
    );
    let message = e.to_string();
    assert!(
        message.contains(&len.to_string()) && message.contains(&MAX_FRAME_BYTES.to_string()),
        "{reader}: the error for a {len}-byte header does not name both numbers: {message}"
    );
}

/// The next frame of a stream, parsed the plain way.
#[derive(Debug)]
pub(crate) enum Parsed<'a> {
    /// A complete frame's body.
    Frame(&'a [u8]),
    /// A header announcing more than the cap.
    TooLarge(usize),
    /// The stream ends inside a frame, or before one.
    Truncated,
}

pub(crate) fn next_frame(stream: &[u8]) -> Parsed<'_> {
    let Some(header) = stream.first_chunk::<4>() else {
        return Parsed::Truncated;
    };
    let len = u32::from_be_bytes(*header) as usize;
    if len > MAX_FRAME_BYTES {
        return Parsed::TooLarge(len);
    }
    match stream.get(4..4 + len) {
        Some(body) => Parsed::Frame(body),
        None => Parsed::Truncated,
    }
}

/// A stream that hands its bytes over in the chunks its pattern says, and checks the
/// reader's allocations each time it is asked for more.
struct ChunkedReader<'a> {
    stream: &'a [u8],
    pos: usize,
    pattern: &'a [u8],
    step: usize,
    /// The previous answer was `Interrupted` or `Pending`.
    stalled: bool,
    /// Where the frame being read starts: the bytes delivered since count for its allocations.
    frame_start: usize,
    /// The reader under test, for messages.
    reader: &'static str,
}

impl<'a> ChunkedReader<'a> {
    fn new(stream: &'a [u8], pattern: &'a [u8], reader: &'static str) -> Self {
        ChunkedReader {
            stream,
            pos: 0,
            pattern,
            step: 0,
            stalled: false,
            frame_start: 0,
            reader,
        }
    }

    /// Checks every allocation since the previous check against the bytes of the current
    /// frame delivered so far.
    fn check_allocations(&self) {
        let largest = take_largest();
        let delivered = self.pos - self.frame_start;
        let allowed = delivered + READ_AHEAD + ALLOCATION_SLACK;
        assert!(
            largest <= allowed,
            "{} allocated {largest} bytes at once when only {delivered} bytes of the frame at \
             offset {} had arrived (allowed: {allowed})",
            self.reader,
            self.frame_start
        );
    }
}

impl AsyncRead for ChunkedReader<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // The reader has made its room for this read: what it allocated is checked now.
        this.check_allocations();
        let b = this.pattern[this.step % this.pattern.len()];
        this.step += 1;
        if !this.stalled && b <= 1 {
            this.stalled = true;
            if b == 0 {
                return Poll::Ready(Err(io::ErrorKind::Interrupted.into()));
            }
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        this.stalled = false;
        let chunk = match b {
            0 | 1 => 1,
            2..=200 => usize::from(b) - 1,
            _ => usize::from(b - 200) * 4096,
        };
        let n = chunk.min(buf.len()).min(this.stream.len() - this.pos);
        buf[..n].copy_from_slice(&this.stream[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(n))
    }
}
