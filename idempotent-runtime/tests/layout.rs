//! The source layout of this crate: the file tree is the module tree (no `#[path]`),
//! nothing inside the crate imports through the re-exports of `lib.rs`, and no two
//! files import each other, directly or through others.
//!
//! The files are read as text: every `use` item and every path in code that starts with
//! `crate::`, `$crate::`, `super::` or `self::` (or with a child module of the current
//! one) is an edge from the file it is written in to the file that defines the module it
//! names. A module declaring its children (`mod x;`) is not an edge; a `pub use` of a
//! child's item is. Comments (doc links included) and string literals are not read.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

#[test]
fn no_path_attributes() {
    let krate = Crate::read();
    let found: Vec<String> = krate
        .files
        .iter()
        .flat_map(|f| {
            f.path_attrs
                .iter()
                .map(move |line| format!("{}:{line}", f.name))
        })
        .collect();
    assert!(
        found.is_empty(),
        "`#[path]` makes the file tree differ from the module tree; name the file after \
         its module instead:\n  {}",
        found.join("\n  ")
    );
}

#[test]
fn no_imports_through_lib_rs() {
    let krate = Crate::read();
    let found: Vec<String> = krate
        .edges()
        .into_iter()
        .filter(|e| e.to == krate.root && e.from != krate.root && e.first.is_some())
        .map(|e| {
            format!(
                "{}:{}: `{}`: `{}` is not a module of the crate root (a re-export of lib.rs); \
                 import the item from the module that defines it",
                krate.files[e.from].name,
                e.line,
                e.text,
                e.first.as_deref().unwrap_or_default()
            )
        })
        .collect();
    assert!(
        found.is_empty(),
        "imports through lib.rs:\n  {}",
        found.join("\n  ")
    );
}

#[test]
fn no_import_cycles() {
    let krate = Crate::read();
    let edges = krate.edges();
    let mut graph: BTreeMap<usize, BTreeMap<usize, &Edge>> = BTreeMap::new();
    for e in &edges {
        if e.from != e.to {
            graph.entry(e.from).or_default().entry(e.to).or_insert(e);
        }
    }
    let cycles = cycles(krate.files.len(), &graph);
    let mut report = String::new();
    for cycle in &cycles {
        let _ = writeln!(report, "  cycle of {} files:", cycle.len());
        for (i, &from) in cycle.iter().enumerate() {
            let to = cycle[(i + 1) % cycle.len()];
            let e = graph[&from][&to];
            let _ = writeln!(
                report,
                "    {} → {}   ({}:{}: `{}`)",
                krate.files[from].name,
                krate.files[to].name,
                krate.files[from].name,
                e.line,
                e.text
            );
        }
    }
    assert!(
        cycles.is_empty(),
        "files that import each other (move what both need into a file that imports \
         neither):\n{report}"
    );
}

/// The crate's source files and its module tree.
struct Crate {
    files: Vec<File>,
    /// Index of `lib.rs`.
    root: usize,
    /// Module path → the file that defines it.
    modules: BTreeMap<Vec<String>, usize>,
}

struct File {
    /// Path under `src/`.
    name: String,
    /// The module the file defines.
    module: Vec<String>,
    tokens: Vec<Token>,
    /// Lines of `#[path = …]` attributes.
    path_attrs: Vec<usize>,
}

/// An import of one file by another.
struct Edge {
    from: usize,
    to: usize,
    line: usize,
    /// The path as written.
    text: String,
    /// The first segment after `crate::`, for paths from the crate root.
    first: Option<String>,
}

