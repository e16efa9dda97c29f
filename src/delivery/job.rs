//! One delivery's life in memory: wait until it is due, pass its endpoint's gates (status,
//! circuit, rate limit, concurrency), attempt, record the outcome, and retry on the schedule
//! until it is delivered, failed, parked, handed back, or no longer this node's.
//!
//! Nothing a delivery waits for is shared with another endpoint's deliveries except the global
//! concurrency, taken last and held only for the HTTP exchange: a slow, failing, paused or
//! rate-limited endpoint delays only its own deliveries.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, TryAcquireError};

use super::model::{
    Disable, Endpoint, HealthWrite, Held, Job, Lease, Next, Outcome, Owed, Recorded, Release, Then,
    Verdict,
};
use super::owed::still_owed;
use super::runtime::{Admit, EndpointRuntime, Later, UnsentVerdict};
use super::shared::{Busy, Shared};
use super::{schedule, worker};
use crate::config::{HEALTH_SUCCESS_WRITE_EVERY, LEASE_MARGIN, RATE_REPORT_EVERY};
use crate::event_types::is_operational;
use crate::flow::answer::EndpointStatus;
use crate::ids::{fast_random, Micros};
use crate::metrics::Waiting;

/// How a step of the loop ended.
enum Step {
    /// Go round again (the job's `due` and lease say when).
    Again,
    /// The job is over: let go of what it holds.
    Done,
    /// The job is over and its outcome handed to the recorder, which lets go of what it holds.
    Handed,
    /// The pool is stopping: leave the job as it is for the hand-back.
    Stopping,
}

/// Deliver until delivered, failed, parked, handed back, lost, or the pool stops. `park`: the
/// event was acknowledged; the delivery is parked at once.
pub(super) async fn run_job(
    shared: Arc<Shared>,
    mut job: Job,
    runtime: Arc<EndpointRuntime>,
    park: bool,
) {
    if let Lease::Row { held } = job.lease {
        shared.remember(job.event, job.endpoint, held, job.due);
    }
    let mut last = if park {
        settle(&shared, &mut job, &runtime, None, Next::Parked, None, None).await
    } else {
        Step::Again
    };
    loop {
        match last {
            Step::Again => {}
            Step::Done => return finish(&shared, &mut job, &runtime, false),
            Step::Handed => return,
            Step::Stopping => break,
        }
        if let Some(parked) = until_due(&shared, &mut job, &runtime).await {
            last = parked;
            continue;
        }
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        last = step(&shared, &mut job, &runtime).await;
    }
    // Stopping: a delivery under its own row stays in `held` for the hand-back; one under its
    // batch is covered by the batch row, which the hand-back expires.
    finish(&shared, &mut job, &runtime, true);
}

/// Wait in memory until the job is due (or the pool stops): `None` then, to go on. A change to
/// its endpoint's organization (on any node) wakes it early: when the endpoint is no longer
/// active (paused, deleted, disabled) the delivery is parked at once, and its row then holds no
/// lease of this node's, so a resume makes it due now wherever it is claimed. A row parked while
/// this node still holds it keeps the lease (`lease_until`): a resume gives it back, and the
/// delivery stays this node's, sent once, when it is due (and looks then whether it is still
/// owed: see [`step`]).
///
/// It listens for the next change before it looks at the endpoint: a change made while the
/// look is under way (whose answer may predate it: a load started before a delete committed)
/// wakes it again, so it looks once more instead of waiting until due on what it saw. A change
/// whose word came before it listened, since the job last began to look (during its attempt, or
/// while the attempt's outcome was being recorded), is looked at before it waits.
async fn until_due(shared: &Shared, job: &mut Job, runtime: &Arc<EndpointRuntime>) -> Option<Step> {
    let changed = runtime.changed.notified();
    tokio::pin!(changed);
    changed.as_mut().enable();
    let mut unseen = runtime.changes() != job.looked;
    loop {
        let wait = Duration::from_micros((job.due.0 - Micros::now().0).max(0) as u64);
        if wait.is_zero() {
            return None;
        }
        if !std::mem::take(&mut unseen) {
            let _w = shared.metrics.waiting(Waiting::Scheduled);
            let _n = runtime.not_yet();
            tokio::select! {
                _ = tokio::time::sleep(wait) => break,
                _ = shared.stop.notified() => return None,
                _ = changed.as_mut() => {}
            }
        }
        changed.set(runtime.changed.notified());
        changed.as_mut().enable();
        match shared.endpoint(job.org, job.endpoint).await {
            Ok(Some(e)) if e.status == EndpointStatus::Active => {}
            // Can't tell: the step when it is due decides.
            Err(_) => {}
            Ok(_) => {
                return Some(settle(shared, job, runtime, None, Next::Inactive, None, None).await)
            }
        }
    }
    job.waited = true;
    None
}

