//! The shared tier: Redis (single node or cluster), consulted after an L1 miss
//! and filled after a Postgres result, never on the client's critical path for
//! writes, and never allowed to make a client wait longer than `l2.timeout`.
//!
//! Keys: `<prefix>:2:<hash>`, the hash covering the L1 key, the database's L2
//! epoch and the generation of every table the result read (see
//! `invalidation::DbState::l2_key`): an invalidated or racing entry is simply
//! never looked up again. Values: the encoded reply with lengths and a checksum;
//! anything that does not decode is a miss.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use metrics::{counter, gauge};
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;

use crate::config::L2Config;

const MAGIC: &[u8; 4] = b"PGT2";
const NO_ROW_DESC: u32 = u32::MAX;

/// Encode a cached reply for Redis.
pub fn encode(row_desc: Option<&[u8]>, rows: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + row_desc.map_or(0, |r| r.len()) + rows.len());
    v.extend_from_slice(MAGIC);
    match row_desc {
        Some(rd) => {
            v.extend_from_slice(&(rd.len() as u32).to_le_bytes());
            v.extend_from_slice(rd);
        }
        None => v.extend_from_slice(&NO_ROW_DESC.to_le_bytes()),
    }
    v.extend_from_slice(&(rows.len() as u32).to_le_bytes());
    v.extend_from_slice(rows);
    let sum = xxhash_rust::xxh3::xxh3_64(&v);
    v.extend_from_slice(&sum.to_le_bytes());
    v
}

/// Decode a value; `None` if it is not one of ours or is damaged.
pub fn decode(v: Bytes) -> Option<(Option<Bytes>, Bytes)> {
    if v.len() < 4 + 4 + 4 + 8 || &v[..4] != MAGIC {
        return None;
    }
    let body = v.len() - 8;
    let sum = u64::from_le_bytes(v[body..].try_into().ok()?);
    if xxhash_rust::xxh3::xxh3_64(&v[..body]) != sum {
        return None;
    }
    let mut at = 4;
    let rd_len = u32::from_le_bytes(v[at..at + 4].try_into().ok()?);
    at += 4;
    let row_desc = if rd_len == NO_ROW_DESC {
        None
    } else {
        let end = at.checked_add(rd_len as usize).filter(|&e| e + 4 <= body)?;
        let rd = v.slice(at..end);
        at = end;
        Some(rd)
    };
    let rows_len = u32::from_le_bytes(v.get(at..at + 4)?.try_into().ok()?) as usize;
    at += 4;
    if at + rows_len != body {
        return None;
    }
    Some((row_desc, v.slice(at..body)))
}

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

/// Opens after repeated failures so a sick Redis costs nothing; lets one probe
/// through after the cooldown.
struct Breaker {
    failures: AtomicU32,
    /// When (ms since `origin`) the last counted failure was seen. Requests that
    /// were already in flight then fail for the same reason (one stall times out
    /// every pipelined request on the connection), so they do not count again.
    last_failure: AtomicU64,
    /// Milliseconds since `origin` until which the breaker is open; 0 = closed.
    open_until: AtomicU64,
    probing: AtomicBool,
    threshold: u32,
    cooldown: Duration,
    origin: Instant,
}

