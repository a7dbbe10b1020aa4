//! Prometheus metrics of the node.
//!
//! Every metric carries a `shard` label. Each shard gets its own handles at
//! start-up ([`ShardMetrics`]), so the hot path only touches atomics that
//! belong to that shard: no family lookup, no lock, no shared cache line.
//! The admin thread encodes the registry when scraped.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShardLabel {
    shard: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    shard: u32,
    peer: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    shard: u32,
    peer: u64,
    /// "true" or "false".
    success: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    shard: u32,
    peer: u64,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClosedLabels {
    shard: u32,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    shard: u32,
    op: &'static str,
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    shard: u32,
    op: &'static str,
}

/// Client operations as metric labels.
pub const OPS: [&str; 10] = [
    "put",
    "get",
    "delete",
    "cas",
    "scan",
    "topology",
    "status",
    "transfer_leader",
    "open_session",
    "change_membership",
];
/// Outcomes of client requests as metric labels ("ok" or an error code).
pub const STATUSES: [&str; 12] = [
    "ok",
    "not_leader",
    "wrong_shard",
    "timeout",
    "too_large",
    "invalid_argument",
    "unavailable",
    "version_mismatch",
    "internal",
    "session_expired",
    "resource_exhausted",
    "failed_precondition",
];

fn fsync_histogram() -> Histogram {
    // 50 µs .. ~1.6 s
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

fn loop_turn_histogram() -> Histogram {
    // 5 µs .. ~5 s
    Histogram::new(exponential_buckets(0.000_005, 4.0, 11))
}

fn request_histogram() -> Histogram {
    // 20 µs .. ~5 s
    Histogram::new(exponential_buckets(0.000_02, 2.0, 18))
}

/// The node's registry and metric families.
pub struct Metrics {
    registry: Registry,
    node_state: Family<ShardLabel, Gauge>,
    term: Family<ShardLabel, Gauge>,
    commit: Family<ShardLabel, Gauge>,
    applied: Family<ShardLabel, Gauge>,
    last_index: Family<ShardLabel, Gauge>,
    leader_changes: Family<ShardLabel, Counter>,
    proposals: Family<ShardLabel, Counter>,
    proposals_dropped: Family<ShardLabel, Counter>,
    follower_reads: Family<ShardLabel, Counter>,
    snapshots_sent: Family<ShardLabel, Counter>,
    snapshots_received: Family<ShardLabel, Counter>,
    snapshots_written: Family<ShardLabel, Counter>,
    snapshot_bytes_written: Family<ShardLabel, Counter>,
    rpc: Family<RpcLabels, Counter>,
    fsync: Family<ShardLabel, Histogram, fn() -> Histogram>,
    loop_turn: Family<ShardLabel, Histogram, fn() -> Histogram>,
    wal_bytes: Family<ShardLabel, Counter>,
    wal_segments: Family<ShardLabel, Gauge>,
    wal_new_segments: Family<ShardLabel, Counter>,
    wal_reused_segments: Family<ShardLabel, Counter>,
    wal_disk_full: Family<ShardLabel, Gauge>,
    wal_backlog_bytes: Family<ShardLabel, Gauge>,
    state_machine_bytes: Family<ShardLabel, Gauge>,
    state_machine_keys: Family<ShardLabel, Gauge>,
    voters: Family<ShardLabel, Gauge>,
    learners: Family<ShardLabel, Gauge>,
    removed: Family<ShardLabel, Gauge>,
    requests: Family<RequestLabels, Counter>,
    request_seconds: Family<OpLabels, Histogram, fn() -> Histogram>,
    reconnects: Family<PeerLabels, Counter>,
    frames_dropped: Family<PeerLabels, Counter>,
    peer_refused: Family<RefusalLabels, Counter>,
    client_connections: Family<ShardLabel, Gauge>,
    client_rejected: Family<ShardLabel, Counter>,
    client_closed: Family<ClosedLabels, Counter>,
    client_tls_failed: Family<ShardLabel, Counter>,
}

/// A shard's client connection metrics; the accept task holds a copy.
#[derive(Clone)]
pub struct ConnectionMetrics {
    /// client_connections: open now.
    pub open: Gauge,
    /// client_connections_rejected_total: refused at max_client_connections.
    pub rejected: Counter,
    /// client_connections_closed_total{reason="slow_reader"}.
    pub closed_slow_reader: Counter,
    /// client_connections_closed_total{reason="idle"}.
    pub closed_idle: Counter,
    /// client_tls_handshake_failures_total.
    pub tls_refused: Counter,
}

/// One shard's metric handles.
pub struct ShardMetrics {
    /// raft_node_state: 0 follower, 1 candidate, 2 leader, 3 pre_candidate.
    pub node_state: Gauge,
    /// raft_current_term.
    pub term: Gauge,
    /// raft_commit_index.
    pub commit: Gauge,
    /// raft_applied_index.
    pub applied: Gauge,
    /// raft_last_log_index.
    pub last_index: Gauge,
    /// raft_leader_changes_total.
    pub leader_changes: Counter,
    /// raft_proposals_total.
    pub proposals: Counter,
    /// raft_proposals_dropped_total.
    pub proposals_dropped: Counter,
    /// client_follower_reads_total.
    pub follower_reads: Counter,
    /// raft_snapshots_sent_total.
    pub snapshots_sent: Counter,
    /// raft_snapshots_received_total.
    pub snapshots_received: Counter,
    /// snapshots_written_total.
    pub snapshots_written: Counter,
    /// snapshot_bytes_written_total.
    pub snapshot_bytes_written: Counter,
    /// wal_fsync_seconds.
    pub fsync: Histogram,
    /// shard_loop_turn_seconds.
    pub loop_turn: Histogram,
    /// wal_bytes_written_total.
    pub wal_bytes: Counter,
    /// wal_segments.
    pub wal_segments: Gauge,
    /// wal_new_segments_total: segments made as new files.
    pub wal_new_segments: Counter,
    /// wal_reused_segments_total: segments made out of retired ones.
    pub wal_reused_segments: Counter,
    /// wal_disk_full: 1 while the shard's log cannot grow.
    pub wal_disk_full: Gauge,
    /// wal_backlog_bytes: entry bytes waiting for the log.
    pub wal_backlog_bytes: Gauge,
    /// state_machine_bytes: accounted bytes of the state machine.
    pub state_machine_bytes: Gauge,
    /// state_machine_keys: keys in the state machine.
    pub state_machine_keys: Gauge,
    /// raft_voters: voters of the group.
    pub voters: Gauge,
    /// raft_learners: learners of the group.
    pub learners: Gauge,
    /// raft_removed: 1 once this node was removed from the group.
    pub removed: Gauge,
    /// Client connection counts.
    pub connections: ConnectionMetrics,
    /// client_requests_total by [op][status] (indexes into OPS, STATUSES).
    requests: Vec<Vec<Counter>>,
    /// client_request_seconds by op.
    request_seconds: Vec<Histogram>,
    shard: u32,
    metrics: Arc<Metrics>,
}

impl Metrics {
    /// Registers every family.
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::default();
        let m = Metrics {
            node_state: Family::default(),
            term: Family::default(),
            commit: Family::default(),
            applied: Family::default(),
            last_index: Family::default(),
            leader_changes: Family::default(),
            proposals: Family::default(),
            proposals_dropped: Family::default(),
            follower_reads: Family::default(),
            snapshots_sent: Family::default(),
            snapshots_received: Family::default(),
            snapshots_written: Family::default(),
            snapshot_bytes_written: Family::default(),
            rpc: Family::default(),
            fsync: Family::new_with_constructor(fsync_histogram),
            loop_turn: Family::new_with_constructor(loop_turn_histogram),
            wal_bytes: Family::default(),
            wal_segments: Family::default(),
            wal_new_segments: Family::default(),
            wal_reused_segments: Family::default(),
            wal_disk_full: Family::default(),
            wal_backlog_bytes: Family::default(),
            state_machine_bytes: Family::default(),
            state_machine_keys: Family::default(),
            voters: Family::default(),
            learners: Family::default(),
            removed: Family::default(),
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(request_histogram),
            reconnects: Family::default(),
            frames_dropped: Family::default(),
            peer_refused: Family::default(),
            client_connections: Family::default(),
            client_rejected: Family::default(),
            client_closed: Family::default(),
            client_tls_failed: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "raft_node_state",
            "Raft role: 0 follower, 1 candidate, 2 leader, 3 pre_candidate",
            m.node_state.clone(),
        );
        registry.register("raft_current_term", "Current Raft term", m.term.clone());
        registry.register(
            "raft_commit_index",
            "Highest log index known committed",
            m.commit.clone(),
        );
        registry.register(
            "raft_applied_index",
            "Highest log index applied to the state machine",
            m.applied.clone(),
        );
        registry.register(
            "raft_last_log_index",
            "Index of the last entry in the log",
            m.last_index.clone(),
        );
        registry.register(
            "raft_leader_changes",
            "Times this replica saw the shard's leader change",
            m.leader_changes.clone(),
        );
        registry.register(
            "raft_proposals",
            "Writes proposed to Raft by this replica",
            m.proposals.clone(),
        );
        registry.register(
            "raft_proposals_dropped",
            "Proposals Raft refused (leadership changing)",
            m.proposals_dropped.clone(),
        );
        registry.register(
            "client_follower_reads",
            "Gets and scans this replica took as a follower (read_from follower or nearest)",
            m.follower_reads.clone(),
        );
        registry.register(
            "raft_rpc_call",
            "Raft messages sent to a peer, by outcome",
            m.rpc.clone(),
        );
        registry.register(
            "raft_snapshots_sent",
            "Snapshots sent to followers",
            m.snapshots_sent.clone(),
        );
        registry.register(
            "raft_snapshots_received",
            "Snapshots received from the leader",
            m.snapshots_received.clone(),
        );
        registry.register(
            "snapshots_written",
            "Snapshots this replica wrote of its own state",
            m.snapshots_written.clone(),
        );
        registry.register(
            "snapshot_bytes_written",
            "Bytes of the snapshots this replica wrote of its own state (compare with wal_bytes_written_total)",
            m.snapshot_bytes_written.clone(),
        );
        registry.register(
            "wal_fsync_seconds",
            "Duration of WAL fdatasync calls",
            m.fsync.clone(),
        );
        registry.register(
            "shard_loop_turn_seconds",
            "Time a shard loop turn spends on what woke it (not the wait); long turns delay every request and heartbeat of the shard",
            m.loop_turn.clone(),
        );
        registry.register(
            "wal_bytes_written",
            "Bytes appended to the WAL",
            m.wal_bytes.clone(),
        );
        registry.register(
            "wal_segments",
            "WAL segment files on disk",
            m.wal_segments.clone(),
        );
        registry.register(
            "wal_new_segments",
            "WAL segments made as new files (fresh page cache and unwritten blocks: slower to fill than reused ones)",
            m.wal_new_segments.clone(),
        );
        registry.register(
            "wal_reused_segments",
            "WAL segments made out of retired ones (see wal_recycle_bytes)",
            m.wal_reused_segments.clone(),
        );
        registry.register(
            "wal_disk_full",
            "1 while the shard's WAL cannot grow (disk full): it refuses writes and hands over leadership",
            m.wal_disk_full.clone(),
        );
        registry.register(
            "wal_backlog_bytes",
            "Bytes of log entries waiting for a WAL that cannot grow",
            m.wal_backlog_bytes.clone(),
        );
        registry.register(
            "state_machine_bytes",
            "Accounted bytes of the state machine: keys, values and 250 bytes per pair (what max_memory_bytes limits)",
            m.state_machine_bytes.clone(),
        );
        registry.register(
            "state_machine_keys",
            "Keys in the state machine",
            m.state_machine_keys.clone(),
        );
        registry.register(
            "raft_voters",
            "Voters of the shard's group, as this node applied its membership",
            m.voters.clone(),
        );
        registry.register(
            "raft_learners",
            "Learners of the shard's group, as this node applied its membership",
            m.learners.clone(),
        );
        registry.register(
            "raft_removed",
            "1 once this node was removed from the shard's group",
            m.removed.clone(),
        );
        registry.register(
            "client_requests",
            "Client requests answered, by op and status",
            m.requests.clone(),
        );
        registry.register(
            "client_request_seconds",
            "Time from receiving a client request to answering it",
            m.request_seconds.clone(),
        );
        registry.register(
            "transport_reconnects",
            "Times a peer link came back up after being down",
            m.reconnects.clone(),
        );
        registry.register(
            "transport_frames_dropped",
            "Frames dropped because a peer link was down or full",
            m.frames_dropped.clone(),
        );
        registry.register(
            "peer_messages_refused",
            "Messages from a peer link dropped by a check (wrong sender or receiver, a kind that does not travel on the link, undecodable)",
            m.peer_refused.clone(),
        );
        registry.register(
            "client_connections",
            "Client connections open",
            m.client_connections.clone(),
        );
        registry.register(
            "client_connections_rejected",
            "Client connections refused because max_client_connections were open",
            m.client_rejected.clone(),
        );
        registry.register(
            "client_connections_closed",
            "Client connections the node closed: slow_reader (answers piled up unread), idle (client_idle_timeout_ms)",
            m.client_closed.clone(),
        );
        registry.register(
            "client_tls_handshake_failures",
            "Client connections whose TLS handshake failed (no or refused certificate, plaintext client, timeout)",
            m.client_tls_failed.clone(),
        );
        Arc::new(Metrics { registry, ..m })
    }

    /// Counts one message from `peer` that a link check refused. Looked up
    /// per call: refusals are rare, and a flood of them is bounded by the
    /// link's frame rate.
    pub fn peer_message_refused(&self, shard: u32, peer: u64, reason: &'static str) {
        self.peer_refused
            .get_or_create(&RefusalLabels {
                shard,
                peer,
                reason,
            })
            .inc();
    }

    /// Handles for `shard`, created once at shard start-up.
    pub fn shard(self: &Arc<Self>, shard: u32) -> ShardMetrics {
        let l = ShardLabel { shard };
        ShardMetrics {
            node_state: self.node_state.get_or_create(&l).clone(),
            term: self.term.get_or_create(&l).clone(),
            commit: self.commit.get_or_create(&l).clone(),
            applied: self.applied.get_or_create(&l).clone(),
            last_index: self.last_index.get_or_create(&l).clone(),
            leader_changes: self.leader_changes.get_or_create(&l).clone(),
            proposals: self.proposals.get_or_create(&l).clone(),
            proposals_dropped: self.proposals_dropped.get_or_create(&l).clone(),
            follower_reads: self.follower_reads.get_or_create(&l).clone(),
            snapshots_sent: self.snapshots_sent.get_or_create(&l).clone(),
            snapshots_received: self.snapshots_received.get_or_create(&l).clone(),
            snapshots_written: self.snapshots_written.get_or_create(&l).clone(),
            snapshot_bytes_written: self.snapshot_bytes_written.get_or_create(&l).clone(),
            fsync: self.fsync.get_or_create(&l).clone(),
            loop_turn: self.loop_turn.get_or_create(&l).clone(),
            wal_bytes: self.wal_bytes.get_or_create(&l).clone(),
            wal_segments: self.wal_segments.get_or_create(&l).clone(),
            wal_new_segments: self.wal_new_segments.get_or_create(&l).clone(),
            wal_reused_segments: self.wal_reused_segments.get_or_create(&l).clone(),
            wal_disk_full: self.wal_disk_full.get_or_create(&l).clone(),
            wal_backlog_bytes: self.wal_backlog_bytes.get_or_create(&l).clone(),
            state_machine_bytes: self.state_machine_bytes.get_or_create(&l).clone(),
            state_machine_keys: self.state_machine_keys.get_or_create(&l).clone(),
            voters: self.voters.get_or_create(&l).clone(),
            learners: self.learners.get_or_create(&l).clone(),
            removed: self.removed.get_or_create(&l).clone(),
            connections: self.connection_metrics(shard),
            requests: OPS
                .iter()
                .map(|op| {
                    STATUSES
                        .iter()
                        .map(|status| {
                            self.requests
                                .get_or_create(&RequestLabels { shard, op, status })
                                .clone()
                        })
                        .collect()
                })
                .collect(),
            request_seconds: OPS
                .iter()
                .map(|op| {
                    self.request_seconds
                        .get_or_create(&OpLabels { shard, op })
                        .clone()
                })
                .collect(),
            shard,
            metrics: self.clone(),
        }
    }

    /// One statement per handle: `get_or_create` holds the family's read
    /// lock until the end of the statement, and a second creation in the same
    /// family within it would wait for that lock for ever.
    fn connection_metrics(&self, shard: u32) -> ConnectionMetrics {
        let l = ShardLabel { shard };
        let closed = |reason| ClosedLabels { shard, reason };
        let open = self.client_connections.get_or_create(&l).clone();
        let rejected = self.client_rejected.get_or_create(&l).clone();
        let closed_slow_reader = self
            .client_closed
            .get_or_create(&closed("slow_reader"))
            .clone();
        let closed_idle = self.client_closed.get_or_create(&closed("idle")).clone();
        let tls_refused = self.client_tls_failed.get_or_create(&l).clone();
        ConnectionMetrics {
            open,
            rejected,
            closed_slow_reader,
            closed_idle,
            tls_refused,
        }
    }

    /// The Prometheus text exposition of every metric, plus process metrics.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        // The exposition ends with "# EOF"; process metrics go before it.
        if let Some(stripped) = text.strip_suffix("# EOF\n") {
            text = stripped.to_string();
        }
        text.push_str(&process_metrics());
        text.push_str("# EOF\n");
        text
    }
}

