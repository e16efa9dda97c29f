//! The recorder: outcomes are written in batches, one transaction each, every change conditional
//! on this node still holding the delivery (an ack, a pause, a redelivery, or another node's claim
//! after the lease ran out wins). The delivery pool's connections commit without waiting for the
//! disk (see `db::build_bookkeeping_pool`).
//!
//! What one outcome writes depends on what the delivery is held under:
//! - its batch's lease (no row of its own, first attempt: a fresh event's, or one claimed from
//!   a backlog): a success is one appended attempt
//!   row, nothing else (when the batch row still exists and no one gave the delivery a row of its
//!   own meanwhile: two index lookups per transaction, not per row); anything else gives the
//!   delivery its `deliveries` row (with the attempt);
//! - its own row: a success deletes the row (the appended attempt says delivered); anything else
//!   updates it (narrow) with the attempt appended.
//!
//! Every attempt row of a transaction goes in one binary COPY. The same transaction writes what
//! the outcomes did to their endpoints' health (only on a change), disables endpoints, stores
//! operational events, and deletes settled batch rows.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use deadpool_postgres::Pool;
use deadpool_postgres::Transaction;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::model::{Disable, HealthWrite, Held, Next, Outcome, Recorded};
use super::shared::Shared;
use crate::config::{
    RECORD_BATCH_MAX, RECORD_LINGER, RECORD_RETRY_MAX, RECORD_RETRY_MIN, WRITE_RUNS_MAX,
};
use crate::db::{connection_lost, copy::BinaryRows, describe, is_connection_error, rerun, Rerun};
use crate::event_types::{DELIVERY_FAILED, ENDPOINT_DISABLED};
use crate::flow::answer::EndpointStatus;
use crate::flow::event::EventStatus;
use crate::flow::{Change, ORG_CHANGED_CHANNEL};
use crate::ids::{new_v7, EventId, Micros, OrgId};
use crate::json::Obj;
use futures_util::SinkExt;
use std::sync::atomic::Ordering;

const COPY_LOG: &str = "COPY delivery_attempts (event_id, endpoint_id, attempt, at, \
     response_status, error, duration_ms, response_body, org_id) FROM STDIN (FORMAT binary)";

const MATERIALIZE: &str = "\
    INSERT INTO deliveries (event_id, endpoint_id, org_id, status, attempts, retry_base, \
        next_attempt_at, failed_at, lease_until) \
    SELECT u.ev, u.ep, u.org, u.status, u.tried, 0, \
           CASE WHEN e.status = $9 THEN NULL ELSE u.next END, u.failed, u.lease \
    FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::int2[], $5::int[], $6::timestamptz[], \
                $7::timestamptz[], $8::uuid[], $10::timestamptz[]) \
         AS u(ev, ep, org, status, tried, next, failed, batch, lease) \
    JOIN events e ON e.id = u.ev \
    WHERE EXISTS (SELECT 1 FROM delivery_batches b WHERE b.id = u.batch) \
    ON CONFLICT DO NOTHING \
    RETURNING event_id, endpoint_id, next_attempt_at IS NULL";

const UPDATE_ROWS: &str = "\
    UPDATE deliveries d SET status = u.status, attempts = d.attempts + u.tried, \
        next_attempt_at = CASE WHEN d.next_attempt_at IS NULL THEN NULL ELSE u.next END, \
        delivered_at = COALESCE(u.delivered, d.delivered_at), failed_at = u.failed, \
        lease_until = u.lease \
    FROM unnest($1::uuid[], $2::uuid[], $3::int2[], $4::int[], $5::timestamptz[], \
                $6::timestamptz[], $7::timestamptz[], $8::timestamptz[], $9::timestamptz[]) \
         AS u(ev, ep, status, tried, next, delivered, failed, held, lease) \
    WHERE d.event_id = u.ev AND d.endpoint_id = u.ep \
      AND (d.next_attempt_at = u.held OR (d.next_attempt_at IS NULL AND d.status = 0)) \
    RETURNING d.event_id, d.endpoint_id, d.next_attempt_at IS NULL";

