//! An endpoint's health: the circuit breaker's timings and probes, a resume that closes it, auto-disable, operational events.

use super::*;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_failing_for_too_long_is_disabled_and_keeps_its_deliveries() {
    let recv = Receiver::start(|_, _| Answer::status(500)).await;
    let url = own_database("triggers_test_disabled_endpoint").await;
    let s = Server::start_with_db(
        &[
            PRIVATE,
            "--endpoint-disable-after-s",
            "1",
            "--circuit-failures",
            "1000",
            "--retry-schedule",
            "300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms",
        ],
        &url,
    );
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
    let url = own_database("triggers_test_failing_spell").await;
    let (a, b) = (
        Server::start_with_db(&args, &url),
        Server::start_with_db(&args, &url),
    );
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
