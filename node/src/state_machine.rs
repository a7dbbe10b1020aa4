//! The replicated state machine of one shard: an ordered map from key to
//! (value, version), where version is the Raft log index of the write.
//!
//! Apply is deterministic: the outcome depends only on the map and the entry
//! (no clock, no randomness, no hash-order iteration), so every replica that
//! applies the same log holds the same map.

use std::ops::Bound;

use bytes::Bytes;
use corekv_proto::client::{
    response, DeleteResult, Error, ErrorCode, KeyValue, ScanResult, SessionResult, WriteResult,
};
use corekv_proto::log::command::Op as LogOp;

use crate::command;
use crate::sessions::{Admission, Sessions};

pub use crate::stored::{Key, Versioned, INLINE_KEY_BYTES};

/// The ordered map of a shard: a clone is O(1), which is how a snapshot
/// gets an immutable view without stalling the shard (see `layered_map`).
pub use crate::layered_map::Map;

/// Everything a snapshot holds of a state machine: the map and the client
/// sessions. Cloning is O(1).
#[derive(Clone, Debug, Default)]
pub struct Image {
    /// The key-value map.
    pub map: Map,
    /// The exactly-once sessions.
    pub sessions: Sessions,
    /// The map's accounted bytes (see [`pair_bytes`]), counted by whoever
    /// built it, so that restoring it costs the shard thread nothing.
    pub bytes: u64,
}

impl Image {
    /// An image of `map` and `sessions`, its bytes counted here: O(pairs),
    /// never on a shard thread.
    pub fn new(map: Map, sessions: Sessions) -> Image {
        let bytes = map
            .iter()
            .map(|(k, v)| pair_bytes(k.as_slice().len(), v.value.len()))
            .sum();
        Image {
            map,
            sessions,
            bytes,
        }
    }
}

/// Bytes a stored pair is accounted besides its key and value: the map's
/// share (the key in the ordered B-tree, the pair in the hash index), the
/// version, the value's handle and its allocation. Measured with
/// `benches/big_state.sh` (heap of a node over its pairs, commit 47218df):
/// 10M pairs of 16 B keys and 64 B values took 250 B each, 80 of them
/// payload; 1M pairs with 1 KiB values took 250-260 B each beyond the
/// payload after loading, and 370-380 B after random overwrites (the
/// allocator keeps the room of values freed after a snapshot). Not exact;
/// it keeps many small pairs from looking free to `max_memory_bytes`.
pub const PAIR_OVERHEAD_BYTES: u64 = 250;

/// The bytes one pair is accounted for (see `StateMachine::bytes`).
pub fn pair_bytes(key_len: usize, value_len: usize) -> u64 {
    key_len as u64 + value_len as u64 + PAIR_OVERHEAD_BYTES
}

/// One shard's key-value map.
#[derive(Debug, Default)]
pub struct StateMachine {
    map: Map,
    sessions: Sessions,
    /// Index of the last entry applied.
    applied_index: u64,
    /// Accounted size of the map: `pair_bytes` summed over its pairs.
    bytes: u64,
}

impl StateMachine {
    /// An empty map at applied index 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bounded housekeeping for a tick: merges some of the writes made
    /// while a snapshot shared the map (see `Map::merge_idle`).
    pub fn tick(&mut self) {
        self.map.merge_idle();
    }

    /// Index of the last applied entry.
    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Accounted size of the stored pairs: keys, values and a fixed
    /// overhead per pair. What the memory limit and the snapshot rule count.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// How much a put of `value_len` bytes to `key` would change `bytes`.
    pub fn growth(&self, key: &[u8], value_len: usize) -> i64 {
        let new = pair_bytes(key.len(), value_len) as i64;
        let old = self
            .map
            .get(key)
            .map_or(0, |v| pair_bytes(key.len(), v.value.len()) as i64);
        new - old
    }

