//! What an L2 value looks like: the encoded reply (RowDescription, then the
//! rows and CommandComplete) with lengths and an HMAC over the Redis key and
//! the value, made with the deployment's signing key. A value that was
//! truncated, damaged, moved to another key or written by anything without the
//! key is a miss, never a reply; and before a value is replayed to a client its
//! framing is checked message by message.

use bytes::Bytes;

use crate::signing::{Signer, TAG_LEN};

const MAGIC: &[u8; 4] = b"PGT3";
const NO_ROW_DESC: u32 = u32::MAX;

/// Why a value from Redis was not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// Not a signed value of this format (damaged, older format, foreign).
    Malformed,
    /// Signed with another key, or for another Redis key.
    BadSignature,
    /// Signed, but not a well-formed reply.
    BadFraming,
}

impl Reject {
    pub fn label(self) -> &'static str {
        match self {
            Reject::Malformed => "corrupt",
            Reject::BadSignature => "bad_signature",
            Reject::BadFraming => "bad_framing",
        }
    }
}

/// Encode a cached reply for Redis under `key`.
pub fn encode(signer: &Signer, key: &[u8], row_desc: Option<&[u8]>, rows: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(12 + TAG_LEN + row_desc.map_or(0, |r| r.len()) + rows.len());
    v.extend_from_slice(MAGIC);
    match row_desc {
        Some(rd) => {
            v.extend_from_slice(&(rd.len() as u32).to_le_bytes());
            v.extend_from_slice(rd);
        }
        None => v.extend_from_slice(&NO_ROW_DESC.to_le_bytes()),
    }
    v.extend_from_slice(&(rows.len() as u32).to_le_bytes());
    v.extend_from_slice(rows);
    let tag = signer.tag(&[key, &v]);
    v.extend_from_slice(&tag);
    v
}

/// Decode the value found under `key`.
pub fn decode(signer: &Signer, key: &[u8], v: Bytes) -> Result<(Option<Bytes>, Bytes), Reject> {
    if v.len() < 4 + 4 + 4 + TAG_LEN || &v[..4] != MAGIC {
        return Err(Reject::Malformed);
    }
    let body = v.len() - TAG_LEN;
    if !signer.verify(&[key, &v[..body]], &v[body..]) {
        return Err(Reject::BadSignature);
    }
    let (row_desc, rows) = split(&v, body).ok_or(Reject::Malformed)?;
    if !well_framed(row_desc.as_deref(), &rows) {
        return Err(Reject::BadFraming);
    }
    Ok((row_desc, rows))
}

fn split(v: &Bytes, body: usize) -> Option<(Option<Bytes>, Bytes)> {
    let mut at = 4;
    let rd_len = u32::from_le_bytes(v.get(at..at + 4)?.try_into().ok()?);
    at += 4;
    let row_desc = if rd_len == NO_ROW_DESC {
        None
    } else {
        let end = at.checked_add(rd_len as usize).filter(|&e| e + 4 <= body)?;
        let rd = v.slice(at..end);
        at = end;
        Some(rd)
    };
    let rows_len = u32::from_le_bytes(v.get(at..at + 4)?.try_into().ok()?) as usize;
    at += 4;
    if at + rows_len != body {
        return None;
    }
    Some((row_desc, v.slice(at..body)))
}

/// One backend message at the start of `b`: (tag, body, rest).
fn message(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *b.first()?;
    let len = u32::from_be_bytes(b.get(1..5)?.try_into().ok()?) as usize;
    let end = 1usize
        .checked_add(len)
        .filter(|&e| len >= 4 && e <= b.len())?;
    Some((tag, &b[5..end], &b[end..]))
}