const DELETE_DELIVERED: &str = "\
    DELETE FROM deliveries d \
    USING unnest($1::uuid[], $2::uuid[], $3::timestamptz[]) AS u(ev, ep, held) \
    WHERE d.event_id = u.ev AND d.endpoint_id = u.ep \
      AND (d.next_attempt_at = u.held OR (d.next_attempt_at IS NULL AND d.status = 0)) \
    RETURNING d.event_id, d.endpoint_id, false";

/// The last attempts' times are facts, always written; the breaker's state only when the
/// endpoint is no newer than the version the node's breaker went by (`seen`): a resume that
/// another node's breaker has not heard of yet is not undone by it.
const WRITE_HEALTH: &str = "\
    UPDATE endpoints p SET \
        consecutive_failures = CASE WHEN p.updated_at <= u.seen THEN u.failures \
                                    ELSE p.consecutive_failures END, \
        failing_since = CASE WHEN p.updated_at <= u.seen THEN u.since ELSE p.failing_since END, \
        circuit_open_until = CASE WHEN p.updated_at <= u.seen THEN u.open \
                                  ELSE p.circuit_open_until END, \
        last_success_at = COALESCE(u.ok, p.last_success_at), \
        last_failure_at = COALESCE(u.bad, p.last_failure_at) \
    FROM unnest($1::uuid[], $2::int[], $3::timestamptz[], $4::timestamptz[], $5::timestamptz[], \
                $6::timestamptz[], $7::timestamptz[]) AS u(id, failures, since, ok, bad, open, seen) \
    WHERE p.id = u.id";

