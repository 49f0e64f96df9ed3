//! Issue 12, cases 3, 4 and 12: what a statement's names mean in the catalog.
//! Unqualified relation names resolve per user and change with DDL; views hide
//! functions; built-in names can be shadowed and operators and casts run user
//! functions. Each test shows caching is active where it is safe, and that the
//! unsafe statement is answered by Postgres (counted with its bypass reason).

mod common;

use common::sql::{first, until, warm};
use common::{connect_str, direct, fresh_db, Pgtier};
use tokio_postgres::Client;

const TTL: &str = "[cache]\ndefault_ttl = \"10m\"\n";

/// Roles are cluster-wide: created once, idempotently.
async fn roles(d: &Client) {
    d.batch_execute(
        "do $$ begin
           -- Tests of one binary run at once: create roles one at a time.
           perform pg_advisory_xact_lock(7201);
           -- And a test binary running at the same time may take another
           -- lock: a role created meanwhile is as good.
           begin create role hc_alice login;
           exception when duplicate_object or unique_violation then null; end;
           begin create role hc_bob login;
           exception when duplicate_object or unique_violation then null; end;
         end $$",
    )
    .await
    .unwrap();
}

async fn connect_as(p: &Pgtier, db: &str, user: &str) -> Client {
    connect_str(&format!(
        "host=127.0.0.1 port={} user={user} dbname={db} connect_timeout=10",
        p.port
    ))
    .await
}

/// Two reads of `sql`: the second must not be a hit, and the reads count as
/// bypasses with `reason`.
async fn never_cached(p: &Pgtier, c: &Client, sql: &str, reason: &str) -> (String, String) {
    let before = p.metrics().await;
    let a = first(c, sql).await;
    let b = first(c, sql).await;
    let after = p.metrics().await;
    assert_eq!(
        after.hits() - before.hits(),
        0.0,
        "{sql} was served from the cache"
    );
    // `a|b`: either reason (a session that ran a volatile function is no
    // longer cached at all: `function_call`).
    let counted: f64 = reason
        .split('|')
        .map(|r| after.bypasses(r) - before.bypasses(r))
        .sum();
    assert!(
        counted >= 2.0,
        "{sql}: expected bypasses with reason {reason}"
    );
    (a, b)
}

#[tokio::test]
async fn case_03_public_rules_share_only_schema_qualified_relations() {
    let db = fresh_db("hc_public").await;
    let d = direct(&db).await;
    roles(&d).await;
    d.batch_execute(
        "create table public.items(v text); insert into public.items values ('public');
         create schema hc_alice authorization hc_alice;
         create table hc_alice.items(v text); insert into hc_alice.items values ('alice');
         grant select on public.items to hc_alice, hc_bob;
         grant select on hc_alice.items to hc_alice;",
    )
    .await
    .unwrap();
    let toml = "[cache]\ndefault_ttl = \"10m\"\n[[cache.rules]]\ntable = \"public.items\"\npublic = true\n";
    let p = Pgtier::cached(&db, toml, &[]).await;
    let alice = connect_as(&p, &db, "hc_alice").await;
    let bob = connect_as(&p, &db, "hc_bob").await;

    // alice's `items` is hc_alice.items ("$user" comes first); cached for her.
    warm(&p, &alice, "select v from items", "alice").await;
    assert_eq!(
        first(&bob, "select v from items").await,
        "public",
        "bob was served alice's rows"
    );
    // Bob's own reads are cached too, under his key.
    warm(&p, &bob, "select v from items", "public").await;

    // Schema-qualified, the rule shares the entry: bob hits what alice filled.
    warm(&p, &alice, "select v from public.items", "public").await;
    let before = p.metrics().await.hits();
    assert_eq!(first(&bob, "select v from public.items").await, "public");
    assert_eq!(p.metrics().await.hits() - before, 1.0, "shared entry");
}

