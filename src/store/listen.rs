//! LISTEN for organization changes made by any node (this one included), so a rotated key is
//! refused and a changed webhook is used everywhere within a second.
//!
//! The connection is not trusted on TCP keepalive alone: the listener NOTIFYs itself a heartbeat
//! every `LISTEN_HEARTBEAT_EVERY`, and when none has come back for `LISTEN_HEARTBEAT_MISSED` (a
//! socket cut silently, a proxy that stopped forwarding) it gives the connection up. From then on,
//! and until it listens again, every cache of this node is flushed every heartbeat period, since a
//! change it can no longer hear of could be anywhere: keys are then checked against the database
//! without Argon2 (see `keys::verify`), webhooks re-read. Once listening again it flushes once
//! more, for what changed while it could not hear.

use std::sync::Arc;
use std::time::Instant;

use tokio_postgres::AsyncMessage;

use super::ctx::StoreCtx;
use crate::config::{LISTEN_HEARTBEAT_EVERY, LISTEN_HEARTBEAT_MISSED, LISTEN_RECONNECT_DELAY};
use crate::db::{pg_config, Part};
use crate::flow::{Change, ORG_CHANGED_CHANNEL};

/// The payload prefix of a heartbeat (organization changes carry a UUID).
const HEARTBEAT: &str = "heartbeat:";

/// Listen until aborted at shutdown, reconnecting after a lost or silent connection.
pub async fn run(ctx: Arc<StoreCtx>) {
    loop {
        let why = listen(&ctx).await;
        ctx.listening.send_replace(false);
        tracing::warn!(error = %why, "org-change listener lost; flushing caches until it is back");
        // Deaf: no cached organization state can be trusted. Flush now, then every heartbeat
        // period until listening again (reconnecting can take as long as the outage).
        let deaf = async {
            loop {
                flush(&ctx);
                tokio::time::sleep(LISTEN_HEARTBEAT_EVERY).await;
            }
        };
        let _ = tokio::time::timeout(LISTEN_RECONNECT_DELAY, deaf).await;
        let reconnect = listen_until_connected(&ctx);
        let flusher = async {
            loop {
                tokio::time::sleep(LISTEN_HEARTBEAT_EVERY).await;
                flush(&ctx);
            }
        };
        tokio::select! {
            () = reconnect => {}
            () = flusher => {}
        }
    }
}

/// Drop what this node caches about every organization, without waiting for the cores.
fn flush(ctx: &StoreCtx) {
    ctx.verifier.org_changed(None);
    ctx.delivery.org_changed(None);
    ctx.cores.notify_org_changed(None);
}

/// Wait until a new LISTEN connection could be made (then `run` goes round again to listen on
/// it). Returns at once if the database takes connections.
async fn listen_until_connected(ctx: &StoreCtx) {
    let Ok(pg) = pg_config(&ctx.config, Part::Listen) else {
        return std::future::pending().await;
    };
    loop {
        // The connector each time: its authorities' file may be back (README, "TLS to
        // PostgreSQL").
        let connected = match crate::db::tls(&ctx.config) {
            Ok(tls) => pg
                .connect(tls)
                .await
                .map(drop)
                .map_err(|e| crate::db::describe(&e)),
            Err(e) => Err(e),
        };
        match connected {
            Ok(()) => return,
            Err(e) => {
                tracing::debug!(error = %e, "listener reconnect failed");
                tokio::time::sleep(LISTEN_RECONNECT_DELAY).await;
            }
        }
    }
}

/// One LISTEN connection, until it is lost or a heartbeat goes missing; returns why it ended.
async fn listen(ctx: &StoreCtx) -> String {
    let pg = match pg_config(&ctx.config, Part::Listen) {
        Ok(pg) => pg,
        Err(e) => return e,
    };
    let tls = match crate::db::tls(&ctx.config) {
        Ok(tls) => tls,
        Err(e) => return e,
    };
    let (client, mut connection) = match pg.connect(tls).await {
        Ok(c) => c,
        Err(e) => return crate::db::describe(&e),
    };
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
    let client = Arc::new(client);
    let listened = tokio::time::timeout(
        LISTEN_HEARTBEAT_MISSED,
        client.batch_execute(&format!("LISTEN {ORG_CHANGED_CHANNEL}")),
    )
    .await;
    if !matches!(listened, Ok(Ok(()))) {
        driver.abort();
        return "LISTEN did not go through".into();
    }
    // Anything that changed before LISTEN took effect was not heard. Not waited for: at start-up
    // the cores are not serving yet (they wait for this).
    flush(ctx);
    ctx.listening.send_replace(true);
    let mut last_heard = Instant::now();
    let mut beat = 0u64;
    let mut ticker = tokio::time::interval(LISTEN_HEARTBEAT_EVERY);
    let why = loop {
        tokio::select! {
            payload = rx.recv() => {
                let Some(payload) = payload else {
                    break "listener connection closed".to_string();
                };
                last_heard = Instant::now();
                if payload.starts_with(HEARTBEAT) {
                    continue;
                }
                // Not waited for: this node's own changes were applied before it answered.
                match Change::heard(&payload) {
                    Some((org, Change::Any)) => {
                        let org = Some(org);
                        ctx.verifier.org_changed(org);
                        ctx.delivery.org_changed(org);
                        ctx.cores.notify_org_changed(org);
                    }
                    Some((org, Change::Endpoints)) => ctx.endpoints_changed(org),
                    None => tracing::warn!(payload, "unexpected org-change notification"),
                }
            }
            _ = ticker.tick() => {
                if last_heard.elapsed() > LISTEN_HEARTBEAT_MISSED {
                    break format!(
                        "no heartbeat for {} ms: the connection is silent",
                        last_heard.elapsed().as_millis()
                    );
                }
                beat += 1;
                let client = Arc::clone(&client);
                let payload = format!("{HEARTBEAT}{beat}");
                // Sent on its own task: a silent socket must not stall this loop.
                tokio::spawn(async move {
                    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] =
                        [&ORG_CHANGED_CHANNEL, &payload];
                    let notify = client.execute("SELECT pg_notify($1, $2)", &params);
                    let _ = tokio::time::timeout(LISTEN_HEARTBEAT_MISSED, notify).await;
                });
            }
        }
    };
    driver.abort();
    why
}
