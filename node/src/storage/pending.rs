//! Writes the log store could not take yet, merged as the log would merge
//! them, and read back by raft as if they were in it.
//!
//! raft-rs moves a Ready's entries out of its unstable log when the Ready is
//! advanced, and from then on reads them from `Storage`. When the WAL
//! refuses a write without failing (its next segment is not ready, or the
//! disk is full) the write waits here instead, and `RaftStorage` answers
//! raft's reads from the WAL with this as an overlay. The replica reports the
//! Readys involved persisted only once these writes reached the WAL and a
//! sync covered them.

use std::collections::VecDeque;

use corekv_wal::SnapshotMarker;
use raft::prelude::{Entry, HardState};

/// The waiting writes, in the order they are written back: the marker of an
/// installed snapshot, then entries, hard state, and last a
/// compaction marker (which needs the entries it covers in the log).
#[derive(Default)]
pub(super) struct Pending {
    /// A snapshot from the leader replaced the log up to and including here.
    pub(super) install: Option<SnapshotMarker>,
    /// Entries that replace the log from `entries[0].index` on.
    pub(super) entries: VecDeque<Entry>,
    pub(super) hard_state: Option<HardState>,
    pub(super) compaction: Option<SnapshotMarker>,
    entry_bytes: u64,
}

impl Pending {
    pub(super) fn is_empty(&self) -> bool {
        self.install.is_none()
            && self.entries.is_empty()
            && self.hard_state.is_none()
            && self.compaction.is_none()
    }

    /// Bytes of entry data waiting.
    pub(super) fn entry_bytes(&self) -> u64 {
        self.entry_bytes
    }

    /// Adds entries after (or replacing a suffix of) those waiting. A first
    /// index at or below the waiting ones' replaces them all: the log will
    /// cut its own suffix when they are written.
    pub(super) fn push_entries(&mut self, entries: impl IntoIterator<Item = Entry>) {
        let mut entries = entries.into_iter().peekable();
        let Some(first) = entries.peek().map(|e| e.index) else {
            return;
        };
        let keep = match self.entries.front() {
            Some(front) if first > front.index => (first - front.index) as usize,
            _ => 0,
        };
        for dropped in self.entries.drain(keep.min(self.entries.len())..) {
            self.entry_bytes -= dropped.data.len() as u64;
        }
        for entry in entries {
            self.entry_bytes += entry.data.len() as u64;
            self.entries.push_back(entry);
        }
    }

    /// The waiting entries from the front, `count` of which were written.
    pub(super) fn written_entries(&mut self, count: usize) {
        for written in self.entries.drain(..count) {
            self.entry_bytes -= written.data.len() as u64;
        }
    }

    /// A snapshot from the leader replaces the whole log, waiting entries
    /// included (raft-rs installs one only when its log does not hold it).
    pub(super) fn push_install(&mut self, marker: SnapshotMarker) {
        self.written_entries(self.entries.len());
        self.compaction = None;
        self.install = Some(marker);
    }

    /// The last index of the log with these writes done, if they change it.
    pub(super) fn last_index(&self) -> Option<u64> {
        match (self.entries.back(), self.install) {
            (Some(last), _) => Some(last.index),
            (None, Some(marker)) => Some(marker.index),
            (None, None) => None,
        }
    }

    /// The first index of the log with these writes done, if they change it.
    /// A compaction marker does not: raft may still read what it covers
    /// until it is written.
    pub(super) fn first_index(&self) -> Option<u64> {
        self.install.map(|marker| marker.index + 1)
    }

    /// The waiting entry at `index`, if one is.
    pub(super) fn entry(&self, index: u64) -> Option<&Entry> {
        let front = self.entries.front()?.index;
        index
            .checked_sub(front)
            .and_then(|offset| self.entries.get(offset as usize))
    }

    /// Index of the first waiting entry.
    pub(super) fn entries_from(&self) -> Option<u64> {
        self.entries.front().map(|e| e.index)
    }
}

/// `count` entries from `first` in `term`, each with `data_len` bytes of
/// data (tests of this module and of the storage).
#[cfg(test)]
pub(super) fn test_entries(first: u64, count: u64, term: u64, data_len: usize) -> Vec<Entry> {
    (first..first + count)
        .map(|index| Entry {
            index,
            term,
            data: vec![index as u8; data_len].into(),
            ..Default::default()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(first: u64, count: u64, term: u64) -> Vec<Entry> {
        test_entries(first, count, term, 10)
    }

    fn indexes_and_terms(pending: &Pending) -> Vec<(u64, u64)> {
        pending.entries.iter().map(|e| (e.index, e.term)).collect()
    }

    #[test]
    fn later_entries_extend_and_a_conflict_replaces_the_suffix() {
        let mut pending = Pending::default();
        pending.push_entries(entries(5, 3, 1));
        pending.push_entries(entries(8, 2, 1));
        assert_eq!(pending.last_index(), Some(9));
        assert_eq!(pending.entry_bytes(), 50);
        pending.push_entries(entries(7, 1, 2));
        assert_eq!(
            indexes_and_terms(&pending),
            vec![(5, 1), (6, 1), (7, 2)],
            "a new leader's entry at 7 replaces 7 and after"
        );
        assert_eq!(pending.entry_bytes(), 30);
        pending.push_entries(entries(3, 1, 3));
        assert_eq!(indexes_and_terms(&pending), vec![(3, 3)]);
        assert_eq!(pending.entry(3).map(|e| e.term), Some(3));
        assert!(pending.entry(4).is_none() && pending.entry(2).is_none());
        pending.written_entries(1);
        assert!(pending.is_empty());
        assert_eq!(pending.entry_bytes(), 0);
    }

    #[test]
    fn an_installed_snapshot_drops_waiting_entries_and_moves_the_log_start() {
        let mut pending = Pending::default();
        pending.push_entries(entries(5, 3, 1));
        pending.compaction = Some(SnapshotMarker { index: 4, term: 1 });
        pending.push_install(SnapshotMarker { index: 20, term: 3 });
        assert_eq!(pending.first_index(), Some(21));
        assert_eq!(pending.last_index(), Some(20));
        assert!(pending.compaction.is_none() && pending.entries.is_empty());
        pending.push_entries(entries(21, 2, 3));
        assert_eq!(pending.last_index(), Some(22));
    }
}
