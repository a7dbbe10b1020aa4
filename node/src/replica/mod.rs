//! The sans-IO replica of one shard: raft-rs `RawNode` over the WAL, the
//! state machine, and the bookkeeping of pending proposals and reads.
//!
//! It takes inputs (tick, peer message, proposal, read, "sync finished") and
//! fills an [`Output`] (messages to send, a WAL sync to run, replies). It
//! never touches a socket, a clock or a thread: time is counted in ticks,
//! and the WAL sync is handed out as a job for the shell to run. That is what
//! lets a test drive three replicas in one thread.

use std::collections::{BTreeMap, HashMap, VecDeque};

use bytes::Bytes;
use corekv_proto::client::{request::Op, response, ErrorCode, GetResult, Role, ShardStatus};
use corekv_wal::{SnapshotMarker, SyncJob, Wal, WalError};
use protobuf::Message as _;
use raft::prelude::{ConfChange, ConfChangeV2, ConfState, Entry, EntryType, Message, MessageType};
use raft::{RawNode, ReadOnlyOption, StateRole, Storage as _};

use crate::log_store::LogStore;
use crate::sessions::SessionTag;
use crate::snapshot::SnapshotMeta;
use crate::state_machine::{self, Image, StateMachine};
use crate::storage::RaftStorage;

/// Requests a replica holds at once (writes waiting to commit and apply,
/// reads waiting for their round); past it new ones are answered
/// UNAVAILABLE at once.
pub const MAX_PENDING_REQUESTS: usize = 64 * 1024;

/// Verified snapshots kept while raft decides which one to install.
const MAX_RECEIVED_SNAPSHOTS: usize = 2;

/// Opaque handle the shell uses to route a reply back to whoever asked.
pub type Token = u64;

/// Limits and timings of one replica.
#[derive(Clone, Debug)]
pub struct ReplicaOptions {
    /// This node's raft id (>= 1).
    pub node_id: u64,
    /// Shard index, for logs.
    pub shard: u32,
    /// The static voter set a fresh cluster bootstraps with.
    pub voters: Vec<u64>,
    /// Ticks between leader heartbeats.
    pub heartbeat_ticks: usize,
    /// Ticks without a leader before an election (randomised by raft-rs in
    /// `[election_ticks, 2 * election_ticks)`).
    pub election_ticks: usize,
    /// A pending request older than this many ticks is answered TIMEOUT.
    pub request_timeout_ticks: u64,
    /// Upper bound on the bytes of entries in one append message.
    pub max_size_per_msg: u64,
    /// Upper bound on append messages in flight to one follower.
    pub max_inflight_msgs: usize,
    /// Snapshot once this many entries were applied since the last one.
    pub snapshot_entries: u64,
    /// ... or once this many bytes of entries were applied.
    pub snapshot_bytes: u64,
}

/// A snapshot restored at start-up or received from the leader.
pub struct LoadedSnapshot {
    /// What it covers.
    pub meta: SnapshotMeta,
    /// The state machine at `meta.index`.
    pub image: Image,
}

/// An answer for the request behind `token`.
#[derive(Debug)]
pub struct Reply {
    /// Whoever asked.
    pub token: Token,
    /// The outcome.
    pub result: response::Result,
}

/// A change of role or leader, for logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoleChange {
    /// The new role.
    pub role: StateRole,
    /// The term it happened in.
    pub term: u64,
    /// The leader now known (0 = none).
    pub leader_id: u64,
}

/// Everything one step of the replica asks the shell to do, in order.
/// `J` is the log store's sync job ([`SyncJob`] for the WAL).
pub struct Output<J = SyncJob> {
    /// Raft messages to send, in order, per destination.
    pub messages: Vec<Message>,
    /// Client answers.
    pub replies: Vec<Reply>,
    /// A WAL sync to run; when it finishes, call [`Replica::on_synced`].
    pub sync: Option<J>,
    /// Role or leader changes seen during this step.
    pub role_changes: Vec<RoleChange>,
    /// Writes handed to raft during this step.
    pub proposals: u64,
    /// Writes raft refused during this step.
    pub proposals_dropped: u64,
    /// A snapshot to write off the shard thread; report the outcome with
    /// [`Replica::on_snapshot_written`].
    pub snapshot_to_write: Option<(SnapshotMeta, Image)>,
    /// A snapshot received from the leader was installed.
    pub snapshot_installed: Option<SnapshotMeta>,
}

