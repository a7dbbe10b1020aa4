//! Client requests on the replica: writes queued and proposed as one batch
//! per turn, reads gathered into ReadIndex (or lease) rounds and served once
//! apply reaches their index, and the bound, timeout and failure of whatever
//! is pending.

use bytes::Bytes;
use corekv_proto::client::{request::Op, response, ErrorCode, GetResult};
use raft::prelude::{Entry, Message, MessageType};
use raft::ReadOnlyOption;

use crate::log_store::LogStore;
use crate::sessions::SessionTag;
use crate::state_machine;

use super::{NotLeader, Output, Refused, Replica, Reply, Token, MAX_PENDING_REQUESTS};

pub(super) struct PendingWrite {
    term: u64,
    token: Token,
    deadline_tick: u64,
}

pub(super) struct PendingRead {
    token: Token,
    op: Op,
    deadline_tick: u64,
}

impl<L: LogStore> Replica<L> {
    /// Queues a write; it enters raft with every other write of this turn
    /// at the next [`Replica::flush`].
    pub fn propose(&mut self, token: Token, op: Op, tag: SessionTag) -> Result<(), Refused> {
        if !self.is_leader() {
            let not_leader = NotLeader {
                leader_id: self.leader_id(),
            };
            return Err(Refused { not_leader, op });
        }
        let entry = if let Some(refused) = self.disk_full_error() {
            Err(refused)
        } else if let Some(refused) = self.memory_limit_error(&op) {
            Err(refused)
        } else if self.pending_requests() >= MAX_PENDING_REQUESTS {
            Err(self.too_many_pending())
        } else {
            crate::command::encode_owned(op, tag)
                .ok_or_else(|| state_machine::error(ErrorCode::InvalidArgument, "not a write"))
        };
        self.queued_proposals.push((token, entry));
        Ok(())
    }

    /// Serves a read: STALE at once from the local state machine; otherwise
    /// it waits for this turn's ReadIndex round (or lease check). A follower
    /// refuses with [`NotLeader`] unless the read asks to be served locally
    /// (`local`, follower reads): then its round goes through the leader and
    /// the read is served once this replica has applied the leader's commit
    /// index.
    pub fn read(
        &mut self,
        token: Token,
        op: Op,
        consistency: corekv_proto::client::Consistency,
        out: &mut Output<L::SyncJob>,
    ) -> Result<(), Refused> {
        use corekv_proto::client::Consistency;
        if consistency == Consistency::Stale {
            let result = self.serve_read(&op);
            out.replies.push(Reply { token, result });
            return Ok(());
        }
        let local = match &op {
            Op::Get(get) => get.local,
            Op::Scan(scan) => scan.local,
            _ => false,
        };
        if !self.is_leader() && (!local || self.leader_id() == 0) {
            let not_leader = NotLeader {
                leader_id: self.leader_id(),
            };
            return Err(Refused { not_leader, op });
        }
        if self.pending_requests() >= MAX_PENDING_REQUESTS {
            let result = self.too_many_pending();
            out.replies.push(Reply { token, result });
            return Ok(());
        }
        let read = PendingRead {
            token,
            op,
            deadline_tick: self.ticks + self.options.request_timeout_ticks,
        };
        // A lease is the leader's: a follower asks the leader either way.
        if consistency == Consistency::Lease && self.is_leader() {
            if crate::sim_bugs::planted(crate::sim_bugs::Bug::LeaseWithoutCheck) {
                let result = self.serve_read(&read.op);
                out.replies.push(Reply { token, result });
                return Ok(());
            }
            self.queued_lease_reads.push(read);
        } else {
            self.queued_reads.push(read);
        }
        Ok(())
    }

    /// Writes and read rounds this replica holds (a read round counts once:
    /// its reads arrived in one turn, which the shard's inbox bounds).
    fn pending_requests(&self) -> usize {
        self.pending_writes.len()
            + self.queued_proposals.len()
            + self.queued_reads.len()
            + self.queued_lease_reads.len()
            + self.read_rounds.len()
            + self.reads_awaiting_apply.len()
    }

