//! Warming hot keys: an entry read often in its life that a write kills is
//! refreshed right after the invalidation, on an idle session of its own
//! context, so its readers keep hitting instead of queueing on Postgres.
//!
//! Sessions count hits on entries (a relaxed atomic on the entry, see
//! `Entry::hit`); the hit that makes an entry hot registers how to run its
//! statement again (a [`Recipe`]) under the entry's dependency slots. The
//! applier, once it has applied a write, looks up the keys registered under
//! the slots the write bumped and, for each whose entry died hot, claims the
//! key's fill (readers that miss meanwhile wait for it) and hands a [`Job`] to
//! an idle session whose key seed is the entry's (same database, user and
//! settings): pgtier holds no passwords, so only such a session can produce
//! the bytes Postgres would send that context. The session sends the
//! statement with its replies swallowed and fills through the ordinary fill
//! path, whose generations are read when the session sends it: after the
//! invalidation was applied, so a refresh that raced a later write is never
//! served.
//!
//! Bounded everywhere: [`CAPACITY`] recipes per database (oldest forgotten
//! first), [`MAX_IN_FLIGHT`] refreshes at a time per database, one job per
//! session. What cannot be placed is dropped and counted
//! (`pgtier_warm_refreshes_total{result="dropped"}`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Context;

use bytes::Bytes;
use futures_util::task::AtomicWaker;

use super::generations::Generations;
use super::payload::{KeySet, QualifiedName};
use crate::cache::{Cache, Claim, FillLease, Key};

/// Recipes kept per database.
pub const CAPACITY: usize = 10_000;
/// Warm refreshes running at once per database (each holds a session's
/// upstream connection and costs Postgres one query).
pub const MAX_IN_FLIGHT: usize = 4;
/// Dead entries examined per write: the applier must stay quick (a write to a
/// table with thousands of hot reads counts the rest as dropped).
pub const MAX_EXAMINED: usize = 256;

/// How to run a hot entry's statement again, exactly as its readers sent it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recipe {
    /// A simple-protocol query.
    Simple { sql: Bytes },
    /// An extended-protocol execution: statement text, declared parameter
    /// types (raw OIDs) and the Bind arguments (parameter formats and values,
    /// result formats) as sent. Replayed as an unnamed statement, never under
    /// a client's statement name.
    Extended {
        sql: Bytes,
        types: Bytes,
        args: Bytes,
    },
}

struct Record {
    /// The key seed (`Seed::user`) of the session that made it hot: only a
    /// session with the same seed may refresh it.
    seed: u128,
    recipe: Recipe,
    slots: Box<[u32]>,
    /// Position in `order` (stale positions are skipped).
    seq: u64,
}

#[derive(Default)]
struct Registry {
    records: HashMap<Key, Record>,
    by_slot: HashMap<u32, HashSet<Key>>,
    order: VecDeque<(Key, u64)>,
    seq: u64,
}

impl Registry {
    fn remove(&mut self, key: &Key) {
        if let Some(r) = self.records.remove(key) {
            for s in r.slots.iter() {
                if let Some(set) = self.by_slot.get_mut(s) {
                    set.remove(key);
                    if set.is_empty() {
                        self.by_slot.remove(s);
                    }
                }
            }
        }
    }

    fn insert(&mut self, key: Key, seed: u128, recipe: Recipe, slots: Box<[u32]>) {
        self.remove(&key);
        for s in slots.iter() {
            self.by_slot.entry(*s).or_default().insert(key);
        }
        self.seq += 1;
        let seq = self.seq;
        self.records.insert(
            key,
            Record {
                seed,
                recipe,
                slots,
                seq,
            },
        );
        self.order.push_back((key, seq));
        while self.records.len() > CAPACITY {
            let Some((k, s)) = self.order.pop_front() else {
                break;
            };
            if self.records.get(&k).is_some_and(|r| r.seq == s) {
                self.remove(&k);
            }
        }
        if self.order.len() > 2 * CAPACITY {
            let records = &self.records;
            self.order
                .retain(|(k, s)| records.get(k).is_some_and(|r| r.seq == *s));
        }
    }
}

