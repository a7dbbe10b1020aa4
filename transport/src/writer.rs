//! The send side of a connection: a byte-bounded queue of encoded frames,
//! drained by one writer task in vectored writes.
//!
//! Senders never block and never write themselves: they push onto the queue
//! and wake the writer task. The writer runs when the current task yields, so
//! everything queued during one event-loop turn leaves in one `writev` (up to
//! [`MAX_IOVECS_PER_WRITE`] frames), in the order it was queued.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;

use bytes::Bytes;
use monoio::buf::IoVecBuf;
use monoio::io::AsyncWriteRent;

use crate::wake::{race, wait_until, Either, WakeList, WakeSlot};

/// Frames handed to one `writev` at most: Linux's `IOV_MAX` (`UIO_MAXIOV`),
/// above which both `writev` and io_uring refuse the call with `EINVAL`.
pub(crate) const MAX_IOVECS_PER_WRITE: usize = 1024;

/// Why a frame was not queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The queue holds too many bytes not yet written; the caller should
    /// back off (or drop the frame, for traffic raft will resend).
    #[error("send queue full: {queued_bytes} bytes queued, limit {max} bytes")]
    Full {
        /// Bytes queued or being written when the frame was refused.
        queued_bytes: usize,
        /// The queue's limit (`max_queue_bytes`).
        max: usize,
    },
    /// The connection was closed (by the owner, or by a write error).
    #[error("connection closed")]
    Closed,
    /// The peer link is not connected right now; the frame was dropped and
    /// counted (see [`crate::PeerLink::dropped_frames`]).
    #[error("peer link is down")]
    Down,
    /// The frame is larger than the link's `max_frame_bytes`; the peer would
    /// refuse it and close the connection, so it is not sent.
    #[error("frame payload of {len} bytes exceeds max_frame_bytes {max}")]
    TooLarge {
        /// Payload bytes of the frame.
        len: usize,
        /// The link's `max_frame_bytes`.
        max: usize,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum QueueState {
    /// Accepting frames.
    Open,
    /// Closed by the owner: what is queued is still written, then the
    /// write side is shut down.
    Closing,
    /// Stopped at once: queued frames are discarded, an in-flight write is
    /// cancelled.
    Aborted,
    /// The writer task has exited.
    Finished,
}

/// State shared by the senders and the writer task of one connection.
pub(crate) struct SendQueue {
    frames: RefCell<VecDeque<Bytes>>,
    /// Bytes queued plus bytes of the write in flight.
    queued_bytes: Cell<usize>,
    max_queue_bytes: usize,
    state: Cell<QueueState>,
    /// The writer task waits here for frames or a state change.
    writer_wake: WakeSlot,
    /// Whoever waits for the writer to exit (the peer link) waits here.
    finish_wake: WakeSlot,
    /// Senders waiting for room in the queue wait here.
    room_wake: WakeList,
    /// The write error that ended the writer, if one did.
    failure: RefCell<Option<std::io::Error>>,
}

impl SendQueue {
    fn new(max_queue_bytes: usize) -> Self {
        Self {
            frames: RefCell::new(VecDeque::new()),
            queued_bytes: Cell::new(0),
            max_queue_bytes,
            state: Cell::new(QueueState::Open),
            writer_wake: WakeSlot::default(),
            finish_wake: WakeSlot::default(),
            room_wake: WakeList::default(),
            failure: RefCell::new(None),
        }
    }

    fn push(&self, frame: Bytes) -> Result<(), SendError> {
        if self.state.get() != QueueState::Open {
            return Err(SendError::Closed);
        }
        let queued_bytes = self.queued_bytes.get();
        if queued_bytes + frame.len() > self.max_queue_bytes {
            return Err(SendError::Full {
                queued_bytes,
                max: self.max_queue_bytes,
            });
        }
        self.queued_bytes.set(queued_bytes + frame.len());
        self.frames.borrow_mut().push_back(frame);
        self.writer_wake.wake();
        Ok(())
    }

    fn close(&self) {
        if self.state.get() == QueueState::Open {
            self.state.set(QueueState::Closing);
            self.writer_wake.wake();
            self.room_wake.wake_all();
        }
    }

    /// Stops the writer without writing what is queued; returns how many
    /// frames were discarded.
    pub(crate) fn abort(&self) -> usize {
        if self.state.get() != QueueState::Finished {
            self.state.set(QueueState::Aborted);
        }
        let discarded = self.discard_queued();
        self.writer_wake.wake();
        discarded
    }

    /// Bytes left the queue (written or discarded): senders waiting for
    /// room may proceed.
    fn release(&self, bytes: usize) {
        self.queued_bytes.set(self.queued_bytes.get() - bytes);
        self.room_wake.wake_all();
    }

    fn discard_queued(&self) -> usize {
        let mut frames = self.frames.borrow_mut();
        let discarded_bytes: usize = frames.iter().map(Bytes::len).sum();
        let discarded = frames.len();
        frames.clear();
        drop(frames);
        self.release(discarded_bytes);
        discarded
    }

    fn has_work(&self) -> bool {
        self.state.get() != QueueState::Open || !self.frames.borrow().is_empty()
    }

    pub(crate) fn is_finished(&self) -> bool {
        self.state.get() == QueueState::Finished
    }

    pub(crate) fn finish_wake(&self) -> &WakeSlot {
        &self.finish_wake
    }

    /// The write error that stopped the writer, taken (reported once).
    pub(crate) fn take_failure(&self) -> Option<std::io::Error> {
        self.failure.borrow_mut().take()
    }
}

/// Closes the queue when the last [`FrameSender`] clone goes away, so the
/// writer task (and the socket it owns) does not outlive every sender.
struct SenderHandle {
    queue: Rc<SendQueue>,
}

impl Drop for SenderHandle {
    fn drop(&mut self) {
        self.queue.close();
    }
}

/// Queues encoded frames for one connection's writer task. Cheap to clone;
/// single-threaded (`!Send`), like the shard that owns the connection.
/// Dropping the last clone closes the connection after what is queued has
/// been written.
#[derive(Clone)]
pub struct FrameSender {
    handle: Rc<SenderHandle>,
}

impl FrameSender {
    /// Queues an encoded frame (header included). Never blocks. Frames
    /// queued during one event-loop turn leave in one vectored write when the
    /// writer task runs next, in the order they were queued.
    pub fn send(&self, frame: Bytes) -> Result<(), SendError> {
        self.handle.queue.push(frame)
    }

    /// Waits until a frame of `frame_len` bytes would be accepted by
    /// [`send`](Self::send), for a caller that would rather wait than drop
    /// on [`SendError::Full`]. Errors: `Closed` once the sender is closed;
    /// `Full` at once if the frame is larger than the whole queue.
    ///
    /// Wait here instead of retrying `send` after a yield: a task that is
    /// always ready keeps monoio from reaping the completion of the very
    /// write that would make room.
    pub async fn wait_for_room(&self, frame_len: usize) -> Result<(), SendError> {
        let queue = &self.handle.queue;
        if frame_len > queue.max_queue_bytes {
            return Err(SendError::Full {
                queued_bytes: queue.queued_bytes.get(),
                max: queue.max_queue_bytes,
            });
        }
        std::future::poll_fn(|cx| {
            if queue.state.get() != QueueState::Open {
                return std::task::Poll::Ready(Err(SendError::Closed));
            }
            if queue.queued_bytes.get() + frame_len <= queue.max_queue_bytes {
                return std::task::Poll::Ready(Ok(()));
            }
            queue.room_wake.register(cx.waker());
            std::task::Poll::Pending
        })
        .await
    }

    /// Bytes queued or being written.
    pub fn queued_bytes(&self) -> usize {
        self.handle.queue.queued_bytes.get()
    }

    /// True once the sender no longer accepts frames: closed by the owner,
    /// or the writer stopped on a write error.
    pub fn is_closed(&self) -> bool {
        self.handle.queue.state.get() != QueueState::Open
    }

    /// Stops accepting frames; the writer writes what is already queued,
    /// shuts the write side of the socket down and exits.
    pub fn close(&self) {
        self.handle.queue.close();
    }

    /// Stops at once: what is queued is discarded (its memory freed), a
    /// write in flight is cancelled, and the writer task exits, releasing
    /// its half of the socket. For a peer that does not read: waiting for it
    /// to drain the queue would hold the memory for as long as it likes.
    pub fn abort(&self) {
        self.handle.queue.abort();
    }

    pub(crate) fn queue(&self) -> &Rc<SendQueue> {
        &self.handle.queue
    }
}

/// Spawns (on the current monoio runtime) a task that writes queued frames to
/// `writer` until the sender is closed or a write fails, and returns the
/// sender. The queue holds at most `max_queue_bytes` (a frame larger than
/// that is always refused with [`SendError::Full`]).
pub fn spawn_writer<W: AsyncWriteRent + 'static>(writer: W, max_queue_bytes: usize) -> FrameSender {
    let queue = Rc::new(SendQueue::new(max_queue_bytes));
    monoio::spawn(run_writer(writer, queue.clone()));
    FrameSender {
        handle: Rc::new(SenderHandle { queue }),
    }
}

