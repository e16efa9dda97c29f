//! Operations endpoints: health, readiness, Prometheus metrics on both ports, the OpenAPI document.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;

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

#[tokio::test]
async fn the_ingress_serves_without_cooperative_task_running_too() {
    // Every other test runs the default (COOP_TASKRUN where io_uring allows it); this one the
    // ring without it, as `--uring-coop-taskrun false` makes it.
    let s = Server::start(&["--uring-coop-taskrun", "false"]);
    let (key, _) = new_org(s.addr, "pro").await;
    for i in 0..3 {
        let r = post_event(s.addr, &key, "t", json!(i), None).await;
        assert_eq!(r.status, 201, "{}", r.text());
    }
    let r = call(s.addr, "GET", "/health/ready", &[], None).await;
    assert_eq!(r.status, 200);
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
    // Each group commit's transaction and its oldest event's wait are timed once.
    let commits = metric(&text, "triggers_write_batches_total ");
    assert!((1.0..=3.0).contains(&commits), "{commits}");
    for h in [
        "triggers_write_commit_duration_seconds",
        "triggers_write_wait_seconds",
    ] {
        assert_eq!(metric(&text, &format!("{h}_count ")), commits, "{h}");
        assert_eq!(
            metric(&text, &format!("{h}_bucket{{le=\"+Inf\"}} ")),
            commits
        );
        assert!(metric(&text, &format!("{h}_sum ")) > 0.0, "{h}");
    }
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

/// Metric names in `text`: every `triggers_…` and `process_…` word.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for prefix in ["triggers_", "process_"] {
        let mut rest = text;
        while let Some(at) = rest.find(prefix) {
            let before = rest[..at].chars().last();
            let word: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                names.insert(word.clone());
            }
            rest = &rest[at + word.len()..];
        }
    }
    names
}

#[tokio::test]
async fn every_metric_the_alerts_and_the_dashboard_name_is_served() {
    let s = Server::start(&[]);
    let (key, _) = new_org(s.addr, "pro").await;
    assert_eq!(
        post_event(s.addr, &key, "t", json!(1), None).await.status,
        201
    );
    let scrape = call(s.addr, "GET", "/metrics", &[], None).await.text();
    // What the scrape declares (histograms also as their _bucket, _sum and _count series).
    let mut served = std::collections::BTreeSet::new();
    for line in scrape.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            served.insert(name.to_string());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    served.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    for (file, text) in [
        (
            "deploy/prometheus/alerts.yml",
            include_str!("../deploy/prometheus/alerts.yml"),
        ),
        (
            "deploy/grafana/triggers.json",
            include_str!("../deploy/grafana/triggers.json"),
        ),
    ] {
        let named = metric_names(text);
        assert!(named.len() >= 8, "{file}: {named:?}");
        for name in named {
            assert!(
                served.contains(&name),
                "{file} names {name}, which /metrics does not serve"
            );
        }
    }
    // The per-core and process series the dashboard draws have values.
    assert!(scrape.contains("triggers_core_connections_open{core=\"0\"}"));
    assert!(scrape.contains("triggers_thread_cpu_seconds_total{thread=\"ingress-0\"}"));
    assert_eq!(metric(&scrape, "triggers_database_up "), 1.0);
    assert_eq!(metric(&scrape, "triggers_write_queue_events "), 0.0);
}

