//! The log of one shard: appends by memcpy into the active segment, an
//! in-memory index over the mapped bytes, group commit through `SyncJob`s,
//! and compaction behind durable snapshot markers.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::WalError;
use crate::format::{
    self, entry_len, record_len, ENTRIES_PREFIX_LEN, ENTRIES_RECORD_OVERHEAD, ENTRY_HEADER_LEN,
    HARD_STATE_LEN, HEADER_LEN, KIND_CONF_STATE, KIND_ENTRIES, KIND_HARD_STATE, KIND_LEN,
    KIND_SNAPSHOT_MARKER, RECORD_HEADER_LEN, SNAPSHOT_MARKER_LEN,
};
use crate::index::{EntryIndex, EntryLocation};
use crate::lock::DirLock;
use crate::prepare::Preparer;
use crate::recovery::{self, Recovered};
use crate::segment::{Segment, SegmentFile};
use crate::sync::{Position, SyncJob, SyncOutcome, SyncStep};
use crate::types::{ConfState, EntryRef, HardState, RecoveryReport, SnapshotMarker, WalOptions};
use crate::warm::Warmer;

/// The write-ahead log of one shard. See the crate docs for the model.
pub struct Wal {
    dir: PathBuf,
    dir_file: Arc<SegmentFile>,
    options: WalOptions,
    /// Declared before the lock so it is dropped (its thread joined) first:
    /// the preparer must not create a file once another `Wal` may own the
    /// directory.
    preparer: Preparer,
    /// Asks for the pages ahead of the appends, off the appending thread.
    warmer: Warmer,
    _lock: DirLock,
    /// Live segments, oldest first; the last one is the active one.
    segments: VecDeque<Segment>,
    /// Entries `first_index()..=last_index()`.
    index: EntryIndex,
    marker: SnapshotMarker,
    hard_state: HardState,
    conf_state: Option<ConfState>,
    /// Everything before this position is durable.
    synced: Position,
    sync_in_flight: bool,
    /// Segments created since open; the directory is durable for the first
    /// `synced_created_segments` of them.
    created_segments: u64,
    synced_created_segments: u64,
    /// How many of `created_segments` were made out of free files.
    reused_segments: u64,
    /// Snapshot marker records not known durable yet: end position, index.
    pending_markers: VecDeque<(Position, u64)>,
    /// The latest durable snapshot marker record: its segment and index.
    durable_marker: (u64, u64),
    obsolete: Vec<PathBuf>,
    poisoned: bool,
    bytes_written: u64,
    recovery: RecoveryReport,
}

impl Wal {
    /// Opens (creating if missing) the WAL in `dir`: takes the directory lock
    /// (file `LOCK` holding our pid, flock), then recovers: replays every
    /// segment, cuts a torn tail off the newest one, and refuses corruption
    /// anywhere else. Blocking; run it before the shard's loop starts.
    pub fn open(dir: &Path, options: WalOptions) -> Result<Wal, WalError> {
        let recovered = recovery::recover(dir, &options)?;
        Wal::from_recovered(dir, options, recovered)
    }

    /// Finishes opening from what replay found. Recovery only reads and
    /// repairs what is on disk; writing (a fresh log's first segment, its
    /// metadata copies) and compaction are the log's own business.
    fn from_recovered(
        dir: &Path,
        options: WalOptions,
        recovered: Recovered,
    ) -> Result<Wal, WalError> {
        let Recovered {
            lock,
            dir_file,
            segments,
            index,
            marker,
            marker_sequence,
            hard_state,
            conf_state,
            last_sequence,
            report,
        } = recovered;
        let mut wal = Wal {
            dir: dir.to_path_buf(),
            dir_file,
            preparer: Preparer::start(dir, options.segment_bytes, options.shard_id),
            warmer: Warmer::start(options.shard_id),
            options,
            _lock: lock,
            segments,
            index,
            marker,
            hard_state,
            conf_state,
            synced: Position::default(),
            sync_in_flight: false,
            created_segments: 0,
            synced_created_segments: 0,
            reused_segments: 0,
            pending_markers: VecDeque::new(),
            // Everything replayed was on disk, so the latest marker is durable.
            durable_marker: (marker_sequence, marker.index),
            obsolete: Vec::new(),
            poisoned: false,
            bytes_written: 0,
            recovery: report,
        };
        if wal.segments.is_empty() {
            wal.create_first_segment(last_sequence + 1)?;
        }
        let active = wal.active();
        wal.synced = Position {
            sequence: active.sequence,
            offset: active.write_offset,
        };
        // Everything recovered is on disk, so obsolete segments may go at
        // once; they wait in `take_obsolete_segments` like compaction's,
        // for the caller to remove off its thread (removal sleeps between
        // steps, and open runs on the shard's thread).
        wal.collect_obsolete();
        wal.recovery.obsolete_segments = wal.obsolete.clone();
        wal.recovery.segments = wal.segments.len();
        wal.recovery.entries = wal.index.len() as u64;
        let next = wal.active().sequence + 1;
        wal.preparer.request(next);
        Ok(wal)
    }

    /// A fresh log (or one whose only segments were never synced): the first
    /// segment's header is written and synced at once, there being nothing older
    /// that must be durable first.
    fn create_first_segment(&mut self, sequence: u64) -> Result<(), WalError> {
        let segment = Segment::create(&self.dir, sequence, self.options.segment_bytes)?;
        segment
            .file
            .write_header(&segment.header(self.options.shard_id))?;
        self.segments.push_back(segment);
        self.write_metadata_copies();
        self.pending_markers.clear();
        let segment = self.segments.back_mut().expect("just pushed");
        segment.file.sync_data()?;
        segment.header_durable = true;
        self.dir_file.sync_all()
    }

