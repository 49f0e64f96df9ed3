//! Commits the logical source applied before they were visible.
//!
//! The walsender decodes a commit once its WAL record is flushed, but the
//! committing backend makes it visible to other sessions only afterwards (and
//! with synchronous replication, only once a standby confirms). So pgtier can
//! bump a table's generation before the write is visible: a read planned after
//! the bump then runs on a snapshot without the write, and its result, stored
//! under the new generation, would be served until the next write (reads 200 ms
//! stale were measured this way). The NOTIFY and poll sources cannot see a
//! commit before it is visible, so only this source holds slots.
//!
//! Each applied commit holds its slots unsettled (see `generations`: nothing
//! read while a slot is held is stored) and is handed to [`run`], which reads
//! the server's current snapshot on a connection of its own and releases the
//! commits that snapshot sees. A snapshot taken now sees a committed
//! transaction iff it is below the snapshot's xmax and not in its xip list.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use tokio::sync::mpsc;
use tokio_postgres::{Client, Statement};

use super::generations::Generations;
use super::payload;
use super::DbState;

/// Least time between two snapshot reads while commits wait: bounds the
/// queries this costs Postgres under a steady stream of writes.
const PACE: Duration = Duration::from_millis(1);
const MAX_PACE: Duration = Duration::from_millis(100);

/// A commit applied from the stream: its transaction id and the slots held.
pub type Applied = (u32, Vec<u32>);

impl DbState {
    /// The slots a write to these tables bumps.
    pub fn write_slots(&self, tables: &[payload::QualifiedName], out: &mut Vec<u32>) {
        for (schema, table) in tables {
            out.push(Generations::slot(&self.name, schema, table));
            out.push(Generations::whole_slot(&self.name, schema, table));
            // Whatever happened to this relation may change what its name means
            // where it is written without a schema.
            out.push(Generations::name_slot(&self.name, table));
        }
    }

    /// The slots a write that reported these keys bumps.
    pub fn key_write_slots(
        &self,
        table: &payload::QualifiedName,
        sets: &[payload::KeySet],
        out: &mut Vec<u32>,
    ) {
        let (schema, name) = table;
        out.push(Generations::slot(&self.name, schema, name));
        for (cols, tuples) in sets {
            let cols: Vec<&str> = cols.iter().map(String::as_str).collect();
            for t in tuples {
                let values: Vec<&str> = t.iter().map(String::as_str).collect();
                out.push(Generations::key_slot(
                    &self.name, schema, name, &cols, &values,
                ));
            }
        }
    }

    /// Bump these slots for a commit that may not be visible yet, holding
    /// them until [`DbState::settle`].
    pub fn bump_unsettled(&self, slots: &[u32]) {
        for &s in slots {
            // Held first: a reader that sees the new generation sees it held.
            self.gens.hold(s);
            self.bump(s);
        }
    }

    /// The commit these slots were held for is visible.
    pub fn settle(&self, slots: &[u32]) {
        for &s in slots {
            self.gens.release(s);
        }
    }
}

/// The parts of `pg_current_snapshot()` that say whether a committed
/// transaction is visible, as 32-bit ids (what pgoutput's Begin carries).
#[derive(Debug, PartialEq, Eq)]
pub struct Snapshot {
    xmax: u32,
    xip: Vec<u32>,
}

impl Snapshot {
    /// Parse `xmin:xmax:xip,...` (full 64-bit ids).
    pub fn parse(text: &str) -> Option<Snapshot> {
        let mut parts = text.split(':');
        let _xmin: u64 = parts.next()?.parse().ok()?;
        let xmax: u64 = parts.next()?.parse().ok()?;
        let xip = match parts.next()? {
            "" => Vec::new(),
            list => list
                .split(',')
                .map(|x| x.parse::<u64>().ok().map(|x| x as u32))
                .collect::<Option<Vec<u32>>>()?,
        };
        if parts.next().is_some() {
            return None;
        }
        Some(Snapshot {
            xmax: xmax as u32,
            xip,
        })
    }

    /// Whether this snapshot sees transaction `xid`, known committed.
    pub fn sees(&self, xid: u32) -> bool {
        // Modulo 2^32, as Postgres compares normal transaction ids.
        let precedes = (xid.wrapping_sub(self.xmax) as i32) < 0;
        precedes && !self.xip.contains(&xid)
    }
}

