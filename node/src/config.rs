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

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

const MIB: u64 = 1024 * 1024;

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

/// The `--peers` / `COREKV_PEERS` syntax, quoted in every parse error.
const PEERS_SYNTAX: &str = "ID=HOST:CLIENT_PORT:PEER_PORT[:ADMIN_PORT],...";

/// Declares every key of [`Config`] once: each row below generates the
/// `Config` field, the `RunArgs` flag, the `Layer` field that the file, the
/// environment and the flags are read into, the merge and the default. A key
/// written in seven places could be added to one layer and forgotten in
/// another; here it cannot.
///
/// A row, after the field's doc comment and any `#[serde]` attribute for
/// `Config`:
///
/// - `default: EXPR`, used when no layer sets the key. It may read the keys
///   declared above it (they are bound by then) and return an error with `?`.
///   A row without `default` is required.
/// - `flag: TYPE, VALUE_NAME, HELP`: the `--key-name` flag as clap reads it.
///   ` [env: NAME]` is appended to HELP, so the help cannot name another
///   variable than the one read.
/// - `parse: FN` for a key whose flag and variable are text in a syntax of
///   their own (`fn(&str) -> Result<T, String>`, with flag type `String`), so
///   that their errors name the key like every other. Without it clap parses
///   the flag and [`FromEnvText`] the variable.
/// - `env: "COREKV_KEY"`, optionally `then "OTHER"`: the variables read, in
///   that order.
macro_rules! config_keys {
    (
        $(
            $(#[$attr:meta])*
            $key:ident: $ty:ty {
                $(default: $default:expr,)?
                flag: $flag_ty:ident, $value_name:expr, $help:literal,
                $(parse: $parse:expr,)?
                env: $env:literal $(then $fallback:literal)?,
            }
        )*
    ) => {
        /// The settings of one corekv node, after all layers are merged and validated.
        ///
        /// Built by [`Config::load`] (for `corekv run`) or [`Config::from_toml_str`];
        /// both validate, so code that receives a `Config` can rely on
        /// [`Config::validate`]'s rules.
        #[derive(Clone, Debug, PartialEq, Serialize)]
        pub struct Config {
            $(
                $(#[$attr])*
                pub $key: $ty,
            )*
        }

        /// Flags of `corekv run`. Every key is optional here: unset keys fall back to
        /// the environment, then the config file, then the default (see the module
        /// documentation). Environment variables are read by [`Config::load`], not by
        /// clap, so that tests can inject them.
        #[derive(clap::Args, Clone, Debug, Default, PartialEq, Eq)]
        pub struct RunArgs {
            /// TOML config file; its keys are the flag names in snake_case [env: COREKV_CONFIG]
            #[arg(long, value_name = "FILE")]
            pub config: Option<PathBuf>,
            $(
                #[arg(
                    long,
                    value_name = $value_name,
                    help = concat!($help, " [env: ", $env, $(", then ", $fallback,)? "]"),
                )]
                pub $key: Option<$flag_ty>,
            )*
        }

        /// One configuration layer: every key optional. The file is parsed straight
        /// into this type, so a key the file may not contain is refused by name.
        #[derive(Clone, Debug, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Layer {
            $($key: Option<$ty>,)*
        }

        impl Layer {
            /// Key by key, `self` wins where it has a value and `lower` fills the rest.
            fn over(self, lower: Layer) -> Layer {
                Layer {
                    $($key: self.$key.or(lower.$key),)*
                }
            }

            /// The flag layer.
            fn from_args(args: &RunArgs) -> Result<Layer, ConfigError> {
                let args = args.clone();
                Ok(Layer {
                    $($key: config_keys!(@flag $key, args.$key, [$($parse)?]),)*
                })
            }

            /// The environment layer.
            fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Result<Layer, ConfigError> {
                Ok(Layer {
                    $(
                        $key: env_with(
                            env,
                            stringify!($key),
                            &[$env $(, $fallback)?],
                            config_keys!(@env_parse $ty, [$($parse)?]),
                        )?,
                    )*
                })
            }

            /// Gives every key no layer set its default, in table order so that a
            /// default can use the keys above it.
            fn into_config(self) -> Result<Config, ConfigError> {
                let Layer { $($key,)* } = self;
                $(
                    let $key: $ty = config_keys!(@or_default $key, $env, [$($default)?]);
                )*
                Ok(Config { $($key,)* })
            }
        }

        /// The names of every key, for the tests that hold the README to the table.
        #[cfg(test)]
        const KEYS: &[KeyNames] = &[
            $(KeyNames { key: stringify!($key), env: &[$env $(, $fallback)?] },)*
        ];
    };

    (@flag $key:ident, $flag:expr, []) => { $flag };
    (@flag $key:ident, $flag:expr, [$parse:expr]) => {
        flag_with(stringify!($key), $flag, $parse)?
    };

    (@env_parse $ty:ty, []) => { <$ty as FromEnvText>::from_env_text };
    (@env_parse $ty:ty, [$parse:expr]) => { $parse };

    (@or_default $key:ident, $env:literal, []) => {
        match $key {
            Some(value) => value,
            None => return Err(missing(stringify!($key), $env)),
        }
    };
    (@or_default $key:ident, $env:literal, [$default:expr]) => {
        match $key {
            Some(value) => value,
            None => $default,
        }
    };
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
    /// A shard snapshots its state machine when the log since the last
    /// snapshot passes this many entries (or `snapshot_bytes`). Default 100000.
    snapshot_entries: u64 {
        default: 100_000,
        flag: u64, "N", "Snapshot after this many log entries [default: 100000]",
        env: "COREKV_SNAPSHOT_ENTRIES",
    }
    /// A shard snapshots its state machine when the log since the last
    /// snapshot passes this many bytes (or `snapshot_entries`). Default 64 MiB.
    snapshot_bytes: u64 {
        default: 64 * MIB,
        flag: u64, "BYTES", "Snapshot after this many log bytes [default: 67108864]",
        env: "COREKV_SNAPSHOT_BYTES",
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

/// Why a configuration was refused. Every message names the key (or the file)
/// and the offending values, for the operator reading a failed start-up.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A key has a value that breaks a rule, or a required key is missing.
    #[error("config key `{key}`: {message}")]
    Invalid {
        /// The key, as written in the config file.
        key: &'static str,
        /// What is wrong, with the values involved.
        message: String,
    },
    /// A flag or environment variable could not be parsed as the key's type.
    #[error("config key `{key}` ({origin}): cannot parse {value:?}: {reason}")]
    Parse {
        /// The key, as written in the config file.
        key: &'static str,
        /// Where the text came from: `flag --peers` or `env COREKV_PEERS`.
        origin: String,
        /// The text as given.
        value: String,
        /// What was expected instead.
        reason: String,
    },
    /// The config file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    ReadFile {
        /// The file named by `--config` / `COREKV_CONFIG`.
        path: PathBuf,
        /// The error of the read.
        source: std::io::Error,
    },
    /// The config file is not valid TOML, has an unknown key, or a value of
    /// the wrong type (the TOML error quotes the offending line).
    #[error("config file {}: {source}", path.display())]
    File {
        /// The file, or `<toml text>` for [`Config::from_toml_str`].
        path: PathBuf,
        /// The parse error, with line, column and key.
        source: toml::de::Error,
    },
}

