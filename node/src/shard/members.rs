//! The shard's side of membership: a peer link to every other member of
//! the group (started when a member is added, shut down when one is
//! removed), the gate inbound handshakes pass, the membership published for
//! status and topology, and membership requests.

use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::Duration;

use corekv_proto::client::{response, ChangeMembership, ErrorCode, NodeInfo, TopologyResult};
use corekv_proto::log::Member;
use corekv_proto::peer::{Hello, LinkKind};
use corekv_transport::{LinkEvent, PeerLink, PeerLinkConfig};

use crate::membership;
use crate::replica::Output;
use crate::shared::CrossCore;
use crate::state_machine;

use super::inputs::{Input, Route};
use super::{link_queue_bytes, Shard};

/// Who may open a peer link to this shard: the group's members, and
/// anyone of the cluster while this node knows no members (it joined and
/// waits for the leader to add it). Removed ids are told so.
#[derive(Default)]
pub(super) struct PeerGate {
    pub(super) members: Vec<u64>,
    pub(super) removed: Vec<u64>,
}

impl Shard {
    /// Brings links, gate and published membership in line with the
    /// replica's membership. Called before the messages of a step that
    /// changed it are sent, so a new member's link exists for them.
    pub(super) fn on_membership_changed(&mut self) {
        let shard = self.local.shard;
        let me = self.node.config.node_id;
        let membership = self.replica.membership();
        let ids: Vec<u64> = membership::ids(membership).collect();
        self.metrics.voters.set(membership.voters.len() as i64);
        self.metrics.learners.set(membership.learners.len() as i64);
        {
            let mut gate = self.local.gate.borrow_mut();
            gate.members = ids.clone();
            gate.removed = membership.removed.clone();
        }
        *self.node.shard_membership[shard as usize]
            .lock()
            .expect("membership lock poisoned") =
            membership::report(membership, shard, self.replica.membership_index());
        let gone: Vec<u64> = self
            .links
            .keys()
            .copied()
            .filter(|id| !ids.contains(id))
            .collect();
        for peer in gone {
            if let Some(link) = self.links.remove(&peer) {
                link.shutdown();
            }
            self.peer_addrs.remove(&peer);
            self.links_seen_up.remove(&peer);
            tracing::info!(shard, peer, "no longer a member: link closed");
        }
        for peer in ids.into_iter().filter(|id| *id != me) {
            if self.links.contains_key(&peer) || self.resolving.contains(&peer) {
                continue;
            }
            match self.member_address(peer) {
                Some(member) => self.dial(member),
                None => tracing::warn!(
                    shard,
                    peer,
                    "member without a known address: cannot dial it"
                ),
            }
        }
    }

    /// A node's addresses: from the membership; for a node that joined
    /// and knows no members yet, from the cluster's answer at the join (the
    /// leader that adds it must hear back); for a group whose snapshot
    /// predates recorded addresses, from the config's `peers`.
    fn member_address(&self, id: u64) -> Option<Member> {
        if let Some(member) = membership::member(self.replica.membership(), id) {
            return Some(member.clone());
        }
        if let Some(node) = self.node.joining.iter().find(|n| n.node_id == id) {
            return Some(membership::member_of(node));
        }
        self.node.config.peer(id).map(membership::member_of_peer)
    }

    /// Starts the link to `member`. A host name is resolved on the helper
    /// thread (a DNS lookup blocks); the link starts when it comes back.
    fn dial(&mut self, member: Member) {
        let shard = self.local.shard;
        let port = member.peer_port + shard;
        let Ok(port) = u16::try_from(port) else {
            tracing::warn!(
                shard,
                peer = member.id,
                port,
                "member's peer port is out of range"
            );
            return;
        };
        let host = member.host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = host.parse::<IpAddr>() {
            self.start_link(member.id, SocketAddr::new(ip, port));
            return;
        }
        let (peer, host) = (member.id, host.to_string());
        let reply = self.node.cross[shard as usize].clone();
        let job = move || {
            use std::net::ToSocketAddrs;
            let addr = (host.as_str(), port)
                .to_socket_addrs()
                .map_err(|e| format!("cannot resolve {host}:{port}: {e}"))
                .and_then(|mut a| {
                    a.next()
                        .ok_or(format!("{host}:{port} resolves to no address"))
                });
            let _ = reply.send(CrossCore::PeerResolved { peer, addr });
        };
        if self.local.helper.submit(job).is_ok() {
            self.resolving.insert(member.id);
        } else {
            tracing::warn!(
                shard,
                peer = member.id,
                "helper busy: the member is dialled at the next change"
            );
        }
    }

