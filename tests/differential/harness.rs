//! The harness: the five connections (direct, direct with session C's
//! settings, pgtier sessions A, B and C), running a statement on each of them
//! by every protocol path, comparing, and bounded waiting for invalidations.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use rust_decimal::Decimal;
use tokio_postgres::{Client, Statement};

use crate::data::{cats_insert, gen_writes, WriteState};
use crate::queries::{Query, NAMES};
use crate::values::{collect, db_error, describe, first_difference, simple, Outcome};
use crate::CONVERGE;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Conn {
    Direct,
    /// Straight to Postgres, with the output settings of session C.
    DirectC,
    /// The pgtier session that also writes.
    A,
    /// A second pgtier session, sharing A's cache entries.
    B,
    /// A pgtier session whose SETs change how results are rendered: it must
    /// never get entries of A and B.
    C,
}

impl Conn {
    /// The direct connection whose results this session must reproduce.
    pub fn reference(self) -> Conn {
        match self {
            Conn::C | Conn::DirectC => Conn::DirectC,
            _ => Conn::Direct,
        }
    }
}

/// Applied to sessions C and DirectC (through pgtier, so it must track them).
pub const C_SETTINGS: &str = "set timezone = 'Asia/Kolkata'; set datestyle = 'SQL, DMY'; \
    set intervalstyle = 'postgres_verbose'; set bytea_output = 'escape'; set extra_float_digits = 0";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// simple_query with literals: text format.
    Simple,
    /// A statement prepared once per session, executed with binary parameters.
    Prepared,
    /// `query` on the SQL string: prepare, execute, close.
    OneShot,
    /// `query_typed`: Parse/Bind/Describe/Execute/Sync in one request.
    Typed,
    /// Prepared and Typed at the same time on one session (pipelined requests);
    /// both must return the same.
    Pipelined,
}

impl Via {
    /// Executions sharing a cache entry share a group.
    pub fn group(self) -> usize {
        match self {
            Via::Simple => 0,
            Via::Prepared | Via::OneShot => 1,
            Via::Typed => 2,
            Via::Pipelined => 3,
        }
    }
}

#[derive(Default)]
pub struct Stats {
    pub checks: u64,
    pub pgtier_reads: u64,
    pub stale_reads: u64,
    pub waited: u64,
    pub max_wait: Duration,
    pub direct_errors: u64,
    pub volatile_checks: u64,
    pub pgtier_writes: u64,
    pub direct_writes: u64,
}

pub struct Harness {
    pub seed: u64,
    pub d: Client,
    pub dc: Client,
    pub a: Client,
    pub b: Client,
    pub c: Client,
    pub stmts: HashMap<(Conn, String), Statement>,
    pub stats: Stats,
    /// The latest write phase, for failure messages.
    pub last_writes: String,
}

impl Harness {
    pub fn client(&self, conn: Conn) -> &Client {
        match conn {
            Conn::Direct => &self.d,
            Conn::DirectC => &self.dc,
            Conn::A => &self.a,
            Conn::B => &self.b,
            Conn::C => &self.c,
        }
    }

    /// The session's prepared statement for `sql`; a new one is checked against
    /// the direct description.
    pub async fn statement(&mut self, conn: Conn, q: &Query) -> Result<Statement, String> {
        let key = (conn, q.sql.clone());
        if let Some(s) = self.stmts.get(&key) {
            return Ok(s.clone());
        }
        let s = self
            .client(conn)
            .prepare(&q.sql)
            .await
            .map_err(|e| db_error(&e))?;
        if conn != conn.reference() {
            if let Some(ds) = self.stmts.get(&(conn.reference(), q.sql.clone())) {
                assert_eq!(
                    describe(&s),
                    describe(ds),
                    "seed {}: statement description through pgtier ({conn:?}) differs from Postgres\nSQL: {}",
                    self.seed,
                    q.sql
                );
            }
        }
        self.stmts.insert(key, s.clone());
        Ok(s)
    }

    pub async fn run(&mut self, conn: Conn, via: Via, q: &Query) -> Outcome {
        let params = || q.params.iter().map(|(_, p)| p.as_sql());
        match via {
            Via::Simple => simple(self.client(conn), &q.literal_sql()).await,
            Via::Prepared => {
                let stmt = match self.statement(conn, q).await {
                    Ok(s) => s,
                    Err(e) => return Outcome::Error(e),
                };
                collect(self.client(conn).query_raw(&stmt, params()).await).await
            }
            Via::OneShot => {
                collect(self.client(conn).query_raw(q.sql.as_str(), params()).await).await
            }
            Via::Typed => {
                let typed = q.params.iter().map(|(_, p)| (p.as_sql(), p.ty()));
                collect(self.client(conn).query_typed_raw(&q.sql, typed).await).await
            }
            Via::Pipelined => {
                let stmt = match self.statement(conn, q).await {
                    Ok(s) => s,
                    Err(e) => return Outcome::Error(e),
                };
                let c = self.client(conn);
                let typed = q.params.iter().map(|(_, p)| (p.as_sql(), p.ty()));
                let (x, y) = futures_util::join!(
                    async { collect(c.query_raw(&stmt, params()).await).await },
                    async { collect(c.query_typed_raw(&q.sql, typed).await).await }
                );
                if x == y {
                    x
                } else {
                    Outcome::Error(format!(
                        "the two pipelined executions disagree:\n{x}\n--- and ---\n{y}"
                    ))
                }
            }
        }
    }

