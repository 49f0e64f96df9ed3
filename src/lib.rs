//! pgtier: a caching sidecar for PostgreSQL.
//!
//! Start at `main.rs`; then `server` (process lifecycle), `proxy` (sessions),
//! `protocol` (the wire format) and `config`.

pub mod admin;
pub mod banner;
pub mod cache;
pub mod config;
pub mod invalidation;
pub mod logging;
pub mod metrics;
pub mod protocol;
pub mod proxy;
pub mod server;
pub mod sql;
pub mod workers;
