//! Responses into the connection's write buffer: status line, the fixed headers, the headers that
//! vary, and the body.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::json::write_int;
use crate::reply::Reply;

/// The reason phrase of a status code.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// The `Date` header value, recomputed once a second.
pub struct DateCache {
    second: u64,
    text: [u8; 29],
}

impl Default for DateCache {
    fn default() -> Self {
        let mut d = DateCache {
            second: u64::MAX,
            text: [b' '; 29],
        };
        d.refresh();
        d
    }
}

impl DateCache {
    /// The current value (`Sun, 06 Nov 1994 08:49:37 GMT`).
    pub fn get(&mut self) -> &[u8; 29] {
        self.refresh();
        &self.text
    }

    fn refresh(&mut self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if now != self.second {
            self.second = now;
            self.text = crate::ids::http_date(now);
        }
    }
}

/// Append `reply` as an HTTP/1.1 response. `keep_alive` false adds `Connection: close`.
pub fn write_reply(out: &mut Vec<u8>, reply: &Reply, keep_alive: bool, date: &[u8]) {
    out.reserve(256 + reply.body.len());
    out.extend_from_slice(b"HTTP/1.1 ");
    write_int(out, i64::from(reply.status));
    out.push(b' ');
    out.extend_from_slice(reason(reply.status).as_bytes());
    out.extend_from_slice(b"\r\nContent-Type: ");
    out.extend_from_slice(reply.content_type.as_bytes());
    out.extend_from_slice(b"\r\nContent-Length: ");
    write_int(out, reply.body.len() as i64);
    out.extend_from_slice(b"\r\nDate: ");
    out.extend_from_slice(date);
    if let Some(rate) = reply.rate {
        out.extend_from_slice(b"\r\nX-RateLimit-Limit: ");
        write_int(out, i64::from(rate.limit));
        out.extend_from_slice(b"\r\nX-RateLimit-Remaining: ");
        write_int(out, i64::from(rate.remaining));
        out.extend_from_slice(b"\r\nX-RateLimit-Reset: ");
        write_int(out, i64::from(rate.reset_s));
    }
    if let Some(s) = reply.extra.retry_after_s {
        out.extend_from_slice(b"\r\nRetry-After: ");
        write_int(out, i64::from(s));
    }
    if reply.extra.www_authenticate {
        out.extend_from_slice(b"\r\nWWW-Authenticate: ApiKey");
    }
    if let Some(allow) = reply.extra.allow {
        out.extend_from_slice(b"\r\nAllow: ");
        out.extend_from_slice(allow.as_bytes());
    }
    if reply.extra.identity_only {
        out.extend_from_slice(b"\r\nAccept-Encoding: identity");
    }
    if reply.extra.replayed {
        out.extend_from_slice(b"\r\nIdempotent-Replayed: true");
    }
    if !keep_alive || reply.extra.close {
        out.extend_from_slice(b"\r\nConnection: close");
    }
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(&reply.body);
}

/// The interim response to `Expect: 100-continue`.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ApiError;
    use crate::flow::answer::RateSnapshot;

    #[test]
    fn writes_status_headers_and_body() {
        let mut reply = ApiError::RateLimited {
            limit: 100,
            retry_after_s: 2,
        }
        .reply();
        reply.rate = Some(RateSnapshot {
            limit: 100,
            remaining: 0,
            reset_s: 60,
        });
        let mut out = Vec::new();
        write_reply(&mut out, &reply, true, b"Thu, 01 Jan 1970 00:00:00 GMT");
        let text = String::from_utf8(out).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert_eq!(
            head,
            format!(
                "HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nDate: Thu, 01 Jan 1970 00:00:00 GMT\r\n\
                 X-RateLimit-Limit: 100\r\nX-RateLimit-Remaining: 0\r\nX-RateLimit-Reset: 60\r\n\
                 Retry-After: 2",
                body.len()
            )
        );
        assert_eq!(body.as_bytes(), &reply.body[..]);
    }

    #[test]
    fn close_and_auth_headers() {
        let mut out = Vec::new();
        write_reply(&mut out, &ApiError::Unauthorized("x").reply(), false, b"D");
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("\r\nWWW-Authenticate: ApiKey\r\n"));
        assert!(text.contains("\r\nConnection: close\r\n"));
    }
}
