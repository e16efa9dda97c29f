//! `POST /api/events`, `GET /api/events/{id}`, `POST /api/events/{id}/redeliver`: validation on
//! the request's core, and the rendering of their answers.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use super::core::CoreCtx;
use super::request::{path_uuid, require_json, text_field, with_body, Request};
use bytes::Bytes;

use crate::auth::OrgInfo;
use crate::config::{BATCH_ITEMS_MAX, PAYLOAD_COPY_BYTES_MAX, RETRY_AFTER_UNAVAILABLE_S};
use crate::error::ApiError;
use crate::event_types::{is_operational, OPERATIONAL_PREFIX};
use crate::flow::answer::{Answer, AttemptView, DeliveryView, EventDetail, EventView};
use crate::flow::answer::{IngestOutcome, Ingested, Refusal};
use crate::flow::event::NewEvent;
use crate::flow::job::Query;
use crate::ids::{new_v7, EventId, Micros};
use crate::json::{array_element_spans, member_value_spans, write_list, Field, Obj, Parser};
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

/// `POST /api/events/batch`: every item checked like a single event on this core; the valid ones
/// (a repeated dedup id inside the batch: the first wins) go to the organization's owner core
/// together, which spends one token per item or answers 429 for the whole batch; the answer, one
/// result per item in order, is sent once every accepted item is committed.
pub async fn create_batch(ctx: &Rc<CoreCtx>, req: &Request, org: OrgInfo) -> Reply {
    let items = match require_json(req)
        .and_then(|()| validate_batch(&ctx.parser, &req.body, ctx.config.payload_bytes_max))
    {
        Ok(items) => items,
        Err(e) => return e.reply(),
    };
    let now = Micros::now();
    let tokens = items.len() as u32;
    // Each item: its own error, the index of the event it sends, or the earlier item it repeats.
    let mut plan: Vec<Item> = Vec::with_capacity(items.len());
    let mut events = Vec::with_capacity(items.len());
    let mut first_of: HashMap<Box<str>, usize> = HashMap::new();
    for item in items {
        match item {
            Err(e) => plan.push(Item::Invalid(e)),
            Ok(valid) => {
                if let Some(d) = &valid.dedup_id {
                    if let Some(&first) = first_of.get(d) {
                        plan.push(Item::Repeats(first));
                        continue;
                    }
                    first_of.insert(d.clone(), events.len());
                }
                plan.push(Item::Sent(events.len()));
                events.push(new_event(valid, org, now, traceparent(req)));
            }
        }
    }
    if events.is_empty() {
        // Nothing to store: no token is spent.
        return batch_reply(&plan, &[], &[], now);
    }
    let ids: Vec<EventId> = events.iter().map(|e| e.id).collect();
    let outcomes = ctx.ingest_batch(org, tokens, events).await;
    let rate = outcomes.iter().find_map(|o| o.rate);
    // The whole batch was refused (rate limit, the server's trouble): one answer for it.
    let refused = |o: &IngestOutcome| match &o.result {
        Ingested::Refused(r) => Some(r.clone()),
        _ => None,
    };
    if let Some(first) = outcomes.first().and_then(refused) {
        let whole = matches!(first, Refusal::RateLimited { .. })
            || outcomes
                .iter()
                .all(|o| refused(o).is_some_and(|r| r.is_servers()));
        if whole {
            return ApiError::from(first).reply().with_rate(rate);
        }
    }
    batch_reply(&plan, &ids, &outcomes, now).with_rate(rate)
}

/// What became of one item of a batch request.
enum Item {
    /// Refused on its own (422, 413).
    Invalid(ApiError),
    /// Sent as the event with this index.
    Sent(usize),
    /// Repeats the dedup id of the event with this index: 409 naming that one's event.
    Repeats(usize),
}

