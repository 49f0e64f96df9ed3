//! Differential wire fuzzer: the same generated message stream goes to Postgres
//! directly and through pgtier, and the two reply streams must match (not only
//! "no crash"). Streams come from a grammar of simple and extended-protocol
//! requests, COPY and Terminate, then get mutated; each is written coalesced,
//! one message per write, or split at random points.
//!
//! ```text
//! cargo run --profile fuzz --example fuzz_wire -- PGTIER_PORT PG_PORT DB SECONDS [SEED]
//! ```
//! DB must hold the tables that fuzz/wire.sh creates. A divergence is shrunk
//! (messages removed while it persists) and written to fuzz/findings/wire/.

mod gen;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use gen::{msg, Rng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MARKER: &[u8] = b"fuzz-end";

#[derive(Clone, Debug)]
struct Case {
    /// Encoded messages after startup (the end marker query is added on send).
    msgs: Vec<Vec<u8>>,
    /// Send the startup packet in the same write as the first messages.
    coalesced_startup: bool,
    /// 0: all at once; 1: a write per message; n > 1: n random chunks.
    split: usize,
    /// Bytes were damaged after encoding.
    mutated: bool,
    /// The UPDATEs the case makes: applied before both runs, so both start
    /// from the same data (the reference run would otherwise change it).
    writes: Vec<String>,
    seed: u64,
}

fn query(sql: &str) -> Vec<u8> {
    let mut b = sql.as_bytes().to_vec();
    b.push(0);
    msg(b'Q', &b)
}

fn parse(name: &str, sql: &str) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(name.as_bytes());
    b.push(0);
    b.extend_from_slice(sql.as_bytes());
    b.push(0);
    b.extend_from_slice(&0i16.to_be_bytes());
    msg(b'P', &b)
}

fn bind(portal: &str, stmt: &str, params: &[&str], binary: bool) -> Vec<u8> {
    let mut b = Vec::new();
    for s in [portal, stmt] {
        b.extend_from_slice(s.as_bytes());
        b.push(0);
    }
    b.extend_from_slice(&0i16.to_be_bytes());
    b.extend_from_slice(&(params.len() as i16).to_be_bytes());
    for p in params {
        b.extend_from_slice(&(p.len() as i32).to_be_bytes());
        b.extend_from_slice(p.as_bytes());
    }
    if binary {
        b.extend_from_slice(&1i16.to_be_bytes());
        b.extend_from_slice(&1i16.to_be_bytes());
    } else {
        b.extend_from_slice(&0i16.to_be_bytes());
    }
    msg(b'B', &b)
}

fn named(tag: u8, kind: u8, name: &str) -> Vec<u8> {
    let mut b = vec![kind];
    b.extend_from_slice(name.as_bytes());
    b.push(0);
    msg(tag, &b)
}

fn execute(portal: &str, max_rows: i32) -> Vec<u8> {
    let mut b = portal.as_bytes().to_vec();
    b.push(0);
    b.extend_from_slice(&max_rows.to_be_bytes());
    msg(b'E', &b)
}

const READS: [&str; 8] = [
    "select id, v, s from w where id = 1",
    "select id, v, s from w order by id",
    "select count(*), sum(v) from w",
    "select s from w where id = 2",
    "select v from w where id = $1",
    "select 1",
    "select now() is not null",
    "select id from w where s = $1 order by id",
];
const OTHERS: [&str; 16] = [
    "selec 1",
    "select 1/0",
    "select * from no_such_table",
    "begin",
    "commit",
    "rollback",
    "set timezone = 'UTC'",
    "set timezone = 'America/New_York'",
    "reset all",
    "select 1; select 2",
    "",
    "show timezone",
    "select 1; selec 2",
    "copy (select id from w order by id) to stdout",
    "discard all",
    "select pg_sleep(0)",
];

fn write_sql(rng: &mut Rng) -> String {
    format!(
        "update w set v = {} where id = {}",
        rng.below(1000),
        1 + rng.below(3)
    )
}