    /// Dials `peer` for a message to it when there is no link: a node that
    /// joined answers the leader that added it before its log names that
    /// leader as a member.
    pub(super) fn dial_unknown(&mut self, peer: u64) {
        if self.links.contains_key(&peer) || self.resolving.contains(&peer) {
            return;
        }
        if !self.replica.membership().voters.is_empty() {
            return;
        }
        if let Some(member) = self.member_address(peer) {
            self.dial(member);
        }
    }

    /// A member's host name was resolved (or not).
    pub(super) fn on_peer_resolved(&mut self, peer: u64, addr: Result<SocketAddr, String>) {
        self.resolving.remove(&peer);
        let membership = self.replica.membership();
        let still_member =
            membership.voters.is_empty() || membership::ids(membership).any(|id| id == peer);
        match addr {
            Ok(addr) if still_member && !self.links.contains_key(&peer) => {
                self.start_link(peer, addr)
            }
            Ok(_) => {}
            Err(reason) => {
                tracing::warn!(shard = self.local.shard, peer, %reason, "cannot dial member")
            }
        }
    }

    fn start_link(&mut self, peer: u64, addr: SocketAddr) {
        let config = &self.node.config;
        let shard = self.local.shard;
        let hello = Hello {
            cluster_id: config.cluster_id,
            node_id: config.node_id,
            shard,
            protocol_version: corekv_proto::PEER_PROTOCOL_VERSION,
            shards: config.shards,
            kind: LinkKind::Raft as i32,
        };
        let link_config = PeerLinkConfig {
            addr,
            hello,
            socket: self.node.socket_options(),
            max_queue_bytes: link_queue_bytes(config.max_frame_bytes),
            max_frame_bytes: config.max_frame_bytes,
            tls: self.node.tls.as_ref().map(|tls| tls.peer_tls(peer)),
            backoff_initial: Duration::from_millis(10),
            backoff_max: Duration::from_secs(1),
        };
        let events = self.local.clone();
        let on_event: Rc<dyn Fn(LinkEvent)> =
            Rc::new(move |event| events.inbox.push(Input::Link { peer, event }));
        self.peer_addrs.insert(peer, addr);
        self.links
            .insert(peer, PeerLink::start(link_config, on_event));
        tracing::info!(shard, peer, %addr, "dialling member");
    }

    /// Handles ChangeMembership on this shard's replica.
    pub(super) fn change_membership(
        &mut self,
        route: Route,
        op: corekv_proto::client::request::Op,
        change: &ChangeMembership,
        no_forward: bool,
        out: &mut Output,
    ) {
        let token = self.token(route.clone());
        if let Err(not_leader) = self.replica.change_membership(token, change, out) {
            self.routes.remove(&token);
            self.not_leader(route, op, not_leader, no_forward);
        }
    }

    /// The answer for a request this shard cannot serve because the node
    /// was removed from its group.
    pub(super) fn removed_error(&self) -> response::Result {
        state_machine::error(
            ErrorCode::Unavailable,
            &format!(
                "node {} was removed from the cluster (shard {}); it no longer serves requests",
                self.node.config.node_id, self.local.shard
            ),
        )
    }

    /// The client address of shard `shard` of node `id`, if known.
    pub(super) fn client_addr_of(&self, id: u64) -> Option<String> {
        let member = self.member_address(id)?;
        Some(crate::config::host_port(
            &member.host,
            member.client_port + self.local.shard,
        ))
    }

    pub(super) fn topology(&self) -> TopologyResult {
        let config = &self.node.config;
        let nodes: Vec<NodeInfo> = self.node.members();
        TopologyResult {
            cluster_id: config.cluster_id,
            shards: config.shards,
            nodes,
            leaders: self
                .node
                .status()
                .shards
                .iter()
                .map(|s| s.leader_id)
                .collect(),
        }
    }
}
