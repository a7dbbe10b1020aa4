//! The segment preparer: one long-lived thread per WAL that creates,
//! preallocates and maps the segment after the active one, so rotation takes
//! a ready segment without a system call, a thread spawn or a join.
//!
//! Rotation never waits for it: a segment still in the making is
//! [`WalError::SegmentNotReady`], a failed one is [`WalError::CannotGrow`]
//! (and the preparer is asked to try again), and the caller retries the
//! append later. Both leave the WAL usable.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::thread::JoinHandle;

use crate::error::WalError;
use crate::segment::Segment;

/// What the WAL knows of the segment after the active one.
enum Next {
    /// Asked for; the preparer has not answered yet.
    Pending(u64),
    /// Created and mapped, waiting for rotation.
    Ready(Segment),
    /// The preparer could not create it; rotation reports this.
    Failed(WalError),
    /// Nothing asked for (the preparer thread could not be started, or its
    /// last answer was an error that rotation already reported).
    Idle,
}

pub(crate) struct Preparer {
    dir: PathBuf,
    segment_bytes: u64,
    /// `None` once dropped, so the thread sees the channel close and exits.
    requests: Option<SyncSender<u64>>,
    results: Receiver<Result<Segment, WalError>>,
    thread: Option<JoinHandle<()>>,
    next: Next,
}

impl Preparer {
    /// Starts the thread. If it cannot be spawned (out of threads), segments
    /// are created at rotation instead: blocking, but only in that case.
    pub(crate) fn start(dir: &Path, segment_bytes: u64, shard_id: u32) -> Preparer {
        // One request is outstanding at a time, so a queue of one never blocks.
        let (requests, request_rx) = mpsc::sync_channel::<u64>(1);
        let (result_tx, results) = mpsc::sync_channel(1);
        let thread_dir = dir.to_path_buf();
        let spawned = std::thread::Builder::new()
            .name(format!("wal-prepare-{shard_id}"))
            .spawn(move || {
                for sequence in request_rx {
                    let created = Segment::create(&thread_dir, sequence, segment_bytes);
                    if result_tx.send(created).is_err() {
                        return;
                    }
                }
            });
        let (requests, thread) = match spawned {
            Ok(handle) => (Some(requests), Some(handle)),
            Err(error) => {
                tracing::warn!(%error, "cannot start the WAL segment preparer; rotation will create segments");
                (None, None)
            }
        };
        Preparer {
            dir: dir.to_path_buf(),
            segment_bytes,
            requests,
            results,
            thread,
            next: Next::Idle,
        }
    }

    /// Asks for segment `sequence` unless it is already asked for or ready.
    pub(crate) fn request(&mut self, sequence: u64) {
        match &self.next {
            Next::Pending(_) | Next::Ready(_) | Next::Failed(_) => return,
            Next::Idle => {}
        }
        if let Some(requests) = &self.requests {
            if requests.try_send(sequence).is_ok() {
                self.next = Next::Pending(sequence);
            }
        }
    }

    /// Segment `sequence`, if it is ready. Never waits for the preparer.
    /// A failure is returned once and the preparer starts over at once, so
    /// it retries at the caller's pace, not in a loop of its own.
    pub(crate) fn take(&mut self, sequence: u64) -> Result<Segment, WalError> {
        self.poll();
        match std::mem::replace(&mut self.next, Next::Idle) {
            Next::Ready(segment) => {
                debug_assert_eq!(segment.sequence, sequence, "prepared the wrong segment");
                Ok(segment)
            }
            Next::Pending(pending) => {
                self.next = Next::Pending(pending);
                Err(WalError::SegmentNotReady {
                    sequence,
                    appended: 0,
                })
            }
            Next::Failed(error) => {
                self.request(sequence);
                Err(error)
            }
            Next::Idle if self.requests.is_none() => {
                Segment::create_on_appending_thread(&self.dir, sequence, self.segment_bytes)
                    .map_err(WalError::into_cannot_grow)
            }
            Next::Idle => {
                self.request(sequence);
                Err(WalError::SegmentNotReady {
                    sequence,
                    appended: 0,
                })
            }
        }
    }

    /// Blocks until segment `sequence` is ready or failed (asking for it if
    /// nobody did).
    pub(crate) fn wait(&mut self, sequence: u64) {
        self.request(sequence);
        if !matches!(self.next, Next::Pending(_)) {
            return;
        }
        let answer = self.results.recv().ok();
        self.on_answer(answer);
    }

    /// Takes the preparer's answer if there is one.
    fn poll(&mut self) {
        if !matches!(self.next, Next::Pending(_)) {
            return;
        }
        match self.results.try_recv() {
            Ok(answer) => self.on_answer(Some(answer)),
            Err(TryRecvError::Empty) => {}
            Err(TryRecvError::Disconnected) => self.on_answer(None),
        }
    }

    /// The preparer's answer; `None` if its thread is gone (it panicked), in
    /// which case rotation creates segments itself from now on.
    fn on_answer(&mut self, answer: Option<Result<Segment, WalError>>) {
        self.next = match answer {
            Some(Ok(segment)) => Next::Ready(segment),
            Some(Err(error)) => Next::Failed(error.into_cannot_grow()),
            None => {
                self.requests = None;
                Next::Idle
            }
        };
    }
}

impl Drop for Preparer {
    /// Waits for the thread: it must not create a file after the directory
    /// lock is released, or it could race a later `Wal::open`.
    fn drop(&mut self) {
        self.requests = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
