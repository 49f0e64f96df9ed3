//! `invalidation.source = "poll"`: the triggers append to `pgtier.changes`
//! instead of sending NOTIFY, and pgtier reads that table. Writes made
//! anywhere invalidate, writes through pgtier are read back at once, a writer
//! that commits after a later one is not missed, and nothing is announced
//! on the notification channel.

mod common;

use std::time::{Duration, Instant};

use common::sql::{first, until, warm};
use common::{direct, fresh_db, Pgtier};

const TOML: &str = "[cache]\ndefault_ttl = \"10m\"\n";

async fn setup(name: &str) -> (String, tokio_postgres::Client, Pgtier) {
    let db = fresh_db(name).await;
    let d = direct(&db).await;
    d.batch_execute(
        "create table t(id int primary key, v int);
         insert into t select g, 0 from generate_series(1, 10) g;",
    )
    .await
    .expect("setup");
    let p = Pgtier::cached(&db, TOML, &["--invalidation-source", "poll", "--key-level"]).await;
    (db, d, p)
}

#[tokio::test]
async fn writes_anywhere_invalidate_without_a_notification() {
    let (db, d, p) = setup("poll_basic").await;
    let (_l, mut seen) = common::listen(&db, "pgtier_invalidate").await;
    let c = p.connect(&db).await;
    let q1 = "select v from t where id = 1";
    let scan = "select sum(v) from t";
    warm(&p, &c, q1, "0").await;
    warm(&p, &c, scan, "0").await;
    // Elsewhere: read within the poll interval's reach.
    d.execute("update t set v = 5 where id = 1", &[])
        .await
        .expect("write");
    until(&c, q1, "5").await;
    until(&c, scan, "5").await;
    // Through pgtier: read back at once (the fence waits for a poll).
    for i in 6..=20 {
        c.execute("update t set v = $1 where id = 1", &[&i])
            .await
            .expect("write");
        assert_eq!(first(&c, q1).await, i.to_string(), "read-your-writes");
        assert_eq!(first(&c, scan).await, i.to_string(), "read-your-writes");
    }
    warm(&p, &c, q1, "20").await;
    let rows: i64 = d
        .query_one("select count(*) from pgtier.changes", &[])
        .await
        .expect("changes")
        .get(0);
    assert!(rows > 0, "the triggers wrote to the change table");
    let sent = common::until_marker(&d, "pgtier_invalidate", &mut seen).await;
    assert!(
        !sent
            .iter()
            .any(|m| m.starts_with('w') || m.starts_with('k') || m.starts_with('f')),
        "a write announced by NOTIFY: {sent:?}"
    );
    let m = p.metrics().await;
    assert!(m.get("pgtier_fences_total", &[("kind", "probe")]) >= 15.0);
    assert_eq!(m.get("pgtier_fences_total", &[("kind", "notify")]), 0.0);
}

#[tokio::test]
async fn a_writer_that_commits_after_a_later_one_is_not_missed() {
    let (db, d, p) = setup("poll_order").await;
    let c = p.connect(&db).await;
    let (q1, q2) = (
        "select v from t where id = 1",
        "select v from t where id = 2",
    );
    warm(&p, &c, q1, "0").await;
    warm(&p, &c, q2, "0").await;
    // T1 takes the lower change id and stays open.
    let slow = direct(&db).await;
    slow.batch_execute("begin; update t set v = 1 where id = 1")
        .await
        .expect("t1");
    // T2 takes a higher one and commits first; once pgtier has read it, its
    // cursor is past T1's id.
    d.execute("update t set v = 2 where id = 2", &[])
        .await
        .expect("t2");
    until(&c, q2, "2").await;
    // Cached again while T1 is still open (the old value is right until then).
    warm(&p, &c, q1, "0").await;
    slow.batch_execute("commit").await.expect("t1 commits");
    // Read through T1's transaction id (it was running at the last poll).
    until(&c, q1, "1").await;
}

#[tokio::test]
async fn the_poll_source_refuses_an_l2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("pgtier.toml");
    std::fs::write(
        &path,
        "[invalidation]\nsource = \"poll\"\n[l2]\nredis_url = \"redis://127.0.0.1:6379\"\n\
         signing_key = \"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\"\n",
    )
    .expect("config");
    let out = std::process::Command::new(common::pgtier_bin())
        .arg("--config")
        .arg(&path)
        .arg("check-config")
        .output()
        .expect("pgtier runs");
    assert!(!out.status.success(), "poll with an L2 is refused");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalidation.source"), "{err}");
}

