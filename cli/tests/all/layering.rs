//! The modules of `host/src` are layered: the book's Layout chapter
//! (`docs/src/layout.md`) lists them top to bottom, and each may depend
//! only on modules listed after it. This test reads every `crate::` path in
//! the sources (imports and inline paths alike) and fails on any dependency
//! that points up the list — which is also what any import cycle would need.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Where the Layout chapter lists the layers: the fenced block after this line.
const MARKER: &str = "<!-- host/src layers, top to bottom (checked by cli/tests/all/layering.rs) -->";

/// One `crate::` reference: which module it names, from which file and line.
#[derive(Debug)]
struct Reference {
    from: String,
    to: String,
    file: PathBuf,
    line: usize,
}

fn source_files(dir: &Path, files: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            source_files(&path, files);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            files.push(path);
        }
    }
}

/// The top-level module a file belongs to (`abi/invoke.rs` → `abi`);
/// `None` for the crate root and the binary.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src).unwrap();
    let first = relative.components().next()?.as_os_str().to_str()?.to_string();
    let name = first.strip_suffix(".rs").unwrap_or(&first).to_string();
    (name != "lib" && name != "main").then_some(name)
}

/// `pub use module::Item;` in lib.rs: items re-exported at the root.
fn root_reexports(lib: &str) -> BTreeMap<String, String> {
    lib.lines()
        .filter_map(|line| line.trim().strip_prefix("pub use ")?.strip_suffix(';').map(str::to_string))
        .filter_map(|path| path.split_once("::").map(|(module, item)| (item.to_string(), module.to_string())))
        .collect()
}

fn identifier_at(text: &str) -> &str {
    let end = text.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(text.len());
    &text[..end]
}

/// Every module a line names through `crate::`, including grouped
/// imports (`use crate::{a::X, b}`).
fn named_modules(line: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find("crate::") {
        let after = &rest[at + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            names.extend(group.split(',').map(|item| identifier_at(item.trim()).to_string()));
        } else {
            names.push(identifier_at(after).to_string());
        }
        rest = after;
    }
    names.retain(|name| !name.is_empty() && name != "self");
    names
}

fn references(src: &Path) -> Vec<Reference> {
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let reexports = root_reexports(&lib);
    let mut files = Vec::new();
    source_files(src, &mut files);
    let mut found = Vec::new();
    for file in files {
        let Some(from) = module_of(src, &file) else { continue };
        let text = std::fs::read_to_string(&file).unwrap();
        for (index, line) in text.lines().enumerate() {
            // Comments (and doc comments) are prose, not dependencies.
            let code = line.split("//").next().unwrap_or("");
            for name in named_modules(code) {
                let to = reexports.get(&name).cloned().unwrap_or(name);
                if to != from {
                    found.push(Reference { from: from.clone(), to, file: file.clone(), line: index + 1 });
                }
            }
        }
    }
    found
}

/// The layers as the Layout chapter lists them, top first.
fn readme_layers(readme: &str) -> Vec<String> {
    let after = readme.split_once(MARKER).unwrap_or_else(|| panic!("docs/src/layout.md has no line {MARKER:?}")).1;
    let block = after.split("```").nth(1).expect("a fenced block follows the marker");
    block
        .lines()
        .skip(1) // the fence's language tag
        // A module's line starts with its name; indented lines continue it.
        .filter(|line| !line.starts_with(char::is_whitespace))
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

#[test]
fn every_module_depends_only_on_modules_below_it_in_the_readme() {
    let host = Path::new(env!("CARGO_MANIFEST_DIR")).join("../host");
    let src = host.join("src");
    let readme = std::fs::read_to_string(host.join("../docs/src/layout.md")).unwrap();
    let layers = readme_layers(&readme);
    let rank: BTreeMap<&str, usize> = layers.iter().enumerate().map(|(at, name)| (name.as_str(), at)).collect();
    assert_eq!(rank.len(), layers.len(), "a module is listed twice in the Layout chapter's layers: {layers:?}");

    let mut files = Vec::new();
    source_files(&src, &mut files);
    let modules: BTreeSet<String> = files.iter().filter_map(|file| module_of(&src, file)).collect();
    let listed: BTreeSet<String> = layers.iter().cloned().collect();
    assert_eq!(modules, listed, "the Layout chapter's layers must list exactly the modules of host/src");

    let upward: Vec<String> = references(&src)
        .into_iter()
        .filter(|reference| rank.contains_key(reference.to.as_str()))
        .filter(|reference| rank[reference.to.as_str()] <= rank[reference.from.as_str()])
        .map(|reference| {
            format!(
                "{} → {} ({}:{})",
                reference.from,
                reference.to,
                reference.file.strip_prefix(&host).unwrap_or(&reference.file).display(),
                reference.line
            )
        })
        .collect();
    assert!(
        upward.is_empty(),
        "these dependencies point up the Layout chapter's layers (move the code, or the module in the list, \
         if the layering really changed):\n{}",
        upward.join("\n")
    );
}

#[test]
fn the_reference_reader_sees_imports_groups_inline_paths_and_reexports() {
    assert_eq!(named_modules("use crate::abi::{AbiCtxView, KvError};"), ["abi"]);
    assert_eq!(named_modules("use crate::{dispatch::X, host::Host};"), ["dispatch", "host"]);
    assert_eq!(
        named_modules("    tasks.spawn(crate::trigger::http::serve(l, crate::Error::x));"),
        ["trigger", "Error"]
    );
    assert!(named_modules("let ok = true; // crate::host is prose here".split("//").next().unwrap()).is_empty());
    let reexports = root_reexports("pub use error::Error;\npub mod x;\n");
    assert_eq!(reexports.get("Error").map(String::as_str), Some("error"));
}
