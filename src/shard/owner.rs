//! Owner-core logic: every organization has one owner core (a pure function of its id) that spends
//! its tokens and keeps its dedup window, so no lock is ever taken. A request that lands on another
//! core hops there as a small message and its answer comes back; on the owner nothing is shared.
//!
//! - Sending side ([`Owner::ingest`], [`Owner::query`], [`Owner::rate`]): run here when this core
//!   is the owner, else hop. `Some` is an answer now; `None` means one will come to the slot.
//! - Owner side ([`Owner::serve`]): admit an event (token, dedup window, store queue), read the
//!   bucket for a query's headers and hand the query to the store.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::sync::Arc;
use std::task::{Poll, Waker};

use super::mesh::{owner_core, Hop, Mesh};
use super::state::{Admit, Shard};
use crate::auth::OrgInfo;
use crate::config::AckMode;
use crate::flow::answer::{Completion, Outcome, RateSnapshot, Refusal, ReplyTo};
use crate::flow::answer::{IngestOutcome, Ingested};
use crate::flow::event::{DedupKey, NewEvent};
use crate::flow::job::{Query, StoreJob, WriteJob};
use crate::flow::sink::StoreQueues;
use crate::ids::{CoreId, EventId, OrgId};
use crate::metrics::CoreMetrics;
use crate::shutdown::{race, Either, Signal};

/// Where a rate read went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateRead {
    /// This core owns the organization: here it is.
    Now(RateSnapshot),
    /// Hopped to the owner: the answer comes to the slot.
    Sent,
    /// The owner's queue is full: no headers.
    Refused,
}

/// One core's owner role: its shard of organizations and the queues it hands work to.
pub struct Owner {
    core: CoreId,
    shard: RefCell<Shard>,
    store: StoreQueues,
    mesh: Mesh,
    metrics: Arc<CoreMetrics>,
    outbox: Outbox,
}

/// Hops waiting to leave this core, per owner core. The requests of one turn of the core's loop
/// queue theirs here, and [`Owner::send_hops`] sends each core's in one message: one cross-thread
/// wake-up per core and turn, not one per request.
#[derive(Default)]
struct Outbox {
    waiting: RefCell<Vec<Vec<Hop>>>,
    /// Whether the sender has been woken for what is waiting.
    due: Cell<bool>,
    sender: RefCell<Option<Waker>>,
}

impl Owner {
    /// The owner role of `core`, remembering up to `dedup_entries` dedup ids.
    pub fn new(
        core: CoreId,
        dedup_entries: usize,
        store: StoreQueues,
        mesh: Mesh,
        metrics: Arc<CoreMetrics>,
    ) -> Owner {
        Owner {
            core,
            shard: RefCell::new(Shard::new(core, dedup_entries)),
            store,
            outbox: Outbox {
                waiting: RefCell::new((0..mesh.cores()).map(|_| Vec::new()).collect()),
                ..Outbox::default()
            },
            mesh,
            metrics,
        }
    }

    fn owner(&self, org: &OrgInfo) -> CoreId {
        owner_core(&org.id, self.mesh.cores())
    }

    /// Queue `hop` for `owner`; it leaves with the rest of this turn's hops ([`Owner::send_hops`]).
    fn hop(&self, owner: CoreId, hop: Hop) -> Result<(), Refusal> {
        self.metrics.hop();
        self.mesh
            .reserve_hop(owner)
            .map_err(|_| Refusal::Overloaded("owner core queue full"))?;
        self.outbox.waiting.borrow_mut()[owner.0].push(hop);
        if !self.outbox.due.replace(true) {
            if let Some(w) = self.outbox.sender.borrow_mut().take() {
                w.wake();
            }
        }
        Ok(())
    }

