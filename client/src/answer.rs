//! The answer to one request: set (or given up) by the connection's reader
//! or sweeper, awaited by the caller. Single-threaded, like the client:
//! `futures_channel::oneshot`'s `Arc` and atomics were 8 % of a pipelined
//! `corekv bench`'s CPU.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

struct Slot<T> {
    value: Option<T>,
    waker: Option<Waker>,
    sender_gone: bool,
}

/// Fills the slot once; dropped without [`Sender::send`], the receiver
/// gets [`Dropped`].
pub(crate) struct Sender<T>(Rc<RefCell<Slot<T>>>);

/// Resolves to the value sent, or [`Dropped`].
pub(crate) struct Receiver<T>(Rc<RefCell<Slot<T>>>);

/// The sender was dropped without sending.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Dropped;

pub(crate) fn channel<T>() -> (Sender<T>, Receiver<T>) {
    let slot = Rc::new(RefCell::new(Slot {
        value: None,
        waker: None,
        sender_gone: false,
    }));
    (Sender(slot.clone()), Receiver(slot))
}

impl<T> Sender<T> {
    pub(crate) fn send(self, value: T) {
        self.0.borrow_mut().value = Some(value);
        // Drop wakes the receiver.
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let waker = {
            let mut slot = self.0.borrow_mut();
            slot.sender_gone = true;
            slot.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl<T> Future for Receiver<T> {
    type Output = Result<T, Dropped>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut slot = self.0.borrow_mut();
        if let Some(value) = slot.value.take() {
            return Poll::Ready(Ok(value));
        }
        if slot.sender_gone {
            return Poll::Ready(Err(Dropped));
        }
        if !slot.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            slot.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn poll<T>(rx: &mut Receiver<T>, waker: &Waker) -> Poll<Result<T, Dropped>> {
        Pin::new(rx).poll(&mut Context::from_waker(waker))
    }

    #[test]
    fn a_value_sent_before_or_after_the_first_poll_arrives_and_wakes_once() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());

        let (tx, mut rx) = channel();
        tx.send(7);
        assert_eq!(poll(&mut rx, &waker), Poll::Ready(Ok(7)));

        let (tx, mut rx) = channel();
        assert_eq!(poll(&mut rx, &waker), Poll::Pending);
        assert_eq!(poll(&mut rx, &waker), Poll::Pending);
        tx.send(8);
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert_eq!(poll(&mut rx, &waker), Poll::Ready(Ok(8)));
    }

    #[test]
    fn a_sender_dropped_without_sending_wakes_the_receiver_with_dropped() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let (tx, mut rx) = channel::<u8>();
        assert_eq!(poll(&mut rx, &waker), Poll::Pending);
        drop(tx);
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert_eq!(poll(&mut rx, &waker), Poll::Ready(Err(Dropped)));
    }

    #[test]
    fn a_receiver_dropped_first_leaves_the_sender_harmless() {
        let (tx, rx) = channel();
        drop(rx);
        tx.send(1);
    }
}
