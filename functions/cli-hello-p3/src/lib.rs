//! A WASI 0.3 command, as the upstream `wasip3` bindings build one: it
//! exports `wasi:cli/run@0.3.0` (an async `run`), reads its arguments and
//! environment through `wasi:cli/environment@0.3.0`, prints them, and
//! fails (exit status 1) when `FAIL` is set.

struct Cli;

impl wasip3::exports::cli::run::Guest for Cli {
    async fn run() -> Result<(), ()> {
        let args = wasip3::cli::environment::get_arguments();
        let env = wasip3::cli::environment::get_environment();
        println!("hello from a wasi:cli@0.3 command, args {:?}", args.get(1..).unwrap_or_default());
        if let Some((_, name)) = env.iter().find(|(key, _)| key == "GREETING_NAME") {
            println!("hello, {name}");
        }
        if env.iter().any(|(key, _)| key == "FAIL") {
            eprintln!("cli-hello-p3: failing, as FAIL asks");
            return Err(());
        }
        eprintln!("cli-hello-p3: done");
        Ok(())
    }
}

wasip3::cli::command::export!(Cli);
