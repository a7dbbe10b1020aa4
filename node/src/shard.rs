//! The shard: one thread, one monoio runtime, one Raft group.
//!
//! This is the I/O shell around the sans-IO [`Replica`]. Tasks for
//! connections, the tick timer, cross-core traffic and the WAL sync push
//! inputs into the [`Inbox`]; the loop drains the inbox, feeds the replica,
//! and carries out its [`Output`]: messages go to peer links (one frame per
//! peer per turn), replies to their connections, the sync to io_uring.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use corekv_proto::client::{
    request::Op, response, Consistency, ErrorCode, NodeInfo, Request, Response, StatusResult,
    TopologyResult,
};
use corekv_proto::peer::{peer_frame, ForwardReply, Hello, LinkKind, PeerFrame, RaftBatch};
use corekv_transport::{
    accept_peer, configure_stream, decode_message, encode_frame_bytes, spawn_writer, FrameError,
    FrameReader, FrameSender, LinkEvent, PeerLink, PeerLinkConfig,
};
use corekv_wal::{SyncOutcome, Wal, WalOptions};
use monoio::io::Splitable;
use monoio::net::TcpListener;
use protobuf::Message as _;
use raft::prelude::Message;

use crate::inbox::Inbox;
use crate::metrics::{self, ShardMetrics};
use crate::node::{CrossCore, NodeShared};
use crate::replica::{LoadedSnapshot, NotLeader, Output, Replica, ReplicaOptions, Token};
use crate::snapshot::{self, SnapshotMeta};
use crate::snapshot_transfer;
use crate::state_machine;

/// Identifies a client connection within its shard.
type ConnId = u64;

/// Upper bound on bytes queued for one connection before sends fail.
const MAX_CONN_QUEUE_BYTES: usize = 64 << 20;
/// Upper bound on bytes queued for one peer link.
const MAX_LINK_QUEUE_BYTES: usize = 256 << 20;
/// How often (in ticks) a leader checks whether another node should lead.
const BALANCE_EVERY_TICKS: u64 = 50;
/// Ticks to wait after a balancing transfer before considering another.
const BALANCE_BACKOFF_TICKS: u64 = 3000;
/// Pause after a failed accept before trying again.
const ACCEPT_RETRY: Duration = Duration::from_millis(10);
/// How long a stopping leader waits for its successor to take over.
const LEADER_HANDOFF_GRACE: Duration = Duration::from_secs(3);
/// Upper bound on how long a stopping shard waits for its last sync and answers.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How long an inbound peer gets to send its Hello.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the answer to a request must go, and what to count it as.
#[derive(Clone, Debug)]
struct Route {
    dest: Dest,
    /// Index into `metrics::OPS`; None for a request without an operation.
    op: Option<usize>,
    started: Instant,
}

impl Route {
    fn new(dest: Dest, request: &Request) -> Route {
        Route {
            dest,
            op: request.op.as_ref().map(metrics::op_index),
            started: Instant::now(),
        }
    }
}

/// Who asked.
#[derive(Clone, Debug)]
enum Dest {
    /// A client connection of this shard, with the client's request id.
    Client { conn: ConnId, id: u64 },
    /// A follower that forwarded the request to us, with its forward id.
    Forwarded { origin_node: u64, id: u64 },
    /// A client connection of another shard of this node.
    CrossCore { shard: u32, conn: ConnId, id: u64 },
}

/// Everything the shard loop reacts to.
pub enum Input {
    Tick,
    Raft(Box<Message>),
    Client {
        conn: ConnId,
        request: Request,
    },
    ConnClosed(ConnId),
    Forward {
        origin_node: u64,
        request: Request,
    },
    ForwardReply(Response),
    CrossCore(CrossCore),
    Synced {
        outcome: SyncOutcome,
        started: Instant,
    },
    Link {
        peer: u64,
        event: LinkEvent,
    },
    SnapshotSent {
        peer: u64,
        result: Result<(), String>,
    },
    SnapshotReceived(Box<snapshot_transfer::Incoming>),
}

/// Shard-local state shared between the loop and its tasks.
struct Local {
    shard: u32,
    inbox: Inbox<Input>,
    conns: RefCell<HashMap<ConnId, FrameSender>>,
    next_conn: Cell<ConnId>,
}

