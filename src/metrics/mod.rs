//! Metrics: counted where they happen, merged when scraped.
//!
//! Each ingress core owns a [`CoreMetrics`] (requests by route and status, latency by route): only
//! that core writes it, so its atomics are never contended. The pools count into [`Metrics`]
//! itself. [`Metrics::render`] merges everything into the Prometheus text format. One `Metrics`
//! per server, made by `server::run`; routes are indexes whose labels the server hands in, so this
//! module knows nothing of HTTP routing.
//!
//! - `histogram`: the fixed-bucket histogram.

pub mod histogram;
pub mod process;

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use histogram::Histogram;

/// Status codes counted individually; anything else counts as `other` (the 0 slot).
pub const STATUSES: [u16; 18] = [
    200, 201, 202, 400, 401, 404, 405, 408, 409, 413, 415, 422, 429, 431, 500, 503, 100, 0,
];
const STATUS_SLOTS: usize = STATUSES.len();

fn status_slot(status: u16) -> usize {
    STATUSES
        .iter()
        .position(|&s| s == status)
        .unwrap_or(STATUS_SLOTS - 1)
}

/// What the store's queues and health flag say at a scrape.
#[derive(Debug, Clone, Copy, Default)]
pub struct StoreGauges {
    /// The database takes writes (the health probe's verdict).
    pub database_up: bool,
    /// Events accepted and waiting for a group commit.
    pub write_queue_events: usize,
}

/// (method, path template) of each route index, for the labels.
pub type RouteLabels = &'static [(&'static str, &'static str)];

/// One ingress core's counters.
pub struct CoreMetrics {
    requests: Box<[[AtomicU64; STATUS_SLOTS]]>,
    latency: Box<[Histogram]>,
    events_ingested: AtomicU64,
    connections_open: AtomicI64,
    connections_total: AtomicU64,
    hops: AtomicU64,
    auth_misses: AtomicU64,
}

impl CoreMetrics {
    fn new(routes: usize) -> Self {
        CoreMetrics {
            requests: (0..routes)
                .map(|_| std::array::from_fn(|_| AtomicU64::new(0)))
                .collect(),
            latency: (0..routes).map(|_| Histogram::default()).collect(),
            events_ingested: AtomicU64::new(0),
            connections_open: AtomicI64::new(0),
            connections_total: AtomicU64::new(0),
            hops: AtomicU64::new(0),
            auth_misses: AtomicU64::new(0),
        }
    }

    /// Count one answered request on route index `route`.
    pub fn request(&self, route: usize, status: u16, elapsed_us: u64) {
        self.requests[route][status_slot(status)].fetch_add(1, Ordering::Relaxed);
        self.latency[route].observe_us(elapsed_us);
    }

    /// Events answered 201 or 202.
    pub fn events_ingested(&self, n: u64) {
        self.events_ingested.fetch_add(n, Ordering::Relaxed);
    }

