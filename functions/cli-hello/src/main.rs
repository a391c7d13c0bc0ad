//! A plain `wasi:cli` command: a valid component with no HTTP handler.

fn main() {
    println!("hello from a wasi:cli command");
}