struct Shard {
    local: Rc<Local>,
    node: Arc<NodeShared>,
    replica: Replica,
    links: HashMap<u64, PeerLink>,
    /// Requests answered through a token, by token.
    routes: HashMap<Token, Route>,
    next_token: Token,
    /// Requests forwarded to the leader, by forward id, with the tick they expire at.
    forwarded: HashMap<u64, (Route, u64)>,
    next_forward_id: u64,
    ticks: u64,
    request_timeout_ticks: u64,
    last_role: Option<(raft::StateRole, u64)>,
    metrics: ShardMetrics,
    /// raft_rpc_call_total handles by (peer, success), created on first use.
    rpc_counters: HashMap<(u64, bool), prometheus_client::metrics::counter::Counter>,
    /// Links that have been up at least once (a later Up is a reconnect).
    links_seen_up: std::collections::HashSet<u64>,
    /// Per peer, the link's dropped-frame count already added to
    /// transport_frames_dropped_total.
    dropped_reported: HashMap<u64, u64>,
    wal_bytes_reported: u64,
    snap_dir: std::path::PathBuf,
    /// Set once SIGTERM arrived: the deadline for handing leadership away.
    stopping: Option<Instant>,
    /// No leadership balancing before this tick (back-off after an attempt).
    next_balance_tick: u64,
    /// Peers a snapshot is being sent to right now.
    snapshots_sending: std::collections::HashSet<u64>,
}

/// Runs shard `shard` until the node shuts down. Called on the shard's own
/// thread inside its monoio runtime.
/// Upper bound on the entries one append message carries (raft-rs
/// `max_size_per_msg`): a catching-up follower gets the log in 1 MiB steps.
const MAX_APPEND_BYTES: u64 = 1 << 20;

/// Append messages a leader keeps in flight per follower (raft-rs
/// `max_inflight_msgs`). One: a follower acknowledges only after its WAL
/// sync, and it has one sync in flight anyway, so what the leader proposes
/// meanwhile waits for the acknowledgement and then travels as one batch
/// instead of one small message per loop turn. Measured at W64 (3-node dev
/// cluster, 64 clients, same machine, runs interleaved): 13.2-14.0k puts/s at
/// 92-96 us cluster CPU per put with 256, 13.9-14.6k at 83-87 us with 1.
const MAX_INFLIGHT_APPENDS: usize = 1;

pub async fn run(
    shard: u32,
    node: Arc<NodeShared>,
    cross_rx: flume::Receiver<CrossCore>,
) -> anyhow::Result<()> {
    let config = &node.config;
    let wal_dir = config
        .data_dir
        .join(format!("shard-{shard:03}"))
        .join("wal");
    let wal = Wal::open(
        &wal_dir,
        WalOptions {
            segment_bytes: config.wal_segment_bytes,
            shard_id: shard,
        },
    )?;
    if let Some((file, offset)) = &wal.recovery().torn_tail {
        tracing::warn!(shard, file = %file.display(), offset, "WAL tail repaired: torn record cut off");
    }
    let snap_dir = snapshot_dir(&config.data_dir, shard);
    // Start-up, before the shard serves: reading the snapshot here blocks nobody.
    let loaded = snapshot::load_latest(&snap_dir).map(|(meta, map, path)| {
        tracing::info!(shard, index = meta.index, term = meta.term, file = %path.display(), "snapshot loaded");
        LoadedSnapshot { meta, map }
    });
    let tick_ms = config.tick_ms.max(1);
    let request_timeout_ticks = config.request_timeout_ms.div_ceil(tick_ms).max(1);
    let replica = Replica::open(
        wal,
        ReplicaOptions {
            node_id: config.node_id,
            shard,
            voters: config.peers.iter().map(|p| p.id).collect(),
            heartbeat_ticks: config.heartbeat_ticks,
            election_ticks: config.election_ticks,
            request_timeout_ticks,
            max_size_per_msg: MAX_APPEND_BYTES,
            max_inflight_msgs: MAX_INFLIGHT_APPENDS,
            snapshot_entries: config.snapshot_entries,
            snapshot_bytes: config.snapshot_bytes,
        },
        loaded,
    )?;
    let local = Rc::new(Local {
        shard,
        inbox: Inbox::default(),
        conns: RefCell::new(HashMap::new()),
        next_conn: Cell::new(1),
    });

    let client_addr = listen_addr(&config.listen_host, config.client_port, shard)?;
    let peer_addr = listen_addr(&config.listen_host, config.peer_port, shard)?;
    // monoio turns SO_REUSEPORT on by default: a second process (or a
    // misconfigured node) could then bind the same port and silently take
    // half of its connections. Exclusive ports make that a start-up error.
    let exclusive = monoio::net::ListenerOpts::new().reuse_port(false);
    let client_listener = TcpListener::bind_with_config(client_addr, &exclusive).map_err(|e| {
        anyhow::anyhow!("shard {shard}: cannot listen for clients on {client_addr}: {e}")
    })?;
    let peer_listener = TcpListener::bind_with_config(peer_addr, &exclusive).map_err(|e| {
        anyhow::anyhow!("shard {shard}: cannot listen for peers on {peer_addr}: {e}")
    })?;
    // FusionDriver picks io_uring when the kernel allows it, epoll otherwise.
    let driver = if monoio::utils::detect_uring() {
        "io_uring"
    } else {
        "epoll"
    };
    tracing::info!(shard, %client_addr, %peer_addr, driver, "shard listening");

    monoio::spawn(accept_clients(client_listener, local.clone(), node.clone()));
    monoio::spawn(accept_peers(peer_listener, local.clone(), node.clone()));
    monoio::spawn(tick(local.clone(), Duration::from_millis(tick_ms)));
    monoio::spawn(receive_cross_core(local.clone(), cross_rx));

    let mut links = HashMap::new();
    for peer in config.peers.iter().filter(|p| p.id != config.node_id) {
        let addr = resolve(&peer.host, peer.peer_port, shard)?;
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
            socket: node.socket_options(),
            max_queue_bytes: MAX_LINK_QUEUE_BYTES,
            max_frame_bytes: config.max_frame_bytes,
            backoff_initial: Duration::from_millis(10),
            backoff_max: Duration::from_secs(1),
        };
        let events = local.clone();
        let peer_id = peer.id;
        let on_event: Rc<dyn Fn(LinkEvent)> = Rc::new(move |event| {
            events.inbox.push(Input::Link {
                peer: peer_id,
                event,
            })
        });
        links.insert(peer.id, PeerLink::start(link_config, on_event));
    }

    let node_metrics = node.metrics.shard(shard);
    let mut shard_loop = Shard {
        local,
        node,
        replica,
        links,
        routes: HashMap::new(),
        next_token: 1,
        forwarded: HashMap::new(),
        next_forward_id: 1,
        ticks: 0,
        request_timeout_ticks,
        last_role: None,
        metrics: node_metrics,
        rpc_counters: HashMap::new(),
        links_seen_up: Default::default(),
        wal_bytes_reported: 0,
        dropped_reported: HashMap::new(),
        snap_dir,
        snapshots_sending: Default::default(),
        stopping: None,
        next_balance_tick: 0,
    };
    shard_loop.run().await
}