    /// The core's hop sender: once a request queues a hop, it runs after the tasks already woken
    /// in this turn (monoio runs them in order) and sends every core's hops in one message each.
    /// Until `stop` is raised; then whatever is still queued goes.
    pub async fn send_hops(&self, stop: Signal) {
        loop {
            let due = poll_fn(|cx| {
                if self.outbox.due.get() {
                    Poll::Ready(())
                } else {
                    *self.outbox.sender.borrow_mut() = Some(cx.waker().clone());
                    Poll::Pending
                }
            });
            let stopped = matches!(race(due, stop.wait()).await, Either::Right(()));
            self.flush_hops();
            if stopped {
                return;
            }
        }
    }

    fn flush_hops(&self) {
        self.outbox.due.set(false);
        for core in 0..self.mesh.cores() {
            let hops = std::mem::take(&mut self.outbox.waiting.borrow_mut()[core]);
            if hops.is_empty() {
                continue;
            }
            if let Err(back) = self.mesh.send_hops(CoreId(core), hops) {
                // That core has exited: each request is answered 503 here.
                for hop in back {
                    self.refuse(hop);
                }
            }
        }
    }

    /// Ingest `event` through its organization's owner core.
    pub fn ingest(&self, org: OrgInfo, event: NewEvent, reply: ReplyTo) -> Option<IngestOutcome> {
        let owner = self.owner(&org);
        if owner == self.core {
            return self.admit(org, event, reply);
        }
        match self.hop(owner, Hop::Ingest { org, event, reply }) {
            Ok(()) => None,
            Err(r) => Some(IngestOutcome {
                result: Ingested::Refused(r),
                rate: None,
            }),
        }
    }

    /// Ingest the valid events of one batch request through the organization's owner core; every
    /// event's answer comes to its own slot.
    pub fn ingest_batch(&self, org: OrgInfo, tokens: u32, events: Vec<(NewEvent, ReplyTo)>) {
        let owner = self.owner(&org);
        if owner == self.core {
            return self.admit_batch(org, tokens, events);
        }
        let replies: Vec<ReplyTo> = events.iter().map(|(_, r)| *r).collect();
        let hop = Hop::IngestBatch {
            org,
            tokens,
            events,
        };
        if let Err(refusal) = self.hop(owner, hop) {
            self.answer_all(replies.into_iter(), Ingested::Refused(refusal), None);
        }
    }

    /// Run `query` in the store through its organization's owner core (which adds the headers).
    pub fn query(
        &self,
        org: OrgInfo,
        query: Query,
        reply: ReplyTo,
    ) -> Option<(Refusal, Option<RateSnapshot>)> {
        let owner = self.owner(&org);
        if owner == self.core {
            return self
                .forward(org, query, reply)
                .map(|(r, rate)| (r, Some(rate)));
        }
        match self.hop(owner, Hop::Query { org, query, reply }) {
            Ok(()) => None,
            Err(r) => Some((r, None)),
        }
    }

    /// The organization's bucket, for the headers of an answer that never reached the owner.
    pub fn rate(&self, org: OrgInfo, reply: ReplyTo) -> RateRead {
        let owner = self.owner(&org);
        if owner == self.core {
            return RateRead::Now(self.shard.borrow_mut().snapshot(&org));
        }
        match self.hop(owner, Hop::Peek { org, reply }) {
            Ok(()) => RateRead::Sent,
            Err(_) => RateRead::Refused,
        }
    }

    /// Owner side of a hop from another core: answer it now, or let the store answer it.
    pub fn serve(&self, hop: Hop) {
        match hop {
            Hop::Ingest { org, event, reply } => {
                if let Some(outcome) = self.admit(org, event, reply) {
                    self.mesh.complete_one(reply, Outcome::Ingested(outcome));
                }
            }
            Hop::IngestBatch {
                org,
                tokens,
                events,
            } => self.admit_batch(org, tokens, events),
            Hop::Query { org, query, reply } => {
                if let Some((refusal, rate)) = self.forward(org, query, reply) {
                    self.mesh.complete_one(
                        reply,
                        Outcome::Answered {
                            answer: Err(refusal),
                            rate: Some(rate),
                        },
                    );
                }
            }
            Hop::Peek { org, reply } => {
                let rate = self.shard.borrow_mut().snapshot(&org);
                self.mesh.complete_one(reply, Outcome::Rate(rate));
            }
        }
    }

