//! The shard's life beyond single requests: publishing status and metrics,
//! balancing leadership over the nodes, and stopping cleanly.

use std::time::{Duration, Instant};

use corekv_proto::client::ErrorCode;
use corekv_transport::FrameSender;

use crate::replica::{role_of, Output};
use crate::state_machine;

use super::inputs::Input;
use super::Shard;

/// How often (in ticks) a leader checks whether another node should lead.
const BALANCE_EVERY_TICKS: u64 = 50;
/// Ticks to wait after a balancing transfer before considering another.
const BALANCE_BACKOFF_TICKS: u64 = 3000;
/// How long a stopping leader waits for its successor to take over.
const LEADER_HANDOFF_GRACE: Duration = Duration::from_secs(3);
/// Upper bound on how long a stopping shard waits for its last sync and answers.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

impl Shard {
    /// Logs and counts changes of role or leader; a new leader waits before
    /// it balances (see `balance_leadership`).
    pub(super) fn on_role_changes(&mut self, out: &mut Output) {
        for change in out.role_changes.drain(..) {
            let key = (change.role, change.leader_id);
            if self.last_role != Some(key) {
                if self
                    .last_role
                    .is_some_and(|(_, leader)| leader != change.leader_id)
                {
                    self.metrics.leader_changes.inc();
                }
                if change.role == raft::StateRole::Leader {
                    // The first leaders of a new cluster are placed at once;
                    // after a failover or an operator's transfer the new
                    // leader keeps the shard for a while before balancing.
                    let delay = if change.term <= crate::membership::FIRST_ELECTION_TERM {
                        0
                    } else {
                        BALANCE_BACKOFF_TICKS
                    };
                    self.next_balance_tick = self.ticks + delay;
                }
                self.last_role = Some(key);
                tracing::info!(
                    shard = self.local.shard,
                    term = change.term,
                    leader = change.leader_id,
                    "became {}",
                    role_of(change.role).as_str()
                );
            }
        }
    }

    /// Every `BALANCE_EVERY_TICKS` ticks, a leader considers handing over.
    pub(super) fn maybe_balance_leadership(&mut self) {
        if self.ticks % BALANCE_EVERY_TICKS == 0 {
            self.balance_leadership();
        }
    }

    pub(super) fn publish_status(&mut self) {
        let status = self.replica.status();
        let m = &self.metrics;
        m.node_state.set(match status.role {
            r if r == corekv_proto::client::Role::Candidate as i32 => 1,
            r if r == corekv_proto::client::Role::Leader as i32 => 2,
            r if r == corekv_proto::client::Role::PreCandidate as i32 => 3,
            _ => 0,
        });
        m.term.set(status.term as i64);
        m.commit.set(status.commit_index as i64);
        m.applied.set(status.applied_index as i64);
        m.last_index.set(status.last_index as i64);
        let wal = self.replica.wal();
        m.wal_segments.set(wal.segment_count() as i64);
        m.wal_disk_full.set(i64::from(!status.disk_full.is_empty()));
        m.wal_backlog_bytes
            .set(self.replica.log_backlog_bytes() as i64);
        m.state_machine_bytes.set(status.state_machine_bytes as i64);
        m.state_machine_keys.set(status.state_machine_keys as i64);
        m.removed.set(i64::from(status.removed));
        let written = wal.bytes_written();
        m.wal_bytes
            .inc_by(written.saturating_sub(self.wal_bytes_reported));
        self.wal_bytes_reported = written;
        let (new, reused) = wal.segments_started();
        let (new_reported, reused_reported) = self.wal_segments_reported;
        m.wal_new_segments.inc_by(new.saturating_sub(new_reported));
        m.wal_reused_segments
            .inc_by(reused.saturating_sub(reused_reported));
        self.wal_segments_reported = (new, reused);
        // Readers (the admin runtime) hold the lock only to clone the
        // status, but one descheduled meanwhile would stall this thread
        // until it runs again: the status of a contended turn is skipped
        // instead, and the next turn (a tick comes every `tick_ms`)
        // publishes a newer one.
        match self.node.shard_status[self.local.shard as usize].try_lock() {
            Ok(mut slot) => *slot = status,
            Err(std::sync::TryLockError::WouldBlock) => {}
            Err(std::sync::TryLockError::Poisoned(_)) => panic!("status lock poisoned"),
        }
    }

