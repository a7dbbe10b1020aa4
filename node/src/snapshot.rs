//! State-machine snapshot files.
//!
//! A snapshot is written off the shard thread from an immutable view of the
//! map (a `layered_map::Map` clone is O(1) and shares its base), fsynced, and
//! renamed into place; only then may the WAL drop the entries it covers.
//!
//! File `snap/{index:020}-{term:020}.snap`, all integers little-endian:
//!
//! ```text
//! offset  size  field
//! 0       8     MAGIC "CKVSNAP1"
//! 8       4     FORMAT_VERSION
//! 12      4     shard
//! 16      8     index   (last log index the snapshot covers)
//! 24      8     term    (term of that entry)
//! 32      4     voter count V, then V x u64 voter ids
//! ..      4     learner count L, then L x u64 learner ids
//! ..      8     pair count N
//! ..            N x { key_len u32 | key | value_len u32 | value | version u64 }
//!               in any order (earlier builds wrote them in key order;
//!               they are now in the order of the map's hash index)
//! ..      8     session count S                                (version 2 on)
//! ..            S x { id u64 | last_used u64 | acked_below u64 (version 4 on) |
//!                     result count R u32 |
//!                     R x { sequence u64 | len u32 | client.proto Response } }
//! ..      4     membership length M                            (version 3 on)
//! ..      M     log.proto Membership: the whole configuration (joint
//!               included), every member's addresses, the removed ids
//! end-4   4     crc32 (crc32fast) of every byte before it
//! ```
//!
//! Version 1 files (no sessions), version 2 files (no membership beyond the
//! voter and learner ids) and version 3 files (no acknowledged mark per
//! session: read as 0) are still read.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use bytes::{Buf, Bytes};

use corekv_proto::client::Response;
use prost::Message as _;

use corekv_proto::log::Membership;
use corekv_wal::{remove_in_steps, AlignedBuf, DIRECT_ALIGN};

use crate::layered_map::Builder as MapBuilder;
use crate::progress::{Progress, Unit};
use crate::sessions::{Session, Sessions};
use crate::state_machine::{Image, Key, Versioned};

/// First bytes of every snapshot file.
pub const MAGIC: &[u8; 8] = b"CKVSNAP1";
/// Version of the layout above.
pub const FORMAT_VERSION: u32 = 4;
/// The version before sessions, still read.
const FORMAT_VERSION_WITHOUT_SESSIONS: u32 = 1;
/// The version before the membership record, still read.
const FORMAT_VERSION_WITHOUT_MEMBERSHIP: u32 = 2;
/// The version before each session's acknowledged mark, still read.
const FORMAT_VERSION_WITHOUT_ACKED_MARK: u32 = 3;
/// Upper bound on the membership record read from a snapshot.
const MAX_MEMBERSHIP_BYTES: u32 = 1 << 20;
/// Upper bound on the sessions and results read from one snapshot.
const MAX_SESSIONS_READ: u64 = 1 << 20;
/// Bytes of the trailing checksum.
pub const CHECKSUM_LEN: usize = 4;
/// Snapshot files kept on disk (the newest ones); older are deleted.
pub const SNAPSHOTS_KEPT: usize = 2;
/// Upper bound on one key or value inside a snapshot (sanity check on read).
const MAX_ITEM_BYTES: u32 = 64 << 20;

/// What a snapshot covers.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SnapshotMeta {
    /// Shard it belongs to.
    pub shard: u32,
    /// Last log index covered.
    pub index: u64,
    /// Term of that entry.
    pub term: u64,
    /// The shard's membership at that index.
    pub membership: Membership,
}

/// Why a snapshot could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// An I/O call failed.
    #[error("snapshot {path}: {op} failed: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid snapshot.
    #[error("snapshot {path} is corrupt at offset {offset}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Where decoding stopped (the damage is there or before it); where
        /// the checksum sits if only the checksum disagrees.
        offset: u64,
        /// What is wrong, with expected and actual values.
        reason: String,
    },
}

fn io<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// File name of a snapshot.
pub fn file_name(index: u64, term: u64) -> String {
    format!("{index:020}-{term:020}.snap")
}

/// How a snapshot file reaches the disk while it is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pacing {
    /// Every `chunk_bytes` written start their writeback, and wait for the
    /// chunk before them to be on disk: at most two chunks are dirty, so the
    /// WAL's fdatasync never queues behind a gigabyte of snapshot pages and
    /// the final fsync has little left to do.
    Chunks {
        /// Bytes per writeback chunk.
        chunk_bytes: u64,
        /// At most this many bytes per second (0: as fast as the disk
        /// takes them), so the WAL keeps most of the disk's bandwidth.
        bytes_per_second: u64,
    },
    /// Leave writeback to the kernel until the final fsync (for comparison).
    None,
    /// Write around the page cache (O_DIRECT), one aligned 256 KiB block at a
    /// time, at most `bytes_per_second`. Nothing is dirty, and the CPU the
    /// kernel spends copying a gigabyte into page-cache pages (a quarter of
    /// a node's CPU under a 1 GB state's write load, measured with perf) is
    /// not spent. Where the file system refuses O_DIRECT (tmpfs), `Chunks`
    /// at the same rate instead.
    Direct {
        /// At most this many bytes per second (0: as fast as the disk
        /// takes them).
        bytes_per_second: u64,
    },
}

impl Default for Pacing {
    fn default() -> Self {
        Pacing::Direct {
            bytes_per_second: SNAPSHOT_BYTES_PER_SECOND,
        }
    }
}

/// Block written at once by `Pacing::Direct` (a multiple of any logical
/// block size). A WAL fdatasync can queue behind one in the device: with
/// 1 MiB blocks the WAL's sync p99 during a snapshot was 3.1-3.5x its p99
/// without one, with 256 KiB 1.5x (`cargo bench --bench snapshot_pacing`,
/// 1 GiB, two runs each), for 0.4 s of writer CPU per GiB instead of 0.25.
const DIRECT_BLOCK_BYTES: usize = 256 << 10;
/// A file opened with O_DIRECT, written in aligned blocks (see
/// `Pacing::Direct`).
struct DirectFile {
    file: File,
    buf: AlignedBuf,
    /// Bytes in `buf`.
    filled: usize,
    /// Bytes already in the file.
    written: u64,
    bytes_per_second: u64,
    began: std::time::Instant,
    /// crc32 of the bytes already in the file.
    hasher: crc32fast::Hasher,
}