impl Shard {
    async fn run(&mut self) -> anyhow::Result<()> {
        let mut batch = Vec::new();
        let mut out = Output::default();
        loop {
            // 1. Wait for anything, then take everything that is there.
            self.local.inbox.drain_into(&mut batch).await;
            let turn_started = Instant::now();
            // 2. Feed it all to the replica; proposals only queue up.
            for input in batch.drain(..) {
                if self.handle_input(input, &mut out)?.is_some() {
                    self.begin_stopping();
                }
            }
            // A stopping leader keeps running until its successor took over
            // (or the grace time ran out), so clients see no election gap.
            if let Some(deadline) = self.stopping {
                if !self.replica.is_leader() || Instant::now() >= deadline {
                    self.dispatch(&mut out);
                    return self.shutdown(()).await;
                }
            }
            // 3. This turn's proposals enter raft as one batch; reads share one round.
            self.replica.flush(&mut out);
            // 4. One Ready: send, apply, append, queue persisted messages behind the sync.
            self.replica.handle_ready(&mut out)?;
            // 5. Carry out what the replica asked for; the writer tasks send
            //    everything queued now in one write per connection.
            self.dispatch(&mut out);
            self.publish_status();
            self.metrics
                .loop_turn
                .observe(turn_started.elapsed().as_secs_f64());
        }
    }

