//! corekv-proto: the wire messages of corekv, generated from `proto/*.proto`.
//!
//! Owns the contract between clients and nodes (`client`), between nodes
//! (`peer`), and between a node and its own disk (`log`, what a Raft log
//! entry holds). It never holds logic beyond what prost generates plus small
//! helpers on the generated types: no I/O, no framing (that is
//! corekv-transport), no Raft state.

/// The client protocol (`proto/client.proto`).
pub mod client {
    include!(concat!(env!("OUT_DIR"), "/corekv.client.rs"));
}

/// The peer protocol (`proto/peer.proto`).
pub mod peer {
    include!(concat!(env!("OUT_DIR"), "/corekv.peer.rs"));
}

/// What a shard's Raft log entries hold (`proto/log.proto`).
pub mod log {
    include!(concat!(env!("OUT_DIR"), "/corekv.log.rs"));
}

/// Version of the data a node keeps on disk: the encoding of log entries
/// (`log::Command`) and the layout of the data directory. Recorded in the
/// data directory when it is created; a node refuses a directory written
/// with another version instead of misreading it.
///
/// 1: entries held client.proto `Request`s (no version file was written).
/// 2: entries hold `log::Command`s.
pub const DATA_FORMAT_VERSION: u32 = 2;

/// Version of the peer protocol spoken by this build, sent in `Hello`.
pub const PEER_PROTOCOL_VERSION: u32 = 1;

/// The shard that owns `key`: IEEE CRC-32 of the key bytes modulo the shard
/// count, as documented in `client.proto`.
///
/// # Panics
///
/// Panics if `shards` is zero.
pub fn shard_of(key: &[u8], shards: u32) -> u32 {
    assert!(shards > 0, "shard count must be positive");
    crc32(key) % shards
}

/// Pairs a scan returns when the request asks for 0 (the server's default).
pub const DEFAULT_SCAN_LIMIT: usize = 1000;
/// Upper bound on one scan answer, whatever the request asks.
pub const MAX_SCAN_LIMIT: usize = 10_000;

/// The number of pairs a scan with `limit` may return: 0 means
/// [`DEFAULT_SCAN_LIMIT`], and nothing passes [`MAX_SCAN_LIMIT`]. Part of the
/// contract, so a client merging the answers of several shards cuts the
/// merged list where one server would have.
pub fn scan_limit(limit: u32) -> usize {
    match limit as usize {
        0 => DEFAULT_SCAN_LIMIT,
        n => n.min(MAX_SCAN_LIMIT),
    }
}

/// An error answer with `code` and a message for people.
pub fn error_result(code: client::ErrorCode, message: &str) -> client::response::Result {
    client::response::Result::Error(client::Error {
        code: code as i32,
        message: message.to_string(),
        ..Default::default()
    })
}

impl client::Role {
    /// The role's name in logs, `corekv status` and the admin JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            client::Role::Follower => "follower",
            client::Role::Candidate => "candidate",
            client::Role::Leader => "leader",
            client::Role::PreCandidate => "pre_candidate",
        }
    }

    /// The role of a wire value; an unknown value reads as a follower.
    pub fn from_wire(role: i32) -> client::Role {
        client::Role::try_from(role).unwrap_or(client::Role::Follower)
    }
}

/// IEEE CRC-32 (reflected, polynomial 0xEDB88320), the same as zlib's.
fn crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        // The CRC-32/ISO-HDLC check value from the CRC catalogue.
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn scan_limit_defaults_and_caps() {
        assert_eq!(scan_limit(0), DEFAULT_SCAN_LIMIT);
        assert_eq!(scan_limit(7), 7);
        assert_eq!(scan_limit(u32::MAX), MAX_SCAN_LIMIT);
    }

    #[test]
    fn shard_of_spreads_keys() {
        let mut counts = [0u32; 4];
        for i in 0..4000u32 {
            counts[shard_of(format!("key{i}").as_bytes(), 4) as usize] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "uneven spread: {counts:?}");
        }
    }
}
