//! TLS over a monoio TCP stream: the handshake, then read and write halves
//! that share one rustls connection.

/// The DNS name a node's certificate must carry for peers to accept it as
/// node `node_id` of cluster `cluster_id` (a DNS SAN), and the name a peer
/// link verifies when it dials that node.
pub fn peer_server_name(cluster_id: u64, node_id: u64) -> String {
    format!("node-{node_id}.cluster-{cluster_id}")
}
