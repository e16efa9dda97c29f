//! The store pool: tokio tasks on deadpool-postgres connections.
//!
//! - `writer`: group commit. Writers take turns at the write queue; each takes what is waiting (up
//!   to `batch_events_max`), writes it in one transaction (binary COPY for events without dedup id,
//!   one `INSERT … ON CONFLICT DO NOTHING` for those with one) and answers every event after COMMIT.
//! - `queries`: everything else a request waits for (keys, webhook config, inbox, ack, auth).
//! - `listen`: LISTEN/NOTIFY, so a key rotated or a webhook changed on another node reaches this
//!   node's caches within milliseconds.
//! - `copy`: the binary COPY row encoder. `migrate`: the SQL files of `migrations/`.
//!
//! Every queue is bounded; a full one, or a database known to be down, answers 503 at once.

pub mod copy;
mod listen;
pub mod migrate;
mod queries;
pub use queries::ORG_CHANGED_CHANNEL;
pub mod writer;

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::auth::verify::Verifier;
use crate::auth::{ApiKey, OrgInfo, Tier};
use crate::config::{AckMode, Config};
use crate::delivery::DeliveryHandle;
use crate::error::ApiError;
use crate::ids::{CoreId, OrgId};
use crate::reply::RateSnapshot;
use crate::shard::dedup::DedupKey;
use crate::shard::mesh::{Mesh, NewEvent, ReplyTo};

/// An event's delivery status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventStatus {
    /// Waiting for delivery or for the inbox.
    Pending = 0,
    /// Delivered to the webhook or acknowledged.
    Delivered = 1,
    /// Every delivery attempt failed (dead letter).
    Failed = 2,
}

impl EventStatus {
    /// Parse the API name.
    pub fn parse(s: &str) -> Option<EventStatus> {
        match s {
            "pending" => Some(EventStatus::Pending),
            "delivered" => Some(EventStatus::Delivered),
            "failed" => Some(EventStatus::Failed),
            _ => None,
        }
    }

    /// From the database's smallint.
    pub fn from_i16(v: i16) -> EventStatus {
        match v {
            1 => EventStatus::Delivered,
            2 => EventStatus::Failed,
            _ => EventStatus::Pending,
        }
    }

    /// The API name.
    pub fn as_str(self) -> &'static str {
        match self {
            EventStatus::Pending => "pending",
            EventStatus::Delivered => "delivered",
            EventStatus::Failed => "failed",
        }
    }
}

/// An authenticated request that the store answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Query {
    /// `GET /api/keys`.
    KeyInfo,
    /// `POST /api/keys/rotate`.
    Rotate,
    /// `POST /api/webhook/config`, URL already shape-checked.
    SetWebhook {
        /// The URL as given.
        url: String,
    },
    /// `DELETE /api/webhook/config`.
    DeleteWebhook,
    /// `GET /api/events/{id}`.
    GetEvent {
        /// The event.
        id: Uuid,
    },
    /// `POST /api/events/{id}/redeliver`.
    Redeliver {
        /// The event.
        id: Uuid,
    },
    /// `GET /api/inbox`.
    Inbox {
        /// Page size, 1..=1000.
        limit: u32,
        /// Which events.
        status: EventStatus,
        /// Only events with a smaller id (the previous page's last).
        before: Option<Uuid>,
    },
    /// `POST /api/ack/{id}`.
    Ack {
        /// The event.
        id: Uuid,
    },
    /// `POST /api/ack`, ids de-duplicated in request order.
    AckBatch {
        /// The events.
        ids: Vec<Uuid>,
    },
}

/// Work for the store pool other than event writes.
#[derive(Debug)]
pub enum StoreJob {
    /// Verify a key that is not in a core's cache.
    Auth {
        /// The key.
        key: ApiKey,
        /// The client's address, for the failure throttle.
        peer: IpAddr,
        /// Where the answer goes.
        reply: ReplyTo,
    },
    /// An authenticated query.
    Query {
        /// The caller's organization.
        org: OrgInfo,
        /// What it asks.
        query: Query,
        /// Rate-limit headers for the reply.
        rate: RateSnapshot,
        /// Where the answer goes.
        reply: ReplyTo,
    },
    /// `POST /api/keys/generate`.
    Generate {
        /// Organization name, 1..=255 characters.
        name: String,
        /// Its tier.
        tier: Tier,
        /// Where the answer goes.
        reply: ReplyTo,
    },
    /// `GET /health/ready`.
    Ready {
        /// Where the answer goes.
        reply: ReplyTo,
    },
}

