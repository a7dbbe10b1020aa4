//! The sans-IO replica of one shard: raft-rs `RawNode` over the WAL, the
//! state machine, and the bookkeeping of pending proposals and reads.
//!
//! It takes inputs (tick, peer message, proposal, read, "sync finished") and
//! fills an [`Output`] (messages to send, a WAL sync to run, replies). It
//! never touches a socket, a clock or a thread: time is counted in ticks,
//! and the WAL sync is handed out as a job for the shell to run. That is what
//! lets a test drive three replicas in one thread.

mod backlog;
mod members;
mod ready;
mod requests;
mod snapshots;

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;
use corekv_proto::client::{response, Role, ShardStatus};
use corekv_proto::log::{Member, Membership};
use corekv_wal::{SnapshotMarker, SyncJob, Wal, WalError};
use raft::prelude::{Message, MessageType};
use raft::{RawNode, ReadOnlyOption, StateRole, Storage as _};

use crate::log_store::LogStore;
use crate::membership;
use crate::progress::{Progress, Unit};
use crate::snapshot::SnapshotMeta;
use crate::state_machine::{Image, StateMachine};
use crate::storage::RaftStorage;

use backlog::Backlog;
pub use backlog::MAX_LOG_BACKLOG_BYTES;
use ready::Unpersisted;
pub use requests::READ_CONTEXT_BYTES;
use requests::{PendingRead, PendingWrite};

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
    /// The voters (with their addresses) a new cluster's log starts with;
    /// empty for a node that joins an existing cluster (it waits to be
    /// added). Only read when the log store holds no configuration yet.
    pub bootstrap: Vec<Member>,
    /// Ticks between leader heartbeats.
    pub heartbeat_ticks: usize,
    /// Ticks without a leader before an election (randomised by raft-rs in
    /// `[election_ticks, max_election_ticks)`).
    pub election_ticks: usize,
    /// Upper bound (exclusive) of the randomised election timeout; 0 means
    /// raft-rs's default, `2 * election_ticks`. raft-rs draws the timeout
    /// from the thread's RNG, so a deterministic simulation sets
    /// `election_ticks + 1` and picks `election_ticks` from its own seed.
    pub max_election_ticks: usize,
    /// A pending request older than this many ticks is answered TIMEOUT.
    pub request_timeout_ticks: u64,
    /// A peer heard from within this many ticks counts as live when a
    /// membership change is judged (see `is_live`).
    pub liveness_ticks: u64,
    /// Upper bound on the bytes of entries in one append message.
    pub max_size_per_msg: u64,
    /// Upper bound on append messages in flight to one follower.
    pub max_inflight_msgs: usize,
    /// Snapshot once this many entries were applied since the last one.
    pub snapshot_entries: u64,
    /// ... or once this many bytes of entries were applied.
    pub snapshot_bytes: u64,
    /// ... and in both cases at least this percentage of the state's keys
    /// (or accounted bytes) at the last snapshot, so that the bytes written
    /// for snapshots stay a bounded share of the log, whatever the size.
    pub snapshot_log_percent: u64,
    /// Accounted bytes the state machine may grow to; past it growing
    /// writes are refused with RESOURCE_EXHAUSTED (0 = no limit).
    pub max_state_bytes: u64,
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
    /// States an installed snapshot replaced: to be dropped off the shard
    /// thread (freeing a large map takes long).
    pub retired_states: Vec<Image>,
    /// The group's membership changed (see [`Replica::membership`]): links
    /// to new members must exist before this step's messages go out.
    pub membership_changed: bool,
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
            retired_states: Vec::new(),
            membership_changed: false,
        }
    }
}

/// Why the replica cannot take a request itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotLeader {
    /// The leader this replica knows of, 0 if none.
    pub leader_id: u64,
}

