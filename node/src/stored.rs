//! What the state machine's map stores: keys (short ones inline) and values
//! with the log index that wrote them. A module of its own so the map
//! (`layered_map`) and the state machine both use it without depending on
//! each other.

use bytes::Bytes;

/// A stored value and the log index that wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned {
    /// The value.
    pub value: Bytes,
    /// Raft index of the write that produced it.
    pub version: u64,
}

/// Keys up to this long are stored inside the map's nodes.
pub const INLINE_KEY_BYTES: usize = 30;

/// A key of the map. Short keys (the common case) live inline, so the
/// binary search in a map node compares bytes that sit in the node itself
/// instead of following a heap pointer per comparison (a cache miss each on
/// a big map). Ordered, and compared, as its bytes.
///
/// 32 bytes: a long key is a `Box<[u8]>` (two words), not a `Bytes` (four),
/// so the inline variant and the tag fill the size. Every key is held twice
/// (the order and the index), and at 40 bytes a B-tree leaf of 11 keys was
/// a 512-byte allocation instead of 384.
#[derive(Clone)]
pub enum Key {
    /// At most `INLINE_KEY_BYTES` bytes: `bytes[..len]`.
    Inline {
        /// Length in bytes.
        len: u8,
        /// The key, zero padded.
        bytes: [u8; INLINE_KEY_BYTES],
    },
    /// A longer key, copied: a slice of the buffer it came in (a log entry,
    /// a frame of many) would keep all of that buffer alive for as long as
    /// the key is held.
    Heap(Box<[u8]>),
}

impl Key {
    /// The key for `bytes`, copied.
    pub fn from_slice(key: &[u8]) -> Key {
        if key.len() <= INLINE_KEY_BYTES {
            let mut bytes = [0u8; INLINE_KEY_BYTES];
            bytes[..key.len()].copy_from_slice(key);
            Key::Inline {
                len: key.len() as u8,
                bytes,
            }
        } else {
            Key::Heap(key.into())
        }
    }

    /// The key's bytes.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Key::Inline { len, bytes } => &bytes[..*len as usize],
            Key::Heap(bytes) => bytes,
        }
    }

    /// The key as `Bytes`, copied.
    pub fn to_bytes(&self) -> Bytes {
        Bytes::copy_from_slice(self.as_slice())
    }
}

impl std::borrow::Borrow<[u8]> for Key {
    fn borrow(&self) -> &[u8] {
        self.as_slice()
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}

impl Eq for Key {}

/// As its bytes, like `[u8]` (which `Borrow` requires).
impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_slice().hash(state)
    }
}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Key {
    /// The order of the keys' bytes (as `[u8]`, which `Borrow` requires).
    /// Two inline keys compare as two big-endian integers each, without a
    /// call to memcmp: a map walk compares a key with several per node.
    /// Zero padding then length gives the bytes' order: where the padded
    /// arrays first differ, a byte past one key's end is 0 and the other's
    /// real byte is not, so the shorter key (a prefix) is the smaller; equal
    /// padded arrays differ only by trailing zeros, so by length.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        match (self, other) {
            (
                Key::Inline { len, bytes },
                Key::Inline {
                    len: other_len,
                    bytes: other_bytes,
                },
            ) => inline_words(bytes)
                .cmp(&inline_words(other_bytes))
                .then(len.cmp(other_len)),
            _ => self.as_slice().cmp(other.as_slice()),
        }
    }
}

/// An inline key's padded bytes as two integers that order like them.
#[inline]
fn inline_words(bytes: &[u8; INLINE_KEY_BYTES]) -> (u128, u128) {
    let mut low = [0u8; 16];
    low[..INLINE_KEY_BYTES - 16].copy_from_slice(&bytes[16..]);
    (
        u128::from_be_bytes(bytes[..16].try_into().expect("16 bytes")),
        u128::from_be_bytes(low),
    )
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", Bytes::copy_from_slice(self.as_slice()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Keys of 0..40 bytes over a small alphabet with 0 in it, so prefixes,
    /// trailing zeros and both inline and heap keys come up often.
    fn key_bytes() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(prop_oneof![Just(0u8), Just(1u8), Just(0xFFu8)], 0..40)
    }

    proptest! {
        #[test]
        fn keys_order_and_compare_like_their_bytes(a in key_bytes(), b in key_bytes()) {
            let (ka, kb) = (Key::from_slice(&a), Key::from_slice(&b));
            prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
            prop_assert_eq!(ka == kb, a == b);
        }
    }

    #[test]
    fn a_key_is_four_words() {
        assert_eq!(std::mem::size_of::<Key>(), 32);
    }

    #[test]
    fn a_shorter_key_sorts_before_the_same_bytes_with_trailing_zeros() {
        let short = Key::from_slice(b"ab");
        let padded = Key::from_slice(b"ab\0");
        assert!(short < padded);
        assert!(Key::from_slice(b"ab\0") < Key::from_slice(b"ab\x01"));
        assert!(Key::from_slice(&[0xFF; 30]) < Key::from_slice(&[0xFF; 31]));
    }
}
