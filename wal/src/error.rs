//! The one error type of the WAL. Every variant names what an operator needs
//! to act on: the file, the offset, the directory or the limit.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong when opening, appending to, syncing or
/// reading a [`crate::Wal`].
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// A segment holds a record that fails its checksum, has an impossible
    /// length or contradicts the log before it, somewhere other than the torn
    /// tail of the newest segment. The WAL refuses to open: starting would
    /// lose or invent acknowledged data. Restore the directory from a replica.
    #[error("WAL segment {} is corrupt at offset {offset}: {reason}", .segment.display())]
    Corrupt {
        /// The segment file.
        segment: PathBuf,
        /// Byte offset of the bad record (or header) inside the file.
        offset: u64,
        /// What was expected and what was found.
        reason: String,
    },
    /// A system call on a WAL file or directory failed (ENOSPC, EIO, ...).
    /// On a write path this also puts the WAL in the failed state.
    #[error("WAL I/O error during {op} of {}: {error}", .path.display())]
    Io {
        /// The file or directory the call was made on.
        path: PathBuf,
        /// The operation, e.g. "fdatasync" or "preallocate".
        op: &'static str,
        /// The error the kernel returned. Not named `source`: the message
        /// already carries it, and as the source as well anyhow's `{:#}`
        /// printed it twice.
        error: io::Error,
    },
    /// Another `Wal` (in this process or another) holds the directory's lock
    /// file. Two writers would interleave records and corrupt the log.
    #[error("WAL directory {} is locked by {}", .dir.display(), holder(.holder_pid))]
    Locked {
        /// The WAL directory.
        dir: PathBuf,
        /// The process id written in the lock file by the holder, if readable.
        holder_pid: Option<u32>,
    },
    /// The log cannot grow: creating, preallocating or mapping its next
    /// segment failed (ENOSPC, EDQUOT, EFBIG from a file size limit, ...).
    /// Nothing was written past the last whole record: the call's first
    /// `appended` entries are in the log, the rest are not. The
    /// WAL stays usable; retry the rest later (the preparer is already
    /// trying again) and it succeeds once space is freed.
    #[error("WAL cannot grow: {op} of {}: {error}", .path.display())]
    CannotGrow {
        /// The segment file that could not be made.
        path: PathBuf,
        /// The operation, e.g. "preallocate".
        op: &'static str,
        /// The error the kernel returned (not `source`: see `Io`).
        error: io::Error,
        /// How many entries of the call were appended before it stopped.
        appended: usize,
    },
    /// The active segment is full and the next one is still being created by
    /// the preparer thread. As with `CannotGrow`, the first `appended`
    /// entries were appended and the WAL stays usable; retry the rest shortly.
    #[error("WAL segment {sequence} is still being prepared")]
    SegmentNotReady {
        /// The segment waited for.
        sequence: u64,
        /// How many entries of the call were appended before it stopped.
        appended: usize,
    },
    /// An earlier sync or write failed, so what is on disk is unknown (after a
    /// failed fdatasync the kernel may have dropped the dirty pages). The WAL
    /// refuses appends and syncs until it is reopened, which re-reads the disk.
    /// The original error was returned (and logged) when it happened.
    #[error("WAL is in the failed state after an earlier I/O error; reopen it to recover")]
    Poisoned,
    /// A single entry is larger than an empty segment can hold. Raise
    /// `segment_bytes` or split the payload. Batches are never refused for
    /// their total size: they are split across records and segments.
    #[error("WAL entry of {bytes} bytes exceeds the maximum of {max} bytes per entry (segment size minus headers)")]
    EntryTooLarge {
        /// Data bytes of the entry.
        bytes: u64,
        /// The largest entry data that fits in an empty segment.
        max: u64,
    },
    /// The conf state record does not leave room for entries in a segment.
    #[error("WAL conf state of {bytes} bytes exceeds the maximum of {max} bytes")]
    ConfStateTooLarge {
        /// Encoded bytes of the conf state record.
        bytes: u64,
        /// The largest conf state record accepted.
        max: u64,
    },
    /// An append would leave a hole or reach below the snapshot: entries must
    /// start within `[first_index, last_index + 1]` and be consecutive.
    #[error("WAL append at index {index} is not contiguous: the log holds [{first_index}, {last_index}] (an append must start within [{first_index}, {last_index}+1] and increase by one)")]
    NonContiguous {
        /// The offending index.
        index: u64,
        /// First index of the log at the time of the append.
        first_index: u64,
        /// Last index of the log at the time of the append.
        last_index: u64,
    },
    /// A snapshot marker older than the current one: raft never moves its
    /// snapshot backwards, so this is a caller bug reported as an error.
    #[error("WAL snapshot marker at index {index} is older than the current marker at index {current_index}")]
    SnapshotMarkerRegressed {
        /// Index of the rejected marker.
        index: u64,
        /// Index of the marker already recorded.
        current_index: u64,
    },
    /// A read asked for entries outside `[first_index, last_index + 1)`.
    #[error("WAL read of [{low}, {high}) is outside the log [{first_index}, {last_index}]")]
    OutOfRange {
        /// Requested low bound (inclusive).
        low: u64,
        /// Requested high bound (exclusive).
        high: u64,
        /// First index of the log.
        first_index: u64,
        /// Last index of the log.
        last_index: u64,
    },
    /// `begin_sync` while the previous [`crate::SyncJob`] has not been handed
    /// back to `finish_sync`: at most one sync is in flight per WAL.
    #[error("WAL sync already in flight: finish it before beginning another")]
    SyncInFlight,
    /// A segment of this directory was written for another shard.
    #[error("WAL segment {} belongs to shard {found}, but this WAL is shard {expected}", .segment.display())]
    WrongShard {
        /// The segment file.
        segment: PathBuf,
        /// Shard id in the segment header.
        found: u32,
        /// Shard id given in the options.
        expected: u32,
    },
    /// The options cannot describe a working WAL.
    #[error("invalid WAL options: {reason}")]
    InvalidOptions {
        /// Which option and why.
        reason: String,
    },
}

