//! A finished answer to one request: built by the connection's own core from the values the other
//! stages answered, and written to its socket.

use bytes::Bytes;

use crate::flow::answer::RateSnapshot;
use crate::ids::OrgId;

/// Headers beyond the fixed set (`Content-Type`, `Content-Length`, `Date`, rate limits).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Extra {
    /// `Retry-After: <seconds>`.
    pub retry_after_s: Option<u32>,
    /// `WWW-Authenticate: ApiKey`.
    pub www_authenticate: bool,
    /// `Allow: <methods>` on 405.
    pub allow: Option<&'static str>,
    /// `Accept-Encoding: identity`: a body must come as it is (RFC 9110, 15.5.16).
    pub identity_only: bool,
    /// Close the connection after this response.
    pub close: bool,
    /// `Idempotent-Replayed: true`: the answer of an earlier request with the same
    /// `Idempotency-Key`.
    pub replayed: bool,
}

/// A response ready to be written: status, JSON body and the headers that vary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status code.
    pub status: u16,
    /// The JSON body (or Prometheus text for /metrics).
    pub body: Bytes,
    /// Content type of `body`.
    pub content_type: &'static str,
    /// Headers that vary by outcome.
    pub extra: Extra,
    /// Rate-limit headers, on authenticated responses.
    pub rate: Option<RateSnapshot>,
    /// The organization the request was authenticated as (for the access log).
    pub org: Option<OrgId>,
}

/// The JSON content type every API response carries.
pub const JSON: &str = "application/json";

impl Reply {
    /// A JSON reply.
    pub fn json(status: u16, body: impl Into<Bytes>) -> Reply {
        Reply {
            status,
            body: body.into(),
            content_type: JSON,
            extra: Extra::default(),
            rate: None,
            org: None,
        }
    }

    /// A JSON reply built by `f` writing into a fresh buffer.
    pub fn build(status: u16, f: impl FnOnce(&mut Vec<u8>)) -> Reply {
        let mut out = Vec::with_capacity(256);
        f(&mut out);
        Reply::json(status, out)
    }

    /// The same reply with rate-limit headers.
    pub fn with_rate(mut self, rate: Option<RateSnapshot>) -> Reply {
        if self.rate.is_none() {
            self.rate = rate;
        }
        self
    }
}
