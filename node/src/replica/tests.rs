//! Replica tests: single-voter and three-replica groups driven by hand, on
//! the real WAL (temp dirs) and on the in-memory log store.

use super::*;
use crate::sessions::SessionTag;
use corekv_proto::client::{request::Op, Consistency, ErrorCode, Get, Put};
use corekv_wal::WalOptions;

/// Three replicas in one thread: a simulated network (a queue of
/// messages) and a disk whose syncs complete when the test says so. On the
/// real WAL (temp dirs) by default, or on in-memory stores.
struct Sim<L: LogStore = Wal> {
    replicas: Vec<Option<Replica<L>>>,
    _dirs: Vec<tempfile::TempDir>,
    network: Vec<Message>,
    pending_syncs: Vec<(usize, L::SyncJob)>,
    replies: Vec<(usize, Reply)>,
    /// Nodes cut off from everyone (messages to and from them are lost).
    isolated: Vec<u64>,
    /// Replicas (by index) whose syncs do not finish for now.
    stalled: Vec<usize>,
}

/// Runs a log store's sync job at once, in the test's thread.
trait RunNow<O> {
    fn run_now(self) -> O;
}

impl RunNow<corekv_wal::SyncOutcome> for SyncJob {
    fn run_now(self) -> corekv_wal::SyncOutcome {
        self.run_blocking()
    }
}

impl RunNow<crate::log_store::memory::MemSyncOutcome> for crate::log_store::memory::MemSyncJob {
    fn run_now(self) -> crate::log_store::memory::MemSyncOutcome {
        self.run()
    }
}

fn options(id: u64) -> ReplicaOptions {
    ReplicaOptions {
        node_id: id,
        shard: 0,
        bootstrap: crate::membership::loopback_members([1, 2, 3]),
        heartbeat_ticks: 3,
        election_ticks: 30,
        max_election_ticks: 0,
        request_timeout_ticks: 500,
        liveness_ticks: 30,
        max_size_per_msg: 1 << 20,
        max_inflight_msgs: 256,
        snapshot_entries: 1_000_000,
        snapshot_bytes: 1 << 30,
        snapshot_log_percent: 100,
        max_state_bytes: 0,
    }
}

impl Sim {
    fn new() -> Sim {
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let wals = dirs
            .iter()
            .map(|dir| Wal::open(dir.path(), WalOptions::default()).unwrap())
            .collect();
        Sim::over(wals, dirs)
    }
}

impl Sim<crate::log_store::memory::MemLogStore> {
    /// Three replicas over in-memory stores on these disks.
    fn in_memory(disks: &[crate::log_store::memory::MemDisk]) -> Self {
        Sim::over(disks.iter().map(|d| d.open()).collect(), Vec::new())
    }
}

impl<L: LogStore> Sim<L>
where
    L::SyncJob: RunNow<L::SyncOutcome>,
{
    fn over(stores: Vec<L>, dirs: Vec<tempfile::TempDir>) -> Self {
        let replicas = stores
            .into_iter()
            .enumerate()
            .map(|(i, store)| Some(Replica::open(store, options(i as u64 + 1), None).unwrap()))
            .collect();
        Sim {
            replicas,
            _dirs: dirs,
            network: Vec::new(),
            pending_syncs: Vec::new(),
            replies: Vec::new(),
            isolated: Vec::new(),
            stalled: Vec::new(),
        }
    }

    fn absorb(&mut self, i: usize, out: Output<L::SyncJob>) {
        self.network.extend(out.messages);
        if let Some(job) = out.sync {
            self.pending_syncs.push((i, job));
        }
        self.replies.extend(out.replies.into_iter().map(|r| (i, r)));
    }

    /// One round: every replica flushes and handles its ready; every
    /// sync completes; every message is delivered.
    fn round(&mut self) {
        for i in 0..3 {
            if let Some(replica) = self.replicas[i].as_mut() {
                let mut out = Output::default();
                replica.flush(&mut out);
                replica.handle_ready(&mut out).unwrap();
                self.absorb(i, out);
            }
        }
        for (i, job) in std::mem::take(&mut self.pending_syncs) {
            if self.stalled.contains(&i) {
                self.pending_syncs.push((i, job));
                continue;
            }
            let outcome = job.run_now();
            if let Some(replica) = self.replicas[i].as_mut() {
                let mut out = Output::default();
                replica.on_synced(outcome, &mut out).unwrap();
                self.absorb(i, out);
            }
        }
        for message in std::mem::take(&mut self.network) {
            if self.isolated.contains(&message.to) || self.isolated.contains(&message.from) {
                continue;
            }
            if let Some(replica) = self.replicas[message.to as usize - 1].as_mut() {
                replica.step(message);
            }
        }
    }

    fn tick(&mut self) {
        for i in 0..3 {
            if let Some(replica) = self.replicas[i].as_mut() {
                let mut out = Output::default();
                replica.tick(&mut out);
                self.absorb(i, out);
            }
        }
        self.round();
    }

    fn leader(&self) -> Option<u64> {
        let leaders: Vec<u64> = self
            .replicas
            .iter()
            .flatten()
            .filter(|r| r.is_leader() && !self.isolated.contains(&r.options.node_id))
            .map(|r| r.options.node_id)
            .collect();
        (leaders.len() == 1).then(|| leaders[0])
    }

    fn elect(&mut self) -> u64 {
        for _ in 0..1000 {
            self.tick();
            if let Some(leader) = self.leader() {
                // Let the leader commit its empty entry so reads can start.
                for _ in 0..5 {
                    self.round();
                }
                return leader;
            }
        }
        panic!("no leader after 1000 ticks");
    }

    fn replica(&mut self, id: u64) -> &mut Replica<L> {
        self.replicas[id as usize - 1].as_mut().unwrap()
    }

    fn take_reply(&mut self, token: Token) -> Option<response::Result> {
        let pos = self.replies.iter().position(|(_, r)| r.token == token)?;
        Some(self.replies.remove(pos).1.result)
    }
}

