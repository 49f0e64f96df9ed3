//! Decoding the logical replication stream: the walsender's CopyData framing
//! (XLogData, keepalive), the standby status update we answer with, and the
//! `pgoutput` messages inside XLogData (protocol version 1 with `messages`).
//! Only what invalidation needs is kept: which relation a change touched,
//! where transactions end, logical messages, and (for key-level invalidation,
//! only when asked) the column values of a changed row.

use bytes::{BufMut, BytesMut};

/// Microseconds between the Unix epoch and Postgres's (2000-01-01).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed replication message: {0}")]
pub struct Malformed(pub &'static str);

/// One CopyData payload from the walsender.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// WAL data starting at `start`; `data` is one pgoutput message.
    XLogData { start: u64, data: &'a [u8] },
    /// The server's position (`end`); `reply` asks for a status update now.
    Keepalive { end: u64, reply: bool },
}

/// What a pgoutput message says, as far as invalidation is concerned.
#[derive(Debug, PartialEq, Eq)]
pub enum Change<'a> {
    /// A transaction's changes follow; `xid` is its (top-level) id.
    Begin {
        xid: u32,
    },
    /// A transaction committed; `end` is the WAL position after its commit record.
    Commit {
        end: u64,
        time_micros: i64,
    },
    /// The name (and column list) of a relation id used by later changes.
    Relation {
        oid: u32,
        schema: &'a [u8],
        name: &'a [u8],
        /// The raw column definitions: compared to notice a changed table.
        columns: &'a [u8],
    },
    /// INSERT (`I`), UPDATE (`U`) or DELETE (`D`) of a row of this relation;
    /// `rest` holds its tuples (see `tuples`).
    Write {
        oid: u32,
        kind: u8,
        rest: &'a [u8],
    },
    Truncate {
        oids: Vec<u32>,
    },
    Message {
        transactional: bool,
        prefix: &'a [u8],
        content: &'a [u8],
    },
    /// Origin, Type, and anything this decoder does not need.
    Other,
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], Malformed> {
        if self.0.len() < n {
            return Err(Malformed(what));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, Malformed> {
        Ok(self.take(1, what)?[0])
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, Malformed> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, Malformed> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn cstr(&mut self, what: &'static str) -> Result<&'a [u8], Malformed> {
        let n = self.0.iter().position(|b| *b == 0).ok_or(Malformed(what))?;
        let s = self.take(n, what)?;
        self.take(1, what)?;
        Ok(s)
    }
}

/// Decode one CopyData payload of a replication stream.
pub fn frame(payload: &[u8]) -> Result<Frame<'_>, Malformed> {
    let mut r = Reader(payload);
    match r.u8("frame kind")? {
        b'w' => {
            let start = r.u64("xlogdata start")?;
            r.u64("xlogdata end")?;
            r.u64("xlogdata time")?;
            Ok(Frame::XLogData { start, data: r.0 })
        }
        b'k' => {
            let end = r.u64("keepalive end")?;
            r.u64("keepalive time")?;
            let reply = r.u8("keepalive reply")? == 1;
            Ok(Frame::Keepalive { end, reply })
        }
        _ => Err(Malformed("unknown frame kind")),
    }
}

/// Decode one pgoutput message (protocol version 1, no streaming).
pub fn change(data: &[u8]) -> Result<Change<'_>, Malformed> {
    let mut r = Reader(data);
    Ok(match r.u8("message kind")? {
        b'B' => {
            r.u64("begin final lsn")?;
            r.u64("begin commit time")?;
            Change::Begin {
                xid: r.u32("begin xid")?,
            }
        }
        b'C' => {
            r.u8("commit flags")?;
            r.u64("commit lsn")?;
            let end = r.u64("commit end lsn")?;
            let time_micros = r.u64("commit time")? as i64;
            Change::Commit { end, time_micros }
        }
        b'R' => {
            let oid = r.u32("relation oid")?;
            let schema = r.cstr("relation schema")?;
            let name = r.cstr("relation name")?;
            Change::Relation {
                oid,
                schema,
                name,
                columns: r.0,
            }
        }
        kind @ (b'I' | b'U' | b'D') => Change::Write {
            oid: r.u32("relation oid")?,
            kind,
            rest: r.0,
        },
        b'T' => {
            let n = r.u32("truncate count")? as usize;
            r.u8("truncate options")?;
            if r.0.len() != n.saturating_mul(4) {
                return Err(Malformed("truncate relations"));
            }
            let oids = (0..n)
                .map(|_| r.u32("truncate relation"))
                .collect::<Result<_, _>>()?;
            Change::Truncate { oids }
        }
        b'M' => {
            let transactional = r.u8("message flags")? & 1 == 1;
            r.u64("message lsn")?;
            let prefix = r.cstr("message prefix")?;
            let len = r.u32("message length")? as usize;
            let content = r.take(len, "message content")?;
            Change::Message {
                transactional,
                prefix,
                content,
            }
        }
        _ => Change::Other,
    })
}

/// One column of a row as the stream sends it.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Value<'a> {
    Null,
    /// An unchanged TOASTed value, not sent.
    Unchanged,
    /// The type's text output.
    Text(&'a [u8]),
}

fn tuple<'a>(r: &mut Reader<'a>) -> Result<Vec<Value<'a>>, Malformed> {
    let n = u16::from_be_bytes([r.u8("tuple columns")?, r.u8("tuple columns")?]) as usize;
    let mut out = Vec::with_capacity(n.min(1600));
    for _ in 0..n {
        out.push(match r.u8("column kind")? {
            b'n' => Value::Null,
            b'u' => Value::Unchanged,
            b't' => {
                let len = r.u32("column length")? as usize;
                Value::Text(r.take(len, "column value")?)
            }
            _ => return Err(Malformed("column kind")),
        });
    }
    Ok(out)
}

