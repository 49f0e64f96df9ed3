//! Key-level invalidation from the stream: the values of a table's live
//! column sets (see `key_deps`) in the rows a write changed, taken from the
//! tuples `pgoutput` sends. INSERT carries the new row; DELETE the replica
//! identity's columns (or the whole row with `REPLICA IDENTITY FULL`); UPDATE
//! the new row, plus the old identity when it changed (or the whole old row).
//! Where the old values of a column set cannot be known from that (a set
//! outside the identity, an unchanged TOASTed value), the write invalidates
//! its table instead.

use super::pgoutput::{self, Malformed, Value};
use crate::invalidation::key_deps::ColumnSet;
use crate::invalidation::payload::KeySet;

/// What a write changed in the column sets it was asked about.
#[derive(Debug, PartialEq, Eq)]
pub enum Keys {
    /// Per column set (in the order asked), the key tuples of the changed rows.
    Sets(Vec<KeySet>),
    /// The stream does not say: invalidate the table.
    Table,
}

/// The key values of `cols` in `row`; `Ok(None)` if a key is NULL (no read by
/// equality finds that row by it), `Err(())` if the row does not carry them.
fn values(
    row: &[Value<'_>],
    idx: &[usize],
    columns: &[pgoutput::Column],
    old_identity_only: bool,
) -> Result<Option<Vec<String>>, ()> {
    let mut out = Vec::with_capacity(idx.len());
    for &i in idx {
        match row.get(i) {
            Some(Value::Text(b)) => {
                let text = std::str::from_utf8(b).map_err(|_| ())?;
                out.push(as_text_cast(text, columns.get(i).map_or(0, |c| c.2)).to_string());
            }
            // In an old identity tuple, columns outside it are sent as NULL.
            Some(Value::Null) if !old_identity_only => return Ok(None),
            _ => return Err(()),
        }
    }
    Ok(Some(out))
}

/// pgoutput sends a value as its type's output function writes it; a read's
/// key values are spelled as `value::text` (see `sql::keyvalue`). The two
/// agree for every key type but `bool`, whose output is `t`/`f`.
fn as_text_cast(text: &str, type_oid: u32) -> &str {
    const BOOL: u32 = 16;
    match (type_oid, text) {
        (BOOL, "t") => "true",
        (BOOL, "f") => "false",
        _ => text,
    }
}

/// The keys of `sets` one write (`kind`, `rest` of a Write) changed, for a
/// relation with `columns` (name, part of the replica identity).
pub fn of_write(
    kind: u8,
    rest: &[u8],
    columns: &[pgoutput::Column],
    sets: &[ColumnSet],
) -> Result<Keys, Malformed> {
    let (old, new) = pgoutput::tuples(kind, rest)?;
    let mut out = Vec::with_capacity(sets.len());
    for set in sets {
        let Some(idx) = set
            .iter()
            .map(|c| columns.iter().position(|(n, ..)| n == c))
            .collect::<Option<Vec<usize>>>()
        else {
            return Ok(Keys::Table);
        };
        let in_identity = idx.iter().all(|&i| columns[i].1);
        let mut tuples: Vec<Vec<String>> = Vec::new();
        let mut add = |row: &[Value<'_>], old: bool| -> Result<(), ()> {
            if let Some(t) = values(row, &idx, columns, old)? {
                if !tuples.contains(&t) {
                    tuples.push(t);
                }
            }
            Ok(())
        };
        let ok = match (kind, &old, &new) {
            (b'I', None, Some(n)) => add(n, false),
            (b'D', Some(o), None) => add(o, true),
            (b'U', Some(o), Some(n)) => add(o, true).and_then(|_| add(n, false)),
            // The identity did not change: a set within it has the same old
            // values as new; of any other set, the old values are unknown.
            (b'U', None, Some(n)) if in_identity => add(n, false),
            _ => Err(()),
        };
        if ok.is_err() {
            return Ok(Keys::Table);
        }
        out.push((set.clone(), tuples));
    }
    Ok(Keys::Sets(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(vals: &[Option<&str>]) -> Vec<u8> {
        let mut b = (vals.len() as u16).to_be_bytes().to_vec();
        for v in vals {
            match v {
                Some(s) => {
                    b.push(b't');
                    b.extend((s.len() as u32).to_be_bytes());
                    b.extend(s.as_bytes());
                }
                None => b.push(b'n'),
            }
        }
        b
    }

    fn msg(parts: &[(u8, Vec<u8>)]) -> Vec<u8> {
        parts
            .iter()
            .flat_map(|(k, r)| std::iter::once(*k).chain(r.iter().copied()))
            .collect()
    }

    fn cols() -> Vec<pgoutput::Column> {
        vec![
            ("id".into(), true, 23),
            ("grp".into(), false, 23),
            ("v".into(), false, 23),
        ]
    }

    fn sets(names: &[&[&str]]) -> Vec<ColumnSet> {
        names
            .iter()
            .map(|s| s.iter().map(|c| c.to_string()).collect())
            .collect()
    }

    fn keys(set: &[&str], tuples: &[&[&str]]) -> KeySet {
        (
            set.iter().map(|c| c.to_string()).collect(),
            tuples
                .iter()
                .map(|t| t.iter().map(|v| v.to_string()).collect())
                .collect(),
        )
    }

    /// pgoutput writes a bool as `t`/`f`; a read's key is spelled as the
    /// value's `::text`, `true`/`false`. A text `t` stays `t`.
    #[test]
    fn bool_keys_are_spelled_as_a_reads_keys_are() {
        let cols: Vec<pgoutput::Column> = vec![("k".into(), true, 16), ("s".into(), false, 25)];
        let ins = msg(&[(b'N', row(&[Some("t"), Some("t")]))]);
        assert_eq!(
            of_write(b'I', &ins, &cols, &sets(&[&["k"], &["s"]])).unwrap(),
            Keys::Sets(vec![keys(&["k"], &[&["true"]]), keys(&["s"], &[&["t"]])])
        );
        let del = msg(&[(b'K', row(&[Some("f"), None]))]);
        assert_eq!(
            of_write(b'D', &del, &cols, &sets(&[&["k"]])).unwrap(),
            Keys::Sets(vec![keys(&["k"], &[&["false"]])])
        );
    }

    #[test]
    fn inserts_and_deletes_report_their_rows_keys() {
        let ins = msg(&[(b'N', row(&[Some("1"), Some("3"), Some("10")]))]);
        assert_eq!(
            of_write(b'I', &ins, &cols(), &sets(&[&["id"], &["grp"]])).unwrap(),
            Keys::Sets(vec![keys(&["id"], &[&["1"]]), keys(&["grp"], &[&["3"]])])
        );
        // DELETE sends the identity only: other sets are unknown.
        let del = msg(&[(b'K', row(&[Some("1"), None, None]))]);
        assert_eq!(
            of_write(b'D', &del, &cols(), &sets(&[&["id"]])).unwrap(),
            Keys::Sets(vec![keys(&["id"], &[&["1"]])])
        );
        assert_eq!(
            of_write(b'D', &del, &cols(), &sets(&[&["grp"]])).unwrap(),
            Keys::Table
        );
        // A NULL key in a new row: no read by equality can find it by that.
        let null = msg(&[(b'N', row(&[Some("2"), None, Some("1")]))]);
        assert_eq!(
            of_write(b'I', &null, &cols(), &sets(&[&["grp"]])).unwrap(),
            Keys::Sets(vec![keys(&["grp"], &[])])
        );
    }

    #[test]
    fn updates_report_old_and_new_keys_or_fall_back() {
        // The identity unchanged: no old tuple.
        let same = msg(&[(b'N', row(&[Some("1"), Some("4"), Some("11")]))]);
        assert_eq!(
            of_write(b'U', &same, &cols(), &sets(&[&["id"]])).unwrap(),
            Keys::Sets(vec![keys(&["id"], &[&["1"]])])
        );
        assert_eq!(
            of_write(b'U', &same, &cols(), &sets(&[&["grp"]])).unwrap(),
            Keys::Table,
            "grp may have moved from a value the stream does not say"
        );
        // The key moved: both.
        let moved = msg(&[
            (b'K', row(&[Some("1"), None, None])),
            (b'N', row(&[Some("5"), Some("4"), Some("11")])),
        ]);
        assert_eq!(
            of_write(b'U', &moved, &cols(), &sets(&[&["id"]])).unwrap(),
            Keys::Sets(vec![keys(&["id"], &[&["1"], &["5"]])])
        );
        // REPLICA IDENTITY FULL: the whole old row.
        let full = msg(&[
            (b'O', row(&[Some("1"), Some("3"), Some("10")])),
            (b'N', row(&[Some("1"), Some("4"), Some("11")])),
        ]);
        assert_eq!(
            of_write(b'U', &full, &cols(), &sets(&[&["grp"]])).unwrap(),
            Keys::Sets(vec![keys(&["grp"], &[&["3"], &["4"]])])
        );
        // An unchanged TOASTed value, or a column the relation lacks.
        let toast = msg(&[(b'N', vec![0, 1, b'u'])]);
        assert_eq!(
            of_write(b'U', &toast, &cols()[..1], &sets(&[&["id"]])).unwrap(),
            Keys::Table
        );
        assert_eq!(
            of_write(b'U', &same, &cols(), &sets(&[&["nope"]])).unwrap(),
            Keys::Table
        );
    }
}