    /// What recovery did (torn tail cut, segments removed), for logging.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// Appends entries with consecutive indexes. If the first index is <=
    /// `last_index()`, the log's suffix from that index is discarded first
    /// (a raft log conflict); on disk the newer record wins on replay. A first
    /// index > `last_index() + 1` or < `first_index()` is `NonContiguous`.
    ///
    /// The entries are copied into the mapped active segment: no system call
    /// unless the segment is full and a new one is created (rotation). A batch
    /// bigger than the room left is split across records and segments; only a
    /// single entry too large for an empty segment is `EntryTooLarge`, checked
    /// for the whole batch before anything is written.
    ///
    /// If rotation cannot take the next segment (`SegmentNotReady`,
    /// `CannotGrow`: see [`WalError::is_retryable`]) the first
    /// [`WalError::appended`] entries were appended and the rest were not;
    /// append the rest later.
    pub fn append_entries<'a>(&mut self, entries: &[EntryRef<'a>]) -> Result<(), WalError> {
        self.check_writable()?;
        let Some(first) = entries.first() else {
            return Ok(());
        };
        self.check_appendable(entries)?;
        let mut rest = entries;
        let mut truncated = false;
        while !rest.is_empty() {
            let (count, body_len) = self.entries_fitting(rest);
            if count == 0 {
                let appended = entries.len() - rest.len();
                self.rotate().map_err(|e| e.with_appended(appended))?;
                let (count, _) = self.entries_fitting(rest);
                assert!(
                    count > 0,
                    "an entry of {} bytes passed the size check but does not fit an empty segment ({} bytes left)",
                    rest[0].data.len(),
                    self.active().remaining()
                );
                continue;
            }
            if !truncated {
                // Raft conflict: whatever the log held from `first.index` on
                // is replaced, in memory when the first record replacing it
                // is written (on disk the newer record wins on replay).
                self.index
                    .truncate((first.index - self.first_index()) as usize);
                truncated = true;
            }
            self.put_entries(&rest[..count], body_len);
            rest = &rest[count..];
        }
        Ok(())
    }

    /// [`Wal::append_entries`] that waits for the preparer instead of
    /// returning `SegmentNotReady`: for start-up, tools and tests, never a
    /// shard's loop. `CannotGrow` is still returned.
    pub fn append_entries_waiting(&mut self, entries: &[EntryRef<'_>]) -> Result<(), WalError> {
        let mut rest = entries;
        loop {
            match self.append_entries(rest) {
                Err(WalError::SegmentNotReady { appended, .. }) => {
                    rest = &rest[appended..];
                    self.wait_for_next_segment();
                }
                other => return other,
            }
        }
    }

    /// Blocks until the preparer has answered for the segment after the
    /// active one (ready or failed), so the next rotation does not return
    /// `SegmentNotReady`. For start-up, tools and tests.
    pub fn wait_for_next_segment(&mut self) {
        let next = self.active().sequence + 1;
        self.preparer.wait(next);
    }

    /// Records the hard state; the latest one is returned after a restart
    /// once a sync covering it finished.
    pub fn set_hard_state(&mut self, hard_state: HardState) -> Result<(), WalError> {
        self.check_writable()?;
        self.write_small_record(KIND_HARD_STATE, &format::encode_hard_state(hard_state))?;
        self.hard_state = hard_state;
        Ok(())
    }

    /// Records the membership. It is copied into every new segment, so it
    /// must leave room for entries: at most half a segment.
    pub fn set_conf_state(&mut self, conf_state: &ConfState) -> Result<(), WalError> {
        self.check_writable()?;
        let bytes = record_len(KIND_LEN + format::conf_state_payload_len(conf_state));
        let max = self.options.segment_bytes as usize / 2 - HEADER_LEN - Self::fixed_metadata_len();
        if bytes > max {
            return Err(WalError::ConfStateTooLarge {
                bytes: bytes as u64,
                max: max as u64,
            });
        }
        self.write_small_record(KIND_CONF_STATE, &format::encode_conf_state(conf_state))?;
        self.conf_state = Some(conf_state.clone());
        Ok(())
    }

    /// Records that a durable state-machine snapshot covers everything up to
    /// `marker.index` (whose term is `marker.term`). The caller promises the
    /// snapshot is durable before calling.
    ///
    /// If the log holds `marker.index` with the same term, entries after it
    /// are kept (compaction); otherwise the whole log is discarded (a snapshot
    /// from the leader replaced it). Afterwards `first_index() == index + 1`
    /// and `term(index) == Some(term)`, even with no entries.
    ///
    /// Segments that hold only entries <= index become obsolete once this
    /// record is durable (a later `finish_sync`); their paths are then handed
    /// out by `take_obsolete_segments` for the caller to delete off the shard
    /// thread with [`crate::remove_segments`].
    pub fn apply_snapshot_marker(&mut self, marker: SnapshotMarker) -> Result<(), WalError> {
        self.check_writable()?;
        if marker.index < self.marker.index {
            return Err(WalError::SnapshotMarkerRegressed {
                index: marker.index,
                current_index: self.marker.index,
            });
        }
        let keep_log = self.term(marker.index) == Some(marker.term);
        let end = self.write_small_record(
            KIND_SNAPSHOT_MARKER,
            &format::encode_snapshot_marker(marker, !keep_log),
        )?;
        if keep_log {
            let covered = (marker.index + 1 - self.first_index()) as usize;
            self.index.remove_front(covered);
        } else {
            self.index.clear();
        }
        self.marker = marker;
        self.pending_markers.push_back((end, marker.index));
        Ok(())
    }

    /// Drops the entries `<= index` that a durable state-machine snapshot now
    /// covers: `apply_snapshot_marker` at `index` with the log's own term
    /// there, so the log after it is kept. The caller promises the snapshot
    /// is durable. `OutOfRange` unless `first_index() - 1 <= index <=
    /// last_index()`.
    pub fn compact(&mut self, index: u64) -> Result<(), WalError> {
        let Some(term) = self.term(index) else {
            return Err(WalError::OutOfRange {
                low: index,
                high: index + 1,
                first_index: self.first_index(),
                last_index: self.last_index(),
            });
        };
        self.apply_snapshot_marker(SnapshotMarker { index, term })
    }

    /// Paths of segments made obsolete by a durable snapshot marker since the
    /// last call. Delete them with [`crate::remove_segments`] (blocking).
    pub fn take_obsolete_segments(&mut self) -> Vec<PathBuf> {
        std::mem::take(&mut self.obsolete)
    }

    /// Starts making everything appended so far durable. `Ok(None)` if
    /// nothing is unsynced; `SyncInFlight` while a job is outstanding (at
    /// most one). Run the job (it owns what it needs) while appending goes
    /// on, then hand its outcome to `finish_sync`: that is group commit.
    pub fn begin_sync(&mut self) -> Result<Option<SyncJob>, WalError> {
        self.check_writable()?;
        if self.sync_in_flight {
            return Err(WalError::SyncInFlight);
        }
        let active = self.active();
        let target = Position {
            sequence: active.sequence,
            offset: active.write_offset,
        };
        let directory_dirty = self.created_segments > self.synced_created_segments;
        if target == self.synced && !directory_dirty {
            return Ok(None);
        }
        let mut steps = Vec::with_capacity(2);
        if directory_dirty {
            steps.push(SyncStep::Directory(Arc::clone(&self.dir_file)));
        }
        for segment in self
            .segments
            .iter()
            .filter(|s| s.sequence >= self.synced.sequence)
        {
            let durable = segment.header_durable
                && segment.sequence == self.synced.sequence
                && segment.write_offset == self.synced.offset;
            if durable {
                continue;
            }
            if !segment.header_durable {
                steps.push(SyncStep::WriteHeader(
                    Arc::clone(&segment.file),
                    segment.header(self.options.shard_id),
                ));
            }
            steps.push(SyncStep::DataSync(Arc::clone(&segment.file)));
        }
        self.sync_in_flight = true;
        Ok(Some(SyncJob {
            steps,
            target,
            created_segments: self.created_segments,
        }))
    }

    /// Takes back a job's outcome: on success everything appended before its
    /// `begin_sync` is durable (and segments made obsolete by a now durable
    /// snapshot marker are queued for `take_obsolete_segments`); on error the
    /// WAL enters the failed state and the error is returned.
    ///
    /// # Panics
    ///
    /// If no sync is in flight (an outcome without a job is a caller bug).
    pub fn finish_sync(&mut self, outcome: SyncOutcome) -> Result<(), WalError> {
        assert!(
            self.sync_in_flight,
            "finish_sync without a sync in flight: {outcome:?}"
        );
        self.sync_in_flight = false;
        if let Err(error) = outcome.result {
            return Err(self.poison(error));
        }
        self.synced = self.synced.max(outcome.target);
        self.synced_created_segments = self.synced_created_segments.max(outcome.created_segments);
        for segment in self.segments.iter_mut() {
            if segment.sequence <= outcome.target.sequence {
                segment.header_durable = true;
            }
            // Sealed (the target is in a later segment) and so fully synced.
            if segment.sequence < outcome.target.sequence {
                segment.release_pages();
            } else if segment.sequence == outcome.target.sequence {
                segment.release_synced_pages(outcome.target.offset);
            }
        }
        while let Some(&(end, index)) = self.pending_markers.front() {
            if end > self.synced {
                break;
            }
            self.durable_marker = (end.sequence, index);
            self.pending_markers.pop_front();
        }
        self.collect_obsolete();
        Ok(())
    }

    /// Blocking `begin_sync` + `run_blocking` + `finish_sync`, for tests and
    /// tools. A shard thread uses the split form with `SyncJob::run`.
    pub fn sync(&mut self) -> Result<(), WalError> {
        match self.begin_sync()? {
            Some(job) => self.finish_sync(job.run_blocking()),
            None => Ok(()),
        }
    }

    /// Calls `f` for each entry in `[low, high)`, in order, borrowing the data
    /// from the mapping. With `max_bytes`, stops before the first entry that
    /// would make the total data size exceed it, except that the first entry
    /// is always given (raft-rs `limit_size` semantics).
    ///
    /// `OutOfRange` unless `first_index() <= low <= high <= last_index() + 1`.
    pub fn entries(
        &self,
        low: u64,
        high: u64,
        max_bytes: Option<u64>,
        mut f: impl FnMut(EntryRef<'_>),
    ) -> Result<(), WalError> {
        let first_index = self.first_index();
        if low < first_index || high > self.last_index() + 1 || low > high {
            return Err(WalError::OutOfRange {
                low,
                high,
                first_index,
                last_index: self.last_index(),
            });
        }
        let mut total_bytes = 0u64;
        let front_sequence = self.segments.front().map_or(0, |s| s.sequence);
        let locations = self
            .index
            .range((low - first_index) as usize..(high - first_index) as usize);
        for (index, location) in (low..).zip(locations) {
            total_bytes += u64::from(location.data_len);
            if index > low && max_bytes.is_some_and(|max| total_bytes > max) {
                break;
            }
            let segment = &self.segments[(location.sequence - front_sequence) as usize];
            let start = location.data_offset as usize;
            f(EntryRef {
                index,
                term: location.term,
                entry_type: location.entry_type,
                data: &segment.map[start..start + location.data_len as usize],
            });
        }
        Ok(())
    }

    /// The term of the entry at `index`: `Some` for `first_index() - 1` (the
    /// snapshot marker) through `last_index()`, `None` otherwise.
    pub fn term(&self, index: u64) -> Option<u64> {
        if index == self.marker.index {
            return Some(self.marker.term);
        }
        let offset = index.checked_sub(self.first_index())?;
        self.index
            .get(offset as usize)
            .map(|location| location.term)
    }

    /// Index of the first entry held: the snapshot marker's index + 1 (1 for
    /// a fresh log).
    pub fn first_index(&self) -> u64 {
        self.marker.index + 1
    }

    /// Index of the last entry held; `first_index() - 1` when empty.
    pub fn last_index(&self) -> u64 {
        self.marker.index + self.index.len() as u64
    }

    /// The latest hard state appended.
    pub fn hard_state(&self) -> HardState {
        self.hard_state
    }

    /// The latest conf state appended, if any ever was.
    pub fn conf_state(&self) -> Option<ConfState> {
        self.conf_state.clone()
    }

    /// The latest snapshot marker appended ((0, 0) for a fresh log).
    pub fn snapshot_marker(&self) -> SnapshotMarker {
        self.marker
    }

    /// Live segment files.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Segments started since open by rotation: (made as new files, made
    /// out of free files).
    pub fn segments_started(&self) -> (u64, u64) {
        (
            self.created_segments - self.reused_segments,
            self.reused_segments,
        )
    }

    /// Record bytes appended since open (headers and padding included).
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    /// The WAL's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn check_writable(&self) -> Result<(), WalError> {
        if self.poisoned {
            return Err(WalError::Poisoned);
        }
        Ok(())
    }

    fn poison(&mut self, error: WalError) -> WalError {
        tracing::error!(dir = %self.dir.display(), %error, "WAL failed; refusing writes until reopened");
        self.poisoned = true;
        error
    }

    fn check_appendable(&self, entries: &[EntryRef<'_>]) -> Result<(), WalError> {
        let first = entries[0].index;
        let error = |index| WalError::NonContiguous {
            index,
            first_index: self.first_index(),
            last_index: self.last_index(),
        };
        if first < self.first_index() || first > self.last_index() + 1 {
            return Err(error(first));
        }
        let max = self.max_entry_data_len();
        for (entry, expected) in entries.iter().zip(first..) {
            if entry.index != expected {
                return Err(error(entry.index));
            }
            if entry.data.len() as u64 > max {
                return Err(WalError::EntryTooLarge {
                    bytes: entry.data.len() as u64,
                    max,
                });
            }
        }
        Ok(())
    }

    /// The largest entry data an empty segment (header and metadata copies
    /// written) holds in one entries record.
    fn max_entry_data_len(&self) -> u64 {
        let room = self.options.segment_bytes as usize
            - HEADER_LEN
            - self.metadata_len()
            - format::SEAL_RECORD_LEN;
        (room - ENTRIES_RECORD_OVERHEAD - ENTRY_HEADER_LEN).min(u32::MAX as usize) as u64
    }

    /// Bytes of the hard state and snapshot marker records.
    fn fixed_metadata_len() -> usize {
        record_len(KIND_LEN + HARD_STATE_LEN) + record_len(KIND_LEN + SNAPSHOT_MARKER_LEN)
    }

    /// Bytes of the metadata copies that start every segment.
    fn metadata_len(&self) -> usize {
        let conf_state = self.conf_state.as_ref().map_or(0, |cs| {
            record_len(KIND_LEN + format::conf_state_payload_len(cs))
        });
        Self::fixed_metadata_len() + conf_state
    }

    fn active(&self) -> &Segment {
        self.segments
            .back()
            .expect("a WAL always has an active segment")
    }

    /// How many of `entries` fit in one record in the active segment, and
    /// that record's body length.
    fn entries_fitting(&self, entries: &[EntryRef<'_>]) -> (usize, usize) {
        let remaining = self.active().remaining();
        let mut body_len = KIND_LEN + ENTRIES_PREFIX_LEN;
        let mut count = 0;
        for entry in entries {
            let next = body_len + entry_len(entry.data.len());
            if record_len(next) > remaining {
                break;
            }
            body_len = next;
            count += 1;
        }
        (count, body_len)
    }

    /// Copies `entries` as one record into the active segment (room checked
    /// by `entries_fitting`) and indexes them.
    fn put_entries(&mut self, entries: &[EntryRef<'_>], body_len: usize) {
        let segment = self
            .segments
            .back_mut()
            .expect("a WAL always has an active segment");
        let start = segment.write_offset;
        let length = record_len(body_len);
        let record = &mut segment.map[start..start + length];
        let first_index = entries[0].index;
        let count = u32::try_from(entries.len()).expect("entries in one record fit in u32");
        let prefix = RECORD_HEADER_LEN + KIND_LEN;
        record[RECORD_HEADER_LEN] = KIND_ENTRIES;
        record[prefix..prefix + 8].copy_from_slice(&first_index.to_le_bytes());
        record[prefix + 8..prefix + ENTRIES_PREFIX_LEN].copy_from_slice(&count.to_le_bytes());
        let mut offset = prefix + ENTRIES_PREFIX_LEN;
        for entry in entries {
            let data_len = entry.data.len();
            let slot = &mut record[offset..offset + ENTRY_HEADER_LEN + data_len];
            slot[0..8].copy_from_slice(&entry.term.to_le_bytes());
            slot[8] = entry.entry_type;
            slot[9..13].copy_from_slice(&(data_len as u32).to_le_bytes());
            slot[ENTRY_HEADER_LEN..].copy_from_slice(entry.data);
            self.index.push_back(EntryLocation {
                term: entry.term,
                sequence: segment.sequence,
                data_offset: (start + offset + ENTRY_HEADER_LEN) as u32,
                data_len: data_len as u32,
                entry_type: entry.entry_type,
            });
            offset += ENTRY_HEADER_LEN + data_len;
        }
        debug_assert_eq!(offset, RECORD_HEADER_LEN + body_len);
        format::seal_record(record, body_len, &mut segment.chain);
        segment.write_offset += length;
        segment.terminate();
        segment.warm_ahead(|file, from, len| self.warmer.warm(file, from, len));
        segment.max_entry_index = segment
            .max_entry_index
            .max(first_index + entries.len() as u64 - 1);
        self.bytes_written += length as u64;
    }

    /// Writes a metadata record, rotating first if it does not fit. Returns
    /// the position just after it.
    fn write_small_record(&mut self, kind: u8, payload: &[u8]) -> Result<Position, WalError> {
        if record_len(KIND_LEN + payload.len()) > self.active().remaining() {
            self.rotate()?;
        }
        Ok(self.put_record(kind, payload))
    }

    /// Writes a record into the active segment, which must have room.
    fn put_record(&mut self, kind: u8, payload: &[u8]) -> Position {
        let segment = self
            .segments
            .back_mut()
            .expect("a WAL always has an active segment");
        let start = segment.write_offset;
        let length = record_len(KIND_LEN + payload.len());
        assert!(
            length <= segment.remaining(),
            "record of {length} bytes does not fit the {} bytes left in {}",
            segment.remaining(),
            segment.path().display()
        );
        format::write_record(
            &mut segment.map[start..start + length],
            kind,
            payload,
            &mut segment.chain,
        );
        segment.write_offset += length;
        segment.terminate();
        segment.warm_ahead(|file, from, len| self.warmer.warm(file, from, len));
        self.bytes_written += length as u64;
        Position {
            sequence: segment.sequence,
            offset: segment.write_offset,
        }
    }

    /// Seals the active segment and starts the next one, prepared ahead
    /// (header left zero until the sync job writes it), and copies the
    /// metadata in, so older segments can be deleted without losing it.
    /// If the next segment is not ready or could not be made, nothing
    /// changes and the (retryable) error is returned.
    fn rotate(&mut self) -> Result<(), WalError> {
        let sequence = self.active().sequence + 1;
        let segment = self.preparer.take(sequence)?;
        assert_eq!(
            segment.sequence,
            self.active().sequence + 1,
            "the prepared segment must follow the active one"
        );
        let sealed = self
            .segments
            .back_mut()
            .expect("a WAL always has an active segment")
            .seal();
        self.bytes_written += sealed as u64;
        if segment.reused {
            self.reused_segments += 1;
        }
        self.segments.push_back(segment);
        self.created_segments += 1;
        self.write_metadata_copies();
        self.preparer.request(sequence + 1);
        Ok(())
    }

    fn write_metadata_copies(&mut self) {
        self.put_record(KIND_HARD_STATE, &format::encode_hard_state(self.hard_state));
        if let Some(conf_state) = self.conf_state.take() {
            self.put_record(KIND_CONF_STATE, &format::encode_conf_state(&conf_state));
            self.conf_state = Some(conf_state);
        }
        // A copy never discards: the state it restates is already applied.
        let end = self.put_record(
            KIND_SNAPSHOT_MARKER,
            &format::encode_snapshot_marker(self.marker, false),
        );
        if self.marker.index > 0 {
            self.pending_markers.push_back((end, self.marker.index));
        }
    }

    /// Moves the oldest segments that hold nothing live to `obsolete`: those
    /// before the segment of the latest durable snapshot marker whose entries
    /// are all covered by it. Only a prefix, so the files left always form a
    /// contiguous run of sequence numbers.
    fn collect_obsolete(&mut self) {
        let (marker_sequence, marker_index) = self.durable_marker;
        while self.segments.len() > 1 {
            let oldest = &self.segments[0];
            if oldest.sequence >= marker_sequence || oldest.max_entry_index > marker_index {
                break;
            }
            let segment = self.segments.pop_front().expect("checked non-empty");
            self.obsolete.push(segment.file.path.clone());
        }
    }
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal")
            .field("dir", &self.dir)
            .field("first_index", &self.first_index())
            .field("last_index", &self.last_index())
            .field("segments", &self.segments.len())
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL_SEGMENT_BYTES: u64 = 4096;

    fn options(segment_bytes: u64) -> WalOptions {
        WalOptions {
            segment_bytes,
            shard_id: 3,
            recycle_bytes: crate::types::DEFAULT_RECYCLE_BYTES,
        }
    }

    fn open(dir: &Path) -> Wal {
        Wal::open(dir, options(SMALL_SEGMENT_BYTES)).unwrap()
    }

    /// Owned entries, so tests can build batches without lifetimes.
    fn batch(first_index: u64, count: u64, term: u64, data_len: usize) -> Vec<(u64, u64, Vec<u8>)> {
        (first_index..first_index + count)
            .map(|index| (index, term, vec![(index % 251) as u8; data_len]))
            .collect()
    }

    /// The owned entries as the WAL takes them.
    fn refs(entries: &[(u64, u64, Vec<u8>)]) -> Vec<EntryRef<'_>> {
        entries
            .iter()
            .map(|(index, term, data)| EntryRef {
                index: *index,
                term: *term,
                entry_type: (*index % 3) as u8,
                data,
            })
            .collect()
    }

    fn append(wal: &mut Wal, entries: &[(u64, u64, Vec<u8>)]) -> Result<(), WalError> {
        let result = wal.append_entries_waiting(&refs(entries));
        // The small records tests write next (hard state, markers) may
        // rotate too: have the next segment ready, as a shard would retry.
        wal.wait_for_next_segment();
        result
    }

    fn read_all(wal: &Wal) -> Vec<(u64, u64, Vec<u8>)> {
        let mut out = Vec::new();
        wal.entries(wal.first_index(), wal.last_index() + 1, None, |entry| {
            assert_eq!(entry.entry_type, (entry.index % 3) as u8);
            out.push((entry.index, entry.term, entry.data.to_vec()));
        })
        .unwrap();
        out
    }

    #[test]
    fn fresh_log_is_empty_and_has_nothing_to_sync() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = open(dir.path());
        assert_eq!((wal.first_index(), wal.last_index()), (1, 0));
        assert_eq!(wal.term(0), Some(0));
        assert_eq!(wal.term(1), None);
        assert_eq!(wal.hard_state(), HardState::default());
        assert_eq!(wal.conf_state(), None);
        assert_eq!(wal.snapshot_marker(), SnapshotMarker::default());
        assert_eq!(wal.segment_count(), 1);
        assert!(wal.begin_sync().unwrap().is_none());
        assert_eq!(wal.recovery().torn_tail, None);
        assert!(dir.path().join("0000000000000001.wal").exists());
    }

    #[test]
    fn appended_entries_read_back_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let entries = batch(1, 10, 2, 7);
        {
            let mut wal = open(dir.path());
            append(&mut wal, &entries).unwrap();
            assert_eq!(read_all(&wal), entries);
            assert_eq!((wal.first_index(), wal.last_index()), (1, 10));
            assert_eq!(wal.term(10), Some(2));
            assert_eq!(wal.term(11), None);
            wal.sync().unwrap();
        }
        let wal = open(dir.path());
        assert_eq!(read_all(&wal), entries);
        assert_eq!(wal.recovery().entries, 10);
    }

    #[test]
    fn entries_respects_range_and_byte_budget() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = open(dir.path());
        append(&mut wal, &batch(1, 5, 1, 10)).unwrap();
        let collect = |low, high, max| {
            let mut indexes = Vec::new();
            wal.entries(low, high, max, |e| indexes.push(e.index))
                .unwrap();
            indexes
        };
        assert_eq!(collect(2, 5, None), vec![2, 3, 4]);
        assert_eq!(collect(3, 3, None), Vec::<u64>::new());
        assert_eq!(
            collect(1, 6, Some(25)),
            vec![1, 2],
            "20 bytes fit, a third entry would make 30"
        );
        assert_eq!(collect(1, 6, Some(30)), vec![1, 2, 3]);
        assert_eq!(
            collect(2, 6, Some(0)),
            vec![2],
            "the first entry is always given"
        );
        for (low, high) in [(0, 2), (1, 7), (4, 3)] {
            let error = wal.entries(low, high, None, |_| {}).unwrap_err();
            assert!(matches!(error, WalError::OutOfRange { .. }), "{error}");
        }
    }

    #[test]
    fn overlapping_append_discards_the_suffix_in_memory_and_on_replay() {
        let dir = tempfile::tempdir().unwrap();
        let mut expected = batch(1, 10, 1, 5);
        {
            let mut wal = open(dir.path());
            append(&mut wal, &expected).unwrap();
            let conflicting = batch(6, 2, 2, 9);
            append(&mut wal, &conflicting).unwrap();
            expected.truncate(5);
            expected.extend(conflicting);
            assert_eq!(read_all(&wal), expected);
            assert_eq!(wal.last_index(), 7);
            wal.sync().unwrap();
        }
        assert_eq!(read_all(&open(dir.path())), expected);
    }

    #[test]
    fn non_contiguous_appends_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = open(dir.path());
        append(&mut wal, &batch(1, 3, 1, 1)).unwrap();
        let gap = append(&mut wal, &batch(5, 1, 1, 1)).unwrap_err();
        assert!(
            matches!(
                gap,
                WalError::NonContiguous {
                    index: 5,
                    first_index: 1,
                    last_index: 3
                }
            ),
            "{gap}"
        );
        let mut holey = batch(4, 2, 1, 1);
        holey[1].0 = 9;
        let error = append(&mut wal, &holey).unwrap_err();
        assert!(
            matches!(error, WalError::NonContiguous { index: 9, .. }),
            "{error}"
        );
        assert_eq!(wal.last_index(), 3, "a refused batch writes nothing");
        wal.apply_snapshot_marker(SnapshotMarker { index: 2, term: 1 })
            .unwrap();
        let below = append(&mut wal, &batch(2, 1, 1, 1)).unwrap_err();
        assert!(
            matches!(
                below,
                WalError::NonContiguous {
                    index: 2,
                    first_index: 3,
                    ..
                }
            ),
            "{below}"
        );
    }

    #[test]
    fn batches_larger_than_a_segment_are_split_and_huge_entries_refused() {
        let dir = tempfile::tempdir().unwrap();
        let entries = batch(1, 100, 1, 300);
        {
            let mut wal = open(dir.path());
            append(&mut wal, &entries).unwrap();
            assert!(
                wal.segment_count() >= 8,
                "30 KB over 4 KiB segments: {}",
                wal.segment_count()
            );
            assert_eq!(read_all(&wal), entries);
            let max = wal.max_entry_data_len();
            let huge = batch(101, 1, 1, max as usize + 1);
            match append(&mut wal, &huge).unwrap_err() {
                WalError::EntryTooLarge {
                    bytes,
                    max: reported,
                } => {
                    assert_eq!((bytes, reported), (max + 1, max));
                }
                other => panic!("expected EntryTooLarge, got {other}"),
            }
            append(&mut wal, &batch(101, 1, 1, max as usize)).expect("the largest entry fits");
            wal.sync().unwrap();
        }
        let wal = open(dir.path());
        assert_eq!(read_all(&wal)[..100], entries[..]);
        assert_eq!(wal.last_index(), 101);
    }

    #[test]
    fn hard_state_and_conf_state_survive_reopen_and_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let hard_state = HardState {
            term: 5,
            vote: 2,
            commit: 40,
        };
        let conf_state = ConfState {
            voters: vec![1, 2, 3],
            learners: vec![4],
        };
        {
            let mut wal = open(dir.path());
            wal.set_hard_state(hard_state).unwrap();
            wal.set_conf_state(&conf_state).unwrap();
            assert_eq!(wal.hard_state(), hard_state);
            assert_eq!(wal.conf_state(), Some(conf_state.clone()));
            // Push the records above into older segments and compact those
            // away: the copies at the start of each segment must carry them.
            append(&mut wal, &batch(1, 60, 5, 200)).unwrap();
            wal.apply_snapshot_marker(SnapshotMarker { index: 60, term: 5 })
                .unwrap();
            wal.sync().unwrap();
            remove_segments_now(&mut wal);
        }
        let wal = open(dir.path());
        assert_eq!(wal.hard_state(), hard_state);
        assert_eq!(wal.conf_state(), Some(conf_state));
        assert_eq!(wal.first_index(), 61);
    }

    #[test]
    fn segments_made_of_retired_ones_are_counted_as_reused() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = open(dir.path());
        append(&mut wal, &batch(1, 60, 5, 200)).unwrap();
        let (new, reused) = wal.segments_started();
        assert!(new > 1, "the batch must rotate a few times, started {new}");
        assert_eq!(reused, 0, "nothing was retired yet");
        wal.apply_snapshot_marker(SnapshotMarker { index: 60, term: 5 })
            .unwrap();
        wal.sync().unwrap();
        assert!(remove_segments_now(&mut wal) > 1);
        append(&mut wal, &batch(61, 60, 5, 200)).unwrap();
        let (new_after, reused_after) = wal.segments_started();
        assert!(reused_after > 0, "started {new_after} new, none reused");
        // The segment prepared before the retirement is still a new one.
        assert!(new_after > new);
    }

    fn remove_segments_now(wal: &mut Wal) -> usize {
        let obsolete = wal.take_obsolete_segments();
        let count = obsolete.len();
        crate::remove_segments(obsolete, wal.options.recycle_bytes).unwrap();
        count
    }

    #[test]
    fn oversized_conf_state_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = open(dir.path());
        let conf_state = ConfState {
            voters: (0..300).collect(),
            learners: Vec::new(),
        };
        let error = wal.set_conf_state(&conf_state).unwrap_err();
        assert!(
            matches!(error, WalError::ConfStateTooLarge { .. }),
            "{error}"
        );
        assert_eq!(wal.conf_state(), None);
    }

    #[test]
    fn snapshot_marker_keeps_the_log_after_it_when_terms_match() {
        let dir = tempfile::tempdir().unwrap();
        let entries = batch(1, 10, 3, 4);
        {
            let mut wal = open(dir.path());
            append(&mut wal, &entries).unwrap();
            wal.apply_snapshot_marker(SnapshotMarker { index: 4, term: 3 })
                .unwrap();
            assert_eq!((wal.first_index(), wal.last_index()), (5, 10));
            assert_eq!(wal.term(4), Some(3));
            assert_eq!(wal.term(3), None);
            assert_eq!(read_all(&wal), entries[4..]);
            wal.sync().unwrap();
        }
        let wal = open(dir.path());
        assert_eq!(wal.snapshot_marker(), SnapshotMarker { index: 4, term: 3 });
        assert_eq!(read_all(&wal), entries[4..]);
    }

    #[test]
    fn snapshot_marker_discards_the_log_when_terms_differ_or_it_is_ahead() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut wal = open(dir.path());
            append(&mut wal, &batch(1, 10, 3, 4)).unwrap();
            wal.apply_snapshot_marker(SnapshotMarker { index: 6, term: 4 })
                .unwrap();
            assert_eq!((wal.first_index(), wal.last_index()), (7, 6));
            assert_eq!(wal.term(6), Some(4));
            wal.apply_snapshot_marker(SnapshotMarker { index: 20, term: 5 })
                .unwrap();
            assert_eq!((wal.first_index(), wal.last_index()), (21, 20));
            append(&mut wal, &batch(21, 2, 5, 4)).unwrap();
            let regressed = wal
                .apply_snapshot_marker(SnapshotMarker { index: 19, term: 5 })
                .unwrap_err();
            assert!(matches!(
                regressed,
                WalError::SnapshotMarkerRegressed {
                    index: 19,
                    current_index: 20
                }
            ));
            wal.sync().unwrap();
        }
        let wal = open(dir.path());
        assert_eq!((wal.first_index(), wal.last_index()), (21, 22));
        assert_eq!(wal.term(20), Some(5));
        assert_eq!(read_all(&wal), batch(21, 2, 5, 4));
    }

    #[test]
    fn wal_can_move_to_the_shard_thread() {
        fn assert_send<T: Send>() {}
        assert_send::<Wal>();
    }

    #[test]
    fn compact_keeps_the_log_after_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = open(dir.path());
        append(&mut wal, &batch(1, 10, 2, 4)).unwrap();
        wal.compact(6).unwrap();
        assert_eq!(wal.snapshot_marker(), SnapshotMarker { index: 6, term: 2 });
        assert_eq!(read_all(&wal), batch(7, 4, 2, 4));
        let error = wal.compact(11).unwrap_err();
        assert!(
            matches!(error, WalError::OutOfRange { low: 11, .. }),
            "{error}"
        );
        assert!(wal.compact(5).is_err(), "below the snapshot");
        wal.compact(6)
            .expect("compacting to the marker again is a no-op");
        assert_eq!(wal.first_index(), 7);
    }

    /// 200 entries of 100 B in `dir`, synced every 10: several segments.
    fn synced_in_segments(dir: &std::path::Path) -> (Wal, Vec<(u64, u64, Vec<u8>)>) {
        let entries = batch(1, 200, 1, 100);
        let mut wal = open(dir);
        for chunk in entries.chunks(10) {
            append(&mut wal, chunk).unwrap();
            wal.sync().unwrap();
        }
        (wal, entries)
    }

    #[test]
    fn compaction_deletes_covered_segments_only_once_the_marker_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, entries) = synced_in_segments(dir.path());
        let before = wal.segment_count();
        assert!(before > 5, "{before}");
        wal.apply_snapshot_marker(SnapshotMarker {
            index: 150,
            term: 1,
        })
        .unwrap();
        assert!(
            wal.take_obsolete_segments().is_empty(),
            "the marker is not durable yet"
        );
        wal.sync().unwrap();
        let removed = remove_segments_now(&mut wal);
        assert!(removed >= 3, "removed {removed} of {before}");
        assert_eq!(wal.segment_count(), before - removed);
        assert_eq!(read_all(&wal), entries[150..]);
        // Every remaining segment still holds a live entry or follows one that does.
        let oldest = wal.segments.front().unwrap();
        assert!(oldest.max_entry_index > 150);
        drop(wal);
        let wal = open(dir.path());
        assert_eq!(wal.first_index(), 151);
        assert_eq!(read_all(&wal), entries[150..]);
        assert_eq!(wal.segment_count(), before - removed);
    }

    /// Segments a durable marker made obsolete but nobody removed before a
    /// restart are handed out by the reopened log, not removed by `open`
    /// (which runs on the shard's thread; removal sleeps between steps).
    #[test]
    fn open_hands_out_obsolete_segments_instead_of_removing_them() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, entries) = synced_in_segments(dir.path());
        wal.apply_snapshot_marker(SnapshotMarker {
            index: 150,
            term: 1,
        })
        .unwrap();
        wal.sync().unwrap();
        let obsolete = wal.take_obsolete_segments();
        assert!(obsolete.len() >= 3, "{obsolete:?}");
        drop(wal);
        let mut wal = open(dir.path());
        assert!(
            obsolete.iter().all(|path| path.exists()),
            "open removed none"
        );
        assert_eq!(wal.recovery().obsolete_segments, obsolete);
        assert_eq!(wal.take_obsolete_segments(), obsolete);
        crate::remove_segments(obsolete.clone(), 0).unwrap();
        assert!(obsolete.iter().all(|path| !path.exists()));
        assert_eq!(read_all(&wal), entries[150..]);
    }

    #[test]
    fn sealed_segments_leave_the_page_tables_once_synced_and_read_back_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = open(dir.path());
        let entries = batch(1, 200, 1, 100);
        append(&mut wal, &entries).unwrap();
        assert!(wal.segment_count() > 2, "the entries span segments");
        assert!(wal.segments.iter().all(|s| !s.pages_released));
        wal.sync().unwrap();
        let released: Vec<bool> = wal.segments.iter().map(|s| s.pages_released).collect();
        let (sealed, active) = released.split_at(released.len() - 1);
        assert!(sealed.iter().all(|&r| r), "{released:?}");
        assert!(!active[0], "appends go on through its pages");
        assert_eq!(read_all(&wal), entries);
    }

    #[test]
    fn an_active_segment_leaves_the_page_tables_in_steps_and_reads_back_unchanged() {
        use crate::segment::RELEASE_STEP_BYTES;
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(dir.path(), options(4 * RELEASE_STEP_BYTES as u64)).unwrap();
        // About two and a half steps of 1 KiB entries, in one segment.
        let count = (RELEASE_STEP_BYTES * 5 / 2 / 1100) as u64;
        let entries = batch(1, count, 1, 1024);
        for chunk in entries.chunks(500) {
            append(&mut wal, chunk).unwrap();
            wal.sync().unwrap();
        }
        assert_eq!(wal.segment_count(), 1, "one active segment");
        let active = &wal.segments[0];
        assert_eq!(active.released_to, 2 * RELEASE_STEP_BYTES);
        assert!(!active.pages_released);
        assert_eq!(read_all(&wal), entries);
        // And the appends go on into the same pages' neighbours.
        let more = batch(count + 1, 100, 1, 1024);
        append(&mut wal, &more).unwrap();
        wal.sync().unwrap();
        drop(wal);
        let wal = Wal::open(dir.path(), options(4 * RELEASE_STEP_BYTES as u64)).unwrap();
        assert_eq!(read_all(&wal), [entries, more].concat());
    }

    #[test]
    fn rotation_and_compaction_across_many_segments() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = open(dir.path());
        let mut next = 1;
        let mut max_segments = 0;
        for round in 0..40u64 {
            append(&mut wal, &batch(next, 25, round + 1, 64)).unwrap();
            next += 25;
            wal.set_hard_state(HardState {
                term: round + 1,
                vote: 1,
                commit: next - 1,
            })
            .unwrap();
            if round % 5 == 4 {
                let index = next - 10;
                wal.apply_snapshot_marker(SnapshotMarker {
                    index,
                    term: round + 1,
                })
                .unwrap();
            }
            wal.sync().unwrap();
            remove_segments_now(&mut wal);
            max_segments = max_segments.max(wal.segment_count());
        }
        assert!(
            max_segments < 12,
            "compaction keeps the segment count bounded: {max_segments}"
        );
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.extension().is_some_and(|e| e == "wal"))
            .collect();
        files.sort();
        let mut live: Vec<PathBuf> = wal
            .segments
            .iter()
            .map(|s| s.path().to_path_buf())
            .collect();
        // The preparer may or may not have created the next segment yet.
        let prepared = dir
            .path()
            .join(format::segment_file_name(wal.active().sequence + 1));
        if files.last() == Some(&prepared) {
            live.push(prepared);
        }
        assert_eq!(
            files, live,
            "one file per live segment, plus the one being prepared"
        );
        let expected: Vec<_> = (wal.first_index()..next)
            .map(|index| (index, (index - 1) / 25 + 1, vec![(index % 251) as u8; 64]))
            .collect();
        assert_eq!(read_all(&wal), expected);
        drop(wal);
        let wal = open(dir.path());
        assert_eq!(read_all(&wal), expected);
        assert_eq!(wal.hard_state().commit, next - 1);
    }

    #[test]
    fn group_commit_one_job_at_a_time_while_appending_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = open(dir.path());
        append(&mut wal, &batch(1, 3, 1, 10)).unwrap();
        let job = wal.begin_sync().unwrap().expect("there is unsynced data");
        assert!(matches!(wal.begin_sync(), Err(WalError::SyncInFlight)));
        let runner = std::thread::spawn(move || job.run_blocking());
        append(&mut wal, &batch(4, 3, 1, 10)).unwrap();
        wal.finish_sync(runner.join().unwrap()).unwrap();
        assert!(
            wal.synced.offset < wal.active().write_offset,
            "the later batch is not covered"
        );
        let job = wal
            .begin_sync()
            .unwrap()
            .expect("the later batch is unsynced");
        wal.finish_sync(job.run_blocking()).unwrap();
        assert!(wal.begin_sync().unwrap().is_none());
    }

    #[test]
    fn failed_sync_poisons_until_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut wal = open(dir.path());
            append(&mut wal, &batch(1, 3, 1, 10)).unwrap();
            let job = wal.begin_sync().unwrap().unwrap();
            let failed = SyncOutcome {
                target: job.target,
                created_segments: job.created_segments,
                result: Err(WalError::io(
                    dir.path(),
                    "fdatasync",
                    std::io::Error::from_raw_os_error(libc::EIO),
                )),
            };
            let error = wal.finish_sync(failed).unwrap_err();
            assert!(error.to_string().contains("Input/output error"), "{error}");
            assert!(matches!(
                append(&mut wal, &batch(4, 1, 1, 1)),
                Err(WalError::Poisoned)
            ));
            assert!(matches!(wal.begin_sync(), Err(WalError::Poisoned)));
            assert!(matches!(
                wal.set_hard_state(HardState::default()),
                Err(WalError::Poisoned)
            ));
            assert!(matches!(wal.sync(), Err(WalError::Poisoned)));
            assert_eq!(wal.last_index(), 3, "reads still work");
        }
        let mut wal = open(dir.path());
        let next = wal.last_index() + 1;
        append(&mut wal, &batch(next, 1, 1, 1)).expect("a reopened WAL accepts appends");
    }

    #[test]
    fn new_segment_header_becomes_valid_only_at_sync() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = open(dir.path());
        append(&mut wal, &batch(1, 30, 1, 200)).unwrap();
        assert!(wal.segment_count() > 1);
        let newest = wal.active().path().to_path_buf();
        let on_disk = std::fs::read(&newest).unwrap();
        assert!(
            on_disk[..HEADER_LEN].iter().all(|&b| b == 0),
            "header must stay zero until older segments are durable"
        );
        assert_ne!(on_disk[HEADER_LEN], 0, "records are written already");
        wal.sync().unwrap();
        let header = format::decode_header(&std::fs::read(&newest).unwrap()).unwrap();
        assert_eq!(
            (header.shard_id, header.sequence),
            (3, wal.active().sequence)
        );
    }

    #[test]
    fn second_open_is_refused_while_the_first_is_open() {
        let dir = tempfile::tempdir().unwrap();
        let wal = open(dir.path());
        match Wal::open(dir.path(), options(SMALL_SEGMENT_BYTES)) {
            Err(WalError::Locked {
                dir: locked,
                holder_pid,
            }) => {
                assert_eq!(locked, dir.path());
                assert_eq!(holder_pid, Some(std::process::id()));
            }
            other => panic!("expected Locked, got {other:?}"),
        }
        drop(wal);
        open(dir.path());
    }

    #[test]
    fn rotation_takes_the_prepared_segment_and_asks_for_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = open(dir.path());
        wal.wait_for_next_segment();
        let prepared = dir.path().join(format::segment_file_name(2));
        let bytes = std::fs::read(&prepared).expect("open prepares segment 2");
        assert_eq!(bytes.len() as u64, SMALL_SEGMENT_BYTES);
        assert!(
            bytes.iter().all(|&b| b == 0),
            "a prepared segment is all zeros"
        );
        append(&mut wal, &batch(1, 30, 1, 200)).unwrap();
        let active = wal.active().sequence;
        assert!(active >= 2);
        wal.wait_for_next_segment();
        assert!(
            dir.path()
                .join(format::segment_file_name(active + 1))
                .exists(),
            "rotation asks for the segment after the new active one"
        );
    }

    #[test]
    fn an_append_that_outruns_the_preparer_is_partial_and_resumable() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = open(dir.path());
        let entries = batch(1, 200, 1, 200);
        let mut next = 0;
        let mut not_ready = 0;
        // Without waiting: each call appends what fits until a segment is
        // missing; the rest goes in a later call, as a shard retries.
        while next < entries.len() {
            match wal.append_entries(&refs(&entries[next..])) {
                Ok(()) => next = entries.len(),
                Err(error @ WalError::SegmentNotReady { .. }) => {
                    assert!(error.is_retryable());
                    not_ready += 1;
                    next += error.appended();
                    wal.wait_for_next_segment();
                }
                Err(other) => panic!("unexpected {other}"),
            }
        }
        assert!(not_ready <= 20, "{not_ready}");
        wal.sync().unwrap();
        assert_eq!(read_all(&wal), entries);
        drop(wal);
        assert_eq!(read_all(&open(dir.path())), entries);
    }

    #[test]
    fn bytes_written_counts_records() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = open(dir.path());
        // The fresh segment's metadata copies: hard state (40) and marker (32).
        assert_eq!(wal.bytes_written(), 72);
        append(&mut wal, &batch(1, 1, 1, 3)).unwrap();
        let entries_record =
            record_len(KIND_LEN + ENTRIES_PREFIX_LEN + ENTRY_HEADER_LEN + 3) as u64;
        assert_eq!(entries_record, 40);
        assert_eq!(wal.bytes_written(), 72 + entries_record);
        wal.set_hard_state(HardState::default()).unwrap();
        assert_eq!(wal.bytes_written(), 72 + entries_record + 40);
    }

    #[cfg(feature = "monoio")]
    #[test]
    fn async_sync_job_runs_on_monoio() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = open(dir.path());
        // Rotate so the job also writes a header and fsyncs the directory.
        append(&mut wal, &batch(1, 30, 1, 200)).unwrap();
        let job = wal.begin_sync().unwrap().unwrap();
        let mut runtime = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .build()
            .expect("monoio runtime");
        let outcome = runtime.block_on(job.run());
        assert!(outcome.is_ok(), "{outcome:?}");
        wal.finish_sync(outcome).unwrap();
        let header = format::decode_header(&std::fs::read(wal.active().path()).unwrap()).unwrap();
        assert_eq!(header.sequence, wal.active().sequence);
        drop(wal);
        assert_eq!(read_all(&open(dir.path())), batch(1, 30, 1, 200));
    }
}
