//! `POST /api/keys/generate` and `POST /api/webhook/config`: the two admin calls with a body.
//! (`GET /api/keys`, `POST /api/keys/rotate` and `DELETE /api/webhook/config` have no body and go
//! straight to the store.)

use std::rc::Rc;

use super::{require_json, text_field, with_body, CoreCtx, Request};
use crate::auth::{OrgInfo, Tier};
use crate::delivery::target;
use crate::error::ApiError;
use crate::json::Field;
use crate::reply::Reply;
use crate::store::{Query, StoreJob};

/// `POST /api/keys/generate`: a new organization and its key.
pub async fn generate(ctx: &Rc<CoreCtx>, req: &Request) -> Reply {
    if let Some(token) = ctx.config.admin_token.as_deref() {
        let sent = crate::auth::key_from_headers(None, req.head.authorization.as_deref());
        if !sent.is_some_and(|s| constant_time_eq(s, token.as_bytes())) {
            return ApiError::Unauthorized(
                "this server requires its admin token: Authorization: Bearer <admin token>",
            )
            .reply();
        }
    }
    let parsed = require_json(req).and_then(|()| {
        with_body(ctx, &req.body, |body| {
            let name = text_field(
                body,
                &["organization_name", "org_name"],
                "organization_name",
                true,
            )?
            .unwrap_or_default()
            .to_string();
            let tier = match body.get("tier") {
                None | Some(Field::Null) => Tier::Free,
                Some(Field::Str(s)) => Tier::parse(s).ok_or_else(|| {
                    ApiError::validation(
                        "tier",
                        "tier must be one of free, pro, business, enterprise",
                    )
                })?,
                Some(other) => {
                    return Err(ApiError::validation(
                        "tier",
                        format!("tier must be a string, not {}", other.type_name()),
                    ))
                }
            };
            Ok((name, tier))
        })
    });
    match parsed {
        Ok((name, tier)) => {
            ctx.ask_store(|reply| StoreJob::Generate { name, tier, reply })
                .await
        }
        Err(e) => e.reply(),
    }
}

/// `POST /api/webhook/config`: the URL's shape is checked here; its resolution in the store pool.
pub async fn set_webhook(ctx: &Rc<CoreCtx>, req: &Request, org: OrgInfo) -> Reply {
    let url = require_json(req).and_then(|()| {
        with_body(ctx, &req.body, |body| {
            let url = match body.get("webhook_url") {
                Some(Field::Str(s)) => s,
                None | Some(Field::Null) => {
                    return Err(ApiError::validation(
                        "webhook_url",
                        "webhook_url is required",
                    ))
                }
                Some(other) => {
                    return Err(ApiError::validation(
                        "webhook_url",
                        format!("webhook_url must be a string, not {}", other.type_name()),
                    ))
                }
            };
            target::parse_url(url).map_err(|why| ApiError::validation("webhook_url", why))?;
            Ok(url.to_string())
        })
    });
    match url {
        Ok(url) => ctx.query(org, Query::SetWebhook { url }).await,
        Err(e) => e.reply(),
    }
}

/// Compare secrets without an early exit that would leak how much of them matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn constant_time_eq_compares_whole_strings() {
        assert!(constant_time_eq(b"secret-token", b"secret-token"));
        assert!(!constant_time_eq(b"secret-token", b"secret-tokeN"));
        assert!(!constant_time_eq(b"secret", b"secret-token"));
    }
}
