//! Everything a request waits for besides event writes: key verification, keys, webhook config,
//! inbox, ack, event reads. Each job runs as its own task (at most `store_pool_size × 8` at once;
//! beyond that the bounded job queue fills and ingress answers 503) with a deadline of
//! `db_timeout_ms`; its answer is a finished [`Reply`] sent to the waiting core.
//!
//! Every statement uses an index: organizations by primary key or `key_id`, events by primary key
//! or `events_inbox` (org_id, status, id).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use base64::Engine;
use tokio::sync::{mpsc, Semaphore};
use tokio_postgres::Row;
use uuid::Uuid;

use super::{is_connection_error, EventStatus, Query, StoreCtx, StoreJob};
use crate::auth::verify::Flight;
use crate::auth::{ApiKey, OrgInfo, Tier};
use crate::delivery::target;
use crate::error::ApiError;
use crate::ids::{encode_cursor, new_v7, Micros, OrgId};
use crate::json::{write_str, Obj};
use crate::reply::Reply;
use crate::shard::mesh::Outcome;

/// The NOTIFY channel that tells every node an organization's key or webhook changed.
pub const ORG_CHANGED_CHANNEL: &str = "triggers_org_changed";

/// Why a job failed.
enum Failure {
    /// An API error to answer as it is.
    Api(ApiError),
    /// A database error: 503 if the database is gone, 500 otherwise.
    Db(tokio_postgres::Error),
    /// No connection could be had.
    Pool(String),
}

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        Failure::Api(e)
    }
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Self {
        Failure::Db(e)
    }
}

impl From<deadpool_postgres::PoolError> for Failure {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Failure::Pool(e.to_string())
    }
}

type Done<T> = Result<T, Failure>;

impl StoreCtx {
    fn fail(&self, what: &str, failure: Failure) -> ApiError {
        match failure {
            Failure::Api(e) => e,
            Failure::Db(e) if is_connection_error(&e) => {
                tracing::warn!(error = %e, what, "database unavailable");
                self.health.set_down();
                ApiError::Unavailable
            }
            Failure::Db(e) => {
                tracing::error!(error = %e, what, "query failed");
                ApiError::Internal
            }
            Failure::Pool(e) => {
                tracing::warn!(error = %e, what, "no database connection");
                self.health.set_down();
                ApiError::Unavailable
            }
        }
    }

    /// Run `work` under the database deadline.
    async fn timed<T>(
        &self,
        what: &str,
        work: impl std::future::Future<Output = Done<T>>,
    ) -> Result<T, ApiError> {
        match tokio::time::timeout(self.db_timeout, work).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(f)) => Err(self.fail(what, f)),
            Err(_) => {
                tracing::warn!(what, "database deadline passed");
                Err(ApiError::Unavailable)
            }
        }
    }
}

/// Take jobs off the queue until it closes, then wait for those still running.
pub(super) async fn run(mut jobs: mpsc::Receiver<StoreJob>, ctx: Arc<StoreCtx>) {
    let running_max = (ctx.config.store_pool_size * 8) as u32;
    let slots = Arc::new(Semaphore::new(running_max as usize));
    while let Some(job) = jobs.recv().await {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            break;
        };
        let ctx = Arc::clone(&ctx);
        tokio::spawn(async move {
            handle(&ctx, job).await;
            drop(slot);
        });
    }
    let _ = slots.acquire_many(running_max).await;
}

