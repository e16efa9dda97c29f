//! `POST /api/events`, `GET /api/events/{id}`, `POST /api/events/{id}/redeliver`.

use std::rc::Rc;

use super::{path_uuid, require_json, text_field, with_body, CoreCtx, Request};
use crate::auth::OrgInfo;
use crate::error::ApiError;
use crate::ids::{new_v7, EventId, Micros};
use crate::json::{member_value_spans, Field, Obj};
use crate::reply::Reply;
use crate::shard::mesh::{NewEvent, WriteResult};
use crate::store::Query;

/// `POST /api/events`: validate on this core, then ingest through the organization's owner core.
pub async fn create(ctx: &Rc<CoreCtx>, req: &Request, org: OrgInfo) -> Reply {
    let event = match validate(ctx, req, org) {
        Ok(e) => e,
        Err(e) => return e.reply(),
    };
    let (id, created_at) = (event.id, event.created_at);
    let (result, rate) = ctx.ingest(org, event).await;
    let reply = match result {
        WriteResult::Committed => accepted(201, id, created_at),
        WriteResult::Queued => accepted(202, id, created_at),
        WriteResult::Duplicate(first) => ApiError::Duplicate { event_id: first.0 }.reply(),
        WriteResult::Refused(e) => e.reply(),
    };
    reply.with_rate(rate)
}

fn accepted(status: u16, id: EventId, created_at: Micros) -> Reply {
    Reply::build(status, |out| {
        let mut o = Obj::new(out);
        o.id("id", &id.0)
            .str("status", "accepted")
            .time("created_at", created_at);
        o.finish();
    })
}

/// Check the body and build the event. The payload stays the bytes it arrived in: a slice of
/// the request body, found by its position among the top-level members.
fn validate(ctx: &CoreCtx, req: &Request, org: OrgInfo) -> Result<NewEvent, ApiError> {
    require_json(req)?;
    let (event_type, dedup_id, payload_member) = with_body(ctx, &req.body, |body| {
        let event_type = text_field(body, &["type"], "type", true)?.unwrap_or_default();
        let payload_member = match body.get("payload") {
            None | Some(Field::Null) => {
                return Err(ApiError::validation(
                    "payload",
                    "payload is required and must not be null",
                ))
            }
            Some(_) => body.member_index("payload"),
        };
        let dedup_id = text_field(body, &["dedup_id"], "dedup_id", false)?;
        Ok((
            Box::<str>::from(event_type),
            dedup_id.map(Box::<str>::from),
            payload_member,
        ))
    })?;
    let span = payload_member
        .and_then(|i| member_value_spans(&req.body)?.get(i).cloned())
        .ok_or(ApiError::Internal)?;
    let max = ctx.config.payload_bytes_max;
    if span.len() > max {
        return Err(ApiError::PayloadTooLarge(format!(
            "payload of {} bytes exceeds the limit of {max} bytes",
            span.len()
        )));
    }
    let now = Micros::now();
    Ok(NewEvent {
        id: EventId(new_v7(now)),
        org: org.id,
        event_type,
        payload: req.body.slice(span),
        dedup_id,
        created_at: now,
        deliver: org.has_webhook,
    })
}

/// `GET /api/events/{id}`.
pub async fn get(ctx: &Rc<CoreCtx>, org: OrgInfo, param: Option<&str>) -> Reply {
    match path_uuid(param, "id") {
        Ok(id) => ctx.query(org, Query::GetEvent { id }).await,
        Err(e) => e.reply(),
    }
}

/// `POST /api/events/{id}/redeliver`.
pub async fn redeliver(ctx: &Rc<CoreCtx>, org: OrgInfo, param: Option<&str>) -> Reply {
    match path_uuid(param, "id") {
        Ok(id) => ctx.query(org, Query::Redeliver { id }).await,
        Err(e) => e.reply(),
    }
}