/// A row's columns, if the message has that row.
pub type Row<'a> = Option<Vec<Value<'a>>>;

/// The old and new rows of a Write: `old` is the replica identity's columns
/// (`K`, the others null) or the whole row (`O`, `REPLICA IDENTITY FULL`),
/// present on UPDATE only when the identity changed or is FULL.
pub fn tuples(kind: u8, rest: &[u8]) -> Result<(Row<'_>, Row<'_>), Malformed> {
    let mut r = Reader(rest);
    let mut old = None;
    let mut new = None;
    while !r.0.is_empty() {
        match r.u8("tuple kind")? {
            b'K' | b'O' if kind != b'I' && old.is_none() && new.is_none() => {
                old = Some(tuple(&mut r)?)
            }
            b'N' if kind != b'D' && new.is_none() => new = Some(tuple(&mut r)?),
            _ => return Err(Malformed("tuple kind")),
        }
    }
    Ok((old, new))
}

/// The columns of a Relation message's `columns`, in order: name, and whether
/// it is part of the replica identity.
/// A column of a Relation message: its name, whether it is part of the
/// replica identity, and its type's oid.
pub type Column = (String, bool, u32);

pub fn column_names(columns: &[u8]) -> Result<Vec<Column>, Malformed> {
    let mut r = Reader(columns);
    r.u8("replica identity")?;
    let n = u16::from_be_bytes([r.u8("columns")?, r.u8("columns")?]) as usize;
    let mut out = Vec::with_capacity(n.min(1600));
    for _ in 0..n {
        let key = r.u8("column flags")? & 1 == 1;
        let name = String::from_utf8_lossy(r.cstr("column name")?).into_owned();
        let type_oid = r.u32("column type")?;
        r.u32("column typmod")?;
        out.push((name, key, type_oid));
    }
    Ok(out)
}

/// A standby status update: everything up to `lsn` is received, flushed and
/// applied (the slot may let go of WAL before it).
pub fn status_update(lsn: u64, now: std::time::SystemTime, buf: &mut BytesMut) {
    let micros = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64);
    buf.put_u8(b'r');
    buf.put_u64(lsn);
    buf.put_u64(lsn);
    buf.put_u64(lsn);
    buf.put_i64(micros - PG_EPOCH_MICROS);
    buf.put_u8(0);
}

