//! The shard loop's single input queue.
//!
//! Every task of a shard (connections, timers, the sync task, the
//! cross-core receiver) pushes into it; the loop takes everything that is
//! there in one go and handles it as one batch. Single-threaded: no locks.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::task::{Poll, Waker};

/// A queue of inputs with one waiting consumer.
pub struct Inbox<T> {
    items: RefCell<Vec<T>>,
    waker: Cell<Option<Waker>>,
}

impl<T> Default for Inbox<T> {
    fn default() -> Self {
        Self {
            items: RefCell::new(Vec::new()),
            waker: Cell::new(None),
        }
    }
}

impl<T> Inbox<T> {
    /// Adds an input and wakes the loop if it is waiting.
    pub fn push(&self, item: T) {
        self.items.borrow_mut().push(item);
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    /// Waits until at least one input is queued, then moves all of them into
    /// `batch` (which the caller reuses turn after turn to avoid allocating).
    pub async fn drain_into(&self, batch: &mut Vec<T>) {
        poll_fn(|cx| {
            let mut items = self.items.borrow_mut();
            if items.is_empty() {
                self.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            } else {
                std::mem::swap(&mut *items, batch);
                Poll::Ready(())
            }
        })
        .await
    }
}
