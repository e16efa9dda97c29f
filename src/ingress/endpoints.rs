//! `/api/endpoints…`: the shape of each request is checked on the request's core (URL syntax,
//! patterns, lengths, ranges); the store resolves URLs and does the rest. Answers are rendered
//! here.

use std::cell::RefCell;
use std::rc::Rc;

use uuid::Uuid;

use super::core::CoreCtx;
use super::events::write_attempt;
use super::request::{
    idempotency_key, page_cursor, page_limit, path_uuid, query_pairs, require_json, with_body,
    Request,
};
use crate::auth::OrgInfo;
use crate::config::{
    ENDPOINT_DESCRIPTION_CHARS_MAX, ENDPOINT_PATTERNS_MAX, ENDPOINT_RATE_LIMIT_MAX,
    INBOX_PAGE_DEFAULT,
};
use crate::endpoint_headers;
use crate::error::ApiError;
use crate::event_types::pattern_error;
use crate::flow::answer::{Answer, EndpointView, FailedPage};
use crate::flow::job::{EndpointPatch, EndpointSpec, Once, Query};
use crate::ids::{decode_cursor_at, encode_cursor_at, parse_rfc3339, Micros};
use crate::json::{write_list, write_str, Body, Field, Obj, Parser};
use crate::reply::Reply;
use crate::{signing_secret, url_policy};

/// The `url` member: required on create; an http(s) URL the policy accepts in shape.
fn url_field(value: Option<Field<'_>>) -> Result<Option<String>, ApiError> {
    match value {
        None => Ok(None),
        Some(Field::Str(s)) => {
            url_policy::parse_url(s)
                .map_err(|why| ApiError::validation("url", why.replace("webhook_url", "url")))?;
            Ok(Some(s.to_string()))
        }
        Some(Field::Null) => Err(ApiError::validation("url", "url must not be null")),
        Some(other) => Err(ApiError::validation(
            "url",
            format!("url must be a string, not {}", other.type_name()),
        )),
    }
}

/// `event_types`: absent (`None`), null (`Some(None)`: every type), or 1..50 valid patterns.
fn patterns_field(body: &Body<'_>) -> Result<Option<Option<Vec<String>>>, ApiError> {
    let invalid = |m: String| ApiError::validation("event_types", m);
    match body.get("event_types") {
        None => Ok(None),
        Some(Field::Null) => Ok(Some(None)),
        Some(f @ Field::Array { len, .. }) => {
            if len == 0 || len > ENDPOINT_PATTERNS_MAX {
                return Err(invalid(format!(
                    "event_types must hold 1 to {ENDPOINT_PATTERNS_MAX} patterns (null: every type)"
                )));
            }
            let mut out = Vec::with_capacity(len);
            for item in body.array_items(f) {
                let Field::Str(p) = item else {
                    return Err(invalid(format!(
                        "event_types must be strings, not {}",
                        item.type_name()
                    )));
                };
                if let Some(why) = pattern_error(p) {
                    return Err(invalid(why));
                }
                if !out.iter().any(|q: &String| q == p) {
                    out.push(p.to_string());
                }
            }
            Ok(Some(Some(out)))
        }
        Some(other) => Err(invalid(format!(
            "event_types must be an array of patterns or null, not {}",
            other.type_name()
        ))),
    }
}

/// `description`: absent, null, or up to 255 characters.
fn description_field(body: &Body<'_>) -> Result<Option<Option<String>>, ApiError> {
    match body.get("description") {
        None => Ok(None),
        Some(Field::Null) => Ok(Some(None)),
        Some(Field::Str(s)) => {
            let chars = s.chars().count();
            if chars > ENDPOINT_DESCRIPTION_CHARS_MAX || s.contains('\0') {
                return Err(ApiError::validation(
                    "description",
                    format!(
                        "description must be at most {ENDPOINT_DESCRIPTION_CHARS_MAX} characters \
                         without NUL, got {chars}"
                    ),
                ));
            }
            Ok(Some(Some(s.to_string())))
        }
        Some(other) => Err(ApiError::validation(
            "description",
            format!(
                "description must be a string or null, not {}",
                other.type_name()
            ),
        )),
    }
}

