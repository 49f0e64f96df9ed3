//! The logical source learns of a commit from its flushed WAL record, which
//! can come before other sessions see the commit: here a writer waits for a
//! synchronous standby that never answers, its commit decoded and applied by
//! pgtier but invisible to everyone. A read meanwhile gets the old row from
//! Postgres, as it should; pgtier must not keep that answer, or it would serve
//! it after the commit shows (until the next write of the table). Found as
//! reads 200 ms stale in the staleness bench with `source = "logical"`.

mod common;

use std::time::Duration;

use common::cluster::Cluster;
use common::logical::{app, cluster, schema, setup_command, start_pgtier, TTL};
use common::sql::{first, warm};
use common::{connect_str, Pgtier};
use tokio_postgres::Client;

/// A logical-source pgtier on a cluster whose commits wait for a standby
/// that never comes (except the control role's and the application's), a
/// superuser connection to it, an application connection through pgtier,
/// and the read the tests use, cached.
async fn setup() -> (Cluster, Pgtier, Client, Client, String) {
    let cluster = cluster();
    let port = cluster.port;
    let _ctl = schema(port).await;
    let direct_str = format!("host=127.0.0.1 port={port} user=postgres dbname=lg");
    let direct = connect_str(&direct_str).await;
    for sql in [
        "ALTER ROLE ctl SET synchronous_commit = local",
        "ALTER ROLE app SET synchronous_commit = local",
        "ALTER SYSTEM SET synchronous_standby_names = 'nobody'",
        "SELECT pg_reload_conf()",
    ] {
        direct.batch_execute(sql).await.unwrap();
    }
    setup_command(port, &["install-triggers"]);
    let p = start_pgtier(port, TTL).await;
    let app = app(&p).await;
    warm(&p, &app, READ, "1").await;
    (cluster, p, direct, app, direct_str)
}

const READ: &str = "select v from t where id = 1";

const LG: &[(&str, &str)] = &[("database", "lg")];
const APPLIED: &str = "pgtier_logical_transactions_total";
const RECONNECTS: &str = "pgtier_listener_reconnects_total";

/// Start `update t set v = 100 where id = 1` on a connection of its own; it
/// returns once its wait for the standby is cancelled. Returns once pgtier
/// has applied the commit (still invisible), with the writer's backend pid.
async fn stuck_write(
    p: &Pgtier,
    direct_str: &str,
) -> (
    String,
    tokio::task::JoinHandle<Result<Client, tokio_postgres::Error>>,
) {
    let writer = connect_str(direct_str).await;
    let pid = first(&writer, "select pg_backend_pid()").await;
    let before = p.metrics().await.get(APPLIED, LG);
    let update = tokio::spawn(async move {
        writer
            .batch_execute("update t set v = 100 where id = 1")
            .await
            .map(|_| writer)
    });
    p.until_metric_above(
        APPLIED,
        LG,
        before,
        Duration::from_secs(10),
        "the stream never delivered the waiting commit",
    )
    .await;
    assert!(!update.is_finished(), "the commit must still be waiting");
    (pid, update)
}

/// Cancel the writer's wait: its commit (already durable) becomes visible.
async fn release(
    direct: &Client,
    pid: &str,
    update: tokio::task::JoinHandle<Result<Client, tokio_postgres::Error>>,
) {
    first(direct, &format!("select pg_cancel_backend({pid})")).await;
    tokio::time::timeout(Duration::from_secs(10), update)
        .await
        .expect("the writer returns once cancelled")
        .expect("writer task")
        .expect("a cancelled wait for a standby still commits");
    assert_eq!(first(direct, READ).await, "100");
}

#[tokio::test]
async fn a_read_between_a_decoded_commit_and_its_visibility_is_not_kept() {
    let (_cluster, p, direct, app, direct_str) = setup().await;
    let (pid, update) = stuck_write(&p, &direct_str).await;
    assert_eq!(first(&direct, READ).await, "1", "not visible yet");
    // Read twice: the first read's answer, if kept, answers the second.
    let held_before = p.metrics().await.bypasses("commit_not_visible");
    assert_eq!(first(&app, READ).await, "1", "what Postgres says now");
    assert_eq!(first(&app, READ).await, "1");
    assert!(
        p.metrics().await.bypasses("commit_not_visible") >= held_before + 2.0,
        "reads while the commit is not visible are counted"
    );
    release(&direct, &pid, update).await;
    assert_eq!(
        first(&app, READ).await,
        "100",
        "a result read before the commit showed was kept"
    );
    // Once pgtier sees the commit visible, the read is cached again.
    warm(&p, &app, READ, "100").await;
}

#[tokio::test]
async fn losing_the_visibility_check_restarts_the_stream_and_releases_what_it_held() {
    let (_cluster, p, direct, app, direct_str) = setup().await;
    let (pid, update) = stuck_write(&p, &direct_str).await;
    let reconnects = p.metrics().await.get(RECONNECTS, LG);
    // The connection that reads the server's snapshot dies with the commit
    // still held.
    let killed = first(
        &direct,
        "select count(pg_terminate_backend(pid)) from pg_stat_activity
         where usename = 'ctl' and query like '%pg_current_snapshot()::text'",
    )
    .await;
    assert_eq!(killed, "1", "one visibility check connection");
    p.until_metric_above(
        RECONNECTS,
        LG,
        reconnects,
        Duration::from_secs(15),
        "the stream did not restart without its visibility check",
    )
    .await;
    // A new slot waits for the transactions still running, the stuck
    // writer's included: it is released first.
    release(&direct, &pid, update).await;
    p.wait_listener("lg").await;
    assert_eq!(first(&app, READ).await, "100");
    // Nothing stays held: the table is cached again.
    warm(&p, &app, READ, "100").await;
}
