//! Everything a request waits for besides event writes. Each job runs as its own task (at most
//! `Config::query_jobs_running_max` at once, taking turns by tenant: [`Door`]) with a deadline of
//! `db_timeout_ms`; its answer, a value, goes to the waiting core.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use tokio::runtime::Handle;

use super::ctx::StoreCtx;
use super::lanes::{Admitted, Lanes};
use super::{endpoints, events, inbox, keys, rate, webhook};
use crate::auth::throttle::AddressKey;
use crate::auth::OrgInfo;
use crate::config::{Config, READ_RUNS_MAX};
use crate::flow::answer::{Answer, Completion, Outcome, Refusal, ReplyTo};
use crate::flow::job::{Query, StoreJob};
use crate::flow::sink::JobDoor;
use crate::ids::OrgId;

/// Whose turn a job waits for: its organization's, or for work asked without a key its client
/// address's (an IPv6 address's /64, as the throttles count: a host with a /64 sending from
/// many of its addresses had a lane, and a turn in each round, per address); the node's own
/// reports have a lane of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Tenant {
    Org(OrgId),
    Peer(AddressKey),
    Node,
}

fn tenant(job: &StoreJob) -> Tenant {
    match job {
        StoreJob::Query { org, .. } => Tenant::Org(org.id),
        StoreJob::Auth { peer, .. }
        | StoreJob::RetryRotation { peer, .. }
        | StoreJob::Generate { peer, .. } => Tenant::Peer(AddressKey::from(*peer)),
        StoreJob::RateReport { .. } => Tenant::Node,
    }
}

/// The turns: the lanes, and what runs the jobs once the store has started.
struct Turns {
    lanes: Mutex<Lanes<Tenant, StoreJob>>,
    /// How long a job may wait for its turn.
    patience: Duration,
    /// Set by [`Door::open`].
    store: OnceLock<Started>,
}

/// What a job needs to run: the store's state, and its runtime to spawn on (the door is called
/// from the ingress cores' threads, which are not the store's).
struct Started {
    ctx: Arc<StoreCtx>,
    runtime: Handle,
}

impl Turns {
    fn lanes(&self) -> MutexGuard<'_, Lanes<Tenant, StoreJob>> {
        self.lanes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Start every job whose turn has come while slots are free; refuse those that waited too
    /// long.
    fn start(self: &Arc<Self>, store: &Started) {
        loop {
            let Some((tenant, came, job)) = self.lanes().start_next() else {
                return;
            };
            if came.elapsed() > self.patience && tenant != Tenant::Node {
                store
                    .ctx
                    .metrics
                    .store_jobs_refused_waited_too_long
                    .fetch_add(1, Ordering::Relaxed);
                refuse(
                    &store.ctx,
                    job,
                    Refusal::Overloaded("query jobs waited too long"),
                );
                self.lanes().finished(tenant);
                continue;
            }
            let mut ending = Ending {
                turns: Arc::clone(self),
                tenant,
                ran: false,
            };
            let ctx = Arc::clone(&store.ctx);
            store.runtime.spawn(async move {
                handle(&ctx, job).await;
                ending.ran = true;
                drop(ending);
            });
        }
    }
}

/// Counts its job as ended when dropped, and when the job ran to its end starts the jobs whose
/// turn that makes. A job dropped unfinished (the runtime shutting down) starts none: a task
/// spawned then is dropped at once, and its ending would start the next, one inside the other.
struct Ending {
    turns: Arc<Turns>,
    tenant: Tenant,
    ran: bool,
}

impl Drop for Ending {
    fn drop(&mut self) {
        self.turns.lanes().finished(self.tenant);
        if let Some(store) = self.turns.store.get().filter(|_| self.ran) {
            self.turns.start(store);
        }
    }
}

/// The door to the store's jobs ([`JobDoor`]): each job is admitted where it is asked, into its
/// tenant's lane, and run as its own task on the store's runtime when its turn comes.
///
/// Tenants take turns: each job waits in its tenant's lane ([`super::lanes`]), and the lanes
/// with work waiting start one job each in turn, one tenant at most
/// `Config::query_jobs_per_lane_max` at once. It was one queue: an organization reading inbox
/// pages on 256 connections made every other organization's smallest read wait ~1.2 s. When
/// `query_queue_max` jobs wait, the tenant with the most waiting gives up its newest (503); a
/// job that waited past `Config::query_wait_max` is answered 503 without being run.
///
/// A job that configures a webhook URL may wait up to `RESOLVE_TIMEOUT` for DNS servers that do
/// not answer (holding no connection meanwhile): such jobs wait for their turn like any other, so
/// a tenant configuring endpoint after endpoint on such hosts holds at most its own share of the
/// slots. Before the turns (and the 16 slots of their own they had in between), their waits held
/// the slots every tenant shares: with 700 such requests at once, a new key took 15 s (then 503)
/// and the first request with a key not yet cached 14 s, for every tenant (RELIABILITY.md).
#[derive(Clone)]
pub struct Door(Arc<Turns>);