    /// Spreads leadership over the nodes: shard `s` prefers the `s`-th voter
    /// (by id, wrapping), so every node leads about shards/nodes groups and
    /// the write load is shared. A leader that is not the preferred one hands
    /// over once the preferred node is connected and fully caught up; after
    /// an attempt it waits before trying again, so a flaky node cannot make
    /// leadership flap.
    pub(super) fn balance_leadership(&mut self) {
        if self.stopping.is_some()
            || !self.replica.is_leader()
            || self.ticks < self.next_balance_tick
        {
            return;
        }
        let voters = &self.replica.membership().voters;
        if voters.is_empty() {
            return;
        }
        let preferred = voters[self.local.shard as usize % voters.len()];
        if preferred == self.node.config.node_id
            || !self.links.get(&preferred).is_some_and(|l| l.is_up())
            || !self.replica.is_caught_up(preferred)
        {
            return;
        }
        tracing::info!(
            shard = self.local.shard,
            to = preferred,
            "moving leadership to the shard's preferred node"
        );
        self.replica.transfer_leader(preferred);
        self.next_balance_tick = self.ticks + BALANCE_BACKOFF_TICKS;
    }

    /// SIGTERM: a leader hands the shard to its most caught-up follower
    /// first; everyone else stops at once (at the next turn).
    pub(super) fn begin_stopping(&mut self) {
        if self.stopping.is_some() {
            return;
        }
        let shard = self.local.shard;
        let mut deadline = Instant::now();
        if self.replica.is_leader() {
            if let Some(successor) = self.replica.best_successor() {
                tracing::info!(
                    shard,
                    to = successor,
                    "handing leadership over before shutdown"
                );
                self.replica.transfer_leader(successor);
                deadline += LEADER_HANDOFF_GRACE;
            }
        }
        self.stopping = Some(deadline);
        // Wake the loop even if nothing else arrives.
        self.local.inbox.push(Input::Tick);
    }

    /// Stops the shard: fails what is pending, makes the WAL durable, lets
    /// the answers reach their connections, then returns.
    pub(super) async fn shutdown(&mut self, _: ()) -> anyhow::Result<()> {
        let shard = self.local.shard;
        tracing::info!(shard, "shard stopping");
        let mut out = Output::default();
        self.replica.shutdown(&mut out);
        for (_, (route, _)) in std::mem::take(&mut self.forwarded) {
            self.answer(
                &route,
                state_machine::error(ErrorCode::Unavailable, "node is shutting down"),
            );
        }
        self.dispatch(&mut out);
        // Wait for a sync in flight (its job owns the descriptors), then sync
        // whatever was appended after it.
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        let mut batch = Vec::new();
        while self.replica.sync_in_flight() && Instant::now() < deadline {
            let wait =
                monoio::time::timeout(SHUTDOWN_GRACE, self.local.inbox.drain_into(&mut batch))
                    .await;
            if wait.is_err() {
                break;
            }
            for input in batch.drain(..) {
                if let Input::Synced { outcome, .. } = input {
                    let mut out = Output::default();
                    self.replica.finish_sync_only(outcome, &mut out)?;
                    self.dispatch(&mut out);
                }
            }
        }
        if let Some(job) = self.replica.begin_final_sync()? {
            let outcome = job.run().await;
            self.replica.finish_final_sync(outcome)?;
        }
        for link in self.links.values() {
            link.shutdown();
        }
        // Give the writer tasks the chance to deliver the last answers.
        let conns: Vec<FrameSender> = self
            .local
            .conns
            .borrow()
            .values()
            .map(|c| c.sender().clone())
            .collect();
        for conn in &conns {
            conn.close();
        }
        while conns.iter().any(|c| c.queued_bytes() > 0) && Instant::now() < deadline {
            monoio::time::sleep(Duration::from_millis(1)).await;
        }
        tracing::info!(shard, "shard stopped; WAL synced");
        Ok(())
    }
}
