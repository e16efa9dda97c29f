//! What the store pool's tasks share, and the two helpers every query uses: a deadline, and the
//! mapping of a failure to the refusal a client gets.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Object, Pool, Transaction};

use crate::auth::flight::Flights;
use crate::auth::throttle::KeyOpsLimiter;
use crate::auth::verify::Verifier;
use crate::auth::OrgInfo;
use crate::config::{Config, WRITE_RUNS_MAX};
use crate::db::{connection_lost, fault, is_pool_busy, rerun, Fault, Rerun};
use crate::flow::answer::Refusal;
use crate::flow::sink::{ByteBudget, CoreLink, DeliverySink, Health};
use crate::hosts::Hosts;
use crate::ids::OrgId;
use crate::metrics::Metrics;

/// Shared state of the store pool's tasks.
pub struct StoreCtx {
    /// The configuration.
    pub config: Arc<Config>,
    /// Connections for reads and small writes.
    pub pool: Pool,
    /// The group-commit writers' own connections.
    pub writer_pool: Pool,
    /// The ingress cores: answers, dedup settlements, cache invalidation.
    pub cores: Arc<dyn CoreLink>,
    /// The delivery pool: plans before a write, committed batches after it.
    pub delivery: Arc<dyn DeliverySink>,
    /// Argon2, the failure throttle, the node's verified keys.
    pub verifier: Verifier,
    /// Key generations and rotations per address and per node.
    pub key_ops: KeyOpsLimiter,
    /// Key verifications in progress on this node.
    pub flights: Flights<Result<OrgInfo, Refusal>>,
    /// Webhook hosts' addresses (shared with the delivery client).
    pub hosts: Hosts,
    /// Whether the database takes writes.
    pub health: Arc<Health>,
    /// Payload bytes in the write queue and in the batches being written.
    pub write_bytes: Arc<ByteBudget>,
    /// The server's metrics.
    pub metrics: Arc<Metrics>,
    /// Longest a database round trip may take.
    pub db_timeout: Duration,
    /// Raised once the LISTEN connection first listens (start-up waits for it, so no request is
    /// served with caches a missed notification could have made stale).
    pub listening: tokio::sync::watch::Sender<bool>,
    /// Told when a write found no partition for its row: the retention loop makes the
    /// partitions then, not at its next hourly round.
    pub partitions_missing: Arc<tokio::sync::Notify>,
    /// When the shutdown gives up on writes the database does not take (fast-ack mode): the
    /// events still unwritten then are dropped and counted. Unset until shutdown.
    pub stop_deadline: std::sync::OnceLock<tokio::time::Instant>,
    /// Database connections of the store pool's jobs found gone (their reads run again).
    pub connections_lost: std::sync::atomic::AtomicU64,
}

/// Why a job failed.
pub enum Failure {
    /// A refusal to answer as it is.
    Refused(Refusal),
    /// A database error: 503 if the database is gone, 500 otherwise.
    Db(tokio_postgres::Error),
    /// The connection turned out to be gone at a transaction's BEGIN ([`begin`]): nothing was
    /// written, so [`StoreCtx::timed_reruns`] runs the transaction again on a new one.
    Unbegun(tokio_postgres::Error),
    /// No connection could be had: the database is unreachable.
    Pool(String),
    /// Every connection stayed busy for the wait timeout: the pool is overloaded.
    PoolBusy,
}

impl From<Refusal> for Failure {
    fn from(r: Refusal) -> Self {
        Failure::Refused(r)
    }
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Self {
        Failure::Db(e)
    }
}

impl From<deadpool_postgres::PoolError> for Failure {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        if is_pool_busy(&e) {
            Failure::PoolBusy
        } else {
            Failure::Pool(crate::db::describe_pool(&e))
        }
    }
}

/// A job's result before the deadline and the failure mapping.
pub type Done<T> = Result<T, Failure>;

impl StoreCtx {
    /// An organization's key or webhook changed (`None`: any may have): drop what this node
    /// caches about it, and wait until every ingress core has.
    pub async fn org_changed(&self, org: Option<OrgId>) {
        self.verifier.org_changed(org);
        self.delivery.org_changed(org);
        self.cores.org_changed(org).await;
    }

    /// Only an organization's endpoints changed: the delivery pool drops what it caches of
    /// them; its keys stay verified on every core.
    pub fn endpoints_changed(&self, org: OrgId) {
        self.delivery.org_changed(Some(org));
    }

