//! Group commit.
//!
//! `store_writers` writers take turns at the bounded write queue. A writer takes everything waiting
//! (up to `batch_events_max`, lingering `batch_linger_us` for more when the batch is small), then
//! releases the queue to the next writer and writes its batch:
//!
//! - events without a dedup id: one binary `COPY` into `events` (no unique check to pay for);
//! - events with one: one `INSERT … SELECT FROM unnest(…) ON CONFLICT DO NOTHING RETURNING id`,
//!   rows sorted by (organization, dedup id) so two writers always lock keys in the same order; the
//!   conflicting ones are looked up in the same transaction to answer 409 with the first event's id;
//! - both kinds in one batch share one transaction, with what delivery needs of them: each event
//!   carries the endpoints it matched (planned by the delivery pool just before the write); the
//!   deliveries this node holds in memory are leased by one `delivery_batches` row for the whole
//!   batch; deliveries it can't hold (no room, a paused endpoint) get their `deliveries` row, due
//!   or parked.
//!
//! Every waiting request is answered after COMMIT, the answers for one core in one message. While
//! one writer commits, the queue fills for the next: batches grow with load by themselves.
//!
//! A batch that fails for its data (a value PostgreSQL refuses) is retried row by row, so one bad
//! row never fails its neighbours. A batch that fails for the database answers 503 (durable mode);
//! in fast-ack mode, where the client already has its 202, it is retried until it is written.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::SinkExt;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{mpsc, Mutex, Notify};
use tokio::time::Instant;
use uuid::Uuid;

use super::copy::{CopyEncoder, RowPlan, COPY_EVENTS};
use super::ctx::StoreCtx;
use crate::config::{
    AckMode, COMMIT_DOUBT_WAIT, COPY_PIECE_BYTES, SLOW_BATCH, WRITE_RETRY_BACKOFF_MAX,
    WRITE_RETRY_BACKOFF_MIN, WRITE_RUNS_MAX,
};
use crate::db::{connection_lost, describe, event_id_taken, fault, no_partition, rerun, Fault};
use crate::flow::answer::{Completion, Outcome, Refusal};
use crate::flow::answer::{IngestOutcome, Ingested};
use crate::flow::event::{NewEvent, STATUS_DERIVED};
use crate::flow::job::WriteJob;
use crate::flow::sink::{BatchPlan, Disposition, Planned};
use crate::ids::{CoreId, EventId, Micros, OrgId};

/// The dedup keys first (`dedup_keys` is unique on (org_id, dedup_id); `events` is partitioned
/// and can't be), then the events whose key was new.
const INSERT_DEDUP: &str = "\
    WITH t AS ( \
        SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], \
                             $6::int2[], $7::text[], $8::uuid[], $9::timestamptz[], $10::text[]) \
          AS t(id, org_id, type, payload, dedup_id, status, endpoints, batch_id, created_at, \
               traceparent)), \
    k AS ( \
        INSERT INTO dedup_keys (org_id, dedup_id, event_id) \
        SELECT org_id, dedup_id, id FROM t ON CONFLICT DO NOTHING RETURNING event_id) \
    INSERT INTO events (id, org_id, type, payload, dedup_id, status, endpoints, batch_id, created_at, \
                        traceparent) \
    SELECT id, org_id, type, payload::json, dedup_id, status, endpoints::uuid[], batch_id, created_at, \
           traceparent \
    FROM t WHERE id IN (SELECT event_id FROM k) \
    RETURNING id";

/// Deliveries this node does not hold in memory: due now for any node's claimer, or parked.
const INSERT_DELIVERIES: &str = "\
    INSERT INTO deliveries (event_id, endpoint_id, org_id, next_attempt_at) \
    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::timestamptz[]) \
    ON CONFLICT DO NOTHING";

const INSERT_BATCH: &str = "\
    INSERT INTO delivery_batches (id, lease_until, first_event, last_event, org_id) \
    VALUES ($1, $2, $3, $4, $5)";

const FIND_DEDUP: &str = "\
    SELECT k.org_id, k.dedup_id, d.event_id \
    FROM unnest($1::uuid[], $2::text[]) AS k(org_id, dedup_id) \
    JOIN dedup_keys d ON d.org_id = k.org_id AND d.dedup_id = k.dedup_id";

