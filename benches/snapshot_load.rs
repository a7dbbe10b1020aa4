//! How long loading a large snapshot takes (issue 13: a restarted 1 GB
//! node must be ready within 15 s, and loading its snapshot is the first
//! and largest part of that).
//!
//! Writes a snapshot of `COREKV_BENCH_SNAPSHOT_MB` MiB (default 1024) of
//! 1 KiB values with the node's writer, then loads it back with
//! `snapshot::read`, as a restart does (one thread reads and decodes, the
//! calling one builds the map), `COREKV_BENCH_ROUNDS` times (default 3).
//! Each step runs in a process of its own (this bench again, with
//! `--write` or `--load`), as a restarted node is one: a process that had
//! freed memory before would reuse it instead of faulting in new pages. Prints each load's wall time
//! and CPU (both threads). The file is in the page cache after it is
//! written, so this is the CPU's part of a restart, not the disk's. The
//! memory is the node's: jemalloc with huge pages, as `src/main.rs` sets
//! it; `_RJEM_MALLOC_CONF` overrides that as it does for the node (e.g.
//! `thp:default`). Files go under `COREKV_BENCH_DIR` if set, else the
//! system temp directory.
//! Run: `cargo bench --bench snapshot_load`.

use std::path::Path;
use std::time::Instant;

use corekv::cpu;
use corekv_node::snapshot::{self, SnapshotMeta};

mod common;
use common::{bench_dir, env_u64, image};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The node's jemalloc options (see `src/main.rs`).
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8; 31] = b"thp:always,metadata_thp:always\0";

/// Writes a snapshot of `mib` MiB into `dir`, in a process of its own: one
/// that then freed its 1 GiB state while a load ran beside it slowed that
/// load from about 2 s to 6 s.
fn write(mib: u64, dir: &Path) {
    eprintln!("building a state of {mib} MiB of 1 KiB values");
    let image = image(mib);
    let meta = SnapshotMeta {
        index: 1,
        term: 1,
        ..SnapshotMeta::default()
    };
    snapshot::write(dir, &meta, &image).expect("snapshot");
}

/// Loads the snapshot at `path` once and prints the line of that round.
fn load(round: u64, path: &Path) {
    let (cpu_before, started) = (cpu::cpu_seconds(libc::RUSAGE_SELF), Instant::now());
    let (_, image) = snapshot::read(path).expect("load");
    let (seconds, cpu) = (
        started.elapsed().as_secs_f64(),
        cpu::cpu_seconds(libc::RUSAGE_SELF) - cpu_before,
    );
    let gib = std::fs::metadata(path).expect("stat").len() as f64 / f64::from(1 << 30);
    println!(
        "{round:5} {:7} {seconds:8.2} {cpu:7.2} {:11.2}",
        image.map.len(),
        seconds / gib
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    match &args[..] {
        [_, flag, round, path] if flag == "--load" => {
            return load(round.parse().expect("round"), Path::new(path))
        }
        [_, flag, mib, dir] if flag == "--write" => {
            return write(mib.parse().expect("MiB"), Path::new(dir))
        }
        _ => {}
    }
    let mib = env_u64("COREKV_BENCH_SNAPSHOT_MB", 1024);
    let rounds = env_u64("COREKV_BENCH_ROUNDS", 3);
    let dir = bench_dir();
    let me = std::env::current_exe().expect("this bench's path");
    let run = |args: &[&std::ffi::OsStr]| {
        let status = std::process::Command::new(&me)
            .args(args)
            .status()
            .expect("run a step");
        assert!(status.success(), "{args:?}: {status}");
    };
    run(&[
        "--write".as_ref(),
        mib.to_string().as_ref(),
        dir.path().as_os_str(),
    ]);
    let path = snapshot::list(dir.path())
        .pop()
        .expect("the snapshot just written")
        .2;
    println!("round   pairs   load s   cpu s   s per GiB");
    for round in 1..=rounds {
        run(&[
            "--load".as_ref(),
            round.to_string().as_ref(),
            path.as_os_str(),
        ]);
    }
}