impl ConfigError {
    /// The key the error is about, if it is about one key (the file errors
    /// name theirs inside the TOML message).
    pub fn key(&self) -> Option<&'static str> {
        match self {
            ConfigError::Invalid { key, .. } | ConfigError::Parse { key, .. } => Some(key),
            ConfigError::ReadFile { .. } | ConfigError::File { .. } => None,
        }
    }
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
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

/// The names of one key of the table.
#[cfg(test)]
struct KeyNames {
    /// As written in the config file.
    key: &'static str,
    /// The environment variables read, in order.
    env: &'static [&'static str],
}

/// How a key without a `parse` hook reads its environment variable: a number
/// as clap reads its flag (trimmed, as a variable often carries stray spaces),
/// text exactly as written.
trait FromEnvText: Sized {
    fn from_env_text(text: &str) -> Result<Self, String>;
}

impl FromEnvText for String {
    fn from_env_text(text: &str) -> Result<Self, String> {
        Ok(text.to_string())
    }
}

impl FromEnvText for PathBuf {
    fn from_env_text(text: &str) -> Result<Self, String> {
        Ok(PathBuf::from(text))
    }
}

macro_rules! numbers_from_env_text {
    ($($number:ty),*) => {$(
        impl FromEnvText for $number {
            fn from_env_text(text: &str) -> Result<Self, String> {
                text.trim().parse().map_err(|_| {
                    format!(
                        "expected an unsigned integer that fits {}",
                        std::any::type_name::<Self>()
                    )
                })
            }
        }
    )*};
}

