//! The whole server in-process: [`run`] starts the pools and the ingress cores on listeners bound
//! by the caller, wiring each later stage into the earlier ones as a sink, and returns a
//! [`Running`] server; [`Running::finish`] waits for the shutdown future and then stops in order:
//! no new connections, in-flight requests answered, every queued event written, pending deliveries
//! handed back. `main` runs it on the configured address with SIGTERM/SIGINT as the shutdown; tests
//! run it on port 0 with a channel.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use crate::config::{
    Config, DATABASE_PATIENCE, DELIVERY_GRACE_MAX, LISTEN_START_PATIENCE, RUNTIME_STOP_WAIT,
    SHUTDOWN_GRACE_MIN,
};
use crate::delivery::pool::Delivery;
use crate::flow::sink::{store_queues, CoreLink, DeliverySink};
use crate::hosts::Hosts;
use crate::ids::CoreId;
use crate::ingress::listen::{self, CoreParts, Listeners};
use crate::ingress::node::{BodyBudget, Liveness, Node};
use crate::ingress::router::Route;
use crate::metrics::Metrics;
use crate::shard::mesh::Mesh;
use crate::store::pool::Store;
use crate::store::{jobs, migrate, retention};

/// A running server: its runtime, cores and pools, until [`Running::finish`].
pub struct Running {
    config: Arc<Config>,
    rt: tokio::runtime::Runtime,
    mesh: Mesh,
    threads: Vec<std::thread::JoinHandle<()>>,
    store: Store,
    delivery: Delivery,
    stop: JoinHandle<()>,
    api_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    metrics: Arc<Metrics>,
    liveness: Arc<Liveness>,
}

/// Raise the open-files limit to its hard limit, so the per-core connection limits can be reached
/// (a soft limit of 1,024 would refuse connections long before 20,000 per core). Returns the limit
/// before and after.
pub fn raise_open_files_limit() -> std::io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit with a valid resource and a pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let before = limit.rlim_cur;
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok((before, limit.rlim_cur))
    }
}

/// The tokio runtime of the store and delivery pools.
pub fn runtime(config: &Config) -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.store_threads)
        .thread_name("pool")
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))
}

/// Apply pending migrations, waiting up to `DATABASE_PATIENCE` for the database to accept
/// connections.
pub async fn migrate(config: &Config) -> Result<Vec<i32>, String> {
    let mut client = crate::db::connect(config, crate::db::Part::Api, DATABASE_PATIENCE).await?;
    migrate::migrate(&mut client)
        .await
        .map_err(|e| format!("migration failed: {e}"))
}

