//! The change feed of one database: a temporary logical slot on a replication
//! connection, streaming `pgoutput` for the publication. Every committed
//! transaction invalidates the tables it changed when its Commit arrives, in
//! commit order; pgtier's own announcements (DDL found by a catalog scan, role
//! changes, key column sets for key-level invalidation, see `register`) are
//! logical messages in the same stream, so they take effect at their place in
//! it. So do L2 epochs: every instance's stream decodes the same commits in the
//! same order, so instances that accepted the same epoch derive the same L2
//! versions and the same live column sets. Read-your-writes fences are WAL
//! positions: the feed publishes how far it has applied (see `lsn_fences`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail};
use bytes::BytesMut;
use metrics::{counter, gauge, histogram};
use tokio::sync::mpsc;

use super::conn::ReplConn;
use super::keys::{self, Keys};
use super::pgoutput::{self, Change, Frame};
use super::register;
use crate::cache::Cache;
use crate::invalidation::payload::{KeySet, Payload, QualifiedName};
use crate::invalidation::{epoch, settle, DbState};
use crate::signing::Signer;

/// How often the slot hears how far we are (besides answering keepalives):
/// a temporary slot still holds WAL back while we are connected.
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// Quote a string as a SQL literal for a replication command.
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Create a temporary slot and start streaming `publication` on `conn`.
/// Every transaction that commits after this returns is streamed.
pub async fn start(conn: &mut ReplConn, publication: &str) -> anyhow::Result<String> {
    let slot = format!("pgtier_{:016x}", rand::random::<u64>());
    // TEMPORARY: Postgres drops it when this connection ends, so a stopped
    // pgtier never makes it keep WAL.
    conn.query(&format!(
        "CREATE_REPLICATION_SLOT {slot} TEMPORARY LOGICAL pgoutput NOEXPORT_SNAPSHOT"
    ))
    .await
    .map_err(|e| anyhow!("creating a temporary replication slot: {e}"))?;
    let names = format!("\"{}\"", publication.replace('"', "\"\""));
    conn.start(&format!(
        "START_REPLICATION SLOT {slot} LOGICAL 0/0 (proto_version '1', publication_names {}, messages 'true')",
        literal(&names)
    ))
    .await
    .map_err(|e| anyhow!("starting replication: {e}"))?;
    Ok(slot)
}

/// Applies one database's stream.
pub struct Feed {
    pub db: Arc<DbState>,
    pub cache: Arc<Cache>,
    /// Prefix of pgtier's logical messages (the NOTIFY channel's name).
    pub prefix: String,
    pub instance: u64,
    /// Checks epochs (L2), as the NOTIFY applier does.
    pub signer: Option<Signer>,
    /// Told when the catalog must be read again (DDL announced, a relation
    /// that changed shape); closing it tells the listener the stream is gone.
    pub ddl: mpsc::UnboundedSender<()>,
    /// Applied commits, to be released once visible (see `settle`).
    pub settle: mpsc::UnboundedSender<settle::Applied>,
}

/// A relation as the stream last described it.
struct Rel {
    name: QualifiedName,
    /// A hash of its column definitions, to notice a change.
    hash: u64,
    /// Names, whether each is part of the replica identity, type oids.
    columns: Vec<pgoutput::Column>,
}

/// More key tuples than this for one table in one transaction, and the
/// transaction invalidates the table (the key-reporting triggers' bound).
const MAX_KEYS: usize = 1000;

/// Per table with live column sets that reported keys in this transaction:
/// the key tuples per column set, and how many.
type Keyed = Vec<(u32, Vec<KeySet>, usize)>;