impl<J> Default for Output<J> {
    fn default() -> Self {
        Output {
            messages: Vec::new(),
            replies: Vec::new(),
            sync: None,
            role_changes: Vec::new(),
            proposals: 0,
            proposals_dropped: 0,
            snapshot_to_write: None,
            snapshot_installed: None,
        }
    }
}

/// Why the replica cannot take a request itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotLeader {
    /// The leader this replica knows of, 0 if none.
    pub leader_id: u64,
}

/// Why a replica cannot start or go on (fail-stop).
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// The log store failed: an append, a sync or a start-up write.
    #[error("shard {shard}: write-ahead log failed: {source}")]
    Log {
        /// The shard.
        shard: u32,
        /// The store's error.
        #[source]
        source: WalError,
    },
    /// The log was compacted behind a snapshot that is gone or unreadable:
    /// the entries before the log's start exist nowhere on this node.
    #[error(
        "shard {shard}: the WAL in {} starts after index {log_start} but no readable snapshot \
         covers it (newest usable snapshot: index {covered}); restore this shard from a replica",
        .location.display()
    )]
    MissingSnapshot {
        /// The shard.
        shard: u32,
        /// Where the log lives.
        location: std::path::PathBuf,
        /// The index the log's snapshot marker covers.
        log_start: u64,
        /// The index the newest usable snapshot covers (0 = none).
        covered: u64,
    },
    /// raft asked to install a snapshot this replica does not hold (a bug:
    /// only verified snapshots are stepped in).
    #[error("shard {shard}: raft installs snapshot at index {index} term {term} that this replica never received")]
    SnapshotNotReceived {
        /// The shard.
        shard: u32,
        /// The snapshot's index.
        index: u64,
        /// The snapshot's term.
        term: u64,
    },
    /// raft-rs refused the recovered hard state, configuration or log.
    #[error("shard {shard}: raft cannot start from the recovered state: {source}")]
    RaftStart {
        /// The shard.
        shard: u32,
        /// raft-rs's reason.
        #[source]
        source: raft::Error,
    },
}

/// A Ready handed to raft whose persistence is not yet reported.
struct Unpersisted {
    number: u64,
    /// Messages that may leave only once it is persisted.
    messages: Vec<Message>,
    /// raft-rs's `must_sync`: it holds entries, a snapshot, or a new term
    /// or vote. A Ready that only moved the commit index needs no fsync
    /// (the commit index is recovered from the log), only its turn.
    must_sync: bool,
}

struct PendingWrite {
    term: u64,
    token: Token,
    deadline_tick: u64,
}

struct PendingRead {
    token: Token,
    op: Op,
    deadline_tick: u64,
}