async fn run_writer<W: AsyncWriteRent>(mut writer: W, queue: Rc<SendQueue>) {
    // One batch's vectors are reused across writes; a cancelled write takes
    // its batch with it and the next write starts a fresh one.
    let mut spare = Some(FrameBatch::default());
    loop {
        wait_until([&queue.writer_wake], || queue.has_work()).await;
        if queue.state.get() == QueueState::Aborted {
            break;
        }
        let mut batch = spare.take().unwrap_or_default();
        batch.fill(&mut queue.frames.borrow_mut());
        if batch.frames.is_empty() {
            // Closing and everything queued has been written.
            break;
        }
        let batch_bytes = batch.bytes;
        let aborted = wait_until([&queue.writer_wake], || {
            queue.state.get() == QueueState::Aborted
        });
        match race(write_batch(&mut writer, batch), aborted).await {
            Either::Left((Ok(()), mut batch)) => {
                queue.release(batch_bytes);
                batch.clear();
                spare = Some(batch);
            }
            Either::Left((Err(error), _)) => {
                tracing::debug!(%error, "frame writer stopped on a write error");
                *queue.failure.borrow_mut() = Some(error);
                queue.release(batch_bytes);
                break;
            }
            // The in-flight write was cancelled by dropping it; its bytes
            // are no longer held by this queue.
            Either::Right(()) => {
                queue.release(batch_bytes);
                break;
            }
        }
    }
    queue.state.set(QueueState::Finished);
    // Also wakes senders waiting for room, who now see the sender closed.
    queue.discard_queued();
    // Tell the peer we are done writing (a no-op if the socket already failed).
    let _ = writer.shutdown().await;
    queue.finish_wake.wake();
}

