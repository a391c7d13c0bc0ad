//! A plain WASI command (no HTTP handler): built as a `wasi:cli` component
//! for wasm32-wasip2 and as a classic module for wasm32-wasip1. It prints
//! its arguments and `GREETING_NAME` from the environment, lists the root
//! directory it was given, and exits with `EXIT_CODE` (default 0).

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    println!("hello from a wasi:cli command, args {args:?}");
    if let Ok(name) = std::env::var("GREETING_NAME") {
        println!("hello, {name}");
    }
    if let Ok(entries) = std::fs::read_dir("/") {
        let mut names: Vec<String> =
            entries.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into()).collect();
        names.sort();
        println!("root holds {names:?}");
    }
    eprintln!("cli-hello: done");
    let code = std::env::var("EXIT_CODE").ok().and_then(|code| code.parse().ok()).unwrap_or(0);
    std::process::exit(code);
}
