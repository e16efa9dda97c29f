//! One delivery attempt: build the body and the Standard Webhooks headers, POST with the pooled
//! client under the attempt timeout, and classify what came back.

use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http_body_util::{BodyExt, Full, Limited};

use super::connector::HttpClient;
use super::model::{Attempt, Job, Target, Verdict};
use super::schedule::parse_retry_after;
use super::sign::signature;
use crate::config::RESPONSE_BODY_READ_BYTES_MAX;
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

/// POST the event once.
pub async fn attempt(
    client: &HttpClient,
    target: &Target,
    job: &Job,
    number: u32,
    timeout: Duration,
) -> Attempt {
    let at = Micros::now();
    let started = Instant::now();
    let body = body(job);
    let timestamp = at.0 / 1_000_000;
    let id = job.event.to_string();
    let sig = signature(&target.key, &id, timestamp, &body);
    let request = http::Request::post(target.uri.clone())
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(
            http::header::USER_AGENT,
            concat!("triggers/", env!("CARGO_PKG_VERSION")),
        )
        .header(HeaderName::from_static("x-event-id"), id.as_str())
        .header(
            HeaderName::from_static("x-event-type"),
            type_header(&job.event_type),
        )
        .header(HeaderName::from_static("x-delivery-attempt"), number)
        .header(HeaderName::from_static("webhook-id"), id.as_str())
        .header(HeaderName::from_static("webhook-timestamp"), timestamp)
        .header(HeaderName::from_static("webhook-signature"), sig)
        .body(Full::new(Bytes::from(body)));
    let request = match request {
        Ok(r) => r,
        Err(e) => {
            return failed(
                at,
                started,
                None,
                format!("could not build the request: {e}"),
            )
        }
    };
    let exchange = async {
        let response = client.request(request).await?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        // Read what the receiver sent (up to a limit) so the connection goes back to the pool.
        let _ = Limited::new(response.into_body(), RESPONSE_BODY_READ_BYTES_MAX)
            .collect()
            .await;
        Ok::<_, hyper_util::client::legacy::Error>((status, retry_after))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok((status, retry_after))) => {
            let duration = started.elapsed();
            let (verdict, error) = match status {
                200..=299 => (Verdict::Delivered, None),
                410 => (
                    Verdict::Gone,
                    Some(
                        "410 Gone: the webhook was removed; the organization is now pull-only"
                            .into(),
                    ),
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
                verdict,
            }
        }
        Ok(Err(e)) => failed(at, started, None, describe(&e)),
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
        verdict: Verdict::Failed { retry_after: None },
    }
}

/// The most specific message in an error's chain ("connection refused", not "client error").
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut messages = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        messages.push(s.to_string());
        source = s.source();
    }
    messages.dedup();
    messages.join(": ")
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
    fn event_types_become_valid_header_values() {
        assert_eq!(type_header("order.paid"), "order.paid");
        assert_eq!(type_header("a b"), "a b");
        assert_eq!(type_header("été\n"), "%C3%A9t%C3%A9%0A");
    }
}