    fn handle_input(&mut self, input: Input, out: &mut Output) -> anyhow::Result<Option<()>> {
        match input {
            Input::Tick => {
                self.ticks += 1;
                self.replica.tick(out);
                self.expire_forwards();
                if self.ticks % BALANCE_EVERY_TICKS == 0 {
                    self.balance_leadership();
                }
            }
            Input::Raft(message) => self.replica.step(*message),
            Input::Client { conn, request } => {
                let route = Route::new(
                    Dest::Client {
                        conn,
                        id: request.id,
                    },
                    &request,
                );
                let no_forward = request.no_forward;
                self.handle_request(route, request, no_forward, out);
            }
            Input::ConnClosed(conn) => {
                self.local.conns.borrow_mut().remove(&conn);
            }
            Input::Forward {
                origin_node,
                request,
            } => {
                let route = Route::new(
                    Dest::Forwarded {
                        origin_node,
                        id: request.id,
                    },
                    &request,
                );
                // A forwarded request is never forwarded again, so a stale
                // leader hint cannot make it loop.
                self.handle_request(route, request, true, out);
            }
            Input::ForwardReply(response) => {
                if let Some((route, _)) = self.forwarded.remove(&response.id) {
                    self.answer(
                        &route,
                        response.result.unwrap_or_else(|| {
                            state_machine::error(ErrorCode::Internal, "empty forward reply")
                        }),
                    );
                }
            }
            Input::CrossCore(message) => match message {
                CrossCore::Request {
                    origin_shard,
                    conn,
                    request,
                } => {
                    let route = Route::new(
                        Dest::CrossCore {
                            shard: origin_shard,
                            conn,
                            id: request.id,
                        },
                        &request,
                    );
                    let no_forward = request.no_forward;
                    self.handle_request(route, request, no_forward, out);
                }
                CrossCore::Reply { conn, response } => self.send_to_conn(conn, &response),
                CrossCore::Shutdown => return Ok(Some(())),
                CrossCore::SnapshotWritten(result) => {
                    let result = result.map(|(meta, path)| {
                        tracing::info!(shard = self.local.shard, index = meta.index, term = meta.term, file = %path.display(), "snapshot created");
                        meta
                    });
                    self.replica.on_snapshot_written(result)?;
                }
            },
            Input::Synced { outcome, started } => {
                let elapsed = started.elapsed();
                self.metrics.fsync.observe(elapsed.as_secs_f64());
                if elapsed > self.node.config.slow_fsync() {
                    tracing::warn!(
                        shard = self.local.shard,
                        elapsed_ms = elapsed.as_millis() as u64,
                        "slow fsync"
                    );
                }
                self.replica.on_synced(outcome, out)?;
            }
            Input::SnapshotSent { peer, result } => {
                self.snapshots_sending.remove(&peer);
                match &result {
                    Ok(()) => {
                        self.metrics.snapshots_sent.inc();
                        tracing::info!(shard = self.local.shard, peer, "snapshot sent");
                    }
                    Err(reason) => {
                        tracing::warn!(shard = self.local.shard, peer, %reason, "snapshot transfer failed")
                    }
                }
                self.replica.report_snapshot(peer, result.is_ok());
            }
            Input::SnapshotReceived(incoming) => {
                let incoming = *incoming;
                tracing::info!(
                    shard = self.local.shard,
                    index = incoming.snapshot.meta.index,
                    term = incoming.snapshot.meta.term,
                    "snapshot received and verified"
                );
                self.metrics.snapshots_received.inc();
                self.replica
                    .receive_snapshot(incoming.snapshot, incoming.message);
            }
            Input::Link { peer, event } => match event {
                LinkEvent::Up => {
                    if !self.links_seen_up.insert(peer) {
                        self.metrics.reconnects(peer).inc();
                        self.replica.peer_reconnected(peer);
                    }
                    tracing::info!(shard = self.local.shard, peer, "connection up");
                }
                LinkEvent::Down { reason } => {
                    self.report_dropped_frames(peer);
                    tracing::warn!(shard = self.local.shard, peer, %reason, "connection lost");
                    self.replica.report_unreachable(peer);
                }
                LinkEvent::Rejected { reason } => {
                    tracing::error!(shard = self.local.shard, peer, %reason, "peer rejected our hello");
                    self.replica.report_unreachable(peer);
                }
            },
        }
        Ok(None)
    }

