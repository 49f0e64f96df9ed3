//! Process lifecycle on pingora: the listener service, signals, graceful drain and
//! binary upgrade.
//!
//! - SIGTERM: stop accepting, let open sessions finish for up to
//!   `server.shutdown_grace`, then exit.
//! - SIGQUIT: hand the listening socket to a new pgtier started with `--upgrade`,
//!   then drain like SIGTERM.
//! - SIGINT: exit at once.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use anyhow::{Context as _, Result};
use async_trait::async_trait;
use pingora_core::listeners::ListenerConfig;
use pingora_core::protocols::l4::stream::L4BufferSettings;
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use pingora_core::services::listening::Service;
use tokio::signal::unix::{signal, SignalKind};

use crate::admin::http::AdminHttp;
use crate::config::{Config, Live};
use crate::invalidation::control;
use crate::invalidation::listener::{Listener, Settings as ListenerSettings};
use crate::invalidation::triggers::Scope;
use crate::proxy::app::ListenerApp;
use crate::proxy::state::Proxy;
use crate::workers::Workers;
use pingora_core::services::background::background_service;

const QUICK: u8 = 1;
const GRACEFUL: u8 = 2;

/// Runs pgtier until a signal stops it.
pub fn run(config: Config, options: crate::config::cli::Options) -> Result<()> {
    let upgrade = options.upgrade;
    if !upgrade {
        // Pingora panics in a service thread when it cannot bind; check first so the
        // user gets one clear line instead.
        let addr = config.listen_addr()?;
        TcpListener::bind(addr).with_context(|| {
            format!("server.listen: cannot listen on {addr} (is another process using it?)")
        })?;
        if !config.admin.listen.is_empty() {
            TcpListener::bind(&config.admin.listen).with_context(|| {
                format!("admin.listen: cannot listen on {}", config.admin.listen)
            })?;
        }
    }
    let workers = match config.server.workers {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    };
    let sessions = Arc::new(Workers::start(workers)?);

    crate::metrics::install();
    let live = Arc::new(Live::new(config.clone()));
    let proxy = Arc::new(Proxy::new(live.clone(), options)?);

    let databases: Vec<String> = proxy
        .invalidation
        .databases()
        .map(|d| d.name.clone())
        .collect();
    crate::metrics::register_families(&databases, proxy.cache.l2().is_some());
    if let Some(l2) = proxy.cache.l2() {
        sessions.on_each(move || l2.clone().warm_up());
    }

    let mut conf = ServerConf::new().context("pingora default configuration")?;
    conf.threads = 1;
    conf.grace_period_seconds = Some(0);
    conf.graceful_shutdown_timeout_seconds = Some(1);
    conf.upgrade_sock = config.server.upgrade_sock.display().to_string();
    conf.pid_file = config.server.pid_file.display().to_string();
    let opt = Opt {
        upgrade,
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);

    let mut listener = Service::new(
        "pgtier postgres listener".to_string(),
        ListenerApp {
            proxy: proxy.clone(),
            sessions: sessions.clone(),
            handover: Some(Arc::new(crate::admin::console::ConsoleService::default())),
        },
    );
    listener.add_listener(
        ListenerConfig::tcp(config.server.listen.clone()).l4_buffer(L4BufferSettings::unbuffered()),
    );
    server.add_service(listener);
    if !config.admin.listen.is_empty() {
        let mut admin = Service::new(
            "pgtier admin http".to_string(),
            AdminHttp {
                proxy: proxy.clone(),
            },
        );
        admin.add_tcp(&config.admin.listen);
        server.add_service(admin);
    }
    server.add_service(background_service(
        "pgtier config reload (SIGHUP)",
        Sighup(proxy.clone()),
    ));
    for listener in listeners(&config, &proxy)? {
        let name = format!("pgtier invalidation listener ({})", listener.db.name);
        server.add_service(background_service(&name, listener));
    }
    // With --upgrade this blocks until the old process hands over its listener.
    server.bootstrap();

    tracing::info!(
        listen = %config.server.listen,
        upstream = %proxy.upstream.addr(),
        workers,
        "pgtier listening"
    );
    crate::banner::print(&config, &databases);
    let how = Arc::new(AtomicU8::new(0));
    server.run(RunArgs {
        shutdown_signal: Box::new(Signals(how.clone())),
    });

    if how.load(Ordering::Acquire) == GRACEFUL {
        let grace = config.server.shutdown_grace.0;
        let open = proxy.active_sessions();
        if open > 0 {
            tracing::info!(open, ?grace, "waiting for open sessions to finish");
        }
        let waiter = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .context("cannot start the drain timer")?;
        let left = waiter.block_on(proxy.wait_idle(grace));
        if left > 0 {
            tracing::warn!(left, "grace period over; closing remaining sessions");
        }
    }
    match Arc::try_unwrap(sessions) {
        Ok(w) => w.shutdown(),
        Err(_) => tracing::debug!("session workers still referenced; exiting without joining"),
    }
    tracing::info!("pgtier stopped");
    Ok(())
}