    /// RESOURCE_EXHAUSTED for a write that would grow the state machine past
    /// `max_state_bytes`. Checked against the applied state when the write
    /// arrives (writes in flight may pass the limit by their own size); the
    /// apply itself never refuses, so replicas cannot diverge over it.
    fn memory_limit_error(&self, op: &Op) -> Option<response::Result> {
        let limit = self.options.max_state_bytes;
        let (key, value_len) = match op {
            Op::Put(put) => (&put.key, put.value.len()),
            Op::Cas(cas) => (&cas.key, cas.value.len()),
            _ => return None,
        };
        let used = self.state_machine.bytes();
        // The common case needs no lookup of the key's current value: even
        // as a new pair the write fits.
        let as_new = crate::state_machine::pair_bytes(key.len(), value_len);
        if limit == 0 || used.saturating_add(as_new) <= limit {
            return None;
        }
        let growth = self.state_machine.growth(key, value_len);
        if growth <= 0 || used.saturating_add(growth as u64) <= limit {
            return None;
        }
        Some(state_machine::error(
            ErrorCode::ResourceExhausted,
            &format!(
                "shard {}: the state machine holds {used} bytes and this write adds {growth}, \
                 past its limit of {limit} (max_memory_bytes split between shards); \
                 deletes and smaller overwrites still work",
                self.options.shard
            ),
        ))
    }

    fn too_many_pending(&self) -> response::Result {
        state_machine::error(
            ErrorCode::Unavailable,
            &format!(
                "shard {} holds {MAX_PENDING_REQUESTS} pending requests; try again shortly",
                self.options.shard
            ),
        )
    }

    /// Hands this turn's writes to raft as one batch and starts this turn's
    /// read rounds. Called once per loop turn, before [`Replica::handle_ready`].
    pub fn flush(&mut self, out: &mut Output<L::SyncJob>) {
        self.flush_proposals(out);
        self.flush_reads();
    }

    fn flush_proposals(&mut self, out: &mut Output<L::SyncJob>) {
        if self.queued_proposals.is_empty() {
            return;
        }
        let mut proposals = Vec::with_capacity(self.queued_proposals.len());
        for (token, entry) in std::mem::take(&mut self.queued_proposals) {
            match entry {
                Ok(data) => proposals.push((token, data)),
                Err(result) => out.replies.push(Reply { token, result }),
            }
        }
        if proposals.is_empty() {
            return;
        }
        let mut message = Message::default();
        message.set_msg_type(MessageType::MsgPropose);
        message.from = self.options.node_id;
        let (tokens, datas): (Vec<Token>, Vec<Bytes>) = proposals.into_iter().unzip();
        let entries_data = if crate::sim_bugs::planted(crate::sim_bugs::Bug::AckBeforeCommit) {
            datas.clone()
        } else {
            Vec::new()
        };
        let entries: Vec<Entry> = datas
            .into_iter()
            .map(|data| Entry {
                data,
                ..Default::default()
            })
            .collect();
        message.set_entries(entries.into());
        let last_before = self.raw.raft.raft_log.last_index();
        let accepted = self.raw.step(message).is_ok()
            && self.raw.raft.raft_log.last_index() == last_before + tokens.len() as u64;
        if !accepted {
            out.proposals_dropped += tokens.len() as u64;
            for token in tokens {
                out.replies.push(Reply {
                    token,
                    result: state_machine::error(
                        ErrorCode::Unavailable,
                        "proposal dropped: leadership is changing",
                    ),
                });
            }
            return;
        }
        out.proposals += tokens.len() as u64;
        let term = self.raw.raft.term;
        let deadline_tick = self.ticks + self.options.request_timeout_ticks;
        for (i, token) in tokens.into_iter().enumerate() {
            if crate::sim_bugs::planted(crate::sim_bugs::Bug::AckBeforeCommit) {
                let index = last_before + 1 + i as u64;
                out.replies.push(Reply {
                    token,
                    result: answer_before_commit(index, &entries_data[i]),
                });
                continue;
            }
            self.pending_writes.insert(
                last_before + 1 + i as u64,
                PendingWrite {
                    term,
                    token,
                    deadline_tick,
                },
            );
        }
    }

