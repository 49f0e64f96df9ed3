//! Randomized differential test: generated SELECT statements (projections,
//! parameterised filters, joins, views, aggregates, subqueries, DISTINCT, UNION,
//! CTEs, and some statements pgtier must not cache) are run straight against
//! Postgres and through pgtier, in text format (simple protocol) and in binary
//! format (extended protocol: prepared statements, one-shot `query`,
//! `query_typed`, and two pipelined at once). Two pgtier sessions share entries;
//! a third has SET different output settings (time zone, DateStyle, bytea_output,
//! ...) and is compared with a direct connection that has the same settings.
//! Column names, types, origins and every value must be identical, and so must
//! prepared statements' descriptions.
//!
//! Between rounds of reads, writes made directly to Postgres must show up through
//! pgtier once their invalidation has been processed (bounded polling), and writes
//! made through pgtier must be visible to the very next read of that session.
//!
//! The run is fully determined by its seed, printed at the start. Reproduce a
//! failure with `PGTIER_DIFF_SEED=<seed> cargo test --test differential -- --nocapture`.

#[path = "../common/mod.rs"]
mod common;
mod data;
mod generate;
mod harness;
mod queries;
mod values;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::SeedableRng;

use common::{direct, fresh_db, Pgtier};
use data::{cats_insert, item_row, order_row, WriteState, SCHEMA};
use generate::gen_instances;
use harness::{Conn, Harness, Stats, Via, C_SETTINGS};
use queries::Query;

const DEFAULT_SEED: u64 = 20_240_611;
/// How long a result may stay stale after a direct write before that is a failure.
const CONVERGE: Duration = Duration::from_secs(2);
/// Query templates generated up front (each gets one or two parameter sets).
const POOL: usize = 90;
/// Write/read rounds after the first read-only round.
const ROUNDS: usize = 12;
/// Instances from the pool re-read in each round (mostly cached, maybe stale).
const REREAD_PER_ROUND: usize = 30;
/// New templates added in each round.
const NEW_PER_ROUND: usize = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_reads_match_postgres_through_writes() {
    run("pgtier_differential", &[]).await;
}

/// The same with key-level invalidation: reads by id depend on their keys,
/// while writes insert, delete, update and move keys (issue 14).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_reads_match_postgres_through_writes_by_key() {
    run("pgtier_differential_keys", &["--key-level"]).await;
}

