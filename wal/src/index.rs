//! The in-memory index over the mapped segments. Recovery builds it by
//! replay and the `Wal` extends it on append; it lives apart from both so
//! neither has to reach into the other for it.

/// Where an entry's data lives: no copy of the data is kept in memory.
#[derive(Clone, Copy, Debug)]
pub(crate) struct EntryLocation {
    pub(crate) term: u64,
    pub(crate) sequence: u64,
    /// Offset of the data inside the segment.
    pub(crate) data_offset: u32,
    pub(crate) data_len: u32,
    pub(crate) entry_type: u8,
}
