//! Node configuration for `corekv run`.
//!
//! Every setting is a key of [`Config`] and can come from four layers, highest
//! first: a command-line flag (`--client-port`), an environment variable
//! (`COREKV_CLIENT_PORT`), the TOML file named by `--config FILE` /
//! `COREKV_CONFIG` (`client_port = 7100`), and the built-in default. Layers are
//! merged key by key; `peers` is one key, so a higher layer replaces the whole
//! list rather than adding entries to it. Each key is declared once, as a row
//! of the `config_keys!` table below, so that its field, flag, variable, file
//! key, merge and default cannot drift apart.
//!
//! An environment variable that is set but empty counts as unset, so a
//! container template can leave `COREKV_ADVERTISE_HOST=` in place without
//! meaning "the empty host".
//!
//! # Port layout
//!
//! A node with `client_port = C`, `peer_port = P` and `shards = S` serves shard
//! `s` on `C + s` (clients) and `P + s` (peers), i.e. the half-open ranges
//! `[C, C + S)` and `[P, P + S)`, plus one admin HTTP port. Start-up fails if
//! any of these ranges collide between any two nodes of `peers` that share a
//! host (all loopback names count as one host), or run past 65535. The system
//! corekv replaces derived its metrics port from the other ports and collided
//! on one host; this check is the answer to that.
//!
//! # Example file
//!
//! ```toml
//! node_id = 1
//! shards = 4
//! data_dir = "/var/lib/corekv"
//! listen_host = "0.0.0.0"
//!
//! [[peers]]
//! id = 1
//! host = "10.0.0.1"
//! client_port = 7100
//! peer_port = 7150
//! admin_port = 7190
//!
//! [[peers]]
//! id = 2
//! host = "10.0.0.2"
//! client_port = 7100
//! peer_port = 7150
//! admin_port = 7190
//! ```
//!
//! Node 1 takes its client, peer and admin ports and its advertise host from
//! its own `peers` entry, because none of them is set on their own.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod error;
mod keys;
mod peers;
// Adds `Config::validate` and imports `Config` from here, so nothing here
// imports from it: the arrow runs one way.
mod validate;

pub use error::ConfigError;
pub use peers::{host_port, PeerConfig};

use error::{invalid, not_in_peers, port_mismatch};
use keys::{config_keys, non_empty};
use peers::{is_wildcard, parse_peers, PEERS_SYNTAX};

const MIB: u64 = 1024 * 1024;

/// Half of MemTotal from /proc/meminfo; 0 (no limit) if it cannot be read.
fn half_of_machine_memory() -> u64 {
    let Ok(meminfo) = std::fs::read_to_string("/proc/meminfo") else {
        return 0;
    };
    meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kib| kib * 1024 / 2)
}