/// Give back what the job holds in memory (`stopping`: see [`Shared::let_go`]).
fn finish(shared: &Shared, job: &mut Job, runtime: &EndpointRuntime, stopping: bool) {
    // A turn still reserved (the job ended before it came) goes to the next taker.
    unreserve(job, runtime);
    let key = (job.event, job.endpoint);
    shared.let_go(key, &job.lease, runtime, job.payload.len(), stopping);
}

fn held(job: &Job) -> Held {
    match &job.lease {
        Lease::Batch(b) => Held::Batch(b.id),
        Lease::Row { held } => Held::Row(*held),
    }
}

/// How much of its lease an attempt needs left when it starts: the attempt timeout and a
/// margin (`LEASE_MARGIN`, or half what the lease has beyond the timeout if that is less).
fn attempt_needs(shared: &Shared) -> Duration {
    let timeout = Duration::from_millis(shared.config.delivery_timeout_ms);
    timeout + LEASE_MARGIN.min(shared.lease.saturating_sub(timeout) / 2)
}

/// Whether the job's lease leaves room for an attempt started now, by a clock that can be
/// trusted with it (not one further off the database's than `--clock-offset-max-ms`).
fn lease_allows_attempt(shared: &Shared, job: &Job) -> bool {
    !shared.clock_off() && job.lease.until() > Micros::now().plus(attempt_needs(shared))
}

