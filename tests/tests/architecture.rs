//! Architecture: no two source files of the workspace import each other.
//!
//! A file imports another when one of its paths (a `use` tree, or a qualified path in code:
//! `crate::…`, `super::…`, `self::…`, or `child::…` for a module it declares) names an item of
//! a module that lives in the other file. A child module using its parent's items counts like
//! any other import (a `mod` declaration alone does not): a parent that also uses the child's
//! items forms a pair, and the shared items belong in a module of their own. Each crate's
//! module tree is followed from its roots (`src/lib.rs`, `src/main.rs`, `src/bin/*`) through
//! its `mod` declarations; comments and literals are skipped. Needs no root and no build.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

#[test]
fn no_two_files_import_each_other() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace")
        .to_path_buf();
    let pairs = mutual_imports(&root);
    let pairs: Vec<_> = pairs.iter().collect();
    assert!(
        pairs.is_empty(),
        "files that import each other (move what they share into a module of its own):\n{}",
        list(&pairs)
    );
}

#[test]
fn the_check_sees_the_shapes_it_forbids() {
    let dir = tempfile::tempdir().expect("temp dir");
    let src = dir.path().join("a/src");
    fs::create_dir_all(src.join("p")).expect("mkdir");
    let write = |p: &str, s: &str| fs::write(src.join(p), s).expect("write");
    fs::write(dir.path().join("a/Cargo.toml"), "[package]\n").expect("write");
    write(
        "lib.rs",
        "pub mod p;\npub mod q;\nmod r { use super::q::Q; }\n",
    );
    // A parent using its child, the child using its parent.
    write("p.rs", "mod c;\npub struct P;\nfn f() { c::g(); }\n");
    write(
        "p/c.rs",
        "// use crate::q::Q;\npub fn g() { let _ = super::P; }\n",
    );
    // Mutual imports through a `use` tree and a qualified path; strings are not paths.
    write(
        "q.rs",
        "use crate::{p::{self, P}};\npub struct Q;\nconst S: &str = \"crate::r::X\";\n",
    );
    let pairs = mutual_imports(dir.path());
    let expected: BTreeSet<(String, String)> = [("a/src/p.rs", "a/src/p/c.rs")]
        .iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect();
    assert_eq!(pairs, expected);
    // Fixed by moving what the child used out of the parent: then a `use` tree and a
    // qualified path form the pair.
    write("p/c.rs", "pub fn g() { let _ = crate::q::Q; }\n");
    write(
        "p.rs",
        "mod c;\npub struct P;\nfn f() -> crate::q::Q { c::g(); crate::q::Q }\n",
    );
    let pairs = mutual_imports(dir.path());
    let expected: BTreeSet<(String, String)> = [("a/src/p.rs", "a/src/q.rs")]
        .iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect();
    assert_eq!(pairs, expected);
}

fn list(pairs: &[&(String, String)]) -> String {
    pairs
        .iter()
        .map(|(a, b)| format!("  {a} <-> {b}\n"))
        .collect()
}

/// Every pair of files (relative to `root`, sorted) that import each other, in every crate
/// below `root`.
fn mutual_imports(root: &Path) -> BTreeSet<(String, String)> {
    let mut pairs = BTreeSet::new();
    for krate in crate_dirs(root) {
        for crate_root in crate_roots(&krate.join("src")) {
            let graph = import_graph(&crate_root);
            for (a, targets) in &graph {
                for b in targets {
                    if graph.get(b).is_some_and(|t| t.contains(a)) {
                        let rel = |p: &PathBuf| {
                            p.strip_prefix(root)
                                .unwrap_or(p)
                                .to_string_lossy()
                                .into_owned()
                        };
                        let (a, b) = (rel(a), rel(b));
                        pairs.insert(if a < b { (a, b) } else { (b, a) });
                    }
                }
            }
        }
    }
    pairs
}

