//! The admin console: a client connecting to the database `pgtier` (e.g.
//! `psql -p 6432 -U admin pgtier`) talks to pgtier itself, like PgBouncer's
//! admin database. Passwords are checked by pgtier (SCRAM-SHA-256 against
//! verifiers in `admin.users`); the console is off unless users are configured.
//!
//! Commands: SHOW STATS, SHOW CACHES, SHOW CONFIG, SHOW CONNECTIONS,
//! INVALIDATE TABLE name, INVALIDATE ALL, RELOAD.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;

use super::throttle::LoginThrottle;
use crate::config::ConfigError;
use crate::invalidation::{control, Payload};
use crate::protocol::backend::{
    encode_data_row, encode_row_description, Authentication, BackendKeyData, Column,
    CommandComplete, ErrorResponse, ParameterStatus, ReadyForQuery, Severity,
};
use crate::protocol::codec::Reader;
use crate::protocol::startup::StartupMessage;
use crate::protocol::{frontend, TxStatus};
use crate::proxy::accept::{Handed, Handover};
use crate::proxy::conn::write_all;
use crate::proxy::startup::{fatal, read_message, ClientConn};
use crate::proxy::state::Proxy;
use crate::scram::{Exchange, Failure, Verifier};
use crate::tls::TlsError;

pub const DATABASE: &str = "pgtier";
const TEXT: i32 = 25;
const MAX_MESSAGE: usize = 1 << 20;

type Rows = (Vec<&'static str>, Vec<Vec<Option<String>>>);

/// The admin console as the proxy's handover for its database: shared state
/// across console connections.
#[derive(Default)]
pub struct ConsoleService {
    throttle: LoginThrottle,
}

#[async_trait::async_trait]
impl Handover for ConsoleService {
    fn database(&self) -> &str {
        DATABASE
    }

    async fn serve(self: Arc<Self>, proxy: Arc<Proxy>, client: ClientConn, handed: Handed) {
        let console = Console {
            addr: handed
                .peer
                .parse::<std::net::SocketAddr>()
                .ok()
                .map(|a| a.ip()),
            auth_timeout: handed.auth_timeout,
            negotiate: handed.negotiate,
        };
        console
            .serve(
                proxy,
                &self.throttle,
                client,
                handed.startup,
                handed.leftover,
            )
            .await;
    }
}

/// How a console connection is to be served.
pub struct Console {
    /// The client's address, for the failed-login throttle.
    pub addr: Option<std::net::IpAddr>,
    /// The whole password exchange must finish within this.
    pub auth_timeout: Duration,
    /// `_pq_.` options and minor version to report in NegotiateProtocolVersion.
    pub negotiate: Option<(u16, Vec<String>)>,
}

impl Console {
    pub async fn serve(
        self,
        proxy: Arc<Proxy>,
        throttle: &LoginThrottle,
        mut client: ClientConn,
        startup: StartupMessage,
        mut buf: BytesMut,
    ) {
        let user = startup.user().unwrap_or_default().to_string();
        let login = login(&proxy, &self, throttle, &mut client, &mut buf, &user);
        match tokio::time::timeout(self.auth_timeout, login).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(_) => {
                tracing::warn!(%user, "admin console: authentication timed out");
                fatal(&mut client, "08006", "pgtier: authentication timed out").await;
                return;
            }
        }
        session(proxy, client, buf, &user).await;
    }
}

/// The startup and password exchange; true once the user is logged in.
async fn login(
    proxy: &Proxy,
    console: &Console,
    throttle: &LoginThrottle,
    client: &mut ClientConn,
    buf: &mut BytesMut,
    user: &str,
) -> bool {
    let cfg = proxy.config();
    if cfg.admin.users.is_empty() {
        fatal(
            client,
            "3D000",
            "the pgtier admin console is not enabled (configure admin.users)",
        )
        .await;
        return false;
    }
    if let Some(a) = console.addr {
        if !throttle.allowed(a) {
            tracing::warn!(%user, addr = %a, "admin console: too many failed logins");
            fatal(
                client,
                "28000",
                "too many failed admin console logins from this address; try again later",
            )
            .await;
            return false;
        }
    }
    if console.negotiate.is_some() {
        let mut out = BytesMut::new();
        crate::protocol::backend::NegotiateProtocolVersion {
            newest_minor: 0,
            unrecognized: &[],
        }
        .encode(&mut out);
        let _ = write_all(client, &out).await;
    }
    let verifier = cfg
        .admin
        .users
        .iter()
        .find(|u| u.name == user)
        .and_then(|u| Verifier::parse(&u.password));
    let known = verifier.is_some();
    match authenticate(client, buf, verifier.unwrap_or_else(Verifier::decoy)).await {
        Ok(()) if known => true,
        Ok(()) | Err(Failure::Rejected) => {
            tracing::warn!(%user, "admin console: authentication failed");
            // Only a checked password counts: clients such as psql hang up at the
            // password request and reconnect with one, which guesses nothing.
            if let Some(a) = console.addr {
                throttle.failed(a);
            }
            fatal(
                client,
                "28P01",
                &format!("password authentication failed for user \"{user}\""),
            )
            .await;
            false
        }
        Err(Failure::Malformed(why)) => {
            fatal(client, "08P01", why).await;
            false
        }
    }
}

