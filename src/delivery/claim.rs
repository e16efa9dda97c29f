//! Durable delivery state: claims, lease renewal, and the hand-back.
//!
//! - `claim_loop`: at start, every `delivery_poll_ms`, and when woken:
//!   - renews the leases of the batches whose deliveries are still in memory, and expires at once
//!     those this node let go;
//!   - takes over expired batches (a node that crashed or stalled): what they still owe (no
//!     `deliveries` row, no successful attempt; a group commit's events, or a claim's members)
//!     becomes `deliveries` rows, due now;
//!   - claims due rows: `FOR UPDATE SKIP LOCKED` picks rows no other node is claiming; rows with
//!     no attempt yet leave the table, leased by one batch row that names them (as a group
//!     commit's deliveries are), and rows with attempts take this node's lease in
//!     `next_attempt_at`. Endpoints at their in-memory bound or with an open circuit are
//!     skipped, so one endpoint's backlog can't crowd out the others.
//! - `release_all`: at shutdown, deliveries still in memory are handed back, due when planned,
//!   and the batches still held expire at once.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::job::run_job;
use super::model::{BatchLease, Job, Lease};
use super::runtime::EndpointRuntime;
use super::shared::{Room, Shared};
use crate::config::{
    CLAIM_BATCH_MAX, DELIVERY_BACKLOG_COUNT_EVERY, DELIVERY_BACKLOG_COUNT_MAX, RELEASE_TIMEOUT,
};
use crate::db::{connection_lost, describe};
use crate::flow::event::{EventStatus, STATUS_DERIVED};
use crate::ids::{new_v7, EventId, Micros, OrgId};

/// Claim due rows, oldest first, skipping those another node is claiming. A row with no attempt
/// yet leaves the table and is leased by one new batch row naming it (`$5`; a success is then an
/// appended attempt only, as for a fresh event's delivery); a row with attempts (a retry, a
/// redelivery, a recovery: its state is in the row) stays, and this node's lease goes into its
/// `next_attempt_at`, and into `lease_until`, where a pause can't take it (migrations/0010).
///
/// Every lookup is by key, whatever the planner's estimates: the rows by their event ids
/// (`= ANY(ARRAY(…))`, with the exact pairs checked against a hashed list: `IS TRUE` keeps the
/// `IN` from becoming a join), the events one by one (`LATERAL … OFFSET 0`). Written as plain
/// joins, the prepared statement's generic plan hashed the whole deliveries table at every claim
/// (281 µs of PostgreSQL per claimed row with a backlog of 200,000; 18 µs now).
///
/// The rows' first and last event ids bound the delete and the update too: the generic plan can't
/// prune the day partitions by an array, but it prunes them by a range when it runs, so each looks
/// in the partitions of the claimed rows' days only, not in every day's (~0.2 µs per row and
/// partition: 38 partitions with the default retention).
///
/// It runs on that generic plan ([`CLAIM_BEGIN`]), planned once per connection: left to choose,
/// PostgreSQL kept planning it afresh at every claim (its generic cost estimate is high), about
/// 1 ms a claim with a day's partitions of three tables to consider, 4 µs per claimed row.
pub const CLAIM: &str = "\
    WITH due AS ( \
        SELECT event_id, endpoint_id, attempts FROM deliveries \
        WHERE next_attempt_at <= $1 AND endpoint_id <> ALL($2::uuid[]) \
        ORDER BY next_attempt_at LIMIT $3 \
        FOR UPDATE SKIP LOCKED), \
    fresh AS ( \
        DELETE FROM deliveries d \
        WHERE d.event_id = ANY(ARRAY(SELECT event_id FROM due WHERE attempts = 0)) \
          AND d.event_id >= (SELECT event_id FROM due WHERE attempts = 0 \
                             ORDER BY event_id LIMIT 1) \
          AND d.event_id <= (SELECT event_id FROM due WHERE attempts = 0 \
                             ORDER BY event_id DESC LIMIT 1) \
          AND ((d.event_id, d.endpoint_id) IN (SELECT event_id, endpoint_id FROM due \
                                               WHERE attempts = 0)) IS TRUE \
        RETURNING d.event_id, d.endpoint_id, d.org_id, d.attempts, d.retry_base), \
    again AS ( \
        UPDATE deliveries d SET next_attempt_at = $4, lease_until = $4 \
        WHERE d.event_id = ANY(ARRAY(SELECT event_id FROM due WHERE attempts > 0)) \
          AND d.event_id >= (SELECT event_id FROM due WHERE attempts > 0 \
                             ORDER BY event_id LIMIT 1) \
          AND d.event_id <= (SELECT event_id FROM due WHERE attempts > 0 \
                             ORDER BY event_id DESC LIMIT 1) \
          AND ((d.event_id, d.endpoint_id) IN (SELECT event_id, endpoint_id FROM due \
                                               WHERE attempts > 0)) IS TRUE \
        RETURNING d.event_id, d.endpoint_id, d.org_id, d.attempts, d.retry_base), \
    lease AS ( \
        INSERT INTO delivery_batches (id, lease_until, members_until, members_since, \
                                      first_event, last_event, org_id, members_event, \
                                      members_endpoint, members_org) \
        SELECT $5, 'infinity', $4, $1, (array_agg(event_id))[1], (array_agg(event_id))[1], \
               (array_agg(org_id))[1], array_agg(event_id), array_agg(endpoint_id), \
               array_agg(org_id) \
        FROM fresh HAVING count(*) > 0) \
    SELECT c.event_id, c.endpoint_id, c.org_id, c.attempts, c.retry_base, e.type, e.payload, \
           e.created_at, e.status, e.traceparent, c.batched \
    FROM (SELECT *, true AS batched FROM fresh UNION ALL SELECT *, false FROM again) c \
    CROSS JOIN LATERAL ( \
        SELECT e.type, e.payload::text AS payload, e.created_at, e.status, e.traceparent \
        FROM events e WHERE e.id = c.event_id AND e.org_id = c.org_id OFFSET 0) e";

