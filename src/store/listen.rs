//! LISTEN for organization changes made by any node (this one included), so a rotated key is
//! refused and a changed webhook is used everywhere within milliseconds. After a lost connection
//! every cache is flushed, since notifications sent meanwhile were missed.

use std::sync::Arc;

use tokio_postgres::AsyncMessage;

use super::ctx::StoreCtx;
use crate::config::LISTEN_RECONNECT_DELAY;
use crate::db::pg_config;
use crate::flow::ORG_CHANGED_CHANNEL;
use crate::ids::OrgId;

/// Listen until aborted at shutdown, reconnecting after a lost connection.
pub async fn run(ctx: Arc<StoreCtx>) {
    let mut connected_before = false;
    loop {
        if let Err(e) = listen(&ctx, connected_before).await {
            tracing::debug!(error = %e, "org-change listener disconnected");
        }
        connected_before = true;
        tokio::time::sleep(LISTEN_RECONNECT_DELAY).await;
    }
}

async fn listen(ctx: &StoreCtx, flush_first: bool) -> Result<(), String> {
    let pg = pg_config(&ctx.config)?;
    let (client, mut connection) = pg
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| e.to_string())?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx.send(n.payload().to_string()).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "listener connection error");
                    break;
                }
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {ORG_CHANGED_CHANNEL}"))
        .await
        .map_err(|e| e.to_string())?;
    if flush_first {
        ctx.org_changed(None).await;
    }
    while let Some(payload) = rx.recv().await {
        match payload.parse::<uuid::Uuid>() {
            Ok(id) => {
                // Not waited for: this node's own changes were applied before it answered.
                let org = Some(OrgId(id));
                ctx.verifier.org_changed(org);
                ctx.delivery.org_changed(org);
                ctx.cores.notify_org_changed(org);
            }
            Err(_) => tracing::warn!(payload, "unexpected org-change notification"),
        }
    }
    driver.abort();
    drop(client);
    Err("listener connection closed".into())
}
