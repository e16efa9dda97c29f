//! The attempt recorder: outcomes are written in batches, one transaction each: the attempt rows,
//! and each event's new state, conditional on the lease still being the one this node holds (an
//! ack, a redelivery, or another node's claim after the lease ran out wins). The delivery pool's
//! connections commit without waiting for the disk (see `db::build_bookkeeping_pool`).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::model::{Attempt, Job};
use crate::config::RECORD_BATCH_MAX;
use crate::flow::event::EventStatus;
use crate::ids::{EventId, Micros};

/// One attempt's outcome (or a decision without attempt), for the recorder.
pub struct Attempted {
    event: EventId,
    row: Option<(i32, Attempt)>,
    status: EventStatus,
    next_attempt_at: Option<Micros>,
    delivered_at: Option<Micros>,
    held: Micros,
    reply: oneshot::Sender<bool>,
}

impl Attempted {
    /// An HTTP attempt numbered `number`, and the event's state after it.
    pub fn attempt(
        job: &Job,
        number: u32,
        attempt: Attempt,
        status: EventStatus,
        next_attempt_at: Option<Micros>,
        delivered_at: Option<Micros>,
        reply: oneshot::Sender<bool>,
    ) -> Attempted {
        Attempted {
            event: job.event,
            row: Some((number as i32, attempt)),
            status,
            next_attempt_at,
            delivered_at,
            held: job.held,
            reply,
        }
    }

    /// No webhook any more: the event stays pending for the inbox, nothing scheduled.
    pub fn no_webhook(job: &Job, reply: oneshot::Sender<bool>) -> Attempted {
        Attempted {
            event: job.event,
            row: None,
            status: EventStatus::Pending,
            next_attempt_at: None,
            delivered_at: None,
            held: job.held,
            reply,
        }
    }
}

const INSERT_ATTEMPTS: &str = "\
    INSERT INTO delivery_attempts (event_id, attempt, at, response_status, error, duration_ms) \
    SELECT * FROM unnest($1::uuid[], $2::int[], $3::timestamptz[], $4::int2[], $5::text[], $6::int[]) \
    ON CONFLICT DO NOTHING";

const UPDATE_EVENTS: &str = "\
    UPDATE events e SET status = u.status, attempts = e.attempts + u.tried, \
        next_attempt_at = u.next, delivered_at = COALESCE(u.delivered, e.delivered_at) \
    FROM unnest($1::uuid[], $2::int2[], $3::int[], $4::timestamptz[], $5::timestamptz[], $6::timestamptz[]) \
        AS u(id, status, tried, next, delivered, held) \
    WHERE e.id = u.id AND e.next_attempt_at = u.held \
    RETURNING e.id";

/// Write outcomes in batches until the pool stops; several recorders share one queue, so one
/// writes while the next gathers.
pub async fn record_loop(
    pool: Pool,
    db_timeout: Duration,
    rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Attempted>>>,
) {
    let mut batch = Vec::with_capacity(RECORD_BATCH_MAX);
    while rx
        .lock()
        .await
        .recv_many(&mut batch, RECORD_BATCH_MAX)
        .await
        > 0
    {
        let owned = write_outcomes(&pool, db_timeout, &batch).await;
        for a in batch.drain(..) {
            let _ = a
                .reply
                .send(owned.as_ref().is_some_and(|set| set.contains(&a.event.0)));
        }
    }
}

/// One transaction for a batch. `None` when it failed: the events then stay leased as they were,
/// and are claimed again once the lease runs out (an attempt may repeat: at-least-once).
async fn write_outcomes(
    pool: &Pool,
    db_timeout: Duration,
    batch: &[Attempted],
) -> Option<HashSet<Uuid>> {
    let work = async {
        let mut client = pool.get().await.map_err(|e| e.to_string())?;
        let tx = client.transaction().await.map_err(|e| e.to_string())?;
        let rows: Vec<&(i32, Attempt)> = batch.iter().filter_map(|a| a.row.as_ref()).collect();
        if !rows.is_empty() {
            let ids: Vec<Uuid> = batch
                .iter()
                .filter(|a| a.row.is_some())
                .map(|a| a.event.0)
                .collect();
            let numbers: Vec<i32> = rows.iter().map(|r| r.0).collect();
            let ats: Vec<SystemTime> = rows.iter().map(|r| r.1.at.to_system_time()).collect();
            let statuses: Vec<Option<i16>> =
                rows.iter().map(|r| r.1.status.map(|s| s as i16)).collect();
            let errors: Vec<Option<&str>> = rows.iter().map(|r| r.1.error.as_deref()).collect();
            let durations: Vec<i32> = rows
                .iter()
                .map(|r| r.1.duration.as_millis().min(i32::MAX as u128) as i32)
                .collect();
            let stmt = tx
                .prepare_cached(INSERT_ATTEMPTS)
                .await
                .map_err(|e| e.to_string())?;
            tx.execute(
                &stmt,
                &[&ids, &numbers, &ats, &statuses, &errors, &durations],
            )
            .await
            .map_err(|e| e.to_string())?;
        }
        let ids: Vec<Uuid> = batch.iter().map(|a| a.event.0).collect();
        let statuses: Vec<i16> = batch.iter().map(|a| a.status.code()).collect();
        let tried: Vec<i32> = batch.iter().map(|a| i32::from(a.row.is_some())).collect();
        let next: Vec<Option<SystemTime>> = batch
            .iter()
            .map(|a| a.next_attempt_at.map(Micros::to_system_time))
            .collect();
        let delivered: Vec<Option<SystemTime>> = batch
            .iter()
            .map(|a| a.delivered_at.map(Micros::to_system_time))
            .collect();
        let held: Vec<SystemTime> = batch.iter().map(|a| a.held.to_system_time()).collect();
        let stmt = tx
            .prepare_cached(UPDATE_EVENTS)
            .await
            .map_err(|e| e.to_string())?;
        let owned = tx
            .query(&stmt, &[&ids, &statuses, &tried, &next, &delivered, &held])
            .await
            .map_err(|e| e.to_string())?
            .iter()
            .map(|r| r.get::<_, Uuid>(0))
            .collect();
        tx.commit().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(owned)
    };
    match tokio::time::timeout(db_timeout, work).await {
        Ok(Ok(owned)) => Some(owned),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, outcomes = batch.len(), "delivery outcomes not recorded; they will be retried after the lease");
            None
        }
        Err(_) => {
            tracing::warn!(
                outcomes = batch.len(),
                "delivery outcomes not recorded in time"
            );
            None
        }
    }
}
