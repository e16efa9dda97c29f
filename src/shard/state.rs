//! What one core owns of its organizations: their token buckets and the recent-dedup window. Plain
//! structs touched only by that core: no locks.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::time::Instant;

use super::dedup::{DedupWindow, Seen};
use super::rate_limit::TokenBucket;
use crate::auth::OrgInfo;
use crate::config::BUCKET_SWEEP_EVERY_US;
use crate::flow::answer::RateSnapshot;
use crate::flow::event::DedupKey;
use crate::flow::job::RateSpend;
use crate::ids::{CoreId, EventId, OrgId};

/// The owner's decision on one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Spent a token; the event goes to the store. `dedup_key` is set when it has a dedup id.
    Go {
        /// The bucket after spending.
        rate: RateSnapshot,
        /// The key reserved in the dedup window.
        dedup_key: Option<DedupKey>,
    },
    /// Out of tokens: 429.
    Limited {
        /// The bucket as it is.
        rate: RateSnapshot,
        /// Seconds until one token is there.
        retry_after_s: u32,
    },
    /// The dedup id is known committed: 409 with the first event.
    Duplicate {
        /// The bucket after spending.
        rate: RateSnapshot,
        /// The first event with this dedup id.
        event_id: EventId,
    },
}

/// One core's share of the organizations.
pub struct Shard {
    core: CoreId,
    buckets: HashMap<OrgId, TokenBucket, ahash::RandomState>,
    /// Some bucket spent since the last report.
    spent: bool,
    /// Some bucket's spend is due now (a slice spent, or a bucket new here).
    report_due: bool,
    /// A report is on its way; the next waits for its answer.
    reporting: bool,
    dedup: DedupWindow,
    hash_a: ahash::RandomState,
    hash_b: ahash::RandomState,
    epoch: Instant,
    last_sweep_us: u64,
}

impl Shard {
    /// The shard of `core`, remembering up to `dedup_entries` dedup ids.
    pub fn new(core: CoreId, dedup_entries: usize) -> Self {
        Shard {
            core,
            buckets: HashMap::with_hasher(ahash::RandomState::new()),
            spent: false,
            report_due: false,
            reporting: false,
            dedup: DedupWindow::new(dedup_entries),
            hash_a: ahash::RandomState::new(),
            hash_b: ahash::RandomState::new(),
            epoch: Instant::now(),
            last_sweep_us: 0,
        }
    }

    /// Microseconds on this shard's monotonic clock.
    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    fn bucket(&mut self, org: &OrgInfo, now_us: u64) -> &mut TokenBucket {
        if now_us.saturating_sub(self.last_sweep_us) > BUCKET_SWEEP_EVERY_US {
            self.last_sweep_us = now_us;
            self.buckets.retain(|_, b| !b.is_full(now_us));
        }
        self.buckets
            .entry(org.id)
            .or_insert_with(|| TokenBucket::new(org.limit, now_us))
    }

    fn dedup_key(&self, org: &OrgId, dedup_id: &str) -> DedupKey {
        let hash = |state: &ahash::RandomState| {
            let mut h = state.build_hasher();
            h.write(org.as_bytes());
            h.write(dedup_id.as_bytes());
            h.finish()
        };
        (u128::from(hash(&self.hash_a)) << 64) | u128::from(hash(&self.hash_b))
    }

    /// Decide on one event of `org`: spend a token, then check the dedup window.
    pub fn admit(&mut self, org: &OrgInfo, dedup_id: Option<&str>) -> Admit {
        let rate = match self.take(org, 1) {
            Ok(rate) => rate,
            Err((rate, retry_after_s)) => {
                return Admit::Limited {
                    rate,
                    retry_after_s,
                }
            }
        };
        let dedup_key = dedup_id.map(|d| self.dedup_key(&org.id, d));
        if let Some(key) = dedup_key {
            if let Seen::Committed(event_id) = self.dedup.check_and_reserve(key) {
                return Admit::Duplicate { rate, event_id };
            }
        }
        Admit::Go { rate, dedup_key }
    }

