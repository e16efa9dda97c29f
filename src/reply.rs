//! A finished answer to one request: built wherever the work was done (an ingress core, the store
//! pool) and written to the socket by the connection's own core.

use bytes::Bytes;

/// What an organization's token bucket looked like when the request was handled; written as the
/// `X-RateLimit-*` headers of every authenticated response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateSnapshot {
    /// Events per minute (the bucket's capacity).
    pub limit: u32,
    /// Whole tokens left.
    pub remaining: u32,
    /// Whole seconds until the bucket is full again.
    pub reset_s: u32,
}

/// Headers beyond the fixed set (`Content-Type`, `Content-Length`, `Date`, rate limits).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Extra {
    /// `Retry-After: <seconds>`.
    pub retry_after_s: Option<u32>,
    /// `WWW-Authenticate: ApiKey`.
    pub www_authenticate: bool,
    /// `Allow: <methods>` on 405.
    pub allow: Option<&'static str>,
    /// Close the connection after this response.
    pub close: bool,
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
