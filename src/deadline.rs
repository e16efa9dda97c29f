//! Core-local deadlines for the request path. A read, a write or a wait for another thread
//! gives up when its deadline passes; instead of a runtime timer for each (monoio's `Sleep` is a
//! 640-byte, cache-padded timer-wheel entry, created, moved with its future and removed again
//! for every operation, each with a clock read), an operation that has to wait takes a slot in
//! its core's [`Deadlines`] table, and one sweeper task per core ([`Deadlines::sweep`]) fires the
//! deadlines that have passed. An operation that finishes without waiting never touches the
//! table.
//!
//! Precision: a deadline fires no earlier than it is due and at most [`SLACK`] after: the sweeper
//! sleeps until the earliest deadline it knows (at least `SLACK` apart), and a slot taken with an
//! earlier deadline than that wakes it to plan again. The deadlines here are seconds long (head,
//! body, idle, reply timeouts), so the slack is invisible to clients.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use slab::Slab;

use crate::shutdown::{race, Either, Signal};

/// How late a deadline may fire, and the least time between two sweeps.
pub const SLACK: Duration = Duration::from_millis(10);

struct Slot {
    deadline: Instant,
    waker: Option<Waker>,
    fired: bool,
}

#[derive(Default)]
struct Table {
    /// One slot per waiting operation; a freed slot is reused by the next.
    slots: Slab<Slot>,
    /// When the sweeper looks next; `None` while it sleeps with nothing to watch.
    planned: Option<Instant>,
    /// The sleeping sweeper, and whether a slot asked it to plan again.
    sweeper: Option<Waker>,
    replan: bool,
}

impl Table {
    fn take(&mut self, deadline: Instant, waker: &Waker) -> usize {
        let i = self.slots.insert(Slot {
            deadline,
            waker: Some(waker.clone()),
            fired: false,
        });
        // Wake the sweeper only when it would otherwise look too late for this deadline.
        if self.planned.is_none_or(|p| deadline + SLACK < p) {
            self.planned = Some(deadline);
            self.replan = true;
            if let Some(w) = self.sweeper.take() {
                w.wake();
            }
        }
        i
    }

    /// Fire every deadline due at `now`; the earliest one still to come.
    fn fire(&mut self, now: Instant, wake: &mut Vec<Waker>) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        for (_, slot) in self.slots.iter_mut() {
            if slot.fired {
                continue;
            }
            if slot.deadline <= now {
                slot.fired = true;
                wake.extend(slot.waker.take());
            } else if next.is_none_or(|n| slot.deadline < n) {
                next = Some(slot.deadline);
            }
        }
        next
    }
}

/// One core's table of deadlines. Core-local: `Rc`, `RefCell`, no atomics.
#[derive(Default)]
pub struct Deadlines(RefCell<Table>);

pin_project_lite::pin_project! {
    /// The future of [`Deadlines::until`] and [`Deadlines::within`]: the operation's output, or
    /// `None` once its deadline has fired. A plain struct rather than an `async fn`, so the
    /// operation is stored once, not once per state (an `async fn` that pins its argument keeps
    /// a copy for each), and moving it moves no more than the operation.
    pub struct Until<'a, F> {
        deadlines: &'a Deadlines,
        deadline: Instant,
        // The slot, taken the first time the operation is pending.
        slot: Option<usize>,
        #[pin]
        fut: F,
    }

    impl<F> PinnedDrop for Until<'_, F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            this.deadlines.release(this.slot);
        }
    }
}

impl<F: Future> Future for Until<'_, F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        // The operation first: one that is ready wins over its deadline.
        if let Poll::Ready(out) = this.fut.poll(cx) {
            this.deadlines.release(this.slot);
            return Poll::Ready(Some(out));
        }
        let mut table = this.deadlines.0.borrow_mut();
        match *this.slot {
            None => *this.slot = Some(table.take(*this.deadline, cx.waker())),
            Some(i) => {
                let slot = &mut table.slots[i];
                if slot.fired {
                    drop(table);
                    this.deadlines.release(this.slot);
                    return Poll::Ready(None);
                }
                if !slot.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    slot.waker = Some(cx.waker().clone());
                }
            }
        }
        Poll::Pending
    }
}