async fn handle(ctx: &StoreCtx, job: StoreJob) {
    match job {
        StoreJob::Auth { key, peer, reply } => {
            let result = verify(ctx, key, peer).await;
            ctx.mesh.complete_one(reply, Outcome::Auth(result));
        }
        StoreJob::Query {
            org,
            query,
            rate,
            reply,
        } => {
            let answer = run_query(ctx, org, query)
                .await
                .unwrap_or_else(|e| e.reply());
            ctx.mesh
                .complete_one(reply, Outcome::Reply(answer.with_rate(Some(rate))));
        }
        StoreJob::Generate { name, tier, reply } => {
            let answer = generate(ctx, name, tier)
                .await
                .unwrap_or_else(|e| e.reply());
            ctx.mesh.complete_one(reply, Outcome::Reply(answer));
        }
        StoreJob::Ready { reply } => {
            let check = ctx
                .timed("ready", async {
                    let client = ctx.pool.get().await?;
                    client.simple_query("SELECT 1").await?;
                    Ok(())
                })
                .await;
            let answer = match check {
                Ok(()) => Reply::json(200, &br#"{"status":"ready"}"#[..]),
                Err(_) => ApiError::Unavailable.reply(),
            };
            ctx.mesh.complete_one(reply, Outcome::Reply(answer));
        }
    }
}

async fn run_query(ctx: &StoreCtx, org: OrgInfo, query: Query) -> Result<Reply, ApiError> {
    match query {
        Query::KeyInfo => ctx.timed("key info", key_info(ctx, org.id)).await,
        Query::Rotate => rotate(ctx, org.id).await,
        Query::SetWebhook { url } => set_webhook(ctx, org.id, url).await,
        Query::DeleteWebhook => delete_webhook(ctx, org.id).await,
        Query::GetEvent { id } => ctx.timed("get event", get_event(ctx, org.id, id)).await,
        Query::Redeliver { id } => ctx.timed("redeliver", redeliver(ctx, org.id, id)).await,
        Query::Inbox {
            limit,
            status,
            before,
        } => {
            ctx.timed("inbox", inbox(ctx, org.id, limit, status, before))
                .await
        }
        Query::Ack { id } => ctx.timed("ack", ack(ctx, org.id, id)).await,
        Query::AckBatch { ids } => ctx.timed("ack batch", ack_batch(ctx, org.id, ids)).await,
    }
}

/// Look the key id up, check the secret with Argon2 off any connection, throttle failures.
async fn verify(ctx: &StoreCtx, key: ApiKey, peer: IpAddr) -> Result<OrgInfo, ApiError> {
    let hash = ctx.verifier.hash_key(&key);
    if let Some(org) = ctx.verifier.cached(hash) {
        return Ok(org);
    }
    match ctx.verifier.join(hash) {
        Flight::Leader(leader) => {
            let answer = verify_uncached(ctx, &key, peer, hash).await;
            leader.land(&answer);
            answer
        }
        Flight::Follower(rx) => match rx.await {
            Ok(Ok(org)) => Ok(org),
            Ok(Err(ApiError::Unauthorized(m))) => {
                ctx.verifier.record_failure(peer);
                Err(ApiError::Unauthorized(m))
            }
            // The leader was throttled, hit an outage or gave up: verify on our own account.
            _ => verify_uncached(ctx, &key, peer, hash).await,
        },
    }
}

async fn verify_uncached(
    ctx: &StoreCtx,
    key: &ApiKey,
    peer: IpAddr,
    hash: crate::auth::KeyHash,
) -> Result<OrgInfo, ApiError> {
    if let Some(retry_after_s) = ctx.verifier.throttled(peer) {
        return Err(ApiError::AuthThrottled { retry_after_s });
    }
    let epoch = ctx.verifier.epoch();
    let key_id = key.key_id().to_string();
    let row = ctx
        .timed("auth lookup", async {
            let client = ctx.pool.get().await?;
            let stmt = client
                .prepare_cached(
                    "SELECT id, rate_limit_per_minute, key_hash, key_prefix, webhook_url IS NOT NULL \
                     FROM organizations WHERE key_id = $1",
                )
                .await?;
            Ok(client.query_opt(&stmt, &[&key_id]).await?)
        })
        .await?;
    let refuse = || {
        ctx.verifier.record_failure(peer);
        Err(ApiError::Unauthorized("invalid API key"))
    };
    // An unknown key id costs an index lookup, never Argon2.
    let Some(row) = row else { return refuse() };
    let prefix: String = row.get(3);
    if prefix != key.prefix() {
        return refuse();
    }
    if !ctx
        .verifier
        .check(key.secret().to_string(), row.get(2))
        .await
    {
        return refuse();
    }
    let limit: i32 = row.get(1);
    let org = OrgInfo {
        id: OrgId(row.get(0)),
        limit: limit.max(1) as u32,
        has_webhook: row.get(4),
    };
    ctx.verifier.remember(hash, org, epoch);
    Ok(org)
}

/// A fresh key and its hash; the hash runs on a blocking thread.
async fn new_key(ctx: &StoreCtx) -> Result<(ApiKey, String), ApiError> {
    let key = ApiKey::generate().map_err(|e| {
        tracing::error!(error = %e, "OS random source failed");
        ApiError::Internal
    })?;
    let hash = ctx
        .verifier
        .hash(key.secret().to_string())
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "hashing a key failed");
            ApiError::Internal
        })?;
    Ok((key, hash))
}

fn is_unique_violation(f: &Failure) -> bool {
    matches!(f, Failure::Db(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION))
}

