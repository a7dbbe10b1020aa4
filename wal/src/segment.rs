//! One segment file: preallocated, mapped shared, appended to by memcpy.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::{MmapMut, MmapOptions};

use crate::direct::{AlignedBuf, DIRECT_ALIGN};
use crate::error::WalError;
use crate::format::{self, SegmentHeader, HEADER_LEN};

/// An open file and its path, shared (Arc) between the WAL and the sync job
/// in flight, so the job can fdatasync while the WAL keeps appending.
#[derive(Debug)]
pub(crate) struct SegmentFile {
    pub(crate) file: File,
    pub(crate) path: PathBuf,
}

impl SegmentFile {
    /// Opens a directory so it can be fsynced (file creation and deletion
    /// are durable only after the directory is).
    pub(crate) fn open_dir(dir: &Path) -> Result<SegmentFile, WalError> {
        let file = File::open(dir).map_err(|e| WalError::io(dir, "open directory", e))?;
        Ok(SegmentFile {
            file,
            path: dir.to_path_buf(),
        })
    }

    pub(crate) fn sync_data(&self) -> Result<(), WalError> {
        self.file
            .sync_data()
            .map_err(|e| WalError::io(&self.path, "fdatasync", e))
    }

    pub(crate) fn sync_all(&self) -> Result<(), WalError> {
        self.file
            .sync_all()
            .map_err(|e| WalError::io(&self.path, "fsync", e))
    }

    pub(crate) fn write_header(&self, header: &[u8; HEADER_LEN]) -> Result<(), WalError> {
        self.file
            .write_all_at(header, 0)
            .map_err(|e| WalError::io(&self.path, "write segment header", e))
    }
}

/// How a new (not recycled) segment file is made to read as zeros.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Zeroing {
    /// Preallocated, then zeros written to its blocks around the page cache.
    Blocks,
    /// Preallocated only: unwritten blocks, zeroed in the page cache.
    PagesOnly,
}

/// A mapped segment and what the WAL knows about it.
pub(crate) struct Segment {
    pub(crate) sequence: u64,
    pub(crate) file: Arc<SegmentFile>,
    /// The whole file, mapped shared: its pages are the page cache's, so an
    /// fdatasync of `file` makes what was copied into them durable.
    pub(crate) map: MmapMut,
    /// End of the records written so far. After it: zeros in a new file,
    /// anything in a recycled one (see the format doc's "Recycling").
    pub(crate) write_offset: usize,
    /// The crc of the last record (the chain seed before the first): what
    /// the next record's crc continues. None in a version 1 segment.
    pub(crate) chain: Option<u32>,
    /// Its seal record is written: no more records go here.
    pub(crate) sealed: bool,
    /// Whether the header is on disk. False from rotation until the sync job
    /// that wrote it finishes (see the format doc: the header of `k + 1`
    /// becomes valid only after `k` is durable).
    pub(crate) header_durable: bool,
    /// Highest entry index ever written here (0 if none). A segment before the
    /// durable snapshot marker's segment whose max is covered by the marker
    /// holds nothing live.
    pub(crate) max_entry_index: u64,
    /// Whether `release_pages` ran: a sealed, synced segment's pages are
    /// taken out of the process's page tables once.
    pub(crate) pages_released: bool,
    /// Bytes from the start already taken out of the page tables while the
    /// segment is active (see `release_synced_pages`).
    pub(crate) released_to: usize,
    /// Made out of a free file (a retired segment) rather than a new one.
    pub(crate) reused: bool,
    /// End of the range `warm_ahead` last asked the kernel to hold in the
    /// page cache.
    pub(crate) warmed_to: usize,
}

impl Segment {
    /// Creates `{sequence:016}.wal` in `dir`, preallocated to `segment_bytes`
    /// and mapped, with a zero header (written later by a sync job). If
    /// preallocation or mapping fails the new file is removed again (a
    /// leftover would be harmless, its header being zero, but would hold the
    /// space that just ran out). A new file's blocks are written with
    /// zeros first (see `write_zeros_around_page_cache`).
    pub(crate) fn create(
        dir: &Path,
        sequence: u64,
        segment_bytes: u64,
    ) -> Result<Segment, WalError> {
        Self::create_with(dir, sequence, segment_bytes, Zeroing::Blocks)
    }