/// What the claim's transaction starts with: the claim runs on its generic plan (see
/// [`CLAIM`]), for this transaction only.
pub const CLAIM_BEGIN: &str = "BEGIN; SET LOCAL plan_cache_mode = force_generic_plan";

/// Put ahead of [`TAKE_OVER`]'s own when claims' answers were lost: the rows those claims leased
/// by themselves (`CLAIM`'s `again`: `next_attempt_at` and `lease_until` both the lease's end,
/// one of `$4`) are made due now. Nothing in memory holds them, and the lease's end, to the
/// microsecond, names the claim.
const DUE_AGAIN: &str = "\
    WITH due_again AS ( \
        UPDATE deliveries SET next_attempt_at = $1, lease_until = NULL \
        WHERE next_attempt_at = ANY($4) AND lease_until = next_attempt_at), ";

/// Whether any of these endpoints has a delivery due.
const DUE_FOR: &str = "\
    SELECT EXISTS (SELECT 1 FROM deliveries WHERE next_attempt_at <= $1 AND endpoint_id = ANY($2))";

/// Expired batches: what they still owe becomes rows due now; the batch rows go. A group
/// commit's batch owes its events' deliveries (found by `batch_id`) with no successful attempt,
/// a claim's batch its members (whose events still exist) with no successful attempt since the
/// claim (a redelivery's member may have one from its previous round).
///
/// The events are looked up batch by batch, by their id range, or member by member, and the
/// attempts by event (each `… OFFSET 0` keeps the planner from turning a join round): left to
/// itself, with few events of the derived status in its statistics (an ingest-only load), it
/// scanned the whole events table at every poll to find none (86 ms at 486k events, growing with
/// the table), and its generic plan read the whole attempt log for any batch taken over.
const TAKE_OVER: &str = "\
    WITH b AS ( \
        DELETE FROM delivery_batches WHERE id IN ( \
            SELECT id FROM delivery_batches WHERE lease_until < $1 OR members_until < $1 \
            ORDER BY coalesce(members_until, lease_until) LIMIT $2 FOR UPDATE SKIP LOCKED) \
        RETURNING id, first_event, last_event, members_event, members_endpoint, members_org, \
                  members_since), \
    owed AS ( \
        SELECT e.id AS ev, ep.id AS ep, e.org_id AS org, NULL::timestamptz AS since \
        FROM b CROSS JOIN LATERAL ( \
            SELECT e.id, e.org_id, e.endpoints FROM events e \
            WHERE b.members_event IS NULL \
              AND e.id BETWEEN b.first_event AND b.last_event AND e.batch_id = b.id \
              AND e.status = $3 \
            OFFSET 0) e \
        CROSS JOIN LATERAL unnest(e.endpoints) AS ep(id) \
        UNION ALL \
        SELECT m.ev, m.ep, m.org, b.members_since \
        FROM b CROSS JOIN LATERAL unnest(b.members_event, b.members_endpoint, b.members_org) \
                 AS m(ev, ep, org) \
        WHERE EXISTS (SELECT 1 FROM (SELECT 1 FROM events e \
                                     WHERE e.id = m.ev AND e.org_id = m.org OFFSET 0) x)) \
    INSERT INTO deliveries (event_id, endpoint_id, org_id, next_attempt_at) \
    SELECT o.ev, o.ep, o.org, $1 FROM owed o \
    WHERE NOT EXISTS (SELECT 1 FROM ( \
        SELECT 1 FROM delivery_attempts a \
        WHERE a.event_id = o.ev AND a.endpoint_id = o.ep AND a.response_status BETWEEN 200 AND 299 \
          AND (o.since IS NULL OR a.at >= o.since) \
        OFFSET 0) x) \
    ON CONFLICT DO NOTHING";

