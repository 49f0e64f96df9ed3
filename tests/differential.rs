//! Randomized differential test: generated SELECT statements (projections,
//! parameterised filters, joins, views, aggregates, subqueries, DISTINCT, UNION,
//! CTEs, and some statements pgtier must not cache) are run straight against
//! Postgres and through pgtier, in text format (simple protocol) and in binary
//! format (extended protocol: prepared statements, one-shot `query`,
//! `query_typed`, and two pipelined at once). Two pgtier sessions share entries;
//! a third has SET different output settings (time zone, DateStyle, bytea_output,
//! ...) and is compared with a direct connection that has the same settings.
//! Column names, types, origins and every value must be identical, and so must
//! prepared statements' descriptions.
//!
//! Between rounds of reads, writes made directly to Postgres must show up through
//! pgtier once their invalidation has been processed (bounded polling), and writes
//! made through pgtier must be visible to the very next read of that session.
//!
//! The run is fully determined by its seed, printed at the start. Reproduce a
//! failure with `PGTIER_DIFF_SEED=<seed> cargo test --test differential -- --nocapture`.

mod common;

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use common::{direct, fresh_db, Pgtier};
use futures_util::TryStreamExt;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;
use tokio_postgres::types::{FromSql, ToSql, Type};
use tokio_postgres::{Client, Column, RowStream, SimpleQueryMessage, Statement};

const DEFAULT_SEED: u64 = 20_240_611;
/// How long a result may stay stale after a direct write before that is a failure.
const CONVERGE: Duration = Duration::from_secs(2);
/// Query templates generated up front (each gets one or two parameter sets).
const POOL: usize = 90;
/// Write/read rounds after the first read-only round.
const ROUNDS: usize = 12;
/// Instances from the pool re-read in each round (mostly cached, maybe stale).
const REREAD_PER_ROUND: usize = 30;
/// New templates added in each round.
const NEW_PER_ROUND: usize = 5;

// ---------------------------------------------------------------------------
// Values and results

/// Any column as its raw bytes (binary format through the extended protocol).
#[derive(Debug, PartialEq)]
struct Raw(Vec<u8>);

impl<'a> FromSql<'a> for Raw {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(raw.to_vec()))
    }
    fn accepts(_: &Type) -> bool {
        true
    }
}

/// Raw bytes rendered injectively: readable text when they are, hex otherwise
/// (with the decoded value in front for common binary types).
fn render_value(ty: &Type, b: &[u8]) -> String {
    if let Ok(s) = std::str::from_utf8(b) {
        if !s.chars().any(char::is_control) {
            return format!("t:{s:?}");
        }
    }
    let mut out = decoded(ty, b).map(|d| d + " ").unwrap_or_default();
    out.push_str("x:");
    for x in b {
        let _ = write!(out, "{x:02x}");
    }
    out
}

fn decoded(ty: &Type, b: &[u8]) -> Option<String> {
    fn show<'a, T: FromSql<'a> + std::fmt::Debug>(ty: &Type, b: &'a [u8]) -> Option<String> {
        T::from_sql(ty, b).ok().map(|v| format!("{v:?}"))
    }
    if *ty == Type::INT2 {
        show::<i16>(ty, b)
    } else if *ty == Type::INT4 {
        show::<i32>(ty, b)
    } else if *ty == Type::INT8 {
        show::<i64>(ty, b)
    } else if *ty == Type::FLOAT8 {
        show::<f64>(ty, b)
    } else if *ty == Type::BOOL {
        show::<bool>(ty, b)
    } else if *ty == Type::NUMERIC {
        show::<Decimal>(ty, b)
    } else if *ty == Type::DATE {
        show::<chrono::NaiveDate>(ty, b)
    } else if *ty == Type::TIMESTAMPTZ {
        show::<chrono::DateTime<chrono::Utc>>(ty, b)
    } else if *ty == Type::TIMESTAMP {
        show::<chrono::NaiveDateTime>(ty, b)
    } else {
        None
    }
}

/// A statement's full result as a client sees it.
#[derive(Clone, Debug, PartialEq)]
enum Outcome {
    Rows {
        /// Names (text format), or names with type, typmod and origin (binary
        /// format; known only when there is at least one row).
        columns: Vec<String>,
        rows: Vec<Vec<Option<String>>>,
        /// Row count of the CommandComplete tag.
        tag: Option<u64>,
    },
    /// SQLSTATE and message.
    Error(String),
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Error(e) => write!(f, "ERROR {e}"),
            Outcome::Rows { columns, rows, tag } => {
                writeln!(f, "columns: [{}]", columns.join(", "))?;
                writeln!(f, "{} row(s), CommandComplete rows: {tag:?}", rows.len())?;
                for r in rows {
                    let cells: Vec<&str> =
                        r.iter().map(|c| c.as_deref().unwrap_or("NULL")).collect();
                    writeln!(f, "  {}", cells.join(" | "))?;
                }
                Ok(())
            }
        }
    }
}

/// Where two outcomes first differ, in words.
fn first_difference(want: &Outcome, got: &Outcome) -> String {
    match (want, got) {
        (
            Outcome::Rows {
                columns: wc,
                rows: wr,
                tag: wt,
            },
            Outcome::Rows {
                columns: gc,
                rows: gr,
                tag: gt,
            },
        ) => {
            if wc != gc {
                return format!("columns differ: postgres {wc:?}, pgtier {gc:?}");
            }
            if wr.len() != gr.len() {
                return format!(
                    "row counts differ: postgres {}, pgtier {}",
                    wr.len(),
                    gr.len()
                );
            }
            if let Some(i) = (0..wr.len()).find(|&i| wr[i] != gr[i]) {
                return format!("row {i} differs: postgres {:?}, pgtier {:?}", wr[i], gr[i]);
            }
            format!("CommandComplete differs: postgres {wt:?}, pgtier {gt:?}")
        }
        _ => "one side is an error".into(),
    }
}

fn db_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{} {}", d.code().code(), d.message()),
        None => format!("(client-side) {e}"),
    }
}

fn column_text(c: &Column) -> String {
    format!(
        "{} {}({}) typmod={} table={:?} attnum={:?}",
        c.name(),
        c.type_().name(),
        c.type_().oid(),
        c.type_modifier(),
        c.table_oid(),
        c.column_id()
    )
}

