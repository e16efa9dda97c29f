//! What every 201 promises: the event is committed. A server killed mid-stream loses nothing it
//! acknowledged; a graceful stop finishes what is in flight; a database that goes away makes the
//! server answer 503 within a second (never hang) and it recovers by itself; a full write queue
//! answers 503 at once.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Keep posting events on `connections` connections until `stop`; returns the acknowledged ids.
async fn post_until(
    addr: SocketAddr,
    key: String,
    connections: usize,
    stop: Arc<AtomicBool>,
) -> Vec<String> {
    let mut tasks = Vec::new();
    for c in 0..connections {
        let (key, stop) = (key.clone(), Arc::clone(&stop));
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut i = 0;
            'outer: while !stop.load(Ordering::Relaxed) {
                let Some(mut conn) = Conn::try_open(addr).await else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let body = json!({"type": "durable", "payload": {"c": c, "i": i}}).to_string();
                    let req = build_request(
                        "POST",
                        "/api/events",
                        &[("X-API-Key", &key), ("Content-Type", "application/json")],
                        Some(body.as_bytes()),
                    );
                    if !conn.try_send(&req).await {
                        continue 'outer;
                    }
                    match conn.read().await {
                        Some(r) if r.status == 201 => {
                            acked.push(r.json()["id"].as_str().unwrap().to_string())
                        }
                        Some(_) => {}
                        None => continue 'outer,
                    }
                }
            }
            acked
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

/// How many of `ids` the database at `url` holds.
async fn count_present(url: &str, ids: &[String]) -> usize {
    let ids: Vec<uuid::Uuid> = ids.iter().map(|s| s.parse().unwrap()).collect();
    let n: i64 = db_at(url)
        .await
        .query_one("SELECT count(*) FROM events WHERE id = ANY($1)", &[&ids])
        .await
        .unwrap()
        .get(0);
    n as usize
}

#[tokio::test]
async fn sigkill_mid_stream_loses_no_acknowledged_event() {
    // A database of its own: what the killed node had claimed of other tests' deliveries would
    // wait out its lease.
    let url = own_database("triggers_test_sigkill_stream").await;
    let mut s = Server::process_with_db(&[], &url);
    let (key, _) = new_org(s.addr, "enterprise").await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(post_until(s.addr, key.clone(), 16, Arc::clone(&stop)));
    tokio::time::sleep(Duration::from_millis(800)).await;
    s.kill();
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let acked = load.await.unwrap();
    assert!(
        acked.len() > 50,
        "only {} events acknowledged before the kill",
        acked.len()
    );
    // Every acknowledged event is in the database, and the restarted server serves them.
    assert_eq!(count_present(&url, &acked).await, acked.len());
    s.restart();
    let last = acked.last().unwrap();
    let r = get(s.addr, &key, &format!("/api/events/{last}")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["type"], "durable");
}

#[tokio::test]
async fn sigterm_finishes_in_flight_requests_and_exits_cleanly() {
    let mut s = Server::process(&[]);
    let (key, _) = new_org(s.addr, "enterprise").await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(post_until(s.addr, key.clone(), 16, Arc::clone(&stop)));
    tokio::time::sleep(Duration::from_millis(600)).await;
    let started = Instant::now();
    let addr = s.addr;
    let code = tokio::task::spawn_blocking(move || s.stop()).await.unwrap();
    assert_eq!(code, Some(0));
    // Well inside the 30 s promise: nothing waits for a deadline when there is nothing to wait for.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    stop.store(true, Ordering::Relaxed);
    let acked = load.await.unwrap();
    assert!(acked.len() > 50);
    assert_eq!(count_present(&database_url(), &acked).await, acked.len());
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "no longer listening"
    );
}

/// A TCP proxy to PostgreSQL that a test can cut and pause.
struct Proxy {
    addr: SocketAddr,
    /// 0: pass, 1: cut (connections dropped, new ones refused), 2: paused (bytes held), 3: pass
    /// until a group commit's COMMIT has gone to PostgreSQL, then paused; 4: pass until a binary
    /// COPY's rows come, then paused before they go (PostgreSQL waits for them, as for a node
    /// stopped mid-COPY: the held bytes keep the connection open whatever the server does);
    /// 5 and 6: as 3 and 4, for a delivery recorder's transaction only (one that copies rows,
    /// on a connection that asked for its transaction's id); 7: as 3, but that COMMIT (with
    /// what came with it) is dropped, never sent; 9: pass until the answer to a delivery claim
    /// that took rows comes back (COMMIT's with it), then hold everything, that answer first;
    /// 10: hold the answers to the delivery pool's connections (known by their startup message),
    /// pass the rest; 11: as 5, but then as 10 (COMMIT reaches PostgreSQL, its answer is held,
    /// and everything else but the delivery pool's answers passes).
    mode: Arc<AtomicU8>,
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    /// Bumped by [`Proxy::reset`]: a connection made before ends at its next byte, either way.
    generation: Arc<AtomicU64>,
    /// What becomes of the health probe's next connections: 0, they pass; `n` up to
    /// [`PROBE_HOLD`], the next `n` end as they are being made (counted down); `PROBE_HOLD`, held
    /// unanswered.
    probe: Arc<AtomicU32>,
    /// The ports (this side of PostgreSQL's connections) of the probe connections that passed.
    probe_ports: Arc<Mutex<Vec<u16>>>,
}

/// [`Proxy::probe`]: hold each new probe connection, unanswered.
const PROBE_HOLD: u32 = u32::MAX;

impl Proxy {
    async fn start() -> Proxy {
        let upstream: SocketAddr = {
            let url = database_url();
            let hostport = url
                .split('@')
                .nth(1)
                .unwrap()
                .split('/')
                .next()
                .unwrap()
                .to_string();
            tokio::net::lookup_host(hostport)
                .await
                .unwrap()
                .next()
                .unwrap()
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mode = Arc::new(AtomicU8::new(0));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let generation = Arc::new(AtomicU64::new(0));
        let probe = Arc::new(AtomicU32::new(0));
        let probe_ports = Arc::new(Mutex::new(Vec::new()));
        let (m, cs, g) = (
            Arc::clone(&mode),
            Arc::clone(&conns),
            Arc::clone(&generation),
        );
        let (pr, pp) = (Arc::clone(&probe), Arc::clone(&probe_ports));
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                if m.load(Ordering::SeqCst) == 1 {
                    drop(client);
                    continue;
                }
                let m = Arc::clone(&m);
                let g = Arc::clone(&g);
                let born = g.load(Ordering::SeqCst);
                let probe = (Arc::clone(&pr), Arc::clone(&pp));
                let task = tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let port = server.local_addr().unwrap().port();
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let generation = (Arc::clone(&g), born);
                    let delivery = Arc::new(AtomicBool::new(false));
                    let a = tokio::spawn(pump(
                        cr,
                        sw,
                        Arc::clone(&m),
                        (true, Arc::clone(&delivery)),
                        generation,
                        Some((probe.0, probe.1, port)),
                    ));
                    let b = tokio::spawn(pump(sr, cw, m, (false, delivery), (g, born), None));
                    let _ = tokio::join!(a, b);
                });
                cs.lock().unwrap().push(task);
            }
        });
        Proxy {
            addr,
            mode,
            conns,
            generation,
            probe,
            probe_ports,
        }
    }

    fn url(&self) -> String {
        self.url_to(&database_url())
    }

    /// `url` (the test cluster's), through the proxy.
    fn url_to(&self, url: &str) -> String {
        let (scheme_user, rest) = url.split_once('@').unwrap();
        let db = rest.split_once('/').unwrap().1;
        format!("{scheme_user}@{}/{db}", self.addr)
    }

    fn cut(&self) {
        self.mode.store(1, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    /// Every connection made so far ends at its next byte, either way, which is lost (as when a
    /// firewall's state is flushed: each connection meets a reset when it is next used); new
    /// connections pass.
    fn reset(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    fn pause(&self) {
        self.mode.store(2, Ordering::SeqCst);
    }

    fn restore(&self) {
        self.mode.store(0, Ordering::SeqCst);
    }

    /// Set `mode` (one that turns into a pause), then send `request` (an event's post), and wait
    /// until the mode has turned into a pause (`what` went through the proxy), or panic after
    /// 10 s; the request's answer is still to come.
    async fn hold_from<R: Send + 'static>(
        &self,
        mode: u8,
        request: impl std::future::Future<Output = R> + Send + 'static,
        what: &str,
    ) -> tokio::task::JoinHandle<R> {
        self.mode.store(mode, Ordering::SeqCst);
        let answer = tokio::spawn(request);
        assert!(
            self.paused_from(mode, Duration::from_secs(10)).await,
            "no {what} went through the proxy"
        );
        answer
    }

    /// Whether `mode` (3, 4, 5, 6, 7, 9 or 11: each turns into a pause once what it waits for went
    /// through), set before the request that makes it go, turned into a pause within `limit`.
    /// (Set before, not after: the request could go through first, most often under load.)
    async fn paused_from(&self, mode: u8, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.mode.load(Ordering::SeqCst) == mode {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }
}

/// A probe connection's fate ([`Proxy::probe`]), where its ports are noted, and its own port.
type ProbeWatch = (Arc<AtomicU32>, Arc<Mutex<Vec<u16>>>, u16);

/// Copy `from` to `to` as the proxy's mode says; `to_database`: this is the direction whose
/// COMMIT mode 3 waits for (a group commit's: its COPY's end, `CopyDone`, goes with it);
/// `delivery`: whether the connection is one of the delivery pool's (its startup message, in
/// that direction, names it), whose answers mode 10 holds; `probe` (that direction only): a
/// health probe's connection, known by its first bytes, is cut, held or noted as
/// [`Proxy::probe`] says.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mode: Arc<AtomicU8>,
    (to_database, delivery): (bool, Arc<AtomicBool>),
    (generation, born): (Arc<AtomicU64>, u64),
    mut probe: Option<ProbeWatch>,
) {
    let has = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    let mut buf = vec![0u8; 64 * 1024];
    // Whether this is a delivery recorder's connection (it asked for its transaction's id),
    // whether its transaction copied rows since the last COMMIT, and whether this is a group
    // commit's connection (it copied events or wrote dedup keys, and is no recorder's).
    let (mut recorder, mut copied, mut writer) = (false, false, false);
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if generation.load(Ordering::SeqCst) != born {
            return;
        }
        let mut chunk = &buf[..n];
        if let Some((fate, ports, port)) = probe.take_if(|_| has(chunk, b"triggers-probe\0")) {
            {
                match fate.load(Ordering::SeqCst) {
                    0 => ports.lock().unwrap().push(port),
                    PROBE_HOLD => std::future::pending::<()>().await,
                    _ => {
                        fate.fetch_sub(1, Ordering::SeqCst);
                        return;
                    }
                }
            }
        }
        if to_database && has(chunk, b"-delivery\0") {
            delivery.store(true, Ordering::SeqCst);
        }
        recorder |= to_database && has(chunk, b"pg_current_xact_id");
        copied |= has(chunk, b"PGCOPY\n\xff\r\n\0");
        writer |= to_database && !recorder && (copied || has(chunk, b"dedup_keys"));
        let now = mode.load(Ordering::SeqCst);
        let commit = has(chunk, b"COMMIT\0");
        if recorder && copied && commit && (now == 5 || now == 11) {
            mode.store(if now == 5 { 2 } else { 10 }, Ordering::SeqCst);
            if to.write_all(chunk).await.is_err() {
                return;
            }
            continue;
        }
        if recorder && copied && now == 6 {
            mode.store(2, Ordering::SeqCst);
        }
        copied &= !commit;
        if to_database && mode.load(Ordering::SeqCst) == 4 && has(chunk, b"PGCOPY\n\xff\r\n\0") {
            // Held from now on, these rows too.
            mode.store(2, Ordering::SeqCst);
        }
        let now = mode.load(Ordering::SeqCst);
        if writer && commit && now == 3 {
            // Held from now on, before PostgreSQL can answer it.
            mode.store(2, Ordering::SeqCst);
            if to.write_all(chunk).await.is_err() {
                return;
            }
            continue;
        }
        if writer && commit && now == 7 {
            // Never sent; held from now on.
            mode.store(2, Ordering::SeqCst);
            chunk = &[];
        }
        // A claim's rows ('D', a length, 11 columns, the first a 16-byte uuid), which come
        // after its COMMIT went out (the three are sent at once): held, and COMMIT's answer.
        let claim_rows = chunk
            .windows(11)
            .any(|w| w[0] == b'D' && w[5..] == [0, 11, 0, 0, 0, 16]);
        if !to_database && now == 9 && claim_rows {
            mode.store(2, Ordering::SeqCst);
        }
        let held =
            |now: u8| now == 2 || (now == 10 && !to_database && delivery.load(Ordering::SeqCst));
        while held(mode.load(Ordering::SeqCst)) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if mode.load(Ordering::SeqCst) == 1 || to.write_all(chunk).await.is_err() {
            return;
        }
    }
}

