//! Reading a source file without a parser: a small lexer (identifiers, `::`,
//! punctuation; comments and literals dropped), then the module declarations
//! and every path the file names, with test-only code left out.

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    /// `::`
    Sep,
    Punct(char),
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    line: usize,
}

/// Identifiers, `::` and punctuation; comments and literals dropped.
fn lex(src: &str) -> Vec<Token> {
    let c: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let (mut i, mut line) = (0, 1);
    let ident_start = |ch: char| ch.is_alphabetic() || ch == '_';
    let ident_char = |ch: char| ch.is_alphanumeric() || ch == '_';
    // Skip a "..." literal whose opening quote is at `i`; returns the index after it.
    let skip_str = |mut i: usize, line: &mut usize| {
        i += 1;
        while i < c.len() && c[i] != '"' {
            if c[i] == '\\' {
                i += 1;
            }
            if i < c.len() && c[i] == '\n' {
                *line += 1;
            }
            i += 1;
        }
        i + 1
    };
    while i < c.len() {
        let ch = c[i];
        let next = c.get(i + 1).copied().unwrap_or('\0');
        if ch == '\n' {
            line += 1;
            i += 1;
        } else if ch.is_whitespace() {
            i += 1;
        } else if ch == '/' && next == '/' {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch == '/' && next == '*' {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if c[i] == '\n' {
                        line += 1;
                    }
                    i += 1;
                }
            }
        } else if ch == '"' {
            i = skip_str(i, &mut line);
        } else if ch == '\'' {
            // A char literal ('a', '\n', '\u{..}') or a lifetime ('a).
            if next == '\\' {
                i += 3; // the quote, the backslash and the escaped character
                while i < c.len() && c[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if c.get(i + 2) == Some(&'\'') {
                i += 3;
            } else {
                i += 1;
                while i < c.len() && ident_char(c[i]) {
                    i += 1;
                }
            }
        } else if ch.is_ascii_digit() {
            while i < c.len() && ident_char(c[i]) {
                i += 1;
            }
        } else if ident_start(ch) {
            let start = i;
            while i < c.len() && ident_char(c[i]) {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            let at = c.get(i).copied().unwrap_or('\0');
            let mut hashes = 0;
            while c.get(i + hashes) == Some(&'#') {
                hashes += 1;
            }
            let raw_str =
                matches!(word.as_str(), "r" | "br" | "cr") && c.get(i + hashes) == Some(&'"');
            match (word.as_str(), at) {
                _ if raw_str => {
                    // r"..." or r#"..."#: ends at a quote followed by as many #.
                    i += hashes + 1;
                    while i < c.len() {
                        if c[i] == '"' && (1..=hashes).all(|k| c.get(i + k) == Some(&'#')) {
                            i += 1 + hashes;
                            break;
                        }
                        if c[i] == '\n' {
                            line += 1;
                        }
                        i += 1;
                    }
                }
                ("r", '#') => {
                    // A raw identifier.
                    i += 1;
                    let start = i;
                    while i < c.len() && ident_char(c[i]) {
                        i += 1;
                    }
                    out.push(Token {
                        tok: Tok::Ident(c[start..i].iter().collect()),
                        line,
                    });
                }
                ("b" | "c", '"') => i = skip_str(i, &mut line),
                ("b", '\'') => {
                    i += 1;
                    i += if c.get(i) == Some(&'\\') { 2 } else { 1 };
                    while i < c.len() && c[i] != '\'' {
                        i += 1;
                    }
                    i += 1;
                }
                _ => out.push(Token {
                    tok: Tok::Ident(word),
                    line,
                }),
            }
        } else if ch == ':' && next == ':' {
            out.push(Token {
                tok: Tok::Sep,
                line,
            });
            i += 2;
        } else {
            out.push(Token {
                tok: Tok::Punct(ch),
                line,
            });
            i += 1;
        }
    }
    out
}

/// What one file declares and names, test-only code left out.
#[derive(Default, Debug)]
pub struct Parsed {
    /// `mod x;` (not under `#[cfg(test)]`).
    pub children: Vec<String>,
    /// (inline module scope, path segments, line).
    pub paths: Vec<(Vec<String>, Vec<String>, usize)>,
}

fn is_ident(t: Option<&Token>, s: &str) -> bool {
    matches!(t, Some(Token { tok: Tok::Ident(w), .. }) if w == s)
}

fn is_punct(t: Option<&Token>, p: char) -> bool {
    matches!(t, Some(Token { tok: Tok::Punct(q), .. }) if *q == p)
}

fn ident(t: Option<&Token>) -> Option<&str> {
    match t {
        Some(Token {
            tok: Tok::Ident(w), ..
        }) => Some(w),
        _ => None,
    }
}

/// The index after the bracket group opening at `i`.
fn skip_group(t: &[Token], mut i: usize) -> usize {
    let mut depth = 0i32;
    while i < t.len() {
        match t[i].tok {
            Tok::Punct('{' | '(' | '[') => depth += 1,
            Tok::Punct('}' | ')' | ']') => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    i
}

const ITEM_WORDS: &[&str] = &[
    "fn",
    "mod",
    "impl",
    "trait",
    "struct",
    "enum",
    "union",
    "use",
    "const",
    "static",
    "type",
    "extern",
    "unsafe",
    "async",
    "macro_rules",
    "let",
];

/// Skip the item, statement, field or arm starting at `i` (after its attributes).
fn skip_item(t: &[Token], mut i: usize) -> usize {
    let mut j = i;
    if is_ident(t.get(j), "pub") {
        j += 1;
        if is_punct(t.get(j), '(') {
            j = skip_group(t, j);
        }
    }
    let item = ident(t.get(j)).is_some_and(|w| ITEM_WORDS.contains(&w));
    while i < t.len() {
        match t[i].tok {
            Tok::Punct(';') => return i + 1,
            Tok::Punct(',') if !item => return i + 1,
            Tok::Punct('}' | ')' | ']') => return i, // the enclosing group ends
            Tok::Punct('{') if item => return skip_group(t, i),
            Tok::Punct('{' | '(' | '[') => i = skip_group(t, i),
            _ => i += 1,
        }
    }
    i
}

/// Expand the use tree at `i` (after `use`); returns the index after it.
fn use_tree(t: &[Token], mut i: usize, prefix: &[String], out: &mut Vec<Vec<String>>) -> usize {
    let mut segs = prefix.to_vec();
    if matches!(t.get(i).map(|x| &x.tok), Some(Tok::Sep)) {
        segs.push("::".into()); // an absolute path: another crate
        i += 1;
    }
    loop {
        match t.get(i).map(|x| &x.tok) {
            Some(Tok::Ident(w)) => {
                segs.push(w.clone());
                i += 1;
                if matches!(t.get(i).map(|x| &x.tok), Some(Tok::Sep)) {
                    i += 1;
                    continue;
                }
                if is_ident(t.get(i), "as") {
                    i += 2;
                }
                out.push(segs);
                return i;
            }
            Some(Tok::Punct('*')) => {
                out.push(segs);
                return i + 1;
            }
            Some(Tok::Punct('{')) => {
                i += 1;
                while i < t.len() && !is_punct(t.get(i), '}') {
                    i = use_tree(t, i, &segs, out);
                    if is_punct(t.get(i), ',') {
                        i += 1;
                    }
                }
                return i + 1;
            }
            _ => return i,
        }
    }
}

pub fn parse(src: &str) -> Parsed {
    let t = lex(src);
    let mut p = Parsed::default();
    // Inline (non-test) modules: (name, brace depth inside them).
    let mut scopes: Vec<(String, i32)> = Vec::new();
    let mut depth = 0i32;
    let mut test_only = false;
    let mut i = 0;
    let scope = |s: &Vec<(String, i32)>| s.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    while i < t.len() {
        if is_punct(t.get(i), '#') {
            let inner = is_punct(t.get(i + 1), '!');
            let open = if inner { i + 2 } else { i + 1 };
            let end = skip_group(&t, open);
            let words: Vec<&Tok> = t[open + 1..end.saturating_sub(1)]
                .iter()
                .map(|x| &x.tok)
                .collect();
            let cfg_test = words.len() == 4
                && words[0] == &Tok::Ident("cfg".into())
                && words[2] == &Tok::Ident("test".into());
            if cfg_test && inner {
                return Parsed::default(); // the whole file is test-only
            }
            test_only |= cfg_test;
            i = end;
            continue;
        }
        if test_only {
            test_only = false;
            i = skip_item(&t, i);
            continue;
        }
        let line = t[i].line;
        match &t[i].tok {
            Tok::Punct('{') => depth += 1,
            Tok::Punct('}') => {
                depth -= 1;
                while scopes.last().is_some_and(|(_, d)| *d > depth) {
                    scopes.pop();
                }
            }
            Tok::Ident(w) if w == "mod" => {
                if let Some(name) = ident(t.get(i + 1)) {
                    if is_punct(t.get(i + 2), ';') && scopes.is_empty() {
                        p.children.push(name.to_string());
                    } else if is_punct(t.get(i + 2), '{') {
                        depth += 1;
                        scopes.push((name.to_string(), depth));
                        i += 3;
                        continue;
                    }
                }
            }
            Tok::Ident(w) if w == "use" => {
                let mut paths = Vec::new();
                i = use_tree(&t, i + 1, &[], &mut paths);
                for path in paths {
                    p.paths.push((scope(&scopes), path, line));
                }
                continue;
            }
            Tok::Sep => {
                // `::x::y`: another crate's path.
                i += 1;
                while ident(t.get(i)).is_some()
                    && matches!(t.get(i + 1).map(|x| &x.tok), Some(Tok::Sep))
                {
                    i += 2;
                }
                continue;
            }
            Tok::Ident(w) if matches!(t.get(i + 1).map(|x| &x.tok), Some(Tok::Sep)) => {
                let mut path = vec![w.clone()];
                i += 2;
                while let Some(w) = ident(t.get(i)) {
                    path.push(w.to_string());
                    i += 1;
                    if !matches!(t.get(i).map(|x| &x.tok), Some(Tok::Sep)) {
                        break;
                    }
                    i += 1;
                }
                p.paths.push((scope(&scopes), path, line));
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    p
}