    /// [`Segment::create`] for the appending thread itself (the preparer
    /// thread could not be started): a new file stays preallocated only,
    /// so rotation does not also wait for its zeros to reach the disk.
    pub(crate) fn create_on_appending_thread(
        dir: &Path,
        sequence: u64,
        segment_bytes: u64,
    ) -> Result<Segment, WalError> {
        Self::create_with(dir, sequence, segment_bytes, Zeroing::PagesOnly)
    }

    fn create_with(
        dir: &Path,
        sequence: u64,
        segment_bytes: u64,
        zeroing: Zeroing,
    ) -> Result<Segment, WalError> {
        let path = dir.join(format::segment_file_name(sequence));
        match Self::recycle(dir, &path, sequence, segment_bytes) {
            Ok(Some(segment)) => return Ok(segment),
            Ok(None) => {}
            // A new file instead; the free file that failed is gone or stays
            // for the next try.
            Err(error) => tracing::warn!(%error, "cannot reuse a retired WAL segment"),
        }
        // create_new: an existing file of that name is never clobbered.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| WalError::io(&path, "create segment", e))?;
        let result = Self::preallocate_and_map(file, &path, sequence, segment_bytes, zeroing);
        if result.is_err() {
            let _ = std::fs::remove_file(&path);
        }
        result
    }

    fn preallocate_and_map(
        file: File,
        path: &Path,
        sequence: u64,
        segment_bytes: u64,
        zeroing: Zeroing,
    ) -> Result<Segment, WalError> {
        let length =
            libc::off_t::try_from(segment_bytes).expect("segment_bytes is validated to fit off_t");
        // Preallocate so that appends through the mapping can never hit ENOSPC
        // as a SIGBUS: the error surfaces here, as a return value, instead.
        // SAFETY: plain syscall on an owned, open descriptor.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, length) };
        if rc != 0 {
            return Err(WalError::io(
                path,
                "preallocate",
                std::io::Error::from_raw_os_error(rc),
            ));
        }
        // Only a speed-up: the file is preallocated and reads as zeros
        // either way, so a failure here leaves it as it was. A failing disk
        // shows in the fdatasyncs of the appends.
        if zeroing == Zeroing::Blocks {
            if let Err(error) = write_zeros_around_page_cache(path, segment_bytes) {
                tracing::warn!(%error, "cannot write zeros over a new WAL segment; appends into it convert its extents");
            }
        }
        prefill_page_cache(&file, path, segment_bytes)?;
        let file = SegmentFile {
            file,
            path: path.to_path_buf(),
        };
        let segment = Self::map(file, sequence, false)?;
        // Faults on pages not yet cached must not read ahead into large
        // folios either (see `small_pages`). Only a hint: errors are ignored.
        let _ = segment.map.advise(memmap2::Advice::Random);
        Ok(segment)
    }

    /// Makes segment `sequence` out of a free file (a retired segment of the
    /// same size), if there is one. Its header and first record length are
    /// zeroed and synced before it takes the new name, so a crash leaves
    /// either a free file or a segment whose header was never written, never
    /// an old header under a new name. Old records after that are stale
    /// chains (see the format doc).
    fn recycle(
        dir: &Path,
        path: &Path,
        sequence: u64,
        segment_bytes: u64,
    ) -> Result<Option<Segment>, WalError> {
        let Some(free) = take_free_file(dir, segment_bytes)? else {
            return Ok(None);
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&free)
            .map_err(|e| WalError::io(&free, "open free segment", e))?;
        let file = SegmentFile { file, path: free };
        file.file
            .write_all_at(&[0u8; HEADER_LEN + format::RECORD_HEADER_LEN], 0)
            .map_err(|e| WalError::io(&file.path, "zero free segment header", e))?;
        file.sync_data()?;
        rename_no_replace(&file.path, path)?;
        let file = SegmentFile {
            file: file.file,
            path: path.to_path_buf(),
        };
        prefill_page_cache(&file.file, path, segment_bytes)?;
        let mut segment = Self::map(file, sequence, false)?;
        segment.reused = true;
        let _ = segment.map.advise(memmap2::Advice::Random);
        Ok(Some(segment))
    }

