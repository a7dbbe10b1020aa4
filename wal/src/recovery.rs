//! Opening a WAL: lock, classify segment headers, replay records in order,
//! cut a torn tail off the newest segment, refuse corruption anywhere else.
//!
//! Why a bad record means different things in different segments: the header
//! of segment `k + 1` is written only after segment `k` is durable (see the
//! format doc). So every segment before the newest valid one was completely
//! on disk when its successor became valid, and damage there is corruption.
//! Only the newest valid segment can end in records that were being written
//! when the process or machine died; those were never acknowledged by a sync,
//! so cutting them loses nothing that was promised.
//!
//! Recovery hands back a `Recovered` value and never builds the `Wal`
//! itself, so the log's fields stay private to it.

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::WalError;
use crate::format::{self, HeaderProblem, ReadRecord, HEADER_LEN};
use crate::index::{EntryIndex, EntryLocation};
use crate::lock::DirLock;
use crate::segment::{Segment, SegmentFile};
use crate::sync::Position;
use crate::types::{
    ConfState, HardState, RecoveryReport, SnapshotMarker, WalOptions, MAX_SEGMENT_BYTES,
    MIN_SEGMENT_BYTES,
};

/// What replay found on disk, for `Wal` to build itself from. Everything in
/// it is durable: recovery removed what was never synced and cut torn tails.
pub(crate) struct Recovered {
    /// Taken before anything is read and kept by the `Wal` for its whole
    /// life: one `Wal` per directory.
    pub(crate) lock: DirLock,
    pub(crate) dir_file: Arc<SegmentFile>,
    /// Valid segments, oldest first, the newest ready for appends. Empty for
    /// a fresh log: creating the first segment is a write, left to the `Wal`.
    pub(crate) segments: VecDeque<Segment>,
    /// Entries `marker.index + 1..`, in order.
    pub(crate) index: EntryIndex,
    pub(crate) marker: SnapshotMarker,
    /// Sequence of the segment holding the latest snapshot marker record
    /// replayed, which compaction needs to know what is obsolete.
    pub(crate) marker_sequence: u64,
    pub(crate) hard_state: HardState,
    pub(crate) conf_state: Option<ConfState>,
    /// Highest sequence among the segment files found, valid or not: a fresh
    /// first segment comes after it, so no sequence is ever reused.
    pub(crate) last_sequence: u64,
    /// Torn tail and unsynced segments; the `Wal` adds what it removes and
    /// the final counts.
    pub(crate) report: RecoveryReport,
}

/// Locks `dir` (creating it if missing), removes segments that were never
/// synced, replays the valid ones and cuts a torn tail off the newest.
/// Blocking.
pub(crate) fn recover(dir: &Path, options: &WalOptions) -> Result<Recovered, WalError> {
    validate_options(options)?;
    std::fs::create_dir_all(dir).map_err(|e| WalError::io(dir, "create directory", e))?;
    let lock = DirLock::acquire(dir)?;
    let dir_file = Arc::new(SegmentFile::open_dir(dir)?);
    let mut report = RecoveryReport::default();

    let (valid, unsynced, last_sequence) = classify_segments(dir, options.shard_id)?;
    for path in &unsynced {
        if has_records(path)? {
            tracing::warn!(segment = %path.display(), "removing WAL segment whose records were never synced");
        } else {
            tracing::debug!(segment = %path.display(), "removing prepared WAL segment that was never used");
        }
        std::fs::remove_file(path).map_err(|e| WalError::io(path, "remove unsynced segment", e))?;
    }
    if !unsynced.is_empty() {
        dir_file.sync_all()?;
    }
    report.unsynced_segments_removed = unsynced;

    let mut replay = Replay::default();
    let mut segments = VecDeque::with_capacity(valid.len());
    let newest = valid.len().saturating_sub(1);
    for (position, (sequence, path, chain)) in valid.into_iter().enumerate() {
        let mut segment = Segment::open_existing(path, sequence)?;
        segment.chain = chain;
        replay.scan(&mut segment, position == newest, &mut report)?;
        segments.push_back(segment);
    }
    replay.check_log_is_contiguous()?;
    if let Some(newest) = segments.back() {
        newest.prepare_recovered_for_appends()?;
    }

    Ok(Recovered {
        lock,
        dir_file,
        segments,
        index: replay.index,
        marker: replay.marker,
        marker_sequence: replay.marker_position.sequence,
        hard_state: replay.hard_state,
        conf_state: replay.conf_state,
        last_sequence,
        report,
    })
}