const DISABLE: &str = "\
    UPDATE endpoints SET status = $2, disabled_reason = $3, updated_at = $4 \
    WHERE id = $1 AND status = $5 AND updated_at <= $7 \
      AND ($6::timestamptz IS NULL OR last_success_at IS NULL OR last_success_at <= $6) \
    RETURNING org_id";

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
/// writes while the next gathers. A batch waits up to `RECORD_LINGER` to fill: a transaction
/// costs the database about as much as a few hundred attempt rows.
pub(super) async fn record_loop(
    shared: Arc<Shared>,
    rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Outcome>>>,
) {
    let mut batch = Vec::with_capacity(RECORD_BATCH_MAX);
    let mut copy = BinaryRows::default();
    loop {
        {
            let mut rx = rx.lock().await;
            if rx.recv_many(&mut batch, RECORD_BATCH_MAX).await == 0 {
                return;
            }
            let deadline = tokio::time::Instant::now() + RECORD_LINGER;
            while batch.len() < RECORD_BATCH_MAX {
                let room = RECORD_BATCH_MAX - batch.len();
                match tokio::time::timeout_at(deadline, rx.recv_many(&mut batch, room)).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        }
        let finished: Vec<Uuid> =
            std::mem::take(&mut *shared.finished.lock().unwrap_or_else(|p| p.into_inner()));
        let written = write_outcomes(&shared, &batch, &finished, &mut copy).await;
        match &written {
            Some(w) => {
                for org in &w.disabled_orgs {
                    shared.forget_endpoints(Some(*org));
                }
                let m = &shared.metrics;
                if w.operational > 0 {
                    m.operational_events
                        .fetch_add(w.operational, Ordering::Relaxed);
                    shared.wake.notify_one();
                }
                m.endpoints_disabled
                    .fetch_add(w.disabled_orgs.len() as u64, Ordering::Relaxed);
                // Found inactive, but resumed by the time it was written: due now, for a claim.
                let resumed = batch.iter().any(|o| {
                    let key = (o.event.0, o.endpoint);
                    o.next == Next::Inactive && w.owned.contains(&key) && !w.parked.contains(&key)
                });
                if resumed {
                    shared.wake.notify_one();
                }
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
                Some(w) if w.owned.contains(&key) => Recorded::Owned {
                    parked: w.parked.contains(&key),
                },
                Some(_) => Recorded::Lost,
                None => Recorded::Failed,
            };
            shared.written(o, recorded);
        }
    }
}

/// What one transaction wrote.
struct Written {
    /// The transaction's id (`pg_current_xact_id`): whether it committed can be asked after.
    xid: String,
    owned: HashSet<(Uuid, Uuid)>,
    parked: HashSet<(Uuid, Uuid)>,
    disabled_orgs: Vec<OrgId>,
    operational: u64,
}

/// The batch's outcomes written ([`write_once`]); when nothing of them could be written for the
/// server's trouble (no connection, the database down or restarting, a full disk, no answer
/// before COMMIT was sent: nothing is half-written), written again after a pause that doubles
/// from `RECORD_RETRY_MIN` to `RECORD_RETRY_MAX`, for up to a lease (`--delivery-lease-s`)
/// while the node is not stopping. When COMMIT was sent and no answer came, the database is
/// asked, as often, whether that transaction committed ([`committed`]): then the outcomes are
/// written; rolled back, they are written again; still open (its session has not ended yet),
/// it is asked again. Each write is conditional on the node still holding the delivery, so one
/// that comes late, after another node took it over, changes nothing.
/// `None` when it was not written: the deliveries then stay as they were (held by leases that
/// run out), and are claimed again (an attempt may repeat: at-least-once).
async fn write_outcomes(
    shared: &Shared,
    batch: &[Outcome],
    finished: &[Uuid],
    copy: &mut BinaryRows,
) -> Option<Written> {
    let give_up = tokio::time::Instant::now() + shared.lease;
    let mut pause = RECORD_RETRY_MIN;
    let mut waited = false;
    let mut doubt: Option<Box<Written>> = None;
    let written = loop {
        // Why it was not written, and whether to try again.
        let (error, again) = match doubt.take() {
            None => {
                match write_once(&shared.pool, shared.db_timeout(), batch, finished, copy).await {
                    Ok(w) => break w,
                    Err(Fail::InDoubt(w)) => {
                        doubt = Some(w);
                        ("no answer to COMMIT".to_string(), true)
                    }
                    Err(failed) => (failed.to_string(), failed.nothing_written()),
                }
            }
            Some(w) => match committed(&shared.pool, shared.db_timeout(), &w.xid).await {
                Ok(Some(true)) => break *w,
                // Rolled back: nothing of it was written; written again at once.
                Ok(Some(false)) => continue,
                Ok(None) => {
                    doubt = Some(w);
                    ("its transaction is still open".to_string(), true)
                }
                Err(error) => {
                    doubt = Some(w);
                    (error, true)
                }
            },
        };
        if !again
            || shared.stopping.load(Ordering::SeqCst)
            || tokio::time::Instant::now() + pause >= give_up
        {
            tracing::warn!(%error, outcomes = batch.len(), "delivery outcomes not recorded; they will be retried after the lease");
            return None;
        }
        if !waited {
            tracing::warn!(%error, outcomes = batch.len(), "delivery outcomes not recorded; writing them again until the database takes them");
            waited = true;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(RECORD_RETRY_MAX);
    };
    if waited {
        tracing::info!(
            outcomes = batch.len(),
            "delivery outcomes recorded after all"
        );
    }
    Some(written)
}

/// Whether the transaction `xid`, whose COMMIT had no answer, committed (`Some(true)`), was
/// rolled back (`Some(false)`), or is still open (`None`: its session has not ended yet;
/// `idle_in_transaction_session_timeout`, keepalive and other nodes' stalled-session check end
/// it). An `Err` when the database could not be asked.
async fn committed(pool: &Pool, db_timeout: Duration, xid: &str) -> Result<Option<bool>, String> {
    let ask = async {
        let client = pool.get().await.map_err(|e| crate::db::describe_pool(&e))?;
        let row = client
            .query_one("SELECT pg_xact_status($1::text::xid8)", &[&xid])
            .await
            .map_err(|e| describe(&e))?;
        match row.get::<_, Option<&str>>(0) {
            Some("committed") => Ok(Some(true)),
            Some("aborted") => Ok(Some(false)),
            Some(_) => Ok(None),
            None => Err("the database no longer knows the transaction".into()),
        }
    };
    tokio::time::timeout(db_timeout, ask)
        .await
        .unwrap_or_else(|_| Err("no answer in time".into()))
}

/// One transaction for a batch, run again (up to `WRITE_RUNS_MAX` times, all within the one
/// `db_timeout`) when PostgreSQL asks for it (a deadlock's victim or a serialization failure was
/// rolled back whole) or its connection ended before COMMIT was sent (nothing was written):
/// answering it `Failed` would only repeat the attempts after their lease. [`Fail::InDoubt`]
/// when COMMIT was sent and no answer came (the time ran out, or the connection ended).
async fn write_once(
    pool: &Pool,
    db_timeout: Duration,
    batch: &[Outcome],
    finished: &[Uuid],
    copy: &mut BinaryRows,
) -> Result<Written, Fail> {
    let deadline = tokio::time::Instant::now() + db_timeout;
    let mut runs = 0;
    loop {
        runs += 1;
        // What the transaction wrote, kept here once COMMIT is sent: the time may run out
        // while its answer is on the way.
        let mut sent: Option<Written> = None;
        let work = async {
            let mut client = pool
                .get()
                .await
                .map_err(|e| Fail::Pool(crate::db::describe_pool(&e)))?;
            let tx = client.transaction().await?;
            sent = Some(write_in(&tx, batch, finished, copy).await?);
            tx.commit().await.map_err(Fail::Commit)
        };
        let ended = tokio::time::timeout_at(deadline, work).await;
        let failed = match (ended, sent) {
            (Ok(Ok(())), Some(w)) => return Ok(w),
            // An error before COMMIT was sent: the transaction was rolled back.
            (Ok(Err(failed)), None) => failed,
            (_, None) => return Err(Fail::Timeout),
            // COMMIT's own error: rolled back.
            (Ok(Err(Fail::Commit(e))), Some(_)) if !connection_lost(&e) => Fail::Commit(e),
            (_, Some(w)) => return Err(Fail::InDoubt(Box::new(w))),
        };
        match failed.rerun().filter(|_| runs < WRITE_RUNS_MAX) {
            Some(why) => tracing::warn!(
                error = %failed,
                outcomes = batch.len(),
                "delivery outcomes' transaction not written, {why}; writing it again"
            ),
            None => return Err(failed),
        }
    }
}

/// Why a run of [`write_outcomes`] failed.
enum Fail {
    Pool(String),
    /// Before COMMIT was sent.
    Db(tokio_postgres::Error),
    /// COMMIT's own answer.
    Commit(tokio_postgres::Error),
    /// No answer before COMMIT was sent, within `--db-timeout-ms`.
    Timeout,
    /// COMMIT was sent and no answer came: what the transaction wrote, if it committed.
    InDoubt(Box<Written>),
}

impl Fail {
    /// Whether it is the server's trouble and certainly wrote nothing: no connection, no answer
    /// or an error before COMMIT (the transaction rolled back), or COMMIT answered with an error
    /// that is not the connection's end.
    fn nothing_written(&self) -> bool {
        match self {
            Fail::Pool(_) | Fail::Timeout => true,
            Fail::InDoubt(_) => false,
            Fail::Db(e) => is_connection_error(e),
            Fail::Commit(e) => {
                e.as_db_error().is_some() && is_connection_error(e) && !connection_lost(e)
            }
        }
    }

    /// Whether the transaction may be run again at once (`db::rerun`).
    fn rerun(&self) -> Option<Rerun> {
        match self {
            Fail::Pool(_) | Fail::Timeout | Fail::InDoubt(_) => None,
            Fail::Db(e) => rerun(e, false),
            Fail::Commit(e) => rerun(e, true),
        }
    }
}

impl std::fmt::Display for Fail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fail::Pool(e) => f.write_str(e),
            Fail::Db(e) | Fail::Commit(e) => f.write_str(&describe(e)),
            Fail::Timeout => f.write_str("no answer in time"),
            Fail::InDoubt(_) => f.write_str("no answer to COMMIT"),
        }
    }
}

