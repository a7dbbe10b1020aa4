//! One client connection as the shard sees it: its send queue, how many of
//! its requests are in flight, when it was last active, and whether it has
//! been cut off.
//!
//! Limits, so that one client cannot take the shard down with it:
//! - at most `max_in_flight` requests of a connection are being served at
//!   once; past that its reader stops reading (back-pressure: the client's
//!   own socket fills, nothing is buffered here);
//! - answers queue up to a byte bound; a client that does not read them is
//!   cut off: the queue is dropped, the writer aborted, the reader stopped,
//!   and one line is logged for the connection;
//! - a connection with nothing in flight that sent nothing for the idle
//!   timeout is closed.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use corekv_transport::FrameSender;

/// Why a connection was closed by the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum CutReason {
    /// Its answers piled up past the queue bound: the client is not reading.
    SlowReader,
    /// Nothing in flight and nothing received for the idle timeout.
    Idle,
}

/// The shard's handle on one client connection.
pub(super) struct ClientConn {
    sender: FrameSender,
    in_flight: Cell<usize>,
    last_active: Cell<Instant>,
    cut: Cell<Option<CutReason>>,
    /// The connection's reader task, waiting for room or for the cut.
    reader: RefCell<Option<Waker>>,
}

impl ClientConn {
    pub(super) fn new(sender: FrameSender, now: Instant) -> ClientConn {
        ClientConn {
            sender,
            in_flight: Cell::new(0),
            last_active: Cell::new(now),
            cut: Cell::new(None),
            reader: RefCell::new(None),
        }
    }

    /// The reader took one more request off the connection.
    pub(super) fn request_read(&self, now: Instant) {
        self.in_flight.set(self.in_flight.get() + 1);
        self.last_active.set(now);
    }

    /// Queues the answer to one request, encoded by `frame` only if the
    /// connection is still open (a large answer for a connection already cut
    /// off is never built). `Err` with the bytes queued when the queue is
    /// full: the caller cuts the connection off.
    /// Activity is stamped when a request is read (with the loop's clock, at
    /// most a turn old), not when it is answered: an answer comes within
    /// `request_timeout_ms`, far inside the idle timeout.
    pub(super) fn answer(&self, frame: impl FnOnce() -> Bytes) -> Result<(), usize> {
        self.in_flight.set(self.in_flight.get().saturating_sub(1));
        self.wake_reader();
        if self.cut.get().is_some() {
            return Ok(());
        }
        self.sender
            .send(frame())
            .map_err(|_| self.sender.queued_bytes())
    }

    /// Closes the connection at once: queued answers are dropped, the
    /// writer stops, the reader stops reading. Returns false if it was
    /// already cut off (so the caller logs once per connection).
    pub(super) fn cut_off(&self, reason: CutReason) -> bool {
        if self.cut.get().is_some() {
            return false;
        }
        self.cut.set(Some(reason));
        self.sender.abort();
        self.wake_reader();
        true
    }

    /// True when idle for `timeout` with nothing in flight.
    pub(super) fn idle_for(&self, timeout: Duration, now: Instant) -> bool {
        self.in_flight.get() == 0 && now.duration_since(self.last_active.get()) >= timeout
    }

    /// Requests of this connection being served.
    pub(super) fn in_flight(&self) -> usize {
        self.in_flight.get()
    }

    /// The send side, for a clean close at shutdown.
    pub(super) fn sender(&self) -> &FrameSender {
        &self.sender
    }

    /// Waits until fewer than `max_in_flight` requests are in flight;
    /// false once the connection is cut off.
    pub(super) async fn room_to_read(&self, max_in_flight: usize) -> bool {
        poll_fn(|cx| {
            if self.cut.get().is_some() {
                return Poll::Ready(false);
            }
            if self.in_flight.get() < max_in_flight {
                return Poll::Ready(true);
            }
            *self.reader.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Resolves when the connection is cut off.
    pub(super) async fn cut_off_signal(&self) {
        poll_fn(|cx| {
            if self.cut.get().is_some() {
                return Poll::Ready(());
            }
            *self.reader.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    fn wake_reader(&self) {
        if let Some(waker) = self.reader.borrow_mut().take() {
            waker.wake();
        }
    }
}
