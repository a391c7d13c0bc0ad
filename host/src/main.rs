//! `shoal`: run a Shoal host, or manage a running one.

use std::process::ExitCode;

fn main() -> ExitCode {
    shoal::cli::main()
}
