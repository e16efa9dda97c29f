//! `GET /api/events/{id}` and `POST /api/events/{id}/redeliver`. Events are found by primary key
//! and organization, attempts and deliveries by their primary keys (event, endpoint, …).

use std::time::SystemTime;

use uuid::Uuid;

use super::ctx::{begin, Done, StoreCtx};
use super::rows::{event_view, EVENT_COLUMNS, EVENT_STATE};
use crate::event_types::endpoint_takes;
use crate::flow::answer::{
    Answer, AttemptView, DeliveryView, EndpointStatus, EventDetail, Refusal,
};
use crate::flow::event::EventStatus;
use crate::flow::event::STATUS_DERIVED;
use crate::ids::{Micros, OrgId};

/// The event, its delivery to each endpoint it matched (that still exists) and every attempt,
/// oldest first, read in one statement: one snapshot, so `attempts` always equals the number of
/// attempts listed.
pub async fn get_event(ctx: &StoreCtx, org: OrgId, id: Uuid) -> Done<Answer> {
    let client = ctx.pool.get().await?;
    let sql = format!(
        "SELECT {EVENT_COLUMNS}, a.endpoints, a.numbers, a.ats, a.statuses, a.errors, \
                a.durations, a.bodies, d.endpoints, d.statuses, d.nexts, d.delivered \
         FROM events e CROSS JOIN {EVENT_STATE} \
         LEFT JOIN LATERAL ( \
             SELECT array_agg(endpoint_id ORDER BY at, attempt) AS endpoints, \
                    array_agg(attempt ORDER BY at, attempt) AS numbers, \
                    array_agg(at ORDER BY at, attempt) AS ats, \
                    array_agg(response_status ORDER BY at, attempt) AS statuses, \
                    array_agg(error ORDER BY at, attempt) AS errors, \
                    array_agg(duration_ms ORDER BY at, attempt) AS durations, \
                    array_agg(response_body ORDER BY at, attempt) AS bodies \
             FROM delivery_attempts WHERE event_id = e.id) a ON true \
         LEFT JOIN LATERAL ( \
             SELECT array_agg(p.id ORDER BY u.ord) AS endpoints, \
                    array_agg(s.status ORDER BY u.ord) AS statuses, \
                    array_agg(r.next_attempt_at ORDER BY u.ord) AS nexts, \
                    array_agg(s.delivered_at ORDER BY u.ord) AS delivered \
             FROM unnest(e.endpoints) WITH ORDINALITY AS u(ep, ord) \
             JOIN endpoints p ON p.id = u.ep AND p.status <> $3 \
             CROSS JOIN LATERAL triggers_delivery(e.id, p.id) s \
             LEFT JOIN deliveries r ON r.event_id = e.id AND r.endpoint_id = p.id) d ON true \
         WHERE e.id = $1 AND e.org_id = $2"
    );
    let stmt = client.prepare_cached(&sql).await?;
    let row = client
        .query_opt(&stmt, &[&id, &org.0, &EndpointStatus::Removed.code()])
        .await?
        .ok_or(Refusal::NotFound("event not found"))?;
    fn list<T>(row: &tokio_postgres::Row, i: usize) -> Vec<T>
    where
        for<'a> T: tokio_postgres::types::FromSql<'a>,
    {
        row.get::<_, Option<Vec<T>>>(i).unwrap_or_default()
    }
    let endpoints: Vec<Uuid> = list(&row, 8);
    let numbers: Vec<i32> = list(&row, 9);
    let ats: Vec<SystemTime> = list(&row, 10);
    let statuses: Vec<Option<i16>> = list(&row, 11);
    let errors: Vec<Option<String>> = list(&row, 12);
    let durations: Vec<i32> = list(&row, 13);
    let bodies: Vec<Option<String>> = list(&row, 14);
    let attempts: Vec<AttemptView> = (0..numbers.len())
        .map(|i| AttemptView {
            endpoint_id: endpoints[i],
            attempt: numbers[i],
            at: Micros::from_system_time(ats[i]),
            response_status: statuses[i],
            error: errors[i].clone(),
            duration_ms: durations[i],
            response_body: bodies[i].clone(),
        })
        .collect();
    let d_endpoints: Vec<Uuid> = list(&row, 15);
    let d_statuses: Vec<i16> = list(&row, 16);
    let d_nexts: Vec<Option<SystemTime>> = list(&row, 17);
    let d_delivered: Vec<Option<SystemTime>> = list(&row, 18);
    let deliveries = (0..d_endpoints.len())
        .map(|i| DeliveryView {
            endpoint_id: d_endpoints[i],
            status: EventStatus::from_i16(d_statuses[i]),
            attempts: attempts
                .iter()
                .filter(|a| a.endpoint_id == d_endpoints[i])
                .count() as i32,
            next_attempt_at: d_nexts[i].map(Micros::from_system_time),
            delivered_at: d_delivered[i].map(Micros::from_system_time),
        })
        .collect();
    Ok(Answer::Event(Box::new(EventDetail {
        event: event_view(&row),
        deliveries,
        attempts,
    })))
}

