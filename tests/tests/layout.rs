//! Layout checks of the workspace.
//!
//! `module_graph_has_no_cycles`: in every crate of the workspace (the `members` of the root
//! Cargo.toml), the graph of internal imports between modules has no cycle. The lib crate
//! (`src/lib.rs`, all files under `src/` but `src/bin/`) and each binary (`src/bin/x.rs` or
//! `src/bin/x/main.rs`, with its modules under `src/bin/x/`) are separate graphs; a binary's
//! `calwatch_*::` paths are external. The rules:
//! - a file is a module: `src/a/b.rs` and `src/a/b/mod.rs` are `a::b`; an inline `mod x { }`
//!   is part of its file's module (but `super::`/`self::` inside it resolve from `x`);
//! - every `crate::`, `super::` and `self::` path counts, in `use` items (grouped ones too:
//!   `use crate::{a::X, b::{c, d}}`, `use super::{self, x}`) and in expressions and types;
//!   comments and string literals are stripped first, attributes are not read;
//! - a path resolves to the deepest module of the path that has a file;
//! - test code is excluded: `#[cfg(test)] mod x { ... }` blocks, and files declared with
//!   `#[cfg(test)] mod x;` and everything below them (tests may reach anywhere); other
//!   `#[cfg(test)]` items (a `use`, a `fn`) still count;
//! - facade rule: a module naming its own descendants (`checks` -> `checks::seal`) re-exports,
//!   it does not import: no edge. A child naming an ancestor (`super::`) is an edge;
//! - a strongly connected component (Tarjan) of more than one module is a cycle; the failure
//!   lists each with every edge in it and one `file:line` where the import occurs.
//!
//! `gateway_dependencies_follow_features`: `cargo tree -p calwatch-gateway -e normal` without
//! default features has none of the agent, Modbus, serial and embedded-broker crates; with
//! them, it has the agent and rumqttd.
//!
//! Run: `cargo test -p calwatch-tests --test layout`

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type ModPath = Vec<String>;

/// A token and its line.
struct Tok(String, usize);

/// Tokens of Rust source without comments and literals: identifiers (and numbers), `::`,
/// and single punctuation characters.
fn lex(src: &str) -> Vec<Tok> {
    let c: Vec<char> = src.chars().collect();
    let mut lines = vec![1];
    for ch in &c {
        lines.push(lines[lines.len() - 1] + usize::from(*ch == '\n'));
    }
    let at = |i: usize| c.get(i).copied().unwrap_or('\0');
    // The end of a literal opened by the quote `q` at `i`; `hashes` only for raw strings.
    let skip_quoted = |mut i: usize, q: char, raw: bool, hashes: usize| {
        i += 1;
        while i < c.len() && !(c[i] == q && (0..hashes).all(|k| at(i + 1 + k) == '#')) {
            i += if c[i] == '\\' && !raw { 2 } else { 1 };
        }
        i + 1 + hashes
    };
    let (mut out, mut i) = (Vec::new(), 0);
    while i < c.len() {
        let (ch, start) = (c[i], i);
        if ch.is_whitespace() {
            i += 1;
        } else if ch == '/' && at(i + 1) == '/' {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < c.len() {
                let (open, close) = (
                    [c[i], at(i + 1)] == ['/', '*'],
                    [c[i], at(i + 1)] == ['*', '/'],
                );
                depth += i32::from(open) - i32::from(close);
                i += if open || close { 2 } else { 1 };
                if depth == 0 {
                    break;
                }
            }
        } else if ch == '"' {
            i = skip_quoted(i, '"', false, 0);
        } else if ch == '\'' && (at(i + 1) == '\\' || (at(i + 2) == '\'' && at(i + 1) != '\'')) {
            i = skip_quoted(i, '\'', false, 0); // a char; else a lifetime, lexed as a name
        } else if ch.is_alphanumeric() || ch == '_' {
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            let raw = matches!(word.as_str(), "r" | "br" | "cr");
            if raw && (at(i) == '"' || (at(i) == '#' && matches!(at(i + 1), '#' | '"'))) {
                let hashes = (i..).take_while(|&k| at(k) == '#').count();
                i = skip_quoted(i + hashes, '"', true, hashes);
            } else if matches!(word.as_str(), "b" | "c") && matches!(at(i), '"' | '\'') {
                i = skip_quoted(i, at(i), false, 0);
            } else if word == "r" && at(i) == '#' {
                i += 1; // raw identifier: the identifier follows
            } else {
                out.push(Tok(word, lines[start]));
            }
        } else {
            let n = 1 + usize::from(ch == ':' && at(i + 1) == ':');
            out.push(Tok(c[i..i + n].iter().collect(), lines[start]));
            i += n;
        }
    }
    out
}

