//! `invalidation.source = "poll"`: the triggers append what a write changed
//! to the unlogged table `pgtier.changes` (through `pgtier.announce`) instead
//! of sending a NOTIFY, and this task reads it every `poll_interval`.
//!
//! Why: a notifying commit holds Postgres's notification lock through its
//! WAL flush, so announced writes commit one at a time (about a third of
//! plain UPDATE throughput on the benchmark machine). An INSERT into an
//! unlogged table takes no lock another writer waits for and writes no WAL.
//!
//! Every committed row is read exactly once although rows become visible out
//! of id order (a writer takes its id when it inserts, and is seen when it
//! commits). Each poll reads, in one statement and so under one snapshot, the
//! rows above the highest id read so far and the rows of the transactions
//! that the previous poll's snapshot did not see as finished: those in its
//! xip list and those from its xmax on (running transactions above the last
//! completed one are not listed). A row first visible at poll k was
//! invisible at poll k-1: its transaction was one of those, or took its id
//! after that snapshot was taken, so after every id it could see.
//! Transaction ids are the top-level ones (`pg_current_xact_id`), as in the
//! snapshot. Only `pgtier.announce` (SECURITY DEFINER) may insert: a role
//! choosing its own ids could move the cursor past everyone's writes.
//!
//! Read-your-writes: a fence waits for a poll that started after its write's
//! ReadyForQuery; the same round probes the listening connection, which still
//! carries DDL and control notifications (see `probe_fences`).
//!
//! Cleaning: rows are deleted once read by a poll at least `KEEP` ago (its
//! snapshot saw their transactions finished). An instance that cannot poll
//! for `check_interval` stops using the cache, long before `KEEP`.
//!
//! No L2 with this source: instances read at moments of their own, so they
//! could not derive the same versions (the configuration refuses it).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_postgres::Client;

use super::control::Incoming;
use super::probe_fences::ProbeFences;

/// How long read rows are kept for slower instances.
const KEEP: Duration = Duration::from_secs(60);
const CLEAN_EVERY: Duration = Duration::from_secs(10);

const START: &str = "SELECT pg_catalog.pg_current_snapshot()::text, \
     coalesce((SELECT max(id) FROM pgtier.changes), 0)";

/// Three index scans, not one filter with ORs (which plans as a sequential
/// scan of up to a minute of writes, on every poll); UNION ALL, as a UNION's
/// hash table is sized for the planner's guess on every poll. A row two
/// scans find comes twice, side by side (see `Cursor::advance`).
const POLL: &str = "SELECT s::text, c.id, c.payload \
     FROM pg_catalog.pg_current_snapshot() s \
     LEFT JOIN ( \
       SELECT id, payload FROM pgtier.changes WHERE id > $1 \
       UNION ALL SELECT id, payload FROM pgtier.changes WHERE tx = ANY($2::text[]::xid8[]) \
       UNION ALL SELECT id, payload FROM pgtier.changes WHERE tx >= $3::text::xid8 \
     ) c ON true \
     ORDER BY c.id";

/// Where reading the change table stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// The highest id read.
    max_id: i64,
    /// Transactions running at the last poll below its xmax (as text, for
    /// the query).
    running: Vec<String>,
    /// The last poll's snapshot xmin: every transaction below it had ended.
    xmin: u64,
    /// The last poll's snapshot xmax: transactions from it on may have been
    /// running too (they are not listed in xip).
    xmax: u64,
}

/// `xmin:xmax:xip,...` (a `pg_snapshot` as text).
fn snapshot(text: &str) -> Option<(u64, u64, Vec<String>)> {
    let mut parts = text.split(':');
    let xmin = parts.next()?.parse().ok()?;
    let xmax = parts.next()?.parse::<u64>().ok()?;
    let xip = parts.next()?;
    let running = xip
        .split(',')
        .filter(|x| !x.is_empty())
        .map(|x| x.parse::<u64>().map(|v| v.to_string()).ok())
        .collect::<Option<Vec<_>>>()?;
    Some((xmin, xmax, running))
}