/// Re-reads the configuration on SIGHUP.
struct Sighup(Arc<Proxy>);

#[async_trait]
impl pingora_core::services::background::BackgroundService for Sighup {
    async fn start(&self, mut shutdown: pingora_core::server::ShutdownWatch) {
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::error!("cannot watch SIGHUP; reload with the admin console's RELOAD");
            return;
        };
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    let _ = self.0.reload();
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// One listener per control URL (cached database).
fn listeners(config: &Config, proxy: &Arc<Proxy>) -> Result<Vec<Listener>> {
    let inv = &config.invalidation;
    let targets = config.control_targets()?;
    let (tls, ssl) = control::tls_for(config.upstream.tls, config.upstream.tls_ca_file.as_deref())?;
    let settings = ListenerSettings {
        channel: inv.channel.clone(),
        instance: proxy.invalidation.instance,
        check_interval: inv.check_interval.0,
        rescan_interval: inv.rescan_interval.0,
        auto_install: inv.auto_install,
        eager_watch: inv.watch == crate::config::WatchMode::Eager,
        // With "poll" an announced write costs its writer a row insert, not a
        // serialised commit: a tenth of the hits pays for it.
        min_hits_per_write: inv.unwatch_on_write.then_some(
            if inv.source == crate::config::Source::Poll {
                inv.min_hits_per_write / 10.0
            } else {
                inv.min_hits_per_write
            },
        ),
        key_level: inv.key_level,
        signer: crate::signing::load_key(
            config.l2.signing_key.as_deref(),
            config.l2.signing_key_file.as_deref(),
        )
        .map_err(|e| anyhow::anyhow!("l2.signing_key: {e}"))?
        .map(|k| crate::cache::l2::Signer::new(&k)),
        scope: Scope {
            schemas: inv.schemas.clone(),
            tables: inv.tables.clone(),
        },
        poll: (inv.source == crate::config::Source::Poll).then_some(inv.poll_interval.0),
        logical: match inv.source {
            crate::config::Source::Notify | crate::config::Source::Poll => None,
            crate::config::Source::Logical => Some(crate::invalidation::logical::Settings::new(
                &inv.publication,
                config.upstream.tls,
                config.upstream.tls_ca_file.as_deref(),
            )?),
        },
    };
    targets
        .into_iter()
        .map(|target| {
            let db = proxy
                .invalidation
                .db(&target.database)
                .ok_or_else(|| anyhow::anyhow!("no state for database {}", target.database))?;
            Ok(Listener {
                db,
                eagerly_watched: Default::default(),
                target,
                tls: tls.clone(),
                ssl,
                settings: settings.clone(),
                cache: proxy.cache.clone(),
                tracked: Default::default(),
            })
        })
        .collect()
}

/// Pingora's signal handling, remembering which kind of stop was asked for.
struct Signals(Arc<AtomicU8>);

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        let streams = (
            signal(SignalKind::quit()),
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        );
        let (Ok(mut quit), Ok(mut term), Ok(mut int)) = streams else {
            tracing::error!("cannot install signal handlers; stopping");
            self.0.store(QUICK, Ordering::Release);
            return ShutdownSignal::FastShutdown;
        };
        let (sig, how) = tokio::select! {
            _ = quit.recv() => (ShutdownSignal::GracefulUpgrade, GRACEFUL),
            _ = term.recv() => (ShutdownSignal::GracefulTerminate, GRACEFUL),
            _ = int.recv() => (ShutdownSignal::FastShutdown, QUICK),
        };
        tracing::info!(signal = ?sig, "shutdown requested");
        self.0.store(how, Ordering::Release);
        sig
    }
}
