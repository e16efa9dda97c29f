//! What failed and what waited: recover since a time, the failed list, the failed inbox, a paused endpoint's backlog, backlogs claimed as room frees, the inbox walked with a cursor.

use super::*;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_endpoint_gets_its_whole_backlog_after_resume() {
    let recv = Receiver::start(|_, _| Answer::status(200)).await;
    let url = own_database("triggers_test_paused_backlog").await;
    let s = Server::start_with_db(&[PRIVATE], &url);
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
