//! The mesh: how ingress cores and the pools talk. It is the [`CoreLink`] the pools are given.
//!
//! Every core has one mailbox (a channel any thread can send to). Its single reader, the core's
//! mailbox task, handles hops from other cores and completions from the pools, so a burst of
//! answers costs one cross-thread wake-up, not one per request.
//!
//! A request that waits for another thread registers a slot in its core's [`Waiters`] and sends the
//! slot's token along ([`ReplyTo`]); whoever finishes the work sends a [`Completion`] back to that
//! core. Hops between cores are bounded: past `hop_queue_max` messages waiting at one core the
//! sender gets its message back and answers 503.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use tokio::sync::mpsc;

use crate::auth::OrgInfo;
use crate::flow::answer::{Completion, Outcome, ReplyTo, SlotToken};
use crate::flow::event::{DedupKey, NewEvent};
use crate::flow::job::Query;
use crate::flow::sink::{CoreLink, Pending};
use crate::ids::{CoreId, EventId, OrgId};

/// Work sent to an organization's owner core.
#[derive(Debug)]
pub enum Hop {
    /// Spend a token, check the dedup window, hand the event to the store.
    Ingest {
        /// The organization as authenticated.
        org: OrgInfo,
        /// The validated event.
        event: NewEvent,
        /// Where the answer goes.
        reply: ReplyTo,
    },
    /// Spend a token per item of a batch request (all or none), check each event's dedup id,
    /// hand the events to the store together.
    IngestBatch {
        /// The organization as authenticated.
        org: OrgInfo,
        /// Tokens to spend: one per item of the request, valid or not.
        tokens: u32,
        /// The valid events, each with where its answer goes.
        events: Vec<(NewEvent, ReplyTo)>,
    },
    /// Read the bucket for the rate-limit headers, then hand the query to the store.
    Query {
        /// The organization as authenticated.
        org: OrgInfo,
        /// The query.
        query: Query,
        /// Where the answer goes.
        reply: ReplyTo,
    },
    /// Read the bucket for the rate-limit headers of an answer given before any hop.
    Peek {
        /// The organization as authenticated.
        org: OrgInfo,
        /// Where the answer goes.
        reply: ReplyTo,
    },
}

/// A message to one core's mailbox.
#[derive(Debug)]
pub enum CoreMsg {
    /// Work for the organizations this core owns: what one core's turn sent here, in order.
    Hops(Vec<Hop>),
    /// Answers for requests waiting on this core.
    Complete(Vec<Completion>),
    /// The store settled dedup keys this core reserved: committed as the event, or not written.
    Settled(Vec<(DedupKey, Option<EventId>)>),
    /// An organization's key or webhook changed (`None`: forget every cached key and the
    /// recent-dedup window, as when the change listener lost the database, which may come back as
    /// another: a restore, a failover). `done` gets one message once this core's caches no
    /// longer hold the old state.
    OrgChanged {
        /// The organization, or all.
        org: Option<OrgId>,
        /// Acknowledgement channel.
        done: Option<mpsc::UnboundedSender<()>>,
    },
    /// The cluster's rate-limit balances after this core's report (`None`: it failed).
    RateReported(Option<Vec<(OrgId, f64)>>),
    /// Stop accepting, finish in-flight requests, close.
    Shutdown,
    /// Panic on this core's thread: tests use it to show what a dead core does to the rest.
    #[cfg(debug_assertions)]
    #[doc(hidden)]
    CrashForTests,
}

/// A hop could not be queued at its owner core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HopRefused;

struct Link {
    tx: mpsc::UnboundedSender<CoreMsg>,
    hops_waiting: AtomicUsize,
}

/// Handles to every core's mailbox; cheap to clone, shared by cores and pools.
#[derive(Clone)]
pub struct Mesh {
    links: Arc<[Link]>,
    hop_queue_max: usize,
}

/// The receiving end of one core's mailbox.
pub struct Mailbox {
    rx: mpsc::UnboundedReceiver<CoreMsg>,
    mesh: Mesh,
    core: CoreId,
}

impl Mesh {
    /// A mesh of `cores` mailboxes.
    pub fn new(cores: usize, hop_queue_max: usize) -> (Mesh, Vec<Mailbox>) {
        let mut links = Vec::with_capacity(cores);
        let mut rxs = Vec::with_capacity(cores);
        for _ in 0..cores {
            let (tx, rx) = mpsc::unbounded_channel();
            links.push(Link {
                tx,
                hops_waiting: AtomicUsize::new(0),
            });
            rxs.push(rx);
        }
        let mesh = Mesh {
            links: links.into(),
            hop_queue_max,
        };
        let boxes = rxs
            .into_iter()
            .enumerate()
            .map(|(i, rx)| Mailbox {
                rx,
                mesh: mesh.clone(),
                core: CoreId(i),
            })
            .collect();
        (mesh, boxes)
    }