impl Crate {
    fn read() -> Crate {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut paths = Vec::new();
        walk(&src, &mut paths);
        paths.sort();
        let mut files: Vec<File> = paths
            .iter()
            .map(|p| {
                let name = p
                    .strip_prefix(&src)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/");
                let text = std::fs::read_to_string(p).unwrap();
                let tokens = tokenize(&text);
                let path_attrs = path_attrs(&tokens);
                File {
                    module: module_of(&name),
                    name,
                    tokens,
                    path_attrs,
                }
            })
            .collect();
        // a `#[path = "x.rs"] mod m;` gives the file `x.rs` the module `m`
        for i in 0..files.len() {
            let dir = match files[i].name.rsplit_once('/') {
                Some((d, _)) => format!("{d}/"),
                None => String::new(),
            };
            let module = files[i].module.clone();
            for (target, name) in path_mods(&files[i].tokens) {
                let target = format!("{dir}{target}");
                if let Some(f) = files.iter_mut().find(|f| f.name == target) {
                    f.module = module.iter().cloned().chain([name]).collect();
                }
            }
        }
        let root = files
            .iter()
            .position(|f| f.name == "lib.rs")
            .expect("src/lib.rs");
        let modules = files
            .iter()
            .enumerate()
            .map(|(i, f)| (f.module.clone(), i))
            .collect();
        Crate {
            files,
            root,
            modules,
        }
    }

    /// The file defining the module of `path` (the longest prefix that is a file's
    /// module).
    fn file_of(&self, path: &[String]) -> usize {
        (0..=path.len())
            .rev()
            .find_map(|n| self.modules.get(&path[..n]).copied())
            .unwrap_or(self.root)
    }

    fn is_module(&self, path: &[String]) -> bool {
        self.modules.contains_key(path)
    }

    fn edges(&self) -> Vec<Edge> {
        let mut out = Vec::new();
        for (i, f) in self.files.iter().enumerate() {
            for p in paths_of(f, self) {
                let Some(abs) = self.resolve(&f.module, &p.inline, &p.segments) else {
                    continue;
                };
                let to = self.file_of(&abs);
                out.push(Edge {
                    from: i,
                    to,
                    line: p.line,
                    text: p.segments.join("::").trim_end_matches("::self").to_owned(),
                    first: abs.first().cloned(),
                });
            }
        }
        out
    }

