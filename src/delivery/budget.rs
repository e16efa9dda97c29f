//! Cluster-wide endpoint rate limits: one token bucket per rate-limited endpoint in
//! `endpoint_budgets`, shared by every node (as `rate_budgets` is for organizations). A node
//! spends from its own view of the bucket ([`TokenBucket`]: a turn taken or reserved is spent)
//! and, every `RATE_REPORT_EVERY`, reports in one statement what each endpoint spent since the
//! last report; each bucket is refilled for the time since it was last touched (capped at one
//! second's worth), the spend taken off (down to minus a minute's worth), and the balance becomes
//! the node's view. So while several nodes drain one endpoint's backlog, together they send it
//! its limit, not the limit once per node: beyond it by at most what each node spent and had not
//! reported yet (a tenth of a second's worth), and a node's first second with an endpoint: a
//! node's first view of a bucket is full, and it reserves no turns until its first report comes
//! back (turns reserved against a full view of its own, one per delivery it holds, were each
//! node's to send beyond the limit; BENCHMARKS.md 2026-12-05).
//!
//! A node forgets its view of an endpoint's bucket a minute after it last spent from it
//! ([`super::runtime::BUCKET_FORGET_AFTER`]), so what it keeps and scans here follows the
//! endpoints it delivers to lately, not every one it ever did.
//!
//! When the database can't be reached the reports fail, each node goes on with its own view
//! (limits per node), and what it spent meanwhile is reported with the next report that passes,
//! up to one second's worth: an outage of minutes would otherwise leave the bucket a minute in
//! debt, and every node would hold the endpoint's deliveries back for that minute.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::time::MissedTickBehavior;
use uuid::Uuid;

use super::runtime::{EndpointRuntime, TokenBucket};
use super::shared::Shared;
use crate::config::RATE_REPORT_EVERY;
use crate::db::describe;
use crate::ids::Micros;

/// Rows in endpoint order, so two nodes reporting the same endpoints lock them in the same order
/// and never deadlock. A new row starts full less the spend (more than full only when the spend
/// is negative, turns given back: the next report, and every node's view, caps it).
const REPORT_SQL: &str = "\
    INSERT INTO endpoint_budgets AS b (endpoint_id, org_id, rate, tokens, updated_at) \
    SELECT t.ep, t.org, t.rate, t.rate - t.spent, clock_timestamp() \
    FROM unnest($1::uuid[], $2::uuid[], $3::int4[], $4::int4[]) AS t(ep, org, rate, spent) \
    ORDER BY t.ep \
    ON CONFLICT (endpoint_id, org_id) DO UPDATE SET \
        tokens = least(EXCLUDED.rate::float8, greatest(-60.0 * EXCLUDED.rate, \
                     least(EXCLUDED.rate::float8, \
                           b.tokens + greatest(0, extract(epoch FROM EXCLUDED.updated_at - b.updated_at)) \
                                      * EXCLUDED.rate) \
                     - (EXCLUDED.rate - EXCLUDED.tokens))), \
        rate = EXCLUDED.rate, \
        updated_at = EXCLUDED.updated_at \
    RETURNING endpoint_id, tokens";

/// Report every `RATE_REPORT_EVERY` until the pool stops (the task is aborted then).
pub(super) async fn budget_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(RATE_REPORT_EVERY);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        report(&shared).await;
    }
}

/// One endpoint's part of a report.
struct Spend {
    runtime: Arc<EndpointRuntime>,
    rate: u32,
    spent: i32,
}

/// Report what the rate-limited endpoints spent (and, with a spend of 0, ask the balance of
/// those with deliveries in memory, which may go soon), and adopt the balances.
async fn report(shared: &Shared) {
    let spends: Vec<Spend> = {
        let runtimes = shared.runtimes.lock().unwrap_or_else(|p| p.into_inner());
        runtimes
            .values()
            .filter_map(|r| {
                let mut g = r.gates();
                let b = g.bucket.as_mut()?;
                let spent = b.to_report();
                (spent != 0 || r.held() > 0).then(|| Spend {
                    runtime: Arc::clone(r),
                    rate: b.rate(),
                    spent,
                })
            })
            .collect()
    };
    if spends.is_empty() {
        return;
    }
    let balances = match shared.timed(write(shared, &spends)).await {
        Ok(balances) => balances,
        Err(e) => {
            tracing::debug!(error = %e, "endpoint rate report failed; reported again later");
            for s in &spends {
                s.to_bucket(|b| b.unreported_again(s.spent));
            }
            return;
        }
    };
    let now = Micros::now();
    for s in &spends {
        if let Some(&balance) = balances.get(&s.runtime.id) {
            if s.to_bucket(|b| b.adopt(balance, now)) == Some(true) {
                // Deliveries that found the fresh view empty waited without a turn: they take
                // one now, against the cluster's balance.
                s.runtime.changed.notify_waiters();
            }
        }
    }
}

impl Spend {
    /// Apply `f` to the endpoint's bucket, unless it was set up afresh for a new rate since the
    /// report was taken (that one has its own count); what `f` returned, if it was applied.
    fn to_bucket<T>(&self, f: impl FnOnce(&mut TokenBucket) -> T) -> Option<T> {
        let mut g = self.runtime.gates();
        let b = g.bucket.as_mut().filter(|b| b.rate() == self.rate)?;
        Some(f(b))
    }
}

async fn write(shared: &Shared, spends: &[Spend]) -> Result<HashMap<Uuid, f64>, String> {
    let ids: Vec<Uuid> = spends.iter().map(|s| s.runtime.id).collect();
    let orgs: Vec<Uuid> = spends.iter().map(|s| s.runtime.org.0).collect();
    let rates: Vec<i32> = spends
        .iter()
        .map(|s| i32::try_from(s.rate).unwrap_or(i32::MAX))
        .collect();
    let spent: Vec<i32> = spends.iter().map(|s| s.spent).collect();
    let client = shared.pool.get().await.map_err(|e| e.to_string())?;
    let stmt = client
        .prepare_cached(REPORT_SQL)
        .await
        .map_err(|e| describe(&e))?;
    let rows = client
        .query(&stmt, &[&ids, &orgs, &rates, &spent])
        .await
        .map_err(|e| describe(&e))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}
