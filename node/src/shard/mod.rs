//! The shard: one thread, one monoio runtime, one Raft group.
//!
//! This is the I/O shell around the sans-IO [`Replica`]. Tasks for
//! connections, the tick timer, cross-core traffic and the WAL sync push
//! inputs into the [`Inbox`]; the loop drains the inbox, feeds the replica,
//! and carries out its [`Output`]: messages go to peer links (one frame per
//! peer per turn), replies to their connections, the sync to io_uring.

mod addr;
mod client_conn;
mod connections;
mod inputs;
mod lifecycle;
mod members;
mod peer_input;
mod routing;
mod snapshots;
mod turn_usage;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use corekv_proto::client::ErrorCode;
use corekv_proto::peer::{peer_frame, PeerFrame, RaftBatch};
use corekv_transport::{encode_frame_bytes, LinkEvent, PeerLink};
use corekv_wal::{Wal, WalOptions};
use monoio::net::TcpListener;
use protobuf::Message as _;
use raft::prelude::Message;

use crate::data_dir;
use crate::helper::Helper;
use crate::inbox::Inbox;
use crate::log_limit::LogLimit;
use crate::metrics::ShardMetrics;
use crate::replica::{LoadedSnapshot, Output, Replica, ReplicaOptions, Token};
use crate::shared::{CrossCore, NodeShared};
use crate::snapshot;
use crate::state_machine;

use addr::resolve;
use connections::{accept_clients, accept_peers, receive_cross_core, tick};
use inputs::{Dest, Input, Local, Route};

/// Bytes queued for one peer link: room for two of the largest frames (a
/// forwarded request and an append) plus a burst of ordinary traffic. Past
/// it raft frames are dropped (raft sends them again) and forwards are
/// answered UNAVAILABLE.
fn link_queue_bytes(max_frame_bytes: usize) -> usize {
    max_frame_bytes.saturating_mul(2).saturating_add(32 << 20)
}

/// The loop's state: the replica and everything the shell keeps around it.
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
    /// `Wal::segments_started` as last added to the metrics.
    wal_segments_reported: (u64, u64),
    snap_dir: std::path::PathBuf,
    /// Set once SIGTERM arrived: the deadline for handing leadership away.
    stopping: Option<Instant>,
    /// No leadership balancing before this tick (back-off after an attempt).
    next_balance_tick: u64,
    /// Peers a snapshot is being sent to right now.
    snapshots_sending: std::collections::HashSet<u64>,
    /// Each peer's address for this shard (a host name is resolved on the
    /// helper thread: a DNS lookup blocks).
    peer_addrs: HashMap<u64, std::net::SocketAddr>,
    /// Members whose host name is being resolved.
    resolving: std::collections::HashSet<u64>,
    /// WAL segments to delete once the helper has room for the job.
    obsolete_segments: Vec<std::path::PathBuf>,
    /// Ticks in a second: how often idle connections are looked for.
    ticks_per_second: u64,
    /// "client is not reading" lines, at most one per interval.
    slow_reader_log: RefCell<LogLimit>,
    /// "peer rejected our hello" lines, per peer: a link redials once a
    /// second, and a refusal that lasts (a wrong cluster id) would log
    /// every time.
    rejected_log: HashMap<u64, LogLimit>,
    /// "slow loop turn" lines, at most one per interval.
    slow_turn_log: LogLimit,
    /// The kinds of input in the current turn, for the slow-turn warning.
    turn_inputs: turn_usage::InputKinds,
    /// The thread's CPU, faults and context switches, for the same.
    usage: turn_usage::UsageSampler,
}

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

/// A voter heard from within this window counts as live when a leader
/// judges whether removing another voter keeps a quorum (at least one
/// election timeout).
const LIVENESS_WINDOW_MS: u64 = 5_000;

