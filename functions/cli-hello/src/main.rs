//! A plain WASI command (no HTTP handler): built as a `wasi:cli` component
//! for wasm32-wasip2 and as a classic module for wasm32-wasip1. It prints
//! its arguments and `GREETING_NAME` from the environment, lists the root
//! directory it was given, reads the first bytes of each file named in
//! `READ_FILES` (comma-separated) and says what happened, computes for
//! `SPIN_MS` milliseconds of wall time when set, prints N numbered lines
//! when its arguments hold `--lines N`, and exits with `EXIT_CODE`
//! (default 0).

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
    if let Ok(paths) = std::env::var("READ_FILES") {
        for path in paths.split(',').filter(|path| !path.is_empty()) {
            match std::fs::File::open(path) {
                Ok(file) => {
                    let mut head = Vec::new();
                    match std::io::Read::read_to_end(&mut std::io::Read::take(file, 64), &mut head) {
                        Ok(n) => println!("{path}: read {n} bytes"),
                        Err(err) => println!("{path}: opened, read failed: {err}"),
                    }
                }
                Err(err) => println!("{path}: cannot open: {err}"),
            }
        }
    }
    if let Some(ms) = std::env::var("SPIN_MS").ok().and_then(|ms| ms.parse::<u64>().ok()) {
        let until = std::time::Instant::now() + std::time::Duration::from_millis(ms);
        let mut rounds = 0u64;
        while std::time::Instant::now() < until {
            rounds = std::hint::black_box(rounds + 1);
        }
        println!("spun {ms} ms ({rounds} rounds)");
    }
    let lines = args.iter().position(|arg| arg == "--lines").and_then(|at| args.get(at + 1));
    if let Some(lines) = lines.and_then(|lines| lines.parse::<u64>().ok()) {
        for line in 1..=lines {
            println!("line {line} of {lines}");
        }
    }
    eprintln!("cli-hello: done");
    let code = std::env::var("EXIT_CODE").ok().and_then(|code| code.parse().ok()).unwrap_or(0);
    std::process::exit(code);
}
