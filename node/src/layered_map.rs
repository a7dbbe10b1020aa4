//! The ordered map of a shard's state machine: a base shared behind an
//! `Arc`, and a hash table of the writes made while the base is shared
//! (the delta; a deleted key is a tombstone in it), with the keys it adds
//! to the base kept in order beside it.
//!
//! A clone (a snapshot's view) shares the base and copies the delta, which
//! is empty in the steady state: O(1). While a clone holds the base, writes
//! go to the delta; once the clone is dropped, every write moves a few
//! delta entries into the base, so the delta drains faster than it fills
//! and the shard thread never merges it in one go. Reads look in the delta
//! first. Against a persistent B-tree (imbl), whose every write after a
//! clone copies the nodes on its path, this halves the cost of a write
//! while a snapshot is written and lowers it otherwise (std's B-tree).
//!
//! The base keeps its keys in order in a B-tree (for ranges and snapshots)
//! and its pairs in a hash index (for gets and overwrites): a walk down a
//! B-tree of 100k-1M keys misses the cache at every level, 230-650 ns per
//! get on the development machine, where the index finds a key with two or
//! three misses (`benches/apply.rs`, `map_random_keys`). An overwrite of a
//! key already held, the common write, never touches the B-tree. The index
//! is split into [`INDEX_TABLES`] tables chosen by hash, so that a table's
//! growth rehashes a 256th of the keys on the shard thread, never all of
//! them at once (a stall that would grow with the data); each table keeps
//! its pairs densely beside a hash table of their positions
//! ([`PairTable`]), so the index costs about 100 bytes per key whatever
//! the tables' fill. The price: each key is held twice (README, "A hash
//! index beside the order").

use std::collections::BTreeSet;
use std::hash::{BuildHasher, RandomState};
use std::iter::Peekable;
use std::ops::Bound;
use std::sync::Arc;

use hashbrown::hash_table::{Entry, HashTable};

use crate::pair_table::PairTable;
use crate::stored::{Key, Versioned};

/// Delta entries moved into the base per write once the base is no longer
/// shared: more than one, so the delta shrinks while writes go on.
const MERGE_PER_WRITE: usize = 8;

/// Delta entries [`Map::merge_idle`] moves into the base per call (a
/// shard's tick, every 10 ms): a node whose writes stopped while a snapshot
/// was written drains its delta in seconds instead of holding, until the
/// next writes, both the old value (in the base) and the new one (in the
/// delta) of every key written during the snapshot. About 0.3 µs each, so
/// a tick spends at most a few hundred µs on it.
pub const MERGE_PER_TICK: usize = 1024;

/// Tables of the base's hash index (see the module documentation).
pub const INDEX_TABLES: usize = 256;

/// What a write replaced or a remove took: the version and size the
/// caller accounts for. Not the value itself: while a view shares the base,
/// handing the value out would take a share of it, which costs an
/// allocation (`Bytes` turns a buffer it owns alone into a shared one) and
/// a reference count on a line cold in the cache, on every write of a
/// snapshot's duration, for a value the caller only measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Replaced {
    /// Raft index of the write that stored the old value.
    pub version: u64,
    /// Length of the old value.
    pub value_len: usize,
}

impl Replaced {
    fn of(old: &Versioned) -> Replaced {
        Replaced {
            version: old.version,
            value_len: old.value.len(),
        }
    }
}

/// See the module documentation.
#[derive(Clone, Default)]
pub struct Map {
    base: Arc<Base>,
    delta: Delta,
    len: usize,
}

/// Writes since the base was shared, by hash: an overwrite (the common
/// write) costs one probe of a hash table instead of a walk down a B-tree
/// of every key written since the snapshot began (perf, leader's shard
/// during BIG's first 1 GB snapshot: `insert_in_delta` 16 % of its samples
/// with a `BTreeMap` delta). Keys hash with the base index's hasher, so a
/// write hashes its key once for both, and are split into
/// [`INDEX_TABLES`] tables as the index is: one table of a delta that
/// reached 300k keys rehashed them all when it grew, a 60 ms loop turn.
#[derive(Clone)]
struct Delta {
    /// `None` deletes a key. A key stays here until it is merged, even once
    /// deleted, so that `queue` holds each key once.
    tables: Box<[HashTable<DeltaEntry>]>,
    len: usize,
    /// The keys of `tables` that the base did not hold when they came, in
    /// order: a range walks them beside the base's order, which holds every
    /// other key of the delta.
    added: BTreeSet<Key>,
    /// The keys of `tables`, for the merge to take them one by one; in
    /// chunks of [`QUEUE_CHUNK`], so that it grows without copying what it
    /// holds.
    queue: Vec<Vec<Key>>,
}

