//! A throwaway Postgres cluster in a temp dir, on a free port, for tests that need
//! their own authentication setup or must stop Postgres on purpose.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use super::{free_port, run_bounded};

pub struct Cluster {
    pub port: u16,
    pub dir: tempfile::TempDir,
    stopped: bool,
}

fn pg_bin(name: &str) -> PathBuf {
    let base = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL binaries not found in /usr/lib/postgresql")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .max()
        .expect("no PostgreSQL version directory");
    base.join("bin").join(name)
}

fn as_postgres(bin: &str) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"]).arg(pg_bin(bin));
    c
}

impl Cluster {
    /// initdb + start. `hba` replaces pg_hba.conf; `setup_sql` runs as superuser.
    pub fn start(hba: &str, setup_sql: &str) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("pgtier-cluster-")
            .tempdir()
            .expect("tempdir");
        let status = Command::new("chown")
            .args(["postgres:postgres"])
            .arg(dir.path())
            .status()
            .expect("chown");
        assert!(status.success(), "chown of the cluster dir failed");
        let data = dir.path().join("data");
        let (st, _, err) = run_bounded(
            as_postgres("initdb").args(["-D"]).arg(&data).args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ]),
            Duration::from_secs(120),
        );
        assert!(st.success(), "initdb failed: {err}");
        let port = free_port();
        std::fs::write(data.join("pg_hba.conf"), hba).expect("write pg_hba.conf");
        let mut c = Cluster {
            port,
            dir,
            stopped: true,
        };
        c.pg_ctl_start();
        if !setup_sql.is_empty() {
            let (st, _, err) = run_bounded(
                Command::new("psql")
                    .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
                    .args(["-d", "postgres", "-v", "ON_ERROR_STOP=1", "-c", setup_sql]),
                Duration::from_secs(60),
            );
            assert!(st.success(), "setup SQL failed: {err}");
        }
        c
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn pg_ctl_start(&mut self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("postgres.log");
        let (st, out, err) = run_bounded(
            as_postgres("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .arg("-l")
                .arg(&log)
                .args(["-o", &opts, "-w", "-t", "60", "start"]),
            Duration::from_secs(90),
        );
        assert!(st.success(), "pg_ctl start failed: {out} {err}");
        self.stopped = false;
    }

    /// Stop immediately (like a crash) or cleanly.
    pub fn stop(&mut self, immediate: bool) {
        if self.stopped {
            return;
        }
        let mode = if immediate { "immediate" } else { "fast" };
        let _ = run_bounded(
            as_postgres("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .args(["-m", mode, "-w", "-t", "60", "stop"]),
            Duration::from_secs(90),
        );
        self.stopped = true;
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop(true);
    }
}
