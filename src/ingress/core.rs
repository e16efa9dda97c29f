//! One ingress core's context, its mailbox, and the waits of its requests.
//!
//! A request that needs another thread (the owner core, the store) registers a slot in the core's
//! table of waiting requests, sends the slot's address with the work, and awaits the answer, a
//! value that its handler renders. The mailbox task takes hops for the organizations this core
//! owns, answers for its waiting requests, settled dedup keys and cache invalidations, a burst in
//! one go after one wake-up.

use std::cell::{Cell, RefCell};
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use super::node::{BodyBudget, Liveness};
use super::response::DateCache;
use crate::auth::flight::{Flight, Flights};
use crate::auth::{ApiKey, Cached, KeyCache, KeyHash, OrgInfo};
use crate::config::{Config, VERIFY_RACE_TRIES};
use crate::deadline::Deadlines;
use crate::error::ApiError;
use crate::flow::answer::{Answer, Outcome, RateSnapshot, Refusal, ReplyTo};
use crate::flow::answer::{IngestOutcome, Ingested};
use crate::flow::event::NewEvent;
use crate::flow::job::{Query, StoreJob};
use crate::flow::sink::StoreQueues;
use crate::ids::CoreId;
use crate::json;
use crate::metrics::{CoreMetrics, Metrics};
use crate::reply::Reply;
use crate::shard::mesh::{CoreMsg, Mailbox, Mesh, Wait, Waiters};
use crate::shard::owner::{Owner, RateRead};
use crate::shutdown::{race, Either, Signal};

/// Everything one core owns. Lives in an `Rc` on that core's thread.
pub struct CoreCtx {
    /// This core.
    pub core: CoreId,
    /// The configuration.
    pub config: Arc<Config>,
    /// Mailboxes of every core.
    pub mesh: Mesh,
    /// The store's queues.
    pub store: StoreQueues,
    /// This core's owner role: the organizations it owns.
    pub owner: Owner,
    /// Verified keys.
    pub keys: RefCell<KeyCache>,
    /// Keys being verified right now on this core.
    pub flights: Flights<Result<OrgInfo, Refusal>>,
    /// Requests waiting for other threads.
    pub waiters: Rc<Waiters>,
    /// The deadlines of this core's reads, writes and waits (swept by one task).
    pub deadlines: Rc<Deadlines>,
    /// Reused JSON parse buffers.
    pub parser: RefCell<json::Parser>,
    /// This core's counters.
    pub metrics: Arc<CoreMetrics>,
    /// The server's metrics, rendered by `/metrics`.
    pub all_metrics: Arc<Metrics>,
    /// Raised when the process shuts down.
    pub shutdown: Signal,
    /// Open connections.
    pub connections: Cell<usize>,
    /// Raised when the last connection closes after shutdown.
    pub drained: Signal,
    /// The cached `Date` header.
    pub date: RefCell<DateCache>,
    /// The node's in-flight body budget.
    pub bodies: Arc<BodyBudget>,
    /// Which cores of the node are alive.
    pub liveness: Arc<Liveness>,
    /// This core's access-log buffer, with `--access-log`.
    pub access: Option<super::access::AccessLog>,
}

/// The store's answer to a query, with the bucket for the rate headers.
pub struct Answered {
    /// The answer, or why there is none.
    pub answer: Result<Answer, Refusal>,
    /// The organization's bucket, when the request reached its owner.
    pub rate: Option<RateSnapshot>,
}

impl Answered {
    /// Render the answer with `f` (which picks the answer kind its handler asked for); a refusal
    /// through the error table. The rate headers ride along.
    pub fn render(self, f: impl FnOnce(Answer) -> Option<Reply>) -> Reply {
        let reply = match self.answer {
            Ok(answer) => f(answer).unwrap_or_else(|| {
                tracing::error!("unexpected answer kind for the route");
                ApiError::Internal.reply()
            }),
            Err(refusal) => ApiError::from(refusal).reply(),
        };
        reply.with_rate(self.rate)
    }
}

