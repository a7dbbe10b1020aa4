//! Log writes the store could not take yet.
//!
//! The WAL refuses a write without failing when it cannot grow: its next
//! segment is still being prepared, or the disk is full. Raft goes on: the
//! write waits in the storage (which raft reads through), and the replica
//! reports a Ready persisted only once every write of it reached the store
//! and a sync covered it. The writes are retried at every turn; nothing is
//! acknowledged or voted on their behalf meanwhile.
//!
//! A full disk also changes what the replica does: it refuses new writes
//! with RESOURCE_EXHAUSTED, a leader hands leadership to a healthy voter,
//! and a follower takes no more appends than `MAX_LOG_BACKLOG_BYTES` (the
//! leader sends them again later). Reads go on. When space returns the
//! backlog drains and all of that ends by itself.

use std::time::Instant;

use corekv_proto::client::{response, ErrorCode};
use corekv_wal::WalError;
use raft::prelude::{Message, MessageType};

use crate::log_limit::LogLimit;
use crate::log_store::LogStore;
use crate::state_machine;

use super::{Replica, ReplicaError};

/// Bytes of entry data a replica holds for a log that cannot take them;
/// past it a follower drops the leader's appends (they are sent again).
pub const MAX_LOG_BACKLOG_BYTES: u64 = 64 << 20;

/// What the replica knows of the writes waiting in its storage.
#[derive(Default)]
pub(super) struct Backlog {
    /// The first Ready with a write that waits: it and every later one are
    /// not persisted before the storage has no waiting write.
    since_ready: Option<u64>,
    /// Why the log cannot grow, while that is the reason for the backlog.
    disk_full: Option<String>,
    /// "disk full: transferring leadership" lines: a leader tries again
    /// every election timeout for as long as the disk stays full, and when
    /// every voter shares that disk no transfer succeeds.
    step_down_log: LogLimit,
}

impl Backlog {
    /// Readys numbered up to this have every write in the store.
    pub(super) fn written_through(&self) -> u64 {
        self.since_ready.map_or(u64::MAX, |ready| ready - 1)
    }
}

impl<L: LogStore> Replica<L> {
    /// Takes the outcome of a write to the storage made for Ready `ready`:
    /// fine, queued behind a log that cannot grow (noted), or fail-stop.
    pub(super) fn logged(
        &mut self,
        ready: u64,
        result: Result<(), WalError>,
    ) -> Result<(), ReplicaError> {
        match result {
            Err(error) if !error.is_retryable() => return Err(self.fatal(error)),
            Err(error) => self.on_log_stalled(&error),
            Ok(()) => {}
        }
        if self.backlog.since_ready.is_none() && self.raw.store().has_pending() {
            self.backlog.since_ready = Some(ready);
        }
        Ok(())
    }

    /// Retries the writes that wait, in order, until the store refuses one
    /// again. Fail-stop only on an error that is not retryable.
    pub(super) fn flush_backlog(&mut self) -> Result<(), ReplicaError> {
        if self.backlog.since_ready.is_none() {
            return Ok(());
        }
        match self.raw.mut_store().write_pending() {
            Ok(()) => {}
            Err(error) if error.is_retryable() => {
                self.on_log_stalled(&error);
                return Ok(());
            }
            Err(error) => return Err(self.fatal(error)),
        }
        self.backlog.since_ready = None;
        if let Some(reason) = self.backlog.disk_full.take() {
            tracing::warn!(
                shard = self.options.shard,
                was = %reason,
                "the write-ahead log can grow again; writes resume"
            );
        }
        Ok(())
    }

    fn on_log_stalled(&mut self, error: &WalError) {
        let WalError::CannotGrow { path, error, .. } = error else {
            // The next segment is still being made: a matter of a turn.
            return;
        };
        if self.backlog.disk_full.is_some() {
            return;
        }
        let reason = format!("disk full on {}: {error}", path.display());
        tracing::error!(
            shard = self.options.shard,
            %reason,
            leader = self.is_leader(),
            "the write-ahead log cannot grow: refusing writes, handing leadership \
             to a healthy voter, retrying every tick"
        );
        self.backlog.disk_full = Some(reason);
    }

    /// Why this replica's log cannot grow (a full disk), if it cannot.
    pub fn disk_full(&self) -> Option<&str> {
        self.backlog.disk_full.as_deref()
    }

    /// True while some write waits for the log store (its next segment was
    /// not ready, or the disk is full).
    pub fn has_log_backlog(&self) -> bool {
        self.raw.store().has_pending()
    }

    /// Bytes of entries waiting for the log store.
    pub fn log_backlog_bytes(&self) -> u64 {
        self.raw.store().pending_entry_bytes()
    }

    /// The answer to a write while the disk is full.
    pub(super) fn disk_full_error(&self) -> Option<response::Result> {
        let reason = self.backlog.disk_full.as_deref()?;
        Some(state_machine::error(
            ErrorCode::ResourceExhausted,
            &format!(
                "shard {}: {reason}; the write was not applied, reads still work, \
                 writes resume when space is freed",
                self.options.shard
            ),
        ))
    }

    /// A follower whose log cannot take what it holds refuses more entries.
    pub(super) fn refuses_append(&self, message: &Message) -> bool {
        message.get_msg_type() == MessageType::MsgAppend
            && !message.entries.is_empty()
            && self.log_backlog_bytes() >= MAX_LOG_BACKLOG_BYTES
    }

    /// A leader that cannot write hands over to the most caught-up voter
    /// (once per election timeout, which is how long raft-rs tries one).
    pub(super) fn step_down_if_disk_full(&mut self) {
        if self.backlog.disk_full.is_none()
            || !self.is_leader()
            || self.raw.raft.lead_transferee.is_some()
        {
            return;
        }
        if let Some(peer) = self.best_successor() {
            if let Some(suppressed) = self.backlog.step_down_log.allow(Instant::now()) {
                tracing::warn!(
                    shard = self.options.shard,
                    to = peer,
                    suppressed,
                    "disk full: transferring leadership"
                );
            }
            self.transfer_leader(peer);
        }
    }
}