fn sql(rng: &mut Rng, writes: &mut Vec<String>) -> String {
    match rng.below(10) {
        0..=4 => rng.pick(&READS).to_string(),
        5 => {
            let w = write_sql(rng);
            writes.push(w.clone());
            w
        }
        _ => rng.pick(&OTHERS).to_string(),
    }
}

fn params_for(sql: &str) -> Vec<&'static str> {
    if sql.contains("$1") {
        if sql.contains("s = ") {
            vec!["b"]
        } else {
            vec!["1"]
        }
    } else {
        Vec::new()
    }
}

fn generate(rng: &mut Rng, seed: u64) -> Case {
    let mut msgs = Vec::new();
    let mut writes = Vec::new();
    for _ in 0..1 + rng.below(5) {
        match rng.below(10) {
            0..=3 => {
                let s = sql(rng, &mut writes);
                if s.contains("$1") {
                    msgs.push(query("select 2"));
                } else {
                    msgs.push(query(&s));
                }
            }
            4..=7 => {
                // an extended-protocol request, sometimes unusual
                let s = sql(rng, &mut writes);
                let name = *rng.pick(&["", "", "s1"]);
                if !(name == "s1" && rng.chance(30)) {
                    msgs.push(parse(name, &s));
                }
                let params = params_for(&s);
                match rng.below(6) {
                    0 => {} // Parse alone (PQprepare: Parse, Sync)
                    1 => msgs.push(named(b'D', b'S', name)),
                    _ => {
                        msgs.push(bind("", name, &params, rng.chance(30)));
                        if rng.chance(40) {
                            msgs.push(named(b'D', b'P', ""));
                        }
                        if rng.chance(90) {
                            msgs.push(execute("", *rng.pick(&[0, 0, 0, 1])));
                        }
                    }
                }
                if rng.chance(15) {
                    msgs.push(msg(b'H', b""));
                }
                if rng.chance(10) && name == "s1" {
                    msgs.push(named(b'C', b'S', "s1"));
                }
                if rng.chance(90) {
                    msgs.push(msg(b'S', b""));
                }
            }
            8 => {
                msgs.push(query("copy w2 from stdin"));
                match rng.below(3) {
                    0 => msgs.push(msg(b'f', b"client gave up\0")),
                    _ => {
                        msgs.push(msg(b'd', b"1\tx\n"));
                        msgs.push(msg(b'c', b""));
                    }
                }
                if rng.chance(30) {
                    msgs.push(msg(b'S', b""));
                }
            }
            _ => {
                msgs.push(msg(b'H', b""));
                if rng.chance(50) {
                    msgs.push(msg(b'S', b""));
                }
            }
        }
    }
    if rng.chance(5) {
        msgs.push(msg(b'X', b""));
    }
    let mutated = rng.chance(30);
    if mutated {
        let mut flat: Vec<u8> = msgs.concat();
        for _ in 0..1 + rng.below(3) {
            gen::mutate_bytes(rng, &mut flat, None);
        }
        msgs = vec![flat];
    }
    Case {
        msgs,
        coalesced_startup: rng.chance(3),
        split: *rng.pick(&[0, 0, 1, 2, 3, 5]),
        mutated,
        writes,
        seed,
    }
}

fn startup_packet(db: &str) -> Vec<u8> {
    let mut body = 196608i32.to_be_bytes().to_vec();
    for (k, v) in [("user", "postgres"), ("database", db)] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut p = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    p.extend_from_slice(&body);
    p
}

/// A reply stream, normalised: what may differ between two honest servers
/// (backend key, startup ParameterStatus order, error source positions) is gone.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
struct Replies {
    msgs: Vec<String>,
    closed: bool,
    timed_out: bool,
}

fn describe(tag: u8, body: &[u8]) -> String {
    match tag {
        b'E' | b'N' => {
            let mut s = format!("{}(", tag as char);
            for f in body.split(|&b| b == 0).filter(|f| !f.is_empty()) {
                if matches!(f[0], b'S' | b'C' | b'M') {
                    let _ = write!(s, "{}={} ", f[0] as char, String::from_utf8_lossy(&f[1..]));
                }
            }
            s.push(')');
            s
        }
        b'A' => format!(
            "A({})",
            String::from_utf8_lossy(body.get(4..).unwrap_or(b""))
        ),
        _ => {
            let shown = String::from_utf8_lossy(&body[..body.len().min(60)])
                .replace(|c: char| c.is_control(), ".");
            format!("{}[{}]{shown}", tag as char, body.len())
        }
    }
}