    fn handle_request(
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
            Op::Scan(_) | Op::Topology(_) | Op::Status(_) | Op::TransferLeader(_) => None,
        };
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
                if target >= self.node.config.shards {
                    let message = format!("no shard {target}");
                    self.answer(
                        &route,
                        state_machine::error(ErrorCode::WrongShard, &message),
                    );
                } else if target != self.local.shard {
                    self.hand_over(target, route, op, no_forward);
                } else if !self.replica.is_voter(to) {
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
            Op::Put(_) | Op::Delete(_) | Op::Cas(_) => {
                let token = self.token(route.clone());
                if let Err(not_leader) = self.replica.propose(token, op.clone()) {
                    self.routes.remove(&token);
                    self.not_leader(route, op, not_leader, no_forward);
                }
            }
        }
    }

    fn read(
        &mut self,
        route: Route,
        op: Op,
        consistency: Consistency,
        no_forward: bool,
        out: &mut Output,
    ) {
        let token = self.token(route.clone());
        if let Err(not_leader) = self.replica.read(token, op.clone(), consistency, out) {
            self.routes.remove(&token);
            self.not_leader(route, op, not_leader, no_forward);
        }
    }

    fn check_sizes(&self, key: &Bytes, op: &Op) -> Result<(), response::Result> {
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
    fn hand_over(&mut self, owner: u32, route: Route, op: Op, no_forward: bool) {
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

    fn not_leader(&mut self, route: Route, op: Op, not_leader: NotLeader, no_forward: bool) {
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
            if let Some(peer) = self.node.config.peer(leader_id) {
                error.leader_addr = format!(
                    "{}:{}",
                    peer.host,
                    u32::from(peer.client_port) + self.local.shard
                );
            }
            self.answer(&route, response::Result::Error(error));
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

    fn expire_forwards(&mut self) {
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

    fn token(&mut self, route: Route) -> Token {
        let token = self.next_token;
        self.next_token += 1;
        self.routes.insert(token, route);
        token
    }

    fn dispatch(&mut self, out: &mut Output) {
        self.handle_snapshot_outputs(out);
        self.metrics
            .proposals
            .inc_by(std::mem::take(&mut out.proposals));
        self.metrics
            .proposals_dropped
            .inc_by(std::mem::take(&mut out.proposals_dropped));
        for reply in out.replies.drain(..) {
            if let Some(route) = self.routes.remove(&reply.token) {
                self.answer(&route, reply.result);
            }
        }
        self.send_messages(&mut out.messages);
        if let Some(job) = out.sync.take() {
            let local = self.local.clone();
            let shard = self.local.shard;
            monoio::spawn(async move {
                let started = Instant::now();
                tracing::trace!(shard, "WAL sync started");
                let outcome = job.run().await;
                tracing::trace!(shard, ok = outcome.is_ok(), "WAL sync finished");
                local.inbox.push(Input::Synced { outcome, started });
            });
        }
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
                    // The first leaders of a new cluster (term 1) are placed at
                    // once; after a failover or an operator's transfer the new
                    // leader keeps the shard for a while before balancing.
                    let delay = if change.term <= 1 {
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
                    role_name(change.role)
                );
            }
        }
    }

    /// One RaftBatch frame per destination per turn, in raft's order.
    fn send_messages(&mut self, messages: &mut Vec<Message>) {
        if messages.is_empty() {
            return;
        }
        let mut by_peer: Vec<(u64, Vec<Bytes>)> = Vec::new();
        for message in messages.drain(..) {
            if message.get_msg_type() == raft::prelude::MessageType::MsgSnapshot {
                self.start_snapshot_transfer(message);
                continue;
            }
            let bytes = match message.write_to_bytes() {
                Ok(bytes) => Bytes::from(bytes),
                Err(e) => {
                    tracing::error!(shard = self.local.shard, error = %e, "cannot encode raft message");
                    continue;
                }
            };
            match by_peer.iter_mut().find(|(to, _)| *to == message.to) {
                Some((_, batch)) => batch.push(bytes),
                None => by_peer.push((message.to, vec![bytes])),
            }
        }
        for (to, batch) in by_peer {
            let Some(link) = self.links.get(&to) else {
                continue;
            };
            let frame = encode_frame_bytes(&PeerFrame {
                msg: Some(peer_frame::Msg::Raft(RaftBatch { messages: batch })),
            });
            let result = link.send(frame);
            let success = result.is_ok();
            self.rpc_counters
                .entry((to, success))
                .or_insert_with(|| self.metrics.rpc(to, success))
                .inc();
            match result {
                Ok(()) => {}
                // The link counted it (it was down).
                Err(corekv_transport::SendError::Down) => self.report_dropped_frames(to),
                Err(_) => {
                    self.metrics.frames_dropped(to).inc();
                }
            }
            if !success {
                self.replica.report_unreachable(to);
            }
        }
    }

    /// Brings transport_frames_dropped_total up to the link's own count:
    /// frames refused while it was down and frames still queued when a
    /// connection was lost.
    fn report_dropped_frames(&mut self, peer: u64) {
        let Some(link) = self.links.get(&peer) else {
            return;
        };
        let total = link.dropped_frames();
        let reported = self.dropped_reported.entry(peer).or_default();
        if total > *reported {
            self.metrics.frames_dropped(peer).inc_by(total - *reported);
            *reported = total;
        }
    }

    /// Streams the snapshot raft wants `message.to` to have, on a
    /// connection of its own, so heartbeats never wait behind it.
    fn start_snapshot_transfer(&mut self, message: Message) {
        let to = message.to;
        let metadata = message.get_snapshot().get_metadata();
        let path = self
            .snap_dir
            .join(snapshot::file_name(metadata.index, metadata.term));
        let peer = self.node.config.peer(to).cloned();
        let (Some(peer), false) = (peer, self.snapshots_sending.contains(&to)) else {
            return;
        };
        let addr = match resolve(&peer.host, peer.peer_port, self.local.shard) {
            Ok(addr) => addr,
            Err(e) => {
                tracing::warn!(shard = self.local.shard, peer = to, error = %e, "cannot send snapshot");
                self.replica.report_snapshot(to, false);
                return;
            }
        };
        let meta = SnapshotMeta {
            shard: self.local.shard,
            index: metadata.index,
            term: metadata.term,
            ..Default::default()
        };
        tracing::info!(
            shard = self.local.shard,
            peer = to,
            index = meta.index,
            "sending snapshot"
        );
        self.snapshots_sending.insert(to);
        let config = &self.node.config;
        let outgoing = snapshot_transfer::Outgoing {
            addr,
            hello: Hello {
                cluster_id: config.cluster_id,
                node_id: config.node_id,
                shard: self.local.shard,
                protocol_version: corekv_proto::PEER_PROTOCOL_VERSION,
                shards: config.shards,
                kind: LinkKind::Snapshot as i32,
            },
            socket: self.node.socket_options(),
            max_frame_bytes: config.max_frame_bytes,
            path,
            meta,
            message,
        };
        let local = self.local.clone();
        monoio::spawn(async move {
            let result = snapshot_transfer::send(outgoing).await;
            local.inbox.push(Input::SnapshotSent { peer: to, result });
        });
    }

    /// Hands blocking snapshot work (writing one, deleting what it made
    /// obsolete) to helper threads.
    fn handle_snapshot_outputs(&mut self, out: &mut Output) {
        if let Some((meta, map)) = out.snapshot_to_write.take() {
            let dir = self.snap_dir.clone();
            let reply = self.node.cross[self.local.shard as usize].clone();
            let shard = self.local.shard;
            let spawned = std::thread::Builder::new()
                .name(format!("corekv-snap-{shard}"))
                .spawn(move || {
                    let result = snapshot::write(&dir, &meta, &map)
                        .map(|path| (meta, path))
                        .map_err(|e| e.to_string());
                    // Dropping the map here, off the shard thread, frees what
                    // the shard no longer shares.
                    drop(map);
                    let _ = reply.send(CrossCore::SnapshotWritten(result));
                });
            if let Err(e) = spawned {
                let _ = self.replica.on_snapshot_written(Err(e.to_string()));
            }
        }
        if let Some(meta) = out.snapshot_installed.take() {
            tracing::info!(
                shard = self.local.shard,
                index = meta.index,
                term = meta.term,
                "snapshot applied"
            );
        }
        let obsolete = self.replica.take_obsolete_segments();
        if !obsolete.is_empty() {
            let dir = self.snap_dir.clone();
            let shard = self.local.shard;
            let _ = std::thread::Builder::new()
                .name(format!("corekv-compact-{shard}"))
                .spawn(move || {
                    let count = obsolete.len();
                    match corekv_wal::remove_segments(obsolete) {
                        Ok(()) => tracing::info!(shard, segments = count, "WAL compacted"),
                        Err(e) => tracing::warn!(shard, error = %e, "cannot delete WAL segments"),
                    }
                    snapshot::prune(&dir);
                });
        }
    }

    fn answer(&self, route: &Route, result: response::Result) {
        if let Some(op) = route.op {
            let status = metrics::status_index(&result);
            self.metrics
                .request(op, status, route.started.elapsed().as_secs_f64());
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
                if self.node.cross[shard as usize].try_send(reply).is_err() {
                    tracing::warn!(
                        shard = self.local.shard,
                        to_shard = shard,
                        "cross-core queue full, reply dropped"
                    );
                }
            }
        }
    }

    fn send_to_conn(&self, conn: ConnId, response: &Response) {
        let conns = self.local.conns.borrow();
        if let Some(sender) = conns.get(&conn) {
            if sender.send(encode_frame_bytes(response)).is_err() {
                // A client that does not read its answers loses its connection
                // instead of growing our memory.
                tracing::warn!(
                    shard = self.local.shard,
                    conn,
                    "client send queue full, closing connection"
                );
                sender.close();
            }
        }
    }

    fn topology(&self) -> TopologyResult {
        let config = &self.node.config;
        TopologyResult {
            cluster_id: config.cluster_id,
            shards: config.shards,
            nodes: config
                .peers
                .iter()
                .map(|p| NodeInfo {
                    node_id: p.id,
                    host: p.host.clone(),
                    client_port: u32::from(p.client_port),
                    peer_port: u32::from(p.peer_port),
                })
                .collect(),
            leaders: self
                .node
                .status()
                .shards
                .iter()
                .map(|s| s.leader_id)
                .collect(),
        }
    }

    fn publish_status(&mut self) {
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
        let written = wal.bytes_written();
        m.wal_bytes
            .inc_by(written.saturating_sub(self.wal_bytes_reported));
        self.wal_bytes_reported = written;
        let mut slot = self.node.shard_status[self.local.shard as usize]
            .lock()
            .expect("status lock poisoned");
        *slot = status;
    }

    /// Spreads leadership over the nodes: shard `s` prefers the `s`-th voter
    /// (by id, wrapping), so every node leads about shards/nodes groups and
    /// the write load is shared. A leader that is not the preferred one hands
    /// over once the preferred node is connected and fully caught up; after
    /// an attempt it waits before trying again, so a flaky node cannot make
    /// leadership flap.
    fn balance_leadership(&mut self) {
        if self.stopping.is_some()
            || !self.replica.is_leader()
            || self.ticks < self.next_balance_tick
        {
            return;
        }
        let mut voters: Vec<u64> = self.node.config.peers.iter().map(|p| p.id).collect();
        voters.sort_unstable();
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
    fn begin_stopping(&mut self) {
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
    async fn shutdown(&mut self, _: ()) -> anyhow::Result<()> {
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
        let conns: Vec<FrameSender> = self.local.conns.borrow().values().cloned().collect();
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

fn role_name(role: raft::StateRole) -> &'static str {
    match role {
        raft::StateRole::Follower => "follower",
        raft::StateRole::Candidate => "candidate",
        raft::StateRole::Leader => "leader",
        raft::StateRole::PreCandidate => "pre_candidate",
    }
}

/// Where shard `shard` keeps its snapshot files.
fn snapshot_dir(data_dir: &std::path::Path, shard: u32) -> std::path::PathBuf {
    data_dir.join(format!("shard-{shard:03}")).join("snap")
}

fn listen_addr(host: &str, base_port: u16, shard: u32) -> anyhow::Result<SocketAddr> {
    resolve(host, base_port, shard)
}

/// `host:(base_port + shard)` as a socket address. Resolution happens at
/// start-up, never on the hot path.
fn resolve(host: &str, base_port: u16, shard: u32) -> anyhow::Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    let port = u32::from(base_port) + shard;
    let port = u16::try_from(port)
        .map_err(|_| anyhow::anyhow!("port {base_port} + shard {shard} exceeds 65535"))?;
    (host, port)
        .to_socket_addrs()
        .map_err(|e| anyhow::anyhow!("cannot resolve {host}:{port}: {e}"))?
        .next()
        .ok_or_else(|| anyhow::anyhow!("{host}:{port} resolves to no address"))
}

async fn tick(local: Rc<Local>, every: Duration) {
    let mut interval = monoio::time::interval(every);
    loop {
        interval.tick().await;
        local.inbox.push(Input::Tick);
    }
}

async fn receive_cross_core(local: Rc<Local>, rx: flume::Receiver<CrossCore>) {
    while let Ok(message) = rx.recv_async().await {
        local.inbox.push(Input::CrossCore(message));
    }
}

/// The next accepted connection, with our socket options set. An accept
/// error (say, out of file descriptors) is logged and retried after a short
/// pause, so a persistent one cannot spin the shard thread.
async fn next_connection(
    listener: &TcpListener,
    local: &Local,
    node: &NodeShared,
) -> (monoio::net::TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((stream, remote)) => {
                if let Err(e) = configure_stream(&stream, &node.socket_options()) {
                    tracing::warn!(shard = local.shard, %remote, error = %e, "cannot set socket options");
                }
                return (stream, remote);
            }
            Err(e) => {
                tracing::warn!(shard = local.shard, error = %e, "accept failed");
                monoio::time::sleep(ACCEPT_RETRY).await;
            }
        }
    }
}

