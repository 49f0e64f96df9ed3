//! Key column sets on the logical stream: which column sets' keys a write
//! reports must be the same on every instance at every stream position, or
//! instances sharing the L2 would move a key's L2 version differently (one
//! bumps the key, another the whole table) and one could later compute a key
//! another used for data from before a write.
//!
//! So no instance makes a set live by itself: one whose reads want it sends a
//! registration message into the stream (`r<oid>:<tag>:<columns as JSON>`,
//! prefix the channel) and every instance, itself included, makes the set
//! live when the message arrives in its stream. An accepted epoch empties the
//! live sets everywhere (an instance that joined later never saw the older
//! registrations; everyone registers again after it), and bumps the L1 whole
//! slot of every table that had some, so reads keyed before it die: a write
//! reporting only another set would not reach them any more.
//!
//! Forged registrations cost precision at most (a set whose old values the
//! stream does not carry makes writes invalidate the table): with the L2 key
//! they are signed, and without a tag are refused; what is accepted is
//! bounded (sets per table, in all, columns per set), deterministically, as
//! every instance counts the same registrations since the same epoch.

use std::collections::HashSet;

use metrics::counter;
use tokio_postgres::Client;

use crate::invalidation::generations::Generations;
use crate::invalidation::key_deps::ColumnSet;
use crate::invalidation::DbState;
use crate::signing::{from_hex, to_hex, Signer};

const DOMAIN: &[u8] = b"pgtier-key-set-v1";
/// Bounds on what registrations may make live until the next epoch.
const MAX_SETS_PER_TABLE: usize = 16;
const MAX_SETS: usize = 4096;
const MAX_COLUMNS: usize = 32;
/// Postgres's identifier length (NAMEDATALEN - 1).
const MAX_NAME: usize = 63;
const MAX_PAYLOAD: usize = 16 * 1024;

/// A registration as it travels: a table by oid and one of its column sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub oid: u32,
    /// Sorted by name, without repeats (as `key_deps` plans them).
    pub columns: ColumnSet,
    /// Hex HMAC over (database, channel, oid, columns); empty without an L2 key.
    pub tag: String,
}

/// Why a registration was not taken (counted, then ignored: it was never a
/// write, so there is nothing to invalidate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Malformed,
    BadSignature,
    TooMany,
}

impl Refused {
    fn label(self) -> &'static str {
        match self {
            Refused::Malformed => "key_set_malformed",
            Refused::BadSignature => "key_set",
            Refused::TooMany => "key_set_bound",
        }
    }
}

fn parts<'a>(
    database: &'a str,
    channel: &'a str,
    oid: &'a [u8; 4],
    cols: &'a [String],
) -> Vec<&'a [u8]> {
    let mut p: Vec<&[u8]> = vec![DOMAIN, database.as_bytes(), channel.as_bytes(), oid];
    p.extend(cols.iter().map(|c| c.as_bytes()));
    p
}

impl Registration {
    pub fn new(
        signer: Option<&Signer>,
        database: &str,
        channel: &str,
        oid: u32,
        columns: ColumnSet,
    ) -> Registration {
        let tag = signer.map_or_else(String::new, |s| {
            to_hex(&s.tag(&parts(database, channel, &oid.to_le_bytes(), &columns)))
        });
        Registration { oid, columns, tag }
    }

    /// The message's content.
    pub fn payload(&self) -> String {
        let cols = serde_json::to_string(&self.columns).unwrap_or_default();
        format!("r{}:{}:{cols}", self.oid, self.tag)
    }

    /// A message's content: `None` if it is not a registration at all.
    pub fn decode(content: &[u8]) -> Option<Result<Registration, Refused>> {
        let rest = content.strip_prefix(b"r")?;
        Some(Self::decode_rest(rest).ok_or(Refused::Malformed))
    }

