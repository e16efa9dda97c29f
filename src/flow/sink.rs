//! How the stages reach each other: the store's bounded queues and its health flag, and the two
//! traits the server wires, so that no stage names a later one.
//!
//! - [`StoreQueues`]: what the owner cores and ingress hold of the store (bounded; full → refused).
//! - [`JobDoor`]: where they hand the store everything but event writes. Implemented by the
//!   store's turns by tenant.
//! - [`CoreLink`]: what the store and delivery hold of the ingress cores (answers, dedup
//!   settlements, cache invalidation). Implemented by the mesh.
//! - [`DeliverySink`]: what the store holds of delivery (a plan per event before the write, the
//!   committed batch after it). Implemented by the delivery pool.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, Notify};

use super::answer::{Completion, Refusal};
use super::event::{DedupKey, NewEvent};
use super::job::{StoreJob, WriteJob};
use crate::config::{AckMode, Config, HEALTH_DOWN_HOLD};
use crate::ids::{CoreId, EventId, Micros, OrgId};
use crate::metrics::StoreGauges;

/// Whether the database takes writes: read by ingress cores (a load, no lock) to refuse writes at
/// once while it does not; set by the store's health probe and by failed writes.
pub struct Health {
    up: AtomicBool,
    kick: Notify,
    epoch: std::time::Instant,
    /// Milliseconds after `epoch` of the last `set_down`.
    down_at_ms: std::sync::atomic::AtomicU64,
    /// The probe could not reach the database at all (no answer in time, no connection), as
    /// opposed to reaching one that refuses writes (read-only, in recovery, full).
    unreachable: AtomicBool,
    /// This node's clock is further off the database's than `--clock-offset-max-ms`.
    clock_off: AtomicBool,
    /// The clocks have been compared at least once (a probe, or start-up's reading).
    clock_read: tokio::sync::watch::Sender<bool>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            up: AtomicBool::new(true),
            kick: Notify::new(),
            epoch: std::time::Instant::now(),
            down_at_ms: std::sync::atomic::AtomicU64::new(0),
            unreachable: AtomicBool::new(false),
            clock_off: AtomicBool::new(false),
            clock_read: tokio::sync::watch::Sender::new(false),
        }
    }
}

impl Health {
    /// Whether the last contact with the database worked (whatever the clock).
    pub fn database_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Whether this node's clock is further off the database's than `--clock-offset-max-ms`.
    pub fn clock_is_off(&self) -> bool {
        self.clock_off.load(Ordering::Relaxed)
    }

    /// Why this node takes no writes now, if it does not.
    pub fn refusal(&self) -> Option<Refusal> {
        if !self.database_up() {
            Some(Refusal::Unavailable)
        } else if self.clock_is_off() {
            Some(Refusal::ClockOff)
        } else {
            None
        }
    }

    /// This node's clock is too far off the database's (`true`), or within (`false`). Returns
    /// whether that changed.
    pub fn set_clock_off(&self, off: bool) -> bool {
        self.clock_off.swap(off, Ordering::Relaxed) != off
    }

    /// The clocks have been compared (a probe, or start-up's reading).
    pub fn clock_measured(&self) {
        self.clock_read.send_replace(true);
    }

    /// Wait (up to `limit`) until the probe has compared the clocks once; whether it has.
    /// Start-up waits for it before serving or claiming when its own reading failed.
    pub async fn wait_clock_read(&self, limit: std::time::Duration) -> bool {
        let mut rx = self.clock_read.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|read| *read))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The database failed us: refuse writes until the probe succeeds, and wake the probe.
    /// Returns whether it was up until now.
    pub fn set_down(&self) -> bool {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.down_at_ms.store(now, Ordering::Relaxed);
        let was_up = self.up.swap(false, Ordering::Relaxed);
        self.kick.notify_one();
        was_up
    }

    /// The probe's write went through. The flag goes up only once `HEALTH_DOWN_HOLD` has passed
    /// since the last failure, so a database that fails every other write does not flap between
    /// up and down. Returns whether it was down until now (and is up now).
    pub fn set_up(&self) -> bool {
        let now = self.epoch.elapsed().as_millis() as u64;
        let since = now.saturating_sub(self.down_at_ms.load(Ordering::Relaxed));
        if !self.database_up() && since < HEALTH_DOWN_HOLD.as_millis() as u64 {
            return false;
        }
        !self.up.swap(true, Ordering::Relaxed)
    }

    /// Whether the probe's last try could not reach the database at all: then reads would only
    /// wait out their deadline, and are refused at once instead.
    pub fn is_unreachable(&self) -> bool {
        self.unreachable.load(Ordering::Relaxed)
    }

    /// The database was reached (`true`: the probe's last try, or a batch it answered) or not
    /// (`false`: the probe's last try). Written only when that changes: ingress cores read the
    /// flags beside it for every request.
    pub fn set_reachable(&self, reachable: bool) {
        if self.unreachable.load(Ordering::Relaxed) == reachable {
            self.unreachable.store(!reachable, Ordering::Relaxed);
        }
    }

    /// Have the probe check at once.
    pub fn probe_now(&self) {
        self.kick.notify_one();
    }

    /// Resolves when [`Health::set_down`] or [`Health::probe_now`] is called (the probe waits
    /// on it).
    pub async fn kicked(&self) {
        self.kick.notified().await
    }
}

