//! The running delivery pool: start, the sink the store publishes to, and finish at shutdown.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::task::JoinHandle;

use super::budget::budget_loop;
use super::claim::{claim_loop, release_all};
use super::client::Client;
use super::connector::SafeConnector;
use super::job::run_job;
use super::model::{BatchLease, Job, Lease};
use super::owed::look_loop;
use super::record::record_loop;
use super::shared::{Room, Shared};
use crate::config::{Config, DELIVERY_POOL_IDLE, RECORDERS};
use crate::db::build_bookkeeping_pool;
use crate::flow::answer::EndpointStatus;
use crate::flow::event::NewEvent;
use crate::flow::sink::{BatchPlan, ByteBudget, DeliverySink, Disposition, Planned, Planning};
use crate::hosts::Hosts;
use crate::ids::{new_v7, Micros, OrgId};
use crate::metrics::Metrics;

/// The running delivery pool.
pub struct Delivery {
    shared: Arc<Shared>,
    claimer: JoinHandle<()>,
    recorders: Vec<JoinHandle<()>>,
    looker: JoinHandle<()>,
    budgets: JoinHandle<()>,
}

/// What the store holds of the delivery pool: the [`DeliverySink`] the server wires in.
#[derive(Clone)]
pub struct DeliveryHandle(Arc<Shared>);

impl Delivery {
    /// Start the pool on the current tokio runtime; its claimer begins once `claim_after` is
    /// true (the partitions it may write to exist).
    pub fn start(
        config: Arc<Config>,
        metrics: Arc<Metrics>,
        hosts: Hosts,
        mut claim_after: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(Delivery, DeliveryHandle), String> {
        // Several endpoints may share a host: keep as many idle connections as deliveries can
        // be in flight, or connections are closed and opened all the time.
        let client = Client::new(
            SafeConnector {
                allow_private: config.allow_private_webhooks,
                connect_timeout: Duration::from_millis(config.delivery_timeout_ms),
                hosts,
            },
            config.delivery_concurrency,
            DELIVERY_POOL_IDLE,
            Arc::clone(&metrics),
        );
        let (recorder_tx, recorder_rx) = mpsc::channel(config.recorder_queue_max());
        let (looks_tx, looks_rx) = mpsc::unbounded_channel();
        let pool = build_bookkeeping_pool(&config, config.delivery_pool_size())?;
        let shared = Arc::new(Shared {
            tasks: tokio::runtime::Handle::current(),
            pool,
            client,
            endpoints: Mutex::new(Default::default()),
            loading: tokio::sync::Mutex::new(()),
            runtimes: Mutex::new(HashMap::default()),
            in_memory: AtomicUsize::new(0),
            global: Semaphore::new(config.delivery_concurrency),
            held: Mutex::new(HashMap::default()),
            batches: Mutex::new(HashMap::new()),
            finished: Mutex::new(Vec::new()),
            expire: Mutex::new(Vec::new()),
            lost_leases: Mutex::new(Vec::new()),
            recorder: recorder_tx,
            looks: looks_tx,
            wake: Notify::new(),
            node: new_v7(Micros::now()),
            report_now: Notify::new(),
            claim_waits: AtomicU8::new(Room::NotWaiting as u8),
            stopping: AtomicBool::new(false),
            stop: Notify::new(),
            busy: AtomicUsize::new(0),
            lease: Duration::from_secs(config.delivery_lease_s),
            memory: ByteBudget::new(config.delivery_memory_bytes_max),
            metrics,
            config: Arc::clone(&config),
        });
        // The first claim waits until `claim_after` says true (or its sender is gone).
        let claimer = tokio::spawn({
            let shared = Arc::clone(&shared);
            async move {
                let _ = claim_after.wait_for(|ready| *ready).await;
                claim_loop(shared).await
            }
        });
        let looker = tokio::spawn(look_loop(Arc::clone(&shared), looks_rx));
        let budgets = tokio::spawn(budget_loop(Arc::clone(&shared)));
        let recorder_rx = Arc::new(tokio::sync::Mutex::new(recorder_rx));
        let recorders = (0..RECORDERS)
            .map(|_| tokio::spawn(record_loop(Arc::clone(&shared), Arc::clone(&recorder_rx))))
            .collect();
        let handle = DeliveryHandle(Arc::clone(&shared));
        Ok((
            Delivery {
                shared,
                claimer,
                recorders,
                looker,
                budgets,
            },
            handle,
        ))
    }

    /// Stop claiming, give attempts in flight up to `grace` to finish, then hand every delivery
    /// still in memory back to the database, due when it was planned, so another node (or this
    /// one restarted) takes it over without waiting for the lease to run out.
    pub async fn finish(self, grace: Duration) {
        let shared = &self.shared;
        shared.stopping.store(true, Ordering::SeqCst);
        shared.stop.notify_waiters();
        // Attempts in flight finish and their outcomes are recorded before anything is handed
        // back: an outcome written after the hand-back would take the lease again.
        let deadline = tokio::time::Instant::now() + grace;
        while shared.busy.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(crate::config::SHUTDOWN_POLL).await;
        }
        self.claimer.abort();
        let released = release_all(shared).await;
        if released > 0 {
            tracing::info!(
                deliveries = released,
                "deliveries handed back to the database"
            );
        }
        for r in self.recorders {
            r.abort();
        }
        self.looker.abort();
        self.budgets.abort();
    }
}

