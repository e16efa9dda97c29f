//! `GET /api/inbox` and the acks. Every statement uses `events_inbox` (org_id, status, id) or the
//! primary key.

use std::collections::HashSet;

use futures_util::TryStreamExt;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::ctx::{Done, StoreCtx};
use super::rows::{event_view, EVENT_COLUMNS};
use crate::flow::answer::{Answer, InboxPage, Refusal};
use crate::flow::event::EventStatus;
use crate::ids::{Micros, OrgId};

/// One page, newest first; `more_before` is set when another page follows. A page stops early
/// once its payloads pass `inbox_page_bytes_max` (at least one event is always given), and rows
/// are read as they stream in, so a page of large payloads never sits in memory whole.
pub async fn inbox(
    ctx: &StoreCtx,
    org: OrgId,
    limit: u32,
    status: EventStatus,
    before: Option<Uuid>,
) -> Done<Answer> {
    let client = ctx.pool.get().await?;
    let stmt = client
        .prepare_cached(&format!(
            "SELECT {EVENT_COLUMNS} FROM events e \
             WHERE e.org_id = $1 AND e.status = $2 AND e.id < $3 ORDER BY e.id DESC LIMIT $4"
        ))
        .await?;
    let before = before.unwrap_or(Uuid::max());
    let (status, fetch) = (status.code(), i64::from(limit) + 1);
    let params: [&(dyn ToSql + Sync); 4] = [&org.0, &status, &before, &fetch];
    let rows = client.query_raw(&stmt, params).await?;
    futures_util::pin_mut!(rows);
    let cap = ctx.config.inbox_page_bytes_max;
    let (mut events, mut bytes, mut more) = (Vec::new(), 0usize, false);
    while let Some(row) = rows.try_next().await? {
        let event = event_view(&row);
        let full = events.len() == limit as usize
            || (!events.is_empty() && bytes + event.payload.len() > cap);
        if full {
            more = true;
            break;
        }
        bytes += event.payload.len();
        events.push(event);
    }
    let more_before = events.last().filter(|_| more).map(|e| e.id);
    Ok(Answer::Inbox(InboxPage {
        events,
        more_before,
    }))
}

/// The ack update; `$3` is now, `$4` the delivered status.
const ACK: &str =
    "UPDATE events SET status = $4, acknowledged_at = COALESCE(acknowledged_at, $3), \
                   delivered_at = COALESCE(delivered_at, $3), next_attempt_at = NULL";

/// `POST /api/ack/{id}`: idempotent; a repeat answers the first acknowledgement time.
pub async fn ack(ctx: &StoreCtx, org: OrgId, id: Uuid) -> Done<Answer> {
    let client = ctx.pool.get().await?;
    let stmt = client
        .prepare_cached(&format!(
            "{ACK} WHERE id = $1 AND org_id = $2 RETURNING acknowledged_at"
        ))
        .await?;
    let now = Micros::now().to_system_time();
    let row = client
        .query_opt(&stmt, &[&id, &org.0, &now, &EventStatus::Delivered.code()])
        .await?
        .ok_or(Refusal::NotFound("event not found"))?;
    Ok(Answer::Acked {
        id,
        acknowledged_at: Micros::from_system_time(row.get(0)),
    })
}

/// `POST /api/ack`: which ids were acknowledged and which are not this organization's.
pub async fn ack_batch(ctx: &StoreCtx, org: OrgId, ids: Vec<Uuid>) -> Done<Answer> {
    let client = ctx.pool.get().await?;
    let stmt = client
        .prepare_cached(&format!(
            "{ACK} WHERE org_id = $2 AND id = ANY($1) RETURNING id"
        ))
        .await?;
    let now = Micros::now().to_system_time();
    let acked: HashSet<Uuid> = client
        .query(&stmt, &[&ids, &org.0, &now, &EventStatus::Delivered.code()])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let (acknowledged, not_found) = ids.into_iter().partition(|id| acked.contains(id));
    Ok(Answer::AckedBatch {
        acknowledged,
        not_found,
    })
}