/// One shard's Raft replica.
pub struct Replica<L: LogStore = Wal> {
    raw: RawNode<RaftStorage<L>>,
    state_machine: StateMachine,
    options: ReplicaOptions,
    ticks: u64,
    /// Proposals of this loop turn, stepped into raft as one batch by
    /// `flush`; an `Err` is answered instead (not a write, too many pending).
    queued_proposals: Vec<(Token, Result<Bytes, response::Result>)>,
    /// Proposed entries by log index, waiting to be applied.
    pending_writes: BTreeMap<u64, PendingWrite>,
    /// Linearizable reads of this turn, waiting for one ReadIndex round.
    queued_reads: Vec<PendingRead>,
    /// Lease reads of this turn.
    queued_lease_reads: Vec<PendingRead>,
    /// ReadIndex rounds in flight, by request context.
    read_rounds: HashMap<u64, Vec<PendingRead>>,
    /// Reads whose read index is known, waiting for apply to reach it.
    reads_awaiting_apply: VecDeque<(u64, Vec<PendingRead>)>,
    next_read_ctx: u64,
    /// Readys handed to raft but not yet durable: their number and the
    /// messages that may leave only once they are.
    unpersisted: VecDeque<Unpersisted>,
    /// The newest Ready number the sync in flight covers.
    sync_in_flight: Option<u64>,
    /// Number of the newest Ready handled.
    last_ready_number: u64,
    /// A snapshot marker no sync covers yet. It gets a sync of its own, so
    /// an idle shard does not keep compactable segments until its next write.
    marker_unsynced: bool,
    role: StateRole,
    leader_id: u64,
    /// Applied since the last snapshot: entries and bytes.
    applied_since_snapshot: (u64, u64),
    snapshot_in_progress: bool,
    /// Verified snapshots from the leader, waiting for raft to install one
    /// (newest last, at most `MAX_RECEIVED_SNAPSHOTS`).
    received_snapshots: VecDeque<LoadedSnapshot>,
}

impl<L: LogStore> Replica<L> {
    /// Opens the replica over a recovered WAL. A WAL that has never held a
    /// configuration is a fresh replica: it is bootstrapped with the static
    /// voter set, durably, before raft starts.
    pub fn open(
        mut wal: L,
        options: ReplicaOptions,
        snapshot: Option<LoadedSnapshot>,
    ) -> Result<Replica<L>, ReplicaError> {
        let fail = |source| ReplicaError::Log {
            shard: options.shard,
            source,
        };
        let marker = wal.snapshot_marker();
        if let Some(loaded) = &snapshot {
            let meta = &loaded.meta;
            if marker.index < meta.index {
                // The snapshot became durable but the marker did not: record it now.
                wal.apply_snapshot_marker(SnapshotMarker {
                    index: meta.index,
                    term: meta.term,
                })
                .map_err(fail)?;
            }
            let mut hs = wal.hard_state();
            if hs.commit < meta.index {
                // A snapshot only covers committed entries.
                hs.commit = meta.index;
                wal.set_hard_state(hs).map_err(fail)?;
            }
            if wal.conf_state().is_none() {
                wal.set_conf_state(&corekv_wal::ConfState {
                    voters: meta.voters.clone(),
                    learners: meta.learners.clone(),
                })
                .map_err(fail)?;
            }
            wal.sync().map_err(fail)?;
        }
        let mut hs = wal.hard_state();
        if hs.commit > wal.last_index() {
            // Entries this node once held as committed are gone (a damaged
            // disk, a WAL cut by hand). The majority still has them and the
            // leader will send them again; raft-rs would refuse to start.
            tracing::error!(
                shard = options.shard,
                commit = hs.commit,
                last_index = wal.last_index(),
                "WAL lost committed entries; commit index lowered to the log's end, the leader will resend them"
            );
            hs.commit = wal.last_index();
            wal.set_hard_state(hs).map_err(fail)?;
            wal.sync().map_err(fail)?;
        }
        let covered = snapshot.as_ref().map_or(0, |s| s.meta.index);
        if marker.index > covered {
            return Err(ReplicaError::MissingSnapshot {
                shard: options.shard,
                location: wal.location().to_path_buf(),
                log_start: marker.index,
                covered,
            });
        }
        if wal.conf_state().is_none() {
            wal.set_conf_state(&corekv_wal::ConfState {
                voters: options.voters.clone(),
                learners: Vec::new(),
            })
            .map_err(fail)?;
            // Start-up, before the shard serves anything: a blocking sync here
            // delays no request.
            wal.sync().map_err(fail)?;
        }
        let applied = covered;
        let config = raft::Config {
            id: options.node_id,
            election_tick: options.election_ticks,
            heartbeat_tick: options.heartbeat_ticks,
            applied,
            max_size_per_msg: options.max_size_per_msg,
            max_inflight_msgs: options.max_inflight_msgs,
            check_quorum: true,
            pre_vote: true,
            read_only_option: ReadOnlyOption::Safe,
            // A commit-only append per commit costs a frame, a wakeup and a
            // Ready on every follower; followers learn the commit with the
            // next append or heartbeat instead (client answers come from the
            // leader and do not wait for it).
            skip_bcast_commit: true,
            ..Default::default()
        };
        let logger = crate::raft_log::logger(options.shard, options.node_id);
        let mut storage = RaftStorage::new(wal);
        let mut state_machine = StateMachine::new();
        if let Some(loaded) = snapshot {
            storage.set_latest_snapshot(loaded.meta.clone());
            state_machine.restore(loaded.meta.index, loaded.image);
        }
        let raw =
            RawNode::new(&config, storage, &logger).map_err(|source| ReplicaError::RaftStart {
                shard: options.shard,
                source,
            })?;
        Ok(Replica {
            raw,
            state_machine,
            options,
            ticks: 0,
            queued_proposals: Vec::new(),
            pending_writes: BTreeMap::new(),
            queued_reads: Vec::new(),
            queued_lease_reads: Vec::new(),
            read_rounds: HashMap::new(),
            reads_awaiting_apply: VecDeque::new(),
            next_read_ctx: 1,
            unpersisted: VecDeque::new(),
            sync_in_flight: None,
            last_ready_number: 0,
            marker_unsynced: false,
            role: StateRole::Follower,
            leader_id: 0,
            applied_since_snapshot: (0, 0),
            snapshot_in_progress: false,
            received_snapshots: VecDeque::new(),
        })
    }

