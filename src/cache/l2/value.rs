//! What an L2 value looks like: the encoded reply (RowDescription, then the
//! rows and CommandComplete) with lengths and a checksum, so a value that was
//! truncated, damaged or written by something else is a miss, never a reply.

use bytes::Bytes;

const MAGIC: &[u8; 4] = b"PGT2";
const NO_ROW_DESC: u32 = u32::MAX;

/// Encode a cached reply for Redis.
pub fn encode(row_desc: Option<&[u8]>, rows: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + row_desc.map_or(0, |r| r.len()) + rows.len());
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
    let sum = xxhash_rust::xxh3::xxh3_64(&v);
    v.extend_from_slice(&sum.to_le_bytes());
    v
}

/// Decode a value; `None` if it is not one of ours or is damaged.
pub fn decode(v: Bytes) -> Option<(Option<Bytes>, Bytes)> {
    if v.len() < 4 + 4 + 4 + 8 || &v[..4] != MAGIC {
        return None;
    }
    let body = v.len() - 8;
    let sum = u64::from_le_bytes(v[body..].try_into().ok()?);
    if xxhash_rust::xxh3::xxh3_64(&v[..body]) != sum {
        return None;
    }
    let mut at = 4;
    let rd_len = u32::from_le_bytes(v[at..at + 4].try_into().ok()?);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_roundtrip_and_damage_is_detected() {
        let v = encode(Some(b"T-row-desc"), b"D-rows-C");
        let (rd, rows) = decode(Bytes::from(v.clone())).unwrap();
        assert_eq!(rd.as_deref(), Some(&b"T-row-desc"[..]));
        assert_eq!(&rows[..], b"D-rows-C");
        let v2 = encode(None, b"rows");
        assert_eq!(decode(Bytes::from(v2)).unwrap().0, None);
        for i in 0..v.len() {
            let mut bad = v.clone();
            bad[i] ^= 0x40;
            assert!(
                decode(Bytes::from(bad)).is_none(),
                "flipped byte {i} went unnoticed"
            );
        }
        assert!(decode(Bytes::from_static(b"garbage")).is_none());
        assert!(decode(Bytes::from(v[..v.len() - 1].to_vec())).is_none());
    }
}
