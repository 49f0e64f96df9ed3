//! TLS on both legs: pgtier originating TLS to Postgres (the local server has
//! ssl = on with a self-signed certificate), and terminating TLS from clients.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{run_bounded, Pgtier, PG_PORT};
use tokio_postgres::NoTls;

const SNAKEOIL: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";

async fn upstream_uses_ssl(p: &Pgtier) -> bool {
    let c = p.connect("test").await;
    c.query_one(
        "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test]
async fn upstream_tls_require_and_prefer_encrypt() {
    let p = Pgtier::start(&["--upstream-tls", "require"]);
    assert!(
        upstream_uses_ssl(&p).await,
        "require must encrypt the upstream leg"
    );
    let p = Pgtier::start(&["--upstream-tls", "prefer"]);
    assert!(upstream_uses_ssl(&p).await);
    let p = Pgtier::start(&["--upstream-tls", "disable"]);
    assert!(!upstream_uses_ssl(&p).await);
}

#[tokio::test]
async fn upstream_verify_full_checks_the_certificate() {
    // the snakeoil certificate names "localhost": verifying it as 127.0.0.1 fails
    let p = Pgtier::start(&[
        "--upstream-tls",
        "verify-full",
        "--upstream-tls-ca",
        SNAKEOIL,
    ]);
    let err = tokio_postgres::connect(&p.conn_str("test"), NoTls)
        .await
        .err()
        .expect("a certificate that does not name the host must be refused");
    let msg = err
        .as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_default();
    assert!(msg.contains("TLS handshake failed"), "{msg}");

    // naming the host the certificate was issued for lets it through
    let toml = format!(
        "[upstream]\ntls = \"verify-full\"\ntls_ca_file = \"{SNAKEOIL}\"\ntls_server_name = \"localhost\"\n"
    );
    let p = Pgtier::start_with(PG_PORT, &toml, &[]);
    assert!(upstream_uses_ssl(&p).await);
}

#[tokio::test]
async fn client_tls_is_terminated_with_rustls() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = common::self_signed_pem(dir.path(), "localhost");
    let toml = format!(
        "[server]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
        cert.display(),
        key.display()
    );
    let p = Pgtier::start_with(PG_PORT, &toml, &[]);
    let psql = |sslmode: &str| {
        run_bounded(
            Command::new("psql")
                .arg(format!(
                    "host=127.0.0.1 port={} user=postgres dbname=test sslmode={sslmode}",
                    p.port
                ))
                .args(["-X", "-c", "\\conninfo", "-Atc", "select 'ok'"]),
            Duration::from_secs(30),
        )
    };
    let (st, out, err) = psql("require");
    assert!(st.success(), "{err}");
    assert!(out.contains("SSL connection"), "expected TLS: {out}");
    assert!(out.contains("ok"));
    let (st, out, err) = psql("disable");
    assert!(st.success(), "{err}");
    assert!(!out.contains("SSL connection"), "{out}");

    // without TLS configured pgtier answers SSLRequest with 'N'
    let plain = Pgtier::start(&[]);
    let (st, _, err) = run_bounded(
        Command::new("psql")
            .arg(format!(
                "host=127.0.0.1 port={} user=postgres dbname=test sslmode=require",
                plain.port
            ))
            .args(["-X", "-Atc", "select 1"]),
        Duration::from_secs(30),
    );
    assert!(!st.success());
    assert!(err.contains("does not support SSL"), "{err}");
}
