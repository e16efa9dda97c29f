//! Endpoints with real receivers on loopback: the API and its checks, fan-out by event type,
//! delivery per endpoint, secret rotation checked with the Standard Webhooks scheme for both
//! secrets, the circuit breaker's timings, rate limits, pause and resume, recovery, auto-disable,
//! operational events, isolation between endpoints, and a version 1 database migrated with
//! pending deliveries.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const PRIVATE: &str = "--allow-private-webhooks";

async fn event_json(addr: std::net::SocketAddr, key: &str, id: &str) -> Value {
    let r = get(addr, key, &format!("/api/events/{id}")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

/// Wait until `check` holds for the event's detail.
async fn wait_event(
    addr: std::net::SocketAddr,
    key: &str,
    id: &str,
    limit: Duration,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let e = event_json(addr, key, id).await;
        if check(&e) {
            return e;
        }
        assert!(Instant::now() < deadline, "condition never met: {e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Wait until the event is delivered (to every endpoint it matched); its detail then.
async fn wait_delivered(addr: std::net::SocketAddr, key: &str, id: &str, limit: Duration) -> Value {
    wait_event(addr, key, id, limit, |e| e["status"] == "delivered").await
}

fn ids_at(received: &[Received], path: &str) -> HashSet<String> {
    received
        .iter()
        .filter(|r| r.path == path)
        .map(|r| r.event_id())
        .collect()
}

async fn post_typed(addr: std::net::SocketAddr, key: &str, event_type: &str) -> String {
    let r = post_event(addr, key, event_type, json!({"t": event_type}), None).await;
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoints_api_creates_reads_changes_and_deletes() {
    let s = Server::start(&[PRIVATE, "--endpoints-per-org-max", "3"]);
    let (key, _) = new_org(s.addr, "pro").await;
    let created = create_endpoint(
        s.addr,
        &key,
        json!({"url": "http://127.0.0.1:9/a", "event_types": ["order.*", "user.created", "order.*"],
               "description": "orders", "rate_limit_per_second": 50}),
    )
    .await;
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(created["url"], "http://127.0.0.1:9/a");
    assert_eq!(
        created["event_types"],
        json!(["order.*", "user.created"]),
        "repeated patterns are kept once"
    );
    assert_eq!(created["description"], "orders");
    assert_eq!(created["rate_limit_per_second"], 50);
    assert_eq!(created["status"], "active");
    assert!(created["signing_secret"]
        .as_str()
        .unwrap()
        .starts_with("whsec_"));
    assert_eq!(
        created["health"],
        json!({"circuit": "closed", "consecutive_failures": 0, "last_success_at": null,
               "last_failure_at": null})
    );
    assert_eq!(created["created_at"], created["updated_at"]);

    // Reads never show the secret; the secret has its own route.
    let one = get(s.addr, &key, &format!("/api/endpoints/{id}")).await;
    assert_eq!(one.status, 200);
    assert_eq!(one.json().get("signing_secret"), None);
    let list = get(s.addr, &key, "/api/endpoints").await.json();
    assert_eq!(list["endpoints"].as_array().unwrap().len(), 1);
    assert_eq!(list["endpoints"][0].get("signing_secret"), None);
    let secret = get(s.addr, &key, &format!("/api/endpoints/{id}/secret"))
        .await
        .json();
    assert_eq!(
        secret,
        json!({"signing_secret": created["signing_secret"], "previous_secret_expires_at": null})
    );

    // PATCH changes only what is sent; null clears.
    let changed = patch(
        s.addr,
        &key,
        &format!("/api/endpoints/{id}"),
        &json!({"description": null, "event_types": null}),
    )
    .await;
    assert_eq!(changed.status, 200, "{}", changed.text());
    let changed = changed.json();
    assert_eq!(changed["description"], Value::Null);
    assert_eq!(changed["event_types"], Value::Null);
    assert_eq!(changed["rate_limit_per_second"], 50);
    assert_eq!(changed["url"], "http://127.0.0.1:9/a");

    // Another organization sees none of it.
    let (other, _) = new_org(s.addr, "pro").await;
    for path in [
        format!("/api/endpoints/{id}"),
        format!("/api/endpoints/{id}/secret"),
    ] {
        assert_eq!(get(s.addr, &other, &path).await.status, 404, "{path}");
    }
    assert_eq!(
        delete(s.addr, &other, &format!("/api/endpoints/{id}"))
            .await
            .status,
        404
    );
    assert_eq!(
        get(s.addr, &other, "/api/endpoints").await.json()["endpoints"],
        json!([])
    );

    // Shape checks: 422 naming the field, nothing created.
    let bad: [(Value, &str); 11] = [
        (json!({}), "url"),
        (json!({"url": "ftp://x/"}), "url"),
        (json!({"url": 7}), "url"),
        (
            json!({"url": "http://127.0.0.1:9/", "event_types": []}),
            "event_types",
        ),
        (
            json!({"url": "http://127.0.0.1:9/", "event_types": ["or*der"]}),
            "event_types",
        ),
        (
            json!({"url": "http://127.0.0.1:9/", "event_types": ["a.*.b"]}),
            "event_types",
        ),
        (
            json!({"url": "http://127.0.0.1:9/", "event_types": (0..51).map(|i| format!("t{i}")).collect::<Vec<_>>()}),
            "event_types",
        ),
        (
            json!({"url": "http://127.0.0.1:9/", "description": "d".repeat(256)}),
            "description",
        ),
        (
            json!({"url": "http://127.0.0.1:9/", "rate_limit_per_second": 0}),
            "rate_limit_per_second",
        ),
        (
            json!({"url": "http://127.0.0.1:9/", "rate_limit_per_second": 10001}),
            "rate_limit_per_second",
        ),
        (
            json!({"url": "http://127.0.0.1:9/", "rate_limit_per_second": 1.5}),
            "rate_limit_per_second",
        ),
    ];
    for (body, field) in bad {
        let r = post(s.addr, &key, "/api/endpoints", &body).await;
        assert_eq!(r.status, 422, "{body}: {}", r.text());
        assert_eq!(r.json()["field"], field, "{body}");
    }
    let r = patch(s.addr, &key, &format!("/api/endpoints/{id}"), &json!({})).await;
    assert_eq!(r.status, 422);
    let r = get(s.addr, &key, "/api/endpoints/not-a-uuid").await;
    assert_eq!(r.status, 422);

    // At most `--endpoints-per-org-max`; a deleted one makes room again.
    create_endpoint(s.addr, &key, json!({"url": "http://127.0.0.1:9/b"})).await;
    create_endpoint(s.addr, &key, json!({"url": "http://127.0.0.1:9/c"})).await;
    let r = post(
        s.addr,
        &key,
        "/api/endpoints",
        &json!({"url": "http://127.0.0.1:9/d"}),
    )
    .await;
    assert_eq!(r.status, 422);
    assert!(r.json()["error"].as_str().unwrap().contains("at most 3"));
    let gone = delete(s.addr, &key, &format!("/api/endpoints/{id}")).await;
    assert_eq!(gone.status, 200);
    assert_eq!(gone.json(), json!({"id": id, "deleted": true}));
    assert_eq!(
        get(s.addr, &key, &format!("/api/endpoints/{id}"))
            .await
            .status,
        404
    );
    create_endpoint(s.addr, &key, json!({"url": "http://127.0.0.1:9/d"})).await;
    assert_eq!(
        get(s.addr, &key, "/api/endpoints").await.json()["endpoints"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
}

/// An endpoint's own headers (an `Authorization` its receiver's gateway asks for) go with every
/// delivery to it, beside the server's own; a PATCH replaces them, null removes them; reads show
/// them as set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoints_own_headers_go_with_every_delivery_and_a_patch_replaces_them() {
    let s = Server::start(&[PRIVATE]);
    let recv = Receiver::start(|_, _| Answer::status(200)).await;
    let (key, _) = new_org(s.addr, "pro").await;
    let own = json!({"Authorization": "Bearer gw-t0k3n", "X-Tenant": "acme eu-1"});
    let created =
        create_endpoint(s.addr, &key, json!({"url": recv.url("/h"), "headers": own})).await;
    assert_eq!(created["headers"], own);
    let path = format!("/api/endpoints/{}", created["id"].as_str().unwrap());
    assert_eq!(get(s.addr, &key, &path).await.json()["headers"], own);
    let listed = get(s.addr, &key, "/api/endpoints").await.json();
    assert_eq!(listed["endpoints"][0]["headers"], own);

    let first = post_typed(s.addr, &key, "order.paid").await;
    let got = recv
        .wait_until(Duration::from_secs(10), |r| !r.is_empty())
        .await;
    assert_eq!(got[0].header("authorization"), Some("Bearer gw-t0k3n"));
    assert_eq!(got[0].header("x-tenant"), Some("acme eu-1"));
    assert_eq!(got[0].header("webhook-id"), Some(first.as_str()));
    assert_eq!(got[0].header("content-type"), Some("application/json"));
    let named = |name: &str| {
        got[0]
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .count()
    };
    assert_eq!((named("host"), named("authorization")), (1, 1));

    // A PATCH replaces the whole set (what is not named goes); deliveries from then on carry it.
    let changed = patch(
        s.addr,
        &key,
        &path,
        &json!({"headers": {"X-Tenant": "acme us-2"}}),
    )
    .await;
    assert_eq!(changed.status, 200, "{}", changed.text());
    assert_eq!(changed.json()["headers"], json!({"X-Tenant": "acme us-2"}));
    post_typed(s.addr, &key, "order.paid").await;
    let got = recv
        .wait_until(Duration::from_secs(10), |r| r.len() >= 2)
        .await;
    assert_eq!(got[1].header("x-tenant"), Some("acme us-2"));
    assert_eq!(got[1].header("authorization"), None);

    // null: none of its own; a PATCH of something else leaves them as they are.
    let same = patch(s.addr, &key, &path, &json!({"description": "d"})).await;
    assert_eq!(same.json()["headers"], json!({"X-Tenant": "acme us-2"}));
    let cleared = patch(s.addr, &key, &path, &json!({"headers": null})).await;
    assert_eq!(cleared.json()["headers"], json!({}));
    post_typed(s.addr, &key, "order.paid").await;
    let got = recv
        .wait_until(Duration::from_secs(10), |r| r.len() >= 3)
        .await;
    assert_eq!(got[2].header("x-tenant"), None);
}

/// Headers that could change what the request means (a second `Content-Length`, a line break
/// that starts another header, the server's own signature) are refused with 422 naming
/// `headers`, and a refused PATCH changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoints_headers_are_checked_and_a_refused_change_leaves_them() {
    let s = Server::start(&[PRIVATE]);
    let (key, _) = new_org(s.addr, "pro").await;
    let url = "http://127.0.0.1:9/h";
    let created = create_endpoint(s.addr, &key, json!({"url": url, "headers": {"X-A": "1"}})).await;
    let path = format!("/api/endpoints/{}", created["id"].as_str().unwrap());
    let many: serde_json::Map<String, Value> =
        (0..21).map(|i| (format!("X-{i}"), json!("v"))).collect();
    let large: serde_json::Map<String, Value> = (0..9)
        .map(|i| (format!("X-{i}"), json!("v".repeat(1000))))
        .collect();
    let bad = [
        json!({"Content-Length": "0"}),
        json!({"webhook-signature": "v1,forged"}),
        json!({"HOST": "evil.example"}),
        json!({"Transfer-Encoding": "chunked"}),
        json!({"X-A": "1\r\nX-Injected: 1"}),
        json!({"X-A": "line\nbreak"}),
        json!({"X A": "1"}),
        json!({"X:A": "1"}),
        json!({"": "1"}),
        json!({"X-A": "caf\u{e9}"}),
        json!({"X-A": " padded"}),
        json!({"X-A": "x".repeat(1025)}),
        json!({"X-A": 1}),
        json!({"X-A": null}),
        json!(["X-A", "1"]),
        json!("X-A: 1"),
        Value::Object(many),
        Value::Object(large),
    ];
    for headers in bad {
        let r = post(
            s.addr,
            &key,
            "/api/endpoints",
            &json!({"url": url, "headers": headers}),
        )
        .await;
        assert_eq!(r.status, 422, "{headers}: {}", r.text());
        assert_eq!(r.json()["field"], "headers", "{headers}");
        let r = patch(
            s.addr,
            &key,
            &path,
            &json!({"headers": headers, "description": "d"}),
        )
        .await;
        assert_eq!(r.status, 422, "{headers}: {}", r.text());
    }
    // The same name twice in any case (JSON allows it; HTTP would send both).
    let twice = br#"{"url": "http://127.0.0.1:9/h", "headers": {"X-A": "1", "x-a": "2"}}"#;
    let r = call(
        s.addr,
        "POST",
        "/api/endpoints",
        &[("X-API-Key", &key), ("Content-Type", "application/json")],
        Some(twice),
    )
    .await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.json()["error"].as_str().unwrap().contains("twice"));
    let now = get(s.addr, &key, &path).await.json();
    assert_eq!(now["headers"], json!({"X-A": "1"}));
    assert_eq!(
        now["description"],
        Value::Null,
        "nothing of a refused PATCH was kept"
    );
    assert_eq!(
        get(s.addr, &key, "/api/endpoints").await.json()["endpoints"]
            .as_array()
            .unwrap()
            .len(),
        1,
        "nothing created"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_event_goes_to_the_endpoints_whose_patterns_take_it_each_on_its_own() {
    // /b fails each event's first attempt: its retries are its own, not the others'.
    let recv = Receiver::start(
        |r, _| match (r.path.as_str(), r.header("x-delivery-attempt")) {
            ("/b", Some("1")) => Answer::status(500),
            _ => Answer::status(200),
        },
    )
    .await;
    let s = Server::start(&[PRIVATE, "--retry-schedule", "200ms,200ms"]);
    let (key, _) = new_org(s.addr, "pro").await;
    let a = create_endpoint(
        s.addr,
        &key,
        json!({"url": recv.url("/a"), "event_types": ["order.*"]}),
    )
    .await;
    let b = create_endpoint(
        s.addr,
        &key,
        json!({"url": recv.url("/b"), "event_types": ["order.paid", "user.created"]}),
    )
    .await;
    let c = create_endpoint(s.addr, &key, json!({"url": recv.url("/c")})).await;
    let paid = post_typed(s.addr, &key, "order.paid").await;
    let refund = post_typed(s.addr, &key, "order.refund.created").await;
    let user = post_typed(s.addr, &key, "user.created").await;
    let misc = post_typed(s.addr, &key, "misc").await;
    let plain_order = post_typed(s.addr, &key, "order").await;
    let got = recv
        .wait_until(Duration::from_secs(10), |r| {
            r.iter().filter(|x| x.answered == 200).count() >= 9
        })
        .await;
    let set = |ids: &[&String]| ids.iter().map(|s| s.to_string()).collect::<HashSet<_>>();
    assert_eq!(ids_at(&got, "/a"), set(&[&paid, &refund]));
    assert_eq!(ids_at(&got, "/b"), set(&[&paid, &user]));
    assert_eq!(
        ids_at(&got, "/c"),
        set(&[&paid, &refund, &user, &misc, &plain_order])
    );
    // Each endpoint counts its own attempts.
    let to_b: Vec<&Received> = got
        .iter()
        .filter(|r| r.path == "/b" && r.event_id() == paid)
        .collect();
    assert_eq!(
        to_b.iter()
            .map(|r| r.header("x-delivery-attempt").unwrap())
            .collect::<Vec<_>>(),
        ["1", "2"]
    );
    let to_a = got
        .iter()
        .find(|r| r.path == "/a" && r.event_id() == paid)
        .unwrap();
    assert_eq!(to_a.header("x-delivery-attempt"), Some("1"));
    for (r, endpoint) in [(to_a, &a), (to_b[1], &b)] {
        verify_standard_webhook(endpoint["signing_secret"].as_str().unwrap(), r);
        assert_eq!(r.header("webhook-id"), Some(paid.as_str()));
    }
    // The detail: one delivery per matching endpoint, attempts per endpoint, and the event's
    // attempts equal to the log's length; each attempt names its endpoint and keeps the answer.
    let e = wait_delivered(s.addr, &key, &paid, Duration::from_secs(5)).await;
    let deliveries: HashMap<String, Value> = e["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["endpoint_id"].as_str().unwrap().to_string(), d.clone()))
        .collect();
    assert_eq!(deliveries.len(), 3);
    assert_eq!(deliveries[a["id"].as_str().unwrap()]["attempts"], 1);
    assert_eq!(deliveries[b["id"].as_str().unwrap()]["attempts"], 2);
    assert_eq!(deliveries[c["id"].as_str().unwrap()]["attempts"], 1);
    for d in deliveries.values() {
        assert_eq!(d["status"], "delivered");
        assert!(d["delivered_at"].is_string());
    }
    let log = e["delivery_attempts"].as_array().unwrap();
    assert_eq!(e["attempts"], 4);
    assert_eq!(log.len(), 4);
    let failed: Vec<&Value> = log.iter().filter(|x| x["response_status"] == 500).collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["endpoint_id"], b["id"]);
    assert_eq!(failed[0]["attempt"], 1);
    // An event no endpoint takes (once the catch-all endpoint is deleted) is pending, for the
    // inbox, with no deliveries.
    delete(
        s.addr,
        &key,
        &format!("/api/endpoints/{}", c["id"].as_str().unwrap()),
    )
    .await;
    let lonely = post_typed(s.addr, &key, "nobody.listens").await;
    let e = event_json(s.addr, &key, &lonely).await;
    assert_eq!(e["status"], "pending");
    assert_eq!(e["deliveries"], json!([]));
    assert_eq!(e["attempts"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_attempt_log_keeps_the_first_kib_of_the_answer_however_it_was_framed() {
    // 1,500 bytes with an invalid UTF-8 byte early and a two-byte character cut by the 1 KiB
    // boundary: the log keeps 1 KiB as text, with replacement characters.
    let mut long = vec![b'a'; 1500];
    long[10] = 0xff;
    long[1023..1025].copy_from_slice("é".as_bytes());
    let mut chunked = b"HTTP/1.1 100 Continue\r\n\r\n\
        HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        .to_vec();
    for part in long.chunks(700) {
        chunked.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        chunked.extend_from_slice(part);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let recv = Receiver::start(move |r, _| match r.path.as_str() {
        // Chunks after an interim answer, on a kept connection.
        "/chunked" => Answer {
            raw: Some(chunked.clone()),
            ..Answer::status(200)
        },
        // A body that ends with the connection.
        "/to-close" => Answer {
            raw: Some(b"HTTP/1.1 202 Accepted\r\n\r\nthanks, all of it".to_vec()),
            close_after: Some(Duration::ZERO),
            ..Answer::status(202)
        },
        // A failure that says why, by length, then a success with no body at all.
        _ if r.header("x-delivery-attempt") == Some("1") => Answer {
            raw: Some(b"HTTP/1.1 500 Oops\r\nContent-Length: 9\r\n\r\nno, sorry".to_vec()),
            ..Answer::status(500)
        },
        _ => Answer::status(204),
    })
    .await;
    let s = Server::start(&[PRIVATE, "--retry-schedule", "200ms"]);
    let (key, _) = new_org(s.addr, "pro").await;
    for (path, pattern) in [
        ("/chunked", "chunked"),
        ("/to-close", "close"),
        ("/fail", "fail"),
    ] {
        create_endpoint(
            s.addr,
            &key,
            json!({"url": recv.url(path), "event_types": [pattern]}),
        )
        .await;
    }
    let log = |e: &Value| e["delivery_attempts"].as_array().unwrap().clone();
    for _ in 0..2 {
        let id = post_typed(s.addr, &key, "chunked").await;
        let e = wait_delivered(s.addr, &key, &id, Duration::from_secs(10)).await;
        let kept = log(&e)[0]["response_body"].as_str().unwrap().to_string();
        assert_eq!(log(&e)[0]["response_status"], 200);
        let expected = String::from_utf8_lossy(&long[..1024]).into_owned();
        assert_eq!(kept, expected);
        assert!(kept.starts_with("aaaaaaaaaa\u{FFFD}a") && kept.ends_with('\u{FFFD}'));
    }
    let id = post_typed(s.addr, &key, "close").await;
    let e = wait_delivered(s.addr, &key, &id, Duration::from_secs(10)).await;
    assert_eq!(log(&e)[0]["response_status"], 202);
    assert_eq!(log(&e)[0]["response_body"], "thanks, all of it");
    let id = post_typed(s.addr, &key, "fail").await;
    let e = wait_delivered(s.addr, &key, &id, Duration::from_secs(10)).await;
    let log = log(&e);
    assert_eq!(log.len(), 2, "{e}");
    assert_eq!(log[0]["response_status"], 500);
    assert_eq!(log[0]["response_body"], "no, sorry");
    assert_eq!(log[1]["response_status"], 204);
    assert_eq!(log[1]["response_body"], Value::Null);
    // Connections are kept per origin (the three endpoints are one receiver): the chunked
    // answers and the close-delimited one went on the first, which that answer ended; the
    // failure and the success on a second.
    assert_eq!(recv.connections(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_secret_signs_beside_the_new_one_for_the_grace_period() {
    let recv = Receiver::start(|_, _| Answer::status(200)).await;
    let s = Server::start(&[PRIVATE, "--secret-rotation-grace-s", "2"]);
    let (key, _) = new_org(s.addr, "pro").await;
    let ep = create_endpoint(s.addr, &key, json!({"url": recv.url("/r")})).await;
    let id = ep["id"].as_str().unwrap();
    let old = ep["signing_secret"].as_str().unwrap().to_string();
    let rotated = post_empty(s.addr, &key, &format!("/api/endpoints/{id}/secret/rotate")).await;
    assert_eq!(rotated.status, 200, "{}", rotated.text());
    let rotated = rotated.json();
    let new = rotated["signing_secret"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    assert!(rotated["previous_secret_expires_at"].is_string());
    assert_eq!(
        get(s.addr, &key, &format!("/api/endpoints/{id}/secret"))
            .await
            .json(),
        rotated
    );
    // During the grace period: both signatures, the new one first; either secret verifies.
    let first = post_typed(s.addr, &key, "t").await;
    let got = recv
        .wait_until(Duration::from_secs(5), |r| r.len() == 1)
        .await;
    assert_eq!(got[0].event_id(), first);
    let header = got[0].header("webhook-signature").unwrap().to_string();
    let parts: Vec<&str> = header.split(' ').collect();
    assert_eq!(parts.len(), 2, "{header}");
    assert_eq!(parts[0], standard_signature(&new, &got[0]));
    assert_eq!(parts[1], standard_signature(&old, &got[0]));
    verify_standard_webhook(&new, &got[0]);
    verify_standard_webhook(&old, &got[0]);
    // After it: the new secret only.
    tokio::time::sleep(Duration::from_millis(2300)).await;
    post_typed(s.addr, &key, "t").await;
    let got = recv
        .wait_until(Duration::from_secs(5), |r| r.len() == 2)
        .await;
    assert_eq!(
        got[1].header("webhook-signature"),
        Some(standard_signature(&new, &got[1]).as_str())
    );
    assert_eq!(
        get(s.addr, &key, &format!("/api/endpoints/{id}/secret"))
            .await
            .json()["previous_secret_expires_at"],
        Value::Null
    );
}

/// A team moving from Svix keeps the secret its receivers verify with: a secret given on create
/// signs every delivery, one given on rotate signs beside the old for the grace period (padded
/// base64 or not: it is kept padded), and a rotation to the secret it already has changes
/// nothing (a retried rotation is safe); one that is not `whsec_` and the base64 of 24 to 64
/// bytes is refused naming `signing_secret` and changes nothing, and a PATCH never changes the
/// secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_given_on_create_or_rotate_signs_and_a_refused_one_changes_nothing() {
    use base64::Engine;
    let recv = Receiver::start(|_, _| Answer::status(200)).await;
    let s = Server::start(&[PRIVATE]);
    let (key, _) = new_org(s.addr, "pro").await;
    let svix = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let ep = create_endpoint(
        s.addr,
        &key,
        json!({"url": recv.url("/r"), "signing_secret": svix}),
    )
    .await;
    assert_eq!(ep["signing_secret"], svix);
    let id = ep["id"].as_str().unwrap();
    let secret_path = format!("/api/endpoints/{id}/secret");
    let rotate_path = format!("/api/endpoints/{id}/secret/rotate");
    let first = post_typed(s.addr, &key, "t").await;
    let got = recv
        .wait_until(Duration::from_secs(5), |r| r.len() == 1)
        .await;
    assert_eq!(got[0].event_id(), first);
    assert_eq!(
        got[0].header("webhook-signature"),
        Some(standard_signature(svix, &got[0]).as_str())
    );

    let b64 = |n: usize| base64::engine::general_purpose::STANDARD.encode(vec![0x5a; n]);
    let bad = [
        json!("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
        json!(format!("whsec_{}", b64(23))),
        json!(format!("whsec_{}", b64(65))),
        json!("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLa-w"),
        json!("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\r\nX: 1"),
        json!(""),
        json!(42),
        json!({"key": svix}),
    ];
    let unchanged = json!({"signing_secret": svix, "previous_secret_expires_at": null});
    for secret in &bad {
        let r = post(
            s.addr,
            &key,
            "/api/endpoints",
            &json!({"url": recv.url("/r"), "signing_secret": secret}),
        )
        .await;
        assert_eq!(r.status, 422, "{secret}: {}", r.text());
        assert_eq!(r.json()["field"], "signing_secret", "{secret}");
        let r = post(
            s.addr,
            &key,
            &rotate_path,
            &json!({"signing_secret": secret}),
        )
        .await;
        assert_eq!(r.status, 422, "{secret}: {}", r.text());
        assert_eq!(r.json()["field"], "signing_secret", "{secret}");
    }
    // Rotating to the current secret changes nothing (a retried rotation is safe).
    let r = post(s.addr, &key, &rotate_path, &json!({"signing_secret": svix})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), unchanged);
    // A PATCH names the route that changes the secret, and changes nothing else either.
    let r = patch(
        s.addr,
        &key,
        &format!("/api/endpoints/{id}"),
        &json!({"signing_secret": b64(32), "description": "d"}),
    )
    .await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert_eq!(r.json()["field"], "signing_secret");
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .contains("secret/rotate"));
    // A body that is not JSON: 415, as everywhere.
    let r = call(
        s.addr,
        "POST",
        &rotate_path,
        &[("X-API-Key", &key), ("Content-Type", "text/plain")],
        Some(b"whsec_x"),
    )
    .await;
    assert_eq!(r.status, 415, "{}", r.text());
    assert_eq!(get(s.addr, &key, &secret_path).await.json(), unchanged);
    let list = get(s.addr, &key, "/api/endpoints").await.json();
    assert_eq!(list["endpoints"].as_array().unwrap().len(), 1, "{list}");

    // A given secret of 32 bytes without its padding: the same key, kept padded.
    let given = format!("whsec_{}", b64(32));
    let unpadded = given.trim_end_matches('=');
    assert_ne!(unpadded, given);
    let r = post(
        s.addr,
        &key,
        &rotate_path,
        &json!({"signing_secret": unpadded}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["signing_secret"], given.as_str());
    assert!(r.json()["previous_secret_expires_at"].is_string());
    post_typed(s.addr, &key, "t").await;
    let got = recv
        .wait_until(Duration::from_secs(5), |r| r.len() == 2)
        .await;
    let expected = format!(
        "{} {}",
        standard_signature(&given, &got[1]),
        standard_signature(svix, &got[1])
    );
    assert_eq!(got[1].header("webhook-signature"), Some(expected.as_str()));
    assert_eq!(
        expected.split(' ').next(),
        Some(standard_signature(unpadded, &got[1]).as_str())
    );
    // The same rotation again, padded or not: answered as it is, the grace not extended.
    let after = get(s.addr, &key, &secret_path).await.json();
    for same in [&given[..], unpadded] {
        let r = post(s.addr, &key, &rotate_path, &json!({"signing_secret": same})).await;
        assert_eq!(r.status, 200, "{same}: {}", r.text());
        assert_eq!(r.json(), after);
    }
    // No body, `{}` or a null secret: a random one, as before.
    let mut seen = HashSet::from([svix.to_string(), given]);
    for body in [None, Some(json!({})), Some(json!({"signing_secret": null}))] {
        let r = match &body {
            None => post_empty(s.addr, &key, &rotate_path).await,
            Some(b) => post(s.addr, &key, &rotate_path, b).await,
        };
        assert_eq!(r.status, 200, "{body:?}: {}", r.text());
        let made = r.json()["signing_secret"].as_str().unwrap().to_string();
        assert!(made.starts_with("whsec_") && made.len() == 50, "{made}");
        assert!(seen.insert(made), "{body:?} made a secret seen before");
    }
}

/// POST /api/endpoints with this `Idempotency-Key` (and a JSON body).
async fn create_keyed(addr: std::net::SocketAddr, key: &str, idem: &str, body: &[u8]) -> Response {
    call(
        addr,
        "POST",
        "/api/endpoints",
        &[
            ("X-API-Key", key),
            ("Content-Type", "application/json"),
            ("Idempotency-Key", idem),
        ],
        Some(body),
    )
    .await
}

/// A create whose answer was lost (a timeout, a 503 after the commit) can be sent again with
/// the same `Idempotency-Key`: it is answered with the endpoint the first made (201, with its
/// secret, as it is now, `Idempotent-Replayed: true`), never a second endpoint; the same key
/// with another body is a 422 that creates nothing; creates racing with one key make one
/// endpoint; a deleted endpoint lets its key go; a malformed key is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_sent_again_with_its_idempotency_key_makes_one_endpoint() {
    let s = Server::start(&[PRIVATE]);
    let (key, _) = new_org(s.addr, "pro").await;
    let count = || async {
        let list = get(s.addr, &key, "/api/endpoints").await.json();
        list["endpoints"].as_array().unwrap().len()
    };
    let body = br#"{"url": "http://127.0.0.1:9/a", "event_types": ["order.*"]}"#;
    let first = create_keyed(s.addr, &key, "7c9e6679-7425-40de-944b-e07fc1f90ae7", body).await;
    assert_eq!(first.status, 201, "{}", first.text());
    assert_eq!(first.header("idempotent-replayed"), None);
    let first = first.json();
    let id = first["id"].as_str().unwrap();
    // Sent again, bare or quoted: the same endpoint, its secret, nothing new.
    for idem in [
        "7c9e6679-7425-40de-944b-e07fc1f90ae7",
        "\"7c9e6679-7425-40de-944b-e07fc1f90ae7\"",
    ] {
        let again = create_keyed(s.addr, &key, idem, body).await;
        assert_eq!(again.status, 201, "{}", again.text());
        assert_eq!(again.header("idempotent-replayed"), Some("true"));
        assert_eq!(again.json(), first);
    }
    assert_eq!(count().await, 1);
    // As it is now: a change made since shows.
    let r = patch(
        s.addr,
        &key,
        &format!("/api/endpoints/{id}"),
        &json!({"description": "d"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let again = create_keyed(s.addr, &key, "7c9e6679-7425-40de-944b-e07fc1f90ae7", body).await;
    assert_eq!(again.json()["description"], "d");
    assert_eq!(again.json()["signing_secret"], first["signing_secret"]);
    // The same key with another body (another URL, or the same JSON written otherwise).
    for other in [
        &br#"{"url": "http://127.0.0.1:9/b", "event_types": ["order.*"]}"#[..],
        br#"{"event_types": ["order.*"], "url": "http://127.0.0.1:9/a"}"#,
    ] {
        let r = create_keyed(s.addr, &key, "7c9e6679-7425-40de-944b-e07fc1f90ae7", other).await;
        assert_eq!(r.status, 422, "{}", r.text());
        assert_eq!(r.json()["field"], "Idempotency-Key");
    }
    assert_eq!(count().await, 1);
    // Another organization's key space is its own.
    let (other_org, _) = new_org(s.addr, "pro").await;
    let r = create_keyed(
        s.addr,
        &other_org,
        "7c9e6679-7425-40de-944b-e07fc1f90ae7",
        body,
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.header("idempotent-replayed"), None);
    assert_ne!(r.json()["id"], first["id"]);

    // Eight at once with one key: one endpoint, every answer its.
    let body2 = br#"{"url": "http://127.0.0.1:9/c"}"#;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (addr, key) = (s.addr, key.clone());
        tasks.spawn(async move { create_keyed(addr, &key, "race-1", body2).await });
    }
    let racing: Vec<Response> = tasks.join_all().await;
    let ids: HashSet<String> = racing
        .iter()
        .map(|r| {
            assert_eq!(r.status, 201, "{}", r.text());
            r.json()["id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    let replayed = racing
        .iter()
        .filter(|r| r.header("idempotent-replayed").is_some())
        .count();
    assert_eq!(replayed, 7);
    assert_eq!(count().await, 2);

    // A deleted endpoint lets its key go: the same create makes a new one.
    assert_eq!(
        delete(s.addr, &key, &format!("/api/endpoints/{id}"))
            .await
            .status,
        200
    );
    let r = create_keyed(s.addr, &key, "7c9e6679-7425-40de-944b-e07fc1f90ae7", body).await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.header("idempotent-replayed"), None);
    assert_ne!(r.json()["id"], first["id"]);
    assert_eq!(count().await, 2);

    // Malformed keys: refused, nothing made.
    let long = "k".repeat(256);
    for bad in ["", "\"\"", "a b", "caf\u{e9}", "\"a\"b\"", long.as_str()] {
        let r = create_keyed(s.addr, &key, bad, br#"{"url": "http://127.0.0.1:9/d"}"#).await;
        assert_eq!(r.status, 422, "{bad:?}: {}", r.text());
        assert_eq!(r.json()["field"], "Idempotency-Key", "{bad:?}");
    }
    assert_eq!(count().await, 2);
    // Without a key, a create is a create each time.
    let plain = json!({"url": "http://127.0.0.1:9/d"});
    for _ in 0..2 {
        assert_eq!(
            post(s.addr, &key, "/api/endpoints", &plain).await.status,
            201
        );
    }
    assert_eq!(count().await, 4);
}

/// Deliveries waiting in memory for their retry's time.
const SCHEDULED: &str = "triggers_deliveries_waiting{reason=\"retry_scheduled\"}";

async fn metric(s: &Server, name: &str) -> f64 {
    let text = call(s.metrics_addr.unwrap(), "GET", "/metrics", &[], None)
        .await
        .text();
    text.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// A receiver answering 500, a node on its own database whose circuits open after 3 failures for
/// `open_s` seconds (retries 100 ms apart), an organization and its endpoint to that receiver.
/// Its own database: the other tests' servers would claim this endpoint's due rows (each node
/// keeps its own breaker), and the attempts counted must be this node's.
async fn failing_endpoint(database: &str, open_s: &str) -> (Receiver, Server, String, Value) {
    let (recv, s, key, ep, _) = failing_endpoint_with(database, open_s, &[]).await;
    (recv, s, key, ep)
}

/// [`failing_endpoint`] with more server arguments; also gives the database's URL.
async fn failing_endpoint_with(
    database: &str,
    open_s: &str,
    more: &[&str],
) -> (Receiver, Server, String, Value, String) {
    let recv = Receiver::start(|_, _| Answer::status(500)).await;
    let url = own_database(database).await;
    let mut args = vec![
        PRIVATE,
        "--circuit-failures",
        "3",
        "--circuit-open-s",
        open_s,
        "--retry-schedule",
        "100ms,100ms,100ms,100ms,100ms,100ms,100ms,100ms",
    ];
    args.extend_from_slice(more);
    let s = Server::start_with_db(&args, &url);
    let (key, _) = new_org(s.addr, "pro").await;
    let ep = create_endpoint(s.addr, &key, json!({"url": recv.url("/x")})).await;
    (recv, s, key, ep, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_circuit_opens_after_consecutive_failures_probes_once_and_closes() {
    let (recv, s, key, ep) = failing_endpoint("triggers_test_circuit", "2").await;
    let path = format!("/api/endpoints/{}", ep["id"].as_str().unwrap());
    let first = post_typed(s.addr, &key, "t").await;
    // Three failures ~100 ms apart open the circuit.
    recv.wait_until(Duration::from_secs(5), |r| r.len() >= 3)
        .await;
    let opened = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let health = get(s.addr, &key, &path).await.json()["health"].clone();
    assert_eq!(health["circuit"], "open", "{health}");
    assert_eq!(health["consecutive_failures"], 3);
    assert!(health["last_failure_at"].is_string());
    assert_eq!(metric(&s, "triggers_endpoint_circuits_open").await, 1.0);
    // A delivery falling due while the circuit is open waits: no attempt is spent on it.
    let second = post_typed(s.addr, &key, "t").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = recv.received();
    assert_eq!(
        got.len(),
        3,
        "nothing is sent while open: {}",
        timeline(&got)
    );
    assert!(recv.for_event(&second).is_empty());
    assert!(
        metric(&s, "triggers_deliveries_waiting{reason=\"circuit_open\"}").await >= 1.0,
        "the waiting deliveries are counted by reason"
    );
    // Half-open after 2 s: exactly one probe; it fails, so the circuit opens for 2 s more.
    let got = recv
        .wait_until(Duration::from_secs(5), |r| r.len() >= 4)
        .await;
    let probe_gap = got[3].at - got[2].at;
    assert!(
        (Duration::from_millis(1800)..Duration::from_millis(3500)).contains(&probe_gap),
        "{probe_gap:?}: {}",
        timeline(&got)
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = recv.received();
    assert_eq!(got.len(), 4, "one probe at a time: {}", timeline(&got));
    // The receiver recovers; the next probe succeeds and closes the circuit.
    recv.set_script(|_, _| Answer::status(200));
    let got = recv
        .wait_until(Duration::from_secs(6), |r| {
            r.iter()
                .any(|x| x.answered == 200 && x.event_id() == second)
        })
        .await;
    let second_probe = got.iter().position(|x| x.answered == 200).unwrap();
    assert!(got[second_probe].at - got[3].at >= Duration::from_millis(1800));
    assert!(opened.elapsed() >= Duration::from_millis(4000));
    let e1 = wait_delivered(s.addr, &key, &first, Duration::from_secs(5)).await;
    assert_eq!(
        e1["attempts"], 5,
        "three failures, the failed probe, the success"
    );
    let e2 = wait_delivered(s.addr, &key, &second, Duration::from_secs(5)).await;
    assert_eq!(e2["attempts"], 1, "it waited without spending attempts");
    let health = get(s.addr, &key, &path).await.json()["health"].clone();
    assert_eq!(health["circuit"], "closed", "{health}");
    assert_eq!(health["consecutive_failures"], 0);
    assert!(health["last_success_at"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_waiting_on_a_slow_probe_go_when_it_ends_without_polling_meanwhile() {
    let (recv, s, key, _) = failing_endpoint("triggers_test_slow_probe", "1").await;
    // Three failures open the circuit; the eleven wait for it (in memory, or due in the
    // database until it is half-open).
    let ids = create_events(s.addr, &key, 11, "t").await;
    recv.wait_until(Duration::from_secs(5), |r| r.len() >= 3)
        .await;
    // The receiver recovers, slowly: the probe, a second after the circuit opened, takes 1.5 s.
    recv.set_script(|_, _| Answer {
        delay: Duration::from_millis(1500),
        ..Answer::status(200)
    });
    const WAITS: &str = "triggers_delivery_waits_total{reason=\"circuit_open\"}";
    let before = metric(&s, WAITS).await;
    let got = recv
        .wait_until(Duration::from_secs(10), |r| {
            r.iter().filter(|x| x.answered == 200).count() == ids.len()
        })
        .await;
    let ok: Vec<&Received> = got.iter().filter(|x| x.answered == 200).collect();
    // The others went when the probe's answer came, not at their next look a second after
    // the last (2 s after the probe began).
    let probe_answered = ok[0].at + Duration::from_millis(1500);
    assert!(
        ok[1..]
            .iter()
            .all(|x| x.at < probe_answered + Duration::from_millis(300)),
        "{:?}",
        ok.iter().map(|x| x.at - ok[0].at).collect::<Vec<_>>()
    );
    // Ten waited for the probe: each woke a few times in its 1.5 s (once a second, and at its
    // end), not every 100 ms (15 times each).
    let waits = metric(&s, WAITS).await - before;
    assert!(
        waits <= 40.0,
        "{waits} waits for the circuit while it was half-open"
    );
    for id in &ids {
        wait_delivered(s.addr, &key, id, Duration::from_secs(5)).await;
    }
}

/// Check `done` every 50 ms for up to 5 s; panic with `failed` if it never holds.
async fn poll_until<F, Fut>(mut done: F, failed: &str)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done().await {
        assert!(Instant::now() < deadline, "{failed}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Nothing was sent past the three failures while the circuit was open; now the receiver answers
/// 200 and endpoint `id` is resumed, its circuit closed.
async fn fix_and_resume(recv: &Receiver, s: &Server, key: &str, id: &str) {
    let got = recv.received();
    assert_eq!(
        got.len(),
        3,
        "nothing is sent while open: {}",
        timeline(&got)
    );
    recv.set_script(|_, _| Answer::status(200));
    let r = post_empty(s.addr, key, &format!("/api/endpoints/{id}/resume")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["health"]["circuit"], "closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_closes_the_circuit_and_what_waited_on_it_goes_at_once() {
    let (recv, s, key, ep) = failing_endpoint("triggers_test_resume_circuit", "30").await;
    let id = ep["id"].as_str().unwrap();
    let first = post_typed(s.addr, &key, "t").await;
    recv.wait_until(Duration::from_secs(5), |r| r.len() >= 3)
        .await;
    // The circuit is open for 30 s; the delivery's next attempt waits on it, in memory.
    let waiting = "triggers_deliveries_waiting{reason=\"circuit_open\"}";
    let open = || async { metric(&s, waiting).await >= 1.0 };
    poll_until(open, "no delivery waits on the open circuit").await;
    // The receiver is fixed and the endpoint resumed: its circuit starts afresh, and the
    // delivery that waited on the old one goes now, not when the 30 s are over.
    let resumed = Instant::now();
    fix_and_resume(&recv, &s, &key, id).await;
    recv.wait_until(Duration::from_secs(10), |r| {
        r.iter().any(|x| x.answered == 200 && x.event_id() == first)
    })
    .await;
    assert!(resumed.elapsed() < Duration::from_secs(10));
    let e = wait_delivered(s.addr, &key, &first, Duration::from_secs(5)).await;
    assert_eq!(
        e["attempts"], 4,
        "three failures and the success: no attempt lost"
    );
    assert_eq!(metric(&s, waiting).await, 0.0);
}

/// A lease shorter than the open circuit: the waiting delivery is handed back to the database,
/// due when the circuit was to close. A resume starts the circuit afresh, so that row is due at
/// once too, not 30 s later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_makes_what_was_handed_back_for_the_circuit_due_at_once() {
    let (recv, s, key, ep, url) = failing_endpoint_with(
        "triggers_test_resume_handed_back",
        "30",
        &["--delivery-lease-s", "2", "--delivery-timeout-ms", "1000"],
    )
    .await;
    let id = ep["id"].as_str().unwrap();
    let first = post_typed(s.addr, &key, "t").await;
    recv.wait_until(Duration::from_secs(5), |r| r.len() >= 3)
        .await;
    // The retry after the third failure can't wait 30 s under a 2 s lease: its row in the
    // database is due when the circuit closes.
    let client = db_at(&url).await;
    let handed_back = "SELECT count(*) FROM deliveries \
                       WHERE status = 0 AND next_attempt_at > now() + interval '20 seconds'";
    let one = || async { count(&client, handed_back).await == 1 };
    poll_until(
        one,
        "the delivery was not handed back to wait for the circuit",
    )
    .await;
    fix_and_resume(&recv, &s, &key, id).await;
    recv.wait_until(Duration::from_secs(10), |r| {
        r.iter().any(|x| x.answered == 200 && x.event_id() == first)
    })
    .await;
    let e = wait_delivered(s.addr, &key, &first, Duration::from_secs(5)).await;
    assert_eq!(e["attempts"], 4, "three failures and the success");
    assert_eq!(count(&client, handed_back).await, 0);
}

/// Another node's resume, in its transaction on its own connection: the endpoint locked and its
/// circuit started afresh, not committed yet (this node hears of it only at the commit's NOTIFY).
struct ResumeElsewhere(tokio_postgres::Client);

async fn resume_elsewhere(url: &str, id: &str) -> ResumeElsewhere {
    let resume = db_at(url).await;
    resume.batch_execute("BEGIN").await.unwrap();
    let endpoint = "SELECT 1 FROM endpoints WHERE id = $1::text::uuid FOR UPDATE";
    assert_eq!(resume.execute(endpoint, &[&id]).await.unwrap(), 1);
    let afresh = "UPDATE endpoints SET consecutive_failures = 0, failing_since = NULL, \
                  circuit_open_until = NULL, updated_at = now() WHERE id = $1::text::uuid";
    assert_eq!(resume.execute(afresh, &[&id]).await.unwrap(), 1);
    ResumeElsewhere(resume)
}

impl ResumeElsewhere {
    /// Commit, notifying every node of the change as a resume does.
    async fn commit(self, id: &str) {
        let notify = "SELECT pg_notify('triggers_org_changed', org_id::text) FROM endpoints \
                      WHERE id = $1::text::uuid";
        self.0.execute(notify, &[&id]).await.unwrap();
        self.0.batch_execute("COMMIT").await.unwrap();
    }
}

/// Until one session of the database waits for a lock.
async fn wait_for_a_lock(client: &tokio_postgres::Client, failed: &str) {
    wait_for_locks(client, 1, failed).await;
}

/// Until `n` sessions of the database wait for a lock.
async fn wait_for_locks(client: &tokio_postgres::Client, n: i64, failed: &str) {
    let waits = "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock'";
    let waiting = || async { count(client, waits).await == n };
    poll_until(waiting, failed).await;
}

/// Another node's resume, caught between locking its endpoint and committing, while this node
/// (which has not heard of it yet) records the failure that opens the circuit: the recorded
/// circuit stays as the resume left it (closed), and the retry goes without waiting 30 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_breaker_does_not_undo_a_resume_elsewhere() {
    // Failures at ~0, 0.1 and 1.1 s; the third would open the circuit for 30 s.
    let (recv, s, key, ep, url) = failing_endpoint_with(
        "triggers_test_resume_stale_health",
        "30",
        &["--retry-schedule", "100ms,1s,100ms"],
    )
    .await;
    let id = ep["id"].as_str().unwrap();
    let first = post_typed(s.addr, &key, "t").await;
    let client = db_at(&url).await;
    let two =
        format!("SELECT count(*) FROM endpoints WHERE id = '{id}' AND consecutive_failures = 2");
    let recorded = || async { count(&client, &two).await == 1 };
    poll_until(recorded, "the second failure was not recorded").await;
    let resume = resume_elsewhere(&url, id).await;
    // The third failure opens this node's circuit; writing that waits for the resume.
    wait_for_a_lock(
        &client,
        "the third failure's health did not wait for the resume",
    )
    .await;
    assert_eq!(recv.received().len(), 3);
    recv.set_script(|_, _| Answer::status(200));
    resume.commit(id).await;
    let health = format!(
        "SELECT count(*) FROM endpoints WHERE id = '{id}' AND circuit_open_until IS NULL \
         AND consecutive_failures = 0 AND last_failure_at IS NOT NULL"
    );
    let stays = || async { count(&client, &health).await == 1 };
    poll_until(stays, "the resume's fresh circuit was undone").await;
    recv.wait_until(Duration::from_secs(10), |r| {
        r.iter().any(|x| x.answered == 200 && x.event_id() == first)
    })
    .await;
    let e = wait_delivered(s.addr, &key, &first, Duration::from_secs(5)).await;
    assert_eq!(e["attempts"], 4, "three failures and the success");
    let r = get(s.addr, &key, &format!("/api/endpoints/{id}")).await;
    assert_eq!(r.json()["health"]["circuit"], "closed");
}

/// Another node's resume, caught between locking its endpoint and committing, while this node
/// (which hears of it only at that commit) hands a delivery back to wait for the old circuit:
/// recording the hand-back waits for the resume, sees the endpoint changed, and makes it due at
/// once, not when the old circuit was to close. Without the wait, the hand-back would be
/// written due in 30 s, unseen by the resume's own update of what waited on the circuit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_back_racing_a_resume_elsewhere_is_due_at_once() {
    // The third failure opens the circuit; the retry after it, ~2 s later, can't wait 30 s
    // under a 2 s lease, so it is handed back.
    let (recv, s, key, ep, url) = failing_endpoint_with(
        "triggers_test_resume_race",
        "30",
        &[
            "--delivery-lease-s",
            "2",
            "--delivery-timeout-ms",
            "1000",
            "--retry-schedule",
            "100ms,100ms,2s",
        ],
    )
    .await;
    let id = ep["id"].as_str().unwrap();
    let first = post_typed(s.addr, &key, "t").await;
    recv.wait_until(Duration::from_secs(5), |r| r.len() >= 3)
        .await;
    recv.set_script(|_, _| Answer::status(200));
    let client = db_at(&url).await;
    let open = format!(
        "SELECT count(*) FROM endpoints WHERE id = '{id}' AND circuit_open_until IS NOT NULL"
    );
    let recorded = || async { count(&client, &open).await == 1 };
    poll_until(recorded, "the open circuit was not recorded").await;

    // This node still goes by the open circuit: the retry is handed back, and recording that
    // waits for the resume's lock.
    let resume = resume_elsewhere(&url, id).await;
    wait_for_a_lock(&client, "the hand-back did not wait for the resume").await;
    let got = recv.received();
    assert_eq!(
        got.len(),
        3,
        "nothing is sent while open: {}",
        timeline(&got)
    );
    resume.commit(id).await;

    // Sent at once: the old circuit was to close in ~28 s.
    recv.wait_until(Duration::from_secs(10), |r| {
        r.iter().any(|x| x.answered == 200 && x.event_id() == first)
    })
    .await;
    let e = wait_delivered(s.addr, &key, &first, Duration::from_secs(5)).await;
    assert_eq!(e["attempts"], 4, "three failures and the success");
}

/// Another node's resume, caught between locking its endpoint and updating its parked
/// deliveries, while this node records a failed attempt that was in flight when the endpoint was
/// paused: the recorder writes the delivery's row and the endpoint's health, the resume the
/// endpoint and then the same row. Both take the endpoint first, so the resume's update of the
/// parked deliveries never waits for the recorder (before, the recorder held the row while it
/// waited for the endpoint: a deadlock, broken by PostgreSQL after a second by aborting one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_elsewhere_and_a_recorder_never_wait_for_each_other() {
    let (recv, s, key, ep, url) =
        failing_endpoint_with("triggers_test_resume_deadlock", "30", &[]).await;
    // The first attempt fails at once; the retry 100 ms later fails after 2 s in flight.
    recv.set_script(|_, before| Answer {
        delay: Duration::from_millis(if before == 0 { 0 } else { 2000 }),
        ..Answer::status(500)
    });
    let id = ep["id"].as_str().unwrap();
    let first = post_typed(s.addr, &key, "t").await;
    recv.wait_until(Duration::from_secs(5), |r| r.len() >= 2)
        .await;
    // Paused while the retry is in flight: its row is parked under it.
    let r = post_empty(s.addr, &key, &format!("/api/endpoints/{id}/pause")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let client = db_at(&url).await;
    let parked = format!(
        "SELECT count(*) FROM deliveries WHERE endpoint_id = '{id}' AND next_attempt_at IS NULL"
    );
    assert_eq!(
        count(&client, &parked).await,
        1,
        "the retry's row is parked"
    );
    let resume = resume_elsewhere(&url, id).await;
    let active = "UPDATE endpoints SET status = 0 WHERE id = $1::text::uuid";
    assert_eq!(resume.0.execute(active, &[&id]).await.unwrap(), 1);
    // The retry's failure is recorded meanwhile: that waits for the resume.
    wait_for_a_lock(&client, "recording the failure did not wait for the resume").await;
    // The resume's own update of the parked deliveries, as `set_paused` makes it; a wait here
    // would be a deadlock (the lock timeout is below PostgreSQL's deadlock check, 1 s).
    resume
        .0
        .batch_execute("SET LOCAL lock_timeout = '500ms'")
        .await
        .unwrap();
    let due = "UPDATE deliveries d SET next_attempt_at = now() FROM events e \
               WHERE d.endpoint_id = $1::text::uuid AND d.status = 0 \
                 AND d.next_attempt_at IS NULL AND e.id = d.event_id AND e.status <> 1";
    let made_due = resume.0.execute(due, &[&id]).await;
    assert_eq!(
        made_due.expect("the resume waited for the recorder's row lock"),
        1
    );
    recv.set_script(|_, _| Answer::status(200));
    resume.commit(id).await;
    let e = wait_delivered(s.addr, &key, &first, Duration::from_secs(10)).await;
    assert_eq!(e["status"], "delivered");
    let last = recv.received().last().map(|r| r.answered);
    assert_eq!(
        last,
        Some(200),
        "the delivery went once the endpoint was resumed"
    );
}

/// A pause or a delete (`change`) while this node records a failed attempt whose delivery and
/// endpoint it writes: the recorder is held (by a lock on the attempt log) after it has locked the
/// endpoint and the delivery's row. The change then waits for the endpoint, before it touches any
/// delivery; before, it changed the endpoint at once and waited for the delivery's row, while the
/// recorder would wait for the endpoint to write its health: a deadlock, broken by aborting one of
/// them (a 503 when the change was the one). The change's answer, the event, and the endpoint's
/// recorded failures.
async fn change_racing_a_recorder(database: &str, change: &'static str) -> (Response, Value, i64) {
    let (recv, s, key, ep, url) = failing_endpoint_with(database, "30", &[]).await;
    // The first attempt fails at once; the retry 100 ms later fails after 1 s in flight.
    recv.set_script(|_, before| Answer {
        delay: Duration::from_millis(if before == 0 { 0 } else { 1000 }),
        ..Answer::status(500)
    });
    let id = ep["id"].as_str().unwrap().to_string();
    let first = post_typed(s.addr, &key, "t").await;
    recv.wait_until(Duration::from_secs(5), |r| r.len() >= 2)
        .await;
    // The attempt log is held: recording the retry's failure stops at its COPY.
    let hold = db_at(&url).await;
    hold.batch_execute("BEGIN; LOCK TABLE delivery_attempts IN SHARE MODE")
        .await
        .unwrap();
    let client = db_at(&url).await;
    wait_for_a_lock(
        &client,
        "recording the failure did not wait for the attempt log",
    )
    .await;
    let (addr, k) = (s.addr, key.clone());
    let path = format!("/api/endpoints/{id}");
    let changed = tokio::spawn(async move {
        match change {
            "pause" => post_empty(addr, &k, &format!("{path}/pause")).await,
            _ => delete(addr, &k, &path).await,
        }
    });
    wait_for_locks(&client, 2, "the change did not wait for the recorder").await;
    let waiting = "SELECT query FROM pg_stat_activity WHERE datname = current_database() \
                   AND wait_event_type = 'Lock' AND query NOT LIKE '%delivery_attempts%'";
    let query: String = client.query_one(waiting, &[]).await.unwrap().get(0);
    assert!(
        query.contains("FROM endpoints") && query.contains("FOR UPDATE"),
        "the {change} waits for the endpoint, not for a delivery: {query}"
    );
    hold.batch_execute("COMMIT").await.unwrap();
    let r = changed.await.unwrap();
    let failures = format!("SELECT consecutive_failures FROM endpoints WHERE id = '{id}'");
    let failures: i32 = client.query_one(&failures, &[]).await.unwrap().get(0);
    let e = event_json(s.addr, &key, &first).await;
    (r, e, i64::from(failures))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_waits_for_a_recorder_at_the_endpoint_not_at_its_deliveries() {
    let (r, e, failures) = change_racing_a_recorder("triggers_test_pause_order", "pause").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "paused");
    assert_eq!(failures, 2, "both failures recorded");
    assert_eq!(e["attempts"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_waits_for_a_recorder_at_the_endpoint_not_at_its_deliveries() {
    let (r, e, failures) = change_racing_a_recorder("triggers_test_delete_order", "delete").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["deleted"], true);
    assert_eq!(failures, 2, "both failures recorded");
    assert_eq!(e["attempts"], 2);
}

/// A pause picked as a deadlock's victim is run again, within its deadline, rather than answered
/// 503: another session holds the endpoint's retrying delivery and then asks for the endpoint
/// itself while the pause, holding the endpoint, waits for that delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_picked_as_a_deadlock_victim_is_run_again() {
    let (recv, s, key, ep, url) = failing_endpoint_with(
        "triggers_test_pause_rerun",
        "30",
        &["--retry-schedule", "60s"],
    )
    .await;
    let id = ep["id"].as_str().unwrap().to_string();
    post_typed(s.addr, &key, "t").await;
    recv.wait_until(Duration::from_secs(5), |r| r.len() == 1)
        .await;
    let client = db_at(&url).await;
    let waiting = format!(
        "SELECT count(*) FROM deliveries WHERE endpoint_id = '{id}' AND next_attempt_at > now()"
    );
    let retrying = || async { count(&client, &waiting).await == 1 };
    poll_until(retrying, "the failure was not recorded").await;
    let other = db_at(&url).await;
    other
        .batch_execute(&format!(
            "BEGIN; SELECT 1 FROM deliveries WHERE endpoint_id = '{id}' FOR UPDATE"
        ))
        .await
        .unwrap();
    let (addr, k, path) = (s.addr, key.clone(), format!("/api/endpoints/{id}/pause"));
    let pause = tokio::spawn(async move { post_empty(addr, &k, &path).await });
    wait_for_a_lock(&client, "the pause did not wait for the delivery").await;
    // The cycle: PostgreSQL's check, a second after the pause began to wait, aborts the pause.
    let endpoint = format!("SELECT 1 FROM endpoints WHERE id = '{id}' FOR UPDATE");
    other.batch_execute(&endpoint).await.unwrap();
    other.batch_execute("COMMIT").await.unwrap();
    let r = pause.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "paused");
    let parked = format!(
        "SELECT count(*) FROM deliveries WHERE endpoint_id = '{id}' AND next_attempt_at IS NULL"
    );
    assert_eq!(count(&client, &parked).await, 1, "the run again parked it");
}

/// A change PostgreSQL refuses as a deadlock's victim at every run is run three times in all,
/// then answered 503 with `Retry-After`; the database is fine, so the node is not marked down
/// for it: readiness stays 200 and an event sent next is stored (a 503 there had the health flag
/// gone down).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_left_after_every_run_answers_503_and_leaves_the_node_ready() {
    let url = own_database("triggers_test_conflict_every_run").await;
    let recv = Receiver::start(|_, _| Answer::status(200)).await;
    let s = Server::start_with_db(&[PRIVATE], &url);
    let (key, _) = new_org(s.addr, "pro").await;
    let client = db_at(&url).await;
    client
        .batch_execute(
            "CREATE SEQUENCE conflicts; \
             CREATE FUNCTION always_conflicts() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
               PERFORM nextval('conflicts'); \
               RAISE EXCEPTION 'deadlock detected' USING ERRCODE = '40P01'; END $$; \
             CREATE TRIGGER always_conflicts BEFORE INSERT ON endpoints \
               FOR EACH ROW EXECUTE FUNCTION always_conflicts();",
        )
        .await
        .unwrap();
    let body = json!({"webhook_url": recv.url("/hook")});
    let r = post(s.addr, &key, "/api/webhook/config", &body).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.header("retry-after").is_some(), "{:?}", r.headers);
    let runs = "SELECT last_value FROM conflicts";
    assert_eq!(count(&client, runs).await, 3, "run three times in all");
    let ready = call(s.addr, "GET", "/health/ready", &[], None).await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    post_typed(s.addr, &key, "t").await;
    client
        .batch_execute("DROP TRIGGER always_conflicts ON endpoints")
        .await
        .unwrap();
    set_webhook(s.addr, &key, &recv.url("/hook")).await;
}

/// A node that retries once after 50 ms and never opens a circuit, on a database of its own: for
/// a test whose deliveries become due rows, which another test's node would claim and retry on its
/// own schedule.
async fn quick_retry_node(database: &str) -> Server {
    let url = own_database(database).await;
    Server::start_with_db(
        &[
            PRIVATE,
            "--retry-schedule",
            "50ms",
            "--circuit-failures",
            "1000",
        ],
        &url,
    )
}

/// Three events of type `order.a` whose deliveries fail, then a time, then two of `order.b`:
/// (the early ones, the time, the late ones), each event failed when this returns.
async fn failures_around_a_time(s: &Server, key: &str) -> (Vec<String>, String, Vec<String>) {
    let fail = |n: usize, event_type: &'static str| async move {
        let mut ids = Vec::new();
        for _ in 0..n {
            ids.push(post_typed(s.addr, key, event_type).await);
        }
        for e in &ids {
            wait_event(s.addr, key, e, Duration::from_secs(5), |v| {
                v["status"] == "failed"
            })
            .await;
        }
        ids
    };
    let early = fail(3, "order.a").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let since = now_rfc3339();
    let late = fail(2, "order.b").await;
    (early, since, late)
}

/// `POST /api/endpoints/{id}/recover` since `since`: the answer.
async fn recover_since(s: &Server, key: &str, id: &str, since: &str) -> Response {
    let path = format!("/api/endpoints/{id}/recover");
    post(s.addr, key, &path, &json!({"since": since})).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recover_resends_exactly_the_deliveries_that_failed_since_a_time() {
    let recv = Receiver::start(|_, _| Answer::status(500)).await;
    // Recovered deliveries are due rows that any node may claim.
    let s = quick_retry_node("triggers_test_recover").await;
    let (key, _) = new_org(s.addr, "pro").await;
    let ep = create_endpoint(
        s.addr,
        &key,
        json!({"url": recv.url("/x"), "event_types": ["order.*"]}),
    )
    .await;
    let id = ep["id"].as_str().unwrap().to_string();
    let (early, since, late) = failures_around_a_time(&s, &key).await;
    // The inbox shows them failed, newest first.
    let failed = get(s.addr, &key, "/api/inbox?status=failed").await.json();
    let listed: Vec<&str> = failed["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    let mut all: Vec<&str> = early.iter().chain(&late).map(|s| s.as_str()).collect();
    all.reverse();
    assert_eq!(listed, all);
    recv.set_script(|_, _| Answer::status(200));
    let r = recover_since(&s, &key, &id, &since).await;
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json(), json!({"queued": 2}));
    for e in &late {
        let v = wait_event(s.addr, &key, e, Duration::from_secs(5), |v| {
            v["status"] == "delivered"
        })
        .await;
        assert_eq!(v["attempts"], 3);
        assert_eq!(
            recv.for_event(e)
                .last()
                .unwrap()
                .header("x-delivery-attempt"),
            Some("3")
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for e in &early {
        assert_eq!(event_json(s.addr, &key, e).await["status"], "failed");
        assert_eq!(recv.for_event(e).len(), 2, "not resent");
    }
    // Bad bodies and another organization's endpoint.
    let path = format!("/api/endpoints/{id}/recover");
    for body in [
        json!({}),
        json!({"since": "yesterday"}),
        json!({"since": 5}),
    ] {
        let r = post(s.addr, &key, &path, &body).await;
        assert_eq!(r.status, 422, "{body}");
        assert_eq!(r.json()["field"], "since");
    }
    let (other, _) = new_org(s.addr, "pro").await;
    let r = post(s.addr, &other, &path, &json!({"since": since})).await;
    assert_eq!(r.status, 404);
}

/// `GET /api/endpoints/{id}/failed` lists the endpoint's failed deliveries (of events not
/// acknowledged), the latest failure first, each with its attempts and its last attempt from the
/// log; `since` picks what `recover` with the same `since` would start again; pages walk every
/// one exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoints_failed_deliveries_are_listed_as_recover_would_take_them() {
    let recv = Receiver::start(|_, _| Answer {
        raw: Some(b"HTTP/1.1 500 Oops\r\nContent-Length: 13\r\n\r\nupstream down".to_vec()),
        ..Answer::status(500)
    })
    .await;
    let s = quick_retry_node("triggers_test_failed_list").await;
    let (key, _) = new_org(s.addr, "pro").await;
    let ep = create_endpoint(s.addr, &key, json!({"url": recv.url("/x")})).await;
    let id = ep["id"].as_str().unwrap().to_string();
    let path = format!("/api/endpoints/{id}/failed");
    let (early, since, late) = failures_around_a_time(&s, &key).await;
    let listed = |page: &Value| -> Vec<String> {
        page["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["event_id"].as_str().unwrap().to_string())
            .collect()
    };
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };

    // Since a time: the late ones, with their attempts and the last one's answer.
    let page = get(s.addr, &key, &format!("{path}?since={since}")).await;
    assert_eq!(page.status, 200, "{}", page.text());
    let page = page.json();
    assert_eq!(sorted(listed(&page)), sorted(late.clone()));
    assert_eq!(page["next_cursor"], Value::Null);
    let d = &page["deliveries"][0];
    assert_eq!(d["type"], "order.b");
    assert_eq!(d["attempts"], 2, "the first attempt and the one retry");
    assert_eq!(d["last_attempt"]["attempt"], 2);
    assert_eq!(d["last_attempt"]["response_status"], 500);
    assert_eq!(d["last_attempt"]["response_body"], "upstream down");
    assert_eq!(d["last_attempt"]["endpoint_id"], id.as_str());
    let times: Vec<&str> = page["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["failed_at"].as_str().unwrap())
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] >= w[1]),
        "latest first: {times:?}"
    );
    // An offset's `+` sent unescaped reads as the space it decodes to, and still counts.
    let plus = since.replace('Z', "+00:00");
    let page = get(s.addr, &key, &format!("{path}?since={plus}")).await;
    assert_eq!(
        sorted(listed(&page.json())),
        sorted(late.clone()),
        "{}",
        page.text()
    );

    // Every one, two a page: each exactly once.
    let (mut seen, mut cursor) = (Vec::new(), String::new());
    loop {
        let page = get(s.addr, &key, &format!("{path}?limit=2&cursor={cursor}"))
            .await
            .json();
        seen.extend(listed(&page));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = c.to_string(),
            None => break,
        }
    }
    assert_eq!(seen.len(), 5, "{seen:?}");
    assert_eq!(
        sorted(seen),
        sorted(early.iter().chain(&late).cloned().collect())
    );

    // An acknowledged event is not sent again: its failed delivery leaves the list, and a
    // recover leaves it alone.
    let acked = post_empty(s.addr, &key, &format!("/api/ack/{}", late[0])).await;
    assert_eq!(acked.status, 200, "{}", acked.text());
    let page = get(s.addr, &key, &format!("{path}?since={since}"))
        .await
        .json();
    assert_eq!(listed(&page), [late[1].clone()]);

    // After a recover since that time, only the early ones are left failed.
    recv.set_script(|_, _| Answer::status(200));
    let r = recover_since(&s, &key, &id, &since).await;
    assert_eq!(r.json(), json!({"queued": 1}));
    wait_delivered(s.addr, &key, &late[1], Duration::from_secs(5)).await;
    let page = get(s.addr, &key, &path).await.json();
    assert_eq!(sorted(listed(&page)), sorted(early.clone()));
    let page = get(s.addr, &key, &format!("{path}?since={since}"))
        .await
        .json();
    assert_eq!(page["deliveries"], json!([]));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        recv.for_event(&late[0]).len(),
        2,
        "the acknowledged one not sent again"
    );

    // Bad parameters name themselves; another organization's endpoint is not found.
    let inbox = get(s.addr, &key, "/api/inbox?status=failed&limit=1").await;
    let inbox_cursor = inbox.json()["next_cursor"].as_str().unwrap().to_string();
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("since=yesterday", "since"),
        ("cursor=abc", "cursor"),
        (&format!("cursor={inbox_cursor}") as &str, "cursor"),
        // A well-formed cursor of a time no page can hold (the year 292,277).
        ("cursor=f_________8BI0VniavN7wEjRWeJq83v", "cursor"),
        ("cursor=gAAAAAAAAAABI0VniavN7wEjRWeJq83v", "cursor"),
    ] {
        let r = get(s.addr, &key, &format!("{path}?{query}")).await;
        assert_eq!(r.status, 422, "{query}: {}", r.text());
        assert_eq!(r.json()["field"], field, "{query}");
    }
    let (other, _) = new_org(s.addr, "pro").await;
    assert_eq!(get(s.addr, &other, &path).await.status, 404);
    let r = get(s.addr, &key, "/api/endpoints/not-a-uuid/failed").await;
    assert_eq!(r.status, 422);
}

/// The failed inbox walks past an acknowledged event whose delivery failed: every failed event
/// is on some page (the walk took the window the acknowledged one left short for the end).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_failed_inbox_pages_past_an_acknowledged_event() {
    let recv = Receiver::start(|_, _| Answer::status(500)).await;
    let s = quick_retry_node("triggers_test_failed_inbox_acked").await;
    let (key, _) = new_org(s.addr, "pro").await;
    create_endpoint(s.addr, &key, json!({"url": recv.url("/x")})).await;
    let (early, _, late) = failures_around_a_time(&s, &key).await;
    // The newest is acknowledged: it is delivered as far as the inbox goes.
    let acked = post_empty(s.addr, &key, &format!("/api/ack/{}", late[1])).await;
    assert_eq!(acked.status, 200);
    let (mut seen, mut cursor) = (Vec::new(), String::new());
    for _ in 0..10 {
        let page = get(
            s.addr,
            &key,
            &format!("/api/inbox?status=failed&limit=1&cursor={cursor}"),
        )
        .await
        .json();
        for e in page["events"].as_array().unwrap() {
            seen.push(e["id"].as_str().unwrap().to_string());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = c.to_string(),
            None => break,
        }
    }
    let mut want: Vec<String> = early.iter().chain(&late[..1]).cloned().collect();
    want.reverse();
    assert_eq!(seen, want, "every failed event, newest first, once");
}

fn now_rfc3339() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let secs = now.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (Howard Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_micros()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_endpoint_gets_its_whole_backlog_after_resume() {
    let recv = Receiver::start(|_, _| Answer::status(200)).await;
    let s = Server::start(&[PRIVATE]);
    let (key, _) = new_org(s.addr, "pro").await;
    let paused = create_endpoint(s.addr, &key, json!({"url": recv.url("/p")})).await;
    create_endpoint(s.addr, &key, json!({"url": recv.url("/q")})).await;
    let pid = paused["id"].as_str().unwrap();
    let r = post_empty(s.addr, &key, &format!("/api/endpoints/{pid}/pause")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "paused");
    let ids = create_events(s.addr, &key, 20, "t").await;
    // The other endpoint is not held up; the paused one gets nothing, and no attempt is spent.
    recv.wait_until(Duration::from_secs(5), |r| ids_at(r, "/q").len() == 20)
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(ids_at(&recv.received(), "/p").is_empty());
    let e = event_json(s.addr, &key, &ids[0]).await;
    assert_eq!(e["status"], "pending", "pending while one endpoint waits");
    assert_eq!(e["attempts"], 1);
    let waiting = e["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["endpoint_id"] == paused["id"])
        .unwrap()
        .clone();
    assert_eq!(waiting["status"], "pending");
    assert_eq!(waiting["attempts"], 0);
    let r = post_empty(s.addr, &key, &format!("/api/endpoints/{pid}/resume")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "active");
    let got = recv
        .wait_until(Duration::from_secs(10), |r| ids_at(r, "/p").len() == 20)
        .await;
    assert_eq!(ids_at(&got, "/p"), ids.iter().cloned().collect());
    for id in &ids {
        wait_delivered(s.addr, &key, id, Duration::from_secs(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_larger_than_an_endpoints_bound_is_claimed_as_room_frees_not_per_poll() {
    // The node holds at most 16 deliveries in memory, an endpoint 2 × 4 = 8 (claimed rows are
    // taken whatever the endpoint holds), and the claimer's poll is a minute away. A backlog of
    // 60 must still be delivered at the receiver's pace: the claimer is woken when there is room
    // again (in the node, for an endpoint it had to leave out), not at the next poll.
    // A database of its own: due rows other tests left for receivers long gone would fill the
    // 16 places first.
    let url = own_database("triggers_test_claim_wake").await;
    let recv = Receiver::start(|_, _| Answer::status(200)).await;
    let s = Server::start_with_db(
        &[
            PRIVATE,
            "--delivery-queue-max",
            "16",
            "--delivery-endpoint-concurrency",
            "2",
            "--delivery-poll-ms",
            "60000",
        ],
        &url,
    );
    let (key, _) = new_org(s.addr, "pro").await;
    let paused = create_endpoint(s.addr, &key, json!({"url": recv.url("/p")})).await;
    let pid = paused["id"].as_str().unwrap();
    let r = post_empty(s.addr, &key, &format!("/api/endpoints/{pid}/pause")).await;
    assert_eq!(r.status, 200);
    let ids = create_events(s.addr, &key, 60, "t").await;
    let r = post_empty(s.addr, &key, &format!("/api/endpoints/{pid}/resume")).await;
    assert_eq!(r.status, 200);
    let got = recv
        .wait_until(Duration::from_secs(20), |r| ids_at(r, "/p").len() == 60)
        .await;
    assert_eq!(ids_at(&got, "/p"), ids.iter().cloned().collect());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_endpoint_spreads_its_deliveries_and_fails_none() {
    let recv = Receiver::start(|_, _| Answer::status(200)).await;
    let s = Server::start(&[PRIVATE]);
    let (key, _) = new_org(s.addr, "pro").await;
    create_endpoint(
        s.addr,
        &key,
        json!({"url": recv.url("/slow"), "rate_limit_per_second": 5}),
    )
    .await;
    create_endpoint(s.addr, &key, json!({"url": recv.url("/free")})).await;
    let started = Instant::now();
    let ids = create_events(s.addr, &key, 15, "t").await;
    let got = recv
        .wait_until(Duration::from_secs(10), |r| ids_at(r, "/slow").len() == 15)
        .await;
    // Five at once (a second's worth), then five a second: the last is ~2 s after the first.
    let slow: Vec<&Received> = got.iter().filter(|r| r.path == "/slow").collect();
    let spread = slow.last().unwrap().at - slow[0].at;
    assert!(spread >= Duration::from_millis(1700), "{spread:?}");
    // The unlimited endpoint got everything at once.
    let free_done = got
        .iter()
        .filter(|r| r.path == "/free")
        .map(|r| r.at)
        .max()
        .unwrap();
    assert!(free_done - started < Duration::from_millis(1500));
    assert!(got.iter().all(|r| r.answered == 200));
    for id in &ids {
        let e = wait_delivered(s.addr, &key, id, Duration::from_secs(5)).await;
        assert_eq!(e["attempts"], 2, "one attempt per endpoint, none failed");
    }
    // Each delivery waited at most once for the node's first report (a fresh view of the bucket
    // is empty until then; usually only the first few find it so, all fifteen on a loaded box) and
    // the ten beyond the first second once for a turn of their own: 25 at most, 11 or 12 here.
    // None woke at another's turn to wait again (55 waits; each such wake was a database read).
    let waits = metric(&s, "triggers_delivery_waits_total{reason=\"rate_limited\"}").await;
    assert!(
        (5.0..=25.0).contains(&waits),
        "{waits} waits for the rate limit"
    );
}

/// A node on database `db` and an organization with one endpoint limited to `rate` a second,
/// to a receiver answering 200: the receiver, the node, the key, the database's URL.
async fn rate_limited_node(db: &str, rate: u32) -> (Receiver, Server, String, String) {
    let recv = Receiver::start(|_, _| Answer::status(200)).await;
    let url = own_database(db).await;
    let s = Server::start_with_db(&[PRIVATE], &url);
    let (key, _) = new_org(s.addr, "pro").await;
    let body = json!({"url": recv.url("/"), "rate_limit_per_second": rate});
    create_endpoint(s.addr, &key, body).await;
    (recv, s, key, url)
}

/// A delivery that finds its node's view of an endpoint's bucket fresh waits once for the node's
/// first report, however long the database takes to answer it: the answer wakes it. (Woken every
/// report interval instead, three deliveries waited 19 times over 600 ms.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_first_report_costs_each_delivery_one_wait() {
    let (recv, s, key, url) = rate_limited_node("triggers_test_slow_first_report", 5).await;
    // The budget report waits for this lock: the node hears nothing for 600 ms.
    let hold = db_at(&url).await;
    hold.batch_execute("BEGIN; LOCK TABLE endpoint_budgets IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    create_events(s.addr, &key, 3, "t").await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(recv.received().len(), 0, "none went before the report");
    hold.batch_execute("COMMIT").await.unwrap();
    recv.wait_until(Duration::from_secs(10), |r| r.len() >= 3)
        .await;
    // The bucket starts full (5): each of the three waited for the report only.
    let waits = metric(&s, "triggers_delivery_waits_total{reason=\"rate_limited\"}").await;
    assert!(
        (1.0..=4.0).contains(&waits),
        "{waits} waits for the rate limit"
    );
}

/// Two nodes on database `db`, each holding at most 10 deliveries (so both take part), and a
/// backlog of `events` deliveries to one endpoint limited to `rate` a second: posted while it is
/// paused, due on both nodes at once when it resumes. The receiver, the nodes, the events' ids.
async fn two_nodes_on_a_backlog(
    db: &str,
    rate: u32,
    events: usize,
) -> (Receiver, Server, Server, Vec<String>) {
    let recv = Receiver::start(|_, _| Answer::status(200)).await;
    let url = own_database(db).await;
    let args = [PRIVATE, "--delivery-queue-max", "10"];
    let a = Server::start_with_db(&args, &url);
    let b = Server::start_with_db(&args, &url);
    let (key, _) = new_org(a.addr, "pro").await;
    let body = json!({"url": recv.url("/"), "rate_limit_per_second": rate});
    let ep = create_endpoint(a.addr, &key, body).await;
    let path = format!("/api/endpoints/{}", ep["id"].as_str().unwrap());
    let pause = post_empty(a.addr, &key, &format!("{path}/pause")).await;
    assert_eq!(pause.status, 200);
    let ids = create_events(a.addr, &key, events, "t").await;
    let resume = post_empty(a.addr, &key, &format!("{path}/resume")).await;
    assert_eq!(resume.status, 200);
    (recv, a, b, ids)
}

/// Wait (up to 10 s) until what `recv` got spans `span` from its first request; all it got.
async fn received_spanning(recv: &Receiver, span: Duration) -> Vec<Received> {
    recv.wait_until(Duration::from_secs(10), |r| {
        r.last()
            .zip(r.first())
            .is_some_and(|(l, f)| l.at - f.at >= span)
    })
    .await
}

/// How many of `got` came within `window` after the first.
fn count_within(got: &[Received], window: std::ops::Range<Duration>) -> usize {
    let first = got[0].at;
    got.iter()
        .filter(|r| window.contains(&(r.at - first)))
        .count()
}

/// Both nodes delivered some of the backlog.
async fn assert_both_sent(a: &Server, b: &Server) {
    const DELIVERED: &str = "triggers_deliveries_total{outcome=\"delivered\"}";
    let (by_a, by_b) = (metric(a, DELIVERED).await, metric(b, DELIVERED).await);
    assert!(
        by_a > 0.0 && by_b > 0.0,
        "both nodes sent: {by_a} and {by_b}"
    );
}

/// An endpoint's rate limit is the cluster's: two nodes draining its backlog together send it
/// its limit, not the limit once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_draining_one_endpoints_backlog_keep_its_limit_together() {
    // A backlog of forty; the resume makes them due on both nodes.
    let (recv, a, b, ids) = two_nodes_on_a_backlog("triggers_test_endpoint_budget", 5, 40).await;
    let got = recv
        .wait_until(Duration::from_secs(30), |r| r.len() >= ids.len())
        .await;
    // The bucket's 5 at once, then five a second together: ~7 s (5.3 s on a loaded CI box before
    // migration 0012, when each node's first view was full). A bucket per node would take ~3 s
    // (ten a second).
    let spread = got[ids.len() - 1].at - got[0].at;
    assert!(spread >= Duration::from_millis(4500), "{spread:?}");
    assert_eq!(got.len(), ids.len(), "none twice");
    assert_both_sent(&a, &b).await;
}

/// Two nodes that start on an endpoint's backlog together keep its limit: each reserves turns for
/// the deliveries it holds at its part of the rate, from its part of the cluster's balance (turns
/// reserved at the whole rate, against a full view of its own, were each node's to send on top).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_starting_on_a_backlog_reserve_turns_only_against_the_clusters_bucket() {
    // Each node holds at most 10 deliveries: 8 more than the bucket's 2 tokens.
    let (recv, a, b, _) =
        two_nodes_on_a_backlog("triggers_test_endpoint_budget_start", 2, 40).await;
    let got = received_spanning(&recv, Duration::from_millis(4500)).await;
    // The bucket's 2 at once, then 2 a second together (each node 1 a second): ~6 in the 3 s
    // from 1.5 s on (6 in every run here), a few more where a report was slow. With turns
    // reserved at the whole rate against each node's own view, each node went on at 2 a second
    // until all 10 it held were sent: ~12.
    let steady = count_within(
        &got,
        Duration::from_millis(1500)..Duration::from_millis(4500),
    );
    assert!(
        (4..=9).contains(&steady),
        "{steady} from 1.5 s to 4.5 s: {}",
        timeline(&got)
    );
    assert_both_sent(&a, &b).await;
}

/// Two nodes that come to an endpoint's full bucket at the same moment send it, together, what
/// the bucket allows: its second's worth at once and then its rate, not a second's worth each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_coming_to_a_full_bucket_together_share_it() {
    let (recv, a, b, _) =
        two_nodes_on_a_backlog("triggers_test_endpoint_budget_share", 5, 40).await;
    let got = received_spanning(&recv, Duration::from_millis(2500)).await;
    // In the first second: the bucket's 5 and a second's refill, 5: 10 at most (9 in every run
    // here), one more where a node's view refilled before its report told it the other's part.
    // With a full first view on each node: 5 at once from each, the second node's when it
    // first held deliveries, on top of the refill (14 in every run here).
    let early = count_within(&got, Duration::ZERO..Duration::from_secs(1));
    assert!(
        (5..=11).contains(&early),
        "{early} in the first second: {}",
        timeline(&got)
    );
    assert_both_sent(&a, &b).await;
}

/// When one of two nodes sharing an endpoint's limit goes, the other one's part grows back to the
/// whole limit within a second or so: the turns it had reserved at half of it are given back and
/// taken anew at the whole rate, not left to play out at half of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_a_node_goes_the_other_takes_the_whole_limit_again() {
    let (recv, a, mut b, _) =
        two_nodes_on_a_backlog("triggers_test_endpoint_budget_repace", 4, 80).await;
    // Both at work (each at 2 a second), then the second node stops (its deliveries go back to
    // the database; the first claims them as it has room).
    recv.wait_until(Duration::from_secs(10), |r| r.len() >= 10)
        .await;
    assert_both_sent(&a, &b).await;
    tokio::task::block_in_place(|| b.stop());
    let stopped = Instant::now();
    let got = recv
        .wait_until(Duration::from_secs(10), |r| {
            r.last()
                .is_some_and(|l| l.at >= stopped + Duration::from_millis(4000))
        })
        .await;
    // A second after its last report the second node no longer counts, and the first one's
    // 10 turns paced at 2 a second are re-paced at 4: ~8 in the 2 s from 2 s on. Left to play
    // out, they would give ~4.
    let window = stopped + Duration::from_millis(2000)..stopped + Duration::from_millis(4000);
    let late = got.iter().filter(|r| window.contains(&r.at)).count();
    assert!(
        (6..=11).contains(&late),
        "{late} from 2 s to 4 s after the stop: {}",
        timeline(&got)
    );
}

/// A node's part of an endpoint's rate follows the deliveries it would send now: retries it holds
/// for a later time ask for none of it, so they don't hold back the turns of a node draining a
/// backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_waiting_for_their_time_take_no_part_of_an_endpoints_limit() {
    // Events of type `r` fail and wait a minute for their retry; the others are delivered.
    let recv =
        Receiver::start(|r, _| Answer::status(if r.json()["type"] == "r" { 500 } else { 200 }))
            .await;
    let url = own_database("triggers_test_endpoint_budget_wants").await;
    let args = [
        PRIVATE,
        "--delivery-queue-max",
        "8",
        "--retry-schedule",
        "60s",
    ];
    let a = Server::start_with_db(&args, &url);
    let (key, _) = new_org(a.addr, "pro").await;
    let body = json!({"url": recv.url("/"), "rate_limit_per_second": 10});
    let ep = create_endpoint(a.addr, &key, body).await;
    // The first node attempts 8 and holds their retries: all it may hold for the endpoint (and
    // fewer failures than open its circuit).
    create_events(a.addr, &key, 8, "r").await;
    recv.wait_until(Duration::from_secs(10), |r| r.len() >= 8)
        .await;
    // The second node drains a backlog of 40, holding 8 of them at a time until the last 8.
    let b = Server::start_with_db(&args, &url);
    create_events(b.addr, &key, 40, "t").await;
    let delivered = |got: &[Received]| -> Vec<Instant> {
        got.iter()
            .filter(|r| r.json()["type"] == "t")
            .map(|r| r.at)
            .collect()
    };
    let spans = |span: Duration| {
        move |r: &[Received]| {
            let t = delivered(r);
            t.last()
                .zip(t.first())
                .is_some_and(|(l, f)| *l - *f >= span)
        }
    };
    recv.wait_until(Duration::from_secs(10), spans(Duration::from_millis(1500)))
        .await;
    // What each node asked of the bucket in its last report: the second node the 8 it holds (7
    // while one is being let go), the first none (counted as 1), so the second's part is 7/8 to
    // 8/9 of the rate. With the retries counted, the first asked 8 as well, and the second's
    // part was about half the rate, which its turns were paced at.
    let client = db_at(&url).await;
    let id = ep["id"].as_str().unwrap();
    let row = client
        .query_one(
            "SELECT nodes::text FROM endpoint_budgets WHERE endpoint_id = $1::text::uuid",
            &[&id],
        )
        .await
        .unwrap();
    let nodes: Value = serde_json::from_str(row.get(0)).unwrap();
    let mut asked: Vec<(f64, f64)> = nodes
        .as_object()
        .unwrap()
        .values()
        .map(|v| (v[3].as_f64().unwrap(), v[2].as_f64().unwrap()))
        .collect();
    asked.sort_by(|x, y| x.partial_cmp(y).unwrap());
    assert_eq!(asked.len(), 2, "both nodes count: {nodes}");
    assert_eq!(asked[0].0, 1.0, "the node holding only retries: {nodes}");
    assert!(asked[1].0 >= 5.0, "the node with a backlog: {nodes}");
    assert!(asked[1].1 >= 8.0, "its part of the 10 a second: {nodes}");
    // And the two together keep the limit.
    let got = recv
        .wait_until(Duration::from_secs(10), spans(Duration::from_millis(3500)))
        .await;
    let t = delivered(&got);
    let window = t[0] + Duration::from_millis(1500)..t[0] + Duration::from_millis(3500);
    let steady = t.iter().filter(|at| window.contains(*at)).count();
    assert!(
        (14..=22).contains(&steady),
        "{steady} from 1.5 s to 3.5 s: {}",
        timeline(&got)
    );
    const RETRIES: &str = "triggers_deliveries_total{outcome=\"retry\"}";
    let held = metric(&a, RETRIES).await;
    assert_eq!(held, 8.0, "the first node held the retries");
    assert_eq!(metric(&b, RETRIES).await, 0.0);
}

/// The cluster's bucket as the budget report hands it out (migration 0012): a node's part of the
/// rate and of a positive balance is in proportion to what it wants, and its view never holds
/// what another node was promised; a debt is shared the same way; a node not heard from for a
/// second no longer counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_report_gives_each_node_its_part_of_an_endpoints_bucket() {
    let _s = Server::start(&[]);
    let client = db().await;
    let prefix = v7_prefix_now();
    let (ep, org) = (
        format!("{prefix}-7000-8000-0000000000e1"),
        format!("{prefix}-7000-8000-0000000000e2"),
    );
    let (a, b) = (
        "00000000-0000-7000-8000-00000000000a",
        "00000000-0000-7000-8000-00000000000b",
    );
    // Endpoint `ep` at 10 a second: node `node` spent `spent` and holds `wants` deliveries;
    // its view and its part of the rate.
    let report = |node: &'static str, spent: i32, wants: i32| {
        let (client, ep, org) = (&client, &ep, &org);
        async move {
            let row = client
                .query_one(
                    "SELECT view_tokens, part FROM triggers_endpoint_budget_report(\
                     $1::text::uuid, ARRAY[$2::text::uuid], ARRAY[$3::text::uuid], \
                     ARRAY[10], ARRAY[$4::int4], ARRAY[$5::int4])",
                    &[&node, ep, org, &spent, &wants],
                )
                .await
                .unwrap();
            (row.get::<_, f64>(0), row.get::<_, f64>(1))
        }
    };
    // (Each step a few ms after the last; the bounds allow up to 300 ms, 3 tokens of refill.)
    assert_eq!(report(a, 0, 40).await, (10.0, 10.0), "alone: all of it");
    let (view, part) = report(b, 0, 40).await;
    assert_eq!(part, 5.0, "both want a second's worth or more: half each");
    assert!(
        view < 3.0,
        "{view}: all of it was promised to the first node"
    );
    let (view, part) = report(a, 10, 40).await;
    assert_eq!(part, 5.0);
    assert!((0.0..3.0).contains(&view), "{view}: spent");
    let (view, part) = report(b, 6, 40).await;
    assert_eq!(part, 5.0);
    assert!((-3.0..=-1.5).contains(&view), "{view}: half of a debt of 6");
    let (view, part) = report(b, 0, 2).await;
    assert!((part - 10.0 / 6.0).abs() < 1e-9, "{part}: it wants 2 of 12");
    assert!((-1.0..=0.0).contains(&view), "{view}: a sixth of the debt");
    // A second later the second node is no longer counted: the first one's view is all of it.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (view, part) = report(a, 0, 40).await;
    assert_eq!(part, 10.0);
    assert!((4.5..=10.0).contains(&view), "{view}: -6 and 1.1 s at 10");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_or_failing_endpoint_never_delays_another_of_the_same_organization() {
    let recv = Receiver::start(|r, _| match r.path.as_str() {
        "/slow" => Answer {
            delay: Duration::from_secs(20),
            ..Answer::status(200)
        },
        "/failing" => Answer::status(503),
        _ => Answer::status(200),
    })
    .await;
    // Its own database: the deliveries that don't fit in memory wait as due rows, which any
    // node may claim, and the other tests' servers would (each with its own slots).
    let url = own_database("triggers_test_isolation").await;
    let s = Server::start_with_db(&[PRIVATE, "--delivery-endpoint-concurrency", "4"], &url);
    let (key, _) = new_org(s.addr, "pro").await;
    for path in ["/slow", "/failing", "/fast"] {
        create_endpoint(s.addr, &key, json!({"url": recv.url(path)})).await;
    }
    // The slow endpoint holds each of its 4 slots for 20 s, the failing one answers 503 (retried
    // later): the fast one still gets all 40 well within the 20 s a wait for a slow slot would
    // take. (Not a fixed second: on a loaded box creating 40 events alone may take more.)
    let ids = create_events(s.addr, &key, 40, "t").await;
    let got = recv
        .wait_until(Duration::from_secs(15), |r| ids_at(r, "/fast").len() == 40)
        .await;
    assert_eq!(ids_at(&got, "/fast").len(), 40, "the fast endpoint waited");
    assert!(
        ids_at(&recv.received(), "/slow").len() <= 4,
        "the slow endpoint holds only its own share"
    );
    drop(ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operational_events_reach_subscribers_and_are_never_about_themselves() {
    let recv = Receiver::start(|_, _| Answer::status(500)).await;
    // An operational event's deliveries are due rows that any node may claim.
    let s = quick_retry_node("triggers_test_operational").await;
    let (key, _) = new_org(s.addr, "pro").await;
    let failing = create_endpoint(s.addr, &key, json!({"url": recv.url("/all")})).await;
    let watcher = create_endpoint(
        s.addr,
        &key,
        json!({"url": recv.url("/ops"), "event_types": ["triggers.*"]}),
    )
    .await;
    let id = post_typed(s.addr, &key, "order.paid").await;
    // The event fails at /all; a triggers.delivery.failed event goes to /ops (which fails too,
    // and makes no event about that).
    let got = recv
        .wait_until(Duration::from_secs(5), |r| {
            r.iter().filter(|x| x.path == "/ops").count() >= 2
        })
        .await;
    let ops: Vec<&Received> = got.iter().filter(|r| r.path == "/ops").collect();
    let body = ops[0].json();
    assert_eq!(body["type"], "triggers.delivery.failed");
    assert_eq!(
        ops[0].header("x-event-type"),
        Some("triggers.delivery.failed")
    );
    assert_eq!(body["data"]["endpoint_id"], failing["id"]);
    assert_eq!(body["data"]["event_id"], id.as_str());
    assert!(body["data"]["reason"].as_str().unwrap().contains("500"));
    verify_standard_webhook(watcher["signing_secret"].as_str().unwrap(), ops[0]);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let all = recv.received();
    assert!(
        all.iter()
            .filter(|r| r.path == "/all")
            .all(|r| r.event_id() == id),
        "`*` never takes an operational event"
    );
    assert!(all
        .iter()
        .filter(|r| r.path == "/ops")
        .all(|r| r.json()["type"] == "triggers.delivery.failed"
            && r.json()["data"]["event_id"] == id.as_str()));
    // The organization holds the event and one operational event: none about the failed
    // delivery of the operational event itself.
    let failed = get(s.addr, &key, "/api/inbox?status=failed").await.json();
    let types: Vec<&str> = failed["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["triggers.delivery.failed", "order.paid"]);
    // Clients can't send operational types.
    let r = post_event(s.addr, &key, "triggers.delivery.failed", json!({}), None).await;
    assert_eq!(r.status, 422);
    assert_eq!(r.json()["field"], "type");
}

/// The `triggers.endpoint.disabled` events in the organization's inbox.
async fn disabled_events(addr: std::net::SocketAddr, key: &str) -> Vec<Value> {
    let inbox = get(addr, key, "/api/inbox?limit=1000").await.json();
    inbox["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "triggers.endpoint.disabled")
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_failing_for_too_long_is_disabled_and_keeps_its_deliveries() {
    let recv = Receiver::start(|_, _| Answer::status(500)).await;
    let s = Server::start(&[
        PRIVATE,
        "--endpoint-disable-after-s",
        "1",
        "--circuit-failures",
        "1000",
        "--retry-schedule",
        "300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms",
    ]);
    let (key, _) = new_org(s.addr, "pro").await;
    let ep = create_endpoint(s.addr, &key, json!({"url": recv.url("/x")})).await;
    let path = format!("/api/endpoints/{}", ep["id"].as_str().unwrap());
    let id = post_typed(s.addr, &key, "t").await;
    let deadline = Instant::now() + Duration::from_secs(6);
    loop {
        let e = get(s.addr, &key, &path).await.json();
        if e["status"] == "disabled" {
            break;
        }
        assert!(Instant::now() < deadline, "never disabled: {e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let attempts = recv.received().len();
    assert!((4..=6).contains(&attempts), "{attempts}");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        recv.received().len(),
        attempts,
        "nothing is sent once disabled"
    );
    let e = event_json(s.addr, &key, &id).await;
    assert_eq!(e["status"], "pending");
    let disabled = disabled_events(s.addr, &key).await;
    assert_eq!(disabled.len(), 1);
    assert_eq!(disabled[0]["payload"]["endpoint_id"], ep["id"]);
    // Resumed, it delivers what waited.
    recv.set_script(|_, _| Answer::status(200));
    let r = post_empty(s.addr, &key, &format!("{path}/resume")).await;
    assert_eq!(r.json()["status"], "active");
    assert_eq!(r.json()["health"]["consecutive_failures"], 0);
    wait_delivered(s.addr, &key, &id, Duration::from_secs(5)).await;
}

/// A redelivery asked for while the first attempt is in flight under a batch's lease gives the
/// delivery a row of its own (here parked: the endpoint was paused meanwhile). That attempt's
/// success is then not this node's to record: it is not logged, so the parked row's count of
/// attempts and the log agree, and the resume delivers the event again. Its own database: no
/// other test's node takes the row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_during_a_first_attempt_takes_the_delivery_over() {
    redelivery_during_a_first_attempt("triggers_test_redeliver_in_flight", false).await;
}

/// The same for a first attempt claimed from the database (a backlog: the endpoint was paused
/// when the event came), leased by a claim's batch row that names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_during_a_claimed_first_attempt_takes_the_delivery_over() {
    redelivery_during_a_first_attempt("triggers_test_redeliver_claimed", true).await;
}

async fn redelivery_during_a_first_attempt(database: &str, claimed: bool) {
    let url = own_database(database).await;
    let recv = Receiver::start(|_, _| Answer {
        delay: Duration::from_millis(1000),
        ..Answer::status(200)
    })
    .await;
    let s = Server::start_with_db(&[PRIVATE], &url);
    let (key, _) = new_org(s.addr, "pro").await;
    let ep = create_endpoint(s.addr, &key, json!({"url": recv.url("/")})).await;
    let ep = ep["id"].as_str().unwrap();
    let pause = format!("/api/endpoints/{ep}/pause");
    let resume = format!("/api/endpoints/{ep}/resume");
    if claimed {
        assert_eq!(post_empty(s.addr, &key, &pause).await.status, 200);
    }
    let id = post_typed(s.addr, &key, "t").await;
    if claimed {
        assert_eq!(post_empty(s.addr, &key, &resume).await.status, 200);
    }
    recv.wait_until(Duration::from_secs(5), |r| r.len() == 1)
        .await;
    assert_eq!(post_empty(s.addr, &key, &pause).await.status, 200);
    let r = post_empty(s.addr, &key, &format!("/api/events/{id}/redeliver")).await;
    assert_eq!(r.status, 202, "{}", r.text());
    // The first attempt is answered 200 and its outcome recorded: not logged.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let e = get(s.addr, &key, &format!("/api/events/{id}")).await.json();
    assert_eq!(e["status"], "pending", "{e}");
    assert_eq!(e["attempts"], 0, "{e}");
    assert_eq!(e["delivery_attempts"].as_array().unwrap().len(), 0, "{e}");
    assert_eq!(post_empty(s.addr, &key, &resume).await.status, 200);
    let e = wait_delivered(s.addr, &key, &id, Duration::from_secs(10)).await;
    assert_eq!(e["attempts"], 1, "{e}");
    assert_eq!(e["delivery_attempts"].as_array().unwrap().len(), 1, "{e}");
    assert_eq!(recv.received().len(), 2);
}

/// A retry in flight when its endpoint is paused and then resumed keeps its lease through both:
/// it is not sent again beside itself, and its outcome is logged. (The pause parks its row; the
/// resume made it due at once, so a claim sent it a second time while the first was still
/// waiting for its answer, under the same `X-Delivery-Attempt`, and the first went unlogged.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_during_a_retry_in_flight_does_not_send_it_again() {
    resume_during_a_retry_in_flight("triggers_test_resume_retry_in_flight", "resume").await;
}

/// The same for a redelivery asked for while the retry is in flight and its row parked (the
/// event acknowledged meanwhile): the new round waits for the attempt it would repeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_of_a_parked_retry_in_flight_does_not_send_it_again() {
    resume_during_a_retry_in_flight("triggers_test_redeliver_retry_in_flight", "redeliver").await;
}

async fn resume_during_a_retry_in_flight(database: &str, then: &str) {
    let recv = Receiver::start(|_, earlier| match earlier {
        0 => Answer::status(500),
        _ => Answer {
            delay: Duration::from_millis(1500),
            ..Answer::status(200)
        },
    })
    .await;
    let s = quick_retry_node(database).await;
    let (key, _) = new_org(s.addr, "pro").await;
    let ep = create_endpoint(s.addr, &key, json!({"url": recv.url("/")})).await;
    let ep = ep["id"].as_str().unwrap();
    let id = post_typed(s.addr, &key, "t").await;
    // The retry (attempt 2) is in flight: the receiver holds it for 1.5 s.
    recv.wait_until(Duration::from_secs(5), |r| r.len() == 2)
        .await;
    if then == "resume" {
        let pause = format!("/api/endpoints/{ep}/pause");
        assert_eq!(post_empty(s.addr, &key, &pause).await.status, 200);
        let resume = format!("/api/endpoints/{ep}/resume");
        assert_eq!(post_empty(s.addr, &key, &resume).await.status, 200);
    } else {
        assert_eq!(
            post_empty(s.addr, &key, &format!("/api/ack/{id}"))
                .await
                .status,
            200
        );
        let r = post_empty(s.addr, &key, &format!("/api/events/{id}/redeliver")).await;
        assert_eq!(r.status, 202, "{}", r.text());
    }
    let log = |e: &Value| e["delivery_attempts"].as_array().map_or(0, Vec::len);
    let e = wait_event(s.addr, &key, &id, Duration::from_secs(10), |e| log(e) == 2).await;
    // Anything sent beside the attempt in flight would have arrived by now.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let got = recv.for_event(&id);
    let numbers: Vec<&str> = got
        .iter()
        .map(|r| r.header("x-delivery-attempt").unwrap_or(""))
        .collect();
    assert_eq!(numbers, ["1", "2"], "{e}");
    let e = event_json(s.addr, &key, &id).await;
    assert_eq!(e["status"], "delivered", "{e}");
    assert_eq!(e["attempts"], 2, "{e}");
    assert_eq!(log(&e), 2, "{e}");
    assert_eq!(e["delivery_attempts"][1]["response_status"], 200, "{e}");
}

/// An event whose first attempt failed, and when that attempt arrived, once its retry waits in
/// this node's memory for its time.
async fn retry_waiting_in_memory(s: &Server, recv: &Receiver, key: &str) -> (String, Instant) {
    let id = post_typed(s.addr, key, "t").await;
    let first = recv
        .wait_until(Duration::from_secs(5), |r| r.len() == 1)
        .await[0]
        .at;
    poll_until(
        || async { metric(s, SCHEDULED).await == 1.0 },
        "the retry never waited in memory",
    )
    .await;
    (id, first)
}

/// A retry waiting in memory for its time when its endpoint is paused is parked then (its lease
/// given up), goes at once on resume, and only once: before, the resume's claim sent it and the
/// node that still held it sent it again when it was due, under the same attempt number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_waiting_in_memory_is_parked_by_a_pause_and_sent_once_after_resume() {
    let recv = Receiver::start(|_, earlier| match earlier {
        0 => Answer::status(500),
        _ => Answer::status(200),
    })
    .await;
    let url = own_database("triggers_test_pause_waiting_retry").await;
    let s = Server::start_with_db(&[PRIVATE, "--retry-schedule", "3s"], &url);
    let (key, _) = new_org(s.addr, "pro").await;
    let ep = create_endpoint(s.addr, &key, json!({"url": recv.url("/")})).await;
    let ep = ep["id"].as_str().unwrap();
    let (id, first) = retry_waiting_in_memory(&s, &recv, &key).await;
    let pause = format!("/api/endpoints/{ep}/pause");
    assert_eq!(post_empty(s.addr, &key, &pause).await.status, 200);
    poll_until(
        || async { metric(&s, SCHEDULED).await == 0.0 },
        "the paused retry stayed in memory",
    )
    .await;
    let resume = format!("/api/endpoints/{ep}/resume");
    assert_eq!(post_empty(s.addr, &key, &resume).await.status, 200);
    let e = wait_delivered(s.addr, &key, &id, Duration::from_secs(5)).await;
    let second = recv.received()[1].at;
    assert!(
        second.duration_since(first) < Duration::from_secs(3),
        "sent at once on resume, not when its retry was due"
    );
    // Past the retry's own time: nothing more comes.
    let wait = (first + Duration::from_millis(4000)).saturating_duration_since(Instant::now());
    tokio::time::sleep(wait).await;
    let numbers: Vec<String> = recv
        .for_event(&id)
        .iter()
        .map(|r| r.header("x-delivery-attempt").unwrap_or("").to_string())
        .collect();
    assert_eq!(numbers, ["1", "2"], "{e}");
    let e = event_json(s.addr, &key, &id).await;
    assert_eq!(e["attempts"], 2, "{e}");
    assert_eq!(e["delivery_attempts"].as_array().unwrap().len(), 2, "{e}");
}

/// An acknowledged event's delivery is not sent again: not even a retry a node was holding in
/// memory for its time, which knows nothing of the ack (it looks at its row before the attempt).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_events_retry_waiting_in_memory_is_not_sent() {
    let recv = Receiver::start(|_, _| Answer::status(500)).await;
    let url = own_database("triggers_test_ack_waiting_retry").await;
    let s = Server::start_with_db(&[PRIVATE, "--retry-schedule", "1s"], &url);
    let (key, _) = new_org(s.addr, "pro").await;
    create_endpoint(s.addr, &key, json!({"url": recv.url("/")})).await;
    let (id, first) = retry_waiting_in_memory(&s, &recv, &key).await;
    let r = post_empty(s.addr, &key, &format!("/api/ack/{id}")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Well past the retry's time.
    let wait = (first + Duration::from_millis(2500)).saturating_duration_since(Instant::now());
    tokio::time::sleep(wait).await;
    assert_eq!(recv.for_event(&id).len(), 1, "sent after its ack");
    assert_eq!(metric(&s, SCHEDULED).await, 0.0, "still held in memory");
    let e = event_json(s.addr, &key, &id).await;
    assert_eq!(e["status"], "delivered", "{e}");
    assert_eq!(e["attempts"], 1, "{e}");
    // A redelivery sends it at once (the retry left no lease behind to wait for).
    let r = post_empty(s.addr, &key, &format!("/api/events/{id}/redeliver")).await;
    assert_eq!(r.status, 202, "{}", r.text());
    recv.wait_until(Duration::from_millis(900), |r| r.len() == 2)
        .await;
}

/// A redelivery and the take-over of the event's batch (its node gone) take their locks in one
/// order, the batch row before the event's delivery rows, so they never deadlock: the take-over,
/// held here between its two statements, writes the rows of what the batch still owes without
/// waiting for the redelivery, which waits for the batch row and then starts its round over
/// those rows. (The redelivery wrote its rows first: the take-over's insert then waited for it,
/// a lock cycle that PostgreSQL broke after a second by aborting one of the two.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_and_a_take_over_of_its_batch_never_deadlock() {
    let recv = Receiver::start(|_, _| Answer {
        delay: Duration::from_millis(1500),
        ..Answer::status(200)
    })
    .await;
    let url = own_database("triggers_test_redeliver_take_over").await;
    let s = Server::start_with_db(&[PRIVATE], &url);
    let (key, org) = new_org(s.addr, "pro").await;
    let ep = create_endpoint(s.addr, &key, json!({"url": recv.url("/")})).await;
    let ep = ep["id"].as_str().unwrap().to_string();
    let id = post_typed(s.addr, &key, "t").await;
    // Its first attempt is in flight, under its group commit's batch row.
    recv.wait_until(Duration::from_secs(5), |r| r.len() == 1)
        .await;
    let client = db_at(&url).await;
    let take_over = db_at(&url).await;
    take_over
        .batch_execute(&format!(
            "BEGIN; SET LOCAL lock_timeout = '500ms'; DELETE FROM delivery_batches \
             WHERE id = (SELECT batch_id FROM events WHERE id = '{id}')"
        ))
        .await
        .unwrap();
    let (addr, k, path) = (s.addr, key.clone(), format!("/api/events/{id}/redeliver"));
    let redeliver = tokio::spawn(async move { post_empty(addr, &k, &path).await });
    wait_for_a_lock(&client, "the redelivery did not wait for the batch row").await;
    take_over
        .batch_execute(&format!(
            "INSERT INTO deliveries (event_id, endpoint_id, org_id, next_attempt_at) \
             VALUES ('{id}', '{ep}', '{org}', now()) ON CONFLICT DO NOTHING"
        ))
        .await
        .expect("the take-over's rows waited for the redelivery's");
    take_over.batch_execute("COMMIT").await.unwrap();
    let r = redeliver.await.unwrap();
    assert_eq!(r.status, 202, "{}", r.text());
    wait_delivered(s.addr, &key, &id, Duration::from_secs(10)).await;
    // (The log is the test process's: other tests' reruns show too, of other changes.)
    let reruns = s.log_lines("run again");
    assert!(
        !reruns.iter().any(|l| l.contains("\"redeliver\"")),
        "the redelivery was a deadlock's victim: {reruns:?}"
    );
}

/// The same for a first attempt waiting in memory for its endpoint's rate limit: acknowledged
/// meanwhile, it is not sent, and the deliveries behind it go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_events_delivery_waiting_for_a_rate_limit_is_not_sent() {
    let (recv, s, key, _) = rate_limited_node("triggers_test_ack_rate_limited", 1).await;
    // One a second: one goes at once, the other two wait in memory for their turns (in either
    // order), a second and two seconds later. One of those two is acknowledged while it waits
    // (which went first is up to the scheduler: an acknowledgement before any is sent could
    // come after the first).
    let ids = create_events(s.addr, &key, 3, "t").await;
    let got = recv
        .wait_until(Duration::from_secs(5), |r| !r.is_empty())
        .await;
    let (first, sent) = (got[0].at, got[0].event_id());
    let waiting: Vec<&String> = ids.iter().filter(|id| **id != sent).collect();
    let (acked, other) = (waiting[0], waiting[1]);
    let r = post_empty(s.addr, &key, &format!("/api/ack/{acked}")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        first.elapsed() < Duration::from_millis(900),
        "acknowledged before its turn could come"
    );
    let wait = (first + Duration::from_millis(2600)).saturating_duration_since(Instant::now());
    tokio::time::sleep(wait).await;
    assert_eq!(
        recv.for_event(other).len(),
        1,
        "{}",
        timeline(&recv.received())
    );
    assert!(recv.for_event(acked).is_empty(), "sent after its ack");
    let e = event_json(s.addr, &key, acked).await;
    assert_eq!(e["status"], "delivered", "{e}");
    assert_eq!(e["attempts"], 0, "{e}");
    assert_eq!(recv.received().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivery_starts_a_round_for_every_endpoint_or_the_one_named() {
    let recv = Receiver::start(|_, _| Answer::status(200)).await;
    let s = Server::start(&[PRIVATE]);
    let (key, _) = new_org(s.addr, "pro").await;
    let a = create_endpoint(s.addr, &key, json!({"url": recv.url("/a")})).await;
    create_endpoint(s.addr, &key, json!({"url": recv.url("/b")})).await;
    let id = post_typed(s.addr, &key, "t").await;
    recv.wait_until(Duration::from_secs(5), |r| r.len() == 2)
        .await;
    wait_delivered(s.addr, &key, &id, Duration::from_secs(5)).await;
    let path = format!("/api/events/{id}/redeliver");
    let r = post(s.addr, &key, &path, &json!({"endpoint_id": a["id"]})).await;
    assert_eq!(r.status, 202, "{}", r.text());
    let got = recv
        .wait_until(Duration::from_secs(5), |r| r.len() == 3)
        .await;
    assert_eq!(got[2].path, "/a");
    assert_eq!(got[2].header("x-delivery-attempt"), Some("2"));
    wait_event(s.addr, &key, &id, Duration::from_secs(5), |e| {
        e["status"] == "delivered" && e["attempts"] == 3
    })
    .await;
    // No body: every endpoint.
    assert_eq!(post_empty(s.addr, &key, &path).await.status, 202);
    recv.wait_until(Duration::from_secs(5), |r| r.len() == 5)
        .await;
    let e = wait_event(s.addr, &key, &id, Duration::from_secs(5), |e| {
        e["status"] == "delivered" && e["attempts"] == 5
    })
    .await;
    assert_eq!(e["delivery_attempts"].as_array().unwrap().len(), 5);
    let r = post(
        s.addr,
        &key,
        &path,
        &json!({"endpoint_id": "00000000-0000-7000-8000-000000000000"}),
    )
    .await;
    assert_eq!(r.status, 404);
    let r = post(s.addr, &key, &path, &json!({"endpoint_id": "nope"})).await;
    assert_eq!(r.status, 422);
    assert_eq!(r.json()["field"], "endpoint_id");
}

/// Apply the version 1 schema (migrations 1 and 2) to a fresh database, as a server of the
/// previous release left it.
async fn v1_database(name: &str) -> String {
    let url = own_database(name).await;
    let client = db_at(&url).await;
    client
        .batch_execute(include_str!("../migrations/0001_init.sql"))
        .await
        .unwrap();
    client
        .batch_execute(include_str!("../migrations/0002_probe.sql"))
        .await
        .unwrap();
    client
        .batch_execute(
            "CREATE TABLE triggers_migrations (version integer PRIMARY KEY, name text NOT NULL, \
                 applied_at timestamptz NOT NULL DEFAULT now()); \
             INSERT INTO triggers_migrations (version, name) \
                 VALUES (1, '0001_init.sql'), (2, '0002_probe.sql')",
        )
        .await
        .unwrap();
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_database_migrates_and_its_pending_events_are_delivered() {
    let recv = Receiver::start(|_, _| Answer::status(200)).await;
    let url = v1_database("triggers_test_v1").await;
    let client = db_at(&url).await;
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    client
        .execute(
            "INSERT INTO organizations (id, name, tier, rate_limit_per_minute, key_id, key_hash, \
                 key_prefix, webhook_url, signing_secret, webhook_updated_at, created_at) \
             VALUES ('00000000-0000-7000-8000-0000000000a1', 'v1', 'pro', 1000, 'k1', 'h', 'p', \
                     $1, $2, now(), now())",
            &[&recv.url("/v1"), &secret],
        )
        .await
        .unwrap();
    // Pending with two failed attempts and a retry due now; delivered; failed; pull-only.
    client
        .batch_execute(
            "INSERT INTO events (id, org_id, type, payload, status, attempts, next_attempt_at, \
                 created_at, delivered_at) VALUES \
             ('00000000-0000-7000-8000-0000000000e1', '00000000-0000-7000-8000-0000000000a1', \
              't', '{\"n\":1}', 0, 2, now(), now(), NULL), \
             ('00000000-0000-7000-8000-0000000000e2', '00000000-0000-7000-8000-0000000000a1', \
              't', '{\"n\":2}', 1, 1, NULL, now(), now()), \
             ('00000000-0000-7000-8000-0000000000e3', '00000000-0000-7000-8000-0000000000a1', \
              't', '{\"n\":3}', 2, 6, NULL, now(), NULL); \
             INSERT INTO delivery_attempts (event_id, attempt, at, response_status, error, duration_ms) VALUES \
             ('00000000-0000-7000-8000-0000000000e1', 1, now(), 500, 'receiver answered 500', 1), \
             ('00000000-0000-7000-8000-0000000000e1', 2, now(), 500, 'receiver answered 500', 1), \
             ('00000000-0000-7000-8000-0000000000e2', 1, now(), 200, NULL, 1); \
             UPDATE events SET dedup_id = 'legacy-1' WHERE id = '00000000-0000-7000-8000-0000000000e2'",
        )
        .await
        .unwrap();
    let s = Server::start_with_db(&[PRIVATE], &url);
    // Partitioned (migration 4): the old rows are the first partition, and the dedup id kept.
    let row = client
        .query_one(
            "SELECT tableoid::regclass::text, (SELECT event_id FROM dedup_keys \
                 WHERE dedup_id = 'legacy-1') FROM events WHERE dedup_id = 'legacy-1'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "events_initial");
    assert_eq!(
        row.get::<_, uuid::Uuid>(1).to_string(),
        "00000000-0000-7000-8000-0000000000e2"
    );
    let got = recv
        .wait_until(Duration::from_secs(10), |r| !r.is_empty())
        .await;
    assert_eq!(got[0].event_id(), "00000000-0000-7000-8000-0000000000e1");
    assert_eq!(
        got[0].header("x-delivery-attempt"),
        Some("3"),
        "the count goes on"
    );
    verify_standard_webhook(secret, &got[0]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        recv.received().len(),
        1,
        "delivered and failed events are not resent"
    );
    let state = |id: &'static str| {
        let client = &client;
        async move {
            let row = client
                .query_one(
                    "SELECT st.status, st.attempts FROM events e, \
                         triggers_event_state(e.status, e.id, e.endpoints, e.delivered_at) st \
                     WHERE e.id = $1::text::uuid",
                    &[&id],
                )
                .await
                .unwrap();
            (row.get::<_, i16>(0), row.get::<_, i32>(1))
        }
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while state("00000000-0000-7000-8000-0000000000e1").await != (1, 3) {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(state("00000000-0000-7000-8000-0000000000e2").await, (1, 1));
    assert_eq!(state("00000000-0000-7000-8000-0000000000e3").await.0, 2);
    // The webhook is the organization's default endpoint now, with its secret.
    let row = client
        .query_one(
            "SELECT url, signing_secret, is_default, status FROM endpoints",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), recv.url("/v1"));
    assert_eq!(row.get::<_, String>(1), secret);
    assert!(row.get::<_, bool>(2));
    assert_eq!(row.get::<_, i16>(3), 0);
    drop(s);
}

/// `POST /api/webhook/config` on a default endpoint that was paused (or disabled) makes it active
/// again, and what it held while paused goes out, as a resume sends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setting_the_webhook_again_sends_what_its_paused_endpoint_held() {
    let recv = Receiver::start(|_, _| Answer::status(200)).await;
    let s = Server::start(&[PRIVATE]);
    let (key, _) = new_org(s.addr, "pro").await;
    set_webhook(s.addr, &key, &recv.url("/v1")).await;
    let list = get(s.addr, &key, "/api/endpoints").await.json();
    let id = list["endpoints"][0]["id"].as_str().unwrap().to_string();
    let r = post_empty(s.addr, &key, &format!("/api/endpoints/{id}/pause")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let held = post_typed(s.addr, &key, "t").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        recv.for_event(&held).is_empty(),
        "nothing goes while paused"
    );
    set_webhook(s.addr, &key, &recv.url("/v1")).await;
    let e = wait_delivered(s.addr, &key, &held, Duration::from_secs(5)).await;
    assert_eq!(e["attempts"], 1);
}

/// A deleted webhook set again: the default endpoint is the same one, active again, and what
/// was still owed to it when it was deleted (events not acknowledged) goes out; it does not stay
/// listed as pending for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setting_a_deleted_webhook_again_sends_what_was_owed_to_it() {
    let recv = Receiver::start(|_, _| Answer::status(500)).await;
    let s = Server::start(&[PRIVATE, "--retry-schedule", "60s"]);
    let (key, _) = new_org(s.addr, "pro").await;
    set_webhook(s.addr, &key, &recv.url("/v1")).await;
    let owed = post_typed(s.addr, &key, "t").await;
    let acked = post_typed(s.addr, &key, "t").await;
    recv.wait_until(Duration::from_secs(5), |r| r.len() == 2)
        .await;
    let retrying = |e: &Value| e["deliveries"][0]["next_attempt_at"].is_string();
    wait_event(s.addr, &key, &owed, Duration::from_secs(5), retrying).await;
    wait_event(s.addr, &key, &acked, Duration::from_secs(5), retrying).await;
    poll_until(
        || async { metric(&s, SCHEDULED).await == 2.0 },
        "the two retries never waited in memory",
    )
    .await;
    let r = delete(s.addr, &key, "/api/webhook/config").await;
    assert_eq!(r.status, 200);
    // Both retries waiting in memory hear of the delete and park, their rows' leases given up:
    // what is still owed goes at once when the webhook is set again. (One that had not heard of
    // it yet would keep its lease and go when due, in 60 s.)
    poll_until(
        || async { metric(&s, SCHEDULED).await == 0.0 },
        "the retries waiting in memory never parked",
    )
    .await;
    let r = post_empty(s.addr, &key, &format!("/api/ack/{acked}")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    recv.set_script(|_, _| Answer::status(200));
    set_webhook(s.addr, &key, &recv.url("/v1")).await;
    let e = wait_delivered(s.addr, &key, &owed, Duration::from_secs(5)).await;
    assert_eq!(e["attempts"], 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        recv.for_event(&acked).len(),
        1,
        "an acknowledged event is not sent again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbox_walks_past_thousands_of_delivered_events_with_a_cursor() {
    let s = Server::start(&[PRIVATE]);
    let (key, org) = new_org(s.addr, "pro").await;
    let ep = create_endpoint(s.addr, &key, json!({"url": "http://127.0.0.1:9/x"})).await;
    // As delivery leaves them: one pending event (its endpoint paused meanwhile, say), then
    // 2,500 newer ones delivered at their first attempt. Ids of this run's own (the test
    // database outlives runs): UUIDv7 of this millisecond, so today's partition takes them.
    let p = v7_prefix_now();
    db().await
        .batch_execute(&format!(
            "INSERT INTO events (id, org_id, type, payload, status, endpoints, created_at) \
             VALUES ('{p}-7000-8000-000000000001', '{org}', 'old', '{{}}', 3, \
                     ARRAY['{ep}']::uuid[], now()); \
             INSERT INTO events (id, org_id, type, payload, status, endpoints, created_at) \
             SELECT ('{p}-7000-8001-' || lpad(to_hex(g), 12, '0'))::uuid, '{org}', \
                    'new', '{{}}', 3, ARRAY['{ep}']::uuid[], now() \
             FROM generate_series(1, 2500) g; \
             INSERT INTO delivery_attempts (event_id, endpoint_id, attempt, at, response_status, \
                                            duration_ms, org_id) \
             SELECT ('{p}-7000-8001-' || lpad(to_hex(g), 12, '0'))::uuid, '{ep}', 1, \
                    now(), 200, 1, '{org}' FROM generate_series(1, 2500) g",
            ep = ep["id"].as_str().unwrap()
        ))
        .await
        .unwrap();
    // Pending: the first page looks at 2,000 events, finds none, and says where to go on.
    let first = get(s.addr, &key, "/api/inbox?status=pending&limit=10").await;
    assert_eq!(first.status, 200);
    let first = first.json();
    assert_eq!(first["events"], json!([]));
    let cursor = first["next_cursor"]
        .as_str()
        .expect("a cursor to go on from");
    let second = get(
        s.addr,
        &key,
        &format!("/api/inbox?status=pending&limit=10&cursor={cursor}"),
    )
    .await
    .json();
    let ids: Vec<&str> = second["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [format!("{p}-7000-8000-000000000001")]);
    assert_eq!(second["next_cursor"], Value::Null);
    // Delivered: full pages at once, walking all 2,500 exactly once.
    let (mut seen, mut cursor) = (HashSet::new(), None::<String>);
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/inbox?status=delivered&limit=1000&cursor={c}"),
            None => "/api/inbox?status=delivered&limit=1000".to_string(),
        };
        let page = get(s.addr, &key, &path).await.json();
        for e in page["events"].as_array().unwrap() {
            assert_eq!(e["status"], "delivered");
            assert_eq!(e["attempts"], 1);
            assert!(seen.insert(e["id"].as_str().unwrap().to_string()));
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 2500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_nodes_failing_spell_does_not_disable_an_endpoint_other_nodes_reach() {
    // Node A's attempts fail (the receiver refuses what was sent to A), node B's succeed: the
    // same endpoint, reached from one node and not from the other. A alone has failed for longer
    // than the disable limit, but B delivered within it: the endpoint stays active. Once B stops
    // delivering, A's spell disables it after the limit.
    let recv = Receiver::start(|r, _| {
        let via_a = String::from_utf8_lossy(&r.body).contains("\"via\":\"a\"");
        Answer::status(if via_a { 500 } else { 200 })
    })
    .await;
    let args = [
        PRIVATE,
        "--endpoint-disable-after-s",
        "7",
        "--circuit-failures",
        "1000000",
        "--retry-schedule",
        "10m",
    ];
    let (a, b) = (Server::start(&args), Server::start(&args));
    let (key, _) = new_org(a.addr, "pro").await;
    let ep = create_endpoint(a.addr, &key, json!({"url": recv.url("/x")})).await;
    let path = format!("/api/endpoints/{}", ep["id"].as_str().unwrap());
    let send = |s: &Server, via: &'static str| {
        let (addr, key) = (s.addr, key.clone());
        async move {
            let r = post_event(addr, &key, "t", json!({ "via": via }), None).await;
            assert_eq!(r.status, 201, "{}", r.text());
        }
    };
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(9) {
        send(&a, "a").await;
        send(&b, "b").await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let e = get(a.addr, &key, &path).await.json();
    assert_eq!(e["status"], "active", "{e}");
    // A's failing spell covers the limit: the active status above is B's doing.
    let failed: Vec<Instant> = recv
        .received()
        .iter()
        .filter(|r| r.answered == 500)
        .map(|r| r.at)
        .collect();
    let spell = *failed.last().unwrap() - failed[0];
    assert!(
        spell >= Duration::from_secs(7),
        "A failed for {spell:?} only"
    );
    // Only A now: disabled once B's last recorded success is 7 s old.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        send(&a, "a").await;
        let e = get(a.addr, &key, &path).await.json();
        if e["status"] == "disabled" {
            break;
        }
        assert!(Instant::now() < deadline, "never disabled: {e}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let disabled = disabled_events(a.addr, &key).await;
    assert_eq!(disabled.len(), 1);
    assert_eq!(
        disabled[0]["payload"]["reason"],
        "every attempt failed for 7 s"
    );
}