    /// A hop that reached this core after it stopped: answered 503, so no request on another core
    /// waits for a core that has gone.
    pub fn refuse(&self, hop: Hop) {
        let (reply, outcome) = match hop {
            Hop::IngestBatch { events, .. } => {
                let replies = events.into_iter().map(|(_, r)| r);
                return self.answer_all(replies, Ingested::Refused(Refusal::Unavailable), None);
            }
            Hop::Ingest { reply, .. } => (
                reply,
                Outcome::Ingested(IngestOutcome {
                    result: Ingested::Refused(Refusal::Unavailable),
                    rate: None,
                }),
            ),
            Hop::Query { reply, .. } | Hop::Peek { reply, .. } => (
                reply,
                Outcome::Answered {
                    answer: Err(Refusal::Unavailable),
                    rate: None,
                },
            ),
        };
        self.mesh.complete_one(reply, outcome);
    }

    /// The store settled dedup keys this core reserved.
    pub fn settle(&self, keys: Vec<(DedupKey, Option<EventId>)>) {
        let mut shard = self.shard.borrow_mut();
        for (key, outcome) in keys {
            shard.settle(key, outcome);
        }
    }

    /// Forget the recent-dedup window: the database may have been replaced by a copy without the
    /// events it names (a restore, a failover that lost commits). Keys in flight settle as before.
    pub fn forget_dedup(&self) {
        self.shard.borrow_mut().forget_dedup();
    }

    /// Report whatever this core's organizations spent since the last report, unless one is on
    /// its way (the core's tick, every `RATE_REPORT_EVERY`) or `last` (the core is stopping:
    /// whatever is left goes); the balances come back to [`Owner::rate_reported`].
    pub fn report_rates(&self, last: bool) {
        let Some(spent) = self.shard.borrow_mut().take_rate_report(last) else {
            return;
        };
        let job = StoreJob::RateReport {
            core: self.core,
            spent,
        };
        if self.store.submit(job).is_err() && !last {
            // The query queue is full or closed: the spend stays and goes with the next report.
            self.rate_reported(None);
        }
    }

    /// The cluster's balances after this core's report (`None`: it failed).
    pub fn rate_reported(&self, balances: Option<Vec<(OrgId, f64)>>) {
        let failed = balances.is_none();
        self.shard.borrow_mut().rate_reported(balances);
        if !failed {
            self.report_urgent();
        }
    }

    /// Report at once, not at the next tick, when a bucket's spend is due (a slice spent, or an
    /// organization new here) and no report is on its way: the nodes' views of a bucket then
    /// differ by at most what they admit in one round trip to the database.
    fn report_urgent(&self) {
        if self.shard.borrow().report_urgent() {
            self.report_rates(false);
        }
    }

    /// Spend a token, check the dedup window, queue the event. `Some` is an answer now; `None`
    /// means the store will answer `reply` after COMMIT.
    fn admit(&self, org: OrgInfo, event: NewEvent, reply: ReplyTo) -> Option<IngestOutcome> {
        debug_assert_eq!(self.owner(&org), self.core, "only the owner admits");
        let decision = self
            .shard
            .borrow_mut()
            .admit(&org, event.dedup_id.as_deref());
        self.report_urgent();
        let (result, rate) = match decision {
            Admit::Limited {
                rate,
                retry_after_s,
            } => (
                Ingested::Refused(Refusal::RateLimited {
                    limit: org.limit,
                    retry_after_s,
                }),
                rate,
            ),
            Admit::Duplicate { rate, event_id } => (Ingested::Duplicate(event_id), rate),
            Admit::Go { rate, dedup_key } => {
                let fast = self.store.ack_mode() == AckMode::Fast;
                let job = WriteJob {
                    event,
                    reply: (!fast).then_some(reply),
                    rate: Some(rate),
                    dedup: dedup_key.map(|k| (k, self.core)),
                };
                match self.store.write(job) {
                    Ok(()) if fast => (Ingested::Queued, rate),
                    Ok(()) => return None,
                    Err(refusal) => {
                        let mut shard = self.shard.borrow_mut();
                        shard.undo(&org, dedup_key);
                        (Ingested::Refused(refusal), shard.snapshot(&org))
                    }
                }
            }
        };
        Some(IngestOutcome {
            result,
            rate: Some(rate),
        })
    }

