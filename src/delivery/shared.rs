//! The delivery pool's shared state: its connections and HTTP client, the endpoints cache, what
//! it keeps per endpoint, its memory bounds, and the leases it holds.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, Notify, Semaphore};
use uuid::Uuid;

use super::client::{Client, Target};
use super::model::{BatchLease, Endpoint, Lease, Look, Outcome, Recorded, Then};
use super::runtime::{EndpointRuntime, TokenBucket};
use super::sign;
use crate::auth::Changes;
use crate::config::{Config, ENDPOINT_CACHE_ORGS_MAX};
use crate::db::{connection_lost, describe};
use crate::flow::answer::EndpointStatus;
use crate::flow::sink::ByteBudget;
use crate::ids::{EventId, Micros, OrgId};
use crate::metrics::Metrics;

/// An organization's active and paused endpoints.
pub(super) type OrgEndpoints = Arc<[Arc<Endpoint>]>;

/// (event, endpoint) to (lease end, due time) of the deliveries held under their own rows.
pub(super) type HeldRows = HashMap<(EventId, Uuid), (Micros, Micros), ahash::RandomState>;

/// Endpoints by organization, cached until a change (on any node: LISTEN/NOTIFY) drops them.
#[derive(Default)]
pub(super) struct EndpointCache {
    pub(super) orgs: HashMap<OrgId, OrgEndpoints, ahash::RandomState>,
    pub(super) changes: Changes,
}

const LOAD_ENDPOINTS: &str = "\
    SELECT id, org_id, url, event_types, status, signing_secret, previous_secret, \
           previous_secret_expires_at, rate_limit_per_second, updated_at, consecutive_failures, \
           failing_since, circuit_open_until, headers \
    FROM endpoints WHERE org_id = ANY($1) AND status = ANY($2)";

/// The pool's shared state.
pub(super) struct Shared {
    pub(super) config: Arc<Config>,
    /// The runtime the pool runs on: deliveries published by the group commit (which runs on
    /// a thread of its own) are spawned here, and the endpoints are loaded here, so this pool's
    /// connections belong to this runtime whoever asks.
    pub(super) tasks: tokio::runtime::Handle,
    pub(super) pool: deadpool_postgres::Pool,
    pub(super) client: Client,
    pub(super) endpoints: Mutex<EndpointCache>,
    /// Held while endpoints are loaded: a miss waits for the load in flight and takes what it
    /// filled, so a cold cache (a start, a take-over, a change that dropped an organization)
    /// costs one query, not one per delivery that needs it at that moment.
    pub(super) loading: tokio::sync::Mutex<()>,
    pub(super) runtimes: Mutex<HashMap<Uuid, Arc<EndpointRuntime>, ahash::RandomState>>,
    pub(super) in_memory: AtomicUsize,
    pub(super) global: Semaphore,
    /// Deliveries in memory under their own row's lease: (held, due), for the hand-back.
    pub(super) held: Mutex<HeldRows>,
    /// Batches whose deliveries are in memory, for renewal and the hand-back.
    pub(super) batches: Mutex<HashMap<Uuid, Arc<BatchLease>>>,
    /// Batch rows whose deliveries are all settled: deleted by the next recorder transaction.
    pub(super) finished: Mutex<Vec<Uuid>>,
    /// Batch rows this node let go of: expired by the claimer, so any node takes them over now.
    pub(super) expire: Mutex<Vec<Uuid>>,
    /// The ends of the row leases of claims whose answer was lost (they may have committed):
    /// the rows still leased so are made due by the next take-over, so no lease is waited out.
    pub(super) lost_leases: Mutex<Vec<std::time::SystemTime>>,
    pub(super) recorder: mpsc::Sender<Outcome>,
    /// Looks of deliveries that waited, answered in batches (`owed`).
    pub(super) looks: mpsc::UnboundedSender<Look>,
    pub(super) wake: Notify,
    /// This node, as it names itself in the endpoints' rate budgets.
    pub(super) node: Uuid,
    /// A delivery found a fresh view of an endpoint's bucket: the budget reporter reports now.
    pub(super) report_now: Notify,
    /// What the claimer waits for when it stopped with due rows it had no room for
    /// ([`Room`]): a release that frees that room wakes it, so a backlog larger than the
    /// in-memory bounds is claimed as fast as it is delivered, not once per poll.
    pub(super) claim_waits: AtomicU8,
    pub(super) stopping: AtomicBool,
    pub(super) stop: Notify,
    /// Jobs between taking their slots and having their outcome recorded.
    pub(super) busy: AtomicUsize,
    pub(super) lease: Duration,
    pub(super) memory: Arc<ByteBudget>,
    pub(super) metrics: Arc<Metrics>,
}