impl Cursor {
    /// Where to start: every write committing after this is read. (The
    /// listener starts a new epoch after it, so nothing before matters.)
    pub async fn start(client: &Client) -> anyhow::Result<Cursor> {
        let row = client.query_one(START, &[]).await?;
        let (xmin, xmax, running) = snapshot(row.get(0))
            .ok_or_else(|| anyhow::anyhow!("unreadable snapshot {:?}", row.get::<_, &str>(0)))?;
        Ok(Cursor {
            max_id: row.get(1),
            running,
            xmin,
            xmax,
        })
    }

    /// Take in one poll's rows (snapshot, id, payload), returning the
    /// payloads in id order.
    fn advance(
        &mut self,
        rows: &[(String, Option<i64>, Option<String>)],
    ) -> anyhow::Result<Vec<String>> {
        let Some((snap, _, _)) = rows.first() else {
            anyhow::bail!("a poll returned no snapshot");
        };
        let (xmin, xmax, running) =
            snapshot(snap).ok_or_else(|| anyhow::anyhow!("unreadable snapshot {snap:?}"))?;
        let mut payloads = Vec::new();
        let mut last = None;
        for (_, id, payload) in rows {
            if let (Some(id), Some(p)) = (id, payload) {
                if last == Some(*id) {
                    continue;
                }
                last = Some(*id);
                self.max_id = self.max_id.max(*id);
                payloads.push(p.clone());
            }
        }
        self.running = running;
        self.xmin = xmin;
        self.xmax = xmax;
        Ok(payloads)
    }
}

/// One poll with `stmt` (a prepared [`POLL`], or `None` to prepare it):
/// the payloads of the rows not read before, in id order.
pub async fn read(
    client: &Client,
    stmt: Option<&tokio_postgres::Statement>,
    cursor: &mut Cursor,
) -> anyhow::Result<Vec<String>> {
    let xmax = cursor.xmax.to_string();
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
        [&cursor.max_id, &cursor.running, &xmax];
    let rows = match stmt {
        Some(s) => client.query(s, &params).await?,
        None => client.query(POLL, &params).await?,
    };
    let rows: Vec<(String, Option<i64>, Option<String>)> = rows
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
        .collect::<Result<_, tokio_postgres::Error>>()?;
    cursor.advance(&rows)
}

/// What the poll task works with.
pub(super) struct Poller {
    /// A connection of its own (polls never wait behind other work).
    pub client: Client,
    /// The listening connection, probed along with each poll that releases
    /// fences.
    pub listening: Arc<Client>,
    pub fences: Arc<ProbeFences>,
    /// Held weakly: its closing is how the listener learns the listening
    /// connection is gone.
    pub applier: mpsc::WeakUnboundedSender<Incoming>,
    pub interval: Duration,
    /// A poll round that takes longer ends the listener's session.
    pub timeout: Duration,
}