impl Feed {
    /// Run until the stream fails; the error says why.
    pub async fn run(self, mut conn: ReplConn) -> anyhow::Result<()> {
        let name = self.db.name.clone();
        let bytes = counter!("pgtier_logical_bytes_total", "database" => name.clone());
        let invalidations =
            counter!("pgtier_invalidations_total", "database" => name.clone(), "level" => "table");
        let key_invalidations =
            counter!("pgtier_invalidations_total", "database" => name.clone(), "level" => "key");
        let commits = counter!("pgtier_logical_transactions_total", "database" => name.clone());
        let lag = histogram!("pgtier_logical_lag_seconds", "database" => name.clone());
        let lag_last = gauge!("pgtier_logical_lag_last_seconds", "database" => name);
        let mut rels: HashMap<u32, Rel> = HashMap::new();
        // What the transaction being received changed, and the messages it
        // carries: applied together at its Commit.
        let mut touched: Vec<u32> = Vec::new();
        let mut keyed: Keyed = Vec::new();
        let mut messages: Vec<Vec<u8>> = Vec::new();
        let mut in_txn = false;
        let mut xid: u32 = 0;
        // Everything before this WAL position has been applied.
        let mut done: u64 = 0;
        let mut status = tokio::time::interval(STATUS_EVERY);
        status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut out = BytesMut::new();
        loop {
            let data = tokio::select! {
                d = conn.recv() => d?,
                () = self.settle.closed() => bail!("the visibility check stopped"),
                _ = status.tick() => {
                    out.clear();
                    pgoutput::status_update(done, SystemTime::now(), &mut out);
                    conn.send(&out).await?;
                    continue;
                }
            };
            bytes.increment(data.len() as u64);
            let change = match pgoutput::frame(&data)? {
                Frame::Keepalive { end, .. } => {
                    // Between transactions, everything up to the server's
                    // position has been sent (a transaction is sent whole at
                    // its commit). Answering every keepalive at once keeps the
                    // walsender sending them as it catches up.
                    if !in_txn {
                        done = done.max(end);
                        // A walsender waiting for WAL sends one whenever it
                        // has decoded past what we last reported: on an idle
                        // server, this is what passes a session's fence.
                        self.db.lsn_fences.advance(done);
                    }
                    out.clear();
                    pgoutput::status_update(done, SystemTime::now(), &mut out);
                    conn.send(&out).await?;
                    continue;
                }
                Frame::XLogData { data, .. } => pgoutput::change(data)?,
            };
            match change {
                Change::Begin { xid: x } => {
                    xid = x;
                    in_txn = true;
                    touched.clear();
                    keyed.clear();
                    messages.clear();
                }
                Change::Relation {
                    oid,
                    schema,
                    name,
                    columns,
                } => {
                    let rel = Rel {
                        name: (
                            String::from_utf8_lossy(schema).into_owned(),
                            String::from_utf8_lossy(name).into_owned(),
                        ),
                        hash: xxhash_rust::xxh3::xxh3_64(columns),
                        columns: pgoutput::column_names(columns)?,
                    };
                    // Sent again after the relation changed (or its cache
                    // entry was reset): a rename or new columns are DDL the
                    // catalog must see before the periodic rescan.
                    let changed = rels
                        .get(&oid)
                        .is_some_and(|r| r.name != rel.name || r.hash != rel.hash);
                    rels.insert(oid, rel);
                    if changed && self.ddl.send(()).is_err() {
                        return Ok(());
                    }
                }
                Change::Write { oid, kind, rest } => {
                    if touched.contains(&oid) {
                        continue;
                    }
                    // The sets registered through the stream, whatever this
                    // instance's own reads or `key_level` (see `register`).
                    let sets = self.db.keys.sets(oid);
                    let found = match rels.get(&oid) {
                        Some(rel) if !sets.is_empty() => {
                            keys::of_write(kind, rest, &rel.columns, &sets)?
                        }
                        _ => Keys::Table,
                    };
                    match found {
                        Keys::Sets(found) => add_keys(&mut keyed, &mut touched, oid, found),
                        Keys::Table => touched.push(oid),
                    }
                }
                Change::Truncate { oids } => {
                    for oid in oids {
                        if !touched.contains(&oid) {
                            touched.push(oid);
                        }
                    }
                }
                Change::Message {
                    transactional,
                    prefix,
                    content,
                } => {
                    if prefix != self.prefix.as_bytes() {
                        continue;
                    }
                    if transactional {
                        messages.push(content.to_vec());
                    } else {
                        self.message(content)?;
                    }
                }
                Change::Commit { end, time_micros } => {
                    let tables = touched
                        .iter()
                        .map(|oid| {
                            rels.get(oid).map(|r| r.name.clone()).ok_or_else(|| {
                                anyhow!("a change to relation {oid}, never described")
                            })
                        })
                        .collect::<anyhow::Result<Vec<_>>>()?;
                    let mut slots = Vec::new();
                    if !tables.is_empty() {
                        self.db.write_slots(&tables, &mut slots);
                        invalidations.increment(tables.len() as u64);
                    }
                    for (oid, sets, n) in keyed.drain(..) {
                        if touched.contains(&oid) {
                            continue;
                        }
                        let rel = rels.get(&oid).ok_or_else(|| {
                            anyhow!("a change to relation {oid}, never described")
                        })?;
                        self.db.key_write_slots(&rel.name, &sets, &mut slots);
                        key_invalidations.increment(n as u64);
                    }
                    if !slots.is_empty() {
                        // Possibly before other sessions see the commit: held
                        // until `settle` sees it visible.
                        self.db.bump_unsettled(&slots);
                        if let Err(refused) = self.settle.send((xid, slots)) {
                            // Nobody will release them: down first, then
                            // released (no read is stored while down).
                            self.db.go_down();
                            self.db.settle(&refused.0 .1);
                            bail!("the visibility check stopped");
                        }
                    }
                    for m in messages.drain(..) {
                        self.message(&m)?;
                    }
                    touched.clear();
                    in_txn = false;
                    done = done.max(end);
                    // Applied: sessions waiting for this commit may go on.
                    self.db.lsn_fences.advance(done);
                    commits.increment(1);
                    let now = SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map_or(0, |d| d.as_micros() as i64);
                    let l = (now - pgoutput::unix_micros(time_micros)).max(0) as f64 / 1e6;
                    lag.record(l);
                    lag_last.set(l);
                }
                Change::Other => {}
            }
        }
    }
}

