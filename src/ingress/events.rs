//! `POST /api/events`, `GET /api/events/{id}`, `POST /api/events/{id}/redeliver`: validation on
//! the request's core, and the rendering of their answers.

use std::rc::Rc;

use super::core::CoreCtx;
use super::request::{path_uuid, require_json, text_field, with_body, Request};
use bytes::Bytes;

use crate::auth::OrgInfo;
use crate::config::PAYLOAD_COPY_BYTES_MAX;
use crate::error::ApiError;
use crate::flow::answer::{Answer, AttemptView, EventDetail, EventView};
use crate::flow::answer::{IngestOutcome, Ingested};
use crate::flow::event::NewEvent;
use crate::flow::job::Query;
use crate::ids::{new_v7, EventId, Micros};
use crate::json::{member_value_spans, Field, Obj};
use crate::reply::Reply;

/// `POST /api/events`: validate on this core, then ingest through the organization's owner core.
pub async fn create(ctx: &Rc<CoreCtx>, req: &Request, org: OrgInfo) -> Reply {
    let event = match validate(ctx, req, org) {
        Ok(e) => e,
        Err(e) => return e.reply(),
    };
    let (id, created_at) = (event.id, event.created_at);
    let IngestOutcome { result, rate } = ctx.ingest(org, event).await;
    let reply = match result {
        Ingested::Committed => accepted(201, id, created_at),
        Ingested::Queued => accepted(202, id, created_at),
        Ingested::Duplicate(first) => ApiError::Duplicate { event_id: first.0 }.reply(),
        Ingested::Refused(r) => ApiError::from(r).reply(),
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
    let (event_type, dedup_id, payload_member) = with_body(&ctx.parser, &req.body, |body| {
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
    // A small payload is copied out, so queued and in-memory events never pin the connection's
    // read buffer (a 64 KiB allocation for a 200-byte event); a large one is most of its body.
    let payload = if span.len() <= PAYLOAD_COPY_BYTES_MAX {
        Bytes::copy_from_slice(&req.body[span])
    } else {
        req.body.slice(span)
    };
    let now = Micros::now();
    Ok(NewEvent {
        id: EventId(new_v7(now)),
        org: org.id,
        event_type,
        payload,
        dedup_id,
        created_at: now,
        deliver: org.has_webhook,
    })
}

/// `GET /api/events/{id}`.
pub async fn get(ctx: &Rc<CoreCtx>, org: OrgInfo, param: Option<&str>) -> Reply {
    let id = match path_uuid(param, "id") {
        Ok(id) => id,
        Err(e) => return e.reply(),
    };
    ctx.query(org, Query::GetEvent { id })
        .await
        .render(|answer| match answer {
            Answer::Event(detail) => Some(Reply::build(200, |out| write_detail(out, &detail))),
            _ => None,
        })
}

/// `POST /api/events/{id}/redeliver`.
pub async fn redeliver(ctx: &Rc<CoreCtx>, org: OrgInfo, param: Option<&str>) -> Reply {
    let id = match path_uuid(param, "id") {
        Ok(id) => id,
        Err(e) => return e.reply(),
    };
    ctx.query(org, Query::Redeliver { id })
        .await
        .render(|answer| match answer {
            Answer::Redelivered(id) => Some(Reply::build(202, |out| {
                let mut o = Obj::new(out);
                o.id("id", &id).str("status", "pending");
                o.finish();
            })),
            _ => None,
        })
}

/// An event's inbox fields, into an open object (the inbox writes the same).
pub fn write_event(o: &mut Obj<'_>, e: &EventView) {
    o.id("id", &e.id)
        .str("type", &e.event_type)
        .raw("payload", &e.payload)
        .opt_str("dedup_id", e.dedup_id.as_deref())
        .str("status", e.status.as_str())
        .int("attempts", i64::from(e.attempts))
        .time("created_at", e.created_at)
        .opt_time("delivered_at", e.delivered_at);
}

fn write_attempt(out: &mut Vec<u8>, a: &AttemptView) {
    let mut item = Obj::new(out);
    item.int("attempt", i64::from(a.attempt)).time("at", a.at);
    match a.response_status {
        Some(s) => item.int("response_status", i64::from(s)),
        None => item.null("response_status"),
    };
    item.opt_str("error", a.error.as_deref())
        .int("duration_ms", i64::from(a.duration_ms));
    item.finish();
}

fn write_detail(out: &mut Vec<u8>, detail: &EventDetail) {
    let mut o = Obj::new(out);
    write_event(&mut o, &detail.event);
    let list = o.key("delivery_attempts");
    list.push(b'[');
    for (i, a) in detail.attempts.iter().enumerate() {
        if i > 0 {
            list.push(b',');
        }
        write_attempt(list, a);
    }
    list.push(b']');
    o.finish();
}