    /// Waits for the entry proposed at `index` to be applied, then answers
    /// `token` (or times out like any write).
    pub(super) fn track_write(&mut self, index: u64, token: Token) {
        self.pending_writes.insert(
            index,
            PendingWrite {
                term: self.raw.raft.term,
                token,
                deadline_tick: self.ticks + self.options.request_timeout_ticks,
            },
        );
    }

    fn flush_reads(&mut self) {
        if !self.is_leader() {
            // Follower reads: raft-rs forwards the round to the leader, which
            // answers with its commit index once a quorum confirmed it still
            // leads. Without a leader they wait (until their deadline).
            if self.leader_id() != 0 && !self.queued_reads.is_empty() {
                let reads = std::mem::take(&mut self.queued_reads);
                self.start_read_round(reads, ReadOnlyOption::Safe);
            }
            return;
        }
        // raft-rs silently drops a ReadIndex on a leader that has not yet
        // committed an entry of its term; keep those reads queued until it has.
        if !self.raw.raft.commit_to_current_term() {
            return;
        }
        if !self.queued_reads.is_empty() {
            let reads = std::mem::take(&mut self.queued_reads);
            self.start_read_round(reads, ReadOnlyOption::Safe);
        }
        if !self.queued_lease_reads.is_empty() {
            let reads = std::mem::take(&mut self.queued_lease_reads);
            // See `lease_suspect_until`: a full ReadIndex round instead.
            let option = if self.ticks < self.lease_suspect_until {
                ReadOnlyOption::Safe
            } else {
                ReadOnlyOption::LeaseBased
            };
            self.start_read_round(reads, option);
        }
    }

    fn start_read_round(&mut self, reads: Vec<PendingRead>, option: ReadOnlyOption) {
        let ctx = self.next_read_ctx;
        self.next_read_ctx += 1;
        self.read_rounds.insert(ctx, reads);
        // The read-only option is a raft-wide setting; switching it for one
        // round is how a lease read is asked of raft-rs per request.
        self.raw.raft.read_only.option = option;
        self.raw.read_index(read_context(self.raw.raft.id, ctx));
        self.raw.raft.read_only.option = ReadOnlyOption::Safe;
    }

    /// Fails every pending request: the node is stopping.
    pub fn shutdown(&mut self, out: &mut Output<L::SyncJob>) {
        self.fail_all_pending(out, "node is shutting down");
    }

    pub(super) fn fail_all_pending(&mut self, out: &mut Output<L::SyncJob>, why: &str) {
        let result = || state_machine::error(ErrorCode::Unavailable, why);
        for (_, write) in std::mem::take(&mut self.pending_writes) {
            out.replies.push(Reply {
                token: write.token,
                result: result(),
            });
        }
        let reads = self
            .queued_reads
            .drain(..)
            .chain(self.queued_lease_reads.drain(..))
            .chain(
                std::mem::take(&mut self.read_rounds)
                    .into_values()
                    .flatten(),
            )
            .chain(self.reads_awaiting_apply.drain(..).flat_map(|(_, r)| r));
        for read in reads {
            out.replies.push(Reply {
                token: read.token,
                result: result(),
            });
        }
    }

    pub(super) fn on_read_state(&mut self, index: u64, ctx: &[u8]) {
        let Some((node, round)) = parse_read_context(ctx) else {
            return;
        };
        if node != self.raw.raft.id {
            return;
        }
        if let Some(reads) = self.read_rounds.remove(&round) {
            self.reads_awaiting_apply.push_back((index, reads));
        }
    }

    pub(super) fn serve_applied_reads(&mut self, out: &mut Output<L::SyncJob>) {
        let applied = self.state_machine.applied_index();
        // Read indexes arrive in increasing order, so the ready ones are a prefix.
        while let Some((index, _)) = self.reads_awaiting_apply.front() {
            if *index > applied {
                break;
            }
            let (_, reads) = self.reads_awaiting_apply.pop_front().expect("front exists");
            for read in reads {
                let result = self.serve_read(&read.op);
                out.replies.push(Reply {
                    token: read.token,
                    result,
                });
            }
        }
    }