/// Start everything on `listeners`; the server stops when `shutdown` resolves and
/// [`Running::finish`] is called. `shutdown` is polled from the start (signal handlers it installs
/// are in place before the database is reached).
pub fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Running, String> {
    let started = Instant::now();
    let config = Arc::new(config);
    let rt = runtime(&config)?;
    let stop = rt.spawn(shutdown);
    // The first retention round's connection is opened while the migrations run.
    let round_client = rt.spawn({
        let config = Arc::clone(&config);
        async move { retention::connect(&config).await }
    });
    let applied = rt.block_on(migrate(&config))?;
    tracing::info!(applied = applied.len(), "migrations up to date");

    let (mesh, mailboxes) = Mesh::new(config.ingress_cores, config.hop_queue_max);
    let metrics = Metrics::new(&Route::LABELS, config.ingress_cores);
    metrics.connections_max.store(
        (config.connections_per_core_max * config.ingress_cores) as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
    let jobs = jobs::Door::new(&config);
    let (queues, inbox) = store_queues(&config, Arc::new(jobs.clone()));
    metrics.set_store_probe(queues.gauges_probe());
    let _guard = rt.enter();
    // The partitions ahead exist before the first event is taken or the first delivery claimed
    // (a node down for a week would otherwise find none); a failure here is retried every hour
    // while the node serves. The round runs while the pools start and LISTEN is set up (a
    // quicker start); the ingress cores start, and the delivery claimer begins, after it.
    let (partitions_tx, partitions) = tokio::sync::watch::channel(false);
    let first_round = tokio::spawn({
        let (config, metrics) = (Arc::clone(&config), Arc::clone(&metrics));
        async move {
            let client = round_client.await.ok().and_then(Result::ok);
            // Its reading of the clocks is start-up's first.
            retention::round_on(client, &config, &metrics).await
        }
    });
    // Webhook hosts' addresses: the store's checks of configured URLs and the delivery client's
    // connections share them.
    let hosts = Hosts::new(
        Duration::from_secs(config.delivery_dns_fresh_s),
        Duration::from_secs(config.delivery_dns_stale_s),
        Arc::clone(&metrics),
    );
    let (delivery, delivery_handle) = Delivery::start(
        Arc::clone(&config),
        Arc::clone(&metrics),
        hosts.clone(),
        partitions,
    )?;
    let cores: Arc<dyn CoreLink> = Arc::new(mesh.clone());
    let sink: Arc<dyn DeliverySink> = Arc::new(delivery_handle);
    let store = Store::start(
        Arc::clone(&config),
        inbox,
        jobs,
        cores,
        sink,
        Arc::clone(&metrics),
        hosts,
    )?;
    retention::spawn(
        Arc::clone(&config),
        Arc::clone(&metrics),
        store.partitions_missing(),
    );
    let (listening, clocks) = rt
        .block_on(async { tokio::join!(store.wait_listening(LISTEN_START_PATIENCE), first_round) });
    // A first reading of the clocks (the round's, else the health probe's) before the first
    // request or claim: a node whose clock is too far off the database's takes no change and
    // claims nothing from the start.
    match clocks.ok().flatten() {
        Some(clocks) => store.record_clock_offset(clocks.offset_us()),
        None => {
            rt.block_on(store.wait_clock_read(Config::ms(config.db_connect_timeout_ms)));
        }
    }
    let _ = partitions_tx.send(true);
    if !listening {
        tracing::warn!("serving before LISTEN works: caches are flushed until it does");
    }

    let Listeners {
        api,
        api_addr,
        metrics: metrics_listener,
        metrics_addr,
    } = listeners;
    let mut metrics_listener = metrics_listener;
    let parts = api
        .into_iter()
        .zip(mailboxes)
        .enumerate()
        .map(|(i, (listener, mailbox))| CoreParts {
            core: CoreId(i),
            listener,
            metrics_listener: if i == 0 {
                metrics_listener.take()
            } else {
                None
            },
            mailbox,
        })
        .collect();
    let liveness = Liveness::new(config.ingress_cores);
    let node = Node {
        bodies: BodyBudget::new(config.inflight_body_bytes_max),
        liveness: Arc::clone(&liveness),
    };
    let threads = listen::start(
        Arc::clone(&config),
        mesh.clone(),
        queues,
        Arc::clone(&metrics),
        node,
        parts,
    )
    .map_err(|e| format!("ingress threads: {e}"))?;
    // Ready means live: a core whose thread has not been scheduled yet is not dead.
    debug_assert_eq!(liveness.dead(), Vec::<usize>::new(), "dead cores at start");
    drop(_guard);
    tracing::info!(
        listen = %api_addr,
        metrics = %metrics_addr.map(|a| a.to_string()).unwrap_or_else(|| "off".into()),
        cores = config.ingress_cores,
        ack = ?config.ack,
        io_driver = ?config.io_driver,
        startup_ms = started.elapsed().as_millis() as u64,
        "triggers ready"
    );
    Ok(Running {
        config,
        rt,
        mesh,
        threads,
        store,
        delivery,
        stop,
        api_addr,
        metrics_addr,
        metrics,
        liveness,
    })
}

impl Running {
    /// Where the API listens.
    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    /// Where `/metrics` listens, if it has its own port.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The server's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Hooks for tests (debug builds only).
    #[cfg(debug_assertions)]
    #[doc(hidden)]
    pub fn test_hooks(&self) -> TestHooks {
        TestHooks {
            mesh: self.mesh.clone(),
        }
    }

    /// Wait for the shutdown future, then stop: no new connections, in-flight requests finished
    /// (answered with `Connection: close`), every queued event written, attempts in flight given
    /// a moment, and pending deliveries handed back to the database.
    pub fn finish(self) {
        let Running {
            config,
            rt,
            mesh,
            threads,
            store,
            delivery,
            stop,
            liveness,
            ..
        } = self;
        let _ = rt.block_on(stop);
        let stopping = Instant::now();
        tracing::info!("shutting down: no new connections, finishing in-flight requests");
        liveness.stopping();
        mesh.shutdown();
        for t in threads {
            let _ = t.join();
        }
        tracing::info!("ingress drained; writing what is queued");
        let total = Duration::from_secs(config.shutdown_timeout_s);
        let grace = total
            .saturating_sub(stopping.elapsed())
            .max(SHUTDOWN_GRACE_MIN);
        let finished = rt.block_on(async {
            let deadline = tokio::time::Instant::now() + grace;
            // The store gives up on unwritable events at the deadline; a moment later this stops
            // waiting for it in any case.
            tokio::time::timeout(grace + SHUTDOWN_GRACE_MIN, store.finish(deadline)).await
        });
        if finished.is_err() {
            tracing::warn!("store did not finish within the shutdown deadline");
        }
        // Attempts in flight get a moment; whatever is still in memory goes back to the database.
        let left = total.saturating_sub(stopping.elapsed());
        rt.block_on(delivery.finish(left.min(DELIVERY_GRACE_MAX)));
        tracing::info!(
            elapsed_ms = stopping.elapsed().as_millis() as u64,
            "stopped"
        );
        rt.shutdown_timeout(RUNTIME_STOP_WAIT);
    }
}

/// What tests may do to a running server (debug builds only).
#[cfg(debug_assertions)]
#[doc(hidden)]
#[derive(Clone)]
pub struct TestHooks {
    mesh: Mesh,
}

#[cfg(debug_assertions)]
impl TestHooks {
    /// Make ingress core `core` panic, as a bug would.
    pub fn crash_core(&self, core: usize) {
        self.mesh.crash_for_tests(CoreId(core));
    }
}