fn put(key: &str, value: &str) -> Op {
    Op::Put(Put {
        key: Bytes::copy_from_slice(key.as_bytes()),
        value: Bytes::copy_from_slice(value.as_bytes()),
    })
}

#[test]
fn three_replicas_elect_one_leader_and_replicate_a_batch() {
    let mut sim = Sim::new();
    let leader = sim.elect();
    for token in 1..=10 {
        sim.replica(leader)
            .propose(token, put(&format!("k{token}"), "v"), SessionTag::default())
            .unwrap();
    }
    // Followers learn the commit index from the next heartbeat
    // (skip_bcast_commit), so let a few ticks pass.
    for _ in 0..10 {
        sim.tick();
    }
    for token in 1..=10 {
        assert!(
            matches!(sim.take_reply(token), Some(response::Result::Write(_))),
            "write {token} not acknowledged"
        );
    }
    // Every replica applied the same batch.
    for id in 1..=3 {
        let r = sim.replica(id);
        assert_eq!(r.state_machine().len(), 10, "replica {id}");
        assert!(r.state_machine().get(b"k7").is_some());
    }
    // A follower refuses writes and names the leader.
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    assert_eq!(
        sim.replica(follower)
            .propose(99, put("x", "y"), SessionTag::default())
            .map_err(|refused| refused.not_leader),
        Err(NotLeader { leader_id: leader })
    );
}

/// Under a steady load the leader's newest entries are always on their way
/// to the followers: a follower that holds everything committed is caught
/// up enough to take leadership (the balancer waited for the follower to
/// hold the whole log, and moved leadership at a random moment of a run).
#[test]
fn a_follower_holding_the_commit_is_caught_up_while_new_entries_are_in_flight() {
    let mut sim = Sim::new();
    let leader = sim.elect();
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    assert!(sim.replica(leader).is_caught_up(follower));
    sim.replica(leader)
        .propose(1, put("k", "v"), SessionTag::default())
        .unwrap();
    sim.replica(leader).flush(&mut Output::default());
    let raft = &sim.replica(leader).raw.raft;
    assert!(raft.raft_log.last_index() > raft.raft_log.committed);
    assert!(sim.replica(leader).is_caught_up(follower));
    // Cut off while the others commit without it, it falls behind the
    // commit: not caught up.
    sim.isolated.push(follower);
    for _ in 0..5 {
        sim.round();
    }
    let raft = &sim.replica(leader).raw.raft;
    assert_eq!(raft.raft_log.committed, raft.raft_log.last_index());
    assert!(!sim.replica(leader).is_caught_up(follower));
}

/// A follower that comes back with a backlog to apply applies it a Ready
/// of `MAX_COMMITTED_BYTES_PER_READY` per turn, and says there is more,
/// so its loop sends what each turn produced in between.
#[test]
fn a_turn_applies_at_most_its_budget_of_a_backlog() {
    let mut sim = Sim::new();
    let leader = sim.elect();
    let slow = (1..=3).find(|&id| id != leader).unwrap();
    sim.stalled = vec![slow as usize - 1];
    // 4 MiB of writes, committed by the leader and the other follower.
    let value = "v".repeat(64 << 10);
    for token in 1..=64 {
        sim.replica(leader)
            .propose(
                token,
                put(&format!("k{token}"), &value),
                SessionTag::default(),
            )
            .unwrap();
    }
    for _ in 0..10 {
        sim.tick();
    }
    for token in 1..=64 {
        assert!(
            sim.take_reply(token).is_some(),
            "write {token} not acknowledged"
        );
    }
    let last = sim.replica(leader).status().applied_index;
    // The slow follower's disk comes back. From here on it applies at most
    // one turn's budget, as the shard loop gives it one turn at a time.
    sim.replica(slow).begin_turn();
    sim.stalled.clear();
    for _ in 0..10 {
        sim.tick();
    }
    let applied = sim.replica(slow).status().applied_index;
    assert!(applied < last, "applied {applied} of {last} in one turn");
    assert!(sim.replica(slow).has_ready());
    let mut turns = 0;
    for _ in 0..1000 {
        if sim.replica(slow).status().applied_index == last {
            break;
        }
        if !sim.replica(slow).has_ready() {
            // It learns the commit index from the leader's heartbeats.
            sim.tick();
            continue;
        }
        let before = sim.replica(slow).status().applied_index;
        let mut out = Output::default();
        let replica = sim.replica(slow);
        replica.begin_turn();
        replica.handle_ready(&mut out).unwrap();
        sim.absorb(slow as usize - 1, out);
        let after = sim.replica(slow).status().applied_index;
        // A Ready holds at most 15 writes of 64 KiB (1 MiB); the budget lets
        // a second Ready start before it is spent, never a third.
        assert!(
            after - before <= 30,
            "{} entries in one turn",
            after - before
        );
        turns += 1;
    }
    assert_eq!(
        sim.replica(slow).status().applied_index,
        last,
        "the backlog never drained"
    );
    assert!(turns >= 2, "the rest of 4 MiB applied in {turns} turns");
    assert_eq!(sim.replica(slow).state_machine().len(), 64);
}