config_keys! {
    /// This node's Raft id, >= 1. Required: there is no safe default, since two
    /// nodes with one id would corrupt each other's groups.
    node_id: u64 {
        flag: u64, "ID", "This node's id, >= 1; required",
        env: "COREKV_NODE_ID",
    }
    /// Id of the cluster, exchanged in the peer handshake so that a node of
    /// another cluster is refused. Default 1.
    cluster_id: u64 {
        default: 1,
        flag: u64, "ID", "Cluster id checked at the peer handshake [default: 1]",
        env: "COREKV_CLUSTER_ID",
    }
    /// Directory of the WAL and snapshots (one subdirectory per shard). A
    /// relative path is relative to the working directory of the process, not
    /// to the config file. Default `./corekv-data`.
    data_dir: PathBuf {
        default: PathBuf::from("./corekv-data"),
        flag: PathBuf, "DIR", "Directory of the WAL and snapshots [default: ./corekv-data]",
        env: "COREKV_DATA_DIR",
    }
    /// Interface to bind the client, peer and admin listeners on. Default
    /// `127.0.0.1`, so a node is not reachable from the network until asked;
    /// use `0.0.0.0` or `::` to listen on every interface.
    listen_host: String {
        default: "127.0.0.1".to_string(),
        flag: String, "HOST", "Interface to bind [default: 127.0.0.1]",
        env: "COREKV_LISTEN_HOST",
    }
    /// Host other nodes and clients dial to reach this node (in leader hints
    /// and topology). Default: this node's `host` in `peers` if it has an
    /// entry there, else `listen_host`; required when `listen_host` is a
    /// wildcard (`0.0.0.0`, `::`) and `peers` does not name this node. If set,
    /// it must equal this node's `host` in `peers`.
    advertise_host: String {
        default: dialable_listen_host(&listen_host)?,
        flag: String, "HOST",
            "Host peers and clients dial [default: own host in peers, else listen host]",
        env: "COREKV_ADVERTISE_HOST",
    }
    /// First client port: shard `s` serves clients on `client_port + s`, and
    /// any of them accepts any key. Default: this node's `client_port` in
    /// `peers`, else 7100. If set, it must equal the `peers` entry.
    client_port: u16 {
        default: 7100,
        flag: u16, "PORT",
            "First client port; shard s uses client_port + s \
             [default: own entry in peers, else 7100]",
        env: "COREKV_CLIENT_PORT",
    }
    /// First peer port: shard `s` serves Raft traffic on `peer_port + s`.
    /// Default: this node's `peer_port` in `peers`, else 7150. If set, it must
    /// equal the `peers` entry.
    peer_port: u16 {
        default: 7150,
        flag: u16, "PORT",
            "First peer port; shard s uses peer_port + s \
             [default: own entry in peers, else 7150]",
        env: "COREKV_PEER_PORT",
    }
    /// Port of the admin HTTP server (`/metrics`, `/status`, `/health/*`).
    /// Default: this node's `admin_port` in `peers`, else 7190. If both are
    /// set they must be equal.
    admin_port: u16 {
        default: 7190,
        flag: u16, "PORT", "Admin HTTP port [default: own entry in peers, else 7190]",
        env: "COREKV_ADMIN_PORT",
    }
    /// Number of shards (threads, Raft groups, port offsets). Fixed when the
    /// cluster is created, and must be the same on every node (the handshake
    /// refuses a peer with another count). Default: the number of CPUs this
    /// process may use, so set it explicitly for a multi-node cluster whose
    /// machines differ.
    shards: u32 {
        default: default_shards(),
        flag: u32, "N", "Number of shards, the same on every node [default: CPU count]",
        env: "COREKV_SHARDS",
    }
    /// CPUs the shard threads are pinned to: shard `s` runs on
    /// `cpus[s % len]`. Default (empty): every CPU this process may use, in
    /// order. Set it when several nodes share a machine (as `corekv dev`
    /// does), or to keep shards off CPUs reserved for other work.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    cpus: Vec<usize> {
        default: Vec::new(),
        flag: String, "CPU,...",
            "CPUs to pin shard threads to, e.g. 0,2 (shard s on the (s mod n)-th) \
             [default: every CPU this process may use]",
        parse: parse_cpus,
        env: "COREKV_CPUS",
    }
    /// Every voter of the cluster, this node included. All nodes must list the
    /// same set. Default: this node alone (a single-node cluster), built from
    /// `node_id`, `advertise_host` and the own ports.
    peers: Vec<PeerConfig> {
        default: vec![PeerConfig {
            id: node_id,
            host: advertise_host.clone(),
            client_port,
            peer_port,
            admin_port: Some(admin_port),
        }],
        flag: String, PEERS_SYNTAX,
            "Every voter, this node included, e.g. \
             1=10.0.0.1:7100:7150:7190,2=10.0.0.2:7100:7150:7190 [default: this node alone]",
        parse: parse_peers,
        env: "COREKV_PEERS",
    }
    /// Client addresses (`HOST:PORT`) of members of an existing cluster to
    /// join. Read only on the first start with an empty data directory: the
    /// node asks one of them for the cluster's id and shard count (both must
    /// match this node's `cluster_id` and `shards`), starts with no members,
    /// and waits until an operator adds it (`corekv member add`). `peers`
    /// is then not used. Default: empty (a new cluster of `peers`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    join: Vec<String> {
        default: Vec::new(),
        flag: String, "HOST:PORT,...",
            "Join the cluster these client addresses belong to (first start only) \
             [default: start a new cluster of peers]",
        parse: parse_join,
        env: "COREKV_JOIN",
    }
    /// Length of one Raft tick in milliseconds. Default 10.
    tick_ms: u64 {
        default: 10,
        flag: u64, "MS", "Raft tick length in ms [default: 10]",
        env: "COREKV_TICK_MS",
    }
    /// Ticks between leader heartbeats. Default 3 (30 ms).
    heartbeat_ticks: usize {
        default: 3,
        flag: usize, "TICKS", "Ticks between heartbeats [default: 3]",
        env: "COREKV_HEARTBEAT_TICKS",
    }
    /// Ticks without a heartbeat before a follower starts an election (raft-rs
    /// randomises it in `[election_ticks, 2 * election_ticks)`). Must be
    /// greater than `heartbeat_ticks`. Default 30 (300 ms).
    election_ticks: usize {
        default: 30,
        flag: usize, "TICKS", "Ticks before an election, > heartbeat ticks [default: 30]",
        env: "COREKV_ELECTION_TICKS",
    }
    /// Idle time before the first TCP keepalive probe on a peer link, in
    /// milliseconds, at least 1000 (the kernel counts whole seconds). Default
    /// 10000. Keeps idle links alive through NAT and firewalls and detects a
    /// dead peer.
    keepalive_idle_ms: u64 {
        default: 10_000,
        flag: u64, "MS", "TCP keepalive idle time in ms, >= 1000 [default: 10000]",
        env: "COREKV_KEEPALIVE_IDLE_MS",
    }
    /// Time between TCP keepalive probes in milliseconds, at least 1000.
    /// Default 5000.
    keepalive_interval_ms: u64 {
        default: 5_000,
        flag: u64, "MS", "TCP keepalive probe interval in ms, >= 1000 [default: 5000]",
        env: "COREKV_KEEPALIVE_INTERVAL_MS",
    }
    /// Unanswered keepalive probes before the kernel drops a connection.
    /// Default 3.
    keepalive_count: u32 {
        default: 3,
        flag: u32, "N", "TCP keepalive probes before a link is dropped [default: 3]",
        env: "COREKV_KEEPALIVE_COUNT",
    }
    /// Timeout of one outgoing TCP connect, in milliseconds. Default 3000.
    connect_timeout_ms: u64 {
        default: 3_000,
        flag: u64, "MS", "TCP connect timeout in ms [default: 3000]",
        env: "COREKV_CONNECT_TIMEOUT_MS",
    }
    /// Size of one preallocated WAL segment file, at least 1 MiB. Default
    /// 64 MiB.
    wal_segment_bytes: u64 {
        default: 64 * MIB,
        flag: u64, "BYTES", "WAL segment size in bytes, >= 1 MiB [default: 67108864]",
        env: "COREKV_WAL_SEGMENT_BYTES",
    }
    /// Upper bound on the retired WAL segments a shard keeps for new
    /// segments to reuse (0: delete them). It keeps at most twice the log it
    /// writes between two snapshots (see `snapshot_log_percent`), so a small
    /// state keeps little. Writing into an old segment's blocks zero-fills
    /// no page cache, touches no fresh memory and converts no unwritten
    /// extents, so each fdatasync writes data only. Default 8 GiB: every
    /// segment is a reused one up to a state of about 6 GB a shard. A free
    /// file exists only because the live log was that long before, so
    /// reuse keeps the WAL directory at its peak size, never above it.
    wal_recycle_bytes: u64 {
        default: 8 * 1024 * MIB,
        flag: u64, "BYTES", "At most this many retired WAL segment bytes kept for reuse per shard [default: 8589934592]",
        env: "COREKV_WAL_RECYCLE_BYTES",
    }
    /// A shard snapshots its state machine when the log since the last
    /// snapshot passes this many entries (or `snapshot_bytes`). Default
    /// 1000000: it bounds the log of tiny entries (and the WAL's 32 B of
    /// index per entry); for entries of more than about 70 B `snapshot_bytes`
    /// comes first. At 100000 a 30 MB state of 256 B values wrote a snapshot
    /// every second under pipelined puts, a fifth of the cluster's CPU.
    snapshot_entries: u64 {
        default: 1_000_000,
        flag: u64, "N", "Snapshot after this many log entries [default: 1000000]",
        env: "COREKV_SNAPSHOT_ENTRIES",
    }
    /// A shard snapshots its state machine when the log since the last
    /// snapshot passes this many bytes (or `snapshot_entries`). Default 64 MiB.
    snapshot_bytes: u64 {
        default: 64 * MIB,
        flag: u64, "BYTES", "Snapshot after this many log bytes [default: 67108864]",
        env: "COREKV_SNAPSHOT_BYTES",
    }
    /// Both snapshot thresholds grow with the state: a snapshot is due only
    /// once the log since the last one also passes this percentage of the
    /// state at that snapshot (its accounted bytes, and its keys for
    /// `snapshot_entries`), so snapshot writes stay below the log writes
    /// however large the state. Default 125: with 100, a state whose every
    /// key is overwritten in turn snapshots after as many writes as it has
    /// keys, and wrote 1.07x the log's bytes in snapshots (BIG, 180 s); 125
    /// keeps that near 0.85x for a quarter more log to replay at restart.
    snapshot_log_percent: u64 {
        default: 125,
        flag: u64, "PERCENT", "Snapshot only after log of this % of the state's size [default: 125]",
        env: "COREKV_SNAPSHOT_LOG_PERCENT",
    }
    /// Accounted bytes (keys, values, 250 bytes per pair) the node's state
    /// machines may hold, shared evenly by its shards; a write that would
    /// pass its shard's share is refused with RESOURCE_EXHAUSTED, deletes
    /// and shrinking writes still work. 0 = no limit. Default: half of the
    /// machine's memory.
    max_memory_bytes: u64 {
        default: half_of_machine_memory(),
        flag: u64, "BYTES", "State machine memory limit, all shards [default: half of the machine's memory]",
        env: "COREKV_MAX_MEMORY_BYTES",
    }
    /// Largest frame accepted on any connection; a bigger one is refused and
    /// its connection closed. At least `max_key_bytes + max_value_bytes +
    /// 1024`, at most 4 GiB - 1 (the length prefix is 32 bits). Default 16 MiB.
    max_frame_bytes: usize {
        default: 16 * MIB as usize,
        flag: usize, "BYTES", "Largest frame on any connection [default: 16777216]",
        env: "COREKV_MAX_FRAME_BYTES",
    }
    /// Largest key accepted; a longer one is answered TOO_LARGE. Default 4096.
    max_key_bytes: usize {
        default: 4096,
        flag: usize, "BYTES", "Largest key [default: 4096]",
        env: "COREKV_MAX_KEY_BYTES",
    }
    /// Largest value accepted; a longer one is answered TOO_LARGE. Default
    /// 1 MiB.
    max_value_bytes: usize {
        default: MIB as usize,
        flag: usize, "BYTES", "Largest value [default: 1048576]",
        env: "COREKV_MAX_VALUE_BYTES",
    }
    /// Client connections this node holds at once, over all its shards; a
    /// connection past it gets one UNAVAILABLE answer and is closed, so a
    /// burst of connections cannot exhaust file descriptors or memory.
    /// Default 10000 (as Redis's maxclients; `corekv bench` runs up to 10000
    /// clients). Raise the process's file limit to match.
    max_client_connections: usize {
        default: 10_000,
        flag: usize, "N", "Client connections held at once, all shards [default: 10000]",
        env: "COREKV_MAX_CLIENT_CONNECTIONS",
    }
    /// A client connection with no request in flight that sends nothing for
    /// this many milliseconds is closed (0 = never). Default 300000 (5 min).
    client_idle_timeout_ms: u64 {
        default: 300_000,
        flag: u64, "MS", "Close client connections idle this long, 0 = never [default: 300000]",
        env: "COREKV_CLIENT_IDLE_TIMEOUT_MS",
    }
    /// Requests of one client connection served at once; past it the node
    /// stops reading that connection until answers have gone out
    /// (back-pressure). Default 1024.
    max_requests_in_flight_per_connection: usize {
        default: 1024,
        flag: usize, "N", "Requests of one connection served at once [default: 1024]",
        env: "COREKV_MAX_REQUESTS_IN_FLIGHT_PER_CONNECTION",
    }
    /// A pending client request older than this many milliseconds is answered
    /// TIMEOUT, so no request is left hanging. Default 5000.
    request_timeout_ms: u64 {
        default: 5_000,
        flag: u64, "MS", "Pending requests older than this are answered TIMEOUT [default: 5000]",
        env: "COREKV_REQUEST_TIMEOUT_MS",
    }
    /// An fdatasync slower than this many milliseconds is logged as a "slow
    /// fsync" warning. Default 100.
    slow_fsync_ms: u64 {
        default: 100,
        flag: u64, "MS", "Warn about an fdatasync slower than this [default: 100]",
        env: "COREKV_SLOW_FSYNC_MS",
    }
    /// A shard loop turn longer than this many milliseconds is logged as a
    /// "slow loop turn" warning that says where its time went: during a
    /// turn the shard answers nothing, sends no heartbeat and sees no
    /// fsync finish. Default 100.
    slow_turn_ms: u64 {
        default: 100,
        flag: u64, "MS", "Warn about a shard loop turn longer than this [default: 100]",
        env: "COREKV_SLOW_TURN_MS",
    }
    /// PEM certificate chain this node presents on its client, peer and
    /// admin ports. Setting it turns TLS on for all three (with
    /// `tls_key_file` and `tls_ca_file`, both then required). It must name
    /// `node-<node_id>.cluster-<cluster_id>` (a DNS SAN) for peers to accept
    /// it, and the hosts clients dial. Default: none, plaintext.
    tls_cert_file: Option<PathBuf> {
        default: None,
        flag: String, "FILE", "PEM certificate chain; turns TLS on [default: none, plaintext]",
        parse: some_path,
        env: "COREKV_TLS_CERT_FILE",
    }
    /// PEM private key of `tls_cert_file`.
    tls_key_file: Option<PathBuf> {
        default: None,
        flag: String, "FILE", "PEM private key of tls_cert_file [default: none]",
        parse: some_path,
        env: "COREKV_TLS_KEY_FILE",
    }
    /// PEM certificates of the CA that signs every node's certificate and,
    /// with `client_auth = "cert"`, every client's.
    tls_ca_file: Option<PathBuf> {
        default: None,
        flag: String, "FILE", "PEM CA certificates for peers and clients [default: none]",
        parse: some_path,
        env: "COREKV_TLS_CA_FILE",
    }
    /// Mutual TLS between nodes: each side presents its certificate and
    /// checks that the other's chains to `tls_ca_file` and names the node id
    /// it claims. Required when TLS is on (so it defaults to whether TLS is
    /// on): Raft traffic in clear text next to TLS clients would protect
    /// nothing.
    peer_tls: bool {
        default: tls_cert_file.is_some(),
        flag: String, "BOOL", "Mutual TLS between nodes; required with TLS [default: TLS on]",
        parse: parse_bool,
        env: "COREKV_PEER_TLS",
    }
    /// `none`: clients need no certificate (they still check the node's);
    /// `cert`: a client without a certificate signed by `tls_ca_file` is
    /// refused at the handshake. Default `none`.
    client_auth: ClientAuth {
        default: ClientAuth::None,
        flag: String, "MODE", "none or cert (clients must present a certificate) [default: none]",
        parse: str::parse,
        env: "COREKV_CLIENT_AUTH",
    }
    /// The admin HTTP port (HTTPS with TLS on): `none` serves anyone who
    /// trusts the CA; `cert` asks Prometheus and `corekv top` for a client
    /// certificate signed by `tls_ca_file` too. Default `none`.
    admin_client_auth: ClientAuth {
        default: ClientAuth::None,
        flag: String, "MODE", "none or cert (admin HTTPS clients must present a certificate) [default: none]",
        parse: str::parse,
        env: "COREKV_ADMIN_CLIENT_AUTH",
    }
    /// Log filter in `tracing` EnvFilter syntax (`info`,
    /// `corekv_node=debug,info`). Read from `--log-level`, then
    /// `COREKV_LOG_LEVEL`, then `RUST_LOG`, then the file. Default `info`.
    log_level: String {
        default: "info".to_string(),
        flag: String, "FILTER",
            "Log filter, e.g. info or corekv_node=debug,info [default: info]",
        // RUST_LOG too, because that is where Rust operators look first.
        env: "COREKV_LOG_LEVEL" then "RUST_LOG",
    }
    /// `text` or `json`. Default `text`.
    log_format: LogFormat {
        default: LogFormat::Text,
        flag: String, "FORMAT", "text or json [default: text]",
        parse: str::parse,
        env: "COREKV_LOG_FORMAT",
    }
}