/// A logged-in console session, until the client leaves.
async fn session(proxy: Arc<Proxy>, mut client: ClientConn, mut buf: BytesMut, user: &str) {
    tracing::info!(%user, "admin console session");
    let mut out = BytesMut::new();
    Authentication::Ok.encode(&mut out);
    for (k, v) in [
        ("server_version", "15.0 (pgtier admin console)"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("TimeZone", "UTC"),
    ] {
        ParameterStatus {
            name: k.as_bytes(),
            value: v.as_bytes(),
        }
        .encode(&mut out);
    }
    BackendKeyData { pid: 0, secret: 0 }.encode(&mut out);
    ReadyForQuery {
        status: TxStatus::Idle,
    }
    .encode(&mut out);
    if write_all(&mut client, &out).await.is_err() {
        return;
    }
    let mut skipping = false;
    loop {
        let Ok((tag, msg)) = read_message(&mut client, &mut buf, MAX_MESSAGE).await else {
            return;
        };
        let mut out = BytesMut::new();
        match tag {
            b'Q' => {
                let sql = Reader::new(tag, &msg[5..])
                    .cstr("query")
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .unwrap_or_default();
                for stmt in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                    if !run(&proxy, stmt, &mut out).await {
                        break;
                    }
                }
                ReadyForQuery {
                    status: TxStatus::Idle,
                }
                .encode(&mut out);
            }
            frontend::TERMINATE => return,
            frontend::SYNC => {
                skipping = false;
                ReadyForQuery {
                    status: TxStatus::Idle,
                }
                .encode(&mut out);
            }
            _ if !skipping => {
                skipping = true;
                error(
                    &mut out,
                    "0A000",
                    "the admin console understands only simple queries",
                );
            }
            _ => {}
        }
        if write_all(&mut client, &out).await.is_err() {
            return;
        }
    }
}

async fn authenticate(
    client: &mut ClientConn,
    buf: &mut BytesMut,
    verifier: Verifier,
) -> Result<(), Failure> {
    let io = |_| Failure::Malformed("connection lost during authentication");
    let mut out = BytesMut::new();
    Authentication::Sasl {
        mechanisms: vec![b"SCRAM-SHA-256"],
    }
    .encode(&mut out);
    write_all(client, &out).await.map_err(io)?;
    let (tag, msg) = read_message(client, buf, MAX_MESSAGE)
        .await
        .map_err(|_| Failure::Malformed("connection lost during authentication"))?;
    if tag != frontend::PASSWORD {
        return Err(Failure::Malformed("expected a SASL initial response"));
    }
    let mut r = Reader::new(tag, &msg[5..]);
    let mech = r
        .cstr("mechanism")
        .map_err(|_| Failure::Malformed("bad SASL initial response"))?;
    if mech != b"SCRAM-SHA-256" {
        return Err(Failure::Malformed("unsupported SASL mechanism"));
    }
    let len = r
        .i32("length")
        .map_err(|_| Failure::Malformed("bad SASL initial response"))?;
    let first = r
        .bytes(len.max(0) as usize, "data")
        .map_err(|_| Failure::Malformed("bad SASL initial response"))?;
    let first =
        std::str::from_utf8(first).map_err(|_| Failure::Malformed("SASL data is not UTF-8"))?;
    let (exchange, server_first) = Exchange::start(verifier, first)?;
    out.clear();
    Authentication::SaslContinue(server_first.as_bytes()).encode(&mut out);
    write_all(client, &out).await.map_err(io)?;
    let (tag, msg) = read_message(client, buf, MAX_MESSAGE)
        .await
        .map_err(|_| Failure::Malformed("connection lost during authentication"))?;
    if tag != frontend::PASSWORD {
        return Err(Failure::Malformed("expected a SASL response"));
    }
    let fin =
        std::str::from_utf8(&msg[5..]).map_err(|_| Failure::Malformed("SASL data is not UTF-8"))?;
    let server_final = exchange.finish(fin)?;
    out.clear();
    Authentication::SaslFinal(server_final.as_bytes()).encode(&mut out);
    write_all(client, &out).await.map_err(io)?;
    Ok(())
}

