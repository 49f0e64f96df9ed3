//! The generated key-reporting function against the generic one it replaced
//! (pgtier-keys-v1, which built its queries with `EXECUTE`; its body is kept
//! here as the reference): both fire on the same random statements (inserts,
//! updates that move keys, deletes, NULLs, duplicates, statements over the row
//! bound, values over the byte bound), and every statement must make them send
//! the same notification, compared as parsed JSON.

mod common;

use std::time::Duration;

use futures_util::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls};

use common::{direct, fresh_db, require_postgres, PG_HOST, PG_PORT};
use pgtier::invalidation::catalog::Catalog;
use pgtier::invalidation::keyed;
use pgtier::invalidation::triggers::{self, Scope};

/// The generic function of the previous version, sending on channel `old`.
const OLD_FUNCTION: &str = r####"CREATE OR REPLACE FUNCTION pgtier.notify_keys_v1() RETURNS trigger LANGUAGE plpgsql AS $pgtier$
DECLARE
  nrows int8;
  i int;
  found int;
  wanted int;
  sel text;
  nonnull text;
  long text;
  too_long bool;
  size int8 := 0;
  xs text;
  ordered text;
  src text;
  vals json;
  sets text[] := '{}';
  payload text;
BEGIN
  -- pgtier-keys-v1. TG_ARGV[0] is the table's watch sequence (at 2 while some
  -- pgtier caches the table); TG_ARGV[1..] are the registered column sets, each
  -- a JSON array of column names (read from the trigger, not from
  -- pgtier.keys: see src/invalidation/keyed.rs). Not SECURITY DEFINER, like
  -- pgtier.notify_change().
  IF NOT coalesce(pg_sequence_last_value(TG_ARGV[0]::oid::regclass) > 1, false) THEN
    RETURN NULL;
  END IF;
  -- Count before aggregating: a large statement announces the whole table.
  IF TG_OP = 'INSERT' THEN
    SELECT count(*) INTO nrows FROM (SELECT FROM n LIMIT 1001) l;
  ELSE
    SELECT count(*) INTO nrows FROM (SELECT FROM o LIMIT 1001) l;
  END IF;
  IF nrows > 1000 THEN
    PERFORM pg_notify('old', 'w' || json_build_array(json_build_array(TG_TABLE_SCHEMA, TG_TABLE_NAME))::text);
    RETURN NULL;
  END IF;
  FOR i IN 1 .. TG_NARGS - 1 LOOP
    -- Values are cut to 7901 characters before anything else sees them: one
    -- that long is over the payload bound anyway, and a long key column must
    -- not make the aggregate large.
    SELECT string_agg(format('left(%I::text, 7901) AS x%s', a.c, a.k), ', ' ORDER BY a.k),
           string_agg(format('x%s IS NOT NULL', a.k), ' AND ' ORDER BY a.k),
           string_agg(format('octet_length(x%s) > 7900', a.k), ' OR ' ORDER BY a.k),
           string_agg(format('x%s', a.k), ', ' ORDER BY a.k),
           string_agg(format('x%s COLLATE "C"', a.k), ', ' ORDER BY a.k),
           count(t.attname), count(*)
      INTO sel, nonnull, long, xs, ordered, found, wanted
      FROM json_array_elements_text(TG_ARGV[i]::json) WITH ORDINALITY AS a(c, k)
      LEFT JOIN pg_attribute t ON t.attrelid = TG_RELID AND t.attname = a.c
                              AND t.attnum > 0 AND NOT t.attisdropped;
    IF found < wanted OR wanted = 0 THEN
      -- A registered column was renamed or dropped.
      PERFORM pg_notify('old', 'w' || json_build_array(json_build_array(TG_TABLE_SCHEMA, TG_TABLE_NAME))::text);
      RETURN NULL;
    END IF;
    src := CASE TG_OP WHEN 'INSERT' THEN format('SELECT %s FROM n', sel)
                      WHEN 'DELETE' THEN format('SELECT %s FROM o', sel)
                      ELSE format('SELECT %s FROM o UNION SELECT %s FROM n', sel, sel) END;
    EXECUTE format('SELECT coalesce(bool_or(%s), false),
                           json_agg(json_build_array(%s) ORDER BY %s) FILTER (WHERE NOT (%s))
                    FROM (SELECT DISTINCT * FROM (%s) s WHERE %s) d',
                   long, xs, ordered, long, src, nonnull)
      INTO too_long, vals;
    IF vals IS NOT NULL THEN
      sets := sets || json_build_array(TG_ARGV[i]::json, vals)::text;
      size := size + octet_length(sets[cardinality(sets)]);
    END IF;
    IF too_long OR size > 7900 THEN
      PERFORM pg_notify('old', 'w' || json_build_array(json_build_array(TG_TABLE_SCHEMA, TG_TABLE_NAME))::text);
      RETURN NULL;
    END IF;
  END LOOP;
  IF cardinality(sets) = 0 THEN
    RETURN NULL;
  END IF;
  payload := 'k[' || to_json(TG_TABLE_SCHEMA)::text || ',' || to_json(TG_TABLE_NAME)::text
             || ',[' || array_to_string(sets, ',') || ']]';
  IF octet_length(payload) > 7900 THEN
    payload := 'w' || json_build_array(json_build_array(TG_TABLE_SCHEMA, TG_TABLE_NAME))::text;
  END IF;
  PERFORM pg_notify('old', payload);
  RETURN NULL;
