//! Snapshots on the replica: taking one once enough was applied, recording
//! one once it is durable, and installing one received from the leader.

use corekv_wal::SnapshotMarker;
use raft::prelude::{Message, MessageType};
use raft::Storage as _;

use crate::log_store::LogStore;
use crate::snapshot::SnapshotMeta;

use super::{LoadedSnapshot, Output, Replica, ReplicaError, MAX_RECEIVED_SNAPSHOTS};

impl<L: LogStore> Replica<L> {
    /// Stashes a verified snapshot received from the leader; raft installs
    /// it when it steps the MsgSnapshot that came with it. Two transfers may
    /// finish in one turn, so the newest few are kept until raft picks one.
    ///
    /// A snapshot dropped here (mismatched, replaced, or past the few kept)
    /// goes to [`Output::retired_states`]: freeing a large one takes long.
    pub fn receive_snapshot(
        &mut self,
        snapshot: LoadedSnapshot,
        message: Message,
        out: &mut Output<L::SyncJob>,
    ) {
        let metadata = message.get_snapshot().get_metadata();
        if message.get_msg_type() != MessageType::MsgSnapshot
            || (metadata.index, metadata.term) != (snapshot.meta.index, snapshot.meta.term)
        {
            tracing::warn!(
                shard = self.options.shard,
                index = snapshot.meta.index,
                "snapshot dropped: its raft message describes another snapshot"
            );
            out.retired_states.push(snapshot.image);
            return;
        }
        let key = (snapshot.meta.index, snapshot.meta.term);
        self.retire_received(out, |s| (s.meta.index, s.meta.term) == key);
        self.received_snapshots.push_back(snapshot);
        while self.received_snapshots.len() > MAX_RECEIVED_SNAPSHOTS {
            if let Some(oldest) = self.received_snapshots.pop_front() {
                out.retired_states.push(oldest.image);
            }
        }
        self.step(message);
    }

    /// Moves the received snapshots `retire` picks to
    /// [`Output::retired_states`].
    fn retire_received(
        &mut self,
        out: &mut Output<L::SyncJob>,
        mut retire: impl FnMut(&LoadedSnapshot) -> bool,
    ) {
        let received = std::mem::take(&mut self.received_snapshots);
        for snapshot in received {
            if retire(&snapshot) {
                out.retired_states.push(snapshot.image);
            } else {
                self.received_snapshots.push_back(snapshot);
            }
        }
    }

    pub(super) fn install_snapshot(
        &mut self,
        metadata: &raft::prelude::SnapshotMetadata,
        out: &mut Output<L::SyncJob>,
    ) -> Result<(), ReplicaError> {
        let position = self
            .received_snapshots
            .iter()
            .position(|r| r.meta.index == metadata.index && r.meta.term == metadata.term);
        // raft only installs what was stepped in with receive_snapshot.
        let Some(received) = position.and_then(|p| self.received_snapshots.remove(p)) else {
            return Err(ReplicaError::SnapshotNotReceived {
                shard: self.options.shard,
                index: metadata.index,
                term: metadata.term,
            });
        };
        self.retire_received(out, |r| r.meta.index <= metadata.index);
        let marker = SnapshotMarker {
            index: metadata.index,
            term: metadata.term,
        };
        self.compact_to = Some(marker);
        let ready = self.last_ready_number;
        let result = self.raw.mut_store().install_snapshot_marker(marker);
        self.logged(ready, result)?;
        self.set_membership(received.meta.membership.clone(), metadata.index, out);
        self.raw
            .mut_store()
            .set_latest_snapshot(received.meta.clone());
        let retired = self.state_machine.restore(metadata.index, received.image);
        out.retired_states.push(retired);
        self.applied_since_snapshot = (0, 0);
        self.snapshot_base = (self.state_machine.len() as u64, self.state_machine.bytes());
        out.snapshot_installed = Some(received.meta);
        self.installing_snapshot = Some(ready);
        Ok(())
    }