impl Poller {
    /// Poll until something fails (the error ends the listener's session).
    /// `go_down` is called first, before the waiting fences are released.
    pub async fn run(self, mut cursor: Cursor, go_down: impl Fn()) -> anyhow::Result<()> {
        // Planned for each poll's own bounds: a generic plan guesses a third
        // of the table above `$1` and scans it all.
        let prepared = async {
            self.client
                .batch_execute("SET plan_cache_mode = force_custom_plan")
                .await?;
            self.client.prepare(POLL).await
        };
        let stmt = match prepared.await {
            Ok(s) => s,
            Err(e) => {
                go_down();
                return Err(e.into());
            }
        };
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // (when, max id, xmin) of past polls, for cleaning.
        let mut past: VecDeque<(Instant, i64, u64)> = VecDeque::new();
        let mut cleaned = Instant::now();
        let mut polled = Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.fences.wanted.notified() => {}
            }
            // Frozen for a long while (a stopped process, a suspended VM):
            // other instances may have deleted rows this one never read.
            if polled.elapsed() > KEEP / 2 {
                go_down();
                anyhow::bail!(
                    "no poll for {:?}: rows may have been deleted unread",
                    polled.elapsed()
                );
            }
            // Each fence taken here was registered after its write's
            // ReadyForQuery, so before this round's snapshot.
            let batch = self.fences.take();
            let done = self.round(&stmt, &mut cursor, batch.is_empty()).await;
            let sent = done.and_then(|payloads| {
                let applier = self
                    .applier
                    .upgrade()
                    .ok_or_else(|| anyhow::anyhow!("notification applier gone"))?;
                for p in payloads {
                    applier
                        .send(Incoming::Polled(p))
                        .map_err(|_| anyhow::anyhow!("notification applier gone"))?;
                }
                Ok(applier)
            });
            let applier = match sent {
                Ok(a) => a,
                Err(e) => {
                    // Down before the waiters go: released sessions must not
                    // read entries whose invalidation was lost.
                    go_down();
                    drop(batch);
                    self.fences.clear();
                    return Err(e);
                }
            };
            if !batch.is_empty() {
                if let Err(unsent) = applier.send(Incoming::Probed(batch)) {
                    go_down();
                    drop(unsent);
                    anyhow::bail!("notification applier gone");
                }
            }
            let now = Instant::now();
            polled = now;
            past.push_back((now, cursor.max_id, cursor.xmin));
            if now.duration_since(cleaned) >= CLEAN_EVERY {
                cleaned = now;
                if let Err(e) = self.clean(&mut past, now).await {
                    go_down();
                    return Err(e);
                }
            }
        }
    }

    /// One poll (and a probe of the listening connection if fences wait):
    /// the payloads read, in id order.
    async fn round(
        &self,
        stmt: &tokio_postgres::Statement,
        cursor: &mut Cursor,
        no_fence: bool,
    ) -> anyhow::Result<Vec<String>> {
        let round = async {
            let (payloads, probed) = tokio::join!(read(&self.client, Some(stmt), cursor), async {
                if no_fence {
                    Ok(Vec::new())
                } else {
                    self.listening.simple_query("").await
                }
            });
            probed?;
            payloads
        };
        match tokio::time::timeout(self.timeout, round).await {
            Ok(payloads) => payloads,
            Err(_) => anyhow::bail!("a poll of the change table took over {:?}", self.timeout),
        }
    }

    /// Delete the rows a poll at least `KEEP` ago had read and seen finished.
    async fn clean(
        &self,
        past: &mut VecDeque<(Instant, i64, u64)>,
        now: Instant,
    ) -> anyhow::Result<()> {
        let mut upto = None;
        while past
            .front()
            .is_some_and(|(t, _, _)| now.duration_since(*t) >= KEEP)
        {
            upto = past.pop_front();
        }
        // Only one sample per cleaning period need stay.
        let mut last = None;
        past.retain(|(t, _, _)| {
            let keep = last.is_none_or(|l: Instant| t.duration_since(l) >= CLEAN_EVERY);
            if keep {
                last = Some(*t);
            }
            keep
        });
        if let Some((_, max_id, xmin)) = upto {
            self.client
                .execute(
                    "DELETE FROM pgtier.changes WHERE id <= $1 AND tx < $2::text::xid8",
                    &[&max_id, &xmin.to_string()],
                )
                .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_are_read_with_or_without_running_transactions() {
        assert_eq!(snapshot("10:12:"), Some((10, 12, vec![])));
        assert_eq!(
            snapshot("10:15:10,13"),
            Some((10, 15, vec!["10".to_string(), "13".to_string()]))
        );
        assert_eq!(snapshot("10:x:"), None);
        assert_eq!(snapshot("10:12:1,y"), None);
        assert_eq!(snapshot(""), None);
    }

    #[test]
    fn a_poll_moves_to_the_highest_id_and_the_new_running_list() {
        let mut c = Cursor {
            max_id: 5,
            running: vec!["7".into()],
            xmin: 7,
            xmax: 8,
        };
        let rows = vec![
            ("8:12:9".to_string(), Some(3), Some("w[]".to_string())),
            ("8:12:9".to_string(), Some(9), Some("k[]".to_string())),
            ("8:12:9".to_string(), Some(9), Some("k[]".to_string())),
        ];
        assert_eq!(c.advance(&rows).expect("rows"), vec!["w[]", "k[]"]);
        assert_eq!(
            (c.max_id, c.running.clone(), c.xmin),
            (9, vec!["9".to_string()], 8)
        );
        // No rows: the snapshot alone still moves the running list.
        let none = vec![("12:12:".to_string(), None, None)];
        assert!(c.advance(&none).expect("rows").is_empty());
        assert_eq!((c.max_id, c.running.len(), c.xmin), (9, 0, 12));
        assert!(c.advance(&[]).is_err(), "no snapshot");
    }
}
