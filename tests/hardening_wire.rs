//! Issue 12, protocol and resource cases: pgtier's reply stream for raw frontend
//! bytes must be the one Postgres sends for the same bytes, with the cache
//! active (the database cached, so the caching path runs) and as a plain proxy;
//! a client that does not read must not make pgtier buffer without bound; the
//! admin console obeys the same admission rules as every other client.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::wire::{
    bind, concat, copy_data, copy_done, execute, extended_query, flush, frame, parse, probe, query,
    run_script, same_replies, same_replies_with, startup, step, sync, terminate, End, Until, Wire,
};
use common::{direct, fresh_db, pgtier_bin, run_bounded, Pgtier};

const TOML: &str = "[cache]\ndefault_ttl = \"5m\"\n";
const READ: &str = "select v from t where id = 1";

/// A database with a small table `t`, a wide row (id 100) and a COPY target
/// `c`, and a pgtier caching it.
async fn cached(name: &str) -> (String, Pgtier) {
    let db = fresh_db(name).await;
    direct(&db)
        .await
        .batch_execute(
            "create table t(id int primary key, v text);
             insert into t select g, 'v' || g from generate_series(1, 10) g;
             insert into t values (100, repeat('x', 2000));
             create table c(id int, v text);",
        )
        .await
        .expect("setup");
    let p = Pgtier::cached(&db, TOML, &[]).await;
    (db, p)
}

/// pgtier as a plain proxy (no listener: nothing is cached) for the same database.
fn plain() -> Pgtier {
    Pgtier::start(&[])
}

/// Proves the caching path is live: the same read, twice, hits at least once.
async fn assert_caching(p: &Pgtier, db: &str) {
    let before = p.metrics().await.hits();
    let mut w = Wire::connect(p.port, "postgres", db);
    for _ in 0..2 {
        let r = w.step(&extended_query(READ, &[]), Until::Ready(1));
        assert_eq!(r.tags(), "1 2 T D C Z", "{:?}", r.msgs);
        let r = w.step(&query(READ), Until::Ready(1));
        assert_eq!(r.tags(), "T D C Z", "{:?}", r.msgs);
    }
    let hits = p.metrics().await.hits() - before;
    assert!(hits >= 2.0, "the cache must be active ({hits} hits)");
}

#[tokio::test]
async fn case_24_error_then_flush_and_sync_in_one_write_gets_ready() {
    let (db, p) = cached("hw_24").await;
    assert_caching(&p, &db).await;
    let script = [
        // the smallest form: the error arrives after Sync was already read
        step(
            concat(&[parse("", "SELEC 1", &[]), flush(), sync()]),
            Until::Ready(1),
        ),
        // a stray CopyData (ignored outside COPY) in place of the Flush
        step(
            concat(&[parse("", "SELEC 1", &[]), copy_data(b"x"), sync()]),
            Until::Ready(1),
        ),
        // an error in Bind, Execute skipped, then Flush and Sync
        step(
            concat(&[
                parse("", "select $1::int", &[]),
                bind("", "", &[Some(b"nope")]),
                execute("", 0),
                flush(),
                sync(),
            ]),
            Until::Ready(1),
        ),
        // a successful batch with a Flush inside stays one transaction
        step(
            concat(&[
                parse("", READ, &[]),
                bind("", "", &[]),
                execute("", 0),
                flush(),
                execute("", 0),
                sync(),
            ]),
            Until::Ready(1),
        ),
        probe(),
    ];
    same_replies(p.port, &db, "cache active", &script);
    same_replies(plain().port, &db, "plain proxy", &script);
    assert_caching(&p, &db).await;
}

