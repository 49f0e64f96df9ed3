//! Operator interfaces: the HTTP endpoint (metrics and probes) and the SQL
//! admin console (with its failed-login throttle). Both sit above the proxy:
//! they read its shared state, and the console is handed its connections by
//! the proxy's accept step.

pub mod console;
pub mod http;
pub mod throttle;
