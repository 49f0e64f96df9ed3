//! What travels on the notification channel. Payloads are short text, well under
//! Postgres's 8000-byte limit:
//!
//! - `w[["schema","table"],...]` a write to these tables (the table, its
//!   inheritance ancestors and descendants, fixed when the trigger is installed)
//! - `d[["schema","table"],...]` DDL on these relations (also re-read the catalog)
//! - `k["schema","table",[[["c1",..],[["v1",..],..]],..]]` a write to a table
//!   whose reads by key are cached: for each registered column set, the values
//!   (as `::text` prints them) of every row it changed, old and new
//! - `*` everything in this database changed (a payload that would not fit)
//! - `f<instance>:<n>:<nonce>` a fence sent by a pgtier instance after a
//!   session's write; only the instance that registered it, with that random
//!   nonce, completes it (any role may NOTIFY the channel)
//! - `u[["schema","table"],...]` a pgtier stopped these tables' writes being
//!   announced (after a write, until a read wants them cached again): drop their
//!   entries and cache them only after watching them afresh
//! - `e<counter>:<n>:<tag>` a pgtier instance (re)connected: every instance
//!   restarts its shared (L2) table versions from here, so all of them agree
//!   again. Signed with the L2 signing key (`tag`, see `epoch`), and `counter`
//!   (a transaction id of the sender's) must exceed every counter accepted
//!   before, so a forged or replayed epoch cannot rewind L2 versions.
//!
//! `w`, `d`, `*` and `u` come from triggers and from any pgtier (not
//! authenticated): each of them only ever causes invalidation, never a hit.

use serde_json::Value;

/// Postgres refuses longer payloads.
pub const MAX_PAYLOAD: usize = 7999;

pub type QualifiedName = (String, String);

/// A column set and the key tuples a write changed in it.
pub type KeySet = (Vec<String>, Vec<Vec<String>>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    Write(Vec<QualifiedName>),
    Keys(QualifiedName, Vec<KeySet>),
    Ddl(Vec<QualifiedName>),
    Unwatch(Vec<QualifiedName>),
    All,
    Fence { instance: u64, seq: u64, nonce: u64 },
    Epoch(Epoch),
}

/// An epoch notification as received; `tag` is checked by `epoch::verify`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Epoch {
    pub counter: u64,
    pub epoch: u64,
    pub tag: String,
}

fn names(json: &str) -> Option<Vec<QualifiedName>> {
    let v: Value = serde_json::from_str(json).ok()?;
    v.as_array()?
        .iter()
        .map(|pair| {
            let p = pair.as_array()?;
            Some((
                p.first()?.as_str()?.to_string(),
                p.get(1)?.as_str()?.to_string(),
            ))
        })
        .collect()
}

/// `["schema","table",[[cols, tuples], ...]]`; anything malformed is None
/// (and then invalidates the whole database, as any unreadable payload).
fn keys(json: &str) -> Option<Payload> {
    let strings = |v: &Value| -> Option<Vec<String>> {
        v.as_array()?
            .iter()
            .map(|s| s.as_str().map(str::to_string))
            .collect()
    };
    let v: Value = serde_json::from_str(json).ok()?;
    let [schema, table, sets] = v.as_array()?.as_slice() else {
        return None;
    };
    let sets: Option<Vec<KeySet>> = sets
        .as_array()?
        .iter()
        .map(|set| {
            let [cols, tuples] = set.as_array()?.as_slice() else {
                return None;
            };
            let cols = strings(cols)?;
            let tuples: Option<Vec<Vec<String>>> = tuples
                .as_array()?
                .iter()
                .map(|t| strings(t).filter(|t| t.len() == cols.len()))
                .collect();
            Some((cols, tuples?))
        })
        .collect();
    Some(Payload::Keys(
        (schema.as_str()?.to_string(), table.as_str()?.to_string()),
        sets?,
    ))
}