const BUSY: u8 = 0;
const IDLE: u8 = 1;
const CLAIMED: u8 = 2;
const JOB: u8 = 3;

/// A session's mailbox for warm jobs. The session says when it is idle (and
/// under which seed); the applier claims an idle one, leaves a job and wakes
/// it.
pub struct Mailbox {
    state: AtomicU8,
    /// Low half of the session's seed, to find candidates without locking;
    /// the session checks the whole seed before running a job.
    seed: AtomicU64,
    job: Mutex<Option<Job>>,
    waker: AtomicWaker,
}

impl Mailbox {
    fn new() -> Mailbox {
        Mailbox {
            state: AtomicU8::new(BUSY),
            seed: AtomicU64::new(0),
            job: Mutex::new(None),
            waker: AtomicWaker::new(),
        }
    }

    /// The session is idle under `seed`: a job may be left for it (it is woken
    /// through `cx`). Returns a job left earlier.
    pub fn poll_idle(&self, cx: &mut Context<'_>, seed: u128) -> Option<Job> {
        self.waker.register(cx.waker());
        match self.state.load(Ordering::Acquire) {
            JOB => {
                let job = self.job.lock().ok().and_then(|mut j| j.take());
                self.state.store(BUSY, Ordering::Release);
                job
            }
            BUSY => {
                self.seed.store(seed as u64, Ordering::Relaxed);
                let _ =
                    self.state
                        .compare_exchange(BUSY, IDLE, Ordering::AcqRel, Ordering::Relaxed);
                None
            }
            // Idle already, or a job is being left (its wake follows).
            _ => None,
        }
    }

    /// The session is busy (a client request, an open transaction): no job
    /// for it now, and one left meanwhile is dropped rather than kept waiting
    /// (its claim on the key would hold readers back).
    #[inline]
    pub fn busy(&self) {
        match self.state.load(Ordering::Relaxed) {
            IDLE => {
                let _ =
                    self.state
                        .compare_exchange(IDLE, BUSY, Ordering::AcqRel, Ordering::Relaxed);
            }
            JOB => {
                let job = self.job.lock().ok().and_then(|mut j| j.take());
                self.state.store(BUSY, Ordering::Release);
                drop(job);
            }
            _ => {}
        }
    }

    fn claim(&self, seed: u128) -> bool {
        self.seed.load(Ordering::Relaxed) == seed as u64
            && self
                .state
                .compare_exchange(IDLE, CLAIMED, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
    }

    fn deliver(&self, job: Job) {
        if let Ok(mut slot) = self.job.lock() {
            *slot = Some(job);
        }
        self.state.store(JOB, Ordering::Release);
        self.waker.wake();
    }
}

type Sessions = Arc<Mutex<Vec<Arc<Mailbox>>>>;

/// A session's place among the warmable sessions of its database; leaving
/// (dropping it) drops any job still waiting in its mailbox.
pub struct Seat {
    pub mailbox: Arc<Mailbox>,
    sessions: Sessions,
}

impl Drop for Seat {
    fn drop(&mut self) {
        if let Ok(mut s) = self.sessions.lock() {
            s.retain(|m| !Arc::ptr_eq(m, &self.mailbox));
        }
    }
}

/// One warm refresh handed to a session.
pub struct Job {
    pub key: Key,
    /// The seed the session must have.
    pub seed: u128,
    pub recipe: Recipe,
    /// The key's fill, claimed when the job was made: readers that miss wait
    /// for this refresh instead of sending their own.
    pub lease: Option<FillLease>,
    pub ticket: Ticket,
}

/// Counts a warm refresh in flight and, when it ends, how.
pub struct Ticket {
    in_flight: Arc<AtomicUsize>,
    /// Hits the refreshed entry starts with: one read short of hot, so a key
    /// stays warm while it is read between writes and stops once it is not.
    pub start_hits: u32,
    sent: bool,
    done: bool,
}

impl Ticket {
    /// The refresh went to the server: if it ends without a result, it failed.
    pub fn sent(&mut self) {
        self.sent = true;
    }

