//! Operations endpoints: health, readiness, Prometheus metrics on both ports, the OpenAPI document.

mod common;

use common::*;
use serde_json::json;

#[tokio::test]
async fn health_live_and_ready() {
    let s = Server::start(&[]);
    let r = call(s.addr, "GET", "/health", &[], None).await;
    assert_eq!((r.status, r.json()), (200, json!({"status": "healthy"})));
    assert!(r.header("date").unwrap().ends_with(" GMT"));
    let r = call(s.addr, "GET", "/health/live", &[], None).await;
    assert_eq!((r.status, r.json()), (200, json!({"status": "alive"})));
    let r = call(s.addr, "GET", "/health/ready", &[], None).await;
    assert_eq!((r.status, r.json()), (200, json!({"status": "ready"})));
    assert_eq!(
        r.header("x-ratelimit-limit"),
        None,
        "unauthenticated answers carry no rate headers"
    );
}

fn metric(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .unwrap_or_else(|| panic!("no {line_start} in metrics"))
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn metrics_count_requests_on_both_ports() {
    let s = Server::start(&[]);
    let (key, _) = new_org(s.addr, "pro").await;
    for i in 0..3 {
        assert_eq!(
            post_event(s.addr, &key, "t", json!(i), None).await.status,
            201
        );
    }
    assert_eq!(
        post_event(s.addr, &key, "", json!(1), None).await.status,
        422
    );
    let api = call(s.addr, "GET", "/metrics", &[], None).await;
    assert_eq!(api.status, 200);
    assert!(api
        .header("content-type")
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = api.text();
    assert_eq!(metric(&text, "triggers_events_ingested_total "), 3.0);
    assert_eq!(metric(&text, "triggers_events_committed_total "), 3.0);
    assert_eq!(
        metric(
            &text,
            "triggers_http_requests_total{method=\"POST\",route=\"/api/events\",status=\"201\"}"
        ),
        3.0
    );
    assert_eq!(
        metric(
            &text,
            "triggers_http_requests_total{method=\"POST\",route=\"/api/events\",status=\"422\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "triggers_http_request_duration_seconds_count{method=\"POST\",route=\"/api/events\"}"
        ),
        4.0
    );
    assert_eq!(metric(&text, "triggers_http_request_duration_seconds_bucket{method=\"POST\",route=\"/api/events\",le=\"+Inf\"}"), 4.0);
    assert!(text.contains("# TYPE triggers_http_request_duration_seconds histogram"));
    assert!(text.contains("# TYPE triggers_events_ingested_total counter"));

    let port = s.metrics_addr.expect("metrics listener");
    let r = call(port, "GET", "/metrics", &[], None).await;
    assert_eq!(r.status, 200);
    assert_eq!(metric(&r.text(), "triggers_events_ingested_total "), 3.0);
    // The metrics port serves nothing else.
    let r = call(port, "GET", "/health", &[], None).await;
    assert_eq!(r.status, 404);
    assert_eq!(error_code(&r), "not_found");
}

#[tokio::test]
async fn openapi_document_describes_every_route() {
    let s = Server::start(&[]);
    let r = call(s.addr, "GET", "/openapi.json", &[], None).await;
    assert_eq!(r.status, 200);
    let doc = r.json();
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    // Every route the router knows is documented.
    let routes = triggers::ingress::router::Route::LABELS
        .iter()
        .filter(|(method, _)| !method.is_empty())
        .map(|(method, path)| (method.to_ascii_lowercase(), *path));
    for (method, path) in routes.chain([
        ("post".to_string(), "/api/inbox/ack/{event_id}"),
        ("post".to_string(), "/api/inbox/ack"),
    ]) {
        assert!(
            paths.get(path).and_then(|p| p.get(&method)).is_some(),
            "{method} {path}"
        );
    }
    // Every error code the server can send is documented.
    let codes = doc["components"]["schemas"]["Error"]["properties"]["code"]["enum"]
        .as_array()
        .unwrap();
    for code in [
        "bad_request",
        "unauthorized",
        "invalid_json",
        "validation_failed",
        "payload_too_large",
        "duplicate",
        "rate_limited",
        "not_found",
        "method_not_allowed",
        "unsupported_media_type",
        "unavailable",
        "overloaded",
        "request_timeout",
        "headers_too_large",
        "no_webhook",
    ] {
        assert!(codes.contains(&json!(code)), "{code}");
    }
}

#[tokio::test]
async fn help_and_bad_configuration() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_triggers"))
        .arg("--help")
        .env_clear()
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "--listen",
        "TRIGGERS_LISTEN",
        "[default: 0.0.0.0:8080]",
        "--database-url",
        "--ack",
        "--io-driver",
        "--retry-schedule",
    ] {
        assert!(help.contains(needle), "{needle}");
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_triggers"))
        .env_clear()
        .env("DATABASE_URL", database_url())
        .env("TRIGGERS_INGRESS_CORES", "many")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "triggers: TRIGGERS_INGRESS_CORES=\"many\": expected a whole number"
    );
}
