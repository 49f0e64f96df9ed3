//! Prometheus metrics. Hot-path counters are registered once and kept as
//! handles, so counting a cache hit is one atomic add, not a registry lookup.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};

use crate::bypass::BypassReason;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Handles to the counters touched on every request.
pub struct Hot {
    pub l1_hit: Counter,
    pub l1_stale: Counter,
    pub l1_miss: Counter,
    pub fills: Counter,
    pub fills_aborted: Counter,
    pub coalesced: Counter,
    /// L2 lookups by outcome (unavailable: breaker open, not connected, failed).
    pub l2_hit: Counter,
    pub l2_miss: Counter,
    pub l2_unavailable: Counter,
    pub client_connections: Gauge,
    pub upstream_connections: Gauge,
    /// Time from a complete request to its reply being queued, by source.
    pub latency_l1: Histogram,
    pub latency_l2: Histogram,
    pub latency_upstream: Histogram,
    pub client_bytes_in: Counter,
    pub client_bytes_out: Counter,
    pub upstream_bytes_in: Counter,
    pub upstream_bytes_out: Counter,
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
static HOT: OnceLock<Hot> = OnceLock::new();

/// Install the global recorder (once per process) and register the hot handles.
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        // Real histograms (buckets), not summaries: quantiles are computed in
        // Prometheus, across instances. Buckets in seconds, 50µs to 10s.
        const BUCKETS: &[f64] = &[
            0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
            0.5, 1.0, 2.5, 5.0, 10.0,
        ];
        let builder = || {
            PrometheusBuilder::new()
                .set_buckets(BUCKETS)
                .unwrap_or_else(|_| PrometheusBuilder::new())
        };
        let handle = builder()
            .install_recorder()
            .unwrap_or_else(|_| builder().build_recorder().handle());
        describe();
        handle
    })
}

pub fn hot() -> &'static Hot {
    HOT.get_or_init(|| Hot {
        l1_hit: counter!("pgtier_cache_lookups_total", "tier" => "l1", "outcome" => "hit", "reason" => ""),
        l1_stale: counter!("pgtier_cache_lookups_total", "tier" => "l1", "outcome" => "stale", "reason" => ""),
        l1_miss: counter!("pgtier_cache_lookups_total", "tier" => "l1", "outcome" => "miss", "reason" => ""),
        fills: counter!("pgtier_cache_fills_total", "result" => "stored"),
        fills_aborted: counter!("pgtier_cache_fills_total", "result" => "aborted"),
        coalesced: counter!("pgtier_cache_coalesced_total"),
        l2_hit: counter!("pgtier_cache_lookups_total", "tier" => "l2", "outcome" => "hit", "reason" => ""),
        l2_miss: counter!("pgtier_cache_lookups_total", "tier" => "l2", "outcome" => "miss", "reason" => ""),
        l2_unavailable: counter!("pgtier_cache_lookups_total", "tier" => "l2", "outcome" => "unavailable", "reason" => ""),
        client_connections: gauge!("pgtier_client_connections"),
        upstream_connections: gauge!("pgtier_upstream_connections"),
        latency_l1: histogram!("pgtier_query_duration_seconds", "source" => "l1"),
        latency_l2: histogram!("pgtier_query_duration_seconds", "source" => "l2"),
        latency_upstream: histogram!("pgtier_query_duration_seconds", "source" => "upstream"),
        client_bytes_in: counter!("pgtier_bytes_total", "peer" => "client", "direction" => "in"),
        client_bytes_out: counter!("pgtier_bytes_total", "peer" => "client", "direction" => "out"),
        upstream_bytes_in: counter!("pgtier_bytes_total", "peer" => "upstream", "direction" => "in"),
        upstream_bytes_out: counter!("pgtier_bytes_total", "peer" => "upstream", "direction" => "out"),
    })
}

/// A request that was not looked up in the cache, by reason.
pub fn bypass(reason: BypassReason) {
    tracing::debug!(reason = reason.label(), "cache bypass");
    static BYPASS: OnceLock<Vec<Counter>> = OnceLock::new();
    // One handle per reason, made once: a bypass costs an index, no lookup.
    let counters = BYPASS.get_or_init(|| {
        BypassReason::ALL
            .iter()
            .map(|r| counter!("pgtier_cache_lookups_total", "tier" => "l1", "outcome" => "bypass", "reason" => r.label()))
            .collect()
    });
    if let Some(c) = counters.get(reason as usize) {
        c.increment(1);
    }
}