#[test]
fn metric_names_are_whole_words() {
    let names =
        metric_names("rate(triggers_a_total[1m]) / x_triggers_b + process_c{d=\"triggers_e\"}");
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["process_c", "triggers_a_total", "triggers_e"]
    );
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_lines_and_trace_context_reach_the_receiver() {
    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let recv = Receiver::start(|_, _| Answer::status(200)).await;
    // Its own database: the other tests' nodes here refuse private targets, and would refuse a
    // delivery of this test's that became a due row any node may claim.
    let url = own_database("triggers_test_access_log").await;
    let s = Server::process_with_db(&["--access-log", "--allow-private-webhooks"], &url);
    let (key, org) = new_org(s.addr, "pro").await;
    set_webhook(s.addr, &key, &recv.url("/")).await;
    let send = |trace: &'static str, request_id: &'static str, path: &'static str, body: Value| {
        let key = key.clone();
        async move {
            let r = call(
                s.addr,
                "POST",
                path,
                &[
                    ("X-API-Key", &key),
                    ("Content-Type", "application/json"),
                    ("traceparent", trace),
                    ("X-Request-Id", request_id),
                ],
                Some(body.to_string().as_bytes()),
            )
            .await;
            assert!(matches!(r.status, 200 | 201), "{}", r.text());
            r.json()
        }
    };
    let traced = send(
        TP,
        "req-traced",
        "/api/events",
        json!({"type": "t", "payload": 1}),
    )
    .await;
    let untraced = send(
        "00-not-a-trace",
        "req-untraced",
        "/api/events",
        json!({"type": "t", "payload": 2}),
    )
    .await;
    let batch = send(
        TP,
        "req-batch",
        "/api/events/batch",
        json!({"events": [{"type": "t", "payload": 3}, {"type": "t", "payload": 4}]}),
    )
    .await;
    let got = recv
        .wait_until(std::time::Duration::from_secs(10), |r| r.len() >= 4)
        .await;
    let trace_of = |id: &str| {
        got.iter()
            .find(|r| r.event_id() == id)
            .unwrap_or_else(|| panic!("{id} not delivered"))
            .header("traceparent")
            .map(str::to_string)
    };
    assert_eq!(
        trace_of(traced["id"].as_str().unwrap()).as_deref(),
        Some(TP)
    );
    assert_eq!(
        trace_of(untraced["id"].as_str().unwrap()),
        None,
        "a malformed one is not sent"
    );
    for item in batch["results"].as_array().unwrap() {
        assert_eq!(trace_of(item["id"].as_str().unwrap()).as_deref(), Some(TP));
    }

    // The access log: one JSON line per request, within a second of it.
    call(
        s.addr,
        "GET",
        "/health",
        &[("X-Request-Id", "bad id!")],
        None,
    )
    .await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let line = |needle: &str| {
        s.log_lines(needle)
            .into_iter()
            .find(|l| l.contains("\"access\""))
    };
    // Each core flushes its own lines: wait for every one the test reads, not just the last.
    while ["req-traced", "req-batch", "\"/health\""]
        .iter()
        .any(|needle| line(needle).is_none())
    {
        assert!(std::time::Instant::now() < deadline, "no access lines");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let v: Value = serde_json::from_str(&line("req-traced").unwrap()).unwrap();
    assert_eq!(v["method"], "POST");
    assert_eq!(v["route"], "/api/events");
    assert_eq!(v["status"], 201);
    assert_eq!(v["org_id"], org.as_str());
    assert_eq!(v["client"], "127.0.0.1");
    assert!(v["duration_us"].as_u64().is_some());
    let v: Value = serde_json::from_str(&line("\"/health\"").unwrap()).unwrap();
    assert_eq!(v["org_id"], Value::Null);
    assert_eq!(v["status"], 200);
    let id = v["request_id"].as_str().unwrap();
    assert!(
        id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{id}"
    );
    // The core's periodic flush does not hold the shutdown up (a task left parked kept the
    // store alive until the shutdown deadline).
    let mut s = s;
    let stopping = std::time::Instant::now();
    assert_eq!(tokio::task::block_in_place(|| s.stop()), Some(0));
    assert!(
        stopping.elapsed() < std::time::Duration::from_secs(5),
        "SIGTERM took {:?}",
        stopping.elapsed()
    );
}

/// SIGHUP (logrotate's `postrotate`, an `ExecReload=kill -HUP`, the terminal that started the
/// server closing) neither stops the server nor cuts what it holds: it is logged and ignored,
/// and SIGTERM still drains. The events table is locked meanwhile, so the fast-ack events sit
/// in the write queue when the signal comes. Before, its default action ended the process at
/// once, and those events, acknowledged, were lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hang_up_signal_neither_stops_the_server_nor_loses_what_it_queued() {
    let url = own_database("triggers_test_hang_up").await;
    let mut s = Server::process_with_db(&["--ack", "fast"], &url);
    let (key, _) = new_org(s.addr, "pro").await;
    let mut locker = db_at(&url).await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    for i in 0..5 {
        let r = post_event(s.addr, &key, "t.before", json!(i), None).await;
        assert_eq!(r.status, 202, "{}", r.text());
    }
    s.hang_up();
    assert!(s.logged("SIGHUP").await, "the signal is logged");
    let r = post_event(s.addr, &key, "t.after", json!(5), None).await;
    assert_eq!(r.status, 202, "{}", r.text());
    lock.rollback().await.unwrap();
    let r = call(s.addr, "GET", "/health/ready", &[], None).await;
    assert_eq!(r.status, 200);
    assert_eq!(tokio::task::block_in_place(|| s.stop()), Some(0));
    let stored = db_at(&url).await;
    let n: i64 = stored
        .query_one("SELECT count(*) FROM events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 6);
}