/// Runs shard `shard` until the node shuts down. Called on the shard's own
/// thread inside its monoio runtime.
pub async fn run(
    shard: u32,
    node: Arc<NodeShared>,
    cross_rx: flume::Receiver<CrossCore>,
) -> anyhow::Result<()> {
    let config = &node.config;
    let wal_dir = data_dir::wal_dir(&config.data_dir, shard);
    let wal = Wal::open(
        &wal_dir,
        WalOptions {
            segment_bytes: config.wal_segment_bytes,
            shard_id: shard,
            recycle_bytes: config.wal_recycle_bytes,
        },
    )?;
    if let Some((file, offset)) = &wal.recovery().torn_tail {
        tracing::warn!(shard, file = %file.display(), offset, "WAL tail repaired: torn record cut off");
    }
    let snap_dir = data_dir::snapshot_dir(&config.data_dir, shard);
    // Start-up, before the shard serves: reading the snapshot here blocks nobody.
    let loaded = snapshot::load_latest(shard, &snap_dir).map(|(meta, image, path)| {
        tracing::info!(shard, index = meta.index, term = meta.term, file = %path.display(), "snapshot loaded");
        LoadedSnapshot { meta, image }
    });
    let tick_ms = config.tick_ms.max(1);
    let request_timeout_ticks = config.request_timeout_ms.div_ceil(tick_ms).max(1);
    // etcd's window for the same check (`HealthInterval`): a follower on a
    // loaded machine can be silent for longer than an election timeout
    // without being down, and refusing an operator's change for that is a
    // false alarm.
    let liveness_ticks = LIVENESS_WINDOW_MS
        .div_ceil(tick_ms)
        .max(config.election_ticks as u64);
    let replica = Replica::open(
        wal,
        ReplicaOptions {
            node_id: config.node_id,
            shard,
            bootstrap: bootstrap_voters(config),
            heartbeat_ticks: config.heartbeat_ticks,
            election_ticks: config.election_ticks,
            max_election_ticks: 0,
            request_timeout_ticks,
            liveness_ticks,
            max_size_per_msg: MAX_APPEND_BYTES,
            max_inflight_msgs: MAX_INFLIGHT_APPENDS,
            snapshot_entries: config.snapshot_entries,
            snapshot_bytes: config.snapshot_bytes,
            snapshot_log_percent: config.snapshot_log_percent,
            max_state_bytes: config.max_memory_bytes / u64::from(config.shards),
        },
        loaded,
    )?;
    let helper = Helper::start(shard)
        .map_err(|e| anyhow::anyhow!("shard {shard}: cannot start its helper thread: {e}"))?;
    let local = Rc::new(Local {
        shard,
        inbox: Inbox::default(),
        conns: RefCell::new(HashMap::new()),
        next_conn: Cell::new(1),
        helper,
        gate: RefCell::new(members::PeerGate::default()),
        clock: Cell::new(Instant::now()),
    });

    let client_addr = resolve(&config.listen_host, config.client_port, shard)?;
    let peer_addr = resolve(&config.listen_host, config.peer_port, shard)?;
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

    let node_metrics = node.metrics.shard(shard);
    monoio::spawn(accept_clients(
        client_listener,
        local.clone(),
        node.clone(),
        node_metrics.connections.clone(),
    ));
    monoio::spawn(accept_peers(peer_listener, local.clone(), node.clone()));
    monoio::spawn(tick(local.clone(), Duration::from_millis(tick_ms)));
    monoio::spawn(receive_cross_core(local.clone(), cross_rx));

    let usage = turn_usage::UsageSampler::new(node.config.tick());
    let mut shard_loop = Shard {
        local,
        node,
        replica,
        links: HashMap::new(),
        resolving: Default::default(),
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
        wal_segments_reported: (0, 0),
        dropped_reported: HashMap::new(),
        snap_dir,
        snapshots_sending: Default::default(),
        stopping: None,
        next_balance_tick: 0,
        peer_addrs: HashMap::new(),
        obsolete_segments: Vec::new(),
        ticks_per_second: (1000 / tick_ms).max(1),
        slow_reader_log: RefCell::new(LogLimit::default()),
        rejected_log: HashMap::new(),
        slow_turn_log: LogLimit::default(),
        turn_inputs: turn_usage::InputKinds::default(),
        usage,
    };
    shard_loop.on_membership_changed();
    shard_loop.run().await
}

/// The voters a new cluster starts with: the config's `peers`, unless this
/// node joins an existing cluster (then none: it waits to be added).
fn bootstrap_voters(config: &crate::config::Config) -> Vec<corekv_proto::log::Member> {
    if !config.join.is_empty() {
        return Vec::new();
    }
    config
        .peers
        .iter()
        .map(crate::membership::member_of_peer)
        .collect()
}

/// Where one loop turn's time went, for the "slow loop turn" warning.
struct TurnPhases {
    /// Inputs the turn took from the inbox.
    inputs: usize,
    /// Feeding them to the replica.
    handling: Duration,
    /// Handing the turn's proposals and reads to raft.
    flush: Duration,
    /// Raft's Readys: apply, WAL appends, messages.
    ready: Duration,
    /// Answers, messages out, the sync started, status.
    dispatch: Duration,
}

