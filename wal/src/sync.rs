//! Group commit: a `SyncJob` carries what must be made durable, owns shared
//! handles to the files, and runs away from the WAL (on io_uring through
//! monoio, or blocking on a helper thread) while the shard keeps appending.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::WalError;
use crate::format::{self, HEADER_LEN};
use crate::segment::SegmentFile;

/// A position in the log: a segment and a byte offset in it. Ordered like the
/// log (segments by sequence, then offsets).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Position {
    pub(crate) sequence: u64,
    pub(crate) offset: usize,
}

/// One step of a sync job, run in order.
pub(crate) enum SyncStep {
    /// fsync the WAL directory: segment files created since the last sync
    /// must have durable names before any of their headers becomes valid.
    Directory(Arc<SegmentFile>),
    /// pwrite a segment's header. Runs only after every older segment is
    /// durable (the previous steps), see the format doc.
    WriteHeader(Arc<SegmentFile>, [u8; HEADER_LEN]),
    /// fdatasync a segment: writes back the pages dirtied through the mapping.
    DataSync(Arc<SegmentFile>),
}

/// Makes everything appended before `Wal::begin_sync` durable. Send and
/// 'static: hand it to the runtime or a thread, then give the outcome back to
/// `Wal::finish_sync`.
///
/// A shard thread must use [`SyncJob::run`] (io_uring); [`SyncJob::run_blocking`]
/// blocks the calling thread for the duration of the fdatasync and is for
/// tests, tools and helper threads.
#[must_use = "a sync job does nothing until run and handed back to Wal::finish_sync"]
pub struct SyncJob {
    pub(crate) steps: Vec<SyncStep>,
    pub(crate) target: Position,
    pub(crate) created_segments: u64,
}

/// The result of a `SyncJob`, to hand to `Wal::finish_sync`. Opaque: it
/// carries the position the job made durable and the I/O result.
#[must_use = "hand the outcome to Wal::finish_sync, or the WAL stays with a sync in flight"]
pub struct SyncOutcome {
    pub(crate) target: Position,
    pub(crate) created_segments: u64,
    pub(crate) result: Result<(), WalError>,
}

impl SyncOutcome {
    /// Whether the job succeeded (the error itself is returned by
    /// `Wal::finish_sync`).
    pub fn is_ok(&self) -> bool {
        self.result.is_ok()
    }
}

impl SyncJob {
    /// Runs the job on the calling thread with blocking system calls.
    pub fn run_blocking(self) -> SyncOutcome {
        let result = self.steps.iter().try_for_each(|step| match step {
            SyncStep::Directory(dir) => dir.sync_all(),
            SyncStep::WriteHeader(segment, header) => segment.write_header(header),
            SyncStep::DataSync(segment) => segment.sync_data(),
        });
        self.outcome(result)
    }

    /// Runs the job through monoio: fdatasync (and the header writes and the
    /// directory fsync after a rotation) go through io_uring, so the shard's
    /// event loop keeps running while the disk works. Falls back to whatever
    /// monoio's driver does without io_uring (a blocking call).
    #[cfg(feature = "monoio")]
    pub async fn run(self) -> SyncOutcome {
        let mut result = Ok(());
        for step in &self.steps {
            result = run_step_async(step).await;
            if result.is_err() {
                break;
            }
        }
        self.outcome(result)
    }

    fn outcome(self, result: Result<(), WalError>) -> SyncOutcome {
        SyncOutcome {
            target: self.target,
            created_segments: self.created_segments,
            result,
        }
    }
}

#[cfg(feature = "monoio")]
async fn run_step_async(step: &SyncStep) -> Result<(), WalError> {
    let (segment, op) = match step {
        SyncStep::Directory(dir) => (dir, "fsync"),
        SyncStep::WriteHeader(segment, _) => (segment, "write segment header"),
        SyncStep::DataSync(segment) => (segment, "fdatasync"),
    };
    let error = |e| WalError::io(&segment.path, op, e);
    let file = uring_handle(segment)?;
    let result = match step {
        SyncStep::Directory(_) => file.sync_all().await,
        SyncStep::WriteHeader(_, header) => file.write_all_at(header.to_vec(), 0).await.0,
        SyncStep::DataSync(_) => file.sync_data().await,
    };
    result.map_err(error)
}

/// How many monoio handles a thread keeps: the active segment, the one
/// before it (a rotation syncs both) and the directory.
#[cfg(feature = "monoio")]
const CACHED_HANDLES: usize = 3;