/// A simple-protocol query's result (text format).
async fn simple(c: &Client, sql: &str) -> Outcome {
    let msgs = match c.simple_query(sql).await {
        Ok(m) => m,
        Err(e) => return Outcome::Error(db_error(&e)),
    };
    let mut columns = Vec::new();
    let mut rows = Vec::new();
    let mut tag = None;
    for m in &msgs {
        match m {
            SimpleQueryMessage::RowDescription(cols) => {
                columns = cols.iter().map(|c| c.name().to_string()).collect()
            }
            SimpleQueryMessage::Row(r) => {
                rows.push((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
            }
            SimpleQueryMessage::CommandComplete(n) => tag = Some(*n),
            _ => {}
        }
    }
    Outcome::Rows { columns, rows, tag }
}

/// An extended-protocol result (binary format), drained from its stream.
async fn collect(res: Result<RowStream, tokio_postgres::Error>) -> Outcome {
    let stream = match res {
        Ok(s) => s,
        Err(e) => return Outcome::Error(db_error(&e)),
    };
    let mut stream = std::pin::pin!(stream);
    let mut columns = Vec::new();
    let mut rows = Vec::new();
    loop {
        match stream.try_next().await {
            Ok(Some(row)) => {
                if rows.is_empty() {
                    columns = row.columns().iter().map(column_text).collect();
                }
                let cols = row.columns();
                rows.push(
                    (0..row.len())
                        .map(|i| {
                            row.get::<_, Option<Raw>>(i)
                                .map(|r| render_value(cols[i].type_(), &r.0))
                        })
                        .collect(),
                );
            }
            Ok(None) => break,
            Err(e) => return Outcome::Error(db_error(&e)),
        }
    }
    Outcome::Rows {
        columns,
        rows,
        tag: stream.rows_affected(),
    }
}

/// A prepared statement's description: parameter types and result columns.
fn describe(s: &Statement) -> String {
    let params: Vec<String> = s.params().iter().map(|t| t.name().to_string()).collect();
    let cols: Vec<String> = s.columns().iter().map(column_text).collect();
    format!(
        "params [{}] columns [{}]",
        params.join(", "),
        cols.join("; ")
    )
}

// ---------------------------------------------------------------------------
// Parameters and generated queries

const NAMES: &[&str] = &[
    "apple",
    "Banana",
    "cherry pie",
    "Zoë",
    "naïve café",
    "日本語テキスト",
    "emoji 🎉🚀",
    "O'Brien",
    r"back\slash",
    "MiXeD CaSe",
    "",
    "  spaced  ",
    "ΑΒΓ δέλτα",
    "straße",
    "ŁÓDŹ",
    "tab\there",
    "line\nbreak",
    "percent%sign",
    "under_score",
    "null",
];
const LIKES: &[&str] = &[
    "a%",
    "%e%",
    "Z%",
    "%🎉%",
    "日%",
    "%'%",
    "_a%",
    "%",
    r"%\%%",
    "%1",
    "%straße%",
    "%CaSe",
];
const TAGS: &[&str] = &["red", "green", "blue", "ünïcode", "x y", ""];
const LABELS: &[&str] = &[
    "fruit",
    "Gemüse",
    "日本",
    "tools & parts",
    "O'Reilly",
    "",
    "misc",
    "Ωmega",
    "ALL CAPS",
    "emoji 🍕",
];
const NOTES: &[&str] = &["fast", "slow", "gift 🎁", "ré-order", "bulk", "", "n/a"];
const NOTE_LIKES: &[&str] = &["f%", "%o%", "%🎁%", "r_%", "%", "b%"];
const JSON_STRINGS: &[&str] = &["naïve", "x", "日本", "🎉", r#"say \"hi\""#, ""];

/// Deterministic expressions whose evaluation pgtier must treat as uncacheable.
const VOLATILE: &[&str] = &[
    "random() < 2",
    "now() > timestamptz '2000-01-01 00:00:00+00'",
    "clock_timestamp() > timestamptz '2000-01-01 00:00:00+00'",
    "'now'::timestamptz > timestamptz '2000-01-01 00:00:00+00'",
    "current_user = 'postgres'",
    "exists (select 1 from pg_class where relname = 'items')",
    "pg_backend_pid() > 0",
    "statement_timestamp() is not null",
];

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[derive(Clone, Debug)]
enum Param {
    Int(Option<i32>),
    Text(Option<String>),
    Num(Option<Decimal>),
}

impl Param {
    fn ty(&self) -> Type {
        match self {
            Param::Int(_) => Type::INT4,
            Param::Text(_) => Type::TEXT,
            Param::Num(_) => Type::NUMERIC,
        }
    }

    fn as_sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            Param::Int(v) => v,
            Param::Text(v) => v,
            Param::Num(v) => v,
        }
    }

    /// The value as an SQL literal, for the simple-protocol variant.
    fn literal(&self) -> String {
        match self {
            Param::Int(Some(v)) => format!("({v})"),
            Param::Text(Some(s)) => quote(s),
            Param::Num(Some(d)) => format!("({d})"),
            _ => "NULL".into(),
        }
    }
}

/// What a parameter stands for, so that a second value set can be drawn.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Cat,
    Id,
    Small,
    Price,
    Name,
    Like,
    Tag,
    NoteLike,
}

impl Kind {
    fn cast(self) -> &'static str {
        match self {
            Kind::Cat | Kind::Id | Kind::Small => "int",
            Kind::Price => "numeric",
            Kind::Name | Kind::Like | Kind::Tag | Kind::NoteLike => "text",
        }
    }

    fn value(self, rng: &mut StdRng) -> Param {
        let null = rng.gen_bool(0.05);
        let text = |rng: &mut StdRng, xs: &[&str]| {
            Param::Text((!null).then(|| xs.choose(rng).unwrap().to_string()))
        };
        match self {
            Kind::Cat => Param::Int((!null).then(|| rng.gen_range(-1..=11))),
            Kind::Id => Param::Int((!null).then(|| rng.gen_range(0..=330))),
            Kind::Small => Param::Int((!null).then(|| rng.gen_range(0..=12))),
            Kind::Price => {
                Param::Num((!null).then(|| Decimal::new(rng.gen_range(-50_000..600_000), 2)))
            }
            Kind::Name => text(rng, NAMES),
            Kind::Like => text(rng, LIKES),
            Kind::Tag => text(rng, TAGS),
            Kind::NoteLike => text(rng, NOTE_LIKES),
        }
    }
}

/// One generated statement with one set of parameter values.
#[derive(Clone, Debug)]
struct Query {
    sql: String,
    params: Vec<(Kind, Param)>,
    /// Base tables it reads (views resolved by hand).
    tables: Vec<&'static str>,
    /// Contains something that makes it uncacheable.
    volatile: bool,
    /// Round it was last checked in.
    last_round: Option<usize>,
    /// Its (text, binary) results when last checked.
    last_result: Option<(Outcome, Outcome)>,
}

impl Query {
    /// The statement with its parameters replaced by literals.
    fn literal_sql(&self) -> String {
        let mut s = self.sql.clone();
        for (i, (_, p)) in self.params.iter().enumerate().rev() {
            s = s.replace(&format!("${}", i + 1), &p.literal());
        }
        s
    }

    fn params_text(&self) -> String {
        let ps: Vec<String> = self
            .params
            .iter()
            .enumerate()
            .map(|(i, (_, p))| format!("${} = {p:?}", i + 1))
            .collect();
        format!("[{}]", ps.join(", "))
    }

    fn with_new_values(&self, rng: &mut StdRng) -> Query {
        let mut q = self.clone();
        for (k, p) in &mut q.params {
            *p = k.value(rng);
        }
        q.last_round = None;
        q.last_result = None;
        q
    }
}

/// Builds one statement: parameters and tables are recorded as they are used.
struct Ctx<'r> {
    rng: &'r mut StdRng,
    params: Vec<(Kind, Param)>,
    tables: Vec<&'static str>,
}

impl Ctx<'_> {
    /// A new parameter of `kind`, as `$n::type`.
    fn p(&mut self, kind: Kind) -> String {
        let v = kind.value(self.rng);
        self.params.push((kind, v));
        format!("${}::{}", self.params.len(), kind.cast())
    }

    fn chance(&mut self, p: f64) -> bool {
        self.rng.gen_bool(p)
    }

    fn pick<'s>(&mut self, xs: &[&'s str]) -> &'s str {
        xs.choose(self.rng).unwrap()
    }

    fn n(&mut self, lo: i32, hi: i32) -> i32 {
        self.rng.gen_range(lo..=hi)
    }

    /// A table reference, spelled in one of several equivalent ways.
    fn table(&mut self, name: &'static str) -> String {
        self.tables.push(name);
        match self.rng.gen_range(0..10) {
            0 => format!("public.{name}"),
            1 => name.to_uppercase(),
            2 => format!("\"{name}\""),
            _ => name.to_string(),
        }
    }

    /// A view reference; records the view's base tables.
    fn view(&mut self, name: &'static str) -> String {
        match name {
            "item_cats" => self.tables.extend(["items", "cats"]),
            _ => self.tables.extend(["orders", "items"]),
        }
        if self.chance(0.2) {
            format!("public.{name}")
        } else {
            name.to_string()
        }
    }

    fn limit(&mut self) -> String {
        match self.rng.gen_range(0..10) {
            0 | 1 => format!(" limit {}", self.n(0, 40)),
            2 => format!(" limit {} offset {}", self.n(1, 30), self.n(0, 40)),
            3 => format!(" limit {}", self.p(Kind::Small)),
            4 => format!(
                " offset {} rows fetch first {} rows only",
                self.n(0, 20),
                self.n(1, 10)
            ),
            _ => String::new(),
        }
    }

    /// A boolean combination of up to `max` atoms, or nothing.
    fn predicate(&mut self, atom: fn(&mut Ctx) -> String, max: usize) -> Option<String> {
        let n = self.rng.gen_range(0..=max);
        if n == 0 {
            return None;
        }
        let mut s = atom(self);
        for _ in 1..n {
            let op = if self.chance(0.65) { "and" } else { "or" };
            let rhs = atom(self);
            s = format!("({s}) {op} {rhs}");
        }
        if self.chance(0.1) {
            s = format!("not ({s})");
        }
        Some(s)
    }
}

fn where_sql(pred: Option<String>, vol: Option<&str>) -> String {
    match (pred, vol) {
        (None, None) => String::new(),
        (Some(p), None) => format!(" where {p}"),
        (None, Some(v)) => format!(" where {v}"),
        (Some(p), Some(v)) => format!(" where ({p}) and {v}"),
    }
}