numbers_from_env_text!(u16, u32, u64, usize);

fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|value| !value.trim().is_empty())
}

/// Reads `key` from the first of the variables `names` that is set.
fn env_with<T>(
    env: &dyn Fn(&str) -> Option<String>,
    key: &'static str,
    names: &[&str],
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Option<T>, ConfigError> {
    let Some((name, text)) = names
        .iter()
        .find_map(|name| non_empty(env(name)).map(|text| (name, text)))
    else {
        return Ok(None);
    };
    match parse(&text) {
        Ok(value) => Ok(Some(value)),
        Err(reason) => Err(ConfigError::Parse {
            key,
            origin: format!("env {name}"),
            value: text,
            reason,
        }),
    }
}

/// Parses the flag for `key` (`--key-name`) if it was given.
fn flag_with<T>(
    key: &'static str,
    text: Option<String>,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Option<T>, ConfigError> {
    let Some(text) = text else {
        return Ok(None);
    };
    parse(&text).map(Some).map_err(|reason| ConfigError::Parse {
        key,
        origin: format!("flag --{}", key.replace('_', "-")),
        value: text,
        reason,
    })
}

/// A required key that no layer set; the message names every place to set it.
fn missing(key: &'static str, env_name: &str) -> ConfigError {
    invalid(
        key,
        format!(
            "is required (flag --{}, env {env_name}, or `{key}` in the config file)",
            key.replace('_', "-")
        ),
    )
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

/// Parses the `--peers` / `COREKV_PEERS` syntax,
/// `ID=HOST:CLIENT_PORT:PEER_PORT[:ADMIN_PORT]` separated by commas. An IPv6
/// host is written in brackets: `3=[fd00::3]:7100:7150`. Whitespace around
/// entries and a trailing comma are ignored.
fn parse_peers(text: &str) -> Result<Vec<PeerConfig>, String> {
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
fn host_port(host: &str, port: u32) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn is_wildcard(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.parse::<Ipv4Addr>().is_ok_and(|ip| ip.is_unspecified())
        || host.parse::<Ipv6Addr>().is_ok_and(|ip| ip.is_unspecified())
}

/// Hosts that reach the same machine compare equal: all loopback names are one
/// host, because `127.0.0.1`, `127.0.0.2` and `localhost` listeners on one
/// port collide (or shadow each other through a wildcard bind). Other names
/// compare as written, case-insensitively; two names of one machine (a DNS
/// name and its IP) are not detected.
fn host_identity(host: &str) -> String {
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

fn port_mismatch(key: &'static str, node_id: u64, own: u16, listed: u16) -> ConfigError {
    invalid(
        key,
        format!(
            "{own} ({key}) differs from {listed} in the peers entry of node {node_id}; \
             set one of them, or both to the same port"
        ),
    )
}

fn not_in_peers(node_id: u64, ids: &[u64]) -> ConfigError {
    invalid(
        "peers",
        format!("node id {node_id} (node_id) is not in peers {ids:?}"),
    )
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

    /// Checks every rule that a running node relies on; the first broken one
    /// is returned. [`Config::load`] and [`Config::from_toml_str`] call it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_identity()?;
        self.validate_timing()?;
        self.validate_sizes()?;
        self.validate_logging()?;
        self.validate_peers()?;
        self.validate_ports()
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

    fn peer_ids(&self) -> Vec<u64> {
        self.peers.iter().map(|peer| peer.id).collect()
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
mod tests {
    use std::collections::HashMap;

    use clap::{CommandFactory, Parser};

    use super::*;

    /// `corekv run`'s flags as the binary would mount them.
    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    fn load_text(
        args: &RunArgs,
        env: &[(&str, &str)],
        file: Option<&str>,
    ) -> Result<Config, ConfigError> {
        load_from(
            args,
            env_of(env),
            file.map(|text| (Path::new("test.toml"), text)),
        )
    }

    fn args(flags: &[&str]) -> RunArgs {
        let mut argv = vec!["corekv"];
        argv.extend_from_slice(flags);
        Cli::try_parse_from(argv).expect("flags parse").run
    }

    /// Asserts that `text` is refused for `key` with a message containing
    /// every one of `parts`.
    fn assert_refused(text: &str, key: &str, parts: &[&str]) {
        let error = Config::from_toml_str(text).expect_err(text);
        let message = error.to_string();
        assert_eq!(error.key(), Some(key), "{message}");
        assert!(
            message.contains(&format!("config key `{key}`")),
            "{message}"
        );
        for part in parts {
            assert!(message.contains(part), "{message:?} lacks {part:?}");
        }
    }

    const THREE_NODES: &str = r#"
        node_id = 2
        shards = 4
        [[peers]]
        id = 1
        host = "127.0.0.1"
        client_port = 7100
        peer_port = 7150
        admin_port = 7190
        [[peers]]
        id = 2
        host = "127.0.0.1"
        client_port = 7200
        peer_port = 7250
        admin_port = 7290
        [[peers]]
        id = 3
        host = "127.0.0.1"
        client_port = 7300
        peer_port = 7350
        admin_port = 7390
    "#;

    #[test]
    fn clap_flags_are_kebab_case_and_consistent() {
        Cli::command().debug_assert();
        let parsed = args(&[
            "--node-id",
            "3",
            "--keepalive-idle-ms",
            "2000",
            "--peers",
            "3=h:1:2",
            "--log-format",
            "json",
        ]);
        assert_eq!(parsed.node_id, Some(3));
        assert_eq!(parsed.keepalive_idle_ms, Some(2000));
        assert_eq!(parsed.peers.as_deref(), Some("3=h:1:2"));
        let help = Cli::command().render_help().to_string();
        assert!(help.contains("COREKV_NODE_ID"), "{help}");
        assert!(help.contains("COREKV_PEERS"), "{help}");
    }

    #[test]
    fn defaults_make_a_single_node_cluster() {
        let config = Config::from_toml_str("node_id = 1").unwrap();
        assert_eq!(config.cluster_id, 1);
        assert_eq!(config.data_dir, PathBuf::from("./corekv-data"));
        assert_eq!(config.listen_host, "127.0.0.1");
        assert_eq!(config.advertise_host, "127.0.0.1");
        assert_eq!(
            (config.client_port, config.peer_port, config.admin_port),
            (7100, 7150, 7190)
        );
        assert_eq!(config.shards, default_shards());
        assert!(config.shards >= 1);
        assert_eq!(
            config.peers,
            vec![PeerConfig {
                id: 1,
                host: "127.0.0.1".to_string(),
                client_port: 7100,
                peer_port: 7150,
                admin_port: Some(7190),
            }]
        );
        assert_eq!(config.me().id, 1);
        assert_eq!(
            (
                config.tick_ms,
                config.heartbeat_ticks,
                config.election_ticks
            ),
            (10, 3, 30)
        );
        assert_eq!(
            (
                config.keepalive_idle_ms,
                config.keepalive_interval_ms,
                config.keepalive_count
            ),
            (10_000, 5_000, 3)
        );
        assert_eq!(config.connect_timeout_ms, 3_000);
        assert_eq!(config.wal_segment_bytes, 64 * MIB);
        assert_eq!(
            (config.snapshot_entries, config.snapshot_bytes),
            (100_000, 64 * MIB)
        );
        assert_eq!(config.max_frame_bytes, 16 << 20);
        assert_eq!(
            (config.max_key_bytes, config.max_value_bytes),
            (4096, 1 << 20)
        );
        assert_eq!(
            (config.request_timeout_ms, config.slow_fsync_ms),
            (5_000, 100)
        );
        assert_eq!(config.log_level, "info");
        assert_eq!(config.log_format, LogFormat::Text);
    }

    #[test]
    fn precedence_is_flag_then_env_then_file_then_default() {
        let file = "node_id = 1\nclient_port = 7001\ndata_dir = \"/file\"";
        let env = [("COREKV_CLIENT_PORT", "7002"), ("COREKV_DATA_DIR", "/env")];
        let flags = args(&["--client-port", "7003", "--data-dir", "/flag"]);

        let config = load_text(&flags, &env, Some(file)).unwrap();
        assert_eq!(
            (config.client_port, config.data_dir.to_str()),
            (7003, Some("/flag"))
        );

        let config = load_text(&RunArgs::default(), &env, Some(file)).unwrap();
        assert_eq!(
            (config.client_port, config.data_dir.to_str()),
            (7002, Some("/env"))
        );

        let config = load_text(&RunArgs::default(), &[], Some(file)).unwrap();
        assert_eq!(
            (config.client_port, config.data_dir.to_str()),
            (7001, Some("/file"))
        );

        let config = load_text(&args(&["--node-id", "1"]), &[], None).unwrap();
        assert_eq!(
            (config.client_port, config.data_dir.to_str()),
            (7100, Some("./corekv-data"))
        );
    }

    #[test]
    fn layers_merge_key_by_key() {
        // Each key comes from the highest layer that sets it.
        let file = "node_id = 1\ntick_ms = 20\nshards = 2";
        let env = [("COREKV_SHARDS", "3"), ("COREKV_NODE_ID", "5")];
        let config = load_text(&args(&["--node-id", "7"]), &env, Some(file)).unwrap();
        assert_eq!((config.node_id, config.shards, config.tick_ms), (7, 3, 20));
    }

    #[test]
    fn cpus_come_from_file_env_or_flag_and_default_to_none() {
        let file = "node_id = 1\ncpus = [1, 0]";
        let config = load_text(&RunArgs::default(), &[], Some(file)).unwrap();
        assert_eq!(config.cpus, vec![1, 0]);
        assert!(config.to_toml_string().contains("cpus = [1, 0]"));
        let env = [("COREKV_CPUS", " 2, 3 ")];
        let config = load_text(&RunArgs::default(), &env, Some(file)).unwrap();
        assert_eq!(config.cpus, vec![2, 3]);
        let config = load_text(&args(&["--cpus", "4"]), &env, Some(file)).unwrap();
        assert_eq!(config.cpus, vec![4]);
        let config = load_text(&args(&["--node-id", "1"]), &[], None).unwrap();
        assert!(config.cpus.is_empty());
        assert!(!config.to_toml_string().contains("cpus"));

        let error = load_text(&RunArgs::default(), &[("COREKV_CPUS", "0,x")], Some(file))
            .expect_err("a CPU id must be a number");
        let message = error.to_string();
        assert_eq!(error.key(), Some("cpus"), "{message}");
        assert!(
            message.contains("COREKV_CPUS") && message.contains("`x`"),
            "{message}"
        );
    }

    #[test]
    fn peers_list_comes_whole_from_one_layer() {
        let file =
            "node_id = 1\n[[peers]]\nid = 1\nhost = \"a\"\nclient_port = 7100\npeer_port = 7150";
        let env = [("COREKV_PEERS", "1=b:7100:7150,2=c:7100:7150")];
        let config = load_text(&RunArgs::default(), &env, Some(file)).unwrap();
        assert_eq!(config.peer_ids(), vec![1, 2]);
        assert_eq!(config.advertise_host, "b");
        let config = load_text(&args(&["--peers", "1=d:7100:7150"]), &env, Some(file)).unwrap();
        assert_eq!(config.peer_ids(), vec![1]);
        assert_eq!(config.advertise_host, "d");
    }

    #[test]
    fn empty_env_value_counts_as_unset() {
        let env = [
            ("COREKV_NODE_ID", "4"),
            ("COREKV_ADVERTISE_HOST", ""),
            ("COREKV_PEERS", " "),
        ];
        let config = load_text(&RunArgs::default(), &env, None).unwrap();
        assert_eq!(config.node_id, 4);
        assert_eq!(config.advertise_host, "127.0.0.1");
    }

    #[test]
    fn log_level_reads_corekv_log_level_before_rust_log() {
        let base = [("COREKV_NODE_ID", "1"), ("RUST_LOG", "debug")];
        let config = load_text(&RunArgs::default(), &base, None).unwrap();
        assert_eq!(config.log_level, "debug");
        let both = [base[0], base[1], ("COREKV_LOG_LEVEL", "warn")];
        let config = load_text(&RunArgs::default(), &both, None).unwrap();
        assert_eq!(config.log_level, "warn");
        let config = load_text(&args(&["--log-level", "trace"]), &both, None).unwrap();
        assert_eq!(config.log_level, "trace");
    }

    #[test]
    fn bad_env_value_names_key_and_variable() {
        let error = load_text(
            &RunArgs::default(),
            &[("COREKV_CLIENT_PORT", "70000")],
            None,
        )
        .unwrap_err();
        let message = error.to_string();
        assert_eq!(error.key(), Some("client_port"));
        assert!(message.contains("env COREKV_CLIENT_PORT"), "{message}");
        assert!(message.contains("\"70000\""), "{message}");
        assert!(message.contains("u16"), "{message}");
    }

    #[test]
    fn log_format_is_text_or_json_in_every_layer() {
        let config = load_text(
            &args(&["--node-id", "1", "--log-format", "JSON"]),
            &[],
            None,
        )
        .unwrap();
        assert_eq!(config.log_format, LogFormat::Json);

        let error =
            load_text(&args(&["--node-id", "1", "--log-format", "xml"]), &[], None).unwrap_err();
        assert_eq!(error.key(), Some("log_format"));
        assert!(error.to_string().contains("flag --log-format"), "{error}");
        assert!(error.to_string().contains("`text` or `json`"), "{error}");

        let error = load_text(
            &args(&["--node-id", "1"]),
            &[("COREKV_LOG_FORMAT", "xml")],
            None,
        )
        .unwrap_err();
        assert!(
            error.to_string().contains("env COREKV_LOG_FORMAT"),
            "{error}"
        );

        let error = Config::from_toml_str("node_id = 1\nlog_format = \"xml\"").unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains("log_format") && message.contains("xml"),
            "{message}"
        );
    }

    #[test]
    fn load_reads_the_config_file_named_by_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("corekv.toml");
        std::fs::write(&path, "node_id = 9\nclient_port = 7400\npeer_port = 7450").unwrap();
        let mut run = args(&["--peer-port", "7460"]);
        run.config = Some(path.clone());
        // node_id and client_port come from the file unless the process
        // environment sets them, so only assert what a flag fixes or what
        // the file sets that CI would not.
        let config = Config::load(&run).unwrap();
        assert_eq!(config.peer_port, 7460);

        run.config = Some(dir.path().join("missing.toml"));
        let error = Config::load(&run).unwrap_err();
        assert!(matches!(error, ConfigError::ReadFile { .. }), "{error}");
        assert!(error.to_string().contains("missing.toml"), "{error}");
    }

    #[test]
    fn unknown_file_key_is_refused_by_name() {
        let error = Config::from_toml_str("node_id = 1\nclient_prot = 7100").unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, ConfigError::File { .. }), "{message}");
        assert!(message.contains("client_prot"), "{message}");

        let error = Config::from_toml_str(
            "node_id = 1\n[[peers]]\nid = 1\nhost = \"h\"\nclient_port = 1\npeer_port = 2\nrole = \"x\"",
        )
        .unwrap_err();
        assert!(error.to_string().contains("role"), "{error}");
    }

    #[test]
    fn wrong_type_in_file_is_refused_with_the_key() {
        let error = Config::from_toml_str("node_id = 1\nclient_port = 70000").unwrap_err();
        let message = error.to_string();
        assert!(message.contains("client_port"), "{message}");
    }

    #[test]
    fn toml_round_trips() {
        let config = Config::from_toml_str(THREE_NODES).unwrap();
        let text = config.to_toml_string();
        assert_eq!(Config::from_toml_str(&text).unwrap(), config, "{text}");

        let single =
            Config::from_toml_str("node_id = 1\nlog_format = \"json\"\nshards = 3").unwrap();
        let text = single.to_toml_string();
        assert!(text.contains("log_format = \"json\""), "{text}");
        assert_eq!(Config::from_toml_str(&text).unwrap(), single, "{text}");
    }

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

    #[test]
    fn refuses_bad_peers_strings_with_the_reason() {
        let cases = [
            ("1:127.0.0.1:7100:7150", "missing `=`"),
            ("x=h:7100:7150", "node id `x`"),
            ("1=h", "missing ports"),
            ("1=h:7100", "expected 2 or 3 ports"),
            ("1=h:1:2:3:4", "expected 2 or 3 ports"),
            ("1=:7100:7150", "host is empty"),
            ("1=h:abc:7150", "client port `abc`"),
            ("1=h:7100:0", "peer port `0`"),
            ("1=h:7100:7150:99999", "admin port `99999`"),
            ("1=[::1:7100:7150", "missing `]`"),
            ("1=[::1]7100:7150", "expected `:` after `]`"),
            (",", "no peers listed"),
        ];
        for (text, reason) in cases {
            let error =
                load_text(&args(&["--node-id", "1", "--peers", text]), &[], None).unwrap_err();
            let message = error.to_string();
            assert_eq!(error.key(), Some("peers"), "{message}");
            assert!(message.contains("flag --peers"), "{message}");
            assert!(
                message.contains(reason),
                "{text}: {message:?} lacks {reason:?}"
            );
            assert!(message.contains(PEERS_SYNTAX), "{message}");
        }
        let error = load_text(
            &RunArgs::default(),
            &[("COREKV_NODE_ID", "1"), ("COREKV_PEERS", "1=h")],
            None,
        )
        .unwrap_err();
        assert!(error.to_string().contains("env COREKV_PEERS"), "{error}");
    }

    #[test]
    fn own_ports_and_host_come_from_own_peers_entry() {
        let config = Config::from_toml_str(THREE_NODES).unwrap();
        assert_eq!(
            (config.client_port, config.peer_port, config.admin_port),
            (7200, 7250, 7290)
        );
        assert_eq!(config.me().client_port, 7200);
        assert_eq!(config.peer(3).map(|peer| peer.peer_port), Some(7350));
        assert_eq!(config.peer(4), None);
        assert_eq!(config.client_listen_addr(1), "127.0.0.1:7201");
        assert_eq!(config.peer_listen_addr(3), "127.0.0.1:7253");
        assert_eq!(config.admin_listen_addr(), "127.0.0.1:7290");
    }

    #[test]
    fn own_admin_port_is_filled_into_own_entry() {
        let text = "node_id = 1\nadmin_port = 7191\n[[peers]]\nid = 1\nhost = \"h\"\nclient_port = 7100\npeer_port = 7150";
        let config = Config::from_toml_str(text).unwrap();
        assert_eq!(config.me().admin_port, Some(7191));
    }

    #[test]
    fn explicit_own_port_must_match_peers_entry() {
        // Top-level keys go before the first [[peers]], hence the replacen.
        let text =
            THREE_NODES.replacen("node_id = 2", "node_id = 2\n        client_port = 7100", 1);
        assert_refused(
            &text,
            "client_port",
            &["7100 (client_port)", "7200", "node 2"],
        );
        let text = THREE_NODES.replacen("node_id = 2", "node_id = 2\n        admin_port = 7291", 1);
        assert_refused(&text, "admin_port", &["7291", "7290"]);
        let text =
            THREE_NODES.replacen("node_id = 2", "node_id = 2\n        client_port = 7200", 1);
        assert!(Config::from_toml_str(&text).is_ok());
    }

    #[test]
    fn advertise_host_rules() {
        assert_refused(
            "node_id = 1\nlisten_host = \"0.0.0.0\"",
            "advertise_host",
            &["required", "0.0.0.0"],
        );
        assert_refused(
            "node_id = 1\nlisten_host = \"::\"",
            "advertise_host",
            &["required", "::"],
        );
        let config = Config::from_toml_str(
            "node_id = 1\nlisten_host = \"0.0.0.0\"\nadvertise_host = \"10.0.0.1\"",
        )
        .unwrap();
        assert_eq!(config.me().host, "10.0.0.1");
        assert_eq!(config.client_listen_addr(0), "0.0.0.0:7100");

        let listed = THREE_NODES.replacen(
            "node_id = 2",
            "node_id = 2\n        listen_host = \"0.0.0.0\"",
            1,
        );
        assert_eq!(
            Config::from_toml_str(&listed).unwrap().advertise_host,
            "127.0.0.1"
        );

        let differs = THREE_NODES.replacen(
            "node_id = 2",
            "node_id = 2\n        advertise_host = \"localhost\"",
            1,
        );
        assert_refused(
            &differs,
            "advertise_host",
            &["localhost", "127.0.0.1", "node 2"],
        );
        assert_refused(
            "node_id = 1\nadvertise_host = \"0.0.0.0\"",
            "advertise_host",
            &["wildcard"],
        );
    }

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

    #[test]
    fn duration_helpers_follow_the_ms_fields() {
        let config = Config::from_toml_str(
            "node_id = 1\ntick_ms = 20\nheartbeat_ticks = 2\nelection_ticks = 10\nslow_fsync_ms = 7",
        )
        .unwrap();
        assert_eq!(config.tick(), Duration::from_millis(20));
        assert_eq!(config.heartbeat_interval(), Duration::from_millis(40));
        assert_eq!(config.election_timeout(), Duration::from_millis(200));
        assert_eq!(config.keepalive_idle(), Duration::from_secs(10));
        assert_eq!(config.keepalive_interval(), Duration::from_secs(5));
        assert_eq!(config.connect_timeout(), Duration::from_secs(3));
        assert_eq!(config.request_timeout(), Duration::from_secs(5));
        assert_eq!(config.slow_fsync(), Duration::from_millis(7));
    }
    /// The configuration table of the README, key to its "env / flag" cell.
    fn readme_rows() -> BTreeMap<String, String> {
        const README: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"));
        const HEADER: &str = "| key | env / flag | default | meaning |";
        let table = README
            .split_once(HEADER)
            .map(|(_, rest)| rest)
            .expect("README has the configuration table");
        table
            .lines()
            .skip(1)
            .skip_while(|line| line.starts_with("| ---"))
            .take_while(|line| line.starts_with('|'))
            .map(|line| {
                let cells: Vec<&str> = line.split('|').map(str::trim).collect();
                (cells[1].trim_matches('`').to_string(), cells[2].to_string())
            })
            .collect()
    }

    #[test]
    fn readme_has_a_row_for_every_key() {
        let rows = readme_rows();
        for names in KEYS {
            let key = names.key;
            let cell = rows
                .get(key)
                .unwrap_or_else(|| panic!("README configuration table has no row for `{key}`"));
            let flag = format!("`--{}`", key.replace('_', "-"));
            assert!(
                cell.contains(&flag),
                "README row `{key}` lacks {flag}: {cell}"
            );
            for env in names.env {
                assert!(
                    cell.contains(&format!("`{env}`")),
                    "README row `{key}` lacks `{env}`: {cell}"
                );
            }
        }
        for key in rows.keys() {
            assert!(
                KEYS.iter().any(|names| names.key == key),
                "README configuration table lists `{key}`, which is not a key"
            );
        }
    }

    #[test]
    fn env_names_follow_the_keys() {
        for names in KEYS {
            let expected = format!("COREKV_{}", names.key.to_ascii_uppercase());
            assert_eq!(names.env[0], expected, "key `{}`", names.key);
        }
    }

    #[test]
    fn help_names_each_keys_variables() {
        let help = Cli::command().render_help().to_string();
        for names in KEYS {
            let listed = format!("[env: {}]", names.env.join(", then "));
            assert!(help.contains(&listed), "{listed} missing from:\n{help}");
        }
    }

    #[test]
    fn empty_peers_list_in_file_means_this_node_alone() {
        let config = Config::from_toml_str("node_id = 3\nclient_port = 7300\npeers = []").unwrap();
        assert_eq!(config.peer_ids(), vec![3]);
        assert_eq!(config.me().client_port, 7300);
    }
}