#[tokio::test]
async fn case_03_a_relation_that_takes_over_an_unqualified_name_invalidates() {
    let db = fresh_db("hc_shadowing").await;
    let d = direct(&db).await;
    roles(&d).await;
    d.batch_execute(
        "create table public.items(v text); insert into public.items values ('public');
         grant select on public.items to hc_alice;",
    )
    .await
    .unwrap();
    let p = Pgtier::cached(&db, TTL, &[]).await;
    let alice = connect_as(&p, &db, "hc_alice").await;
    let q = "select v from items";

    // A schema named after the role appears, with a table of that name.
    warm(&p, &alice, q, "public").await;
    d.batch_execute(
        "create schema hc_alice authorization hc_alice;
         create table hc_alice.items(v text); insert into hc_alice.items values ('created');
         grant select on hc_alice.items to hc_alice;",
    )
    .await
    .unwrap();
    until(&alice, q, "created").await;

    // A table renamed into the name.
    d.batch_execute(
        "drop table hc_alice.items;
         create table hc_alice.other(v text); insert into hc_alice.other values ('renamed');
         grant select on hc_alice.other to hc_alice;",
    )
    .await
    .unwrap();
    until(&alice, q, "public").await;
    warm(&p, &alice, q, "public").await;
    d.batch_execute("alter table hc_alice.other rename to items")
        .await
        .unwrap();
    until(&alice, q, "renamed").await;

    // A table moved into the schema.
    d.batch_execute(
        "drop table hc_alice.items;
         create schema hc_side; create table hc_side.items(v text);
         insert into hc_side.items values ('moved'); grant select on hc_side.items to hc_alice;",
    )
    .await
    .unwrap();
    until(&alice, q, "public").await;
    warm(&p, &alice, q, "public").await;
    d.batch_execute("alter table hc_side.items set schema hc_alice")
        .await
        .unwrap();
    until(&alice, q, "moved").await;

    // A whole schema renamed to the role's name.
    d.batch_execute(
        "drop schema hc_alice cascade;
         create schema hc_later authorization hc_alice; create table hc_later.items(v text);
         insert into hc_later.items values ('schema renamed');
         grant select on hc_later.items to hc_alice;",
    )
    .await
    .unwrap();
    until(&alice, q, "public").await;
    warm(&p, &alice, q, "public").await;
    d.batch_execute("alter schema hc_later rename to hc_alice")
        .await
        .unwrap();
    until(&alice, q, "schema renamed").await;
    // And the new resolution is cached again.
    warm(&p, &alice, q, "schema renamed").await;
}

#[tokio::test]
async fn case_03_role_settings_are_followed() {
    let db = fresh_db("hc_rolecfg").await;
    let d = direct(&db).await;
    roles(&d).await;
    d.batch_execute(
        "create table public.f(x float8); insert into public.f values (1.0 / 3);
         create table public.items(v text); insert into public.items values ('public');
         create schema hc_alt; create table hc_alt.items(v text); insert into hc_alt.items values ('alt');
         grant usage on schema hc_alt to hc_alice;
         grant select on public.f, public.items, hc_alt.items to hc_alice, hc_bob;
         alter role hc_bob in database hc_rolecfg set extra_float_digits = -3;",
    )
    .await
    .unwrap();
    let toml =
        "[cache]\ndefault_ttl = \"10m\"\n[[cache.rules]]\ntable = \"public.f\"\npublic = true\n\
                [invalidation]\nrescan_interval = \"200ms\"\n";
    let p = Pgtier::cached(&db, toml, &[]).await;
    let alice = connect_as(&p, &db, "hc_alice").await;
    let bob = connect_as(&p, &db, "hc_bob").await;

    // Bob's role renders floats differently: a shared entry would be wrong for him.
    let q = "select x from public.f";
    assert_eq!(first(&alice, q).await, "0.3333333333333333");
    assert_eq!(first(&alice, q).await, "0.3333333333333333");
    assert_eq!(first(&bob, q).await, "0.333333333333");
    never_cached(&p, &alice, q, "public_role_settings").await;

    // Per-user entries are cached, and follow a search_path given to the role.
    let q = "select v from items";
    warm(&p, &alice, q, "public").await;
    d.batch_execute("alter role hc_alice in database hc_rolecfg set search_path = hc_alt, public")
        .await
        .unwrap();
    let later = connect_as(&p, &db, "hc_alice").await;
    until(&later, q, "alt").await;
    warm(&p, &later, q, "alt").await;
}

