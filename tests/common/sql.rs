//! Reading results in tests: rows as text, raw binary values, and bounded waits
//! for a read through pgtier to show something.

use std::time::{Duration, Instant};

use tokio_postgres::{Client, SimpleQueryMessage};

use super::Pgtier;

/// Rows of a simple-protocol result, as text (None for NULL).
pub fn texts(msgs: &[SimpleQueryMessage]) -> Vec<Vec<Option<String>>> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
            }
            _ => None,
        })
        .collect()
}

/// Any column as its raw bytes (binary format through the extended protocol).
#[derive(Debug, PartialEq)]
pub struct Raw(pub Vec<u8>);

impl<'a> tokio_postgres::types::FromSql<'a> for Raw {
    fn from_sql(
        _: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(raw.to_vec()))
    }
    fn accepts(_: &tokio_postgres::types::Type) -> bool {
        true
    }
}

pub fn raw_rows(rows: &[tokio_postgres::Row]) -> Vec<Vec<Option<Raw>>> {
    rows.iter()
        .map(|r| (0..r.len()).map(|i| r.get::<_, Option<Raw>>(i)).collect())
        .collect()
}

/// The first column of the first row, as text ("NULL", or "<no rows>").
pub async fn first(c: &Client, sql: &str) -> String {
    let rows = c.simple_query(sql).await.unwrap();
    rows.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("NULL").to_string()),
            _ => None,
        })
        .unwrap_or_else(|| "<no rows>".into())
}

/// Read until the result is `want` (bounded); returns how long it took.
pub async fn until(c: &Client, sql: &str, want: &str) -> Duration {
    let t = Instant::now();
    loop {
        let got = first(c, sql).await;
        if got == want {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{sql}: still {got}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Read until a repeated read is served from the cache. Background work (a
/// catalog re-read after DDL, say) may invalidate a first fill; the entry must
/// become cached within a bounded time.
pub async fn warm(p: &Pgtier, c: &Client, sql: &str, want: &str) {
    let t = Instant::now();
    loop {
        assert_eq!(first(c, sql).await, want);
        let before = p.metrics().await.hits();
        assert_eq!(first(c, sql).await, want);
        if p.metrics().await.hits() - before == 1.0 {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{sql} is never served from the cache"
        );
    }
}

/// The watch sequence of `table`: 2 while its writes are announced, 1 after.
pub async fn announced(d: &tokio_postgres::Client, table: &str) -> i64 {
    d.query_one(
        "select coalesce(pg_sequence_last_value(('pgtier.w' || $1::text::regclass::oid)::regclass), 0)",
        &[&table],
    )
    .await
    .unwrap()
    .get(0)
}

/// Bounded wait for a table's announcing to be switched to `want`.
pub async fn until_announced(d: &tokio_postgres::Client, table: &str, want: i64) {
    let t = Instant::now();
    while announced(d, table).await != want {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{table}: watch sequence never became {want}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