#[tokio::test]
async fn case_25_bytes_sent_with_the_startup_packet_are_answered() {
    let (db, p) = cached("hw_25").await;
    assert_caching(&p, &db).await;
    let simple = [step(query(READ), Until::Ready(1)), probe()];
    let extended = [step(extended_query(READ, &[]), Until::Ready(1)), probe()];
    let two = [step(
        concat(&[query("select 1"), query(READ)]),
        Until::Ready(2),
    )];
    for port in [p.port, plain().port] {
        same_replies_with(port, &db, "query with startup", &simple, true);
        same_replies_with(port, &db, "extended with startup", &extended, true);
        same_replies_with(port, &db, "two queries with startup", &two, true);
    }
    // a client that writes startup and its first query at once, then waits
    let (mut w, _) = Wire::start(p.port, "postgres", &db, &query("select 25 as n"));
    let r = w.read(Until::Ready(1), Duration::from_secs(5));
    assert_eq!(r.end, End::Ready, "the query was never answered: {r:?}");
    assert_eq!(r.tags(), "T D C Z");
}

#[tokio::test]
async fn case_26_copy_done_then_sync_keeps_the_stream_in_step() {
    let (db, p) = cached("hw_26").await;
    assert_caching(&p, &db).await;
    let copy = || query("COPY c FROM STDIN");
    let scripts: [(&str, Vec<_>); 3] = [
        (
            "COPY, data, CopyDone, Sync in one write",
            vec![
                step(
                    concat(&[copy(), copy_data(b"1\ta\n"), copy_done(), sync()]),
                    Until::Ready(2),
                ),
                probe(),
                probe(),
            ],
        ),
        (
            "COPY, then data, CopyDone, Sync in one write",
            vec![
                step(copy(), Until::Tag(b'G')),
                step(
                    concat(&[copy_data(b"2\tb\n"), copy_done(), sync()]),
                    Until::Ready(2),
                ),
                probe(),
            ],
        ),
        (
            "extended COPY with the Sync the driver sends, then CopyDone, Sync",
            vec![
                step(
                    concat(&[
                        parse("", "COPY c FROM STDIN", &[]),
                        bind("", "", &[]),
                        execute("", 0),
                        sync(),
                        copy_data(b"3\tc\n"),
                        copy_done(),
                        sync(),
                    ]),
                    Until::Ready(1),
                ),
                probe(),
            ],
        ),
    ];
    for (what, script) in &scripts {
        same_replies(p.port, &db, &format!("cache active: {what}"), script);
        same_replies(plain().port, &db, &format!("plain proxy: {what}"), script);
    }
    assert_caching(&p, &db).await;
}

#[tokio::test]
async fn case_27_parse_and_bind_errors_come_from_postgres_in_time() {
    let (db, p) = cached("hw_27").await;
    assert_caching(&p, &db).await;
    let stmt = "select v from t where id = $1";
    let script = [
        // what libpq's PQprepare sends
        step(
            concat(&[parse("", "SELEC 1", &[]), sync()]),
            Until::Ready(1),
        ),
        step(
            concat(&[parse("bad", "select nope from t", &[]), sync()]),
            Until::Ready(1),
        ),
        step(concat(&[parse("s1", stmt, &[23]), sync()]), Until::Ready(1)),
        // Bind without Execute: the argument is checked at Bind
        step(
            concat(&[bind("", "s1", &[Some(b"abc")]), sync()]),
            Until::Ready(1),
        ),
        step(concat(&[bind("", "s1", &[]), sync()]), Until::Ready(1)),
        // a named statement that exists cannot be parsed again
        step(concat(&[parse("s1", stmt, &[23]), sync()]), Until::Ready(1)),
        step(
            concat(&[bind("", "s1", &[Some(b"1")]), execute("", 0), sync()]),
            Until::Ready(1),
        ),
        step(
            concat(&[bind("", "s1", &[Some(b"1")]), execute("", 0), sync()]),
            Until::Ready(1),
        ),
        // the error is not deferred to the next request
        step(
            concat(&[parse("", "SELEC 1", &[]), sync()]),
            Until::Ready(1),
        ),
        step(extended_query(READ, &[]), Until::Ready(1)),
        probe(),
    ];
    for round in 0..2 {
        same_replies(
            p.port,
            &db,
            &format!("cache active, round {round}"),
            &script,
        );
    }
    same_replies(plain().port, &db, "plain proxy", &script);
    // prepared statements still hit once Postgres has accepted them
    let before = p.metrics().await.hits();
    let mut w = Wire::connect(p.port, "postgres", &db);
    let r = w.step(&concat(&[parse("s9", stmt, &[]), sync()]), Until::Ready(1));
    assert_eq!(r.tags(), "1 Z");
    for _ in 0..2 {
        let r = w.step(
            &concat(&[bind("", "s9", &[Some(b"2")]), execute("", 0), sync()]),
            Until::Ready(1),
        );
        assert_eq!(r.tags(), "2 D C Z");
    }
    assert!(p.metrics().await.hits() - before >= 1.0, "no hit");
}

