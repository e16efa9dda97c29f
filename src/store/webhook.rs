//! `POST` and `DELETE /api/webhook/config`: the organization's default endpoint (every event
//! type), whose signing secret is created with the first configuration and kept for the
//! organization's life: a deleted default endpoint is kept, removed, with its secret.

use super::ctx::{begin, StoreCtx};
use super::endpoints::{check_room, check_url, new_signing_secret, release_held, PARK};
use super::org::notify;
use crate::flow::answer::{Answer, EndpointStatus, Refusal, WebhookConfig};
use crate::flow::Change;
use crate::ids::{new_v7, Micros, OrgId};

/// Resolve the URL's host and apply the SSRF policy, then point the default endpoint at it
/// (active again if it was paused, disabled or deleted).
pub async fn set_webhook(ctx: &StoreCtx, org: OrgId, url: String) -> Result<Answer, Refusal> {
    check_url(ctx, org, &url, "webhook_url").await?;
    let now = Micros::now();
    let secret: String = ctx
        .timed_reruns("set webhook", || async {
            let mut client = ctx.pool.get().await?;
            let tx = begin(&mut client).await?;
            // Locked before its deliveries are written, as every endpoint change that writes them.
            let held = tx
                .query_opt(
                    "SELECT id, circuit_open_until FROM endpoints \
                     WHERE org_id = $1 AND is_default FOR UPDATE",
                    &[&org.0],
                )
                .await?;
            let updated = tx
                .query_opt(
                    "UPDATE endpoints SET url = $2, status = $3, updated_at = $4, \
                         disabled_reason = NULL, consecutive_failures = 0, failing_since = NULL, \
                         circuit_open_until = NULL \
                     WHERE org_id = $1 AND is_default RETURNING signing_secret",
                    &[
                        &org.0,
                        &url,
                        &EndpointStatus::Active.code(),
                        &now.to_system_time(),
                    ],
                )
                .await?;
            // The default endpoint, paused, disabled or deleted, is active again with a fresh
            // circuit: what it held goes now, as after a resume (what a delete parked too: those
            // deliveries are the endpoint's again, and would otherwise stay pending for good).
            if let Some(row) = held {
                release_held(&tx, row.get(0), row.get(1), now.to_system_time()).await?;
            }
            let secret = match updated {
                Some(row) => row.get(0),
                None => {
                    check_room(ctx, &tx, org, "webhook_url").await?;
                    let secret = new_signing_secret()?;
                    tx.execute(
                        "INSERT INTO endpoints (id, org_id, is_default, url, signing_secret, \
                             created_at, updated_at) VALUES ($1, $2, true, $3, $4, $5, $5)",
                        &[&new_v7(now), &org.0, &url, &secret, &now.to_system_time()],
                    )
                    .await?;
                    secret
                }
            };
            notify(&tx, org, Change::Endpoints).await?;
            tx.commit().await?;
            Ok(secret)
        })
        .await?;
    ctx.endpoints_changed(org);
    ctx.delivery.wake();
    Ok(Answer::WebhookSet(WebhookConfig {
        organization_id: org.0,
        webhook_url: Some(url),
        signing_secret: Some(secret),
        updated_at: now,
    }))
}

/// The default endpoint is removed (its secret kept); deliveries to it stop.
pub async fn delete_webhook(ctx: &StoreCtx, org: OrgId) -> Result<Answer, Refusal> {
    let now = Micros::now();
    ctx.timed_reruns("delete webhook", || async {
        let mut client = ctx.pool.get().await?;
        let tx = begin(&mut client).await?;
        // Locked before its deliveries are parked, as every endpoint change that writes them.
        tx.query_opt(
            "SELECT 1 FROM endpoints WHERE org_id = $1 AND is_default AND status <> $2 FOR UPDATE",
            &[&org.0, &EndpointStatus::Removed.code()],
        )
        .await?;
        let removed = tx
            .query_opt(
                "UPDATE endpoints SET status = $2, updated_at = $3 \
                 WHERE org_id = $1 AND is_default AND status <> $2 RETURNING id",
                &[
                    &org.0,
                    &EndpointStatus::Removed.code(),
                    &now.to_system_time(),
                ],
            )
            .await?;
        if let Some(row) = removed {
            let id: uuid::Uuid = row.get(0);
            tx.execute(PARK, &[&id]).await?;
        }
        notify(&tx, org, Change::Endpoints).await?;
        tx.commit().await?;
        Ok(())
    })
    .await?;
    ctx.endpoints_changed(org);
    Ok(Answer::WebhookDeleted(WebhookConfig {
        organization_id: org.0,
        webhook_url: None,
        signing_secret: None,
        updated_at: now,
    }))
}
