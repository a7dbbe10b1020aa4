//! Requests: size checks, which shard owns a key, hand-over to another
//! shard of this node, forwarding to the leader, and delivering answers.

use std::time::{Duration, Instant};

use bytes::Bytes;
use corekv_proto::client::{request::Op, response, Consistency, ErrorCode, Request, Response};
use corekv_proto::peer::{peer_frame, ForwardReply, PeerFrame};
use corekv_transport::encode_frame_bytes;

use crate::metrics::{self};
use crate::replica::{NotLeader, Output, Token};
use crate::shared::CrossCore;
use crate::state_machine;

use super::client_conn::CutReason;
use super::inputs::{ConnId, Dest, Route};
use super::Shard;

/// Requests a follower's shard forwards to its leader at once; past it they
/// are answered UNAVAILABLE (the client retries, or goes to the leader).
const MAX_FORWARDED_REQUESTS: usize = 64 * 1024;

impl Shard {
    pub(super) fn handle_request(
        &mut self,
        route: Route,
        request: Request,
        no_forward: bool,
        out: &mut Output,
    ) {
        if self.stopping.is_some() {
            let result = state_machine::error(ErrorCode::Unavailable, "node is shutting down");
            self.answer(&route, result);
            return;
        }
        let Some(op) = request.op else {
            self.answer(
                &route,
                state_machine::error(ErrorCode::InvalidArgument, "request has no operation"),
            );
            return;
        };
        let key = match &op {
            Op::Put(p) => Some(&p.key),
            Op::Get(g) => Some(&g.key),
            Op::Delete(d) => Some(&d.key),
            Op::Cas(c) => Some(&c.key),
            Op::Scan(_)
            | Op::Topology(_)
            | Op::Status(_)
            | Op::TransferLeader(_)
            | Op::OpenSession(_)
            | Op::ChangeMembership(_) => None,
        };
        // Status still tells an operator what happened; a topology from a
        // removed node would be stale, so clients are sent elsewhere.
        let serves_removed = matches!(op, Op::Status(_));
        if self.replica.is_removed() && !serves_removed {
            let result = self.removed_error();
            self.answer(&route, result);
            return;
        }
        if let Some(key) = key {
            if let Err(result) = self.check_sizes(key, &op) {
                self.answer(&route, result);
                return;
            }
            let owner = corekv_proto::shard_of(key, self.node.config.shards);
            if owner != self.local.shard {
                self.hand_over(owner, route, op, no_forward);
                return;
            }
        }
        match op {
            Op::Topology(_) => {
                let result = response::Result::Topology(self.topology());
                self.answer(&route, result);
            }
            Op::Status(_) => {
                let result = response::Result::Status(self.node.status());
                self.answer(&route, result);
            }
            Op::Scan(ref scan) => {
                let target = scan.shard.unwrap_or(self.local.shard);
                if scan.shard.is_none() && self.node.config.shards > 1 {
                    self.answer(
                        &route,
                        state_machine::error(
                            ErrorCode::InvalidArgument,
                            "scan on a multi-shard node needs `shard` set (the client library fans out)",
                        ),
                    );
                } else if target >= self.node.config.shards {
                    self.answer(
                        &route,
                        state_machine::error(ErrorCode::WrongShard, &format!("no shard {target}")),
                    );
                } else if target != self.local.shard {
                    self.hand_over(target, route, op, no_forward);
                } else {
                    let consistency = scan.consistency();
                    self.read(route, op, consistency, no_forward, out);
                }
            }
            Op::Get(ref get) => {
                let consistency = get.consistency();
                self.read(route, op, consistency, no_forward, out);
            }
            Op::TransferLeader(ref transfer) => {
                let (target, to) = (transfer.shard, transfer.to);
                let Some((route, op)) = self.on_shard(target, route, op, no_forward) else {
                    return;
                };
                if !self.replica.is_voter(to) {
                    let message = format!("node {to} is not a voter of shard {target}");
                    self.answer(
                        &route,
                        state_machine::error(ErrorCode::InvalidArgument, &message),
                    );
                } else if !self.replica.is_leader() {
                    let leader_id = self.replica.leader_id();
                    self.not_leader(route, op, NotLeader { leader_id }, no_forward);
                } else {
                    if to != self.node.config.node_id {
                        tracing::info!(shard = target, to, "leadership transfer requested");
                        self.replica.transfer_leader(to);
                    }
                    let result = response::Result::TransferLeader(Default::default());
                    self.answer(&route, result);
                }
            }
            Op::ChangeMembership(ref change) => {
                let change = change.clone();
                if let Some((route, op)) = self.on_shard(change.shard, route, op, no_forward) {
                    self.change_membership(route, op, &change, no_forward, out);
                }
            }
            Op::OpenSession(ref open) if open.shard != self.local.shard => {
                let target = open.shard;
                // Another shard of this node, or none: `on_shard` deals with it.
                let _ = self.on_shard(target, route, op, no_forward);
            }
            Op::Put(_) | Op::Delete(_) | Op::Cas(_) | Op::OpenSession(_) => {
                let token = self.token(route.clone());
                // The operation moves into the log entry; a replica that is
                // not the leader gives it back to be forwarded.
                if let Err(refused) = self.replica.propose(token, op, route.tag) {
                    self.routes.remove(&token);
                    self.not_leader(route, refused.op, refused.not_leader, no_forward);
                }
            }
        }
    }

