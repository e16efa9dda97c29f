//! `triggers`: parse the configuration, then wire the pools and the ingress cores together.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use triggers::config::{Command, Config};
use triggers::delivery::Delivery;
use triggers::ids::CoreId;
use triggers::ingress::{self, CoreParts};
use triggers::metrics::{self, CoreMetrics};
use triggers::shard::mesh::Mesh;
use triggers::store::{self, Store};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How long start-up waits for the database to accept connections.
const DATABASE_PATIENCE: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    let (command, config) =
        match Config::from_args_and_env(std::env::args().skip(1), std::env::vars()) {
            Ok(parsed) => parsed,
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "triggers: {e}");
                return ExitCode::from(2);
            }
        };
    let result = match command {
        Command::Help => {
            let _ = std::io::stdout().write_all(Config::help().as_bytes());
            Ok(())
        }
        Command::Version => {
            let _ = writeln!(std::io::stdout(), "triggers {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::Migrate => {
            triggers::logging::init(config.log_format, &config.log).and_then(|()| migrate(&config))
        }
        Command::Serve => {
            triggers::logging::init(config.log_format, &config.log).and_then(|()| serve(config))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "triggers stopped");
            let _ = writeln!(std::io::stderr(), "triggers: {e}");
            ExitCode::FAILURE
        }
    }
}

fn runtime(config: &Config) -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.store_threads)
        .thread_name("pool")
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))
}

fn migrate(config: &Config) -> Result<(), String> {
    runtime(config)?.block_on(async {
        let mut client = store::connect(config, DATABASE_PATIENCE).await?;
        let applied = store::migrate::migrate(&mut client)
            .await
            .map_err(|e| format!("migration failed: {e}"))?;
        tracing::info!(applied = applied.len(), "migrations up to date");
        Ok(())
    })
}

fn serve(config: Config) -> Result<(), String> {
    let started = Instant::now();
    let config = Arc::new(config);
    let rt = runtime(&config)?;
    let _guard = rt.enter();
    // Catch the signals before anything can take a while, so an early SIGTERM still drains.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("signal handler: {e}"))?;
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| format!("signal handler: {e}"))?;

    migrate(&config)?;
    let listeners =
        ingress::bind(&config).map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let (mesh, mailboxes) = Mesh::new(config.ingress_cores, config.hop_queue_max);
    let core_metrics: Vec<Arc<CoreMetrics>> =
        (0..config.ingress_cores).map(|_| Arc::default()).collect();
    metrics::global().set_cores(core_metrics.clone());

    let (delivery, delivery_handle) = Delivery::start(Arc::clone(&config))?;
    let store = Store::start(Arc::clone(&config), mesh.clone(), delivery_handle)?;

    let mut metrics_listener = listeners.metrics;
    let parts = listeners
        .api
        .into_iter()
        .zip(mailboxes)
        .zip(core_metrics)
        .enumerate()
        .map(|(i, ((listener, mailbox), metrics))| CoreParts {
            core: CoreId(i),
            listener,
            metrics_listener: if i == 0 {
                metrics_listener.take()
            } else {
                None
            },
            mailbox,
            metrics,
        })
        .collect();
    let threads = ingress::start(Arc::clone(&config), mesh.clone(), store.handle(), parts)
        .map_err(|e| format!("ingress threads: {e}"))?;
    tracing::info!(
        listen = %listeners.api_addr,
        metrics = %listeners.metrics_addr.map(|a| a.to_string()).unwrap_or_else(|| "off".into()),
        cores = config.ingress_cores,
        ack = ?config.ack,
        io_driver = ?config.io_driver,
        startup_ms = started.elapsed().as_millis() as u64,
        "triggers ready"
    );

    let signal = rt.block_on(async {
        tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        }
    });
    let stopping = Instant::now();
    tracing::info!(
        signal,
        "shutting down: no new connections, finishing in-flight requests"
    );
    mesh.shutdown();
    for t in threads {
        let _ = t.join();
    }
    tracing::info!("ingress drained; writing what is queued");
    let grace = Duration::from_secs(
        config
            .shutdown_timeout_s
            .saturating_sub(stopping.elapsed().as_secs())
            .max(2),
    );
    if rt
        .block_on(tokio::time::timeout(grace, store.finish()))
        .is_err()
    {
        tracing::warn!("store did not finish within the shutdown deadline");
    }
    // Attempts in flight get a moment; whatever is still in memory goes back to the database.
    let left = Duration::from_secs(config.shutdown_timeout_s).saturating_sub(stopping.elapsed());
    rt.block_on(delivery.finish(left.min(Duration::from_secs(5))));
    tracing::info!(
        elapsed_ms = stopping.elapsed().as_millis() as u64,
        "stopped"
    );
    rt.shutdown_timeout(Duration::from_millis(500));
    Ok(())
}
