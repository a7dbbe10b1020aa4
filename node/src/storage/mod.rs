//! `raft::Storage` over any [`LogStore`] (the shard's WAL in production).
//!
//! Reading is the `Storage` trait (raft-rs's own split); writing is plain
//! methods on the store, called by the replica in Ready order. A write the
//! store refuses without failing (it cannot grow yet) waits in `pending` and
//! is read back from there: see that module.

mod pending;

use std::cell::Cell;

use bytes::Bytes;
use corekv_wal::{EntryRef, SnapshotMarker, WalError};
use raft::prelude::{ConfState, Entry, EntryType, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};

use crate::log_store::LogStore;
use crate::snapshot::SnapshotMeta;

/// Entries a read of the log reserves room for before it reads. raft-rs
/// asks for everything from a lagging follower's next index to the log's
/// end (`high - low`: hundreds of thousands of entries for a follower that
/// restarted under load) with a byte limit that stops it after about a
/// MiB. Room for all of them was tens of MB per message on the leader,
/// allocated and freed again for each MsgAppend of the catch-up.
const ENTRIES_RESERVED: u64 = 1024;

/// A log store seen through raft-rs's read-only storage interface.
pub struct RaftStorage<L> {
    wal: L,
    /// Writes the store could not take yet.
    pending: pending::Pending,
    /// The newest durable state-machine snapshot, offered to followers that
    /// are behind the compacted log.
    latest_snapshot: Option<SnapshotMeta>,
    /// Set when raft asked for a snapshot newer than the latest one.
    snapshot_wanted: Cell<bool>,
}

impl<L: LogStore> RaftStorage<L> {
    /// Wraps an open log store.
    pub fn new(wal: L) -> Self {
        Self {
            wal,
            pending: pending::Pending::default(),
            latest_snapshot: None,
            snapshot_wanted: Cell::new(false),
        }
    }

    /// Records the newest durable snapshot.
    pub fn set_latest_snapshot(&mut self, meta: SnapshotMeta) {
        self.latest_snapshot = Some(meta);
    }

    /// The newest durable snapshot.
    pub fn latest_snapshot(&self) -> Option<&SnapshotMeta> {
        self.latest_snapshot.as_ref()
    }

    /// True (once) if raft asked for a snapshot we do not have yet.
    pub fn take_snapshot_wanted(&self) -> bool {
        self.snapshot_wanted.replace(false)
    }

    /// The WAL, for reads outside raft (status, metrics).
    pub fn wal(&self) -> &L {
        &self.wal
    }

    /// The WAL, for appends and syncs in Ready order.
    pub fn wal_mut(&mut self) -> &mut L {
        &mut self.wal
    }

    /// Appends raft entries (their data is copied into the log mapping).
    ///
    /// Every write method either writes to the store or, if the store
    /// refuses with a retryable error or earlier writes still wait, keeps the
    /// write in order behind them and returns the store's error (if there
    /// was one) for the caller to note. Any other error is the store's.
    pub fn append(&mut self, entries: Vec<Entry>) -> Result<(), WalError> {
        if entries.is_empty() {
            return Ok(());
        }
        if !self.pending.is_empty() {
            self.pending.push_entries(entries);
            return Ok(());
        }
        match write_entries(&mut self.wal, &entries) {
            Err(error) if error.is_retryable() => {
                self.pending
                    .push_entries(entries.into_iter().skip(error.appended()));
                Err(error)
            }
            other => other,
        }
    }

    /// Persists a new hard state.
    pub fn set_hard_state(&mut self, hs: &HardState) -> Result<(), WalError> {
        if !self.pending.is_empty() {
            self.pending.hard_state = Some(hs.clone());
            return Ok(());
        }
        let result = self.wal.set_hard_state(wal_hard_state(hs));
        if result.as_ref().is_err_and(WalError::is_retryable) {
            self.pending.hard_state = Some(hs.clone());
        }
        result
    }

