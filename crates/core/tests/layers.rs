//! Guards the crate's layout rule: the module graph of `crates/core/src` (module to module, by
//! `crate::` and `super::` paths) has no cycle, and no arrow points up a floor.
//!
//! Floors, from the bottom: the base modules at the crate root (error, config, host, ...),
//! `storage/`, `actor/`, `runtime/`, `server/`, and the top (`registry`, `assemble`). A module
//! may use any module on a lower floor and modules on its own floor, as long as no cycle
//! forms. `lib.rs` only declares modules and re-exports the front door, so it is left out; a
//! `crate::` path that names no module file (a root re-export) is refused, so internals
//! always name where things live.
//!
//! Run with `--nocapture` to print the graph (folder to folder, then module to module). Set
//! `KEEL_LAYERS_SRC` to check another tree (an older checkout, say).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The base modules: the crate root's own files, each with the children it keeps in a folder
/// of its name (`logging/format.rs`). Every floor uses them; they use only each other.
const BASE: &[&str] = &[
    "actor_type",
    "cbor",
    "clock",
    "config",
    "error",
    "faults",
    "host",
    "key",
    "kv_key",
    "logging",
    "metrics",
    "options",
    "origin",
    "spans",
];

/// The folders that are floors, from the bottom.
const FOLDERS: &[&str] = &["storage", "actor", "runtime", "server"];

/// The modules of the top floor.
const TOP: &[&str] = &["registry", "assemble"];

/// The floor of a module, by its first path segment; higher floors may use lower ones. A
/// module this file does not place is on no floor (and reported): a new module must be given
/// one here, and in `lib.rs`'s layout doc.
fn floor(module: &str) -> (usize, &'static str) {
    match module.split("::").next().unwrap_or_default() {
        "storage" => (1, "storage/"),
        "actor" => (2, "actor/"),
        "runtime" => (3, "runtime/"),
        "server" => (4, "server/"),
        name if TOP.contains(&name) => (5, "top"),
        name if BASE.contains(&name) => (0, "base"),
        _ => (usize::MAX, "no floor"),
    }
}

