//! The recorder: outcomes are written in batches, one transaction each, every change conditional
//! on this node still holding the delivery (an ack, a pause, a redelivery, or another node's claim
//! after the lease ran out wins). The delivery pool's connections commit without waiting for the
//! disk (see `db::build_bookkeeping_pool`).
//!
//! What one outcome writes depends on what the delivery is held under:
//! - its batch's lease (no row of its own, first attempt): a success is one appended attempt
//!   row, nothing else; anything else gives the delivery its `deliveries` row (with the attempt);
//! - its own row: the row is updated (narrow, HOT where no indexed column changes) with the
//!   attempt appended.
//!
//! The same transaction writes what the outcomes did to their endpoints' health (only on a
//! change), disables endpoints, stores operational events, and deletes settled batch rows.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use deadpool_postgres::Pool;
use deadpool_postgres::Transaction;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::model::{Attempt, HealthWrite, Held, Next, Outcome, Recorded};
use super::shared::Shared;
use crate::config::RECORD_BATCH_MAX;
use crate::event_types::{DELIVERY_FAILED, ENDPOINT_DISABLED};
use crate::flow::answer::EndpointStatus;
use crate::flow::event::EventStatus;
use crate::flow::ORG_CHANGED_CHANNEL;
use crate::ids::{new_v7, EventId, Micros, OrgId};
use crate::json::Obj;

const LOG_COLUMNS: &str =
    "event_id, endpoint_id, attempt, at, response_status, error, duration_ms, response_body";

const LOG_UNDER_BATCH: &str = "\
    INSERT INTO delivery_attempts (event_id, endpoint_id, attempt, at, response_status, error, \
        duration_ms, response_body) \
    SELECT u.ev, u.ep, u.n, u.at, u.st, u.err, u.dur, u.body \
    FROM unnest($1::uuid[], $2::uuid[], $3::int[], $4::timestamptz[], $5::int2[], $6::text[], \
                $7::int[], $8::text[], $9::uuid[]) AS u(ev, ep, n, at, st, err, dur, body, batch) \
    WHERE EXISTS (SELECT 1 FROM delivery_batches b WHERE b.id = u.batch) \
      AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = u.ev AND d.endpoint_id = u.ep) \
    ON CONFLICT DO NOTHING \
    RETURNING event_id, endpoint_id";

const MATERIALIZE: &str = "\
    INSERT INTO deliveries (event_id, endpoint_id, org_id, status, attempts, retry_base, \
        next_attempt_at, failed_at) \
    SELECT u.ev, u.ep, u.org, u.status, u.tried, 0, \
           CASE WHEN e.status = $9 THEN NULL ELSE u.next END, u.failed \
    FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::int2[], $5::int[], $6::timestamptz[], \
                $7::timestamptz[], $8::uuid[]) AS u(ev, ep, org, status, tried, next, failed, batch) \
    JOIN events e ON e.id = u.ev \
    WHERE EXISTS (SELECT 1 FROM delivery_batches b WHERE b.id = u.batch) \
    ON CONFLICT DO NOTHING \
    RETURNING event_id, endpoint_id, next_attempt_at IS NULL";

const UPDATE_ROWS: &str = "\
    UPDATE deliveries d SET status = u.status, attempts = d.attempts + u.tried, \
        next_attempt_at = CASE WHEN d.next_attempt_at IS NULL THEN NULL ELSE u.next END, \
        delivered_at = COALESCE(u.delivered, d.delivered_at), failed_at = u.failed \
    FROM unnest($1::uuid[], $2::uuid[], $3::int2[], $4::int[], $5::timestamptz[], \
                $6::timestamptz[], $7::timestamptz[], $8::timestamptz[]) \
         AS u(ev, ep, status, tried, next, delivered, failed, held) \
    WHERE d.event_id = u.ev AND d.endpoint_id = u.ep \
      AND (d.next_attempt_at = u.held OR (d.next_attempt_at IS NULL AND d.status = 0)) \
    RETURNING d.event_id, d.endpoint_id, d.next_attempt_at IS NULL";