    /// This replica's shard.
    pub fn shard(&self) -> u32 {
        self.options.shard
    }

    /// The leader this replica knows of (0 = none).
    pub fn leader_id(&self) -> u64 {
        self.raw.raft.leader_id
    }

    /// True while this replica leads its group.
    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    /// The state machine (stale reads, tests).
    pub fn state_machine(&self) -> &StateMachine {
        &self.state_machine
    }

    /// Advances raft's clock by one tick and expires requests past their
    /// deadline.
    pub fn tick(&mut self, out: &mut Output<L::SyncJob>) {
        self.raw.tick();
        self.ticks += 1;
        self.expire(out);
    }

    /// Feeds a message from a peer. Malformed or stale messages are dropped
    /// by raft; they never stop the replica.
    pub fn step(&mut self, mut message: Message) {
        // A leader sends heartbeats with the commit index it believes we
        // hold. After this node lost entries it had acknowledged (a damaged
        // disk), that is past our log's end and raft-rs would abort; clamp it,
        // and the next append's rejection makes the leader resend what is
        // missing.
        if message.get_msg_type() == MessageType::MsgHeartbeat {
            let last = self.raw.raft.raft_log.last_index();
            if message.commit > last {
                tracing::warn!(
                    shard = self.options.shard,
                    leader_commit = message.commit,
                    last_index = last,
                    "heartbeat commit beyond our log: entries were lost locally"
                );
                message.commit = last;
            }
        }
        if let Err(e) = self.raw.step(message) {
            tracing::debug!(shard = self.options.shard, error = %e, "raft message dropped");
        }
    }

    /// Tells raft a peer could not be reached, so it stops pipelining to it.
    pub fn report_unreachable(&mut self, peer: u64) {
        self.raw.report_unreachable(peer);
    }

    /// Our link to `peer` came back after being down: the peer may have
    /// restarted with fewer entries than it once acknowledged (a damaged
    /// disk). The leader forgets what it believed the peer holds and probes
    /// from where it was, so a rejection walks it back to the peer's real log
    /// end even on an idle shard. Forgetting only delays counting the peer
    /// towards a commit until its next ack; it never commits anything early.
    pub fn peer_reconnected(&mut self, peer: u64) {
        if !self.is_leader() {
            return;
        }
        if let Some(progress) = self.raw.raft.mut_prs().get_mut(peer) {
            progress.become_probe();
            progress.matched = 0;
        }
    }

    /// Starts a transfer of leadership to `peer`.
    pub fn transfer_leader(&mut self, peer: u64) {
        self.raw.transfer_leader(peer);
    }