    /// How many cores there are.
    pub fn cores(&self) -> usize {
        self.links.len()
    }

    /// Count one hop to `core` against its bound before it is queued for [`Mesh::send_hops`];
    /// refused when that core already has `hop_queue_max` waiting.
    pub fn reserve_hop(&self, core: CoreId) -> Result<(), HopRefused> {
        let link = &self.links[core.0];
        if link.hops_waiting.fetch_add(1, Ordering::Relaxed) >= self.hop_queue_max {
            link.hops_waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(HopRefused);
        }
        Ok(())
    }

    /// Send hops reserved with [`Mesh::reserve_hop`] to `core` in one message (one wake-up);
    /// given back when that core has exited.
    pub fn send_hops(&self, core: CoreId, hops: Vec<Hop>) -> Result<(), Vec<Hop>> {
        let link = &self.links[core.0];
        let n = hops.len();
        link.tx.send(CoreMsg::Hops(hops)).map_err(|e| {
            link.hops_waiting.fetch_sub(n, Ordering::Relaxed);
            match e.0 {
                CoreMsg::Hops(hops) => hops,
                _ => unreachable!("the message sent comes back"),
            }
        })
    }

    /// Deliver answers to `core`. Answers are never refused: each belongs to a request that is
    /// already counted against a connection, so their number is bounded by the connections.
    pub fn complete(&self, core: CoreId, completions: Vec<Completion>) {
        if !completions.is_empty() {
            // A closed mailbox means the core has exited; its connections are gone.
            let _ = self.links[core.0].tx.send(CoreMsg::Complete(completions));
        }
    }

    /// Deliver one answer.
    pub fn complete_one(&self, to: ReplyTo, outcome: Outcome) {
        self.complete(
            to.core,
            vec![Completion {
                slot: to.slot,
                outcome,
            }],
        );
    }

    /// Tell every core that `org` changed and wait until each has dropped its cached state.
    pub async fn org_changed(&self, org: Option<OrgId>) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut expected = 0;
        for link in self.links.iter() {
            if link
                .tx
                .send(CoreMsg::OrgChanged {
                    org,
                    done: Some(tx.clone()),
                })
                .is_ok()
            {
                expected += 1;
            }
        }
        drop(tx);
        for _ in 0..expected {
            if rx.recv().await.is_none() {
                // A core exited mid-way: its caches are gone with it.
                break;
            }
        }
    }

    /// Tell every core that `org` changed, without waiting for them.
    pub fn notify_org_changed(&self, org: Option<OrgId>) {
        for link in self.links.iter() {
            let _ = link.tx.send(CoreMsg::OrgChanged { org, done: None });
        }
    }

    /// Make `core` panic (tests only).
    #[cfg(debug_assertions)]
    #[doc(hidden)]
    pub fn crash_for_tests(&self, core: CoreId) {
        let _ = self.links[core.0].tx.send(CoreMsg::CrashForTests);
    }

    /// Tell every core to shut down.
    pub fn shutdown(&self) {
        for link in self.links.iter() {
            let _ = link.tx.send(CoreMsg::Shutdown);
        }
    }
}

impl CoreLink for Mesh {
    fn complete(&self, core: CoreId, completions: Vec<Completion>) {
        Mesh::complete(self, core, completions);
    }

    fn settle(&self, core: CoreId, keys: Vec<(DedupKey, Option<EventId>)>) {
        let _ = self.links[core.0].tx.send(CoreMsg::Settled(keys));
    }

    fn org_changed(&self, org: Option<OrgId>) -> Pending<'_> {
        Box::pin(Mesh::org_changed(self, org))
    }

    fn rate_reported(&self, core: CoreId, balances: Option<Vec<(OrgId, f64)>>) {
        let _ = self.links[core.0].tx.send(CoreMsg::RateReported(balances));
    }

    fn notify_org_changed(&self, org: Option<OrgId>) {
        Mesh::notify_org_changed(self, org);
    }
}

impl Mailbox {
    /// The next message, or `None` once every sender is gone.
    pub async fn recv(&mut self) -> Option<CoreMsg> {
        let msg = self.rx.recv().await?;
        Some(self.account(msg))
    }

