//! Membership changes on the replica: the leader checks a requested change
//! against the group as it is (one change at a time, no duplicate or
//! unknown ids, a promoted learner caught up, a quorum of live voters left)
//! and proposes it as a raft-rs ConfChangeV2; every replica applies it from
//! the log (see `ready.rs`).

use corekv_proto::client::{
    response, ChangeMembership, ErrorCode, MembershipAction, MembershipResult, NodeInfo,
};
use corekv_proto::log::Membership;
use raft::prelude::{ConfChangeType, ConfChangeV2};

use crate::log_store::LogStore;
use crate::membership::{self, Role};
use crate::state_machine;

use super::{NotLeader, Output, Replica, Reply, Token};

/// A learner is promoted only when it is at most this many entries behind
/// the leader's log (and has answered the leader recently): promoted
/// further behind, it would count towards the quorum before it can help
/// form one.
pub const PROMOTE_MAX_LAG_ENTRIES: u64 = 1000;

/// What the leader makes of a requested change.
enum Verdict {
    /// Propose this change.
    Change(ConfChangeV2),
    /// The group already is as asked.
    Unchanged,
    /// Refused, with the answer.
    Refused(response::Result),
}

fn refuse(code: ErrorCode, message: String) -> Verdict {
    Verdict::Refused(state_machine::error(code, &message))
}

impl<L: LogStore> Replica<L> {
    /// The group's members and their addresses, as applied.
    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    /// The log index the membership was applied at.
    pub fn membership_index(&self) -> u64 {
        self.membership_index
    }

    /// True once this node was removed from the group.
    pub fn is_removed(&self) -> bool {
        self.removed
    }

    /// This node no longer belongs to the group: it stops ticking raft (a
    /// removed node must not campaign) and answers nothing more.
    pub fn mark_removed(&mut self, why: &str) {
        if self.removed {
            return;
        }
        self.removed = true;
        tracing::warn!(
            shard = self.options.shard,
            node = self.options.node_id,
            why,
            "this node was removed from the shard's group; it no longer serves the shard"
        );
    }

    /// Handles a ChangeMembership on this shard: answered at once when it is
    /// refused, a dry run or already done; otherwise proposed, and answered
    /// when applied.
    pub fn change_membership(
        &mut self,
        token: Token,
        request: &ChangeMembership,
        out: &mut Output<L::SyncJob>,
    ) -> Result<(), NotLeader> {
        if !self.is_leader() {
            return Err(NotLeader {
                leader_id: self.leader_id(),
            });
        }
        let shard = self.options.shard;
        let report = |replica: &Self, unchanged| {
            response::Result::Membership(MembershipResult {
                membership: Some(membership::report(
                    &replica.membership,
                    shard,
                    replica.membership_index,
                )),
                unchanged,
            })
        };
        let result = match self.judge(request) {
            Verdict::Refused(result) => result,
            Verdict::Unchanged => report(self, true),
            Verdict::Change(_) if request.dry_run => report(self, false),
            Verdict::Change(change) => match self.propose_change(token, change) {
                Ok(()) => return Ok(()),
                Err(result) => result,
            },
        };
        out.replies.push(Reply { token, result });
        Ok(())
    }

    fn propose_change(
        &mut self,
        token: Token,
        change: ConfChangeV2,
    ) -> Result<(), response::Result> {
        let last_before = self.raw.raft.raft_log.last_index();
        let proposed = self.raw.propose_conf_change(Vec::new(), change).is_ok()
            && self.raw.raft.raft_log.last_index() == last_before + 1
            // raft-rs turns a change it will not take into an empty entry.
            && self.raw.raft.pending_conf_index == last_before + 1;
        if !proposed {
            return Err(state_machine::error(
                ErrorCode::Unavailable,
                &format!(
                    "shard {}: the configuration change was not accepted by raft (leadership or \
                     another change is in progress); retry",
                    self.options.shard
                ),
            ));
        }
        tracing::info!(
            shard = self.options.shard,
            index = last_before + 1,
            "configuration change proposed"
        );
        self.track_write(last_before + 1, token);
        Ok(())
    }

    fn judge(&mut self, request: &ChangeMembership) -> Verdict {
        let shard = self.options.shard;
        let Some(node) = &request.node else {
            return refuse(ErrorCode::InvalidArgument, "no node given".into());
        };
        let id = node.node_id;
        if id == 0 {
            return refuse(
                ErrorCode::InvalidArgument,
                "node id 0 is not valid (ids start at 1)".into(),
            );
        }
        if self.raw.raft.has_pending_conf() || membership::is_joint(&self.membership) {
            return refuse(
                ErrorCode::Unavailable,
                format!("shard {shard}: a membership change is still being applied; retry"),
            );
        }
        let removed = self.membership.removed.contains(&id);
        let role = membership::role(&self.membership, id);
        match request.action() {
            MembershipAction::AddLearner => self.judge_add(node, role, removed),
            MembershipAction::Promote => self.judge_promote(id, role, removed),
            MembershipAction::Remove => self.judge_remove(id, role, removed, request),
            MembershipAction::Unspecified => refuse(
                ErrorCode::InvalidArgument,
                "no membership action given".into(),
            ),
        }
    }