/// Why a batch failed as a whole.
#[derive(Debug)]
enum BatchError {
    /// The database is gone or too slow: nothing in the batch is known to be written.
    Database(String),
    /// PostgreSQL refused the data of some row.
    Data(String),
    /// A row's event id is taken. Ids are this server's own (UUIDv7, strictly increasing in the
    /// process), so the event is there already: an earlier try of this batch (fast-ack mode
    /// writes a batch again when its COMMIT got no answer) committed after all.
    WrittenBefore,
}

/// How many writers are in a transaction, and a signal each time one finishes.
#[derive(Default)]
pub struct Turns {
    writing: AtomicUsize,
    done: Notify,
}

/// One writer's loop: take a batch, write it, answer, until the queue closes and is drained.
///
/// While another writer's transaction is in flight, a writer lets its batch grow until that
/// transaction ends, the batch is full, or `batch_overlap_us` passes: one transaction at a time
/// while commits are quick (so batches are as large as the load makes them, which is what makes
/// PostgreSQL cheap per event), a second one as soon as a commit is slow (so one slow fsync doesn't
/// hold every request behind it).
pub async fn run(
    n: usize,
    queue: Arc<Mutex<mpsc::Receiver<WriteJob>>>,
    turns: Arc<Turns>,
    ctx: Arc<StoreCtx>,
) {
    let max = ctx.config.batch_events_max;
    let linger = Duration::from_micros(ctx.config.batch_linger_us);
    let overlap = Duration::from_micros(ctx.config.batch_overlap_us.unwrap_or(0));
    let mut batch = Vec::with_capacity(max);
    let mut encoder = CopyEncoder::default();
    loop {
        batch.clear();
        {
            let mut rx = queue.lock().await;
            if rx.recv_many(&mut batch, max).await == 0 {
                break;
            }
            if batch.len() < max && turns.writing.load(Ordering::Acquire) > 0 {
                let deadline = tokio::time::Instant::now() + overlap;
                loop {
                    let done = turns.done.notified();
                    tokio::pin!(done);
                    done.as_mut().enable();
                    if turns.writing.load(Ordering::Acquire) == 0 {
                        break;
                    }
                    tokio::select! {
                        _ = &mut done => {}
                        _ = tokio::time::sleep_until(deadline) => break,
                    }
                }
                while batch.len() < max {
                    match rx.try_recv() {
                        Ok(job) => batch.push(job),
                        Err(_) => break,
                    }
                }
            }
            if !linger.is_zero() && batch.len() < max {
                let deadline = tokio::time::Instant::now() + linger;
                while batch.len() < max {
                    let room = max - batch.len();
                    match tokio::time::timeout_at(deadline, rx.recv_many(&mut batch, room)).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            }
        }
        if let Some(oldest) = batch.iter().map(|j| j.event.created_at.0).min() {
            let waited = (Micros::now().0 - oldest).max(0) as u64;
            ctx.metrics.write_wait.observe_us(waited);
        }
        turns.writing.fetch_add(1, Ordering::AcqRel);
        let (results, plan) = write_until_settled(&ctx, &mut encoder, &batch).await;
        turns.writing.fetch_sub(1, Ordering::AcqRel);
        turns.done.notify_waiters();
        answer(&ctx, &mut batch, results, plan);
    }
    tracing::debug!(writer = n, "write queue closed and drained");
}

/// Ask the delivery pool how each event of the batch is to be delivered. When the endpoints can't
/// be read the batch is not written (the database is in trouble; 503).
async fn plan_delivery(ctx: &StoreCtx, batch: &[WriteJob], deadline: Instant) -> Option<BatchPlan> {
    let events: Vec<&NewEvent> = batch.iter().map(|j| &j.event).collect();
    match tokio::time::timeout_at(deadline, ctx.delivery.plan(&events)).await {
        Ok(Ok(plan)) => Some(plan),
        Ok(Err(why)) => {
            tracing::warn!(error = %why, events = batch.len(), "endpoints unreadable; batch not written");
            // The probe says whether the database is gone or only this connection was.
            ctx.health.probe_now();
            None
        }
        Err(_) => {
            tracing::warn!(
                events = batch.len(),
                "endpoints not read in time; batch not written"
            );
            None
        }
    }
}

/// Write a batch. In fast-ack mode (the clients already have their 202) a failure of the server's
/// is retried until the batch is written or the shutdown deadline passes; what is then still not
/// written, and any row the database refused for its data, is dropped, counted in
/// `triggers_events_dropped_total` and logged.
async fn write_until_settled(
    ctx: &StoreCtx,
    encoder: &mut CopyEncoder,
    batch: &[WriteJob],
) -> (Vec<Ingested>, BatchPlan) {
    let mut backoff = WRITE_RETRY_BACKOFF_MIN;
    loop {
        // One deadline for the whole attempt (the plan, a connection, the transaction), so no
        // request waits more than `db_timeout` for its answer once a writer took it.
        let deadline = Instant::now() + ctx.db_timeout;
        // While the database is known down not even the plan is tried (it may need a read).
        let planned = match ctx.health.database_up() {
            true => plan_delivery(ctx, batch, deadline).await,
            false => None,
        };
        let (results, plan) = match planned {
            Some(plan) => (
                write_batch(ctx, encoder, batch, &plan, deadline).await,
                plan,
            ),
            None => (
                vec![Ingested::Refused(Refusal::Unavailable); batch.len()],
                BatchPlan {
                    events: vec![Planned::default(); batch.len()],
                    lease: None,
                },
            ),
        };
        if ctx.config.ack == AckMode::Durable {
            return (results, plan);
        }
        let unwritten = results
            .iter()
            .filter(|r| **r == Ingested::Refused(Refusal::Unavailable))
            .count();
        // A batch is retried only when nothing of it was written (the usual case: a failed
        // transaction writes nothing). Part of it written happens only in the row-by-row
        // fallback when the database fails half-way: what is unwritten then is dropped, counted.
        if unwritten == 0 || unwritten < results.len() || ctx.past_stop_deadline() {
            let dropped = results
                .iter()
                .filter(|r| matches!(r, Ingested::Refused(_)))
                .count();
            if dropped > 0 {
                ctx.metrics.events_dropped(dropped as u64);
                tracing::error!(
                    events = dropped,
                    "fast-ack events answered 202 were not written and are dropped"
                );
            }
            return (results, plan);
        }
        tracing::warn!(
            events = unwritten,
            "fast-ack batch not written yet; retrying"
        );
        // The plan is made again for the retry: give back what this one held, and expire its
        // lease row now, since its COMMIT may have landed unanswered: what it wrote is then taken
        // over at once (the retry finds those events written before), not when the lease ends.
        let not_written = batch
            .iter()
            .zip(plan.events)
            .map(|(j, p)| (j.event.org, p))
            .collect();
        ctx.delivery.publish(plan.lease, Vec::new(), not_written);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(WRITE_RETRY_BACKOFF_MAX);
    }
}

async fn write_batch(
    ctx: &StoreCtx,
    encoder: &mut CopyEncoder,
    batch: &[WriteJob],
    plan: &BatchPlan,
    deadline: Instant,
) -> Vec<Ingested> {
    if !ctx.health.database_up() {
        return vec![Ingested::Refused(Refusal::Unavailable); batch.len()];
    }
    let all: Vec<usize> = (0..batch.len()).collect();
    match write_rows(ctx, encoder, batch, plan, &all, deadline).await {
        Ok(results) => results,
        Err(e @ (BatchError::Data(_) | BatchError::WrittenBefore)) if batch.len() > 1 => {
            // One row's data was refused, or one row is there already: write each on its own,
            // so it fails alone.
            let why = match e {
                BatchError::Data(why) => why,
                _ => "an event of it is written already".to_string(),
            };
            tracing::warn!(error = %why, events = batch.len(), "batch refused; writing row by row");
            let mut results = Vec::with_capacity(batch.len());
            for i in 0..batch.len() {
                // The database answered (it refused a row): each row gets its own time.
                let deadline = Instant::now() + ctx.db_timeout;
                results.push(
                    match write_rows(ctx, encoder, batch, plan, &[i], deadline).await {
                        Ok(mut r) => r.pop().unwrap_or(Ingested::Refused(Refusal::Internal)),
                        Err(BatchError::Data(why)) => refused_row(&batch[i], &why),
                        Err(BatchError::WrittenBefore) => Ingested::Duplicate(batch[i].event.id),
                        Err(BatchError::Database(why)) => {
                            tracing::warn!(error = %why, "row not written");
                            ctx.health.set_down();
                            Ingested::Refused(Refusal::Unavailable)
                        }
                    },
                );
            }
            written_before(batch, &results);
            results
        }
        Err(BatchError::Data(why)) => vec![refused_row(&batch[0], &why)],
        Err(BatchError::WrittenBefore) => {
            let results = vec![Ingested::Duplicate(batch[0].event.id)];
            written_before(batch, &results);
            results
        }
        Err(BatchError::Database(why)) => {
            tracing::warn!(error = %why, events = batch.len(), "batch not written");
            ctx.health.set_down();
            vec![Ingested::Refused(Refusal::Unavailable); batch.len()]
        }
    }
}

/// Rows whose event is there already ([`BatchError::WrittenBefore`]) are their own first ones
/// (`Ingested::Duplicate` of their own id), as for a dedup id seen before: not written again,
/// and not published for delivery (the earlier try's delivery rows or lease have them). Logged
/// once for the batch, however many (a large batch whose COMMIT's answer was lost has
/// thousands).
fn written_before(batch: &[WriteJob], results: &[Ingested]) {
    let mut own = batch
        .iter()
        .zip(results)
        .filter(|(j, r)| **r == Ingested::Duplicate(j.event.id));
    if let Some((first, _)) = own.next() {
        tracing::info!(
            events = 1 + own.count(),
            first = %first.event.id,
            "events written by an earlier try whose answer was lost; not written again"
        );
    }
}

/// A row the database refused for its own data (SQLSTATE class 22 or 23): the client's fault.
fn refused_row(job: &WriteJob, why: &str) -> Ingested {
    tracing::error!(error = %why, event = %job.event.id, "event refused by the database");
    Ingested::Refused(Refusal::Invalid {
        field: "payload",
        message: format!("the database refused the event: {why}"),
    })
}

/// Write the rows `rows` of `batch` in one transaction.
async fn write_rows(
    ctx: &StoreCtx,
    encoder: &mut CopyEncoder,
    batch: &[WriteJob],
    plan: &BatchPlan,
    rows: &[usize],
    deadline: Instant,
) -> Result<Vec<Ingested>, BatchError> {
    let mut runs = 0;
    // The answers of a try whose COMMIT went out unanswered (its own events counted written):
    // they stand if a later try finds it committed.
    let mut doubt: Option<Vec<Ingested>> = None;
    let mut asking_until = deadline;
    let mut doubted = false;
    let written = loop {
        let client = match tokio::time::timeout_at(deadline, ctx.writer_pool.get()).await {
            Ok(Ok(c)) => c,
            // In doubt, the database is asked for a while: it may be coming back.
            Ok(Err(_))
                if doubt.is_some() && Instant::now() + WRITE_RETRY_BACKOFF_MIN < asking_until =>
            {
                tokio::time::sleep(WRITE_RETRY_BACKOFF_MIN).await;
                continue;
            }
            Ok(Err(e)) => break Err(BatchError::Database(crate::db::describe_pool(&e))),
            Err(_) => break Err(BatchError::Database("no connection in time".into())),
        };
        runs += 1;
        let started = std::time::Instant::now();
        let work = write_rows_on(&client, encoder, batch, plan, rows);
        break match tokio::time::timeout_at(deadline, work).await {
            Ok(Ok(results)) => {
                let took = started.elapsed();
                ctx.metrics.write_commit.observe_us(took.as_micros() as u64);
                reached(ctx);
                if took > SLOW_BATCH {
                    tracing::warn!(
                        events = rows.len(),
                        ms = took.as_millis() as u64,
                        "slow commit: the database took long to write a batch (disk or checkpoint?)"
                    );
                }
                Ok(match doubt {
                    Some(_) => as_written(batch, rows, results),
                    None => results,
                })
            }
            Ok(Err((e, sent))) => {
                // The connection may be mid-transaction: never hand it back to the pool.
                let _ = deadpool_postgres::Object::take(client);
                if event_id_taken(&e) && doubt.is_some() {
                    // An event of the batch is there: the try in doubt committed (whole).
                    reached(ctx);
                    tracing::info!(
                        events = rows.len(),
                        "batch written by its unanswered COMMIT; not written again"
                    );
                    break Ok(doubt.unwrap_or_default());
                }
                if let Some(answers) = sent {
                    // COMMIT went out and the connection ended: the batch may be written or not.
                    // Writing it again (same rows, same plan) tells: an event or dedup id that
                    // is there already (waiting for a transaction still open) means it was.
                    if doubt.is_none() {
                        asking_until = deadline.min(Instant::now() + COMMIT_DOUBT_WAIT);
                        doubted = true;
                        ctx.metrics
                            .write_batches_in_doubt
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            error = %describe(&e),
                            events = rows.len(),
                            "batch's COMMIT unanswered; writing it again to find out"
                        );
                    }
                    doubt = Some(as_written(batch, rows, answers));
                    continue;
                }
                if let Some(why) = rerun(&e, false).filter(|_| runs < WRITE_RUNS_MAX) {
                    // Nothing of it was written: the same rows again, within the same deadline
                    // (the pool's next connection, or none in time: 503). The health flag stays
                    // up: the database may be fine.
                    tracing::warn!(
                        error = %describe(&e),
                        events = rows.len(),
                        "batch transaction not written, {why}; writing it again"
                    );
                    continue;
                }
                if no_partition(&e) {
                    // The partitions for now are missing (a clock that jumped, every node down
                    // for longer than the week made ahead): made at once, not in an hour.
                    ctx.partitions_missing.notify_one();
                }
                if event_id_taken(&e) {
                    break Err(BatchError::WrittenBefore);
                }
                match fault(&e) {
                    Fault::Data => Err(BatchError::Data(describe(&e))),
                    Fault::Server => Err(BatchError::Database(describe(&e))),
                }
            }
            Err(_) => {
                let _ = deadpool_postgres::Object::take(client);
                Err(BatchError::Database(format!(
                    "no commit within {:?}",
                    ctx.db_timeout
                )))
            }
        };
    };
    if doubted && written.is_err() {
        // Its COMMIT went unanswered and what became of it stayed unknown.
        ctx.metrics
            .write_batches_unresolved
            .fetch_add(1, Ordering::Relaxed);
    }
    written
}