    /// Records that a snapshot from the leader (durable, installed in the
    /// state machine) replaces the log through `marker.index`.
    pub fn install_snapshot_marker(&mut self, marker: SnapshotMarker) -> Result<(), WalError> {
        if !self.pending.is_empty() {
            self.pending.push_install(marker);
            return Ok(());
        }
        let result = self.wal.apply_snapshot_marker(marker);
        if result.as_ref().is_err_and(WalError::is_retryable) {
            self.pending.push_install(marker);
        }
        result
    }

    /// Records that this node's own durable snapshot covers the log through
    /// `marker.index`, so the WAL may drop those entries.
    pub fn compact(&mut self, marker: SnapshotMarker) -> Result<(), WalError> {
        if !self.pending.is_empty() {
            self.pending.compaction = Some(marker);
            return Ok(());
        }
        let result = self.wal.apply_snapshot_marker(marker);
        if result.as_ref().is_err_and(WalError::is_retryable) {
            self.pending.compaction = Some(marker);
        }
        result
    }

    /// Writes what waits, in order, until the store refuses again (that
    /// error is returned; the rest keeps waiting).
    pub fn write_pending(&mut self) -> Result<(), WalError> {
        if let Some(marker) = self.pending.install {
            self.wal.apply_snapshot_marker(marker)?;
            self.pending.install = None;
        }
        while !self.pending.entries.is_empty() {
            let entries = self.pending.entries.make_contiguous();
            let result = write_entries(&mut self.wal, entries);
            let written = match &result {
                Ok(()) => entries.len(),
                Err(error) => error.appended(),
            };
            self.pending.written_entries(written);
            result?;
        }
        if let Some(hs) = self.pending.hard_state.take() {
            if let Err(error) = self.wal.set_hard_state(wal_hard_state(&hs)) {
                self.pending.hard_state = Some(hs);
                return Err(error);
            }
        }
        if let Some(marker) = self.pending.compaction {
            self.wal.apply_snapshot_marker(marker)?;
            self.pending.compaction = None;
        }
        Ok(())
    }

    /// True while some write waits for the store.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Bytes of entry data waiting for the store.
    pub fn pending_entry_bytes(&self) -> u64 {
        self.pending.entry_bytes()
    }
}

/// Appends raft entries to the store (their data is copied into the log).
fn write_entries<L: LogStore>(wal: &mut L, entries: &[Entry]) -> Result<(), WalError> {
    let refs: Vec<EntryRef<'_>> = entries
        .iter()
        .map(|e| EntryRef {
            index: e.index,
            term: e.term,
            entry_type: e.get_entry_type() as u8,
            data: &e.data,
        })
        .collect();
    wal.append_entries(&refs)
}

fn wal_hard_state(hs: &HardState) -> corekv_wal::HardState {
    let forget_vote = crate::sim_bugs::planted(crate::sim_bugs::Bug::ForgetVote);
    corekv_wal::HardState {
        term: hs.term,
        vote: if forget_vote { 0 } else { hs.vote },
        commit: hs.commit,
    }
}

impl<L: LogStore> RaftStorage<L> {
    /// The log's first index as raft sees it: the WAL's, moved by a waiting
    /// installed snapshot.
    fn log_first_index(&self) -> u64 {
        self.pending
            .first_index()
            .unwrap_or_else(|| self.wal.first_index())
    }

    /// The log's last index as raft sees it, waiting writes included.
    fn log_last_index(&self) -> u64 {
        self.pending
            .last_index()
            .unwrap_or_else(|| self.wal.last_index())
    }
}

fn entry_type(raw: u8) -> EntryType {
    match raw {
        1 => EntryType::EntryConfChange,
        2 => EntryType::EntryConfChangeV2,
        _ => EntryType::EntryNormal,
    }
}

