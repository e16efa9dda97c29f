//! Endpoints with real receivers on loopback: the API and its checks, fan-out by event type,
//! delivery per endpoint, secret rotation checked with the Standard Webhooks scheme for both
//! secrets, the circuit breaker's timings, rate limits, pause and resume, recovery, auto-disable,
//! operational events, isolation between endpoints, and a version 1 database migrated with
//! pending deliveries. One module per area (`api`, `delivery`, `health`, `races`, `recovery`,
//! `rate_limit`, `migration`); the helpers they share are below.

#[path = "../common/mod.rs"]
mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

mod api;
mod delivery;
mod health;
mod migration;
mod races;
mod rate_limit;
mod recovery;

// Helpers the test modules share.

const PRIVATE: &str = "--allow-private-webhooks";

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
    failing_endpoint_in(own_database(database).await, open_s, more).await
}

/// [`failing_endpoint_with`] in database `url`, made and set up by the caller.
async fn failing_endpoint_in(
    url: String,
    open_s: &str,
    more: &[&str],
) -> (Receiver, Server, String, Value, String) {
    let recv = Receiver::start(|_, _| Answer::status(500)).await;
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

/// The attempts recorded (when, status, error) and the sessions waiting for a lock (which part
/// of the node, what they wait on, their statement), for a failure's message.
async fn attempts_and_waits(client: &tokio_postgres::Client) -> String {
    let attempts = "SELECT format('%s | %s | %s | %s', attempt, at, response_status, error) \
                    FROM delivery_attempts ORDER BY at";
    let waits = "SELECT format('%s | %s | %s | blocked by %s', application_name, wait_event, \
                 query, pg_blocking_pids(pid)) FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock'";
    let mut out = String::from("\nattempts recorded (attempt | at | status | error):");
    for r in client.query(attempts, &[]).await.unwrap() {
        out += &format!("\n  {}", r.get::<_, String>(0));
    }
    out += "\nsessions waiting for a lock:";
    for r in client.query(waits, &[]).await.unwrap() {
        out += &format!("\n  {}", r.get::<_, String>(0));
    }
    out
}

/// Until a session of the database waits for a lock that `holder`'s session holds (a lock wait
/// of anything else, however short, does not count).
async fn wait_for_a_lock(
    client: &tokio_postgres::Client,
    holder: &tokio_postgres::Client,
    failed: &str,
) {
    let pid = pid_of(holder).await;
    let waits = format!(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND {pid} = ANY(pg_blocking_pids(pid))"
    );
    let waiting = || async { count(client, &waits).await >= 1 };
    poll_until(waiting, failed).await;
}

/// The backend process of `client`'s session.
async fn pid_of(client: &tokio_postgres::Client) -> i32 {
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
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
        &hold,
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
    // A session that waits for one that the attempt log's holder blocks: the change, held by
    // the recorder. Waiting for a lock in the view too: its rows are read once per transaction,
    // `pg_blocking_pids` at each call, so a session that began to wait meanwhile showed its
    // statement before (`START TRANSACTION`: seen once, thirtieth session).
    let held = pid_of(&hold).await;
    let waiting = format!(
        "SELECT w.query FROM pg_stat_activity w \
         WHERE w.datname = current_database() AND w.wait_event_type = 'Lock' AND EXISTS ( \
             SELECT 1 FROM pg_stat_activity r WHERE r.pid = ANY(pg_blocking_pids(w.pid)) \
             AND {held} = ANY(pg_blocking_pids(r.pid)))"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let query: String = loop {
        if let Some(row) = client.query(&waiting, &[]).await.unwrap().first() {
            break row.get(0);
        }
        assert!(
            Instant::now() < deadline,
            "the change did not wait for the recorder"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
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

/// Apply the version 1 schema (migrations 1 and 2) to a fresh database, as a server of the
/// previous release left it.
async fn v1_database(name: &str) -> String {
    let url = own_database(name).await;
    let client = db_at(&url).await;
    client
        .batch_execute(include_str!("../../migrations/0001_init.sql"))
        .await
        .unwrap();
    client
        .batch_execute(include_str!("../../migrations/0002_probe.sql"))
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