/// The database answered a batch: reads need not wait for the health probe to say it can be
/// reached (the probe may have found it out of reach a moment before, and asks again only every
/// 200 ms).
fn reached(ctx: &StoreCtx) {
    ctx.health.set_reachable(true);
}

/// What the events table stores of an event's plan.
fn row_plan<'a>(planned: &'a Planned, lease: Option<(Uuid, Micros)>) -> RowPlan<'a> {
    let matched = !planned.endpoints.is_empty();
    RowPlan {
        status: if matched {
            STATUS_DERIVED
        } else {
            crate::flow::event::EventStatus::Pending.code()
        },
        endpoints: matched.then_some(&planned.endpoints[..]),
        batch: lease.filter(|_| planned.held()).map(|(id, _)| id),
    }
}

/// Answers of a write of `rows` that found some of its own events there already (a dedup id
/// naming the event itself): those were written by an earlier try, the events are stored.
fn as_written(batch: &[WriteJob], rows: &[usize], mut results: Vec<Ingested>) -> Vec<Ingested> {
    for (r, &i) in results.iter_mut().zip(rows) {
        if *r == Ingested::Duplicate(batch[i].event.id) {
            *r = Ingested::Committed;
        }
    }
    results
}

/// The batch's transaction, COMMIT included. On failure: the error, and when the connection
/// ended once COMMIT was sent (the batch's fate is unknown) the answers it would have had.
///
/// What follows the last statement whose answer decides the rest (the COPY's end when no row has
/// a dedup id, the delivery rows, the lease row, COMMIT) is sent at once and answered in one round
/// trip: PostgreSQL runs the statements in order, an error in one aborts the transaction (COMMIT
/// then only rolls back), and the answers are read in order, the first error being the batch's.
/// The answer to the client still waits for COMMIT's.
async fn write_rows_on(
    client: &deadpool_postgres::Client,
    encoder: &mut CopyEncoder,
    batch: &[WriteJob],
    plan: &BatchPlan,
    rows: &[usize],
) -> Result<Vec<Ingested>, (tokio_postgres::Error, Option<Vec<Ingested>>)> {
    let before = |e| (e, None);
    let (deduped, plain): (Vec<usize>, Vec<usize>) = rows
        .iter()
        .partition(|&&i| batch[i].event.dedup_id.is_some());
    // Always an explicit transaction: the 201 is sent after COMMIT's answer, never on the
    // strength of a COPY's CommandComplete in autocommit.
    let mut results: HashMap<usize, Ingested> = HashMap::with_capacity(rows.len());
    // Prepared before the COPY starts: a statement prepared while it runs would queue behind it
    // and never be answered. (Cached per connection: a round trip only on its first batch.)
    let insert_deliveries = client
        .prepare_cached(INSERT_DELIVERIES)
        .await
        .map_err(before)?;
    let insert_batch = client.prepare_cached(INSERT_BATCH).await.map_err(before)?;
    let mut copy = None;
    if plain.is_empty() {
        client.batch_execute("BEGIN").await.map_err(before)?;
    } else {
        let statement = client.prepare_cached(COPY_EVENTS).await.map_err(before)?;
        // BEGIN and the COPY's start in one round trip: the client sends both before it reads
        // an answer, and the server runs them in order. (Only a broken connection fails a
        // BEGIN, and then the COPY too.)
        let start = futures_util::future::join(
            client.batch_execute("BEGIN"),
            client.copy_in::<_, bytes::Bytes>(&statement),
        );
        futures_util::pin_mut!(start);
        // The first poll sends both; the first piece is encoded while they travel.
        let early = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(std::future::Future::poll(start.as_mut(), cx))
        })
        .await;
        // Encoded and sent in pieces: the encoder holds at most one piece, not the batch.
        encoder.begin();
        let mut first = 0;
        while first < plain.len() && encoder.pending_bytes() < COPY_PIECE_BYTES {
            let i = plain[first];
            encoder.row(&batch[i].event, row_plan(&plan.events[i], plan.lease));
            first += 1;
        }
        let (begun, sink) = match early {
            std::task::Poll::Ready(started) => started,
            std::task::Poll::Pending => start.await,
        };
        begun.map_err(before)?;
        let mut sink = Box::pin(sink.map_err(before)?);
        for &i in &plain[first..] {
            encoder.row(&batch[i].event, row_plan(&plan.events[i], plan.lease));
            if encoder.pending_bytes() >= COPY_PIECE_BYTES {
                sink.send(encoder.take()).await.map_err(before)?;
            }
        }
        debug_assert_eq!(encoder.rows(), plain.len());
        sink.send(encoder.finish()).await.map_err(before)?;
        // Written if the transaction commits; a failure of any statement fails them all.
        for &i in &plain {
            results.insert(i, Ingested::Committed);
        }
        copy = Some(sink);
    }
    if !deduped.is_empty() {
        // The dedup insert's answer decides which events get delivery rows: the COPY ends first.
        if let Some(mut sink) = copy.take() {
            sink.as_mut().finish().await.map_err(before)?;
        }
        insert_deduped(client, batch, plan, deduped, &mut results)
            .await
            .map_err(before)?;
    }
    let state = DeliveryState::of(batch, plan, rows, &results);
    // Polled in this order on the first poll, so sent in this order.
    let copy_end = async {
        match copy {
            Some(mut sink) => sink.as_mut().finish().await.map(|written| {
                debug_assert_eq!(written as usize, plain.len(), "COPY wrote every row");
            }),
            None => Ok(()),
        }
    };
    let deliveries = async {
        match &state.deliveries {
            Some((events, endpoints, orgs, due)) => client
                .execute(&insert_deliveries, &[events, endpoints, orgs, due])
                .await
                .map(drop),
            None => Ok(()),
        }
    };
    let lease = async {
        match &state.lease {
            Some((id, until, first, last, org)) => client
                .execute(&insert_batch, &[id, until, first, last, org])
                .await
                .map(drop),
            None => Ok(()),
        }
    };
    let (copied, delivered, leased, committed) =
        futures_util::future::join4(copy_end, deliveries, lease, client.batch_execute("COMMIT"))
            .await;
    // An error answer to a statement before COMMIT (a refusal, or the session's end: 57P01)
    // means PostgreSQL aborted the transaction and never ran COMMIT: nothing was written. A
    // connection that ended with no answer once COMMIT was sent leaves the batch's fate unknown
    // (the backend may have committed, and a proxy or a broken path lose answers it sent): the
    // answers it would have had go with the error, for the caller to find out.
    let results = rows
        .iter()
        .map(|i| {
            results
                .remove(i)
                .unwrap_or(Ingested::Refused(Refusal::Internal))
        })
        .collect();
    let before_commit = copied.and(delivered).and(leased);
    let unknown = match (&before_commit, &committed) {
        (Err(e), _) => e.code().is_none() && connection_lost(e),
        (Ok(()), Err(e)) => connection_lost(e),
        (Ok(()), Ok(())) => false,
    };
    match before_commit.and(committed) {
        Ok(()) => Ok(results),
        Err(e) if unknown => Err((e, Some(results))),
        Err(e) => Err(before(e)),
    }
}