    /// True if `id` is a voter of this group.
    pub fn is_voter(&self, id: u64) -> bool {
        self.raw.raft.prs().conf().voters().contains(id)
    }

    /// True if `peer` holds every entry of this leader's log and is active.
    pub fn is_caught_up(&self, peer: u64) -> bool {
        let last = self.raw.raft.raft_log.last_index();
        self.raw
            .raft
            .prs()
            .get(peer)
            .is_some_and(|p| p.matched == last && p.recent_active)
    }

    /// The most caught-up other voter (by matched index), the natural
    /// successor when this leader steps away.
    pub fn best_successor(&self) -> Option<u64> {
        let me = self.options.node_id;
        self.raw
            .raft
            .prs()
            .iter()
            .filter(|(id, _)| **id != me && self.is_voter(**id))
            .max_by_key(|(id, progress)| (progress.matched, std::cmp::Reverse(**id)))
            .map(|(id, _)| *id)
    }

    /// Queues a write; it enters raft with every other write of this turn
    /// at the next [`Replica::flush`].
    pub fn propose(&mut self, token: Token, op: Op, tag: SessionTag) -> Result<(), NotLeader> {
        if !self.is_leader() {
            return Err(NotLeader {
                leader_id: self.leader_id(),
            });
        }
        let entry = if self.pending_requests() >= MAX_PENDING_REQUESTS {
            Err(self.too_many_pending())
        } else {
            crate::command::encode(&op, tag)
                .ok_or_else(|| state_machine::error(ErrorCode::InvalidArgument, "not a write"))
        };
        self.queued_proposals.push((token, entry));
        Ok(())
    }