fn validate_options(options: &WalOptions) -> Result<(), WalError> {
    let bytes = options.segment_bytes;
    if !(MIN_SEGMENT_BYTES..=MAX_SEGMENT_BYTES).contains(&bytes)
        || bytes % format::RECORD_ALIGN as u64 != 0
    {
        return Err(WalError::InvalidOptions {
            reason: format!(
                "segment_bytes must be a multiple of {} within [{MIN_SEGMENT_BYTES}, {MAX_SEGMENT_BYTES}], got {bytes}",
                format::RECORD_ALIGN
            ),
        });
    }
    Ok(())
}

type Classified = (Vec<(u64, PathBuf, Option<u32>)>, Vec<PathBuf>, u64);

/// Splits the segment files into valid ones (contiguous sequences) and
/// never-synced ones after them; returns the highest sequence seen too.
fn classify_segments(dir: &Path, shard_id: u32) -> Result<Classified, WalError> {
    let listed = crate::segment::files_named(dir, format::parse_segment_file_name)?;
    let last_sequence = listed.last().map_or(0, |(sequence, _)| *sequence);

    let mut valid: Vec<(u64, PathBuf, Option<u32>)> = Vec::new();
    let mut unsynced: Vec<PathBuf> = Vec::new();
    for (sequence, path) in listed {
        match read_header(&path)? {
            Ok(header) => {
                if header.sequence != sequence {
                    let reason = format!(
                        "header sequence {} does not match the file name",
                        header.sequence
                    );
                    return Err(WalError::corrupt(&path, 0, reason));
                }
                if header.shard_id != shard_id {
                    return Err(WalError::WrongShard {
                        segment: path,
                        found: header.shard_id,
                        expected: shard_id,
                    });
                }
                if let Some(hole) = unsynced.first() {
                    let reason = format!(
                        "header was never written, yet the later segment {} is valid: segments are missing data",
                        path.display()
                    );
                    return Err(WalError::corrupt(hole, 0, reason));
                }
                if let Some((previous, _, _)) = valid.last() {
                    if sequence != previous + 1 {
                        let reason = format!("segment sequence jumps from {previous} to {sequence}: segments are missing");
                        return Err(WalError::corrupt(&path, 0, reason));
                    }
                }
                valid.push((sequence, path, header.chain()));
            }
            Err(HeaderProblem::NeverWritten) => unsynced.push(path),
            Err(HeaderProblem::Invalid(reason)) => return Err(WalError::corrupt(&path, 0, reason)),
        }
    }
    Ok((valid, unsynced, last_sequence))
}

fn read_header(path: &Path) -> Result<Result<format::SegmentHeader, HeaderProblem>, WalError> {
    let file = File::open(path).map_err(|e| WalError::io(path, "open segment", e))?;
    let mut bytes = [0u8; HEADER_LEN];
    let mut filled = 0;
    while filled < HEADER_LEN {
        match file.read_at(&mut bytes[filled..], filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(WalError::io(path, "read segment header", e)),
        }
    }
    Ok(format::decode_header(&bytes[..filled]))
}

/// Whether a segment with a zero header had records written into it (as
/// opposed to a segment prepared ahead and never rotated to).
fn has_records(path: &Path) -> Result<bool, WalError> {
    let file = File::open(path).map_err(|e| WalError::io(path, "open segment", e))?;
    let mut length = [0u8; 4];
    match file.read_exact_at(&mut length, HEADER_LEN as u64) {
        Ok(()) => Ok(length != [0u8; 4]),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(WalError::io(path, "read segment", e)),
    }
}