async fn generate(ctx: &StoreCtx, name: String, tier: Tier) -> Result<Reply, ApiError> {
    // A key-id collision (one in 62^16) just means trying another key.
    for _ in 0..3 {
        let (key, hash) = new_key(ctx).await?;
        let now = Micros::now();
        let id = new_v7(now);
        let epoch = ctx.verifier.epoch();
        let limit = tier.limit_per_minute() as i32;
        let insert = async {
            let client = ctx.pool.get().await?;
            let stmt = client
                .prepare_cached(
                    "INSERT INTO organizations \
                     (id, name, tier, rate_limit_per_minute, key_id, key_hash, key_prefix, created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .await?;
            client
                .execute(
                    &stmt,
                    &[
                        &id,
                        &name,
                        &tier.as_str(),
                        &limit,
                        &key.key_id(),
                        &hash,
                        &key.prefix(),
                        &now.to_system_time(),
                    ],
                )
                .await?;
            Ok(())
        };
        match tokio::time::timeout(ctx.db_timeout, insert).await {
            Ok(Ok(())) => {
                // The first request with the new key needs no Argon2 run.
                let org = OrgInfo {
                    id: OrgId(id),
                    limit: limit as u32,
                    has_webhook: false,
                };
                ctx.verifier
                    .remember(ctx.verifier.hash_key(&key), org, epoch);
                return Ok(Reply::build(201, |out| {
                    let mut o = Obj::new(out);
                    o.str("api_key", key.as_str())
                        .id("organization_id", &id)
                        .str("organization_name", &name)
                        .str("tier", tier.as_str())
                        .int("rate_limit_per_minute", i64::from(limit))
                        .time("created_at", now);
                    o.finish();
                }));
            }
            Ok(Err(f)) if is_unique_violation(&f) => continue,
            Ok(Err(f)) => return Err(ctx.fail("generate key", f)),
            Err(_) => return Err(ApiError::Unavailable),
        }
    }
    Err(ApiError::Internal)
}

async fn key_info(ctx: &StoreCtx, org: OrgId) -> Done<Reply> {
    let client = ctx.pool.get().await?;
    let stmt = client
        .prepare_cached(
            "SELECT name, tier, rate_limit_per_minute, webhook_url, key_prefix, created_at, rotated_at \
             FROM organizations WHERE id = $1",
        )
        .await?;
    let row = client
        .query_opt(&stmt, &[&org.0])
        .await?
        .ok_or(ApiError::NotFound("organization not found"))?;
    Ok(Reply::build(200, |out| {
        let mut o = Obj::new(out);
        o.id("organization_id", &org.0)
            .str("organization_name", row.get(0))
            .str("tier", row.get(1))
            .int("rate_limit_per_minute", i64::from(row.get::<_, i32>(2)))
            .opt_str("webhook_url", row.get(3))
            .str("key_prefix", row.get(4))
            .time("created_at", Micros::from_system_time(row.get(5)))
            .opt_time(
                "rotated_at",
                row.get::<_, Option<SystemTime>>(6)
                    .map(Micros::from_system_time),
            );
        o.finish();
    }))
}

/// Run `update` and a NOTIFY in one transaction, then make sure no core of this node still holds
/// the organization's old state before answering. Other nodes hear the NOTIFY within milliseconds.
async fn change_org(
    ctx: &StoreCtx,
    org: OrgId,
    what: &str,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Row, ApiError> {
    let row = ctx
        .timed(what, async {
            let mut client = ctx.pool.get().await?;
            let tx = client.transaction().await?;
            let row = tx
                .query_opt(sql, params)
                .await?
                .ok_or(ApiError::NotFound("organization not found"))?;
            tx.execute(
                "SELECT pg_notify($1, $2)",
                &[&ORG_CHANGED_CHANNEL, &org.to_string()],
            )
            .await?;
            tx.commit().await?;
            Ok(row)
        })
        .await?;
    ctx.org_changed(Some(org)).await;
    Ok(row)
}

async fn rotate(ctx: &StoreCtx, org: OrgId) -> Result<Reply, ApiError> {
    let (key, hash) = new_key(ctx).await?;
    let now = Micros::now();
    let row = change_org(
        ctx,
        org,
        "rotate key",
        "UPDATE organizations SET key_id = $2, key_hash = $3, key_prefix = $4, rotated_at = $5 \
         WHERE id = $1 RETURNING name",
        &[
            &org.0,
            &key.key_id(),
            &hash,
            &key.prefix(),
            &now.to_system_time(),
        ],
    )
    .await?;
    Ok(Reply::build(200, |out| {
        let mut o = Obj::new(out);
        o.str("api_key", key.as_str())
            .id("organization_id", &org.0)
            .str("organization_name", row.get(0))
            .time("rotated_at", now);
        o.finish();
    }))
}

/// `whsec_` and the standard base64 of 32 random bytes.
fn new_signing_secret() -> Result<String, ApiError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|_| ApiError::Internal)?;
    Ok(format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    ))
}