    fn decode_rest(rest: &[u8]) -> Option<Registration> {
        // Well above the longest canonical one (32 names of 63 bytes, each
        // character escaped): a huge forged message is not parsed.
        if rest.len() > MAX_PAYLOAD {
            return None;
        }
        let text = std::str::from_utf8(rest).ok()?;
        let (oid, text) = text.split_once(':')?;
        let (tag, cols) = text.split_once(':')?;
        // Digits only: `parse` would take a sign.
        if oid.is_empty() || !oid.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let oid: u32 = oid.parse().ok()?;
        if !tag.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let columns: Vec<String> = serde_json::from_str(cols).ok()?;
        let canonical = !columns.is_empty()
            && columns.len() <= MAX_COLUMNS
            && columns
                .iter()
                .all(|c| !c.is_empty() && c.len() <= MAX_NAME && !c.contains('\0'))
            && columns.windows(2).all(|w| w[0] < w[1]);
        (oid != 0 && canonical).then(|| Registration {
            oid,
            columns,
            tag: tag.to_string(),
        })
    }

    /// Whether the tag is right: with an L2 key, only a registration signed
    /// with it counts (so instances agree on it); without one, any does.
    pub fn genuine(&self, signer: Option<&Signer>, database: &str, channel: &str) -> bool {
        let Some(s) = signer else {
            return true;
        };
        from_hex(&self.tag).is_some_and(|tag| {
            s.verify(
                &parts(database, channel, &self.oid.to_le_bytes(), &self.columns),
                &tag,
            )
        })
    }
}

/// A registration message arrived in the stream: make its set live, or say
/// why not. Depends only on the stream since the last epoch (and the shared
/// key), so every instance decides alike.
pub fn apply(
    db: &DbState,
    signer: Option<&Signer>,
    channel: &str,
    content: &[u8],
) -> Option<Result<(), Refused>> {
    let r = Registration::decode(content)?.and_then(|r| {
        if !r.genuine(signer, &db.name, channel) {
            return Err(Refused::BadSignature);
        }
        if db.keys.is_live(r.oid, &r.columns) {
            return Ok(());
        }
        let (of_table, all) = db.keys.counts(r.oid);
        if of_table >= MAX_SETS_PER_TABLE || all >= MAX_SETS {
            return Err(Refused::TooMany);
        }
        tracing::debug!(database = %db.name, oid = r.oid, columns = ?r.columns, "writes report keys");
        db.keys.mark_live(r.oid, r.columns);
        Ok(())
    });
    if let Err(why) = r {
        counter!("pgtier_control_notifications_rejected_total", "database" => db.name.clone(), "kind" => why.label()).increment(1);
    }
    Some(r)
}

/// An epoch was accepted: forget the live sets (before the L2 versions
/// restart, so a fill that computed its L2 key under the new epoch with a
/// keyed resolution from before sees the key version move and is not kept),
/// then kill the L1 entries keyed by them (L1 only: L2 versions restart
/// anyway, and must not depend on what this instance had live).
pub fn reset(db: &DbState) {
    let had = db.keys.forget();
    let catalog = db.catalog.load();
    for oid in had {
        if let Some(r) = catalog.get(oid) {
            db.gens
                .bump(Generations::whole_slot(&db.name, &r.schema, &r.name));
        }
    }
}

/// What this instance has asked the stream for, since the live sets were
/// last forgotten (each set once, until they are forgotten again).
#[derive(Default)]
pub struct Sent {
    resets: u64,
    sets: HashSet<(u32, ColumnSet)>,
}

impl Sent {
    /// The requested sets not sent since the last reset; remembers them.
    pub fn fresh(&mut self, resets: u64, wanted: Vec<(u32, ColumnSet)>) -> Vec<(u32, ColumnSet)> {
        if resets != self.resets {
            self.resets = resets;
            self.sets.clear();
        }
        wanted
            .into_iter()
            .filter(|w| self.sets.insert(w.clone()))
            .collect()
    }

    /// A send failed: ask again when a read next wants it.
    pub fn failed(&mut self, w: &(u32, ColumnSet)) {
        self.sets.remove(w);
    }
}

