//! What a session's own role can change unseen, and what pgtier must still
//! key or refuse: the defaults a role sets for itself (a search_path that puts
//! its own functions before pg_catalog, `SET role`), a role's own functions
//! that call set_config(), `UPDATE pg_settings`, and objects an unqualified
//! CREATE makes temporary. Each case was a wrong or another session's result
//! before its fix.

mod common;

use common::sql::{first, warm};
use common::{direct, fresh_db, Pgtier};

const TTL: &str = "[cache]\ndefault_ttl = \"10m\"\n";

/// Roles are cluster-wide and tests of one binary run at once: each is
/// created unless it exists (name, attributes).
async fn roles(d: &tokio_postgres::Client, roles: &[(&str, &str)]) {
    for (name, attributes) in roles {
        d.batch_execute(&format!(
            "DO $$ BEGIN CREATE ROLE {name} {attributes}; \
             EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
        ))
        .await
        .unwrap();
    }
}

/// A role may set its own defaults, and pgtier reads the digest of a new
/// session's settings under them. One that renders floats its own way and
/// puts a schema of its own before `pg_catalog`, with an `md5` there answering
/// the digest of an ordinary session (and a `<>` that hides its settings from
/// the digest), must not be keyed as that session: an
/// ordinary session must never be served its rendering, even where a rule
/// shares the table's entries between users (and before pgtier's catalog
/// has seen that the role has settings, which stops such sharing).
#[tokio::test]
async fn case_24_a_role_cannot_forge_the_digest_of_its_settings() {
    let db = fresh_db("hs_forged_digest").await;
    let d = direct(&db).await;
    roles(&d, &[("hs_forger", "LOGIN"), ("hs_reader", "LOGIN")]).await;
    d.batch_execute(
        "create table public.f(x float8); insert into public.f values (1.0 / 3);
         grant select on public.f to public;
         create schema forger authorization hs_forger;",
    )
    .await
    .unwrap();
    let toml = format!(
        "{TTL}[[cache.rules]]\ntable = \"public.f\"\npublic = true\n[invalidation]\nrescan_interval = \"1h\"\n"
    );
    let p = Pgtier::cached(&db, &toml, &[]).await;
    let url = |port: u16, user: &str| format!("host=127.0.0.1 port={port} user={user} dbname={db}");
    // What an ordinary session's digest is (the query pgtier sends, qualified).
    let reader_direct = common::connect_str(&url(common::PG_PORT, "hs_reader")).await;
    let digest = first(
        &reader_direct,
        "SELECT pg_catalog.md5(pg_catalog.concat(pg_catalog.string_agg(\
           name OPERATOR(pg_catalog.||) '=' OPERATOR(pg_catalog.||) setting, ',' ORDER BY name), \
           CASE WHEN current_user OPERATOR(pg_catalog.<>) session_user \
             THEN ';current_user=' OPERATOR(pg_catalog.||) current_user END)) \
         FROM pg_catalog.pg_settings \
         WHERE source NOT IN ('default', 'override', 'client') \
           AND name NOT IN ('application_name', 'session_authorization', 'is_superuser')",
    )
    .await;
    let forger_direct = common::connect_str(&url(common::PG_PORT, "hs_forger")).await;
    forger_direct
        .batch_execute(&format!(
            "create function forger.md5(text) returns text language sql as $$ select '{digest}'::text $$;
             create function forger.ne(text, text) returns boolean language sql as
               $$ select $1 OPERATOR(pg_catalog.<>) $2
                     and $1 OPERATOR(pg_catalog.<>) ALL (ARRAY['extra_float_digits', 'search_path']) $$;
             create operator forger.<> (leftarg = text, rightarg = text, function = forger.ne);
             alter role hs_forger in database {db} set search_path = forger, pg_catalog, public;
             alter role hs_forger in database {db} set extra_float_digits = -3;"
        ))
        .await
        .unwrap();
    let q = "select x from public.f";
    let forger = common::connect_str(&url(p.port, "hs_forger")).await;
    for _ in 0..3 {
        assert_eq!(first(&forger, q).await, "0.333333333333");
    }
    let reader = common::connect_str(&url(p.port, "hs_reader")).await;
    for _ in 0..3 {
        assert_eq!(
            first(&reader, q).await,
            "0.3333333333333333",
            "served another role's rendering"
        );
    }
}