impl Payload {
    pub fn parse(s: &str) -> Option<Payload> {
        let (kind, rest) = s.split_at_checked(1)?;
        match kind {
            "w" => names(rest).map(Payload::Write),
            "k" => keys(rest),
            "d" => names(rest).map(Payload::Ddl),
            "u" => names(rest).map(Payload::Unwatch),
            "*" => Some(Payload::All),
            "e" => {
                let mut parts = rest.splitn(3, ':');
                let first = parts.next()?;
                Some(Payload::Epoch(match (parts.next(), parts.next()) {
                    (Some(e), Some(tag)) => Epoch {
                        counter: first.parse().ok()?,
                        epoch: e.parse().ok()?,
                        tag: tag.to_string(),
                    },
                    // The unsigned form of older versions: never accepted.
                    _ => Epoch {
                        counter: 0,
                        epoch: first.parse().ok()?,
                        tag: String::new(),
                    },
                }))
            }
            "f" => {
                let mut parts = rest.splitn(3, ':');
                Some(Payload::Fence {
                    instance: parts.next()?.parse().ok()?,
                    seq: parts.next()?.parse().ok()?,
                    // Older versions sent none: never matches a registered fence.
                    nonce: parts.next().map_or(Some(0), |n| n.parse().ok())?,
                })
            }
            _ => None,
        }
    }

    /// The write payload for a trigger, or `*` when it would not fit.
    pub fn write_payload(tables: &[QualifiedName]) -> String {
        let json = serde_json::to_string(
            &tables
                .iter()
                .map(|(s, n)| [s.as_str(), n.as_str()])
                .collect::<Vec<_>>(),
        )
        .unwrap_or_default();
        if json.is_empty() || json.len() + 1 > MAX_PAYLOAD {
            "*".into()
        } else {
            format!("w{json}")
        }
    }

    /// A `d` payload naming these relations, or `*` when it would not fit.
    pub fn ddl_payload(tables: &[QualifiedName]) -> String {
        let w = Self::write_payload(tables);
        match w.strip_prefix('w') {
            Some(json) => format!("d{json}"),
            None => w,
        }
    }

    pub fn fence(instance: u64, seq: u64, nonce: u64) -> String {
        format!("f{instance}:{seq}:{nonce}")
    }

    pub fn epoch(e: &Epoch) -> String {
        format!("e{}:{}:{}", e.counter, e.epoch, e.tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let t = vec![
            ("public".to_string(), "a\"b,c".to_string()),
            ("s".into(), "t".into()),
        ];
        let p = Payload::write_payload(&t);
        assert_eq!(Payload::parse(&p), Some(Payload::Write(t.clone())));
        assert_eq!(
            Payload::parse(&Payload::fence(12, 34, 56)),
            Some(Payload::Fence {
                instance: 12,
                seq: 34,
                nonce: 56
            })
        );
        assert_eq!(
            Payload::parse("f12:34"),
            Some(Payload::Fence {
                instance: 12,
                seq: 34,
                nonce: 0
            })
        );
        assert_eq!(Payload::parse("*"), Some(Payload::All));
        let e = Epoch {
            counter: 9,
            epoch: 77,
            tag: "abcd".into(),
        };
        assert_eq!(Payload::parse(&Payload::epoch(&e)), Some(Payload::Epoch(e)));
        assert_eq!(
            Payload::parse("e77"),
            Some(Payload::Epoch(Epoch {
                counter: 0,
                epoch: 77,
                tag: String::new()
            }))
        );
        assert_eq!(
            Payload::parse("d[[\"a\",\"b\"]]"),
            Some(Payload::Ddl(vec![("a".into(), "b".into())]))
        );
        assert_eq!(
            Payload::parse("u[[\"public\", \"t\"]]"),
            Some(Payload::Unwatch(vec![("public".into(), "t".into())]))
        );
        assert_eq!(Payload::parse("w[garbage"), None);
        assert_eq!(Payload::parse(""), None);
        let many: Vec<QualifiedName> = (0..2000)
            .map(|i| ("public".into(), format!("partition_{i}")))
            .collect();
        assert_eq!(Payload::write_payload(&many), "*");
        assert_eq!(Payload::ddl_payload(&many), "*");
        assert_eq!(
            Payload::parse(&Payload::ddl_payload(&t)),
            Some(Payload::Ddl(t))
        );
    }
}