END
$pgtier$;"####;

/// (channel, payload) of every notification a listening connection receives.
async fn listen(db: &str) -> (Client, mpsc::UnboundedReceiver<(String, String)>) {
    let (client, mut conn) = tokio_postgres::connect(
        &format!("host={PG_HOST} port={PG_PORT} user=postgres dbname={db}"),
        NoTls,
    )
    .await
    .expect("listener connects");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let AsyncMessage::Notification(n) = m {
                let sent = (n.channel().to_string(), n.payload().to_string());
                if tx.send(sent).is_err() {
                    break;
                }
            }
        }
    });
    client
        .batch_execute("LISTEN ch; LISTEN old")
        .await
        .expect("listen");
    (client, rx)
}

/// A payload for comparing: `k` payloads parsed, others as they are.
fn parsed(p: &str) -> Value {
    match p.strip_prefix('k') {
        Some(json) => serde_json::from_str(json).unwrap_or_else(|e| panic!("{p}: {e}")),
        None => Value::String(p.to_string()),
    }
}

fn value(rng: &mut StdRng, domain: i32) -> String {
    match rng.gen_range(0..10) {
        0 => "NULL".to_string(),
        _ => rng.gen_range(0..domain).to_string(),
    }
}

/// `a`, a text key of its own set: sometimes quoted characters, sometimes
/// over the byte bound (alone in its set, so a NULL elsewhere in a tuple
/// cannot keep it out of one version's check and not the other's).
fn text(rng: &mut StdRng) -> String {
    match rng.gen_range(0..30) {
        0 => "NULL".to_string(),
        1 => "repeat('x', 8000)".to_string(),
        2 => "repeat('é', 3950)".to_string(),
        3 => "E'q\"u\\\\o''te'".to_string(),
        _ => format!("'t{}'", rng.gen_range(0..6)),
    }
}

fn statement(rng: &mut StdRng) -> String {
    match rng.gen_range(0..12) {
        0..=3 => {
            let rows: Vec<String> = (0..rng.gen_range(0..5))
                .map(|_| {
                    format!(
                        "({}, {}, {}, {})",
                        rng.gen_range(0..40),
                        text(rng),
                        value(rng, 4),
                        value(rng, 3)
                    )
                })
                .collect();
            if rows.is_empty() {
                "INSERT INTO d SELECT 1, 'x', 1, 1 WHERE false".to_string()
            } else {
                format!("INSERT INTO d VALUES {}", rows.join(", "))
            }
        }
        4..=6 => {
            let set = match rng.gen_range(0..4) {
                0 => format!("id = id + {}", rng.gen_range(1..3)),
                1 => format!("a = {}", text(rng)),
                2 => format!("b = {}, c = {}", value(rng, 4), value(rng, 3)),
                _ => "c = c".to_string(),
            };
            format!("UPDATE d SET {set} WHERE id % 7 = {}", rng.gen_range(0..7))
        }
        7..=8 => format!("DELETE FROM d WHERE id % 9 = {}", rng.gen_range(0..9)),
        9 => {
            "INSERT INTO d SELECT g % 50, 't' || g % 3, g % 4, NULL FROM generate_series(1, 1001) g"
                .to_string()
        }
        10 => "DELETE FROM d WHERE id >= 45".to_string(),
        _ => format!(
            "INSERT INTO d SELECT g, 'many', g, g FROM generate_series(1, {}) g",
            rng.gen_range(990..1001)
        ),
    }
}

