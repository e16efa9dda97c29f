//! The delivery pool: every committed event of an organization with a webhook is POSTed to it, with
//! retries, on tokio tasks beside the store pool.
//!
//! - Hand-off: the group-commit writer asks for an in-memory slot per event before it writes; an
//!   event with a slot is written already leased to this node and handed over after COMMIT (no
//!   polling on the hot path); one without waits in the database, due, for the claimer.
//! - Leases: an event's `next_attempt_at` is when a delivery is due or, while a node holds it, the
//!   end of that node's lease. Any node claims due rows with `FOR UPDATE SKIP LOCKED`
//!   (`claim`), so a crashed node's work is taken over after its lease and two nodes never own one
//!   delivery at once. Every state change is conditional on the lease still being held.
//! - Isolation: an attempt takes its organization's slot (`delivery_org_concurrency`) before a
//!   global one (`delivery_concurrency`), so a slow receiver holds only its organization's share.
//!   Events in memory are bounded per organization and in all; beyond that, due work waits in
//!   the database.
//! - Attempts are recorded in batches (`claim::record`); retries wait on timers here.
//!
//! Files: `worker` (one attempt), `schedule` (retry delays, Retry-After), `sign` (Standard
//! Webhooks), `target` (URL rules, SSRF policy, the pinning connector), `claim` (claims, the
//! attempt recorder, release at shutdown).

pub mod claim;
pub mod schedule;
pub mod sign;
pub mod target;
pub mod worker;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, Notify, Semaphore};
use tokio::task::JoinHandle;

use crate::auth::Changes;
use crate::config::Config;
use crate::ids::{fast_random, EventId, Micros, OrgId};
use crate::metrics;
use crate::store::EventStatus;
use worker::{HttpClient, Verdict};

/// An event this node holds in memory for delivery.
#[derive(Debug, Clone)]
pub struct Job {
    /// The event.
    pub event: EventId,
    /// Its organization.
    pub org: OrgId,
    /// Its type.
    pub event_type: Box<str>,
    /// Its payload, as received.
    pub payload: Bytes,
    /// When it was accepted.
    pub created_at: Micros,
    /// Attempts made so far, all rounds.
    pub attempts: u32,
    /// Attempts made when the current round began (a redelivery starts a round).
    pub retry_base: u32,
    /// The `next_attempt_at` this node holds: its lease. Updates are conditional on it.
    pub held: Micros,
    /// When to attempt.
    pub due: Micros,
}

impl Job {
    #[cfg(test)]
    fn test(event: EventId, org: OrgId, payload: &str) -> Job {
        Job {
            event,
            org,
            event_type: "t".into(),
            payload: Bytes::copy_from_slice(payload.as_bytes()),
            created_at: Micros(1_000_000),
            attempts: 0,
            retry_base: 0,
            held: Micros(0),
            due: Micros(0),
        }
    }
}

/// Where an organization's events go: its webhook URL and signing key.
#[derive(Debug)]
pub struct Target {
    /// The URL as configured.
    pub url: String,
    /// The URL as a request URI.
    pub uri: http::Uri,
    /// The decoded signing secret.
    pub key: Vec<u8>,
}

/// Webhooks by organization (`None`: the organization has none).
type Targets = HashMap<OrgId, Option<Arc<Target>>>;

/// An organization's share of the pool.
struct OrgState {
    in_memory: usize,
    slots: Arc<Semaphore>,
}

/// The pool's shared state.
pub(crate) struct Shared {
    config: Arc<Config>,
    pool: deadpool_postgres::Pool,
    client: HttpClient,
    targets: Mutex<(Targets, Changes)>,
    orgs: Mutex<HashMap<OrgId, OrgState>>,
    in_memory: AtomicUsize,
    global: Semaphore,
    /// Every event in memory and the lease held on it, for release at shutdown.
    held: Mutex<HashMap<EventId, (Micros, Micros)>>,
    recorder: mpsc::Sender<claim::Attempted>,
    wake: Notify,
    stopping: AtomicBool,
    stop: Notify,
    /// Jobs between taking their slots and having their outcome recorded.
    busy: AtomicUsize,
    lease: Duration,
    per_org_max: usize,
}

/// What the rest of the server holds of the delivery pool; cheap to clone.
#[derive(Clone)]
pub struct DeliveryHandle(Arc<Shared>);