impl From<tokio_postgres::Error> for Fail {
    fn from(e: tokio_postgres::Error) -> Self {
        Fail::Db(e)
    }
}

fn sys(t: Micros) -> SystemTime {
    t.to_system_time()
}

/// The row state an outcome writes: (status, next_attempt_at, delivered_at, failed_at).
fn row_state(
    o: &Outcome,
    endpoints: &LockedEndpoints,
) -> (
    i16,
    Option<SystemTime>,
    Option<SystemTime>,
    Option<SystemTime>,
) {
    match &o.next {
        Next::Delivered(at) => (EventStatus::Delivered.code(), None, Some(sys(*at)), None),
        Next::Retry { held } => (EventStatus::Pending.code(), Some(sys(*held)), None, None),
        Next::Failed { at, .. } => (EventStatus::Failed.code(), None, None, Some(sys(*at))),
        Next::Parked => (EventStatus::Pending.code(), None, None, None),
        Next::Inactive => {
            let due = endpoints.active(o.endpoint).then(|| sys(endpoints.now));
            (EventStatus::Pending.code(), due, None, None)
        }
        Next::Due(at) => (EventStatus::Pending.code(), Some(sys(*at)), None, None),
        Next::AfterCircuit { until } => {
            let due = endpoints.due(o.endpoint, *until, o.seen);
            (EventStatus::Pending.code(), Some(sys(due)), None, None)
        }
    }
}