fn i16_at(b: &[u8], at: usize) -> Option<i16> {
    Some(i16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

/// Exactly what pgtier stores: an optional RowDescription, then DataRows with
/// its number of columns, then one CommandComplete, each message framed to the
/// byte. Anything else is not replayed, whoever signed it.
pub fn well_framed(row_desc: Option<&[u8]>, rows: &[u8]) -> bool {
    let columns = match row_desc {
        Some(rd) => match row_description_columns(rd) {
            Some(n) => Some(n),
            None => return false,
        },
        None => None,
    };
    let mut rest = rows;
    let mut width = columns;
    loop {
        let Some((tag, body, next)) = message(rest) else {
            return false;
        };
        match tag {
            b'D' => {
                let Some(n) = data_row_columns(body) else {
                    return false;
                };
                if *width.get_or_insert(n) != n {
                    return false;
                }
            }
            b'C' => {
                // One NUL-terminated tag, and nothing after it.
                return next.is_empty()
                    && body.last() == Some(&0)
                    && !body[..body.len() - 1].contains(&0);
            }
            _ => return false,
        }
        rest = next;
    }
}

fn row_description_columns(rd: &[u8]) -> Option<usize> {
    let (tag, body, rest) = message(rd)?;
    if tag != b'T' || !rest.is_empty() {
        return None;
    }
    let n = usize::try_from(i16_at(body, 0)?).ok()?;
    let mut at = 2;
    for _ in 0..n {
        let name_end = body.get(at..)?.iter().position(|&c| c == 0)?;
        at += name_end + 1 + 18;
    }
    (at == body.len()).then_some(n)
}

fn data_row_columns(body: &[u8]) -> Option<usize> {
    let n = usize::try_from(i16_at(body, 0)?).ok()?;
    let mut at = 2;
    for _ in 0..n {
        let len = i32::from_be_bytes(body.get(at..at + 4)?.try_into().ok()?);
        at += 4;
        if len >= 0 {
            at = at.checked_add(len as usize)?;
        } else if len != -1 {
            return None;
        }
    }
    (at == body.len()).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.put_u32(body.len() as u32 + 4);
        m.extend_from_slice(body);
        m
    }

    fn row_desc(cols: &[&str]) -> Vec<u8> {
        let mut b = Vec::new();
        b.put_i16(cols.len() as i16);
        for c in cols {
            b.extend_from_slice(c.as_bytes());
            b.push(0);
            b.extend_from_slice(&[0u8; 18]);
        }
        msg(b'T', &b)
    }

    fn data_row(vals: &[Option<&str>]) -> Vec<u8> {
        let mut b = Vec::new();
        b.put_i16(vals.len() as i16);
        for v in vals {
            match v {
                Some(s) => {
                    b.put_i32(s.len() as i32);
                    b.extend_from_slice(s.as_bytes());
                }
                None => b.put_i32(-1),
            }
        }
        msg(b'D', &b)
    }

    fn reply() -> (Vec<u8>, Vec<u8>) {
        let mut rows = data_row(&[Some("1"), None]);
        rows.extend(data_row(&[Some("22"), Some("")]));
        rows.extend(msg(b'C', b"SELECT 2\0"));
        (row_desc(&["a", "b"]), rows)
    }

    #[test]
    fn values_roundtrip_and_damage_is_detected() {
        let s = Signer::new(&[9u8; 32]);
        let (rd, rows) = reply();
        let v = encode(&s, b"k1", Some(&rd), &rows);
        let (got_rd, got_rows) = decode(&s, b"k1", Bytes::from(v.clone())).unwrap();
        assert_eq!(got_rd.as_deref(), Some(&rd[..]));
        assert_eq!(&got_rows[..], &rows[..]);
        let v2 = encode(&s, b"k1", None, &rows);
        assert_eq!(decode(&s, b"k1", Bytes::from(v2)).unwrap().0, None);
        for i in 0..v.len() {
            let mut bad = v.clone();
            bad[i] ^= 0x40;
            assert!(
                decode(&s, b"k1", Bytes::from(bad)).is_err(),
                "flipped byte {i} went unnoticed"
            );
        }
        assert_eq!(
            decode(&s, b"k1", Bytes::from_static(b"garbage")),
            Err(Reject::Malformed)
        );
        assert!(decode(&s, b"k1", Bytes::from(v[..v.len() - 1].to_vec())).is_err());
    }

    #[test]
    fn values_are_bound_to_their_key_and_the_signing_key() {
        let s = Signer::new(&[9u8; 32]);
        let (rd, rows) = reply();
        let v = Bytes::from(encode(&s, b"k1", Some(&rd), &rows));
        assert_eq!(decode(&s, b"k2", v.clone()), Err(Reject::BadSignature));
        let other = Signer::new(&[8u8; 32]);
        assert_eq!(decode(&other, b"k1", v), Err(Reject::BadSignature));
    }

    #[test]
    fn signed_values_must_still_be_well_framed() {
        let s = Signer::new(&[9u8; 32]);
        let (rd, rows) = reply();
        assert!(well_framed(Some(&rd), &rows));
        assert!(well_framed(None, &rows));
        let cases: Vec<(Option<Vec<u8>>, Vec<u8>)> = vec![
            // a column count that does not match the RowDescription
            (Some(row_desc(&["a"])), rows.clone()),
            // no CommandComplete
            (Some(rd.clone()), data_row(&[Some("1"), None])),
            // something after CommandComplete
            (Some(rd.clone()), [rows.clone(), msg(b'Z', b"I")].concat()),
            // a message pgtier never stores
            (
                Some(rd.clone()),
                [msg(b'E', b"SFATAL\0\0"), rows.clone()].concat(),
            ),
            // a DataRow whose fields overrun it
            (
                Some(rd.clone()),
                [
                    msg(b'D', &[0, 1, 0, 0, 0, 9, b'x']),
                    msg(b'C', b"SELECT 1\0"),
                ]
                .concat(),
            ),
            // a truncated RowDescription
            (Some(rd[..rd.len() - 1].to_vec()), rows.clone()),
            // a CommandComplete with a NUL inside
            (Some(rd.clone()), msg(b'C', b"SEL\0ECT\0")),
        ];
        for (i, (rd, rows)) in cases.into_iter().enumerate() {
            let v = encode(&s, b"k", rd.as_deref(), &rows);
            assert_eq!(
                decode(&s, b"k", Bytes::from(v)),
                Err(Reject::BadFraming),
                "case {i}"
            );
        }
    }
}