/// Whether clients must present a certificate (see `client_auth`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// Any client that completes the handshake.
    None,
    /// Only clients with a certificate signed by `tls_ca_file`.
    Cert,
}

impl FromStr for ClientAuth {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim().to_ascii_lowercase().as_str() {
            "none" => Ok(ClientAuth::None),
            "cert" => Ok(ClientAuth::Cert),
            _ => Err("expected `none` or `cert`".to_string()),
        }
    }
}

fn some_path(text: &str) -> Result<Option<PathBuf>, String> {
    Ok(Some(PathBuf::from(text)))
}

fn parse_bool(text: &str) -> Result<bool, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err("expected `true` or `false`".to_string()),
    }
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (tracing-subscriber's default format).
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err("expected `text` or `json`".to_string()),
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

impl Layer {
    /// The file layer.
    fn from_toml(path: &Path, text: &str) -> Result<Layer, ConfigError> {
        toml::from_str(text).map_err(|source| ConfigError::File {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Takes this node's ports and advertise host from its `peers` entry where
    /// no layer set them, before the table's defaults would: the entry is what
    /// the other nodes dial. A setting that disagrees with the entry is refused
    /// rather than silently preferred, since either choice would leave the
    /// cluster unable to reach this node.
    fn fill_from_own_entry(&mut self) -> Result<(), ConfigError> {
        // `peers = []` in the file means this node alone, as no list does.
        self.peers = self.peers.take().filter(|peers| !peers.is_empty());
        // Without a node id there is no entry to find; `into_config` then
        // reports node_id as required.
        let (Some(node_id), Some(peers)) = (self.node_id, &self.peers) else {
            return Ok(());
        };
        let Some(listed) = peers.iter().find(|peer| peer.id == node_id) else {
            // Said here, before a default could fail on a consequence of it.
            let ids: Vec<u64> = peers.iter().map(|peer| peer.id).collect();
            return Err(not_in_peers(node_id, &ids));
        };
        self.client_port = own_port(
            "client_port",
            node_id,
            self.client_port,
            Some(listed.client_port),
        )?;
        self.peer_port = own_port("peer_port", node_id, self.peer_port, Some(listed.peer_port))?;
        self.admin_port = own_port("admin_port", node_id, self.admin_port, listed.admin_port)?;
        if self.advertise_host.is_none() {
            self.advertise_host = Some(listed.host.clone());
        }
        Ok(())
    }
}

/// Parses the `--join` / `COREKV_JOIN` syntax: `HOST:PORT` separated by
/// commas.
fn parse_join(text: &str) -> Result<Vec<String>, String> {
    let addrs: Vec<String> = text
        .split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(str::to_string)
        .collect();
    for addr in &addrs {
        let port = addr.rsplit_once(':').map(|(_, port)| port);
        if port.and_then(|p| p.parse::<u16>().ok()).is_none() {
            return Err(format!(
                "`{addr}` is not HOST:PORT (a member's client address)"
            ));
        }
    }
    Ok(addrs)
}

/// Parses the `--cpus` / `COREKV_CPUS` syntax: CPU ids separated by commas.
fn parse_cpus(text: &str) -> Result<Vec<usize>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            entry
                .parse::<usize>()
                .map_err(|_| format!("`{entry}` is not a CPU id; expected ids like 0,2,3"))
        })
        .collect()
}

/// This node's port `key`: the explicit setting (any layer), else its `peers`
/// entry. An explicit value that disagrees with the entry is an error, since
/// peers would dial the one and this node would bind the other.
fn own_port(
    key: &'static str,
    node_id: u64,
    explicit: Option<u16>,
    listed: Option<u16>,
) -> Result<Option<u16>, ConfigError> {
    match (explicit, listed) {
        (Some(own), Some(listed)) if own != listed => Err(port_mismatch(key, node_id, own, listed)),
        _ => Ok(explicit.or(listed)),
    }
}

fn default_shards() -> u32 {
    std::thread::available_parallelism()
        .map(|count| u32::try_from(count.get()).unwrap_or(u32::MAX))
        .unwrap_or(1)
}

/// The default advertise host of a node that `peers` does not list: its listen
/// host, unless that is a wildcard, which no one can dial.
fn dialable_listen_host(listen_host: &str) -> Result<String, ConfigError> {
    if is_wildcard(listen_host) {
        return Err(invalid(
            "advertise_host",
            format!(
                "is required when listen_host is the wildcard {listen_host} and peers \
                 does not list this node: peers and clients need an address they can dial"
            ),
        ));
    }
    Ok(listen_host.to_string())
}

impl Config {
    /// Builds the configuration of `corekv run` from its flags, the process
    /// environment, the config file (`--config` or `COREKV_CONFIG`) and the
    /// defaults, in that order of precedence, then validates it.
    ///
    /// Own ports and advertise host: each is taken from, in order, its own
    /// setting in any layer, this node's entry in `peers`, and the default. If
    /// both the setting and the `peers` entry are given they must agree: the
    /// `peers` list is what the other nodes dial, so silently preferring
    /// either would leave the cluster unable to reach this node.
    ///
    /// `peers` is `ID=HOST:CLIENT_PORT:PEER_PORT[:ADMIN_PORT]`, comma
    /// separated, in a flag or env var (e.g.
    /// `1=127.0.0.1:7100:7150,2=127.0.0.1:7200:7250`), and an array of
    /// `[[peers]]` tables in the file.
    pub fn load(args: &RunArgs) -> Result<Config, ConfigError> {
        // A non-UTF-8 variable is kept (lossily) rather than ignored, so that
        // it fails to parse with its name instead of silently not applying.
        let env =
            |name: &str| std::env::var_os(name).map(|value| value.to_string_lossy().into_owned());
        let path = args
            .config
            .clone()
            .or_else(|| non_empty(env("COREKV_CONFIG")).map(PathBuf::from));
        let text = match &path {
            Some(path) => {
                Some(
                    std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
                        path: path.clone(),
                        source,
                    })?,
                )
            }
            None => None,
        };
        let file = path.as_deref().zip(text.as_deref());
        load_from(args, env, file)
    }

    /// Parses TOML text as the only layer (no flags, no environment), applies
    /// the defaults and validates. Used by tests and by `corekv dev`.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        let file = Layer::from_toml(Path::new("<toml text>"), text)?;
        let config = resolve(file)?;
        config.validate()?;
        Ok(config)
    }

    /// The configuration as a TOML file that [`Config::from_toml_str`] reads
    /// back to an equal `Config`, every key written out.
    ///
    /// # Panics
    ///
    /// If `data_dir` is not UTF-8, which [`Config::validate`] refuses.
    pub fn to_toml_string(&self) -> String {
        toml::to_string(self).unwrap_or_else(|error| {
            panic!(
                "config should serialise to TOML (data_dir {}): {error}",
                self.data_dir.display()
            )
        })
    }

    /// This node's entry in `peers`.
    ///
    /// # Panics
    ///
    /// If `peers` has no entry for `node_id`, which [`Config::validate`]
    /// refuses.
    pub fn me(&self) -> &PeerConfig {
        self.peer(self.node_id).unwrap_or_else(|| {
            panic!(
                "node {} should be in peers {:?}, as validate() checks",
                self.node_id,
                self.peer_ids()
            )
        })
    }

    /// The `peers` entry of node `id`.
    pub fn peer(&self, id: u64) -> Option<&PeerConfig> {
        self.peers.iter().find(|peer| peer.id == id)
    }

    /// Address to bind shard `shard`'s client listener on.
    pub fn client_listen_addr(&self, shard: u32) -> String {
        host_port(&self.listen_host, u32::from(self.client_port) + shard)
    }

    /// Address to bind shard `shard`'s peer listener on.
    pub fn peer_listen_addr(&self, shard: u32) -> String {
        host_port(&self.listen_host, u32::from(self.peer_port) + shard)
    }

    /// Address to bind the admin HTTP server on.
    pub fn admin_listen_addr(&self) -> String {
        host_port(&self.listen_host, u32::from(self.admin_port))
    }

    /// One Raft tick (`tick_ms`).
    pub fn tick(&self) -> Duration {
        Duration::from_millis(self.tick_ms)
    }

    /// Time between leader heartbeats (`heartbeat_ticks * tick_ms`).
    pub fn heartbeat_interval(&self) -> Duration {
        self.tick()
            .saturating_mul(saturating_u32(self.heartbeat_ticks))
    }

    /// Shortest election timeout (`election_ticks * tick_ms`); raft-rs
    /// randomises the actual one up to twice this.
    pub fn election_timeout(&self) -> Duration {
        self.tick()
            .saturating_mul(saturating_u32(self.election_ticks))
    }

    /// TCP keepalive idle time (`keepalive_idle_ms`).
    pub fn keepalive_idle(&self) -> Duration {
        Duration::from_millis(self.keepalive_idle_ms)
    }

    /// TCP keepalive probe interval (`keepalive_interval_ms`).
    pub fn keepalive_interval(&self) -> Duration {
        Duration::from_millis(self.keepalive_interval_ms)
    }

    /// Timeout of one outgoing connect (`connect_timeout_ms`).
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// Age at which a pending request is answered TIMEOUT (`request_timeout_ms`).
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// Threshold of the "slow fsync" warning (`slow_fsync_ms`).
    pub fn slow_fsync(&self) -> Duration {
        Duration::from_millis(self.slow_fsync_ms)
    }

    /// Threshold of the "slow loop turn" warning (`slow_turn_ms`).
    pub fn slow_turn(&self) -> Duration {
        Duration::from_millis(self.slow_turn_ms)
    }

    fn peer_ids(&self) -> Vec<u64> {
        self.peers.iter().map(|peer| peer.id).collect()
    }
}

