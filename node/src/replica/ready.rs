//! Raft's Readys turned into work: messages out, committed entries and
//! configuration changes applied, entries appended to the log store, and the
//! persistence bookkeeping that lets held messages leave once a sync has
//! made their Ready durable.

use corekv_proto::client::{response, ErrorCode, MembershipResult};
use corekv_proto::log::Membership;
use raft::prelude::{Entry, EntryType, Message, MessageType};
use raft::StateRole;

use crate::log_store::LogStore;
use crate::membership;
use crate::state_machine;

use super::{Output, Replica, ReplicaError, RoleChange};

/// A Ready handed to raft whose persistence is not yet reported.
pub(super) struct Unpersisted {
    number: u64,
    /// Messages that may leave only once it is persisted.
    messages: Vec<Message>,
    /// raft-rs's `must_sync`: it holds entries, a snapshot, or a new term
    /// or vote. A Ready that only moved the commit index needs no fsync
    /// (the commit index is recovered from the log), only its turn.
    must_sync: bool,
}

impl<L: LogStore> Replica<L> {
    /// Handles every Ready raft has, in raft-rs's order: send messages, apply
    /// committed entries, append to the WAL, queue the persisted messages
    /// behind a sync. Starts a sync if none is in flight. Stops early once
    /// the turn's budget of committed bytes is spent ([`Replica::begin_turn`]);
    /// [`Replica::has_ready`] then says there is more.
    pub fn handle_ready(&mut self, out: &mut Output<L::SyncJob>) -> Result<(), ReplicaError> {
        // Writes that waited for the log go first: later ones queue behind.
        self.flush_backlog()?;
        while self.raw.has_ready() && self.apply_budget > 0 {
            let mut ready = self.raw.ready();
            self.last_ready_number = ready.number();
            if let Some(ss) = ready.ss() {
                self.on_role(ss.raft_state, ss.leader_id, out);
            }
            // A leader may send before its own append is durable (raft
            // thesis 10.2.1); these are never votes or acks of our log.
            out.messages.extend(ready.take_messages());
            if !ready.snapshot().is_empty() {
                let metadata = ready.snapshot().get_metadata().clone();
                self.install_snapshot(&metadata, out)?;
            }
            for read_state in ready.take_read_states() {
                self.on_read_state(read_state.index, &read_state.request_ctx);
            }
            self.apply(ready.take_committed_entries(), out)?;
            self.maybe_snapshot(out);
            // Entries and hard state go to the WAL in one turn; they become
            // durable together with the next sync.
            let number = ready.number();
            let result = self.raw.mut_store().append(ready.take_entries());
            self.logged(number, result)?;
            if let Some(hs) = ready.hs() {
                let result = self.raw.mut_store().set_hard_state(hs);
                self.logged(number, result)?;
            }
            // raft-rs holds every message of a non-leader until the Ready is
            // durable. A heartbeat response promises nothing about our log or
            // vote (etcd's raft sends it at once too; only append and vote
            // responses wait), and held behind a slow sync it would make the
            // leader believe it lost its quorum and step down.
            let (heartbeat_responses, messages): (Vec<Message>, Vec<Message>) = ready
                .take_persisted_messages()
                .into_iter()
                .partition(|m| m.get_msg_type() == MessageType::MsgHeartbeatResponse);
            out.messages.extend(heartbeat_responses);
            let unpersisted = Unpersisted {
                number: ready.number(),
                messages,
                must_sync: ready.must_sync(),
            };
            self.raw.advance_append_async(ready);
            self.report_applied();
            self.unpersisted.push_back(unpersisted);
            self.serve_applied_reads(out);
        }
        // Readys appended while the previous sync was in flight wait for the
        // next one, even if raft has nothing new to say.
        self.maybe_sync(out)?;
        if self.raw.has_ready() && self.apply_budget > 0 {
            return self.handle_ready(out);
        }
        Ok(())
    }

    /// Marks the sync handed out earlier as finished: raft learns its
    /// entries are durable and the messages that waited for it may leave.
    pub fn on_synced(
        &mut self,
        outcome: L::SyncOutcome,
        out: &mut Output<L::SyncJob>,
    ) -> Result<(), ReplicaError> {
        assert!(
            self.sync_in_flight.is_some(),
            "on_synced called without a sync in flight"
        );
        self.finish_sync_only(outcome, out)?;
        self.handle_ready(out)
    }