const WRITE_HEALTH: &str = "\
    UPDATE endpoints p SET consecutive_failures = u.failures, failing_since = u.since, \
        last_success_at = COALESCE(u.ok, p.last_success_at), \
        last_failure_at = COALESCE(u.bad, p.last_failure_at), circuit_open_until = u.open \
    FROM unnest($1::uuid[], $2::int[], $3::timestamptz[], $4::timestamptz[], $5::timestamptz[], \
                $6::timestamptz[]) AS u(id, failures, since, ok, bad, open) \
    WHERE p.id = u.id";

const DISABLE: &str = "\
    UPDATE endpoints SET status = $2, disabled_reason = $3, updated_at = $4 \
    WHERE id = $1 AND status = $5 RETURNING org_id";

/// An operational event in its organization, matched to the endpoints that name its type in a
/// pattern (`*` and no patterns never match an operational type), with their deliveries due
/// (parked for a paused endpoint).
const OPERATIONAL_EVENT: &str = "\
    WITH m AS ( \
        SELECT array_agg(p.id ORDER BY p.id) AS eps, array_agg(p.status ORDER BY p.id) AS sts \
        FROM endpoints p \
        WHERE p.org_id = $2 AND p.status IN (0, 1) AND EXISTS ( \
            SELECT 1 FROM unnest(p.event_types) AS pat \
            WHERE pat = $3 OR (right(pat, 2) = '.*' AND length($3) > length(pat) - 1 \
                               AND starts_with($3, left(pat, -1))))), \
    ev AS ( \
        INSERT INTO events (id, org_id, type, payload, status, endpoints, created_at) \
        SELECT $1, $2, $3, $4::text::json, CASE WHEN m.eps IS NULL THEN 0 ELSE 3 END, m.eps, $5 \
        FROM m RETURNING id) \
    INSERT INTO deliveries (event_id, endpoint_id, org_id, next_attempt_at) \
    SELECT $1, x.ep, $2, CASE WHEN x.st = 0 THEN $5 END \
    FROM m, unnest(m.eps, m.sts) AS x(ep, st)";

/// Write outcomes in batches until the pool stops; several recorders share one queue, so one
/// writes while the next gathers.
pub(super) async fn record_loop(
    shared: Arc<Shared>,
    rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Outcome>>>,
) {
    let db_timeout = Duration::from_millis(shared.config.db_timeout_ms);
    let mut batch = Vec::with_capacity(RECORD_BATCH_MAX);
    while rx
        .lock()
        .await
        .recv_many(&mut batch, RECORD_BATCH_MAX)
        .await
        > 0
    {
        let finished: Vec<Uuid> =
            std::mem::take(&mut *shared.finished.lock().unwrap_or_else(|p| p.into_inner()));
        let written = write_outcomes(&shared.pool, db_timeout, &batch, &finished).await;
        match &written {
            Some(w) => {
                for org in &w.disabled_orgs {
                    shared.forget_endpoints(Some(*org));
                }
                if w.operational > 0 {
                    shared
                        .metrics
                        .operational_events
                        .fetch_add(w.operational, std::sync::atomic::Ordering::Relaxed);
                    shared.wake.notify_one();
                }
                shared.metrics.endpoints_disabled.fetch_add(
                    w.disabled_orgs.len() as u64,
                    std::sync::atomic::Ordering::Relaxed,
                );
            }
            None => shared
                .finished
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(finished),
        }
        for o in batch.drain(..) {
            let key = (o.event.0, o.endpoint);
            let recorded = match &written {
                Some(w) if w.owned.contains(&key) => Recorded {
                    owned: true,
                    parked: w.parked.contains(&key),
                },
                _ => Recorded::LOST,
            };
            let _ = o.reply.send(recorded);
        }
    }
}