#[test]
fn followers_with_a_stalled_sync_still_answer_heartbeats() {
    let mut sim = Sim::new();
    let leader = sim.elect();
    let term = sim.replica(leader).status().term;
    // Both followers start syncing a write, and their disks hang.
    sim.stalled = (0..3).filter(|&i| i as u64 + 1 != leader).collect();
    sim.replica(leader)
        .propose(1, put("a", "1"), SessionTag::default())
        .unwrap();
    // Three election timeouts: check_quorum steps a leader down when a
    // majority has not answered within one.
    for _ in 0..90 {
        sim.tick();
    }
    assert_eq!(sim.leader(), Some(leader));
    assert_eq!(sim.replica(leader).status().term, term);
    assert!(
        sim.take_reply(1).is_none(),
        "acknowledged before a majority synced"
    );
    // The disks recover: the write commits.
    sim.stalled.clear();
    for _ in 0..10 {
        sim.tick();
    }
    assert!(matches!(
        sim.take_reply(1),
        Some(response::Result::Write(_))
    ));
}

#[test]
fn nothing_is_acknowledged_before_a_majority_synced() {
    let mut sim = Sim::new();
    let leader = sim.elect();
    sim.replica(leader)
        .propose(1, put("a", "1"), SessionTag::default())
        .unwrap();
    // Run the leader alone: it appends and sends, but holds its sync.
    let mut out = Output::default();
    sim.replica(leader).flush(&mut out);
    sim.replica(leader).handle_ready(&mut out).unwrap();
    assert!(out.replies.is_empty());
    let leader_sync = out.sync.take();
    sim.network.extend(out.messages);
    // Followers receive the entries but their syncs never complete.
    for message in std::mem::take(&mut sim.network) {
        let to = message.to;
        sim.replica(to).step(message);
    }
    for id in (1..=3).filter(|&id| id != leader) {
        let mut out = Output::default();
        sim.replica(id).handle_ready(&mut out).unwrap();
        // Their acks are persisted messages: held back until the sync.
        assert!(
            out.messages
                .iter()
                .all(|m| m.get_msg_type() != MessageType::MsgAppendResponse),
            "follower {id} acked before its sync"
        );
        assert!(out.sync.is_some(), "follower {id} must sync the entries");
    }
    // The leader's own sync alone is not a majority.
    let job = leader_sync.expect("the leader must sync its own entry");
    let outcome = job.run_blocking();
    let mut out = Output::default();
    sim.replica(leader).on_synced(outcome, &mut out).unwrap();
    assert!(
        out.replies.is_empty(),
        "acknowledged with only the leader durable"
    );
}

#[test]
fn isolated_leader_steps_down_and_fails_pending_writes() {
    let mut sim = Sim::new();
    let old = sim.elect();
    sim.isolated.push(old);
    sim.replica(old)
        .propose(7, put("lost", "maybe"), SessionTag::default())
        .unwrap();
    // check_quorum: the isolated leader steps down within an election timeout.
    for _ in 0..100 {
        sim.tick();
    }
    assert!(
        !sim.replica(old).is_leader(),
        "isolated leader kept leading"
    );
    match sim.take_reply(7) {
        Some(response::Result::Error(e)) => {
            assert!(
                e.code == ErrorCode::Unavailable as i32 || e.code == ErrorCode::Timeout as i32,
                "{e:?}"
            )
        }
        other => panic!("pending write not failed: {other:?}"),
    }
    // The majority elects another leader that serves reads. raft-rs draws
    // election timeouts from the thread's RNG, so a split vote can take a
    // few more timeouts: wait for the leader, within a bound.
    let mut new = sim.leader();
    for _ in 0..1000 {
        if new.is_some_and(|id| id != old) {
            break;
        }
        sim.tick();
        new = sim.leader();
    }
    let new = new.expect("majority has a leader");
    assert_ne!(new, old);
    let mut out = Output::default();
    let get = Op::Get(Get {
        key: Bytes::from_static(b"lost"),
        consistency: Consistency::Linearizable as i32,
        local: false,
    });
    sim.replica(new)
        .read(8, get, Consistency::Linearizable, &mut out)
        .unwrap();
    sim.absorb(new as usize - 1, out);
    for _ in 0..10 {
        sim.round();
    }
    assert!(matches!(sim.take_reply(8), Some(response::Result::Get(_))));
}

#[test]
fn restart_recovers_log_and_reapplies() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(1);
    opts.bootstrap = crate::membership::loopback_members([1]);
    {
        let wal = Wal::open(dir.path(), WalOptions::default()).unwrap();
        let mut r = Replica::open(wal, opts.clone(), None).unwrap();
        let mut out = Output::default();
        for _ in 0..100 {
            r.tick(&mut out);
            r.handle_ready(&mut out).unwrap();
            while let Some(job) = out.sync.take() {
                r.on_synced(job.run_blocking(), &mut out).unwrap();
            }
            if r.is_leader() {
                break;
            }
        }
        assert!(r.is_leader());
        r.propose(1, put("durable", "yes"), SessionTag::default())
            .unwrap();
        r.flush(&mut out);
        r.handle_ready(&mut out).unwrap();
        while let Some(job) = out.sync.take() {
            r.on_synced(job.run_blocking(), &mut out).unwrap();
        }
        assert!(out
            .replies
            .iter()
            .any(|reply| reply.token == 1 && matches!(reply.result, response::Result::Write(_))));
    }
    let wal = Wal::open(dir.path(), WalOptions::default()).unwrap();
    let mut r = Replica::open(wal, opts, None).unwrap();
    let mut out = Output::default();
    r.handle_ready(&mut out).unwrap();
    while let Some(job) = out.sync.take() {
        r.on_synced(job.run_blocking(), &mut out).unwrap();
    }
    assert_eq!(
        r.state_machine().get(b"durable").map(|(v, _)| v),
        Some(Bytes::from_static(b"yes"))
    );
    assert!(r.status().term >= 1);
}