    /// Readies a recovered segment for appends: its cached pages may be
    /// large folios, read ahead by recovery or by an earlier life of the
    /// process (see `small_pages`). Syncs it (after a kill -9 the page cache
    /// may still hold unsynced pages), drops its cached pages and reads the
    /// file back in 4 KiB pages, so neither appends nor reads of its entries
    /// fault on the shard thread. Blocking: for `Wal::open` only.
    pub(crate) fn prepare_recovered_for_appends(&self) -> Result<(), WalError> {
        self.file.sync_data()?;
        // Recovery read the segment through the mapping, and the kernel
        // does not drop pages that are mapped: unmap them first.
        // SAFETY: on a shared file mapping MADV_DONTNEED only drops this
        // process's page table entries: the mapping stays valid at the same
        // addresses, its bytes stay in the file (synced just above) and the
        // next access faults them back in unchanged.
        unsafe {
            self.map
                .unchecked_advise(memmap2::UncheckedAdvice::DontNeed)
        }
        .map_err(|e| WalError::io(&self.file.path, "madvise(DONTNEED)", e))?;
        // SAFETY: plain syscall on an open descriptor. Only a hint.
        unsafe { libc::posix_fadvise(self.file.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        prefill_page_cache(&self.file.file, &self.file.path, self.map.len() as u64)?;
        let _ = self.map.advise(memmap2::Advice::Random);
        Ok(())
    }

    /// Takes a sealed, synced segment's pages out of this process's page
    /// tables. Mapped, they count towards the process's RSS (and a cgroup's
    /// memory) for as long as the segment lives, a gigabyte of log at size;
    /// unmapped they are page cache the kernel may drop, and a read of an old
    /// entry (a follower catching up) faults them back. Only a hint: an
    /// error changes nothing.
    pub(crate) fn release_pages(&mut self) {
        if self.pages_released {
            return;
        }
        self.pages_released = true;
        // SAFETY: as in `prepare_recovered_for_appends`: on a shared file
        // mapping MADV_DONTNEED drops page table entries only; the bytes stay
        // in the page cache and the file (dirty pages are written back as
        // usual), and the next access faults them back in unchanged.
        let _ = unsafe {
            self.map
                .unchecked_advise(memmap2::UncheckedAdvice::DontNeed)
        };
    }

    /// Takes the active segment's pages before `synced` (an offset whose
    /// bytes are all durable) out of this process's page tables, in steps
    /// of [`RELEASE_STEP_BYTES`]: as `release_pages` does for a whole
    /// sealed segment, so that a 64 MiB segment being filled does not hold
    /// up to 64 MiB of the process's RSS (30-88 MiB of a 1 GB node's 1.5
    /// GB under BIG). Only whole steps go: what lies past the last step
    /// boundary before `synced` (up to 4 MiB, and the tail being appended
    /// to) stays mapped; a read of an entry released already faults its
    /// page back from the page cache. Only a hint: an error changes nothing.
    pub(crate) fn release_synced_pages(&mut self, synced: usize) {
        let end = synced / RELEASE_STEP_BYTES * RELEASE_STEP_BYTES;
        if self.pages_released || end <= self.released_to {
            return;
        }
        // SAFETY: as in `release_pages`: on a shared file mapping
        // MADV_DONTNEED drops page table entries only; the bytes stay in
        // the page cache and the file, and the next access faults them back
        // unchanged. The range is page aligned (a step is a multiple of any
        // page size) and inside the mapping (`synced` is an offset in it).
        let _ = unsafe {
            self.map.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                self.released_to,
                end - self.released_to,
            )
        };
        self.released_to = end;
    }

    /// Maps an existing segment whose header recovery found valid.
    pub(crate) fn open_existing(path: PathBuf, sequence: u64) -> Result<Segment, WalError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| WalError::io(&path, "open segment", e))?;
        Self::map(SegmentFile { file, path }, sequence, true)
    }

    /// Maps the whole file. No MAP_POPULATE: measured on ext4, populating a
    /// new segment made appends about twice slower, not faster. Populate maps
    /// the pages read-only (a shared mapping must track dirtying), so every
    /// first write still faults, now through the slower write-protect path.
    fn map(file: SegmentFile, sequence: u64, header_durable: bool) -> Result<Segment, WalError> {
        let length = file
            .file
            .metadata()
            .map_err(|e| WalError::io(&file.path, "stat segment", e))?
            .len();
        if length < HEADER_LEN as u64 || length > crate::types::MAX_SEGMENT_BYTES {
            return Err(WalError::corrupt(
                &file.path,
                0,
                format!(
                    "segment length expected within [{HEADER_LEN}, {}] but got {length}",
                    crate::types::MAX_SEGMENT_BYTES
                ),
            ));
        }
        // SAFETY: the directory lock makes this process the only writer of
        // the file, and the file is never truncated while mapped, so the
        // mapping stays valid for its lifetime.
        let map = unsafe { MmapOptions::new().len(length as usize).map_mut(&file.file) }
            .map_err(|e| WalError::io(&file.path, "mmap", e))?;
        Ok(Segment {
            sequence,
            file: Arc::new(file),
            map,
            write_offset: HEADER_LEN,
            chain: Some(format::chain_seed(sequence)),
            sealed: false,
            header_durable,
            pages_released: false,
            released_to: 0,
            max_entry_index: 0,
            reused: false,
            warmed_to: 0,
        })
    }

    pub(crate) fn header(&self, shard_id: u32) -> [u8; HEADER_LEN] {
        let version = match self.chain {
            Some(_) => format::FORMAT_VERSION,
            None => format::UNCHAINED_FORMAT_VERSION,
        };
        format::encode_header(SegmentHeader {
            shard_id,
            sequence: self.sequence,
            version,
        })
    }

    /// Marks the end of the records after one was written (version 2: the
    /// bytes after it may be stale; version 1 relies on zeros).
    pub(crate) fn terminate(&mut self) {
        if self.chain.is_some() {
            format::terminate(&mut self.map, self.write_offset);
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.file.path
    }

    /// Bytes left for records (a version 2 segment keeps room for its seal).
    pub(crate) fn remaining(&self) -> usize {
        if self.sealed {
            return 0;
        }
        let reserved = if self.chain.is_some() {
            format::SEAL_RECORD_LEN
        } else {
            0
        };
        (self.map.len() - self.write_offset).saturating_sub(reserved)
    }

    /// Asks the kernel (POSIX_FADV_WILLNEED, which reads in the background
    /// and does not wait) to bring back into the page cache whatever it
    /// dropped of the next `WARM_AHEAD_BYTES` after the write offset, once
    /// per `WARM_STEP_BYTES` appended. Prefilled pages do not stay: a kernel
    /// that reclaims memory it sees idle (DAMON's proactive reclaim, as on
    /// this project's development VM, where `perf record -e
    /// filemap:mm_filemap_delete_from_page_cache -a -g` showed `kdamond`
    /// removing them) takes pages of a prepared segment before the appends
    /// reach them, and each append into a dropped page then waited for a
    /// read from the disk in a major fault on the shard thread: 176 major
    /// faults in 24 x 60,000 appends of 1,100 B with a sync after every 64
    /// (slow loop turns of 20-64 ms under BIG, with as many major faults as
    /// voluntary context switches in the "slow loop turn" line).
    ///
    /// The call itself is `ask`'s to make (the WAL's warmer, on a thread of
    /// its own); a range it refuses (false) is asked again at the next
    /// append.
    pub(crate) fn warm_ahead(&mut self, ask: impl FnOnce(&Arc<SegmentFile>, usize, usize) -> bool) {
        if self.write_offset + WARM_AHEAD_BYTES < self.warmed_to + WARM_STEP_BYTES {
            return;
        }
        let from = self.warmed_to.max(self.write_offset);
        let to = (self.write_offset + WARM_AHEAD_BYTES).min(self.map.len());
        if from >= to {
            self.warmed_to = to;
            return;
        }
        if ask(&self.file, from, to - from) {
            self.warmed_to = to;
        }
    }

    /// Closes a version 2 segment with its seal record, in the room kept for
    /// it; returns the bytes written (none for version 1).
    pub(crate) fn seal(&mut self) -> usize {
        if self.sealed || self.chain.is_none() {
            self.sealed = true;
            return 0;
        }
        let start = self.write_offset;
        let length = format::SEAL_RECORD_LEN;
        format::write_record(
            &mut self.map[start..start + length],
            format::KIND_SEAL,
            &[],
            &mut self.chain,
        );
        self.write_offset += length;
        self.terminate();
        self.sealed = true;
        length
    }
}