    /// Spend `n` tokens of `org` (one event, or one batch request), or none: `Err` is the 429's
    /// bucket and seconds to wait.
    pub fn take(&mut self, org: &OrgInfo, n: u32) -> Result<RateSnapshot, (RateSnapshot, u32)> {
        let now = self.now_us();
        let bucket = self.bucket(org, now);
        let taken = bucket
            .try_take_n(now, org.limit, n)
            .map_err(|retry| (bucket.snapshot(now, org.limit), retry));
        let due = bucket.report_due();
        if taken.is_ok() {
            self.spent = true;
            self.report_due |= due;
        }
        taken
    }

    /// Whether a bucket's spend is due at once and no report is on its way.
    pub fn report_urgent(&self) -> bool {
        self.report_due && !self.reporting
    }

    /// What this shard's organizations spent since the last report, to report now; `None` when
    /// nothing was spent or a report is on its way (unless `last`: the core is stopping, and
    /// whatever is unreported goes). Called from the core's tick, and at once when
    /// [`Shard::report_urgent`].
    pub fn take_rate_report(&mut self, last: bool) -> Option<Vec<RateSpend>> {
        if !last && (self.reporting || !self.spent) {
            return None;
        }
        let spent: Vec<RateSpend> = self
            .buckets
            .iter_mut()
            .filter_map(|(org, b)| {
                let (limit, spent) = (b.limit(), b.take_unreported());
                (spent > 0).then_some(RateSpend {
                    org: *org,
                    limit,
                    spent,
                })
            })
            .collect();
        self.spent = false;
        self.report_due = false;
        self.reporting = !spent.is_empty();
        self.reporting.then_some(spent)
    }

    /// The cluster's balances after this shard's report (`None`: the report failed, and its
    /// spend goes with the next).
    pub fn rate_reported(&mut self, balances: Option<Vec<(OrgId, f64)>>) {
        let now = self.now_us();
        self.reporting = false;
        match balances {
            Some(balances) => {
                for (org, balance) in balances {
                    if let Some(b) = self.buckets.get_mut(&org) {
                        b.reported(Some(balance), now);
                    }
                }
            }
            None => {
                for b in self.buckets.values_mut() {
                    b.reported(None, now);
                }
                self.spent = true;
            }
        }
    }

    /// Check one dedup id of a batch whose tokens are spent: `Ok(key)` reserved (or no id), or
    /// `Err(first)` when it is known committed.
    pub fn reserve_dedup(
        &mut self,
        org: &OrgInfo,
        dedup_id: Option<&str>,
    ) -> Result<Option<DedupKey>, EventId> {
        let Some(key) = dedup_id.map(|d| self.dedup_key(&org.id, d)) else {
            return Ok(None);
        };
        match self.dedup.check_and_reserve(key) {
            Seen::Committed(first) => Err(first),
            _ => Ok(Some(key)),
        }
    }

    /// A batch admitted with `tokens` and `keys` could not be queued: give its tokens back and
    /// free its keys.
    pub fn undo_batch(&mut self, org: &OrgInfo, tokens: u32, keys: &[DedupKey]) {
        if let Some(b) = self.buckets.get_mut(&org.id) {
            b.refund_n(tokens);
        }
        for key in keys {
            self.dedup.settle(*key, None);
        }
    }

    /// The event admitted with `dedup_key` could not be queued: give its token back and free the key.
    pub fn undo(&mut self, org: &OrgInfo, dedup_key: Option<DedupKey>) {
        if let Some(b) = self.buckets.get_mut(&org.id) {
            b.refund();
        }
        if let Some(key) = dedup_key {
            self.dedup.settle(key, None);
        }
    }

    /// The bucket of `org` for the rate-limit headers, without spending.
    pub fn snapshot(&mut self, org: &OrgInfo) -> RateSnapshot {
        let now = self.now_us();
        self.bucket(org, now).snapshot(now, org.limit)
    }

    /// Forget every dedup id remembered ([`super::owner::Owner::forget_dedup`]).
    pub fn forget_dedup(&mut self) {
        self.dedup.clear();
    }

    /// The store settled a dedup key this shard reserved.
    pub fn settle(&mut self, key: DedupKey, outcome: Option<EventId>) {
        self.dedup.settle(key, outcome);
    }

