//! The pgtier binary: parse the command line, load the configuration, run.

use std::process::ExitCode;

use clap::Parser;
use pgtier::config::cli::{Cli, Command};

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
        Command::Run => pgtier::server::run(config, cli.opts.upgrade),
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