    /// The refresh ended: its result stored, or not.
    pub fn finish(mut self, filled: bool) {
        self.done = true;
        count(if filled { "filled" } else { "failed" });
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        if !self.done {
            count(if self.sent { "failed" } else { "dropped" });
        }
    }
}

fn count(result: &'static str) {
    count_n(result, 1);
}

fn count_n(result: &'static str, n: u64) {
    static COUNTERS: std::sync::OnceLock<[metrics::Counter; 3]> = std::sync::OnceLock::new();
    let [filled, dropped, failed] = COUNTERS.get_or_init(|| {
        ["filled", "dropped", "failed"]
            .map(|r| metrics::counter!("pgtier_warm_refreshes_total", "result" => r))
    });
    match result {
        "filled" => filled.increment(n),
        "dropped" => dropped.increment(n),
        _ => failed.increment(n),
    }
}

/// The warming state of one database.
pub struct Warm {
    registry: Mutex<Registry>,
    sessions: Sessions,
    in_flight: Arc<AtomicUsize>,
    /// Where the next search for an idle session starts (spreads the work).
    next: AtomicUsize,
    database: String,
    /// Every entry depends on the database's routines; a change to them is
    /// never warmed, so entries are not indexed under it.
    routines: u32,
}

/// Whether an entry filled under (epoch, deps) is still current
/// (`DbState::valid`).
pub type Valid<'a> = &'a dyn Fn(u64, &[(u32, u64)]) -> bool;

impl Warm {
    pub fn new(database: &str) -> Warm {
        Warm {
            registry: Mutex::new(Registry::default()),
            sessions: Arc::new(Mutex::new(Vec::new())),
            in_flight: Arc::new(AtomicUsize::new(0)),
            next: AtomicUsize::new(0),
            database: database.to_string(),
            routines: Generations::routines_slot(database),
        }
    }

    /// A new session of this database joins the warmable sessions.
    pub fn join(&self) -> Seat {
        let mailbox = Arc::new(Mailbox::new());
        if let Ok(mut s) = self.sessions.lock() {
            s.push(mailbox.clone());
        }
        Seat {
            mailbox,
            sessions: self.sessions.clone(),
        }
    }

    /// The entry under `key` (depending on `deps`) just became hot on a
    /// session seeded `seed`: remember how to refresh it. `recipe` is called
    /// only if the key is new here (a hot key's later crossings cost a lookup).
    pub fn register(
        &self,
        key: Key,
        seed: u128,
        deps: &[(u32, u64)],
        recipe: impl FnOnce() -> Recipe,
    ) {
        let Ok(mut reg) = self.registry.lock() else {
            return;
        };
        let same = reg.records.get(&key).is_some_and(|r| {
            r.seed == seed
                && r.slots.len() + usize::from(deps.iter().any(|(s, _)| *s == self.routines))
                    == deps.len()
                && deps
                    .iter()
                    .filter(|(s, _)| *s != self.routines)
                    .all(|(s, _)| r.slots.contains(s))
        });
        if same {
            return;
        }
        let slots: Box<[u32]> = deps
            .iter()
            .map(|(s, _)| *s)
            .filter(|s| *s != self.routines)
            .collect();
        reg.insert(key, seed, recipe(), slots);
    }

    /// How many recipes are kept (tests, stats).
    pub fn registered(&self) -> usize {
        self.registry.lock().map_or(0, |r| r.records.len())
    }

    /// Slots `slots` were just bumped: refresh the hot entries that died.
    fn dispatch(&self, cache: &Cache, valid: Valid<'_>, slots: &[u32]) {
        let after = cache.warm_after();
        if after == 0 {
            return;
        }
        let Ok(mut reg) = self.registry.lock() else {
            return;
        };
        if reg.records.is_empty() {
            return;
        }
        let mut keys: Vec<Key> = slots
            .iter()
            .filter_map(|s| reg.by_slot.get(s))
            .flatten()
            .copied()
            .collect();
        if keys.is_empty() {
            return;
        }
        keys.sort_unstable();
        keys.dedup();
        if keys.len() > MAX_EXAMINED {
            count_n("dropped", (keys.len() - MAX_EXAMINED) as u64);
            keys.truncate(MAX_EXAMINED);
        }
        for key in keys {
            let hot = match cache.l1.get(&key) {
                // Refilled already (or untouched: another table sharing a slot).
                Some(e) if valid(e.epoch, &e.deps) => continue,
                Some(e) => e.hits.load(Ordering::Relaxed) >= after,
                None => false,
            };
            if !hot {
                // Evicted, expired, or not read enough in its life: forgotten
                // until it is hot again.
                reg.remove(&key);
                continue;
            }
            let Some(r) = reg.records.get(&key) else {
                continue;
            };
            let job = self.place(cache, key, r.seed, &r.recipe, after);
            if let Some((mailbox, job)) = job {
                mailbox.deliver(job);
            }
        }
    }