/// The `application_name`s of a node's connections to its database (the test's own).
async fn connection_names(url: &str, database: &str) -> std::collections::BTreeSet<String> {
    let client = db_at(url).await;
    client
        .query(
            "SELECT DISTINCT application_name FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()",
            &[&database],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The `application_name`s of the sessions a node keeps open once it has taken an event (all
/// but retention's, which comes and goes), with `stem` as the URL names it.
fn held_session_names(stem: &str) -> std::collections::BTreeSet<String> {
    ["", "-ingest", "-delivery", "-listen", "-probe"]
        .iter()
        .map(|part| format!("{stem}{part}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_pools_connections_say_which_part_of_the_node_they_serve() {
    // An operator reading pg_stat_activity (or the load-test harness splitting PostgreSQL's CPU)
    // tells the ingest writers from the delivery bookkeeping; a name the URL gives is kept as the
    // stem.
    let database = "triggers_test_connection_names";
    let url = own_database(database).await;
    for (server_url, stem) in [
        (url.clone(), "triggers"),
        (format!("{url}?application_name=edge7"), "edge7"),
    ] {
        let mut s = Server::process_with_db(&[], &server_url);
        let (key, _) = new_org(s.addr, "pro").await;
        // An event makes the group commit take a writer's connection.
        let r = post_event(s.addr, &key, "t", json!(1), None).await;
        assert_eq!(r.status, 201);
        let want = held_session_names(stem);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        // Exactly these (retention's upkeep may hold one more); the previous node's connections
        // may take a moment to go.
        loop {
            let mut names = connection_names(&url, database).await;
            names.remove(&format!("{stem}-retention"));
            if names == want {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "want {want:?}, connected: {names:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        s.stop();
    }
}

/// The health probe compares the node's clock with the database's: a node whose clock runs 5 s
/// ahead (libfaketime under the real binary) shows it in `triggers_clock_offset_seconds` and
/// logs it once; a node in step shows about 0.
#[tokio::test]
async fn a_node_clock_off_the_databases_shows_in_the_metric_and_the_log() {
    let Some(preload) = libfaketime() else {
        return;
    };
    async fn offset_once_measured(s: &Server) -> f64 {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let scrape = call(s.metrics_addr.unwrap(), "GET", "/metrics", &[], None)
                .await
                .text();
            let offset = metric(&scrape, "triggers_clock_offset_seconds ");
            if offset != 0.0 {
                return offset;
            }
            assert!(std::time::Instant::now() < deadline, "no offset measured");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
    let ahead = Server::process_wrapped(&["env", &preload, "FAKETIME=+5s"], &[], &database_url());
    let offset = offset_once_measured(&ahead).await;
    assert!((4.5..5.5).contains(&offset), "{offset}");
    let warned = ahead
        .log_lines_at_least("clock differs from the database", 1)
        .await;
    assert_eq!(warned.len(), 1, "{warned:?}");
    let in_step = Server::process(&[]);
    let offset = offset_once_measured(&in_step).await;
    assert!(offset.abs() < 0.5, "{offset}");
    assert!(in_step.log_lines("clock differs").is_empty());
}

/// A node whose clock is further off the database's than `--clock-offset-max-ms` (the real
/// binary under libfaketime, its wall clock stepped 90 s ahead while it runs, as a bad NTP step
/// does; its monotonic clock untouched) takes no change: within a few probes it is not ready,
/// and events (and every other write) are 503 with Retry-After saying why. Reads go on. It sends
/// nothing by that clock: a retry it holds in memory is handed back when it comes due, not
/// sent, and restarted with the clock still off, it claims nothing from its first moment. Its
/// clock stepped back, it is ready, delivers the retry and takes events; stepped 90 s behind,
/// it stops again. The database's gauge stays up, and the offset shows.
#[tokio::test]
async fn a_node_whose_clock_is_far_off_takes_no_change_until_it_is_back() {
    let Some(preload) = libfaketime() else {
        return;
    };
    let url = own_database("triggers_test_clock_off").await;
    let recv = Receiver::start(|_, n| Answer::status(if n == 0 { 500 } else { 200 })).await;
    let rc = std::env::temp_dir().join(format!("triggers-faketime-{}.rc", std::process::id()));
    std::fs::write(&rc, "+0s\n").unwrap();
    let file = format!("FAKETIME_TIMESTAMP_FILE={}", rc.display());
    let wrapper = [
        "env",
        &preload,
        &file,
        "FAKETIME_CACHE_DURATION=1",
        "FAKETIME_DONT_FAKE_MONOTONIC=1",
    ];
    let args = [
        "--allow-private-webhooks",
        "--retry-schedule",
        "5s",
        "--clock-offset-max-ms",
        "30000",
    ];
    let mut s = Server::process_wrapped(&wrapper, &args, &url);
    let (key, _) = new_org(s.addr, "pro").await;
    set_webhook(s.addr, &key, &recv.url("/hook")).await;
    let id = new_event_id(s.addr, &key, json!(1)).await;
    // The first attempt fails; its retry, 5 s later, is held in memory. The clock steps at
    // once: the step ends that wait early (the retry looks overdue by the clock), and is seen
    // by delivery at once too (its wall clock against its monotonic clock), before any probe.
    recv.wait_until(std::time::Duration::from_secs(5), |r| !r.is_empty())
        .await;
    let first_attempt = std::time::Instant::now();

    async fn ready_turns(s: &Server, want: u16) -> Response {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        loop {
            let r = call(s.addr, "GET", "/health/ready", &[], None).await;
            if r.status == want {
                return r;
            }
            assert!(std::time::Instant::now() < deadline, "never {want}");
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
    std::fs::write(&rc, "+90s\n").unwrap();
    let refused = ready_turns(&s, 503).await;
    assert!(refused.header("retry-after").is_some());
    let said = refused.json()["error"].as_str().unwrap().to_string();
    assert!(said.contains("clock"), "{said}");
    let r = post_event(s.addr, &key, "t", json!(2), None).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.header("retry-after").is_some());
    assert_eq!(r.json()["error"], said.as_str());
    assert_eq!(
        post_empty(s.addr, &key, "/api/keys/rotate").await.status,
        503
    );
    assert_eq!(
        get(s.addr, &key, &format!("/api/events/{id}")).await.status,
        200
    );
    // The step is seen at once (the node's wall clock against its monotonic clock); the metric
    // shows the offset the next probe measures.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let scrape = loop {
        let scrape = call(s.metrics_addr.unwrap(), "GET", "/metrics", &[], None)
            .await
            .text();
        let offset = metric(&scrape, "triggers_clock_offset_seconds ");
        if (89.0..91.0).contains(&offset) {
            break scrape;
        }
        assert!(std::time::Instant::now() < deadline, "{offset}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(metric(&scrape, "triggers_database_up "), 1.0);
    let off = s.log_lines_at_least("further off the database's", 1).await;
    assert_eq!(off.len(), 1, "{off:?}");
    // The retry came due (5 s after the first attempt, or at the step): handed back, not sent.
    tokio::time::sleep(
        (first_attempt + std::time::Duration::from_secs(7))
            .saturating_duration_since(std::time::Instant::now()),
    )
    .await;
    assert_eq!(recv.received().len(), 1);

    // Started again with the clock still off: it claims the retry handed back from its first
    // moment on, so not at all.
    s.stop();
    drop(s);
    let s = Server::process_wrapped(&wrapper, &args, &url);
    let r = call(s.addr, "GET", "/health/ready", &[], None).await;
    assert_eq!(r.status, 503, "{}", r.text());
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(recv.received().len(), 1);
    // Not claimed either (a claim would write a lease by the clock that is off).
    let scrape = call(s.metrics_addr.unwrap(), "GET", "/metrics", &[], None)
        .await
        .text();
    assert_eq!(metric(&scrape, "triggers_deliveries_claimed_total "), 0.0);

    std::fs::write(&rc, "+0s\n").unwrap();
    ready_turns(&s, 200).await;
    recv.wait_until(std::time::Duration::from_secs(10), |r| r.len() >= 2)
        .await;
    assert_eq!(recv.received()[1].header("webhook-id"), Some(id.as_str()));
    let scrape = call(s.metrics_addr.unwrap(), "GET", "/metrics", &[], None)
        .await
        .text();
    assert_eq!(metric(&scrape, "triggers_deliveries_claimed_total "), 1.0);
    let r = post_event(s.addr, &key, "t", json!(3), None).await;
    assert_eq!(r.status, 201, "{}", r.text());

    std::fs::write(&rc, "-90s\n").unwrap();
    ready_turns(&s, 503).await;
    let _ = std::fs::remove_file(&rc);
    let r = post_event(s.addr, &key, "t", json!(4), None).await;
    assert_eq!(r.status, 503, "{}", r.text());
    let off = s.log_lines_at_least("further off the database's", 2).await;
    assert_eq!(off.len(), 2, "{off:?}");
}

/// A connection to the test database as the server makes one for `part` (its settings).
async fn server_connection(part: triggers::db::Part) -> tokio_postgres::Client {
    let (_, config) = triggers::config::Config::from_args_and_env(
        ["serve".to_string()],
        [("DATABASE_URL".to_string(), database_url())],
    )
    .unwrap();
    triggers::db::connect(&config, part, std::time::Duration::from_secs(5))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_names_the_session_settings_the_database_did_not_take() {
    // Every connection asks for its settings in the startup packet (`options`); a pooler may drop
    // them (PgBouncer with `ignore_startup_parameters = options`), and the migration's first
    // round trip reads them back to say so. A connection without the options reads as dropped;
    // one of the server's takes them.
    use triggers::store::migrate::{settings_not_taken, LOCK_AND_SETTINGS, LOCK_ID};
    let read = |client: tokio_postgres::Client| async move {
        let row = client
            .query_one(LOCK_AND_SETTINGS, &[&LOCK_ID])
            .await
            .unwrap();
        client
            .execute("SELECT pg_advisory_unlock($1)", &[&LOCK_ID])
            .await
            .unwrap();
        let values: [String; 3] = [row.get(0), row.get(1), row.get(2)];
        settings_not_taken(&[&values[0], &values[1], &values[2]])
    };
    assert_eq!(
        read(db().await).await,
        ["idle_in_transaction_session_timeout", "jit"]
    );
    let own = server_connection(triggers::db::Part::Api).await;
    assert!(read(own).await.is_empty());
    // And a server started so says nothing of it (a process: its log is its own).
    let s = Server::process(&[]);
    assert!(s.logged("migrations up to date").await);
    assert!(s
        .log_lines("sessions lack this server's settings")
        .is_empty());
}

/// A node cut off from the database without a word (a network cut, a VM paused) is found by
/// TCP keepalive within a minute on the database's end too: every session of the server asks
/// PostgreSQL for it (30 s idle, then a probe every 10 s, given up after 3; data unacknowledged
/// for 60 s ends it too). Without, the system's defaults hold a cut-off session, and what it
/// locked (a COPY waiting for its rows is active, so no idle timeout ends it), for over two
/// hours. Read back from PostgreSQL over TCP: it took them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_finds_a_node_gone_silent_within_a_minute() {
    let own = server_connection(triggers::db::Part::Delivery).await;
    let row = own
        .query_one(
            "SELECT current_setting('tcp_keepalives_idle'), \
                    current_setting('tcp_keepalives_interval'), \
                    current_setting('tcp_keepalives_count'), \
                    current_setting('tcp_user_timeout'), \
                    inet_client_addr() IS NOT NULL",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(4), "the test's connection is over TCP");
    let got: Vec<String> = (0..4).map(|i| row.get(i)).collect();
    assert_eq!(got, ["30", "10", "3", "60000"]);
    // A plain connection has the system's (the kernel's default: 7,200 s, then 9 probes 75 s
    // apart).
    let plain = db().await;
    let idle: String = plain
        .query_one("SELECT current_setting('tcp_keepalives_idle')", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(idle, "30", "the system's own is not the server's");
}

#[test]
fn a_database_that_cannot_be_reached_is_named_with_postgresqls_own_words() {
    // Start-up retries while the database comes up, and says why each try failed: PostgreSQL's
    // message and code (a database or a role that does not exist, a password refused, a pooler
    // refusing a startup parameter), or the socket's error, not tokio-postgres's "db error".
    let url = database_url();
    let (base, _) = url.rsplit_once('/').unwrap();
    for (target, says) in [
        (
            format!("{base}/triggers_no_such_database"),
            "database \\\"triggers_no_such_database\\\" does not exist (3D000)",
        ),
        (
            "postgres://triggers@127.0.0.1:1/x".to_string(),
            "error connecting to server: Connection refused",
        ),
    ] {
        let line = first_retry(&target);
        assert!(line.contains(says), "{line}");
    }
}

/// The first retry `triggers migrate` logs against `url`: why the database could not be reached.
fn first_retry(url: &str) -> String {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_triggers"))
        .args(["migrate", "--database-url", url])
        .env_clear()
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let line = stdout
        .lines()
        .map_while(Result::ok)
        .find(|l| l.contains("database not reachable yet"));
    let _ = child.kill();
    let _ = child.wait();
    line.unwrap_or_else(|| panic!("no retry logged for {url}"))
}

/// Writes `text` to `path` by a rename, as Kubernetes renews a mounted secret.
fn renew_by_rename(path: &std::path::Path, text: &str) {
    let next = path.with_extension("next");
    std::fs::write(&next, text).unwrap();
    std::fs::rename(&next, path).unwrap();
}

/// Ends every session of `role`, as a failover or a pooler's restart would.
async fn end_sessions(admin: &tokio_postgres::Client, role: &str) {
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
            &[&role],
        )
        .await
        .unwrap();
}

/// Events and inbox reads (the writers' pool, the API's) until both are taken, 201 and 200, then
/// five times in a row over a second (a request on a connection just ended gets 503 whatever
/// was renewed).
async fn taken_five_in_a_row(s: &Server, key: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut in_a_row = 0;
    while in_a_row < 5 {
        let event = post_event(s.addr, key, "t", json!(1), None).await;
        let inbox = get(s.addr, key, "/api/inbox?limit=1").await;
        if (event.status, inbox.status) == (201, 200) {
            in_a_row += 1;
        } else {
            assert!(
                in_a_row == 0 && std::time::Instant::now() < deadline,
                "{} {}, {} {} after {in_a_row} taken",
                event.status,
                event.text(),
                inbox.status,
                inbox.text()
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// TLS to PostgreSQL as libpq's URLs ask for it (`sslmode`, `sslrootcert`), against a real
/// PostgreSQL serving TLS with a certificate for `localhost` and `127.0.0.1` signed by the
/// tests' own authority, which takes the node's role over TLS only. Every one of the node's
/// sessions is over TLS; what the URL asks to check is checked, and a refusal is logged in
/// rustls's or PostgreSQL's words. A renewed authorities' file is taken without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_is_reached_over_tls_as_the_url_asks() {
    let Some(disk) = SmallDisk::start_tls(64) else {
        return;
    };
    let admin = db_at(&disk.url).await;
    for statement in [
        "CREATE ROLE triggers_tls LOGIN SUPERUSER",
        "CREATE DATABASE triggers_tls OWNER triggers_tls",
    ] {
        admin.batch_execute(statement).await.unwrap();
    }
    let port = disk
        .url
        .rsplit_once(':')
        .unwrap()
        .1
        .split('/')
        .next()
        .unwrap();
    let ca = concat!(env!("CARGO_MANIFEST_DIR"), "/src/delivery/testdata/ca.pem");
    // The host name is what the certificate is checked against; the address is the cluster's.
    let url = |host: &str, params: &str| {
        format!("postgres://triggers_tls@{host}:{port}/triggers_tls?hostaddr=127.0.0.1&{params}")
    };
    let refused = [
        // Not over TLS: PostgreSQL's own refusal.
        (url("localhost", "sslmode=disable"), "no encryption"),
        // No `sslmode` to a database on this machine: no TLS (it protects nothing there).
        (
            url("localhost", "application_name=triggers"),
            "no encryption",
        ),
        // The tests' authority is none of the public ones.
        (
            url("localhost", "sslmode=verify-full"),
            "UnknownIssuer; name the authority",
        ),
        (
            url("localhost", "sslmode=verify-ca&sslrootcert=system"),
            "sslrootcert=system needs sslmode=verify-full",
        ),
        // Signed by it, but not for this name.
        (
            url("db.test", &format!("sslmode=verify-full&sslrootcert={ca}")),
            "certificate not valid for name",
        ),
    ];
    for (target, says) in &refused {
        let line = if says.starts_with("sslrootcert") {
            // A URL that cannot be used is refused at start.
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_triggers"))
                .args(["migrate", "--database-url", target])
                .env_clear()
                .output()
                .unwrap();
            assert_eq!(out.status.code(), Some(2), "{target}");
            String::from_utf8_lossy(&out.stderr).into_owned()
        } else {
            first_retry(target)
        };
        assert!(line.contains(says), "{target}: {line}");
    }
    let taken = [
        url(
            "localhost",
            &format!("sslmode=verify-full&sslrootcert={ca}"),
        ),
        url(
            "127.0.0.1",
            &format!("sslmode=verify-full&sslrootcert={ca}"),
        ),
        url("db.test", &format!("sslmode=verify-ca&sslrootcert={ca}")),
        url("db.test", "sslmode=require"),
        // No `sslmode` to another machine: TLS when the server offers it, nothing checked
        // (libpq's default).
        url("db.test", "application_name=triggers"),
    ];
    for target in taken {
        let mut s = Server::process_with_db(&[], &target);
        let (key, _) = new_org(s.addr, "pro").await;
        let r = post_event(s.addr, &key, "t", json!(1), None).await;
        assert_eq!(r.status, 201, "{target}: {}", r.text());
        let r = get(s.addr, &key, "/api/inbox?limit=1").await;
        assert_eq!(r.status, 200, "{target}: {}", r.text());
        let want = held_session_names("triggers");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let rows = admin
                .query(
                    "SELECT a.application_name, s.ssl FROM pg_stat_activity a \
                     JOIN pg_stat_ssl s USING (pid) WHERE a.usename = 'triggers_tls'",
                    &[],
                )
                .await
                .unwrap();
            let plain: Vec<String> = rows
                .iter()
                .filter(|r| !r.get::<_, bool>(1))
                .map(|r| r.get(0))
                .collect();
            assert!(
                plain.is_empty(),
                "{target}: sessions without TLS: {plain:?}"
            );
            let names: std::collections::BTreeSet<String> = rows.iter().map(|r| r.get(0)).collect();
            if want.is_subset(&names) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{target}: want {want:?} over TLS, connected: {names:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        s.stop();
    }
    // SCRAM bound to the TLS channel (`channel_binding=require`, as Neon's URLs ask): the
    // password exchange names the server's certificate (SCRAM-SHA-256-PLUS). With no binding to
    // offer, tokio-postgres refused the URL's demand and the node never connected.
    admin
        .batch_execute("CREATE ROLE triggers_scram LOGIN SUPERUSER PASSWORD 'scram-secret'")
        .await
        .unwrap();
    let scram = format!(
        "postgres://triggers_scram:scram-secret@localhost:{port}/triggers_tls\
         ?hostaddr=127.0.0.1&sslmode=verify-full&sslrootcert={ca}&channel_binding=require"
    );
    let mut s = Server::process_with_db(&[], &scram);
    let (key, _) = new_org(s.addr, "pro").await;
    let r = post_event(s.addr, &key, "t", json!(1), None).await;
    assert_eq!(r.status, 201, "{}", r.text());
    s.stop();
    // The same role with its password in a file (a Docker or Kubernetes secret), renewed while
    // the node runs: the role's password changed, the file renewed by a rename, the node's
    // sessions ended, and the pools' new connections log in with the new one (read once, they
    // were refused: 503).
    let secrets = std::env::temp_dir().join(format!("triggers-secrets-{}", std::process::id()));
    std::fs::create_dir_all(&secrets).unwrap();
    let password = secrets.join("password");
    renew_by_rename(&password, "scram-secret\n");
    let without = scram.replace(":scram-secret@", "@");
    let file = password.display().to_string();
    let mut s = Server::process_with_db(&["--database-password-file", &file], &without);
    let (key, _) = new_org(s.addr, "pro").await;
    assert_eq!(
        post_event(s.addr, &key, "t", json!(1), None).await.status,
        201
    );
    admin
        .batch_execute("ALTER ROLE triggers_scram PASSWORD 'rotated-secret'")
        .await
        .unwrap();
    renew_by_rename(&password, "rotated-secret\n");
    end_sessions(&admin, "triggers_scram").await;
    taken_five_in_a_row(&s, &key).await;
    assert!(s.logged("database password read again").await);
    s.stop();
    let _ = std::fs::remove_dir_all(&secrets);
    // A renewed authorities' file is taken by the pools' next connections, without a restart.
    // The database's certificate is renewed by another authority (`leaf2.pem`, signed by
    // `ca2.pem`), the node's file becomes the bundle of both (renewed by a rename, as Kubernetes
    // renews a mounted secret) and the node's sessions end: every new one is taken. Read once
    // at start, the pools refused the new certificate (UnknownIssuer): 503.
    let testdata = concat!(env!("CARGO_MANIFEST_DIR"), "/src/delivery/testdata");
    let dir = std::env::temp_dir().join(format!("triggers-roots-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let roots = dir.join("roots.pem");
    let read = |name: &str| std::fs::read_to_string(format!("{testdata}/{name}")).unwrap();
    renew_by_rename(&roots, &read("ca.pem"));
    let roots_param = format!("sslmode=verify-full&sslrootcert={}", roots.display());
    let mut s = Server::process_with_db(&[], &url("localhost", &roots_param));
    let (key, _) = new_org(s.addr, "pro").await;
    assert_eq!(
        post_event(s.addr, &key, "t", json!(1), None).await.status,
        201
    );
    // The new certificate and key, written by the database server (its user owns them,
    // whoever runs the test; the cluster's own directory is in a mount namespace of its own),
    // the key then made readable by that user alone (or the server refuses it), and taken by a
    // reload.
    let renewed = |ext: &str| {
        std::env::temp_dir().join(format!("triggers-renewed-{}.{ext}", std::process::id()))
    };
    for (ext, file) in [("crt", "leaf2.pem"), ("key", "leaf2.key")] {
        use std::os::unix::fs::PermissionsExt;
        // A line a row (COPY takes no parameters; a PEM file holds no `$`).
        admin
            .batch_execute(&format!(
                "COPY (SELECT unnest(string_to_array(rtrim($pem${}$pem$, E'\\n'), E'\\n'))) \
                 TO '{}'",
                read(file),
                renewed(ext).display()
            ))
            .await
            .unwrap();
        std::fs::set_permissions(renewed(ext), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    renew_by_rename(&roots, &(read("ca.pem") + &read("ca2.pem")));
    let (cert_file, key_file) = (renewed("crt"), renewed("key"));
    disk.set_system(&[
        ("ssl_cert_file", &cert_file.display().to_string()),
        ("ssl_key_file", &key_file.display().to_string()),
    ])
    .await;
    // The reload is a signal: a new session shows when the postmaster has read the file.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let fresh = db_at(&disk.url).await;
        let row = fresh.query_one("SHOW ssl_cert_file", &[]).await.unwrap();
        if row.get::<_, String>(0) == renewed("crt").display().to_string() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no reload");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    end_sessions(&admin, "triggers_tls").await;
    taken_five_in_a_row(&s, &key).await;
    assert!(s.logged("database authorities read again").await);
    s.stop();
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(renewed("crt"));
    let _ = std::fs::remove_file(renewed("key"));
}

/// A database reached over a Unix socket (the edge box's, as Debian sets it up): no TLS there,
/// whatever `sslmode` says (as libpq: PostgreSQL has none there). tokio-postgres asks the TLS
/// connector for one with no host name before it knows TLS will not be used; the connector made
/// that a failure, and every connection over a socket failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_over_a_unix_socket_is_reached() {
    let base = database_url();
    let (Some(rest), Ok(dir)) = (
        base.strip_prefix("postgres://triggers@127.0.0.1:"),
        std::env::var("TRIGGERS_PG_DIR").or_else(|_| Ok::<_, ()>("/var/tmp/triggers-pg".into())),
    ) else {
        eprintln!("SKIPPED: the test database ({base}) is not the project's own cluster");
        return;
    };
    let port = rest.split('/').next().unwrap();
    if !std::path::Path::new(&format!("{dir}/.s.PGSQL.{port}")).exists() {
        eprintln!("SKIPPED: no Unix socket at {dir}");
        return;
    }
    let url = own_database("triggers_test_unix_socket").await;
    let socket = url.replace("127.0.0.1:", &format!("{}:", dir.replace('/', "%2F")));
    for target in [
        socket.clone(),
        format!("{socket}?sslmode=prefer"),
        format!("{socket}?sslmode=require"),
    ] {
        let mut s = Server::process_with_db(&[], &target);
        let (key, _) = new_org(s.addr, "pro").await;
        let r = post_event(s.addr, &key, "t", json!(1), None).await;
        assert_eq!(r.status, 201, "{target}: {}", r.text());
        let over_socket = count(
            &db_at(&url).await,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name = 'triggers-ingest' AND client_port = -1",
        )
        .await;
        assert!(
            over_socket >= 1,
            "{target}: no ingest session over the socket"
        );
        s.stop();
    }
}

/// The server turns transparent huge pages off for itself (the allocator's arenas would keep
/// every 2 MiB page it touches whole: 26 MB idle instead of 11), unless `MIMALLOC_ALLOW_THP` is
/// set (`1`: kept).
#[tokio::test]
async fn the_server_turns_transparent_huge_pages_off_unless_told() {
    let thp = |s: &Server| -> String {
        let status = std::fs::read_to_string(format!("/proc/{}/status", s.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("THP_enabled:"))
            .unwrap_or_else(|| panic!("no THP_enabled in /proc/pid/status: {status}"))
            .trim()
            .to_string()
    };
    let s = Server::process(&[]);
    assert_eq!(thp(&s), "0");
    let kept = Server::process_wrapped(&["env", "MIMALLOC_ALLOW_THP=1"], &[], &database_url());
    assert_eq!(thp(&kept), "1");
}

/// Start-up says when the database cannot keep what a 201 promises: PostgreSQL with `fsync = off`
/// (a crash of its machine loses acknowledged events and may leave it corrupt), or sessions whose
/// `synchronous_commit` still reads `off` (here the URL's options ask for it; a pooler that drops
/// the server's options does the same). A PostgreSQL of the test's own, set so; and before, as it
/// was made, nothing of it is said.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_warns_of_a_database_that_would_lose_acknowledged_events() {
    let Some(disk) = SmallDisk::start(128) else {
        return;
    };
    let url = disk.database("triggers_unsafe").await;
    let s = Server::process_with_db(&[], &url);
    assert!(s.logged("migrations up to date").await);
    assert!(s.log_lines("fsync = off").is_empty());
    assert!(s.log_lines("sessions lack").is_empty());
    drop(s);
    disk.set_system(&[("fsync", "off")]).await;
    let asked_off = format!("{url}?options=-c%20synchronous_commit%3Doff");
    let s = Server::process_with_db(&[], &asked_off);
    assert!(s.logged("migrations up to date").await);
    assert_eq!(s.log_lines("PostgreSQL runs with fsync = off").len(), 1);
    let named = s.log_lines("sessions lack this server's settings");
    assert_eq!(named.len(), 1, "{named:?}");
    assert!(
        named[0].contains(r#""settings":"synchronous_commit""#),
        "{}",
        named[0]
    );
    assert!(named[0].contains("the URL's options ask otherwise"));
    drop(s);
    drop(disk);
}

/// A log reader that stops reading (journald hung, a container runtime's log pipe stalled, a
/// terminal paused) never stops the server: with its stdout pipe full, each database blip's
/// warnings and the access log's lines are dropped and counted instead of blocking the thread
/// that writes them, every event is still answered 201 and stored, and readiness stays 200. Once
/// the reader reads again, a warning says how many lines were dropped. Before, the first write
/// that found the pipe full blocked its thread (the group commit, an ingress core writing its
/// access lines) until the reader read: every request went unanswered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_log_reader_never_stops_the_server() {
    let name = "triggers_test_log_stall";
    let url = own_database(name).await;
    let s = Server::process_with_db(&["--db-timeout-ms", "1000", "--access-log"], &url);
    let (key, _) = new_org(s.addr, "enterprise").await;
    let within = |what: &'static str| {
        move |r: Result<Response, tokio::time::error::Elapsed>| {
            r.unwrap_or_else(|_| panic!("{what}: no answer within 10 s"))
        }
    };
    s.stall_log_reader();
    let admin = db().await;
    let terminate = format!(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = '{name}'"
    );
    let mut acked = Vec::new();
    let mut rounds_after_drops = 0;
    for round in 0..60 {
        // Every connection of the server ends: each pool's warnings, the listener's, the
        // health flag's.
        admin.batch_execute(&terminate).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let posted = tokio::time::timeout(
            Duration::from_secs(10),
            post_event(s.addr, &key, "blip", json!({ "round": round }), None),
        )
        .await;
        let r = within("an event with the log's reader stalled")(posted);
        assert_eq!(r.status, 201, "round {round}: {}", r.text());
        acked.push(r.json()["id"].as_str().unwrap().to_string());
        let ready = tokio::time::timeout(
            Duration::from_secs(10),
            call(s.addr, "GET", "/health/ready", &[], None),
        )
        .await;
        assert_eq!(within("readiness")(ready).status, 200, "round {round}");
        if common::metric(&s, "triggers_log_lines_dropped_total").await > 0.0 {
            rounds_after_drops += 1;
            if rounds_after_drops == 3 {
                break;
            }
        }
    }
    assert_eq!(
        rounds_after_drops, 3,
        "the server's warnings never filled the log's pipe"
    );
    // Three seconds more of requests: each core writes its access lines (every second) into
    // the full pipe.
    let until = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < until {
        let posted = tokio::time::timeout(
            Duration::from_secs(10),
            post_event(s.addr, &key, "blip", json!({}), None),
        )
        .await;
        let r = within("an event with the access log's pipe full")(posted);
        assert_eq!(r.status, 201, "{}", r.text());
        acked.push(r.json()["id"].as_str().unwrap().to_string());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stored = count(
        &db_at(&url).await,
        "SELECT count(*) FROM events WHERE type = 'blip'",
    )
    .await;
    assert_eq!(stored, acked.len() as i64);
    s.read_log_again();
    admin.batch_execute(&terminate).await.unwrap();
    let said = s.log_lines_at_least("log lines dropped", 1).await;
    assert!(!said.is_empty(), "no warning of the lines dropped");
    let dropped: Value = serde_json::from_str(&said[0]).unwrap();
    assert!(dropped["lines"].as_i64().unwrap() > 0, "{}", said[0]);
    assert_eq!(dropped["level"], "WARN");
}