/// Move the lease of the batches `$1` to `$2`: a claim's batch keeps it in `members_until` (its
/// `lease_until` stays 'infinity': see migrations/0008).
const SET_LEASE: &str = "\
    UPDATE delivery_batches \
    SET lease_until = CASE WHEN members_event IS NULL THEN $2::timestamptz \
                           ELSE 'infinity' END, \
        members_until = CASE WHEN members_event IS NULL THEN NULL ELSE $2::timestamptz END \
    WHERE id = ANY($1)";

/// Batches taken over per statement.
const TAKE_OVER_BATCHES: i64 = 100;

/// Claim due deliveries until the pool stops.
pub(super) async fn claim_loop(shared: Arc<Shared>) {
    let poll = Duration::from_millis(shared.config.delivery_poll_ms);
    let mut counted_at = Instant::now() - DELIVERY_BACKLOG_COUNT_EVERY;
    loop {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        shared.client.sweep();
        // A clock this far off would take over other nodes' live leases (ahead), or renew its
        // own into the past (behind): claim and renew nothing until it is back. What it holds
        // is handed back, due now, as each comes to its attempt (`job::lease_allows_attempt`),
        // and its leases run out as they were last written.
        if shared.clock_off() {
            tokio::select! {
                _ = tokio::time::sleep(poll) => {}
                _ = shared.stop.notified() => return,
            }
            continue;
        }
        if let Err(e) = renew(&shared).await {
            tracing::warn!(error = %e, "renewing delivery leases failed");
        }
        match take_over(&shared).await {
            Ok(n) if n > 0 => tracing::info!(deliveries = n, "expired delivery batches taken over"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "taking over expired batches failed"),
        }
        // What the claimer stopped for, with the endpoints it had to leave out.
        let (room, at_bound) = loop {
            let free = shared
                .config
                .delivery_queue_max
                .saturating_sub(shared.in_memory.load(Ordering::Relaxed));
            // Room for one more payload of the largest size, or nothing is claimed.
            if free == 0 || shared.memory.free() < shared.config.payload_bytes_max {
                break (Room::Node, Vec::new());
            }
            // At most as many rows as largest payloads fit the memory budget: claimed rows are
            // taken into memory whatever their size.
            let by_bytes = shared.memory.free() / shared.config.payload_bytes_max.max(1);
            let limit = free.min(CLAIM_BATCH_MAX).min(by_bytes);
            match claim(&shared, limit).await {
                // Fewer than asked: nothing else is due, or what is due is for endpoints that
                // hold all they may.
                Ok((n, at_bound)) if n < limit => {
                    let room = match at_bound.is_empty() {
                        true => Room::NotWaiting,
                        false => Room::Endpoint,
                    };
                    break (room, at_bound);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "claiming due deliveries failed");
                    break (Room::NotWaiting, Vec::new());
                }
            }
        };
        if room != Room::NotWaiting {
            // Say what would wake it, then look again: the room may have come free meanwhile.
            shared.claim_waits.store(room as u8, Ordering::Relaxed);
            if shared.has_room(room, &at_bound) {
                shared
                    .claim_waits
                    .store(Room::NotWaiting as u8, Ordering::Relaxed);
                continue;
            }
        }
        if counted_at.elapsed() >= DELIVERY_BACKLOG_COUNT_EVERY {
            counted_at = Instant::now();
            shared.prune_runtimes();
            if let Err(e) = count_gauges(&shared).await {
                tracing::debug!(error = %e, "delivery gauges not counted");
            }
        }
        tokio::select! {
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep(poll) => {}
            _ = shared.stop.notified() => return,
        }
    }
}

