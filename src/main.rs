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

/// jemalloc's options, read before `main` (a pointer to a C string, as
/// jemalloc's `malloc_conf`; the environment variable `_RJEM_MALLOC_CONF`
/// is read after it and overrides it, e.g. `thp:default`).
///
/// Transparent huge pages for the heap (`madvise(MADV_HUGEPAGE)` on
/// jemalloc's memory; the kernel's `transparent_hugepage/enabled` must be
/// `madvise` or `always`): one TLB entry and one page fault per 2 MiB
/// instead of per 4 KiB. A 1 GB state is a million values spread over the
/// heap; every put, apply and snapshot reaches into it, and on a VM each
/// TLB miss walks two page tables. BIG (1M keys x 1 KiB) on the
/// development VM, in four alternated pairs of runs: 11-50 % more puts/s
/// and 10-40 % less CPU per put (README, "Huge pages for the heap").
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8; 31] = b"thp:always,metadata_thp:always\0";

fn main() -> std::process::ExitCode {
    corekv::cli::main()
}
