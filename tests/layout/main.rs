//! The crate's layout, checked on its source text: no import cycles between
//! source files or between top-level modules, no source file over
//! `MAX_LINES` lines, and a `//!` comment opening every file.
//!
//! The import graph is built from `src/**/*.rs` with a small lexer (no parser
//! dependency). A node is a source file (one module); `a -> b` when `a` names a
//! path inside `b`: `use crate::b::..`, `crate::b::x` in code, `super::..`,
//! `self::..`, and `child::x` paths to its own child modules. A path is resolved
//! to the deepest module that exists (`super::Proxy` in `proxy/session.rs` is
//! `proxy/mod.rs`, `super::conn::OutQueue` is `proxy/conn.rs`). Declaring a
//! child (`mod x;`) is no edge. Test-only code is left out: files reached only
//! through `#[cfg(test)] mod x;` are never read, and `#[cfg(test)]` items
//! (inline `mod tests { .. }`, functions, fields) are skipped.
//!
//! The top-level graph merges files into their top-level module (`src/foo.rs`
//! or `src/foo/`, plus `main` for the binary); its layering is printed.

mod graph;
mod source;

use std::fs;
use std::path::{Path, PathBuf};

use graph::{describe_cycles, layering, Crate};
use source::parse;

/// Longest a source file may be.
const MAX_LINES: usize = 700;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A path relative to the crate root, as the failure messages show it.
fn rel(path: &Path) -> String {
    path.strip_prefix(root())
        .unwrap_or(path)
        .display()
        .to_string()
}

#[test]
fn no_import_cycles() {
    let krate = Crate::load();
    let files = krate.file_graph();
    let top = krate.top_graph(&files);
    let layers = layering(&top);
    println!("top-level layering (each module imports only from layers below it):\n{layers}");
    let (nf, file_cycles) = describe_cycles(&files, "file");
    let (nt, top_cycles) = describe_cycles(&top, "top-level");
    assert!(
        nf == 0 && nt == 0,
        "{nf} file-level and {nt} top-level import cycle(s); cut each by moving what both \
         sides need into a lower file (a parent `mod.rs` should only declare and re-export).\n\n\
         {file_cycles}\n{top_cycles}\ntop-level layering:\n{layers}"
    );
}

/// The checker itself finds references of every kind, and no false ones.
#[test]
fn checker_sees_paths_and_skips_tests() {
    let p = parse(
        r###"
        //! crate::doc::comment is not a path
        use super::conn::{self, OutQueue as Q};
        use crate::{cache::{Cache, key::*}, metrics};
        pub(crate) use child::Thing;
        mod child;
        #[cfg(test)]
        mod tests;
        #[cfg(test)]
        mod inline { use crate::test_only::X; }
        #[cfg(test)]
        fn helper() -> crate::test_only::Y { crate::test_only::z() }
        fn f<'a>(x: &'a str) -> char {
            let _ = "crate::in_a_string::X";
            let _ = r#"crate::raw::X "# still raw"#;
            let _ = (b'"', b'\'', '\'', '\u{1F600}', "esc \" crate::x::Y");
            let _ = ::metrics::counter!("x");
            crate::protocol::backend::encode(x);
            'x'
        }
        "###,
    );
    let paths: Vec<String> = p.paths.iter().map(|(_, p, _)| p.join("::")).collect();
    assert_eq!(p.children, vec!["child".to_string()]);
    assert_eq!(
        paths,
        [
            "super::conn::self",
            "super::conn::OutQueue",
            "crate::cache::Cache",
            "crate::cache::key",
            "crate::metrics",
            "child::Thing",
            "crate::protocol::backend::encode",
        ]
    );
    let krate = Crate::load();
    let files = krate.file_graph();
    assert!(
        files["src/proxy/session.rs"].contains_key("src/proxy/conn.rs"),
        "{files:#?}"
    );
    assert!(files["src/main.rs"].contains_key("src/config/cli.rs"));
    assert!(
        krate.files.keys().all(|f| !f.ends_with("tests.rs")),
        "test-only files are left out"
    );
}

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_file_over_the_line_limit() {
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    rust_files(&root().join("tests"), &mut files);
    let mut long: Vec<(usize, String)> = files
        .iter()
        .map(|f| {
            (
                fs::read_to_string(f).map_or(0, |t| t.lines().count()),
                rel(f),
            )
        })
        .filter(|(n, _)| *n > MAX_LINES)
        .collect();
    long.sort_by(|a, b| b.cmp(a));
    let list: Vec<String> = long
        .iter()
        .map(|(n, f)| format!("  {f}: {n} lines"))
        .collect();
    assert!(
        long.is_empty(),
        "{} file(s) over {MAX_LINES} lines; split them by job:\n{}",
        long.len(),
        list.join("\n")
    );
}

/// Every source file opens with a `//!` comment saying what it is for.
#[test]
fn every_file_says_what_it_is_for() {
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    rust_files(&root().join("tests"), &mut files);
    let mut bare: Vec<String> = files
        .iter()
        .filter(|f| {
            let text = fs::read_to_string(f).unwrap_or_default();
            !text.trim_start().starts_with("//!")
        })
        .map(|f| rel(f))
        .collect();
    bare.sort();
    assert!(
        bare.is_empty(),
        "files without a `//!` comment:\n  {}",
        bare.join("\n  ")
    );
}
