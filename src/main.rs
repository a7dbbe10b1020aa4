//! The `corekv` binary: a thin entry point over the command line in `corekv::cli`.

fn main() -> std::process::ExitCode {
    corekv::cli::main()
}
