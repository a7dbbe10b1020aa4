//! WAL hot paths against the raw disk, in one run so the numbers compare:
//!
//! - `append_sync/wal/{1,16,256}`: append a batch of 256-byte entries, then
//!   sync (fdatasync of the mapped segment), as a shard does per Ready.
//! - `append_sync/pwrite_fdatasync/{1,16,256}`: the baseline, the same record
//!   bytes written with pwrite + fdatasync into a file preallocated
//!   (fallocate) to the segment size, moving to a fresh one when full.
//! - `append/wal/256`: append without sync (memcpy into the mapping), MB/s.
//!
//! After criterion, `interleaved_ratios` times WAL append+sync and the
//! baseline alternately, op by op, and prints the ratio of their medians:
//! on a shared machine the disk's speed drifts between criterion's
//! sequential benchmarks, and alternating cancels that drift out.
//! `reuse_ratios` does the same for a WAL whose new segments are reused
//! retired files against one that creates every segment (fallocate), and
//! then gives each the same appends alone to compare the CPU the process
//! spends (the segment preparer's page zeroing included).
//!
//! Files go to a temporary directory under `COREKV_BENCH_DIR` if set, else
//! the system temporary directory. Compaction (snapshot marker, deleting old
//! segments) runs between samples, outside the timed loop, so the disk does
//! not fill up.

use corekv::cpu;

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use corekv_wal::{
    remove_segments, EntryRef, SnapshotMarker, Wal, WalOptions, DEFAULT_RECYCLE_BYTES,
    DEFAULT_SEGMENT_BYTES,
};
use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};

const ENTRY_BYTES: usize = 256;
const BATCH_SIZES: [usize; 3] = [1, 16, 256];
/// Bytes of an entries record holding `batch` entries of ENTRY_BYTES, as the
/// WAL lays it out (len, crc, kind, first index, count, per entry term, type,
/// length and data; padded to 8): the baseline writes exactly this many.
fn record_bytes(batch: usize) -> usize {
    let body = 1 + 12 + batch * (13 + ENTRY_BYTES);
    (8 + body).div_ceil(8) * 8
}

fn bench_dir() -> tempfile::TempDir {
    match std::env::var_os("COREKV_BENCH_DIR") {
        Some(dir) => tempfile::tempdir_in(dir).expect("COREKV_BENCH_DIR is a writable directory"),
        None => tempfile::tempdir().expect("temporary directory"),
    }
}

/// Appends `batch` entries after the last one.
fn append(wal: &mut Wal, batch: usize, data: &[u8]) {
    let first = wal.last_index() + 1;
    let entries: Vec<EntryRef<'_>> = (0..batch as u64)
        .map(|i| EntryRef {
            index: first + i,
            term: 1,
            entry_type: 0,
            data,
        })
        .collect();
    wal.append_entries_waiting(&entries).expect("append");
    // So a marker written next never finds the next segment unprepared.
    wal.wait_for_next_segment();
}

/// Drops everything appended so far and deletes the covered segments.
fn compact(wal: &mut Wal) {
    let index = wal.last_index();
    wal.apply_snapshot_marker(SnapshotMarker { index, term: 1 })
        .expect("marker");
    wal.sync().expect("sync");
    remove_segments(wal.take_obsolete_segments(), DEFAULT_RECYCLE_BYTES).expect("remove segments");
}

/// A preallocated file written with pwrite + fdatasync, the way a WAL
/// without a mapping would write.
struct Baseline {
    dir: std::path::PathBuf,
    file: File,
    offset: u64,
    files: u64,
}

impl Baseline {
    fn new(dir: &Path) -> Baseline {
        let dir = dir.join("baseline");
        std::fs::create_dir_all(&dir).unwrap();
        let file = Self::preallocated(&dir, 0);
        Baseline {
            dir,
            file,
            offset: 0,
            files: 1,
        }
    }

