//! The health probe: on its own connection (never waiting behind a busy pool), it checks every
//! second while the database is up, every 200 ms while it is down, and at once when a failed
//! write says it may be down, that the database *takes writes*: not a replica in recovery, not
//! read-only, and a real write of one tiny row commits. Ingress reads the flag it keeps (a
//! refused write answers 503 at once) and `/health/ready` answers from it.
//!
//! Two deadlines: the database must answer (connect and a read) within `--db-connect-timeout-ms`,
//! so an unreachable one is noticed within about a second; the write then has the
//! `--db-timeout-ms` every event write has, so a slow commit (a WAL flush stalled by a
//! checkpoint, a lock) that event writes would wait out does not turn the node away.

use std::sync::Arc;

use tokio_postgres::Client;

use super::ctx::StoreCtx;
use super::stalled::Stalled;
use crate::config::{
    Config, CLOCK_OFFSET_WARN, CLOCK_STEP_CHECK_EVERY, HEALTH_PROBE_CHECKS,
    HEALTH_PROBE_EVERY_DOWN, HEALTH_PROBE_EVERY_UP,
};
use crate::db::{connection_lost, describe, pg_config, Part};
use crate::ids::Micros;

/// Probe until aborted at shutdown.
pub async fn probe(ctx: Arc<StoreCtx>) {
    let mut conn: Option<Client> = None;
    let mut stalled = Stalled::new(&ctx.config);
    loop {
        let wait = if ctx.health.database_up() {
            HEALTH_PROBE_EVERY_UP
        } else {
            HEALTH_PROBE_EVERY_DOWN
        };
        let _ = tokio::time::timeout(wait, ctx.health.kicked()).await;
        let (mut reached, mut ended) = (false, false);
        let mut result = check(&ctx, &mut conn, &mut reached, &mut ended).await;
        // A connection ended (its own, or a new one cut while it was being made: a pooler
        // restarted, connections reset): that says little of the database; a new one says
        // whether it is gone (up to `HEALTH_PROBE_CHECKS` checks in all).
        let mut earlier: Vec<String> = Vec::new();
        while ended && earlier.len() + 1 < HEALTH_PROBE_CHECKS as usize {
            let Err(e) = result else { break };
            earlier.push(e);
            ended = false;
            result = check(&ctx, &mut conn, &mut reached, &mut ended).await;
        }
        if !earlier.is_empty() {
            result = result
                .map_err(|e| format!("{e} (on a new connection, after: {})", earlier.join("; ")));
        }
        ctx.health.set_reachable(reached);
        match result {
            Ok(()) => {
                if ctx.health.set_up() {
                    tracing::info!("database takes writes again");
                }
                // Within the probe's own answer deadline: a database that stops answering now
                // is found by the next probe no later than before.
                if let Some(client) = conn.as_ref() {
                    let limit = Config::ms(ctx.config.db_connect_timeout_ms);
                    stalled.check(client, limit, &ctx.metrics).await;
                }
            }
            Err(e) => {
                conn = None;
                if ctx.health.set_down() {
                    tracing::warn!(error = %e, "database does not take writes; answering 503 until it does");
                } else {
                    tracing::debug!(error = %e, "health probe failed");
                }
            }
        }
    }
}

/// One check on the probe's own connection (made if it has none); `reached` says whether the
/// database answered at all, `ended` whether a connection ended (or was refused) under it.
async fn check(
    ctx: &StoreCtx,
    conn: &mut Option<Client>,
    reached: &mut bool,
    ended: &mut bool,
) -> Result<(), String> {
    let answer = Config::ms(ctx.config.db_connect_timeout_ms);
    let (client, in_recovery, read_only) = tokio::time::timeout(answer, ask(ctx, conn, ended))
        .await
        .map_err(|_| "the database did not answer the probe in time".to_string())??;
    // It answered: whatever follows, reads can be served.
    *reached = true;
    if in_recovery {
        return Err("the database is a replica in recovery".into());
    }
    if read_only {
        return Err("the database is read-only".into());
    }
    let write = Config::ms(ctx.config.db_timeout_ms);
    let written = tokio::time::timeout(
        write,
        client.execute("UPDATE triggers_probe SET at = now() WHERE id = 1", &[]),
    )
    .await
    .map_err(|_| "the probe's write did not commit in time".to_string())?;
    written.map(drop).map_err(|e| lost(conn, &e, ended))
}

