//! `POST` and `DELETE /api/webhook/config`: the organization's webhook and its signing secret.

use base64::Engine;

use super::ctx::StoreCtx;
use super::org::change_org;
use crate::config::SIGNING_SECRET_BYTES;
use crate::flow::answer::{Answer, Refusal, WebhookConfig};
use crate::ids::{Micros, OrgId};
use crate::url_policy;

/// `whsec_` and the standard base64 of random bytes.
fn new_signing_secret() -> Result<String, Refusal> {
    let mut bytes = [0u8; SIGNING_SECRET_BYTES];
    getrandom::fill(&mut bytes).map_err(|_| Refusal::Internal)?;
    Ok(format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    ))
}

/// Resolve the URL's host and apply the SSRF policy, then store it; the secret is made with the
/// first configuration and kept for the organization's life.
pub async fn set_webhook(ctx: &StoreCtx, org: OrgId, url: String) -> Result<Answer, Refusal> {
    let invalid = |message: String| Refusal::Invalid {
        field: "webhook_url",
        message,
    };
    let parsed = url_policy::parse_url(&url).map_err(invalid)?;
    url_policy::resolve(&parsed, ctx.config.allow_private_webhooks)
        .await
        .map_err(invalid)?;
    let secret = new_signing_secret()?;
    let now = Micros::now();
    let row = change_org(
        ctx,
        org,
        "set webhook",
        "UPDATE organizations SET webhook_url = $2, signing_secret = COALESCE(signing_secret, $3), \
         webhook_updated_at = $4 WHERE id = $1 RETURNING signing_secret",
        &[&org.0, &url, &secret, &now.to_system_time()],
    )
    .await?;
    Ok(Answer::WebhookSet(WebhookConfig {
        organization_id: org.0,
        webhook_url: Some(url),
        signing_secret: Some(row.get(0)),
        updated_at: now,
    }))
}

/// The organization becomes pull-only; its secret is kept for a later configuration.
pub async fn delete_webhook(ctx: &StoreCtx, org: OrgId) -> Result<Answer, Refusal> {
    let now = Micros::now();
    change_org(
        ctx,
        org,
        "delete webhook",
        "UPDATE organizations SET webhook_url = NULL, webhook_updated_at = $2 WHERE id = $1 RETURNING id",
        &[&org.0, &now.to_system_time()],
    )
    .await?;
    Ok(Answer::WebhookDeleted(WebhookConfig {
        organization_id: org.0,
        webhook_url: None,
        signing_secret: None,
        updated_at: now,
    }))
}