    fn preallocated(dir: &Path, n: u64) -> File {
        let path = dir.join(format!("{n:016}.raw"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        // SAFETY: plain syscall on an open descriptor.
        let rc = unsafe {
            libc::posix_fallocate(file.as_raw_fd(), 0, DEFAULT_SEGMENT_BYTES as libc::off_t)
        };
        assert_eq!(rc, 0, "posix_fallocate {}", path.display());
        file
    }

    fn write_and_sync(&mut self, bytes: &[u8]) {
        if self.offset + bytes.len() as u64 > DEFAULT_SEGMENT_BYTES {
            let old = self.dir.join(format!("{:016}.raw", self.files - 1));
            self.file = Self::preallocated(&self.dir, self.files);
            std::fs::remove_file(old).unwrap();
            self.files += 1;
            self.offset = 0;
        }
        self.file.write_all_at(bytes, self.offset).unwrap();
        self.file.sync_data().unwrap();
        self.offset += bytes.len() as u64;
    }
}

fn append_sync(c: &mut Criterion) {
    let dir = bench_dir();
    let data = vec![0xa5u8; ENTRY_BYTES];
    let mut group = c.benchmark_group("append_sync");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(6));
    for batch in BATCH_SIZES {
        group.throughput(Throughput::Bytes((batch * ENTRY_BYTES) as u64));
        let wal_dir = dir.path().join(format!("wal-{batch}"));
        let mut wal = Wal::open(&wal_dir, WalOptions::default()).expect("open");
        group.bench_function(BenchmarkId::new("wal", batch), |b| {
            b.iter_custom(|iterations| {
                let start = Instant::now();
                for _ in 0..iterations {
                    append(&mut wal, batch, &data);
                    wal.sync().expect("sync");
                }
                let elapsed = start.elapsed();
                compact(&mut wal);
                elapsed
            })
        });
        drop(wal);
        let record = vec![0xa5u8; record_bytes(batch)];
        let mut baseline = Baseline::new(dir.path());
        group.bench_function(BenchmarkId::new("pwrite_fdatasync", batch), |b| {
            b.iter(|| baseline.write_and_sync(&record))
        });
    }
    group.finish();
}

fn append_only(c: &mut Criterion) {
    let dir = bench_dir();
    let data = vec![0xa5u8; ENTRY_BYTES];
    let batch = 256;
    let mut wal = Wal::open(&dir.path().join("wal-append"), WalOptions::default()).expect("open");
    let mut group = c.benchmark_group("append");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(4));
    group.throughput(Throughput::Bytes((batch * ENTRY_BYTES) as u64));
    group.bench_function(BenchmarkId::new("wal", batch), |b| {
        b.iter_custom(|iterations| {
            let start = Instant::now();
            for _ in 0..iterations {
                append(&mut wal, batch, &data);
            }
            let elapsed = start.elapsed();
            compact(&mut wal);
            elapsed
        })
    });
    group.finish();
}

fn median_us(mut samples: Vec<Duration>) -> f64 {
    samples.sort();
    samples[samples.len() / 2].as_secs_f64() * 1e6
}

/// Alternates one WAL append+sync and one baseline pwrite+fdatasync of the
/// same bytes, per batch size, and prints the medians and their ratio.
fn interleaved_ratios() {
    const ROUNDS: usize = 300;
    let dir = bench_dir();
    let data = vec![0xa5u8; ENTRY_BYTES];
    println!("\ninterleaved medians over {ROUNDS} rounds (baseline / wal >= 0.9 is the target):");
    for batch in BATCH_SIZES {
        let mut wal = Wal::open(
            &dir.path().join(format!("ratio-{batch}")),
            WalOptions::default(),
        )
        .expect("open");
        let mut baseline = Baseline::new(&dir.path().join(format!("ratio-baseline-{batch}")));
        let record = vec![0xa5u8; record_bytes(batch)];
        let (mut wal_times, mut baseline_times) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            let start = Instant::now();
            append(&mut wal, batch, &data);
            wal.sync().expect("sync");
            wal_times.push(start.elapsed());
            let start = Instant::now();
            baseline.write_and_sync(&record);
            baseline_times.push(start.elapsed());
        }
        let (wal_us, baseline_us) = (median_us(wal_times), median_us(baseline_times));
        println!(
            "  batch {batch:>3} x {ENTRY_BYTES} B: wal append+sync {wal_us:>8.1} us, pwrite+fdatasync {baseline_us:>8.1} us, ratio {:.2}",
            baseline_us / wal_us
        );
    }
}