    /// Serves a read: STALE at once from the local state machine; otherwise
    /// it waits for this turn's ReadIndex round (or lease check).
    pub fn read(
        &mut self,
        token: Token,
        op: Op,
        consistency: corekv_proto::client::Consistency,
        out: &mut Output<L::SyncJob>,
    ) -> Result<(), NotLeader> {
        use corekv_proto::client::Consistency;
        if consistency == Consistency::Stale {
            let result = self.serve_read(&op);
            out.replies.push(Reply { token, result });
            return Ok(());
        }
        if !self.is_leader() {
            return Err(NotLeader {
                leader_id: self.leader_id(),
            });
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
        if consistency == Consistency::Lease {
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

    fn flush_reads(&mut self) {
        // raft-rs silently drops a ReadIndex on a leader that has not yet
        // committed an entry of its term; keep those reads queued until it has.
        if !self.is_leader() || !self.raw.raft.commit_to_current_term() {
            return;
        }
        if !self.queued_reads.is_empty() {
            let reads = std::mem::take(&mut self.queued_reads);
            self.start_read_round(reads, ReadOnlyOption::Safe);
        }
        if !self.queued_lease_reads.is_empty() {
            let reads = std::mem::take(&mut self.queued_lease_reads);
            self.start_read_round(reads, ReadOnlyOption::LeaseBased);
        }
    }

    fn start_read_round(&mut self, reads: Vec<PendingRead>, option: ReadOnlyOption) {
        let ctx = self.next_read_ctx;
        self.next_read_ctx += 1;
        self.read_rounds.insert(ctx, reads);
        // The read-only option is a raft-wide setting; switching it for one
        // round is how a lease read is asked of raft-rs per request.
        self.raw.raft.read_only.option = option;
        self.raw.read_index(ctx.to_be_bytes().to_vec());
        self.raw.raft.read_only.option = ReadOnlyOption::Safe;
    }

    /// Handles every Ready raft has, in raft-rs's order: send messages, apply
    /// committed entries, append to the WAL, queue the persisted messages
    /// behind a sync. Starts a sync if none is in flight.
    pub fn handle_ready(&mut self, out: &mut Output<L::SyncJob>) -> Result<(), ReplicaError> {
        while self.raw.has_ready() {
            let mut ready = self.raw.ready();
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
            let store = self.raw.mut_store();
            store.append(ready.entries()).map_err(|e| self.fatal(e))?;
            if let Some(hs) = ready.hs() {
                let store = self.raw.mut_store();
                store.set_hard_state(hs).map_err(|e| self.fatal(e))?;
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
            self.last_ready_number = ready.number();
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
        if self.raw.has_ready() {
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
        self.raw
            .mut_store()
            .wal_mut()
            .finish_sync(outcome)
            .map_err(|e| self.fatal(e))?;
        let covered = self
            .sync_in_flight
            .take()
            .expect("on_synced called without a sync in flight");
        self.persisted_through(covered, out);
        self.handle_ready(out)
    }

    /// Stashes a verified snapshot received from the leader; raft installs
    /// it when it steps the MsgSnapshot that came with it. Two transfers may
    /// finish in one turn, so the newest few are kept until raft picks one.
    pub fn receive_snapshot(&mut self, snapshot: LoadedSnapshot, message: Message) {
        let metadata = message.get_snapshot().get_metadata();
        if message.get_msg_type() != MessageType::MsgSnapshot
            || (metadata.index, metadata.term) != (snapshot.meta.index, snapshot.meta.term)
        {
            tracing::warn!(
                shard = self.options.shard,
                index = snapshot.meta.index,
                "snapshot dropped: its raft message describes another snapshot"
            );
            return;
        }
        let key = (snapshot.meta.index, snapshot.meta.term);
        self.received_snapshots
            .retain(|s| (s.meta.index, s.meta.term) != key);
        self.received_snapshots.push_back(snapshot);
        while self.received_snapshots.len() > MAX_RECEIVED_SNAPSHOTS {
            self.received_snapshots.pop_front();
        }
        self.step(message);
    }

    fn install_snapshot(
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
        self.received_snapshots
            .retain(|r| r.meta.index > metadata.index);
        let marker = SnapshotMarker {
            index: metadata.index,
            term: metadata.term,
        };
        let result = self.raw.mut_store().wal_mut().apply_snapshot_marker(marker);
        result.map_err(|e| self.fatal(e))?;
        let store = self.raw.mut_store();
        let result = store.set_conf_state(metadata.get_conf_state());
        store.set_latest_snapshot(received.meta.clone());
        result.map_err(|e| self.fatal(e))?;
        self.state_machine.restore(metadata.index, received.image);
        self.applied_since_snapshot = (0, 0);
        out.snapshot_installed = Some(received.meta);
        Ok(())
    }

    fn maybe_snapshot(&mut self, out: &mut Output<L::SyncJob>) {
        let wanted = self.raw.store().take_snapshot_wanted();
        let (entries, bytes) = self.applied_since_snapshot;
        let due = entries >= self.options.snapshot_entries || bytes >= self.options.snapshot_bytes;
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
        let conf = self.raw.raft.prs().conf().to_conf_state();
        let meta = SnapshotMeta {
            shard: self.options.shard,
            index,
            term,
            voters: conf.voters.clone(),
            learners: conf.learners.clone(),
        };
        self.snapshot_in_progress = true;
        self.applied_since_snapshot = (0, 0);
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
        let marker = SnapshotMarker {
            index: meta.index,
            term: meta.term,
        };
        let result = self.raw.mut_store().wal_mut().apply_snapshot_marker(marker);
        result.map_err(|e| self.fatal(e))?;
        self.raw.mut_store().set_latest_snapshot(meta);
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

    /// Fails every pending request: the node is stopping.
    pub fn shutdown(&mut self, out: &mut Output<L::SyncJob>) {
        self.fail_all_pending(out, "node is shutting down");
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
        let mut newest = self.unpersisted.back().map(|u| u.number);
        if !self.unpersisted.iter().any(|u| u.must_sync) {
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
                self.sync_in_flight = Some(newest.unwrap_or(self.last_ready_number));
                out.sync = Some(job);
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
        self.report_applied();
        while let Some(front) = self.unpersisted.front() {
            if front.number > number {
                break;
            }
            let done = self.unpersisted.pop_front().expect("front exists");
            out.messages.extend(done.messages);
        }
    }

    fn fatal(&self, source: WalError) -> ReplicaError {
        ReplicaError::Log {
            shard: self.options.shard,
            source,
        }
    }

    fn on_role(&mut self, role: StateRole, leader_id: u64, out: &mut Output<L::SyncJob>) {
        let was_leader = self.role == StateRole::Leader;
        self.role = role;
        self.leader_id = leader_id;
        out.role_changes.push(RoleChange {
            role,
            term: self.raw.raft.term,
            leader_id,
        });
        if was_leader && role != StateRole::Leader {
            self.fail_all_pending(out, "leadership changed while the request was pending");
        }
    }

    fn fail_all_pending(&mut self, out: &mut Output<L::SyncJob>, why: &str) {
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
            .chain(self.read_rounds.drain().flat_map(|(_, r)| r))
            .chain(self.reads_awaiting_apply.drain(..).flat_map(|(_, r)| r));
        for read in reads {
            out.replies.push(Reply {
                token: read.token,
                result: result(),
            });
        }
    }

    fn on_read_state(&mut self, index: u64, ctx: &[u8]) {
        let Ok(ctx) = <[u8; 8]>::try_from(ctx) else {
            return;
        };
        if let Some(reads) = self.read_rounds.remove(&u64::from_be_bytes(ctx)) {
            self.reads_awaiting_apply.push_back((index, reads));
        }
    }

    fn serve_applied_reads(&mut self, out: &mut Output<L::SyncJob>) {
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
                    self.applied_since_snapshot.0 += 1;
                    self.applied_since_snapshot.1 += entry.data.len() as u64;
                    let result = self.state_machine.apply(index, &entry.data);
                    self.answer_write(index, entry.term, result, out);
                }
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    self.state_machine.skip(index);
                    self.apply_conf_change(&entry)?;
                }
            }
        }
        Ok(())
    }

    fn answer_write(
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

    fn apply_conf_change(&mut self, entry: &Entry) -> Result<(), ReplicaError> {
        let conf_state: ConfState = if entry.get_entry_type() == EntryType::EntryConfChangeV2 {
            let mut change = ConfChangeV2::default();
            if change.merge_from_bytes(&entry.data).is_err() {
                return Ok(());
            }
            match self.raw.apply_conf_change(&change) {
                Ok(cs) => cs,
                Err(_) => return Ok(()),
            }
        } else {
            let mut change = ConfChange::default();
            if change.merge_from_bytes(&entry.data).is_err() {
                return Ok(());
            }
            match self.raw.apply_conf_change(&change) {
                Ok(cs) => cs,
                Err(_) => return Ok(()),
            }
        };
        self.raw
            .mut_store()
            .set_conf_state(&conf_state)
            .map_err(|e| self.fatal(e))
    }

    fn expire(&mut self, out: &mut Output<L::SyncJob>) {
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

    /// The WAL (segment count, bytes written).
    pub fn wal(&self) -> &L {
        self.raw.store().wal()
    }

    /// Raft status of this replica, as the client protocol reports it.
    pub fn status(&self) -> ShardStatus {
        let raft = &self.raw.raft;
        let role = role_of(raft.state);
        ShardStatus {
            shard: self.options.shard,
            role: role as i32,
            term: raft.term,
            leader_id: raft.leader_id,
            commit_index: raft.raft_log.committed,
            applied_index: self.state_machine.applied_index(),
            last_index: self.raw.store().last_index().unwrap_or(0),
        }
    }
}

/// raft-rs's role as the client protocol names it.
pub fn role_of(role: StateRole) -> Role {
    match role {
        StateRole::Follower => Role::Follower,
        StateRole::Candidate => Role::Candidate,
        StateRole::Leader => Role::Leader,
        StateRole::PreCandidate => Role::PreCandidate,
    }
}

fn superseded() -> response::Result {
    state_machine::error(
        ErrorCode::Unavailable,
        "the proposal was replaced by another leader's entry; it was not applied",
    )
}

#[cfg(test)]
mod tests;