/// A key written while the base was shared, and its value (`None`: deleted).
type DeltaEntry = (Key, Option<Versioned>);

/// Keys per chunk of [`Delta::queue`].
const QUEUE_CHUNK: usize = 4096;

impl Default for Delta {
    fn default() -> Self {
        Delta {
            tables: (0..INDEX_TABLES).map(|_| HashTable::new()).collect(),
            len: 0,
            added: BTreeSet::new(),
            queue: Vec::new(),
        }
    }
}

impl Delta {
    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn len(&self) -> usize {
        self.len
    }

    fn get(&self, hash: u64, key: &[u8]) -> Option<&Option<Versioned>> {
        self.tables[Index::table(hash)]
            .find(hash, |(k, _)| k.as_slice() == key)
            .map(|(_, entry)| entry)
    }

    fn entries(&self) -> impl Iterator<Item = &DeltaEntry> + Clone + '_ {
        self.tables.iter().flat_map(|table| table.iter())
    }

    fn push_queue(&mut self, key: Key) {
        match self.queue.last_mut() {
            Some(chunk) if chunk.len() < QUEUE_CHUNK => chunk.push(key),
            _ => {
                let mut chunk = Vec::with_capacity(QUEUE_CHUNK);
                chunk.push(key);
                self.queue.push(chunk);
            }
        }
    }

    fn pop_queue(&mut self) -> Option<Key> {
        loop {
            let chunk = self.queue.last_mut()?;
            if let Some(key) = chunk.pop() {
                return Some(key);
            }
            self.queue.pop();
        }
    }
}

/// The keys in order, and the pairs by hash: always the same keys.
#[derive(Default)]
struct Base {
    order: BTreeSet<Key>,
    index: Index,
}

/// The pairs of the base by hash, in [`INDEX_TABLES`] tables.
struct Index {
    /// Keyed per process (SipHash): a client cannot choose keys that
    /// collide.
    hasher: RandomState,
    tables: Box<[PairTable]>,
}

impl Default for Index {
    fn default() -> Self {
        Index {
            hasher: RandomState::new(),
            tables: (0..INDEX_TABLES).map(|_| PairTable::default()).collect(),
        }
    }
}

impl Index {
    fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    /// The table of `hash`: bits a table uses for neither its bucket
    /// (the low bits) nor its control bytes (the top 7).
    fn table(hash: u64) -> usize {
        (hash >> 32) as usize % INDEX_TABLES
    }

    fn get(&self, key: &[u8]) -> Option<&Versioned> {
        self.get_hashed(self.hash(key), key)
    }

    fn get_hashed(&self, hash: u64, key: &[u8]) -> Option<&Versioned> {
        self.tables[Self::table(hash)].get(hash, key)
    }

    /// Stores the pair; a key it did not hold yet is also handed to
    /// `added` (so an overwrite, the common write, copies no key).
    fn insert(
        &mut self,
        key: Key,
        value: Versioned,
        added: impl FnOnce(&Key),
    ) -> Option<Versioned> {
        self.insert_hashed(self.hash(key.as_slice()), key, value, added)
    }

    /// [`Index::insert`] of a key whose hash the caller already has.
    fn insert_hashed(
        &mut self,
        hash: u64,
        key: Key,
        value: Versioned,
        added: impl FnOnce(&Key),
    ) -> Option<Versioned> {
        let hasher = &self.hasher;
        self.tables[Self::table(hash)].insert(hash, key, value, |k| hasher.hash_one(k), added)
    }

    fn remove_hashed(&mut self, hash: u64, key: &[u8]) -> Option<(Key, Versioned)> {
        let hasher = &self.hasher;
        self.tables[Self::table(hash)].remove(hash, key, |k| hasher.hash_one(k))
    }
}

impl Base {
    fn get(&self, key: &[u8]) -> Option<&Versioned> {
        self.index.get(key)
    }

    fn insert(&mut self, key: Key, value: Versioned) -> Option<Versioned> {
        self.insert_hashed(self.index.hash(key.as_slice()), key, value)
    }

    /// A write whose key's hash the caller already has (the delta's merge
    /// found the key in the delta with it).
    fn insert_hashed(&mut self, hash: u64, key: Key, value: Versioned) -> Option<Versioned> {
        let order = &mut self.order;
        self.index.insert_hashed(hash, key, value, |key| {
            order.insert(key.clone());
        })
    }

