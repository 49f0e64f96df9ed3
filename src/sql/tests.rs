//! Unit tests of statement analysis: verdicts, session effects, writes.

use super::*;

fn read(sql: &str) -> Result<Read, NotCacheable> {
    analyze(sql).read
}

fn t(schema: Option<&str>, name: &str) -> TableRef {
    TableRef {
        schema: schema.map(str::to_string),
        name: name.to_string(),
    }
}

#[test]
fn plain_selects_are_cacheable_with_their_tables() {
    let r = read(
        "select a, lower(b) from public.accounts a join branches b using (bid) where aid = $1",
    )
    .unwrap();
    assert_eq!(
        r.tables,
        vec![t(None, "branches"), t(Some("public"), "accounts")]
    );
    assert!(r.user_functions.is_empty());
    assert!(read("TABLE accounts").is_ok());
    assert!(read("values (1), (2)").is_ok());
    let r = read("with x as (select * from t) select * from x").unwrap();
    assert_eq!(r.tables, vec![t(None, "t"), t(None, "x")]);
    assert_eq!(r.ctes, vec!["x".to_string()]);
    assert!(read("select count(*) from generate_series(1, 10)").is_ok());
}

#[test]
fn volatile_and_unsafe_reads_are_not() {
    let v = |s: &str| read(s).unwrap_err();
    assert!(matches!(v("select now()"), NotCacheable::Volatile(_)));
    assert!(matches!(v("select random()"), NotCacheable::Volatile(_)));
    assert!(matches!(
        v("select * from t limit (random() * 10)::int"),
        NotCacheable::Volatile(_)
    ));
    assert!(matches!(
        v("values (nextval('s'))"),
        NotCacheable::Volatile(_)
    ));
    assert!(matches!(
        v("select current_timestamp"),
        NotCacheable::Volatile(_)
    ));
    assert!(matches!(
        v("select current_user"),
        NotCacheable::Volatile(_)
    ));
    assert_eq!(v("select * from t for update"), NotCacheable::Locking);
    assert_eq!(v("select * into x from t"), NotCacheable::SelectInto);
    assert_eq!(
        v("with d as (delete from t returning *) select * from d"),
        NotCacheable::DataModifying
    );
    assert_eq!(v("select * from pg_class"), NotCacheable::SystemCatalog);
    assert_eq!(
        v("select * from information_schema.tables"),
        NotCacheable::SystemCatalog
    );
    assert_eq!(v("select 'now'::timestamptz"), NotCacheable::TimeLiteral);
    assert_eq!(
        v("select 'today 10:00'::timestamp"),
        NotCacheable::TimeLiteral
    );
    assert_eq!(
        v("select timestamptz 'Tomorrow 01:00 UTC'"),
        NotCacheable::TimeLiteral
    );
    assert!(read("select 'nowhere'::text").is_ok());
    assert_eq!(
        v("select * from t tablesample bernoulli (10)"),
        NotCacheable::TableSample
    );
    assert_eq!(v("select 1; select 2"), NotCacheable::MultiStatement);
    assert_eq!(v("insert into t values (1)"), NotCacheable::NotASelect);
    assert_eq!(v("selec 1"), NotCacheable::ParseError);
    assert!(
        matches!(read("select my_func(1)").unwrap().user_functions.as_slice(), [f] if f == "my_func")
    );
    assert_eq!(v("select 't'::regclass"), NotCacheable::CatalogLookup);
    assert_eq!(v("select regclass 't'"), NotCacheable::CatalogLookup);
    assert_eq!(
        v("select cast('=' as pg_catalog.regoper)"),
        NotCacheable::CatalogLookup
    );
    assert!(matches!(
        v("select getpgusername()"),
        NotCacheable::Volatile(_)
    ));
    assert!(matches!(
        v("select mxid_age('1')"),
        NotCacheable::Volatile(_)
    ));
}

#[test]
fn functions_operators_and_casts_are_collected_for_the_catalog() {
    let r = read(
        "select lower(a), b::text from t where a @> b and c in (1, 2) \
         and d operator(app.===) e order by f using > limit abs(a - 1)",
    )
    .unwrap();
    assert_eq!(r.functions, vec!["abs".to_string(), "lower".to_string()]);
    assert!(r.user_functions.is_empty());
    assert_eq!(r.operators, vec!["-", "=", ">", "@>", "app.==="]);
    assert!(r.casts);
    assert_eq!(r.cast_types, vec!["text".to_string()]);
    assert!(!read("select a from t").unwrap().casts);
}

