//! Metrics: counted where they happen, merged when scraped.
//!
//! Each ingress core owns a [`CoreMetrics`] (requests by route and status, latency by route): only
//! that core writes it, so its atomics are never contended. The pools count into [`Global`].
//! [`render`] merges everything into the Prometheus text format.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use crate::ingress::router::Route;

/// Status codes counted individually; anything else counts as `other`.
pub const STATUSES: [u16; 18] = [
    200, 201, 202, 400, 401, 404, 405, 408, 409, 413, 415, 422, 429, 431, 500, 503, 100, 0,
];
const STATUS_SLOTS: usize = STATUSES.len();

/// Histogram bucket upper bounds, in microseconds.
pub const BUCKETS_US: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

fn status_slot(status: u16) -> usize {
    STATUSES
        .iter()
        .position(|&s| s == status)
        .unwrap_or(STATUS_SLOTS - 1)
}

/// A latency histogram with fixed buckets; safe to update from any thread.
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_us: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    /// Record one observation.
    pub fn observe_us(&self, us: u64) {
        let i = BUCKETS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(BUCKETS_US.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    fn add_into(&self, counts: &mut [u64; BUCKETS_US.len() + 1], sum: &mut u64) {
        for (c, b) in counts.iter_mut().zip(&self.buckets) {
            *c += b.load(Ordering::Relaxed);
        }
        *sum += self.sum_us.load(Ordering::Relaxed);
    }
}

/// One ingress core's counters.
pub struct CoreMetrics {
    requests: [[AtomicU64; STATUS_SLOTS]; Route::COUNT],
    latency: [Histogram; Route::COUNT],
    events_ingested: AtomicU64,
    connections_open: AtomicI64,
    connections_total: AtomicU64,
    hops: AtomicU64,
    auth_misses: AtomicU64,
}

impl Default for CoreMetrics {
    fn default() -> Self {
        CoreMetrics {
            requests: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            latency: std::array::from_fn(|_| Histogram::default()),
            events_ingested: AtomicU64::new(0),
            connections_open: AtomicI64::new(0),
            connections_total: AtomicU64::new(0),
            hops: AtomicU64::new(0),
            auth_misses: AtomicU64::new(0),
        }
    }
}

impl CoreMetrics {
    /// Count one answered request.
    pub fn request(&self, route: Route, status: u16, elapsed_us: u64) {
        self.requests[route as usize][status_slot(status)].fetch_add(1, Ordering::Relaxed);
        self.latency[route as usize].observe_us(elapsed_us);
        if matches!(status, 201 | 202) && route == Route::EventsCreate {
            self.events_ingested.fetch_add(1, Ordering::Relaxed);
        }
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

/// Counters of the store and delivery pools.
#[derive(Default)]
pub struct Global {
    cores: OnceLock<Vec<Arc<CoreMetrics>>>,
    events_committed: AtomicU64,
    write_batches: AtomicU64,
    write_batch_events: Histogram,
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
}

static GLOBAL: OnceLock<Global> = OnceLock::new();

/// The process-wide metrics.
pub fn global() -> &'static Global {
    GLOBAL.get_or_init(Global::default)
}

impl Global {
    /// Register the ingress cores' metrics (once, at start).
    pub fn set_cores(&self, cores: Vec<Arc<CoreMetrics>>) {
        let _ = self.cores.set(cores);
    }

    /// A batch of `committed` events was written.
    pub fn events_committed(&self, committed: u64) {
        self.events_committed
            .fetch_add(committed, Ordering::Relaxed);
        self.write_batches.fetch_add(1, Ordering::Relaxed);
        // Batch sizes reuse the histogram type: one "microsecond" per event.
        self.write_batch_events.observe_us(committed);
    }
}

fn counter(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn histogram(out: &mut String, name: &str, labels: &str, h: &[&Histogram], scale: f64) {
    let mut counts = [0u64; BUCKETS_US.len() + 1];
    let mut sum = 0u64;
    for x in h {
        x.add_into(&mut counts, &mut sum);
    }
    let sep = if labels.is_empty() { "" } else { "," };
    let mut cumulative = 0;
    for (i, bound) in BUCKETS_US.iter().enumerate() {
        cumulative += counts[i];
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"{}\"}} {cumulative}",
            *bound as f64 / scale
        );
    }
    cumulative += counts[BUCKETS_US.len()];
    let _ = writeln!(
        out,
        "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}"
    );
    let braces = if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    };
    let _ = writeln!(out, "{name}_sum{braces} {}", sum as f64 / scale);
    let _ = writeln!(out, "{name}_count{braces} {cumulative}");
}

/// One metric with a single value: its HELP and TYPE lines, then the value.
fn single(out: &mut String, name: &str, help: &str, kind: &str, value: impl std::fmt::Display) {
    counter(out, name, help, kind);
    let _ = writeln!(out, "{name} {value}");
}

/// The Prometheus text of every metric.
pub fn render() -> String {
    let g = global();
    let empty = Vec::new();
    let cores = g.cores.get().unwrap_or(&empty);
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
        load(&g.events_committed),
    );
    single(
        &mut out,
        "triggers_write_batches_total",
        "Group-commit transactions.",
        "counter",
        load(&g.write_batches),
    );
    counter(
        &mut out,
        "triggers_write_batch_events",
        "Events per group-commit transaction.",
        "histogram",
    );
    histogram(
        &mut out,
        "triggers_write_batch_events",
        "",
        &[&g.write_batch_events],
        1.0,
    );

    counter(
        &mut out,
        "triggers_http_requests_total",
        "HTTP responses by route and status.",
        "counter",
    );
    for route in Route::ALL {
        let (method, path) = route.labels();
        for (slot, status) in STATUSES.iter().enumerate() {
            let n = sum(&|c| load(&c.requests[route as usize][slot]));
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
    counter(
        &mut out,
        "triggers_http_request_duration_seconds",
        "Time from a complete request head to the response being written.",
        "histogram",
    );
    for route in Route::ALL {
        let hs: Vec<&Histogram> = cores.iter().map(|c| &c.latency[route as usize]).collect();
        let (method, path) = route.labels();
        let labels = format!("method=\"{method}\",route=\"{path}\"");
        histogram(
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

    counter(
        &mut out,
        "triggers_deliveries_total",
        "Delivery attempts by outcome.",
        "counter",
    );
    for (outcome, v) in [
        ("delivered", &g.deliveries_ok),
        ("retry", &g.deliveries_retry),
        ("failed", &g.deliveries_dead),
        ("gone", &g.deliveries_gone),
    ] {
        let _ = writeln!(
            out,
            "triggers_deliveries_total{{outcome=\"{outcome}\"}} {}",
            load(v)
        );
    }
    counter(
        &mut out,
        "triggers_delivery_attempt_duration_seconds",
        "Time of one webhook POST.",
        "histogram",
    );
    histogram(
        &mut out,
        "triggers_delivery_attempt_duration_seconds",
        "",
        &[&g.attempt_latency],
        1e6,
    );
    counter(
        &mut out,
        "triggers_delivery_lag_seconds",
        "From an event's creation to its receiver's 2xx.",
        "histogram",
    );
    histogram(
        &mut out,
        "triggers_delivery_lag_seconds",
        "",
        &[&g.delivery_lag],
        1e6,
    );
    single(
        &mut out,
        "triggers_delivery_queue_depth",
        "Deliveries held in memory (queued, in flight or waiting to retry).",
        "gauge",
        g.delivery_in_memory.load(Ordering::Relaxed),
    );
    single(
        &mut out,
        "triggers_delivery_due_backlog",
        "Due deliveries found waiting in the database at the last claim.",
        "gauge",
        g.delivery_due_backlog.load(Ordering::Relaxed),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe_us(50);
        h.observe_us(900);
        h.observe_us(20_000_000);
        let mut out = String::new();
        histogram(&mut out, "x", "a=\"b\"", &[&h], 1e6);
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.0001\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.001\"} 2\n"));
        assert!(out.contains("x_bucket{a=\"b\",le=\"10\"} 2\n"));
        assert!(out.contains("x_bucket{a=\"b\",le=\"+Inf\"} 3\n"));
        assert!(out.contains("x_count{a=\"b\"} 3\n"));
        assert!(out.contains("x_sum{a=\"b\"} 20.00095\n"));
    }

    #[test]
    fn statuses_outside_the_list_count_as_other() {
        assert_eq!(STATUSES[status_slot(418)], 0);
        assert_eq!(STATUSES[status_slot(201)], 201);
    }
}