/// `ALTER ROLE ... SET role` makes a role's new sessions run as another role,
/// a setting `pg_settings` does not show. A session opened before it still
/// runs as the role itself: it must never be served what a newer session,
/// running as the other role, read.
#[tokio::test]
async fn case_25_a_role_set_by_default_is_keyed() {
    let db = fresh_db("hs_role_default_role").await;
    let d = direct(&db).await;
    roles(
        &d,
        &[("hs_alice7", "LOGIN NOINHERIT"), ("hs_bob7", "NOLOGIN")],
    )
    .await;
    d.batch_execute(&format!(
        "grant hs_bob7 to hs_alice7;
         alter role hs_alice7 in database {db} reset all;
         create table secret(id int primary key, v text);
         insert into secret values (1, 'bob only');
         grant select on secret to hs_bob7;"
    ))
    .await
    .unwrap();
    let p = Pgtier::cached(&db, TTL, &[]).await;
    let url = format!("host=127.0.0.1 port={} user=hs_alice7 dbname={db}", p.port);
    let old = common::connect_str(&url).await;
    d.batch_execute(&format!(
        "alter role hs_alice7 in database {db} set role = 'hs_bob7'"
    ))
    .await
    .unwrap();
    let new = common::connect_str(&url).await;
    assert_eq!(first(&new, "select current_user::text").await, "hs_bob7");
    let q = "select v from secret where id = 1";
    warm(&p, &new, q, "bob only").await;
    let err = old
        .simple_query(q)
        .await
        .expect_err("the old session runs as hs_alice7, who may not read secret");
    assert_eq!(
        err.as_db_error().map(|e| e.code().code()),
        Some("42501"),
        "{err}"
    );
    d.batch_execute(&format!("alter role hs_alice7 in database {db} reset all"))
        .await
        .unwrap();
}

/// With `pg_temp` first in the search_path, an unqualified CREATE TABLE makes
/// a temporary table, private to the session: its rows must never be served
/// to another session with the same settings, nor stay cached for its own.
#[tokio::test]
async fn case_26_an_unqualified_create_under_a_pg_temp_path_is_temporary() {
    let db = fresh_db("hs_pg_temp_first").await;
    direct(&db)
        .await
        .batch_execute(
            "create table t(id int primary key, v text); insert into t values (1, 'public row');",
        )
        .await
        .unwrap();
    let p = Pgtier::cached(&db, TTL, &[]).await;
    let a = p.connect(&db).await;
    a.batch_execute("set search_path = pg_temp, public")
        .await
        .unwrap();
    let q = "select v || '' from t where id = 1";
    warm(&p, &a, q, "public row").await;
    a.batch_execute("create table t(id int, v text); insert into t values (1, 'temp row of a')")
        .await
        .unwrap();
    for _ in 0..2 {
        assert_eq!(first(&a, q).await, "temp row of a");
    }
    a.batch_execute("update t set v = 'changed'").await.unwrap();
    assert_eq!(first(&a, q).await, "changed", "its own temporary table");
    let b = p.connect(&db).await;
    b.batch_execute("set search_path = pg_temp, public")
        .await
        .unwrap();
    assert_eq!(first(&b, q).await, "public row", "another session's table");
    assert!(p.metrics().await.bypasses("temporary_objects") >= 1.0);

    // The same path given to a role as its default (not seen by pgtier but
    // through the digest of the session's settings).
    let d = direct(&db).await;
    roles(&d, &[("hs_temp_path", "LOGIN")]).await;
    d.batch_execute(&format!(
        "grant select on t to hs_temp_path; grant create on schema public to hs_temp_path;
         alter role hs_temp_path in database {db} set search_path = pg_temp, public;"
    ))
    .await
    .unwrap();
    let url = format!(
        "host=127.0.0.1 port={} user=hs_temp_path dbname={db}",
        p.port
    );
    let c = common::connect_str(&url).await;
    warm(&p, &c, q, "public row").await;
    c.batch_execute("create table t(id int, v text); insert into t values (1, 'temp row of c')")
        .await
        .unwrap();
    for _ in 0..2 {
        assert_eq!(first(&c, q).await, "temp row of c");
    }
    let other = common::connect_str(&url).await;
    assert_eq!(
        first(&other, q).await,
        "public row",
        "another session's table"
    );
}