/// Register every metric family with its known label sets (counters at 0), so
/// that a healthy instance that has not yet reloaded, reconnected or failed
/// shows those series at 0 rather than "No data" on dashboards and alerts.
/// Call before the listeners start (it sets their `connected` gauge to 0).
pub fn register_families(databases: &[String], l2: bool) {
    let _ = hot();
    for result in ["ok", "error"] {
        counter!("pgtier_config_reloads_total", "result" => result).increment(0);
    }
    counter!("pgtier_fence_timeouts_total").increment(0);
    for kind in ["probe", "notify", "lsn"] {
        counter!("pgtier_fences_total", "kind" => kind).increment(0);
    }
    for result in ["filled", "dropped", "failed"] {
        counter!("pgtier_warm_refreshes_total", "result" => result).increment(0);
    }
    if l2 {
        for kind in [
            "timeout",
            "error",
            "corrupt",
            "bad_signature",
            "bad_framing",
        ] {
            counter!("pgtier_l2_errors_total", "kind" => kind).increment(0);
        }
        for result in ["stored", "too_large", "error", "timeout"] {
            counter!("pgtier_l2_writes_total", "result" => result).increment(0);
        }
        gauge!("pgtier_l2_breaker_state").set(0.0);
    }
    for db in databases {
        let db = db.clone();
        counter!("pgtier_listener_reconnects_total", "database" => db.clone()).increment(0);
        for level in ["table", "key"] {
            counter!("pgtier_invalidations_total", "database" => db.clone(), "level" => level)
                .increment(0);
        }
        counter!("pgtier_invalidation_notifications_total", "database" => db.clone()).increment(0);
        counter!("pgtier_unwatches_total", "database" => db.clone()).increment(0);
        for kind in ["fence", "epoch"] {
            counter!("pgtier_control_notifications_rejected_total", "database" => db.clone(), "kind" => kind)
                .increment(0);
        }
        gauge!("pgtier_listener_connected", "database" => db.clone()).set(0.0);
        gauge!("pgtier_listener_lag_last_seconds", "database" => db.clone()).set(0.0);
        let _ = histogram!("pgtier_listener_lag_seconds", "database" => db);
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge};
    describe_counter!(
        "pgtier_cache_lookups_total",
        "Cache lookups by tier and outcome (hit, stale, miss, bypass with a reason)"
    );
    describe_counter!(
        "pgtier_cache_fills_total",
        "Results captured from Postgres for the cache (stored, or aborted: error, too large, rolled back)"
    );
    describe_counter!(
        "pgtier_cache_coalesced_total",
        "Misses that waited for an identical miss already running in another session"
    );
    describe_gauge!("pgtier_client_connections", "Open client connections");
    describe_gauge!(
        "pgtier_upstream_connections",
        "Open connections to Postgres for client sessions"
    );
    metrics::describe_histogram!(
        "pgtier_query_duration_seconds",
        metrics::Unit::Seconds,
        "Time from a complete client request to its reply, by source (l1, l2, upstream)"
    );
    describe_counter!(
        "pgtier_bytes_total",
        "Bytes moved, by peer (client, upstream) and direction"
    );
    describe_counter!(
        "pgtier_l2_errors_total",
        "Redis calls that failed, by kind (timeout, error), and values refused as misses (corrupt, bad_signature, bad_framing)"
    );
    describe_gauge!(
        "pgtier_l2_breaker_state",
        "L2 circuit breaker: 0 closed, 1 open, 2 half-open"
    );
    describe_counter!(
        "pgtier_l2_writes_total",
        "Results written to Redis, by result"
    );
    describe_counter!(
        "pgtier_invalidations_total",
        "Table invalidations applied, by database"
    );
    describe_counter!(
        "pgtier_key_fallbacks_total",
        "Reads of a key-level shape left table-level, by reason (null, too_many, unreadable, encoding, column_type, collation, read_again, slot_shared)"
    );
    describe_counter!(
        "pgtier_invalidation_notifications_total",
        "Notifications received on the invalidation channel, by database"
    );
    describe_gauge!(
        "pgtier_listener_connected",
        "1 while the invalidation listener of a database is connected"
    );
    metrics::describe_histogram!(
        "pgtier_listener_lag_seconds",
        metrics::Unit::Seconds,
        "Time from a notification's arrival to its invalidation being applied"
    );
    describe_counter!(
        "pgtier_listener_reconnects_total",
        "Invalidation listener reconnections, by database"
    );
    describe_counter!(
        "pgtier_fence_timeouts_total",
        "Read-your-writes fences that timed out"
    );
    describe_counter!(
        "pgtier_fences_total",
        "Read-your-writes fences after writes, by kind (probe: a query on the listening connection; notify: a NOTIFY of their own; lsn: a WAL position)"
    );
    describe_counter!(
        "pgtier_warm_refreshes_total",
        "Hot entries refreshed after their invalidation, by result (filled, dropped, failed)"
    );
    describe_counter!(
        "pgtier_control_notifications_rejected_total",
        "Forged or replayed control notifications ignored, by database and kind (fence, epoch)"
    );
    describe_counter!(
        "pgtier_config_reloads_total",
        "Configuration reloads, by result (ok, error)"
    );
    describe_gauge!("pgtier_l1_entries", "Entries in the L1 cache");
    describe_gauge!(
        "pgtier_l1_bytes",
        "Weighted size of the L1 cache (payload plus overhead), bytes"
    );
}

