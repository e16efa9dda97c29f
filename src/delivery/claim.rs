//! Durable delivery state: claims and the hand-back.
//!
//! - [`claim_loop`]: at start, every `delivery_poll_ms`, and when woken, take due deliveries from
//!   the database: `FOR UPDATE SKIP LOCKED` picks rows no other node is claiming, and the claim
//!   writes this node's lease into `next_attempt_at`. Organizations already at their in-memory bound
//!   are skipped, so one organization's backlog can't crowd out the others.
//! - [`release_all`]: at shutdown, events still in memory are handed back, due when planned.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use uuid::Uuid;

use super::job::run_job;
use super::model::Job;
use super::shared::Shared;
use crate::config::{
    CLAIM_BATCH_MAX, DELIVERY_BACKLOG_COUNT_EVERY, DELIVERY_BACKLOG_COUNT_MAX, RELEASE_TIMEOUT,
};
use crate::ids::{EventId, Micros, OrgId};

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
    let mut backlog_at = Instant::now() - DELIVERY_BACKLOG_COUNT_EVERY;
    loop {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        loop {
            let free = shared
                .config
                .delivery_queue_max
                .saturating_sub(shared.in_memory.load(Ordering::Relaxed));
            // Room for one more payload of the largest size, or nothing is claimed.
            if free == 0 || shared.memory.free() < shared.config.payload_bytes_max {
                break;
            }
            // At most as many rows as largest payloads fit the memory budget: claimed rows are
            // taken into memory whatever their size.
            let by_bytes = shared.memory.free() / shared.config.payload_bytes_max.max(1);
            let limit = free.min(CLAIM_BATCH_MAX).min(by_bytes);
            match claim(&shared, limit).await {
                Ok(jobs) => {
                    let n = jobs.len();
                    for job in jobs {
                        shared.reserve(job.org, job.payload.len(), true);
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
        if backlog_at.elapsed() >= DELIVERY_BACKLOG_COUNT_EVERY {
            backlog_at = Instant::now();
            if let Ok(n) = count_backlog(&shared).await {
                shared
                    .metrics
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
            "SELECT count(*) FROM (SELECT 1 FROM events WHERE next_attempt_at <= now() LIMIT $1) d",
            &[&DELIVERY_BACKLOG_COUNT_MAX],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.get(0))
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
    match tokio::time::timeout(RELEASE_TIMEOUT, work).await {
        Ok(Ok(n)) => n as usize,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "handing deliveries back failed; they resume after their lease");
            0
        }
        Err(_) => 0,
    }
}