/// One event to write.
#[derive(Debug)]
pub struct WriteJob {
    /// The event.
    pub event: NewEvent,
    /// Where the answer goes; `None` in fast-ack mode (already answered 202).
    pub reply: Option<ReplyTo>,
    /// Rate-limit headers for the reply.
    pub rate: Option<RateSnapshot>,
    /// The dedup key reserved on the owner core, to settle after the write.
    pub dedup: Option<(DedupKey, CoreId)>,
}

/// Whether the database answers: read by ingress cores (a load, no lock) to refuse writes at once
/// while it is down; set by the pool's health probe and by failed writes.
pub struct Health {
    up: AtomicBool,
    kick: Notify,
}

impl Health {
    fn new() -> Self {
        Health {
            up: AtomicBool::new(true),
            kick: Notify::new(),
        }
    }

    /// Whether the last contact with the database worked.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// A query failed for lack of a database: refuse writes until the probe succeeds.
    pub fn set_down(&self) {
        if self.up.swap(false, Ordering::Relaxed) {
            tracing::warn!("database unreachable; answering 503 until it returns");
        }
        self.kick.notify_one();
    }

    fn set_up(&self) {
        if !self.up.swap(true, Ordering::Relaxed) {
            tracing::info!("database reachable again");
        }
    }
}

/// What ingress cores hold of the store: the two bounded queues and the health flag.
#[derive(Clone)]
pub struct StoreHandle {
    writes: mpsc::Sender<WriteJob>,
    jobs: mpsc::Sender<StoreJob>,
    health: Arc<Health>,
    ack: AckMode,
}

impl StoreHandle {
    /// Queue an event; refused at once when the queue is full or the database is down.
    pub fn write(&self, job: WriteJob) -> Result<(), ApiError> {
        if !self.health.is_up() {
            return Err(ApiError::Unavailable);
        }
        self.writes.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => ApiError::Overloaded("write queue full"),
            mpsc::error::TrySendError::Closed(_) => ApiError::Unavailable,
        })
    }

    /// Queue other work; refused at once when the queue is full.
    pub fn submit(&self, job: StoreJob) -> Result<(), ApiError> {
        self.jobs.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => ApiError::Overloaded("query queue full"),
            mpsc::error::TrySendError::Closed(_) => ApiError::Unavailable,
        })
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

/// Shared state of the store pool's tasks.
pub(crate) struct StoreCtx {
    pub config: Arc<Config>,
    pub pool: Pool,
    pub writer_pool: Pool,
    pub mesh: Mesh,
    pub verifier: Verifier,
    pub health: Arc<Health>,
    pub delivery: DeliveryHandle,
    pub db_timeout: Duration,
}

impl StoreCtx {
    /// An organization's key or webhook changed (`None`: any may have): drop what this node
    /// caches about it, and wait until every ingress core has.
    pub async fn org_changed(&self, org: Option<OrgId>) {
        self.verifier.org_changed(org);
        self.delivery.org_changed(org);
        self.mesh.org_changed(org).await;
    }
}

/// The running store pool.
pub struct Store {
    handle: StoreHandle,
    writers: Vec<JoinHandle<()>>,
    jobs: JoinHandle<()>,
    background: Vec<JoinHandle<()>>,
}

/// The PostgreSQL connection settings from the config.
pub fn pg_config(config: &Config) -> Result<tokio_postgres::Config, String> {
    let mut pg: tokio_postgres::Config = config
        .database_url
        .parse()
        .map_err(|e| format!("--database-url: {e}"))?;
    pg.connect_timeout(Config::ms(config.db_connect_timeout_ms));
    pg.keepalives(true);
    pg.keepalives_idle(Duration::from_secs(30));
    if pg.get_application_name().is_none() {
        pg.application_name("triggers");
    }
    Ok(pg)
}

/// A connection pool of `size` with the configured timeouts.
pub(crate) fn build_pool(config: &Config, size: usize) -> Result<Pool, String> {
    build_pool_with(config, size, pg_config(config)?)
}

/// The delivery pool's connections: its writes (attempt outcomes, leases) commit without waiting
/// for the disk. A crash that loses the last milliseconds of them only means those events are
/// delivered again (at-least-once); events themselves are always written synchronously.
pub(crate) fn build_bookkeeping_pool(config: &Config, size: usize) -> Result<Pool, String> {
    let mut pg = pg_config(config)?;
    let options = match pg.get_options() {
        Some(o) => format!("{o} -c synchronous_commit=off"),
        None => "-c synchronous_commit=off".to_string(),
    };
    pg.options(options);
    build_pool_with(config, size, pg)
}

