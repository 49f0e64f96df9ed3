//! Process lifecycle: signals, draining, graceful upgrade, limits and bad config.

mod common;

use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{pgtier_bin, run_bounded, Pgtier};

/// Wait (bounded) until the port stops accepting connections.
fn wait_refused(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(Instant::now() < deadline, "listener still accepting");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_open_sessions_then_exits() {
    let mut p = Pgtier::start(&["--shutdown-grace", "60s"]);
    let c = p.connect("test").await;
    assert_eq!(
        c.query_one("select 1", &[]).await.unwrap().get::<_, i32>(0),
        1
    );
    p.signal(libc::SIGTERM);
    wait_refused(p.port);
    // the open session keeps working while draining
    for i in 0..5 {
        let v: i32 = c.query_one("select $1::int", &[&i]).await.unwrap().get(0);
        assert_eq!(v, i);
    }
    assert!(
        p.child.try_wait().unwrap().is_none(),
        "exited with a session open"
    );
    drop(c);
    let status = p
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("did not exit after drain:\n{}", p.logs()));
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_grace_period_is_bounded() {
    let mut p = Pgtier::start(&["--shutdown-grace", "1s"]);
    let c = p.connect("test").await;
    c.query_one("select 1", &[]).await.unwrap();
    let t = Instant::now();
    p.signal(libc::SIGTERM);
    p.wait_exit(Duration::from_secs(10))
        .expect("grace period not enforced");
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "exited before the grace period"
    );
    assert!(c.query_one("select 1", &[]).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_exits_at_once() {
    let mut p = Pgtier::start(&["--shutdown-grace", "60s"]);
    let c = p.connect("test").await;
    c.query_one("select 1", &[]).await.unwrap();
    p.signal(libc::SIGINT);
    p.wait_exit(Duration::from_secs(5))
        .expect("SIGINT must exit promptly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigquit_hands_the_listener_to_a_new_binary() {
    let mut old = Pgtier::start(&["--shutdown-grace", "60s"]);
    let session = old.connect("test").await;
    let mut new = old.spawn_upgrade(&[]);
    // the new process waits on the upgrade socket; hand over once it exists
    let sock = old.dir.path().join("upgrade.sock");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(
            Instant::now() < deadline,
            "new pgtier never opened the upgrade socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    old.signal(libc::SIGQUIT);
    new.wait_listening();
    // for a few seconds both processes accept on the shared socket; either way new
    // connections are served, and the old process's open session keeps working
    let fresh = new.connect("test").await;
    assert_eq!(
        fresh
            .query_one("select 2", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        2
    );
    assert_eq!(
        session
            .query_one("select 3", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        3
    );
    drop(session);
    drop(fresh);
    old.wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("old pgtier did not exit after draining:\n{}", old.logs()));
    // with the old process gone, the port is still served: by the new binary
    let again = new.connect("test").await;
    assert_eq!(
        again
            .query_one("select 4", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        4
    );
    assert!(new.child.try_wait().unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_client_connections_is_enforced() {
    let p = Pgtier::start(&["--max-client-connections", "2"]);
    let a = p.connect("test").await;
    let b = p.connect("test").await;
    let err = tokio_postgres::connect(&p.conn_str("test"), tokio_postgres::NoTls)
        .await
        .err()
        .expect("third connection must be refused");
    assert_eq!(err.as_db_error().unwrap().code().code(), "53300");
    drop(a);
    // the slot frees up once the session is gone (bounded retry)
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if tokio_postgres::connect(&p.conn_str("test"), tokio_postgres::NoTls)
            .await
            .is_ok()
        {
            break;
        }
        assert!(Instant::now() < deadline, "slot never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    b.query_one("select 1", &[]).await.unwrap();
}

fn check_config(toml: &str, args: &[&str]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, toml).unwrap();
    let (st, _, err) = run_bounded(
        Command::new(pgtier_bin())
            .arg("--config")
            .arg(&path)
            .args(args)
            .arg("check-config"),
        Duration::from_secs(30),
    );
    (st.success(), err)
}

#[test]
fn invalid_config_is_rejected_naming_the_key() {
    let (ok, err) = check_config(
        "[server]\nlisten = \"127.0.0.1:6432\"\nmax_client_connections = 0\n",
        &[],
    );
    assert!(!ok);
    assert!(err.contains("server.max_client_connections"), "{err}");
    let (ok, err) = check_config("[upstream]\nconnect_timeout = \"whenever\"\n", &[]);
    assert!(!ok);
    assert!(err.contains("whenever") && err.contains("line 2"), "{err}");
    let (ok, err) = check_config("[server]\nlisten_port = 5\n", &[]);
    assert!(!ok);
    assert!(err.contains("listen_port"), "{err}");
    let (ok, err) = check_config("", &["--upstream", "nocolon"]);
    assert!(!ok);
    assert!(err.contains("--upstream"), "{err}");
    let (ok, err) = check_config("", &["--upstream-tls", "sometimes"]);
    assert!(!ok);
    assert!(err.contains("sometimes"), "{err}");
    let (ok, _) = check_config("[upstream]\nhost = \"db\"\nport = 5433\n", &[]);
    assert!(ok);
}

#[test]
fn listen_address_in_use_is_a_clear_error() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let (st, _, err) = run_bounded(
        Command::new(pgtier_bin()).args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin-listen",
            "",
        ]),
        Duration::from_secs(30),
    );
    assert!(!st.success());
    assert!(
        err.contains("server.listen") && err.contains(&port.to_string()),
        "{err}"
    );
}