async fn accept_clients(listener: TcpListener, local: Rc<Local>, node: Arc<NodeShared>) {
    loop {
        let (stream, remote) = next_connection(&listener, &local, &node).await;
        let conn = local.next_conn.get();
        local.next_conn.set(conn + 1);
        let (read_half, write_half) = stream.into_split();
        let sender = spawn_writer(write_half, MAX_CONN_QUEUE_BYTES);
        local.conns.borrow_mut().insert(conn, sender.clone());
        monoio::spawn(read_client(
            FrameReader::new(read_half, node.config.max_frame_bytes),
            conn,
            remote,
            sender,
            local.clone(),
        ));
    }
}

async fn read_client<R: monoio::io::AsyncReadRent>(
    mut reader: FrameReader<R>,
    conn: ConnId,
    remote: SocketAddr,
    sender: FrameSender,
    local: Rc<Local>,
) {
    loop {
        let frame = match reader.next_frame().await {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(e) => {
                refuse_client(&sender, &e);
                tracing::info!(shard = local.shard, %remote, error = %e, "closing client connection");
                break;
            }
        };
        match decode_message::<Request>(frame) {
            Ok(request) => local.inbox.push(Input::Client { conn, request }),
            Err(e) => {
                refuse_client(&sender, &e);
                tracing::info!(shard = local.shard, %remote, error = %e, "closing client connection: undecodable request");
                break;
            }
        }
    }
    sender.close();
    local.inbox.push(Input::ConnClosed(conn));
}