/// Connect if needed, then ask whether the database is in recovery and whether it is read-only;
/// also the connection asked on.
async fn ask<'a>(
    ctx: &StoreCtx,
    conn: &'a mut Option<Client>,
    ended: &mut bool,
) -> Result<(&'a Client, bool, bool), String> {
    if conn.as_ref().is_none_or(|c| c.is_closed()) {
        let pg = pg_config(&ctx.config, Part::Probe)?;
        let tls = crate::db::tls(&ctx.config)?;
        let (client, connection) = pg.connect(tls).await.map_err(|e| lost(conn, &e, ended))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        *conn = Some(client);
    }
    let client = conn.as_ref().expect("connected above");
    let sent = Micros::now();
    let row = match client
        .query_one(
            "SELECT pg_is_in_recovery(), current_setting('transaction_read_only') = 'on', \
             (extract(epoch FROM clock_timestamp()) * 1000000)::bigint",
            &[],
        )
        .await
    {
        Ok(row) => row,
        Err(e) => return Err(lost(conn, &e, ended)),
    };
    let client = conn.as_ref().expect("connected above");
    let answered = Micros::now();
    record_clock_offset(
        ctx,
        sent.0 + (answered.0 - sent.0) / 2 - row.get::<_, i64>(2),
    );
    Ok((client, row.get(0), row.get(1)))
}

/// The probe's error `e`; a connection that ended (or was refused) is dropped at once (its
/// client may not say it is closed yet), and the probe asks again on a new one (`ended`).
fn lost(conn: &mut Option<Client>, e: &tokio_postgres::Error, ended: &mut bool) -> String {
    if connection_lost(e) {
        *conn = None;
        *ended = true;
    }
    describe(e)
}

/// Record this node's clock less the database's (the database read its clock between a query's
/// sending and its answer, by this node's clock, taken as halfway). An offset past
/// `CLOCK_OFFSET_WARN` is logged when it first is, and when it is back within; one past
/// `--clock-offset-max-ms` stops this node taking changes and claiming deliveries until it is
/// back.
pub fn record_clock_offset(ctx: &StoreCtx, offset: i64) {
    let was = ctx.metrics.record_clock_offset(offset);
    judge_clock(ctx, offset);
    ctx.health.clock_measured();
    let limit = CLOCK_OFFSET_WARN.as_micros() as i64;
    match (was.abs() > limit, offset.abs() > limit) {
        (false, true) => tracing::warn!(
            offset_ms = offset / 1000,
            "this node's clock differs from the database's: leases are compared across nodes by \
             their clocks (run NTP on every node and on the database's host)"
        ),
        (true, false) => tracing::info!(
            offset_ms = offset / 1000,
            "clock back in step with the database's"
        ),
        _ => {}
    }
}

/// Between probes, every `CLOCK_STEP_CHECK_EVERY`: the last measured offset carried forward by
/// this node's own clocks ([`crate::metrics::Metrics::clock_offset_now_us`]), so that a step
/// of this node's clock stops changes within that time, not at the next probe.
pub async fn watch_clock_steps(ctx: Arc<StoreCtx>) {
    let mut tick = tokio::time::interval(CLOCK_STEP_CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        judge_clock(&ctx, ctx.metrics.clock_offset_now_us());
    }
}

/// Whether this node takes changes and claims deliveries with its clock `offset` µs off the
/// database's; said in the log when that changes.
fn judge_clock(ctx: &StoreCtx, offset: i64) {
    let off = ctx.config.clock_off(offset);
    if ctx.health.set_clock_off(off) {
        match off {
            true => tracing::error!(
                offset_ms = offset / 1000,
                max_ms = ctx.config.clock_offset_max_ms,
                "this node's clock is further off the database's than --clock-offset-max-ms: \
                 answering 503 and claiming no deliveries until it is back (event ids, delivery \
                 leases and retention go by clocks; run NTP on every node and on the database's \
                 host)"
            ),
            false => tracing::info!(
                offset_ms = offset / 1000,
                "clock within --clock-offset-max-ms of the database's again: taking events"
            ),
        }
    }
}
