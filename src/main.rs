//! The `corekv` binary: a thin entry point over `corekv-node`.

fn main() -> std::process::ExitCode {
    corekv_node::cli::main()
}