    /// Log bytes (applied entries' payloads) after which the next snapshot
    /// is due: `snapshot_bytes`, or `snapshot_log_percent` % of the state
    /// at the last snapshot if that is more.
    pub fn snapshot_interval_bytes(&self) -> u64 {
        let (_, base_bytes) = self.snapshot_base;
        self.options
            .snapshot_bytes
            .max(base_bytes.saturating_mul(self.options.snapshot_log_percent) / 100)
    }

    pub(super) fn maybe_snapshot(&mut self, out: &mut Output<L::SyncJob>) {
        let wanted = self.raw.store().take_snapshot_wanted();
        let (entries, bytes) = self.applied_since_snapshot;
        // The thresholds grow with the state, so a large state is written
        // no more often than its size in log has gone by (see
        // `snapshot_log_percent`); a small one as configured.
        let (base_keys, _) = self.snapshot_base;
        let percent = self.options.snapshot_log_percent;
        let entries_due = self
            .options
            .snapshot_entries
            .max(base_keys.saturating_mul(percent) / 100);
        let bytes_due = self.snapshot_interval_bytes();
        let due = entries >= entries_due || bytes >= bytes_due;
        if self.snapshot_in_progress || !(due || wanted) {
            return;
        }
        let index = self.state_machine.applied_index();
        let Ok(term) = self.raw.store().term(index) else {
            return;
        };
        if index == 0
            || self
                .raw
                .store()
                .latest_snapshot()
                .is_some_and(|s| s.index >= index)
        {
            return;
        }
        let meta = SnapshotMeta {
            shard: self.options.shard,
            index,
            term,
            membership: self.membership.clone(),
        };
        self.snapshot_in_progress = true;
        self.applied_since_snapshot = (0, 0);
        self.snapshot_base = (self.state_machine.len() as u64, self.state_machine.bytes());
        out.snapshot_to_write = Some((meta, self.state_machine.view()));
    }

    /// The snapshot handed out in [`Output::snapshot_to_write`] is durable
    /// (Ok) or could not be written (Err, retried at the next threshold).
    /// Durable: the WAL may now drop the entries it covers.
    pub fn on_snapshot_written(
        &mut self,
        result: Result<SnapshotMeta, crate::snapshot::SnapshotError>,
    ) -> Result<(), ReplicaError> {
        self.snapshot_in_progress = false;
        let meta = match result {
            Ok(meta) => meta,
            Err(e) => {
                tracing::error!(shard = self.options.shard, error = %e, "snapshot failed");
                return Ok(());
            }
        };
        // A snapshot from the leader may have been installed while this one
        // was written: the log already starts after it, and the newer
        // snapshot is the one to offer.
        let log_start = self.raw.store().first_index().unwrap_or(1);
        if meta.index < log_start {
            tracing::info!(
                shard = self.options.shard,
                index = meta.index,
                log_start,
                "snapshot written behind an installed one; nothing to compact"
            );
            return Ok(());
        }
        let newest = SnapshotMarker {
            index: meta.index,
            term: meta.term,
        };
        self.raw.mut_store().set_latest_snapshot(meta);
        // Up to the snapshot before this one (see `compact_to`), if the log
        // still starts before it and holds it.
        let Some(marker) = self.compact_to.replace(newest) else {
            return Ok(());
        };
        let store = self.raw.store();
        if marker.index < log_start || store.term(marker.index).ok() != Some(marker.term) {
            return Ok(());
        }
        let result = self.raw.mut_store().compact(marker);
        self.logged(self.last_ready_number, result)?;
        self.marker_unsynced = true;
        Ok(())
    }

    /// Segment files the WAL no longer needs (their entries are covered by a
    /// durable snapshot); the caller deletes them off the shard thread.
    pub fn take_obsolete_segments(&mut self) -> Vec<std::path::PathBuf> {
        self.raw.mut_store().wal_mut().take_obsolete_segments()
    }

    /// Tells raft how a snapshot transfer to `peer` ended.
    pub fn report_snapshot(&mut self, peer: u64, ok: bool) {
        let status = if ok {
            raft::SnapshotStatus::Finish
        } else {
            raft::SnapshotStatus::Failure
        };
        self.raw.report_snapshot(peer, status);
    }
}
