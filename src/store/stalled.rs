//! Sessions a stopped node left mid-protocol. A COPY waiting for its rows (or a pipeline waiting
//! for its Sync) is `active` in PostgreSQL, waiting on `ClientRead`, and so is a large answer
//! the node no longer reads (`ClientWrite`): no idle timeout ends it, a statement timeout is not
//! acted on while it waits for the client, and TCP keepalive does not either when the node's
//! kernel answers for it (a process stopped with SIGSTOP, a container paused by the cgroup
//! freezer; a network cut or a paused VM is found by keepalive). Its locks (on the partitions it
//! writes or reads: a retention round's detach waits on them), its connection slot and the
//! vacuum horizon stay held for as long as the node is stopped.
//!
//! No live node leaves a session so for long: each of its transactions has `--db-timeout-ms`,
//! after which it drops the connection. So every node, every [`STALLED_CHECK_EVERY`], ends the
//! server's sessions (known by their application names) in this database that have waited so
//! for longer than [`STALLED_AFTER_TIMEOUTS`] times its `--db-timeout-ms` (the nodes of a
//! cluster share it). The stopped node, when it goes on, finds its connection gone: the
//! transaction was rolled back whole, and is retried or answered 503 like any other.

use std::sync::Arc;

use super::ctx::StoreCtx;
use crate::config::{STALLED_AFTER_TIMEOUTS, STALLED_CHECK_EVERY};
use crate::db::{describe, pg_config, Part};

/// End the sessions stalled mid-protocol; how many were ended.
const END_STALLED: &str = "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) \
     FROM pg_stat_activity \
     WHERE datname = current_database() AND pid <> pg_backend_pid() \
       AND application_name = ANY($1) AND state = 'active' AND wait_event IN ('ClientRead', 'ClientWrite') \
       AND query_start < clock_timestamp() - make_interval(secs => $2)";

/// Check until aborted at shutdown.
pub async fn end_stalled_sessions(ctx: Arc<StoreCtx>) {
    let names: Vec<String> = Part::ALL
        .iter()
        .filter_map(|&part| {
            Some(
                pg_config(&ctx.config, part)
                    .ok()?
                    .get_application_name()?
                    .to_string(),
            )
        })
        .collect();
    let after_s = (ctx.db_timeout * STALLED_AFTER_TIMEOUTS).as_secs_f64();
    let mut warned = false;
    loop {
        tokio::time::sleep(STALLED_CHECK_EVERY).await;
        if !ctx.health.database_up() {
            continue;
        }
        let work = async {
            let client = ctx.pool.get().await.map_err(|e| e.to_string())?;
            let stmt = client
                .prepare_cached(END_STALLED)
                .await
                .map_err(|e| describe(&e))?;
            let row = client
                .query_one(&stmt, &[&names, &after_s])
                .await
                .map_err(|e| describe(&e))?;
            Ok::<i64, String>(row.get(0))
        };
        match tokio::time::timeout(ctx.db_timeout, work).await {
            Ok(Ok(0)) => {}
            Ok(Ok(ended)) => tracing::warn!(
                sessions = ended,
                after_s,
                "ended database sessions of a node stopped mid-statement (a COPY waiting for its \
                 rows, an answer not read); their locks are free"
            ),
            // Ending another role's session needs its membership (or pg_signal_backend).
            Ok(Err(e)) if !warned => {
                warned = true;
                tracing::warn!(error = %e, "stalled sessions could not be checked");
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "stalled sessions could not be checked"),
            Err(_) => tracing::debug!("stalled sessions not checked in time"),
        }
    }
}
