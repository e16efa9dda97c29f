//! Webhook delivery with real receivers on loopback: success, retries on the schedule, dead
//! letters, 410 Gone, isolation from a slow receiver, signatures checked with an independent
//! HMAC, the SSRF check at connect time, a SIGKILL with deliveries pending, two nodes on one
//! database.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_signed_events_with_every_documented_header() {
    let recv = Receiver::start(|_, _| Answer::status(200)).await;
    let url = own_database("triggers_test_signed").await;
    let s = Server::start_with_db(&["--allow-private-webhooks"], &url);
    let (key, _) = new_org(s.addr, "pro").await;
    let secret = set_webhook(s.addr, &key, &recv.url("/hooks/in")).await;
    let created = post_event(
        s.addr,
        &key,
        "invoice.paid",
        json!({"amount": 42, "note": "é\n"}),
        None,
    )
    .await
    .json();
    let id = created["id"].as_str().unwrap().to_string();
    let got = recv
        .wait_until(Duration::from_secs(5), |r| !r.is_empty())
        .await;
    assert_eq!(got.len(), 1);
    let r = &got[0];
    assert_eq!(r.path, "/hooks/in");
    assert_eq!(
        r.json(),
        json!({"event_id": id, "type": "invoice.paid", "data": {"amount": 42, "note": "é\n"}, "created_at": created["created_at"]})
    );
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("x-event-id"), Some(id.as_str()));
    assert_eq!(r.header("x-event-type"), Some("invoice.paid"));
    assert_eq!(r.header("x-delivery-attempt"), Some("1"));
    assert_eq!(r.header("webhook-id"), Some(id.as_str()));
    verify_standard_webhook(&secret, r);

    let e = wait_status(s.addr, &key, &id, "delivered", Duration::from_secs(5)).await;
    assert_eq!(e["attempts"], 1);
    assert!(e["delivered_at"].as_str().unwrap().ends_with('Z'));
    let attempts = e["delivery_attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0]["attempt"], 1);
    assert_eq!(attempts[0]["response_status"], 200);
    assert_eq!(attempts[0]["error"], Value::Null);
    assert!(attempts[0]["duration_ms"].as_i64().unwrap() >= 0);
    let delivered = get(s.addr, &key, "/api/inbox?status=delivered")
        .await
        .json();
    assert_eq!(delivered["events"][0]["id"], id.as_str());
    assert_eq!(
        get(s.addr, &key, "/api/inbox").await.json()["events"],
        json!([])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_on_the_schedule_until_success() {
    // 500, 500, then 200: attempt 2 about 1 s after the first, attempt 3 about 2 s after that.
    let recv =
        Receiver::start(|_, before| Answer::status(if before < 2 { 500 } else { 200 })).await;
    let url = own_database("triggers_test_retries").await;
    let s = Server::start_with_db(&["--allow-private-webhooks"], &url);
    let (key, _) = new_org(s.addr, "pro").await;
    set_webhook(s.addr, &key, &recv.url("/")).await;
    let id = new_event_id(s.addr, &key, json!(1)).await;
    let got = recv
        .wait_until(Duration::from_secs(10), |r| r.len() >= 3)
        .await;
    let gap1 = got[1].at - got[0].at;
    let gap2 = got[2].at - got[1].at;
    assert!(
        (Duration::from_millis(850)..Duration::from_millis(1400)).contains(&gap1),
        "{gap1:?}"
    );
    assert!(
        (Duration::from_millis(1750)..Duration::from_millis(2500)).contains(&gap2),
        "{gap2:?}"
    );
    let total = got[2].at - got[0].at;
    assert!(
        (Duration::from_millis(2600)..Duration::from_millis(3800)).contains(&total),
        "{total:?}"
    );
    let numbers: Vec<_> = got
        .iter()
        .map(|r| r.header("x-delivery-attempt").unwrap().to_string())
        .collect();
    assert_eq!(numbers, ["1", "2", "3"]);
    let e = wait_status(s.addr, &key, &id, "delivered", Duration::from_secs(5)).await;
    assert_eq!(e["attempts"], 3);
    let log: Vec<(Value, Value)> = e["delivery_attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["response_status"].clone(), a["error"].clone()))
        .collect();
    assert_eq!(
        log,
        vec![
            (json!(500), json!("receiver answered 500")),
            (json!(500), json!("receiver answered 500")),
            (json!(200), Value::Null)
        ]
    );
    assert_eq!(recv.received().len(), 3, "nothing after success");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_failures_make_a_dead_letter_that_can_be_redelivered_or_acked() {
    let recv = Receiver::start(|_, _| Answer::status(503)).await;
    // Its own database: a redelivery is due at once to any node on the database, and a success
    // seen by another test's server would leave this node's breaker counting the first event's
    // six failures, so the second event's fourth failure would open the circuit.
    let url = own_database("triggers_test_dead_letter").await;
    let s = Server::start_with_db(
        &[
            "--allow-private-webhooks",
            "--retry-schedule",
            "100ms,100ms,100ms,100ms,100ms",
        ],
        &url,
    );
    let (key, _) = new_org(s.addr, "pro").await;
    set_webhook(s.addr, &key, &recv.url("/")).await;
    let id = post_event(s.addr, &key, "t", json!({"n": 1}), None)
        .await
        .json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let e = wait_status(s.addr, &key, &id, "failed", Duration::from_secs(10)).await;
    assert_eq!(e["attempts"], 6);
    assert_eq!(e["delivery_attempts"].as_array().unwrap().len(), 6);
    assert_eq!(recv.for_event(&id).len(), 6, "no seventh attempt");
    let failed = get(s.addr, &key, "/api/inbox?status=failed").await.json();
    assert_eq!(failed["events"][0]["id"], id.as_str());
    assert_eq!(failed["events"][0]["status"], "failed");
    assert_eq!(failed["events"][0]["attempts"], 6);

    // Redeliver: a new round against a receiver that now works.
    recv.set_script(|_, _| Answer::status(204));
    let r = post_empty(s.addr, &key, &format!("/api/events/{id}/redeliver")).await;
    assert_eq!(r.status, 202);
    assert_eq!(r.json(), json!({"id": id, "status": "pending"}));
    let e = wait_status(s.addr, &key, &id, "delivered", Duration::from_secs(5)).await;
    assert_eq!(e["attempts"], 7);
    assert_eq!(e["delivery_attempts"][6]["response_status"], 204);
    assert_eq!(
        recv.for_event(&id)
            .last()
            .unwrap()
            .header("x-delivery-attempt"),
        Some("7")
    );

    // A dead letter can also be acked: it becomes delivered.
    recv.set_script(|_, _| Answer::status(500));
    let id2 = new_event_id(s.addr, &key, json!(2)).await;
    wait_status(s.addr, &key, &id2, "failed", Duration::from_secs(10)).await;
    let r = post_empty(s.addr, &key, &format!("/api/ack/{id2}")).await;
    assert_eq!(r.status, 200);
    assert_eq!(event_json(s.addr, &key, &id2).await["status"], "delivered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_retry_after_is_honoured() {
    let recv = Receiver::start(|_, before| {
        if before == 0 {
            Answer {
                headers: vec![("Retry-After".into(), "3".into())],
                ..Answer::status(429)
            }
        } else {
            Answer::status(200)
        }
    })
    .await;
    let url = own_database("triggers_test_retry_after").await;
    let s = Server::start_with_db(&["--allow-private-webhooks"], &url);
    let (key, _) = new_org(s.addr, "pro").await;
    set_webhook(s.addr, &key, &recv.url("/")).await;
    post_event(s.addr, &key, "t", json!(1), None).await;
    let got = recv
        .wait_until(Duration::from_secs(10), |r| r.len() >= 2)
        .await;
    let gap = got[1].at - got[0].at;
    assert!(
        (Duration::from_millis(2900)..Duration::from_millis(4000)).contains(&gap),
        "{gap:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_disables_the_endpoint_and_keeps_the_event_pending() {
    let recv = Receiver::start(|_, _| Answer::status(410)).await;
    let url = own_database("triggers_test_gone").await;
    let s = Server::start_with_db(&["--allow-private-webhooks"], &url);
    let (key, _) = new_org(s.addr, "pro").await;
    set_webhook(s.addr, &key, &recv.url("/")).await;
    let id = new_event_id(s.addr, &key, json!(1)).await;
    recv.wait_until(Duration::from_secs(5), |r| !r.is_empty())
        .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let e = event_json(s.addr, &key, &id).await;
        if e["attempts"] == 1 {
            assert_eq!(e["status"], "pending");
            assert_eq!(e["delivery_attempts"][0]["response_status"], 410);
            assert!(e["delivery_attempts"][0]["error"]
                .as_str()
                .unwrap()
                .contains("410 Gone"));
            assert_eq!(e["deliveries"][0]["status"], "pending");
            break;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        get(s.addr, &key, "/api/keys").await.json()["webhook_url"],
        Value::Null
    );
    // From now on events stay in the inbox.
    let id2 = new_event_id(s.addr, &key, json!(2)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(recv.received().len(), 1);
    let pending: Vec<Value> = get(s.addr, &key, "/api/inbox").await.json()["events"]
        .as_array()
        .unwrap()
        .clone();
    let ids: Vec<&str> = pending.iter().map(|e| e["id"].as_str().unwrap()).collect();
    // The operational event about the disabled endpoint is in the inbox too, between them.
    assert_eq!(ids.len(), 3, "{pending:?}");
    assert_eq!((ids[0], ids[2]), (id2.as_str(), id.as_str()));
    assert_eq!(pending[1]["type"], "triggers.endpoint.disabled");
    let endpoints = get(s.addr, &key, "/api/endpoints").await.json();
    let endpoint = &endpoints["endpoints"][0];
    assert_eq!(endpoint["status"], "disabled");
    assert_eq!(pending[1]["payload"]["endpoint_id"], endpoint["id"]);
    assert!(pending[1]["payload"]["reason"]
        .as_str()
        .unwrap()
        .contains("410"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_receiver_does_not_delay_other_organizations() {
    let slow = Receiver::start(|_, _| Answer {
        delay: Duration::from_secs(20),
        ..Answer::status(200)
    })
    .await;
    let fast = Receiver::start(|_, _| Answer::status(200)).await;
    let url = own_database("triggers_test_slow_receiver").await;
    let s = Server::start_with_db(
        &[
            "--allow-private-webhooks",
            "--delivery-endpoint-concurrency",
            "8",
            "--delivery-concurrency",
            "16",
        ],
        &url,
    );
    let (a, _) = new_org(s.addr, "business").await;
    let (b, _) = new_org(s.addr, "business").await;
    set_webhook(s.addr, &a, &slow.url("/a")).await;
    set_webhook(s.addr, &b, &fast.url("/b")).await;
    // 30 events stay within A's in-memory bound on this node (4 × its 8 slots), so no other node
    // sharing the test database claims any of them: the share checked here is this node's.
    let mut c = Conn::open(s.addr).await;
    for i in 0..30 {
        let body = json!({"type": "a", "payload": i}).to_string();
        let r = c
            .call(
                "POST",
                "/api/events",
                &[("X-API-Key", &a), ("Content-Type", "application/json")],
                Some(body.as_bytes()),
            )
            .await;
        assert_eq!(r.status, 201);
    }
    slow.wait_until(Duration::from_secs(5), |r| r.len() >= 8)
        .await;
    // The other 22 wait for A's slots, and the metrics say so.
    let waiting = "triggers_deliveries_waiting{reason=\"concurrency\"}";
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&s, waiting).await != 22.0 {
        assert!(
            Instant::now() < deadline,
            "{} deliveries counted waiting for a slot, not 22",
            metric(&s, waiting).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A's receiver holds its 8 slots for 20 s each; B's events still go out at once: all 20 well
    // within the 20 s that waiting for A's slots would take. (Not a fixed second: on a loaded
    // box posting 20 events alone may take more than one.)
    for i in 0..20 {
        post_event(s.addr, &b, "b", json!(i), None).await;
    }
    let got = fast
        .wait_until(Duration::from_secs(15), |r| r.len() >= 20)
        .await;
    assert_eq!(got.len(), 20, "B's deliveries waited for A's slots");
    assert!(
        slow.received().len() <= 16,
        "A never exceeds its share: {}",
        slow.received().len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_targets_are_refused_at_connect_time_too() {
    // A URL that slipped past the configuration check (set directly in the database) is still
    // refused when the server connects, because it resolves to loopback.
    let recv = Receiver::start(|_, _| Answer::status(200)).await;
    // Its own database: this node refuses private targets, and would refuse the other tests'
    // due deliveries to their local receivers if it shared theirs.
    let url = own_database("triggers_test_private").await;
    let s = Server::start_with_db(&["--retry-schedule", "100ms"], &url);
    let (key, org) = new_org(s.addr, "pro").await;
    let db = db_at(&url).await;
    db.execute(
            "INSERT INTO endpoints (id, org_id, is_default, url, signing_secret, created_at, updated_at) \
             VALUES (gen_random_uuid(), $2::text::uuid, true, $1, 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw', now(), now())",
            &[&recv.url("/"), &org],
        )
        .await
        .unwrap();
    // Forget the cached endpoints so the server sees the webhook (a NOTIFY does that in
    // production).
    db.execute("SELECT pg_notify('triggers_org_changed', $1)", &[&org])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let id = new_event_id(s.addr, &key, json!(1)).await;
    let e = wait_status(s.addr, &key, &id, "failed", Duration::from_secs(10)).await;
    let error = e["delivery_attempts"][0]["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(error.contains("loopback"), "{error}");
    assert_eq!(e["delivery_attempts"][0]["response_status"], Value::Null);
    assert!(
        recv.received().is_empty(),
        "nothing reached the private address"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_deliveries_pending_delivers_all_after_restart() {
    // The receiver fails everything until the server is killed; the restarted server (after the
    // 3 s lease of the dead one runs out) delivers every event.
    let recv = Receiver::start(|_, _| Answer::status(500)).await;
    let args = [&SHORT_LEASE[..], &RETRY_EVERY_SECOND].concat();
    let url = own_database("triggers_test_sigkill_pending").await;
    let mut s = Server::process_with_db(&args, &url);
    let (key, _) = new_org(s.addr, "business").await;
    set_webhook(s.addr, &key, &recv.url("/")).await;
    let ids = create_events(s.addr, &key, 30, "t").await;
    recv.wait_until(Duration::from_secs(10), |r| {
        let seen: std::collections::HashSet<String> = r.iter().map(|x| x.event_id()).collect();
        ids.iter().all(|id| seen.contains(id))
    })
    .await;
    tokio::task::block_in_place(|| s.kill());
    recv.set_script(|_, _| Answer::status(200));
    let killed_at = Instant::now();
    tokio::task::block_in_place(|| s.restart());
    recv.wait_until_or(
        Duration::from_secs(20),
        |r| all_answered(r, &ids, 200),
        || deliveries_left(&url),
    )
    .await;
    assert!(killed_at.elapsed() < Duration::from_secs(15));
    for id in &ids {
        wait_status(s.addr, &key, id, "delivered", Duration::from_secs(5)).await;
    }
}

/// How the first write to a table fails.
#[derive(Clone, Copy)]
enum Fault {
    /// Refused as a deadlock's victim would be.
    DeadlockVictim,
    /// Its backend is terminated mid-transaction.
    BackendEnds,
}

/// On a node of its own, the first write to `table` fails by `fault` (the recorder's append of an
/// attempt, or the group commit's lease row); the transaction must be written again at once (its
/// log says why): the event is accepted (201), delivered with one attempt recorded, and the
/// receiver got it once. An outcome the recorder gave up on would be let go unrecorded, and its
/// delivery made again when its lease is claimed anew.
async fn written_again_once(database: &str, fault: Fault, table: &str) {
    let WebhookNode {
        url,
        server: s,
        receiver: recv,
        key,
    } = WebhookNode::start(database).await;
    let seen = match fault {
        Fault::DeadlockVictim => {
            deadlock_victim_once(&url, table).await;
            "must be run again"
        }
        Fault::BackendEnds => {
            backend_ends_once(&url, table).await;
            "connection lost before COMMIT"
        }
    };
    let r = post_event(s.addr, &key, "t", json!(1), None).await;
    assert_eq!(r.status, 201);
    let id = r.json()["id"].as_str().unwrap().to_string();
    let e = wait_status(s.addr, &key, &id, "delivered", Duration::from_secs(5)).await;
    assert_eq!(e["attempts"], 1);
    assert_eq!(e["delivery_attempts"].as_array().unwrap().len(), 1);
    assert_eq!(recv.received().len(), 1);
    assert!(s.logged(seen).await, "the fault was never met");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadlock_victims_outcomes_are_recorded_again_not_repeated_after_the_lease() {
    let db = "triggers_test_record_rerun";
    written_again_once(db, Fault::DeadlockVictim, "delivery_attempts").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_whose_connection_ended_before_commit_are_recorded_again_not_repeated() {
    let db = "triggers_test_record_reconnect";
    written_again_once(db, Fault::BackendEnds, "delivery_attempts").await;
}

// The group commit sends the lease row's insert and COMMIT behind the COPY without waiting for
// its answer: when the lease row fails, COMMIT must only roll back, and the batch is written
// again whole (a first write that had committed would make the second one a duplicate key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_lease_row_is_a_deadlock_victim_is_written_again_once() {
    let db = "triggers_test_lease_rerun";
    written_again_once(db, Fault::DeadlockVictim, "delivery_batches").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_backend_ends_at_the_lease_row_is_written_again_once() {
    let db = "triggers_test_lease_reconnect";
    written_again_once(db, Fault::BackendEnds, "delivery_batches").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_one_database_deliver_every_event() {
    let recv = Receiver::start(|_, _| Answer::status(200)).await;
    let args = ["--allow-private-webhooks", "--delivery-poll-ms", "200"];
    let url = own_database("triggers_test_two_nodes").await;
    let a = Server::start_with_db(&args, &url);
    let b = Server::start_with_db(&args, &url);
    let (key, _) = new_org(a.addr, "business").await;
    set_webhook(a.addr, &key, &recv.url("/")).await;
    // The other node learns of the webhook through NOTIFY.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut ids = Vec::new();
    for i in 0..200 {
        let node = if i % 2 == 0 { a.addr } else { b.addr };
        let r = post_event(node, &key, "t", json!(i), None).await;
        assert_eq!(r.status, 201);
        ids.push(r.json()["id"].as_str().unwrap().to_string());
    }
    let got = recv
        .wait_until(Duration::from_secs(15), |r| {
            let seen: std::collections::HashSet<String> = r.iter().map(|x| x.event_id()).collect();
            ids.iter().all(|id| seen.contains(id))
        })
        .await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for r in &got {
        *counts.entry(r.event_id()).or_default() += 1;
    }
    assert_eq!(counts.len(), 200, "every event, none other");
    let repeats = counts.values().filter(|&&n| n > 1).count();
    assert_eq!(repeats, 0, "each event was delivered by one node only");
    // Each outcome is recorded just after its receiver answered (a recorder batches them): wait
    // for the last ones.
    let ids: Vec<uuid::Uuid> = ids.iter().map(|i| i.parse().unwrap()).collect();
    let client = db_at(&url).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let delivered: i64 = client
            .query_one(
                "SELECT count(*) FROM events e, \
                     triggers_event_state(e.status, e.id, e.endpoints, e.delivered_at) st \
                 WHERE e.id = ANY($1) AND st.status = 1",
                &[&ids],
            )
            .await
            .unwrap()
            .get(0);
        if delivered == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{delivered} of 200 recorded delivered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_hands_pending_deliveries_back_at_once() {
    // Retries waiting in memory are handed back at SIGTERM: the restarted node delivers them when
    // they fall due, not after the stopped node's 60 s lease.
    let recv = Receiver::start(|_, _| Answer::status(500)).await;
    let args = [
        "--allow-private-webhooks",
        "--delivery-poll-ms",
        "200",
        "--retry-schedule",
        "2s,2s,2s,2s,2s",
        "--circuit-failures",
        "1000",
    ];
    let url = own_database("triggers_test_graceful_stop").await;
    let mut s = Server::process_with_db(&args, &url);
    let (key, _) = new_org(s.addr, "pro").await;
    set_webhook(s.addr, &key, &recv.url("/")).await;
    let ids = create_events(s.addr, &key, 10, "t").await;
    recv.wait_until(Duration::from_secs(5), |r| r.len() >= 10)
        .await;
    let code = tokio::task::block_in_place(|| s.stop());
    assert_eq!(code, Some(0));
    recv.set_script(|_, _| Answer::status(200));
    let stopped_at = Instant::now();
    tokio::task::block_in_place(|| s.restart());
    recv.wait_until_or(
        Duration::from_secs(10),
        |r| all_answered(r, &ids, 200),
        || deliveries_left(&url),
    )
    .await;
    assert!(
        stopped_at.elapsed() < Duration::from_secs(8),
        "{:?}",
        stopped_at.elapsed()
    );
}

/// Sequential scans of the events table's partitions so far (as the statistics have them).
async fn events_seq_scans(client: &tokio_postgres::Client) -> i64 {
    count(
        client,
        "SELECT coalesce(sum(seq_scan), 0)::bigint FROM pg_stat_user_tables \
         WHERE relid IN (SELECT relid FROM pg_partition_tree('events'))",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_claimers_polls_never_scan_the_events_table() {
    // Every poll takes over expired delivery batches, looking their events up by id range. With
    // the table full of inbox events and few that wait for endpoints (an ingest-only load), the
    // planner once turned that join round and scanned every retained event at every poll.
    let url = own_database("triggers_test_take_over_scans").await;
    let s = Server::process_with_db(&["--delivery-poll-ms", "20"], &url);
    let (_, org) = new_org(s.addr, "pro").await;
    let p = v7_prefix_now();
    let client = db_at(&url).await;
    client
        .batch_execute(&format!(
            "INSERT INTO events (id, org_id, type, payload, status, endpoints, created_at) \
             SELECT ('{p}-7000-8000-' || lpad(to_hex(g), 12, '0'))::uuid, '{org}', 't', '{{}}', \
                    CASE WHEN g % 5000 = 0 THEN 3 ELSE 0 END, \
                    CASE WHEN g % 5000 = 0 THEN ARRAY[gen_random_uuid()] END, now() \
             FROM generate_series(1, 50000) g; \
             ANALYZE events"
        ))
        .await
        .unwrap();
    // The statistics are flushed about once a second: let what came before settle, then count
    // across ~100 polls.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = events_seq_scans(&client).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let after = events_seq_scans(&client).await;
    assert_eq!(after - before, 0, "the events table was scanned while idle");
    drop(s);
}

/// The take-over of the builds before claims' batches (migrations/0008), run an hour ahead.
const OLDER_TAKE_OVER: &str = "\
    WITH b AS ( \
        DELETE FROM delivery_batches WHERE id IN ( \
            SELECT id FROM delivery_batches WHERE lease_until < now() + interval '1 hour' \
            ORDER BY lease_until LIMIT 100 FOR UPDATE SKIP LOCKED) \
        RETURNING id, first_event, last_event) \
    INSERT INTO deliveries (event_id, endpoint_id, org_id, next_attempt_at) \
    SELECT e.id, ep.id, e.org_id, now() \
    FROM b JOIN events e ON e.id BETWEEN b.first_event AND b.last_event AND e.batch_id = b.id \
    CROSS JOIN LATERAL unnest(e.endpoints) AS ep(id) \
    WHERE e.status = 3 AND NOT EXISTS ( \
        SELECT 1 FROM delivery_attempts a \
        WHERE a.event_id = e.id AND a.endpoint_id = ep.id AND a.response_status BETWEEN 200 AND 299) \
    ON CONFLICT DO NOTHING";

/// Deliveries due or scheduled.
const DUE: &str = "SELECT count(*) FROM deliveries WHERE next_attempt_at IS NOT NULL";

/// Let a frozen node go on (SIGCONT) with every lease it held over, give it 4 s to act on what it
/// held (attempt, renew, hand back, record), and see that it sent `recv` nothing meanwhile.
async fn thaw_and_see_nothing_sent(node: &Server, recv: &Receiver) {
    let thawed_at = Instant::now();
    node.thaw();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let late: Vec<Received> = recv
        .received()
        .into_iter()
        .filter(|r| r.at >= thawed_at)
        .collect();
    assert!(
        late.is_empty(),
        "sent after the frozen node went on: {}",
        timeline(&late)
    );
}

/// A node's arguments for the tests of a node that goes while it holds deliveries: a 3 s lease,
/// 2 s attempts, claims every 200 ms.
const SHORT_LEASE: [&str; 7] = [
    "--allow-private-webhooks",
    "--delivery-lease-s",
    "3",
    "--delivery-timeout-ms",
    "2000",
    "--delivery-poll-ms",
    "200",
];

/// Ten retries a second apart, and a circuit that does not open on the way (tens of failing
/// events would open it for 30 s: not the point of the tests that use this).
const RETRY_EVERY_SECOND: [&str; 4] = [
    "--retry-schedule",
    "1s,1s,1s,1s,1s,1s,1s,1s,1s,1s",
    "--circuit-failures",
    "1000",
];

/// A receiver that sits on the first request of each event (30 s) and answers the others at once.
async fn sitting_receiver() -> Receiver {
    Receiver::start(|_, before| Answer {
        delay: if before == 0 {
            Duration::from_secs(30)
        } else {
            Duration::ZERO
        },
        ..Answer::status(200)
    })
    .await
}

/// A node on `url` (the real binary, [`SHORT_LEASE`]) with `n` events whose first attempts are
/// in flight to `recv` (a [`sitting_receiver`]), claimed under one batch's lease: a backlog with
/// no attempt yet (a paused endpoint's), resumed. The node, its key and the events' ids.
async fn first_attempts_in_flight(
    url: &str,
    recv: &Receiver,
    n: usize,
) -> (Server, String, Vec<String>) {
    let s = Server::process_with_db(&SHORT_LEASE, url);
    let (key, _) = new_org(s.addr, "pro").await;
    let ep = create_endpoint(s.addr, &key, json!({"url": recv.url("/")})).await;
    let path = |verb: &str| format!("/api/endpoints/{}/{verb}", ep["id"].as_str().unwrap());
    assert_eq!(post_empty(s.addr, &key, &path("pause")).await.status, 200);
    let ids = create_events(s.addr, &key, n, "t").await;
    let parked = "SELECT count(*) FROM deliveries WHERE status = 0 AND next_attempt_at IS NULL";
    assert_eq!(count(&db_at(url).await, parked).await, n as i64);
    assert_eq!(post_empty(s.addr, &key, &path("resume")).await.status, 200);
    each_received(recv, &ids).await;
    (s, key, ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_attempts_claimed_by_a_killed_node_are_delivered_after_its_lease() {
    // A backlog with no attempt yet (a paused endpoint's, resumed) leaves the deliveries table
    // when it is claimed, named by one batch row. The node is killed while the receiver sits on
    // every request; when that row's lease runs out the next node gives each delivery its row
    // back and delivers it, and no row of either kind is left behind. An older build's node
    // never takes such a batch over.
    let url = own_database("triggers_test_claimed_batch").await;
    let recv = sitting_receiver().await;
    let (mut s, key, ids) = first_attempts_in_flight(&url, &recv, 20).await;
    let client = db_at(&url).await;
    // In flight: out of the table, named by the claim's batch row.
    assert_eq!(count(&client, "SELECT count(*) FROM deliveries").await, 0);
    let members =
        "SELECT coalesce(sum(cardinality(members_event)), 0)::bigint FROM delivery_batches";
    assert_eq!(count(&client, members).await, 20);
    tokio::task::block_in_place(|| s.kill());
    // Meanwhile a node of an older build (a rolling upgrade) takes over all it sees expired: it
    // would look for a claim's deliveries by `batch_id`, find none, and drop the batch row.
    client.execute(OLDER_TAKE_OVER, &[]).await.unwrap();
    assert_eq!(count(&client, members).await, 20);
    tokio::task::block_in_place(|| s.restart());
    recv.wait_until(Duration::from_secs(20), |r| {
        ids.iter()
            .all(|id| r.iter().filter(|x| x.event_id() == *id).count() >= 2)
    })
    .await;
    for id in &ids {
        let e = wait_status(s.addr, &key, id, "delivered", Duration::from_secs(5)).await;
        assert_eq!(
            e["attempts"], 1,
            "the killed node's attempt was never recorded"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while count(&client, "SELECT count(*) FROM delivery_batches").await > 0 {
        assert!(Instant::now() < deadline, "a settled batch row was left");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(count(&client, "SELECT count(*) FROM deliveries").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_frozen_past_its_leases_sends_nothing_another_node_took_over() {
    // A node stopped where it is (SIGSTOP: a paused VM, a stall of minutes) while it holds retries
    // in memory, and in the middle of recording their first attempts: its transaction has written
    // their rows and waits for the node's next statement, holding their locks. Another node must
    // still take the retries over when their lease runs out (the database ends the stalled
    // transaction after `--db-timeout-ms`; before, the take-over waited on its locks until the node
    // went on) and deliver them. When the frozen node goes on, its retries are long due and its
    // leases long over: it must send none of them, and record nothing over the other node's record.
    let url = own_database("triggers_test_frozen_node").await;
    let recv = Receiver::start(|_, _| Answer::status(503)).await;
    // The node gives up on a statement after `--db-timeout-ms` (then it rolls back): the first
    // recording waits on the lock from before all 20 are received until the node is frozen, which
    // on a loaded machine took over 2 s.
    let args = [
        &SHORT_LEASE[..],
        &RETRY_EVERY_SECOND,
        &["--db-timeout-ms", "5000"],
    ]
    .concat();
    let a = Server::process_with_db(&args, &url);
    let (key, _) = new_org(a.addr, "pro").await;
    let ep = create_endpoint(a.addr, &key, json!({"url": recv.url("/")})).await;
    let ep: uuid::Uuid = ep["id"].as_str().unwrap().parse().unwrap();
    // A share lock on the endpoint's row holds the recording back at its health write, the last
    // statement before COMMIT, with the deliveries' rows already written.
    let mut held = db_at(&url).await;
    let lock = held.transaction().await.unwrap();
    lock.query("SELECT 1 FROM endpoints WHERE id = $1 FOR SHARE", &[&ep])
        .await
        .unwrap();
    let ids = create_events(a.addr, &key, 20, "t").await;
    each_received(&recv, &ids).await;
    let watch = db_at(&url).await;
    let recording = |state: &str| {
        format!(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE '%-delivery' \
             AND datname = current_database() AND query LIKE 'UPDATE endpoints%' AND {state}"
        )
    };
    let seen = |state: &str, limit: u64, what: &'static str| {
        let (watch, sql) = (&watch, recording(state));
        async move {
            let deadline = Instant::now() + Duration::from_secs(limit);
            while count(watch, &sql).await == 0 {
                if Instant::now() >= deadline {
                    // What the database's sessions were doing, for whoever reads the failure.
                    let sessions = watch
                        .query(
                            "SELECT format('%s | %s | %s | %s ms | %s', application_name, \
                             state, wait_event_type, \
                             (extract(epoch FROM now() - state_change) * 1000)::int8, \
                             left(query, 80)) \
                             FROM pg_stat_activity WHERE datname = current_database()",
                            &[],
                        )
                        .await
                        .unwrap();
                    let sessions: Vec<String> = sessions.iter().map(|r| r.get(0)).collect();
                    panic!("{what}; sessions: {sessions:#?}");
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    seen(
        "wait_event_type = 'Lock'",
        10,
        "the recording never reached the endpoint",
    )
    .await;
    a.freeze();
    lock.commit().await.unwrap();
    seen(
        "state = 'idle in transaction'",
        2,
        "the transaction never waited on the node",
    )
    .await;
    recv.set_script(|_, _| Answer::status(200));
    let b = Server::process_with_db(&args, &url);
    recv.wait_until(Duration::from_secs(20), |r| all_answered(r, &ids, 200))
        .await;
    let mut recorded = HashMap::new();
    for id in &ids {
        let e = wait_status(b.addr, &key, id, "delivered", Duration::from_secs(10)).await;
        recorded.insert(id.clone(), e["attempts"].clone());
    }
    thaw_and_see_nothing_sent(&a, &recv).await;
    for id in &ids {
        let oks = recv
            .for_event(id)
            .iter()
            .filter(|r| r.answered == 200)
            .count();
        assert_eq!(oks, 1, "{id} was delivered {oks} times");
        for node in [a.addr, b.addr] {
            let e = get(node, &key, &format!("/api/events/{id}")).await.json();
            assert_eq!(e["status"], "delivered", "{e}");
            assert_eq!(e["attempts"], recorded[id], "{e}");
            assert_eq!(
                e["attempts"].as_u64().unwrap() as usize,
                e["delivery_attempts"].as_array().unwrap().len(),
                "{e}"
            );
        }
    }
    let client = db_at(&url).await;
    assert_eq!(
        count(&client, DUE).await,
        0,
        "a delivered delivery was made due again"
    );
    // The node that was frozen is whole: ready, and it takes and delivers a new event.
    assert_eq!(get(a.addr, "", "/health/ready").await.status, 200);
    let id = new_event_id(a.addr, &key, json!({"after": "thaw"})).await;
    wait_status(a.addr, &key, &id, "delivered", Duration::from_secs(10)).await;
}

/// A node stopped while its attempts wait for their answers (SIGSTOP, a paused VM or container)
/// finds their timers long past when it runs again. That wait was not the receiver's: the
/// attempts are the server's trouble (tried again, not counted against the endpoint), so no
/// circuit opens and each event is delivered with one attempt in its log. Before, each counted
/// as a failed attempt: twelve opened the endpoint's circuit for 30 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_whose_node_was_stopped_open_no_circuit() {
    let url = own_database("triggers_test_stopped_attempts").await;
    let recv = sitting_receiver().await;
    let args = [
        "--allow-private-webhooks",
        "--delivery-timeout-ms",
        "2000",
        "--delivery-lease-s",
        "10",
        "--retry-schedule",
        "200ms",
    ];
    let s = Server::process_with_db(&args, &url);
    let (key, _) = new_org(s.addr, "pro").await;
    create_endpoint(s.addr, &key, json!({"url": recv.url("/")})).await;
    let ids = create_events(s.addr, &key, 12, "t").await;
    each_received(&recv, &ids).await;
    // Stopped within the attempts' 2 s, for longer than 2 s and the 1 s a timer may be late.
    s.freeze();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    s.thaw();
    for id in &ids {
        let e = wait_status(s.addr, &key, id, "delivered", Duration::from_secs(10)).await;
        assert_eq!(e["attempts"], 1, "{e}");
    }
    assert_eq!(metric(&s, "triggers_endpoint_circuits_open").await, 0.0);
    assert!(s.logged("this node did not run meanwhile").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_frozen_mid_attempt_records_nothing_over_the_node_that_took_over() {
    // The same stall with first attempts in flight under a claimed batch's lease (a resumed
    // backlog). The receiver sits on them; another node takes the batch over when its lease runs
    // out and delivers each event. When the stopped node goes on, its attempts are long past their
    // time: each event was sent twice (at least once allows it; the first was sent before the
    // stall), but what the stopped node makes of its attempts is not recorded over the other
    // node's record: every event reads delivered, with the one attempt the other node made, on
    // both nodes, and nothing is sent after the stall.
    let url = own_database("triggers_test_frozen_mid_attempt").await;
    let recv = sitting_receiver().await;
    let (a, key, ids) = first_attempts_in_flight(&url, &recv, 10).await;
    a.freeze();
    let b = Server::process_with_db(&SHORT_LEASE, &url);
    recv.wait_until(Duration::from_secs(20), |r| {
        ids.iter()
            .all(|id| r.iter().filter(|x| x.event_id() == *id).count() >= 2)
    })
    .await;
    for id in &ids {
        wait_status(b.addr, &key, id, "delivered", Duration::from_secs(10)).await;
    }
    thaw_and_see_nothing_sent(&a, &recv).await;
    for id in &ids {
        assert_eq!(
            recv.for_event(id).len(),
            2,
            "{}",
            timeline(&recv.for_event(id))
        );
        for node in [a.addr, b.addr] {
            let e = get(node, &key, &format!("/api/events/{id}")).await.json();
            assert_eq!(e["status"], "delivered", "{e}");
            let attempts = e["attempts"].as_u64().unwrap() as usize;
            let log = e["delivery_attempts"].as_array().unwrap();
            // The other node's attempt only: the stalled node's ended under a lease that was no
            // longer its own.
            assert_eq!(attempts, 1, "{e}");
            assert_eq!(log.len(), 1, "{e}");
            assert_eq!(e["deliveries"][0]["status"], "delivered", "{e}");
        }
    }
    let client = db_at(&url).await;
    assert_eq!(
        count(&client, DUE).await,
        0,
        "a delivered delivery was made due again"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while count(&client, "SELECT count(*) FROM delivery_batches").await > 0 {
        assert!(Instant::now() < deadline, "a settled batch row was left");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_claims_plan_looks_rows_up_by_key_whatever_the_estimates() {
    // The claim runs on its generic plan, planned without its parameters (the server forces it:
    // planning it afresh each time cost ~1 ms a claim): the claim's LIMIT is taken for a tenth
    // of the table. Written as plain joins, that plan hashed the whole deliveries table at every
    // claim once a backlog was large (281 µs of PostgreSQL per claimed row with 200,000 due; here
    // 500,000 due for five endpoints): a drain's cost grew with its backlog.
    let url = own_database("triggers_test_claim_plan").await;
    let mut s = Server::process_with_db(&["--allow-private-webhooks"], &url);
    let (key, org) = new_org(s.addr, "pro").await;
    let ep = create_endpoint(s.addr, &key, json!({"url": "http://127.0.0.1:9/x"})).await;
    let ep = ep["id"].as_str().unwrap();
    s.stop();
    let p = v7_prefix_now();
    let client = db_at(&url).await;
    client
        .batch_execute(&format!(
            "WITH ev AS ( \
                 INSERT INTO events (id, org_id, type, payload, status, endpoints, created_at) \
                 SELECT ('{p}-7000-8000-' || lpad(to_hex(g), 12, '0'))::uuid, '{org}', 't', \
                        '{{}}', 3, ARRAY['{ep}']::uuid[], now() \
                 FROM generate_series(1, 100000) g RETURNING id) \
             INSERT INTO deliveries (event_id, endpoint_id, org_id, next_attempt_at) \
             SELECT ev.id, x.ep, '{org}', now() \
             FROM ev, (SELECT '{ep}'::uuid AS ep UNION ALL \
                       SELECT gen_random_uuid() FROM generate_series(1, 4)) x; \
             ANALYZE events, deliveries; \
             {begin}; \
             PREPARE claim(timestamptz, uuid[], bigint, timestamptz, uuid) AS {claim}",
            begin = triggers::delivery::claim::CLAIM_BEGIN,
            claim = triggers::delivery::claim::CLAIM
        ))
        .await
        .unwrap();
    let plan = explain_claim(&client, "COSTS OFF").await.join("\n");
    // The server's claim transaction runs it on this plan, not on one made for the values.
    let planned = client
        .query_one(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE name = 'claim'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (planned.get::<_, i64>(0), planned.get::<_, i64>(1)),
        (1, 0),
        "the claim's plans: (generic, custom)"
    );
    for table in ["deliveries", "events"] {
        let part: String = client
            .query_one(
                &format!("SELECT tableoid::regclass::text FROM {table} LIMIT 1"),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(
            !plan.contains(&format!("Seq Scan on {part} ")),
            "the claim scans {part}:\n{plan}"
        );
    }
    // Run, the claim's delete looks in its rows' day partition only: the generic plan prunes the
    // other days by the rows' range of ids (by the array alone it looked in every day's key).
    let ran = explain_claim(&client, "ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF").await;
    let part: String = client
        .query_one("SELECT tableoid::regclass::text FROM events LIMIT 1", &[])
        .await
        .unwrap()
        .get(0);
    let part = part.replace("events", "deliveries");
    // The delete's and the update's scans (`d_N`), not the due rows' merge (`deliveries_N`).
    let scans: Vec<&String> = ran
        .iter()
        .filter(|l| l.contains("Scan") && l.contains(" on deliveries_") && l.contains(" d_"))
        .collect();
    assert!(
        scans
            .iter()
            .any(|l| l.contains(&format!(" on {part} ")) && !l.contains("(never executed)")),
        "the delete looks in {part}:\n{}",
        ran.join("\n")
    );
    for line in scans {
        assert!(
            line.contains(&format!(" on {part} ")) || line.contains("(never executed)"),
            "only {part} is looked in:\n{}",
            ran.join("\n")
        );
    }
}

/// The lines of `EXPLAIN (options)` of the prepared claim, for up to 1,000 rows due now.
async fn explain_claim(client: &tokio_postgres::Client, options: &str) -> Vec<String> {
    client
        .query(
            &format!(
                "EXPLAIN ({options}) EXECUTE claim(now(), '{{}}', 1000, \
                 now() + interval '1 minute', gen_random_uuid())"
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claimed_redelivery_with_an_earlier_success_is_owed_after_a_crash() {
    // A redelivery racing the first attempt's success can leave a due row with no attempt counted
    // while the log holds that success. Claimed, the row leaves the table; if its node then dies,
    // the success from before the claim must not count as this round's: the member is given its
    // row back and delivered again.
    let url = own_database("triggers_test_claim_since").await;
    let recv = Receiver::start(|_, _| Answer::status(200)).await;
    let args = ["--allow-private-webhooks", "--delivery-poll-ms", "200"];
    let mut s = Server::process_with_db(&args, &url);
    let (key, org) = new_org(s.addr, "pro").await;
    let ep = create_endpoint(s.addr, &key, json!({"url": recv.url("/")})).await;
    let ep = ep["id"].as_str().unwrap();
    s.stop();
    let ev = format!("{}-7000-8000-000000000001", v7_prefix_now());
    db_at(&url)
        .await
        .batch_execute(&format!(
            "INSERT INTO events (id, org_id, type, payload, status, endpoints, created_at) \
             VALUES ('{ev}', '{org}', 't', '{{}}', 3, ARRAY['{ep}']::uuid[], now()); \
             INSERT INTO delivery_attempts (event_id, endpoint_id, attempt, at, response_status, \
                                            duration_ms, org_id) \
             VALUES ('{ev}', '{ep}', 1, now() - interval '1 minute', 200, 1, '{org}'); \
             INSERT INTO delivery_batches (id, lease_until, members_until, members_since, \
                                           first_event, last_event, org_id, members_event, \
                                           members_endpoint, members_org) \
             VALUES (gen_random_uuid(), 'infinity', now() - interval '1 second', \
                     now() - interval '30 seconds', '{ev}', '{ev}', '{org}', ARRAY['{ev}']::uuid[], \
                     ARRAY['{ep}']::uuid[], ARRAY['{org}']::uuid[])"
        ))
        .await
        .unwrap();
    let s = Server::process_with_db(&args, &url);
    recv.wait_until(Duration::from_secs(10), |r| {
        r.iter().any(|x| x.event_id() == ev)
    })
    .await;
    // Read as delivered (by the success before) while the new attempt's outcome is on its way:
    // it is done when the log holds both.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let e = event_json(s.addr, &key, &ev).await;
        if e["status"] == "delivered" && e["attempts"] == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "not delivered again: {e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The restarted node's `triggers_endpoint_cache_loads_total`.
async fn endpoint_cache_loads(s: &Server) -> f64 {
    metric(s, "triggers_endpoint_cache_loads_total").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_endpoint_cache_loads_an_organizations_endpoints_once_for_all_its_deliveries() {
    // 200 retries handed back at a graceful stop are all due when the node restarts with an
    // empty cache: their jobs start together and each needs the endpoint. They share one load
    // (a few more if a health write drops the organization meanwhile), not one each.
    let url = own_database("triggers_test_cold_cache").await;
    let recv = Receiver::start(|_, _| Answer::status(500)).await;
    let args = [
        "--allow-private-webhooks",
        "--delivery-poll-ms",
        "200",
        "--retry-schedule",
        "1s,1s,1s,1s,1s",
        "--circuit-failures",
        "1000",
    ];
    let mut s = Server::process_with_db(&args, &url);
    let (key, _) = new_org(s.addr, "business").await;
    set_webhook(s.addr, &key, &recv.url("/")).await;
    let ids = create_events(s.addr, &key, 200, "t").await;
    recv.wait_until(Duration::from_secs(10), |r| r.len() >= 200)
        .await;
    assert_eq!(tokio::task::block_in_place(|| s.stop()), Some(0));
    recv.set_script(|_, _| Answer::status(200));
    tokio::task::block_in_place(|| s.restart());
    recv.wait_until(Duration::from_secs(20), |r| all_answered(r, &ids, 200))
        .await;
    let loads = endpoint_cache_loads(&s).await;
    assert!(
        (1.0..=4.0).contains(&loads),
        "{loads} endpoint loads for one organization's 200 deliveries"
    );
}

/// Proves: deliveries to one receiver reuse one connection while it stays open, and a receiver
/// that closes its connection after each answer (without a `Connection: close`) costs no failed
/// attempt: the closed connection is noticed when it is taken again, and a new one is opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_reused_and_one_the_receiver_closed_costs_no_attempt() {
    let recv = Receiver::start(|_, _| Answer::status(200)).await;
    let url = own_database("triggers_test_reused_connections").await;
    let s = Server::start_with_db(&["--allow-private-webhooks"], &url);
    let (key, _) = new_org(s.addr, "pro").await;
    set_webhook(s.addr, &key, &recv.url("/")).await;
    for _ in 0..5 {
        let id = new_event_id(s.addr, &key, json!(1)).await;
        wait_status(s.addr, &key, &id, "delivered", Duration::from_secs(5)).await;
    }
    assert_eq!(recv.connections(), 1, "one connection for five deliveries");

    // Closed a little after the answer: the connection is idle again by then.
    recv.set_script(|_, _| Answer {
        close_after: Some(Duration::from_millis(20)),
        ..Answer::status(200)
    });
    for _ in 0..5 {
        let id = new_event_id(s.addr, &key, json!(1)).await;
        let e = wait_status(s.addr, &key, &id, "delivered", Duration::from_secs(5)).await;
        assert_eq!(e["attempts"], 1, "{e}");
        // The receiver's FIN is in before the next delivery takes the connection.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The open one closed after the first answer; each later delivery opened its own.
    assert_eq!(recv.connections(), 5);
    assert_eq!(
        metric(&s, "triggers_delivery_connections_opened_total").await,
        5.0
    );
    assert_eq!(recv.received().len(), 10, "nothing was sent twice");
}

/// Proves: whatever ends a delivery (a success, a dead letter after its retries), what it held
/// in memory is given back once its outcome is written: the queue depth returns to 0 and every
/// batch row is settled and deleted. (Ended jobs do not wait for their outcome's write; the
/// recorder lets them go, so a missed let-go would leave the gauge up and a batch row behind.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_ended_delivery_gives_its_place_back() {
    let url = own_database("triggers_test_let_go").await;
    let recv = Receiver::start(|r, _| {
        let n = r.json()["data"]["n"].as_i64().unwrap_or(0);
        Answer::status(if n % 2 == 0 { 200 } else { 500 })
    })
    .await;
    let args = [
        "--allow-private-webhooks",
        "--retry-schedule",
        "100ms",
        "--circuit-failures",
        "1000",
    ];
    let s = Server::process_with_db(&args, &url);
    let (key, _) = new_org(s.addr, "pro").await;
    set_webhook(s.addr, &key, &recv.url("/")).await;
    let mut ids = Vec::new();
    for n in 0..30 {
        ids.push((n, new_event_id(s.addr, &key, json!({ "n": n })).await));
    }
    for (n, id) in &ids {
        let status = if n % 2 == 0 { "delivered" } else { "failed" };
        wait_status(s.addr, &key, id, status, Duration::from_secs(10)).await;
    }
    let client = db_at(&url).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let depth = metric(&s, "triggers_delivery_queue_depth").await;
        let batches = count(&client, "SELECT count(*) FROM delivery_batches").await;
        if depth == 0.0 && batches == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{depth} deliveries still held in memory, {batches} batch rows left"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        recv.received().len(),
        15 + 15 * 2,
        "one attempt each, two per failure"
    );
}

/// The database refuses the record of deliveries that were made (a full disk: every attempt row
/// is refused with 53100, for a second and a half, well within the 3 s lease). The outcomes are
/// written again until it takes them: each event was sent once, its log holds that one attempt,
/// it reads delivered, and nothing is sent again once its lease is over. (Before, the outcomes
/// were dropped at the first refusal, and every delivery was made again when its lease ran out.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_whose_record_the_database_refused_for_a_moment_are_not_made_again() {
    let url = own_database("triggers_test_record_refused").await;
    let recv = Receiver::start(|_, _| Answer::status(200)).await;
    let s = Server::start_with_db(&SHORT_LEASE, &url);
    let (key, _) = new_org(s.addr, "pro").await;
    create_endpoint(s.addr, &key, json!({"url": recv.url("/")})).await;
    let db = db_at(&url).await;
    let lock = triggers::store::retention::LOCK_ID;
    db.batch_execute(&format!(
        "BEGIN; SELECT pg_advisory_xact_lock({lock}); \
         CREATE TABLE refuse_records (); INSERT INTO refuse_records DEFAULT VALUES; \
         CREATE FUNCTION refuse_records() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           IF EXISTS (SELECT 1 FROM refuse_records) THEN \
             RAISE EXCEPTION 'could not extend file: No space left on device' \
               USING ERRCODE = 'disk_full'; \
           END IF; RETURN NEW; END $$; \
         CREATE TRIGGER refuse_records BEFORE INSERT ON delivery_attempts \
           FOR EACH ROW EXECUTE FUNCTION refuse_records(); \
         COMMIT;"
    ))
    .await
    .unwrap();
    let ids = create_events(s.addr, &key, 20, "t").await;
    each_received(&recv, &ids).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        count(&db, "SELECT count(*) FROM delivery_attempts").await,
        0
    );
    db.batch_execute("DELETE FROM refuse_records")
        .await
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(10);
    for id in &ids {
        loop {
            let event = get(s.addr, &key, &format!("/api/events/{id}")).await.json();
            if event["status"] == "delivered" {
                assert_eq!(
                    event["delivery_attempts"].as_array().unwrap().len(),
                    1,
                    "{event}"
                );
                break;
            }
            assert!(Instant::now() < deadline, "not recorded: {event}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Past every lease (3 s) and a few claims: nothing was sent again.
    tokio::time::sleep(Duration::from_secs(4)).await;
    each_received_times(&recv, &ids, 1);
    assert_eq!(
        count(&db, "SELECT count(*) FROM delivery_attempts").await,
        20
    );
}
