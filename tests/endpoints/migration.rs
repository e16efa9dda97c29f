//! A version 1 database migrated with pending deliveries, and the version 1 webhook configuration against its default endpoint.

use super::*;

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
    let url = own_database("triggers_test_webhook_again_paused").await;
    let s = Server::start_with_db(&[PRIVATE], &url);
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
    let url = own_database("triggers_test_webhook_again_deleted").await;
    let s = Server::start_with_db(&[PRIVATE, "--retry-schedule", "60s"], &url);
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
    // And their rows say so. (A retry that looked at the endpoint just before the delete, and
    // was told of the delete while it looked, once went back to wait 60 s on what it saw.)
    let db = db_at(&url).await;
    poll_until(
        || async {
            let parked = "SELECT count(*) FROM deliveries \
                          WHERE next_attempt_at IS NULL AND lease_until IS NULL";
            count(&db, parked).await == 2
        },
        "the retries' rows were never parked",
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
