//! One event's life in memory: wait until it is due, take its organization's slot and a global
//! one, attempt, record the outcome, and retry on the schedule until it is delivered, dead-lettered,
//! or no longer this node's.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use super::model::{Job, Verdict};
use super::record::Attempted;
use super::shared::{Busy, Shared};
use super::{schedule, worker};
use crate::flow::event::EventStatus;
use crate::ids::{fast_random, Micros};

/// Deliver one event until it is delivered, dead-lettered, given up by this node, or the pool stops.
pub(super) async fn run_job(shared: Arc<Shared>, mut job: Job) {
    shared.remember(&job);
    loop {
        let wait = Duration::from_micros((job.due.0 - Micros::now().0).max(0) as u64);
        if !wait.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shared.stop.notified() => {}
            }
        }
        if shared.stopping.load(Ordering::SeqCst) {
            // Left in `held`: `Delivery::finish` hands it back to the database.
            return;
        }
        let slots = shared.org_slots(job.org);
        let Ok(org_slot) = slots.acquire_owned().await else {
            break;
        };
        let Ok(slot) = shared.global.acquire().await else {
            break;
        };
        let _busy = Busy::new(&shared.busy);
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        match attempt_once(&shared, &job, (org_slot, slot)).await {
            Some((due, held)) => {
                job.attempts += 1;
                job.due = due;
                job.held = held;
                shared.remember(&job);
            }
            None => break,
        }
    }
    shared
        .held
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&job.event);
    shared.release_slot(job.org, job.payload.len());
}

/// One attempt and its recorded outcome. `Some((due, lease))` when this node retries it later.
///
/// `slots` (the organization's and the global one) are given back as soon as the HTTP exchange is
/// over: waiting for the outcome to be recorded must not hold delivery concurrency.
async fn attempt_once(
    shared: &Shared,
    job: &Job,
    slots: (
        tokio::sync::OwnedSemaphorePermit,
        tokio::sync::SemaphorePermit<'_>,
    ),
) -> Option<(Micros, Micros)> {
    let target = match shared.target(job.org).await {
        Ok(t) => t,
        Err(e) => {
            // Can't tell where to deliver: the lease runs out and the event is claimed again.
            tracing::warn!(error = %e, event = %job.event, "webhook lookup failed; delivery postponed");
            return None;
        }
    };
    let (tx, rx) = oneshot::channel();
    let Some(target) = target else {
        drop(slots);
        // The webhook was removed after the event arrived: it stays in the inbox, pending.
        shared.record(Attempted::no_webhook(job, tx), rx).await;
        return None;
    };
    let number = job.attempts + 1;
    let timeout = Duration::from_millis(shared.config.delivery_timeout_ms);
    let attempt = worker::attempt(&shared.client, &target, job, number, timeout).await;
    drop(slots);
    let m = &shared.metrics;
    m.attempt_latency
        .observe_us(attempt.duration.as_micros() as u64);
    let mut retry = None;
    let (status, next, delivered) = match &attempt.verdict {
        Verdict::Delivered => {
            m.deliveries_ok.fetch_add(1, Ordering::Relaxed);
            m.delivery_lag
                .observe_us((Micros::now().0 - job.created_at.0).max(0) as u64);
            (EventStatus::Delivered, None, Some(Micros::now()))
        }
        Verdict::Gone => {
            m.deliveries_gone.fetch_add(1, Ordering::Relaxed);
            shared.remove_webhook(job.org, &target.url).await;
            (EventStatus::Pending, None, None)
        }
        Verdict::Failed { retry_after } => {
            let schedule = shared.config.retry_delays();
            let failed_in_round = number - job.retry_base;
            let cap = Duration::from_secs(shared.config.retry_after_max_s);
            match schedule::next_delay(schedule, failed_in_round, *retry_after, cap, fast_random())
            {
                Some(delay) => {
                    m.deliveries_retry.fetch_add(1, Ordering::Relaxed);
                    let due = Micros::now().plus(delay);
                    let held = due.plus(shared.lease);
                    retry = Some((due, held));
                    (EventStatus::Pending, Some(held), None)
                }
                None => {
                    m.deliveries_dead.fetch_add(1, Ordering::Relaxed);
                    (EventStatus::Failed, None, None)
                }
            }
        }
    };
    let attempted = Attempted::attempt(job, number, attempt, status, next, delivered, tx);
    let still_ours = shared.record(attempted, rx).await;
    retry.filter(|_| still_ours)
}
