//! A shard's membership: raft's configuration plus the address of every
//! member, as the shard's log applied it.
//!
//! Nothing here comes from the config file once a cluster exists. A new
//! cluster's log starts with one bootstrap entry per initial voter (a
//! ConfChangeV2 adding it, its addresses in the change's context, as etcd
//! bootstraps); every later change carries the addresses of the nodes it
//! adds the same way. So a node that restarts, or joins and receives the log
//! or a snapshot, learns the members and where they are from the cluster.
//! Snapshots carry the whole [`Membership`].

use bytes::Bytes;
use corekv_proto::client::{NodeInfo, ShardMembership};
use corekv_proto::log::{Member, Membership, MembershipContext};
use prost::Message as _;
use protobuf::Message as _;
use raft::prelude::{ConfChangeSingle, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType};

/// Removed ids a shard remembers (to refuse their handshakes and their
/// re-admission); past it the oldest are forgotten.
pub const MAX_REMOVED_IDS: usize = 4096;

/// The term of the bootstrap entries: the term every node of a new
/// cluster starts in.
const BOOTSTRAP_TERM: u64 = 1;

/// The term of a new cluster's first election.
pub const FIRST_ELECTION_TERM: u64 = BOOTSTRAP_TERM + 1;

/// A node's place in a shard's group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Votes and counts for the quorum.
    Voter,
    /// Receives the log, does not vote.
    Learner,
}

/// raft-rs's configuration as recorded in `membership`.
pub fn conf_state(membership: &Membership) -> ConfState {
    ConfState {
        voters: membership.voters.clone(),
        learners: membership.learners.clone(),
        voters_outgoing: membership.voters_outgoing.clone(),
        learners_next: membership.learners_next.clone(),
        auto_leave: membership.auto_leave,
        ..Default::default()
    }
}

/// Records raft's new configuration `conf` after a change whose context is
/// `context`: nodes it adds get their addresses, nodes no longer in any set
/// lose theirs and are remembered as removed.
pub fn apply(membership: &mut Membership, conf: &ConfState, context: &MembershipContext) {
    let before: Vec<u64> = ids(membership).collect();
    membership.voters = sorted(&conf.voters);
    membership.learners = sorted(&conf.learners);
    membership.voters_outgoing = sorted(&conf.voters_outgoing);
    membership.learners_next = sorted(&conf.learners_next);
    membership.auto_leave = conf.auto_leave;
    for member in &context.members {
        membership.members.retain(|m| m.id != member.id);
        membership.members.push(member.clone());
    }
    let now: Vec<u64> = ids(membership).collect();
    membership.members.retain(|m| now.contains(&m.id));
    membership.members.sort_by_key(|m| m.id);
    for id in before.into_iter().filter(|id| !now.contains(id)) {
        if !membership.removed.contains(&id) {
            membership.removed.push(id);
        }
    }
    let excess = membership.removed.len().saturating_sub(MAX_REMOVED_IDS);
    membership.removed.drain(..excess);
}