/// Options of a single-voter group whose requests never time out and
/// that never snapshots.
fn single_voter_options() -> ReplicaOptions {
    ReplicaOptions {
        node_id: 1,
        shard: 0,
        bootstrap: crate::membership::loopback_members([1]),
        heartbeat_ticks: 3,
        election_ticks: 30,
        max_election_ticks: 0,
        request_timeout_ticks: 1_000_000,
        liveness_ticks: 30,
        max_size_per_msg: 1 << 20,
        max_inflight_msgs: 256,
        snapshot_entries: u64::MAX,
        snapshot_bytes: u64::MAX,
        snapshot_log_percent: 100,
        max_state_bytes: 0,
    }
}

/// A single-voter replica on 1 MiB WAL segments, elected leader, with
/// every sync run to completion (tests of rotation and group commit).
fn single_voter_leader(dir: &std::path::Path) -> (Replica, Output) {
    let options = corekv_wal::WalOptions {
        segment_bytes: 1 << 20,
        shard_id: 0,
        recycle_bytes: corekv_wal::DEFAULT_RECYCLE_BYTES,
    };
    let wal = Wal::open(dir, options).unwrap();
    let mut r = Replica::open(wal, single_voter_options(), None).unwrap();
    let mut out = Output::default();
    while !r.is_leader() {
        r.tick(&mut out);
        r.handle_ready(&mut out).unwrap();
        run_syncs(&mut r, &mut out);
    }
    (r, out)
}

/// Lets a replica on the real WAL finish what waits for the WAL's next
/// segment (prepared on its own thread): handles Readys and runs syncs until
/// nothing waits, within a generous deadline.
fn settle(r: &mut Replica, out: &mut Output) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        r.handle_ready(out).unwrap();
        run_syncs(r, out);
        if !r.has_log_backlog() && !r.sync_in_flight() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the WAL's next segment never came"
        );
        std::thread::yield_now();
    }
}

/// Runs every sync the replica asks for, blocking, until it asks for none.
fn run_syncs(r: &mut Replica, out: &mut Output) {
    while let Some(job) = out.sync.take() {
        r.on_synced(job.run_blocking(), out).unwrap();
    }
}

/// A Put of `value` under key `k{token}`.
fn numbered_put(token: u64, value: &Bytes) -> Op {
    Op::Put(corekv_proto::client::Put {
        key: Bytes::from(format!("k{token}")),
        value: value.clone(),
    })
}

mod rotation_tests {
    use super::*;

    #[test]
    fn commits_continue_across_wal_segment_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let (mut r, mut out) = single_voter_leader(dir.path());
        let value = Bytes::from(vec![b'v'; 4096]);
        let mut token = 0;
        for round in 0..10 {
            for _ in 0..100 {
                token += 1;
                r.propose(token, numbered_put(token, &value), SessionTag::default())
                    .unwrap();
            }
            r.flush(&mut out);
            r.handle_ready(&mut out).unwrap();
            let mut syncs = 0;
            while let Some(job) = out.sync.take() {
                syncs += 1;
                assert!(syncs < 100, "sync loop");
                let outcome = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
                    .build()
                    .expect("monoio runtime")
                    .block_on(job.run());
                r.on_synced(outcome, &mut out).unwrap();
            }
            settle(&mut r, &mut out);
            let status = r.status();
            assert_eq!(
                status.commit_index,
                status.last_index,
                "round {round}: commit stuck: {status:?}, segments {}",
                r.wal().segment_count()
            );
        }
    }
}

mod snapshot_marker_tests {
    use super::*;

    /// A single-voter leader that took 1500 puts of 4 KiB and two
    /// snapshots (every 500 entries) into `snapshots`, the second one written
    /// once the writes stopped; returns the first snapshot's metadata.
    fn two_snapshots(
        dir: &std::path::Path,
        snapshots: &std::path::Path,
    ) -> (Replica, Output, SnapshotMeta) {
        let (mut r, mut out) = single_voter_leader(dir);
        r.options.snapshot_entries = 500;
        let value = Bytes::from(vec![b'v'; 4096]);
        let mut first = None;
        let mut second = None;
        for token in 1..=1500u64 {
            r.propose(token, numbered_put(token, &value), SessionTag::default())
                .unwrap();
            r.flush(&mut out);
            r.handle_ready(&mut out).unwrap();
            run_syncs(&mut r, &mut out);
            if let Some((meta, map)) = out.snapshot_to_write.take() {
                if first.is_none() {
                    crate::snapshot::write(snapshots, &meta, &map).unwrap();
                    r.on_snapshot_written(Ok(meta.clone())).unwrap();
                    first = Some(meta);
                } else {
                    second.get_or_insert((meta, map));
                }
            }
        }
        let first = first.expect("a snapshot after 500 entries");
        assert_eq!(
            r.raw.store().first_index().unwrap(),
            1,
            "the log is kept up to the snapshot before the newest"
        );
        let (meta, map) = second.expect("a second snapshot 500 entries later");
        crate::snapshot::write(snapshots, &meta, &map).unwrap();
        // The writes have stopped; the second snapshot becomes durable now
        // and the log is compacted up to the first.
        r.on_snapshot_written(Ok(meta)).unwrap();
        r.handle_ready(&mut out).unwrap();
        (r, out, first)
    }

