//! `GET /api/inbox` and the acks.
//!
//! A page is read in two statements. The first walks the organization's events newest first
//! through `events_inbox` (org_id, status, id), or, for `failed`, the events with a failed
//! delivery through `deliveries_failed`, and judges each one's derived status; the second reads
//! the chosen events' fields by primary key, streamed, so a page of large payloads never sits in
//! memory whole. An organization with endpoints keeps most events in one stored status (derived
//! from their deliveries), so the walk looks at no more than `INBOX_SCAN_ROWS` events per page:
//! a page can then hold fewer events than asked for, with a cursor to go on from.

use std::collections::HashSet;

use futures_util::TryStreamExt;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::ctx::{Done, StoreCtx};
use crate::config::INBOX_SCAN_ROWS;
use crate::flow::answer::{Answer, EventView, InboxPage, Refusal};
use crate::flow::event::EventStatus;
use crate::flow::event::STATUS_DERIVED;
use crate::ids::{Micros, OrgId};

const JUDGE_RECENT: &str = "\
    SELECT e.id, st.status, st.attempts, st.delivered_at \
    FROM (SELECT id, status, endpoints, delivered_at FROM events \
          WHERE org_id = $1 AND status = ANY($2) AND id < $3 ORDER BY id DESC LIMIT $4) e, \
    LATERAL triggers_event_state(e.status, e.id, e.endpoints, e.delivered_at) st \
    ORDER BY e.id DESC";

/// The events of the window are those in a stored status of `$2` (not acknowledged), chosen
/// before the window's `LIMIT`: the walk takes a window shorter than asked for as the end, so an
/// acknowledged event with a failed delivery, left out after the `LIMIT`, ended the walk early
/// (a page with no cursor, and the older failed events never listed). Each event's status is
/// looked up by key (`LATERAL … OFFSET 0`): as a semi-join, the planner may read every event of
/// the organization in that status first.
const JUDGE_FAILED: &str = "\
    SELECT e.id, st.status, st.attempts, st.delivered_at \
    FROM (SELECT DISTINCT d.event_id FROM deliveries d \
          CROSS JOIN LATERAL (SELECT x.status FROM events x \
                              WHERE x.id = d.event_id AND x.org_id = d.org_id OFFSET 0) x \
          WHERE d.org_id = $1 AND d.status = 2 AND d.event_id < $3 AND x.status = ANY($2) \
          ORDER BY d.event_id DESC LIMIT $4) f \
    JOIN events e ON e.id = f.event_id, \
    LATERAL triggers_event_state(e.status, e.id, e.endpoints, e.delivered_at) st \
    ORDER BY e.id DESC";

const FIELDS: &str = "\
    SELECT id, type, payload::text, dedup_id, created_at FROM events \
    WHERE id = ANY($1) ORDER BY id DESC";