/// A request the replica did not take, given back so the shard can forward
/// it without having kept a copy.
#[derive(Debug)]
pub struct Refused {
    /// Why.
    pub not_leader: NotLeader,
    /// The operation, untouched.
    pub op: corekv_proto::client::request::Op,
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
    read_rounds: BTreeMap<u64, Vec<PendingRead>>,
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
    /// Committed bytes this turn may still apply (see [`Replica::begin_turn`]);
    /// unlimited until a shard loop starts counting turns.
    apply_budget: u64,
    /// A snapshot marker no sync covers yet. It gets a sync of its own, so
    /// an idle shard does not keep compactable segments until its next write.
    marker_unsynced: bool,
    /// The newest durable snapshot (own or installed): when the next own one
    /// is written, the log is compacted up to this one, not the new one. So
    /// the log keeps about one snapshot interval of entries: a follower that
    /// was away for less than that catches up from the log instead of being
    /// sent the whole state, and a newest snapshot that turns out unreadable
    /// at restart can fall back to the one before, with the log after it.
    compact_to: Option<SnapshotMarker>,
    role: StateRole,
    leader_id: u64,
    /// Applied since the last snapshot: entries and bytes.
    applied_since_snapshot: (u64, u64),
    /// The state machine's keys and accounted bytes at the last snapshot
    /// (taken, installed or restored), which the snapshot rule scales with.
    snapshot_base: (u64, u64),
    snapshot_in_progress: bool,
    /// Verified snapshots from the leader, waiting for raft to install one
    /// (newest last, at most `MAX_RECEIVED_SNAPSHOTS`).
    received_snapshots: VecDeque<LoadedSnapshot>,
    /// Writes the log store could not take yet (it cannot grow).
    backlog: Backlog,
    /// The Ready that installed a snapshot from the leader, until it is
    /// persisted. raft-rs forgets the snapshot is pending when the Ready is
    /// advanced but keeps its applied index until it is persisted; a
    /// campaign in between reads the entries after that applied index,
    /// which the snapshot compacted away, and raft-rs aborts. So the
    /// replica neither ticks raft nor takes MsgTimeoutNow meanwhile (the
    /// window is one sync; found by the simulator, seed 21394).
    installing_snapshot: Option<u64>,
    /// (term, index): the highest log index a leader of `term` has shown
    /// us, in an append (its previous index plus its entries) or a
    /// snapshot. How far behind the leader this replica is, which raft's
    /// commit index does not say (a leader tells a follower only the commit
    /// index that follower already matches).
    leader_seen: (u64, u64),
    /// The committed log replayed into the state machine after a restart,
    /// while it lasts (for progress lines).
    replay: Option<Replay>,
    /// Until this tick lease reads are served as linearizable ones (see
    /// `suspect_lease`).
    lease_suspect_until: u64,
    /// The group's members and their addresses, as applied.
    membership: Membership,
    /// The log index `membership` was applied at.
    membership_index: u64,
    /// This node was a member and was removed: it serves nothing more.
    removed: bool,
    /// The tick each peer's last message arrived at (see `is_live`).
    last_heard: std::collections::HashMap<u64, u64>,
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
            // The log may start before the snapshot (it is compacted only up
            // to the snapshot before, see `compact_to`). Only a snapshot the
            // log does not lead up to (one received from the leader whose
            // marker did not become durable) needs its marker recorded now.
            if marker.index < meta.index && wal.term(meta.index) != Some(meta.term) {
                let marker = SnapshotMarker {
                    index: meta.index,
                    term: meta.term,
                };
                at_start(&mut wal, |w| w.apply_snapshot_marker(marker)).map_err(fail)?;
            }
            let mut hs = wal.hard_state();
            if hs.commit < meta.index {
                // A snapshot only covers committed entries.
                hs.commit = meta.index;
                at_start(&mut wal, |w| w.set_hard_state(hs)).map_err(fail)?;
            }
            if wal.conf_state().is_none() {
                let conf_state = corekv_wal::ConfState {
                    voters: meta.membership.voters.clone(),
                    learners: meta.membership.learners.clone(),
                };
                at_start(&mut wal, |w| w.set_conf_state(&conf_state)).map_err(fail)?;
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
            at_start(&mut wal, |w| w.set_hard_state(hs)).map_err(fail)?;
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
            bootstrap(&mut wal, &options.bootstrap).map_err(fail)?;
        }
        let applied = covered;
        let config = raft::Config {
            id: options.node_id,
            election_tick: options.election_ticks,
            max_election_tick: options.max_election_ticks,
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
            // A restart hands over up to a snapshot's worth of committed log
            // (a gigabyte at size) to apply: in Readys of this size, not one
            // copy of all of it at once.
            max_committed_size_per_ready: MAX_COMMITTED_BYTES_PER_READY,
            ..Default::default()
        };
        let logger = crate::raft_log::logger(options.shard, options.node_id);
        let mut storage = RaftStorage::new(wal);
        let mut state_machine = StateMachine::new();
        let membership = snapshot
            .as_ref()
            .map(|s| s.meta.membership.clone())
            .unwrap_or_default();
        let compact_to = snapshot.as_ref().map(|s| SnapshotMarker {
            index: s.meta.index,
            term: s.meta.term,
        });
        if let Some(loaded) = snapshot {
            storage.set_latest_snapshot(loaded.meta.clone());
            // Replaces the new, empty state: nothing to free.
            let _empty = state_machine.restore(loaded.meta.index, loaded.image);
        }
        let snapshot_base = (state_machine.len() as u64, state_machine.bytes());
        let raw =
            RawNode::new(&config, storage, &logger).map_err(|source| ReplicaError::RaftStart {
                shard: options.shard,
                source,
            })?;
        let mut membership = membership;
        if membership::ids(&membership).next().is_none() {
            // A log started before configurations carried addresses (no
            // bootstrap entries): its configuration is raft's starting one,
            // the addresses are the config's `peers`.
            let conf = raw.raft.prs().conf().to_conf_state();
            membership::apply(&mut membership, &conf, &Default::default());
        }
        let committed = raw.raft.raft_log.committed;
        let replay = (committed > applied).then(|| Replay {
            from: applied,
            to: committed,
            progress: Progress::new(
                options.shard,
                "replaying log",
                Unit::Entries,
                committed - applied,
            ),
        });
        Ok(Replica {
            membership_index: covered,
            membership,
            removed: false,
            last_heard: Default::default(),
            replay,
            raw,
            state_machine,
            options,
            ticks: 0,
            queued_proposals: Vec::new(),
            pending_writes: BTreeMap::new(),
            queued_reads: Vec::new(),
            queued_lease_reads: Vec::new(),
            read_rounds: BTreeMap::new(),
            reads_awaiting_apply: VecDeque::new(),
            next_read_ctx: 1,
            unpersisted: VecDeque::new(),
            sync_in_flight: None,
            last_ready_number: 0,
            apply_budget: u64::MAX,
            marker_unsynced: false,
            compact_to,
            role: StateRole::Follower,
            leader_id: 0,
            applied_since_snapshot: (0, 0),
            snapshot_base,
            snapshot_in_progress: false,
            received_snapshots: VecDeque::new(),
            backlog: Backlog::default(),
            installing_snapshot: None,
            leader_seen: (0, 0),
            lease_suspect_until: 0,
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
        if self.installing_snapshot.is_none() && !self.removed {
            self.raw.tick();
        }
        self.ticks += 1;
        self.state_machine.tick();
        self.expire(out);
        self.step_down_if_disk_full();
    }

    /// Feeds a message from a peer. Malformed or stale messages are dropped
    /// by raft; they never stop the replica.
    pub fn step(&mut self, mut message: Message) {
        self.last_heard.insert(message.from, self.ticks);
        self.note_leader_index(&message);
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
        if self.installing_snapshot.is_some()
            && message.get_msg_type() == MessageType::MsgTimeoutNow
        {
            // See `installing_snapshot`; the leader tries the transfer again.
            return;
        }
        if self.refuses_append(&message) {
            tracing::debug!(
                shard = self.options.shard,
                "append dropped: the log cannot take more while the disk is full"
            );
            return;
        }
        if let Err(e) = self.raw.step(message) {
            tracing::debug!(shard = self.options.shard, error = %e, "raft message dropped");
        }
    }

    fn note_leader_index(&mut self, message: &Message) {
        let index = match message.get_msg_type() {
            MessageType::MsgAppend => message.index + message.entries.len() as u64,
            MessageType::MsgSnapshot => message.get_snapshot().get_metadata().index,
            // What the leader believes we hold, which after a wipe is more
            // than we do (see the clamp in `step`).
            MessageType::MsgHeartbeat => message.commit,
            _ => return,
        };
        let (term, seen) = self.leader_seen;
        if message.term > term {
            self.leader_seen = (message.term, index);
        } else if message.term == term && index > seen {
            self.leader_seen.1 = index;
        }
    }

    /// See `ShardStatus::leader_last_index`.
    fn leader_last_index(&self) -> u64 {
        let raft = &self.raw.raft;
        if raft.state == StateRole::Leader {
            raft.raft_log.last_index()
        } else if self.leader_seen.0 == raft.term {
            self.leader_seen.1
        } else {
            0
        }
    }

    /// Tells raft a peer could not be reached, so it stops pipelining to it.
    pub fn report_unreachable(&mut self, peer: u64) {
        self.raw.report_unreachable(peer);
    }

    /// Our link to `peer` came back after being down: the peer may have
    /// restarted with fewer entries than it once acknowledged (a damaged
    /// disk). The leader forgets what it believed the peer holds and probes
    /// from the log's end, so a rejection walks it back to the peer's real
    /// log end even on an idle shard. Forgetting only delays counting the peer
    /// towards a commit until its next ack; it never commits anything early.
    pub fn peer_reconnected(&mut self, peer: u64) {
        if !self.is_leader() {
            return;
        }
        let last = self.raw.raft.raft_log.last_index();
        if let Some(progress) = self.raw.raft.mut_prs().get_mut(peer) {
            progress.become_probe();
            progress.matched = 0;
            // From the log's end, as a new leader probes: the peer's
            // rejection names its last index and the leader jumps there.
            // become_probe alone restarts from matched + 1, which is 1 when
            // this leader never heard from the peer (it restarted before the
            // election, or the link flapped twice): an index compacted long
            // ago, so raft sent a whole snapshot to a follower that had all
            // but the last seconds of the log (measured at 1 GB).
            progress.next_idx = last + 1;
        }
    }

    /// Starts a transfer of leadership to `peer`.
    pub fn transfer_leader(&mut self, peer: u64) {
        self.suspect_lease();
        self.raw.transfer_leader(peer);
    }

    /// A leader that starts a transfer can no longer trust its lease: the
    /// peer it names campaigns at once and the voters grant it even though
    /// they heard from this leader within the election timeout, so a new
    /// leader may take writes while this one still believes its lease
    /// holds (cut off, it learns nothing until check-quorum steps it down,
    /// up to two election timeouts later). Lease reads meanwhile go through
    /// a ReadIndex round. Found by the simulator, seed 6707.
    fn suspect_lease(&mut self) {
        self.lease_suspect_until = self.ticks + 2 * self.options.election_ticks as u64 + 1;
    }

    /// True if `id` is a voter of this group.
    pub fn is_voter(&self, id: u64) -> bool {
        self.raw.raft.prs().conf().voters().contains(id)
    }

    /// Starts a loop turn's budget of committed entries to apply: a backlog
    /// (after a slow sync, a restart's replay, a catch-up) is applied at
    /// most two Readys of [`MAX_COMMITTED_BYTES_PER_READY`] per turn (the
    /// second starts before the budget is spent), so that the
    /// acknowledgements, heartbeats and answers of each turn leave between
    /// them instead of after all of it. Measured at 1 GB (BIG): a follower
    /// applied a slow sync's 6-7 MB in one 110-134 ms turn and its
    /// acknowledgement waited for all of it.
    pub fn begin_turn(&mut self) {
        self.apply_budget = MAX_COMMITTED_BYTES_PER_READY;
    }

    /// True when raft has work the last turn's budget left for the next.
    pub fn has_ready(&self) -> bool {
        self.raw.has_ready()
    }

    /// True if `peer` is active, is being replicated to (not probed, not
    /// sent a snapshot) and holds every committed entry: close enough that a
    /// leadership transfer to it finishes within a round trip (raft-rs
    /// sends it what it lacks and hands over once it holds the whole log).
    /// Not "holds the whole log": under a steady pipelined load the leader
    /// appends every turn, so a follower's last match trails the log's end
    /// nearly always, and a transfer that waited for them to meet came at
    /// a random moment: 14 s and 34 s after the first election in two BIG
    /// runs, the second inside the measured window.
    pub fn is_caught_up(&self, peer: u64) -> bool {
        let committed = self.raw.raft.raft_log.committed;
        self.raw.raft.prs().get(peer).is_some_and(|p| {
            p.recent_active && p.state == raft::ProgressState::Replicate && p.matched >= committed
        })
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

    fn fatal(&self, source: WalError) -> ReplicaError {
        ReplicaError::Log {
            shard: self.options.shard,
            source,
        }
    }

    /// The WAL (segment count, bytes written).
    pub fn wal(&self) -> &L {
        self.raw.store().wal()
    }

    /// The term and data of the log entry at `index` as raft sees it
    /// (`None` once compacted or past the end): the simulator compares
    /// committed entries across replicas with it.
    #[cfg(test)]
    pub(crate) fn log_entry(&self, index: u64) -> Option<(u64, Bytes)> {
        let context = raft::GetEntriesContext::empty(false);
        let entries = self
            .raw
            .raft
            .raft_log
            .slice(index, index + 1, None, context)
            .ok()?;
        entries.first().map(|e| (e.term, e.data.clone()))
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
            disk_full: self.disk_full().unwrap_or_default().to_string(),
            state_machine_bytes: self.state_machine.bytes(),
            state_machine_keys: self.state_machine.len() as u64,
            leader_last_index: self.leader_last_index(),
            // The shell adds it when it changes (cloned every turn, it
            // would cost allocations on the hot path).
            membership: None,
            removed: self.removed,
        }
    }
}

/// Committed entries to apply after a restart, from the snapshot (or the
/// log's start) to the commit index the log holds.
struct Replay {
    from: u64,
    to: u64,
    progress: Progress,
}

/// Bytes of committed entries raft hands over in one Ready, and what one
/// loop turn applies before it lets the loop send what it has (see
/// [`Replica::begin_turn`]).
pub const MAX_COMMITTED_BYTES_PER_READY: u64 = 1 << 20;

/// Starts the log of a new replica from an empty configuration (which also
/// marks the log as started). A node of a new cluster then writes the
/// bootstrap entries (the same on every node, see
/// [`membership::bootstrap_entries`]) as committed: applying them, as
/// every later replica applies them from the log, makes the initial voters
/// the configuration. A joining node writes nothing more and waits for the
/// leader to add it. Either way every replica of the group goes through the
/// same configurations at the same indexes.
fn bootstrap<L: LogStore>(wal: &mut L, voters: &[Member]) -> Result<(), WalError> {
    at_start(wal, |w| w.set_conf_state(&corekv_wal::ConfState::default()))?;
    let entries = membership::bootstrap_entries(voters);
    if let Some(last) = entries.last() {
        let refs: Vec<corekv_wal::EntryRef<'_>> = entries
            .iter()
            .map(|e| corekv_wal::EntryRef {
                index: e.index,
                term: e.term,
                entry_type: e.get_entry_type() as u8,
                data: &e.data,
            })
            .collect();
        at_start(wal, |w| w.append_entries(&refs))?;
        let hard_state = corekv_wal::HardState {
            term: last.term,
            vote: 0,
            commit: last.index,
        };
        at_start(wal, |w| w.set_hard_state(hard_state))?;
    }
    // Start-up, before the shard serves anything: a blocking sync here
    // delays no request.
    wal.sync()
}

/// A write at start-up, before the shard serves anything: it may wait for
/// the WAL's next segment instead of being refused for it. A full disk is
/// still an error here (the shard cannot start without these records).
fn at_start<L: LogStore>(
    wal: &mut L,
    mut write: impl FnMut(&mut L) -> Result<(), WalError>,
) -> Result<(), WalError> {
    match write(wal) {
        Err(WalError::SegmentNotReady { .. }) => {
            wal.wait_for_next_segment();
            write(wal)
        }
        other => other,
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

#[cfg(test)]
mod tests;