/// The lease an outcome leaves on the delivery's row (`lease_until`, migrations/0010): the
/// node's, while it keeps the delivery in memory for its retry; none otherwise.
fn lease_of(o: &Outcome) -> Option<SystemTime> {
    match o.next {
        Next::Retry { held } => Some(sys(held)),
        _ => None,
    }
}

/// The endpoints a batch of outcomes writes or decides by, as stored, read (and locked) before
/// any delivery row is written; from them, when the deliveries handed back for an open circuit
/// are due.
#[derive(Default)]
struct LockedEndpoints {
    /// The endpoints' `updated_at`, as stored (a removed one is absent).
    stored: HashMap<Uuid, Micros>,
    /// Those of them that are active.
    active: HashSet<Uuid>,
    /// When they were read.
    now: Micros,
}

impl LockedEndpoints {
    /// Read the endpoints this transaction will write or decide by (those of circuit
    /// hand-backs, deliveries found inactive, health writes and disables), each under a
    /// `KEY SHARE` lock (a removed one too: the v1 webhook set again locks it), in id order,
    /// before any delivery row is touched. A resume locks its endpoint `FOR UPDATE` first and
    /// then its deliveries, so the two take their locks in the same order and serialize, never
    /// deadlock: a resume that committed first is seen here (its endpoint is newer, so a
    /// hand-back is due now and the breaker's state is not written over it; it is active, so a
    /// delivery found inactive is due now, not parked again), and one that comes after sees this
    /// transaction's rows (and makes what is due when the old circuit was to close, or parked,
    /// due now). The lock conflicts with nothing else a recorder or the ingest takes on an
    /// endpoint (their updates of it, `FOR NO KEY UPDATE`, included).
    async fn read(tx: &Transaction<'_>, batch: &[Outcome]) -> Result<Self, tokio_postgres::Error> {
        let mut ids: Vec<Uuid> = batch
            .iter()
            .filter(|o| {
                matches!(o.next, Next::AfterCircuit { .. } | Next::Inactive) || o.disable.is_some()
            })
            .map(|o| o.endpoint)
            .chain(
                batch
                    .iter()
                    .filter_map(|o| Some(o.health.as_ref()?.endpoint)),
            )
            .collect();
        if ids.is_empty() {
            return Ok(Self::default());
        }
        ids.sort_unstable();
        ids.dedup();
        let stmt = tx
            .prepare_cached(
                "SELECT id, updated_at, status FROM endpoints \
                 WHERE id = ANY($1) ORDER BY id FOR KEY SHARE",
            )
            .await?;
        let rows = tx.query(&stmt, &[&ids]).await?;
        Ok(Self {
            stored: rows
                .iter()
                .filter(|r| r.get::<_, i16>(2) != EndpointStatus::Removed.code())
                .map(|r| (r.get(0), Micros::from_system_time(r.get(1))))
                .collect(),
            active: rows
                .iter()
                .filter(|r| r.get::<_, i16>(2) == EndpointStatus::Active.code())
                .map(|r| r.get(0))
                .collect(),
            now: Micros::now(),
        })
    }

