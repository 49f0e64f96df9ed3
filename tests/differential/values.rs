//! Values and results: every column taken as raw bytes, rendered so that two
//! results compare equal only when they are byte for byte the same, and the
//! first difference between two outcomes described.

use std::fmt::Write as _;

use futures_util::TryStreamExt;
use rust_decimal::Decimal;
use tokio_postgres::types::{FromSql, Type};
use tokio_postgres::{Client, Column, RowStream, SimpleQueryMessage, Statement};

/// Any column as its raw bytes (binary format through the extended protocol).
#[derive(Debug, PartialEq)]
pub struct Raw(Vec<u8>);

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
pub fn render_value(ty: &Type, b: &[u8]) -> String {
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

pub fn decoded(ty: &Type, b: &[u8]) -> Option<String> {
    pub fn show<'a, T: FromSql<'a> + std::fmt::Debug>(ty: &Type, b: &'a [u8]) -> Option<String> {
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
pub enum Outcome {
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
pub fn first_difference(want: &Outcome, got: &Outcome) -> String {
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

pub fn db_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{} {}", d.code().code(), d.message()),
        None => format!("(client-side) {e}"),
    }
}

pub fn column_text(c: &Column) -> String {
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
pub async fn simple(c: &Client, sql: &str) -> Outcome {
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
pub async fn collect(res: Result<RowStream, tokio_postgres::Error>) -> Outcome {
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
pub fn describe(s: &Statement) -> String {
    let params: Vec<String> = s.params().iter().map(|t| t.name().to_string()).collect();
    let cols: Vec<String> = s.columns().iter().map(column_text).collect();
    format!(
        "params [{}] columns [{}]",
        params.join(", "),
        cols.join("; ")
    )
}

// ---------------------------------------------------------------------------