/// A byte budget shared across threads: payloads held in a queue or in memory take from it, and
/// give back when they leave.
pub struct ByteBudget {
    used: AtomicUsize,
    max: usize,
}

impl ByteBudget {
    /// A budget of `max` bytes.
    pub fn new(max: usize) -> Arc<ByteBudget> {
        Arc::new(ByteBudget {
            used: AtomicUsize::new(0),
            max,
        })
    }

    /// Take `n` bytes; `false` (nothing taken) when they don't fit. `force` takes them anyway
    /// (for what is already in memory and must be tracked).
    pub fn take(&self, n: usize, force: bool) -> bool {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let next = used.saturating_add(n);
            if next > self.max && !force {
                return false;
            }
            match self
                .used
                .compare_exchange_weak(used, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(actual) => used = actual,
            }
        }
    }

    /// Give back `n` bytes; returns the bytes held after.
    pub fn give(&self, n: usize) -> usize {
        self.used.fetch_sub(n, Ordering::Relaxed).saturating_sub(n)
    }

    /// The budget's size.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Bytes left.
    pub fn free(&self) -> usize {
        self.max.saturating_sub(self.used())
    }
}

/// Where the cores hand the store everything but event writes: each job is admitted or refused
/// at once on the caller's thread, where the store's turns by tenant see it the moment it is
/// asked. It was a bounded channel to a task that admitted them: while the store's threads were
/// busy, a burst filled the channel and was refused before the turns saw it, whichever tenant's
/// jobs those were.
pub trait JobDoor: Send + Sync {
    /// Admit `job` (it will be run, or answered with a refusal, through its reply), or refuse it
    /// now: nothing of it is done.
    fn submit(&self, job: StoreJob) -> Result<(), Refusal>;
}

/// What ingress cores hold of the store: the bounded write queue (in events and in payload
/// bytes), the door for other jobs, and the health flag.
#[derive(Clone)]
pub struct StoreQueues {
    writes: mpsc::Sender<WriteJob>,
    write_bytes: Arc<ByteBudget>,
    jobs: Arc<dyn JobDoor>,
    health: Arc<Health>,
    ack: AckMode,
}

/// The store's ends of [`StoreQueues`].
pub struct StoreInbox {
    /// Events to write.
    pub writes: mpsc::Receiver<WriteJob>,
    /// Payload bytes queued or being written: the writer gives them back after each batch.
    pub write_bytes: Arc<ByteBudget>,
    /// The flag the store keeps.
    pub health: Arc<Health>,
}

/// The store's write queue, sized from the configuration, and `jobs`, the door for the rest.
pub fn store_queues(config: &Config, jobs: Arc<dyn JobDoor>) -> (StoreQueues, StoreInbox) {
    let (writes, write_rx) = mpsc::channel(config.write_queue_events_max);
    let health = Arc::new(Health::default());
    let write_bytes = ByteBudget::new(config.write_queue_bytes_max);
    (
        StoreQueues {
            writes,
            write_bytes: Arc::clone(&write_bytes),
            jobs,
            health: Arc::clone(&health),
            ack: config.ack,
        },
        StoreInbox {
            writes: write_rx,
            write_bytes,
            health,
        },
    )
}

impl StoreQueues {
    /// A reading of the health flag and the write queue's depth for the metrics, which does not
    /// keep the queue open (the writers stop once every core's sender is gone).
    pub fn gauges_probe(&self) -> Box<dyn Fn() -> StoreGauges + Send + Sync> {
        let weak = self.writes.downgrade();
        let health = Arc::clone(&self.health);
        Box::new(move || StoreGauges {
            database_up: health.database_up(),
            write_queue_events: weak
                .upgrade()
                .map_or(0, |tx| tx.max_capacity() - tx.capacity()),
        })
    }

    /// Queue an event; refused at once when the queue is full (in events or payload bytes) or
    /// the database is down.
    pub fn write(&self, job: WriteJob) -> Result<(), Refusal> {
        if let Some(refusal) = self.health.refusal() {
            return Err(refusal);
        }
        let bytes = job.event.payload.len();
        if !self.write_bytes.take(bytes, false) {
            return Err(Refusal::Overloaded("write queue bytes full"));
        }
        self.writes.try_send(job).map_err(|e| {
            self.write_bytes.give(bytes);
            match e {
                mpsc::error::TrySendError::Full(_) => Refusal::Overloaded("write queue full"),
                mpsc::error::TrySendError::Closed(_) => Refusal::Unavailable,
            }
        })
    }