    /// Whether `endpoint` is active as stored: a delivery its node found it inactive for is
    /// then due at once (a resume came since), not parked.
    fn active(&self, endpoint: Uuid) -> bool {
        self.active.contains(&endpoint)
    }

    /// When a delivery handed back for `endpoint`'s circuit, open `until` as of the endpoint's
    /// version `seen`, is due: then, unless the endpoint changed since (or is gone).
    fn due(&self, endpoint: Uuid, until: Micros, seen: Micros) -> Micros {
        match self.stored.get(&endpoint) {
            Some(at) if *at <= seen => until,
            _ => self.now,
        }
    }
}

/// Whether an outcome is a first-attempt success under its batch's lease (an append only).
fn batch_success(o: &Outcome) -> bool {
    matches!((o.held, &o.next), (Held::Batch(_), Next::Delivered(_)))
}

/// The successes under a batch's lease that are still this node's: their batch row exists and
/// no one gave the delivery a row of its own (a redelivery; a take-over deletes the batch row).
/// Only the successes of batches a redelivery marked are looked up in `deliveries`
/// (migrations/0009): the usual batch costs one lookup of its row, not one per success.
async fn owned_batch_successes(
    tx: &Transaction<'_>,
    batch: &[Outcome],
) -> Result<HashSet<(Uuid, Uuid)>, tokio_postgres::Error> {
    let mut batches: Vec<Uuid> = Vec::new();
    for o in batch.iter().filter(|o| batch_success(o)) {
        if let Held::Batch(b) = o.held {
            if !batches.contains(&b) {
                batches.push(b);
            }
        }
    }
    if batches.is_empty() {
        return Ok(HashSet::new());
    }
    let live_stmt = tx
        .prepare_cached("SELECT id, redelivered FROM delivery_batches WHERE id = ANY($1)")
        .await?;
    let mut live: HashSet<Uuid> = HashSet::new();
    let mut marked: HashSet<Uuid> = HashSet::new();
    for r in tx.query(&live_stmt, &[&batches]).await? {
        let id: Uuid = r.get(0);
        live.insert(id);
        if r.get::<_, bool>(1) {
            marked.insert(id);
        }
    }
    let ours =
        |o: &&Outcome| batch_success(o) && matches!(o.held, Held::Batch(b) if live.contains(&b));
    let events: Vec<Uuid> = batch
        .iter()
        .filter(ours)
        .filter(|o| matches!(o.held, Held::Batch(b) if marked.contains(&b)))
        .map(|o| o.event.0)
        .collect();
    let mut taken: HashSet<(Uuid, Uuid)> = HashSet::new();
    if !events.is_empty() {
        let rows_stmt = tx
            .prepare_cached("SELECT event_id, endpoint_id FROM deliveries WHERE event_id = ANY($1)")
            .await?;
        for r in tx.query(&rows_stmt, &[&events]).await? {
            taken.insert((r.get(0), r.get(1)));
        }
    }
    Ok(batch
        .iter()
        .filter(ours)
        .map(|o| (o.event.0, o.endpoint))
        .filter(|key| !taken.contains(key))
        .collect())
}