/// What the batch's transaction writes for delivery: the `deliveries` rows of the deliveries this
/// node does not hold, and the lease row of those it does.
struct DeliveryState {
    /// Event, endpoint, organization and due time (none: parked) of each `deliveries` row.
    #[allow(clippy::type_complexity)]
    deliveries: Option<(Vec<Uuid>, Vec<Uuid>, Vec<Uuid>, Vec<Option<SystemTime>>)>,
    /// The lease row: its id, end, first and last event, and the first event's organization.
    lease: Option<(Uuid, SystemTime, Uuid, Uuid, Uuid)>,
}

impl DeliveryState {
    fn of(
        batch: &[WriteJob],
        plan: &BatchPlan,
        rows: &[usize],
        results: &HashMap<usize, Ingested>,
    ) -> DeliveryState {
        let committed = rows
            .iter()
            .copied()
            .filter(|i| results.get(i) == Some(&Ingested::Committed));
        let (mut events, mut endpoints, mut orgs, mut due) = (vec![], vec![], vec![], vec![]);
        let (mut first, mut last): (Option<Uuid>, Option<Uuid>) = (None, None);
        // The batch row names the organization of its first event (the distribution key, see
        // migrations/0007).
        let mut first_org: Option<Uuid> = None;
        for i in committed {
            let (e, p) = (&batch[i].event, &plan.events[i]);
            for (endpoint, disposition) in p.endpoints.iter().zip(&p.dispositions) {
                let next = match disposition {
                    Disposition::Held => {
                        if first.is_none_or(|f| e.id.0 < f) {
                            first = Some(e.id.0);
                            first_org = Some(e.org.0);
                        }
                        last = Some(last.map_or(e.id.0, |l| l.max(e.id.0)));
                        continue;
                    }
                    Disposition::Due => Some(e.created_at.to_system_time()),
                    Disposition::Parked => None,
                };
                events.push(e.id.0);
                endpoints.push(*endpoint);
                orgs.push(e.org.0);
                due.push(next);
            }
        }
        let lease = match (plan.lease, first, last, first_org) {
            (Some((id, until)), Some(first), Some(last), Some(org)) => {
                Some((id, until.to_system_time(), first, last, org))
            }
            _ => None,
        };
        DeliveryState {
            deliveries: (!events.is_empty()).then_some((events, endpoints, orgs, due)),
            lease,
        }
    }
}