impl DeliveryHandle {
    /// Plan a batch: the endpoints each event matches, and for each delivery whether this node
    /// holds it in memory (under one lease for the batch), leaves it due in the database (no
    /// room, or its endpoint's circuit is open), or parks it (a paused endpoint).
    async fn plan_batch(&self, events: &[&NewEvent]) -> Result<BatchPlan, String> {
        let shared = &self.0;
        let orgs: Vec<OrgId> = events
            .iter()
            .map(|e| e.org)
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let endpoints = shared.org_endpoints(&orgs).await?;
        let now = Micros::now();
        let mut any_held = false;
        let plans = events
            .iter()
            .map(|event| {
                let mut planned = Planned::default();
                let Some(eps) = endpoints.get(&event.org) else {
                    return planned;
                };
                for ep in eps.iter().filter(|ep| ep.takes(&event.event_type)) {
                    let disposition = if ep.status == EndpointStatus::Paused {
                        Disposition::Parked
                    } else {
                        let runtime = shared.runtime(event.org, ep.id);
                        let open = runtime.gates().breaker.closed_until(now).is_some();
                        let bytes = event.payload.len();
                        if !open && shared.reserve(&runtime, ep.rate_limit, bytes, false) {
                            planned.held_bytes += bytes;
                            any_held = true;
                            Disposition::Held
                        } else {
                            Disposition::Due
                        }
                    };
                    planned.endpoints.push(ep.id);
                    planned.dispositions.push(disposition);
                }
                planned
            })
            .collect();
        Ok(BatchPlan {
            events: plans,
            lease: any_held.then(|| (new_v7(now), now.plus(shared.lease))),
        })
    }
}

impl DeliverySink for DeliveryHandle {
    fn plan<'a>(&'a self, events: &'a [&'a NewEvent]) -> Planning<'a> {
        Box::pin(self.plan_batch(events))
    }

    fn publish(
        &self,
        lease: Option<(uuid::Uuid, Micros)>,
        committed: Vec<(NewEvent, Planned)>,
        not_written: Vec<(OrgId, Planned)>,
    ) {
        let shared = &self.0;
        for (org, planned) in not_written {
            give_back(shared, org, &planned);
        }
        let mut left_due = false;
        let mut jobs = Vec::new();
        let known_written = !committed.is_empty();
        for (event, planned) in committed {
            for (endpoint, disposition) in planned.endpoints.iter().zip(&planned.dispositions) {
                match disposition {
                    Disposition::Held => jobs.push((event.clone(), *endpoint)),
                    Disposition::Due => left_due = true,
                    Disposition::Parked => {}
                }
            }
        }
        if let Some((id, until)) = lease {
            let batch = Arc::new(BatchLease {
                id,
                until: AtomicI64::new(until.0),
                outstanding: AtomicUsize::new(jobs.len()),
                abandoned: AtomicBool::new(false),
            });
            if jobs.is_empty() && !known_written {
                // Nothing of the batch is known written, yet its COMMIT may still land after the
                // writer gave up (a silent network): expire the row rather than delete it, so
                // whatever did commit is taken over by any node, now or when its lease runs out.
                shared.expire_batch(id);
            } else if jobs.is_empty() {
                // Written, but nothing of it held in memory: nothing to lease.
                shared
                    .finished
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(id);
            } else {
                shared
                    .batches
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id, Arc::clone(&batch));
            }
            let now = Micros::now();
            for (event, endpoint) in jobs {
                let job = Job {
                    event: event.id,
                    org: event.org,
                    endpoint,
                    event_type: event.event_type,
                    payload: event.payload,
                    created_at: event.created_at,
                    traceparent: event.traceparent,
                    attempts: 0,
                    retry_base: 0,
                    lease: Lease::Batch(Arc::clone(&batch)),
                    due: now,
                    waited: false,
                    reserved: None,
                    looked: 0,
                };
                let runtime = shared.runtime(job.org, endpoint);
                shared
                    .tasks
                    .spawn(run_job(Arc::clone(shared), job, runtime, false));
            }
        }
        if left_due {
            self.wake();
        }
    }

    fn wake(&self) {
        self.0.wake.notify_one();
    }

    fn org_changed(&self, org: Option<OrgId>) {
        self.0.forget_endpoints(org);
    }
}

/// Give back the in-memory places a plan took for deliveries that were not written.
fn give_back(shared: &Shared, org: OrgId, planned: &Planned) {
    for (endpoint, disposition) in planned.endpoints.iter().zip(&planned.dispositions) {
        if *disposition == Disposition::Held {
            let runtime = shared.runtime(org, *endpoint);
            // Each held delivery took its payload's bytes; the plan's total is their sum.
            let per = planned.held_bytes
                / planned
                    .dispositions
                    .iter()
                    .filter(|d| **d == Disposition::Held)
                    .count()
                    .max(1);
            shared.release(&runtime, per);
        }
    }
}
