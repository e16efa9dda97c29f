//! `ApiError`: one table from every error to its status, JSON `code`, message and headers.
//!
//! Every error body is `{"error": "<sentence>", "code": "<machine_code>", ...details}`.

use uuid::Uuid;

use crate::config::RETRY_AFTER_UNAVAILABLE_S;
use crate::flow::answer::Refusal;
use crate::json::Obj;
use crate::reply::{Extra, Reply};

/// Every way a request can fail, with the numbers its message needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// 400 `bad_request`: malformed HTTP. The connection is closed after it.
    BadRequest(String),
    /// 401 `unauthorized`, with `WWW-Authenticate: ApiKey`.
    Unauthorized(&'static str),
    /// 429 after too many failed keys from one address, refused without checking; carries
    /// Retry-After.
    AuthThrottled {
        /// Seconds until the address may try again.
        retry_after_s: u32,
    },
    /// 429 after too many key generations or rotations; carries Retry-After.
    KeyOpsLimited {
        /// Seconds until one more is allowed.
        retry_after_s: u32,
    },
    /// 400 `invalid_json`.
    InvalidJson(String),
    /// 422 `validation_failed` naming the field.
    Validation {
        /// The field at fault (`"path"` or `"query"` parameters are named too).
        field: &'static str,
        /// What is wrong, as a sentence.
        message: String,
    },
    /// 413 `payload_too_large`.
    PayloadTooLarge(String),
    /// 409 `duplicate` with the first event's id.
    Duplicate {
        /// The event that already has this dedup id.
        event_id: Uuid,
    },
    /// 429 `rate_limited` with `limit` and `retry_after`.
    RateLimited {
        /// Events per minute.
        limit: u32,
        /// Seconds until one event fits again.
        retry_after_s: u32,
    },
    /// 404 `not_found`.
    NotFound(&'static str),
    /// 405 `method_not_allowed` with `Allow`.
    MethodNotAllowed {
        /// Methods the route accepts.
        allow: &'static str,
    },
    /// 415 `unsupported_media_type`.
    UnsupportedMediaType,
    /// 415 `unsupported_media_type`: the body came with a `Content-Encoding` (gzip, say); with
    /// `Accept-Encoding: identity`.
    UnsupportedEncoding,
    /// 503 `unavailable`: the database cannot be reached.
    Unavailable,
    /// 503 `overloaded`: a bounded queue is full.
    Overloaded(&'static str),
    /// 503 `unavailable`: a webhook host could not be looked up now (the resolver failed).
    ResolverDown,
    /// 503 `unavailable`: this node's clock is too far off the database's.
    ClockOff,
    /// 408 `request_timeout`; the connection is closed after it.
    RequestTimeout(&'static str),
    /// 431 `headers_too_large`; the connection is closed after it.
    HeadersTooLarge(usize),
    /// 409 `no_webhook`.
    NoWebhook,
    /// 500 `internal`: a bug or an unexpected database answer; details go to the log.
    Internal,
}

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> ApiError {
        match r {
            Refusal::Unavailable => ApiError::Unavailable,
            Refusal::Overloaded(what) => ApiError::Overloaded(what),
            Refusal::RateLimited {
                limit,
                retry_after_s,
            } => ApiError::RateLimited {
                limit,
                retry_after_s,
            },
            Refusal::Unauthorized(m) => ApiError::Unauthorized(m),
            Refusal::AuthThrottled { retry_after_s } => ApiError::AuthThrottled { retry_after_s },
            Refusal::KeyOpsLimited { retry_after_s } => ApiError::KeyOpsLimited { retry_after_s },
            Refusal::NotFound(m) => ApiError::NotFound(m),
            Refusal::NoWebhook => ApiError::NoWebhook,
            Refusal::Invalid { field, message } => ApiError::Validation { field, message },
            Refusal::ResolverDown => ApiError::ResolverDown,
            Refusal::ClockOff => ApiError::ClockOff,
            Refusal::Internal => ApiError::Internal,
        }
    }
}

impl ApiError {
    /// A 422 on `field`.
    pub fn validation(field: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::Validation {
            field,
            message: message.into(),
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            ApiError::BadRequest(_) | ApiError::InvalidJson(_) => 400,
            ApiError::Unauthorized(_) => 401,
            ApiError::NotFound(_) => 404,
            ApiError::MethodNotAllowed { .. } => 405,
            ApiError::RequestTimeout(_) => 408,
            ApiError::Duplicate { .. } | ApiError::NoWebhook => 409,
            ApiError::PayloadTooLarge(_) => 413,
            ApiError::UnsupportedMediaType | ApiError::UnsupportedEncoding => 415,
            ApiError::Validation { .. } => 422,
            ApiError::RateLimited { .. }
            | ApiError::AuthThrottled { .. }
            | ApiError::KeyOpsLimited { .. } => 429,
            ApiError::HeadersTooLarge(_) => 431,
            ApiError::Internal => 500,
            ApiError::Unavailable
            | ApiError::Overloaded(_)
            | ApiError::ResolverDown
            | ApiError::ClockOff => 503,
        }
    }

    /// The machine-readable `code`.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::InvalidJson(_) => "invalid_json",
            ApiError::Validation { .. } => "validation_failed",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::Duplicate { .. } => "duplicate",
            ApiError::RateLimited { .. }
            | ApiError::AuthThrottled { .. }
            | ApiError::KeyOpsLimited { .. } => "rate_limited",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::UnsupportedMediaType | ApiError::UnsupportedEncoding => {
                "unsupported_media_type"
            }
            ApiError::Unavailable | ApiError::ResolverDown | ApiError::ClockOff => "unavailable",
            ApiError::Overloaded(_) => "overloaded",
            ApiError::RequestTimeout(_) => "request_timeout",
            ApiError::HeadersTooLarge(_) => "headers_too_large",
            ApiError::NoWebhook => "no_webhook",
            ApiError::Internal => "internal",
        }
    }

    /// The human sentence.
    pub fn message(&self) -> String {
        match self {
            ApiError::BadRequest(m) | ApiError::InvalidJson(m) | ApiError::PayloadTooLarge(m) => {
                m.clone()
            }
            ApiError::Validation { message, .. } => message.clone(),
            ApiError::Unauthorized(m) | ApiError::NotFound(m) | ApiError::RequestTimeout(m) => {
                m.to_string()
            }
            ApiError::AuthThrottled { retry_after_s } => format!(
                "too many failed API keys from this address; refused without checking; retry \
                 after {retry_after_s} s"
            ),
            ApiError::KeyOpsLimited { retry_after_s } => {
                format!("too many key generations or rotations; retry after {retry_after_s} s")
            }
            ApiError::Duplicate { .. } => {
                "an event with this dedup_id already exists for the organization".into()
            }
            ApiError::RateLimited {
                limit,
                retry_after_s,
            } => format!(
                "rate limit of {limit} events per minute exceeded; retry after {retry_after_s} s"
            ),
            ApiError::MethodNotAllowed { allow } => {
                format!("method not allowed on this path; allowed: {allow}")
            }
            ApiError::UnsupportedMediaType => "Content-Type must be application/json".into(),
            ApiError::UnsupportedEncoding => "a Content-Encoding (gzip, say) is not taken: send \
                                              the body as it is, with no Content-Encoding or \
                                              identity"
                .into(),
            ApiError::Unavailable => "the database is unavailable; retry shortly".into(),
            ApiError::ResolverDown => "the webhook host could not be looked up now: the DNS \
                                       resolver failed or did not answer; retry shortly"
                .into(),
            ApiError::ClockOff => "this node's clock is further off the database's than \
                                   --clock-offset-max-ms allows: it takes no events until it is \
                                   back; retry shortly (another node can take it)"
                .into(),
            ApiError::Overloaded(what) => format!("server overloaded ({what}); retry shortly"),
            ApiError::HeadersTooLarge(max) => {
                format!("request head exceeds {max} bytes")
            }
            ApiError::NoWebhook => "the organization has no webhook configured".into(),
            ApiError::Internal => "internal error".into(),
        }
    }

    /// Whether the connection must be closed after this error (the stream can't be trusted).
    pub fn closes_connection(&self) -> bool {
        matches!(
            self,
            ApiError::BadRequest(_) | ApiError::RequestTimeout(_) | ApiError::HeadersTooLarge(_)
        )
    }

    /// The full response.
    pub fn reply(&self) -> Reply {
        let mut extra = Extra {
            close: self.closes_connection(),
            ..Extra::default()
        };
        match self {
            ApiError::Unauthorized(_) => extra.www_authenticate = true,
            ApiError::AuthThrottled { retry_after_s }
            | ApiError::KeyOpsLimited { retry_after_s } => {
                extra.retry_after_s = Some(*retry_after_s);
            }
            ApiError::RateLimited { retry_after_s, .. } => {
                extra.retry_after_s = Some(*retry_after_s)
            }
            ApiError::Unavailable
            | ApiError::Overloaded(_)
            | ApiError::ResolverDown
            | ApiError::ClockOff => extra.retry_after_s = Some(RETRY_AFTER_UNAVAILABLE_S),
            ApiError::MethodNotAllowed { allow } => extra.allow = Some(allow),
            ApiError::UnsupportedEncoding => extra.identity_only = true,
            _ => {}
        }
        let mut reply = Reply::build(self.status(), |out| {
            let mut o = Obj::new(out);
            o.str("error", &self.message()).str("code", self.code());
            match self {
                ApiError::Validation { field, .. } => {
                    o.str("field", field);
                }
                ApiError::Duplicate { event_id } => {
                    o.id("event_id", event_id);
                }
                ApiError::RateLimited {
                    limit,
                    retry_after_s,
                } => {
                    o.int("limit", i64::from(*limit))
                        .int("retry_after", i64::from(*retry_after_s));
                }
                ApiError::AuthThrottled { retry_after_s }
                | ApiError::KeyOpsLimited { retry_after_s } => {
                    o.int("retry_after", i64::from(*retry_after_s));
                }
                _ => {}
            }
            o.finish();
        });
        reply.extra = extra;
        reply
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(e: ApiError) -> serde_json::Value {
        serde_json::from_slice(&e.reply().body).unwrap()
    }

    #[test]
    fn every_error_is_json_with_code_and_sentence() {
        let all = [
            ApiError::BadRequest("x".into()),
            ApiError::Unauthorized("missing API key"),
            ApiError::AuthThrottled { retry_after_s: 3 },
            ApiError::KeyOpsLimited { retry_after_s: 3 },
            ApiError::InvalidJson("x".into()),
            ApiError::validation("type", "x"),
            ApiError::PayloadTooLarge("x".into()),
            ApiError::Duplicate {
                event_id: Uuid::nil(),
            },
            ApiError::RateLimited {
                limit: 100,
                retry_after_s: 1,
            },
            ApiError::NotFound("x"),
            ApiError::MethodNotAllowed { allow: "GET" },
            ApiError::UnsupportedMediaType,
            ApiError::Unavailable,
            ApiError::Overloaded("write queue full"),
            ApiError::ResolverDown,
            ApiError::ClockOff,
            ApiError::RequestTimeout("x"),
            ApiError::HeadersTooLarge(16384),
            ApiError::NoWebhook,
            ApiError::Internal,
        ];
        for e in all {
            let v = body(e.clone());
            assert_eq!(v["code"], e.code());
            assert!(!v["error"].as_str().unwrap().is_empty());
            assert_eq!(e.reply().status, e.status());
        }
    }

    #[test]
    fn details_ride_along() {
        let v = body(ApiError::validation("dedup_id", "too long"));
        assert_eq!(
            v,
            serde_json::json!({"error":"too long","code":"validation_failed","field":"dedup_id"})
        );
        let v = body(ApiError::RateLimited {
            limit: 100,
            retry_after_s: 2,
        });
        assert_eq!(v["limit"], 100);
        assert_eq!(v["retry_after"], 2);
        let r = ApiError::RateLimited {
            limit: 100,
            retry_after_s: 2,
        }
        .reply();
        assert_eq!(r.extra.retry_after_s, Some(2));
        let r = ApiError::Unauthorized("missing API key").reply();
        assert!(r.extra.www_authenticate);
        let r = ApiError::Unavailable.reply();
        assert_eq!((r.status, r.extra.retry_after_s), (503, Some(1)));
        assert!(ApiError::RequestTimeout("x").reply().extra.close);
    }
}
