//! `pgtier install-triggers` and `pgtier uninstall-triggers`.

use anyhow::{Context as _, Result};

use super::control;
use super::logical::publication;
use super::triggers::{self, Scope};
use crate::config::{Config, Source};

fn targets(config: &Config) -> Result<Vec<control::ControlTarget>> {
    let mut targets = config.control_targets()?;
    // Not "pgtier-control": a running listener should hear about this DDL.
    for t in &mut targets {
        t.config.application_name("pgtier-install");
    }
    if targets.is_empty() {
        anyhow::bail!(
            "no control connection configured: pass --control-url postgres://user:pass@host:port/db \
             (or set invalidation.control_urls)"
        );
    }
    Ok(targets)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a runtime")
}

/// Run `f` with a connection to each configured database in turn.
fn each_database<F, Fut>(config: &Config, mut f: F) -> Result<()>
where
    F: FnMut(control::ControlTarget, tokio_postgres::Client) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let targets = targets(config)?;
    let (tls, ssl) = control::tls_for(config.upstream.tls, config.upstream.tls_ca_file.as_deref())?;
    runtime()?.block_on(async {
        for t in targets {
            let (client, _driver) = control::connect(&t, &tls, ssl, None)
                .await
                .with_context(|| format!("cannot connect to {}", t.display))?;
            f(t, client).await?;
        }
        Ok(())
    })
}

pub fn install(config: &Config, scope: Scope) -> Result<()> {
    if config.invalidation.source == Source::Logical {
        return install_publication(config, scope);
    }
    each_database(config, |t, client| {
        let scope = scope.clone();
        let channel = config.invalidation.channel.clone();
        let poll = config.invalidation.source == Source::Poll;
        async move {
            let r = triggers::install(&client, &channel, &scope, false, poll)
                .await
                .with_context(|| format!("installing triggers in {}", t.display))?;
            println!(
                "{}: triggers on {} table(s); DDL event triggers: {}",
                t.display,
                r.tables,
                if r.event_triggers {
                    "installed"
                } else {
                    "not permitted (periodic rescans detect DDL)"
                }
            );
            Ok(())
        }
    })
}

/// The logical source installs nothing but the publication.
fn install_publication(config: &Config, scope: Scope) -> Result<()> {
    each_database(config, |t, client| {
        let scope = scope.clone();
        let name = config.invalidation.publication.clone();
        async move {
            let r = publication::sync(&client, &name, &scope, &Default::default())
                .await
                .with_context(|| format!("setting up publication \"{name}\" in {}", t.display))?;
            println!(
                "{}: publication \"{name}\" {}; {} table(s) added",
                t.display,
                if r.created { "created" } else { "exists" },
                r.added
            );
            if !r.no_identity.is_empty() {
                println!(
                    "  left out (no primary key or replica identity; UPDATE/DELETE would fail if published): {}",
                    r.no_identity.join(", ")
                );
            }
            if !r.refused.is_empty() {
                println!(
                    "  {} table(s) not added: the role must own them",
                    r.refused.len()
                );
            }
            Ok(())
        }
    })
}

pub fn uninstall(config: &Config) -> Result<()> {
    if config.invalidation.source == Source::Logical {
        let name = config.invalidation.publication.clone();
        return each_database(config, |t, client| {
            let name = name.clone();
            async move {
                let existed = publication::drop(&client, &name)
                    .await
                    .with_context(|| format!("dropping publication \"{name}\" in {}", t.display))?;
                println!(
                    "{}: publication \"{name}\" {}",
                    t.display,
                    if existed { "dropped" } else { "did not exist" }
                );
                Ok(())
            }
        });
    }
    each_database(config, |t, client| async move {
        let n = triggers::uninstall(&client)
            .await
            .with_context(|| format!("removing triggers from {}", t.display))?;
        println!("{}: removed triggers from {n} table(s)", t.display);
        Ok(())
    })
}
