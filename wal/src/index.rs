//! The in-memory index over the mapped segments. Recovery builds it by
//! replay and the `Wal` extends it on append; it lives apart from both so
//! neither has to reach into the other for it.

use std::collections::VecDeque;
use std::ops::Range;

/// Where an entry's data lives: no copy of the data is kept in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct EntryLocation {
    pub(crate) term: u64,
    pub(crate) sequence: u64,
    /// Offset of the data inside the segment.
    pub(crate) data_offset: u32,
    pub(crate) data_len: u32,
    pub(crate) entry_type: u8,
}

/// Locations per chunk of [`EntryIndex`]: 128 KiB.
const CHUNK_ENTRIES: usize = 4096;

/// The locations of the entries held, oldest first, in fixed-size chunks.
///
/// Not a `VecDeque`: one that holds the log between two snapshots of a
/// large state grows to millions of locations, and each doubling copied
/// all of them and faulted in twice the memory on the shard thread in one
/// append. Measured at BIG (1M keys x 1 KiB, 3 nodes): the growth to 2M
/// locations held the loop 62-449 ms, long enough for the followers to
/// elect a new leader. Here an append allocates at most one chunk and
/// compaction frees whole chunks, so no call costs more with a longer log.
#[derive(Debug, Default)]
pub(crate) struct EntryIndex {
    /// Every chunk but the last is full; the first one's first `head`
    /// locations were dropped from the front.
    chunks: VecDeque<Vec<EntryLocation>>,
    head: usize,
    len: usize,
    /// One emptied chunk kept for the next one needed, so that a log
    /// compacted as fast as it grows stops allocating.
    spare: Option<Vec<EntryLocation>>,
}

impl EntryIndex {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The location at `position` (0 is the oldest held).
    pub(crate) fn get(&self, position: usize) -> Option<&EntryLocation> {
        if position >= self.len {
            return None;
        }
        let at = self.head + position;
        Some(&self.chunks[at / CHUNK_ENTRIES][at % CHUNK_ENTRIES])
    }

    pub(crate) fn push_back(&mut self, location: EntryLocation) {
        if self
            .chunks
            .back()
            .is_none_or(|chunk| chunk.len() == CHUNK_ENTRIES)
        {
            let chunk = self
                .spare
                .take()
                .unwrap_or_else(|| Vec::with_capacity(CHUNK_ENTRIES));
            self.chunks.push_back(chunk);
        }
        self.chunks
            .back_mut()
            .expect("a chunk with room was just ensured")
            .push(location);
        self.len += 1;
    }