/// Send registrations for the column sets reads want (of tables the stream
/// covers). A failure is logged and the set asked for again later: reads stay
/// table-level meanwhile, which is only less precise.
pub async fn send(
    client: &Client,
    db: &DbState,
    signer: Option<&Signer>,
    channel: &str,
    sent: &mut Sent,
) {
    let wanted = db.keys.take_requests();
    let catalog = db.catalog.load();
    let wanted = wanted
        .into_iter()
        .filter(|(oid, _)| catalog.get(*oid).is_some_and(|r| r.has_trigger))
        .collect();
    for w in sent.fresh(db.keys.resets(), wanted) {
        let r = Registration::new(signer, &db.name, channel, w.0, w.1.clone());
        // Transactional: its commit flushes it, so it reaches the streams at
        // once (a non-transactional one waits for the WAL writer).
        let res = client
            .execute(
                "SELECT pg_catalog.pg_logical_emit_message(true, $1, $2)",
                &[&channel, &r.payload()],
            )
            .await;
        if let Err(e) = res {
            tracing::warn!(database = %db.name, oid = w.0, columns = ?w.1, error = %e, "could not register a key column set");
            sent.failed(&w);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cols(c: &[&str]) -> ColumnSet {
        c.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn registrations_decode_from_raw_bytes() {
        let r = Registration::decode(b"r16384::[\"a\",\"id\"]");
        assert_eq!(
            r,
            Some(Ok(Registration {
                oid: 16384,
                columns: cols(&["a", "id"]),
                tag: String::new()
            }))
        );
        assert_eq!(Registration::decode(b"e1:2:ab"), None, "not a registration");
        assert_eq!(Registration::decode(b""), None);
        for bad in [
            &b"r"[..],
            b"r16384",
            b"r16384:",
            b"r16384::",
            b"r16384::[]",
            b"r16384::[\"\"]",
            b"r16384::[\"id\",\"a\"]",
            b"r16384::[\"id\",\"id\"]",
            b"r16384::[\"a\\u0000\"]",
            b"r16384::[1]",
            b"r16384::{\"a\":1}",
            b"r+16384::[\"id\"]",
            b"r-1::[\"id\"]",
            b"r0::[\"id\"]",
            b"r4294967296::[\"id\"]",
            b"r16384:xyz:[\"id\"]",
            b"r16384::[\"id\"",
            b"r16384::[\"\xff\"]",
            b"r\xff16384::[\"id\"]",
        ] {
            assert_eq!(
                Registration::decode(bad),
                Some(Err(Refused::Malformed)),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = format!("r1::[\"{}\"]", "x".repeat(64));
        assert_eq!(
            Registration::decode(long.as_bytes()),
            Some(Err(Refused::Malformed))
        );
        let huge = format!("r1::[\"a\"{}]", " ".repeat(MAX_PAYLOAD));
        assert_eq!(
            Registration::decode(huge.as_bytes()),
            Some(Err(Refused::Malformed))
        );
        let many: Vec<String> = (0..33).map(|i| format!("c{i:02}")).collect();
        let many = format!("r1::{}", serde_json::to_string(&many).unwrap());
        assert_eq!(
            Registration::decode(many.as_bytes()),
            Some(Err(Refused::Malformed))
        );
        // Names with quotes, colons and non-ASCII survive the round trip.
        let odd = Registration::new(None, "db", "ch", 7, cols(&["a:b", "é\"x"]));
        assert_eq!(
            Registration::decode(odd.payload().as_bytes()),
            Some(Ok(odd))
        );
    }

    #[test]
    fn with_a_key_only_signed_registrations_count() {
        let s = Signer::new(&[5u8; 32]);
        let r = Registration::new(Some(&s), "db", "ch", 42, cols(&["id"]));
        let back = match Registration::decode(r.payload().as_bytes()) {
            Some(Ok(b)) => b,
            other => panic!("{other:?}"),
        };
        assert!(back.genuine(Some(&s), "db", "ch"));
        assert!(!back.genuine(Some(&s), "db2", "ch"), "another database");
        assert!(!back.genuine(Some(&s), "db", "ch2"), "another channel");
        assert!(!back.genuine(Some(&Signer::new(&[6u8; 32])), "db", "ch"));
        let moved = Registration {
            oid: 43,
            ..back.clone()
        };
        assert!(!moved.genuine(Some(&s), "db", "ch"), "another table");
        let other = Registration {
            columns: cols(&["id", "v"]),
            ..back.clone()
        };
        assert!(!other.genuine(Some(&s), "db", "ch"), "another column set");
        // Column boundaries are part of what is signed.
        let a = Registration::new(Some(&s), "db", "ch", 1, cols(&["ab"]));
        let b = Registration {
            columns: cols(&["a", "b"]),
            ..a.clone()
        };
        assert!(!b.genuine(Some(&s), "db", "ch"));
        let unsigned = Registration::new(None, "db", "ch", 42, cols(&["id"]));
        assert!(!unsigned.genuine(Some(&s), "db", "ch"));
        assert!(unsigned.genuine(None, "db", "ch"), "no L2: anything goes");
    }

    #[test]
    fn each_set_is_sent_once_until_the_live_sets_are_forgotten() {
        let mut sent = Sent::default();
        let w = vec![(1, cols(&["id"])), (1, cols(&["id"])), (2, cols(&["k"]))];
        assert_eq!(sent.fresh(0, w.clone()).len(), 2);
        assert!(sent.fresh(0, w.clone()).is_empty());
        sent.failed(&(2, cols(&["k"])));
        assert_eq!(sent.fresh(0, w.clone()), vec![(2, cols(&["k"]))]);
        assert_eq!(sent.fresh(1, w).len(), 2, "after a reset, again");
    }

    fn db_with_table(oid: u32) -> DbState {
        use crate::invalidation::catalog::{Catalog, Relation};
        let db = DbState::new("db".into(), std::sync::Arc::new(Generations::default()));
        let t = Relation {
            oid,
            schema: "public".into(),
            name: "t".into(),
            kind: b'r',
            row_security: false,
            has_trigger: true,
            trigger_oid: 0,
            shape: String::new(),
            reads: Vec::new(),
            parents: Vec::new(),
            children: Vec::new(),
            columns: Vec::new(),
            side_effects: false,
        };
        db.set_catalog(Catalog::build(1, vec![t], Default::default()));
        db
    }

    #[test]
    fn registrations_make_sets_live_within_bounds_until_an_epoch() {
        let db = db_with_table(1);
        let s = Signer::new(&[5u8; 32]);
        let reg = |oid, c: &[&str]| Registration::new(Some(&s), "db", "ch", oid, cols(c)).payload();
        assert_eq!(apply(&db, Some(&s), "ch", b"w[]"), None, "not ours");
        assert_eq!(
            apply(&db, Some(&s), "ch", reg(1, &["id"]).as_bytes()),
            Some(Ok(()))
        );
        assert!(db.keys.is_live(1, &cols(&["id"])));
        let forged = Registration::new(None, "db", "ch", 1, cols(&["v"])).payload();
        assert_eq!(
            apply(&db, Some(&s), "ch", forged.as_bytes()),
            Some(Err(Refused::BadSignature))
        );
        assert!(!db.keys.is_live(1, &cols(&["v"])));
        assert_eq!(
            apply(&db, Some(&s), "ch", b"r1:00:[\"v\""),
            Some(Err(Refused::Malformed))
        );
        // Bounded per table; the same set again is no new set.
        for i in 0..20 {
            let r = apply(
                &db,
                Some(&s),
                "ch",
                reg(2, &[&format!("c{i:02}")]).as_bytes(),
            );
            assert_eq!(
                r,
                Some(if i < 16 {
                    Ok(())
                } else {
                    Err(Refused::TooMany)
                })
            );
        }
        assert_eq!(
            apply(&db, Some(&s), "ch", reg(2, &["c00"]).as_bytes()),
            Some(Ok(()))
        );
        assert_eq!(db.keys.counts(2), (16, 17));

        // An epoch forgets them all, and kills what was keyed by them.
        let whole = Generations::whole_slot("db", "public", "t");
        let (gen, version) = (
            db.gens.get(whole),
            db.keys.version.load(std::sync::atomic::Ordering::Acquire),
        );
        reset(&db);
        assert!(!db.keys.is_live(1, &cols(&["id"])));
        assert_eq!(db.keys.counts(2), (0, 0));
        assert_eq!(db.keys.resets(), 1);
        assert!(db.keys.version.load(std::sync::atomic::Ordering::Acquire) > version);
        assert!(db.gens.get(whole) > gen, "entries keyed on table 1 die");
    }
}