/// Every module file under `src`, by module path (`runtime::alarms`, `runtime`, `error`).
fn modules(src: &Path) -> BTreeMap<String, PathBuf> {
    fn walk(dir: &Path, prefix: &[String], out: &mut BTreeMap<String, PathBuf>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for path in entries {
            let name = path.file_stem().unwrap().to_string_lossy().to_string();
            if path.is_dir() {
                let mut inner = prefix.to_vec();
                inner.push(name);
                walk(&path, &inner, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let mut segments = prefix.to_vec();
                if name != "mod" {
                    segments.push(name);
                }
                if segments == ["lib"] {
                    continue;
                }
                out.insert(segments.join("::"), path);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(src, &[], &mut out);
    out
}

/// The source without comments (line comments, doc comments and block comments), so that
/// intra-doc links and prose do not count as imports. String contents are kept.
fn strip_comments(source: &str) -> String {
    let bytes = source.as_bytes();
    let mut out = String::with_capacity(source.len());
    let mut i = 0;
    let mut in_string = false;
    while i < bytes.len() {
        let c = bytes[i];
        if in_string {
            out.push(c as char);
            if c == b'\\' && i + 1 < bytes.len() {
                out.push(bytes[i + 1] as char);
                i += 2;
                continue;
            }
            if c == b'"' {
                in_string = false;
            }
            i += 1;
            continue;
        }
        let after_ident = i > 0 && (bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if c == b'r' && !after_ident && raw_string_hashes(&source[i + 1..]).is_some() {
            // A raw string (`r"..."`, `r#"..."#`): kept whole, quotes inside it included.
            let hashes = raw_string_hashes(&source[i + 1..]).unwrap_or(0);
            let open = 1 + hashes + 1;
            let close = format!("\"{}", "#".repeat(hashes));
            let end = source[i + open..]
                .find(&close)
                .map_or(bytes.len(), |e| i + open + e + close.len());
            out.push_str(&source[i..end]);
            i = end;
        } else if let Some(len) = (c == b'\'')
            .then(|| char_literal_len(&source[i..]))
            .flatten()
        {
            // A char literal such as '"' or '\'': kept, so its quote starts no string.
            out.push_str(&source[i..i + len]);
            i += len;
        } else if c >= 0x80 {
            // Outside strings, copy whole characters, so slicing stays on their boundaries.
            let ch = source[i..].chars().next().unwrap_or(' ');
            out.push(ch);
            i += ch.len_utf8();
        } else if c == b'"' {
            in_string = true;
            out.push('"');
            i += 1;
        } else if source[i..].starts_with("//") {
            while i < bytes.len() && bytes[i] != b'\n' {
                i += 1;
            }
        } else if source[i..].starts_with("/*") {
            let end = source[i + 2..]
                .find("*/")
                .map_or(bytes.len(), |e| i + 2 + e + 2);
            i = end;
        } else {
            out.push(c as char);
            i += 1;
        }
    }
    out
}

/// How many `#` open a raw string at `rest` (what follows an `r`), if one opens there.
fn raw_string_hashes(rest: &str) -> Option<usize> {
    let hashes = rest.bytes().take_while(|b| *b == b'#').count();
    (rest.as_bytes().get(hashes) == Some(&b'"')).then_some(hashes)
}

/// The length of the char literal `s` starts with (`'x'`, `'\n'`, `'\''`), or `None` for a
/// lifetime (`'a`).
fn char_literal_len(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    match b.get(1)? {
        b'\\' => s.get(3..)?.find('\'').map(|end| end + 4),
        _ => {
            let len = s[1..].chars().next()?.len_utf8();
            (b.get(1 + len) == Some(&b'\'')).then_some(len + 2)
        }
    }
}

/// The paths named after each `crate::` or `super::` in `code`, groups expanded:
/// `crate::a::{b, c::d}` gives `a::b` and `a::c::d`. `super::` paths come back with a
/// leading `super` segment for the caller to resolve.
fn paths(code: &str) -> Vec<(bool, Vec<String>)> {
    fn ident_len(s: &str) -> usize {
        s.find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(s.len())
    }
    /// Parses a path tail after `prefix::`, appending every full path to `out`.
    fn tail(s: &str, prefix: Vec<String>, out: &mut Vec<Vec<String>>) -> usize {
        let mut prefix = prefix;
        let mut i = 0;
        loop {
            if s[i..].starts_with('{') {
                // A group: split its items at depth zero.
                let mut depth = 0;
                let mut start = i + 1;
                let mut j = i;
                while j < s.len() {
                    match s.as_bytes()[j] {
                        b'{' => depth += 1,
                        b'}' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        b',' if depth == 1 => {
                            let item = &s[start..j];
                            let trimmed = item.trim_start();
                            tail(trimmed, prefix.clone(), out);
                            start = j + 1;
                        }
                        _ => {}
                    }
                    j += 1;
                }
                let item = s[start..j.min(s.len())].trim_start();
                if !item.is_empty() {
                    tail(item, prefix.clone(), out);
                }
                return j + 1;
            }
            let len = ident_len(&s[i..]);
            if len == 0 {
                out.push(prefix);
                return i;
            }
            prefix.push(s[i..i + len].to_string());
            i += len;
            if s[i..].starts_with("::") {
                i += 2;
            } else {
                out.push(prefix);
                return i;
            }
        }
    }
    // Where the first inline module opens (`mod tests {`); paths after it are inside it.
    let inline_from = code
        .match_indices("mod ")
        .find(|(at, _)| {
            let rest = &code[at + 4..];
            let len = ident_len(rest);
            len > 0 && rest[len..].trim_start().starts_with('{')
        })
        .map_or(usize::MAX, |(at, _)| at);
    let mut out = Vec::new();
    for (start, _) in code.match_indices("crate::") {
        let before = code[..start].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        let mut found = Vec::new();
        tail(&code[start + "crate::".len()..], Vec::new(), &mut found);
        out.extend(found.into_iter().map(|path| (start > inline_from, path)));
    }
    for (start, _) in code.match_indices("super::") {
        let before = code[..start].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let mut rest = &code[start..];
        let mut supers = 0;
        while let Some(next) = rest.strip_prefix("super::") {
            supers += 1;
            rest = next;
        }
        let mut found = Vec::new();
        tail(rest, Vec::new(), &mut found);
        for path in found {
            let mut full = vec!["super".to_string(); supers];
            full.extend(path);
            out.push((start > inline_from, full));
        }
    }
    out
}

/// The names of the file modules `code` declares (`mod task;`, `pub(crate) mod conn;`).
fn child_modules(code: &str) -> Vec<String> {
    code.lines()
        .filter_map(|line| {
            let line = line.trim();
            let at = line.find("mod ")?;
            let (visibility, rest) = line.split_at(at);
            let name = rest["mod ".len()..].strip_suffix(';')?;
            let plain = visibility.is_empty() || visibility.trim_end().starts_with("pub");
            (plain && name.chars().all(|c| c.is_alphanumeric() || c == '_'))
                .then(|| name.to_string())
        })
        .collect()
}

/// The module graph of `src`: each module and the modules it uses. Paths that name no module
/// file are returned apart, by module.
type Graph = BTreeMap<String, BTreeSet<String>>;

fn graph(src: &Path) -> (Graph, BTreeMap<String, BTreeSet<String>>) {
    let modules = modules(src);
    let mut graph = Graph::new();
    let mut unresolved: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, file) in &modules {
        let code = strip_comments(&std::fs::read_to_string(file).unwrap());
        let edges = graph.entry(module.clone()).or_default();
        // A folder's own module naming its children by relative path (`task::ActorTask`)
        // uses them as surely as a `crate::` path does.
        for child in child_modules(&code) {
            let target = format!("{module}::{child}");
            let named = code.match_indices(&format!("{child}::")).any(|(at, _)| {
                !code[..at]
                    .chars()
                    .next_back()
                    .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':')
            });
            if named && modules.contains_key(&target) {
                edges.insert(target);
            }
        }
        for (inline, path) in paths(&code) {
            // `super::` climbs from this module's parent (a `mod tests` inside the file names
            // the file itself with one `super`).
            let mut segments: Vec<String> = module.split("::").map(str::to_string).collect();
            let mut rest = path.as_slice();
            let mut supers = 0;
            while rest.first().is_some_and(|s| s == "super") {
                supers += 1;
                rest = &rest[1..];
            }
            if supers > 0 {
                // Inside an inline module (`mod tests { use super::*; }`) the first `super`
                // names the file's own module; elsewhere it names the parent.
                let climbs = if inline { supers - 1 } else { supers };
                segments.truncate(segments.len().saturating_sub(climbs));
            } else {
                segments.clear();
            }
            segments.extend(rest.iter().cloned());
            // The longest prefix that is a module file.
            let target = (1..=segments.len())
                .rev()
                .map(|n| segments[..n].join("::"))
                .find(|candidate| modules.contains_key(candidate));
            match target {
                Some(target) if target != *module => {
                    edges.insert(target);
                }
                Some(_) => {}
                None if supers > 0 => {}
                None => {
                    unresolved
                        .entry(module.clone())
                        .or_default()
                        .insert(format!("crate::{}", segments.join("::")));
                }
            }
        }
    }
    (graph, unresolved)
}

/// The strongly connected components with more than one module (Tarjan).
fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    struct State<'a> {
        graph: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(state: &mut State<'a>, node: &'a str) {
        state.index.insert(node, state.next);
        state.low.insert(node, state.next);
        state.next += 1;
        state.stack.push(node);
        state.on_stack.insert(node);
        let graph = state.graph;
        for next in graph.get(node).into_iter().flatten() {
            let next = next.as_str();
            if !state.index.contains_key(next) {
                visit(state, next);
                let low = state.low[next].min(state.low[node]);
                state.low.insert(node, low);
            } else if state.on_stack.contains(next) {
                let low = state.index[next].min(state.low[node]);
                state.low.insert(node, low);
            }
        }
        if state.low[node] == state.index[node] {
            let mut component = Vec::new();
            while let Some(top) = state.stack.pop() {
                state.on_stack.remove(top);
                component.push(top.to_string());
                if top == node {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                state.out.push(component);
            }
        }
    }
    let mut state = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for node in graph.keys() {
        if !state.index.contains_key(node.as_str()) {
            visit(&mut state, node);
        }
    }
    state.out
}

/// The file a module path lives in, for messages (a folder's own module is its `mod.rs`).
fn file_of(module: &str, graph_src: &Path) -> String {
    let direct = graph_src.join(module.replace("::", "/") + ".rs");
    if direct.exists() {
        module.replace("::", "/") + ".rs"
    } else {
        module.replace("::", "/") + "/mod.rs"
    }
}

#[test]
fn the_module_graph_has_no_cycle_and_no_upward_arrow() {
    let src = std::env::var_os("KEEL_LAYERS_SRC")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let (graph, unresolved) = graph(&src);
    assert!(graph.len() > 10, "read the modules of {}", src.display());
    // The reader must see imports where they are: every module but the leaves uses another,
    // and the error type is used all over.
    let users_of_error = graph.values().filter(|to| to.contains("error")).count();
    assert!(
        users_of_error > graph.len() / 2,
        "the import reader missed most uses of `crate::error` ({users_of_error} of {})",
        graph.len()
    );

    let mut folders: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (from, tos) in &graph {
        for to in tos {
            let (a, b) = (floor(from).1, floor(to).1);
            if a != b {
                folders.entry(a).or_default().insert(b);
            }
        }
    }
    println!("folder -> folder");
    for (from, tos) in &folders {
        println!(
            "  {from} -> {}",
            tos.iter().copied().collect::<Vec<_>>().join(" ")
        );
    }
    println!("module -> module");
    for (from, tos) in &graph {
        println!(
            "  {from} -> {}",
            tos.iter().cloned().collect::<Vec<_>>().join(" ")
        );
    }

    let mut problems = Vec::new();
    for module in graph.keys().filter(|module| floor(module).0 == usize::MAX) {
        problems.push(format!(
            "{} is on no floor: place it in `floor()` of tests/layers.rs and in lib.rs's layout doc",
            file_of(module, &src)
        ));
    }
    for (from, tos) in &graph {
        for to in tos {
            if floor(to).0 > floor(from).0 {
                problems.push(format!(
                    "upward arrow: {} ({}) uses {} ({})",
                    file_of(from, &src),
                    floor(from).1,
                    file_of(to, &src),
                    floor(to).1
                ));
            }
        }
    }
    for component in cycles(&graph) {
        let files: Vec<String> = component.iter().map(|m| file_of(m, &src)).collect();
        problems.push(format!("import cycle among: {}", files.join(", ")));
    }
    for (module, paths) in &unresolved {
        problems.push(format!(
            "{} names no module file (use the real path, not a root re-export): {}",
            file_of(module, &src),
            paths.iter().cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The crate's layout doc (the `//!` lines of `lib.rs`) and the README's layout table describe
/// the house as it is: the doc names every folder, every base module and the top floor's
/// modules, and the README's row for the base names every base module. A module added without
/// being described fails here, as one on no floor fails above.
#[test]
fn the_layout_doc_and_the_readme_name_every_floor_and_base_module() {
    let src = std::env::var_os("KEEL_LAYERS_SRC")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let doc: String = lib
        .lines()
        .filter_map(|line| line.strip_prefix("//!"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut problems = Vec::new();
    let roots: BTreeSet<String> = modules(&src)
        .keys()
        .map(|module| module.split("::").next().unwrap_or_default().to_string())
        .collect();
    for root in &roots {
        let named = if FOLDERS.contains(&root.as_str()) {
            doc.contains(&format!("`{root}/`"))
        } else {
            doc.contains(&format!("[`{root}`]")) || doc.contains(&format!("`{root}`"))
        };
        if !named {
            problems.push(format!("lib.rs's layout doc does not name `{root}`"));
        }
    }
    for folder in FOLDERS {
        if !roots.contains(*folder) {
            problems.push(format!(
                "tests/layers.rs names a floor `{folder}/` that is gone"
            ));
        }
    }
    for module in BASE.iter().chain(TOP) {
        if !roots.contains(*module) {
            problems.push(format!(
                "tests/layers.rs names a module `{module}` that is gone"
            ));
        }
    }
    // The README describes this checkout, not one `KEEL_LAYERS_SRC` points at.
    if std::env::var_os("KEEL_LAYERS_SRC").is_none() {
        let readme_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md");
        let readme = std::fs::read_to_string(&readme_path).unwrap();
        let base_row = readme
            .lines()
            .find(|line| line.starts_with("| `crates/core/src/*.rs`"))
            .expect("the README's layout table has a row for the base modules");
        let words: BTreeSet<&str> = base_row
            .split(|c: char| !(c.is_alphanumeric() || c == '_'))
            .collect();
        for module in BASE {
            if !words.contains(module) {
                problems.push(format!(
                    "the README's layout row for the base modules does not name `{module}`"
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
