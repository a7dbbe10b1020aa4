//! Fault injection: the disk fills up. A tiny tmpfs is mounted in a temporary
//! directory, so preallocating a segment fails with a real ENOSPC from the
//! kernel. Needs CAP_SYS_ADMIN (CI runs as root); without it the test says so
//! and returns, and `fault_file_size_limit` covers the same path with EFBIG.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use corekv_wal::{EntryRef, Wal, WalError, WalOptions};

const SEGMENT_BYTES: u64 = 16 * 1024;

/// A tmpfs mounted for the life of the value.
struct TinyTmpfs {
    target: PathBuf,
    _parent: tempfile::TempDir,
}

impl TinyTmpfs {
    fn mount(size: &str) -> std::io::Result<TinyTmpfs> {
        let parent = tempfile::tempdir()?;
        let target = parent.path().join("tmpfs");
        std::fs::create_dir(&target)?;
        let c_target = CString::new(target.as_os_str().as_bytes()).unwrap();
        let c_options = CString::new(format!("size={size}")).unwrap();
        // SAFETY: valid NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                c_target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                c_options.as_ptr().cast(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(TinyTmpfs {
            target,
            _parent: parent,
        })
    }

    fn path(&self) -> &Path {
        &self.target
    }
}

impl Drop for TinyTmpfs {
    fn drop(&mut self) {
        let c_target = CString::new(self.target.as_os_str().as_bytes()).unwrap();
        // SAFETY: valid NUL-terminated string; MNT_DETACH never blocks.
        unsafe { libc::umount2(c_target.as_ptr(), libc::MNT_DETACH) };
    }
}

fn entry(index: u64, data: &[u8]) -> EntryRef<'_> {
    EntryRef {
        index,
        term: 1,
        entry_type: 0,
        data,
    }
}

#[test]
fn enospc_from_preallocation_names_the_file_and_appends_resume_when_space_returns() {
    let tmpfs = match TinyTmpfs::mount("96k") {
        Ok(tmpfs) => tmpfs,
        Err(error) => {
            eprintln!("SKIPPED: cannot mount a tmpfs ({error}); needs CAP_SYS_ADMIN");
            return;
        }
    };
    let ballast = tmpfs.path().join("ballast");
    std::fs::write(&ballast, vec![1u8; 32 * 1024]).unwrap();
    let dir = tmpfs.path().join("wal");
    let options = WalOptions {
        segment_bytes: SEGMENT_BYTES,
        shard_id: 0,
        recycle_bytes: corekv_wal::DEFAULT_RECYCLE_BYTES,
    };
    let data = [0x5au8; 1000];
    let mut wal = Wal::open(&dir, options.clone()).unwrap();
    let mut synced_last_index = 0;
    let error = loop {
        let index = wal.last_index() + 1;
        match wal.append_entries_waiting(&[entry(index, &data)]) {
            Ok(()) => {
                wal.sync().unwrap();
                synced_last_index = index;
            }
            Err(error) => break error,
        }
        assert!(index < 1000, "a 96 KiB file system must fill up");
    };
    match &error {
        WalError::CannotGrow {
            path,
            op,
            error: os,
            ..
        } => {
            assert_eq!(*op, "preallocate");
            assert_eq!(os.raw_os_error(), Some(libc::ENOSPC), "{os}");
            assert!(path.starts_with(&dir), "{}", path.display());
            assert_eq!(path.extension().unwrap(), "wal");
        }
        other => panic!("expected CannotGrow from preallocation, got {other}"),
    }
    let message = error.to_string();
    assert!(
        message.contains("WAL cannot grow: preallocate of") && message.contains(".wal"),
        "{message}"
    );
    assert!(message.contains("No space left on device"), "{message}");
    assert!(error.is_disk_full() && error.is_retryable());
    assert!(
        synced_last_index > 10,
        "several segments fit before the disk filled: {synced_last_index}"
    );
    // Not failed: what is appended can still be synced, and the same append
    // fails the same retryable way while the disk is full.
    wal.sync().unwrap();
    let next = wal.last_index() + 1;
    let again = wal
        .append_entries_waiting(&[entry(next, &data)])
        .unwrap_err();
    assert!(again.is_disk_full(), "{again}");

    std::fs::remove_file(&ballast).unwrap();
    let mut attempts = 0;
    while let Err(error) = wal.append_entries_waiting(&[entry(next, &data)]) {
        assert!(error.is_retryable() && attempts < 3, "{error}");
        attempts += 1;
    }
    wal.sync().unwrap();
    drop(wal);

    // Reopening returns every entry, intact.
    let wal = Wal::open(&dir, options).unwrap();
    assert_eq!(wal.last_index(), next);
    let mut seen = 0;
    wal.entries(1, next + 1, None, |e| {
        assert_eq!(e.data, &data[..], "entry {}", e.index);
        seen += 1;
    })
    .unwrap();
    assert_eq!(seen, next);
}

#[test]
fn enospc_when_creating_the_first_segment_is_an_error_naming_it() {
    let tmpfs = match TinyTmpfs::mount("64k") {
        Ok(tmpfs) => tmpfs,
        Err(error) => {
            eprintln!("SKIPPED: cannot mount a tmpfs ({error}); needs CAP_SYS_ADMIN");
            return;
        }
    };
    // Fill the file system, leaving too little for a segment.
    std::fs::write(tmpfs.path().join("ballast"), vec![1u8; 48 * 1024]).unwrap();
    let dir = tmpfs.path().join("wal");
    let options = WalOptions {
        segment_bytes: SEGMENT_BYTES,
        shard_id: 0,
        recycle_bytes: corekv_wal::DEFAULT_RECYCLE_BYTES,
    };
    match Wal::open(&dir, options) {
        Err(WalError::Io { path, op, error }) => {
            assert_eq!(
                (op, error.raw_os_error()),
                ("preallocate", Some(libc::ENOSPC))
            );
            assert_eq!(path, dir.join("0000000000000001.wal"));
        }
        other => panic!("expected ENOSPC from preallocation, got {other:?}"),
    }
}
