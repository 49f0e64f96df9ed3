//! Prometheus metrics. Hot-path counters are registered once and kept as
//! handles, so counting a cache hit is one atomic add, not a registry lookup.

use std::sync::OnceLock;

use metrics::{counter, gauge, Counter, Gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Handles to the counters touched on every request.
pub struct Hot {
    pub l1_hit: Counter,
    pub l1_stale: Counter,
    pub l1_miss: Counter,
    pub fills: Counter,
    pub fills_aborted: Counter,
    pub coalesced: Counter,
    pub client_connections: Gauge,
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
        client_connections: gauge!("pgtier_client_connections"),
    })
}

/// An L2 lookup and what came of it (hit, miss, unavailable).
pub fn l2_lookup(outcome: &'static str) {
    counter!("pgtier_cache_lookups_total", "tier" => "l2", "outcome" => outcome, "reason" => "")
        .increment(1);
}

/// A request that was not looked up in the cache, by reason.
pub fn bypass(reason: &'static str) {
    tracing::debug!(reason, "cache bypass");
    counter!("pgtier_cache_lookups_total", "tier" => "l1", "outcome" => "bypass", "reason" => reason)
        .increment(1);
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
    describe_gauge!("pgtier_l1_entries", "Entries in the L1 cache");
    describe_gauge!(
        "pgtier_l1_bytes",
        "Weighted size of the L1 cache (payload plus overhead), bytes"
    );
}

/// Render the exposition text, refreshing gauges that are sampled rather than counted.
pub fn render(cache: &crate::cache::Cache) -> String {
    cache.l1.sync();
    gauge!("pgtier_l1_entries").set(cache.l1.entry_count() as f64);
    gauge!("pgtier_l1_bytes").set(cache.l1.weighted_bytes() as f64);
    install().render()
}