/// Writes the whole batch, issuing further `writev`s after a short write.
///
/// Not monoio's `write_vectored_all`: in monoio 0.2.4 it resumes a short
/// write without advancing the partly written iovec's base pointer and with
/// an iovec count that ignores the ones already written, which corrupts the
/// stream as soon as the socket buffer fills up.
async fn write_batch<W: AsyncWriteRent>(
    writer: &mut W,
    mut batch: FrameBatch,
) -> (std::io::Result<()>, FrameBatch) {
    while batch.remaining() > 0 {
        let (result, returned) = writer.writev(batch).await;
        batch = returned;
        match result {
            Ok(0) => {
                let error = std::io::Error::new(
                    std::io::ErrorKind::WriteZero,
                    "socket accepted no bytes of a vectored write",
                );
                return (Err(error), batch);
            }
            Ok(written) => batch.advance(written),
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => return (Err(error), batch),
        }
    }
    (Ok(()), batch)
}

/// Frames of one vectored write, with the iovec array that points into them.
#[derive(Default)]
struct FrameBatch {
    frames: Vec<Bytes>,
    iovecs: Vec<libc::iovec>,
    /// Index of the first iovec not completely written.
    first_unwritten: usize,
    /// Total bytes of `frames`.
    bytes: usize,
    /// Bytes of `frames` already written.
    written: usize,
}