impl Breaker {
    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64 + 1
    }

    fn allow(&self) -> bool {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return true;
        }
        if self.now_ms() < until {
            return false;
        }
        // Half-open: exactly one request probes.
        let probe = self
            .probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if probe {
            gauge!("pgtier_l2_breaker_state").set(2.0);
        }
        probe
    }

    fn success(&self) {
        self.failures.store(0, Ordering::Release);
        if self.open_until.swap(0, Ordering::AcqRel) != 0 {
            tracing::info!("Redis answers again; L2 back in use");
            gauge!("pgtier_l2_breaker_state").set(0.0);
        }
        self.probing.store(false, Ordering::Release);
    }

    /// A probe that never reached Redis: let the next request probe instead.
    fn abandon_probe(&self) {
        self.probing.store(false, Ordering::Release);
    }

    /// A request that started at `started` (see [`Breaker::now_ms`]) failed.
    /// Returns true when this failure (re)opens the breaker.
    fn failure(&self, started: u64) -> bool {
        let was_probe = self.probing.swap(false, Ordering::AcqRel);
        let now = self.now_ms();
        let same_event = started < self.last_failure.load(Ordering::Acquire);
        if same_event && !was_probe {
            return false;
        }
        self.last_failure.fetch_max(now, Ordering::AcqRel);
        let n = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if n >= self.threshold || was_probe {
            let until = now + self.cooldown.as_millis() as u64;
            if self.open_until.swap(until, Ordering::AcqRel) == 0 {
                tracing::warn!(failures = n, "Redis failing; L2 bypassed (circuit open)");
            }
            gauge!("pgtier_l2_breaker_state").set(1.0);
            return true;
        }
        false
    }
}

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
    breaker: Breaker,
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
            breaker: Breaker {
                failures: AtomicU32::new(0),
                last_failure: AtomicU64::new(0),
                open_until: AtomicU64::new(0),
                probing: AtomicBool::new(false),
                threshold: cfg.breaker_failures,
                cooldown: cfg.breaker_cooldown.0,
                origin: Instant::now(),
            },
        })
    }

    pub fn key(&self, hash: u128) -> String {
        format!("{}:2:{hash:032x}", self.prefix)
    }

    async fn connect(&self) -> redis::RedisResult<Conn> {
        if self.cluster {
            let client = redis::cluster::ClusterClient::builder(self.nodes.clone())
                .connection_timeout(self.connect_timeout)
                .response_timeout(self.timeout.max(Duration::from_millis(50)))
                .build()?;
            Ok(Conn::Cluster(client.get_async_connection().await?))
        } else {
            let client = redis::Client::open(self.nodes[0].as_str())?;
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
        let cmd = redis::cmd("GET").arg(self.key(hash)).to_owned();
        let started = self.breaker.now_ms();
        match tokio::time::timeout(self.timeout, conn.query::<Option<Vec<u8>>>(&cmd)).await {
            Ok(Ok(v)) => {
                self.breaker.success();
                match v {
                    None => Lookup::Miss,
                    Some(v) => match decode(Bytes::from(v)) {
                        Some((rd, rows)) => Lookup::Hit(rd, rows),
                        None => {
                            counter!("pgtier_l2_errors_total", "kind" => "corrupt").increment(1);
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
        let value = encode(row_desc, rows);
        if value.len() > self.max_value {
            counter!("pgtier_l2_writes_total", "result" => "too_large").increment(1);
            return;
        }
        let Some(mut conn) = self.conn() else { return };
        let cmd = redis::cmd("SET")
            .arg(self.key(hash))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(threshold: u32) -> Breaker {
        Breaker {
            failures: AtomicU32::new(0),
            last_failure: AtomicU64::new(0),
            open_until: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            threshold,
            cooldown: Duration::from_secs(60),
            origin: Instant::now() - Duration::from_secs(1),
        }
    }

    #[test]
    fn one_stall_counts_once_however_many_requests_it_times_out() {
        let b = breaker(3);
        let before = b.now_ms() - 10;
        // eight pipelined requests, all in flight when the connection stalled
        assert!(!b.failure(before));
        for _ in 0..7 {
            assert!(
                !b.failure(before),
                "requests of the same stall opened the breaker"
            );
        }
        assert!(b.allow());
        // requests begun after each failure are independent evidence
        std::thread::sleep(Duration::from_millis(2));
        assert!(!b.failure(b.now_ms()));
        std::thread::sleep(Duration::from_millis(2));
        assert!(
            b.failure(b.now_ms()),
            "three independent failures must open it"
        );
        assert!(!b.allow());
    }

    #[test]
    fn a_success_resets_the_count() {
        let b = breaker(2);
        assert!(!b.failure(b.now_ms()));
        b.success();
        std::thread::sleep(Duration::from_millis(2));
        assert!(!b.failure(b.now_ms()));
        assert!(b.allow());
    }

    #[test]
    fn values_roundtrip_and_damage_is_detected() {
        let v = encode(Some(b"T-row-desc"), b"D-rows-C");
        let (rd, rows) = decode(Bytes::from(v.clone())).unwrap();
        assert_eq!(rd.as_deref(), Some(&b"T-row-desc"[..]));
        assert_eq!(&rows[..], b"D-rows-C");
        let v2 = encode(None, b"rows");
        assert_eq!(decode(Bytes::from(v2)).unwrap().0, None);
        for i in 0..v.len() {
            let mut bad = v.clone();
            bad[i] ^= 0x40;
            assert!(
                decode(Bytes::from(bad)).is_none(),
                "flipped byte {i} went unnoticed"
            );
        }
        assert!(decode(Bytes::from_static(b"garbage")).is_none());
        assert!(decode(Bytes::from(v[..v.len() - 1].to_vec())).is_none());
    }
}
