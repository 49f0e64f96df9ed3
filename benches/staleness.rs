//! Staleness checker: writers increment counters directly in Postgres while
//! readers read them through pgtier; a read is stale when it returns a value older
//! than one committed more than `bound` before the read began. Then measures
//! commit-to-visible latency (write directly, poll through pgtier until seen).
//!
//!     cargo bench --bench staleness                 # 60 s, 1000 writes/s, 20000 reads/s, 10 ms bound
//!     STALE_SECS=10 cargo bench --bench staleness   # shorter
//!     STALE_TABLES=1 cargo bench --bench staleness  # all counters in one table
//!     STALE_ANNOUNCE_ALL=1 cargo bench --bench staleness
//!         # invalidation.unwatch_on_write = false: written tables stay watched
//!         # (every write is announced and invalidates)
//!     STALE_KEY_LEVEL=1 cargo bench --bench staleness
//!         # --key-level: half the reads are by key (`id = $1`, invalidated per
//!         # key), half read the same row through a range (table-level), on
//!         # the same tables
//!     STALE_LOGICAL=1 cargo bench --bench staleness
//!         # invalidation.source = "logical", on a throwaway cluster with
//!         # wal_level = logical started here (no triggers: the publication)
//!
//! Needs the local Postgres on 127.0.0.1:5432 (see README).

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{connect_str, direct, fresh_db, Pgtier};
use rand::Rng;