async fn read_replies(s: &mut TcpStream, idle: Duration, hard: Duration) -> Replies {
    let mut out = Replies::default();
    let mut buf = Vec::with_capacity(8192);
    let mut startup = true;
    let mut saw_marker = false;
    let deadline = Instant::now() + hard;
    let mut chunk = [0u8; 8192];
    loop {
        // complete messages in buf
        let mut at = 0;
        while buf.len() - at >= 5 {
            let tag = buf[at];
            let len = i32::from_be_bytes([buf[at + 1], buf[at + 2], buf[at + 3], buf[at + 4]]);
            let len = len.max(4) as usize;
            if buf.len() - at < len + 1 {
                break;
            }
            let body = &buf[at + 5..at + 1 + len];
            at += len + 1;
            let keep = !(tag == b'K' || (startup && tag == b'S'));
            if keep {
                out.msgs.push(describe(tag, body));
            }
            if tag == b'D' && body.windows(MARKER.len()).any(|w| w == MARKER) {
                saw_marker = true;
            }
            if tag == b'Z' {
                startup = false;
                if saw_marker {
                    return out;
                }
            }
        }
        buf.drain(..at);
        let wait = idle.min(deadline.saturating_duration_since(Instant::now()));
        match tokio::time::timeout(wait, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                out.closed = true;
                return out;
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => {
                out.timed_out = true;
                return out;
            }
        }
    }
}

/// Send a case to one server and collect its replies.
async fn run_on(port: u16, db: &str, case: &Case, idle: Duration) -> Replies {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)).await else {
        return Replies {
            msgs: vec!["<connect failed>".into()],
            closed: true,
            timed_out: false,
        };
    };
    let _ = s.set_nodelay(true);
    let mut stream: Vec<u8> = case.msgs.concat();
    stream.extend_from_slice(&query("select 'fuzz-end'"));
    let startup = startup_packet(db);
    let mut head = Replies::default();
    if case.coalesced_startup {
        let mut all = startup;
        all.extend_from_slice(&stream);
        stream = all;
    } else {
        if s.write_all(&startup).await.is_err() {
            head.closed = true;
            return head;
        }
        // until the first ReadyForQuery
        head = read_until_ready(&mut s).await;
        if head.closed || head.timed_out {
            return head;
        }
    }
    let mut rng = Rng::new(case.seed ^ 0x9e37_79b9);
    let chunks: Vec<Vec<u8>> = match case.split {
        0 => vec![stream],
        1 if !case.mutated => {
            let mut c: Vec<Vec<u8>> = case.msgs.clone();
            c.push(query("select 'fuzz-end'"));
            if case.coalesced_startup {
                c[0] = [startup_packet(db), c[0].clone()].concat();
            }
            c
        }
        n => {
            let mut cuts: Vec<usize> = (0..n).map(|_| rng.below(stream.len() + 1)).collect();
            cuts.sort();
            let mut out = Vec::new();
            let mut last = 0;
            for c in cuts.into_iter().chain([stream.len()]) {
                if c > last {
                    out.push(stream[last..c].to_vec());
                    last = c;
                }
            }
            out
        }
    };
    let n = chunks.len();
    let writer = async {
        for (i, c) in chunks.iter().enumerate() {
            if s.write_all(c).await.is_err() {
                break;
            }
            if i + 1 < n {
                tokio::time::sleep(Duration::from_millis(rng.below(4) as u64)).await;
            }
        }
    };
    // Writes are small: they fit the socket buffers, so writing first cannot
    // deadlock with an unread reply.
    tokio::time::timeout(Duration::from_secs(5), writer)
        .await
        .ok();
    let mut r = read_replies(&mut s, idle, Duration::from_secs(10)).await;
    let mut msgs = head.msgs;
    msgs.append(&mut r.msgs);
    r.msgs = msgs;
    r
}

