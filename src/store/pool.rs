//! The running store pool: its tasks, how it starts, and how it finishes at shutdown.

use std::sync::Arc;

use tokio::task::JoinHandle;

use super::ctx::StoreCtx;
use super::{health, jobs, listen, writer};
use crate::auth::flight::Flights;
use crate::auth::throttle::{FailureThrottle, KeyOpsLimiter};
use crate::auth::verify::Verifier;
use crate::config::Config;
use crate::db::{build_pool, Part};
use crate::flow::sink::{CoreLink, DeliverySink, StoreInbox};
use crate::hosts::Hosts;
use crate::metrics::Metrics;

/// The running store pool.
pub struct Store {
    ctx: Arc<StoreCtx>,
    /// Answered when the group-commit thread's writers have drained the queue and stopped.
    writers: tokio::sync::oneshot::Receiver<()>,
    jobs: jobs::Door,
    background: Vec<JoinHandle<()>>,
}

impl Store {
    /// Start the pool's tasks on the current tokio runtime, reading `inbox` (the far ends of the
    /// queues the ingress cores hold), running what comes through `jobs` (the door they hold),
    /// answering through `cores`, publishing to `delivery`.
    pub fn start(
        config: Arc<Config>,
        inbox: StoreInbox,
        jobs: jobs::Door,
        cores: Arc<dyn CoreLink>,
        delivery: Arc<dyn DeliverySink>,
        metrics: Arc<Metrics>,
        hosts: Hosts,
    ) -> Result<Store, String> {
        let ctx = Arc::new(StoreCtx {
            pool: build_pool(&config, config.store_pool_size, Part::Api)?,
            writer_pool: build_pool(&config, config.store_writers, Part::Ingest)?,
            cores,
            delivery,
            verifier: Verifier::new(
                config.argon2_concurrency,
                config.argon2_hash_concurrency,
                FailureThrottle::new(
                    config.auth_failures_per_minute,
                    config.auth_throttle_entries,
                ),
                config.auth_cache_entries,
            ),
            key_ops: KeyOpsLimiter::new(
                config.key_ops_per_minute,
                config.key_ops_per_minute_node,
                config.auth_throttle_entries,
            ),
            flights: Flights::default(),
            hosts,
            health: inbox.health,
            write_bytes: inbox.write_bytes,
            metrics,
            db_timeout: Config::ms(config.db_timeout_ms),
            stop_deadline: std::sync::OnceLock::new(),
            connections_lost: Default::default(),
            partitions_missing: Arc::new(tokio::sync::Notify::new()),
            listening: tokio::sync::watch::channel(false).0,
            config: Arc::clone(&config),
        });
        let writers = spawn_writers(inbox.writes, Arc::clone(&ctx))?;
        jobs.open(Arc::clone(&ctx));
        let background = vec![
            tokio::spawn(health::probe(Arc::clone(&ctx))),
            tokio::spawn(health::watch_clock_steps(Arc::clone(&ctx))),
            tokio::spawn(listen::run(Arc::clone(&ctx))),
        ];
        Ok(Store {
            ctx,
            writers,
            jobs,
            background,
        })
    }

    /// What the writers tell when a row finds no partition (for [`super::retention::spawn`]).
    pub fn partitions_missing(&self) -> Arc<tokio::sync::Notify> {
        Arc::clone(&self.ctx.partitions_missing)
    }

    /// Wait (up to `limit`) until the LISTEN connection listens: changes made on other nodes reach
    /// this one from then on. Start-up waits for it before serving, so no cache is filled before
    /// this node can hear what makes it stale.
    pub async fn wait_listening(&self, limit: std::time::Duration) -> bool {
        let mut rx = self.ctx.listening.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|l| *l))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Have the health probe check at once, and wait (up to `limit`) until it has compared this
    /// node's clock with the database's: a node whose clock is too far off serves no change and
    /// claims nothing from its first request on.
    pub async fn wait_clock_read(&self, limit: std::time::Duration) -> bool {
        self.ctx.health.probe_now();
        self.ctx.health.wait_clock_read(limit).await
    }

    /// A reading of this node's clock less the database's taken elsewhere (start-up's, on the
    /// first retention round's connection), as the health probe's own are recorded.
    pub fn record_clock_offset(&self, offset_us: i64) {
        super::health::record_clock_offset(&self.ctx, offset_us)
    }

    /// Once every queue sender is gone (the cores have stopped): write what is queued, finish
    /// in-flight work, stop. Writes the database does not take by `deadline` (fast-ack mode,
    /// where they were answered 202) are dropped and counted; durable mode answered them 503.
    pub async fn finish(self, deadline: tokio::time::Instant) {
        let _ = self.ctx.stop_deadline.set(deadline);
        let _ = self.writers.await;
        self.jobs.idle().await;
        for b in self.background {
            b.abort();
        }
    }
}

/// The group commit's writers, on a thread of their own with a single-threaded runtime: at light
/// load a commit then wakes one thread per step (the hand-off, each round trip), where on the
/// shared multi-threaded pool each wake-up also woke its idle sibling to look for work (measured
/// at 2,500 events/s: 5.4 context switches per commit on the pool against 3.1 on one thread). The
/// writers' connections are opened, and driven, on this thread.
fn spawn_writers(
    writes: tokio::sync::mpsc::Receiver<crate::flow::job::WriteJob>,
    ctx: Arc<StoreCtx>,
) -> Result<tokio::sync::oneshot::Receiver<()>, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("group-commit runtime: {e}"))?;
    let (done, finished) = tokio::sync::oneshot::channel();
    let writers = ctx.config.store_writers;
    std::thread::Builder::new()
        .name("commit".into())
        .spawn(move || {
            runtime.block_on(async move {
                let rx = Arc::new(tokio::sync::Mutex::new(writes));
                let turns = Arc::new(writer::Turns::default());
                let tasks: Vec<JoinHandle<()>> = (0..writers)
                    .map(|n| {
                        let (rx, turns, ctx) =
                            (Arc::clone(&rx), Arc::clone(&turns), Arc::clone(&ctx));
                        tokio::spawn(writer::run(n, rx, turns, ctx))
                    })
                    .collect();
                for t in tasks {
                    let _ = t.await;
                }
            });
            let _ = done.send(());
        })
        .map_err(|e| format!("group-commit thread: {e}"))?;
    Ok(finished)
}