/// New segments from retired files (`recycle_bytes`) against new files
/// (`recycle_bytes` 0): append+sync latency alternately (batches of 16, a
/// rotation every ~1,000 ops), then CPU per op of each alone (batches of
/// 256, 70 KB: a rotation every ~60 ops, so segment creation weighs as it
/// does under a heavy write load). 4 MiB segments; both logs are compacted
/// every 512 ops, outside the timing, as snapshots would.
fn reuse_ratios() {
    const ROUNDS: usize = 4096;
    const SEGMENT_BYTES: u64 = 4 << 20;
    const BATCH: usize = 16;
    const CPU_BATCH: usize = 256;
    let dir = bench_dir();
    let data = vec![0xa5u8; ENTRY_BYTES];
    let open = |name: &str, recycle_bytes: u64| {
        let options = WalOptions {
            segment_bytes: SEGMENT_BYTES,
            recycle_bytes,
            ..WalOptions::default()
        };
        Wal::open(&dir.path().join(name), options).expect("open")
    };
    let mut fresh = open("fresh", 0);
    let mut reused = open("reused", 64 * SEGMENT_BYTES);
    // Give the reusing log its free files, as a node has after its first
    // snapshots.
    for _ in 0..2048 {
        append(&mut reused, BATCH, &data);
    }
    compact(&mut reused);
    let op = |wal: &mut Wal, batch: usize| {
        let start = Instant::now();
        append(wal, batch, &data);
        wal.sync().expect("sync");
        start.elapsed()
    };
    let (mut fresh_times, mut reused_times) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        fresh_times.push(op(&mut fresh, BATCH));
        reused_times.push(op(&mut reused, BATCH));
        if round % 512 == 511 {
            compact(&mut fresh);
            compact(&mut reused);
        }
    }
    let p99_us = |mut samples: Vec<Duration>| {
        samples.sort();
        samples[samples.len() * 99 / 100].as_secs_f64() * 1e6
    };
    let (fresh_p99, reused_p99) = (p99_us(fresh_times.clone()), p99_us(reused_times.clone()));
    let (fresh_us, reused_us) = (median_us(fresh_times), median_us(reused_times));
    println!(
        "\nsegment reuse, interleaved over {ROUNDS} rounds of {BATCH} x {ENTRY_BYTES} B append+sync:\n  \
         new files: median {fresh_us:.1} us, p99 {fresh_p99:.1} us\n  \
         reused files: median {reused_us:.1} us, p99 {reused_p99:.1} us\n  \
         new / reused: median {:.2}, p99 {:.2}",
        fresh_us / reused_us,
        fresh_p99 / reused_p99
    );
    let cpu_per_op = |wal: &mut Wal| {
        let start = cpu::cpu_seconds(libc::RUSAGE_SELF);
        for round in 0..ROUNDS {
            op(wal, CPU_BATCH);
            if round % 512 == 511 {
                compact(wal);
            }
        }
        // The next segment is prepared ahead: count the work it did too.
        wal.wait_for_next_segment();
        (cpu::cpu_seconds(libc::RUSAGE_SELF) - start) * 1e6 / ROUNDS as f64
    };
    let (fresh_cpu, reused_cpu) = (cpu_per_op(&mut fresh), cpu_per_op(&mut reused));
    println!(
        "  process CPU per {CPU_BATCH} x {ENTRY_BYTES} B append+sync, each alone: new files {fresh_cpu:.1} us, reused files {reused_cpu:.1} us, ratio {:.2}",
        fresh_cpu / reused_cpu
    );
}

criterion_group!(benches, append_sync, append_only);

fn main() {
    benches();
    interleaved_ratios();
    reuse_ratios();
    Criterion::default().configure_from_args().final_summary();
}