/// The core's mailbox task. It ends once `closing` is raised (this core's connections are gone):
/// the mailbox is closed, so other cores' hops to it are refused at once, and what is still in it
/// is answered 503, so no request on another core waits for a core that has stopped.
pub async fn run_mailbox(ctx: Rc<CoreCtx>, mut mailbox: Mailbox, closing: Signal) {
    while let Either::Left(Some(msg)) = race(mailbox.recv(), closing.wait()).await {
        handle_message(&ctx, msg);
        while let Some(msg) = mailbox.try_recv() {
            handle_message(&ctx, msg);
        }
    }
    mailbox.close();
    while let Some(msg) = mailbox.try_recv() {
        match msg {
            CoreMsg::Hops(hops) => hops.into_iter().for_each(|hop| ctx.owner.refuse(hop)),
            CoreMsg::OrgChanged {
                done: Some(done), ..
            } => {
                let _ = done.send(());
            }
            _ => {}
        }
    }
}

fn handle_message(ctx: &Rc<CoreCtx>, msg: CoreMsg) {
    match msg {
        CoreMsg::Hops(hops) => hops.into_iter().for_each(|hop| ctx.owner.serve(hop)),
        CoreMsg::Complete(done) => {
            for c in done {
                ctx.waiters.complete(c.slot, c.outcome);
            }
        }
        CoreMsg::Settled(keys) => ctx.owner.settle(keys),
        CoreMsg::RateReported(balances) => ctx.owner.rate_reported(balances),
        CoreMsg::OrgChanged { org, done } => {
            ctx.keys.borrow_mut().org_changed(org);
            if org.is_none() {
                ctx.owner.forget_dedup();
            }
            if let Some(done) = done {
                let _ = done.send(());
            }
        }
        CoreMsg::Shutdown => ctx.shutdown.set(),
        #[cfg(debug_assertions)]
        CoreMsg::CrashForTests => panic!("core {} crashed on purpose by a test", ctx.core.0),
    }
}

/// An ingest's answer, or 503 when none came in time.
fn ingested(answer: Option<Outcome>) -> IngestOutcome {
    match answer {
        Some(Outcome::Ingested(outcome)) => outcome,
        None => IngestOutcome {
            result: Ingested::Refused(Refusal::Unavailable),
            rate: None,
        },
        Some(other) => IngestOutcome {
            result: Ingested::Refused(unexpected(other)),
            rate: None,
        },
    }
}

/// An answer of the wrong kind reached a waiting request: a bug, logged and answered 500.
fn unexpected(outcome: Outcome) -> Refusal {
    tracing::error!(?outcome, "unexpected answer kind");
    Refusal::Internal
}

impl CoreCtx {
    /// The answer to `wait`, or `None` after `reply_timeout_ms`: every cross-thread wait has a
    /// deadline, so a request never waits forever for a core or a pool that has gone.
    async fn answer(&self, wait: Wait) -> Option<Outcome> {
        let limit = Config::ms(self.config.reply_timeout_ms);
        let answer = self.deadlines.within(limit, wait).await;
        if answer.is_none() {
            tracing::warn!(core = self.core.0, "no answer within the reply timeout");
        }
        answer
    }

    /// Ingest `event` through its organization's owner core.
    pub async fn ingest(self: &Rc<Self>, org: OrgInfo, event: NewEvent) -> IngestOutcome {
        let wait = self.waiters.register();
        if let Some(now) = self.owner.ingest(org, event, wait.reply_to(self.core)) {
            return now;
        }
        ingested(self.answer(wait).await)
    }

    /// Ingest the valid events of one batch request (which spends `tokens`) through the
    /// organization's owner core; one outcome per event, in order, once every one is answered
    /// (the committed ones after their COMMIT). One deadline for the whole batch.
    pub async fn ingest_batch(
        self: &Rc<Self>,
        org: OrgInfo,
        tokens: u32,
        events: Vec<NewEvent>,
    ) -> Vec<IngestOutcome> {
        let waits: Vec<Wait> = events.iter().map(|_| self.waiters.register()).collect();
        let sent = events
            .into_iter()
            .zip(&waits)
            .map(|(e, w)| (e, w.reply_to(self.core)))
            .collect();
        self.owner.ingest_batch(org, tokens, sent);
        let deadline = Instant::now() + Config::ms(self.config.reply_timeout_ms);
        let mut out = Vec::with_capacity(waits.len());
        for wait in waits {
            out.push(ingested(self.deadlines.until(deadline, wait).await));
        }
        out
    }

