//! What writing a snapshot does to the WAL's fsync latency, paced and not,
//! in one run (issue 13: "a snapshot never stalls the WAL").
//!
//! One thread appends a 4 KiB entry and syncs the WAL (fdatasync), over and
//! over, recording each sync's latency, while another writes a snapshot of
//! `COREKV_BENCH_SNAPSHOT_MB` MiB (default 512) of 1 KiB values:
//!
//! - `alone`: no snapshot, for as long as the default (`direct`) took;
//! - `unpaced`: the snapshot left to the kernel's writeback until its fsync;
//! - `chunks`: through the page cache, writeback started every 1 MiB (at
//!   most two chunks dirty), 256 MiB/s;
//! - `direct`: the default, O_DIRECT in 256 KiB blocks, 256 MiB/s.
//!
//! Prints p50/p99/p99.9/max sync latency per mode, the snapshot's time and
//! the CPU time of the thread that wrote it.
//! Files go under `COREKV_BENCH_DIR` if set, else the system temp directory.
//! Run: `cargo bench --bench snapshot_pacing`.

use corekv::cpu;

mod common;
use common::{bench_dir, env_u64, image};

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use corekv_node::snapshot::{self, Pacing, SnapshotMeta};
use corekv_node::state_machine::Image;
use corekv_wal::{
    remove_segments, EntryRef, SnapshotMarker, Wal, WalOptions, DEFAULT_RECYCLE_BYTES,
};
use hdrhistogram::Histogram;

/// Appends and syncs until `done` (or `for_at_least` passed, whichever is
/// later); the sync latencies.
fn sync_loop(wal: &mut Wal, done: &AtomicBool, for_at_least: Duration) -> Histogram<u64> {
    let mut latencies = Histogram::<u64>::new(3).expect("histogram");
    let data = vec![7u8; 4096];
    let started = Instant::now();
    while !done.load(Ordering::Relaxed) || started.elapsed() < for_at_least {
        let index = wal.last_index() + 1;
        let entry = EntryRef {
            index,
            term: 1,
            entry_type: 0,
            data: &data,
        };
        wal.append_entries_waiting(&[entry]).expect("append");
        let t = Instant::now();
        wal.sync().expect("sync");
        latencies
            .record(t.elapsed().as_micros() as u64)
            .expect("record");
        if index % 4096 == 0 {
            wal.wait_for_next_segment();
            wal.apply_snapshot_marker(SnapshotMarker { index, term: 1 })
                .expect("marker");
            wal.sync().expect("sync");
            remove_segments(wal.take_obsolete_segments(), DEFAULT_RECYCLE_BYTES).expect("remove");
        }
    }
    latencies
}

fn run(
    dir: &Path,
    name: &str,
    image: &Image,
    pacing: Option<Pacing>,
    alone_for: Duration,
) -> Duration {
    let mut wal = Wal::open(&dir.join(name), WalOptions::default()).expect("wal");
    let done = AtomicBool::new(pacing.is_none());
    let meta = SnapshotMeta {
        shard: 0,
        index: 1,
        term: 1,
        membership: corekv_proto::log::Membership {
            voters: vec![1],
            ..Default::default()
        },
    };
    let snap_dir = dir.join(format!("{name}-snap"));
    let (latencies, (took, cpu)) = std::thread::scope(|scope| {
        let writer = pacing.map(|pacing| {
            let (done, snap_dir, meta) = (&done, &snap_dir, &meta);
            scope.spawn(move || {
                let started = Instant::now();
                let cpu_before = cpu::cpu_seconds(libc::RUSAGE_THREAD);
                snapshot::write_paced(snap_dir, meta, image, pacing).expect("snapshot");
                done.store(true, Ordering::Relaxed);
                (
                    started.elapsed(),
                    cpu::cpu_seconds(libc::RUSAGE_THREAD) - cpu_before,
                )
            })
        });
        let latencies = sync_loop(
            &mut wal,
            &done,
            if pacing.is_none() {
                alone_for
            } else {
                Duration::ZERO
            },
        );
        let took = writer.map_or((alone_for, 0.0), |w| w.join().expect("writer"));
        (latencies, took)
    });
    let ms = |q: f64| latencies.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "{name:<8} {:>8} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>10.1} {:>10.2}",
        latencies.len(),
        ms(0.5),
        ms(0.99),
        ms(0.999),
        latencies.max() as f64 / 1000.0,
        took.as_secs_f64(),
        cpu
    );
    let _ = std::fs::remove_dir_all(dir.join(name));
    let _ = std::fs::remove_dir_all(&snap_dir);
    took
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let mib = env_u64("COREKV_BENCH_SNAPSHOT_MB", 512);
    let dir = bench_dir();
    eprintln!("building a state of {mib} MiB of 1 KiB values");
    let image = image(mib);
    println!("mode        syncs   p50 ms   p99 ms p99.9 ms   max ms  snapshot s  writer cpu s");
    run(
        dir.path(),
        "unpaced",
        &image,
        Some(Pacing::None),
        Duration::ZERO,
    );
    run(
        dir.path(),
        "chunks",
        &image,
        Some(Pacing::Chunks {
            chunk_bytes: corekv_node::snapshot::SNAPSHOT_WRITEBACK_CHUNK_BYTES,
            bytes_per_second: corekv_node::snapshot::SNAPSHOT_BYTES_PER_SECOND,
        }),
        Duration::ZERO,
    );
    let direct = run(
        dir.path(),
        "direct",
        &image,
        Some(Pacing::default()),
        Duration::ZERO,
    );
    // As long as the default writer took, so its p99 compares like with like.
    run(dir.path(), "alone", &image, None, direct);
}