    fn insert(&mut self, key: &Bytes, value: Bytes, version: u64) {
        // The value arrives as a slice of a larger buffer (a log entry, or a
        // peer frame holding many entries); stored as is, one live value
        // would keep all of that buffer alive for as long as the key is not
        // overwritten, and memory would follow the write history instead of
        // the data. Copied here, where every source (peer frames, log reads,
        // the leader's own entries) passes, and to the value's exact size:
        // keeping the ~1060 B entry of a 1 KiB value would round up to a
        // 1280 B allocation class. One allocation and copy per write (3.5 %
        // of a node's CPU at BIG, perf).
        let value = Bytes::copy_from_slice(&value);
        let added = pair_bytes(key.len(), value.len());
        let old = self
            .map
            .insert(Key::from_slice(key), Versioned { value, version });
        let removed = old.map_or(0, |old| pair_bytes(key.len(), old.value_len));
        self.bytes = self.bytes + added - removed;
    }

    /// True when no key is stored.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Records that entry `index` was applied without a command (leader no-op,
    /// configuration change).
    ///
    /// # Panics
    ///
    /// Panics if `index` does not follow the applied index: the log must be
    /// applied in order, exactly once.
    pub fn skip(&mut self, index: u64) {
        self.advance(index);
    }

    fn advance(&mut self, index: u64) {
        assert!(
            index == self.applied_index + 1,
            "entries must be applied in order, applied index: {}, entry index: {}",
            self.applied_index,
            index
        );
        self.applied_index = index;
    }

    /// Applies the command in entry `index` and returns the answer for the
    /// client that proposed it. A command that cannot be decoded is answered
    /// INTERNAL on every replica alike, so replicas never diverge over it.
    pub fn apply(&mut self, index: u64, data: &Bytes) -> response::Result {
        self.advance(index);
        let (op, tag) = match command::decode(data) {
            Ok(decoded) => decoded,
            Err(e) => return error(ErrorCode::Internal, &e.to_string()),
        };
        if let LogOp::OpenSession(_) = op {
            let session_id = self.sessions.open(index);
            return response::Result::Session(SessionResult { session_id });
        }
        if tag.session_id == 0 {
            return self.apply_write(index, op);
        }
        match self.sessions.admit(index, tag) {
            Admission::Apply => {
                let result = self.apply_write(index, op);
                self.sessions.record(tag, &result);
                result
            }
            Admission::Repeat(result) | Admission::Refuse(result) => result,
        }
    }

    fn apply_write(&mut self, index: u64, op: LogOp) -> response::Result {
        match op {
            LogOp::Put(put) => {
                self.insert(&put.key, put.value, index);
                response::Result::Write(WriteResult { version: index })
            }
            LogOp::Delete(delete) => {
                let current = self.version(&delete.key);
                if let Some(expected) = delete.expected_version {
                    if expected != current {
                        return version_mismatch(current);
                    }
                }
                let removed = self.map.remove(delete.key.as_ref());
                if let Some(old) = &removed {
                    self.bytes -= pair_bytes(delete.key.len(), old.value_len);
                }
                response::Result::Delete(DeleteResult {
                    deleted: removed.is_some(),
                })
            }
            LogOp::Cas(cas) => {
                let current = self.version(&cas.key);
                if cas.expected_version != current {
                    return version_mismatch(current);
                }
                self.insert(&cas.key, cas.value, index);
                response::Result::Write(WriteResult { version: index })
            }
            LogOp::OpenSession(_) => error(ErrorCode::Internal, "a session opened as a write"),
        }
    }

    /// Current version of `key`, 0 when absent.
    pub fn version(&self, key: &[u8]) -> u64 {
        self.map.get(key).map_or(0, |v| v.version)
    }

    /// Value and version of `key`.
    pub fn get(&self, key: &[u8]) -> Option<(Bytes, u64)> {
        self.map
            .get(key)
            .map(|v| (answer_value(&v.value), v.version))
    }

