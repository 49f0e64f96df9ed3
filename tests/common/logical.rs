//! Throwaway clusters for the logical invalidation source (issue 15): one with
//! `wal_level = logical`, a control role with REPLICATION that owns the
//! database, an application role, and the tables the tests read.

use std::process::Command;
use std::time::Duration;

use tokio_postgres::Client;

use super::cluster::Cluster;
use super::{connect_str, pgtier_bin, run_bounded};

pub const TTL: &str = "[cache]\ndefault_ttl = \"10m\"\n";

/// pgtier's control role authenticates with SCRAM, on both its ordinary and
/// its replication connections; the application's role is another one.
const HBA: &str = "\
local all all trust
host all postgres 127.0.0.1/32 trust
host all ctl 127.0.0.1/32 scram-sha-256
host replication ctl 127.0.0.1/32 scram-sha-256
host all app 127.0.0.1/32 scram-sha-256
";

const SETUP: &str = "\
SET password_encryption = 'scram-sha-256';
CREATE ROLE ctl LOGIN REPLICATION PASSWORD 'ctl-secret';
CREATE ROLE app LOGIN PASSWORD 'app-secret';
CREATE DATABASE lg OWNER ctl;";

/// A cluster with `wal_level = logical` (it takes a restart) and database `lg`
/// owned by the control role.
pub fn cluster() -> Cluster {
    let mut c = Cluster::start(HBA, "ALTER SYSTEM SET wal_level = logical");
    c.stop(false);
    c.pg_ctl_start();
    let (st, _, err) = run_bounded(
        Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &c.port.to_string(),
                "-U",
                "postgres",
            ])
            .args(["-d", "postgres", "-v", "ON_ERROR_STOP=1"])
            .args(SETUP.lines().flat_map(|l| ["-c", l])),
        Duration::from_secs(60),
    );
    assert!(st.success(), "setup failed: {err}");
    c
}

pub fn control_url(port: u16) -> String {
    format!("postgres://ctl:ctl-secret@127.0.0.1:{port}/lg")
}

/// The tables, created by the control role (it must own what it publishes).
pub async fn schema(port: u16) -> Client {
    let ctl = connect_str(&format!(
        "host=127.0.0.1 port={port} user=ctl password=ctl-secret dbname=lg"
    ))
    .await;
    ctl.batch_execute(
        "create table t(id int primary key, v int);
         insert into t values (1, 1), (2, 2);
         create table parted(id int, v int, primary key (id)) partition by range (id);
         create table parted_a partition of parted for values from (0) to (100);
         create table parted_b partition of parted for values from (100) to (200);
         insert into parted values (1, 1), (150, 2);
         create table nopk(v int);
         insert into nopk values (5);
         grant all on all tables in schema public to app;",
    )
    .await
    .unwrap();
    ctl
}

pub fn setup_command(port: u16, args: &[&str]) -> String {
    let url = control_url(port);
    let (st, out, err) = run_bounded(
        Command::new(pgtier_bin()).args(args).args([
            "--invalidation-source",
            "logical",
            "--control-url",
            &url,
        ]),
        Duration::from_secs(60),
    );
    assert!(st.success(), "{args:?} failed: {out} {err}");
    out
}

/// pgtier on the logical source in front of the cluster on `port`, with the
/// control role and `toml`, once its stream runs.
pub async fn start_pgtier(port: u16, toml: &str) -> super::Pgtier {
    start_pgtier_with(port, toml, &[]).await
}

/// [`start_pgtier`] with more command-line arguments (`--key-level`, ...).
pub async fn start_pgtier_with(port: u16, toml: &str, extra: &[&str]) -> super::Pgtier {
    let control = control_url(port);
    let mut args = vec![
        "--control-url",
        &control,
        "--invalidation-source",
        "logical",
    ];
    args.extend_from_slice(extra);
    let p = super::Pgtier::start_with(port, toml, &args);
    p.wait_listener("lg").await;
    p
}

/// The application role's connection through pgtier.
pub async fn app(p: &super::Pgtier) -> Client {
    connect_str(&format!(
        "host=127.0.0.1 port={} user=app password=app-secret dbname=lg connect_timeout=10",
        p.port
    ))
    .await
}