fn endpoint_from_row(row: &tokio_postgres::Row, loaded_at: u64) -> Arc<Endpoint> {
    let url: String = row.get(2);
    let time = |i: usize| {
        row.get::<_, Option<std::time::SystemTime>>(i)
            .map(Micros::from_system_time)
    };
    let current: String = row.get(5);
    let previous: Option<String> = row.get(6);
    let keys = std::iter::once(current)
        .chain(previous)
        .filter_map(|s| sign::secret_key(&s))
        .collect();
    let headers: Vec<String> = row.get(13);
    let target = url
        .parse()
        .ok()
        .as_ref()
        .and_then(Target::new)
        .map(|t| t.with_headers(&headers));
    Arc::new(Endpoint {
        id: row.get(0),
        org: OrgId(row.get(1)),
        target,
        url,
        patterns: row.get(3),
        status: EndpointStatus::from_i16(row.get(4)),
        keys,
        previous_until: time(7),
        rate_limit: row.get::<_, Option<i32>>(8).map(|r| r.max(1) as u32),
        updated_at: Micros::from_system_time(row.get(9)),
        consecutive_failures: row.get::<_, i32>(10).max(0) as u32,
        failing_since: time(11),
        circuit_open_until: time(12),
        loaded_at,
    })
}

/// What room the claimer waits for (`Shared::claim_waits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Room {
    /// It is not waiting for room.
    NotWaiting = 0,
    /// The node's bounds: deliveries in memory (`--delivery-queue-max`) or their bytes.
    Node = 1,
    /// An endpoint's bound: due rows were left for endpoints holding all they may.
    Endpoint = 2,
}

impl From<u8> for Room {
    fn from(v: u8) -> Room {
        match v {
            1 => Room::Node,
            2 => Room::Endpoint,
            _ => Room::NotWaiting,
        }
    }
}

impl Shared {
    /// Whether this node's clock is further off the database's than `--clock-offset-max-ms`
    /// (as last measured, and carried forward to a step of this node's clock since: see
    /// [`Metrics::clock_offset_now_us`]): then it claims nothing, renews nothing and starts no
    /// attempt, since leases are written and compared by clocks.
    pub(super) fn clock_off(&self) -> bool {
        self.config.clock_off(self.metrics.clock_offset_now_us())
    }

    /// The database's clock now, as this node's less its offset: the time a delivery handed
    /// back is due at, so that other nodes take it at once even when this node's clock is off.
    pub(super) fn database_now(&self) -> Micros {
        Micros(Micros::now().0 - self.metrics.clock_offset_now_us())
    }

    /// How long one piece of the pool's database work may take (`--db-timeout-ms`).
    pub(super) fn db_timeout(&self) -> Duration {
        Duration::from_millis(self.config.db_timeout_ms)
    }

