//! Keys and the webhook: `POST /api/keys/generate`, `GET /api/keys`, `POST /api/keys/rotate`,
//! `POST` and `DELETE /api/webhook/config`, and the rendering of their answers.

use std::rc::Rc;

use super::core::CoreCtx;
use super::request::{idempotency_key, require_json, text_field, with_body, Request};
use crate::auth::{key_from_headers, ApiKey, OrgInfo, Tier};
use crate::config::ROTATION_IDEMPOTENCY_KEY_BYTES_MIN;
use crate::error::ApiError;
use crate::flow::answer::{Answer, NewKey, WebhookConfig};
use crate::flow::job::{GenerateOnce, Query, StoreJob};
use crate::json::{Field, Obj};
use crate::reply::Reply;
use crate::url_policy;

/// `POST /api/keys/generate`: a new organization and its key. With an `Idempotency-Key`, the
/// same request again within `--key-rotation-retry-s` (its answer lost) gets the organization
/// the first made, with a new key (`store::keys::generate`).
pub async fn generate(ctx: &Rc<CoreCtx>, req: &Request) -> Reply {
    if let Some(token) = ctx.config.admin_token.as_deref() {
        let sent = key_from_headers(None, req.head.authorization.as_deref());
        if !sent.is_some_and(|s| constant_time_eq(s, token.as_bytes())) {
            return ApiError::Unauthorized(
                "this server requires its admin token: Authorization: Bearer <admin token>",
            )
            .reply();
        }
    }
    let parsed = require_json(req).and_then(|()| {
        with_body(&ctx.parser, &req.body, |body| {
            // Either name; when both are sent both must be valid, and `organization_name` wins.
            for field in ["organization_name", "org_name"] {
                if body.get(field) == Some(Field::Null) {
                    return Err(ApiError::validation(
                        "organization_name",
                        format!("{field} must be a string, not null"),
                    ));
                }
            }
            let alias = text_field(body, &["org_name"], "org_name", false)?;
            let name = text_field(body, &["organization_name"], "organization_name", false)?
                .or(alias)
                .ok_or_else(|| {
                    ApiError::validation("organization_name", "organization_name is required")
                })?
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
    let (name, tier) = match parsed {
        Ok(p) => p,
        Err(e) => return e.reply(),
    };
    let once = match retry_key(req, "a key generation") {
        Ok(key) => key.map(|key_sha256| {
            use sha2::Digest;
            GenerateOnce {
                key_sha256,
                body_sha256: sha2::Sha256::digest(&req.body).into(),
            }
        }),
        Err(e) => return e.reply(),
    };
    match ctx
        .ask_store(|reply| StoreJob::Generate {
            name,
            tier,
            peer: req.peer,
            once,
            reply,
        })
        .await
    {
        Ok(Answer::Generated(key)) => new_key_reply(201, &key),
        Ok(_) => ApiError::Internal.reply(),
        Err(r) => ApiError::from(r).reply(),
    }
}

/// A key shown once: at generation (with tier, limit and creation time) or rotation.
fn new_key_reply(status: u16, key: &NewKey) -> Reply {
    Reply::build(status, |out| {
        let mut o = Obj::new(out);
        o.str("api_key", &key.api_key)
            .id("organization_id", &key.organization_id)
            .str("organization_name", &key.organization_name);
        match key.tier {
            Some(tier) => {
                o.str("tier", tier.as_str())
                    .int("rate_limit_per_minute", i64::from(tier.limit_per_minute()))
                    .time("created_at", key.at);
            }
            None => {
                o.time("rotated_at", key.at);
            }
        }
        o.finish();
    })
}

/// `GET /api/keys`.
pub async fn key_info(ctx: &Rc<CoreCtx>, org: OrgInfo) -> Reply {
    ctx.query(org, Query::KeyInfo)
        .await
        .render(|answer| match answer {
            Answer::KeyInfo(k) => Some(Reply::build(200, |out| {
                let mut o = Obj::new(out);
                o.id("organization_id", &k.organization_id)
                    .str("organization_name", &k.organization_name)
                    .str("tier", &k.tier)
                    .int("rate_limit_per_minute", i64::from(k.rate_limit_per_minute))
                    .opt_str("webhook_url", k.webhook_url.as_deref())
                    .str("key_prefix", &k.key_prefix)
                    .time("created_at", k.created_at)
                    .opt_time("rotated_at", k.rotated_at);
                o.finish();
            })),
            _ => None,
        })
}

/// SHA-256 of an `Idempotency-Key` (as [`idempotency_key`] reads it).
fn key_digest(key: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(key.as_bytes()).into()
}

/// The SHA-256 of the `Idempotency-Key` of `what` (a key generation or rotation), which must
/// not be guessable: it is what lets the request be asked again for a new key.
fn retry_key(req: &Request, what: &str) -> Result<Option<[u8; 32]>, ApiError> {
    match idempotency_key(req.head.idempotency_key.as_deref())? {
        Some(key) if key.len() < ROTATION_IDEMPOTENCY_KEY_BYTES_MIN => Err(ApiError::validation(
            "Idempotency-Key",
            format!(
                "the Idempotency-Key of {what} must be at least \
                 {ROTATION_IDEMPOTENCY_KEY_BYTES_MIN} characters (a random UUID): it is what \
                 lets a lost answer be asked again for a new key"
            ),
        )),
        key => Ok(key.as_deref().map(key_digest)),
    }
}

/// `POST /api/keys/rotate`, optional `Idempotency-Key`: with one, the key this retires may ask
/// the same rotation again for `--key-rotation-retry-s` if this answer is lost
/// ([`retry_rotation`]).
pub async fn rotate(ctx: &Rc<CoreCtx>, req: &Request, org: OrgInfo) -> Reply {
    let retry_key = match retry_key(req, "a key rotation") {
        Ok(key) => key,
        Err(e) => return e.reply(),
    };
    ctx.query(
        org,
        Query::Rotate {
            peer: req.peer,
            retry_key,
        },
    )
    .await
    .render(|answer| match answer {
        Answer::Rotated(key) => Some(new_key_reply(200, &key)),
        _ => None,
    })
}

/// `POST /api/keys/rotate` with a key that no cache or lookup took, and an `Idempotency-Key`:
/// perhaps the key a rotation with that Idempotency-Key retired, asking again because the answer
/// was lost. The store decides (`store::keys::retry_rotation`); anything else is the 401 it was.
pub async fn retry_rotation(ctx: &Rc<CoreCtx>, req: &Request) -> Reply {
    let refused = || ApiError::Unauthorized("invalid API key").reply();
    let key = key_from_headers(
        req.head.api_key.as_deref(),
        req.head.authorization.as_deref(),
    )
    .and_then(ApiKey::parse);
    let retry_key = idempotency_key(req.head.idempotency_key.as_deref());
    let (Some(key), Ok(Some(retry_key))) = (key, retry_key) else {
        return refused();
    };
    match ctx
        .ask_store(|reply| StoreJob::RetryRotation {
            key,
            retry_key: key_digest(&retry_key),
            peer: req.peer,
            reply,
        })
        .await
    {
        Ok(Answer::Rotated(key)) => new_key_reply(200, &key),
        Ok(_) => ApiError::Internal.reply(),
        Err(r) => ApiError::from(r).reply(),
    }
}

/// `POST /api/webhook/config`: the URL's shape is checked here; its resolution in the store pool.
pub async fn set_webhook(ctx: &Rc<CoreCtx>, req: &Request, org: OrgInfo) -> Reply {
    let url = require_json(req).and_then(|()| {
        with_body(&ctx.parser, &req.body, |body| {
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
            url_policy::parse_url(url).map_err(|why| ApiError::validation("webhook_url", why))?;
            Ok(url.to_string())
        })
    });
    let url = match url {
        Ok(url) => url,
        Err(e) => return e.reply(),
    };
    ctx.query(org, Query::SetWebhook { url })
        .await
        .render(|answer| match answer {
            Answer::WebhookSet(w) => Some(webhook_reply(&w)),
            _ => None,
        })
}

/// `DELETE /api/webhook/config`.
pub async fn delete_webhook(ctx: &Rc<CoreCtx>, org: OrgInfo) -> Reply {
    ctx.query(org, Query::DeleteWebhook)
        .await
        .render(|answer| match answer {
            Answer::WebhookDeleted(w) => Some(webhook_reply(&w)),
            _ => None,
        })
}

fn webhook_reply(w: &WebhookConfig) -> Reply {
    Reply::build(200, |out| {
        let mut o = Obj::new(out);
        o.id("organization_id", &w.organization_id);
        match &w.webhook_url {
            Some(url) => o.str("webhook_url", url),
            None => o.null("webhook_url"),
        };
        if let Some(secret) = &w.signing_secret {
            o.str("signing_secret", secret);
        }
        o.time("updated_at", w.updated_at);
        o.finish();
    })
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