impl ShardMetrics {
    /// Counts one answered client request and its latency.
    pub fn request(&self, op: usize, status: usize, seconds: f64) {
        self.requests[op][status].inc();
        self.request_seconds[op].observe(seconds);
    }

    /// Counters for messages to `peer` (created on first use, then cached by the caller).
    pub fn rpc(&self, peer: u64, success: bool) -> Counter {
        self.metrics
            .rpc
            .get_or_create(&RpcLabels {
                shard: self.shard,
                peer,
                success: if success { "true" } else { "false" },
            })
            .clone()
    }

    /// transport_reconnects_total for `peer`.
    pub fn reconnects(&self, peer: u64) -> Counter {
        self.metrics
            .reconnects
            .get_or_create(&PeerLabels {
                shard: self.shard,
                peer,
            })
            .clone()
    }

    /// transport_frames_dropped_total for `peer`.
    pub fn frames_dropped(&self, peer: u64) -> Counter {
        self.metrics
            .frames_dropped
            .get_or_create(&PeerLabels {
                shard: self.shard,
                peer,
            })
            .clone()
    }
}

/// Index of an op name in [`OPS`].
pub fn op_index(op: &corekv_proto::client::request::Op) -> usize {
    use corekv_proto::client::request::Op;
    match op {
        Op::Put(_) => 0,
        Op::Get(_) => 1,
        Op::Delete(_) => 2,
        Op::Cas(_) => 3,
        Op::Scan(_) => 4,
        Op::Topology(_) => 5,
        Op::Status(_) => 6,
        Op::TransferLeader(_) => 7,
        Op::OpenSession(_) => 8,
        Op::ChangeMembership(_) => 9,
    }
}

