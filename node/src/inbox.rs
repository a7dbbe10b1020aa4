//! The shard loop's single input queue.
//!
//! Every task of a shard (connections, timers, the sync task, the
//! cross-core receiver) pushes into it; the loop takes everything that is
//! there in one go and handles it as one batch. Single-threaded: no locks.
//!
//! Bounded for what comes from outside: tasks that read the network (client
//! and peer connections, the cross-core queue) wait for [`Inbox::room`]
//! before they read more, so a flood of input stays in socket buffers and
//! queues that have their own bounds. The shard's own events (ticks, sync
//! completions, link state) are never refused: they are few, and dropping
//! one would stall the shard.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::task::{Poll, Waker};

/// Inputs the loop takes in before network readers wait for it.
pub const MAX_INBOX_INPUTS: usize = 16 * 1024;

/// A queue of inputs with one waiting consumer.
pub struct Inbox<T> {
    items: RefCell<Vec<T>>,
    waker: Cell<Option<Waker>>,
    /// Readers waiting for room.
    room_waiters: RefCell<Vec<Waker>>,
    capacity: usize,
}

impl<T> Default for Inbox<T> {
    fn default() -> Self {
        Self::with_capacity(MAX_INBOX_INPUTS)
    }
}

impl<T> Inbox<T> {
    /// An inbox whose readers wait once `capacity` inputs are queued.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            items: RefCell::new(Vec::new()),
            waker: Cell::new(None),
            room_waiters: RefCell::new(Vec::new()),
            capacity,
        }
    }

    /// Adds an input and wakes the loop if it is waiting. Never refuses:
    /// readers of the network bound themselves with [`Inbox::room`].
    pub fn push(&self, item: T) {
        self.items.borrow_mut().push(item);
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    /// Waits until fewer than the capacity of inputs are queued.
    pub async fn room(&self) {
        poll_fn(|cx| {
            if self.items.borrow().len() < self.capacity {
                Poll::Ready(())
            } else {
                self.room_waiters.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    /// Moves whatever is queued into `batch`, without waiting: for a loop
    /// that has work of its own left.
    pub fn take_into(&self, batch: &mut Vec<T>) {
        let mut items = self.items.borrow_mut();
        if items.is_empty() {
            return;
        }
        std::mem::swap(&mut *items, batch);
        drop(items);
        for waker in self.room_waiters.borrow_mut().drain(..) {
            waker.wake();
        }
    }

    /// Waits until at least one input is queued, then moves all of them into
    /// `batch` (which the caller reuses turn after turn to avoid allocating).
    pub async fn drain_into(&self, batch: &mut Vec<T>) {
        poll_fn(|cx| {
            if self.items.borrow().is_empty() {
                self.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            } else {
                self.take_into(batch);
                Poll::Ready(())
            }
        })
        .await
    }

    /// Lets every other task of the thread run once (the writers sending
    /// what the last turn queued, the I/O completions), then moves whatever
    /// is queued into `batch`, without waiting for more.
    pub async fn yield_then_take(&self, batch: &mut Vec<T>) {
        let mut yielded = false;
        poll_fn(|cx| {
            if yielded {
                Poll::Ready(())
            } else {
                yielded = true;
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        })
        .await;
        self.take_into(batch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_wait_for_room_and_the_drain_lets_them_go_on() {
        monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .build()
            .unwrap()
            .block_on(async {
                let inbox = std::rc::Rc::new(Inbox::with_capacity(2));
                let reader = {
                    let inbox = inbox.clone();
                    monoio::spawn(async move {
                        for i in 0..5 {
                            inbox.room().await;
                            inbox.push(i);
                        }
                    })
                };
                let mut seen = Vec::new();
                let mut batch = Vec::new();
                while seen.len() < 5 {
                    inbox.drain_into(&mut batch).await;
                    assert!(
                        batch.len() <= 2,
                        "the reader ran past the capacity: {batch:?}"
                    );
                    seen.append(&mut batch);
                }
                reader.await;
                assert_eq!(seen, vec![0, 1, 2, 3, 4]);
            });
    }
}