#[tokio::test]
async fn the_generated_function_sends_what_the_generic_one_sent() {
    require_postgres();
    let db = "pgtier_keyfn_differential";
    fresh_db(db).await;
    let c = direct(db).await;
    c.batch_execute("CREATE TABLE d (id int4, a text, b int4, c int8)")
        .await
        .unwrap();
    triggers::install(&c, "ch", &Scope::default(), false, false)
        .await
        .expect("install");
    let oid: i64 = c
        .query_one("SELECT 'd'::regclass::oid::int8", &[])
        .await
        .unwrap()
        .get(0);
    let oid = oid as u32;
    assert_eq!(
        triggers::watch(&c, &[oid], Duration::from_secs(5))
            .await
            .unwrap(),
        [oid]
    );
    for set in [&["a"][..], &["b", "c"], &["id"]] {
        let catalog = Catalog::load(&c, 1).await.unwrap();
        let cols: Vec<String> = set.iter().map(|s| s.to_string()).collect();
        assert!(
            keyed::register(&c, "ch", &catalog, oid, &cols, Duration::from_secs(5))
                .await
                .unwrap()
        );
    }
    // The old function on triggers of its own, with the same arguments.
    c.batch_execute(OLD_FUNCTION).await.unwrap();
    let args: Vec<u8> = c
        .query_one(
            "SELECT tgargs FROM pg_trigger WHERE tgrelid = 'd'::regclass AND tgname = 'pgtier_keys_ins'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let args: Vec<String> = args
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| format!("'{}'", String::from_utf8_lossy(a).replace('\'', "''")))
        .collect();
    let args = args.join(", ");
    for (name, event, referencing) in [
        ("v1_ins", "INSERT", "NEW TABLE AS n"),
        ("v1_upd", "UPDATE", "OLD TABLE AS o NEW TABLE AS n"),
        ("v1_del", "DELETE", "OLD TABLE AS o"),
    ] {
        c.batch_execute(&format!(
            "CREATE TRIGGER {name} AFTER {event} ON d REFERENCING {referencing}
             FOR EACH STATEMENT EXECUTE FUNCTION pgtier.notify_keys_v1({args})"
        ))
        .await
        .unwrap();
    }

    let (_listener, mut rx) = listen(db).await;
    let seed: u64 = std::env::var("PGTIER_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("seed {seed} (PGTIER_SEED reruns it)");
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut keys, mut table, mut near_bound) = (0, 0, 0);
    for i in 0..300 {
        let sql = statement(&mut rng);
        c.batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        c.batch_execute(&format!("NOTIFY ch, 'marker {i}'"))
            .await
            .unwrap();
        let (mut new, mut old) = (Vec::new(), Vec::new());
        loop {
            let (channel, payload) = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("the marker within 5 s")
                .expect("listener alive");
            match channel.as_str() {
                "ch" if payload == format!("marker {i}") => break,
                "ch" if payload.starts_with('d') => {}
                "ch" => new.push((payload.clone(), parsed(&payload))),
                _ => old.push((payload.clone(), parsed(&payload))),
            }
        }
        let same = new.len() == old.len() && new.iter().zip(&old).all(|(n, o)| n.1 == o.1);
        if !same {
            // The generated function prints JSON without blanks: a payload
            // just under the byte bound may be one the old one sent as `w`.
            let [(raw, k)] = new.as_slice() else {
                panic!("statement {i} (seed {seed}): {sql}\n{new:?}\n{old:?}")
            };
            let blanks = k[2].as_array().map_or(0, |sets| {
                sets.iter()
                    .map(|s| {
                        let tuples = s[1].as_array().map_or(0, Vec::len);
                        1 + tuples * (1 + s[0].as_array().map_or(0, Vec::len))
                    })
                    .sum::<usize>()
            });
            assert!(
                old.len() == 1 && old[0].0.starts_with('w') && raw.len() + blanks > 7900,
                "statement {i} (seed {seed}): {sql}\n{new:?}\n{old:?}"
            );
            near_bound += 1;
        }
        keys += new.iter().filter(|p| p.1.is_array()).count();
        table += new.iter().filter(|p| p.1.is_string()).count();
    }
    println!("{keys} key payloads, {table} table-level ones, {near_bound} near the bound");
    assert!(keys > 50 && table > 5, "the statements cover both kinds");
}
