//! Token bucket per organization. The clock is passed in, so tests drive time by hand.
//!
//! The bucket holds the tier's per-minute limit, is full when first seen (an organization's
//! first request on this node), and refills continuously at limit/60 tokens a second.

use crate::flow::answer::RateSnapshot;

/// One organization's budget.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenBucket {
    tokens: f64,
    last_us: u64,
    limit: u32,
}

impl TokenBucket {
    /// A full bucket for `limit` events per minute at time `now_us`.
    pub fn new(limit: u32, now_us: u64) -> Self {
        TokenBucket {
            tokens: f64::from(limit),
            last_us: now_us,
            limit,
        }
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

    /// Whether the bucket is full at `now_us` (then forgetting it changes nothing).
    pub fn is_full(&self, now_us: u64) -> bool {
        let elapsed = now_us.saturating_sub(self.last_us);
        self.tokens + elapsed as f64 * self.rate_per_us() >= f64::from(self.limit)
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
    fn a_clock_going_back_does_not_mint_tokens() {
        let mut b = TokenBucket::new(60, 10 * S);
        b.try_take(10 * S, 60).unwrap();
        assert_eq!(b.snapshot(5 * S, 60).remaining, 59);
        assert!(!b.is_full(10 * S));
        assert!(b.is_full(12 * S));
    }
}
