//! Issue 12, case 19: every input the fuzzers kept (fuzz/corpus/, where the
//! reproducers of fixed findings go too) goes through its target again, so a
//! decoder or analysis regression shows up in `cargo test`, not only in the
//! next fuzzing run.

#[path = "../fuzz/targets.rs"]
mod targets;

use std::path::Path;

fn inputs(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_none())
        .filter_map(|p| Some((p.display().to_string(), std::fs::read(&p).ok()?)))
        .collect();
    out.sort();
    out
}

#[test]
fn case_19_fuzz_corpus_replays_clean() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut total = 0;
    for t in targets::ALL {
        for (name, input) in inputs(&root.join("corpus").join(t.name())) {
            total += 1;
            // The analysis runs on a tokio worker's 2 MiB stack in pgtier.
            let r = std::thread::Builder::new()
                .stack_size(2 << 20)
                .spawn(move || targets::run(t, &input))
                .unwrap()
                .join();
            match r {
                Ok(Ok(_)) => {}
                Ok(Err(finding)) => panic!("{name}: {finding}"),
                Err(_) => panic!("{name}: panicked"),
            }
        }
    }
    assert!(total > 0, "no fuzz corpus found under {}", root.display());
}