/// The running delivery pool.
pub struct Delivery {
    shared: Arc<Shared>,
    claimer: JoinHandle<()>,
    recorders: Vec<JoinHandle<()>>,
}

/// Recorder transactions in flight at once.
const RECORDERS: usize = 2;

impl Delivery {
    /// Start the pool on the current tokio runtime.
    pub fn start(config: Arc<Config>) -> Result<(Delivery, DeliveryHandle), String> {
        let connector = target::SafeConnector {
            allow_private: config.allow_private_webhooks,
            connect_timeout: Duration::from_millis(config.delivery_timeout_ms),
        };
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(60))
                // Several organizations may share a host: keep as many idle connections as deliveries
                // can be in flight, or the pool closes and reopens connections all the time.
                .pool_max_idle_per_host(config.delivery_concurrency)
                .build(https);
        let (recorder_tx, recorder_rx) = mpsc::channel(config.delivery_concurrency * 4);
        let per_org_max = (config.delivery_org_concurrency * 4).min(config.delivery_queue_max);
        let shared = Arc::new(Shared {
            pool: crate::store::build_bookkeeping_pool(&config, RECORDERS + 3)?,
            client,
            targets: Mutex::new((HashMap::new(), Changes::default())),
            orgs: Mutex::new(HashMap::new()),
            in_memory: AtomicUsize::new(0),
            global: Semaphore::new(config.delivery_concurrency),
            held: Mutex::new(HashMap::new()),
            recorder: recorder_tx,
            wake: Notify::new(),
            stopping: AtomicBool::new(false),
            stop: Notify::new(),
            busy: AtomicUsize::new(0),
            lease: Duration::from_secs(config.delivery_lease_s),
            per_org_max,
            config,
        });
        let claimer = tokio::spawn(claim::claim_loop(Arc::clone(&shared)));
        // Two recorders: one writes while the other gathers the next batch.
        let recorder_rx = Arc::new(tokio::sync::Mutex::new(recorder_rx));
        let recorders = (0..RECORDERS)
            .map(|_| {
                tokio::spawn(claim::record_loop(
                    Arc::clone(&shared),
                    Arc::clone(&recorder_rx),
                ))
            })
            .collect();
        let handle = DeliveryHandle(Arc::clone(&shared));
        Ok((
            Delivery {
                shared,
                claimer,
                recorders,
            },
            handle,
        ))
    }

    /// Stop claiming, give attempts in flight up to `grace` to finish, then hand every event still
    /// in memory back to the database, due when it was planned, so another node (or this one
    /// restarted) takes it over without waiting for the lease to run out.
    pub async fn finish(self, grace: Duration) {
        let shared = &self.shared;
        shared.stopping.store(true, Ordering::SeqCst);
        shared.stop.notify_waiters();
        // Attempts in flight finish and their outcomes are recorded before anything is handed
        // back: an outcome written after the hand-back would take the lease again.
        let deadline = tokio::time::Instant::now() + grace;
        while shared.busy.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.claimer.abort();
        let released = claim::release_all(shared).await;
        if released > 0 {
            tracing::info!(events = released, "deliveries handed back to the database");
        }
        for r in self.recorders {
            r.abort();
        }
    }
}

impl DeliveryHandle {
    /// Take an in-memory slot for a new event of `org`. `false` when this node has no room: the
    /// event is then written due, and the claimer (of any node) takes it later.
    pub fn reserve(&self, org: OrgId) -> bool {
        self.0.reserve(org, false)
    }

    /// Give back a slot taken for an event that was not written.
    pub fn release(&self, org: OrgId) {
        self.0.release_slot(org);
    }

    /// The lease an event handed over after COMMIT is written with.
    pub fn lease(&self) -> Duration {
        self.0.lease
    }

    /// An event written leased to this node: deliver it now.
    pub fn hand_off(&self, job: Job) {
        let shared = Arc::clone(&self.0);
        tokio::spawn(run_job(shared, job));
    }

    /// Due work was written to the database: claim it now rather than at the next poll.
    pub fn wake(&self) {
        self.0.wake.notify_one();
    }

    /// An organization's webhook may have changed (`None`: any may have).
    pub fn org_changed(&self, org: Option<OrgId>) {
        self.0.forget_target(org);
    }
}

impl Shared {
    /// Drop the cached webhook of `org` (of every organization with `None`).
    fn forget_target(&self, org: Option<OrgId>) {
        let mut guard = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        let (map, changes) = &mut *guard;
        changes.record(org);
        match org {
            Some(org) => {
                map.remove(&org);
            }
            None => map.clear(),
        }
    }