fn holder(pid: &Option<u32>) -> String {
    match pid {
        Some(pid) => format!("process {pid}"),
        None => "another process (pid unknown)".to_string(),
    }
}

impl WalError {
    /// Wraps an `io::Error` with the file and the operation that failed.
    pub(crate) fn io(path: impl Into<PathBuf>, op: &'static str, error: io::Error) -> WalError {
        WalError::Io {
            path: path.into(),
            op,
            error,
        }
    }

    /// A failure to make the next segment, as the retryable `CannotGrow`.
    pub(crate) fn into_cannot_grow(self) -> WalError {
        match self {
            WalError::Io { path, op, error } => WalError::CannotGrow {
                path,
                op,
                error,
                appended: 0,
            },
            other => other,
        }
    }

    /// True for the errors after which the WAL stays usable and the same
    /// write succeeds later: the log could not grow (yet).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            WalError::CannotGrow { .. } | WalError::SegmentNotReady { .. }
        )
    }

    /// For a retryable error of an append, how many of its entries were
    /// appended before it stopped (0 for every other error).
    pub fn appended(&self) -> usize {
        match self {
            WalError::CannotGrow { appended, .. } | WalError::SegmentNotReady { appended, .. } => {
                *appended
            }
            _ => 0,
        }
    }

    /// Sets the count reported by [`WalError::appended`].
    pub(crate) fn with_appended(mut self, count: usize) -> WalError {
        if let WalError::CannotGrow { appended, .. } | WalError::SegmentNotReady { appended, .. } =
            &mut self
        {
            *appended = count;
        }
        self
    }

    /// True if the log could not grow for lack of space: the disk or a quota
    /// is full, or a file would pass the process's size limit.
    pub fn is_disk_full(&self) -> bool {
        match self {
            WalError::CannotGrow { error, .. } | WalError::Io { error, .. } => matches!(
                error.raw_os_error(),
                Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG)
            ),
            _ => false,
        }
    }

    pub(crate) fn corrupt(
        segment: impl Into<PathBuf>,
        offset: u64,
        reason: impl Into<String>,
    ) -> WalError {
        WalError::Corrupt {
            segment: segment.into(),
            offset,
            reason: reason.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_file_and_offset() {
        let error = WalError::corrupt(
            "/d/0000000000000003.wal",
            81920,
            "checksum expected 1 but got 2",
        );
        assert_eq!(
            error.to_string(),
            "WAL segment /d/0000000000000003.wal is corrupt at offset 81920: checksum expected 1 but got 2"
        );
    }

    #[test]
    fn display_names_lock_holder() {
        let error = WalError::Locked {
            dir: PathBuf::from("/d"),
            holder_pid: Some(42),
        };
        assert_eq!(
            error.to_string(),
            "WAL directory /d is locked by process 42"
        );
        let error = WalError::Locked {
            dir: PathBuf::from("/d"),
            holder_pid: None,
        };
        assert!(error.to_string().contains("pid unknown"), "{error}");
    }

    #[test]
    fn display_io_names_operation_and_file() {
        let error = WalError::io(
            "/d/x.wal",
            "preallocate",
            io::Error::from_raw_os_error(libc::ENOSPC),
        );
        let text = error.to_string();
        assert!(text.contains("preallocate of /d/x.wal"), "{text}");
        assert!(text.contains("No space left"), "{text}");
    }
}