    pub fn mismatch(
        &self,
        what: &str,
        q: &Query,
        conn: Conn,
        via: Via,
        want: &Outcome,
        got: &Outcome,
    ) -> String {
        let sql = if via == Via::Simple {
            format!("{}\n(extended-protocol form: {})", q.literal_sql(), q.sql)
        } else {
            q.sql.clone()
        };
        let before = q.last_result.as_ref().map(|(t, b)| match via {
            Via::Simple => t,
            _ => b,
        });
        let stale = if conn != Conn::C && before == Some(got) {
            format!(
                "pgtier returned exactly the result this statement had when last checked \
                 (round {}), before later writes: a stale cache entry\n",
                q.last_round.unwrap_or(0)
            )
        } else {
            String::new()
        };
        format!(
            "seed {seed}: {what}\nvia {via:?} on pgtier session {conn:?}\nSQL: {sql}\nparams: {params}\n{stale}{diff}\n\
             latest write phase: {writes}\n\
             --- postgres ---\n{want}\n--- pgtier ---\n{got}\n\
             (reproduce: PGTIER_DIFF_SEED={seed} cargo test --test differential)",
            seed = self.seed,
            params = q.params_text(),
            diff = first_difference(want, got),
            writes = self.last_writes,
        )
    }

    /// Run `q` directly and many times through pgtier (three sessions, all
    /// protocol variants) and compare every result. When `strict_a` (or
    /// `strict_others`) gives a reason, that session must match at once;
    /// otherwise the first read of each of its cache entries may be polled until
    /// it converges (a direct write's invalidation in flight), and must then stay
    /// equal. Returns Postgres's (text, binary) results.
    pub async fn check(
        &mut self,
        q: &Query,
        strict_a: Option<&str>,
        strict_others: Option<&str>,
        rng: &mut StdRng,
    ) -> (Outcome, Outcome) {
        self.stats.checks += 1;
        if q.volatile {
            self.stats.volatile_checks += 1;
        }
        let mut plan = vec![
            (Conn::A, Via::Simple),
            (Conn::A, Via::Prepared),
            (Conn::B, Via::Simple),
            (Conn::A, Via::Typed),
            (Conn::C, Via::Simple),
            (Conn::B, Via::Prepared),
            (Conn::A, Via::OneShot),
            (Conn::C, Via::Prepared),
            (Conn::A, Via::Simple),
            (Conn::B, Via::Typed),
            (Conn::A, Via::Prepared),
            (Conn::C, Via::Simple),
            (Conn::A, Via::Pipelined),
            (Conn::A, Via::Typed),
            (Conn::B, Via::Simple),
        ];
        if rng.gen_bool(0.5) {
            plan.swap(0, 1);
        }
        // The first read through pgtier comes before the direct reads, as close
        // to the preceding writes as possible. (Preparing reads no data: the
        // direct statement is prepared first so descriptions can be compared.)
        let _ = self.statement(Conn::Direct, q).await;
        let mut early = Some(self.run(plan[0].0, plan[0].1, q).await);
        let mut wants = HashMap::new();
        for reference in [Conn::Direct, Conn::DirectC] {
            for via in [Via::Simple, Via::Prepared] {
                let w = self.run(reference, via, q).await;
                if let Outcome::Error(e) = &w {
                    self.stats.direct_errors += 1;
                    println!(
                        "note: generated statement fails in Postgres ({e}): {}",
                        q.sql
                    );
                }
                wants.insert((reference, via == Via::Simple), w);
            }
        }
        // per (session, entry): once a read has matched, it must keep matching
        let mut settled: HashSet<(Conn, usize)> = HashSet::new();
        for (conn, via) in plan {
            let want = &wants[&(conn.reference(), via == Via::Simple)];
            let mut got = match early.take() {
                Some(o) => o,
                None => self.run(conn, via, q).await,
            };
            self.stats.pgtier_reads += 1;
            let key = (conn, via.group());
            if got == *want {
                settled.insert(key);
                continue;
            }
            let strict = if settled.contains(&key) {
                Some("this session already had the current result, then got another")
            } else if conn == Conn::A {
                strict_a
            } else {
                strict_others
            };
            if let Some(why) = strict {
                panic!(
                    "{}",
                    self.mismatch(
                        &format!("result through pgtier differs from Postgres ({why})"),
                        q,
                        conn,
                        via,
                        want,
                        &got
                    )
                );
            }
            // a direct write's invalidation may still be in flight: poll, bounded
            let start = Instant::now();
            while got != *want {
                self.stats.stale_reads += 1;
                if start.elapsed() > CONVERGE {
                    panic!(
                        "{}",
                        self.mismatch(
                            &format!("result through pgtier never converged to Postgres's within {CONVERGE:?} of a direct write"),
                            q,
                            conn,
                            via,
                            want,
                            &got
                        )
                    );
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
                got = self.run(conn, via, q).await;
                self.stats.pgtier_reads += 1;
            }
            self.stats.waited += 1;
            self.stats.max_wait = self.stats.max_wait.max(start.elapsed());
            settled.insert(key);
        }
        let text = wants.remove(&(Conn::Direct, true)).unwrap();
        (text, wants.remove(&(Conn::Direct, false)).unwrap())
    }

    pub async fn exec_direct(&self, sql: &str) {
        if let Err(e) = self.d.batch_execute(sql).await {
            panic!(
                "seed {}: direct write failed: {}\n{sql}",
                self.seed,
                db_error(&e)
            );
        }
    }

    /// Writes straight to Postgres.
    pub async fn direct_writes(&mut self, rng: &mut StdRng, ws: &mut WriteState) {
        let style = rng.gen_range(0..10);
        if style == 3 && !ws.cats_empty {
            // truncate and refill cats in one implicit transaction
            self.exec_direct(&format!("truncate cats; {}", cats_insert(rng)))
                .await;
            self.stats.direct_writes += 2;
        }
        let n = rng.gen_range(1..=4);
        let writes = gen_writes(rng, ws, n);
        self.stats.direct_writes += writes.len() as u64;
        self.last_writes =
            describe_writes(&format!("directly to Postgres (style {style})"), &writes);
        match style {
            // all in one explicit transaction
            0 | 1 => {
                let body: Vec<&str> = writes.iter().map(|(s, _)| s.as_str()).collect();
                self.exec_direct(&format!("begin; {}; commit", body.join("; ")))
                    .await;
            }
            // a rolled back transaction first, then the writes one by one
            2 => {
                self.exec_direct(&format!(
                    "begin; update items set price = price + 1000 where id % 3 = {}; delete from cats; rollback",
                    rng.gen_range(0..3)
                ))
                .await;
                for (s, _) in &writes {
                    self.exec_direct(s).await;
                }
            }
            _ => {
                for (s, _) in &writes {
                    self.exec_direct(s).await;
                }
            }
        }
    }

    /// Writes through pgtier session A, in several styles. Returns the tables touched.
    pub async fn pgtier_writes(
        &mut self,
        rng: &mut StdRng,
        ws: &mut WriteState,
    ) -> Vec<&'static str> {
        let n = rng.gen_range(1..=3);
        let writes = gen_writes(rng, ws, n);
        self.stats.pgtier_writes += writes.len() as u64;
        let mut tables: Vec<&'static str> = writes.iter().map(|(_, t)| *t).collect();
        let seed = self.seed;
        let style = rng.gen_range(0..4);
        self.last_writes = describe_writes(
            &format!("through pgtier session A (style {style})"),
            &writes,
        );
        match style {
            0 => {
                for (s, _) in &writes {
                    self.a
                        .simple_query(s)
                        .await
                        .unwrap_or_else(|e| write_failed(seed, s, e));
                }
            }
            1 => {
                for (s, _) in &writes {
                    self.a
                        .execute(s.as_str(), &[])
                        .await
                        .unwrap_or_else(|e| write_failed(seed, s, e));
                }
            }
            2 => {
                let tx = self.a.transaction().await.unwrap();
                for (s, _) in &writes {
                    tx.execute(s.as_str(), &[])
                        .await
                        .unwrap_or_else(|e| write_failed(seed, s, e));
                }
                tx.commit().await.unwrap();
            }
            _ => {
                for (s, _) in &writes {
                    self.a
                        .batch_execute(s)
                        .await
                        .unwrap_or_else(|e| write_failed(seed, s, e));
                }
                // and a parameterised write (extended protocol, binary parameters)
                let price = Decimal::new(rng.gen_range(-50_000..600_000), 2);
                let name = NAMES.choose(rng).unwrap().to_string();
                let id: i32 = rng.gen_range(1..=320);
                let sql = "update items set price = $1, name = $2 where id = $3 or id = $3 + 1";
                self.a
                    .execute(sql, &[&price, &name, &id])
                    .await
                    .unwrap_or_else(|e| write_failed(seed, sql, e));
                self.stats.pgtier_writes += 1;
                tables.push("items");
            }
        }
        tables.sort();
        tables.dedup();
        tables
    }
}

pub fn describe_writes(how: &str, writes: &[(String, &'static str)]) -> String {
    let mut out = format!("{how}:");
    for (sql, _) in writes {
        let short: String = sql.chars().take(160).collect();
        let more = if short.len() < sql.len() { " ..." } else { "" };
        let _ = write!(out, "\n  {short}{more}");
    }
    out
}

pub fn write_failed(seed: u64, sql: &str, e: tokio_postgres::Error) -> ! {
    panic!(
        "seed {seed}: write through pgtier failed: {}\n{sql}",
        db_error(&e)
    )
}
