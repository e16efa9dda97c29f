//! Cluster-wide endpoint rate limits: one token bucket per rate-limited endpoint in
//! `endpoint_budgets`, shared by every node (as `rate_budgets` is for organizations). A node
//! spends from its own view of the bucket ([`TokenBucket`]) and, every `RATE_REPORT_EVERY`,
//! reports in one statement what each endpoint spent since the last report and how many of its
//! deliveries it holds would go now (not retries waiting for their time, nor deliveries behind an
//! open circuit) (`triggers_endpoint_budget_report`, migration 0012): each bucket is
//! refilled for the time since it was last touched (capped at one second's worth) and the spend
//! taken off (down to minus a minute's worth). What comes back is the node's part: the bucket
//! names the nodes that reported it within the last second, and shares its rate among them in
//! proportion to the deliveries each would send now (up to a second's worth each). A node's view is at
//! most its part of a positive balance, and never what another node was promised and may still
//! spend; a debt is shared in the same proportion. The view refills at the node's part, and the
//! turns the node reserves for deliveries that wait are paced at it (reported when used, not
//! when reserved: one node's plan does not hold another back). So several nodes draining one
//! endpoint's backlog send it its limit together, from the first second on: a node's first view
//! is empty, and its first report is made at once when a delivery finds it so (one round trip,
//! not a wait for the next report). When a node's part changes much (a node came or went), the
//! turns it reserved at the old part are given back and taken anew at the new one.
//!
//! A node forgets its view of an endpoint's bucket a minute after it last spent from it
//! ([`super::runtime::BUCKET_FORGET_AFTER`]), so what it keeps and scans here follows the
//! endpoints it delivers to lately, not every one it ever did.
//!
//! When the database can't be reached the reports fail, each node goes on with its own view (its
//! part of the rate as last heard, all of it if it never heard), and what it spent meanwhile is
//! reported with the next report that passes, up to one second's worth: an outage of minutes
//! would otherwise leave the bucket a minute in debt, and every node would hold the endpoint's
//! deliveries back for that minute.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::time::MissedTickBehavior;
use uuid::Uuid;

use super::runtime::{EndpointRuntime, TokenBucket};
use super::shared::Shared;
use crate::config::RATE_REPORT_EVERY;
use crate::db::describe;
use crate::ids::Micros;

/// The report (migration 0012 has the function): the node's view and its part of the rate for
/// each endpoint.
const REPORT_SQL: &str = "SELECT ep, view_tokens, part \
    FROM triggers_endpoint_budget_report($1, $2::uuid[], $3::uuid[], $4::int4[], $5::int4[], \
                                         $6::int4[])";

/// Report every `RATE_REPORT_EVERY`, and at once when a delivery found a fresh view, until the
/// pool stops (the task is aborted then).
pub(super) async fn budget_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(RATE_REPORT_EVERY);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shared.report_now.notified() => {}
        }
        report(&shared).await;
    }
}

/// One endpoint's part of a report.
struct Spend {
    runtime: Arc<EndpointRuntime>,
    rate: u32,
    spent: i32,
    /// The deliveries to it this node holds and would send now (not those waiting for a
    /// retry's time or a circuit).
    wants: i32,
}

/// Report what the rate-limited endpoints spent (and, with a spend of 0, ask the balance of
/// those with deliveries in memory, which may go soon, and of fresh views), and adopt the
/// node's parts.
async fn report(shared: &Shared) {
    let spends: Vec<Spend> = {
        let runtimes = shared.runtimes.lock().unwrap_or_else(|p| p.into_inner());
        runtimes
            .values()
            .filter_map(|r| {
                let mut g = r.gates();
                let b = g.bucket.as_mut()?;
                let spent = b.to_report();
                let held = r.held();
                (spent != 0 || held > 0 || !b.heard()).then(|| Spend {
                    runtime: Arc::clone(r),
                    rate: b.rate(),
                    spent,
                    wants: i32::try_from(r.wants()).unwrap_or(i32::MAX),
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
                if s.to_bucket(|b| b.unreported_again(s.spent)) == Some(true) {
                    // Deliveries that found the fresh view empty go by this node's own view now.
                    s.runtime.change();
                }
            }
            return;
        }
    };
    let now = Micros::now();
    for s in &spends {
        if let Some(&(view, part)) = balances.get(&s.runtime.id) {
            if s.to_bucket(|b| b.adopt(view, part, now)) == Some(true) {
                // Deliveries that found the fresh view empty waited without a turn: they take
                // one now, from this node's part of the cluster's balance. Those that held a turn
                // paced at another part of the rate (a node came or went) take one anew.
                s.runtime.change();
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

/// Each endpoint's view for this node, and its part of the rate.
async fn write(shared: &Shared, spends: &[Spend]) -> Result<HashMap<Uuid, (f64, f64)>, String> {
    let ids: Vec<Uuid> = spends.iter().map(|s| s.runtime.id).collect();
    let orgs: Vec<Uuid> = spends.iter().map(|s| s.runtime.org.0).collect();
    let rates: Vec<i32> = spends
        .iter()
        .map(|s| i32::try_from(s.rate).unwrap_or(i32::MAX))
        .collect();
    let spent: Vec<i32> = spends.iter().map(|s| s.spent).collect();
    let wants: Vec<i32> = spends.iter().map(|s| s.wants).collect();
    let client = shared
        .pool
        .get()
        .await
        .map_err(|e| crate::db::describe_pool(&e))?;
    let stmt = client
        .prepare_cached(REPORT_SQL)
        .await
        .map_err(|e| describe(&e))?;
    let rows = client
        .query(&stmt, &[&shared.node, &ids, &orgs, &rates, &spent, &wants])
        .await
        .map_err(|e| describe(&e))?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect())
}