impl DirectFile {
    fn write_block(&mut self, len: usize) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt as _;
        let block = &self.buf.as_mut_slice()[..len];
        self.file.write_all_at(block, self.written)?;
        self.written += len as u64;
        // This runs on the shard's helper thread, never the shard's.
        if let Some(ahead) = ahead_of_rate(self.written, self.bytes_per_second, self.began) {
            std::thread::sleep(ahead);
        }
        Ok(())
    }

    /// Writes what is buffered (padded to the alignment), cuts the padding
    /// off and syncs the file.
    fn finish(mut self) -> std::io::Result<File> {
        if self.filled > 0 {
            let len = self.filled.next_multiple_of(DIRECT_ALIGN);
            let real = self.written + self.filled as u64;
            self.buf.as_mut_slice()[self.filled..len].fill(0);
            self.write_block(len)?;
            self.file.set_len(real)?;
        }
        self.file.sync_all()?;
        Ok(self.file)
    }
}

impl Write for DirectFile {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let room = DIRECT_BLOCK_BYTES - self.filled;
        let n = data.len().min(room);
        self.buf.as_mut_slice()[self.filled..self.filled + n].copy_from_slice(&data[..n]);
        self.filled += n;
        if self.filled == DIRECT_BLOCK_BYTES {
            self.hasher.update(self.buf.as_slice());
            self.write_block(DIRECT_BLOCK_BYTES)?;
            self.filled = 0;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Where a snapshot's bytes go: around the page cache, or through it.
enum SnapshotSink {
    Direct(DirectFile),
    Buffered(BufWriter<PacedFile>),
}

impl SnapshotSink {
    /// Creates `tmp` for `pacing`: O_DIRECT for `Direct` where the file
    /// system takes it.
    fn create(tmp: &Path, pacing: Pacing) -> Result<SnapshotSink, SnapshotError> {
        let open = |flags: i32| {
            use std::os::unix::fs::OpenOptionsExt as _;
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .custom_flags(flags)
                .open(tmp)
        };
        let buffered = |file, pacing| {
            SnapshotSink::Buffered(BufWriter::with_capacity(
                1 << 20,
                PacedFile {
                    file,
                    pacing,
                    written: 0,
                    started: 0,
                    began: std::time::Instant::now(),
                    hasher: crc32fast::Hasher::new(),
                },
            ))
        };
        match pacing {
            Pacing::Direct { bytes_per_second } => match open(libc::O_DIRECT) {
                Ok(file) => Ok(SnapshotSink::Direct(DirectFile {
                    file,
                    buf: AlignedBuf::new(DIRECT_BLOCK_BYTES),
                    filled: 0,
                    written: 0,
                    bytes_per_second,
                    began: std::time::Instant::now(),
                    hasher: crc32fast::Hasher::new(),
                })),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    let file = open(0).map_err(io(tmp, "create"))?;
                    Ok(buffered(
                        file,
                        Pacing::Chunks {
                            chunk_bytes: SNAPSHOT_WRITEBACK_CHUNK_BYTES,
                            bytes_per_second,
                        },
                    ))
                }
                Err(e) => Err(io(tmp, "create")(e)),
            },
            pacing => Ok(buffered(open(0).map_err(io(tmp, "create"))?, pacing)),
        }
    }

    /// crc32 of every byte written so far. Hashed a buffer at a time as it
    /// leaves for the file, not per write: a pair is five writes, four of
    /// them of 4-8 bytes, where crc32fast falls back to its table-driven
    /// path (8 % of a snapshot writer's samples, perf during BIGVAL).
    fn crc(&self) -> u32 {
        let (mut hasher, pending) = match self {
            SnapshotSink::Direct(direct) => (
                direct.hasher.clone(),
                &direct.buf.as_slice()[..direct.filled],
            ),
            SnapshotSink::Buffered(buffered) => {
                (buffered.get_ref().hasher.clone(), buffered.buffer())
            }
        };
        hasher.update(pending);
        hasher.finalize()
    }

    /// Everything written reaches the file, which is then synced.
    fn finish(self) -> std::io::Result<File> {
        match self {
            SnapshotSink::Direct(direct) => direct.finish(),
            SnapshotSink::Buffered(buffered) => {
                let file = buffered.into_inner().map_err(|e| e.into_error())?.file;
                file.sync_all()?;
                Ok(file)
            }
        }
    }
}

impl Write for SnapshotSink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        match self {
            SnapshotSink::Direct(direct) => direct.write(data),
            SnapshotSink::Buffered(buffered) => buffered.write(data),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            SnapshotSink::Direct(direct) => direct.flush(),
            SnapshotSink::Buffered(buffered) => buffered.flush(),
        }
    }
}

/// Writeback chunk of a snapshot file (as RocksDB's `bytes_per_sync`).
pub const SNAPSHOT_WRITEBACK_CHUNK_BYTES: u64 = 1 << 20;

/// Default rate of a snapshot write: a 1 GiB state takes 4 s.
pub const SNAPSHOT_BYTES_PER_SECOND: u64 = 256 << 20;

/// How far `done` bytes since `began` are ahead of `bytes_per_second` (0:
/// no limit): the wait that brings a paced writer back to its rate.
pub fn ahead_of_rate(
    done: u64,
    bytes_per_second: u64,
    began: std::time::Instant,
) -> Option<std::time::Duration> {
    if bytes_per_second == 0 {
        return None;
    }
    let due = std::time::Duration::from_secs_f64(done as f64 / bytes_per_second as f64);
    due.checked_sub(began.elapsed())
}