    /// The absolute module path a path names, or `None` for a path outside the crate.
    fn resolve(
        &self,
        module: &[String],
        inline: &[String],
        segs: &[String],
    ) -> Option<Vec<String>> {
        let here: Vec<String> = module.iter().chain(inline).cloned().collect();
        let (mut base, mut rest) = match segs[0].as_str() {
            "crate" | "$crate" => (Vec::new(), &segs[1..]),
            "self" => (here, &segs[1..]),
            "super" => (here, segs),
            first => {
                let mut child = here.clone();
                child.push(first.to_owned());
                if !self.is_module(&child) {
                    return None;
                }
                (here, segs)
            }
        };
        while let Some(s) = rest.first() {
            if s != "super" {
                break;
            }
            base.pop();
            rest = &rest[1..];
        }
        base.extend(rest.iter().filter(|s| *s != "self" && *s != "*").cloned());
        Some(base)
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            walk(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module a file defines when no `#[path]` says otherwise.
fn module_of(name: &str) -> Vec<String> {
    let stem = name.strip_suffix(".rs").unwrap();
    let mut parts: Vec<String> = stem.split('/').map(str::to_owned).collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    /// `::`
    Path,
    Punct(char),
}

#[derive(Clone, Debug)]
struct Token {
    tok: Tok,
    line: usize,
}

/// Identifiers, `::`, punctuation and string literals; comments, char literals,
/// lifetimes and numbers are dropped.
fn tokenize(text: &str) -> Vec<Token> {
    let c: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let (mut i, mut line) = (0, 1);
    let ident_start = |ch: char| ch.is_alphabetic() || ch == '_';
    let ident_char = |ch: char| ch.is_alphanumeric() || ch == '_';
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
            let start = line;
            let (s, end) = string(&c, i + 1, 0, &mut line);
            out.push(Token {
                tok: Tok::Str(s),
                line: start,
            });
            i = end;
        } else if ch == '\'' {
            // a char literal, or a lifetime
            if next == '\\' {
                i += 2;
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
        } else if ch == '$' && ident_start(next) || ident_start(ch) {
            let start = i;
            i += 1;
            while i < c.len() && ident_char(c[i]) {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            let at = c.get(i).copied().unwrap_or('\0');
            match (word.as_str(), at) {
                ("r" | "br" | "cr", '"' | '#') => {
                    let mut hashes = 0;
                    while c.get(i + hashes) == Some(&'#') {
                        hashes += 1;
                    }
                    if c.get(i + hashes) == Some(&'"') {
                        let start = line;
                        let (s, end) = string(&c, i + hashes + 1, hashes, &mut line);
                        out.push(Token {
                            tok: Tok::Str(s),
                            line: start,
                        });
                        i = end;
                    } else {
                        // a raw identifier: `r#type`
                        let s = i + hashes;
                        i = s;
                        while i < c.len() && ident_char(c[i]) {
                            i += 1;
                        }
                        out.push(Token {
                            tok: Tok::Ident(c[s..i].iter().collect()),
                            line,
                        });
                    }
                }
                ("b" | "c", '"') => {
                    let start = line;
                    let (s, end) = string(&c, i + 1, 0, &mut line);
                    out.push(Token {
                        tok: Tok::Str(s),
                        line: start,
                    });
                    i = end;
                }
                ("b", '\'') => {
                    i += 1;
                    while i < c.len() && c[i] != '\'' {
                        i += if c[i] == '\\' { 2 } else { 1 };
                    }
                    i += 1;
                }
                _ => out.push(Token {
                    tok: Tok::Ident(word),
                    line,
                }),
            }
        } else if ch.is_ascii_digit() {
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
        } else if ch == ':' && next == ':' {
            out.push(Token {
                tok: Tok::Path,
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

/// A string literal's text from `i` (after the opening quote) and the index after it;
/// `hashes` for a raw string.
fn string(c: &[char], mut i: usize, hashes: usize, line: &mut usize) -> (String, usize) {
    let mut s = String::new();
    while i < c.len() {
        if c[i] == '\\' && hashes == 0 {
            s.push(c[i]);
            s.extend(c.get(i + 1));
            i += 2;
            continue;
        }
        if c[i] == '"' && (0..hashes).all(|h| c.get(i + 1 + h) == Some(&'#')) {
            return (s, i + 1 + hashes);
        }
        if c[i] == '\n' {
            *line += 1;
        }
        s.push(c[i]);
        i += 1;
    }
    (s, i)
}

fn ident(t: Option<&Token>) -> Option<&str> {
    match t.map(|t| &t.tok) {
        Some(Tok::Ident(s)) => Some(s),
        _ => None,
    }
}

fn punct(t: Option<&Token>, p: char) -> bool {
    matches!(t.map(|t| &t.tok), Some(Tok::Punct(c)) if *c == p)
}

/// Lines of `#[path = "…"]`.
fn path_attrs(tokens: &[Token]) -> Vec<usize> {
    path_attr_at(tokens).map(|(i, _)| tokens[i].line).collect()
}

/// `(index of '#', file)` of each `#[path = "file"]`.
fn path_attr_at(tokens: &[Token]) -> impl Iterator<Item = (usize, String)> + '_ {
    (0..tokens.len()).filter_map(move |i| {
        let t = |k: usize| tokens.get(i + k);
        let is =
            punct(t(0), '#') && punct(t(1), '[') && ident(t(2)) == Some("path") && punct(t(3), '=');
        match (is, t(4).map(|t| &t.tok)) {
            (true, Some(Tok::Str(file))) => Some((i, file.clone())),
            _ => None,
        }
    })
}

/// `(file, module name)` of each `#[path = "file"] mod name;`.
fn path_mods(tokens: &[Token]) -> Vec<(String, String)> {
    path_attr_at(tokens)
        .filter_map(|(i, file)| {
            // skip to the `mod` after the attribute (other attributes may come between)
            let m = (i..tokens.len().min(i + 40)).find(|&k| ident(tokens.get(k)) == Some("mod"))?;
            Some((file, ident(tokens.get(m + 1))?.to_owned()))
        })
        .collect()
}

/// A path written in a file.
struct Written {
    segments: Vec<String>,
    /// The inline modules (`mod tests { … }`) it is written in.
    inline: Vec<String>,
    line: usize,
}

/// Every path of `use` items, and every path in code that may name a module of the
/// crate.
fn paths_of(f: &File, krate: &Crate) -> Vec<Written> {
    let t = &f.tokens;
    let mut out = Vec::new();
    // one entry per open `{`: the inline module it opens, if any
    let mut braces: Vec<Option<String>> = Vec::new();
    let inline = |b: &[Option<String>]| b.iter().flatten().cloned().collect::<Vec<_>>();
    let mut i = 0;
    while i < t.len() {
        match &t[i].tok {
            Tok::Punct('{') => {
                let name = (i >= 2 && ident(t.get(i - 2)) == Some("mod"))
                    .then(|| ident(t.get(i - 1)).map(str::to_owned))
                    .flatten();
                braces.push(name);
                i += 1;
            }
            Tok::Punct('}') => {
                braces.pop();
                i += 1;
            }
            Tok::Ident(w) if w == "use" && is_use_item(t, i) => {
                let end = (i..t.len())
                    .find(|&k| punct(t.get(k), ';'))
                    .unwrap_or(t.len());
                let mut trees = Vec::new();
                use_tree(&t[i + 1..end], &mut Vec::new(), &mut trees);
                for segments in trees {
                    if !segments.is_empty() {
                        out.push(Written {
                            segments,
                            inline: inline(&braces),
                            line: t[i].line,
                        });
                    }
                }
                i = end + 1;
            }
            Tok::Ident(w)
                if t.get(i + 1).map(|t| &t.tok) == Some(&Tok::Path)
                    && !matches!(t.get(i.wrapping_sub(1)).map(|t| &t.tok), Some(Tok::Path)) =>
            {
                let anchored = matches!(w.as_str(), "crate" | "$crate" | "super" | "self");
                let here: Vec<String> = f
                    .module
                    .iter()
                    .cloned()
                    .chain(inline(&braces))
                    .chain([w.clone()])
                    .collect();
                if anchored || krate.is_module(&here) {
                    let mut segments = vec![w.clone()];
                    let mut k = i + 1;
                    while t.get(k).map(|t| &t.tok) == Some(&Tok::Path) {
                        match ident(t.get(k + 1)) {
                            Some(s) => segments.push(s.to_owned()),
                            None => break,
                        }
                        k += 2;
                    }
                    out.push(Written {
                        segments,
                        inline: inline(&braces),
                        line: t[i].line,
                    });
                    i = k;
                } else {
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    out
}

/// Whether the `use` at `i` starts a `use` item (not `impl Trait + use<'a>`).
fn is_use_item(t: &[Token], i: usize) -> bool {
    match i.checked_sub(1).map(|k| &t[k].tok) {
        None => true,
        Some(Tok::Punct(c)) => matches!(c, ';' | '{' | '}' | ']' | ')'),
        Some(Tok::Ident(w)) => w == "pub",
        _ => false,
    }
}

/// Expands a use tree into its paths (`a::{b, c::d}` → `a::b`, `a::c::d`).
fn use_tree(t: &[Token], prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    let mut i = 0;
    // a leading `::` names an extern crate
    if t.first().map(|t| &t.tok) == Some(&Tok::Path) && prefix.is_empty() {
        return;
    }
    let depth = prefix.len();
    while i < t.len() {
        match &t[i].tok {
            Tok::Ident(w) if w == "as" => {
                i += 2;
            }
            Tok::Ident(w) => {
                prefix.push(w.clone());
                i += 1;
            }
            Tok::Path => i += 1,
            Tok::Punct('*') => {
                prefix.push("*".to_owned());
                i += 1;
            }
            Tok::Punct('{') => {
                // the matching `}`, and the list's items between commas
                let mut level = 0;
                let mut start = i + 1;
                let mut k = i;
                while k < t.len() {
                    match &t[k].tok {
                        Tok::Punct('{') => level += 1,
                        Tok::Punct('}') => {
                            level -= 1;
                            if level == 0 {
                                break;
                            }
                        }
                        Tok::Punct(',') if level == 1 => {
                            use_tree(&t[start..k], &mut prefix.clone(), out);
                            start = k + 1;
                        }
                        _ => {}
                    }
                    k += 1;
                }
                if start < k {
                    use_tree(&t[start..k], &mut prefix.clone(), out);
                }
                prefix.truncate(depth);
                return;
            }
            _ => i += 1,
        }
    }
    if prefix.len() > depth {
        out.push(prefix.clone());
    }
    prefix.truncate(depth);
}

/// The cycles of the graph: in each strongly connected component of more than one
/// file, a shortest cycle through each of its files.
fn cycles(n: usize, graph: &BTreeMap<usize, BTreeMap<usize, &Edge>>) -> Vec<Vec<usize>> {
    let succ = |v: usize| graph.get(&v).into_iter().flat_map(|m| m.keys().copied());
    // Tarjan's algorithm
    struct State {
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        on: Vec<bool>,
        stack: Vec<usize>,
        next: usize,
        sccs: Vec<Vec<usize>>,
    }
    fn visit(v: usize, s: &mut State, succ: &dyn Fn(usize) -> Vec<usize>) {
        s.index[v] = Some(s.next);
        s.low[v] = s.next;
        s.next += 1;
        s.stack.push(v);
        s.on[v] = true;
        for w in succ(v) {
            match s.index[w] {
                None => {
                    visit(w, s, succ);
                    s.low[v] = s.low[v].min(s.low[w]);
                }
                Some(iw) if s.on[w] => s.low[v] = s.low[v].min(iw),
                _ => {}
            }
        }
        if Some(s.low[v]) == s.index[v] {
            let mut scc = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on[w] = false;
                scc.push(w);
                if w == v {
                    break;
                }
            }
            if scc.len() > 1 {
                s.sccs.push(scc);
            }
        }
    }
    let succ_vec = |v: usize| succ(v).collect::<Vec<_>>();
    let mut s = State {
        index: vec![None; n],
        low: vec![0; n],
        on: vec![false; n],
        stack: Vec::new(),
        next: 0,
        sccs: Vec::new(),
    };
    for v in 0..n {
        if s.index[v].is_none() {
            visit(v, &mut s, &succ_vec);
        }
    }
    // per component, a shortest cycle through each of its files (breadth first
    // inside it), each cycle once
    let mut found = BTreeSet::new();
    for scc in s.sccs {
        let inside: BTreeSet<usize> = scc.iter().copied().collect();
        for &start in &inside {
            let mut came: BTreeMap<usize, usize> = BTreeMap::new();
            let mut queue = std::collections::VecDeque::from([start]);
            'search: while let Some(v) = queue.pop_front() {
                for w in succ(v).filter(|w| inside.contains(w)) {
                    if w == start {
                        came.insert(start, v);
                        break 'search;
                    }
                    if let std::collections::btree_map::Entry::Vacant(e) = came.entry(w) {
                        e.insert(v);
                        queue.push_back(w);
                    }
                }
            }
            let mut cycle = vec![start];
            let mut v = came[&start];
            while v != start {
                cycle.push(v);
                v = came[&v];
            }
            cycle[1..].reverse();
            // the same cycle found from another of its files starts elsewhere
            let first = (0..cycle.len()).min_by_key(|&k| cycle[k]).unwrap();
            cycle.rotate_left(first);
            found.insert(cycle);
        }
    }
    found.into_iter().collect()
}