    /// This shard's core.
    pub fn core(&self) -> CoreId {
        self.core
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn org(limit: u32) -> OrgInfo {
        OrgInfo {
            limit,
            ..OrgInfo::test(OrgId(Uuid::from_u128(42)))
        }
    }

    #[test]
    fn admits_until_the_budget_is_spent() {
        let mut s = Shard::new(CoreId(0), 16);
        let o = org(2);
        assert!(
            matches!(s.admit(&o, None), Admit::Go { rate, dedup_key: None } if rate.remaining == 1)
        );
        assert!(matches!(s.admit(&o, None), Admit::Go { .. }));
        match s.admit(&o, None) {
            Admit::Limited {
                rate,
                retry_after_s,
            } => {
                assert_eq!((rate.limit, rate.remaining), (2, 0));
                assert_eq!(retry_after_s, 30);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn committed_dedup_ids_come_back_as_duplicates() {
        let mut s = Shard::new(CoreId(0), 16);
        let o = org(100);
        let Admit::Go {
            dedup_key: Some(key),
            ..
        } = s.admit(&o, Some("order-1"))
        else {
            panic!()
        };
        // In flight: the database decides.
        assert!(matches!(s.admit(&o, Some("order-1")), Admit::Go { .. }));
        let first = EventId(Uuid::from_u128(7));
        s.settle(key, Some(first));
        assert!(
            matches!(s.admit(&o, Some("order-1")), Admit::Duplicate { event_id, .. } if event_id == first)
        );
        // Same dedup id, other organization: not a duplicate.
        let other = OrgInfo::test(OrgId(Uuid::from_u128(43)));
        assert!(matches!(s.admit(&other, Some("order-1")), Admit::Go { .. }));
    }

    #[test]
    fn spend_is_reported_at_once_when_due_once_at_a_time_and_again_after_a_failure() {
        let mut s = Shard::new(CoreId(0), 16);
        let (a, b) = (org(100_000), OrgInfo::test(OrgId(Uuid::from_u128(43))));
        assert_eq!(s.take_rate_report(false), None, "nothing spent");
        assert!(matches!(s.admit(&a, None), Admit::Go { .. }));
        assert!(
            s.report_urgent(),
            "an organization new here is reported at once"
        );
        let spent = s.take_rate_report(false).unwrap();
        assert_eq!(
            spent,
            vec![RateSpend {
                org: a.id,
                limit: 100_000,
                spent: 1
            }]
        );
        assert!(matches!(s.admit(&a, None), Admit::Go { .. }));
        assert!(!s.report_urgent(), "one report at a time");
        assert_eq!(s.take_rate_report(false), None);
        // The cluster's balance: others spent 50_000.
        s.rate_reported(Some(vec![(a.id, 49_999.0)]));
        assert_eq!(s.snapshot(&a).remaining, 49_998);
        // What was spent before the balance was heard goes at once; then it can wait.
        assert!(s.report_urgent());
        assert_eq!(s.take_rate_report(false).unwrap()[0].spent, 1);
        s.rate_reported(Some(vec![(a.id, 49_998.0)]));
        assert!(matches!(s.admit(&a, None), Admit::Go { .. }));
        assert!(
            !s.report_urgent(),
            "below a slice, and heard: the periodic report takes it"
        );
        assert_eq!(s.take_rate_report(false).unwrap()[0].spent, 1);
        s.rate_reported(Some(vec![(a.id, 49_997.0)]));
        assert!(s.take(&b, 3).is_ok());
        // b is new here: reported at once.
        assert!(s.report_urgent());
        let spent = s.take_rate_report(false).unwrap();
        assert_eq!(
            spent.iter().map(|x| (x.org, x.spent)).collect::<Vec<_>>(),
            [(b.id, 3)]
        );
        // The report failed: the same spend goes out with the next one.
        s.rate_reported(None);
        assert_eq!(s.take_rate_report(false).unwrap(), spent);
        // Stopping: whatever is unreported goes, even with a report on its way.
        assert!(matches!(s.admit(&a, None), Admit::Go { .. }));
        assert_eq!(s.take_rate_report(true).unwrap().len(), 1);
    }

    #[test]
    fn undo_refunds_and_frees_the_key() {
        let mut s = Shard::new(CoreId(0), 16);
        let o = org(1);
        let Admit::Go { dedup_key, .. } = s.admit(&o, Some("k")) else {
            panic!()
        };
        s.undo(&o, dedup_key);
        assert_eq!(s.snapshot(&o).remaining, 1);
        assert!(matches!(s.admit(&o, Some("k")), Admit::Go { .. }));
    }
}
