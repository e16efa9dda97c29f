//! A latency histogram with fixed buckets, updated from any thread without locks, and its
//! Prometheus text form.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Histogram bucket upper bounds, in microseconds.
pub const BUCKETS_US: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

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

/// Append `h` (summed) as a Prometheus histogram; `scale` turns microseconds into the unit shown.
pub fn render(out: &mut String, name: &str, labels: &str, h: &[&Histogram], scale: f64) {
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
        render(&mut out, "x", "a=\"b\"", &[&h], 1e6);
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.0001\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.001\"} 2\n"));
        assert!(out.contains("x_bucket{a=\"b\",le=\"10\"} 2\n"));
        assert!(out.contains("x_bucket{a=\"b\",le=\"+Inf\"} 3\n"));
        assert!(out.contains("x_count{a=\"b\"} 3\n"));
        assert!(out.contains("x_sum{a=\"b\"} 20.00095\n"));
    }
}