/// Commits still held, and those sent but not yet received. On the way out
/// the database goes down first (entries are not served while it is down),
/// then every one of them is released: a slot left held would stop caching
/// its table for good. A commit released this way while still invisible
/// cannot outlive the reconnect: the new stream's slot is created only once
/// the transactions running then have finished, and `come_up` follows it.
struct Held {
    db: Arc<DbState>,
    commits: Vec<Applied>,
    applied: mpsc::UnboundedReceiver<Applied>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.db.go_down();
        // Closed first: a send after this fails, and the sender releases.
        self.applied.close();
        while let Ok(c) = self.applied.try_recv() {
            self.commits.push(c);
        }
        for (_, slots) in self.commits.drain(..) {
            self.db.settle(&slots);
        }
    }
}

/// Release each commit received on `applied` once the server's snapshot sees
/// it. Reads the snapshot every `check` when idle too, so a dead connection
/// is noticed before the next write needs it. Ends with an error when the
/// connection fails or a read takes longer than `check` (the stream must then
/// stop: what it holds could not be released), or when the sender is gone.
pub async fn run(
    client: Client,
    db: Arc<DbState>,
    applied: mpsc::UnboundedReceiver<Applied>,
    check: Duration,
) -> anyhow::Result<()> {
    let mut held = Held {
        db: db.clone(),
        commits: Vec::new(),
        applied,
    };
    let query = tokio::time::timeout(check, client.prepare(SNAPSHOT))
        .await
        .map_err(|_| anyhow!("preparing the snapshot query timed out"))?
        .context("preparing the snapshot query")?;
    let mut pace = PACE;
    loop {
        if held.commits.is_empty() {
            match tokio::time::timeout(check, held.applied.recv()).await {
                Ok(Some(first)) => held.commits.push(first),
                Ok(None) => return Err(anyhow!("the stream is gone")),
                Err(_) => {
                    current(&client, &query, check).await?;
                    continue;
                }
            }
        }
        let mut arrived = false;
        while let Ok(more) = held.applied.try_recv() {
            held.commits.push(more);
            arrived = true;
        }
        let snapshot = current(&client, &query, check).await?;
        let before = held.commits.len();
        held.commits.retain(|(xid, slots)| {
            let seen = snapshot.sees(*xid);
            if seen {
                db.settle(slots);
            }
            !seen
        });
        // A commit that stays invisible (a synchronous standby that does not
        // answer) is asked about less and less often.
        pace = if arrived || held.commits.len() < before {
            PACE
        } else {
            (pace * 2).min(MAX_PACE)
        };
        tokio::time::sleep(pace).await;
    }
}

/// The snapshot query, prepared once: it runs up to a thousand times a
/// second under writes.
const SNAPSHOT: &str = "SELECT pg_catalog.pg_current_snapshot()::text";

async fn current(client: &Client, query: &Statement, within: Duration) -> anyhow::Result<Snapshot> {
    let row = tokio::time::timeout(within, client.query_one(query, &[]))
        .await
        .map_err(|_| anyhow!("reading the server's snapshot timed out"))?
        .context("reading the server's snapshot")?;
    row.try_get::<_, &str>(0)
        .ok()
        .and_then(Snapshot::parse)
        .ok_or_else(|| anyhow!("an unreadable snapshot"))
}

#[cfg(test)]
mod tests {
    use super::Snapshot;

    #[test]
    fn a_snapshot_sees_what_finished_below_its_xmax() {
        let s = Snapshot::parse("100:105:100,103").expect("valid");
        assert!(s.sees(99));
        assert!(s.sees(101) && s.sees(104));
        assert!(!s.sees(100) && !s.sees(103), "in progress when taken");
        assert!(!s.sees(105) && !s.sees(200), "at or above xmax");
        let empty = Snapshot::parse("7:7:").expect("valid");
        assert!(empty.sees(6) && !empty.sees(7));
    }

    #[test]
    fn ids_compare_modulo_two_to_the_32() {
        // Epoch 1: xmax 2^32 + 5. A 32-bit id of 4 is below it, and one of
        // 2^32 - 10 (the previous epoch's end) is too.
        let s = Snapshot::parse("4294967300:4294967301:").expect("valid");
        assert!(s.sees(4) && s.sees(u32::MAX - 9));
        assert!(!s.sees(5) && !s.sees(6));
    }

    #[test]
    fn malformed_snapshots_are_refused() {
        for bad in ["", "1:2", "1:x:", "1:2:3:4", "a:2:", "1:2:3,,4"] {
            assert_eq!(Snapshot::parse(bad), None, "{bad:?}");
        }
    }
}