impl Shard {
    async fn run(&mut self) -> anyhow::Result<()> {
        let mut batch = Vec::new();
        let mut out = Output::default();
        loop {
            // 1. Wait for anything, then take everything that is there;
            //    with applying left over from the last turn, wait for nothing.
            if self.replica.has_ready() {
                self.local.inbox.yield_then_take(&mut batch).await;
            } else {
                self.local.inbox.drain_into(&mut batch).await;
            }
            self.replica.begin_turn();
            let turn_started = Instant::now();
            self.local.clock.set(turn_started);
            let inputs = batch.len();
            self.turn_inputs.clear();
            // 2. Feed it all to the replica; proposals only queue up.
            for input in batch.drain(..) {
                self.turn_inputs.count(&input);
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
            let handled = Instant::now();
            // 3. This turn's proposals enter raft as one batch; reads share one round.
            self.replica.flush(&mut out);
            let flushed = Instant::now();
            // 4. One Ready: send, apply, append, queue persisted messages behind the sync.
            self.replica.handle_ready(&mut out)?;
            // 5. Carry out what the replica asked for; the writer tasks send
            //    everything queued now in one write per connection.
            self.dispatch(&mut out);
            // Set by dispatch as it started.
            let readied = self.local.clock.get();
            self.publish_status();
            let turn = turn_started.elapsed();
            self.metrics.loop_turn.observe(turn.as_secs_f64());
            if turn > self.node.config.slow_turn() {
                let phases = TurnPhases {
                    inputs,
                    handling: handled - turn_started,
                    flush: flushed - handled,
                    ready: readied.saturating_duration_since(flushed),
                    dispatch: (turn_started + turn).saturating_duration_since(readied),
                };
                self.warn_slow_turn(turn, phases);
            }
            self.usage.maybe_sample(turn_started + turn);
        }
    }

    /// A turn long enough to matter: found the WAL index's doubling that
    /// held the loop 62-449 ms (and cost leadership) in one line each.
    fn warn_slow_turn(&mut self, turn: Duration, phases: TurnPhases) {
        // Taken even when the line is suppressed, so the next one covers
        // only its own turn.
        let usage = self.usage.delta();
        if let Some(suppressed) = self.slow_turn_log.allow(Instant::now()) {
            let ms = |d: Duration| d.as_millis() as u64;
            tracing::warn!(
                shard = self.local.shard,
                turn_ms = ms(turn),
                inputs = phases.inputs,
                handling_ms = ms(phases.handling),
                flush_ms = ms(phases.flush),
                ready_ms = ms(phases.ready),
                dispatch_ms = ms(phases.dispatch),
                kinds = %self.turn_inputs.describe(),
                // Since the last sample, at most a tick before the turn:
                // CPU far below wall time means the thread did not run.
                wall_ms = ms(usage.wall),
                cpu_ms = ms(usage.cpu),
                minor_faults = usage.minor_faults,
                major_faults = usage.major_faults,
                voluntary_switches = usage.voluntary_switches,
                involuntary_switches = usage.involuntary_switches,
                suppressed,
                "slow loop turn: the shard answered nothing, sent no heartbeat and saw no fsync finish meanwhile"
            );
        }
    }

    fn handle_input(&mut self, input: Input, out: &mut Output) -> anyhow::Result<Option<()>> {
        match input {
            Input::Tick => {
                self.ticks += 1;
                self.replica.tick(out);
                self.expire_forwards();
                self.maybe_balance_leadership();
                if self.ticks % self.ticks_per_second == 0 {
                    self.close_idle_connections();
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
                    self.local.clock.get(),
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
                    self.local.clock.get(),
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
                        self.local.clock.get(),
                    );
                    let no_forward = request.no_forward;
                    self.handle_request(route, request, no_forward, out);
                }
                CrossCore::Reply { conn, response } => self.send_to_conn(conn, &response),
                CrossCore::Shutdown => return Ok(Some(())),
                CrossCore::PeerResolved { peer, addr } => self.on_peer_resolved(peer, addr),
                CrossCore::SnapshotWritten(result) => {
                    let result = result.map(|(meta, path, bytes)| {
                        self.metrics.snapshots_written.inc();
                        self.metrics.snapshot_bytes_written.inc_by(bytes);
                        tracing::info!(shard = self.local.shard, index = meta.index, term = meta.term, bytes, file = %path.display(), "snapshot created");
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
                    .receive_snapshot(incoming.snapshot, incoming.message, out);
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
                LinkEvent::Rejected { reason, removed } => {
                    let limit = self.rejected_log.entry(peer).or_default();
                    if let Some(suppressed) = limit.allow(Instant::now()) {
                        tracing::error!(shard = self.local.shard, peer, %reason, suppressed, "peer rejected our hello");
                    }
                    self.replica.report_unreachable(peer);
                    if removed {
                        self.replica
                            .mark_removed(&format!("node {peer} refused us as a removed member"));
                        // Nobody will take our links again: stop redialling
                        // (and being refused, logged on both sides) for ever.
                        for (_, link) in self.links.drain() {
                            link.shutdown();
                        }
                    }
                }
            },
        }
        Ok(None)
    }

    fn dispatch(&mut self, out: &mut Output) {
        // The answers below measure their latency up to here.
        self.local.clock.set(Instant::now());
        if std::mem::take(&mut out.membership_changed) {
            self.on_membership_changed();
        }
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
        self.on_role_changes(out);
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
            if !self.links.contains_key(&to) {
                self.dial_unknown(to);
            }
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
}
