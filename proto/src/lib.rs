//! corekv-proto: the wire messages of corekv, generated from `proto/*.proto`.
//!
//! Owns the contract between clients and nodes (`client`) and between nodes
//! (`peer`). It never holds logic beyond what prost generates plus small
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
