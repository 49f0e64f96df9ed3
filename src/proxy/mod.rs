//! The client-facing side: accepting connections, relaying startup and
//! authentication, and running each session against its own upstream connection.
//!
//! From the listening socket down: `app` (the pingora service) hands each
//! connection to `accept`, which reads the startup packets (`startup`), routes
//! the admin console's database to its handover, and runs every other
//! connection as a `session` against its own upstream connection (`upstream`,
//! `defaults`), over `conn`. A session's requests go through `caching`, which
//! keeps the expected replies in `tracker`/`replies` and prepared statements in
//! `statements`. What all sessions share is in `state`.

pub mod accept;
pub mod app;
pub mod apply;
pub mod caching;
pub mod conn;
pub mod defaults;
pub mod replies;
pub mod session;
pub mod startup;
pub mod state;
pub mod statements;
pub mod tracker;
pub mod two_phase;
pub mod upstream;

pub use state::{Proxy, SessionInfo};
