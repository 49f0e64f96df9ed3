//! What travels on the notification channel. Payloads are short text, well under
//! Postgres's 8000-byte limit:
//!
//! - `w[["schema","table"],...]` a write to these tables (the table, its
//!   inheritance ancestors and descendants, fixed when the trigger is installed)
//! - `d[["schema","table"],...]` DDL on these relations (also re-read the catalog)
//! - `*` everything in this database changed (a payload that would not fit)
//! - `f<instance>:<n>` a fence sent by a pgtier instance after a session's write
//! - `u[["schema","table"],...]` a pgtier stopped these tables' writes being
//!   announced (after a write, until a read wants them cached again): drop their
//!   entries and cache them only after watching them afresh
//! - `e<n>` a pgtier instance (re)connected: every instance restarts its shared
//!   (L2) table versions from here, so all of them agree again

use serde_json::Value;

/// Postgres refuses longer payloads.
pub const MAX_PAYLOAD: usize = 7999;

pub type QualifiedName = (String, String);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    Write(Vec<QualifiedName>),
    Ddl(Vec<QualifiedName>),
    Unwatch(Vec<QualifiedName>),
    All,
    Fence { instance: u64, seq: u64 },
    Epoch(u64),
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

impl Payload {
    pub fn parse(s: &str) -> Option<Payload> {
        let (kind, rest) = s.split_at_checked(1)?;
        match kind {
            "w" => names(rest).map(Payload::Write),
            "d" => names(rest).map(Payload::Ddl),
            "u" => names(rest).map(Payload::Unwatch),
            "*" => Some(Payload::All),
            "e" => rest.parse().ok().map(Payload::Epoch),
            "f" => {
                let (i, n) = rest.split_once(':')?;
                Some(Payload::Fence {
                    instance: i.parse().ok()?,
                    seq: n.parse().ok()?,
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

    pub fn fence(instance: u64, seq: u64) -> String {
        format!("f{instance}:{seq}")
    }

    pub fn epoch(n: u64) -> String {
        format!("e{n}")
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
            Payload::parse("f12:34"),
            Some(Payload::Fence {
                instance: 12,
                seq: 34
            })
        );
        assert_eq!(Payload::parse("*"), Some(Payload::All));
        assert_eq!(
            Payload::parse(&Payload::epoch(77)),
            Some(Payload::Epoch(77))
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
