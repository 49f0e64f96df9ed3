//! Writes that reach a cached table by another way than its name: through a
//! parent of a child the read covers (multiple inheritance: `UPDATE p1`
//! changes rows a read of `p2` returns), or through a column default or a
//! CHECK that calls a function writing the table. Each must invalidate, and a
//! session that writes this way must read its own write at once. Both were
//! stale before their fixes (found by a helper's adversarial review).

mod common;

use common::sql::{first, until, warm};
use common::{direct, fresh_db, Pgtier};

const TTL: &str = "[cache]\ndefault_ttl = \"10m\"\n";

#[tokio::test]
async fn case_29_a_write_through_another_parent_of_a_child_invalidates() {
    let db = fresh_db("hr_multiple_inheritance").await;
    let d = direct(&db).await;
    d.batch_execute(
        "create table p1(id int, v int); create table p2(id int, v int);
         create table c () inherits (p1, p2); insert into c values (1, 10);",
    )
    .await
    .unwrap();
    let p = Pgtier::cached(&db, TTL, &[]).await;
    let cl = p.connect(&db).await;
    let q = "select coalesce(sum(v), 0)::text from p2";
    warm(&p, &cl, q, "10").await;
    // Elsewhere, through the other parent.
    d.batch_execute("update p1 set v = 99").await.unwrap();
    until(&cl, q, "99").await;
    // Through pgtier: the very next read.
    warm(&p, &cl, q, "99").await;
    cl.batch_execute("update p1 set v = 7").await.unwrap();
    assert_eq!(first(&cl, q).await, "7", "the session's own write");
}

#[tokio::test]
async fn case_30_a_default_or_check_that_writes_a_cached_table_is_fenced() {
    let db = fresh_db("hr_default_writes").await;
    let d = direct(&db).await;
    d.batch_execute(
        "create table t(id int primary key, v int); insert into t values (1, 0);
         create function bump() returns int language plpgsql as
           $$ begin update t set v = v + 1 where id = 1; return 1; end $$;
         create table by_default(id int, x int default bump());
         create table by_check(id int check (bump() > 0));",
    )
    .await
    .unwrap();
    // Lazy watching (the default): `by_default` and `by_check` are never read,
    // so a write naming only them would reach nothing pgtier caches, were it
    // not for what their defaults and checks call.
    let control = format!(
        "postgres://postgres@{}:{}/{db}",
        common::PG_HOST,
        common::PG_PORT
    );
    let p = Pgtier::start_with(
        common::PG_PORT,
        TTL,
        &["--control-url", &control, "--auto-install-triggers"],
    );
    p.wait_listener(&db).await;
    let cl = p.connect(&db).await;
    let q = "select v::text from t where id = 1";
    let fences = |m: &common::Metrics| m.get("pgtier_fences_total", &[("kind", "probe")]);
    let mut v = 0;
    for write in [
        "insert into by_default(id) values (1)",
        "insert into by_check values (1)",
    ] {
        for _ in 0..3 {
            warm(&p, &cl, q, &v.to_string()).await;
            let before = fences(&p.metrics().await);
            cl.batch_execute(write).await.unwrap();
            v += 1;
            assert_eq!(first(&cl, q).await, v.to_string(), "{write}: its own write");
            assert!(
                fences(&p.metrics().await) > before,
                "{write}: the write was fenced"
            );
        }
    }
}
