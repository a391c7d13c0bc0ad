//! A WASI 0.3 command, as the upstream `wasip3` bindings build one: it
//! exports `wasi:cli/run@0.3.0` (an async `run`), reads its arguments and
//! environment through `wasi:cli/environment@0.3.0`, prints them, reads
//! the first bytes of each file named in `READ_FILES` (comma-separated)
//! through `wasi:filesystem@0.3.0` and says what happened, and fails
//! (exit status 1) when `FAIL` is set.

use wasip3::filesystem::preopens;
use wasip3::filesystem::types::{DescriptorFlags, OpenFlags, PathFlags};

struct Cli;

impl wasip3::exports::cli::run::Guest for Cli {
    async fn run() -> Result<(), ()> {
        let args = wasip3::cli::environment::get_arguments();
        let env = wasip3::cli::environment::get_environment();
        println!("hello from a wasi:cli@0.3 command, args {:?}", args.get(1..).unwrap_or_default());
        if let Some((_, name)) = env.iter().find(|(key, _)| key == "GREETING_NAME") {
            println!("hello, {name}");
        }
        if let Some((_, paths)) = env.iter().find(|(key, _)| key == "READ_FILES") {
            read_files(paths).await;
        }
        if env.iter().any(|(key, _)| key == "FAIL") {
            eprintln!("cli-hello-p3: failing, as FAIL asks");
            return Err(());
        }
        eprintln!("cli-hello-p3: done");
        Ok(())
    }
}

/// Open each of `paths` (absolute, comma-separated) in the preopened root
/// and read up to 64 bytes of it.
async fn read_files(paths: &str) {
    let directories = preopens::get_directories();
    let Some((root, _)) = directories.iter().find(|(_, guest)| guest == "/") else {
        println!("no root directory was preopened");
        return;
    };
    for path in paths.split(',').filter(|path| !path.is_empty()) {
        let relative = path.trim_start_matches('/').to_string();
        match root.open_at(PathFlags::empty(), relative, OpenFlags::empty(), DescriptorFlags::READ).await {
            Ok(file) => {
                let (mut stream, _done) = file.read_via_stream(0);
                let (_, head) = stream.read(Vec::with_capacity(64)).await;
                println!("{path}: read {} bytes", head.len());
            }
            Err(err) => println!("{path}: cannot open: {err}"),
        }
    }
}

wasip3::cli::command::export!(Cli);
