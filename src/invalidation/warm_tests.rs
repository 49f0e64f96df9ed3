//! Unit tests of the warm registry and its dispatch: which entries count as
//! hot, which die hot when a write is applied, and which session (if any) is
//! handed the refresh.

use std::task::Context;
use std::time::Duration;

use futures_util::task::noop_waker_ref;

use super::*;
use crate::cache::Entry;
use crate::config::Config;
use crate::invalidation::{DbState, Invalidation};

const AFTER: u32 = 2;

fn setup() -> (Cache, Arc<DbState>) {
    let mut cfg = Config::default();
    cfg.cache.warm_hot_keys = true;
    cfg.cache.warm_after_hits = AFTER;
    let inv = Invalidation::new(["db".to_string()], "ch");
    let db = inv.db("db").expect("db");
    db.come_up();
    (Cache::new(&cfg), db)
}

fn table() -> Vec<QualifiedName> {
    vec![("public".into(), "t".into())]
}

fn recipe() -> Recipe {
    Recipe::Simple {
        sql: Bytes::from_static(b"select v from t"),
    }
}

/// Put an entry under `key` that read table t, hit `hits` times on a session
/// seeded `seed` (registering it when a hit makes it hot).
fn cached(cache: &Cache, db: &DbState, key: Key, seed: u128, hits: u32) {
    let slot = Generations::slot("db", "public", "t");
    let e = Entry::new(
        None,
        Bytes::from_static(b"rows"),
        Duration::from_secs(60),
        Duration::ZERO,
        0,
        db.epoch(),
        Box::new([(slot, db.gens.get(slot))]),
    );
    for _ in 0..hits {
        if e.hit(cache.warm_after()) {
            db.warm.register(key, seed, &e.deps, recipe);
        }
    }
    cache.insert(key, e);
}

/// The session behind `seat` is idle under `seed`: a job left for it, if any.
fn idle(seat: &Seat, seed: u128) -> Option<Job> {
    let mut cx = Context::from_waker(noop_waker_ref());
    seat.mailbox.poll_idle(&mut cx, seed)
}

/// Apply a write to table t, as the applier does.
fn write(cache: &Cache, db: &DbState) {
    db.invalidate(&table());
    db.warm_tables(cache, &table());
}

#[test]
fn only_the_hit_that_reaches_the_threshold_makes_an_entry_hot() {
    let e = Entry::new(
        None,
        Bytes::new(),
        Duration::from_secs(1),
        Duration::ZERO,
        0,
        0,
        Box::new([]),
    );
    let hits: Vec<bool> = (0..5).map(|_| e.hit(3)).collect();
    assert_eq!(hits, [false, false, true, false, false]);
    assert_eq!(e.hits.load(Ordering::Relaxed), 3, "counting stops there");
    assert!(!e.hit(0), "warming off counts nothing");
}

#[test]
fn a_write_hands_a_hot_entry_it_killed_to_an_idle_session_of_its_seed() {
    let (cache, db) = setup();
    let (other, mine) = (db.warm.join(), db.warm.join());
    assert!(idle(&other, 7).is_none() && idle(&mine, 8).is_none());
    cached(&cache, &db, 1, 8, AFTER);
    assert_eq!(db.warm.registered(), 1);
    write(&cache, &db);
    assert!(idle(&other, 7).is_none(), "another context's session");
    let job = idle(&mine, 8).expect("a job for the session of its seed");
    assert_eq!((job.key, job.seed, &job.recipe), (1, 8, &recipe()));
    assert_eq!(job.ticket.start_hits, AFTER - 1);
    // Readers that miss meanwhile wait for the refresh.
    assert!(matches!(cache.claim(1), Claim::Follower(_)));
    drop(job);
    assert!(matches!(cache.claim(1), Claim::Leader(_)), "released");
}

