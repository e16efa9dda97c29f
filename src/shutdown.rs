//! Shutdown: a core-local one-shot [`Signal`] that connections and accept loops race against, and
//! the order in which the process stops (see `main`): stop accepting, let in-flight requests finish
//! and answer with `Connection: close`, close idle connections, then let the store write every
//! queued event before the process exits.

use std::cell::RefCell;
use std::future::Future;
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use slab::Slab;

#[derive(Default)]
struct SignalState {
    set: bool,
    /// One slot per pending wait (its waker until the flag is raised); a dropped wait frees its
    /// slot, so the table never outgrows the waits alive at once (one per idle connection, at most).
    slots: Slab<Option<Waker>>,
}

/// A one-shot flag a core's tasks can wait on. Core-local: `Rc`, no atomics.
#[derive(Clone, Default)]
pub struct Signal(Rc<RefCell<SignalState>>);

impl Signal {
    /// Raise the flag and wake every waiter.
    pub fn set(&self) {
        let wakers: Vec<Waker> = {
            let mut s = self.0.borrow_mut();
            s.set = true;
            s.slots.iter_mut().filter_map(|(_, w)| w.take()).collect()
        };
        for w in wakers {
            w.wake();
        }
    }

    /// Whether the flag is raised.
    pub fn is_set(&self) -> bool {
        self.0.borrow().set
    }

    /// Resolves once the flag is raised.
    pub fn wait(&self) -> SignalWait {
        SignalWait {
            signal: self.clone(),
            slot: None,
        }
    }

    #[cfg(test)]
    fn slots_in_use(&self) -> usize {
        self.0.borrow().slots.len()
    }
}

/// The future of [`Signal::wait`].
pub struct SignalWait {
    signal: Signal,
    slot: Option<usize>,
}

impl Future for SignalWait {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        let mut s = this.signal.0.borrow_mut();
        if s.set {
            return Poll::Ready(());
        }
        match this.slot {
            Some(i) => match &mut s.slots[i] {
                Some(w) if w.will_wake(cx.waker()) => {}
                slot => *slot = Some(cx.waker().clone()),
            },
            None => this.slot = Some(s.slots.insert(Some(cx.waker().clone()))),
        }
        Poll::Pending
    }
}

impl Drop for SignalWait {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            self.signal.0.borrow_mut().slots.remove(i);
        }
    }
}

/// Which of two futures finished first.
#[derive(Debug, PartialEq, Eq)]
pub enum Either<A, B> {
    /// The first.
    Left(A),
    /// The second.
    Right(B),
}

/// Run two futures and return the first to finish (the first one wins a tie); the other is dropped.
pub async fn race<A: Future, B: Future>(a: A, b: B) -> Either<A::Output, B::Output> {
    let mut a = pin!(a);
    let mut b = pin!(b);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = a.as_mut().poll(cx) {
            return Poll::Ready(Either::Left(v));
        }
        if let Poll::Ready(v) = b.as_mut().poll(cx) {
            return Poll::Ready(Either::Right(v));
        }
        Poll::Pending
    })
    .await
}

/// Run `f` on a monoio runtime with a timer, as core-local code runs on an ingress core (unit
/// tests).
#[cfg(test)]
pub(crate) fn block_on_for_tests<F: Future>(f: F) -> F::Output {
    monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build()
        .expect("a monoio runtime for a test")
        .block_on(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use block_on_for_tests as block_on;

    #[test]
    fn signal_wakes_every_waiter() {
        block_on(async {
            let s = Signal::default();
            let (a, b) = (s.wait(), s.wait());
            let setter = s.clone();
            monoio::spawn(async move {
                monoio::time::sleep(std::time::Duration::from_millis(5)).await;
                setter.set();
            });
            a.await;
            b.await;
            assert!(s.is_set());
            s.wait().await; // already set: immediate
        });
    }

    #[test]
    fn finished_waits_free_their_slots() {
        block_on(async {
            let s = Signal::default();
            for _ in 0..100 {
                let r = race(async { 1 }, s.wait()).await;
                assert_eq!(r, Either::Left(1));
                // A wait polled once and dropped leaves nothing behind.
                let mut w = Box::pin(s.wait());
                let waker = std::task::Waker::noop();
                assert!(w
                    .as_mut()
                    .poll(&mut Context::from_waker(waker))
                    .is_pending());
                assert_eq!(s.slots_in_use(), 1);
            }
            assert_eq!(s.slots_in_use(), 0);
        });
    }

    #[test]
    fn race_returns_the_first_to_finish() {
        block_on(async {
            let slow = monoio::time::sleep(std::time::Duration::from_secs(5));
            assert_eq!(race(async { 1 }, slow).await, Either::Left(1));
            let slow = monoio::time::sleep(std::time::Duration::from_secs(5));
            assert_eq!(race(slow, async { 2 }).await, Either::Right(2));
        });
    }
}