impl Deadlines {
    /// `fut`'s output, or `None` once `deadline` has passed first (then `fut` is dropped with
    /// the returned future, which cancels an I/O operation).
    pub fn until<F: Future>(&self, deadline: Instant, fut: F) -> Until<'_, F> {
        Until {
            deadlines: self,
            deadline,
            slot: None,
            fut,
        }
    }

    /// `fut`'s output, or `None` when it takes longer than `limit`.
    pub fn within<F: Future>(&self, limit: Duration, fut: F) -> Until<'_, F> {
        self.until(Instant::now() + limit, fut)
    }

    /// Operations waiting with a deadline now.
    pub fn waiting(&self) -> usize {
        self.0.borrow().slots.len()
    }

    /// Free the slot an operation holds, if it holds one.
    fn release(&self, slot: &mut Option<usize>) {
        if let Some(i) = slot.take() {
            self.0.borrow_mut().slots.remove(i);
        }
    }

    /// The core's sweeper: fires the deadlines as they pass, sleeping between (on the core's
    /// monoio timer) until the earliest one, or until a slot is taken while nothing is watched.
    /// Runs until `stop` is raised; run it for as long as the core serves requests.
    pub async fn sweep(self: Rc<Self>, stop: Signal) {
        let mut wake = Vec::new();
        loop {
            let now = Instant::now();
            let next = {
                let mut table = self.0.borrow_mut();
                let next = table.fire(now, &mut wake).map(|n| n.max(now + SLACK));
                table.planned = next;
                table.replan = false;
                next
            };
            for w in wake.drain(..) {
                w.wake();
            }
            let replanned = poll_fn(|cx| {
                let mut table = self.0.borrow_mut();
                if std::mem::take(&mut table.replan) {
                    Poll::Ready(())
                } else {
                    table.sweeper = Some(cx.waker().clone());
                    Poll::Pending
                }
            });
            let woken = async {
                match next {
                    Some(at) => {
                        let at = monoio::time::Instant::from_std(at);
                        race(monoio::time::sleep_until(at), replanned).await;
                    }
                    None => replanned.await,
                }
            };
            if let Either::Right(()) = race(woken, stop.wait()).await {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shutdown::block_on_for_tests as block_on;
    use std::pin::pin;

    fn with_sweeper<F: Future>(test: impl FnOnce(Rc<Deadlines>) -> F) -> F::Output {
        block_on(async {
            let deadlines = Rc::new(Deadlines::default());
            let stop = Signal::default();
            let sweeper = monoio::spawn(Rc::clone(&deadlines).sweep(stop.clone()));
            let out = test(Rc::clone(&deadlines)).await;
            stop.set();
            sweeper.await;
            out
        })
    }

    #[test]
    fn a_wait_gives_up_at_its_deadline_and_no_earlier() {
        with_sweeper(|d| async move {
            let started = Instant::now();
            let out = d.within(Duration::from_millis(40), std::future::pending::<()>());
            assert_eq!(out.await, None);
            let took = started.elapsed();
            assert!(took >= Duration::from_millis(40), "fired early: {took:?}");
            assert!(
                took < Duration::from_millis(40) + 20 * SLACK,
                "fired late: {took:?}"
            );
            assert_eq!(d.waiting(), 0, "the slot is free again");
        });
    }

    #[test]
    fn a_ready_operation_wins_and_takes_no_slot() {
        with_sweeper(|d| async move {
            assert_eq!(d.within(Duration::ZERO, async { 7 }).await, Some(7));
            assert_eq!(d.waiting(), 0);
        });
    }

    #[test]
    fn an_operation_that_finishes_in_time_keeps_its_output_and_frees_its_slot() {
        with_sweeper(|d| async move {
            let sleep = monoio::time::sleep(Duration::from_millis(20));
            let out = d.within(Duration::from_secs(5), async move {
                sleep.await;
                "done"
            });
            assert_eq!(out.await, Some("done"));
            assert_eq!(d.waiting(), 0);
        });
    }

    #[test]
    fn an_earlier_deadline_taken_while_the_sweeper_sleeps_long_still_fires_on_time() {
        with_sweeper(|d| async move {
            // The sweeper plans for the long deadline first...
            let long = monoio::spawn({
                let d = Rc::clone(&d);
                async move {
                    d.within(Duration::from_secs(30), std::future::pending::<()>())
                        .await
                }
            });
            monoio::time::sleep(Duration::from_millis(5)).await;
            assert_eq!(d.waiting(), 1);
            // ...and a shorter one taken later must not wait for it.
            let started = Instant::now();
            let short = d.within(Duration::from_millis(30), std::future::pending::<()>());
            assert_eq!(short.await, None);
            assert!(started.elapsed() < Duration::from_secs(2));
            assert_eq!(d.waiting(), 1, "the long wait still holds its slot");
            drop(long);
        });
    }

    #[test]
    fn dropping_a_waiting_operation_frees_its_slot_for_the_next() {
        with_sweeper(|d| async move {
            {
                let mut waiting =
                    pin!(d.within(Duration::from_secs(30), std::future::pending::<()>()));
                let polled = poll_fn(|cx| Poll::Ready(waiting.as_mut().poll(cx).is_pending()));
                assert!(polled.await);
                assert_eq!(d.waiting(), 1);
            }
            assert_eq!(d.waiting(), 0);
            let out = d.within(Duration::from_millis(15), std::future::pending::<()>());
            assert_eq!(out.await, None);
            assert_eq!(
                d.0.borrow().slots.vacant_key(),
                0,
                "the freed slot was reused"
            );
        });
    }
}