    /// Take an in-memory slot for `org`; `force` ignores the bounds (claimed rows are already ours).
    fn reserve(&self, org: OrgId, force: bool) -> bool {
        let mut orgs = self.orgs.lock().unwrap_or_else(|p| p.into_inner());
        if !force && self.in_memory.load(Ordering::Relaxed) >= self.config.delivery_queue_max {
            return false;
        }
        let state = orgs.entry(org).or_insert_with(|| OrgState {
            in_memory: 0,
            slots: Arc::new(Semaphore::new(self.config.delivery_org_concurrency)),
        });
        if !force && state.in_memory >= self.per_org_max {
            return false;
        }
        state.in_memory += 1;
        let n = self.in_memory.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::global()
            .delivery_in_memory
            .store(n as i64, Ordering::Relaxed);
        true
    }

    fn release_slot(&self, org: OrgId) {
        let mut orgs = self.orgs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(state) = orgs.get_mut(&org) {
            state.in_memory = state.in_memory.saturating_sub(1);
            if state.in_memory == 0 {
                orgs.remove(&org);
            }
        }
        let n = self
            .in_memory
            .fetch_sub(1, Ordering::Relaxed)
            .saturating_sub(1);
        metrics::global()
            .delivery_in_memory
            .store(n as i64, Ordering::Relaxed);
    }

    /// Organizations at their in-memory bound: the claimer leaves their due rows in the database.
    fn saturated_orgs(&self) -> Vec<uuid::Uuid> {
        let orgs = self.orgs.lock().unwrap_or_else(|p| p.into_inner());
        orgs.iter()
            .filter(|(_, s)| s.in_memory >= self.per_org_max)
            .map(|(o, _)| o.0)
            .collect()
    }

    fn org_slots(&self, org: OrgId) -> Arc<Semaphore> {
        let mut orgs = self.orgs.lock().unwrap_or_else(|p| p.into_inner());
        let state = orgs.entry(org).or_insert_with(|| OrgState {
            in_memory: 0,
            slots: Arc::new(Semaphore::new(self.config.delivery_org_concurrency)),
        });
        Arc::clone(&state.slots)
    }

    /// The organization's webhook, from the cache or the database. `Err` when the database can't
    /// say (the job is then given back to the database to be claimed later).
    async fn target(&self, org: OrgId) -> Result<Option<Arc<Target>>, String> {
        let epoch = {
            let guard = self.targets.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(t) = guard.0.get(&org) {
                return Ok(t.clone());
            }
            guard.1.epoch()
        };
        let load = async {
            let client = self.pool.get().await.map_err(|e| e.to_string())?;
            let stmt = client
                .prepare_cached(
                    "SELECT webhook_url, signing_secret FROM organizations WHERE id = $1",
                )
                .await
                .map_err(|e| e.to_string())?;
            let row = client
                .query_opt(&stmt, &[&org.0])
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(row.and_then(|r| {
                let url: Option<String> = r.get(0);
                let secret: Option<String> = r.get(1);
                let (url, secret) = (url?, secret?);
                let key = sign::secret_key(&secret)?;
                let uri = url.parse().ok()?;
                Some(Arc::new(Target { url, uri, key }))
            }))
        };
        let target = tokio::time::timeout(Duration::from_millis(self.config.db_timeout_ms), load)
            .await
            .map_err(|_| "database deadline passed".to_string())??;
        let mut guard = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        let (map, changes) = &mut *guard;
        if !changes.changed_since(org, epoch) {
            map.insert(org, target.clone());
        }
        Ok(target)
    }

    /// Note the lease this node holds on an event in memory, for the hand-back at shutdown.
    fn remember(&self, job: &Job) {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(job.event, (job.held, job.due));
    }

    /// Send an attempt's outcome to the recorder and learn whether this node still holds the event.
    async fn record(&self, attempted: claim::Attempted, answer: oneshot::Receiver<bool>) -> bool {
        if self.recorder.send(attempted).await.is_err() {
            return false;
        }
        answer.await.unwrap_or(false)
    }
}

/// Counts a job as busy (attempting, or waiting for its outcome to be recorded) while it lives.
struct Busy<'a>(&'a AtomicUsize);

