//! Two-phase commit and pgtier's triggers. Postgres refuses `PREPARE
//! TRANSACTION` in a transaction that has sent a NOTIFY, and the trigger on a
//! table some pgtier caches NOTIFYs on every write: a prepared transaction that
//! wrote such a table fails at PREPARE (it is rolled back; nothing stale can
//! come of it). Neither the trigger nor pgtier can know at write time that the
//! transaction will be prepared, and a queued notification cannot be taken
//! back, so this is not worked around: tables written by prepared transactions
//! belong outside the trigger scope (`invalidation.schemas`/`tables`), where
//! they are never cached. What pgtier does is make the failure say so: the
//! error Postgres sends keeps its SQLSTATE and text, and gains a hint.

use bytes::{BufMut, Bytes, BytesMut};

const HINT: &str = "pgtier: if this transaction wrote tables pgtier caches, their invalidation \
trigger sent a NOTIFY, which Postgres does not allow in a prepared transaction. Keep tables \
written by two-phase commit outside pgtier's trigger scope (invalidation.schemas / \
invalidation.tables) and drop their pgtier_notify trigger; see README, Two-phase commit.";

/// The fields of an ErrorResponse body: (code, value) pairs.
fn fields(body: &[u8]) -> Option<Vec<(u8, &[u8])>> {
    let mut out = Vec::new();
    let mut rest = body;
    loop {
        let (&code, after) = rest.split_first()?;
        if code == 0 {
            return after.is_empty().then_some(out);
        }
        let end = after.iter().position(|&b| b == 0)?;
        out.push((code, &after[..end]));
        rest = &after[end + 1..];
    }
}

/// For the error of a PREPARE TRANSACTION refused because of a NOTIFY (told by
/// its SQLSTATE and the reporting routine, whatever the server's language):
/// the same error with pgtier's hint. `msg` is the whole message, tag included.
pub fn explain(msg: &[u8]) -> Option<Bytes> {
    let body = msg.get(5..)?;
    let f = fields(body)?;
    let get = |c: u8| f.iter().find(|(k, _)| *k == c).map(|(_, v)| *v);
    if get(b'C') != Some(b"0A000") || get(b'R') != Some(b"AtPrepare_Notify") || get(b'H').is_some()
    {
        return None;
    }
    let mut out = BytesMut::with_capacity(msg.len() + HINT.len() + 2);
    out.put_u8(b'E');
    out.put_u32(0);
    for (code, value) in &f {
        out.put_u8(*code);
        out.put_slice(value);
        out.put_u8(0);
        if *code == b'M' {
            out.put_u8(b'H');
            out.put_slice(HINT.as_bytes());
            out.put_u8(0);
        }
    }
    out.put_u8(0);
    let len = (out.len() - 1) as u32;
    out[1..5].copy_from_slice(&len.to_be_bytes());
    Some(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(fields: &[(u8, &str)]) -> Vec<u8> {
        let mut body = Vec::new();
        for (c, v) in fields {
            body.push(*c);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut m = vec![b'E'];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend(body);
        m
    }

    #[test]
    fn only_the_prepare_notify_error_gains_the_hint() {
        let refused = error(&[
            (b'S', "ERROR"),
            (b'C', "0A000"),
            (b'M', "PREPARE ne peut pas ..."),
            (b'F', "async.c"),
            (b'R', "AtPrepare_Notify"),
        ]);
        let out = explain(&refused).expect("explained");
        let f = fields(&out[5..]).unwrap();
        assert_eq!(
            u32::from_be_bytes(out[1..5].try_into().unwrap()) as usize,
            out.len() - 1
        );
        assert!(f.contains(&(b'C', &b"0A000"[..])));
        assert!(f.contains(&(b'M', &b"PREPARE ne peut pas ..."[..])));
        assert!(f
            .iter()
            .any(|(c, v)| *c == b'H' && v.starts_with(b"pgtier:")));
        assert_eq!(f.len(), 6);

        let other = error(&[
            (b'S', "ERROR"),
            (b'C', "0A000"),
            (b'M', "x"),
            (b'R', "Other"),
        ]);
        assert!(explain(&other).is_none());
        let hinted = error(&[(b'C', "0A000"), (b'H', "h"), (b'R', "AtPrepare_Notify")]);
        assert!(explain(&hinted).is_none());
        assert!(explain(b"E\0\0\0\x05").is_none());
        assert!(explain(b"E\0\0\0\x06C").is_none());
    }
}