/// Tells a client why its connection is about to close.
fn refuse_client(sender: &FrameSender, error: &FrameError) {
    let code = match error {
        FrameError::FrameTooLarge { .. } => ErrorCode::TooLarge,
        _ => ErrorCode::InvalidArgument,
    };
    let response = Response {
        id: 0,
        result: Some(state_machine::error(code, &error.to_string())),
    };
    let _ = sender.send(encode_frame_bytes(&response));
}

async fn accept_peers(listener: TcpListener, local: Rc<Local>, node: Arc<NodeShared>) {
    loop {
        let (stream, remote) = next_connection(&listener, &local, &node).await;
        monoio::spawn(serve_peer(stream, remote, local.clone(), node.clone()));
    }
}

async fn serve_peer(
    stream: monoio::net::TcpStream,
    remote: SocketAddr,
    local: Rc<Local>,
    node: Arc<NodeShared>,
) {
    let config = &node.config;
    let shard = local.shard;
    let check = |hello: &Hello| check_hello(hello, &node, shard);
    // The write half stays alive while we read: dropping it would shut the
    // socket down for writing and the dialer would see a closed link.
    let (hello, mut reader, write_half) = match accept_peer(
        stream,
        config.node_id,
        config.max_frame_bytes,
        HANDSHAKE_TIMEOUT,
        check,
    )
    .await
    {
        Ok(accepted) => accepted,
        Err(e) => {
            tracing::warn!(shard, %remote, error = %e, "peer handshake refused");
            return;
        }
    };
    let peer = hello.node_id;
    if hello.kind == LinkKind::Snapshot as i32 {
        let dir = snapshot_dir(&config.data_dir, shard);
        match snapshot_transfer::receive(reader, write_half, shard, dir).await {
            Ok(incoming) => local
                .inbox
                .push(Input::SnapshotReceived(Box::new(incoming))),
            Err(reason) => tracing::warn!(shard, peer, %reason, "snapshot from leader refused"),
        }
        return;
    }
    tracing::info!(shard, peer, %remote, "peer connected");
    loop {
        let frame = match reader.next_frame().await {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(shard, peer, error = %e, "closing peer connection");
                break;
            }
        };
        let frame = match decode_message::<PeerFrame>(frame) {
            Ok(frame) => frame,
            Err(e) => {
                tracing::warn!(shard, peer, error = %e, "closing peer connection: undecodable frame");
                break;
            }
        };
        match frame.msg {
            Some(peer_frame::Msg::Raft(batch)) => {
                for bytes in batch.messages {
                    match Message::parse_from_carllerche_bytes(&bytes) {
                        Ok(message) => local.inbox.push(Input::Raft(Box::new(message))),
                        Err(e) => {
                            tracing::warn!(shard, peer, error = %e, "undecodable raft message dropped")
                        }
                    }
                }
            }
            Some(peer_frame::Msg::Forward(forward)) => {
                if let Some(request) = forward.request {
                    local.inbox.push(Input::Forward {
                        origin_node: forward.origin_node,
                        request,
                    });
                }
            }
            Some(peer_frame::Msg::ForwardReply(reply)) => {
                if let Some(response) = reply.response {
                    local.inbox.push(Input::ForwardReply(response));
                }
            }
            _ => tracing::debug!(shard, peer, "unexpected peer frame ignored"),
        }
    }
    drop(write_half);
    tracing::info!(shard, peer, "peer disconnected");
}

