//! Route a request to its handler, in two steps: [`prepare`] works from the head alone (route,
//! method, the API key), so a request that will be refused is refused before its body is read and
//! before `100 Continue` is sent; [`run`] takes the body and calls the handler of the route's API
//! area. Every authenticated answer carries the rate headers.

use std::net::IpAddr;
use std::rc::Rc;

use super::core::CoreCtx;
use super::parse::{Head, Method};
use super::request::Request;
use super::router::{self, Route};
use super::{admin, endpoints, events, inbox, ops};
use crate::auth::{key_from_headers, keys_disagree, OrgInfo};
use crate::error::ApiError;
use crate::reply::Reply;

/// A request ready for its body: its route, its path id, and its organization when the route
/// needs a key.
pub struct Ready {
    /// The route.
    pub route: Route,
    /// The `{id}` path segment.
    pub param: Option<Box<str>>,
    /// The organization of the key (authenticated routes).
    pub org: Option<OrgInfo>,
}

/// What the head alone decided.
pub enum Prepared {
    /// Read the body and run the handler.
    Ready(Ready),
    /// Answered without the body: 404, 405, 401, 429, 503.
    Answer(Route, Reply),
}

/// Route the head and, for routes that need one, authenticate its key.
pub async fn prepare(ctx: &Rc<CoreCtx>, head: &Head, peer: IpAddr, metrics_only: bool) -> Prepared {
    let Ok(path) = std::str::from_utf8(&head.path) else {
        return Prepared::Answer(
            Route::NotFound,
            ApiError::NotFound("no such endpoint").reply(),
        );
    };
    let matched = match router::route(head.method, path) {
        // The metrics listener serves scrapes and the liveness probe (`triggers probe`), which
        // then reach a node whose API connections are all taken.
        Ok(m) if metrics_only && !matches!(m.route, Route::Metrics | Route::Live) => {
            return Prepared::Answer(
                Route::NotFound,
                ApiError::NotFound("only /metrics and /health/live are served here").reply(),
            )
        }
        Ok(m) => m,
        Err(e) => {
            let route = if e.status() == 405 {
                Route::MethodNotAllowed
            } else {
                Route::NotFound
            };
            return Prepared::Answer(route, e.reply());
        }
    };
    let route = matched.route;
    // Every change writes times by this node's clock (event ids, schedules, leases): none while
    // that clock is too far off the database's (the health probe measures it). Reads go on.
    if head.method != Method::Get && ctx.store.health().clock_is_off() {
        return Prepared::Answer(route, ApiError::ClockOff.reply());
    }
    let param = matched.param.map(Box::<str>::from);
    if !route.needs_key() {
        return Prepared::Ready(Ready {
            route,
            param,
            org: None,
        });
    }
    match authenticate(ctx, head, peer).await {
        Ok(org) => Prepared::Ready(Ready {
            route,
            param,
            org: Some(org),
        }),
        // Perhaps the key a rotation retired, asking it again because its answer was lost: the
        // store decides (`admin::retry_rotation`), and refuses anything else as this would.
        Err(ApiError::Unauthorized(_))
            if route == Route::KeysRotate
                && head.idempotency_key.is_some()
                && key_from_headers(head.api_key.as_deref(), head.authorization.as_deref())
                    .is_some() =>
        {
            Prepared::Ready(Ready {
                route,
                param,
                org: None,
            })
        }
        Err(e) => Prepared::Answer(route, e.reply()),
    }
}

/// The organization of the request's key (`X-API-Key` or `Authorization: Bearer`).
async fn authenticate(ctx: &Rc<CoreCtx>, head: &Head, peer: IpAddr) -> Result<OrgInfo, ApiError> {
    if keys_disagree(head.api_key.as_deref(), head.authorization.as_deref()) {
        return Err(ApiError::BadRequest(
            "X-API-Key and Authorization: Bearer name different keys; send one".into(),
        ));
    }
    let raw = key_from_headers(head.api_key.as_deref(), head.authorization.as_deref()).ok_or(
        ApiError::Unauthorized(
            "missing API key; send X-API-Key: <key> or Authorization: Bearer <key>",
        ),
    )?;
    ctx.authenticate(raw, peer).await.map_err(ApiError::from)
}

/// Run the handler of a prepared request with its body.
pub async fn run(ctx: &Rc<CoreCtx>, ready: Ready, req: &Request) -> Reply {
    let param = ready.param.as_deref();
    let Some(org) = ready.org else {
        return match ready.route {
            Route::Health => ops::health(),
            Route::Live => ops::live(ctx),
            Route::Ready => ops::ready(ctx),
            Route::Metrics => ops::metrics(ctx),
            Route::OpenApi => ops::openapi(),
            Route::KeysGenerate => admin::generate(ctx, req).await,
            Route::KeysRotate => admin::retry_rotation(ctx, req).await,
            other => {
                tracing::error!(route = ?other, "a route that needs a key came without one");
                ApiError::Internal.reply()
            }
        };
    };
    let reply = match ready.route {
        Route::EventsCreate => events::create(ctx, req, org).await,
        Route::EventsBatch => events::create_batch(ctx, req, org).await,
        Route::EventGet => events::get(ctx, org, param).await,
        Route::Inbox => inbox::list(ctx, req, org).await,
        Route::Ack => inbox::ack(ctx, org, param).await,
        Route::AckBatch => inbox::ack_batch(ctx, req, org).await,
        Route::KeysInfo => admin::key_info(ctx, org).await,
        Route::KeysRotate => admin::rotate(ctx, req, org).await,
        Route::WebhookSet => admin::set_webhook(ctx, req, org).await,
        Route::WebhookDelete => admin::delete_webhook(ctx, org).await,
        Route::EndpointsCreate => endpoints::create(ctx, req, org).await,
        Route::EndpointsList => endpoints::list(ctx, org).await,
        Route::EndpointGet => endpoints::get(ctx, org, param).await,
        Route::EndpointPatch => endpoints::patch(ctx, req, org, param).await,
        Route::EndpointDelete => endpoints::delete(ctx, org, param).await,
        Route::EndpointSecret => endpoints::secret(ctx, org, param).await,
        Route::EndpointRotate => endpoints::rotate(ctx, req, org, param).await,
        Route::EndpointPause => endpoints::set_paused(ctx, org, param, true).await,
        Route::EndpointResume => endpoints::set_paused(ctx, org, param, false).await,
        Route::EndpointRecover => endpoints::recover(ctx, req, org, param).await,
        Route::EndpointFailed => endpoints::failed(ctx, req, org, param).await,
        Route::EventRedeliver => events::redeliver(ctx, req, org, param).await,
        other => {
            tracing::error!(route = ?other, "an unauthenticated route came with a key");
            ApiError::Internal.reply()
        }
    };
    let mut reply = match reply {
        // Answers refused before reaching the owner still carry the rate headers.
        r if r.rate.is_none() => {
            let rate = ctx.rate(org).await;
            r.with_rate(rate)
        }
        r => r,
    };
    reply.org = Some(org.id);
    reply
}