/// `200 {"results":[…]}`: each item's status and what goes with it.
fn batch_reply(
    plan: &[Item],
    ids: &[EventId],
    outcomes: &[IngestOutcome],
    created_at: Micros,
) -> Reply {
    let mut retry_after = None;
    let mut reply = Reply::build(200, |out| {
        out.extend_from_slice(b"{\"results\":[");
        for (n, item) in plan.iter().enumerate() {
            if n > 0 {
                out.push(b',');
            }
            let mut o = Obj::new(out);
            let result = |i: usize| (ids[i], &outcomes[i].result);
            let (index, repeat) = match item {
                Item::Invalid(e) => {
                    write_item_error(&mut o, e);
                    o.finish();
                    continue;
                }
                Item::Sent(i) => (*i, false),
                Item::Repeats(i) => (*i, true),
            };
            match result(index) {
                (id, Ingested::Committed | Ingested::Queued) if repeat => {
                    write_item_error(&mut o, &ApiError::Duplicate { event_id: id.0 });
                }
                (_, Ingested::Duplicate(first)) => {
                    write_item_error(&mut o, &ApiError::Duplicate { event_id: first.0 });
                }
                (id, Ingested::Committed) => {
                    o.int("status", 201)
                        .id("id", &id.0)
                        .time("created_at", created_at);
                }
                (id, Ingested::Queued) => {
                    o.int("status", 202)
                        .id("id", &id.0)
                        .time("created_at", created_at);
                }
                (_, Ingested::Refused(r)) => {
                    let e = ApiError::from(r.clone());
                    if r.is_servers() {
                        retry_after = Some(RETRY_AFTER_UNAVAILABLE_S);
                    }
                    write_item_error(&mut o, &e);
                }
            }
            o.finish();
        }
        out.extend_from_slice(b"]}");
    });
    reply.extra.retry_after_s = retry_after;
    reply
}

/// One item's error: `{"status","code","error"}` and the field or first event when there is one.
fn write_item_error(o: &mut Obj<'_>, e: &ApiError) {
    o.int("status", i64::from(e.status()))
        .str("code", e.code())
        .str("error", &e.message());
    match e {
        ApiError::Validation { field, .. } => {
            o.str("field", field);
        }
        ApiError::Duplicate { event_id } => {
            o.id("event_id", event_id);
        }
        _ => {}
    }
}

/// Check a batch body (`{"events":[…]}`, 1..1000 items): the envelope's errors refuse the whole
/// request (422 on `events`); each item is checked like a single event, its error its own.
pub fn validate_batch(
    parser: &RefCell<Parser>,
    body: &Bytes,
    payload_bytes_max: usize,
) -> Result<Vec<Result<ValidEvent, ApiError>>, ApiError> {
    let member = with_body(parser, body, |b| match b.get("events") {
        Some(Field::Array { len, .. }) if (1..=BATCH_ITEMS_MAX).contains(&len) => {
            Ok(b.member_index("events"))
        }
        Some(Field::Array { len, .. }) => Err(ApiError::validation(
            "events",
            format!("events must hold 1 to {BATCH_ITEMS_MAX} events, got {len}"),
        )),
        None | Some(Field::Null) => Err(ApiError::validation("events", "events is required")),
        Some(other) => Err(ApiError::validation(
            "events",
            format!("events must be an array, not {}", other.type_name()),
        )),
    })?;
    let span = member
        .and_then(|i| member_value_spans(body)?.get(i).cloned())
        .ok_or(ApiError::Internal)?;
    let items = array_element_spans(body, span).ok_or(ApiError::Internal)?;
    Ok(items
        .into_iter()
        .map(|item| {
            if body[item.start] != b'{' {
                return Err(ApiError::validation(
                    "events",
                    "each item of events must be an event object",
                ));
            }
            validate_event(parser, &body.slice(item), payload_bytes_max)
        })
        .collect())
}

/// An event body that passed validation: its type, dedup id and payload (the bytes received).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidEvent {
    /// 1..255 characters.
    pub event_type: Box<str>,
    /// 1..255 characters, if given.
    pub dedup_id: Option<Box<str>>,
    /// The `payload` member's JSON text exactly as received.
    pub payload: Bytes,
}