/// One page, newest first; `more_before` is set when another page may follow. A page stops
/// early once its payloads pass `inbox_page_bytes_max` (at least one event is always given).
pub async fn inbox(
    ctx: &StoreCtx,
    org: OrgId,
    limit: u32,
    status: EventStatus,
    before: Option<Uuid>,
) -> Done<Answer> {
    let client = ctx.pool.get().await?;
    let (judge, stored): (&str, Vec<i16>) = match status {
        EventStatus::Pending => (
            JUDGE_RECENT,
            vec![EventStatus::Pending.code(), STATUS_DERIVED],
        ),
        EventStatus::Delivered => (
            JUDGE_RECENT,
            vec![EventStatus::Delivered.code(), STATUS_DERIVED],
        ),
        EventStatus::Failed => (JUDGE_FAILED, vec![STATUS_DERIVED]),
    };
    let stmt = client.prepare_cached(judge).await?;
    // (id, attempts, delivered_at) of the events in the wanted status, newest first. The walk
    // starts with a window of one page (enough when every event matches: a pull-only
    // organization) and widens while too few match, up to `INBOX_SCAN_ROWS` events in all.
    let mut chosen: Vec<(Uuid, i32, Option<std::time::SystemTime>)> = Vec::new();
    let mut more_before = None;
    let (mut cursor, mut scanned) = (before.unwrap_or(Uuid::max()), 0i64);
    let mut window = i64::from(limit) + 1;
    loop {
        let rows = client
            .query(&stmt, &[&org.0, &stored, &cursor, &window])
            .await?;
        scanned += rows.len() as i64;
        for row in &rows {
            if EventStatus::from_i16(row.get(1)) != status {
                continue;
            }
            if chosen.len() == limit as usize {
                more_before = chosen.last().map(|c| c.0);
                break;
            }
            chosen.push((row.get(0), row.get(2), row.get(3)));
        }
        let exhausted = (rows.len() as i64) < window;
        if more_before.is_some() || exhausted {
            break;
        }
        cursor = rows.last().map(|r| r.get(0)).unwrap_or(cursor);
        if scanned >= INBOX_SCAN_ROWS {
            // The walk stopped at its bound: go on from the last event it looked at.
            more_before = Some(cursor);
            break;
        }
        window = (window * 4).min(INBOX_SCAN_ROWS - scanned);
    }
    let ids: Vec<Uuid> = chosen.iter().map(|c| c.0).collect();
    let stmt = client.prepare_cached(FIELDS).await?;
    let params: [&(dyn ToSql + Sync); 1] = [&ids];
    let rows = client.query_raw(&stmt, params).await?;
    futures_util::pin_mut!(rows);
    let cap = ctx.config.inbox_page_bytes_max;
    let (mut events, mut bytes) = (Vec::with_capacity(chosen.len()), 0usize);
    let mut chosen = chosen.into_iter();
    while let Some(row) = rows.try_next().await? {
        let id: Uuid = row.get(0);
        // Both statements list newest first; an event gone in between is skipped.
        let Some((_, attempts, delivered_at)) = chosen.find(|c| c.0 == id) else {
            break;
        };
        let payload = bytes::Bytes::copy_from_slice(row.get::<_, &str>(2).as_bytes());
        if !events.is_empty() && bytes + payload.len() > cap {
            more_before = events.last().map(|e: &EventView| e.id);
            break;
        }
        bytes += payload.len();
        events.push(EventView {
            id,
            event_type: row.get(1),
            payload,
            dedup_id: row.get(3),
            status,
            attempts,
            created_at: Micros::from_system_time(row.get(4)),
            delivered_at: delivered_at.map(Micros::from_system_time),
        });
    }
    Ok(Answer::Inbox(InboxPage {
        events,
        more_before,
    }))
}

/// The ack: the event is delivered as far as the API goes, and its deliveries still pending are
/// parked (nothing more is sent). `$3` is now, `$4` the delivered status.
const ACK: &str = "\
    WITH a AS ( \
        UPDATE events SET status = $4, acknowledged_at = COALESCE(acknowledged_at, $3), \
            delivered_at = COALESCE(delivered_at, $3) \
        WHERE {WHERE} RETURNING id, acknowledged_at, endpoints), \
    parked AS ( \
        UPDATE deliveries d SET next_attempt_at = NULL FROM a \
        WHERE a.endpoints IS NOT NULL AND d.event_id = a.id AND d.status = 0 \
          AND d.next_attempt_at IS NOT NULL) \
    SELECT id, acknowledged_at FROM a";

/// `POST /api/ack/{id}`: idempotent; a repeat answers the first acknowledgement time.
pub async fn ack(ctx: &StoreCtx, org: OrgId, id: Uuid) -> Done<Answer> {
    let client = ctx.pool.get().await?;
    let stmt = client
        .prepare_cached(&ACK.replace("{WHERE}", "id = $1 AND org_id = $2"))
        .await?;
    let now = Micros::now().to_system_time();
    let row = client
        .query_opt(&stmt, &[&id, &org.0, &now, &EventStatus::Delivered.code()])
        .await?
        .ok_or(Refusal::NotFound("event not found"))?;
    Ok(Answer::Acked {
        id,
        acknowledged_at: Micros::from_system_time(row.get(1)),
    })
}

/// `POST /api/ack`: which ids were acknowledged and which are not this organization's.
pub async fn ack_batch(ctx: &StoreCtx, org: OrgId, ids: &[Uuid]) -> Done<Answer> {
    let client = ctx.pool.get().await?;
    let stmt = client
        .prepare_cached(&ACK.replace("{WHERE}", "org_id = $2 AND id = ANY($1)"))
        .await?;
    let now = Micros::now().to_system_time();
    let acked: HashSet<Uuid> = client
        .query(&stmt, &[&ids, &org.0, &now, &EventStatus::Delivered.code()])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let (acknowledged, not_found) = ids.iter().partition(|id| acked.contains(id));
    Ok(Answer::AckedBatch {
        acknowledged,
        not_found,
    })
}
