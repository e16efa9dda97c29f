//! Changes racing deliveries: a pause, resume, delete or redelivery (on this node or another) against attempts in flight, recorders, hand-backs and take-overs; deadlock victims; acknowledged events.

use super::*;

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
        &resume.0,
        "the third failure's health did not wait for the resume",
    )
    .await;
    let got = recv.received();
    assert_eq!(
        got.len(),
        3,
        "{}{}",
        timeline(&got),
        attempts_and_waits(&client).await
    );
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
    wait_for_a_lock(
        &client,
        &resume.0,
        "the hand-back did not wait for the resume",
    )
    .await;
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
    wait_for_a_lock(
        &client,
        &resume.0,
        "recording the failure did not wait for the resume",
    )
    .await;
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
/// itself while the pause, holding the endpoint, waits for that delivery. PostgreSQL's victim is
/// the session whose one check, `deadlock_timeout` into its wait, finds the cycle: the server's
/// sessions check after 2.5 s (the cycle is made well before) and the other session never, so
/// the pause is the victim however slow the machine (with 1 s for both, a test that took over a
/// second to make the cycle had the other session picked: it failed now and then under load).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_picked_as_a_deadlock_victim_is_run_again() {
    let url = own_database("triggers_test_pause_rerun").await;
    let set = "ALTER DATABASE triggers_test_pause_rerun SET deadlock_timeout = '2500ms'";
    db_at(&url).await.batch_execute(set).await.unwrap();
    let (recv, s, key, ep, url) =
        failing_endpoint_in(url, "30", &["--retry-schedule", "60s"]).await;
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
            "SET deadlock_timeout = '1h'; \
             BEGIN; SELECT 1 FROM deliveries WHERE endpoint_id = '{id}' FOR UPDATE"
        ))
        .await
        .unwrap();
    let (addr, k, path) = (s.addr, key.clone(), format!("/api/endpoints/{id}/pause"));
    let pause = tokio::spawn(async move { post_empty(addr, &k, &path).await });
    wait_for_a_lock(&client, &other, "the pause did not wait for the delivery").await;
    // The cycle: PostgreSQL's check, 2.5 s after the pause began to wait, aborts the pause.
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
    // A process: its log is its own.
    let s = Server::process_with_db(&[PRIVATE], &url);
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
    wait_for_a_lock(
        &client,
        &take_over,
        "the redelivery did not wait for the batch row",
    )
    .await;
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