/// The state replay builds, record by record.
struct Replay {
    marker: SnapshotMarker,
    hard_state: HardState,
    conf_state: Option<ConfState>,
    /// Index of `index[0]`. Normally `marker.index + 1`; larger while the
    /// entries before it sit in segments compaction deleted, until a snapshot
    /// marker covering them is replayed.
    log_start: u64,
    index: EntryIndex,
    /// Where the log last started over at `log_start`, to name it if the gap
    /// is never covered.
    log_restart: Option<(PathBuf, u64)>,
    /// End of the latest snapshot marker record (or copy) replayed.
    marker_position: Position,
}

impl Default for Replay {
    fn default() -> Replay {
        Replay {
            marker: SnapshotMarker::default(),
            hard_state: HardState::default(),
            conf_state: None,
            log_start: 1,
            index: EntryIndex::default(),
            log_restart: None,
            marker_position: Position::default(),
        }
    }
}

impl Replay {
    /// Replays one segment's records and sets its write offset to the end of
    /// the valid ones. In the newest segment a bad record is a torn tail (and
    /// in a version 1 segment, so are stray bytes after the last record):
    /// cut off durably. Elsewhere they are corruption.
    fn scan(
        &mut self,
        segment: &mut Segment,
        newest: bool,
        report: &mut RecoveryReport,
    ) -> Result<(), WalError> {
        let mut offset = HEADER_LEN;
        let mut max_entry_index = 0;
        let mut chain = segment.chain;
        let mut torn = false;
        let mut sealed = false;
        let file = Arc::clone(&segment.file);
        loop {
            match format::read_record(&segment.map, offset, chain) {
                ReadRecord::End => break,
                ReadRecord::Invalid(reason) if newest => {
                    tracing::warn!(segment = %segment.path().display(), offset, %reason, "cutting torn WAL tail");
                    torn = true;
                    break;
                }
                ReadRecord::Invalid(reason) => {
                    return Err(WalError::corrupt(segment.path(), offset as u64, reason))
                }
                ReadRecord::Record {
                    crc,
                    kind,
                    payload,
                    payload_offset,
                    next_offset,
                } => {
                    let end = Position {
                        sequence: segment.sequence,
                        offset: next_offset,
                    };
                    let applied = self.apply(&file.path, end, kind, payload, payload_offset);
                    let last_index = applied
                        .map_err(|reason| WalError::corrupt(&file.path, offset as u64, reason))?;
                    max_entry_index = max_entry_index.max(last_index.unwrap_or(0));
                    if chain.is_some() {
                        chain = Some(crc);
                    }
                    sealed = kind == format::KIND_SEAL;
                    offset = next_offset;
                }
            }
        }
        segment.write_offset = offset;
        segment.max_entry_index = max_entry_index;
        segment.chain = chain;
        segment.sealed = sealed;
        if chain.is_some() {
            if !newest && !sealed {
                let reason = format!(
                    "the records end at offset {offset} without the seal record that closes a segment the log moved on from"
                );
                return Err(WalError::corrupt(segment.path(), offset as u64, reason));
            }
            // Version 2: what follows the end may be stale bytes of a recycled
            // file or of a cut tail; no record of them continues this chain.
            // A torn tail only needs the end marked before anything new is
            // appended (appends mark it too, but not durably until a sync).
            if torn {
                segment.terminate();
                segment.file.sync_data()?;
                tracing::warn!(segment = %segment.path().display(), offset, "WAL torn tail cut");
                report.torn_tail = Some((segment.path().to_path_buf(), offset as u64));
            }
            return Ok(());
        }
        let Some((first_dirty, last_dirty)) = nonzero_span(&segment.map[offset..]) else {
            return Ok(());
        };
        if !newest {
            let reason =
                format!("non-zero bytes after the last record, which ends at offset {offset}");
            return Err(WalError::corrupt(
                segment.path(),
                (offset + first_dirty) as u64,
                reason,
            ));
        }
        // Zero the torn tail durably before anything new is appended: a stale
        // but well-formed record left behind a shorter new one would be
        // replayed as if it were part of the log.
        segment.map[offset..offset + last_dirty + 1].fill(0);
        segment.file.sync_data()?;
        tracing::warn!(segment = %segment.path().display(), offset, "WAL torn tail cut");
        report.torn_tail = Some((segment.path().to_path_buf(), offset as u64));
        Ok(())
    }