    /// An operation addressed to shard `target`: WRONG_SHARD if this node
    /// has no such shard, handed over if it is another shard of this node;
    /// given back when it is this shard's to serve.
    fn on_shard(
        &mut self,
        target: u32,
        route: Route,
        op: Op,
        no_forward: bool,
    ) -> Option<(Route, Op)> {
        if target >= self.node.config.shards {
            let message = format!("no shard {target}");
            self.answer(
                &route,
                state_machine::error(ErrorCode::WrongShard, &message),
            );
            None
        } else if target != self.local.shard {
            self.hand_over(target, route, op, no_forward);
            None
        } else {
            Some((route, op))
        }
    }

    pub(super) fn read(
        &mut self,
        route: Route,
        op: Op,
        consistency: Consistency,
        no_forward: bool,
        out: &mut Output,
    ) {
        let token = self.token(route.clone());
        let local =
            matches!(&op, Op::Get(get) if get.local) || matches!(&op, Op::Scan(scan) if scan.local);
        // The operation moves into the read; a refusal gives it back.
        if let Err(refused) = self.replica.read(token, op, consistency, out) {
            self.routes.remove(&token);
            self.not_leader(route, refused.op, refused.not_leader, no_forward);
        } else if local && !self.replica.is_leader() {
            self.metrics.follower_reads.inc();
        }
    }

    pub(super) fn check_sizes(&self, key: &Bytes, op: &Op) -> Result<(), response::Result> {
        let config = &self.node.config;
        if key.is_empty() {
            return Err(state_machine::error(
                ErrorCode::InvalidArgument,
                "empty key",
            ));
        }
        if key.len() > config.max_key_bytes {
            return Err(state_machine::error(
                ErrorCode::TooLarge,
                &format!(
                    "key of {} bytes exceeds max_key_bytes {}",
                    key.len(),
                    config.max_key_bytes
                ),
            ));
        }
        let value_len = match op {
            Op::Put(p) => p.value.len(),
            Op::Cas(c) => c.value.len(),
            _ => 0,
        };
        if value_len > config.max_value_bytes {
            return Err(state_machine::error(
                ErrorCode::TooLarge,
                &format!(
                    "value of {value_len} bytes exceeds max_value_bytes {}",
                    config.max_value_bytes
                ),
            ));
        }
        Ok(())
    }

    /// Sends a request of a client of this shard to the shard that owns it.
    pub(super) fn hand_over(&mut self, owner: u32, route: Route, op: Op, no_forward: bool) {
        let Dest::Client { conn, id } = route.dest else {
            // Peers dial the owning shard's port directly; anything else is a
            // confused peer.
            self.answer(
                &route,
                state_machine::error(
                    ErrorCode::WrongShard,
                    &format!("key belongs to shard {owner}"),
                ),
            );
            return;
        };
        let message = CrossCore::Request {
            origin_shard: self.local.shard,
            conn,
            request: Request {
                id,
                no_forward,
                op: Some(op),
                session_id: route.tag.session_id,
                sequence: route.tag.sequence,
                acked_below: route.tag.acked_below,
            },
        };
        if self.node.cross[owner as usize].try_send(message).is_err() {
            self.answer(
                &route,
                state_machine::error(
                    ErrorCode::Unavailable,
                    &format!("shard {owner} is overloaded"),
                ),
            );
        }
    }

    pub(super) fn not_leader(
        &mut self,
        route: Route,
        op: Op,
        not_leader: NotLeader,
        no_forward: bool,
    ) {
        let leader_id = not_leader.leader_id;
        if leader_id == 0 {
            let message = format!("shard {} has no leader right now", self.local.shard);
            self.answer(
                &route,
                state_machine::error(ErrorCode::Unavailable, &message),
            );
            return;
        }
        if no_forward || !self.links.contains_key(&leader_id) {
            let mut error = corekv_proto::client::Error {
                code: ErrorCode::NotLeader as i32,
                message: format!(
                    "node {} does not lead shard {}; node {leader_id} does",
                    self.node.config.node_id, self.local.shard
                ),
                leader_id,
                ..Default::default()
            };
            if let Some(addr) = self.client_addr_of(leader_id) {
                error.leader_addr = addr;
            }
            self.answer(&route, response::Result::Error(error));
            return;
        }
        if self.forwarded.len() >= MAX_FORWARDED_REQUESTS {
            let message = format!(
                "{MAX_FORWARDED_REQUESTS} requests of shard {} are already forwarded to the leader; try again shortly",
                self.local.shard
            );
            self.answer(
                &route,
                state_machine::error(ErrorCode::Unavailable, &message),
            );
            return;
        }
        let id = self.next_forward_id;
        self.next_forward_id += 1;
        let frame = encode_frame_bytes(&PeerFrame {
            msg: Some(peer_frame::Msg::Forward(corekv_proto::peer::Forward {
                origin_node: self.node.config.node_id,
                request: Some(Request {
                    id,
                    no_forward: true,
                    op: Some(op),
                    session_id: route.tag.session_id,
                    sequence: route.tag.sequence,
                    acked_below: route.tag.acked_below,
                }),
            })),
        });
        if self.links[&leader_id].send(frame).is_err() {
            let message = format!(
                "cannot reach leader {leader_id} of shard {}",
                self.local.shard
            );
            self.answer(
                &route,
                state_machine::error(ErrorCode::Unavailable, &message),
            );
            return;
        }
        self.forwarded
            .insert(id, (route, self.ticks + self.request_timeout_ticks));
    }