    /// A connection opened (+1) or closed (-1).
    pub fn connection(&self, delta: i64) {
        self.connections_open.fetch_add(delta, Ordering::Relaxed);
        if delta > 0 {
            self.connections_total.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A request hopped to its organization's owner core.
    pub fn hop(&self) {
        self.hops.fetch_add(1, Ordering::Relaxed);
    }

    /// A key was not in this core's cache.
    pub fn auth_miss(&self) {
        self.auth_misses.fetch_add(1, Ordering::Relaxed);
    }
}

/// The server's metrics: the cores' counters, and the pools' own.
pub struct Metrics {
    routes: RouteLabels,
    cores: Vec<Arc<CoreMetrics>>,
    events_committed: AtomicU64,
    events_dropped: AtomicU64,
    write_batches: AtomicU64,
    /// Group commits whose COMMIT went unanswered (written again to learn their outcome).
    pub write_batches_in_doubt: AtomicU64,
    /// Of those, the ones whose outcome stayed unknown (answered 503, perhaps stored).
    pub write_batches_unresolved: AtomicU64,
    write_batch_events: Histogram,
    /// One group-commit transaction, from its first statement to COMMIT's answer.
    pub write_commit: Histogram,
    /// How long a batch's oldest event waited (from its request) before its transaction began.
    pub write_wait: Histogram,
    /// Deliveries by outcome.
    pub deliveries_ok: AtomicU64,
    /// Failed attempts that will be retried.
    pub deliveries_retry: AtomicU64,
    /// Events that used up every attempt.
    pub deliveries_dead: AtomicU64,
    /// Receivers that answered 410 Gone.
    pub deliveries_gone: AtomicU64,
    /// Attempt latency.
    pub attempt_latency: Histogram,
    /// Commit to 2xx.
    pub delivery_lag: Histogram,
    /// Deliveries held in memory.
    pub delivery_in_memory: AtomicI64,
    /// Due deliveries waiting in the database at the last poll.
    pub delivery_due_backlog: AtomicI64,
    /// Deliveries parked in the database (paused or disabled endpoint) at the last count.
    pub deliveries_parked: AtomicI64,
    /// Deliveries in memory waiting, by [`Waiting`] reason.
    pub deliveries_waiting: [AtomicI64; Waiting::ALL.len()],
    /// Waits begun by deliveries in memory, by [`Waiting`] reason.
    pub delivery_waits: [AtomicU64; Waiting::ALL.len()],
    /// Endpoints active, paused and disabled at the last count.
    pub endpoints_by_status: [AtomicI64; 3],
    /// Endpoints whose circuit this node holds open (or half-open) at the last count.
    pub circuits_open: AtomicI64,
    /// Endpoints this node disabled (410 Gone, or failing too long).
    pub endpoints_disabled: AtomicU64,
    /// Expired partitions this node dropped.
    pub partitions_dropped: AtomicU64,
    /// Failed partition-maintenance rounds on this node.
    pub retention_failures: AtomicU64,
    /// Database sessions a stopped node left mid-statement that this node ended
    /// (`store::stalled`).
    pub stalled_sessions_ended: AtomicU64,
    /// When this node last finished a partition-maintenance round (Unix seconds; 0: never).
    pub retention_ok_at: AtomicI64,
    /// How far the newest event stored is ahead of the earlier of this node's and the database's
    /// clocks, in µs (0: not ahead), as the last partition-maintenance round read it.
    pub newest_event_ahead_us: AtomicI64,
    /// This node's clock less the database's, in µs, as the health probe last measured it.
    pub clock_offset_us: AtomicI64,
    /// That offset carried forward: see [`Metrics::clock_offset_now_us`].
    clock_offset_base_us: AtomicI64,
    /// The store's state, read at each scrape (installed by the server).
    store: std::sync::OnceLock<Box<dyn Fn() -> StoreGauges + Send + Sync>>,
    /// Operational events this node stored.
    pub operational_events: AtomicU64,
    /// Queries that loaded organizations' endpoints into the delivery pool's cache.
    pub endpoint_loads: AtomicU64,
    /// Connections the delivery client opened to receivers.
    pub delivery_connections: AtomicU64,
    /// Lookups of webhook hosts started (for delivery connections, one serves many; for URLs
    /// being configured).
    pub host_lookups: AtomicU64,
    /// Of those, lookups that found no address or no answer.
    pub host_lookup_failures: AtomicU64,
    /// Connections made to a host's last addresses found because the resolver failed.
    pub host_stale: AtomicU64,
    /// Client connections the node takes, all cores together (the connections per core, as
    /// fitted to the open-files limit at start); more get 503.
    pub connections_max: AtomicU64,
    /// Deliveries this node's claimer took from the database (due retries, handed-back and
    /// overflowed deliveries, other nodes' expired leases are taken over apart).
    pub deliveries_claimed: AtomicU64,
    /// Store jobs (reads, acks, endpoint and key changes) answered 503 without being run because
    /// the queue was full and theirs was the tenant with the most waiting.
    pub store_jobs_refused_queue_full: AtomicU64,
    /// Store jobs answered 503 without being run because they waited for their turn too long.
    pub store_jobs_refused_waited_too_long: AtomicU64,
}

/// Why a delivery held in memory is waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiting {
    /// For its retry's due time.
    Scheduled,
    /// For its endpoint's circuit to let it through.
    CircuitOpen,
    /// For its endpoint's rate limit.
    RateLimited,
    /// For a free slot (its endpoint's concurrency, or the node's).
    Concurrency,
    /// For the server to try again: it could not send (its resolver failed, or it had no
    /// socket, port, memory or route).
    Unsent,
}

impl Waiting {
    /// Every reason, in index order.
    pub const ALL: [Waiting; 5] = [
        Waiting::Scheduled,
        Waiting::CircuitOpen,
        Waiting::RateLimited,
        Waiting::Concurrency,
        Waiting::Unsent,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Waiting::Scheduled => "retry_scheduled",
            Waiting::CircuitOpen => "circuit_open",
            Waiting::RateLimited => "rate_limited",
            Waiting::Concurrency => "concurrency",
            Waiting::Unsent => "unsent",
        }
    }
}