/// Move on the leases of the batches whose deliveries are still in memory (when half their time
/// is gone); expire at once the batches this node let go.
async fn renew(shared: &Shared) -> Result<(), String> {
    let now = Micros::now();
    let half = Duration::from_micros(shared.lease.as_micros() as u64 / 2);
    let due: Vec<Arc<super::model::BatchLease>> = shared
        .batches
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .filter(|b| !b.abandoned.load(Ordering::Acquire) && b.until() < now.plus(half))
        .cloned()
        .collect();
    let expire: Vec<Uuid> =
        std::mem::take(&mut *shared.expire.lock().unwrap_or_else(|p| p.into_inner()));
    if due.is_empty() && expire.is_empty() {
        return Ok(());
    }
    let until = now.plus(shared.lease);
    let ids: Vec<Uuid> = due.iter().map(|b| b.id).collect();
    let work = async {
        let client = shared
            .pool
            .get()
            .await
            .map_err(|e| crate::db::describe_pool(&e))?;
        if !expire.is_empty() {
            client
                .execute(SET_LEASE, &[&expire, &now.to_system_time()])
                .await
                .map_err(|e| describe(&e))?;
        }
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows = client
            .query(
                &format!("{SET_LEASE} RETURNING id"),
                &[&ids, &until.to_system_time()],
            )
            .await
            .map_err(|e| describe(&e))?;
        Ok::<_, String>(rows.iter().map(|r| r.get::<_, Uuid>(0)).collect::<Vec<_>>())
    };
    let renewed = tokio::time::timeout(shared.db_timeout(), work)
        .await
        .map_err(|_| "database deadline passed".to_string())?;
    let renewed = match renewed {
        Ok(r) => r,
        Err(e) => {
            shared
                .expire
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(expire);
            return Err(e);
        }
    };
    for b in due {
        if renewed.contains(&b.id) {
            b.until.store(until.0, Ordering::Relaxed);
        } else {
            // Taken over by another node: its deliveries here find out when they record.
            b.abandoned.store(true, Ordering::Release);
        }
    }
    Ok(())
}

/// Take over expired batches; returns how many deliveries became due rows.
async fn take_over(shared: &Shared) -> Result<u64, String> {
    let now = Micros::now().to_system_time();
    let lost = shared.leases_lost();
    let (sql, n) = match lost.is_empty() {
        true => (std::borrow::Cow::Borrowed(TAKE_OVER), 3),
        false => (TAKE_OVER.replacen("WITH ", DUE_AGAIN, 1).into(), 4),
    };
    let work = async {
        let client = shared
            .pool
            .get()
            .await
            .map_err(|e| crate::db::describe_pool(&e))?;
        let stmt = client
            .prepare_cached(&sql)
            .await
            .map_err(|e| describe(&e))?;
        let params: [&(dyn ToSql + Sync); 4] = [&now, &TAKE_OVER_BATCHES, &STATUS_DERIVED, &lost];
        client
            .execute(&stmt, &params[..n])
            .await
            .map_err(|e| describe(&e))
    };
    let taken = tokio::time::timeout(shared.db_timeout(), work)
        .await
        .unwrap_or_else(|_| Err("database deadline passed".to_string()));
    if taken.is_err() {
        shared.leases_lost_again(lost);
    }
    taken
}

