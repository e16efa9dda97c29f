//! Cluster-wide rate limits: one bucket per organization in `rate_budgets`, shared by every node.
//! A core reports what its organizations spent since its last report (one statement for all of
//! them: every `RATE_REPORT_EVERY`, or at once for a spent slice or an organization new to it);
//! each bucket is refilled for the time since it was last touched, capped at the limit, the spend
//! taken off, and the balance goes back to the core.
//! A balance may go below zero (nodes spent at once what only one could) down to minus one
//! minute's limit: every node then refuses until the refill has paid it back.

use tokio_postgres::Client;

use super::ctx::{Done, StoreCtx};
use crate::db::describe;
use crate::flow::job::RateSpend;
use crate::ids::OrgId;

/// The buckets no node touched for 2 minutes: by then one has refilled to its limit even from the
/// lowest balance (minus one minute's limit), so its row says no more than a missing row does (a
/// node that finds none starts full). Rows a report holds are skipped.
const PRUNE_SQL: &str = "\
    DELETE FROM rate_budgets WHERE org_id IN ( \
        SELECT org_id FROM rate_budgets \
        WHERE updated_at < clock_timestamp() - interval '2 minutes' \
        FOR UPDATE SKIP LOCKED)";
/// The same for endpoints' buckets (`endpoint_budgets`, at least minus a minute's worth).
const PRUNE_ENDPOINTS_SQL: &str = "\
    DELETE FROM endpoint_budgets WHERE endpoint_id IN ( \
        SELECT endpoint_id FROM endpoint_budgets \
        WHERE updated_at < clock_timestamp() - interval '2 minutes' \
        FOR UPDATE SKIP LOCKED)";

/// Rows in organization order, so two nodes reporting the same organizations lock them in the
/// same order and never deadlock.
const REPORT_SQL: &str = "\
    INSERT INTO rate_budgets AS b (org_id, limit_per_minute, tokens, updated_at) \
    SELECT t.org, t.lim, t.lim - t.spent, clock_timestamp() \
    FROM unnest($1::uuid[], $2::int4[], $3::int4[]) AS t(org, lim, spent) \
    ORDER BY t.org \
    ON CONFLICT (org_id) DO UPDATE SET \
        tokens = greatest(-EXCLUDED.limit_per_minute::float8, \
                          least(EXCLUDED.limit_per_minute::float8, \
                                b.tokens + greatest(0, extract(epoch FROM EXCLUDED.updated_at - b.updated_at)) \
                                           * EXCLUDED.limit_per_minute / 60.0) \
                          - (EXCLUDED.limit_per_minute - EXCLUDED.tokens)), \
        limit_per_minute = EXCLUDED.limit_per_minute, \
        updated_at = EXCLUDED.updated_at \
    RETURNING org_id, tokens";

/// Report `spent` and return the cluster's balances; `None` when the database did not answer
/// (the core keeps the spend and reports it again).
pub async fn report(ctx: &StoreCtx, spent: &[RateSpend]) -> Option<Vec<(OrgId, f64)>> {
    ctx.timed("rate report", write(ctx, spent)).await.ok()
}

async fn write(ctx: &StoreCtx, spent: &[RateSpend]) -> Done<Vec<(OrgId, f64)>> {
    let orgs: Vec<uuid::Uuid> = spent.iter().map(|s| s.org.0).collect();
    let limits: Vec<i32> = spent
        .iter()
        .map(|s| i32::try_from(s.limit).unwrap_or(i32::MAX))
        .collect();
    let tokens: Vec<i32> = spent
        .iter()
        .map(|s| i32::try_from(s.spent).unwrap_or(i32::MAX))
        .collect();
    let client = ctx.pool.get().await?;
    let stmt = client.prepare_cached(REPORT_SQL).await?;
    let rows = client.query(&stmt, &[&orgs, &limits, &tokens]).await?;
    Ok(rows
        .iter()
        .map(|r| (OrgId(r.get(0)), r.get::<_, f64>(1)))
        .collect())
}

/// Remove the buckets idle long enough to be full (`PRUNE_SQL`; by the database's clock, the one
/// `updated_at` is written with), so the table holds the organizations active lately, not every
/// one ever seen. Skipping the rows a report holds, it never waits on nor deadlocks with a report;
/// a report racing the delete inserts the row again, full less its spend, which is what the
/// deleted row held. Returns how many went.
pub async fn prune_idle(client: &Client) -> Result<u64, String> {
    let mut removed = 0;
    for sql in [PRUNE_SQL, PRUNE_ENDPOINTS_SQL] {
        removed += client.execute(sql, &[]).await.map_err(|e| describe(&e))?;
    }
    Ok(removed)
}