#[tokio::test]
async fn case_04_views_with_volatile_bodies_are_not_cached() {
    let db = fresh_db("hc_views").await;
    let d = direct(&db).await;
    d.batch_execute(
        "create table promos(id int, until timestamptz);
         insert into promos values (1, now() + interval '1 hour'), (2, now() - interval '1 hour');
         create view active as select id from promos where until > now();
         create view all_promos as select id from promos;
         create view clock as select now() as t;
         create table prices(id int, p int); insert into prices values (1, 10);
         create function price_of(int) returns int stable language sql
           as 'select p from prices where id = $1';
         create view priced as select id, price_of(id) as p from promos where id = 1;
         create view nested as select * from priced;",
    )
    .await
    .unwrap();
    let p = Pgtier::cached(&db, TTL, &[]).await;
    let c = p.connect(&db).await;

    // A view without such calls is cached.
    warm(&p, &c, "select count(*) from all_promos", "2").await;

    never_cached(&p, &c, "select count(*) from active", "unsafe_view").await;
    never_cached(&p, &c, "select count(*) from clock", "unsafe_view").await;
    never_cached(&p, &c, "select p from priced", "unsafe_view").await;
    never_cached(&p, &c, "select p from nested", "unsafe_view").await;

    // The function reads a table the view does not name: still fresh.
    d.batch_execute("update prices set p = 11").await.unwrap();
    assert_eq!(first(&c, "select p from priced").await, "11");
    assert_eq!(first(&c, "select p from nested").await, "11");
}

#[tokio::test]
async fn case_04_tenant_views_are_not_shared() {
    let db = fresh_db("hc_tenant").await;
    let d = direct(&db).await;
    roles(&d).await;
    d.batch_execute(
        "create table docs(owner text, body text);
         insert into docs values ('hc_alice', 'alice doc'), ('hc_bob', 'bob doc');
         create view my_docs as select body from docs where owner = current_user;
         create view tenant_docs as select body from docs
           where owner = current_setting('hc.tenant', true);
         grant select on docs, my_docs, tenant_docs to hc_alice, hc_bob;
         alter role hc_alice in database hc_tenant set hc.tenant = 'hc_alice';
         alter role hc_bob in database hc_tenant set hc.tenant = 'hc_bob';",
    )
    .await
    .unwrap();
    let toml = "[cache]\ndefault_ttl = \"10m\"\n
[[cache.rules]]\ntable = \"public.my_docs\"\npublic = true\n
[[cache.rules]]\ntable = \"public.tenant_docs\"\npublic = true\n
[[cache.rules]]\ntable = \"public.docs\"\npublic = true\n";
    let p = Pgtier::cached(&db, toml, &[]).await;
    let alice = connect_as(&p, &db, "hc_alice").await;
    let bob = connect_as(&p, &db, "hc_bob").await;

    // Shared entries work for the table itself.
    warm(&p, &alice, "select count(*) from public.docs", "2").await;

    for q in [
        "select body from public.my_docs",
        "select body from public.tenant_docs",
    ] {
        assert_eq!(first(&alice, q).await, "alice doc");
        assert_eq!(first(&alice, q).await, "alice doc");
        assert_eq!(
            first(&bob, q).await,
            "bob doc",
            "{q}: another tenant's rows"
        );
        never_cached(&p, &alice, q, "unsafe_view").await;
    }
}

