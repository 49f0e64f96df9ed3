//! The import graphs: modules found from `src/lib.rs` through their `mod`
//! declarations, each path resolved to the deepest module that exists, and
//! what the graphs say (strongly connected components, cycles, layers).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use crate::source::{parse, Parsed};
use crate::{rel, root};

/// One reference behind an edge: where it is and what it names.
#[derive(Debug, Clone)]
pub struct Evidence {
    line: usize,
    path: String,
}

pub type Graph = BTreeMap<String, BTreeMap<String, Vec<Evidence>>>;

/// The library's modules (path -> file) and what each file names.
pub struct Crate {
    pub modules: BTreeMap<Vec<String>, String>,
    /// file -> (its module path, parsed text); `src/main.rs` is the binary.
    pub files: BTreeMap<String, (Vec<String>, Parsed)>,
}

impl Crate {
    pub fn load() -> Crate {
        let mut c = Crate {
            modules: BTreeMap::new(),
            files: BTreeMap::new(),
        };
        let src = root().join("src");
        c.visit(&src.join("lib.rs"), Vec::new(), &src);
        let main = src.join("main.rs");
        if main.exists() {
            let text = fs::read_to_string(&main).expect("read src/main.rs");
            c.files.insert(rel(&main), (Vec::new(), parse(&text)));
        }
        c
    }

    /// Read `file` (module `path`) and the children it declares, found in `dir`.
    fn visit(&mut self, file: &Path, path: Vec<String>, dir: &Path) {
        let text = fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let parsed = parse(&text);
        let name = rel(file);
        self.modules.insert(path.clone(), name.clone());
        for (scope, _, _) in &parsed.paths {
            if !scope.is_empty() {
                let mut inline = path.clone();
                inline.extend(scope.iter().cloned());
                self.modules.entry(inline).or_insert_with(|| name.clone());
            }
        }
        for child in &parsed.children {
            let mut child_path = path.clone();
            child_path.push(child.clone());
            let flat = dir.join(format!("{child}.rs"));
            let nested = dir.join(child).join("mod.rs");
            let found = if flat.exists() { flat } else { nested };
            assert!(
                found.exists(),
                "{name} declares `mod {child};` but there is no file for it"
            );
            self.visit(&found, child_path, &dir.join(child));
        }
        self.files.insert(name, (path, parsed));
    }

    fn is_main(file: &str) -> bool {
        file == "src/main.rs"
    }

    /// The module a path names (the deepest one that exists), if it is ours.
    fn resolve(&self, file: &str, here: &[String], path: &[String]) -> Option<Vec<String>> {
        let first = path.first()?.as_str();
        let (mut cur, rest): (Vec<String>, &[String]) = match first {
            "pgtier" if Self::is_main(file) => (Vec::new(), &path[1..]),
            _ if Self::is_main(file) => return None,
            "crate" => (Vec::new(), &path[1..]),
            "self" => (here.to_vec(), &path[1..]),
            "super" => {
                let mut base = here.to_vec();
                let mut k = 0;
                while path.get(k).map(String::as_str) == Some("super") {
                    base.pop()?;
                    k += 1;
                }
                (base, &path[k..])
            }
            child => {
                let mut c = here.to_vec();
                c.push(child.to_string());
                if !self.modules.contains_key(&c) {
                    return None;
                }
                (here.to_vec(), path)
            }
        };
        for seg in rest.iter().filter(|s| *s != "self") {
            let mut next = cur.clone();
            next.push(seg.clone());
            if !self.modules.contains_key(&next) {
                break;
            }
            cur = next;
        }
        Some(cur)
    }

    /// File-level import graph.
    pub fn file_graph(&self) -> Graph {
        let mut g = Graph::new();
        for (file, (modpath, parsed)) in &self.files {
            let node = g.entry(file.clone()).or_default();
            for (scope, path, line) in &parsed.paths {
                let mut here = modpath.clone();
                here.extend(scope.iter().cloned());
                let Some(target) = self.resolve(file, &here, path) else {
                    continue;
                };
                let to = &self.modules[&target];
                if to != file {
                    node.entry(to.clone()).or_default().push(Evidence {
                        line: *line,
                        path: path.join("::"),
                    });
                }
            }
        }
        g
    }

    /// The top-level module a file belongs to.
    fn top(&self, file: &str) -> String {
        if Self::is_main(file) {
            return "main".into();
        }
        match self.files[file].0.first() {
            Some(m) => m.clone(),
            None => "lib".into(),
        }
    }