/// The cursor itself, on a database of its own: a writer whose xid is above
/// the snapshot's xmax is running but listed in no xip, and its row has a
/// lower id than one already read; the next poll after its commit reads it.
#[tokio::test]
async fn the_cursor_reads_a_writer_above_the_snapshots_xmax() {
    use pgtier::invalidation::{poll, triggers};
    let db = fresh_db("poll_cursor").await;
    let c = direct(&db).await;
    triggers::install(&c, "ch", &triggers::Scope::default(), false, true)
        .await
        .expect("install");
    let mut cursor = poll::Cursor::start(&c).await.expect("cursor");
    let (a, b) = (direct(&db).await, direct(&db).await);
    a.batch_execute("begin; select pg_current_xact_id()")
        .await
        .expect("a");
    b.batch_execute("begin; select pg_current_xact_id(); select pgtier.announce('ch', 'from b')")
        .await
        .expect("b");
    a.batch_execute("select pgtier.announce('ch', 'from a'); commit")
        .await
        .expect("a commits");
    let first = poll::read(&c, None, &mut cursor).await.expect("poll");
    assert_eq!(first, vec!["from a"]);
    b.batch_execute("commit").await.expect("b commits");
    let second = poll::read(&c, None, &mut cursor).await.expect("poll");
    assert_eq!(second, vec!["from b"], "B's row, below the highest id read");
    assert!(
        poll::read(&c, None, &mut cursor)
            .await
            .expect("poll")
            .is_empty(),
        "once"
    );
}

/// Any role that may write a cached table announces through
/// `pgtier.announce`; none may append to the change table itself (a row
/// with an id of its choosing would move every cursor past real writes).
#[tokio::test]
async fn writers_announce_only_through_the_function() {
    let (db, d, p) = setup("poll_roles").await;
    d.batch_execute(
        "DO $$ BEGIN CREATE ROLE poll_plain LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
         GRANT SELECT, UPDATE ON t TO poll_plain;",
    )
    .await
    .expect("role");
    let plain = common::connect_str(&format!(
        "host={} port={} user=poll_plain dbname={db}",
        common::PG_HOST,
        common::PG_PORT
    ))
    .await;
    let c = p.connect(&db).await;
    let q = "select v from t where id = 3";
    warm(&p, &c, q, "0").await;
    plain
        .execute("update t set v = 7 where id = 3", &[])
        .await
        .expect("a plain role writes a cached table");
    until(&c, q, "7").await;
    let forged = plain
        .batch_execute(
            "insert into pgtier.changes overriding system value values (9223372036854775807, pg_current_xact_id(), 'x')",
        )
        .await
        .expect_err("no direct insert");
    assert_eq!(
        forged.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
        "{forged}"
    );
}

/// A pgtier on `notify` started against a database the `poll` one serves
/// does not switch `pgtier.announce` (the other would hear of no write): it
/// stays down, and says why.
#[tokio::test]
async fn a_pgtier_of_another_source_does_not_switch_the_database() {
    let (db, d, p) = setup("poll_mixed").await;
    let control = format!(
        "postgres://postgres@{}:{}/{db}",
        common::PG_HOST,
        common::PG_PORT
    );
    let other = Pgtier::start_with(
        common::PG_PORT,
        TOML,
        &["--control-url", &control, "--auto-install-triggers"],
    );
    let t = Instant::now();
    loop {
        let m = other.metrics().await;
        let tries = m.get(
            "pgtier_listener_reconnects_total",
            &[("database", db.as_str())],
        );
        assert_eq!(
            m.get("pgtier_listener_connected", &[("database", db.as_str())]),
            0.0,
            "a notify pgtier must not serve a poll database"
        );
        if tries >= 2.0 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(15), "it never tried");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let src: String = d
        .query_one(
            "select prosrc from pg_proc where oid = 'pgtier.announce(text,text)'::regprocedure",
            &[],
        )
        .await
        .expect("announce")
        .get(0);
    assert!(src.contains("pgtier-announce: poll"), "{src}");
    // The poll pgtier still hears of writes.
    let c = p.connect(&db).await;
    let q = "select v from t where id = 4";
    warm(&p, &c, q, "0").await;
    d.execute("update t set v = 4 where id = 4", &[])
        .await
        .expect("write");
    until(&c, q, "4").await;
}