#[cfg(feature = "monoio")]
thread_local! {
    /// monoio handles of the files this thread syncs, newest first. monoio's
    /// File owns (and closes) its descriptor, so it gets a dup of the WAL's;
    /// keeping it saves a dup and a close on every sync. A handle holds its
    /// file open, so only the few most recently used are kept.
    static HANDLES: std::cell::RefCell<Vec<(Arc<SegmentFile>, std::rc::Rc<monoio::fs::File>)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

#[cfg(feature = "monoio")]
fn uring_handle(segment: &Arc<SegmentFile>) -> Result<std::rc::Rc<monoio::fs::File>, WalError> {
    HANDLES.with(|handles| {
        let mut handles = handles.borrow_mut();
        if let Some(at) = handles.iter().position(|(s, _)| Arc::ptr_eq(s, segment)) {
            let entry = handles.remove(at);
            let file = entry.1.clone();
            handles.insert(0, entry);
            return Ok(file);
        }
        let std_file = segment
            .file
            .try_clone()
            .map_err(|e| WalError::io(&segment.path, "dup", e))?;
        let file = std::rc::Rc::new(
            monoio::fs::File::from_std(std_file)
                .map_err(|e| WalError::io(&segment.path, "register with io_uring", e))?,
        );
        handles.insert(0, (segment.clone(), file.clone()));
        handles.truncate(CACHED_HANDLES);
        Ok(file)
    })
}

/// Retires segment files that `Wal::take_obsolete_segments` handed out,
/// oldest first (so a crash midway leaves a contiguous suffix), then fsyncs
/// their directories. Each is renamed to a free file for a later segment to
/// reuse while the free files of its directory hold at most
/// `keep_free_bytes`, and deleted past that (see the format doc's
/// "Recycling"), a step at a time ([`remove_in_steps`]). Blocking and
/// sleeping: run it off the shard thread. Files already gone are not an
/// error.
pub fn remove_segments(mut paths: Vec<PathBuf>, keep_free_bytes: u64) -> Result<(), WalError> {
    paths.sort();
    // Per directory: bytes its free files hold.
    let mut dirs: Vec<(PathBuf, u64)> = Vec::new();
    for path in &paths {
        let Some(dir) = path.parent() else { continue };
        let at = match dirs.iter().position(|(d, _)| d == dir) {
            Some(at) => at,
            None => {
                // Left by a crash in the middle of a removal.
                for (_, stray) in
                    crate::segment::files_named(dir, format::parse_deleting_file_name)?
                {
                    remove_segment_file(&stray)?;
                }
                let mut held = 0;
                for (_, free) in crate::segment::free_files(dir)? {
                    held += std::fs::metadata(&free).map_or(0, |m| m.len());
                }
                dirs.push((dir.to_path_buf(), held));
                dirs.len() - 1
            }
        };
        let length = match std::fs::metadata(path) {
            Ok(metadata) => metadata.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(WalError::io(path, "stat segment", e)),
        };
        let sequence = path
            .file_name()
            .and_then(|name| name.to_str())
            .and_then(format::parse_segment_file_name);
        let held = &mut dirs[at].1;
        if let (Some(sequence), true) = (sequence, *held + length <= keep_free_bytes) {
            let free = dir.join(format::free_file_name(sequence));
            match std::fs::rename(path, &free) {
                Ok(()) => {
                    *held += length;
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(WalError::io(path, "retire segment", e)),
            }
        }
        // Out of the segments' names first, so that recovery never sees it
        // cut short and the preparer never takes it for a free file.
        let doomed = match sequence {
            Some(sequence) => dir.join(format::deleting_file_name(sequence)),
            None => path.clone(),
        };
        if doomed != *path {
            match std::fs::rename(path, &doomed) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(WalError::io(path, "retire segment", e)),
            }
        }
        remove_segment_file(&doomed)?;
    }
    for (dir, _) in dirs {
        SegmentFile::open_dir(&dir)?.sync_all()?;
    }
    Ok(())
}

/// [`remove_in_steps`] for a segment's file; one already gone is fine.
fn remove_segment_file(path: &Path) -> Result<(), WalError> {
    match remove_in_steps(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(WalError::io(path, "remove segment", e)),
    }
}

/// Bytes [`remove_in_steps`] cuts off a file at a time.
const DELETE_STEP_BYTES: u64 = 32 << 20;
/// Pause between two steps of [`remove_in_steps`].
const DELETE_STEP_PAUSE: std::time::Duration = std::time::Duration::from_millis(20);

/// Deletes `path` by cutting [`DELETE_STEP_BYTES`] off its end at a time,
/// [`DELETE_STEP_PAUSE`] apart, then unlinking what is left. Unlinking a
/// large file frees all its blocks at once (on a file system mounted with
/// `discard`, one large discard), and every fdatasync of the disk queues
/// behind it. Measured on the development machine beside a 4 KiB write +
/// fdatasync every 2 ms: `rm` of a 1 GB file made three of them take
/// 116-129 ms (p50 0.23 ms), `rm` of four 64 MiB segments up to 13-16 ms;
/// the 1 GB file cut 32 MiB per 20 ms, at most 7 ms. Blocking and sleeping
/// (0.6 s per GB): never on a shard thread.
///
/// A file with another name (a hard link someone made) is only unlinked:
/// cutting it would cut the other name's bytes too. A reader of the file
/// (a snapshot transfer of an old snapshot) sees it shrink and fails.
pub fn remove_in_steps(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let file = std::fs::OpenOptions::new().write(true).open(path)?;
    let metadata = file.metadata()?;
    let mut len = if metadata.nlink() > 1 {
        0
    } else {
        metadata.len()
    };
    while len > DELETE_STEP_BYTES {
        len -= DELETE_STEP_BYTES;
        file.set_len(len)?;
        std::thread::sleep(DELETE_STEP_PAUSE);
    }
    drop(file);
    std::fs::remove_file(path)
}

impl fmt::Debug for SyncJob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SyncJob")
            .field("steps", &self.steps.len())
            .field("target", &self.target)
            .finish()
    }
}

