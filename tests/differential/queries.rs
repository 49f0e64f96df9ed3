//! The vocabulary of generated statements: sample values, parameters, query
//! templates (what kind, which parameters, whether pgtier may cache them) and
//! the generation context.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use rust_decimal::Decimal;
use tokio_postgres::types::{ToSql, Type};

use crate::values::Outcome;

pub const NAMES: &[&str] = &[
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
pub const LIKES: &[&str] = &[
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
pub const TAGS: &[&str] = &["red", "green", "blue", "ünïcode", "x y", ""];
pub const LABELS: &[&str] = &[
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
pub const NOTES: &[&str] = &["fast", "slow", "gift 🎁", "ré-order", "bulk", "", "n/a"];
pub const NOTE_LIKES: &[&str] = &["f%", "%o%", "%🎁%", "r_%", "%", "b%"];
pub const JSON_STRINGS: &[&str] = &["naïve", "x", "日本", "🎉", r#"say \"hi\""#, ""];

/// Deterministic expressions whose evaluation pgtier must treat as uncacheable.
pub const VOLATILE: &[&str] = &[
    "random() < 2",
    "now() > timestamptz '2000-01-01 00:00:00+00'",
    "clock_timestamp() > timestamptz '2000-01-01 00:00:00+00'",
    "'now'::timestamptz > timestamptz '2000-01-01 00:00:00+00'",
    "current_user = 'postgres'",
    "exists (select 1 from pg_class where relname = 'items')",
    "pg_backend_pid() > 0",
    "statement_timestamp() is not null",
];

pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[derive(Clone, Debug)]
pub enum Param {
    Int(Option<i32>),
    Text(Option<String>),
    Num(Option<Decimal>),
}

impl Param {
    pub fn ty(&self) -> Type {
        match self {
            Param::Int(_) => Type::INT4,
            Param::Text(_) => Type::TEXT,
            Param::Num(_) => Type::NUMERIC,
        }
    }

    pub fn as_sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            Param::Int(v) => v,
            Param::Text(v) => v,
            Param::Num(v) => v,
        }
    }

    /// The value as an SQL literal, for the simple-protocol variant.
    pub fn literal(&self) -> String {
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
pub enum Kind {
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
    pub fn cast(self) -> &'static str {
        match self {
            Kind::Cat | Kind::Id | Kind::Small => "int",
            Kind::Price => "numeric",
            Kind::Name | Kind::Like | Kind::Tag | Kind::NoteLike => "text",
        }
    }

    pub fn value(self, rng: &mut StdRng) -> Param {
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
pub struct Query {
    pub sql: String,
    pub params: Vec<(Kind, Param)>,
    /// Base tables it reads (views resolved by hand).
    pub tables: Vec<&'static str>,
    /// Contains something that makes it uncacheable.
    pub volatile: bool,
    /// Round it was last checked in.
    pub last_round: Option<usize>,
    /// Its (text, binary) results when last checked.
    pub last_result: Option<(Outcome, Outcome)>,
}

impl Query {
    /// The statement with its parameters replaced by literals.
    pub fn literal_sql(&self) -> String {
        let mut s = self.sql.clone();
        for (i, (_, p)) in self.params.iter().enumerate().rev() {
            s = s.replace(&format!("${}", i + 1), &p.literal());
        }
        s
    }

    pub fn params_text(&self) -> String {
        let ps: Vec<String> = self
            .params
            .iter()
            .enumerate()
            .map(|(i, (_, p))| format!("${} = {p:?}", i + 1))
            .collect();
        format!("[{}]", ps.join(", "))
    }

    pub fn with_new_values(&self, rng: &mut StdRng) -> Query {
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
pub struct Ctx<'r> {
    pub rng: &'r mut StdRng,
    pub params: Vec<(Kind, Param)>,
    pub tables: Vec<&'static str>,
}

impl Ctx<'_> {
    /// A new parameter of `kind`, as `$n::type`.
    pub fn p(&mut self, kind: Kind) -> String {
        let v = kind.value(self.rng);
        self.params.push((kind, v));
        format!("${}::{}", self.params.len(), kind.cast())
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.rng.gen_bool(p)
    }

    pub fn pick<'s>(&mut self, xs: &[&'s str]) -> &'s str {
        xs.choose(self.rng).unwrap()
    }

    pub fn n(&mut self, lo: i32, hi: i32) -> i32 {
        self.rng.gen_range(lo..=hi)
    }

    /// A table reference, spelled in one of several equivalent ways.
    pub fn table(&mut self, name: &'static str) -> String {
        self.tables.push(name);
        match self.rng.gen_range(0..10) {
            0 => format!("public.{name}"),
            1 => name.to_uppercase(),
            2 => format!("\"{name}\""),
            _ => name.to_string(),
        }
    }

    /// A view reference; records the view's base tables.
    pub fn view(&mut self, name: &'static str) -> String {
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

    pub fn limit(&mut self) -> String {
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
    pub fn predicate(&mut self, atom: fn(&mut Ctx) -> String, max: usize) -> Option<String> {
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