fn item_expr(cx: &mut Ctx, a: &str) -> String {
    match cx.rng.gen_range(0..42) {
        0 => format!("{a}.id"),
        1 => format!("{a}.cat"),
        2 => format!("{a}.price"),
        3 => format!("{a}.name"),
        4 => format!("{a}.created"),
        5 => format!("{a}.tags"),
        6 => format!("{a}.flag"),
        7 => format!("{a}.payload"),
        8 => format!("{a}.blob"),
        9 => format!("{a}.price * 2"),
        10 => format!("lower({a}.name)"),
        11 => format!("upper({a}.name) as up"),
        12 => format!("length({a}.name)"),
        13 => format!("coalesce({a}.name, '<none>') as nm"),
        14 => format!("coalesce({a}.cat, -1)"),
        15 => format!("{a}.price::text as price_text"),
        16 => format!("{a}.created::text"),
        17 => format!("{a}.id::text || ':' || coalesce({a}.name, '')"),
        18 => format!("{a}.payload->>'k' as k"),
        19 => format!("{a}.payload->'a'"),
        20 => format!("jsonb_typeof({a}.payload)"),
        21 => format!("{a}.tags[1] as first_tag"),
        22 => format!("cardinality({a}.tags)"),
        23 => format!("array_to_string({a}.tags, '|', '∅')"),
        24 => format!("encode({a}.blob, 'hex')"),
        25 => format!("octet_length({a}.blob)"),
        26 => format!("{a}.created::date as day"),
        27 => format!("extract(year from {a}.created) as yr"),
        28 => format!("to_char({a}.created, 'YYYY-MM-DD HH24:MI:SS')"),
        29 => format!("round({a}.price / 3, 4)"),
        30 => format!("abs({a}.price)"),
        31 => format!("{a}.flag is true as flagged"),
        32 => format!(
            "case when {a}.price > 1000 then 'high' when {a}.price < 0 then 'negative' else 'low' end as band"
        ),
        33 => format!("substr({a}.name, 2, 3)"),
        34 => format!("{a}.price + {} as shifted", cx.p(Kind::Price)),
        35 => format!("{a}.id * {} as scaled", cx.p(Kind::Small)),
        36 => format!("concat({a}.name, {}) as joined", cx.p(Kind::Name)),
        37 => format!("nullif({a}.cat, 3)"),
        38 => format!("{a}.created at time zone 'UTC' as utc"),
        39 => format!("{a}.created - timestamptz '2020-01-01 00:00:00+00' as since"),
        40 => format!("{a}.payload"),
        _ => format!("date_trunc('month', {a}.created)"),
    }
}

fn item_projection(cx: &mut Ctx, a: &str) -> String {
    let mut cols = Vec::new();
    if cx.chance(0.7) {
        cols.push(format!("{a}.id"));
    }
    if cx.chance(0.08) {
        cols.push(format!("{a}.*"));
    }
    for _ in 0..cx.n(1, 5) {
        cols.push(item_expr(cx, a));
    }
    cols.join(", ")
}

fn item_atom_with(cx: &mut Ctx, a: &str) -> String {
    match cx.rng.gen_range(0..24) {
        0 => format!("{a}.cat = {}", cx.p(Kind::Cat)),
        1 => format!(
            "{a}.cat in ({}, {}, {})",
            cx.n(-1, 11),
            cx.n(-1, 11),
            cx.n(-1, 11)
        ),
        2 => format!("{a}.cat in ({}, {})", cx.p(Kind::Cat), cx.p(Kind::Cat)),
        3 => format!(
            "{a}.price between {} and {}",
            cx.p(Kind::Price),
            cx.p(Kind::Price)
        ),
        4 => format!("{a}.price > {}", cx.p(Kind::Price)),
        5 => format!("{a}.name is null"),
        6 => format!("{a}.name is not null"),
        7 => format!("{a}.name like {}", cx.p(Kind::Like)),
        8 => format!("lower({a}.name) = lower({})", cx.p(Kind::Name)),
        9 => format!("{a}.id < {}", cx.p(Kind::Id)),
        10 => format!("{a}.id % {} = {}", cx.n(2, 9), cx.n(0, 1)),
        11 => format!("{a}.flag"),
        12 => format!("not coalesce({a}.flag, false)"),
        13 => format!("{a}.tags @> array[{}]::text[]", quote(cx.pick(TAGS))),
        14 => format!("{} = any({a}.tags)", cx.p(Kind::Tag)),
        15 => format!("{a}.payload ? 'k'"),
        16 => format!("({a}.payload->>'k')::int > {}", cx.n(0, 9)),
        17 => format!("{a}.created > timestamptz '2022-01-01 00:00:00+00'"),
        18 => format!("{a}.created::date between date '2021-01-01' and date '2022-06-30'"),
        19 => format!("{a}.blob is null"),
        20 => format!("{a}.price is distinct from {}", cx.p(Kind::Price)),
        21 => format!("({a}.cat is null or {a}.cat > {})", cx.p(Kind::Cat)),
        22 => format!("{a}.name ilike '%a%'"),
        _ => format!("{a}.id between {} and {}", cx.p(Kind::Id), cx.p(Kind::Id)),
    }
}

fn item_atom(cx: &mut Ctx) -> String {
    item_atom_with(cx, "i")
}

fn item_order(cx: &mut Ctx, a: &str) -> String {
    match cx.rng.gen_range(0..7) {
        0 => format!("{a}.id desc"),
        1 => format!("{a}.price desc nulls last, {a}.id"),
        2 => format!("{a}.name collate \"C\", {a}.id"),
        3 => format!("{a}.cat nulls first, {a}.id desc"),
        4 => format!("{a}.created, {a}.id"),
        _ => format!("{a}.id"),
    }
}

fn view_atom(cx: &mut Ctx) -> String {
    match cx.rng.gen_range(0..8) {
        0 => format!("v.cat = {}", cx.p(Kind::Cat)),
        1 => format!("v.price > {}", cx.p(Kind::Price)),
        2 => "v.label is null".into(),
        3 => format!("v.label like {}", cx.p(Kind::Like)),
        4 => "v.name is not null".into(),
        5 => format!("v.id < {}", cx.p(Kind::Id)),
        6 => format!(
            "v.price between {} and {}",
            cx.p(Kind::Price),
            cx.p(Kind::Price)
        ),
        _ => format!("v.label = {}", quote(cx.pick(LABELS))),
    }
}

fn order_atom(cx: &mut Ctx) -> String {
    match cx.rng.gen_range(0..9) {
        0 => format!("o.qty > {}", cx.p(Kind::Small)),
        1 => "o.placed >= date '2022-01-01'".into(),
        2 => format!("o.note like {}", cx.p(Kind::NoteLike)),
        3 => format!(
            "o.item_id in ({}, {}, {})",
            cx.p(Kind::Id),
            cx.p(Kind::Id),
            cx.p(Kind::Id)
        ),
        4 => "o.weight < 50.5".into(),
        5 => "o.ref is not null".into(),
        6 => "o.qty between 3 and 7".into(),
        7 => format!("o.item_id < {}", cx.p(Kind::Id)),
        _ => "o.weight = 'NaN'::float8 or o.weight is null".into(),
    }
}