fn error(out: &mut BytesMut, code: &str, message: &str) {
    ErrorResponse {
        severity: Severity::Error,
        code,
        message,
    }
    .encode(out);
}

fn rows(out: &mut BytesMut, (columns, rows): Rows, tag: &str) {
    let cols: Vec<Column<'_>> = columns
        .iter()
        .map(|c| Column {
            name: c,
            type_oid: TEXT,
        })
        .collect();
    encode_row_description(out, &cols);
    for r in &rows {
        let values: Vec<Option<&[u8]>> =
            r.iter().map(|v| v.as_deref().map(str::as_bytes)).collect();
        encode_data_row(out, &values);
    }
    CommandComplete {
        tag: format!("{tag} {}", rows.len()).as_bytes(),
    }
    .encode(out);
}

fn complete(out: &mut BytesMut, tag: &str) {
    CommandComplete {
        tag: tag.as_bytes(),
    }
    .encode(out);
}

/// Run one command; false after an error (the rest of the string is skipped).
async fn run(proxy: &Arc<Proxy>, stmt: &str, out: &mut BytesMut) -> bool {
    let words: Vec<&str> = stmt.split_whitespace().collect();
    let upper: Vec<String> = words.iter().map(|w| w.to_ascii_uppercase()).collect();
    let upper: Vec<&str> = upper.iter().map(String::as_str).collect();
    match upper.as_slice() {
        ["SHOW", "STATS"] => rows(out, show_stats(proxy), "SHOW"),
        ["SHOW", "CACHES"] => rows(out, show_caches(proxy), "SHOW"),
        ["SHOW", "CONFIG"] => rows(out, show_config(proxy), "SHOW"),
        ["SHOW", "CONNECTIONS"] => rows(out, show_connections(proxy), "SHOW"),
        ["INVALIDATE", "ALL"] | ["INVALIDATE", "TABLE", _] => {
            match invalidate(proxy, words.get(2).copied()).await {
                Ok(n) => complete(out, &format!("INVALIDATE {n}")),
                Err(e) => {
                    error(out, e.sqlstate(), &e.to_string());
                    return false;
                }
            }
        }
        ["RELOAD"] => match proxy.reload() {
            Ok(notes) => {
                for n in notes {
                    ErrorResponse {
                        severity: Severity::Notice,
                        code: "00000",
                        message: &n,
                    }
                    .encode(out);
                }
                complete(out, "RELOAD");
            }
            Err(e) => {
                error(out, "F0000", &format!("configuration not reloaded: {e}"));
                return false;
            }
        },
        _ => {
            error(
                out,
                "42601",
                &format!(
                    "unknown admin command \"{stmt}\"; try SHOW STATS, SHOW CACHES, SHOW CONFIG, \
                     SHOW CONNECTIONS, INVALIDATE TABLE name, INVALIDATE ALL, RELOAD"
                ),
            );
            return false;
        }
    }
    true
}

/// Every pgtier metric sample, as rendered for Prometheus.
fn show_stats(proxy: &Proxy) -> Rows {
    let text = proxy.metrics_text();
    let mut rows = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() || line.contains("_bucket{") {
            continue;
        }
        if let Some((name, value)) = line.rsplit_once(' ') {
            rows.push(vec![Some(name.to_string()), Some(value.to_string())]);
        }
    }
    rows.sort();
    (vec!["metric", "value"], rows)
}

/// Per statement shape: traffic, what L1 holds for it, and its rule.
fn show_caches(proxy: &Proxy) -> Rows {
    let mut held: HashMap<u64, (u64, u64)> = HashMap::new();
    for (_, e) in proxy.cache.l1.entries() {
        let h = held.entry(e.shape).or_default();
        h.0 += 1;
        h.1 += e.payload_len() as u64;
    }
    let stats = crate::metrics::top_shapes(1000);
    let mut rows = Vec::new();
    for (shape, st) in stats {
        let info = crate::cache::shapes::get(shape);
        let (entries, bytes) = held.get(&shape).copied().unwrap_or_default();
        rows.push(vec![
            Some(format!("{shape:016x}")),
            info.as_ref().map(|i| i.text.clone()),
            Some(st.calls.to_string()),
            Some(st.hits.to_string()),
            Some(st.misses.to_string()),
            Some(format!(
                "{:.3}",
                st.seconds * 1000.0 / st.calls.max(1) as f64
            )),
            Some(entries.to_string()),
            Some(bytes.to_string()),
            info.as_ref()
                .map(|i| humantime::format_duration(i.ttl).to_string()),
            Some(match info.as_ref().and_then(|i| i.rule) {
                Some(r) => format!("cache.rules[{r}]"),
                None => "default".into(),
            }),
            info.map(|i| i.invalidation),
        ]);
    }
    (
        vec![
            "shape",
            "query",
            "calls",
            "hits",
            "misses",
            "avg_ms",
            "entries",
            "bytes",
            "ttl",
            "rule",
            "invalidation",
        ],
        rows,
    )
}