/// Upsert a delivery's row for a new round: its retry budget starts over from the attempts
/// logged so far; due now (`$4` NULL: parked, for a paused endpoint). A row whose
/// `next_attempt_at` lies ahead is held by a node (or scheduled): it keeps it, so the holder's
/// attempt in flight is recorded and the round goes on from there; a lease is never taken from
/// under an attempt, nor from a parked row whose holder's attempt was in flight when it was
/// parked (it gets its `lease_until` back while that lasts, as a resume does). (A first attempt
/// still in flight under its batch's lease has no row yet: a redelivery racing it may repeat it;
/// at-least-once.)
const NEW_ROUND: &str = "\
    INSERT INTO deliveries (event_id, endpoint_id, org_id, status, attempts, retry_base, next_attempt_at) \
    SELECT $1, t.ep, $2, 0, c.n, c.n, t.next \
    FROM unnest($3::uuid[], $4::timestamptz[]) AS t(ep, next), \
    LATERAL (SELECT count(*)::int AS n FROM delivery_attempts a \
             WHERE a.event_id = $1 AND a.endpoint_id = t.ep) c \
    ON CONFLICT (event_id, endpoint_id, org_id) DO UPDATE SET status = 0, \
        retry_base = deliveries.attempts, \
        next_attempt_at = CASE WHEN deliveries.next_attempt_at > EXCLUDED.next_attempt_at \
                               THEN deliveries.next_attempt_at \
                               WHEN deliveries.next_attempt_at IS NULL \
                                    AND EXCLUDED.next_attempt_at IS NOT NULL \
                               THEN GREATEST(EXCLUDED.next_attempt_at, deliveries.lease_until) \
                               ELSE EXCLUDED.next_attempt_at END, \
        delivered_at = NULL, failed_at = NULL";

/// The batch rows that may hold a first attempt of the event in flight (its group commit's, a
/// claim's naming it) learn that a redelivery gave it a row: the recorder then checks their
/// successes against `deliveries` (migrations/0009). Few rows: only batches still held. Locked in
/// id order, as the lease renewal locks them, and before the round's delivery rows are written:
/// a take-over locks the batch row first too, then writes the rows of what it still owes, so the
/// two never wait for each other in a cycle (the redelivery waits for the batch, then starts its
/// round over the rows the take-over wrote).
const MARK_BATCHES: &str = "\
    UPDATE delivery_batches SET redelivered = true \
    WHERE id IN (SELECT id FROM delivery_batches \
                 WHERE (id = $1 OR $2 = ANY(members_event)) AND NOT redelivered \
                 ORDER BY id FOR UPDATE)";

/// A new round of attempts to every endpoint the event matched and every endpoint that takes
/// its type now (active or paused), or only to `endpoint`. An acknowledged event is
/// unacknowledged: it is pending again, whatever it was.
pub async fn redeliver(
    ctx: &StoreCtx,
    org: OrgId,
    id: Uuid,
    endpoint: Option<Uuid>,
) -> Done<Answer> {
    let mut client = ctx.pool.get().await?;
    let tx = begin(&mut client).await?;
    let row = tx
        .query_opt(
            "SELECT type, endpoints, status, batch_id FROM events \
             WHERE id = $1 AND org_id = $2 FOR UPDATE",
            &[&id, &org.0],
        )
        .await?
        .ok_or(Refusal::NotFound("event not found"))?;
    let event_type: String = row.get(0);
    let matched: Vec<Uuid> = row.get::<_, Option<Vec<Uuid>>>(1).unwrap_or_default();
    let status: i16 = row.get(2);
    let batch: Option<Uuid> = row.get(3);
    let live = [EndpointStatus::Active.code(), EndpointStatus::Paused.code()];
    let candidates = tx
        .query(
            "SELECT id, status, event_types FROM endpoints WHERE org_id = $1 AND status = ANY($2)",
            &[&org.0, &&live[..]],
        )
        .await?;
    let mut targets: Vec<(Uuid, bool)> = Vec::new();
    for c in &candidates {
        let (ep, ep_status): (Uuid, i16) = (c.get(0), c.get(1));
        let patterns: Option<Vec<String>> = c.get(2);
        let wanted = match endpoint {
            Some(named) => named == ep,
            None => matched.contains(&ep) || endpoint_takes(patterns.as_deref(), &event_type),
        };
        if wanted {
            targets.push((ep, ep_status == EndpointStatus::Paused.code()));
        }
    }
    if targets.is_empty() {
        return Err(match endpoint {
            Some(_) => Refusal::NotFound("endpoint not found (or disabled)"),
            None => Refusal::NoWebhook,
        }
        .into());
    }
    let now = Micros::now().to_system_time();
    let eps: Vec<Uuid> = targets.iter().map(|t| t.0).collect();
    let nexts: Vec<Option<SystemTime>> = targets
        .iter()
        .map(|&(_, paused)| (!paused).then_some(now))
        .collect();
    tx.execute(MARK_BATCHES, &[&batch, &id]).await?;
    tx.execute(NEW_ROUND, &[&id, &org.0, &eps, &nexts]).await?;
    let mut all = matched.clone();
    all.extend(eps.iter().filter(|e| !matched.contains(e)));
    if status != STATUS_DERIVED || all.len() != matched.len() {
        tx.execute(
            "UPDATE events SET status = $2, endpoints = $3, acknowledged_at = NULL, \
             delivered_at = NULL WHERE id = $1",
            &[&id, &STATUS_DERIVED, &all],
        )
        .await?;
    }
    tx.commit().await?;
    ctx.delivery.wake();
    Ok(Answer::Redelivered(id))
}
