//! Operations: health, readiness, metrics, the OpenAPI document.

use std::rc::Rc;

use super::core::CoreCtx;
use crate::error::ApiError;
use crate::flow::answer::Answer;
use crate::flow::job::StoreJob;
use crate::reply::Reply;

/// The OpenAPI 3.1 document of the whole API.
pub const OPENAPI: &[u8] = include_bytes!("openapi.json");

/// `GET /health`: the process answers.
pub fn health() -> Reply {
    Reply::json(200, &br#"{"status":"healthy"}"#[..])
}

/// `GET /health/live`: the process answers (for liveness probes).
pub fn live() -> Reply {
    Reply::json(200, &br#"{"status":"alive"}"#[..])
}

/// `GET /health/ready`: 200 when the database answers, else 503.
pub async fn ready(ctx: &Rc<CoreCtx>) -> Reply {
    match ctx.ask_store(|reply| StoreJob::Ready { reply }).await {
        Ok(Answer::Ready) => Reply::json(200, &br#"{"status":"ready"}"#[..]),
        _ => ApiError::Unavailable.reply(),
    }
}

/// `GET /metrics`: Prometheus text format.
pub fn metrics(ctx: &CoreCtx) -> Reply {
    let mut reply = Reply::json(200, ctx.all_metrics.render());
    reply.content_type = "text/plain; version=0.0.4; charset=utf-8";
    reply
}

/// `GET /openapi.json`.
pub fn openapi() -> Reply {
    Reply::json(200, OPENAPI)
}