/// Claim up to `limit` due rows into memory; returns how many were claimed, and the endpoints
/// left out for holding all they may.
async fn claim(
    shared: &Arc<Shared>,
    limit: usize,
) -> Result<(usize, Vec<Arc<EndpointRuntime>>), String> {
    let (excluded, at_bound) = shared.excluded_endpoints();
    let now = Micros::now();
    let held = now.plus(shared.lease);
    let batch_id = new_v7(now);
    let work = async {
        let client = shared
            .pool
            .get()
            .await
            .map_err(|e| crate::db::describe_pool(&e))?;
        let stmt = client
            .prepare_cached(CLAIM)
            .await
            .map_err(|e| describe(&e))?;
        let now_at = now.to_system_time();
        let held_at = held.to_system_time();
        let limit = limit as i64;
        let params: [&(dyn ToSql + Sync); 5] = [&now_at, &excluded, &limit, &held_at, &batch_id];
        // The transaction in one round trip: its start, the claim, and COMMIT (which ends the
        // transaction as a rollback if the claim failed) are sent before any answer is read.
        // (`join3` polls them in this order, and each sends its request at its first poll.)
        let (begun, rows, committed) = futures_util::future::join3(
            client.batch_execute(CLAIM_BEGIN),
            client.query(&stmt, &params),
            client.batch_execute("COMMIT"),
        )
        .await;
        if committed.as_ref().is_err_and(connection_lost) {
            // The connection ended once COMMIT went out: the claim may have committed. Its
            // batch row, if it did, expires at the next renewal, and the rows it leased by
            // themselves (retries, new rounds) are made due at the next take-over, so what it
            // took is taken again now, not when the lease ends.
            shared.expire_batch(batch_id);
            shared.lease_lost(held_at);
        }
        begun.map_err(|e| describe(&e))?;
        let rows = rows.map_err(|e| describe(&e))?;
        committed.map_err(|e| describe(&e))?;
        Ok::<_, String>(rows)
    };
    let rows = tokio::time::timeout(shared.db_timeout(), work)
        .await
        .map_err(|_| "database deadline passed".to_string())??;
    let n = rows.len();
    shared
        .metrics
        .deliveries_claimed
        .fetch_add(n as u64, Ordering::Relaxed);
    // The first attempts claimed are leased by the claim's batch row.
    let batched = rows.iter().filter(|r| r.get::<_, bool>(10)).count();
    let batch = (batched > 0).then(|| {
        let batch = Arc::new(BatchLease {
            id: batch_id,
            until: AtomicI64::new(held.0),
            outstanding: AtomicUsize::new(batched),
            abandoned: AtomicBool::new(false),
        });
        shared
            .batches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(batch_id, Arc::clone(&batch));
        batch
    });
    for r in rows {
        let acked = r.get::<_, i16>(8) == EventStatus::Delivered.code();
        let lease = match (r.get::<_, bool>(10), &batch) {
            (true, Some(b)) => Lease::Batch(Arc::clone(b)),
            _ => Lease::Row { held },
        };
        let job = Job {
            event: EventId(r.get(0)),
            endpoint: r.get(1),
            org: OrgId(r.get(2)),
            attempts: r.get::<_, i32>(3).max(0) as u32,
            retry_base: r.get::<_, i32>(4).max(0) as u32,
            event_type: r.get::<_, &str>(5).into(),
            payload: bytes::Bytes::copy_from_slice(r.get::<_, &str>(6).as_bytes()),
            created_at: Micros::from_system_time(r.get(7)),
            traceparent: r.get::<_, Option<&str>>(9).map(Into::into),
            lease,
            due: now,
            waited: false,
            reserved: None,
            looked: 0,
        };
        let runtime = shared.runtime(job.org, job.endpoint);
        shared.reserve(&runtime, None, job.payload.len(), true);
        tokio::spawn(run_job(Arc::clone(shared), job, runtime, acked));
    }
    // Fewer than asked: the endpoints left out matter only if rows of theirs are due (under a
    // steady load they hold what ingest gave them, and none are).
    let mut at_bound = at_bound;
    if n < limit && !at_bound.is_empty() {
        let ids: Vec<Uuid> = at_bound.iter().map(|r| r.id).collect();
        let waiting = async {
            let client = shared
                .pool
                .get()
                .await
                .map_err(|e| crate::db::describe_pool(&e))?;
            client
                .query_one(DUE_FOR, &[&now.to_system_time(), &ids])
                .await
                .map(|r| r.get::<_, bool>(0))
                .map_err(|e| describe(&e))
        };
        let waiting = tokio::time::timeout(shared.db_timeout(), waiting)
            .await
            .map_err(|_| "database deadline passed".to_string())??;
        if !waiting {
            at_bound.clear();
        }
    }
    Ok((n, at_bound))
}