impl FrameBatch {
    /// Moves up to [`MAX_IOVECS_PER_WRITE`] frames from the front of `queue`.
    fn fill(&mut self, queue: &mut VecDeque<Bytes>) {
        let take = queue.len().min(MAX_IOVECS_PER_WRITE);
        for frame in queue.drain(..take) {
            self.bytes += frame.len();
            if !frame.is_empty() {
                self.iovecs.push(libc::iovec {
                    iov_base: frame.as_ptr() as *mut libc::c_void,
                    iov_len: frame.len(),
                });
            }
            self.frames.push(frame);
        }
    }

    fn remaining(&self) -> usize {
        self.bytes - self.written
    }

    /// Accounts for `n` more bytes written: drops whole iovecs from the
    /// front and moves the base of a partly written one past its written
    /// bytes.
    ///
    /// # Panics
    ///
    /// Panics if `n` exceeds the bytes not yet written (the kernel never
    /// reports more than it was given).
    fn advance(&mut self, mut n: usize) {
        assert!(
            n <= self.remaining(),
            "writev reported {n} bytes written, only {} were pending",
            self.remaining()
        );
        self.written += n;
        while n > 0 {
            let iovec = &mut self.iovecs[self.first_unwritten];
            if n < iovec.iov_len {
                // SAFETY: n < iov_len, so the new base stays inside the frame.
                iovec.iov_base = unsafe { iovec.iov_base.cast::<u8>().add(n).cast() };
                iovec.iov_len -= n;
                return;
            }
            n -= iovec.iov_len;
            self.first_unwritten += 1;
        }
    }

    fn clear(&mut self) {
        self.iovecs.clear();
        self.frames.clear();
        self.first_unwritten = 0;
        self.bytes = 0;
        self.written = 0;
    }
}

// SAFETY: every unwritten iovec points into a `Bytes` held in `frames`,
// whose heap storage does not move when the batch moves, and neither
// `frames` nor `iovecs` is modified while the runtime owns the batch (only
// `advance`, between writes, changes them).
unsafe impl IoVecBuf for FrameBatch {
    fn read_iovec_ptr(&self) -> *const libc::iovec {
        self.iovecs[self.first_unwritten..].as_ptr()
    }

