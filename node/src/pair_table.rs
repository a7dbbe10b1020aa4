//! One table of the map's hash index: the pairs in a dense vector, and a
//! hash table of their positions in it.
//!
//! Not a hash table of the pairs themselves: hashbrown grows a table by
//! doubling it, so right after a growth half of its slots are empty, and a
//! slot of a pair is 80 bytes. With 1M keys over 256 tables every table had
//! just doubled to 8,192 slots: the index took 201 MB, 201 bytes per key,
//! a fifth of the payload of 1 KiB values (jemalloc's statistics of a node
//! after `benches/big_state.sh`). Here the doubling table holds 4-byte
//! positions and the vector grows by an eighth, so a pair costs its 80
//! bytes, about a tenth more for the vector's room, and 5-10 bytes of
//! table. The price is one more load per lookup (the position, then the
//! pair), from a table small enough to stay in the caches: 10 MB of
//! positions and control bytes for 1M keys.
//!
//! A removal moves the last pair into the hole it leaves (so the vector
//! stays dense), and rehashes that pair's key to point its slot at its new
//! position.

use hashbrown::hash_table::{Entry, HashTable};

use crate::stored::{Key, Versioned};

/// The least a pair vector grows by, in pairs: a small table does not
/// reallocate on every few inserts.
const MIN_GROWTH: usize = 16;

/// Pairs by hash, stored densely (see the module documentation).
#[derive(Default)]
pub struct PairTable {
    /// Positions in `pairs`, by the hash of their key.
    slots: HashTable<u32>,
    pairs: Vec<(Key, Versioned)>,
}

impl PairTable {
    /// Number of pairs.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    /// The value of `key`, whose hash is `hash`.
    pub fn get(&self, hash: u64, key: &[u8]) -> Option<&Versioned> {
        let pairs = &self.pairs;
        self.slots
            .find(hash, |&at| pairs[at as usize].0.as_slice() == key)
            .map(|&at| &pairs[at as usize].1)
    }

    /// Stores the pair (`hash` is its key's hash; `rehash` hashes any key
    /// as the caller does, for the table's growth). A key it did not hold
    /// yet is also handed to `added`. Returns the value replaced.
    pub fn insert(
        &mut self,
        hash: u64,
        key: Key,
        value: Versioned,
        rehash: impl Fn(&[u8]) -> u64,
        added: impl FnOnce(&Key),
    ) -> Option<Versioned> {
        let pairs = &mut self.pairs;
        match self.slots.entry(
            hash,
            |&at| pairs[at as usize].0 == key,
            |&at| rehash(pairs[at as usize].0.as_slice()),
        ) {
            Entry::Occupied(held) => {
                Some(std::mem::replace(&mut pairs[*held.get() as usize].1, value))
            }
            Entry::Vacant(room) => {
                added(&key);
                if pairs.len() == pairs.capacity() {
                    // By an eighth, not the doubling of `push`: the room
                    // the vector keeps is memory per key (see above). Still
                    // geometric, so an insert moves O(1) pairs on average.
                    pairs.reserve_exact((pairs.len() / 8).max(MIN_GROWTH));
                }
                let at = u32::try_from(pairs.len()).expect("a table holds fewer than 2^32 pairs");
                pairs.push((key, value));
                room.insert(at);
                None
            }
        }
    }

    /// Removes `key` (whose hash is `hash`); returns its pair.
    pub fn remove(
        &mut self,
        hash: u64,
        key: &[u8],
        rehash: impl Fn(&[u8]) -> u64,
    ) -> Option<(Key, Versioned)> {
        let pairs = &self.pairs;
        let (at, _) = self
            .slots
            .find_entry(hash, |&at| pairs[at as usize].0.as_slice() == key)
            .ok()?
            .remove();
        let last = pairs.len() - 1;
        if at as usize != last {
            let moved = rehash(pairs[last].0.as_slice());
            let slot = self
                .slots
                .find_mut(moved, |&held| held as usize == last)
                .expect("every pair has a slot");
            *slot = at;
        }
        let pair = self.pairs.swap_remove(at as usize);
        self.shrink_if_sparse(&rehash);
        Some(pair)
    }

    /// Gives back the room of a table that lost most of its pairs (a
    /// workload that deleted most keys): at most once per quartering, so a
    /// removal still costs O(1) on average.
    fn shrink_if_sparse(&mut self, rehash: &impl Fn(&[u8]) -> u64) {
        let len = self.pairs.len();
        if self.pairs.capacity() <= 4 * MIN_GROWTH || len > self.pairs.capacity() / 4 {
            return;
        }
        self.pairs.shrink_to(len + len / 8);
        let pairs = &self.pairs;
        self.slots
            .shrink_to(len, |&at| rehash(pairs[at as usize].0.as_slice()));
    }

