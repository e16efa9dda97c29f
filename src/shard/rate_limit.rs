//! Token bucket per organization. The clock is passed in, so tests drive time by hand.
//!
//! The bucket holds the tier's per-minute limit, is full when first seen (an organization's
//! first request on this node), and refills continuously at limit/60 tokens a second.
//!
//! Across nodes the bucket is one: the organization's balance lives in PostgreSQL
//! (`rate_budgets`). Each node spends from its own view of it and reports what it spent since
//! its last report ([`TokenBucket::take_unreported`]); the answer is the cluster's balance after
//! every node's reports, which becomes this node's view less what it spent meanwhile
//! ([`TokenBucket::reported`]). The balance may go below zero (nodes spent at once what only one
//! could): then every node refuses until the refill has paid the debt, so over time the cluster
//! admits exactly the limit, and at any moment at most what the nodes have not yet reported more.

use crate::config::RATE_SLICES_PER_MINUTE;
use crate::flow::answer::RateSnapshot;

/// One organization's budget.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenBucket {
    tokens: f64,
    last_us: u64,
    limit: u32,
    /// Tokens spent here and not yet reported to the cluster.
    unreported: u32,
    /// Tokens in the report on its way to the cluster.
    reporting: u32,
    /// The cluster's balance has not come back yet since this bucket was made: report at once.
    fresh: bool,
}

impl TokenBucket {
    /// A full bucket for `limit` events per minute at time `now_us`.
    pub fn new(limit: u32, now_us: u64) -> Self {
        TokenBucket {
            tokens: f64::from(limit),
            last_us: now_us,
            limit,
            unreported: 0,
            reporting: 0,
            fresh: true,
        }
    }

    /// The limit the bucket holds, events per minute.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// The tokens of one slice: a tenth of a second's refill, at least one. A node reports as soon
    /// as it has spent a slice (and at the latest every `RATE_REPORT_EVERY`).
    pub fn slice(&self) -> u32 {
        (self.limit / RATE_SLICES_PER_MINUTE).max(1)
    }

    /// Whether this bucket's spend should be reported now rather than at the next periodic report:
    /// a slice is spent, or the cluster's balance was never heard.
    pub fn report_due(&self) -> bool {
        self.unreported > 0 && (self.fresh || self.unreported >= self.slice())
    }

    /// Tokens spent and not yet reported; they move to the report on its way.
    pub fn take_unreported(&mut self) -> u32 {
        let n = self.unreported;
        self.reporting += n;
        self.unreported = 0;
        n
    }

    /// The cluster's balance came back for the report on its way: it becomes this bucket's,
    /// less what was spent here since the report left. `None`: the report failed; its tokens
    /// go out with the next one.
    pub fn reported(&mut self, balance: Option<f64>, now_us: u64) {
        match balance {
            Some(balance) => {
                self.tokens = (balance - f64::from(self.unreported)).min(f64::from(self.limit));
                self.last_us = self.last_us.max(now_us);
                self.fresh = false;
            }
            None => self.unreported += self.reporting,
        }
        self.reporting = 0;
    }

    fn rate_per_us(&self) -> f64 {
        f64::from(self.limit) / 60_000_000.0
    }

    fn refill(&mut self, now_us: u64, limit: u32) {
        if limit != self.limit {
            // The tier changed: keep the tokens already spent, cap at the new capacity.
            let spent = f64::from(self.limit) - self.tokens;
            self.limit = limit;
            self.tokens = (f64::from(limit) - spent).max(0.0);
        }
        let elapsed = now_us.saturating_sub(self.last_us);
        self.last_us = self.last_us.max(now_us);
        self.tokens =
            (self.tokens + elapsed as f64 * self.rate_per_us()).min(f64::from(self.limit));
    }

    /// Take one token. `Err(seconds)` says how long until one is there.
    pub fn try_take(&mut self, now_us: u64, limit: u32) -> Result<RateSnapshot, u32> {
        self.try_take_n(now_us, limit, 1)
    }

    /// Take `n` tokens, or none. `Err(seconds)` says how long until `n` are there (at most a
    /// minute's refill when `n` is above the capacity: the answer then is the full bucket's wait).
    pub fn try_take_n(&mut self, now_us: u64, limit: u32, n: u32) -> Result<RateSnapshot, u32> {
        self.refill(now_us, limit);
        let want = f64::from(n.max(1));
        if self.tokens >= want {
            self.tokens -= want;
            self.unreported = self.unreported.saturating_add(n.max(1));
            Ok(self.snapshot_now())
        } else {
            let want = want.min(f64::from(self.limit));
            let wait_us = (want - self.tokens).max(0.0) / self.rate_per_us();
            Err(((wait_us / 1_000_000.0).ceil() as u32).max(1))
        }
    }

    /// Give back `n` tokens taken for a request that was then refused (queue full).
    pub fn refund_n(&mut self, n: u32) {
        self.tokens = (self.tokens + f64::from(n)).min(f64::from(self.limit));
        self.unreported = self.unreported.saturating_sub(n);
    }

    /// Give back a token taken for a request that was then refused (queue full).
    pub fn refund(&mut self) {
        self.refund_n(1);
    }

    /// The bucket as the rate-limit headers show it, without spending.
    pub fn snapshot(&mut self, now_us: u64, limit: u32) -> RateSnapshot {
        self.refill(now_us, limit);
        self.snapshot_now()
    }

    fn snapshot_now(&self) -> RateSnapshot {
        let missing = f64::from(self.limit) - self.tokens;
        let reset_s = if missing <= 0.0 {
            0
        } else {
            (missing / self.rate_per_us() / 1_000_000.0).ceil() as u32
        };
        RateSnapshot {
            limit: self.limit,
            remaining: self.tokens.floor() as u32,
            reset_s,
        }
    }

