//! Where an organization's events go: its webhook, cached until it changes (a change on any node
//! reaches every node through LISTEN/NOTIFY), and its removal when a receiver answers 410 Gone.

use std::sync::Arc;
use std::time::Duration;

use super::model::Target;
use super::shared::Shared;
use super::sign;
use crate::flow::ORG_CHANGED_CHANNEL;
use crate::ids::OrgId;

impl Shared {
    /// The organization's webhook, from the cache or the database. `Err` when the database can't
    /// say (the job is then given back to the database to be claimed later).
    pub(super) async fn target(&self, org: OrgId) -> Result<Option<Arc<Target>>, String> {
        let epoch = {
            let guard = self.targets.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(t) = guard.0.get(&org) {
                return Ok(t.clone());
            }
            guard.1.epoch()
        };
        let load = async {
            let client = self.pool.get().await.map_err(|e| e.to_string())?;
            let stmt = client
                .prepare_cached(
                    "SELECT webhook_url, signing_secret FROM organizations WHERE id = $1",
                )
                .await
                .map_err(|e| e.to_string())?;
            let row = client
                .query_opt(&stmt, &[&org.0])
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(row.and_then(|r| {
                let url: Option<String> = r.get(0);
                let secret: Option<String> = r.get(1);
                let (url, secret) = (url?, secret?);
                let key = sign::secret_key(&secret)?;
                let uri = url.parse().ok()?;
                Some(Arc::new(Target { url, uri, key }))
            }))
        };
        let target = tokio::time::timeout(Duration::from_millis(self.config.db_timeout_ms), load)
            .await
            .map_err(|_| "database deadline passed".to_string())??;
        let mut guard = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        let (map, changes) = &mut *guard;
        if !changes.changed_since(org, epoch) {
            map.insert(org, target.clone());
        }
        Ok(target)
    }

    /// A receiver answered 410 Gone: remove the webhook (if it is still the one that answered) and
    /// tell every node, so the organization is pull-only from now on.
    pub(super) async fn remove_webhook(&self, org: OrgId, url: &str) {
        let work = async {
            let mut client = self.pool.get().await.map_err(|e| e.to_string())?;
            let tx = client.transaction().await.map_err(|e| e.to_string())?;
            let changed = tx
                .execute(
                    "UPDATE organizations SET webhook_url = NULL, webhook_updated_at = now() \
                     WHERE id = $1 AND webhook_url = $2",
                    &[&org.0, &url],
                )
                .await
                .map_err(|e| e.to_string())?;
            if changed > 0 {
                tx.execute(
                    "SELECT pg_notify($1, $2)",
                    &[&ORG_CHANGED_CHANNEL, &org.to_string()],
                )
                .await
                .map_err(|e| e.to_string())?;
            }
            tx.commit().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(changed)
        };
        match tokio::time::timeout(Duration::from_millis(self.config.db_timeout_ms), work).await {
            Ok(Ok(n)) if n > 0 => {
                tracing::info!(org = %org, "receiver answered 410 Gone: webhook removed")
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "removing a gone webhook failed"),
            Err(_) => tracing::warn!("removing a gone webhook timed out"),
        }
        self.forget_target(Some(org));
    }
}
