//! The one error of loading a configuration, and the refusals raised in more
//! than one place: this node's `peers` entry is checked both while the layers
//! are resolved and by `Config::validate`, and the two must word it alike.
//!
//! A leaf: it imports nothing from the rest of `config`, so every sibling can
//! use it without a cycle.

use std::path::PathBuf;

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
        /// The file, or `<toml text>` for
        /// [`Config::from_toml_str`](super::Config::from_toml_str).
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

pub(super) fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

pub(super) fn port_mismatch(key: &'static str, node_id: u64, own: u16, listed: u16) -> ConfigError {
    invalid(
        key,
        format!(
            "{own} ({key}) differs from {listed} in the peers entry of node {node_id}; \
             set one of them, or both to the same port"
        ),
    )
}

pub(super) fn not_in_peers(node_id: u64, ids: &[u64]) -> ConfigError {
    invalid(
        "peers",
        format!("node id {node_id} (node_id) is not in peers {ids:?}"),
    )
}