/// `rate_limit_per_second`: absent, null (no limit), or an integer 1..10000.
fn rate_field(body: &Body<'_>) -> Result<Option<Option<u32>>, ApiError> {
    let invalid = || {
        ApiError::validation(
            "rate_limit_per_second",
            format!(
                "rate_limit_per_second must be an integer from 1 to {ENDPOINT_RATE_LIMIT_MAX}, or null"
            ),
        )
    };
    match body.get("rate_limit_per_second") {
        None => Ok(None),
        Some(Field::Null) => Ok(Some(None)),
        Some(Field::Int(n)) if (1..=i64::from(ENDPOINT_RATE_LIMIT_MAX)).contains(&n) => {
            Ok(Some(Some(n as u32)))
        }
        Some(_) => Err(invalid()),
    }
}

/// `headers`: absent, null (none), or an object of header names and string values that
/// [`endpoint_headers::headers_error`] accepts; kept as the lines sent, in the order given.
fn headers_field(body: &Body<'_>) -> Result<Option<Vec<String>>, ApiError> {
    let invalid = |m: String| ApiError::validation("headers", m);
    match body.get("headers") {
        None => Ok(None),
        Some(Field::Null) => Ok(Some(Vec::new())),
        Some(f @ Field::Object { .. }) => {
            let members = body.object_members(f);
            let mut pairs = Vec::with_capacity(members.len());
            for (name, value) in members {
                let Field::Str(value) = value else {
                    return Err(invalid(format!(
                        "the value of `{name}` must be a string, not {}",
                        value.type_name()
                    )));
                };
                pairs.push((name, value));
            }
            if let Some(why) = endpoint_headers::headers_error(pairs.iter().copied()) {
                return Err(invalid(why));
            }
            Ok(Some(
                pairs
                    .into_iter()
                    .map(|(n, v)| endpoint_headers::line(n, v))
                    .collect(),
            ))
        }
        Some(other) => Err(invalid(format!(
            "headers must be an object of header names and values, or null, not {}",
            other.type_name()
        ))),
    }
}

/// `signing_secret`: absent or null (a random one is made), or a `whsec_` secret of 24 to 64
/// bytes, kept with its padding ([`signing_secret::normalize`]).
fn secret_field(body: &Body<'_>) -> Result<Option<String>, ApiError> {
    match body.get("signing_secret") {
        None | Some(Field::Null) => Ok(None),
        Some(Field::Str(s)) => signing_secret::normalize(s)
            .map(Some)
            .map_err(|why| ApiError::validation("signing_secret", why)),
        Some(other) => Err(ApiError::validation(
            "signing_secret",
            format!(
                "signing_secret must be a string or null, not {}",
                other.type_name()
            ),
        )),
    }
}

/// The body of `POST /api/endpoints`: what an accepted one holds is checked in shape (the URL's
/// syntax, 1..50 distinct valid patterns, a description of at most 255 characters, a rate in
/// range, headers of its own that may be sent, a signing secret of the Standard Webhooks form
/// when one is given); the store resolves the URL.
pub fn validate_endpoint_spec(
    parser: &RefCell<Parser>,
    body: &[u8],
) -> Result<EndpointSpec, ApiError> {
    with_body(parser, body, |body| {
        let url = url_field(body.get("url"))?
            .ok_or_else(|| ApiError::validation("url", "url is required"))?;
        Ok(EndpointSpec {
            url,
            event_types: patterns_field(body)?.flatten(),
            description: description_field(body)?.flatten(),
            rate_limit_per_second: rate_field(body)?.flatten(),
            headers: create_headers(body)?,
            signing_secret: secret_field(body)?,
        })
    })
}

/// A create's `headers`: as any, except that a new endpoint keeps no value for a
/// [`endpoint_headers::REDACTED`] credential to stand for.
fn create_headers(body: &Body<'_>) -> Result<Vec<String>, ApiError> {
    let lines = headers_field(body)?.unwrap_or_default();
    match endpoint_headers::fill_redacted(&lines, &[]) {
        Ok(_) => Ok(lines),
        Err(why) => Err(ApiError::validation("headers", why)),
    }
}

/// The body of `PATCH /api/endpoints/{id}`: the members sent, each checked as on creation; at
/// least one.
pub fn validate_endpoint_patch(
    parser: &RefCell<Parser>,
    body: &[u8],
) -> Result<EndpointPatch, ApiError> {
    with_body(parser, body, |body| {
        if body.get("signing_secret").is_some() {
            return Err(ApiError::validation(
                "signing_secret",
                "a PATCH does not change the secret: POST /api/endpoints/{id}/secret/rotate \
                 (optionally with {\"signing_secret\"}) does, and the old one signs beside it \
                 for the grace period",
            ));
        }
        let patch = EndpointPatch {
            url: url_field(body.get("url"))?,
            event_types: patterns_field(body)?,
            description: description_field(body)?,
            rate_limit_per_second: rate_field(body)?,
            headers: headers_field(body)?,
        };
        if patch == EndpointPatch::default() {
            return Err(ApiError::validation(
                "body",
                "send at least one of url, event_types, description, rate_limit_per_second, headers",
            ));
        }
        Ok(patch)
    })
}

