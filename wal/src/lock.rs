//! The directory lock: one `Wal` per directory, across processes and within
//! one. `flock(2)` locks belong to the open file description, so a second
//! open in the same process conflicts just like one in another process, and
//! the kernel drops the lock when the holder dies (no stale lock files).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::WalError;

/// Name of the lock file inside a WAL directory.
pub(crate) const LOCK_FILE_NAME: &str = "LOCK";

/// Holds the lock until dropped (closing the file releases the flock).
#[derive(Debug)]
pub(crate) struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the exclusive lock of `dir` and writes our pid into the lock
    /// file, or fails with `Locked` naming the holder's pid.
    pub(crate) fn acquire(dir: &Path) -> Result<DirLock, WalError> {
        let path = dir.join(LOCK_FILE_NAME);
        // No truncate on open: until we hold the lock, the content is the
        // holder's pid, which the error should report.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| WalError::io(&path, "open lock file", e))?;
        // SAFETY: flock on a valid, owned descriptor has no memory effects.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(WalError::Locked {
                    dir: dir.to_path_buf(),
                    holder_pid: read_pid(&mut file),
                });
            }
            return Err(WalError::io(&path, "flock", error));
        }
        write_pid(&mut file, &path)?;
        Ok(DirLock { _file: file })
    }
}

fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

fn write_pid(file: &mut File, path: &PathBuf) -> Result<(), WalError> {
    let pid = std::process::id();
    file.set_len(0)
        .and_then(|()| file.seek(SeekFrom::Start(0)))
        .and_then(|_| writeln!(file, "{pid}"))
        .map_err(|e| WalError::io(path, "write lock file", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_with_holder_pid_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path()).unwrap();
        match DirLock::acquire(dir.path()) {
            Err(WalError::Locked {
                dir: locked,
                holder_pid,
            }) => {
                assert_eq!(locked, dir.path());
                assert_eq!(holder_pid, Some(std::process::id()));
            }
            other => panic!("expected Locked, got {other:?}"),
        }
        drop(first);
        DirLock::acquire(dir.path()).expect("lock is free once the holder is dropped");
    }
}
