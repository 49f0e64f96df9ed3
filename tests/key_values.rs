//! Value identity for key-level invalidation (issue 14), checked against the
//! server: for random values of every supported type, in every spelling a
//! request may use (a quoted literal, a cast literal, a binary parameter),
//! pgtier's canonical rendering (`sql::keyvalue`) must be exactly what
//! Postgres prints for the value it reads (`::text`), which is what a write
//! reports; and a spelling Postgres refuses must not be rendered at all.
//! Arrays (`= ANY(...)`) likewise, element by element, in text and binary
//! form; and text keys written as SQL literals (`'...'`, `E'...'` with every
//! escape, `U&'...'`), as pgtier's parser reads them against the server. Last,
//! the whole path of a literal (parsed, typed by the column or a cast,
//! rendered, hashed to its key slot) against what the server compares.

mod common;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use bytes::BytesMut;
use common::direct;
use pgtier::invalidation::key_deps::{key_slots, KeyPlan, NoParams};
use pgtier::invalidation::Generations;
use pgtier::sql::keys::KeyValue;
use pgtier::sql::keyvalue::{
    array_from_binary, array_from_text, from_binary, from_text, KeyType, Refusal,
};
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};
use tokio_postgres::Client;

const TYPES: [(KeyType, &str); 6] = [
    (KeyType::Int2, "int2"),
    (KeyType::Int4, "int4"),
    (KeyType::Int8, "int8"),
    (KeyType::Text, "text"),
    (KeyType::Uuid, "uuid"),
    (KeyType::Bool, "bool"),
];

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// What Postgres prints for `spelling` read as `ty`, or None if it refuses it.
async fn server_reads(c: &Client, spelling: &str, ty: &str) -> Option<String> {
    let sql = format!("select ({})::{ty}::text", quote(spelling));
    match c.query_one(sql.as_str(), &[]).await {
        Ok(row) => Some(row.get(0)),
        Err(e) if e.as_db_error().is_some() => None,
        Err(e) => panic!("{sql}: {e}"),
    }
}

/// Spellings of one value of `ty` that Postgres may or may not accept.
fn spellings(rng: &mut StdRng, ty: KeyType) -> Vec<String> {
    let ws = [" ", "\t", "\n", "", "", ""];
    let pad = |rng: &mut StdRng, s: String| {
        format!(
            "{}{s}{}",
            ws[rng.gen_range(0..ws.len())],
            ws[rng.gen_range(0..ws.len())]
        )
    };
    match ty {
        KeyType::Int2 | KeyType::Int4 | KeyType::Int8 => {
            let v: i64 = match rng.gen_range(0..4) {
                0 => rng.gen_range(-40_000..40_000),
                1 => rng.gen_range(i32::MIN as i64 - 10..=i32::MAX as i64 + 10),
                2 => rng.gen(),
                _ => rng.gen_range(-9..10),
            };
            let zeros = "0".repeat(rng.gen_range(0..3));
            let digits = v.unsigned_abs().to_string();
            let sign = if v < 0 {
                "-"
            } else if rng.gen() {
                "+"
            } else {
                ""
            };
            vec![
                v.to_string(),
                pad(rng, format!("{sign}{zeros}{digits}")),
                format!("{v}.0"),
                format!("0x{digits}"),
                format!("{digits}_0"),
            ]
        }
        KeyType::Text => {
            let len = rng.gen_range(0..12);
            let pool = ['a', 'Z', ' ', '\'', '"', '\\', 'é', '€', '😀', '0', '-'];
            let s: String = (0..len)
                .map(|_| pool[rng.gen_range(0..pool.len())])
                .collect();
            vec![s]
        }
        KeyType::Uuid => {
            let b: [u8; 16] = rng.gen();
            let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
            let hyphens = format!(
                "{}-{}-{}-{}-{}",
                &hex[0..8],
                &hex[8..12],
                &hex[12..16],
                &hex[16..20],
                &hex[20..]
            );
            let every4: Vec<&str> = (0..8).map(|i| &hex[i * 4..i * 4 + 4]).collect();
            vec![
                hyphens.clone(),
                hyphens.to_uppercase(),
                format!("{{{hyphens}}}"),
                hex.clone(),
                every4.join("-"),
                format!(" {hyphens}"),
                format!("{hyphens}-"),
                hex[..31].to_string(),
            ]
        }
        KeyType::Bool => {
            let words = [
                "t", "tr", "true", "TRUE", "y", "yes", "on", "1", "f", "fal", "false", "n", "no",
                "of", "off", "0", "o", "2", "truth", "",
            ];
            let w = words[rng.gen_range(0..words.len())].to_string();
            vec![pad(rng, w)]
        }
    }
}

