//! The log store a replica writes its Raft log, hard state and configuration
//! to, in the WAL's own terms (records, not raft-rs types).
//!
//! The trait is the WAL's write-ahead interface: appends that are readable at
//! once, group commit split into `begin_sync` (hand out a job) and
//! `finish_sync` (take its outcome back), and compaction behind a snapshot
//! marker. [`corekv_wal::Wal`] is the production implementation;
//! [`memory::MemLogStore`] keeps the log in memory and lets a test (or the
//! simulator) tear unsynced writes at a crash, hold a sync for as long as it
//! likes, and fail one on command.
//!
//! raft-rs reads the store through the storage module's `RaftStorage`, which
//! implements `raft::Storage` once for every `LogStore`.

pub mod memory;

use std::path::{Path, PathBuf};

use corekv_wal::{
    ConfState, EntryRef, HardState, SnapshotMarker, SyncJob, SyncOutcome, Wal, WalError,
};

/// Where a replica keeps its log. Semantics are [`Wal`]'s (see its crate
/// docs): a later append at index `i` replaces what the log held from `i` on;
/// at most one sync is in flight; a failed sync puts the store in the failed
/// state; a write refused with a retryable error ([`WalError::is_retryable`],
/// the log could not grow) wrote its first [`WalError::appended`] entries and
/// nothing else, and may be retried.
pub trait LogStore {
    /// Makes everything appended before [`LogStore::begin_sync`] durable; the
    /// shell runs it away from the replica.
    type SyncJob;
    /// What running a [`LogStore::SyncJob`] produced, for
    /// [`LogStore::finish_sync`].
    type SyncOutcome;

    /// Appends entries; their indexes are contiguous and the first is at most
    /// `last_index() + 1`.
    fn append_entries(&mut self, entries: &[EntryRef<'_>]) -> Result<(), WalError>;
    /// Appends a new hard state.
    fn set_hard_state(&mut self, hard_state: HardState) -> Result<(), WalError>;
    /// Appends a new configuration.
    fn set_conf_state(&mut self, conf_state: &ConfState) -> Result<(), WalError>;
    /// Records that a durable snapshot covers the log through `marker.index`.
    fn apply_snapshot_marker(&mut self, marker: SnapshotMarker) -> Result<(), WalError>;
    /// Starts a sync of everything appended so far; `None` if nothing is unsynced.
    fn begin_sync(&mut self) -> Result<Option<Self::SyncJob>, WalError>;
    /// Completes the sync handed out by `begin_sync`.
    fn finish_sync(&mut self, outcome: Self::SyncOutcome) -> Result<(), WalError>;
    /// Blocking sync, for start-up only (before the shard serves anything).
    fn sync(&mut self) -> Result<(), WalError>;
    /// Blocks until a write that needs the next segment will not be refused
    /// with the retryable `SegmentNotReady`: for start-up only. A store
    /// without segments has nothing to wait for.
    fn wait_for_next_segment(&mut self) {}
    /// Files the store no longer needs; the caller deletes them off the
    /// shard thread.
    fn take_obsolete_segments(&mut self) -> Vec<PathBuf>;

    /// Calls `f` for each entry in `[low, high)`, stopping before `max_bytes`
    /// of data except for the first entry (raft-rs `limit_size` semantics).
    fn entries(
        &self,
        low: u64,
        high: u64,
        max_bytes: Option<u64>,
        f: &mut dyn FnMut(EntryRef<'_>),
    ) -> Result<(), WalError>;
    /// The term of the entry at `index`, from the snapshot marker's index on.
    fn term(&self, index: u64) -> Option<u64>;
    /// Index of the first entry held: the snapshot marker's index + 1.
    fn first_index(&self) -> u64;
    /// Index of the last entry held; `first_index() - 1` when empty.
    fn last_index(&self) -> u64;
    /// The latest hard state appended.
    fn hard_state(&self) -> HardState;
    /// The latest configuration appended, if any ever was.
    fn conf_state(&self) -> Option<ConfState>;
    /// The latest snapshot marker appended ((0, 0) for a fresh log).
    fn snapshot_marker(&self) -> SnapshotMarker;
    /// Where the store lives, for error messages.
    fn location(&self) -> &Path;
    /// Live segment files (a metric).
    fn segment_count(&self) -> usize;
    /// Bytes appended since open (a metric).
    fn bytes_written(&self) -> u64;
}

impl LogStore for Wal {
    type SyncJob = SyncJob;
    type SyncOutcome = SyncOutcome;

    fn append_entries(&mut self, entries: &[EntryRef<'_>]) -> Result<(), WalError> {
        Wal::append_entries(self, entries)
    }
    fn set_hard_state(&mut self, hard_state: HardState) -> Result<(), WalError> {
        Wal::set_hard_state(self, hard_state)
    }
    fn set_conf_state(&mut self, conf_state: &ConfState) -> Result<(), WalError> {
        Wal::set_conf_state(self, conf_state)
    }
    fn apply_snapshot_marker(&mut self, marker: SnapshotMarker) -> Result<(), WalError> {
        Wal::apply_snapshot_marker(self, marker)
    }
    fn begin_sync(&mut self) -> Result<Option<SyncJob>, WalError> {
        Wal::begin_sync(self)
    }
    fn finish_sync(&mut self, outcome: SyncOutcome) -> Result<(), WalError> {
        Wal::finish_sync(self, outcome)
    }
    fn sync(&mut self) -> Result<(), WalError> {
        Wal::sync(self)
    }
    fn wait_for_next_segment(&mut self) {
        Wal::wait_for_next_segment(self)
    }
    fn take_obsolete_segments(&mut self) -> Vec<PathBuf> {
        Wal::take_obsolete_segments(self)
    }
    fn entries(
        &self,
        low: u64,
        high: u64,
        max_bytes: Option<u64>,
        f: &mut dyn FnMut(EntryRef<'_>),
    ) -> Result<(), WalError> {
        Wal::entries(self, low, high, max_bytes, f)
    }
    fn term(&self, index: u64) -> Option<u64> {
        Wal::term(self, index)
    }
    fn first_index(&self) -> u64 {
        Wal::first_index(self)
    }
    fn last_index(&self) -> u64 {
        Wal::last_index(self)
    }
    fn hard_state(&self) -> HardState {
        Wal::hard_state(self)
    }
    fn conf_state(&self) -> Option<ConfState> {
        Wal::conf_state(self)
    }
    fn snapshot_marker(&self) -> SnapshotMarker {
        Wal::snapshot_marker(self)
    }
    fn location(&self) -> &Path {
        Wal::dir(self)
    }
    fn segment_count(&self) -> usize {
        Wal::segment_count(self)
    }
    fn bytes_written(&self) -> u64 {
        Wal::bytes_written(self)
    }
}