/// Check an event body (`{"type", "payload", "dedup_id"?}`): JSON object, field rules, the
/// payload limit. The payload stays the bytes it arrived in, found by its position among the
/// top-level members; a small one is copied out, so queued and in-memory events never pin the
/// connection's read buffer (a 64 KiB allocation for a 200-byte event).
pub fn validate_event(
    parser: &RefCell<Parser>,
    body: &Bytes,
    payload_bytes_max: usize,
) -> Result<ValidEvent, ApiError> {
    let (event_type, dedup_id, payload_member) = with_body(parser, body, |b| {
        let event_type = text_field(b, &["type"], "type", true)?.unwrap_or_default();
        if is_operational(event_type) {
            return Err(ApiError::validation(
                "type",
                format!("types starting with `{OPERATIONAL_PREFIX}` are the server's own"),
            ));
        }
        let payload_member = match b.get("payload") {
            None | Some(Field::Null) => {
                return Err(ApiError::validation(
                    "payload",
                    "payload is required and must not be null",
                ))
            }
            Some(_) => b.member_index("payload"),
        };
        let dedup_id = text_field(b, &["dedup_id"], "dedup_id", false)?;
        Ok((
            Box::<str>::from(event_type),
            dedup_id.map(Box::<str>::from),
            payload_member,
        ))
    })?;
    let span = payload_member
        .and_then(|i| member_value_spans(body)?.get(i).cloned())
        .ok_or(ApiError::Internal)?;
    if span.len() > payload_bytes_max {
        return Err(ApiError::PayloadTooLarge(format!(
            "payload of {} bytes exceeds the limit of {payload_bytes_max} bytes",
            span.len()
        )));
    }
    let payload = if span.len() <= PAYLOAD_COPY_BYTES_MAX {
        Bytes::copy_from_slice(&body[span])
    } else {
        body.slice(span)
    };
    Ok(ValidEvent {
        event_type,
        dedup_id,
        payload,
    })
}

/// Check the request and build the event.
fn validate(ctx: &CoreCtx, req: &Request, org: OrgInfo) -> Result<NewEvent, ApiError> {
    require_json(req)?;
    let valid = validate_event(&ctx.parser, &req.body, ctx.config.payload_bytes_max)?;
    Ok(new_event(valid, org, Micros::now(), traceparent(req)))
}

/// The request's `traceparent` when it is one (W3C Trace Context, version-00 form: `00-` 32 hex
/// digits of trace id `-` 16 of parent id `-` 2 of flags, lowercase, neither id all zeros; a later
/// version's longer header is kept by its first 55 characters, as the specification asks). Anything
/// else is ignored, as a tracing system ignores a malformed header: the event is still taken.
pub fn traceparent(req: &Request) -> Option<Box<str>> {
    checked_traceparent(req.head.traceparent.as_deref()?)
}

fn checked_traceparent(sent: &[u8]) -> Option<Box<str>> {
    let sent = sent.trim_ascii();
    let v = sent.get(..55)?;
    let hex = |r: std::ops::Range<usize>| {
        v[r].iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
    };
    let zeros = |r: std::ops::Range<usize>| v[r].iter().all(|&b| b == b'0');
    let version = &v[..2];
    let length_ok = if version == b"00" {
        sent.len() == 55
    } else {
        sent.len() == 55 || sent[55] == b'-'
    };
    let form = v[2] == b'-' && v[35] == b'-' && v[52] == b'-';
    let digits = hex(0..2) && hex(3..35) && hex(36..52) && hex(53..55);
    if !(form && digits && length_ok) || version == b"ff" || zeros(3..35) || zeros(36..52) {
        return None;
    }
    // Checked to be ASCII above.
    std::str::from_utf8(v).ok().map(Into::into)
}

