//! Operator interfaces: the HTTP endpoint (metrics and probes).

pub mod console;
pub mod http;
pub mod throttle;
