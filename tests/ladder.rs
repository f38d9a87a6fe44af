//! The module ladder of docs/ARCHITECTURE.md holds in the code: every
//! `crate::` (and, in the binaries, `backupd::`) path in `src/` names a module
//! that its own module's row allows, every allowed module sits on a lower
//! rung (so the imports cannot run back up or in a circle), and every module
//! of `src/` has a row. Plus the rules of issue 12 that the table alone could
//! be edited away from: the client imports only protocol, crypto and the two
//! leaf helpers (units, json); the worker never names mio.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Macros exported at the crate root, by the module that defines them.
const MACROS: &[(&str, &str)] = &[("peer_log", "logging")];

/// One row of the ladder: its rung and the modules it may import.
#[derive(Debug)]
struct Row {
    rung: u32,
    may_import: BTreeSet<String>,
}

/// The ladder table of docs/ARCHITECTURE.md: rows `| rung | `module` | owns | may import |`.
fn ladder() -> BTreeMap<String, Row> {
    let doc =
        std::fs::read_to_string(Path::new(ROOT).join("docs/ARCHITECTURE.md")).expect("docs/ARCHITECTURE.md");
    let start = doc
        .find("## The module ladder")
        .expect("docs/ARCHITECTURE.md has a \"## The module ladder\" section");
    let mut rows = BTreeMap::new();
    for line in doc[start..].lines().skip(1).take_while(|l| !l.starts_with("## ")) {
        let cells: Vec<&str> = line.trim().trim_matches('|').split('|').map(str::trim).collect();
        let Some(rung) = cells.first().and_then(|c| c.parse::<u32>().ok()) else { continue };
        assert_eq!(cells.len(), 4, "a ladder row has 4 cells: {line}");
        let module = cells[1].trim_matches('`').to_string();
        let may_import = backticked(cells[3]);
        assert!(rows.insert(module.clone(), Row { rung, may_import }).is_none(), "{module} has two rows");
    }
    assert!(!rows.is_empty(), "the ladder table has no rows");
    rows
}

fn backticked(cell: &str) -> BTreeSet<String> {
    cell.split('`').skip(1).step_by(2).map(str::to_string).collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read src") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top module a file of `src/` belongs to (`bin` for the binaries, `lib` for lib.rs).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src");
    let first = rel.components().next().expect("a component").as_os_str().to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// The source without its comments (line and block) and with its string
/// and char literals emptied, so that docs or text naming a module are not
/// imports.
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let rest = &b[i..];
        if rest.starts_with(b"//") {
            i += rest.iter().position(|&c| c == b'\n').unwrap_or(rest.len());
        } else if rest.starts_with(b"/*") {
            i += rest.windows(2).position(|w| w == b"*/").map_or(rest.len(), |j| j + 2);
        } else if let Some(hashes) = raw_string_start(rest) {
            // r"..." or r#"..."#: up to the quote followed by as many hashes.
            let close: Vec<u8> = std::iter::once(b'"').chain(std::iter::repeat_n(b'#', hashes)).collect();
            let body = &rest[hashes + 2..];
            i += hashes
                + 2
                + body.windows(close.len()).position(|w| w == close).map_or(body.len(), |j| j + close.len());
            out.extend_from_slice(b"\"\"");
        } else if rest[0] == b'"' {
            let mut j = 1;
            while j < rest.len() && rest[j] != b'"' {
                j += if rest[j] == b'\\' { 2 } else { 1 };
            }
            i += j + 1;
            out.extend_from_slice(b"\"\"");
        } else if rest[0] == b'\'' && (rest.get(1) == Some(&b'\\') || rest.get(2) == Some(&b'\'')) {
            // A char literal ('x', '\n', '\''); a lifetime has no closing quote.
            let j = if rest[1] == b'\\' {
                3 + rest[3..].iter().position(|&c| c == b'\'').unwrap_or(0)
            } else {
                3
            };
            i += j;
            out.extend_from_slice(b"' '");
        } else {
            out.push(rest[0]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `r"` or `r#..#"` at the start (not inside an identifier): the number of hashes.
fn raw_string_start(b: &[u8]) -> Option<usize> {
    let rest = b.strip_prefix(b"r")?;
    let hashes = rest.iter().take_while(|&&c| c == b'#').count();
    (rest.get(hashes) == Some(&b'"')).then_some(hashes)
}

/// Every crate-level name a file's code reaches: `crate::x`, `$crate::x`,
/// `crate::{x, y::z}`, and in the binaries `backupd::x`.
fn names_used(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for root in ["crate::", "backupd::"] {
        let mut at = 0;
        while let Some(i) = code[at..].find(root) {
            let start = at + i;
            at = start + root.len();
            let before = code[..start].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue; // e.g. `my_crate::`
            }
            let rest = &code[at..];
            if let Some(group) = rest.strip_prefix('{') {
                let inner = &group[..group.find('}').unwrap_or(group.len())];
                for item in inner.split(',') {
                    let name: String =
                        item.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                    if !name.is_empty() {
                        out.insert(name);
                    }
                }
            } else {
                let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                out.insert(name);
            }
        }
    }
    out
}

/// module -> the modules its code names (itself left out).
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(ROOT).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let module = module_of(&src, &f);
        let text = std::fs::read_to_string(&f).expect("read a source file");
        let used = graph.entry(module.clone()).or_default();
        for name in names_used(&code_only(&text)) {
            let target = MACROS.iter().find(|(m, _)| *m == name).map_or(name.as_str(), |(_, owner)| owner);
            if target != module {
                used.insert(target.to_string());
            }
        }
    }
    graph
}