/// One pass: the endpoint's gates, whether it is still owed (after a wait), then an attempt and
/// its outcome.
async fn step(shared: &Shared, job: &mut Job, runtime: &Arc<EndpointRuntime>) -> Step {
    job.looked = runtime.changes();
    let endpoint = match shared.endpoint(job.org, job.endpoint).await {
        Ok(Some(e)) => e,
        // Deleted or disabled: the delivery waits, parked, for a resume or a recovery.
        Ok(None) => return settle(shared, job, runtime, None, Next::Inactive, None, None).await,
        Err(e) => {
            // Can't tell where to deliver: let the lease run out; it is claimed again.
            tracing::warn!(error = %e, event = %job.event, "endpoint lookup failed; delivery postponed");
            job.lease.abandon();
            return Step::Done;
        }
    };
    if endpoint.status != EndpointStatus::Active {
        return settle(shared, job, runtime, None, Next::Inactive, None, None).await;
    }
    shared.sync_gates(runtime, &endpoint);

    // An open circuit, or a delivery the server could not send a moment ago: wait without
    // taking anything, or hand back what can't wait that long.
    let (closed_until, unsent_until) = {
        let g = runtime.gates();
        let now = Micros::now();
        (g.breaker.closed_until(now), g.unsent.wait_until(now))
    };
    if let Some(until) = closed_until {
        return wait_for(shared, job, runtime, until, Waiting::CircuitOpen).await;
    }
    if let Some(until) = unsent_until {
        return wait_for(shared, job, runtime, until, Waiting::Unsent).await;
    }

    // Counted as waiting only when it waits: the usual free slot costs the shared gauge nothing.
    let slot = match Arc::clone(&runtime.slots).try_acquire_owned() {
        Ok(slot) => slot,
        Err(TryAcquireError::Closed) => return Step::Done,
        Err(TryAcquireError::NoPermits) => {
            let _w = shared.metrics.waiting(Waiting::Concurrency);
            let Ok(slot) = Arc::clone(&runtime.slots).acquire_owned().await else {
                return Step::Done;
            };
            slot
        }
    };
    // A delivery back from its turn's wait goes on the turn it reserved (unless it is void).
    let turn = std::mem::take(&mut job.reserved);
    let token = runtime.gates().bucket.as_mut().map_or(Ok(()), |b| {
        let now = Micros::now();
        match turn {
            Some(book) => b.use_turn(book, now),
            None => b.take(now),
        }
    });
    if let Err(later) = token {
        drop(slot);
        let at = match later {
            Later::Reserved(at, book) => {
                job.reserved = Some(book);
                at
            }
            Later::Unheard(at) => {
                // The node's first report on this endpoint, asked for now: a round trip, not a
                // wait that needs a look afterwards (no longer than an attempt in flight, which
                // an ack does not stop either), so the first delivery to a fresh view is not
                // also held for the looker's linger. The report's answer, or its failure, ends
                // the wait (`UNHEARD_WAIT_MAX` at most); one longer than a report interval (the
                // database slow to answer) is a wait like any other.
                shared.report_now.notify_one();
                let (looked, started) = (!job.waited, Instant::now());
                let next = wait_for(shared, job, runtime, at, Waiting::RateLimited).await;
                if looked && started.elapsed() < RATE_REPORT_EVERY {
                    job.waited = false;
                }
                return next;
            }
        };
        return wait_for(shared, job, runtime, at, Waiting::RateLimited).await;
    }
    let global = match shared.global.try_acquire() {
        Ok(g) => g,
        Err(TryAcquireError::Closed) => return Step::Done,
        Err(TryAcquireError::NoPermits) => {
            let _w = shared.metrics.waiting(Waiting::Concurrency);
            let Ok(g) = shared.global.acquire().await else {
                return Step::Done;
            };
            g
        }
    };
    let _busy = Busy::new(&shared.busy);
    if shared.stopping.load(Ordering::SeqCst) {
        return Step::Stopping;
    }
    let admit = {
        let mut g = runtime.gates();
        g.breaker.admit(Micros::now())
    };
    let probe = match admit {
        Admit::Go { probe } => probe,
        Admit::Wait(until) => {
            drop((slot, global));
            return wait_for(shared, job, runtime, until, Waiting::CircuitOpen).await;
        }
    };
    // Only now, with every gate passed: a delivery that waits again (for its turn, a probe)
    // does not read the database each time it wakes.
    if std::mem::take(&mut job.waited) {
        // Asked of the node's looker (`owed`): a channel's answer, a few bytes of this future.
        let owed = still_owed(shared, job).await;
        if !matches!(owed, Owed::Yes) {
            {
                let mut g = runtime.gates();
                g.breaker.cancel_probe(probe);
                if let Some(b) = g.bucket.as_mut() {
                    b.give_back(Micros::now());
                }
            }
            drop((slot, global));
            probe_over(runtime, probe);
            return match owed {
                Owed::Parked => settle(shared, job, runtime, None, Next::Parked, None, None).await,
                _ => Step::Done,
            };
        }
    }
    if !lease_allows_attempt(shared, job) {
        runtime.gates().breaker.cancel_probe(probe);
        drop((slot, global));
        probe_over(runtime, probe);
        return settle(
            shared,
            job,
            runtime,
            None,
            Next::Due(shared.database_now()),
            None,
            None,
        )
        .await;
    }
    attempt(shared, job, runtime, &endpoint, probe, (slot, global)).await
}