/// How far past the write offset `Segment::warm_ahead` keeps the page
/// cache filled: about 70 ms of appends at 60 MB/s, so the reads it asks
/// for are done before the appends get there.
const WARM_AHEAD_BYTES: usize = 4 << 20;

/// Step in which an active segment's synced pages leave the page tables
/// (see `Segment::release_synced_pages`): one `madvise` per 4 MiB appended.
pub(crate) const RELEASE_STEP_BYTES: usize = 4 << 20;
/// How many appended bytes between two `warm_ahead` requests: one fadvise
/// per MiB of log, each asking for about 1 MiB. Where nothing was dropped
/// that costs microseconds: 4 MiB of cached pages took 4-6 µs at best and
/// 16-25 µs on average over 64 calls, while a build ran beside it (a
/// throwaway C program, not kept).
const WARM_STEP_BYTES: usize = 1 << 20;

/// Reads the new (all zero) file once, so the kernel allocates and zeroes its
/// page cache pages here, on the thread preparing the segment, rather than
/// in page faults on the append path. Measured with 256 x 256 B batches:
/// appends went from about 1.1 to 2.0 GB/s; the read costs the helper about
/// 30 ms per 64 MiB. (MAP_POPULATE of the writable mapping and
/// POSIX_FADV_WILLNEED were both measured slower than no prefill at all.)
///
/// (Those numbers predate `small_pages`: with 4 KiB pages every page takes
/// its own write fault, and `cargo bench --bench wal` appends at about
/// 670 MiB/s instead of 1.2 GiB/s, a price paid for syncs that write only
/// what changed.)
///
/// The read must not build large folios, see `small_pages`.
///
/// The file is read into a buffer with pread, which copies every page out
/// once. The copy is the point: on a VM whose host reclaims the memory the
/// guest frees (virtio-balloon free page reporting, as on this project's
/// development VM), the first touch of a page the guest got back costs a
/// fault in the host, some microseconds per 4 KiB page, whichever thread
/// makes it. Reading the file into /dev/null with sendfile (as this did
/// before) fills the page cache without touching the pages, so the first
/// touch was the shard's append: under BIG, the append's `memcpy` into the
/// mapping was 21.5 % of the shard threads' samples, against 1 % with a
/// 100k-key state whose segments are all reused files (`perf record
/// --call-graph dwarf` over 27 s of each). A 64 MiB segment written with
/// O_DIRECT, its memory given back to the host first, then filled and
/// appended to in 1,100 B copies through the mapping (a throwaway C
/// program, not kept), two rounds: sendfile 51-61 ms to fill then
/// 157-185 ms to append; pread 160-170 ms to fill then 16-20 ms to append,
/// the same as appending into a reused file.
fn prefill_page_cache(file: &File, path: &Path, segment_bytes: u64) -> Result<(), WalError> {
    small_pages(file);
    const CHUNK_BYTES: usize = 128 << 10;
    let mut buffer = vec![0u8; CHUNK_BYTES];
    let mut offset = 0;
    while offset < segment_bytes {
        match file.read_at(&mut buffer, offset) {
            Ok(0) => break,
            Ok(read) => offset += read as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(WalError::io(path, "read new segment", e)),
        }
    }
    Ok(())
}