    /// Run `query` in the store through its organization's owner core.
    pub async fn query(self: &Rc<Self>, org: OrgInfo, query: Query) -> Answered {
        let wait = self.waiters.register();
        if let Some((refusal, rate)) = self.owner.query(org, query, wait.reply_to(self.core)) {
            return Answered {
                answer: Err(refusal),
                rate,
            };
        }
        match self.answer(wait).await {
            Some(Outcome::Answered { answer, rate }) => Answered { answer, rate },
            None => Answered {
                answer: Err(Refusal::Unavailable),
                rate: None,
            },
            Some(other) => Answered {
                answer: Err(unexpected(other)),
                rate: None,
            },
        }
    }

    /// The organization's bucket, for the headers of an answer that never reached the owner.
    pub async fn rate(self: &Rc<Self>, org: OrgInfo) -> Option<RateSnapshot> {
        let wait = self.waiters.register();
        match self.owner.rate(org, wait.reply_to(self.core)) {
            RateRead::Now(rate) => Some(rate),
            RateRead::Refused => None,
            RateRead::Sent => match self.answer(wait).await {
                Some(Outcome::Rate(r)) => Some(r),
                _ => None,
            },
        }
    }

    /// Hand an unauthenticated job to the store and wait for its answer.
    pub async fn ask_store(
        self: &Rc<Self>,
        job: impl FnOnce(ReplyTo) -> StoreJob,
    ) -> Result<Answer, Refusal> {
        let wait = self.waiters.register();
        self.store.submit(job(wait.reply_to(self.core)))?;
        match self.answer(wait).await {
            Some(Outcome::Answered { answer, .. }) => answer,
            None => Err(Refusal::Unavailable),
            Some(other) => Err(unexpected(other)),
        }
    }

    /// The organization of a key: from this core's cache, else verified by the store. While one
    /// request on this core verifies a key, the others with the same key wait for its answer.
    pub async fn authenticate(
        self: &Rc<Self>,
        raw: &[u8],
        peer: IpAddr,
    ) -> Result<OrgInfo, Refusal> {
        let hash = self.keys.borrow().hash(raw);
        match self.keys.borrow_mut().get(hash) {
            Cached::Hit(org) => return Ok(org),
            Cached::Refused => return Err(Refusal::Unauthorized("invalid API key")),
            Cached::Miss => {}
        }
        self.metrics.auth_miss();
        let Some(key) = ApiKey::parse(raw) else {
            self.keys.borrow_mut().insert_refused(hash);
            return Err(Refusal::Unauthorized("invalid API key"));
        };
        match self.flights.join(hash) {
            Flight::Leader(leader) => {
                let result = self.verify(key, hash, peer).await;
                leader.land(&result);
                result
            }
            Flight::Follower(rx) => match rx.await {
                Ok(Ok(org)) => Ok(org),
                // A throttled address is the leader's own, not this request's: verify.
                Ok(Err(Refusal::AuthThrottled { .. })) => self.verify(key, hash, peer).await,
                // The leader's answer is this one's too (a refused key, the database's trouble:
                // asking again would only wait a second database deadline for the same 503).
                Ok(Err(r)) => Err(r),
                // The leader's request went away before its answer: verify.
                Err(_) => self.verify(key, hash, peer).await,
            },
        }
    }

    /// Ask the store to verify a key this core doesn't know, and cache the answer.
    async fn verify(
        self: &Rc<Self>,
        key: ApiKey,
        hash: KeyHash,
        peer: IpAddr,
    ) -> Result<OrgInfo, Refusal> {
        // A rotation that lands while the store verifies makes the answer stale: ask again.
        for _ in 0..VERIFY_RACE_TRIES {
            let epoch = self.keys.borrow().epoch();
            let wait = self.waiters.register();
            self.store.submit(StoreJob::Auth {
                key: key.clone(),
                peer,
                reply: wait.reply_to(self.core),
            })?;
            match self.answer(wait).await {
                None => return Err(Refusal::Unavailable),
                Some(Outcome::Auth(Ok(org))) => {
                    if self.keys.borrow_mut().insert(hash, org, epoch) {
                        return Ok(org);
                    }
                }
                Some(Outcome::Auth(Err(e))) => {
                    if matches!(e, Refusal::Unauthorized(_)) {
                        self.keys.borrow_mut().insert_refused(hash);
                    }
                    return Err(e);
                }
                Some(other) => return Err(unexpected(other)),
            }
        }
        // The database is fine: its organization kept changing (key rotations back to back).
        tracing::warn!("key verification kept racing with changes to its organization");
        Err(Refusal::Overloaded(
            "the organization kept changing during key verification",
        ))
    }
}