/// What the L1 holds right now: sampled for each render, not counted.
#[derive(Clone, Copy, Debug, Default)]
pub struct L1Sample {
    pub entries: u64,
    /// Weighted size (payload plus overhead).
    pub bytes: u64,
}

/// Render the exposition text, setting the sampled L1 gauges from `l1`, and
/// appending the top `top` statement shapes.
pub fn render(l1: L1Sample, top: usize) -> String {
    gauge!("pgtier_l1_entries").set(l1.entries as f64);
    gauge!("pgtier_l1_bytes").set(l1.bytes as f64);
    let mut out = install().render();
    let shapes = top_shapes(top);
    if !shapes.is_empty() {
        use std::fmt::Write;
        for (name, help, kind) in [
            (
                "pgtier_statement_calls_total",
                "Requests per statement shape (top shapes by traffic)",
                "counter",
            ),
            (
                "pgtier_statement_hits_total",
                "Cache hits per statement shape",
                "counter",
            ),
            (
                "pgtier_statement_misses_total",
                "Cache misses per statement shape",
                "counter",
            ),
            (
                "pgtier_statement_duration_seconds",
                "Time per request, per statement shape",
                "summary",
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (shape, st) in &shapes {
                let label = format!("{{shape=\"{shape:016x}\"}}");
                let _ = match name {
                    "pgtier_statement_calls_total" => writeln!(out, "{name}{label} {}", st.calls),
                    "pgtier_statement_hits_total" => writeln!(out, "{name}{label} {}", st.hits),
                    "pgtier_statement_misses_total" => writeln!(out, "{name}{label} {}", st.misses),
                    _ => writeln!(
                        out,
                        "{name}_sum{label} {}\n{name}_count{label} {}",
                        st.seconds, st.calls
                    ),
                };
            }
        }
    }
    out
}

/// Traffic of one statement shape (pg_query fingerprint).
#[derive(Clone, Copy, Debug, Default)]
pub struct ShapeStat {
    pub calls: u64,
    pub hits: u64,
    pub misses: u64,
    pub seconds: f64,
}

/// Per-shape tables, one per worker thread (uncontended locks), summed on read.
type ShapeTable = Arc<Mutex<HashMap<u64, ShapeStat>>>;

/// Shapes tracked per worker; beyond that, traffic is counted under shape 0.
const MAX_SHAPES: usize = 10_000;

fn tables() -> &'static Mutex<Vec<ShapeTable>> {
    static ALL: OnceLock<Mutex<Vec<ShapeTable>>> = OnceLock::new();
    ALL.get_or_init(|| Mutex::new(Vec::new()))
}

thread_local! {
    static LOCAL: ShapeTable = {
        let t: ShapeTable = Arc::new(Mutex::new(HashMap::new()));
        if let Ok(mut all) = tables().lock() {
            all.push(t.clone());
        }
        t
    };
}

/// Outcome of one request for per-shape statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Hit,
    Miss,
    Other,
}

pub fn shape(shape: u64, outcome: Outcome, took: Duration) {
    LOCAL.with(|t| {
        if let Ok(mut m) = t.lock() {
            let key = if m.len() >= MAX_SHAPES && !m.contains_key(&shape) {
                0
            } else {
                shape
            };
            let s = m.entry(key).or_default();
            s.calls += 1;
            match outcome {
                Outcome::Hit => s.hits += 1,
                Outcome::Miss => s.misses += 1,
                Outcome::Other => {}
            }
            s.seconds += took.as_secs_f64();
        }
    });
}

/// The busiest shapes, summed over workers.
pub fn top_shapes(n: usize) -> Vec<(u64, ShapeStat)> {
    let mut sum: HashMap<u64, ShapeStat> = HashMap::new();
    if let Ok(all) = tables().lock() {
        for t in all.iter() {
            if let Ok(m) = t.lock() {
                for (k, v) in m.iter() {
                    let s = sum.entry(*k).or_default();
                    s.calls += v.calls;
                    s.hits += v.hits;
                    s.misses += v.misses;
                    s.seconds += v.seconds;
                }
            }
        }
    }
    let mut v: Vec<(u64, ShapeStat)> = sum.into_iter().collect();
    v.sort_by(|a, b| b.1.calls.cmp(&a.1.calls).then(a.0.cmp(&b.0)));
    v.truncate(n);
    v
}