/// Counts one waiting delivery while it lives.
pub struct WaitingGuard<'a>(&'a AtomicI64);

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    /// Record this node's clock less the database's, as just measured (the health probe, or
    /// start-up's first reading); the measurement before.
    pub fn record_clock_offset(&self, offset_us: i64) -> i64 {
        self.clock_offset_base_us
            .store(offset_us - wall_less_monotonic_us(), Ordering::Relaxed);
        self.clock_offset_us.swap(offset_us, Ordering::Relaxed)
    }

    /// This node's clock less the database's now: the last measurement carried forward by how
    /// far this node's wall clock has moved from its monotonic clock since. A step of the wall
    /// clock (NTP, an operator, a VM resumed) shows here at once, not at the next probe; a
    /// change of the database's clock shows at the next probe.
    pub fn clock_offset_now_us(&self) -> i64 {
        self.clock_offset_base_us.load(Ordering::Relaxed) + wall_less_monotonic_us()
    }

    /// Metrics for `cores` ingress cores serving the routes labelled by `routes`.
    pub fn new(routes: RouteLabels, cores: usize) -> Arc<Metrics> {
        Arc::new(Metrics {
            routes,
            cores: (0..cores)
                .map(|_| Arc::new(CoreMetrics::new(routes.len())))
                .collect(),
            events_committed: AtomicU64::new(0),
            events_dropped: AtomicU64::new(0),
            write_batches_in_doubt: AtomicU64::new(0),
            write_batches_unresolved: AtomicU64::new(0),
            write_batches: AtomicU64::new(0),
            write_batch_events: Histogram::default(),
            write_commit: Histogram::default(),
            write_wait: Histogram::default(),
            deliveries_ok: AtomicU64::new(0),
            deliveries_retry: AtomicU64::new(0),
            deliveries_dead: AtomicU64::new(0),
            deliveries_gone: AtomicU64::new(0),
            attempt_latency: Histogram::default(),
            delivery_lag: Histogram::default(),
            delivery_in_memory: AtomicI64::new(0),
            delivery_due_backlog: AtomicI64::new(0),
            deliveries_parked: AtomicI64::new(0),
            deliveries_waiting: std::array::from_fn(|_| AtomicI64::new(0)),
            delivery_waits: std::array::from_fn(|_| AtomicU64::new(0)),
            endpoints_by_status: std::array::from_fn(|_| AtomicI64::new(0)),
            circuits_open: AtomicI64::new(0),
            endpoints_disabled: AtomicU64::new(0),
            partitions_dropped: AtomicU64::new(0),
            retention_failures: AtomicU64::new(0),
            stalled_sessions_ended: AtomicU64::new(0),
            retention_ok_at: AtomicI64::new(0),
            newest_event_ahead_us: AtomicI64::new(0),
            clock_offset_us: AtomicI64::new(0),
            clock_offset_base_us: AtomicI64::new(-wall_less_monotonic_us()),
            store: std::sync::OnceLock::new(),
            operational_events: AtomicU64::new(0),
            connections_max: AtomicU64::new(0),
            endpoint_loads: AtomicU64::new(0),
            delivery_connections: AtomicU64::new(0),
            host_lookups: AtomicU64::new(0),
            host_lookup_failures: AtomicU64::new(0),
            host_stale: AtomicU64::new(0),
            deliveries_claimed: AtomicU64::new(0),
            store_jobs_refused_queue_full: AtomicU64::new(0),
            store_jobs_refused_waited_too_long: AtomicU64::new(0),
        })
    }

    /// The counters of core `i`.
    pub fn core(&self, i: usize) -> Arc<CoreMetrics> {
        Arc::clone(&self.cores[i])
    }

    /// Count a delivery waiting for `why` until the guard drops.
    pub fn waiting(&self, why: Waiting) -> WaitingGuard<'_> {
        self.delivery_waits[why as usize].fetch_add(1, Ordering::Relaxed);
        let gauge = &self.deliveries_waiting[why as usize];
        gauge.fetch_add(1, Ordering::Relaxed);
        WaitingGuard(gauge)
    }

    /// A batch of `committed` events was written.
    pub fn events_committed(&self, committed: u64) {
        self.events_committed
            .fetch_add(committed, Ordering::Relaxed);
        self.write_batches.fetch_add(1, Ordering::Relaxed);
        // Batch sizes reuse the histogram type: one "microsecond" per event.
        self.write_batch_events.observe_us(committed);
    }

    /// How to read the store's gauges at a scrape (the first call wins).
    pub fn set_store_probe(&self, probe: Box<dyn Fn() -> StoreGauges + Send + Sync>) {
        let _ = self.store.set(probe);
    }

    /// Events answered 202 (fast-ack mode) that could not be written and were dropped.
    pub fn events_dropped(&self, n: u64) {
        self.events_dropped.fetch_add(n, Ordering::Relaxed);
    }

    /// The Prometheus text of every metric.
    pub fn render(&self) -> String {
        let cores = &self.cores;
        let mut out = String::with_capacity(16 * 1024);
        let sum = |f: &dyn Fn(&CoreMetrics) -> u64| cores.iter().map(|c| f(c)).sum::<u64>();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);

        single(
            &mut out,
            "triggers_events_ingested_total",
            "Events answered 201 (durable) or 202 (fast ack).",
            "counter",
            sum(&|c| load(&c.events_ingested)),
        );
        single(
            &mut out,
            "triggers_events_committed_total",
            "Events committed by the group-commit writers.",
            "counter",
            load(&self.events_committed),
        );
        single(
            &mut out,
            "triggers_events_dropped_total",
            "Events answered 202 (fast-ack mode) and then not written: 0 unless the database refused them for their data or stayed unwritable past the shutdown deadline.",
            "counter",
            load(&self.events_dropped),
        );
        single(
            &mut out,
            "triggers_log_lines_dropped_total",
            "Log lines dropped because the log's reader did not take them (the server never waits for it).",
            "counter",
            crate::logging::lines_dropped(),
        );
        single(
            &mut out,
            "triggers_write_batches_total",
            "Group-commit transactions.",
            "counter",
            load(&self.write_batches),
        );
        single(
            &mut out,
            "triggers_write_batches_in_doubt_total",
            "Group commits whose COMMIT got no answer (the connection ended): each written again to learn if it committed.",
            "counter",
            load(&self.write_batches_in_doubt),
        );
        single(
            &mut out,
            "triggers_write_batches_unresolved_total",
            "Of those, the ones whose outcome stayed unknown: their events were answered 503 and may be stored.",
            "counter",
            load(&self.write_batches_unresolved),
        );
        header(
            &mut out,
            "triggers_write_batch_events",
            "Events per group-commit transaction.",
            "histogram",
        );
        histogram::render(
            &mut out,
            "triggers_write_batch_events",
            "",
            &[&self.write_batch_events],
            1.0,
        );
        header(
            &mut out,
            "triggers_write_commit_duration_seconds",
            "One group-commit transaction, from its first statement to COMMIT's answer.",
            "histogram",
        );
        histogram::render(
            &mut out,
            "triggers_write_commit_duration_seconds",
            "",
            &[&self.write_commit],
            1e6,
        );
        header(
            &mut out,
            "triggers_write_wait_seconds",
            "How long each group-commit transaction's oldest event waited for it to begin.",
            "histogram",
        );
        histogram::render(
            &mut out,
            "triggers_write_wait_seconds",
            "",
            &[&self.write_wait],
            1e6,
        );

        header(
            &mut out,
            "triggers_http_requests_total",
            "HTTP responses by route and status.",
            "counter",
        );
        for (route, (method, path)) in self.routes.iter().enumerate() {
            for (slot, status) in STATUSES.iter().enumerate() {
                let n = sum(&|c| load(&c.requests[route][slot]));
                if n > 0 {
                    let status = if *status == 0 {
                        "other".to_string()
                    } else {
                        status.to_string()
                    };
                    let _ = writeln!(
                        out,
                        "triggers_http_requests_total{{method=\"{method}\",route=\"{path}\",status=\"{status}\"}} {n}"
                    );
                }
            }
        }
        header(
            &mut out,
            "triggers_http_request_duration_seconds",
            "Time from a complete request head to the response being written.",
            "histogram",
        );
        for (route, (method, path)) in self.routes.iter().enumerate() {
            let hs: Vec<&Histogram> = cores.iter().map(|c| &c.latency[route]).collect();
            let labels = format!("method=\"{method}\",route=\"{path}\"");
            histogram::render(
                &mut out,
                "triggers_http_request_duration_seconds",
                &labels,
                &hs,
                1e6,
            );
        }
        let open: i64 = cores
            .iter()
            .map(|c| c.connections_open.load(Ordering::Relaxed))
            .sum();
        single(
            &mut out,
            "triggers_connections_open",
            "Open client connections.",
            "gauge",
            open,
        );
        header(
            &mut out,
            "triggers_core_connections_open",
            "Open client connections per ingress core.",
            "gauge",
        );
        for (i, c) in cores.iter().enumerate() {
            let _ = writeln!(
                out,
                "triggers_core_connections_open{{core=\"{i}\"}} {}",
                c.connections_open.load(Ordering::Relaxed)
            );
        }
        single(
            &mut out,
            "triggers_connections_max",
            "Client connections the node takes, all cores together (fitted to the open-files limit at start); more get 503.",
            "gauge",
            self.connections_max.load(Ordering::Relaxed),
        );
        single(
            &mut out,
            "triggers_connections_total",
            "Accepted client connections.",
            "counter",
            sum(&|c| load(&c.connections_total)),
        );
        single(
            &mut out,
            "triggers_shard_hops_total",
            "Requests handed to their organization's owner core.",
            "counter",
            sum(&|c| load(&c.hops)),
        );
        single(
            &mut out,
            "triggers_auth_cache_misses_total",
            "Keys verified in the store pool.",
            "counter",
            sum(&|c| load(&c.auth_misses)),
        );

        header(
            &mut out,
            "triggers_deliveries_total",
            "Delivery attempts by outcome.",
            "counter",
        );
        for (outcome, v) in [
            ("delivered", &self.deliveries_ok),
            ("retry", &self.deliveries_retry),
            ("failed", &self.deliveries_dead),
            ("gone", &self.deliveries_gone),
        ] {
            let _ = writeln!(
                out,
                "triggers_deliveries_total{{outcome=\"{outcome}\"}} {}",
                load(v)
            );
        }
        header(
            &mut out,
            "triggers_delivery_attempt_duration_seconds",
            "Time of one webhook POST.",
            "histogram",
        );
        histogram::render(
            &mut out,
            "triggers_delivery_attempt_duration_seconds",
            "",
            &[&self.attempt_latency],
            1e6,
        );
        header(
            &mut out,
            "triggers_delivery_lag_seconds",
            "From an event's creation to its receiver's 2xx.",
            "histogram",
        );
        histogram::render(
            &mut out,
            "triggers_delivery_lag_seconds",
            "",
            &[&self.delivery_lag],
            1e6,
        );
        single(
            &mut out,
            "triggers_delivery_queue_depth",
            "Deliveries held in memory (queued, in flight or waiting to retry).",
            "gauge",
            self.delivery_in_memory.load(Ordering::Relaxed),
        );
        single(
            &mut out,
            "triggers_delivery_due_backlog",
            "Due deliveries found waiting in the database at the last claim.",
            "gauge",
            self.delivery_due_backlog.load(Ordering::Relaxed),
        );
        single(
            &mut out,
            "triggers_deliveries_parked",
            "Deliveries parked in the database (paused or disabled endpoint, acknowledged event) at the last count.",
            "gauge",
            self.deliveries_parked.load(Ordering::Relaxed),
        );
        by_reason(
            &mut out,
            "triggers_deliveries_waiting",
            "Deliveries held in memory that wait, by reason.",
            "gauge",
            |why| self.deliveries_waiting[why as usize].load(Ordering::Relaxed),
        );
        by_reason(
            &mut out,
            "triggers_delivery_waits_total",
            "Waits begun by deliveries held in memory, by reason.",
            "counter",
            |why| self.delivery_waits[why as usize].load(Ordering::Relaxed),
        );
        header(
            &mut out,
            "triggers_endpoints",
            "Endpoints by status, at the last count.",
            "gauge",
        );
        for (i, status) in ["active", "paused", "disabled"].iter().enumerate() {
            let _ = writeln!(
                out,
                "triggers_endpoints{{status=\"{status}\"}} {}",
                self.endpoints_by_status[i].load(Ordering::Relaxed)
            );
        }
        single(
            &mut out,
            "triggers_endpoint_circuits_open",
            "Endpoints whose circuit breaker is open or half-open on this node.",
            "gauge",
            self.circuits_open.load(Ordering::Relaxed),
        );
        single(
            &mut out,
            "triggers_endpoints_disabled_total",
            "Endpoints this node disabled (410 Gone, or every attempt failing too long).",
            "counter",
            load(&self.endpoints_disabled),
        );
        single(
            &mut out,
            "triggers_partitions_dropped_total",
            "Expired daily partitions (events, deliveries, attempts) this node dropped.",
            "counter",
            load(&self.partitions_dropped),
        );
        single(
            &mut out,
            "triggers_retention_failures_total",
            "Partition-maintenance rounds on this node that failed (retried every hour).",
            "counter",
            load(&self.retention_failures),
        );
        single(
            &mut out,
            "triggers_db_stalled_sessions_ended_total",
            "Database sessions of the server's that waited on their client mid-statement for \
             over 3 x --db-timeout-ms (a node stopped mid-COPY) and that this node ended.",
            "counter",
            load(&self.stalled_sessions_ended),
        );
        single(
            &mut out,
            "triggers_retention_last_success_timestamp_seconds",
            "When this node last finished a partition-maintenance round or saw another node \
             doing one (0: never).",
            "gauge",
            self.retention_ok_at.load(Ordering::Relaxed),
        );
        single(
            &mut out,
            "triggers_clock_offset_seconds",
            "This node's clock less the database's, as the health probe measured it (within half \
             its round trip). Leases are compared across nodes by their clocks: keep it well \
             under a second.",
            "gauge",
            self.clock_offset_us.load(Ordering::Relaxed) as f64 / 1e6,
        );
        single(
            &mut out,
            "triggers_newest_event_ahead_seconds",
            "How far the newest event stored is ahead of this node's and the database's clocks \
             (the earlier of them), as the last partition-maintenance round read it; 0 when it is \
             not. More than a few seconds: the clocks were set back (a board without a real-time \
             clock that started with an old time), and new events sort before older ones.",
            "gauge",
            self.newest_event_ahead_us.load(Ordering::Relaxed) as f64 / 1e6,
        );
        let store = self.store.get().map(|probe| probe()).unwrap_or_default();
        single(
            &mut out,
            "triggers_database_up",
            "1 while the database takes writes (the health probe's last verdict), else 0.",
            "gauge",
            i64::from(store.database_up),
        );
        single(
            &mut out,
            "triggers_write_queue_events",
            "Events accepted and waiting for a group commit.",
            "gauge",
            store.write_queue_events,
        );
        process::render(&mut out);
        single(
            &mut out,
            "triggers_operational_events_total",
            "Operational events (triggers.endpoint.disabled, triggers.delivery.failed) stored.",
            "counter",
            load(&self.operational_events),
        );
        single(
            &mut out,
            "triggers_endpoint_cache_loads_total",
            "Queries that loaded organizations' endpoints into the delivery cache (misses share one).",
            "counter",
            load(&self.endpoint_loads),
        );
        single(
            &mut out,
            "triggers_delivery_connections_opened_total",
            "Connections the delivery client opened to receivers (kept alive, one serves many deliveries).",
            "counter",
            load(&self.delivery_connections),
        );
        single(
            &mut out,
            "triggers_webhook_host_lookups_total",
            "Lookups of webhook hosts (for new delivery connections one serves a host for --delivery-dns-fresh-s; for URLs being configured one each; lookups of a host at once are one).",
            "counter",
            load(&self.host_lookups),
        );
        single(
            &mut out,
            "triggers_webhook_host_lookup_failures_total",
            "Lookups of webhook hosts that found no address or got no answer.",
            "counter",
            load(&self.host_lookup_failures),
        );
        single(
            &mut out,
            "triggers_webhook_host_stale_total",
            "Connections made to a host's last addresses found because the resolver failed (within --delivery-dns-stale-s).",
            "counter",
            load(&self.host_stale),
        );
        single(
            &mut out,
            "triggers_deliveries_claimed_total",
            "Deliveries this node claimed from the database (due retries, deliveries handed back or not held at ingest).",
            "counter",
            load(&self.deliveries_claimed),
        );
        let name = "triggers_store_jobs_refused_total";
        header(
            &mut out,
            name,
            "Reads, acks and endpoint or key changes answered 503 without being run: the queue was full and the tenant had the most waiting (queue_full), or the request waited for its turn longer than --db-timeout-ms (waited_too_long).",
            "counter",
        );
        for (reason, n) in [
            ("queue_full", &self.store_jobs_refused_queue_full),
            ("waited_too_long", &self.store_jobs_refused_waited_too_long),
        ] {
            let _ = writeln!(out, "{name}{{reason=\"{reason}\"}} {}", load(n));
        }
        out
    }
}