/// Index of a result's status in [`STATUSES`].
pub fn status_index(result: &corekv_proto::client::response::Result) -> usize {
    use corekv_proto::client::{response::Result, ErrorCode};
    match result {
        Result::Error(e) => match ErrorCode::try_from(e.code) {
            Ok(ErrorCode::NotLeader) => 1,
            Ok(ErrorCode::WrongShard) => 2,
            Ok(ErrorCode::Timeout) => 3,
            Ok(ErrorCode::TooLarge) => 4,
            Ok(ErrorCode::InvalidArgument) => 5,
            Ok(ErrorCode::Unavailable) => 6,
            Ok(ErrorCode::VersionMismatch) => 7,
            Ok(ErrorCode::SessionExpired) => 9,
            Ok(ErrorCode::ResourceExhausted) => 10,
            Ok(ErrorCode::FailedPrecondition) => 11,
            _ => 8,
        },
        _ => 0,
    }
}

/// Log lines the process could not write (the disk holding its log is full,
/// or the pipe it logs into was closed): the binary's log writer counts them, since the
/// lines themselves are lost. Exported as `log_write_errors_total`.
pub static LOG_WRITE_ERRORS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// process_resident_memory_bytes, process_open_fds, process_cpu_seconds_total
/// from /proc/self, read at scrape time, and `log_write_errors_total`.
fn process_metrics() -> String {
    let mut text = String::new();
    text.push_str("# HELP log_write_errors Log lines that could not be written.\n");
    text.push_str("# TYPE log_write_errors counter\n");
    text.push_str(&format!(
        "log_write_errors_total {}\n",
        LOG_WRITE_ERRORS.load(std::sync::atomic::Ordering::Relaxed)
    ));
    // SAFETY: sysconf has no preconditions.
    let page_bytes = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    // SAFETY: as above.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    if let Ok(statm) = std::fs::read_to_string("/proc/self/statm") {
        if let Some(resident) = statm
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse::<u64>().ok())
        {
            text.push_str("# HELP process_resident_memory_bytes Resident memory size in bytes.\n");
            text.push_str("# TYPE process_resident_memory_bytes gauge\n");
            text.push_str(&format!(
                "process_resident_memory_bytes {}\n",
                resident * page_bytes
            ));
        }
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        text.push_str("# HELP process_open_fds Number of open file descriptors.\n");
        text.push_str("# TYPE process_open_fds gauge\n");
        text.push_str(&format!("process_open_fds {}\n", fds.count()));
    }
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the parenthesised command name; utime and stime are
        // the 14th and 15th fields of the whole line.
        if let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) {
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let utime = fields
                .get(11)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
            let stime = fields
                .get(12)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
            // OpenMetrics names a counter family without `_total` (its
            // sample has it); a strict parser refuses the whole page otherwise.
            text.push_str(
                "# HELP process_cpu_seconds Total user and system CPU time spent in seconds.\n",
            );
            text.push_str("# TYPE process_cpu_seconds counter\n");
            text.push_str(&format!(
                "process_cpu_seconds_total {}\n",
                (utime + stime) / ticks_per_second
            ));
        }
    }
    text
}