fn saturating_u32(value: usize) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

/// Merges the layers (flag > env > file > default) and validates. `load`
/// reads the real environment and file; tests pass a map and a string.
fn load_from(
    args: &RunArgs,
    env: impl Fn(&str) -> Option<String>,
    file: Option<(&Path, &str)>,
) -> Result<Config, ConfigError> {
    let flags = Layer::from_args(args)?;
    let env = Layer::from_env(&env)?;
    let file = match file {
        Some((path, text)) => Layer::from_toml(path, text)?,
        None => Layer::default(),
    };
    let config = resolve(flags.over(env.over(file)))?;
    config.validate()?;
    Ok(config)
}

/// Fills the merged layer's gaps: this node's ports and advertise host from
/// its `peers` entry, then the defaults of the table.
fn resolve(mut layer: Layer) -> Result<Config, ConfigError> {
    layer.fill_from_own_entry()?;
    let mut config = layer.into_config()?;
    // The own entry always carries the admin port, so that the list this node
    // reports (status, topology) is complete.
    let (node_id, admin_port) = (config.node_id, config.admin_port);
    for peer in config.peers.iter_mut().filter(|peer| peer.id == node_id) {
        peer.admin_port.get_or_insert(admin_port);
    }
    Ok(config)
}

#[cfg(test)]
mod tests;