#[test]
fn session_effects_are_found() {
    let e = |s: &str| analyze(s).effects;
    assert!(
        matches!(e("set search_path = app, public").as_slice(), [SessionEffect::Set { name, .. }] if name == "search_path")
    );
    assert!(e("set local search_path = app").is_empty());
    assert_eq!(
        e("set local synchronous_commit = off"),
        vec![SessionEffect::Taint(
            BypassReason::SettingChangedInTransaction
        )],
        "its commit may not be flushed when the fence asks where WAL is"
    );
    assert_eq!(
        e("reset timezone"),
        vec![SessionEffect::Reset {
            name: "timezone".into()
        }]
    );
    assert_eq!(e("reset all"), vec![SessionEffect::ResetAll]);
    assert_eq!(
        e("set role app"),
        vec![SessionEffect::Taint(BypassReason::RoleChange)]
    );
    assert_eq!(
        e("set session authorization app"),
        vec![SessionEffect::Taint(BypassReason::RoleChange)]
    );
    assert_eq!(
        e("select set_config('search_path', 'x', false)"),
        vec![SessionEffect::Taint(BypassReason::SetConfig)]
    );
    assert_eq!(
        e("create temp table x (a int)"),
        vec![SessionEffect::Taint(BypassReason::TemporaryObjects)]
    );
    for sql in [
        "create table x (a int)",
        "create table x as select 1",
        "select 1 into x",
        "create view x as select 1",
        "create sequence x",
        "create type x as (a int)",
        "create type x as enum ('a')",
        "create type x as range (subtype = int4)",
        "create domain x as int",
    ] {
        assert_eq!(e(sql), vec![SessionEffect::CreatesUnqualified], "{sql}");
        let qualified = sql.replacen(" x", " public.x", 1);
        assert_eq!(e(&qualified), vec![], "{qualified}");
    }
    for sql in [
        "update pg_settings set setting = 'escape' where name = 'bytea_output'",
        "update pg_catalog.pg_settings set setting = '1' where name = 'extra_float_digits'",
    ] {
        assert_eq!(
            e(sql),
            vec![SessionEffect::Taint(BypassReason::SetConfig)],
            "{sql}"
        );
    }
    assert_eq!(e("discard all"), vec![SessionEffect::DiscardAll]);
    assert_eq!(e("deallocate all"), vec![SessionEffect::Deallocate(None)]);
    assert_eq!(
        e("deallocate s1"),
        vec![SessionEffect::Deallocate(Some("s1".into()))]
    );
    // same value spelled the same way renders the same
    assert_eq!(e("SET TimeZone = 'UTC'"), e("set timezone to 'UTC'"));
}

#[test]
fn time_words_built_at_run_time_are_not_cacheable() {
    let v = |s: &str| read(s).unwrap_err();
    assert_eq!(v("select ('to'||'day')::date"), NotCacheable::TimeCast);
    assert_eq!(v("select d::timestamptz from t"), NotCacheable::TimeCast);
    assert_eq!(
        v("select cast(d as timestamp with time zone) from t"),
        NotCacheable::TimeCast
    );
    assert_eq!(v("select date(d) from t"), NotCacheable::TimeCast);
    assert!(matches!(
        v("select date_in(textout(d)) from t"),
        NotCacheable::Volatile(_)
    ));
    // Values fixed by the request are checked where they are known.
    assert!(read("select '2024-01-01'::date").is_ok());
    assert!(read("select $1::date").is_ok());
    assert!(read("select $1::text::timestamptz").is_ok());
    assert!(read("select d::text from t").is_ok());
    assert_eq!(v("select 'items'::regclass"), NotCacheable::CatalogLookup);
}