/// Wait until `until` in memory when the lease covers it, else hand the delivery back to the
/// database due then (it is no longer held; any node takes it up when it is due). A change to
/// the endpoint (a resume closes its circuit; a new rate limit) ends the wait early: the
/// delivery passes the gates again as they are now.
async fn wait_for(
    shared: &Shared,
    job: &mut Job,
    runtime: &Arc<EndpointRuntime>,
    until: Micros,
    why: Waiting,
) -> Step {
    if job.lease.until() <= until.plus(attempt_needs(shared)) {
        let next = match why {
            Waiting::CircuitOpen => Next::AfterCircuit { until },
            _ => Next::Due(until),
        };
        return settle(shared, job, runtime, None, next, None, None).await;
    }
    // Listening for a change before the wait is counted: a change seen after the count is
    // never missed. One since the job began to look at the endpoint (its word came during the
    // look, whose answer may predate it: a resume's fresh circuit) is not waited on: it looks
    // again.
    let changed = runtime.changed.notified();
    tokio::pin!(changed);
    changed.as_mut().enable();
    if runtime.changes() != job.looked {
        unreserve(job, runtime);
        return Step::Again;
    }
    let _w = shared.metrics.waiting(why);
    let _n = matches!(why, Waiting::CircuitOpen | Waiting::Unsent).then(|| runtime.not_yet());
    let wait = Duration::from_micros((until.0 - Micros::now().0).max(0) as u64);
    job.waited = true;
    tokio::select! {
        _ = tokio::time::sleep(wait) => Step::Again,
        _ = changed => {
            // The gates are passed again as they are now: a turn reserved is given back first.
            unreserve(job, runtime);
            Step::Again
        }
        _ = shared.stop.notified() => Step::Stopping,
    }
}

/// The half-open circuit's probe is over (answered, or not sent after all): the deliveries
/// waiting for it pass the gates again now (the breaker says whether they go).
fn probe_over(runtime: &EndpointRuntime, probe: bool) {
    if probe {
        runtime.change();
    }
}

/// Give back the turn the job reserved, if it holds one.
fn unreserve(job: &mut Job, runtime: &EndpointRuntime) {
    if let Some(book) = std::mem::take(&mut job.reserved) {
        if let Some(b) = runtime.gates().bucket.as_mut() {
            b.give_back_turn(book, Micros::now());
        }
    }
}

/// Hand a decision or an attempt's outcome to the recorder. The job ends there unless it is a
/// retry: that one waits for the outcome to be written, and goes on if it is still ours.
async fn settle(
    shared: &Shared,
    job: &mut Job,
    runtime: &Arc<EndpointRuntime>,
    attempt: Option<(u32, super::model::Attempt)>,
    next: Next,
    health: Option<HealthWrite>,
    disable: Option<Disable>,
) -> Step {
    // Not sent after all (handed back, parked): the turn it reserved goes to the next one.
    unreserve(job, runtime);
    // A retry waits for its answer (with the lease its row will hold); anything else ends here.
    let (then, retry) = match next {
        Next::Retry { held } => {
            let (tx, rx) = oneshot::channel();
            (Then::Answer(tx), Some((rx, held)))
        }
        _ => (
            Then::LetGo(Release {
                lease: job.lease.clone(),
                runtime: Arc::clone(runtime),
                bytes: job.payload.len(),
            }),
            None,
        ),
    };
    let outcome = Outcome {
        event: job.event,
        endpoint: job.endpoint,
        org: job.org,
        operational: is_operational(&job.event_type),
        held: held(job),
        attempt,
        next,
        health,
        disable,
        seen: runtime.gates().config_at,
        then,
    };
    if let Some(room) = shared.record(outcome) {
        room.await;
    }
    let Some((answer, held)) = retry else {
        return Step::Handed;
    };
    match answer.await.unwrap_or(Recorded::Failed) {
        Recorded::Owned { parked: false } => {
            // Retried by this node under the delivery's own row from now on.
            if let Lease::Batch(b) = &job.lease {
                shared.settle(b);
            }
            job.lease = Lease::Row { held };
            shared.remember(job.event, job.endpoint, held, job.due);
            Step::Again
        }
        Recorded::Failed => {
            job.lease.abandon();
            Step::Done
        }
        // Parked meanwhile (an ack, a pause), or not this node's any more.
        Recorded::Owned { parked: true } | Recorded::Lost => Step::Done,
    }
}