    /// Applies one record that passed its checksum; `end` is the position
    /// just after it. Returns the last entry index of an entries record.
    fn apply(
        &mut self,
        path: &Path,
        end: Position,
        kind: u8,
        payload: &[u8],
        payload_offset: usize,
    ) -> Result<Option<u64>, String> {
        match kind {
            format::KIND_ENTRIES => self
                .apply_entries(path, end.sequence, payload, payload_offset)
                .map(Some),
            format::KIND_HARD_STATE => {
                self.hard_state = format::decode_hard_state(payload)?;
                Ok(None)
            }
            format::KIND_CONF_STATE => {
                self.conf_state = Some(format::decode_conf_state(payload)?);
                Ok(None)
            }
            format::KIND_SNAPSHOT_MARKER => {
                let (marker, discard_log) = format::decode_snapshot_marker(payload)?;
                self.apply_marker(marker, discard_log, end).map(|()| None)
            }
            format::KIND_SEAL if payload.is_empty() => Ok(None),
            format::KIND_SEAL => Err(format!(
                "seal record expected an empty payload but got {} bytes",
                payload.len()
            )),
            other => Err(format!("unknown record kind {other}")),
        }
    }

    fn apply_entries(
        &mut self,
        path: &Path,
        sequence: u64,
        payload: &[u8],
        payload_offset: usize,
    ) -> Result<u64, String> {
        let first_index = format::read_u64(
            payload
                .get(..8)
                .ok_or("entries payload shorter than 8 bytes")?,
            0,
        );
        if first_index <= self.marker.index {
            return Err(format!(
                "entries record starts at index {first_index}, inside the snapshot marker at index {}",
                self.marker.index
            ));
        }
        let log_end = self.log_start + self.index.len() as u64;
        if first_index < self.log_start || first_index > log_end {
            // Only legal if compaction deleted the segments holding the entries
            // before `first_index`; `check_log_is_contiguous` verifies a
            // snapshot marker covers them by the end of replay.
            self.index.clear();
            self.log_start = first_index;
            let record_offset = payload_offset - format::RECORD_HEADER_LEN - format::KIND_LEN;
            self.log_restart = Some((path.to_path_buf(), record_offset as u64));
        } else {
            self.index.truncate((first_index - self.log_start) as usize);
        }
        let index = &mut self.index;
        let (first, count) = format::decode_entries(payload, |layout| {
            index.push_back(EntryLocation {
                term: layout.term,
                sequence,
                data_offset: (payload_offset + layout.data_offset) as u32,
                data_len: layout.data_len as u32,
                entry_type: layout.entry_type,
            });
        })?;
        Ok(first + u64::from(count) - 1)
    }

    fn apply_marker(
        &mut self,
        marker: SnapshotMarker,
        discard_log: bool,
        end: Position,
    ) -> Result<(), String> {
        if marker.index < self.marker.index {
            return Err(format!(
                "snapshot marker at index {} is older than the one before it at index {}",
                marker.index, self.marker.index
            ));
        }
        if discard_log {
            self.index.clear();
        } else if self.log_start <= marker.index {
            let covered = (marker.index + 1 - self.log_start).min(self.index.len() as u64);
            self.index.remove_front(covered as usize);
            self.log_start += covered;
        }
        if self.index.is_empty() {
            self.log_start = marker.index + 1;
        }
        self.marker = marker;
        self.marker_position = end;
        Ok(())
    }