    /// The refusal a failure becomes. The database's trouble is never the client's: it is a
    /// 503 (and lowers the health flag); a busy pool is `overloaded`, not "down"; a query of ours
    /// that the database refused for its data is a bug (500).
    pub fn fail(&self, what: &str, failure: Failure) -> Refusal {
        match failure {
            Failure::Refused(r) => r,
            Failure::Unbegun(e) => self.fail(what, Failure::Db(e)),
            // A deadlock's victim or a serialization failure, run as often as it may be: the
            // database is fine, so the health flag stays as it is.
            Failure::Db(e) if rerun(&e, true) == Some(Rerun::Asked) => {
                tracing::warn!(error = %crate::db::describe(&e), what, "transaction conflict");
                Refusal::Unavailable
            }
            Failure::Db(e) if fault(&e) == Fault::Server => {
                tracing::warn!(error = %crate::db::describe(&e), what, "database unavailable");
                if connection_lost(&e) {
                    // A connection that ended says little of the database (a pooler restarted,
                    // a reset): the probe, asked at once, lowers the flag if it is gone.
                    self.connection_lost();
                    self.health.probe_now();
                } else {
                    self.health.set_down();
                }
                Refusal::Unavailable
            }
            Failure::Db(e) => {
                tracing::error!(error = %crate::db::describe(&e), what, "query failed");
                Refusal::Internal
            }
            Failure::Pool(e) => {
                tracing::warn!(error = %e, what, "no database connection");
                self.health.set_down();
                Refusal::Unavailable
            }
            Failure::PoolBusy => {
                tracing::debug!(what, "every read connection busy");
                Refusal::Overloaded("database connections busy")
            }
        }
    }

    /// A connection of the store pool turned out to be gone. What ended it (a firewall's state
    /// flushed, a failover, a pooler's restart) most likely ended the idle ones beside it, which
    /// look alive until they are used: they are let go, so a read run again (`jobs`) and the
    /// next jobs get new ones instead of meeting one dead connection each.
    fn connection_lost(&self) {
        self.connections_lost.fetch_add(1, Ordering::Relaxed);
        self.pool.retain(|_, _| false);
    }

    /// Whether the shutdown deadline has passed.
    pub fn past_stop_deadline(&self) -> bool {
        self.stop_deadline
            .get()
            .is_some_and(|d| tokio::time::Instant::now() >= *d)
    }

    /// Run the transaction that `work` makes under the database deadline, again (up to
    /// `WRITE_RUNS_MAX` runs in all, within the same deadline) when PostgreSQL asks for it (a
    /// deadlock's victim or a serialization failure was rolled back whole) or its connection
    /// was found gone at BEGIN ([`begin`]: nothing was written).
    pub async fn timed_reruns<T, F, W>(&self, what: &str, mut work: F) -> Result<T, Refusal>
    where
        F: FnMut() -> W,
        W: std::future::Future<Output = Done<T>>,
    {
        let runs = async {
            let mut run = 1;
            loop {
                match work().await {
                    Err(f) if self.run_again(what, run, &f) => run += 1,
                    done => return done,
                }
            }
        };
        self.timed(what, runs).await
    }

    /// Whether the run `run` of [`StoreCtx::timed_reruns`], failed with `failure`, is run again.
    #[inline(never)]
    fn run_again(&self, what: &str, run: u32, failure: &Failure) -> bool {
        let e = match failure {
            Failure::Db(e) if rerun(e, true) == Some(Rerun::Asked) => e,
            Failure::Unbegun(e) => {
                self.connection_lost();
                e
            }
            _ => return false,
        };
        if run >= WRITE_RUNS_MAX {
            return false;
        }
        tracing::info!(error = %crate::db::describe(e), what, run, "run again");
        true
    }

    /// Run the read that `work` makes on the read pool under the database deadline, again on
    /// the pool's next connection while its connection turns out to be gone (up to once per
    /// connection the pool may hold): after a reset or a pooler's restart the database is fine,
    /// and a read changes nothing.
    pub async fn timed_read<T, F, W>(&self, what: &str, mut work: F) -> Result<T, Refusal>
    where
        F: FnMut() -> W,
        W: std::future::Future<Output = Done<T>>,
    {
        let runs = async {
            let mut left = self.pool.status().max_size;
            loop {
                match work().await {
                    Err(Failure::Db(e)) if left > 0 && connection_lost(&e) => {
                        self.connection_lost();
                        left -= 1;
                    }
                    done => return done,
                }
            }
        };
        self.timed(what, runs).await
    }

    /// Run `work` under the database deadline.
    pub async fn timed<T>(
        &self,
        what: &str,
        work: impl std::future::Future<Output = Done<T>>,
    ) -> Result<T, Refusal> {
        // The probe can't reach the database: waiting out the deadline would end in the same 503.
        if self.health.is_unreachable() {
            return Err(Refusal::Unavailable);
        }
        match tokio::time::timeout(self.db_timeout, work).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(f)) => Err(self.fail(what, f)),
            Err(_) => {
                tracing::warn!(what, "database deadline passed");
                Err(Refusal::Unavailable)
            }
        }
    }
}

/// BEGIN a transaction on `client`. A connection found gone here (ended under it by a reset, a
/// failover or a pooler's restart, while it sat in the pool looking alive) wrote nothing:
/// [`Failure::Unbegun`].
pub async fn begin(client: &mut Object) -> Done<Transaction<'_>> {
    client.transaction().await.map_err(|e| {
        if connection_lost(&e) {
            Failure::Unbegun(e)
        } else {
            Failure::Db(e)
        }
    })
}