impl<L: LogStore> raft::Storage for RaftStorage<L> {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let hs = self.wal.hard_state();
        let hard_state = HardState {
            term: hs.term,
            vote: hs.vote,
            commit: hs.commit,
            ..Default::default()
        };
        // The configuration as of the snapshot raft starts from: the
        // conf-change entries after it are applied again, in order, as the
        // log replays. Without a snapshot, the log's first configuration
        // (a new cluster's voters, or none for a node that joins).
        let conf_state = match &self.latest_snapshot {
            Some(meta) => crate::membership::conf_state(&meta.membership),
            None => {
                let mut conf_state = ConfState::default();
                if let Some(cs) = self.wal.conf_state() {
                    conf_state.voters = cs.voters;
                    conf_state.learners = cs.learners;
                }
                conf_state
            }
        };
        Ok(RaftState {
            hard_state,
            conf_state,
        })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let (first, last) = (self.log_first_index(), self.log_last_index());
        if low < first {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > last + 1 {
            panic!("entries' high index is out of bound, last index: {last}, high: {high}");
        }
        let max_size = max_size.into();
        let mut out = Vec::with_capacity((high - low).min(ENTRIES_RESERVED) as usize);
        let mut size = 0u64;
        // Waiting writes replace the log from their first entry on (all of
        // it after an installed snapshot).
        let overlay_from = match (self.pending.first_index(), self.pending.entries_from()) {
            (Some(_), from) => from.unwrap_or(high),
            (None, from) => from.unwrap_or(high).max(low),
        };
        let from_wal = high.min(overlay_from);
        if low < from_wal {
            self.wal
                .entries(low, from_wal, max_size, &mut |e| {
                    size += e.data.len() as u64;
                    let mut entry = Entry {
                        index: e.index,
                        term: e.term,
                        data: Bytes::copy_from_slice(e.data),
                        ..Default::default()
                    };
                    entry.set_entry_type(entry_type(e.entry_type));
                    out.push(entry);
                })
                .map_err(|e| raft::Error::Store(StorageError::Other(Box::new(e))))?;
            if out.len() < (from_wal - low) as usize {
                // The size limit stopped the WAL's part.
                return Ok(out);
            }
        }
        for index in from_wal.max(low)..high {
            let entry = self
                .pending
                .entry(index)
                .expect("the waiting entries cover the log's end");
            size += entry.data.len() as u64;
            if !out.is_empty() && max_size.is_some_and(|max| size > max) {
                break;
            }
            out.push(entry.clone());
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if let Some(entry) = self.pending.entry(idx) {
            return Ok(entry.term);
        }
        if let Some(marker) = self.pending.install {
            if idx == marker.index {
                return Ok(marker.term);
            }
        }
        let shadowed = self.pending.entries_from().is_some_and(|from| idx >= from)
            || self.pending.install.is_some_and(|m| idx > m.index);
        if !shadowed && idx >= self.log_first_index().saturating_sub(1) {
            if let Some(term) = self.wal.term(idx) {
                return Ok(term);
            }
        }
        if idx < self.log_first_index() {
            Err(raft::Error::Store(StorageError::Compacted))
        } else {
            Err(raft::Error::Store(StorageError::Unavailable))
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.log_first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.log_last_index())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        // The snapshot's data travels out of band (SnapshotChunk frames on a
        // connection of its own); raft only carries its metadata.
        match &self.latest_snapshot {
            Some(meta) if meta.index >= request_index => {
                let mut snapshot = Snapshot::default();
                let metadata = snapshot.mut_metadata();
                metadata.index = meta.index;
                metadata.term = meta.term;
                metadata.set_conf_state(crate::membership::conf_state(&meta.membership));
                Ok(snapshot)
            }
            _ => {
                self.snapshot_wanted.set(true);
                Err(raft::Error::Store(
                    StorageError::SnapshotTemporarilyUnavailable,
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use raft::Storage as _;

    use super::*;
    use crate::log_store::memory::{MemDisk, MemLogStore};

    fn entries(first: u64, count: u64, term: u64) -> Vec<Entry> {
        pending::test_entries(first, count, term, 16)
    }

    /// A read of a long range under a small byte limit (how raft-rs reads
    /// for a lagging follower) holds room for what it returns, not for the
    /// whole range.
    #[test]
    fn a_limited_read_of_a_long_range_reserves_room_for_what_it_returns() {
        let disk = MemDisk::new();
        let mut storage = RaftStorage::new(disk.open());
        let count = 100_000;
        storage.append(entries(1, count, 1)).unwrap();
        let read = storage
            .entries(1, count + 1, Some(1024), GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(read.len(), 64, "16-byte entries under a 1 KiB limit");
        assert!(
            read.capacity() <= ENTRIES_RESERVED as usize,
            "{}",
            read.capacity()
        );
        // Unlimited, the whole range still comes back.
        let all = storage
            .entries(1, count + 1, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(all.len(), count as usize);
        assert_eq!(all.last().map(|e| e.index), Some(count));
    }

    fn read(storage: &RaftStorage<MemLogStore>, low: u64, high: u64) -> Vec<(u64, u64)> {
        storage
            .entries(low, high, None, GetEntriesContext::empty(false))
            .unwrap()
            .iter()
            .map(|e| (e.index, e.term))
            .collect()
    }

    #[test]
    fn writes_the_log_refuses_are_read_back_and_written_later_in_order() {
        let disk = MemDisk::new();
        let mut storage = RaftStorage::new(disk.open());
        storage.append(entries(1, 4, 1)).unwrap();
        // Room for two more entries (40 bytes each in the memory store).
        disk.set_room(Some(80));
        let error = storage.append(entries(5, 4, 1)).unwrap_err();
        assert!(error.is_disk_full() && error.appended() == 2, "{error}");
        assert!(storage.has_pending());
        assert_eq!(storage.pending_entry_bytes(), 32);
        // A hard state waits behind the entries; a conflicting append from a
        // new leader replaces the waiting suffix.
        storage
            .set_hard_state(&HardState {
                term: 2,
                vote: 2,
                commit: 3,
                ..Default::default()
            })
            .unwrap();
        storage.append(entries(8, 2, 2)).unwrap();
        assert_eq!(storage.last_index().unwrap(), 9);
        assert_eq!(storage.term(6).unwrap(), 1);
        assert_eq!(storage.term(7).unwrap(), 1);
        assert_eq!(storage.term(8).unwrap(), 2);
        assert_eq!(
            read(&storage, 3, 10),
            vec![(3, 1), (4, 1), (5, 1), (6, 1), (7, 1), (8, 2), (9, 2)]
        );
        // A size limit spans both parts: the first entry always comes.
        let limited = storage
            .entries(5, 10, Some(40), GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(limited.len(), 2);

        // Still full: nothing moves, nothing is lost.
        assert!(storage.write_pending().unwrap_err().is_retryable());
        assert_eq!(read(&storage, 1, 10).len(), 9);
        disk.set_room(None);
        storage.write_pending().unwrap();
        assert!(!storage.has_pending());
        assert_eq!(storage.wal().last_index(), 9);
        assert_eq!(storage.wal().hard_state().term, 2);
        assert_eq!(
            read(&storage, 1, 10),
            vec![
                (1, 1),
                (2, 1),
                (3, 1),
                (4, 1),
                (5, 1),
                (6, 1),
                (7, 1),
                (8, 2),
                (9, 2)
            ]
        );
    }

    #[test]
    fn a_snapshot_installed_while_writes_wait_moves_the_log_start() {
        let disk = MemDisk::new();
        let mut storage = RaftStorage::new(disk.open());
        storage.append(entries(1, 3, 1)).unwrap();
        disk.set_room(Some(0));
        assert!(storage.append(entries(4, 2, 1)).is_err());
        storage
            .install_snapshot_marker(SnapshotMarker { index: 10, term: 3 })
            .unwrap();
        assert_eq!(storage.first_index().unwrap(), 11);
        assert_eq!(storage.last_index().unwrap(), 10);
        assert_eq!(storage.term(10).unwrap(), 3);
        assert!(matches!(
            storage.term(4),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        storage.append(entries(11, 2, 3)).unwrap();
        assert_eq!(read(&storage, 11, 13), vec![(11, 3), (12, 3)]);
        disk.set_room(None);
        storage.write_pending().unwrap();
        assert_eq!(storage.wal().first_index(), 11);
        assert_eq!(read(&storage, 11, 13), vec![(11, 3), (12, 3)]);
    }
}