    /// Claim the key's fill and an idle session of its seed; count a drop if
    /// either is not to be had.
    fn place(
        &self,
        cache: &Cache,
        key: Key,
        seed: u128,
        recipe: &Recipe,
        after: u32,
    ) -> Option<(Arc<Mailbox>, Job)> {
        if self.in_flight.load(Ordering::Acquire) >= MAX_IN_FLIGHT {
            count("dropped");
            return None;
        }
        let lease = match cache.claim(key) {
            Claim::Leader(l) => l,
            Claim::Follower(_) => {
                // A reader is fetching it already.
                count("dropped");
                return None;
            }
        };
        let Some(mailbox) = self.idle_session(seed) else {
            count("dropped");
            return None;
        };
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        let job = Job {
            key,
            seed,
            recipe: recipe.clone(),
            lease: Some(lease),
            ticket: Ticket {
                in_flight: self.in_flight.clone(),
                start_hits: after - 1,
                sent: false,
                done: false,
            },
        };
        Some((mailbox, job))
    }

    fn idle_session(&self, seed: u128) -> Option<Arc<Mailbox>> {
        let sessions = self.sessions.lock().ok()?;
        let n = sessions.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        (0..n)
            .map(|i| &sessions[(start + i) % n])
            .find(|m| m.claim(seed))
            .cloned()
    }
}

impl Warm {
    /// A write to these tables was applied: warm the hot entries it killed.
    pub fn tables(&self, cache: &Cache, valid: Valid<'_>, tables: &[QualifiedName]) {
        if cache.warm_after() == 0 {
            return;
        }
        let db = &self.database;
        let slots: Vec<u32> = tables
            .iter()
            .flat_map(|(schema, table)| {
                [
                    Generations::slot(db, schema, table),
                    Generations::whole_slot(db, schema, table),
                    Generations::name_slot(db, table),
                ]
            })
            .collect();
        self.dispatch(cache, valid, &slots);
    }

    /// A write that reported its keys was applied: warm the hot entries of
    /// those keys (and the hot reads that scan the table).
    pub fn keys(&self, cache: &Cache, valid: Valid<'_>, table: &QualifiedName, sets: &[KeySet]) {
        if cache.warm_after() == 0 {
            return;
        }
        let (db, (schema, name)) = (&self.database, table);
        let mut slots = vec![Generations::slot(db, schema, name)];
        for (cols, tuples) in sets {
            let cols: Vec<&str> = cols.iter().map(String::as_str).collect();
            for t in tuples {
                let values: Vec<&str> = t.iter().map(String::as_str).collect();
                slots.push(Generations::key_slot(db, schema, name, &cols, &values));
            }
        }
        self.dispatch(cache, valid, &slots);
    }
}

/// A job as the applier would hand it out, for tests of what sessions do
/// with one.
#[cfg(test)]
pub(crate) fn test_job(cache: &Cache, key: Key, seed: u128, recipe: Recipe, after: u32) -> Job {
    let lease = match cache.claim(key) {
        Claim::Leader(l) => Some(l),
        Claim::Follower(_) => None,
    };
    Job {
        key,
        seed,
        recipe,
        lease,
        ticket: Ticket {
            in_flight: Arc::new(AtomicUsize::new(1)),
            start_hits: after - 1,
            sent: false,
            done: false,
        },
    }
}

#[cfg(test)]
#[path = "warm_tests.rs"]
mod tests;