    fn read_iovec_len(&self) -> usize {
        self.iovecs.len() - self.first_unwritten
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;

    /// A writer that records every call, so the tests can see how frames
    /// were grouped into writes.
    #[derive(Clone, Default)]
    struct RecordingWriter {
        /// One entry per writev: the buffers it was given, copied.
        writes: Rc<RefCell<Vec<Vec<Vec<u8>>>>>,
        shut_down: Rc<Cell<bool>>,
        /// When set, each writev accepts at most this many bytes, as a
        /// socket with a full send buffer does.
        short_write_bytes: Option<usize>,
    }

    impl AsyncWriteRent for RecordingWriter {
        fn write<T: monoio::buf::IoBuf>(
            &mut self,
            buf: T,
        ) -> impl Future<Output = monoio::BufResult<usize, T>> {
            // SAFETY: IoBuf promises `bytes_init` readable bytes at the pointer.
            let data = unsafe { std::slice::from_raw_parts(buf.read_ptr(), buf.bytes_init()) };
            self.writes.borrow_mut().push(vec![data.to_vec()]);
            let n = data.len();
            async move { (Ok(n), buf) }
        }

        fn writev<T: IoVecBuf>(
            &mut self,
            buf_vec: T,
        ) -> impl Future<Output = monoio::BufResult<usize, T>> {
            // SAFETY: IoVecBuf promises `read_iovec_len` valid iovecs.
            let iovecs = unsafe {
                std::slice::from_raw_parts(buf_vec.read_iovec_ptr(), buf_vec.read_iovec_len())
            };
            let mut budget = self.short_write_bytes.unwrap_or(usize::MAX);
            let mut buffers: Vec<Vec<u8>> = Vec::new();
            for iov in iovecs {
                let take = iov.iov_len.min(budget);
                if take == 0 {
                    break;
                }
                budget -= take;
                // SAFETY: the iovec describes `iov_len` readable bytes.
                buffers.push(unsafe {
                    std::slice::from_raw_parts(iov.iov_base as *const u8, take).to_vec()
                });
            }
            let n = buffers.iter().map(Vec::len).sum();
            self.writes.borrow_mut().push(buffers);
            async move { (Ok(n), buf_vec) }
        }

        async fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }

        async fn shutdown(&mut self) -> std::io::Result<()> {
            self.shut_down.set(true);
            Ok(())
        }
    }

    fn runtime() -> monoio::Runtime<monoio::time::TimeDriver<monoio::LegacyDriver>> {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .expect("build monoio runtime")
    }

    /// Lets every other ready task (the writer) run until it is idle again.
    async fn let_writer_run(queue_writes: &Rc<RefCell<Vec<Vec<Vec<u8>>>>>, expected: usize) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while queue_writes.borrow().len() < expected {
            assert!(
                std::time::Instant::now() < deadline,
                "writer made {} writes, expected {expected}",
                queue_writes.borrow().len()
            );
            monoio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    #[test]
    fn frames_queued_in_one_turn_leave_in_one_vectored_write_in_order() {
        runtime().block_on(async {
            let writer = RecordingWriter::default();
            let sender = spawn_writer(writer.clone(), 1 << 20);
            let frames: Vec<Bytes> = (0..10u8)
                .map(|i| Bytes::from(vec![i; i as usize + 1]))
                .collect();
            for frame in &frames {
                sender.send(frame.clone()).unwrap();
            }
            assert_eq!(sender.queued_bytes(), 55);
            let_writer_run(&writer.writes, 1).await;
            // A second turn's frames form a second write.
            sender.send(Bytes::from_static(b"next")).unwrap();
            let_writer_run(&writer.writes, 2).await;
            let writes = writer.writes.borrow();
            assert_eq!(writes.len(), 2, "one writev per turn");
            let first: Vec<Bytes> = writes[0].iter().cloned().map(Bytes::from).collect();
            assert_eq!(first, frames);
            assert_eq!(writes[1], vec![b"next".to_vec()]);
            assert_eq!(sender.queued_bytes(), 0);
        });
    }

    #[test]
    fn a_full_queue_refuses_frames_and_says_how_full() {
        runtime().block_on(async {
            let writer = RecordingWriter::default();
            let sender = spawn_writer(writer.clone(), 100);
            sender.send(Bytes::from(vec![0; 60])).unwrap();
            assert_eq!(
                sender.send(Bytes::from(vec![0; 41])),
                Err(SendError::Full {
                    queued_bytes: 60,
                    max: 100
                })
            );
            sender.send(Bytes::from(vec![0; 40])).unwrap();
            let_writer_run(&writer.writes, 1).await;
            // Written bytes no longer count against the bound.
            assert_eq!(sender.queued_bytes(), 0);
            sender.send(Bytes::from(vec![0; 100])).unwrap();
        });
    }

    #[test]
    fn close_writes_what_was_queued_then_shuts_the_writer_down() {
        runtime().block_on(async {
            let writer = RecordingWriter::default();
            let sender = spawn_writer(writer.clone(), 1 << 20);
            sender.send(Bytes::from_static(b"last words")).unwrap();
            sender.close();
            assert!(sender.is_closed());
            assert_eq!(
                sender.send(Bytes::from_static(b"late")),
                Err(SendError::Closed)
            );
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !writer.shut_down.get() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "writer never shut down"
                );
                monoio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            assert_eq!(*writer.writes.borrow(), vec![vec![b"last words".to_vec()]]);
        });
    }

