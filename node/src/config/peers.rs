//! The cluster's members as this node sees them: [`PeerConfig`], the
//! `--peers` / `COREKV_PEERS` text syntax, and the host and port rules that
//! the listen addresses, the defaults and the collision check share.
//!
//! A leaf: it imports nothing from the rest of `config`, so the key table and
//! the validation can both use it without a cycle.

use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

/// The `--peers` / `COREKV_PEERS` syntax, quoted in every parse error.
pub(super) const PEERS_SYNTAX: &str = "ID=HOST:CLIENT_PORT:PEER_PORT[:ADMIN_PORT],...";

/// One member of the cluster (including this node itself).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// Raft id of the node, >= 1; the same id in every Raft group (shard).
    pub id: u64,
    /// Host name or IP address other nodes and clients dial to reach it
    /// (an IPv6 address without brackets).
    pub host: String,
    /// First client port: shard `s` serves clients on `client_port + s`.
    pub client_port: u16,
    /// First peer port: shard `s` serves Raft traffic on `peer_port + s`.
    pub peer_port: u16,
    /// Admin HTTP port, if known. Give it for every node that shares a host
    /// with another, so that collisions are caught at start-up.
    #[serde(default)]
    pub admin_port: Option<u16>,
}

impl PeerConfig {
    /// `host:port` of shard `shard`'s client listener on this node.
    pub fn client_addr(&self, shard: u32) -> String {
        host_port(&self.host, u32::from(self.client_port) + shard)
    }

    /// `host:port` of shard `shard`'s peer listener on this node.
    pub fn peer_addr(&self, shard: u32) -> String {
        host_port(&self.host, u32::from(self.peer_port) + shard)
    }
}

/// Parses the `--peers` / `COREKV_PEERS` syntax,
/// `ID=HOST:CLIENT_PORT:PEER_PORT[:ADMIN_PORT]` separated by commas. An IPv6
/// host is written in brackets: `3=[fd00::3]:7100:7150`. Whitespace around
/// entries and a trailing comma are ignored.
pub(super) fn parse_peers(text: &str) -> Result<Vec<PeerConfig>, String> {
    let peers = text
        .split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| parse_peer(entry).map_err(|reason| format!("entry `{entry}`: {reason}")))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|reason| format!("{reason}; expected {PEERS_SYNTAX}"))?;
    if peers.is_empty() {
        return Err(format!("no peers listed; expected {PEERS_SYNTAX}"));
    }
    Ok(peers)
}

fn parse_peer(entry: &str) -> Result<PeerConfig, String> {
    let (id, address) = entry
        .split_once('=')
        .ok_or_else(|| "missing `=` between node id and address".to_string())?;
    let id = id.trim();
    let id: u64 = id
        .parse()
        .map_err(|_| format!("node id `{id}` is not an unsigned integer"))?;
    let (host, ports) = split_host(address.trim())?;
    if host.is_empty() {
        return Err("host is empty".to_string());
    }
    let ports: Vec<&str> = ports.split(':').collect();
    if !(2..=3).contains(&ports.len()) {
        return Err(format!(
            "expected 2 or 3 ports after the host, found {}",
            ports.len()
        ));
    }
    Ok(PeerConfig {
        id,
        host: host.to_string(),
        client_port: parse_port("client port", ports[0])?,
        peer_port: parse_port("peer port", ports[1])?,
        admin_port: ports
            .get(2)
            .map(|port| parse_port("admin port", port))
            .transpose()?,
    })
}

/// Splits `host:ports` or `[ipv6]:ports` at the end of the host.
fn split_host(address: &str) -> Result<(&str, &str), String> {
    if let Some(rest) = address.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| "missing `]` after the IPv6 host".to_string())?;
        let ports = after
            .strip_prefix(':')
            .ok_or_else(|| "expected `:` after `]`".to_string())?;
        return Ok((host, ports));
    }
    address
        .split_once(':')
        .ok_or_else(|| "missing ports after the host".to_string())
}

fn parse_port(what: &str, text: &str) -> Result<u16, String> {
    match text.trim().parse::<u16>() {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(format!("{what} `{text}` is not a port number in 1..=65535")),
    }
}

/// `host:port`, with an IPv6 host in brackets.
pub fn host_port(host: &str, port: u32) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

pub(super) fn is_wildcard(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.parse::<Ipv4Addr>().is_ok_and(|ip| ip.is_unspecified())
        || host.parse::<Ipv6Addr>().is_ok_and(|ip| ip.is_unspecified())
}

/// Hosts that reach the same machine compare equal: all loopback names are one
/// host, because `127.0.0.1`, `127.0.0.2` and `localhost` listeners on one
/// port collide (or shadow each other through a wildcard bind). Other names
/// compare as written, case-insensitively; two names of one machine (a DNS
/// name and its IP) are not detected.
pub(super) fn host_identity(host: &str) -> String {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let is_loopback = host.eq_ignore_ascii_case("localhost")
        || host.parse::<Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
        || host.parse::<Ipv6Addr>().is_ok_and(|ip| ip.is_loopback());
    if is_loopback {
        "the loopback host".to_string()
    } else {
        format!("host {}", host.to_ascii_lowercase())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_peers_flag_syntax() {
        let peers = parse_peers(
            " 1=127.0.0.1:7100:7150 , 2=node-2.example:7200:7250:7290, 3=[fd00::3]:7300:7350,",
        )
        .unwrap();
        assert_eq!(
            peers,
            vec![
                PeerConfig {
                    id: 1,
                    host: "127.0.0.1".into(),
                    client_port: 7100,
                    peer_port: 7150,
                    admin_port: None
                },
                PeerConfig {
                    id: 2,
                    host: "node-2.example".into(),
                    client_port: 7200,
                    peer_port: 7250,
                    admin_port: Some(7290)
                },
                PeerConfig {
                    id: 3,
                    host: "fd00::3".into(),
                    client_port: 7300,
                    peer_port: 7350,
                    admin_port: None
                },
            ]
        );
        assert_eq!(peers[2].client_addr(1), "[fd00::3]:7301");
        assert_eq!(peers[1].peer_addr(2), "node-2.example:7252");
    }
}
