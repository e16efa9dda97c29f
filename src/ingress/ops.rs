//! Operations: health, readiness, metrics, the OpenAPI document.

use super::core::CoreCtx;
use crate::config::RETRY_AFTER_UNAVAILABLE_S;
use crate::error::ApiError;
use crate::json::{write_int, Obj};
use crate::reply::Reply;

/// The OpenAPI 3.1 document of the whole API, as written (indented, for people to edit).
const OPENAPI_SOURCE: &[u8] = include_bytes!("openapi.json");

/// The OpenAPI 3.1 document of the whole API, as served and built into the binary: the source
/// without the whitespace between its tokens (a quarter of its bytes), at compile time.
pub const OPENAPI: &[u8] = &json_minified::<{ json_minified_len(OPENAPI_SOURCE) }>(OPENAPI_SOURCE);

/// Whether `byte`, the next of some JSON text, is kept: it is not whitespace between tokens.
/// `in_string` and `escaped` carry where the walk is from one byte to the next.
const fn is_kept(byte: u8, in_string: &mut bool, escaped: &mut bool) -> bool {
    if *in_string {
        if *escaped {
            *escaped = false;
        } else if byte == b'\\' {
            *escaped = true;
        } else if byte == b'"' {
            *in_string = false;
        }
        true
    } else if byte == b'"' {
        *in_string = true;
        true
    } else {
        !matches!(byte, b' ' | b'\n' | b'\r' | b'\t')
    }
}

/// The length of `json` without the whitespace between its tokens.
const fn json_minified_len(json: &[u8]) -> usize {
    let (mut i, mut n, mut in_string, mut escaped) = (0, 0, false, false);
    while i < json.len() {
        if is_kept(json[i], &mut in_string, &mut escaped) {
            n += 1;
        }
        i += 1;
    }
    n
}

/// `json` without the whitespace between its tokens; `N` is [`json_minified_len`]'s.
const fn json_minified<const N: usize>(json: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    let (mut i, mut n, mut in_string, mut escaped) = (0, 0, false, false);
    while i < json.len() {
        if is_kept(json[i], &mut in_string, &mut escaped) {
            out[n] = json[i];
            n += 1;
        }
        i += 1;
    }
    out
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_served_openapi_document_is_the_source_less_its_whitespace() {
        let source: serde_json::Value = serde_json::from_slice(OPENAPI_SOURCE).unwrap();
        let served: serde_json::Value = serde_json::from_slice(OPENAPI).unwrap();
        assert!(served == source, "the served document reads differently");
        // Only whitespace went: the source less every space, tab and line break is the served
        // document less those inside its strings.
        let bare = |text: &[u8]| -> Vec<u8> {
            text.iter()
                .copied()
                .filter(|b| !b" \t\r\n".contains(b))
                .collect()
        };
        assert!(
            bare(OPENAPI_SOURCE) == bare(OPENAPI),
            "more than whitespace went"
        );
        assert!(
            OPENAPI.len() * 4 < OPENAPI_SOURCE.len() * 3,
            "{}",
            OPENAPI.len()
        );
    }

    #[test]
    fn whitespace_inside_strings_and_escaped_quotes_stay() {
        const SOURCE: &[u8] = br#"{ "a b": "c \" d\\",
            "e" : [ 1 , "\t x" ] }"#;
        const OUT: [u8; json_minified_len(SOURCE)] = json_minified(SOURCE);
        assert_eq!(&OUT[..], &br#"{"a b":"c \" d\\","e":[1,"\t x"]}"#[..]);
    }
}