impl Door {
    /// A door that refuses every job (503) until the store opens it (`Store::start`).
    pub fn new(config: &Config) -> Door {
        Door(Arc::new(Turns {
            lanes: Mutex::new(Lanes::new(
                config.query_jobs_running_max(),
                config.query_jobs_per_lane_max(),
                config.query_queue_max,
            )),
            patience: config.query_wait_max(),
            store: OnceLock::new(),
        }))
    }

    /// Run jobs from now on with `ctx`, on the current tokio runtime.
    pub(super) fn open(&self, ctx: Arc<StoreCtx>) {
        let _ = self.0.store.set(Started {
            ctx,
            runtime: Handle::current(),
        });
    }

    /// Wait until no job waits or runs (at shutdown, once the cores that hand them over have
    /// stopped).
    pub(super) async fn idle(&self) {
        while !self.0.lanes().idle() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

const QUEUE_FULL: Refusal = Refusal::Overloaded("query queue full");

impl JobDoor for Door {
    fn submit(&self, job: StoreJob) -> Result<(), Refusal> {
        let turns = &self.0;
        let Some(store) = turns.store.get() else {
            return Err(Refusal::Unavailable);
        };
        let refused = &store.ctx.metrics.store_jobs_refused_queue_full;
        // Bound first: the lanes' lock is not held while a displaced job is answered.
        let admitted = turns.lanes().admit(tenant(&job), job, Instant::now());
        match admitted {
            Admitted::Queued => {}
            Admitted::Displaced(out) => {
                refused.fetch_add(1, Ordering::Relaxed);
                refuse(&store.ctx, out, QUEUE_FULL);
            }
            Admitted::Refused(_) => {
                refused.fetch_add(1, Ordering::Relaxed);
                return Err(QUEUE_FULL);
            }
        }
        turns.start(store);
        Ok(())
    }
}

/// Answer `job` with `refusal` without running it.
fn refuse(ctx: &StoreCtx, job: StoreJob, refusal: Refusal) {
    match job {
        StoreJob::Query { rate, reply, .. } => answer(
            ctx,
            reply,
            Outcome::Answered {
                answer: Err(refusal),
                rate: Some(rate),
            },
        ),
        StoreJob::Auth { reply, .. } => answer(ctx, reply, Outcome::Auth(Err(refusal))),
        StoreJob::RetryRotation { reply, .. } | StoreJob::Generate { reply, .. } => {
            answer_keyless(ctx, reply, Err(refusal));
        }
        // The spend stays with the core and goes with its next report.
        StoreJob::RateReport { core, .. } => ctx.cores.rate_reported(core, None),
    }
}

fn answer(ctx: &StoreCtx, to: ReplyTo, outcome: Outcome) {
    ctx.cores.complete(
        to.core,
        vec![Completion {
            slot: to.slot,
            outcome,
        }],
    );
}

async fn handle(ctx: &StoreCtx, job: StoreJob) {
    match job {
        StoreJob::Auth { key, peer, reply } => {
            let result = keys::verify(ctx, key, peer).await;
            answer(ctx, reply, Outcome::Auth(result));
        }
        StoreJob::Query {
            org,
            query,
            rate,
            reply,
        } => {
            let result = run_query(ctx, org, query).await;
            answer(
                ctx,
                reply,
                Outcome::Answered {
                    answer: result,
                    rate: Some(rate),
                },
            );
        }
        StoreJob::RateReport { core, spent } => {
            let balances = rate::report(ctx, &spent).await;
            ctx.cores.rate_reported(core, balances);
        }
        StoreJob::RetryRotation {
            key,
            retry_key,
            peer,
            reply,
        } => {
            let result = keys::retry_rotation(ctx, key, retry_key, peer).await;
            answer_keyless(ctx, reply, result);
        }
        StoreJob::Generate {
            name,
            tier,
            peer,
            once,
            reply,
        } => {
            let result = keys::generate(ctx, name, tier, peer, once).await;
            answer_keyless(ctx, reply, result);
        }
    }
}

/// The answer to a job asked without an organization's key (no rate headers go with it).
fn answer_keyless(ctx: &StoreCtx, reply: ReplyTo, result: Result<Answer, Refusal>) {
    answer(
        ctx,
        reply,
        Outcome::Answered {
            answer: result,
            rate: None,
        },
    );
}

async fn run_query(ctx: &StoreCtx, org: OrgInfo, query: Query) -> Result<Answer, Refusal> {
    match query {
        Query::Rotate { peer, retry_key } => keys::rotate(ctx, org.id, peer, retry_key).await,
        Query::SetWebhook { url } => webhook::set_webhook(ctx, org.id, url).await,
        Query::DeleteWebhook => webhook::delete_webhook(ctx, org.id).await,
        Query::Redeliver { id, endpoint } => {
            ctx.timed_reruns("redeliver", || events::redeliver(ctx, org.id, id, endpoint))
                .await
        }
        Query::CreateEndpoint { spec, once } => endpoints::create(ctx, org.id, spec, once).await,
        Query::PatchEndpoint { id, patch } => endpoints::patch(ctx, org.id, id, patch).await,
        Query::DeleteEndpoint { id } => endpoints::delete(ctx, org.id, id).await,
        Query::SetEndpointPaused { id, paused } => {
            endpoints::set_paused(ctx, org.id, id, paused).await
        }
        Query::RotateEndpointSecret { id, secret } => {
            endpoints::rotate_secret(ctx, org.id, id, secret).await
        }
        Query::RecoverEndpoint { id, since } => {
            ctx.timed_reruns("recover endpoint", || {
                endpoints::recover(ctx, org.id, id, since)
            })
            .await
        }
        read => again_on_lost(ctx, org.id, &read).await,
    }
}

/// A read or an ack, run again (up to `READ_RUNS_MAX` runs, while the first `--db-timeout-ms`
/// lasts) when a connection of the pool turned out to be gone meanwhile (a reset, a failover, a
/// pooler's restart): the database is most likely fine, the pool's idle connections were let go
/// (`StoreCtx::fail`), a read changes nothing, and an ack run twice answers as once (it keeps
/// the first acknowledgement's time), whether or not the first run committed.
async fn again_on_lost(ctx: &StoreCtx, org: OrgId, query: &Query) -> Result<Answer, Refusal> {
    let started = tokio::time::Instant::now();
    let mut run = 1;
    loop {
        let lost = ctx.connections_lost.load(Ordering::Relaxed);
        match query_once(ctx, org, query).await {
            Err(Refusal::Unavailable)
                if run < READ_RUNS_MAX
                    && started.elapsed() < ctx.db_timeout
                    && ctx.connections_lost.load(Ordering::Relaxed) != lost =>
            {
                run += 1;
            }
            done => return done,
        }
    }
}

/// One run of [`again_on_lost`]'s query.
async fn query_once(ctx: &StoreCtx, org: OrgId, query: &Query) -> Result<Answer, Refusal> {
    match *query {
        Query::KeyInfo => ctx.timed("key info", keys::key_info(ctx, org)).await,
        Query::GetEvent { id } => {
            ctx.timed("get event", events::get_event(ctx, org, id))
                .await
        }
        Query::ListEndpoints => ctx.timed("list endpoints", endpoints::list(ctx, org)).await,
        Query::GetEndpoint { id } => {
            ctx.timed("get endpoint", endpoints::get(ctx, org, id))
                .await
        }
        Query::GetEndpointSecret { id } => {
            ctx.timed("endpoint secret", endpoints::secret(ctx, org, id))
                .await
        }
        Query::FailedDeliveries {
            id,
            since,
            limit,
            before,
        } => {
            ctx.timed(
                "failed deliveries",
                endpoints::failed(ctx, org, id, since, limit, before),
            )
            .await
        }
        Query::Inbox {
            limit,
            status,
            before,
        } => {
            ctx.timed("inbox", inbox::inbox(ctx, org, limit, status, before))
                .await
        }
        Query::Ack { id } => ctx.timed("ack", inbox::ack(ctx, org, id)).await,
        Query::AckBatch { ref ids } => {
            ctx.timed("ack batch", inbox::ack_batch(ctx, org, ids))
                .await
        }
        // Not a read: `run_query` runs each of those itself.
        _ => Err(Refusal::Internal),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Tier;
    use crate::flow::answer::SlotToken;
    use crate::ids::CoreId;

    fn key_asked_from(peer: &str) -> StoreJob {
        StoreJob::Generate {
            name: "n".into(),
            tier: Tier::Free,
            peer: peer.parse().unwrap(),
            once: None,
            reply: ReplyTo {
                core: CoreId(0),
                slot: SlotToken(0),
            },
        }
    }

    /// Work asked without a key takes turns by client address as the throttles count one: a host
    /// asking from many addresses of its IPv6 /64 has one lane, not one (and a turn each round)
    /// per address.
    #[test]
    fn keyless_work_takes_turns_by_ipv4_address_and_by_ipv6_64() {
        let lane = |peer| tenant(&key_asked_from(peer));
        assert_eq!(lane("2001:db8:1:2::1"), lane("2001:db8:1:2:ffff::9"));
        assert_ne!(lane("2001:db8:1:2::1"), lane("2001:db8:1:3::1"));
        assert_ne!(lane("192.0.2.1"), lane("192.0.2.2"));
        assert_eq!(lane("::ffff:192.0.2.1"), lane("192.0.2.1"));
    }
}