/// Append the attempts of the owned outcomes with one binary COPY.
async fn append_attempts(
    tx: &Transaction<'_>,
    batch: &[Outcome],
    owned: &HashSet<(Uuid, Uuid)>,
    copy: &mut BinaryRows,
) -> Result<(), tokio_postgres::Error> {
    copy.begin();
    for o in batch {
        let Some((n, a)) = &o.attempt else { continue };
        if !owned.contains(&(o.event.0, o.endpoint)) {
            continue;
        }
        let size = 9 * 4
            + 16 * 3
            + 4
            + 8
            + 2
            + 4
            + a.error.as_ref().map_or(0, String::len)
            + a.response_body.as_ref().map_or(0, String::len);
        copy.row(9, size)
            .uuid(&o.event.0)
            .uuid(&o.endpoint)
            .i32(*n as i32)
            .time(a.at)
            .opt_i16(a.status.map(|s| s as i16))
            .opt_text(a.error.as_deref())
            .i32(a.duration.as_millis().min(i32::MAX as u128) as i32)
            .opt_text(a.response_body.as_deref())
            .uuid(&o.org.0);
    }
    if copy.rows() == 0 {
        return Ok(());
    }
    let stmt = tx.prepare_cached(COPY_LOG).await?;
    let sink = tx.copy_in::<_, bytes::Bytes>(&stmt).await?;
    futures_util::pin_mut!(sink);
    sink.send(copy.finish()).await?;
    sink.finish().await?;
    Ok(())
}