async fn run(database: &str, args: &[&str]) {
    let seed = std::env::var("PGTIER_DIFF_SEED")
        .ok()
        .map(|s| {
            s.trim().parse::<u64>().unwrap_or_else(|_| {
                panic!("PGTIER_DIFF_SEED must be an unsigned integer, got {s:?}")
            })
        })
        .unwrap_or(DEFAULT_SEED);
    println!("differential test seed: {seed} (set PGTIER_DIFF_SEED to override)");
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed);

    let db = fresh_db(database).await;
    let d = direct(&db).await;
    d.batch_execute(SCHEMA).await.unwrap();
    let items: Vec<String> = (1..=300).map(|id| item_row(&mut rng, id)).collect();
    let orders: Vec<String> = (1..=400).map(|id| order_row(&mut rng, id)).collect();
    d.batch_execute(&format!(
        "insert into items values {}; insert into orders values {}; {}; analyze",
        items.join(", "),
        orders.join(", "),
        cats_insert(&mut rng)
    ))
    .await
    .unwrap();

    let p = Pgtier::cached(&db, "[cache]\ndefault_ttl = \"10m\"\n", args).await;
    let dc = direct(&db).await;
    dc.batch_execute(C_SETTINGS).await.unwrap();
    let c = p.connect(&db).await;
    c.batch_execute(C_SETTINGS).await.unwrap();
    let mut h = Harness {
        seed,
        d,
        dc,
        a: p.connect(&db).await,
        b: p.connect(&db).await,
        c,
        stmts: HashMap::new(),
        stats: Stats::default(),
        last_writes: "(none)".into(),
    };
    let mut ws = WriteState {
        next_item: 1000,
        next_order: 5000,
        next_cat: 10,
        cats_empty: false,
        bulk: false,
    };

    // round 0: nothing has been written since pgtier started, every read must match
    let mut pool: Vec<Query> = Vec::new();
    while pool.len() < POOL {
        pool.extend(gen_instances(&mut rng));
    }
    let fresh = Some("nothing was written since pgtier started");
    for q in &mut pool {
        let snapshot = q.clone();
        q.last_result = Some(h.check(&snapshot, fresh, fresh, &mut rng).await);
        q.last_round = Some(0);
    }
    // reads whose result a write changed since their entries were cached, that
    // is, reads that were correct only because of invalidation
    let mut changed = 0;
    // of those, the first read of session A right after its own write
    let mut ryw_changed = 0;

    for round in 1..=ROUNDS {
        let through_pgtier = round % 3 == 2;
        let mut order: Vec<usize> =
            rand::seq::index::sample(&mut rng, pool.len(), REREAD_PER_ROUND.min(pool.len()))
                .into_vec();
        if through_pgtier {
            let touched = h.pgtier_writes(&mut rng, &mut ws).await;
            // The very next read of session A is a statement cached in the last
            // round that reads a table just written, preferably one whose result
            // the write changed (found by asking Postgres directly, which does not
            // touch session A).
            let candidates: Vec<usize> = (0..pool.len())
                .filter(|&i| pool[i].last_round == Some(round - 1) && !pool[i].volatile)
                .filter(|&i| pool[i].tables.iter().any(|t| touched.contains(t)))
                .take(20)
                .collect();
            let mut next = candidates.first().copied();
            for &i in &candidates {
                let q = pool[i].clone();
                let now = h.run(Conn::Direct, Via::Prepared, &q).await;
                if q.last_result.as_ref().is_some_and(|r| r.1 != now) {
                    next = Some(i);
                    break;
                }
            }
            if let Some(i) = next {
                order.retain(|&j| j != i);
                order.insert(0, i);
            }
        } else {
            h.direct_writes(&mut rng, &mut ws).await;
        }
        for _ in 0..NEW_PER_ROUND {
            for q in gen_instances(&mut rng) {
                pool.push(q);
                order.push(pool.len() - 1);
            }
        }
        for (n, i) in order.into_iter().enumerate() {
            let q = pool[i].clone();
            // after writes through pgtier, session A is never allowed a stale read
            let ryw = through_pgtier.then_some(
                "read of session A after its own write through pgtier: read-your-writes",
            );
            let got = h.check(&q, ryw, None, &mut rng).await;
            if !q.volatile && q.last_result.as_ref().is_some_and(|r| *r != got) {
                changed += 1;
                if through_pgtier && n == 0 {
                    ryw_changed += 1;
                }
            }
            pool[i].last_result = Some(got);
            pool[i].last_round = Some(round);
        }
        println!(
            "round {round}: {} writes ({}), {} checks, {changed} changed results, {} stale reads so far, {:?} elapsed",
            h.stats.direct_writes + h.stats.pgtier_writes,
            if through_pgtier {
                "through pgtier"
            } else {
                "direct"
            },
            h.stats.checks,
            h.stats.stale_reads,
            started.elapsed()
        );
    }

    let m = p.metrics().await;
    let s = &h.stats;
    let bypassed: f64 = ["volatile", "locking", "time_literal", "system_catalog"]
        .iter()
        .map(|r| m.bypasses(r))
        .sum();
    let mut reasons: Vec<String> =
        m.0.samples
            .iter()
            .filter(|x| x.metric == "pgtier_cache_lookups_total")
            .filter(|x| x.labels.get("outcome") == Some("bypass"))
            .map(|x| {
                let v = match x.value {
                    prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
                    _ => 0.0,
                };
                format!("{}={v}", x.labels.get("reason").unwrap_or("?"))
            })
            .collect();
    reasons.sort();
    println!("bypasses by reason: {}", reasons.join(", "));
    println!(
        "seed {seed}: {} statements checked ({} uncacheable), {} reads through pgtier, \
         {} direct and {} pgtier writes, {} stale reads over {} waits (longest {:?}), \
         {} statements failing in Postgres, {changed} results changed by writes \
         ({ryw_changed} read right after a write through pgtier); pgtier: {} hits, {} misses, \
         {} uncacheable bypasses, {} fence timeouts; {:?}",
        s.checks,
        s.volatile_checks,
        s.pgtier_reads,
        s.direct_writes,
        s.pgtier_writes,
        s.stale_reads,
        s.waited,
        s.max_wait,
        s.direct_errors,
        m.hits(),
        m.misses(),
        bypassed,
        m.get("pgtier_fence_timeouts_total", &[]) as u64,
        started.elapsed()
    );
    assert!(
        s.direct_errors * 20 <= s.checks,
        "the generator produced too many failing statements ({} of {})",
        s.direct_errors,
        s.checks
    );
    assert!(
        m.hits() >= s.pgtier_reads as f64 / 3.0,
        "the cache was barely exercised: {} hits for {} reads through pgtier\n{}",
        m.hits(),
        s.pgtier_reads,
        p.logs()
    );
    assert!(
        changed >= 20,
        "writes changed only {changed} cached results: invalidation was barely exercised"
    );
    if s.volatile_checks > 0 {
        assert!(bypassed > 0.0, "uncacheable statements were never bypassed");
    }
}