/// A validated event of `org`, created `now`, with its new id.
fn new_event(
    valid: ValidEvent,
    org: OrgInfo,
    now: Micros,
    traceparent: Option<Box<str>>,
) -> NewEvent {
    NewEvent {
        id: EventId(new_v7(now)),
        org: org.id,
        event_type: valid.event_type,
        payload: valid.payload,
        dedup_id: valid.dedup_id,
        created_at: now,
        traceparent,
    }
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

/// The optional body of a redelivery: `{"endpoint_id"}` names the one endpoint to send to.
fn redeliver_target(ctx: &CoreCtx, req: &Request) -> Result<Option<uuid::Uuid>, ApiError> {
    if req.body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    require_json(req)?;
    with_body(&ctx.parser, &req.body, |body| {
        match body.get("endpoint_id") {
            None | Some(Field::Null) => Ok(None),
            Some(Field::Str(s)) => crate::ids::parse_uuid(s)
                .map(Some)
                .ok_or_else(|| ApiError::validation("endpoint_id", "endpoint_id must be a UUID")),
            Some(other) => Err(ApiError::validation(
                "endpoint_id",
                format!("endpoint_id must be a string, not {}", other.type_name()),
            )),
        }
    })
}

/// `POST /api/events/{id}/redeliver`, optional body `{"endpoint_id"}`.
pub async fn redeliver(
    ctx: &Rc<CoreCtx>,
    req: &Request,
    org: OrgInfo,
    param: Option<&str>,
) -> Reply {
    let id = match path_uuid(param, "id") {
        Ok(id) => id,
        Err(e) => return e.reply(),
    };
    let endpoint = match redeliver_target(ctx, req) {
        Ok(e) => e,
        Err(e) => return e.reply(),
    };
    ctx.query(org, Query::Redeliver { id, endpoint })
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

/// One attempt of the log as JSON (the event detail's `delivery_attempts`, a failed delivery's `last_attempt`).
pub fn write_attempt(out: &mut Vec<u8>, a: &AttemptView) {
    let mut item = Obj::new(out);
    item.id("endpoint_id", &a.endpoint_id)
        .int("attempt", i64::from(a.attempt))
        .time("at", a.at);
    match a.response_status {
        Some(s) => item.int("response_status", i64::from(s)),
        None => item.null("response_status"),
    };
    item.opt_str("error", a.error.as_deref())
        .int("duration_ms", i64::from(a.duration_ms))
        .opt_str("response_body", a.response_body.as_deref());
    item.finish();
}

fn write_delivery(out: &mut Vec<u8>, d: &DeliveryView) {
    let mut item = Obj::new(out);
    item.id("endpoint_id", &d.endpoint_id)
        .str("status", d.status.as_str())
        .int("attempts", i64::from(d.attempts))
        .opt_time("next_attempt_at", d.next_attempt_at)
        .opt_time("delivered_at", d.delivered_at);
    item.finish();
}

fn write_detail(out: &mut Vec<u8>, detail: &EventDetail) {
    let mut o = Obj::new(out);
    write_event(&mut o, &detail.event);
    write_list(o.key("deliveries"), &detail.deliveries, write_delivery);
    write_list(o.key("delivery_attempts"), &detail.attempts, write_attempt);
    o.finish();
}

#[cfg(test)]
mod tests {
    use super::checked_traceparent;

    const OK: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparents_of_the_w3c_form_are_kept_and_nothing_else() {
        assert_eq!(checked_traceparent(OK.as_bytes()).as_deref(), Some(OK));
        assert_eq!(
            checked_traceparent(format!(" {OK} ").as_bytes()).as_deref(),
            Some(OK)
        );
        // A later version may be longer: its first 55 characters are the version-00 fields.
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes-next";
        assert_eq!(
            checked_traceparent(later.as_bytes()).as_deref(),
            Some(&later[..55])
        );
        for bad in [
            "",
            "00",
            &OK[..54],
            &format!("{OK}-x"), // version 00 is exactly 55
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", // forbidden version
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01", // zero trace id
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", // zero parent id
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", // uppercase
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        ] {
            assert_eq!(checked_traceparent(bad.as_bytes()), None, "{bad:?}");
        }
        // Not UTF-8 at all: refused, never a panic.
        assert_eq!(checked_traceparent(&[0xff; 60]), None);
    }
}
