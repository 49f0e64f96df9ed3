//! Operator interfaces: the HTTP endpoint (metrics and probes).

pub mod http;
