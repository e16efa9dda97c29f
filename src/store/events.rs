//! `GET /api/events/{id}` and `POST /api/events/{id}/redeliver`. Events are found by primary key
//! and organization, attempts by their primary key (event, attempt).

use super::ctx::{Done, StoreCtx};
use super::rows::{event_view, EVENT_COLUMNS};
use crate::flow::answer::{Answer, AttemptView, EventDetail, Refusal};
use crate::flow::event::EventStatus;
use crate::ids::{Micros, OrgId};
use uuid::Uuid;

/// The event and its attempts, oldest first.
pub async fn get_event(ctx: &StoreCtx, org: OrgId, id: Uuid) -> Done<Answer> {
    let client = ctx.pool.get().await?;
    let event_sql = format!("SELECT {EVENT_COLUMNS} FROM events WHERE id = $1 AND org_id = $2");
    let (event_stmt, attempts_stmt) = tokio::try_join!(
        client.prepare_cached(&event_sql),
        client.prepare_cached(
            "SELECT attempt, at, response_status, error, duration_ms FROM delivery_attempts \
             WHERE event_id = $1 ORDER BY attempt"
        ),
    )?;
    // Both statements go out together on the one connection.
    let (event_params, attempt_params): (
        [&(dyn tokio_postgres::types::ToSql + Sync); 2],
        [&(dyn tokio_postgres::types::ToSql + Sync); 1],
    ) = ([&id, &org.0], [&id]);
    let (event, attempts) = tokio::try_join!(
        client.query_opt(&event_stmt, &event_params),
        client.query(&attempts_stmt, &attempt_params),
    )?;
    let event = event.ok_or(Refusal::NotFound("event not found"))?;
    Ok(Answer::Event(Box::new(EventDetail {
        event: event_view(&event),
        attempts: attempts
            .iter()
            .map(|a| AttemptView {
                attempt: a.get(0),
                at: Micros::from_system_time(a.get(1)),
                response_status: a.get(2),
                error: a.get(3),
                duration_ms: a.get(4),
            })
            .collect(),
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
