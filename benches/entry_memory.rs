//! Memory per L1 entry beyond its payload: insert many small entries and divide
//! the growth of the process's resident memory by their number.
//!
//!     cargo bench --bench entry_memory

use std::time::Duration;

use bytes::Bytes;
use pgtier::cache::key::{session_seed, simple_key};
use pgtier::cache::Cache;
use pgtier::cache::Entry;
use pgtier::config::Config;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn main() {
    // `cargo test --benches` runs this too; keep that fast.
    let n: u64 = if std::env::args().any(|a| a == "--bench") {
        200_000
    } else {
        1_000
    };
    let mut cfg = Config::default();
    cfg.l1.max_bytes.0 = 1 << 40;
    let cache = Cache::new(&cfg);
    let seed = session_seed("bench", "postgres", std::iter::empty()).user;
    let payload = 64usize;
    let before = rss_bytes();
    for i in 0..n {
        let key = simple_key(seed, format!("select {i}").as_bytes());
        let rows = Bytes::from(vec![b'x'; payload]);
        cache.insert(
            key,
            Entry::new(
                None,
                rows,
                Duration::from_secs(3600),
                Duration::ZERO,
                0,
                0,
                Box::new([]),
            ),
        );
    }
    cache.l1.sync();
    let after = rss_bytes();
    let per_entry = (after.saturating_sub(before)) as f64 / n as f64;
    println!(
        "entries: {}  payload: {payload} B  resident growth per entry: {per_entry:.0} B  overhead beyond payload: {:.0} B",
        cache.l1.entry_count(),
        per_entry - payload as f64
    );
}