    /// Keeps the oldest `len` locations.
    pub(crate) fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        if len == 0 {
            return self.clear();
        }
        let end = self.head + len;
        let chunks = end.div_ceil(CHUNK_ENTRIES);
        while self.chunks.len() > chunks {
            let chunk = self.chunks.pop_back().expect("more chunks than kept");
            self.recycle(chunk);
        }
        let last = self.chunks.back_mut().expect("len > 0 keeps a chunk");
        last.truncate(end - (chunks - 1) * CHUNK_ENTRIES);
        self.len = len;
    }

    /// Drops the oldest `count` locations (all of them if fewer are held).
    pub(crate) fn remove_front(&mut self, count: usize) {
        if count >= self.len {
            return self.clear();
        }
        let start = self.head + count;
        for _ in 0..start / CHUNK_ENTRIES {
            let chunk = self.chunks.pop_front().expect("a chunk before the start");
            self.recycle(chunk);
        }
        self.head = start % CHUNK_ENTRIES;
        self.len -= count;
    }

    pub(crate) fn clear(&mut self) {
        while let Some(chunk) = self.chunks.pop_back() {
            self.recycle(chunk);
        }
        self.head = 0;
        self.len = 0;
    }

    /// The locations at `positions`, in order.
    ///
    /// Panics if the range passes the end, as a slice does.
    pub(crate) fn range(
        &self,
        positions: Range<usize>,
    ) -> impl Iterator<Item = &EntryLocation> + '_ {
        assert!(
            positions.start <= positions.end && positions.end <= self.len,
            "range {positions:?} out of an index of {}",
            self.len
        );
        let start = self.head + positions.start;
        let end = self.head + positions.end;
        let first_chunk = start / CHUNK_ENTRIES;
        let chunks = if start == end {
            0
        } else {
            (end - 1) / CHUNK_ENTRIES + 1 - first_chunk
        };
        self.chunks
            .iter()
            .skip(first_chunk)
            .take(chunks)
            .enumerate()
            .flat_map(move |(n, chunk)| {
                let chunk_start = (first_chunk + n) * CHUNK_ENTRIES;
                let from = start.saturating_sub(chunk_start);
                let to = (end - chunk_start).min(CHUNK_ENTRIES);
                &chunk[from..to]
            })
    }

    /// Every location, oldest first.
    #[cfg(test)]
    pub(crate) fn iter(&self) -> impl Iterator<Item = &EntryLocation> + '_ {
        self.range(0..self.len)
    }

    fn recycle(&mut self, mut chunk: Vec<EntryLocation>) {
        if self.spare.is_none() {
            chunk.clear();
            self.spare = Some(chunk);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn location(n: u64) -> EntryLocation {
        EntryLocation {
            term: n,
            sequence: n / 7,
            data_offset: n as u32,
            data_len: (n % 13) as u32,
            entry_type: (n % 3) as u8,
        }
    }

    #[derive(Clone, Debug)]
    enum Step {
        Push(usize),
        Truncate(usize),
        RemoveFront(usize),
        Clear,
    }

    fn step() -> impl Strategy<Value = Step> {
        // Counts around a chunk's size, so that pushes and removals cross
        // chunk boundaries and empty the index often.
        prop_oneof![
            6 => (0..2 * CHUNK_ENTRIES + 3).prop_map(Step::Push),
            2 => (0..3 * CHUNK_ENTRIES).prop_map(Step::Truncate),
            3 => (0..2 * CHUNK_ENTRIES + 3).prop_map(Step::RemoveFront),
            1 => Just(Step::Clear),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn behaves_like_a_vecdeque(steps in proptest::collection::vec(step(), 1..40)) {
            let mut index = EntryIndex::default();
            let mut model = VecDeque::new();
            let mut next = 0u64;
            for step in steps {
                match step {
                    Step::Push(count) => {
                        for _ in 0..count {
                            index.push_back(location(next));
                            model.push_back(location(next));
                            next += 1;
                        }
                    }
                    Step::Truncate(len) => {
                        index.truncate(len);
                        model.truncate(len);
                    }
                    Step::RemoveFront(count) => {
                        index.remove_front(count);
                        model.drain(..count.min(model.len()));
                    }
                    Step::Clear => {
                        index.clear();
                        model.clear();
                    }
                }
                prop_assert_eq!(index.len(), model.len());
                prop_assert_eq!(index.is_empty(), model.is_empty());
                prop_assert!(index.iter().eq(model.iter()));
                let len = model.len();
                for position in [0, 1, len / 3, len.saturating_sub(1), len, len + 1] {
                    prop_assert_eq!(index.get(position), model.get(position));
                }
                let (a, b) = (len / 4, len - len / 5);
                prop_assert!(index.range(a..b).eq(model.range(a..b)));
                prop_assert!(index.range(b..b).next().is_none());
            }
        }
    }

    /// Compaction hands chunks back: a log compacted as fast as it grows
    /// holds a bounded number of chunks however long it runs.
    #[test]
    fn a_log_compacted_as_it_grows_keeps_few_chunks() {
        let mut index = EntryIndex::default();
        for n in 0..20 * CHUNK_ENTRIES as u64 {
            index.push_back(location(n));
            if index.len() > CHUNK_ENTRIES + 10 {
                index.remove_front(index.len() - CHUNK_ENTRIES);
            }
            assert!(index.chunks.len() <= 3, "{} chunks", index.chunks.len());
        }
        let newest = 20 * CHUNK_ENTRIES as u64 - 1;
        let oldest = newest + 1 - index.len() as u64;
        assert_eq!(index.get(0), Some(&location(oldest)));
        assert_eq!(index.get(index.len() - 1), Some(&location(newest)));
    }
}