    fn serve_read(&self, op: &Op) -> response::Result {
        match op {
            Op::Get(get) => {
                let result = match self.state_machine.get(&get.key) {
                    Some((value, version)) => GetResult {
                        found: true,
                        value,
                        version,
                    },
                    None => GetResult::default(),
                };
                response::Result::Get(result)
            }
            Op::Scan(scan) => {
                response::Result::Scan(self.state_machine.scan(&scan.start, &scan.end, scan.limit))
            }
            _ => state_machine::error(ErrorCode::InvalidArgument, "not a read operation"),
        }
    }

    pub(super) fn answer_write(
        &mut self,
        index: u64,
        term: u64,
        result: response::Result,
        out: &mut Output<L::SyncJob>,
    ) {
        // Anything proposed below this index that is still pending was
        // overwritten by another leader's log and will never be applied.
        while let Some(entry) = self.pending_writes.first_entry() {
            if *entry.key() >= index {
                break;
            }
            let write = entry.remove();
            out.replies.push(Reply {
                token: write.token,
                result: superseded(),
            });
        }
        if let Some(write) = self.pending_writes.remove(&index) {
            // Matched by index and term: the same index in another term is
            // another leader's entry, not ours.
            let result = if write.term == term {
                result
            } else {
                superseded()
            };
            out.replies.push(Reply {
                token: write.token,
                result,
            });
        }
    }

    pub(super) fn expire(&mut self, out: &mut Output<L::SyncJob>) {
        let now = self.ticks;
        let timeout = || state_machine::error(ErrorCode::Timeout, "request timed out");
        // Writes are proposed in index order with the same timeout, so the
        // expired ones are a prefix.
        while let Some(entry) = self.pending_writes.first_entry() {
            if entry.get().deadline_tick > now {
                break;
            }
            let write = entry.remove();
            out.replies.push(Reply {
                token: write.token,
                result: timeout(),
            });
        }
        let expired_rounds: Vec<u64> = self
            .read_rounds
            .iter()
            .filter(|(_, reads)| reads.first().is_some_and(|r| r.deadline_tick <= now))
            .map(|(ctx, _)| *ctx)
            .collect();
        for ctx in expired_rounds {
            for read in self.read_rounds.remove(&ctx).unwrap_or_default() {
                out.replies.push(Reply {
                    token: read.token,
                    result: timeout(),
                });
            }
        }
        for queue in [&mut self.queued_reads, &mut self.queued_lease_reads] {
            let mut kept = Vec::with_capacity(queue.len());
            for read in queue.drain(..) {
                if read.deadline_tick <= now {
                    out.replies.push(Reply {
                        token: read.token,
                        result: timeout(),
                    });
                } else {
                    kept.push(read);
                }
            }
            *queue = kept;
        }
    }
}

fn superseded() -> response::Result {
    state_machine::error(
        ErrorCode::Unavailable,
        "the proposal was replaced by another leader's entry; it was not applied",
    )
}

/// The answer the `AckBeforeCommit` mistake gives at once: what applying
/// the command at `index` would answer if nothing else intervened.
fn answer_before_commit(index: u64, data: &Bytes) -> response::Result {
    use corekv_proto::client::{DeleteResult, WriteResult};
    use corekv_proto::log::command::Op as LogOp;
    match crate::command::decode(data) {
        Ok((LogOp::Delete(_), _)) => response::Result::Delete(DeleteResult { deleted: true }),
        _ => response::Result::Write(WriteResult { version: index }),
    }
}

/// Bytes of a ReadIndex round's context: the node that started it, then
/// the round's number. The leader keys its pending rounds by context, so
/// rounds that followers forward must not collide with its own or with
/// each other's.
pub const READ_CONTEXT_BYTES: usize = 16;

fn read_context(node: u64, round: u64) -> Vec<u8> {
    let mut ctx = Vec::with_capacity(READ_CONTEXT_BYTES);
    ctx.extend_from_slice(&node.to_be_bytes());
    ctx.extend_from_slice(&round.to_be_bytes());
    ctx
}

fn parse_read_context(ctx: &[u8]) -> Option<(u64, u64)> {
    let ctx = <[u8; READ_CONTEXT_BYTES]>::try_from(ctx).ok()?;
    let (node, round) = ctx.split_at(8);
    Some((
        u64::from_be_bytes(node.try_into().ok()?),
        u64::from_be_bytes(round.try_into().ok()?),
    ))
}
