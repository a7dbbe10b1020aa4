//! Joining an existing cluster: before a node with `join` set and an empty
//! data directory starts its shards, it asks a member for the cluster's
//! layout and refuses to start if this node's `cluster_id` or `shards`
//! differ (a node of the wrong cluster, or with another shard count, could
//! never take part). Its shards then start with no members and wait for
//! the leader that adds them (`corekv member add`).
//!
//! Runs before any shard thread exists, so it may block: plain std sockets.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use corekv_proto::client::{request::Op, response, Request, Response, Topology, TopologyResult};
use corekv_transport::rustls::{ClientConfig, ClientConnection, StreamOwned};
use corekv_transport::{decode_message, encode_frame_bytes, FRAME_HEADER_LEN};

use crate::config::Config;
use crate::data_dir;

/// Time for each connect, write and read of the topology request.
const JOIN_IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest topology answer read (it lists every node once).
const MAX_TOPOLOGY_BYTES: usize = 1 << 20;

/// Why a node cannot join.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// No address in `join` answered.
    #[error("cannot join: no member answered ({reasons})")]
    Unreachable {
        /// Each address with its failure.
        reasons: String,
    },
    /// The cluster has another id.
    #[error(
        "cannot join: the cluster at {addr} has cluster id {theirs}, this node is configured \
         with {mine}; set cluster_id = {theirs} or join the right cluster"
    )]
    ClusterId {
        /// The member that answered.
        addr: String,
        /// Its cluster id.
        theirs: u64,
        /// Ours.
        mine: u64,
    },
    /// The TLS files cannot be used.
    #[error("cannot join: {0}")]
    Tls(#[from] corekv_transport::TlsConfigError),
    /// The cluster has another shard count.
    #[error(
        "cannot join: the cluster at {addr} has {theirs} shards, this node is configured with \
         {mine}; set shards = {theirs}"
    )]
    ShardCount {
        /// The member that answered.
        addr: String,
        /// Its shard count.
        theirs: u32,
        /// Ours.
        mine: u32,
    },
}

/// Checks a joining node against the cluster it joins. `Ok(None)` when
/// there is nothing to check (no `join`, or the data directory already
/// holds this node's shards: it joined before, and its log knows the
/// cluster); `Ok(Some(topology))` with the cluster's layout otherwise.
pub fn check(config: &Config) -> Result<Option<TopologyResult>, JoinError> {
    if config.join.is_empty() || data_dir::holds_shard_data(&config.data_dir).unwrap_or(false) {
        return Ok(None);
    }
    let tls = crate::tls::NodeTls::load(config)?.map(|tls| tls.current().dial.clone());
    let mut reasons = Vec::new();
    for addr in &config.join {
        match ask_topology(addr, tls.as_ref()) {
            Ok(topology) => {
                if topology.cluster_id != config.cluster_id {
                    return Err(JoinError::ClusterId {
                        addr: addr.clone(),
                        theirs: topology.cluster_id,
                        mine: config.cluster_id,
                    });
                }
                if topology.shards != config.shards {
                    return Err(JoinError::ShardCount {
                        addr: addr.clone(),
                        theirs: topology.shards,
                        mine: config.shards,
                    });
                }
                return Ok(Some(topology));
            }
            Err(reason) => reasons.push(format!("{addr}: {reason}")),
        }
    }
    Err(JoinError::Unreachable {
        reasons: reasons.join("; "),
    })
}

fn ask_topology(addr: &str, tls: Option<&Arc<ClientConfig>>) -> Result<TopologyResult, String> {
    let target = addr
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve: {e}"))?
        .next()
        .ok_or("resolves to no address")?;
    let stream = TcpStream::connect_timeout(&target, JOIN_IO_TIMEOUT)
        .map_err(|e| format!("connect failed: {e}"))?;
    let io = |e: std::io::Error| e.to_string();
    stream.set_read_timeout(Some(JOIN_IO_TIMEOUT)).map_err(io)?;
    stream
        .set_write_timeout(Some(JOIN_IO_TIMEOUT))
        .map_err(io)?;
    match tls {
        None => exchange(stream),
        Some(config) => {
            // The member is verified by the name we dialed, as clients do.
            let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
            let name = corekv_transport::server_name(host.trim_matches(['[', ']']))?;
            let conn = ClientConnection::new(config.clone(), name).map_err(|e| e.to_string())?;
            exchange(StreamOwned::new(conn, stream))
        }
    }
}

/// One Topology request and its answer over a blocking stream.
fn exchange(mut stream: impl Read + Write) -> Result<TopologyResult, String> {
    let io = |e: std::io::Error| e.to_string();
    let request = Request {
        id: 1,
        op: Some(Op::Topology(Topology {})),
        ..Default::default()
    };
    stream
        .write_all(&encode_frame_bytes(&request))
        .map_err(io)?;
    let mut header = [0u8; FRAME_HEADER_LEN];
    stream.read_exact(&mut header).map_err(io)?;
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_TOPOLOGY_BYTES {
        return Err(format!(
            "answer of {len} bytes is larger than {MAX_TOPOLOGY_BYTES}"
        ));
    }
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).map_err(io)?;
    let response: Response = decode_message(payload.into()).map_err(|e| e.to_string())?;
    match response.result {
        Some(response::Result::Topology(topology)) => Ok(topology),
        Some(response::Result::Error(e)) => Err(format!("refused: {}", e.message)),
        other => Err(format!("unexpected answer {other:?}")),
    }
}