    /// The pairs, in no particular order.
    pub fn iter(&self) -> std::slice::Iter<'_, (Key, Versioned)> {
        self.pairs.iter()
    }

    /// Bytes the table holds beside what its keys and values point to:
    /// its slots, their control bytes and the pair vector's capacity.
    #[cfg(test)]
    fn footprint(&self) -> usize {
        self.slots.capacity() * (std::mem::size_of::<u32>() + 1)
            + self.pairs.capacity() * std::mem::size_of::<(Key, Versioned)>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use std::hash::{BuildHasher, RandomState};

    #[derive(Clone, Debug)]
    enum Step {
        Put(u16),
        Delete(u16),
    }

    fn key(k: u16) -> Vec<u8> {
        format!("key{k:05}").into_bytes()
    }

    fn value(version: u64) -> Versioned {
        Versioned {
            value: Bytes::new(),
            version,
        }
    }

    proptest! {
        /// Whatever the inserts and removals (and so the pairs a removal
        /// moves, and the growths and shrinks), every key reads back its
        /// last value and the table holds exactly the model's pairs.
        #[test]
        fn reads_like_a_map_through_moves_growths_and_shrinks(
            steps in proptest::collection::vec(
                prop_oneof![
                    3 => (0u16..600).prop_map(Step::Put),
                    2 => (0u16..600).prop_map(Step::Delete),
                ],
                0..3000,
            ),
        ) {
            let hasher = RandomState::new();
            let rehash = |k: &[u8]| hasher.hash_one(k);
            let mut table = PairTable::default();
            let mut model = BTreeMap::new();
            for (i, step) in steps.into_iter().enumerate() {
                let version = i as u64 + 1;
                match step {
                    Step::Put(k) => {
                        let key = key(k);
                        let mut added = false;
                        let old = table.insert(rehash(&key), Key::from_slice(&key), value(version), rehash, |_| added = true);
                        let want = model.insert(key, version);
                        prop_assert_eq!(old.map(|v| v.version), want);
                        prop_assert_eq!(added, want.is_none());
                    }
                    Step::Delete(k) => {
                        let key = key(k);
                        let old = table.remove(rehash(&key), &key, rehash);
                        prop_assert_eq!(old.map(|(k, v)| (k.as_slice().to_vec(), v.version)), model.remove(&key).map(|v| (key.clone(), v)));
                    }
                }
                prop_assert_eq!(table.len(), model.len());
            }
            for k in 0..600 {
                let key = key(k);
                prop_assert_eq!(table.get(rehash(&key), &key).map(|v| v.version), model.get(&key).copied());
            }
            let mut held: Vec<_> = table.iter().map(|(k, v)| (k.as_slice().to_vec(), v.version)).collect();
            held.sort();
            prop_assert_eq!(held, model.into_iter().collect::<Vec<_>>());
        }
    }

    /// A table of the keys `0..pairs`.
    fn filled(pairs: u16, rehash: impl Fn(&[u8]) -> u64) -> PairTable {
        let mut table = PairTable::default();
        for k in 0..pairs {
            let key = key(k);
            table.insert(
                rehash(&key),
                Key::from_slice(&key),
                value(1),
                &rehash,
                |_| {},
            );
        }
        table
    }

    /// The point of the table: a pair costs little more than its own
    /// bytes at any size, here just past a doubling of hashbrown's table
    /// (2,100 pairs: a table of 4,096 slots) and of a vector that doubles.
    /// 3,906 pairs is a 256th of 1M keys, what each table of a 1M-key map
    /// holds: past the 3,584 a table of 4,096 slots takes, so a hash table
    /// of the pairs themselves would be at 48 % of 8,192 slots.
    #[test]
    fn a_pair_costs_little_more_than_its_bytes_at_any_size() {
        let hasher = RandomState::new();
        let rehash = |k: &[u8]| hasher.hash_one(k);
        let pair = std::mem::size_of::<(Key, Versioned)>();
        for pairs in [2100, 3906] {
            let table = filled(pairs, rehash);
            let per_pair = table.footprint() as f64 / f64::from(pairs);
            assert!(
                per_pair < 1.2 * pair as f64 + 10.0,
                "{pairs} pairs: {per_pair:.1} bytes per {pair}-byte pair"
            );
        }
        let pairs = 3906;
        let mut table = filled(pairs, rehash);
        // Most keys deleted: the room goes back.
        for k in 0..pairs - 100 {
            let key = key(k);
            table.remove(rehash(&key), &key, rehash);
        }
        assert!(
            table.footprint() < 600 * pair,
            "{} bytes for 100 pairs",
            table.footprint()
        );
        for k in pairs - 100..pairs {
            let key = key(k);
            assert!(table.get(rehash(&key), &key).is_some());
        }
    }
}