fn is_ident(s: &str) -> bool {
    s.starts_with(|c: char| c.is_alphabetic() || c == '_')
}

/// Parses a path tree (`a::b`, `a::{b, c::d}`, `a::*`) at `i`, appending the full paths.
fn path_tree(t: &[Tok], mut i: usize, mut p: ModPath, out: &mut Vec<ModPath>) -> usize {
    let s = |i: usize| t.get(i).map_or("", |t| t.0.as_str());
    loop {
        match s(i) {
            "{" => {
                i += 1;
                while !matches!(s(i), "}" | "") {
                    i = path_tree(t, i, p.clone(), out);
                    while !matches!(s(i), "," | "}" | "") {
                        i += 1; // `as name`
                    }
                    i += usize::from(s(i) == ",");
                }
                return i + 1;
            }
            "*" => {
                out.push(p);
                return i + 1;
            }
            w if is_ident(w) => {
                p.push(w.to_string());
                i += 1;
                if s(i) != "::" {
                    out.push(p);
                    return i;
                }
                i += 1;
            }
            _ => {
                out.push(p);
                return i;
            }
        }
    }
}

/// Absolute module path of `path` (starting with `crate`, `super` or `self`) seen from `cur`.
fn absolute(cur: &[String], path: &[String]) -> ModPath {
    let mut abs = cur.to_vec();
    for seg in path {
        match seg.as_str() {
            "crate" => abs.clear(),
            "self" => {}
            "super" => {
                abs.pop();
            }
            _ => abs.push(seg.clone()),
        }
    }
    abs
}

/// Index of the bracket closing the one at `open` (`[` or `{`).
fn closing(t: &[Tok], open: usize) -> usize {
    let (o, c, mut depth) = (&t[open].0, if t[open].0 == "[" { "]" } else { "}" }, 0);
    let end = t[open..].iter().position(|tok| {
        depth += i32::from(tok.0 == *o) - i32::from(tok.0 == c);
        depth == 0
    });
    end.map_or(t.len(), |k| open + k)
}

