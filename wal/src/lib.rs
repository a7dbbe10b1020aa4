//! corekv-wal: the write-ahead log of one shard.
//!
//! Owns the on-disk log: preallocated, memory-mapped segment files, record
//! encoding, group commit (sync) and crash recovery. It stores records, not
//! Raft types, and never depends on raft, the network or a runtime (the async
//! sync helper sits behind the `monoio` feature).
//!
//! # Model
//!
//! - **Append** ([`Wal::append_entries`], [`Wal::set_hard_state`],
//!   [`Wal::set_conf_state`], [`Wal::apply_snapshot_marker`]) copies a record
//!   into the mapped active segment. No system call, except when the segment
//!   is full (rotation): the next segment, created, preallocated and mapped
//!   ahead by the WAL's preparer thread, becomes active, and the preparer
//!   starts on the one after. Rotation never waits: if that segment is not
//!   ready ([`WalError::SegmentNotReady`]) or could not be made (a full disk:
//!   [`WalError::CannotGrow`]), the call returns with every whole record
//!   before it appended, the WAL stays usable, and the caller retries the
//!   rest later. Appended records are readable at once but not yet durable.
//!   Every MiB appended, the WAL's warmer thread is asked to bring the next
//!   MiBs of the active segment back into the page cache (a kernel that
//!   reclaims idle pages drops them), so appends do not wait on disk reads;
//!   the appending thread only queues the request.
//! - **Sync** is split for group commit: [`Wal::begin_sync`] hands out a
//!   [`SyncJob`] covering everything appended so far; the shard runs it with
//!   [`SyncJob::run`] (fdatasync through io_uring) while it keeps appending,
//!   then gives the [`SyncOutcome`] to [`Wal::finish_sync`]. At most one job
//!   is in flight. [`Wal::sync`] is the blocking form for tests and tools; a
//!   shard thread must not use it.
//! - **Read** ([`Wal::entries`], [`Wal::term`], ...) is served from an
//!   in-memory index over the mapped bytes: no second copy of the log.
//! - **Compaction**: once a state-machine snapshot is durable, the caller
//!   records it with [`Wal::apply_snapshot_marker`]. When that record is
//!   synced, the segments holding only entries it covers are handed out by
//!   [`Wal::take_obsolete_segments`] and deleted with [`remove_segments`]
//!   off the shard thread.
//! - **Recovery** ([`Wal::open`]): a torn tail in the newest segment is cut
//!   (reported in [`Wal::recovery`]); a bad record anywhere else fails the
//!   open with [`WalError::Corrupt`] naming the file and offset. A record
//!   that fails its checksum is never returned, and a record appended before
//!   a sync that returned Ok is never lost.
//! - **Failure**: an I/O error of a sync is returned and puts the WAL in the
//!   failed state: appends and syncs return
//!   [`WalError::Poisoned`] until it is reopened (after a failed fdatasync
//!   the kernel may have dropped the dirty pages, so memory no longer says
//!   what is on disk).
//! - **Inspection** ([`inspect`]): the records of a segment file's bytes,
//!   decoded and checked as recovery does, for tools; it never writes,
//!   locks or repairs.
//! - **Limits**: a batch larger than a segment is split across records and
//!   segments; a single entry that does not fit an empty segment is
//!   [`WalError::EntryTooLarge`]. One `Wal` per directory (lock file).
//! - **O_DIRECT buffers** ([`AlignedBuf`]): what new segments are zeroed
//!   with, exported for the node's snapshot writer so there is one.
//!
//! The byte layout is documented in one place, the `format` module.

mod direct;
mod error;
mod format;
mod index;
pub mod inspect;
mod lock;
mod prepare;
mod recovery;
mod segment;
mod sync;
mod types;
mod wal;
mod warm;

pub use direct::{AlignedBuf, DIRECT_ALIGN};
pub use error::WalError;
pub use sync::{remove_in_steps, remove_segments, SyncJob, SyncOutcome};
pub use types::{
    ConfState, EntryRef, HardState, RecoveryReport, SnapshotMarker, WalOptions,
    DEFAULT_RECYCLE_BYTES, DEFAULT_SEGMENT_BYTES, MAX_SEGMENT_BYTES, MIN_SEGMENT_BYTES,
};
pub use wal::Wal;