/// Directories holding a `Cargo.toml` and a `src/`, skipping build output.
fn crate_dirs(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if dir.join("Cargo.toml").is_file() && dir.join("src").is_dir() {
            out.push(dir.clone());
        }
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name();
            let name = name.to_string_lossy();
            if p.is_dir() && !name.starts_with('.') && name != "target" && name != "src" {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The crate roots under `src`: library, main binary, and each `src/bin` binary.
fn crate_roots(src: &Path) -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = ["lib.rs", "main.rs"]
        .iter()
        .map(|f| src.join(f))
        .filter(|p| p.is_file())
        .collect();
    if let Ok(entries) = fs::read_dir(src.join("bin")) {
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "rs") {
                roots.push(p);
            } else if p.join("main.rs").is_file() {
                roots.push(p.join("main.rs"));
            }
        }
    }
    roots.sort();
    roots
}

/// A lexical token; only what paths and module structure need.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Tok {
    Ident(String),
    PathSep,
    Punct(char),
}

/// Tokens of Rust source, without comments, string, char and byte literals, and lifetimes.
fn tokenize(src: &str) -> Vec<Tok> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let ident_start = |c: u8| c == b'_' || c.is_ascii_alphabetic();
    let ident_cont = |c: u8| c == b'_' || c.is_ascii_alphanumeric();
    while i < b.len() {
        let c = b[i];
        match c {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut depth = 0usize;
                while i < b.len() {
                    if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                        depth += 1;
                        i += 2;
                    } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            b'"' => i = skip_string(b, i + 1),
            b'r' | b'b' | b'c' if raw_string_start(b, i).is_some() => {
                let (hashes, body) = raw_string_start(b, i).unwrap_or((0, i + 1));
                let close: Vec<u8> = std::iter::once(b'"')
                    .chain(std::iter::repeat_n(b'#', hashes))
                    .collect();
                i = body;
                while i < b.len() && !b[i..].starts_with(&close) {
                    i += 1;
                }
                i += close.len();
            }
            b'b' | b'c' if b.get(i + 1) == Some(&b'"') => i = skip_string(b, i + 2),
            b'b' if b.get(i + 1) == Some(&b'\'') => i = skip_char(b, i + 2),
            b'\'' => {
                // A char literal closes within a few bytes; a lifetime or label does not.
                let lifetime =
                    b.get(i + 1).is_some_and(|&n| ident_start(n)) && b.get(i + 2) != Some(&b'\'');
                if lifetime {
                    i += 1;
                    while i < b.len() && ident_cont(b[i]) {
                        i += 1;
                    }
                } else {
                    i = skip_char(b, i + 1);
                }
            }
            b':' if b.get(i + 1) == Some(&b':') => {
                out.push(Tok::PathSep);
                i += 2;
            }
            _ if ident_start(c) => {
                let start = i;
                while i < b.len() && ident_cont(b[i]) {
                    i += 1;
                }
                let word = &src[start..i];
                out.push(Tok::Ident(
                    word.strip_prefix("r#").unwrap_or(word).to_owned(),
                ));
                if word == "r" && b.get(i) == Some(&b'#') {
                    // Raw identifier `r#name`: the name follows.
                    out.pop();
                    i += 1;
                }
            }
            _ if c.is_ascii_whitespace() => i += 1,
            _ => {
                out.push(Tok::Punct(c as char));
                i += 1;
            }
        }
    }
    out
}

/// Where a raw string `r"…"`, `r#"…"#`, `br…`, `cr…` starting at `i` opens: (hashes, body).
fn raw_string_start(b: &[u8], i: usize) -> Option<(usize, usize)> {
    let mut j = i;
    if b[j] == b'b' || b[j] == b'c' {
        j += 1;
    }
    if b.get(j) != Some(&b'r') {
        return None;
    }
    j += 1;
    let hashes = b[j..].iter().take_while(|&&c| c == b'#').count();
    j += hashes;
    (b.get(j) == Some(&b'"')).then_some((hashes, j + 1))
}

fn skip_string(b: &[u8], mut i: usize) -> usize {
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    i
}

fn skip_char(b: &[u8], mut i: usize) -> usize {
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'\'' => return i + 1,
            _ => i += 1,
        }
    }
    i
}