/// The internal paths named by one file whose module is `module` (absolute, with their lines)
/// outside `#[cfg(test)]` modules, and the modules it declares with `#[cfg(test)] mod x;`.
fn scan(src: &str, module: &[String]) -> (Vec<(ModPath, usize)>, Vec<ModPath>) {
    let t = lex(src);
    let s = |i: usize| t.get(i).map_or("", |t| t.0.as_str());
    let (mut refs, mut test_children) = (Vec::new(), Vec::new());
    // Open braces, with the name of those opening an inline `mod`.
    let (mut i, mut test_attr, mut braces) = (0, false, Vec::<Option<String>>::new());
    let cur = |b: &[Option<String>]| module.iter().chain(b.iter().flatten()).cloned().collect();
    while i < t.len() {
        test_attr &= !matches!(s(i), "{" | "}" | ";"); // the attribute was not on a `mod`
        match s(i) {
            "#" => {
                let open = if s(i + 1) == "!" { i + 2 } else { i + 1 };
                if s(open) == "[" {
                    let j = closing(&t, open);
                    let words: Vec<&str> = (open + 1..j).map(s).collect();
                    test_attr |= words == ["cfg", "(", "test", ")"];
                    i = j;
                }
            }
            "mod" if is_ident(s(i + 1)) && matches!(s(i + 2), "{" | ";") => {
                let name = s(i + 1).to_string();
                i += 2;
                if s(i) == ";" {
                    if test_attr {
                        let mut child: ModPath = cur(&braces);
                        child.push(name);
                        test_children.push(child);
                    }
                } else if test_attr {
                    i = closing(&t, i);
                } else {
                    braces.push(Some(name));
                }
                test_attr = false;
            }
            "{" => braces.push(None),
            "}" => drop(braces.pop()),
            "crate" | "super" | "self" if s(i + 1) == "::" => {
                // `pub(in crate::x)` is a visibility, not a use.
                let vis = i >= 3 && s(i - 1) == "in" && s(i - 2) == "(" && s(i - 3) == "pub";
                let line = t[i].1;
                let mut paths = Vec::new();
                let next = path_tree(&t, i, Vec::new(), &mut paths);
                if !vis {
                    let here: ModPath = cur(&braces);
                    refs.extend(paths.iter().map(|p| (absolute(&here, p), line)));
                }
                i = next;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    (refs, test_children)
}

/// Module path of a file from its path relative to the crate root's directory.
fn mod_path(rel: &str) -> ModPath {
    let rel = rel.strip_suffix(".rs").unwrap_or(rel);
    let mut p: ModPath = rel.split('/').map(String::from).collect();
    if p == ["lib"] || p == ["main"] || p.last().is_some_and(|l| l == "mod") {
        p.pop();
    }
    p
}

fn show(m: &[String]) -> String {
    let root = m.is_empty().then(|| "crate".to_string());
    root.unwrap_or_else(|| m.join("::"))
}

/// One crate root: its label and its files (shown path, module path, source).
struct Unit(String, Vec<(String, ModPath, String)>);

/// The cycles of one crate root, each described with its edges and where they occur.
fn cycles(unit: &Unit) -> Vec<String> {
    let scans: Vec<_> = unit.1.iter().map(|(_, m, src)| scan(src, m)).collect();
    let tests: Vec<&ModPath> = scans.iter().flat_map(|s| &s.1).collect();
    let in_test = |m: &ModPath| tests.iter().any(|t| m.starts_with(t));
    let modules: BTreeSet<ModPath> = unit.1.iter().map(|f| f.1.clone()).collect();
    let modules: BTreeSet<ModPath> = modules.into_iter().filter(|m| !in_test(m)).collect();
    let mut edges: BTreeMap<(ModPath, ModPath), String> = BTreeMap::new();
    for ((file, from, _), scan) in unit.1.iter().zip(&scans) {
        if in_test(from) {
            continue;
        }
        for (abs, line) in &scan.0 {
            let deepest = (0..=abs.len()).rev().map(|k| &abs[..k]);
            let Some(to) = deepest.into_iter().find(|p| modules.contains(*p)) else {
                continue;
            };
            if !to.starts_with(from) {
                let at = format!("{file}:{line}");
                edges.entry((from.clone(), to.to_vec())).or_insert(at);
            }
        }
    }
    let nodes: Vec<&ModPath> = modules.iter().collect();
    let index = |m: &ModPath| nodes.iter().position(|n| *n == m).unwrap_or(0);
    let mut adj = vec![Vec::new(); nodes.len()];
    for (from, to) in edges.keys() {
        adj[index(from)].push(index(to));
    }
    let mut out = Vec::new();
    for scc in tarjan(&adj).into_iter().filter(|c| c.len() > 1) {
        let mut members: Vec<&ModPath> = scc.iter().map(|&k| nodes[k]).collect();
        members.sort();
        let names: Vec<String> = members.iter().map(|m| show(m)).collect();
        let mut text = format!("{}: cycle of {}", unit.0, names.join(", "));
        for ((from, to), at) in &edges {
            if members.contains(&from) && members.contains(&to) {
                text += &format!("\n    {} -> {}  ({at})", show(from), show(to));
            }
        }
        out.push(text);
    }
    out
}

/// Strongly connected components of a directed graph (Tarjan).
fn tarjan(adj: &[Vec<usize>]) -> Vec<Vec<usize>> {
    type Index = Vec<Option<usize>>;
    fn visit(
        adj: &[Vec<usize>],
        v: usize,
        index: &mut Index,
        low: &mut [usize],
        stack: &mut Vec<usize>,
        out: &mut Vec<Vec<usize>>,
    ) {
        let n = index.iter().flatten().count();
        (index[v], low[v]) = (Some(n), n);
        stack.push(v);
        for &w in &adj[v] {
            if index[w].is_none() {
                visit(adj, w, index, low, stack, out);
                low[v] = low[v].min(low[w]);
            } else if stack.contains(&w) {
                low[v] = low[v].min(index[w].unwrap_or(n));
            }
        }
        if low[v] == n {
            let at = stack.iter().rposition(|&w| w == v).unwrap_or(0);
            out.push(stack.split_off(at));
        }
    }
    let n = adj.len();
    let (mut index, mut low, mut stack, mut out) = (vec![None; n], vec![0; n], vec![], vec![]);
    for v in 0..n {
        if index[v].is_none() {
            visit(adj, v, &mut index, &mut low, &mut stack, &mut out);
        }
    }
    out
}

/// `.rs` files under `dir`, recursively, sorted; `skip` is left out.
fn rust_files(dir: &Path, skip: Option<&Path>, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for p in paths {
        if Some(p.as_path()) == skip {
        } else if p.is_dir() {
            rust_files(&p, skip, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The lib and bin roots of a crate directory (`member`, relative to the workspace root).
fn units(root: &Path, member: &str) -> Vec<Unit> {
    let (src, mut units) = (root.join(member).join("src"), Vec::new());
    let bin = src.join("bin");
    let read = |p: &Path, module: ModPath| {
        let shown = p.strip_prefix(root).unwrap_or(p).display().to_string();
        let text = std::fs::read_to_string(p).expect("read source file");
        (shown, module, text)
    };
    // The files under `dir` (but `skip`), as modules of a root at `dir/lib.rs` or `dir/main.rs`.
    let load = |dir: &Path, skip: Option<&Path>, files: &mut Vec<(String, ModPath, String)>| {
        let mut paths = Vec::new();
        rust_files(dir, skip, &mut paths);
        for p in paths {
            let rel = p.strip_prefix(dir).expect("under dir").to_string_lossy();
            files.push(read(&p, mod_path(&rel.replace('\\', "/"))));
        }
    };
    if src.join("lib.rs").exists() || src.join("main.rs").exists() {
        let mut files = Vec::new();
        load(&src, Some(&bin), &mut files);
        units.push(Unit(format!("{member} (lib)"), files));
    }
    let names = std::fs::read_dir(&bin)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().into_string().ok());
    let names: BTreeSet<String> = names
        .map(|n| n.trim_end_matches(".rs").to_string())
        .collect();
    for name in names {
        // `bin/<name>.rs` or `bin/<name>/main.rs`, with its modules under `bin/<name>/`.
        let single = bin.join(format!("{name}.rs"));
        let root = single.exists().then(|| read(&single, Vec::new()));
        let mut files: Vec<_> = root.into_iter().collect();
        load(&bin.join(&name), None, &mut files);
        if files.iter().any(|f| f.1.is_empty()) {
            units.push(Unit(format!("{member} (bin {name})"), files));
        }
    }
    units
}

/// The `members` of the workspace's Cargo.toml.
fn members(root: &Path) -> Vec<String> {
    let toml = std::fs::read_to_string(root.join("Cargo.toml")).expect("read Cargo.toml");
    let start = toml.find("members").expect("workspace members");
    let list = &toml[start..toml[start..].find(']').map_or(toml.len(), |e| start + e)];
    let names = list.split('"').skip(1).step_by(2);
    names.map(String::from).collect()
}

#[test]
fn module_graph_has_no_cycles() {
    let root = workspace();
    let members = members(&root);
    for expected in ["protocol", "spool", "agent", "gateway", "tests"] {
        assert!(
            members.iter().any(|m| m == expected),
            "member {expected} in {members:?}"
        );
    }
    let mut found = Vec::new();
    for member in &members {
        let units = units(&root, member);
        assert!(!units.is_empty(), "no lib or bin root in {member}/src");
        found.extend(units.iter().flat_map(cycles));
    }
    assert!(
        found.is_empty(),
        "{} import cycle(s) between modules (break each by moving the shared items down, \
         to a module both sides can name):\n{}",
        found.len(),
        found.join("\n")
    );
}

fn cargo_tree(features: &[&str]) -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args("tree -p calwatch-gateway -e normal --prefix none".split(' '))
        .args(features)
        .current_dir(workspace())
        .output()
        .expect("run cargo tree");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "cargo tree {features:?}:\n{stderr}");
    let crates = stdout.lines().filter_map(|l| l.split_whitespace().next());
    crates.map(String::from).collect()
}

#[test]
fn gateway_dependencies_follow_features() {
    let mut problems = Vec::new();
    let lean = cargo_tree(&["--no-default-features"]);
    for name in ["calwatch-agent", "tokio-modbus", "tokio-serial", "rumqttd"] {
        if lean.iter().any(|c| c == name) {
            problems.push(format!("{name} is a dependency without default features"));
        }
    }
    let full = cargo_tree(&[]);
    for name in ["calwatch-agent", "rumqttd"] {
        if !full.iter().any(|c| c == name) {
            problems.push(format!("{name} is not a dependency with default features"));
        }
    }
    assert!(
        problems.is_empty(),
        "calwatch-gateway:\n{}",
        problems.join("\n")
    );
}

#[cfg(test)]
mod checker {
    use super::*;

    fn unit(files: &[(&str, &str)]) -> Unit {
        let files = files
            .iter()
            .map(|&(p, s)| (p.into(), mod_path(p), s.into()));
        Unit("demo (lib)".into(), files.collect())
    }

    fn names(m: &[&str]) -> ModPath {
        m.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn grouped_uses_and_expressions() {
        let src = "use crate::{a::X, b::{c, d as e}};\nuse super::{self, x::*};\n\
                   fn f() -> crate::t::T { crate::now_ms(); self::g::<u8>() }";
        let got: Vec<String> = scan(src, &names(&["p", "m"]))
            .0
            .iter()
            .map(|r| show(&r.0))
            .collect();
        assert_eq!(
            got,
            ["a::X", "b::c", "b::d", "p", "p::x", "t::T", "now_ms", "p::m::g"]
        );
        let vis = scan(
            "pub(crate) fn f() {} pub(in crate::a) fn g() {}",
            &names(&["m"]),
        );
        assert!(vis.0.is_empty(), "{:?}", vis.0);
    }

    #[test]
    fn comments_strings_and_tests_are_stripped() {
        let src = r####"
            // use crate::a;
            /// crate::b
            /* crate::c /* nested crate::d */ crate::e */
            const S: &str = "crate::f \" crate::g";
            const R: &str = r#"crate::h "quoted" "#;
            const C: char = '"'; fn l<'a>(x: &'a u8) { let _ = b"crate::i"; }
            #[cfg(test)]
            #[allow(unused)]
            mod tests { use crate::j; mod deep { use crate::k; } }
            #[cfg(test)]
            mod tests2;
            pub mod inline { use super::Here; fn f() { crate::z::Z; } }
        "####;
        let (refs, test_children) = scan(src, &names(&["m"]));
        let got: Vec<(String, usize)> = refs.iter().map(|(p, l)| (show(p), *l)).collect();
        assert_eq!(got, [("m::Here".to_string(), 13), ("z::Z".to_string(), 13)]);
        assert_eq!(test_children, [names(&["m", "tests2"])]);
    }

    #[test]
    fn finds_a_known_cycle_with_its_edges() {
        let found = cycles(&unit(&[
            ("lib.rs", "mod a; mod b; mod c; pub use a::A;"),
            ("a.rs", "use crate::b::B;\n"),
            ("b/mod.rs", "mod inner;\nfn f() { crate::c::C::new(); }"),
            ("b/inner.rs", "use super::super::a::A; // back to a\n"),
            ("c.rs", "\n\nuse crate::b::inner;"),
        ]));
        let want = "demo (lib): cycle of a, b, b::inner, c\n    a -> b  (a.rs:1)\n    \
                    b -> c  (b/mod.rs:2)\n    b::inner -> a  (b/inner.rs:1)\n    \
                    c -> b::inner  (c.rs:3)";
        assert_eq!(found, [want]);
        let two = unit(&[("a.rs", "use crate::b;"), ("b.rs", "use crate::a;")]);
        assert_eq!(cycles(&two).len(), 1);
        assert_eq!(tarjan(&[vec![1], vec![2], vec![0], vec![3]]).len(), 2);
    }

    #[test]
    fn facade_and_test_children_make_no_cycle() {
        for (attr, want) in [("#[cfg(test)]", 0), ("", 1)] {
            let seal = format!("use super::Shared; use crate::now; {attr} mod tests;");
            let found = cycles(&unit(&[
                ("lib.rs", "pub mod checks; pub mod registry; fn now() {}"),
                (
                    "checks/mod.rs",
                    "pub mod seal; pub use self::seal::Seal; use crate::checks::seal;",
                ),
                ("checks/seal.rs", &seal),
                ("checks/seal/tests.rs", "use crate::registry; mod more;"),
                ("checks/seal/tests/more.rs", "use crate::registry;"),
                (
                    "registry.rs",
                    "use crate::checks::seal::tests::more::Fixture;",
                ),
            ]));
            assert_eq!(found.len(), want, "{attr}: {found:?}");
        }
    }
}