    /// Queue the events of one batch request, all or none: refused at once, with nothing queued,
    /// when they don't all fit (in events or payload bytes) or the database is down. They enter
    /// the queue back to back, so a writer takes them into one group commit when it can.
    pub fn write_many(&self, jobs: Vec<WriteJob>) -> Result<(), Refusal> {
        if let Some(refusal) = self.health.refusal() {
            return Err(refusal);
        }
        if jobs.is_empty() {
            return Ok(());
        }
        let bytes: usize = jobs.iter().map(|j| j.event.payload.len()).sum();
        if !self.write_bytes.take(bytes, false) {
            return Err(Refusal::Overloaded("write queue bytes full"));
        }
        let permits = match self.writes.try_reserve_many(jobs.len()) {
            Ok(p) => p,
            Err(e) => {
                self.write_bytes.give(bytes);
                return Err(match e {
                    mpsc::error::TrySendError::Full(()) => Refusal::Overloaded("write queue full"),
                    mpsc::error::TrySendError::Closed(()) => Refusal::Unavailable,
                });
            }
        };
        for (permit, job) in permits.zip(jobs) {
            permit.send(job);
        }
        Ok(())
    }

    /// Hand over other work; refused at once when it can't wait for its turn ([`JobDoor`]).
    pub fn submit(&self, job: StoreJob) -> Result<(), Refusal> {
        self.jobs.submit(job)
    }

    /// The ack mode writes are answered in.
    pub fn ack_mode(&self) -> AckMode {
        self.ack
    }

    /// The database health flag.
    pub fn health(&self) -> &Health {
        &self.health
    }
}

/// A boxed future, for the one async method of [`CoreLink`].
pub type Pending<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// What the pools hold of the ingress cores.
pub trait CoreLink: Send + Sync + 'static {
    /// Deliver answers to requests waiting on `core`.
    fn complete(&self, core: CoreId, completions: Vec<Completion>);
    /// Tell the owner core how the dedup keys it reserved were settled: committed as the event,
    /// or not written (`None`).
    fn settle(&self, core: CoreId, keys: Vec<(DedupKey, Option<EventId>)>);
    /// `org`'s key or webhook changed (`None`: any may have, and the database may be another:
    /// the cores forget their recent-dedup windows too); resolves once every core has dropped
    /// what it cached about it.
    fn org_changed(&self, org: Option<OrgId>) -> Pending<'_>;
    /// The same, without waiting (a change made by another node).
    fn notify_org_changed(&self, org: Option<OrgId>);
    /// The cluster's rate-limit balances after `core`'s report (`None`: the report failed).
    fn rate_reported(&self, core: CoreId, balances: Option<Vec<(OrgId, f64)>>);
}

/// What happens to one (event, endpoint) delivery once the event is committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// This node holds it in memory under the batch's lease and attempts it at once.
    Held,
    /// Written due now for any node's claimer (this node has no room for it in memory).
    Due,
    /// Written parked (its endpoint is paused): it waits until the endpoint is resumed.
    Parked,
}

/// How one event is to be delivered, decided before it is written: the endpoints it matched
/// (active and paused ones whose patterns take its type) and what happens to each.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Planned {
    /// Every endpoint the event matched, stored with the event.
    pub endpoints: Vec<uuid::Uuid>,
    /// What happens to the delivery to each, in the same order.
    pub dispositions: Vec<Disposition>,
    /// Payload bytes held in the delivery pool's memory budget for the held deliveries.
    pub held_bytes: usize,
}

impl Planned {
    /// Whether this node holds any delivery of the event (then it is in the batch's lease).
    pub fn held(&self) -> bool {
        self.dispositions.contains(&Disposition::Held)
    }
}

/// The plan of one group-commit batch: a plan per event, and the lease this node takes on the
/// events it holds (one row, `delivery_batches`, for all of them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchPlan {
    /// One per event, in the batch's order.
    pub events: Vec<Planned>,
    /// (batch id, lease end) when any event is held.
    pub lease: Option<(uuid::Uuid, Micros)>,
}

/// A boxed future for the async method of [`DeliverySink`].
pub type Planning<'a> = Pin<Box<dyn Future<Output = Result<BatchPlan, String>> + Send + 'a>>;

/// What the store holds of the delivery pool.
pub trait DeliverySink: Send + Sync + 'static {
    /// Plan the delivery of a batch about to be written: match each event against its
    /// organization's endpoints (loading the ones not cached), take in-memory slots. `Err` when
    /// the endpoints could not be read (the batch is then not written: 503).
    fn plan<'a>(&'a self, events: &'a [&'a NewEvent]) -> Planning<'a>;
    /// After a write: `committed` events go to delivery with their plans (under the batch's
    /// lease); the slots of events that were not written are given back.
    fn publish(
        &self,
        lease: Option<(uuid::Uuid, Micros)>,
        committed: Vec<(NewEvent, Planned)>,
        not_written: Vec<(OrgId, Planned)>,
    );
    /// Due work was written to the database (a redelivery, a resume): claim it now.
    fn wake(&self);
    /// `org`'s endpoints may have changed (`None`: any organization's may have).
    fn org_changed(&self, org: Option<OrgId>);
}
