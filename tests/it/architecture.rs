//! Facts about the code's layout that anyone can recompute, checked so
//! that they stay true: the layers of `src/` (a module imports only from
//! its own layer or below, and no two modules import each other, directly
//! or round a circle), no file over 500 lines, and nothing above the store
//! naming a backend. `docs/architecture.md` explains the layers.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The top-level modules of `src/`, by layer, lowest first. A module may
/// use modules of its own layer and of the layers below it.
const LAYERS: &[&[&str]] = &[
    // Values and primitives: no I/O of their own.
    &["domain", "crypto", "retry", "output", "trail", "clock"],
    // Adapters: where bytes come from and go to.
    &["metrics", "kms", "source", "store"],
    // What the adapters' rows mean: keys and the sealed-row format.
    &["keyring", "vault"],
    // Pieces of the jobs.
    &["honeytoken", "progress"],
    // The jobs: the write path, rotations; and the command line's shape.
    &["pipeline", "rotation", "cli"],
    // Wiring.
    &["telemetry", "commands"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a file of `src/` belongs to (`None`: lib.rs, main.rs).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()?
        .as_os_str()
        .to_string_lossy()
        .into_owned();
    let name = first.trim_end_matches(".rs").to_string();
    (name != "lib" && name != "main").then_some(name)
}

/// The modules a file names as `crate::module`, comments left out.
fn uses(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

#[test]
fn the_layers_hold_and_no_file_is_over_500_lines() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut long = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let lines = text.lines().count();
        if lines > 500 {
            long.push(format!("{} ({lines} lines)", f.display()));
        }
        let Some(module) = module_of(&src, f) else {
            continue;
        };
        let deps = graph.entry(module.clone()).or_default();
        deps.extend(uses(&text).into_iter().filter(|d| *d != module));
    }
    assert!(long.is_empty(), "files over 500 lines: {long:?}");

    let mut upward = Vec::new();
    for (module, deps) in &graph {
        let Some(mine) = layer_of(module) else {
            panic!("src/{module} is in no layer: add it to LAYERS (and docs/architecture.md)");
        };
        for d in deps {
            let theirs =
                layer_of(d).unwrap_or_else(|| panic!("{module} uses {d}, which is in no layer"));
            if theirs > mine {
                upward.push(format!("{module} (layer {mine}) uses {d} (layer {theirs})"));
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports from a lower layer to a higher one: {upward:?}"
    );

    // No circle, within a layer either: a depth-first search for a back edge.
    fn visit<'a>(
        m: &'a str,
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) {
        if done.contains(m) {
            return;
        }
        if let Some(i) = path.iter().position(|p| *p == m) {
            panic!("an import circle: {} -> {m}", path[i..].join(" -> "));
        }
        path.push(m);
        for d in graph.get(m).into_iter().flatten() {
            visit(d, graph, path, done);
        }
        path.pop();
        done.insert(m);
    }
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        visit(m, &graph, &mut Vec::new(), &mut done);
    }
}

#[test]
fn nothing_above_the_store_names_a_backend() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut named = Vec::new();
    for f in files.iter().filter(|f| !f.starts_with(src.join("store"))) {
        let text = std::fs::read_to_string(f).unwrap();
        for (no, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for backend in ["PgStore", "SqliteStore", "store::postgres", "store::sqlite"] {
                if code.contains(backend) {
                    named.push(format!("{}:{}: {backend}", f.display(), no + 1));
                }
            }
        }
    }
    assert!(named.is_empty(), "{named:?}");
}