    fn remove(&mut self, key: &[u8]) -> Option<Versioned> {
        self.remove_hashed(self.index.hash(key), key)
    }

    fn remove_hashed(&mut self, hash: u64, key: &[u8]) -> Option<Versioned> {
        let (key, value) = self.index.remove_hashed(hash, key)?;
        self.order.remove(&key);
        Some(value)
    }
}

/// Builds a map out of many pairs at once (a snapshot being loaded): the
/// index takes each pair as it comes, and the order is built once at the
/// end from the keys collected, sorted once instead of a walk down the
/// B-tree per key. Any order and repeated keys give the map that inserting
/// them one by one gives.
#[derive(Default)]
pub struct Builder {
    keys: Vec<Key>,
    index: Index,
}

impl Builder {
    /// Stores `value` at `key`; says what it replaced.
    pub fn insert(&mut self, key: Key, value: Versioned) -> Option<Replaced> {
        let keys = &mut self.keys;
        self.index
            .insert(key, value, |key| keys.push(key.clone()))
            .map(|old| Replaced::of(&old))
    }

    pub fn finish(self) -> Map {
        let len = self.keys.len();
        let mut keys = self.keys;
        // Keys are unique here (the index saw every repeat), so an unstable
        // sort gives the one order; std then finds one sorted run and
        // builds the tree bottom up.
        keys.sort_unstable();
        let order = keys.into_iter().collect();
        Map {
            base: Arc::new(Base {
                order,
                index: self.index,
            }),
            delta: Delta::default(),
            len,
        }
    }
}

impl std::fmt::Debug for Map {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Map")
            .field("len", &self.len)
            .field("delta", &self.delta.len())
            .finish()
    }
}

/// Equal when they hold the same pairs, however they are layered.
impl PartialEq for Map {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.iter().eq(other.iter())
    }
}

impl Map {
    /// An empty map.
    pub fn new() -> Map {
        Map::default()
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no key is stored.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The value at `key`.
    pub fn get(&self, key: &[u8]) -> Option<&Versioned> {
        if self.delta.is_empty() {
            return self.base.get(key);
        }
        let hash = self.base.index.hash(key);
        match self.delta.get(hash, key) {
            Some(entry) => entry.as_ref(),
            None => self.base.index.get_hashed(hash, key),
        }
    }

    /// Stores `value` at `key`; says what it replaced.
    pub fn insert(&mut self, key: Key, value: Versioned) -> Option<Replaced> {
        let old = if self.delta.is_empty() {
            match Arc::get_mut(&mut self.base) {
                Some(base) => base.insert(key, value).map(|old| Replaced::of(&old)),
                None => self.insert_in_delta(key, value),
            }
        } else {
            let old = self.insert_in_delta(key, value);
            self.merge_some(MERGE_PER_WRITE);
            old
        };
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Removes `key`; says what it held.
    pub fn remove(&mut self, key: &[u8]) -> Option<Replaced> {
        let old = if self.delta.is_empty() {
            match Arc::get_mut(&mut self.base) {
                Some(base) => base.remove(key).map(|old| Replaced::of(&old)),
                None => self.remove_in_delta(key),
            }
        } else {
            let old = self.remove_in_delta(key);
            self.merge_some(MERGE_PER_WRITE);
            old
        };
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    /// The pairs with keys in `(start, end)`, in key order.
    pub fn range<'a>(
        &'a self,
        start: Bound<&'a [u8]>,
        end: Bound<&'a [u8]>,
    ) -> impl Iterator<Item = (&'a Key, &'a Versioned)> + 'a {
        let index = &self.base.index;
        let delta = &self.delta;
        let base = self.base.order.range::<[u8], _>((start, end));
        let added = delta.added.range::<[u8], _>((start, end));
        Merged {
            base: base.peekable(),
            added: added.peekable(),
        }
        .filter_map(move |(key, from_base)| {
            let hash = index.hash(key.as_slice());
            let written = if delta.is_empty() {
                None
            } else {
                delta.get(hash, key.as_slice())
            };
            let value = match written {
                Some(entry) => entry.as_ref(),
                None if from_base => index.get_hashed(hash, key.as_slice()),
                None => None,
            };
            value.map(|value| (key, value))
        })
    }

    /// Every pair, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&Key, &Versioned)> + '_ {
        self.range(Bound::Unbounded, Bound::Unbounded)
    }