// The proxy runs on the test's runtime while the server start blocks a thread: two workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_answers_503_within_a_second_and_recovers() {
    let proxy = Proxy::start().await;
    let s = Server::process_with_db(&[], &proxy.url());
    let (key, _) = new_org(s.addr, "enterprise").await;
    assert_eq!(
        post_event(s.addr, &key, "t", json!(1), None).await.status,
        201
    );

    proxy.cut();
    let mut saw_503 = 0;
    for _ in 0..6 {
        let started = Instant::now();
        let r = post_event(s.addr, &key, "t", json!(2), None).await;
        let took = started.elapsed();
        assert!(took < Duration::from_secs(1), "answered after {took:?}");
        if r.status == 503 {
            saw_503 += 1;
            assert_eq!(error_code(&r), "unavailable");
            assert_eq!(r.header("retry-after"), Some("1"));
        }
    }
    assert!(saw_503 >= 5, "{saw_503}");
    let started = Instant::now();
    let r = get(s.addr, &key, "/api/inbox").await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(started.elapsed() < Duration::from_secs(1));
    let r = call(s.addr, "GET", "/health/ready", &[], None).await;
    assert_eq!(r.status, 503);
    assert_eq!(
        call(s.addr, "GET", "/health/live", &[], None).await.status,
        200
    );

    proxy.restore();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = post_event(s.addr, &key, "t", json!(3), None).await;
        if r.status == 201 {
            break;
        }
        assert!(Instant::now() < deadline, "no recovery: {}", r.text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        call(s.addr, "GET", "/health/ready", &[], None).await.status,
        200
    );
}

// A slow commit is not an outage. The health probe's write waits on a lock (as it would on a
// WAL flush stalled by a checkpoint) for longer than the connect timeout but less than the
// `--db-timeout-ms` every event write has: the database answers, events commit, and the node
// must keep taking them and stay ready (it turned every write away with 503 before). The lock is
// held until the probe has waited on it for half as long again as the connect timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_write_slower_than_the_connect_timeout_is_not_an_outage() {
    let url = own_database("triggers_test_slow_health_probe").await;
    // Long enough for a connection and a query on a busy test machine; shorter than the wait.
    let connect_timeout = Duration::from_millis(1000);
    let s = Server::process_with_db(&["--db-connect-timeout-ms", "1000"], &url);
    let (key, _) = new_org(s.addr, "enterprise").await;
    let holder = db_at(&url).await;
    holder
        .batch_execute("BEGIN; SELECT 1 FROM triggers_probe WHERE id = 1 FOR UPDATE")
        .await
        .unwrap();
    let watcher = db_at(&url).await;
    // The probe writes every second while the database is up: it soon meets the lock.
    let give_up = Instant::now() + Duration::from_secs(15);
    let (mut posted, mut waiting_since) = (0i64, None::<Instant>);
    loop {
        let r = post_event(s.addr, &key, "t", json!(posted), None).await;
        assert_eq!(r.status, 201, "{}", r.text());
        posted += 1;
        let ready = call(s.addr, "GET", "/health/ready", &[], None).await;
        assert_eq!(ready.status, 200, "{}", ready.text());
        let waiting = count(
            &watcher,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name = 'triggers-probe' AND wait_event_type = 'Lock'",
        )
        .await;
        match waiting_since {
            None if waiting > 0 => waiting_since = Some(Instant::now()),
            Some(since) => {
                assert!(
                    waiting > 0,
                    "the probe stopped waiting while the lock was held"
                );
                if since.elapsed() > connect_timeout * 3 / 2 {
                    break;
                }
            }
            None => assert!(Instant::now() < give_up, "the probe never met the lock"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(count(&watcher, "SELECT count(*) FROM events").await, posted);
    // Not asserted from the log: the servers of this test binary share one log, and the outage
    // test beside this one logs the same line. A down verdict lasts at least one down-probe
    // interval (200 ms), longer than the loop's turn, so the event or readiness check above
    // would have been answered 503 in it.
}

// The proxy runs on the test's runtime while the server start blocks a thread: two workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_write_queue_answers_503_at_once() {
    // With the database stalled, the writers can't drain the queue: once it is full, requests are
    // refused immediately instead of piling up in memory.
    let proxy = Proxy::start().await;
    let s = Server::process_with_db(
        &[
            "--write-queue-events-max",
            "8",
            "--batch-events-max",
            "4",
            "--store-writers",
            "1",
            "--db-timeout-ms",
            "3000",
        ],
        &proxy.url(),
    );
    let (key, _) = new_org(s.addr, "enterprise").await;
    proxy.pause();
    let mut tasks = Vec::new();
    for i in 0..40 {
        let key = key.clone();
        let addr = s.addr;
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let r = post_event(addr, &key, "t", json!(i), None).await;
            (r, started.elapsed())
        }));
    }
    let mut overloaded = 0;
    for t in tasks {
        let (r, took) = t.await.unwrap();
        if r.status == 503 && error_code(&r) == "overloaded" {
            overloaded += 1;
            assert_eq!(r.header("retry-after"), Some("1"));
            assert!(took < Duration::from_millis(500), "{took:?}");
        }
    }
    assert!(overloaded >= 20, "{overloaded}");
    proxy.restore();
}