    /// Whether the bucket is full at `now_us` with nothing left to report (then forgetting it
    /// changes nothing).
    pub fn is_full(&self, now_us: u64) -> bool {
        let elapsed = now_us.saturating_sub(self.last_us);
        self.unreported == 0
            && self.reporting == 0
            && self.tokens + elapsed as f64 * self.rate_per_us() >= f64::from(self.limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000;

    #[test]
    fn full_bucket_allows_the_whole_minute_then_refuses() {
        let mut b = TokenBucket::new(100, 0);
        for i in 0..100 {
            let snap = b.try_take(0, 100).unwrap();
            assert_eq!(snap.remaining, 99 - i);
            assert_eq!(snap.limit, 100);
        }
        // Free tier refills 100/60 tokens a second: the next token is 0.6 s away.
        assert_eq!(b.try_take(0, 100), Err(1));
        assert_eq!(
            b.snapshot(0, 100),
            RateSnapshot {
                limit: 100,
                remaining: 0,
                reset_s: 60
            }
        );
    }

    #[test]
    fn refills_continuously_at_limit_per_minute() {
        let mut b = TokenBucket::new(60, 0);
        for _ in 0..60 {
            b.try_take(0, 60).unwrap();
        }
        assert!(b.try_take(S / 2, 60).is_err());
        assert_eq!(b.try_take(S, 60).unwrap().remaining, 0);
        assert_eq!(b.snapshot(11 * S, 60).remaining, 10);
        // Never above capacity.
        assert_eq!(b.snapshot(1000 * S, 60).remaining, 60);
        assert_eq!(b.snapshot(1000 * S, 60).reset_s, 0);
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let mut b = TokenBucket::new(1, 0);
        b.try_take(0, 1).unwrap();
        assert_eq!(b.try_take(0, 1), Err(60));
        assert_eq!(b.try_take(59 * S + 1, 1), Err(1));
        assert!(b.try_take(60 * S, 1).is_ok());
    }

    #[test]
    fn refund_gives_back_one_token() {
        let mut b = TokenBucket::new(2, 0);
        b.try_take(0, 2).unwrap();
        b.try_take(0, 2).unwrap();
        b.refund();
        assert_eq!(b.snapshot(0, 2).remaining, 1);
        b.refund();
        b.refund();
        assert_eq!(b.snapshot(0, 2).remaining, 2);
    }

    #[test]
    fn spend_is_reported_once_and_the_clusters_balance_replaces_the_view() {
        let mut b = TokenBucket::new(600, 0);
        assert_eq!(b.slice(), 1);
        assert!(!b.report_due(), "nothing spent, nothing to report");
        b.try_take_n(0, 600, 5).unwrap();
        assert!(b.report_due(), "a fresh bucket reports at once");
        assert_eq!(b.take_unreported(), 5);
        assert_eq!(b.take_unreported(), 0, "a token is reported once");
        // Spent while the report is out: kept off the balance that comes back.
        b.try_take_n(0, 600, 2).unwrap();
        // Other nodes spent 400 of the cluster's 600: 600 - 5 - 400 = 195 there.
        b.reported(Some(195.0), 0);
        assert_eq!(b.snapshot(0, 600).remaining, 193);
        assert_eq!(b.take_unreported(), 2);
        // A balance never goes above the limit.
        b.reported(Some(10_000.0), 0);
        assert_eq!(b.snapshot(0, 600).remaining, 600);
    }

    #[test]
    fn a_failed_report_goes_out_again_and_a_debt_is_waited_out() {
        let mut b = TokenBucket::new(60, 0);
        b.try_take_n(0, 60, 3).unwrap();
        assert_eq!(b.take_unreported(), 3);
        b.reported(None, 0);
        assert_eq!(
            b.take_unreported(),
            3,
            "the failed report's tokens go with the next"
        );
        // The cluster is 30 tokens in debt: refused, and told to wait for 31 tokens (31 s).
        b.reported(Some(-30.0), 0);
        assert_eq!(b.snapshot(0, 60).remaining, 0);
        assert_eq!(b.try_take(0, 60), Err(31));
        assert!(b.try_take(31 * S, 60).is_ok());
    }

    #[test]
    fn slices_are_a_tenth_of_a_seconds_refill_and_only_full_idle_buckets_are_forgotten() {
        assert_eq!(TokenBucket::new(100_000, 0).slice(), 166);
        assert_eq!(TokenBucket::new(100, 0).slice(), 1);
        let mut b = TokenBucket::new(100_000, 0);
        b.reported(Some(100_000.0), 0);
        b.try_take_n(0, 100_000, 165).unwrap();
        assert!(
            !b.report_due(),
            "below a slice: the periodic report takes it"
        );
        b.try_take(0, 100_000).unwrap();
        assert!(b.report_due());
        assert!(!b.is_full(3600 * S), "unreported spend keeps the bucket");
        b.take_unreported();
        assert!(!b.is_full(3600 * S), "so does a report on its way");
        b.reported(Some(0.0), 3600 * S);
        assert!(b.is_full(3700 * S));
    }

    #[test]
    fn a_clock_going_back_does_not_mint_tokens() {
        let mut b = TokenBucket::new(60, 10 * S);
        b.try_take(10 * S, 60).unwrap();
        // Reported, and the cluster agrees: only the clock decides fullness below.
        b.take_unreported();
        b.reported(Some(59.0), 10 * S);
        assert_eq!(b.snapshot(5 * S, 60).remaining, 59);
        assert!(!b.is_full(10 * S));
        assert!(b.is_full(12 * S));
    }
}