impl fmt::Debug for SyncOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SyncOutcome")
            .field("target", &self.target)
            .field("result", &self.result)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_static<T: Send + 'static>() {}

    #[test]
    fn job_and_outcome_are_send_and_static() {
        assert_send_static::<SyncJob>();
        assert_send_static::<SyncOutcome>();
    }

    #[test]
    fn remove_segments_removes_in_order_and_tolerates_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("0000000000000001.wal");
        let b = dir.path().join("0000000000000002.wal");
        std::fs::write(&a, b"a").unwrap();
        std::fs::write(&b, b"b").unwrap();
        remove_segments(
            vec![
                b.clone(),
                a.clone(),
                dir.path().join("0000000000000009.wal"),
            ],
            0,
        )
        .unwrap();
        assert!(!a.exists() && !b.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    /// A removal cut short by a crash leaves a `.deleting` file, which the
    /// next compaction of the directory deletes.
    #[test]
    fn remove_segments_deletes_what_a_crash_left_half_removed() {
        let dir = tempfile::tempdir().unwrap();
        let stray = dir.path().join(format::deleting_file_name(3));
        std::fs::write(&stray, [3u8; 100]).unwrap();
        let segment = dir.path().join(format::segment_file_name(7));
        std::fs::write(&segment, [7u8; 100]).unwrap();
        remove_segments(vec![segment.clone()], 0).unwrap();
        assert!(!stray.exists() && !segment.exists());
    }

    #[test]
    fn remove_segments_keeps_the_oldest_as_free_files_up_to_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = |sequence: u64| dir.path().join(format::segment_file_name(sequence));
        std::fs::write(dir.path().join(format::free_file_name(1)), [0u8; 100]).unwrap();
        for sequence in 2..=5 {
            std::fs::write(path(sequence), [sequence as u8; 100]).unwrap();
        }
        remove_segments((2..=5).map(path).collect(), 300).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                format::free_file_name(1),
                format::free_file_name(2),
                format::free_file_name(3)
            ],
            "the bound counts free files already there"
        );
        assert_eq!(
            std::fs::read(dir.path().join(format::free_file_name(3))).unwrap(),
            [3u8; 100],
            "renamed, not rewritten"
        );
    }

    #[test]
    fn remove_segments_names_the_file_it_cannot_remove() {
        let dir = tempfile::tempdir().unwrap();
        let not_a_file = dir.path().join("0000000000000001.wal");
        std::fs::create_dir(&not_a_file).unwrap();
        std::fs::write(not_a_file.join("x"), b"x").unwrap();
        let error = remove_segments(vec![not_a_file.clone()], 0).unwrap_err();
        // It fails under the name it was given for its removal.
        assert!(
            error.to_string().contains("0000000000000001.deleting"),
            "{error}"
        );
    }

    /// A file larger than a step goes in steps, and nothing of it stays.
    #[test]
    fn a_large_file_is_removed_in_steps() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.tmp");
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(2 * DELETE_STEP_BYTES + 5).unwrap();
        drop(file);
        remove_in_steps(&path).unwrap();
        assert!(!path.exists());
        assert!(
            remove_in_steps(&path).is_err(),
            "a missing file is an error"
        );
    }

    /// Another name of the file keeps all of its bytes.
    #[test]
    fn a_file_with_another_name_is_unlinked_not_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.tmp");
        let other = dir.path().join("kept");
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(DELETE_STEP_BYTES + 5).unwrap();
        drop(file);
        std::fs::hard_link(&path, &other).unwrap();
        remove_in_steps(&path).unwrap();
        assert!(!path.exists());
        assert_eq!(
            std::fs::metadata(&other).unwrap().len(),
            DELETE_STEP_BYTES + 5
        );
    }
}