    /// Every pair, in no particular order: the base's index tables walked
    /// as they lie in memory, then the delta. The key order costs a hash
    /// lookup per key (the values live in the index only), and that lookup
    /// was half of a snapshot writer's CPU with 1M keys (perf during BIG:
    /// `Index::get` 20.7 % of all samples, the writer threads 41 %), taken
    /// from the shard threads on a machine with fewer cores than threads.
    /// For a reader that needs no order (`Builder` sorts once).
    pub fn iter_unordered(&self) -> impl Iterator<Item = (&Key, &Versioned)> + Clone + '_ {
        let delta = &self.delta;
        let index = &self.base.index;
        let base = self
            .base
            .index
            .tables
            .iter()
            .flat_map(|table| table.iter())
            .filter(move |(key, _)| {
                delta.is_empty()
                    || delta
                        .get(index.hash(key.as_slice()), key.as_slice())
                        .is_none()
            })
            .map(|(key, value)| (key, value));
        let written = delta
            .entries()
            .filter_map(|(key, value)| value.as_ref().map(|value| (key, value)));
        base.chain(written)
    }

    fn insert_in_delta(&mut self, key: Key, value: Versioned) -> Option<Replaced> {
        let index = &self.base.index;
        let hash = index.hash(key.as_slice());
        let delta = &mut self.delta;
        // The delta first: a key written twice while a view lives costs no
        // second lookup in the large base.
        match delta.tables[Index::table(hash)].entry(
            hash,
            |(k, _)| *k == key,
            |(k, _)| index.hash(k.as_slice()),
        ) {
            Entry::Occupied(mut held) => held
                .get_mut()
                .1
                .replace(value)
                .map(|old| Replaced::of(&old)),
            Entry::Vacant(room) => {
                let in_base = index.get_hashed(hash, key.as_slice()).map(Replaced::of);
                room.insert((key.clone(), Some(value)));
                delta.len += 1;
                if in_base.is_none() {
                    delta.added.insert(key.clone());
                }
                delta.push_queue(key);
                in_base
            }
        }
    }

    fn remove_in_delta(&mut self, key: &[u8]) -> Option<Replaced> {
        let index = &self.base.index;
        let hash = index.hash(key);
        let delta = &mut self.delta;
        let table = &mut delta.tables[Index::table(hash)];
        if let Ok(mut held) = table.find_entry(hash, |(k, _)| k.as_slice() == key) {
            return held.get_mut().1.take().map(|old| Replaced::of(&old));
        }
        let in_base = index.get_hashed(hash, key).map(Replaced::of)?;
        let key = Key::from_slice(key);
        table.insert_unique(hash, (key.clone(), None), |(k, _)| index.hash(k.as_slice()));
        delta.len += 1;
        delta.push_queue(key);
        Some(in_base)
    }

    /// Moves up to [`MERGE_PER_TICK`] delta entries into the base, if no
    /// clone shares it any more: for the times no write comes to do it.
    pub fn merge_idle(&mut self) {
        if !self.delta.is_empty() {
            self.merge_some(MERGE_PER_TICK);
        }
    }

    /// Moves up to `most` delta entries into the base, if no clone shares
    /// it any more.
    fn merge_some(&mut self, most: usize) {
        let Some(base) = Arc::get_mut(&mut self.base) else {
            return;
        };
        let delta = &mut self.delta;
        for _ in 0..most {
            let Some(key) = delta.pop_queue() else {
                return;
            };
            let hash = base.index.hash(key.as_slice());
            let table = &mut delta.tables[Index::table(hash)];
            let Ok(held) = table.find_entry(hash, |(k, _)| k.as_slice() == key.as_slice()) else {
                continue;
            };
            let ((key, entry), _) = held.remove();
            delta.len -= 1;
            if table.is_empty() {
                // A table keeps its capacity as it empties: give back what
                // a snapshot's worth of writes made it grow to.
                *table = HashTable::new();
            }
            delta.added.remove(&key);
            match entry {
                Some(value) => {
                    base.insert_hashed(hash, key, value);
                }
                None => {
                    base.remove_hashed(hash, key.as_slice());
                }
            }
        }
    }
}

/// The keys of the base's order and of the delta's added keys, merged in
/// order, each with whether it came from the base. The two never share a
/// key: a key is added only while the base does not hold it, and it leaves
/// the added keys when it is merged into the base.
struct Merged<'a, B: Iterator<Item = &'a Key>, A: Iterator<Item = &'a Key>> {
    base: Peekable<B>,
    added: Peekable<A>,
}