async fn read_until_ready(s: &mut TcpStream) -> Replies {
    let mut out = Replies::default();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let mut at = 0;
        while buf.len() - at >= 5 {
            let tag = buf[at];
            let len = i32::from_be_bytes([buf[at + 1], buf[at + 2], buf[at + 3], buf[at + 4]])
                .max(4) as usize;
            if buf.len() - at < len + 1 {
                break;
            }
            let body = &buf[at + 5..at + 1 + len];
            at += len + 1;
            if tag != b'K' && tag != b'S' {
                out.msgs.push(describe(tag, body));
            }
            if tag == b'Z' || tag == b'E' {
                return out;
            }
        }
        buf.drain(..at);
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                out.closed = true;
                return out;
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => {
                out.timed_out = true;
                return out;
            }
        }
    }
}

struct Ports {
    pgtier: u16,
    pg: u16,
    db: String,
}

/// Run a case on both; Some(kind) if they differ.
async fn compare(p: &Ports, case: &Case) -> Option<(String, Replies, Replies)> {
    if !case.writes.is_empty() {
        let pre = Case {
            msgs: case.writes.iter().map(|w| query(w)).collect(),
            coalesced_startup: false,
            split: 0,
            mutated: false,
            writes: Vec::new(),
            seed: 0,
        };
        run_on(p.pg, &p.db, &pre, Duration::from_millis(300)).await;
    }
    let want = run_on(p.pg, &p.db, case, Duration::from_millis(300)).await;
    if !case.writes.is_empty() {
        // Writes made directly reach pgtier by notification: give that time
        // (well over its bound, on a loaded machine) so a difference is staleness.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let idle = if want.timed_out {
        Duration::from_millis(300)
    } else {
        Duration::from_millis(1500)
    };
    let got = run_on(p.pgtier, &p.db, case, idle).await;
    if want == got {
        return None;
    }
    Some((kind(&want, &got), want, got))
}

/// A short description of how two reply streams differ, for grouping.
fn kind(want: &Replies, got: &Replies) -> String {
    let first = want
        .msgs
        .iter()
        .zip(&got.msgs)
        .position(|(a, b)| a != b)
        .unwrap_or(want.msgs.len().min(got.msgs.len()));
    let head = |r: &Replies| {
        r.msgs
            .get(first)
            .map(|m| m.split(['[', '(']).next().unwrap_or("").to_string())
            .unwrap_or_else(|| {
                if r.timed_out {
                    "<hang>".into()
                } else if r.closed {
                    "<closed>".into()
                } else {
                    "<end>".into()
                }
            })
    };
    let (w, g) = (head(want), head(got));
    let at = |r: &Replies| r.msgs.get(first).cloned().unwrap_or_default();
    let (wm, gm) = (at(want), at(got));
    // Issue 12 cases being fixed elsewhere, and pgtier's documented choice to
    // end a session on a malformed message (Postgres answers ERROR and goes on).
    if gm.contains("NOTIFY") {
        return "known 26: extra CommandComplete NOTIFY after COPY".into();
    }
    if gm.starts_with("E(S=FATAL C=08P01 M=pgtier:") {
        return if wm.starts_with("E(S=ERROR C=08P01") || wm.starts_with("E(S=FATAL C=08P01") {
            "design: malformed message is FATAL in pgtier, ERROR in Postgres".into()
        } else {
            format!(
                "malformed message: pgtier FATAL before answering earlier requests (postgres {w})"
            )
        };
    }
    if w == g && want.msgs.len() == got.msgs.len() {
        // same shape: contents differ (error text, rows)
        let (a, b) = (&want.msgs[first], &got.msgs[first]);
        if a.starts_with('E') || a.starts_with('N') {
            let code = |m: &str| {
                m.split("C=")
                    .nth(1)
                    .map(|c| c[..5.min(c.len())].to_string())
            };
            if code(a) == code(b) {
                return format!("{w}: same code, different text");
            }
        }
        return format!("{w}: contents differ");
    }
    format!("postgres {w} / pgtier {g}")
}