fn check_hello(hello: &Hello, node: &NodeShared, shard: u32) -> Result<(), String> {
    let config = &node.config;
    if hello.cluster_id != config.cluster_id {
        return Err(format!(
            "cluster id mismatch: mine {}, yours {}",
            config.cluster_id, hello.cluster_id
        ));
    }
    if hello.shards != config.shards {
        return Err(format!(
            "shard count mismatch: mine {}, yours {}",
            config.shards, hello.shards
        ));
    }
    if hello.shard != shard {
        return Err(format!(
            "wrong shard: this port serves shard {shard}, you asked for {}",
            hello.shard
        ));
    }
    if hello.protocol_version != corekv_proto::PEER_PROTOCOL_VERSION {
        return Err(format!(
            "protocol version mismatch: mine {}, yours {}",
            corekv_proto::PEER_PROTOCOL_VERSION,
            hello.protocol_version
        ));
    }
    if hello.node_id == config.node_id || config.peer(hello.node_id).is_none() {
        let ids: Vec<u64> = config.peers.iter().map(|p| p.id).collect();
        return Err(format!(
            "unknown node id {}: members are {ids:?}",
            hello.node_id
        ));
    }
    Ok(())
}

/// Answers `Status` for the whole node from every shard's published status.
impl NodeShared {
    /// This node's status, one entry per shard.
    pub fn status(&self) -> StatusResult {
        StatusResult {
            node_id: self.config.node_id,
            shards: self
                .shard_status
                .iter()
                .map(|slot| *slot.lock().expect("status lock poisoned"))
                .collect(),
        }
    }
}
