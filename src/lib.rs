//! pgtier: a caching sidecar for PostgreSQL.
//!
//! Start at `main.rs`; then `server` (process lifecycle), `proxy` (sessions),
//! `protocol` (the wire format) and `config`.

pub mod config;
pub mod logging;
pub mod protocol;
pub mod proxy;
pub mod server;
pub mod workers;