    /// Refuse further messages; those already queued can still be taken.
    pub fn close(&mut self) {
        self.rx.close();
    }

    /// The next message if one is waiting.
    pub fn try_recv(&mut self) -> Option<CoreMsg> {
        self.rx.try_recv().ok().map(|m| self.account(m))
    }

    fn account(&self, msg: CoreMsg) -> CoreMsg {
        if let CoreMsg::Hops(hops) = &msg {
            self.mesh.links[self.core.0]
                .hops_waiting
                .fetch_sub(hops.len(), Ordering::Relaxed);
        }
        msg
    }
}

/// The owner core of an organization: a pure function of its id. The low 64 bits of a UUIDv7
/// are random, so organizations spread evenly.
pub fn owner_core(org: &OrgId, cores: usize) -> CoreId {
    let b = org.as_bytes();
    let low = u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]);
    // Multiply-shift maps the 64-bit value onto 0..cores without a division.
    CoreId(((u128::from(low.wrapping_mul(0x9e37_79b9_7f4a_7c15)) * cores as u128) >> 64) as usize)
}

enum SlotState {
    Free,
    Waiting(Option<Waker>),
    Done(Outcome),
}

struct SlotEntry {
    generation: u32,
    state: SlotState,
}

/// The requests on one core that wait for an answer from another thread. Core-local: no locks.
#[derive(Default)]
pub struct Waiters {
    slots: RefCell<(Vec<SlotEntry>, Vec<u32>)>,
}

impl Waiters {
    /// Reserve a slot; await the returned [`Wait`] for the answer.
    pub fn register(self: &Rc<Self>) -> Wait {
        let mut guard = self.slots.borrow_mut();
        let (slots, free) = &mut *guard;
        let index = match free.pop() {
            Some(i) => i,
            None => {
                slots.push(SlotEntry {
                    generation: 0,
                    state: SlotState::Free,
                });
                (slots.len() - 1) as u32
            }
        };
        let entry = &mut slots[index as usize];
        entry.generation = entry.generation.wrapping_add(1);
        entry.state = SlotState::Waiting(None);
        let token = SlotToken((u64::from(entry.generation) << 32) | u64::from(index));
        Wait {
            waiters: Rc::clone(self),
            token,
            done: false,
        }
    }