/// `UPDATE pg_settings` changes a setting through a rule that calls
/// set_config(): a session that does it no longer shares keys with sessions
/// whose output it no longer renders alike.
#[tokio::test]
async fn case_27_settings_changed_through_pg_settings_are_not_missed() {
    let db = fresh_db("hs_pg_settings_update").await;
    let d = direct(&db).await;
    roles(&d, &[("hs_mallory", "LOGIN"), ("hs_alice", "LOGIN")]).await;
    d.batch_execute(
        "create table items(id int primary key, b bytea);
         insert into items values (1, '\\x41');
         grant select on items to public;",
    )
    .await
    .unwrap();
    let toml = format!("{TTL}[[cache.rules]]\ntable = \"public.items\"\npublic = true\n");
    let p = Pgtier::cached(&db, &toml, &[]).await;
    let url = |user: &str| format!("host=127.0.0.1 port={} user={user} dbname={db}", p.port);
    let q = "select b::text from public.items where id = 1";
    let mallory = common::connect_str(&url("hs_mallory")).await;
    mallory
        .batch_execute("update pg_settings set setting = 'escape' where name = 'bytea_output'")
        .await
        .unwrap();
    for _ in 0..2 {
        assert_eq!(first(&mallory, q).await, "A");
    }
    let alice = common::connect_str(&url("hs_alice")).await;
    for _ in 0..2 {
        assert_eq!(
            first(&alice, q).await,
            "\\x41",
            "another session's rendering"
        );
    }
    assert!(p.metrics().await.bypasses("set_config") >= 1.0);
}

/// Postgres lets an IMMUTABLE function call set_config(). A role that calls
/// one of its own that does must not have what its session then reads shared
/// with other roles by a `public` rule.
#[tokio::test]
async fn case_28_a_roles_own_immutable_function_cannot_poison_shared_entries() {
    let db = fresh_db("hs_immutable_set_config").await;
    let d = direct(&db).await;
    roles(&d, &[("hs_mallory", "LOGIN"), ("hs_alice", "LOGIN")]).await;
    d.batch_execute(
        "create table items(id int primary key, b bytea);
         insert into items values (1, '\\x41');
         grant select on items to public;
         create schema m authorization hs_mallory;",
    )
    .await
    .unwrap();
    let url = |port: u16, user: &str| format!("host=127.0.0.1 port={port} user={user} dbname={db}");
    common::connect_str(&url(common::PG_PORT, "hs_mallory"))
        .await
        .batch_execute(
            "create function m.poison() returns text immutable language sql as
               $$ select pg_catalog.set_config('bytea_output', 'escape', false) $$",
        )
        .await
        .unwrap();
    let toml = format!("{TTL}[[cache.rules]]\ntable = \"public.items\"\npublic = true\n");
    let p = Pgtier::cached(&db, &toml, &[]).await;
    let q = "select b::text from public.items where id = 1";
    let mallory = common::connect_str(&url(p.port, "hs_mallory")).await;
    assert_eq!(first(&mallory, "select m.poison()").await, "escape");
    for _ in 0..2 {
        assert_eq!(first(&mallory, q).await, "A");
    }
    let alice = common::connect_str(&url(p.port, "hs_alice")).await;
    for _ in 0..2 {
        assert_eq!(first(&alice, q).await, "\\x41", "another role's rendering");
    }
    // Entries stay shared between roles that ran no code of their own.
    roles(&d, &[("hs_carol", "LOGIN")]).await;
    let carol = common::connect_str(&url(p.port, "hs_carol")).await;
    let before = p.metrics().await.hits();
    assert_eq!(first(&carol, q).await, "\\x41");
    assert!(p.metrics().await.hits() > before, "alice's entry, shared");
}
