//! Changes to an organization that every node must hear about: one transaction with a NOTIFY,
//! then this node's caches are cleared before the change is answered.

use tokio_postgres::{Row, Transaction};

use super::ctx::{begin, StoreCtx};
use crate::flow::answer::Refusal;
use crate::flow::{Change, ORG_CHANGED_CHANNEL};
use crate::ids::OrgId;

/// Run `sql` (returning one row) and a NOTIFY in one transaction (again when PostgreSQL asks for
/// it, or its connection was found gone at BEGIN: `StoreCtx::timed_reruns`), then make sure no
/// core of this node still holds the organization's old state before answering. Other nodes
/// hear the NOTIFY within milliseconds.
pub async fn change_org(
    ctx: &StoreCtx,
    org: OrgId,
    what: &str,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Row, Refusal> {
    let row = ctx
        .timed_reruns(what, || async {
            let mut client = ctx.pool.get().await?;
            let tx = begin(&mut client).await?;
            let row = tx
                .query_opt(sql, params)
                .await?
                .ok_or(Refusal::NotFound("organization not found"))?;
            notify(&tx, org, Change::Any).await?;
            tx.commit().await?;
            Ok(row)
        })
        .await?;
    ctx.org_changed(Some(org)).await;
    Ok(row)
}

/// Tell every node the organization changed (delivered at COMMIT; the payload says what:
/// [`Change::payload`]).
pub async fn notify(
    tx: &Transaction<'_>,
    org: OrgId,
    change: Change,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "SELECT pg_notify($1, $2)",
        &[&ORG_CHANGED_CHANNEL, &change.payload(org)],
    )
    .await
    .map(|_| ())
}
