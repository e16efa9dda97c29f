//! The health probe: checks the database every second while it is up, every 200 ms while it is
//! down, and at once when a failed query says it may be down. Ingress reads the flag it keeps.

use std::sync::Arc;

use super::ctx::StoreCtx;
use crate::config::{Config, HEALTH_PROBE_EVERY_DOWN, HEALTH_PROBE_EVERY_UP};

/// Probe until aborted at shutdown.
pub async fn probe(ctx: Arc<StoreCtx>) {
    loop {
        let wait = if ctx.health.is_up() {
            HEALTH_PROBE_EVERY_UP
        } else {
            HEALTH_PROBE_EVERY_DOWN
        };
        let _ = tokio::time::timeout(wait, ctx.health.kicked()).await;
        let check = async {
            let client = ctx.pool.get().await.map_err(|e| e.to_string())?;
            client
                .simple_query("SELECT 1")
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(())
        };
        let timeout = Config::ms(ctx.config.db_connect_timeout_ms);
        match tokio::time::timeout(timeout, check).await {
            Ok(Ok(())) => {
                if ctx.health.set_up() {
                    tracing::info!("database reachable again");
                }
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "health probe failed");
                if ctx.health.set_down() {
                    tracing::warn!(error = %e, "database unreachable; answering 503 until it returns");
                }
            }
            Err(_) => {
                if ctx.health.set_down() {
                    tracing::warn!("database not answering; answering 503 until it returns");
                }
            }
        }
    }
}