    /// `work` within [`Shared::db_timeout`]; past it, an error.
    pub(super) async fn timed<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, String>>,
    ) -> Result<T, String> {
        tokio::time::timeout(self.db_timeout(), work)
            .await
            .map_err(|_| "database deadline passed".to_string())?
    }

    /// Drop the cached endpoints of `org` (of every organization with `None`); its endpoints'
    /// gates are to be synced again, and the deliveries waiting on them look again.
    pub(super) fn forget_endpoints(&self, org: Option<OrgId>) {
        let epoch = {
            let mut cache = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
            cache.changes.record(org);
            match org {
                Some(org) => drop(cache.orgs.remove(&org)),
                None => cache.orgs.clear(),
            }
            cache.changes.epoch()
        };
        self.recheck_gates(org, epoch);
    }

    /// After a change to `org`'s endpoints (every organization's for `None`), on any node: until
    /// a job syncs them with the endpoint as stored, its gates' open circuit no longer keeps the
    /// claimer from its due rows (a resume starts the circuit afresh, also of a disabled endpoint
    /// that no cached list names), and what waits on them looks again.
    fn recheck_gates(&self, org: Option<OrgId>, epoch: u64) {
        let runtimes = self.runtimes.lock().unwrap_or_else(|p| p.into_inner());
        for r in runtimes.values().filter(|r| org.is_none_or(|o| o == r.org)) {
            r.gates().recheck = Some(epoch);
            r.change();
        }
    }

    /// The active and paused endpoints of each of `orgs`, from the cache or the database.
    pub(super) async fn org_endpoints(
        &self,
        orgs: &[OrgId],
    ) -> Result<HashMap<OrgId, OrgEndpoints>, String> {
        let mut found = HashMap::with_capacity(orgs.len());
        let (missing, _) = self.cached(orgs, &mut found);
        if missing.is_empty() {
            return Ok(found);
        }
        // One load at a time: a miss waits for the load in flight and takes what it filled.
        // The deadline covers the wait too, so in an outage no caller waits longer than one
        // query may take.
        let load = async {
            let _loading = self.loading.lock().await;
            let (missing, epoch) = self.cached(&missing, &mut found);
            if missing.is_empty() {
                return Ok((missing, Vec::new(), epoch));
            }
            self.metrics.endpoint_loads.fetch_add(1, Ordering::Relaxed);
            let pool = self.pool.clone();
            let ids: Vec<Uuid> = missing.iter().map(|o| o.0).collect();
            let query = async move {
                // Again on the pool's next connection while this one turns out to be gone (a
                // reset, a pooler's restart; up to once per connection the pool may hold): the
                // database may be fine, and a read changes nothing.
                let mut left = pool.status().max_size;
                loop {
                    let client = pool.get().await.map_err(|e| crate::db::describe_pool(&e))?;
                    let live = [EndpointStatus::Active.code(), EndpointStatus::Paused.code()];
                    let rows = match client.prepare_cached(LOAD_ENDPOINTS).await {
                        Ok(stmt) => client.query(&stmt, &[&ids, &&live[..]]).await,
                        Err(e) => Err(e),
                    };
                    match rows {
                        Err(e) if left > 0 && connection_lost(&e) => left -= 1,
                        rows => return rows.map_err(|e| describe(&e)),
                    }
                }
            };
            // On the pool's runtime: a connection the pool opens for it is driven there. Ended
            // with this future (the deadline below), as it would be were it run here.
            let task = self.tasks.spawn(query);
            let _end = AbortOnDrop(task.abort_handle());
            let rows = task.await.map_err(|e| format!("endpoint load: {e}"))??;
            Ok::<_, String>((missing, rows, epoch))
        };
        let (missing, rows, epoch) = self.timed(load).await?;
        let mut loaded: HashMap<OrgId, Vec<Arc<Endpoint>>> =
            missing.iter().map(|o| (*o, Vec::new())).collect();
        for row in &rows {
            let e = endpoint_from_row(row, epoch);
            loaded.entry(e.org).or_default().push(e);
        }
        let mut cache = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        if cache.orgs.len() + loaded.len() > ENDPOINT_CACHE_ORGS_MAX {
            cache.orgs.clear();
        }
        for (org, eps) in loaded {
            let eps: OrgEndpoints = eps.into();
            if !cache.changes.changed_since(org, epoch) {
                cache.orgs.insert(org, Arc::clone(&eps));
            }
            found.insert(org, eps);
        }
        Ok(found)
    }

    /// Move the cached endpoints of `orgs` into `found`; the organizations not cached, and the
    /// cache's change epoch to load them under.
    fn cached(
        &self,
        orgs: &[OrgId],
        found: &mut HashMap<OrgId, OrgEndpoints>,
    ) -> (Vec<OrgId>, u64) {
        let cache = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        let mut missing = Vec::new();
        for org in orgs {
            match cache.orgs.get(org) {
                Some(eps) => {
                    found.insert(*org, Arc::clone(eps));
                }
                None => missing.push(*org),
            }
        }
        (missing, cache.changes.epoch())
    }

    /// One endpoint of `org`, if it is active or paused.
    pub(super) async fn endpoint(
        &self,
        org: OrgId,
        id: Uuid,
    ) -> Result<Option<Arc<Endpoint>>, String> {
        {
            // The usual case: the organization's endpoints are cached.
            let cache = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(list) = cache.orgs.get(&org) {
                return Ok(list.iter().find(|e| e.id == id).cloned());
            }
        }
        // Boxed: the load's state is large and rare; a job's future (which holds this call's
        // state while it waits) stays small for the usual case.
        let eps = Box::pin(self.org_endpoints(&[org])).await?;
        Ok(eps
            .get(&org)
            .and_then(|list| list.iter().find(|e| e.id == id).cloned()))
    }

    /// What this node keeps for endpoint `id`.
    pub(super) fn runtime(&self, org: OrgId, id: Uuid) -> Arc<EndpointRuntime> {
        let mut runtimes = self.runtimes.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(runtimes.entry(id).or_insert_with(|| {
            Arc::new(EndpointRuntime::new(
                id,
                org,
                self.config.delivery_endpoint_concurrency,
            ))
        }))
    }

    /// Bring an endpoint's gates in line with its configuration: its rate limit, and its
    /// recorded health when its configuration is newer than what the gates were set up with
    /// (a new node learns an open circuit; a resume starts the circuit afresh).
    pub(super) fn sync_gates(&self, runtime: &EndpointRuntime, endpoint: &Endpoint) {
        let mut g = runtime.gates();
        if endpoint.updated_at > g.config_at {
            self.circuit_moved(
                g.breaker.open_until.is_some(),
                endpoint.circuit_open_until.is_some(),
            );
            g.config_at = endpoint.updated_at;
            g.breaker.failures = endpoint.consecutive_failures;
            g.breaker.failing_since = endpoint.failing_since;
            g.breaker.open_until = endpoint.circuit_open_until;
            g.breaker.probing = false;
            // A new URL (or a resume) is tried at once, whatever the old one's lookups did.
            g.unsent.over();
        }
        // A load that started before the change (its answer still in flight then) shows the
        // endpoint as it was: the gates are rechecked again with the next load.
        g.synced(endpoint.loaded_at);
        match endpoint.rate_limit {
            Some(rate) if g.bucket.as_ref().map(TokenBucket::rate) != Some(rate) => {
                g.bucket = Some(TokenBucket::new(rate, Micros::now()));
            }
            Some(_) => {}
            None => g.bucket = None,
        }
    }

    /// Keep the open-circuits gauge current when a circuit opens (`false` to `true`) or closes.
    pub(super) fn circuit_moved(&self, was_open: bool, is_open: bool) {
        let delta = i64::from(is_open) - i64::from(was_open);
        if delta != 0 {
            self.metrics
                .circuits_open
                .fetch_add(delta, Ordering::Relaxed);
        }
    }

    /// Deliveries one endpoint may hold in memory: its share, and with a rate limit no more than
    /// it can attempt within half a lease (the rest waits in the database, unleased).
    pub(super) fn endpoint_memory_max(&self, rate: Option<u32>) -> usize {
        let max = self.config.delivery_endpoint_in_memory_max();
        match rate {
            Some(r) => max.min(((r as u64 * self.lease.as_secs() / 2) as usize).max(1)),
            None => max,
        }
    }

    /// Take an in-memory place for a delivery to `runtime`'s endpoint; `force` ignores the
    /// bounds (claimed rows are already ours). The payload's `bytes` count against
    /// `delivery_memory_bytes_max` as well.
    pub(super) fn reserve(
        &self,
        runtime: &EndpointRuntime,
        rate: Option<u32>,
        bytes: usize,
        force: bool,
    ) -> bool {
        if !force
            && (self.in_memory.load(Ordering::Relaxed) >= self.config.delivery_queue_max
                || runtime.held() >= self.endpoint_memory_max(rate))
        {
            return false;
        }
        if !self.memory.take(bytes, force) {
            return false;
        }
        runtime.in_memory.fetch_add(1, Ordering::Relaxed);
        let n = self.in_memory.fetch_add(1, Ordering::Relaxed) + 1;
        self.metrics
            .delivery_in_memory
            .store(n as i64, Ordering::Relaxed);
        true
    }

    /// Give back an in-memory place and its payload's `bytes`; wake the claimer when this frees
    /// the room it waits for (half of the bound it met, so it claims in chunks).
    pub(super) fn release(&self, runtime: &EndpointRuntime, bytes: usize) {
        let bytes_held = self.memory.give(bytes);
        let held = runtime
            .in_memory
            .fetch_sub(1, Ordering::Relaxed)
            .saturating_sub(1);
        let n = self
            .in_memory
            .fetch_sub(1, Ordering::Relaxed)
            .saturating_sub(1);
        self.metrics
            .delivery_in_memory
            .store(n as i64, Ordering::Relaxed);
        let freed = match Room::from(self.claim_waits.load(Ordering::Relaxed)) {
            Room::NotWaiting => false,
            // Each count passes the half-way mark going down once (atomic decrements).
            Room::Node => {
                let half = self.memory.max() / 2;
                n == self.config.delivery_queue_max / 2
                    || (bytes_held <= half && bytes_held + bytes > half)
            }
            Room::Endpoint => held == self.config.delivery_endpoint_in_memory_max() / 2,
        };
        if freed
            && self
                .claim_waits
                .swap(Room::NotWaiting as u8, Ordering::Relaxed)
                != Room::NotWaiting as u8
        {
            self.wake.notify_one();
        }
    }

    /// Whether the room the claimer stopped for is free again: checked after it says what it
    /// waits for, so a release that came just before is not missed.
    pub(super) fn has_room(&self, room: Room, at_bound: &[Arc<EndpointRuntime>]) -> bool {
        match room {
            Room::NotWaiting => true,
            Room::Node => {
                self.in_memory.load(Ordering::Relaxed) <= self.config.delivery_queue_max / 2
                    && self.memory.used() <= self.memory.max() / 2
            }
            Room::Endpoint => {
                let half = self.config.delivery_endpoint_in_memory_max() / 2;
                at_bound.iter().any(|r| r.held() <= half)
            }
        }
    }

    /// Endpoints whose due rows the claimer leaves in the database for now: those with an open
    /// circuit (ids), and those at their in-memory bound (ids, and their runtimes).
    pub(super) fn excluded_endpoints(&self) -> (Vec<Uuid>, Vec<Arc<EndpointRuntime>>) {
        let now = Micros::now();
        let max = self.config.delivery_endpoint_in_memory_max();
        let runtimes = self.runtimes.lock().unwrap_or_else(|p| p.into_inner());
        let mut ids = Vec::new();
        let mut at_bound = Vec::new();
        for r in runtimes.values() {
            if r.held() >= max {
                ids.push(r.id);
                at_bound.push(Arc::clone(r));
            } else if r.gates().keeps_claims_away(now) {
                ids.push(r.id);
            }
        }
        (ids, at_bound)
    }

    /// Forget what is kept of endpoints with nothing in memory, a healthy circuit and no rate
    /// limit spent lately ([`TokenBucket::settled`]); count the open circuits.
    pub(super) fn prune_runtimes(&self) {
        let mut open = 0;
        let now = Micros::now();
        let mut runtimes = self.runtimes.lock().unwrap_or_else(|p| p.into_inner());
        runtimes.retain(|_, r| {
            let g = r.gates();
            if g.breaker.open_until.is_some() {
                open += 1;
            }
            r.held() > 0
                || g.breaker.failures > 0
                || g.bucket.as_ref().is_some_and(|b| !b.settled(now))
        });
        self.metrics.circuits_open.store(open, Ordering::Relaxed);
    }

    /// Note a delivery held under its own row's lease, for the hand-back at shutdown.
    pub(super) fn remember(&self, event: EventId, endpoint: Uuid, held: Micros, due: Micros) {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((event, endpoint), (held, due));
    }

    /// The delivery is no longer held under its own row's lease.
    pub(super) fn forget(&self, event: EventId, endpoint: Uuid) {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(event, endpoint));
    }

    /// Expire the batch row `id` at the claimer's next pass, so any node takes over at once what
    /// it owes, if it was written (if not, there is no such row and nothing changes).
    pub(super) fn expire_batch(&self, id: Uuid) {
        self.expire
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(id);
    }

    /// The claim whose row leases end at `until` may have committed, and no delivery of it is in
    /// memory: its rows are made due at the next take-over.
    pub(super) fn lease_lost(&self, until: std::time::SystemTime) {
        self.leases_lost_again(vec![until]);
    }

    /// The lease ends [`Shared::lease_lost`] gathered, taken for a take-over.
    pub(super) fn leases_lost(&self) -> Vec<std::time::SystemTime> {
        std::mem::take(&mut *self.lost_leases.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Lease ends taken for a take-over that failed: kept for the next one.
    pub(super) fn leases_lost_again(&self, until: Vec<std::time::SystemTime>) {
        self.lost_leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(until);
    }

    /// A delivery of `batch` is no longer covered by it; the last one queues the row's deletion.
    pub(super) fn settle(&self, batch: &BatchLease) {
        if batch.outstanding.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.batches
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&batch.id);
            let list = if batch.abandoned.load(Ordering::Acquire) {
                &self.expire
            } else {
                &self.finished
            };
            list.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(batch.id);
        }
    }

    /// Let go of what a delivery holds in memory: its place and payload bytes, its batch's
    /// cover (the last one settles the batch row), and its entry among the rows held, unless
    /// `stopping` (the hand-back takes it; a batch it was covered by expires).
    pub(super) fn let_go(
        &self,
        (event, endpoint): (EventId, Uuid),
        lease: &Lease,
        runtime: &EndpointRuntime,
        bytes: usize,
        stopping: bool,
    ) {
        match lease {
            Lease::Batch(b) => {
                if stopping {
                    lease.abandon();
                }
                self.settle(b);
            }
            Lease::Row { .. } if !stopping => self.forget(event, endpoint),
            Lease::Row { .. } => {}
        }
        self.release(runtime, bytes);
    }

    /// Hand an outcome to the recorder. One that lets its job go counts as busy until the
    /// recorder let it go (a shutdown waits for it); if the recorder is gone, it is let go here.
    /// When the recorder's queue is full, what is left to await is the wait for its room: boxed,
    /// so a job's future (which holds it) stays small for the usual case.
    pub(super) fn record(&self, outcome: Outcome) -> Option<RoomWait<'_>> {
        if matches!(outcome.then, Then::LetGo(_)) {
            self.busy.fetch_add(1, Ordering::SeqCst);
        }
        let outcome = match self.recorder.try_send(outcome) {
            Ok(()) => return None,
            Err(mpsc::error::TrySendError::Full(o)) => o,
            Err(mpsc::error::TrySendError::Closed(o)) => {
                self.written(o, Recorded::Failed);
                return None;
            }
        };
        Some(Box::pin(async move {
            if let Err(e) = self.recorder.send(outcome).await {
                self.written(e.0, Recorded::Failed);
            }
        }))
    }

    /// What follows an outcome's write (or its failure): its job learns what became of it, or
    /// the delivery is let go (abandoned, its lease left to run out, when `Failed`).
    pub(super) fn written(&self, outcome: Outcome, recorded: Recorded) {
        match outcome.then {
            Then::Answer(tx) => {
                let _ = tx.send(recorded);
            }
            Then::LetGo(r) => {
                if recorded == Recorded::Failed {
                    r.lease.abandon();
                }
                let key = (outcome.event, outcome.endpoint);
                self.let_go(key, &r.lease, &r.runtime, r.bytes, false);
                self.busy.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

/// The wait for room in the recorder's queue ([`Shared::record`]).
pub(super) type RoomWait<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;

/// Counts a job as busy (attempting, or handing its outcome to the recorder) while it lives.
pub(super) struct Busy<'a>(&'a AtomicUsize);

impl<'a> Busy<'a> {
    pub(super) fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Busy(count)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Aborts a task spawned elsewhere when the future that waits for it is dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
