//! Fault injection without privileges: RLIMIT_FSIZE makes preallocating a
//! segment fail with EFBIG, through the same path as ENOSPC. Its own test
//! binary because the limit and the ignored SIGXFSZ are process-wide.

use corekv_wal::{EntryRef, Wal, WalError, WalOptions};

#[test]
fn preallocation_failure_names_the_file_and_poisons_the_wal() {
    let dir = tempfile::tempdir().unwrap();
    let options = WalOptions {
        segment_bytes: 64 * 1024,
        shard_id: 0,
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
    let error = wal.append_entries(&batch).unwrap_err();
    // SAFETY: as above.
    unsafe {
        let unlimited = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &unlimited), 0);
    }
    match &error {
        WalError::Io { path, op, source } => {
            assert_eq!(*op, "preallocate");
            assert_eq!(source.raw_os_error(), Some(libc::EFBIG), "{source}");
            let name = path.file_name().unwrap().to_str().unwrap().to_string();
            assert!(
                name == "0000000000000002.wal" || name == "0000000000000003.wal",
                "{}",
                path.display()
            );
            assert_eq!(path.parent(), Some(dir.path()));
            assert!(error.to_string().contains(&name), "{error}");
        }
        other => panic!("expected an Io error from preallocation, got {other}"),
    }
    assert!(matches!(wal.begin_sync(), Err(WalError::Poisoned)));
    drop(wal);

    let wal = Wal::open(dir.path(), options).unwrap();
    assert!(wal.last_index() >= 1, "the synced entry survives");
    let mut first_data = Vec::new();
    wal.entries(1, 2, None, |e| first_data = e.data.to_vec())
        .unwrap();
    assert_eq!(first_data, data);
}
