//! Frames over blocking sockets: a 4-byte big-endian length, then that many bytes of JSON.
//!
//! Both the load generator and the baseline read through [`FrameReader`], which keeps one
//! buffer per connection so a small frame costs one `read` and no allocation.

use std::io::{self, Read};

/// The protocol's cap on a frame body (PROTOCOL.md).
pub const MAX_FRAME_BYTES: usize = 8 * 1024 * 1024;

/// Appends `message` to `out` as one frame, header included, so it goes out in one write.
pub fn encode_into<T: serde::Serialize>(out: &mut Vec<u8>, message: &T) -> io::Result<()> {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    serde_json::to_writer(&mut *out, message)?;
    let len = out.len() - start - 4;
    if len > MAX_FRAME_BYTES {
        out.truncate(start);
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame too large: {len} bytes (limit {MAX_FRAME_BYTES})"),
        ));
    }
    out[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// Reads frames from a stream; `buf[start..end]` holds bytes read but not yet returned.
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl FrameReader {
    /// Returns the next frame's body, or `None` if the peer closed cleanly between frames.
    /// A close inside a frame is `UnexpectedEof`; a header above the cap is `InvalidData`.
    pub fn next(&mut self, stream: &mut (impl Read + ?Sized)) -> io::Result<Option<&[u8]>> {
        loop {
            let buffered = self.end - self.start;
            let needed = if buffered >= 4 {
                let mut header = [0; 4];
                header.copy_from_slice(&self.buf[self.start..self.start + 4]);
                let len = u32::from_be_bytes(header) as usize;
                if len > MAX_FRAME_BYTES {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("frame too large: {len} bytes (limit {MAX_FRAME_BYTES})"),
                    ));
                }
                if buffered >= 4 + len {
                    let body = self.start + 4..self.start + 4 + len;
                    self.start = body.end;
                    return Ok(Some(&self.buf[body]));
                }
                4 + len
            } else {
                4
            };
            self.make_room(needed);
            match stream.read(&mut self.buf[self.end..]) {
                Ok(0) if buffered == 0 => return Ok(None),
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("connection closed inside a frame ({buffered} bytes buffered)"),
                    ))
                }
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Forgets buffered bytes, for a new connection.
    pub fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// Moves unread bytes to the front and grows the buffer to hold a frame of `needed` bytes.
    fn make_room(&mut self, needed: usize) {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let want = needed.max(4096);
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_and_joined() -> io::Result<()> {
        let mut wire = Vec::new();
        encode_into(&mut wire, &"a")?;
        encode_into(&mut wire, &"bc")?;
        // One byte per read: the reader must reassemble headers and bodies.
        struct Trickle<'a>(&'a [u8]);
        impl Read for Trickle<'_> {
            fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
                let n = self.0.len().min(out.len()).min(1);
                out[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        for reader in [&mut &wire[..] as &mut dyn Read, &mut Trickle(&wire)] {
            let mut frames = FrameReader::default();
            assert_eq!(frames.next(reader)?, Some(&b"\"a\""[..]));
            assert_eq!(frames.next(reader)?, Some(&b"\"bc\""[..]));
            assert_eq!(frames.next(reader)?, None);
        }
        let err = FrameReader::default()
            .next(&mut &[0, 0, 0, 5, b'x'][..])
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        let err = FrameReader::default()
            .next(&mut &[0xff, 0, 0, 0][..])
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        Ok(())
    }
}
