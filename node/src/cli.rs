//! Command-line entry point.

use std::process::ExitCode;

/// Runs the `corekv` command line.
pub fn main() -> ExitCode {
    ExitCode::SUCCESS
}