/// Starts writeback of the `chunk_bytes` at `start` of the file `fd`, after
/// waiting for the chunk before it to be on disk: so at most two chunks of a
/// file written in order are dirty. Blocking (it waits for the disk): call it
/// off the shard thread. Errors are left to the file's final fsync, which
/// reports them with the file's name.
pub fn writeback_chunk(fd: std::os::fd::RawFd, start: u64, chunk_bytes: u64) {
    if start >= chunk_bytes {
        // SAFETY: plain syscall on a descriptor the caller keeps open.
        unsafe {
            libc::sync_file_range(
                fd,
                (start - chunk_bytes) as libc::off64_t,
                chunk_bytes as libc::off64_t,
                libc::SYNC_FILE_RANGE_WAIT_BEFORE
                    | libc::SYNC_FILE_RANGE_WRITE
                    | libc::SYNC_FILE_RANGE_WAIT_AFTER,
            )
        };
    }
    // SAFETY: as above.
    unsafe {
        libc::sync_file_range(
            fd,
            start as libc::off64_t,
            chunk_bytes as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
}

/// A file whose dirty pages are bounded by `Pacing`.
struct PacedFile {
    file: File,
    pacing: Pacing,
    written: u64,
    /// Bytes whose writeback has been started.
    started: u64,
    /// When writing began, for the byte rate.
    began: std::time::Instant,
    /// crc32 of the bytes written.
    hasher: crc32fast::Hasher,
}

impl PacedFile {
    fn pace(&mut self) {
        let Pacing::Chunks {
            chunk_bytes,
            bytes_per_second,
        } = self.pacing
        else {
            return;
        };
        use std::os::fd::AsRawFd as _;
        let fd = self.file.as_raw_fd();
        while self.written - self.started >= chunk_bytes {
            writeback_chunk(fd, self.started, chunk_bytes);
            self.started += chunk_bytes;
            // This runs on the shard's helper thread, never the shard's.
            if let Some(ahead) = ahead_of_rate(self.started, bytes_per_second, self.began) {
                std::thread::sleep(ahead);
            }
        }
    }
}

impl Write for PacedFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        self.pace();
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Writes `image` as the snapshot `meta` into `dir`, durably (fsync of the
/// file, rename, fsync of the directory), with the default [`Pacing`].
/// Blocking: call it off the shard thread. Returns the file's path.
pub fn write(dir: &Path, meta: &SnapshotMeta, image: &Image) -> Result<PathBuf, SnapshotError> {
    write_paced(dir, meta, image, Pacing::default())
}

/// [`write`](fn@write) with a chosen [`Pacing`].
pub fn write_paced(
    dir: &Path,
    meta: &SnapshotMeta,
    image: &Image,
    pacing: Pacing,
) -> Result<PathBuf, SnapshotError> {
    let map = &image.map;
    fs::create_dir_all(dir).map_err(io(dir, "create dir"))?;
    let path = dir.join(file_name(meta.index, meta.term));
    let tmp = dir.join(format!("{}.tmp", file_name(meta.index, meta.term)));
    let mut out = SnapshotSink::create(&tmp, pacing)?;
    let write_all =
        |out: &mut SnapshotSink, bytes: &[u8]| out.write_all(bytes).map_err(io(&tmp, "write"));
    write_all(&mut out, MAGIC)?;
    write_all(&mut out, &FORMAT_VERSION.to_le_bytes())?;
    write_all(&mut out, &meta.shard.to_le_bytes())?;
    write_all(&mut out, &meta.index.to_le_bytes())?;
    write_all(&mut out, &meta.term.to_le_bytes())?;
    for ids in [&meta.membership.voters, &meta.membership.learners] {
        write_all(&mut out, &(ids.len() as u32).to_le_bytes())?;
        for id in ids {
            write_all(&mut out, &id.to_le_bytes())?;
        }
    }
    write_all(&mut out, &(map.len() as u64).to_le_bytes())?;
    // In no order: the key order would cost a hash lookup per key, and the
    // reader builds the order itself (see `Map::iter_unordered`).
    let pairs = map.iter_unordered();
    // The values lie anywhere in the heap, so copying one waits for memory:
    // a second walk, PREFETCH_AHEAD pairs in front, asks for each value's
    // first bytes before the copy needs them.
    let mut ahead = pairs.clone().skip(PREFETCH_AHEAD);
    for (key, v) in pairs {
        if let Some((_, next)) = ahead.next() {
            prefetch(&next.value);
        }
        let key = key.as_slice();
        write_all(&mut out, &(key.len() as u32).to_le_bytes())?;
        write_all(&mut out, key)?;
        write_all(&mut out, &(v.value.len() as u32).to_le_bytes())?;
        write_all(&mut out, &v.value)?;
        write_all(&mut out, &v.version.to_le_bytes())?;
    }
    write_all(&mut out, &(image.sessions.len() as u64).to_le_bytes())?;
    for (id, session) in image.sessions.iter() {
        write_all(&mut out, &id.to_le_bytes())?;
        write_all(&mut out, &session.last_used.to_le_bytes())?;
        write_all(&mut out, &session.acked_below.to_le_bytes())?;
        write_all(&mut out, &(session.results().len() as u32).to_le_bytes())?;
        for (sequence, result) in session.results() {
            let encoded = Response {
                id: 0,
                result: Some(result.clone()),
            }
            .encode_to_vec();
            write_all(&mut out, &sequence.to_le_bytes())?;
            write_all(&mut out, &(encoded.len() as u32).to_le_bytes())?;
            write_all(&mut out, &encoded)?;
        }
    }
    let membership = meta.membership.encode_to_vec();
    write_all(&mut out, &(membership.len() as u32).to_le_bytes())?;
    write_all(&mut out, &membership)?;
    let crc = out.crc();
    write_all(&mut out, &crc.to_le_bytes())?;
    let file = out.finish().map_err(io(&tmp, "write out and fsync"))?;
    drop(file);
    fs::rename(&tmp, &path).map_err(io(&path, "rename"))?;
    sync_dir(dir)?;
    Ok(path)
}

/// How many pairs ahead of the one being written the writer prefetches.
const PREFETCH_AHEAD: usize = 8;
/// Bytes of a value prefetched: a 1 KiB value whole; the hardware
/// prefetcher follows a longer one.
const PREFETCH_BYTES: usize = 1024;

/// Asks the CPU to bring the start of `value` into its cache (a hint: no
/// fault, no wait).
fn prefetch(value: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for offset in (0..value.len().min(PREFETCH_BYTES)).step_by(64) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: SSE is part of x86_64's baseline, and a prefetch reads
        // nothing the program sees (the address is in `value` anyway).
        unsafe { _mm_prefetch::<_MM_HINT_T0>(value[offset..].as_ptr().cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

/// fsync of a directory, so a rename or unlink in it is durable.
pub fn sync_dir(dir: &Path) -> Result<(), SnapshotError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir, "fsync dir"))
}

/// Reads and verifies a snapshot file. The file is read in 1 MiB steps
/// while it is decoded: a restart of a node holding N bytes needs N for the
/// state, not 2N with the file's bytes beside it. The checksum is checked at
/// the end; nothing decoded is used before it is.
pub fn read(path: &Path) -> Result<(SnapshotMeta, Image), SnapshotError> {
    read_with(path, None)
}

/// [`read`], with progress lines on `shard` naming the work `what` (see
/// [`Progress`]).
pub fn read_logged(
    shard: u32,
    what: &str,
    path: &Path,
) -> Result<(SnapshotMeta, Image), SnapshotError> {
    read_with(path, Some((shard, what)))
}

/// Pairs the decoding thread hands to the inserting one at a time.
const LOAD_BATCH_PAIRS: usize = 4096;

/// Batches in flight between the two: how far the decoder may run ahead
/// (4 x 4096 pairs of 1 KiB: 16 MiB).
const LOAD_BATCHES_IN_FLIGHT: usize = 4;

/// Reads a whole snapshot into memory on two threads: this one builds the
/// map while a scoped second one reads, checksums and decodes the file,
/// allocating every value. At 1 GB both halves take seconds, much of it
/// first touches of new memory; the restart of a 1 GB node waits for them.
/// Where the second thread cannot start, this thread does everything.
fn read_with(
    path: &Path,
    report: Option<(u32, &str)>,
) -> Result<(SnapshotMeta, Image), SnapshotError> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<(Key, Versioned)>>(LOAD_BATCHES_IN_FLIGHT);
    std::thread::scope(|scope| {
        let decoder = std::thread::Builder::new()
            .name("corekv-snap-read".into())
            .spawn_scoped(scope, move || {
                let mut batcher = Batcher {
                    tx,
                    batch: Vec::with_capacity(LOAD_BATCH_PAIRS),
                    sessions: Vec::new(),
                };
                let meta = visit_with(path, report, &mut batcher);
                batcher.send();
                (meta, batcher.sessions)
            });
        let mut image = ImageBuilder::default();
        let Ok(decoder) = decoder else {
            let meta = visit_with(path, report, &mut image)?;
            return Ok((meta, image.finish()));
        };
        // Ends when the decoder is done (or stopped) and dropped its sender.
        for batch in rx {
            for (key, value) in batch {
                image.insert(key, value);
            }
        }
        let (meta, sessions) = decoder
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        let meta = meta?;
        image.sessions = sessions;
        Ok((meta, image.finish()))
    })
}

/// A decoded pair as the map stores it: the value keeps its allocation.
fn decoded_pair(key: &[u8], value: Vec<u8>, version: u64) -> (Key, Versioned) {
    let value = Bytes::from(value);
    (Key::from_slice(key), Versioned { value, version })
}

/// The decoding thread's visitor: pairs go to the inserting thread in
/// batches, sessions (few, small) are kept and returned at the end.
struct Batcher {
    tx: std::sync::mpsc::SyncSender<Vec<(Key, Versioned)>>,
    batch: Vec<(Key, Versioned)>,
    sessions: Vec<(u64, Session)>,
}

impl Batcher {
    fn send(&mut self) {
        if !self.batch.is_empty() {
            let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(LOAD_BATCH_PAIRS));
            // Fails only if the inserting thread is gone, which it is not
            // while the scope lives.
            let _ = self.tx.send(batch);
        }
    }
}

impl Visitor for Batcher {
    fn header(&mut self, _: &SnapshotMeta, _: u32, _: u64) {}

    fn pair(&mut self, key: &[u8], value: Vec<u8>, version: u64) {
        self.batch.push(decoded_pair(key, value, version));
        if self.batch.len() == LOAD_BATCH_PAIRS {
            self.send();
        }
    }

    fn session(&mut self, id: u64, session: Session, _: u64) {
        self.sessions.push((id, session));
    }
}

/// Reads and verifies a snapshot file in 1 MiB steps, handing each part to
/// `visitor` as it is decoded and keeping nothing: for a reader that looks
/// at a snapshot larger than it wants in memory (`corekv debug snapshot`).
/// Returns the metadata, membership included.
pub fn visit(path: &Path, visitor: &mut impl Visitor) -> Result<SnapshotMeta, SnapshotError> {
    visit_with(path, None, visitor)
}

fn visit_with(
    path: &Path,
    report: Option<(u32, &str)>,
    visitor: &mut impl Visitor,
) -> Result<SnapshotMeta, SnapshotError> {
    let file = File::open(path).map_err(io(path, "open"))?;
    let len = file.metadata().map_err(io(path, "stat"))?.len();
    let mut progress = report.map(|(shard, what)| Progress::new(shard, what, Unit::Bytes, len));
    let reader = std::io::BufReader::with_capacity(1 << 20, file);
    let decoded = decode_from(path, reader, len, progress.as_mut(), visitor);
    if let (Ok(_), Some(progress)) = (&decoded, &mut progress) {
        progress.finish();
    }
    decoded
}

/// Verifies and decodes snapshot bytes (`path` only names them in errors).
pub fn decode(path: &Path, bytes: Bytes) -> Result<(SnapshotMeta, Image), SnapshotError> {
    let len = bytes.len() as u64;
    let mut image = ImageBuilder::default();
    let meta = decode_from(path, bytes.reader(), len, None, &mut image)?;
    Ok((meta, image.finish()))
}

/// What [`visit`] hands a reader, part by part in file order. The checksum
/// covers the whole file and is read last: until `visit` returns Ok,
/// nothing handed over is verified, so a visitor may show it but must not
/// act on it.
pub trait Visitor {
    /// The header, before any pair: shard, index, term and the voter and
    /// learner ids in `meta` (format 3's whole membership comes at the end,
    /// in what `visit` returns), the file's format version and its pair count.
    fn header(&mut self, meta: &SnapshotMeta, format_version: u32, pairs: u64);
    /// One pair, in the file's order (any, see the format above).
    fn pair(&mut self, key: &[u8], value: Vec<u8>, version: u64);
    /// One exactly-once session, and the bytes it takes in the file.
    fn session(&mut self, id: u64, session: Session, bytes: u64);
}

/// The visitor that keeps everything: the state a node restores.
#[derive(Default)]
struct ImageBuilder {
    map: MapBuilder,
    sessions: Vec<(u64, Session)>,
    bytes: u64,
}

impl ImageBuilder {
    fn insert(&mut self, key: Key, value: Versioned) {
        self.bytes += crate::state_machine::pair_bytes(key.as_slice().len(), value.value.len());
        self.map.insert(key, value);
    }

    fn finish(self) -> Image {
        Image {
            map: self.map.finish(),
            sessions: Sessions::from_sessions(self.sessions),
            bytes: self.bytes,
        }
    }
}

impl Visitor for ImageBuilder {
    fn header(&mut self, _: &SnapshotMeta, _: u32, _: u64) {}

    fn pair(&mut self, key: &[u8], value: Vec<u8>, version: u64) {
        let (key, value) = decoded_pair(key, value, version);
        self.insert(key, value);
    }

    fn session(&mut self, id: u64, session: Session, _: u64) {
        self.sessions.push((id, session));
    }
}

/// Pairs decoded between two looks at the clock for progress lines.
const PAIRS_PER_PROGRESS_CHECK: u64 = 16 * 1024;

/// Why decoding stopped: the file is not what it should be, or reading it
/// failed.
enum Stop {
    Corrupt(String),
    Io(std::io::Error),
}

/// The body of a snapshot file (everything before the checksum), read in
/// order through the checksum.
struct Body<R: Read> {
    reader: R,
    /// Body bytes not read yet.
    remaining: u64,
    hasher: crc32fast::Hasher,
}

impl<R: Read> Body<R> {
    fn need(&self, n: u64, what: &str) -> Result<(), Stop> {
        if self.remaining < n {
            return Err(Stop::Corrupt(format!(
                "truncated in {what}: need {n} bytes, {} left",
                self.remaining
            )));
        }
        Ok(())
    }

    fn fill(&mut self, buf: &mut [u8]) -> Result<(), Stop> {
        self.reader.read_exact(buf).map_err(Stop::Io)?;
        self.hasher.update(buf);
        self.remaining -= buf.len() as u64;
        Ok(())
    }

    fn u32(&mut self) -> Result<u32, Stop> {
        let mut b = [0u8; 4];
        self.fill(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self) -> Result<u64, Stop> {
        let mut b = [0u8; 8];
        self.fill(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// `n` bytes, checked against what is left first.
    fn bytes(&mut self, n: usize, what: &str) -> Result<Vec<u8>, Stop> {
        self.need(n as u64, what)?;
        let mut v = vec![0u8; n];
        self.fill(&mut v)?;
        Ok(v)
    }

    /// Reads what is left of the body (after a decoding error), so the
    /// checksum can say whether the file was damaged.
    fn drain(&mut self) -> Result<(), Stop> {
        let mut buf = vec![0u8; 64 << 10];
        while self.remaining > 0 {
            let n = (self.remaining as usize).min(buf.len());
            self.fill(&mut buf[..n])?;
        }
        Ok(())
    }
}

fn decode_from<R: Read>(
    path: &Path,
    reader: R,
    len: u64,
    progress: Option<&mut Progress>,
    visitor: &mut impl Visitor,
) -> Result<SnapshotMeta, SnapshotError> {
    let corrupt = |offset: u64, reason: String| SnapshotError::Corrupt {
        path: path.to_path_buf(),
        offset,
        reason,
    };
    let min_len = (MAGIC.len() + 4 + 4 + 8 + 8 + 4 + 4 + 8 + CHECKSUM_LEN) as u64;
    if len < min_len {
        return Err(corrupt(
            0,
            format!("length {len} is below the minimum {min_len}"),
        ));
    }
    let body_len = len - CHECKSUM_LEN as u64;
    let mut body = Body {
        reader,
        remaining: body_len,
        hasher: crc32fast::Hasher::new(),
    };
    let decoded = decode_body(&mut body, len, progress, visitor);
    let stopped_at = body_len - body.remaining;
    // A damaged file is reported as such, even where it also fails to
    // decode: read the rest, then compare checksums.
    let drained = match &decoded {
        Err(Stop::Corrupt(_)) => body.drain(),
        _ => Ok(()),
    };
    let checked = drained.and_then(|()| {
        let actual = body.hasher.clone().finalize();
        let mut b = [0u8; 4];
        body.reader.read_exact(&mut b).map_err(Stop::Io)?;
        let expected = u32::from_le_bytes(b);
        if expected != actual {
            return Err(Stop::Corrupt(format!(
                "checksum expected {expected:#010x} but got {actual:#010x}"
            )));
        }
        Ok(())
    });
    match (decoded, checked) {
        (Err(Stop::Corrupt(why)), Err(Stop::Corrupt(checksum))) => Err(corrupt(
            stopped_at,
            format!("{checksum}; decoding stopped here: {why}"),
        )),
        (_, Err(Stop::Corrupt(checksum))) => Err(corrupt(
            body_len,
            format!("{checksum} over bytes 0..{body_len}"),
        )),
        (Err(Stop::Corrupt(why)), Ok(())) => Err(corrupt(stopped_at, why)),
        (Err(Stop::Io(e)), _) | (_, Err(Stop::Io(e))) => Err(io(path, "read")(e)),
        (Ok(meta), Ok(())) => Ok(meta),
    }
}

fn decode_body<R: Read>(
    body: &mut Body<R>,
    len: u64,
    mut progress: Option<&mut Progress>,
    visitor: &mut impl Visitor,
) -> Result<SnapshotMeta, Stop> {
    let corrupt = |reason: String| Stop::Corrupt(reason);
    let mut magic = [0u8; MAGIC.len()];
    body.fill(&mut magic)?;
    if &magic != MAGIC {
        return Err(corrupt("bad magic".into()));
    }
    body.need(24, "header")?;
    let version = body.u32()?;
    if !(FORMAT_VERSION_WITHOUT_SESSIONS..=FORMAT_VERSION).contains(&version) {
        return Err(corrupt(format!(
            "format version expected {FORMAT_VERSION_WITHOUT_SESSIONS} to {FORMAT_VERSION} but got {version}"
        )));
    }
    let mut meta = SnapshotMeta {
        shard: body.u32()?,
        index: body.u64()?,
        term: body.u64()?,
        ..Default::default()
    };
    for list in [&mut meta.membership.voters, &mut meta.membership.learners] {
        body.need(4, "member count")?;
        let count = body.u32()? as u64;
        body.need(count.saturating_mul(8), "members")?;
        for _ in 0..count {
            list.push(body.u64()?);
        }
    }
    body.need(8, "pair count")?;
    let count = body.u64()?;
    visitor.header(&meta, version, count);
    let mut key_buf = Vec::new();
    for i in 0..count {
        if i % PAIRS_PER_PROGRESS_CHECK == 0 {
            if let Some(progress) = progress.as_deref_mut() {
                progress.update(len - body.remaining);
            }
        }
        body.need(4, "key length")?;
        let key_len = body.u32()?;
        if key_len > MAX_ITEM_BYTES {
            return Err(corrupt(format!(
                "pair {i}: key length {key_len} is impossible"
            )));
        }
        body.need(u64::from(key_len), "key")?;
        key_buf.resize(key_len as usize, 0);
        body.fill(&mut key_buf)?;
        body.need(4, "value length")?;
        let value_len = body.u32()?;
        if value_len > MAX_ITEM_BYTES {
            return Err(corrupt(format!(
                "pair {i}: value length {value_len} is impossible"
            )));
        }
        body.need(u64::from(value_len) + 8, "value")?;
        let value = body.bytes(value_len as usize, "value")?;
        let version = body.u64()?;
        visitor.pair(&key_buf, value, version);
    }
    if version != FORMAT_VERSION_WITHOUT_SESSIONS {
        body.need(8, "session count")?;
        let count = body.u64()?;
        if count > MAX_SESSIONS_READ {
            return Err(corrupt(format!("session count {count} is impossible")));
        }
        for i in 0..count {
            let start = body.remaining;
            body.need(20, "session header")?;
            let id = body.u64()?;
            let mut session = Session {
                last_used: body.u64()?,
                ..Default::default()
            };
            if version > FORMAT_VERSION_WITHOUT_ACKED_MARK {
                body.need(12, "session acknowledged mark")?;
                session.acked_below = body.u64()?;
            }
            let results = body.u32()?;
            for _ in 0..results {
                body.need(12, "session result header")?;
                let sequence = body.u64()?;
                let len = body.u32()? as usize;
                let encoded = body.bytes(len, "session result")?;
                let response = Response::decode(encoded.as_slice())
                    .map_err(|e| corrupt(format!("session {i}: undecodable result: {e}")))?;
                let result = response
                    .result
                    .ok_or_else(|| corrupt(format!("session {i}: an empty result")))?;
                session.keep(sequence, result);
            }
            visitor.session(id, session, start - body.remaining);
        }
    }
    if version > FORMAT_VERSION_WITHOUT_MEMBERSHIP {
        body.need(4, "membership length")?;
        let len = body.u32()?;
        if len > MAX_MEMBERSHIP_BYTES {
            return Err(corrupt(format!("membership length {len} is impossible")));
        }
        body.need(u64::from(len), "membership")?;
        let encoded = body.bytes(len as usize, "membership")?;
        meta.membership = Membership::decode(encoded.as_slice())
            .map_err(|e| corrupt(format!("undecodable membership: {e}")))?;
    }
    if body.remaining > 0 {
        return Err(corrupt(format!(
            "{} bytes after the last pair",
            body.remaining
        )));
    }
    Ok(meta)
}

/// Snapshot files in `dir`, newest first, as (index, term, path).
pub fn list(dir: &Path) -> Vec<(u64, u64, PathBuf)> {
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".snap")) else {
            continue;
        };
        let Some((index, term)) = stem.split_once('-') else {
            continue;
        };
        if let (Ok(index), Ok(term)) = (index.parse(), term.parse()) {
            found.push((index, term, entry.path()));
        }
    }
    found.sort_by_key(|f| std::cmp::Reverse((f.0, f.1)));
    found
}

/// The newest snapshot in `dir` that verifies; a bad one is skipped with a
/// warning for the one before it.
pub fn load_latest(shard: u32, dir: &Path) -> Option<(SnapshotMeta, Image, PathBuf)> {
    for (_, _, path) in list(dir) {
        match read_logged(shard, "loading snapshot", &path) {
            Ok((meta, image)) => return Some((meta, image, path)),
            Err(e) => tracing::warn!(error = %e, "skipping unreadable snapshot"),
        }
    }
    None
}

/// Deletes all but the newest `SNAPSHOTS_KEPT` snapshots and stray temp
/// files, a step at a time (see [`remove_in_steps`]: unlinked at once, a
/// 1 GB snapshot stalled every fdatasync of the disk for 116-129 ms). Blocking and
/// sleeping: on the helper thread, never the shard's.
pub fn prune(dir: &Path) {
    for (_, _, path) in list(dir).into_iter().skip(SNAPSHOTS_KEPT) {
        // Out of the snapshots' names first (and of the writer's temp
        // names): a crash in the middle leaves a cut file that must never
        // be loaded, only pruned as a stray.
        let mut doomed = path.clone().into_os_string();
        doomed.push(".deleting.tmp");
        let doomed = PathBuf::from(doomed);
        let result = fs::rename(&path, &doomed).and_then(|()| remove_in_steps(&doomed));
        if let Err(e) = result {
            tracing::warn!(file = %path.display(), error = %e, "cannot delete old snapshot");
        }
    }
    for path in stray_temp_files(dir) {
        if let Err(e) = remove_in_steps(&path) {
            tracing::warn!(file = %path.display(), error = %e, "cannot delete a stray snapshot temp file");
        }
    }
}

/// Temp files nothing will finish: snapshot writes cut short (they run on
/// the helper thread, as prune does, so none is in progress now) and
/// incoming transfers of earlier processes. This process's own transfers
/// (`receiving-{pid}-*`) may be in progress and are left alone.
fn stray_temp_files(dir: &Path) -> Vec<PathBuf> {
    let ours = format!("receiving-{}-", std::process::id());
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.ends_with(".tmp") && !name.starts_with(&ours)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sessions::SessionTag;
    use crate::state_machine::Map;
    use corekv_proto::client::{response, WriteResult};

    fn sample() -> (SnapshotMeta, Image) {
        let meta = SnapshotMeta {
            shard: 3,
            index: 42,
            term: 7,
            membership: Membership {
                voters: vec![1, 2, 3],
                learners: vec![9],
                ..Default::default()
            },
        };
        let mut map = Map::new();
        for i in 0..100u64 {
            map.insert(
                Key::from_slice(format!("key{i:03}").as_bytes()),
                Versioned {
                    value: Bytes::from(vec![i as u8; i as usize]),
                    version: i + 1,
                },
            );
        }
        let mut sessions = Sessions::default();
        for index in [5, 9] {
            let id = sessions.open(index);
            // Numbers and marks past 1, so a round trip shows the mark kept.
            let tag = SessionTag {
                session_id: id,
                sequence: index,
                acked_below: index,
            };
            let _ = sessions.admit(index + 1, tag);
            sessions.record(
                tag,
                &response::Result::Write(WriteResult { version: index + 1 }),
            );
        }
        (meta, Image::new(map, sessions))
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let (meta, image) = sample();
        let path = write(dir.path(), &meta, &image).unwrap();
        assert_eq!(
            path.file_name().unwrap().to_str().unwrap(),
            file_name(42, 7)
        );
        let (meta2, image2) = read(&path).unwrap();
        assert_eq!(meta, meta2);
        assert_eq!(image.map, image2.map);
        assert_eq!(image.sessions, image2.sessions);
        assert_eq!(image2.sessions.len(), 2);
        // Counted while reading, as `Image::new` counts a map.
        assert!(image.bytes > 0);
        assert_eq!(image2.bytes, image.bytes);
    }

    /// Every way of writing gives the same file: around the page cache in
    /// several blocks and a partial last one, through it in chunks, and
    /// unpaced; on a file system without O_DIRECT (tmpfs) `Direct` falls
    /// back to chunks.
    #[test]
    fn every_pacing_writes_the_same_file() {
        let (meta, mut image) = sample();
        for i in 0..2500u64 {
            image.map.insert(
                Key::from_slice(format!("big{i:05}").as_bytes()),
                Versioned {
                    value: Bytes::from(vec![i as u8; 1000 + i as usize % 7]),
                    version: i,
                },
            );
        }
        let mut dirs = vec![tempfile::tempdir().unwrap()];
        if let Ok(shm) = tempfile::tempdir_in("/dev/shm") {
            dirs.push(shm);
        }
        let mut files = Vec::new();
        for dir in &dirs {
            for pacing in [
                Pacing::default(),
                Pacing::Direct {
                    bytes_per_second: 0,
                },
                Pacing::Chunks {
                    chunk_bytes: 1 << 20,
                    bytes_per_second: 0,
                },
                Pacing::None,
            ] {
                let sub = dir.path().join(format!("{pacing:?}"));
                let path = write_paced(&sub, &meta, &image, pacing).unwrap();
                let (meta2, image2) = read(&path).unwrap();
                assert_eq!((&meta2, &image2.map), (&meta, &image.map), "{pacing:?}");
                files.push(std::fs::read(&path).unwrap());
            }
        }
        assert!(files[0].len() > 2 * DIRECT_BLOCK_BYTES + 1);
        assert_ne!(files[0].len() % DIRECT_ALIGN, 0, "a partial last block");
        assert!(files.iter().all(|f| f == &files[0]));
    }

    #[test]
    fn decoded_pairs_do_not_borrow_the_snapshot_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let (meta, mut image) = sample();
        let long_key = vec![b'k'; 100];
        image.map.insert(
            Key::from_slice(&long_key),
            Versioned {
                value: Bytes::from(vec![7u8; 1000]),
                version: 101,
            },
        );
        let path = write(dir.path(), &meta, &image).unwrap();
        let buffer = Bytes::from(fs::read(&path).unwrap());
        let range = buffer.as_ptr_range();
        let (_, decoded) = decode(&path, buffer.clone()).unwrap();
        assert_eq!(decoded.map, image.map);
        for (key, versioned) in decoded.map.iter() {
            for bytes in [key.as_slice(), &versioned.value[..]] {
                assert!(
                    !range.contains(&bytes.as_ptr()),
                    "a decoded key or value points into the snapshot buffer"
                );
            }
        }
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let (meta, image) = sample();
        let path = write(dir.path(), &meta, &image).unwrap();
        let good = fs::read(&path).unwrap();
        for i in (0..good.len()).step_by(37) {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            // Also where the flip breaks decoding first (a length, the
            // magic), the error names the damage: the checksum.
            let error = decode(&path, Bytes::from(bad.clone()))
                .unwrap_err()
                .to_string();
            assert!(error.contains("checksum expected"), "flip at {i}: {error}");
            fs::write(dir.path().join("bad.snap"), &bad).unwrap();
            assert!(
                read(&dir.path().join("bad.snap")).is_err(),
                "flip at {i}, read from a file"
            );
        }
        assert!(decode(&path, Bytes::from(good[..good.len() - 9].to_vec())).is_err());
    }

    #[derive(Default)]
    struct Recorder {
        header: Option<(SnapshotMeta, u32, u64)>,
        pairs: Vec<(Vec<u8>, usize, u64)>,
        sessions: Vec<(u64, u64)>,
    }

    impl Visitor for Recorder {
        fn header(&mut self, meta: &SnapshotMeta, format_version: u32, pairs: u64) {
            self.header = Some((meta.clone(), format_version, pairs));
        }

        fn pair(&mut self, key: &[u8], value: Vec<u8>, version: u64) {
            self.pairs.push((key.to_vec(), value.len(), version));
        }

        fn session(&mut self, id: u64, _: Session, bytes: u64) {
            self.sessions.push((id, bytes));
        }
    }

    #[test]
    fn visit_hands_over_every_part_in_file_order() {
        let dir = tempfile::tempdir().unwrap();
        let (meta, image) = sample();
        let path = write(dir.path(), &meta, &image).unwrap();
        let mut recorder = Recorder::default();
        assert_eq!(visit(&path, &mut recorder).unwrap(), meta);
        let (header, version, pairs) = recorder.header.unwrap();
        assert_eq!((header.shard, header.index, header.term), (3, 42, 7));
        assert_eq!(header.membership.voters, meta.membership.voters);
        assert_eq!((version, pairs), (FORMAT_VERSION, 100));
        let expected: Vec<(Vec<u8>, usize, u64)> = image
            .map
            .iter_unordered()
            .map(|(k, v)| (k.as_slice().to_vec(), v.value.len(), v.version))
            .collect();
        assert_eq!(recorder.pairs, expected);
        let ids: Vec<u64> = image.sessions.iter().map(|(id, _)| id).collect();
        assert_eq!(
            recorder
                .sessions
                .iter()
                .map(|(id, _)| *id)
                .collect::<Vec<_>>(),
            ids
        );
        // Session bytes: everything between the pairs and the membership.
        let pairs_end = 80
            + expected
                .iter()
                .map(|(k, v, _)| 16 + k.len() + v)
                .sum::<usize>();
        let membership_start = fs::metadata(&path).unwrap().len() as usize
            - CHECKSUM_LEN
            - 4
            - meta.membership.encoded_len();
        let session_bytes: u64 = recorder.sessions.iter().map(|(_, b)| b).sum();
        assert_eq!(session_bytes as usize, membership_start - pairs_end - 8);
    }

    #[test]
    fn corruption_names_the_offset_where_decoding_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let (meta, image) = sample();
        let path = write(dir.path(), &meta, &image).unwrap();
        let good = fs::read(&path).unwrap();
        let body_len = good.len() - CHECKSUM_LEN;
        // Header 32, 3 voters and 1 learner (4 + 24 + 4 + 8), pair count 8:
        // the first key's length sits at offset 80.
        let mut bad = good.clone();
        bad[80..84].copy_from_slice(&u32::MAX.to_le_bytes());
        let error = decode(&path, Bytes::from(bad.clone()))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("corrupt at offset 84: checksum expected")
                && error.contains("decoding stopped here: pair 0: key length"),
            "{error}"
        );
        // The same with a checksum that matches: a decoding error alone.
        let crc = crc32fast::hash(&bad[..body_len]);
        bad[body_len..].copy_from_slice(&crc.to_le_bytes());
        let error = decode(&path, Bytes::from(bad)).unwrap_err().to_string();
        assert!(
            error.ends_with("corrupt at offset 84: pair 0: key length 4294967295 is impossible"),
            "{error}"
        );
        // A flip inside a value decodes: only the checksum can tell.
        let mut bad = good.clone();
        bad[100] ^= 1;
        let error = decode(&path, Bytes::from(bad)).unwrap_err().to_string();
        assert!(
            error.contains(&format!("corrupt at offset {body_len}: checksum expected"))
                && error.ends_with(&format!("over bytes 0..{body_len}")),
            "{error}"
        );
    }

    #[test]
    fn load_latest_skips_a_corrupt_newest_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let (mut meta, image) = sample();
        write(dir.path(), &meta, &image).unwrap();
        meta.index = 50;
        let newest = write(dir.path(), &meta, &image).unwrap();
        let mut bytes = fs::read(&newest).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 1;
        fs::write(&newest, bytes).unwrap();
        let (loaded, _, path) = load_latest(0, dir.path()).unwrap();
        assert_eq!(loaded.index, 42);
        assert_ne!(path, newest);
    }

    #[test]
    fn prune_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let (mut meta, image) = sample();
        for index in [10, 20, 30, 40] {
            meta.index = index;
            write(dir.path(), &meta, &image).unwrap();
        }
        prune(dir.path());
        let left: Vec<u64> = list(dir.path()).iter().map(|(i, _, _)| *i).collect();
        assert_eq!(left, vec![40, 30]);
        let files = fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(files, 2, "nothing but the two newest is left");
    }

    /// Bytes of a version 4 file's session section for `image`.
    fn sessions_section_bytes(image: &Image) -> usize {
        8 + image
            .sessions
            .iter()
            .map(|(_, s)| {
                28 + s
                    .results()
                    .map(|(_, r)| {
                        12 + Response {
                            id: 0,
                            result: Some(r.clone()),
                        }
                        .encoded_len()
                    })
                    .sum::<usize>()
            })
            .sum::<usize>()
    }

    #[test]
    fn a_version_1_file_reads_with_no_sessions() {
        let dir = tempfile::tempdir().unwrap();
        let (meta, image) = sample();
        let path = write(dir.path(), &meta, &image).unwrap();
        // Rewrite it as version 1: no session section, fresh checksum.
        let bytes = fs::read(&path).unwrap();
        let sessions_bytes = sessions_section_bytes(&image);
        let membership_bytes = 4 + meta.membership.encoded_len();
        let mut old =
            bytes[..bytes.len() - CHECKSUM_LEN - membership_bytes - sessions_bytes].to_vec();
        old[8..12].copy_from_slice(&FORMAT_VERSION_WITHOUT_SESSIONS.to_le_bytes());
        let crc = crc32fast::hash(&old);
        old.extend_from_slice(&crc.to_le_bytes());
        let (meta2, image2) = decode(&path, Bytes::from(old)).unwrap();
        assert_eq!(meta2, meta);
        assert_eq!(image2.map, image.map);
        assert!(image2.sessions.is_empty());
    }

    #[test]
    fn a_version_3_file_reads_its_sessions_with_no_acknowledged_mark() {
        let dir = tempfile::tempdir().unwrap();
        let (meta, image) = sample();
        assert!(image.sessions.iter().all(|(_, s)| s.acked_below > 0));
        let path = write(dir.path(), &meta, &image).unwrap();
        let bytes = fs::read(&path).unwrap();
        // Rewrite it as version 3: each session header without its mark.
        let sessions_bytes = sessions_section_bytes(&image);
        let membership_bytes = 4 + meta.membership.encoded_len();
        let body_end = bytes.len() - CHECKSUM_LEN;
        let sessions_start = body_end - membership_bytes - sessions_bytes;
        let mut old = bytes[..sessions_start + 8].to_vec();
        let mut at = sessions_start + 8;
        for _ in image.sessions.iter() {
            // id and last use kept, the mark dropped.
            old.extend_from_slice(&bytes[at..at + 16]);
            at += 24;
            let results = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
            let mut end = at + 4;
            for _ in 0..results {
                let len = u32::from_le_bytes(bytes[end + 8..end + 12].try_into().unwrap());
                end += 12 + len as usize;
            }
            old.extend_from_slice(&bytes[at..end]);
            at = end;
        }
        assert_eq!(at, body_end - membership_bytes);
        old.extend_from_slice(&bytes[at..body_end]);
        old[8..12].copy_from_slice(&FORMAT_VERSION_WITHOUT_ACKED_MARK.to_le_bytes());
        let crc = crc32fast::hash(&old);
        old.extend_from_slice(&crc.to_le_bytes());
        let (meta2, image2) = decode(&path, Bytes::from(old)).unwrap();
        assert_eq!(meta2, meta);
        assert_eq!(image2.map, image.map);
        let want: Vec<_> = image
            .sessions
            .iter()
            .map(|(id, s)| (id, s.last_used, 0, s.results().collect::<Vec<_>>()))
            .collect();
        let got: Vec<_> = image2
            .sessions
            .iter()
            .map(|(id, s)| {
                (
                    id,
                    s.last_used,
                    s.acked_below,
                    s.results().collect::<Vec<_>>(),
                )
            })
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn prune_deletes_stray_temp_files_but_not_a_transfer_in_progress() {
        let dir = tempfile::tempdir().unwrap();
        let (meta, image) = sample();
        let kept = write(dir.path(), &meta, &image).unwrap();
        let mine = dir
            .path()
            .join(format!("receiving-{}-7.tmp", std::process::id()));
        let stray = [
            dir.path().join("receiving-1-3.tmp"),
            dir.path().join(format!("{}.tmp", file_name(9, 1))),
        ];
        for path in stray.iter().chain([&mine]) {
            fs::write(path, b"partial").unwrap();
        }
        prune(dir.path());
        assert!(kept.exists() && mine.exists());
        assert!(stray.iter().all(|p| !p.exists()));
    }
}