    pub(super) fn expire_forwards(&mut self) {
        let now = self.ticks;
        let expired: Vec<u64> = self
            .forwarded
            .iter()
            .filter(|(_, (_, deadline))| *deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some((route, _)) = self.forwarded.remove(&id) {
                self.answer(
                    &route,
                    state_machine::error(ErrorCode::Timeout, "the leader did not answer in time"),
                );
            }
        }
    }

    pub(super) fn token(&mut self, route: Route) -> Token {
        let token = self.next_token;
        self.next_token += 1;
        self.routes.insert(token, route);
        token
    }

    /// Seconds from `started` to the loop's current step (see `Local::clock`).
    fn elapsed_since(&self, started: std::time::Instant) -> f64 {
        self.local
            .clock
            .get()
            .saturating_duration_since(started)
            .as_secs_f64()
    }

    pub(super) fn answer(&self, route: &Route, result: response::Result) {
        if let Some(op) = route.op {
            let status = metrics::status_index(&result);
            self.metrics
                .request(op, status, self.elapsed_since(route.started));
        }
        match route.dest {
            Dest::Client { conn, id } => {
                self.send_to_conn(
                    conn,
                    &Response {
                        id,
                        result: Some(result),
                    },
                );
            }
            Dest::Forwarded { origin_node, id } => {
                let frame = encode_frame_bytes(&PeerFrame {
                    msg: Some(peer_frame::Msg::ForwardReply(ForwardReply {
                        response: Some(Response {
                            id,
                            result: Some(result),
                        }),
                    })),
                });
                if let Some(link) = self.links.get(&origin_node) {
                    // If the link is down the follower times the request out.
                    let _ = link.send(frame);
                }
            }
            Dest::CrossCore { shard, conn, id } => {
                let reply = CrossCore::Reply {
                    conn,
                    response: Response {
                        id,
                        result: Some(result),
                    },
                };
                // A full queue means the other shard is busy: wait for room
                // in a task rather than drop the answer. Such tasks are
                // bounded by the requests in flight on the other shard's
                // connections.
                if let Err(flume::TrySendError::Full(reply)) =
                    self.node.cross[shard as usize].try_send(reply)
                {
                    let to = self.node.cross[shard as usize].clone();
                    monoio::spawn(async move {
                        let _ = to.send_async(reply).await;
                    });
                }
            }
        }
    }

    pub(super) fn send_to_conn(&self, conn: ConnId, response: &Response) {
        let Some(client) = self.local.conns.borrow().get(&conn).cloned() else {
            return;
        };
        let Err(queued_bytes) = client.answer(|| encode_frame_bytes(response)) else {
            return;
        };
        // A client that does not read its answers loses its connection
        // instead of growing our memory, and costs one line at most.
        if client.cut_off(CutReason::SlowReader) {
            self.metrics.connections.closed_slow_reader.inc();
            if let Some(suppressed) = self.slow_reader_log.borrow_mut().allow(Instant::now()) {
                tracing::warn!(
                    shard = self.local.shard,
                    conn,
                    queued_bytes,
                    in_flight = client.in_flight(),
                    suppressed,
                    "client is not reading its answers; connection closed"
                );
            }
        }
    }

    /// Closes client connections that have had nothing in flight and sent
    /// nothing for `client_idle_timeout_ms`.
    pub(super) fn close_idle_connections(&mut self) {
        let timeout = self.node.config.client_idle_timeout_ms;
        if timeout == 0 {
            return;
        }
        let now = Instant::now();
        let timeout = Duration::from_millis(timeout);
        let idle: Vec<_> = self
            .local
            .conns
            .borrow()
            .values()
            .filter(|c| c.idle_for(timeout, now))
            .cloned()
            .collect();
        for client in idle {
            if client.cut_off(CutReason::Idle) {
                self.metrics.connections.closed_idle.inc();
            }
        }
    }
}