/// The optional body of `POST /api/endpoints/{id}/secret/rotate`: none, `{}`, or
/// `{"signing_secret"}` (the new secret, as on create; null: a random one).
pub fn validate_rotate(parser: &RefCell<Parser>, body: &[u8]) -> Result<Option<String>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    with_body(parser, body, secret_field)
}

/// What a `since` that is not a time is told.
const SINCE_FORMAT: &str = "since must be an RFC 3339 time such as 2026-01-31T12:00:00Z";

/// The body of `POST /api/endpoints/{id}/recover`: `{"since": RFC 3339}`.
pub fn validate_recover(parser: &RefCell<Parser>, body: &[u8]) -> Result<Micros, ApiError> {
    with_body(parser, body, |body| match body.get("since") {
        Some(Field::Str(s)) => {
            parse_rfc3339(s).ok_or_else(|| ApiError::validation("since", SINCE_FORMAT))
        }
        None | Some(Field::Null) => Err(ApiError::validation("since", "since is required")),
        Some(other) => Err(ApiError::validation(
            "since",
            format!("since must be a string, not {}", other.type_name()),
        )),
    })
}

/// An endpoint as JSON; the secret only when the answer carries it (creation).
pub fn write_endpoint(o: &mut Obj<'_>, e: &EndpointView) {
    o.id("id", &e.id).str("url", &e.url);
    match &e.event_types {
        Some(types) => {
            write_list(o.key("event_types"), types, |out, t| write_str(out, t));
        }
        None => {
            o.null("event_types");
        }
    }
    o.opt_str("description", e.description.as_deref());
    match e.rate_limit_per_second {
        Some(r) => o.int("rate_limit_per_second", i64::from(r)),
        None => o.null("rate_limit_per_second"),
    };
    let mut headers = Obj::new(o.key("headers"));
    for (name, value) in e.headers.iter().filter_map(|l| endpoint_headers::split(l)) {
        headers.str(name, endpoint_headers::shown(name, value));
    }
    headers.finish();
    o.str("status", e.status.as_str());
    if let Some(secret) = &e.signing_secret {
        o.str("signing_secret", secret);
    }
    let h = o.key("health");
    let mut health = Obj::new(h);
    health
        .str("circuit", e.health.circuit.as_str())
        .int(
            "consecutive_failures",
            i64::from(e.health.consecutive_failures),
        )
        .opt_time("last_success_at", e.health.last_success_at)
        .opt_time("last_failure_at", e.health.last_failure_at);
    health.finish();
    o.time("created_at", e.created_at)
        .time("updated_at", e.updated_at);
}

fn endpoint_reply(status: u16, e: &EndpointView) -> Reply {
    Reply::build(status, |out| {
        let mut o = Obj::new(out);
        write_endpoint(&mut o, e);
        o.finish();
    })
}

/// Run `query` for the endpoint in the path (a UUID, else 422) and render its answer.
async fn on_endpoint(
    ctx: &Rc<CoreCtx>,
    org: OrgInfo,
    param: Option<&str>,
    query: impl FnOnce(uuid::Uuid) -> Query,
) -> Reply {
    let id = match path_uuid(param, "id") {
        Ok(id) => id,
        Err(e) => return e.reply(),
    };
    ctx.query(org, query(id)).await.render(render)
}

