//! The shared tier: Redis (single node or cluster), consulted after an L1 miss
//! and filled after a Postgres result, never on the client's critical path for
//! writes, and never allowed to make a client wait longer than `l2.timeout`.
//!
//! Keys: `<prefix>:3:<hash>`, the hash covering the L1 key, the database's L2
//! epoch and the generation of every table the result read (see
//! `invalidation::DbState::l2_key`): an invalidated or racing entry is simply
//! never looked up again. Values: the encoded reply with lengths, signed with
//! the deployment's key over (Redis key, value) (see `value`); anything that
//! does not verify and decode is a miss. Redis is not trusted: without a
//! signing key there is no L2.

mod breaker;
mod value;

use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use metrics::{counter, gauge};
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;

use crate::config::L2Config;
pub use crate::signing::Signer;
use breaker::Breaker;
pub use value::{decode, encode, Reject};

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    async fn query<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        match self {
            Conn::Single(c) => cmd.query_async(c).await,
            Conn::Cluster(c) => cmd.query_async(c).await,
        }
    }
}

thread_local! {
    /// One connection per session worker thread, so requests and their replies
    /// never hop between threads. Tagged with the L2 instance that made it.
    static CONN: RefCell<Option<(u64, u64, Conn)>> = const { RefCell::new(None) };
    static CONNECTING: RefCell<bool> = const { RefCell::new(false) };
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

pub struct L2 {
    id: u64,
    /// Bumped when the breaker opens: every worker then drops its connection
    /// and dials afresh when Redis is tried again, instead of trusting a
    /// client whose own reconnect schedule may lag behind.
    conn_gen: AtomicU64,
    nodes: Vec<String>,
    cluster: bool,
    prefix: String,
    timeout: Duration,
    connect_timeout: Duration,
    max_value: usize,
    tls: TlsFiles,
    breaker: Breaker,
    signer: Signer,
}

/// Where the TLS material for rediss:// lives; read at each connect, so renewed
/// certificates are picked up by the next connection.
struct TlsFiles {
    ca: Option<PathBuf>,
    cert_key: Option<(PathBuf, PathBuf)>,
}

impl TlsFiles {
    /// None when the system's roots and no client certificate will do.
    fn load(&self) -> redis::RedisResult<Option<redis::TlsCertificates>> {
        if self.ca.is_none() && self.cert_key.is_none() {
            return Ok(None);
        }
        let read = |what: &str, p: &PathBuf| {
            std::fs::read(p).map_err(|e| {
                redis::RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "cannot read a TLS file",
                    format!("{what} {}: {e}", p.display()),
                ))
            })
        };
        let root_cert = self
            .ca
            .as_ref()
            .map(|p| read("l2.tls_ca_file", p))
            .transpose()?;
        let client_tls = match &self.cert_key {
            Some((cert, key)) => Some(redis::ClientTlsConfig {
                client_cert: read("l2.tls_cert_file", cert)?,
                client_key: read("l2.tls_key_file", key)?,
            }),
            None => None,
        };
        Ok(Some(redis::TlsCertificates {
            client_tls,
            root_cert,
        }))
    }
}

pub enum Lookup {
    Hit(Option<Bytes>, Bytes),
    Miss,
    /// Not asked (breaker open, not connected yet) or failed.
    Unavailable,
}

impl L2 {
    pub fn new(cfg: &L2Config) -> Option<L2> {
        let nodes = cfg.nodes();
        if nodes.is_empty() {
            return None;
        }
        // Validation refuses L2 without a key; a key file that became
        // unreadable since then leaves L2 off rather than unsigned.
        let key = match crate::signing::load_key(
            cfg.signing_key.as_deref(),
            cfg.signing_key_file.as_deref(),
        ) {
            Ok(Some(k)) => k,
            Ok(None) => {
                tracing::error!("l2: no signing key (l2.signing_key); running without L2");
                return None;
            }
            Err(e) => {
                tracing::error!(error = %e, "l2.signing_key: running without L2");
                return None;
            }
        };
        gauge!("pgtier_l2_breaker_state").set(0.0);
        Some(L2 {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            conn_gen: AtomicU64::new(0),
            nodes,
            cluster: cfg.cluster,
            prefix: cfg.prefix.clone(),
            timeout: cfg.timeout.0,
            connect_timeout: cfg.connect_timeout.0,
            max_value: cfg.max_value_size.0 as usize,
            tls: TlsFiles {
                ca: cfg.tls_ca_file.clone(),
                cert_key: cfg.tls_cert_file.clone().zip(cfg.tls_key_file.clone()),
            },
            breaker: Breaker::new(cfg.breaker_failures, cfg.breaker_cooldown.0),
            signer: Signer::new(&key),
        })
    }

    pub fn key(&self, hash: u128) -> String {
        format!("{}:3:{hash:032x}", self.prefix)
    }

