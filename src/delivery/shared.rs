//! The delivery pool's shared state: its connections and HTTP client, the webhook cache, each
//! organization's share of memory and concurrency, and the leases held on events in memory.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Notify, Semaphore};

use super::connector::HttpClient;
use super::model::{Job, Target};
use super::record::Attempted;
use crate::auth::Changes;
use crate::config::Config;
use crate::flow::sink::ByteBudget;
use crate::ids::{EventId, Micros, OrgId};
use crate::metrics::Metrics;

/// Webhooks by organization (`None`: the organization has none).
pub(super) type Targets = HashMap<OrgId, Option<Arc<Target>>>;

/// An organization's share of the pool.
pub(super) struct OrgState {
    pub(super) in_memory: usize,
    pub(super) slots: Arc<Semaphore>,
}

/// The pool's shared state.
pub(super) struct Shared {
    pub(super) config: Arc<Config>,
    pub(super) pool: deadpool_postgres::Pool,
    pub(super) client: HttpClient,
    pub(super) targets: Mutex<(Targets, Changes)>,
    pub(super) orgs: Mutex<HashMap<OrgId, OrgState>>,
    pub(super) in_memory: AtomicUsize,
    pub(super) global: Semaphore,
    /// Every event in memory and the lease held on it, for release at shutdown.
    pub(super) held: Mutex<HashMap<EventId, (Micros, Micros)>>,
    pub(super) recorder: mpsc::Sender<Attempted>,
    pub(super) wake: Notify,
    pub(super) stopping: AtomicBool,
    pub(super) stop: Notify,
    /// Jobs between taking their slots and having their outcome recorded.
    pub(super) busy: AtomicUsize,
    pub(super) lease: Duration,
    pub(super) per_org_max: usize,
    pub(super) memory: Arc<ByteBudget>,
    pub(super) metrics: Arc<Metrics>,
}

impl Shared {
    /// Drop the cached webhook of `org` (of every organization with `None`).
    pub(super) fn forget_target(&self, org: Option<OrgId>) {
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
    /// The payload's `bytes` count against `delivery_memory_bytes_max` as well.
    pub(super) fn reserve(&self, org: OrgId, bytes: usize, force: bool) -> bool {
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
        if !self.memory.take(bytes, force) {
            if state.in_memory == 0 {
                orgs.remove(&org);
            }
            return false;
        }
        state.in_memory += 1;
        let n = self.in_memory.fetch_add(1, Ordering::Relaxed) + 1;
        self.metrics
            .delivery_in_memory
            .store(n as i64, Ordering::Relaxed);
        true
    }

    /// Give back an in-memory slot and its payload's `bytes`.
    pub(super) fn release_slot(&self, org: OrgId, bytes: usize) {
        self.memory.give(bytes);
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
        self.metrics
            .delivery_in_memory
            .store(n as i64, Ordering::Relaxed);
    }

    /// Organizations at their in-memory bound: the claimer leaves their due rows in the database.
    pub(super) fn saturated_orgs(&self) -> Vec<uuid::Uuid> {
        let orgs = self.orgs.lock().unwrap_or_else(|p| p.into_inner());
        orgs.iter()
            .filter(|(_, s)| s.in_memory >= self.per_org_max)
            .map(|(o, _)| o.0)
            .collect()
    }

    pub(super) fn org_slots(&self, org: OrgId) -> Arc<Semaphore> {
        let mut orgs = self.orgs.lock().unwrap_or_else(|p| p.into_inner());
        let state = orgs.entry(org).or_insert_with(|| OrgState {
            in_memory: 0,
            slots: Arc::new(Semaphore::new(self.config.delivery_org_concurrency)),
        });
        Arc::clone(&state.slots)
    }

    /// Note the lease this node holds on an event in memory, for the hand-back at shutdown.
    pub(super) fn remember(&self, job: &Job) {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(job.event, (job.held, job.due));
    }

    /// Send an attempt's outcome to the recorder and learn whether this node still holds the event.
    pub(super) async fn record(
        &self,
        attempted: Attempted,
        answer: oneshot::Receiver<bool>,
    ) -> bool {
        if self.recorder.send(attempted).await.is_err() {
            return false;
        }
        answer.await.unwrap_or(false)
    }
}

/// Counts a job as busy (attempting, or waiting for its outcome to be recorded) while it lives.
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
