//! What the shards of one node share: the configuration, each shard's
//! published status, the cross-core queues and the metrics registry. The
//! supervisor builds it; shards and the admin server read it.

use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use corekv_proto::client::{
    NodeInfo, Request, Response, ShardMembership, ShardStatus, StatusResult,
};
use corekv_transport::SocketOptions;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::snapshot::{SnapshotError, SnapshotMeta};

/// Bound of each shard's cross-core queue; a full queue answers UNAVAILABLE.
pub(crate) const CROSS_CORE_QUEUE: usize = 64 * 1024;

/// What one shard thread sends another.
pub(crate) enum CrossCore {
    /// A client request that arrived on `origin_shard`'s port for a key of
    /// the receiving shard.
    Request {
        origin_shard: u32,
        conn: u64,
        request: Request,
    },
    /// The answer to such a request, for connection `conn` of the receiver.
    Reply { conn: u64, response: Response },
    /// Stop: the node is shutting down.
    Shutdown,
    /// A member's host name, resolved on the helper thread (or why not).
    PeerResolved {
        peer: u64,
        addr: Result<std::net::SocketAddr, String>,
    },
    /// A snapshot this shard asked for was written (its metadata, file and
    /// length in bytes) or failed, by the helper thread that wrote it.
    SnapshotWritten(Result<(SnapshotMeta, PathBuf, u64), SnapshotError>),
}

/// State every shard of the node can see. Written rarely (status once per
/// loop turn, each shard its own slot), read by status requests.
pub struct NodeShared {
    /// The validated configuration.
    pub config: Config,
    /// Latest status published by each shard.
    pub shard_status: Vec<Mutex<ShardStatus>>,
    /// Each shard's membership, published when it changes.
    pub shard_membership: Vec<Mutex<ShardMembership>>,
    /// Each shard's cross-core queue.
    pub(crate) cross: Vec<flume::Sender<CrossCore>>,
    /// The metrics registry (each shard holds its own handles).
    pub metrics: Arc<Metrics>,
    /// Client connections open on every shard, against
    /// `max_client_connections`.
    pub client_connections: AtomicUsize,
    /// The cluster's members when this node joined it (empty otherwise).
    pub joining: Vec<NodeInfo>,
    /// TLS for every port, when the config turns it on.
    pub tls: Option<Arc<crate::tls::NodeTls>>,
}

impl NodeShared {
    /// Socket options from the configuration.
    pub fn socket_options(&self) -> SocketOptions {
        SocketOptions {
            nodelay: true,
            keepalive_idle: Duration::from_millis(self.config.keepalive_idle_ms),
            keepalive_interval: Duration::from_millis(self.config.keepalive_interval_ms),
            keepalive_count: self.config.keepalive_count,
            connect_timeout: Duration::from_millis(self.config.connect_timeout_ms),
        }
    }

    /// This node's status, one entry per shard.
    pub fn status(&self) -> StatusResult {
        StatusResult {
            node_id: self.config.node_id,
            shards: self
                .shard_status
                .iter()
                .zip(&self.shard_membership)
                .map(|(status, membership)| {
                    let mut status = status.lock().expect("status lock poisoned").clone();
                    status.membership =
                        Some(membership.lock().expect("membership lock poisoned").clone());
                    status
                })
                .collect(),
        }
    }

    /// Every node any shard of this node counts as a member, by id: the
    /// cluster's nodes as far as this node has applied its membership.
    pub fn members(&self) -> Vec<NodeInfo> {
        let mut nodes: Vec<NodeInfo> = Vec::new();
        for slot in &self.shard_membership {
            for node in &slot.lock().expect("membership lock poisoned").nodes {
                if !nodes.iter().any(|n| n.node_id == node.node_id) {
                    nodes.push(node.clone());
                }
            }
        }
        nodes.sort_by_key(|n| n.node_id);
        nodes
    }
}