/// Writes zeros over a new, preallocated segment with O_DIRECT, then syncs
/// it: its blocks become written, so the reads that fill its page cache
/// bring pages in from the disk by DMA instead of the kernel zeroing each
/// new page (unwritten blocks read as zeros), and no fdatasync of an append
/// has to convert an unwritten extent. Zeroing the pages of new segments
/// was a quarter of the development machine's CPU under a 1 GB state's
/// write load (perf: `memset` under `ext4_mpage_readpages`), until enough
/// segments were retired for new ones to be reused files. Where O_DIRECT
/// is refused (tmpfs) nothing is written and the pages are zeroed as
/// before; an error leaves the file as it was (preallocated, all zeros).
fn write_zeros_around_page_cache(path: &Path, segment_bytes: u64) -> Result<(), WalError> {
    use std::os::unix::fs::OpenOptionsExt;
    // As the snapshot writer: blocks of 256 KiB, so a WAL fdatasync queues
    // behind at most one of them in the device.
    const BLOCK_BYTES: usize = 256 << 10;
    let file = match OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(()),
        Err(e) => return Err(WalError::io(path, "open new segment (O_DIRECT)", e)),
    };
    let zeros = AlignedBuf::new(BLOCK_BYTES);
    // A tail that is not whole blocks stays unwritten (zeroed pages).
    let end = segment_bytes - segment_bytes % DIRECT_ALIGN as u64;
    let mut offset = 0u64;
    while offset < end {
        let len = (end - offset).min(BLOCK_BYTES as u64) as usize;
        match file.write_all_at(&zeros.as_slice()[..len], offset) {
            Ok(()) => offset += len as u64,
            // A file system that opens with O_DIRECT but refuses the write
            // (alignment): fall back to zeroed pages; the file is
            // preallocated, so what was written is zeros either way.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(()),
            Err(e) => return Err(WalError::io(path, "zero new segment", e)),
        }
    }
    file.sync_data()
        .map_err(|e| WalError::io(path, "fdatasync new segment", e))
}