#[test]
fn the_ladder_is_a_ladder() {
    let rows = ladder();
    for (module, row) in &rows {
        for m in &row.may_import {
            let Some(other) = rows.get(m) else { panic!("{module} may import {m}, which has no row") };
            assert!(
                other.rung < row.rung,
                "{module} (rung {}) may import {m} (rung {}): not below it",
                row.rung,
                other.rung
            );
        }
    }
}

#[test]
fn every_module_has_a_row_and_every_row_a_module() {
    let rows = ladder();
    let graph = imports();
    let modules: BTreeSet<&String> = graph.keys().filter(|m| *m != "lib").collect();
    let documented: BTreeSet<&String> = rows.keys().collect();
    assert_eq!(modules, documented, "the modules of src/ and the rows of the ladder in docs/ARCHITECTURE.md");
}

#[test]
fn no_import_outside_the_ladder() {
    let rows = ladder();
    let mut wrong = Vec::new();
    for (module, used) in imports() {
        if module == "lib" {
            continue; // lib.rs declares the modules
        }
        let row = &rows[&module];
        for m in used {
            if !row.may_import.contains(&m) {
                let why = match rows.get(&m) {
                    Some(r) if r.rung >= row.rung => "a back-arrow or a sideways one",
                    Some(_) => "not in its row's \"may import\"",
                    None => "not a module of the ladder",
                };
                wrong.push(format!("{module} (rung {}) imports {m}: {why}", row.rung));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports the ladder of docs/ARCHITECTURE.md does not allow:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_client_stands_on_protocol_crypto_and_two_leaves() {
    let graph = imports();
    let allowed: BTreeSet<&str> = ["protocol", "crypto", "units", "json"].into();
    let client = &graph["client"];
    assert!(client.iter().all(|m| allowed.contains(m.as_str())), "the client imports {client:?}");
    // units and json are leaves: helpers that import nothing of the crate.
    for leaf in ["units", "json"] {
        assert!(graph[leaf].is_empty(), "{leaf} imports {:?}: it must stay a leaf", graph[leaf]);
    }
    // The rows agree.
    let rows = ladder();
    assert!(rows["client"].may_import.iter().all(|m| allowed.contains(m.as_str())));
}

#[test]
fn the_worker_never_names_mio() {
    let mut files = Vec::new();
    rust_files(&Path::new(ROOT).join("src/worker"), &mut files);
    for f in files {
        let code = code_only(&std::fs::read_to_string(&f).expect("read"));
        assert!(!code.contains("mio::") && !code.contains("use mio"), "{} names mio", f.display());
    }
}

#[test]
fn the_reader_finds_the_forms_of_use() {
    let code = code_only(
        "use crate::a::b;\nuse crate::{c, d::e};\n// crate::commented\n/* crate::block */ $crate::f::g!();\n\
         my_crate::h; backupd::i::j; \"crate::in_a_string /*\"; r#\"crate::raw\"#; '\"'; '\\''; crate::k",
    );
    let names: Vec<String> = names_used(&code).into_iter().collect();
    assert_eq!(names, ["a", "c", "d", "f", "i", "k"]);
}
