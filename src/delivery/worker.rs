//! One delivery attempt: build the body and the Standard Webhooks headers, POST with the pooled
//! client under the attempt timeout, and classify what came back.

use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http_body_util::Full;

use super::client::Client;
use super::model::{Attempt, Endpoint, Job, Verdict};
use super::schedule::parse_retry_after;
use super::sign::signature;
use crate::config::{RESPONSE_BODY_KEPT_BYTES, RESPONSE_BODY_READ_BYTES_MAX};
use crate::ids::Micros;
use crate::json::Obj;

/// The JSON body a receiver gets: `{"event_id","type","data","created_at"}`.
pub fn body(job: &Job) -> Vec<u8> {
    let mut out = Vec::with_capacity(job.payload.len() + 160);
    let mut o = Obj::new(&mut out);
    o.id("event_id", &job.event.0)
        .str("type", &job.event_type)
        .raw("data", &job.payload)
        .time("created_at", job.created_at);
    o.finish();
    out
}

/// An event type as a header value: as it is when it is visible ASCII, percent-encoded otherwise.
fn type_header(event_type: &str) -> HeaderValue {
    if let Ok(v) = HeaderValue::from_str(event_type) {
        if event_type.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return v;
        }
    }
    let mut s = String::with_capacity(event_type.len() * 3);
    for b in event_type.bytes() {
        if (0x21..0x7f).contains(&b) && b != b'%' {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    HeaderValue::from_str(&s).expect("percent-encoded ASCII is a valid header value")
}

/// The `webhook-signature` value: one `v1,` signature per key, space-separated (the current
/// secret's first; during a rotation's grace period the previous secret's too).
pub fn signatures(keys: &[Vec<u8>], id: &str, timestamp: i64, body: &[u8]) -> String {
    keys.iter()
        .map(|k| signature(k, id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The first `RESPONSE_BODY_KEPT_BYTES` of a receiver's answer as text (invalid UTF-8, or a
/// character cut at the end, becomes U+FFFD); `None` when it sent nothing.
pub fn kept_body(bytes: &[u8]) -> Option<String> {
    if bytes.is_empty() {
        return None;
    }
    let head = &bytes[..bytes.len().min(RESPONSE_BODY_KEPT_BYTES)];
    Some(String::from_utf8_lossy(head).into_owned())
}

/// The request of one attempt, built in place: the header map is made at its final size and
/// nothing is moved through a fallible builder (the client sets its target).
fn request(headers: HeaderMap, body: Vec<u8>) -> http::Request<Full<Bytes>> {
    let mut request = http::Request::new(Full::new(Bytes::from(body)));
    *request.method_mut() = http::Method::POST;
    *request.headers_mut() = headers;
    request
}

/// The `Host` header for requests to `uri`: its host, and its port when not the scheme's default
/// (what the client would add to each request itself, formatting it every time).
pub fn host_header(uri: &http::Uri) -> Option<HeaderValue> {
    let host = uri.host()?;
    let default = match uri.scheme_str() {
        Some("https") => 443,
        _ => 80,
    };
    match uri.port_u16() {
        Some(port) if port != default => HeaderValue::from_str(&format!("{host}:{port}")).ok(),
        _ => HeaderValue::from_str(host).ok(),
    }
}

/// The headers of one attempt: host, content type, user agent, the event's id and type, the
/// attempt's number, the Standard Webhooks trio and the producer's trace context.
fn headers(
    job: &Job,
    host: Option<&HeaderValue>,
    id: &str,
    number: u32,
    timestamp: i64,
    signature: String,
) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(HEADERS);
    if let Some(host) = host {
        h.insert(http::header::HOST, host.clone());
    }
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(
        http::header::USER_AGENT,
        HeaderValue::from_static(concat!("triggers/", env!("CARGO_PKG_VERSION"))),
    );
    // A UUID's text is a valid header value; one allocation, shared by both headers.
    let id = HeaderValue::from_str(id).expect("a UUID is a valid header value");
    h.insert(HeaderName::from_static("x-event-id"), id.clone());
    h.insert(
        HeaderName::from_static("x-event-type"),
        type_header(&job.event_type),
    );
    h.insert(
        HeaderName::from_static("x-delivery-attempt"),
        HeaderValue::from(number),
    );
    h.insert(HeaderName::from_static("webhook-id"), id);
    h.insert(
        HeaderName::from_static("webhook-timestamp"),
        HeaderValue::from(timestamp),
    );
    h.insert(
        HeaderName::from_static("webhook-signature"),
        HeaderValue::try_from(signature).expect("base64 signatures are a valid header value"),
    );
    // The producer's trace context, checked when the event was taken (a value that would not
    // make a header is not sent rather than failing the attempt).
    if let Some(t) = job
        .traceparent
        .as_deref()
        .and_then(|t| HeaderValue::from_str(t).ok())
    {
        h.insert(HeaderName::from_static("traceparent"), t);
    }
    h
}

/// How many headers an attempt sends at most.
const HEADERS: usize = 10;

/// POST the event once.
pub async fn attempt(
    client: &Client,
    endpoint: &Endpoint,
    job: &Job,
    number: u32,
    timeout: Duration,
) -> Attempt {
    let at = Micros::now();
    let started = Instant::now();
    let Some(uri) = endpoint.uri.as_ref() else {
        return failed(
            at,
            started,
            None,
            "the endpoint URL is not a valid URI".into(),
        );
    };
    let body = body(job);
    let timestamp = at.0 / 1_000_000;
    let id = job.event.to_string();
    let sig = signatures(endpoint.signing_keys(at), &id, timestamp, &body);
    let headers = headers(job, endpoint.host.as_ref(), &id, number, timestamp, sig);
    let request = request(headers, body);
    let exchange = client.exchange(uri, request, RESPONSE_BODY_READ_BYTES_MAX);
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(answer)) => {
            let status = answer.head.status.as_u16();
            let retry_after = answer
                .head
                .headers
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, SystemTime::now()));
            // Its first KiB goes to the attempt log.
            let response_body = answer.body.as_deref().and_then(kept_body);
            let duration = started.elapsed();
            let (verdict, error) = match status {
                200..=299 => (Verdict::Delivered, None),
                410 => (
                    Verdict::Gone,
                    Some("410 Gone: the endpoint is disabled until it is resumed".into()),
                ),
                _ => (
                    Verdict::Failed { retry_after },
                    Some(format!("receiver answered {status}")),
                ),
            };
            Attempt {
                at,
                status: Some(status),
                error,
                duration,
                response_body,
                verdict,
            }
        }
        Ok(Err(e)) => failed(at, started, None, e),
        Err(_) => failed(
            at,
            started,
            None,
            format!("no response within {} ms", timeout.as_millis()),
        ),
    }
}