const DB: &str = "pgtier_staleness";

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return; // `cargo test --benches`: nothing to check without a full run
    }
    let secs: u64 = env("STALE_SECS", 60);
    let writes_per_sec: u64 = env("STALE_WRITES", 1000);
    let reads_per_sec: u64 = env("STALE_READS", 20000);
    let bound = Duration::from_millis(env("STALE_BOUND_MS", 10));
    let rows: i32 = env("STALE_ROWS", 1000);
    // Counters spread over tables (row `id` lives in table `c{id % tables}`):
    // invalidation is per table, so with one table every write would empty the
    // cache and reads would test nothing but Postgres.
    let tables: i32 = env("STALE_TABLES", 100).max(1);
    let (writers, readers) = (4u64, env("STALE_READERS", 64u64));
    let logical = env("STALE_LOGICAL", 0u8) == 1;
    // With the logical source, a cluster of its own (the shared one is never
    // reconfigured); its database `lg` is owned by the role pgtier streams as.
    let cluster = logical.then(common::logical::cluster);
    let (db, direct_str) = match &cluster {
        Some(c) => (
            "lg",
            format!("host=127.0.0.1 port={} user=postgres dbname=lg", c.port),
        ),
        None => {
            fresh_db(DB).await;
            (DB, common::direct_str(DB))
        }
    };
    let d = match &cluster {
        // The tables belong to the role that publishes them.
        Some(c) => common::logical::schema(c.port).await,
        None => direct(db).await,
    };
    let ddl: String = (0..tables)
        .map(|t| {
            format!(
                "create table c{t}(id int primary key, v bigint not null); \
                 insert into c{t} select g, 0 from generate_series(1, {rows}) g where g % {tables} = {t};"
            )
        })
        .collect();
    d.batch_execute(&ddl).await.unwrap();

    let announce_all = env("STALE_ANNOUNCE_ALL", 0u8) == 1;
    let toml = format!("[invalidation]\nunwatch_on_write = {}\n", !announce_all);
    let key_level = env("STALE_KEY_LEVEL", 0u8) == 1;
    let mut args = vec!["--default-ttl", "10m", "--log-level", "warn"];
    if key_level {
        args.push("--key-level");
    }
    // The test harness's pgtier: its listener is connected before this returns.
    let p = match &cluster {
        Some(c) => {
            common::logical::setup_command(c.port, &["install-triggers"]);
            let url = common::logical::control_url(c.port);
            args.extend(["--control-url", &url, "--invalidation-source", "logical"]);
            let p = Pgtier::start_with(c.port, &toml, &args);
            p.wait_listener(db).await;
            p
        }
        None => Pgtier::cached(db, &toml, &args).await,
    };
    let via = p.conn_str(db);

    println!(
        "staleness: {secs}s, {writes_per_sec} writes/s ({writers} writers, direct), \
         {reads_per_sec} reads/s ({readers} readers, via pgtier), {rows} counters in {tables} tables, \
         bound {bound:?}{}{}",
        if key_level {
            ", key-level (half the reads by key, half by range)"
        } else {
            ""
        },
        if logical {
            ", invalidation.source = logical"
        } else {
            ""
        }
    );
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let mut handles = Vec::new();
    for _ in 0..writers {
        let interval = Duration::from_secs_f64(writers as f64 / writes_per_sec as f64);
        let direct_str = direct_str.clone();
        handles.push(tokio::spawn(async move {
            let c = connect_str(&direct_str).await;
            let mut sts = Vec::new();
            for t in 0..tables {
                sts.push(
                    c.prepare(&format!(
                        "update c{t} set v = v + 1 where id = $1 returning v"
                    ))
                    .await
                    .unwrap(),
                );
            }
            let mut log: Vec<(i32, i64, Instant)> = Vec::new();
            let mut next = Instant::now();
            while Instant::now() < end {
                let id = rand::thread_rng().gen_range(1..=rows);
                let st = &sts[(id % tables) as usize];
                let v: i64 = c.query_one(st, &[&id]).await.unwrap().get(0);
                log.push((id, v, Instant::now()));
                next += interval;
                tokio::time::sleep_until(next.into()).await;
            }
            (log, Vec::new())
        }));
    }
    for _ in 0..readers {
        let interval = Duration::from_secs_f64(readers as f64 / reads_per_sec as f64);
        let via = via.clone();
        handles.push(tokio::spawn(async move {
            let c = connect_str(&via).await;
            // By key, and (with key-level) the same row through a range, which
            // stays table-level: both shapes on the same tables.
            let mut sts = Vec::new();
            for t in 0..tables {
                sts.push(
                    c.prepare(&format!("select v from c{t} where id = $1"))
                        .await
                        .unwrap(),
                );
            }
            let mut ranges = Vec::new();
            for t in 0..tables {
                ranges.push(
                    c.prepare(&format!(
                        "select v from c{t} where id >= $1 and id <= $1::int + 0"
                    ))
                    .await
                    .unwrap(),
                );
            }
            let mut reads: Vec<(i32, i64, Instant)> = Vec::new();
            let mut next = Instant::now();
            while Instant::now() < end {
                let id = rand::thread_rng().gen_range(1..=rows);
                let t0 = Instant::now();
                let by_range = key_level && reads.len() % 2 == 1;
                let st = if by_range {
                    &ranges[(id % tables) as usize]
                } else {
                    &sts[(id % tables) as usize]
                };
                let v: i64 = c.query_one(st, &[&id]).await.unwrap().get(0);
                reads.push((id, v, t0));
                next += interval;
                if next > Instant::now() {
                    tokio::time::sleep_until(next.into()).await;
                } else {
                    next = Instant::now();
                }
            }
            (Vec::new(), reads)
        }));
    }
    let mut commits: Vec<Vec<(i64, Instant)>> = vec![Vec::new(); rows as usize + 1];
    let mut reads = Vec::new();
    for h in handles {
        let (w, r) = h.await.unwrap();
        for (id, v, t) in w {
            commits[id as usize].push((v, t));
        }
        reads.extend(r);
    }
    for c in &mut commits {
        c.sort_by_key(|(v, _)| *v);
    }
    let commits = Arc::new(commits);
    let mut stale = 0u64;
    let mut worst = Duration::ZERO;
    for (id, v, t0) in &reads {
        let log = &commits[*id as usize];
        // newest commit that finished more than `bound` before the read began
        if let Some((cv, ct)) = log.iter().rev().find(|(_, ct)| *ct + bound < *t0) {
            if cv > v {
                stale += 1;
                worst = worst.max(*t0 - *ct);
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let nwrites: usize = commits.iter().map(|c| c.len()).sum();
    println!(
        "  writes {nwrites} ({:.0}/s), reads {} ({:.0}/s), stale reads beyond {bound:?}: {stale}{}",
        nwrites as f64 / elapsed,
        reads.len(),
        reads.len() as f64 / elapsed,
        if stale > 0 {
            format!(" (oldest {worst:?})")
        } else {
            String::new()
        }
    );

    // commit-to-visible latency: the value is cached, a direct write commits, and
    // a reader polls through pgtier until it sees it
    let r = connect_str(&via).await;
    let w = connect_str(&direct_str).await;
    let mut lat = Vec::new();
    for i in 0..500 {
        let id = 1 + (i % rows);
        let table = format!("c{}", id % tables);
        let st = r
            .prepare(&format!("select v from {table} where id = $1"))
            .await
            .unwrap();
        let before: i64 = r.query_one(&st, &[&id]).await.unwrap().get(0);
        let _: i64 = r.query_one(&st, &[&id]).await.unwrap().get(0);
        w.execute(
            &format!("update {table} set v = v + 1 where id = $1"),
            &[&id],
        )
        .await
        .unwrap();
        let t0 = Instant::now();
        loop {
            let v: i64 = r.query_one(&st, &[&id]).await.unwrap().get(0);
            if v > before {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "write never became visible"
            );
        }
        lat.push(t0.elapsed());
    }
    lat.sort();
    println!(
        "  commit-to-visible through pgtier: p50 {:?}  p99 {:?}  max {:?}",
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        lat.last().copied().unwrap_or_default()
    );
    // pgtier's own view of the listener, to tell its lag from Postgres's delivery
    let (_, metrics) = p.http_get("/metrics").await;
    for line in metrics.lines() {
        let lookup =
            line.starts_with("pgtier_cache_lookups_total{tier=\"l1\"") && !line.ends_with(" 0");
        if (line.starts_with("pgtier_listener_") && !line.contains("_bucket"))
            || line.starts_with("pgtier_fence")
            || line.starts_with("pgtier_invalidation_notifications_total")
            || (line.starts_with("pgtier_logical_") && !line.contains("_bucket"))
            || line.starts_with("pgtier_unwatches_total")
            || lookup
        {
            println!("  {line}");
        }
    }
    drop(p);
    drop(cluster);
    if stale > 0 {
        std::process::exit(1);
    }
}
