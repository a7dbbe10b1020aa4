//! `raft::Storage` over any [`LogStore`] (the shard's WAL in production).
//!
//! Reading is the `Storage` trait (raft-rs's own split); writing is plain
//! methods on the store, called by the replica in Ready order.

use std::cell::Cell;

use bytes::Bytes;
use corekv_wal::EntryRef;
use raft::prelude::{ConfState, Entry, EntryType, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};

use crate::log_store::LogStore;
use crate::snapshot::SnapshotMeta;

/// A log store seen through raft-rs's read-only storage interface.
pub struct RaftStorage<L> {
    wal: L,
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
    pub fn append(&mut self, entries: &[Entry]) -> Result<(), corekv_wal::WalError> {
        if entries.is_empty() {
            return Ok(());
        }
        let refs: Vec<EntryRef<'_>> = entries
            .iter()
            .map(|e| EntryRef {
                index: e.index,
                term: e.term,
                entry_type: e.get_entry_type() as u8,
                data: &e.data,
            })
            .collect();
        self.wal.append_entries(&refs)
    }

    /// Persists a new hard state.
    pub fn set_hard_state(&mut self, hs: &HardState) -> Result<(), corekv_wal::WalError> {
        self.wal.set_hard_state(corekv_wal::HardState {
            term: hs.term,
            vote: hs.vote,
            commit: hs.commit,
        })
    }

    /// Persists a new configuration.
    pub fn set_conf_state(&mut self, cs: &ConfState) -> Result<(), corekv_wal::WalError> {
        self.wal.set_conf_state(&corekv_wal::ConfState {
            voters: cs.voters.clone(),
            learners: cs.learners.clone(),
        })
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
        let mut conf_state = ConfState::default();
        if let Some(cs) = self.wal.conf_state() {
            conf_state.voters = cs.voters;
            conf_state.learners = cs.learners;
        }
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
        if low < self.wal.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.wal.last_index() + 1 {
            panic!(
                "entries' high index is out of bound, last index: {}, high: {}",
                self.wal.last_index(),
                high
            );
        }
        let mut out = Vec::with_capacity((high - low) as usize);
        self.wal
            .entries(low, high, max_size.into(), &mut |e| {
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
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if let Some(term) = self.wal.term(idx) {
            return Ok(term);
        }
        if idx < self.wal.first_index() {
            Err(raft::Error::Store(StorageError::Compacted))
        } else {
            Err(raft::Error::Store(StorageError::Unavailable))
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.wal.first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.wal.last_index())
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
                metadata.mut_conf_state().voters = meta.voters.clone();
                metadata.mut_conf_state().learners = meta.learners.clone();
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
