//! Structured logs through `tracing` (text or JSON), also capturing pingora's `log`
//! records. The filter can be changed at run time (config reload).

use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

use crate::config::{LogConfig, LogFormat};

static HANDLE: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

pub fn init(cfg: &LogConfig) {
    let filter = EnvFilter::try_new(&cfg.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let ok = match cfg.format {
        LogFormat::Text => registry.with(fmt).try_init().is_ok(),
        LogFormat::Json => registry.with(fmt.json()).try_init().is_ok(),
    };
    if ok {
        let _ = HANDLE.set(handle);
    }
}

/// Why the log filter was not changed.
#[derive(Debug, thiserror::Error)]
pub enum LogLevelError {
    #[error("log.level: {0}")]
    Filter(#[from] tracing_subscriber::filter::ParseError),
    #[error("log.level: {0}")]
    Reload(#[from] reload::Error),
}

/// Change the log filter (validated by config checks beforehand).
pub fn set_level(level: &str) -> Result<(), LogLevelError> {
    let filter = EnvFilter::try_new(level)?;
    if let Some(h) = HANDLE.get() {
        h.reload(filter)?;
    }
    Ok(())
}
