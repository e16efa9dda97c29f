//! Route a complete request to its handler: unauthenticated routes first, then the key, then the
//! handler of the route's API area. Every authenticated answer carries the rate headers.

use std::rc::Rc;

use super::core::CoreCtx;
use super::request::Request;
use super::router::{self, Route};
use super::{admin, events, inbox, ops};
use crate::auth::{key_from_headers, OrgInfo};
use crate::error::ApiError;
use crate::reply::Reply;

/// The organization of the request's key (`X-API-Key` or `Authorization: Bearer`).
async fn authenticate(ctx: &Rc<CoreCtx>, req: &Request) -> Result<OrgInfo, ApiError> {
    let raw = key_from_headers(
        req.head.api_key.as_deref(),
        req.head.authorization.as_deref(),
    )
    .ok_or(ApiError::Unauthorized(
        "missing API key; send X-API-Key: <key> or Authorization: Bearer <key>",
    ))?;
    ctx.authenticate(raw, req.peer)
        .await
        .map_err(ApiError::from)
}

/// Route a complete request to its handler. Returns the route (for metrics) and the reply.
pub async fn handle(ctx: &Rc<CoreCtx>, req: Request, metrics_only: bool) -> (Route, Reply) {
    let Ok(path) = std::str::from_utf8(&req.head.path) else {
        return (
            Route::NotFound,
            ApiError::NotFound("no such endpoint").reply(),
        );
    };
    let matched = match router::route(req.head.method, path) {
        Ok(m) if metrics_only && m.route != Route::Metrics => {
            return (
                Route::NotFound,
                ApiError::NotFound("only /metrics is served here").reply(),
            )
        }
        Ok(m) => m,
        Err(e) => {
            let route = if e.status() == 405 {
                Route::MethodNotAllowed
            } else {
                Route::NotFound
            };
            return (route, e.reply());
        }
    };
    let route = matched.route;
    let reply = match route {
        Route::Health => ops::health(),
        Route::Live => ops::live(),
        Route::Ready => ops::ready(ctx).await,
        Route::Metrics => ops::metrics(ctx),
        Route::OpenApi => ops::openapi(),
        Route::KeysGenerate => admin::generate(ctx, &req).await,
        _ => match authenticate(ctx, &req).await {
            Err(e) => e.reply(),
            Ok(org) => {
                let reply = match route {
                    Route::EventsCreate => events::create(ctx, &req, org).await,
                    Route::EventGet => events::get(ctx, org, matched.param).await,
                    Route::EventRedeliver => events::redeliver(ctx, org, matched.param).await,
                    Route::Inbox => inbox::list(ctx, &req, org).await,
                    Route::Ack => inbox::ack(ctx, org, matched.param).await,
                    Route::AckBatch => inbox::ack_batch(ctx, &req, org).await,
                    Route::KeysInfo => admin::key_info(ctx, org).await,
                    Route::KeysRotate => admin::rotate(ctx, org).await,
                    Route::WebhookSet => admin::set_webhook(ctx, &req, org).await,
                    Route::WebhookDelete => admin::delete_webhook(ctx, org).await,
                    _ => unreachable!("unauthenticated routes are matched above"),
                };
                match reply {
                    // Answers refused before reaching the owner still carry the rate headers.
                    r if r.rate.is_none() => {
                        let rate = ctx.rate(org).await;
                        r.with_rate(rate)
                    }
                    r => r,
                }
            }
        },
    };
    (route, reply)
}
