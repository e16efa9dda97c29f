//! The request head and body framing.
//!
//! The head is parsed with httparse into a fixed header array, only once it is complete; the few
//! headers the server needs are kept as `Bytes` slices of the head (a refcount, no copy). Framing
//! rules: `Content-Length` or `Transfer-Encoding: chunked` (both at once is refused, as is any other
//! transfer coding), `Expect: 100-continue`, HTTP/1.0 and 1.1 keep-alive rules. An HTTP/1.1
//! request names one `Host`, a valid one (RFC 9112, 3.2), and the headers that say who asks and what the body
//! is (`Host`, `Authorization`, `X-API-Key`, `Content-Type`, `Idempotency-Key`) come at most once:
//! a proxy or gateway in front that reads the first of two may judge a request the server would
//! take by the last.

use bytes::{Bytes, BytesMut};

pub use crate::config::HEADERS_MAX;

/// The request methods the API uses, and everything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// GET
    Get,
    /// POST
    Post,
    /// DELETE
    Delete,
    /// PATCH
    Patch,
    /// Any other method.
    Other,
}

/// How the body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (no Content-Length, no Transfer-Encoding).
    None,
    /// `Content-Length: n`.
    Length(usize),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// A complete request head.
#[derive(Debug, Clone)]
pub struct Head {
    /// Bytes of the head, request line to the empty line.
    pub len: usize,
    /// The method.
    pub method: Method,
    /// Path without the query string.
    pub path: Bytes,
    /// The query string, without `?`.
    pub query: Option<Bytes>,
    /// Body framing.
    pub framing: Framing,
    /// Keep the connection open after the response.
    pub keep_alive: bool,
    /// `Expect: 100-continue` was sent.
    pub expect_continue: bool,
    /// `Content-Type`.
    pub content_type: Option<Bytes>,
    /// `X-API-Key`.
    pub api_key: Option<Bytes>,
    /// `Authorization`.
    pub authorization: Option<Bytes>,
    /// `X-Forwarded-For` (used only with `--trust-forwarded-for`).
    pub forwarded_for: Option<Bytes>,
    /// `traceparent` (W3C Trace Context), as sent; checked where it is used.
    pub traceparent: Option<Bytes>,
    /// `X-Request-Id`, as sent (the access log's request id when it is a plain token).
    pub request_id: Option<Bytes>,
    /// `Idempotency-Key`, as sent; checked where it is used (`POST /api/endpoints`).
    pub idempotency_key: Option<Bytes>,
    /// A `Content-Encoding` other than `identity` was sent: the body is not as it reads.
    pub encoded: bool,
}

/// Why a head could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadError {
    /// More headers than [`HEADERS_MAX`]: 431.
    TooManyHeaders,
    /// Malformed or contradictory: 400 with this sentence.
    Bad(&'static str),
}

/// The head, or "need more bytes". Returned by value once per request and taken apart at once:
/// boxing the head would cost an allocation per request to save a move.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Parsed {
    /// A complete head, taken out of the buffer.
    Complete(Head),
    /// Not complete yet.
    Partial,
}

/// Where the head that starts `buf` ends (just past its empty line, CRLF or bare LF), searching
/// only from `from` (minus the 3 bytes an end may straddle): the bytes before were searched when
/// they arrived, so a head sent a byte at a time costs O(its length), not O(length²).
pub fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from.saturating_sub(3);
    while i < buf.len() {
        let nl = i + buf[i..].iter().position(|&b| b == b'\n')?;
        let blank_lf = nl >= 1 && buf[nl - 1] == b'\n';
        let blank_crlf = nl >= 2 && buf[nl - 1] == b'\r' && buf[nl - 2] == b'\n';
        if blank_lf || blank_crlf {
            return Some(nl + 1);
        }
        i = nl + 1;
    }
    None
}

/// Bytes of empty lines at the start of `buf`, which a server ignores before a request line
/// (RFC 9112, 2.2).
pub fn leading_blank_lines(buf: &[u8]) -> usize {
    buf.iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count()
}

/// A `Host` value as RFC 9110 (7.2) has it, `uri-host [ ":" port ]`, judged by its characters
/// (those of a registered name, an IP literal, a port; empty is allowed): not a path, a query,
/// user information, blanks inside or control characters.
fn host_value_valid(value: &[u8]) -> bool {
    value
        .trim_ascii()
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%:[]".contains(&b))
}

