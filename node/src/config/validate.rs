//! [`Config::validate`]: the rules a running node relies on, checked once the
//! layers are merged, including the port-range collision check described
//! under "Port layout" in the parent module.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use super::error::{invalid, not_in_peers, port_mismatch, ConfigError};
use super::peers::{host_identity, is_wildcard, PeerConfig};
use super::{ClientAuth, Config, MIB};

/// Room a frame needs beyond one key and one value: request id, op, version,
/// flags and protobuf tags. A frame limit below key + value + this would make
/// the largest legal request unsendable.
const FRAME_OVERHEAD_BYTES: usize = 1024;
/// Smallest WAL segment: below this, segment rotation (a file create, a
/// preallocation and an mmap) would happen every few batches.
const MIN_WAL_SEGMENT_BYTES: u64 = MIB;
/// The kernel counts keepalive idle time and interval in whole seconds, and
/// rejects zero, so anything below one second cannot be honoured.
const MIN_KEEPALIVE_MS: u64 = 1_000;
/// Frames carry a 4-byte length prefix.
const MAX_FRAME_LIMIT_BYTES: usize = u32::MAX as usize;
/// Highest TCP port, the end of every port range.
const MAX_PORT: u32 = u16::MAX as u32;

impl Config {
    /// Checks every rule that a running node relies on; the first broken one
    /// is returned. [`Config::load`] and [`Config::from_toml_str`] call it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_identity()?;
        self.validate_timing()?;
        self.validate_sizes()?;
        self.validate_logging()?;
        self.validate_tls()?;
        self.validate_peers()?;
        self.validate_ports()
    }
    fn validate_identity(&self) -> Result<(), ConfigError> {
        if self.node_id == 0 {
            return Err(invalid(
                "node_id",
                "must be >= 1 (raft reserves id 0 for \"no node\"), got 0",
            ));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "is empty"));
        }
        if self.data_dir.to_str().is_none() {
            return Err(invalid(
                "data_dir",
                format!(
                    "{} is not valid UTF-8 (the config must be writable as TOML)",
                    self.data_dir.display()
                ),
            ));
        }
        if self.listen_host.trim().is_empty() {
            return Err(invalid("listen_host", "is empty"));
        }
        if self.advertise_host.trim().is_empty() {
            return Err(invalid("advertise_host", "is empty"));
        }
        if is_wildcard(&self.advertise_host) {
            return Err(invalid(
                "advertise_host",
                format!(
                    "{} is a wildcard address, which other nodes cannot dial; \
                     set the address this node is reachable at",
                    self.advertise_host
                ),
            ));
        }
        if self.shards == 0 {
            return Err(invalid("shards", "must be >= 1, got 0"));
        }
        Ok(())
    }

    fn validate_timing(&self) -> Result<(), ConfigError> {
        let at_least_one = [
            ("tick_ms", self.tick_ms),
            ("heartbeat_ticks", self.heartbeat_ticks as u64),
            ("keepalive_count", u64::from(self.keepalive_count)),
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("request_timeout_ms", self.request_timeout_ms),
        ];
        for (key, value) in at_least_one {
            if value == 0 {
                return Err(invalid(key, "must be >= 1, got 0"));
            }
        }
        if self.election_ticks <= self.heartbeat_ticks {
            return Err(invalid(
                "election_ticks",
                format!(
                    "must be greater than heartbeat_ticks ({}), got {}; \
                     otherwise followers time out between heartbeats",
                    self.heartbeat_ticks, self.election_ticks
                ),
            ));
        }
        for (key, value) in [
            ("keepalive_idle_ms", self.keepalive_idle_ms),
            ("keepalive_interval_ms", self.keepalive_interval_ms),
        ] {
            if value < MIN_KEEPALIVE_MS {
                return Err(invalid(
                    key,
                    format!(
                        "must be at least {MIN_KEEPALIVE_MS} (the kernel counts keepalive \
                         time in whole seconds), got {value}"
                    ),
                ));
            }
        }
        Ok(())
    }

    fn validate_sizes(&self) -> Result<(), ConfigError> {
        if self.wal_segment_bytes < MIN_WAL_SEGMENT_BYTES {
            return Err(invalid(
                "wal_segment_bytes",
                format!(
                    "must be at least {MIN_WAL_SEGMENT_BYTES} (1 MiB), got {}",
                    self.wal_segment_bytes
                ),
            ));
        }
        for (key, value) in [
            ("snapshot_entries", self.snapshot_entries),
            ("snapshot_bytes", self.snapshot_bytes),
            ("snapshot_log_percent", self.snapshot_log_percent),
            ("max_client_connections", self.max_client_connections as u64),
            (
                "max_requests_in_flight_per_connection",
                self.max_requests_in_flight_per_connection as u64,
            ),
            ("max_key_bytes", self.max_key_bytes as u64),
            ("max_value_bytes", self.max_value_bytes as u64),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be >= 1, got 0"));
            }
        }
        let needed = self
            .max_key_bytes
            .saturating_add(self.max_value_bytes)
            .saturating_add(FRAME_OVERHEAD_BYTES);
        if self.max_frame_bytes < needed {
            return Err(invalid(
                "max_frame_bytes",
                format!(
                    "{} is too small for the largest request: max_key_bytes ({}) + \
                     max_value_bytes ({}) + {FRAME_OVERHEAD_BYTES} = {needed}",
                    self.max_frame_bytes, self.max_key_bytes, self.max_value_bytes
                ),
            ));
        }
        if self.max_frame_bytes > MAX_FRAME_LIMIT_BYTES {
            return Err(invalid(
                "max_frame_bytes",
                format!(
                    "{} does not fit the 4-byte frame length (at most {MAX_FRAME_LIMIT_BYTES})",
                    self.max_frame_bytes
                ),
            ));
        }
        Ok(())
    }

    fn validate_logging(&self) -> Result<(), ConfigError> {
        if self.log_level.trim().is_empty() {
            return Err(invalid(
                "log_level",
                "is empty; use a tracing filter such as `info` or `corekv_node=debug,info`",
            ));
        }
        Ok(())
    }

    /// TLS is all three files or none; the files are read (and checked)
    /// when the node starts, by the node's TLS module.
    fn validate_tls(&self) -> Result<(), ConfigError> {
        let files = [
            ("tls_cert_file", &self.tls_cert_file),
            ("tls_key_file", &self.tls_key_file),
            ("tls_ca_file", &self.tls_ca_file),
        ];
        let set: Vec<&str> = files
            .iter()
            .filter(|(_, file)| file.is_some())
            .map(|(key, _)| *key)
            .collect();
        if !set.is_empty() && set.len() < files.len() {
            let (missing, _) = files
                .iter()
                .find(|(_, file)| file.is_none())
                .expect("some file is missing");
            return Err(invalid(
                missing,
                format!(
                    "is required with {} (TLS needs a certificate, its key and the CA)",
                    set.join(" and ")
                ),
            ));
        }
        let tls = !set.is_empty();
        if self.peer_tls != tls {
            let why = if tls {
                "cannot be false with TLS on: Raft traffic in clear text next to TLS \
                 clients would protect nothing"
            } else {
                "needs tls_cert_file, tls_key_file and tls_ca_file"
            };
            return Err(invalid("peer_tls", why));
        }
        for (key, mode) in [
            ("client_auth", self.client_auth),
            ("admin_client_auth", self.admin_client_auth),
        ] {
            if mode == ClientAuth::Cert && !tls {
                return Err(invalid(
                    key,
                    "`cert` needs tls_cert_file, tls_key_file and tls_ca_file",
                ));
            }
        }
        Ok(())
    }

    /// Whether the client, peer and admin ports speak TLS.
    pub fn tls_enabled(&self) -> bool {
        self.tls_cert_file.is_some()
    }

    fn validate_peers(&self) -> Result<(), ConfigError> {
        let ids = self.peer_ids();
        let mut seen = BTreeSet::new();
        for peer in &self.peers {
            if peer.id == 0 {
                return Err(invalid(
                    "peers",
                    format!("node id 0 in peers {ids:?}; ids must be >= 1"),
                ));
            }
            if !seen.insert(peer.id) {
                return Err(invalid(
                    "peers",
                    format!(
                        "node id {} appears more than once in peers {ids:?}",
                        peer.id
                    ),
                ));
            }
            if peer.host.trim().is_empty() {
                return Err(invalid(
                    "peers",
                    format!("node {} has an empty host", peer.id),
                ));
            }
            if is_wildcard(&peer.host) {
                return Err(invalid(
                    "peers",
                    format!(
                        "node {} has the wildcard host {}, which cannot be dialled",
                        peer.id, peer.host
                    ),
                ));
            }
            if peer.client_port == 0 || peer.peer_port == 0 || peer.admin_port == Some(0) {
                return Err(invalid(
                    "peers",
                    format!("node {} has port 0; ports must be in 1..=65535", peer.id),
                ));
            }
        }
        let Some(me) = self.peer(self.node_id) else {
            return Err(not_in_peers(self.node_id, &ids));
        };
        let own_ports = [
            ("client_port", self.client_port, Some(me.client_port)),
            ("peer_port", self.peer_port, Some(me.peer_port)),
            ("admin_port", self.admin_port, me.admin_port),
        ];
        for (key, own, listed) in own_ports {
            if let Some(listed) = listed.filter(|&listed| listed != own) {
                return Err(port_mismatch(key, self.node_id, own, listed));
            }
        }
        if me.host != self.advertise_host {
            return Err(invalid(
                "advertise_host",
                format!(
                    "{} differs from host {} in the peers entry of node {}; \
                     peers and clients must be told one address",
                    self.advertise_host, me.host, self.node_id
                ),
            ));
        }
        Ok(())
    }

    /// Every node's port ranges, grouped by host, must not overlap and must end
    /// at 65535 or below.
    fn validate_ports(&self) -> Result<(), ConfigError> {
        let mut by_host: BTreeMap<String, Vec<PortRange>> = BTreeMap::new();
        for peer in &self.peers {
            let ranges = self.port_ranges(peer);
            for range in &ranges {
                if range.end > MAX_PORT + 1 {
                    return Err(invalid(
                        range.key,
                        format!(
                            "{} run past {MAX_PORT} with shards = {}",
                            range, self.shards
                        ),
                    ));
                }
            }
            by_host
                .entry(host_identity(&peer.host))
                .or_default()
                .extend(ranges);
        }
        for (host, ranges) in &by_host {
            for (index, first) in ranges.iter().enumerate() {
                for second in &ranges[index + 1..] {
                    if first.start < second.end && second.start < first.end {
                        // Blame this node's own key if it is involved (the one
                        // thing this node's operator controls), and of two own
                        // ranges the later one: client before peer before admin.
                        let key = if second.key != "peers" {
                            second.key
                        } else {
                            first.key
                        };
                        return Err(invalid(
                            key,
                            format!(
                                "ports collide on {host}: {first} overlap {second} \
                                 (shard s uses client_port + s and peer_port + s, shards = {})",
                                self.shards
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// The half-open port ranges `peer` listens on. This node's admin port is
    /// always known; another node's only if its entry gives it.
    fn port_ranges(&self, peer: &PeerConfig) -> Vec<PortRange> {
        let is_me = peer.id == self.node_id;
        let key = |own_key| if is_me { own_key } else { "peers" };
        let admin_port = if is_me {
            Some(self.admin_port)
        } else {
            peer.admin_port
        };
        let mut ranges = vec![
            PortRange::new(
                peer.id,
                "client",
                key("client_port"),
                peer.client_port,
                self.shards,
            ),
            PortRange::new(
                peer.id,
                "peer",
                key("peer_port"),
                peer.peer_port,
                self.shards,
            ),
        ];
        ranges.extend(
            admin_port.map(|port| PortRange::new(peer.id, "admin", key("admin_port"), port, 1)),
        );
        ranges
    }
}

/// The ports `[start, end)` of one listener kind of one node. Kept in `u32` so
/// that `port + shards` cannot overflow before it is checked.
struct PortRange {
    node_id: u64,
    kind: &'static str,
    /// The key an operator would change to fix a collision: this node's own
    /// port key, or `peers` for another node's entry.
    key: &'static str,
    start: u32,
    end: u32,
}

impl PortRange {
    fn new(node_id: u64, kind: &'static str, key: &'static str, port: u16, count: u32) -> Self {
        let start = u32::from(port);
        PortRange {
            node_id,
            kind,
            key,
            start,
            end: start.saturating_add(count),
        }
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.end - self.start == 1 {
            write!(
                formatter,
                "node {} {} port {}",
                self.node_id, self.kind, self.start
            )
        } else {
            write!(
                formatter,
                "node {} {} ports [{}, {})",
                self.node_id, self.kind, self.start, self.end
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{assert_refused, THREE_NODES};

    #[test]
    fn refuses_missing_or_zero_node_id() {
        assert_refused(
            "shards = 1",
            "node_id",
            &["required", "COREKV_NODE_ID", "--node-id"],
        );
        assert_refused("node_id = 0", "node_id", &[">= 1", "got 0"]);
    }

    #[test]
    fn refuses_zero_shards() {
        assert_refused("node_id = 1\nshards = 0", "shards", &["got 0"]);
    }

    #[test]
    fn refuses_duplicate_peer_ids() {
        let text = THREE_NODES.replace("id = 3", "id = 1");
        assert_refused(
            &text,
            "peers",
            &["node id 1", "more than once", "[1, 2, 1]"],
        );
    }

    #[test]
    fn refuses_own_node_missing_from_peers() {
        let text = THREE_NODES.replacen("node_id = 2", "node_id = 4", 1);
        assert_refused(
            &text,
            "peers",
            &["node id 4 (node_id) is not in peers [1, 2, 3]"],
        );
        // Also when a wildcard listen host would need the missing entry's host.
        let text = text.replacen(
            "node_id = 4",
            "node_id = 4\n        listen_host = \"::\"",
            1,
        );
        assert_refused(
            &text,
            "peers",
            &["node id 4 (node_id) is not in peers [1, 2, 3]"],
        );
        // And when validate() sees a Config built by hand.
        let mut config = Config::from_toml_str(THREE_NODES).unwrap();
        config.peers.retain(|peer| peer.id != 2);
        let error = config.validate().unwrap_err();
        assert_eq!(
            error.to_string(),
            "config key `peers`: node id 2 (node_id) is not in peers [1, 3]"
        );
    }

    #[test]
    fn refuses_bad_peer_entries() {
        assert_refused(
            &THREE_NODES.replace("id = 3", "id = 0"),
            "peers",
            &["node id 0"],
        );
        let wildcard = THREE_NODES.replacen("host = \"127.0.0.1\"", "host = \"0.0.0.0\"", 1);
        assert_refused(&wildcard, "peers", &["node 1", "wildcard"]);
        let zero_port = THREE_NODES.replace("client_port = 7300", "client_port = 0");
        assert_refused(&zero_port, "peers", &["node 3", "port 0"]);
    }

    #[test]
    fn refuses_ports_colliding_once_shards_are_added() {
        // Node 1's client ports [7100, 7104) and its peer port 7102 overlap.
        assert_refused(
            "node_id = 1\nshards = 4\nclient_port = 7100\npeer_port = 7102",
            "peer_port",
            &[
                "the loopback host",
                "node 1 client ports [7100, 7104)",
                "node 1 peer ports [7102, 7106)",
                "shards = 4",
            ],
        );
        // Own admin port inside own client range.
        assert_refused(
            "node_id = 1\nshards = 4\nadmin_port = 7103",
            "admin_port",
            &["node 1 admin port 7103"],
        );
        // This node's (2) client range reaches into node 3's.
        let text = THREE_NODES.replace("client_port = 7300", "client_port = 7203");
        assert_refused(
            &text,
            "client_port",
            &[
                "node 2 client ports [7200, 7204)",
                "node 3 client ports [7203, 7207)",
            ],
        );
        // Raising shards alone can make ranges collide: node 1's client ports
        // [7100, 7201) run into its peer ports at 7150.
        let text = THREE_NODES.replace("shards = 4", "shards = 101");
        assert_refused(
            &text,
            "peers",
            &[
                "node 1 client ports [7100, 7201)",
                "node 1 peer ports [7150, 7251)",
                "shards = 101",
            ],
        );
        // A collision between two other nodes names `peers`.
        let text = THREE_NODES.replace("admin_port = 7390", "admin_port = 7101");
        assert_refused(
            &text,
            "peers",
            &["node 1 client ports [7100, 7104)", "node 3 admin port 7101"],
        );
    }

    #[test]
    fn loopback_names_are_one_host_and_other_hosts_are_separate() {
        let same_ports = r#"
            node_id = 1
            shards = 2
            [[peers]]
            id = 1
            host = "127.0.0.1"
            client_port = 7100
            peer_port = 7150
            [[peers]]
            id = 2
            host = "HOST_2"
            client_port = 7100
            peer_port = 7150
        "#;
        for alias in ["localhost", "127.0.0.2", "::1", "[::1]"] {
            let text = same_ports.replace("HOST_2", alias);
            assert_refused(
                &text,
                "client_port",
                &["the loopback host", "node 2 client ports [7100, 7102)"],
            );
        }
        for other in ["10.0.0.2", "node-2.example"] {
            let text = same_ports.replace("HOST_2", other);
            assert!(Config::from_toml_str(&text).is_ok(), "{other}");
        }
    }

    #[test]
    fn refuses_port_ranges_past_65535() {
        assert_refused(
            "node_id = 1\nshards = 8\nclient_port = 65530",
            "client_port",
            &["node 1 client ports [65530, 65538)", "65535", "shards = 8"],
        );
        let text = THREE_NODES.replace("peer_port = 7350", "peer_port = 65534");
        assert_refused(&text, "peers", &["node 3 peer ports [65534, 65538)"]);
        // The last port itself is usable.
        assert!(Config::from_toml_str(
            "node_id = 1\nshards = 2\nclient_port = 65534\nadmin_port = 7000"
        )
        .is_ok());
        assert_refused("node_id = 1\nclient_port = 0", "peers", &["port 0"]);
    }

    #[test]
    fn refuses_bad_timing() {
        assert_refused("node_id = 1\ntick_ms = 0", "tick_ms", &["got 0"]);
        assert_refused(
            "node_id = 1\nheartbeat_ticks = 0",
            "heartbeat_ticks",
            &["got 0"],
        );
        assert_refused(
            "node_id = 1\nheartbeat_ticks = 5\nelection_ticks = 5",
            "election_ticks",
            &["heartbeat_ticks (5)", "got 5"],
        );
        assert_refused(
            "node_id = 1\nkeepalive_count = 0",
            "keepalive_count",
            &["got 0"],
        );
        assert_refused(
            "node_id = 1\nkeepalive_idle_ms = 500",
            "keepalive_idle_ms",
            &["1000", "got 500"],
        );
        assert_refused(
            "node_id = 1\nkeepalive_interval_ms = 0",
            "keepalive_interval_ms",
            &["got 0"],
        );
        assert_refused(
            "node_id = 1\nconnect_timeout_ms = 0",
            "connect_timeout_ms",
            &["got 0"],
        );
        assert_refused(
            "node_id = 1\nrequest_timeout_ms = 0",
            "request_timeout_ms",
            &["got 0"],
        );
    }

    #[test]
    fn refuses_bad_sizes() {
        assert_refused(
            "node_id = 1\nwal_segment_bytes = 1048575",
            "wal_segment_bytes",
            &["1048576", "got 1048575"],
        );
        assert!(Config::from_toml_str("node_id = 1\nwal_segment_bytes = 1048576").is_ok());
        assert_refused(
            "node_id = 1\nmax_frame_bytes = 1000\nmax_key_bytes = 10\nmax_value_bytes = 100",
            "max_frame_bytes",
            &[
                "1000",
                "max_key_bytes (10)",
                "max_value_bytes (100)",
                "1134",
            ],
        );
        assert!(Config::from_toml_str(
            "node_id = 1\nmax_frame_bytes = 1134\nmax_key_bytes = 10\nmax_value_bytes = 100"
        )
        .is_ok());
        assert_refused(
            "node_id = 1\nmax_frame_bytes = 4294967296",
            "max_frame_bytes",
            &["4-byte"],
        );
        assert_refused(
            "node_id = 1\nsnapshot_entries = 0",
            "snapshot_entries",
            &["got 0"],
        );
        assert_refused(
            "node_id = 1\nmax_key_bytes = 0",
            "max_key_bytes",
            &["got 0"],
        );
    }

    #[test]
    fn refuses_empty_strings() {
        assert_refused("node_id = 1\nlog_level = \" \"", "log_level", &["empty"]);
        assert_refused("node_id = 1\ndata_dir = \"\"", "data_dir", &["empty"]);
        assert_refused("node_id = 1\nlisten_host = \"\"", "listen_host", &["empty"]);
    }
}
