//! Delivery per endpoint: fan-out by event type, the attempt log, isolation between endpoints, redelivery to every endpoint or one.

use super::*;

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
    let url = own_database("triggers_test_patterns").await;
    let s = Server::start_with_db(&[PRIVATE, "--retry-schedule", "200ms,200ms"], &url);
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
    let url = own_database("triggers_test_answer_kib").await;
    let s = Server::start_with_db(&[PRIVATE, "--retry-schedule", "200ms"], &url);
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
async fn redelivery_starts_a_round_for_every_endpoint_or_the_one_named() {
    let recv = Receiver::start(|_, _| Answer::status(200)).await;
    let url = own_database("triggers_test_redelivery_round").await;
    let s = Server::start_with_db(&[PRIVATE], &url);
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