/// Count what waits in the database, for the metrics: due deliveries (bounded), parked ones,
/// and endpoints by status.
async fn count_gauges(shared: &Shared) -> Result<(), String> {
    let client = shared
        .pool
        .get()
        .await
        .map_err(|e| crate::db::describe_pool(&e))?;
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM (SELECT 1 FROM deliveries \
                     WHERE next_attempt_at <= now() LIMIT $1) d), \
                    (SELECT count(*) FROM (SELECT 1 FROM deliveries \
                     WHERE status = 0 AND next_attempt_at IS NULL LIMIT $1) p), \
                    (SELECT count(*) FROM endpoints WHERE status = 0), \
                    (SELECT count(*) FROM endpoints WHERE status = 1), \
                    (SELECT count(*) FROM endpoints WHERE status = 2)",
            &[&DELIVERY_BACKLOG_COUNT_MAX],
        )
        .await
        .map_err(|e| describe(&e))?;
    let m = &shared.metrics;
    m.delivery_due_backlog.store(row.get(0), Ordering::Relaxed);
    m.deliveries_parked.store(row.get(1), Ordering::Relaxed);
    for (i, gauge) in m.endpoints_by_status.iter().enumerate() {
        gauge.store(row.get(2 + i), Ordering::Relaxed);
    }
    Ok(())
}

/// Hand every delivery still in memory back to the database, due when it was planned (if this
/// node still holds it), and expire the batches still held so any node takes them over now.
/// Returns how many deliveries and batches were handed back.
pub(super) async fn release_all(shared: &Shared) -> usize {
    let held: Vec<((EventId, Uuid), (Micros, Micros))> = shared
        .held
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drain()
        .collect();
    let mut batches: Vec<Uuid> = shared
        .batches
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drain()
        .map(|(id, _)| id)
        .collect();
    batches.extend(std::mem::take(
        &mut *shared.expire.lock().unwrap_or_else(|p| p.into_inner()),
    ));
    if held.is_empty() && batches.is_empty() {
        return 0;
    }
    let events: Vec<Uuid> = held.iter().map(|((e, _), _)| e.0).collect();
    let endpoints: Vec<Uuid> = held.iter().map(|((_, p), _)| *p).collect();
    let leases: Vec<SystemTime> = held.iter().map(|(_, (h, _))| h.to_system_time()).collect();
    // Each keeps its planned time: a retry scheduled in 8 s is still due in 8 s, on any node.
    let due: Vec<SystemTime> = held.iter().map(|(_, (_, d))| d.to_system_time()).collect();
    let now = Micros::now().to_system_time();
    let work = async {
        let client = shared
            .pool
            .get()
            .await
            .map_err(|e| crate::db::describe_pool(&e))?;
        let rows = client
            .execute(
                "UPDATE deliveries d SET next_attempt_at = u.due, lease_until = NULL \
                 FROM unnest($1::uuid[], $2::uuid[], $3::timestamptz[], $4::timestamptz[]) \
                      AS u(ev, ep, held, due) \
                 WHERE d.event_id = u.ev AND d.endpoint_id = u.ep AND d.next_attempt_at = u.held",
                &[&events, &endpoints, &leases, &due],
            )
            .await
            .map_err(|e| describe(&e))?;
        let expired = client
            .execute(SET_LEASE, &[&batches, &now])
            .await
            .map_err(|e| describe(&e))?;
        Ok::<_, String>((rows + expired) as usize)
    };
    match tokio::time::timeout(RELEASE_TIMEOUT, work).await {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "handing deliveries back failed; they resume after their lease");
            0
        }
        Err(_) => 0,
    }
}
