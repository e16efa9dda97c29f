//! Everything a request waits for besides event writes. Each job runs as its own task (at most
//! `Config::query_jobs_running_max` at once; beyond that the bounded job queue fills and ingress
//! answers 503; jobs that look a webhook host up have slots of their own: [`run`]) with a
//! deadline of `db_timeout_ms`; its answer, a value, goes to the waiting core.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::{mpsc, Semaphore};

use super::ctx::StoreCtx;
use super::{endpoints, events, inbox, keys, rate, webhook};
use crate::auth::OrgInfo;
use crate::config::{READ_RUNS_MAX, URL_CHECKS_AT_ONCE};
use crate::flow::answer::{Answer, Completion, Outcome, Refusal, ReplyTo};
use crate::flow::job::{Query, StoreJob};
use crate::ids::OrgId;

/// Take jobs off the queue until it closes, then wait for those still running.
///
/// A job that looks a webhook host up (a URL configured) may wait up to `RESOLVE_TIMEOUT` for
/// DNS servers that do not answer: those run in slots of their own ([`URL_CHECKS_AT_ONCE`];
/// one more is answered 503 at once), so that a tenant configuring endpoint after endpoint on
/// such hosts cannot hold the slots every key check, read and key creation waits for. It did:
/// with 700 such requests at once, a new key took 15 s (then 503) and the first request with a
/// key not yet cached 14 s, for every tenant (RELIABILITY.md).
pub async fn run(mut jobs: mpsc::Receiver<StoreJob>, ctx: Arc<StoreCtx>) {
    let running_max = ctx.config.query_jobs_running_max();
    let slots = Arc::new(Semaphore::new(running_max));
    let url_checks = Arc::new(Semaphore::new(URL_CHECKS_AT_ONCE));
    while let Some(job) = jobs.recv().await {
        let slot = if job.looks_up_a_host() {
            match Arc::clone(&url_checks).try_acquire_owned() {
                Ok(slot) => slot,
                Err(_) => {
                    refuse(&ctx, job, Refusal::Overloaded("webhook URL checks"));
                    continue;
                }
            }
        } else {
            let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                break;
            };
            slot
        };
        let ctx = Arc::clone(&ctx);
        tokio::spawn(async move {
            handle(&ctx, job).await;
            drop(slot);
        });
    }
    let _ = slots.acquire_many(running_max as u32).await;
    let _ = url_checks.acquire_many(URL_CHECKS_AT_ONCE as u32).await;
}

/// Answer a query job with `refusal` without running it.
fn refuse(ctx: &StoreCtx, job: StoreJob, refusal: Refusal) {
    if let StoreJob::Query { rate, reply, .. } = job {
        answer(
            ctx,
            reply,
            Outcome::Answered {
                answer: Err(refusal),
                rate: Some(rate),
            },
        );
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