/// Every endpoint answer.
fn render(answer: Answer) -> Option<Reply> {
    Some(match answer {
        Answer::Endpoint(e) => {
            endpoint_reply(if e.signing_secret.is_some() { 201 } else { 200 }, &e)
        }
        Answer::EndpointReplayed(e) => {
            let mut reply = endpoint_reply(201, &e);
            reply.extra.replayed = true;
            reply
        }
        Answer::Endpoints(list) => Reply::build(200, |out| {
            let mut o = Obj::new(out);
            write_list(o.key("endpoints"), &list, |out, e| {
                let mut item = Obj::new(out);
                write_endpoint(&mut item, e);
                item.finish();
            });
            o.finish();
        }),
        Answer::EndpointSecret {
            signing_secret,
            previous_secret_expires_at,
        } => Reply::build(200, |out| {
            let mut o = Obj::new(out);
            o.str("signing_secret", &signing_secret)
                .opt_time("previous_secret_expires_at", previous_secret_expires_at);
            o.finish();
        }),
        Answer::EndpointDeleted(id) => Reply::build(200, |out| {
            let mut o = Obj::new(out);
            o.id("id", &id).bool("deleted", true);
            o.finish();
        }),
        Answer::Recovered { queued } => Reply::build(202, |out| {
            let mut o = Obj::new(out);
            o.int("queued", queued.min(i64::MAX as u64) as i64);
            o.finish();
        }),
        Answer::FailedDeliveries(page) => Reply::build(200, |out| write_failed(out, &page)),
        _ => return None,
    })
}

/// A create's `Idempotency-Key` (see [`idempotency_key`]) with the SHA-256 of the body it came
/// with. Absent: `None`.
pub fn create_once(value: Option<&[u8]>, body: &[u8]) -> Result<Option<Once>, ApiError> {
    use sha2::Digest;
    Ok(idempotency_key(value)?.map(|key| Once {
        key,
        body_sha256: sha2::Sha256::digest(body).into(),
    }))
}

/// `POST /api/endpoints`, optional `Idempotency-Key`.
pub async fn create(ctx: &Rc<CoreCtx>, req: &Request, org: OrgInfo) -> Reply {
    let asked = require_json(req).and_then(|()| {
        let once = create_once(req.head.idempotency_key.as_deref(), &req.body)?;
        Ok((validate_endpoint_spec(&ctx.parser, &req.body)?, once))
    });
    match asked {
        Ok((spec, once)) => ctx
            .query(org, Query::CreateEndpoint { spec, once })
            .await
            .render(render),
        Err(e) => e.reply(),
    }
}

/// `GET /api/endpoints`.
pub async fn list(ctx: &Rc<CoreCtx>, org: OrgInfo) -> Reply {
    ctx.query(org, Query::ListEndpoints).await.render(render)
}

/// `GET /api/endpoints/{id}`.
pub async fn get(ctx: &Rc<CoreCtx>, org: OrgInfo, param: Option<&str>) -> Reply {
    on_endpoint(ctx, org, param, |id| Query::GetEndpoint { id }).await
}

/// `GET /api/endpoints/{id}/secret`.
pub async fn secret(ctx: &Rc<CoreCtx>, org: OrgInfo, param: Option<&str>) -> Reply {
    on_endpoint(ctx, org, param, |id| Query::GetEndpointSecret { id }).await
}

/// `POST /api/endpoints/{id}/secret/rotate`, optional body `{"signing_secret"}`.
pub async fn rotate(ctx: &Rc<CoreCtx>, req: &Request, org: OrgInfo, param: Option<&str>) -> Reply {
    let id = match path_uuid(param, "id") {
        Ok(id) => id,
        Err(e) => return e.reply(),
    };
    let given = if req.body.iter().all(u8::is_ascii_whitespace) {
        Ok(None)
    } else {
        require_json(req).and_then(|()| validate_rotate(&ctx.parser, &req.body))
    };
    match given {
        Ok(secret) => ctx
            .query(org, Query::RotateEndpointSecret { id, secret })
            .await
            .render(render),
        Err(e) => e.reply(),
    }
}

/// `PATCH /api/endpoints/{id}`.
pub async fn patch(ctx: &Rc<CoreCtx>, req: &Request, org: OrgInfo, param: Option<&str>) -> Reply {
    let id = match path_uuid(param, "id") {
        Ok(id) => id,
        Err(e) => return e.reply(),
    };
    match require_json(req).and_then(|()| validate_endpoint_patch(&ctx.parser, &req.body)) {
        Ok(patch) => ctx
            .query(org, Query::PatchEndpoint { id, patch })
            .await
            .render(render),
        Err(e) => e.reply(),
    }
}

/// `DELETE /api/endpoints/{id}`.
pub async fn delete(ctx: &Rc<CoreCtx>, org: OrgInfo, param: Option<&str>) -> Reply {
    on_endpoint(ctx, org, param, |id| Query::DeleteEndpoint { id }).await
}