fn shape(case: &Case) -> String {
    let mut s = String::new();
    if case.coalesced_startup {
        s.push_str("startup+");
    }
    for m in &case.msgs {
        s.push(m[0] as char);
    }
    s
}

/// Remove messages while the same kind of divergence remains.
async fn shrink(p: &Ports, case: &Case, kind: &str) -> Case {
    let mut best = case.clone();
    if case.mutated {
        return best;
    }
    let mut i = 0;
    let mut budget = 40;
    while i < best.msgs.len() && budget > 0 {
        budget -= 1;
        let mut c = best.clone();
        c.msgs.remove(i);
        match compare(p, &c).await {
            Some((k, _, _)) if k == kind => best = c,
            _ => i += 1,
        }
    }
    best
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 4 {
        eprintln!("usage: fuzz_wire PGTIER_PORT PG_PORT DB SECONDS [SEED]");
        std::process::exit(2);
    }
    let ports = Ports {
        pgtier: args[0].parse().unwrap_or(0),
        pg: args[1].parse().unwrap_or(5432),
        db: args[2].clone(),
    };
    let secs: u64 = args[3].parse().unwrap_or(60);
    let seed: u64 = args.get(4).and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let dir: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/findings/wire");
    let _ = std::fs::create_dir_all(&dir);
    let mut rng = Rng::new(seed);
    let started = Instant::now();
    let mut cases = 0u64;
    let mut by_kind: BTreeMap<String, (u64, String)> = BTreeMap::new();
    let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
    while started.elapsed() < Duration::from_secs(secs) {
        let case_seed = rng.next();
        let case = generate(&mut Rng::new(case_seed), case_seed);
        cases += 1;
        let Some((k, _, _)) = compare(&ports, &case).await else {
            continue;
        };
        let seen = by_kind
            .keys()
            .filter(|key| key.contains(k.as_str()))
            .count();
        let small = if seen < 3 {
            shrink(&ports, &case, &k).await
        } else {
            case.clone()
        };
        let key = format!(
            "{} | {} | {}",
            if small.mutated { "mutated" } else { "valid" },
            k,
            shape(&small)
        );
        let e = by_kind.entry(key.clone()).or_insert((0, String::new()));
        e.0 += 1;
        if e.0 == 1 {
            // re-run the shrunk case for the record
            let (want, got) = match compare(&ports, &small).await {
                Some((_, w, g)) => (w, g),
                None => (Replies::default(), Replies::default()),
            };
            let mut rep = format!(
                "{key}\nseed {case_seed} split {} mutated {}\nstream {}\n\npostgres (closed {} timed out {}):\n",
                small.split,
                small.mutated,
                hex(&small.msgs.concat()),
                want.closed,
                want.timed_out
            );
            for m in &want.msgs {
                let _ = writeln!(rep, "  {m}");
            }
            let _ = writeln!(
                rep,
                "pgtier (closed {} timed out {}):",
                got.closed, got.timed_out
            );
            for m in &got.msgs {
                let _ = writeln!(rep, "  {m}");
            }
            eprintln!("DIVERGENCE {key}");
            let _ = std::fs::write(dir.join(format!("{case_seed:016x}.txt")), &rep);
            e.1 = format!("{case_seed:016x}");
        }
        *kinds.entry(k).or_insert(0) += 1;
        if cases.is_multiple_of(500) {
            eprintln!(
                "[wire] {}s cases {cases} divergence kinds {}",
                started.elapsed().as_secs(),
                by_kind.len()
            );
        }
    }
    println!(
        "seed={seed} target=wire secs={} cases={cases} divergence_kinds={}",
        started.elapsed().as_secs(),
        by_kind.len()
    );
    println!("  by kind:");
    for (k, n) in &kinds {
        println!("    x{n}: {k}");
    }
    println!("  by kind and shape (shrunk where possible):");
    for (k, (n, file)) in &by_kind {
        println!("    x{n}: {k}  ({file})");
    }
}