/// For one crate root: each file and the files its paths name.
fn import_graph(crate_root: &Path) -> BTreeMap<PathBuf, BTreeSet<PathBuf>> {
    // Module path → file, following `mod` declarations from the root.
    let mut modules: BTreeMap<Vec<String>, PathBuf> = BTreeMap::new();
    let mut parsed: Vec<(PathBuf, Vec<String>, Vec<Tok>)> = Vec::new();
    let dir = crate_root.parent().unwrap_or(Path::new(".")).to_path_buf();
    let mut queue = vec![(crate_root.to_path_buf(), Vec::<String>::new(), dir)];
    while let Some((file, path, child_dir)) = queue.pop() {
        let Ok(text) = fs::read_to_string(&file) else {
            continue;
        };
        let toks = tokenize(&text);
        modules.insert(path.clone(), file.clone());
        for (inline, child) in module_decls(&toks) {
            let mut dir = child_dir.clone();
            let mut child_path = path.clone();
            for m in &inline {
                dir.push(m);
                child_path.push(m.clone());
            }
            if let Some(name) = child {
                child_path.push(name.clone());
                let flat = dir.join(format!("{name}.rs"));
                let nested = dir.join(&name).join("mod.rs");
                let found = if flat.is_file() { flat } else { nested };
                queue.push((found, child_path, dir.join(&name)));
            } else {
                modules.insert(child_path, file.clone());
            }
        }
        parsed.push((file, path, toks));
    }
    let mut graph = BTreeMap::new();
    for (file, path, toks) in &parsed {
        let mut targets = BTreeSet::new();
        for target in referenced_paths(path, toks) {
            // The longest prefix of the path that names a module is where the item lives.
            let found = (0..=target.len())
                .rev()
                .find_map(|n| modules.get(&target[..n]));
            if let Some(f) = found
                && f != file
            {
                targets.insert(f.clone());
            }
        }
        graph.insert(file.clone(), targets);
    }
    graph
}