    /// A batch request's events: spend `tokens` (all or none: 429 for every event otherwise),
    /// answer the dedup ids known committed at once (409), queue the rest together (all or none:
    /// 503 for every event otherwise, with the tokens given back). Every event's slot gets exactly
    /// one answer, now or from the store after COMMIT.
    fn admit_batch(&self, org: OrgInfo, tokens: u32, events: Vec<(NewEvent, ReplyTo)>) {
        debug_assert_eq!(self.owner(&org), self.core, "only the owner admits");
        let mut answers: Vec<(ReplyTo, Ingested)> = Vec::new();
        let mut shard = self.shard.borrow_mut();
        let rate = match shard.take(&org, tokens) {
            Ok(rate) => rate,
            Err((rate, retry_after_s)) => {
                drop(shard);
                let refusal = Refusal::RateLimited {
                    limit: org.limit,
                    retry_after_s,
                };
                let replies = events.into_iter().map(|(_, r)| r);
                return self.answer_all(replies, Ingested::Refused(refusal), Some(rate));
            }
        };
        let fast = self.store.ack_mode() == AckMode::Fast;
        let mut jobs = Vec::with_capacity(events.len());
        let mut keys = Vec::new();
        for (event, reply) in events {
            match shard.reserve_dedup(&org, event.dedup_id.as_deref()) {
                Err(first) => answers.push((reply, Ingested::Duplicate(first))),
                Ok(key) => {
                    keys.extend(key);
                    if fast {
                        answers.push((reply, Ingested::Queued));
                    }
                    jobs.push(WriteJob {
                        event,
                        reply: (!fast).then_some(reply),
                        rate: Some(rate),
                        dedup: key.map(|k| (k, self.core)),
                    });
                }
            }
        }
        let replies: Vec<ReplyTo> = jobs.iter().filter_map(|j| j.reply).collect();
        if let Err(refusal) = self.store.write_many(jobs) {
            shard.undo_batch(&org, tokens, &keys);
            let rate = shard.snapshot(&org);
            drop(shard);
            // Nothing of the batch was queued: every event is refused, even those answered 409.
            let all = answers.into_iter().map(|(r, _)| r).chain(replies);
            return self.answer_all(all, Ingested::Refused(refusal), Some(rate));
        }
        drop(shard);
        self.report_urgent();
        let mut by_core: Vec<(CoreId, Vec<Completion>)> = Vec::new();
        for (reply, result) in answers {
            push_completion(&mut by_core, reply, result, Some(rate));
        }
        for (core, completions) in by_core {
            self.mesh.complete(core, completions);
        }
    }

    /// The same answer for many waiting events, one message per core.
    fn answer_all(
        &self,
        replies: impl Iterator<Item = ReplyTo>,
        result: Ingested,
        rate: Option<RateSnapshot>,
    ) {
        let mut by_core: Vec<(CoreId, Vec<Completion>)> = Vec::new();
        for reply in replies {
            push_completion(&mut by_core, reply, result.clone(), rate);
        }
        for (core, completions) in by_core {
            self.mesh.complete(core, completions);
        }
    }

    /// Read the bucket for the headers, hand the query to the store. `Some` when it was refused.
    fn forward(
        &self,
        org: OrgInfo,
        query: Query,
        reply: ReplyTo,
    ) -> Option<(Refusal, RateSnapshot)> {
        let rate = self.shard.borrow_mut().snapshot(&org);
        match self.store.submit(StoreJob::Query {
            org,
            query,
            rate,
            reply,
        }) {
            Ok(()) => None,
            Err(refusal) => Some((refusal, rate)),
        }
    }
}

