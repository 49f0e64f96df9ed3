//! Where the time of a cache hit goes, measured on the real request path: a
//! session's `proxy::apply::handle` (decode, `SessionCache::decide`, act) answering a simple query, an unnamed
//! extended-protocol request (what `pgbench -M extended` sends) and a named
//! prepared statement (`-M prepared`) from L1, with the reply written out; plus
//! the parts on their own (key hashing, the L1 lookup).
//!
//!     cargo bench --bench hit_path

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion};
use pgtier::cache::key::{extended_key, simple_key, statement_hash};
use pgtier::cache::{Cache, Entry};
use pgtier::config::Config;
use pgtier::invalidation::Invalidation;
use pgtier::protocol::frontend::{Bind, Describe, Execute, Parse, Query, Target};
use pgtier::proxy::apply;
use pgtier::proxy::caching::SessionCache;
use pgtier::proxy::conn::OutQueue;
use pgtier::proxy::startup::ServerHello;
use pgtier::proxy::tracker::Tracker;

/// A one-row, one-int4-column result like pgbench's hot set returns.
fn sample_entry(epoch: u64) -> Entry {
    let row_desc = Bytes::from_static(
        b"T\0\0\0\x21\0\x01abalance\0\0\0\x40\x01\0\x03\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0",
    );
    let rows = Bytes::from_static(b"D\0\0\0\x0b\0\x01\0\0\0\x011C\0\0\0\x0dSELECT 1\0");
    Entry::new(
        Some(row_desc),
        rows,
        Duration::from_secs(3600),
        Duration::ZERO,
        0,
        epoch,
        Box::new([]),
    )
}

const SIMPLE: &[u8] = b"SELECT abalance FROM pgbench_accounts WHERE aid = 4242;";
const PREPARED: &[u8] = b"SELECT abalance FROM pgbench_accounts WHERE aid = $1;";
/// Bind's arguments: no parameter formats, one text parameter "4242", no
/// result formats (the cache key hashes them as one slice).
const ARGS: &[u8] = b"\0\0\0\x01\0\0\0\x044242\0\0";

fn query(sql: &[u8]) -> Bytes {
    let mut b = BytesMut::new();
    Query { sql }.encode(&mut b);
    b.freeze()
}

/// Parse (if `parse`), Bind with the text parameter "4242", Describe portal,
/// Execute, Sync: as pgbench sends them.
fn extended(name: &[u8], parse: bool) -> Bytes {
    let mut b = BytesMut::new();
    if parse {
        Parse {
            name,
            query: PREPARED,
            param_types: &[],
        }
        .encode(&mut b);
    }
    Bind {
        portal: b"",
        statement: name,
        args: ARGS,
        result_formats: &[],
        param_count: 1,
    }
    .encode(&mut b);
    Describe {
        target: Target::Portal,
        name: b"",
    }
    .encode(&mut b);
    Execute {
        portal: b"",
        max_rows: 0,
    }
    .encode(&mut b);
    b.extend_from_slice(b"S\0\0\0\x04");
    b.freeze()
}

/// Run a future that must not wait (a hit never does).
fn now<F: Future>(f: F) -> F::Output {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match pin!(f).poll(&mut cx) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("a cache hit waited"),
    }
}

struct Session {
    cache: SessionCache,
    track: Tracker,
    cout: OutQueue,
    sout: OutQueue,
    sink: Vec<u8>,
}

impl Session {
    /// One request through the real dispatch; returns the reply's size.
    fn request(&mut self, shared: &Cache, batch: &Bytes) -> usize {
        now(apply::handle(
            &mut self.cache,
            shared,
            batch.clone(),
            &mut self.track,
            &mut self.cout,
            &mut self.sout,
        ));
        assert!(self.sout.is_empty(), "not a hit: the request went upstream");
        self.sink.clear();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let _ = self.cout.poll_write(&mut self.sink, &mut cx);
        self.sink.len()
    }
}

fn bench(c: &mut Criterion) {
    let shared = Cache::new(&Config::default());
    let inv = Invalidation::new(["bench".to_string()], "pgtier_invalidate");
    let db = inv.db("bench").expect("database state");
    db.come_up();
    let mut cache = SessionCache::new("bench", "postgres", &[], Some(db.clone()));
    cache.set_defaults(Some("bench".into()));
    cache.reseed(&[("TimeZone".into(), "UTC".into())]);
    let seed = cache.seed.user;
    let mut s = Session {
        cache,
        track: Tracker::new(&ServerHello::default()),
        cout: OutQueue::default(),
        sout: OutQueue::default(),
        sink: Vec::with_capacity(4096),
    };
    for i in 0..10_000u32 {
        let q = format!("SELECT abalance FROM pgbench_accounts WHERE aid = {i};");
        shared.insert(simple_key(seed, q.as_bytes()), sample_entry(db.epoch()));
    }
    shared.insert(simple_key(seed, SIMPLE), sample_entry(db.epoch()));
    let stmt = statement_hash(PREPARED, &[]);
    shared.insert(extended_key(seed, stmt, ARGS), sample_entry(db.epoch()));

    let simple = query(SIMPLE);
    assert!(s.request(&shared, &simple) > 0);
    let unnamed = extended(b"", true);
    assert!(s.request(&shared, &unnamed) > 0);
    // -M prepared: the statement is parsed once, then only bound and executed.
    assert!(s.request(&shared, &extended(b"P0_1", true)) > 0);
    let prepared = extended(b"P0_1", false);
    assert!(s.request(&shared, &prepared) > 0);

    c.bench_function("dispatch/simple_hit", |b| {
        b.iter(|| s.request(&shared, black_box(&simple)))
    });
    c.bench_function("dispatch/extended_hit", |b| {
        b.iter(|| s.request(&shared, black_box(&unnamed)))
    });
    c.bench_function("dispatch/prepared_hit", |b| {
        b.iter(|| s.request(&shared, black_box(&prepared)))
    });
    c.bench_function("key/simple", |b| {
        b.iter(|| simple_key(black_box(seed), black_box(SIMPLE)))
    });
    c.bench_function("key/extended", |b| {
        b.iter(|| extended_key(black_box(seed), black_box(stmt), black_box(ARGS)))
    });
    let key = simple_key(seed, SIMPLE);
    c.bench_function("l1/get_hit", |b| {
        b.iter(|| {
            shared
                .l1
                .get(black_box(&key))
                .map(|e: Arc<Entry>| e.rows.len())
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