    #[test]
    fn dropping_the_last_sender_stops_the_writer() {
        runtime().block_on(async {
            let writer = RecordingWriter::default();
            let sender = spawn_writer(writer.clone(), 1 << 20);
            let clone = sender.clone();
            drop(sender);
            clone.send(Bytes::from_static(b"still open")).unwrap();
            drop(clone);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !writer.shut_down.get() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "writer outlived its senders"
                );
                monoio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            assert_eq!(writer.writes.borrow().len(), 1);
        });
    }

    #[test]
    fn more_frames_than_iov_max_are_split_into_several_writes_in_order() {
        runtime().block_on(async {
            let writer = RecordingWriter::default();
            let sender = spawn_writer(writer.clone(), 1 << 20);
            let count = MAX_IOVECS_PER_WRITE + 10;
            for i in 0..count {
                sender
                    .send(Bytes::from((i as u32).to_be_bytes().to_vec()))
                    .unwrap();
            }
            let_writer_run(&writer.writes, 2).await;
            let writes = writer.writes.borrow();
            assert_eq!(writes[0].len(), MAX_IOVECS_PER_WRITE);
            let all: Vec<u32> = writes
                .iter()
                .flatten()
                .map(|b| u32::from_be_bytes(b[..].try_into().unwrap()))
                .collect();
            assert_eq!(all, (0..count as u32).collect::<Vec<_>>());
        });
    }

    #[test]
    fn short_writes_resume_where_the_kernel_stopped() {
        runtime().block_on(async {
            let writer = RecordingWriter {
                short_write_bytes: Some(7),
                ..RecordingWriter::default()
            };
            let sender = spawn_writer(writer.clone(), 1 << 20);
            let frames: Vec<Vec<u8>> = (0..20u8)
                .map(|i| vec![i; (i as usize % 5) * 3 + 1])
                .collect();
            let total: usize = frames.iter().map(Vec::len).sum();
            for frame in &frames {
                sender.send(Bytes::from(frame.clone())).unwrap();
            }
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while sender.queued_bytes() > 0 {
                assert!(std::time::Instant::now() < deadline, "writer stalled");
                monoio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            let written: Vec<u8> = writer
                .writes
                .borrow()
                .iter()
                .flatten()
                .flatten()
                .copied()
                .collect();
            assert_eq!(written, frames.concat(), "bytes reordered or repeated");
            assert_eq!(writer.writes.borrow().len(), total.div_ceil(7));
        });
    }

    #[test]
    fn wait_for_room_resumes_once_the_writer_has_made_room() {
        runtime().block_on(async {
            let writer = RecordingWriter::default();
            let sender = spawn_writer(writer.clone(), 100);
            sender.send(Bytes::from(vec![1; 80])).unwrap();
            assert!(matches!(
                sender.send(Bytes::from(vec![2; 80])),
                Err(SendError::Full { .. })
            ));
            sender.wait_for_room(80).await.unwrap();
            sender.send(Bytes::from(vec![2; 80])).unwrap();
            assert!(matches!(
                sender.wait_for_room(101).await,
                Err(SendError::Full { .. })
            ));
            sender.close();
            assert_eq!(sender.wait_for_room(1).await, Err(SendError::Closed));
        });
    }
}
