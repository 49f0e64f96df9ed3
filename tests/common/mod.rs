//! Shared test harness: the real local Postgres and Redis, pgtier processes started
//! on free ports, and throwaway Postgres clusters for tests that need their own.
#![allow(dead_code)]

pub mod cluster;
pub mod keyed;
pub mod logical;
pub mod redis;
pub mod sql;
pub mod wire;

use std::fs::File;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

pub const PG_HOST: &str = "127.0.0.1";
pub const PG_PORT: u16 = 5432;

/// The L2 signing key every test pgtier gets (PGTIER_L2_SIGNING_KEY), so
/// instances of one test share Redis values; a test may override it with
/// `--l2-signing-key`.
pub const TEST_L2_KEY: &str = "7067746965722d746573742d6b65792d7067746965722d746573742d6b657921";

/// Fails (never skips) when the shared Postgres is down, saying how to start it.
pub fn require_postgres() {
    if TcpStream::connect_timeout(
        &format!("{PG_HOST}:{PG_PORT}").parse().unwrap(),
        Duration::from_secs(2),
    )
    .is_err()
    {
        panic!(
            "PostgreSQL is not reachable on {PG_HOST}:{PG_PORT}. Start it with:\n  \
             pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
        );
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

/// The binary under test: this build's, or `PGTIER_BIN` (to show a new test
/// fails against an older build).
pub fn pgtier_bin() -> String {
    std::env::var("PGTIER_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_pgtier").to_string())
}

/// A pgtier process owned by one test; killed (by PID) when dropped.
pub struct Pgtier {
    pub child: Child,
    pub port: u16,
    pub admin_port: u16,
    pub dir: tempfile::TempDir,
    log: PathBuf,
}

impl Pgtier {
    /// pgtier in front of the shared Postgres with default settings plus `args`.
    pub fn start(args: &[&str]) -> Pgtier {
        require_postgres();
        Self::start_with(PG_PORT, "", args)
    }

    /// pgtier in front of the Postgres on `upstream`, with `toml` as its config
    /// file, plus `args`.
    pub fn start_with(upstream: u16, toml: &str, args: &[&str]) -> Pgtier {
        Self::start_upstream(&format!("{PG_HOST}:{upstream}"), toml, args)
    }

    /// pgtier in front of the shared Postgres caching database `db`: a control
    /// connection (listener) for it, triggers installed automatically.
    pub async fn cached(db: &str, toml: &str, args: &[&str]) -> Pgtier {
        require_postgres();
        let control = format!("postgres://postgres@{PG_HOST}:{PG_PORT}/{db}");
        let mut all = vec![
            "--control-url",
            &control,
            "--auto-install-triggers",
            "--watch",
            "eager",
        ];
        all.extend_from_slice(args);
        let p = Self::start_with(PG_PORT, toml, &all);
        p.wait_listener(db).await;
        p
    }

    /// Wait (bounded) until the invalidation listener for `db` is connected.
    pub async fn wait_listener(&self, db: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // Right after start the admin endpoint may take the connection
            // and not answer yet (seen once under a full suite): not yet,
            // rather than a failure, until the deadline.
            let (status, body) = self.http_get("/metrics").await;
            let up = (status == 200)
                .then(|| prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))))
                .and_then(Result::ok)
                .map(|s| Metrics(s).get("pgtier_listener_connected", &[("database", db)]));
            if up == Some(1.0) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "listener for {db} never connected (last scrape: status {status}):\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// pgtier in front of `upstream` given as `--upstream` takes it (HOST:PORT,
    /// or /socket/dir:PORT).
    pub fn start_upstream(upstream: &str, toml: &str, args: &[&str]) -> Pgtier {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        Self::spawn(dir, port, upstream, toml, args, None)
    }

    pub fn spawn(
        dir: tempfile::TempDir,
        port: u16,
        upstream: &str,
        toml: &str,
        args: &[&str],
        upgrade_from: Option<&std::path::Path>,
    ) -> Pgtier {
        let upgrade = upgrade_from.is_some();
        let config = dir.path().join("pgtier.toml");
        std::fs::write(&config, toml).expect("write config");
        let admin_port = free_port();
        let log = dir.path().join(if upgrade {
            "pgtier-new.log"
        } else {
            "pgtier.log"
        });
        let stderr = File::create(&log).expect("log file");
        let mut cmd = Command::new(pgtier_bin());
        cmd.arg("--config")
            .arg(&config)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args([
                "--upstream",
                upstream,
                "--admin-listen",
                &format!("127.0.0.1:{admin_port}"),
            ])
            .arg("--upgrade-sock")
            .arg(upgrade_from.map_or_else(
                || dir.path().join("upgrade.sock"),
                |d| d.join("upgrade.sock"),
            ))
            .arg("--pid-file")
            .arg(dir.path().join("pgtier.pid"))
            .args(args)
            .env("PGTIER_L2_SIGNING_KEY", TEST_L2_KEY)
            .env(
                "PGTIER_LOG_LEVEL",
                std::env::var("PGTIER_TEST_LOG").unwrap_or("info".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr));
        if upgrade {
            cmd.arg("--upgrade");
        }
        let child = cmd.spawn().expect("spawn pgtier");
        let mut p = Pgtier {
            child,
            port,
            admin_port,
            dir,
            log,
        };
        if !upgrade {
            p.wait_listening();
        }
        p
    }

    /// A second pgtier that takes over this one's listener once this one gets SIGQUIT.
    pub fn spawn_upgrade(&self, args: &[&str]) -> Pgtier {
        let dir = tempfile::tempdir().expect("tempdir");
        let upstream = format!("{PG_HOST}:{PG_PORT}");
        Self::spawn(dir, self.port, &upstream, "", args, Some(self.dir.path()))
    }

    /// Wait (bounded) until the listener accepts connections.
    pub fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("pgtier exited early ({status}):\n{}", self.logs());
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                && TcpStream::connect(("127.0.0.1", self.admin_port)).is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "pgtier did not start listening:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn logs(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Wait for the process to exit, bounded.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// GET a path on the admin HTTP port: (status, body).
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.admin_port))
            .await
            .expect("admin port");
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
            .await
            .expect("admin response timed out")
            .unwrap();
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }

    /// Current metrics, parsed (the text must be valid Prometheus exposition format).
    pub async fn metrics(&self) -> Metrics {
        let (status, body) = self.http_get("/metrics").await;
        assert_eq!(status, 200, "metrics endpoint: {body}");
        let lines = body.lines().map(|l| Ok(l.to_string()));
        let scrape =
            prometheus_parse::Scrape::parse(lines).expect("metrics must parse as Prometheus text");
        Metrics(scrape)
    }

    /// Wait (bounded by `within`) until metric `name{labels}` exceeds `above`;
    /// `what` says what that would have shown.
    pub async fn until_metric_above(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        above: f64,
        within: Duration,
        what: &str,
    ) {
        let t = Instant::now();
        while self.metrics().await.get(name, labels) <= above {
            assert!(t.elapsed() < within, "{what} (within {within:?})");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn conn_str(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={db} connect_timeout=10",
            self.port
        )
    }

    pub async fn connect(&self, db: &str) -> Client {
        connect_str(&self.conn_str(db)).await
    }
}