async fn insert_deduped(
    client: &deadpool_postgres::Client,
    batch: &[WriteJob],
    plan: &BatchPlan,
    mut rows: Vec<usize>,
    results: &mut HashMap<usize, Ingested>,
) -> Result<(), tokio_postgres::Error> {
    // One lock order for all writers: no deadlock between two batches sharing keys. Of two rows
    // with one key in a batch the first to arrive (the lower index) comes first, and wins. (An
    // unstable sort with the index as the last key: the stable sort's code made the binary 3.6 KB
    // larger.)
    rows.sort_unstable_by(|&a, &b| {
        let (ea, eb) = (&batch[a].event, &batch[b].event);
        (ea.org, &ea.dedup_id, a).cmp(&(eb.org, &eb.dedup_id, b))
    });
    let n = rows.len();
    let mut ids = Vec::with_capacity(n);
    let mut orgs = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    let mut payloads = Vec::with_capacity(n);
    let mut dedups = Vec::with_capacity(n);
    let mut statuses: Vec<i16> = Vec::with_capacity(n);
    let mut endpoints: Vec<Option<String>> = Vec::with_capacity(n);
    let mut batches: Vec<Option<Uuid>> = Vec::with_capacity(n);
    let mut created: Vec<SystemTime> = Vec::with_capacity(n);
    let mut traces: Vec<Option<&str>> = Vec::with_capacity(n);
    for &i in &rows {
        let e = &batch[i].event;
        ids.push(e.id.0);
        orgs.push(e.org.0);
        types.push(&*e.event_type);
        // Validated JSON is UTF-8.
        payloads.push(std::str::from_utf8(&e.payload).unwrap_or("null"));
        dedups.push(e.dedup_id.as_deref().unwrap_or(""));
        let row = row_plan(&plan.events[i], plan.lease);
        statuses.push(row.status);
        // An array of arrays can't be bound; each event's endpoints go as an array literal.
        endpoints.push(row.endpoints.map(|eps| {
            let ids: Vec<String> = eps.iter().map(Uuid::to_string).collect();
            format!("{{{}}}", ids.join(","))
        }));
        batches.push(row.batch);
        created.push(e.created_at.to_system_time());
        traces.push(e.traceparent.as_deref());
    }
    let statement = client.prepare_cached(INSERT_DEDUP).await?;
    let inserted: std::collections::HashSet<Uuid> = client
        .query(
            &statement,
            &[
                &ids, &orgs, &types, &payloads, &dedups, &statuses, &endpoints, &batches, &created,
                &traces,
            ],
        )
        .await?
        .iter()
        .map(|r| r.get::<_, Uuid>(0))
        .collect();
    let mut conflicts = Vec::new();
    for &i in &rows {
        if inserted.contains(&batch[i].event.id.0) {
            results.insert(i, Ingested::Committed);
        } else {
            conflicts.push(i);
        }
    }
    if conflicts.is_empty() {
        return Ok(());
    }
    let orgs: Vec<Uuid> = conflicts.iter().map(|&i| batch[i].event.org.0).collect();
    let keys: Vec<&str> = conflicts
        .iter()
        .map(|&i| batch[i].event.dedup_id.as_deref().unwrap_or(""))
        .collect();
    let statement = client.prepare_cached(FIND_DEDUP).await?;
    let found: HashMap<(Uuid, String), Uuid> = client
        .query(&statement, &[&orgs, &keys])
        .await?
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect();
    for &i in &conflicts {
        let e = &batch[i].event;
        let key = (e.org.0, e.dedup_id.as_deref().unwrap_or("").to_string());
        results.insert(
            i,
            match found.get(&key) {
                Some(first) => Ingested::Duplicate(EventId(*first)),
                // The conflicting row vanished between the two statements: only a manual
                // delete does that. Refuse rather than claim a duplicate we can't name.
                None => Ingested::Refused(Refusal::Unavailable),
            },
        );
    }
    Ok(())
}