impl<'a> Busy<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Busy(count)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Deliver one event until it is delivered, dead-lettered, given up by this node, or the pool stops.
async fn run_job(shared: Arc<Shared>, mut job: Job) {
    shared.remember(&job);
    loop {
        let wait = Duration::from_micros((job.due.0 - Micros::now().0).max(0) as u64);
        if !wait.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shared.stop.notified() => {}
            }
        }
        if shared.stopping.load(Ordering::SeqCst) {
            // Left in `held`: `Delivery::finish` hands it back to the database.
            return;
        }
        let slots = shared.org_slots(job.org);
        let Ok(org_slot) = slots.acquire_owned().await else {
            break;
        };
        let Ok(slot) = shared.global.acquire().await else {
            break;
        };
        let _busy = Busy::new(&shared.busy);
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        match attempt_once(&shared, &job, (org_slot, slot)).await {
            Some((due, held)) => {
                job.attempts += 1;
                job.due = due;
                job.held = held;
                shared.remember(&job);
            }
            None => break,
        }
    }
    shared
        .held
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&job.event);
    shared.release_slot(job.org);
}

/// One attempt and its recorded outcome. `Some((due, lease))` when this node retries it later.
///
/// `slots` (the organization's and the global one) are given back as soon as the HTTP exchange is
/// over: waiting for the outcome to be recorded must not hold delivery concurrency.
async fn attempt_once(
    shared: &Shared,
    job: &Job,
    slots: (
        tokio::sync::OwnedSemaphorePermit,
        tokio::sync::SemaphorePermit<'_>,
    ),
) -> Option<(Micros, Micros)> {
    let target = match shared.target(job.org).await {
        Ok(t) => t,
        Err(e) => {
            // Can't tell where to deliver: the lease runs out and the event is claimed again.
            tracing::warn!(error = %e, event = %job.event, "webhook lookup failed; delivery postponed");
            return None;
        }
    };
    let (tx, rx) = oneshot::channel();
    let Some(target) = target else {
        drop(slots);
        // The webhook was removed after the event arrived: it stays in the inbox, pending.
        shared
            .record(claim::Attempted::no_webhook(job, tx), rx)
            .await;
        return None;
    };
    let number = job.attempts + 1;
    let timeout = Duration::from_millis(shared.config.delivery_timeout_ms);
    let attempt = worker::attempt(&shared.client, &target, job, number, timeout).await;
    drop(slots);
    let m = metrics::global();
    m.attempt_latency
        .observe_us(attempt.duration.as_micros() as u64);
    let mut retry = None;
    let (status, next, delivered) = match &attempt.verdict {
        Verdict::Delivered => {
            m.deliveries_ok.fetch_add(1, Ordering::Relaxed);
            m.delivery_lag
                .observe_us((Micros::now().0 - job.created_at.0).max(0) as u64);
            (EventStatus::Delivered, None, Some(Micros::now()))
        }
        Verdict::Gone => {
            m.deliveries_gone.fetch_add(1, Ordering::Relaxed);
            claim::remove_webhook(shared, job.org, &target.url).await;
            (EventStatus::Pending, None, None)
        }
        Verdict::Failed { retry_after } => {
            let schedule = shared.config.retry_delays();
            let failed_in_round = number - job.retry_base;
            let cap = Duration::from_secs(shared.config.retry_after_max_s);
            match schedule::next_delay(schedule, failed_in_round, *retry_after, cap, fast_random())
            {
                Some(delay) => {
                    m.deliveries_retry.fetch_add(1, Ordering::Relaxed);
                    let due = Micros::now().plus(delay);
                    let held = due.plus(shared.lease);
                    retry = Some((due, held));
                    (EventStatus::Pending, Some(held), None)
                }
                None => {
                    m.deliveries_dead.fetch_add(1, Ordering::Relaxed);
                    (EventStatus::Failed, None, None)
                }
            }
        }
    };
    let attempted = claim::Attempted::attempt(job, number, attempt, status, next, delivered, tx);
    let still_ours = shared.record(attempted, rx).await;
    retry.filter(|_| still_ours)
}

/// A new job for an event just committed with a lease for this node.
pub fn new_job(event: &crate::shard::mesh::NewEvent, held: Micros) -> Job {
    Job {
        event: event.id,
        org: event.org,
        event_type: event.event_type.clone(),
        payload: event.payload.clone(),
        created_at: event.created_at,
        attempts: 0,
        retry_base: 0,
        held,
        due: Micros::now(),
    }
}