impl Drop for Pgtier {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A parsed scrape with lookups by name and labels.
pub struct Metrics(pub prometheus_parse::Scrape);

impl Metrics {
    /// Sum of the samples of `name` whose labels include all of `labels`.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    }

    pub fn hits(&self) -> f64 {
        self.get(
            "pgtier_cache_lookups_total",
            &[("tier", "l1"), ("outcome", "hit")],
        )
    }

    pub fn misses(&self) -> f64 {
        self.get(
            "pgtier_cache_lookups_total",
            &[("tier", "l1"), ("outcome", "miss")],
        )
    }

    pub fn bypasses(&self, reason: &str) -> f64 {
        self.get(
            "pgtier_cache_lookups_total",
            &[("tier", "l1"), ("outcome", "bypass"), ("reason", reason)],
        )
    }
}

/// A tokio-postgres connection, its driver spawned on the current runtime.
pub async fn connect_str(s: &str) -> Client {
    let (client, conn) =
        tokio_postgres::connect(s, NoTls)
            .await
            .unwrap_or_else(|e| match e.as_db_error() {
                Some(db) => panic!("connect {s}: {} {}", db.code().code(), db.message()),
                None => panic!("connect {s}: {e}"),
            });
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A connection straight to the shared Postgres (no pgtier).
pub async fn direct(db: &str) -> Client {
    require_postgres();
    connect_str(&direct_str(db)).await
}

/// How to connect straight to the shared Postgres as its superuser.
pub fn direct_str(db: &str) -> String {
    format!("host={PG_HOST} port={PG_PORT} user=postgres dbname={db}")
}

/// A fresh, empty database for one test (dropped first if left over).
pub async fn fresh_db(name: &str) -> String {
    let admin = direct("postgres").await;
    admin
        .execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"), &[])
        .await
        .expect("drop database");
    admin
        .execute(&format!("CREATE DATABASE {name}"), &[])
        .await
        .expect("create database");
    name.to_string()
}

/// Run a command to completion with a time bound; returns (status, stdout, stderr).
pub fn run_bounded(cmd: &mut Command, within: Duration) -> (ExitStatus, String, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + within;
    let status = loop {
        if let Ok(Some(s)) = child.try_wait() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("command {cmd:?} did not finish within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status, t_out.join().unwrap(), t_err.join().unwrap())
}

/// `psql` to `db` on 127.0.0.1:`port` as `postgres`, without psqlrc, stopping at
/// the first error, unaligned tuples only; add `-c` commands and run it with
/// `run_bounded`.
pub fn psql(port: u16, db: &str) -> Command {
    let mut cmd = Command::new("psql");
    cmd.args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-h", PG_HOST])
        .args(["-p", &port.to_string(), "-U", "postgres", "-d", db]);
    cmd
}

/// A self-signed certificate for `name` and its key, written as PEM files in
/// `dir`: (certificate, key).
pub fn self_signed_pem(dir: &std::path::Path, name: &str) -> (PathBuf, PathBuf) {
    let ck = rcgen::generate_simple_self_signed(vec![name.to_string()]).expect("certificate");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).expect("write certificate");
    std::fs::write(&key, ck.signing_key.serialize_pem()).expect("write key");
    (cert, key)
}

/// LISTEN on a channel straight at the shared Postgres: every payload, in
/// order.
pub async fn listen(
    db: &str,
    channel: &str,
) -> (Client, tokio::sync::mpsc::UnboundedReceiver<String>) {
    require_postgres();
    let (client, mut conn) = tokio_postgres::connect(&direct_str(db), tokio_postgres::NoTls)
        .await
        .expect("connect to Postgres");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        use futures_util::StreamExt;
        while let Some(Ok(m)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send(n.payload().to_string());
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {channel}"))
        .await
        .expect("LISTEN");
    (client, rx)
}

/// Send a marker on `channel` as `sender` and return every payload `seen`
/// (from [`listen`]) received before it: all that was sent before the
/// marker (bounded wait).
pub async fn until_marker(
    sender: &Client,
    channel: &str,
    seen: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
) -> Vec<String> {
    sender
        .execute("SELECT pg_notify($1, 'marker')", &[&channel])
        .await
        .expect("marker");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut before = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, seen.recv()).await {
            Ok(Some(m)) if m == "marker" => return before,
            Ok(Some(m)) => before.push(m),
            _ => panic!("the marker never arrived"),
        }
    }
}
