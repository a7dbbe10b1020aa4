//! The `corekv` binary: a thin entry point over the command line in `corekv::cli`.

/// jemalloc rather than glibc's malloc, for the node's sake: glibc kept in
/// its arenas what bursts of client connections had freed, so a node's RSS
/// only grew (7 MB to 113-144 MB after 25 bursts of 2,000 connections, still
/// rising, and no lower after); with jemalloc it stays under 35 MB during
/// the bursts and is back to 11.5-13 MB 10 s after them. Its background
/// threads (the `background_threads` feature) hand freed pages back to the
/// kernel even while the node is idle. Measured with
/// `benches/probes/connection_burst.py`; see README, "Limits".
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    corekv::cli::main()
}