async fn write_in(
    tx: &Transaction<'_>,
    batch: &[Outcome],
    finished: &[Uuid],
    copy: &mut BinaryRows,
) -> Result<Written, tokio_postgres::Error> {
    let endpoints = LockedEndpoints::read(tx, batch).await?;
    // The batch rows whose deliveries are all settled (in earlier transactions: none of this
    // one's outcomes is under them) go before any delivery row is written: a redelivery and a
    // take-over lock a batch row before delivery rows too, so none of them waits for another in
    // a cycle.
    if !finished.is_empty() {
        let stmt = tx
            .prepare_cached("DELETE FROM delivery_batches WHERE id = ANY($1)")
            .await?;
        tx.execute(&stmt, &[&finished]).await?;
    }
    // The transaction's id comes with the first lookup's answer: both are sent at once, the
    // id's statement first (`try_join` polls it first), so an error of the lookup is its own.
    let (xid, mut owned) = tokio::try_join!(
        async {
            let stmt = tx
                .prepare_cached("SELECT pg_current_xact_id()::text")
                .await?;
            Ok(tx.query_one(&stmt, &[]).await?.get::<_, String>(0))
        },
        owned_batch_successes(tx, batch)
    )?;
    let mut parked: HashSet<(Uuid, Uuid)> = HashSet::new();
    let mut take_rows = |rows: Vec<tokio_postgres::Row>| {
        for r in rows {
            let key: (Uuid, Uuid) = (r.get(0), r.get(1));
            if r.get::<_, bool>(2) {
                parked.insert(key);
            }
            owned.insert(key);
        }
    };

    // Anything else under a batch's lease: the delivery gets its own row.
    let mat: Vec<&Outcome> = batch
        .iter()
        .filter(|o| matches!(o.held, Held::Batch(_)) && !batch_success(o))
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
        let mut leases: Vec<Option<SystemTime>> = Vec::with_capacity(mat.len());
        for o in &mat {
            let (status, next, _, failed) = row_state(o, &endpoints);
            let Held::Batch(b) = o.held else { continue };
            cols.0.push(o.event.0);
            cols.1.push(o.endpoint);
            cols.2.push(o.org.0);
            cols.3.push(status);
            cols.4.push(i32::from(o.attempt.is_some()));
            cols.5.push(next);
            cols.6.push(failed);
            cols.7.push(b);
            leases.push(lease_of(o));
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
                    &leases,
                ],
            )
            .await?;
        take_rows(rows);
    }

    // Delivered under their own row's lease: the row goes (the attempt row appended below says
    // delivered; a delete costs less than the update, and keeps the table to what is owed).
    let done: Vec<&Outcome> = batch
        .iter()
        .filter(|o| matches!((o.held, &o.next), (Held::Row(_), Next::Delivered(_))))
        .collect();
    if !done.is_empty() {
        let evs: Vec<Uuid> = done.iter().map(|o| o.event.0).collect();
        let eps: Vec<Uuid> = done.iter().map(|o| o.endpoint).collect();
        let held: Vec<SystemTime> = done
            .iter()
            .map(|o| match o.held {
                Held::Row(h) => sys(h),
                Held::Batch(_) => SystemTime::UNIX_EPOCH,
            })
            .collect();
        let stmt = tx.prepare_cached(DELETE_DELIVERED).await?;
        let rows = tx.query(&stmt, &[&evs, &eps, &held]).await?;
        take_rows(rows);
    }

    // Anything else under their own row's lease: the row is updated.
    let upd: Vec<&Outcome> = batch
        .iter()
        .filter(|o| matches!(o.held, Held::Row(_)) && !matches!(o.next, Next::Delivered(_)))
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
        let mut leases: Vec<Option<SystemTime>> = Vec::with_capacity(upd.len());
        for o in &upd {
            let (status, next, delivered, failed) = row_state(o, &endpoints);
            let Held::Row(held) = o.held else { continue };
            cols.0.push(o.event.0);
            cols.1.push(o.endpoint);
            cols.2.push(status);
            cols.3.push(i32::from(o.attempt.is_some()));
            cols.4.push(next);
            cols.5.push(delivered);
            cols.6.push(failed);
            cols.7.push(sys(held));
            leases.push(lease_of(o));
        }
        let stmt = tx.prepare_cached(UPDATE_ROWS).await?;
        let rows = tx
            .query(
                &stmt,
                &[
                    &cols.0, &cols.1, &cols.2, &cols.3, &cols.4, &cols.5, &cols.6, &cols.7, &leases,
                ],
            )
            .await?;
        take_rows(rows);
    }

    append_attempts(tx, batch, &owned, copy).await?;

    // Health: the last change of each endpoint, in id order (two recorders never deadlock).
    let mut health: BTreeMap<Uuid, (&HealthWrite, Micros)> = BTreeMap::new();
    for o in batch {
        if let Some(h) = &o.health {
            health.insert(h.endpoint, (h, o.seen));
        }
    }
    if !health.is_empty() {
        let ids: Vec<Uuid> = health.keys().copied().collect();
        let (mut failures, mut since, mut ok, mut bad, mut open, mut seen) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        for (h, version) in health.values() {
            failures.push(h.failures);
            since.push(h.failing_since.map(sys));
            ok.push(h.success_at.map(sys));
            bad.push(h.failure_at.map(sys));
            open.push(h.open_until.map(sys));
            seen.push(sys(*version));
        }
        let stmt = tx.prepare_cached(WRITE_HEALTH).await?;
        tx.execute(&stmt, &[&ids, &failures, &since, &ok, &bad, &open, &seen])
            .await?;
    }

    // Disabled endpoints, and the operational events.
    let now = Micros::now();
    let mut disabled_orgs = Vec::new();
    let mut operational = 0u64;
    let mut disabled: HashSet<Uuid> = HashSet::new();
    for o in batch {
        let Some(Disable {
            reason,
            unless_delivered_after,
        }) = &o.disable
        else {
            continue;
        };
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
                    &unless_delivered_after.map(sys),
                    &sys(o.seen),
                ],
            )
            .await?;
        if let Some(row) = row {
            let org = OrgId(row.get(0));
            tracing::info!(endpoint = %o.endpoint, org = %org, reason = %reason, "endpoint disabled");
            // Its endpoints changed, not its keys.
            tx.execute(
                "SELECT pg_notify($1, $2)",
                &[&ORG_CHANGED_CHANNEL, &Change::Endpoints.payload(org)],
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

    Ok(Written {
        xid,
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