    /// True while a sync job handed out is not yet finished.
    pub fn sync_in_flight(&self) -> bool {
        self.sync_in_flight.is_some()
    }

    /// Finishes the sync in flight without handling new Readys (shutdown):
    /// the messages that waited for it still leave.
    pub fn finish_sync_only(
        &mut self,
        outcome: L::SyncOutcome,
        out: &mut Output<L::SyncJob>,
    ) -> Result<(), ReplicaError> {
        self.raw
            .mut_store()
            .wal_mut()
            .finish_sync(outcome)
            .map_err(|e| self.fatal(e))?;
        if let Some(covered) = self.sync_in_flight.take() {
            self.persisted_through(covered, out);
        }
        Ok(())
    }

    /// The last sync before exit: whatever was appended becomes durable.
    pub fn begin_final_sync(&mut self) -> Result<Option<L::SyncJob>, ReplicaError> {
        self.raw
            .mut_store()
            .wal_mut()
            .begin_sync()
            .map_err(|e| self.fatal(e))
    }

    /// Completes [`Replica::begin_final_sync`].
    pub fn finish_final_sync(&mut self, outcome: L::SyncOutcome) -> Result<(), ReplicaError> {
        self.raw
            .mut_store()
            .wal_mut()
            .finish_sync(outcome)
            .map_err(|e| self.fatal(e))
    }

    fn maybe_sync(&mut self, out: &mut Output<L::SyncJob>) -> Result<(), ReplicaError> {
        if self.sync_in_flight.is_some() {
            return Ok(());
        }
        // Only Readys whose every write reached the store can be covered.
        let written = self.backlog.written_through();
        let mut newest = self
            .unpersisted
            .iter()
            .rev()
            .map(|u| u.number)
            .find(|&n| n <= written);
        if !self
            .unpersisted
            .iter()
            .any(|u| u.must_sync && u.number <= written)
        {
            // Commit-only Readys: nothing raft needs durable before they count.
            if let Some(newest) = newest.take() {
                self.persisted_through(newest, out);
            }
            if !self.marker_unsynced {
                return Ok(());
            }
        }
        self.marker_unsynced = false;
        let job = self
            .raw
            .mut_store()
            .wal_mut()
            .begin_sync()
            .map_err(|e| self.fatal(e))?;
        match (job, newest) {
            (Some(job), newest) => {
                // A sync for a marker alone covers the newest Ready handled,
                // which is already persisted: raft ignores it a second time.
                let covered = newest.unwrap_or(self.last_ready_number.min(written));
                self.sync_in_flight = Some(covered);
                out.sync = Some(job);
                if crate::sim_bugs::planted(crate::sim_bugs::Bug::AckBeforeSync) {
                    self.persisted_through(covered, out);
                }
            }
            // Nothing unsynced: whatever these readys wrote is already durable.
            (None, Some(newest)) => self.persisted_through(newest, out),
            (None, None) => {}
        }
        Ok(())
    }

    /// Tells raft how far the state machine got. raft-rs refuses an applied
    /// index past what is persisted, and an installed snapshot is applied
    /// before it is, so the report waits for the persistence to catch up.
    fn report_applied(&mut self) {
        let log = &self.raw.raft.raft_log;
        let limit = log.committed.min(log.persisted);
        let applied = self.state_machine.applied_index().min(limit);
        if applied > log.applied {
            self.raw.advance_apply_to(applied);
        }
    }

    fn persisted_through(&mut self, number: u64, out: &mut Output<L::SyncJob>) {
        self.raw.on_persist_ready(number);
        if self
            .installing_snapshot
            .is_some_and(|ready| ready <= number)
        {
            self.installing_snapshot = None;
        }
        self.report_applied();
        while let Some(front) = self.unpersisted.front() {
            if front.number > number {
                break;
            }
            let done = self.unpersisted.pop_front().expect("front exists");
            out.messages.extend(done.messages);
        }
    }

