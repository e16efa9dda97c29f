//! The pull inbox and acks: cursor walks, status filters, idempotent and batch acks, aliases.

mod common;

use std::collections::HashSet;
use std::sync::OnceLock;

use common::*;
use serde_json::{json, Value};

fn server() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| Server::start(&[]))
}

async fn page(key: &str, query: &str) -> Value {
    let r = get(server().addr, key, &format!("/api/inbox{query}")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header("x-ratelimit-limit").is_some());
    r.json()
}

#[tokio::test]
async fn walking_every_page_returns_each_event_once_while_new_ones_arrive() {
    let s = server();
    let (key, _) = new_org(s.addr, "business").await;
    let before: HashSet<String> = create_events(server().addr, &key, 350, "old")
        .await
        .into_iter()
        .collect();

    // Keep posting while the walk runs.
    let writer = {
        let key = key.clone();
        tokio::spawn(async move { create_events(server().addr, &key, 120, "new").await })
    };
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let q = match &cursor {
            Some(c) => format!("?limit=37&cursor={c}"),
            None => "?limit=37".to_string(),
        };
        let p = page(&key, &q).await;
        let events = p["events"].as_array().unwrap();
        assert!(events.len() <= 37);
        for e in events {
            seen.push(e["id"].as_str().unwrap().to_string());
        }
        pages += 1;
        match p["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
        tokio::task::yield_now().await;
    }
    let during: HashSet<String> = writer.await.unwrap().into_iter().collect();
    assert!(pages >= 10);
    let unique: HashSet<String> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "no event twice");
    assert!(
        before.is_subset(&unique),
        "every event that existed when the walk began"
    );
    assert!(unique.is_subset(&before.union(&during).cloned().collect()));
    // Newest first.
    let mut sorted = seen.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(seen, sorted);
}

#[tokio::test]
async fn inbox_items_carry_the_documented_fields() {
    let s = server();
    let (key, _) = new_org(s.addr, "pro").await;
    let r = post_event(
        s.addr,
        &key,
        "user.created",
        json!({"name": "Ada"}),
        Some("u-1"),
    )
    .await;
    let created = r.json();
    let p = page(&key, "").await;
    assert_eq!(
        p,
        json!({"events": [{
            "id": created["id"], "type": "user.created", "payload": {"name": "Ada"}, "dedup_id": "u-1",
            "status": "pending", "attempts": 0, "created_at": created["created_at"], "delivered_at": null
        }], "next_cursor": null})
    );
    assert_eq!(
        page(&key, "?status=delivered").await,
        json!({"events": [], "next_cursor": null})
    );
}

#[tokio::test]
async fn ack_moves_an_event_to_delivered_idempotently() {
    let s = server();
    let (key, _) = new_org(s.addr, "pro").await;
    let ids = create_events(server().addr, &key, 3, "t").await;
    let r = post_empty(s.addr, &key, &format!("/api/ack/{}", ids[0])).await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["id"], ids[0].as_str());
    assert_eq!(v["status"], "delivered");
    let first_ack = v["acknowledged_at"].clone();
    assert!(first_ack.as_str().unwrap().ends_with('Z'));
    // A repeat answers the first acknowledged_at.
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let again = post_empty(s.addr, &key, &format!("/api/inbox/ack/{}", ids[0])).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.json()["acknowledged_at"], first_ack);

    let pending: Vec<String> = page(&key, "").await["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(pending, vec![ids[2].clone(), ids[1].clone()]);
    let delivered = page(&key, "?status=delivered").await;
    assert_eq!(delivered["events"][0]["id"], ids[0].as_str());
    assert_eq!(delivered["events"][0]["status"], "delivered");
    assert_eq!(delivered["events"][0]["delivered_at"], first_ack);
}

#[tokio::test]
async fn ack_errors() {
    let s = server();
    let (a, _) = new_org(s.addr, "pro").await;
    let (b, _) = new_org(s.addr, "pro").await;
    let ids = create_events(server().addr, &a, 1, "t").await;
    let r = post_empty(s.addr, &b, &format!("/api/ack/{}", ids[0])).await;
    assert_eq!(r.status, 404, "another organization's event");
    assert_eq!(error_code(&r), "not_found");
    let r = post_empty(s.addr, &a, "/api/ack/01900000-0000-7000-8000-000000000000").await;
    assert_eq!(r.status, 404);
    let r = post_empty(s.addr, &a, "/api/ack/nope").await;
    assert_eq!(r.status, 422);
    assert_eq!(r.json()["field"], "event_id");
    // B's failed attempt changed nothing.
    assert_eq!(page(&a, "").await["events"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn batch_ack_reports_acknowledged_and_not_found_in_request_order() {
    let s = server();
    let (key, _) = new_org(s.addr, "pro").await;
    let (other, _) = new_org(s.addr, "pro").await;
    let ids = create_events(server().addr, &key, 4, "t").await;
    let foreign = create_events(server().addr, &other, 1, "t").await;
    let missing = "01900000-0000-7000-8000-000000000001";
    let body = json!({"event_ids": [ids[2], missing, ids[0], foreign[0], ids[2]]});
    let r = post(s.addr, &key, "/api/ack", &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({"acknowledged": [ids[2], ids[0]], "not_found": [missing, foreign[0]]})
    );
    // The alias, and idempotence.
    let r = post(
        s.addr,
        &key,
        "/api/inbox/ack",
        &json!({"event_ids": [ids[0], ids[1]]}),
    )
    .await;
    assert_eq!(
        r.json(),
        json!({"acknowledged": [ids[0], ids[1]], "not_found": []})
    );
    let pending = page(&key, "").await;
    assert_eq!(pending["events"].as_array().unwrap().len(), 1);
    assert_eq!(pending["events"][0]["id"], ids[3].as_str());
}

#[tokio::test]
async fn batch_ack_validation() {
    let s = server();
    let (key, _) = new_org(s.addr, "pro").await;
    let many: Vec<String> = (0..1001)
        .map(|i| format!("01900000-0000-7000-8000-{i:012}"))
        .collect();
    for body in [
        json!({}),
        json!({"event_ids": []}),
        json!({"event_ids": "x"}),
        json!({"event_ids": ["not-a-uuid"]}),
        json!({"event_ids": [1]}),
        json!({"event_ids": many}),
    ] {
        let r = post(s.addr, &key, "/api/ack", &body).await;
        assert_eq!(r.status, 422, "{body}");
        assert_eq!(r.json()["field"], "event_ids");
    }
    let r = call(
        s.addr,
        "POST",
        "/api/ack",
        &[("X-API-Key", &key)],
        Some(b"{}"),
    )
    .await;
    assert_eq!(r.status, 415);
}

#[tokio::test]
async fn inbox_parameter_errors_name_the_parameter() {
    let s = server();
    let (key, _) = new_org(s.addr, "pro").await;
    for (q, field) in [
        ("?limit=0", "limit"),
        ("?limit=1001", "limit"),
        ("?limit=x", "limit"),
        ("?status=archived", "status"),
        ("?cursor=garbage", "cursor"),
    ] {
        let r = get(s.addr, &key, &format!("/api/inbox{q}")).await;
        assert_eq!(r.status, 422, "{q}");
        assert_eq!(error_code(&r), "validation_failed");
        assert_eq!(r.json()["field"], field);
    }
    assert_eq!(
        get(s.addr, &key, "/api/inbox?limit=1000&status=failed")
            .await
            .status,
        200
    );
}
