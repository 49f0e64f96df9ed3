//! One complete client request, framed and decoded once.
//!
//! The session hands the cache layer a buffer of whole messages; this splits it
//! into messages and decodes each one a single time, so the layers above work
//! on typed views (`Frontend`) borrowed from the buffer and never on offsets.

use bytes::Bytes;
use smallvec::SmallVec;

use super::frontend::Frontend;

/// A framed message of a batch.
#[derive(Clone, Copy, Debug)]
pub struct Message<'a> {
    /// The whole message: tag, length and body.
    pub raw: &'a [u8],
    /// Its decoded view; none if the body is malformed (the session refuses
    /// those before a batch is formed, so only raw-byte tests meet this).
    pub view: Option<Frontend<'a>>,
}

impl Message<'_> {
    pub fn tag(&self) -> u8 {
        self.raw[0]
    }
}

/// A request: the buffer and its messages (most requests have at most 8).
pub struct Batch<'a> {
    bytes: &'a Bytes,
    messages: SmallVec<[Message<'a>; 8]>,
}

impl<'a> Batch<'a> {
    /// Frame and decode `bytes`; a trailing partial message is ignored (the
    /// session only forms batches of whole messages).
    pub fn new(bytes: &'a Bytes) -> Batch<'a> {
        let buf: &'a [u8] = bytes;
        let mut messages = SmallVec::new();
        let mut at = 0;
        while at + 5 <= buf.len() {
            let len = i32::from_be_bytes([buf[at + 1], buf[at + 2], buf[at + 3], buf[at + 4]]);
            let end = at + 1 + len.max(4) as usize;
            if end > buf.len() {
                break;
            }
            let raw = &buf[at..end];
            messages.push(Message {
                raw,
                view: Frontend::decode(raw[0], &raw[5..]).ok(),
            });
            at = end;
        }
        Batch { bytes, messages }
    }

    /// The request's bytes, to forward as they are.
    pub fn bytes(&self) -> &'a Bytes {
        self.bytes
    }

    pub fn messages(&self) -> &[Message<'a>] {
        &self.messages
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// The decoded messages, in order (malformed ones skipped).
    pub fn views(&self) -> impl Iterator<Item = Frontend<'a>> + '_ {
        self.messages.iter().filter_map(|m| m.view)
    }

    /// The SQL text, if the request is exactly one simple Query.
    pub fn single_query(&self) -> Option<&'a [u8]> {
        match self.messages.as_slice() {
            [Message {
                view: Some(Frontend::Query(q)),
                ..
            }] => Some(q.sql),
            _ => None,
        }
    }

    /// Whether the request ends with Sync (it commits on its own).
    pub fn ends_with_sync(&self) -> bool {
        self.messages
            .last()
            .is_some_and(|m| matches!(m.view, Some(Frontend::Sync)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_each_message_once_and_ignores_a_partial_tail() {
        let mut buf = Vec::new();
        buf.extend_from_slice(b"Q\0\0\0\x0dselect 1\0");
        buf.extend_from_slice(b"S\0\0\0\x04");
        buf.extend_from_slice(b"S\0\0");
        let bytes = Bytes::from(buf);
        let b = Batch::new(&bytes);
        assert_eq!(b.messages().len(), 2);
        assert_eq!(b.messages()[0].tag(), b'Q');
        assert!(b.single_query().is_none(), "two messages");
        assert!(b.ends_with_sync());
        let one = Bytes::from_static(b"Q\0\0\0\x0dselect 1\0");
        assert_eq!(Batch::new(&one).single_query(), Some(&b"select 1"[..]));
    }

    #[test]
    fn a_malformed_body_has_no_view_but_keeps_its_place() {
        // Sync with a body is malformed.
        let bytes = Bytes::from_static(b"S\0\0\0\x05xS\0\0\0\x04");
        let b = Batch::new(&bytes);
        assert_eq!(b.messages().len(), 2);
        assert!(b.messages()[0].view.is_none());
        assert_eq!(b.views().count(), 1);
    }
}