fn build_pool_with(
    config: &Config,
    size: usize,
    pg: tokio_postgres::Config,
) -> Result<Pool, String> {
    let manager = Manager::from_config(
        pg,
        tokio_postgres::NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let connect = Config::ms(config.db_connect_timeout_ms);
    Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(connect))
        .create_timeout(Some(connect))
        .recycle_timeout(Some(connect))
        .build()
        .map_err(|e| format!("database pool: {e}"))
}

/// Connect once, retrying for up to `patience` while the database starts.
pub async fn connect(
    config: &Config,
    patience: Duration,
) -> Result<tokio_postgres::Client, String> {
    let pg = pg_config(config)?;
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        match pg.connect(tokio_postgres::NoTls).await {
            Ok((client, conn)) => {
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection closed");
                    }
                });
                return Ok(client);
            }
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, "database not reachable yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(format!("cannot connect to the database: {e}")),
        }
    }
}

impl Store {
    /// Start the pool's tasks on the current tokio runtime.
    pub fn start(
        config: Arc<Config>,
        mesh: Mesh,
        delivery: DeliveryHandle,
    ) -> Result<Store, String> {
        let (write_tx, write_rx) = mpsc::channel(config.write_queue_events_max);
        let (job_tx, job_rx) = mpsc::channel(config.query_queue_max);
        let health = Arc::new(Health::new());
        let ctx = Arc::new(StoreCtx {
            pool: build_pool(&config, config.store_pool_size)?,
            writer_pool: build_pool(&config, config.store_writers)?,
            mesh,
            verifier: Verifier::new(
                config.argon2_concurrency,
                config.auth_failures_per_minute,
                config.auth_cache_entries,
            ),
            health: Arc::clone(&health),
            delivery,
            db_timeout: Config::ms(config.db_timeout_ms),
            config: Arc::clone(&config),
        });
        let write_rx = Arc::new(tokio::sync::Mutex::new(write_rx));
        let turns = Arc::new(writer::Turns::default());
        let writers = (0..config.store_writers)
            .map(|n| {
                let (rx, turns, ctx) =
                    (Arc::clone(&write_rx), Arc::clone(&turns), Arc::clone(&ctx));
                tokio::spawn(writer::run(n, rx, turns, ctx))
            })
            .collect();
        let jobs = tokio::spawn(queries::run(job_rx, Arc::clone(&ctx)));
        let background = vec![
            tokio::spawn(probe_health(Arc::clone(&ctx))),
            tokio::spawn(listen::run(Arc::clone(&ctx))),
        ];
        let handle = StoreHandle {
            writes: write_tx,
            jobs: job_tx,
            health,
            ack: config.ack,
        };
        Ok(Store {
            handle,
            writers,
            jobs,
            background,
        })
    }

    /// A handle for an ingress core.
    pub fn handle(&self) -> StoreHandle {
        self.handle.clone()
    }

    /// Once every other handle is gone: write what is queued, finish in-flight work, stop.
    pub async fn finish(self) {
        drop(self.handle);
        for w in self.writers {
            let _ = w.await;
        }
        let _ = self.jobs.await;
        for b in self.background {
            b.abort();
        }
    }
}

/// Check the database every second while it is up, every 200 ms while it is down, and at once
/// when a failed query says it may be down.
async fn probe_health(ctx: Arc<StoreCtx>) {
    loop {
        let wait = if ctx.health.is_up() {
            Duration::from_secs(1)
        } else {
            Duration::from_millis(200)
        };
        let _ = tokio::time::timeout(wait, ctx.health.kick.notified()).await;
        let check = async {
            let client = ctx.pool.get().await.map_err(|e| e.to_string())?;
            client
                .simple_query("SELECT 1")
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(())
        };
        let timeout = Config::ms(ctx.config.db_connect_timeout_ms);
        match tokio::time::timeout(timeout, check).await {
            Ok(Ok(())) => ctx.health.set_up(),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "health probe failed");
                if ctx.health.up.swap(false, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "database unreachable; answering 503 until it returns");
                }
            }
            Err(_) => {
                if ctx.health.up.swap(false, Ordering::Relaxed) {
                    tracing::warn!("database not answering; answering 503 until it returns");
                }
            }
        }
    }
}

/// Whether a database error means the database (or the connection to it) is gone, as opposed to
/// a problem with this statement's data.
pub(crate) fn is_connection_error(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        // Class 08: connection exception; 57P01-03: admin shutdown, crash shutdown, cannot connect now.
        Some(code) => {
            let c = code.code();
            c.starts_with("08") || c.starts_with("57P") || c == "53300"
        }
        None => true,
    }
}
