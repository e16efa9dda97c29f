//! One delivery attempt: build the body and the Standard Webhooks headers into the request's
//! bytes, POST them with the delivery client under the attempt timeout, and classify what came
//! back.

use std::borrow::Cow;
use std::io::Write;
use std::time::{Duration, Instant, SystemTime};

use super::client::{Client, NoAnswer, Target};
use super::model::{Attempt, Endpoint, Job, Verdict};
use super::schedule::parse_retry_after;
use super::sign::{signature, SigningKey};
use crate::config::{ATTEMPT_TIMER_LATE, RESPONSE_BODY_KEPT_BYTES, RESPONSE_BODY_READ_BYTES_MAX};
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

/// Whether `value` can be sent as a header value as it is: visible ASCII, spaces and tabs.
fn is_header_text(value: &str) -> bool {
    value
        .bytes()
        .all(|b| b == b'\t' || (0x20..0x7f).contains(&b))
}

/// An event type as a header value: as it is when it is visible ASCII, percent-encoded otherwise.
fn type_header(event_type: &str) -> Cow<'_, str> {
    if event_type.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Cow::Borrowed(event_type);
    }
    let mut s = String::with_capacity(event_type.len() * 3);
    for b in event_type.bytes() {
        if (0x21..0x7f).contains(&b) && b != b'%' {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    Cow::Owned(s)
}

/// The `webhook-signature` value: one `v1,` signature per key, space-separated (the current
/// secret's first; during a rotation's grace period the previous secret's too).
pub fn signatures(keys: &[SigningKey], id: &str, timestamp: i64, body: &[u8]) -> String {
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

/// The request of one attempt, as it goes on the wire: the request line and host, the content
/// type, user agent, the event's id and type, the attempt's number, the Standard Webhooks trio,
/// the producer's trace context, the length, and the body.
fn request(
    target: &Target,
    job: &Job,
    id: &str,
    number: u32,
    timestamp: i64,
    signature: &str,
    body: &[u8],
) -> Vec<u8> {
    let mut r = Vec::with_capacity(target.head().len() + 400 + signature.len() + body.len());
    r.extend_from_slice(target.head());
    // Writes to a Vec do not fail.
    let _ = write!(
        r,
        "content-type: application/json\r\n\
         user-agent: triggers/{version}\r\n\
         x-event-id: {id}\r\n\
         x-event-type: {event_type}\r\n\
         x-delivery-attempt: {number}\r\n\
         webhook-id: {id}\r\n\
         webhook-timestamp: {timestamp}\r\n\
         webhook-signature: {signature}\r\n",
        version = env!("CARGO_PKG_VERSION"),
        event_type = type_header(&job.event_type),
    );
    // The producer's trace context, checked when the event was taken (a value that would not
    // make a header is not sent rather than failing the attempt).
    if let Some(t) = job.traceparent.as_deref().filter(|t| is_header_text(t)) {
        let _ = write!(r, "traceparent: {t}\r\n");
    }
    let _ = write!(r, "content-length: {}\r\n\r\n", body.len());
    r.extend_from_slice(body);
    r
}

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
    let Some(target) = endpoint.target.as_ref() else {
        return failed(
            at,
            started,
            None,
            "the endpoint URL is not a valid http or https URI".into(),
        );
    };
    let body = body(job);
    let timestamp = at.0 / 1_000_000;
    let id = job.event.to_string();
    let sig = signatures(endpoint.signing_keys(at), &id, timestamp, &body);
    let request = request(target, job, &id, number, timestamp, &sig, &body);
    drop(body);
    let exchange = client.exchange(target, &request, RESPONSE_BODY_READ_BYTES_MAX);
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(answer)) => {
            let status = answer.status;
            let retry_after = answer
                .retry_after
                .as_deref()
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
        Ok(Err(NoAnswer::Failed(e))) => failed(at, started, None, e),
        Ok(Err(NoAnswer::Unsent(e))) => Attempt {
            verdict: Verdict::Unsent,
            ..failed(at, started, None, e)
        },
        Err(_) => {
            // The timer fired long after its time: this node did not run meanwhile (stopped,
            // a paused VM), and the wait is not the receiver's doing (its request may not even
            // have been written): the server's trouble, not an attempt the endpoint failed.
            let late = started.elapsed() > timeout + ATTEMPT_TIMER_LATE;
            let mut a = failed(
                at,
                started,
                None,
                format!(
                    "no response within {} ms{}",
                    timeout.as_millis(),
                    if late {
                        ": this node did not run meanwhile"
                    } else {
                        ""
                    }
                ),
            );
            if late {
                a.verdict = Verdict::Unsent;
            }
            a
        }
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

    /// The request's line, its head fields in order, and its body.
    fn sent(request: &[u8]) -> (String, Vec<(String, String)>, Vec<u8>) {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut r = httparse::Request::new(&mut headers);
        let httparse::Status::Complete(len) = r.parse(request).unwrap() else {
            panic!("a whole head")
        };
        let line = format!("{} {}", r.method.unwrap(), r.path.unwrap());
        let fields = r
            .headers
            .iter()
            .map(|h| {
                let value = String::from_utf8(h.value.to_vec()).unwrap();
                (h.name.to_string(), value)
            })
            .collect();
        (line, fields, request[len..].to_vec())
    }

    #[test]
    fn an_attempt_sends_every_header_once() {
        let mut job = Job::test(
            EventId(uuid::Uuid::from_u128(1)),
            OrgId(uuid::Uuid::from_u128(2)),
            "{}",
        );
        let id = job.event.to_string();
        let target = Target::new(&"http://127.0.0.1:8080/hook?a=1".parse().unwrap()).unwrap();
        let body = b"{\"x\":1}";
        let plain = request(&target, &job, &id, 3, 1_700_000_000, "v1,abc", body);
        job.traceparent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
        let traced = request(&target, &job, &id, 3, 1_700_000_000, "v1,abc", body);
        let (line, plain, plain_body) = sent(&plain);
        let (_, traced, traced_body) = sent(&traced);
        assert_eq!(line, "POST /hook?a=1");
        assert_eq!(plain.len() + 1, traced.len());
        assert_eq!(traced.len(), 11);
        assert_eq!(plain_body, body);
        assert_eq!(traced_body, body);
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
            ("content-length", "7"),
        ] {
            let found: Vec<&str> = traced
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
                .collect();
            assert_eq!(found, [value], "{name}");
        }
        assert!(traced
            .iter()
            .any(|(n, v)| n == "user-agent" && v.starts_with("triggers/")));
        assert!(!plain.iter().any(|(n, _)| n == "traceparent"));
        // A trace context that is not header text is left out, not sent broken.
        job.traceparent = Some("00-bad\r\nx-injected: 1".into());
        let (_, fields, _) = sent(&request(&target, &job, &id, 3, 1, "v1,abc", body));
        assert!(!fields
            .iter()
            .any(|(n, _)| n == "traceparent" || n == "x-injected"));
    }

    #[test]
    fn both_secrets_sign_during_a_rotation() {
        let a =
            crate::delivery::sign::secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let b = SigningKey::new(&[7u8; 32]);
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
        assert_eq!(type_header("a\r\nx: 1"), "a%0D%0Ax:%201");
    }
}
