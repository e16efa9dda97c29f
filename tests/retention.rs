//! Retention: daily partitions created ahead at start, expired days dropped whole with their
//! delivery records and dedup keys, nothing within the window touched. The maintenance round is
//! called with a clock moved forward (`retention::maintain` takes `now`), against a real database
//! of its own.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use triggers::ids::Micros;
use triggers::store::retention::{maintain, Clocks, TABLES};

const DAY_US: i64 = 86_400 * 1_000_000;

async fn partitions(client: &tokio_postgres::Client, table: &str) -> Vec<String> {
    let mut names: Vec<String> = client
        .query(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = $1::text::regclass",
            &[&table],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_days_go_whole_with_their_records_and_dedup_keys() {
    let recv = Receiver::start(|_, _| Answer::status(500)).await;
    let url = own_database("triggers_test_retention").await;
    let mut s = Server::start_with_db(
        &[
            "--allow-private-webhooks",
            "--retention-days",
            "2",
            "--retry-schedule",
            "60m",
        ],
        &url,
    );
    let client = db_at(&url).await;
    // At start: the first partition (every id before tomorrow) and a week ahead.
    for table in TABLES {
        let names = partitions(&client, table).await;
        assert_eq!(names.len(), 8, "{table}: {names:?}");
        assert!(names.contains(&format!("{table}_initial")), "{names:?}");
    }

    let (key, org) = new_org(s.addr, "pro").await;
    set_webhook(s.addr, &key, &recv.url("/")).await;
    let r = post_event(s.addr, &key, "t", json!(1), Some("order-1")).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let deduped = r.json()["id"].as_str().unwrap().to_string();
    let plain = new_event_id(s.addr, &key, json!(2)).await;
    // The receiver fails: a delivery_attempts row and a deliveries row (retry in an hour).
    recv.wait_until(Duration::from_secs(5), |r| r.len() >= 2)
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while count(&client, "SELECT count(*) FROM deliveries").await < 2 {
        assert!(std::time::Instant::now() < deadline, "no deliveries rows");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        count(&client, "SELECT count(*) FROM delivery_attempts").await,
        2
    );
    let r = post_event(s.addr, &key, "t", json!(1), Some("order-1")).await;
    assert_eq!(r.status, 409, "a duplicate within the window");
    assert_eq!(r.json()["event_id"], deduped.as_str());

    // Within the window (today, and a day later with two days kept): nothing goes.
    for days in [0, 1] {
        let later = Micros(Micros::now().0 + days * DAY_US);
        let done = maintain(&client, Clocks::at(later), 2).await.unwrap();
        assert_eq!(done.dropped, Vec::<String>::new(), "+{days} days");
    }
    assert_eq!(
        get(s.addr, &key, &format!("/api/events/{plain}"))
            .await
            .status,
        200
    );

    // Four days on, with two kept: today's events (in the first partition, which ends tomorrow)
    // and tomorrow's partitions have expired. A round drops one day: the first partition now,
    // and a week is made ready ahead.
    let later = Micros(Micros::now().0 + 4 * DAY_US);
    let done = maintain(&client, Clocks::at(later), 2).await.unwrap();
    assert_eq!(done.dropped.len(), 3, "{:?}", done.dropped);
    for table in TABLES {
        assert!(done.dropped.contains(&format!("{table}_initial")));
    }
    assert_eq!(done.dedup_keys_removed, 1);
    assert_eq!(done.created.len(), 3 * 3, "{:?}", done.created);
    // The next day goes no sooner than an hour later (by the same clock).
    let soon = Micros(later.0 + 59 * 60 * 1_000_000);
    let done = maintain(&client, Clocks::at(soon), 2).await.unwrap();
    assert_eq!(done.dropped, Vec::<String>::new());
    let hour_on = Micros(later.0 + 3_600 * 1_000_000);
    let done = maintain(&client, Clocks::at(hour_on), 2).await.unwrap();
    assert_eq!(done.dropped.len(), 3, "{:?}", done.dropped);
    let tomorrow = Micros(Micros::now().0 + DAY_US).rfc3339()[..10].replace('-', "");
    assert!(
        done.dropped.iter().all(|n| n.ends_with(&tomorrow)),
        "{:?}",
        done.dropped
    );
    // Kept: the day before yesterday-relative-to-later .. a week past the last round's day,
    // which is a day further when the hour on crossed midnight UTC (a run at 23:xx).
    let kept = if hour_on.0.div_euclid(DAY_US) == later.0.div_euclid(DAY_US) {
        10
    } else {
        11
    };
    for table in TABLES {
        let names = partitions(&client, table).await;
        assert_eq!(names.len(), kept, "{table}: {names:?}");
    }
    for id in [&deduped, &plain] {
        let r = get(s.addr, &key, &format!("/api/events/{id}")).await;
        assert_eq!(r.status, 404, "{}", r.text());
    }
    assert_eq!(count(&client, "SELECT count(*) FROM deliveries").await, 0);
    assert_eq!(
        count(&client, "SELECT count(*) FROM delivery_attempts").await,
        0
    );
    assert_eq!(count(&client, "SELECT count(*) FROM dedup_keys").await, 0);
    let inbox = get(s.addr, &key, "/api/inbox?status=pending").await.json();
    assert_eq!(inbox["events"], json!([]));

    // Today's partition is gone (the clock above ran four days ahead): an event now has no
    // partition to go to, which is the server's trouble, not the client's.
    let r = post_event(s.addr, &key, "t", json!(3), None).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.header("retry-after").is_some());
    for table in TABLES {
        client
            .batch_execute(&format!(
                "CREATE TABLE {table}_today PARTITION OF {table} FOR VALUES \
                 FROM (triggers_day_bound((now() AT TIME ZONE 'UTC')::date)) \
                 TO (triggers_day_bound((now() AT TIME ZONE 'UTC')::date + 1))"
            ))
            .await
            .unwrap();
    }
    // The dedup id is free again (a new node: the old one remembers recent keys in memory).
    s.stop();
    drop(s);
    let s = Server::start_with_db(&["--allow-private-webhooks"], &url);
    let r = post_event(s.addr, &key, "t", json!(3), Some("order-1")).await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_ne!(r.json()["id"], deduped.as_str());
    assert_eq!(
        count(
            &client,
            &format!("SELECT count(*) FROM dedup_keys WHERE org_id = '{org}'")
        )
        .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_keeps_everything_and_rounds_are_idempotent() {
    let url = own_database("triggers_test_retention_zero").await;
    let s = Server::start_with_db(&["--retention-days", "0"], &url);
    let (key, _) = new_org(s.addr, "pro").await;
    let id = new_event_id(s.addr, &key, json!(1)).await;
    let client = db_at(&url).await;
    let far = Micros(Micros::now().0 + 40 * DAY_US);
    let done = maintain(&client, Clocks::at(far), 0).await.unwrap();
    assert!(done.dropped.is_empty());
    // From the end of the week ahead to 40 days on, a week ahead of that.
    assert_eq!(done.created.len(), 3 * 40, "{}", done.created.len());
    let again = maintain(&client, Clocks::at(far), 0).await.unwrap();
    assert_eq!(
        again,
        Default::default(),
        "a second round has nothing to do"
    );
    assert_eq!(
        get(s.addr, &key, &format!("/api/events/{id}")).await.status,
        200
    );
    // Events still go in (today's partition) with hundreds of partitions attached.
    new_event_id(s.addr, &key, json!(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_buckets_idle_long_enough_to_be_full_are_removed_and_no_other() {
    let url = own_database("triggers_test_retention_rates").await;
    let s = Server::start_with_db(&[], &url);
    let (key, org) = new_org(s.addr, "free").await;
    new_event_id(s.addr, &key, json!(1)).await;
    let client = db_at(&url).await;
    let row = |org: String| format!("SELECT count(*) FROM rate_budgets WHERE org_id = '{org}'");
    // The node reports its spend within 100 ms.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while count(&client, &row(org.clone())).await == 0 {
        assert!(std::time::Instant::now() < deadline, "no report");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // One bucket idle for 3 minutes (full by now, even from the lowest balance), one for 1 minute
    // at the lowest balance (still refilling: its row says more than a missing row would).
    let (idle, refilling) = (uuid::Uuid::from_u128(1), uuid::Uuid::from_u128(2));
    client
        .execute(
            "INSERT INTO rate_budgets (org_id, limit_per_minute, tokens, updated_at) VALUES \
             ($1, 100, -100, clock_timestamp() - interval '3 minutes'), \
             ($2, 100, -100, clock_timestamp() - interval '1 minute')",
            &[&idle, &refilling],
        )
        .await
        .unwrap();
    // And an endpoint's bucket idle as long (`endpoint_budgets`).
    client
        .execute(
            "INSERT INTO endpoint_budgets (endpoint_id, org_id, rate, tokens, updated_at) VALUES \
             ($1, $1, 5, -300, clock_timestamp() - interval '3 minutes'), \
             ($2, $2, 5, -300, clock_timestamp() - interval '1 minute')",
            &[&idle, &refilling],
        )
        .await
        .unwrap();
    let done = maintain(&client, Clocks::at(Micros::now()), 30)
        .await
        .unwrap();
    assert_eq!(done.rate_budgets_removed, 2);
    let left = "SELECT count(*) FROM endpoint_budgets";
    assert_eq!(count(&client, left).await, 1);
    assert_eq!(count(&client, &row(idle.to_string())).await, 0);
    assert_eq!(count(&client, &row(refilling.to_string())).await, 1);
    assert_eq!(count(&client, &row(org)).await, 1);
    // The active organization's limit still holds: its next event spends from the same bucket.
    let r = post_event(s.addr, &key, "t", json!(2), None).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let left: u32 = r.header("x-ratelimit-remaining").unwrap().parse().unwrap();
    assert!(left < 99, "{left}");
}

/// The partitions for now are gone (as after a clock that jumped forward past the week made
/// ahead, or every node down for longer than that): an event finds no partition, which is the
/// server's trouble (503 with Retry-After, never a 4xx), and the node makes them at once rather
/// than at its next hourly round: the same event is taken within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_that_finds_no_partition_has_them_made_at_once() {
    let url = own_database("triggers_test_no_partition").await;
    let s = Server::start_with_db(&[], &url);
    let (key, _) = new_org(s.addr, "pro").await;
    let r = post_event(s.addr, &key, "t", json!(1), None).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let client = db_at(&url).await;
    for table in TABLES {
        for p in partitions(&client, table).await {
            client
                .batch_execute(&format!(
                    "ALTER TABLE {table} DETACH PARTITION {p}; DROP TABLE {p}"
                ))
                .await
                .unwrap();
        }
    }
    let started = std::time::Instant::now();
    let mut refused = 0;
    loop {
        let r = post_event(s.addr, &key, "t", json!(2), Some("after-the-gap")).await;
        if r.status == 201 {
            break;
        }
        assert_eq!(r.status, 503, "{}", r.text());
        assert!(r.header("retry-after").is_some());
        refused += 1;
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "still {} after {:?}: {}",
            r.status,
            started.elapsed(),
            r.text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        refused >= 1,
        "the first event after the gap found no partition"
    );
    // The round goes on making the week ahead after today's partition took the event.
    for table in TABLES {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let made = partitions(&client, table).await.len();
            if made == 8 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{table}: {made}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(count(&client, "SELECT count(*) FROM events").await, 1);
}

/// A clock running ahead drops nothing early. Where the node's and the database's clocks
/// differ, expiry goes by the earlier (a node 40 days ahead, or a database host 40 days ahead,
/// drops no day of a 30-day window), and a node far ahead has partitions made at most two weeks
/// past the database's day. Where they agree (one box whose clock jumped 40 days ahead, and a
/// node restarting in a loop under it), a round drops one day, and no more until an hour later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_ahead_drops_nothing_before_it_has_expired() {
    let url = own_database("triggers_test_retention_clock").await;
    let s = Server::start_with_db(&[], &url);
    let (key, _) = new_org(s.addr, "pro").await;
    let id = new_event_id(s.addr, &key, json!(1)).await;
    let client = db_at(&url).await;
    let now = Micros::now();
    let ahead = Micros(now.0 + 40 * DAY_US);
    let node_ahead = Clocks {
        node: ahead,
        database: now,
    };
    let done = maintain(&client, node_ahead, 30).await.unwrap();
    assert_eq!(done.dropped, Vec::<String>::new());
    // Made a week ahead at start; now to two weeks past the database's day, not 47 days.
    assert_eq!(done.created.len(), 3 * 7, "{:?}", done.created);
    let database_ahead = Clocks {
        node: now,
        database: ahead,
    };
    let done = maintain(&client, database_ahead, 30).await.unwrap();
    assert_eq!(done.dropped, Vec::<String>::new());
    assert_eq!(
        get(s.addr, &key, &format!("/api/events/{id}")).await.status,
        200
    );

    // Both clocks 40 days ahead: the first partition (today's events) has expired by them, and
    // so have the days after it; a round drops the first only, and restarts drop nothing more.
    for round in 0..5 {
        let done = maintain(&client, Clocks::at(Micros(ahead.0 + round)), 30)
            .await
            .unwrap();
        let expected = if round == 0 { 3 } else { 0 };
        assert_eq!(
            done.dropped.len(),
            expected,
            "round {round}: {:?}",
            done.dropped
        );
    }
    let pace: i64 = client
        .query_one("SELECT last_drop_ms FROM triggers_retention", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pace, ahead.0 / 1000);
}

/// The real binary with its clock 40 days ahead of the database's (libfaketime), on a database
/// whose events are today's: it drops none of them at start or after, and its own events, whose
/// ids carry its clock, find no partition: 503 with Retry-After, the server's trouble, until its
/// clock is set right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_with_its_clock_weeks_ahead_drops_nothing() {
    let Some(preload) = libfaketime() else {
        return;
    };
    let url = own_database("triggers_test_retention_node_ahead").await;
    let mut s = Server::start_with_db(&[], &url);
    let (key, _) = new_org(s.addr, "pro").await;
    let id = new_event_id(s.addr, &key, json!(1)).await;
    s.stop();
    drop(s);
    let ahead = Server::process_wrapped(&["env", &preload, "FAKETIME=+40d"], &[], &url);
    let r = post_event(ahead.addr, &key, "t", json!(2), None).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.header("retry-after").is_some());
    assert_eq!(
        get(ahead.addr, &key, &format!("/api/events/{id}"))
            .await
            .status,
        200
    );
    let client = db_at(&url).await;
    for table in TABLES {
        let names = partitions(&client, table).await;
        assert!(names.contains(&format!("{table}_initial")), "{names:?}");
        assert!(names.len() <= 16, "{table}: {names:?}");
    }
    assert_eq!(count(&client, "SELECT count(*) FROM events").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clocks_set_back_behind_the_newest_event_are_reported() {
    // A single box's clocks (node and database on one) set back, as a board without a real-time
    // clock starts with an old time: nothing compares the two clocks to see it, but the newest
    // event stored is then ahead of both. Made here by storing an event two days ahead, which is
    // what such a box finds when its clocks went back two days. The start-up round reads it: the
    // metric says how far, and the log says what it means once.
    let url = own_database("triggers_test_retention_set_back").await;
    // Processes: the log read below is the node's own.
    let mut s = Server::process_with_db(&[], &url);
    let (key, org) = new_org(s.addr, "pro").await;
    new_event_id(s.addr, &key, json!(1)).await;
    assert_eq!(metric(&s, "triggers_newest_event_ahead_seconds").await, 0.0);
    s.stop();
    drop(s);
    let client = db_at(&url).await;
    let ahead: String = client
        .query_one(
            "SELECT lpad(to_hex((extract(epoch FROM now() + interval '2 days') * 1000)::bigint), \
                    12, '0')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let future = format!("{}-{}-7000-8000-000000000001", &ahead[..8], &ahead[8..]);
    client
        .execute(
            &format!(
                "INSERT INTO events (id, org_id, type, payload, status, created_at) \
                 VALUES ('{future}', '{org}', 't', '{{}}', 0, now())"
            ),
            &[],
        )
        .await
        .unwrap();
    let s = Server::process_with_db(&[], &url);
    let seconds = metric(&s, "triggers_newest_event_ahead_seconds").await;
    assert!(
        (2.0 * 86_400.0 - 60.0..=2.0 * 86_400.0 + 1.0).contains(&seconds),
        "{seconds}"
    );
    let said = s
        .log_lines_at_least("the newest event stored is ahead", 1)
        .await;
    assert_eq!(said.len(), 1, "{said:?}");
    // Events are still taken; they sort before the one ahead of the clocks.
    let id = new_event_id(s.addr, &key, json!(2)).await;
    assert!(id < future, "{id} {future}");
}

/// A node stopped in the middle of a round (SIGSTOP: a paused VM, a long stall) does not keep
/// the maintainer's lock, and with it every other node's rounds, for as long as it is stopped:
/// its session, idle with the lock, is ended by PostgreSQL after `--db-timeout-ms`
/// (`idle_session_timeout`, set when the round takes the lock). The round is held mid-way by a
/// lock on `delivery_attempts` (it makes a partition of it that was removed), the node stopped
/// there, the lock let go: the round's statement ends and its session sits idle. Before, the
/// lock was still held 8 s later; once thawed, the node makes its partitions at a later round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_stopped_mid_way_lets_the_lock_go() {
    let url = own_database("triggers_test_retention_stopped").await;
    let s = Server::process_with_db(&["--db-timeout-ms", "2000"], &url);
    let (key, _) = new_org(s.addr, "pro").await;
    let client = db_at(&url).await;
    // Events find no partition (a round is kicked at once); `delivery_attempts` lacks its last.
    for p in partitions(&client, "events").await {
        let drop = format!("ALTER TABLE events DETACH PARTITION {p}; DROP TABLE {p}");
        client.batch_execute(&drop).await.unwrap();
    }
    let days = partitions(&client, "delivery_attempts").await;
    let last = days
        .into_iter()
        .rfind(|p| !p.ends_with("_initial"))
        .unwrap();
    let drop = format!("ALTER TABLE delivery_attempts DETACH PARTITION {last}; DROP TABLE {last}");
    client.batch_execute(&drop).await.unwrap();
    let holder = db_at(&url).await;
    holder
        .batch_execute("BEGIN; LOCK TABLE delivery_attempts IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let r = post_event(s.addr, &key, "t", json!(1), None).await;
    assert_eq!(r.status, 503, "{}", r.text());
    let round_waits = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                       AND application_name LIKE '%-retention' AND wait_event_type = 'Lock'";
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(&client, round_waits).await == 0 {
        assert!(Instant::now() < deadline, "no round waited for the table");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.freeze();
    holder.batch_execute("COMMIT").await.unwrap();
    let lock = triggers::store::retention::LOCK_ID;
    let take =
        format!("SELECT count(*) FROM (SELECT pg_try_advisory_lock({lock}) AS got) t WHERE got");
    assert_eq!(
        count(&holder, &take).await,
        0,
        "the stopped round holds the lock"
    );
    let taken = Instant::now();
    let deadline = taken + Duration::from_secs(8);
    while count(&holder, &take).await == 0 {
        assert!(Instant::now() < deadline, "the stopped node kept the lock");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        taken.elapsed() >= Duration::from_millis(1500),
        "let go after {:?}, before its session was idle for --db-timeout-ms",
        taken.elapsed()
    );
    holder
        .batch_execute(&format!("SELECT pg_advisory_unlock({lock})"))
        .await
        .unwrap();
    s.thaw();
    // The node goes on: its round failed with its session, and a later one makes the partitions.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = post_event(s.addr, &key, "t", json!(2), None).await;
        if r.status == 201 {
            break;
        }
        assert_eq!(r.status, 503, "{}", r.text());
        assert!(
            Instant::now() < deadline,
            "no partition made after the thaw"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let made = partitions(&client, "delivery_attempts").await;
    assert!(made.contains(&last), "{made:?}");
}
