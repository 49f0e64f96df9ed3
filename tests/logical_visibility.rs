//! The logical source learns of a commit from its flushed WAL record, which
//! can come before other sessions see the commit: here a writer waits for a
//! synchronous standby that never answers, its commit decoded and applied by
//! pgtier but invisible to everyone. A read meanwhile gets the old row from
//! Postgres, as it should; pgtier must not keep that answer, or it would serve
//! it after the commit shows (until the next write of the table). Found as
//! reads 200 ms stale in the staleness bench with `source = "logical"`.

mod common;

use std::time::{Duration, Instant};

use common::logical::{cluster, control_url, schema, setup_command, TTL};
use common::sql::{first, warm};
use common::{connect_str, Pgtier};

#[tokio::test]
async fn a_read_between_a_decoded_commit_and_its_visibility_is_not_kept() {
    let cluster = cluster();
    let port = cluster.port;
    let _ctl = schema(port).await;
    let direct_str = format!("host=127.0.0.1 port={port} user=postgres dbname=lg");
    let direct = connect_str(&direct_str).await;
    // Commits wait for a standby that never comes, except the control
    // role's and the application's (reads assign no transaction id anyway).
    for sql in [
        "ALTER ROLE ctl SET synchronous_commit = local",
        "ALTER ROLE app SET synchronous_commit = local",
        "ALTER SYSTEM SET synchronous_standby_names = 'nobody'",
        "SELECT pg_reload_conf()",
    ] {
        direct.batch_execute(sql).await.unwrap();
    }
    setup_command(port, &["install-triggers"]);
    let p = Pgtier::start_with(
        port,
        TTL,
        &[
            "--control-url",
            &control_url(port),
            "--invalidation-source",
            "logical",
        ],
    );
    p.wait_listener("lg").await;
    let app = connect_str(&format!(
        "host=127.0.0.1 port={} user=app password=app-secret dbname=lg connect_timeout=10",
        p.port
    ))
    .await;
    let read = "select v from t where id = 1";
    warm(&p, &app, read, "1").await;

    // The writer's commit is flushed and decoded, then waits (not visible).
    let writer = connect_str(&direct_str).await;
    let writer_pid = first(&writer, "select pg_backend_pid()").await;
    let applied = p
        .metrics()
        .await
        .get("pgtier_logical_transactions_total", &[("database", "lg")]);
    let update = tokio::spawn(async move {
        writer
            .batch_execute("update t set v = 100 where id = 1")
            .await
            .map(|_| writer)
    });
    let t = Instant::now();
    while p
        .metrics()
        .await
        .get("pgtier_logical_transactions_total", &[("database", "lg")])
        <= applied
    {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the stream never delivered the waiting commit"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!update.is_finished(), "the commit must still be waiting");
    assert_eq!(first(&direct, read).await, "1", "not visible yet");
    // Read twice: the first read's answer, if kept, answers the second.
    let held_before = p.metrics().await.bypasses("commit_not_visible");
    assert_eq!(first(&app, read).await, "1", "what Postgres says now");
    assert_eq!(first(&app, read).await, "1");
    assert!(
        p.metrics().await.bypasses("commit_not_visible") >= held_before + 2.0,
        "reads while the commit is not visible are counted"
    );

    // The wait is cancelled: the commit (already durable) becomes visible.
    first(&direct, &format!("select pg_cancel_backend({writer_pid})")).await;
    let writer = tokio::time::timeout(Duration::from_secs(10), update)
        .await
        .expect("the writer returns once cancelled")
        .expect("writer task")
        .expect("a cancelled wait for a standby still commits");
    assert_eq!(first(&direct, read).await, "100");
    assert_eq!(
        first(&app, read).await,
        "100",
        "a result read before the commit showed was kept"
    );
    // Once pgtier sees the commit visible, the read is cached again.
    warm(&p, &app, read, "100").await;
    drop(writer);
}
