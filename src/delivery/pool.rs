//! The running delivery pool: start, the sink the store publishes to, and finish at shutdown.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::task::JoinHandle;

use super::claim::{claim_loop, release_all};
use super::connector::SafeConnector;
use super::job::run_job;
use super::model::Job;
use super::record::record_loop;
use super::shared::Shared;
use crate::auth::Changes;
use crate::config::{Config, DELIVERY_POOL_IDLE, RECORDERS};
use crate::db::build_bookkeeping_pool;
use crate::flow::event::NewEvent;
use crate::flow::sink::{ByteBudget, DeliverySink, Planned};
use crate::ids::OrgId;
use crate::metrics::Metrics;

/// The running delivery pool.
pub struct Delivery {
    shared: Arc<Shared>,
    claimer: JoinHandle<()>,
    recorders: Vec<JoinHandle<()>>,
}

/// What the store holds of the delivery pool: the [`DeliverySink`] the server wires in.
#[derive(Clone)]
pub struct DeliveryHandle(Arc<Shared>);

impl Delivery {
    /// Start the pool on the current tokio runtime.
    pub fn start(
        config: Arc<Config>,
        metrics: Arc<Metrics>,
    ) -> Result<(Delivery, DeliveryHandle), String> {
        let connector = SafeConnector {
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
                .pool_idle_timeout(DELIVERY_POOL_IDLE)
                // Several organizations may share a host: keep as many idle connections as deliveries
                // can be in flight, or the pool closes and reopens connections all the time.
                .pool_max_idle_per_host(config.delivery_concurrency)
                .build(https);
        let (recorder_tx, recorder_rx) = mpsc::channel(config.recorder_queue_max());
        let pool = build_bookkeeping_pool(&config, config.delivery_pool_size())?;
        let shared = Arc::new(Shared {
            pool: pool.clone(),
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
            per_org_max: config.delivery_org_in_memory_max(),
            memory: ByteBudget::new(config.delivery_memory_bytes_max),
            metrics,
            config: Arc::clone(&config),
        });
        let claimer = tokio::spawn(claim_loop(Arc::clone(&shared)));
        let recorder_rx = Arc::new(tokio::sync::Mutex::new(recorder_rx));
        let db_timeout = Config::ms(config.db_timeout_ms);
        let recorders = (0..RECORDERS)
            .map(|_| {
                tokio::spawn(record_loop(
                    pool.clone(),
                    db_timeout,
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
            tokio::time::sleep(crate::config::SHUTDOWN_POLL).await;
        }
        self.claimer.abort();
        let released = release_all(shared).await;
        if released > 0 {
            tracing::info!(events = released, "deliveries handed back to the database");
        }
        for r in self.recorders {
            r.abort();
        }
    }
}

impl DeliverySink for DeliveryHandle {
    /// An event of an organization with a webhook is written leased to this node when it has an
    /// in-memory slot for it (handed over after COMMIT, no polling), else due now for any node's
    /// claimer.
    fn plan(&self, event: &NewEvent) -> Planned {
        if !event.deliver {
            return Planned {
                next_attempt_at: None,
                held: false,
                held_bytes: 0,
            };
        }
        let bytes = event.payload.len();
        let held = self.0.reserve(event.org, bytes, false);
        let next = if held {
            event.created_at.plus(self.0.lease)
        } else {
            event.created_at
        };
        Planned {
            next_attempt_at: Some(next),
            held,
            held_bytes: if held { bytes } else { 0 },
        }
    }

    fn publish(&self, committed: Vec<(NewEvent, Planned)>, not_written: Vec<(OrgId, Planned)>) {
        let mut left_due = false;
        for (event, planned) in committed {
            match (planned.held, planned.next_attempt_at) {
                (true, Some(held)) => {
                    let job = Job::committed(event, held);
                    tokio::spawn(run_job(Arc::clone(&self.0), job));
                }
                (false, Some(_)) => left_due = true,
                _ => {}
            }
        }
        for (org, planned) in not_written {
            if planned.held {
                self.0.release_slot(org, planned.held_bytes);
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
        self.0.forget_target(org);
    }
}
