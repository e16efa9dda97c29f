//! Operations: health, readiness, metrics, the OpenAPI document.

use super::core::CoreCtx;
use crate::config::RETRY_AFTER_UNAVAILABLE_S;
use crate::error::ApiError;
use crate::json::{write_int, Obj};
use crate::reply::Reply;

/// The OpenAPI 3.1 document of the whole API.
pub const OPENAPI: &[u8] = include_bytes!("openapi.json");

/// `GET /health`: the process answers.
pub fn health() -> Reply {
    Reply::json(200, &br#"{"status":"healthy"}"#[..])
}

/// `GET /health/live`: every ingress core runs (for liveness probes: 503 tells the supervisor to
/// restart a process with a dead core).
pub fn live(ctx: &CoreCtx) -> Reply {
    let dead = ctx.liveness.dead();
    if dead.is_empty() {
        return Reply::json(200, &br#"{"status":"alive"}"#[..]);
    }
    let mut reply = Reply::build(503, |out| {
        let mut o = Obj::new(out);
        o.str("error", "an ingress core has stopped; restart the process")
            .str("code", "unavailable")
            .str("status", "dead_cores");
        let list = o.key("dead_cores");
        list.push(b'[');
        for (i, core) in dead.iter().enumerate() {
            if i > 0 {
                list.push(b',');
            }
            write_int(list, *core as i64);
        }
        list.push(b']');
        o.finish();
    });
    reply.extra.retry_after_s = Some(RETRY_AFTER_UNAVAILABLE_S);
    reply
}

/// `GET /health/ready`: 200 while the database takes writes (the health probe's flag, kept on its
/// own connection), else 503. No query per probe request: a load balancer polling it costs nothing.
pub fn ready(ctx: &CoreCtx) -> Reply {
    match ctx.store.health().refusal() {
        None => Reply::json(200, &br#"{"status":"ready"}"#[..]),
        Some(refusal) => ApiError::from(refusal).reply(),
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