    #[test]
    fn an_idle_shard_syncs_its_snapshot_marker_and_compacts() {
        let (dir, snapshots) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (mut r, mut out, first) = two_snapshots(dir.path(), snapshots.path());
        let job = out.sync.take().expect("the marker gets a sync of its own");
        r.on_synced(job.run_blocking(), &mut out).unwrap();
        assert!(
            !r.take_obsolete_segments().is_empty(),
            "segments covered by the first snapshot are handed out for deletion"
        );
        assert_eq!(r.raw.store().first_index().unwrap(), first.index + 1);
        let status = r.status();
        assert_eq!(status.commit_index, status.last_index);
    }

    /// Reopens the shard over `dir` and the newest readable snapshot in
    /// `snapshots`; returns it once the committed log is applied.
    fn reopen(dir: &std::path::Path, snapshots: &std::path::Path) -> (Replica, u64) {
        let wal = Wal::open(
            dir,
            WalOptions {
                segment_bytes: 1 << 20,
                shard_id: 0,
                recycle_bytes: corekv_wal::DEFAULT_RECYCLE_BYTES,
            },
        )
        .unwrap();
        let (meta, image, _) = crate::snapshot::load_latest(0, snapshots).unwrap();
        let loaded_index = meta.index;
        let loaded = LoadedSnapshot { meta, image };
        let mut r = Replica::open(wal, single_voter_options(), Some(loaded)).unwrap();
        let mut out = Output::default();
        r.handle_ready(&mut out).unwrap();
        run_syncs(&mut r, &mut out);
        (r, loaded_index)
    }

    #[test]
    fn a_restart_replays_from_the_newest_snapshot_or_the_one_before_if_it_is_unreadable() {
        let (dir, snapshots) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (mut r, mut out, first) = two_snapshots(dir.path(), snapshots.path());
        run_syncs(&mut r, &mut out);
        let last = r.status().last_index;
        drop(r);

        let (r, loaded) = reopen(dir.path(), snapshots.path());
        assert!(loaded > first.index, "the newest snapshot is loaded");
        assert_eq!(r.state_machine().applied_index(), last);
        assert_eq!(r.state_machine().len(), 1500);
        drop(r);

        // The newest snapshot rots: the one before it and the log after it
        // still hold everything.
        let newest = crate::snapshot::list(snapshots.path())[0].2.clone();
        let mut bytes = std::fs::read(&newest).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xff;
        std::fs::write(&newest, bytes).unwrap();
        let (r, loaded) = reopen(dir.path(), snapshots.path());
        assert_eq!(loaded, first.index, "the snapshot before is loaded");
        assert_eq!(r.state_machine().applied_index(), last);
        assert_eq!(r.state_machine().len(), 1500);
        for token in [1u64, 750, 1500] {
            assert!(r
                .state_machine()
                .get(format!("k{token}").as_bytes())
                .is_some());
        }
    }
}

mod group_commit_tests {
    use super::*;

    #[test]
    fn proposals_during_a_sync_in_flight_commit_across_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let (mut r, mut out) = single_voter_leader(dir.path());
        let value = Bytes::from(vec![b'v'; 4096]);
        let mut in_flight: Option<SyncJob> = None;
        for token in 1..=1000u64 {
            r.propose(token, numbered_put(token, &value), SessionTag::default())
                .unwrap();
            if token % 7 == 0 {
                r.flush(&mut out);
                r.handle_ready(&mut out).unwrap();
                if let Some(job) = out.sync.take() {
                    assert!(in_flight.is_none(), "two syncs in flight");
                    in_flight = Some(job);
                }
            }
            if token % 13 == 0 {
                if let Some(job) = in_flight.take() {
                    r.on_synced(job.run_blocking(), &mut out).unwrap();
                    if let Some(job) = out.sync.take() {
                        in_flight = Some(job);
                    }
                }
            }
        }
        // The last proposals reach raft while a sync may be in flight; from
        // here on only sync completions drive the replica.
        r.flush(&mut out);
        r.handle_ready(&mut out).unwrap();
        if let Some(job) = out.sync.take() {
            assert!(in_flight.is_none(), "two syncs in flight");
            in_flight = Some(job);
        }
        let mut rounds = 0;
        while let Some(job) = in_flight.take() {
            rounds += 1;
            assert!(rounds < 100);
            r.on_synced(job.run_blocking(), &mut out).unwrap();
            in_flight = out.sync.take();
        }
        settle(&mut r, &mut out);
        let status = r.status();
        assert_eq!(
            status.commit_index, status.last_index,
            "commit stuck: {status:?}"
        );
        let acked = out
            .replies
            .iter()
            .filter(|reply| matches!(reply.result, response::Result::Write(_)))
            .count();
        assert_eq!(acked, 1000);
    }
}

/// The replica on the in-memory log store: a disk the test tears and fails.
mod memory_store_tests {
    use super::*;
    use crate::log_store::memory::{MemDisk, MemLogStore, MemSyncJob};

    pub(super) type MemReplica = Replica<MemLogStore>;
    pub(super) type MemOutput = Output<MemSyncJob>;

    /// A single-voter leader over whatever `disk` holds, every sync run.
    pub(super) fn mem_leader(disk: &MemDisk) -> (MemReplica, MemOutput) {
        let mut r = Replica::open(disk.open(), single_voter_options(), None).unwrap();
        let mut out = Output::default();
        r.handle_ready(&mut out).unwrap();
        mem_run_syncs(&mut r, &mut out);
        while !r.is_leader() {
            r.tick(&mut out);
            r.handle_ready(&mut out).unwrap();
            mem_run_syncs(&mut r, &mut out);
        }
        (r, out)
    }

    pub(super) fn mem_run_syncs(r: &mut MemReplica, out: &mut MemOutput) {
        while let Some(job) = out.sync.take() {
            r.on_synced(job.run(), out).unwrap();
        }
    }