async fn set_webhook(ctx: &StoreCtx, org: OrgId, url: String) -> Result<Reply, ApiError> {
    let parsed = target::parse_url(&url).map_err(|why| ApiError::validation("webhook_url", why))?;
    target::resolve(&parsed, ctx.config.allow_private_webhooks)
        .await
        .map_err(|why| ApiError::validation("webhook_url", why))?;
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
    Ok(Reply::build(200, |out| {
        let mut o = Obj::new(out);
        o.id("organization_id", &org.0)
            .str("webhook_url", &url)
            .str("signing_secret", row.get(0))
            .time("updated_at", now);
        o.finish();
    }))
}

async fn delete_webhook(ctx: &StoreCtx, org: OrgId) -> Result<Reply, ApiError> {
    let now = Micros::now();
    change_org(
        ctx,
        org,
        "delete webhook",
        "UPDATE organizations SET webhook_url = NULL, webhook_updated_at = $2 WHERE id = $1 RETURNING id",
        &[&org.0, &now.to_system_time()],
    )
    .await?;
    Ok(Reply::build(200, |out| {
        let mut o = Obj::new(out);
        o.id("organization_id", &org.0)
            .null("webhook_url")
            .time("updated_at", now);
        o.finish();
    }))
}

/// The columns of an event as the inbox shows it, in the order [`write_event`] reads them.
const EVENT_COLUMNS: &str =
    "id, type, payload::text, dedup_id, status, attempts, created_at, delivered_at";

/// Write one event's inbox fields (the payload as the bytes that were received).
fn write_event(o: &mut Obj<'_>, row: &Row) {
    o.id("id", &row.get::<_, Uuid>(0))
        .str("type", row.get(1))
        .raw("payload", row.get::<_, &str>(2).as_bytes())
        .opt_str("dedup_id", row.get(3))
        .str("status", EventStatus::from_i16(row.get(4)).as_str())
        .int("attempts", i64::from(row.get::<_, i32>(5)))
        .time("created_at", Micros::from_system_time(row.get(6)))
        .opt_time(
            "delivered_at",
            row.get::<_, Option<SystemTime>>(7)
                .map(Micros::from_system_time),
        );
}

async fn get_event(ctx: &StoreCtx, org: OrgId, id: Uuid) -> Done<Reply> {
    let client = ctx.pool.get().await?;
    let event_sql = format!("SELECT {EVENT_COLUMNS} FROM events WHERE id = $1 AND org_id = $2");
    let (event_stmt, attempts_stmt) = tokio::try_join!(
        client.prepare_cached(&event_sql),
        client.prepare_cached(
            "SELECT attempt, at, response_status, error, duration_ms FROM delivery_attempts \
             WHERE event_id = $1 ORDER BY attempt"
        ),
    )?;
    // Both statements go out together on the one connection.
    let (event_params, attempt_params): (
        [&(dyn tokio_postgres::types::ToSql + Sync); 2],
        [&(dyn tokio_postgres::types::ToSql + Sync); 1],
    ) = ([&id, &org.0], [&id]);
    let (event, attempts) = tokio::try_join!(
        client.query_opt(&event_stmt, &event_params),
        client.query(&attempts_stmt, &attempt_params),
    )?;
    let event = event.ok_or(ApiError::NotFound("event not found"))?;
    Ok(Reply::build(200, |out| {
        let mut o = Obj::new(out);
        write_event(&mut o, &event);
        let list = o.key("delivery_attempts");
        list.push(b'[');
        for (i, a) in attempts.iter().enumerate() {
            if i > 0 {
                list.push(b',');
            }
            let mut item = Obj::new(list);
            item.int("attempt", i64::from(a.get::<_, i32>(0)))
                .time("at", Micros::from_system_time(a.get(1)));
            match a.get::<_, Option<i16>>(2) {
                Some(s) => item.int("response_status", i64::from(s)),
                None => item.null("response_status"),
            };
            item.opt_str("error", a.get(3))
                .int("duration_ms", i64::from(a.get::<_, i32>(4)));
            item.finish();
        }
        list.push(b']');
        o.finish();
    }))
}

