//! `shoal`: run a Shoal host or a node's host, manage a running one, build
//! images and new functions. The work is in the library crates
//! (`shoal-host`, `shoal-node`, `shoal-images`); this crate parses the
//! command line.

mod cli;
mod image;
mod scaffold;

fn main() -> std::process::ExitCode {
    cli::main()
}
