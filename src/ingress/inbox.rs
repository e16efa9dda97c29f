//! `GET /api/inbox`, `POST /api/ack/{id}`, `POST /api/ack` (and the `/api/inbox/ack` aliases).

use std::rc::Rc;

use super::core::CoreCtx;
use super::events::write_event;
use super::request::{
    page_cursor, page_limit, path_uuid, query_pairs, require_json, with_body, Request,
};
use crate::auth::OrgInfo;
use crate::config::{ACK_BATCH_IDS_MAX, INBOX_PAGE_DEFAULT};
use crate::error::ApiError;
use crate::flow::answer::{Answer, InboxPage};
use crate::flow::event::EventStatus;
use crate::flow::job::Query;
use crate::ids::{decode_cursor, encode_cursor, parse_uuid};
use crate::json::{write_str, Field, Obj};
use crate::reply::Reply;

/// `GET /api/inbox?limit=&status=&cursor=`.
pub async fn list(ctx: &Rc<CoreCtx>, req: &Request, org: OrgInfo) -> Reply {
    let query = match parse_query(req.head.query.as_deref().unwrap_or(b"")) {
        Ok(q) => q,
        Err(e) => return e.reply(),
    };
    ctx.query(org, query).await.render(|answer| match answer {
        Answer::Inbox(page) => Some(Reply::build(200, |out| write_page(out, &page))),
        _ => None,
    })
}

fn write_page(out: &mut Vec<u8>, page: &InboxPage) {
    out.reserve(page.events.iter().map(|e| e.payload.len() + 256).sum());
    let mut o = Obj::new(out);
    let list = o.key("events");
    list.push(b'[');
    for (i, e) in page.events.iter().enumerate() {
        if i > 0 {
            list.push(b',');
        }
        let mut item = Obj::new(list);
        write_event(&mut item, e);
        item.finish();
    }
    list.push(b']');
    match page.more_before {
        Some(last) => o.str("next_cursor", &encode_cursor(last)),
        None => o.null("next_cursor"),
    };
    o.finish();
}

/// The inbox parameters. Unknown parameters are ignored; a repeated one counts by its last value.
pub fn parse_query(query: &[u8]) -> Result<Query, ApiError> {
    let (mut limit, mut status, mut before) = (INBOX_PAGE_DEFAULT, EventStatus::Pending, None);
    for (key, value) in query_pairs(query) {
        match key {
            b"limit" => limit = page_limit(&value)?,
            b"status" => {
                status = EventStatus::parse(&value).ok_or_else(|| {
                    ApiError::validation("status", "status must be pending, delivered or failed")
                })?;
            }
            b"cursor" => before = page_cursor(&value, decode_cursor)?,
            _ => {}
        }
    }
    Ok(Query::Inbox {
        limit,
        status,
        before,
    })
}

/// `POST /api/ack/{event_id}`.
pub async fn ack(ctx: &Rc<CoreCtx>, org: OrgInfo, param: Option<&str>) -> Reply {
    let id = match path_uuid(param, "event_id") {
        Ok(id) => id,
        Err(e) => return e.reply(),
    };
    ctx.query(org, Query::Ack { id })
        .await
        .render(|answer| match answer {
            Answer::Acked {
                id,
                acknowledged_at,
            } => Some(Reply::build(200, |out| {
                let mut o = Obj::new(out);
                o.id("id", &id)
                    .str("status", "delivered")
                    .time("acknowledged_at", acknowledged_at);
                o.finish();
            })),
            _ => None,
        })
}

/// `POST /api/ack` with `{"event_ids": [1..1000 ids]}`.
pub async fn ack_batch(ctx: &Rc<CoreCtx>, req: &Request, org: OrgInfo) -> Reply {
    let ids = require_json(req).and_then(|()| {
        with_body(&ctx.parser, &req.body, |body| {
            let field = body
                .get("event_ids")
                .ok_or_else(|| ApiError::validation("event_ids", "event_ids is required"))?;
            let items = match field {
                Field::Array { len, .. } if (1..=ACK_BATCH_IDS_MAX).contains(&len) => {
                    body.array_items(field)
                }
                Field::Array { len, .. } => {
                    return Err(ApiError::validation(
                        "event_ids",
                        format!("event_ids must hold 1 to {ACK_BATCH_IDS_MAX} ids, got {len}"),
                    ))
                }
                other => {
                    return Err(ApiError::validation(
                        "event_ids",
                        format!("event_ids must be an array, not {}", other.type_name()),
                    ))
                }
            };
            let mut ids = Vec::with_capacity(items.len());
            for item in items {
                let id = match item {
                    Field::Str(s) => parse_uuid(s),
                    _ => None,
                }
                .ok_or_else(|| {
                    ApiError::validation("event_ids", "every event id must be a UUID string")
                })?;
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
            Ok(ids)
        })
    });
    let ids = match ids {
        Ok(ids) => ids,
        Err(e) => return e.reply(),
    };
    ctx.query(org, Query::AckBatch { ids })
        .await
        .render(|answer| match answer {
            Answer::AckedBatch {
                acknowledged,
                not_found,
            } => Some(Reply::build(200, |out| {
                let mut o = Obj::new(out);
                for (name, ids) in [("acknowledged", &acknowledged), ("not_found", &not_found)] {
                    let list = o.key(name);
                    list.push(b'[');
                    for (i, id) in ids.iter().enumerate() {
                        if i > 0 {
                            list.push(b',');
                        }
                        write_str(list, &id.hyphenated().to_string());
                    }
                    list.push(b']');
                }
                o.finish();
            })),
            _ => None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[test]
    fn defaults_and_values() {
        assert_eq!(
            parse_query(b"").unwrap(),
            Query::Inbox {
                limit: 100,
                status: EventStatus::Pending,
                before: None
            }
        );
        let id = Uuid::from_u128(99);
        let q = format!("limit=5&status=failed&cursor={}&other=x", encode_cursor(id));
        assert_eq!(
            parse_query(q.as_bytes()).unwrap(),
            Query::Inbox {
                limit: 5,
                status: EventStatus::Failed,
                before: Some(id)
            }
        );
        assert!(matches!(
            parse_query(b"cursor=").unwrap(),
            Query::Inbox { before: None, .. }
        ));
    }

    #[test]
    fn out_of_range_and_malformed_values_name_the_parameter() {
        for (q, field) in [
            ("limit=0", "limit"),
            ("limit=1001", "limit"),
            ("limit=ten", "limit"),
            ("status=done", "status"),
            ("cursor=%%%", "cursor"),
            ("cursor=abc", "cursor"),
        ] {
            match parse_query(q.as_bytes()) {
                Err(ApiError::Validation { field: f, .. }) => assert_eq!(f, field, "{q}"),
                other => panic!("{q}: {other:?}"),
            }
        }
    }
}