/// `POST /api/endpoints/{id}/pause` (`paused`) and `/resume`.
pub async fn set_paused(
    ctx: &Rc<CoreCtx>,
    org: OrgInfo,
    param: Option<&str>,
    paused: bool,
) -> Reply {
    on_endpoint(ctx, org, param, |id| Query::SetEndpointPaused {
        id,
        paused,
    })
    .await
}

/// The parameters of `GET /api/endpoints/{id}/failed`: `since` (RFC 3339; a `+` of an offset
/// may come unescaped, as the space it decodes to), `limit` (1..=1000, default 100), `cursor`
/// (the previous page's `next_cursor`). Unknown parameters are ignored; a repeated one counts by
/// its last value.
pub fn parse_failed_query(query: &[u8]) -> Result<FailedQuery, ApiError> {
    let mut q = FailedQuery {
        since: None,
        limit: INBOX_PAGE_DEFAULT,
        before: None,
    };
    for (key, value) in query_pairs(query) {
        match key {
            b"since" => {
                q.since = if value.is_empty() {
                    None
                } else {
                    let time =
                        parse_rfc3339(&value).or_else(|| parse_rfc3339(&value.replace(' ', "+")));
                    Some(time.ok_or_else(|| ApiError::validation("since", SINCE_FORMAT))?)
                };
            }
            b"limit" => q.limit = page_limit(&value)?,
            b"cursor" => q.before = page_cursor(&value, decode_cursor_at)?,
            _ => {}
        }
    }
    Ok(q)
}

/// What [`parse_failed_query`] read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailedQuery {
    /// Only failures at or after this time.
    pub since: Option<Micros>,
    /// Page size.
    pub limit: u32,
    /// The previous page's last (failed_at, event id).
    pub before: Option<(Micros, Uuid)>,
}

fn write_failed(out: &mut Vec<u8>, page: &FailedPage) {
    let mut o = Obj::new(out);
    write_list(o.key("deliveries"), &page.deliveries, |out, d| {
        let mut item = Obj::new(out);
        item.id("event_id", &d.event_id)
            .str("type", &d.event_type)
            .time("failed_at", d.failed_at)
            .int("attempts", i64::from(d.attempts));
        match &d.last_attempt {
            Some(a) => write_attempt(item.key("last_attempt"), a),
            None => {
                item.null("last_attempt");
            }
        }
        item.finish();
    });
    match page.more_before {
        Some((at, last)) => o.str("next_cursor", &encode_cursor_at(at, last)),
        None => o.null("next_cursor"),
    };
    o.finish();
}

/// `GET /api/endpoints/{id}/failed?since=&limit=&cursor=`: the endpoint's deliveries that ended
/// failed, the latest first: what `recover` with the same `since` would start again.
pub async fn failed(ctx: &Rc<CoreCtx>, req: &Request, org: OrgInfo, param: Option<&str>) -> Reply {
    let id = match path_uuid(param, "id") {
        Ok(id) => id,
        Err(e) => return e.reply(),
    };
    match parse_failed_query(req.head.query.as_deref().unwrap_or(b"")) {
        Ok(q) => ctx
            .query(
                org,
                Query::FailedDeliveries {
                    id,
                    since: q.since,
                    limit: q.limit,
                    before: q.before,
                },
            )
            .await
            .render(render),
        Err(e) => e.reply(),
    }
}

/// `POST /api/endpoints/{id}/recover` body `{"since": RFC 3339}`.
pub async fn recover(ctx: &Rc<CoreCtx>, req: &Request, org: OrgInfo, param: Option<&str>) -> Reply {
    let id = match path_uuid(param, "id") {
        Ok(id) => id,
        Err(e) => return e.reply(),
    };
    let since = require_json(req).and_then(|()| validate_recover(&ctx.parser, &req.body));
    match since {
        Ok(since) => ctx
            .query(org, Query::RecoverEndpoint { id, since })
            .await
            .render(render),
        Err(e) => e.reply(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_creates_idempotency_key_names_its_body_byte_for_byte() {
        assert_eq!(create_once(None, b"{}").unwrap(), None);
        let a = create_once(Some(b"k-1"), b"{}").unwrap().unwrap();
        assert_eq!(a.key, "k-1");
        assert_eq!(
            create_once(Some(b"\"k-1\""), b"{}").unwrap(),
            Some(a.clone())
        );
        let spaced = create_once(Some(b"k-1"), b"{ }").unwrap().unwrap();
        assert_ne!(spaced.body_sha256, a.body_sha256);
        assert!(create_once(Some(b"a b"), b"{}").is_err());
    }
}