    /// Proposes puts `k{token}` for `tokens` and hands them to raft.
    fn propose_puts(r: &mut MemReplica, out: &mut MemOutput, tokens: std::ops::Range<u64>) {
        let value = Bytes::from_static(b"v");
        for token in tokens {
            r.propose(token, numbered_put(token, &value), SessionTag::default())
                .unwrap();
        }
        r.flush(out);
        r.handle_ready(out).unwrap();
    }

    /// The versions acknowledged to clients, by token.
    fn acknowledged(out: &mut MemOutput) -> Vec<(u64, u64)> {
        out.replies
            .drain(..)
            .filter_map(|reply| match reply.result {
                response::Result::Write(w) => Some((reply.token, w.version)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_torn_write_at_a_crash_loses_only_what_no_sync_covered() {
        for torn_survivors in 0..4 {
            let disk = MemDisk::new();
            let (mut r, mut out) = mem_leader(&disk);
            propose_puts(&mut r, &mut out, 1..6);
            mem_run_syncs(&mut r, &mut out);
            let acked = acknowledged(&mut out);
            assert_eq!(acked.len(), 5, "synced writes are acknowledged");

            // The next batch is written but its sync stalls: nothing of it
            // may be acknowledged, and then the machine crashes.
            propose_puts(&mut r, &mut out, 6..11);
            let stalled = out.sync.take().expect("the second batch waits for a sync");
            assert!(
                acknowledged(&mut out).is_empty(),
                "acknowledged before its sync"
            );
            assert!(disk.written_records() > disk.durable_records());
            drop((r, stalled));
            disk.crash(torn_survivors);

            let (r, _) = mem_leader(&disk);
            for (token, version) in &acked {
                let key = format!("k{token}");
                assert_eq!(
                    r.state_machine().get(key.as_bytes()).map(|(_, v)| v),
                    Some(*version),
                    "torn_survivors {torn_survivors}: acknowledged {key} lost or changed"
                );
            }
        }
    }

    #[test]
    fn a_failed_sync_acknowledges_nothing_and_stops_the_replica() {
        let disk = MemDisk::new();
        let (mut r, mut out) = mem_leader(&disk);
        disk.fail_next_sync();
        propose_puts(&mut r, &mut out, 1..4);
        let job = out.sync.take().expect("the batch waits for a sync");
        let error = r.on_synced(job.run(), &mut out).unwrap_err();
        assert!(
            matches!(error, ReplicaError::Log { shard: 0, .. }),
            "unexpected error: {error}"
        );
        assert!(
            acknowledged(&mut out).is_empty(),
            "a write was acknowledged without a sync"
        );

        // The replica is fail-stop; a restart over what the disk kept finds
        // none of the unsynced writes and serves new ones.
        drop(r);
        disk.crash(0);
        let (mut r, mut out) = mem_leader(&disk);
        assert!(r.state_machine().get(b"k1").is_none());
        propose_puts(&mut r, &mut out, 4..5);
        mem_run_syncs(&mut r, &mut out);
        assert_eq!(acknowledged(&mut out).len(), 1);
    }

    #[test]
    fn requests_past_the_pending_bound_are_answered_at_once() {
        let disk = MemDisk::new();
        let (mut r, mut out) = mem_leader(&disk);
        let total = MAX_PENDING_REQUESTS as u64 + 3;
        propose_puts(&mut r, &mut out, 1..total + 1);
        let refused: Vec<u64> = out
            .replies
            .iter()
            .filter(|reply| {
                matches!(&reply.result, response::Result::Error(e)
                    if e.code == ErrorCode::Unavailable as i32 && e.message.contains("pending requests"))
            })
            .map(|reply| reply.token)
            .collect();
        assert_eq!(refused.len(), 3, "exactly the requests past the bound");
        assert!(refused.iter().all(|t| *t > MAX_PENDING_REQUESTS as u64));
        mem_run_syncs(&mut r, &mut out);
        assert_eq!(acknowledged(&mut out).len(), MAX_PENDING_REQUESTS);
    }
}

/// A log that cannot grow: writes wait, nothing is acknowledged early, new
/// writes are refused, leadership moves, and all of it ends when space
/// returns.
mod disk_full_tests {
    use super::memory_store_tests::{mem_leader, mem_run_syncs as run_syncs};
    use super::*;
    use crate::log_store::memory::MemDisk;

    fn error_code(result: &response::Result) -> Option<ErrorCode> {
        match result {
            response::Result::Error(e) => ErrorCode::try_from(e.code).ok(),
            _ => None,
        }
    }

    #[test]
    fn writes_wait_unacknowledged_and_resume_when_space_returns() {
        let disk = MemDisk::new();
        let (mut r, mut out) = mem_leader(&disk);
        out.replies.clear();
        // Room for about two of the ten entries.
        disk.set_room(Some(80));
        let value = Bytes::from_static(b"v");
        for token in 1..=10 {
            r.propose(token, numbered_put(token, &value), SessionTag::default())
                .unwrap();
        }
        r.flush(&mut out);
        r.handle_ready(&mut out).unwrap();
        run_syncs(&mut r, &mut out);
        for _ in 0..5 {
            r.tick(&mut out);
            r.handle_ready(&mut out).unwrap();
            run_syncs(&mut r, &mut out);
        }
        assert!(out.replies.is_empty(), "answered before the log took it");
        let reason = r.disk_full().expect("the replica knows its disk is full");
        assert!(reason.starts_with("disk full on"), "{reason}");
        assert!(r.log_backlog_bytes() > 0);
        assert!(r.status().commit_index < r.status().last_index);

        // New writes are refused at once, naming the cause; reads work.
        r.propose(11, numbered_put(11, &value), SessionTag::default())
            .unwrap();
        let read = Op::Get(Get {
            key: Bytes::from_static(b"k1"),
            consistency: Consistency::Linearizable as i32,
            local: false,
        });
        r.read(12, read, Consistency::Linearizable, &mut out)
            .unwrap();
        r.flush(&mut out);
        r.handle_ready(&mut out).unwrap();
        let refused = out.replies.iter().find(|reply| reply.token == 11).unwrap();
        assert_eq!(
            error_code(&refused.result),
            Some(ErrorCode::ResourceExhausted)
        );
        let response::Result::Error(e) = &refused.result else {
            unreachable!()
        };
        assert!(e.message.contains("disk full on"), "{}", e.message);
        let read = out.replies.iter().find(|reply| reply.token == 12).unwrap();
        assert!(
            matches!(&read.result, response::Result::Get(g) if !g.found),
            "{:?}",
            read.result
        );
        out.replies.clear();

        disk.set_room(None);
        r.tick(&mut out);
        r.handle_ready(&mut out).unwrap();
        run_syncs(&mut r, &mut out);
        assert_eq!(r.disk_full(), None);
        assert_eq!(r.log_backlog_bytes(), 0);
        let mut acked: Vec<u64> = out
            .replies
            .iter()
            .filter(|reply| matches!(reply.result, response::Result::Write(_)))
            .map(|reply| reply.token)
            .collect();
        acked.sort_unstable();
        assert_eq!(acked, (1..=10).collect::<Vec<_>>());

        // Everything acknowledged is durable.
        drop(r);
        disk.crash(0);
        let (r, _) = mem_leader(&disk);
        for token in 1..=10 {
            let key = format!("k{token}");
            assert!(r.state_machine().get(key.as_bytes()).is_some(), "{key}");
        }
    }

    #[test]
    fn a_leader_whose_disk_fills_hands_over_and_catches_up_later() {
        let disks: Vec<MemDisk> = (0..3).map(|_| MemDisk::new()).collect();
        let mut sim = Sim::in_memory(&disks);
        let old = sim.elect();
        disks[old as usize - 1].set_room(Some(0));

        // A majority without the leader's disk still commits, but the
        // leader applies (and answers) only what it holds itself.
        sim.replica(old)
            .propose(1, put("a", "1"), SessionTag::default())
            .unwrap();
        for _ in 0..5 {
            sim.round();
        }
        assert!(
            sim.take_reply(1).is_none(),
            "answered from an unwritten log"
        );
        sim.replica(old)
            .propose(2, put("b", "2"), SessionTag::default())
            .unwrap();
        sim.round();
        let refused = sim.take_reply(2).expect("refused at once");
        assert_eq!(error_code(&refused), Some(ErrorCode::ResourceExhausted));

        let mut new = None;
        for _ in 0..300 {
            sim.tick();
            new = sim.leader().filter(|&l| l != old);
            if new.is_some() {
                break;
            }
        }
        let new = new.expect("leadership moves off the full disk");
        let lost_leadership = sim.take_reply(1).expect("answered when leadership moved");
        assert_eq!(error_code(&lost_leadership), Some(ErrorCode::Unavailable));
        sim.replica(new)
            .propose(3, put("c", "3"), SessionTag::default())
            .unwrap();
        for _ in 0..5 {
            sim.round();
        }
        assert!(matches!(
            sim.take_reply(3),
            Some(response::Result::Write(_))
        ));
        assert!(
            sim.replica(new).state_machine().get(b"a").is_some(),
            "the write the followers took is committed"
        );
        assert!(sim.replica(old).disk_full().is_some());

        disks[old as usize - 1].set_room(None);
        for _ in 0..20 {
            sim.tick();
        }
        assert_eq!(sim.replica(old).disk_full(), None);
        let applied: Vec<u64> = (1..=3)
            .map(|id| sim.replica(id).state_machine().applied_index())
            .collect();
        assert!(applied.iter().all(|&a| a == applied[0]), "{applied:?}");
        for id in 1..=3 {
            let sm = sim.replica(id).state_machine();
            assert!(
                sm.get(b"a").is_some() && sm.get(b"c").is_some(),
                "node {id}"
            );
            assert!(sm.get(b"b").is_none(), "node {id} applied a refused write");
        }
    }
}

/// The snapshot rule scales with the state: the bytes written for
/// snapshots stay a bounded share of the log, whatever the data size.
mod snapshot_rule_tests {
    use super::*;
    use crate::log_store::memory::MemDisk;

    /// Snapshots a single voter takes while it applies `puts` puts of new
    /// keys, with a threshold of 10 entries and `percent`.
    fn snapshots_taken(puts: u64, percent: u64) -> Vec<u64> {
        let disk = MemDisk::new();
        let options = ReplicaOptions {
            snapshot_entries: 10,
            snapshot_log_percent: percent,
            ..single_voter_options()
        };
        let mut r = Replica::open(disk.open(), options, None).unwrap();
        let mut out = Output::default();
        let mut taken = Vec::new();
        let drive = |r: &mut Replica<_>, out: &mut Output<_>, taken: &mut Vec<u64>| {
            r.handle_ready(out).unwrap();
            while let Some(job) = out.sync.take() {
                let job: crate::log_store::memory::MemSyncJob = job;
                r.on_synced(job.run(), out).unwrap();
            }
            if let Some((meta, _image)) = out.snapshot_to_write.take() {
                taken.push(meta.index);
                r.on_snapshot_written(Ok(meta)).unwrap();
            }
        };
        while !r.is_leader() {
            r.tick(&mut out);
            drive(&mut r, &mut out, &mut taken);
        }
        let value = Bytes::from_static(b"v");
        for token in 1..=puts {
            r.propose(token, numbered_put(token, &value), SessionTag::default())
                .unwrap();
            r.flush(&mut out);
            drive(&mut r, &mut out, &mut taken);
        }
        taken
    }

    #[test]
    fn a_larger_state_defers_the_next_snapshot() {
        // Without scaling: one snapshot per 10 entries.
        let fixed = snapshots_taken(200, 0);
        assert_eq!(fixed.len(), 20, "{fixed:?}");
        // Scaled: the next snapshot waits for as many entries as the state
        // had keys at the last one, so the gaps double.
        let scaled = snapshots_taken(200, 100);
        assert!(scaled.len() <= 6, "{scaled:?}");
        let gaps: Vec<u64> = scaled.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.windows(2).all(|g| g[1] >= g[0]), "{scaled:?}");
    }
}

/// A follower that lost its data knows how far behind the leader it is,
/// though raft's commit index does not say (the leader tells it only what
/// it already matches): what `/health/ready` reads.
mod catch_up_tests {
    use super::*;
    use crate::log_store::memory::{MemDisk, MemLogStore};

    /// Three replicas in memory, a leader elected, `puts` writes committed
    /// and their commit index carried to the followers by heartbeats.
    fn cluster_with_puts(puts: u64) -> (Sim<MemLogStore>, u64) {
        let disks: Vec<MemDisk> = (0..3).map(|_| MemDisk::new()).collect();
        let mut sim = Sim::in_memory(&disks);
        let leader = sim.elect();
        for token in 1..=puts {
            sim.replica(leader)
                .propose(token, put(&format!("k{token}"), "v"), SessionTag::default())
                .unwrap();
        }
        for _ in 0..10 {
            sim.tick();
        }
        (sim, leader)
    }

    /// The leader's view of `peer`.
    fn progress_of(sim: &mut Sim<MemLogStore>, leader: u64, peer: u64) -> raft::Progress {
        sim.replica(leader)
            .raw
            .raft
            .prs()
            .get(peer)
            .unwrap()
            .clone()
    }

    /// A leader that never heard from a peer (elected while the peer was
    /// down) used to probe it from index 1 when its link came up, an index
    /// long compacted: raft then sent a whole snapshot to a follower that
    /// had nearly all of the log.
    #[test]
    fn a_reconnected_peer_is_probed_from_the_log_end_not_from_the_start() {
        let (mut sim, leader) = cluster_with_puts(20);
        let follower = (1..=3).find(|&id| id != leader).unwrap();
        // The link flaps twice before the follower answers anything.
        sim.replica(leader).peer_reconnected(follower);
        sim.replica(leader).peer_reconnected(follower);
        let last = sim.replica(leader).status().last_index;
        assert_eq!(progress_of(&mut sim, leader, follower).next_idx, last + 1);
        for _ in 0..10 {
            sim.tick();
        }
        let progress = progress_of(&mut sim, leader, follower);
        assert_eq!(progress.matched, sim.replica(leader).status().last_index);
    }

    #[test]
    fn a_wiped_follower_reports_the_leaders_index_until_it_has_caught_up() {
        let (mut sim, leader) = cluster_with_puts(50);
        let last = sim.replica(leader).status().last_index;
        assert_eq!(sim.replica(leader).status().leader_last_index, last);
        let follower = (1..=3).find(|&id| id != leader).unwrap();
        let healthy = sim.replica(follower).status();
        assert_eq!(
            (healthy.leader_last_index, healthy.applied_index),
            (last, last)
        );

        // The follower restarts with an empty disk: its commit index says
        // nothing about the 50 writes it misses, its view of the leader does.
        let wiped = MemDisk::new();
        sim.replicas[follower as usize - 1] =
            Some(Replica::open(wiped.open(), options(follower), None).unwrap());
        // As the shard does when the follower's link comes back.
        sim.replica(leader).peer_reconnected(follower);
        let mut behind = None;
        for _ in 0..20 {
            sim.tick();
            let s = sim.replica(follower).status();
            if s.leader_last_index >= last && s.applied_index < last {
                behind = Some(s);
                break;
            }
        }
        let behind = behind.expect("the wiped follower sees how far behind it is");
        assert!(behind.commit_index < last, "{behind:?}");

        for _ in 0..50 {
            sim.tick();
        }
        let caught_up = sim.replica(follower).status();
        assert_eq!(caught_up.applied_index, last, "{caught_up:?}");
        assert_eq!(caught_up.leader_last_index, last, "{caught_up:?}");
    }
}

/// A received snapshot the replica drops goes out to be freed off the
/// shard thread, not freed in place.
#[test]
fn a_dropped_received_snapshot_is_handed_out_to_be_freed() {
    let dir = tempfile::tempdir().unwrap();
    let (mut r, mut out) = single_voter_leader(dir.path());
    out.retired_states.clear();
    let mut map = crate::state_machine::Map::new();
    map.insert(
        crate::stored::Key::from_slice(b"k"),
        crate::stored::Versioned {
            value: Bytes::from_static(b"v"),
            version: 1,
        },
    );
    let image = crate::state_machine::Image::new(map, Default::default());
    let meta = crate::snapshot::SnapshotMeta {
        index: 9,
        term: 1,
        ..Default::default()
    };
    // Its raft message is not a MsgSnapshot describing it: dropped.
    let mut message = raft::prelude::Message::default();
    message.set_msg_type(raft::prelude::MessageType::MsgHeartbeat);
    r.receive_snapshot(LoadedSnapshot { meta, image }, message, &mut out);
    assert_eq!(out.retired_states.len(), 1);
    assert_eq!(out.retired_states[0].map.len(), 1);
}
