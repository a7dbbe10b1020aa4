//! Single-threaded wake-up plumbing shared by the writer and the peer link.
//!
//! Everything here runs on one shard thread, so a `Cell`/`RefCell` and a
//! stored `Waker` are all a task needs to sleep until another task (or a
//! callback on the same thread) changes some state.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::pin::pin;
use std::task::{Poll, Waker};

/// Holds the waker of the one task that waits on some state.
#[derive(Default)]
pub(crate) struct WakeSlot {
    waker: RefCell<Option<Waker>>,
}

impl WakeSlot {
    /// Remembers the task to wake, replacing an older registration.
    pub(crate) fn register(&self, waker: &Waker) {
        let mut slot = self.waker.borrow_mut();
        match slot.as_ref() {
            Some(old) if old.will_wake(waker) => {}
            _ => *slot = Some(waker.clone()),
        }
    }

    /// Wakes the waiting task, if any.
    pub(crate) fn wake(&self) {
        // Take the waker out before waking so a task that runs inline and
        // registers again does not find the slot borrowed.
        let waker = self.waker.borrow_mut().take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// Holds the wakers of any number of tasks waiting on the same state.
#[derive(Default)]
pub(crate) struct WakeList {
    wakers: RefCell<Vec<Waker>>,
}

impl WakeList {
    /// Adds a waiting task (once, however often it polls).
    pub(crate) fn register(&self, waker: &Waker) {
        let mut wakers = self.wakers.borrow_mut();
        if !wakers.iter().any(|w| w.will_wake(waker)) {
            wakers.push(waker.clone());
        }
    }

    /// Wakes every waiting task; they re-register if still waiting.
    pub(crate) fn wake_all(&self) {
        let wakers = std::mem::take(&mut *self.wakers.borrow_mut());
        for waker in wakers {
            waker.wake();
        }
    }
}

/// Resolves once `ready()` returns true; re-checked whenever one of `slots`
/// is woken.
pub(crate) async fn wait_until<const N: usize>(
    slots: [&WakeSlot; N],
    mut ready: impl FnMut() -> bool,
) {
    poll_fn(|cx| {
        if ready() {
            return Poll::Ready(());
        }
        for slot in &slots {
            slot.register(cx.waker());
        }
        Poll::Pending
    })
    .await
}

/// Which of two raced futures finished first.
pub(crate) enum Either<A, B> {
    Left(A),
    Right(B),
}

/// Runs two futures and returns the first result; the other is dropped
/// (monoio cancels an in-flight operation when its future is dropped).
/// `left` is polled first, so it wins a tie.
pub(crate) async fn race<A: Future, B: Future>(left: A, right: B) -> Either<A::Output, B::Output> {
    let mut left = pin!(left);
    let mut right = pin!(right);
    poll_fn(|cx| {
        if let Poll::Ready(a) = left.as_mut().poll(cx) {
            return Poll::Ready(Either::Left(a));
        }
        if let Poll::Ready(b) = right.as_mut().poll(cx) {
            return Poll::Ready(Either::Right(b));
        }
        Poll::Pending
    })
    .await
}