/// Add one write's keys to its transaction's; a table over the bound is
/// invalidated whole instead.
fn add_keys(keyed: &mut Keyed, touched: &mut Vec<u32>, oid: u32, found: Vec<KeySet>) {
    let at = match keyed.iter().position(|(o, _, _)| *o == oid) {
        Some(i) => i,
        None => {
            keyed.push((oid, Vec::new(), 0));
            keyed.len() - 1
        }
    };
    let (_, sets, n) = &mut keyed[at];
    for (cols, tuples) in found {
        let i = match sets.iter().position(|(c, _)| *c == cols) {
            Some(i) => i,
            None => {
                sets.push((cols, Vec::new()));
                sets.len() - 1
            }
        };
        // A key written twice is bumped twice: harmless, and cheaper than
        // looking for it.
        *n += tuples.len();
        sets[i].1.extend(tuples);
    }
    if *n > MAX_KEYS {
        keyed.swap_remove(at);
        touched.push(oid);
    }
}

impl Feed {
    /// One of pgtier's own messages (the NOTIFY payloads, minus those that
    /// only the trigger path uses).
    fn message(&self, content: &[u8]) -> anyhow::Result<()> {
        // A key column set registration is never a write: it is taken or
        // ignored, never read as a payload (an unreadable one invalidates all).
        if register::apply(&self.db, self.signer.as_ref(), &self.prefix, content).is_some() {
            return Ok(());
        }
        let text = String::from_utf8_lossy(content);
        match Payload::parse(&text) {
            Some(Payload::Fence {
                instance,
                seq,
                nonce,
            }) => {
                if instance == self.instance && !self.db.complete_fence(seq, nonce) {
                    counter!("pgtier_control_notifications_rejected_total", "database" => self.db.name.clone(), "kind" => "fence").increment(1);
                }
            }
            Some(Payload::Ddl(t)) => {
                if t.is_empty() {
                    self.db.invalidate_routines();
                }
                self.db.invalidate(&t);
                self.cache.clear_descriptions();
                if self.ddl.send(()).is_err() {
                    bail!("listener gone");
                }
            }
            Some(Payload::Write(t) | Payload::Unwatch(t)) => self.db.invalidate(&t),
            Some(Payload::Keys(table, _)) => self.db.invalidate(&[table]),
            Some(Payload::Epoch(e)) => {
                let genuine = self
                    .signer
                    .as_ref()
                    .is_some_and(|s| epoch::verify(s, &self.db.name, &self.prefix, &e));
                if genuine && self.db.epoch_floor.advance(e.counter) {
                    // Every instance accepting it starts from no live sets.
                    register::reset(&self.db);
                    self.db.set_l2_epoch(e.epoch, e.counter);
                } else {
                    counter!("pgtier_control_notifications_rejected_total", "database" => self.db.name.clone(), "kind" => "epoch").increment(1);
                }
            }
            Some(Payload::All) | None => {
                self.db.invalidate_all();
                self.cache.clear_descriptions();
            }
        }
        Ok(())
    }
}