#[test]
fn cold_missing_and_live_entries_are_not_refreshed() {
    let (cache, db) = setup();
    let seat = db.warm.join();
    idle(&seat, 8);
    cached(&cache, &db, 1, 8, AFTER - 1);
    assert_eq!(db.warm.registered(), 0, "never hot: nothing kept");
    cached(&cache, &db, 2, 8, AFTER);
    cache.l1.remove(&2);
    cached(&cache, &db, 3, 8, AFTER);
    write(&cache, &db);
    // Key 3 was handed out; key 2, gone from L1, was forgotten.
    assert_eq!(idle(&seat, 8).map(|j| j.key), Some(3));
    assert_eq!(db.warm.registered(), 1);
    // Refilled (alive under the new generations) before the next write: not
    // a candidate; and one not read since its refresh is forgotten.
    cached(&cache, &db, 3, 8, 0);
    idle(&seat, 8);
    db.warm_tables(&cache, &table());
    assert!(idle(&seat, 8).is_none(), "a live entry was refreshed");
    write(&cache, &db);
    assert!(idle(&seat, 8).is_none(), "a cold entry was refreshed");
    assert_eq!(db.warm.registered(), 0);
}

#[test]
fn busy_sessions_are_skipped_and_refreshes_are_bounded() {
    let (cache, db) = setup();
    let seats: Vec<Seat> = (0..MAX_IN_FLIGHT + 3).map(|_| db.warm.join()).collect();
    for s in &seats {
        idle(s, 8);
    }
    seats[0].mailbox.busy();
    for key in 0..(MAX_IN_FLIGHT as u128 + 2) {
        cached(&cache, &db, key, 8, AFTER);
    }
    write(&cache, &db);
    let jobs: Vec<Job> = seats.iter().filter_map(|s| idle(s, 8)).collect();
    assert_eq!(jobs.len(), MAX_IN_FLIGHT, "at most that many at once");
    assert!(idle(&seats[0], 8).is_none(), "the busy session got one");
    drop(jobs);
    assert_eq!(db.warm.in_flight.load(Ordering::Acquire), 0);
}

#[test]
fn a_job_left_for_a_session_that_turns_busy_is_dropped_and_frees_its_key() {
    let (cache, db) = setup();
    let seat = db.warm.join();
    idle(&seat, 8);
    cached(&cache, &db, 1, 8, AFTER);
    write(&cache, &db);
    // A client request came first.
    seat.mailbox.busy();
    assert!(matches!(cache.claim(1), Claim::Leader(_)), "key released");
    assert!(idle(&seat, 8).is_none(), "and the job is gone");
    assert_eq!(db.warm.in_flight.load(Ordering::Acquire), 0);
}

#[test]
fn the_registry_is_bounded_oldest_first() {
    let (_, db) = setup();
    let deps = [(5u32, 0u64)];
    for key in 0..(CAPACITY as u128 + 10) {
        db.warm.register(key, 8, &deps, recipe);
    }
    assert_eq!(db.warm.registered(), CAPACITY);
    let reg = db.warm.registry.lock().expect("lock");
    assert!(!reg.records.contains_key(&0) && reg.records.contains_key(&(CAPACITY as u128 + 9)));
    assert_eq!(reg.by_slot[&5].len(), CAPACITY, "the index follows");
}

#[test]
fn a_reload_switches_warming_without_dropping_entries() {
    let (cache, db) = setup();
    cached(&cache, &db, 1, 8, 0);
    let mut old = Config::default();
    old.cache.warm_hot_keys = true;
    old.cache.warm_after_hits = AFTER;
    let mut off = old.clone();
    off.cache.warm_hot_keys = false;
    cache.reconfigure(&old, &off);
    assert_eq!(cache.warm_after(), 0);
    assert!(cache.l1.get(&1).is_some(), "entries stay");
    let mut later = off.clone();
    later.cache.warm_hot_keys = true;
    later.cache.warm_after_hits = 7;
    cache.reconfigure(&off, &later);
    assert_eq!(cache.warm_after(), 7);
    assert!(cache.l1.get(&1).is_some());
}