    fn judge_add(&self, node: &NodeInfo, role: Option<Role>, removed: bool) -> Verdict {
        let shard = self.options.shard;
        let id = node.node_id;
        if removed {
            return refuse(
                ErrorCode::InvalidArgument,
                format!(
                    "node {id} was removed from shard {shard}; a removed id is never admitted \
                     again (its old disk may hold votes and entries): give the new node a new id"
                ),
            );
        }
        let wanted = membership::member_of(node);
        if let Some(role) = role {
            let known = membership::member(&self.membership, id);
            return if known == Some(&wanted) {
                Verdict::Unchanged
            } else {
                refuse(
                    ErrorCode::InvalidArgument,
                    format!(
                        "node {id} is already a {} of shard {shard}{}",
                        role_name(role),
                        known.map(describe).unwrap_or_default()
                    ),
                )
            };
        }
        let port = |p: u32| (1..=u32::from(u16::MAX)).contains(&p);
        if wanted.host.is_empty() || !port(wanted.client_port) || !port(wanted.peer_port) {
            return refuse(
                ErrorCode::InvalidArgument,
                format!("node {id}: a host, a client port and a peer port (1-65535) are required"),
            );
        }
        if wanted.admin_port != 0 && !port(wanted.admin_port) {
            return refuse(
                ErrorCode::InvalidArgument,
                format!("node {id}: admin port {} is not a port", wanted.admin_port),
            );
        }
        if let Some(clash) = self.membership.members.iter().find(|m| {
            m.host == wanted.host
                && (m.client_port == wanted.client_port || m.peer_port == wanted.peer_port)
        }) {
            return refuse(
                ErrorCode::InvalidArgument,
                format!(
                    "node {id}'s ports collide with node {}{}",
                    clash.id,
                    describe(clash)
                ),
            );
        }
        Verdict::Change(membership::single_change(
            ConfChangeType::AddLearnerNode,
            id,
            Some(&wanted),
        ))
    }

    fn judge_promote(&self, id: u64, role: Option<Role>, removed: bool) -> Verdict {
        let shard = self.options.shard;
        match role {
            Some(Role::Voter) => return Verdict::Unchanged,
            None if removed => {
                return refuse(
                    ErrorCode::InvalidArgument,
                    format!("node {id} was removed from shard {shard} and cannot be promoted"),
                )
            }
            None => {
                return refuse(
                    ErrorCode::InvalidArgument,
                    format!(
                        "node {id} is not a member of shard {shard}; add it as a learner first"
                    ),
                )
            }
            Some(Role::Learner) => {}
        }
        let last = self.raw.raft.raft_log.last_index();
        let matched = self.raw.raft.prs().get(id).map_or(0, |p| p.matched);
        let active = self.is_live(id);
        if !active || last.saturating_sub(matched) > PROMOTE_MAX_LAG_ENTRIES {
            return refuse(
                ErrorCode::FailedPrecondition,
                format!(
                    "learner {id} of shard {shard} has not caught up: it holds index {matched} of the \
                     leader's {last}{}; promote it once it has (watch `corekv member list`)",
                    if active { "" } else { " and has not answered the leader recently" }
                ),
            );
        }
        Verdict::Change(membership::single_change(ConfChangeType::AddNode, id, None))
    }

    fn judge_remove(
        &mut self,
        id: u64,
        role: Option<Role>,
        removed: bool,
        request: &ChangeMembership,
    ) -> Verdict {
        let shard = self.options.shard;
        let Some(role) = role else {
            return if removed {
                Verdict::Unchanged
            } else {
                refuse(
                    ErrorCode::InvalidArgument,
                    format!("node {id} is not a member of shard {shard}"),
                )
            };
        };
        if role == Role::Voter {
            let remaining: Vec<u64> = self
                .membership
                .voters
                .iter()
                .copied()
                .filter(|v| *v != id)
                .collect();
            if remaining.is_empty() {
                return refuse(
                    ErrorCode::FailedPrecondition,
                    format!("node {id} is the last voter of shard {shard}; it cannot be removed"),
                );
            }
            let live = remaining.iter().filter(|v| self.is_live(**v)).count();
            let quorum = remaining.len() / 2 + 1;
            if live < quorum && !request.force {
                return refuse(
                    ErrorCode::FailedPrecondition,
                    format!(
                        "removing node {id} would leave shard {shard} with {} voters of which {live} \
                         are live, and a quorum needs {quorum}; bring voters back first, or force it",
                        remaining.len()
                    ),
                );
            }
        }
        if id == self.options.node_id && !request.dry_run {
            return self.step_aside(id);
        }
        Verdict::Change(membership::single_change(
            ConfChangeType::RemoveNode,
            id,
            None,
        ))
    }

    /// The leader is the node to remove: it hands leadership to the most
    /// caught-up other voter first, and the new leader removes it (a leader
    /// that removes itself leaves the group leaderless until an election).
    fn step_aside(&mut self, id: u64) -> Verdict {
        let shard = self.options.shard;
        let Some(successor) = self.best_successor() else {
            return refuse(
                ErrorCode::FailedPrecondition,
                format!("node {id} leads shard {shard} and no other voter can take over"),
            );
        };
        self.transfer_leader(successor);
        tracing::info!(
            shard,
            to = successor,
            "handing leadership over before this node is removed"
        );
        refuse(
            ErrorCode::Unavailable,
            format!(
                "node {id} leads shard {shard}; leadership is moving to node {successor} before it is \
                 removed; retry"
            ),
        )
    }

    /// True if `id` is this node or sent it a message within the liveness
    /// window. (raft-rs's `recent_active` is cleared at every check-quorum
    /// round, so it reads false for a live peer for up to a heartbeat
    /// interval after each.)
    fn is_live(&self, id: u64) -> bool {
        id == self.options.node_id
            || self
                .last_heard
                .get(&id)
                .is_some_and(|tick| self.ticks.saturating_sub(*tick) <= self.options.liveness_ticks)
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Voter => "voter",
        Role::Learner => "learner",
    }
}

fn describe(member: &corekv_proto::log::Member) -> String {
    format!(
        " (host {}, client port {}, peer port {})",
        member.host, member.client_port, member.peer_port
    )
}