#[tokio::test]
async fn case_28_requests_written_with_terminate_are_answered() {
    let (db, p) = cached("hw_28").await;
    assert_caching(&p, &db).await;
    let script = [step(
        concat(&[
            query("select 1"),
            extended_query(READ, &[]),
            query(READ),
            parse("", "select $1::int", &[]),
            bind("", "", &[Some(b"28")]),
            execute("", 0),
            sync(),
            terminate(),
        ]),
        Until::Closed,
    )];
    let got = same_replies(p.port, &db, "cache active", &script);
    assert_eq!(
        got[0].tags(),
        "T D C Z 1 2 T D C Z T D C Z 1 2 D C Z",
        "{:?}",
        got[0].msgs
    );
    same_replies(plain().port, &db, "plain proxy", &script);
    // During COPY FROM STDIN, Postgres takes Terminate for a bad COPY message.
    let copy = [
        step(
            concat(&[
                query("COPY c FROM STDIN"),
                copy_data(b"1\ta\n"),
                terminate(),
            ]),
            Until::Ready(1),
        ),
        probe(),
        step(query("COPY c FROM STDIN"), Until::Tag(b'G')),
        step(
            concat(&[copy_data(b"2\tb\n"), terminate()]),
            Until::Ready(1),
        ),
        probe(),
        step(terminate(), Until::Closed),
    ];
    same_replies(p.port, &db, "cache active, COPY", &copy);
    same_replies(plain().port, &db, "plain proxy, COPY", &copy);
    // a write sent with Terminate ran, and its reply arrived first
    let mut w = Wire::connect(p.port, "postgres", &db);
    let r = w.step(
        &concat(&[query("insert into c values (28, 'x')"), terminate()]),
        Until::Closed,
    );
    assert_eq!(r.tags(), "C Z", "{:?}", r.msgs);
    let n: i64 = direct(&db)
        .await
        .query_one("select count(*) from c where id = 28", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

/// Wait (bounded) until the hit counter stops moving; returns its value.
async fn settled_hits(p: &Pgtier) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = p.metrics().await.hits();
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = p.metrics().await.hits();
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() > Duration::from_millis(1500) {
            return last;
        }
        assert!(Instant::now() < deadline, "pgtier never settled");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_17_a_client_that_never_reads_is_not_buffered_without_bound() {
    let (db, p) = cached("hw_17").await;
    assert_caching(&p, &db).await;
    // A 2 kB row: every hit is 2 kB of reply the client does not read.
    let wide = query("select v from t where id = 100");
    let mut w = Wire::connect(p.port, "postgres", &db);
    for _ in 0..2 {
        assert_eq!(w.step(&wide, Until::Ready(1)).tags(), "T D C Z");
    }
    let sock = socket2::SockRef::from(&w.stream);
    let _ = sock.set_recv_buffer_size(32 << 10);
    let _ = sock.set_send_buffer_size(32 << 10);
    const N: usize = 20_000;
    // A prepare first: hits queue behind its reply (still due) as well.
    let mut all = concat(&[parse("first", "select 1", &[]), sync()]);
    for _ in 0..N {
        all.extend_from_slice(&wide);
    }
    let before = p.metrics().await.hits();
    let written = Arc::new(AtomicUsize::new(0));
    let mut ws = w.stream.try_clone().expect("clone");
    let progress = written.clone();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        for chunk in all.chunks(16 << 10) {
            if ws.write_all(chunk).is_err() {
                return;
            }
            progress.fetch_add(chunk.len(), Ordering::Relaxed);
        }
    });
    let answered = settled_hits(&p).await - before;
    eprintln!("answered {answered} of {N} requests before the client read");
    assert!(
        answered < (N / 2) as f64,
        "pgtier answered {answered} of {N} pipelined requests ({} MB of replies) for a \
         client that read none of them ({} kB of requests accepted)",
        answered as usize * 2 / 1000,
        written.load(Ordering::Relaxed) / 1000
    );
    // Reading resumes the session: every reply arrives, in order.
    let r = w.read(Until::Ready(N + 1), Duration::from_secs(120));
    assert_eq!(r.end, End::Ready, "{} messages", r.msgs.len());
    assert!(r
        .msgs
        .iter()
        .filter(|m| m.tag == b'D')
        .skip(1)
        .all(|m| m.body.len() > 2000));
    writer.join().expect("writer");
    let hits = p.metrics().await.hits() - before;
    assert_eq!(hits, N as f64, "every request after the first was a hit");
}