/// This node's wall clock less its monotonic clock (from an arbitrary start), in µs: constant
/// while the wall clock runs freely, moved by as much as any step of it.
fn wall_less_monotonic_us() -> i64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let monotonic = START.get_or_init(std::time::Instant::now).elapsed();
    crate::ids::Micros::now().0 - monotonic.as_micros() as i64
}

#[inline(never)]
fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// One metric with a value per [`Waiting`] reason (label `reason`).
fn by_reason<V: std::fmt::Display>(
    out: &mut String,
    name: &str,
    help: &str,
    kind: &str,
    value: impl Fn(Waiting) -> V,
) {
    header(out, name, help, kind);
    for why in Waiting::ALL {
        let _ = writeln!(out, "{name}{{reason=\"{}\"}} {}", why.label(), value(why));
    }
}

/// One metric with a single value: its HELP and TYPE lines, then the value.
fn single(out: &mut String, name: &str, help: &str, kind: &str, value: impl std::fmt::Display) {
    single_dyn(out, name, help, kind, &value);
}

/// [`single`], once in the binary rather than once per call (33 calls: 5.8 KB less).
#[inline(never)]
fn single_dyn(out: &mut String, name: &str, help: &str, kind: &str, value: &dyn std::fmt::Display) {
    header(out, name, help, kind);
    let _ = writeln!(out, "{name} {value}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_outside_the_list_count_as_other() {
        assert_eq!(STATUSES[status_slot(418)], 0);
        assert_eq!(STATUSES[status_slot(201)], 201);
    }

    #[test]
    fn requests_are_merged_across_cores_by_route_label() {
        static ROUTES: [(&str, &str); 2] = [("GET", "/a"), ("POST", "/b")];
        let m = Metrics::new(&ROUTES, 2);
        m.core(0).request(1, 201, 10);
        m.core(1).request(1, 201, 10);
        m.core(1).request(0, 418, 10);
        let text = m.render();
        assert!(text.contains(
            "triggers_http_requests_total{method=\"POST\",route=\"/b\",status=\"201\"} 2\n"
        ));
        assert!(text.contains(
            "triggers_http_requests_total{method=\"GET\",route=\"/a\",status=\"other\"} 1\n"
        ));
    }
}