/// What one transaction wrote.
struct Written {
    owned: HashSet<(Uuid, Uuid)>,
    parked: HashSet<(Uuid, Uuid)>,
    disabled_orgs: Vec<OrgId>,
    operational: u64,
}

/// One transaction for a batch. `None` when it failed: the deliveries then stay as they were
/// (held by leases that run out), and are claimed again (an attempt may repeat: at-least-once).
async fn write_outcomes(
    pool: &Pool,
    db_timeout: Duration,
    batch: &[Outcome],
    finished: &[Uuid],
) -> Option<Written> {
    let work = async {
        let mut client = pool.get().await.map_err(|e| e.to_string())?;
        let tx = client.transaction().await.map_err(|e| e.to_string())?;
        let w = write_in(&tx, batch, finished)
            .await
            .map_err(|e| crate::db::describe(&e))?;
        tx.commit().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(w)
    };
    match tokio::time::timeout(db_timeout, work).await {
        Ok(Ok(w)) => Some(w),
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

fn sys(t: Micros) -> SystemTime {
    t.to_system_time()
}

/// The row state an outcome writes: (status, next_attempt_at, delivered_at, failed_at).
fn row_state(
    next: &Next,
) -> (
    i16,
    Option<SystemTime>,
    Option<SystemTime>,
    Option<SystemTime>,
) {
    match next {
        Next::Delivered(at) => (EventStatus::Delivered.code(), None, Some(sys(*at)), None),
        Next::Retry { held } => (EventStatus::Pending.code(), Some(sys(*held)), None, None),
        Next::Failed { at, .. } => (EventStatus::Failed.code(), None, None, Some(sys(*at))),
        Next::Parked => (EventStatus::Pending.code(), None, None, None),
        Next::Due(at) => (EventStatus::Pending.code(), Some(sys(*at)), None, None),
    }
}

/// Attempt rows, column by column.
#[derive(Default)]
struct LogRows<'a> {
    ev: Vec<Uuid>,
    ep: Vec<Uuid>,
    n: Vec<i32>,
    at: Vec<SystemTime>,
    status: Vec<Option<i16>>,
    error: Vec<Option<&'a str>>,
    duration: Vec<i32>,
    body: Vec<Option<&'a str>>,
    batch: Vec<Uuid>,
}

impl<'a> LogRows<'a> {
    fn push(&mut self, o: &Outcome, number: u32, a: &'a Attempt) {
        self.ev.push(o.event.0);
        self.ep.push(o.endpoint);
        self.n.push(number as i32);
        self.at.push(sys(a.at));
        self.status.push(a.status.map(|s| s as i16));
        self.error.push(a.error.as_deref());
        self.duration
            .push(a.duration.as_millis().min(i32::MAX as u128) as i32);
        self.body.push(a.response_body.as_deref());
    }

    async fn insert(&self, tx: &Transaction<'_>) -> Result<(), tokio_postgres::Error> {
        if self.ev.is_empty() {
            return Ok(());
        }
        let sql = format!(
            "INSERT INTO delivery_attempts ({LOG_COLUMNS}) \
             SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::int[], $4::timestamptz[], \
                                  $5::int2[], $6::text[], $7::int[], $8::text[]) \
             ON CONFLICT DO NOTHING"
        );
        let stmt = tx.prepare_cached(&sql).await?;
        tx.execute(
            &stmt,
            &[
                &self.ev,
                &self.ep,
                &self.n,
                &self.at,
                &self.status,
                &self.error,
                &self.duration,
                &self.body,
            ],
        )
        .await?;
        Ok(())
    }
}

async fn write_in(
    tx: &Transaction<'_>,
    batch: &[Outcome],
    finished: &[Uuid],
) -> Result<Written, tokio_postgres::Error> {
    let mut owned: HashSet<(Uuid, Uuid)> = HashSet::with_capacity(batch.len());
    let mut parked: HashSet<(Uuid, Uuid)> = HashSet::new();
    let mut take_rows = |rows: Vec<tokio_postgres::Row>, with_parked: bool| {
        for r in rows {
            let key: (Uuid, Uuid) = (r.get(0), r.get(1));
            if with_parked && r.get::<_, bool>(2) {
                parked.insert(key);
            }
            owned.insert(key);
        }
    };

    // Successes under a batch's lease: one appended row each, when the batch is still this
    // node's and no one gave the delivery a row of its own meanwhile.
    let mut under_batch = LogRows::default();
    for o in batch {
        if let (Held::Batch(b), Next::Delivered(_), Some((n, a))) = (o.held, &o.next, &o.attempt) {
            under_batch.push(o, *n, a);
            under_batch.batch.push(b);
        }
    }
    if !under_batch.ev.is_empty() {
        let l = &under_batch;
        let stmt = tx.prepare_cached(LOG_UNDER_BATCH).await?;
        let rows = tx
            .query(
                &stmt,
                &[
                    &l.ev,
                    &l.ep,
                    &l.n,
                    &l.at,
                    &l.status,
                    &l.error,
                    &l.duration,
                    &l.body,
                    &l.batch,
                ],
            )
            .await?;
        take_rows(rows, false);
    }

    // Anything else under a batch's lease: the delivery gets its own row.
    let mat: Vec<&Outcome> = batch
        .iter()
        .filter(|o| matches!(o.held, Held::Batch(_)) && !matches!(o.next, Next::Delivered(_)))
        .collect();
    if !mat.is_empty() {
        let mut cols = (
            vec![],
            vec![],
            vec![],
            vec![],
            vec![],
            vec![],
            vec![],
            vec![],
        );
        for o in &mat {
            let (status, next, _, failed) = row_state(&o.next);
            let Held::Batch(b) = o.held else { continue };
            cols.0.push(o.event.0);
            cols.1.push(o.endpoint);
            cols.2.push(o.org.0);
            cols.3.push(status);
            cols.4.push(i32::from(o.attempt.is_some()));
            cols.5.push(next);
            cols.6.push(failed);
            cols.7.push(b);
        }
        let stmt = tx.prepare_cached(MATERIALIZE).await?;
        let rows = tx
            .query(
                &stmt,
                &[
                    &cols.0,
                    &cols.1,
                    &cols.2,
                    &cols.3,
                    &cols.4,
                    &cols.5,
                    &cols.6,
                    &cols.7,
                    &EventStatus::Delivered.code(),
                ],
            )
            .await?;
        take_rows(rows, true);
    }

    // Deliveries under their own row's lease: the row is updated.
    let upd: Vec<&Outcome> = batch
        .iter()
        .filter(|o| matches!(o.held, Held::Row(_)))
        .collect();
    if !upd.is_empty() {
        let mut cols = (
            vec![],
            vec![],
            vec![],
            vec![],
            vec![],
            vec![],
            vec![],
            vec![],
        );
        for o in &upd {
            let (status, next, delivered, failed) = row_state(&o.next);
            let Held::Row(held) = o.held else { continue };
            cols.0.push(o.event.0);
            cols.1.push(o.endpoint);
            cols.2.push(status);
            cols.3.push(i32::from(o.attempt.is_some()));
            cols.4.push(next);
            cols.5.push(delivered);
            cols.6.push(failed);
            cols.7.push(sys(held));
        }
        let stmt = tx.prepare_cached(UPDATE_ROWS).await?;
        let rows = tx
            .query(
                &stmt,
                &[
                    &cols.0, &cols.1, &cols.2, &cols.3, &cols.4, &cols.5, &cols.6, &cols.7,
                ],
            )
            .await?;
        take_rows(rows, true);
    }

    // The attempts of the rows written above.
    let mut log = LogRows::default();
    for o in batch {
        let logged_above = matches!((o.held, &o.next), (Held::Batch(_), Next::Delivered(_)));
        if let Some((n, a)) = &o.attempt {
            if !logged_above && owned.contains(&(o.event.0, o.endpoint)) {
                log.push(o, *n, a);
            }
        }
    }
    log.insert(tx).await?;

    // Health: the last change of each endpoint, in id order (two recorders never deadlock).
    let mut health: BTreeMap<Uuid, &HealthWrite> = BTreeMap::new();
    for o in batch {
        if let Some(h) = &o.health {
            health.insert(h.endpoint, h);
        }
    }
    if !health.is_empty() {
        let ids: Vec<Uuid> = health.keys().copied().collect();
        let failures: Vec<i32> = health.values().map(|h| h.failures).collect();
        let since: Vec<Option<SystemTime>> =
            health.values().map(|h| h.failing_since.map(sys)).collect();
        let ok: Vec<Option<SystemTime>> = health.values().map(|h| h.success_at.map(sys)).collect();
        let bad: Vec<Option<SystemTime>> = health.values().map(|h| h.failure_at.map(sys)).collect();
        let open: Vec<Option<SystemTime>> =
            health.values().map(|h| h.open_until.map(sys)).collect();
        let stmt = tx.prepare_cached(WRITE_HEALTH).await?;
        tx.execute(&stmt, &[&ids, &failures, &since, &ok, &bad, &open])
            .await?;
    }

    // Disabled endpoints, and the operational events.
    let now = Micros::now();
    let mut disabled_orgs = Vec::new();
    let mut operational = 0u64;
    let mut disabled: HashSet<Uuid> = HashSet::new();
    for o in batch {
        let Some(reason) = &o.disable else { continue };
        if !disabled.insert(o.endpoint) {
            continue;
        }
        let row = tx
            .query_opt(
                DISABLE,
                &[
                    &o.endpoint,
                    &EndpointStatus::Disabled.code(),
                    reason,
                    &sys(now),
                    &EndpointStatus::Active.code(),
                ],
            )
            .await?;
        if let Some(row) = row {
            let org = OrgId(row.get(0));
            tracing::info!(endpoint = %o.endpoint, org = %org, reason = %reason, "endpoint disabled");
            tx.execute(
                "SELECT pg_notify($1, $2)",
                &[&ORG_CHANGED_CHANNEL, &org.to_string()],
            )
            .await?;
            operational_event(tx, org, ENDPOINT_DISABLED, o.endpoint, None, reason).await?;
            operational += 1;
            disabled_orgs.push(org);
        }
    }
    for o in batch {
        if let Next::Failed { reason, .. } = &o.next {
            if !o.operational && owned.contains(&(o.event.0, o.endpoint)) {
                operational_event(
                    tx,
                    o.org,
                    DELIVERY_FAILED,
                    o.endpoint,
                    Some(o.event),
                    reason,
                )
                .await?;
                operational += 1;
            }
        }
    }

    if !finished.is_empty() {
        let stmt = tx
            .prepare_cached("DELETE FROM delivery_batches WHERE id = ANY($1)")
            .await?;
        tx.execute(&stmt, &[&finished]).await?;
    }
    Ok(Written {
        owned,
        parked,
        disabled_orgs,
        operational,
    })
}

/// Store one operational event: `{"endpoint_id","event_id"?,"reason"}`.
async fn operational_event(
    tx: &Transaction<'_>,
    org: OrgId,
    event_type: &str,
    endpoint: Uuid,
    event: Option<EventId>,
    reason: &str,
) -> Result<(), tokio_postgres::Error> {
    let mut payload = Vec::with_capacity(160);
    let mut o = Obj::new(&mut payload);
    o.id("endpoint_id", &endpoint);
    if let Some(e) = event {
        o.id("event_id", &e.0);
    }
    o.str("reason", reason);
    o.finish();
    let payload = String::from_utf8(payload).unwrap_or_default();
    let now = Micros::now();
    let stmt = tx.prepare_cached(OPERATIONAL_EVENT).await?;
    tx.execute(
        &stmt,
        &[&new_v7(now), &org.0, &event_type, &payload, &sys(now)],
    )
    .await?;
    Ok(())
}