#[test]
fn session_private_code_and_objects_taint() {
    let e = |s: &str| analyze(s).effects;
    let temp = vec![SessionEffect::Taint(BypassReason::TemporaryObjects)];
    assert_eq!(e("create table pg_temp.t (a int)"), temp);
    assert_eq!(e("create view pg_temp.v as select 1"), temp);
    assert_eq!(
        e("create function pg_temp.f() returns int language sql as 'select 1'"),
        temp
    );
    assert_eq!(
        e("do $$ begin perform set_config('search_path', 'x', false); end $$"),
        vec![SessionEffect::Taint(BypassReason::DoBlock)]
    );
    assert_eq!(
        e("call p(1)"),
        vec![SessionEffect::Taint(BypassReason::ProcedureCall)]
    );
    assert!(e("select * from pg_temp.t").is_empty());
    assert_eq!(
        e("create table t (a int)"),
        vec![SessionEffect::CreatesUnqualified],
        "temporary if pg_temp comes first in the search_path"
    );
}

#[test]
fn user_function_calls_make_a_statement_a_possible_write() {
    let a = analyze("select now(), write_fn()");
    assert!(a.read.is_err());
    assert!(a.may_write);
    assert_eq!(a.calls, vec!["write_fn".to_string()]);
    let a = analyze("insert into t values (my_default())");
    assert_eq!(a.calls, vec!["my_default".to_string()]);
    let a = analyze("select lower(name), count(*), now() from t group by 1");
    // built-ins the catalog vets (a user function may shadow them), no write
    assert_eq!(a.calls, vec!["count".to_string(), "lower".to_string()]);
    assert!(!a.may_write);
}

#[test]
fn writes_are_found() {
    let a = analyze("update public.accounts set x = 1; delete from b; truncate c, d; alter table e add column z int; drop table f");
    assert!(a.may_write);
    let names: Vec<String> = a.writes.iter().map(|t| t.to_string()).collect();
    assert_eq!(names, vec!["b", "c", "d", "e", "f", "public.accounts"]);
    assert!(!analyze("select 1").may_write);
    assert!(analyze("select my_func()").may_write);
}

#[test]
fn plain_row_writes_are_told_from_other_writes() {
    for sql in [
        "update t set v = v + 1 where id = 1",
        "insert into t select * from u; delete from t where id = 2",
        "with x as (delete from t returning *) insert into u select * from x",
        "merge into t using u on t.id = u.id when matched then delete",
    ] {
        assert!(analyze(sql).plain_dml, "{sql}");
    }
    for sql in [
        "select 1",
        "update t set v = my_func()",
        "update t set v = 1; truncate u",
        "alter table t add column z int",
        "create or replace function f() returns int language sql as 'select 1'",
        "select my_func()",
        "update t set v = 1; select 1",
        "not sql at all",
    ] {
        assert!(!analyze(sql).plain_dml, "{sql}");
    }
}

#[test]
fn role_changes_are_found() {
    for sql in [
        "revoke readers from alice",
        "grant readers to alice",
        "alter role alice nobypassrls",
        "drop role alice",
    ] {
        assert!(analyze(sql).roles_changed, "{sql}");
        assert!(analyze(sql).may_write, "{sql}");
    }
    assert!(!analyze("grant select on t to alice").roles_changed);
    assert!(!analyze("select 1").roles_changed);
}

#[test]
fn key_lookups_only_for_reads_of_one_table() {
    let k = analyze("select * from t where a = $1 and b = $2 and $2 > 0").keys;
    let cols: Vec<String> = k
        .expect("a")
        .columns
        .into_iter()
        .map(|c| c.column)
        .collect();
    assert_eq!(cols, ["a"], "b's parameter is also used elsewhere");
    assert!(
        analyze("select abalance from pgbench_accounts where aid = $1")
            .keys
            .is_ok()
    );
    for sql in [
        "select * from t where id = $1 and x in (select y from u)",
        "select * from t where id = $1 and x > (select avg(x) from t)",
        "with c as (select 1) select * from t where id = $1",
        "update t set x = 1 where id = $1",
        "select $1::float8 from t where id = $1",
        "select * from t where id = $1 and x = $1",
        "select * from t where id in ($1, $1)",
        "select * from t where id = any($1) and x = $1",
        "select * from t where id = any($1) and id = any($1)",
    ] {
        assert!(analyze(sql).keys.is_err(), "{sql}");
    }
}