/// The `mod` items of a file: (enclosing inline modules, `Some(name)` for `mod name;`), and
/// `(inline path, None)` for each inline `mod name { … }`.
fn module_decls(toks: &[Tok]) -> Vec<(Vec<String>, Option<String>)> {
    let mut out = Vec::new();
    let mut stack: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    while i < toks.len() {
        match &toks[i] {
            Tok::Punct('{') => depth += 1,
            Tok::Punct('}') => {
                depth = depth.saturating_sub(1);
                if stack.last().is_some_and(|(_, d)| *d == depth) {
                    stack.pop();
                }
            }
            Tok::Ident(kw) if kw == "mod" && !preceded_by_path_sep(toks, i) => {
                if let (Some(Tok::Ident(name)), Some(next)) = (toks.get(i + 1), toks.get(i + 2)) {
                    let inline: Vec<String> = stack.iter().map(|(n, _)| n.clone()).collect();
                    match next {
                        Tok::Punct(';') => out.push((inline, Some(name.clone()))),
                        Tok::Punct('{') => {
                            let mut p = inline;
                            p.push(name.clone());
                            out.push((p, None));
                            stack.push((name.clone(), depth));
                            depth += 1;
                            i += 3;
                            continue;
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
        i += 1;
    }
    out
}

fn preceded_by_path_sep(toks: &[Tok], i: usize) -> bool {
    i > 0 && toks[i - 1] == Tok::PathSep
}

/// The absolute module paths (crate-relative, down to the item) that a file at `path` names.
fn referenced_paths(path: &[String], toks: &[Tok]) -> Vec<Vec<String>> {
    // Modules declared in this file, by the (inline) module they are declared in.
    let decls = module_decls(toks);
    let children = |scope: &[String]| -> BTreeSet<String> {
        decls
            .iter()
            .filter_map(|(inline, child)| match child {
                Some(name) if inline.as_slice() == scope => Some(name.clone()),
                None if inline.len() == scope.len() + 1 && inline.starts_with(scope) => {
                    inline.last().cloned()
                }
                _ => None,
            })
            .collect()
    };
    let mut out = Vec::new();
    let mut stack: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    while i < toks.len() {
        let scope: Vec<String> = stack.iter().map(|(n, _)| n.clone()).collect();
        let mut module = path.to_vec();
        module.extend(scope.iter().cloned());
        match &toks[i] {
            Tok::Punct('{') => depth += 1,
            Tok::Punct('}') => {
                depth = depth.saturating_sub(1);
                if stack.last().is_some_and(|(_, d)| *d == depth) {
                    stack.pop();
                }
            }
            Tok::Ident(kw) if kw == "mod" && !preceded_by_path_sep(toks, i) => {
                if let (Some(Tok::Ident(name)), Some(Tok::Punct('{'))) =
                    (toks.get(i + 1), toks.get(i + 2))
                {
                    stack.push((name.clone(), depth));
                    depth += 1;
                    i += 3;
                    continue;
                }
            }
            Tok::Ident(kw) if kw == "use" && !preceded_by_path_sep(toks, i) => {
                let end = toks[i..]
                    .iter()
                    .position(|t| *t == Tok::Punct(';'))
                    .map_or(toks.len(), |n| i + n);
                let kids = children(&scope);
                for p in use_tree(&toks[i + 1..end]) {
                    if let Some(abs) = absolute(&module, &kids, &p) {
                        out.push(abs);
                    }
                }
                i = end + 1;
                continue;
            }
            Tok::Ident(first)
                if !preceded_by_path_sep(toks, i) && toks.get(i + 1) == Some(&Tok::PathSep) =>
            {
                let mut p = vec![first.clone()];
                let mut j = i + 1;
                while toks.get(j) == Some(&Tok::PathSep) {
                    match toks.get(j + 1) {
                        Some(Tok::Ident(s)) => p.push(s.clone()),
                        _ => break,
                    }
                    j += 2;
                }
                let kids = children(&scope);
                if let Some(abs) = absolute(&module, &kids, &p) {
                    out.push(abs);
                }
                i = j;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// Expands a `use` tree (the tokens between `use` and `;`) into its paths; a glob or `self`
/// names the module itself.
fn use_tree(toks: &[Tok]) -> Vec<Vec<String>> {
    fn tree(toks: &[Tok], i: &mut usize, prefix: &[String], out: &mut Vec<Vec<String>>) {
        let mut path = prefix.to_vec();
        while *i < toks.len() {
            match &toks[*i] {
                Tok::PathSep => *i += 1,
                Tok::Ident(s) if s == "as" => {
                    *i += 2;
                }
                Tok::Ident(s) if s == "self" && !path.is_empty() => *i += 1,
                Tok::Ident(s) => {
                    path.push(s.clone());
                    *i += 1;
                }
                Tok::Punct('{') => {
                    *i += 1;
                    loop {
                        match toks.get(*i) {
                            None => return,
                            Some(Tok::Punct('}')) => {
                                *i += 1;
                                return;
                            }
                            Some(Tok::Punct(',')) => *i += 1,
                            Some(_) => tree(toks, i, &path, out),
                        }
                    }
                }
                Tok::Punct(',') | Tok::Punct('}') => break,
                Tok::Punct(_) => *i += 1,
            }
        }
        out.push(path);
    }
    let mut out = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        tree(toks, &mut i, &[], &mut out);
        i += 1;
    }
    out
}

/// `p` as an absolute path from module `module` (whose declared children are `kids`); `None`
/// for paths into other crates.
fn absolute(module: &[String], kids: &BTreeSet<String>, p: &[String]) -> Option<Vec<String>> {
    let first = p.first()?;
    let mut abs = match first.as_str() {
        "crate" => Vec::new(),
        "self" => module.to_vec(),
        "super" => module.to_vec(),
        name if kids.contains(name) => module.to_vec(),
        _ => return None,
    };
    let mut rest = p.iter().peekable();
    if first == "crate" || first == "self" {
        rest.next();
    }
    while rest.peek().is_some_and(|s| *s == "super") {
        rest.next();
        abs.pop()?;
    }
    abs.extend(rest.cloned());
    Some(abs)
}
