//! Durable delivery state.
//!
//! - [`claim_loop`]: at start, every `delivery_poll_ms`, and when woken, take due deliveries from
//!   the database: `FOR UPDATE SKIP LOCKED` picks rows no other node is claiming, and the claim
//!   writes this node's lease into `next_attempt_at`. Organizations already at their in-memory bound
//!   are skipped, so one organization's backlog can't crowd out the others.
//! - [`record_loop`]: attempt outcomes are written in batches, one transaction each: the attempt
//!   rows, and each event's new state, conditional on the lease still being the one this node holds
//!   (an ack, a redelivery, or another node's claim after the lease ran out wins).
//! - [`release_all`]: at shutdown, events still in memory are handed back, due when planned.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::worker::Attempt;
use super::{run_job, Job, Shared};
use crate::ids::{EventId, Micros, OrgId};
use crate::metrics;
use crate::store::EventStatus;

/// Most rows one claim takes.
const CLAIM_BATCH: usize = 1000;
/// Most outcomes one recorder transaction writes.
const RECORD_BATCH: usize = 1000;
/// How often the due backlog is counted for the metric.
const BACKLOG_EVERY: Duration = Duration::from_secs(5);

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

/// Write outcomes in batches until the pool stops.
pub(super) async fn record_loop(
    shared: Arc<Shared>,
    rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Attempted>>>,
) {
    let mut batch = Vec::with_capacity(RECORD_BATCH);
    while rx.lock().await.recv_many(&mut batch, RECORD_BATCH).await > 0 {
        let owned = write_outcomes(&shared, &batch).await;
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
    shared: &Shared,
    batch: &[Attempted],
) -> Option<std::collections::HashSet<Uuid>> {
    let work = async {
        let mut client = shared.pool.get().await.map_err(|e| e.to_string())?;
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
        let statuses: Vec<i16> = batch.iter().map(|a| a.status as i16).collect();
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
    match tokio::time::timeout(Duration::from_millis(shared.config.db_timeout_ms), work).await {
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

const CLAIM: &str = "\
    WITH due AS ( \
        SELECT id FROM events \
        WHERE next_attempt_at <= $1 AND org_id <> ALL($2::uuid[]) \
        ORDER BY next_attempt_at LIMIT $3 \
        FOR UPDATE SKIP LOCKED) \
    UPDATE events e SET next_attempt_at = $4 FROM due WHERE e.id = due.id \
    RETURNING e.id, e.org_id, e.type, e.payload::text, e.created_at, e.attempts, e.retry_base";

/// Claim due deliveries until the pool stops.
pub(super) async fn claim_loop(shared: Arc<Shared>) {
    let poll = Duration::from_millis(shared.config.delivery_poll_ms);
    let mut backlog_at = Instant::now() - BACKLOG_EVERY;
    loop {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        loop {
            let free = shared
                .config
                .delivery_queue_max
                .saturating_sub(shared.in_memory.load(Ordering::Relaxed));
            if free == 0 {
                break;
            }
            let limit = free.min(CLAIM_BATCH);
            match claim(&shared, limit).await {
                Ok(jobs) => {
                    let n = jobs.len();
                    for job in jobs {
                        shared.reserve(job.org, true);
                        tokio::spawn(run_job(Arc::clone(&shared), job));
                    }
                    if n < limit {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "claiming due deliveries failed");
                    break;
                }
            }
        }
        if backlog_at.elapsed() >= BACKLOG_EVERY {
            backlog_at = Instant::now();
            if let Ok(n) = count_backlog(&shared).await {
                metrics::global()
                    .delivery_due_backlog
                    .store(n, Ordering::Relaxed);
            }
        }
        tokio::select! {
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep(poll) => {}
            _ = shared.stop.notified() => return,
        }
    }
}

async fn claim(shared: &Shared, limit: usize) -> Result<Vec<Job>, String> {
    let busy = shared.saturated_orgs();
    let now = Micros::now();
    let held = now.plus(shared.lease);
    let work = async {
        let client = shared.pool.get().await.map_err(|e| e.to_string())?;
        let stmt = client
            .prepare_cached(CLAIM)
            .await
            .map_err(|e| e.to_string())?;
        client
            .query(
                &stmt,
                &[
                    &now.to_system_time(),
                    &busy,
                    &(limit as i64),
                    &held.to_system_time(),
                ],
            )
            .await
            .map_err(|e| e.to_string())
    };
    let rows = tokio::time::timeout(Duration::from_millis(shared.config.db_timeout_ms), work)
        .await
        .map_err(|_| "database deadline passed".to_string())??;
    Ok(rows
        .iter()
        .map(|r| Job {
            event: EventId(r.get(0)),
            org: OrgId(r.get(1)),
            event_type: r.get::<_, &str>(2).into(),
            payload: bytes::Bytes::copy_from_slice(r.get::<_, &str>(3).as_bytes()),
            created_at: Micros::from_system_time(r.get(4)),
            attempts: r.get::<_, i32>(5).max(0) as u32,
            retry_base: r.get::<_, i32>(6).max(0) as u32,
            held,
            due: now,
        })
        .collect())
}

async fn count_backlog(shared: &Shared) -> Result<i64, String> {
    let client = shared.pool.get().await.map_err(|e| e.to_string())?;
    let row = client
        .query_one(
            "SELECT count(*) FROM (SELECT 1 FROM events WHERE next_attempt_at <= now() LIMIT 1000000) d",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.get(0))
}

/// A receiver answered 410 Gone: remove the webhook (if it is still the one that answered) and
/// tell every node, so the organization is pull-only from now on.
pub(super) async fn remove_webhook(shared: &Shared, org: OrgId, url: &str) {
    let work = async {
        let mut client = shared.pool.get().await.map_err(|e| e.to_string())?;
        let tx = client.transaction().await.map_err(|e| e.to_string())?;
        let changed = tx
            .execute(
                "UPDATE organizations SET webhook_url = NULL, webhook_updated_at = now() \
                 WHERE id = $1 AND webhook_url = $2",
                &[&org.0, &url],
            )
            .await
            .map_err(|e| e.to_string())?;
        if changed > 0 {
            tx.execute(
                "SELECT pg_notify($1, $2)",
                &[&crate::store::ORG_CHANGED_CHANNEL, &org.to_string()],
            )
            .await
            .map_err(|e| e.to_string())?;
        }
        tx.commit().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(changed)
    };
    match tokio::time::timeout(Duration::from_millis(shared.config.db_timeout_ms), work).await {
        Ok(Ok(n)) if n > 0 => {
            tracing::info!(org = %org, "receiver answered 410 Gone: webhook removed")
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "removing a gone webhook failed"),
        Err(_) => tracing::warn!("removing a gone webhook timed out"),
    }
    shared.forget_target(Some(org));
}

/// Hand every event still in memory back to the database, due at once (if this node still holds
/// its lease). Returns how many were handed back.
pub(super) async fn release_all(shared: &Shared) -> usize {
    let held: Vec<(EventId, (Micros, Micros))> = shared
        .held
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drain()
        .collect();
    if held.is_empty() {
        return 0;
    }
    let ids: Vec<Uuid> = held.iter().map(|(e, _)| e.0).collect();
    let leases: Vec<SystemTime> = held.iter().map(|(_, (h, _))| h.to_system_time()).collect();
    // Each keeps its planned time: a retry scheduled in 8 s is still due in 8 s, on any node.
    let due: Vec<SystemTime> = held.iter().map(|(_, (_, d))| d.to_system_time()).collect();
    let work = async {
        let client = shared.pool.get().await.map_err(|e| e.to_string())?;
        client
            .execute(
                "UPDATE events e SET next_attempt_at = u.due \
                 FROM unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[]) AS u(id, held, due) \
                 WHERE e.id = u.id AND e.next_attempt_at = u.held",
                &[&ids, &leases, &due],
            )
            .await
            .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(Duration::from_secs(3), work).await {
        Ok(Ok(n)) => n as usize,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "handing deliveries back failed; they resume after their lease");
            0
        }
        Err(_) => 0,
    }
}