/// Send every answer (one message per origin core), settle the dedup keys on their owners, and
/// publish the committed events to delivery.
fn answer(ctx: &StoreCtx, batch: &mut Vec<WriteJob>, results: Vec<Ingested>, plan: BatchPlan) {
    debug_assert_eq!(batch.len(), results.len(), "one result per row");
    debug_assert_eq!(batch.len(), plan.events.len(), "one plan per row");
    let lease = plan.lease;
    let mut replies: HashMap<CoreId, Vec<Completion>> = HashMap::new();
    let mut settled: HashMap<CoreId, Vec<_>> = HashMap::new();
    let mut to_deliver: Vec<(NewEvent, Planned)> = Vec::new();
    let mut not_written: Vec<(OrgId, Planned)> = Vec::new();
    let mut committed = 0u64;
    let bytes: usize = batch.iter().map(|j| j.event.payload.len()).sum();
    for ((job, result), planned) in batch.drain(..).zip(results).zip(plan.events) {
        if let Some((key, owner)) = job.dedup {
            let outcome = match &result {
                Ingested::Committed => Some(job.event.id),
                Ingested::Duplicate(first) => Some(*first),
                Ingested::Queued | Ingested::Refused(_) => None,
            };
            settled.entry(owner).or_default().push((key, outcome));
        }
        let written = result == Ingested::Committed;
        if let Some(to) = job.reply {
            replies.entry(to.core).or_default().push(Completion {
                slot: to.slot,
                outcome: Outcome::Ingested(IngestOutcome {
                    result,
                    rate: job.rate,
                }),
            });
        }
        if written {
            committed += 1;
            if !planned.endpoints.is_empty() {
                to_deliver.push((job.event, planned));
            }
        } else if planned.held() {
            not_written.push((job.event.org, planned));
        }
    }
    ctx.write_bytes.give(bytes);
    ctx.metrics.events_committed(committed);
    for (core, completions) in replies {
        ctx.cores.complete(core, completions);
    }
    for (core, keys) in settled {
        ctx.cores.settle(core, keys);
    }
    // Clients first, then deliveries: committed events go straight to the pool, no polling.
    if !to_deliver.is_empty() || !not_written.is_empty() || lease.is_some() {
        ctx.delivery.publish(lease, to_deliver, not_written);
    }
}
