//! Low-level readers and writers shared by the typed messages.

use bytes::{BufMut, BytesMut};

use super::error::tag_char;
use super::ProtocolError;

/// Length of a tagged message header: 1 tag byte plus a 4-byte length.
pub const HEADER_LEN: usize = 5;

/// The header of a tagged message found at the front of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub tag: u8,
    /// Total length on the wire, tag and length field included.
    pub total_len: usize,
}

/// Read the header at the front of `buf` if at least 5 bytes are there.
///
/// The length is validated here, before anything is buffered, so that a client
/// announcing a 2 GB message is refused at once instead of being waited for.
pub fn peek_header(buf: &[u8], max_len: usize) -> Result<Option<Header>, ProtocolError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let tag = buf[0];
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(ProtocolError::BadLength {
            tag: tag_char(tag),
            len: len as i64,
        });
    }
    let body = len as usize - 4;
    if body > max_len {
        return Err(ProtocolError::TooLarge {
            tag: tag_char(tag),
            len: len as usize,
            max: max_len,
        });
    }
    Ok(Some(Header {
        tag,
        total_len: len as usize + 1,
    }))
}

/// A cursor over a message body that reports truncation instead of panicking.
pub struct Reader<'a> {
    buf: &'a [u8],
    tag: u8,
}

impl<'a> Reader<'a> {
    pub fn new(tag: u8, buf: &'a [u8]) -> Self {
        Reader { buf, tag }
    }

    fn truncated(&self, what: &'static str) -> ProtocolError {
        ProtocolError::Truncated {
            tag: tag_char(self.tag),
            what,
        }
    }

    pub fn remaining(&self) -> &'a [u8] {
        self.buf
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The message must end here, as Postgres's `pq_getmsgend` requires.
    pub fn end(&self) -> Result<(), ProtocolError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtocolError::TrailingBytes {
                tag: tag_char(self.tag),
                extra: self.buf.len(),
            })
        }
    }

    pub fn u8(&mut self, what: &'static str) -> Result<u8, ProtocolError> {
        let (&b, rest) = self.buf.split_first().ok_or_else(|| self.truncated(what))?;
        self.buf = rest;
        Ok(b)
    }

    pub fn i16(&mut self, what: &'static str) -> Result<i16, ProtocolError> {
        let b = self.bytes(2, what)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    pub fn i32(&mut self, what: &'static str) -> Result<i32, ProtocolError> {
        let b = self.bytes(4, what)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ProtocolError> {
        if self.buf.len() < n {
            return Err(self.truncated(what));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    /// A NUL-terminated string, returned without its terminator.
    pub fn cstr(&mut self, what: &'static str) -> Result<&'a [u8], ProtocolError> {
        let pos = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.truncated(what))?;
        let s = &self.buf[..pos];
        self.buf = &self.buf[pos + 1..];
        Ok(s)
    }

    /// A count followed by that many i16 values (format codes).
    pub fn i16_array(&mut self, what: &'static str) -> Result<&'a [u8], ProtocolError> {
        let n = self.i16(what)?;
        if n < 0 {
            return Err(self.truncated(what));
        }
        self.bytes(n as usize * 2, what)
    }

    /// A count followed by that many i32 values (type OIDs).
    pub fn i32_array(&mut self, what: &'static str) -> Result<&'a [u8], ProtocolError> {
        let n = self.i16(what)?;
        if n < 0 {
            return Err(self.truncated(what));
        }
        self.bytes(n as usize * 4, what)
    }
}

/// Starts a tagged message in `buf` and returns the offset of its length field,
/// to be patched by [`finish`] once the body is written.
pub fn begin(buf: &mut BytesMut, tag: u8) -> usize {
    buf.put_u8(tag);
    let at = buf.len();
    buf.put_i32(0);
    at
}

/// Patches the length of a message started by [`begin`].
pub fn finish(buf: &mut BytesMut, at: usize) {
    let len = (buf.len() - at) as i32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

pub fn put_cstr(buf: &mut BytesMut, s: &[u8]) {
    buf.put_slice(s);
    buf.put_u8(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_rejects_short_and_huge_lengths() {
        assert!(matches!(
            peek_header(b"Q\0\0\0\x02", 100),
            Err(ProtocolError::BadLength { len: 2, .. })
        ));
        assert!(matches!(
            peek_header(&[b'Q', 0x7f, 0xff, 0xff, 0xff], 1 << 20),
            Err(ProtocolError::TooLarge { .. })
        ));
        assert_eq!(peek_header(b"Q\0\0", 100), Ok(None));
        assert_eq!(
            peek_header(b"Q\0\0\0\x05x", 100),
            Ok(Some(Header {
                tag: b'Q',
                total_len: 6
            }))
        );
    }

    #[test]
    fn reader_reports_truncation() {
        let mut r = Reader::new(b'P', b"abc");
        assert!(r.cstr("name").is_err());
        let mut r = Reader::new(b'P', b"ab\0\0\x01");
        assert_eq!(r.cstr("name").unwrap(), b"ab");
        assert!(r.i16("n").is_ok());
        assert!(r.i16("n").is_err());
    }
}
