//! pgtier: a caching sidecar for PostgreSQL.
//!
//! # Layout
//!
//! Each module imports only from modules in lower layers, never back
//! (`tests/layout` checks it, file by file and module by module):
//!
//! 1. Leaves: [`bypass`] (every reason not to use the cache, the metric's
//!    `reason`), [`protocol`] (the wire format, one typed zero-copy view per
//!    message; the only code that reads or writes protocol bytes), [`sql`]
//!    (what a statement does: cacheable read, tables, session effects, decided
//!    once per text with the real Postgres grammar), [`metrics`], [`scram`],
//!    [`signing`] (the L2 HMAC key), [`workers`] (one single-threaded runtime
//!    per core that sessions live on).
//! 2. [`config`]: the file, environment and command line, validated once;
//!    control URLs are parsed here and nowhere else.
//! 3. Over config: [`tls`] (rustls configurations), [`logging`], [`banner`]
//!    (the first screen in a terminal), and [`cache`]: what all sessions share:
//!    decisions per statement, keys, the L1 (moka) and L2 (Redis) tiers, rules,
//!    coalescing of misses.
//! 4. [`invalidation`]: triggers and LISTEN/NOTIFY, the per-database listener
//!    (`listener`, with the `applier` of notifications and the watch policy),
//!    or instead a logical replication stream (`logical`: its own replication
//!    connection and `pgoutput` decoder), the catalog (which tables a
//!    statement depends on), table generations, and the warming of hot
//!    entries after their invalidation (`warm`).
//! 5. [`proxy`]: accepting a connection (`accept`: startup, then the admin
//!    console's handover or a proxied session), what sessions share (`state`),
//!    one client session against its own upstream connection: authentication
//!    relay, the event loop (`session`), the expected-reply queue (`tracker`,
//!    `replies`), prepared statements, and the cache's part of a request
//!    (`caching` decides, `apply` acts).
//! 6. [`admin`]: the HTTP endpoint (metrics, probes) and the SQL admin console,
//!    given its connections by the proxy through a handover.
//! 7. [`server`]: process lifecycle on pingora (listeners, signals, drain,
//!    upgrade), wiring the rest together; then `main.rs`, the command line
//!    (`run`, `install-triggers`, `hash-password`, ...).
//!
//! # A request
//!
//! The session reads whole messages from the client and hands a complete request
//! (up to Query, Sync or Flush) to `proxy::apply::handle`, which decodes it once
//! (`protocol::batch`), asks `proxy::caching` for a decision and carries it out.
//! There the statement's decision (`cache::Cache::decide`, from `sql::analyze`
//! plus the rules) and the database's catalog (`invalidation::DbState::resolve`)
//! say whether it may be cached and on which tables it depends. A hit is
//! answered from L1 (or L2) with the stored reply bytes; a miss is forwarded with
//! a capture that stores the reply once the request ends committed; anything
//! else is forwarded unchanged, its reason counted as a [`bypass::BypassReason`].
//! Writes anywhere fire triggers that NOTIFY; the listener bumps the tables'
//! generations, which every entry checks before it is served.

pub mod admin;
pub mod banner;
pub mod bypass;
pub mod cache;
pub mod config;
pub mod invalidation;
pub mod logging;
pub mod metrics;
pub mod protocol;
pub mod proxy;
pub mod scram;
pub mod server;
pub mod signing;
pub mod sql;
pub mod tls;
pub mod workers;