    /// Pairs with keys in `[start, end)` (empty `end` = no upper bound), at
    /// most `limit` of them (0 = DEFAULT_SCAN_LIMIT, capped at MAX_SCAN_LIMIT).
    pub fn scan(&self, start: &[u8], end: &[u8], limit: u32) -> ScanResult {
        let limit = corekv_proto::scan_limit(limit);
        let upper = if end.is_empty() {
            Bound::Unbounded
        } else {
            Bound::Excluded(end)
        };
        if !end.is_empty() && start >= end {
            return ScanResult::default();
        }
        let mut pairs = Vec::new();
        let mut more = false;
        for (key, v) in self.map.range(Bound::Included(start), upper) {
            if pairs.len() == limit {
                more = true;
                break;
            }
            pairs.push(KeyValue {
                key: key.to_bytes(),
                value: answer_value(&v.value),
                version: v.version,
            });
        }
        ScanResult { pairs, more }
    }

    /// Every pair in key order (for snapshots and tests).
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &Bytes, u64)> {
        self.map
            .iter()
            .map(|(k, v)| (k.as_slice(), &v.value, v.version))
    }

    /// Replaces the whole state (snapshot install or restart) and returns
    /// the state it replaced, for the caller to drop off the shard thread:
    /// freeing a map of 1M pairs of 1 KiB took 186 ms, and counting its
    /// bytes here (now done by whoever built `image`) another 52 ms
    /// (release build, development machine).
    #[must_use = "the old state is to be dropped off the shard thread"]
    pub fn restore(&mut self, applied_index: u64, image: Image) -> Image {
        self.applied_index = applied_index;
        Image {
            map: std::mem::replace(&mut self.map, image.map),
            sessions: std::mem::replace(&mut self.sessions, image.sessions),
            bytes: std::mem::replace(&mut self.bytes, image.bytes),
        }
    }

    /// An immutable view of the state as of now, for a snapshot (O(1)).
    pub fn view(&self) -> Image {
        Image {
            map: self.map.clone(),
            sessions: self.sessions.clone(),
            bytes: self.bytes,
        }
    }

    /// The exactly-once sessions (status, tests).
    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }
}

fn version_mismatch(current: u64) -> response::Result {
    response::Result::Error(Error {
        code: ErrorCode::VersionMismatch as i32,
        message: format!("version mismatch: current version is {current}"),
        current_version: current,
        ..Default::default()
    })
}

/// Values up to this size are copied into a read's answer rather than
/// shared with the map.
pub const COPIED_VALUE_BYTES: usize = 4096;

/// A stored value for a read's answer. Sharing it costs an atomic
/// increment (and later a decrement) of its reference count, a line apart
/// from its bytes and cold in the cache on a large map: 7 % of all cycles
/// at SP (perf annotate puts them on the `lock xadd`). A small value is
/// copied instead, which reads the bytes the answer's encoding reads next
/// anyway; a large one is shared, as a copy would cost more than the miss.
fn answer_value(value: &Bytes) -> Bytes {
    if value.len() <= COPIED_VALUE_BYTES {
        Bytes::copy_from_slice(value)
    } else {
        value.clone()
    }
}

