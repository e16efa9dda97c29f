//! Shutdown: a core-local one-shot [`Signal`] that connections and accept loops race against, and
//! the order in which the process stops (see `main`): stop accepting, let in-flight requests finish
//! and answer with `Connection: close`, close idle connections, then let the store write every
//! queued event before the process exits.

use std::cell::RefCell;
use std::future::Future;
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

#[derive(Default)]
struct SignalState {
    set: bool,
    waiters: Vec<Waker>,
}

/// A one-shot flag a core's tasks can wait on. Core-local: `Rc`, no atomics.
#[derive(Clone, Default)]
pub struct Signal(Rc<RefCell<SignalState>>);

impl Signal {
    /// Raise the flag and wake every waiter.
    pub fn set(&self) {
        let waiters = {
            let mut s = self.0.borrow_mut();
            s.set = true;
            std::mem::take(&mut s.waiters)
        };
        for w in waiters {
            w.wake();
        }
    }

    /// Whether the flag is raised.
    pub fn is_set(&self) -> bool {
        self.0.borrow().set
    }

    /// Resolves once the flag is raised.
    pub fn wait(&self) -> SignalWait {
        SignalWait(self.clone())
    }
}

/// The future of [`Signal::wait`].
pub struct SignalWait(Signal);

impl Future for SignalWait {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = self.0 .0.borrow_mut();
        if s.set {
            return Poll::Ready(());
        }
        if !s.waiters.iter().any(|w| w.will_wake(cx.waker())) {
            s.waiters.push(cx.waker().clone());
        }
        Poll::Pending
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

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: Future>(f: F) -> F::Output {
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        rt.block_on(f)
    }

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
    fn race_returns_the_first_to_finish() {
        block_on(async {
            let slow = monoio::time::sleep(std::time::Duration::from_secs(5));
            assert_eq!(race(async { 1 }, slow).await, Either::Left(1));
            let slow = monoio::time::sleep(std::time::Duration::from_secs(5));
            assert_eq!(race(slow, async { 2 }).await, Either::Right(2));
        });
    }
}