fn order_expr(cx: &mut Ctx) -> String {
    cx.pick(&[
        "o.qty",
        "o.weight",
        "o.note",
        "o.placed",
        "o.ref",
        "o.item_id",
        "o.weight::text as wt",
        "o.placed - date '2020-01-01' as days",
        "upper(o.note)",
        "o.total_cents",
        "o.ref::text",
    ])
    .to_string()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Vol {
    None,
    /// `random() < 2` in the projection.
    Projection,
    ForUpdate,
    /// A volatile (but always true) conjunct in WHERE.
    Where,
}

/// A single-table read of `items`.
fn q_items(cx: &mut Ctx, vol: Vol) -> String {
    let t = cx.table("items");
    let mut proj = item_projection(cx, "i");
    if vol == Vol::Projection {
        proj.push_str(", random() < 2 as r");
    }
    let v = (vol == Vol::Where).then(|| cx.pick(VOLATILE));
    let w = where_sql(cx.predicate(item_atom, 3), v);
    let ord = item_order(cx, "i");
    let lim = cx.limit();
    let fu = if vol == Vol::ForUpdate {
        if cx.chance(0.5) {
            " for update"
        } else {
            " for share of i"
        }
    } else {
        ""
    };
    format!("select {proj} from {t} i{w} order by {ord}{lim}{fu}")
}

/// items joined to cats.
fn q_items_cats(cx: &mut Ctx, vol: Vol) -> String {
    let ti = cx.table("items");
    let tc = cx.table("cats");
    let join = cx.pick(&["join", "left join"]);
    let proj = item_projection(cx, "i");
    let extra = cx.pick(&[
        "c.label",
        "c.label, c.id as cid",
        "c.parent, c.label",
        "c.*",
    ]);
    let mut pred = cx.predicate(item_atom, 2);
    if cx.chance(0.4) {
        let c = match cx.rng.gen_range(0..3) {
            0 => format!("c.label like {}", cx.p(Kind::Like)),
            1 => "c.parent is null".into(),
            _ => format!("c.id > {}", cx.p(Kind::Cat)),
        };
        pred = Some(match pred {
            Some(p) => format!("({p}) and {c}"),
            None => c,
        });
    }
    let v = (vol == Vol::Where).then(|| cx.pick(VOLATILE));
    let w = where_sql(pred, v);
    let desc = if cx.chance(0.3) { " desc" } else { "" };
    let lim = cx.limit();
    format!("select {proj}, {extra} from {ti} i {join} {tc} c on c.id = i.cat{w} order by i.id{desc}{lim}")
}

/// orders joined to items.
fn q_orders_items(cx: &mut Ctx, vol: Vol) -> String {
    let to = cx.table("orders");
    let ti = cx.table("items");
    let join = cx.pick(&["join", "left join"]);
    let mut cols = vec!["o.id".to_string()];
    for _ in 0..cx.n(1, 4) {
        cols.push(order_expr(cx));
    }
    cols.push("i.name".into());
    cols.push("o.qty * i.price as total".into());
    let mut pred = cx.predicate(order_atom, 2);
    if cx.chance(0.4) {
        let a = item_atom(cx);
        pred = Some(match pred {
            Some(p) => format!("({p}) or {a}"),
            None => a,
        });
    }
    let v = (vol == Vol::Where).then(|| cx.pick(VOLATILE));
    let w = where_sql(pred, v);
    let lim = cx.limit();
    format!(
        "select {} from {to} o {join} {ti} i on i.id = o.item_id{w} order by o.id{lim}",
        cols.join(", ")
    )
}

/// Reads of the two views.
fn q_views(cx: &mut Ctx) -> String {
    match cx.rng.gen_range(0..4) {
        0 => {
            let v = cx.view("item_cats");
            let cols = cx.pick(&[
                "v.id, v.name, v.label",
                "v.*",
                "v.id, v.price, v.cat, v.label",
                "v.id, upper(v.label) as ul, v.price * 3 as p3",
            ]);
            let w = where_sql(cx.predicate(view_atom, 3), None);
            let lim = cx.limit();
            format!("select {cols} from {v} v{w} order by v.id{lim}")
        }
        1 => {
            let v = cx.view("item_cats");
            let w = where_sql(cx.predicate(view_atom, 2), None);
            format!(
                "select v.label, count(*), sum(v.price), max(v.id) from {v} v{w} group by v.label order by v.label nulls first"
            )
        }
        2 => {
            let v = cx.view("order_lines");
            let w = if cx.chance(0.5) {
                format!(" where l.qty > {}", cx.p(Kind::Small))
            } else {
                String::new()
            };
            let lim = cx.limit();
            format!(
                "select l.item_id, count(*) as n, sum(l.total), max(l.qty) from {v} l{w} group by l.item_id order by l.item_id{lim}"
            )
        }
        _ => {
            let v = cx.view("item_cats");
            let o = cx.table("orders");
            let w = where_sql(cx.predicate(view_atom, 2), None);
            let lim = cx.limit();
            format!(
                "select v.id, v.label, o.id as oid, o.qty from {v} v join {o} o on o.item_id = v.id{w} order by o.id{lim}"
            )
        }
    }
}

/// Aggregates, grouped or not.
fn q_aggregate(cx: &mut Ctx, vol: Vol) -> String {
    const AGGS: &[&str] = &[
        "count(*)",
        "count(i.name)",
        "sum(i.price)",
        "min(i.price)",
        "max(i.name)",
        "avg(i.price)",
        "string_agg(i.name, ',' order by i.id)",
        "bool_or(i.flag)",
        "array_agg(i.id order by i.id)",
        "max(i.created)",
        "sum(octet_length(i.blob))",
        "count(distinct i.cat)",
        "min(i.payload->>'s')",
    ];
    let t = cx.table("items");
    let mut aggs = Vec::new();
    for _ in 0..cx.n(1, 4) {
        aggs.push(cx.pick(AGGS));
    }
    let aggs = aggs.join(", ");
    let v = (vol == Vol::Where).then(|| cx.pick(VOLATILE));
    let w = where_sql(cx.predicate(item_atom, 2), v);
    if cx.chance(0.25) {
        return format!("select {aggs} from {t} i{w}");
    }
    let key = cx.pick(&[
        "i.cat",
        "i.flag",
        "extract(year from i.created)",
        "(i.price > 100)",
        "i.tags[1]",
        "jsonb_typeof(i.payload)",
    ]);
    let having = if cx.chance(0.3) {
        format!(" having count(*) > {}", cx.p(Kind::Small))
    } else {
        String::new()
    };
    format!("select {key} as g, {aggs} from {t} i{w} group by 1{having} order by 1 nulls first")
}

fn q_subquery(cx: &mut Ctx) -> String {
    match cx.rng.gen_range(0..6) {
        0 => {
            let ti = cx.table("items");
            let tc = cx.table("cats");
            let to = cx.table("orders");
            let lim = cx.limit();
            format!(
                "select i.id, i.name, (select c.label from {tc} c where c.id = i.cat) as lbl from {ti} i where exists (select 1 from {to} o where o.item_id = i.id and o.qty > {}) order by i.id{lim}",
                cx.p(Kind::Small)
            )
        }
        1 => {
            let ti = cx.table("items");
            let tc = cx.table("cats");
            format!(
                "select i.id, i.price from {ti} i where i.cat in (select c.id from {tc} c where c.label like {}) order by i.id",
                cx.p(Kind::Like)
            )
        }
        2 => {
            let ti = cx.table("items");
            let ti2 = cx.table("items");
            let w = cx
                .predicate(item_atom, 1)
                .map(|p| format!(" and ({p})"))
                .unwrap_or_default();
            format!(
                "select i.id, i.price from {ti} i where i.price > (select avg(price) from {ti2}){w} order by i.id"
            )
        }
        3 => {
            let ti = cx.table("items");
            format!(
                "select s.cat, s.n, s.total from (select cat, count(*) as n, sum(price) as total from {ti} group by cat) s where s.n > {} order by s.cat nulls first",
                cx.p(Kind::Small)
            )
        }
        4 => {
            let tc = cx.table("cats");
            let ti = cx.table("items");
            format!(
                "select c.id, c.label, (select count(*) from {ti} i where i.cat = c.id) as n from {tc} c order by c.id"
            )
        }
        _ => {
            let ti = cx.table("items");
            let to = cx.table("orders");
            let lim = cx.limit();
            format!(
                "select i.id, i.name from {ti} i where i.id not in (select o.item_id from {to} o where o.item_id is not null and o.qty > {}) order by i.id{lim}",
                cx.p(Kind::Small)
            )
        }
    }
}

fn q_distinct(cx: &mut Ctx, vol: Vol) -> String {
    let t = cx.table("items");
    let v = (vol == Vol::Where).then(|| cx.pick(VOLATILE));
    let w = where_sql(cx.predicate(item_atom, 2), v);
    match cx.rng.gen_range(0..4) {
        0 => format!("select distinct i.cat from {t} i{w} order by i.cat nulls first"),
        1 => {
            let lim = cx.limit();
            format!("select distinct lower(i.name) as ln from {t} i{w} order by ln nulls first{lim}")
        }
        2 => format!("select count(distinct i.cat), count(distinct i.name) from {t} i{w}"),
        _ => format!(
            "select distinct on (i.cat) i.cat, i.id, i.name from {t} i{w} order by i.cat nulls first, i.id"
        ),
    }
}

fn q_union(cx: &mut Ctx) -> String {
    match cx.rng.gen_range(0..3) {
        0 => {
            let ti = cx.table("items");
            let tc = cx.table("cats");
            let w = where_sql(cx.predicate(item_atom, 2), None);
            let kind = cx.pick(&["union all", "union"]);
            let lim = cx.limit();
            format!(
                "select i.id, i.name as n from {ti} i{w} {kind} select c.id, c.label from {tc} c where c.id > {} order by 1, 2 nulls first{lim}",
                cx.p(Kind::Cat)
            )
        }
        1 => {
            let ti = cx.table("items");
            let to = cx.table("orders");
            format!("select i.cat as k from {ti} i union select o.qty from {to} o order by 1 nulls first")
        }
        _ => {
            let ti = cx.table("items");
            let to = cx.table("orders");
            let tc = cx.table("cats");
            format!(
                "select 'items' as src, count(*) from {ti} union all select 'orders', count(*) from {to} union all select 'cats', count(*) from {tc} order by 1"
            )
        }
    }
}

/// CTEs, including CTE names that shadow the tables their bodies read.
fn q_cte(cx: &mut Ctx) -> String {
    match cx.rng.gen_range(0..4) {
        0 => {
            let ti = cx.table("items");
            let tc = cx.table("cats");
            let w = where_sql(cx.predicate(item_atom, 2), None);
            format!(
                "with t as (select i.cat, sum(i.price) as s, count(*) as n from {ti} i{w} group by i.cat) select t.cat, t.s, t.n, c.label from t left join {tc} c on c.id = t.cat order by t.cat nulls first"
            )
        }
        1 => {
            // the CTE `cats` reads the real table cats
            let ti = cx.table("items");
            cx.tables.push("cats");
            let lim = cx.limit();
            format!(
                "with cats as (select id, upper(label) as label from cats where id > {}) select i.id, i.name, cats.label from {ti} i join cats on cats.id = i.cat order by i.id{lim}",
                cx.p(Kind::Cat)
            )
        }
        2 => {
            // the CTE `items` reads the real table items
            cx.tables.push("items");
            format!(
                "with items as (select * from items where price > {}) select count(*), sum(price), max(id) from items",
                cx.p(Kind::Price)
            )
        }
        _ => {
            let to = cx.table("orders");
            format!(
                "with x as (select item_id, sum(qty) as q from {to} group by item_id) select a.item_id, a.q, b.q as q2 from x a join x b on b.item_id = a.item_id + 1 order by a.item_id"
            )
        }
    }
}

fn q_misc(cx: &mut Ctx) -> String {
    match cx.rng.gen_range(0..7) {
        0 => format!(
            "select {} + 1 as a, {} as b, {} * 2 as c",
            cx.p(Kind::Small),
            cx.p(Kind::Name),
            cx.p(Kind::Price)
        ),
        1 => "values (1, 'x'::text), (2, null), (3, 'ü')".into(),
        2 => format!(
            "select count(*), sum(g) from generate_series(1, {}) g",
            cx.p(Kind::Id)
        ),
        3 => {
            let to = cx.table("orders");
            format!(
                "select o.placed, count(*) from {to} o group by o.placed order by o.placed nulls first limit 10"
            )
        }
        4 => {
            cx.tables.push("cats");
            "table cats order by id".into()
        }
        5 => {
            let tc = cx.table("cats");
            format!("select * from {tc} order by id")
        }
        _ => {
            let ti = cx.table("items");
            format!("select * from {ti} i where i.id = {}", cx.p(Kind::Id))
        }
    }
}

fn gen_query(rng: &mut StdRng) -> Query {
    let mut cx = Ctx {
        rng,
        params: Vec::new(),
        tables: Vec::new(),
    };
    let volatile = cx.chance(0.1);
    let sql = if volatile {
        match cx.rng.gen_range(0..6) {
            0 => q_items(&mut cx, Vol::ForUpdate),
            1 => q_items(&mut cx, Vol::Projection),
            2 => q_items(&mut cx, Vol::Where),
            3 => q_items_cats(&mut cx, Vol::Where),
            4 => q_orders_items(&mut cx, Vol::Where),
            _ => q_aggregate(&mut cx, Vol::Where),
        }
    } else {
        match cx.rng.gen_range(0..100) {
            0..=17 => q_items(&mut cx, Vol::None),
            18..=27 => q_items_cats(&mut cx, Vol::None),
            28..=37 => q_orders_items(&mut cx, Vol::None),
            38..=49 => q_views(&mut cx),
            50..=61 => q_aggregate(&mut cx, Vol::None),
            62..=71 => q_subquery(&mut cx),
            72..=78 => q_distinct(&mut cx, Vol::None),
            79..=85 => q_union(&mut cx),
            86..=92 => q_cte(&mut cx),
            _ => q_misc(&mut cx),
        }
    };
    let Ctx {
        params, mut tables, ..
    } = cx;
    tables.sort();
    tables.dedup();
    Query {
        sql,
        params,
        tables,
        volatile,
        last_round: None,
        last_result: None,
    }
}

/// A new template, with a second parameter set when it has parameters.
fn gen_instances(rng: &mut StdRng) -> Vec<Query> {
    let q = gen_query(rng);
    if !q.params.is_empty() && rng.gen_bool(0.5) {
        let other = q.with_new_values(rng);
        vec![q, other]
    } else {
        vec![q]
    }
}

// ---------------------------------------------------------------------------
// Data and writes

fn hex(rng: &mut StdRng, n: usize) -> String {
    (0..n).map(|_| format!("{:02x}", rng.gen::<u8>())).collect()
}

fn item_row(rng: &mut StdRng, id: i32) -> String {
    let cat = if rng.gen_bool(0.1) {
        "NULL".into()
    } else {
        rng.gen_range(-2..=12).to_string()
    };
    let price = if rng.gen_bool(0.1) {
        "NULL".into()
    } else {
        Decimal::new(rng.gen_range(-100_000..1_000_000), 2).to_string()
    };
    let name = item_name(rng);
    let created = if rng.gen_bool(0.1) {
        "NULL".into()
    } else {
        format!(
            "timestamptz '2020-01-01 00:00:00+00' + interval '{} seconds'",
            rng.gen_range(0..4 * 365 * 86_400)
        )
    };
    let tags = match rng.gen_range(0..8) {
        0 => "NULL".into(),
        1 => "'{}'::text[]".into(),
        2 => format!("array[{}, NULL]::text[]", quote(TAGS.choose(rng).unwrap())),
        _ => {
            let n = rng.gen_range(1..=3);
            let ts: Vec<String> = (0..n).map(|_| quote(TAGS.choose(rng).unwrap())).collect();
            format!("array[{}]::text[]", ts.join(", "))
        }
    };
    let flag = ["NULL", "true", "false"].choose(rng).unwrap();
    let payload = json_payload(rng);
    let blob = if rng.gen_bool(0.25) {
        "NULL".into()
    } else {
        let n = rng.gen_range(0..12);
        format!("'\\x{}'::bytea", hex(rng, n))
    };
    format!("({id}, {cat}, {price}, {name}, {created}, {tags}, {flag}, {payload}, {blob})")
}

fn item_name(rng: &mut StdRng) -> String {
    if rng.gen_bool(0.1) {
        return "NULL".into();
    }
    let base = NAMES.choose(rng).unwrap();
    if rng.gen_bool(0.5) {
        quote(base)
    } else {
        quote(&format!("{base} {}", rng.gen_range(-5..100)))
    }
}

fn json_payload(rng: &mut StdRng) -> String {
    match rng.gen_range(0..12) {
        0 | 1 => "NULL".into(),
        2 => "'[1, 2, \"three\"]'::jsonb".into(),
        3 => "'\"just a string\"'::jsonb".into(),
        4 => "'null'::jsonb".into(),
        _ => {
            let mut fields = Vec::new();
            if rng.gen_bool(0.8) {
                fields.push(format!("\"k\": {}", rng.gen_range(-3..10)));
            }
            if rng.gen_bool(0.6) {
                fields.push(format!("\"s\": \"{}\"", JSON_STRINGS.choose(rng).unwrap()));
            }
            if rng.gen_bool(0.5) {
                fields.push(format!(
                    "\"a\": [{}, {}, \"{}\"]",
                    rng.gen_range(0..5),
                    rng.gen_range(-1.0f64..1.0) > 0.0,
                    TAGS.choose(rng).unwrap()
                ));
            }
            if rng.gen_bool(0.2) {
                fields.push("\"n\": null, \"d\": {\"e\": [true, {\"f\": 1.5e3}]}".into());
            }
            quote(&format!("{{{}}}", fields.join(", "))) + "::jsonb"
        }
    }
}

fn cat_row(rng: &mut StdRng, id: i32) -> String {
    let label = if rng.gen_bool(0.1) {
        "NULL".into()
    } else {
        quote(LABELS.choose(rng).unwrap())
    };
    let parent = if rng.gen_bool(0.5) {
        "NULL".into()
    } else {
        rng.gen_range(1..=10).to_string()
    };
    format!("({id}, {label}, {parent})")
}

fn order_row(rng: &mut StdRng, id: i32) -> String {
    let item = if rng.gen_bool(0.05) {
        "NULL".into()
    } else {
        rng.gen_range(1..=320).to_string()
    };
    let qty = if rng.gen_bool(0.03) {
        -1
    } else {
        rng.gen_range(1..=10)
    };
    let weight = match rng.gen_range(0..40) {
        0..=3 => "NULL".into(),
        4 => "'NaN'".into(),
        5 => "'-Infinity'".into(),
        _ => (f64::from(rng.gen_range(-1000..100_000)) / 8.0).to_string(),
    };
    let note = if rng.gen_bool(0.1) {
        "NULL".into()
    } else if rng.gen_bool(0.5) {
        quote(NOTES.choose(rng).unwrap())
    } else {
        quote(&format!(
            "{} #{}",
            NOTES.choose(rng).unwrap(),
            rng.gen_range(0..50)
        ))
    };
    let placed = if rng.gen_bool(0.1) {
        "NULL".into()
    } else {
        format!("date '2020-01-01' + {}", rng.gen_range(0..1500))
    };
    let cents = if rng.gen_bool(0.1) {
        "NULL".into()
    } else {
        rng.gen_range(-10_000_000_000i64..10_000_000_000)
            .to_string()
    };
    let uuid = if rng.gen_bool(0.1) {
        "NULL".into()
    } else {
        let h = hex(rng, 16);
        format!(
            "'{}-{}-{}-{}-{}'",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    };
    format!("({id}, {item}, {qty}, {weight}, {note}, {placed}, {cents}, {uuid})")
}

const SCHEMA: &str = "
    create table items(id int primary key, cat int, price numeric(10,2), name text,
                       created timestamptz, tags text[], flag bool, payload jsonb, blob bytea);
    create table cats(id int primary key, label text, parent int);
    create table orders(id int primary key, item_id int, qty int, weight float8,
                        note varchar(40), placed date, total_cents int8, ref uuid);
    create view item_cats as
        select i.id, i.name, i.price, i.cat, c.label from items i left join cats c on c.id = i.cat;
    create view order_lines as
        select o.id as order_id, o.qty, o.item_id, i.price, o.qty * i.price as total
        from orders o join items i on i.id = o.item_id;";

fn cats_insert(rng: &mut StdRng) -> String {
    let rows: Vec<String> = (1..=10).map(|id| cat_row(rng, id)).collect();
    format!("insert into cats values {}", rows.join(", "))
}

/// Ids handed out by writes, and whether cats was truncated.
struct WriteState {
    next_item: i32,
    next_order: i32,
    next_cat: i32,
    cats_empty: bool,
}

/// One single-statement write, and the table it touches.
fn gen_write(rng: &mut StdRng, ws: &mut WriteState) -> (String, &'static str) {
    let id = rng.gen_range(1..=320);
    match rng.gen_range(0..18) {
        0 | 1 => {
            let rows: Vec<String> = (0..rng.gen_range(1..=3))
                .map(|_| {
                    ws.next_item += 1;
                    item_row(rng, ws.next_item)
                })
                .collect();
            (format!("insert into items values {}", rows.join(", ")), "items")
        }
        2 => (
            format!(
                "update items set price = price + {} where id % {} = {}",
                Decimal::new(rng.gen_range(-5000..5000), 2),
                rng.gen_range(3..10),
                rng.gen_range(0..3)
            ),
            "items",
        ),
        3 => (
            format!("update items set name = {} where id = {id}", item_name(rng)),
            "items",
        ),
        4 => (
            format!(
                "update items set cat = {} where id between {id} and {}",
                rng.gen_range(-1..=11),
                id + rng.gen_range(0..20)
            ),
            "items",
        ),
        5 => (
            format!(
                "update items set tags = array_append(tags, {}), flag = not flag where id = {id}",
                quote(TAGS.choose(rng).unwrap())
            ),
            "items",
        ),
        6 => (
            format!(
                "update items set payload = jsonb_set(coalesce(payload, '{{}}'::jsonb), '{{k}}', to_jsonb({})) \
                 where (payload is null or jsonb_typeof(payload) = 'object') and id % 11 = {}",
                rng.gen_range(-3..10),
                rng.gen_range(0..11)
            ),
            "items",
        ),
        7 => (
            format!("delete from items where id = {id} or id % 97 = {}", rng.gen_range(0..97)),
            "items",
        ),
        8 | 9 => {
            let rows: Vec<String> = (0..rng.gen_range(1..=3))
                .map(|_| {
                    ws.next_order += 1;
                    order_row(rng, ws.next_order)
                })
                .collect();
            (format!("insert into orders values {}", rows.join(", ")), "orders")
        }
        10 => (
            format!(
                "update orders set qty = qty + 1, note = {} where item_id = {id}",
                quote(NOTES.choose(rng).unwrap())
            ),
            "orders",
        ),
        11 => {
            let from = rng.gen_range(1..=400);
            (
                format!("delete from orders where id between {from} and {}", from + 5),
                "orders",
            )
        }
        12 => (
            format!(
                "update cats set label = {} where id = {}",
                quote(LABELS.choose(rng).unwrap()),
                rng.gen_range(1..=10)
            ),
            "cats",
        ),
        13 => {
            ws.next_cat += 1;
            (
                format!("insert into cats values {}", cat_row(rng, ws.next_cat)),
                "cats",
            )
        }
        14 => {
            ws.cats_empty = true;
            ("truncate cats".into(), "cats")
        }
        15 => {
            let n = rng.gen_range(0..12);
            (
                format!(
                    "update items set blob = '\\x{}'::bytea, created = created + interval '1 day' where id = {id}",
                    hex(rng, n)
                ),
                "items",
            )
        }
        16 => (
            format!(
                "update items set {} = null where id = {id}",
                ["price", "name", "cat", "tags", "payload"].choose(rng).unwrap()
            ),
            "items",
        ),
        // a write that changes nothing
        _ => ("update items set price = price where id = -1".into(), "items"),
    }
}

/// A batch of writes: cats is refilled first if it was truncated. (Ids above 10
/// are never reused, so a refill cannot collide with cats inserted since.)
fn gen_writes(rng: &mut StdRng, ws: &mut WriteState, n: usize) -> Vec<(String, &'static str)> {
    let mut out = Vec::new();
    if ws.cats_empty {
        ws.cats_empty = false;
        out.push((cats_insert(rng), "cats"));
    }
    for _ in 0..n {
        out.push(gen_write(rng, ws));
    }
    out
}

// ---------------------------------------------------------------------------
// The harness

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Conn {
    Direct,
    /// Straight to Postgres, with the output settings of session C.
    DirectC,
    /// The pgtier session that also writes.
    A,
    /// A second pgtier session, sharing A's cache entries.
    B,
    /// A pgtier session whose SETs change how results are rendered: it must
    /// never get entries of A and B.
    C,
}

impl Conn {
    /// The direct connection whose results this session must reproduce.
    fn reference(self) -> Conn {
        match self {
            Conn::C | Conn::DirectC => Conn::DirectC,
            _ => Conn::Direct,
        }
    }
}

/// Applied to sessions C and DirectC (through pgtier, so it must track them).
const C_SETTINGS: &str = "set timezone = 'Asia/Kolkata'; set datestyle = 'SQL, DMY'; \
    set intervalstyle = 'postgres_verbose'; set bytea_output = 'escape'; set extra_float_digits = 0";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    /// simple_query with literals: text format.
    Simple,
    /// A statement prepared once per session, executed with binary parameters.
    Prepared,
    /// `query` on the SQL string: prepare, execute, close.
    OneShot,
    /// `query_typed`: Parse/Bind/Describe/Execute/Sync in one request.
    Typed,
    /// Prepared and Typed at the same time on one session (pipelined requests);
    /// both must return the same.
    Pipelined,
}

impl Via {
    /// Executions sharing a cache entry share a group.
    fn group(self) -> usize {
        match self {
            Via::Simple => 0,
            Via::Prepared | Via::OneShot => 1,
            Via::Typed => 2,
            Via::Pipelined => 3,
        }
    }
}

#[derive(Default)]
struct Stats {
    checks: u64,
    pgtier_reads: u64,
    stale_reads: u64,
    waited: u64,
    max_wait: Duration,
    direct_errors: u64,
    volatile_checks: u64,
    pgtier_writes: u64,
    direct_writes: u64,
}

struct Harness {
    seed: u64,
    d: Client,
    dc: Client,
    a: Client,
    b: Client,
    c: Client,
    stmts: HashMap<(Conn, String), Statement>,
    stats: Stats,
    /// The latest write phase, for failure messages.
    last_writes: String,
}

impl Harness {
    fn client(&self, conn: Conn) -> &Client {
        match conn {
            Conn::Direct => &self.d,
            Conn::DirectC => &self.dc,
            Conn::A => &self.a,
            Conn::B => &self.b,
            Conn::C => &self.c,
        }
    }

    /// The session's prepared statement for `sql`; a new one is checked against
    /// the direct description.
    async fn statement(&mut self, conn: Conn, q: &Query) -> Result<Statement, String> {
        let key = (conn, q.sql.clone());
        if let Some(s) = self.stmts.get(&key) {
            return Ok(s.clone());
        }
        let s = self
            .client(conn)
            .prepare(&q.sql)
            .await
            .map_err(|e| db_error(&e))?;
        if conn != conn.reference() {
            if let Some(ds) = self.stmts.get(&(conn.reference(), q.sql.clone())) {
                assert_eq!(
                    describe(&s),
                    describe(ds),
                    "seed {}: statement description through pgtier ({conn:?}) differs from Postgres\nSQL: {}",
                    self.seed,
                    q.sql
                );
            }
        }
        self.stmts.insert(key, s.clone());
        Ok(s)
    }

    async fn run(&mut self, conn: Conn, via: Via, q: &Query) -> Outcome {
        let params = || q.params.iter().map(|(_, p)| p.as_sql());
        match via {
            Via::Simple => simple(self.client(conn), &q.literal_sql()).await,
            Via::Prepared => {
                let stmt = match self.statement(conn, q).await {
                    Ok(s) => s,
                    Err(e) => return Outcome::Error(e),
                };
                collect(self.client(conn).query_raw(&stmt, params()).await).await
            }
            Via::OneShot => {
                collect(self.client(conn).query_raw(q.sql.as_str(), params()).await).await
            }
            Via::Typed => {
                let typed = q.params.iter().map(|(_, p)| (p.as_sql(), p.ty()));
                collect(self.client(conn).query_typed_raw(&q.sql, typed).await).await
            }
            Via::Pipelined => {
                let stmt = match self.statement(conn, q).await {
                    Ok(s) => s,
                    Err(e) => return Outcome::Error(e),
                };
                let c = self.client(conn);
                let typed = q.params.iter().map(|(_, p)| (p.as_sql(), p.ty()));
                let (x, y) = futures_util::join!(
                    async { collect(c.query_raw(&stmt, params()).await).await },
                    async { collect(c.query_typed_raw(&q.sql, typed).await).await }
                );
                if x == y {
                    x
                } else {
                    Outcome::Error(format!(
                        "the two pipelined executions disagree:\n{x}\n--- and ---\n{y}"
                    ))
                }
            }
        }
    }

    fn mismatch(
        &self,
        what: &str,
        q: &Query,
        conn: Conn,
        via: Via,
        want: &Outcome,
        got: &Outcome,
    ) -> String {
        let sql = if via == Via::Simple {
            format!("{}\n(extended-protocol form: {})", q.literal_sql(), q.sql)
        } else {
            q.sql.clone()
        };
        let before = q.last_result.as_ref().map(|(t, b)| match via {
            Via::Simple => t,
            _ => b,
        });
        let stale = if conn != Conn::C && before == Some(got) {
            format!(
                "pgtier returned exactly the result this statement had when last checked \
                 (round {}), before later writes: a stale cache entry\n",
                q.last_round.unwrap_or(0)
            )
        } else {
            String::new()
        };
        format!(
            "seed {seed}: {what}\nvia {via:?} on pgtier session {conn:?}\nSQL: {sql}\nparams: {params}\n{stale}{diff}\n\
             latest write phase: {writes}\n\
             --- postgres ---\n{want}\n--- pgtier ---\n{got}\n\
             (reproduce: PGTIER_DIFF_SEED={seed} cargo test --test differential)",
            seed = self.seed,
            params = q.params_text(),
            diff = first_difference(want, got),
            writes = self.last_writes,
        )
    }

    /// Run `q` directly and many times through pgtier (three sessions, all
    /// protocol variants) and compare every result. When `strict_a` (or
    /// `strict_others`) gives a reason, that session must match at once;
    /// otherwise the first read of each of its cache entries may be polled until
    /// it converges (a direct write's invalidation in flight), and must then stay
    /// equal. Returns Postgres's (text, binary) results.
    async fn check(
        &mut self,
        q: &Query,
        strict_a: Option<&str>,
        strict_others: Option<&str>,
        rng: &mut StdRng,
    ) -> (Outcome, Outcome) {
        self.stats.checks += 1;
        if q.volatile {
            self.stats.volatile_checks += 1;
        }
        let mut plan = vec![
            (Conn::A, Via::Simple),
            (Conn::A, Via::Prepared),
            (Conn::B, Via::Simple),
            (Conn::A, Via::Typed),
            (Conn::C, Via::Simple),
            (Conn::B, Via::Prepared),
            (Conn::A, Via::OneShot),
            (Conn::C, Via::Prepared),
            (Conn::A, Via::Simple),
            (Conn::B, Via::Typed),
            (Conn::A, Via::Prepared),
            (Conn::C, Via::Simple),
            (Conn::A, Via::Pipelined),
            (Conn::A, Via::Typed),
            (Conn::B, Via::Simple),
        ];
        if rng.gen_bool(0.5) {
            plan.swap(0, 1);
        }
        // The first read through pgtier comes before the direct reads, as close
        // to the preceding writes as possible. (Preparing reads no data: the
        // direct statement is prepared first so descriptions can be compared.)
        let _ = self.statement(Conn::Direct, q).await;
        let mut early = Some(self.run(plan[0].0, plan[0].1, q).await);
        let mut wants = HashMap::new();
        for reference in [Conn::Direct, Conn::DirectC] {
            for via in [Via::Simple, Via::Prepared] {
                let w = self.run(reference, via, q).await;
                if let Outcome::Error(e) = &w {
                    self.stats.direct_errors += 1;
                    println!(
                        "note: generated statement fails in Postgres ({e}): {}",
                        q.sql
                    );
                }
                wants.insert((reference, via == Via::Simple), w);
            }
        }
        // per (session, entry): once a read has matched, it must keep matching
        let mut settled: HashSet<(Conn, usize)> = HashSet::new();
        for (conn, via) in plan {
            let want = &wants[&(conn.reference(), via == Via::Simple)];
            let mut got = match early.take() {
                Some(o) => o,
                None => self.run(conn, via, q).await,
            };
            self.stats.pgtier_reads += 1;
            let key = (conn, via.group());
            if got == *want {
                settled.insert(key);
                continue;
            }
            let strict = if settled.contains(&key) {
                Some("this session already had the current result, then got another")
            } else if conn == Conn::A {
                strict_a
            } else {
                strict_others
            };
            if let Some(why) = strict {
                panic!(
                    "{}",
                    self.mismatch(
                        &format!("result through pgtier differs from Postgres ({why})"),
                        q,
                        conn,
                        via,
                        want,
                        &got
                    )
                );
            }
            // a direct write's invalidation may still be in flight: poll, bounded
            let start = Instant::now();
            while got != *want {
                self.stats.stale_reads += 1;
                if start.elapsed() > CONVERGE {
                    panic!(
                        "{}",
                        self.mismatch(
                            &format!("result through pgtier never converged to Postgres's within {CONVERGE:?} of a direct write"),
                            q,
                            conn,
                            via,
                            want,
                            &got
                        )
                    );
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
                got = self.run(conn, via, q).await;
                self.stats.pgtier_reads += 1;
            }
            self.stats.waited += 1;
            self.stats.max_wait = self.stats.max_wait.max(start.elapsed());
            settled.insert(key);
        }
        let text = wants.remove(&(Conn::Direct, true)).unwrap();
        (text, wants.remove(&(Conn::Direct, false)).unwrap())
    }

    async fn exec_direct(&self, sql: &str) {
        if let Err(e) = self.d.batch_execute(sql).await {
            panic!(
                "seed {}: direct write failed: {}\n{sql}",
                self.seed,
                db_error(&e)
            );
        }
    }

    /// Writes straight to Postgres.
    async fn direct_writes(&mut self, rng: &mut StdRng, ws: &mut WriteState) {
        let style = rng.gen_range(0..10);
        if style == 3 && !ws.cats_empty {
            // truncate and refill cats in one implicit transaction
            self.exec_direct(&format!("truncate cats; {}", cats_insert(rng)))
                .await;
            self.stats.direct_writes += 2;
        }
        let n = rng.gen_range(1..=4);
        let writes = gen_writes(rng, ws, n);
        self.stats.direct_writes += writes.len() as u64;
        self.last_writes =
            describe_writes(&format!("directly to Postgres (style {style})"), &writes);
        match style {
            // all in one explicit transaction
            0 | 1 => {
                let body: Vec<&str> = writes.iter().map(|(s, _)| s.as_str()).collect();
                self.exec_direct(&format!("begin; {}; commit", body.join("; ")))
                    .await;
            }
            // a rolled back transaction first, then the writes one by one
            2 => {
                self.exec_direct(&format!(
                    "begin; update items set price = price + 1000 where id % 3 = {}; delete from cats; rollback",
                    rng.gen_range(0..3)
                ))
                .await;
                for (s, _) in &writes {
                    self.exec_direct(s).await;
                }
            }
            _ => {
                for (s, _) in &writes {
                    self.exec_direct(s).await;
                }
            }
        }
    }

    /// Writes through pgtier session A, in several styles. Returns the tables touched.
    async fn pgtier_writes(&mut self, rng: &mut StdRng, ws: &mut WriteState) -> Vec<&'static str> {
        let n = rng.gen_range(1..=3);
        let writes = gen_writes(rng, ws, n);
        self.stats.pgtier_writes += writes.len() as u64;
        let mut tables: Vec<&'static str> = writes.iter().map(|(_, t)| *t).collect();
        let seed = self.seed;
        let style = rng.gen_range(0..4);
        self.last_writes = describe_writes(
            &format!("through pgtier session A (style {style})"),
            &writes,
        );
        match style {
            0 => {
                for (s, _) in &writes {
                    self.a
                        .simple_query(s)
                        .await
                        .unwrap_or_else(|e| write_failed(seed, s, e));
                }
            }
            1 => {
                for (s, _) in &writes {
                    self.a
                        .execute(s.as_str(), &[])
                        .await
                        .unwrap_or_else(|e| write_failed(seed, s, e));
                }
            }
            2 => {
                let tx = self.a.transaction().await.unwrap();
                for (s, _) in &writes {
                    tx.execute(s.as_str(), &[])
                        .await
                        .unwrap_or_else(|e| write_failed(seed, s, e));
                }
                tx.commit().await.unwrap();
            }
            _ => {
                for (s, _) in &writes {
                    self.a
                        .batch_execute(s)
                        .await
                        .unwrap_or_else(|e| write_failed(seed, s, e));
                }
                // and a parameterised write (extended protocol, binary parameters)
                let price = Decimal::new(rng.gen_range(-50_000..600_000), 2);
                let name = NAMES.choose(rng).unwrap().to_string();
                let id: i32 = rng.gen_range(1..=320);
                let sql = "update items set price = $1, name = $2 where id = $3 or id = $3 + 1";
                self.a
                    .execute(sql, &[&price, &name, &id])
                    .await
                    .unwrap_or_else(|e| write_failed(seed, sql, e));
                self.stats.pgtier_writes += 1;
                tables.push("items");
            }
        }
        tables.sort();
        tables.dedup();
        tables
    }
}

fn describe_writes(how: &str, writes: &[(String, &'static str)]) -> String {
    let mut out = format!("{how}:");
    for (sql, _) in writes {
        let short: String = sql.chars().take(160).collect();
        let more = if short.len() < sql.len() { " ..." } else { "" };
        let _ = write!(out, "\n  {short}{more}");
    }
    out
}

fn write_failed(seed: u64, sql: &str, e: tokio_postgres::Error) -> ! {
    panic!(
        "seed {seed}: write through pgtier failed: {}\n{sql}",
        db_error(&e)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_reads_match_postgres_through_writes() {
    let seed = std::env::var("PGTIER_DIFF_SEED")
        .ok()
        .map(|s| {
            s.trim().parse::<u64>().unwrap_or_else(|_| {
                panic!("PGTIER_DIFF_SEED must be an unsigned integer, got {s:?}")
            })
        })
        .unwrap_or(DEFAULT_SEED);
    println!("differential test seed: {seed} (set PGTIER_DIFF_SEED to override)");
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed);

    let db = fresh_db("pgtier_differential").await;
    let d = direct(&db).await;
    d.batch_execute(SCHEMA).await.unwrap();
    let items: Vec<String> = (1..=300).map(|id| item_row(&mut rng, id)).collect();
    let orders: Vec<String> = (1..=400).map(|id| order_row(&mut rng, id)).collect();
    d.batch_execute(&format!(
        "insert into items values {}; insert into orders values {}; {}; analyze",
        items.join(", "),
        orders.join(", "),
        cats_insert(&mut rng)
    ))
    .await
    .unwrap();

    let p = Pgtier::cached(&db, "[cache]\ndefault_ttl = \"10m\"\n", &[]).await;
    let dc = direct(&db).await;
    dc.batch_execute(C_SETTINGS).await.unwrap();
    let c = p.connect(&db).await;
    c.batch_execute(C_SETTINGS).await.unwrap();
    let mut h = Harness {
        seed,
        d,
        dc,
        a: p.connect(&db).await,
        b: p.connect(&db).await,
        c,
        stmts: HashMap::new(),
        stats: Stats::default(),
        last_writes: "(none)".into(),
    };
    let mut ws = WriteState {
        next_item: 1000,
        next_order: 5000,
        next_cat: 10,
        cats_empty: false,
    };

    // round 0: nothing has been written since pgtier started, every read must match
    let mut pool: Vec<Query> = Vec::new();
    while pool.len() < POOL {
        pool.extend(gen_instances(&mut rng));
    }
    let fresh = Some("nothing was written since pgtier started");
    for q in &mut pool {
        let snapshot = q.clone();
        q.last_result = Some(h.check(&snapshot, fresh, fresh, &mut rng).await);
        q.last_round = Some(0);
    }
    // reads whose result a write changed since their entries were cached, that
    // is, reads that were correct only because of invalidation
    let mut changed = 0;
    // of those, the first read of session A right after its own write
    let mut ryw_changed = 0;

    for round in 1..=ROUNDS {
        let through_pgtier = round % 3 == 2;
        let mut order: Vec<usize> =
            rand::seq::index::sample(&mut rng, pool.len(), REREAD_PER_ROUND.min(pool.len()))
                .into_vec();
        if through_pgtier {
            let touched = h.pgtier_writes(&mut rng, &mut ws).await;
            // The very next read of session A is a statement cached in the last
            // round that reads a table just written, preferably one whose result
            // the write changed (found by asking Postgres directly, which does not
            // touch session A).
            let candidates: Vec<usize> = (0..pool.len())
                .filter(|&i| pool[i].last_round == Some(round - 1) && !pool[i].volatile)
                .filter(|&i| pool[i].tables.iter().any(|t| touched.contains(t)))
                .take(20)
                .collect();
            let mut next = candidates.first().copied();
            for &i in &candidates {
                let q = pool[i].clone();
                let now = h.run(Conn::Direct, Via::Prepared, &q).await;
                if q.last_result.as_ref().is_some_and(|r| r.1 != now) {
                    next = Some(i);
                    break;
                }
            }
            if let Some(i) = next {
                order.retain(|&j| j != i);
                order.insert(0, i);
            }
        } else {
            h.direct_writes(&mut rng, &mut ws).await;
        }
        for _ in 0..NEW_PER_ROUND {
            for q in gen_instances(&mut rng) {
                pool.push(q);
                order.push(pool.len() - 1);
            }
        }
        for (n, i) in order.into_iter().enumerate() {
            let q = pool[i].clone();
            // after writes through pgtier, session A is never allowed a stale read
            let ryw = through_pgtier.then_some(
                "read of session A after its own write through pgtier: read-your-writes",
            );
            let got = h.check(&q, ryw, None, &mut rng).await;
            if !q.volatile && q.last_result.as_ref().is_some_and(|r| *r != got) {
                changed += 1;
                if through_pgtier && n == 0 {
                    ryw_changed += 1;
                }
            }
            pool[i].last_result = Some(got);
            pool[i].last_round = Some(round);
        }
        println!(
            "round {round}: {} writes ({}), {} checks, {changed} changed results, {} stale reads so far, {:?} elapsed",
            h.stats.direct_writes + h.stats.pgtier_writes,
            if through_pgtier {
                "through pgtier"
            } else {
                "direct"
            },
            h.stats.checks,
            h.stats.stale_reads,
            started.elapsed()
        );
    }

    let m = p.metrics().await;
    let s = &h.stats;
    let bypassed: f64 = ["volatile", "locking", "time_literal", "system_catalog"]
        .iter()
        .map(|r| m.bypasses(r))
        .sum();
    let mut reasons: Vec<String> =
        m.0.samples
            .iter()
            .filter(|x| x.metric == "pgtier_cache_lookups_total")
            .filter(|x| x.labels.get("outcome") == Some("bypass"))
            .map(|x| {
                let v = match x.value {
                    prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
                    _ => 0.0,
                };
                format!("{}={v}", x.labels.get("reason").unwrap_or("?"))
            })
            .collect();
    reasons.sort();
    println!("bypasses by reason: {}", reasons.join(", "));
    println!(
        "seed {seed}: {} statements checked ({} uncacheable), {} reads through pgtier, \
         {} direct and {} pgtier writes, {} stale reads over {} waits (longest {:?}), \
         {} statements failing in Postgres, {changed} results changed by writes \
         ({ryw_changed} read right after a write through pgtier); pgtier: {} hits, {} misses, \
         {} uncacheable bypasses, {} fence timeouts; {:?}",
        s.checks,
        s.volatile_checks,
        s.pgtier_reads,
        s.direct_writes,
        s.pgtier_writes,
        s.stale_reads,
        s.waited,
        s.max_wait,
        s.direct_errors,
        m.hits(),
        m.misses(),
        bypassed,
        m.get("pgtier_fence_timeouts_total", &[]) as u64,
        started.elapsed()
    );
    assert!(
        s.direct_errors * 20 <= s.checks,
        "the generator produced too many failing statements ({} of {})",
        s.direct_errors,
        s.checks
    );
    assert!(
        m.hits() >= s.pgtier_reads as f64 / 3.0,
        "the cache was barely exercised: {} hits for {} reads through pgtier\n{}",
        m.hits(),
        s.pgtier_reads,
        p.logs()
    );
    assert!(
        changed >= 20,
        "writes changed only {changed} cached results: invalidation was barely exercised"
    );
    if s.volatile_checks > 0 {
        assert!(bypassed > 0.0, "uncacheable statements were never bypassed");
    }
}
