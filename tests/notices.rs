//! Notices belong to the statement that raised them, and Postgres sends them
//! every time it runs it: a result that came with a notice is never answered
//! from the cache (a hit would leave the notice out), and the notices of
//! pgtier's own requests on a session (a stale-while-revalidate refresh)
//! never reach its client. Both diverged from Postgres before (found by a
//! helper's adversarial review).

mod common;

use std::time::Duration;

use common::wire::{extended_query, probe, query, same_replies, step, Until, Wire};
use common::{direct, fresh_db, Pgtier};

const SCHEMA: &str = "
create table t(id int primary key, v text); insert into t values (1, 'a');
create table loud(on_ boolean); insert into loud values (false);
-- IMMUTABLE by declaration (pgtier trusts it), noisy when loud says so.
create function noisy(i int) returns int language plpgsql immutable as $$
begin
  if (select on_ from loud) then raise notice 'noisy %', i; end if;
  return i;
end $$;";

async fn setup(name: &str, toml: &str) -> (String, Pgtier) {
    let db = fresh_db(name).await;
    direct(&db).await.batch_execute(SCHEMA).await.unwrap();
    let p = Pgtier::cached(&db, toml, &[]).await;
    (db, p)
}

#[tokio::test]
async fn a_result_that_came_with_a_notice_is_not_answered_from_the_cache() {
    let (db, p) = setup("notices_hit", "[cache]\ndefault_ttl = \"10m\"\n").await;
    direct(&db)
        .await
        .batch_execute("update loud set on_ = true")
        .await
        .unwrap();
    let sql = "select noisy(id), v from t where id = 1";
    let steps: Vec<_> = (0..3)
        .flat_map(|_| {
            [
                step(query(sql), Until::Ready(1)),
                step(extended_query(sql, &[]), Until::Ready(1)),
            ]
        })
        .chain([probe()])
        .collect();
    let got = same_replies(p.port, &db, "a noisy read", &steps);
    assert!(
        got[4].msgs.iter().any(|m| m.tag == b'N'),
        "the third run still has its notice: {:?}",
        got[4].msgs
    );
}

#[tokio::test]
async fn a_refresh_keeps_its_notices_to_itself() {
    let toml = "[cache]\ndefault_ttl = \"10m\"\n[[cache.rules]]\nquery = \"noisy\"\nttl = \"1s\"\nswr = \"30s\"\n";
    let (db, p) = setup("notices_swr", toml).await;
    let sql = "select noisy(id), v from t where id = 1";
    let mut w = Wire::connect(p.port, "postgres", &db);
    // Quiet: cached.
    for _ in 0..3 {
        let r = w.step(&query(sql), Until::Ready(1));
        assert!(r.msgs.iter().all(|m| m.tag != b'N'), "{:?}", r.msgs);
    }
    assert!(p.metrics().await.hits() >= 1.0, "cached while quiet");
    direct(&db)
        .await
        .batch_execute("update loud set on_ = true")
        .await
        .unwrap();
    let expired = std::time::Instant::now() + Duration::from_millis(1100);
    while std::time::Instant::now() < expired {
        std::thread::sleep(Duration::from_millis(50));
    }
    // Expired: answered stale, refreshed in the background, whose notice is
    // pgtier's, not the client's.
    let r = w.step(&query(sql), Until::Ready(1));
    assert!(r.msgs.iter().all(|m| m.tag != b'N'), "{:?}", r.msgs);
    let unasked = w.read(Until::Ready(1), Duration::from_millis(1000));
    assert!(
        unasked.msgs.is_empty(),
        "sent to an idle client: {:?}",
        unasked.msgs
    );
    let r = w.step(&query("select 1"), Until::Ready(1));
    assert_eq!(r.tags(), "T D C Z");
}