async fn redeliver(ctx: &StoreCtx, org: OrgId, id: Uuid) -> Done<Reply> {
    let client = ctx.pool.get().await?;
    let stmt = client
        .prepare_cached(
            "SELECT o.webhook_url IS NOT NULL, \
                    EXISTS (SELECT 1 FROM events WHERE id = $1 AND org_id = $2) \
             FROM organizations o WHERE o.id = $2",
        )
        .await?;
    let row = client
        .query_opt(&stmt, &[&id, &org.0])
        .await?
        .ok_or(ApiError::NotFound("event not found"))?;
    let (has_webhook, exists): (bool, bool) = (row.get(0), row.get(1));
    if !exists {
        return Err(ApiError::NotFound("event not found").into());
    }
    if !has_webhook {
        return Err(ApiError::NoWebhook.into());
    }
    // A new round: the retry budget starts over, the event is due now.
    let stmt = client
        .prepare_cached(
            "UPDATE events SET status = 0, retry_base = attempts, next_attempt_at = $3, \
             delivered_at = NULL, acknowledged_at = NULL \
             WHERE id = $1 AND org_id = $2 RETURNING id",
        )
        .await?;
    let now = Micros::now();
    if client
        .query_opt(&stmt, &[&id, &org.0, &now.to_system_time()])
        .await?
        .is_none()
    {
        return Err(ApiError::NotFound("event not found").into());
    }
    ctx.delivery.wake();
    Ok(Reply::build(202, |out| {
        let mut o = Obj::new(out);
        o.id("id", &id).str("status", "pending");
        o.finish();
    }))
}

async fn inbox(
    ctx: &StoreCtx,
    org: OrgId,
    limit: u32,
    status: EventStatus,
    before: Option<Uuid>,
) -> Done<Reply> {
    let client = ctx.pool.get().await?;
    let stmt = client
        .prepare_cached(&format!(
            "SELECT {EVENT_COLUMNS} FROM events \
             WHERE org_id = $1 AND status = $2 AND id < $3 ORDER BY id DESC LIMIT $4"
        ))
        .await?;
    let before = before.unwrap_or(Uuid::max());
    let status_code = status as i16;
    let mut rows = client
        .query(
            &stmt,
            &[&org.0, &status_code, &before, &(i64::from(limit) + 1)],
        )
        .await?;
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    Ok(Reply::build(200, |out| {
        out.reserve(rows.len() * 400);
        let mut o = Obj::new(out);
        let list = o.key("events");
        list.push(b'[');
        for (i, row) in rows.iter().enumerate() {
            if i > 0 {
                list.push(b',');
            }
            let mut item = Obj::new(list);
            write_event(&mut item, row);
            item.finish();
        }
        list.push(b']');
        match rows.last().filter(|_| more) {
            Some(last) => o.str("next_cursor", &encode_cursor(last.get(0))),
            None => o.null("next_cursor"),
        };
        o.finish();
    }))
}

const ACK: &str = "UPDATE events SET status = 1, acknowledged_at = COALESCE(acknowledged_at, $3), \
                   delivered_at = COALESCE(delivered_at, $3), next_attempt_at = NULL";

async fn ack(ctx: &StoreCtx, org: OrgId, id: Uuid) -> Done<Reply> {
    let client = ctx.pool.get().await?;
    let stmt = client
        .prepare_cached(&format!(
            "{ACK} WHERE id = $1 AND org_id = $2 RETURNING acknowledged_at"
        ))
        .await?;
    let now = Micros::now().to_system_time();
    let row = client
        .query_opt(&stmt, &[&id, &org.0, &now])
        .await?
        .ok_or(ApiError::NotFound("event not found"))?;
    Ok(Reply::build(200, |out| {
        let mut o = Obj::new(out);
        o.id("id", &id)
            .str("status", "delivered")
            .time("acknowledged_at", Micros::from_system_time(row.get(0)));
        o.finish();
    }))
}

async fn ack_batch(ctx: &StoreCtx, org: OrgId, ids: Vec<Uuid>) -> Done<Reply> {
    let client = ctx.pool.get().await?;
    let stmt = client
        .prepare_cached(&format!(
            "{ACK} WHERE org_id = $2 AND id = ANY($1) RETURNING id"
        ))
        .await?;
    let now = Micros::now().to_system_time();
    let acked: std::collections::HashSet<Uuid> = client
        .query(&stmt, &[&ids, &org.0, &now])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(Reply::build(200, |out| {
        let mut o = Obj::new(out);
        for (name, want) in [("acknowledged", true), ("not_found", false)] {
            let list = o.key(name);
            list.push(b'[');
            let mut first = true;
            for id in ids.iter().filter(|id| acked.contains(id) == want) {
                if !first {
                    list.push(b',');
                }
                first = false;
                write_str(list, &id.hyphenated().to_string());
            }
            list.push(b']');
        }
        o.finish();
    }))
}