    async fn connect(&self) -> redis::RedisResult<Conn> {
        let certs = self.tls.load()?;
        if self.cluster {
            let mut builder = redis::cluster::ClusterClient::builder(self.nodes.clone())
                .connection_timeout(self.connect_timeout)
                .response_timeout(self.timeout.max(Duration::from_millis(50)));
            if let Some(certs) = certs {
                builder = builder.certs(certs);
            }
            let client = builder.build()?;
            Ok(Conn::Cluster(client.get_async_connection().await?))
        } else {
            let client = match certs {
                Some(certs) => redis::Client::build_with_tls(self.nodes[0].as_str(), certs)?,
                None => redis::Client::open(self.nodes[0].as_str())?,
            };
            let cfg = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(self.connect_timeout))
                .set_response_timeout(Some(self.timeout.max(Duration::from_millis(50))))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_millis(500));
            Ok(Conn::Single(
                client.get_connection_manager_with_config(cfg).await?,
            ))
        }
    }

    /// Open this worker thread's connection ahead of the first request.
    pub async fn warm_up(self: Arc<Self>) {
        if self.conn().is_none() {
            // conn() started the connect task; nothing to wait for here.
            tokio::task::yield_now().await;
        }
    }

    /// This thread's connection, or start making one (the request goes on
    /// without L2 meanwhile).
    fn conn(self: &Arc<Self>) -> Option<Conn> {
        let gen = self.conn_gen.load(Ordering::Acquire);
        let found = CONN.with(|c| match &*c.borrow() {
            Some((id, g, conn)) if *id == self.id && *g == gen => Some(conn.clone()),
            _ => None,
        });
        if found.is_some() {
            return found;
        }
        let already = CONNECTING.with(|c| std::mem::replace(&mut *c.borrow_mut(), true));
        if !already {
            // Spawned from a session worker (a current-thread runtime), the task
            // and the connection it makes stay on this thread.
            let this = self.clone();
            tokio::spawn(async move {
                let this = this;
                match tokio::time::timeout(this.connect_timeout * 2, this.connect()).await {
                    Ok(Ok(conn)) => {
                        CONN.with(|c| *c.borrow_mut() = Some((this.id, gen, conn)));
                        this.breaker.success();
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "cannot connect to Redis");
                        this.fail(this.breaker.now_ms());
                    }
                    Err(_) => this.fail(this.breaker.now_ms()),
                }
                CONNECTING.with(|c| *c.borrow_mut() = false);
            });
        }
        None
    }

    fn forget_conn(&self) {
        CONN.with(|c| {
            let mut c = c.borrow_mut();
            if c.as_ref().is_some_and(|(id, _, _)| *id == self.id) {
                *c = None;
            }
        });
    }

    /// A call begun at `started` (ms, the breaker's clock) failed.
    fn fail(&self, started: u64) {
        if self.breaker.failure(started) {
            self.conn_gen.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Look a key up, within the timeout.
    pub async fn get(self: &Arc<Self>, hash: u128) -> Lookup {
        if !self.breaker.allow() {
            return Lookup::Unavailable;
        }
        let Some(mut conn) = self.conn() else {
            self.breaker.abandon_probe();
            return Lookup::Unavailable;
        };
        let key = self.key(hash);
        let cmd = redis::cmd("GET").arg(&key).to_owned();
        let started = self.breaker.now_ms();
        match tokio::time::timeout(self.timeout, conn.query::<Option<Vec<u8>>>(&cmd)).await {
            Ok(Ok(v)) => {
                self.breaker.success();
                match v {
                    None => Lookup::Miss,
                    Some(v) => match decode(&self.signer, key.as_bytes(), Bytes::from(v)) {
                        Ok((rd, rows)) => Lookup::Hit(rd, rows),
                        Err(why) => {
                            counter!("pgtier_l2_errors_total", "kind" => why.label()).increment(1);
                            Lookup::Miss
                        }
                    },
                }
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "Redis GET failed");
                counter!("pgtier_l2_errors_total", "kind" => "error").increment(1);
                self.fail(started);
                if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
                    // Start over with a fresh connection on the next attempt rather
                    // than rely on the client's own reconnect schedule.
                    self.forget_conn();
                }
                Lookup::Unavailable
            }
            Err(_) => {
                counter!("pgtier_l2_errors_total", "kind" => "timeout").increment(1);
                self.fail(started);
                Lookup::Unavailable
            }
        }
    }

    /// Store a result in the background; the caller does not wait.
    pub fn put(self: &Arc<Self>, hash: u128, row_desc: Option<&[u8]>, rows: &[u8], ttl: Duration) {
        if ttl.is_zero() || !self.breaker.allow() {
            return;
        }
        let key = self.key(hash);
        let value = encode(&self.signer, key.as_bytes(), row_desc, rows);
        if value.len() > self.max_value {
            counter!("pgtier_l2_writes_total", "result" => "too_large").increment(1);
            return;
        }
        let Some(mut conn) = self.conn() else { return };
        let cmd = redis::cmd("SET")
            .arg(key)
            .arg(value)
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64)
            .to_owned();
        let timeout = self.timeout * 4;
        tokio::spawn(async move {
            match tokio::time::timeout(timeout, conn.query::<()>(&cmd)).await {
                Ok(Ok(())) => counter!("pgtier_l2_writes_total", "result" => "stored").increment(1),
                Ok(Err(e)) => {
                    // A full Redis (OOM) refuses writes but still serves reads:
                    // counted, not held against the breaker.
                    tracing::debug!(error = %e, "Redis SET failed");
                    counter!("pgtier_l2_writes_total", "result" => "error").increment(1);
                }
                Err(_) => counter!("pgtier_l2_writes_total", "result" => "timeout").increment(1),
            }
        });
    }
}