    /// Hand `outcome` to the request waiting on `token`. A stale token (its request gave up) is
    /// ignored.
    pub fn complete(&self, token: SlotToken, outcome: Outcome) {
        let waker = {
            let mut guard = self.slots.borrow_mut();
            let index = (token.0 & 0xffff_ffff) as usize;
            let Some(entry) = guard.0.get_mut(index) else {
                return;
            };
            if u64::from(entry.generation) != token.0 >> 32 {
                return;
            }
            match std::mem::replace(&mut entry.state, SlotState::Done(outcome)) {
                SlotState::Waiting(w) => w,
                other => {
                    entry.state = other;
                    return;
                }
            }
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Requests waiting now.
    pub fn waiting(&self) -> usize {
        let guard = self.slots.borrow();
        guard.0.len() - guard.1.len()
    }

    fn release(&self, token: SlotToken) {
        let mut guard = self.slots.borrow_mut();
        let index = (token.0 & 0xffff_ffff) as u32;
        let (slots, free) = &mut *guard;
        if let Some(entry) = slots.get_mut(index as usize) {
            if u64::from(entry.generation) == token.0 >> 32 {
                entry.state = SlotState::Free;
                free.push(index);
            }
        }
    }
}

/// A reserved slot; resolves to the answer sent to its token. Dropping it frees the slot.
pub struct Wait {
    waiters: Rc<Waiters>,
    token: SlotToken,
    done: bool,
}

impl Wait {
    /// The token to send along with the work.
    pub fn token(&self) -> SlotToken {
        self.token
    }

    /// The address of this slot on `core`.
    pub fn reply_to(&self, core: CoreId) -> ReplyTo {
        ReplyTo {
            core,
            slot: self.token,
        }
    }
}

impl Future for Wait {
    type Output = Outcome;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        let ready = {
            let mut guard = self.waiters.slots.borrow_mut();
            let index = (self.token.0 & 0xffff_ffff) as usize;
            let entry = &mut guard.0[index];
            match std::mem::replace(&mut entry.state, SlotState::Free) {
                SlotState::Done(outcome) => Some(outcome),
                SlotState::Waiting(_) => {
                    entry.state = SlotState::Waiting(Some(cx.waker().clone()));
                    None
                }
                SlotState::Free => unreachable!("a live Wait owns its slot"),
            }
        };
        match ready {
            Some(outcome) => {
                self.done = true;
                self.waiters.release(self.token);
                Poll::Ready(outcome)
            }
            None => Poll::Pending,
        }
    }
}

impl Drop for Wait {
    fn drop(&mut self) {
        if !self.done {
            self.waiters.release(self.token);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deadline::Deadlines;
    use crate::flow::answer::Refusal;
    use crate::shutdown::block_on_for_tests as block_on;
    use uuid::Uuid;

    #[test]
    fn a_wait_gives_up_at_its_deadline_and_a_late_answer_is_ignored() {
        block_on(async {
            let deadlines = Rc::new(Deadlines::default());
            let stop = crate::shutdown::Signal::default();
            monoio::spawn(Rc::clone(&deadlines).sweep(stop.clone()));
            let w = Rc::new(Waiters::default());
            let lost = w.register();
            let token = lost.token();
            let started = std::time::Instant::now();
            assert!(deadlines
                .within(std::time::Duration::from_millis(30), lost)
                .await
                .is_none());
            assert!(started.elapsed() >= std::time::Duration::from_millis(30));
            assert_eq!(w.waiting(), 0, "the slot is free again");
            w.complete(
                token,
                Outcome::Rate(crate::flow::answer::RateSnapshot {
                    limit: 1,
                    remaining: 1,
                    reset_s: 0,
                }),
            );
            let answered = w.register();
            w.complete(answered.token(), Outcome::Auth(Err(Refusal::Internal)));
            assert!(deadlines
                .within(std::time::Duration::from_secs(5), answered)
                .await
                .is_some());
            stop.set();
        });
    }

    #[test]
    fn owner_is_a_pure_function_spreading_orgs() {
        let mut counts = [0usize; 4];
        for i in 0..4000u128 {
            let org = OrgId(Uuid::from_u128(
                i.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835),
            ));
            let c = owner_core(&org, 4);
            assert_eq!(c, owner_core(&org, 4));
            counts[c.0] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "{counts:?}");
        }
        assert_eq!(owner_core(&OrgId(Uuid::from_u128(5)), 1), CoreId(0));
    }

    #[test]
    fn completion_wakes_its_waiter_and_stale_tokens_are_ignored() {
        block_on(async {
            let w = Rc::new(Waiters::default());
            let first = w.register();
            let stale = first.token();
            drop(first);
            let wait = w.register();
            assert_ne!(wait.token(), stale, "a reused slot gets a new generation");
            w.complete(stale, Outcome::Auth(Err(Refusal::Internal)));
            w.complete(wait.token(), Outcome::Auth(Err(Refusal::NotFound("x"))));
            match wait.await {
                Outcome::Auth(Err(Refusal::NotFound("x"))) => {}
                other => panic!("{other:?}"),
            }
            assert_eq!(w.waiting(), 0);
        });
    }

    #[test]
    fn hops_are_bounded_per_core() {
        let (mesh, mut boxes) = Mesh::new(2, 2);
        let hop = || Hop::Query {
            org: OrgInfo::test(OrgId(Uuid::nil())),
            query: Query::KeyInfo,
            reply: ReplyTo {
                core: CoreId(0),
                slot: SlotToken(0),
            },
        };
        assert!(mesh.reserve_hop(CoreId(1)).is_ok());
        assert!(mesh.reserve_hop(CoreId(1)).is_ok());
        assert!(
            mesh.reserve_hop(CoreId(1)).is_err(),
            "the third waits over the bound"
        );
        assert!(
            mesh.reserve_hop(CoreId(0)).is_ok(),
            "other cores are not affected"
        );
        assert!(mesh.send_hops(CoreId(1), vec![hop(), hop()]).is_ok());
        assert!(
            mesh.reserve_hop(CoreId(1)).is_err(),
            "sent and not yet read, they still count"
        );
        assert!(matches!(boxes[1].try_recv(), Some(CoreMsg::Hops(h)) if h.len() == 2));
        assert!(
            mesh.reserve_hop(CoreId(1)).is_ok(),
            "reading them frees their places"
        );
        drop(boxes);
        assert_eq!(
            mesh.send_hops(CoreId(1), vec![hop()]).map_err(|h| h.len()),
            Err(1),
            "a core that has exited gives its hops back"
        );
    }
}