fn sorted(ids: &[u64]) -> Vec<u64> {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Every node in the configuration (voters, learners, and both sides of a
/// joint configuration), ascending, without repeats.
pub fn ids(membership: &Membership) -> impl Iterator<Item = u64> {
    let mut all: Vec<u64> = membership
        .voters
        .iter()
        .chain(&membership.learners)
        .chain(&membership.voters_outgoing)
        .chain(&membership.learners_next)
        .copied()
        .collect();
    all.sort_unstable();
    all.dedup();
    all.into_iter()
}

/// The addresses of member `id`, if the membership has them.
pub fn member(membership: &Membership, id: u64) -> Option<&Member> {
    membership.members.iter().find(|m| m.id == id)
}

/// `id`'s role in the incoming configuration, if it is in it.
pub fn role(membership: &Membership, id: u64) -> Option<Role> {
    if membership.voters.contains(&id) {
        Some(Role::Voter)
    } else if membership.learners.contains(&id) || membership.learners_next.contains(&id) {
        Some(Role::Learner)
    } else {
        None
    }
}

/// True while a joint configuration is in force.
pub fn is_joint(membership: &Membership) -> bool {
    !membership.voters_outgoing.is_empty()
}

/// A member's addresses as the client protocol lists them.
pub fn node_info(member: &Member) -> NodeInfo {
    NodeInfo {
        node_id: member.id,
        host: member.host.clone(),
        client_port: member.client_port,
        peer_port: member.peer_port,
        admin_port: member.admin_port,
    }
}

/// A node of the client protocol as a member record.
pub fn member_of(node: &NodeInfo) -> Member {
    Member {
        id: node.node_id,
        host: node.host.clone(),
        client_port: node.client_port,
        peer_port: node.peer_port,
        admin_port: node.admin_port,
    }
}

/// A `peers` entry of the config as a member record.
pub fn member_of_peer(peer: &crate::config::PeerConfig) -> Member {
    Member {
        id: peer.id,
        host: peer.host.clone(),
        client_port: u32::from(peer.client_port),
        peer_port: u32::from(peer.peer_port),
        admin_port: peer.admin_port.map_or(0, u32::from),
    }
}

/// The membership as the client protocol reports it.
pub fn report(membership: &Membership, shard: u32, index: u64) -> ShardMembership {
    ShardMembership {
        shard,
        voters: membership.voters.clone(),
        learners: membership.learners.clone(),
        voters_outgoing: membership.voters_outgoing.clone(),
        nodes: membership.members.iter().map(node_info).collect(),
        index,
    }
}

/// A one-node change: `change_type` for `id`, with `added`'s addresses in
/// the context when it adds a node.
pub fn single_change(change_type: ConfChangeType, id: u64, added: Option<&Member>) -> ConfChangeV2 {
    let mut change = ConfChangeV2::default();
    let mut single = ConfChangeSingle::default();
    single.set_change_type(change_type);
    single.node_id = id;
    change.mut_changes().push(single);
    let context = MembershipContext {
        members: added.into_iter().cloned().collect(),
    };
    change.context = Bytes::from(context.encode_to_vec());
    change
}

/// The entries a new cluster's log starts with: one per initial voter,
/// index 1, 2, ..., all in term 1. Every node of the cluster writes the same
/// ones (the same `peers`), so they are committed from the start.
pub fn bootstrap_entries(voters: &[Member]) -> Vec<Entry> {
    let mut voters = voters.to_vec();
    voters.sort_by_key(|m| m.id);
    voters
        .iter()
        .enumerate()
        .map(|(i, member)| {
            let change = single_change(ConfChangeType::AddNode, member.id, Some(member));
            let mut entry = Entry::default();
            entry.set_entry_type(EntryType::EntryConfChangeV2);
            entry.index = i as u64 + 1;
            entry.term = BOOTSTRAP_TERM;
            entry.data = Bytes::from(
                change
                    .write_to_bytes()
                    .expect("a ConfChangeV2 of one change always encodes"),
            );
            entry
        })
        .collect()
}

/// The configuration change in a conf-change entry and the addresses its
/// context carries; `None` for anything corekv does not propose (version 1
/// changes, undecodable data): it is then skipped, on every replica alike.
pub fn decode_change(entry: &Entry) -> Option<(ConfChangeV2, MembershipContext)> {
    if entry.get_entry_type() != EntryType::EntryConfChangeV2 {
        return None;
    }
    decode_change_data(&entry.data)
}

fn decode_change_data(data: &[u8]) -> Option<(ConfChangeV2, MembershipContext)> {
    let mut change = ConfChangeV2::default();
    change.merge_from_bytes(data).ok()?;
    // An empty context (raft-rs's own leave-joint entry) adds nobody.
    let context = MembershipContext::decode(change.context.as_ref()).ok()?;
    Some((change, context))
}

/// One node's part in a configuration change, in plain terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeStep {
    /// The node becomes a voter (added, or a learner promoted).
    AddVoter(u64),
    /// The node becomes a learner.
    AddLearner(u64),
    /// The node leaves the configuration.
    Remove(u64),
}

/// What the data of a ConfChangeV2 entry changes, and the addresses its
/// context carries, for tools that print a log without speaking raft-rs's
/// types; `None` where [`decode_change`] skips the entry. No steps: the
/// entry leaves a joint configuration.
pub fn describe_change(data: &[u8]) -> Option<(Vec<ChangeStep>, MembershipContext)> {
    let (change, context) = decode_change_data(data)?;
    let steps = change
        .changes
        .iter()
        .map(|single| match single.get_change_type() {
            ConfChangeType::AddNode => ChangeStep::AddVoter(single.node_id),
            ConfChangeType::AddLearnerNode => ChangeStep::AddLearner(single.node_id),
            ConfChangeType::RemoveNode => ChangeStep::Remove(single.node_id),
        })
        .collect();
    Some((steps, context))
}

/// Members `ids` on loopback with ports derived from the id: the
/// bootstrap voters of replicas that never open a socket (unit tests, the
/// simulator).
#[cfg(test)]
pub(crate) fn loopback_members(ids: impl IntoIterator<Item = u64>) -> Vec<Member> {
    ids.into_iter()
        .map(|id| Member {
            id,
            host: "127.0.0.1".into(),
            client_port: 7000 + id as u32 * 10,
            peer_port: 7500 + id as u32 * 10,
            admin_port: 0,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: u64) -> Member {
        loopback_members([id]).remove(0)
    }

    #[test]
    fn bootstrap_entries_decode_to_one_addition_each() {
        let entries = bootstrap_entries(&[member(2), member(1)]);
        assert_eq!(entries.len(), 2);
        for (i, entry) in entries.iter().enumerate() {
            assert_eq!((entry.index, entry.term), (i as u64 + 1, 1));
            let (change, context) = decode_change(entry).unwrap();
            assert_eq!(change.changes.len(), 1);
            assert_eq!(change.changes[0].node_id, i as u64 + 1);
            assert_eq!(context.members, vec![member(i as u64 + 1)]);
        }
    }

    #[test]
    fn describe_change_says_who_is_added_and_where() {
        for entry in bootstrap_entries(&[member(2), member(1)]) {
            let (steps, context) = describe_change(&entry.data).unwrap();
            assert_eq!(steps, vec![ChangeStep::AddVoter(entry.index)]);
            assert_eq!(context.members, vec![member(entry.index)]);
        }
        let change = single_change(ConfChangeType::AddLearnerNode, 4, Some(&member(4)));
        let data = change.write_to_bytes().unwrap();
        let (steps, context) = describe_change(&data).unwrap();
        assert_eq!(steps, vec![ChangeStep::AddLearner(4)]);
        assert_eq!(context.members, vec![member(4)]);
        let data = single_change(ConfChangeType::RemoveNode, 2, None)
            .write_to_bytes()
            .unwrap();
        let (steps, context) = describe_change(&data).unwrap();
        assert_eq!(
            (steps, context.members),
            (vec![ChangeStep::Remove(2)], vec![])
        );
        assert!(describe_change(&[0xff, 0xff]).is_none());
    }

    #[test]
    fn apply_keeps_addresses_of_members_only_and_remembers_removed_ids() {
        let mut membership = Membership::default();
        let conf = ConfState {
            voters: vec![3, 1, 2],
            ..Default::default()
        };
        let context = MembershipContext {
            members: vec![member(1), member(2), member(3)],
        };
        apply(&mut membership, &conf, &context);
        assert_eq!(membership.voters, vec![1, 2, 3]);
        assert_eq!(role(&membership, 2), Some(Role::Voter));
        let conf = ConfState {
            voters: vec![1, 3],
            learners: vec![4],
            ..Default::default()
        };
        let context = MembershipContext {
            members: vec![member(4)],
        };
        apply(&mut membership, &conf, &context);
        assert_eq!(ids(&membership).collect::<Vec<_>>(), vec![1, 3, 4]);
        assert_eq!(
            membership.members.iter().map(|m| m.id).collect::<Vec<_>>(),
            vec![1, 3, 4]
        );
        assert_eq!(membership.removed, vec![2]);
        assert_eq!(role(&membership, 4), Some(Role::Learner));
        assert_eq!(role(&membership, 2), None);
    }
}