fn verifier(password: &str) -> String {
    let (st, out, err) = run_bounded(
        Command::new(pgtier_bin()).args(["hash-password", "--password", password]),
        Duration::from_secs(30),
    );
    assert!(st.success(), "{err}");
    out.trim().to_string()
}

async fn admin(port: u16, password: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let s = format!(
        "host=127.0.0.1 port={port} user=ops password={password} dbname=pgtier connect_timeout=10"
    );
    let (c, conn) = tokio_postgres::connect(&s, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(c)
}

fn code(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.code().code().to_string())
        .unwrap_or_else(|| format!("{e}"))
}

#[tokio::test]
async fn case_18_admin_console_obeys_auth_timeout_limits_and_throttles_failures() {
    let users = format!(
        "[[admin.users]]\nname = \"ops\"\npassword = \"{}\"\n",
        verifier("pw")
    );
    // max_client_connections: a full pgtier refuses console logins too
    let full = Pgtier::start_with(common::PG_PORT, &users, &["--max-client-connections", "1"]);
    // The harness's own readiness probe may still count for a moment: the one
    // client allowed gets in once it is gone (bounded).
    let deadline = Instant::now() + Duration::from_secs(5);
    let held = loop {
        match tokio_postgres::connect(&full.conn_str("test"), tokio_postgres::NoTls).await {
            Ok((c, conn)) => {
                tokio::spawn(conn);
                break c;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "the one allowed client: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let e = admin(full.port, "pw").await.expect_err("must be refused");
    assert_eq!(code(&e), "53300", "{e}");
    drop(held);

    // auth_timeout: a console client that never answers SCRAM is closed
    let toml = format!("[server]\nauth_timeout = \"1s\"\n{users}");
    let p = Pgtier::start_with(common::PG_PORT, &toml, &[]);
    let ok = admin(p.port, "pw").await.expect("console login");
    ok.simple_query("SHOW CONFIG").await.unwrap();
    let mut w = Wire::open(p.port);
    w.send(&startup(&[("user", "ops"), ("database", "pgtier")]));
    let r = w.read(Until::Tag(b'R'), Duration::from_secs(5));
    assert_eq!(r.end, End::Ready, "no SASL request: {r:?}");
    let t = Instant::now();
    let r = w.read(Until::Closed, Duration::from_secs(10));
    assert_eq!(
        r.end,
        End::Closed,
        "an unauthenticated console socket stayed open"
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(
        r.msgs.last().and_then(|m| m.code()).as_deref(),
        Some("08006")
    );

    // hanging up at the password request (what psql does before it prompts)
    // guesses nothing and is not held against the address
    for _ in 0..8 {
        let mut w = Wire::open(p.port);
        w.send(&startup(&[("user", "ops"), ("database", "pgtier")]));
        assert_eq!(
            w.read(Until::Tag(b'R'), Duration::from_secs(5)).end,
            End::Ready
        );
    }
    admin(p.port, "pw")
        .await
        .expect("hang-ups are not failed logins");

    // failed logins: after a few, this address is refused even the right password
    let mut refused = None;
    for attempt in 0..8 {
        let e = admin(p.port, "wrong").await.expect_err("wrong password");
        if code(&e) == "28000" {
            refused = Some(attempt);
            break;
        }
        assert_eq!(code(&e), "28P01", "{e}");
    }
    assert!(refused.is_some(), "failed logins are not rate-limited");
    let e = admin(p.port, "pw").await.expect_err("throttled");
    assert_eq!(code(&e), "28000", "{e}");
    // the session opened before is unaffected
    ok.simple_query("SHOW STATS").await.unwrap();
}

/// Found by the wire fuzzer (case 28's family): requests written together with
/// a malformed message run and are answered before the FATAL, as in Postgres.
#[tokio::test]
async fn case_28_requests_written_before_a_malformed_message_are_answered() {
    let (db, p) = cached("hw_28_malformed").await;
    assert_caching(&p, &db).await;
    // (A message Postgres can frame but not decode, such as a Query with
    // trailing bytes, is an ERROR there and FATAL here: by design, see README.)
    for bad in [frame(b'x', b""), frame(b'x', b"junk")] {
        let script = [step(
            concat(&[query("select 1"), query(READ), bad.clone()]),
            Until::Closed,
        )];
        let want = run_script(common::PG_PORT, &db, &script, false);
        for (what, port) in [("cache active", p.port), ("plain proxy", plain().port)] {
            let got = run_script(port, &db, &script, false);
            assert_eq!(
                got[0].end, want[0].end,
                "{what}: {:?} vs Postgres {:?}",
                got[0].msgs, want[0].msgs
            );
            assert_eq!(got[0].tags(), want[0].tags(), "{what}: {:?}", got[0].msgs);
            assert_eq!(got[0].tags(), "T D C Z T D C Z E", "{what}");
            let fatal = got[0].msgs.last().and_then(|m| m.code());
            assert_eq!(fatal.as_deref(), Some("08P01"), "{what}");
        }
    }
}

/// Found by the wire fuzzer: COPY, CopyDone and two Syncs in one write, then a
/// query: every reply in step with Postgres's.
#[tokio::test]
async fn case_26_copy_done_then_two_syncs_then_a_query() {
    let (db, p) = cached("hw_26_two_syncs").await;
    assert_caching(&p, &db).await;
    let script = [
        step(
            concat(&[
                query("COPY c FROM STDIN"),
                copy_done(),
                sync(),
                sync(),
                query("select 1"),
            ]),
            Until::Ready(4),
        ),
        probe(),
    ];
    same_replies(p.port, &db, "cache active", &script);
    same_replies(plain().port, &db, "plain proxy", &script);
}

/// Found by the wire fuzzer: a read pipelined ahead of `BEGIN` must not get
/// the read-your-writes fence that BEGIN's transaction owes at its end (the
/// fence would queue behind BEGIN, inside the transaction, and time out).
#[tokio::test]
async fn case_24_a_later_pipelined_write_does_not_fence_an_earlier_request() {
    let (db, p) = cached("hw_pipelined_fence").await;
    assert_caching(&p, &db).await;
    let mut w = Wire::connect(p.port, "postgres", &db);
    let r = w.step(
        &concat(&[
            // forwarded (never cached), so its ReadyForQuery comes from Postgres
            extended_query("select now()", &[]),
            query("begin"),
            query("update t set v = 'w' where id = 2"),
        ]),
        Until::Ready(3),
    );
    assert_eq!(r.end, End::Ready, "{:?}", r.msgs);
    let r = w.step(&query("commit"), Until::Ready(1));
    assert_eq!(r.tags(), "C Z", "{:?}", r.msgs);
    let m = p.metrics().await;
    assert_eq!(m.get("pgtier_fence_timeouts_total", &[]), 0.0);
    // The session still uses the cache (a timed-out fence would have ended that).
    let before = p.metrics().await.hits();
    for _ in 0..2 {
        let r = w.step(&query(READ), Until::Ready(1));
        assert_eq!(r.tags(), "T D C Z", "{:?}", r.msgs);
    }
    assert!(p.metrics().await.hits() > before);
}