/// One attempt and its recorded outcome.
///
/// `slots` (the endpoint's and the global one) are given back as soon as the HTTP exchange is
/// over: waiting for the outcome to be recorded must not hold delivery concurrency.
async fn attempt(
    shared: &Shared,
    job: &mut Job,
    runtime: &Arc<EndpointRuntime>,
    endpoint: &Endpoint,
    probe: bool,
    slots: (
        tokio::sync::OwnedSemaphorePermit,
        tokio::sync::SemaphorePermit<'_>,
    ),
) -> Step {
    let number = job.attempts + 1;
    let timeout = Duration::from_millis(shared.config.delivery_timeout_ms);
    let attempt = worker::attempt(&shared.client, endpoint, job, number, timeout).await;
    drop(slots);
    if matches!(attempt.verdict, Verdict::Unsent) {
        if let Some(until) = unsent(shared, runtime, &attempt, probe) {
            return wait_for(shared, job, runtime, until, Waiting::Unsent).await;
        }
    }
    let m = &shared.metrics;
    m.attempt_latency
        .observe_us(attempt.duration.as_micros() as u64);
    let now = Micros::now();
    let config = &shared.config;
    let (next, disable) = match &attempt.verdict {
        Verdict::Delivered => {
            m.deliveries_ok.fetch_add(1, Ordering::Relaxed);
            m.delivery_lag
                .observe_us((now.0 - job.created_at.0).max(0) as u64);
            (Next::Delivered(now), None)
        }
        Verdict::Gone => {
            m.deliveries_gone.fetch_add(1, Ordering::Relaxed);
            (
                Next::Parked,
                Some(Disable {
                    reason: "the receiver answered 410 Gone".to_string(),
                    unless_delivered_after: None,
                }),
            )
        }
        Verdict::Failed { .. } | Verdict::Unsent => {
            // An unsent try past the patience has no receiver's Retry-After.
            let retry_after = match attempt.verdict {
                Verdict::Failed { retry_after } => retry_after,
                _ => None,
            };
            let failed_in_round = number - job.retry_base;
            let cap = Duration::from_secs(config.retry_after_max_s);
            let delay = schedule::next_delay(
                config.retry_delays(),
                failed_in_round,
                retry_after,
                cap,
                fast_random(),
            );
            match delay {
                Some(delay) => {
                    m.deliveries_retry.fetch_add(1, Ordering::Relaxed);
                    job.due = now.plus(delay);
                    (
                        Next::Retry {
                            held: job.due.plus(shared.lease),
                        },
                        None,
                    )
                }
                None => {
                    m.deliveries_dead.fetch_add(1, Ordering::Relaxed);
                    let reason = attempt
                        .error
                        .clone()
                        .unwrap_or_else(|| "every attempt failed".into());
                    (Next::Failed { at: now, reason }, None)
                }
            }
        }
    };
    let (health, disable) = judge_health(shared, runtime, &attempt.verdict, probe, now, disable);
    probe_over(runtime, probe);
    job.attempts = number;
    settle(
        shared,
        job,
        runtime,
        Some((number, attempt)),
        next,
        health,
        disable,
    )
    .await
}