#[tokio::test]
async fn literal_spellings_render_as_postgres_prints_them() {
    let c = direct("postgres").await;
    let seed: u64 = rand::thread_rng().gen();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut agreed = 0;
    for _ in 0..150 {
        for (ty, name) in TYPES {
            for s in spellings(&mut rng, ty) {
                let ours = from_text(ty, s.as_bytes());
                let theirs = server_reads(&c, &s, name).await;
                match (&ours, &theirs) {
                    (Some(o), Some(t)) => {
                        assert_eq!(o, t, "seed {seed}: {name} {s:?}");
                        agreed += 1;
                    }
                    (Some(o), None) => {
                        panic!("seed {seed}: {name} {s:?}: rendered {o:?}, Postgres refuses it")
                    }
                    // Refusing what Postgres accepts only costs key-level
                    // invalidation (the statement stays table-level), but
                    // plain spellings must be understood.
                    (None, Some(t)) => assert!(
                        s != *t,
                        "seed {seed}: {name} {s:?}: Postgres prints it as is, pgtier refused it"
                    ),
                    (None, None) => {}
                }
            }
        }
    }
    assert!(agreed > 1000, "only {agreed} spellings compared");
}

#[tokio::test]
async fn binary_parameters_render_as_postgres_prints_them() {
    let c = direct("postgres").await;
    let seed: u64 = rand::thread_rng().gen();
    let mut rng = StdRng::seed_from_u64(seed);
    for _ in 0..300 {
        let v16: i16 = rng.gen();
        let v32: i32 = rng.gen();
        let v64: i64 = rng.gen();
        let b: bool = rng.gen();
        let text: String = (0..rng.gen_range(0..8))
            .map(|_| char::from_u32(rng.gen_range(0x20..0x2FFF)).unwrap_or('x'))
            .collect();
        let row = c
            .query_one(
                "select $1::int2::text, $2::int4::text, $3::int8::text, $4::bool::text, $5::text",
                &[&v16, &v32, &v64, &b, &text],
            )
            .await
            .expect("query");
        let theirs: Vec<String> = (0..5).map(|i| row.get(i)).collect();
        let ours = [
            from_binary(KeyType::Int2, &v16.to_be_bytes()),
            from_binary(KeyType::Int4, &v32.to_be_bytes()),
            from_binary(KeyType::Int8, &v64.to_be_bytes()),
            from_binary(KeyType::Bool, &[u8::from(b)]),
            from_binary(KeyType::Text, text.as_bytes()),
        ];
        for (o, t) in ours.iter().zip(&theirs) {
            assert_eq!(o.as_deref(), Some(t.as_str()), "seed {seed}");
        }
        // uuid: its 16 bytes, as Postgres prints the uuid made of them.
        let u: [u8; 16] = rng.gen();
        let theirs: String = c
            .query_one(
                "select encode($1::bytea, 'hex')::uuid::text",
                &[&u.as_slice()],
            )
            .await
            .expect("uuid")
            .get(0);
        assert_eq!(
            from_binary(KeyType::Uuid, &u).as_deref(),
            Some(theirs.as_str()),
            "seed {seed}"
        );
    }
}

