//! The plain values the WAL stores and hands back. They mirror raft's types
//! without depending on raft, so the log stays usable by any replication layer.

use std::path::PathBuf;

/// How a WAL is laid out on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalOptions {
    /// Size every new segment file is preallocated to. Bigger segments mean
    /// fewer rotations (file create + fallocate + mmap on the append path) but
    /// coarser compaction. Must be a multiple of 8 within
    /// [`MIN_SEGMENT_BYTES`, `MAX_SEGMENT_BYTES`].
    pub segment_bytes: u64,
    /// The shard this log belongs to, written into every segment header so a
    /// directory mix-up is caught at open instead of replaying another shard.
    pub shard_id: u32,
    /// Bytes of retired segments kept as free files for new segments to
    /// reuse instead of creating files (see the `format` module's
    /// "Recycling"): writes into a reused file zero no page cache pages and
    /// convert no unwritten extents, so syncs write data only. 0 deletes
    /// every retired segment.
    pub recycle_bytes: u64,
}

/// Default `recycle_bytes`: 1 GiB, the log a 1 GB state writes between two
/// snapshots (at the node's default `snapshot_log_percent`), so that at that
/// size nearly every new segment is a reused one. The WAL directory holds at
/// most this much more than its live log, and usually less: a free file is
/// only there because the live log was that much longer before.
pub const DEFAULT_RECYCLE_BYTES: u64 = 1 << 30;

/// Smallest accepted `segment_bytes`: room for the header, the metadata copies
/// and some entries (tests use small segments to exercise rotation).
pub const MIN_SEGMENT_BYTES: u64 = 4096;
/// Largest accepted `segment_bytes`: offsets inside a segment are kept as u32
/// in the in-memory index.
pub const MAX_SEGMENT_BYTES: u64 = 1 << 31;
/// Default `segment_bytes`: 64 MiB.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;

impl Default for WalOptions {
    fn default() -> WalOptions {
        WalOptions {
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            shard_id: 0,
            recycle_bytes: DEFAULT_RECYCLE_BYTES,
        }
    }
}

/// One log entry, borrowed: on append from the caller, on read from the mapped
/// segment (no copy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryRef<'a> {
    /// Raft index, >= 1.
    pub index: u64,
    /// Raft term the entry was proposed in.
    pub term: u64,
    /// Opaque to the WAL (raft's entry type: normal, conf change, ...).
    pub entry_type: u8,
    /// The entry's payload.
    pub data: &'a [u8],
}

/// Raft's hard state: what must survive a restart besides the log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HardState {
    /// Current term.
    pub term: u64,
    /// Candidate voted for in `term` (0 = none).
    pub vote: u64,
    /// Highest index known committed.
    pub commit: u64,
}

/// Raft's membership: voter and learner ids.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfState {
    /// Ids of voting members.
    pub voters: Vec<u64>,
    /// Ids of non-voting members.
    pub learners: Vec<u64>,
}

/// The point a durable state-machine snapshot covers: every entry up to and
/// including `index` (whose term was `term`) is in the snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnapshotMarker {
    /// Last index covered by the snapshot.
    pub index: u64,
    /// Term of the entry at `index`.
    pub term: u64,
}

/// What recovery did when the WAL was opened, for the caller to log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// A torn tail cut off the newest segment: the file and the offset of the
    /// first byte dropped (records after it were never acknowledged).
    pub torn_tail: Option<(PathBuf, u64)>,
    /// Segments holding the log after recovery.
    pub segments: usize,
    /// Entries in the log after recovery.
    pub entries: u64,
    /// Segments created but never synced (zero header) that were deleted.
    pub unsynced_segments_removed: Vec<PathBuf>,
    /// Segments compaction had made obsolete, not yet removed: handed out
    /// by `Wal::take_obsolete_segments` for [`crate::remove_segments`].
    pub obsolete_segments: Vec<PathBuf>,
}
