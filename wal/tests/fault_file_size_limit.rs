//! Fault injection without privileges: RLIMIT_FSIZE makes preallocating a
//! segment fail with EFBIG, through the same path as ENOSPC, and lifting it
//! is space coming back. Its own test
//! binary because the limit and the ignored SIGXFSZ are process-wide.

use corekv_wal::{EntryRef, HardState, Wal, WalError, WalOptions};

#[test]
fn preallocation_failure_names_the_file_and_appends_resume_once_files_may_grow() {
    let dir = tempfile::tempdir().unwrap();
    let options = WalOptions {
        segment_bytes: 64 * 1024,
        shard_id: 0,
        recycle_bytes: corekv_wal::DEFAULT_RECYCLE_BYTES,
    };
    let mut wal = Wal::open(dir.path(), options.clone()).unwrap();
    let data = [7u8; 100];
    let first = EntryRef {
        index: 1,
        term: 1,
        entry_type: 0,
        data: &data,
    };
    wal.append_entries(&[first]).unwrap();
    wal.sync().unwrap();

    // From here on no file may grow past 32 KiB, so the next 64 KiB segment
    // cannot be preallocated. SIGXFSZ is ignored so the call returns EFBIG
    // instead of killing the process.
    // SAFETY: plain syscalls with valid arguments; this binary holds no other test.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let limit = libc::rlimit {
            rlim_cur: 32 * 1024,
            rlim_max: libc::RLIM_INFINITY,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
    }
    // Enough for several segments: the preparer started at open may have
    // created segment 2 before the limit, so the failure can come one later.
    let batch: Vec<EntryRef<'_>> = (2..3000)
        .map(|index| EntryRef {
            index,
            term: 1,
            entry_type: 0,
            data: &data,
        })
        .collect();
    let error = wal.append_entries_waiting(&batch).unwrap_err();
    match &error {
        WalError::CannotGrow {
            path,
            op,
            error: os,
            ..
        } => {
            assert_eq!(*op, "preallocate");
            assert_eq!(os.raw_os_error(), Some(libc::EFBIG), "{os}");
            let name = path.file_name().unwrap().to_str().unwrap().to_string();
            assert!(
                name == "0000000000000002.wal" || name == "0000000000000003.wal",
                "{}",
                path.display()
            );
            assert_eq!(path.parent(), Some(dir.path()));
            assert!(error.to_string().contains(&name), "{error}");
        }
        other => panic!("expected CannotGrow from preallocation, got {other}"),
    }
    assert!(error.is_retryable() && error.is_disk_full(), "{error}");

    // What fit is in the log and can be made durable: the WAL is not failed.
    let appended = wal.last_index();
    assert!(appended > 1 && appended < 2999, "{appended}");
    wal.sync().unwrap();
    let hard_state = HardState {
        term: 1,
        vote: 1,
        commit: appended,
    };
    // A small record still fits the active segment's last bytes or fails
    // the same retryable way.
    match wal.set_hard_state(hard_state) {
        Ok(()) => {}
        Err(error) => assert!(error.is_retryable(), "{error}"),
    }

    // SAFETY: as above.
    unsafe {
        let unlimited = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &unlimited), 0);
    }
    // Space is back: the rest goes in once the preparer's retry (asked for
    // when the failure was reported, maybe still under the limit) is redone.
    let mut rest = &batch[(appended - 1) as usize..];
    let mut attempts = 0;
    loop {
        match wal.append_entries_waiting(rest) {
            Ok(()) => break,
            Err(error) if error.is_retryable() && attempts < 3 => {
                rest = &rest[error.appended()..];
                attempts += 1;
            }
            Err(error) => panic!("append after space returned: {error}"),
        }
    }
    assert_eq!(wal.last_index(), 2999);
    wal.sync().unwrap();
    drop(wal);

    let wal = Wal::open(dir.path(), options).unwrap();
    assert_eq!(wal.last_index(), 2999, "every entry survives the reopen");
    let mut seen = 0;
    wal.entries(1, 3000, None, |e| {
        assert_eq!(e.data, &data[..], "entry {}", e.index);
        seen += 1;
    })
    .unwrap();
    assert_eq!(seen, 2999);
}