/// A commit time from the stream as Unix microseconds.
pub fn unix_micros(pg_micros: i64) -> i64 {
    pg_micros.saturating_add(PG_EPOCH_MICROS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_decode() {
        let mut w = vec![b'w'];
        w.extend(5u64.to_be_bytes());
        w.extend(9u64.to_be_bytes());
        w.extend(0u64.to_be_bytes());
        w.extend(b"B...");
        assert_eq!(
            frame(&w),
            Ok(Frame::XLogData {
                start: 5,
                data: b"B..."
            })
        );
        let mut k = vec![b'k'];
        k.extend(77u64.to_be_bytes());
        k.extend(0u64.to_be_bytes());
        k.push(1);
        assert_eq!(
            frame(&k),
            Ok(Frame::Keepalive {
                end: 77,
                reply: true
            })
        );
        assert!(frame(&k[..10]).is_err());
        assert!(frame(b"x").is_err());
        assert!(frame(b"").is_err());
    }

    #[test]
    fn changes_decode() {
        let mut rel = vec![b'R'];
        rel.extend(16384u32.to_be_bytes());
        rel.extend(b"public\0t\0");
        rel.extend([b'd', 0, 1]);
        assert_eq!(
            change(&rel),
            Ok(Change::Relation {
                oid: 16384,
                schema: b"public",
                name: b"t",
                columns: &[b'd', 0, 1],
            })
        );
        let mut ins = vec![b'I'];
        ins.extend(16384u32.to_be_bytes());
        ins.extend(b"N\0\x01n");
        let Ok(Change::Write { oid, kind, rest }) = change(&ins) else {
            panic!("not a write");
        };
        assert_eq!((oid, kind), (16384, b'I'));
        assert_eq!(tuples(kind, rest), Ok((None, Some(vec![Value::Null]))));
        // An UPDATE whose key moved: the old key, then the new row.
        let mut upd = vec![b'K', 0, 2, b't', 0, 0, 0, 1, b'7', b'n', b'N', 0, 2];
        upd.extend([b't', 0, 0, 0, 2, b'1', b'2', b'u']);
        assert_eq!(
            tuples(b'U', &upd),
            Ok((
                Some(vec![Value::Text(b"7"), Value::Null]),
                Some(vec![Value::Text(b"12"), Value::Unchanged])
            ))
        );
        assert!(tuples(b'D', &upd).is_err(), "a DELETE has no new row");
        assert!(tuples(b'U', &upd[..upd.len() - 1]).is_err(), "truncated");
        let mut cols = vec![b'd', 0, 2];
        cols.extend(b"\x01id\0");
        cols.extend([0, 0, 0, 23, 0xff, 0xff, 0xff, 0xff]);
        cols.extend(b"\x00v\0");
        cols.extend([0, 0, 0, 23, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(
            column_names(&cols),
            Ok(vec![
                ("id".to_string(), true, 23),
                ("v".to_string(), false, 23)
            ])
        );
        assert!(column_names(&cols[..cols.len() - 1]).is_err());
        let mut tr = vec![b'T'];
        tr.extend(2u32.to_be_bytes());
        tr.push(0);
        tr.extend(1u32.to_be_bytes());
        tr.extend(2u32.to_be_bytes());
        assert_eq!(change(&tr), Ok(Change::Truncate { oids: vec![1, 2] }));
        tr.pop();
        assert!(change(&tr).is_err(), "a truncated relation list");
        let mut c = vec![b'C', 0];
        c.extend(10u64.to_be_bytes());
        c.extend(20u64.to_be_bytes());
        c.extend(30u64.to_be_bytes());
        assert_eq!(
            change(&c),
            Ok(Change::Commit {
                end: 20,
                time_micros: 30
            })
        );
        let mut m = vec![b'M', 1];
        m.extend(3u64.to_be_bytes());
        m.extend(b"pgtier\0");
        m.extend(2u32.to_be_bytes());
        m.extend(b"f1");
        assert_eq!(
            change(&m),
            Ok(Change::Message {
                transactional: true,
                prefix: b"pgtier",
                content: b"f1"
            })
        );
        m.pop();
        assert!(change(&m).is_err(), "content shorter than its length");
        assert!(change(&[b'R', 0, 0, 0, 1, b'x']).is_err(), "unterminated");
        assert!(change(&[]).is_err());
    }

    #[test]
    fn status_updates_report_the_position_three_times() {
        let mut b = BytesMut::new();
        status_update(0x1234, std::time::UNIX_EPOCH, &mut b);
        assert_eq!(b.len(), 34);
        assert_eq!(b[0], b'r');
        assert_eq!(&b[1..9], &0x1234u64.to_be_bytes());
        assert_eq!(&b[17..25], &0x1234u64.to_be_bytes());
        assert_eq!(&b[25..33], &(-PG_EPOCH_MICROS).to_be_bytes());
    }
}
