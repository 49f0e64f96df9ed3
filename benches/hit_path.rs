//! Where the time of a cache hit goes: key hashing, the L1 lookup, and replaying
//! the cached bytes into the client's output queue (written to a buffer here).
//!
//!     cargo bench --bench hit_path

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use pgtier::cache::key::{extended_key, session_seed, simple_key, statement_hash};
use pgtier::cache::{Cache, Entry};
use pgtier::config::Config;
use pgtier::protocol::backend::{BIND_COMPLETE_BYTES, READY_IDLE_BYTES};
use pgtier::proxy::conn::OutQueue;

/// A one-row, one-int4-column result like pgbench's hot set returns.
fn sample_entry() -> Entry {
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
        0,
        Box::new([]),
    )
}

fn bench(c: &mut Criterion) {
    let cache = Cache::new(&Config::default());
    let seed = session_seed("bench", "postgres", [("TimeZone", "UTC")].into_iter()).user;
    let sql: &[u8] = b"SELECT abalance FROM pgbench_accounts WHERE aid = 4242;";
    let prepared: &[u8] = b"SELECT abalance FROM pgbench_accounts WHERE aid = $1;";
    let stmt = statement_hash(prepared, &[]);
    // Bind arguments: no format codes, one text parameter "4242", one result format.
    let args: &[u8] = b"\0\0\0\x01\0\0\0\x044242\0\0";
    for i in 0..10_000u32 {
        let q = format!("SELECT abalance FROM pgbench_accounts WHERE aid = {i};");
        cache.insert(simple_key(seed, q.as_bytes()), sample_entry());
    }
    cache.insert(simple_key(seed, sql), sample_entry());
    cache.insert(extended_key(seed, stmt, args), sample_entry());

    c.bench_function("key/simple", |b| {
        b.iter(|| simple_key(black_box(seed), black_box(sql)))
    });
    c.bench_function("key/extended", |b| {
        b.iter(|| extended_key(black_box(seed), black_box(stmt), black_box(args)))
    });
    let key = simple_key(seed, sql);
    c.bench_function("l1/get_hit", |b| b.iter(|| cache.l1.get(black_box(&key))));
    let entry: Arc<Entry> = cache.l1.get(&key).expect("inserted");
    let mut sink: Vec<u8> = Vec::with_capacity(4096);
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    c.bench_function("replay/write", |b| {
        let mut out = OutQueue::default();
        b.iter(|| {
            out.push(entry.row_desc.clone().unwrap_or_default());
            out.push(entry.rows.clone());
            out.push_static(READY_IDLE_BYTES);
            sink.clear();
            let _ = out.poll_write(&mut sink, &mut cx);
        })
    });
    c.bench_function("hit/simple_full", |b| {
        let mut out = OutQueue::default();
        b.iter(|| {
            let k = simple_key(seed, black_box(sql));
            let e = cache.l1.get(&k).expect("hit");
            out.push(e.row_desc.clone().unwrap_or_default());
            out.push(e.rows.clone());
            out.push_static(READY_IDLE_BYTES);
            sink.clear();
            let _ = out.poll_write(&mut sink, &mut cx);
        })
    });
    c.bench_function("hit/extended_full", |b| {
        let mut out = OutQueue::default();
        b.iter(|| {
            let k = extended_key(seed, stmt, black_box(args));
            let e = cache.l1.get(&k).expect("hit");
            out.push_static(BIND_COMPLETE_BYTES);
            out.push(e.row_desc.clone().unwrap_or_default());
            out.push(e.rows.clone());
            out.push_static(READY_IDLE_BYTES);
            sink.clear();
            let _ = out.poll_write(&mut sink, &mut cx);
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
