//! What the shards of one node share: the configuration, each shard's
//! published status, the cross-core queues and the metrics registry. The
//! supervisor builds it; shards and the admin server read it.

use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use corekv_proto::client::{Request, Response, ShardStatus, StatusResult};
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
    /// Each shard's cross-core queue.
    pub(crate) cross: Vec<flume::Sender<CrossCore>>,
    /// The metrics registry (each shard holds its own handles).
    pub metrics: Arc<Metrics>,
    /// Client connections open on every shard, against
    /// `max_client_connections`.
    pub client_connections: AtomicUsize,
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
                .map(|slot| slot.lock().expect("status lock poisoned").clone())
                .collect(),
        }
    }
}
