//! Fuzz driver for the protocol decoders and statement analysis (stable Rust,
//! no cargo-fuzz): generates inputs from a grammar, mutates kept inputs, runs
//! them through `targets::run` and keeps those that reach new features.
//!
//! ```text
//! cargo run --profile fuzz --example fuzz_decoders -- TARGET SECONDS [SEED]
//! ```
//! TARGET is frontend, backend, startup or sql. The corpus lives in
//! fuzz/corpus/TARGET (read at start, grown as new features turn up) and
//! findings in fuzz/findings/TARGET. fuzz/run.sh runs every target.

mod gen;
mod targets;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use gen::Rng;
use targets::Target;

/// Kept inputs per target: the corpus is committed, so it stays small.
const CORPUS_CAP: usize = 600;
const MAX_KEPT_LEN: usize = 4096;
/// Tokio's worker stack: the analysis runs on one in pgtier.
const STACK: usize = 2 << 20;

fn generate(target: Target, rng: &mut Rng) -> Vec<u8> {
    match target {
        Target::Frontend => {
            let mut m = gen::frontend_messages(rng);
            gen::encode_messages(rng, &mut m, true)
        }
        Target::Backend => {
            let mut m = gen::backend_messages(rng);
            gen::encode_messages(rng, &mut m, true)
        }
        Target::Startup => gen::startup(rng),
        Target::Sql => gen::sql(rng).into_bytes(),
    }
}

fn hash(b: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(b)
}

/// A finding's class: its text without numbers, so repeats are counted once.
fn class(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_ascii_digit())
        .take(120)
        .collect()
}

struct Fuzzer {
    target: Target,
    corpus: Vec<Vec<u8>>,
    seen: BTreeSet<String>,
    corpus_dir: PathBuf,
    findings_dir: PathBuf,
    findings: BTreeMap<String, (usize, Vec<u8>)>,
    execs: u64,
    slowest: Duration,
    current: std::fs::File,
    /// Replaying the stored corpus: already kept.
    loading: bool,
}

impl Fuzzer {
    fn exec(&mut self, input: &[u8]) -> bool {
        if self.target == Target::Sql {
            // An abort (stack overflow) cannot be caught: leave the input behind
            // for fuzz/run.sh to file as a crash.
            let _ = self.current.set_len(0);
            let _ = self.current.write_all_at(input, 0);
        }
        self.execs += 1;
        let started = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(|| targets::run(self.target, input)));
        let took = started.elapsed();
        if took > self.slowest {
            self.slowest = took;
            if took > Duration::from_millis(500) {
                self.finding(format!("slow: {} ms", took.as_millis()), input);
            }
        }
        match outcome {
            Ok(Ok(features)) => {
                let new: Vec<String> = features
                    .into_iter()
                    .filter(|f| !self.seen.contains(f))
                    .collect();
                if new.is_empty() {
                    return false;
                }
                self.seen.extend(new);
                if !self.loading && input.len() <= MAX_KEPT_LEN {
                    self.keep(input);
                }
                true
            }
            Ok(Err(finding)) => {
                self.finding(finding, input);
                false
            }
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                self.finding(format!("panic: {msg}"), input);
                false
            }
        }
    }

    fn keep(&mut self, input: &[u8]) {
        self.corpus.push(input.to_vec());
        if self.corpus.len() <= CORPUS_CAP {
            let path = self.corpus_dir.join(format!("{:016x}", hash(input)));
            if !path.exists() {
                let _ = std::fs::write(path, input);
            }
        }
    }

    fn finding(&mut self, what: String, input: &[u8]) {
        let c = class(&what);
        let e = self
            .findings
            .entry(c)
            .or_insert_with(|| (0, input.to_vec()));
        e.0 += 1;
        if e.0 == 1 {
            eprintln!("FINDING [{}]: {what}", self.target.name());
            let path = self.findings_dir.join(format!("{:016x}", hash(input)));
            let _ = std::fs::write(&path, input);
            let _ = std::fs::write(path.with_extension("txt"), &what);
        }
    }

    fn mutate(&self, rng: &mut Rng) -> Vec<u8> {
        let mut v = rng.pick(&self.corpus).clone();
        let other = rng.pick(&self.corpus).clone();
        for _ in 0..1 + rng.below(4) {
            gen::mutate_bytes(rng, &mut v, Some(&other));
        }
        if v.len() > 64 * 1024 {
            v.truncate(64 * 1024);
        }
        v
    }
}