fn failed(at: Micros, started: Instant, status: Option<u16>, error: String) -> Attempt {
    Attempt {
        at,
        status,
        error: Some(error),
        duration: started.elapsed(),
        response_body: None,
        verdict: Verdict::Failed { retry_after: None },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{EventId, OrgId};

    #[test]
    fn body_carries_the_payload_as_received() {
        let job = Job::test(
            EventId(uuid::Uuid::from_u128(1)),
            OrgId(uuid::Uuid::from_u128(2)),
            r#"{ "a" : 1 }"#,
        );
        let text = String::from_utf8(body(&job)).unwrap();
        assert_eq!(
            text,
            r#"{"event_id":"00000000-0000-0000-0000-000000000001","type":"t","data":{ "a" : 1 },"created_at":"1970-01-01T00:00:01.000000Z"}"#
        );
    }

    #[test]
    fn an_attempt_sends_every_header_once() {
        let mut job = Job::test(
            EventId(uuid::Uuid::from_u128(1)),
            OrgId(uuid::Uuid::from_u128(2)),
            "{}",
        );
        let id = job.event.to_string();
        let host = host_header(&"http://127.0.0.1:8080/hook".parse().unwrap());
        let plain = headers(&job, None, &id, 3, 1_700_000_000, "v1,abc".into());
        job.traceparent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
        let traced = headers(&job, host.as_ref(), &id, 3, 1_700_000_000, "v1,abc".into());
        assert_eq!(plain.len() + 2, traced.len());
        assert_eq!(traced.len(), HEADERS);
        for (name, value) in [
            ("host", "127.0.0.1:8080"),
            ("content-type", "application/json"),
            ("x-event-id", id.as_str()),
            ("webhook-id", id.as_str()),
            ("x-event-type", "t"),
            ("x-delivery-attempt", "3"),
            ("webhook-timestamp", "1700000000"),
            ("webhook-signature", "v1,abc"),
            (
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
        ] {
            assert_eq!(
                traced.get_all(name).iter().collect::<Vec<_>>(),
                [value],
                "{name}"
            );
        }
        assert!(traced[http::header::USER_AGENT]
            .to_str()
            .unwrap()
            .starts_with("triggers/"));
        assert!(plain.get("traceparent").is_none());
    }

    #[test]
    fn the_host_header_names_the_port_only_when_it_is_not_the_default() {
        let host = |url: &str| host_header(&url.parse().unwrap()).unwrap();
        assert_eq!(host("http://example.com/a"), "example.com");
        assert_eq!(host("http://example.com:80/a"), "example.com");
        assert_eq!(host("https://example.com:443/a"), "example.com");
        assert_eq!(host("https://example.com:80/a"), "example.com:80");
        assert_eq!(host("http://example.com:8443/a"), "example.com:8443");
        assert_eq!(host("http://[::1]:9000/a"), "[::1]:9000");
    }

    #[test]
    fn both_secrets_sign_during_a_rotation() {
        let a =
            crate::delivery::sign::secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let b = vec![7u8; 32];
        let one = signatures(std::slice::from_ref(&a), "id", 1, b"{}");
        let two = signatures(&[a.clone(), b.clone()], "id", 1, b"{}");
        assert_eq!(two, format!("{one} {}", signature(&b, "id", 1, b"{}")));
        assert!(one.starts_with("v1,") && !one.contains(' '));
    }

    #[test]
    fn the_kept_answer_is_its_first_kib_as_text() {
        assert_eq!(kept_body(b""), None);
        assert_eq!(kept_body(b"ok").as_deref(), Some("ok"));
        let long = vec![b'a'; 5000];
        assert_eq!(kept_body(&long).unwrap().len(), RESPONSE_BODY_KEPT_BYTES);
        // A character cut at the boundary, and invalid bytes, become replacement characters.
        let mut cut = vec![b'a'; RESPONSE_BODY_KEPT_BYTES - 1];
        cut.extend_from_slice("é".as_bytes());
        assert!(kept_body(&cut).unwrap().ends_with('\u{FFFD}'));
        assert_eq!(kept_body(&[0xff, b'x']).as_deref(), Some("\u{FFFD}x"));
    }

    #[test]
    fn event_types_become_valid_header_values() {
        assert_eq!(type_header("order.paid"), "order.paid");
        assert_eq!(type_header("a b"), "a b");
        assert_eq!(type_header("été\n"), "%C3%A9t%C3%A9%0A");
    }
}
