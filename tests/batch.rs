//! POST /api/events/batch: one result per item in order, every 201 committed before the answer,
//! dedup inside the batch and against the database, the rate limit all or nothing, the body
//! limits, fast-ack mode, and the database's trouble answered 503; against the real server and
//! the real database.

mod common;

use common::*;
use serde_json::{json, Value};
use std::sync::OnceLock;

fn server() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| Server::start(&[]))
}

async fn batch(addr: std::net::SocketAddr, key: &str, events: Value) -> Response {
    post(addr, key, "/api/events/batch", &json!({ "events": events })).await
}

async fn stored(org: &str) -> Vec<(String, String, Option<String>, String)> {
    db().await
        .query(
            "SELECT id::text, type, dedup_id, payload::text FROM events \
             WHERE org_id = $1::text::uuid ORDER BY id",
            &[&org],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

#[tokio::test]
async fn every_item_gets_its_own_result_in_order_and_each_201_is_committed() {
    let s = server();
    let (key, org) = new_org(s.addr, "pro").await;
    let big = "x".repeat(300_000);
    let r = batch(
        s.addr,
        &key,
        json!([
            {"type": "order.paid", "payload": {"n": 1}},
            {"type": "", "payload": {}},
            {"type": "order.paid", "payload": {"n": 2}, "dedup_id": "d-1"},
            {"type": "order.paid", "payload": big},
            {"type": "order.paid"},
            "not an event",
            {"type": "triggers.delivery.failed", "payload": {}},
            {"type": "order.shipped", "payload": [1, 2, 3], "dedup_id": "d-1"},
            {"type": "order.shipped", "payload": null},
        ]),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let results = r.json()["results"].as_array().unwrap().clone();
    assert_eq!(results.len(), 9, "{results:?}");
    let statuses: Vec<i64> = results
        .iter()
        .map(|v| v["status"].as_i64().unwrap())
        .collect();
    assert_eq!(statuses, [201, 422, 201, 413, 422, 422, 422, 409, 422]);
    assert_eq!(results[1]["field"], "type");
    assert_eq!(results[1]["code"], "validation_failed");
    assert_eq!(results[3]["code"], "payload_too_large");
    assert_eq!(results[4]["field"], "payload");
    assert_eq!(results[5]["field"], "events");
    assert_eq!(results[6]["field"], "type");
    // The repeated dedup id names the first item's event.
    assert_eq!(results[7]["code"], "duplicate");
    assert_eq!(results[7]["event_id"], results[2]["id"]);
    // The two 201s are in the database already, with their payloads as sent.
    let rows = stored(&org).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    let ids: Vec<&str> = [&results[0], &results[2]]
        .iter()
        .map(|v| v["id"].as_str().unwrap())
        .collect();
    assert_eq!(rows[0].0, ids[0]);
    assert_eq!(rows[1].0, ids[1]);
    assert_eq!(rows[1].2.as_deref(), Some("d-1"));
    assert_eq!(rows[0].3, r#"{"n": 1}"#.replace(' ', ""));
    for v in [&results[0], &results[2]] {
        assert_eq!(v.as_object().unwrap().len(), 3, "{v}");
        assert!(v["created_at"].as_str().unwrap().ends_with('Z'));
    }
    // A token per item: nine spent.
    assert_eq!(r.header("x-ratelimit-remaining"), Some("991"));
}

#[tokio::test]
async fn a_dedup_id_already_stored_answers_409_with_the_first_event() {
    let s = server();
    let (key, org) = new_org(s.addr, "pro").await;
    let first = post_event(s.addr, &key, "a", json!({}), Some("k-7")).await;
    assert_eq!(first.status, 201);
    let first_id = first.json()["id"].as_str().unwrap().to_string();
    let r = batch(
        s.addr,
        &key,
        json!([
            {"type": "a", "payload": {}, "dedup_id": "k-7"},
            {"type": "a", "payload": {}, "dedup_id": "k-7"},
            {"type": "a", "payload": {}, "dedup_id": "k-8"},
        ]),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let results = r.json()["results"].clone();
    assert_eq!(results[0]["status"], 409);
    assert_eq!(results[0]["event_id"], first_id.as_str());
    // The repeat inside the batch names the event its first item turned out to be.
    assert_eq!(results[1]["status"], 409);
    assert_eq!(results[1]["event_id"], first_id.as_str());
    assert_eq!(results[2]["status"], 201);
    assert_eq!(stored(&org).await.len(), 2);
}

#[tokio::test]
async fn a_batch_larger_than_the_tokens_left_is_refused_whole_and_spends_nothing() {
    let s = server();
    let (key, org) = new_org(s.addr, "free").await;
    // Six a minute (one token back every 10 s) rather than the free tier's 100 (one every 0.6 s):
    // a commit stalled by a checkpoint or another test's DDL must not refill the one token this
    // test's boundary is about. The node that generated the key remembers the tier's limit, so
    // the requests go to a node of their own, which reads the changed row.
    db().await
        .execute(
            "UPDATE organizations SET rate_limit_per_minute = 6 WHERE id = $1::text::uuid",
            &[&org],
        )
        .await
        .unwrap();
    let s = Server::start(&[]);
    let r = batch(s.addr, &key, json!([{"type": "a", "payload": 1}])).await;
    assert_eq!(r.status, 200);
    let limit: usize = r.header("x-ratelimit-limit").unwrap().parse().unwrap();
    assert_eq!(limit, 6);
    let left: usize = r.header("x-ratelimit-remaining").unwrap().parse().unwrap();
    assert_eq!(left, limit - 1);
    // One more item than tokens left: 429, nothing stored, nothing spent.
    let items: Vec<Value> = (0..=left)
        .map(|i| json!({"type": "a", "payload": {"i": i}}))
        .collect();
    let r = batch(s.addr, &key, Value::from(items.clone())).await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(error_code(&r), "rate_limited");
    assert!(r.header("retry-after").is_some());
    assert_eq!(stored(&org).await.len(), 1);
    let remaining: usize = r.header("x-ratelimit-remaining").unwrap().parse().unwrap();
    assert!(remaining >= left, "{remaining} < {left}: tokens were spent");
    // Exactly the tokens left: taken whole.
    let r = batch(s.addr, &key, Value::from(items[..left].to_vec())).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(stored(&org).await.len(), 1 + left);
}

#[tokio::test]
async fn the_envelope_is_checked_before_any_item() {
    let s = server();
    let (key, org) = new_org(s.addr, "pro").await;
    for (body, why) in [
        (json!({}), "missing"),
        (json!({"events": []}), "empty"),
        (json!({"events": {"type": "a"}}), "not an array"),
        (json!({"events": null}), "null"),
        (
            json!({"events": (0..1001).map(|_| json!({"type": "a", "payload": 1})).collect::<Vec<_>>()}),
            "1001 items",
        ),
    ] {
        let r = post(s.addr, &key, "/api/events/batch", &body).await;
        assert_eq!(r.status, 422, "{why}: {}", r.text());
        assert_eq!(r.json()["field"], "events", "{why}");
    }
    let r = call(
        s.addr,
        "POST",
        "/api/events/batch",
        &[("X-API-Key", &key), ("Content-Type", "application/json")],
        Some(b"{\"events\": [}"),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(error_code(&r), "invalid_json");
    let r = call(
        s.addr,
        "GET",
        "/api/events/batch",
        &[("X-API-Key", &key)],
        None,
    )
    .await;
    assert_eq!(r.status, 405);
    assert!(stored(&org).await.is_empty());
}

#[tokio::test]
async fn a_thousand_events_fit_and_the_body_limit_is_4_mib_by_its_header() {
    let s = server();
    let (key, org) = new_org(s.addr, "enterprise").await;
    // 1,000 events of 3 KiB: about 3 MiB, over the single-request limit, under the batch one.
    let pad = "p".repeat(3000);
    let items: Vec<Value> = (0..1000)
        .map(|i| json!({"type": "bulk", "payload": {"i": i, "pad": pad}, "dedup_id": format!("b-{i}")}))
        .collect();
    let r = batch(s.addr, &key, Value::from(items)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let results = r.json()["results"].as_array().unwrap().clone();
    assert!(results.iter().all(|v| v["status"] == 201));
    assert_eq!(stored(&org).await.len(), 1000);
    // A declared body over 4 MiB: 413 before it is read.
    let mut conn = Conn::open(s.addr).await;
    let head = format!(
        "POST /api/events/batch HTTP/1.1\r\nHost: t\r\nX-API-Key: {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        4 * 1024 * 1024 + 1
    );
    conn.send(head.as_bytes()).await;
    let r = conn.read().await.expect("an answer from the head alone");
    assert_eq!(r.status, 413);
    assert_eq!(error_code(&r), "payload_too_large");
}

#[tokio::test]
async fn fast_ack_answers_202_items_and_stores_them() {
    let s = Server::start(&["--ack", "fast"]);
    let (key, org) = new_org(s.addr, "pro").await;
    let r = batch(
        s.addr,
        &key,
        json!([{"type": "a", "payload": 1}, {"type": "", "payload": 2}, {"type": "b", "payload": 3}]),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let statuses: Vec<i64> = r.json()["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["status"].as_i64().unwrap())
        .collect();
    assert_eq!(statuses, [202, 422, 202]);
    for _ in 0..100 {
        if stored(&org).await.len() == 2 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("the 202 items were not stored");
}

/// The events stored in a database of a test's own.
async fn count_events(url: &str) -> i64 {
    db_at(url)
        .await
        .query_one("SELECT count(*) FROM events", &[])
        .await
        .unwrap()
        .get(0)
}

/// Make a database of a test's own read-only (or writable again) for real: every new session
/// starts read-only, and the sessions open now are ended, so the server's next ones are.
async fn set_read_only(name: &str, on: bool) {
    let admin = db().await;
    let setting = match on {
        true => "SET default_transaction_read_only = on",
        false => "RESET default_transaction_read_only",
    };
    admin
        .batch_execute(&format!("ALTER DATABASE {name} {setting}"))
        .await
        .unwrap();
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
            &[&name],
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn a_read_only_database_answers_503_not_the_clients_fault() {
    // A database of its own: the others' servers keep writing to theirs.
    let name = "triggers_test_read_only";
    let url = own_database(name).await;
    let s = Server::process_with_db(&[], &url);
    let (key, _) = new_org(s.addr, "pro").await;
    let events = json!([{"type": "a", "payload": 1}, {"type": "b", "payload": 2, "dedup_id": "x"}]);
    set_read_only(name, true).await;
    // Every answer is 503 with Retry-After (the first may be for the ended sessions, the rest
    // for the read-only ones), never a 4xx, until the server has met the read-only database.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let r = batch(s.addr, &key, events.clone()).await;
        assert_eq!(r.status, 503, "{}", r.text());
        assert!(r.header("retry-after").is_some());
        if !s.log_lines("read-only").is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the read-only database was not noticed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(count_events(&url).await, 0);
    // Once the database takes writes again (the server notices within seconds; until then it
    // answers 503, never a 4xx) the same batch goes through.
    set_read_only(name, false).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let r = batch(s.addr, &key, events.clone()).await;
        if r.status == 200 {
            let results = r.json()["results"].clone();
            assert_eq!(results[0]["status"], 201, "{results}");
            assert_eq!(results[1]["status"], 201, "{results}");
            break;
        }
        assert_eq!(r.status, 503, "{}", r.text());
        assert!(std::time::Instant::now() < deadline, "still 503");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(count_events(&url).await, 2);
}

#[tokio::test]
async fn a_deadlock_victims_batch_is_written_again_not_answered_503() {
    let url = own_database("triggers_test_rerun").await;
    let s = Server::process_with_db(&[], &url);
    let (key, _) = new_org(s.addr, "pro").await;
    // The first insert into events is refused as a deadlock's victim would be.
    deadlock_victim_once(&url, "events").await;
    let r = batch(
        s.addr,
        &key,
        json!([{"type": "a", "payload": 1}, {"type": "b", "payload": 2}]),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let results = r.json()["results"].clone();
    assert_eq!(results[0]["status"], 201, "{results}");
    assert_eq!(results[1]["status"], 201, "{results}");
    assert_eq!(count_events(&url).await, 2);
    assert!(
        s.logged("must be run again").await,
        "the deadlock was never met"
    );
}

#[tokio::test]
async fn a_writers_connection_ended_before_commit_is_written_again_not_answered_503() {
    let url = own_database("triggers_test_writer_reconnect").await;
    let s = Server::process_with_db(&[], &url);
    let (key, _) = new_org(s.addr, "pro").await;
    // The backend writing the first event is terminated mid-transaction: nothing of it was
    // committed, and the writer's other connections (and the database) are fine.
    backend_ends_once(&url, "events").await;
    let r = post_event(s.addr, &key, "a", json!(1), None).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let r = batch(
        s.addr,
        &key,
        json!([{"type": "b", "payload": 2}, {"type": "c", "payload": 3, "dedup_id": "x"}]),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let results = r.json()["results"].clone();
    assert_eq!(results[0]["status"], 201, "{results}");
    assert_eq!(results[1]["status"], 201, "{results}");
    assert_eq!(count_events(&url).await, 3);
    assert!(
        s.logged("connection lost before COMMIT").await,
        "the terminated backend was never met"
    );
}

#[tokio::test]
async fn events_whose_delivery_lease_was_not_written_are_not_committed() {
    // The events and their delivery lease are one transaction, however its requests are sent
    // (BEGIN goes with the COPY): the lease row failing must roll back the events, and the
    // answer is the server's fault. With COMMIT sent before the lease's INSERT the events would
    // be stored here.
    let WebhookNode {
        url,
        server: s,
        receiver: rx,
        key,
    } = WebhookNode::start("triggers_test_lease_fails").await;
    db_at(&url)
        .await
        .batch_execute(
            "CREATE FUNCTION refuse_lease() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
               RAISE EXCEPTION 'no space left' USING ERRCODE = '53100'; END $$; \
             CREATE TRIGGER refuse_lease BEFORE INSERT ON delivery_batches \
               FOR EACH ROW EXECUTE FUNCTION refuse_lease();",
        )
        .await
        .unwrap();
    let single = post_event(s.addr, &key, "a", json!(1), None).await;
    assert_eq!(single.status, 503, "{}", single.text());
    assert!(single.header("retry-after").is_some());
    let r = batch(s.addr, &key, json!([{"type": "b", "payload": 2}])).await;
    assert!(
        r.status == 503 || r.json()["results"][0]["status"] == 503,
        "{}",
        r.text()
    );
    assert_eq!(count_events(&url).await, 0);
    assert!(rx.received().is_empty());
}

#[tokio::test]
async fn batch_events_are_delivered_like_single_ones() {
    // Its own database: the other tests' nodes here refuse private targets, and would refuse a
    // delivery of this test's that became a due row any node may claim.
    let WebhookNode {
        server: s,
        receiver: rx,
        key,
        ..
    } = WebhookNode::start("triggers_test_batch_delivery").await;
    let items: Vec<Value> = (0..50)
        .map(|i| json!({"type": "order.paid", "payload": {"i": i}}))
        .collect();
    let r = batch(s.addr, &key, Value::from(items)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let ids: Vec<String> = r.json()["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_string())
        .collect();
    let got = rx
        .wait_until(std::time::Duration::from_secs(10), |got| got.len() >= 50)
        .await;
    for id in &ids {
        let deliveries: Vec<_> = got.iter().filter(|g| &g.event_id() == id).collect();
        assert_eq!(deliveries.len(), 1, "event {id}");
    }
    // Each event's status becomes delivered (once the attempt is recorded, just after it).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let detail = get(s.addr, &key, &format!("/api/events/{}", ids[49]))
            .await
            .json();
        if detail["deliveries"][0]["status"] == "delivered" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{detail}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