/// Parse the head at the start of `buf`; on success the head's bytes are split off `buf`.
pub fn parse_head(buf: &mut BytesMut) -> Result<Parsed, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders),
        Err(httparse::Error::Version) => return Err(HeadError::Bad("unsupported HTTP version")),
        Err(_) => return Err(HeadError::Bad("malformed request head")),
    };
    let base = buf.as_ptr() as usize;
    let offset = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        start..start + s.len()
    };
    let method = match req.method {
        Some("GET") => Method::Get,
        Some("POST") => Method::Post,
        Some("DELETE") => Method::Delete,
        Some("PATCH") => Method::Patch,
        _ => Method::Other,
    };
    let target = req.path.ok_or(HeadError::Bad("missing request target"))?;
    if !target.starts_with('/') {
        return Err(HeadError::Bad("request target must be an absolute path"));
    }
    let target_range = offset(target.as_bytes());
    let http11 = req.version == Some(1);

    let mut content_length: Option<usize> = None;
    let mut chunked = false;
    let mut connection_close = false;
    let mut connection_keep_alive = false;
    let mut expect_continue = false;
    let (mut content_type, mut api_key, mut authorization, mut forwarded_for) =
        (None, None, None, None);
    let (mut traceparent, mut request_id, mut idempotency_key) = (None, None, None);
    let mut hosts = 0u32;
    let mut encoded = false;
    // The one value of a header that must come at most once.
    let once = |seen: &Option<std::ops::Range<usize>>, repeated: &'static str| match seen {
        Some(_) => Err(HeadError::Bad(repeated)),
        None => Ok(()),
    };
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("host") {
            if !host_value_valid(h.value) {
                return Err(HeadError::Bad("invalid Host header"));
            }
            hosts += 1;
        } else if name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value)
                .ok()
                .map(str::trim)
                .unwrap_or("");
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(HeadError::Bad("invalid Content-Length"));
            }
            // Longer than any body we would take: saturate, it is refused as too large anyway.
            let n = v.parse::<usize>().unwrap_or(usize::MAX);
            if content_length.is_some_and(|c| c != n) {
                return Err(HeadError::Bad("conflicting Content-Length headers"));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            let v = std::str::from_utf8(h.value).unwrap_or("").trim();
            if !v.eq_ignore_ascii_case("chunked") || chunked {
                return Err(HeadError::Bad(
                    "only Transfer-Encoding: chunked is supported",
                ));
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|&b| b == b',') {
                let t = token.trim_ascii();
                connection_close |= t.eq_ignore_ascii_case(b"close");
                connection_keep_alive |= t.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name.eq_ignore_ascii_case("expect") {
            if h.value.trim_ascii().eq_ignore_ascii_case(b"100-continue") {
                expect_continue = true;
            } else {
                return Err(HeadError::Bad("unsupported Expect header"));
            }
        } else if name.eq_ignore_ascii_case("content-type") {
            once(&content_type, "repeated Content-Type header")?;
            content_type = Some(offset(h.value));
        } else if name.eq_ignore_ascii_case("x-api-key") {
            once(&api_key, "repeated X-API-Key header")?;
            api_key = Some(offset(h.value));
        } else if name.eq_ignore_ascii_case("authorization") {
            once(&authorization, "repeated Authorization header")?;
            authorization = Some(offset(h.value));
        } else if name.eq_ignore_ascii_case("x-forwarded-for") {
            // Several headers: the last one is the nearest proxy's.
            forwarded_for = Some(offset(h.value));
        } else if name.eq_ignore_ascii_case("traceparent") {
            traceparent = Some(offset(h.value));
        } else if name.eq_ignore_ascii_case("x-request-id") {
            request_id = Some(offset(h.value));
        } else if name.eq_ignore_ascii_case("content-encoding") {
            encoded |= h.value.split(|&b| b == b',').any(|coding| {
                let c = coding.trim_ascii();
                !c.is_empty() && !c.eq_ignore_ascii_case(b"identity")
            });
        } else if name.eq_ignore_ascii_case("idempotency-key") {
            once(&idempotency_key, "repeated Idempotency-Key header")?;
            idempotency_key = Some(offset(h.value));
        }
    }
    if hosts > 1 {
        return Err(HeadError::Bad("repeated Host header"));
    }
    if hosts == 0 && http11 {
        return Err(HeadError::Bad("an HTTP/1.1 request needs a Host header"));
    }
    if chunked && content_length.is_some() {
        return Err(HeadError::Bad(
            "Content-Length and Transfer-Encoding must not both be sent",
        ));
    }
    if chunked && !http11 {
        return Err(HeadError::Bad("chunked bodies need HTTP/1.1"));
    }
    let framing = match (chunked, content_length) {
        (true, _) => Framing::Chunked,
        (false, Some(0)) | (false, None) => Framing::None,
        (false, Some(n)) => Framing::Length(n),
    };
    let keep_alive = if http11 {
        !connection_close
    } else {
        connection_keep_alive && !connection_close
    };

    let head = buf.split_to(len).freeze();
    let target = head.slice(target_range);
    let (path, query) = match target.iter().position(|&b| b == b'?') {
        Some(q) => (target.slice(..q), Some(target.slice(q + 1..))),
        None => (target, None),
    };
    Ok(Parsed::Complete(Head {
        len,
        method,
        path,
        query,
        framing,
        keep_alive,
        expect_continue: expect_continue && http11,
        content_type: content_type.map(|r| head.slice(r)),
        api_key: api_key.map(|r| head.slice(r)),
        authorization: authorization.map(|r| head.slice(r)),
        forwarded_for: forwarded_for.map(|r| head.slice(r)),
        traceparent: traceparent.map(|r| head.slice(r)),
        request_id: request_id.map(|r| head.slice(r)),
        idempotency_key: idempotency_key.map(|r| head.slice(r)),
        encoded,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Result<Parsed, HeadError> {
        parse_head(&mut BytesMut::from(text))
    }

    fn complete(text: &str) -> Head {
        match head(text) {
            Ok(Parsed::Complete(h)) => h,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_body_with_a_content_encoding_is_told_apart() {
        let encoded = |headers: &str| {
            complete(&format!("POST / HTTP/1.1\r\nHost: x\r\n{headers}\r\n")).encoded
        };
        assert!(!encoded(""));
        assert!(!encoded("Content-Encoding: identity\r\n"));
        assert!(!encoded("Content-Encoding: IDENTITY , \r\n"));
        assert!(encoded("Content-Encoding: gzip\r\n"));
        assert!(encoded("Content-Encoding: identity, br\r\n"));
        assert!(encoded(
            "Content-Encoding: identity\r\nContent-Encoding: deflate\r\n"
        ));
    }

    #[test]
    fn parses_a_post_with_length_and_keeps_the_rest() {
        let mut buf = BytesMut::from(
            "POST /api/events?x=1 HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n\
             X-API-Key: k1\r\nContent-Length: 2\r\n\r\n{}GET /",
        );
        let Parsed::Complete(h) = parse_head(&mut buf).unwrap() else {
            panic!()
        };
        assert_eq!(h.method, Method::Post);
        assert_eq!(&h.path[..], b"/api/events");
        assert_eq!(h.query.as_deref(), Some(&b"x=1"[..]));
        assert_eq!(h.framing, Framing::Length(2));
        assert_eq!(h.content_type.as_deref(), Some(&b"application/json"[..]));
        assert_eq!(h.api_key.as_deref(), Some(&b"k1"[..]));
        assert!(h.keep_alive);
        assert_eq!(
            &buf[..],
            b"{}GET /",
            "the body and the next request stay in the buffer"
        );
    }

    #[test]
    fn head_ends_are_found_incrementally() {
        let wire = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nNEXT";
        let end = wire.len() - 4;
        for split in 0..wire.len() {
            // Searched up to `split` when those bytes came, then from there when the rest came.
            let first = find_head_end(&wire[..split], 0);
            let found = first.or_else(|| find_head_end(wire, split));
            assert_eq!(found, Some(end), "split at {split}");
        }
        assert_eq!(find_head_end(b"GET / HTTP/1.0\n\n", 0), Some(16));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\nHost: a\r\n", 0), None);
        assert_eq!(leading_blank_lines(b"\r\n\nGET"), 3);
    }

    #[test]
    fn partial_heads_wait_for_more() {
        assert!(matches!(
            head("GET /health HTTP/1.1\r\nHost: a\r\n"),
            Ok(Parsed::Partial)
        ));
        assert!(matches!(head("GE"), Ok(Parsed::Partial)));
    }

    #[test]
    fn keep_alive_rules() {
        assert!(!complete("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(!complete("GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(complete("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
        assert!(
            complete("GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade, keep-alive\r\n\r\n")
                .keep_alive
        );
    }

    #[test]
    fn framing_rules() {
        assert_eq!(
            complete("POST / HTTP/1.1\r\nHost: a\r\n\r\n").framing,
            Framing::None
        );
        assert_eq!(
            complete("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n").framing,
            Framing::None
        );
        assert_eq!(
            complete("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n").framing,
            Framing::Chunked
        );
        let both =
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(
            head(both).unwrap_err(),
            HeadError::Bad("Content-Length and Transfer-Encoding must not both be sent")
        );
        assert!(head("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n").is_err());
        assert!(head("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n").is_err());
        assert!(head(
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
        )
        .is_err());
        assert_eq!(
            complete(
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999999\r\n\r\n"
            )
            .framing,
            Framing::Length(usize::MAX)
        );
        assert!(
            complete("POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n").expect_continue
        );
    }

    #[test]
    fn host_is_one_and_who_asks_is_said_once() {
        let bad = |text: &str| head(text).unwrap_err();
        assert_eq!(
            bad("GET / HTTP/1.1\r\n\r\n"),
            HeadError::Bad("an HTTP/1.1 request needs a Host header")
        );
        assert_eq!(
            bad("GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n"),
            HeadError::Bad("repeated Host header")
        );
        for value in ["a b", "a/b", "user@a", "a?b", "a#b", "a\\b", "a\"b"] {
            let wire = format!("GET / HTTP/1.1\r\nHost: {value}\r\n\r\n");
            assert_eq!(bad(&wire), HeadError::Bad("invalid Host header"), "{value}");
        }
        for value in [
            "",
            "a",
            "example.com:8080",
            "127.0.0.1:80",
            "[::1]:9000",
            "xn--n3h.test",
        ] {
            complete(&format!("GET / HTTP/1.1\r\nHost: {value}\r\n\r\n"));
        }
        // HTTP/1.0 needs none (RFC 9112, 3.2), and may not send two.
        assert!(!complete("GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(head("GET / HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n").is_err());
        for (name, error) in [
            ("Authorization", "repeated Authorization header"),
            ("x-api-key", "repeated X-API-Key header"),
            ("Content-Type", "repeated Content-Type header"),
            ("Idempotency-Key", "repeated Idempotency-Key header"),
        ] {
            // Even the same value twice: a proxy in front may have added one.
            let wire = format!("POST / HTTP/1.1\r\nHost: a\r\n{name}: v\r\n{name}: v\r\n\r\n");
            assert_eq!(bad(&wire), HeadError::Bad(error), "{name}");
        }
        // Headers that are lists may come more than once.
        let h = complete(
            "GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.1.1.1\r\n\
             X-Forwarded-For: 2.2.2.2\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(h.forwarded_for.as_deref(), Some(&b"2.2.2.2"[..]));
        assert!(!h.keep_alive);
    }

    #[test]
    fn malformed_heads_are_refused() {
        assert_eq!(
            head("GET\r\n\r\n").unwrap_err(),
            HeadError::Bad("malformed request head")
        );
        assert!(head("GET / HTTP/2.0\r\n\r\n").is_err());
        assert!(head("GET http://x/ HTTP/1.1\r\nHost: a\r\n\r\n").is_err());
        let many: String = (0..HEADERS_MAX + 1)
            .map(|i| format!("X-{i}: v\r\n"))
            .collect();
        assert_eq!(
            head(&format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n")).unwrap_err(),
            HeadError::TooManyHeaders
        );
    }

    mod properties {
        use super::*;
        use crate::chunked::ChunkedDecoder;
        use proptest::prelude::*;

        /// A valid request: a head with a few headers and a Content-Length body, or a chunked one.
        fn request() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
            let name = "[A-Za-z][A-Za-z0-9-]{0,12}";
            let value = "[ -~]{0,40}";
            (
                prop::collection::vec((name, value), 0..6),
                prop::collection::vec(any::<u8>(), 0..300),
                any::<bool>(),
                prop::collection::vec(1usize..40, 0..6),
            )
                .prop_map(|(headers, body, chunked, chunks)| {
                    let mut head = b"POST /api/events?q=1 HTTP/1.1\r\nHost: a\r\n".to_vec();
                    for (n, v) in headers {
                        let lower = n.to_ascii_lowercase();
                        if [
                            "content-length",
                            "transfer-encoding",
                            "expect",
                            "connection",
                            "host",
                            "content-type",
                            "x-api-key",
                            "authorization",
                            "idempotency-key",
                        ]
                        .contains(&lower.as_str())
                        {
                            continue;
                        }
                        head.extend_from_slice(format!("{n}: {}\r\n", v.trim()).as_bytes());
                    }
                    let mut wire = Vec::new();
                    if chunked {
                        head.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
                        let mut rest = &body[..];
                        for size in chunks {
                            if rest.is_empty() {
                                break;
                            }
                            let n = size.min(rest.len());
                            wire.extend_from_slice(format!("{n:x}\r\n").as_bytes());
                            wire.extend_from_slice(&rest[..n]);
                            wire.extend_from_slice(b"\r\n");
                            rest = &rest[n..];
                        }
                        if !rest.is_empty() {
                            wire.extend_from_slice(format!("{:x}\r\n", rest.len()).as_bytes());
                            wire.extend_from_slice(rest);
                            wire.extend_from_slice(b"\r\n");
                        }
                        wire.extend_from_slice(b"0\r\n\r\n");
                    } else {
                        head.extend_from_slice(
                            format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes(),
                        );
                        wire.extend_from_slice(&body);
                    }
                    head.extend_from_slice(&wire);
                    (head, body)
                })
        }

        /// Read `wire` as the connection does, one slice at a time: the head once its end has
        /// arrived (searching only the new bytes), then the body.
        fn read_in_parts(wire: &[u8], cuts: &[usize]) -> (Head, Bytes) {
            let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
            cuts.sort_unstable();
            cuts.push(wire.len());
            let mut buf = BytesMut::new();
            let (mut from, mut scanned) = (0, 0);
            let mut head = None;
            let mut decoder = ChunkedDecoder::new(1 << 20);
            for cut in cuts {
                buf.extend_from_slice(&wire[from..cut]);
                from = cut;
                if head.is_none() {
                    if find_head_end(&buf, scanned).is_none() {
                        scanned = buf.len();
                        continue;
                    }
                    match parse_head(&mut buf).expect("a valid head") {
                        Parsed::Complete(h) => head = Some(h),
                        Parsed::Partial => panic!("a found end is a complete head"),
                    }
                }
                let h = head.as_ref().expect("parsed above");
                match h.framing {
                    Framing::Length(n) if buf.len() >= n => {
                        return (head.unwrap(), buf.split_to(n).freeze())
                    }
                    Framing::None => return (head.unwrap(), Bytes::new()),
                    Framing::Chunked => {
                        if let Some(body) = decoder.decode(&mut buf).expect("valid chunks") {
                            return (head.unwrap(), body);
                        }
                    }
                    Framing::Length(_) => {}
                }
            }
            panic!("the whole request did not parse")
        }

        proptest! {
            #[test]
            fn any_split_of_a_valid_request_parses_to_the_same_request(
                (wire, body) in request(),
                cuts in prop::collection::vec(any::<usize>(), 0..8),
            ) {
                let (whole_head, whole_body) = read_in_parts(&wire, &[]);
                let (head, got) = read_in_parts(&wire, &cuts);
                prop_assert_eq!(&got[..], &body[..]);
                prop_assert_eq!(&whole_body[..], &body[..]);
                prop_assert_eq!(head.len, whole_head.len);
                prop_assert_eq!(head.framing, whole_head.framing);
                prop_assert_eq!(&head.path[..], b"/api/events");
            }
        }
    }
}