    fn on_role(&mut self, role: StateRole, leader_id: u64, out: &mut Output<L::SyncJob>) {
        let was_leader = self.role == StateRole::Leader;
        let old_leader = self.leader_id;
        self.role = role;
        self.leader_id = leader_id;
        out.role_changes.push(RoleChange {
            role,
            term: self.raw.raft.term,
            leader_id,
        });
        if was_leader && role != StateRole::Leader {
            self.fail_all_pending(out, "leadership changed while the request was pending");
        } else if role != StateRole::Leader && leader_id != old_leader {
            // Follower reads asked the old leader, whose answer may never
            // come: the client retries at once instead of at the deadline.
            self.fail_all_pending(
                out,
                "the shard's leader changed while the read waited for it",
            );
        }
    }

    fn apply(
        &mut self,
        entries: Vec<Entry>,
        out: &mut Output<L::SyncJob>,
    ) -> Result<(), ReplicaError> {
        for entry in entries {
            let index = entry.index;
            match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => {
                    // A new leader's empty entry.
                    self.state_machine.skip(index);
                }
                EntryType::EntryNormal => {
                    let bytes = entry.data.len() as u64;
                    self.applied_since_snapshot.0 += 1;
                    self.applied_since_snapshot.1 += bytes;
                    self.apply_budget = self.apply_budget.saturating_sub(bytes);
                    let result = self.state_machine.apply(index, &entry.data);
                    self.answer_write(index, entry.term, result, out);
                }
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    self.state_machine.skip(index);
                    self.apply_conf_change(&entry, out);
                }
            }
        }
        if let Some(replay) = &mut self.replay {
            let applied = self.state_machine.applied_index();
            replay.progress.update(applied.saturating_sub(replay.from));
            if applied >= replay.to {
                replay.progress.finish();
                self.replay = None;
            }
        }
        Ok(())
    }

    /// Applies a configuration change on every replica alike: raft-rs's
    /// configuration, then the members' addresses from the change's
    /// context. A change raft-rs refuses (it validated it when proposed, so
    /// only a change raced by another) changes nothing, on every replica.
    fn apply_conf_change(&mut self, entry: &Entry, out: &mut Output<L::SyncJob>) {
        let shard = self.options.shard;
        let result = match membership::decode_change(entry) {
            None => Err("undecodable configuration change".to_string()),
            Some((change, context)) => match self.raw.apply_conf_change(&change) {
                Ok(conf) => {
                    self.step_down_if_removed();
                    let mut next = self.membership.clone();
                    membership::apply(&mut next, &conf, &context);
                    self.set_membership(next, entry.index, out);
                    Ok(())
                }
                Err(e) => Err(e.to_string()),
            },
        };
        let answer = match result {
            Ok(()) => response::Result::Membership(MembershipResult {
                membership: Some(membership::report(&self.membership, shard, entry.index)),
                unchanged: false,
            }),
            Err(reason) => {
                tracing::warn!(shard, index = entry.index, %reason, "configuration change not applied");
                state_machine::error(
                    ErrorCode::FailedPrecondition,
                    &format!("shard {shard}: the configuration change was not applied: {reason}"),
                )
            }
        };
        self.answer_write(entry.index, entry.term, answer, out);
    }

    /// A leader whose removal was just applied steps down, as etcd's raft
    /// does (raft-rs 0.7 leaves it leading without its own progress and
    /// aborts at its next append). It gets here when it took over while its
    /// own removal, proposed by the leader before it, was still uncommitted
    /// (found by the simulator, seed 1711): a leader never proposes its own
    /// removal (see `step_aside`).
    fn step_down_if_removed(&mut self) {
        let me = self.options.node_id;
        let raft = &mut self.raw.raft;
        if raft.state == StateRole::Leader && !raft.prs().conf().voters().contains(me) {
            tracing::warn!(
                shard = self.options.shard,
                term = raft.term,
                "this leader's removal was applied: stepping down"
            );
            let term = raft.term;
            raft.become_follower(term, raft::INVALID_ID);
        }
    }

    /// Takes `next` as the group's membership (applied at `index`), and
    /// notices when it no longer holds this node.
    pub(super) fn set_membership(
        &mut self,
        next: Membership,
        index: u64,
        out: &mut Output<L::SyncJob>,
    ) {
        let me = self.options.node_id;
        let was_member = membership::ids(&self.membership).any(|id| id == me);
        let is_member = membership::ids(&next).any(|id| id == me);
        self.membership = next;
        self.membership_index = index;
        out.membership_changed = true;
        if was_member && !is_member {
            self.mark_removed("its removal was applied");
        }
    }
}