fn flatten(prefix: &str, v: &toml::Value, out: &mut Vec<Vec<Option<String>>>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        toml::Value::String(s) => out.push(vec![Some(prefix.to_string()), Some(s.clone())]),
        other => out.push(vec![Some(prefix.to_string()), Some(other.to_string())]),
    }
}

fn show_config(proxy: &Proxy) -> Rows {
    let mut rows = Vec::new();
    let mut cfg = proxy.config().redacted();
    for u in &mut cfg.admin.users {
        u.password = "****".into();
    }
    if let Ok(v) = toml::Value::try_from(&cfg) {
        flatten("", &v, &mut rows);
    }
    (vec!["key", "value"], rows)
}

fn show_connections(proxy: &Proxy) -> Rows {
    let mut rows = Vec::new();
    if let Ok(m) = proxy.sessions_info.lock() {
        let mut infos: Vec<_> = m.values().cloned().collect();
        infos.sort_by_key(|i| i.id);
        for i in infos {
            let state = match i.state.load(Ordering::Relaxed) {
                b'T' => "in transaction",
                b'E' => "failed transaction",
                _ => "idle",
            };
            let since = humantime::format_rfc3339_seconds(i.since).to_string();
            rows.push(vec![
                Some(i.id.to_string()),
                Some(i.peer.clone()),
                Some(i.user.clone()),
                Some(i.database.clone()),
                Some(state.to_string()),
                Some(i.requests.load(Ordering::Relaxed).to_string()),
                Some(since),
            ]);
        }
    }
    (
        vec![
            "id",
            "peer",
            "user",
            "database",
            "state",
            "requests",
            "connected_since",
        ],
        rows,
    )
}

/// Why an INVALIDATE did nothing.
#[derive(Debug, thiserror::Error)]
enum InvalidateError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot reach {target}: {source}")]
    Unreachable {
        target: String,
        source: tokio_postgres::Error,
    },
    #[error("notify in {target}: {source}")]
    Notify {
        target: String,
        source: tokio_postgres::Error,
    },
    #[error("relation \"{0}\" is not known in any cached database")]
    UnknownRelation(String),
}

impl InvalidateError {
    fn sqlstate(&self) -> &'static str {
        match self {
            InvalidateError::UnknownRelation(_) => "42P01",
            _ => "58000",
        }
    }
}

/// Invalidate through Postgres itself (a notification on the channel), so every
/// pgtier instance sharing the databases applies it, in order.
async fn invalidate(proxy: &Proxy, table: Option<&str>) -> Result<usize, InvalidateError> {
    let cfg = proxy.config();
    let targets = cfg.control_targets()?;
    if targets.is_empty() {
        if table.is_none() {
            proxy.cache.l1.clear();
        }
        return Ok(0);
    }
    let (tls, ssl) = control::tls_for(cfg.upstream.tls, cfg.upstream.tls_ca_file.as_deref())?;
    let mut n = 0;
    for t in &targets {
        let payload = match table {
            None => "*".to_string(),
            Some(name) => {
                let Some(db) = proxy.invalidation.db(&t.database) else {
                    continue;
                };
                let cat = db.catalog.load();
                let (schema, rel) = match name.split_once('.') {
                    Some((s, r)) => (Some(s), r),
                    None => (None, name),
                };
                let matches: Vec<(String, String)> = cat
                    .relations
                    .iter()
                    .filter(|r| r.name == rel && schema.is_none_or(|s| r.schema == s))
                    .map(|r| (r.schema.clone(), r.name.clone()))
                    .collect();
                if matches.is_empty() {
                    continue;
                }
                n += matches.len();
                Payload::write_payload(&matches)
            }
        };
        let (client, _driver) = control::connect(t, &tls, ssl, None)
            .await
            .map_err(|source| InvalidateError::Unreachable {
                target: t.display.clone(),
                source,
            })?;
        client
            .execute(
                "SELECT pg_notify($1, $2)",
                &[&cfg.invalidation.channel, &payload],
            )
            .await
            .map_err(|source| InvalidateError::Notify {
                target: t.display.clone(),
                source,
            })?;
        if table.is_none() {
            n += 1;
        }
    }
    if table.is_none() {
        proxy.cache.l1.clear();
        proxy.cache.clear_descriptions();
    } else if n == 0 {
        return Err(InvalidateError::UnknownRelation(
            table.unwrap_or_default().to_string(),
        ));
    }
    Ok(n)
}
