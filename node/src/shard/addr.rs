//! Socket addresses of a shard's ports.

use std::net::SocketAddr;

/// `host:(base_port + shard)` as a socket address. Resolution happens at
/// start-up, never on the hot path.
pub(super) fn resolve(host: &str, base_port: u16, shard: u32) -> anyhow::Result<SocketAddr> {
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
