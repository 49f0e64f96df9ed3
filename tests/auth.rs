//! Authentication is relayed, so Postgres stays the authority: SCRAM-SHA-256, md5
//! and cleartext all work through pgtier, and wrong passwords get Postgres's error.

mod common;

use std::process::Command;
use std::time::Duration;

use common::cluster::Cluster;
use common::{run_bounded, Pgtier};
use tokio_postgres::NoTls;

const HBA: &str = "\
local all all trust
host all postgres 127.0.0.1/32 trust
host all scram_user 127.0.0.1/32 scram-sha-256
host all md5_user 127.0.0.1/32 md5
host all clear_user 127.0.0.1/32 password
";

const SETUP: &str = "\
SET password_encryption = 'scram-sha-256';
CREATE ROLE scram_user LOGIN PASSWORD 'scram-secret';
SET password_encryption = 'md5';
CREATE ROLE md5_user LOGIN PASSWORD 'md5-secret';
CREATE ROLE clear_user LOGIN PASSWORD 'clear-secret';";

async fn try_login(port: u16, user: &str, password: &str) -> Result<String, tokio_postgres::Error> {
    let s = format!(
        "host=127.0.0.1 port={port} user={user} password={password} dbname=postgres connect_timeout=10"
    );
    let (client, conn) = tokio_postgres::connect(&s, NoTls).await?;
    tokio::spawn(conn);
    let row = client.query_one("select current_user::text", &[]).await?;
    Ok(row.get(0))
}

#[tokio::test]
async fn password_methods_are_relayed() {
    let cluster = Cluster::start(HBA, SETUP);
    let p = Pgtier::start_with(cluster.port, "", &[]);
    for (user, pw) in [
        ("scram_user", "scram-secret"),
        ("md5_user", "md5-secret"),
        ("clear_user", "clear-secret"),
    ] {
        assert_eq!(try_login(p.port, user, pw).await.unwrap(), user);
        let err = try_login(p.port, user, "wrong").await.unwrap_err();
        let db = err
            .as_db_error()
            .unwrap_or_else(|| panic!("{user}: {err:?}"));
        assert_eq!(db.code().code(), "28P01", "{user}");
        assert!(
            db.message().contains("password authentication failed"),
            "{user}: {}",
            db.message()
        );
    }
    // libpq's SCRAM implementation too
    let (st, out, err) = run_bounded(
        Command::new("psql")
            .env("PGPASSWORD", "scram-secret")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &p.port.to_string(),
                "-U",
                "scram_user",
            ])
            .args(["-d", "postgres", "-Atc", "select current_user"]),
        Duration::from_secs(30),
    );
    assert!(st.success(), "psql failed: {err}");
    assert_eq!(out.trim(), "scram_user");
    let (st, _, err) = run_bounded(
        Command::new("psql")
            .env("PGPASSWORD", "nope")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &p.port.to_string(),
                "-U",
                "scram_user",
            ])
            .args(["-d", "postgres", "-Atc", "select 1"]),
        Duration::from_secs(30),
    );
    assert!(!st.success());
    assert!(err.contains("password authentication failed"), "{err}");
}
