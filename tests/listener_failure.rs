//! The listener's connection dies (its backend is terminated) while writes go on:
//! no read may return a value older than a commit that finished more than the
//! notification bound before it, and caching resumes once the listener is back.
//! Alone in its binary so that other tests do not starve the listener of CPU.

mod common;

use std::time::{Duration, Instant};

use common::sql::{first, until, warm};
use common::{direct, fresh_db, Pgtier};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_loss_never_serves_stale_and_caching_resumes() {
    let db = fresh_db("pgtier_inv_listener").await;
    let d = direct(&db).await;
    d.batch_execute("create table n(id int primary key, v int); insert into n values (1, 0)")
        .await
        .unwrap();
    let p = Pgtier::cached(
        &db,
        "[cache]\ndefault_ttl = \"10m\"\n[invalidation]\ncheck_interval = \"500ms\"\n",
        &[],
    )
    .await;
    let c = p.connect(&db).await;
    let q = "select v from n where id = 1";
    warm(&p, &c, q, "0").await;

    // a writer increments directly; the reader must never see a value older than
    // the last commit that finished before its read began
    let writer = tokio::spawn({
        let db = db.clone();
        async move {
            let w = direct(&db).await;
            let mut log = Vec::new();
            for i in 1..=300 {
                w.execute("update n set v = $1 where id = 1", &[&i])
                    .await
                    .unwrap();
                log.push((Instant::now(), i));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            log
        }
    });
    let killer = tokio::spawn({
        let db = db.clone();
        async move {
            let k = direct(&db).await;
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_millis(300)).await;
                k.execute(
                    "select pg_terminate_backend(pid) from pg_stat_activity \
                     where application_name = 'pgtier-control' and datname = current_database()",
                    &[],
                )
                .await
                .unwrap();
            }
        }
    });
    let mut reads = Vec::new();
    while !writer.is_finished() {
        let start = Instant::now();
        let got: i32 = first(&c, q).await.parse().unwrap();
        reads.push((start, got));
    }
    let log = writer.await.unwrap();
    killer.await.unwrap();
    // Notifications take a moment to arrive: a read may miss a commit that
    // finished less than `bound` before it began, never an older one.
    let bound = Duration::from_millis(50);
    let mut stale = 0;
    let mut worst = Duration::ZERO;
    for (start, got) in &reads {
        let committed = log
            .iter()
            .rev()
            .find(|(t, _)| *t + bound < *start)
            .map_or(0, |(_, v)| *v);
        if *got < committed {
            stale += 1;
        }
        if let Some((t, _)) = log.iter().find(|(_, v)| *v == got + 1) {
            if t < start {
                worst = worst.max(*start - *t);
            }
        }
    }
    eprintln!("reads {} stale {stale} worst lag {worst:?}", reads.len());
    assert_eq!(stale, 0, "{stale} stale reads of {}", reads.len());
    let m = p.metrics().await;
    assert!(
        m.get(
            "pgtier_listener_reconnects_total",
            &[("database", db.as_str())]
        ) >= 1.0
    );
    // the listener comes back, and with it the cache
    p.wait_listener(&db).await;
    let last = log.last().map(|(_, v)| v.to_string()).unwrap();
    until(&c, q, &last).await;
    warm(&p, &c, q, &last).await;
}
