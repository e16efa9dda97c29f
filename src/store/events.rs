//! `GET /api/events/{id}` and `POST /api/events/{id}/redeliver`. Events are found by primary key
//! and organization, attempts by their primary key (event, attempt).

use super::ctx::{Done, StoreCtx};
use super::rows::{event_view, EVENT_COLUMNS};
use crate::flow::answer::{Answer, AttemptView, EventDetail, Refusal};
use crate::flow::event::EventStatus;
use std::time::SystemTime;

use uuid::Uuid;

use crate::ids::{Micros, OrgId};

/// The event and its attempts, oldest first, read in one statement: one snapshot, so `attempts`
/// always equals the number of attempts listed.
pub async fn get_event(ctx: &StoreCtx, org: OrgId, id: Uuid) -> Done<Answer> {
    let client = ctx.pool.get().await?;
    let sql = format!(
        "SELECT {EVENT_COLUMNS}, a.numbers, a.ats, a.statuses, a.errors, a.durations \
         FROM events e LEFT JOIN LATERAL ( \
             SELECT array_agg(attempt ORDER BY attempt) AS numbers, \
                    array_agg(at ORDER BY attempt) AS ats, \
                    array_agg(response_status ORDER BY attempt) AS statuses, \
                    array_agg(error ORDER BY attempt) AS errors, \
                    array_agg(duration_ms ORDER BY attempt) AS durations \
             FROM delivery_attempts WHERE event_id = e.id) a ON true \
         WHERE e.id = $1 AND e.org_id = $2"
    );
    let stmt = client.prepare_cached(&sql).await?;
    let row = client
        .query_opt(&stmt, &[&id, &org.0])
        .await?
        .ok_or(Refusal::NotFound("event not found"))?;
    let numbers: Vec<i32> = row.get::<_, Option<Vec<i32>>>(8).unwrap_or_default();
    let ats: Vec<SystemTime> = row.get::<_, Option<Vec<SystemTime>>>(9).unwrap_or_default();
    let statuses: Vec<Option<i16>> = row.get::<_, Option<_>>(10).unwrap_or_default();
    let errors: Vec<Option<String>> = row.get::<_, Option<_>>(11).unwrap_or_default();
    let durations: Vec<i32> = row.get::<_, Option<Vec<i32>>>(12).unwrap_or_default();
    let attempts = numbers
        .into_iter()
        .zip(ats)
        .zip(statuses)
        .zip(errors)
        .zip(durations)
        .map(
            |((((attempt, at), response_status), error), duration_ms)| AttemptView {
                attempt,
                at: Micros::from_system_time(at),
                response_status,
                error,
                duration_ms,
            },
        )
        .collect();
    Ok(Answer::Event(Box::new(EventDetail {
        event: event_view(&row),
        attempts,
    })))
}

/// A new round of attempts: the retry budget starts over and the event is due now.
pub async fn redeliver(ctx: &StoreCtx, org: OrgId, id: Uuid) -> Done<Answer> {
    let client = ctx.pool.get().await?;
    let stmt = client
        .prepare_cached(
            "SELECT o.webhook_url IS NOT NULL, \
                    EXISTS (SELECT 1 FROM events WHERE id = $1 AND org_id = $2) \
             FROM organizations o WHERE o.id = $2",
        )
        .await?;
    let row = client
        .query_opt(&stmt, &[&id, &org.0])
        .await?
        .ok_or(Refusal::NotFound("event not found"))?;
    let (has_webhook, exists): (bool, bool) = (row.get(0), row.get(1));
    if !exists {
        return Err(Refusal::NotFound("event not found").into());
    }
    if !has_webhook {
        return Err(Refusal::NoWebhook.into());
    }
    let stmt = client
        .prepare_cached(
            "UPDATE events SET status = $4, retry_base = attempts, next_attempt_at = $3, \
             delivered_at = NULL, acknowledged_at = NULL \
             WHERE id = $1 AND org_id = $2 RETURNING id",
        )
        .await?;
    let now = Micros::now();
    if client
        .query_opt(
            &stmt,
            &[
                &id,
                &org.0,
                &now.to_system_time(),
                &EventStatus::Pending.code(),
            ],
        )
        .await?
        .is_none()
    {
        return Err(Refusal::NotFound("event not found").into());
    }
    ctx.delivery.wake();
    Ok(Answer::Redelivered(id))
}