/// The oldest free file in `dir` of `segment_bytes` (removing those of another
/// size: `segment_bytes` changed since they were retired).
fn take_free_file(dir: &Path, segment_bytes: u64) -> Result<Option<PathBuf>, WalError> {
    for (_, path) in free_files(dir)? {
        let length = std::fs::metadata(&path)
            .map_err(|e| WalError::io(&path, "stat free segment", e))?
            .len();
        if length == segment_bytes {
            return Ok(Some(path));
        }
        std::fs::remove_file(&path).map_err(|e| WalError::io(&path, "remove free segment", e))?;
    }
    Ok(None)
}

/// The free files in `dir`, oldest first, as (sequence retired with, path).
pub(crate) fn free_files(dir: &Path) -> Result<Vec<(u64, PathBuf)>, WalError> {
    files_named(dir, format::parse_free_file_name)
}

/// The files in `dir` whose names `parse` reads a sequence from, as
/// (sequence, path), sorted; other files are left out.
pub(crate) fn files_named(
    dir: &Path,
    parse: fn(&str) -> Option<u64>,
) -> Result<Vec<(u64, PathBuf)>, WalError> {
    let mut found = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| WalError::io(dir, "list directory", e))?;
    for entry in entries {
        let entry = entry.map_err(|e| WalError::io(dir, "list directory", e))?;
        if let Some(sequence) = entry.file_name().to_str().and_then(parse) {
            found.push((sequence, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// rename(2) that fails rather than replace an existing `to`.
fn rename_no_replace(from: &Path, to: &Path) -> Result<(), WalError> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = |path: &Path| {
        std::ffi::CString::new(path.as_os_str().as_bytes())
            .map_err(|e| WalError::io(path, "rename segment", std::io::Error::other(e.to_string())))
    };
    let (from_c, to_c) = (c_path(from)?, c_path(to)?);
    // SAFETY: two NUL-terminated paths that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from_c.as_ptr(),
            libc::AT_FDCWD,
            to_c.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc != 0 {
        return Err(WalError::io(
            to,
            "rename free segment",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Turns readahead off for reads through `file`, so the page cache holds the
/// segment in 4 KiB pages. Why: the kernel writes back a dirty folio whole,
/// and since ext4 has large folios (Linux 6.16) a readahead-built folio can
/// be 1 MiB. An fdatasync after a 300-byte append then wrote 1 MiB: measured
/// on a 3-node cluster at 64 clients, every sync issued a 1 MiB write, took
/// 3.7-6.8 ms, and puts ran at 5.5k/s; with 4 KiB pages syncs took about
/// 1.1 ms and puts ran at 12.4k/s. Order-0 pages come from non-readahead reads
/// (`POSIX_FADV_RANDOM`) and from faults with `MADV_RANDOM`.
fn small_pages(file: &File) {
    // SAFETY: plain syscall on an open descriptor. Only a hint: ignore errors.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("path", &self.file.path)
            .field("write_offset", &self.write_offset)
            .field("header_durable", &self.header_durable)
            .field("max_entry_index", &self.max_entry_index)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_preallocates_zeroed_file_with_fixed_width_name() {
        let dir = tempfile::tempdir().unwrap();
        let segment = Segment::create(dir.path(), 7, 8192).unwrap();
        assert_eq!(segment.path(), dir.path().join("0000000000000007.wal"));
        assert_eq!(std::fs::metadata(segment.path()).unwrap().len(), 8192);
        assert!(segment.map.iter().all(|&b| b == 0));
        assert_eq!(
            segment.remaining(),
            8192 - HEADER_LEN - format::SEAL_RECORD_LEN
        );
        assert!(!segment.header_durable);
    }

    /// The extents of `path` as (length, FIEMAP flags), or None where the
    /// file system does not answer FIEMAP.
    fn extents(path: &Path) -> Option<Vec<(u64, u32)>> {
        const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
        const FIEMAP_FLAG_SYNC: u32 = 1;
        const MAX_EXTENTS: usize = 64;
        #[repr(C)]
        #[derive(Clone, Copy, Default)]
        struct Extent {
            logical: u64,
            physical: u64,
            length: u64,
            reserved64: [u64; 2],
            flags: u32,
            reserved: [u32; 3],
        }
        #[repr(C)]
        struct Fiemap {
            start: u64,
            length: u64,
            flags: u32,
            mapped_extents: u32,
            extent_count: u32,
            reserved: u32,
            extents: [Extent; MAX_EXTENTS],
        }
        let file = File::open(path).unwrap();
        let mut map = Fiemap {
            start: 0,
            length: u64::MAX,
            flags: FIEMAP_FLAG_SYNC,
            mapped_extents: 0,
            extent_count: MAX_EXTENTS as u32,
            reserved: 0,
            extents: [Extent::default(); MAX_EXTENTS],
        };
        // SAFETY: FS_IOC_FIEMAP fills the struct it is given, whose
        // extent_count says how many extents it has room for.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP, &mut map) };
        if rc != 0 {
            return None;
        }
        Some(
            map.extents[..map.mapped_extents as usize]
                .iter()
                .map(|e| (e.length, e.flags))
                .collect(),
        )
    }

    #[test]
    fn a_new_segment_has_no_unwritten_blocks_where_o_direct_works() {
        use std::os::unix::fs::OpenOptionsExt;
        const FIEMAP_EXTENT_UNWRITTEN: u32 = 0x800;
        let dir = tempfile::tempdir().unwrap();
        let probe = dir.path().join("probe");
        std::fs::write(&probe, b"").unwrap();
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&probe)
            .is_ok();
        let segment = Segment::create(dir.path(), 1, 1 << 20).unwrap();
        assert!(segment.map.iter().all(|&b| b == 0));
        let Some(extents) = extents(segment.path()) else {
            eprintln!("no FIEMAP on this file system: nothing to check");
            return;
        };
        if !direct {
            eprintln!("no O_DIRECT on this file system: new segments stay unwritten");
            return;
        }
        // Every block is written: appends then fdatasync data only, and the
        // page cache was filled from the disk, not by zeroing pages.
        assert_eq!(extents.iter().map(|(len, _)| len).sum::<u64>(), 1 << 20);
        assert!(
            extents
                .iter()
                .all(|(_, flags)| flags & FIEMAP_EXTENT_UNWRITTEN == 0),
            "{extents:?}"
        );
    }

    fn page_bytes() -> usize {
        // SAFETY: sysconf has no preconditions.
        unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
    }

    /// Pages of `file` in the page cache, by mincore over a read-only map.
    fn resident_pages(file: &File, len: usize) -> usize {
        resident_pages_between(file, len, 0, len)
    }

    /// Pages of `file` (`file_len` long) between byte offsets `from` and
    /// `to` (page aligned) in the page cache.
    fn resident_pages_between(file: &File, file_len: usize, from: usize, to: usize) -> usize {
        // SAFETY: a private read-only map of a file nobody truncates here.
        let map = unsafe { memmap2::MmapOptions::new().len(file_len).map(file) }.unwrap();
        let mut pages = vec![0u8; (to - from).div_ceil(page_bytes())];
        // SAFETY: `from` is page aligned and inside the map, `to - from`
        // fits in it, and `pages` has one byte per page of that range.
        let rc = unsafe {
            libc::mincore(
                map.as_ptr().add(from) as *mut _,
                to - from,
                pages.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
        pages.iter().filter(|&&p| p & 1 == 1).count()
    }

    #[test]
    fn warm_ahead_brings_back_dropped_pages_ahead_of_the_appends_only() {
        const LEN: usize = 16 << 20;
        let dir = tempfile::tempdir().unwrap();
        let mut segment = Segment::create(dir.path(), 1, LEN as u64).unwrap();
        let handle = Arc::clone(&segment.file);
        let file = &handle.file;
        // Dropped as a reclaiming kernel drops idle pages: clean, and not
        // mapped yet (on tmpfs they stay, and the test proves nothing).
        // SAFETY: plain syscall on an open descriptor.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        let page = page_bytes();
        let dropped = resident_pages_between(file, LEN, 0, LEN) < LEN / page / 2;
        // As if 2 MiB had been appended.
        let warmer = crate::warm::Warmer::start(0);
        let ask = |file: &Arc<SegmentFile>, from, len| warmer.warm(file, from, len);
        segment.write_offset = 2 << 20;
        segment.warm_ahead(ask);
        let window = (2 << 20, (2 << 20) + WARM_AHEAD_BYTES);
        let pages = WARM_AHEAD_BYTES / page;
        // The kernel reads them in the background and tells no one when it
        // is done: poll the page cache until they are all there.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while resident_pages_between(file, LEN, window.0, window.1) < pages {
            assert!(
                std::time::Instant::now() < deadline,
                "{} of {pages} pages ahead of the appends came back",
                resident_pages_between(file, LEN, window.0, window.1)
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        if dropped {
            // Only the window: the rest waits for the appends to come near.
            assert!(resident_pages_between(file, LEN, 12 << 20, LEN) < (4 << 20) / page);
        }
        // Appending less than a step asks for nothing more.
        let warmed = segment.warmed_to;
        segment.write_offset += WARM_STEP_BYTES / 2;
        segment.warm_ahead(ask);
        assert_eq!(segment.warmed_to, warmed);
        segment.write_offset += WARM_STEP_BYTES;
        segment.warm_ahead(ask);
        assert_eq!(segment.warmed_to, segment.write_offset + WARM_AHEAD_BYTES);
        // A request the warmer has no room for is made again next time.
        let warmed = segment.warmed_to;
        segment.write_offset += WARM_STEP_BYTES;
        segment.warm_ahead(|_, _, _| false);
        assert_eq!(segment.warmed_to, warmed);
        segment.warm_ahead(ask);
        assert_eq!(segment.warmed_to, segment.write_offset + WARM_AHEAD_BYTES);
    }

    #[test]
    fn the_prefill_brings_every_page_of_a_segment_into_the_page_cache() {
        const LEN: usize = 1 << 20;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("segment");
        std::fs::write(&path, vec![0u8; LEN]).unwrap();
        let file = File::open(&path).unwrap();
        file.sync_all().unwrap();
        // Clean pages leave the cache on DONTNEED (except on tmpfs, where
        // they are the file and the check proves nothing).
        // SAFETY: plain syscall on an open descriptor.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        let before = resident_pages(&file, LEN);
        prefill_page_cache(&file, &path, LEN as u64).unwrap();
        assert_eq!(
            resident_pages(&file, LEN),
            LEN / page_bytes(),
            "{before} before"
        );
    }

    #[test]
    fn create_reuses_a_free_file_of_its_size_and_drops_others() {
        let dir = tempfile::tempdir().unwrap();
        let free = |sequence: u64| dir.path().join(format::free_file_name(sequence));
        std::fs::write(free(1), vec![0xAB; 4096]).unwrap();
        std::fs::write(free(2), vec![0xCD; 8192]).unwrap();
        std::fs::write(free(3), vec![0xEF; 8192]).unwrap();
        let segment = Segment::create(dir.path(), 9, 8192).unwrap();
        assert!(!free(1).exists(), "a free file of another size is removed");
        assert!(!free(2).exists(), "the oldest of the right size is taken");
        assert!(free(3).exists());
        let bytes = std::fs::read(segment.path()).unwrap();
        assert_eq!(bytes.len(), 8192);
        assert!(bytes[..HEADER_LEN + format::RECORD_HEADER_LEN]
            .iter()
            .all(|&b| b == 0));
        assert!(bytes[HEADER_LEN + format::RECORD_HEADER_LEN..]
            .iter()
            .all(|&b| b == 0xCD));
        assert_eq!(segment.chain, Some(format::chain_seed(9)));
        assert!(!segment.header_durable);
        // A name already taken is never overwritten: a new file instead.
        drop(segment);
        let error = Segment::create(dir.path(), 9, 8192).unwrap_err();
        assert!(
            error.to_string().contains("0000000000000009.wal"),
            "{error}"
        );
        assert!(free(3).exists(), "the free file stays free");
    }

    #[test]
    fn create_refuses_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0000000000000001.wal");
        std::fs::write(&path, b"keep me").unwrap();
        let error = Segment::create(dir.path(), 1, 8192).unwrap_err();
        assert!(
            error.to_string().contains("0000000000000001.wal"),
            "{error}"
        );
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"keep me",
            "an existing file is never clobbered"
        );
    }

    #[test]
    fn mapped_writes_reach_the_file_and_header_write_is_positional() {
        let dir = tempfile::tempdir().unwrap();
        let mut segment = Segment::create(dir.path(), 1, 8192).unwrap();
        segment.map[100..105].copy_from_slice(b"hello");
        segment.file.write_header(&segment.header(3)).unwrap();
        segment.file.sync_data().unwrap();
        let bytes = std::fs::read(segment.path()).unwrap();
        assert_eq!(&bytes[100..105], b"hello");
        let header = format::decode_header(&bytes).unwrap();
        assert_eq!((header.shard_id, header.sequence), (3, 1));
        // The header written through the fd is visible through the mapping.
        assert_eq!(&segment.map[..8], b"corekvWL");
    }
}