    fn check_log_is_contiguous(&self) -> Result<(), WalError> {
        if self.log_start == self.marker.index + 1 {
            return Ok(());
        }
        let (segment, offset) = self.log_restart.clone().unwrap_or_default();
        let reason = format!(
            "the log resumes at index {} but the snapshot marker is at index {}: entries {}..{} are missing",
            self.log_start,
            self.marker.index,
            self.marker.index + 1,
            self.log_start - 1
        );
        Err(WalError::corrupt(segment, offset, reason))
    }
}

/// Offsets of the first and last non-zero byte, if any. Skips zero pages
/// fast: the unwritten rest of a segment is usually most of it.
pub(crate) fn nonzero_span(bytes: &[u8]) -> Option<(usize, usize)> {
    const CHUNK: usize = 4096;
    let is_zero = |chunk: &[u8]| chunk.iter().fold(0u8, |acc, &b| acc | b) == 0;
    let first_chunk = bytes.chunks(CHUNK).position(|chunk| !is_zero(chunk))?;
    let first = first_chunk * CHUNK + bytes[first_chunk * CHUNK..].iter().position(|&b| b != 0)?;
    let last_chunk = bytes.chunks(CHUNK).rposition(|chunk| !is_zero(chunk))?;
    let chunk_end = (last_chunk * CHUNK + CHUNK).min(bytes.len());
    let last = last_chunk * CHUNK
        + bytes[last_chunk * CHUNK..chunk_end]
            .iter()
            .rposition(|&b| b != 0)?;
    Some((first, last))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::EntryRef;
    // Only to write the logs that recovery is tested on.
    use crate::wal::Wal;

    const SEGMENT_BYTES: u64 = 4096;
    /// Offset of the first record after the metadata copies of a segment
    /// without conf state: header, hard state record (40), marker record (32).
    const FIRST_RECORD_OFFSET: u64 = HEADER_LEN as u64 + 40 + 32;

    fn options() -> WalOptions {
        WalOptions {
            segment_bytes: SEGMENT_BYTES,
            shard_id: 1,
            recycle_bytes: crate::types::DEFAULT_RECYCLE_BYTES,
        }
    }

    fn open_wal(dir: &Path) -> Result<Wal, WalError> {
        Wal::open(dir, options())
    }

    /// Recovery alone, to look at what replay found (it holds the lock until
    /// dropped).
    fn recover_ok(dir: &Path) -> Recovered {
        recover(dir, &options()).unwrap()
    }

    /// Appends entries `indexes` of term 1, 100 bytes of `byte` each, one
    /// record per entry.
    fn append(wal: &mut Wal, indexes: std::ops::RangeInclusive<u64>, byte: u8) {
        let data = [byte; 100];
        for index in indexes {
            let entry = EntryRef {
                index,
                term: 1,
                entry_type: 0,
                data: &data,
            };
            wal.append_entries_waiting(&[entry]).unwrap();
        }
    }

    /// A synced WAL of `count` entries of 100 bytes (about 35 per segment).
    fn write_log(dir: &Path, count: u64) -> Vec<PathBuf> {
        let mut wal = open_wal(dir).unwrap();
        append(&mut wal, 1..=count, 7);
        wal.sync().unwrap();
        drop(wal);
        segment_paths(&recover_ok(dir))
    }

    fn segment_paths(recovered: &Recovered) -> Vec<PathBuf> {
        let segments = recovered.segments.iter();
        segments.map(|s| s.path().to_path_buf()).collect()
    }

    fn patch(path: &Path, offset: u64, bytes: &[u8]) {
        let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        file.write_all_at(bytes, offset).unwrap();
    }

    fn expect_corrupt(result: Result<Wal, WalError>) -> (PathBuf, u64, String) {
        match result {
            Err(WalError::Corrupt {
                segment,
                offset,
                reason,
            }) => (segment, offset, reason),
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn torn_tail_of_newest_segment_is_cut_and_reported_and_stale_bytes_stay_out() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_log(dir.path(), 10);
        assert_eq!(paths.len(), 1);
        let end = {
            let recovered = recover_ok(dir.path());
            recovered.segments.back().unwrap().write_offset as u64
        };
        // Half a record: a length that promises more than the crc covers.
        patch(&paths[0], end, &[200, 0, 0, 0, 1, 2, 3, 4, 1, 9, 9]);
        patch(&paths[0], end + 900, b"stray page");
        let mut wal = open_wal(dir.path()).unwrap();
        assert_eq!(wal.recovery().torn_tail, Some((paths[0].clone(), end)));
        assert_eq!(wal.last_index(), 10);
        let on_disk = std::fs::read(&paths[0]).unwrap();
        assert_eq!(
            &on_disk[end as usize..end as usize + 8],
            &[0u8; 8],
            "the end is marked on disk"
        );
        assert_eq!(
            &on_disk[end as usize + 900..end as usize + 910],
            b"stray page"
        );
        let data = [1u8; 3];
        let entry = EntryRef {
            index: 11,
            term: 1,
            entry_type: 0,
            data: &data,
        };
        wal.append_entries_waiting(&[entry]).unwrap();
        wal.sync().unwrap();
        drop(wal);
        let wal = open_wal(dir.path()).unwrap();
        assert_eq!(wal.recovery().torn_tail, None);
        assert_eq!(wal.last_index(), 11);
    }

    #[test]
    fn crash_between_header_write_and_data_sync_is_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_log(dir.path(), 120);
        let newest = paths.last().unwrap();
        let first_in_newest = {
            let recovered = recover_ok(dir.path());
            let newest_sequence = recovered.segments.back().unwrap().sequence;
            let mut locations = recovered.index.iter();
            let position = locations.position(|l| l.sequence == newest_sequence);
            position.expect("the newest segment holds entries") as u64 + 1
        };
        // The sync job wrote the newest segment's header, then the machine died
        // before its fdatasync: only the first records' page made it, plus a
        // page of junk further on.
        let mut bytes = std::fs::read(newest).unwrap();
        let keep = FIRST_RECORD_OFFSET as usize + 200;
        bytes[keep..].fill(0);
        bytes[keep + 700..keep + 720].fill(0xee);
        std::fs::write(newest, &bytes).unwrap();
        let wal = open_wal(dir.path()).unwrap();
        let (torn_file, torn_offset) = wal
            .recovery()
            .torn_tail
            .clone()
            .expect("torn tail reported");
        assert_eq!(&torn_file, newest);
        assert!(torn_offset <= keep as u64, "{torn_offset}");
        assert!(
            wal.last_index() >= first_in_newest - 1,
            "older segments are intact"
        );
        assert!(wal.last_index() < 120);
        let mut count = 0;
        wal.entries(1, wal.last_index() + 1, None, |e| {
            assert_eq!(e.data, &[7u8; 100][..]);
            count += 1;
        })
        .unwrap();
        assert_eq!(count, wal.last_index());
    }

    #[test]
    fn bad_record_in_older_segment_is_corruption_naming_file_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_log(dir.path(), 120);
        assert!(paths.len() >= 3, "{paths:?}");
        // A flipped bit in the data of the first entry of segment 1.
        patch(&paths[0], FIRST_RECORD_OFFSET + 40, &[0xff]);
        let (segment, offset, reason) = expect_corrupt(open_wal(dir.path()));
        assert_eq!((segment, offset), (paths[0].clone(), FIRST_RECORD_OFFSET));
        assert!(reason.contains("checksum expected"), "{reason}");
        let message = expect_corrupt_message(dir.path());
        assert!(
            message.contains("0000000000000001.wal is corrupt at offset 104: checksum"),
            "{message}"
        );
    }

    fn expect_corrupt_message(dir: &Path) -> String {
        open_wal(dir).unwrap_err().to_string()
    }

    #[test]
    fn impossible_length_in_older_segment_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_log(dir.path(), 120);
        patch(&paths[1], FIRST_RECORD_OFFSET, &u32::MAX.to_le_bytes());
        let (segment, offset, reason) = expect_corrupt(open_wal(dir.path()));
        assert_eq!((segment, offset), (paths[1].clone(), FIRST_RECORD_OFFSET));
        assert!(reason.contains("exceeds"), "{reason}");
    }

    #[test]
    fn zeroed_record_in_older_segment_is_corruption_not_an_early_end() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_log(dir.path(), 120);
        // Zeroing a record's length ends the records early: the missing seal
        // record gives it away.
        patch(&paths[0], FIRST_RECORD_OFFSET, &[0u8; 8]);
        let (segment, offset, reason) = expect_corrupt(open_wal(dir.path()));
        assert_eq!((segment, offset), (paths[0].clone(), FIRST_RECORD_OFFSET));
        assert!(reason.contains("without the seal record"), "{reason}");
    }

    #[test]
    fn unsynced_segment_after_the_newest_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_log(dir.path(), 10);
        let leftover = dir.path().join(format::segment_file_name(2));
        std::fs::write(&leftover, vec![0u8; 4096]).unwrap();
        let short = dir.path().join(format::segment_file_name(3));
        std::fs::write(&short, b"").unwrap();
        let recovered = recover_ok(dir.path());
        assert_eq!(
            recovered.report.unsynced_segments_removed,
            vec![leftover.clone(), short.clone()]
        );
        assert!(!leftover.exists() && !short.exists());
        assert_eq!(recovered.index.len(), 10);
        assert_eq!(segment_paths(&recovered), paths);
    }

    #[test]
    fn never_written_header_before_a_valid_segment_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_log(dir.path(), 120);
        patch(&paths[1], 0, &[0u8; HEADER_LEN]);
        let (segment, offset, reason) = expect_corrupt(open_wal(dir.path()));
        assert_eq!((segment, offset), (paths[1].clone(), 0));
        assert!(reason.contains("never written"), "{reason}");
    }

    #[test]
    fn damaged_header_is_corruption_even_in_the_newest_segment() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_log(dir.path(), 10);
        patch(&paths[0], 3, b"X");
        let (segment, offset, reason) = expect_corrupt(open_wal(dir.path()));
        assert_eq!((segment, offset), (paths[0].clone(), 0));
        assert!(reason.contains("magic expected"), "{reason}");
    }

    #[test]
    fn segment_of_another_shard_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_log(dir.path(), 10);
        let options = WalOptions {
            segment_bytes: SEGMENT_BYTES,
            shard_id: 2,
            recycle_bytes: crate::types::DEFAULT_RECYCLE_BYTES,
        };
        match Wal::open(dir.path(), options) {
            Err(WalError::WrongShard {
                segment,
                found,
                expected,
            }) => {
                assert_eq!((segment, found, expected), (paths[0].clone(), 1, 2));
            }
            other => panic!("expected WrongShard, got {other:?}"),
        }
    }

    #[test]
    fn missing_middle_segment_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_log(dir.path(), 120);
        std::fs::remove_file(&paths[1]).unwrap();
        let (segment, _, reason) = expect_corrupt(open_wal(dir.path()));
        assert_eq!(segment, paths[2]);
        assert!(reason.contains("jumps from 1 to 3"), "{reason}");
    }

    #[test]
    fn missing_oldest_segment_without_a_covering_snapshot_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_log(dir.path(), 120);
        std::fs::remove_file(&paths[0]).unwrap();
        let (segment, _, reason) = expect_corrupt(open_wal(dir.path()));
        assert_eq!(segment, paths[1]);
        assert!(
            reason.contains("entries 1..") && reason.contains("are missing"),
            "{reason}"
        );
    }

    /// Rewrites a (synced, closed) segment as version 1 wrote it.
    fn rewrite_as_version_1(path: &Path) {
        let (bytes, _) = format::as_version_1(&std::fs::read(path).unwrap());
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn a_version_1_log_is_read_appended_to_and_continued_in_version_2() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_log(dir.path(), 120);
        assert!(paths.len() >= 3);
        for path in &paths {
            rewrite_as_version_1(path);
        }
        let mut wal = open_wal(dir.path()).unwrap();
        assert_eq!((wal.first_index(), wal.last_index()), (1, 120));
        assert_eq!(wal.recovery().torn_tail, None);
        append(&mut wal, 121..=200, 3);
        wal.sync().unwrap();
        drop(wal);
        let recovered = recover_ok(dir.path());
        assert_eq!(recovered.index.len(), 200);
        let versions: Vec<u32> = segment_paths(&recovered)
            .iter()
            .map(|path| read_header(path).unwrap().unwrap().version)
            .collect();
        assert_eq!(versions[..paths.len()], vec![1; paths.len()][..]);
        assert!(versions[paths.len()..]
            .iter()
            .all(|&v| v == format::FORMAT_VERSION));
        assert!(versions.len() > paths.len());
    }

    #[test]
    fn stray_bytes_after_a_version_1_segment_are_still_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_log(dir.path(), 120);
        rewrite_as_version_1(&paths[0]);
        patch(&paths[0], 4095, b"x");
        let (segment, offset, reason) = expect_corrupt(open_wal(dir.path()));
        assert!(
            reason.contains("non-zero bytes after the last record"),
            "{reason}"
        );
        assert_eq!((segment, offset), (paths[0].clone(), 4095));
    }

    #[test]
    fn a_recycled_segment_full_of_old_records_yields_only_its_new_ones() {
        let dir = tempfile::tempdir().unwrap();
        let options = WalOptions {
            recycle_bytes: 4 * 4096,
            ..options()
        };
        let mut wal = Wal::open(dir.path(), options.clone()).unwrap();
        append(&mut wal, 1..=150, 7);
        wal.sync().unwrap();
        wal.compact(150).unwrap();
        wal.sync().unwrap();
        let retired = wal.take_obsolete_segments();
        assert!(retired.len() >= 3, "{retired:?}");
        crate::remove_segments(retired, options.recycle_bytes).unwrap();
        let free = crate::segment::free_files(dir.path()).unwrap();
        assert_eq!(free.len(), 4);
        // Every new segment is an old file (same inode), and what it held
        // before is not read back: only 151..=400 of this log.
        let inodes: Vec<u64> = free
            .iter()
            .map(|(_, p)| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap()))
            .collect();
        // The segment after the active one was prepared before any file was
        // free: enough entries for several more.
        append(&mut wal, 151..=400, 8);
        wal.wait_for_next_segment();
        wal.sync().unwrap();
        drop(wal);
        let wal = Wal::open(dir.path(), options).unwrap();
        assert_eq!(wal.recovery().torn_tail, None);
        assert_eq!((wal.first_index(), wal.last_index()), (151, 400));
        let reused = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "wal"))
            .filter(|p| {
                inodes.contains(&std::os::unix::fs::MetadataExt::ino(
                    &std::fs::metadata(p).unwrap(),
                ))
            })
            .count();
        assert!(reused >= 1, "a new segment reused a retired file");
    }

    #[test]
    fn nonzero_span_finds_both_ends() {
        let mut bytes = vec![0u8; 3 * 4096 + 100];
        assert_eq!(nonzero_span(&bytes), None);
        bytes[5000] = 1;
        assert_eq!(nonzero_span(&bytes), Some((5000, 5000)));
        bytes[3 * 4096 + 99] = 7;
        bytes[17] = 2;
        assert_eq!(nonzero_span(&bytes), Some((17, 3 * 4096 + 99)));
    }

    #[test]
    fn options_are_validated() {
        for segment_bytes in [0, 4095, 4100, MAX_SEGMENT_BYTES + 8] {
            let options = WalOptions {
                segment_bytes,
                shard_id: 0,
                recycle_bytes: crate::types::DEFAULT_RECYCLE_BYTES,
            };
            assert!(
                matches!(
                    validate_options(&options),
                    Err(WalError::InvalidOptions { .. })
                ),
                "{segment_bytes}"
            );
        }
        validate_options(&WalOptions::default()).unwrap();
    }
}
