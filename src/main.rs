//! The pgtier binary: parse the command line, load the configuration, run.

use std::process::ExitCode;

use clap::Parser;
use pgtier::config::cli::{Cli, Command};

/// Print a SCRAM-SHA-256 verifier for `admin.users[].password`.
fn hash_password(password: Option<String>) -> anyhow::Result<()> {
    let password = match password {
        Some(p) => p,
        None => {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            line.trim_end_matches(['\n', '\r']).to_string()
        }
    };
    if password.is_empty() {
        anyhow::bail!("empty password");
    }
    println!("{}", pgtier::scram::hash_password(&password));
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match cli.opts.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pgtier: {e}");
            return ExitCode::from(2);
        }
    };
    pgtier::logging::init(&config.log);
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Run => pgtier::server::run(config, cli.opts.clone()),
        Command::HashPassword { password } => hash_password(password),
        Command::InstallTriggers { schemas, tables } => {
            let mut scope = pgtier::invalidation::triggers::Scope {
                schemas: config.invalidation.schemas.clone(),
                tables: config.invalidation.tables.clone(),
            };
            if !schemas.is_empty() {
                scope.schemas = schemas;
            }
            if !tables.is_empty() {
                scope.tables = tables;
            }
            pgtier::invalidation::commands::install(&config, scope)
        }
        Command::UninstallTriggers => pgtier::invalidation::commands::uninstall(&config),
        Command::CheckConfig => match toml::to_string_pretty(&config.redacted()) {
            Ok(text) => {
                println!("{text}");
                Ok(())
            }
            Err(e) => Err(e.into()),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgtier: {e:#}");
            ExitCode::FAILURE
        }
    }
}