    /// Top-level import graph; evidence names the file.
    pub fn top_graph(&self, files: &Graph) -> Graph {
        let mut g = Graph::new();
        for (from, tos) in files {
            let a = self.top(from);
            if a == "lib" && tos.is_empty() {
                continue; // lib.rs only declares the modules
            }
            let node = g.entry(a.clone()).or_default();
            for (to, ev) in tos {
                let b = self.top(to);
                if a != b {
                    node.entry(b)
                        .or_default()
                        .extend(ev.iter().map(|e| Evidence {
                            line: e.line,
                            path: format!("{from}: {}", e.path),
                        }));
                }
            }
        }
        g
    }
}

/// Strongly connected components (Tarjan), each sorted; in reverse topological order.
fn components(g: &Graph) -> Vec<Vec<String>> {
    struct State<'a> {
        g: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.g.get(v).into_iter().flat_map(|m| m.keys()) {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if s.on_stack.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            comp.sort();
            s.out.push(comp);
        }
    }
    let mut s = State {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    let nodes: BTreeSet<&str> = g
        .iter()
        .flat_map(|(a, tos)| std::iter::once(a.as_str()).chain(tos.keys().map(String::as_str)))
        .collect();
    for v in nodes {
        if !s.index.contains_key(v) {
            visit(&mut s, v);
        }
    }
    s.out
}

/// A shortest cycle through `start` inside `comp`.
fn shortest_cycle(g: &Graph, comp: &[String], start: &str) -> Vec<String> {
    let inside: BTreeSet<&str> = comp.iter().map(String::as_str).collect();
    let mut prev: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = VecDeque::from([start]);
    while let Some(v) = queue.pop_front() {
        for w in g.get(v).into_iter().flat_map(|m| m.keys()) {
            let w = w.as_str();
            if w == start {
                let mut cycle = vec![start.to_string()];
                let mut at = v;
                while at != start {
                    cycle.push(at.to_string());
                    at = prev[at];
                }
                cycle.push(start.to_string());
                cycle.reverse();
                return cycle;
            }
            if inside.contains(w) && !prev.contains_key(w) {
                prev.insert(w, v);
                queue.push_back(w);
            }
        }
    }
    vec![start.to_string()]
}

/// Every cycle of `g`, described: members, one shortest cycle, and each edge
/// inside the component with the references behind it.
pub fn describe_cycles(g: &Graph, what: &str) -> (usize, String) {
    let cyclic: Vec<Vec<String>> = components(g).into_iter().filter(|c| c.len() > 1).collect();
    let mut s = String::new();
    for (n, comp) in cyclic.iter().enumerate() {
        let owner = if comp.iter().any(|f| f.starts_with("src/proxy/caching")) {
            " [involves src/proxy/caching*]"
        } else {
            ""
        };
        let _ = writeln!(
            s,
            "{what} cycle {}{owner}: {}",
            n + 1,
            shortest_cycle(g, comp, &comp[0]).join(" -> ")
        );
        let _ = writeln!(s, "  members: {}", comp.join(", "));
        for a in comp {
            for (b, ev) in g.get(a).into_iter().flatten() {
                if comp.contains(b) {
                    let refs: Vec<String> = ev
                        .iter()
                        .take(4)
                        .map(|e| format!("line {}: {}", e.line, e.path))
                        .collect();
                    let more = if ev.len() > 4 {
                        format!(" (+{} more)", ev.len() - 4)
                    } else {
                        String::new()
                    };
                    let _ = writeln!(s, "    {a} -> {b}   [{}]{more}", refs.join("; "));
                }
            }
        }
    }
    (cyclic.len(), s)
}

/// Layers bottom-up: a module sits one above the highest thing it imports
/// (a cycle shows as one `{a, b}` node).
pub fn layering(g: &Graph) -> String {
    let comps = components(g); // dependencies come first
    let mut comp_of: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, c) in comps.iter().enumerate() {
        for m in c {
            comp_of.insert(m, i);
        }
    }
    let mut level = vec![0usize; comps.len()];
    for (i, c) in comps.iter().enumerate() {
        for m in c {
            for to in g.get(m).into_iter().flat_map(|t| t.keys()) {
                let j = comp_of[to.as_str()];
                if j != i {
                    level[i] = level[i].max(level[j] + 1);
                }
            }
        }
    }
    let mut layers: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for (i, c) in comps.iter().enumerate() {
        let name = if c.len() == 1 {
            c[0].clone()
        } else {
            format!("{{{}}}", c.join(", "))
        };
        layers.entry(level[i]).or_default().push(name);
    }
    let mut s = String::new();
    for (l, mut names) in layers {
        names.sort();
        let _ = writeln!(s, "  layer {l}: {}", names.join(", "));
    }
    let _ = writeln!(s, "imports:");
    for (a, tos) in g {
        let names: Vec<&str> = tos.keys().map(String::as_str).collect();
        let _ = writeln!(s, "  {a} -> {}", names.join(", "));
    }
    s
}