/// What Postgres reads the elements of array `value` (a text-form literal, or
/// binary bytes) of `ty` as, or None if it refuses it.
async fn server_elements(c: &Client, value: &Value, ty: &str) -> Option<Vec<Option<String>>> {
    let sql = format!("select x::text from unnest($1::{ty}[]) with ordinality u(x, n) order by n");
    let res = match value {
        Value::Text(s) => {
            let sql = sql.replace("$1", &quote(s));
            c.query(sql.as_str(), &[]).await
        }
        Value::Binary(b) => c.query(sql.as_str(), &[&Raw(b.clone())]).await,
    };
    match res {
        Ok(rows) => Some(rows.iter().map(|r| r.get(0)).collect()),
        Err(e) if e.as_db_error().is_some() => None,
        Err(e) => panic!("{sql}: {e}"),
    }
}

enum Value {
    Text(String),
    Binary(Vec<u8>),
}

/// Bytes sent as a binary parameter of whatever type the server wants.
#[derive(Debug)]
struct Raw(Vec<u8>);

impl ToSql for Raw {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(&self.0);
        Ok(IsNull::No)
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// An array literal of some spellings of `ty`: elements quoted or not, with
/// whitespace, sometimes a NULL or something malformed.
fn array_spelling(rng: &mut StdRng, ty: KeyType) -> String {
    let ws = [" ", "\t", "", "", ""];
    let w = |rng: &mut StdRng| ws[rng.gen_range(0..ws.len())];
    let n = rng.gen_range(0..4);
    let mut items = Vec::new();
    for _ in 0..n {
        let s = spellings(rng, ty).swap_remove(0);
        let item = match rng.gen_range(0..10) {
            0 => "NULL".to_string(),
            1 => "\"NULL\"".to_string(),
            2..=4 => s,
            _ => format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")),
        };
        items.push(format!("{}{item}{}", w(rng), w(rng)));
    }
    let tail = ["", "", "", " ", ",", "}", "x"][rng.gen_range(0..7)];
    format!("{}{{{}}}{tail}", w(rng), items.join(","))
}

/// A binary array of random values of `ty` (element type `oid`), sometimes
/// with a NULL element, a wrong element type or stray bytes.
fn binary_array(rng: &mut StdRng, ty: KeyType, oid: u32) -> Vec<u8> {
    let n = rng.gen_range(0..4);
    let element = if rng.gen_range(0..10) == 0 { 25 } else { oid };
    let mut b = Vec::new();
    for v in [1, 0, element as i32, n, rng.gen_range(-1..3)] {
        b.extend_from_slice(&v.to_be_bytes());
    }
    for _ in 0..n {
        let v: Vec<u8> = match ty {
            KeyType::Int2 => rng.gen::<i16>().to_be_bytes().to_vec(),
            KeyType::Int4 => rng.gen::<i32>().to_be_bytes().to_vec(),
            KeyType::Int8 => rng.gen::<i64>().to_be_bytes().to_vec(),
            KeyType::Bool => vec![rng.gen_range(0..3)],
            KeyType::Uuid => rng.gen::<[u8; 16]>().to_vec(),
            KeyType::Text => spellings(rng, ty).swap_remove(0).into_bytes(),
        };
        if rng.gen_range(0..12) == 0 {
            b.extend_from_slice(&(-1i32).to_be_bytes());
        } else {
            b.extend_from_slice(&(v.len() as i32).to_be_bytes());
            b.extend_from_slice(&v);
        }
    }
    if rng.gen_range(0..15) == 0 {
        b.push(0);
    }
    b
}

#[tokio::test]
async fn arrays_render_element_by_element_as_postgres_reads_them() {
    let c = direct("postgres").await;
    let seed: u64 = rand::thread_rng().gen();
    let mut rng = StdRng::seed_from_u64(seed);
    let oids = [21, 23, 20, 25, 2950, 16];
    let mut agreed = 0;
    for _ in 0..120 {
        for ((ty, name), oid) in TYPES.into_iter().zip(oids) {
            for binary in [false, true] {
                let (value, ours) = if binary {
                    let b = binary_array(&mut rng, ty, oid);
                    let ours = array_from_binary(ty, &b, 64);
                    (Value::Binary(b), ours)
                } else {
                    let s = array_spelling(&mut rng, ty);
                    let ours = array_from_text(ty, s.as_bytes(), 64);
                    (Value::Text(s), ours)
                };
                let shown = match &value {
                    Value::Text(s) => format!("{s:?}"),
                    Value::Binary(b) => format!("{b:?}"),
                };
                let theirs = server_elements(&c, &value, name).await;
                match (&ours, &theirs) {
                    (Ok(o), Some(t)) => {
                        let t: Vec<Option<&str>> = t.iter().map(Option::as_deref).collect();
                        let o: Vec<Option<&str>> = o.iter().map(|s| Some(s.as_str())).collect();
                        assert_eq!(o, t, "seed {seed}: {name}[] {shown}");
                        agreed += 1;
                    }
                    (Ok(o), None) => {
                        panic!("seed {seed}: {name}[] {shown}: rendered {o:?}, Postgres refuses it")
                    }
                    (Err(Refusal::Null), t) => assert!(
                        t.as_ref().is_none_or(|t| t.contains(&None)),
                        "seed {seed}: {name}[] {shown}: no NULL in {t:?}"
                    ),
                    (Err(_), _) => {}
                }
            }
        }
    }
    assert!(agreed > 300, "only {agreed} arrays compared");
}

/// `s` as an `E''` literal, each character spelled at random: as itself, or
/// as one of the escapes Postgres reads (`\\`, `\'`, `\n`, `\xHH`, octal,
/// `\uXXXX`, `\UXXXXXXXX`, the UTF-8 bytes one by one).
fn e_literal(rng: &mut StdRng, s: &str) -> String {
    let mut out = String::from("E'");
    for ch in s.chars() {
        let cp = ch as u32;
        let mut utf8 = [0u8; 4];
        let bytes = ch.encode_utf8(&mut utf8).as_bytes();
        match (ch, rng.gen_range(0..6)) {
            ('\'', 0) => out.push_str("''"),
            ('\'', _) => out.push_str("\\'"),
            ('\\', _) => out.push_str("\\\\"),
            ('\n', 0) => out.push_str("\\n"),
            ('\t', 0) => out.push_str("\\t"),
            (_, 1) => bytes
                .iter()
                .for_each(|b| out.push_str(&format!("\\x{b:02x}"))),
            (_, 2) => bytes
                .iter()
                .for_each(|b| out.push_str(&format!("\\{b:03o}"))),
            (_, 3) if cp <= 0xffff => out.push_str(&format!("\\u{cp:04x}")),
            (_, 4) => out.push_str(&format!("\\U{cp:08X}")),
            _ => out.push(ch),
        }
    }
    out.push('\'');
    out
}

/// `s` as a `U&''` literal, non-ASCII characters escaped.
fn unicode_literal(s: &str) -> String {
    let mut out = String::from("U&'");
    for ch in s.chars() {
        match ch {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            c if c.is_ascii() => out.push(c),
            c => out.push_str(&format!("\\+{:06X}", c as u32)),
        }
    }
    out.push('\'');
    out
}

#[tokio::test]
async fn text_literals_render_as_postgres_reads_them() {
    let c = direct("postgres").await;
    let seed: u64 = rand::thread_rng().gen();
    let mut rng = StdRng::seed_from_u64(seed);
    let pool = [
        'a', 'Z', ' ', '\'', '"', '\\', '\n', '\t', 'é', '€', '😀', '0', '{', ',', '%', '\u{7f}',
    ];
    let mut agreed = 0;
    for _ in 0..400 {
        let s: String = (0..rng.gen_range(0..10))
            .map(|_| pool[rng.gen_range(0..pool.len())])
            .collect();
        let plain = format!("'{}'", s.replace('\'', "''"));
        for lit in [plain, e_literal(&mut rng, &s), unicode_literal(&s)] {
            let sql = format!("select 1 from t where name = {lit}");
            let lookup = pgtier::sql::analyze(&sql).keys;
            let ours = match lookup.as_ref().map(|l| &l.columns[0].values[..]) {
                Ok(
                    [KeyValue::Literal {
                        text, quoted: true, ..
                    }],
                ) => from_text(KeyType::Text, text.as_bytes()),
                other => panic!("seed {seed}: {sql}: not a text key: {other:?}"),
            };
            let theirs: String = c
                .query_one(format!("select ({lit})::text").as_str(), &[])
                .await
                .unwrap_or_else(|e| panic!("seed {seed}: {lit}: {e}"))
                .get(0);
            assert_eq!(ours.as_deref(), Some(theirs.as_str()), "seed {seed}: {lit}");
            assert_eq!(theirs, s, "seed {seed}: {lit} spells {s:?}");
            agreed += 1;
        }
    }
    assert!(agreed >= 1200);
}

/// `column = <literal>` for literals quoted or not, cast or not (to every key
/// type, numeric and varchar): whenever pgtier keys the read, the key is the
/// value the server's `=` matches (`key::T = literal` holds), so a write of
/// that row bumps the slot the read depends on.
#[tokio::test]
async fn literal_comparisons_key_the_value_postgres_matches() {
    let c = direct("postgres").await;
    let seed: u64 = rand::thread_rng().gen();
    let mut rng = StdRng::seed_from_u64(seed);
    let casts = [
        "",
        "::int2",
        "::int4",
        "::int8",
        "::text",
        "::varchar",
        "::uuid",
        "::bool",
        "::numeric",
    ];
    let mut keyed = 0;
    for _ in 0..12 {
        for (ty, name) in TYPES {
            let mut raw = spellings(&mut rng, ty);
            raw.extend(["1e3", ".5", "7.0", "007", "true", "1"].map(String::from));
            for s in raw {
                let quoted = format!("'{}'", s.replace('\'', "''"));
                let bare = s.trim();
                let bare_ok = !bare.is_empty()
                    && bare
                        .chars()
                        .all(|ch| ch.is_ascii_alphanumeric() || ".+-".contains(ch));
                for cast in casts {
                    let mut forms = vec![format!("{quoted}{cast}")];
                    if bare_ok {
                        forms.push(format!("{bare}{cast}"));
                    }
                    for lit in forms {
                        let sql = format!("select 1 from t where c = {lit}");
                        let Ok(lookup) = pgtier::sql::analyze(&sql).keys else {
                            continue;
                        };
                        let plan = KeyPlan {
                            table_slot: 0,
                            whole_slot: 0,
                            schema: "s".into(),
                            table: "t".into(),
                            columns: vec![("c".into(), ty)],
                            values: vec![lookup.columns[0].values.clone()],
                        };
                        let Ok(ours) = key_slots("db", &plan, &NoParams, true) else {
                            continue;
                        };
                        // A literal the server refuses fails the statement
                        // (pgtier's parser knows newer spellings: `0x1F`).
                        if c.query_one(format!("select {lit}").as_str(), &[])
                            .await
                            .is_err()
                        {
                            continue;
                        }
                        // The value the server matches: the literal as the
                        // column's type, if `=` then holds.
                        let check = format!(
                            "select k, k::{name} = {lit} from (select ({lit})::{name}::text as k) x"
                        );
                        let row = match c.query_one(check.as_str(), &[]).await {
                            Ok(row) => row,
                            Err(e) => {
                                // An integer out of the column's range: no
                                // row ever matches, whatever its key.
                                let range = match ty {
                                    KeyType::Int2 => "-32768 and 32767",
                                    KeyType::Int4 => "-2147483648 and 2147483647",
                                    _ => {
                                        panic!("seed {seed}: {name} = {lit} keyed, the server: {e}")
                                    }
                                };
                                let out = format!("select ({lit})::numeric not between {range}");
                                let row = c.query_one(out.as_str(), &[]).await.expect("range");
                                assert!(row.get::<_, bool>(0), "seed {seed}: {name} = {lit}: {e}");
                                continue;
                            }
                        };
                        let (k, equal): (String, bool) = (row.get(0), row.get(1));
                        assert!(
                            equal,
                            "seed {seed}: {name} = {lit}: keyed, matches no {k:?}"
                        );
                        let slot = Generations::key_slot("db", "s", "t", &["c"], &[k.as_str()]);
                        assert_eq!(
                            ours,
                            [slot],
                            "seed {seed}: {name} = {lit}: key is not {k:?}"
                        );
                        keyed += 1;
                    }
                }
            }
        }
    }
    assert!(keyed > 150, "only {keyed} literals keyed");
}