impl<'a, B: Iterator<Item = &'a Key>, A: Iterator<Item = &'a Key>> Iterator for Merged<'a, B, A> {
    type Item = (&'a Key, bool);

    fn next(&mut self) -> Option<Self::Item> {
        match (self.base.peek(), self.added.peek()) {
            (None, None) => None,
            (Some(_), None) => self.base.next().map(|k| (k, true)),
            (None, Some(_)) => self.added.next().map(|k| (k, false)),
            (Some(b), Some(a)) => {
                if b < a {
                    self.base.next().map(|k| (k, true))
                } else {
                    self.added.next().map(|k| (k, false))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[derive(Clone, Debug)]
    enum Step {
        Put(u8, u8),
        Delete(u8),
        /// Take a view (a snapshot's clone) and keep it.
        Freeze,
        /// Drop the oldest view kept.
        Release,
        Range(u8, u8),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            6 => (0u8..40, any::<u8>()).prop_map(|(k, v)| Step::Put(k, v)),
            3 => (0u8..40).prop_map(Step::Delete),
            1 => Just(Step::Freeze),
            1 => Just(Step::Release),
            1 => (0u8..40, 0u8..40).prop_map(|(a, b)| Step::Range(a, b)),
        ]
    }

    /// Key -> (version, value length).
    type Model = BTreeMap<Vec<u8>, (u64, usize)>;

    /// A one-byte value at `version`.
    fn value(version: u64) -> Versioned {
        Versioned {
            value: Bytes::from_static(b"v"),
            version,
        }
    }

    fn key(k: u8) -> Vec<u8> {
        format!("k{k:02}").into_bytes()
    }

    fn pairs<'a>(it: impl Iterator<Item = (&'a Key, &'a Versioned)>) -> Vec<(Vec<u8>, u64)> {
        it.map(|(k, v)| (k.as_slice().to_vec(), v.version))
            .collect()
    }

    fn sorted(mut pairs: Vec<(Vec<u8>, u64)>) -> Vec<(Vec<u8>, u64)> {
        pairs.sort();
        pairs
    }

    proptest! {
        /// Whatever the writes, views and releases, the map reads like a
        /// plain ordered map, and every view keeps reading like the map did
        /// when it was taken.
        #[test]
        fn reads_like_a_btree_map_and_views_stay_frozen(steps in proptest::collection::vec(step(), 0..300)) {
            let mut map = Map::new();
            let mut model = Model::new();
            let mut views: Vec<(Map, Model)> = Vec::new();
            for (i, step) in steps.into_iter().enumerate() {
                let version = i as u64 + 1;
                match step {
                    Step::Put(k, v) => {
                        let len = usize::from(v % 5);
                        let old = map.insert(
                            Key::from_slice(&key(k)),
                            Versioned { value: Bytes::from(vec![v; len]), version },
                        );
                        prop_assert_eq!(
                            old.map(|o| (o.version, o.value_len)),
                            model.insert(key(k), (version, len))
                        );
                    }
                    Step::Delete(k) => {
                        let old = map.remove(&key(k));
                        prop_assert_eq!(old.map(|o| (o.version, o.value_len)), model.remove(&key(k)));
                    }
                    Step::Freeze => views.push((map.clone(), model.clone())),
                    Step::Release => {
                        if !views.is_empty() {
                            views.remove(0);
                        }
                    }
                    Step::Range(a, b) => {
                        let (a, b) = (key(a), key(b));
                        if a <= b {
                            let got = pairs(map.range(Bound::Included(&a), Bound::Excluded(&b)));
                            let want: Vec<_> = model.range(a.clone()..b.clone()).map(|(k, v)| (k.clone(), v.0)).collect();
                            prop_assert_eq!(got, want);
                        }
                    }
                }
                prop_assert_eq!(map.len(), model.len());
                for k in 0..40u8 {
                    prop_assert_eq!(
                        map.get(&key(k)).map(|v| (v.version, v.value.len())),
                        model.get(&key(k)).copied()
                    );
                }
            }
            let want: Vec<_> = model.iter().map(|(k, v)| (k.clone(), v.0)).collect();
            prop_assert_eq!(pairs(map.iter()), want.clone());
            prop_assert_eq!(sorted(pairs(map.iter_unordered())), want);
            for (view, frozen) in &views {
                let want: Vec<_> = frozen.iter().map(|(k, v)| (k.clone(), v.0)).collect();
                prop_assert_eq!(pairs(view.iter()), want.clone());
                prop_assert_eq!(sorted(pairs(view.iter_unordered())), want);
                prop_assert_eq!(view.len(), frozen.len());
            }
        }
    }

    proptest! {
        /// A built map is the map the same inserts give one by one, sorted
        /// or not, with repeats, and it then takes writes and views as any.
        #[test]
        fn a_built_map_equals_one_inserted_pair_by_pair(
            keys in proptest::collection::vec(0u8..60, 0..200),
            sorted in any::<bool>(),
        ) {
            let mut keys = keys;
            if sorted {
                keys.sort();
            }
            let mut built = Builder::default();
            let mut inserted = Map::new();
            for (i, k) in keys.iter().enumerate() {
                let value = Versioned { value: Bytes::from(vec![*k]), version: i as u64 + 1 };
                let a = built.insert(Key::from_slice(&key(*k)), value.clone());
                let b = inserted.insert(Key::from_slice(&key(*k)), value);
                prop_assert_eq!(a.map(|o| o.version), b.map(|o| o.version));
            }
            let mut built = built.finish();
            prop_assert_eq!(built.len(), inserted.len());
            prop_assert_eq!(pairs(built.iter()), pairs(inserted.iter()));
            let view = built.clone();
            built.insert(Key::from_slice(&key(61)), Versioned { value: Bytes::new(), version: 0 });
            prop_assert_eq!(built.len(), inserted.len() + 1);
            prop_assert_eq!(pairs(view.iter()), pairs(inserted.iter()));
        }
    }

    /// The keys spread over every table of the index, so a table's growth
    /// rehashes about its share of them: a table chosen by bits the tables
    /// also use for their buckets or control bytes would not.
    #[test]
    fn the_index_spreads_keys_over_its_tables() {
        let mut map = Map::new();
        let keys = 64 * INDEX_TABLES;
        for i in 0..keys {
            let key = format!("key{i:013}");
            map.insert(
                Key::from_slice(key.as_bytes()),
                Versioned {
                    value: Bytes::new(),
                    version: 1,
                },
            );
        }
        let lens: Vec<usize> = map.base.index.tables.iter().map(|t| t.len()).collect();
        let fullest = lens.iter().max().copied().unwrap_or(0);
        assert!(lens.iter().all(|&len| len > 0), "{lens:?}");
        assert!(fullest <= 2 * keys / INDEX_TABLES, "{lens:?}");
        for i in (0..keys).step_by(97) {
            let key = format!("key{i:013}");
            assert_eq!(map.get(key.as_bytes()).map(|v| v.version), Some(1));
        }
    }

    #[test]
    fn the_delta_drains_once_no_view_holds_the_base() {
        let mut map = Map::new();
        for k in 0..100u8 {
            map.insert(Key::from_slice(&key(k)), value(1));
        }
        let view = map.clone();
        for k in 0..100u8 {
            map.insert(Key::from_slice(&key(k)), value(2));
        }
        assert_eq!(map.delta.len(), 100);
        drop(view);
        for round in 0..20u64 {
            map.insert(Key::from_slice(&key(0)), value(3 + round));
        }
        assert!(map.delta.is_empty(), "{} left", map.delta.len());
        // Drained, the delta holds no memory: its tables gave back what the
        // writes made them grow to.
        assert!(map.delta.tables.iter().all(|t| t.capacity() == 0));
        assert!(map.delta.queue.is_empty() && map.delta.added.is_empty());
        assert!(map.iter().skip(1).all(|(_, v)| v.version == 2));
    }

    #[test]
    fn an_idle_map_drains_its_delta_without_writes() {
        let mut map = Map::new();
        let keys = MERGE_PER_TICK as u32 * 2 + 10;
        let key = |k: u32| Key::from_slice(&k.to_be_bytes());
        for k in 0..keys {
            map.insert(key(k), value(1));
        }
        let view = map.clone();
        for k in 0..keys {
            map.insert(key(k), value(2));
        }
        // While the view lives the base is shared: nothing moves.
        map.merge_idle();
        assert_eq!(map.delta.len(), keys as usize);
        drop(view);
        map.merge_idle();
        assert_eq!(map.delta.len(), keys as usize - MERGE_PER_TICK);
        map.merge_idle();
        map.merge_idle();
        assert!(map.delta.is_empty(), "{} left", map.delta.len());
        assert!(map.delta.tables.iter().all(|t| t.capacity() == 0));
        assert!(map.iter().all(|(_, v)| v.version == 2));
        assert_eq!(map.len(), keys as usize);
    }
}
