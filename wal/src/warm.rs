//! The warmer: one thread per WAL that asks the kernel to bring back into
//! the page cache the pages just ahead of the appends (see
//! `Segment::warm_ahead` for why they go missing), so that the appending
//! thread never makes that call itself. `posix_fadvise(WILLNEED)` does not
//! wait for the reads it starts, but it allocates the pages and submits the
//! reads first: on shard threads under BIG it took 66 µs at the median,
//! 0.87 ms at p99 and 3.2 ms at worst (`perf trace -e fadvise64` on the
//! three nodes, 1,588 calls in 20 s).
//!
//! The queue is short, and a request that finds it full is dropped and
//! made again at the next append: a warmer that far behind is not worth
//! waiting for.

use std::os::fd::AsRawFd as _;
use std::sync::mpsc::{self, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::segment::SegmentFile;

/// Requests the warmer holds at once (each covers about `WARM_STEP_BYTES`
/// of log, so a full queue is a few MiB behind the appends).
const WARM_QUEUE: usize = 4;

/// One range of one segment file to bring into the page cache.
struct Request {
    /// Held, so the descriptor stays open until the call is made.
    file: Arc<SegmentFile>,
    from: usize,
    len: usize,
}

pub(crate) struct Warmer {
    /// `None` if the thread could not be started: the caller then makes the
    /// call itself, as a hint is better late than never.
    requests: Option<SyncSender<Request>>,
    thread: Option<JoinHandle<()>>,
}

impl Warmer {
    pub(crate) fn start(shard_id: u32) -> Warmer {
        let (requests, received) = mpsc::sync_channel::<Request>(WARM_QUEUE);
        let spawned = std::thread::Builder::new()
            .name(format!("wal-warm-{shard_id}"))
            .spawn(move || {
                for request in received {
                    will_need(&request.file, request.from, request.len);
                }
            });
        match spawned {
            Ok(thread) => Warmer {
                requests: Some(requests),
                thread: Some(thread),
            },
            Err(error) => {
                tracing::warn!(%error, "cannot start the WAL warmer; appends make its calls themselves");
                Warmer {
                    requests: None,
                    thread: None,
                }
            }
        }
    }

    /// Hands `len` bytes at `from` of `file` to the warmer. False if its
    /// queue is full: nothing was asked, ask again later.
    pub(crate) fn warm(&self, file: &Arc<SegmentFile>, from: usize, len: usize) -> bool {
        let Some(requests) = &self.requests else {
            will_need(file, from, len);
            return true;
        };
        requests
            .try_send(Request {
                file: file.clone(),
                from,
                len,
            })
            .is_ok()
    }
}

impl Drop for Warmer {
    /// Closes the queue and waits for the thread, which has at most
    /// `WARM_QUEUE` hints left to give.
    fn drop(&mut self) {
        self.requests = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn will_need(file: &SegmentFile, from: usize, len: usize) {
    // SAFETY: plain syscall on a descriptor `file` keeps open. Only a hint:
    // an error changes nothing.
    unsafe {
        libc::posix_fadvise(
            file.file.as_raw_fd(),
            from as libc::off_t,
            len as libc::off_t,
            libc::POSIX_FADV_WILLNEED,
        )
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A warmer whose queue is full refuses at once rather than blocking
    /// the appending thread.
    #[test]
    fn a_full_queue_refuses_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = Arc::new(SegmentFile {
            file: std::fs::File::create(&path).unwrap(),
            path,
        });
        // A warmer with a queue and no thread draining it.
        let (requests, received) = mpsc::sync_channel::<Request>(WARM_QUEUE);
        let warmer = Warmer {
            requests: Some(requests),
            thread: None,
        };
        for _ in 0..WARM_QUEUE {
            assert!(warmer.warm(&file, 0, 4096));
        }
        assert!(!warmer.warm(&file, 0, 4096));
        assert_eq!(received.try_iter().count(), WARM_QUEUE);
        assert!(warmer.warm(&file, 0, 4096));
    }
}