fn load(dir: &Path) -> Vec<Vec<u8>> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    names.sort();
    names
        .into_iter()
        .filter_map(|p| std::fs::read(p).ok())
        .collect()
}

fn run(target: Target, secs: u64, seed: u64) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let corpus_dir = root.join("corpus").join(target.name());
    let findings_dir = root.join("findings").join(target.name());
    let _ = std::fs::create_dir_all(&corpus_dir);
    let _ = std::fs::create_dir_all(&findings_dir);
    let current = match std::fs::File::create(findings_dir.join(".current")) {
        Ok(f) => f,
        Err(e) => return format!("cannot write to {}: {e}", findings_dir.display()),
    };
    let mut f = Fuzzer {
        target,
        corpus: Vec::new(),
        seen: BTreeSet::new(),
        corpus_dir: corpus_dir.clone(),
        findings_dir,
        findings: BTreeMap::new(),
        execs: 0,
        slowest: Duration::ZERO,
        current,
        loading: true,
    };
    let mut rng = Rng::new(seed);
    let started = Instant::now();
    let stored = load(&corpus_dir);
    let loaded = stored.len();
    for input in stored {
        f.exec(&input);
        f.corpus.push(input);
    }
    f.loading = false;
    while f.corpus.len() < 32 {
        let input = generate(target, &mut rng);
        if !f.exec(&input) {
            f.corpus.push(input);
        }
    }
    let deadline = started + Duration::from_secs(secs);
    let mut report = Instant::now();
    while Instant::now() < deadline {
        for _ in 0..64 {
            let input = if rng.chance(25) {
                generate(target, &mut rng)
            } else {
                f.mutate(&mut rng)
            };
            f.exec(&input);
        }
        if report.elapsed() > Duration::from_secs(30) {
            report = Instant::now();
            eprintln!(
                "[{}] {:>5}s execs {} ({}/s) corpus {} features {} findings {}",
                target.name(),
                started.elapsed().as_secs(),
                f.execs,
                f.execs / started.elapsed().as_secs().max(1),
                f.corpus.len(),
                f.seen.len(),
                f.findings.len()
            );
        }
    }
    let _ = std::fs::remove_file(f.findings_dir.join(".current"));
    let mut summary = format!(
        "target={} secs={} execs={} execs_per_sec={} corpus_loaded={loaded} corpus={} features={} slowest_ms={} findings={}",
        target.name(),
        started.elapsed().as_secs(),
        f.execs,
        f.execs / started.elapsed().as_secs().max(1),
        f.corpus.len(),
        f.seen.len(),
        f.slowest.as_millis(),
        f.findings.len(),
    );
    for (c, (n, _)) in &f.findings {
        summary.push_str(&format!("\n  finding x{n}: {c}"));
    }
    summary
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(target) = args.first().and_then(|t| Target::parse(t)) else {
        eprintln!("usage: fuzz_decoders frontend|backend|startup|sql SECONDS [SEED]");
        std::process::exit(2);
    };
    let secs = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(60);
    let seed = args.get(2).and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    std::panic::set_hook(Box::new(|_| {}));
    let worker = std::thread::Builder::new()
        .stack_size(STACK)
        .spawn(move || run(target, secs, seed));
    match worker.map(|w| w.join()) {
        Ok(Ok(summary)) => {
            println!("seed={seed} {summary}");
            let _ = std::io::stdout().flush();
        }
        _ => {
            eprintln!("fuzz worker failed");
            std::process::exit(1);
        }
    }
}