/// An error answer with `code` and `message`.
pub fn error(code: ErrorCode, message: &str) -> response::Result {
    corekv_proto::error_result(code, message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sessions::SessionTag;
    use corekv_proto::client::{request::Op, CompareAndSwap, Delete, Put};
    use proptest::prelude::*;

    proptest! {
        /// Inline and heap keys (lengths around the inline limit, including
        /// zero bytes that look like padding) order and compare as their bytes.
        #[test]
        fn keys_order_like_their_bytes(
            a in proptest::collection::vec(prop_oneof![Just(0u8), any::<u8>()], 0..=2 * INLINE_KEY_BYTES),
            b in proptest::collection::vec(prop_oneof![Just(0u8), any::<u8>()], 0..=2 * INLINE_KEY_BYTES),
        ) {
            let (ka, kb) = (Key::from_slice(&a), Key::from_slice(&b));
            prop_assert_eq!(ka.as_slice(), &a[..]);
            prop_assert_eq!(kb.to_bytes(), Bytes::from(b.clone()));
            prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
            prop_assert_eq!(ka == kb, a == b);
        }
    }

    fn put(key: &str, value: &str) -> Bytes {
        command::encode(
            &Op::Put(Put {
                key: Bytes::copy_from_slice(key.as_bytes()),
                value: Bytes::copy_from_slice(value.as_bytes()),
            }),
            SessionTag::default(),
        )
        .expect("a write")
    }

    fn cas(key: &str, expected: u64, value: &str) -> Bytes {
        command::encode(
            &Op::Cas(CompareAndSwap {
                key: Bytes::copy_from_slice(key.as_bytes()),
                expected_version: expected,
                value: Bytes::copy_from_slice(value.as_bytes()),
            }),
            SessionTag::default(),
        )
        .expect("a write")
    }

    fn del(key: &str, expected: Option<u64>) -> Bytes {
        command::encode(
            &Op::Delete(Delete {
                key: Bytes::copy_from_slice(key.as_bytes()),
                expected_version: expected,
            }),
            SessionTag::default(),
        )
        .expect("a write")
    }

    fn code(result: &response::Result) -> Option<ErrorCode> {
        match result {
            response::Result::Error(e) => Some(ErrorCode::try_from(e.code).unwrap()),
            _ => None,
        }
    }

    #[test]
    fn put_sets_value_and_version_to_the_log_index() {
        let mut sm = StateMachine::new();
        assert_eq!(
            sm.apply(1, &put("a", "1")),
            response::Result::Write(WriteResult { version: 1 })
        );
        assert_eq!(sm.get(b"a"), Some((Bytes::from_static(b"1"), 1)));
        sm.apply(2, &put("a", "2"));
        assert_eq!(sm.get(b"a"), Some((Bytes::from_static(b"2"), 2)));
        assert_eq!(sm.applied_index(), 2);
    }

    #[test]
    fn cas_succeeds_only_at_the_expected_version() {
        let mut sm = StateMachine::new();
        assert_eq!(
            code(&sm.apply(1, &cas("k", 5, "x"))),
            Some(ErrorCode::VersionMismatch)
        );
        assert_eq!(sm.get(b"k"), None);
        assert_eq!(code(&sm.apply(2, &cas("k", 0, "x"))), None);
        assert_eq!(sm.version(b"k"), 2);
        assert_eq!(
            code(&sm.apply(3, &cas("k", 0, "y"))),
            Some(ErrorCode::VersionMismatch)
        );
        assert_eq!(code(&sm.apply(4, &cas("k", 2, "y"))), None);
        assert_eq!(sm.get(b"k"), Some((Bytes::from_static(b"y"), 4)));
    }

    #[test]
    fn delete_with_and_without_expected_version() {
        let mut sm = StateMachine::new();
        sm.apply(1, &put("k", "v"));
        assert_eq!(
            code(&sm.apply(2, &del("k", Some(7)))),
            Some(ErrorCode::VersionMismatch)
        );
        assert_eq!(
            sm.apply(3, &del("k", Some(1))),
            response::Result::Delete(DeleteResult { deleted: true })
        );
        assert_eq!(
            sm.apply(4, &del("k", None)),
            response::Result::Delete(DeleteResult { deleted: false })
        );
    }

    #[test]
    fn scan_is_ordered_half_open_and_limited() {
        let mut sm = StateMachine::new();
        for (i, k) in ["b", "a", "d", "c", "e"].iter().enumerate() {
            sm.apply(i as u64 + 1, &put(k, k));
        }
        let r = sm.scan(b"b", b"e", 0);
        let keys: Vec<_> = r.pairs.iter().map(|kv| kv.key.clone()).collect();
        assert_eq!(keys, vec!["b", "c", "d"]);
        assert!(!r.more);
        let r = sm.scan(b"", b"", 2);
        assert_eq!(r.pairs.len(), 2);
        assert!(r.more);
        assert!(sm.scan(b"z", b"a", 0).pairs.is_empty());
    }

    #[test]
    fn garbage_entry_is_answered_internal_and_still_advances() {
        let mut sm = StateMachine::new();
        let r = sm.apply(1, &Bytes::from_static(&[0xff, 0xff, 0xff]));
        assert_eq!(code(&r), Some(ErrorCode::Internal));
        assert_eq!(sm.applied_index(), 1);
    }

    #[test]
    #[should_panic(expected = "applied in order")]
    fn out_of_order_apply_panics() {
        let mut sm = StateMachine::new();
        sm.apply(2, &put("a", "1"));
    }

    #[test]
    fn bytes_follow_puts_overwrites_deletes_and_restores() {
        let mut sm = StateMachine::new();
        sm.apply(1, &put("ab", "12345"));
        assert_eq!(sm.bytes(), pair_bytes(2, 5));
        assert_eq!(sm.growth(b"ab", 2), -3);
        assert_eq!(sm.growth(b"new", 2), pair_bytes(3, 2) as i64);
        sm.apply(2, &cas("ab", 1, "12"));
        assert_eq!(sm.bytes(), pair_bytes(2, 2));
        sm.apply(3, &put("c", ""));
        assert_eq!(sm.bytes(), pair_bytes(2, 2) + pair_bytes(1, 0));
        // A refused CAS and a delete of nothing change nothing.
        sm.apply(4, &cas("c", 99, "zzzzzz"));
        sm.apply(5, &del("none", None));
        assert_eq!(sm.bytes(), pair_bytes(2, 2) + pair_bytes(1, 0));
        sm.apply(6, &del("ab", None));
        assert_eq!(sm.bytes(), pair_bytes(1, 0));
        let mut restored = StateMachine::new();
        let empty = restored.restore(6, sm.view());
        assert_eq!(restored.bytes(), sm.bytes());
        assert!(empty.map.is_empty());
        // The replaced state comes back whole, to be freed elsewhere.
        let replaced = restored.restore(7, Image::default());
        assert_eq!(replaced.bytes, sm.bytes());
        assert_eq!(replaced.map, sm.view().map);
        assert_eq!(restored.bytes(), 0);
        assert_eq!(restored.applied_index(), 7);
    }

    #[test]
    fn identical_logs_give_identical_maps() {
        let log: Vec<Bytes> = (0..200)
            .map(|i| match i % 3 {
                0 => put(&format!("k{}", i % 17), &i.to_string()),
                1 => cas(&format!("k{}", i % 13), (i as u64).saturating_sub(3), "c"),
                _ => del(&format!("k{}", i % 11), None),
            })
            .collect();
        let mut a = StateMachine::new();
        let mut b = StateMachine::new();
        for (i, e) in log.iter().enumerate() {
            assert_eq!(a.apply(i as u64 + 1, e), b.apply(i as u64 + 1, e));
        }
        assert!(a.iter().eq(b.iter()));
    }

    #[test]
    fn a_write_repeated_in_its_session_applies_once_and_answers_alike() {
        let mut sm = StateMachine::new();
        let open = command::encode(
            &Op::OpenSession(corekv_proto::client::OpenSession { shard: 0 }),
            SessionTag::default(),
        )
        .unwrap();
        let response::Result::Session(session) = sm.apply(1, &open) else {
            panic!("no session");
        };
        let tag = SessionTag {
            session_id: session.session_id,
            sequence: 1,
            acked_below: 1,
        };
        let cas = |expected| {
            command::encode(
                &Op::Cas(CompareAndSwap {
                    key: Bytes::from_static(b"counter"),
                    expected_version: expected,
                    value: Bytes::from_static(b"1"),
                }),
                tag,
            )
            .unwrap()
        };
        let first = sm.apply(2, &cas(0));
        assert_eq!(first, response::Result::Write(WriteResult { version: 2 }));
        // The retry reaches the log after the first attempt was applied: it
        // is answered as the first was, not VERSION_MISMATCH, and not applied.
        assert_eq!(sm.apply(3, &cas(0)), first);
        assert_eq!(sm.version(b"counter"), 2);
        // A write naming a session the shard does not have is refused.
        let stranger = command::encode(
            &Op::Put(Put {
                key: Bytes::from_static(b"k"),
                value: Bytes::from_static(b"v"),
            }),
            SessionTag {
                session_id: 999,
                sequence: 1,
                acked_below: 1,
            },
        )
        .unwrap();
        assert_eq!(
            code(&sm.apply(4, &stranger)),
            Some(ErrorCode::SessionExpired)
        );
        assert_eq!(sm.get(b"k"), None);
    }
}