/// The server could not send (its resolver failed, or it had no socket, port, memory or route):
/// while the endpoint's patience lasts that is not an attempt (the delivery waits until the time
/// returned, having given back its turn and the circuit's probe); after it, `None`: a failed
/// attempt like any other.
fn unsent(
    shared: &Shared,
    runtime: &EndpointRuntime,
    attempt: &super::model::Attempt,
    probe: bool,
) -> Option<Micros> {
    let patience = Duration::from_secs(shared.config.unsent_patience_s);
    let now = Micros::now();
    let error = attempt.error.as_deref().unwrap_or_default();
    let verdict = {
        let mut g = runtime.gates();
        let verdict = g.unsent.failed(now, patience);
        if matches!(verdict, UnsentVerdict::Wait { .. }) {
            g.breaker.cancel_probe(probe);
            if let Some(b) = g.bucket.as_mut() {
                b.give_back(now);
            }
        }
        verdict
    };
    match verdict {
        UnsentVerdict::Wait { until, first } => {
            if first {
                tracing::warn!(endpoint = %runtime.id, error, patience_s = patience.as_secs(),
                    "delivery could not be sent (the server's trouble); the endpoint's deliveries wait and try again, not counted as attempts");
            }
            probe_over(runtime, probe);
            Some(until)
        }
        UnsentVerdict::Attempt { first } => {
            if first {
                tracing::warn!(endpoint = %runtime.id, error, patience_s = patience.as_secs(),
                    "deliveries could not be sent for longer than the patience; each such failure is now a failed attempt");
            }
            None
        }
    }
}

/// What an attempt's verdict does to the endpoint's circuit and recorded health; a failure that
/// makes the endpoint's failing spell longer than `endpoint_disable_after_s` disables it.
fn judge_health(
    shared: &Shared,
    runtime: &EndpointRuntime,
    verdict: &Verdict,
    probe: bool,
    now: Micros,
    disable: Option<Disable>,
) -> (Option<HealthWrite>, Option<Disable>) {
    let config = &shared.config;
    let mut g = runtime.gates();
    let write = |g: &super::runtime::Gates, ok: bool| HealthWrite {
        endpoint: runtime.id,
        failures: g.breaker.failures.min(i32::MAX as u32) as i32,
        failing_since: g.breaker.failing_since,
        success_at: ok.then_some(now),
        failure_at: (!ok).then_some(now),
        open_until: g.breaker.open_until,
    };
    if !matches!(verdict, Verdict::Unsent) {
        g.unsent.over();
    }
    match verdict {
        Verdict::Delivered => {
            let was_open = g.breaker.open_until.is_some();
            let changed = g.breaker.success();
            shared.circuit_moved(was_open, false);
            let stale = g
                .success_written_at
                .is_none_or(|t| now.0 - t.0 >= HEALTH_SUCCESS_WRITE_EVERY.as_micros() as i64);
            if changed || stale {
                g.success_written_at = Some(now);
                return (Some(write(&g, true)), disable);
            }
            (None, disable)
        }
        // A 410 is an answer, not a failure of the endpoint; it disables it.
        Verdict::Gone => {
            g.breaker.cancel_probe(probe);
            (None, disable)
        }
        Verdict::Failed { .. } | Verdict::Unsent => {
            let open_for = Duration::from_secs(config.circuit_open_s);
            let threshold = config.circuit_failures as u32;
            let was_open = g.breaker.open_until.is_some();
            if let Some(until) = g.breaker.failure(now, probe, threshold, open_for) {
                shared.circuit_moved(was_open, true);
                tracing::info!(endpoint = %runtime.id, until = %until.rfc3339(), "circuit open");
            }
            let limit = config.endpoint_disable_after_s;
            let limit_ago = Micros(now.0 - (limit as i64) * 1_000_000);
            let too_long = limit > 0
                && g.breaker
                    .failing_since
                    .is_some_and(|since| since <= limit_ago);
            // This node's spell is long enough; the recorder checks that no other node delivered
            // to the endpoint within the same time.
            let disable = disable.or_else(|| {
                too_long.then(|| Disable {
                    reason: format!("every attempt failed for {limit} s"),
                    unless_delivered_after: Some(limit_ago),
                })
            });
            (Some(write(&g, false)), disable)
        }
    }
}