#[tokio::test]
async fn case_12_a_volatile_function_shadowing_a_builtin_is_not_cached() {
    let db = fresh_db("hc_shadow_fn").await;
    let d = direct(&db).await;
    d.batch_execute(
        "create sequence s;
         create table t(v text); insert into t values ('Abc');
         create function public.lower(int) returns text volatile language sql
           as 'select nextval(''s'')::text';
         create function count_calls(int8, int) returns int8 volatile language sql
           as 'select coalesce($1, 0) + nextval(''s'')';
         create aggregate tally(int) (sfunc = count_calls, stype = int8);",
    )
    .await
    .unwrap();
    let p = Pgtier::cached(&db, TTL, &[]).await;
    let c = p.connect(&db).await;
    warm(&p, &c, "select upper(v) from t", "ABC").await;
    let (a, b) = never_cached(&p, &c, "select lower(1)", "volatile_function|function_call").await;
    assert_ne!(a, b, "public.lower(int) is volatile");
    // The extended protocol resolves the same way (a fresh session: the first
    // one no longer uses the cache after calling a volatile function).
    let c = p.connect(&db).await;
    let before = p.metrics().await.hits();
    let one = |rows: Vec<tokio_postgres::Row>| rows[0].get::<_, String>(0);
    let a = one(c.query("select lower($1::int)", &[&1i32]).await.unwrap());
    let b = one(c.query("select lower($1::int)", &[&1i32]).await.unwrap());
    assert_ne!(a, b);
    assert_eq!(p.metrics().await.hits(), before);
    // An aggregate is marked immutable in pg_proc whatever its state function is.
    let c = p.connect(&db).await;
    let (a, b) = never_cached(
        &p,
        &c,
        "select tally(1) from t",
        "volatile_function|function_call",
    )
    .await;
    assert_ne!(a, b);
}

#[tokio::test]
async fn case_12_operators_and_casts_backed_by_volatile_functions_are_not_cached() {
    let db = fresh_db("hc_opcast").await;
    let d = direct(&db).await;
    d.batch_execute(
        "create sequence s;
         create table t(v int); insert into t values (1);
         create function bump(int, int) returns int volatile language sql
           as 'select nextval(''s'')::int';
         create operator ## (leftarg = int, rightarg = int, function = bump);
         create type boxed as (v int);
         create function box_of(int) returns boxed volatile language sql
           as 'select row(nextval(''s'')::int)::boxed';
         create cast (int as boxed) with function box_of(int);",
    )
    .await
    .unwrap();
    let p = Pgtier::cached(&db, TTL, &[]).await;
    let c = p.connect(&db).await;
    warm(&p, &c, "select v + 1 from t", "2").await;
    let (a, b) = never_cached(&p, &c, "select v ## 1 from t", "volatile_operator").await;
    assert_ne!(a, b);
    let (a, b) = never_cached(&p, &c, "select ((v::boxed)).v from t", "volatile_cast").await;
    assert_ne!(a, b);
}

#[tokio::test]
async fn case_12_session_and_catalog_reading_builtins_are_not_cached() {
    let db = fresh_db("hc_builtins").await;
    let d = direct(&db).await;
    roles(&d).await;
    d.batch_execute(
        "create table t(v int); insert into t values (1); grant select on t to hc_alice, hc_bob;",
    )
    .await
    .unwrap();
    let toml =
        "[cache]\ndefault_ttl = \"10m\"\n[[cache.rules]]\nquery = \"hc_shared\"\npublic = true\n";
    let p = Pgtier::cached(&db, toml, &[]).await;
    let alice = connect_as(&p, &db, "hc_alice").await;
    let bob = connect_as(&p, &db, "hc_bob").await;

    // The query rule shares entries; the session's user is not for sharing.
    let q = "select v, 'hc_shared' from public.t";
    warm(&p, &alice, q, "1").await;
    let before = p.metrics().await.hits();
    assert_eq!(first(&bob, q).await, "1");
    assert_eq!(p.metrics().await.hits() - before, 1.0);
    let q = "select getpgusername(), 'hc_shared'";
    never_cached(&p, &alice, q, "volatile").await;
    assert_eq!(first(&bob, q).await, "hc_bob");

    // A catalog lookup by name does not depend on the table it names.
    let c = p.connect(&db).await;
    let q = "select 't'::regclass::oid::int8 > 0, 't'::regclass::oid::int8";
    never_cached(&p, &c, q, "catalog_lookup").await;
    let oid = first(&d, "select 't'::regclass::oid::int8").await;
    d.batch_execute("drop table t; create table t(v int)")
        .await
        .unwrap();
    let new_oid = first(&d, "select 't'::regclass::oid::int8").await;
    assert_ne!(oid, new_oid);
    let got = c
        .simple_query("select 't'::regclass::oid::int8")
        .await
        .unwrap();
    assert_eq!(common::sql::texts(&got), vec![vec![Some(new_oid)]]);
}
