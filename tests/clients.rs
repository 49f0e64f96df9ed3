//! Real client programs through pgtier: psql and pgbench in every query mode.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{fresh_db, run_bounded, Pgtier};

fn psql(port: u16, db: &str, sql: &str) -> (bool, String, String) {
    let (st, out, err) = run_bounded(
        common::psql(port, db).args(["-c", sql]),
        Duration::from_secs(60),
    );
    (st.success(), out, err)
}

#[tokio::test]
async fn psql_works_through_pgtier() {
    let p = Pgtier::start(&[]);
    let (ok, out, err) = psql(p.port, "test", "select 6 * 7");
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "42");
    let (ok, out, err) = psql(
        p.port,
        "test",
        "create temp table t(x int); insert into t select generate_series(1,10); select sum(x) from t",
    );
    assert!(ok, "{err}");
    assert_eq!(out.lines().last(), Some("55"), "{out}");
    let (ok, _, err) = psql(p.port, "test", "select * from no_such_table");
    assert!(!ok);
    assert!(err.contains("does not exist"), "{err}");
}

fn pgbench(port: u16, db: &str, args: &[&str]) -> String {
    let (st, out, err) = run_bounded(
        Command::new("pgbench")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
            .args(args)
            .arg(db),
        Duration::from_secs(120),
    );
    assert!(st.success(), "pgbench {args:?} failed:\n{out}\n{err}");
    out
}

#[tokio::test]
async fn pgbench_in_all_query_modes() {
    let db = fresh_db("pgtier_pgbench").await;
    let p = Pgtier::start(&[]);
    pgbench(p.port, &db, &["-i", "-q", "-s", "1"]);
    for mode in ["simple", "extended", "prepared"] {
        for script in [&[][..], &["-S"][..]] {
            let mut args = vec!["-n", "-M", mode, "-c", "4", "-j", "2", "-T", "2"];
            args.extend_from_slice(script);
            let out = pgbench(p.port, &db, &args);
            assert!(
                out.contains("number of failed transactions: 0 (0.000%)"),
                "mode {mode} {script:?}:\n{out}"
            );
            let processed = out
                .lines()
                .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
                .and_then(|v| v.split('/').next())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
            assert!(
                processed > 0,
                "mode {mode} {script:?} processed nothing:\n{out}"
            );
        }
    }
}