#[tokio::test]
async fn fast_ack_mode_answers_202_and_still_stores_the_event() {
    let s = Server::start(&["--ack", "fast"]);
    let (key, _) = new_org(s.addr, "pro").await;
    let r = post_event(s.addr, &key, "fast", json!({"x": 1}), Some("f-1")).await;
    assert_eq!(r.status, 202, "{}", r.text());
    let v = r.json();
    assert_eq!(v["status"], "accepted");
    let id = v["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(5);
    while count_present(&database_url(), std::slice::from_ref(&id)).await == 0 {
        assert!(Instant::now() < deadline, "queued event never written");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Once committed, the dedup window knows it.
    let again = post_event(s.addr, &key, "fast", json!({"x": 2}), Some("f-1")).await;
    assert_eq!(again.status, 409);
    assert_eq!(again.json()["event_id"], id.as_str());
}

/// A resolver that does not answer is the server's trouble, never the client's: with the
/// server's DNS down (a real fault: the server runs in a mount namespace where
/// `/etc/resolv.conf` names a port nobody listens on, so getaddrinfo fails with EAI_AGAIN), a
/// webhook URL with a host name is answered 503 `unavailable` with `Retry-After`, not 422, and
/// nothing is created or changed; a URL with an address needs no DNS and is taken.
/// Whether `unshare -rm` (a user and mount namespace, for a real DNS fault) is allowed here; the
/// DNS drills say SKIPPED and pass where it is not.
fn namespaces_allowed() -> bool {
    let probe = std::process::Command::new("unshare")
        .args(["-rm", "true"])
        .status();
    let allowed = probe.is_ok_and(|s| s.success());
    if !allowed {
        eprintln!("SKIPPED: `unshare -rm` (a user and mount namespace) is not allowed here");
    }
    allowed
}

/// The real binary, its `/etc/resolv.conf` replaced by `resolv_conf` in a mount namespace of
/// its own; and the directory that holds the file (for the test to remove).
fn with_resolver(name: &str, resolv_conf: &str) -> (Server, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("triggers-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let resolv = dir.join("resolv.conf");
    std::fs::write(&resolv, resolv_conf).unwrap();
    let s = Server::process_wrapped(
        &[
            "unshare",
            "-rm",
            "sh",
            "-c",
            r#"mount --bind "$1" /etc/resolv.conf && shift && exec "$@""#,
            "sh",
            resolv.to_str().unwrap(),
        ],
        &[],
        &database_url(),
    );
    (s, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolver_that_fails_is_a_503_and_changes_nothing() {
    if !namespaces_allowed() {
        return;
    }
    let (s, dir) = with_resolver(
        "dns-down",
        "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
    );
    let (key, _) = new_org(s.addr, "pro").await;
    let hosts = [
        "https://hooks.example.com/in",
        "http://receiver.internal:8080/x",
    ];
    for url in hosts {
        let r = post(s.addr, &key, "/api/endpoints", &json!({"url": url})).await;
        assert_eq!(r.status, 503, "{url}: {}", r.text());
        assert_eq!(r.json()["code"], "unavailable");
        assert!(r.json()["error"]
            .as_str()
            .unwrap()
            .contains("could not be looked up"));
        assert_eq!(r.header("retry-after"), Some("1"));
        let r = post(
            s.addr,
            &key,
            "/api/webhook/config",
            &json!({"webhook_url": url}),
        )
        .await;
        assert_eq!(r.status, 503, "{url}: {}", r.text());
    }
    let list = get(s.addr, &key, "/api/endpoints").await.json();
    assert_eq!(list, json!({"endpoints": []}));
    // An address needs no DNS: taken; then a change to a host name is refused as the server's
    // trouble, and the endpoint keeps its URL.
    let created = post(
        s.addr,
        &key,
        "/api/endpoints",
        &json!({"url": "https://93.184.216.34/in"}),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.text());
    let path = format!("/api/endpoints/{}", created.json()["id"].as_str().unwrap());
    let r = patch(s.addr, &key, &path, &json!({"url": hosts[0]})).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(
        get(s.addr, &key, &path).await.json()["url"],
        "https://93.184.216.34/in"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The server's resolver fails while events are owed to an endpoint with a host name: the
/// deliveries wait and look again, spending no attempt and opening no circuit (a resolver's
/// outage is the server's trouble), and each is delivered on its first attempt once the name
/// resolves again. With no patience (`--unsent-patience-s 0`) each failed lookup is a failed
/// attempt, as for any receiver that can't be reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolver_outage_spends_no_delivery_attempt() {
    if !namespaces_allowed() {
        return;
    }
    let (recv, names) = closing_receiver_by_name("lookup-outage").await;
    let wrapper = names.wrapper();
    // Retries 100 ms apart and a circuit that opens after 3 failures: without the patience, the
    // outage below would fail every event and open the circuit within a second. No host's
    // addresses kept (the receiver closes every connection, so each delivery looks it up), none
    // served while the resolver fails: the outage reaches the deliveries.
    let url = own_database("triggers_test_lookup_outage").await;
    let args = [
        "--allow-private-webhooks",
        "--retry-schedule",
        "100ms,100ms",
        "--circuit-failures",
        "3",
        "--delivery-dns-fresh-s",
        "0",
        "--delivery-dns-stale-s",
        "0",
    ];
    let mut s = Server::process_wrapped(&wrapper, &args, &url);
    let (key, _) = new_org(s.addr, "pro").await;
    let target = format!("http://receiver.test:{}/in", recv.addr.port());
    let created = post(s.addr, &key, "/api/endpoints", &json!({"url": target})).await;
    assert_eq!(created.status, 201, "{}", created.text());
    let path = format!("/api/endpoints/{}", created.json()["id"].as_str().unwrap());
    let first = new_event_id(s.addr, &key, json!({"n": 0})).await;
    recv.wait_until(Duration::from_secs(10), |got| got.len() == 1)
        .await;

    // The name stops resolving: the resolver fails for it.
    names.set_hosts("127.0.0.1 localhost\n");
    let mut ids = Vec::new();
    for n in 1..=5 {
        ids.push(new_event_id(s.addr, &key, json!({"n": n})).await);
    }
    let waits = "triggers_delivery_waits_total{reason=\"unsent\"}";
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&s, waits).await < 2.0 {
        assert!(Instant::now() < deadline, "no delivery waited for a lookup");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Long past the whole retry schedule: nothing was attempted, nothing failed.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for id in &ids {
        let e = get(s.addr, &key, &format!("/api/events/{id}")).await.json();
        assert_eq!(e["status"], "pending", "{e}");
        assert_eq!(e["attempts"], 0, "{e}");
    }
    let health = get(s.addr, &key, &path).await.json()["health"].clone();
    assert_eq!(health["circuit"], "closed", "{health}");
    assert_eq!(health["consecutive_failures"], 0, "{health}");
    assert_eq!(recv.received().len(), 1);
    assert!(
        s.logged("delivery could not be sent").await,
        "the outage is logged"
    );

    // The name resolves again: each event goes, on its first attempt.
    names.set_hosts(WITH_RECEIVER);
    let got = recv
        .wait_until(Duration::from_secs(40), |got| got.len() == 6)
        .await;
    sent_once_on_first_attempts(&got, &ids);
    let deadline = Instant::now() + Duration::from_secs(10);
    for id in &ids {
        loop {
            let e = get(s.addr, &key, &format!("/api/events/{id}")).await.json();
            if e["status"] == "delivered" {
                assert_eq!(e["attempts"], 1, "{e}");
                break;
            }
            assert!(Instant::now() < deadline, "{e}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(recv.for_event(&first).len(), 1, "the first event went once");
    s.stop();

    // No patience: a failed lookup is a failed attempt, and the schedule runs out.
    let mut args = args.to_vec();
    args.extend(["--unsent-patience-s", "0"]);
    names.set_hosts("127.0.0.1 localhost\n");
    let s = Server::process_wrapped(&wrapper, &args, &url);
    let id = new_event_id(s.addr, &key, json!({"n": 6})).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let e = loop {
        let e = get(s.addr, &key, &format!("/api/events/{id}")).await.json();
        if e["status"] == "failed" {
            break e;
        }
        assert!(Instant::now() < deadline, "{e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(e["attempts"], 3, "{e}");
    let error = e["delivery_attempts"][0]["error"]
        .as_str()
        .unwrap_or_default();
    assert!(error.contains("could not be looked up"), "{e}");
}

/// `/etc/hosts` naming the test's receiver `receiver.test`.
const WITH_RECEIVER: &str = "127.0.0.1 localhost\n127.0.0.1 receiver.test\n";

/// A receiver that closes every connection (so each delivery needs a new one, and a lookup of its
/// host unless its addresses are kept), named `receiver.test` in names of the server's own.
async fn closing_receiver_by_name(name: &str) -> (Receiver, OwnNames) {
    let recv = Receiver::start(|_, _| Answer {
        headers: vec![("connection".into(), "close".into())],
        close_after: Some(Duration::ZERO),
        ..Answer::status(200)
    })
    .await;
    (recv, OwnNames::new(name, WITH_RECEIVER))
}

/// Each of `ids` reached the receiver once, on its first attempt.
fn sent_once_on_first_attempts(got: &[Received], ids: &[String]) {
    for id in ids {
        let sent: Vec<_> = got.iter().filter(|r| r.event_id() == *id).collect();
        assert_eq!(sent.len(), 1, "{}", timeline(got));
        assert_eq!(sent[0].header("x-delivery-attempt"), Some("1"));
    }
}

/// A DNS server at `ip`, port 53, that takes every query and answers none, for a server in a
/// namespace of its own; `None` (the test says SKIPPED and passes) where namespaces or the port
/// cannot be had.
fn silent_dns_server(ip: &str) -> Option<std::net::UdpSocket> {
    if !namespaces_allowed() {
        return None;
    }
    let bound = std::net::UdpSocket::bind((ip, 53)).ok();
    if bound.is_none() {
        eprintln!("SKIPPED: no UDP port 53 to listen on (not root)");
    }
    bound
}

/// A tenant configuring endpoint after endpoint on hosts whose DNS servers do not answer (each
/// check may wait `RESOLVE_TIMEOUT`, 3 s) holds up no other tenant's request: such checks wait
/// for their tenant's turn like its other requests (at most one per read-pool connection runs),
/// so a new key, the first request with a key not yet cached and another organization's read go
/// on at once. Before, 400 such requests at once held every slot the store's jobs share for
/// seconds: what came after them waited. The DNS server here takes every query and answers none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_urls_whose_dns_servers_do_not_answer_hold_up_no_other_request() {
    let Some(_silent) = silent_dns_server("127.0.2.53") else {
        return;
    };
    let (s, dir) = with_resolver(
        "dns-silent",
        "nameserver 127.0.2.53\noptions timeout:5 attempts:1\n",
    );
    let (tenant, _) = new_org(s.addr, "enterprise").await;
    let (other, _) = new_org(s.addr, "pro").await;
    let mut flood = Vec::new();
    for i in 0..400 {
        let (addr, key) = (s.addr, tenant.clone());
        flood.push(tokio::spawn(async move {
            let url = format!("https://h{i}.flood.test/in");
            post(addr, &key, "/api/endpoints", &json!({ "url": url })).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = Instant::now();
    new_org(s.addr, "free").await;
    let r = get(s.addr, &other, "/api/inbox?limit=1").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = get(s.addr, &other, "/api/endpoints").await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Well within one DNS wait: nothing waited behind the checks.
    let waited = during.elapsed();
    eprintln!("a new key, another organization's two reads: {waited:?} in all");
    assert!(waited < Duration::from_secs(1), "{waited:?}");
    let mut codes = std::collections::BTreeMap::new();
    for f in flood {
        let r = f.await.unwrap();
        assert_eq!(r.status, 503, "{}", r.text());
        assert!(r.header("retry-after").is_some());
        *codes
            .entry(r.json()["code"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    // Each check either waited for the DNS server, or waited for its turn until a run of it could
    // no longer end in time and was refused without being run.
    assert!(
        codes
            .keys()
            .all(|c| c == "unavailable" || c == "overloaded"),
        "{codes:?}"
    );
    assert!(
        codes.get("overloaded").is_some_and(|n| *n >= 300),
        "{codes:?}"
    );
    let list = get(s.addr, &tenant, "/api/endpoints").await.json();
    assert_eq!(list, json!({"endpoints": []}));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Tenants configuring endpoints on ever new host names whose DNS servers do not answer leave
/// lookups for every other tenant: an organization's URL checks run at most
/// `LOOKUPS_PER_ORG_MAX` (4) lookups at once, and a lookup holds its slot for as long as the
/// resolver tries (here 10 s: two tries of 5 s), not only while its check waits (3 s). Before,
/// four such tenants (8 checks each at once, their turns' limit) held all 64 lookups within 6 s,
/// and another organization's endpoint on a host that answers at once was a 503: its lookup was
/// not run. The DNS server here takes every query and answers none; `receiver.test` is in the
/// server's `/etc/hosts`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_names_whose_dns_servers_do_not_answer_leave_lookups_for_other_tenants() {
    let Some(_silent) = silent_dns_server("127.0.2.54") else {
        return;
    };
    let names = OwnNames::with_dns(
        "dns-new-names",
        WITH_RECEIVER,
        "nameserver 127.0.2.54\noptions timeout:5 attempts:2\n",
    );
    let s = Server::process_wrapped(
        &names.wrapper(),
        &["--allow-private-webhooks"],
        &database_url(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let mut floods = Vec::new();
    let mut tenants = Vec::new();
    for t in 0..4 {
        let (key, _) = new_org(s.addr, "enterprise").await;
        tenants.push(key.clone());
        // As many checks at once as the tenant's turns let run, each on a name never asked.
        for c in 0..8 {
            let (addr, key, stop) = (s.addr, key.clone(), Arc::clone(&stop));
            floods.push(tokio::spawn(async move {
                let mut codes = Vec::new();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let url = format!("https://t{t}-c{c}-{i}.flood.test/in");
                    let r = post(addr, &key, "/api/endpoints", &json!({ "url": url })).await;
                    assert!(r.header("retry-after").is_some(), "{}", r.text());
                    codes.push(r.status);
                    i += 1;
                }
                codes
            }));
        }
    }
    tokio::time::sleep(Duration::from_secs(7)).await;
    let (other, _) = new_org(s.addr, "pro").await;
    let asked = Instant::now();
    let r = post(
        s.addr,
        &other,
        "/api/endpoints",
        &json!({"url": "http://receiver.test:9/in"}),
    )
    .await;
    let took = asked.elapsed();
    stop.store(true, Ordering::Relaxed);
    assert_eq!(r.status, 201, "{}", r.text());
    eprintln!("another organization's endpoint, during the flood: {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    for f in floods {
        let codes = f.await.unwrap();
        assert!(codes.iter().all(|c| *c == 503), "{codes:?}");
    }
    for key in &tenants {
        let list = get(s.addr, key, "/api/endpoints").await.json();
        assert_eq!(list, json!({"endpoints": []}));
    }
}

/// The server's view of names, in a mount namespace of its own: `/etc/hosts` (the test's, changed
/// while the server runs: written in place, the bind mount sees it), then a DNS server at
/// 127.0.0.1 where nothing listens (getaddrinfo: a temporary failure, at once).
struct OwnNames {
    dir: std::path::PathBuf,
    files: [String; 3],
}

impl OwnNames {
    fn new(name: &str, hosts: &str) -> OwnNames {
        OwnNames::with_dns(
            name,
            hosts,
            "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
        )
    }

    /// Names in `hosts`, the rest asked of the DNS servers `resolv_conf` names.
    fn with_dns(name: &str, hosts: &str, resolv_conf: &str) -> OwnNames {
        let dir = std::env::temp_dir().join(format!("triggers-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path.to_str().unwrap().to_string()
        };
        let files = [
            file("resolv.conf", resolv_conf),
            file("nsswitch.conf", "hosts: files dns\n"),
            file("hosts", hosts),
        ];
        OwnNames { dir, files }
    }

    /// The command line the server runs under.
    fn wrapper(&self) -> Vec<&str> {
        let mut w = vec![
            "unshare",
            "-rm",
            "sh",
            "-c",
            r#"mount --bind "$1" /etc/resolv.conf && mount --bind "$2" /etc/nsswitch.conf && mount --bind "$3" /etc/hosts && shift 3 && exec "$@""#,
            "sh",
        ];
        w.extend(self.files.iter().map(String::as_str));
        w
    }

    fn set_hosts(&self, text: &str) {
        std::fs::write(&self.files[2], text).unwrap();
    }
}

impl Drop for OwnNames {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A receiver's addresses serve its deliveries while the server's resolver fails
/// (`--delivery-dns-stale-s`), and one lookup serves many connections
/// (`--delivery-dns-fresh-s`). The receiver closes every connection, so each delivery needs a
/// new one and, without the addresses kept, a lookup of its own: with a resolver down, every
/// delivery waited as unsent (the test above) although the receiver was fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolver_outage_is_bridged_by_the_receivers_last_addresses() {
    if !namespaces_allowed() {
        return;
    }
    let (recv, names) = closing_receiver_by_name("lookup-stale").await;
    let url = own_database("triggers_test_lookup_stale").await;
    let args = [
        "--allow-private-webhooks",
        "--delivery-dns-fresh-s",
        "2",
        "--retry-schedule",
        "100ms,100ms",
    ];
    let s = Server::process_wrapped(&names.wrapper(), &args, &url);
    let (key, _) = new_org(s.addr, "pro").await;
    let target = format!("http://receiver.test:{}/in", recv.addr.port());
    let created = post(s.addr, &key, "/api/endpoints", &json!({"url": target})).await;
    assert_eq!(created.status, 201, "{}", created.text());
    let mut ids = Vec::new();
    for n in 0..10 {
        ids.push(new_event_id(s.addr, &key, json!({"n": n})).await);
        recv.wait_until(Duration::from_secs(10), |got| got.len() == ids.len())
            .await;
    }
    // Ten connections; the lookups are one per 2 s (a slow run: a few), not one per connection.
    let opened = metric(&s, "triggers_delivery_connections_opened_total").await;
    let lookups = metric(&s, "triggers_webhook_host_lookups_total").await;
    assert!(opened >= 10.0, "{opened}");
    assert!(
        lookups >= 1.0 && lookups < opened / 2.0,
        "{lookups} of {opened}"
    );

    // The name stops resolving (the resolver fails for it) and its addresses grow old: the
    // deliveries go on, each on its first attempt, to the addresses last found.
    names.set_hosts("127.0.0.1 localhost\n");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    for n in 10..15 {
        ids.push(new_event_id(s.addr, &key, json!({"n": n})).await);
    }
    let got = recv
        .wait_until(Duration::from_secs(10), |got| got.len() == 15)
        .await;
    sent_once_on_first_attempts(&got, &ids[10..]);
    assert!(metric(&s, "triggers_webhook_host_stale_total").await >= 1.0);
    assert!(metric(&s, "triggers_webhook_host_lookup_failures_total").await >= 1.0);
    assert_eq!(
        metric(&s, "triggers_delivery_waits_total{reason=\"unsent\"}").await,
        0.0
    );
    assert!(
        s.logged("webhook host could not be looked up").await,
        "the outage is logged"
    );
    // The resolver answers again: logged, and the deliveries go on.
    names.set_hosts(WITH_RECEIVER);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    ids.push(new_event_id(s.addr, &key, json!({"n": 15})).await);
    recv.wait_until(Duration::from_secs(10), |got| got.len() == 16)
        .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !s.logged("webhook host looked up again").await {
        assert!(
            Instant::now() < deadline,
            "the end of the outage is not logged"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One answer while a fault of the database lasts (a full disk, no connection slots): 201 (there
/// was room after all) or 503 `unavailable` with `Retry-After`, never a 4xx that blames the
/// client, and never a hang.
fn answered_during(r: &Response, took: Duration) -> bool {
    assert!(took < Duration::from_secs(10), "an answer took {took:?}");
    match r.status {
        201 => true,
        503 => {
            assert_eq!(r.json()["code"], "unavailable", "{}", r.text());
            assert_eq!(r.header("retry-after"), Some("1"));
            false
        }
        other => panic!("while the fault lasts: {other} {}", r.text()),
    }
}

/// Events with dedup ids `{prefix}-{n}` while a fault lasts, until `want` are refused (each
/// answer checked by [`answered_during`]); the ids of those answered 201 go to `acked`. The refused
/// dedup ids.
async fn refused_during(
    s: &Server,
    key: &str,
    prefix: &str,
    want: usize,
    acked: &mut Vec<String>,
) -> Vec<String> {
    let pad = "x".repeat(4000);
    let mut refused = Vec::new();
    for n in 0..3000 {
        let dedup = format!("{prefix}-{n}");
        let started = Instant::now();
        let r = post_event(
            s.addr,
            key,
            "disk",
            json!({"n": n, "pad": pad}),
            Some(&dedup),
        )
        .await;
        if answered_during(&r, started.elapsed()) {
            acked.push(r.json()["id"].as_str().unwrap().to_string());
        } else {
            refused.push(dedup);
            if refused.len() == want {
                return refused;
            }
        }
    }
    panic!(
        "the fault ({prefix}) refused {} events of 3,000",
        refused.len()
    );
}

/// Once the fault ended (`how`: what ended it), each refused
/// event is retried with its dedup id until it is stored (201) or found stored (409), within
/// 30 s; its id goes to `acked`.
async fn retried_after(
    s: &Server,
    key: &str,
    refused: &[String],
    how: &str,
    acked: &mut Vec<String>,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    for dedup in refused {
        loop {
            let r = post_event(s.addr, key, "disk", json!({"again": true}), Some(dedup)).await;
            match r.status {
                201 => {
                    acked.push(r.json()["id"].as_str().unwrap().to_string());
                    break;
                }
                409 => {
                    acked.push(r.json()["event_id"].as_str().unwrap().to_string());
                    break;
                }
                503 => assert!(
                    Instant::now() < deadline,
                    "still 503 30 s after the fault ended ({how})"
                ),
                other => panic!("after the fault ended ({how}): {other} {}", r.text()),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Every acknowledged event of `acked` is in the database at `url`, and no dedup id of `org`'s
/// was stored twice.
async fn each_stored_once(url: &str, org: &str, acked: &[String]) {
    let client = db_at(url).await;
    for id in acked {
        let found = count(
            &client,
            &format!("SELECT count(*) FROM events WHERE id = '{id}'"),
        )
        .await;
        assert_eq!(found, 1, "acknowledged event {id} is missing");
    }
    let most = count(
        &client,
        &format!(
            "SELECT coalesce(max(n), 0) FROM (SELECT count(*) AS n FROM events \
             WHERE org_id = '{org}' AND dedup_id IS NOT NULL GROUP BY dedup_id) d"
        ),
    )
    .await;
    assert_eq!(most, 1, "a dedup id was stored twice");
}

/// A real full disk: the database's whole data directory, WAL included, is on a 64 MB disk of
/// its own (scripts/small-disk.sh), filled to its last byte, so PostgreSQL meets its own "No
/// space left on device": first as errors (it runs on and refuses what needs room), then as a
/// checkpoint that panics (every session ends, and each crash recovery panics again until there
/// is room). Both times events are answered 503 with `Retry-After` (never a 4xx, never a hang),
/// as are batches and endpoint changes that need room; once the disk is freed the same server
/// takes events again, every event it answered 201 is there, and each refused one is stored
/// exactly once when retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_a_503_and_loses_nothing() {
    let Some(mut disk) = SmallDisk::start(64) else {
        return;
    };
    let url = disk.database("triggers").await;
    let s = Server::process_with_db(&["--allow-private-webhooks"], &url);
    let (key, org) = new_org(s.addr, "enterprise").await;
    let mut acked = Vec::new();
    for n in 0..3 {
        acked.push(new_event_id(s.addr, &key, json!({"before": n})).await);
    }

    // Full: what is already allocated (pages, WAL segments) may take a few more; then refusals.
    disk.fill();
    let refused = refused_during(&s, &key, "full", 20, &mut acked).await;
    let pad = "x".repeat(4000);
    let items: Vec<_> = (0..50)
        .map(|n| json!({"type": "disk", "payload": {"batch": n, "pad": pad}}))
        .collect();
    let started = Instant::now();
    let r = post(s.addr, &key, "/api/events/batch", &json!({"events": items})).await;
    if r.status != 200 {
        answered_during(&r, started.elapsed());
    }
    let endpoint = json!({"url": "http://127.0.0.1:9/in"});
    let started = Instant::now();
    let r = post(s.addr, &key, "/api/endpoints", &endpoint).await;
    answered_during(&r, started.elapsed());
    let how = disk.free();
    retried_after(&s, &key, &refused, &how, &mut acked).await;
    let r = post(s.addr, &key, "/api/endpoints", &endpoint).await;
    assert_eq!(r.status, 201, "{}", r.text());

    // Full again, and a checkpoint finds no room: PostgreSQL panics.
    disk.fill();
    let checkpoint = db_at(&disk.url).await.batch_execute("CHECKPOINT").await;
    assert!(
        checkpoint.is_err(),
        "a checkpoint on a full disk went through"
    );
    let refused = refused_during(&s, &key, "crash", 20, &mut acked).await;
    let how = disk.free();
    retried_after(&s, &key, &refused, &how, &mut acked).await;

    each_stored_once(&url, &org, &acked).await;
}

/// PostgreSQL out of connection slots for the node (53300: a managed database's limit per role,
/// or `max_connections` taken by other clients) while the node's own sessions have ended (a
/// restart, a pooler's recycling): every reconnect is refused. Events, batches and reads are
/// answered 503 with `Retry-After` (never a 4xx, never a hang) and `/health/ready` says so;
/// once slots are free the node takes events again by itself, every event answered 201 is
/// there, and each refused one is stored exactly once when retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_out_of_connection_slots_is_a_503_and_loses_nothing() {
    const ROLE: &str = "triggers_test_slots";
    let admin = db().await;
    // A role of its own (a superuser, as the test cluster's, is exempt from the limits).
    for statement in [
        format!(
            "DO $$ BEGIN CREATE ROLE {ROLE} LOGIN; \
             EXCEPTION WHEN duplicate_object THEN NULL; END $$"
        ),
        format!("ALTER ROLE {ROLE} CONNECTION LIMIT -1"),
        format!("DROP DATABASE IF EXISTS {ROLE} WITH (FORCE)"),
        format!("CREATE DATABASE {ROLE} OWNER {ROLE}"),
    ] {
        admin.batch_execute(&statement).await.unwrap();
    }
    let base = database_url();
    let (Some((scheme, _)), Some(at)) = (base.split_once("://"), base.find('@')) else {
        eprintln!("SKIPPED: the test database URL ({base}) names no user to stand in for");
        return;
    };
    let host_and_db = &base[at + 1..];
    let url = format!(
        "{scheme}://{ROLE}@{}/{ROLE}",
        &host_and_db[..host_and_db.rfind('/').unwrap()]
    );
    if tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .is_err()
    {
        eprintln!("SKIPPED: the cluster does not let {ROLE} in without a password");
        return;
    }
    let s = Server::process_with_db(&["--store-pool-size", "2"], &url);
    let (key, org) = new_org(s.addr, "enterprise").await;
    let mut acked = Vec::new();
    for n in 0..3 {
        acked.push(new_event_id(s.addr, &key, json!({"before": n})).await);
    }

    // No new session for the role, and its sessions end.
    admin
        .batch_execute(&format!(
            "ALTER ROLE {ROLE} CONNECTION LIMIT 0; \
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{ROLE}';"
        ))
        .await
        .unwrap();
    let refused = refused_during(&s, &key, "slots", 10, &mut acked).await;
    let items: Vec<_> = (0..5)
        .map(|n| json!({"type": "slots", "payload": {"batch": n}}))
        .collect();
    let started = Instant::now();
    let r = post(s.addr, &key, "/api/events/batch", &json!({"events": items})).await;
    assert!(
        !answered_during(&r, started.elapsed()),
        "a batch was taken with no session to write it: {}",
        r.text()
    );
    let started = Instant::now();
    let r = get(s.addr, &key, "/api/inbox?limit=5").await;
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(r.status, 503, "a read without a session: {}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    let ready = call(s.addr, "GET", "/health/ready", &[], None).await;
    assert_eq!(ready.status, 503, "{}", ready.text());
    assert!(
        s.logged("too many connections for role").await,
        "the log names PostgreSQL's reason"
    );

    admin
        .batch_execute(&format!("ALTER ROLE {ROLE} CONNECTION LIMIT -1"))
        .await
        .unwrap();
    retried_after(&s, &key, &refused, "slots free again", &mut acked).await;
    each_stored_once(&url, &org, &acked).await;
}

/// Fast-ack mode writes a batch again when its COMMIT got no answer. Here that COMMIT went
/// through (the proxy passes it, holds PostgreSQL's answer and cuts the connection): the second
/// try finds the event there. It is stored once, reads back, is not counted as dropped, and is
/// delivered once within seconds. (Before, the second try's primary key violation read as a row
/// the database refused: the event, stored, was counted in `triggers_events_dropped_total` with
/// an error in the log; and it was delivered only when the first try's 60 s lease ran out.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_ack_batch_whose_commit_answer_was_lost_is_not_written_twice_nor_dropped() {
    let proxy = Proxy::start().await;
    let recv = Receiver::start(|_, _| Answer::status(200)).await;
    let url = own_database("triggers_test_fast_ack_in_doubt").await;
    let s = Server::process_with_db(
        &["--ack", "fast", "--allow-private-webhooks"],
        &proxy.url_to(&url),
    );
    let (key, _) = new_org(s.addr, "pro").await;
    create_endpoint(s.addr, &key, json!({"url": recv.url("/")})).await;
    let r = post_event(s.addr, &key, "lost-answer", json!({"n": 1}), None).await;
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    let path = format!("/api/events/{id}");
    // Before: its batch went while the proxy passed everything; it reads back.
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(s.addr, &key, &path).await.status != 200 {
        assert!(
            Instant::now() < deadline,
            "the first event was never written"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Set before the event is posted: its batch may be written before the answer is read.
    proxy.mode.store(3, Ordering::SeqCst);
    let r = post_event(s.addr, &key, "lost-answer", json!({"n": 2}), None).await;
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    assert!(
        proxy.paused_from(3, Duration::from_secs(10)).await,
        "no group commit went through the proxy"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.cut();
    // The held answer is dropped when its pump sees the cut (it looks every 10 ms).
    tokio::time::sleep(Duration::from_millis(100)).await;
    proxy.restore();

    let deadline = Instant::now() + Duration::from_secs(20);
    while s.log_lines("not written again").is_empty()
        && s.log_lines("were not written and are dropped").is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "the batch was never written again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(metric(&s, "triggers_events_dropped_total").await, 0.0);
    let r = get(s.addr, &key, &format!("/api/events/{id}")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let stored = count(
        &db_at(&url).await,
        &format!("SELECT count(*) FROM events WHERE id = '{id}'"),
    )
    .await;
    assert_eq!(stored, 1);
    // Delivered once, by a take-over of the first try's lease row at once, not when its 60 s
    // lease ends.
    recv.wait_until(Duration::from_secs(10), |got| {
        got.iter().any(|r| r.event_id() == id)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        recv.for_event(&id).len(),
        1,
        "{}",
        timeline(&recv.received())
    );
}

/// Every connection to the database ending while the database stays up (a pooler restarted, a
/// firewall's state flushed: each connection meets a reset when next used) is no outage: the
/// health probe finds its own connection gone and asks on a new one before it says the database
/// is, a lost connection elsewhere only has the probe look, writes and the reads they need
/// (the endpoints a batch's delivery plan reads) go again on the pool's next connection: every
/// event 201, stored once. Before, the probe's next check (within a second), or any query that
/// met a dead connection, took the node down: 503 to every write and to `/health/ready` for a
/// third of a second or more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_reset_with_the_database_up_are_no_outage() {
    let proxy = Proxy::start().await;
    let s = Server::process_with_db(&[], &proxy.url());
    let (key, org) = new_org(s.addr, "pro").await;
    let mut stored = 0;
    for round in 0..2 {
        let r = post_event(s.addr, &key, "before", json!({"round": round}), None).await;
        assert_eq!(r.status, 201, "{}", r.text());
        proxy.reset();
        // Past the probe's next check (every second while the database is up).
        let until = Instant::now() + Duration::from_millis(1500);
        let mut n = 0;
        while Instant::now() < until {
            let r = post_event(s.addr, &key, "after", json!({"round": round, "n": n}), None).await;
            assert!(matches!(r.status, 201), "{}", r.text());
            stored += i64::from(r.status == 201);
            let r = call(s.addr, "GET", "/health/ready", &[], None).await;
            assert_eq!(
                r.status,
                200,
                "round {round}, after event {n}: {}",
                r.text()
            );
            n += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let sql = format!("SELECT count(*) FROM events WHERE org_id = '{org}' AND type = 'after'");
    assert_eq!(
        count(&db().await, &sql).await,
        stored,
        "a 503 stored nothing"
    );
    assert!(
        s.logged("writing it again").await,
        "no write met a reset connection"
    );
}

/// A node behind a proxy on a database of its own (no other test's deliveries in its claims),
/// polling every 200 ms with 20 s leases (and `extra`), with an organization and an endpoint at
/// `recv`: (the node, its key, the endpoint's path).
async fn node_with_long_leases(
    proxy: &Proxy,
    database: &str,
    recv: &Receiver,
    extra: &[&str],
) -> (Server, String, String) {
    let mut args = vec![
        "--allow-private-webhooks",
        "--delivery-poll-ms",
        "200",
        "--delivery-lease-s",
        "20",
    ];
    args.extend(extra);
    let url = own_database(database).await;
    endpoint_behind(proxy, &url, &args, recv).await
}

/// Once the claim that mode 9 (set before what makes it claim) waits for has taken rows and its
/// answer (COMMIT's with it) is held, end every connection, so that answer is lost.
async fn lose_the_claims_answer(proxy: &Proxy) {
    assert!(
        proxy.paused_from(9, Duration::from_secs(10)).await,
        "no claim took the deliveries"
    );
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(100)).await;
    proxy.restore();
}

/// A delivery claim whose answer was lost with its connection, COMMIT's included, may have
/// committed: its batch row is expired at the next lease renewal, so what it leased is taken
/// over and delivered within seconds, once, not when its lease ends. (Before, the deliveries
/// waited out the claim's lease: 20 s here, 60 s by default.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_of_a_claim_whose_answer_was_lost_wait_no_lease() {
    let proxy = Proxy::start().await;
    let recv = Receiver::start(|_, _| Answer::status(200)).await;
    let (s, key, path) =
        node_with_long_leases(&proxy, "triggers_test_claim_lost", &recv, &[]).await;
    assert_eq!(
        post_empty(s.addr, &key, &format!("{path}/pause"))
            .await
            .status,
        200
    );
    // Parked while the endpoint is paused: delivered through a claim once it is resumed.
    let mut ids = Vec::new();
    for n in 0..5 {
        let r = post_event(s.addr, &key, "claimed", json!({"n": n}), None).await;
        assert_eq!(r.status, 201, "{}", r.text());
        ids.push(r.json()["id"].as_str().unwrap().to_string());
    }
    proxy.mode.store(9, Ordering::SeqCst);
    assert_eq!(
        post_empty(s.addr, &key, &format!("{path}/resume"))
            .await
            .status,
        200
    );
    lose_the_claims_answer(&proxy).await;
    let started = Instant::now();
    each_received(&recv, &ids).await;
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(s.logged("batches taken over").await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    each_received_times(&recv, &ids, 1);
}

/// The same for the rows a claim leases by themselves (a recovered delivery's new round, a retry
/// handed back): their lease's end names the claim, and the next take-over makes them due again,
/// so each is delivered within seconds, once. (Before, they waited out the lease: 20 s here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_of_a_claim_whose_answer_was_lost_wait_no_lease() {
    let proxy = Proxy::start().await;
    let recv = Receiver::start(|_, _| Answer::status(503)).await;
    // No retry: each first attempt's failure is the delivery's last.
    let no_retry = ["--retry-schedule", ""];
    let (s, key, path) =
        node_with_long_leases(&proxy, "triggers_test_claim_lost_rows", &recv, &no_retry).await;
    let ids = create_events(s.addr, &key, 5, "t").await;
    for id in &ids {
        wait_status(s.addr, &key, id, "failed", Duration::from_secs(10)).await;
    }
    recv.set_script(|_, _| Answer::status(200));
    proxy.mode.store(9, Ordering::SeqCst);
    let since = json!({"since": "2020-01-01T00:00:00Z"});
    let r = post(s.addr, &key, &format!("{path}/recover"), &since).await;
    assert_eq!(r.status, 202, "{}", r.text());
    lose_the_claims_answer(&proxy).await;
    let started = Instant::now();
    recv.wait_until(Duration::from_secs(20), |r| {
        ids.iter()
            .all(|id| r.iter().any(|x| x.event_id() == *id && x.answered == 200))
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    each_received_times(&recv, &ids, 2);
}

/// A node behind `proxy` with an organization whose first event went through it (201): (the
/// node, its key, the organization, that event's id).
async fn proxied_node(proxy: &Proxy) -> (Server, String, String, String) {
    let s = Server::process_with_db(&[], &proxy.url());
    let (key, org) = new_org(s.addr, "pro").await;
    let r = post_event(s.addr, &key, "before", json!({}), None).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    (s, key, org, id)
}

/// A read whose connection turned out to be gone is run once more on another: a key this node
/// has not seen, first used just after its connections were reset (the database up), is looked
/// up again and its event taken. (Before, 503 for the database's trouble, which it was not.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_looked_up_on_a_reset_connection_is_looked_up_again() {
    let proxy = Proxy::start().await;
    let (a, key, _, id) = proxied_node(&proxy).await;
    assert_eq!(
        get(a.addr, &key, &format!("/api/events/{id}")).await.status,
        200
    );
    // A key made on another node: unknown to this one.
    let b = Server::start(&[]);
    let (other, _) = new_org(b.addr, "pro").await;
    proxy.reset();
    let r = post_event(a.addr, &other, "after-reset", json!({}), None).await;
    assert_eq!(r.status, 201, "{}", r.text());
}

/// The health probe's connection ended (its backend terminated, as a pooler or an operator
/// does) and the new one it makes is cut while being made (a reset a moment later): connections
/// that end say little of the database, so the probe makes another rather than turning the
/// node's writes away. (Before, it gave up after that one: the node answered writes 503, and
/// `/health/ready` 503, for at least a third of a second while the database was fine.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_connection_cut_while_being_made_is_made_again() {
    probe_connections_cut_while_being_made(1).await;
}

/// As above, with the next two connections cut (resets in a row, as a failover makes): the probe
/// makes a third. (Before, it gave up after the second: a full-suite run under load failed an
/// ack 503 so, a second reset having met the probe's new connection.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_probe_connections_cut_in_a_row_are_made_again() {
    probe_connections_cut_while_being_made(2).await;
}

/// The probe's connection ended, and the next `cut` connections it makes cut while being made:
/// the node stays ready throughout and takes writes.
async fn probe_connections_cut_while_being_made(cut: u32) {
    let proxy = Proxy::start().await;
    let (s, key, _, _) = proxied_node(&proxy).await;
    // The probe's first check (a second after start-up) makes its connection.
    let deadline = Instant::now() + Duration::from_secs(5);
    while proxy.probe_ports.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the probe never connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Its check done (milliseconds), the next one comes a second later.
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.probe.store(cut, Ordering::SeqCst);
    let ports: Vec<i32> = proxy
        .probe_ports
        .lock()
        .unwrap()
        .iter()
        .map(|&p| p as i32)
        .collect();
    let ended: i64 = db()
        .await
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE client_port = ANY($1) AND application_name = 'triggers-probe'",
            &[&ports],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(ended, 1, "the probe's connection: {ports:?}");
    // Its next check (within a second) makes new connections, which are cut; the node stays
    // ready throughout, and past the time a failed check keeps it down.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut after_cut = 0;
    while after_cut < 25 {
        assert_eq!(get(s.addr, "", "/health/ready").await.status, 200);
        if proxy.probe.load(Ordering::SeqCst) == 0 {
            after_cut += 1;
        }
        assert!(
            Instant::now() < deadline,
            "the probe made no new connection"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = post_event(s.addr, &key, "after-cut", json!({}), None).await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(s.log_lines("does not take writes").is_empty());
}

/// The probe found the database out of reach (every connection cut) and has not answered since
/// (here its next connection hangs); meanwhile a write in doubt went through on a new
/// connection: the database is reachable, so a read is served rather than refused at once on
/// the probe's old word. (Before, 503 until the probe's next answer: up to
/// `--db-connect-timeout-ms` later; the CI run at `0e6f1de` met it by chance.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_went_through_lets_reads_in_before_the_probe_answers() {
    let proxy = Proxy::start().await;
    let s = Server::process_with_db(&["--db-connect-timeout-ms", "5000"], &proxy.url());
    let (key, _) = new_org(s.addr, "pro").await;
    let first = new_event_id(s.addr, &key, json!({"n": 1})).await;
    let (addr, k) = (s.addr, key.clone());
    let request = async move { post_event(addr, &k, "t", json!(2), None).await };
    let post = proxy.hold_from(3, request, "group commit").await;
    proxy.probe.store(PROBE_HOLD, Ordering::SeqCst);
    proxy.cut();
    // A read meets a cut connection: the probe is asked at once, and finds nothing to reach.
    let r = get(s.addr, &key, &format!("/api/events/{first}")).await;
    assert_eq!(r.status, 503, "{}", r.text());
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.restore();
    let r = post.await.unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    for id in [first, id] {
        let r = get(s.addr, &key, &format!("/api/events/{id}")).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
}

/// Reset the proxy's connections once the node is ready: what the last reset did (the health
/// probe's new connection among it) has settled, so each reset is one event, not a storm of them
/// milliseconds apart.
async fn reset_when_ready(proxy: &Proxy, s: &Server) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while get(s.addr, "", "/health/ready").await.status != 200 {
        assert!(Instant::now() < deadline, "the node never got ready again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    proxy.reset();
}

/// The API's reads met on pooled connections that ended under them (a firewall's state flushed,
/// a load balancer's failover: each connection meets a reset when it is next used) are read again
/// on new connections: every read answers 200 after the reset, none 503, whether the reads come
/// one at a time (the first dead connection lets the idle ones beside it go) or all at once. So
/// are acks (run twice, an ack answers as once). (Before, each of the read pool's connections
/// cost one 503.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_on_reset_connections_are_read_again() {
    let proxy = Proxy::start().await;
    let s = Server::process_with_db(&["--allow-private-webhooks"], &proxy.url());
    let (key, _) = new_org(s.addr, "pro").await;
    let ids = create_events(s.addr, &key, 2, "t").await;
    let ep = create_endpoint(s.addr, &key, json!({"url": "http://127.0.0.1:9/hook"})).await;
    let ep = ep["id"].as_str().unwrap().to_string();
    let paths = vec![
        format!("/api/events/{}", ids[0]),
        format!("/api/events/{}", ids[1]),
        "/api/inbox?limit=10".to_string(),
        "/api/endpoints".to_string(),
        format!("/api/endpoints/{ep}"),
        format!("/api/endpoints/{ep}/secret"),
        format!("/api/endpoints/{ep}/failed"),
        "/api/keys".to_string(),
    ];
    // Each path eight times at once: every connection of the read pool is in use.
    let read_all = || {
        let (addr, key) = (s.addr, key.clone());
        let paths = paths.clone();
        async move {
            let mut reads = tokio::task::JoinSet::new();
            for _ in 0..8 {
                for p in &paths {
                    let (key, p) = (key.clone(), p.clone());
                    reads.spawn(async move { (get(addr, &key, &p).await, p) });
                }
            }
            while let Some(done) = reads.join_next().await {
                let (r, p) = done.unwrap();
                assert_eq!(r.status, 200, "GET {p}: {}", r.text());
            }
        }
    };
    read_all().await;
    reset_when_ready(&proxy, &s).await;
    for p in &paths {
        let r = get(s.addr, &key, p).await;
        assert_eq!(r.status, 200, "GET {p}: {}", r.text());
    }
    read_all().await;
    reset_when_ready(&proxy, &s).await;
    read_all().await;
    read_all().await;
    // Acks, each the first request after a reset.
    let first = format!("/api/ack/{}", ids[0]);
    let mut acked_at = None;
    for _ in 0..2 {
        reset_when_ready(&proxy, &s).await;
        let r = call(s.addr, "POST", &first, &[("X-API-Key", &key)], None).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let at = r.json()["acknowledged_at"].clone();
        assert_eq!(
            *acked_at.get_or_insert(at.clone()),
            at,
            "a repeat keeps the first time"
        );
    }
    reset_when_ready(&proxy, &s).await;
    let body = json!({"event_ids": ids}).to_string();
    let headers = [
        ("X-API-Key", key.as_str()),
        ("Content-Type", "application/json"),
    ];
    let r = call(s.addr, "POST", "/api/ack", &headers, Some(body.as_bytes())).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["acknowledged"], json!(ids), "{}", r.text());
}

/// An API change (endpoints, their secrets and recovery, the webhook, a redelivery, the key)
/// whose pooled connection turns out to be gone at its transaction's BEGIN wrote nothing, and
/// runs again on a new connection: each one, the first request after a reset, is answered as if
/// nothing happened, and did what it says. (Before, each was 503.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_whose_connection_was_gone_at_begin_run_again() {
    let proxy = Proxy::start().await;
    let recv = Receiver::start(|_, _| Answer::status(200)).await;
    let url = own_database("triggers_test_changes_rerun").await;
    // The probe's connection is reset too, at each step, and made again: on a busy machine
    // within 5 s, not the default 1 s, so the node does not call the database unreachable.
    let args = [
        "--allow-private-webhooks",
        "--db-connect-timeout-ms",
        "5000",
    ];
    let s = Server::process_with_db(&args, &proxy.url_to(&url));
    let (key, _) = new_org(s.addr, "pro").await;
    let send = |method: &'static str, path: String, body: Option<serde_json::Value>| {
        let (addr, key, proxy, s) = (s.addr, key.clone(), &proxy, &s);
        async move {
            reset_when_ready(proxy, s).await;
            let body = body.map(|b| b.to_string());
            let headers = [
                ("X-API-Key", key.as_str()),
                ("Content-Type", "application/json"),
            ];
            let r = call(
                addr,
                method,
                &path,
                &headers,
                body.as_deref().map(str::as_bytes),
            )
            .await;
            assert!(r.status < 300, "{method} {path}: {} {}", r.status, r.text());
            r.json()
        }
    };
    let url = recv.url("/");
    let ep = send("POST", "/api/endpoints".into(), Some(json!({"url": url}))).await;
    let ep = ep["id"].as_str().unwrap().to_string();
    let path = format!("/api/endpoints/{ep}");
    let patched = send("PATCH", path.clone(), Some(json!({"description": "d"}))).await;
    assert_eq!(patched["description"], "d");
    let paused = send("POST", format!("{path}/pause"), None).await;
    assert_eq!(paused["status"], "paused");
    let resumed = send("POST", format!("{path}/resume"), None).await;
    assert_eq!(resumed["status"], "active");
    let secret = || async { get(s.addr, &key, &format!("{path}/secret")).await.json() };
    let before = secret().await["signing_secret"].clone();
    let rotated = send("POST", format!("{path}/secret/rotate"), None).await;
    assert_ne!(rotated["signing_secret"], before, "{rotated}");
    assert_eq!(rotated["signing_secret"], secret().await["signing_secret"]);
    let since = json!({"since": "2020-01-01T00:00:00Z"});
    let recovered = send("POST", format!("{path}/recover"), Some(since)).await;
    assert_eq!(recovered["queued"], 0, "{recovered}");
    let set = send(
        "POST",
        "/api/webhook/config".into(),
        Some(json!({"webhook_url": url})),
    )
    .await;
    assert_eq!(set["webhook_url"], url.as_str());
    let id = new_event_id(s.addr, &key, json!({"n": 1})).await;
    recv.wait_until(Duration::from_secs(10), |r| {
        r.iter().filter(|x| x.event_id() == id).count() == 2
    })
    .await;
    send("POST", format!("/api/events/{id}/redeliver"), None).await;
    recv.wait_until(Duration::from_secs(10), |r| {
        r.iter().filter(|x| x.event_id() == id).count() == 4
    })
    .await;
    let deleted = send("DELETE", "/api/webhook/config".into(), None).await;
    assert_eq!(deleted["webhook_url"], serde_json::Value::Null);
    send("DELETE", path.clone(), None).await;
    assert_eq!(get(s.addr, &key, &path).await.status, 404);
    let rotated = send("POST", "/api/keys/rotate".into(), None).await;
    let new_key = rotated["api_key"].as_str().unwrap();
    assert_eq!(get(s.addr, &key, "/api/keys").await.status, 401);
    assert_eq!(get(s.addr, new_key, "/api/keys").await.status, 200);
}

/// Wait until the node's metric `name` reads `value`, or panic with `what` after 10 s.
async fn metric_reaches(s: &Server, name: &str, value: f64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(s, name).await != value {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// With the delivery pool's answers held (the proxy's mode 10), a change to the endpoint at
/// `path` (its description) wakes its deliveries, whose look at it (the organization's endpoints
/// forgotten by the change) is read now and answered later; meanwhile `change` is made (answered
/// 200); then the answers go.
async fn change_while_a_look_is_held(
    proxy: &Proxy,
    s: &Server,
    key: &str,
    path: &str,
    change: impl std::future::Future<Output = Response>,
) {
    proxy.mode.store(10, Ordering::SeqCst);
    let patched = patch(s.addr, key, path, &json!({"description": "d"})).await;
    assert_eq!(patched.status, 200, "{}", patched.text());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let changed = change.await;
    assert_eq!(changed.status, 200, "{}", changed.text());
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.restore();
}

/// A node with `args` on database `url` through `proxy`, an organization's key, and the path
/// of its endpoint that posts to `recv`.
async fn endpoint_behind(
    proxy: &Proxy,
    url: &str,
    args: &[&str],
    recv: &Receiver,
) -> (Server, String, String) {
    let s = Server::process_with_db(args, &proxy.url_to(url));
    let (key, _) = new_org(s.addr, "pro").await;
    let ep = create_endpoint(s.addr, &key, json!({"url": recv.url("/")})).await;
    let path = format!("/api/endpoints/{}", ep["id"].as_str().unwrap());
    (s, key, path)
}

/// Retries waiting in memory for their time.
const SCHEDULED: &str = "triggers_deliveries_waiting{reason=\"retry_scheduled\"}";

/// The retry waiting in memory on node `s` (database `url`) for the one delivery there is
/// parked within 5 s, its row's lease given up and nothing more sent to `recv`.
async fn the_retry_parks(s: &Server, url: &str, recv: &Receiver) {
    let db = db_at(url).await;
    let parked = "SELECT count(*) FROM deliveries \
                  WHERE next_attempt_at IS NULL AND lease_until IS NULL";
    let deadline = Instant::now() + Duration::from_secs(5);
    while count(&db, parked).await != 1 {
        assert!(
            Instant::now() < deadline,
            "the retry was not parked; waiting in memory: {}{}",
            metric(s, SCHEDULED).await,
            deliveries_left(url).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(metric(s, SCHEDULED).await, 0.0);
    assert_eq!(recv.received().len(), 1, "nothing more was sent");
}

/// A retry waiting in memory is woken by a change to its organization and looks at its
/// endpoint; the look's answer (read before what comes next) is slow, and meanwhile the endpoint
/// is deleted. The delete's word comes while the retry is looking: it must look again and park
/// (giving its row's lease up, so that setting the endpoint up again sends it at once), not wait
/// until due (60 s) on the endpoint it saw. (Before, it listened again only once its look was
/// over, and missed the delete: a full-suite run failed the deleted-webhook test so; this test
/// failed 3 of 3 runs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_told_of_a_delete_while_it_looked_at_its_endpoint_parks() {
    let proxy = Proxy::start().await;
    let recv = Receiver::start(|_, _| Answer::status(500)).await;
    let url = own_database("triggers_test_delete_while_looking").await;
    let args = ["--allow-private-webhooks", "--retry-schedule", "60s"];
    let (s, key, path) = endpoint_behind(&proxy, &url, &args, &recv).await;
    new_event_id(s.addr, &key, json!(1)).await;
    metric_reaches(&s, SCHEDULED, 1.0, "the retry never waited in memory").await;
    change_while_a_look_is_held(&proxy, &s, &key, &path, delete(s.addr, &key, &path)).await;
    // The delete parks the row (`next_attempt_at`); the retry gives its lease up as it parks.
    the_retry_parks(&s, &url, &recv).await;
}

/// A first attempt fails and its outcome is recorded (its COMMIT's answer slow); meanwhile the
/// endpoint is paused. The pause's word comes after the attempt began (the delivery looked at its
/// endpoint before it) and before the retry listens for changes: the retry must look before it
/// waits and park (giving its row's lease up, so that a resume sends it at once), not wait until
/// due (60 s) on what it saw before its attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_told_of_a_pause_while_its_failure_was_recorded_parks() {
    let proxy = Proxy::start().await;
    // The first attempt is answered 500 after 500 ms; the next ones 200 at once.
    let recv = Receiver::start(|_, before| match before {
        0 => Answer {
            delay: Duration::from_millis(500),
            ..Answer::status(500)
        },
        _ => Answer::status(200),
    })
    .await;
    let url = own_database("triggers_test_pause_while_recording").await;
    let args = ["--allow-private-webhooks", "--retry-schedule", "60s"];
    let (s, key, path) = endpoint_behind(&proxy, &url, &args, &recv).await;
    let id = new_event_id(s.addr, &key, json!(1)).await;
    recv.wait_until(Duration::from_secs(5), |r| r.len() == 1)
        .await;
    // Set while the attempt is in flight: its failure's COMMIT goes, the answer is held.
    proxy.mode.store(11, Ordering::SeqCst);
    assert!(
        proxy.paused_from(11, Duration::from_secs(10)).await,
        "the failure was not recorded"
    );
    let paused = post_empty(s.addr, &key, &format!("{path}/pause")).await;
    assert_eq!(paused.status, 200, "{}", paused.text());
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.restore();
    the_retry_parks(&s, &url, &recv).await;
    let resumed = post_empty(s.addr, &key, &format!("{path}/resume")).await;
    assert_eq!(resumed.status, 200, "{}", resumed.text());
    recv.wait_until_or(
        Duration::from_secs(5),
        |r| r.iter().any(|x| x.event_id() == id && x.answered == 200),
        || async { deliveries_left(&url).await },
    )
    .await;
}

/// A delivery waiting for its endpoint's open circuit is woken by a change and looks at the
/// endpoint; the look's answer (read before what comes next) is slow, and meanwhile the endpoint
/// is resumed (its circuit starts afresh). The resume's word comes while the delivery is looking:
/// it must look again and go, not wait out the circuit (30 s) on the endpoint it saw. (Before, it
/// listened again only when it began to wait.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_told_of_a_resume_while_it_looked_at_its_endpoint_goes() {
    const CIRCUIT: &str = "triggers_deliveries_waiting{reason=\"circuit_open\"}";
    let proxy = Proxy::start().await;
    let recv = Receiver::start(|_, _| Answer::status(500)).await;
    let url = own_database("triggers_test_resume_while_looking").await;
    let args = [
        "--allow-private-webhooks",
        "--retry-schedule",
        "100ms,100ms,100ms",
        "--circuit-failures",
        "2",
    ];
    let (s, key, path) = endpoint_behind(&proxy, &url, &args, &recv).await;
    // Two failures open the circuit (for 30 s); the event's next retry waits for it.
    let id = new_event_id(s.addr, &key, json!(1)).await;
    recv.wait_until(Duration::from_secs(10), |r| r.len() == 2)
        .await;
    metric_reaches(&s, CIRCUIT, 1.0, "nothing waited for the circuit").await;
    recv.set_script(|_, _| Answer::status(200));
    let resume = format!("{path}/resume");
    let resume = post_empty(s.addr, &key, &resume);
    change_while_a_look_is_held(&proxy, &s, &key, &path, resume).await;
    recv.wait_until_or(
        Duration::from_secs(5),
        |r| r.iter().any(|x| x.event_id() == id && x.answered == 200),
        || async {
            format!(
                "; waiting for the circuit: {}{}",
                metric(&s, CIRCUIT).await,
                deliveries_left(&url).await
            )
        },
    )
    .await;
}

/// A durable batch whose COMMIT went out and whose connection then ended (the database killed,
/// the network cut) is written again on a new connection within its deadline, so the client
/// learns what became of its event: `committed`, the second try finds it there (its event id,
/// or its dedup id naming the event itself) and answers 201 with the event stored once; not
/// committed (the proxy drops COMMIT), the second try writes it. (Before, 503 either way: a
/// client without a dedup id that retried the committed one stored it twice.)
async fn a_durable_batch_whose_commit_went_unanswered(committed: bool, dedup: Option<&str>) {
    let proxy = Proxy::start().await;
    let (s, key, org, _) = proxied_node(&proxy).await;

    let (addr, k, d) = (s.addr, key.clone(), dedup.map(str::to_string));
    // Each mode is set before the request goes, so its batch can't pass before it.
    let mode = if committed { 3 } else { 7 };
    let request =
        async move { post_event(addr, &k, "in-doubt", json!({"n": 1}), d.as_deref()).await };
    let post = proxy.hold_from(mode, request, "group commit").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(100)).await;
    proxy.restore();

    let r = post.await.unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    assert!(s.logged("COMMIT unanswered; writing it again").await);
    if committed && dedup.is_none() {
        assert!(s.logged("not written again").await);
    }
    let stored = count(
        &db().await,
        &format!("SELECT count(*) FROM events WHERE org_id = '{org}' AND type = 'in-doubt' AND id = '{id}'"),
    )
    .await;
    let all = count(
        &db().await,
        &format!("SELECT count(*) FROM events WHERE org_id = '{org}' AND type = 'in-doubt'"),
    )
    .await;
    assert_eq!((stored, all), (1, 1));
    let r = get(s.addr, &key, &format!("/api/events/{id}")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let in_doubt = metric(&s, "triggers_write_batches_in_doubt_total").await;
    let unresolved = metric(&s, "triggers_write_batches_unresolved_total").await;
    assert_eq!((in_doubt, unresolved), (1.0, 0.0));
}

/// A batch whose COMMIT went unanswered while the database stays out of reach for longer than
/// the writer asks (0.75 s) is answered 503: its outcome is unknown, and the metrics say so (an
/// operator sees how many events may have been stored after a 503). Here it had committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_in_doubt_past_the_wait_is_answered_503_and_counted() {
    let proxy = Proxy::start().await;
    let (s, key, org, _) = proxied_node(&proxy).await;
    let (addr, k) = (s.addr, key.clone());
    let request = async move { post_event(addr, &k, "unresolved", json!(1), None).await };
    let post = proxy.hold_from(3, request, "group commit").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.cut();
    let r = post.await.unwrap();
    proxy.restore();
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    let in_doubt = metric(&s, "triggers_write_batches_in_doubt_total").await;
    let unresolved = metric(&s, "triggers_write_batches_unresolved_total").await;
    assert_eq!((in_doubt, unresolved), (1.0, 1.0));
    let stored = count(
        &db().await,
        &format!("SELECT count(*) FROM events WHERE org_id = '{org}' AND type = 'unresolved'"),
    )
    .await;
    assert_eq!(stored, 1, "the COMMIT that went through is kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_event_whose_commit_answer_was_lost_is_answered_201_once() {
    a_durable_batch_whose_commit_went_unanswered(true, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_event_whose_commit_answer_was_lost_is_not_its_own_duplicate() {
    a_durable_batch_whose_commit_went_unanswered(true, Some("in-doubt-1")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_event_whose_commit_never_arrived_is_written_again() {
    a_durable_batch_whose_commit_went_unanswered(false, None).await;
}

/// A delivery's outcome whose transaction got no answer within `--db-timeout-ms` is written
/// once the database answers again, or found written: the delivery is not made again when its
/// lease runs out. `hold`: where the proxy holds a recorder's transaction (then everything) for
/// 2 s. (Before, the recorder gave up at once: held mid-COPY, the delivery was made again after
/// the lease; its COMMIT gone through, the node's deliveries were left to their leases.)
async fn an_outcome_without_an_answer_is_not_delivered_again(hold: u8) {
    let proxy = Proxy::start().await;
    let recv = Receiver::start(|_, _| Answer::status(200)).await;
    let s = Server::process_with_db(
        &[
            "--allow-private-webhooks",
            "--db-timeout-ms",
            "1000",
            "--delivery-timeout-ms",
            "2000",
            "--delivery-lease-s",
            "4",
        ],
        &proxy.url_to(&own_database(&format!("triggers_test_outcome_held_{hold}")).await),
    );
    let (key, _) = new_org(s.addr, "pro").await;
    create_endpoint(s.addr, &key, json!({"url": recv.url("/")})).await;
    // The recorder's connection is known by its first transaction.
    let r = post_event(s.addr, &key, "t", json!({"n": 1}), None).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let first = r.json()["id"].as_str().unwrap().to_string();
    let path = format!("/api/events/{first}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(s.addr, &key, &path).await.json()["status"] != "delivered" {
        assert!(
            Instant::now() < deadline,
            "the first event was not delivered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let (addr, k) = (s.addr, key.clone());
    let request = async move { post_event(addr, &k, "t", json!({"n": 2}), None).await };
    let post = proxy
        .hold_from(hold, request, "recorder's transaction")
        .await;
    let r = post.await.unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.restore();

    let path = format!("/api/events/{id}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(s.addr, &key, &path).await.json()["status"] != "delivered" {
        assert!(Instant::now() < deadline, "the outcome was never recorded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Past the lease (4 s) and a claim: still once.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        recv.for_event(&id).len(),
        1,
        "{}",
        timeline(&recv.received())
    );
    let r = get(s.addr, &key, &path).await;
    assert_eq!(r.json()["attempts"], 1, "{}", r.text());
    assert!(s.logged("delivery outcomes recorded after all").await);
    assert!(s.log_lines("retried after the lease").is_empty());
}

/// The recorder's COMMIT went through; its answer came after the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_whose_commit_answer_came_late_is_not_delivered_again() {
    an_outcome_without_an_answer_is_not_delivered_again(5).await;
}

/// The recorder's COPY rows were held: its transaction was never committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_held_mid_copy_is_written_again_not_delivered_again() {
    an_outcome_without_an_answer_is_not_delivered_again(6).await;
}

/// A node stopped mid-COPY (here: its rows held by the proxy, the connection kept open, as a
/// node stopped with SIGSTOP or a paused container leaves it) leaves a session that is `active`,
/// waiting for its client: no timeout of PostgreSQL's ends it, and it holds its locks, its
/// connection slot and the vacuum horizon. Another node ends it within a few `--db-timeout-ms`
/// (`store::stalled`); before, it stayed for as long as the node was stopped. The stopped node's
/// request was answered 503 at its deadline: nothing of it was written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_left_mid_copy_by_a_stopped_node_is_ended_by_another() {
    let url = own_database("triggers_test_stalled_copy").await;
    let proxy = Proxy::start().await;
    let fast = ["--db-timeout-ms", "1000"];
    let a = Server::process_with_db(&fast, &proxy.url_to(&url));
    let (key, _) = new_org(a.addr, "pro").await;
    let (addr, k) = (a.addr, key.clone());
    proxy.mode.store(4, Ordering::SeqCst);
    let stuck = tokio::spawn(async move { post_event(addr, &k, "t", json!(1), None).await });
    assert!(
        proxy.paused_from(4, Duration::from_secs(5)).await,
        "no COPY went through the proxy"
    );
    let r = stuck.await.unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    let client = db_at(&url).await;
    let stalled = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                   AND state = 'active' AND wait_event = 'ClientRead'";
    assert_eq!(
        count(&client, stalled).await,
        1,
        "the COPY waits for its rows"
    );
    let b = Server::process_with_db(&fast, &url);
    let deadline = Instant::now() + Duration::from_secs(15);
    while count(&client, stalled).await > 0 {
        assert!(
            Instant::now() < deadline,
            "the stopped node's session is still there"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(count(&client, "SELECT count(*) FROM events").await, 0);
    assert!(b.logged("ended database sessions").await);
    assert_eq!(
        metric(&b, "triggers_db_stalled_sessions_ended_total").await,
        1.0
    );
    // B takes events meanwhile, and A does again once its connection is back.
    let (key_b, _) = new_org(b.addr, "pro").await;
    assert_eq!(
        post_event(b.addr, &key_b, "t", json!(2), None).await.status,
        201
    );
    proxy.restore();
    let deadline = Instant::now() + Duration::from_secs(10);
    while post_event(a.addr, &key, "t", json!(3), None).await.status != 201 {
        assert!(Instant::now() < deadline, "A takes no event again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A receiver's host with an address that drops connections ahead of one that answers: the
/// delivery goes through the live one on its first attempt. `receiver.test` is `::1` (where a
/// listener's full accept queue drops every SYN: a real dead address, as a broken IPv6 route)
/// and `127.0.0.1` (the receiver, same port); the resolver gives the IPv6 loopback first (RFC
/// 6724's precedence). Before, addresses were tried one after the other, each with the whole
/// attempt's time: every attempt timed out on `::1`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_whose_first_address_drops_connections_is_delivered_to_at_once() {
    if !namespaces_allowed() {
        return;
    }
    let recv = Receiver::start(|_, _| Answer::status(200)).await;
    let port = recv.addr.port();
    let Ok(socket) = tokio::net::TcpSocket::new_v6() else {
        eprintln!("SKIPPED: no IPv6 here");
        return;
    };
    if socket
        .bind(format!("[::1]:{port}").parse().unwrap())
        .is_err()
    {
        eprintln!("SKIPPED: no IPv6 loopback here");
        return;
    }
    let hole = socket.listen(0).unwrap();
    let _queued = std::net::TcpStream::connect(hole.local_addr().unwrap()).unwrap();
    let names = OwnNames::new(
        "dead-address",
        "127.0.0.1 localhost\n::1 receiver.test\n127.0.0.1 receiver.test\n",
    );
    let url = own_database("triggers_test_dead_address").await;
    let args = [
        "--allow-private-webhooks",
        "--delivery-timeout-ms",
        "3000",
        "--retry-schedule",
        "1s",
    ];
    let s = Server::process_wrapped(&names.wrapper(), &args, &url);
    let (key, _) = new_org(s.addr, "pro").await;
    let target = format!("http://receiver.test:{port}/in");
    let created = post(s.addr, &key, "/api/endpoints", &json!({"url": target})).await;
    assert_eq!(created.status, 201, "{}", created.text());
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(new_event_id(s.addr, &key, json!({"n": n})).await);
    }
    let got = recv
        .wait_until(Duration::from_secs(10), |got| got.len() == 3)
        .await;
    sent_once_on_first_attempts(&got, &ids);
    drop(hole);
}

/// PostgreSQL's client program `name` (`pg_dump`, `pg_restore`), from the newest installed
/// server's directory, as scripts/postgres.sh finds it.
fn pg_program(name: &str) -> std::path::PathBuf {
    let mut dirs: Vec<std::path::PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL's programs in /usr/lib/postgresql")
        .map(|e| e.unwrap().path().join("bin"))
        .filter(|bin| bin.join(name).exists())
        .collect();
    dirs.sort_by_key(|d| {
        let version = d.parent().unwrap().file_name().unwrap().to_string_lossy();
        version.parse::<u32>().unwrap_or(0)
    });
    dirs.pop().expect("no PostgreSQL bin directory").join(name)
}

/// Run `program` with `args`, asserting that it succeeds.
fn run_program(program: std::path::PathBuf, args: &[&str]) {
    let out = std::process::Command::new(&program)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{program:?} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A backup taken with `pg_dump` while events pour in and a receiver fails holds each event
/// whole (its row, its deliveries, its dedup id: one transaction writes them, and the dump reads
/// one snapshot), and a server started on the restored copy, its first node gone as with a lost
/// machine: serves every event acknowledged before the dump began, with the same API key;
/// delivers each one the receiver had not taken, under the same `webhook-id` as the attempts
/// before (so a receiver that took one after the dump can tell it again); sends none again that
/// had been delivered; answers 409 for their dedup ids; and takes anew an event the backup
/// never saw (what a restore to an earlier point loses: README, Backups).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_under_load_restores_each_event_whole_and_delivers_what_was_pending() {
    let src = own_database("triggers_test_backup_src").await;
    let dst = own_database("triggers_test_backup_dst").await;
    let recv = Receiver::start(|_, _| Answer::status(200)).await;
    let args = [
        "--allow-private-webhooks",
        "--retry-schedule",
        "1s,1s,1s,1s,1s,1s,1s,1s",
        "--circuit-failures",
        "100000",
        "--delivery-lease-s",
        "3",
        "--delivery-timeout-ms",
        "2000",
    ];
    let mut s = Server::process_with_db(&args, &src);
    let (key, _) = new_org(s.addr, "enterprise").await;
    set_webhook(s.addr, &key, &recv.url("/in")).await;
    let delivered = create_events(s.addr, &key, 10, "before").await;
    for id in &delivered {
        wait_status(s.addr, &key, id, "delivered", Duration::from_secs(10)).await;
    }
    // The receiver fails from now on: what comes next waits for retries.
    recv.set_script(|_, _| Answer::status(503));
    let acked: Arc<Mutex<Vec<(String, String, Instant)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for c in 0..8 {
        let (key, stop, acked, addr) = (key.clone(), stop.clone(), acked.clone(), s.addr);
        load.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr).await;
            for i in 0.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let dedup = format!("load-{c}-{i}");
                let body = json!({"type": "load", "payload": {"i": i}, "dedup_id": dedup});
                let r = conn
                    .call(
                        "POST",
                        "/api/events",
                        &[("X-API-Key", &key), ("Content-Type", "application/json")],
                        Some(body.to_string().as_bytes()),
                    )
                    .await;
                assert_eq!(r.status, 201, "{}", r.text());
                let id = r.json()["id"].as_str().unwrap().to_string();
                acked.lock().unwrap().push((id, dedup, Instant::now()));
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let file = std::env::temp_dir().join(format!("triggers-backup-{}.dump", std::process::id()));
    let path = file.to_str().unwrap().to_string();
    let dump_began = Instant::now();
    let dump = {
        let (src, path) = (src.clone(), path.clone());
        tokio::task::spawn_blocking(move || {
            run_program(pg_program("pg_dump"), &["-Fc", "-f", &path, &src])
        })
    };
    dump.await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    s.kill();
    let acked = acked.lock().unwrap().clone();
    let before: Vec<String> = acked
        .iter()
        .filter(|(_, _, at)| *at < dump_began)
        .map(|(id, _, _)| id.clone())
        .collect();
    assert!(
        before.len() >= 20 && acked.len() > before.len(),
        "{} events acknowledged before the dump began, {} in all: the load did not straddle it",
        before.len(),
        acked.len()
    );

    let restore = {
        let (dst, path) = (dst.clone(), path.clone());
        tokio::task::spawn_blocking(move || {
            run_program(
                pg_program("pg_restore"),
                &["--exit-on-error", "-d", &dst, &path],
            )
        })
    };
    restore.await.unwrap();
    let _ = std::fs::remove_file(&file);
    let copy = db_at(&dst).await;
    let in_copy: std::collections::HashSet<String> = copy
        .query("SELECT id::text FROM events WHERE type = 'load'", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    let missing: Vec<&String> = before.iter().filter(|id| !in_copy.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "acknowledged before the dump began, not in the copy: {missing:?}"
    );
    let ids: std::collections::HashSet<&String> = acked.iter().map(|(id, _, _)| id).collect();
    assert!(
        in_copy.iter().all(|id| ids.contains(id)),
        "the copy holds load events never acknowledged"
    );
    // Acknowledged after the dump's snapshot: what a restore to that point loses.
    let (lost_id, lost_dedup, _) = acked
        .iter()
        .find(|(id, _, _)| !in_copy.contains(id))
        .expect("the load went on after the dump: some events are not in the copy");

    let sent_before = recv.received();
    recv.set_script(|_, _| Answer::status(200));
    let s = Server::process_with_db(&args, &dst);
    let pending: Vec<String> = in_copy.iter().cloned().collect();
    recv.wait_until_or(
        Duration::from_secs(30),
        |got| all_answered(got, &pending, 200),
        || deliveries_left(&dst),
    )
    .await;
    for id in &delivered {
        assert_eq!(recv.for_event(id).len(), 1, "{id} delivered again");
    }
    for got in recv.received().iter().filter(|r| r.answered == 200) {
        let id = got.event_id();
        if let Some(first) = sent_before.iter().find(|r| r.event_id() == id) {
            assert_eq!(got.header("webhook-id"), first.header("webhook-id"), "{id}");
        }
    }
    let r = get(s.addr, &key, &format!("/api/events/{}", before[0])).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let (id, dedup, _) = acked.iter().find(|(id, _, _)| *id == before[0]).unwrap();
    let again = post_event(s.addr, &key, "load", json!({}), Some(dedup)).await;
    assert_eq!(again.status, 409, "{}", again.text());
    assert_eq!(again.json()["event_id"], id.as_str());
    let r = get(s.addr, &key, &format!("/api/events/{lost_id}")).await;
    assert_eq!(r.status, 404, "{}", r.text());
    let anew = post_event(s.addr, &key, "load", json!({}), Some(lost_dedup)).await;
    assert_eq!(anew.status, 201, "{}", anew.text());
}

/// A node left running while its database is replaced by an earlier copy (a restore, or a
/// failover to a standby that had not received the last commits) must not answer from memory
/// that a dedup id is taken when the database no longer holds its event: the client would take
/// the 409 as "stored" and drop an event that is nowhere. The cores' recent-dedup windows are
/// forgotten with the other caches when the node's change listener loses its connection (as it
/// does whenever the database goes away), so the retry is stored anew; a dedup id the copy holds
/// is still 409, from the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dedup_id_the_restored_database_lacks_is_accepted_anew_by_a_node_left_running() {
    let name = "triggers_test_rerestore";
    let url = own_database(name).await;
    let copy = own_database("triggers_test_rerestore_copy").await;
    let s = Server::process_with_db(&[], &url);
    let (key, _) = new_org(s.addr, "enterprise").await;
    let kept = post_event(s.addr, &key, "kept", json!({}), Some("kept")).await;
    assert_eq!(kept.status, 201, "{}", kept.text());
    let kept_id = kept.json()["id"].as_str().unwrap().to_string();
    let file = std::env::temp_dir().join(format!("triggers-rerestore-{}.dump", std::process::id()));
    let path = file.to_str().unwrap().to_string();
    {
        let (url, path) = (url.clone(), path.clone());
        tokio::task::spawn_blocking(move || {
            run_program(pg_program("pg_dump"), &["-Fc", "-f", &path, &url])
        })
        .await
        .unwrap();
    }
    // After the backup: what the restore loses. The node remembers its dedup id committed.
    let lost = post_event(s.addr, &key, "lost", json!({}), Some("lost")).await;
    assert_eq!(lost.status, 201, "{}", lost.text());
    let lost_id = lost.json()["id"].as_str().unwrap().to_string();
    let again = post_event(s.addr, &key, "lost", json!({}), Some("lost")).await;
    assert_eq!(again.status, 409, "{}", again.text());

    {
        let (copy, path) = (copy.clone(), path.clone());
        tokio::task::spawn_blocking(move || {
            run_program(
                pg_program("pg_restore"),
                &["--exit-on-error", "-d", &copy, &path],
            )
        })
        .await
        .unwrap();
    }
    let _ = std::fs::remove_file(&file);
    let admin = db().await;
    for statement in [
        format!("DROP DATABASE {name} WITH (FORCE)"),
        format!("ALTER DATABASE {name}_copy RENAME TO {name}"),
    ] {
        admin.batch_execute(&statement).await.unwrap();
    }
    // The node finds the copy in its place (its pools and listener reconnect by themselves).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = get(s.addr, &key, &format!("/api/events/{kept_id}")).await;
        let gone = get(s.addr, &key, &format!("/api/events/{lost_id}")).await;
        if r.status == 200 && gone.status == 404 && s.logged("org-change listener lost").await {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the node did not serve the restored copy within 30 s: {} {}",
            r.status,
            gone.status
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Retried as a client does: again after a 503 (the node's health flag may still be down
    // from the moment the database was missing).
    let retried = loop {
        let r = post_event(s.addr, &key, "lost", json!({}), Some("lost")).await;
        if r.status != 503 || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        retried.status,
        201,
        "a dedup id whose event the database no longer holds: {}",
        retried.text()
    );
    let anew = retried.json()["id"].as_str().unwrap().to_string();
    let r = get(s.addr, &key, &format!("/api/events/{anew}")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let kept_again = post_event(s.addr, &key, "kept", json!({}), Some("kept")).await;
    assert_eq!(kept_again.status, 409, "{}", kept_again.text());
    assert_eq!(kept_again.json()["event_id"], kept_id.as_str());
}

/// `synchronous_commit = off` on the database or the role (common tuning advice) lets PostgreSQL
/// answer a COMMIT before its WAL is on disk: the WAL writer flushes it within three times
/// `wal_writer_delay` (200 ms by default), and a power cut or an operating system crash meanwhile
/// loses the commits answered. The server's sessions ask for `on`, so each event's COMMIT record
/// is flushed before its 201 whatever the database's default. Read from PostgreSQL's own WAL
/// (`pg_walinspect`): here the database says `off` and the WAL writer flushes every 10 s at the
/// most (so that what `off` does shows every run); after 200 events posted on four connections
/// and answered 201, no COMMIT record of theirs lies beyond the WAL flushed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_201_waits_for_its_commit_to_reach_the_disk_whatever_the_databases_default() {
    let Some(disk) = SmallDisk::start(256) else {
        return;
    };
    let url = disk.database("triggers_async_commit").await;
    db_at(&disk.url)
        .await
        .batch_execute("ALTER DATABASE triggers_async_commit SET synchronous_commit = off")
        .await
        .unwrap();
    disk.set_system(&[
        ("wal_writer_delay", "10s"),
        ("wal_writer_flush_after", "1GB"),
    ])
    .await;
    let wal = db_at(&url).await;
    let walinspect = "SELECT count(*) FROM pg_available_extensions WHERE name = 'pg_walinspect'";
    if count(&wal, walinspect).await == 0 {
        eprintln!("SKIPPED: pg_walinspect (PostgreSQL 15 and later) is not installed");
        return;
    }
    wal.batch_execute("CREATE EXTENSION pg_walinspect")
        .await
        .unwrap();
    let s = Server::process_with_db(&[], &url);
    let (key, _) = new_org(s.addr, "enterprise").await;
    let lsn = |sql: &'static str| {
        let wal = &wal;
        async move { wal.query_one(sql, &[]).await.unwrap().get::<_, String>(0) }
    };
    let before = lsn("SELECT pg_current_wal_insert_lsn()::text").await;
    let mut posting = Vec::new();
    for _ in 0..4 {
        let (addr, key) = (s.addr, key.clone());
        posting.push(tokio::spawn(async move {
            create_events(addr, &key, 50, "flushed").await
        }));
    }
    let mut acked: Vec<uuid::Uuid> = Vec::new();
    for p in posting {
        acked.extend(
            p.await
                .unwrap()
                .iter()
                .map(|id| id.parse::<uuid::Uuid>().unwrap()),
        );
    }
    // pg_walinspect reads the WAL flushed only: the COMMIT records found there, from before the
    // first event to the flushed end, are the events' transactions made durable.
    let flushed = lsn("SELECT pg_current_wal_flush_lsn()::text").await;
    let xids: Vec<String> = wal
        .query_one(
            "SELECT array_agg(DISTINCT xmin::text) FROM events WHERE id = ANY($1)",
            &[&acked],
        )
        .await
        .unwrap()
        .get(0);
    let durable = count(
        &wal,
        &format!(
            "SELECT CASE WHEN '{flushed}'::pg_lsn <= '{before}' THEN 0 ELSE \
             (SELECT count(DISTINCT xid::text) FROM pg_get_wal_records_info('{before}', \
             '{flushed}') WHERE resource_manager = 'Transaction' \
             AND record_type LIKE 'COMMIT%' AND xid::text IN ('{}')) END",
            xids.join("', '")
        ),
    )
    .await;
    assert_eq!(
        durable as usize,
        xids.len(),
        "of the {} transactions that stored the {} events answered 201, {} were committed \
         beyond the WAL flushed ({before} to {flushed})",
        xids.len(),
        acked.len(),
        xids.len() - durable as usize
    );
    drop(disk);
}

/// A synchronous standby gone: the database names one in `synchronous_standby_names` that is not
/// connected (as when a primary's only synchronous standby dies), so every COMMIT waits for it,
/// on disk on the primary and not yet visible. Events are answered 503 with `Retry-After` (the
/// first within the request's deadline, the rest at once when the probe has seen it; never a
/// 4xx, never a hang) and `/health/ready` says so; once the standby is no longer required the
/// commits that waited end, the node takes events again by itself, every event answered 201 is
/// there, and each refused one is stored exactly once when retried (409 naming it where its
/// first COMMIT had waited and then landed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synchronous_standby_gone_is_a_503_and_loses_nothing() {
    let Some(disk) = SmallDisk::start(128) else {
        return;
    };
    let url = disk.database("triggers").await;
    let s = Server::process_with_db(&[], &url);
    let (key, org) = new_org(s.addr, "enterprise").await;
    let mut acked = Vec::new();
    for n in 0..3 {
        acked.push(new_event_id(s.addr, &key, json!({"before": n})).await);
    }
    disk.set_system(&[("synchronous_standby_names", "gone")])
        .await;
    let refused = refused_during(&s, &key, "standby", 10, &mut acked).await;
    let ready = call(s.addr, "GET", "/health/ready", &[], None).await;
    assert_eq!(ready.status, 503, "{}", ready.text());
    disk.set_system(&[("synchronous_standby_names", "")]).await;
    retried_after(&s, &key, &refused, "no standby required", &mut acked).await;
    each_stored_once(&url, &org, &acked).await;
}

/// The events table locked by an administrator (`VACUUM FULL`, `CREATE INDEX` without
/// `CONCURRENTLY`, an `ALTER TABLE`: each holds an ACCESS EXCLUSIVE lock for as long as it runs):
/// events are answered 503 with `Retry-After`, the first within `--db-timeout-ms`, never a 4xx
/// and never a hang; once the lock is let go the node takes events again by itself, every event
/// answered 201 is there, and each refused one is stored exactly once when retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_locked_by_an_administrator_is_a_503_and_loses_nothing() {
    let url = own_database("triggers_test_table_locked").await;
    let s = Server::process_with_db(&["--db-timeout-ms", "1000"], &url);
    let (key, org) = new_org(s.addr, "enterprise").await;
    let mut acked = Vec::new();
    for n in 0..3 {
        acked.push(new_event_id(s.addr, &key, json!({"before": n})).await);
    }
    let admin = db_at(&url).await;
    admin
        .batch_execute("BEGIN; LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let refused = refused_during(&s, &key, "locked", 5, &mut acked).await;
    admin.batch_execute("COMMIT").await.unwrap();
    retried_after(&s, &key, &refused, "the lock let go", &mut acked).await;
    each_stored_once(&url, &org, &acked).await;
}