/// Add one answer to the completions grouped by the core that waits for it.
fn push_completion(
    by_core: &mut Vec<(CoreId, Vec<Completion>)>,
    reply: ReplyTo,
    result: Ingested,
    rate: Option<RateSnapshot>,
) {
    let completion = Completion {
        slot: reply.slot,
        outcome: Outcome::Ingested(IngestOutcome { result, rate }),
    };
    match by_core.iter_mut().find(|(core, _)| *core == reply.core) {
        Some((_, list)) => list.push(completion),
        None => by_core.push((reply.core, vec![completion])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::flow::answer::SlotToken;
    use crate::flow::sink::{store_queues, JobDoor};
    use crate::metrics::Metrics;
    use crate::shard::mesh::CoreMsg;
    use crate::shutdown::block_on_for_tests as block_on;
    use std::rc::Rc;
    use uuid::Uuid;

    /// An organization whose owner is `core` of 2.
    fn org_on(core: usize) -> OrgInfo {
        (0u128..)
            .map(|i| {
                OrgInfo::test(OrgId(Uuid::from_u128(
                    i.wrapping_mul(0x9e37_79b9_7f4a_7c15),
                )))
            })
            .find(|o| owner_core(&o.id, 2) == CoreId(core))
            .unwrap()
    }

    #[test]
    fn the_hops_of_one_turn_leave_in_one_message_and_a_gone_core_refuses_them() {
        let no_args: [(String, String); 1] = [(
            "DATABASE_URL".to_string(),
            "postgres://u@localhost/db".to_string(),
        )];
        let (_, config) = Config::from_args_and_env(Vec::<String>::new(), no_args).unwrap();
        /// No store behind it.
        struct Closed;
        impl JobDoor for Closed {
            fn submit(&self, _: StoreJob) -> Result<(), Refusal> {
                Err(Refusal::Unavailable)
            }
        }
        let (store, _inbox) = store_queues(&config, std::sync::Arc::new(Closed));
        let (mesh, mut boxes) = Mesh::new(2, 16);
        let metrics = Metrics::new(&[("GET", "/")], 2).core(0);
        let owner = Rc::new(Owner::new(CoreId(0), 16, store, mesh, metrics));
        let reply = |slot| ReplyTo {
            core: CoreId(0),
            slot: SlotToken(slot),
        };
        block_on(async {
            let stop = Signal::default();
            let sender = monoio::spawn({
                let (owner, stop) = (Rc::clone(&owner), stop.clone());
                async move { owner.send_hops(stop).await }
            });
            let elsewhere = org_on(1);
            for slot in 0..3 {
                assert!(owner
                    .query(elsewhere, Query::KeyInfo, reply(slot))
                    .is_none());
            }
            assert!(
                boxes[1].try_recv().is_none(),
                "nothing leaves before the turn ends"
            );
            monoio::time::sleep(std::time::Duration::from_millis(1)).await;
            match boxes[1].try_recv() {
                Some(CoreMsg::Hops(hops)) => assert_eq!(hops.len(), 3),
                other => panic!("one message with the three hops, got {other:?}"),
            }
            assert!(boxes[1].try_recv().is_none());

            // Core 1 exits: its hops come back and each request is answered 503 on this core.
            let gone = boxes.pop().unwrap();
            drop(gone);
            assert!(owner.query(elsewhere, Query::KeyInfo, reply(7)).is_none());
            monoio::time::sleep(std::time::Duration::from_millis(1)).await;
            match boxes[0].try_recv() {
                Some(CoreMsg::Complete(done)) => {
                    assert_eq!(done.len(), 1);
                    assert_eq!(done[0].slot, SlotToken(7));
                    assert!(matches!(
                        done[0].outcome,
                        Outcome::Answered {
                            answer: Err(Refusal::Unavailable),
                            ..
                        }
                    ));
                }
                other => panic!("a refusal for the request, got {other:?}"),
            }
            stop.set();
            sender.await;
        });
    }
}
