//! Key-reporting trigger tests' shared pieces: a connection that LISTENs on
//! the test channel, a database with pgtier's triggers installed and tables
//! watched, and column-set registration.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls};

use super::{direct, fresh_db, require_postgres, PG_HOST, PG_PORT};
use pgtier::invalidation::catalog::Catalog;
use pgtier::invalidation::keyed;
use pgtier::invalidation::triggers::{self, Scope};

pub const CHANNEL: &str = "ch";
pub const PATIENCE: Duration = Duration::from_secs(5);

/// Notifications on `CHANNEL`, as received by a listening connection.
pub struct Listener {
    pub client: Client,
    rx: mpsc::UnboundedReceiver<String>,
}

impl Listener {
    pub async fn new(db: &str) -> Listener {
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
                    if tx.send(n.payload().to_string()).is_err() {
                        break;
                    }
                }
            }
        });
        client
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .await
            .expect("listen");
        Listener { client, rx }
    }

    /// The next write announcement (DDL announcements are skipped).
    pub async fn next(&mut self) -> String {
        loop {
            let p = tokio::time::timeout(Duration::from_secs(5), self.rx.recv())
                .await
                .expect("a notification within 5 s")
                .expect("listener alive");
            if !p.starts_with('d') {
                return p;
            }
        }
    }

    /// The next `k` payload, parsed: [schema, table, [[cols, [values...]]...]].
    pub async fn next_keys(&mut self) -> Value {
        let p = self.next().await;
        println!("payload: {p}");
        let json = p
            .strip_prefix('k')
            .unwrap_or_else(|| panic!("not a k payload: {p}"));
        serde_json::from_str(json).unwrap_or_else(|e| panic!("{p}: {e}"))
    }

    /// Nothing was announced before `writer`'s marker: notifications arrive in
    /// commit order, so anything its earlier commits sent comes first.
    pub async fn nothing_before_marker(&mut self, writer: &Client) {
        writer
            .batch_execute(&format!("NOTIFY {CHANNEL}, 'marker'"))
            .await
            .expect("marker");
        assert_eq!(self.next().await, "marker", "an unexpected notification");
    }
}

/// A database with `ddl` run, pgtier's triggers installed and `tables` watched.
pub async fn setup(db: &str, ddl: &str, tables: &[&str]) -> Client {
    require_postgres();
    fresh_db(db).await;
    let c = direct(db).await;
    c.batch_execute(ddl).await.expect("ddl");
    triggers::install(&c, CHANNEL, &Scope::default(), false, false)
        .await
        .expect("install");
    let mut oids = Vec::new();
    for t in tables {
        oids.push(table_oid(&c, t).await);
    }
    let watched = triggers::watch(&c, &oids, PATIENCE).await.expect("watch");
    assert_eq!(watched, oids, "every table watched");
    c
}

pub async fn table_oid(c: &Client, table: &str) -> u32 {
    let oid: i64 = c
        .query_one("SELECT $1::text::regclass::oid::int8", &[&table])
        .await
        .expect("oid")
        .get(0);
    oid as u32
}

pub async fn register(c: &Client, table: &str, cols: &[&str]) -> bool {
    let catalog = Catalog::load(c, 1).await.expect("catalog");
    let oid = table_oid(c, table).await;
    let cols: Vec<String> = cols.iter().map(|s| s.to_string()).collect();
    keyed::register(c, CHANNEL, &catalog, oid, &cols, PATIENCE)
        .await
        .expect("register")
}

/// The table-level payload exactly as the triggers send it.
pub fn table_level(schema: &str, table: &str) -> String {
    format!("w[[{}, {}]]", json!(schema), json!(table))
}
