//! pgtier: a caching sidecar for PostgreSQL.
//!
//! # Layout
//!
//! - `main.rs`: the command line (`run`, `install-triggers`, `hash-password`, ...).
//! - [`server`]: process lifecycle on pingora (listeners, signals, drain, upgrade);
//!   [`workers`]: one single-threaded runtime per core that sessions live on.
//! - [`proxy`]: one client session against its own upstream connection: startup
//!   and authentication relay, the event loop (`session`), the expected-reply
//!   queue (`tracker`, `replies`), prepared statements, and the cache's part of a
//!   request (`caching` decides, `apply` acts).
//! - [`protocol`]: the wire format, one typed zero-copy view per message; the only
//!   code that reads or writes protocol bytes.
//! - [`sql`]: what a statement does (cacheable read, tables, session effects),
//!   decided once per text with the real Postgres grammar.
//! - [`cache`]: what all sessions share: decisions per statement, keys, the L1
//!   (moka) and L2 (Redis) tiers, rules, coalescing of misses.
//! - [`invalidation`]: triggers and LISTEN/NOTIFY, the per-database listener, the
//!   catalog (which tables a statement depends on), table generations.
//! - [`config`], [`admin`] (HTTP metrics/probes, the SQL admin console),
//!   [`metrics`], [`logging`], [`banner`]; [`bypass`]: every reason not to use the cache.
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
